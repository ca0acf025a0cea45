//! The cloud-init NoCloud seed of a VM: `meta-data`, `user-data` and
//! `network-config` on an iso9660 volume labelled `cidata`, attached as a
//! read-only disk, plus a `vendor-data` script of the daemon's own that
//! makes the guest trust its SSH CA (src/ssh). Any image with cloud-init
//! reads it on first boot; the built-in busybox image applies a subset
//! (hostname, SSH keys, scripts) and runs the vendor-data script.

use std::path::{Path, PathBuf};
use tokio::process::Command;

/// The guest's static network settings, written as netplan v2 `network-config`.
#[derive(Debug, Clone)]
pub struct SeedNet {
    pub mac: String,
    pub ip: String,
    pub prefix: u8,
    pub gateway: String,
    pub dns: String,
}

/// A hostname cloud-init accepts: ids have an underscore, DNS labels may not.
pub fn hostname_for(vm_id: &str) -> String {
    vm_id.replace('_', "-")
}

/// Who a seed tells its guest it is.
#[derive(Debug, Clone, Copy)]
pub struct SeedIdentity<'a> {
    /// The VM: its hostname.
    pub vm_id: &'a str,
    /// cloud-init's instance-id (a new one makes cloud-init apply the seed
    /// again): the VM id, except in a seed written for another VM's memory.
    pub instance_id: &'a str,
    /// The principal the vendor-data script has `agent` trust.
    pub principal: &'a str,
}

impl<'a> SeedIdentity<'a> {
    /// A VM that is itself: the usual seed.
    pub fn own(vm_id: &'a str) -> SeedIdentity<'a> {
        SeedIdentity {
            vm_id,
            instance_id: vm_id,
            principal: vm_id,
        }
    }
}

pub fn meta_data(who: &SeedIdentity) -> String {
    format!(
        "instance-id: {}\nlocal-hostname: {}\n",
        who.instance_id,
        hostname_for(who.vm_id)
    )
}

pub fn network_config(n: &SeedNet) -> String {
    format!(
        "version: 2\n\
         ethernets:\n  \
           eth0:\n    \
             match:\n      \
               macaddress: \"{mac}\"\n    \
             set-name: eth0\n    \
             addresses: [\"{ip}/{prefix}\"]\n    \
             gateway4: {gw}\n    \
             nameservers:\n      \
               addresses: [{dns}]\n",
        mac = n.mac,
        ip = n.ip,
        prefix = n.prefix,
        gw = n.gateway,
        dns = n.dns,
    )
}

/// Where the guest keeps what `vendor_data` writes.
pub const GUEST_CA_FILE: &str = "/etc/ssh/hatch/user_ca.pub";
pub const GUEST_PRINCIPALS_DIR: &str = "/etc/ssh/hatch/principals";
/// The directory `agent` owns, holding its principals file (the file
/// sshd reads is a symlink to it): see `vendor_data`.
pub const GUEST_OWN_DIR: &str = "/etc/ssh/hatch/agent";

/// `'text'` for sh, whatever `text` holds.
fn sh_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r#"'\''"#))
}

/// The `vendor-data` script: trust `ca_public_key` for user `agent` with
/// principal `vm_id`, and make that user. A script (not cloud-config) so that
/// the user's own `user-data` never replaces it (cloud-init lets user data
/// override vendor cloud-config key by key); cloud-init runs it once per
/// instance in its final stage, the busybox image on every boot before its
/// sshd starts. Running it again changes nothing.
pub fn vendor_data(ca_public_key: &str, vm_id: &str) -> String {
    format!(
        r#"#!/bin/sh
# Written by hatch: lets certificates from its SSH CA (POST /vms/ID/connect)
# log in as `{user}`, and only those whose principal is this VM's id.
ca={ca}
principal={principal}
user={user}
mkdir -p /etc/ssh/sshd_config.d {principals_dir}
printf '%s\n' "$ca" >{ca_file}
chmod 755 /etc/ssh/hatch {principals_dir}
chmod 644 {ca_file}
printf '%s\n' 'TrustedUserCAKeys {ca_file}' \
    'AuthorizedPrincipalsFile {principals_dir}/%u' >/etc/ssh/sshd_config.d/50-hatch-ca.conf
grep -qsi '^[[:space:]]*Include[[:space:]].*sshd_config\.d' /etc/ssh/sshd_config ||
    echo "hatch: warning: /etc/ssh/sshd_config does not include sshd_config.d; copy /etc/ssh/sshd_config.d/50-hatch-ca.conf into it" >&2
if ! id "$user" >/dev/null 2>&1; then
    shell=/bin/sh
    [ -x /bin/bash ] && shell=/bin/bash
    if command -v useradd >/dev/null 2>&1; then
        useradd --create-home --shell "$shell" --comment "hatch agent" "$user"
    else
        adduser -D -s "$shell" -g "hatch agent" "$user"
    fi
    # No password, but not locked: sshd without PAM refuses a locked ("!") account.
    if command -v usermod >/dev/null 2>&1; then usermod -p '*' "$user"; fi
    if [ -d /etc/sudoers.d ]; then
        echo "$user ALL=(ALL) NOPASSWD:ALL" >"/etc/sudoers.d/90-hatch-$user"
        chmod 440 "/etc/sudoers.d/90-hatch-$user"
    fi
fi
# One file per user (%u): a certificate for this VM logs in as $user only.
# The file sits in a directory $user owns, behind a symlink from the path sshd
# reads, so the daemon logged in as $user can tell a fork its own id (it
# replaces the file); the principals directory stays root's, so $user cannot
# add a file for another user. sshd checks the resolved path: file and
# directories owned by root or $user, none writable by group or others.
own={own_dir}
mkdir -p "$own"
printf '%s\n' "$principal" >"$own/principals.new"
chown "$user" "$own" "$own/principals.new"
chmod 755 "$own"
chmod 644 "$own/principals.new"
mv -f "$own/principals.new" "$own/principals"
ln -sfn "$own/principals" {principals_dir}/$user
# A running sshd reads its configuration again (cloud-init runs this after it started).
if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
    systemctl try-reload-or-restart ssh.service sshd.service 2>/dev/null || true
elif [ -s /run/sshd.pid ]; then
    kill -HUP "$(cat /run/sshd.pid)" 2>/dev/null || true
fi
"#,
        user = crate::ssh::GUEST_USER,
        ca = sh_quote(ca_public_key),
        principal = sh_quote(vm_id),
        ca_file = GUEST_CA_FILE,
        principals_dir = GUEST_PRINCIPALS_DIR,
        own_dir = GUEST_OWN_DIR,
    )
}

/// The command the daemon runs in a guest as `agent` to make it trust
/// certificates for `vm_id` (a fork still naming its source): the file
/// `vendor_data` gave `agent` is replaced in one rename, so sshd never reads
/// half of it.
pub fn own_principal_command(vm_id: &str) -> String {
    format!(
        "set -e; umask 022; f={own_dir}/principals; \
         printf '%s\\n' {principal} >\"$f.$$\"; mv -f \"$f.$$\" \"$f\"",
        own_dir = GUEST_OWN_DIR,
        principal = sh_quote(vm_id),
    )
}

/// Writes the seed files and the `seed.iso` volume into `work_dir`;
/// `ssh_ca` (the CA's public key line) adds the `vendor-data` script.
pub async fn write(
    work_dir: &Path,
    who: &SeedIdentity<'_>,
    user_data: Option<&str>,
    net: Option<&SeedNet>,
    ssh_ca: Option<&str>,
) -> Result<PathBuf, String> {
    let dir = work_dir.join("seed");
    tokio::fs::create_dir_all(&dir)
        .await
        .map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let mut files = vec![
        ("meta-data", meta_data(who)),
        (
            "user-data",
            user_data
                .map(str::to_string)
                .unwrap_or_else(|| "#cloud-config\n{}\n".into()),
        ),
    ];
    if let Some(n) = net {
        files.push(("network-config", network_config(n)));
    }
    if let Some(ca) = ssh_ca {
        files.push(("vendor-data", vendor_data(ca, who.principal)));
    }
    for (name, text) in &files {
        tokio::fs::write(dir.join(name), text)
            .await
            .map_err(|e| format!("writing seed {name}: {e}"))?;
    }
    let iso = work_dir.join("seed.iso");
    let out = Command::new("genisoimage")
        .args(["-quiet", "-volid", "cidata", "-joliet", "-rock", "-output"])
        .arg(&iso)
        .args(files.iter().map(|(name, _)| dir.join(name)))
        .output()
        .await
        .map_err(|e| format!("cannot run genisoimage (apt-get install genisoimage): {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "genisoimage failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(iso)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meta_and_network_config() {
        assert_eq!(
            meta_data(&SeedIdentity::own("vm_ab12")),
            "instance-id: vm_ab12\nlocal-hostname: vm-ab12\n"
        );
        let n = network_config(&SeedNet {
            mac: "02:fc:ac:10:00:0a".into(),
            ip: "172.16.0.10".into(),
            prefix: 24,
            gateway: "172.16.0.1".into(),
            dns: "172.16.0.1".into(),
        });
        assert!(n.starts_with("version: 2\nethernets:\n  eth0:\n    match:\n      macaddress: \"02:fc:ac:10:00:0a\"\n"));
        assert!(n.contains("    addresses: [\"172.16.0.10/24\"]\n"));
        // cloud-init 22.4 (Debian 12) rejects `routes: - to: default`; gateway4 works.
        assert!(n.contains("    gateway4: 172.16.0.1\n"));
        assert!(n.contains("    nameservers:\n      addresses: [172.16.0.1]\n"));
    }

    #[test]
    fn vendor_data_trusts_the_ca_for_agent_and_this_vm() {
        let v = vendor_data("ssh-ed25519 AAAAC3Nza hatch-user-ca", "vm_ab12");
        assert!(v.starts_with("#!/bin/sh\n"));
        assert!(v.contains("ca='ssh-ed25519 AAAAC3Nza hatch-user-ca'\n"));
        assert!(v.contains("principal='vm_ab12'\n"));
        assert!(v.contains("user=agent\n"));
        assert!(v.contains("'TrustedUserCAKeys /etc/ssh/hatch/user_ca.pub'"));
        assert!(v.contains("'AuthorizedPrincipalsFile /etc/ssh/hatch/principals/%u'"));
        assert_eq!(sh_quote("it's"), r#"'it'\''s'"#);
        // agent owns the file sshd reads (through a symlink), not the directory of every user's.
        assert!(v.contains("ln -sfn \"$own/principals\" /etc/ssh/hatch/principals/$user\n"));
        assert!(v.contains("chown \"$user\" \"$own\" \"$own/principals.new\"\n"));
        assert!(!v.contains("chown \"$user\" /etc/ssh/hatch/principals"));
    }

    /// The command, run by a real shell against a directory of ours: the
    /// file ends up holding the new id and nothing else, with no temporary
    /// left beside it.
    #[test]
    fn own_principal_command_replaces_the_file() {
        let dir = std::env::temp_dir().join(format!("hatch-seed-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("principals"), "vm_source\n").unwrap();
        let line = own_principal_command("vm_fork'1").replace(GUEST_OWN_DIR, dir.to_str().unwrap());
        let out = std::process::Command::new("/bin/sh")
            .arg("-c")
            .arg(&line)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        assert_eq!(
            std::fs::read_to_string(dir.join("principals")).unwrap(),
            "vm_fork'1\n"
        );
        let left: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
        assert_eq!(left.len(), 1, "{left:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

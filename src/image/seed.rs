//! The cloud-init NoCloud seed of a VM: `meta-data`, `user-data` and
//! `network-config` on an iso9660 volume labelled `cidata`, attached as a
//! read-only disk. Any image with cloud-init reads it on first boot; the
//! built-in busybox image applies a subset (hostname, SSH keys, scripts).

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

pub fn meta_data(vm_id: &str) -> String {
    format!(
        "instance-id: {vm_id}\nlocal-hostname: {}\n",
        hostname_for(vm_id)
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

/// Writes the seed files and the `seed.iso` volume into `work_dir`.
pub async fn write(
    work_dir: &Path,
    vm_id: &str,
    user_data: Option<&str>,
    net: Option<&SeedNet>,
) -> Result<PathBuf, String> {
    let dir = work_dir.join("seed");
    tokio::fs::create_dir_all(&dir)
        .await
        .map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let mut files = vec![
        ("meta-data", meta_data(vm_id)),
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
            meta_data("vm_ab12"),
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
}

//! `rootfs.ext4`: the busybox guest staged as a tree, then made an ext4 by `mkfs.ext4 -d`.

use super::openssh::{OpenSsh, GUEST_LIB_DIR};
use super::{find_tool, run};
use anyhow::{Context, Result};
use std::fs;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

pub(super) const ROOTFS_BYTES: u64 = 256 << 20;
const ROOTFS_LABEL: &str = "hatch-root";

const INITTAB: &str = include_str!("../guest/inittab");
const RCS: &str = include_str!("../guest/rcS");
const RCK: &str = include_str!("../guest/rcK");
const ACPI_POWER: &str = include_str!("../guest/acpi-power");
const PROFILE: &str = include_str!("../guest/profile");
const CIDATA: &str = include_str!("../guest/cidata");
const UDHCPC_SCRIPT: &str = include_str!("../guest/udhcpc.script");
const SSHD_CONFIG: &str = include_str!("../guest/sshd_config");
/// sshd resolves users through glibc's NSS; spelled out so no default matters.
const NSSWITCH: &str = "passwd: files\ngroup: files\nshadow: files\nhosts: files dns\n";

const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n\
    sshd:x:100:65534:sshd privilege separation:/run/sshd:/bin/false\n\
    agent:x:1000:1000:hatch agent:/home/agent:/bin/sh\n";
const GROUP: &str = "root:x:0:\ntty:x:5:\nagent:x:1000:\nnogroup:x:65534:\n";
const SHADOW: &str = "root:*:19000:0:99999:7:::\n\
    sshd:*:19000:0:99999:7:::\n\
    agent:*:19000:0:99999:7:::\n";
/// `agent`'s uid and gid in PASSWD and GROUP.
const AGENT_ID: u32 = 1000;

pub(super) fn stage_rootfs(
    stage: &Path,
    busybox: &Path,
    applets: &[String],
    openssh: &OpenSsh,
) -> Result<()> {
    let dirs: &[(&str, u32)] = &[
        ("", 0o755),
        ("bin", 0o755),
        ("sbin", 0o755),
        ("usr/bin", 0o755),
        ("usr/sbin", 0o755),
        ("etc/init.d", 0o755),
        ("etc/acpi/PWRF", 0o755),
        ("etc/hatch", 0o755),
        // The host key is made on the first boot (rcS); the daemon's CA
        // trust goes to sshd_config.d (the seed's vendor-data).
        ("etc/ssh", 0o755),
        ("etc/ssh/sshd_config.d", 0o755),
        ("home", 0o755),
        ("home/agent", 0o700),
        (GUEST_LIB_DIR, 0o755),
        ("lib64", 0o755),
        ("usr/lib/hatch", 0o755),
        ("usr/share/udhcpc", 0o755),
        ("dev", 0o755),
        ("proc", 0o555),
        ("sys", 0o555),
        ("run", 0o755),
        ("mnt", 0o755),
        ("tmp", 0o1777),
        ("root", 0o700),
        ("var/lib/hatch", 0o755),
        ("var/log", 0o755),
        ("var/tmp", 0o1777),
    ];
    for (dir, mode) in dirs {
        let path = stage.join(dir);
        fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        fs::set_permissions(&path, fs::Permissions::from_mode(*mode))?;
    }
    for parent in [
        "etc",
        "usr",
        "var",
        "etc/acpi",
        "lib",
        "usr/lib",
        "usr/share",
    ] {
        fs::set_permissions(stage.join(parent), fs::Permissions::from_mode(0o755))?;
    }

    fs::copy(busybox, stage.join("bin/busybox"))?;
    fs::set_permissions(stage.join("bin/busybox"), fs::Permissions::from_mode(0o755))?;
    for applet in applets {
        std::os::unix::fs::symlink("/bin/busybox", stage.join(applet))
            .with_context(|| format!("linking applet {applet}"))?;
    }
    for (guest, source) in &openssh.files {
        let path = stage.join(guest);
        // fs::copy follows symlinks: the guest gets real files under the sonames.
        fs::copy(source, &path).with_context(|| format!("copying {}", source.display()))?;
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755))?;
    }
    // Programs that write pid files under /var/run find the tmpfs /run.
    std::os::unix::fs::symlink("../run", stage.join("var/run"))?;

    let files: &[(&str, u32, &str)] = &[
        ("etc/inittab", 0o644, INITTAB),
        ("etc/init.d/rcS", 0o755, RCS),
        ("etc/init.d/rcK", 0o755, RCK),
        ("etc/acpi/PWRF/00000080", 0o755, ACPI_POWER),
        ("etc/profile", 0o644, PROFILE),
        ("etc/hostname", 0o644, "hatch\n"),
        ("etc/hosts", 0o644, "127.0.0.1\tlocalhost\n::1\tlocalhost\n"),
        // `sshd`: its privilege-separated child; `agent`: who the daemon's
        // certificates log in as (src/ssh).
        ("etc/passwd", 0o644, PASSWD),
        ("etc/group", 0o644, GROUP),
        // No password (`*`, not locked: sshd without PAM refuses a locked
        // account): the serial console needs none and nothing else
        // should accept an empty one.
        ("etc/shadow", 0o600, SHADOW),
        ("etc/ssh/sshd_config", 0o644, SSHD_CONFIG),
        ("etc/shells", 0o644, "/bin/sh\n/bin/ash\n"),
        ("etc/nsswitch.conf", 0o644, NSSWITCH),
        ("usr/lib/hatch/cidata", 0o755, CIDATA),
        // udhcpc's default event script path.
        ("usr/share/udhcpc/default.script", 0o755, UDHCPC_SCRIPT),
    ];
    for (name, mode, text) in files {
        let path = stage.join(name);
        fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        fs::set_permissions(&path, fs::Permissions::from_mode(*mode))?;
    }
    // Only root can give the home away here; rcS does it on boot anyway (a
    // build as another user makes every owner root).
    let home = stage.join("home/agent");
    if fs::metadata(stage)?.uid() == 0 {
        std::os::unix::fs::chown(&home, Some(AGENT_ID), Some(AGENT_ID))
            .with_context(|| format!("chown {}", home.display()))?;
    }
    Ok(())
}

/// Turns the tree `stage` into a sparse ext4 image of `bytes` labelled `hatch-root`.
pub(in crate::image) fn make_ext4(
    mkfs: &Path,
    stage: &Path,
    image: &Path,
    bytes: u64,
) -> Result<()> {
    // A sparse file: only the blocks mkfs writes take disk space.
    fs::File::create(image)
        .and_then(|f| f.set_len(bytes))
        .with_context(|| format!("creating {}", image.display()))?;
    run(
        Command::new(mkfs)
            .args([
                "-F",
                "-q",
                "-t",
                "ext4",
                "-T",
                "default",
                "-L",
                ROOTFS_LABEL,
            ])
            // Initialize inode tables now so the guest's first boot does not
            // spend time (and overlay space) doing it in the background.
            .args([
                "-E",
                "lazy_itable_init=0,lazy_journal_init=0,root_owner=0:0",
            ])
            .arg("-d")
            .arg(stage)
            .arg(image),
        "mkfs.ext4",
    )?;
    // mkfs.ext4 -d copies the builder's uid/gid; files in the guest must be root's.
    if fs::metadata(stage)?.uid() != 0 {
        chown_to_root(stage, image)?;
    }
    Ok(())
}

/// Rewrites every inode's owner to 0:0 with debugfs (no root, no loop mount).
fn chown_to_root(stage: &Path, image: &Path) -> Result<()> {
    let debugfs = find_tool("debugfs", "e2fsprogs")?;
    let mut script = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        for entry in fs::read_dir(stage.join(&rel))? {
            let entry = entry?;
            let child = rel.join(entry.file_name());
            let guest = Path::new("/").join(&child);
            writeln!(script, "set_inode_field {} uid 0", guest.display())?;
            writeln!(script, "set_inode_field {} gid 0", guest.display())?;
            if entry.file_type()?.is_dir() {
                stack.push(child);
            }
        }
    }
    let cmds = image.with_extension("debugfs");
    fs::write(&cmds, script)?;
    let result = run(
        Command::new(debugfs)
            .arg("-w")
            .arg("-f")
            .arg(&cmds)
            .arg(image),
        "debugfs (setting owners to root)",
    );
    let _ = fs::remove_file(&cmds);
    result.map(|_| ())
}

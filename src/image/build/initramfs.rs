//! `initrd.img`: static busybox, `/init` and the modules it loads, as one cpio archive.

use super::cpio::Cpio;
use anyhow::{Context, Result};
use std::fs;
use std::path::{Path, PathBuf};

const INIT_SH: &str = include_str!("../guest/init.sh");

pub(super) fn initramfs(
    busybox: &Path,
    applets: &[String],
    kver: &str,
    modules: &[(String, PathBuf)],
) -> Result<Vec<u8>> {
    let mut cpio = Cpio::default();
    for dir in ["proc", "sys", "dev", "newroot", "tmp", "root"] {
        cpio.dir(dir, 0o755);
    }
    // The kernel opens /dev/console for /init before devtmpfs is mounted;
    // without this node /init would start with no stdout.
    cpio.char_dev("dev/console", 0o600, 5, 1);
    cpio.char_dev("dev/null", 0o666, 1, 3);
    let bb = fs::read(busybox).with_context(|| format!("reading {}", busybox.display()))?;
    cpio.file("bin/busybox", 0o755, &bb);
    for applet in applets {
        cpio.symlink(applet, "/bin/busybox");
    }
    let names: Vec<&str> = modules.iter().map(|(n, _)| n.as_str()).collect();
    for (name, file) in modules {
        let data = fs::read(file).with_context(|| format!("reading {}", file.display()))?;
        cpio.file(&format!("lib/modules/{kver}/{name}.ko"), 0o644, &data);
    }
    let init = INIT_SH
        .replace("@MODULES@", &names.join(" "))
        .replace("@KVER@", kver);
    cpio.file("init", 0o755, init.as_bytes());
    Ok(cpio.finish())
}

//! The host's static busybox, checked and its applets listed, for both image files.

use super::elf::Elf;
use super::run;
use anyhow::{anyhow, bail, Context, Result};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

const BUSYBOX: &str = "/bin/busybox";

/// The guest has no libc, so the busybox copied into it must be static.
pub(super) fn check_busybox() -> Result<PathBuf> {
    let path = PathBuf::from(BUSYBOX);
    let data = fs::read(&path).map_err(|e| {
        anyhow!("cannot read {BUSYBOX} ({e}); install it with `apt-get install busybox-static`")
    })?;
    let elf = Elf::parse(&data).with_context(|| format!("{BUSYBOX} is not a 64-bit ELF"))?;
    if elf.has_interpreter()? {
        bail!(
            "{BUSYBOX} is dynamically linked; install the static one with `apt-get install busybox-static`"
        );
    }
    Ok(path)
}

/// Applet install paths relative to /, e.g. `bin/sh`, `sbin/init`.
pub(super) fn busybox_applets(busybox: &Path) -> Result<Vec<String>> {
    let output = run(
        Command::new(busybox).arg("--list-full"),
        "busybox --list-full",
    )?;
    let applets: Vec<String> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(str::trim)
        // linuxrc is for the obsolete initrd boot path; bin/busybox is the binary.
        .filter(|l| !l.is_empty() && l.contains('/') && *l != "bin/busybox")
        .map(str::to_string)
        .collect();
    for needed in [
        "bin/sh",
        "sbin/init",
        "sbin/switch_root",
        "sbin/insmod",
        "sbin/acpid",
    ] {
        if !applets.iter().any(|a| a == needed) {
            bail!("{busybox:?} has no `{needed}` applet");
        }
    }
    Ok(applets)
}

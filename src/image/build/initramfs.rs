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
    cpio.file("init", 0o755, init_script(&names, kver).as_bytes());
    Ok(cpio.finish())
}

/// `/init` for a kernel `kver` that loads `modules` in this order.
fn init_script(modules: &[&str], kver: &str) -> String {
    INIT_SH
        .replace("@MODULES@", &modules.join(" "))
        .replace("@KVER@", kver)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    const BUSYBOX: &str = "/bin/busybox";

    /// Runs /init's module loading with busybox sh (the guest's shell) for a
    /// kernel command line, `insmod` replaced by a stub that prints each
    /// call's arguments one per line; returns (stdout, stderr).
    fn load_modules(cmdline: &str, cwd: &Path) -> (String, String) {
        let init = init_script(&["virtio", "virtio_mmio", "virtio_blk"], "6.1.0-test");
        let start = init.find("# -- begin module loading --").unwrap();
        let end = init.find("# -- end module loading --").unwrap();
        let script = format!(
            "cat() {{ printf '%s\\n' \"$CMDLINE\"; }}\n\
             insmod() {{ echo insmod; for a in \"$@\"; do echo \"[$a]\"; done; }}\n\
             fail() {{ echo \"fail: $*\"; exit 1; }}\n{}",
            &init[start..end]
        );
        let out = Command::new(BUSYBOX)
            .args(["sh", "-c", &script])
            .env("CMDLINE", cmdline)
            .current_dir(cwd)
            .output()
            .unwrap_or_else(|e| panic!("running {BUSYBOX} (apt-get install busybox-static): {e}"));
        assert!(out.status.success(), "{out:?}");
        (
            String::from_utf8(out.stdout).unwrap(),
            String::from_utf8(out.stderr).unwrap(),
        )
    }

    fn insmods(devices: &[&str]) -> String {
        let mut s = "insmod\n[/lib/modules/6.1.0-test/virtio.ko]\n".to_string();
        s += "insmod\n[/lib/modules/6.1.0-test/virtio_mmio.ko]\n";
        for d in devices {
            s += &format!("[device={d}]\n");
        }
        s + "insmod\n[/lib/modules/6.1.0-test/virtio_blk.ko]\n"
    }

    #[test]
    fn virtio_mmio_gets_the_devices_on_the_command_line_as_options() {
        let cwd = std::env::temp_dir();
        // What a virtio-mmio VMM boots with: its devices appended to our boot args.
        let mmio = "console=ttyS0 reboot=k panic=1 root=/dev/vda rw \
             virtio_mmio.device=4K@0xc0001000:5 virtio_mmio.device=4K@0xc0002000:6:3";
        assert_eq!(
            load_modules(mmio, &cwd),
            (
                insmods(&["4K@0xc0001000:5", "4K@0xc0002000:6:3"]),
                String::new()
            )
        );
        // A PC machine's command line has none: every module loads without options.
        assert_eq!(
            load_modules("console=ttyS0 root=/dev/vda rw", &cwd),
            (insmods(&[]), String::new())
        );
    }

    #[test]
    fn a_command_line_value_that_is_not_a_plain_device_is_never_an_option() {
        let cwd = std::env::temp_dir().join(format!("hatch-init-{}", crate::ids::random_string(8)));
        std::fs::create_dir_all(&cwd).unwrap();
        // A glob on the command line must not pick up file names (in the
        // guest, of the initramfs root) that look like a device.
        std::fs::write(cwd.join("virtio_mmio.device=4K@0xd0000000:9"), b"").unwrap();
        let (stdout, stderr) = load_modules(
            "root=/dev/vda * virtio_mmio.device=4K@0xc0001000:5;reboot \
             virtio_mmio.device=$(reboot) virtio_mmio.device= virtio_mmio.devices=4K@0x1:5 \
             xvirtio_mmio.device=4K@0x1:5 virtio_mmio.device=4K@0xc0003000:7",
            &cwd,
        );
        assert_eq!(stdout, insmods(&["4K@0xc0003000:7"]));
        for refused in [
            "virtio_mmio.device=4K@0xc0001000:5;reboot",
            "virtio_mmio.device=$(reboot)",
            "virtio_mmio.device=\n",
        ] {
            assert!(
                stderr.contains(&format!("hatch-initrd: warning: ignoring {refused}")),
                "{refused}: {stderr}"
            );
        }
        std::fs::remove_dir_all(&cwd).unwrap();
    }

    #[test]
    fn init_is_valid_busybox_sh() {
        let init = init_script(&["virtio"], "6.1.0-test");
        let out = Command::new(BUSYBOX)
            .args(["sh", "-n", "-c", &init])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
    }
}

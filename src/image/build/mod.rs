//! Builds the default guest image (kernel, initramfs, busybox rootfs) from Debian packages.
//!
//! Output (in `out`):
//! - `vmlinuz`: the Debian bookworm cloud kernel (`linux-image-cloud-amd64`).
//! - `vmlinux`: the same kernel as an uncompressed x86-64 ELF (the LZ4
//!   payload of `vmlinuz`), for VMMs that load only an ELF.
//! - `initrd.img`: an uncompressed newc cpio with static busybox, `/init` and the
//!   virtio + power-button modules that kernel builds as `=m`.
//! - `rootfs.ext4`: a 256 MiB sparse ext4 (label `hatch-root`) with busybox init,
//!   DHCP, a minimal cloud-init NoCloud reader and OpenSSH's sshd
//!   (`openssh-server` and its libraries, fetched like the kernel; its libc
//!   is the host's).
//!
//! Host tools: apt-get/apt-cache/dpkg-deb, `busybox-static` (`/bin/busybox`),
//! `e2fsprogs` (`mkfs.ext4`, and `debugfs` when not building as root), `ldd`.
//!
//! This file runs the steps in order; each concern has its own file: `apt`
//! (the .deb cache), `kernel` (the kernel package and its module order),
//! `elf`, `busybox`, `openssh`, `cpio` (the archive format), `initramfs`
//! and `rootfs` (what goes into each image file), `vmlinux` (the ELF kernel
//! out of the bzImage).

mod apt;
mod busybox;
mod cpio;
mod elf;
mod initramfs;
mod kernel;
mod openssh;
mod rootfs;
mod vmlinux;

pub(super) use apt::cache_dir;
pub(super) use rootfs::make_ext4;

use anyhow::{bail, Context, Result};
use apt::kernel_deb;
use busybox::{busybox_applets, check_busybox};
use initramfs::initramfs;
use kernel::Kernel;
use openssh::OpenSsh;
use rootfs::{stage_rootfs, ROOTFS_BYTES};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Build the default image into `out` (`vmlinuz`, `vmlinux`, `initrd.img`, `rootfs.ext4`).
pub fn build(out: &Path) -> Result<()> {
    let busybox = check_busybox()?;
    let mkfs = find_tool("mkfs.ext4", "e2fsprogs")?;
    find_tool("dpkg-deb", "dpkg")?;

    fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let work = WorkDir::create(out)?;

    let cache = cache_dir()?;
    let deb = kernel_deb(&cache)?;
    step(&format!("extracting {}", deb.display()));
    let kroot = work.path().join("kernel");
    run(
        Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&kroot),
        "dpkg-deb -x",
    )?;
    let kernel = Kernel::open(&kroot)?;
    step(&format!("kernel {}", kernel.version));
    let modules = kernel.initramfs_modules()?;
    step(&format!(
        "initramfs modules: {}",
        modules
            .iter()
            .map(|(n, _)| n.as_str())
            .collect::<Vec<_>>()
            .join(" ")
    ));

    let applets = busybox_applets(&busybox)?;
    let openssh = OpenSsh::fetch(&cache, &work.path().join("openssh"))?;
    step(&format!(
        "openssh {}: {}",
        openssh.version,
        openssh
            .files
            .iter()
            .map(|(guest, _)| format!("/{}", guest.display()))
            .collect::<Vec<_>>()
            .join(" ")
    ));

    // Everything is written inside the work dir first and renamed at the end,
    // so a failed build never leaves a half-written image behind.
    let vmlinuz = work.path().join("vmlinuz");
    fs::copy(&kernel.vmlinuz, &vmlinuz)
        .with_context(|| format!("copying {}", kernel.vmlinuz.display()))?;
    let vmlinux = work.path().join("vmlinux");
    write_vmlinux(&vmlinuz, &vmlinux)?;

    let initrd = work.path().join("initrd.img");
    let cpio = initramfs(&busybox, &applets, &kernel.version, &modules)?;
    fs::write(&initrd, cpio).with_context(|| format!("writing {}", initrd.display()))?;

    let rootfs = work.path().join("rootfs.ext4");
    let stage = work.path().join("rootfs");
    stage_rootfs(&stage, &busybox, &applets, &openssh)?;
    make_ext4(&mkfs, &stage, &rootfs, ROOTFS_BYTES)?;

    for (src, name) in [
        (&vmlinuz, "vmlinuz"),
        (&vmlinux, "vmlinux"),
        (&initrd, "initrd.img"),
        (&rootfs, "rootfs.ext4"),
    ] {
        let dst = out.join(name);
        fs::rename(src, &dst).with_context(|| format!("moving image file to {}", dst.display()))?;
    }
    step(&format!("image written to {}", out.display()));
    Ok(())
}

/// Writes the ELF kernel inside the bzImage `vmlinuz` to `out`.
fn write_vmlinux(vmlinuz: &Path, out: &Path) -> Result<()> {
    use std::io::Read;
    // A bzImage is far smaller than the ELF it holds; read no more than that cap.
    let mut bzimage = Vec::new();
    fs::File::open(vmlinuz)
        .and_then(|f| {
            f.take(vmlinux::VMLINUX_MAX_BYTES as u64 + 1)
                .read_to_end(&mut bzimage)
        })
        .with_context(|| format!("reading {}", vmlinuz.display()))?;
    let elf = vmlinux::extract(&bzimage, vmlinux::VMLINUX_MAX_BYTES)
        .with_context(|| format!("extracting the ELF kernel from {}", vmlinuz.display()))?;
    fs::write(out, &elf).with_context(|| format!("writing {}", out.display()))?;
    step(&format!("vmlinux: {} MiB ELF", elf.len() >> 20));
    Ok(())
}

pub(super) fn step(msg: &str) {
    eprintln!("hatch image: {msg}");
}

/// Runs a command, capturing output; on failure the error carries its stderr.
pub(super) fn run(cmd: &mut Command, what: &str) -> Result<Output> {
    let output = cmd
        .output()
        .with_context(|| format!("running {what} ({cmd:?})"))?;
    if !output.status.success() {
        bail!(
            "{what} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(output)
}

/// Looks in PATH and the sbin directories (often missing from a user's PATH).
pub(super) fn find_tool(name: &str, package: &str) -> Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let dirs = std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from));
    for dir in dirs {
        let candidate = dir.join(name);
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    bail!("`{name}` not found; install it with `apt-get install {package}`")
}

/// Scratch directory inside `out` (same filesystem, so the final renames are
/// atomic), removed when dropped.
struct WorkDir(PathBuf);

impl WorkDir {
    fn create(out: &Path) -> Result<WorkDir> {
        let path = out.join(format!(".hatch-build.{}", std::process::id()));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(WorkDir(path))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

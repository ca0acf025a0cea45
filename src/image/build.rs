//! Builds the default guest image (kernel, initramfs, busybox rootfs) from Debian packages.
//!
//! Output (in `out`):
//! - `vmlinuz`: the Debian bookworm cloud kernel (`linux-image-cloud-amd64`).
//! - `initrd.img`: an uncompressed newc cpio with static busybox, `/init` and the
//!   virtio + power-button modules that kernel builds as `=m`.
//! - `rootfs.ext4`: a 256 MiB sparse ext4 (label `hatch-root`) with busybox init,
//!   DHCP, a minimal cloud-init NoCloud reader and dropbear (`dropbear-bin`
//!   and its libraries, fetched like the kernel; its libc is the host's).
//!
//! Host tools: apt-get/apt-cache/dpkg-deb, `busybox-static` (`/bin/busybox`),
//! `e2fsprogs` (`mkfs.ext4`, and `debugfs` when not building as root), `ldd`.

use anyhow::{anyhow, bail, Context, Result};
use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const KERNEL_METAPACKAGE: &str = "linux-image-cloud-amd64";
const DROPBEAR_PACKAGE: &str = "dropbear-bin";
const BUSYBOX: &str = "/bin/busybox";
const ROOTFS_BYTES: u64 = 256 << 20;
const ROOTFS_LABEL: &str = "hatch-root";

/// Modules needed to mount a virtio-blk root and, later, for virtio-net.
const BASE_MODULES: &[&str] = &[
    "virtio",
    "virtio_ring",
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_pci",
    "virtio_blk",
    "failover",
    "net_failover",
    "virtio_net",
    // The cloud-init NoCloud seed is an iso9660 volume labelled `cidata`.
    "cdrom",
    "isofs",
];

/// Kernel options (and their module) that carry the ACPI power button to
/// userspace: `button` turns the ACPI event into an input event, `evdev`
/// exposes it as /dev/input/event* for busybox acpid.
const POWER_BUTTON_MODULES: &[(&str, &str)] = &[
    ("CONFIG_ACPI_BUTTON", "button"),
    ("CONFIG_INPUT_EVDEV", "evdev"),
];

const INIT_SH: &str = include_str!("guest/init.sh");
const INITTAB: &str = include_str!("guest/inittab");
const RCS: &str = include_str!("guest/rcS");
const RCK: &str = include_str!("guest/rcK");
const ACPI_POWER: &str = include_str!("guest/acpi-power");
const PROFILE: &str = include_str!("guest/profile");
const CIDATA: &str = include_str!("guest/cidata");
const UDHCPC_SCRIPT: &str = include_str!("guest/udhcpc.script");
/// Dropbear resolves root through glibc's NSS; spelled out so no default matters.
const NSSWITCH: &str = "passwd: files\ngroup: files\nshadow: files\nhosts: files dns\n";

/// Build the default image into `out` (`vmlinuz`, `initrd.img`, `rootfs.ext4`).
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
    let dropbear = Dropbear::fetch(&cache, &work.path().join("dropbear"))?;
    step(&format!(
        "dropbear {}: {}",
        dropbear.version,
        dropbear
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

    let initrd = work.path().join("initrd.img");
    let cpio = initramfs(&busybox, &applets, &kernel.version, &modules)?;
    fs::write(&initrd, cpio).with_context(|| format!("writing {}", initrd.display()))?;

    let rootfs = work.path().join("rootfs.ext4");
    let stage = work.path().join("rootfs");
    stage_rootfs(&stage, &busybox, &applets, &dropbear)?;
    make_ext4(&mkfs, &stage, &rootfs, ROOTFS_BYTES)?;

    for (src, name) in [
        (&vmlinuz, "vmlinuz"),
        (&initrd, "initrd.img"),
        (&rootfs, "rootfs.ext4"),
    ] {
        let dst = out.join(name);
        fs::rename(src, &dst).with_context(|| format!("moving image file to {}", dst.display()))?;
    }
    step(&format!("image written to {}", out.display()));
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

/// The guest has no libc, so the busybox copied into it must be static.
fn check_busybox() -> Result<PathBuf> {
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
fn busybox_applets(busybox: &Path) -> Result<Vec<String>> {
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

pub(super) fn cache_dir() -> Result<PathBuf> {
    let nonempty = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
    let dir = if let Some(dir) = nonempty("HATCH_IMAGE_CACHE") {
        PathBuf::from(dir)
    } else if let Some(xdg) = nonempty("XDG_CACHE_HOME") {
        PathBuf::from(xdg).join("hatch")
    } else if let Some(home) = nonempty("HOME") {
        PathBuf::from(home).join(".cache").join("hatch")
    } else {
        bail!("no cache directory: set HATCH_IMAGE_CACHE (or XDG_CACHE_HOME / HOME)");
    };
    fs::create_dir_all(&dir).with_context(|| format!("creating cache dir {}", dir.display()))?;
    Ok(dir)
}

const APT_UPDATE_HINT: &str =
    "the apt package lists may be missing or stale: run `apt-get update` (as root) and retry";

/// The kernel .deb in the cache, downloaded with `apt-get download` if needed.
fn kernel_deb(cache: &Path) -> Result<PathBuf> {
    let is_kernel = |name: &str| name.starts_with("linux-image-") && name.contains("-cloud-amd64_");
    let resolved = resolve_kernel_package().and_then(|package| {
        let (version, file) = resolve_package(&package)?;
        Ok((package, version, file))
    });
    match resolved {
        Ok((package, version, file)) => download_deb(cache, &package, &version, &file),
        Err(err) => offline_deb(cache, KERNEL_METAPACKAGE, err, is_kernel),
    }
}

/// `package`'s candidate .deb in the cache, downloaded if needed.
fn package_deb(cache: &Path, package: &str) -> Result<PathBuf> {
    let prefix = format!("{package}_");
    match resolve_package(package) {
        Ok((version, file)) => download_deb(cache, package, &version, &file),
        Err(err) => offline_deb(cache, package, err, |name| name.starts_with(&prefix)),
    }
}

/// Offline with an empty apt state but a warm cache: still buildable.
fn offline_deb(
    cache: &Path,
    package: &str,
    err: anyhow::Error,
    matches: impl Fn(&str) -> bool,
) -> Result<PathBuf> {
    let Some(deb) = newest_cached_deb(cache, matches)? else {
        return Err(err);
    };
    step(&format!(
        "warning: cannot resolve {package} ({err:#}); using cached {}",
        deb.display()
    ));
    Ok(deb)
}

fn download_deb(cache: &Path, package: &str, version: &str, file: &str) -> Result<PathBuf> {
    let cached = cache.join(file);
    if cached.is_file() {
        step(&format!("using cached {}", cached.display()));
        return Ok(cached);
    }

    // Download into a scratch dir and rename, so an interrupted download is
    // never mistaken for a cached package.
    step(&format!("downloading {package} {version}"));
    let scratch = cache.join(format!(".download.{}", std::process::id()));
    let _ = fs::remove_dir_all(&scratch);
    fs::create_dir_all(&scratch)?;
    let result = Command::new("apt-get")
        .arg("download")
        .arg(format!("{package}={version}"))
        .current_dir(&scratch)
        .output();
    let downloaded = (|| -> Result<PathBuf> {
        let output = result.context("running apt-get download")?;
        if !output.status.success() {
            bail!(
                "`apt-get download {package}={version}` failed: {}\n{APT_UPDATE_HINT}",
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        let deb = fs::read_dir(&scratch)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| p.extension().is_some_and(|x| x == "deb"))
            .ok_or_else(|| anyhow!("apt-get download of {package} produced no .deb"))?;
        fs::rename(&deb, &cached)?;
        Ok(cached)
    })();
    let _ = fs::remove_dir_all(&scratch);
    downloaded
}

/// Metapackage -> the real kernel package it depends on.
fn resolve_kernel_package() -> Result<String> {
    let missing = || anyhow!("apt knows no package {KERNEL_METAPACKAGE}; {APT_UPDATE_HINT}");
    let output = Command::new("apt-cache")
        .args(["depends", KERNEL_METAPACKAGE])
        .output()
        .context("running apt-cache (is apt installed?)")?;
    if !output.status.success() {
        return Err(missing());
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let package = stdout
        .lines()
        .filter_map(|l| l.trim().trim_start_matches('|').strip_prefix("Depends:"))
        .map(|p| p.trim().trim_matches(|c| c == '<' || c == '>'))
        .find(|p| p.starts_with("linux-image-"))
        .ok_or_else(missing)?
        .to_string();
    Ok(package)
}

/// Package -> (candidate version, pool file name).
fn resolve_package(package: &str) -> Result<(String, String)> {
    let output = Command::new("apt-cache")
        .args(["show", "--no-all-versions", package])
        .output()
        .context("running apt-cache show (is apt installed?)")?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    // apt-cache show exits 0 with no output for a package only named by others.
    if !output.status.success() || stdout.trim().is_empty() {
        bail!("apt-cache show {package} failed; {APT_UPDATE_HINT}");
    }
    let field = |name: &str| {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_string()))
    };
    let version = field("Version:").ok_or_else(|| anyhow!("no Version for {package}"))?;
    let file = field("Filename:")
        .and_then(|f| f.rsplit('/').next().map(str::to_string))
        // apt-get download's own naming, in case the index has no Filename.
        .unwrap_or_else(|| format!("{package}_{}_amd64.deb", version.replace(':', "%3a")));
    Ok((version, file))
}

fn newest_cached_deb(cache: &Path, matches: impl Fn(&str) -> bool) -> Result<Option<PathBuf>> {
    let mut best: Option<(std::time::SystemTime, PathBuf)> = None;
    for entry in fs::read_dir(cache)? {
        let path = entry?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if matches(name) && name.ends_with(".deb") {
            let mtime = fs::metadata(&path)?.modified()?;
            if best.as_ref().is_none_or(|(t, _)| mtime > *t) {
                best = Some((mtime, path));
            }
        }
    }
    Ok(best.map(|(_, p)| p))
}

/// The parts of an extracted kernel package the image needs.
struct Kernel {
    version: String,
    vmlinuz: PathBuf,
    config: PathBuf,
    modules_dir: PathBuf,
}

impl Kernel {
    fn open(root: &Path) -> Result<Kernel> {
        let boot = root.join("boot");
        let vmlinuz = fs::read_dir(&boot)
            .with_context(|| format!("kernel package has no {}", boot.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("vmlinuz-"))
            })
            .ok_or_else(|| anyhow!("kernel package has no /boot/vmlinuz-*"))?;
        let name = vmlinuz.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let version = name.trim_start_matches("vmlinuz-").to_string();
        let config = boot.join(format!("config-{version}"));
        if !config.is_file() {
            bail!("kernel package has no /boot/config-{version}");
        }
        // Debian still ships /lib/modules; a merged-/usr package would use usr/lib.
        let modules_dir = ["lib/modules", "usr/lib/modules"]
            .iter()
            .map(|d| root.join(d).join(&version))
            .find(|d| d.is_dir())
            .ok_or_else(|| anyhow!("kernel package has no lib/modules/{version}"))?;
        Ok(Kernel {
            version,
            vmlinuz,
            config,
            modules_dir,
        })
    }

    /// The modules /init must insmod, with their dependencies, deps first.
    fn initramfs_modules(&self) -> Result<Vec<(String, PathBuf)>> {
        let config = fs::read_to_string(&self.config)?;
        let mut wanted: Vec<&str> = BASE_MODULES.to_vec();
        for (option, module) in POWER_BUTTON_MODULES {
            match config_value(&config, option).as_deref() {
                Some("m") => wanted.push(module),
                Some("y") => {} // built in: nothing to load
                _ => step(&format!(
                    "warning: {option} is not enabled in this kernel; the ACPI power button will not reach userspace"
                )),
            }
        }

        let index = ModuleIndex::scan(&self.modules_dir)?;
        let mut order = Vec::new();
        let mut done = BTreeSet::new();
        for name in wanted {
            index.visit(&normalize(name), &mut done, &mut Vec::new(), &mut order)?;
        }
        Ok(order)
    }
}

/// Kernel module names use `_` and `-` interchangeably.
fn normalize(name: &str) -> String {
    name.replace('-', "_")
}

fn config_value(config: &str, option: &str) -> Option<String> {
    config.lines().find_map(|l| {
        l.strip_prefix(option)
            .and_then(|rest| rest.strip_prefix('='))
            .map(str::to_string)
    })
}

/// Module files of one kernel, found by walking the tree (the package ships
/// no modules.dep; depmod runs at install time).
struct ModuleIndex {
    files: BTreeMap<String, PathBuf>,
    compressed: BTreeMap<String, PathBuf>,
    builtin: BTreeSet<String>,
}

impl ModuleIndex {
    fn scan(dir: &Path) -> Result<ModuleIndex> {
        let mut index = ModuleIndex {
            files: BTreeMap::new(),
            compressed: BTreeMap::new(),
            builtin: BTreeSet::new(),
        };
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            for entry in fs::read_dir(&d)? {
                let entry = entry?;
                let path = entry.path();
                if entry.file_type()?.is_dir() {
                    stack.push(path);
                    continue;
                }
                let name = entry.file_name().to_string_lossy().into_owned();
                if let Some(stem) = name.strip_suffix(".ko") {
                    index.files.insert(normalize(stem), path);
                } else if let Some((stem, _)) = name.split_once(".ko.") {
                    index.compressed.insert(normalize(stem), path);
                }
            }
        }
        if let Ok(list) = fs::read_to_string(dir.join("modules.builtin")) {
            for line in list.lines() {
                let file = line.rsplit('/').next().unwrap_or(line);
                let stem = file.split(".ko").next().unwrap_or(file);
                index.builtin.insert(normalize(stem));
            }
        }
        Ok(index)
    }

    /// Depth-first: dependencies are pushed to `order` before the module.
    fn visit(
        &self,
        name: &str,
        done: &mut BTreeSet<String>,
        path: &mut Vec<String>,
        order: &mut Vec<(String, PathBuf)>,
    ) -> Result<()> {
        if done.contains(name) {
            return Ok(());
        }
        if path.iter().any(|p| p == name) {
            bail!("module dependency cycle: {} -> {name}", path.join(" -> "));
        }
        let Some(file) = self.files.get(name) else {
            if self.builtin.contains(name) {
                done.insert(name.to_string());
                return Ok(());
            }
            if let Some(c) = self.compressed.get(name) {
                bail!(
                    "kernel module {name} is compressed ({}); only uncompressed .ko modules are supported (busybox insmod cannot load them)",
                    c.display()
                );
            }
            bail!("kernel module {name} is neither a .ko in the kernel package nor built in");
        };
        let data = fs::read(file).with_context(|| format!("reading {}", file.display()))?;
        let deps = Elf::parse(&data)
            .and_then(|elf| elf.modinfo_depends())
            .with_context(|| format!("reading .modinfo of {}", file.display()))?;
        path.push(name.to_string());
        for dep in deps {
            self.visit(&normalize(&dep), done, path, order)?;
        }
        path.pop();
        done.insert(name.to_string());
        order.push((name.to_string(), file.clone()));
        Ok(())
    }
}

/// Just enough little-endian ELF64 reading for module deps and a static check.
struct Elf<'a> {
    data: &'a [u8],
}

impl<'a> Elf<'a> {
    fn parse(data: &'a [u8]) -> Result<Elf<'a>> {
        // Magic, ELFCLASS64, ELFDATA2LSB.
        if data.len() < 64 || &data[..4] != b"\x7fELF" || data[4] != 2 || data[5] != 1 {
            bail!("not a little-endian ELF64 file");
        }
        Ok(Elf { data })
    }

    fn bytes(&self, off: u64, len: u64) -> Result<&'a [u8]> {
        let start = usize::try_from(off)?;
        let end = start
            .checked_add(usize::try_from(len)?)
            .filter(|&e| e <= self.data.len())
            .ok_or_else(|| anyhow!("ELF offset out of range"))?;
        Ok(&self.data[start..end])
    }

    fn u16(&self, off: u64) -> Result<u16> {
        Ok(u16::from_le_bytes(self.bytes(off, 2)?.try_into()?))
    }

    fn u32(&self, off: u64) -> Result<u32> {
        Ok(u32::from_le_bytes(self.bytes(off, 4)?.try_into()?))
    }

    fn u64(&self, off: u64) -> Result<u64> {
        Ok(u64::from_le_bytes(self.bytes(off, 8)?.try_into()?))
    }

    /// A PT_INTERP program header means the binary needs a dynamic loader.
    fn has_interpreter(&self) -> Result<bool> {
        Ok(self.interpreter()?.is_some())
    }

    /// The dynamic loader's path from PT_INTERP, e.g. `/lib64/ld-linux-x86-64.so.2`.
    fn interpreter(&self) -> Result<Option<String>> {
        let phoff = self.u64(0x20)?;
        let phentsize = u64::from(self.u16(0x36)?);
        let phnum = u64::from(self.u16(0x38)?);
        for i in 0..phnum {
            let header = phoff + i * phentsize;
            if self.u32(header)? == 3 {
                // Program header: p_offset @8, p_filesz @32; the path is NUL-terminated.
                let path = self.bytes(self.u64(header + 8)?, self.u64(header + 32)?)?;
                let path = path.split(|&b| b == 0).next().unwrap_or_default();
                return Ok(Some(String::from_utf8_lossy(path).into_owned()));
            }
        }
        Ok(None)
    }

    fn section(&self, wanted: &str) -> Result<Option<&'a [u8]>> {
        let shoff = self.u64(0x28)?;
        let shentsize = u64::from(self.u16(0x3a)?);
        let shnum = u64::from(self.u16(0x3c)?);
        let shstrndx = u64::from(self.u16(0x3e)?);
        let header = |i: u64| shoff + i * shentsize;
        // Section header: sh_name @0 (u32), sh_offset @24, sh_size @32.
        let strtab_off = self.u64(header(shstrndx) + 24)?;
        let strtab_size = self.u64(header(shstrndx) + 32)?;
        let strtab = self.bytes(strtab_off, strtab_size)?;
        for i in 0..shnum {
            let name_off = usize::try_from(self.u32(header(i))?)?;
            let name = strtab
                .get(name_off..)
                .and_then(|s| s.split(|&b| b == 0).next())
                .unwrap_or_default();
            if name == wanted.as_bytes() {
                let off = self.u64(header(i) + 24)?;
                let size = self.u64(header(i) + 32)?;
                return Ok(Some(self.bytes(off, size)?));
            }
        }
        Ok(None)
    }

    /// `depends=a,b` from a kernel module's NUL-separated `.modinfo` strings.
    fn modinfo_depends(&self) -> Result<Vec<String>> {
        let modinfo = self
            .section(".modinfo")?
            .ok_or_else(|| anyhow!("no .modinfo section"))?;
        let mut deps = Vec::new();
        for value in modinfo
            .split(|&b| b == 0)
            .filter_map(|kv| kv.strip_prefix(b"depends="))
        {
            let value = String::from_utf8_lossy(value);
            deps.extend(
                value
                    .split(',')
                    .filter(|d| !d.is_empty())
                    .map(str::to_string),
            );
        }
        Ok(deps)
    }
}

/// The SSH server of the rootfs: Debian's dynamically linked dropbear, with
/// the shared libraries and loader it needs (the rootfs has no libc).
struct Dropbear {
    version: String,
    binary: PathBuf,
    /// (path in the guest, file to copy it from)
    files: Vec<(PathBuf, PathBuf)>,
}

/// Always in the guest's loader search path, wherever the host keeps its libs.
const GUEST_LIB_DIR: &str = "lib/x86_64-linux-gnu";
/// The host's libc (and its loader) is used instead: ldd resolves libc with
/// the host's loader anyway, and the two must match.
const HOST_PACKAGES: &[&str] = &["libc6"];
/// Bound on the dependency walk, far above dropbear-bin's five libraries.
const MAX_PACKAGES: usize = 16;

impl Dropbear {
    /// Fetches dropbear-bin and the library packages it depends on (so the
    /// host needs none of them), extracts them under `root`, and asks `ldd`
    /// which libraries the binary loads.
    fn fetch(cache: &Path, root: &Path) -> Result<Dropbear> {
        let ldd = find_tool("ldd", "libc-bin")?;
        let mut queue = vec![DROPBEAR_PACKAGE.to_string()];
        let mut seen: BTreeSet<String> = queue.iter().cloned().collect();
        let mut version = String::new();
        while let Some(package) = queue.pop() {
            let deb = package_deb(cache, &package)?;
            run(
                Command::new("dpkg-deb").arg("-x").arg(&deb).arg(root),
                "dpkg-deb -x",
            )?;
            let fields = run(
                Command::new("dpkg-deb").arg("-f").arg(&deb).args([
                    "Version",
                    "Pre-Depends",
                    "Depends",
                ]),
                "dpkg-deb -f",
            )?;
            let fields = String::from_utf8_lossy(&fields.stdout);
            if package == DROPBEAR_PACKAGE {
                version = control_field(&fields, "Version").unwrap_or_default();
            }
            for field in ["Pre-Depends", "Depends"] {
                for dep in depends_names(&control_field(&fields, field).unwrap_or_default()) {
                    if !HOST_PACKAGES.contains(&dep.as_str()) && seen.insert(dep.clone()) {
                        queue.push(dep);
                    }
                }
            }
            if seen.len() > MAX_PACKAGES {
                bail!("{DROPBEAR_PACKAGE} pulls in more than {MAX_PACKAGES} packages: {seen:?}");
            }
        }

        let binary = root.join("usr/sbin/dropbear");
        let data = fs::read(&binary).with_context(|| format!("reading {}", binary.display()))?;
        let loader = Elf::parse(&data)
            .and_then(|elf| elf.interpreter())
            .with_context(|| format!("reading {}", binary.display()))?
            .ok_or_else(|| anyhow!("{} has no dynamic loader (PT_INTERP)", binary.display()))?;

        let lib_path = [
            "lib/x86_64-linux-gnu",
            "usr/lib/x86_64-linux-gnu",
            "lib",
            "usr/lib",
        ]
        .iter()
        .map(|d| root.join(d))
        .filter(|d| d.is_dir())
        .map(|d| d.display().to_string())
        .collect::<Vec<_>>()
        .join(":");
        let output = run(
            Command::new(&ldd)
                .arg(&binary)
                .env("LD_LIBRARY_PATH", lib_path),
            "ldd dropbear",
        )?;
        let listing = String::from_utf8_lossy(&output.stdout);
        let libs = parse_ldd(&listing).with_context(|| format!("ldd {}", binary.display()))?;

        // The loader at its PT_INTERP path (the host's, as ldd used it), each
        // library under its soname in a directory on the default search path.
        let mut files = vec![(
            PathBuf::from(loader.trim_start_matches('/')),
            PathBuf::from(&loader),
        )];
        for (soname, path) in libs {
            files.push((Path::new(GUEST_LIB_DIR).join(soname), path));
        }
        Ok(Dropbear {
            version,
            binary,
            files,
        })
    }
}

/// One field of `dpkg-deb -f` output (continuation lines are not needed here).
fn control_field(fields: &str, name: &str) -> Option<String> {
    fields.lines().find_map(|l| {
        l.strip_prefix(name)
            .and_then(|rest| rest.strip_prefix(':'))
            .map(|v| v.trim().to_string())
    })
}

/// Package names of a Depends field: the first of each `a | b` alternative,
/// without version constraints or architecture qualifiers.
fn depends_names(depends: &str) -> Vec<String> {
    depends
        .split(',')
        .filter_map(|dep| {
            let first = dep.split('|').next()?.trim();
            let name = first.split([' ', '(', ':']).next()?.trim();
            (!name.is_empty()).then(|| name.to_string())
        })
        .collect()
}

/// `(soname, resolved path)` of every library in `ldd` output; the loader
/// line and the vDSO carry no `=>` and are skipped.
fn parse_ldd(listing: &str) -> Result<Vec<(String, PathBuf)>> {
    let mut libs = Vec::new();
    for line in listing.lines() {
        let Some((soname, rest)) = line.split_once("=>") else {
            continue;
        };
        let soname = soname.trim();
        let path = rest.split(" (").next().unwrap_or("").trim();
        if path.is_empty() || path == "not found" {
            bail!("shared library {soname} not found");
        }
        libs.push((soname.to_string(), PathBuf::from(path)));
    }
    if libs.is_empty() {
        bail!("ldd listed no shared libraries");
    }
    Ok(libs)
}

fn initramfs(
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

/// Writer for the "newc" cpio format the kernel unpacks into its initramfs:
/// a 110-byte ASCII header ("070701" + 13 eight-digit hex fields), the
/// NUL-terminated name, then the data, each padded to 4 bytes.
#[derive(Default)]
struct Cpio {
    buf: Vec<u8>,
    next_ino: u32,
    dirs: BTreeSet<String>,
}

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;

impl Cpio {
    fn dir(&mut self, path: &str, perm: u32) {
        let path = path.trim_matches('/');
        if self.dirs.contains(path) {
            return;
        }
        self.parents(path);
        self.dirs.insert(path.to_string());
        self.entry(path, S_IFDIR | perm, 2, (0, 0), &[]);
    }

    fn file(&mut self, path: &str, perm: u32, data: &[u8]) {
        self.parents(path);
        self.entry(path, S_IFREG | perm, 1, (0, 0), data);
    }

    fn symlink(&mut self, path: &str, target: &str) {
        self.parents(path);
        self.entry(path, S_IFLNK | 0o777, 1, (0, 0), target.as_bytes());
    }

    fn char_dev(&mut self, path: &str, perm: u32, major: u32, minor: u32) {
        self.parents(path);
        self.entry(path, S_IFCHR | perm, 1, (major, minor), &[]);
    }

    /// The kernel does not create missing parent directories, so emit them first.
    fn parents(&mut self, path: &str) {
        if let Some((parent, _)) = path.trim_matches('/').rsplit_once('/') {
            self.dir(parent, 0o755);
        }
    }

    fn entry(&mut self, name: &str, mode: u32, nlink: u32, rdev: (u32, u32), data: &[u8]) {
        self.next_ino += 1;
        let name = name.trim_start_matches('/');
        let fields = [
            self.next_ino,
            mode,
            0, // uid
            0, // gid
            nlink,
            0, // mtime: fixed, so the archive is reproducible
            u32::try_from(data.len()).expect("initramfs file larger than 4 GiB"),
            0, // devmajor
            0, // devminor
            rdev.0,
            rdev.1,
            u32::try_from(name.len() + 1).expect("name too long"),
            0, // check (only used by the "070702" crc variant)
        ];
        self.buf.extend_from_slice(b"070701");
        for field in fields {
            self.buf
                .extend_from_slice(format!("{field:08X}").as_bytes());
        }
        self.buf.extend_from_slice(name.as_bytes());
        self.buf.push(0);
        self.pad();
        self.buf.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
    }

    fn finish(mut self) -> Vec<u8> {
        self.next_ino = 0;
        self.entry("TRAILER!!!", 0, 1, (0, 0), &[]);
        self.buf
    }
}

fn stage_rootfs(
    stage: &Path,
    busybox: &Path,
    applets: &[String],
    dropbear: &Dropbear,
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
        // Host keys, made by dropbear -R on the first connection.
        ("etc/dropbear", 0o700),
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
    let sbin_dropbear = stage.join("usr/sbin/dropbear");
    fs::copy(&dropbear.binary, &sbin_dropbear)
        .with_context(|| format!("copying {}", dropbear.binary.display()))?;
    fs::set_permissions(&sbin_dropbear, fs::Permissions::from_mode(0o755))?;
    for (guest, source) in &dropbear.files {
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
        ("etc/passwd", 0o644, "root:x:0:0:root:/root:/bin/sh\n"),
        ("etc/group", 0o644, "root:x:0:\ntty:x:5:\n"),
        // Locked password: the serial console needs none and nothing else
        // should accept an empty one.
        ("etc/shadow", 0o600, "root:*:19000:0:99999:7:::\n"),
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
    Ok(())
}

/// Turns the tree `stage` into a sparse ext4 image of `bytes` labelled `hatch-root`.
pub(super) fn make_ext4(mkfs: &Path, stage: &Path, image: &Path, bytes: u64) -> Result<()> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpio_layout() {
        let mut cpio = Cpio::default();
        cpio.file("a/b", 0o644, b"hello");
        cpio.symlink("a/c", "b");
        let buf = cpio.finish();
        assert_eq!(buf.len() % 4, 0);
        // Parent directory first, then the file.
        assert_eq!(&buf[..6], b"070701");
        assert_eq!(&buf[110..112], b"a\0");
        let mode = u32::from_str_radix(std::str::from_utf8(&buf[14..22]).unwrap(), 16).unwrap();
        assert_eq!(mode, S_IFDIR | 0o755);
        let text = String::from_utf8_lossy(&buf);
        assert!(text.contains("a/b\0"));
        assert!(text.contains("hello"));
        // Trailer name is 11 bytes with its NUL: 110 + 11 = 121, padded to 124.
        assert!(text.ends_with("TRAILER!!!\0\0\0\0"));
    }

    #[test]
    fn ldd_listing() {
        let listing = "\tlinux-vdso.so.1 (0x00007ffd)\n\
            \tlibtomcrypt.so.1 => /tmp/x/usr/lib/x86_64-linux-gnu/libtomcrypt.so.1 (0x00007f1)\n\
            \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f2)\n\
            \t/lib64/ld-linux-x86-64.so.2 (0x00007f3)\n";
        let libs = parse_ldd(listing).unwrap();
        assert_eq!(
            libs,
            vec![
                (
                    "libtomcrypt.so.1".to_string(),
                    PathBuf::from("/tmp/x/usr/lib/x86_64-linux-gnu/libtomcrypt.so.1")
                ),
                (
                    "libc.so.6".to_string(),
                    PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6")
                ),
            ]
        );
        let missing = parse_ldd("\tlibz.so.1 => not found\n").unwrap_err();
        assert!(missing.to_string().contains("libz.so.1"));
    }

    #[test]
    fn control_depends() {
        let fields = "Version: 2022.83-1\nPre-Depends: libc6 (>= 2.34)\n\
            Depends: libc6 (>= 2.34), libcrypt1 (>= 1:4.1.0), zlib1g:amd64 | zlib-alt, libx\n";
        assert_eq!(
            control_field(fields, "Version").as_deref(),
            Some("2022.83-1")
        );
        assert_eq!(control_field(fields, "Conflicts"), None);
        let deps = depends_names(&control_field(fields, "Depends").unwrap());
        assert_eq!(deps, ["libc6", "libcrypt1", "zlib1g", "libx"]);
        assert!(depends_names("").is_empty());
    }

    #[test]
    fn config_values() {
        let cfg = "CONFIG_A=m\n# CONFIG_B is not set\nCONFIG_AB=y\n";
        assert_eq!(config_value(cfg, "CONFIG_A").as_deref(), Some("m"));
        assert_eq!(config_value(cfg, "CONFIG_B"), None);
        assert_eq!(config_value(cfg, "CONFIG_AB").as_deref(), Some("y"));
    }
}

//! Builds a stock Debian bookworm guest image: systemd, cloud-init (NoCloud)
//! and openssh-server, on the same kernel and initramfs as the default image.
//!
//! Output (in `out`): `vmlinuz`, `vmlinux` and `initrd.img` from [`super::build::build`],
//! and `rootfs.ext4`, a 2 GiB sparse ext4 (label `hatch-root`) made from a
//! `debootstrap --variant=minbase` tree by `mkfs.ext4 -d`.
//!
//! The finished rootfs is cached next to the kernel .deb, keyed by a hash of
//! everything that goes into it, so only the first build runs debootstrap
//! (about 1-2 minutes and the only step that needs the network).
//!
//! Host needs: root (debootstrap chroots), `debootstrap` (installed with
//! apt-get when missing), `e2fsprogs`, plus what the default image needs.

use anyhow::{bail, Context, Result};
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use super::build::{cache_dir, find_tool, make_ext4, run, step};
use super::{INITRD_FILE, KERNEL_FILE, ROOTFS_FILE, VMLINUX_FILE};

const SUITE: &str = "bookworm";
const DEFAULT_MIRROR: &str = "http://deb.debian.org/debian";

/// `--include` of debootstrap. minbase already has apt, e2fsprogs, util-linux.
const PACKAGES: &[&str] = &[
    "systemd-sysv",
    // Without udev systemd waits 90 s for dev-ttyS0.device.
    "udev",
    "cloud-init",
    // debootstrap does not resolve virtual packages: python3-cryptography
    // needs this one, or cloud-init fails to configure.
    "python3-cffi-backend",
    "openssh-server",
    "sudo",
    // systemd-logind needs it, and logind is what powers the guest off on
    // the ACPI power button (what the VMM presses on hatch's stop).
    "dbus",
    // cloud-init's first choice of renderer on Debian is ENI (ifupdown).
    "ifupdown",
    "isc-dhcp-client",
    // The ENI renderer turns every netplan `routes:` entry into
    // `post-up route add ...`; without `route` those routes silently vanish.
    "net-tools",
    // Applies the `dns-nameservers` cloud-init writes into ENI; without it
    // the seed's nameservers never reach /etc/resolv.conf.
    "resolvconf",
    "netbase",
    "iproute2",
    "ca-certificates",
    // ps/free/top: the least a person logged into the guest expects.
    "procps",
];

const ROOTFS_BYTES: u64 = 2 << 30;
const ROOTFS_LABEL: &str = "hatch-root";

/// Part of the cache key: bump it when a build step changes in a way the
/// constants below do not show.
const RECIPE_VERSION: &str = "1";

const CLOUD_CFG: &str = "\
# hatch: the seed is a NoCloud volume (iso9660, label cidata). Probing any
# other datasource costs seconds to minutes under emulation.
datasource_list: [ NoCloud, None ]
# Keeps 127.0.1.1 in /etc/hosts equal to the meta-data hostname, or sudo
# stalls trying to resolve it over the network.
manage_etc_hosts: true
# DSA is obsolete and each key type costs time under emulation.
ssh_genkeytypes: [ rsa, ecdsa, ed25519 ]
# There is no grub in the image (hatch boots the kernel directly).
grub_dpkg: { enabled: false }
";

/// Files written over the debootstrap tree: (path, mode, content).
const FILES: &[(&str, u32, &str)] = &[
    ("etc/cloud/cloud.cfg.d/90_hatch.cfg", 0o644, CLOUD_CFG),
    // Pass 1 is moot (the initramfs mounts / rw, so systemd skips fsck) but
    // keeps the entry conventional.
    ("etc/fstab", 0o644, "/dev/vda / ext4 defaults 0 1\n"),
    ("etc/hostname", 0o644, "hatch\n"),
    // cloud-init's locale module otherwise tries to generate en_US.UTF-8,
    // which fails without the `locales` package; C.UTF-8 is built into glibc.
    ("etc/default/locale", 0o644, "LANG=C.UTF-8\n"),
    (
        "etc/hosts",
        0o644,
        "127.0.0.1\tlocalhost\n127.0.1.1\thatch\n::1\tlocalhost ip6-localhost ip6-loopback\n",
    ),
    // Empty: systemd writes a new id on each VM's first boot, so VMs made
    // from one image do not share it (journal, DHCP client id).
    ("etc/machine-id", 0o444, ""),
    (
        "etc/systemd/system/serial-getty@ttyS0.service.d/hatch-autologin.conf",
        0o644,
        // Root's password stays locked; the serial console is a root shell,
        // as on the busybox image.
        "[Service]\nExecStart=\nExecStart=-/sbin/agetty --autologin root --keep-baud 115200,57600,38400,9600 %I $TERM\n",
    ),
    (
        "etc/systemd/system/ssh.service.d/hatch-hostkeys.conf",
        0o644,
        // Host keys are removed from the image; cloud-init makes them before
        // sshd starts, and this covers a boot where cloud-init did not.
        "[Service]\nExecStartPre=\nExecStartPre=/usr/bin/ssh-keygen -A\nExecStartPre=/usr/sbin/sshd -t\n",
    ),
];

/// Symlinks written over the tree: (path, target).
const SYMLINKS: &[(&str, &str)] = &[
    // Keeps the kernel's eth0 instead of udev's enp0s3-style names, so a
    // network-config works with or without `set-name`.
    ("etc/systemd/network/99-default.link", "/dev/null"),
];

/// Units masked because they only wait or do housekeeping a short-lived,
/// emulated VM does not need.
const MASKED_UNITS: &[&str] = &[
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "dpkg-db-backup.timer",
    "e2scrub_all.timer",
    "e2scrub_reap.service",
    "fstrim.timer",
    "man-db.timer",
    "systemd-networkd-wait-online.service",
];

/// Build the Debian image into `out` (`vmlinuz`, `vmlinux`, `initrd.img`, `rootfs.ext4`).
pub fn build(out: &Path) -> Result<()> {
    fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    remove_dead_scratch(out, ".hatch-debian.");
    // Everything is assembled here and renamed into `out` at the end, so a
    // failed build never leaves the busybox rootfs (or half a Debian one)
    // where a Debian image is expected.
    let stage = Scratch::create(out.join(format!(".hatch-debian.{}", std::process::id())))?;
    super::build::build(stage.path()).context("building the kernel and initramfs")?;

    let cached = cached_rootfs(&cache_dir()?)?;
    let rootfs = stage.path().join(ROOTFS_FILE);
    let _ = fs::remove_file(&rootfs);
    step(&format!("copying {}", cached.display()));
    copy_sparse(&cached, &rootfs)?;

    for name in [KERNEL_FILE, VMLINUX_FILE, INITRD_FILE, ROOTFS_FILE] {
        let dst = out.join(name);
        fs::rename(stage.path().join(name), &dst)
            .with_context(|| format!("moving image file to {}", dst.display()))?;
    }
    let meta = fs::metadata(out.join(ROOTFS_FILE))?;
    step(&format!(
        "Debian image written to {} (rootfs {} MiB, {} MiB allocated)",
        out.display(),
        meta.len() >> 20,
        (meta.blocks() * 512) >> 20
    ));
    Ok(())
}

/// The cached rootfs for the current recipe, built first if there is none.
fn cached_rootfs(cache: &Path) -> Result<PathBuf> {
    let path = cache.join(format!("debian-{SUITE}-{}.ext4", recipe_key()));
    if path.is_file() {
        step(&format!("using cached {}", path.display()));
        return Ok(path);
    }
    // /proc/self belongs to the effective uid.
    if fs::metadata("/proc/self")
        .map(|m| m.uid())
        .unwrap_or(u32::MAX)
        != 0
    {
        bail!(
            "building the Debian rootfs needs root (debootstrap chroots and creates device nodes); \
             no cached {} yet",
            path.display()
        );
    }
    let debootstrap = ensure_debootstrap()?;
    let mkfs = find_tool("mkfs.ext4", "e2fsprogs")?;
    let mirror = host_mirror();

    // Built under a temporary name and renamed at the end: a build that dies
    // half-way never leaves something that looks like a cache entry.
    let work = Scratch::create(cache.join(format!(".debian-build.{}", std::process::id())))?;
    let tree = work.path().join("tree");
    run_debootstrap(&debootstrap, &mirror, &tree, work.path())?;
    // debootstrap unmounts its /proc and /sys on success; mkfs -d would copy
    // them into the image if one were left behind.
    if let Some(m) = mounts_under(&tree)?.first() {
        bail!("{} is still mounted after debootstrap", m.display());
    }
    configure(&tree)?;

    let raw = work.path().join("mkfs.ext4");
    let image = work.path().join("rootfs.ext4");
    let started = Instant::now();
    step(&format!(
        "mkfs.ext4 -d ({} MiB sparse, label {ROOTFS_LABEL})",
        ROOTFS_BYTES >> 20
    ));
    make_ext4(&mkfs, &tree, &raw, ROOTFS_BYTES)?;
    // mkfs zeroes the 64 MiB journal with fallocate, which leaves allocated
    // (unwritten) extents; a sparse copy drops them from the cache entry.
    copy_sparse(&raw, &image)?;
    let _ = fs::remove_file(&raw);
    step(&format!(
        "mkfs.ext4 -d and copy took {:.1} s",
        started.elapsed().as_secs_f64()
    ));
    fs::rename(&image, &path).with_context(|| format!("moving rootfs to {}", path.display()))?;
    remove_stale_entries(cache, &path);
    step(&format!("cached {}", path.display()));
    Ok(path)
}

/// Hash of everything that decides the rootfs's content: a different recipe
/// gets a different cache file.
fn recipe_key() -> String {
    let mut h = Fnv::new();
    for field in [RECIPE_VERSION, SUITE, ROOTFS_LABEL] {
        h.field(field.as_bytes());
    }
    h.field(&ROOTFS_BYTES.to_le_bytes());
    h.field(PACKAGES.join(",").as_bytes());
    for (path, mode, text) in FILES {
        h.field(path.as_bytes());
        h.field(&mode.to_le_bytes());
        h.field(text.as_bytes());
    }
    for (path, target) in SYMLINKS {
        h.field(path.as_bytes());
        h.field(target.as_bytes());
    }
    h.field(MASKED_UNITS.join(",").as_bytes());
    format!("{:016x}", h.0)
}

/// 64-bit FNV-1a: stable across Rust releases (std's hasher is not) and
/// plenty for telling a handful of recipes apart.
struct Fnv(u64);

impl Fnv {
    fn new() -> Fnv {
        Fnv(0xcbf2_9ce4_8422_2325)
    }

    fn bytes(&mut self, data: &[u8]) {
        for &b in data {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }

    /// Length-prefixed, so ("ab", "c") and ("a", "bc") hash differently.
    fn field(&mut self, data: &[u8]) {
        self.bytes(&(data.len() as u64).to_le_bytes());
        self.bytes(data);
    }
}

/// Other recipes' rootfs files (about 300 MB each) and scratch dirs of dead
/// builds are of no further use.
fn remove_stale_entries(cache: &Path, keep: &Path) {
    let Ok(entries) = fs::read_dir(cache) else {
        return;
    };
    let prefix = format!("debian-{SUITE}-");
    for path in entries.filter_map(|e| e.ok().map(|e| e.path())) {
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.starts_with(&prefix) && name.ends_with(".ext4") && path != keep {
            step(&format!("removing stale {}", path.display()));
            let _ = fs::remove_file(&path);
        }
    }
    remove_dead_scratch(cache, ".debian-build.");
}

/// Removes `dir/PREFIXpid` scratch dirs whose process is gone (killed builds
/// never ran their cleanup).
fn remove_dead_scratch(dir: &Path, prefix: &str) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for path in entries.filter_map(|e| e.ok().map(|e| e.path())) {
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let Some(pid) = name.strip_prefix(prefix) else {
            continue;
        };
        if pid.parse::<u32>().is_ok() && !Path::new("/proc").join(pid).exists() {
            remove_tree(&path);
        }
    }
}

fn ensure_debootstrap() -> Result<PathBuf> {
    if let Ok(path) = find_tool("debootstrap", "debootstrap") {
        return Ok(path);
    }
    step("debootstrap is missing; installing it with apt-get");
    let output = Command::new("apt-get")
        .args(["install", "-y", "--no-install-recommends", "debootstrap"])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdin(Stdio::null())
        .output()
        .context("running apt-get (is this a Debian-like host?)")?;
    if !output.status.success() {
        bail!(
            "debootstrap is not installed and `apt-get install debootstrap` failed: {}\n\
             install debootstrap yourself (running `apt-get update` first may help) and retry",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    find_tool("debootstrap", "debootstrap")
}

fn run_debootstrap(debootstrap: &Path, mirror: &str, tree: &Path, work: &Path) -> Result<()> {
    step(&format!(
        "debootstrap {SUITE} from {mirror} (1-2 minutes): {}",
        PACKAGES.join(" ")
    ));
    let log_path = work.join("debootstrap.out");
    let log = fs::File::create(&log_path)?;
    let started = Instant::now();
    let status = Command::new(debootstrap)
        .arg("--variant=minbase")
        .arg(format!("--include={}", PACKAGES.join(",")))
        .arg(SUITE)
        .arg(tree)
        .arg(mirror)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .status()
        .with_context(|| format!("running {}", debootstrap.display()))?;
    if !status.success() {
        // debootstrap's own output says little; its log in the tree says why.
        let mut detail = tail(&log_path, 15);
        let inner = tree.join("debootstrap/debootstrap.log");
        if inner.is_file() {
            detail.push_str(&format!("\n--- {}:\n{}", inner.display(), tail(&inner, 25)));
        }
        bail!("debootstrap failed ({status}):\n{detail}");
    }
    step(&format!(
        "debootstrap took {:.0} s",
        started.elapsed().as_secs_f64()
    ));
    Ok(())
}

fn tail(path: &Path, lines: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// The Debian mirror the host's apt uses, so debootstrap goes wherever apt
/// already can (a local mirror or proxy); deb.debian.org otherwise.
fn host_mirror() -> String {
    let mut sources = Vec::new();
    if let Ok(text) = fs::read_to_string("/etc/apt/sources.list") {
        sources.extend(one_line_sources(&text));
    }
    let mut files: Vec<PathBuf> = fs::read_dir("/etc/apt/sources.list.d")
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    files.sort();
    for file in files {
        let Ok(text) = fs::read_to_string(&file) else {
            continue;
        };
        // apt itself ignores other names (such as `x.list.disabled`).
        match file.extension().and_then(|e| e.to_str()) {
            Some("list") => sources.extend(one_line_sources(&text)),
            Some("sources") => sources.extend(deb822_sources(&text)),
            _ => {}
        }
    }
    pick_mirror(&sources).unwrap_or_else(|| DEFAULT_MIRROR.to_string())
}

/// One `deb` source: its URI and suites.
#[derive(Debug, PartialEq)]
struct Source {
    uri: String,
    suites: Vec<String>,
}

/// `deb [options] URI SUITE COMPONENT...` lines of a sources.list.
fn one_line_sources(text: &str) -> Vec<Source> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("").trim();
        let Some(rest) = line.strip_prefix("deb ").or(line.strip_prefix("deb\t")) else {
            continue;
        };
        let mut rest = rest.trim_start();
        if rest.starts_with('[') {
            let Some(end) = rest.find(']') else { continue };
            rest = &rest[end + 1..];
        }
        let mut words = rest.split_whitespace();
        if let (Some(uri), Some(suite)) = (words.next(), words.next()) {
            out.push(Source {
                uri: uri.to_string(),
                suites: vec![suite.to_string()],
            });
        }
    }
    out
}

/// Stanzas of a deb822 `.sources` file with `Types: deb`.
fn deb822_sources(text: &str) -> Vec<Source> {
    let mut out = Vec::new();
    for stanza in text.split("\n\n").map(deb822_fields) {
        let get = |k: &str| {
            stanza
                .iter()
                .find(|(key, _)| key.eq_ignore_ascii_case(k))
                .map(|(_, v)| v.as_str())
                .unwrap_or("")
        };
        if !get("Types").split_whitespace().any(|t| t == "deb")
            || get("Enabled").eq_ignore_ascii_case("no")
        {
            continue;
        }
        let suites: Vec<String> = get("Suites").split_whitespace().map(String::from).collect();
        for uri in get("URIs").split_whitespace() {
            out.push(Source {
                uri: uri.to_string(),
                suites: suites.clone(),
            });
        }
    }
    out
}

/// `Key: value` pairs of one stanza; continuation lines (a leading space,
/// e.g. an inline Signed-By key) and comments are dropped.
fn deb822_fields(stanza: &str) -> Vec<(String, String)> {
    stanza
        .lines()
        .filter(|l| !l.starts_with('#') && !l.starts_with(' ') && !l.starts_with('\t'))
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

/// A source for our suite first; else any Debian archive (a host on another
/// release still has a mirror that serves bookworm).
fn pick_mirror(sources: &[Source]) -> Option<String> {
    let usable = |s: &&Source| {
        ["http://", "https://", "ftp://", "file:/"]
            .iter()
            .any(|p| s.uri.starts_with(p))
    };
    let debian_archive = |s: &&Source| s.uri.trim_end_matches('/').ends_with("/debian");
    sources
        .iter()
        .filter(usable)
        .find(|s| s.suites.iter().any(|x| x == SUITE))
        .or_else(|| sources.iter().filter(usable).find(debian_archive))
        .map(|s| s.uri.trim_end_matches('/').to_string())
}

/// Turns the debootstrap tree into a guest: config files, masked units, and
/// nothing that should differ per VM or only takes space.
fn configure(tree: &Path) -> Result<()> {
    step("configuring the rootfs");
    for (name, mode, text) in FILES {
        let path = tree.join(name);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent)?;
        }
        // Replace rather than write through: debootstrap's copies may be
        // symlinks or read-only.
        let _ = fs::remove_file(&path);
        fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        fs::set_permissions(&path, fs::Permissions::from_mode(*mode))?;
    }
    let masks: Vec<(String, &str)> = MASKED_UNITS
        .iter()
        .map(|u| (format!("etc/systemd/system/{u}"), "/dev/null"))
        .collect();
    let links = SYMLINKS.iter().map(|(p, t)| (p.to_string(), *t));
    for (name, target) in links.chain(masks) {
        let path = tree.join(&name);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent)?;
        }
        let _ = fs::remove_file(&path);
        std::os::unix::fs::symlink(target, &path)
            .with_context(|| format!("linking {}", path.display()))?;
    }

    // Host keys made by openssh-server's postinst would be shared by every
    // VM (and sit in the cache); cloud-init makes new ones on first boot.
    remove_matching(&tree.join("etc/ssh"), |n| n.starts_with("ssh_host_"))?;
    // debootstrap copied the build host's resolv.conf into the tree and
    // resolvconf's postinst saved it here; nothing of the host belongs in a VM.
    let _ = fs::remove_file(tree.join("etc/resolvconf/resolv.conf.d/original"));
    // About 110 MB of .debs and package lists; `apt-get update` refetches lists.
    remove_matching(&tree.join("var/cache/apt/archives"), |n| {
        n.ends_with(".deb")
    })?;
    remove_matching(&tree.join("var/cache/apt"), |n| n.ends_with(".bin"))?;
    remove_matching(&tree.join("var/lib/apt/lists"), |n| {
        n != "lock" && n != "partial"
    })?;
    Ok(())
}

/// Removes the regular files and symlinks in `dir` whose name matches.
fn remove_matching(dir: &Path, matches: impl Fn(&str) -> bool) -> Result<()> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", dir.display())),
    };
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name();
        if entry.file_type()?.is_dir() || !matches(&name.to_string_lossy()) {
            continue;
        }
        fs::remove_file(entry.path())
            .with_context(|| format!("removing {}", entry.path().display()))?;
    }
    Ok(())
}

fn copy_sparse(from: &Path, to: &Path) -> Result<()> {
    run(
        Command::new("cp")
            .args(["--reflink=auto", "--sparse=always"])
            .arg(from)
            .arg(to),
        "cp",
    )?;
    Ok(())
}

/// Mount points at or below `dir` (from /proc/self/mountinfo), deepest first.
fn mounts_under(dir: &Path) -> Result<Vec<PathBuf>> {
    let dir = fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    let info = fs::read_to_string("/proc/self/mountinfo").context("reading mountinfo")?;
    let mut found: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(unescape_mountinfo(p)))
        .filter(|p| p.starts_with(&dir))
        .collect();
    found.sort_by_key(|p| std::cmp::Reverse(p.as_os_str().len()));
    Ok(found)
}

/// mountinfo writes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match octal {
            Some(d) if b[i] == b'\\' => {
                out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                i += 4;
            }
            _ => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Removes a build directory, first detaching anything a killed debootstrap
/// left mounted in it: remove_dir_all would otherwise walk into a mounted
/// /proc, /sys or a bind-mounted host /dev.
fn remove_tree(path: &Path) {
    let Ok(mounts) = mounts_under(path) else {
        step(&format!(
            "warning: cannot read mounts; leaving {}",
            path.display()
        ));
        return;
    };
    for m in &mounts {
        let _ = Command::new("umount").arg("-l").arg(m).output();
    }
    if mounts_under(path).map_or(true, |m| !m.is_empty()) {
        step(&format!(
            "warning: something is still mounted below {}; not removing it",
            path.display()
        ));
        return;
    }
    let _ = fs::remove_dir_all(path);
}

/// Scratch directory, removed (safely, see [`remove_tree`]) when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn create(path: PathBuf) -> Result<Scratch> {
        remove_tree(&path);
        fs::create_dir(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Scratch(path))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        remove_tree(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv_known_value() {
        let mut h = Fnv::new();
        h.bytes(b"a");
        assert_eq!(h.0, 0xaf63_dc4c_8601_ec8c);
    }

    #[test]
    fn recipe_key_is_stable_hex() {
        let k = recipe_key();
        assert_eq!(k.len(), 16);
        assert_eq!(k, recipe_key());
    }

    #[test]
    fn one_line_format() {
        let text = "# comment\n\
                    deb [arch=amd64 signed-by=/x.gpg] http://m.example/debian/ bookworm main\n\
                    deb-src http://src.example/debian bookworm main\n\
                    deb http://security.debian.org/debian-security bookworm-security main # x\n";
        let s = one_line_sources(text);
        assert_eq!(
            s,
            vec![
                Source {
                    uri: "http://m.example/debian/".into(),
                    suites: vec!["bookworm".into()]
                },
                Source {
                    uri: "http://security.debian.org/debian-security".into(),
                    suites: vec!["bookworm-security".into()]
                },
            ]
        );
        assert_eq!(pick_mirror(&s).as_deref(), Some("http://m.example/debian"));
    }

    #[test]
    fn deb822_format() {
        let text = "Types: deb\n\
                    # a comment\n\
                    URIs: http://deb.example/debian\n\
                    Suites: bookworm bookworm-updates\n\
                    Components: main\n\
                    Signed-By:\n -----BEGIN PGP PUBLIC KEY BLOCK-----\n .\n Suites: bogus\n\
                    \n\
                    Types: deb\n\
                    URIs: http://deb.example/debian-security\n\
                    Suites: bookworm-security\n\
                    \n\
                    Types: deb\n\
                    Enabled: no\n\
                    URIs: http://off.example/debian\n\
                    Suites: bookworm\n";
        let s = deb822_sources(text);
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].suites, vec!["bookworm", "bookworm-updates"]);
        assert_eq!(
            pick_mirror(&s).as_deref(),
            Some("http://deb.example/debian")
        );
    }

    #[test]
    fn mirror_fallbacks() {
        // Another release's Debian archive still serves bookworm.
        let trixie =
            deb822_sources("Types: deb\nURIs: https://m.example/debian/\nSuites: trixie\n");
        assert_eq!(
            pick_mirror(&trixie).as_deref(),
            Some("https://m.example/debian")
        );
        // Nothing usable: the caller falls back to deb.debian.org.
        let other = one_line_sources("deb cdrom:[Debian]/ bookworm main\n");
        assert_eq!(pick_mirror(&other), None);
        let nodesource = deb822_sources(
            "Types: deb\nURIs: https://deb.nodesource.com/node_20.x\nSuites: nodistro\n",
        );
        assert_eq!(pick_mirror(&nodesource), None);
    }

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(unescape_mountinfo(r"/a\040b/c\134d"), r"/a b/c\d");
        assert_eq!(unescape_mountinfo(r"/plain\0"), r"/plain\0");
    }

    /// Builds the real image: needs root, the network (for debootstrap) and
    /// about 2 minutes cold. `HATCH_DEBIAN_TEST_OUT` picks the output dir.
    #[test]
    #[ignore]
    fn builds_real_image() {
        let out = std::env::var_os("HATCH_DEBIAN_TEST_OUT")
            .map(PathBuf::from)
            .unwrap_or_else(|| std::env::temp_dir().join("hatch-debian-image"));
        let started = Instant::now();
        build(&out).unwrap();
        eprintln!("build took {:.1} s", started.elapsed().as_secs_f64());
        for name in [KERNEL_FILE, VMLINUX_FILE, INITRD_FILE, ROOTFS_FILE] {
            assert!(out.join(name).is_file(), "{name} missing");
        }
    }
}

//! The jailer's chroot for one VM: its name, the VM's files put in it as hard links, the TAP given to the VM's uid, and cleanup.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// The jailer's `--id`: alphanumerics and hyphens, at most 64 characters.
/// `tag` (a hash of the data directory) keeps the VMMs of daemons on other
/// data directories apart; a VM id (`vm_` and alphanumerics) maps one to one.
pub fn jail_id(tag: &str, vm_id: &str) -> Result<String, String> {
    let mut id = format!("h{tag}-");
    for c in vm_id.chars() {
        match c {
            'a'..='z' | 'A'..='Z' | '0'..='9' | '-' => id.push(c),
            '_' => id.push('-'),
            _ => return Err(format!("VM id {vm_id:?} cannot name a jail")),
        }
    }
    if id.len() > 64 {
        return Err(format!("VM id {vm_id:?} is too long for a jail id"));
    }
    Ok(id)
}

/// Where the jails of one Firecracker binary live: `<base>/<exec file name>`.
#[derive(Debug, Clone)]
pub struct Jails {
    /// `--chroot-base-dir`.
    pub base: PathBuf,
    /// The jailer names the directory after the binary's file name.
    pub exec_name: String,
    pub tag: String,
}

impl Jails {
    pub fn dir(&self) -> PathBuf {
        self.base.join(&self.exec_name)
    }
    /// `<base>/<exec name>/<jail id>`: everything the jailer made for the VM.
    pub fn jail_dir(&self, jail_id: &str) -> PathBuf {
        self.dir().join(jail_id)
    }
    /// The chroot: `/` as the VMM sees it.
    pub fn root(&self, jail_id: &str) -> PathBuf {
        self.jail_dir(jail_id).join("root")
    }
}

/// Makes `dst` another name of `src` (same inode). `copy_if_elsewhere` allows
/// a copy when the two are on different filesystems (small files only:
/// kernel, initrd, libraries; never a disk).
pub fn link_in(src: &Path, dst: &Path, copy_if_elsewhere: bool) -> Result<(), String> {
    if let Some(parent) = dst.parent() {
        std::fs::create_dir_all(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
    }
    match std::fs::hard_link(src, dst) {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EXDEV) && copy_if_elsewhere => {
            std::fs::copy(src, dst)
                .map(drop)
                .map_err(|e| format!("copying {} to {}: {e}", src.display(), dst.display()))
        }
        Err(e) => Err(format!(
            "linking {} into the jail as {}: {e}{}",
            src.display(),
            dst.display(),
            if e.raw_os_error() == Some(libc::EXDEV) {
                " (keep HATCH_DATA_DIR on one filesystem)"
            } else {
                ""
            }
        )),
    }
}

/// Opens a file the VMM wrote in its chroot (a directory it owns and may
/// fill with anything): never through a symlink, a regular file with one
/// name and at most `max` bytes.
pub fn open_written(path: &Path, max: u64) -> Result<std::fs::File, String> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let m = f
        .metadata()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if !m.is_file() || m.nlink() != 1 {
        return Err(format!(
            "{} is not a regular file of its own (refused)",
            path.display()
        ));
    }
    if m.len() > max {
        return Err(format!(
            "{} holds {} bytes, more than the {max} it may (refused)",
            path.display(),
            m.len()
        ));
    }
    Ok(f)
}

/// Gives the inode open as `f` the name `to` (as root: `linkat` with
/// AT_EMPTY_PATH), root's and 0600: exactly the file that was checked, not
/// whatever the VMM renamed into its place since.
pub fn adopt(f: &std::fs::File, to: &Path) -> Result<(), String> {
    use std::os::unix::ffi::OsStrExt;
    let _ = std::fs::remove_file(to);
    let dst = std::ffi::CString::new(to.as_os_str().as_bytes()).map_err(|e| e.to_string())?;
    // SAFETY: an fd we own, an empty NUL-terminated string and a
    // NUL-terminated path that outlive the call.
    let rc = unsafe {
        libc::linkat(
            f.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_FDCWD,
            dst.as_ptr(),
            libc::AT_EMPTY_PATH,
        )
    };
    if rc != 0 {
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EXDEV) {
            return Err(format!("linking into {}: {err}", to.display()));
        }
        // `to` is on another filesystem: a copy of what the fd reads.
        let mut dst = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(to)
            .map_err(|e| format!("{}: {e}", to.display()))?;
        let mut src = f;
        std::io::copy(&mut src, &mut dst)
            .map_err(|e| format!("copying to {}: {e}", to.display()))?;
        return Ok(());
    }
    use std::os::unix::fs::PermissionsExt;
    std::os::unix::fs::fchown(f, Some(0), Some(0)).map_err(|e| e.to_string())?;
    f.set_permissions(std::fs::Permissions::from_mode(0o600))
        .map_err(|e| e.to_string())
}

/// `_IOW('T', 204, int)` and `_IOW('T', 206, int)`.
const TUNSETOWNER: libc::c_ulong = 0x4004_54cc;
const TUNSETGROUP: libc::c_ulong = 0x4004_54ce;

/// Gives the existing (persistent) TAP `tap` to `uid`/`gid`, so a VMM
/// running as them can attach to it by name (the jailer closes every fd
/// but stdio: no queue can be passed). Runs on a thread of its own, which
/// joins `netns` first (setns changes only the calling thread).
pub fn give_tap(tap: &str, netns: Option<&str>, uid: u32, gid: u32) -> Result<(), String> {
    let req = crate::net::link::TapRequest::new(tap)?;
    let ns = match netns {
        Some(n) => Some(
            std::fs::File::open(crate::vmm::process::netns_path(n))
                .map_err(|e| format!("network namespace {n}: {e}"))?,
        ),
        None => None,
    };
    let tap = tap.to_string();
    std::thread::spawn(move || -> Result<(), String> {
        if let Some(ns) = &ns {
            // SAFETY: setns(2) with an open nsfs fd; changes this thread only,
            // which ends after this closure.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(format!("setns: {}", std::io::Error::last_os_error()));
            }
        }
        // SAFETY: open_raw makes system calls only; the fd it returns is ours.
        let fd = unsafe { req.open_raw() }.map_err(|e| format!("opening TAP {tap}: {e}"))?;
        // SAFETY: `fd` was just opened and is owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        for (op, id, what) in [(TUNSETOWNER, uid, "owner"), (TUNSETGROUP, gid, "group")] {
            // SAFETY: both ioctls take an integer by value on a TUN fd.
            if unsafe { libc::ioctl(fd.as_raw_fd(), op, id as libc::c_ulong) } != 0 {
                return Err(format!(
                    "setting the {what} of TAP {tap}: {}",
                    std::io::Error::last_os_error()
                ));
            }
        }
        Ok(())
    })
    .join()
    .map_err(|_| "the TAP thread panicked".to_string())?
}

/// Pids of the jailer or Firecracker of jail `id` (`--id <id>` on their
/// command line; Firecracker's names no host path, so the manager's
/// search by work directory cannot find it).
pub fn pids_of(id: &str) -> Vec<u32> {
    crate::vmm::process::pids_mentioning(&format!(" --id {id} "))
}

/// Kills the VMM of jail `id` and removes the jail directory. Blocking.
pub fn remove(jails: &Jails, id: &str) {
    for pid in pids_of(id) {
        crate::vmm::process::kill_and_wait(pid, std::time::Duration::from_secs(5));
    }
    let dir = jails.jail_dir(id);
    // std's remove_dir_all never follows a symlink the VMM may have planted.
    match std::fs::remove_dir_all(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => tracing::error!(jail = %dir.display(), "removing jail: {e}"),
    }
}

/// Every jail under `jails` (what an earlier daemon left); returns how many.
pub fn remove_all(jails: &Jails) -> usize {
    let Ok(entries) = std::fs::read_dir(jails.dir()) else {
        return 0;
    };
    let mut n = 0;
    for e in entries.flatten() {
        if let Some(id) = e.file_name().to_str() {
            remove(jails, id);
            n += 1;
        }
    }
    n
}

/// The ELF interpreter and libraries a dynamically linked binary needs
/// (a gnu build of Firecracker; the musl build is static and needs none),
/// as `ldd` resolves them: they must be inside the chroot too.
pub fn shared_libraries(binary: &Path) -> Result<Vec<PathBuf>, String> {
    if !has_interpreter(binary)? {
        return Ok(vec![]);
    }
    let out = std::process::Command::new("ldd")
        .arg(binary)
        .output()
        .map_err(|e| format!("ldd {}: {e}", binary.display()))?;
    if !out.status.success() {
        return Err(format!(
            "ldd {}: {}",
            binary.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(parse_ldd(&String::from_utf8_lossy(&out.stdout)))
}

fn parse_ldd(text: &str) -> Vec<PathBuf> {
    text.lines()
        .filter_map(|l| {
            let l = l.trim();
            let path = match l.split_once("=>") {
                Some((_, right)) => right.split_whitespace().next()?,
                None => l.split_whitespace().next()?,
            };
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect()
}

/// Whether `binary` is an ELF file with a PT_INTERP program header.
fn has_interpreter(binary: &Path) -> Result<bool, String> {
    use std::io::Read;
    let mut f = std::fs::File::open(binary).map_err(|e| format!("{}: {e}", binary.display()))?;
    let mut head = vec![0u8; 64];
    f.read_exact(&mut head)
        .map_err(|e| format!("{}: {e}", binary.display()))?;
    if &head[..4] != b"\x7fELF" || head[4] != 2 {
        return Err(format!("{} is not a 64-bit ELF binary", binary.display()));
    }
    let u64_at = |b: &[u8], o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
    let u16_at = |b: &[u8], o: usize| u16::from_le_bytes(b[o..o + 2].try_into().unwrap());
    let (phoff, phentsize, phnum) = (u64_at(&head, 32), u16_at(&head, 54), u16_at(&head, 56));
    let mut table = vec![0u8; usize::from(phentsize) * usize::from(phnum)];
    use std::io::Seek;
    f.seek(std::io::SeekFrom::Start(phoff))
        .and_then(|_| f.read_exact(&mut table))
        .map_err(|e| format!("{}: {e}", binary.display()))?;
    const PT_INTERP: u32 = 3;
    Ok(table
        .chunks(usize::from(phentsize.max(4)))
        .any(|ph| u32::from_le_bytes(ph[..4].try_into().unwrap()) == PT_INTERP))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jail_ids_hold_only_what_the_jailer_allows() {
        assert_eq!(
            jail_id("0a1b2c3d", "vm_k3j9x0a1b2c3").unwrap(),
            "h0a1b2c3d-vm-k3j9x0a1b2c3"
        );
        assert!(jail_id("0a1b2c3d", "vm_../x").is_err());
        assert!(jail_id("0a1b2c3d", &"a".repeat(60)).is_err());
    }

    #[test]
    fn reads_ldd_output() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd)\n\tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x1)\n\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x2)\n\t/lib64/ld-linux-x86-64.so.2 (0x3)\n";
        assert_eq!(
            parse_ldd(text),
            vec![
                PathBuf::from("/lib/x86_64-linux-gnu/libgcc_s.so.1"),
                PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2"),
            ]
        );
        // A static binary (or a script) has no interpreter to bring along.
        assert!(has_interpreter(Path::new("/bin/sh")).unwrap());
    }

    #[test]
    fn a_file_the_vmm_wrote_is_read_only_if_plain() {
        let dir = std::env::temp_dir().join(format!("hatch-fc-open-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("state"), b"0123456789").unwrap();
        assert!(open_written(&dir.join("state"), 10).is_ok());
        assert!(open_written(&dir.join("state"), 9)
            .unwrap_err()
            .contains("refused"));
        std::os::unix::fs::symlink(dir.join("state"), dir.join("link")).unwrap();
        assert!(open_written(&dir.join("link"), 100).is_err());
        std::fs::hard_link(dir.join("state"), dir.join("second")).unwrap();
        assert!(open_written(&dir.join("state"), 100)
            .unwrap_err()
            .contains("refused"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

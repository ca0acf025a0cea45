//! Guest RAM as anonymous shared memory (a memfd) the daemon creates, fills
//! and hands to a VMM that maps it shared (`Capabilities::shared_ram`).

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::{Path, PathBuf};

/// The name every guest-RAM memfd the daemon makes carries (the text after
/// `/memfd:` in a /proc/PID/fd link), so one is told apart from other fds.
pub const NAME: &str = "hatch-guest-ram";
/// What QEMU names the memfd it makes for a booted guest's RAM
/// (`memory-backend-memfd`).
pub const QEMU_NAME: &str = "memory-backend-memfd";

/// A new, empty memfd of `len` bytes (all holes), close-on-exec: a child
/// gets it only where it is placed on purpose.
pub fn create(len: u64) -> std::io::Result<File> {
    let name = std::ffi::CString::new(NAME).expect("no NUL in the name");
    // SAFETY: memfd_create with a valid C string; on success we own the fd.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new fd no one else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(len)?;
    Ok(file)
}

/// How this process names `file` as a path (`/proc/self/fd/N`): opening it
/// gives the same memory, so a path-taking interface passes a memfd on.
/// Valid while `file` is open.
pub fn path_of(file: &File) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()))
}

/// Whether a /proc/PID/fd link target names guest RAM: a memfd made by
/// `create`, or the one QEMU makes at boot.
pub fn is_guest_ram_link(target: &Path) -> bool {
    let t = target.as_os_str().as_encoded_bytes();
    [NAME, QEMU_NAME]
        .iter()
        .any(|n| t.starts_with(format!("/memfd:{n}").as_bytes()))
}

/// Whether `file` is guest RAM (`is_guest_ram_link`).
pub fn is_guest_ram(file: &File) -> bool {
    std::fs::read_link(path_of(file)).is_ok_and(|t| is_guest_ram_link(&t))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn a_guest_ram_memfd_is_sized_known_and_reached_by_its_path() {
        let ram = create(1 << 20).unwrap();
        assert_eq!(ram.metadata().unwrap().len(), 1 << 20);
        assert!(is_guest_ram(&ram));
        ram.write_all_at(b"hello", 4096).unwrap();
        let again = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path_of(&ram))
            .unwrap();
        let mut buf = [0u8; 5];
        again.read_exact_at(&mut buf, 4096).unwrap();
        assert_eq!(&buf, b"hello");
        assert!(is_guest_ram(&again), "the reopened fd is the same memfd");
        let path = std::env::temp_dir().join(format!("hatch-ram-test-{}", std::process::id()));
        let other = File::create(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert!(!is_guest_ram(&other), "a plain file is not guest RAM");
    }
}

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

/// A new guest-RAM memfd with `src`'s content, made while nothing writes to
/// `src` (its guest paused). Only the pages that hold data are copied, in
/// the kernel: a hole in `src` (a page the guest never touched) stays a hole
/// and takes no memory in the copy either.
pub fn duplicate(src: &File) -> std::io::Result<File> {
    let len = src.metadata()?.len();
    let dst = create(len)?;
    let mut at: u64 = 0;
    while at < len {
        let Some(start) = seek_to(src, at, libc::SEEK_DATA)? else {
            break;
        };
        let end = seek_to(src, start, libc::SEEK_HOLE)?
            .unwrap_or(len)
            .min(len);
        copy_range(src, &dst, start, end)?;
        at = end;
    }
    Ok(dst)
}

/// `lseek(fd, from, whence)` for SEEK_DATA/SEEK_HOLE; None when no data follows `from`.
fn seek_to(file: &File, from: u64, whence: libc::c_int) -> std::io::Result<Option<u64>> {
    // SAFETY: lseek on an fd `file` owns; it changes only that fd's offset,
    // which nothing else here relies on (every copy names its offsets).
    let at = unsafe { libc::lseek(file.as_raw_fd(), from as libc::off_t, whence) };
    if at < 0 {
        let e = std::io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ENXIO) => Ok(None),
            _ => Err(e),
        };
    }
    Ok(Some(at as u64))
}

/// Copies `src[start..end]` to the same offsets of `dst`, in the kernel.
fn copy_range(src: &File, dst: &File, start: u64, end: u64) -> std::io::Result<()> {
    let (mut from, mut to) = (start as libc::loff_t, start as libc::loff_t);
    while (from as u64) < end {
        let want = (end - from as u64).min(1 << 30) as usize;
        // SAFETY: both fds are owned by the `File`s borrowed for the call,
        // and the offsets are plain integers the kernel updates.
        let n = unsafe {
            libc::copy_file_range(
                src.as_raw_fd(),
                &mut from,
                dst.as_raw_fd(),
                &mut to,
                want,
                0,
            )
        };
        match n {
            n if n > 0 => {}
            0 => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "guest RAM shrank while it was copied",
                ))
            }
            _ => return Err(std::io::Error::last_os_error()),
        }
    }
    Ok(())
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

    #[test]
    fn a_duplicate_has_the_content_and_the_holes_and_is_its_own() {
        let ram = create(64 << 20).unwrap();
        ram.write_all_at(&[7u8; 8192], 4096).unwrap();
        ram.write_all_at(b"end", (64 << 20) - 3).unwrap();
        let copy = duplicate(&ram).unwrap();
        assert!(is_guest_ram(&copy));
        assert_eq!(copy.metadata().unwrap().len(), 64 << 20);
        let mut buf = vec![0u8; 8192];
        copy.read_exact_at(&mut buf, 4096).unwrap();
        assert!(buf.iter().all(|&b| b == 7));
        let mut end = [0u8; 3];
        copy.read_exact_at(&mut end, (64 << 20) - 3).unwrap();
        assert_eq!(&end, b"end");
        // Only the written pages take memory in the copy.
        use std::os::unix::fs::MetadataExt;
        assert!(copy.metadata().unwrap().blocks() * 512 <= 64 << 10);
        // Writes to the source after the copy do not reach it.
        ram.write_all_at(&[9u8; 4096], 4096).unwrap();
        copy.read_exact_at(&mut buf[..4096], 4096).unwrap();
        assert!(buf[..4096].iter().all(|&b| b == 7));
    }
}

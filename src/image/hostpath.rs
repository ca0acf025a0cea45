//! Opens a host file an API caller named, only inside the directories the
//! operator allows, with no symbolic link anywhere in the path.
//!
//! Every component is opened relative to the one before it with `O_NOFOLLOW`,
//! and each directory passed is compared by (device, inode) with the allowed
//! and the always-refused directories, so neither a symlink, a `..` nor a bind
//! mount can lead outside. The caller copies from the returned descriptor:
//! what was checked is what is read.

use std::ffi::CString;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};

/// Where path imports may read from.
#[derive(Debug, Clone, Default)]
pub struct ImportPolicy {
    /// HATCH_IMAGE_IMPORT_DIRS; empty: path imports are off.
    pub allowed: Vec<PathBuf>,
    /// Never read below these, whatever `allowed` says (/proc, /sys, /dev, the data dir).
    pub refused: Vec<PathBuf>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PathRefused {
    #[error("path imports are not enabled on this server")]
    Disabled,
    #[error("not an absolute path")]
    NotAbsolute,
    /// Missing, outside the allowed directories, through a symlink, not a
    /// regular file, unreadable: one answer for all, so that a refusal never
    /// tells whether a host path exists.
    #[error("not an importable file")]
    NotImportable,
}

/// Filesystems whose files are the kernel's or a device's view, never an image.
const PSEUDO_FS: &[i64] = &[
    0x9fa0,      // proc
    0x6265_6572, // sysfs
    0x1cd1,      // devpts
    0x6462_6720, // debugfs
    0x7472_6163, // tracefs
    0x7363_6673, // securityfs
    0x0027_e0eb, // cgroup
    0x6367_7270, // cgroup2
    0xcafe_4a11, // bpf
    0x6265_6570, // configfs
    0xde5e_81e4, // efivarfs
    0x6165_676c, // pstore
];

type Identity = (u64, u64);

fn identity_of(fd: &OwnedFd) -> Option<(Identity, u32)> {
    // SAFETY: an all-zero `stat` is a valid value for fstat to overwrite.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `fd` is an open descriptor and `st` a writable stat buffer.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
        return None;
    }
    Some(((st.st_dev, st.st_ino), st.st_mode))
}

fn open_at(dir: &OwnedFd, name: &std::ffi::OsStr, flags: i32) -> Option<OwnedFd> {
    let name = CString::new(name.as_bytes()).ok()?;
    // SAFETY: `dir` is an open directory descriptor and `name` a NUL-terminated string.
    let fd = unsafe { libc::openat(dir.as_raw_fd(), name.as_ptr(), flags | libc::O_CLOEXEC) };
    if fd < 0 {
        return None;
    }
    // SAFETY: openat just returned this descriptor and nothing else owns it.
    Some(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn fs_type(fd: &OwnedFd) -> Option<i64> {
    // SAFETY: an all-zero `statfs` is a valid value for fstatfs to overwrite.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `fd` is an open descriptor and `st` a writable statfs buffer.
    if unsafe { libc::fstatfs(fd.as_raw_fd(), &mut st) } != 0 {
        return None;
    }
    Some(st.f_type as i64)
}

/// Opens `path` for reading under `policy`, or says why not (see [`PathRefused`]).
pub fn open_for_import(path: &Path, policy: &ImportPolicy) -> Result<File, PathRefused> {
    if policy.allowed.is_empty() {
        return Err(PathRefused::Disabled);
    }
    if !path.is_absolute() {
        return Err(PathRefused::NotAbsolute);
    }
    let refused = PathRefused::NotImportable;
    // The operator's directories are trusted configuration: their own symlinks are followed.
    let ids = |dirs: &[PathBuf]| -> Vec<Identity> {
        dirs.iter()
            .filter_map(|d| std::fs::metadata(d).ok())
            .map(|m| (m.dev(), m.ino()))
            .collect()
    };
    let allowed = ids(&policy.allowed);
    let forbidden = ids(&policy.refused);
    let mut names = vec![];
    for c in path.components() {
        match c {
            Component::RootDir => {}
            Component::Normal(n) => names.push(n),
            // `..` could climb out of a checked directory; `.` never reaches here.
            _ => return Err(refused),
        }
    }
    let Some((file_name, dirs)) = names.split_last() else {
        return Err(refused);
    };
    // SAFETY: a constant NUL-terminated path; the result is checked below.
    let root = unsafe {
        libc::open(
            c"/".as_ptr(),
            libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    if root < 0 {
        return Err(refused);
    }
    // SAFETY: open just returned this descriptor and nothing else owns it.
    let root = unsafe { OwnedFd::from_raw_fd(root) };
    let mut inside = false;
    let mut visit = |fd: &OwnedFd| -> Result<(), PathRefused> {
        let (id, mode) = identity_of(fd).ok_or(PathRefused::NotImportable)?;
        if mode & libc::S_IFMT != libc::S_IFDIR || forbidden.contains(&id) {
            return Err(PathRefused::NotImportable);
        }
        inside |= allowed.contains(&id);
        Ok(())
    };
    visit(&root)?;
    let mut dir = root;
    for name in dirs {
        let next = open_at(
            &dir,
            name,
            libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW,
        )
        .ok_or(PathRefused::NotImportable)?;
        visit(&next)?;
        dir = next;
    }
    if !inside {
        return Err(refused);
    }
    // O_NONBLOCK: opening a FIFO someone left there must not hang the request.
    let fd = open_at(
        &dir,
        file_name,
        libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY,
    )
    .ok_or(PathRefused::NotImportable)?;
    let (id, mode) = identity_of(&fd).ok_or(PathRefused::NotImportable)?;
    if mode & libc::S_IFMT != libc::S_IFREG || forbidden.contains(&id) {
        return Err(refused);
    }
    match fs_type(&fd) {
        Some(t) if !PSEUDO_FS.contains(&t) => Ok(File::from(fd)),
        _ => Err(refused),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    struct Tmp(PathBuf);
    impl Drop for Tmp {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn tmp() -> Tmp {
        let p =
            std::env::temp_dir().join(format!("hatch-hostpath-{}", crate::ids::random_string(8)));
        std::fs::create_dir_all(&p).unwrap();
        Tmp(p)
    }

    #[test]
    fn only_regular_files_inside_allowed_dirs_without_symlinks() {
        let t = tmp();
        let allowed = t.0.join("allowed");
        let data = t.0.join("data");
        let outside = t.0.join("outside");
        for d in [&allowed, &data, &outside, &allowed.join("sub")] {
            std::fs::create_dir_all(d).unwrap();
        }
        std::fs::write(allowed.join("sub/vmlinuz"), b"k").unwrap();
        std::fs::write(outside.join("secret"), b"s").unwrap();
        std::fs::write(data.join("hatch.db"), b"db").unwrap();
        symlink(outside.join("secret"), allowed.join("link")).unwrap();
        symlink(&outside, allowed.join("dirlink")).unwrap();
        symlink(&data, allowed.join("datalink")).unwrap();
        let policy = ImportPolicy {
            allowed: vec![allowed.clone(), data.clone()],
            refused: vec![data.clone(), "/proc".into()],
        };
        let open = |p: &Path| open_for_import(p, &policy).map(|_| ());
        assert_eq!(open(&allowed.join("sub/vmlinuz")), Ok(()));
        assert_eq!(open(&allowed.join("./sub/vmlinuz")), Ok(()));
        for bad in [
            outside.join("secret"),
            allowed.join("link"),
            allowed.join("dirlink/secret"),
            allowed.join("datalink/hatch.db"),
            allowed.join("sub/../../outside/secret"),
            allowed.join("missing"),
            allowed.join("sub"),
            data.join("hatch.db"),
        ] {
            assert_eq!(open(&bad), Err(PathRefused::NotImportable), "{bad:?}");
        }
        assert_eq!(
            open(Path::new("sub/vmlinuz")),
            Err(PathRefused::NotAbsolute)
        );
        let off = ImportPolicy::default();
        assert_eq!(
            open_for_import(&allowed.join("sub/vmlinuz"), &off).map(|_| ()),
            Err(PathRefused::Disabled)
        );
        // Allowing / still refuses what lies under the refused directories.
        let root = ImportPolicy {
            allowed: vec!["/".into()],
            refused: vec!["/proc".into(), data.clone()],
        };
        assert!(open_for_import(Path::new("/proc/self/environ"), &root).is_err());
        assert!(open_for_import(&data.join("hatch.db"), &root).is_err());
        assert!(open_for_import(&allowed.join("sub/vmlinuz"), &root).is_ok());
    }
}

//! A writer of the newc cpio archives the kernel unpacks as its initramfs.

use std::collections::BTreeSet;

/// Writer for the "newc" cpio format the kernel unpacks into its initramfs:
/// a 110-byte ASCII header ("070701" + 13 eight-digit hex fields), the
/// NUL-terminated name, then the data, each padded to 4 bytes.
#[derive(Default)]
pub(super) struct Cpio {
    buf: Vec<u8>,
    next_ino: u32,
    dirs: BTreeSet<String>,
}

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;

impl Cpio {
    pub(super) fn dir(&mut self, path: &str, perm: u32) {
        let path = path.trim_matches('/');
        if self.dirs.contains(path) {
            return;
        }
        self.parents(path);
        self.dirs.insert(path.to_string());
        self.entry(path, S_IFDIR | perm, 2, (0, 0), &[]);
    }

    pub(super) fn file(&mut self, path: &str, perm: u32, data: &[u8]) {
        self.parents(path);
        self.entry(path, S_IFREG | perm, 1, (0, 0), data);
    }

    pub(super) fn symlink(&mut self, path: &str, target: &str) {
        self.parents(path);
        self.entry(path, S_IFLNK | 0o777, 1, (0, 0), target.as_bytes());
    }

    pub(super) fn char_dev(&mut self, path: &str, perm: u32, major: u32, minor: u32) {
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

    pub(super) fn finish(mut self) -> Vec<u8> {
        self.next_ino = 0;
        self.entry("TRAILER!!!", 0, 1, (0, 0), &[]);
        self.buf
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
}

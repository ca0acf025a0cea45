//! Checks that an image's files are what they claim: an x86 kernel, an ext4 or
//! self-contained qcow2 root disk. Only headers are read, by us, never by an image tool.

use std::fs::File;
use std::os::unix::fs::FileExt;

/// The two kernel formats our backends boot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelKind {
    /// x86 boot protocol image (`HdrS` at 0x202), what a PC-style VMM loads.
    BzImage,
    /// Uncompressed 64-bit x86 ELF (`vmlinux`), what a minimal VMM loads.
    Elf,
}

impl KernelKind {
    /// The name the API shows (`kernels` of an image).
    pub fn api_name(self) -> &'static str {
        match self {
            KernelKind::BzImage => "bzImage",
            KernelKind::Elf => "elf",
        }
    }
}

/// How a root disk is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RootfsFormat {
    /// A raw ext2/3/4 filesystem image.
    Ext4,
    /// A qcow2 image with no backing file and no external data file.
    Qcow2,
}

const EM_X86_64: u16 = 62;
const QCOW2_MAGIC: &[u8; 4] = b"QFI\xfb";
const EXT4_MAGIC: u16 = 0xEF53;
/// qcow2 incompatible feature bit: the guest data lives in an external file.
const QCOW2_EXTERNAL_DATA_FILE: u64 = 1 << 2;
/// The incompatible feature bits the qcow2 format defines (dirty, corrupt, external
/// data, compression type, extended L2); anything else cannot be opened anyway.
const QCOW2_KNOWN_INCOMPATIBLE: u64 = 0b1_1111;
/// Header extension types that name another host file.
const QCOW2_EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
const QCOW2_EXT_DATA_FILE: u32 = 0x4441_5441;

fn read_at(file: &File, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    let mut got = 0;
    while got < len {
        match file.read_at(&mut buf[got..], offset + got as u64) {
            Ok(0) | Err(_) => break,
            Ok(n) => got += n,
        }
    }
    buf.truncate(got);
    buf
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
}
fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

/// Is this the start of a kernel we can boot?
pub fn kernel_kind(head: &[u8]) -> Result<KernelKind, String> {
    if head.len() >= 0x206 && &head[0x202..0x206] == b"HdrS" && head[0x1fe..0x200] == [0x55, 0xaa] {
        return Ok(KernelKind::BzImage);
    }
    if head.len() >= 20 && &head[..4] == b"\x7fELF" {
        // ELFCLASS64, little-endian, x86-64.
        let machine = u16::from_le_bytes([head[18], head[19]]);
        if head[4] == 2 && head[5] == 1 && machine == EM_X86_64 {
            return Ok(KernelKind::Elf);
        }
        return Err("kernel is an ELF file but not a 64-bit x86 one".into());
    }
    Err("kernel is not an x86 kernel: neither a bzImage (boot header \"HdrS\" at 0x202) nor an ELF vmlinux".into())
}

pub fn check_kernel(file: &File) -> Result<KernelKind, String> {
    kernel_kind(&read_at(file, 0, 0x400))
}

/// What kind of root disk `file` holds, or why it cannot be one.
pub fn check_rootfs(file: &File) -> Result<RootfsFormat, String> {
    let head = read_at(file, 0, 4096);
    if head.len() >= 4 && &head[..4] == QCOW2_MAGIC {
        check_qcow2(file, &head)?;
        return Ok(RootfsFormat::Qcow2);
    }
    if head.len() >= 2048 {
        let sb = &head[1024..2048];
        let magic = u16::from_le_bytes([sb[56], sb[57]]);
        let blocks = u32::from_le_bytes(sb[4..8].try_into().unwrap());
        let log_block = u32::from_le_bytes(sb[24..28].try_into().unwrap());
        if magic == EXT4_MAGIC && blocks > 0 && log_block <= 6 {
            return Ok(RootfsFormat::Ext4);
        }
    }
    Err("rootfs is neither an ext4 filesystem image nor a qcow2 image".into())
}

/// A qcow2 image is refused if opening it would make the VMM open another host
/// file (a backing file or an external data file) or if it is encrypted.
fn check_qcow2(file: &File, head: &[u8]) -> Result<(), String> {
    if head.len() < 72 {
        return Err("rootfs: truncated qcow2 header".into());
    }
    let version = be32(head, 4);
    if version != 2 && version != 3 {
        return Err(format!("rootfs: qcow2 version {version} is not supported"));
    }
    if be64(head, 8) != 0 || be32(head, 16) != 0 {
        return Err("rootfs: a qcow2 image with a backing file is refused; flatten it first (qemu-img convert -O qcow2)".into());
    }
    if be32(head, 32) != 0 {
        return Err("rootfs: encrypted qcow2 images are not supported".into());
    }
    let cluster_bits = be32(head, 20);
    if !(9..=21).contains(&cluster_bits) {
        return Err("rootfs: invalid qcow2 cluster size".into());
    }
    let ext_start = if version == 3 {
        if head.len() < 104 {
            return Err("rootfs: truncated qcow2 header".into());
        }
        let incompatible = be64(head, 72);
        if incompatible & QCOW2_EXTERNAL_DATA_FILE != 0 {
            return Err("rootfs: a qcow2 image with an external data file is refused".into());
        }
        if incompatible & !QCOW2_KNOWN_INCOMPATIBLE != 0 {
            return Err("rootfs: the qcow2 image uses unknown incompatible features".into());
        }
        be32(head, 100) as u64
    } else {
        72
    };
    // Header extensions lie in the first cluster, each 8-byte aligned.
    let cluster = 1u64 << cluster_bits;
    let area = read_at(file, 0, cluster.min(2 << 20) as usize);
    let mut at = ext_start as usize;
    while at + 8 <= area.len() {
        let kind = be32(&area, at);
        let len = be32(&area, at + 4) as usize;
        match kind {
            0 => return Ok(()),
            QCOW2_EXT_BACKING_FORMAT => {
                return Err("rootfs: a qcow2 image with a backing file is refused".into())
            }
            QCOW2_EXT_DATA_FILE => {
                return Err("rootfs: a qcow2 image with an external data file is refused".into())
            }
            _ => at += 8 + len.div_ceil(8) * 8,
        }
    }
    Err("rootfs: the qcow2 header extensions are not terminated".into())
}

/// The first bytes of each kernel format, for tests that need a kernel file.
#[cfg(test)]
pub(crate) mod samples {
    /// An x86 bzImage's head: the boot sector signature and `HdrS`.
    pub(crate) fn bzimage_head() -> Vec<u8> {
        let mut head = vec![0u8; 0x400];
        head[0x1fe..0x200].copy_from_slice(&[0x55, 0xaa]);
        head[0x202..0x206].copy_from_slice(b"HdrS");
        head
    }

    /// An x86-64 ELF's head (ELFCLASS64, little-endian, EM_X86_64).
    pub(crate) fn elf_head() -> Vec<u8> {
        let mut head = vec![0u8; 64];
        head[..4].copy_from_slice(b"\x7fELF");
        head[4] = 2;
        head[5] = 1;
        head[18] = 62;
        head
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn file_with(bytes: &[u8]) -> File {
        let mut f = tempfile();
        f.write_all(bytes).unwrap();
        f
    }

    fn tempfile() -> File {
        let p =
            std::env::temp_dir().join(format!("hatch-content-{}", crate::ids::random_string(8)));
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&p)
            .unwrap();
        std::fs::remove_file(&p).unwrap();
        f
    }

    #[test]
    fn kernels() {
        let mut bz = vec![0u8; 0x400];
        bz[0x1fe] = 0x55;
        bz[0x1ff] = 0xaa;
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        assert_eq!(kernel_kind(&bz), Ok(KernelKind::BzImage));
        bz[0x202] = b'X';
        assert!(kernel_kind(&bz).is_err());
        let mut elf = vec![0u8; 64];
        elf[..4].copy_from_slice(b"\x7fELF");
        elf[4] = 2;
        elf[5] = 1;
        elf[18] = 62;
        assert_eq!(kernel_kind(&elf), Ok(KernelKind::Elf));
        elf[18] = 183; // aarch64
        assert!(kernel_kind(&elf).is_err());
        assert!(kernel_kind(b"root:$y$j9T$...:19000:0:99999:7:::\n").is_err());
        assert!(kernel_kind(b"").is_err());
    }

    fn qcow2(version: u32) -> Vec<u8> {
        let mut h = vec![0u8; 4096];
        h[..4].copy_from_slice(QCOW2_MAGIC);
        h[4..8].copy_from_slice(&version.to_be_bytes());
        h[20..24].copy_from_slice(&16u32.to_be_bytes());
        if version == 3 {
            h[100..104].copy_from_slice(&112u32.to_be_bytes());
        }
        h
    }

    #[test]
    fn qcow2_headers() {
        let ok = qcow2(3);
        assert_eq!(check_rootfs(&file_with(&ok)), Ok(RootfsFormat::Qcow2));
        assert_eq!(check_rootfs(&file_with(&qcow2(2))), Ok(RootfsFormat::Qcow2));
        let mut backing = ok.clone();
        backing[8..16].copy_from_slice(&512u64.to_be_bytes());
        backing[16..20].copy_from_slice(&11u32.to_be_bytes());
        assert!(check_rootfs(&file_with(&backing))
            .unwrap_err()
            .contains("backing file"));
        let mut data_file = ok.clone();
        data_file[72..80].copy_from_slice(&QCOW2_EXTERNAL_DATA_FILE.to_be_bytes());
        assert!(check_rootfs(&file_with(&data_file))
            .unwrap_err()
            .contains("external data file"));
        // A data-file name extension without the feature bit is refused too.
        let mut ext = ok.clone();
        ext[112..116].copy_from_slice(&QCOW2_EXT_DATA_FILE.to_be_bytes());
        ext[116..120].copy_from_slice(&11u32.to_be_bytes());
        ext[120..131].copy_from_slice(b"/etc/shadow");
        assert!(check_rootfs(&file_with(&ext))
            .unwrap_err()
            .contains("external data file"));
        let mut unterminated = ok.clone();
        for b in unterminated[112..].chunks_mut(8) {
            b.copy_from_slice(&[0, 0, 0, 9, 0, 0, 0, 0]);
        }
        assert!(check_rootfs(&file_with(&unterminated)).is_err());
    }

    #[test]
    fn ext4_superblock() {
        let mut fs = vec![0u8; 4096];
        fs[1024 + 4..1024 + 8].copy_from_slice(&1024u32.to_le_bytes());
        fs[1024 + 24..1024 + 28].copy_from_slice(&2u32.to_le_bytes());
        fs[1024 + 56..1024 + 58].copy_from_slice(&EXT4_MAGIC.to_le_bytes());
        assert_eq!(check_rootfs(&file_with(&fs)), Ok(RootfsFormat::Ext4));
        fs[1024 + 56] = 0;
        assert!(check_rootfs(&file_with(&fs)).is_err());
        assert!(check_rootfs(&file_with(b"short")).is_err());
    }
}

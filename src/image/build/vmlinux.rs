//! `vmlinux`: the uncompressed ELF kernel inside a bzImage whose payload is LZ4.
//!
//! A bzImage is the real-mode setup code followed by the protected-mode code,
//! which holds the compressed kernel at `payload_offset` (setup header field at
//! 0x248, relative to the protected-mode code; `payload_length` at 0x24c,
//! boot protocol 2.08 and later). Debian's cloud kernel compresses it with
//! LZ4 in the legacy frame format (`lz4 -l`: magic 0x184C2102, then blocks
//! each prefixed by their compressed length, each at most 8 MiB decompressed)
//! and the kernel build appends the decompressed length as four bytes. That
//! length, the payload bounds and every block length are checked before they
//! are used, and the output never grows past a cap: a crafted file gives an
//! error, never a panic or an unbounded allocation.

use crate::image::content::{kernel_kind, KernelKind};

/// The legacy LZ4 frame's magic number (bytes `02 21 4C 18` in the file).
const LZ4_LEGACY_MAGIC: u32 = 0x184C_2102;
/// A legacy frame's blocks decompress to at most this many bytes.
const LZ4_LEGACY_BLOCK: usize = 8 << 20;
/// The most an x86-64 `vmlinux` may decompress to: Debian's is about 51 MiB.
pub(super) const VMLINUX_MAX_BYTES: usize = 512 << 20;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum VmlinuxError {
    #[error("not a bzImage (no \"HdrS\" boot header at 0x202)")]
    NotBzImage,
    #[error("boot protocol {0:#x} has no payload fields (2.08 or later needed)")]
    OldProtocol(u16),
    #[error("the payload (offset {offset}, {length} bytes) lies outside the {size}-byte file")]
    PayloadOutside { offset: u64, length: u64, size: u64 },
    #[error("the payload is not LZ4 in the legacy frame format (it starts with {0}); only LZ4 kernels are supported")]
    NotLz4(String),
    #[error("the LZ4 stream is truncated or corrupt at byte {0} of the payload")]
    Corrupt(usize),
    #[error("the kernel decompresses to more than {0} bytes")]
    TooLarge(usize),
    #[error("the kernel decompressed to {got} bytes, the payload says {expected}")]
    LengthMismatch { got: usize, expected: usize },
    #[error("the decompressed kernel is not a 64-bit x86 ELF: {0}")]
    NotElf(String),
}

fn le16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}
fn le32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// The compressed payload of a bzImage, found through its setup header.
fn payload(bzimage: &[u8]) -> Result<&[u8], VmlinuxError> {
    if kernel_kind(bzimage) != Ok(KernelKind::BzImage) {
        return Err(VmlinuxError::NotBzImage);
    }
    let version = le16(bzimage, 0x206).ok_or(VmlinuxError::NotBzImage)?;
    if version < 0x208 {
        return Err(VmlinuxError::OldProtocol(version));
    }
    // setup_sects == 0 means 4, for boot loaders older than the field.
    let setup_sects = match bzimage[0x1f1] {
        0 => 4,
        n => u64::from(n),
    };
    let offset = le32(bzimage, 0x248).ok_or(VmlinuxError::NotBzImage)?;
    let length = le32(bzimage, 0x24c).ok_or(VmlinuxError::NotBzImage)?;
    // In u64 so no sum of u32 fields can wrap.
    let start = (setup_sects + 1) * 512 + u64::from(offset);
    let end = start + u64::from(length);
    let size = bzimage.len() as u64;
    if end > size {
        return Err(VmlinuxError::PayloadOutside {
            offset: start,
            length: length.into(),
            size,
        });
    }
    Ok(&bzimage[start as usize..end as usize])
}

/// Decompresses a legacy LZ4 stream followed by its 4-byte decompressed
/// length (the kernel's `size_append`), producing at most `cap` bytes.
fn unlz4_legacy(payload: &[u8], cap: usize) -> Result<Vec<u8>, VmlinuxError> {
    if le32(payload, 0) != Some(LZ4_LEGACY_MAGIC) {
        let head: Vec<String> = payload.iter().take(4).map(|b| format!("{b:02x}")).collect();
        return Err(VmlinuxError::NotLz4(head.join(" ")));
    }
    if payload.len() < 8 {
        return Err(VmlinuxError::Corrupt(payload.len()));
    }
    let stream_end = payload.len() - 4;
    let expected = le32(payload, stream_end).unwrap_or_default() as usize;
    if expected > cap {
        return Err(VmlinuxError::TooLarge(cap));
    }
    // The trailer is untrusted: it sizes the reservation only up to the cap.
    let mut out = Vec::with_capacity(expected);
    let mut block = vec![0u8; LZ4_LEGACY_BLOCK];
    let bound =
        lz4::block::compress_bound(LZ4_LEGACY_BLOCK).map_err(|_| VmlinuxError::Corrupt(0))?;
    let mut at = 4;
    while at < stream_end {
        let len = le32(payload, at)
            .filter(|_| at + 4 <= stream_end)
            .ok_or(VmlinuxError::Corrupt(at))?;
        at += 4;
        // `lz4 -l` may concatenate frames: a magic where a length is due starts another.
        if len == LZ4_LEGACY_MAGIC {
            continue;
        }
        let len = len as usize;
        if len == 0 || len > bound || len > stream_end - at {
            return Err(VmlinuxError::Corrupt(at - 4));
        }
        // LZ4_decompress_safe: never writes past `block`, fails on a bad stream.
        let n = lz4::block::decompress_to_buffer(
            &payload[at..at + len],
            Some(LZ4_LEGACY_BLOCK as i32),
            &mut block,
        )
        .map_err(|_| VmlinuxError::Corrupt(at))?;
        if out.len() + n > cap {
            return Err(VmlinuxError::TooLarge(cap));
        }
        out.extend_from_slice(&block[..n]);
        at += len;
    }
    if out.len() != expected {
        return Err(VmlinuxError::LengthMismatch {
            got: out.len(),
            expected,
        });
    }
    Ok(out)
}

/// The x86-64 ELF kernel inside `bzimage`.
pub(crate) fn extract(bzimage: &[u8], cap: usize) -> Result<Vec<u8>, VmlinuxError> {
    let elf = unlz4_legacy(payload(bzimage)?, cap)?;
    match kernel_kind(&elf) {
        Ok(KernelKind::Elf) => Ok(elf),
        Ok(KernelKind::BzImage) => Err(VmlinuxError::NotElf("it is a bzImage".into())),
        Err(e) => Err(VmlinuxError::NotElf(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An x86-64 ELF header followed by `body`, as the payload's kernel.
    fn elf(body: &[u8]) -> Vec<u8> {
        let mut e = vec![0u8; 64];
        e[..4].copy_from_slice(b"\x7fELF");
        e[4] = 2;
        e[5] = 1;
        e[18] = 62;
        e.extend_from_slice(body);
        e
    }

    /// `data` as `lz4 -l` writes it, in blocks of `block` bytes, plus the length trailer.
    fn lz4_legacy(data: &[u8], block: usize) -> Vec<u8> {
        let mut s = LZ4_LEGACY_MAGIC.to_le_bytes().to_vec();
        for chunk in data.chunks(block) {
            let c = lz4::block::compress(chunk, None, false).unwrap();
            s.extend_from_slice(&(c.len() as u32).to_le_bytes());
            s.extend_from_slice(&c);
        }
        s.extend_from_slice(&(data.len() as u32).to_le_bytes());
        s
    }

    /// A bzImage of boot protocol 2.15 with `payload` 100 bytes into its
    /// protected-mode code (after 2 setup sectors and the boot sector).
    fn bzimage(payload: &[u8]) -> Vec<u8> {
        let mut b = vec![0u8; 3 * 512 + 100];
        b[0x1f1] = 2;
        b[0x1fe..0x200].copy_from_slice(&[0x55, 0xaa]);
        b[0x202..0x206].copy_from_slice(b"HdrS");
        b[0x206..0x208].copy_from_slice(&0x20fu16.to_le_bytes());
        b[0x248..0x24c].copy_from_slice(&100u32.to_le_bytes());
        b[0x24c..0x250].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        b.extend_from_slice(payload);
        b.extend_from_slice(b"trailing setup data");
        b
    }

    fn kernel() -> Vec<u8> {
        // Several blocks, one partial, with text lz4 really compresses.
        let body: Vec<u8> = (0..300_000u32)
            .flat_map(|i| (i % 251).to_le_bytes())
            .collect();
        elf(&body)
    }

    #[test]
    fn the_elf_comes_out_of_a_well_formed_bzimage() {
        let k = kernel();
        let got = extract(&bzimage(&lz4_legacy(&k, 256 << 10)), 1 << 30).unwrap();
        assert_eq!(got, k);
        // Concatenated frames (a magic where a block length is due) are one stream.
        let mut two = lz4_legacy(&k[..500_000], 1 << 20);
        two.truncate(two.len() - 4);
        let second = lz4_legacy(&k[500_000..], 1 << 20);
        two.extend_from_slice(&second[..second.len() - 4]);
        two.extend_from_slice(&(k.len() as u32).to_le_bytes());
        assert_eq!(extract(&bzimage(&two), 1 << 30).unwrap(), k);
    }

    #[test]
    fn a_payload_outside_the_file_is_refused() {
        let mut b = bzimage(&lz4_legacy(&kernel(), 1 << 20));
        let len = b.len();
        b[0x24c..0x250].copy_from_slice(&(len as u32).to_le_bytes());
        assert!(matches!(
            extract(&b, 1 << 30),
            Err(VmlinuxError::PayloadOutside { .. })
        ));
        // Offsets near u32::MAX must not wrap around to a valid range: this
        // one added to the 1536 bytes before it would be 0 in 32 bits.
        b[0x248..0x24c].copy_from_slice(&(u32::MAX - 1535).to_le_bytes());
        b[0x24c..0x250].copy_from_slice(&100u32.to_le_bytes());
        assert!(matches!(
            extract(&b, 1 << 30),
            Err(VmlinuxError::PayloadOutside { .. })
        ));
        b[0x248..0x250].copy_from_slice(&[0xff; 8]);
        assert!(matches!(
            extract(&b, 1 << 30),
            Err(VmlinuxError::PayloadOutside { .. })
        ));
        b[0x1f1] = 0xff;
        assert!(matches!(
            extract(&b, 1 << 30),
            Err(VmlinuxError::PayloadOutside { .. })
        ));
    }

    #[test]
    fn what_is_not_a_bzimage_with_an_lz4_elf_is_refused() {
        assert_eq!(extract(b"", 1 << 30), Err(VmlinuxError::NotBzImage));
        assert_eq!(extract(&kernel(), 1 << 30), Err(VmlinuxError::NotBzImage));
        let mut old = bzimage(&lz4_legacy(&kernel(), 1 << 20));
        old[0x206..0x208].copy_from_slice(&0x207u16.to_le_bytes());
        assert_eq!(
            extract(&old, 1 << 30),
            Err(VmlinuxError::OldProtocol(0x207))
        );
        // A gzip payload.
        let gz = bzimage(&[0x1f, 0x8b, 8, 0, 0, 0, 0, 0]);
        assert_eq!(
            extract(&gz, 1 << 30),
            Err(VmlinuxError::NotLz4("1f 8b 08 00".into()))
        );
        // An aarch64 ELF, then no ELF at all.
        let mut arm = kernel();
        arm[18] = 183;
        assert!(matches!(
            extract(&bzimage(&lz4_legacy(&arm, 1 << 20)), 1 << 30),
            Err(VmlinuxError::NotElf(_))
        ));
        let text = vec![b'k'; 5000];
        assert!(matches!(
            extract(&bzimage(&lz4_legacy(&text, 1 << 20)), 1 << 30),
            Err(VmlinuxError::NotElf(_))
        ));
    }

    #[test]
    fn a_truncated_or_corrupt_stream_is_an_error_not_a_panic() {
        let k = kernel();
        let stream = lz4_legacy(&k, 256 << 10);
        // Cut anywhere (the trailer then reads as garbage): always an error.
        for cut in [5, 8, 9, 100, stream.len() / 2, stream.len() - 5] {
            let mut s = stream[..cut].to_vec();
            s.extend_from_slice(&(k.len() as u32).to_le_bytes());
            assert!(extract(&bzimage(&s), 1 << 30).is_err(), "cut at {cut}");
        }
        assert!(matches!(
            extract(&bzimage(&stream[..6]), 1 << 30),
            Err(VmlinuxError::Corrupt(_))
        ));
        // Fewer than 4 bytes before the trailer: no block length to read
        // (read anyway, it would take the trailer's bytes for its own).
        let mut stub = LZ4_LEGACY_MAGIC.to_le_bytes().to_vec();
        stub.extend_from_slice(&[5, 0, 0, 0, 0, 0]);
        assert_eq!(
            extract(&bzimage(&stub), 1 << 30),
            Err(VmlinuxError::Corrupt(4))
        );
        // A block length past the end of the stream.
        let mut long = stream.clone();
        long[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(
            extract(&bzimage(&long), 1 << 30),
            Err(VmlinuxError::Corrupt(4))
        );
        // Garbage inside a block.
        let mut bad = stream.clone();
        for b in &mut bad[12..200] {
            *b = 0xff;
        }
        assert!(matches!(
            extract(&bzimage(&bad), 1 << 30),
            Err(VmlinuxError::Corrupt(_))
        ));
        // A trailer that does not match what the blocks gave.
        let mut short = stream.clone();
        let n = short.len();
        short[n - 4..].copy_from_slice(&(k.len() as u32 - 1).to_le_bytes());
        assert_eq!(
            extract(&bzimage(&short), 1 << 30),
            Err(VmlinuxError::LengthMismatch {
                got: k.len(),
                expected: k.len() - 1
            })
        );
    }

    #[test]
    fn the_output_never_grows_past_the_cap() {
        let k = kernel();
        let cap = k.len() - 1;
        // The trailer says too much (it also sizes the output buffer): refused.
        assert_eq!(
            extract(&bzimage(&lz4_legacy(&k, 256 << 10)), cap),
            Err(VmlinuxError::TooLarge(cap))
        );
        // The trailer lies low: the blocks themselves are stopped at the cap.
        let mut lying = lz4_legacy(&k, 256 << 10);
        let n = lying.len();
        lying[n - 4..].copy_from_slice(&16u32.to_le_bytes());
        assert_eq!(
            extract(&bzimage(&lying), cap),
            Err(VmlinuxError::TooLarge(cap))
        );
    }
}

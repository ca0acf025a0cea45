//! Receives an image's files into the data dir (streamed from an upload or
//! copied from a checked host file): sparse, size-capped, content-checked,
//! and moved into place by one rename. Dropped unfinished, it leaves nothing.

use super::content::{self, KernelKind, RootfsFormat};
use super::{kernel_file, INITRD_FILE, ROOTFS_FILE, ROOTFS_QCOW2_FILE, VMLINUX_FILE};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// One file of an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// A bzImage or an ELF kernel.
    Kernel,
    /// A second kernel, an ELF `vmlinux`, beside a bzImage `Kernel`.
    KernelElf,
    Initrd,
    Rootfs,
}

impl Part {
    /// The multipart field that carries this part.
    pub fn from_field(name: &str) -> Option<Part> {
        match name {
            "kernel" => Some(Part::Kernel),
            "kernel_elf" => Some(Part::KernelElf),
            "initrd" => Some(Part::Initrd),
            "rootfs" => Some(Part::Rootfs),
            _ => None,
        }
    }

    pub fn field(self) -> &'static str {
        match self {
            Part::Kernel => "kernel",
            Part::KernelElf => "kernel_elf",
            Part::Initrd => "initrd",
            Part::Rootfs => "rootfs",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StageError {
    /// The content or the shape of the request is wrong.
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    TooLarge(String),
    #[error("{0}")]
    Io(String),
}

fn io(what: &str) -> impl Fn(std::io::Error) -> StageError + '_ {
    move |e| StageError::Io(format!("{what}: {e}"))
}

/// What a sealed image directory holds.
#[derive(Debug)]
pub struct Sealed {
    pub dir: PathBuf,
    pub size_bytes: u64,
    pub has_initrd: bool,
}

/// Writes are gathered into blocks of this size, each written by the blocking pool.
const BLOCK: usize = 1 << 20;
/// Runs of zeros this long become holes instead of written blocks.
const HOLE: usize = 64 << 10;

static ZEROS: [u8; HOLE] = [0; HOLE];

/// Writes `buf` at the file's position, leaving all-zero runs as holes.
fn write_sparse(file: &mut File, buf: &[u8]) -> std::io::Result<()> {
    for piece in buf.chunks(HOLE) {
        // A slice comparison is one memcmp, fast even in a debug build.
        if piece == &ZEROS[..piece.len()] {
            file.seek(SeekFrom::Current(piece.len() as i64))?;
        } else {
            file.write_all(piece)?;
        }
    }
    Ok(())
}

/// The next data extent of `file` at or after `pos`: (start, end), or None
/// when only a hole (or nothing) follows.
fn next_extent(file: &File, pos: u64) -> std::io::Result<Option<(u64, u64)>> {
    use std::os::fd::AsRawFd;
    let fd = file.as_raw_fd();
    // SAFETY: lseek on an open descriptor; the result is checked.
    let data = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_DATA) };
    if data < 0 {
        let e = std::io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ENXIO) => Ok(None),
            _ => Err(e),
        };
    }
    // SAFETY: as above.
    let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
    if hole < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(Some((data as u64, hole as u64)))
}

struct Current {
    part: Part,
    file: Option<File>,
    pending: Vec<u8>,
    len: u64,
}

pub struct Staging {
    /// `images/{id}`: removed whole unless the image is kept.
    root: PathBuf,
    /// `images/{id}/staging`, where files arrive.
    dir: PathBuf,
    max_bytes: u64,
    total: u64,
    received: Vec<Part>,
    current: Option<Current>,
    kept: bool,
}

impl Staging {
    /// Starts receiving the files of an image whose directory is `root`.
    pub async fn new(root: PathBuf, max_bytes: u64) -> Result<Staging, StageError> {
        let dir = root.join("staging");
        tokio::fs::create_dir_all(&dir)
            .await
            .map_err(io("creating the image directory"))?;
        Ok(Staging {
            root,
            dir,
            max_bytes,
            total: 0,
            received: vec![],
            current: None,
            kept: false,
        })
    }

    fn too_large(&self) -> StageError {
        StageError::TooLarge(format!(
            "the image is larger than this server's limit of {} bytes (HATCH_IMAGE_MAX_BYTES)",
            self.max_bytes
        ))
    }

    /// Counts `n` more bytes against the limit.
    fn take(&mut self, n: u64) -> Result<(), StageError> {
        match self.total.checked_add(n) {
            Some(t) if t <= self.max_bytes => {
                self.total = t;
                Ok(())
            }
            _ => Err(self.too_large()),
        }
    }

    fn staged(&self, part: Part) -> PathBuf {
        self.dir.join(part.field())
    }

    /// Starts receiving `part`; each part may come once.
    pub async fn begin(&mut self, part: Part) -> Result<(), StageError> {
        self.end().await?;
        if self.received.contains(&part) {
            return Err(StageError::Invalid(format!(
                "{} was given more than once",
                part.field()
            )));
        }
        self.received.push(part);
        let file = File::create(self.staged(part)).map_err(io("creating an image file"))?;
        self.current = Some(Current {
            part,
            file: Some(file),
            pending: Vec::with_capacity(BLOCK),
            len: 0,
        });
        Ok(())
    }

    async fn flush(cur: &mut Current) -> Result<(), StageError> {
        let mut file = cur
            .file
            .take()
            .expect("the staged file is present between writes");
        let buf = std::mem::take(&mut cur.pending);
        let (file, buf, result) = tokio::task::spawn_blocking(move || {
            let r = write_sparse(&mut file, &buf);
            (file, buf, r)
        })
        .await
        .map_err(|e| StageError::Io(e.to_string()))?;
        cur.file = Some(file);
        cur.pending = buf;
        cur.pending.clear();
        result.map_err(io("writing an image file"))
    }

    /// Appends bytes to the part being received.
    pub async fn write(&mut self, chunk: &[u8]) -> Result<(), StageError> {
        self.take(chunk.len() as u64)?;
        let cur = self
            .current
            .as_mut()
            .expect("write is only called between begin and end");
        cur.len += chunk.len() as u64;
        let mut rest = chunk;
        while !rest.is_empty() {
            let n = rest.len().min(BLOCK - cur.pending.len());
            cur.pending.extend_from_slice(&rest[..n]);
            rest = &rest[n..];
            if cur.pending.len() == BLOCK {
                Self::flush(cur).await?;
            }
        }
        Ok(())
    }

    /// Finishes the part being received, if any.
    pub async fn end(&mut self) -> Result<(), StageError> {
        let Some(mut cur) = self.current.take() else {
            return Ok(());
        };
        Self::flush(&mut cur).await?;
        let file = cur.file.take().expect("flush puts the file back");
        let len = cur.len;
        tokio::task::spawn_blocking(move || {
            // A trailing hole is only a seek: the length makes it part of the file.
            file.set_len(len)?;
            file.sync_all()
        })
        .await
        .map_err(|e| StageError::Io(e.to_string()))?
        .map_err(io("finishing an image file"))?;
        tracing::debug!(part = cur.part.field(), len, "image part received");
        Ok(())
    }

    /// Copies `part` from an open host file (see `hostpath`), within the limit.
    pub async fn copy_from(&mut self, part: Part, mut src: File) -> Result<(), StageError> {
        self.end().await?;
        let size = src.metadata().map_err(io("reading a source file"))?.len();
        // Checked up front so an oversized file is refused before any copying;
        // the copy below still counts what it really reads (the file may grow).
        if self.total.saturating_add(size) > self.max_bytes {
            return Err(self.too_large());
        }
        self.begin(part).await?;
        let budget = self.max_bytes - self.total;
        let dest = self.staged(part);
        let copied = tokio::task::spawn_blocking(move || -> std::io::Result<Option<u64>> {
            let mut out = std::fs::OpenOptions::new().write(true).open(&dest)?;
            let mut buf = vec![0u8; BLOCK];
            let mut pos = 0u64;
            // Only the source's data extents are read; its holes stay holes.
            while let Some((data, hole)) = next_extent(&src, pos)? {
                src.seek(SeekFrom::Start(data))?;
                out.seek(SeekFrom::Start(data))?;
                pos = data;
                while pos < hole {
                    let want = (hole - pos).min(BLOCK as u64) as usize;
                    let n = src.read(&mut buf[..want])?;
                    if n == 0 {
                        break;
                    }
                    pos += n as u64;
                    if pos > budget {
                        return Ok(None);
                    }
                    write_sparse(&mut out, &buf[..n])?;
                }
            }
            let len = src.metadata()?.len().max(pos);
            if len > budget {
                return Ok(None);
            }
            out.set_len(len)?;
            out.sync_all()?;
            Ok(Some(len))
        })
        .await
        .map_err(|e| StageError::Io(e.to_string()))?
        .map_err(io("copying a source file"))?;
        // The part is complete on disk; nothing is pending for `end`.
        self.current = None;
        match copied {
            Some(n) => self.take(n),
            None => Err(self.too_large()),
        }
    }

    /// Checks the received files and moves them into `images/{id}/{version}`.
    pub async fn seal(mut self) -> Result<Sealed, StageError> {
        self.end().await?;
        for required in [Part::Kernel, Part::Rootfs] {
            if !self.received.contains(&required) {
                return Err(StageError::Invalid(format!(
                    "{} is required",
                    required.field()
                )));
            }
        }
        let kernel = self.staged(Part::Kernel);
        let kernel_elf = self
            .received
            .contains(&Part::KernelElf)
            .then(|| self.staged(Part::KernelElf));
        let rootfs = self.staged(Part::Rootfs);
        let (kind, format) = tokio::task::spawn_blocking(move || {
            let open = |p: &Path| File::open(p).map_err(io("reading a staged file"));
            let kind = content::check_kernel(&open(&kernel)?).map_err(StageError::Invalid)?;
            if let Some(elf) = kernel_elf {
                check_second_kernel(kind, &open(&elf)?)?;
            }
            let format = content::check_rootfs(&open(&rootfs)?).map_err(StageError::Invalid)?;
            Ok::<_, StageError>((kind, format))
        })
        .await
        .map_err(|e| StageError::Io(e.to_string()))??;
        let rootfs_name = match format {
            RootfsFormat::Ext4 => ROOTFS_FILE,
            RootfsFormat::Qcow2 => ROOTFS_QCOW2_FILE,
        };
        let has_initrd = self.received.contains(&Part::Initrd);
        // Each kernel is stored under the name of its format (see `kernel_for`).
        let mut moves = vec![
            (Part::Kernel, kernel_file(kind)),
            (Part::Rootfs, rootfs_name),
        ];
        if self.received.contains(&Part::KernelElf) {
            moves.push((Part::KernelElf, VMLINUX_FILE));
        }
        if has_initrd {
            moves.push((Part::Initrd, INITRD_FILE));
        }
        for (part, name) in moves {
            tokio::fs::rename(self.staged(part), self.dir.join(name))
                .await
                .map_err(io("naming an image file"))?;
        }
        let dir = self.root.join(crate::ids::random_string(16));
        tokio::fs::rename(&self.dir, &dir)
            .await
            .map_err(io("moving the image into place"))?;
        self.kept = true;
        Ok(Sealed {
            dir,
            size_bytes: self.total,
            has_initrd,
        })
    }
}

/// `kernel_elf` must be an ELF, and `kernel` (of format `first`) then a
/// bzImage: an image holds at most one kernel of each format.
fn check_second_kernel(first: KernelKind, elf: &File) -> Result<(), StageError> {
    match content::check_kernel(elf) {
        Ok(KernelKind::Elf) => {}
        Ok(KernelKind::BzImage) => {
            return Err(StageError::Invalid(
                "kernel_elf is a bzImage: it must be an uncompressed x86-64 ELF (vmlinux); \
                 give the bzImage as kernel"
                    .into(),
            ))
        }
        Err(e) => return Err(StageError::Invalid(format!("kernel_elf: {e}"))),
    }
    if first == KernelKind::Elf {
        return Err(StageError::Invalid(
            "kernel and kernel_elf are both ELF kernels: kernel must then be a bzImage".into(),
        ));
    }
    Ok(())
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.kept {
            // Synchronous on purpose: once the request has its answer, nothing is left.
            let _ = std::fs::remove_dir_all(&self.root);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{FileExt, MetadataExt};

    #[tokio::test]
    async fn copies_keep_content_and_holes_and_respect_the_cap() {
        let root =
            std::env::temp_dir().join(format!("hatch-staging-{}", crate::ids::random_string(8)));
        let src_path = std::env::temp_dir().join(format!(
            "hatch-staging-src-{}",
            crate::ids::random_string(8)
        ));
        let src = File::create(&src_path).unwrap();
        // 64 MiB long: a few bytes at the start, in the middle, and a hole at the end.
        src.write_all_at(b"start", 0).unwrap();
        src.write_all_at(b"middle", 32 << 20).unwrap();
        src.set_len(64 << 20).unwrap();
        drop(src);

        let mut s = Staging::new(root.clone(), 64 << 20).await.unwrap();
        s.copy_from(Part::Rootfs, File::open(&src_path).unwrap())
            .await
            .unwrap();
        let copy = s.staged(Part::Rootfs);
        let m = std::fs::metadata(&copy).unwrap();
        assert_eq!(m.len(), 64 << 20);
        assert!(
            m.blocks() * 512 < 4 << 20,
            "holes kept: {} allocated",
            m.blocks() * 512
        );
        let f = File::open(&copy).unwrap();
        let mut buf = [0u8; 6];
        f.read_exact_at(&mut buf, 32 << 20).unwrap();
        assert_eq!(&buf, b"middle");
        f.read_exact_at(&mut buf[..5], 0).unwrap();
        assert_eq!(&buf[..5], b"start");
        // One byte more than the limit allows is refused, and dropping leaves nothing.
        let e = s
            .copy_from(Part::Kernel, File::open(&src_path).unwrap())
            .await
            .unwrap_err();
        assert!(matches!(e, StageError::TooLarge(_)), "{e}");
        drop(s);
        assert!(!root.exists());

        let mut s = Staging::new(root.clone(), 1 << 20).await.unwrap();
        s.begin(Part::Kernel).await.unwrap();
        s.write(&[1u8; 1 << 19]).await.unwrap();
        s.write(&[0u8; 1 << 19]).await.unwrap();
        assert!(matches!(
            s.write(&[0u8; 1]).await,
            Err(StageError::TooLarge(_))
        ));
        drop(s);
        assert!(!root.exists());
        std::fs::remove_file(&src_path).unwrap();
    }
}

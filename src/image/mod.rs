//! Images: kernel/initrd/rootfs sets imported into the data dir, per-VM disks,
//! and the builder of the default image.
//!
//! An image's files are copied (reflink when the filesystem can, sparse
//! otherwise) into `images/{id}/{fingerprint}/` at registration, so a user
//! editing or deleting the source files never corrupts a VM built on them.
//! API callers upload them or name them inside HATCH_IMAGE_IMPORT_DIRS
//! (`hostpath`); either way they arrive through `staging` and are checked
//! by `content`.

pub mod build;
pub mod content;
pub mod debian;
pub mod hostpath;
pub mod seed;
pub mod staging;

use content::KernelKind;
use sha2::{Digest, Sha256};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use tokio::process::Command;

/// The image's bzImage kernel (what a PC-type machine boots).
pub const KERNEL_FILE: &str = "vmlinuz";
/// The image's uncompressed ELF kernel (what a minimal VMM boots).
pub const VMLINUX_FILE: &str = "vmlinux";
pub const INITRD_FILE: &str = "initrd.img";
pub const ROOTFS_FILE: &str = "rootfs.ext4";
/// The root disk of an image registered as qcow2 (checked self-contained).
pub const ROOTFS_QCOW2_FILE: &str = "rootfs.qcow2";

/// Source files of an image, as the user named them.
#[derive(Debug, Clone)]
pub struct ImageSource {
    pub kernel: PathBuf,
    /// A second kernel, an ELF `vmlinux`, beside a bzImage `kernel`.
    pub kernel_elf: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    pub rootfs: PathBuf,
}

/// Checks one path of the operator's own configuration (the default image):
/// absolute, an existing regular file we can read. Never for API callers'
/// paths: those go through `hostpath`.
pub fn check_source_path(field: &str, path: &str) -> Result<PathBuf, String> {
    let p = PathBuf::from(path);
    if !p.is_absolute() {
        return Err(format!("{field} must be an absolute path, got {path:?}"));
    }
    let meta = std::fs::metadata(&p).map_err(|e| format!("{field} {path:?}: {e}"))?;
    if !meta.is_file() {
        return Err(format!("{field} {path:?} is not a regular file"));
    }
    std::fs::File::open(&p).map_err(|e| format!("{field} {path:?}: {e}"))?;
    Ok(p)
}

impl ImageSource {
    /// Size and modification time of each file, hashed: changes when any file is replaced.
    pub fn fingerprint(&self) -> std::io::Result<String> {
        let mut h = Sha256::new();
        for p in [
            Some(&self.kernel),
            self.kernel_elf.as_ref(),
            self.initrd.as_ref(),
            Some(&self.rootfs),
        ]
        .into_iter()
        .flatten()
        {
            let m = std::fs::metadata(p)?;
            h.update(p.as_os_str().as_encoded_bytes());
            h.update(m.len().to_le_bytes());
            h.update(m.mtime().to_le_bytes());
            h.update(m.mtime_nsec().to_le_bytes());
        }
        Ok(hex::encode(&h.finalize()[..8]))
    }
}

/// The files inside an imported image directory.
pub fn kernel_in(dir: &Path) -> PathBuf {
    dir.join(KERNEL_FILE)
}

/// The file a kernel of `kind` is stored under in an image directory.
pub fn kernel_file(kind: KernelKind) -> &'static str {
    match kind {
        KernelKind::BzImage => KERNEL_FILE,
        KernelKind::Elf => VMLINUX_FILE,
    }
}

/// The kernels an image directory holds, each with the format its header
/// shows. Images registered before kernels were named by format keep any
/// kernel (an ELF too) as `vmlinuz`: the header, not the name, decides.
/// A file whose format cannot be read is left out.
pub fn kernels_in(dir: &Path) -> Vec<(KernelKind, PathBuf)> {
    [KERNEL_FILE, VMLINUX_FILE]
        .into_iter()
        .map(|name| dir.join(name))
        .filter_map(|p| {
            let kind = content::check_kernel(&std::fs::File::open(&p).ok()?).ok()?;
            Some((kind, p))
        })
        .collect()
}

/// The kernel a backend that boots `formats` (preferred first) should
/// load from the image in `dir`: the first format it names that the image
/// has. None when the image has no kernel in any of them.
pub fn kernel_for(dir: &Path, formats: &[KernelKind]) -> Option<PathBuf> {
    let kernels = kernels_in(dir);
    formats.iter().find_map(|wanted| {
        kernels
            .iter()
            .find(|(kind, _)| kind == wanted)
            .map(|(_, p)| p.clone())
    })
}
pub fn initrd_in(dir: &Path) -> Option<PathBuf> {
    let p = dir.join(INITRD_FILE);
    p.exists().then_some(p)
}
pub fn rootfs_in(dir: &Path) -> PathBuf {
    let qcow2 = dir.join(ROOTFS_QCOW2_FILE);
    if qcow2.exists() {
        qcow2
    } else {
        dir.join(ROOTFS_FILE)
    }
}

/// How the root disk `rootfs_in` found is stored (its file name says so:
/// `content` checked the format when the image was registered).
pub fn rootfs_format(rootfs: &Path) -> content::RootfsFormat {
    if rootfs.file_name() == Some(std::ffi::OsStr::new(ROOTFS_QCOW2_FILE)) {
        content::RootfsFormat::Qcow2
    } else {
        content::RootfsFormat::Ext4
    }
}

/// Bytes the image's files take, as their lengths add up (holes included).
pub fn stored_size(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.metadata().ok())
        .filter(|m| m.is_file())
        .map(|m| m.len())
        .sum()
}

async fn run(cmd: &mut Command, what: &str) -> Result<String, String> {
    let out = cmd.output().await.map_err(|e| format!("{what}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{what} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The file names the kernels of `src` are stored under: each by its format.
/// A kernel of no known format keeps the old name (`vmlinuz`), so the VMM is
/// the one to report it, as before kernels were checked; a `kernel_elf`
/// that is not an ELF, or two kernels of one format, are refused.
fn kernel_names(src: &ImageSource) -> Result<Vec<(&PathBuf, &'static str)>, String> {
    let kind_of = |p: &Path| {
        std::fs::File::open(p)
            .ok()
            .and_then(|f| content::check_kernel(&f).ok())
    };
    let kernel = kind_of(&src.kernel);
    let mut names = vec![(&src.kernel, kernel.map_or(KERNEL_FILE, kernel_file))];
    if let Some(elf) = &src.kernel_elf {
        match kind_of(elf) {
            Some(KernelKind::Elf) => {}
            _ => return Err(format!("{} is not an x86-64 ELF kernel", elf.display())),
        }
        if kernel == Some(KernelKind::Elf) {
            return Err("both kernels are ELF: the first one must be a bzImage".into());
        }
        names.push((elf, VMLINUX_FILE));
    }
    Ok(names)
}

/// Copies the source files into `dest` (created; must not exist), atomically:
/// a half-finished import is never visible under `dest`.
pub async fn import(src: &ImageSource, dest: &Path) -> Result<(), String> {
    let mut copies = kernel_names(src)?;
    copies.push((&src.rootfs, ROOTFS_FILE));
    if let Some(i) = &src.initrd {
        copies.push((i, INITRD_FILE));
    }
    let tmp = dest.with_extension("importing");
    let _ = tokio::fs::remove_dir_all(&tmp).await;
    tokio::fs::create_dir_all(&tmp)
        .await
        .map_err(|e| format!("create {}: {e}", tmp.display()))?;
    for (from, name) in copies {
        let result = run(
            Command::new("cp")
                .arg("--reflink=auto")
                .arg("--sparse=always")
                .arg(from)
                .arg(tmp.join(name)),
            "copy image file",
        )
        .await;
        if let Err(e) = result {
            let _ = tokio::fs::remove_dir_all(&tmp).await;
            return Err(e);
        }
    }
    tokio::fs::rename(&tmp, dest)
        .await
        .map_err(|e| format!("rename into {}: {e}", dest.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::content::samples::{bzimage_head, elf_head};

    #[test]
    fn the_kernel_a_backend_gets_is_its_first_preferred_format_the_image_has() {
        use KernelKind::{BzImage, Elf};
        let dir =
            std::env::temp_dir().join(format!("hatch-kernel-for-{}", crate::ids::random_string(8)));
        std::fs::create_dir_all(&dir).unwrap();
        let (vmlinuz, vmlinux) = (dir.join(KERNEL_FILE), dir.join(VMLINUX_FILE));
        assert_eq!(kernel_for(&dir, &[BzImage, Elf]), None);

        std::fs::write(&vmlinuz, bzimage_head()).unwrap();
        std::fs::write(&vmlinux, elf_head()).unwrap();
        assert_eq!(kernel_for(&dir, &[BzImage, Elf]), Some(vmlinuz.clone()));
        assert_eq!(kernel_for(&dir, &[Elf, BzImage]), Some(vmlinux.clone()));
        assert_eq!(kernel_for(&dir, &[Elf]), Some(vmlinux.clone()));
        assert_eq!(kernel_for(&dir, &[]), None);

        // Only the ELF: a backend that prefers a bzImage falls back to it,
        // one that boots only a bzImage gets nothing.
        std::fs::remove_file(&vmlinuz).unwrap();
        assert_eq!(kernel_for(&dir, &[BzImage, Elf]), Some(vmlinux.clone()));
        assert_eq!(kernel_for(&dir, &[BzImage]), None);

        // An older image kept an ELF as `vmlinuz`: the header decides, not the name.
        std::fs::rename(&vmlinux, &vmlinuz).unwrap();
        assert_eq!(kernel_for(&dir, &[Elf]), Some(vmlinuz.clone()));
        assert_eq!(kernels_in(&dir), vec![(Elf, vmlinuz.clone())]);

        // A file of no known format is no kernel of any format.
        std::fs::write(&vmlinuz, b"not a kernel").unwrap();
        assert_eq!(kernel_for(&dir, &[BzImage, Elf]), None);
        assert!(kernels_in(&dir).is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn imported_kernels_are_named_by_their_format() {
        let dir = std::env::temp_dir().join(format!(
            "hatch-kernel-names-{}",
            crate::ids::random_string(8)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let (bz, elf, junk) = (dir.join("bz"), dir.join("elf"), dir.join("junk"));
        std::fs::write(&bz, bzimage_head()).unwrap();
        std::fs::write(&elf, elf_head()).unwrap();
        std::fs::write(&junk, b"junk").unwrap();
        let src = |kernel: &Path, kernel_elf: Option<&Path>| ImageSource {
            kernel: kernel.into(),
            kernel_elf: kernel_elf.map(Into::into),
            initrd: None,
            rootfs: dir.join("rootfs"),
        };
        let names = |s: &ImageSource| {
            kernel_names(s).map(|n| n.into_iter().map(|(_, name)| name).collect::<Vec<_>>())
        };
        assert_eq!(names(&src(&bz, None)), Ok(vec![KERNEL_FILE]));
        assert_eq!(names(&src(&elf, None)), Ok(vec![VMLINUX_FILE]));
        // Unknown: kept where it always was, for the VMM to report.
        assert_eq!(names(&src(&junk, None)), Ok(vec![KERNEL_FILE]));
        assert_eq!(
            names(&src(&bz, Some(&elf))),
            Ok(vec![KERNEL_FILE, VMLINUX_FILE])
        );
        assert!(names(&src(&bz, Some(&bz)))
            .unwrap_err()
            .contains("not an x86-64 ELF"));
        assert!(names(&src(&elf, Some(&elf)))
            .unwrap_err()
            .contains("both kernels are ELF"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

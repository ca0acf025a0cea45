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

use sha2::{Digest, Sha256};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use tokio::process::Command;

pub const KERNEL_FILE: &str = "vmlinuz";
pub const INITRD_FILE: &str = "initrd.img";
pub const ROOTFS_FILE: &str = "rootfs.ext4";
/// The root disk of an image registered as qcow2 (checked self-contained).
pub const ROOTFS_QCOW2_FILE: &str = "rootfs.qcow2";

/// Source files of an image, as the user named them.
#[derive(Debug, Clone)]
pub struct ImageSource {
    pub kernel: PathBuf,
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
        for p in [Some(&self.kernel), self.initrd.as_ref(), Some(&self.rootfs)]
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

/// Copies the source files into `dest` (created; must not exist), atomically:
/// a half-finished import is never visible under `dest`.
pub async fn import(src: &ImageSource, dest: &Path) -> Result<(), String> {
    let tmp = dest.with_extension("importing");
    let _ = tokio::fs::remove_dir_all(&tmp).await;
    tokio::fs::create_dir_all(&tmp)
        .await
        .map_err(|e| format!("create {}: {e}", tmp.display()))?;
    let mut copies = vec![(&src.kernel, KERNEL_FILE), (&src.rootfs, ROOTFS_FILE)];
    if let Some(i) = &src.initrd {
        copies.push((i, INITRD_FILE));
    }
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

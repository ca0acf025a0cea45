//! A VM's own root disk, made in its work directory in the format its backend boots.

use super::{DiskFormat, Result, VmmError};
use crate::image::content::RootfsFormat;
use std::path::{Path, PathBuf};
use tokio::process::Command;

async fn run(cmd: &mut Command, what: &str) -> Result<()> {
    let out = cmd
        .output()
        .await
        .map_err(|e| VmmError::Disk(format!("{what}: {e}")))?;
    if !out.status.success() {
        return Err(VmmError::Disk(format!(
            "{what} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// Creates the disk `format` names in `work_dir` over the image's `rootfs`
/// (stored as `stored`), without copying the rootfs when `format` is an
/// overlay. Returns its path.
pub async fn create(
    format: DiskFormat,
    rootfs: &Path,
    stored: RootfsFormat,
    work_dir: &Path,
) -> Result<PathBuf> {
    let disk = format.path_in(work_dir);
    match (format, stored) {
        (DiskFormat::Qcow2Overlay, _) => {
            // The backing format is named, never probed: a raw image that
            // looks like qcow2 inside must not be read as one.
            let backing = match stored {
                RootfsFormat::Qcow2 => "qcow2",
                RootfsFormat::Ext4 => "raw",
            };
            run(
                Command::new("qemu-img")
                    .args(["create", "-q", "-f", "qcow2", "-F", backing, "-b"])
                    .arg(rootfs)
                    .arg(&disk),
                "qemu-img create",
            )
            .await?;
        }
        (DiskFormat::Raw, RootfsFormat::Qcow2) => {
            run(
                Command::new("qemu-img")
                    .args(["convert", "-q", "-f", "qcow2", "-O", "raw"])
                    .arg(rootfs)
                    .arg(&disk),
                "qemu-img convert",
            )
            .await?;
        }
        (DiskFormat::Raw, RootfsFormat::Ext4) => {
            run(
                Command::new("cp")
                    .arg("--reflink=auto")
                    .arg("--sparse=always")
                    .arg(rootfs)
                    .arg(&disk),
                "copy rootfs",
            )
            .await?;
        }
    }
    Ok(disk)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each format's disk is made where `path_in` says, from an ext4 rootfs
    /// and from a qcow2 one, and reads back as the rootfs's bytes.
    #[tokio::test]
    async fn disks_land_where_the_format_says_with_the_rootfs_content() {
        let dir = std::env::temp_dir().join(format!("hatch-disk-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let raw = dir.join("rootfs.ext4");
        let content: Vec<u8> = (0..(1u32 << 20)).map(|i| (i % 251) as u8).collect();
        std::fs::write(&raw, &content).unwrap();
        let q = dir.join("rootfs.qcow2");
        run(
            Command::new("qemu-img")
                .args(["convert", "-q", "-f", "raw", "-O", "qcow2"])
                .arg(&raw)
                .arg(&q),
            "qemu-img convert",
        )
        .await
        .unwrap();
        for (rootfs, stored) in [(&raw, RootfsFormat::Ext4), (&q, RootfsFormat::Qcow2)] {
            for format in [DiskFormat::Qcow2Overlay, DiskFormat::Raw] {
                let work = dir.join(format!("{stored:?}-{format:?}"));
                std::fs::create_dir_all(&work).unwrap();
                let disk = create(format, rootfs, stored, &work).await.unwrap();
                assert_eq!(disk, format.path_in(&work));
                let back = work.join("back.raw");
                let fmt = match format {
                    DiskFormat::Qcow2Overlay => "qcow2",
                    DiskFormat::Raw => "raw",
                };
                run(
                    Command::new("qemu-img")
                        .args(["convert", "-q", "-f", fmt, "-O", "raw"])
                        .arg(&disk)
                        .arg(&back),
                    "qemu-img convert",
                )
                .await
                .unwrap();
                assert!(
                    std::fs::read(&back).unwrap() == content,
                    "{stored:?} as {format:?}"
                );
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}

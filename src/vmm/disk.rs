//! A VM's own root disk, made in its work directory in the format its backend
//! boots, and converted between formats when a Stopped snapshot moves backends.

use super::confine::{self, MountPlan};
use super::{DiskFormat, Result, VmmError};
use crate::image::content::RootfsFormat;
use std::path::{Path, PathBuf};
use tokio::process::Command;

/// The uid and gid a disk conversion runs as: `nobody`, which owns nothing.
const CONVERT_UID: u32 = 65534;

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

/// One VM's disk to convert for another backend.
pub struct Conversion<'a> {
    /// The disk, in `from` format, alone in its own directory.
    pub input: &'a Path,
    pub from: DiskFormat,
    pub to: DiskFormat,
    /// An empty directory of its own, where the converted disk is written.
    pub out_dir: &'a Path,
    /// The image's rootfs (stored as `stored`) a qcow2 overlay lies over.
    pub rootfs: &'a Path,
    pub stored: RootfsFormat,
    /// Directories the conversion must not see (the data directory), except
    /// the input's and output's directories and the rootfs's.
    pub hide: &'a [PathBuf],
}

/// Converts a VM's disk to another format; returns `to.path_in(out_dir)`.
///
/// The disk is the tenant's: a guest that escaped into its VMM may have
/// rewritten a qcow2 header to name any host file as backing or data file.
/// So the header is never followed: the backing is named on the command line
/// (the image's rootfs, as `create` made it), an external data file is
/// refused, and the tool runs as `nobody` without capabilities in a mount
/// namespace where the data directory shows only the input's directory and
/// the image (read-only) and the output directory.
pub async fn convert(c: &Conversion<'_>) -> Result<PathBuf> {
    let out = c.to.path_in(c.out_dir);
    let mut cmd = Command::new("qemu-img");
    cmd.args(["convert", "-q"]);
    match (c.from, c.to) {
        (DiskFormat::Qcow2Overlay, DiskFormat::Raw) => {
            check_overlay_header(c.input)?;
            let backing_format = match c.stored {
                RootfsFormat::Qcow2 => "qcow2",
                RootfsFormat::Ext4 => "raw",
            };
            let mut backing = serde_json::json!({
                "driver": backing_format,
                "file": {"driver": "file", "filename": c.rootfs},
            });
            if c.stored == RootfsFormat::Qcow2 {
                // Images are checked to have none; never look for one.
                backing["backing"] = serde_json::Value::Null;
            }
            let source = serde_json::json!({
                "driver": "qcow2",
                "file": {"driver": "file", "filename": c.input},
                "backing": backing,
            });
            cmd.arg(format!("json:{source}")).args(["-O", "raw"]);
        }
        (DiskFormat::Raw, DiskFormat::Qcow2Overlay) => {
            // Named, never probed: a raw disk may hold a qcow2 header.
            cmd.args(["-f", "raw"]).arg(c.input).args(["-O", "qcow2"]);
        }
        (from, to) => {
            return Err(VmmError::Disk(format!(
                "no conversion from {from:?} to {to:?}: the formats are the same"
            )))
        }
    }
    cmd.arg(&out);
    let in_dir = parent(c.input)?;
    let image_dir = parent(c.rootfs)?;
    let io = |what: &Path, e: std::io::Error| VmmError::Disk(format!("{}: {e}", what.display()));
    // Readable by the tool: it is hidden from everyone else by the data directory.
    set_mode(in_dir, 0o755).map_err(|e| io(in_dir, e))?;
    set_mode(c.input, 0o644).map_err(|e| io(c.input, e))?;
    std::os::unix::fs::chown(c.out_dir, Some(CONVERT_UID), Some(CONVERT_UID))
        .map_err(|e| io(c.out_dir, e))?;
    set_mode(c.out_dir, 0o700).map_err(|e| io(c.out_dir, e))?;
    if c.hide.iter().any(|h| image_dir.starts_with(h)) {
        confine::open_image_dir(image_dir).map_err(|e| io(image_dir, e))?;
    }
    let show = [
        (in_dir.to_path_buf(), true),
        (image_dir.to_path_buf(), true),
        (c.out_dir.to_path_buf(), false),
    ];
    run_confined(&mut cmd, "qemu-img convert", c.hide, &show).await?;
    // The tool's output, taken back: a regular file (never a link it made), root's.
    let made = std::fs::symlink_metadata(&out).map_err(|e| io(&out, e))?;
    if !made.file_type().is_file() {
        return Err(VmmError::Disk(format!(
            "{} is not a regular file after the conversion",
            out.display()
        )));
    }
    confine::own_file(&out, 0, 0, 0o600).map_err(|e| io(&out, e))?;
    Ok(out)
}

fn parent(p: &Path) -> Result<&Path> {
    p.parent()
        .ok_or_else(|| VmmError::Disk(format!("{} has no directory", p.display())))
}

fn set_mode(p: &Path, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))
}

/// A VM's qcow2 overlay may be converted only if opening it needs no file
/// but the backing given on the command line: no external data file, no
/// encryption.
fn check_overlay_header(disk: &Path) -> Result<()> {
    use std::io::Read;
    let mut head = Vec::with_capacity(104);
    std::fs::File::open(disk)
        .and_then(|f| f.take(104).read_to_end(&mut head))
        .map_err(|e| VmmError::Disk(format!("{}: {e}", disk.display())))?;
    let be32 = |at: usize| u32::from_be_bytes(head[at..at + 4].try_into().unwrap());
    if head.len() < 72 || head[..4] != *b"QFI\xfb" {
        return Err(VmmError::Disk("the disk is not a qcow2 image".into()));
    }
    if be32(32) != 0 {
        return Err(VmmError::Disk(
            "the disk is an encrypted qcow2 image: not converted".into(),
        ));
    }
    if be32(4) >= 3 {
        if head.len() < 80 {
            return Err(VmmError::Disk(
                "the disk's qcow2 header is truncated".into(),
            ));
        }
        let incompatible = u64::from_be_bytes(head[72..80].try_into().unwrap());
        // Bit 2: an external data file, which the header names.
        if incompatible & (1 << 2) != 0 {
            return Err(VmmError::Disk(
                "the disk's qcow2 header names an external data file: not converted".into(),
            ));
        }
    }
    Ok(())
}

/// Runs `cmd` (stdout and stderr captured) as `nobody` with no capabilities
/// and `no_new_privs`, in a mount namespace where each of `hide` is an empty
/// tmpfs with only `show` (directory, read-only) bound back.
async fn run_confined(
    cmd: &mut Command,
    what: &str,
    hide: &[PathBuf],
    show: &[(PathBuf, bool)],
) -> Result<()> {
    let plan = MountPlan::new(hide, show).map_err(|e| VmmError::Disk(format!("{what}: {e}")))?;
    // SAFETY: the closure runs between fork and exec; `enter` and
    // `drop_privileges` make only system calls on data prepared before the fork.
    unsafe {
        cmd.pre_exec(move || {
            plan.enter()?;
            confine::drop_privileges(CONVERT_UID, CONVERT_UID)
        });
    }
    // A flow cut short (its future dropped) ends the tool too.
    cmd.kill_on_drop(true).stdin(std::process::Stdio::null());
    run(cmd, what).await
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

/// Conversions run confined (uid `nobody`, a mount namespace): root only.
#[cfg(test)]
mod conversion_tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn is_root() -> bool {
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() == 0 }
    }

    /// A data directory with an image (a 1 MiB patterned ext4 stand-in), a
    /// VM whose qcow2 overlay holds 64 KiB the guest wrote at 512 KiB, and a
    /// world-readable secret in the data directory. Removed on drop.
    struct Layout {
        base: PathBuf,
        rootfs: PathBuf,
        overlay: PathBuf,
        secret: PathBuf,
    }

    impl Drop for Layout {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.base);
        }
    }

    const SECRET: &[u8] = b"host secret: never in a tenant's disk\n";

    fn run_ok(cmd: &mut std::process::Command) {
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "{cmd:?}: {out:?}");
    }

    async fn layout(name: &str) -> Layout {
        let base =
            std::env::temp_dir().join(format!("hatch-convert-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let image = base.join("images/img_x/v1");
        let vm = base.join("vms/vm_x");
        std::fs::create_dir_all(&image).unwrap();
        std::fs::create_dir_all(&vm).unwrap();
        let rootfs = image.join("rootfs.ext4");
        let content: Vec<u8> = (0..(1u32 << 20)).map(|i| (i % 253) as u8).collect();
        std::fs::write(&rootfs, &content).unwrap();
        let overlay = create(DiskFormat::Qcow2Overlay, &rootfs, RootfsFormat::Ext4, &vm)
            .await
            .unwrap();
        run_ok(
            std::process::Command::new("qemu-io")
                .args(["-c", "write -P 0xab 512k 64k"])
                .arg(&overlay),
        );
        let secret = base.join("secret");
        std::fs::write(&secret, SECRET.repeat(1 << 15)).unwrap();
        set_mode(&secret, 0o644).unwrap();
        Layout {
            base,
            rootfs,
            overlay,
            secret,
        }
    }

    /// The rootfs's bytes with the guest's write over them.
    fn expected(l: &Layout) -> Vec<u8> {
        let mut want = std::fs::read(&l.rootfs).unwrap();
        want[512 << 10..576 << 10].fill(0xab);
        want
    }

    /// The VM's overlay in a directory of its own, as a restore fetches it.
    fn fetched(l: &Layout, from: &Path, name: &str) -> (PathBuf, PathBuf) {
        let dir = l.base.join(format!("vms/vm_x/restore-{name}"));
        let (input, out) = (dir.join("in"), dir.join("out"));
        std::fs::create_dir_all(&input).unwrap();
        std::fs::create_dir_all(&out).unwrap();
        let disk = input.join(from.file_name().unwrap());
        std::fs::copy(from, &disk).unwrap();
        (disk, out)
    }

    fn conversion<'a>(
        l: &'a Layout,
        input: &'a Path,
        from: DiskFormat,
        out_dir: &'a Path,
        hide: &'a [PathBuf],
    ) -> Conversion<'a> {
        let to = match from {
            DiskFormat::Raw => DiskFormat::Qcow2Overlay,
            DiskFormat::Qcow2Overlay => DiskFormat::Raw,
        };
        Conversion {
            input,
            from,
            to,
            out_dir,
            rootfs: &l.rootfs,
            stored: RootfsFormat::Ext4,
            hide,
        }
    }

    fn as_raw(disk: &Path, format: &str) -> Vec<u8> {
        let back = disk.with_extension("check");
        run_ok(
            std::process::Command::new("qemu-img")
                .args(["convert", "-q", "-f", format, "-O", "raw"])
                .arg(disk)
                .arg(&back),
        );
        let bytes = std::fs::read(&back).unwrap();
        std::fs::remove_file(&back).unwrap();
        bytes
    }

    #[tokio::test]
    async fn a_disk_goes_to_raw_and_back_to_qcow2_with_the_guests_writes() {
        if !is_root() {
            println!("skipped: converting a disk runs it as nobody, which needs root");
            return;
        }
        let l = layout("round").await;
        let hide = [l.base.clone()];
        let (input, out) = fetched(&l, &l.overlay, "a");
        let raw = convert(&conversion(
            &l,
            &input,
            DiskFormat::Qcow2Overlay,
            &out,
            &hide,
        ))
        .await
        .unwrap();
        assert_eq!(raw, DiskFormat::Raw.path_in(&out));
        assert!(std::fs::read(&raw).unwrap() == expected(&l));
        let meta = std::fs::metadata(&raw).unwrap();
        assert_eq!(
            (meta.uid(), meta.mode() & 0o7777),
            (0, 0o600),
            "root's again"
        );

        let (input, out) = fetched(&l, &raw, "b");
        let qcow2 = convert(&conversion(&l, &input, DiskFormat::Raw, &out, &hide))
            .await
            .unwrap();
        assert_eq!(qcow2, DiskFormat::Qcow2Overlay.path_in(&out));
        assert!(as_raw(&qcow2, "qcow2") == expected(&l));
    }

    #[tokio::test]
    async fn a_qcow2_header_naming_a_host_file_does_not_leak_it() {
        if !is_root() {
            println!("skipped: converting a disk runs it as nobody, which needs root");
            return;
        }
        let l = layout("hostile").await;
        let hide = [l.base.join("vms")];
        // A world-readable file the tool could open, were it to follow the header.
        let outside = l.base.join("secret-outside");
        std::fs::copy(&l.secret, &outside).unwrap();
        for (i, named) in [&l.secret, &outside, &PathBuf::from("/etc/shadow")]
            .into_iter()
            .enumerate()
        {
            let (input, out) = fetched(&l, &l.overlay, &format!("h{i}"));
            // What a VMM that a guest took over could write into the header.
            run_ok(
                std::process::Command::new("qemu-img")
                    .args(["rebase", "-u", "-F", "raw", "-b"])
                    .arg(named)
                    .arg(&input),
            );
            let raw = convert(&conversion(
                &l,
                &input,
                DiskFormat::Qcow2Overlay,
                &out,
                &hide,
            ))
            .await
            .unwrap();
            let bytes = std::fs::read(&raw).unwrap();
            assert!(
                !bytes.windows(SECRET.len()).any(|w| w == SECRET),
                "{} leaked into the disk",
                named.display()
            );
            assert!(bytes == expected(&l), "{}", named.display());
        }

        // An external data file is named by the header too: refused outright.
        let (input, out) = fetched(&l, &l.overlay, "data");
        std::fs::remove_file(&input).unwrap();
        run_ok(
            std::process::Command::new("qemu-img")
                .args(["create", "-q", "-f", "qcow2", "-o"])
                .arg(format!("data_file={},data_file_raw=on", l.secret.display()))
                .arg(&input)
                .arg("1M"),
        );
        let e = convert(&conversion(
            &l,
            &input,
            DiskFormat::Qcow2Overlay,
            &out,
            &hide,
        ))
        .await
        .unwrap_err();
        assert!(e.to_string().contains("external data file"), "{e}");
        assert_eq!(std::fs::read_dir(&out).unwrap().count(), 0);
    }

    #[tokio::test]
    async fn the_tool_runs_as_nobody_and_sees_only_its_own_directories() {
        if !is_root() {
            println!("skipped: confining a tool needs root");
            return;
        }
        let l = layout("jail").await;
        let (input, out) = fetched(&l, &l.overlay, "j");
        let (in_dir, image) = (input.parent().unwrap(), l.rootfs.parent().unwrap());
        set_mode(in_dir, 0o755).unwrap();
        set_mode(&input, 0o644).unwrap();
        std::os::unix::fs::chown(&out, Some(CONVERT_UID), Some(CONVERT_UID)).unwrap();
        confine::open_image_dir(image).unwrap();
        let hide = [l.base.clone()];
        let show = [
            (in_dir.to_path_buf(), true),
            (image.to_path_buf(), true),
            (out.clone(), false),
        ];
        let sh = |script: String| {
            let mut cmd = Command::new("sh");
            cmd.arg("-c").arg(script);
            cmd
        };
        let confined = |script: String| {
            let (hide, show) = (&hide, &show);
            async move { run_confined(&mut sh(script.clone()), &script, hide, show).await }
        };
        let q = |p: &Path| format!("'{}'", p.display());
        for script in [
            r#"test "$(id -u):$(id -g):$(id -G)" = 65534:65534:65534"#.to_string(),
            r#"grep -q '^CapEff:[[:space:]]*0*$' /proc/self/status"#.to_string(),
            r#"grep -q '^CapBnd:[[:space:]]*0*$' /proc/self/status"#.to_string(),
            r#"grep -q '^NoNewPrivs:[[:space:]]*1$' /proc/self/status"#.to_string(),
            format!("cat {} > /dev/null", q(&input)),
            format!("cat {} > /dev/null", q(&l.rootfs)),
            format!("echo x > {}", q(&out.join("made"))),
        ] {
            confined(script.clone())
                .await
                .unwrap_or_else(|e| panic!("{script}: {e}"));
        }
        for script in [
            format!("cat {}", q(&l.secret)),
            // The VM's own live disk, beside the fetched copy: not shown.
            format!("cat {} > /dev/null", q(&l.overlay)),
            format!("echo x > {}", q(&in_dir.join("planted"))),
            format!("echo x > {}", q(&image.join("planted"))),
            format!("echo x > {}", q(&l.base.join("planted"))),
        ] {
            assert!(confined(script.clone()).await.is_err(), "{script} worked");
        }
        // The daemon's own view is untouched.
        assert!(l.secret.is_file());
        assert!(out.join("made").is_file());
        assert!(!in_dir.join("planted").exists());
    }
}

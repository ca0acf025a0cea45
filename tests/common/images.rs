//! Registering images like a user does: `curl -F` uploads, and files made
//! with the real tools (mkfs.ext4, qemu-img) to upload or import.

use super::{image_dir, run_ok, Daemon, Response, BASE};
use std::path::{Path, PathBuf};
use std::process::Command;

/// One part of a multipart upload.
pub enum Form<'a> {
    /// A file part, as `curl -F name=@path` sends it.
    File(&'a str, &'a Path),
    /// A text part, as `curl --form-string name=value` sends it.
    Text(&'a str, &'a str),
}

impl Daemon {
    /// `POST /images` as multipart/form-data with `key`; `chunked` sends it
    /// without a Content-Length, so only the streamed bytes can be counted.
    pub fn upload_as(&self, key: &str, parts: &[Form], chunked: bool) -> Response {
        let mut cmd = self.curl_in_ns("600");
        cmd.arg("-H").arg(format!("Authorization: Bearer {key}"));
        if chunked {
            cmd.args(["-H", "Transfer-Encoding: chunked"]);
        }
        for p in parts {
            match p {
                Form::File(name, path) => cmd.arg("-F").arg(format!("{name}=@{}", path.display())),
                Form::Text(name, value) => cmd.arg("--form-string").arg(format!("{name}={value}")),
            };
        }
        cmd.arg("-w")
            .arg("\n%{http_code}")
            .arg(format!("{BASE}/images"));
        let out = cmd.output().expect("run curl");
        let mut r = Response::of_curl(&out);
        // curl's own complaints (a refused upload cut short) help a failing assertion.
        r.text.push_str(&String::from_utf8_lossy(&out.stderr));
        r
    }

    /// Uploads the test image (kernel, initrd, rootfs) as alice and returns its id.
    pub fn upload_test_image(&self, rootfs: &Path) -> String {
        let img = image_dir();
        let r = self.upload_as(
            &self.key,
            &[
                Form::File("kernel", &img.join("vmlinuz")),
                Form::File("initrd", &img.join("initrd.img")),
                Form::File("rootfs", rootfs),
            ],
            false,
        );
        assert_eq!(r.status, 201, "upload: {}", r.text);
        r.body["id"].as_str().unwrap().to_string()
    }

    /// The entries of the daemon's `images/` directory (image ids, and
    /// anything an unfinished registration left).
    pub fn image_dirs(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.data_dir.join("images"))
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }
}

/// A directory outside every daemon's data dir, removed on drop.
pub struct ScratchDir(pub PathBuf);

impl ScratchDir {
    pub fn new(tag: &str) -> ScratchDir {
        Self::under(&std::env::temp_dir(), tag)
    }

    pub fn under(base: &Path, tag: &str) -> ScratchDir {
        let p = base.join(format!(
            "hatch-images-{tag}-{}-{}",
            std::process::id(),
            super::SEQ.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        ScratchDir(p)
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A small, empty ext4 filesystem image of `mib` MiB.
pub fn small_ext4(path: &Path, mib: u32) {
    run_ok(
        Command::new("mkfs.ext4")
            .args(["-q", "-F"])
            .arg(path)
            .arg(format!("{mib}M")),
    );
}

/// Copies a file keeping its holes (the test rootfs is mostly holes).
pub fn sparse_copy(from: &Path, to: &Path) {
    run_ok(Command::new("cp").arg("--sparse=always").arg(from).arg(to));
}

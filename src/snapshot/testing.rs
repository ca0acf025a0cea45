//! Test support for the snapshot store: scratch directories, memory-like sample data, and a
//! real S3-compatible server (`s3s-fs`) run as a child process on loopback.

use crate::config::S3Config;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// A directory removed when dropped; unique per process and per call, since tests run in parallel.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(label: &str) -> TempDir {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("hatch-{label}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Bytes shaped like a guest's memory: 64 KiB blocks alternating between zeros and
/// pseudo-random (incompressible) data, so about half compresses away.
pub fn sample_memory(len: usize) -> Vec<u8> {
    const BLOCK: usize = 64 << 10;
    let mut out = vec![0u8; len];
    let mut x = 0x2545_f491_4f6c_dd1du64;
    for block in out.chunks_mut(BLOCK).skip(1).step_by(2) {
        for word in block.chunks_mut(8) {
            // xorshift64: cheap, deterministic, and nothing a compressor can predict.
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            word.copy_from_slice(&x.to_le_bytes()[..word.len()]);
        }
    }
    out
}

const BUCKET: &str = "hatch-test";
const ACCESS_KEY: &str = "hatch-test-access";
const SECRET_KEY: &str = "hatch-test-secret";

/// A running `s3s-fs` serving one bucket from a scratch directory, killed when dropped.
pub struct S3sFs {
    child: Child,
    endpoint: String,
    dir: TempDir,
}

/// Where `s3s-fs` is: `HATCH_TEST_S3S_FS` (set by scripts/test), else PATH, else cargo's bin dir.
fn s3s_fs_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("HATCH_TEST_S3S_FS").filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        assert!(
            p.is_file(),
            "HATCH_TEST_S3S_FS={} is not a file; run scripts/test, which installs s3s-fs",
            p.display()
        );
        return p;
    }
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    if let Some(c) = std::env::var_os("CARGO_HOME") {
        dirs.push(PathBuf::from(c).join("bin"));
    }
    if let Some(h) = std::env::var_os("HOME") {
        dirs.push(PathBuf::from(h).join(".cargo/bin"));
    }
    dirs.into_iter()
        .map(|d| d.join("s3s-fs"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "s3s-fs (the S3-compatible server these tests run against) was not found in \
                 HATCH_TEST_S3S_FS, PATH or ~/.cargo/bin; run scripts/test, which installs it \
                 (cargo install s3s-fs@0.14.1 --features binary --locked)"
            )
        })
}

impl S3sFs {
    /// Starts the server on 127.0.0.1 with a port the kernel picks, and waits until it listens.
    pub fn start() -> S3sFs {
        let bin = s3s_fs_binary();
        let dir = TempDir::new("s3s-fs");
        let root = dir.path().join("root");
        // s3s-fs serves each directory under its root as a bucket.
        std::fs::create_dir_all(root.join(BUCKET)).unwrap();
        std::fs::create_dir_all(dir.path().join("scratch")).unwrap();
        let log_path = dir.path().join("s3s-fs.log");
        let log = std::fs::File::create(&log_path).unwrap();
        let child = Command::new(&bin)
            .args(["--host", "127.0.0.1", "--port", "0"])
            .args(["--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY])
            .arg(&root)
            // Its start-up line (at info) is how we learn the port it was given.
            .env("RUST_LOG", "s3s_fs=info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", bin.display()));
        // From here the guard owns the child, so a failed wait below still kills it.
        let mut server = S3sFs {
            child,
            endpoint: String::new(),
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let mut text = String::new();
            if let Ok(mut f) = std::fs::File::open(&log_path) {
                let _ = f.read_to_string(&mut text);
            }
            if let Some(addr) = text
                .split("server is running at http://")
                .nth(1)
                .and_then(|rest| rest.split_whitespace().next())
            {
                assert!(addr.starts_with("127.0.0.1:"), "s3s-fs bound {addr}");
                server.endpoint = format!("http://{addr}");
                return server;
            }
            if let Ok(Some(status)) = server.child.try_wait() {
                panic!("s3s-fs exited with {status} before listening:\n{text}");
            }
            assert!(
                Instant::now() < deadline,
                "s3s-fs did not report its address within 20 s:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The daemon's configuration for this server.
    pub fn config(&self) -> S3Config {
        S3Config {
            bucket: BUCKET.into(),
            endpoint: Some(self.endpoint.clone()),
            access_key: ACCESS_KEY.into(),
            secret_key: SECRET_KEY.into(),
            region: "us-east-1".into(),
        }
    }

    /// The file in which s3s-fs keeps the object `key`, for tests that corrupt it.
    pub fn object_file(&self, key: &str) -> PathBuf {
        self.dir.path().join("root").join(BUCKET).join(key)
    }

    /// A directory for the test's own files, removed with the server's.
    pub fn scratch(&self) -> PathBuf {
        self.dir.path().join("scratch")
    }
}

impl Drop for S3sFs {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

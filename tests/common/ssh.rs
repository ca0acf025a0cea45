//! What the SSH, exec and files tests share: booted VMs, certificates from
//! `POST /vms/{id}/connect`, stock OpenSSH logging in with them, the Debian
//! cloud-init image, and the daemon's own memory.

use super::{wait_until, Daemon, Response, BOOT_TIMEOUT};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How long stock ssh may take to connect: a wake happens inside the
/// connection to a sleeping VM, so give it the proxy's room.
const SSH_CONNECT_TIMEOUT_SECS: u64 = 60;

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A VM created by the holder of `key` with `body`, once its guest printed
/// its ready line (sshd may start a moment later: logins retry).
pub fn ready_vm_as(d: &Daemon, key: &str, body: Value) -> Value {
    let r = d.as_key(key, "POST", "/vms", Some(&body.to_string()));
    assert_eq!(r.status, 201, "{}", r.text);
    // Its console through the API as its owner (`wait_console` asks as the first owner).
    let logs = format!("/vms/{}/logs", r.body["id"].as_str().unwrap());
    wait_until("the guest's ready line", BOOT_TIMEOUT, || {
        d.as_key(key, "GET", &logs, None)
            .text
            .contains("hatch-guest: ready")
    });
    r.body
}

/// A VM of the daemon's first owner with hatch's defaults, booted.
pub fn ready_vm(d: &Daemon) -> Value {
    ready_vm_as(d, &d.key, json!({}))
}

/// `POST /vms/{id}/connect` with `public_key`, as the holder of `key`.
pub fn connect(d: &Daemon, key: &str, vm: &str, public: &str) -> Response {
    d.as_key(
        key,
        "POST",
        &format!("/vms/{vm}/connect"),
        Some(&json!({ "public_key": public }).to_string()),
    )
}

/// A certificate for the first owner's `vm`, written where `ssh` finds it
/// (`-o CertificateFile`); checks the answer's shape. Returns (cert file,
/// answer).
pub fn certify(d: &Daemon, vm: &Value, key: &Path, public: &str) -> (PathBuf, Response) {
    let id = vm["id"].as_str().unwrap();
    let before = unix_now();
    let r = connect(d, &d.key, id, public);
    assert_eq!(r.status, 200, "connect {id}: {}", r.text);
    let cert = r.body["certificate"].as_str().expect("certificate");
    assert!(
        cert.starts_with("ssh-ed25519-cert-v01@openssh.com "),
        "{cert}"
    );
    assert_eq!(r.body["username"], "agent");
    assert_eq!(r.body["host"], "127.0.0.1", "the host the client used");
    assert_eq!(r.body["port"], vm["ssh_port"]);
    let until = r.body["valid_until"].as_u64().expect("valid_until");
    assert!(until > before, "{until} is not after {before}");
    let path = key.with_file_name(format!("{id}-cert.pub"));
    std::fs::write(&path, format!("{cert}\n")).unwrap();
    (path, r)
}

/// Stock OpenSSH's command line: `ssh -i KEY -o CertificateFile=CERT -p PORT
/// TARGET CMD`, with nothing taken from the host's own keys or known hosts.
pub fn ssh_cert_args(key: &Path, cert: &Path, target: &str, port: u64, cmd: &str) -> Vec<String> {
    let mut args: Vec<String> = [
        "ssh",
        "-i",
        key.to_str().unwrap(),
        "-o",
        &format!("CertificateFile={}", cert.display()),
        "-o",
        "IdentitiesOnly=yes",
        "-p",
        &port.to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(super::ssh_options(SSH_CONNECT_TIMEOUT_SECS));
    args.extend([target.to_string(), cmd.to_string()]);
    args
}

impl Daemon {
    /// Logs in as `target` with the key and the certificate, from namespace
    /// `ns` (the daemon's host when None). Returns (success, stdout + stderr).
    pub fn ssh_cert(
        &self,
        ns: Option<&str>,
        (key, cert): (&Path, &Path),
        target: &str,
        port: u64,
        cmd: &str,
    ) -> (bool, String) {
        self.run_ssh(ns, &ssh_cert_args(key, cert, target, port, cmd))
    }

    /// `agent@127.0.0.1 -p PORT` from the daemon's host, retried for up to
    /// `within` (sshd may still be starting); its output.
    pub fn ssh_cert_ok(
        &self,
        creds: (&Path, &Path),
        port: u64,
        cmd: &str,
        within: Duration,
    ) -> String {
        let deadline = Instant::now() + within;
        loop {
            let (ok, text) = self.ssh_cert(None, creds, "agent@127.0.0.1", port, cmd);
            if ok {
                return text;
            }
            assert!(
                Instant::now() < deadline,
                "ssh agent@127.0.0.1 -p {port} {cmd:?} with {} never worked: {text}",
                creds.1.display()
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

/// Where the Debian cloud-init test image is: HATCH_TEST_DEBIAN_IMAGE_DIR,
/// else target/hatch-image-debian.
fn debian_image_path() -> (PathBuf, bool) {
    match std::env::var_os("HATCH_TEST_DEBIAN_IMAGE_DIR") {
        Some(d) => (PathBuf::from(d), true),
        None => (
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/hatch-image-debian"),
            false,
        ),
    }
}

/// The Debian cloud-init image, which must be there (scripts/test builds it).
pub fn debian_image_dir() -> PathBuf {
    let (dir, _) = debian_image_path();
    assert!(
        dir.join("rootfs.ext4").exists(),
        "Debian test image missing in {}: run `hatch image build --kind debian --out {0}` (scripts/test does)",
        dir.display()
    );
    dir
}

/// The Debian cloud-init image when it was built or named; None (the test
/// skips, saying so) when neither. A named directory must hold it.
pub fn debian_image_dir_if_built() -> Option<PathBuf> {
    let (dir, named) = debian_image_path();
    if !named && !dir.join("rootfs.ext4").exists() {
        eprintln!("skipped: no Debian test image (set HATCH_TEST_DEBIAN_IMAGE_DIR)");
        return None;
    }
    assert!(
        dir.join("rootfs.ext4").exists(),
        "Debian test image missing in {}",
        dir.display()
    );
    Some(dir)
}

/// A daemon that may import the Debian image from `img`, and the id of
/// that image registered as `debian` for its first owner.
pub fn debian_daemon(img: &Path) -> (Daemon, String) {
    let d = Daemon::start_with(&[("HATCH_IMAGE_IMPORT_DIRS", img.to_str().unwrap())]);
    let r = d.req(
        "POST",
        "/images",
        Some(
            &json!({
                "name": "debian",
                "kernel_path": img.join("vmlinuz"),
                "initrd_path": img.join("initrd.img"),
                "rootfs_path": img.join("rootfs.ext4"),
            })
            .to_string(),
        ),
    );
    assert_eq!(r.status, 201, "{}", r.text);
    let id = r.body["id"].as_str().unwrap().to_string();
    (d, id)
}

/// The daemon's process: the one `hatch serve` whose HATCH_DATA_DIR is ours.
pub fn daemon_pid(d: &Daemon) -> u32 {
    let want = format!("HATCH_DATA_DIR={}", d.data_dir.display());
    let mut found = vec![];
    for pid in super::pids_mentioning("serve") {
        let Ok(env) = std::fs::read(format!("/proc/{pid}/environ")) else {
            continue;
        };
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        if comm.trim() == "hatch" && env.split(|b| *b == 0).any(|v| v == want.as_bytes()) {
            found.push(pid);
        }
    }
    assert_eq!(found.len(), 1, "daemon processes for {want}: {found:?}");
    found[0]
}

/// A field of /proc/PID/status in KiB (`VmHWM`: the peak resident set, `VmRSS`).
pub fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// Repeats `call` (an exec or files request) until it answers 200, for up
/// to `within`; meanwhile only 502 is taken (the guest's sshd not up yet,
/// or not trusting the CA yet: cloud-init installs that in its last stage).
pub fn until_guest_ssh(within: Duration, mut call: impl FnMut() -> Response) -> Response {
    let deadline = Instant::now() + within;
    loop {
        let r = call();
        if r.status == 200 {
            return r;
        }
        assert_eq!(r.status, 502, "while the guest boots: {}", r.text);
        assert!(Instant::now() < deadline, "never answered: {}", r.text);
        std::thread::sleep(Duration::from_secs(3));
    }
}

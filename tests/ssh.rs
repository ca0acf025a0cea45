//! The daemon's SSH CA end to end: `POST /vms/{id}/connect` signs a user's
//! key, and stock OpenSSH (`ssh -i KEY -o CertificateFile=CERT -p PORT
//! agent@HOST`) logs in to a real guest with it: the busybox image (OpenSSH
//! sshd, trust from the seed's vendor-data) and the Debian cloud-init image.
//! The certificate is refused by another VM and once it expired; another
//! owner gets 404; the CA key is 0600 and outlives a restart.

mod common;
use common::*;
use serde_json::json;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// `POST /vms/{id}/connect` with `public_key`, as the holder of `key`.
fn connect(d: &Daemon, key: &str, vm: &str, public: &str) -> Response {
    d.as_key(
        key,
        "POST",
        &format!("/vms/{vm}/connect"),
        Some(&json!({ "public_key": public }).to_string()),
    )
}

/// Connects as alice and writes the certificate where `ssh` finds it by
/// name; checks the answer's shape. Returns (cert file, answer).
fn certify(d: &Daemon, vm: &serde_json::Value, key: &Path, public: &str) -> (PathBuf, Response) {
    let id = vm["id"].as_str().unwrap();
    let before = now();
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

/// Stock OpenSSH with the key and the certificate, from the daemon's
/// namespace (a client of the host). Returns (success, stdout + stderr).
fn ssh_cert(d: &Daemon, key: &Path, cert: &Path, port: u64, cmd: &str) -> (bool, String) {
    let out = d.in_ns(
        None,
        &[
            "ssh",
            "-i",
            key.to_str().unwrap(),
            "-o",
            &format!("CertificateFile={}", cert.display()),
            "-o",
            "IdentitiesOnly=yes",
            "-p",
            &port.to_string(),
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "BatchMode=yes",
            "-o",
            "ConnectTimeout=10",
            "-o",
            "LogLevel=ERROR",
            "agent@127.0.0.1",
            cmd,
        ],
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Retries a login that must work (sshd may still be starting).
fn ssh_cert_ok(
    d: &Daemon,
    key: &Path,
    cert: &Path,
    port: u64,
    cmd: &str,
    within: Duration,
) -> String {
    let deadline = std::time::Instant::now() + within;
    loop {
        let (ok, text) = ssh_cert(d, key, cert, port, cmd);
        if ok {
            return text;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "ssh agent@127.0.0.1 -p {port} {cmd:?} with {} never worked: {text}",
            cert.display()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// A login that must be refused by the guest's sshd (not a network error).
fn assert_refused(d: &Daemon, key: &Path, cert: &Path, port: u64, why: &str) {
    let (ok, text) = ssh_cert(d, key, cert, port, "echo logged-in");
    assert!(
        !ok && !text.contains("logged-in"),
        "{why}: logged in: {text}"
    );
    assert!(text.contains("Permission denied"), "{why}: {text}");
}

fn ready_vm(d: &Daemon) -> serde_json::Value {
    let vm = d.create_vm("{}");
    d.wait_console(vm["id"].as_str().unwrap(), "hatch-guest: ready");
    vm
}

#[test]
fn connect_logs_in_to_that_vm_only_for_its_owner() {
    let mut d = Daemon::start();
    let bob = d.create_key(&["--name", "bob"]);
    let (key, public) = keypair(&d.data_dir);
    let a = ready_vm(&d);
    let b = ready_vm(&d);
    let (a_id, b_id) = (a["id"].as_str().unwrap(), b["id"].as_str().unwrap());
    let (a_port, b_port) = (
        a["ssh_port"].as_u64().unwrap(),
        b["ssh_port"].as_u64().unwrap(),
    );

    let (a_cert, r) = certify(&d, &a, &key, &public);
    let ttl = r.body["valid_until"].as_u64().unwrap() - now();
    assert!(
        (250..=300).contains(&ttl),
        "the default TTL is 5 minutes, got {ttl}s"
    );
    let out = ssh_cert_ok(&d, &key, &a_cert, a_port, "id -un; hostname", BOOT_TIMEOUT);
    assert_eq!(out, format!("agent\n{}\n", a_id.replace('_', "-")));

    // The key alone is nobody's: the certificate is what logs in.
    let plain = key.with_file_name("no-such-cert.pub");
    let (ok, text) = ssh_cert(&d, &key, &plain, a_port, "true");
    assert!(!ok && text.contains("Permission denied"), "{text}");
    // Signed for a, so b refuses it; b's own certificate works there.
    assert_refused(&d, &key, &a_cert, b_port, "a's certificate on b");
    let (b_cert, _) = certify(&d, &b, &key, &public);
    ssh_cert_ok(&d, &key, &b_cert, b_port, "true", BOOT_TIMEOUT);
    // Root is not the certificate's user either.
    let out = d.in_ns(
        None,
        &[
            "ssh",
            "-i",
            key.to_str().unwrap(),
            "-o",
            &format!("CertificateFile={}", a_cert.display()),
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "BatchMode=yes",
            "-p",
            &a_port.to_string(),
            "root@127.0.0.1",
            "true",
        ],
    );
    assert!(!out.status.success(), "a certificate logged in as root");

    // Another owner: 404 and no certificate, as for a VM that does not exist.
    let r = connect(&d, &bob, a_id, &public);
    assert_eq!(r.status, 404, "{}", r.text);
    assert!(r.body.get("certificate").is_none(), "{}", r.text);
    assert!(!r.error().is_empty());
    let r = connect(&d, &d.key, "vm_doesnotexist1", &public);
    assert_eq!(r.status, 404, "{}", r.text);

    // Bad keys: 400 with the reason.
    let dsa = std::fs::read_to_string({
        let k = d.data_dir.join("id_dsa");
        let out = std::process::Command::new("ssh-keygen")
            .args(["-q", "-t", "dsa", "-N", "", "-f"])
            .arg(&k)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        k.with_extension("pub")
    })
    .unwrap();
    let long = format!("{public} {}", "x".repeat(9000));
    for (bad, says) in [
        ("", "required"),
        ("ssh-ed25519", "not an OpenSSH public key"),
        (
            "ssh-ed25519 AAAA!!!not-base64 me",
            "not an OpenSSH public key",
        ),
        (long.as_str(), "at most"),
        (dsa.trim(), "ssh-dss"),
    ] {
        let r = connect(&d, &d.key, a_id, bad);
        assert_eq!(r.status, 400, "{bad:.40}: {}", r.text);
        assert!(r.error().contains(says), "{bad:.40}: {}", r.text);
    }
    let r = d.req("POST", &format!("/vms/{a_id}/connect"), Some("{}"));
    assert_eq!(r.status, 400, "{}", r.text);
    let r = d.req(
        "POST",
        &format!("/vms/{a_id}/connect"),
        Some(&json!({"public_key": public, "user": "root"}).to_string()),
    );
    assert_eq!(r.status, 400, "unknown fields are refused: {}", r.text);

    // No network, no SSH port: 409 (the Hatch product's code).
    let offline = d.create_vm(r#"{"enable_network": false}"#);
    let r = connect(&d, &d.key, offline["id"].as_str().unwrap(), &public);
    assert_eq!(r.status, 409, "{}", r.text);
    assert!(r.error().contains("network"), "{}", r.text);

    // The CA key: 0600 in the data dir, the same after a restart, and a
    // certificate signed before the restart still logs in after it.
    let ca = d.data_dir.join("ssh/user_ca");
    let mode = std::fs::metadata(&ca).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "{}", ca.display());
    let before = std::fs::read(&ca).unwrap();
    d.terminate();
    // Readable by others: the daemon refuses to start and says why.
    std::fs::set_permissions(&ca, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err_file = d.data_dir.join("refused.err");
    let mut serve = std::process::Command::new("ip")
        .args(["netns", "exec", &d.ns])
        .arg(bin())
        .arg("serve")
        .env("HATCH_DATA_DIR", &d.data_dir)
        .env("HATCH_HTTP_ADDR", "127.0.0.1:8080")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&err_file).unwrap())
        .spawn()
        .unwrap();
    // `ip netns exec` execs the daemon: killing this child stops it.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = serve.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = serve.kill();
            let _ = serve.wait();
            panic!("hatch serve started with a 0644 CA key");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let err = std::fs::read_to_string(&err_file).unwrap();
    assert!(!status.success(), "started with a 0644 CA key: {err}");
    assert!(err.contains("must be 0600"), "{err}");
    assert_eq!(
        std::fs::metadata(&ca).unwrap().permissions().mode() & 0o777,
        0o644,
        "the refusing daemon changed the key's mode"
    );
    std::fs::set_permissions(&ca, std::fs::Permissions::from_mode(0o600)).unwrap();
    d.restart();
    assert_eq!(std::fs::read(&ca).unwrap(), before, "the CA key changed");
    let r = d.req("POST", &format!("/vms/{a_id}/start"), None);
    assert_eq!(r.status, 200, "{}", r.text);
    d.wait_console(a_id, "hatch-guest: ready boot=2");
    let out = ssh_cert_ok(&d, &key, &a_cert, a_port, "id -un", BOOT_TIMEOUT);
    assert_eq!(out, "agent\n");
    let _ = b_id;
}

#[test]
fn an_expired_certificate_is_refused_and_connect_wakes_a_sleeping_vm() {
    // Long enough for one login under a loaded TCG host, short enough to wait out.
    let d = Daemon::start_with(&[("HATCH_SSH_CERT_TTL", "60s")]);
    let (key, public) = keypair(&d.data_dir);
    let vm = ready_vm(&d);
    let id = vm["id"].as_str().unwrap();
    let port = vm["ssh_port"].as_u64().unwrap();

    let (cert, r) = certify(&d, &vm, &key, &public);
    let until = r.body["valid_until"].as_u64().unwrap();
    assert!(
        until <= now() + 60,
        "valid_until {until} is past the 60s TTL"
    );
    // The guest's clock decides expiry: read it while the certificate works.
    let out = ssh_cert_ok(&d, &key, &cert, port, "date +%s", Duration::from_secs(50));
    let guest_now: i64 = out.trim().parse().unwrap();
    let lag = (now() as i64 - guest_now).max(0) as u64;
    wait_until(
        "the certificate to expire on the guest's clock",
        Duration::from_secs(120),
        || now() > until + lag + 1,
    );
    assert_refused(&d, &key, &cert, port, "an expired certificate");

    // Asleep: connect wakes it (through the manager, as the proxy does), and
    // the new certificate logs in.
    let r = d.req("POST", &format!("/vms/{id}/snapshot"), None);
    assert_eq!(r.status, 201, "{}", r.text);
    assert_eq!(d.vm(id)["state"], "snapshotted");
    let (cert, _) = certify(&d, &vm, &key, &public);
    assert_eq!(d.vm(id)["state"], "running");
    let out = ssh_cert_ok(&d, &key, &cert, port, "id -un", Duration::from_secs(50));
    assert_eq!(out, "agent\n");
}

fn debian_image_dir() -> PathBuf {
    let dir = std::env::var_os("HATCH_TEST_DEBIAN_IMAGE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/hatch-image-debian")
        });
    assert!(
        dir.join("rootfs.ext4").exists(),
        "Debian test image missing in {}: run `hatch image build --kind debian --out {0}` (scripts/test does)",
        dir.display()
    );
    dir
}

#[test]
fn a_debian_guest_trusts_the_ca_through_cloud_init() {
    let img = debian_image_dir();
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
    // The user's own user data stays theirs: the CA comes as vendor-data.
    let user_data =
        "#cloud-config\nwrite_files:\n  - path: /etc/hatch-test/mine.txt\n    content: mine\n";
    let vm = d.create_vm(
        &json!({"image_id": r.body["id"], "mem_mib": 1024, "user_data": user_data}).to_string(),
    );
    let other = ready_vm(&d);
    let (key, public) = keypair(&d.data_dir);
    let (cert, _) = certify(&d, &vm, &key, &public);
    let port = vm["ssh_port"].as_u64().unwrap();
    // A Debian boot under TCG takes minutes; cloud-init runs vendor scripts
    // in its final stage. The certificate may expire meanwhile: sign anew.
    let deadline = std::time::Instant::now() + Duration::from_secs(900);
    let mut cert = cert;
    let out = loop {
        let (ok, text) = ssh_cert(
            &d,
            &key,
            &cert,
            port,
            "id -un; sudo -n true && echo sudo-ok; cat /etc/hatch-test/mine.txt",
        );
        if ok {
            break text;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never logged in: {text}"
        );
        std::thread::sleep(Duration::from_secs(2));
        cert = certify(&d, &vm, &key, &public).0;
    };
    // write_files wrote "mine" without a newline.
    assert_eq!(out, "agent\nsudo-ok\nmine");
    // A certificate for the other VM is refused here.
    let (other_cert, _) = certify(&d, &other, &key, &public);
    assert_refused(
        &d,
        &key,
        &other_cert,
        port,
        "another VM's certificate on Debian",
    );
}

//! The daemon's SSH CA end to end: `POST /vms/{id}/connect` signs a user's
//! key, and stock OpenSSH (`ssh -i KEY -o CertificateFile=CERT -p PORT
//! agent@HOST`) logs in to a real guest with it: the busybox image (OpenSSH
//! sshd, trust from the seed's vendor-data) and the Debian cloud-init image.
//! The certificate is refused by another VM and once it expired; another
//! owner gets 404; the CA key is 0600 and outlives a restart.

mod common;
use common::ssh::*;
use common::*;
use serde_json::json;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

/// A login that must be refused by the guest's sshd (not a network error).
fn assert_refused(d: &Daemon, key: &Path, cert: &Path, port: u64, why: &str) {
    let (ok, text) = d.ssh_cert(None, (key, cert), "agent@127.0.0.1", port, "echo logged-in");
    assert!(
        !ok && !text.contains("logged-in"),
        "{why}: logged in: {text}"
    );
    assert!(text.contains("Permission denied"), "{why}: {text}");
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
    let ttl = r.body["valid_until"].as_u64().unwrap() - unix_now();
    assert!(
        (250..=300).contains(&ttl),
        "the default TTL is 5 minutes, got {ttl}s"
    );
    let out = d.ssh_cert_ok((&key, &a_cert), a_port, "id -un; hostname", BOOT_TIMEOUT);
    assert_eq!(out, format!("agent\n{}\n", a_id.replace('_', "-")));

    // The key alone is nobody's: the certificate is what logs in.
    let plain = key.with_file_name("no-such-cert.pub");
    let (ok, text) = d.ssh_cert(None, (&key, &plain), "agent@127.0.0.1", a_port, "true");
    assert!(!ok && text.contains("Permission denied"), "{text}");
    // Signed for a, so b refuses it; b's own certificate works there.
    assert_refused(&d, &key, &a_cert, b_port, "a's certificate on b");
    let (b_cert, _) = certify(&d, &b, &key, &public);
    d.ssh_cert_ok((&key, &b_cert), b_port, "true", BOOT_TIMEOUT);
    // Root is not the certificate's user either.
    let (ok, _) = d.ssh_cert(None, (&key, &a_cert), "root@127.0.0.1", a_port, "true");
    assert!(!ok, "a certificate logged in as root");

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
    let out = d.ssh_cert_ok((&key, &a_cert), a_port, "id -un", BOOT_TIMEOUT);
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
        until <= unix_now() + 60,
        "valid_until {until} is past the 60s TTL"
    );
    // The guest's clock decides expiry: read it while the certificate works.
    let out = d.ssh_cert_ok((&key, &cert), port, "date +%s", Duration::from_secs(50));
    let guest_now: i64 = out.trim().parse().unwrap();
    let lag = (unix_now() as i64 - guest_now).max(0) as u64;
    wait_until(
        "the certificate to expire on the guest's clock",
        Duration::from_secs(120),
        || unix_now() > until + lag + 1,
    );
    assert_refused(&d, &key, &cert, port, "an expired certificate");

    // Asleep: connect wakes it (through the manager, as the proxy does), and
    // the new certificate logs in.
    let r = d.req("POST", &format!("/vms/{id}/snapshot"), None);
    assert_eq!(r.status, 201, "{}", r.text);
    assert_eq!(d.vm(id)["state"], "snapshotted");
    let (cert, _) = certify(&d, &vm, &key, &public);
    assert_eq!(d.vm(id)["state"], "running");
    let out = d.ssh_cert_ok((&key, &cert), port, "id -un", Duration::from_secs(50));
    assert_eq!(out, "agent\n");
}

#[test]
fn a_debian_guest_trusts_the_ca_through_cloud_init() {
    let (d, image) = debian_daemon(&debian_image_dir());
    // The user's own user data stays theirs: the CA comes as vendor-data.
    let user_data =
        "#cloud-config\nwrite_files:\n  - path: /etc/hatch-test/mine.txt\n    content: mine\n";
    let vm = d.create_vm(
        &json!({"image_id": image, "mem_mib": 1024, "user_data": user_data}).to_string(),
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
        let (ok, text) = d.ssh_cert(
            None,
            (&key, &cert),
            "agent@127.0.0.1",
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

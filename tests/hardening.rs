//! A hostile client against the API and the proxy: junk and foreign ids,
//! slow and too many connections, oversized bodies, names that hide text,
//! spoofed forwarding headers and a huge Host. The daemon runs in its own
//! namespace; clients are raw TCP (from a thread inside that namespace) and curl.

#[macro_use]
mod common;
use common::hardening::*;
use common::web::*;
use common::*;
use serde_json::{json, Value};
use std::io::Write;
use std::time::Duration;

fn id_of(v: &Value) -> String {
    v["id"].as_str().unwrap().to_string()
}

#[test]
fn junk_and_foreign_ids_are_404_and_cost_the_daemon_no_memory() {
    let d = Daemon::start();
    let bob = d.create_key(&["--name", "bob"]);
    // Running is enough: the guest need not have finished booting.
    let vm = id_of(&d.create_vm(r#"{"enable_network": false}"#));

    let mut client = RawClient::new(d.connect("127.0.0.1:8080"));
    let mut hammer = |n: usize| {
        for _ in 0..n {
            let path = format!("/vms/{}/stop", junk(15_000));
            let (status, body) = client.request("POST", &path, &bob);
            assert_eq!(status, 404, "{body}");
            assert!(
                body.len() < 200,
                "the id is not echoed: {} bytes",
                body.len()
            );
        }
    };
    // Warm up the allocator and the connection before measuring.
    hammer(200);
    let before = d.rss_kib();
    hammer(2_000);
    let after = d.rss_kib();
    eprintln!("daemon VmRSS: {before} KiB before 2,000 junk ids, {after} KiB after");
    // 2,000 lock entries of 15 KB would be 30 MB; allow allocator noise only.
    assert!(
        after < before + 8 * 1024,
        "the daemon grew from {before} KiB to {after} KiB"
    );

    // Another owner's real id: 404 for every verb, and alice's VM is untouched.
    for (m, p) in [
        ("GET", format!("/vms/{vm}")),
        ("POST", format!("/vms/{vm}/stop")),
        ("POST", format!("/vms/{vm}/start")),
        ("POST", format!("/vms/{vm}/snapshot")),
        ("POST", format!("/vms/{vm}/restore")),
        ("GET", format!("/vms/{vm}/logs")),
        ("DELETE", format!("/vms/{vm}")),
    ] {
        for _ in 0..50 {
            let (status, body) = client.request(m, &p, &bob);
            assert_eq!(status, 404, "{m} {p} as bob: {body}");
        }
    }
    assert_eq!(d.vm(&vm)["state"], "running");
    assert_eq!(d.vmm_pids_of(&vm).len(), 1);
    // Junk of every kind of id is 404 without a lookup; a real one still works.
    for (m, p) in [
        ("GET", "/images/img_nope".to_string()),
        ("GET", "/templates/tpl_UPPERCASE123".to_string()),
        ("DELETE", "/snapshots/snap_%00%01".to_string()),
        ("DELETE", format!("/vms/{vm}/routes/rt_{}", junk(5000))),
        (
            "POST",
            format!("/instances/{vm}/snapshots/{}/restore", junk(40)),
        ),
    ] {
        let (status, body) = client.request(m, &p, &d.key);
        assert_eq!(status, 404, "{m} {p}: {body}");
    }
    let (status, body) = client.request("GET", "/images/img_default", &d.key);
    assert_eq!(status, 200, "{body}");
}

#[test]
fn slow_clients_are_cut_off_after_the_header_timeout() {
    let d = Daemon::start_with(&[("HATCH_API_HEADER_TIMEOUT", "2s")]);
    // Half a request line, never finished.
    let mut half = d.connect("127.0.0.1:8080");
    half.write_all(b"GET /hea").unwrap();
    // Nothing at all.
    let mut silent = d.connect("127.0.0.1:8080");
    // Headers trickling in, one byte a second: each byte is progress, but the
    // headers are not done in time.
    let mut trickle = d.connect("127.0.0.1:8080");
    let trickler = {
        let mut s = trickle.try_clone().unwrap();
        std::thread::spawn(move || {
            for b in b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaa" {
                if s.write_all(&[*b]).is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(500));
            }
        })
    };
    // An idle keep-alive connection after one answered request.
    let mut idle = RawClient::new(d.connect("127.0.0.1:8080"));
    assert_eq!(idle.request("GET", "/health", "").0, 200);

    let limit = Duration::from_secs(60);
    assert!(closed_within(&mut half, limit), "half a request line");
    assert!(closed_within(&mut silent, limit), "a silent connection");
    assert!(closed_within(&mut trickle, limit), "a trickling client");
    let mut idle = idle.into_stream();
    assert!(
        closed_within(&mut idle, limit),
        "an idle keep-alive connection"
    );
    trickler.join().unwrap();
    // The daemon still serves.
    assert_eq!(d.req("GET", "/vms", None).status, 200);
}

/// The header timeout bounds waiting for a request, not a response: a log
/// follower streams for as long as its VM runs, and the daemon's SIGTERM
/// (VMs stopped first, then the connections drained) ends it cleanly.
#[test]
fn a_log_follower_outlives_the_header_timeout_and_ends_at_shutdown() {
    let mut d = Daemon::start_with(&[("HATCH_API_HEADER_TIMEOUT", "1s")]);
    let vm = id_of(&d.create_vm(r#"{"enable_network": false}"#));
    let follower = std::process::Command::new("ip")
        .args(["netns", "exec", &d.ns, "curl", "-sSN", "--max-time", "300"])
        .arg("-H")
        .arg(format!("X-API-Key: {}", d.key))
        .arg(format!("{BASE}/vms/{vm}/logs?follow=true"))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Killed if the test fails before it ends by itself.
    struct Reap(Option<std::process::Child>);
    impl Drop for Reap {
        fn drop(&mut self) {
            if let Some(c) = self.0.as_mut() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
    let mut follower = Reap(Some(follower));
    d.wait_console(&vm, "hatch-guest: ready");
    // Several header timeouts later, the stream is still open.
    std::thread::sleep(Duration::from_secs(5));
    let running = follower.0.as_mut().unwrap().try_wait().unwrap().is_none();
    assert!(running, "the follow stream ended while the VM runs");
    d.terminate();
    let out = follower.0.take().unwrap().wait_with_output().unwrap();
    assert!(out.status.success(), "the stream ended cleanly: {out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("hatch-guest: ready") && text.contains("hatch-guest: shutting down"),
        "{text}"
    );
}

/// The proxy's header timeout is 30 s and not configurable: this waits for it.
#[test]
fn the_proxy_cuts_off_a_client_that_sends_nothing() {
    let d = Daemon::start();
    let mut silent = d.connect("127.0.0.1:8081");
    let mut preface = d.connect("127.0.0.1:8081");
    // The first half of the HTTP/2 preface: the protocol is not known yet.
    preface.write_all(b"PRI * HTTP/2.0\r\n").unwrap();
    let limit = Duration::from_secs(120);
    assert!(closed_within(&mut silent, limit), "a silent connection");
    assert!(closed_within(&mut preface, limit), "half an HTTP/2 preface");
}

#[test]
fn connections_beyond_the_limit_wait_until_one_closes() {
    let d = Daemon::start_with(&[("HATCH_API_MAX_CONNECTIONS", "2")]);
    let mut first = RawClient::new(d.connect("127.0.0.1:8080"));
    let mut second = RawClient::new(d.connect("127.0.0.1:8080"));
    assert_eq!(first.request("GET", "/health", "").0, 200);
    assert_eq!(second.request("GET", "/health", "").0, 200);

    // The kernel completes the third handshake, but nobody serves it.
    let mut third = d.connect("127.0.0.1:8080");
    third
        .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    third
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    let mut buf = [0u8; 512];
    let early = std::io::Read::read(&mut third, &mut buf);
    assert!(
        matches!(&early, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "the third connection was served while two were open: {early:?} {:?}",
        String::from_utf8_lossy(&buf)
    );
    // The first two keep working.
    assert_eq!(first.request("GET", "/health", "").0, 200);

    // One closes: the waiting one is served.
    drop(second);
    let mut third = RawClient::new(third);
    let (status, body) = third.response();
    assert_eq!(status, 200, "{body}");
    assert_eq!(first.request("GET", "/health", "").0, 200);
}

/// curl with a body read from a file (a 2 MiB body is too long for argv).
fn post_file(d: &Daemon, path: &str, body: &[u8]) -> (u16, String) {
    let file = d.data_dir.join("body.json");
    std::fs::write(&file, body).unwrap();
    let out = d.in_ns(
        None,
        &[
            "curl",
            "-sS",
            "--max-time",
            "120",
            "-X",
            "POST",
            "-H",
            &format!("Authorization: Bearer {}", d.key),
            "-H",
            "Content-Type: application/json",
            "-H",
            "Expect:",
            "--data-binary",
            &format!("@{}", file.display()),
            "-w",
            "\n%{http_code}",
            &format!("{BASE}{path}"),
        ],
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "000"));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

#[test]
fn a_body_over_the_limit_is_413_and_creates_nothing() {
    let d = Daemon::start();
    let big = "x".repeat(2 * 1024 * 1024);
    // A JSON image request (a path import) has a smaller limit of its own.
    for (path, body, limit) in [
        (
            "/vms",
            json!({ "user_data": big, "enable_network": false }),
            "1 MiB",
        ),
        (
            "/templates",
            json!({ "name": "big", "user_data": big }),
            "1 MiB",
        ),
        (
            "/images",
            json!({ "name": big, "kernel_path": "/k", "rootfs_path": "/r" }),
            "64 KiB",
        ),
    ] {
        let (status, text) = post_file(&d, path, body.to_string().as_bytes());
        assert_eq!(status, 413, "{path}: {text}");
        let v: Value = serde_json::from_str(&text).expect("a JSON body");
        assert!(v["error"].as_str().unwrap().contains(limit), "{text}");
    }
    assert_eq!(d.req("GET", "/vms", None).body, json!([]));
    assert_eq!(d.req("GET", "/templates", None).body, json!([]));
    assert_eq!(d.req("GET", "/images", None).ids(), ["img_default"]);
    assert!(
        std::fs::read_dir(d.data_dir.join("vms"))
            .map(|mut r| r.next().is_none())
            .unwrap_or(true),
        "no VM directory was made"
    );
    // The largest user_data allowed (256 KiB) still fits, escaped.
    let ok = json!({ "name": "fits", "user_data": "\n".repeat(256 * 1024) });
    let (status, text) = post_file(&d, "/templates", ok.to_string().as_bytes());
    assert_eq!(status, 201, "{text}");
}

#[test]
fn names_with_bidi_or_control_characters_are_400_and_create_nothing() {
    let d = Daemon::start();
    let vm = "vm_abcdefghijkl";
    for bad in [
        "invoice\u{202E}fdp.exe",
        "a\u{2066}b\u{2069}",
        "\u{200F}right-to-left",
        "arabic\u{061C}mark",
        "zero\u{200B}width",
        "bell\u{7}",
    ] {
        for (path, body) in [
            ("/templates".to_string(), json!({ "name": bad })),
            (
                "/templates".to_string(),
                json!({ "name": "ok", "description": format!("about {bad}") }),
            ),
            (
                "/images".to_string(),
                json!({ "name": bad, "kernel_path": "/k", "rootfs_path": "/r" }),
            ),
            (
                format!("/instances/{vm}/snapshots"),
                json!({ "kind": "Stopped", "tags": { bad: "v" } }),
            ),
            (
                format!("/instances/{vm}/snapshots"),
                json!({ "kind": "Stopped", "tags": { "k": bad } }),
            ),
            (
                "/vms".to_string(),
                json!({ "name": bad, "enable_network": false }),
            ),
        ] {
            let r = d.req("POST", &path, Some(&body.to_string()));
            assert_eq!(r.status, 400, "{path} {body}: {}", r.text);
            r.error();
        }
    }
    assert_eq!(d.req("GET", "/templates", None).body, json!([]));
    assert_eq!(d.req("GET", "/vms", None).body, json!([]));
    assert_eq!(d.req("GET", "/images", None).ids(), ["img_default"]);
    // Names in any script are fine.
    let r = d.req(
        "POST",
        "/templates",
        Some(r#"{"name": "Überprüfung 日本語"}"#),
    );
    assert_eq!(r.status, 201, "{}", r.text);
}

/// A curl through the proxy from `ns` (the daemon's when None) to `ip`.
fn proxied(
    d: &Daemon,
    ns: Option<&str>,
    ip: &str,
    host: &str,
    path: &str,
    args: &[&str],
) -> (u16, String) {
    let out = d.in_ns(
        ns,
        &[
            &[
                "curl",
                "-sS",
                "--max-time",
                "120",
                "-H",
                &format!("Host: {host}"),
            ][..],
            args,
            &["-w", "\n%{http_code}", &format!("http://{ip}:8081{path}")],
        ]
        .concat(),
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "000"));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

const SPOOF: [&str; 10] = [
    "-H",
    "X-Forwarded-For: 203.0.113.9",
    "-H",
    "X-Forwarded-Host: bank.example",
    "-H",
    "X-Forwarded-Proto: https",
    "-H",
    "X-Real-IP: 203.0.113.9",
    "-H",
    "Forwarded: for=203.0.113.9;proto=https",
];

#[test]
fn the_guest_sees_the_proxys_forwarding_headers_unless_the_peer_is_trusted() {
    let mut d = Daemon::start_with(&[
        ("HATCH_PROXY_ADDR", "0.0.0.0:8081"),
        // The client namespace plays a load balancer in front of hatch.
        ("HATCH_PROXY_TRUSTED_PROXIES", "10.77.0.2/32"),
    ]);
    let front = d.add_client();
    let vm = id_of(&d.create_vm(&json!({ "user_data": web_user_data(None) }).to_string()));
    d.wait_console(&vm, READY_LINE);
    let r = d.req(
        "POST",
        &format!("/vms/{vm}/routes"),
        Some(&json!({"target_port": HEADERS_PORT, "subdomain": "hdr"}).to_string()),
    );
    assert_eq!(r.status, 201, "{}", r.text);

    // An untrusted client (127.0.0.1): its own values are gone, ours are there.
    let (code, seen) = proxied(&d, None, "127.0.0.1", "hdr.localhost", HEADERS_PATH, &SPOOF);
    assert_eq!(code, 200, "{seen}");
    let seen = seen.to_ascii_lowercase();
    assert!(!seen.contains("203.0.113.9"), "{seen}");
    assert!(!seen.contains("bank.example"), "{seen}");
    assert!(!seen.contains("https"), "{seen}");
    for want in [
        "x-forwarded-for: 127.0.0.1\n",
        "x-forwarded-host: hdr.localhost\n",
        "x-forwarded-proto: http\n",
        "x-real-ip: 127.0.0.1\n",
        "forwarded: for=127.0.0.1;host=\"hdr.localhost\";proto=http\n",
    ] {
        assert!(seen.contains(want), "{want:?} not in:\n{seen}");
    }

    // A trusted front proxy: its values are kept, our hop appended.
    let (code, seen) = proxied(
        &d,
        Some(&front),
        "10.77.0.1",
        "hdr.localhost",
        HEADERS_PATH,
        &SPOOF,
    );
    assert_eq!(code, 200, "{seen}");
    let seen = seen.to_ascii_lowercase();
    for want in [
        "x-forwarded-for: 203.0.113.9, 10.77.0.2\n",
        "x-forwarded-host: bank.example\n",
        "x-forwarded-proto: https\n",
        "x-real-ip: 203.0.113.9\n",
        "forwarded: for=203.0.113.9;proto=https, for=10.77.0.2;host=\"hdr.localhost\";proto=http\n",
    ] {
        assert!(seen.contains(want), "{want:?} not in:\n{seen}");
    }

    // The Host is never echoed: neither a 60 KB one nor an unknown one.
    let huge = format!("{}.localhost", "a".repeat(60_000));
    let (code, body) = proxied(&d, None, "127.0.0.1", &huge, "/", &[]);
    assert_eq!(code, 400, "{}", &body[..body.len().min(300)]);
    assert!(body.len() < 200, "{} bytes", body.len());
    serde_json::from_str::<Value>(&body).expect("a JSON body");
    let (code, body) = proxied(&d, None, "127.0.0.1", "nosuchroute.localhost", "/", &[]);
    assert_eq!(code, 404, "{body}");
    assert!(body.contains("no route for this host"), "{body}");
    assert!(!body.contains("nosuchroute"), "{body}");
}

#[test]
fn a_stopped_vm_is_not_woken_by_a_request() {
    let d = Daemon::start();
    let vm = id_of(&d.create_vm(&json!({ "user_data": web_user_data(None) }).to_string()));
    d.wait_console(&vm, READY_LINE);
    let r = d.req(
        "POST",
        &format!("/vms/{vm}/routes"),
        Some(&json!({"target_port": 80, "subdomain": "site"}).to_string()),
    );
    assert_eq!(r.status, 201, "{}", r.text);
    let r = d.req("POST", &format!("/vms/{vm}/stop"), None);
    assert_eq!(r.status, 200, "{}", r.text);

    for _ in 0..3 {
        let (code, body) = proxied(&d, None, "127.0.0.1", "site.localhost", "/", &[]);
        assert_eq!(code, 503, "{body}");
        let v: Value = serde_json::from_str(&body).expect("a JSON body");
        assert!(v["error"].as_str().unwrap().contains("stopped"), "{body}");
    }
    assert_eq!(d.vm(&vm)["state"], "stopped");
    assert!(d.vmm_pids_of(&vm).is_empty(), "no VMM was started");
    // Its owner can still start it, and then the route serves.
    let r = d.req("POST", &format!("/vms/{vm}/start"), None);
    assert_eq!(r.status, 200, "{}", r.text);
    d.wait_console(&vm, READY_LINE);
    wait_until("the route serves", Duration::from_secs(120), || {
        proxied(&d, None, "127.0.0.1", "site.localhost", "/", &[]).0 == 200
    });
}

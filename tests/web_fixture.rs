//! The web guest fixture (tests/common/web.rs) on its own: every endpoint,
//! straight to the guest's address from the daemon's namespace (no proxy).

mod common;
use common::web::*;
use common::*;
use serde_json::json;
use std::io::Read;
use std::time::{Duration, Instant};

#[test]
fn web_guest_serves_files_cgi_and_websocket() {
    let d = Daemon::start();
    let t0 = Instant::now();
    let vm = d.create_vm(&json!({ "user_data": web_user_data(None) }).to_string());
    let id = vm["id"].as_str().unwrap();
    let ip = vm["guest_ip"].as_str().unwrap();
    d.wait_console(id, READY_LINE);
    eprintln!("web guest ready after {:?}", t0.elapsed());

    // curl from the daemon's namespace; the body on success.
    let curl = |args: &[&str]| -> Vec<u8> {
        let mut cmd = vec!["curl", "-sS", "--fail", "--max-time", "300"];
        cmd.extend_from_slice(args);
        let out = d.in_ns(None, &cmd);
        assert!(
            out.status.success(),
            "{cmd:?}: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            d.logs(id)
        );
        out.stdout
    };
    let text = |args: &[&str]| String::from_utf8(curl(args)).unwrap();
    let base = format!("http://{ip}");

    assert_eq!(
        text(&[&format!("{base}/index.html")]),
        format!("hello from {}\n", id.replace('_', "-"))
    );

    let t = Instant::now();
    let big = d.data_dir.join("big.bin");
    curl(&["-o", big.to_str().unwrap(), &format!("{base}/big.bin")]);
    let big = std::fs::read(&big).unwrap();
    assert_eq!(big.len(), BIG_MIB << 20);
    let want = text(&[&format!("{base}/big.sha256")]);
    assert_eq!(want.len(), 64, "{want:?}");
    assert_eq!(sha256_hex(&big), want);
    eprintln!("big.bin download: {:?}", t.elapsed());

    let t = Instant::now();
    let mut body = vec![0u8; BIG_MIB << 20];
    std::fs::File::open("/dev/urandom")
        .unwrap()
        .read_exact(&mut body)
        .unwrap();
    let upload = d.data_dir.join("upload.bin");
    std::fs::write(&upload, &body).unwrap();
    let got = text(&[
        "--data-binary",
        &format!("@{}", upload.display()),
        &format!("{base}/cgi-bin/sha256"),
    ]);
    assert_eq!(got, format!("{}\n", sha256_hex(&body)));
    eprintln!("32 MiB POST to cgi-bin/sha256: {:?}", t.elapsed());
    assert_eq!(
        text(&["--data-binary", "abc", &format!("{base}/cgi-bin/sha256")]),
        format!("{}\n", sha256_hex(b"abc"))
    );

    let t = Instant::now();
    assert_eq!(text(&[&format!("{base}/cgi-bin/slow?2")]), "slow done\n");
    let slow = t.elapsed();
    assert!(slow >= Duration::from_secs(2), "{slow:?}");
    eprintln!("slow?2: {slow:?}");

    let headers = text(&[
        "-H",
        "Host: example.test",
        "-H",
        "X-Forwarded-For: 1.2.3.4",
        "-H",
        "X-Forwarded-Proto: https",
        "-H",
        "X-Forwarded-Host: app.example.test",
        &format!("http://{ip}:{HEADERS_PORT}{HEADERS_PATH}"),
    ]);
    for line in [
        "Host: example.test",
        "X-Forwarded-For: 1.2.3.4",
        "X-Forwarded-Proto: https",
        "X-Forwarded-Host: app.example.test",
    ] {
        assert!(headers.lines().any(|l| l == line), "{line:?} in {headers}");
    }

    let t = Instant::now();
    let ws = format!("{ip}:{WS_PORT}");
    let replies = ws_echo(
        &d.ns,
        &ws,
        "example.test",
        "/ws",
        &["hello", "second message"],
    );
    assert_eq!(replies.unwrap(), ["hello", "second message"]);
    eprintln!("ws_echo: {:?}", t.elapsed());
    // A new connection after the first one ended.
    let replies = ws_echo(&d.ns, &ws, "app.localhost", "/", &["again"]);
    assert_eq!(replies.unwrap(), ["again"]);
    eprintln!("whole test: {:?}", t0.elapsed());
}

//! Running commands in real guests: the daemon's SSH client (src/ssh/client.rs)
//! against the busybox image's OpenSSH sshd, `POST /vms/{id}/exec` and the
//! streaming exec over WebSocket.

mod common;
use common::ssh::*;
use common::*;
use hatch::ssh::client::{
    ChannelSpec, ClientError, ExitStatus, GuestSession, Output, PtySize, Signal,
};
use hatch::ssh::Ca;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::time::Duration;

/// Runs `f` on a fresh thread that joined the daemon's network namespace
/// (where the guests' bridge is), with a runtime of its own.
fn in_daemon_ns<T: Send + 'static>(
    d: &Daemon,
    f: impl FnOnce() -> std::pin::Pin<Box<dyn std::future::Future<Output = T>>> + Send + 'static,
) -> T {
    let ns = std::fs::File::open(format!("/var/run/netns/{}", d.ns)).expect("the daemon's netns");
    std::thread::spawn(move || {
        // SAFETY: setns(2) with an open nsfs file and CLONE_NEWNET; it only
        // changes this thread's network namespace, and this thread is ours.
        let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(f())
    })
    .join()
    .expect("the client thread")
}

/// Everything a remote command sent, until its channel closed.
#[derive(Debug, Default)]
struct Collected {
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    exit: Option<ExitStatus>,
}

async fn collect(out: &mut hatch::ssh::client::OutputStream) -> Collected {
    let mut c = Collected::default();
    while let Some(o) = tokio::time::timeout(Duration::from_secs(60), out.next())
        .await
        .expect("the command's output within a minute")
    {
        match o {
            Output::Stdout(b) => c.stdout.extend_from_slice(&b),
            Output::Stderr(b) => c.stderr.extend_from_slice(&b),
            Output::Exit(e) => c.exit = Some(e),
        }
    }
    c
}

/// The client module alone, against a real guest: a fresh key signed by the
/// daemon's CA logs in as `agent`; stdin, stdout, stderr and the exit code
/// go through; a PTY is a terminal of the asked size and follows a resize;
/// a signal ends a command; a certificate for another VM is refused.
#[test]
fn ssh_client_runs_commands_in_a_real_guest() {
    let d = Daemon::start();
    let vm = ready_vm(&d);
    let other = ready_vm(&d);
    let id = vm["id"].as_str().unwrap().to_string();
    let ip = vm["guest_ip"].as_str().unwrap().to_string();
    // The daemon's own CA, as the daemon loads it.
    let (ca, made) = Ca::load_or_create(&d.data_dir.join("ssh")).unwrap();
    assert!(!made, "the daemon made its CA at start-up");
    let addr: SocketAddr = format!("{ip}:22").parse().unwrap();

    let ca2 = std::sync::Arc::new(ca);
    let ca = ca2.clone();
    let id2 = id.clone();
    in_daemon_ns(&d, move || {
        Box::pin(async move {
            // sshd may still be starting right after the ready line.
            let deadline = std::time::Instant::now() + Duration::from_secs(60);
            let s = loop {
                match GuestSession::connect(&ca, &id2, addr, Duration::from_secs(20)).await {
                    Ok(s) => break s,
                    Err(e) if std::time::Instant::now() < deadline => {
                        eprintln!("not yet: {e}");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                    Err(e) => panic!("connecting to {id2} at {addr}: {e}"),
                }
            };

            // stdin in, stdout and stderr apart, the exit code.
            let mut p = s
                .open(&ChannelSpec {
                    command: Some(
                        "echo out; echo err >&2; read x; echo \"got $x as $(id -un)\"; exit 3"
                            .into(),
                    ),
                    pty: None,
                })
                .await
                .unwrap();
            p.input.write(&b"hello\n"[..]).await.unwrap();
            p.input.eof().await.unwrap();
            let c = collect(&mut p.output).await;
            assert_eq!(
                String::from_utf8_lossy(&c.stdout),
                "out\ngot hello as agent\n"
            );
            assert_eq!(String::from_utf8_lossy(&c.stderr), "err\n");
            assert_eq!(c.exit, Some(ExitStatus::Code(3)));

            // A PTY: a terminal of the asked size, resized while it runs.
            let mut p = s
                .open(&ChannelSpec {
                    command: Some("tty; stty size; read x; stty size".into()),
                    pty: Some(PtySize {
                        cols: 100,
                        rows: 40,
                        term: None,
                    }),
                })
                .await
                .unwrap();
            let mut seen = Vec::new();
            while !String::from_utf8_lossy(&seen).contains("40 100") {
                match tokio::time::timeout(Duration::from_secs(30), p.output.next())
                    .await
                    .expect("the PTY's first output")
                {
                    Some(Output::Stdout(b)) => seen.extend_from_slice(&b),
                    other => panic!("before the size: {other:?}; seen {seen:?}"),
                }
            }
            p.input.resize(120, 50).await.unwrap();
            p.input.write(&b"go\n"[..]).await.unwrap();
            let c = collect(&mut p.output).await;
            seen.extend_from_slice(&c.stdout);
            let text = String::from_utf8_lossy(&seen);
            assert!(text.contains("/dev/pts/"), "{text}");
            assert!(text.contains("50 120"), "the resize: {text}");
            assert_eq!(c.exit, Some(ExitStatus::Code(0)));

            // A signal ends a command.
            let mut p = s
                .open(&ChannelSpec {
                    command: Some("exec sleep 100".into()),
                    pty: None,
                })
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(500)).await;
            p.input.signal(Signal::Term).await.unwrap();
            let c = collect(&mut p.output).await;
            assert_eq!(
                c.exit,
                Some(ExitStatus::Signal {
                    name: "TERM".into(),
                    core_dumped: false
                })
            );
            s.close().await;
        })
    });
    // Another VM refuses a certificate made for this one.
    let other_addr: SocketAddr = format!("{}:22", other["guest_ip"].as_str().unwrap())
        .parse()
        .unwrap();
    let ca = ca2.clone();
    let refused = in_daemon_ns(&d, move || {
        Box::pin(async move {
            // Retried while the other guest's sshd is not up yet; a refusal
            // (or a login) ends it.
            let deadline = std::time::Instant::now() + Duration::from_secs(60);
            loop {
                match GuestSession::connect(&ca, &id, other_addr, Duration::from_secs(20)).await {
                    Ok(_) => return None,
                    Err(e @ ClientError::Refused { .. }) => return Some(e.to_string()),
                    Err(e) if std::time::Instant::now() < deadline => {
                        eprintln!("not yet: {e}");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                    Err(e) => panic!("reaching {other_addr}: {e}"),
                }
            }
        })
    });
    let refused = refused.expect("a certificate for another VM logged in to it");
    assert!(refused.contains("refused"), "{refused}");
}

// ------------------------------------------------------------ the HTTP API

fn exec(d: &Daemon, key: &str, vm: &str, body: serde_json::Value) -> Response {
    d.as_key(
        key,
        "POST",
        &format!("/vms/{vm}/exec"),
        Some(&body.to_string()),
    )
}

/// An exec that must answer 200; sshd may still be starting just after the
/// ready line, which the daemon itself waits out.
fn exec_ok(d: &Daemon, vm: &str, body: serde_json::Value) -> serde_json::Value {
    let r = exec(d, &d.key, vm, body.clone());
    assert_eq!(r.status, 200, "exec {body}: {}", r.text);
    r.body
}

/// How many processes in the guest run `needle` (counted by an exec).
fn guest_count(d: &Daemon, vm: &str, needle: &str) -> u64 {
    // `[x]yz` keeps grep from counting itself.
    let pattern = format!("[{}]{}", &needle[..1], &needle[1..]);
    let out = exec_ok(
        d,
        vm,
        serde_json::json!({ "command": format!("ps -o args | grep -c '{pattern}' || true") }),
    );
    out["stdout"].as_str().unwrap().trim().parse().unwrap()
}

#[test]
fn exec_runs_commands_for_their_owner_only() {
    use serde_json::json;
    let d = Daemon::start();
    let bob = d.create_key(&["--name", "bob"]);
    let vm = ready_vm(&d);
    let id = vm["id"].as_str().unwrap();
    let offline = d.create_vm(r#"{"enable_network": false}"#);
    let offline_id = offline["id"].as_str().unwrap();
    // A guest that no longer accepts the daemon's certificate: its user data
    // (run as root after the seed's vendor-data) names another principal.
    let refusing = d.create_vm(
        &json!({ "user_data": "#!/bin/sh\necho vm_someoneelse > /etc/ssh/hatch/principals/agent\necho principals-replaced\n" })
            .to_string(),
    );
    let refusing_id = refusing["id"].as_str().unwrap();

    // The Hatch shape: a shell line, its stdout, stderr and exit code, as agent.
    let r = exec_ok(
        &d,
        id,
        json!({ "command": "echo out; echo err >&2; id -un; exit 3" }),
    );
    assert_eq!(r["stdout"], "out\nagent\n");
    assert_eq!(r["stderr"], "err\n");
    assert_eq!(r["exit_code"], 3);
    assert_eq!(r["timed_out"], false);
    assert_eq!(r["stdout_truncated"], false);
    assert_eq!(r["stderr_truncated"], false);
    // stdin, env and cwd.
    let r = exec_ok(
        &d,
        id,
        json!({
            "command": "read a; echo \"$a|$GREETING|$EMPTY|$(pwd)\"; cat",
            "stdin": "first line\nrest\n",
            "env": { "GREETING": "it's $HOME", "EMPTY": "" },
            "cwd": "/tmp",
        }),
    );
    assert_eq!(r["stdout"], "first line|it's $HOME||/tmp\nrest\n", "{r}");
    assert_eq!(r["exit_code"], 0);
    // An argv reaches the program word for word, with no shell in between.
    let r = exec_ok(
        &d,
        id,
        json!({ "command": ["printf", "[%s]\\n", "a b", "$(id)", "it's", ""] }),
    );
    assert_eq!(r["stdout"], "[a b]\n[$(id)]\n[it's]\n[]\n", "{r}");
    // A missing cwd: the command does not run, and stderr says why.
    let r = exec_ok(&d, id, json!({ "command": "echo ran", "cwd": "/no/such" }));
    assert_eq!(r["stdout"], "");
    assert_ne!(r["exit_code"], 0);
    assert!(r["stderr"].as_str().unwrap().contains("/no/such"), "{r}");

    // The CLI: `hatch vm exec VM -- argv...` prints stdout and stderr apart
    // and exits with the command's code; -i sends its stdin.
    let mut cli = std::process::Command::new("ip")
        .args(["netns", "exec", &d.ns])
        .arg(bin())
        .args(["vm", "exec", id, "-e", "WHO=cli", "-i", "--"])
        .args(["sh", "-c", "read l; echo \"$l $WHO\"; echo e >&2; exit 6"])
        .env("HATCH_URL", BASE)
        .env("HATCH_API_KEY", &d.key)
        .env("HOME", &d.data_dir)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut cli.stdin.take().unwrap(), b"piped\n").unwrap();
    let out = cli.wait_with_output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "piped cli\n");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "e\n");
    assert_eq!(out.status.code(), Some(6));

    // Bad input is a 400 that names the problem, before the guest is reached.
    for (body, says) in [
        (json!({ "command": "" }), "command"),
        (json!({ "command": "   " }), "command"),
        (json!({ "command": [] }), "command"),
        (json!({}), "command"),
        (
            json!({ "command": "true", "env": { "BAD-NAME": "x" } }),
            "BAD-NAME",
        ),
        (json!({ "command": "true", "env": { "1X": "x" } }), "1X"),
        (
            json!({ "command": "true", "timeout_seconds": 0 }),
            "timeout_seconds",
        ),
        (
            json!({ "command": "true", "timeout_seconds": 3601 }),
            "timeout_seconds",
        ),
        (json!({ "command": "true", "shell": "bash" }), "shell"),
    ] {
        let r = exec(&d, &d.key, id, body.clone());
        assert_eq!(r.status, 400, "{body}: {}", r.text);
        assert!(r.error().contains(says), "{body}: {}", r.text);
    }
    // Over the API's 1 MiB body limit (from a file: too big for argv).
    let big = d.data_dir.join("big-body.json");
    let body = json!({ "command": "cat", "stdin": "x".repeat(2 * 1024 * 1024) });
    std::fs::write(&big, body.to_string()).unwrap();
    let out = d
        .curl_in_ns("60")
        .args([
            "-X",
            "POST",
            "-H",
            &format!("Authorization: Bearer {}", d.key),
        ])
        .arg("--data-binary")
        .arg(format!("@{}", big.display()))
        .args(["-w", "\n%{http_code}"])
        .arg(format!("{BASE}/vms/{id}/exec"))
        .output()
        .unwrap();
    let r = Response::of_curl(&out);
    assert_eq!(r.status, 413, "an oversized body: {}", r.text);

    // Another owner's VM and a missing one are 404; no network is 409.
    let r = exec(&d, &bob, id, json!({ "command": "true" }));
    assert_eq!(r.status, 404, "bob on alice's VM: {}", r.text);
    let r = exec(&d, &d.key, "vm_000000000000", json!({ "command": "true" }));
    assert_eq!(r.status, 404, "{}", r.text);
    let r = exec(&d, &d.key, offline_id, json!({ "command": "true" }));
    assert_eq!(r.status, 409, "{}", r.text);
    assert!(r.error().contains("no network"), "{}", r.text);

    // A guest whose SSH refuses the daemon: 502 that says so.
    d.wait_console(refusing_id, "principals-replaced");
    let r = exec(&d, &d.key, refusing_id, json!({ "command": "true" }));
    assert_eq!(r.status, 502, "{}", r.text);
    assert!(
        r.error().contains("refused the daemon's certificate"),
        "{}",
        r.text
    );

    // A timeout kills the command (and what it started) and says so.
    let started = std::time::Instant::now();
    let r = exec_ok(
        &d,
        id,
        json!({ "command": "echo started; sleep 100 & sleep 101; echo never", "timeout_seconds": 2 }),
    );
    assert!(started.elapsed() < Duration::from_secs(60), "cut short");
    assert_eq!(r["timed_out"], true, "{r}");
    assert_eq!(r["stdout"], "started\n", "{r}");
    assert_eq!(r["exit_code"], 137, "killed by SIGKILL: {r}");
    wait_until(
        "the timed-out commands are gone",
        Duration::from_secs(20),
        || guest_count(&d, id, "sleep 10") == 0,
    );

    // 64 MiB of output: 1 MiB kept, the rest drained, the daemon's peak
    // memory does not grow by it.
    let pid = daemon_pid(&d);
    let _ = exec_ok(
        &d,
        id,
        json!({ "command": "yes | head -c 4194304 >/dev/null" }),
    );
    let peak_before = status_kib(pid, "VmHWM");
    let r = exec_ok(
        &d,
        id,
        json!({ "command": "yes 0123456789abcdef | head -c 67108864; yes e | head -c 3000000 >&2", "timeout_seconds": 600 }),
    );
    let peak_after = status_kib(pid, "VmHWM");
    assert_eq!(
        r["exit_code"],
        0,
        "{}",
        r["stderr"].as_str().unwrap_or("").len()
    );
    assert_eq!(r["stdout_truncated"], true);
    assert_eq!(r["stderr_truncated"], true);
    let out = r["stdout"].as_str().unwrap();
    assert_eq!(out.len(), 1024 * 1024);
    assert!(
        out.starts_with("0123456789abcdef\n0123"),
        "the head is kept"
    );
    assert_eq!(r["stderr"].as_str().unwrap().len(), 1024 * 1024);
    let grew_mib = peak_after.saturating_sub(peak_before) / 1024;
    assert!(
        grew_mib < 24,
        "the daemon's peak RSS grew {grew_mib} MiB ({peak_before} -> {peak_after} KiB) for 64 MiB of output"
    );
}

// ------------------------------------------------------------ streaming exec

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;

type Ws = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

/// Opens `GET /vms/{vm}/exec/ws?QUERY` as the holder of `key`, from the
/// daemon's namespace. Err(status) when the handshake is refused.
async fn ws_open(key: &str, vm: &str, query: &str) -> Result<Ws, u16> {
    let url = format!("ws://127.0.0.1:8080/vms/{vm}/exec/ws?{query}");
    let mut req = url.into_client_request().unwrap();
    req.headers_mut().insert(
        "Authorization",
        HeaderValue::from_str(&format!("Bearer {key}")).unwrap(),
    );
    let stream = tokio::net::TcpStream::connect("127.0.0.1:8080")
        .await
        .unwrap();
    match tokio_tungstenite::client_async(req, stream).await {
        Ok((ws, _)) => Ok(ws),
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => Err(resp.status().as_u16()),
        Err(e) => panic!("WebSocket handshake: {e}"),
    }
}

/// What a streaming exec sent until the daemon closed it.
#[derive(Debug, Default)]
struct Streamed {
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    exit: Option<serde_json::Value>,
    closed_normally: bool,
}

impl Streamed {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
}

/// Reads frames until `until` holds for what came so far (or the socket ends).
async fn ws_read(ws: &mut Ws, got: &mut Streamed, until: impl Fn(&Streamed) -> bool) {
    while !until(got) {
        let msg = tokio::time::timeout(Duration::from_secs(60), ws.next())
            .await
            .unwrap_or_else(|_| panic!("no frame within a minute; so far {got:?}"));
        match msg {
            Some(Ok(Message::Binary(b))) => match b.first() {
                Some(1) => got.stdout.extend_from_slice(&b[1..]),
                Some(2) => got.stderr.extend_from_slice(&b[1..]),
                other => panic!("a binary frame for stream {other:?}"),
            },
            Some(Ok(Message::Text(t))) => {
                let v: serde_json::Value = serde_json::from_str(t.as_str()).unwrap();
                assert_eq!(v["type"], "exit", "{v}");
                got.exit = Some(v);
            }
            Some(Ok(Message::Close(f))) => {
                got.closed_normally = f.is_some_and(|f| u16::from(f.code) == 1000);
            }
            Some(Ok(_)) => {}
            Some(Err(_)) | None => return,
        }
    }
}

async fn ws_to_end(ws: &mut Ws) -> Streamed {
    let mut got = Streamed::default();
    ws_read(ws, &mut got, |_| false).await;
    got
}

fn stdin_frame(data: &[u8]) -> Message {
    let mut v = vec![0u8];
    v.extend_from_slice(data);
    Message::binary(v)
}

#[test]
fn streaming_exec_has_stdin_a_tty_signals_and_the_exit_code() {
    let d = Daemon::start();
    let bob = d.create_key(&["--name", "bob"]);
    let vm = ready_vm(&d);
    let id = vm["id"].as_str().unwrap().to_string();
    let offline = d.create_vm(r#"{"enable_network": false}"#);
    let offline_id = offline["id"].as_str().unwrap().to_string();
    // The guest's sshd is up once a plain exec works.
    exec_ok(&d, &id, serde_json::json!({ "command": "true" }));
    let key = d.key.clone();
    in_daemon_ns(&d, move || {
        Box::pin(async move {
            // stdin to cat, EOF, stdout and stderr apart, the exit code.
            let mut ws = ws_open(
                &key,
                &id,
                "command=cat%3B%20echo%20done%20%3E%262%3B%20exit%205",
            )
            .await
            .unwrap();
            ws.send(stdin_frame(b"hello ")).await.unwrap();
            ws.send(stdin_frame(b"world\n")).await.unwrap();
            let mut got = Streamed::default();
            ws_read(&mut ws, &mut got, |g| g.text() == "hello world\n").await;
            ws.send(Message::text(r#"{"type":"eof"}"#)).await.unwrap();
            ws_read(&mut ws, &mut got, |_| false).await;
            assert_eq!(got.text(), "hello world\n");
            assert_eq!(String::from_utf8_lossy(&got.stderr), "done\n");
            let exit = got.exit.expect("an exit message");
            assert_eq!(exit["exit_code"], 5, "{exit}");
            assert!(got.closed_normally, "a normal close after the exit");

            // argv words and env through the query.
            let mut ws = ws_open(
                &key,
                &id,
                "argv=printf&argv=%5B%25s%5D&argv=a%20b&env=X%3D1&argv=%24X",
            )
            .await
            .unwrap();
            let got = ws_to_end(&mut ws).await;
            assert_eq!(got.text(), "[a b][$X]");
            assert_eq!(got.exit.unwrap()["exit_code"], 0);

            // A TTY: /dev/pts, its size, a resize the command sees.
            let mut ws = ws_open(
                &key,
                &id,
                "tty=true&cols=100&rows=40&command=tty%3B%20stty%20size%3B%20read%20x%3B%20stty%20size",
            )
            .await
            .unwrap();
            let mut got = Streamed::default();
            ws_read(&mut ws, &mut got, |g| g.text().contains("40 100")).await;
            assert!(got.text().contains("/dev/pts/"), "{}", got.text());
            ws.send(Message::text(r#"{"type":"resize","cols":132,"rows":50}"#))
                .await
                .unwrap();
            ws.send(stdin_frame(b"\n")).await.unwrap();
            ws_read(&mut ws, &mut got, |_| false).await;
            assert!(got.text().contains("50 132"), "{}", got.text());
            assert_eq!(got.exit.unwrap()["exit_code"], 0);

            // A signal ends the command; the exit says which.
            let mut ws = ws_open(&key, &id, "command=echo%20up%3B%20exec%20sleep%20100")
                .await
                .unwrap();
            let mut got = Streamed::default();
            ws_read(&mut ws, &mut got, |g| g.text() == "up\n").await;
            ws.send(Message::text(r#"{"type":"signal","signal":"TERM"}"#))
                .await
                .unwrap();
            ws_read(&mut ws, &mut got, |_| false).await;
            let exit = got.exit.expect("an exit message");
            assert_eq!(exit["signal"], "TERM", "{exit}");
            assert_eq!(exit["exit_code"], 143, "{exit}");

            // Closing the socket ends the command (and what it started).
            let mut ws = ws_open(
                &key,
                &id,
                "command=echo%20up%3B%20sleep%20123%20%26%20sleep%20124",
            )
            .await
            .unwrap();
            let mut got = Streamed::default();
            ws_read(&mut ws, &mut got, |g| g.text() == "up\n").await;
            ws.close(None).await.unwrap();
            drop(ws);

            // Another owner's VM and a missing one: 404; no network: 409;
            // a bad query: 400.
            assert_eq!(ws_open(&bob, &id, "command=true").await.err(), Some(404));
            assert_eq!(
                ws_open(&key, "vm_000000000000", "command=true").await.err(),
                Some(404)
            );
            assert_eq!(
                ws_open(&key, &offline_id, "command=true").await.err(),
                Some(409)
            );
            assert_eq!(ws_open(&key, &id, "cols=10").await.err(), Some(400));
            assert_eq!(
                ws_open(&key, &id, "command=true&env=A-B%3D1").await.err(),
                Some(400)
            );
        })
    });
    let id = vm["id"].as_str().unwrap();
    wait_until(
        "closing the socket killed the command",
        Duration::from_secs(20),
        || guest_count(&d, id, "sleep 12") == 0,
    );
    // Without a WebSocket handshake the route answers a JSON 400.
    let r = d.req("GET", &format!("/vms/{id}/exec/ws?command=true"), None);
    assert_eq!(r.status, 400, "{}", r.text);
    assert!(r.error().contains("WebSocket"), "{}", r.text);
}

#[test]
fn exec_wakes_a_sleeping_vm_and_an_open_stream_holds_off_idle_sleep() {
    let d = Daemon::start_with(&[
        ("HATCH_IDLE_TIMEOUT", "15s"),
        ("HATCH_IDLE_CHECK_INTERVAL", "1s"),
    ]);
    // Booting under TCG on a loaded machine can take longer than the idle
    // timeout: the VM starts opted out and opts in once it is up.
    let vm = d.create_vm(r#"{"auto_sleep": false}"#);
    let id = vm["id"].as_str().unwrap().to_string();
    d.wait_console(&id, "hatch-guest: ready");
    let r = d.req(
        "PATCH",
        &format!("/vms/{id}"),
        Some(r#"{"auto_sleep": true}"#),
    );
    assert_eq!(r.status, 200, "{}", r.text);
    let state = |d: &Daemon| d.vm(&id)["state"].as_str().unwrap().to_string();
    // Idle, it goes to sleep; an exec wakes it and runs.
    wait_until("the idle VM sleeps", Duration::from_secs(120), || {
        state(&d) == "snapshotted"
    });
    let r = exec_ok(&d, &id, serde_json::json!({ "command": "echo awake" }));
    assert_eq!(r["stdout"], "awake\n");
    assert_eq!(state(&d), "running");

    // An open streaming exec keeps it awake well past the idle timeout.
    let key = d.key.clone();
    let id2 = id.clone();
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let (opened_tx, opened_rx) = std::sync::mpsc::channel::<()>();
    let client = std::thread::spawn({
        let ns = std::fs::File::open(format!("/var/run/netns/{}", d.ns)).unwrap();
        move || {
            // SAFETY: setns(2) with an open nsfs file and CLONE_NEWNET, on
            // this thread only, which is ours.
            let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0);
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(async move {
                    let mut ws = ws_open(&key, &id2, "command=echo%20up%3B%20cat")
                        .await
                        .unwrap();
                    let mut got = Streamed::default();
                    ws_read(&mut ws, &mut got, |g| g.text() == "up\n").await;
                    opened_tx.send(()).unwrap();
                    // Held open (idle on both sides) until the test says.
                    tokio::task::spawn_blocking(move || rx.recv().unwrap())
                        .await
                        .unwrap();
                    ws.send(Message::text(r#"{"type":"eof"}"#)).await.unwrap();
                    let got = ws_to_end(&mut ws).await;
                    assert_eq!(got.exit.unwrap()["exit_code"], 0);
                })
        }
    });
    opened_rx.recv().unwrap();
    // Twice the idle timeout.
    for _ in 0..30 {
        std::thread::sleep(Duration::from_secs(1));
        assert_eq!(state(&d), "running", "slept during an open exec stream");
    }
    tx.send(()).unwrap();
    client.join().unwrap();
    // Once it is closed, idle sleep takes the VM again.
    wait_until(
        "the VM sleeps once the stream closed",
        Duration::from_secs(120),
        || state(&d) == "snapshotted",
    );
}

// ------------------------------------------------------------ Debian

/// exec on the Debian image (OpenSSH and the CA's trust from cloud-init's
/// vendor-data, bash as agent's shell): output, stdin, env, root through
/// sudo, a timeout that kills, a TTY over the WebSocket.
#[test]
fn exec_on_the_debian_cloud_init_image() {
    use serde_json::json;
    let Some(img) = debian_image_dir_if_built() else {
        return;
    };
    let (d, image) = debian_daemon(&img);
    let vm = d.create_vm(&json!({"image_id": image, "mem_mib": 1024}).to_string());
    let id = vm["id"].as_str().unwrap().to_string();
    // A Debian boot under TCG takes minutes, and cloud-init installs the
    // CA's trust in its last stage: until then the guest refuses (502).
    let first = until_guest_ssh(Duration::from_secs(900), || {
        exec(&d, &d.key, &id, json!({ "command": "id -un; echo $0" }))
    })
    .body;
    assert_eq!(
        first["stdout"].as_str().unwrap().lines().next(),
        Some("agent")
    );
    let r = exec_ok(&d, &id, json!({ "command": ["sudo", "-n", "id", "-u"] }));
    assert_eq!(r["stdout"], "0\n", "root through sudo: {r}");
    let r = exec_ok(
        &d,
        &id,
        json!({ "command": "read a; echo \"$a $V\" >&2; exit 4", "stdin": "in\n", "env": {"V": "v"} }),
    );
    assert_eq!(r["stderr"], "in v\n");
    assert_eq!(r["exit_code"], 4);
    let r = exec_ok(
        &d,
        &id,
        json!({ "command": "sleep 100 & sleep 101", "timeout_seconds": 2 }),
    );
    assert_eq!(r["timed_out"], true, "{r}");
    let r = exec_ok(
        &d,
        &id,
        json!({ "command": "pgrep -c -f 'sleep 10[01]' || true" }),
    );
    assert_eq!(r["stdout"], "0\n", "the timed-out commands are gone: {r}");
    let key = d.key.clone();
    in_daemon_ns(&d, move || {
        Box::pin(async move {
            let mut ws = ws_open(
                &key,
                &id,
                "tty=true&cols=90&rows=30&command=tty%3B%20stty%20size",
            )
            .await
            .unwrap();
            let got = ws_to_end(&mut ws).await;
            assert!(got.text().contains("/dev/pts/"), "{}", got.text());
            assert!(got.text().contains("30 90"), "{}", got.text());
            assert_eq!(got.exit.unwrap()["exit_code"], 0);
        })
    });
}

//! Running commands in real guests: the daemon's SSH client (src/ssh/client.rs)
//! against the busybox image's OpenSSH sshd, `POST /vms/{id}/exec` and the
//! streaming exec over WebSocket.

mod common;
use common::*;
use hatch::ssh::client::{
    ChannelSpec, ClientError, ExitStatus, GuestSession, Output, PtySize, Signal,
};
use hatch::ssh::Ca;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::time::Duration;

fn ready_vm(d: &Daemon) -> serde_json::Value {
    let vm = d.create_vm("{}");
    d.wait_console(vm["id"].as_str().unwrap(), "hatch-guest: ready");
    vm
}

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

//! `vm exec -i|-t` and `vm ssh`: a command over the streaming exec WebSocket (docs/API.md, "Exec"), with this terminal or these pipes at its ends.

use super::client::{CliError, Client};
use super::term::{self, RawMode};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::time::Duration;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;

/// How much of standard input one frame carries.
const STDIN_CHUNK: usize = 64 * 1024;

/// One streamed command.
pub struct Spec {
    /// The command's part of the query: `command` or `argv`s, `env`s, `cwd`.
    pub query: Vec<(String, String)>,
    /// Run it on a pseudo-terminal in the VM.
    pub tty: bool,
    /// Kill it (SIGKILL) after this long; the stream itself has no timeout.
    pub timeout: Option<Duration>,
}

/// How the session ended, for the exit status.
pub struct Ending {
    /// The command's exit code (128 + the signal for a signal), or ours.
    pub code: i32,
    /// Said on stderr once the terminal is back to normal.
    pub note: Option<String>,
}

/// Runs the command in VM `vm_id`, standard input streamed to it and its
/// output written here as it comes. The local terminal is in raw mode for
/// the session when `tty` is asked for and standard input is one; it is
/// put back before this returns, whatever the outcome.
pub async fn run(client: &Client, vm_id: &str, spec: Spec) -> Result<Ending, CliError> {
    let mut query = spec.query;
    let size = if spec.tty { term::window_size() } else { None };
    if spec.tty {
        query.push(("tty".into(), "true".into()));
        if let Some((cols, rows)) = size {
            query.push(("cols".into(), cols.to_string()));
            query.push(("rows".into(), rows.to_string()));
        }
        if let Some(t) = std::env::var("TERM").ok().filter(|t| !t.is_empty()) {
            query.push(("term".into(), t));
        }
    }
    let ws = client
        .websocket(&format!("/vms/{vm_id}/exec/ws"), &query)
        .await?;
    // Raw only once the session is open: a refusal prints on a normal terminal.
    let raw = if spec.tty && term::stdin_is_terminal() {
        Some(RawMode::enter()?)
    } else {
        None
    };
    let ending = session(ws, spec.tty && size.is_some(), spec.timeout).await;
    drop(raw);
    ending
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn session(ws: Ws, follow_size: bool, timeout: Option<Duration>) -> Result<Ending, CliError> {
    let (mut sink, mut frames) = ws.split();
    // One writer owns the sending half, so a big stdin never stops this
    // task from reading output (both sides blocked on full buffers otherwise).
    let (tx, mut rx) = mpsc::channel::<Message>(16);
    tokio::spawn(async move {
        while let Some(m) = rx.recv().await {
            if sink.send(m).await.is_err() {
                break;
            }
        }
    });
    spawn_stdin(tx.clone());
    if follow_size {
        let tx = tx.clone();
        let mut winch = signal(SignalKind::window_change())
            .map_err(|e| CliError::Other(format!("watching the window size: {e}")))?;
        tokio::spawn(async move {
            while winch.recv().await.is_some() {
                let Some((cols, rows)) = term::window_size() else {
                    continue;
                };
                let m = json!({"type": "resize", "cols": cols, "rows": rows});
                if tx.send(Message::text(m.to_string())).await.is_err() {
                    break;
                }
            }
        });
    }
    // Handled rather than fatal, so that the terminal is put back first.
    let mut term = listen(SignalKind::terminate())?;
    let mut hup = listen(SignalKind::hangup())?;

    let deadline = tokio::time::sleep(timeout.unwrap_or(Duration::MAX));
    tokio::pin!(deadline);
    let mut timed_out = false;
    let mut stdout = std::io::stdout();
    let mut stderr = std::io::stderr();
    loop {
        let frame = tokio::select! {
            f = frames.next() => f,
            _ = &mut deadline, if timeout.is_some() && !timed_out => {
                timed_out = true;
                let kill = json!({"type": "signal", "signal": "KILL"});
                let _ = tx.send(Message::text(kill.to_string())).await;
                continue;
            }
            _ = term.recv() => return Ok(Ending { code: 128 + libc::SIGTERM, note: None }),
            _ = hup.recv() => return Ok(Ending { code: 128 + libc::SIGHUP, note: None }),
        };
        let frame = match frame {
            None => break,
            Some(Ok(f)) => f,
            Some(Err(e)) => {
                return Err(CliError::Transport(format!("the exec stream broke: {e}")));
            }
        };
        match frame {
            Message::Binary(b) => {
                let (to, data): (&mut dyn Write, &[u8]) = match b.split_first() {
                    Some((1, d)) => (&mut stdout, d),
                    Some((2, d)) => (&mut stderr, d),
                    _ => continue,
                };
                if to.write_all(data).and_then(|_| to.flush()).is_err() {
                    // The reader went away (`| head`): end as a shell
                    // reports a command killed by SIGPIPE; closing the
                    // socket kills the remote command.
                    return Ok(Ending {
                        code: 128 + libc::SIGPIPE,
                        note: None,
                    });
                }
            }
            Message::Text(t) => {
                let v: Value = serde_json::from_str(t.as_str()).unwrap_or(Value::Null);
                if v["type"] == "exit" {
                    let note = timed_out.then(|| "the command timed out and was killed".into());
                    return Ok(match v["exit_code"].as_i64() {
                        Some(code) => Ending {
                            code: code.clamp(0, 255) as i32,
                            note,
                        },
                        None => Ending {
                            code: 255,
                            note: Some("the guest reported no exit status".into()),
                        },
                    });
                }
            }
            Message::Close(_) => break,
            _ => {}
        }
    }
    Err(CliError::Transport(
        "the exec stream closed before the command's exit status came".into(),
    ))
}

fn listen(kind: SignalKind) -> Result<tokio::signal::unix::Signal, CliError> {
    signal(kind).map_err(|e| CliError::Other(format!("installing a signal handler: {e}")))
}

/// Reads standard input on a thread of its own (a blocking read cannot be
/// cancelled; a plain thread does not hold up the exit the way tokio's
/// blocking pool would) and sends it as stdin frames, then `eof`. The
/// channel's bound is the back-pressure: a fast pipe waits for the socket.
fn spawn_stdin(tx: mpsc::Sender<Message>) {
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin().lock();
        let mut buf = vec![0u8; STDIN_CHUNK];
        loop {
            match stdin.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    let mut frame = Vec::with_capacity(n + 1);
                    frame.push(0);
                    frame.extend_from_slice(&buf[..n]);
                    if tx.blocking_send(Message::binary(frame)).is_err() {
                        return;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            }
        }
        let _ = tx.blocking_send(Message::text(json!({"type": "eof"}).to_string()));
    });
}

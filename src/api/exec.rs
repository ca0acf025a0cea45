//! Commands in a VM: `POST /vms/{vm_id}/exec` (the Hatch API's one-shot
//! exec) and `GET /vms/{vm_id}/exec/ws` (streaming, over a WebSocket). The
//! contract is docs/API.md, "Exec".

use super::json::JsonBody;
use super::{ApiError, ApiResult, St};
use crate::manager::exec::{
    Command, ExecSpec, GuestLink, DEFAULT_EXEC_TIMEOUT_SECS, EXEC_OUTPUT_CAP, MAX_EXEC_TIMEOUT_SECS,
};
use crate::ssh::client::{ExitStatus, InputHandle, Output, OutputStream, PtySize, Signal};
use crate::store::Owner;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, State};
use axum::response::Response;
use axum::{Extension, Json};
use futures_util::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

/// `command`: a string for the guest's shell, or an argv.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(untagged)]
pub enum CommandField {
    /// Run by the user's login shell (`sh -c`), as the Hatch API does.
    Shell(String),
    /// Run as these words, each passed to the program unchanged.
    Argv(Vec<String>),
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExecRequest {
    pub command: CommandField,
    /// Extra environment variables; names are shell variable names
    /// (`[A-Za-z_][A-Za-z0-9_]*`).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// The directory to run in (the user's home when absent).
    pub cwd: Option<String>,
    /// Given to the command's stdin, then EOF (no stdin: EOF at once).
    pub stdin: Option<String>,
    /// Wall-clock limit; the command is killed when it passes. Default 60, at most 3600.
    #[schema(minimum = 1, maximum = 3600)]
    pub timeout_seconds: Option<u64>,
}

/// The Hatch product's answer, plus what it cannot say.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ExecView {
    /// At most 1 MiB of it (UTF-8; invalid bytes become U+FFFD).
    pub stdout: String,
    pub stderr: String,
    /// The exit code; 128 + the signal's number when a signal ended the
    /// command; null when the guest reported neither.
    pub exit_code: Option<i32>,
    /// The signal that ended the command (`KILL`, `TERM`...), if one did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signal: Option<String>,
    /// The command ran past `timeout_seconds` and was killed.
    pub timed_out: bool,
    /// stdout passed 1 MiB: the rest was read and dropped.
    pub stdout_truncated: bool,
    pub stderr_truncated: bool,
}

fn spec_of(command: CommandField, env: BTreeMap<String, String>, cwd: Option<String>) -> ExecSpec {
    ExecSpec {
        command: match command {
            CommandField::Shell(s) => Command::Shell(s),
            CommandField::Argv(v) => Command::Argv(v),
        },
        env,
        cwd,
    }
}

#[utoipa::path(post, path = "/vms/{vm_id}/exec", tag = "vms", operation_id = "execVm",
    params(("vm_id" = String, Path, description = "A VM id (`vm_` and 12 of `[a-z0-9]`)")),
    request_body = ExecRequest,
    responses((status = 200, description = "The command ran (whatever its exit code)", body = ExecView),
        (status = 400, description = "An empty command, a bad env name, NUL characters, a timeout out of range", body = super::openapi::ErrorBody),
        (status = 409, description = "The VM has no networking, or is stopped, starting, stopping or in error", body = super::openapi::ErrorBody),
        (status = 502, description = "The guest's SSH server could not be reached or refused the daemon", body = super::openapi::ErrorBody),
        (status = 503, description = "The daemon has no SSH CA, or the host has no memory left to wake the VM", body = super::openapi::ErrorBody)))]
/// `POST /vms/{vm_id}/exec`: runs a command as `agent` and answers its output (docs/API.md, "Exec").
pub async fn exec_vm(
    State(s): St,
    Extension(o): Extension<Owner>,
    Path(id): Path<String>,
    JsonBody(req): JsonBody<ExecRequest>,
) -> ApiResult<Json<ExecView>> {
    let timeout = req.timeout_seconds.unwrap_or(DEFAULT_EXEC_TIMEOUT_SECS);
    if !(1..=MAX_EXEC_TIMEOUT_SECS).contains(&timeout) {
        return Err(ApiError::BadRequest(format!(
            "timeout_seconds must be between 1 and {MAX_EXEC_TIMEOUT_SECS}"
        )));
    }
    let spec = spec_of(req.command, req.env, req.cwd);
    let out = s
        .manager
        .exec(
            &o,
            &id,
            spec,
            req.stdin.unwrap_or_default().into_bytes(),
            Duration::from_secs(timeout),
            EXEC_OUTPUT_CAP,
        )
        .await?;
    Ok(Json(ExecView {
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        exit_code: out.exit_code,
        signal: out.signal,
        timed_out: out.timed_out,
        stdout_truncated: out.stdout_truncated,
        stderr_truncated: out.stderr_truncated,
    }))
}

/// The streaming exec's query: repeated keys (`argv`, `env`) keep their order.
#[derive(Debug, Default)]
struct WsQuery {
    command: Option<String>,
    argv: Vec<String>,
    env: BTreeMap<String, String>,
    cwd: Option<String>,
    tty: bool,
    cols: u32,
    rows: u32,
    term: Option<String>,
}

const DEFAULT_COLS: u32 = 80;
const DEFAULT_ROWS: u32 = 24;

fn parse_ws_query(pairs: Vec<(String, String)>) -> Result<WsQuery, String> {
    let mut q = WsQuery {
        cols: DEFAULT_COLS,
        rows: DEFAULT_ROWS,
        ..Default::default()
    };
    let size = |key: &str, v: &str| -> Result<u32, String> {
        v.parse::<u32>()
            .ok()
            .filter(|n| (1..=10_000).contains(n))
            .ok_or_else(|| format!("{key} must be a number from 1 to 10000"))
    };
    for (k, v) in pairs {
        match k.as_str() {
            "command" => q.command = Some(v),
            "argv" => q.argv.push(v),
            "env" => {
                let (name, value) = v
                    .split_once('=')
                    .ok_or_else(|| format!("env {v:?} is not NAME=VALUE"))?;
                q.env.insert(name.to_string(), value.to_string());
            }
            "cwd" => q.cwd = Some(v),
            "tty" => {
                q.tty = match v.as_str() {
                    "true" | "1" => true,
                    "false" | "0" => false,
                    _ => return Err("tty must be true or false".into()),
                }
            }
            "cols" => q.cols = size("cols", &v)?,
            "rows" => q.rows = size("rows", &v)?,
            "term" => {
                if v.is_empty() || v.len() > 64 || !v.bytes().all(|b| b.is_ascii_graphic()) {
                    return Err("term must be 1 to 64 printable characters".into());
                }
                q.term = Some(v)
            }
            other => return Err(format!("unknown query parameter {other:?}")),
        }
    }
    // Both, or neither.
    if q.command.is_some() != q.argv.is_empty() {
        return Err(
            "give either command (a shell line) or argv (repeated), not both or neither".into(),
        );
    }
    Ok(q)
}

/// What a client sends as text frames.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
enum Control {
    Resize { cols: u32, rows: u32 },
    Signal { signal: String },
    Eof,
}

/// Stream bytes of binary frames (docs/API.md, "Streaming exec").
const STDIN: u8 = 0;
const STDOUT: u8 = 1;
const STDERR: u8 = 2;

#[utoipa::path(get, path = "/vms/{vm_id}/exec/ws", tag = "vms", operation_id = "execVmStream",
    description = "A WebSocket: binary frames carry stdin (client, first byte 0) and stdout/stderr (daemon, first byte 1/2); text frames carry JSON controls (resize, signal, eof) and the final exit message. Give `command` or repeated `argv`; `env=NAME=VALUE` may repeat.",
    params(("vm_id" = String, Path, description = "A VM id (`vm_` and 12 of `[a-z0-9]`)"),
        ("command" = Option<String>, Query, description = "A shell line (or give argv)"),
        ("argv" = Option<Vec<String>>, Query, description = "One word of the command; repeat it"),
        ("env" = Option<Vec<String>>, Query, description = "NAME=VALUE; repeat it"),
        ("cwd" = Option<String>, Query, description = "The directory to run in"),
        ("tty" = Option<bool>, Query, description = "Run on a pseudo-terminal (stdout and stderr then merge)"),
        ("cols" = Option<u32>, Query, minimum = 1, maximum = 10000, description = "Terminal width (default 80)"),
        ("rows" = Option<u32>, Query, minimum = 1, maximum = 10000, description = "Terminal height (default 24)"),
        ("term" = Option<String>, Query, min_length = 1, max_length = 64, description = "TERM for the terminal (default xterm-256color)")),
    responses((status = 101, description = "Switching to the WebSocket protocol"),
        (status = 400, description = "Not a WebSocket handshake, or a bad query (both or neither of command and argv, a bad env name, sizes out of range)", body = super::openapi::ErrorBody),
        (status = 409, description = "The VM has no networking, or is stopped, starting, stopping or in error", body = super::openapi::ErrorBody),
        (status = 502, description = "The guest's SSH server could not be reached or refused the daemon", body = super::openapi::ErrorBody),
        (status = 503, description = "The daemon has no SSH CA, or the host has no memory left to wake the VM", body = super::openapi::ErrorBody)))]
/// `GET /vms/{vm_id}/exec/ws`: a command's stdin, stdout, stderr, TTY and
/// signals over a WebSocket (docs/API.md, "Streaming exec").
pub async fn exec_ws(
    State(s): St,
    Extension(o): Extension<Owner>,
    Path(id): Path<String>,
    Query(pairs): Query<Vec<(String, String)>>,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> ApiResult<Response> {
    let q = parse_ws_query(pairs).map_err(ApiError::BadRequest)?;
    let command = match q.command {
        Some(c) => CommandField::Shell(c),
        None => CommandField::Argv(q.argv),
    };
    let spec = spec_of(command, q.env, q.cwd);
    spec.validate().map_err(ApiError::BadRequest)?;
    // Whose VM it is comes before whether this is a WebSocket at all.
    s.manager.get_vm(&o, &id).await?;
    let upgrade = upgrade.map_err(|e| {
        ApiError::BadRequest(format!("this route takes a WebSocket handshake: {e}"))
    })?;
    // Reached (woken, logged in) before the upgrade, so failures are statuses.
    let link = s.manager.guest_link(&o, &id).await?;
    let pty = q.tty.then_some(PtySize {
        cols: q.cols,
        rows: q.rows,
        term: q.term,
    });
    let (process, token) = link.start(&spec, pty).await?;
    tracing::info!(vm = %id, owner = %o.id, tty = q.tty, "streaming exec started");
    Ok(upgrade.on_upgrade(move |socket| async move {
        pump(socket, link, process.output, process.input, token).await;
    }))
}

/// Moves bytes both ways until the command's channel closes (then the exit
/// message and a normal close) or the socket does (then the command is killed).
async fn pump(
    socket: WebSocket,
    link: GuestLink,
    mut output: OutputStream,
    input: InputHandle,
    token: String,
) {
    let link = Arc::new(link);
    let (mut tx, mut rx) = socket.split();
    // Client to guest in a task of its own: a stdin write waiting for the
    // SSH window must never stop the output from being read.
    let (closed_tx, mut closed_rx) = tokio::sync::oneshot::channel::<()>();
    let inbound = {
        let input = input.clone();
        tokio::spawn(async move {
            while let Some(Ok(msg)) = rx.next().await {
                let ok = match msg {
                    Message::Binary(b) => match b.first() {
                        Some(&STDIN) => input.write(b.slice(1..)).await.is_ok(),
                        _ => true, // Only stdin flows this way; anything else is ignored.
                    },
                    Message::Text(t) => match serde_json::from_str::<Control>(t.as_str()) {
                        Ok(Control::Resize { cols, rows }) => input
                            .resize(cols.clamp(1, 10_000), rows.clamp(1, 10_000))
                            .await
                            .is_ok(),
                        Ok(Control::Signal { signal }) => match Signal::parse(&signal) {
                            Some(sig) => input.signal(sig).await.is_ok(),
                            None => true,
                        },
                        Ok(Control::Eof) => input.eof().await.is_ok(),
                        Err(e) => {
                            tracing::debug!("streaming exec: ignoring a control frame: {e}");
                            true
                        }
                    },
                    Message::Close(_) => break,
                    Message::Ping(_) | Message::Pong(_) => true,
                };
                if !ok {
                    break;
                }
            }
            let _ = closed_tx.send(());
        })
    };
    let mut exit: Option<ExitStatus> = None;
    let mut hung_up = false;
    loop {
        tokio::select! {
            o = output.next() => {
                let frame = match o {
                    Some(Output::Stdout(b)) => framed(STDOUT, &b),
                    Some(Output::Stderr(b)) => framed(STDERR, &b),
                    Some(Output::Exit(s)) => { exit = Some(s); continue; }
                    None => break,
                };
                if tx.send(Message::Binary(frame.into())).await.is_err() {
                    hung_up = true;
                    break;
                }
            }
            _ = &mut closed_rx, if !hung_up => {
                hung_up = true;
                break;
            }
        }
    }
    if hung_up {
        tracing::info!(vm = %link.vm_id, "streaming exec: the client closed the socket; killing the command");
        link.kill(&token).await;
        let _ = input.close().await;
    } else {
        let (code, signal) = match exit {
            Some(ExitStatus::Code(c)) => (Some(c as i32), None),
            Some(ExitStatus::Signal { name, .. }) => (signal_exit_code(&name), Some(name)),
            None => (None, None),
        };
        let msg = serde_json::json!({ "type": "exit", "exit_code": code, "signal": signal });
        let _ = tx.send(Message::Text(msg.to_string().into())).await;
        let _ = tx
            .send(Message::Close(Some(CloseFrame {
                code: 1000,
                reason: "exited".into(),
            })))
            .await;
    }
    inbound.abort();
    if let Ok(link) = Arc::try_unwrap(link) {
        link.session.close().await;
    }
}

fn framed(stream: u8, data: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(data.len() + 1);
    v.push(stream);
    v.extend_from_slice(data);
    v
}

fn signal_exit_code(name: &str) -> Option<i32> {
    crate::manager::exec::signal_code(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(pairs: &[(&str, &str)]) -> Result<WsQuery, String> {
        parse_ws_query(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    #[test]
    fn ws_query_reads_argv_and_env_in_order() {
        let w = q(&[
            ("argv", "printf"),
            ("argv", "%s"),
            ("env", "A=1=2"),
            ("tty", "true"),
            ("cols", "120"),
        ])
        .unwrap();
        assert_eq!(w.argv, vec!["printf", "%s"]);
        assert_eq!(w.env["A"], "1=2");
        assert!(w.tty);
        assert_eq!((w.cols, w.rows), (120, DEFAULT_ROWS));
    }

    #[test]
    fn ws_query_refuses_bad_input() {
        assert!(q(&[]).is_err(), "no command");
        assert!(q(&[("command", "x"), ("argv", "y")]).is_err(), "both");
        assert!(q(&[("command", "x"), ("cols", "0")]).is_err());
        assert!(q(&[("command", "x"), ("tty", "yes")]).is_err());
        assert!(q(&[("command", "x"), ("env", "NOEQUALS")]).is_err());
        assert!(q(&[("command", "x"), ("nope", "1")]).is_err());
    }
}

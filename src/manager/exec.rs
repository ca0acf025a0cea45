//! Commands in a guest over the daemon's SSH client: `exec` (one answer with
//! capped output) and the session a streaming exec drives.

use super::idle::Busy;
use super::{Manager, ManagerError, Result};
use crate::ssh::client::{ChannelSpec, ClientError, ExitStatus, GuestSession, Output, PtySize};
use crate::store::Owner;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long reaching a guest's sshd may take, retries of a refused
/// connection (an sshd still starting after a boot or a wake) included.
pub const SSH_CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// `timeout_seconds` when the request names none.
pub const DEFAULT_EXEC_TIMEOUT_SECS: u64 = 60;
/// The largest `timeout_seconds` an exec may ask for.
pub const MAX_EXEC_TIMEOUT_SECS: u64 = 3600;
/// The most of stdout, and of stderr, an exec answer carries; the rest is
/// read and dropped.
pub const EXEC_OUTPUT_CAP: usize = 1024 * 1024;
/// After a timeout kill, how long the kill itself and then the exit status
/// may take (a loaded TCG guest is slow to fork).
const KILL_GRACE: Duration = Duration::from_secs(15);

/// What to run: a shell command line or an argv, and how.
#[derive(Debug, Clone)]
pub enum Command {
    /// Run by the user's login shell, as the Hatch API does.
    Shell(String),
    /// Run as these words, each quoted for the shell.
    Argv(Vec<String>),
}

/// A command with its surroundings, checked by `validate`.
#[derive(Debug, Clone)]
pub struct ExecSpec {
    pub command: Command,
    pub env: BTreeMap<String, String>,
    pub cwd: Option<String>,
}

impl ExecSpec {
    /// Refuses what the guest could not run or the quoting could not carry.
    pub fn validate(&self) -> std::result::Result<(), String> {
        match &self.command {
            Command::Shell(s) if s.trim().is_empty() => {
                return Err("command must not be empty".into())
            }
            Command::Argv(v) if v.is_empty() || v[0].is_empty() => {
                return Err("command must not be an empty array or start with an empty word".into())
            }
            _ => {}
        }
        let words: Vec<&str> = match &self.command {
            Command::Shell(s) => vec![s.as_str()],
            Command::Argv(v) => v.iter().map(String::as_str).collect(),
        };
        if words.iter().any(|w| w.contains('\0')) {
            return Err("command must not contain NUL characters".into());
        }
        for (name, value) in &self.env {
            if !valid_env_name(name) {
                return Err(format!(
                    "env name {name:?} is not a shell variable name ([A-Za-z_][A-Za-z0-9_]*, at most 256 characters)"
                ));
            }
            if value.contains('\0') {
                return Err(format!("env {name} must not contain NUL characters"));
            }
        }
        if let Some(cwd) = &self.cwd {
            if cwd.is_empty() || cwd.contains('\0') {
                return Err("cwd must be a non-empty path without NUL characters".into());
            }
        }
        Ok(())
    }

    /// The line the guest's login shell runs. It first writes its own pid
    /// (sshd made it a session and group leader, so that is also the group
    /// of everything the command starts) to a file named by `token`, which
    /// `kill_line` reads; the file goes when the command ends.
    fn line(&self, token: &str) -> String {
        let file = pid_file(token);
        let mut cmd = String::new();
        for (name, value) in &self.env {
            cmd.push_str(&format!("{name}={} ", quote(value)));
        }
        match &self.command {
            Command::Shell(s) => {
                cmd.push_str(&format!("\"${{SHELL:-/bin/sh}}\" -c {}", quote(s)));
            }
            Command::Argv(words) => {
                let quoted: Vec<String> = words.iter().map(|w| quote(w)).collect();
                cmd.push_str(&quoted.join(" "));
            }
        }
        let run = match &self.cwd {
            // A missing directory: the shell says why on stderr, and 1.
            Some(cwd) => format!("if cd -- {}; then {cmd}; else false; fi", quote(cwd)),
            None => cmd,
        };
        format!("echo $$ > {file} 2>/dev/null; {run}; r=$?; rm -f {file}; exit $r")
    }
}

/// Where an exec's leader writes its pid: /tmp, named by the exec's random token.
fn pid_file(token: &str) -> String {
    format!("/tmp/.hatch-exec-{token}.pid")
}

/// A shell variable name, as POSIX has it (and not absurdly long).
pub fn valid_env_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c == '_' || c.is_ascii_alphabetic())
        && chars.all(|c| c == '_' || c.is_ascii_alphanumeric())
        && name.len() <= 256
}

/// `word` in single quotes, for any POSIX shell: inside them nothing is
/// special but the quote itself, written as `'\''`.
pub fn quote(word: &str) -> String {
    format!("'{}'", word.replace('\'', r"'\''"))
}

/// A line that SIGKILLs the process group of the exec `token` names (its
/// leader's pid file), then removes the file. `kill -9 -PGID` is the one
/// spelling dash, bash and busybox all take (dash refuses `-KILL --`,
/// busybox `-s KILL --`).
fn kill_line(token: &str) -> String {
    let file = pid_file(token);
    format!(
        "p=$(cat {file} 2>/dev/null); if [ -n \"$p\" ]; then kill -9 -\"$p\" 2>/dev/null; kill -9 \"$p\" 2>/dev/null; fi; rm -f {file}; exit 0"
    )
}

/// What an exec answers.
#[derive(Debug, Clone, Default)]
pub struct ExecOutcome {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    /// The exit code, or 128 + the signal's number when a signal ended it
    /// (the shells' convention); None when the guest reported neither.
    pub exit_code: Option<i32>,
    /// The signal that ended it, if one did (`KILL`, `TERM`...).
    pub signal: Option<String>,
    pub timed_out: bool,
    pub stdout_truncated: bool,
    pub stderr_truncated: bool,
}

/// A logged-in session to a guest, holding the VM busy (no idle sleep)
/// until dropped.
pub struct GuestLink {
    pub session: GuestSession,
    pub vm_id: String,
    _busy: Busy,
}

impl GuestLink {
    /// Opens a channel running `spec` (with a PTY when asked); returns the
    /// process and the token that `kill` needs.
    pub async fn start(
        &self,
        spec: &ExecSpec,
        pty: Option<PtySize>,
    ) -> Result<(crate::ssh::client::RemoteProcess, String)> {
        let token = new_token();
        let process = self
            .session
            .open(&ChannelSpec {
                command: Some(spec.line(&token)),
                pty,
            })
            .await
            .map_err(|e| guest_error(&self.vm_id, e))?;
        Ok((process, token))
    }

    /// Kills the process group of the exec marked `token`, over a channel
    /// of its own (SSH's `signal` request reaches only the leader).
    pub async fn kill(&self, token: &str) {
        let spec = ChannelSpec {
            command: Some(kill_line(token)),
            pty: None,
        };
        let killed = async {
            let mut p = self.session.open(&spec).await?;
            p.input.eof().await?;
            while p.output.next().await.is_some() {}
            Ok::<(), ClientError>(())
        };
        match tokio::time::timeout(KILL_GRACE, killed).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(vm = %self.vm_id, "killing an exec: {e}"),
            Err(_) => tracing::warn!(vm = %self.vm_id, "killing an exec: no answer in time"),
        }
    }
}

fn new_token() -> String {
    let mut b = [0u8; 12];
    getrandom::fill(&mut b).expect("the OS random source");
    hex::encode(b)
}

/// A failure of the guest's SSH: the API's 502.
fn guest_error(vm_id: &str, e: ClientError) -> ManagerError {
    ManagerError::BadGateway(format!("vm {vm_id}: the guest's SSH failed: {e}"))
}

/// Keeps at most `cap` bytes of a stream, counting what it drops.
struct Capped {
    kept: Vec<u8>,
    cap: usize,
    dropped: bool,
}

impl Capped {
    fn new(cap: usize) -> Capped {
        Capped {
            kept: Vec::new(),
            cap,
            dropped: false,
        }
    }

    fn push(&mut self, data: &[u8]) {
        let room = self.cap - self.kept.len();
        if data.len() > room {
            self.dropped = true;
        }
        self.kept.extend_from_slice(&data[..data.len().min(room)]);
    }
}

/// 128 + the signal's number on Linux, for the names SSH sends.
pub fn signal_code(name: &str) -> Option<i32> {
    let n = match name {
        "HUP" => 1,
        "INT" => 2,
        "QUIT" => 3,
        "ILL" => 4,
        "ABRT" => 6,
        "FPE" => 8,
        "KILL" => 9,
        "USR1" => 10,
        "SEGV" => 11,
        "USR2" => 12,
        "PIPE" => 13,
        "ALRM" => 14,
        "TERM" => 15,
        _ => return None,
    };
    Some(128 + n)
}

impl ExecOutcome {
    fn record_exit(&mut self, status: ExitStatus) {
        match status {
            ExitStatus::Code(c) => self.exit_code = Some(c as i32),
            ExitStatus::Signal { name, .. } => {
                self.exit_code = signal_code(&name);
                self.signal = Some(name);
            }
        }
    }
}

impl Manager {
    /// Logs in to the owner's VM `id` as `agent`: 404 for a VM the owner
    /// cannot see, 409 without networking or when it is stopped (or in
    /// error), a sleeping VM woken first (as `connect` does), 502 when the
    /// guest's SSH fails. The VM counts as busy while the link is held.
    pub async fn guest_link(self: &Arc<Self>, owner: &Owner, id: &str) -> Result<GuestLink> {
        let (vm, ca, busy) = self.busy_for_ssh(owner, id, "exec").await?;
        let ip = vm
            .guest_ip
            .ok_or_else(|| ManagerError::Conflict(format!("vm {id} has no guest address")))?;
        let addr = SocketAddr::new(ip.into(), 22);
        let session = connect_retrying(&ca, id, Self::trusted_principal(&vm), addr).await?;
        Ok(GuestLink {
            session,
            vm_id: id.to_string(),
            _busy: busy,
        })
    }

    /// `POST /vms/{id}/exec`: runs `spec` with `stdin`, waits at most
    /// `timeout` (then kills it), keeps at most `cap` bytes of each stream.
    pub async fn exec(
        self: &Arc<Self>,
        owner: &Owner,
        id: &str,
        spec: ExecSpec,
        stdin: Vec<u8>,
        timeout: Duration,
        cap: usize,
    ) -> Result<ExecOutcome> {
        spec.validate().map_err(ManagerError::BadRequest)?;
        let link = self.guest_link(owner, id).await?;
        // In a task of its own: a caller that goes away (the HTTP client
        // hung up) must not leave the command running in the guest; the
        // task notices through `gone` and kills it.
        let (gone_tx, gone_rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(run_exec(link, spec, stdin, timeout, cap, gone_rx));
        let _hung_up = HangUp(Some(gone_tx));
        task.await?
    }
}

/// Sends on drop: tells the exec's task its caller went away.
struct HangUp(Option<tokio::sync::oneshot::Sender<()>>);

impl Drop for HangUp {
    fn drop(&mut self) {
        if let Some(tx) = self.0.take() {
            let _ = tx.send(());
        }
    }
}

async fn run_exec(
    link: GuestLink,
    spec: ExecSpec,
    stdin: Vec<u8>,
    timeout: Duration,
    cap: usize,
    mut gone: tokio::sync::oneshot::Receiver<()>,
) -> Result<ExecOutcome> {
    let (process, token) = link.start(&spec, None).await?;
    let mut output = process.output;
    let input = process.input;
    // Stdin is written beside the reading: a command that answers as it
    // reads would otherwise fill its output window and stall both sides.
    let feeder = {
        let input = input.clone();
        tokio::spawn(async move {
            if !stdin.is_empty() {
                input.write(stdin).await?;
            }
            input.eof().await
        })
    };
    let mut out = ExecOutcome::default();
    let (mut so, mut se) = (Capped::new(cap), Capped::new(cap));
    let deadline = tokio::time::Instant::now() + timeout;
    let mut killed_at: Option<Instant> = None;
    loop {
        // After a kill, waiting for the channel to close is bounded too: a
        // process the kill missed (it left the group) may hold the pipes open.
        let given_up =
            tokio::time::Instant::from_std(killed_at.map_or_else(Instant::now, |t| t + KILL_GRACE));
        let next = tokio::select! {
            o = output.next() => o,
            _ = tokio::time::sleep_until(given_up), if killed_at.is_some() => {
                tracing::warn!(vm = %link.vm_id, "exec: the channel stayed open after the kill; closing the session");
                break;
            }
            _ = tokio::time::sleep_until(deadline), if killed_at.is_none() => {
                out.timed_out = true;
                killed_at = Some(Instant::now());
                // The channel stays open: its exit status (KILL) comes next.
                link.kill(&token).await;
                continue;
            }
            _ = &mut gone, if killed_at.is_none() => {
                tracing::info!(vm = %link.vm_id, "exec caller went away: killing the command");
                killed_at = Some(Instant::now());
                link.kill(&token).await;
                let _ = input.close().await;
                continue;
            }
        };
        match next {
            Some(Output::Stdout(b)) => so.push(&b),
            Some(Output::Stderr(b)) => se.push(&b),
            Some(Output::Exit(status)) => out.record_exit(status),
            None => break,
        }
    }
    feeder.abort();
    link.session.close().await;
    out.stdout = so.kept;
    out.stderr = se.kept;
    out.stdout_truncated = so.dropped;
    out.stderr_truncated = se.dropped;
    Ok(out)
}

/// Connects, retrying a refused or unreachable connection (sshd starting
/// after a boot or a wake) until `SSH_CONNECT_TIMEOUT`; any other failure
/// (a refused certificate, a broken handshake) is final.
async fn connect_retrying(
    ca: &crate::ssh::Ca,
    id: &str,
    principal: &str,
    addr: SocketAddr,
) -> Result<GuestSession> {
    let started = Instant::now();
    loop {
        let left = SSH_CONNECT_TIMEOUT.saturating_sub(started.elapsed());
        let timeout = left.max(Duration::from_secs(1));
        match GuestSession::connect_as(ca, id, principal, addr, timeout).await {
            Ok(s) => return Ok(s),
            Err(ClientError::Connect { .. }) if started.elapsed() < SSH_CONNECT_TIMEOUT => {
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(e) => return Err(guest_error(id, e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(command: Command) -> ExecSpec {
        ExecSpec {
            command,
            env: BTreeMap::new(),
            cwd: None,
        }
    }

    /// Runs a line through the host's /bin/sh, as a guest's shell would.
    fn sh(line: &str) -> (String, i32) {
        let out = std::process::Command::new("/bin/sh")
            .arg("-c")
            .arg(line)
            .env("SHELL", "/bin/sh")
            .output()
            .unwrap();
        (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            out.status.code().unwrap_or(-1),
        )
    }

    #[test]
    fn argv_words_reach_the_command_unchanged() {
        let nasty = vec![
            "printf".to_string(),
            "[%s]\\n".into(),
            "it's".into(),
            "$HOME `id` $(id)".into(),
            "a\nb".into(),
            "\"\\".into(),
            "".into(),
        ];
        let (out, code) = sh(&spec(Command::Argv(nasty)).line("t"));
        assert_eq!(code, 0);
        assert_eq!(out, "[it's]\n[$HOME `id` $(id)]\n[a\nb]\n[\"\\]\n[]\n");
    }

    #[test]
    fn shell_commands_env_and_cwd() {
        let mut s = spec(Command::Shell("echo \"$A|$B|$(pwd)\"; exit 7".into()));
        s.env.insert("A".into(), "it's $x".into());
        s.env.insert("B".into(), "".into());
        s.cwd = Some("/tmp".into());
        let (out, code) = sh(&s.line("t"));
        assert_eq!(out, "it's $x||/tmp\n");
        assert_eq!(code, 7, "the command's exit code comes through");
        let mut s = spec(Command::Shell("true".into()));
        s.cwd = Some("/no/such/dir".into());
        assert_eq!(sh(&s.line("t")).1, 1);
    }

    #[test]
    fn bad_input_is_refused() {
        assert!(spec(Command::Shell("  ".into())).validate().is_err());
        assert!(spec(Command::Argv(vec![])).validate().is_err());
        assert!(spec(Command::Argv(vec!["".into()])).validate().is_err());
        assert!(spec(Command::Shell("a\0b".into())).validate().is_err());
        for bad in ["1A", "A-B", "", "A B", "A=B", "Ä"] {
            let mut s = spec(Command::Shell("true".into()));
            s.env.insert(bad.into(), "x".into());
            assert!(s.validate().is_err(), "{bad:?}");
        }
        let mut s = spec(Command::Shell("true".into()));
        s.env.insert("_ok_1".into(), "x".into());
        s.cwd = Some("/".into());
        assert!(s.validate().is_ok());
    }

    #[test]
    fn the_pid_file_is_the_exec_s_own_and_goes_when_it_ends() {
        let token = new_token();
        let line = spec(Command::Shell("exit 3".into())).line(&token);
        assert!(line.starts_with(&format!("echo $$ > {}", pid_file(&token))));
        assert_eq!(sh(&line).1, 3);
        assert!(!std::path::Path::new(&pid_file(&token)).exists());
    }

    /// The kill line, run by the host's /bin/sh as a guest's would be,
    /// SIGKILLs a marked exec's leader and what it started in the background.
    #[test]
    fn the_kill_line_kills_the_marked_process_group() {
        use std::os::unix::process::{CommandExt, ExitStatusExt};
        let token = new_token();
        let s = spec(Command::Shell("sleep 1000 & sleep 1001".into()));
        // A group of its own, as sshd's setsid gives every session.
        let mut leader = std::process::Command::new("/bin/sh")
            .arg("-c")
            .arg(s.line(&token))
            .env("SHELL", "/bin/sh")
            .process_group(0)
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(300));
        let pgid = leader.id() as i32;
        /// Kills the test's own process group when the test ends, failed or not.
        struct Reap(i32);
        impl Drop for Reap {
            fn drop(&mut self) {
                // SAFETY: SIGKILL to a process group this test made.
                unsafe { libc::kill(-self.0, libc::SIGKILL) };
            }
        }
        let _reap = Reap(pgid);
        // SAFETY: kill(2) with signal 0 only checks that the group exists.
        assert_eq!(unsafe { libc::kill(-pgid, 0) }, 0, "the group runs");
        let (_, code) = sh(&kill_line(&token));
        assert_eq!(code, 0);
        let status = leader.wait().unwrap();
        assert_eq!(status.signal(), Some(libc::SIGKILL), "{status:?}");
        // Killed members linger as zombies until init reaps them.
        let deadline = Instant::now() + Duration::from_secs(10);
        // SAFETY: as above.
        while unsafe { libc::kill(-pgid, 0) } == 0 {
            assert!(Instant::now() < deadline, "a process of the group survived");
            std::thread::sleep(Duration::from_millis(50));
        }
        // Another marked group is not touched.
        let mut other = std::process::Command::new("/bin/sh")
            .arg("-c")
            .arg(spec(Command::Shell("sleep 1000".into())).line(&new_token()))
            .process_group(0)
            .spawn()
            .unwrap();
        let _reap_other = Reap(other.id() as i32);
        std::thread::sleep(Duration::from_millis(200));
        sh(&kill_line(&token));
        assert!(
            other.try_wait().unwrap().is_none(),
            "another exec was killed"
        );
        // SAFETY: SIGKILL to the test's own child's group.
        unsafe { libc::kill(-(other.id() as i32), libc::SIGKILL) };
        other.wait().unwrap();
    }

    #[test]
    fn capped_keeps_the_head() {
        let mut c = Capped::new(5);
        c.push(b"abc");
        assert!(!c.dropped);
        c.push(b"defg");
        c.push(b"h");
        assert_eq!(c.kept, b"abcde");
        assert!(c.dropped);
    }
}

//! The daemon's own SSH client to its guests: a fresh key per session, signed
//! by the CA for one VM, and channels that run one command each.

use super::{Ca, CaError, GUEST_USER};
use bytes::Bytes;
use russh::client::{self, Handle, Msg};
use russh::keys::{Certificate, PrivateKey, PublicKeyOrCertificate};
use russh::{ChannelMsg, ChannelReadHalf, ChannelWriteHalf, Disconnect, Sig};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWrite;

/// How long a session's certificate lives. The certificate is only used
/// during the handshake, so a minute is plenty even for a slow guest;
/// sessions that run longer are not cut by it (OpenSSH checks it at login).
const SESSION_CERT_TTL: Duration = Duration::from_secs(60);

/// The `TERM` a PTY asks for when the caller names none.
pub const DEFAULT_TERM: &str = "xterm-256color";

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("signing the session's certificate: {0}")]
    Sign(#[from] CaError),
    #[error("making the session's key: {0}")]
    Key(String),
    #[error("connecting to the guest's SSH server at {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("the guest's SSH server at {addr} did not finish the handshake within {secs} s")]
    Timeout { addr: SocketAddr, secs: u64 },
    #[error("SSH handshake with the guest at {addr}: {source}")]
    Handshake {
        addr: SocketAddr,
        #[source]
        source: russh::Error,
    },
    #[error("the guest's SSH server refused the daemon's certificate for user {user} (is the guest trusting this daemon's CA? see src/ssh/README.md)")]
    Refused { user: String },
    #[error("SSH channel: {0}")]
    Channel(#[from] russh::Error),
}

/// Accepts the guest's host key (see "Host keys" in src/ssh/README.md: the
/// daemon reaches the guest over a bridge it controls, at an address it
/// assigned, where the firewall drops frames from any other guest's IP or MAC).
struct GuestHostKey {
    vm_id: String,
}

impl client::Handler for GuestHostKey {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        key: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        if let PublicKeyOrCertificate::PublicKey { key, .. } = key {
            tracing::debug!(vm = %self.vm_id, fingerprint = %key.fingerprint(Default::default()), "guest host key");
        }
        Ok(true)
    }
}

/// One authenticated SSH connection to one guest.
pub struct GuestSession {
    handle: Handle<GuestHostKey>,
}

/// What a channel runs and how.
#[derive(Debug, Clone, Default)]
pub struct ChannelSpec {
    /// The command line the guest's login shell runs (SSH `exec`): the
    /// caller quotes it. None asks for the user's login shell.
    pub command: Option<String>,
    /// A pseudo-terminal, when set: stdout and stderr then arrive mixed, as
    /// stdout, with CRLF line ends.
    pub pty: Option<PtySize>,
}

/// A terminal's size, in characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PtySize {
    pub cols: u32,
    pub rows: u32,
    /// `TERM` for the remote side; [`DEFAULT_TERM`] when None.
    pub term: Option<String>,
}

/// How the remote command ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitStatus {
    /// It exited with this code.
    Code(u32),
    /// A signal ended it (the name without `SIG`, e.g. `TERM`).
    Signal { name: String, core_dumped: bool },
}

/// What the remote command sends, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    Stdout(Bytes),
    Stderr(Bytes),
    /// The exit status; more output may still follow before the channel closes.
    Exit(ExitStatus),
}

/// Signals a client can send (RFC 4254 6.9 names; OpenSSH delivers them to
/// the command when it runs without a PTY and to the PTY's process group
/// with one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    Int,
    Term,
    Kill,
    Hup,
    Quit,
    Usr1,
    Alrm,
    Pipe,
}

impl Signal {
    /// Parses `INT`, `SIGINT` or `int`.
    pub fn parse(name: &str) -> Option<Signal> {
        let upper = name.trim().to_ascii_uppercase();
        let bare = upper.strip_prefix("SIG").unwrap_or(&upper);
        Some(match bare {
            "INT" => Signal::Int,
            "TERM" => Signal::Term,
            "KILL" => Signal::Kill,
            "HUP" => Signal::Hup,
            "QUIT" => Signal::Quit,
            "USR1" => Signal::Usr1,
            "ALRM" => Signal::Alrm,
            "PIPE" => Signal::Pipe,
            _ => return None,
        })
    }

    fn sig(self) -> Sig {
        match self {
            Signal::Int => Sig::INT,
            Signal::Term => Sig::TERM,
            Signal::Kill => Sig::KILL,
            Signal::Hup => Sig::HUP,
            Signal::Quit => Sig::QUIT,
            Signal::Usr1 => Sig::USR1,
            Signal::Alrm => Sig::ALRM,
            Signal::Pipe => Sig::PIPE,
        }
    }
}

/// A fresh ed25519 key, as the CA's crate and the client's crate each see it.
/// The two crates are different major versions of RustCrypto's `ssh-key`,
/// so the key is made once from a seed and built in both.
fn session_key() -> Result<(ssh_key::PublicKey, PrivateKey), ClientError> {
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).map_err(|e| ClientError::Key(e.to_string()))?;
    let ours = ssh_key::private::Ed25519Keypair::from_seed(&seed);
    let theirs = russh::keys::ssh_key::private::Ed25519Keypair::from_seed(&seed);
    seed.fill(0);
    Ok((
        ssh_key::PublicKey::from(ours.public),
        PrivateKey::from(theirs),
    ))
}

impl GuestSession {
    /// Connects to the guest of `vm_id` at `addr` (its IP, port 22) and logs
    /// in as `agent` with a certificate the CA signs for this session only
    /// (principal: the VM id). `timeout` bounds the TCP connect, the
    /// handshake and the login together.
    pub async fn connect(
        ca: &Ca,
        vm_id: &str,
        addr: SocketAddr,
        timeout: Duration,
    ) -> Result<GuestSession, ClientError> {
        Self::connect_as(ca, vm_id, vm_id, addr, timeout).await
    }

    /// As [`GuestSession::connect`], with the certificate signed for
    /// `principal`: the principal the guest of `vm_id` trusts, which for a
    /// fork not yet told its own id is the id it was forked from (see
    /// "Forks" in src/ssh/README.md). Only the daemon's own sessions use
    /// this; a caller's key is never signed for another VM's id.
    pub async fn connect_as(
        ca: &Ca,
        vm_id: &str,
        principal: &str,
        addr: SocketAddr,
        timeout: Duration,
    ) -> Result<GuestSession, ClientError> {
        let (public, private) = session_key()?;
        let signed = ca.sign(&public, principal, SESSION_CERT_TTL)?;
        let cert = Certificate::from_openssh(&signed.openssh)
            .map_err(|e| ClientError::Key(format!("reading our own certificate: {e}")))?;
        let config = Arc::new(client::Config {
            // Interactive use sends small packets: do not let Nagle hold them.
            nodelay: true,
            // A guest that stops answering (paused, killed) must not hold a
            // session open for good.
            keepalive_interval: Some(Duration::from_secs(15)),
            keepalive_max: 4,
            ..Default::default()
        });
        let handler = GuestHostKey {
            vm_id: vm_id.to_string(),
        };
        let login = async {
            let stream = tokio::net::TcpStream::connect(addr)
                .await
                .map_err(|source| ClientError::Connect { addr, source })?;
            // russh applies `nodelay` only to sockets it opens itself.
            stream
                .set_nodelay(true)
                .map_err(|source| ClientError::Connect { addr, source })?;
            let mut handle = client::connect_stream(config, stream, handler)
                .await
                .map_err(|source| ClientError::Handshake { addr, source })?;
            let auth = handle
                .authenticate_openssh_cert(GUEST_USER, Arc::new(private), cert)
                .await
                .map_err(|source| ClientError::Handshake { addr, source })?;
            if !auth.success() {
                return Err(ClientError::Refused {
                    user: GUEST_USER.to_string(),
                });
            }
            Ok(GuestSession { handle })
        };
        tokio::time::timeout(timeout, login)
            .await
            .map_err(|_| ClientError::Timeout {
                addr,
                secs: timeout.as_secs(),
            })?
    }

    /// Opens a channel that runs `spec`. Several may be open at once.
    pub async fn open(&self, spec: &ChannelSpec) -> Result<RemoteProcess, ClientError> {
        let channel = self.handle.channel_open_session().await?;
        if let Some(pty) = &spec.pty {
            let term = pty.term.as_deref().unwrap_or(DEFAULT_TERM);
            channel
                .request_pty(true, term, pty.cols, pty.rows, 0, 0, &[])
                .await?;
        }
        match &spec.command {
            Some(command) => channel.exec(true, command.as_bytes()).await?,
            None => channel.request_shell(true).await?,
        }
        let (read, write) = channel.split();
        Ok(RemoteProcess {
            output: OutputStream {
                read,
                exited: false,
            },
            input: InputHandle {
                write: Arc::new(write),
            },
        })
    }

    /// Opens a channel running the guest's `sftp` subsystem and hands back
    /// its byte stream, for an SFTP client (`russh_sftp`) to speak over.
    pub async fn sftp(&self) -> Result<russh::ChannelStream<Msg>, ClientError> {
        let channel = self.handle.channel_open_session().await?;
        channel.request_subsystem(true, "sftp").await?;
        Ok(channel.into_stream())
    }

    /// Ends the connection politely (the guest's sshd logs a normal logout).
    pub async fn close(self) {
        let _ = self
            .handle
            .disconnect(Disconnect::ByApplication, "", "en")
            .await;
    }
}

/// One running remote command: its output to read, its input to write.
/// Split it to read and write from different tasks.
pub struct RemoteProcess {
    pub output: OutputStream,
    pub input: InputHandle,
}

/// The remote command's stdout, stderr and exit status.
pub struct OutputStream {
    read: ChannelReadHalf,
    exited: bool,
}

impl OutputStream {
    /// The next piece of output or the exit status; None once the channel
    /// closed. The SSH window is only refilled as this is called, so a
    /// caller that stops reading stops the remote writer (no unbounded
    /// buffering in the daemon).
    pub async fn next(&mut self) -> Option<Output> {
        loop {
            match self.read.wait().await? {
                ChannelMsg::Data { data } => return Some(Output::Stdout(data)),
                // Extended data type 1 is stderr (RFC 4254 5.2), the only one defined.
                ChannelMsg::ExtendedData { data, ext: 1 } => return Some(Output::Stderr(data)),
                ChannelMsg::ExitStatus { exit_status } if !self.exited => {
                    self.exited = true;
                    return Some(Output::Exit(ExitStatus::Code(exit_status)));
                }
                ChannelMsg::ExitSignal {
                    signal_name,
                    core_dumped,
                    ..
                } if !self.exited => {
                    self.exited = true;
                    return Some(Output::Exit(ExitStatus::Signal {
                        name: sig_name(&signal_name),
                        core_dumped,
                    }));
                }
                ChannelMsg::Close => return None,
                _ => {}
            }
        }
    }
}

fn sig_name(sig: &Sig) -> String {
    match sig {
        Sig::ABRT => "ABRT".into(),
        Sig::ALRM => "ALRM".into(),
        Sig::FPE => "FPE".into(),
        Sig::HUP => "HUP".into(),
        Sig::ILL => "ILL".into(),
        Sig::INT => "INT".into(),
        Sig::KILL => "KILL".into(),
        Sig::PIPE => "PIPE".into(),
        Sig::QUIT => "QUIT".into(),
        Sig::SEGV => "SEGV".into(),
        Sig::TERM => "TERM".into(),
        Sig::USR1 => "USR1".into(),
        Sig::Custom(name) => name.clone(),
    }
}

/// Writes to the remote command: stdin, end of stdin, signals, resizes.
/// Cheap to clone; every clone drives the same channel.
#[derive(Clone)]
pub struct InputHandle {
    write: Arc<ChannelWriteHalf<Msg>>,
}

impl InputHandle {
    /// Sends `data` to the command's stdin (waits for the SSH window).
    pub async fn write(&self, data: impl Into<Bytes>) -> Result<(), ClientError> {
        Ok(self.write.data_bytes(data).await?)
    }

    /// The command's stdin as a writer, for `tokio::io::copy`.
    pub fn writer(&self) -> impl AsyncWrite + Send + Unpin + 'static + use<'_> {
        self.write.make_writer()
    }

    /// Ends the command's stdin (it reads EOF).
    pub async fn eof(&self) -> Result<(), ClientError> {
        Ok(self.write.eof().await?)
    }

    pub async fn signal(&self, signal: Signal) -> Result<(), ClientError> {
        Ok(self.write.signal(signal.sig()).await?)
    }

    /// Tells the PTY its new size (the command gets SIGWINCH).
    pub async fn resize(&self, cols: u32, rows: u32) -> Result<(), ClientError> {
        Ok(self.write.window_change(cols, rows, 0, 0).await?)
    }

    /// Closes the channel. OpenSSH then hangs up on the command: with a PTY
    /// it gets SIGHUP; without one its pipes close and it is killed once
    /// the session ends (see [`GuestSession::close`]).
    pub async fn close(&self) -> Result<(), ClientError> {
        Ok(self.write.close().await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_keys_match_across_the_two_crates() {
        let (public, private) = session_key().unwrap();
        let theirs = private.public_key().to_openssh().unwrap();
        assert_eq!(public.to_openssh().unwrap(), theirs);
        let (other, _) = session_key().unwrap();
        assert_ne!(public, other, "every session gets a key of its own");
    }

    #[test]
    fn signal_names_parse() {
        assert_eq!(Signal::parse("SIGINT"), Some(Signal::Int));
        assert_eq!(Signal::parse("term"), Some(Signal::Term));
        assert_eq!(Signal::parse("KILL"), Some(Signal::Kill));
        assert_eq!(Signal::parse("STOP"), None);
        assert_eq!(Signal::parse(""), None);
    }
}

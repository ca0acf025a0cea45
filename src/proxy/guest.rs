//! The proxy's connections to guests: HTTP/1.1 over TCP, driven in the task
//! of the request that uses them, kept for the next request to the same VM
//! when the guest allows keep-alive.
//!
//! hyper's pooled client spawns a task per connection and passes every
//! request, response and body chunk between that task and the request's own
//! one; under load each hand-over is a wake-up of another task, often on the
//! other worker thread. Here the connection is polled by whoever waits on
//! it: the request's future until the response head is in, then the
//! response body as the client reads it. Only an upgraded connection
//! (WebSocket) gets a task of its own.

use super::Passed;
use crate::manager::Busy;
use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::{self, Connection, SendRequest};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::net::TcpStream;

type Io = TokioIo<GuestStream>;

/// The socket of a connection to a guest. hyper shuts its write side down
/// before it lets a connection go; for a plain HTTP exchange that FIN only
/// gives the guest one more packet to take in and one to acknowledge, right
/// before the reset the zero-linger close sends anyway (README, "Closing
/// connections to guests"). So such a connection's shutdown does nothing
/// and its close is the reset alone. A connection that asks for an upgrade
/// (WebSocket, any protocol after a 101) keeps real half-closes: the bytes
/// after the upgrade are the guest's protocol, whose end of input may matter.
struct GuestStream {
    tcp: TcpStream,
    half_close: bool,
}

impl tokio::io::AsyncRead for GuestStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tcp).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for GuestStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.tcp).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.tcp).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        if self.half_close {
            Pin::new(&mut self.tcp).poll_shutdown(cx)
        } else {
            Poll::Ready(Ok(()))
        }
    }
}

/// How long an unused connection to a guest is kept.
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Unused connections kept per VM and port; more are closed.
const MAX_IDLE_PER_TARGET: usize = 32;

/// Connections are kept per VM and per run of its VMM, not per address: a
/// guest address freed by a deleted VM and given to a new one, and a guest
/// booted, restored or woken again, never get connections made to the one
/// before. Those look open on the host (a guest that is gone sends no FIN),
/// and a request sent on one would be answered with a reset.
#[derive(Clone, PartialEq, Eq, Hash)]
pub(super) struct Target {
    pub vm: String,
    /// `Manager::enter_vm_boot`'s id of the VMM run.
    pub boot: u64,
    pub addr: SocketAddr,
}

/// One HTTP/1.1 connection to a guest.
pub(super) struct GuestConn {
    sender: SendRequest<Passed>,
    conn: Connection<Io, Passed>,
    /// The connection future has finished (the guest or hyper closed it).
    done: bool,
}

impl GuestConn {
    /// Drives the connection; notes when it has ended.
    fn poll_conn(&mut self, cx: &mut Context<'_>) {
        if !self.done && Pin::new(&mut self.conn).poll(cx).is_ready() {
            self.done = true;
        }
    }
}

struct Idle {
    conn: GuestConn,
    since: Instant,
}

/// Why a request did not get a response head from the guest.
pub(super) enum SendError {
    Connect(std::io::Error),
    Http(hyper::Error),
}

impl std::fmt::Display for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SendError::Connect(e) => write!(f, "{e}"),
            // hyper's own text is generic ("connection error"); its source says what happened.
            SendError::Http(e) => match std::error::Error::source(e) {
                Some(s) => write!(f, "{s}"),
                None => write!(f, "{e}"),
            },
        }
    }
}

pub(super) struct Pool {
    idle: Mutex<HashMap<Target, Vec<Idle>>>,
    connect_timeout: Duration,
}

impl Pool {
    pub fn new(connect_timeout: Duration) -> Arc<Pool> {
        Arc::new(Pool {
            idle: Mutex::new(HashMap::new()),
            connect_timeout,
        })
    }

    /// Closes connections unused for longer than the idle timeout, every few
    /// seconds, for as long as the pool is used.
    pub fn sweep_in_background(self: &Arc<Pool>) {
        let pool = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(pool) = pool.upgrade() else { return };
                pool.sweep(Instant::now());
            }
        });
    }

    fn sweep(&self, now: Instant) {
        let stale: Vec<Idle> = {
            let mut idle = self.idle.lock().unwrap();
            let mut stale = Vec::new();
            idle.retain(|_, conns| {
                let (old, fresh): (Vec<Idle>, Vec<Idle>) = std::mem::take(conns)
                    .into_iter()
                    .partition(|c| now.duration_since(c.since) >= IDLE_TIMEOUT);
                stale.extend(old);
                *conns = fresh;
                !conns.is_empty()
            });
            stale
        };
        // Closed outside the lock.
        drop(stale);
    }

    fn take_idle(&self, target: &Target) -> Option<GuestConn> {
        let mut idle = self.idle.lock().unwrap();
        let conns = idle.get_mut(target)?;
        let now = Instant::now();
        let mut found = None;
        while let Some(c) = conns.pop() {
            if now.duration_since(c.since) < IDLE_TIMEOUT {
                found = Some(c.conn);
                break;
            }
        }
        if conns.is_empty() {
            idle.remove(target);
        }
        found
    }

    /// Keeps `conn` for the next request to `target`, unless it has ended or
    /// enough are kept already.
    fn put(&self, target: Target, conn: GuestConn) {
        if conn.done || conn.sender.is_closed() {
            return;
        }
        let mut idle = self.idle.lock().unwrap();
        let conns = idle.entry(target).or_default();
        if conns.len() < MAX_IDLE_PER_TARGET {
            conns.push(Idle {
                conn,
                since: Instant::now(),
            });
        }
    }

    /// An unused connection to `target` that is still open and ready, if
    /// one is kept.
    async fn checkout(&self, target: &Target) -> Option<GuestConn> {
        while let Some(mut c) = self.take_idle(target) {
            // One poll with this task's context: a guest that closed the
            // connection while it was kept shows here.
            let ready = std::future::poll_fn(|cx| {
                c.poll_conn(cx);
                if c.done {
                    return Poll::Ready(false);
                }
                Poll::Ready(matches!(c.sender.poll_ready(cx), Poll::Ready(Ok(()))))
            })
            .await;
            if ready {
                return Some(c);
            }
        }
        None
    }

    /// A new connection to `addr`; `upgrade` when it is for a request that
    /// asks for one (see `GuestStream`).
    async fn connect(&self, addr: SocketAddr, upgrade: bool) -> Result<GuestConn, SendError> {
        let stream =
            match tokio::time::timeout(self.connect_timeout, TcpStream::connect(addr)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => return Err(SendError::Connect(e)),
                Err(_) => {
                    return Err(SendError::Connect(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!(
                            "no connection within {} s",
                            self.connect_timeout.as_secs_f64()
                        ),
                    )))
                }
            };
        stream.set_nodelay(true).map_err(SendError::Connect)?;
        // The proxy's close is a reset: no TIME_WAIT left behind (README:
        // "Closing connections to guests"). It closes only once it read the
        // response or gave up on it.
        stream.set_zero_linger().map_err(SendError::Connect)?;
        let stream = GuestStream {
            tcp: stream,
            half_close: upgrade,
        };
        let (sender, conn) = http1::handshake(TokioIo::new(stream))
            .await
            .map_err(SendError::Http)?;
        Ok(GuestConn {
            sender,
            conn,
            done: false,
        })
    }

    /// Sends `req` to `target` on a kept connection or a new one and waits
    /// for the response head, driving the connection meanwhile. A kept
    /// connection the guest closed before the request went out is replaced
    /// by a new one; a request that went out is never sent twice.
    pub async fn send(
        &self,
        target: &Target,
        mut req: Request<Passed>,
    ) -> Result<(Response<Incoming>, GuestConn), SendError> {
        loop {
            let (mut c, kept) = match self.checkout(target).await {
                Some(c) => (c, true),
                None => (self.connect(target.addr, false).await?, false),
            };
            let mut response = std::pin::pin!(c.sender.try_send_request(req));
            let result = std::future::poll_fn(|cx| {
                c.poll_conn(cx);
                response.as_mut().poll(cx)
            })
            .await;
            match result {
                Ok(resp) => return Ok((resp, c)),
                Err(mut e) => match e.take_message() {
                    Some(back) if kept => req = back,
                    _ => return Err(SendError::Http(e.into_error())),
                },
            }
        }
    }

    /// A new connection for a request that asks for an upgrade (WebSocket):
    /// driven in a task of its own, which hands the connection over once
    /// the guest answers 101. Never kept.
    pub async fn send_upgrade(
        &self,
        target: &Target,
        req: Request<Passed>,
    ) -> Result<Response<Incoming>, SendError> {
        let GuestConn {
            mut sender, conn, ..
        } = self.connect(target.addr, true).await?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!("proxy: upgrade connection to a guest: {e}");
            }
        });
        sender.send_request(req).await.map_err(SendError::Http)
    }
}

/// A guest's response body on its way to the client. Reading it drives the
/// connection it comes on; once read whole the connection goes back to the
/// pool (if the guest keeps it open). It keeps `_busy` (its VM counted busy)
/// as long as it lives.
pub(super) struct GuestBody {
    inner: Incoming,
    conn: Option<GuestConn>,
    pool: Arc<Pool>,
    target: Target,
    _busy: Busy,
}

impl GuestBody {
    pub fn new(
        inner: Incoming,
        conn: Option<GuestConn>,
        pool: Arc<Pool>,
        target: Target,
        busy: Busy,
    ) -> GuestBody {
        GuestBody {
            inner,
            conn,
            pool,
            target,
            _busy: busy,
        }
    }

    /// The body has been read whole: the connection is free again.
    fn release(&mut self, cx: &mut Context<'_>) {
        if let Some(mut c) = self.conn.take() {
            // Lets the connection see the end of the message (and a
            // `Connection: close`) before it is judged.
            c.poll_conn(cx);
            self.pool.put(self.target.clone(), c);
        }
    }
}

impl Drop for GuestBody {
    fn drop(&mut self) {
        // A body that was never read because it had nothing in it (HEAD,
        // 204, 304) leaves its connection reusable; `checkout` checks it.
        // Any other body dropped early (the client went away) closes it.
        if let Some(c) = self.conn.take() {
            if self.inner.is_end_stream() {
                self.pool.put(self.target.clone(), c);
            }
        }
    }
}

impl Body for GuestBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        if let Some(c) = self.conn.as_mut() {
            c.poll_conn(cx);
        }
        let frame = Pin::new(&mut self.inner).poll_frame(cx);
        match &frame {
            Poll::Ready(None) => self.release(cx),
            Poll::Ready(Some(Ok(_))) if self.inner.is_end_stream() => self.release(cx),
            // An error ends the connection; dropping it closes it.
            Poll::Ready(Some(Err(_))) => self.conn = None,
            _ => {}
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

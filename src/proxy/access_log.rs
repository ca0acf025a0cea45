//! The proxy's access log (HATCH_PROXY_ACCESS_LOG): one JSON line per request.
//!
//! A request never waits on the log: its line goes into a bounded channel
//! (`try_send`, no lock held while writing) and a thread of its own writes
//! the lines through a buffer, flushing whenever the channel runs dry. When
//! the writer cannot keep up and the channel is full, lines are dropped and
//! counted, and the count is reported in the daemon's own log.

use crate::config::AccessLogTarget;
use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, SizeHint};
use hyper::{Request, Response};
use serde::Serialize;
use std::io::Write;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use super::ProxyBody;

/// Lines waiting for the writer at most (a few MB of JSON).
const QUEUE: usize = 16 * 1024;

/// The status logged for a request whose client went away before it was
/// answered (nginx's convention; no response was sent).
pub const CLIENT_GONE: u16 = 499;

pub struct AccessLog {
    tx: SyncSender<Vec<u8>>,
    dropped: Arc<AtomicU64>,
}

impl AccessLog {
    /// Opens the target (a file is appended to) and starts the writer thread.
    pub fn open(target: &AccessLogTarget) -> std::io::Result<Arc<AccessLog>> {
        let out: Box<dyn Write + Send> = match target {
            AccessLogTarget::Stderr => Box::new(std::io::stderr()),
            AccessLogTarget::File(path) => {
                use std::os::unix::fs::OpenOptionsExt;
                Box::new(
                    std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .mode(0o600)
                        .open(path)?,
                )
            }
        };
        let (tx, rx) = sync_channel(QUEUE);
        let dropped = Arc::new(AtomicU64::new(0));
        let lost = Arc::clone(&dropped);
        std::thread::Builder::new()
            .name("proxy-access-log".into())
            .spawn(move || write_lines(rx, out, &lost))?;
        Ok(Arc::new(AccessLog { tx, dropped }))
    }

    fn send(&self, line: Vec<u8>) {
        match self.tx.try_send(line) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
            // The writer is gone (its output failed); it said so when it went.
            Err(TrySendError::Disconnected(_)) => {}
        }
    }
}

/// The writer thread: lines as they come, one flush per burst.
fn write_lines(rx: Receiver<Vec<u8>>, out: Box<dyn Write + Send>, dropped: &AtomicU64) {
    let mut out = std::io::BufWriter::with_capacity(64 * 1024, out);
    while let Ok(first) = rx.recv() {
        let mut result = out.write_all(&first);
        while let (Ok(()), Ok(line)) = (&result, rx.try_recv()) {
            result = out.write_all(&line);
        }
        if let Err(e) = result.and_then(|()| out.flush()) {
            tracing::error!("proxy access log: writing failed, no more lines are written: {e}");
            return;
        }
        let lost = dropped.swap(0, Ordering::Relaxed);
        if lost > 0 {
            tracing::warn!(
                lines = lost,
                "proxy access log: lines dropped, the writer could not keep up"
            );
        }
    }
}

/// What the proxy learned about a request while handling it. Filled only
/// when the access log is on (`on`), so a proxy without one copies nothing.
#[derive(Default)]
pub struct Seen {
    on: bool,
    pub host: Option<String>,
    pub vm_id: Option<String>,
    /// The VM was asleep and this request waited for its wake.
    pub woke: bool,
}

impl Seen {
    pub fn host(&mut self, host: &str) {
        if self.on {
            self.host = Some(host.to_string());
        }
    }

    pub fn vm(&mut self, vm_id: &str) {
        if self.on {
            self.vm_id = Some(vm_id.to_string());
        }
    }
}

/// One line of the log.
#[derive(Serialize)]
struct Line<'a> {
    /// When the request came (RFC 3339, milliseconds, UTC).
    time: &'a str,
    remote: String,
    /// The Host the request named; null when it was no host name (400).
    host: Option<&'a str>,
    method: &'a str,
    /// The path, without the query (it may hold secrets).
    path: &'a str,
    version: &'a str,
    status: u16,
    /// Response body bytes sent to the client.
    bytes: u64,
    /// From the request's arrival to the response body's end.
    duration_ms: f64,
    vm_id: Option<&'a str>,
    woke: bool,
}

/// A request being handled: its line is written when the response body
/// ends, or (status 499) when the request is dropped unanswered.
pub struct Pending {
    log: Arc<AccessLog>,
    start: Instant,
    time: String,
    remote: SocketAddr,
    method: String,
    path: String,
    version: &'static str,
    pub seen: Seen,
    done: bool,
}

impl Pending {
    pub fn new<B>(log: &Arc<AccessLog>, req: &Request<B>, remote: SocketAddr) -> Pending {
        Pending {
            log: Arc::clone(log),
            start: Instant::now(),
            time: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            remote,
            method: req.method().as_str().to_string(),
            path: req.uri().path().to_string(),
            version: match req.version() {
                hyper::Version::HTTP_2 => "HTTP/2",
                hyper::Version::HTTP_10 => "HTTP/1.0",
                _ => "HTTP/1.1",
            },
            seen: Seen {
                on: true,
                ..Seen::default()
            },
            done: false,
        }
    }

    /// The response, its body counted; the line goes when the body ends.
    pub fn finish(mut self, resp: Response<ProxyBody>) -> Response<ProxyBody> {
        self.done = true;
        let status = resp.status().as_u16();
        let (parts, body) = resp.into_parts();
        let body = Counted {
            inner: body,
            bytes: 0,
            status,
            pending: Some(self),
        };
        Response::from_parts(parts, body.boxed())
    }

    fn write(&self, status: u16, bytes: u64) {
        let line = Line {
            time: &self.time,
            remote: self.remote.to_string(),
            host: self.seen.host.as_deref(),
            method: &self.method,
            path: &self.path,
            version: self.version,
            status,
            bytes,
            duration_ms: self.start.elapsed().as_micros() as f64 / 1000.0,
            vm_id: self.seen.vm_id.as_deref(),
            woke: self.seen.woke,
        };
        let Ok(mut json) = serde_json::to_vec(&line) else {
            return;
        };
        json.push(b'\n');
        self.log.send(json);
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if !self.done {
            self.write(CLIENT_GONE, 0);
        }
    }
}

/// A response body that counts its bytes and writes the request's line
/// when it ends or is dropped (the client went away mid-body).
struct Counted {
    inner: ProxyBody,
    bytes: u64,
    status: u16,
    pending: Option<Pending>,
}

impl Counted {
    fn log(&mut self) {
        if let Some(p) = self.pending.take() {
            p.write(self.status, self.bytes);
        }
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.log();
    }
}

impl Body for Counted {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let frame = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(f))) = &frame {
            if let Some(data) = f.data_ref() {
                self.bytes += data.len() as u64;
            }
        }
        if matches!(frame, Poll::Ready(None)) || self.inner.is_end_stream() {
            self.log();
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

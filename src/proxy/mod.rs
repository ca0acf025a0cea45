//! The reverse proxy: `{subdomain}.{base_domain}` -> the route's VM at
//! `guest_ip:target_port`, waking the VM first when it sleeps.
//!
//! Clients speak HTTP/1.1 or HTTP/2 (cleartext, prior knowledge); the guest is
//! spoken to in HTTP/1.1 over keep-alive connections kept per VM (`guest.rs`). Bodies stream
//! both ways with back-pressure, and HTTP/1.1 upgrades (WebSocket) become a
//! byte pipe between the client and the guest.

mod access_log;
mod guest;
mod trust;

pub use trust::Cidr;

use access_log::{AccessLog, Pending, Seen};

use crate::config::ProxyConfig;
use crate::manager::{Busy, Manager, ManagerError, RouteTarget, WakeError, Woke};
use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Request, Response, StatusCode, Uri, Version};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::net::TcpListener;

type ProxyBody = BoxBody<Bytes, hyper::Error>;

/// How long a client may take to send a request's headers (the first one
/// counted from the connection's start).
const HEADER_TIMEOUT: Duration = Duration::from_secs(30);

struct Proxy {
    manager: Arc<Manager>,
    cfg: ProxyConfig,
    guests: Arc<guest::Pool>,
    access_log: Option<Arc<AccessLog>>,
    /// The daemon's main runtime, where wakes run: a restore's work does not
    /// hold up the proxy thread that asked for it.
    main: tokio::runtime::Handle,
}

/// Starts the proxy on `addr`: `cfg.threads` threads, each with a
/// single-threaded runtime of its own and its own listening socket on the
/// address (SO_REUSEPORT; the kernel spreads connections over them). A
/// connection, and the guest connections its requests use, stay on one
/// thread: no request hands work to another thread, which under load costs
/// more than the proxying (src/proxy/README.md, "Threads"). Wakes run on the
/// caller's runtime. Returns the address bound (a port 0 becomes the port
/// chosen); an error when the address cannot be bound or the access log
/// (HATCH_PROXY_ACCESS_LOG) cannot be opened. The threads serve until the
/// process ends.
pub fn start(
    addr: SocketAddr,
    manager: Arc<Manager>,
    cfg: ProxyConfig,
) -> std::io::Result<SocketAddr> {
    let access_log = cfg.access_log.as_ref().map(AccessLog::open).transpose()?;
    let listeners = bind(addr, cfg.threads.max(1))?;
    let bound = listeners[0].local_addr()?;
    let main = tokio::runtime::Handle::current();
    for (i, listener) in listeners.into_iter().enumerate() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let (manager, cfg, access_log, main) = (
            Arc::clone(&manager),
            cfg.clone(),
            access_log.clone(),
            main.clone(),
        );
        std::thread::Builder::new()
            .name(format!("hatch-proxy-{i}"))
            .spawn(move || {
                runtime.block_on(async move {
                    match TcpListener::from_std(listener) {
                        Ok(l) => serve_with(l, manager, cfg, access_log, main).await,
                        Err(e) => tracing::error!("proxy thread {i}: {e}"),
                    }
                })
            })?;
    }
    Ok(bound)
}

/// `n` listening sockets on `addr`, all with SO_REUSEPORT; a port 0 is
/// chosen by the first and used by the rest.
///
/// A socket without SO_REUSEPORT is bound first and let go: it fails when
/// anything listens there already, so a second daemon (or another
/// program of the same user that uses SO_REUSEPORT) is refused instead of
/// quietly sharing the port's connections.
fn bind(addr: SocketAddr, n: usize) -> std::io::Result<Vec<std::net::TcpListener>> {
    let socket = |at: SocketAddr| {
        let s = if at.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        // As std and tokio bind: a restart finds the port's TIME_WAITs.
        s.set_reuseaddr(true)?;
        std::io::Result::Ok(s)
    };
    let mut at = {
        let probe = socket(addr)?;
        probe.bind(addr)?;
        probe.local_addr()?
    };
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let socket = socket(at)?;
        socket.set_reuseport(true)?;
        socket.bind(at)?;
        at = socket.local_addr()?;
        let listener = socket.listen(1024)?.into_std()?;
        out.push(listener);
    }
    Ok(out)
}

async fn serve_with(
    listener: TcpListener,
    manager: Arc<Manager>,
    cfg: ProxyConfig,
    access_log: Option<Arc<AccessLog>>,
    main: tokio::runtime::Handle,
) {
    let guests = guest::Pool::new(cfg.request_timeout.min(Duration::from_secs(10)));
    guests.sweep_in_background();
    let proxy = Arc::new(Proxy {
        manager,
        cfg,
        guests,
        access_log,
        main,
    });
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Out of file descriptors and the like: wait instead of spinning.
                tracing::warn!("proxy accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let proxy = Arc::clone(&proxy);
        tokio::spawn(async move {
            let (first_tx, first_rx) = tokio::sync::oneshot::channel::<()>();
            let first_tx = std::sync::Mutex::new(Some(first_tx));
            let service = hyper::service::service_fn(move |req| {
                if let Some(tx) = first_tx.lock().unwrap().take() {
                    let _ = tx.send(());
                }
                let proxy = Arc::clone(&proxy);
                async move {
                    let started = std::time::Instant::now();
                    let resp = proxy.handle(req, peer).await;
                    let telemetry = proxy.manager.telemetry();
                    telemetry.proxied(resp.status().as_u16(), started.elapsed());
                    Ok::<_, std::convert::Infallible>(resp)
                }
            });
            let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            // A client that never finishes its request headers does not hold a connection forever.
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT);
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
            tokio::pin!(conn);
            // hyper's timer starts once it knows the protocol: a client that
            // sends nothing (or half the HTTP/2 preface) is timed here.
            tokio::select! {
                _ = conn.as_mut() => return,
                first = tokio::time::timeout(HEADER_TIMEOUT, first_rx) => {
                    if !matches!(first, Ok(Ok(()))) {
                        return;
                    }
                }
            }
            // Errors here are the client's connection ending; nothing to report.
            let _ = conn.await;
        });
    }
}

/// `{"error": "..."}` with `status`.
fn error(status: StatusCode, msg: impl Into<String>) -> Response<ProxyBody> {
    let body = serde_json::json!({ "error": msg.into() }).to_string();
    let mut resp = Response::new(Full::new(Bytes::from(body)).map_err(|e| match e {}).boxed());
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

/// The subdomain a request's host names under `base`: `app` for
/// `app.base[:port]`. One label only; anything else is no route.
pub fn subdomain_of<'a>(host: &'a str, base: &str) -> Option<&'a str> {
    let host = match host.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    };
    let host = host.strip_suffix('.').unwrap_or(host);
    if host.len() <= base.len() + 1 {
        return None;
    }
    let (sub, rest) = host.split_at(host.len() - base.len() - 1);
    let sub_ok = !sub.is_empty() && !sub.contains('.');
    (sub_ok && rest[1..].eq_ignore_ascii_case(base) && rest.starts_with('.')).then_some(sub)
}

/// Headers that describe one connection, not the message (RFC 9110 7.6.1).
/// Names, not text: removing by `&str` parsed each name on every request.
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

/// Removes hop-by-hop headers, those `Connection` names included. `Upgrade`
/// goes too unless the message is an upgrade being passed on.
fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .filter(|n| !(keep_upgrade && n == header::UPGRADE))
        .collect();
    for n in named {
        headers.remove(n);
    }
    for h in &HOP_BY_HOP {
        headers.remove(h);
    }
    if keep_upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        headers.remove(header::UPGRADE);
    }
}

/// Is this an HTTP/1.1 upgrade request (`Connection: upgrade` + `Upgrade`)?
fn wants_upgrade(req: &Request<Incoming>) -> bool {
    req.version() == Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && req
            .headers()
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

/// A client's request body on its way to the guest. It tells `sent` when it
/// has been read whole, or dropped (an empty body may never be read).
struct Passed {
    inner: Incoming,
    sent: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Drop for Passed {
    fn drop(&mut self) {
        if let Some(tx) = self.sent.take() {
            let _ = tx.send(());
        }
    }
}

impl Body for Passed {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let frame = Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(frame, Poll::Ready(None)) || self.inner.is_end_stream() {
            if let Some(tx) = self.sent.take() {
                let _ = tx.send(());
            }
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

impl Proxy {
    /// A request, logged when the access log is on.
    async fn handle(&self, req: Request<Incoming>, peer: SocketAddr) -> Response<ProxyBody> {
        let Some(log) = &self.access_log else {
            return self.route(req, peer, &mut Seen::default()).await;
        };
        // Dropped unanswered (the client went away), it still logs its line.
        let mut pending = Pending::new(log, &req, peer);
        let resp = self.route(req, peer, &mut pending.seen).await;
        pending.finish(resp)
    }

    async fn route(
        &self,
        req: Request<Incoming>,
        peer: SocketAddr,
        seen: &mut Seen,
    ) -> Response<ProxyBody> {
        // HTTP/2 carries the host in :authority, HTTP/1.1 in Host.
        let host = req
            .uri()
            .authority()
            .map(|a| a.as_str().to_string())
            .or_else(|| {
                req.headers()
                    .get(header::HOST)
                    .and_then(|h| h.to_str().ok())
                    .map(str::to_string)
            })
            .unwrap_or_default();
        // The host is never echoed: it is the client's text, of any size.
        if !trust::plausible_host(&host) {
            return error(
                StatusCode::BAD_REQUEST,
                "the Host header is not a host name",
            );
        }
        seen.host(&host);
        let no_route = || error(StatusCode::NOT_FOUND, "no route for this host");
        let Some(sub) = subdomain_of(&host, &self.cfg.base_domain) else {
            return no_route();
        };
        let Some(target) = self.manager.route_for(&sub.to_ascii_lowercase()) else {
            return no_route();
        };
        seen.vm(&target.vm_id);
        let (busy, boot) = match self.reach(&target, &mut seen.woke).await {
            Ok(b) => b,
            Err(resp) => return resp,
        };
        self.forward(req, peer, host, &target, busy, boot).await
    }

    /// Counts the request on the route's VM, waking the VM first if it
    /// sleeps (then `woke` is set); with the id of the VMM run it reached.
    async fn reach(
        &self,
        target: &RouteTarget,
        woke: &mut bool,
    ) -> Result<(Busy, u64), Response<ProxyBody>> {
        let vm = &target.vm_id;
        let deadline = tokio::time::Instant::now() + self.cfg.wake_timeout;
        let late = || {
            error(
                StatusCode::GATEWAY_TIMEOUT,
                format!(
                    "vm {vm} did not wake within {} s (HATCH_PROXY_WAKE_TIMEOUT)",
                    self.cfg.wake_timeout.as_secs_f64()
                ),
            )
        };
        // A second try covers a VM put to sleep again right after it woke.
        for _ in 0..2 {
            if let Some(entered) = self.manager.enter_vm_boot(vm) {
                return Ok(entered);
            }
            if !target.auto_wake {
                return Err(error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!(
                        "vm {vm} is not running and route {} does not wake it (auto_wake is false)",
                        target.route_id
                    ),
                ));
            }
            let manager = Arc::clone(&self.manager);
            let id = vm.clone();
            let waking = self.main.spawn(async move { manager.wake(&id).await });
            // A wake task that panicked is a failed wake.
            let waking = async {
                waking.await.unwrap_or_else(|e| {
                    Err(WakeError::Failed(Arc::new(ManagerError::Internal(
                        format!("the wake ended: {e}"),
                    ))))
                })
            };
            match tokio::time::timeout_at(deadline, waking).await {
                // Shared: every request that waited for this restore counts it.
                Ok(Ok(Woke::Restored)) => *woke = true,
                Ok(Ok(Woke::AlreadyRunning)) => {}
                // Stopped by its owner (or in error): not ours to start.
                Ok(Err(WakeError::NotAsleep(e))) => {
                    return Err(error(StatusCode::SERVICE_UNAVAILABLE, e))
                }
                Ok(Err(WakeError::Failed(e))) => {
                    return Err(error(
                        StatusCode::BAD_GATEWAY,
                        format!("waking vm {vm} failed: {e}"),
                    ))
                }
                Err(_) => return Err(late()),
            }
        }
        Err(error(
            StatusCode::BAD_GATEWAY,
            format!("vm {vm} went back to sleep while waking"),
        ))
    }

    async fn forward(
        &self,
        mut req: Request<Incoming>,
        peer: SocketAddr,
        host: String,
        target: &RouteTarget,
        busy: Busy,
        boot: u64,
    ) -> Response<ProxyBody> {
        let vm = &target.vm_id;
        let Some(ip) = target.guest_ip else {
            return error(
                StatusCode::BAD_GATEWAY,
                format!("vm {vm} has no network address"),
            );
        };
        let upgrade = wants_upgrade(&req);
        let client_side = upgrade.then(|| hyper::upgrade::on(&mut req));
        let client_version = req.version();
        let (mut parts, body) = req.into_parts();
        let path = parts
            .uri
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/");
        // Origin form: the guest is spoken to directly, not as a proxy.
        parts.uri = match Uri::try_from(path) {
            Ok(u) => u,
            Err(e) => return error(StatusCode::BAD_REQUEST, format!("bad request target: {e}")),
        };
        parts.version = Version::HTTP_11;
        let headers = &mut parts.headers;
        strip_hop_by_hop(headers, upgrade);
        if let Ok(h) = HeaderValue::from_str(&host) {
            headers.insert(header::HOST, h);
        }
        let trusted = self
            .cfg
            .trusted_proxies
            .iter()
            .any(|c| c.contains(peer.ip()));
        trust::set_forwarding_headers(headers, peer.ip(), &host, trusted);
        // The guest has HATCH_PROXY_TIMEOUT to answer once it has the whole
        // request: a long upload is not a slow guest.
        let (sent_tx, sent_rx) = tokio::sync::oneshot::channel();
        let sent_tx = if body.is_end_stream() {
            let _ = sent_tx.send(());
            None
        } else {
            Some(sent_tx)
        };
        let body = Passed {
            inner: body,
            sent: sent_tx,
        };
        let to = guest::Target {
            vm: vm.clone(),
            boot,
            addr: SocketAddr::new(ip.into(), target.port),
        };
        let req = Request::from_parts(parts, body);
        let response = async {
            if upgrade {
                let resp = self.guests.send_upgrade(&to, req).await?;
                Ok((resp, None))
            } else {
                let (resp, conn) = self.guests.send(&to, req).await?;
                Ok::<_, guest::SendError>((resp, Some(conn)))
            }
        };
        tokio::pin!(response);
        let sent = tokio::select! {
            r = &mut response => Ok(r),
            _ = sent_rx => tokio::time::timeout(self.cfg.request_timeout, &mut response).await,
        };
        let (mut resp, conn) = match sent {
            Ok(Ok(r)) => r,
            Ok(Err(why)) => {
                return error(
                    StatusCode::BAD_GATEWAY,
                    format!("vm {vm} did not answer on {ip}:{}: {why}", target.port),
                );
            }
            Err(_) => {
                return error(
                    StatusCode::GATEWAY_TIMEOUT,
                    format!(
                        "vm {vm} did not answer within {} s (HATCH_PROXY_TIMEOUT)",
                        self.cfg.request_timeout.as_secs_f64()
                    ),
                )
            }
        };
        if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
            if let Some(client_side) = client_side {
                let guest_side = hyper::upgrade::on(&mut resp);
                let vm = vm.clone();
                tokio::spawn(async move {
                    // The VM stays busy while the upgraded connection is open.
                    let _busy = busy;
                    match tokio::try_join!(client_side, guest_side) {
                        Ok((c, g)) => {
                            let (mut c, mut g) = (TokioIo::new(c), TokioIo::new(g));
                            let _ = tokio::io::copy_bidirectional(&mut c, &mut g).await;
                        }
                        Err(e) => tracing::debug!(vm = %vm, "proxy upgrade failed: {e}"),
                    }
                });
                let (mut parts, body) = resp.into_parts();
                strip_hop_by_hop(&mut parts.headers, true);
                return Response::from_parts(parts, body.boxed());
            }
        }
        let (mut parts, body) = resp.into_parts();
        strip_hop_by_hop(&mut parts.headers, false);
        parts.version = client_version;
        let body = guest::GuestBody::new(body, conn, Arc::clone(&self.guests), to.clone(), busy);
        Response::from_parts(parts, body.boxed())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // A runtime: a listening tokio socket is registered with one.
    #[tokio::test]
    async fn the_proxy_binds_one_socket_per_thread_and_never_shares_a_port_in_use() {
        let local = SocketAddr::from(([127, 0, 0, 1], 0));
        let ours = bind(local, 3).unwrap();
        let port = ours[0].local_addr().unwrap().port();
        assert_ne!(port, 0);
        for l in &ours {
            assert_eq!(l.local_addr().unwrap().port(), port);
        }
        // Anything on the port already: a second daemon, our own sockets
        // included (they have SO_REUSEPORT, the probe does not).
        let taken = SocketAddr::from(([127, 0, 0, 1], port));
        let e = bind(taken, 2).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::AddrInUse, "{e}");
        let other = std::net::TcpListener::bind(local).unwrap();
        let e = bind(other.local_addr().unwrap(), 1).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::AddrInUse, "{e}");
        // Connections reach the group.
        drop(other);
        for _ in 0..4 {
            std::net::TcpStream::connect(taken).unwrap();
        }
    }

    #[test]
    fn subdomains_under_the_base_domain() {
        let base = "vms.example.com";
        assert_eq!(subdomain_of("app.vms.example.com", base), Some("app"));
        assert_eq!(subdomain_of("app.vms.example.com:8081", base), Some("app"));
        assert_eq!(subdomain_of("APP.VMS.example.com.", base), Some("APP"));
        assert_eq!(subdomain_of("vms.example.com", base), None);
        assert_eq!(subdomain_of(".vms.example.com", base), None);
        assert_eq!(subdomain_of("a.b.vms.example.com", base), None);
        assert_eq!(subdomain_of("appvms.example.com", base), None);
        assert_eq!(subdomain_of("app.other.com", base), None);
        assert_eq!(subdomain_of("", base), None);
        assert_eq!(subdomain_of("app.localhost:8081", "localhost"), Some("app"));
    }

    #[test]
    fn hop_by_hop_headers_are_dropped() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, "keep-alive, x-secret".parse().unwrap());
        h.insert("x-secret", "1".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert(header::TRANSFER_ENCODING, "chunked".parse().unwrap());
        h.insert(header::UPGRADE, "websocket".parse().unwrap());
        h.insert("x-kept", "1".parse().unwrap());
        let mut plain = h.clone();
        strip_hop_by_hop(&mut plain, false);
        let names: Vec<&str> = plain.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["x-kept"]);
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h.get(header::UPGRADE).unwrap(), "websocket");
        assert_eq!(h.get(header::CONNECTION).unwrap(), "upgrade");
        assert!(h.get("x-secret").is_none());
    }
}

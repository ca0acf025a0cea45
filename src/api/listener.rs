//! The API's listener: HTTP/1.1 with a header-read timeout and a bound on
//! connections served at once, and a graceful drain at shutdown.

use crate::config::ApiConfig;
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};

/// Serves `app` on `listener` until `shutdown` resolves, then lets every
/// open connection finish its request in flight and returns once all closed.
///
/// A connection holds one of `cfg.max_connections` permits while it lives;
/// without a free one the next connection is not accepted (it waits in the
/// kernel's backlog) until one closes. hyper's header-read timer runs from
/// the moment a connection waits for a request's headers, so it bounds a
/// client that sends them slowly or never, and an idle keep-alive connection.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    cfg: &ApiConfig,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let permits = Arc::new(Semaphore::new(cfg.max_connections));
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            p = Arc::clone(&permits).acquire_owned() => p.expect("the semaphore is never closed"),
            _ = &mut shutdown => break,
        };
        let (stream, _peer) = tokio::select! {
            c = listener.accept() => match c {
                Ok(c) => c,
                Err(e) => {
                    // Out of file descriptors and the like: wait instead of spinning.
                    tracing::warn!("API accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(app.clone());
        let header_timeout = cfg.header_timeout;
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            let _permit = permit;
            // HTTP/1.1 only: hyper's slow-client timers are HTTP/1's, and API
            // clients (curl, scripts) speak it; see the module's README.
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout);
            let conn = builder
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades();
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => return,
                _ = stop.wait_for(|s| *s) => {}
            }
            // Shutting down: the request in flight is answered, then the connection closes.
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        });
    }
    drop(listener);
    let _ = stop_tx.send(true);
    // Every connection holds a permit: all of them back means all closed.
    let _all = permits
        .acquire_many(cfg.max_connections as u32)
        .await
        .expect("the semaphore is never closed");
    Ok(())
}

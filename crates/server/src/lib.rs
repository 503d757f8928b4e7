//! Tether's HTTP server: both wire dialects over one service layer, the dispatcher and long polling.

pub mod cache;
pub mod credentials;
pub mod dialect;
pub mod disk;
pub mod dispatcher;
pub mod error;
pub mod http;
pub mod hub;
pub mod listener;
pub mod memory;
mod parse_error;
mod purger;
pub mod sampler;
pub mod service;
pub mod services;
pub mod telemetry;
pub mod tls;
pub mod waiters;

use std::future::Future;
use std::time::Duration;

use services::Service;

pub use listener::ConnectionLimits;
pub use service::{App, ServiceConfig};
pub use tls::{TlsFiles, TlsSettings};

/// How long shutdown waits for requests in flight before giving up on them.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// How to serve: the body limit, TLS (or plain TCP) and the limits on connections.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    pub body_limit: usize,
    pub tls: Option<TlsSettings>,
    pub limits: ConnectionLimits,
}

impl ServeOptions {
    /// Plain HTTP with the default connection limits.
    pub fn plain(body_limit: usize) -> ServeOptions {
        ServeOptions {
            body_limit,
            tls: None,
            limits: ConnectionLimits::default(),
        }
    }
}

/// Serves `app` on `listener` in plain HTTP until `shutdown` resolves; see [`serve_with`].
pub async fn serve(
    app: App,
    listener: tokio::net::TcpListener,
    body_limit: usize,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_with(app, listener, ServeOptions::plain(body_limit), shutdown).await
}

/// Serves `app` on `listener` until `shutdown` resolves, then drains: blocked polls answer `null`,
/// streams end, requests in flight finish (bounded by [`SHUTDOWN_GRACE`]).
pub async fn serve_with(
    app: App,
    listener: tokio::net::TcpListener,
    options: ServeOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    http::ops::install_metrics();
    match app.amnesty_at_start().await {
        Ok(Some(granted)) => tracing::info!(
            granted,
            grace_ms = app.config.amnesty_grace_ms,
            "lease amnesty at start: leases due within the grace window were extended to its end"
        ),
        Ok(None) => tracing::info!(
            "another server sharing the database is keeping the leases: no lease amnesty at start"
        ),
        Err(e) => tracing::warn!(error = %e, "lease amnesty failed"),
    }
    let dispatcher = {
        let app = app.clone();
        Service::start(services::DISPATCHER, move || dispatcher::run(app.clone()))
    };
    let sampler = {
        let app = app.clone();
        Service::start(services::SAMPLER, move || sampler::run(app.clone()))
    };
    let disk_watch = {
        let app = app.clone();
        Service::start(services::DISK_WATCH, move || disk::run(app.clone()))
    };
    let event_purge = {
        let app = app.clone();
        Service::start(services::EVENT_PURGE, move || purger::run(app.clone()))
    };
    let router = http::router(app.clone(), options.body_limit);
    let stop = tokio_util::sync::CancellationToken::new();
    let accepting = tokio::spawn(listener::run(
        listener,
        router,
        options.tls,
        options.limits,
        stop.clone(),
        SHUTDOWN_GRACE,
    ));
    shutdown.await;
    app.begin_shutdown();
    stop.cancel();
    let outcome = accepting.await.map_err(std::io::Error::other);
    // Once no pass can mark them again.
    tokio::join!(
        dispatcher.stop(),
        sampler.stop(),
        disk_watch.stop(),
        event_purge.stop()
    );
    if let Err(e) = app.unmark_leases_kept().await {
        tracing::warn!(
            error = %e,
            "cannot take this server's lease mark back: the other servers take it as keeping the \
             leases for three of its ticks, and honour any promise of amnesty in it until its end"
        );
    }
    outcome
}

//! Tether's HTTP server: both wire dialects over one service layer, the dispatcher and long polling.

pub mod body;
pub mod credentials;
pub mod dialect;
pub mod dispatcher;
pub mod error;
pub mod http;
pub mod hub;
pub mod sampler;
pub mod service;
pub mod telemetry;
pub mod views;
pub mod waiters;

use std::future::Future;
use std::time::Duration;

pub use service::{App, ServiceConfig};

/// How long shutdown waits for requests in flight before giving up on them.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Serves `app` on `listener` until `shutdown` resolves, then drains: blocked polls answer `null`,
/// streams end, requests in flight finish (bounded by [`SHUTDOWN_GRACE`]).
pub async fn serve(
    app: App,
    listener: tokio::net::TcpListener,
    body_limit: usize,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    http::ops::install_metrics();
    if let Err(e) = app.grant_amnesty().await {
        tracing::warn!(error = %e.message, "lease amnesty failed");
    }
    let dispatcher = dispatcher::spawn(app.clone());
    let sampler = sampler::spawn(app.clone());
    let router = http::router(app.clone(), body_limit);
    let (drained_tx, drained_rx) = tokio::sync::oneshot::channel::<()>();
    let app_for_signal = app.clone();
    let signal = async move {
        shutdown.await;
        app_for_signal.begin_shutdown();
        let _ = drained_tx.send(());
    };
    let server = axum::serve(listener, router).with_graceful_shutdown(signal);
    let server = tokio::spawn(async move { server.await });
    let result = async {
        let _ = drained_rx.await;
        tokio::time::timeout(SHUTDOWN_GRACE, server).await
    };
    let outcome = match result.await {
        Ok(Ok(r)) => r,
        Ok(Err(join)) => Err(std::io::Error::other(join)),
        Err(_) => {
            tracing::warn!("requests still in flight after the shutdown grace; closing anyway");
            Ok(())
        }
    };
    dispatcher.abort();
    sampler.abort();
    outcome
}

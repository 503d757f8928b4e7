//! Health, readiness and metrics (§11.4).

use std::time::Duration;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::Json;
use metrics_exporter_prometheus::PrometheusHandle;
use tether_api::Health;

use crate::error::{ApiError, ApiResult};
use crate::service::App;

/// Installs the process-wide metrics recorder once (several servers in one test process share it).
pub fn install_metrics() -> Option<&'static PrometheusHandle> {
    crate::telemetry::install()
}

pub async fn healthz() -> Json<Health> {
    Json(Health {
        status: "ok".into(),
        store: None,
    })
}

/// How long `/readyz` waits for the store. A store that takes longer is as good as gone to a caller:
/// a disk that stalls, a database that no longer answers, or every read connection held by reads
/// that do not come back. Without a bound, the probe would wait as long as they do.
pub const READY_TIMEOUT: Duration = Duration::from_secs(2);

pub async fn readyz(State(app): State<App>) -> ApiResult<Json<Health>> {
    if app.is_shutting_down() {
        return Err(ApiError::unavailable("the server is shutting down"));
    }
    match tokio::time::timeout(READY_TIMEOUT, app.store.ping()).await {
        Ok(Ok(())) => {}
        Ok(Err(_)) => return Err(ApiError::unavailable("the database does not answer")),
        Err(_) => {
            return Err(ApiError::unavailable(format!(
                "the database did not answer within {} s",
                READY_TIMEOUT.as_secs()
            )))
        }
    }
    Ok(Json(Health {
        status: "ready".into(),
        store: Some(app.store.backend().to_owned()),
    }))
}

pub async fn metrics(State(app): State<App>) -> impl IntoResponse {
    let gauges = crate::telemetry::queue_gauges(&app).await;
    let text = app.live_scrape.text(|| {
        metrics::gauge!("tether_long_poll_waiters").set(app.waiters.count() as f64);
        metrics::gauge!("tether_session_streams").set(app.hub.streams() as f64);
        let mut text = install_metrics().map(|h| h.render()).unwrap_or_default();
        text.push_str(&gauges);
        text
    });
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text)
}

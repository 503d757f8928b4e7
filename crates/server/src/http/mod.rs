//! The HTTP surface: one API router mounted under both dialect prefixes, and the middleware that gives
//! every response a request id and every error the envelope.

pub mod access;
pub mod events;
pub mod extract;
pub mod ops;
pub mod resources;
pub mod work;

use std::time::Instant;

use axum::extract::{DefaultBodyLimit, MatchedPath, Request};
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use tower_http::catch_panic::CatchPanicLayer;

use crate::dialect::Dialect;
use crate::error::ApiError;
use crate::service::App;

/// The routes of one dialect, relative to its prefix.
fn api() -> Router<App> {
    use resources as r;
    Router::new()
        .route(
            "/environments",
            get(r::list_environments).post(r::create_environment),
        )
        .route(
            "/environments/{id}",
            get(r::get_environment)
                .post(r::update_environment)
                .delete(r::delete_environment),
        )
        .route("/environments/{id}/archive", post(r::archive_environment))
        .route(
            "/environments/{id}/keys",
            get(r::list_keys).post(r::create_key),
        )
        .route(
            "/environments/{id}/keys/{key_id}",
            axum::routing::delete(r::revoke_key),
        )
        .route("/environments/{id}/workers", get(work::workers))
        .route("/environments/{id}/work", get(work::list))
        .route("/environments/{id}/work/poll", get(work::poll))
        .route("/environments/{id}/work/stats", get(work::stats))
        .route(
            "/environments/{id}/work/{work_id}",
            get(work::get).post(work::update),
        )
        .route("/environments/{id}/work/{work_id}/ack", post(work::ack))
        .route(
            "/environments/{id}/work/{work_id}/heartbeat",
            post(work::heartbeat),
        )
        .route("/environments/{id}/work/{work_id}/stop", post(work::stop))
        .route(
            "/environments/{id}/work/{work_id}/history",
            get(work::history),
        )
        .route("/agents", get(r::list_agents).post(r::create_agent))
        .route("/agents/{id}", get(r::get_agent).post(r::update_agent))
        .route("/agents/{id}/archive", post(r::archive_agent))
        .route("/sessions", get(r::list_sessions).post(r::create_session))
        .route(
            "/sessions/{id}",
            get(r::get_session)
                .post(r::update_session)
                .delete(r::delete_session),
        )
        .route("/sessions/{id}/archive", post(r::archive_session))
        .route(
            "/sessions/{id}/events",
            get(events::list_events).post(events::post_events),
        )
        .route("/sessions/{id}/events/stream", get(events::stream))
        .route("/sessions/{id}/cancel", post(events::cancel))
        .route("/tokens", get(r::list_tokens).post(r::create_token))
        .route("/tokens/{id}", axum::routing::delete(r::revoke_token))
}

/// The whole application.
pub fn router(app: App, body_limit: usize) -> Router {
    let dialects = [Dialect::Qoder, Dialect::Anthropic];
    let mut router = Router::new()
        .route("/healthz", get(ops::healthz))
        .route("/readyz", get(ops::readyz))
        .route("/metrics", get(ops::metrics));
    for dialect in dialects {
        router = router.nest(dialect.prefix(), api().layer(Extension(dialect)));
    }
    router
        .fallback(|| async { ApiError::not_found("no such endpoint") })
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(CatchPanicLayer::custom(|_| {
            ApiError::internal("internal error").into_response()
        }))
        .layer(middleware::from_fn(envelope))
        .with_state(app)
}

/// Request ids (D-18), the error envelope (§1.7) and request metrics.
async fn envelope(request: Request, next: Next) -> Response {
    let request_id = request
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 200)
        .map(str::to_owned)
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".into());
    let method = request.method().as_str().to_owned();
    let started = Instant::now();
    let mut response = next.run(request).await;
    if let Some(error) = response.extensions_mut().remove::<ApiError>() {
        let body = error.body(&request_id);
        response = (error.status, Json(body)).into_response();
    } else if (response.status().is_client_error() || response.status().is_server_error())
        && !is_json(&response)
    {
        let error = ApiError::for_status(response.status());
        let body = error.body(&request_id);
        response = (error.status, Json(body)).into_response();
    }
    if let Ok(value) = HeaderValue::from_str(&request_id) {
        // The Anthropic SDK reads `request-id`; D-18 names `x-request-id`. Both carry the same value.
        response.headers_mut().insert("request-id", value.clone());
        response.headers_mut().insert("x-request-id", value);
    }
    let status = response.status();
    if status.is_client_error() && !matches!(status.as_u16(), 408 | 429) {
        // Our 4xx answers are deterministic: tell SDKs that honour it (both official ones do) not to
        // retry them — the Anthropic SDK would otherwise retry every 409 twice.
        response.headers_mut().insert("x-should-retry", HeaderValue::from_static("false"));
    }
    record_request(&method, &route, status, started);
    response
}

fn is_json(response: &Response) -> bool {
    response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"))
}

fn record_request(method: &str, route: &str, status: StatusCode, started: Instant) {
    let labels = [
        ("method", method.to_owned()),
        ("route", route.to_owned()),
        ("status", status.as_u16().to_string()),
    ];
    metrics::counter!("tether_http_requests_total", &labels).increment(1);
    metrics::histogram!("tether_http_request_seconds", &labels)
        .record(started.elapsed().as_secs_f64());
}

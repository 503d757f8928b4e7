//! A write whose commit went out before the database's connection was lost may have been applied,
//! and no answer will say whether it was. The client is told so, not told to retry: sent again, a
//! session, an agent or an event would be made twice.

mod counting;

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::http::{Request, StatusCode};
use counting::counting_app;
use http_body_util::BodyExt as _;
use serde_json::{json, Value};
use tether_core::SystemClock;
use tether_testkit::backends;
use tower::ServiceExt as _;

async fn call(
    router: &tether_server::http::Api,
    token: &str,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> (StatusCode, axum::http::HeaderMap, Value) {
    let request = Request::builder()
        .method(method)
        .uri(format!("/api/v1/cloud{path}"))
        .header("authorization", format!("Bearer {token}"))
        .header("host", "tether.test")
        .header("content-type", "application/json")
        .body(match body {
            Some(body) => axum::body::Body::from(body.to_string()),
            None => axum::body::Body::empty(),
        })
        .unwrap();
    let response = router.clone().oneshot(request).await.unwrap();
    let (parts, body) = response.into_parts();
    let bytes = body.collect().await.unwrap().to_bytes();
    let value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    (parts.status, parts.headers, value)
}

#[tokio::test]
async fn a_write_whose_answer_was_lost_is_said_to_be_of_unknown_outcome() {
    for backend in backends() {
        let name = backend.name();
        let (_location, app, counting, _env) =
            counting_app(&backend, Arc::new(SystemClock), "first").await;
        let token = app
            .bootstrap_admin_token(None)
            .await
            .unwrap()
            .expect("a fresh store has no admin token");
        let router = tether_server::http::router(app.clone(), 1 << 20);
        let create = |name: &'static str| {
            let body = json!({"name": name, "config": {"type": "self_hosted"}});
            call(&router, &token, "POST", "/environments", Some(body))
        };
        let names = || async {
            let (_, _, listed) = call(&router, &token, "GET", "/environments", None).await;
            let names: Vec<String> = listed["data"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e["name"].as_str().unwrap().to_owned())
                .collect();
            names
        };

        counting.answer_lost.store(true, Ordering::SeqCst);
        let (status, headers, body) = create("second").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{name}: {body}");
        assert_eq!(
            body["error"]["code"], "store_outcome_unknown",
            "{name}: {body}"
        );
        let message = body["error"]["message"].as_str().unwrap();
        assert!(
            message.contains("may have been applied"),
            "{name}: {message}"
        );
        assert!(!message.contains("retry shortly"), "{name}: {message}");
        // The official SDKs send a 503 again by themselves unless told not to.
        assert_eq!(headers["x-should-retry"], "false", "{name}");
        // And it was applied, here: what the client is told to look for before sending it again.
        let listed = names().await;
        assert!(listed.iter().any(|n| n == "second"), "{name}: {listed:?}");

        // An outage in which nothing was written says so, and may be retried.
        counting.down.store(true, Ordering::SeqCst);
        let (status, headers, body) = create("third").await;
        counting.down.store(false, Ordering::SeqCst);
        let listed = names().await;
        assert!(
            !listed.iter().any(|n| n == "third"),
            "{name}: nothing written: {listed:?}"
        );
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{name}: {body}");
        assert_eq!(body["error"]["code"], "store_unavailable", "{name}: {body}");
        assert!(headers.get("x-should-retry").is_none(), "{name}");
    }
}

//! An HTTP proxy on 127.0.0.1 in front of a real server that meddles with claims (`Meddling`):
//! it plays a server without the claim endpoint, or loses the answer of a claim that took an item.
//! Every other request goes through as it came. It counts what it saw, by path, and claims also
//! by their `retry` (`claim retry=true`) and by whether they carry a stop (`claim stop`).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderName, StatusCode};
use axum::response::{IntoResponse, Response};

/// What the proxy does to `POST …/work/claim`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Meddling {
    /// Answers 404 in the error envelope, as another platform or an older Tether.
    NoClaims,
    /// Forwards it; the first answer that brings an item is lost on the way back: its status and
    /// headers arrive, then the connection breaks inside the body. The server has committed the
    /// claim; the worker cannot know which item it took.
    LoseFirstTakenClaim,
    /// As `LoseFirstTakenClaim`, and every claim sent again with `retry=true` is answered 503
    /// without reaching the server, so that the worker goes on not knowing: only a try sent with
    /// `retry=only` (a draining worker's) gets through.
    LoseFirstTakenClaimUntilDrain,
    /// As `LoseFirstTakenClaim`, for the first claim that carries a stop (`stop` in its body)
    /// and took an item: the stop and the claim have both committed.
    LoseFirstTakenChainedClaim,
    /// Forwards every claim without its body, as a server that does not know a claim's `stop`
    /// reads it: the claim is made, the stop is not, and the answer does not say it was.
    DropClaimBodies,
    /// Answers every claim that carries a stop 400 in the error envelope, as a server that takes
    /// no body there (or a proxy that refuses it) might: the claim's own refusal, not the stop's.
    RefuseClaimsWithStops,
}

pub struct HttpProxy {
    pub url: String,
    /// Requests seen, by their last path segment (`claim`, `poll`, `ack`, `heartbeat`, …), and
    /// claims sent again by their `retry` as well (`claim retry=only`).
    seen: Arc<Mutex<BTreeMap<String, usize>>>,
    task: tokio::task::JoinHandle<()>,
}

impl HttpProxy {
    /// Starts proxying to `upstream` (`http://127.0.0.1:port`).
    pub async fn start(upstream: &str, meddling: Meddling) -> HttpProxy {
        let upstream = upstream.trim_end_matches('/').to_owned();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the proxy");
        let url = format!("http://{}", listener.local_addr().expect("proxy address"));
        let seen = Arc::new(Mutex::new(BTreeMap::new()));
        let client = reqwest::Client::new();
        let counted = seen.clone();
        let lost = Arc::new(AtomicBool::new(false));
        let app = axum::Router::new().fallback(move |request: Request| {
            let (client, upstream, seen) = (client.clone(), upstream.clone(), counted.clone());
            let lost = lost.clone();
            async move {
                let meddle = Meddle {
                    meddling,
                    lost: &lost,
                };
                forward(request, &client, &upstream, &seen, meddle).await
            }
        });
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.expect("the proxy serves");
        });
        HttpProxy { url, seen, task }
    }

    /// How many requests ended in this path segment.
    pub fn seen(&self, segment: &str) -> usize {
        self.seen.lock().unwrap().get(segment).copied().unwrap_or(0)
    }
}

impl Drop for HttpProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What one request's forwarding is to do to claims.
struct Meddle<'a> {
    meddling: Meddling,
    /// Whether a claim's answer was lost already.
    lost: &'a AtomicBool,
}

async fn forward(
    request: Request,
    client: &reqwest::Client,
    upstream: &str,
    seen: &Mutex<BTreeMap<String, usize>>,
    meddle: Meddle<'_>,
) -> Response {
    let path = request.uri().path().to_owned();
    let segment = path.rsplit('/').next().unwrap_or_default().to_owned();
    *seen.lock().unwrap().entry(segment.clone()).or_default() += 1;
    let query = request.uri().query().unwrap_or_default();
    let retry = query.split('&').find(|pair| pair.starts_with("retry="));
    if let Some(retry) = retry.filter(|_| segment == "claim") {
        *seen
            .lock()
            .unwrap()
            .entry(format!("claim {retry}"))
            .or_default() += 1;
    }
    if segment == "claim"
        && meddle.meddling == Meddling::LoseFirstTakenClaimUntilDrain
        && retry == Some("retry=true")
    {
        let envelope = serde_json::json!({
            "type": "error",
            "error": {"type": "api_error", "message": "the proxy keeps the worker guessing"},
        });
        return (StatusCode::SERVICE_UNAVAILABLE, axum::Json(envelope)).into_response();
    }
    if segment == "claim" && meddle.meddling == Meddling::NoClaims {
        let envelope = serde_json::json!({
            "type": "error",
            "error": {"type": "not_found_error", "message": format!("no route for {path}")},
        });
        return (StatusCode::NOT_FOUND, axum::Json(envelope)).into_response();
    }
    let target = format!(
        "{upstream}{}",
        request.uri().path_and_query().map_or("/", |p| p.as_str())
    );
    let (parts, body) = request.into_parts();
    let body = axum::body::to_bytes(body, 16 << 20)
        .await
        .expect("the request's body");
    let carries_a_stop = segment == "claim" && body.windows(6).any(|w| w == b"\"stop\"");
    if carries_a_stop {
        *seen.lock().unwrap().entry("claim stop".into()).or_default() += 1;
    }
    if carries_a_stop && meddle.meddling == Meddling::RefuseClaimsWithStops {
        let envelope = serde_json::json!({
            "type": "error",
            "error": {"type": "invalid_request_error", "message": "no body here", "param": "body"},
        });
        return (StatusCode::BAD_REQUEST, axum::Json(envelope)).into_response();
    }
    let body = match meddle.meddling {
        Meddling::DropClaimBodies if segment == "claim" => axum::body::Bytes::new(),
        _ => body,
    };
    let mut outgoing = client.request(parts.method, target).body(body);
    for (name, value) in &parts.headers {
        if !is_hop_by_hop(name) {
            outgoing = outgoing.header(name, value);
        }
    }
    let answer = match outgoing.send().await {
        Ok(answer) => answer,
        Err(e) => return (StatusCode::BAD_GATEWAY, e.to_string()).into_response(),
    };
    let answer_status = answer.status();
    let mut response = Response::builder().status(answer_status);
    for (name, value) in answer.headers() {
        if !is_hop_by_hop(name) {
            response = response.header(name, value);
        }
    }
    let bytes = answer.bytes().await.unwrap_or_default();
    let took_an_item =
        segment == "claim" && answer_status.is_success() && bytes.as_ref() != b"null";
    let loses = match meddle.meddling {
        Meddling::LoseFirstTakenClaim | Meddling::LoseFirstTakenClaimUntilDrain => true,
        Meddling::LoseFirstTakenChainedClaim => carries_a_stop,
        Meddling::NoClaims | Meddling::DropClaimBodies | Meddling::RefuseClaimsWithStops => false,
    };
    if loses && took_an_item && !meddle.lost.swap(true, Ordering::SeqCst) {
        // Half the answer, then a broken connection: hyper ends a response whose body fails.
        let half = bytes.slice(..bytes.len() / 2);
        let broken =
            futures::stream::iter([Ok(half), Err(std::io::Error::other("the connection broke"))]);
        return response
            .body(Body::from_stream(broken))
            .expect("a response");
    }
    response.body(Body::from(bytes)).expect("a response")
}

/// Headers that belong to one connection, which the proxy's own connections replace.
fn is_hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection" | "keep-alive" | "transfer-encoding" | "host" | "content-length" | "upgrade"
    )
}

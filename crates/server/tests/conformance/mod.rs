//! Support shared by the HTTP conformance suites (`conformance_*.rs`): requests with full control over
//! credentials, headers and raw bodies; the error-envelope check of §1.7; and a per-environment work
//! queue fixture that drives items into each state of §5 through the public API only.

// Each suite uses a different part of this module.
#![allow(dead_code, unused_imports)]

use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
pub use reqwest::header::HeaderMap;
pub use reqwest::{Method, StatusCode};
pub use serde_json::{json, Value};
pub use tether_testkit::{
    backends, each_backend, each_backend_with, listed_ids, string_fields, Backend, Options,
    StoreLocation, TestServer,
};

/// A request body as sent on the wire.
#[derive(Clone, Debug)]
pub enum Body {
    None,
    Json(Value),
    /// Bytes sent verbatim (malformed JSON, empty bodies, oversized bodies).
    Raw(String),
}

/// A response: status, headers and the body as JSON (or `Value::String` of the text when not JSON).
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Value,
}

impl Reply {
    /// Asserts a 200 and returns the body.
    #[track_caller]
    pub fn ok(&self) -> &Value {
        assert_eq!(
            self.status,
            StatusCode::OK,
            "expected 200, got {}: {}",
            self.status,
            self.body
        );
        &self.body
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// Asserts the §1.7 envelope with `status` and `error_type`; returns the `error` object.
    #[track_caller]
    pub fn error(&self, status: u16, error_type: &str) -> &Value {
        assert_eq!(
            self.status.as_u16(),
            status,
            "expected {status} {error_type}, got {}: {}",
            self.status,
            self.body
        );
        assert_eq!(
            self.body["type"], "error",
            "not an error envelope: {}",
            self.body
        );
        let request_id = self.body["request_id"]
            .as_str()
            .expect("request_id is a string");
        assert!(!request_id.is_empty(), "request_id is empty");
        assert_eq!(
            self.header("x-request-id"),
            Some(request_id),
            "x-request-id header and envelope disagree"
        );
        assert_eq!(self.body["error"]["type"], error_type, "{}", self.body);
        assert!(
            self.body["error"]["message"].is_string(),
            "error.message missing: {}",
            self.body
        );
        &self.body["error"]
    }

    /// [`Reply::error`] for a 400 naming `param`.
    #[track_caller]
    pub fn bad_param(&self, param: &str) {
        let error = self.error(400, "invalid_request_error");
        assert_eq!(error["param"], param, "{}", self.body);
    }
}

/// A request under construction. The admin token is sent unless told otherwise.
pub struct Req<'a> {
    server: &'a TestServer,
    method: Method,
    url: String,
    bearer: Option<String>,
    headers: Vec<(String, String)>,
    body: Body,
}

impl<'a> Req<'a> {
    pub fn new(server: &'a TestServer, method: Method, url: String) -> Req<'a> {
        Req {
            server,
            method,
            url,
            bearer: Some(server.admin_token.clone()),
            headers: Vec::new(),
            body: Body::None,
        }
    }

    pub fn bearer(mut self, token: &str) -> Self {
        self.bearer = Some(token.to_owned());
        self
    }

    /// Sends no `Authorization` header.
    pub fn anonymous(mut self) -> Self {
        self.bearer = None;
        self
    }

    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }

    pub fn worker(self, worker_id: &str) -> Self {
        self.header("Worker-ID", worker_id)
    }

    pub fn json(mut self, body: Value) -> Self {
        self.body = Body::Json(body);
        self
    }

    pub fn raw(mut self, body: impl Into<String>) -> Self {
        self.body = Body::Raw(body.into());
        self
    }

    pub fn body(mut self, body: Body) -> Self {
        self.body = body;
        self
    }

    pub async fn send(self) -> Reply {
        let method = self.method.clone();
        let mut req = self
            .server
            .http()
            .request(self.method, &self.url)
            .timeout(Duration::from_secs(30));
        if let Some(token) = &self.bearer {
            req = req.bearer_auth(token);
        }
        for (k, v) in &self.headers {
            req = req.header(k.as_str(), v.as_str());
        }
        req = match self.body {
            Body::None => req,
            Body::Json(v) => req.json(&v),
            Body::Raw(text) => req.body(text),
        };
        let resp = req.send().await.expect("request");
        let status = resp.status();
        let headers = resp.headers().clone();
        let url = resp.url().to_string();
        let text = resp.text().await.expect("body");
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        // Every answer the suites see must match what /openapi.json declares for it.
        let content_type = headers.get("content-type").and_then(|v| v.to_str().ok());
        tether_testkit::schema::check_response(&method, &url, status, content_type, &body);
        Reply {
            status,
            headers,
            body,
        }
    }
}

/// A request on the Qoder prefix (`/api/v1/cloud`).
pub fn req<'a>(server: &'a TestServer, method: Method, path: &str) -> Req<'a> {
    Req::new(server, method, server.url(path))
}

/// A request on the Anthropic prefix (`/v1`).
pub fn req_v1<'a>(server: &'a TestServer, method: Method, path: &str) -> Req<'a> {
    Req::new(server, method, server.v1(path))
}

/// Microseconds since the epoch of an RFC 3339 JSON string.
#[track_caller]
pub fn micros(v: &Value) -> i64 {
    let text = v.as_str().unwrap_or_else(|| panic!("not a timestamp: {v}"));
    tether_core::Timestamp::parse_rfc3339(text)
        .unwrap_or_else(|| panic!("not RFC 3339: {text}"))
        .as_micros()
}

/// A well-formed id of `prefix` that no server ever minted (the UUID's version nibble is 0).
pub fn unknown_id(prefix: &str) -> String {
    format!("{prefix}_0000000000000000000000000000abcd")
}

/// The id that sorts immediately after `id` (same prefix, hex body plus one): well-formed, never minted.
pub fn id_after(id: &str) -> String {
    let (prefix, hex) = id.rsplit_once('_').expect("prefix_hex");
    let n = u128::from_str_radix(hex, 16).expect("hex") + 1;
    format!("{prefix}_{n:032x}")
}

/// The session token carried in a polled item's `secret` (§11.1), with the advertised base URL.
#[track_caller]
pub fn decode_secret(item: &Value) -> (String, String) {
    let secret = item["secret"]
        .as_str()
        .unwrap_or_else(|| panic!("no secret on {item}"));
    let payload: Value = serde_json::from_slice(
        &URL_SAFE_NO_PAD
            .decode(secret)
            .expect("base64url without padding"),
    )
    .expect("secret is JSON");
    (
        payload["sessions_token"]
            .as_str()
            .expect("sessions_token")
            .to_owned(),
        payload["api_base_url"]
            .as_str()
            .expect("api_base_url")
            .to_owned(),
    )
}

/// The states of §5, in table order.
pub const STATES: [&str; 5] = ["queued", "starting", "active", "stopping", "stopped"];

/// An item the fixture made, with what the test needs to keep driving it.
#[derive(Clone, Debug)]
pub struct Item {
    pub id: String,
    pub session: String,
    /// The last `last_heartbeat` handed out, if any.
    pub last_heartbeat: Option<String>,
}

/// One self-hosted environment of a server, with an agent to create sessions from.
pub struct Queue<'a> {
    pub server: &'a TestServer,
    pub env: String,
    pub agent: String,
}

impl<'a> Queue<'a> {
    pub async fn new(server: &'a TestServer) -> Queue<'a> {
        let env = server.self_hosted_environment().await;
        let agent = server.agent().await;
        Queue { server, env, agent }
    }

    /// `/environments/{env}/work{suffix}`.
    pub fn path(&self, suffix: &str) -> String {
        format!("/environments/{}/work{suffix}", self.env)
    }

    /// `/environments/{env}/work/{id}{suffix}`.
    pub fn item_path(&self, id: &str, suffix: &str) -> String {
        format!("/environments/{}/work/{id}{suffix}", self.env)
    }

    pub fn req(&self, method: Method, path: &str) -> Req<'a> {
        req(self.server, method, path)
    }

    /// Creates a session (which enqueues its item) and returns the item, found through the work list.
    pub async fn enqueue(&self) -> Item {
        self.enqueue_with(json!({})).await
    }

    /// [`Queue::enqueue`] with extra session-create fields (e.g. metadata).
    pub async fn enqueue_with(&self, extra: Value) -> Item {
        let mut body = json!({"agent": self.agent, "environment_id": self.env});
        for (k, v) in extra.as_object().expect("object") {
            body[k] = v.clone();
        }
        let reply = req(self.server, Method::POST, "/sessions")
            .json(body)
            .send()
            .await;
        let session = reply.ok()["id"].as_str().expect("session id").to_owned();
        let id = self
            .work_of_session(&session)
            .await
            .expect("a session on a self-hosted environment has an item");
        Item {
            id,
            session,
            last_heartbeat: None,
        }
    }

    /// The newest item serving `session`, by walking the whole work list.
    pub async fn work_of_session(&self, session: &str) -> Option<String> {
        let mut found = None;
        let mut cursor: Option<String> = None;
        loop {
            let mut path = self.path("?limit=100");
            if let Some(c) = &cursor {
                path.push_str(&format!("&page={c}"));
            }
            let page = self.req(Method::GET, &path).send().await;
            let page = page.ok();
            for item in page["data"].as_array().expect("data") {
                if item["data"]["id"] == session {
                    found = Some(item["id"].as_str().expect("id").to_owned());
                }
            }
            match page["next_page"].as_str() {
                Some(next) => cursor = Some(next.to_owned()),
                None => return found,
            }
        }
    }

    /// A fresh item driven into `state` (one of [`STATES`]) through the API, without polling it (an ack of
    /// a never-delivered item is an implicit claim, D-6).
    pub async fn item_in(&self, state: &str) -> Item {
        let mut item = self.enqueue().await;
        if state == "queued" {
            return item;
        }
        if state == "stopped" {
            self.stop(&item.id, json!({"force": true})).await.ok();
            return item;
        }
        self.ack(&item.id, None).await.ok();
        if state == "starting" {
            return item;
        }
        let beat = self
            .heartbeat(&item.id, "?expected_last_heartbeat=NO_HEARTBEAT")
            .await;
        item.last_heartbeat = Some(
            beat.ok()["last_heartbeat"]
                .as_str()
                .expect("last_heartbeat")
                .to_owned(),
        );
        if state == "active" {
            return item;
        }
        assert_eq!(state, "stopping", "unknown state {state}");
        let stopped = self.stop(&item.id, json!({})).await;
        assert_eq!(stopped.ok()["state"], "stopping");
        item
    }

    pub async fn get(&self, id: &str) -> Value {
        self.req(Method::GET, &self.item_path(id, ""))
            .send()
            .await
            .ok()
            .clone()
    }

    pub async fn state(&self, id: &str) -> String {
        self.get(id).await["state"]
            .as_str()
            .expect("state")
            .to_owned()
    }

    pub async fn poll(&self, query: &str, worker: Option<&str>) -> Reply {
        let mut r = self.req(Method::GET, &self.path(&format!("/poll{query}")));
        if let Some(w) = worker {
            r = r.worker(w);
        }
        r.send().await
    }

    /// Tether's claim (poll, ack and first heartbeat in one request); `query` includes the `?`.
    pub async fn claim(&self, query: &str, worker: Option<&str>) -> Reply {
        let mut r = self.req(Method::POST, &self.path(&format!("/claim{query}")));
        if let Some(w) = worker {
            r = r.worker(w);
        }
        r.send().await
    }

    pub async fn ack(&self, id: &str, worker: Option<&str>) -> Reply {
        let mut r = self.req(Method::POST, &self.item_path(id, "/ack"));
        if let Some(w) = worker {
            r = r.worker(w);
        }
        r.send().await
    }

    /// `query` includes the leading `?` (or is empty).
    pub async fn heartbeat(&self, id: &str, query: &str) -> Reply {
        self.req(
            Method::POST,
            &self.item_path(id, &format!("/heartbeat{query}")),
        )
        .send()
        .await
    }

    /// A heartbeat without a query, sent as `worker` (the `Worker-ID` header).
    pub async fn heartbeat_as(&self, id: &str, worker: &str) -> Reply {
        self.req(Method::POST, &self.item_path(id, "/heartbeat"))
            .worker(worker)
            .send()
            .await
    }

    pub async fn stop(&self, id: &str, body: Value) -> Reply {
        self.req(Method::POST, &self.item_path(id, "/stop"))
            .json(body)
            .send()
            .await
    }

    /// [`Queue::stop`] with `token` (a session token, an environment key) as the credential.
    pub async fn stop_with(&self, token: &str, id: &str, body: Value) -> Reply {
        self.req(Method::POST, &self.item_path(id, "/stop"))
            .bearer(token)
            .json(body)
            .send()
            .await
    }

    pub async fn patch_metadata(&self, id: &str, metadata: Value) -> Reply {
        self.req(Method::POST, &self.item_path(id, ""))
            .json(json!({ "metadata": metadata }))
            .send()
            .await
    }

    pub async fn stats(&self) -> Value {
        self.req(Method::GET, &self.path("/stats"))
            .send()
            .await
            .ok()
            .clone()
    }

    /// The whole history of an item (§11.2).
    pub async fn history(&self, id: &str) -> Vec<Value> {
        let reply = self
            .req(Method::GET, &self.item_path(id, "/history?limit=100"))
            .send()
            .await;
        reply.ok()["data"].as_array().expect("data").clone()
    }

    pub async fn causes(&self, id: &str) -> Vec<String> {
        self.history(id)
            .await
            .iter()
            .map(|t| t["cause"].as_str().expect("cause").to_owned())
            .collect()
    }
}

/// Whether `value` is `<prefix>_<32 lowercase hex>` whose hex is a UUIDv7 (§1.5, D-1).
pub fn is_uuid7_id(value: &Value, prefix: &str) -> bool {
    value.as_str().is_some_and(|id| {
        id.strip_prefix(prefix)
            .and_then(|r| r.strip_prefix('_'))
            .is_some_and(|hex| {
                hex.len() == 32
                    && hex
                        .bytes()
                        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
                    && hex.as_bytes()[12] == b'7'
            })
    })
}

/// Asserts the §2.3 field invariants of a rendered work item, and the id and timestamp formats of §1.5
/// and §1.6 (UTC with a `Z`, nullable stamps present as `null`).
#[track_caller]
pub fn assert_invariants(item: &Value) {
    let set = |f: &str| !item[f].is_null();
    assert_eq!(item["type"], "work");
    assert!(is_uuid7_id(&item["id"], "work"), "{item}");
    assert!(is_uuid7_id(&item["environment_id"], "env"), "{item}");
    for stamp in [
        "created_at",
        "acknowledged_at",
        "started_at",
        "latest_heartbeat_at",
        "stop_requested_at",
        "stopped_at",
    ] {
        let value = item
            .get(stamp)
            .unwrap_or_else(|| panic!("{stamp} is missing: {item}"));
        if !value.is_null() {
            assert!(
                value.as_str().is_some_and(|t| t.ends_with('Z')),
                "{stamp} is not UTC with Z: {item}"
            );
            micros(value);
        }
    }
    assert!(set("created_at"), "{item}");
    assert!(item["secret"].is_null() || item["secret"].is_string());
    match item["state"].as_str().expect("state") {
        "queued" => {
            for f in [
                "acknowledged_at",
                "started_at",
                "latest_heartbeat_at",
                "stopped_at",
            ] {
                assert!(!set(f), "queued item has {f}: {item}");
            }
        }
        "starting" => assert!(set("acknowledged_at") && !set("started_at"), "{item}"),
        "active" => assert!(
            set("acknowledged_at") && set("started_at") && set("latest_heartbeat_at"),
            "{item}"
        ),
        "stopping" => assert!(set("stop_requested_at"), "{item}"),
        "stopped" => assert!(set("stopped_at"), "{item}"),
        other => panic!("unknown state {other}"),
    }
}

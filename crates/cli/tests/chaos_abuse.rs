//! Abuse of the real `tether serve` binary over loopback: huge, deep and value-dense bodies, events at the
//! size limit posted and listed concurrently, live streams replaying them. Meanwhile `/healthz` and a
//! worker's heartbeat must keep answering, and the process's resident memory (VmRSS, sampled all along)
//! must stay under the bound ARCHITECTURE.md gives ("Bounded everything"), which the test prints.
//!
//! Bounded and seeded: a fixed number of requests of sizes drawn from `TETHER_CHAOS_SEED` (printed).

mod support;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use reqwest::StatusCode;
use serde_json::{json, Value};
use support::ServerProcess;

const MIB: u64 = 1 << 20;
/// The server's limits in this run (its defaults).
const EVENT_LIMIT: u64 = MIB;
const BODY_LIMIT: u64 = 32 * MIB;
const REQUEST_MEMORY: u64 = 256 * MIB;
/// `tether_server::service::events::READ_BYTES`.
const READ_BYTES: u64 = MIB;
/// Concurrent listings and streams in this run.
const READERS: u64 = 8;
const STREAMS: u64 = 2;
/// What the process may hold beyond the formula's terms: its runtime, connection buffers, the embedded
/// store's page cache, and the allocator's slack (freed memory it keeps for reuse).
const SLACK: u64 = 96 * MIB;

fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

struct Api {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl Api {
    fn url(&self, path: &str) -> String {
        format!("{}/api/v1/cloud{path}", self.base)
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> (StatusCode, Value) {
        let resp = req.bearer_auth(&self.token).send().await.expect("request");
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    async fn post(&self, path: &str, body: Value) -> (StatusCode, Value) {
        self.send(self.http.post(self.url(path)).json(&body)).await
    }

    /// [`Self::post`] of a large body, which the server may refuse before reading it all: it then
    /// answers 503, reads at most 64 KiB more and closes, and the client, still sending, may see the
    /// connection end before the answer (`None`).
    async fn post_large(&self, path: &str, body: Value) -> Option<(StatusCode, Value)> {
        let resp = self
            .http
            .post(self.url(path))
            .json(&body)
            .bearer_auth(&self.token)
            .send()
            .await
            .ok()?;
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        Some((
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        ))
    }

    async fn post_raw(&self, path: &str, body: Vec<u8>) -> (StatusCode, Value) {
        self.send(
            self.http
                .post(self.url(path))
                .header("content-type", "application/json")
                .body(body),
        )
        .await
    }

    async fn get(&self, path: &str) -> (StatusCode, Value) {
        self.send(self.http.get(self.url(path))).await
    }

    /// A body-less request as the worker that holds an item through the abuse.
    async fn as_worker(&self, method: reqwest::Method, path: &str) -> (StatusCode, Value) {
        let req = self.http.request(method, self.url(path));
        self.send(req.header("Worker-ID", "abuse-worker")).await
    }
}

/// Sends only the head of a POST that declares `length` bytes of body, and reads the answer.
async fn raw_post_head(api: &Api, path: &str, length: u64) -> (StatusCode, Value) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let address = api.base.trim_start_matches("http://").to_owned();
    let mut stream = tokio::net::TcpStream::connect(&address).await.unwrap();
    let head = format!(
        "POST /api/v1/cloud{path} HTTP/1.1\r\nHost: {address}\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n",
        api.token
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut answer)).await;
    let text = String::from_utf8_lossy(&answer);
    let status: u16 = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("");
    (
        StatusCode::from_u16(status).unwrap_or(StatusCode::IM_A_TEAPOT),
        serde_json::from_str(body).unwrap_or(Value::String(body.to_owned())),
    )
}

fn text_event(text: String) -> Value {
    json!({"type": "agent.message", "content": [{"type": "text", "text": text}]})
}

/// An event whose JSON is `size` bytes or a little less.
fn event_of_size(rng: &mut StdRng, size: usize) -> Value {
    let letter = (b'a' + rng.random_range(0..26u8)) as char;
    text_event(letter.to_string().repeat(size.saturating_sub(80)))
}

fn assert_envelope(what: &str, status: StatusCode, body: &Value, want: StatusCode) {
    assert_eq!(status, want, "{what}: {body}");
    assert_eq!(body["type"], "error", "{what}: {body}");
    assert!(body["error"]["message"].is_string(), "{what}: {body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chaos_abuse_keeps_the_server_answering_within_its_memory_bound() {
    let seed: u64 = std::env::var("TETHER_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20261201);
    println!("chaos_abuse: seed {seed} (TETHER_CHAOS_SEED)");
    let mut rng = StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path(), &[]);
    let pid = server.child.id();
    let api = Arc::new(Api {
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(120))
            .build()
            .unwrap(),
        base: server.base.clone(),
        token: server.token.clone(),
    });

    // A session to fill, and a worker holding another session's item with heartbeats.
    let (_, env) = api
        .post(
            "/environments",
            json!({"name": "abuse", "config": {"type": "self_hosted"}}),
        )
        .await;
    let env = env["id"].as_str().unwrap().to_owned();
    let (_, agent) = api
        .post("/agents", json!({"name": "a", "model": "m"}))
        .await;
    let agent = agent["id"].as_str().unwrap().to_owned();
    let (_, held) = api
        .post("/sessions", json!({"agent": agent, "environment_id": env}))
        .await;
    let poll = format!("/environments/{env}/work/poll?block_ms=999");
    let (_, item) = api.as_worker(reqwest::Method::GET, &poll).await;
    assert_eq!(item["data"]["id"], held["id"], "{item}");
    let work = item["id"].as_str().unwrap().to_owned();
    let ack = format!("/environments/{env}/work/{work}/ack");
    let (status, _) = api.as_worker(reqwest::Method::POST, &ack).await;
    assert_eq!(status, StatusCode::OK);
    let (_, session) = api
        .post("/sessions", json!({"agent": agent, "environment_id": env}))
        .await;
    let session = session["id"].as_str().unwrap().to_owned();

    let baseline = rss_bytes(pid).expect("VmRSS");
    let bound =
        baseline + REQUEST_MEMORY + (READERS + STREAMS) * 2 * (READ_BYTES + EVENT_LIMIT) + SLACK;
    println!(
        "chaos_abuse: memory bound = baseline {} MiB + request memory {} MiB + {} readers × 2 × \
         (read bytes {} MiB + event limit {} MiB) + slack {} MiB = {} MiB",
        baseline / MIB,
        REQUEST_MEMORY / MIB,
        READERS + STREAMS,
        READ_BYTES / MIB,
        EVENT_LIMIT / MIB,
        SLACK / MIB,
        bound / MIB
    );

    // Resident memory, sampled every 20 ms until the end.
    let done = Arc::new(AtomicBool::new(false));
    let peak = Arc::new(AtomicU64::new(baseline));
    let sampler = {
        let (done, peak) = (done.clone(), peak.clone());
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                if let Some(rss) = rss_bytes(pid) {
                    peak.fetch_max(rss, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };

    // Liveness all along: /healthz and the worker's heartbeat.
    let liveness = {
        let (api, done, env, work) = (api.clone(), done.clone(), env.clone(), work.clone());
        tokio::spawn(async move {
            let mut answered = 0u32;
            let mut last = "NO_HEARTBEAT".to_owned();
            while !done.load(Ordering::Relaxed) {
                let health = api
                    .http
                    .get(format!("{}/healthz", api.base))
                    .send()
                    .await
                    .expect("healthz answers");
                assert_eq!(health.status(), StatusCode::OK);
                let (status, beat) = api
                    .send(api.http.post(api.url(&format!(
                        "/environments/{env}/work/{work}/heartbeat?expected_last_heartbeat={last}"
                    ))))
                    .await;
                assert_eq!(status, StatusCode::OK, "heartbeat: {beat}");
                last = beat["last_heartbeat"].as_str().unwrap().to_owned();
                answered += 1;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            answered
        })
    };

    // Hostile bodies, one after another.
    let events_path = format!("/sessions/{session}/events");
    // Declared too large: answered from the headers alone (the body is never sent).
    let (status, body) = raw_post_head(&api, &events_path, BODY_LIMIT + MIB).await;
    assert_envelope(
        "a body over the limit",
        status,
        &body,
        StatusCode::BAD_REQUEST,
    );
    // Sent in chunks, too large: refused once the limit is passed; the server may close the connection
    // while the client still sends, so the client may see that instead of the answer.
    let chunks = futures::stream::iter(
        (0..(BODY_LIMIT / MIB + 2)).map(|_| Ok::<_, std::io::Error>(vec![b' '; MIB as usize])),
    );
    // A client of its own: the server closes this connection, which must not go back to a shared pool.
    let chunked = reqwest::Client::new()
        .post(api.url(&events_path))
        .bearer_auth(&api.token)
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await;
    if let Ok(resp) = chunked {
        let status = resp.status();
        let body: Value = resp.json().await.unwrap_or(Value::Null);
        assert_envelope(
            "a chunked body over the limit",
            status,
            &body,
            StatusCode::BAD_REQUEST,
        );
    }
    let depth = 1_000_000;
    let deep = [vec![b'['; depth], vec![b']'; depth]].concat();
    let (status, body) = api.post_raw(&events_path, deep).await;
    assert_envelope(
        "a deeply nested body",
        status,
        &body,
        StatusCode::BAD_REQUEST,
    );
    let dense = format!("[{}0]", "0,".repeat(15 * MIB as usize)).into_bytes();
    let (status, body) = api.post_raw(&events_path, dense).await;
    assert_envelope("15 million values", status, &body, StatusCode::BAD_REQUEST);
    let too_big = event_of_size(&mut rng, (EVENT_LIMIT + MIB / 2) as usize);
    let (status, body) = api.post(&events_path, json!({"events": [too_big]})).await;
    assert_envelope(
        "an event over the limit",
        status,
        &body,
        StatusCode::BAD_REQUEST,
    );
    assert_eq!(body["error"]["param"], "events[0]");

    // Large events: posters fill the session with batches near the body limit while readers list it
    // and streams replay it.
    let mut posters = Vec::new();
    for p in 0..6u64 {
        let api = api.clone();
        let path = events_path.clone();
        let mut rng = StdRng::seed_from_u64(seed.wrapping_add(p));
        posters.push(tokio::spawn(async move {
            let (mut ok, mut busy) = (0u32, 0u32);
            for _ in 0..2 {
                let count = rng.random_range(20..=28);
                let events: Vec<Value> = (0..count)
                    .map(|_| {
                        let size = rng.random_range((EVENT_LIMIT / 2)..EVENT_LIMIT) as usize;
                        event_of_size(&mut rng, size)
                    })
                    .collect();
                let Some((status, body)) = api.post_large(&path, json!({ "events": events })).await
                else {
                    // Refused mid-body; the server's liveness is checked after the posters.
                    busy += 1;
                    continue;
                };
                match status {
                    StatusCode::OK => ok += 1,
                    StatusCode::SERVICE_UNAVAILABLE => {
                        assert_envelope("a post refused as busy", status, &body, status);
                        busy += 1;
                    }
                    other => panic!("a post of {count} events answered {other}: {body}"),
                }
            }
            (ok, busy)
        }));
    }
    let mut readers = Vec::new();
    for _ in 0..READERS {
        let (api, session) = (api.clone(), session.clone());
        readers.push(tokio::spawn(async move {
            // Read while the posts land: from the first committed batch on.
            for _ in 0..600 {
                let (_, page) = api
                    .get(&format!("/sessions/{session}/events?limit=1"))
                    .await;
                if !page["first_id"].is_null() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let mut seen = 0usize;
            for _ in 0..3 {
                let mut cursor = String::new();
                for _ in 0..1000 {
                    let (status, page) = api
                        .send(api.http.get(format!(
                            "{}/v1/sessions/{session}/events?limit=1000{cursor}",
                            api.base
                        )))
                        .await;
                    assert_eq!(status, StatusCode::OK, "{page}");
                    seen += page["data"].as_array().unwrap().len();
                    match page["next_page"].as_str() {
                        Some(next) => cursor = format!("&page={next}"),
                        None => break,
                    }
                }
                tokio::time::sleep(Duration::from_millis(1000)).await;
            }
            seen
        }));
    }
    let mut streams = Vec::new();
    for _ in 0..STREAMS {
        let (api, session) = (api.clone(), session.clone());
        streams.push(tokio::spawn(async move {
            // Replay from the first event, once there is one.
            let mut first = None;
            for _ in 0..600 {
                let (_, page) = api
                    .get(&format!("/sessions/{session}/events?limit=1"))
                    .await;
                if let Some(id) = page["first_id"].as_str() {
                    first = Some(id.to_owned());
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let first = first.expect("an event was posted");
            let resp = api
                .http
                .get(api.url(&format!("/sessions/{session}/events/stream")))
                .bearer_auth(&api.token)
                .header("Last-Event-ID", &first)
                .send()
                .await
                .expect("stream");
            assert_eq!(resp.status(), StatusCode::OK);
            let mut body = resp.bytes_stream();
            let mut frames = 0usize;
            let until = tokio::time::Instant::now() + Duration::from_secs(8);
            while let Ok(Some(Ok(chunk))) = tokio::time::timeout_at(until, body.next()).await {
                frames += chunk.windows(3).filter(|w| w == b"id:").count();
            }
            frames
        }));
    }

    let (mut ok, mut busy) = (0, 0);
    for p in posters {
        let (o, b) = p.await.expect("poster");
        ok += o;
        busy += b;
    }
    let mut listed = 0;
    for r in readers {
        listed += r.await.expect("reader");
    }
    let mut streamed = 0;
    for s in streams {
        streamed += s.await.expect("stream");
    }
    done.store(true, Ordering::Relaxed);
    let beats = liveness
        .await
        .expect("healthz and heartbeats kept answering");
    sampler.join().unwrap();
    let peak = peak.load(Ordering::Relaxed);
    println!(
        "chaos_abuse: posts ok {ok}, busy (503) {busy}; events listed {listed}; frames streamed \
         {streamed}; healthz+heartbeat rounds {beats}; VmRSS baseline {} MiB, peak {} MiB, bound {} MiB",
        baseline / MIB,
        peak / MIB,
        bound / MIB
    );
    assert!(ok > 0, "no large post got through");
    assert!(streamed > 0, "the streams replayed nothing");
    assert!(listed > 0, "the readers listed nothing");
    assert!(beats > 0);
    assert!(
        peak <= bound,
        "resident memory peaked at {} MiB, over the bound of {} MiB",
        peak / MIB,
        bound / MIB
    );
    // And the server still serves after all of it.
    let (status, _) = api.get(&format!("/sessions/{session}")).await;
    assert_eq!(status, StatusCode::OK);
}

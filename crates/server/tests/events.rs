//! Sessions come alive: posting events (§12.3), turns and the queue (§12.4, §7.3), listing the log and
//! following it live over Server-Sent Events — on every backend.

use std::time::{Duration, Instant};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use tether_testkit::{backends, each_backend, send_and_read, TestServer};

/// A guard against hangs only: every wait below normally ends in milliseconds.
const PATIENCE: Duration = Duration::from_secs(30);

fn message(text: &str) -> Value {
    json!({"type": "user.message", "content": [{"type": "text", "text": text}]})
}

fn agent_message(text: &str) -> Value {
    json!({"type": "agent.message", "content": [{"type": "text", "text": text}]})
}

fn end_turn() -> Value {
    json!({"type": "session.status_idle", "stop_reason": {"type": "end_turn"}})
}

/// A self-hosted environment, an agent, and a session on them (its first item is queued).
async fn setup(server: &TestServer) -> (String, String) {
    let (env, _agent, session) = server.environment_agent_and_session().await;
    (env, session)
}

async fn post_as(
    server: &TestServer,
    token: &str,
    session: &str,
    events: Value,
) -> (StatusCode, Value) {
    server
        .call_as(
            token,
            Method::POST,
            &format!("/sessions/{session}/events"),
            Some(json!({ "events": events })),
            &[],
        )
        .await
}

async fn post(server: &TestServer, session: &str, events: Value) -> (StatusCode, Value) {
    post_as(server, &server.admin_token, session, events).await
}

async fn post_ok(server: &TestServer, session: &str, events: Value) -> Vec<Value> {
    let (status, body) = post(server, session, events).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["data"].as_array().expect("data").clone()
}

async fn status_of(server: &TestServer, session: &str) -> String {
    let (status, s) = server.get(&format!("/sessions/{session}")).await;
    assert_eq!(status, StatusCode::OK, "{s}");
    s["status"].as_str().expect("status").to_owned()
}

/// The whole log, oldest first.
async fn log(server: &TestServer, session: &str) -> Vec<Value> {
    let pages = server
        .pages(&format!("/sessions/{session}/events?limit=100"))
        .await;
    pages
        .iter()
        .flat_map(|page| page["data"].as_array().expect("data").iter().cloned())
        .collect()
}

async fn types(server: &TestServer, session: &str) -> Vec<String> {
    log(server, session)
        .await
        .iter()
        .map(|e| e["type"].as_str().expect("type").to_owned())
        .collect()
}

async fn work_items(server: &TestServer, env: &str) -> Vec<Value> {
    let (status, body) = server.get(&format!("/environments/{env}/work")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["data"].as_array().expect("data").clone()
}

fn states(items: &[Value]) -> Vec<&str> {
    items
        .iter()
        .map(|i| i["state"].as_str().expect("state"))
        .collect()
}

/// `POST path` with `body`, which must succeed: what it created.
async fn created(server: &TestServer, path: &str, body: Value) -> Value {
    let (status, out) = server.post(path, body).await;
    assert_eq!(status, StatusCode::OK, "{path}: {out}");
    out
}

/// A new key of `env`, as its record (`id`, `token`, …).
async fn env_key_record(server: &TestServer, env: &str) -> Value {
    let path = format!("/environments/{env}/keys");
    created(server, &path, json!({"name": "worker"})).await
}

async fn env_key(server: &TestServer, env: &str) -> String {
    env_key_record(server, env).await["token"]
        .as_str()
        .expect("token")
        .to_owned()
}

/// Polls one item and returns it with the session token from its `secret` (§11.1).
async fn poll(server: &TestServer, env: &str) -> (Value, String) {
    let item = server.poll_as_worker(env, "w1", "?block_ms=500").await;
    assert!(item.is_object(), "nothing to poll: {item}");
    let secret = item["secret"].as_str().expect("secret");
    let payload: Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(secret).expect("base64url")).unwrap();
    let token = payload["sessions_token"].as_str().unwrap().to_owned();
    (item, token)
}

async fn work_call(
    server: &TestServer,
    token: &str,
    env: &str,
    work: &str,
    op: &str,
    body: Option<Value>,
) -> Value {
    let (status, out) = server
        .call_as(
            token,
            Method::POST,
            &format!("/environments/{env}/work/{work}/{op}"),
            body,
            &[],
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{op}: {out}");
    out
}

/// Poll, ack and first heartbeat: the item is `active` in the hands of a worker.
async fn take(server: &TestServer, env: &str) -> (String, String) {
    let (item, token) = poll(server, env).await;
    let work = item["id"].as_str().unwrap().to_owned();
    work_call(server, &token, env, &work, "ack", None).await;
    let beat = work_call(
        server,
        &token,
        env,
        &work,
        "heartbeat?expected_last_heartbeat=NO_HEARTBEAT",
        None,
    )
    .await;
    assert_eq!(beat["state"], "active");
    (work, token)
}

fn id_of(event: &Value) -> String {
    event["id"].as_str().expect("id").to_owned()
}

/// One Server-Sent Events frame that carried data.
#[derive(Debug, Clone)]
struct Frame {
    id: Option<String>,
    event: Option<String>,
    data: Value,
}

/// A minimal SSE reader over a streaming response.
struct Stream {
    response: reqwest::Response,
    buffer: Vec<u8>,
    comments: usize,
}

impl Stream {
    async fn open(server: &TestServer, token: &str, session: &str, last: Option<&str>) -> Stream {
        let mut request = server
            .http()
            .get(server.url(&format!("/sessions/{session}/events/stream")))
            .bearer_auth(token)
            // The Anthropic SDK asks for JSON even here: the server must not negotiate on it.
            .header("Accept", "application/json");
        if let Some(last) = last {
            request = request.header("Last-Event-ID", last);
        }
        Self::from(request.send().await.expect("stream request"))
    }

    fn from(response: reqwest::Response) -> Stream {
        assert_eq!(response.status(), StatusCode::OK);
        let kind = response.headers()["content-type"].to_str().unwrap();
        assert!(kind.starts_with("text/event-stream"), "{kind}");
        Stream {
            response,
            buffer: Vec::new(),
            comments: 0,
        }
    }

    /// The next frame with data; `None` once the server ended the stream cleanly.
    async fn next(&mut self) -> Option<Frame> {
        loop {
            if let Some(end) = self.buffer.windows(2).position(|w| w == b"\n\n") {
                let raw: Vec<u8> = self.buffer.drain(..end + 2).collect();
                let text = String::from_utf8(raw).expect("utf-8");
                let (mut id, mut event, mut data) = (None, None, Vec::new());
                for line in text.lines() {
                    if line.starts_with(':') {
                        self.comments += 1;
                    } else if let Some(v) = line.strip_prefix("id: ") {
                        id = Some(v.to_owned());
                    } else if let Some(v) = line.strip_prefix("event: ") {
                        event = Some(v.to_owned());
                    } else if let Some(v) = line.strip_prefix("data: ") {
                        data.push(v.to_owned());
                    }
                }
                if data.is_empty() {
                    continue;
                }
                let data = serde_json::from_str(&data.join("\n")).expect("data is JSON");
                return Some(Frame { id, event, data });
            }
            let chunk = tokio::time::timeout(PATIENCE, self.response.chunk())
                .await
                .expect("the stream stalled")
                .expect("the stream broke instead of ending");
            match chunk {
                Some(bytes) => self.buffer.extend_from_slice(&bytes),
                None => return None,
            }
        }
    }

    async fn next_frame(&mut self) -> Frame {
        self.next().await.expect("the stream ended early")
    }
}

// ------------------------------------------------------------------------------------------- posting

#[tokio::test]
async fn batches_are_validated_with_the_field_at_fault() {
    each_backend(async |server| {
        let (_, session) = setup(server).await;
        let text = json!([{"type": "text", "text": "x"}]);
        let cases: Vec<(Value, &str)> = vec![
            (json!({}), "events"),
            (json!({"events": []}), "events"),
            (json!({"events": "user.message"}), "events"),
            (
                json!({"events": (0..101).map(|_| agent_message("x")).collect::<Vec<_>>()}),
                "events",
            ),
            (
                json!({"events": [{"type": "user.shout"}]}),
                "events[0].type",
            ),
            (
                json!({"events": [agent_message("ok"), {"type": "session.status_running"}]}),
                "events[1].type",
            ),
            (json!({"events": [{"content": text}]}), "events[0].type"),
            (
                json!({"events": [{"type": "user.message", "content": "hi"}]}),
                "events[0].content",
            ),
            (
                json!({"events": [agent_message("ok"), {"type": "agent.message", "content": [{"type": "text"}]}]}),
                "events[1].content[0].text",
            ),
            (
                json!({"events": [{"type": "agent.tool_use", "name": "bash"}]}),
                "events[0].input",
            ),
            (
                json!({"events": [{"type": "session.status_idle", "stop_reason": {"type": "nap"}}]}),
                "events[0].stop_reason.type",
            ),
            (
                json!({"events": [{"type": "user.tool_confirmation", "tool_use_id": "evt_x", "result": "ok"}]}),
                "events[0].result",
            ),
        ];
        for (body, param) in cases {
            let (status, err) = server
                .post(&format!("/sessions/{session}/events"), body.clone())
                .await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{body} → {err}");
            assert_eq!(err["error"]["type"], "invalid_request_error");
            assert_eq!(err["error"]["param"], param, "{body} → {err}");
        }
        // Nothing of a refused batch was stored, and the session did not move.
        assert!(log(server, &session).await.is_empty());
        assert_eq!(status_of(server, &session).await, "idle");

        // Unknown session, no credential.
        let (status, _) = post(
            server,
            "sess_019f3be3fa66750bb9a1fbcde85b5fe1",
            json!([agent_message("x")]),
        )
        .await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        let response = server
            .http()
            .post(server.url(&format!("/sessions/{session}/events")))
            .json(&json!({"events": [agent_message("x")]}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        // D-32: an unknown session is a 404 even when the body is not JSON either.
        for (target, want) in [
            (
                "sess_019f3be3fa66750bb9a1fbcde85b5fe1",
                StatusCode::NOT_FOUND,
            ),
            (session.as_str(), StatusCode::BAD_REQUEST),
        ] {
            let response = server
                .http()
                .post(server.url(&format!("/sessions/{target}/events")))
                .bearer_auth(&server.admin_token)
                .body("{not json")
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), want);
        }
    })
    .await;
}

#[tokio::test]
async fn who_may_send_what() {
    each_backend(async |server| {
        let (env, session) = setup(server).await;
        let key = env_key(server, &env).await;
        let (item, token) = poll(server, &env).await;
        assert_eq!(item["data"]["id"], json!(session));

        // Worker credentials: agent-side types and tool results, nothing else user-side.
        for worker in [&key, &token] {
            for refused in [
                message("hi"),
                json!({"type": "user.interrupt"}),
                json!({"type": "user.define_outcome", "description": "x"}),
                json!({"type": "user.tool_confirmation", "tool_use_id": "evt_019f3be4fd2475d9a784bf2c739e11ff", "result": "allow"}),
            ] {
                let (status, err) = post_as(
                    server,
                    worker,
                    &session,
                    json!([agent_message("a"), refused]),
                )
                .await;
                assert_eq!(status, StatusCode::FORBIDDEN, "{err}");
                assert_eq!(err["error"]["type"], "permission_error");
                assert_eq!(err["error"]["param"], "events[1].type");
            }
        }
        let (status, sent) = post_as(
            server,
            &token,
            &session,
            json!([
                {"type": "agent.thinking", "content": "hmm"},
                {"type": "agent.tool_use", "name": "bash", "input": {"command": "ls"}},
                {"type": "agent.custom_tool_use", "name": "add", "input": {"a": 1, "b": 2}},
            ]),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{sent}");
        let data = sent["data"].as_array().unwrap();
        assert_eq!(data.len(), 3, "only the posted events are answered");
        let tool_use = id_of(&data[1]);
        let custom_tool_use = id_of(&data[2]);
        assert_eq!(data[1]["input"], json!({"command": "ls"}));
        assert!(data[1]["processed_at"].is_string());

        // Tool results name a tool call of the right kind in this session.
        let (status, sent) = post_as(
            server,
            &key,
            &session,
            json!([
                {"type": "user.tool_result", "tool_use_id": tool_use, "content": "a b"},
                {"type": "user.custom_tool_result", "custom_tool_use_id": custom_tool_use, "content": [{"type": "text", "text": "3"}], "is_error": false},
                {"type": "agent.tool_result", "tool_use_id": tool_use, "content": "ok"},
            ]),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{sent}");
        for (bad, param) in [
            (
                json!({"type": "user.tool_result", "tool_use_id": "evt_019f3be4fd2475d9a784bf2c739e11ff", "content": "x"}),
                "events[0].tool_use_id",
            ),
            (
                json!({"type": "user.tool_result", "tool_use_id": "nonsense", "content": "x"}),
                "events[0].tool_use_id",
            ),
            (
                json!({"type": "user.tool_result", "tool_use_id": custom_tool_use, "content": "x"}),
                "events[0].tool_use_id",
            ),
            (
                json!({"type": "user.custom_tool_result", "custom_tool_use_id": tool_use, "content": "x"}),
                "events[0].custom_tool_use_id",
            ),
        ] {
            let (status, err) = post_as(server, &token, &session, json!([bad])).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{err}");
            assert_eq!(err["error"]["param"], param);
        }

        // Another session's tool call does not count, and credentials stay within their session.
        let agent = server.agent().await;
        let other = server.session(&env, &agent).await;
        let (status, err) = post(
            server,
            &other,
            json!([{"type": "user.tool_result", "tool_use_id": tool_use, "content": "x"}]),
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{err}");
        let (status, _) = post_as(server, &token, &other, json!([agent_message("x")])).await;
        assert_eq!(status, StatusCode::FORBIDDEN);
        let other_env = server.self_hosted_environment().await;
        let foreign_key = env_key(server, &other_env).await;
        let (status, _) =
            post_as(server, &foreign_key, &session, json!([agent_message("x")])).await;
        assert_eq!(status, StatusCode::FORBIDDEN);

        // The admin may send every type, user side included.
        post_ok(
            server,
            &session,
            json!([
                {"type": "user.tool_confirmation", "tool_use_id": tool_use, "result": "allow"},
                {"type": "user.define_outcome", "description": "done when green"},
                agent_message("from the platform runtime"),
            ]),
        )
        .await;
        let kinds = types(server, &session).await;
        assert_eq!(
            kinds,
            [
                "agent.thinking",
                "agent.tool_use",
                "agent.custom_tool_use",
                "user.tool_result",
                "user.custom_tool_result",
                "agent.tool_result",
                "user.tool_confirmation",
                "user.define_outcome",
                "agent.message",
            ]
        );
        // Worker credentials read the log too (the SDK worker lists and streams with its session token).
        for reader in [&key, &token] {
            let (status, page) = server
                .call_as(
                    reader,
                    Method::GET,
                    &format!("/sessions/{session}/events"),
                    None,
                    &[],
                )
                .await;
            assert_eq!(status, StatusCode::OK, "{page}");
        }
    })
    .await;
}

#[tokio::test]
async fn archived_sessions_and_running_turns_refuse_with_409() {
    each_backend(async |server| {
        let (_, session) = setup(server).await;
        let sent = post_ok(server, &session, json!([message("one")])).await;
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0]["type"], "user.message");
        assert_eq!(status_of(server, &session).await, "running");
        let before = log(server, &session).await;

        let (status, err) = post(
            server,
            &session,
            json!([agent_message("a"), message("two")]),
        )
        .await;
        assert_eq!(status, StatusCode::CONFLICT, "{err}");
        assert_eq!(err["error"]["type"], "invalid_request_error");
        assert_eq!(
            log(server, &session).await,
            before,
            "a refused batch stores nothing"
        );

        // Two messages in one batch: the second meets the turn the first started.
        let agent = server.agent().await;
        let env = server.self_hosted_environment().await;
        let fresh = server.session(&env, &agent).await;
        let (status, _) = post(server, &fresh, json!([message("a"), message("b")])).await;
        assert_eq!(status, StatusCode::CONFLICT);
        assert_eq!(status_of(server, &fresh).await, "idle");

        let (status, _) = server
            .post(&format!("/sessions/{session}/archive"), json!({}))
            .await;
        assert_eq!(status, StatusCode::OK);
        for events in [json!([agent_message("late")]), json!([end_turn()])] {
            let (status, err) = post(server, &session, events).await;
            assert_eq!(status, StatusCode::CONFLICT, "{err}");
        }
    })
    .await;
}

// ------------------------------------------------------------------------------------------- listing

#[tokio::test]
async fn the_log_pages_both_ways() {
    each_backend(async |server| {
        let (_, session) = setup(server).await;
        let batch: Vec<Value> = (0..25).map(|i| agent_message(&format!("m{i}"))).collect();
        let sent = post_ok(server, &session, json!(batch)).await;
        let ids: Vec<String> = sent.iter().map(id_of).collect();
        let mut sorted = ids.clone();
        sorted.sort();
        assert_eq!(ids, sorted, "ids follow the order of the batch");

        let path = format!("/sessions/{session}/events");
        let (_, first) = server.get(&path).await;
        assert_eq!(first["data"].as_array().unwrap().len(), 20, "default limit");
        assert_eq!(first["has_more"], true);
        assert_eq!(first["first_id"], json!(ids[0]));
        assert_eq!(first["next_page"], json!(ids[19]));
        let (_, second) = server.get(&format!("{path}?page={}", ids[19])).await;
        let rest: Vec<String> = second["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(id_of)
            .collect();
        assert_eq!(rest, ids[20..]);
        assert_eq!(second["next_page"], Value::Null);

        let (_, desc) = server.get(&format!("{path}?order=desc&limit=3")).await;
        let got: Vec<String> = desc["data"].as_array().unwrap().iter().map(id_of).collect();
        assert_eq!(got, [ids[24].clone(), ids[23].clone(), ids[22].clone()]);
        let (_, after) = server
            .get(&format!("{path}?after_id={}&limit=2", ids[5]))
            .await;
        let got: Vec<String> = after["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(id_of)
            .collect();
        assert_eq!(got, ids[6..8]);
        let (_, before) = server
            .get(&format!("{path}?before_id={}&limit=2", ids[5]))
            .await;
        let got: Vec<String> = before["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(id_of)
            .collect();
        assert_eq!(got, ids[3..5]);
        // It says what follows it in list order (§1.8): the cursor's own event, also when nothing
        // precedes it.
        assert_eq!(before["has_more"], true);
        assert_eq!(before["next_page"], json!(ids[4]));
        let (_, first) = server
            .get(&format!("{path}?before_id={}&limit=5", ids[2]))
            .await;
        assert_eq!(first["data"].as_array().unwrap().len(), 2);
        assert_eq!(first["has_more"], true);
        assert_eq!(first["next_page"], json!(ids[1]));

        for (query, param) in [
            ("limit=0", "limit"),
            ("limit=101", "limit"),
            ("order=sideways", "order"),
            ("after_id=work_019f3be4fd2475d9a784bf2c739e1194", "after_id"),
        ] {
            let (status, err) = server.get(&format!("{path}?{query}")).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{query}");
            assert_eq!(err["error"]["param"], param);
        }
        let (status, _) = server
            .get(&format!("{path}?after_id={}&before_id={}", ids[1], ids[2]))
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        // The Anthropic worker reconciles with limit=1000 on /v1.
        let response = server
            .http()
            .get(server.v1(&format!("{path}?limit=1000")))
            .bearer_auth(&server.admin_token)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let (status, _) = server
            .get("/sessions/sess_019f3be3fa66750bb9a1fbcde85b5fe1/events")
            .await;
        assert_eq!(status, StatusCode::NOT_FOUND);
    })
    .await;
}

// ------------------------------------------------------------------------------------------- streams

#[tokio::test]
async fn a_stream_resumes_without_losing_or_repeating() {
    each_backend(async |server| {
        let (_, session) = setup(server).await;
        let early = post_ok(
            server,
            &session,
            json!([agent_message("before the stream")]),
        )
        .await;

        // Without Last-Event-ID the stream starts with what is written after it opened.
        let mut stream = Stream::open(server, &server.admin_token, &session, None).await;
        let mut sent: Vec<String> = Vec::new();
        for round in 0..3 {
            let batch: Vec<Value> = (0..4)
                .map(|i| agent_message(&format!("{round}.{i}")))
                .collect();
            sent.extend(
                post_ok(server, &session, json!(batch))
                    .await
                    .iter()
                    .map(id_of),
            );
        }
        let mut seen: Vec<String> = Vec::new();
        for _ in 0..5 {
            let frame = stream.next_frame().await;
            assert_eq!(frame.event.as_deref(), Some("agent.message"));
            assert_eq!(frame.data["type"], "agent.message");
            assert_eq!(frame.id.as_deref(), frame.data["id"].as_str());
            seen.push(frame.id.unwrap());
        }
        assert_ne!(seen[0], id_of(&early[0]), "history was not replayed");
        // Disconnect mid-stream; more is written while nobody listens.
        drop(stream);
        sent.extend(
            post_ok(
                server,
                &session,
                json!([agent_message("while away"), agent_message("again")]),
            )
            .await
            .iter()
            .map(id_of),
        );
        let last = seen.last().unwrap().clone();
        let mut resumed = Stream::open(server, &server.admin_token, &session, Some(&last)).await;
        while seen.len() < sent.len() {
            seen.push(resumed.next_frame().await.id.unwrap());
        }
        // And it follows live after the replay.
        sent.extend(
            post_ok(server, &session, json!([agent_message("live")]))
                .await
                .iter()
                .map(id_of),
        );
        seen.push(resumed.next_frame().await.id.unwrap());
        assert_eq!(seen, sent, "every event exactly once, in order");
        drop(resumed);

        // `last_event_id` in the query works as well (for clients that cannot set headers).
        let response = server
            .http()
            .get(server.url(&format!(
                "/sessions/{session}/events/stream?last_event_id={}",
                id_of(&early[0])
            )))
            .bearer_auth(&server.admin_token)
            .send()
            .await
            .unwrap();
        let mut by_query = Stream::from(response);
        assert_eq!(by_query.next_frame().await.id.as_ref(), Some(&sent[0]));
        drop(by_query);

        let response = server
            .http()
            .get(server.url(&format!("/sessions/{session}/events/stream")))
            .bearer_auth(&server.admin_token)
            .header("Last-Event-ID", "evt_nope")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    })
    .await;
}

#[tokio::test]
async fn a_stream_ends_when_its_session_is_deleted() {
    each_backend(async |server| {
        let (_, session) = setup(server).await;
        let mut stream = Stream::open(server, &server.admin_token, &session, None).await;
        post_ok(server, &session, json!([agent_message("hi")])).await;
        assert_eq!(stream.next_frame().await.data["type"], "agent.message");
        let (status, _) = server
            .call(Method::DELETE, &format!("/sessions/{session}"), None)
            .await;
        assert_eq!(status, StatusCode::OK);
        let last = stream.next_frame().await;
        assert_eq!(last.event.as_deref(), Some("session.deleted"));
        assert!(
            stream.next().await.is_none(),
            "the stream ends after session.deleted"
        );
        let response = server
            .http()
            .get(server.url(&format!("/sessions/{session}/events/stream")))
            .bearer_auth(&server.admin_token)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
    })
    .await;
}

/// A deleted session's events beyond the first batch are deleted afterwards, a batch per commit, by
/// the server's own background service (`event_purge`): none is left a moment later.
#[tokio::test]
async fn a_deleted_sessions_events_are_purged_after_its_delete() {
    each_backend(async |server| {
        let (_, session) = setup(server).await;
        let batch = tether_core::events::MAX_EVENTS_PER_BATCH;
        // Past two batches: the delete takes the first, and each of the purge's takes one more.
        let posts = 2 * (tether_store::sql::EVENT_PURGE_BATCH as usize) / batch + 3;
        for _ in 0..posts {
            let events: Vec<Value> = (0..batch).map(|_| agent_message("x")).collect();
            post_ok(server, &session, Value::Array(events)).await;
        }
        let (status, _) = server
            .call(Method::DELETE, &format!("/sessions/{session}"), None)
            .await;
        assert_eq!(status, StatusCode::OK);
        // None is read from the moment of the delete (`GET …/events` answers 404 besides).
        let first = tether_store::PageRequest::first(10_000);
        let page = server.app.store.list_events(&session, &first, usize::MAX);
        assert!(page.await.unwrap().items.is_empty());
        // A purge of no events says whether any deleted session still has some.
        let left = || async { server.app.store.purge_deleted_events(0).await.unwrap() };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while left().await {
            assert!(
                std::time::Instant::now() < deadline,
                "events left after 30 s"
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    })
    .await;
}

/// An open stream answers to its caller's credential as a new request does (§11.1): once the key
/// or admin token is revoked, or the session token dies with its item, the stream ends, and a client
/// that reconnects gets the 401.
#[tokio::test]
async fn a_stream_ends_when_its_credential_is_revoked_or_its_session_token_dies() {
    each_backend(async |server| {
        let (env, session) = setup(server).await;
        let key = env_key_record(server, &env).await;
        let admin = created(server, "/tokens", json!({"name": "spare"})).await;
        let (work, session_token) = take(server, &env).await;
        let secret = |v: &Value| v["token"].as_str().unwrap().to_owned();
        let mut streams = vec![
            (
                "environment key",
                Stream::open(server, &secret(&key), &session, None).await,
            ),
            (
                "admin token",
                Stream::open(server, &secret(&admin), &session, None).await,
            ),
            (
                "session token",
                Stream::open(server, &session_token, &session, None).await,
            ),
        ];
        let mut unrevoked = Stream::open(server, &server.admin_token, &session, None).await;

        for (method, path, body) in [
            (
                Method::DELETE,
                format!("/environments/{env}/keys/{}", key["id"].as_str().unwrap()),
                None,
            ),
            (
                Method::DELETE,
                format!("/tokens/{}", admin["id"].as_str().unwrap()),
                None,
            ),
            (
                Method::POST,
                format!("/environments/{env}/work/{work}/stop"),
                Some(json!({"force": true})),
            ),
        ] {
            let (status, out) = server.call(method, &path, body).await;
            assert_eq!(status, StatusCode::OK, "{path}: {out}");
        }
        // Posted at once: no stream of a dead credential hands it out, though its periodic check
        // may not have come yet.
        post_ok(server, &session, json!([agent_message("still here")])).await;
        for (who, stream) in &mut streams {
            let ended = tokio::time::timeout(Duration::from_secs(10), async {
                while let Some(frame) = stream.next().await {
                    assert_ne!(
                        frame.data["content"][0]["text"], "still here",
                        "the stream of a dead {who} handed out what came after"
                    );
                }
            })
            .await;
            assert!(ended.is_ok(), "the stream of a dead {who} ended");
        }
        loop {
            let frame = unrevoked.next_frame().await;
            if frame.data["type"] == "agent.message" {
                assert_eq!(frame.data["content"][0]["text"], "still here");
                break;
            }
        }

        // A later delivery of the item mints a new token, and the old one dies (D-27), though the
        // item lives on.
        let agent = server.agent().await;
        let other = server.session(&env, &agent).await;
        let (first, first_token) = poll(server, &env).await;
        let mut by_first = Stream::open(server, &first_token, &other, None).await;
        let again = server
            .poll_as_worker(&env, "w2", "?block_ms=500&reclaim_older_than_ms=0")
            .await;
        assert_eq!(again["id"], first["id"], "handed out again");
        let ended = tokio::time::timeout(Duration::from_secs(10), async {
            while by_first.next().await.is_some() {}
        })
        .await;
        assert!(
            ended.is_ok(),
            "the stream of a token whose item was handed out again ended"
        );
    })
    .await;
}

#[tokio::test]
async fn streams_end_at_shutdown() {
    for backend in backends() {
        let server = TestServer::start(&backend).await;
        let (_, session) = setup(&server).await;
        let mut stream = Stream::open(&server, &server.admin_token, &session, None).await;
        let reader = tokio::spawn(async move { stream.next().await.is_none() });
        server.shutdown().await;
        assert!(
            reader.await.unwrap(),
            "the stream ended cleanly, with no frame"
        );
    }
}

#[tokio::test]
async fn streams_are_scoped_like_the_session() {
    each_backend(async |server| {
        let (env, session) = setup(server).await;
        let (_, token) = poll(server, &env).await;
        let agent = server.agent().await;
        let other = server.session(&env, &agent).await;
        let url = |s: &str| server.url(&format!("/sessions/{s}/events/stream"));
        let response = server
            .http()
            .get(url(&other))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::FORBIDDEN);
        // The session token of the session's live item reads its stream.
        let mut stream = Stream::from(
            server
                .http()
                .get(url(&session))
                .bearer_auth(&token)
                .send()
                .await
                .unwrap(),
        );
        post_as(
            server,
            &token,
            &session,
            json!([agent_message("from the worker")]),
        )
        .await;
        let frame = stream.next_frame().await;
        assert_eq!(frame.data["content"][0]["text"], "from the worker");
    })
    .await;
}

#[tokio::test]
async fn two_hundred_streams_all_see_one_event() {
    each_backend(async |server| {
        let (_, session) = setup(server).await;
        const STREAMS: usize = 200;
        let mut streams = Vec::with_capacity(STREAMS);
        for _ in 0..STREAMS {
            streams.push(Stream::open(server, &server.admin_token, &session, None).await);
        }
        let started = Instant::now();
        let sent = post_ok(server, &session, json!([agent_message("to everyone")])).await;
        let want = id_of(&sent[0]);
        let readers: Vec<_> = streams
            .into_iter()
            .map(|mut s| tokio::spawn(async move { s.next_frame().await.id }))
            .collect();
        for reader in readers {
            assert_eq!(reader.await.unwrap().as_deref(), Some(want.as_str()));
        }
        println!(
            "{}: {STREAMS} streams received one posted event within {:?} of the post",
            server.backend.name(),
            started.elapsed()
        );
    })
    .await;
}

#[tokio::test]
async fn an_idle_stream_gets_keep_alive_comments() {
    each_backend(async |server| {
        let (_, session) = setup(server).await;
        let mut stream = Stream::open(server, &server.admin_token, &session, None).await;
        // The first keep-alive comes after 15 s of silence; the event after it proves the stream lived on.
        let poster = {
            let base = server.url(&format!("/sessions/{session}/events"));
            let token = server.admin_token.clone();
            let http = server.http().clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_secs(16)).await;
                http.post(base)
                    .bearer_auth(token)
                    .json(&json!({"events": [agent_message("still there?")]}))
                    .send()
                    .await
                    .unwrap()
                    .status()
            })
        };
        let frame = stream.next_frame().await;
        assert_eq!(poster.await.unwrap(), StatusCode::OK);
        assert_eq!(frame.data["content"][0]["text"], "still there?");
        assert!(
            stream.comments >= 1,
            "a `:` comment kept the idle stream alive"
        );
    })
    .await;
}

// ------------------------------------------------------------------------------------------- turns

#[tokio::test]
async fn a_turn_runs_through_the_work_api() {
    each_backend(async |server| {
        let (env, session) = setup(server).await;
        let mut watcher = Stream::open(server, &server.admin_token, &session, None).await;

        // A user message starts a turn; the session's queued item will serve it (nothing new enqueued).
        post_ok(server, &session, json!([message("hello")])).await;
        assert_eq!(status_of(server, &session).await, "running");
        assert_eq!(
            types(server, &session).await,
            ["user.message", "session.status_running"]
        );
        assert_eq!(states(&work_items(server, &env).await), ["queued"]);

        // A worker takes the item and answers with its session token.
        let (work, token) = take(server, &env).await;
        let (status, _) = post_as(
            server,
            &token,
            &session,
            json!([agent_message("hi, human"), end_turn()]),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(status_of(server, &session).await, "idle");
        let seen: Vec<String> = [
            watcher.next_frame().await,
            watcher.next_frame().await,
            watcher.next_frame().await,
            watcher.next_frame().await,
        ]
        .iter()
        .map(|f| f.event.clone().unwrap())
        .collect();
        assert_eq!(
            seen,
            [
                "user.message",
                "session.status_running",
                "agent.message",
                "session.status_idle"
            ]
        );

        // The next message reaches the same live item: no new work.
        post_ok(server, &session, json!([message("again")])).await;
        assert_eq!(status_of(server, &session).await, "running");
        assert_eq!(states(&work_items(server, &env).await), ["active"]);
        post_as(server, &token, &session, json!([end_turn()])).await;
        assert_eq!(status_of(server, &session).await, "idle");

        // The worker stops its item after the turn: the idle session is left alone.
        work_call(
            server,
            &token,
            &env,
            &work,
            "stop",
            Some(json!({"force": true})),
        )
        .await;
        assert_eq!(status_of(server, &session).await, "idle");
        assert!(!types(server, &session)
            .await
            .contains(&"session.error".to_owned()));

        // A dormant session gets a fresh item with its next message (D-12b).
        post_ok(server, &session, json!([message("wake up")])).await;
        let items = work_items(server, &env).await;
        assert_eq!(states(&items), ["stopped", "queued"]);
        assert_ne!(items[1]["id"], json!(work));
    })
    .await;
}

#[tokio::test]
async fn a_lost_lease_reschedules_the_turn_until_the_next_ack() {
    each_backend(async |server| {
        let (env, session) = setup(server).await;
        post_ok(server, &session, json!([message("work")])).await;
        let (work, _) = take(server, &env).await;

        server.clock.advance_millis(61_000);
        // Any touch settles the expired lease (§5.4, lazily) — no need to wait for the dispatcher.
        let (status, item) = server
            .get(&format!("/environments/{env}/work/{work}"))
            .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(item["state"], "queued");
        assert_eq!(status_of(server, &session).await, "rescheduling");
        assert_eq!(
            types(server, &session).await.last().map(String::as_str),
            Some("session.status_rescheduled")
        );
        // A user message still waits for the turn to end.
        let (status, _) = post(server, &session, json!([message("hurry")])).await;
        assert_eq!(status, StatusCode::CONFLICT);

        let (again, token) = poll(server, &env).await;
        assert_eq!(again["id"], json!(work), "the same item comes back (D-33)");
        work_call(server, &token, &env, &work, "ack", None).await;
        assert_eq!(status_of(server, &session).await, "running");
        assert_eq!(
            types(server, &session).await,
            [
                "user.message",
                "session.status_running",
                "session.status_rescheduled",
                "session.status_running"
            ]
        );
    })
    .await;
}

#[tokio::test]
async fn an_item_stopped_mid_turn_ends_the_turn_with_an_error() {
    each_backend(async |server| {
        let (env, session) = setup(server).await;
        post_ok(server, &session, json!([message("work")])).await;
        let (work, _) = take(server, &env).await;
        let stopped = work_call(
            server,
            &server.admin_token,
            &env,
            &work,
            "stop",
            Some(json!({"force": true})),
        )
        .await;
        assert_eq!(stopped["state"], "stopped");
        assert_eq!(status_of(server, &session).await, "idle");
        let events = log(server, &session).await;
        let error = events
            .iter()
            .find(|e| e["type"] == "session.error")
            .expect("session.error");
        assert!(error["error"]["message"].is_string(), "{error}");
        assert_eq!(events.last().unwrap()["type"], "session.status_idle");
        // The session takes input again, on a fresh item.
        post_ok(server, &session, json!([message("retry")])).await;
        assert_eq!(
            states(&work_items(server, &env).await),
            ["stopped", "queued"]
        );
    })
    .await;
}

/// A worker whose program ended well stops its item `unless_turn_open` (Tether extension): input
/// that came while the program was ending leaves the turn open, and the stop is refused, changing
/// nothing, with how far the session had got; once the turn is ended, the stop goes through and no
/// turn fails.
#[tokio::test]
async fn a_stop_unless_turn_open_leaves_an_open_turn_to_the_program() {
    each_backend(async |server| {
        let (env, session) = setup(server).await;
        let (work, token) = take(server, &env).await;
        post_ok(
            server,
            &session,
            json!([message("came while it was ending")]),
        )
        .await;
        let path = format!("/environments/{env}/work/{work}/stop");
        let unless = json!({"force": true, "unless_turn_open": true});
        let (status, refused) = server
            .call_as(&token, Method::POST, &path, Some(unless.clone()), &[])
            .await;
        assert_eq!(status, StatusCode::CONFLICT, "{refused}");
        assert_eq!(refused["error"]["code"], "turn_open", "{refused}");
        let (_, record) = server.get(&format!("/sessions/{session}")).await;
        assert_eq!(
            refused["error"]["details"]["session_updated_at"], record["updated_at"],
            "{refused}"
        );
        // The session's first turn: one started by input.
        assert_eq!(refused["error"]["details"]["turn"], 1, "{refused}");
        assert_eq!(states(&work_items(server, &env).await), ["active"]);
        assert_eq!(status_of(server, &session).await, "running");

        // The program, run again, answers and ends the turn; another message comes as it ends:
        // another turn, which the refusal names.
        let answer = || json!([agent_message("done"), end_turn()]);
        post_as(server, &token, &session, answer()).await;
        post_ok(server, &session, json!([message("and another")])).await;
        let (status, refused) = server
            .call_as(&token, Method::POST, &path, Some(unless.clone()), &[])
            .await;
        assert_eq!(status, StatusCode::CONFLICT, "{refused}");
        assert_eq!(refused["error"]["details"]["turn"], 2, "{refused}");
        // Run again for it, it ends that one too: the stop goes through.
        post_as(server, &token, &session, answer()).await;
        let stopped = work_call(server, &token, &env, &work, "stop", Some(unless)).await;
        assert_eq!(stopped["state"], "stopped");
        assert_eq!(status_of(server, &session).await, "idle");
        assert!(!types(server, &session)
            .await
            .contains(&"session.error".to_owned()));

        // Not a boolean: named.
        let (status, refused) = server
            .post(&path, json!({"force": true, "unless_turn_open": "yes"}))
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{refused}");
        assert_eq!(refused["error"]["param"], "unless_turn_open", "{refused}");
    })
    .await;
}

#[tokio::test]
async fn input_while_the_item_is_stopping_waits_for_a_fresh_item() {
    each_backend(async |server| {
        let (env, session) = setup(server).await;
        let (work, token) = take(server, &env).await;
        // The operator asks the worker to wind down.
        let stopping = work_call(server, &server.admin_token, &env, &work, "stop", None).await;
        assert_eq!(stopping["state"], "stopping");

        post_ok(server, &session, json!([message("one more thing")])).await;
        assert_eq!(status_of(server, &session).await, "running");
        assert_eq!(
            states(&work_items(server, &env).await),
            ["stopping"],
            "buffered (D-34)"
        );

        // The worker confirms the stop: a fresh item serves the waiting input, and the turn goes on.
        let stopped = work_call(server, &token, &env, &work, "stop", None).await;
        assert_eq!(stopped["state"], "stopped");
        let items = work_items(server, &env).await;
        assert_eq!(states(&items), ["stopped", "queued"]);
        assert_eq!(items[1]["data"]["id"], json!(session));
        assert_eq!(status_of(server, &session).await, "running");
        assert!(!types(server, &session)
            .await
            .contains(&"session.error".to_owned()));

        let (fresh, fresh_token) = take(server, &env).await;
        assert_eq!(json!(fresh), items[1]["id"]);
        post_as(
            server,
            &fresh_token,
            &session,
            json!([agent_message("done"), end_turn()]),
        )
        .await;
        assert_eq!(status_of(server, &session).await, "idle");
    })
    .await;
}

#[tokio::test]
async fn initial_events_start_the_first_turn_at_once() {
    each_backend(async |server| {
        let (env, agent) = server.environment_and_agent().await;
        let (status, created) = server
            .post(
                "/sessions",
                json!({"agent": agent, "environment_id": env, "initial_events": [message("go")]}),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{created}");
        assert_eq!(created["status"], "running");
        let session = created["id"].as_str().unwrap().to_owned();
        assert_eq!(
            types(server, &session).await,
            ["user.message", "session.status_running"]
        );
        assert_eq!(
            states(&work_items(server, &env).await),
            ["queued"],
            "one item, not two"
        );

        // The same checks as a posted batch; a refused one creates nothing.
        for (initial, status_want, param) in [
            (
                json!([{"type": "user.message"}]),
                StatusCode::BAD_REQUEST,
                "initial_events[0].content",
            ),
            (json!("go"), StatusCode::BAD_REQUEST, "initial_events"),
            (
                json!([{"type": "user.tool_result", "tool_use_id": "evt_019f3be4fd2475d9a784bf2c739e11ff", "content": "x"}]),
                StatusCode::BAD_REQUEST,
                "initial_events[0].tool_use_id",
            ),
            (
                json!([message("a"), message("b")]),
                StatusCode::CONFLICT,
                "",
            ),
        ] {
            let (status, err) = server
                .post(
                    "/sessions",
                    json!({"agent": agent, "environment_id": env, "initial_events": initial}),
                )
                .await;
            assert_eq!(status, status_want, "{err}");
            if !param.is_empty() {
                assert_eq!(err["error"]["param"], param);
            }
        }
        let (_, sessions) = server.get(&format!("/sessions?agent_id={agent}")).await;
        assert_eq!(sessions["data"].as_array().unwrap().len(), 1);
        assert_eq!(work_items(server, &env).await.len(), 1);

        // An empty list is no input at all.
        let (status, quiet) = server
            .post(
                "/sessions",
                json!({"agent": agent, "environment_id": env, "initial_events": []}),
            )
            .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(quiet["status"], "idle");
    })
    .await;
}

#[tokio::test]
async fn cancel_interrupts_a_running_turn() {
    each_backend(async |server| {
        let (env, session) = setup(server).await;
        let path = format!("/sessions/{session}/cancel");

        let (status, idle) = server.post(&path, json!({})).await;
        assert_eq!(status, StatusCode::OK, "a no-op while idle");
        assert_eq!(
            (
                idle["id"].as_str(),
                idle["type"].as_str(),
                idle["status"].as_str()
            ),
            (Some(session.as_str()), Some("session"), Some("idle"))
        );
        assert!(log(server, &session).await.is_empty());

        post_ok(server, &session, json!([message("long job")])).await;
        let (work, token) = take(server, &env).await;
        let mut watcher = Stream::open(server, &token, &session, None).await;
        // Bodiless, as the Anthropic SDK sends it.
        let (status, canceling) = send_and_read(
            server
                .http()
                .post(server.url(&path))
                .bearer_auth(&server.admin_token)
                .header("content-type", "application/json"),
        )
        .await;
        assert_eq!(status, StatusCode::ACCEPTED, "{canceling}");
        assert_eq!(
            canceling,
            json!({"id": session, "type": "session", "status": "canceling"})
        );
        assert_eq!(
            watcher.next_frame().await.event.as_deref(),
            Some("user.interrupt")
        );
        assert_eq!(
            status_of(server, &session).await,
            "running",
            "until the worker ends the turn"
        );

        // Workers may not cancel; the worker ends the interrupted turn itself.
        let (status, _) = server.call_as(&token, Method::POST, &path, None, &[]).await;
        assert_eq!(status, StatusCode::FORBIDDEN);
        post_as(
            server,
            &token,
            &session,
            json!([{"type": "session.status_idle", "stop_reason": {"type": "end_turn"}}]),
        )
        .await;
        assert_eq!(status_of(server, &session).await, "idle");
        assert_eq!(
            types(server, &session).await,
            [
                "user.message",
                "session.status_running",
                "user.interrupt",
                "session.status_idle"
            ]
        );
        let _ = work;
    })
    .await;
}

#[tokio::test]
async fn cancel_ends_a_turn_no_worker_has_started() {
    each_backend(async |server| {
        let (env, session) = setup(server).await;
        let path = format!("/sessions/{session}/cancel");
        // Queued and never polled; then one polled but not acked: no program runs either way.
        for delivered in [false, true] {
            post_ok(server, &session, json!([message("anyone?")])).await;
            let delivery = if delivered {
                Some(poll(server, &env).await)
            } else {
                None
            };
            let (status, canceling) = server.post(&path, json!({})).await;
            assert_eq!(status, StatusCode::ACCEPTED, "{canceling}");
            assert_eq!(canceling["status"], "canceling");
            assert_eq!(status_of(server, &session).await, "idle", "{delivered}");
            let events = log(server, &session).await;
            let last: Vec<&Value> = events.iter().rev().take(2).collect();
            assert_eq!(last[1]["type"], "user.interrupt");
            assert_eq!(last[0]["type"], "session.status_idle");
            assert_eq!(
                last[0]["stop_reason"],
                json!({"type": "end_turn"}),
                "cancelled as asked, not failed"
            );
            assert!(
                !events.iter().any(|e| e["type"] == "session.error"),
                "{events:?}"
            );
            let items = work_items(server, &env).await;
            assert!(states(&items).iter().all(|s| *s == "stopped"), "{items:?}");
            let work = items[0]["id"].as_str().unwrap();
            let (status, history) = server
                .get(&format!("/environments/{env}/work/{work}/history"))
                .await;
            assert_eq!(status, StatusCode::OK);
            assert_eq!(
                history["data"].as_array().unwrap().last().unwrap()["cause"],
                "session_interrupted"
            );
            if let Some((item, token)) = delivery {
                // The worker that polled it may no longer start it: its session token died with
                // the stop (401), and with its environment key the item is stopped (409).
                let ack = format!(
                    "/environments/{env}/work/{}/ack",
                    item["id"].as_str().unwrap()
                );
                let key = env_key(server, &env).await;
                for (credential, refused) in [
                    (&token, StatusCode::UNAUTHORIZED),
                    (&key, StatusCode::CONFLICT),
                ] {
                    let (status, body) = server
                        .call_as(credential, Method::POST, &ack, None, &[])
                        .await;
                    assert_eq!(status, refused, "{body}");
                }
            }
        }
        // The session takes input again, and the fresh turn runs on a fresh item.
        post_ok(server, &session, json!([message("now")])).await;
        assert_eq!(status_of(server, &session).await, "running");
        let (_, _) = take(server, &env).await;
    })
    .await;
}

/// A `cloud` environment is stored but runs nothing (§0): a message starts a turn there that no
/// item serves and no worker could end. Its cancel ends it, as it ends a turn no worker started.
#[tokio::test]
async fn cancel_ends_a_turn_that_no_item_serves() {
    each_backend(async |server| {
        let (status, env) = server
            .post(
                "/environments",
                json!({"name": "managed", "config": {"type": "cloud"}}),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{env}");
        let env = env["id"].as_str().unwrap().to_owned();
        let agent = server.agent().await;
        let session = server.session(&env, &agent).await;
        for turn in ["first", "second"] {
            post_ok(server, &session, json!([message(turn)])).await;
            assert_eq!(status_of(server, &session).await, "running", "{turn}");
            let (status, canceling) = server
                .post(&format!("/sessions/{session}/cancel"), json!({}))
                .await;
            assert_eq!(status, StatusCode::ACCEPTED, "{canceling}");
            assert_eq!(status_of(server, &session).await, "idle", "{turn}");
            let events = log(server, &session).await;
            let last: Vec<&Value> = events.iter().rev().take(2).collect();
            assert_eq!(last[1]["type"], "user.interrupt", "{turn}");
            assert_eq!(last[0]["type"], "session.status_idle", "{turn}");
            assert_eq!(last[0]["stop_reason"], json!({"type": "end_turn"}));
        }
        // Nothing was ever queued for it.
        let (status, items) = server.get(&format!("/environments/{env}/work")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "not a queue: {items}");
    })
    .await;
}

#[tokio::test]
async fn a_defined_outcome_wakes_a_dormant_session_without_a_turn() {
    each_backend(async |server| {
        let (env, session) = setup(server).await;
        let (work, token) = take(server, &env).await;
        work_call(
            server,
            &token,
            &env,
            &work,
            "stop",
            Some(json!({"force": true})),
        )
        .await;
        post_ok(
            server,
            &session,
            json!([{"type": "user.define_outcome", "description": "tests pass"}]),
        )
        .await;
        assert_eq!(
            states(&work_items(server, &env).await),
            ["stopped", "queued"]
        );
        assert_eq!(status_of(server, &session).await, "idle");
    })
    .await;
}

#[tokio::test]
async fn racing_messages_start_one_turn_and_one_item() {
    each_backend(async |server| {
        let (env, session) = setup(server).await;
        let (work, token) = take(server, &env).await;
        work_call(
            server,
            &token,
            &env,
            &work,
            "stop",
            Some(json!({"force": true})),
        )
        .await;
        // Eight clients send a message to the dormant session at once: one wins, the rest get 409.
        let mut racers = Vec::new();
        for i in 0..8 {
            let http = server.http().clone();
            let url = server.url(&format!("/sessions/{session}/events"));
            let token = server.admin_token.clone();
            racers.push(tokio::spawn(async move {
                http.post(url)
                    .bearer_auth(token)
                    .json(&json!({"events": [message(&format!("racer {i}"))]}))
                    .send()
                    .await
                    .unwrap()
                    .status()
            }));
        }
        let mut won = 0;
        for racer in racers {
            match racer.await.unwrap() {
                StatusCode::OK => won += 1,
                StatusCode::CONFLICT => {}
                other => panic!("unexpected {other}"),
            }
        }
        assert_eq!(won, 1);
        assert_eq!(
            states(&work_items(server, &env).await),
            ["stopped", "queued"]
        );
        assert_eq!(
            types(server, &session).await,
            ["user.message", "session.status_running"]
        );
    })
    .await;
}

#[tokio::test]
async fn a_stream_wakes_for_events_written_by_another_server_process() {
    for backend in backends() {
        // An embedded SQLite store belongs to one process; only a shared database has neighbours.
        if backend == tether_testkit::Backend::Sqlite {
            continue;
        }
        let first = TestServer::start(&backend).await;
        let second = TestServer::start_on(
            &backend,
            first.location.clone(),
            Default::default(),
            first.clock.clone(),
        )
        .await;
        let (_, session) = setup(&first).await;
        let mut stream = Stream::open(&first, &first.admin_token, &session, None).await;
        // The second process's own admin token, on the same database.
        let sent = post_as(
            &second,
            &second.admin_token,
            &session,
            json!([agent_message("hi")]),
        )
        .await;
        assert_eq!(sent.0, StatusCode::OK, "{}", sent.1);
        let frame = stream.next_frame().await;
        assert_eq!(frame.id.as_deref(), sent.1["data"][0]["id"].as_str());
        second.shutdown().await;
        first.shutdown().await;
    }
}

/// Many clients posting to one session at once all get their events in: none is answered 503 for
/// losing races to the others (they take turns), and each client's events are in the log in the order
/// it posted them. 64 writers is twice the number of attempts a lost race allows.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_writers_of_one_session_all_get_their_events_in() {
    const WRITERS: usize = 64;
    const POSTS: usize = 4;
    each_backend(async |server| {
        let (_env, session) = setup(server).await;
        let writers = (0..WRITERS).map(|w| {
            let session = session.clone();
            async move {
                for p in 0..POSTS {
                    let (status, body) = post(
                        server,
                        &session,
                        json!([agent_message(&format!("writer {w} post {p}"))]),
                    )
                    .await;
                    assert_eq!(status, StatusCode::OK, "writer {w} post {p}: {body}");
                }
            }
        });
        futures::future::join_all(writers).await;
        let texts: Vec<String> = log(server, &session)
            .await
            .iter()
            .filter(|e| e["type"] == "agent.message")
            .map(|e| e["content"][0]["text"].as_str().expect("text").to_owned())
            .collect();
        assert_eq!(texts.len(), WRITERS * POSTS, "{texts:?}");
        for w in 0..WRITERS {
            let own: Vec<&String> = texts
                .iter()
                .filter(|t| t.starts_with(&format!("writer {w} post ")))
                .collect();
            let expected: Vec<String> =
                (0..POSTS).map(|p| format!("writer {w} post {p}")).collect();
            assert_eq!(own, expected.iter().collect::<Vec<_>>(), "writer {w}");
        }
    })
    .await;
}

/// A live stream reads the log only when hyper asks its body for more. A client that stops taking
/// (an HTTP/2 window it keeps shut) can leave a body asked once and never again, caught in the
/// middle of a read; that read must not keep one of the store's few pooled connections for as long
/// as the client likes. More stalled streams than the pool has connections, each caught in a read,
/// and the store still answers everyone else at once.
#[tokio::test]
async fn streams_caught_in_a_read_and_never_asked_again_hold_no_store_connection() {
    use std::future::Future as _;
    use std::task::Context;
    for backend in backends() {
        let server = TestServer::start(&backend).await;
        let (_env, session) = setup(&server).await;
        post_ok(&server, &session, json!([message("hello")])).await;
        let app = &server.app;
        let mut stalled = Vec::new();
        for i in 0..20 {
            // Each its own caller, so that each gets its page's memory at once.
            let caller = tether_server::service::tokens::Principal::Admin {
                credential_id: format!("tok_stalled{i}"),
            };
            let share = app.page_memory.share_for(Some(&caller));
            let (_, tail) = app
                .tail_events(&session, None, share, caller.clone())
                .await
                .expect("a tail");
            let mut next = Box::pin(async move {
                let mut tail = tail;
                tail.next().await
            });
            // Asked once: it starts reading the log, and is never asked again.
            let waker = futures::task::noop_waker();
            if next
                .as_mut()
                .poll(&mut Context::from_waker(&waker))
                .is_pending()
            {
                stalled.push(next);
            }
        }
        // Before, this read waited for the pool's 10 s and failed: every connection was held.
        let read = tokio::time::timeout(PATIENCE, app.store.get_session(&session)).await;
        let read = read.expect("the store answers");
        assert!(
            read.as_ref().is_ok_and(|s| s.is_some()),
            "{backend:?}: with {} streams stalled in a read, another read got {read:?}",
            stalled.len()
        );
        drop(stalled);
    }
}

/// The keys and session tokens of one environment hold at most `--max-streams-per-environment`
/// event streams at once, together: one more is a 429 in the envelope with `retry-after`, a stream
/// that ends gives its place back, and an admin token's streams and another environment's are not
/// counted.
#[tokio::test]
async fn an_environments_event_streams_are_capped() {
    const CAP: usize = 3;
    let mut options = tether_testkit::Options::default();
    options.config.max_streams_per_environment = CAP;
    tether_testkit::each_backend_with(options, async |server| {
        let (env, session) = setup(server).await;
        let key = env_key_record(server, &env).await;
        let key = key["token"].as_str().unwrap().to_owned();
        let refused = async || {
            server
                .http()
                .get(server.url(&format!("/sessions/{session}/events/stream")))
                .bearer_auth(&key)
                .send()
                .await
                .expect("stream request")
        };
        // The item's session token counts with the key: one environment, one count.
        let (_work, session_token) = take(server, &env).await;
        let mut open = vec![Stream::open(server, &session_token, &session, None).await];
        for _ in 1..CAP {
            open.push(Stream::open(server, &key, &session, None).await);
        }
        let response = refused().await;
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(response.headers()["retry-after"], "1", "SPEC §1.10");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["error"]["type"], "rate_limit_error", "{body}");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(
            message.contains("--max-streams-per-environment"),
            "{message}"
        );
        // The admin token is not counted, nor is another environment's key.
        let admin = Stream::open(server, &server.admin_token, &session, None).await;
        let (other_env, other_session) = setup(server).await;
        let other_key = env_key(server, &other_env).await;
        let other = Stream::open(server, &other_key, &other_session, None).await;

        // A stream that ends gives its place back (once the server has seen it go).
        drop(open.pop());
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let response = refused().await;
            if response.status() == StatusCode::OK {
                open.push(Stream::from(response));
                break;
            }
            assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
            assert!(Instant::now() < deadline, "the place was never given back");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        drop((open, admin, other));
    })
    .await;
}

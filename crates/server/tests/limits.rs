//! Limits and contract edges, on every backend: the size of one event, listings bounded by bytes, the
//! memory request bodies may take, NUL characters, and bodies that are present but say nothing.

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use tether_server::ServiceConfig;
use tether_testkit::{
    backends, each_backend, each_backend_with, json_of, listed_ids, send_and_read, Options,
    TestServer,
};

fn text_event(kind: &str, text: &str) -> Value {
    json!({"type": kind, "content": [{"type": "text", "text": text}]})
}

async fn setup(server: &TestServer) -> (String, String) {
    let (env, _agent, session) = server.environment_agent_and_session().await;
    (env, session)
}

fn options(max_event_bytes: usize, request_memory: usize, body_limit: usize) -> Options {
    let defaults = Options::default();
    Options {
        config: ServiceConfig {
            max_event_bytes,
            request_memory,
            ..defaults.config
        },
        body_limit,
    }
}

#[tokio::test]
async fn an_event_over_the_limit_is_refused_and_names_itself() {
    each_backend_with(options(64 * 1024, 256 << 20, 1 << 20), async |server| {
        let (env, session) = setup(server).await;
        let big = "x".repeat(70 * 1024);
        let (status, body) = server
            .post(
                &format!("/sessions/{session}/events"),
                json!({"events": [text_event("agent.message", "small"), text_event("agent.message", &big)]}),
            )
            .await;
        assert_eq!(
            status,
            StatusCode::BAD_REQUEST,
            "{}: {body}",
            server.backend.name()
        );
        assert_eq!(body["error"]["type"], "invalid_request_error");
        assert_eq!(body["error"]["param"], "events[1]", "{body}");
        assert_eq!(body["error"]["code"], "event_too_large", "{body}");
        // All or nothing: the small one was not stored either.
        let (_, list) = server.get(&format!("/sessions/{session}/events")).await;
        assert_eq!(list["data"].as_array().unwrap().len(), 0, "{list}");
        // Just under the limit is fine.
        let fits = "x".repeat(60 * 1024);
        let (status, body) = server
            .post(
                &format!("/sessions/{session}/events"),
                json!({"events": [text_event("agent.message", &fits)]}),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        // Session creation's initial events are held to the same limit.
        let agent = server.agent().await;
        let (status, body) = server
            .post(
                "/sessions",
                json!({"agent": agent, "environment_id": env,
                       "initial_events": [text_event("user.message", &big)]}),
            )
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        assert_eq!(body["error"]["param"], "initial_events[0]", "{body}");
    })
    .await;
}

/// Ids of a session's events, following `next_page` to the end, and how many pages that took.
async fn all_pages(server: &TestServer, session: &str, query: &str) -> (Vec<String>, usize) {
    let pages = server
        .pages(&format!("/sessions/{session}/events?limit=100{query}"))
        .await;
    (pages.iter().flat_map(listed_ids).collect(), pages.len())
}

#[tokio::test]
async fn event_pages_are_bounded_by_bytes_and_lose_nothing() {
    each_backend(async |server| {
        let (_, session) = setup(server).await;
        // 12 events of 300 KiB: a page holds at most 1 MiB of events plus one.
        let chunk = "y".repeat(300 * 1024);
        let mut posted = Vec::new();
        for i in 0..12 {
            let (status, body) = server
                .post(
                    &format!("/sessions/{session}/events"),
                    json!({"events": [text_event("agent.message", &format!("{i}{chunk}"))]}),
                )
                .await;
            assert_eq!(status, StatusCode::OK, "{body}");
            posted.push(body["data"][0]["id"].as_str().unwrap().to_owned());
        }
        let (ids, pages) = all_pages(server, &session, "").await;
        assert_eq!(ids, posted, "{}", server.backend.name());
        assert!(
            pages >= 3,
            "12 × 300 KiB must take several pages, took {pages}"
        );
        let (mut ids, _) = all_pages(server, &session, "&order=desc").await;
        ids.reverse();
        assert_eq!(ids, posted);
        // A filtered listing is bounded the same way.
        let (ids, pages) = all_pages(server, &session, "&types[]=agent.message").await;
        assert_eq!(ids, posted);
        assert!(pages >= 3, "{pages}");
        // The response is valid JSON with the whole envelope.
        let (status, body) = server
            .get(&format!("/sessions/{session}/events?limit=2"))
            .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["first_id"], json!(posted[0]));
        assert_eq!(body["last_id"], json!(posted[1]));
        assert_eq!(body["next_page"], json!(posted[1]));
        assert_eq!(
            body["data"][1]["content"][0]["text"]
                .as_str()
                .unwrap()
                .len(),
            chunk.len() + 1
        );
    })
    .await;
}

/// A new agent whose prompt is `bytes` long: its id.
async fn large_agent(server: &TestServer, bytes: usize) -> String {
    let (status, agent) = server
        .post(
            "/agents",
            json!({"name": "large", "model": "m", "system": "x".repeat(bytes)}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{agent}");
    agent["id"].as_str().unwrap().to_owned()
}

/// Pages of sessions (and agents) are bounded by bytes too: a session holds its agent, and a page
/// of sessions whose agent has a 300 kB prompt holds no more than 1 MiB of them, saying
/// `has_more`; following `next_page` lists every one exactly once, in either order.
#[tokio::test]
async fn pages_of_large_records_are_bounded_by_bytes_and_lose_nothing() {
    each_backend(async |server| {
        let (env, small_agent) = server.environment_and_agent().await;
        let agent = large_agent(server, 300_000).await;
        let mut created = Vec::new();
        for _ in 0..9 {
            created.push(server.session(&env, &agent).await);
        }
        for path in [
            format!("/sessions?agent_id={agent}&limit=100"),
            format!("/sessions?agent_id={agent}&limit=100&order=desc"),
        ] {
            let pages = server.pages(&path).await;
            let sizes: Vec<usize> = pages
                .iter()
                .map(|page| page["data"].as_array().unwrap().len())
                .collect();
            assert_eq!(
                sizes,
                [3, 3, 3],
                "{path}: a fourth record of 300 kB passes 1 MiB"
            );
            let mut listed: Vec<String> = pages.iter().flat_map(listed_ids).collect();
            listed.sort();
            let mut expected = created.clone();
            expected.sort();
            assert_eq!(listed, expected, "{path}");
        }
        // Read backwards from the last: the page holds the three nearest the cursor, in list
        // order, and says that more follow it (the cursor's record).
        let last = created.last().unwrap();
        let (status, page) = server
            .get(&format!(
                "/sessions?agent_id={agent}&limit=100&before_id={last}"
            ))
            .await;
        assert_eq!(status, StatusCode::OK, "{page}");
        assert_eq!(listed_ids(&page), created[5..8].to_vec(), "{page}");
        assert_eq!(page["has_more"], true, "{page}");
        // The agents' listing is bounded the same way: the small agent and three large ones fit
        // in a page, a fourth large one does not.
        let mut agents = vec![small_agent.clone(), agent.clone()];
        for _ in 0..3 {
            agents.push(large_agent(server, 300_000).await);
        }
        for path in ["/agents?limit=100", "/agents?limit=100&order=desc"] {
            let pages = server.pages(path).await;
            let sizes: Vec<usize> = pages
                .iter()
                .map(|page| page["data"].as_array().unwrap().len())
                .collect();
            let expected = if path.ends_with("desc") {
                [3, 2]
            } else {
                [4, 1]
            };
            assert_eq!(sizes, expected, "{path}");
            let mut listed: Vec<String> = pages.iter().flat_map(listed_ids).collect();
            listed.sort();
            let mut all = agents.clone();
            all.sort();
            assert_eq!(listed, all, "{path}");
        }
    })
    .await;
}

#[tokio::test]
async fn bodies_that_would_cost_too_much_memory_are_refused() {
    for backend in backends() {
        let server = TestServer::start_with(&backend, options(1 << 20, 8 << 20, 4 << 20)).await;
        let (_, session) = setup(&server).await;
        let path = server.url(&format!("/sessions/{session}/events"));
        // 100,000 tiny values: some 200 KB of text, but a tree of many megabytes.
        let many = format!("{{\"events\":[{}0]}}", "0,".repeat(100_000));
        let (status, body) = send_and_read(
            server
                .http()
                .post(&path)
                .bearer_auth(&server.admin_token)
                .body(many),
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("memory"),
            "{body}"
        );
        // Over a million values: refused whatever the budget.
        let server2 = TestServer::start_with(&backend, options(1 << 20, 1 << 30, 4 << 20)).await;
        let (_, session2) = setup(&server2).await;
        let too_many = format!("[{}0]", "0,".repeat(1_000_001));
        let (status, body) = send_and_read(
            server2
                .http()
                .post(server2.url(&format!("/sessions/{session2}/events")))
                .bearer_auth(&server2.admin_token)
                .body(too_many),
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        assert_eq!(body["type"], "error");
        // Requests without a body are not held up, and a normal post still works.
        let (status, _) = server
            .post(
                &format!("/sessions/{session}/events"),
                json!({"events": [text_event("agent.message", "fine")]}),
            )
            .await;
        assert_eq!(status, StatusCode::OK);
        server.shutdown().await;
        server2.shutdown().await;
    }
}

/// Posts an event whose text is `bytes` long: a request that needs some 5 × `bytes` of the budget.
async fn post_a_large_event(server: &TestServer, session: &str, bytes: usize) -> StatusCode {
    let (status, body) = server
        .post(
            &format!("/sessions/{session}/events"),
            json!({"events": [text_event("agent.message", &"x".repeat(bytes))]}),
        )
        .await;
    assert!(
        status == StatusCode::OK || status.is_server_error(),
        "{body}"
    );
    status
}

/// A `POST` to `path` on a connection of its own that declares a JSON body of `declared` bytes and
/// sends `sent` of them (an object's `{` and blanks), with the extra header lines `headers`;
/// returned once the server has had a moment to read them.
async fn begin_a_body(
    server: &TestServer,
    path: &str,
    headers: &str,
    (declared, sent): (usize, usize),
) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let address = server.base.trim_start_matches("http://");
    let mut connection = tokio::net::TcpStream::connect(address).await.unwrap();
    connection
        .write_all(
            format!(
                "POST {path} HTTP/1.1\r\nHost: {address}\r\n{headers}\
                 Content-Type: application/json\r\nContent-Length: {declared}\r\n\r\n{{{}",
                " ".repeat(sent.saturating_sub(1))
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    connection
}

#[tokio::test]
async fn only_a_body_that_is_kept_spends_the_budget_and_only_for_an_admitted_caller() {
    use tokio::io::AsyncReadExt;
    // A budget of 1 MiB: a body of 209,000 bytes is charged 1,045,000 bytes of it (5 a byte), which
    // leaves too little for an event of 20 kB (some 100 kB). One caller may hold 768 KiB of it: a
    // body of 150,000 bytes leaves too little of that.
    const NEARLY_ALL: usize = 209_000;
    const MOST_OF_A_PART: usize = 150_000;
    for backend in backends() {
        let server = TestServer::start_with(&backend, options(1 << 20, 1 << 20, 4 << 20)).await;
        let (env, session) = setup(&server).await;

        // A caller without a credential declares that large body and sends one byte of it (where the
        // budget used to be taken before the credential was looked at); then a caller that is
        // admitted needs the budget.
        let mut stranger = begin_a_body(
            &server,
            "/api/v1/cloud/sessions",
            "",
            (NEARLY_ALL, NEARLY_ALL - 1),
        )
        .await;
        assert_eq!(
            post_a_large_event(&server, &session, 20_000).await,
            StatusCode::OK,
            "a caller without a credential held the budget"
        );
        let mut answer = vec![0u8; 12];
        stranger.read_exact(&mut answer).await.unwrap();
        assert_eq!(
            &answer,
            b"HTTP/1.1 401",
            "{}",
            String::from_utf8_lossy(&answer)
        );

        // An admitted caller opens an event stream and sends that large body with it: the stream
        // takes no body, so nothing of it is kept or charged, however long the stream stays open.
        let stream = server
            .http()
            .get(server.url(&format!("/sessions/{session}/events/stream")))
            .bearer_auth(&server.admin_token)
            .body(vec![b' '; NEARLY_ALL])
            .send()
            .await
            .unwrap();
        assert_eq!(stream.status(), StatusCode::OK);
        assert_eq!(
            post_a_large_event(&server, &session, 20_000).await,
            StatusCode::OK,
            "an open event stream held the budget"
        );
        drop(stream);

        // A body pays for what has arrived of it, not for what its `Content-Length` says: one
        // that declares most of its caller's part and sends a byte holds nothing of it.
        let liar = begin_a_body(
            &server,
            &format!("/api/v1/cloud/sessions/{session}/events"),
            &format!("Authorization: Bearer {}\r\n", server.admin_token),
            (MOST_OF_A_PART, 1),
        )
        .await;
        assert_eq!(
            post_a_large_event(&server, &session, 20_000).await,
            StatusCode::OK,
            "a length that lies held the budget"
        );
        drop(liar);

        // The budget still binds a body that is kept, by caller: while one request of the admin
        // token holds nearly all its part (an event post whose body has not all arrived), the
        // token's next large event waits for it and is refused …
        let holder = begin_a_body(
            &server,
            &format!("/api/v1/cloud/sessions/{session}/events"),
            &format!("Authorization: Bearer {}\r\n", server.admin_token),
            (MOST_OF_A_PART + 1, MOST_OF_A_PART),
        )
        .await;
        let refused = server
            .http()
            .post(server.url(&format!("/sessions/{session}/events")))
            .bearer_auth(&server.admin_token)
            .json(&json!({"events": [text_event("agent.message", &"x".repeat(20_000))]}))
            .send()
            .await
            .unwrap();
        assert_eq!(refused.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            refused.headers().get("retry-after").map(|v| v.as_bytes()),
            Some(&b"1"[..]),
            "the refusal says when to retry, in the envelope"
        );
        let body: serde_json::Value = refused.json().await.unwrap();
        assert_eq!(body["error"]["type"], "overloaded_error", "{body}");
        // … while another caller, the environment's key, still has the rest of the budget.
        let key = environment_key(&server, &env).await;
        let (status, body) = server
            .call_as(
                &key,
                Method::POST,
                &format!("/sessions/{session}/events"),
                Some(json!({"events": [text_event("agent.message", &"x".repeat(20_000))]})),
                &[],
            )
            .await;
        assert_eq!(
            status,
            StatusCode::OK,
            "a caller held more than its part: {body}"
        );
        drop(holder);
        server.shutdown().await;
    }
}

/// Reads one HTTP/1.1 response with a `Content-Length` from `stream`: its status line.
async fn status_line_of_response(stream: &mut tokio::net::TcpStream) -> String {
    use tokio::io::AsyncReadExt;
    let mut read = Vec::new();
    let head_end = loop {
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await.unwrap();
        assert!(
            n > 0,
            "the connection closed: {}",
            String::from_utf8_lossy(&read)
        );
        read.extend_from_slice(&chunk[..n]);
        if let Some(at) = read.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
    };
    let head = String::from_utf8_lossy(&read[..head_end]).to_lowercase();
    let length: usize = head
        .lines()
        .find_map(|line| line.strip_prefix("content-length:"))
        .map(|v| v.trim().parse().unwrap())
        .unwrap_or(0);
    while read.len() < head_end + length {
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await.unwrap();
        assert!(n > 0, "the connection closed mid-answer");
        read.extend_from_slice(&chunk[..n]);
    }
    head.lines().next().unwrap_or_default().to_owned()
}

#[tokio::test]
async fn a_refused_request_leaves_its_connection_usable() {
    use tokio::io::AsyncWriteExt;
    each_backend(async |server| {
        let address = server.base.trim_start_matches("http://").to_owned();
        let mut connection = tokio::net::TcpStream::connect(&address).await.unwrap();
        for (request, refusal) in [
            ("POST /api/v1/cloud/sessions", "401"),
            ("POST /api/v1/cloud/no/such/endpoint", "404"),
            ("PUT /api/v1/cloud/sessions", "405"),
        ] {
            // The body follows its headers a moment later, as some clients send it, so that it is not
            // in the server's buffer when the refusal is decided.
            connection
                .write_all(
                    format!(
                        "{request} HTTP/1.1\r\nHost: {address}\r\nAuthorization: Bearer nobody\r\n\
                         Content-Type: application/json\r\nContent-Length: 2\r\n\r\n"
                    )
                    .as_bytes(),
                )
                .await
                .unwrap();
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            connection.write_all(b"{}").await.unwrap();
            let status = status_line_of_response(&mut connection).await;
            assert!(status.contains(refusal), "{request}: {status}");
        }
        connection
            .write_all(format!("GET /healthz HTTP/1.1\r\nHost: {address}\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let status = status_line_of_response(&mut connection).await;
        assert!(status.contains("200"), "{status}");
    })
    .await;
}

#[tokio::test]
async fn a_nul_in_an_id_filter_matches_nothing() {
    each_backend(async |server| {
        setup(server).await;
        for base in [server.url("/sessions"), server.v1("/sessions")] {
            for filter in [
                "agent_id=x%00y",
                "environment_id=x%00y",
                "agent_id=%00",
                "environment_id=env_%00",
            ] {
                let (status, body) = send_and_read(
                    server
                        .http()
                        .get(format!("{base}?{filter}"))
                        .bearer_auth(&server.admin_token),
                )
                .await;
                assert_eq!(
                    status,
                    StatusCode::OK,
                    "{} {base}?{filter}: {body}",
                    server.backend.name()
                );
                assert_eq!(body["data"], json!([]), "{body}");
                assert_eq!(body["has_more"], json!(false));
            }
        }
        // A path id with a NUL is no id at all (D-2).
        let (status, body) = server.get("/sessions/sess_%00").await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    })
    .await;
}

#[tokio::test]
async fn strings_with_nul_are_stored_as_sent() {
    each_backend(async |server| {
        let nul = "a\u{0}b";
        let (status, env) = server
            .post(
                "/environments",
                json!({"name": nul, "description": nul, "config": {"type": "self_hosted"},
                       "metadata": {"k\u{0}": nul}}),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{}: {env}", server.backend.name());
        let env_id = env["id"].as_str().unwrap();
        let (_, again) = server.get(&format!("/environments/{env_id}")).await;
        assert_eq!(again["name"], json!(nul));
        assert_eq!(again["metadata"], json!({"k\u{0}": nul}));
        let agent = server.agent().await;
        let (status, session) = server
            .post(
                "/sessions",
                json!({"agent": agent, "environment_id": env_id, "title": nul}),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{session}");
        let session_id = session["id"].as_str().unwrap();
        let (status, body) = server
            .post(
                &format!("/sessions/{session_id}/events"),
                json!({"events": [text_event("agent.message", nul)]}),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let (_, got) = server.get(&format!("/sessions/{session_id}")).await;
        assert_eq!(got["title"], json!(nul));
        let (_, events) = server.get(&format!("/sessions/{session_id}/events")).await;
        assert_eq!(
            events["data"][0]["content"][0]["text"],
            json!(nul),
            "{events}"
        );
        let (status, token) = server.post("/tokens", json!({"name": nul})).await;
        assert_eq!(status, StatusCode::OK, "{token}");
    })
    .await;
}

#[tokio::test]
async fn bodies_that_say_nothing_are_refused_where_they_would_hide_a_mistake() {
    each_backend(async |server| {
        let (env, _) = setup(server).await;
        let (_, before) = server.get(&format!("/environments/{env}")).await;
        // An update without a body, or with `null`, is a 400 and changes nothing.
        let path = server.url(&format!("/environments/{env}"));
        for body in [None, Some("null"), Some("")] {
            let mut req = server.http().post(&path).bearer_auth(&server.admin_token);
            if let Some(text) = body {
                req = req.header("content-type", "application/json").body(text);
            }
            let (status, answer) = send_and_read(req).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{body:?}: {answer}");
            assert_eq!(answer["error"]["type"], "invalid_request_error");
        }
        let (_, after) = server.get(&format!("/environments/{env}")).await;
        assert_eq!(before["updated_at"], after["updated_at"]);
        // `{}` is a valid (empty) update.
        let (status, _) = server
            .post(&format!("/environments/{env}"), json!({}))
            .await;
        assert_eq!(status, StatusCode::OK);

        // Stop with `null` is not a graceful stop: 400, and the item is untouched.
        let (status, item) = server
            .call_as(
                &server.admin_token.clone(),
                Method::GET,
                &format!("/environments/{env}/work/poll"),
                None,
                &[],
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{item}");
        let work = item["id"].as_str().unwrap();
        let (status, body) = send_and_read(
            server
                .http()
                .post(server.url(&format!("/environments/{env}/work/{work}/stop")))
                .bearer_auth(&server.admin_token)
                .header("content-type", "application/json")
                .body("null"),
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        let (_, now) = server
            .get(&format!("/environments/{env}/work/{work}"))
            .await;
        assert_eq!(now["state"], item["state"]);
        assert!(now["stop_requested_at"].is_null());
        // No body, an empty body and `{}` still mean graceful (§6.8).
        let (status, stopped) = server
            .post(&format!("/environments/{env}/work/{work}/stop"), json!({}))
            .await;
        assert_eq!(status, StatusCode::OK, "{stopped}");

        // Credential names: absent is fine; null, empty or blank is a 400 naming `name`.
        for path in ["/tokens".to_owned(), format!("/environments/{env}/keys")] {
            for name in [json!(null), json!(""), json!("  "), json!(7)] {
                let (status, body) = server.post(&path, json!({ "name": name })).await;
                assert_eq!(status, StatusCode::BAD_REQUEST, "{path} {name}: {body}");
                assert_eq!(body["error"]["param"], "name");
            }
            let (status, body) = server.post(&path, json!({})).await;
            assert_eq!(status, StatusCode::OK, "{body}");
        }
    })
    .await;
}

#[tokio::test]
async fn the_openapi_document_states_the_limits_the_server_enforces() {
    let backend = backends().remove(0);
    let server = TestServer::start(&backend).await;
    let doc: Value = json_of(server.http().get(format!("{}/openapi.json", server.base))).await;
    let param = |path: &str, method: &str, name: &str| -> Value {
        doc["paths"][path][method]["parameters"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .unwrap_or_else(|| panic!("{method} {path} has no {name}"))["schema"]
            .clone()
    };
    let limit = param("/api/v1/cloud/sessions", "get", "limit");
    assert_eq!(
        (limit["minimum"].as_i64(), limit["maximum"].as_i64()),
        (Some(1), Some(100))
    );
    let limit = param("/v1/sessions", "get", "limit");
    assert_eq!(
        (limit["minimum"].as_i64(), limit["maximum"].as_i64()),
        (Some(1), Some(1000))
    );
    let block = param(
        "/api/v1/cloud/environments/{environment_id}/work/poll",
        "get",
        "block_ms",
    );
    assert_eq!(
        (block["minimum"].as_i64(), block["maximum"].as_i64()),
        (Some(1), Some(999))
    );
    let schemas = &doc["components"]["schemas"];
    let name = &schemas["CreateEnvironment"]["properties"]["name"];
    assert_eq!(name["minLength"], 1, "{name}");
    assert_eq!(name["maxLength"], 256, "{name}");
    assert_eq!(
        schemas["CreateAgent"]["properties"]["name"]["maxLength"],
        64
    );
    assert_eq!(
        schemas["CreateCredential"]["properties"]["name"]["minLength"],
        1
    );
    let metadata = &schemas["CreateSession"]["properties"]["metadata"];
    assert_eq!(metadata["maxProperties"], 16, "{metadata}");
    assert_eq!(metadata["propertyNames"]["maxLength"], 64, "{metadata}");
    assert_eq!(
        metadata["additionalProperties"]["maxLength"], 512,
        "{metadata}"
    );
    let patch = &schemas["UpdateSession"]["properties"]["metadata"];
    assert_eq!(patch["propertyNames"]["maxLength"], 64, "{patch}");
    let events = &schemas["PostEvents"]["properties"]["events"];
    assert_eq!(
        (events["minItems"].as_i64(), events["maxItems"].as_i64()),
        (Some(1), Some(100))
    );
    server.shutdown().await;
}

/// A page of events is paid for from the pages' memory budget, by its caller, until it has been
/// handed out: a caller that leaves pages unread (an HTTP/2 client that keeps its streams' windows
/// shut) gets no more than its part, and other callers still get theirs.
#[tokio::test]
async fn unread_event_pages_hold_no_more_than_their_callers_part() {
    // Request memory of 64 MiB: pages have 16 MiB, of which a caller may hold 12 MiB; a read
    // reserves 2 × (1 MiB + 64 KiB). The log holds 32 events of 60 kB: a page of up to 1 MiB.
    let backend = backends().remove(0);
    let server = TestServer::start_with(&backend, options(64 << 10, 64 << 20, 4 << 20)).await;
    let (env, session) = setup(&server).await;
    for _ in 0..2 {
        let batch: Vec<Value> = (0..16)
            .map(|_| text_event("agent.message", &"x".repeat(60_000)))
            .collect();
        let (status, body) = server
            .post(
                &format!("/sessions/{session}/events"),
                json!({"events": batch}),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    let page = format!("/api/v1/cloud/sessions/{session}/events?limit=100");

    // The admin token asks for 16 pages on one HTTP/2 connection and reads none of them.
    let address = server.base.trim_start_matches("http://").to_owned();
    let (sender, _conn) = tether_testkit::net::h2_client(&address, 1024).await;
    let asks = (0..16).map(|_| {
        let mut sender = sender.clone();
        let request = hyper::Request::get(format!("http://{address}{page}"))
            .header("authorization", format!("Bearer {}", server.admin_token))
            .body(String::new())
            .unwrap();
        async move { sender.send_request(request).await.unwrap() }
    });
    let unread = futures::future::join_all(asks).await;
    let statuses: Vec<u16> = unread.iter().map(|r| r.status().as_u16()).collect();
    let answered = statuses.iter().filter(|&&s| s == 200).count();
    assert!(
        (1..16).contains(&answered) && statuses.iter().all(|&s| s == 200 || s == 503),
        "some pages answered, the rest refused once the caller's part was held: {statuses:?}"
    );

    // Another caller, the environment's key, still reads.
    let key = environment_key(&server, &env).await;
    let (status, body) = server
        .call_as(
            &key,
            Method::GET,
            &format!("/sessions/{session}/events?limit=100"),
            None,
            &[],
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert!(body["data"].as_array().is_some_and(|d| !d.is_empty()));

    // A live stream's replay pays the same way: the admin token's waits while its part is held,
    // the key's goes on.
    let first = body["data"][0]["id"].as_str().unwrap();
    assert_eq!(
        frames_within(&server, &server.admin_token, &session, first).await,
        0
    );
    assert!(frames_within(&server, &key, &session, first).await > 0);
    drop(unread);
    server.shutdown().await;
}

/// Answers made whole (a record, a page of a listing) over 16 KiB are paid for by their caller
/// until they are written out: a caller that asks for a large session again and again on HTTP/2
/// streams and reads none gets some, then 503s once its part is held, while another caller is
/// served; once the streams go, the first is served again.
#[tokio::test]
async fn unread_large_answers_hold_no_more_than_their_callers_part() {
    // Request memory of 64 MiB: answers have 16 MiB, of which a caller may hold 12 MiB. Each
    // answer is a session whose agent's prompt is 400 kB.
    let backend = backends().remove(0);
    let server = TestServer::start_with(&backend, options(64 << 10, 64 << 20, 4 << 20)).await;
    let (env, small_agent, _session) = server.environment_agent_and_session().await;
    let agent = large_agent(&server, 400_000).await;
    let session = server.session(&env, &agent).await;
    let path = format!("/api/v1/cloud/sessions/{session}");

    let address = server.base.trim_start_matches("http://").to_owned();
    let (sender, _conn) = tether_testkit::net::h2_client(&address, 1024).await;
    let ask_for = |path: &str, token: String| {
        let mut sender = sender.clone();
        let request = hyper::Request::get(format!("http://{address}{path}"))
            .header("authorization", format!("Bearer {token}"))
            .body(String::new())
            .unwrap();
        async move { sender.send_request(request).await.unwrap() }
    };
    let ask = |token: String| ask_for(&path, token);
    let unread = futures::future::join_all((0..60).map(|_| ask(server.admin_token.clone()))).await;
    let statuses: Vec<u16> = unread.iter().map(|r| r.status().as_u16()).collect();
    let answered = statuses.iter().filter(|&&s| s == 200).count();
    assert!(
        (28..=31).contains(&answered) && statuses.iter().all(|&s| s == 200 || s == 503),
        "about 12 MiB of answers held (31 of 393 KiB), the rest refused: {statuses:?}"
    );

    // A write's answer is never refused after the write, whose client would send it again: a
    // session made with the large agent is answered while the token's part is held.
    let (status, made) = server
        .post("/sessions", json!({"agent": agent, "environment_id": env}))
        .await;
    assert_eq!(status, StatusCode::OK, "{made}");

    // Nor a poll's, once it delivered its item: an item whose metadata makes its answer larger
    // than a read may be for free (about 33 KiB), polled with the token whose part is held to
    // less than that by unread records of about 20 KiB, is answered.
    let wide = |chars: usize| -> serde_json::Map<String, Value> {
        (0..16)
            .map(|k| (format!("key{k}"), json!("\u{1d11e}".repeat(chars))))
            .collect()
    };
    let (status, fresh) = server
        .post(
            "/environments",
            json!({"name": "fresh", "config": {"type": "self_hosted"}, "metadata": wide(300)}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{fresh}");
    let fresh = fresh["id"].as_str().unwrap();
    let record = format!("/api/v1/cloud/environments/{fresh}");
    let filling =
        futures::future::join_all((0..40).map(|_| ask_for(&record, server.admin_token.clone())))
            .await;
    assert!(
        filling.iter().any(|r| r.status() == 503),
        "the part held to less than one more record"
    );
    let wide = wide(512);
    let (status, made) = server
        .post(
            "/sessions",
            json!({"agent": small_agent, "environment_id": fresh, "metadata": wide}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{made}");
    let (status, polled) = server
        .call_as(
            &server.admin_token,
            Method::GET,
            &format!("/environments/{fresh}/work/poll?block_ms=1"),
            None,
            &[("Worker-ID", "w")],
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{polled}");
    assert!(
        polled.to_string().len() > 16 * 1024,
        "{}",
        polled.to_string().len()
    );
    assert_eq!(polled["data"]["id"], made["id"], "{polled}");
    drop(filling);

    // Another caller, the environment's key, is served meanwhile.
    let key = environment_key(&server, &env).await;
    let (status, body) = server
        .call_as(
            &key,
            Method::GET,
            &format!("/sessions/{session}"),
            None,
            &[],
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");

    // Once the unread answers go, the admin token is served again.
    drop(unread);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let again = ask(server.admin_token.clone()).await;
        if again.status() == 200 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{}", again.status());
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    server.shutdown().await;
}

/// A new key of `env`'s: its secret.
async fn environment_key(server: &TestServer, env: &str) -> String {
    let (status, key) = server
        .post(
            &format!("/environments/{env}/keys"),
            json!({"name": "reader"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{key}");
    key["token"].as_str().unwrap().to_owned()
}

/// How many events a live stream of `session`, resumed after `after`, delivers to `token` within
/// a second and a half.
async fn frames_within(server: &TestServer, token: &str, session: &str, after: &str) -> usize {
    use futures::StreamExt as _;
    let response = server
        .http()
        .get(server.url(&format!("/sessions/{session}/events/stream")))
        .bearer_auth(token)
        .header("Last-Event-ID", after)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.bytes_stream();
    let until = tokio::time::Instant::now() + std::time::Duration::from_millis(1500);
    let mut frames = 0;
    while let Ok(Some(Ok(chunk))) = tokio::time::timeout_at(until, body.next()).await {
        frames += chunk.windows(3).filter(|w| w == b"id:").count();
    }
    frames
}

/// An event a live stream has handed out stays paid for until the text made of it is let go: a
/// client that opens streams and takes nothing leaves their events in the server's buffers (hyper's
/// write buffer holds a whole frame while the socket takes a few KiB at a time), and those count
/// against its caller's part like unread pages.
#[tokio::test]
async fn an_event_a_stream_handed_out_is_paid_for_until_its_text_is_let_go() {
    use http_body_util::BodyExt as _;
    use tower::ServiceExt as _;
    let backend = backends().remove(0);
    let server = TestServer::start_with(&backend, options(2 << 20, 64 << 20, 4 << 20)).await;
    let (_env, session) = setup(&server).await;
    for text in ["first".to_owned(), "x".repeat(1_000_000)] {
        let (status, body) = server
            .post(
                &format!("/sessions/{session}/events"),
                json!({"events": [text_event("agent.message", &text)]}),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    let (_, log) = server
        .get(&format!("/sessions/{session}/events?limit=1"))
        .await;
    let first = log["data"][0]["id"].as_str().unwrap().to_owned();

    let free_before = server.app.page_memory.available();
    let router = tether_server::http::router(server.app.clone(), 4 << 20);
    let request =
        axum::http::Request::get(format!("/api/v1/cloud/sessions/{session}/events/stream"))
            .header("authorization", format!("Bearer {}", server.admin_token))
            .header("last-event-id", &first)
            .header("host", "tether.test")
            .body(axum::body::Body::empty())
            .unwrap();
    let response = router.oneshot(request).await.unwrap();
    if response.status() != StatusCode::OK {
        let text = response.into_body().collect().await.unwrap().to_bytes();
        panic!("{}", String::from_utf8_lossy(&text));
    }
    let mut body = response.into_body();
    // The large event's frame, taken from the stream and held as hyper would hold it unsent.
    let frame = body
        .frame()
        .await
        .expect("a frame")
        .unwrap()
        .into_data()
        .unwrap();
    assert!(frame.len() > 1_000_000);
    let held = free_before - server.app.page_memory.available();
    assert!(
        held >= 1_000_000,
        "the frame holds what its event costs, {held} bytes held"
    );
    drop(frame);
    assert!(
        free_before - server.app.page_memory.available() < 1_000_000,
        "let go with the frame"
    );
    drop(body);
    server.shutdown().await;
}

/// The free space kept on the store's disk (`--min-free-disk`, `tether_server::disk`): a floor no
/// disk has, so that the first reading is under it.
const BEYOND_ANY_DISK: u64 = 1 << 50;

fn beyond_any_disk() -> Options {
    let defaults = Options::default();
    Options {
        config: ServiceConfig {
            min_free_disk: BEYOND_ANY_DISK,
            ..defaults.config
        },
        ..defaults
    }
}

#[tokio::test]
async fn under_the_disk_floor_requests_that_add_records_are_refused_and_work_goes_on() {
    for backend in backends() {
        let roomy = TestServer::start(&backend).await;
        let (env, agent, session) = roomy.environment_agent_and_session().await;
        let item = roomy.poll_as_worker(&env, "w1", "").await;
        let work = item["id"].as_str().unwrap().to_owned();
        roomy.ack_as_worker(&env, &work, "w1").await;
        // A turn under way when the floor is crossed.
        let (status, answer) = roomy
            .post(
                &format!("/sessions/{session}/events"),
                json!({"events": [text_event("user.message", "go")]}),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{answer}");
        let tight = TestServer::start_on(
            &backend,
            roomy.location.clone(),
            beyond_any_disk(),
            roomy.clock.clone(),
        )
        .await;
        tether_server::disk::watch_once(&tight.app).await;
        // Only a store on this machine's disk has one to read; PostgreSQL's is its own
        // operator's to watch.
        let watched = backend.name() == "sqlite";
        let additions = [
            ("/sessions", json!({"agent": agent, "environment_id": env})),
            (
                "/environments",
                json!({"name": "more", "config": {"type": "self_hosted"}}),
            ),
            ("/agents", json!({"name": "more", "model": "none"})),
            (&format!("/agents/{agent}"), json!({"name": "renamed"})),
            (
                &format!("/sessions/{session}/events"),
                json!({"events": [text_event("agent.message", "more")]}),
            ),
        ];
        for (path, body) in additions {
            let (status, answer) = tight.post(path, body).await;
            match watched {
                true => {
                    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{path}: {answer}");
                    assert_eq!(answer["error"]["type"], "overloaded_error", "{answer}");
                    assert_eq!(answer["error"]["code"], "disk_low", "{answer}");
                    let message = answer["error"]["message"].as_str().unwrap();
                    assert!(message.contains("--min-free-disk"), "{message}");
                }
                false => assert_eq!(status, StatusCode::OK, "{backend:?} {path}: {answer}"),
            }
        }
        // A session's initial events count against the reading as a post of them would: 64 KiB
        // over the floor takes a session without events, and not one whose events take more.
        if watched {
            tight.app.disk.record(BEYOND_ANY_DISK + 64 * 1024);
            let with_events = |text: &str| {
                json!({"agent": agent, "environment_id": env,
                       "initial_events": [text_event("user.message", text)]})
            };
            let (status, answer) = tight
                .post("/sessions", with_events(&"x".repeat(40_000)))
                .await;
            assert_eq!(answer["error"]["code"], "disk_low", "{status}: {answer}");
            let (status, answer) = tight.post("/sessions", with_events("small")).await;
            assert_eq!(status, StatusCode::OK, "{answer}");
            tether_server::disk::watch_once(&tight.app).await;
        }
        // The work in flight goes on: its heartbeat, an interrupt of its turn and the end of the
        // turn (small: padded, they are refused as any event), its stop, and the session's archive.
        let item_path = |action: &str| format!("/environments/{env}/work/{work}/{action}");
        let worker = [("Worker-ID", "w1")];
        let token = tight.admin_token.clone();
        let (status, answer) = tight
            .call_as(&token, Method::POST, &item_path("heartbeat"), None, &worker)
            .await;
        assert_eq!(status, StatusCode::OK, "{backend:?}: {answer}");
        let events = format!("/sessions/{session}/events");
        // Those that leave the turn open may take the disk down to half the floor, no further:
        // a reading 64 KiB over that lets through a few errors of 4 KiB, then refuses them.
        if watched {
            tight.app.disk.record(BEYOND_ANY_DISK / 2 + 64 * 1024);
        }
        let failing =
            json!({"type": "session.error", "error": {"type": "x", "message": "y".repeat(3_900)}});
        let mut errors_let_through = 0;
        while errors_let_through < 100 {
            let (status, answer) = tight
                .post(&events, json!({ "events": [failing.clone()] }))
                .await;
            if status != StatusCode::OK {
                assert_eq!(answer["error"]["code"], "disk_low", "{answer}");
                break;
            }
            errors_let_through += 1;
        }
        match watched {
            true => assert!(
                (1..10).contains(&errors_let_through),
                "{errors_let_through}"
            ),
            false => assert_eq!(errors_let_through, 100),
        }
        if watched {
            tight.app.disk.record(BEYOND_ANY_DISK / 2 + 64 * 1024);
        }
        let padding = "x".repeat(8 * 1024);
        let ending = json!({"type": "session.status_idle", "stop_reason": {"type": "end_turn"}});
        for (event, let_through) in [
            (json!({"type": "user.interrupt", "padding": padding}), false),
            (json!({"type": "user.interrupt"}), true),
            (
                json!({"type": "session.status_idle", "stop_reason": {"type": "end_turn"}, "padding": padding}),
                false,
            ),
            (ending, true),
        ] {
            let (status, answer) = tight.post(&events, json!({ "events": [event] })).await;
            match (watched, let_through) {
                (true, false) => {
                    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{answer}");
                    assert_eq!(answer["error"]["code"], "disk_low", "{answer}");
                }
                _ => assert_eq!(status, StatusCode::OK, "{backend:?}: {answer}"),
            }
        }
        let (_, record) = tight.get(&format!("/sessions/{session}")).await;
        assert_eq!(record["status"], "idle", "the turn ended: {record}");
        // With no turn open, nor those: what passes is bounded by the turns under way.
        let error = json!({"type": "session.error", "error": {"type": "x", "message": "again"}});
        let (status, answer) = tight.post(&events, json!({ "events": [error] })).await;
        match watched {
            true => assert_eq!(answer["error"]["code"], "disk_low", "{answer}"),
            false => assert_eq!(status, StatusCode::OK, "{backend:?}: {answer}"),
        }
        let (status, answer) = tight
            .call_as(
                &token,
                Method::POST,
                &item_path("stop"),
                Some(json!({"force": true})),
                &worker,
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{backend:?}: {answer}");
        assert_eq!(answer["state"], "stopped", "{answer}");
        let (status, answer) = tight
            .post(&format!("/sessions/{session}/archive"), json!({}))
            .await;
        assert_eq!(status, StatusCode::OK, "{backend:?}: {answer}");
        // The reading is a gauge (of the process: a test's servers share one registry).
        if watched {
            let metrics = tight.http().get(format!("{}/metrics", tight.base));
            let metrics = metrics.send().await.unwrap().text().await.unwrap();
            assert!(
                metrics.contains("\ntether_store_disk_free_bytes "),
                "{metrics}"
            );
        }
        tight.shutdown().await;
        roomy.shutdown().await;
    }
}

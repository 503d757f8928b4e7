//! Where the two prefixes render differently (the `Dialect` table, docs/dialects.md), and the behaviour
//! the official clients rely on under both: the agent update's `version` precondition, reading an old
//! agent version, and filtered event listings that still page correctly.

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use tether_testkit::{each_backend, read, string_fields, TestServer};

async fn get_v1(server: &TestServer, path: &str) -> (StatusCode, Value) {
    let response = server
        .http()
        .get(server.v1(path))
        .bearer_auth(&server.admin_token)
        .send()
        .await
        .unwrap();
    read(response).await
}

#[tokio::test]
async fn agents_render_per_dialect_and_updates_check_the_version() {
    each_backend(async |server| {
        let (status, agent) = server
            .post("/agents", json!({"name": "a", "model": "m-1"}))
            .await;
        assert_eq!(status, StatusCode::OK, "{agent}");
        let id = agent["id"].as_str().unwrap().to_owned();
        // Qoder: as given. Anthropic: a model object and a default execution identity.
        assert_eq!(agent["model"], "m-1");
        assert_eq!(agent["execution_identity"], Value::Null);
        let (_, on_v1) = get_v1(server, &format!("/agents/{id}")).await;
        assert_eq!(on_v1["model"], json!({"id": "m-1"}));
        assert_eq!(
            on_v1["execution_identity"],
            json!({"type": "service_account"})
        );
        // Both: a session's agent is rendered the same way.
        let env = server.self_hosted_environment().await;
        let session = server.session(&env, &id).await;
        let (_, s) = get_v1(server, &format!("/sessions/{session}")).await;
        assert_eq!(s["agent"]["model"], json!({"id": "m-1"}));
        for field in ["resources", "vault_ids", "outcome_evaluations"] {
            assert_eq!(s[field], json!([]), "{field}");
        }
        assert!(s["stats"].is_object() && s["usage"].is_object());

        // A stale `version` changes nothing; the current one applies; none applies unconditionally.
        let (status, err) = server
            .post(
                &format!("/agents/{id}"),
                json!({"version": 2, "description": "x"}),
            )
            .await;
        assert_eq!(status, StatusCode::CONFLICT, "{err}");
        assert_eq!(err["error"]["type"], "conflict_error");
        assert_eq!(err["error"]["param"], "version");
        let (status, bad) = server
            .post(&format!("/agents/{id}"), json!({"version": "1"}))
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}");
        let (_, same) = server.get(&format!("/agents/{id}")).await;
        assert_eq!(
            (same["version"].as_u64(), &same["description"]),
            (Some(1), &Value::Null)
        );
        let (status, v2) = server
            .post(
                &format!("/agents/{id}"),
                json!({"version": 1, "description": "two", "model": {"id": "m-2", "speed": "fast"},
                       "execution_identity": {"type": "aws_role", "role_arn": "arn:x"}}),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{v2}");
        assert_eq!(v2["version"], 2);
        assert_eq!(v2["model"], json!({"id": "m-2", "speed": "fast"}));
        assert_eq!(v2["execution_identity"]["type"], "aws_role");
        let (status, v3) = server
            .post(&format!("/agents/{id}"), json!({"system": "s"}))
            .await;
        assert_eq!((status, v3["version"].as_u64()), (StatusCode::OK, Some(3)));

        // `?version=n` reads what a session pinned to n sees.
        let (status, v1) = server.get(&format!("/agents/{id}?version=1")).await;
        assert_eq!(status, StatusCode::OK, "{v1}");
        assert_eq!(
            (v1["version"].as_u64(), &v1["model"]),
            (Some(1), &json!("m-1"))
        );
        let (status, _) = server.get(&format!("/agents/{id}?version=7")).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        let (status, _) = server.get(&format!("/agents/{id}?version=0")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
    })
    .await;
}

#[tokio::test]
async fn overrides_are_refused_rather_than_dropped() {
    each_backend(async |server| {
        let (env, agent) = server.environment_and_agent().await;
        let (status, err) = server
            .post(
                "/sessions",
                json!({"agent": {"type": "agent_with_overrides", "id": agent, "system": "x"},
                       "environment_id": env}),
            )
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{err}");
        assert_eq!(err["error"]["param"], "agent");
    })
    .await;
}

#[tokio::test]
async fn filtered_event_listings_page_like_unfiltered_ones() {
    each_backend(async |server| {
        let (_env, _agent, session) = server.environment_agent_and_session().await;
        // user.message, session.status_running, then alternating agent.message / agent.thinking
        let message = |text: &str| json!({"type": "user.message", "content": [{"type": "text", "text": text}]});
        let (status, _) = server
            .post(
                &format!("/sessions/{session}/events"),
                json!({"events": [message("go")]}),
            )
            .await;
        assert_eq!(status, StatusCode::OK);
        let mut batch = Vec::new();
        for i in 0..7 {
            batch.push(json!({"type": "agent.message", "content": [{"type": "text", "text": format!("m{i}")}]}));
            batch.push(json!({"type": "agent.thinking"}));
        }
        let (status, posted) = server
            .post(
                &format!("/sessions/{session}/events"),
                json!({"events": batch}),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{posted}");

        // Follow next_page with a filter: every agent.message, in order, nothing else.
        let pages = server
            .pages(&format!(
                "/sessions/{session}/events?limit=3&types%5B%5D=agent.message"
            ))
            .await;
        let mut texts = Vec::new();
        for e in pages.iter().flat_map(|page| page["data"].as_array().unwrap()) {
            assert_eq!(e["type"], "agent.message");
            texts.push(e["content"][0]["text"].as_str().unwrap().to_owned());
        }
        assert_eq!(texts, (0..7).map(|i| format!("m{i}")).collect::<Vec<_>>());
        assert_eq!(pages.len(), 3);

        // Several types (plain repeated form), newest first.
        let (_, body) = server
            .get(&format!("/sessions/{session}/events?types=user.message&types=session.status_running&order=desc"))
            .await;
        let types = string_fields(&body["data"], "type");
        assert_eq!(types, ["session.status_running", "user.message"]);

        // before_id with a filter: the matches immediately before the cursor, in list order.
        let session_id = session.as_str();
        let before = |cursor: String| async move {
            let (_, body) = server
                .get(&format!(
                    "/sessions/{session_id}/events?limit=2&types[]=agent.message&before_id={cursor}"
                ))
                .await;
            let texts: Vec<String> = body["data"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e["content"][0]["text"].as_str().unwrap().to_owned())
                .collect();
            (texts, body)
        };
        let last = posted["data"].as_array().unwrap().last().unwrap()["id"]
            .as_str()
            .unwrap()
            .to_owned();
        let (texts, body) = before(last).await;
        assert_eq!(texts, ["m5", "m6"]);
        // `has_more` looks forward in list order (§1.8): no agent.message follows m6, although
        // earlier ones precede m5.
        assert_eq!(body["has_more"], false);
        assert!(body["next_page"].is_null());
        let (texts, body) = before(posted["data"][10]["id"].as_str().unwrap().to_owned()).await;
        assert_eq!(texts, ["m3", "m4"]);
        assert_eq!(body["has_more"], true, "m5 and m6 follow");

        // A time window that holds nothing, and a type nobody wrote.
        let (_, body) = server
            .get(&format!(
                "/sessions/{session}/events?created_at[lt]=2000-01-01T00:00:00Z"
            ))
            .await;
        assert_eq!(body["data"], json!([]));
        let (_, body) = server
            .get(&format!(
                "/sessions/{session}/events?types[]=agent.mcp_tool_use"
            ))
            .await;
        assert_eq!(
            (body["data"].clone(), body["next_page"].clone()),
            (json!([]), Value::Null)
        );
        let (status, _) = server
            .call(
                Method::GET,
                &format!("/sessions/{session}/events?created_at[gte]=yesterday"),
                None,
            )
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
    })
    .await;
}

//! A first end-to-end pass over the work lifecycle on every backend.

use reqwest::{Method, StatusCode};
use serde_json::json;
use tether_testkit::each_backend;

#[tokio::test]
async fn lifecycle_poll_ack_heartbeat_stop() {
    each_backend(async |server| {
        let (env, _agent, session) = server.environment_agent_and_session().await;
        let item = server.poll_as_worker(&env, "w1", "?block_ms=100").await;
        assert_eq!(item["data"]["id"], json!(session));
        assert!(item["secret"].is_string());
        let id = item["id"].as_str().unwrap().to_owned();
        let acked = server.ack_as_worker(&env, &id, "w1").await;
        assert_eq!(acked["state"], "starting");
        let (status, hb) = server
            .call(
                Method::POST,
                &format!(
                    "/environments/{env}/work/{id}/heartbeat?expected_last_heartbeat=NO_HEARTBEAT"
                ),
                None,
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{hb}");
        assert_eq!(hb["state"], "active");
        let (status, stopped) = server
            .call(
                Method::POST,
                &format!("/environments/{env}/work/{id}/stop"),
                Some(json!({"force": true})),
            )
            .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(stopped["state"], "stopped");
    })
    .await;
}

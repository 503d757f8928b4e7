//! A first end-to-end pass over the work lifecycle on every backend.

use reqwest::{Method, StatusCode};
use serde_json::json;
use tether_testkit::{backends, TestServer};

#[tokio::test]
async fn lifecycle_poll_ack_heartbeat_stop() {
    for backend in backends() {
        let server = TestServer::start(&backend).await;
        let env = server.self_hosted_environment().await;
        let agent = server.agent().await;
        let session = server.session(&env, &agent).await;
        let w = [("Worker-ID", "w1")];
        let (status, item) = server
            .call_as(
                &server.admin_token,
                Method::GET,
                &format!("/environments/{env}/work/poll?block_ms=100"),
                None,
                &w,
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{item}");
        assert_eq!(item["data"]["id"], json!(session));
        assert!(item["secret"].is_string());
        let id = item["id"].as_str().unwrap().to_owned();
        let (status, acked) = server
            .call_as(
                &server.admin_token,
                Method::POST,
                &format!("/environments/{env}/work/{id}/ack"),
                None,
                &w,
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{acked}");
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
        server.shutdown().await;
    }
}

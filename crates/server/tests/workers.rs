//! `GET /environments/{id}/workers` (§11.4): who polled lately, and which live items each one holds.

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use tether_testkit::{backends, TestServer};

async fn poll_as(server: &TestServer, env: &str, worker: &str) -> Value {
    let path = format!("/environments/{env}/work/poll");
    let (status, item) = server
        .call_as(
            &server.admin_token,
            Method::GET,
            &path,
            None,
            &[("Worker-ID", worker)],
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{item}");
    item
}

#[tokio::test]
async fn lists_recent_pollers_with_the_items_they_hold() {
    for backend in backends() {
        let server = TestServer::start(&backend).await;
        let env = server.self_hosted_environment().await;
        let agent = server.agent().await;
        server.session(&env, &agent).await;
        server.session(&env, &agent).await;

        // alpha takes and acks two items, then force-stops one; beta polls an empty queue.
        let mut held = Vec::new();
        for _ in 0..2 {
            let item = poll_as(&server, &env, "alpha").await;
            let id = item["id"].as_str().expect("an item").to_owned();
            let (status, _) = server
                .call_as(
                    &server.admin_token,
                    Method::POST,
                    &format!("/environments/{env}/work/{id}/ack"),
                    None,
                    &[("Worker-ID", "alpha")],
                )
                .await;
            assert_eq!(status, StatusCode::OK);
            held.push(id);
        }
        let (status, _) = server
            .post(
                &format!("/environments/{env}/work/{}/stop", held[1]),
                json!({"force": true}),
            )
            .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(poll_as(&server, &env, "beta").await, Value::Null);

        let (status, listing) = server.get(&format!("/environments/{env}/workers")).await;
        assert_eq!(status, StatusCode::OK, "{listing}");
        let workers = listing["data"].as_array().expect("data");
        let by_id = |name: &str| workers.iter().find(|w| w["worker_id"] == name).cloned();
        let alpha = by_id("alpha").expect("alpha is listed");
        let beta = by_id("beta").expect("beta is listed");
        let alpha_items: Vec<&str> = alpha["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["id"].as_str().unwrap())
            .collect();
        assert_eq!(
            alpha_items,
            vec![held[0].as_str()],
            "only the live item alpha holds ({})",
            backend.name()
        );
        assert_eq!(alpha["items"][0]["state"], "starting");
        assert!(beta["items"].as_array().unwrap().is_empty());
        assert!(alpha["last_poll_at"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z')));
        server.shutdown().await;
    }
}

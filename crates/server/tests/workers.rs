//! `GET /environments/{id}/workers` (§11.4): who polled lately, and which live items each one holds.

use reqwest::StatusCode;
use serde_json::{json, Value};
use tether_server::ServiceConfig;
use tether_testkit::{each_backend, each_backend_with, string_fields, Options};

#[tokio::test]
async fn lists_recent_pollers_with_the_items_they_hold() {
    each_backend(async |server| {
        let (env, agent) = server.environment_and_agent().await;
        server.session(&env, &agent).await;
        server.session(&env, &agent).await;

        // alpha takes and acks two items, then force-stops one; beta polls an empty queue.
        let mut held = Vec::new();
        for _ in 0..2 {
            let item = server.poll_as_worker(&env, "alpha", "").await;
            let id = item["id"].as_str().expect("an item").to_owned();
            server.ack_as_worker(&env, &id, "alpha").await;
            held.push(id);
        }
        let (status, _) = server
            .post(
                &format!("/environments/{env}/work/{}/stop", held[1]),
                json!({"force": true}),
            )
            .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(server.poll_as_worker(&env, "beta", "").await, Value::Null);

        let (status, listing) = server.get(&format!("/environments/{env}/workers")).await;
        assert_eq!(status, StatusCode::OK, "{listing}");
        let workers = listing["data"].as_array().expect("data");
        let by_id = |name: &str| workers.iter().find(|w| w["worker_id"] == name).cloned();
        let alpha = by_id("alpha").expect("alpha is listed");
        let beta = by_id("beta").expect("beta is listed");
        let alpha_items = string_fields(&alpha["items"], "id");
        assert_eq!(
            alpha_items,
            vec![held[0].as_str()],
            "only the live item alpha holds ({})",
            server.backend.name()
        );
        assert_eq!(alpha["items"][0]["state"], "starting");
        assert!(beta["items"].as_array().unwrap().is_empty());
        assert!(alpha["last_poll_at"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z')));
    })
    .await;
}

/// A `Worker-ID` is whatever the poll says, so a caller can make up a new one on every poll: past
/// the cap, the polls are served but their workers are neither recorded nor listed, and workers
/// already recorded go on being recorded.
#[tokio::test]
async fn workers_made_up_past_the_cap_are_not_recorded() {
    let options = Options {
        config: ServiceConfig {
            max_workers_per_environment: 3,
            ..Options::default().config
        },
        ..Options::default()
    };
    each_backend_with(options, async |server| {
        let (env, _agent) = server.environment_and_agent().await;
        for worker in ["w1", "w2", "w3", "w4", "w5"] {
            assert_eq!(server.poll_as_worker(&env, worker, "").await, Value::Null);
        }
        let (status, listing) = server.get(&format!("/environments/{env}/workers")).await;
        assert_eq!(status, StatusCode::OK, "{listing}");
        let mut listed = string_fields(&listing["data"], "worker_id");
        listed.sort();
        assert_eq!(listed, ["w1", "w2", "w3"], "{}", server.backend.name());
        let (_, stats) = server.get(&format!("/environments/{env}/work/stats")).await;
        assert_eq!(stats["workers_polling"], 3, "{stats}");
    })
    .await;
}

//! Poison items and their requeue (Tether extensions: `GET …/work?cause=poison`,
//! `POST …/work/{id}/requeue`), on each backend.

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use tether_testkit::{backends, listed_ids, send_and_read, Backend, Options, TestServer};

/// Default lease (60 s) plus a margin.
const PAST_THE_LEASE_MS: i64 = 61_000;

/// A session's item, delivered and acked, then left to expire with `max_requeues` 0: poison.
async fn poison_item(server: &TestServer, env: &str, agent: &str) -> String {
    server.session(env, agent).await;
    let item = server.poll_as_worker(env, "w1", "").await;
    let id = item["id"].as_str().expect("an item").to_owned();
    server.ack_as_worker(env, &id, "w1").await;
    server.clock.advance_millis(PAST_THE_LEASE_MS);
    let (_, item) = server.get(&format!("/environments/{env}/work/{id}")).await;
    assert_eq!(item["state"], "stopped", "{item}");
    id
}

/// A server whose items turn poison at their first lease expiry, with an environment, an agent and one
/// poison item.
async fn with_a_poison_item(backend: &Backend) -> (TestServer, String, String, String) {
    let mut options = Options::default();
    options.config.lease.max_requeues = 0;
    let server = TestServer::start_with(backend, options).await;
    let (env, agent) = server.environment_and_agent().await;
    let poison = poison_item(&server, &env, &agent).await;
    (server, env, agent, poison)
}

#[tokio::test]
async fn poison_items_are_listed_and_requeued_once() {
    for backend in backends() {
        let (server, env, agent, poison) = with_a_poison_item(&backend).await;
        // A second session's item, stopped by hand: stopped, but not poison.
        server.session(&env, &agent).await;
        let (_, listed) = server.get(&format!("/environments/{env}/work")).await;
        let other = listed_ids(&listed)
            .into_iter()
            .find(|i| *i != poison)
            .unwrap();
        let (status, _) = server
            .post(
                &format!("/environments/{env}/work/{other}/stop"),
                json!({"force": true}),
            )
            .await;
        assert_eq!(status, StatusCode::OK);

        let poisoned = format!("/environments/{env}/work?cause=poison");
        let (status, list) = server.get(&poisoned).await;
        assert_eq!(status, StatusCode::OK, "{list}");
        assert_eq!(
            listed_ids(&list),
            vec![poison.clone()],
            "{}",
            backend.name()
        );
        // The same filter on the other prefix.
        let (status, list) = send_and_read(
            server
                .http()
                .get(server.v1(&poisoned))
                .bearer_auth(&server.admin_token),
        )
        .await;
        assert_eq!(
            (status, listed_ids(&list)),
            (StatusCode::OK, vec![poison.clone()])
        );
        let (status, err) = server
            .get(&format!("/environments/{env}/work?cause=bogus"))
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(err["error"]["param"], "cause", "{err}");

        let requeue = |id: &str| format!("/environments/{env}/work/{id}/requeue");
        let (status, err) = server
            .post(&requeue(&poison), json!({"reason": "x".repeat(501)}))
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{err}");
        let (status, err) = server
            .post(&requeue("work_01jabcdefghjkmnpqrstvwxyz0"), json!({}))
            .await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{err}");

        let (status, fresh) = server
            .post(&requeue(&poison), json!({"reason": "fixed"}))
            .await;
        assert_eq!(status, StatusCode::OK, "{fresh}");
        assert_eq!(fresh["state"], "queued");
        let fresh_id = fresh["id"].as_str().unwrap().to_owned();
        assert_ne!(fresh_id, poison);
        let (_, list) = server.get(&poisoned).await;
        assert!(
            listed_ids(&list).is_empty(),
            "requeued items leave the list"
        );

        // Once only; never a live item; and the session's live item blocks a requeue of another.
        let (status, err) = server.post(&requeue(&poison), json!({})).await;
        assert_eq!(status, StatusCode::CONFLICT, "{err}");
        assert!(err["error"]["message"]
            .as_str()
            .unwrap()
            .contains("another requeue"));
        let (status, _) = server.post(&requeue(&fresh_id), json!({})).await;
        assert_eq!(status, StatusCode::CONFLICT);

        // The fresh item is claimable: a poll takes it.
        let poll = {
            let http = server.http().clone();
            let url = server.url(&format!("/environments/{env}/work/poll?block_ms=999"));
            let token = server.admin_token.clone();
            tokio::spawn(async move {
                http.get(url)
                    .bearer_auth(token)
                    .send()
                    .await
                    .unwrap()
                    .json::<Value>()
                    .await
                    .unwrap()
            })
        };
        let claimed = tokio::time::timeout(Duration::from_secs(30), poll)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(claimed["id"], fresh_id.as_str());
        server.shutdown().await;
    }
}

#[tokio::test]
async fn only_an_admin_may_requeue() {
    for backend in backends() {
        let (server, env, _agent, poison) = with_a_poison_item(&backend).await;
        let (status, key) = server
            .post(&format!("/environments/{env}/keys"), json!({}))
            .await;
        assert_eq!(status, StatusCode::OK, "{key}");
        let key = key["token"].as_str().unwrap().to_owned();
        let path = format!("/environments/{env}/work/{poison}/requeue");
        let (status, _) = server
            .call_as(&key, Method::POST, &path, Some(json!({})), &[])
            .await;
        assert_eq!(status, StatusCode::FORBIDDEN);
        // The key may list them, though: it sees its own queue.
        let (status, list) = server
            .call_as(
                &key,
                Method::GET,
                &format!("/environments/{env}/work?cause=poison"),
                None,
                &[],
            )
            .await;
        assert_eq!((status, listed_ids(&list)), (StatusCode::OK, vec![poison]));
        server.shutdown().await;
    }
}

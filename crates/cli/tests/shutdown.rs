//! Graceful shutdown of `tether serve`: on SIGTERM a blocked long poll is answered `null` at once, the
//! process exits 0 within a bounded time, and what it answered before is still there afterwards.

mod support;

use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{json, Value};
use support::api::Api;
use support::ServerProcess;
use tether_testkit::json_of;

#[tokio::test]
async fn sigterm_answers_blocked_polls_and_exits_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = ServerProcess::start(dir.path(), &[]);
    let http = reqwest::Client::new();
    let env = Api::of(&server)
        .ok(
            Method::POST,
            "/environments",
            json!({"name": "drain", "config": {"type": "self_hosted"}}),
        )
        .await;
    let env_id = env["id"].as_str().unwrap().to_owned();

    // Several polls blocked on an empty queue.
    let mut polls = Vec::new();
    for i in 0..8 {
        let (http, url, token) = (
            http.clone(),
            server.url(&format!("/environments/{env_id}/work/poll?block_ms=999")),
            server.token.clone(),
        );
        polls.push(tokio::spawn(async move {
            let resp = http
                .get(url)
                .bearer_auth(token)
                .header("Worker-ID", format!("w{i}"))
                .send()
                .await
                .unwrap();
            (resp.status().as_u16(), resp.text().await.unwrap())
        }));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let signalled = Instant::now();
    let status = tokio::task::spawn_blocking(move || {
        let status = server.terminate();
        (status, server)
    });
    for poll in polls {
        let (code, body) = poll.await.unwrap();
        assert_eq!(code, 200);
        assert_eq!(
            body.trim(),
            "null",
            "a blocked poll is answered with null on shutdown"
        );
    }
    let (exit, _server) = status.await.unwrap();
    println!(
        "polls answered and process exited {:?} after SIGTERM",
        signalled.elapsed()
    );
    assert!(
        exit.success(),
        "tether serve exits 0 after SIGTERM: {exit:?}"
    );

    // The environment written before the shutdown is still there.
    let server = ServerProcess::start(dir.path(), &[]);
    let resp = server
        .admin_get(&http, &format!("/environments/{env_id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
}

#[tokio::test]
async fn metrics_health_and_readiness() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path(), &[]);
    let http = reqwest::Client::new();
    // Generate some traffic, including an error.
    let _ = http.get(server.url("/environments")).send().await.unwrap();
    let _ = server
        .admin_get(&http, "/environments")
        .send()
        .await
        .unwrap();
    let api = Api::of(&server);
    let agent = api
        .ok(Method::POST, "/agents", json!({"name": "m", "model": "m"}))
        .await;
    // A session on a self-hosted environment enqueues a work item: an `enqueued` transition.
    let env = api
        .ok(
            Method::POST,
            "/environments",
            json!({"name": "m", "config": {"type": "self_hosted"}}),
        )
        .await;
    api.ok(
        Method::POST,
        "/sessions",
        json!({"agent": agent["id"], "environment_id": env["id"]}),
    )
    .await;
    let health = http
        .get(format!("{}/healthz", server.base))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    let ready: Value = json_of(http.get(format!("{}/readyz", server.base))).await;
    assert_eq!(ready["store"], "sqlite");
    let metrics = http
        .get(format!("{}/metrics", server.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for series in [
        "tether_http_requests_total",
        "tether_http_request_duration_seconds",
        "tether_store_commit_duration_seconds",
        "tether_long_poll_waiters",
    ] {
        assert!(
            metrics.contains(series),
            "/metrics lacks {series}:\n{metrics}"
        );
    }
    assert!(
        metrics.contains("status=\"401\""),
        "request counts carry the status"
    );
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("tether_work_transitions_total{cause=\"enqueued\"} 1")),
        "work transitions are counted by cause, enqueues included:\n{metrics}"
    );
}

#[test]
fn a_data_directory_serves_one_process() {
    let dir = tempfile::tempdir().unwrap();
    let _first = ServerProcess::start(dir.path(), &[]);
    let second = std::process::Command::new(env!("CARGO_BIN_EXE_tether"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .output()
        .expect("run a second tether serve");
    assert!(
        !second.status.success(),
        "a second server on one data directory must refuse to start"
    );
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(
        stderr.contains("another `tether serve` is using"),
        "{stderr}"
    );
}

//! Durability: `kill -9` the server while it is answering writes, restart it, and check that every write
//! it answered with 200 is there. Runs several kill/restart cycles on one store, on each backend: the
//! embedded SQLite store, and PostgreSQL (under `TETHER_TEST_POSTGRES_URL`, mandatory under CI). The
//! moment of each kill is drawn from a seed that is printed; `TETHER_CHAOS_SEED=<n>` replays it.

mod support;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use support::seed::Rng;
use support::ServerProcess;
use tether_testkit::json_of;

const CYCLES: usize = 3;
const WRITERS: usize = 16;

async fn post(
    client: &reqwest::Client,
    server_url: &str,
    token: &str,
    body: Value,
) -> Option<Value> {
    let resp = client
        .post(server_url)
        .bearer_auth(token)
        .json(&body)
        .send()
        .await
        .ok()?;
    if resp.status() != 200 {
        return None;
    }
    resp.json().await.ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn answered_writes_survive_kill_dash_nine() {
    kill_nine_cycles(&[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn answered_writes_survive_kill_dash_nine_on_postgres() {
    let Some(admin_url) = std::env::var("TETHER_TEST_POSTGRES_URL")
        .ok()
        .filter(|u| !u.is_empty())
    else {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must run the PostgreSQL crash test: set TETHER_TEST_POSTGRES_URL"
        );
        eprintln!("skipped: set TETHER_TEST_POSTGRES_URL (e.g. `scripts/pg start`)");
        return;
    };
    let url = tether_testkit::postgres::create_test_database(&admin_url)
        .await
        .expect("a fresh test database");
    kill_nine_cycles(&["--database", &url]).await;
}

/// Kills the server (started with `extra`) at random moments under concurrent writes, `CYCLES` times.
async fn kill_nine_cycles(extra: &[&str]) {
    let mut rng = Rng::from_env();
    let dir = tempfile::tempdir().unwrap();
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    // session id → the metadata value last answered for it
    let acknowledged: Arc<Mutex<BTreeMap<String, String>>> = Arc::default();
    let mut env_and_agent: Option<(String, String)> = None;
    for cycle in 0..CYCLES {
        let mut server = ServerProcess::start(dir.path(), extra);
        let (env, agent) = match &env_and_agent {
            Some(ids) => ids.clone(),
            None => {
                let env = post(
                    &client,
                    &server.url("/environments"),
                    &server.token,
                    json!({"name": "crash", "config": {"type": "self_hosted"}}),
                )
                .await
                .unwrap();
                let agent = post(
                    &client,
                    &server.url("/agents"),
                    &server.token,
                    json!({"name": "crash", "model": "m"}),
                )
                .await
                .unwrap();
                let ids = (
                    env["id"].as_str().unwrap().to_owned(),
                    agent["id"].as_str().unwrap().to_owned(),
                );
                env_and_agent = Some(ids.clone());
                ids
            }
        };
        // Everything answered before this restart must be readable now.
        let answered_so_far = acknowledged.lock().unwrap().clone();
        verify(&client, &server, &answered_so_far).await;

        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut writers = Vec::new();
        for w in 0..WRITERS {
            let (client, url, token) = (client.clone(), server.url(""), server.token.clone());
            let (env, agent, acked, stop) = (
                env.clone(),
                agent.clone(),
                acknowledged.clone(),
                stop.clone(),
            );
            writers.push(tokio::spawn(async move {
                let mut n = 0u64;
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    n += 1;
                    let value = format!("c{cycle}-w{w}-n{n}");
                    let body =
                        json!({"agent": agent, "environment_id": env, "metadata": {"v": value}});
                    if let Some(s) = post(&client, &format!("{url}/sessions"), &token, body).await {
                        let id = s["id"].as_str().unwrap().to_owned();
                        acked.lock().unwrap().insert(id.clone(), value.clone());
                        // An update of an existing record, answered or not.
                        let patched = format!("{value}-patched");
                        if post(
                            &client,
                            &format!("{url}/sessions/{id}"),
                            &token,
                            json!({"metadata": {"v": patched}}),
                        )
                        .await
                        .is_some()
                        {
                            acked.lock().unwrap().insert(id, patched);
                        }
                    }
                }
            }));
        }
        let run_for = rng.millis(500, 1_500);
        println!("cycle {cycle}: kill -9 after {run_for:?} of writes");
        tokio::time::sleep(run_for).await;
        server.kill_hard();
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        for w in writers {
            w.await.unwrap();
        }
        println!(
            "cycle {cycle}: {} writes acknowledged so far",
            acknowledged.lock().unwrap().len()
        );
    }
    let server = ServerProcess::start(dir.path(), extra);
    let acked = acknowledged.lock().unwrap().clone();
    assert!(
        acked.len() > 50,
        "the load produced too few writes to mean anything: {}",
        acked.len()
    );
    verify(&client, &server, &acked).await;
    // Each session's work item was enqueued in the same write as the session itself.
    let (env, _) = env_and_agent.unwrap();
    let mut with_items = std::collections::HashSet::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut path = format!("/environments/{env}/work?limit=100");
        if let Some(c) = &cursor {
            path.push_str(&format!("&page={c}"));
        }
        let page: Value = json_of(server.admin_get(&client, &path)).await;
        for item in page["data"].as_array().unwrap() {
            with_items.insert(item["data"]["id"].as_str().unwrap().to_owned());
        }
        match page["next_page"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => break,
        }
    }
    for id in acked.keys() {
        assert!(with_items.contains(id), "session {id} lost its work item");
    }
    println!(
        "verified {} acknowledged writes across {CYCLES} kill -9 cycles",
        acked.len()
    );
}

/// Every acknowledged session exists with its last acknowledged metadata value — or a later one that was
/// written but whose answer was lost to the kill (the value is then this writer's own `-patched` form).
async fn verify(
    client: &reqwest::Client,
    server: &ServerProcess,
    acked: &BTreeMap<String, String>,
) {
    for (id, value) in acked {
        let resp = server
            .admin_get(client, &format!("/sessions/{id}"))
            .send()
            .await
            .unwrap();
        assert_eq!(
            resp.status(),
            200,
            "acknowledged session {id} is missing after a restart"
        );
        let session: Value = resp.json().await.unwrap();
        let stored = session["metadata"]["v"].as_str().unwrap();
        assert!(
            stored == value || stored == format!("{value}-patched"),
            "session {id}: acknowledged metadata {value:?}, found {stored:?}"
        );
    }
}

//! Conformance under concurrency over real HTTP (§3.1 "every state change is a single atomic
//! compare-and-swap"): concurrent polls never share an item, concurrent acks and heartbeats have exactly
//! one winner. Each test runs once per backend; the server runs on a multi-threaded runtime so that
//! requests really overlap.

mod conformance;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use conformance::*;
use futures::future::join_all;

const ITEMS: usize = 1_000;
const POLLERS: usize = 32;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_pollers_never_share_an_item() {
    each_backend(async |server| {
        let q = Queue::new(server).await;
        let started = Instant::now();
        for chunk in (0..ITEMS).collect::<Vec<_>>().chunks(16) {
            join_all(chunk.iter().map(|_| async {
                let body = json!({"agent": q.agent, "environment_id": q.env});
                req(server, Method::POST, "/sessions")
                    .json(body)
                    .send()
                    .await
                    .ok();
            }))
            .await;
        }
        println!(
            "[{}] enqueued {ITEMS} items in {:?}",
            server.backend.name(),
            started.elapsed()
        );
        assert_eq!(q.stats().await["depth"], ITEMS as u64);

        // Every poller polls until the queue is empty; no delivery may be reclaimed meanwhile.
        let delivered: Mutex<Vec<(String, usize)>> = Mutex::new(Vec::new());
        let empty_answers = AtomicUsize::new(0);
        let deadline = Instant::now() + Duration::from_secs(120);
        let started = Instant::now();
        join_all((0..POLLERS).map(|p| {
            let q = &q;
            let delivered = &delivered;
            let empty_answers = &empty_answers;
            async move {
                let worker = format!("poller-{p}");
                loop {
                    assert!(
                        Instant::now() < deadline,
                        "pollers did not drain the queue in time"
                    );
                    let reply = q
                        .poll("?reclaim_older_than_ms=3600000", Some(&worker))
                        .await;
                    match reply.ok() {
                        Value::Null => {
                            empty_answers.fetch_add(1, Ordering::Relaxed);
                            if delivered.lock().unwrap().len() >= ITEMS
                                || q.stats().await["depth"] == 0
                            {
                                return;
                            }
                        }
                        item => {
                            assert_eq!(item["state"], "queued");
                            assert_eq!(
                                item["delivery_count"], 1,
                                "first delivery of every item: {item}"
                            );
                            delivered
                                .lock()
                                .unwrap()
                                .push((item["id"].as_str().unwrap().to_owned(), p));
                        }
                    }
                }
            }
        }))
        .await;
        let elapsed = started.elapsed();
        let delivered = delivered.into_inner().unwrap();
        println!(
            "[{}] {POLLERS} pollers took {} deliveries in {elapsed:?} ({:.0}/s); {} empty answers",
            server.backend.name(),
            delivered.len(),
            delivered.len() as f64 / elapsed.as_secs_f64(),
            empty_answers.load(Ordering::Relaxed)
        );

        let mut per_item: HashMap<&str, Vec<usize>> = HashMap::new();
        for (id, poller) in &delivered {
            per_item.entry(id.as_str()).or_default().push(*poller);
        }
        let twice: Vec<_> = per_item.iter().filter(|(_, p)| p.len() > 1).collect();
        assert!(
            twice.is_empty(),
            "items delivered more than once: {twice:?}"
        );
        assert_eq!(delivered.len(), ITEMS, "every item delivered exactly once");
        let mut listed = HashSet::new();
        let mut cursor = String::new();
        loop {
            let page = q
                .req(Method::GET, &q.path(&format!("?limit=100{cursor}")))
                .send()
                .await
                .ok()
                .clone();
            for item in page["data"].as_array().unwrap() {
                assert_eq!(item["delivery_count"], 1);
                listed.insert(item["id"].as_str().unwrap().to_owned());
            }
            match page["next_page"].as_str() {
                Some(next) => cursor = format!("&page={next}"),
                None => break,
            }
        }
        assert_eq!(
            listed,
            per_item
                .keys()
                .map(|k| k.to_string())
                .collect::<HashSet<_>>()
        );
        let stats = q.stats().await;
        assert_eq!(
            (stats["depth"].as_u64(), stats["pending"].as_u64()),
            (Some(0), Some(ITEMS as u64)),
            "{stats}"
        );
        let workers = per_item.values().flatten().collect::<HashSet<_>>().len();
        println!(
            "[{}] {workers} of {POLLERS} pollers got at least one item",
            server.backend.name()
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_acks_have_one_winner() {
    each_backend(async |server| {
        let q = Queue::new(server).await;
        for round in 0..10 {
            let item = q.enqueue().await;
            if round % 2 == 1 {
                // Delivered anonymously: no recorded worker, so only the race decides.
                assert_eq!(q.poll("", None).await.ok()["id"], item.id.as_str());
            }
            let replies = join_all((0..8).map(|w| {
                let q = &q;
                let id = item.id.clone();
                async move { (format!("w{w}"), q.ack(&id, Some(&format!("w{w}"))).await) }
            }))
            .await;
            let winners: Vec<&String> = replies
                .iter()
                .filter(|(_, r)| r.status == StatusCode::OK)
                .map(|(w, _)| w)
                .collect();
            assert_eq!(
                winners.len(),
                1,
                "round {round}: {:?}",
                replies
                    .iter()
                    .map(|(w, r)| (w, r.status))
                    .collect::<Vec<_>>()
            );
            for (_, reply) in replies.iter().filter(|(_, r)| r.status != StatusCode::OK) {
                reply.error(409, "invalid_request_error");
            }
            let winner = winners[0];
            assert_eq!(
                q.causes(&item.id)
                    .await
                    .iter()
                    .filter(|c| *c == "acked")
                    .count(),
                1
            );
            // The winner owns the lease: its heartbeat passes, any loser's fails (D-7b).
            let loser = if winner == "w0" { "w1" } else { "w0" };
            let stolen = q.heartbeat_as(&item.id, loser).await;
            stolen.error(412, "precondition_failed_error");
            let owned = q.heartbeat_as(&item.id, winner).await;
            assert_eq!(owned.ok()["state"], "active");
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_heartbeats_with_one_token_have_one_winner() {
    each_backend(async |server| {
        let q = Queue::new(server).await;
        for round in 0..10 {
            // Half the rounds race for the first heartbeat, half for a later one.
            let item = if round % 2 == 0 {
                q.item_in("starting").await
            } else {
                q.item_in("active").await
            };
            let expected = match &item.last_heartbeat {
                None => "NO_HEARTBEAT".to_owned(),
                Some(t) => form_urlencoded::byte_serialize(t.as_bytes()).collect(),
            };
            let query = format!("?expected_last_heartbeat={expected}");
            let replies = join_all((0..8).map(|_| q.heartbeat(&item.id, &query))).await;
            let ok: Vec<&Reply> = replies
                .iter()
                .filter(|r| r.status == StatusCode::OK)
                .collect();
            assert_eq!(
                ok.len(),
                1,
                "round {round}: {:?}",
                replies.iter().map(|r| r.status).collect::<Vec<_>>()
            );
            for reply in replies.iter().filter(|r| r.status != StatusCode::OK) {
                let error = reply.error(412, "precondition_failed_error");
                assert_eq!(error["details"]["current_state"]["state"], "active");
            }
            let winner = ok[0].body["last_heartbeat"].clone();
            let item_now = q.get(&item.id).await;
            assert_eq!(
                item_now["latest_heartbeat_at"], winner,
                "the stored token is the winner's"
            );
            let history = q
                .req(Method::GET, &q.item_path(&item.id, "/history"))
                .send()
                .await;
            let expected_count = if round % 2 == 0 { 1 } else { 2 };
            assert_eq!(
                history.ok()["heartbeat_count"],
                expected_count,
                "losers were not counted"
            );
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_stops_and_acks_leave_a_consistent_item() {
    each_backend(async |server| {
        let q = Queue::new(server).await;
        for round in 0..10 {
            let item = q.enqueue().await;
            let id = item.id.clone();
            let (acks, stops) = tokio::join!(
                join_all((0..4).map(|w| {
                    let q = &q;
                    let id = id.clone();
                    async move { q.ack(&id, Some(&format!("w{w}"))).await }
                })),
                join_all((0..4).map(|_| q.stop(&id, json!({"force": true}))))
            );
            let stop_ok = stops.iter().filter(|r| r.status == StatusCode::OK).count();
            assert_eq!(
                stop_ok, 1,
                "round {round}: exactly one force stop applies, the rest find it stopped"
            );
            for r in stops
                .iter()
                .chain(acks.iter())
                .filter(|r| r.status != StatusCode::OK)
            {
                r.error(409, "invalid_request_error");
            }
            let acks_ok = acks.iter().filter(|r| r.status == StatusCode::OK).count();
            assert!(acks_ok <= 1, "round {round}: {acks_ok} acks won");
            let now = q.get(&id).await;
            assert_eq!(now["state"], "stopped");
            assert_invariants(&now);
            let causes = q.causes(&id).await;
            assert_eq!(
                causes.iter().filter(|c| *c == "acked").count(),
                acks_ok,
                "{causes:?}"
            );
            assert_eq!(causes.last().map(String::as_str), Some("force_stopped"));
        }
    })
    .await;
}

/// A session created while its environment is deleted or archived: either the session wins (and the
/// delete answers 409, the archive leaves it in place) or the environment change wins (and the create
/// answers 404 or 400). Never both, which would leave a session, and a queued item, in an environment
/// that is gone or takes no new sessions.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sessions_created_during_environment_delete_or_archive_never_outlive_it() {
    const ROUNDS: usize = 40;
    const CREATORS: usize = 4;
    for backend in backends() {
        let server = TestServer::start(&backend).await;
        let agent = server.agent().await;
        for round in 0..ROUNDS {
            let env = server.self_hosted_environment().await;
            let archive = round % 2 == 1;
            let creates = join_all((0..CREATORS).map(|_| {
                req(&server, Method::POST, "/sessions")
                    .json(json!({"agent": agent, "environment_id": env}))
                    .send()
            }));
            let change = async {
                if archive {
                    req(
                        &server,
                        Method::POST,
                        &format!("/environments/{env}/archive"),
                    )
                    .send()
                    .await
                } else {
                    req(&server, Method::DELETE, &format!("/environments/{env}"))
                        .send()
                        .await
                }
            };
            let (creates, change) = tokio::join!(creates, change);
            let created: Vec<&Value> = creates
                .iter()
                .filter(|r| r.status == StatusCode::OK)
                .map(|r| &r.body)
                .collect();
            for refused in creates.iter().filter(|r| r.status != StatusCode::OK) {
                let (status, kind) = if archive {
                    (400, "invalid_request_error")
                } else {
                    (404, "not_found_error")
                };
                refused.error(status, kind);
            }
            let label = format!("[{}] round {round}", backend.name());
            if archive {
                change.ok();
                let env_doc = req(&server, Method::GET, &format!("/environments/{env}"))
                    .send()
                    .await;
                let archived_at = env_doc.ok()["archived_at"].as_str().unwrap().to_owned();
                for session in created {
                    assert!(
                        session["created_at"].as_str().unwrap() <= archived_at.as_str(),
                        "{label}: session {} created after its environment was archived",
                        session["id"]
                    );
                }
            } else if change.status == StatusCode::OK {
                let ids: Vec<&Value> = created.iter().map(|s| &s["id"]).collect();
                assert!(
                    ids.is_empty(),
                    "{label}: the environment was deleted, yet sessions were created in it: {ids:?}"
                );
            } else {
                change.error(409, "invalid_request_error");
                assert!(!created.is_empty(), "{label}: 409 without any session");
            }
        }
    }
}

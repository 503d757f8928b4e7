//! Conformance of the work queue's behaviour over real HTTP (§5.1–§5.4, §6, §11.2, §3.1): every cell of
//! the state tables, leases and their expiry, long polling, reclaim, statistics, history and amnesty.
//! Each test runs once per backend.

mod conformance;

use std::time::{Duration, Instant};

use conformance::*;
use tether_core::lease::LeaseKeeperMark;
use tether_store::{ChangeSet, Write};

/// Options whose dispatcher tick never comes round during a test, so that anything that happens when
/// the clock jumps is the work of the request itself (lazy expiry, §3.1), not of the periodic pass.
fn without_tick() -> Options {
    let mut options = Options::default();
    options.config.tick = Duration::from_secs(3600);
    options
}

const LEASE_MS: i64 = 60_000;

/// Lets the dispatcher pass that an ack or stop asked for run before the clock is moved, so that the
/// next request finds the lapsed lease itself.
async fn settle() {
    tokio::time::sleep(Duration::from_millis(50)).await;
}

fn enc(text: &str) -> String {
    form_urlencoded::byte_serialize(text.as_bytes()).collect()
}

#[tokio::test]
async fn poll_selects_only_queued_items() {
    each_backend(async |server| {
        let q = Queue::new(server).await;
        for state in ["starting", "active", "stopping", "stopped"] {
            q.item_in(state).await;
        }
        let none = q.poll("", Some("w1")).await;
        assert_eq!(none.ok(), &Value::Null, "no queued item: poll answers null");
        assert!(none
            .header("content-type")
            .is_some_and(|c| c.starts_with("application/json")));

        let fresh = q.enqueue().await;
        let got = q.poll("", Some("w1")).await;
        let item = got.ok();
        assert_eq!(item["id"], fresh.id.as_str());
        assert_eq!(item["type"], "work");
        assert_eq!(item["state"], "queued", "a delivery leaves the state alone");
        assert_eq!(item["environment_id"], q.env.as_str());
        assert_eq!(
            item["data"],
            json!({"type": "session", "id": fresh.session})
        );
        for stamp in [
            "acknowledged_at",
            "started_at",
            "latest_heartbeat_at",
            "stop_requested_at",
            "stopped_at",
        ] {
            assert!(item[stamp].is_null(), "{stamp} on a polled item: {item}");
        }
        assert_eq!(item["delivery_count"], 1);
        assert_eq!(item["requeue_count"], 0);
        let (token, base) = decode_secret(item);
        assert!(token.starts_with("tth_ses_"), "{token}");
        assert_eq!(base, server.url(""));
        assert_invariants(item);

        // `secret` appears on poll responses only.
        assert!(q.get(&fresh.id).await["secret"].is_null());
        let list = q.req(Method::GET, &q.path("")).send().await;
        assert!(list.ok()["data"]
            .as_array()
            .unwrap()
            .iter()
            .all(|i| i["secret"].is_null()));

        // A delivered item is not handed out again while its delivery is fresh.
        assert_eq!(q.poll("", Some("w2")).await.ok(), &Value::Null);
    })
    .await;
}

#[tokio::test]
async fn ack_in_every_state() {
    each_backend(async |server| {
        let q = Queue::new(server).await;

        // queued → starting, with a provisional lease.
        let item = q.item_in("queued").await;
        let acked = q.ack(&item.id, None).await;
        let acked = acked.ok();
        assert_eq!(acked["state"], "starting");
        assert!(!acked["acknowledged_at"].is_null());
        assert!(acked["started_at"].is_null());
        assert!(acked["secret"].is_null());
        assert_invariants(acked);

        // starting and active: a repeated ack is a safe retry that changes nothing.
        for state in ["starting", "active"] {
            let item = q.item_in(state).await;
            let before = q.get(&item.id).await;
            let again = q.ack(&item.id, None).await;
            assert_eq!(again.ok(), &before, "ack on {state} is idempotent");
            assert_eq!(q.get(&item.id).await, before);
        }

        // stopping and stopped: 409, no side effect.
        for state in ["stopping", "stopped"] {
            let item = q.item_in(state).await;
            let before = q.get(&item.id).await;
            let refused = q.ack(&item.id, None).await;
            refused.error(409, "invalid_request_error");
            assert_eq!(
                q.get(&item.id).await,
                before,
                "a refused ack on {state} changes nothing"
            );
        }
    })
    .await;
}

#[tokio::test]
async fn ack_checks_the_recorded_worker() {
    each_backend(async |server| {
        let q = Queue::new(server).await;

        // queued, delivered to w1: a different Worker-ID is refused, the same one wins.
        let item = q.enqueue().await;
        assert_eq!(q.poll("", Some("w1")).await.ok()["id"], item.id.as_str());
        q.ack(&item.id, Some("w2"))
            .await
            .error(409, "invalid_request_error");
        assert_eq!(
            q.state(&item.id).await,
            "queued",
            "the refused ack left it queued"
        );
        assert_eq!(q.ack(&item.id, Some("w1")).await.ok()["state"], "starting");

        // starting, owned by w1: same worker or no header is a retry; another worker is refused.
        assert_eq!(q.ack(&item.id, Some("w1")).await.ok()["state"], "starting");
        assert_eq!(q.ack(&item.id, None).await.ok()["state"], "starting");
        q.ack(&item.id, Some("w2"))
            .await
            .error(409, "invalid_request_error");

        // active, owned by w1.
        q.heartbeat(&item.id, "").await.ok();
        q.ack(&item.id, Some("w2"))
            .await
            .error(409, "invalid_request_error");
        assert_eq!(q.ack(&item.id, Some("w1")).await.ok()["state"], "active");

        // stopping and stopped refuse every worker, the owner included.
        q.stop(&item.id, json!({})).await.ok();
        q.ack(&item.id, Some("w1"))
            .await
            .error(409, "invalid_request_error");
        q.ack(&item.id, Some("w2"))
            .await
            .error(409, "invalid_request_error");
        q.stop(&item.id, json!({})).await.ok();
        q.ack(&item.id, Some("w1"))
            .await
            .error(409, "invalid_request_error");

        // Never delivered: any worker may claim it by acking (D-6).
        let undelivered = q.enqueue().await;
        assert_eq!(
            q.ack(&undelivered.id, Some("w9")).await.ok()["state"],
            "starting"
        );

        // Delivered to nobody in particular (no header on poll): any ack wins (D-6).
        let anonymous = q.enqueue().await;
        assert_eq!(q.poll("", None).await.ok()["id"], anonymous.id.as_str());
        assert_eq!(
            q.ack(&anonymous.id, Some("w7")).await.ok()["state"],
            "starting"
        );

        // An anonymous ack of a delivery to w1 makes w1 the owner: the D-7b guard then protects it.
        let adopted = q.enqueue().await;
        assert_eq!(q.poll("", Some("w1")).await.ok()["id"], adopted.id.as_str());
        assert_eq!(q.ack(&adopted.id, None).await.ok()["state"], "starting");
        let foreign = q
            .req(
                Method::POST,
                &q.item_path(
                    &adopted.id,
                    "/heartbeat?expected_last_heartbeat=NO_HEARTBEAT",
                ),
            )
            .worker("w2")
            .send()
            .await;
        let error = foreign.error(412, "precondition_failed_error");
        assert_eq!(error["details"]["current_state"]["state"], "starting");
        let own = q
            .req(
                Method::POST,
                &q.item_path(
                    &adopted.id,
                    "/heartbeat?expected_last_heartbeat=NO_HEARTBEAT",
                ),
            )
            .worker("w1")
            .send()
            .await;
        assert_eq!(own.ok()["state"], "active");
    })
    .await;
}

#[tokio::test]
async fn get_and_metadata_in_every_state() {
    each_backend(async |server| {
        let q = Queue::new(server).await;
        for state in STATES {
            let item = q.item_in(state).await;
            let got = q.get(&item.id).await;
            assert_eq!(got["state"], state);
            assert_eq!(got["id"], item.id.as_str());
            assert!(got["secret"].is_null());
            assert_invariants(&got);

            let patched = q
                .patch_metadata(&item.id, json!({"where": state, "n": "1"}))
                .await;
            let patched = patched.ok();
            assert_eq!(
                patched["metadata"],
                json!({"where": state, "n": "1"}),
                "metadata merges in {state} (D-10)"
            );
            assert_eq!(
                patched["state"], state,
                "a metadata update never moves the item"
            );
            let patched = q.patch_metadata(&item.id, json!({"n": null})).await;
            assert_eq!(patched.ok()["metadata"], json!({"where": state}));
            let mut expected = got.clone();
            expected["metadata"] = json!({"where": state});
            assert_eq!(q.get(&item.id).await, expected, "only metadata changed");
        }
    })
    .await;
}

#[tokio::test]
async fn metadata_merge_patch_and_limits() {
    each_backend(async |server| {
        let q = Queue::new(server).await;

        // The item's metadata is a snapshot of the session's at enqueue time (§7.3 rule 4).
        let item = q
            .enqueue_with(json!({"metadata": {"job": "daily", "team": "infra"}}))
            .await;
        assert_eq!(
            q.get(&item.id).await["metadata"],
            json!({"job": "daily", "team": "infra"})
        );
        let later = req(server, Method::POST, &format!("/sessions/{}", item.session))
            .json(json!({"metadata": {"job": "weekly"}}))
            .send()
            .await;
        later.ok();
        assert_eq!(
            q.get(&item.id).await["metadata"]["job"],
            "daily",
            "session edits do not propagate"
        );

        // Upsert, delete, leave others untouched.
        let reply = q
            .patch_metadata(&item.id, json!({"job": "hourly", "team": null, "new": "x"}))
            .await;
        assert_eq!(reply.ok()["metadata"], json!({"job": "hourly", "new": "x"}));
        // Deleting an absent key is fine.
        assert_eq!(
            q.patch_metadata(&item.id, json!({"ghost": null}))
                .await
                .ok()["metadata"],
            json!({"job": "hourly", "new": "x"})
        );
        // Omitted or null `metadata`: nothing changes, the item is returned.
        for body in [json!({}), json!({"metadata": null})] {
            let reply = q
                .req(Method::POST, &q.item_path(&item.id, ""))
                .json(body)
                .send()
                .await;
            assert_eq!(reply.ok()["metadata"], json!({"job": "hourly", "new": "x"}));
        }
        let reply = q.req(Method::POST, &q.item_path(&item.id, "")).send().await;
        assert_eq!(
            reply.ok()["metadata"],
            json!({"job": "hourly", "new": "x"}),
            "no body at all"
        );

        // Limits: 16 keys, keys ≤ 64 and values ≤ 512 Unicode scalar values.
        let fresh = q.enqueue().await;
        let sixteen: serde_json::Map<String, Value> =
            (0..16).map(|i| (format!("k{i:02}"), json!("v"))).collect();
        assert_eq!(
            q.patch_metadata(&fresh.id, Value::Object(sixteen.clone()))
                .await
                .ok()["metadata"]
                .as_object()
                .unwrap()
                .len(),
            16
        );
        // The limit applies to the merged map: a 17th key is refused, a swap is fine.
        q.patch_metadata(&fresh.id, json!({"extra": "v"}))
            .await
            .bad_param("metadata");
        let swapped = q
            .patch_metadata(&fresh.id, json!({"extra": "v", "k00": null}))
            .await;
        let swapped = swapped.ok();
        assert!(swapped["metadata"].get("k00").is_none() && swapped["metadata"]["extra"] == "v");
        assert_eq!(
            q.get(&fresh.id).await["metadata"]
                .as_object()
                .unwrap()
                .len(),
            16,
            "the refused patch changed nothing"
        );

        let other = q.enqueue().await;
        let ok_key = "é".repeat(64);
        let ok_value = "ü".repeat(512);
        q.patch_metadata(&other.id, json!({ ok_key.clone(): ok_value.clone() }))
            .await
            .ok();
        for bad in [
            json!({ "é".repeat(65): "v" }),
            json!({ "k": "ü".repeat(513) }),
            json!({ "": "v" }),
            json!({ "k": 1 }),
            json!({ "k": true }),
            json!({ "k": {"nested": "x"} }),
            json!({ "k": ["a"] }),
            json!("not-an-object"),
            json!(["k", "v"]),
            json!(7),
        ] {
            q.patch_metadata(&other.id, bad.clone())
                .await
                .bad_param("metadata");
        }
        assert_eq!(
            q.get(&other.id).await["metadata"],
            json!({ ok_key: ok_value }),
            "refused patches changed nothing"
        );
    })
    .await;
}

/// What one heartbeat cell of §5.2 must answer.
enum Expect {
    Accepted(&'static str),
    Conflict,
    Precondition,
    BadRequest,
}

#[tokio::test]
async fn heartbeat_table() {
    each_backend(async |server| {
        let q = Queue::new(server).await;
        let foreign_time = "2020-01-01T00:00:00.000001Z";
        // (state, E, expectation). E: "none" = NO_HEARTBEAT, "omit", "equal" = current last_heartbeat
        // (or, where there is none, a valid RFC 3339 value), "other" = another RFC 3339 value, "bad".
        use Expect::*;
        let table = [
            ("queued", "none", Conflict),
            ("queued", "omit", Conflict),
            ("queued", "equal", Conflict),
            ("queued", "other", Conflict),
            ("queued", "bad", BadRequest),
            ("starting", "none", Accepted("active")),
            ("starting", "omit", Accepted("active")),
            ("starting", "equal", Precondition),
            ("starting", "other", Precondition),
            ("starting", "bad", BadRequest),
            ("active", "none", Precondition),
            ("active", "omit", Accepted("active")),
            ("active", "equal", Accepted("active")),
            ("active", "other", Precondition),
            ("active", "bad", BadRequest),
            ("stopping", "none", Precondition),
            ("stopping", "omit", Accepted("stopping")),
            ("stopping", "equal", Accepted("stopping")),
            ("stopping", "other", Precondition),
            ("stopping", "bad", BadRequest),
            ("stopped", "none", Conflict),
            ("stopped", "omit", Conflict),
            ("stopped", "equal", Conflict),
            ("stopped", "other", Conflict),
            ("stopped", "bad", BadRequest),
        ];
        for (state, e, expect) in table {
            let item = q.item_in(state).await;
            let query = match e {
                "none" => "?expected_last_heartbeat=NO_HEARTBEAT".to_owned(),
                "omit" => String::new(),
                "equal" => format!(
                    "?expected_last_heartbeat={}",
                    enc(item.last_heartbeat.as_deref().unwrap_or(foreign_time))
                ),
                "other" => format!("?expected_last_heartbeat={}", enc(foreign_time)),
                _ => "?expected_last_heartbeat=garbage".to_owned(),
            };
            let before = q.get(&item.id).await;
            let reply = q.heartbeat(&item.id, &query).await;
            let cell = format!("{state} × {e}");
            match expect {
                Accepted(after) => {
                    let beat = reply.ok();
                    assert_eq!(beat["type"], "work_heartbeat", "{cell}");
                    assert_eq!(beat["state"], after, "{cell}");
                    assert_eq!(beat["lease_extended"], true, "{cell}");
                    assert_eq!(beat["ttl_seconds"], 60, "{cell}");
                    let now = q.get(&item.id).await;
                    assert_eq!(now["state"], after, "{cell}");
                    assert_eq!(now["latest_heartbeat_at"], beat["last_heartbeat"], "{cell}");
                    if state == "starting" {
                        assert!(
                            !now["started_at"].is_null(),
                            "{cell}: first heartbeat stamps started_at"
                        );
                        assert_eq!(
                            q.causes(&item.id).await.last().map(String::as_str),
                            Some("first_heartbeat")
                        );
                    }
                }
                Conflict => {
                    reply.error(409, "invalid_request_error");
                    assert_eq!(q.get(&item.id).await, before, "{cell}: no side effect");
                }
                Precondition => {
                    let error = reply.error(412, "precondition_failed_error");
                    let current = &error["details"]["current_state"];
                    assert_eq!(current["state"], state, "{cell}: {error}");
                    assert_eq!(current["ttl_seconds"], 60, "{cell}: {error}");
                    assert_eq!(
                        current["last_heartbeat"], before["latest_heartbeat_at"],
                        "{cell}: {error}"
                    );
                    assert_eq!(q.get(&item.id).await, before, "{cell}: no side effect");
                }
                BadRequest => {
                    reply.bad_param("expected_last_heartbeat");
                    assert_eq!(q.get(&item.id).await, before, "{cell}: no side effect");
                }
            }
        }

        // `stopping` before any heartbeat: NO_HEARTBEAT still matches, and the state stays `stopping`.
        let early = q.item_in("starting").await;
        assert_eq!(q.stop(&early.id, json!({})).await.ok()["state"], "stopping");
        let other = q
            .heartbeat(
                &early.id,
                &format!("?expected_last_heartbeat={}", enc(foreign_time)),
            )
            .await;
        assert!(
            other.error(412, "precondition_failed_error")["details"]["current_state"]
                ["last_heartbeat"]
                .is_null()
        );
        let beat = q
            .heartbeat(&early.id, "?expected_last_heartbeat=NO_HEARTBEAT")
            .await;
        assert_eq!(beat.ok()["state"], "stopping");
        assert!(
            q.get(&early.id).await["started_at"].is_null(),
            "a stopping item never becomes active"
        );
        q.heartbeat(&early.id, "?expected_last_heartbeat=NO_HEARTBEAT")
            .await
            .error(412, "precondition_failed_error");

        // `desired_ttl_seconds` that is not a positive integer: 400 in every state.
        for state in STATES {
            let item = q.item_in(state).await;
            for bad in ["0", "-5", "abc", "1.5", ""] {
                let reply = q
                    .heartbeat(&item.id, &format!("?desired_ttl_seconds={bad}"))
                    .await;
                reply.bad_param("desired_ttl_seconds");
            }
        }
    })
    .await;
}

#[tokio::test]
async fn heartbeat_tokens_ttl_and_precision() {
    each_backend(async |server| {
        let q = Queue::new(server).await;
        let item = q.item_in("starting").await;
        let first = q
            .heartbeat(
                &item.id,
                "?expected_last_heartbeat=NO_HEARTBEAT&desired_ttl_seconds=1",
            )
            .await;
        let first = first.ok().clone();
        assert_eq!(first["ttl_seconds"], 10, "clamped up to 10");
        let mut last = first["last_heartbeat"].as_str().unwrap().to_owned();
        let started_at = q.get(&item.id).await["started_at"].clone();

        let mut beats = vec![last.clone()];
        // A value past i64 is still a positive integer, clamped like any other (§6.7).
        for (desired, ttl) in [
            (Some("10000"), 600),
            (Some("99999999999999999999"), 600),
            (None, 600),
            (Some("45"), 45),
            (None, 45),
        ] {
            let mut query = format!("?expected_last_heartbeat={}", enc(&last));
            if let Some(d) = desired {
                query.push_str(&format!("&desired_ttl_seconds={d}"));
            }
            let beat = q.heartbeat(&item.id, &query).await;
            let beat = beat.ok();
            assert_eq!(beat["ttl_seconds"], ttl, "desired {desired:?}");
            last = beat["last_heartbeat"].as_str().unwrap().to_owned();
            beats.push(last.clone());
        }
        // The CAS token has microsecond precision and strictly increases (D-30).
        for beat in &beats {
            let fraction = beat.rsplit_once('.').map(|(_, f)| f).unwrap_or("");
            assert!(
                fraction.len() == 7 && fraction.ends_with('Z'),
                "six fractional digits: {beat}"
            );
        }
        for pair in beats.windows(2) {
            assert!(
                micros(&json!(pair[0])) < micros(&json!(pair[1])),
                "{pair:?}"
            );
        }
        let now = q.get(&item.id).await;
        assert_eq!(now["latest_heartbeat_at"], json!(last));
        assert_eq!(
            now["started_at"], started_at,
            "started_at is stamped by the first heartbeat only"
        );

        // E is compared as an instant, not as text.
        let instant = chrono::DateTime::parse_from_rfc3339(&last).unwrap();
        let shifted = instant
            .with_timezone(&chrono::FixedOffset::east_opt(2 * 3600).unwrap())
            .to_rfc3339_opts(chrono::SecondsFormat::Micros, false);
        assert_ne!(shifted, last);
        let beat = q
            .heartbeat(
                &item.id,
                &format!("?expected_last_heartbeat={}", enc(&shifted)),
            )
            .await;
        last = beat.ok()["last_heartbeat"].as_str().unwrap().to_owned();
        // An old token no longer matches.
        let stale = q
            .heartbeat(
                &item.id,
                &format!("?expected_last_heartbeat={}", enc(&beats[0])),
            )
            .await;
        let error = stale.error(412, "precondition_failed_error");
        assert_eq!(
            error["details"]["current_state"]["last_heartbeat"],
            json!(last)
        );
        assert_eq!(error["details"]["current_state"]["ttl_seconds"], 45);
        // The sentinel is case-sensitive (D-29).
        q.heartbeat(&item.id, "?expected_last_heartbeat=no_heartbeat")
            .await
            .bad_param("expected_last_heartbeat");
    })
    .await;
}

#[tokio::test]
async fn stop_table() {
    each_backend(async |server| {
        let q = Queue::new(server).await;
        // Every spelling of a graceful stop.
        let graceful = [
            Body::None,
            Body::Raw(String::new()),
            Body::Json(json!({})),
            Body::Json(json!({"force": false})),
            Body::Json(json!({"force": null})),
        ];
        for body in graceful {
            let what = format!("{body:?}");
            // queued → stopped at once, both stamps the same instant (D-7, D-26).
            let item = q.item_in("queued").await;
            let reply = q
                .req(Method::POST, &q.item_path(&item.id, "/stop"))
                .body(body.clone())
                .send()
                .await;
            let stopped = reply.ok();
            assert_eq!(stopped["state"], "stopped", "{what}");
            assert!(!stopped["stopped_at"].is_null());
            assert_eq!(
                stopped["stop_requested_at"], stopped["stopped_at"],
                "{what}"
            );
            assert_eq!(
                q.causes(&item.id).await.last().map(String::as_str),
                Some("stop_requested")
            );

            // starting / active → stopping; stopping → stopped (the worker's confirmation).
            for state in ["starting", "active"] {
                let item = q.item_in(state).await;
                let reply = q
                    .req(Method::POST, &q.item_path(&item.id, "/stop"))
                    .body(body.clone())
                    .send()
                    .await;
                let stopping = reply.ok().clone();
                assert_eq!(stopping["state"], "stopping", "{state} {what}");
                assert!(!stopping["stop_requested_at"].is_null());
                assert!(stopping["stopped_at"].is_null());
                assert_invariants(&stopping);
                let reply = q
                    .req(Method::POST, &q.item_path(&item.id, "/stop"))
                    .body(body.clone())
                    .send()
                    .await;
                let confirmed = reply.ok();
                assert_eq!(confirmed["state"], "stopped", "{state} {what}");
                assert_eq!(
                    confirmed["stop_requested_at"], stopping["stop_requested_at"],
                    "kept from the request"
                );
                assert!(
                    micros(&confirmed["stopped_at"]) >= micros(&confirmed["stop_requested_at"])
                );
                let causes = q.causes(&item.id).await;
                assert_eq!(
                    &causes[causes.len() - 2..],
                    ["stop_requested", "stop_confirmed"],
                    "{causes:?}"
                );
            }

            // stopped → 409.
            let item = q.item_in("stopped").await;
            let before = q.get(&item.id).await;
            let reply = q
                .req(Method::POST, &q.item_path(&item.id, "/stop"))
                .body(body.clone())
                .send()
                .await;
            reply.error(409, "invalid_request_error");
            assert_eq!(q.get(&item.id).await, before);
        }

        // force: every live state → stopped; stop_requested_at set if it was null.
        for state in ["queued", "starting", "active"] {
            let item = q.item_in(state).await;
            let stopped = q.stop(&item.id, json!({"force": true})).await;
            let stopped = stopped.ok();
            assert_eq!(stopped["state"], "stopped", "{state}");
            assert_eq!(
                stopped["stop_requested_at"], stopped["stopped_at"],
                "{state}"
            );
            assert_eq!(
                q.causes(&item.id).await.last().map(String::as_str),
                Some("force_stopped")
            );
            assert_invariants(stopped);
        }
        let item = q.item_in("stopping").await;
        let requested = q.get(&item.id).await["stop_requested_at"].clone();
        let stopped = q.stop(&item.id, json!({"force": true})).await;
        assert_eq!(stopped.ok()["state"], "stopped");
        assert_eq!(
            stopped.ok()["stop_requested_at"],
            requested,
            "force keeps an earlier request stamp"
        );
        q.stop(&item.id, json!({"force": true}))
            .await
            .error(409, "invalid_request_error");

        // A stopped item is terminal: heartbeat and ack answer 409 and nothing moves it.
        let before = q.get(&item.id).await;
        q.heartbeat(&item.id, "")
            .await
            .error(409, "invalid_request_error");
        q.ack(&item.id, None)
            .await
            .error(409, "invalid_request_error");
        assert_eq!(q.get(&item.id).await, before);
    })
    .await;
}

#[tokio::test]
async fn lease_expiry_requeues_lazily_and_keeps_the_id() {
    each_backend_with(without_tick(), async |server| {
        let q = Queue::new(server).await;
        let starting = q.item_in("starting").await;
        let active = q.item_in("active").await;
        let queued = q.item_in("queued").await;
        let stopped = q.item_in("stopped").await;
        let before_starting = q.get(&starting.id).await;
        let before_active = q.get(&active.id).await;
        let before_queued = q.get(&queued.id).await;
        let before_stopped = q.get(&stopped.id).await;
        settle().await;

        // Not yet: the deadline is strict and a minute away.
        server.clock.advance_millis(LEASE_MS - 5_000);
        assert_eq!(q.state(&starting.id).await, "starting");
        assert_eq!(q.state(&active.id).await, "active");
        server.clock.advance_millis(6_000);

        // starting → queued: same id, created_at kept, ack stamp and lease cleared, requeue counted.
        let requeued = q.get(&starting.id).await;
        assert_eq!(requeued["state"], "queued");
        assert_eq!(requeued["id"], before_starting["id"]);
        assert_eq!(
            requeued["created_at"], before_starting["created_at"],
            "D-33"
        );
        assert!(requeued["acknowledged_at"].is_null());
        assert_eq!(requeued["requeue_count"], 1);
        assert_invariants(&requeued);
        assert_eq!(
            q.causes(&starting.id).await.last().map(String::as_str),
            Some("lease_expired_requeued")
        );

        // active → queued, started_at and latest_heartbeat_at cleared too. The old worker learns it from
        // a 409 on its next heartbeat.
        let old_token = active.last_heartbeat.clone().unwrap();
        let hb = q
            .heartbeat(
                &active.id,
                &format!("?expected_last_heartbeat={}", enc(&old_token)),
            )
            .await;
        hb.error(409, "invalid_request_error");
        let requeued = q.get(&active.id).await;
        assert_eq!(requeued["state"], "queued");
        assert_eq!(requeued["created_at"], before_active["created_at"]);
        for stamp in ["acknowledged_at", "started_at", "latest_heartbeat_at"] {
            assert!(requeued[stamp].is_null(), "{stamp}: {requeued}");
        }
        assert_eq!(requeued["requeue_count"], 1);

        // queued and stopped items have no lease: time alone does nothing to them.
        assert_eq!(q.get(&queued.id).await, before_queued);
        assert_eq!(q.get(&stopped.id).await, before_stopped);

        // The requeued item is claimable again, under the same id, and starts a fresh lease: NO_HEARTBEAT
        // matches again and the new token sorts after every earlier one (D-30).
        let polled = q.poll("?reclaim_older_than_ms=600000", Some("w2")).await;
        let first = polled.ok()["id"].as_str().unwrap().to_owned();
        assert!(
            first == starting.id || first == active.id || first == queued.id,
            "{first}"
        );
        q.ack(&active.id, Some("w3")).await.ok();
        let beat = q
            .heartbeat(&active.id, "?expected_last_heartbeat=NO_HEARTBEAT")
            .await;
        assert!(micros(&beat.ok()["last_heartbeat"]) > micros(&json!(old_token)));
        let stats = q.stats().await;
        assert_eq!(stats["states"]["active"], 1, "{stats}");
    })
    .await;
}

#[tokio::test]
async fn heartbeats_extend_the_lease() {
    each_backend_with(without_tick(), async |server| {
        let q = Queue::new(server).await;
        let item = q.item_in("active").await;
        let mut last = item.last_heartbeat.clone().unwrap();
        settle().await;
        for _ in 0..3 {
            server.clock.advance_millis(LEASE_MS - 10_000);
            let beat = q
                .heartbeat(
                    &item.id,
                    &format!("?expected_last_heartbeat={}", enc(&last)),
                )
                .await;
            last = beat.ok()["last_heartbeat"].as_str().unwrap().to_owned();
        }
        assert_eq!(
            q.state(&item.id).await,
            "active",
            "150 s after the first beat, alive thanks to the others"
        );

        // A short TTL makes a short lease.
        let beat = q
            .heartbeat(
                &item.id,
                &format!(
                    "?expected_last_heartbeat={}&desired_ttl_seconds=10",
                    enc(&last)
                ),
            )
            .await;
        assert_eq!(beat.ok()["ttl_seconds"], 10);
        server.clock.advance_millis(11_000);
        assert_eq!(q.state(&item.id).await, "queued");
    })
    .await;
}

#[tokio::test]
async fn stopping_lease_expiry_stops_at_the_deadline() {
    each_backend_with(without_tick(), async |server| {
        let q = Queue::new(server).await;
        let item = q.item_in("stopping").await;
        let before = q.get(&item.id).await;
        settle().await;
        server.clock.advance_millis(LEASE_MS + 30_000);
        let stopped = q.get(&item.id).await;
        assert_eq!(stopped["state"], "stopped");
        assert_eq!(
            stopped["requeue_count"], 0,
            "a stopping item is never requeued"
        );
        assert_eq!(stopped["stop_requested_at"], before["stop_requested_at"]);
        // stopped_at is the instant the lease ran out, not the instant someone noticed.
        let deadline = micros(&before["latest_heartbeat_at"]) + LEASE_MS * 1_000;
        assert_eq!(micros(&stopped["stopped_at"]), deadline, "{stopped}");
        assert_eq!(
            q.causes(&item.id).await.last().map(String::as_str),
            Some("lease_expired_stopped")
        );
        q.stop(&item.id, json!({}))
            .await
            .error(409, "invalid_request_error");
    })
    .await;
}

#[tokio::test]
async fn poison_stop_after_three_requeues() {
    each_backend_with(without_tick(), async |server| {
        let q = Queue::new(server).await;
        let item = q.enqueue().await;
        for round in 1..=3 {
            q.ack(&item.id, Some("w1")).await.ok();
            settle().await;
            server.clock.advance_millis(LEASE_MS + 1_000);
            let got = q.get(&item.id).await;
            assert_eq!(got["state"], "queued", "round {round}");
            assert_eq!(got["requeue_count"], round);
            assert_eq!(got["id"], item.id.as_str());
        }
        q.ack(&item.id, Some("w1")).await.ok();
        settle().await;
        server.clock.advance_millis(LEASE_MS + 1_000);
        let got = q.get(&item.id).await;
        assert_eq!(got["state"], "stopped", "the fourth expiry stops it: {got}");
        assert_eq!(got["requeue_count"], 3);
        assert_invariants(&got);
        let causes = q.causes(&item.id).await;
        assert_eq!(
            causes
                .iter()
                .filter(|c| *c == "lease_expired_requeued")
                .count(),
            3,
            "{causes:?}"
        );
        assert_eq!(causes.last().map(String::as_str), Some("poison_stopped"));
        assert_eq!(
            q.poll("?reclaim_older_than_ms=0", None).await.ok(),
            &Value::Null
        );
    })
    .await;
}

#[tokio::test]
async fn requeued_item_is_redelivered_and_old_credentials_die() {
    each_backend_with(without_tick(), async |server| {
        let q = Queue::new(server).await;
        let item = q.enqueue().await;
        let first = q.poll("", Some("w1")).await.ok().clone();
        let (token1, _) = decode_secret(&first);
        q.ack(&item.id, Some("w1")).await.ok();
        let beat = q
            .req(
                Method::POST,
                &q.item_path(&item.id, "/heartbeat?expected_last_heartbeat=NO_HEARTBEAT"),
            )
            .bearer(&token1)
            .send()
            .await;
        let old = beat.ok()["last_heartbeat"].as_str().unwrap().to_owned();
        settle().await;
        server.clock.advance_millis(LEASE_MS + 1_000);

        let second = q.poll("", Some("w2")).await.ok().clone();
        assert_eq!(second["id"], item.id.as_str(), "requeue keeps the id");
        assert_eq!(second["created_at"], first["created_at"]);
        assert_eq!(second["delivery_count"], 2);
        assert_eq!(second["requeue_count"], 1);
        let (token2, _) = decode_secret(&second);
        assert_ne!(token1, token2);
        q.ack(&item.id, Some("w2")).await.ok();

        // w1's session token died with its lease (§11.1).
        let dead = q
            .req(Method::GET, &q.item_path(&item.id, ""))
            .bearer(&token1)
            .send()
            .await;
        dead.error(401, "authentication_error");
        // w1 cannot hijack the new lease: by Worker-ID (D-7b) or by its stale CAS token.
        let by_worker = q.heartbeat_as(&item.id, "w1").await;
        by_worker.error(412, "precondition_failed_error");
        let by_token = q
            .heartbeat(&item.id, &format!("?expected_last_heartbeat={}", enc(&old)))
            .await;
        by_token.error(412, "precondition_failed_error");
        let fresh = q
            .req(
                Method::POST,
                &q.item_path(&item.id, "/heartbeat?expected_last_heartbeat=NO_HEARTBEAT"),
            )
            .bearer(&token2)
            .worker("w2")
            .send()
            .await;
        assert_eq!(fresh.ok()["state"], "active");
        let causes = q.causes(&item.id).await;
        assert_eq!(
            causes,
            [
                "enqueued",
                "delivered",
                "acked",
                "first_heartbeat",
                "lease_expired_requeued",
                "delivered",
                "acked",
                "first_heartbeat"
            ]
        );
    })
    .await;
}

#[tokio::test]
async fn reclaim_redelivers_an_unacked_delivery() {
    each_backend(async |server| {
        let q = Queue::new(server).await;
        let item = q.enqueue().await;
        let first = q.poll("", Some("w1")).await.ok().clone();
        assert_eq!(first["delivery_count"], 1);

        // Within the window the delivery is outstanding; the default window is 5 s.
        assert_eq!(
            q.poll("?reclaim_older_than_ms=10000", Some("w2"))
                .await
                .ok(),
            &Value::Null
        );
        assert_eq!(q.poll("", Some("w2")).await.ok(), &Value::Null);
        server.clock.advance_millis(10_001);
        let again = q
            .poll("?reclaim_older_than_ms=10000", Some("w2"))
            .await
            .ok()
            .clone();
        assert_eq!(again["id"], item.id.as_str());
        assert_eq!(again["state"], "queued");
        assert_eq!(again["delivery_count"], 2);

        // The re-delivery replaced the first: w1 may no longer ack, w2 may.
        q.ack(&item.id, Some("w1"))
            .await
            .error(409, "invalid_request_error");
        let (token1, _) = decode_secret(&first);
        q.req(Method::GET, &q.item_path(&item.id, ""))
            .bearer(&token1)
            .send()
            .await
            .error(401, "authentication_error");

        // reclaim_older_than_ms=0: any un-acked delivery may be taken at once (Qoder).
        let zero = q
            .poll("?reclaim_older_than_ms=0", Some("w3"))
            .await
            .ok()
            .clone();
        assert_eq!(zero["id"], item.id.as_str());
        assert_eq!(zero["delivery_count"], 3);
        assert_eq!(q.ack(&item.id, Some("w3")).await.ok()["state"], "starting");
        let history = q.history(&item.id).await;
        let causes: Vec<&str> = history
            .iter()
            .map(|t| t["cause"].as_str().unwrap())
            .collect();
        assert_eq!(
            causes,
            [
                "enqueued",
                "delivered",
                "redelivered",
                "redelivered",
                "acked"
            ]
        );
        let workers: Vec<&Value> = history.iter().map(|t| &t["worker_id"]).collect();
        assert_eq!(
            workers[1..],
            [&json!("w1"), &json!("w2"), &json!("w3"), &json!("w3")]
        );
    })
    .await;
}

/// §6.2 steps 2–5: every poll looks for its own candidates before it waits. A blocked poll may skip
/// its scan when another found the queue empty a moment ago, but only if that scan looked for every
/// item this poll could take: one that reclaims sooner must still find the delivery the other left.
#[tokio::test]
async fn a_blocked_poll_reclaiming_sooner_than_an_empty_scan_before_it_takes_the_delivery() {
    each_backend(async |server| {
        let q = Queue::new(server).await;
        let item = q.enqueue().await;
        assert_eq!(q.poll("", Some("w1")).await.ok()["id"], item.id.as_str());
        // A blocked poll that leaves deliveries alone for a minute finds nothing.
        assert_eq!(
            q.poll("?block_ms=50&reclaim_older_than_ms=60000", Some("w2"))
                .await
                .ok(),
            &Value::Null
        );
        // The server's clock stands still: only a scan of this poll's own can find the item.
        let taken = q
            .poll("?block_ms=999&reclaim_older_than_ms=0", Some("w3"))
            .await
            .ok()
            .clone();
        assert_eq!(taken["id"], item.id.as_str());
        assert_eq!(taken["delivery_count"], 2);
    })
    .await;
}

#[tokio::test]
async fn poll_order_is_oldest_enqueue_first() {
    each_backend_with(without_tick(), async |server| {
        let q = Queue::new(server).await;
        let a = q.enqueue().await;
        let b = q.enqueue().await;
        let c = q.enqueue().await;
        // a is requeued: its enqueued_at becomes "now", so it goes behind b and c (D-22, D-33).
        q.ack(&a.id, None).await.ok();
        settle().await;
        server.clock.advance_millis(LEASE_MS + 1_000);
        assert_eq!(q.state(&a.id).await, "queued");
        let mut got = Vec::new();
        for _ in 0..3 {
            got.push(
                q.poll("", Some("w")).await.ok()["id"]
                    .as_str()
                    .unwrap()
                    .to_owned(),
            );
        }
        assert_eq!(got, [b.id.clone(), c.id.clone(), a.id.clone()]);
    })
    .await;
}

#[tokio::test]
async fn blocked_poll_is_woken_by_an_enqueue() {
    each_backend(async |server| {
        let q = Queue::new(server).await;
        let mut latencies = Vec::new();
        for _ in 0..5 {
            let poll = async {
                let started = Instant::now();
                let reply = q.poll("?block_ms=999", Some("waiter")).await;
                (reply, started, Instant::now())
            };
            let enqueue = async {
                // Give the poll time to find the queue empty and block.
                tokio::time::sleep(Duration::from_millis(150)).await;
                let sent = Instant::now();
                let body = json!({"agent": q.agent, "environment_id": q.env});
                let session = req(server, Method::POST, "/sessions")
                    .json(body)
                    .send()
                    .await;
                (
                    session.ok()["id"].as_str().unwrap().to_owned(),
                    sent,
                    Instant::now(),
                )
            };
            let ((reply, poll_started, poll_done), (session, sent, answered)) =
                tokio::join!(poll, enqueue);
            let item = reply.ok();
            assert_eq!(
                item["data"]["id"],
                json!(session),
                "the blocked poll returned the new item before its deadline"
            );
            assert!(item["secret"].is_string());
            let wake = poll_done.saturating_duration_since(sent);
            latencies.push(wake);
            println!(
                "[{}] blocked poll woken {:?} after the session create was sent ({:?} after it was answered; poll blocked {:?} in all)",
                server.backend.name(),
                wake,
                poll_done.checked_duration_since(answered).unwrap_or_default(),
                poll_done - poll_started
            );
            q.ack(item["id"].as_str().unwrap(), Some("waiter"))
                .await
                .ok();
        }
        latencies.sort();
        println!(
            "[{}] wake-up latency: median {:?}, max {:?}",
            server.backend.name(),
            latencies[2],
            latencies[4]
        );
    })
    .await;
}

#[tokio::test]
async fn blocked_poll_answers_null_at_its_deadline() {
    each_backend(async |server| {
        let q = Queue::new(server).await;
        for block in [1, 300, 999] {
            let started = Instant::now();
            let reply = q.poll(&format!("?block_ms={block}"), Some("w")).await;
            assert_eq!(reply.ok(), &Value::Null);
            println!(
                "[{}] block_ms={block}: null after {:?}",
                server.backend.name(),
                started.elapsed()
            );
        }
        // An item that is not claimable (a fresh delivery) does not end the wait early with a non-null.
        q.enqueue().await;
        q.poll("", Some("w1")).await.ok();
        let started = Instant::now();
        assert_eq!(q.poll("?block_ms=400", Some("w2")).await.ok(), &Value::Null);
        println!(
            "[{}] block_ms=400 with only a fresh delivery: null after {:?}",
            server.backend.name(),
            started.elapsed()
        );
    })
    .await;
}

#[tokio::test]
async fn blocked_poll_is_woken_by_a_lease_expiry_requeue() {
    each_backend(async |server| {
        let q = Queue::new(server).await;
        let item = q.item_in("starting").await;
        let poll = async {
            let reply = q.poll("?block_ms=999", Some("w2")).await;
            (reply, Instant::now())
        };
        let expire = async {
            tokio::time::sleep(Duration::from_millis(150)).await;
            server.clock.advance_millis(LEASE_MS + 1_000);
            Instant::now()
        };
        let ((reply, done), jumped) = tokio::join!(poll, expire);
        let got = reply.ok();
        assert_eq!(
            got["id"],
            item.id.as_str(),
            "the requeued item reached the blocked poll: {got}"
        );
        assert_eq!(got["requeue_count"], 1);
        println!(
            "[{}] blocked poll got the requeued item {:?} after the lease ran out",
            server.backend.name(),
            done.saturating_duration_since(jumped)
        );
    })
    .await;
}

#[tokio::test]
async fn queue_statistics() {
    each_backend_with(without_tick(), async |server| {
        let q = Queue::new(server).await;
        let empty = q.stats().await;
        assert_eq!(
            empty,
            json!({"type": "work_queue_stats", "depth": 0, "pending": 0, "oldest_queued_at": null, "workers_polling": 0,
                   "states": {"queued": 0, "starting": 0, "active": 0, "stopping": 0}})
        );

        let a = q.enqueue().await;
        let b = q.enqueue().await;
        let c = q.enqueue().await;
        let d = q.enqueue().await;
        let stats = q.stats().await;
        assert_eq!(
            (stats["depth"].as_i64(), stats["pending"].as_i64()),
            (Some(4), Some(0))
        );
        assert_eq!(
            micros(&stats["oldest_queued_at"]),
            micros(&q.get(&a.id).await["created_at"])
        );

        // Deliveries move items from depth to pending; Worker-IDs count, anonymous polls do not.
        assert_eq!(q.poll("", Some("w1")).await.ok()["id"], a.id.as_str());
        assert_eq!(q.poll("", Some("w2")).await.ok()["id"], b.id.as_str());
        q.poll("", None).await.ok();
        q.poll("", Some("   ")).await.ok();
        let stats = q.stats().await;
        assert_eq!(
            (stats["depth"].as_i64(), stats["pending"].as_i64()),
            (Some(0), Some(4)),
            "{stats}"
        );
        assert_eq!(
            stats["workers_polling"], 2,
            "blank Worker-IDs and header-less polls are not counted: {stats}"
        );
        assert_eq!(stats["states"]["queued"], 4);

        // Acked items leave the queue; states count live items only.
        q.ack(&a.id, Some("w1")).await.ok();
        q.ack(&b.id, Some("w2")).await.ok();
        q.heartbeat(&b.id, "").await.ok();
        q.stop(&d.id, json!({"force": true})).await.ok();
        let stats = q.stats().await;
        assert_eq!(
            (stats["depth"].as_i64(), stats["pending"].as_i64()),
            (Some(0), Some(1)),
            "{stats}"
        );
        assert_eq!(
            stats["states"],
            json!({"queued": 1, "starting": 1, "active": 1, "stopping": 0})
        );
        assert_eq!(
            micros(&stats["oldest_queued_at"]),
            micros(&q.get(&c.id).await["created_at"])
        );
        q.stop(&b.id, json!({})).await.ok();
        assert_eq!(q.stats().await["states"]["stopping"], 1);

        // A pending delivery stays pending however old it is; workers age out after 30 s.
        settle().await;
        server.clock.advance_millis(31_000);
        let stats = q.stats().await;
        assert_eq!(
            (stats["depth"].as_i64(), stats["pending"].as_i64()),
            (Some(0), Some(1)),
            "{stats}"
        );
        assert_eq!(stats["workers_polling"], 0, "{stats}");

        // A requeue puts the item back with a fresh enqueue instant.
        server.clock.advance_millis(LEASE_MS);
        let stats = q.stats().await;
        assert_eq!(
            stats["states"],
            json!({"queued": 2, "starting": 0, "active": 0, "stopping": 0}),
            "{stats}"
        );
        assert_eq!(
            (stats["depth"].as_i64(), stats["pending"].as_i64()),
            (Some(1), Some(1)),
            "{stats}"
        );
        assert_eq!(
            micros(&stats["oldest_queued_at"]),
            micros(&q.get(&c.id).await["created_at"])
        );
    })
    .await;
}

#[tokio::test]
async fn history_records_every_move() {
    each_backend(async |server| {
        let q = Queue::new(server).await;
        let item = q.enqueue().await;
        q.poll("", Some("w1")).await.ok();
        server.clock.advance_millis(6_000);
        q.poll("", Some("w2")).await.ok();
        q.ack(&item.id, Some("w2")).await.ok();
        let beat = q
            .heartbeat(&item.id, "?expected_last_heartbeat=NO_HEARTBEAT")
            .await;
        let mut last = beat.ok()["last_heartbeat"].as_str().unwrap().to_owned();
        for _ in 0..3 {
            let beat = q
                .heartbeat(
                    &item.id,
                    &format!("?expected_last_heartbeat={}", enc(&last)),
                )
                .await;
            last = beat.ok()["last_heartbeat"].as_str().unwrap().to_owned();
        }
        q.stop(&item.id, json!({})).await.ok();
        q.stop(&item.id, json!({})).await.ok();

        let reply = q
            .req(Method::GET, &q.item_path(&item.id, "/history"))
            .send()
            .await;
        let page = reply.ok();
        assert_eq!(
            page["heartbeat_count"], 4,
            "heartbeats are counted, not listed"
        );
        assert_eq!(page["has_more"], false);
        let rows = page["data"].as_array().unwrap();
        let moves: Vec<(Value, &str, &str)> = rows
            .iter()
            .map(|t| {
                (
                    t["from"].clone(),
                    t["to"].as_str().unwrap(),
                    t["cause"].as_str().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            moves,
            [
                (Value::Null, "queued", "enqueued"),
                (json!("queued"), "queued", "delivered"),
                (json!("queued"), "queued", "redelivered"),
                (json!("queued"), "starting", "acked"),
                (json!("starting"), "active", "first_heartbeat"),
                (json!("active"), "stopping", "stop_requested"),
                (json!("stopping"), "stopped", "stop_confirmed"),
            ]
        );
        for row in rows {
            assert_eq!(row["type"], "work_transition");
            micros(&row["at"]);
            assert!(row.get("detail").is_some() && row.get("worker_id").is_some());
        }
        for pair in rows.windows(2) {
            assert!(
                micros(&pair[0]["at"]) <= micros(&pair[1]["at"]),
                "oldest first"
            );
        }

        // Paging through the history a row at a time gives the same rows.
        let mut seen = Vec::new();
        let mut path = q.item_path(&item.id, "/history?limit=2");
        loop {
            let page = q.req(Method::GET, &path).send().await.ok().clone();
            seen.extend(
                page["data"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|t| t["cause"].clone()),
            );
            match page["next_page"].as_str() {
                Some(next) => {
                    path = q.item_path(&item.id, &format!("/history?limit=2&page={next}"))
                }
                None => break,
            }
        }
        assert_eq!(
            seen,
            rows.iter().map(|t| t["cause"].clone()).collect::<Vec<_>>()
        );
    })
    .await;
}

/// An operator's stop ends the item at once (§6.8), but the worker learns of it only at its next
/// heartbeat, and its program may run until the lease's end (§8). With `hold_next_item` the session's
/// next item is held until then, so that two programs never serve one session at once. A stop without
/// it is taken as the worker's own, sent once its program ended (§8, step 5) with whatever credential
/// it polled with, and holds nothing, except an admin token's on `/v1`, where no worker holds one; a
/// stop sent with the item's session token never holds.
#[tokio::test]
async fn an_operators_stop_holds_the_sessions_next_item_until_the_lease_ends() {
    each_backend(async |server| {
        let q = Queue::new(server).await;
        let message = json!({"events": [{"type": "user.message", "content": [{"type": "text", "text": "go on"}]}]});
        // Takes `item` as worker `w1`; returns the session token of the delivery.
        let take = async |item: &Item| {
            let delivered = q.poll("", Some("w1")).await.ok().clone();
            assert_eq!(delivered["id"], item.id.as_str());
            q.ack(&item.id, Some("w1")).await.ok();
            decode_secret(&delivered).0
        };
        // Posts a message to `item`'s session and returns the fresh item it enqueued.
        let next_item = async |item: &Item| {
            req(server, Method::POST, &format!("/sessions/{}/events", item.session))
                .json(message.clone())
                .send()
                .await
                .ok();
            let fresh = q.work_of_session(&item.session).await.expect("a fresh item");
            assert_ne!(fresh, item.id);
            fresh
        };
        // The session's next item is handed out at once, unheld.
        let handed_out_at_once = async |fresh: &str| {
            assert!(q.history(fresh).await[0]["detail"].is_null());
            let delivered = q.poll("", Some("w1")).await.ok().clone();
            assert_eq!(delivered["id"], fresh, "handed out at once");
            q.ack(fresh, Some("w1")).await.ok();
        };

        // An operator force-stops a leased item: its lease had the whole minute left.
        let operated = q.enqueue().await;
        take(&operated).await;
        q.stop(&operated.id, json!({"force": true, "hold_next_item": true}))
            .await
            .ok();
        let held = next_item(&operated).await;
        assert_eq!(q.state(&held).await, "queued");
        assert!(
            q.poll("", Some("w2")).await.ok().is_null(),
            "a held item is not handed out"
        );
        let implicit_claim = q.ack(&held, Some("w2")).await;
        let error = implicit_claim.error(409, "invalid_request_error");
        assert_eq!(error["code"], "work_held", "{error}");
        let enqueued = q.history(&held).await[0].clone();
        assert!(
            enqueued["detail"].as_str().unwrap_or_default().starts_with("held until "),
            "{enqueued}"
        );
        settle().await;
        server.clock.advance_millis(LEASE_MS - 1_000);
        assert!(q.poll("", Some("w2")).await.ok().is_null());
        server.clock.advance_millis(2_000);
        let delivered = q.poll("", Some("w2")).await.ok().clone();
        assert_eq!(delivered["id"], held.as_str(), "handed out once the lease is over");
        q.ack(&held, Some("w2")).await.ok();
        q.stop(&held, json!({"force": true})).await.ok();

        // An operator's stop request and its own confirmation hold it as well: the worker was still
        // draining.
        let drained = q.enqueue().await;
        take(&drained).await;
        q.stop(&drained.id, json!({"hold_next_item": true})).await.ok();
        q.stop(&drained.id, json!({"hold_next_item": true})).await.ok();
        assert_eq!(q.state(&drained.id).await, "stopped");
        let held = next_item(&drained).await;
        assert!(q.poll("", Some("w2")).await.ok().is_null());
        q.ack(&held, None).await.error(409, "invalid_request_error");
        settle().await;
        server.clock.advance_millis(LEASE_MS + 1_000);
        assert_eq!(q.poll("", Some("w2")).await.ok()["id"], held.as_str());
        q.ack(&held, Some("w2")).await.ok();
        q.stop(&held, json!({"force": true})).await.ok();

        // A worker ends its item with the credential it polled with once its program ended: a
        // forced stop with the org token (the Qoder dialect's workers hold no other), a forced stop
        // or a confirmation with an environment key. Nothing runs on.
        let key = req(server, Method::POST, &format!("/environments/{}/keys", q.env))
            .json(json!({}))
            .send()
            .await
            .ok()["token"]
            .as_str()
            .expect("token")
            .to_owned();
        let own = q.enqueue().await;
        take(&own).await;
        q.stop(&own.id, json!({"force": true})).await.ok();
        let fresh = next_item(&own).await;
        handed_out_at_once(&fresh).await;
        q.stop_with(&key, &fresh, json!({"force": true})).await.ok();
        let own = Item { id: fresh, ..own };
        let fresh = next_item(&own).await;
        handed_out_at_once(&fresh).await;
        q.stop(&fresh, json!({})).await.ok();
        q.stop_with(&key, &fresh, json!({})).await.ok();
        let own = Item { id: fresh, ..own };
        let fresh = next_item(&own).await;
        handed_out_at_once(&fresh).await;

        // On `/v1` a worker holds no admin token: an admin token's stop is an operator's, and holds
        // unless it says otherwise.
        let own = Item { id: fresh, ..own };
        let v1_stop = |id: &str, body: Value| {
            req_v1(server, Method::POST, &q.item_path(id, "/stop")).json(body)
        };
        v1_stop(&own.id, json!({"force": true})).send().await.ok();
        let held = next_item(&own).await;
        assert!(q.poll("", Some("w2")).await.ok().is_null(), "held");
        settle().await;
        server.clock.advance_millis(LEASE_MS + 1_000);
        take(&Item {
            id: held.clone(),
            ..own.clone()
        })
        .await;
        v1_stop(&held, json!({"force": true, "hold_next_item": false}))
            .send()
            .await
            .ok();
        let own = Item { id: held, ..own };
        let fresh = next_item(&own).await;
        handed_out_at_once(&fresh).await;
        // Not a boolean: refused, and nothing stops.
        for bad in [json!("yes"), json!(1), json!([true])] {
            let refused = q.stop(&fresh, json!({"force": true, "hold_next_item": bad})).await;
            let error = refused.error(400, "invalid_request_error");
            assert_eq!(error["param"], "hold_next_item", "{error}");
        }
        assert_eq!(q.state(&fresh).await, "starting", "not stopped");

        // The item's session token is its holder's, whatever the stop asks for.
        let own = Item { id: fresh, ..own };
        q.stop(&own.id, json!({"force": true})).await.ok();
        let by_token = next_item(&own).await;
        let token = take(&Item {
            id: by_token.clone(),
            ..own.clone()
        })
        .await;
        q.stop_with(&token, &by_token, json!({"force": true, "hold_next_item": true}))
            .await
            .ok();
        let fresh = next_item(&Item { id: by_token, ..own }).await;
        handed_out_at_once(&fresh).await;
    })
    .await;
}

/// Polling one item again and again without acking it (`reclaim_older_than_ms=0`) writes a history
/// line for each of the first ten redeliveries in a row and none after: the history stays bounded,
/// and the ack that ends the run says how many went unrecorded.
#[tokio::test]
async fn redeliveries_in_a_row_keep_the_history_bounded() {
    each_backend(async |server| {
        let q = Queue::new(server).await;
        let item = q.enqueue().await;
        let polls = 40;
        for _ in 0..polls {
            let got = q.poll("?reclaim_older_than_ms=0", Some("w1")).await;
            assert_eq!(got.ok()["id"], item.id.as_str());
        }
        let causes = q.causes(&item.id).await;
        assert_eq!(causes.len(), 1 + 1 + 10, "{causes:?}");
        assert_eq!(causes.iter().filter(|c| *c == "redelivered").count(), 10);
        q.ack(&item.id, Some("w1")).await.ok();
        let history = q.history(&item.id).await;
        let acked = history.last().expect("the ack");
        assert_eq!(acked["cause"], "acked");
        assert_eq!(
            acked["detail"],
            format!(
                "after {} more redeliveries, not recorded one by one",
                polls - 1 - 10
            )
        );
    })
    .await;
}

/// A transition's `worker_id` is the worker that held the item; who asked for a stop is in its
/// `detail`, so that an operator's force stop reads apart from the worker's own at its program's end.
#[tokio::test]
async fn history_names_who_asked_for_a_stop() {
    each_backend(async |server| {
        let q = Queue::new(server).await;
        let last_detail = async |id: &str| {
            let history = q.history(id).await;
            let last = history.last().expect("a transition").clone();
            (
                last["cause"].as_str().unwrap().to_owned(),
                last["worker_id"].clone(),
                last["detail"].as_str().unwrap_or_default().to_owned(),
            )
        };

        // The worker ends its item with the item's own session token.
        let own = q.enqueue().await;
        let delivered = q.poll("", Some("w1")).await.ok().clone();
        q.ack(&own.id, Some("w1")).await.ok();
        let (token, _) = decode_secret(&delivered);
        q.stop_with(&token, &own.id, json!({"force": true}))
            .await
            .ok();
        let (cause, worker, detail) = last_detail(&own.id).await;
        assert_eq!((cause.as_str(), &worker), ("force_stopped", &json!("w1")));
        assert_eq!(detail, "asked for by the item's session token");

        // An operator force-stops an item the same worker holds.
        let operated = q.enqueue().await;
        q.poll("", Some("w1")).await.ok();
        q.ack(&operated.id, Some("w1")).await.ok();
        q.stop(&operated.id, json!({"force": true})).await.ok();
        let (cause, worker, detail) = last_detail(&operated.id).await;
        assert_eq!((cause.as_str(), &worker), ("force_stopped", &json!("w1")));
        assert!(
            detail.starts_with("asked for by admin token tok_"),
            "{detail}"
        );

        // A detail the stop already had is kept, with who asked after it.
        let queued = q.enqueue().await;
        q.stop(&queued.id, json!({})).await.ok();
        let (cause, _, detail) = last_detail(&queued.id).await;
        assert_eq!(cause, "stop_requested");
        assert!(
            detail.starts_with(
                "stopped while queued: no worker held it; asked for by admin token tok_"
            ),
            "{detail}"
        );
    })
    .await;
}

/// In a cluster, a server that starts while another has just been checking the leases grants no
/// lease amnesty: the cluster was not down, and a server restarting in a loop would otherwise push
/// back every abandoned item's requeue at each start. A mark holds for three of its server's ticks
/// (at least 5 s): one older counts as none, and so does one of the server's own earlier run. An
/// embedded store is one process's alone: its starts always grant it.
#[tokio::test]
async fn a_server_starting_beside_one_that_keeps_the_leases_grants_no_amnesty() {
    for backend in backends() {
        let keeper = TestServer::start_with(&backend, without_tick()).await;
        if !matches!(backend, Backend::Postgres(_)) {
            keeper.app.mark_leases_kept().await.unwrap();
            assert!(
                keeper.app.amnesty_at_start().await.unwrap().is_some(),
                "{backend:?}"
            );
            keeper.shutdown().await;
            continue;
        }
        let q = Queue::new(&keeper).await;
        let clock = keeper.clock.clone();
        // A server's mark, as its dispatcher leaves one. This test writes them: its keeper's only
        // tick is the one at its start, and that mark, of a tick that never comes round again, is
        // forgotten once it is there.
        let store = keeper.app.store.clone();
        let now = || tether_core::Clock::now(&clock);
        while store
            .lease_keeper_marks_elsewhere("")
            .await
            .unwrap()
            .is_empty()
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        store
            .commit(ChangeSet::one(Write::ForgetLeaseKeepers {
                before: now().plus_seconds(3600),
            }))
            .await
            .unwrap();
        let mark = |server_id: &str, age_ms: i64, tick_ms: u64| {
            let mark =
                LeaseKeeperMark::new(now().minus_millis(age_ms), Duration::from_millis(tick_ms));
            store.commit(ChangeSet::one(Write::MarkLeasesKept {
                server_id: server_id.into(),
                mark,
            }))
        };
        for (keepers_tick_ms, mark_age_ms, amnesty) in [
            (1_000, 0, false),
            (1_000, 10_000, true),
            // A server that ticks every 20 s is still keeping the leases 10 s after its last mark.
            (20_000, 10_000, false),
            (20_000, 61_000, true),
        ] {
            let item = q.item_in("active").await;
            settle().await;
            // Due within the 30 s window a start's amnesty extends leases to.
            clock.advance_millis(LEASE_MS - 15_000);
            mark("another-host/127.0.0.1:4780", mark_age_ms, keepers_tick_ms)
                .await
                .unwrap();
            let starting = TestServer::start_on(
                &backend,
                keeper.location.clone(),
                without_tick(),
                clock.clone(),
            )
            .await;
            // Answered once its start, amnesty included, is behind it.
            let health = starting.http().get(format!("{}/healthz", starting.base));
            assert_eq!(health.send().await.unwrap().status(), StatusCode::OK);
            // Past the lease's own deadline, within the window's.
            clock.advance_millis(20_000);
            keeper.app.expire_due_leases().await.unwrap();
            let state = q.state(&item.id).await;
            assert_eq!(
                state == "active",
                amnesty,
                "{backend:?}, a mark {mark_age_ms} ms old of a {keepers_tick_ms} ms tick: {state}"
            );
            // A server that stops takes its mark back: it keeps the leases no more.
            starting.shutdown().await;
            let others = store
                .lease_keeper_marks_elsewhere("another-host/127.0.0.1:4780")
                .await
                .unwrap();
            assert_eq!(others, vec![], "{backend:?}");
        }
        // A server's own earlier run is not another server: a restart under its name grants it.
        // (Its mark as a run killed before it could take it back leaves it.)
        let mut named = without_tick();
        named.config.server_name = Some("host-a/127.0.0.1:4780".into());
        let item = q.item_in("active").await;
        settle().await;
        clock.advance_millis(LEASE_MS - 15_000);
        mark("host-a/127.0.0.1:4780", 0, 1_000).await.unwrap();
        let again =
            TestServer::start_on(&backend, keeper.location.clone(), named, clock.clone()).await;
        let health = again.http().get(format!("{}/healthz", again.base));
        assert_eq!(health.send().await.unwrap().status(), StatusCode::OK);
        clock.advance_millis(20_000);
        keeper.app.expire_due_leases().await.unwrap();
        assert_eq!(
            q.state(&item.id).await,
            "active",
            "its restart granted amnesty"
        );
        again.shutdown().await;
        keeper.shutdown().await;
    }
}

#[tokio::test]
async fn lease_amnesty_after_a_restart() {
    for backend in backends() {
        let server = TestServer::start_with(&backend, without_tick()).await;
        let q = Queue::new(&server).await;
        let starting = q.item_in("starting").await;
        let active = q.item_in("active").await;
        let stopping = q.item_in("stopping").await;
        let env = q.env.clone();
        let location = server.location.clone();
        let clock = server.clock.clone();
        settle().await;
        server.shutdown().await;

        // The server was down for longer than a lease.
        clock.advance_millis(LEASE_MS * 3);
        let server = TestServer::start_on(&backend, location, without_tick(), clock.clone()).await;
        let q = Queue {
            server: &server,
            env,
            agent: String::new(),
        };
        assert_eq!(
            q.state(&starting.id).await,
            "starting",
            "the lease was extended, not expired"
        );
        assert_eq!(q.state(&active.id).await, "active");
        assert_eq!(q.state(&stopping.id).await, "stopping");
        let beat = q
            .heartbeat(
                &active.id,
                &format!(
                    "?expected_last_heartbeat={}",
                    enc(active.last_heartbeat.as_deref().unwrap())
                ),
            )
            .await;
        assert_eq!(
            beat.ok()["state"],
            "active",
            "the worker's CAS token survived the restart"
        );
        assert_eq!(
            q.heartbeat(&starting.id, "?expected_last_heartbeat=NO_HEARTBEAT")
                .await
                .ok()["state"],
            "active"
        );

        // Amnesty is a grace window, not immortality: an item nobody heartbeats still expires after it.
        clock.advance_millis(31_000);
        assert_eq!(q.state(&stopping.id).await, "stopped");
        assert_eq!(
            q.causes(&stopping.id).await.last().map(String::as_str),
            Some("lease_expired_stopped")
        );
        server.shutdown().await;
    }
}

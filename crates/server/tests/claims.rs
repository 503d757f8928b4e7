//! Tether's claim (`POST …/work/claim`, an extension §11 allows): a poll, its ack and a first
//! heartbeat in one request, over real HTTP on each backend. What a claim does is the three
//! operations' own (`tether_core::work::claim`, property-tested there); these tests check what the
//! server adds: the wire, the session token, the choice of item, waking, races and refusals.

mod conformance;

use std::collections::HashSet;
use std::time::Duration;

use conformance::*;

/// The claimed item's id, session token and lease token, from a claim's answer.
fn claimed(reply: &Reply) -> (String, String, String) {
    let claim = reply.ok();
    assert_eq!(claim["type"], "work_claim", "{claim}");
    let (token, _) = decode_secret(&claim["work"]);
    (
        claim["work"]["id"].as_str().expect("id").to_owned(),
        token,
        claim["lease"]["last_heartbeat"]
            .as_str()
            .expect("last_heartbeat")
            .to_owned(),
    )
}

#[tokio::test]
async fn a_claim_takes_the_oldest_item_and_starts_its_lease() {
    each_backend(async |server| {
        let q = Queue::new(server).await;
        let first = q.enqueue().await;
        let second = q.enqueue().await;

        let reply = q.claim("?desired_ttl_seconds=30", Some("w1")).await;
        let claim = reply.ok();
        let work = &claim["work"];
        assert_eq!(work["id"], first.id.as_str(), "oldest enqueue first");
        assert_eq!(work["state"], "active");
        assert_eq!(work["type"], "work");
        assert_eq!(work["delivery_count"], 1);
        for stamp in ["acknowledged_at", "started_at", "latest_heartbeat_at"] {
            assert!(work[stamp].is_string(), "{stamp} missing: {work}");
        }
        assert_invariants(work);
        let lease = &claim["lease"];
        assert_eq!(lease["type"], "work_heartbeat");
        assert_eq!(lease["state"], "active");
        assert_eq!(lease["lease_extended"], true);
        assert_eq!(lease["ttl_seconds"], 30);
        assert_eq!(lease["last_heartbeat"], work["latest_heartbeat_at"]);
        let (id, token, beat) = claimed(&reply);
        assert!(token.starts_with("tth_ses_"), "{token}");
        assert_eq!(
            q.causes(&id).await,
            ["enqueued", "delivered", "acked", "first_heartbeat"]
        );
        let history = q.history(&id).await;
        assert!(history[1..].iter().all(|t| t["worker_id"] == "w1"));

        // The lease is the worker's: its first heartbeat is behind it, and the next one echoes
        // the claim's token, with the session token as its credential.
        let again = q
            .heartbeat(&id, "?expected_last_heartbeat=NO_HEARTBEAT")
            .await;
        again.error(412, "precondition_failed_error");
        let path = q.item_path(&id, &format!("/heartbeat?expected_last_heartbeat={beat}"));
        let renewed = q.req(Method::POST, &path).bearer(&token).send().await;
        assert_eq!(renewed.ok()["state"], "active");
        let beat_as_stranger = q.heartbeat_as(&id, "w2").await;
        beat_as_stranger.error(412, "precondition_failed_error");

        // Nothing else takes it: the next claim gets the next item, a poll finds none.
        let (next, _, _) = claimed(&q.claim("", Some("w2")).await);
        assert_eq!(next, second.id);
        assert_eq!(q.poll("", Some("w3")).await.ok(), &Value::Null);
        assert_eq!(q.claim("", Some("w3")).await.ok(), &Value::Null);

        // The cycle ends with the holder's stop, as a polled item's does.
        let stopped = q.stop_with(&token, &id, json!({"force": true})).await;
        assert_eq!(stopped.ok()["state"], "stopped");
        assert_eq!(
            q.causes(&id).await.last().map(String::as_str),
            Some("force_stopped")
        );
    })
    .await;
}

#[tokio::test]
async fn a_claim_ends_a_rescheduled_turn_as_an_ack_does() {
    each_backend(async |server| {
        let q = Queue::new(server).await;
        let item = q.enqueue().await;
        let session = format!("/sessions/{}", item.session);
        let input = json!({"events": [{"type": "user.message", "content": [{"type": "text", "text": "hi"}]}]});
        let posted = q.req(Method::POST, &format!("{session}/events")).json(input);
        posted.send().await.ok();
        let status = async || {
            let reply = q.req(Method::GET, &session).send().await;
            reply.ok()["status"].as_str().unwrap().to_owned()
        };
        let last_event = async || {
            let path = format!("{session}/events?limit=100");
            let reply = q.req(Method::GET, &path).send().await;
            let events = reply.ok()["data"].as_array().unwrap().clone();
            events.last().unwrap()["type"].as_str().unwrap().to_owned()
        };
        let (id, _, _) = claimed(&q.claim("", Some("w1")).await);
        assert_eq!(status().await, "running");

        // The lease lapses: the turn waits for the item's next holder (§12.4).
        server.clock.advance_millis(61_000);
        assert_eq!(q.state(&id).await, "queued");
        assert_eq!(status().await, "rescheduling");
        assert_eq!(last_event().await, "session.status_rescheduled");

        let (again, _, _) = claimed(&q.claim("", Some("w2")).await);
        assert_eq!(again, id, "the same item comes back (D-33)");
        assert_eq!(status().await, "running");
        assert_eq!(last_event().await, "session.status_running");
    })
    .await;
}

#[tokio::test]
async fn concurrent_claims_take_each_item_once() {
    each_backend(async |server| {
        let q = Queue::new(server).await;
        let mut queued = HashSet::new();
        for _ in 0..6 {
            queued.insert(q.enqueue().await.id);
        }
        let claims = (0..10).map(|w| {
            let q = &q;
            async move { q.claim("", Some(&format!("w{w}"))).await }
        });
        let replies = futures::future::join_all(claims).await;
        let mut taken = HashSet::new();
        let mut empty = 0;
        for reply in &replies {
            if reply.ok().is_null() {
                empty += 1;
                continue;
            }
            let (id, _, _) = claimed(reply);
            assert!(taken.insert(id.clone()), "{id} claimed twice");
        }
        assert_eq!(taken, queued, "every item claimed once");
        assert_eq!(empty, 4);
    })
    .await;
}

#[tokio::test]
async fn a_blocked_claim_is_woken_by_an_enqueue() {
    each_backend(async |server| {
        let q = Queue::new(server).await;
        let claim = q.claim("?block_ms=999", Some("waiter"));
        let enqueue = async {
            // Give the claim time to find the queue empty and block.
            tokio::time::sleep(Duration::from_millis(150)).await;
            q.enqueue().await
        };
        let (reply, item) = tokio::join!(claim, enqueue);
        let (id, _, _) = claimed(&reply);
        assert_eq!(id, item.id, "the blocked claim took the new item");
        assert_eq!(q.state(&id).await, "active");
    })
    .await;
}

#[tokio::test]
async fn a_claim_takes_over_a_delivery_only_past_its_reclaim_window() {
    each_backend(async |server| {
        let q = Queue::new(server).await;
        let item = q.enqueue().await;
        let delivery = q.poll("", Some("w1")).await;
        let (first_token, _) = decode_secret(delivery.ok());
        assert_eq!(
            q.claim("", Some("w2")).await.ok(),
            &Value::Null,
            "an un-acked delivery is the poller's for the reclaim window"
        );
        let reply = q.claim("?reclaim_older_than_ms=0", Some("w2")).await;
        let (id, _, _) = claimed(&reply);
        assert_eq!(id, item.id);
        assert_eq!(
            q.causes(&id).await,
            [
                "enqueued",
                "delivered",
                "redelivered",
                "acked",
                "first_heartbeat"
            ]
        );
        // The earlier delivery's token died with the redelivery.
        let path = q.item_path(&id, "");
        let stale = q.req(Method::GET, &path).bearer(&first_token).send().await;
        stale.error(401, "authentication_error");
        q.ack(&id, Some("w1"))
            .await
            .error(409, "invalid_request_error");
    })
    .await;
}

#[tokio::test]
async fn a_claim_refuses_what_a_poll_or_a_heartbeat_refuses() {
    each_backend(async |server| {
        let q = Queue::new(server).await;
        q.enqueue().await;
        for query in ["?block_ms=0", "?block_ms=1000", "?block_ms=x"] {
            q.claim(query, None).await.bad_param("block_ms");
        }
        q.claim("?reclaim_older_than_ms=-1", None)
            .await
            .bad_param("reclaim_older_than_ms");
        for query in ["?desired_ttl_seconds=0", "?desired_ttl_seconds=ten"] {
            q.claim(query, None).await.bad_param("desired_ttl_seconds");
        }
        // The Claude dialect's reclaim window starts at 1 ms, as its poll's does.
        let path = q.path("/claim?reclaim_older_than_ms=0");
        let v1 = req_v1(server, Method::POST, &path).send().await;
        v1.bad_param("reclaim_older_than_ms");

        let unknown = format!("/environments/{}/work/claim", unknown_id("env"));
        q.req(Method::POST, &unknown)
            .send()
            .await
            .error(404, "not_found_error");
        let other = server.self_hosted_environment().await;
        let key = q
            .req(Method::POST, &format!("/environments/{other}/keys"))
            .send()
            .await;
        let key = key.ok()["token"].as_str().unwrap().to_owned();
        let foreign = q
            .req(Method::POST, &q.path("/claim"))
            .bearer(&key)
            .send()
            .await;
        foreign.error(403, "permission_error");
        let anonymous = q
            .req(Method::POST, &q.path("/claim"))
            .anonymous()
            .send()
            .await;
        anonymous.error(401, "authentication_error");

        // Refused claims took nothing: the item is still there for a good one.
        let (_, _, _) = claimed(&q.claim("", None).await);
    })
    .await;
}

/// A claim sent with an `Idempotency-Key` as `worker`.
async fn keyed_claim(q: &Queue<'_>, query: &str, worker: &str, key: &str) -> Reply {
    let path = q.path(&format!("/claim{query}"));
    let request = q.req(Method::POST, &path).worker(worker);
    request.header("idempotency-key", key).send().await
}

const KEY: &str = "0123456789abcdef0123456789abcdef";

#[tokio::test]
async fn a_claim_tried_again_with_its_key_answers_the_item_it_took() {
    each_backend(async |server| {
        let q = Queue::new(server).await;
        let first = q.enqueue().await;
        let second = q.enqueue().await;

        let reply = keyed_claim(&q, "?desired_ttl_seconds=30", "w1", KEY).await;
        let (id, token, beat) = claimed(&reply);
        assert_eq!(id, first.id);
        assert_eq!(reply.ok()["earlier_try"], false);
        let lease = reply.ok()["lease"].clone();

        // Its answer lost, the worker sends it again: the same item, token and lease, and
        // nothing more is taken or written.
        server.clock.advance_millis(2_000);
        // (It asks for another lease length: the lease answered is the one the first try made.)
        let again = keyed_claim(&q, "?desired_ttl_seconds=45&retry=true", "w1", KEY).await;
        assert_eq!(claimed(&again), (id.clone(), token.clone(), beat.clone()));
        assert_eq!(again.ok()["lease"], lease);
        assert_eq!(again.ok()["work"], reply.ok()["work"], "the item as it was");
        assert_eq!(
            again.ok()["earlier_try"],
            true,
            "its lease began at the first try"
        );
        assert_eq!(
            q.causes(&id).await,
            ["enqueued", "delivered", "acked", "first_heartbeat"]
        );
        assert_eq!(q.state(&second.id).await, "queued");

        // Once the worker has heartbeated, the claim asked again answers the lease as it is; a
        // try that does not say it is one sent again finds it too, once its write for the
        // next item loses to the token's holder.
        let path = q.item_path(&id, &format!("/heartbeat?expected_last_heartbeat={beat}"));
        let renewed = q.req(Method::POST, &path).bearer(&token).send().await;
        let renewed_beat = renewed.ok()["last_heartbeat"].clone();
        let third = keyed_claim(&q, "", "w1", &format!("\"{KEY}\"")).await;
        assert_eq!(third.ok()["lease"]["last_heartbeat"], renewed_beat);
        assert_eq!(claimed(&third).0, id, "a quoted key is the same key");
        assert_eq!(third.ok()["earlier_try"], true);

        // Another worker's claim with the same key is another claim: it takes the next item.
        let (other, other_token, _) = claimed(&keyed_claim(&q, "", "w2", KEY).await);
        assert_eq!(other, second.id);
        assert_ne!(other_token, token);

        // Once the item has stopped, the key names nothing: a claim with it takes new work.
        q.stop_with(&token, &id, json!({"force": true})).await.ok();
        let later = q.enqueue().await;
        assert_eq!(claimed(&keyed_claim(&q, "", "w1", KEY).await).0, later.id);
    })
    .await;
}

#[tokio::test]
async fn tries_of_one_claim_racing_take_one_item() {
    each_backend(async |server| {
        let q = Queue::new(server).await;
        for _ in 0..4 {
            q.enqueue().await;
        }
        let tries = (0..8).map(|_| keyed_claim(&q, "", "w1", KEY));
        let replies = futures::future::join_all(tries).await;
        let answers: HashSet<_> = replies.iter().map(claimed).collect();
        assert_eq!(
            answers.len(),
            1,
            "every try answers the same claim: {answers:?}"
        );
        let (id, _, _) = answers.into_iter().next().unwrap();
        let stats = q.stats().await;
        assert_eq!(stats["states"]["active"], 1, "{id} alone was taken");
        assert_eq!(stats["states"]["queued"], 3);
    })
    .await;
}

#[tokio::test]
async fn a_claim_tried_again_after_its_lease_ran_out_is_a_new_claim() {
    each_backend(async |server| {
        let q = Queue::new(server).await;
        let item = q.enqueue().await;
        let (id, first_token, _) = claimed(&keyed_claim(&q, "", "w1", KEY).await);
        assert_eq!(id, item.id);
        // With nothing left in the queue, a try sent again still answers the item it took.
        server.clock.advance_millis(50_000);
        assert_eq!(
            claimed(&keyed_claim(&q, "?retry=true", "w1", KEY).await).0,
            id
        );
        // Past the lease, the item went back to the queue: a try now is a claim anew, which
        // takes the oldest item (the same one, the only one), counted as a requeue and delivered
        // again, and the token of the lapsed lease is dead in between.
        server.clock.advance_millis(11_000);
        let path = q.item_path(&id, "");
        let stale = q.req(Method::GET, &path).bearer(&first_token).send().await;
        stale.error(401, "authentication_error");
        let late = keyed_claim(&q, "?retry=true", "w1", KEY).await;
        assert_eq!(claimed(&late).0, id);
        assert_eq!(late.ok()["earlier_try"], false, "a lease of its own");
        assert_eq!(late.ok()["work"]["requeue_count"], 1);
        assert_eq!(late.ok()["work"]["delivery_count"], 2);
    })
    .await;
}

#[tokio::test]
async fn a_claim_sent_again_answers_what_an_earlier_try_took_while_it_waited() {
    each_backend(async |server| {
        let q = Queue::new(server).await;
        let item = q.enqueue().await;
        // Delivered to another worker a moment ago: not claimable within the reclaim window, and
        // a claim that takes it over enqueues nothing, so it wakes no waiter.
        q.poll("", Some("w0")).await.ok();
        let resent = keyed_claim(&q, "?block_ms=999&retry=true", "w1", KEY);
        let earlier = async {
            tokio::time::sleep(Duration::from_millis(200)).await;
            keyed_claim(&q, "?reclaim_older_than_ms=0", "w1", KEY).await
        };
        let (resent, earlier) = tokio::join!(resent, earlier);
        assert_eq!(claimed(&earlier).0, item.id);
        assert_eq!(claimed(&resent), claimed(&earlier));
    })
    .await;
}

/// A worker that takes no new work (draining) asks only for what an earlier try took: answered that
/// item if a try committed, otherwise nothing at once, with the queue untouched and no wait.
#[tokio::test]
async fn a_claim_sent_again_taking_nothing_new_answers_only_an_earlier_try() {
    each_backend(async |server| {
        let q = Queue::new(server).await;
        let first = q.enqueue().await;
        let second = q.enqueue().await;

        // No try of this key committed: nothing, though items are queued. It is no poll: the
        // worker is not counted as polling (nor does it wait, which a poll's `block_ms` would).
        let nothing = keyed_claim(&q, "?retry=only&block_ms=999", "w1", KEY).await;
        assert_eq!(nothing.ok(), &Value::Null);
        let workers = q.req(Method::GET, &format!("/environments/{}/workers", q.env));
        assert_eq!(workers.send().await.ok()["data"], json!([]), "not a poll");
        assert_eq!(q.stats().await["workers_polling"], 0);
        assert_eq!(q.state(&first.id).await, "queued");
        assert_eq!(q.state(&second.id).await, "queued");
        assert_eq!(q.causes(&first.id).await, ["enqueued"]);

        // A try committed and its answer was lost: that item, its token and lease.
        let reply = keyed_claim(&q, "", "w1", KEY).await;
        assert_eq!(claimed(&reply).0, first.id);
        let again = keyed_claim(&q, "?retry=only", "w1", KEY).await;
        assert_eq!(claimed(&again), claimed(&reply));
        assert_eq!(again.ok()["earlier_try"], true);
        assert_eq!(q.state(&second.id).await, "queued", "nothing more taken");

        // Once that item has stopped, there is nothing to answer, and still nothing is taken.
        let (_, token, _) = claimed(&reply);
        q.stop_with(&token, &first.id, json!({"force": true}))
            .await
            .ok();
        let after = keyed_claim(&q, "?retry=only", "w1", KEY).await;
        assert_eq!(after.ok(), &Value::Null);
        assert_eq!(q.state(&second.id).await, "queued");

        // Like `retry=true`, it needs the key of the first try; anything else is refused.
        q.claim("?retry=only", Some("w1")).await.bad_param("retry");
        keyed_claim(&q, "?retry=later", "w1", KEY)
            .await
            .bad_param("retry");
    })
    .await;
}

/// A key names a claim of one claimant in one environment: the same key sent with another
/// credential, or to another environment, is another claim, even one marked as sent again.
#[tokio::test]
async fn a_key_is_one_claimants_in_one_environment() {
    each_backend(async |server| {
        let q = Queue::new(server).await;
        let first = q.enqueue().await;
        let second = q.enqueue().await;
        let (id, token, _) = claimed(&keyed_claim(&q, "", "w1", KEY).await);
        assert_eq!(id, first.id);

        let key = q.req(Method::POST, &format!("/environments/{}/keys", q.env));
        let env_key = key.send().await.ok()["token"].as_str().unwrap().to_owned();
        let path = q.path("/claim?retry=true");
        let request = q.req(Method::POST, &path).bearer(&env_key).worker("w1");
        let other = request.header("idempotency-key", KEY).send().await;
        let (other_id, other_token, _) = claimed(&other);
        assert_eq!(
            other_id, second.id,
            "another credential's claim takes its own item"
        );
        assert_ne!(other_token, token);
        assert_eq!(other.ok()["earlier_try"], false);

        let elsewhere = Queue::new(server).await;
        let answer = keyed_claim(&elsewhere, "?retry=true", "w1", KEY).await;
        assert_eq!(
            answer.ok(),
            &Value::Null,
            "nothing of the first environment's"
        );
    })
    .await;
}

#[tokio::test]
async fn a_claims_key_must_be_a_plain_long_string() {
    each_backend(async |server| {
        let q = Queue::new(server).await;
        q.enqueue().await;
        for key in [
            "short",
            "fifteen-chars-k",
            "has a space in it, so no",
            &"k".repeat(256),
        ] {
            keyed_claim(&q, "", "w1", key)
                .await
                .bad_param("Idempotency-Key");
        }
        let path = q.path("/claim");
        let twice = q.req(Method::POST, &path).worker("w1");
        let twice = twice
            .header("idempotency-key", KEY)
            .header("idempotency-key", KEY);
        twice.send().await.bad_param("Idempotency-Key");
        // Only a claim with a key can be one sent again.
        q.claim("?retry=true", Some("w1")).await.bad_param("retry");
        // A key is a worker's.
        let anonymous = q.req(Method::POST, &path).header("idempotency-key", KEY);
        anonymous.send().await.bad_param("Idempotency-Key");
        let (_, _, _) = claimed(&keyed_claim(&q, "", "w1", &"k".repeat(255)).await);
        // The shortest key taken: 16 characters (another worker, so another claim).
        q.enqueue().await;
        let (_, _, _) = claimed(&keyed_claim(&q, "", "w2", &"k".repeat(16)).await);
    })
    .await;
}

/// A claim with `stop` (sent as `worker`, with an `Idempotency-Key` when `key` is given).
async fn claim_stopping(
    q: &Queue<'_>,
    query: &str,
    worker: &str,
    key: Option<&str>,
    stop: Value,
) -> Reply {
    let path = q.path(&format!("/claim{query}"));
    let request = q.req(Method::POST, &path).worker(worker);
    let request = match key {
        Some(key) => request.header("idempotency-key", key),
        None => request,
    };
    request.json(json!({ "stop": stop })).send().await
}

/// A claim with `stop` ends the worker's finished item, then claims: one request per item. The
/// stop is the holder's forced stop, proven by the item's session token; sent again with its key the
/// claim answers the same item and finds its stop done; a token that does not hold the item, an
/// unknown item, a bad body or an open turn is refused, and then nothing is claimed.
#[tokio::test]
async fn a_claim_with_stop_ends_the_finished_item_then_takes_the_next() {
    each_backend(async |server| {
        let q = Queue::new(server).await;
        let first = q.enqueue().await;
        let second = q.enqueue().await;
        let third = q.enqueue().await;
        let (a, token_a, _) = claimed(&keyed_claim(&q, "", "w1", KEY).await);
        assert_eq!(a, first.id);

        // Ends `a`, takes the next.
        let key_b = "fedcba9876543210fedcba9876543210";
        let stop_a = json!({"work_id": a, "session_token": token_a});
        let reply = claim_stopping(&q, "", "w1", Some(key_b), stop_a.clone()).await;
        let (b, token_b, _) = claimed(&reply);
        assert_eq!(b, second.id);
        // The answer says the stop was made (a server that ignores the body would not).
        assert_eq!(reply.header("tether-stopped"), Some(a.as_str()));
        assert_eq!(q.state(&a).await, "stopped");
        assert_eq!(
            q.causes(&a).await,
            ["enqueued", "delivered", "acked", "first_heartbeat", "force_stopped"]
        );
        let stop = q.history(&a).await.last().cloned().unwrap();
        let detail = stop["detail"].as_str().unwrap_or_default();
        assert!(detail.ends_with("asked for by the item's session token, sent with a claim"), "{stop}");
        // Its answer lost, the same claim is sent again: the stop is found done, the item is the
        // one the first try took, and nothing more is written.
        let again = claim_stopping(&q, "?retry=true", "w1", Some(key_b), stop_a).await;
        assert_eq!(claimed(&again).0, b);
        assert_eq!(again.header("tether-stopped"), Some(a.as_str()));
        assert_eq!(again.ok()["earlier_try"], true);
        assert_eq!(q.causes(&a).await.len(), 5);
        assert_eq!(q.state(&third.id).await, "queued");

        // A token that does not hold `b` (another item's, or none that was ever minted) cannot end
        // it, nor can anyone end an item that is not there: refused, and nothing is claimed.
        for token in [token_a.as_str(), "tth_ses_not_a_token"] {
            let stop = json!({"work_id": b, "session_token": token});
            let refused = claim_stopping(&q, "", "w2", None, stop).await;
            let refusal = refused.error(409, "invalid_request_error");
            assert_eq!(refusal["code"], "not_held");
        }
        assert_eq!(q.state(&b).await, "active");
        let unknown = json!({"work_id": "work_0190a1b2c3d4e5f60718293a4b5c6d7e", "session_token": token_b});
        let missing = claim_stopping(&q, "", "w1", None, unknown).await;
        // (The worker tells this refusal, the stop's, from a claim's own 404 by its code.)
        assert_eq!(missing.error(404, "not_found_error")["code"], "work_not_found");
        // Nor can another environment's claim, even with the token: the item is not in its queue.
        let elsewhere = Queue::new(server).await;
        let stop = json!({"work_id": b, "session_token": token_b});
        let refused = claim_stopping(&elsewhere, "", "w1", None, stop).await;
        assert_eq!(refused.error(404, "not_found_error")["code"], "work_not_found");
        assert_eq!(q.state(&b).await, "active");

        // A body that does not say which item and with what token is refused before anything.
        for (stop, message) in [
            (json!({"work_id": b}), "stop.session_token is required"),
            (json!({"work_id": 5, "session_token": token_b}), "stop.work_id must be a string"),
            (json!({"work_id": b, "session_token": token_b, "unless_turn_open": "yes"}), "stop.unless_turn_open must be a boolean"),
            (json!("work_1"), "stop must be an object with the item's work_id and session_token"),
        ] {
            let refused = claim_stopping(&q, "", "w1", None, stop).await;
            let refusal = refused.error(400, "invalid_request_error");
            assert_eq!((refusal["param"].as_str(), refusal["message"].as_str()), (Some("stop"), Some(message)));
        }
        assert_eq!(q.state(&third.id).await, "queued");

        // Input that came while the program was ending leaves the turn open: a stop that must not
        // end it is refused, and nothing is claimed.
        let input = json!({"events": [{"type": "user.message", "content": [{"type": "text", "text": "hi"}]}]});
        let events = format!("/sessions/{}/events", second.session);
        q.req(Method::POST, &events).json(input).send().await.ok();
        let unless = json!({"work_id": b, "session_token": token_b, "unless_turn_open": true});
        let refused = claim_stopping(&q, "", "w1", None, unless).await;
        assert_eq!(refused.error(409, "invalid_request_error")["code"], "turn_open");
        assert_eq!(q.state(&b).await, "active");
        assert_eq!(q.state(&third.id).await, "queued");

        // Without the condition it goes through; with nothing left to claim the answer is null.
        let stop_b = json!({"work_id": b, "session_token": token_b});
        let (c, token_c, _) = claimed(&claim_stopping(&q, "", "w1", None, stop_b).await);
        assert_eq!(c, third.id);
        assert_eq!(q.state(&b).await, "stopped");
        let stop_c = json!({"work_id": c, "session_token": token_c});
        let last = claim_stopping(&q, "?block_ms=20", "w1", None, stop_c).await;
        assert_eq!(last.ok(), &Value::Null);
        assert_eq!(last.header("tether-stopped"), Some(c.as_str()));
        // A claim without a stop says none.
        let plain = q.claim("", Some("w3")).await;
        assert_eq!(plain.header("tether-stopped"), None);
        assert_eq!(plain.ok(), &Value::Null);
        assert_eq!(q.state(&c).await, "stopped");
    })
    .await;
}

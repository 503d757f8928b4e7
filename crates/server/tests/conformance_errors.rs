//! Conformance of the error surface over real HTTP: every error row of §6 on every work endpoint, the
//! check order of D-32 (401 → 403 → 404 environment → 400 environment kind → 404 item → 400 parameters →
//! 409 → 412), credentials (§1.2, §11.1), request bodies (§1.3), request ids (D-18) and the envelope
//! (§1.7) on routes and methods the API does not have. Each test runs once per backend.

mod conformance;

use conformance::*;

/// The work endpoints of §6 and the history of §11.2: name, method, path after `/environments/{env}/work`
/// with `{work}` standing for the item id.
const ENDPOINTS: [(&str, &str, &str); 9] = [
    ("list", "GET", ""),
    ("poll", "GET", "/poll"),
    ("stats", "GET", "/stats"),
    ("get", "GET", "/{work}"),
    ("update", "POST", "/{work}"),
    ("ack", "POST", "/{work}/ack"),
    ("heartbeat", "POST", "/{work}/heartbeat"),
    ("stop", "POST", "/{work}/stop"),
    ("history", "GET", "/{work}/history"),
];

fn method(name: &str) -> Method {
    Method::from_bytes(name.as_bytes()).unwrap()
}

fn endpoint_path(env: &str, work: &str, suffix: &str) -> String {
    format!("/environments/{env}/work{}", suffix.replace("{work}", work))
}

fn has_item(suffix: &str) -> bool {
    suffix.contains("{work}")
}

/// A fresh secret of `prefix` that no server minted.
fn forged(prefix: &str) -> String {
    format!("{prefix}{}", "A".repeat(43))
}

#[tokio::test]
async fn every_work_endpoint_requires_a_valid_credential() {
    each_backend(async |server| {
        let q = Queue::new(server).await;
        let item = q.enqueue().await;
        let admin = server.admin_token.clone();
        for (name, m, suffix) in ENDPOINTS {
            let path = endpoint_path(&q.env, &item.id, suffix);
            let anonymous = req(server, method(m), &path).anonymous().send().await;
            anonymous.error(401, "authentication_error");
            for token in [
                "garbage".to_owned(),
                forged("tth_adm_"),
                forged("tth_env_"),
                forged("tth_ses_"),
                format!("{admin}x"),
            ] {
                let reply = req(server, method(m), &path).bearer(&token).send().await;
                reply.error(401, "authentication_error");
            }
            for header in [
                format!("Basic {admin}"),
                "Bearer".to_owned(),
                "Bearer    ".to_owned(),
                admin.clone(),
            ] {
                let reply = req(server, method(m), &path)
                    .anonymous()
                    .header("Authorization", &header)
                    .send()
                    .await;
                assert_eq!(
                    reply.status,
                    StatusCode::UNAUTHORIZED,
                    "{name}: Authorization: {header}"
                );
            }
            // The Qoder profile documents x-api-key as a 401 case.
            let x_api_key = req(server, method(m), &path)
                .anonymous()
                .header("x-api-key", &admin)
                .send()
                .await;
            x_api_key.error(401, "authentication_error");
            // 401 comes before everything else (D-32).
            let unknown_env = endpoint_path(&unknown_id("env"), &unknown_id("work"), suffix);
            req(
                server,
                method(m),
                &format!("{unknown_env}?block_ms=abc&limit=0"),
            )
            .anonymous()
            .send()
            .await
            .error(401, "authentication_error");
        }
        assert_eq!(
            q.get(&item.id).await["state"],
            "queued",
            "refused requests changed nothing"
        );
        assert_eq!(q.causes(&item.id).await, ["enqueued"]);

        // The Anthropic prefix takes the same token as x-api-key, and as Bearer.
        let v1 = req_v1(server, Method::GET, &q.path(""))
            .anonymous()
            .header("x-api-key", &admin)
            .send()
            .await;
        assert_eq!(v1.ok()["data"].as_array().unwrap().len(), 1);
        req_v1(server, Method::GET, &q.path("")).send().await.ok();
        req_v1(server, Method::GET, &q.path(""))
            .anonymous()
            .header("x-api-key", "nope")
            .send()
            .await
            .error(401, "authentication_error");
    })
    .await;
}

#[tokio::test]
async fn environment_keys_and_session_tokens_are_scoped() {
    each_backend(async |server| {
        let a = Queue::new(server).await;
        let b = Queue {
            server,
            env: server.self_hosted_environment().await,
            agent: a.agent.clone(),
        };
        let a_item = a.enqueue().await;
        let b_item = b.enqueue().await;
        let key = req(
            server,
            Method::POST,
            &format!("/environments/{}/keys", a.env),
        )
        .json(json!({"name": "worker"}))
        .send()
        .await;
        let key = key.ok().clone();
        let key_secret = key["token"].as_str().unwrap().to_owned();
        assert!(key_secret.starts_with("tth_env_"), "{key}");

        // The key opens A's queue …
        for (name, m, suffix) in ENDPOINTS {
            if m == "GET" {
                let reply = req(
                    server,
                    method(m),
                    &endpoint_path(&a.env, &a_item.id, suffix),
                )
                .bearer(&key_secret)
                .send()
                .await;
                assert_eq!(reply.status, StatusCode::OK, "{name}: {}", reply.body);
            }
        }
        // … and nothing of B's: 403, before the item or the parameters are looked at (D-32).
        for (name, m, suffix) in ENDPOINTS {
            for work in [
                b_item.id.clone(),
                unknown_id("work"),
                "work_malformed".to_owned(),
                // %-escapes that decode to no UTF-8 text.
                "work_%ff".to_owned(),
            ] {
                let path = endpoint_path(&b.env, &work, suffix);
                let reply = req(
                    server,
                    method(m),
                    &format!("{path}?block_ms=0&limit=0&expected_last_heartbeat=x"),
                )
                .bearer(&key_secret)
                .raw("{not json")
                .send()
                .await;
                reply.error(403, "permission_error");
                let _ = name;
            }
            // 403 before 404 environment.
            let unknown = endpoint_path(&unknown_id("env"), &unknown_id("work"), suffix);
            req(server, method(m), &unknown)
                .bearer(&key_secret)
                .send()
                .await
                .error(403, "permission_error");
        }
        let long_worker = "w".repeat(300);
        let reply = req(server, Method::GET, &b.path("/poll"))
            .bearer(&key_secret)
            .worker(&long_worker)
            .send()
            .await;
        reply.error(403, "permission_error");
        let reply = req(server, Method::POST, &b.item_path(&b_item.id, "/ack"))
            .bearer(&key_secret)
            .worker(&long_worker)
            .send()
            .await;
        reply.error(403, "permission_error");
        // Admin-only endpoints.
        for (m, path) in [
            (Method::GET, "/environments".to_owned()),
            (Method::POST, "/environments".to_owned()),
            (Method::POST, format!("/environments/{}", a.env)),
            (Method::POST, format!("/environments/{}/archive", a.env)),
            (Method::DELETE, format!("/environments/{}", a.env)),
            (Method::GET, format!("/environments/{}/keys", a.env)),
            (Method::POST, format!("/environments/{}/keys", a.env)),
            (Method::POST, "/agents".to_owned()),
            (Method::GET, "/agents".to_owned()),
            (Method::POST, "/sessions".to_owned()),
            (Method::GET, "/tokens".to_owned()),
            (Method::POST, "/tokens".to_owned()),
        ] {
            let reply = req(server, m.clone(), &path)
                .bearer(&key_secret)
                .json(json!({"name": "x", "config": {"type": "self_hosted"}}))
                .send()
                .await;
            reply.error(403, "permission_error");
        }
        // B's work is untouched.
        assert_eq!(b.causes(&b_item.id).await, ["enqueued"]);

        // The session token of a delivery opens its own item only.
        let polled = a
            .poll("?reclaim_older_than_ms=0", Some("w1"))
            .await
            .ok()
            .clone();
        assert_eq!(polled["id"], a_item.id.as_str());
        let (session_token, _) = decode_secret(&polled);
        let own = |suffix: &str| a.item_path(&a_item.id, suffix);
        req(server, Method::GET, &own(""))
            .bearer(&session_token)
            .send()
            .await
            .ok();
        req(server, Method::POST, &own(""))
            .bearer(&session_token)
            .json(json!({"metadata": {"by": "worker"}}))
            .send()
            .await
            .ok();
        req(server, Method::POST, &own("/ack"))
            .bearer(&session_token)
            .worker("w1")
            .send()
            .await
            .ok();
        let beat = req(
            server,
            Method::POST,
            &own("/heartbeat?expected_last_heartbeat=NO_HEARTBEAT"),
        )
        .bearer(&session_token)
        .send()
        .await;
        assert_eq!(beat.ok()["state"], "active");
        let other = a.enqueue().await;
        for (_, m, suffix) in ENDPOINTS {
            let work = if has_item(suffix) {
                &other.id
            } else {
                &a_item.id
            };
            let reply = req(server, method(m), &endpoint_path(&a.env, work, suffix))
                .bearer(&session_token)
                .send()
                .await;
            reply.error(403, "permission_error");
            let reply = req(
                server,
                method(m),
                &endpoint_path(&b.env, &b_item.id, suffix),
            )
            .bearer(&session_token)
            .send()
            .await;
            reply.error(403, "permission_error");
        }
        // It dies when the item stops (§11.1).
        req(server, Method::POST, &own("/stop"))
            .bearer(&session_token)
            .json(json!({"force": true}))
            .send()
            .await
            .ok();
        req(server, Method::GET, &own(""))
            .bearer(&session_token)
            .send()
            .await
            .error(401, "authentication_error");

        // A revoked key is unknown from then on: 401.
        let key_id = key["id"].as_str().unwrap();
        req(
            server,
            Method::DELETE,
            &format!("/environments/{}/keys/{key_id}", a.env),
        )
        .send()
        .await
        .ok();
        req(server, Method::GET, &a.path(""))
            .bearer(&key_secret)
            .send()
            .await
            .error(401, "authentication_error");
        req(server, Method::GET, &b.path(""))
            .bearer(&key_secret)
            .send()
            .await
            .error(401, "authentication_error");
    })
    .await;
}

#[tokio::test]
async fn unknown_and_malformed_ids_are_404() {
    each_backend(async |server| {
        let q = Queue::new(server).await;
        let item = q.enqueue().await;
        let elsewhere = Queue {
            server,
            env: server.self_hosted_environment().await,
            agent: q.agent.clone(),
        };
        let foreign = elsewhere.enqueue().await;

        let bad_envs = [
            unknown_id("env"),
            "env_123".to_owned(),
            q.env.to_uppercase(),
            q.env.replace("env_", "sess_"),
            format!("{}0", q.env),
            item.session.clone(),
            "environment".to_owned(),
            // %-escapes that decode to no UTF-8 text, and one that does.
            "%ff".to_owned(),
            format!("{}%c3%28", q.env),
            "env_%e2%82%ac".to_owned(),
        ];
        for env in &bad_envs {
            for (name, m, suffix) in ENDPOINTS {
                let reply = req(server, method(m), &endpoint_path(env, &item.id, suffix))
                    .send()
                    .await;
                assert_eq!(
                    reply.status,
                    StatusCode::NOT_FOUND,
                    "{name} on environment {env}: {}",
                    reply.body
                );
                reply.error(404, "not_found_error");
            }
        }
        let bad_items = [
            unknown_id("work"),
            "work_xyz".to_owned(),
            item.id.to_uppercase(),
            item.id.replace("work_", "sess_"),
            format!("{}0", item.id),
            item.session.clone(),
            q.env.clone(),
            foreign.id.clone(),
            "%ff".to_owned(),
            format!("{}%80", item.id),
        ];
        for work in &bad_items {
            for (name, m, suffix) in ENDPOINTS.iter().filter(|(_, _, s)| has_item(s)) {
                let reply = req(server, method(m), &endpoint_path(&q.env, work, suffix))
                    .send()
                    .await;
                assert_eq!(
                    reply.status,
                    StatusCode::NOT_FOUND,
                    "{name} on item {work}: {}",
                    reply.body
                );
                reply.error(404, "not_found_error");
            }
        }
        // Long ones, within what a connection reads of a head (`H1_MAX_BUFFER`): a segment of 9,000
        // bad bytes, and 7,000 segments of one, which would outgrow a URI's 64 KiB once each is
        // escaped as U+FFFD.
        let long = format!("/environments/{}", "%ff".repeat(9_000));
        let many = format!("/environments/{}x", "%ff/".repeat(7_000));
        for path in [
            "/environments/%ff",
            "/sessions/sess_%c3%28",
            "/agents/%80",
            &long,
            &many,
        ] {
            let reply = req(server, Method::GET, path).send().await;
            reply.error(404, "not_found_error");
        }
        assert_eq!(q.causes(&item.id).await, ["enqueued"]);
        assert_eq!(
            elsewhere.causes(&foreign.id).await,
            ["enqueued"],
            "another environment's item was not touched"
        );
    })
    .await;
}

#[tokio::test]
async fn cloud_environments_have_no_queue() {
    each_backend(async |server| {
        for config in [
            json!({"type": "cloud"}),
            json!({"type": "managed", "networking": {"type": "limited"}}),
        ] {
            let env = req(server, Method::POST, "/environments")
                .json(json!({"name": "c", "config": config}))
                .send()
                .await;
            let env = env.ok()["id"].as_str().unwrap().to_owned();
            for (name, m, suffix) in ENDPOINTS {
                // 400 for the kind comes before 404 for the item and 400 for parameters (D-32).
                for work in [unknown_id("work"), "work_bad".to_owned()] {
                    let path = endpoint_path(&env, &work, suffix);
                    let reply = req(
                        server,
                        method(m),
                        &format!("{path}?block_ms=abc&limit=0&desired_ttl_seconds=0"),
                    )
                    .raw("{bad")
                    .send()
                    .await;
                    assert_eq!(
                        reply.status,
                        StatusCode::BAD_REQUEST,
                        "{name}: {}",
                        reply.body
                    );
                    reply.bad_param("environment_id");
                }
            }
        }
    })
    .await;
}

#[tokio::test]
async fn poll_parameters() {
    each_backend(async |server| {
        let q = Queue::new(server).await;
        for bad in ["0", "1000", "-1", "abc", "1.5", "", "99999999999999999999"] {
            q.poll(&format!("?block_ms={bad}"), Some("w"))
                .await
                .bad_param("block_ms");
        }
        for bad in ["-1", "abc", "0.5", "", "-99999999999999999999"] {
            q.poll(&format!("?reclaim_older_than_ms={bad}"), Some("w"))
                .await
                .bad_param("reclaim_older_than_ms");
        }
        for good in [
            "?block_ms=1",
            "?reclaim_older_than_ms=0",
            "?block_ms=1&reclaim_older_than_ms=0",
            "?reclaim_older_than_ms=600000",
            // Past i64: still a non-negative integer, as good as the range's end.
            "?reclaim_older_than_ms=99999999999999999999",
        ] {
            assert_eq!(q.poll(good, Some("w")).await.ok(), &Value::Null, "{good}");
        }
        // A parameter of one value given twice: which one was meant is a guess.
        q.poll("?block_ms=1&block_ms=2", Some("w"))
            .await
            .bad_param("block_ms");
        q.req(Method::GET, &q.path("?limit=2&limit=3"))
            .send()
            .await
            .bad_param("limit");
        // The repeatable ones take every value.
        q.req(Method::GET, &q.path("?state=queued&state=active"))
            .send()
            .await
            .ok();
        // The work list clamps `limit` above 100 (§6.1), past i64 as well.
        for limit in ["101", "99999999999999999999"] {
            q.req(Method::GET, &q.path(&format!("?limit={limit}")))
                .send()
                .await
                .ok();
        }
        // block_ms=999 with an item waiting answers at once with it.
        let item = q.enqueue().await;
        assert_eq!(
            q.poll("?block_ms=999", Some("w")).await.ok()["id"],
            item.id.as_str()
        );
        assert_eq!(
            q.stats().await["pending"],
            1,
            "no invalid poll delivered anything"
        );
        q.ack(&item.id, Some("w")).await.ok();

        // The Anthropic profile: reclaim_older_than_ms ≥ 1, `beta` and the SDK headers are tolerated.
        let admin = server.admin_token.clone();
        let v1 = |query: &str| {
            req_v1(server, Method::GET, &q.path(&format!("/poll{query}")))
                .anonymous()
                .header("x-api-key", &admin)
                .header("anthropic-beta", "managed-agents-2026-04-01")
                .header("anthropic-version", "2023-06-01")
        };
        v1("?reclaim_older_than_ms=0")
            .send()
            .await
            .bad_param("reclaim_older_than_ms");
        v1("?reclaim_older_than_ms=-1&beta=true")
            .send()
            .await
            .bad_param("reclaim_older_than_ms");
        v1("?block_ms=0&beta=true")
            .send()
            .await
            .bad_param("block_ms");
        let second = q.enqueue().await;
        let got = v1("?beta=true&reclaim_older_than_ms=1")
            .header("Anthropic-Worker-ID", "anthropic-worker")
            .send()
            .await;
        let got = got.ok();
        assert_eq!(got["id"], second.id.as_str());
        let (_, base) = decode_secret(got);
        assert_eq!(
            base,
            server.v1(""),
            "the secret points workers at the prefix they came in on"
        );
        assert_eq!(
            q.stats().await["workers_polling"],
            2,
            "Anthropic-Worker-ID counts as a worker"
        );
    })
    .await;
}

#[tokio::test]
async fn worker_id_header_limits() {
    each_backend(async |server| {
        let q = Queue::new(server).await;
        let too_long = "w".repeat(257);
        let longest = "w".repeat(256);
        let item = q.enqueue().await;
        q.poll("", Some(&too_long))
            .await
            .error(400, "invalid_request_error");
        q.ack(&item.id, Some(&too_long))
            .await
            .error(400, "invalid_request_error");
        assert_eq!(q.stats().await["depth"], 1, "the refused poll took nothing");
        assert_eq!(
            q.poll("", Some(&longest)).await.ok()["id"],
            item.id.as_str()
        );
        assert_eq!(
            q.ack(&item.id, Some(&longest)).await.ok()["state"],
            "starting"
        );
        let reply = q.heartbeat_as(&item.id, &too_long).await;
        reply.error(400, "invalid_request_error");
        let reply = q.heartbeat_as(&item.id, &longest).await;
        assert_eq!(reply.ok()["state"], "active");
    })
    .await;
}

/// D-32 where two things are wrong at once: the earlier check in the order decides the answer.
#[tokio::test]
async fn check_order_d32() {
    each_backend(async |server| {
        let q = Queue::new(server).await;
        let long_worker = "w".repeat(300);
        let unknown_env = unknown_id("env");
        let unknown_work = unknown_id("work");

        // 404 environment before 400 parameters, headers and bodies.
        for (name, m, suffix) in ENDPOINTS {
            let path = endpoint_path(&unknown_env, &unknown_work, suffix);
            let query = "?block_ms=0&reclaim_older_than_ms=-1&limit=0&page=x&after_id=y&expected_last_heartbeat=bad&desired_ttl_seconds=0";
            let reply = req(server, method(m), &format!("{path}{query}"))
                .send()
                .await;
            assert_eq!(
                reply.status,
                StatusCode::NOT_FOUND,
                "{name} with bad parameters: {}",
                reply.body
            );
            let reply = req(server, method(m), &path)
                .worker(&long_worker)
                .send()
                .await;
            assert_eq!(
                reply.status,
                StatusCode::NOT_FOUND,
                "{name} with an overlong Worker-ID: {}",
                reply.body
            );
            let reply = req(server, method(m), &path).raw("{not json").send().await;
            assert_eq!(
                reply.status,
                StatusCode::NOT_FOUND,
                "{name} with a malformed body: {}",
                reply.body
            );
            reply.error(404, "not_found_error");
        }

        // 404 item before 400 parameters, headers and bodies.
        let item_cases: [(&str, &str, Req<'_>); 9] = [
            (
                "heartbeat bad E",
                "",
                q.req(
                    Method::POST,
                    &q.item_path(&unknown_work, "/heartbeat?expected_last_heartbeat=bad"),
                ),
            ),
            (
                "heartbeat ttl 0",
                "",
                q.req(
                    Method::POST,
                    &q.item_path(&unknown_work, "/heartbeat?desired_ttl_seconds=0"),
                ),
            ),
            (
                "heartbeat long Worker-ID",
                "",
                q.req(Method::POST, &q.item_path(&unknown_work, "/heartbeat"))
                    .worker(&long_worker),
            ),
            (
                "ack long Worker-ID",
                "",
                q.req(Method::POST, &q.item_path(&unknown_work, "/ack"))
                    .worker(&long_worker),
            ),
            (
                "stop force not a boolean",
                "",
                q.req(Method::POST, &q.item_path(&unknown_work, "/stop"))
                    .json(json!({"force": "yes"})),
            ),
            (
                "stop malformed JSON",
                "",
                q.req(Method::POST, &q.item_path(&unknown_work, "/stop"))
                    .raw("{not json"),
            ),
            (
                "update bad metadata",
                "",
                q.req(Method::POST, &q.item_path(&unknown_work, ""))
                    .json(json!({"metadata": {"k": 1}})),
            ),
            (
                "update malformed JSON",
                "",
                q.req(Method::POST, &q.item_path(&unknown_work, ""))
                    .raw("[1,"),
            ),
            (
                "history limit 0",
                "",
                q.req(Method::GET, &q.item_path(&unknown_work, "/history?limit=0")),
            ),
        ];
        for (what, _, r) in item_cases {
            let reply = r.send().await;
            assert_eq!(
                reply.status,
                StatusCode::NOT_FOUND,
                "{what}: {}",
                reply.body
            );
            reply.error(404, "not_found_error");
        }

        // 400 parameters before 409 state.
        let stopped = q.item_in("stopped").await;
        let queued = q.item_in("queued").await;
        let stopping = q.item_in("stopping").await;
        let mut snapshots = Vec::new();
        for item in [&stopped, &queued, &stopping] {
            snapshots.push(q.get(&item.id).await);
        }
        q.heartbeat(&stopped.id, "?expected_last_heartbeat=bad")
            .await
            .bad_param("expected_last_heartbeat");
        q.heartbeat(&queued.id, "?desired_ttl_seconds=-5")
            .await
            .bad_param("desired_ttl_seconds");
        q.stop(&stopped.id, json!({"force": "yes"}))
            .await
            .bad_param("force");
        q.req(Method::POST, &q.item_path(&stopped.id, "/stop"))
            .raw("{not json")
            .send()
            .await
            .error(400, "invalid_request_error");
        q.req(Method::POST, &q.item_path(&stopping.id, "/ack"))
            .worker(&long_worker)
            .send()
            .await
            .error(400, "invalid_request_error");
        q.heartbeat_as(&queued.id, &long_worker).await
            .error(400, "invalid_request_error");

        // 409 state before 412 precondition.
        let someone = "2020-01-01T00:00:00Z";
        q.heartbeat(&queued.id, &format!("?expected_last_heartbeat={someone}"))
            .await
            .error(409, "invalid_request_error");
        q.heartbeat(&stopped.id, "?expected_last_heartbeat=NO_HEARTBEAT")
            .await
            .error(409, "invalid_request_error");
        for (item, before) in [&stopped, &queued, &stopping].into_iter().zip(&snapshots) {
            assert_eq!(
                &q.get(&item.id).await,
                before,
                "nothing refused had an effect"
            );
        }
        // A queued item delivered to w1: a heartbeat naming w2 is a state conflict (409), not the
        // D-7b precondition failure (412).
        let other = Queue::new(server).await;
        let delivered = other.enqueue().await;
        assert_eq!(
            other.poll("", Some("w1")).await.ok()["id"],
            delivered.id.as_str()
        );
        let foreign = other
            .req(
                Method::POST,
                &other.item_path(
                    &delivered.id,
                    "/heartbeat?expected_last_heartbeat=NO_HEARTBEAT",
                ),
            )
            .worker("w2")
            .send()
            .await;
        foreign.error(409, "invalid_request_error");
    })
    .await;
}

#[tokio::test]
async fn request_bodies() {
    each_backend(async |server| {
        let q = Queue::new(server).await;

        // Ack takes no body and ignores any; no body, empty and `{}` are all accepted.
        for body in [
            Body::None,
            Body::Raw(String::new()),
            Body::Raw("  \n".into()),
            Body::Json(json!({})),
            Body::Raw("{not json".into()),
            Body::Json(json!({"anything": [1, 2]})),
        ] {
            let item = q.enqueue().await;
            let what = format!("{body:?}");
            let reply = q
                .req(Method::POST, &q.item_path(&item.id, "/ack"))
                .body(body)
                .send()
                .await;
            assert_eq!(reply.ok()["state"], "starting", "ack with {what}");
        }

        // Stop: unknown fields are ignored (D-17); a body without Content-Type is JSON all the same.
        let item = q.item_in("active").await;
        let reply = q
            .stop(
                &item.id,
                json!({"force": false, "reason": "drain", "extra": {"x": 1}}),
            )
            .await;
        assert_eq!(reply.ok()["state"], "stopping");
        let reply = q
            .req(Method::POST, &q.item_path(&item.id, "/stop"))
            .raw(r#"{"force": true}"#)
            .send()
            .await;
        assert!(reply.header("content-type").is_some());
        assert_eq!(
            reply.ok()["state"],
            "stopped",
            "a JSON body without Content-Type is read"
        );
        let item = q.item_in("active").await;
        let reply = q
            .req(Method::POST, &q.item_path(&item.id, "/stop"))
            .header("Content-Type", "text/plain")
            .raw(r#"{"force": true}"#)
            .send()
            .await;
        assert_eq!(
            reply.ok()["state"],
            "stopped",
            "a misleading Content-Type does not matter"
        );

        // Malformed JSON and wrong shapes: 400 in the envelope, nothing changes.
        let item = q.item_in("active").await;
        let before = q.get(&item.id).await;
        for raw in [
            "{not json",
            "{\"force\": tru}",
            "[",
            "\"force\"",
            "[]",
            "42",
            "{\"force\": 1}",
            "{\"force\": \"true\"}",
            "{\"force\": [true]}",
        ] {
            let reply = q
                .req(Method::POST, &q.item_path(&item.id, "/stop"))
                .raw(raw)
                .send()
                .await;
            reply.error(400, "invalid_request_error");
        }
        for raw in [
            "{not json",
            "[]",
            "\"metadata\"",
            "{\"metadata\": []}",
            "{\"metadata\": \"x\"}",
            "{\"metadata\": {\"k\": 1}}",
        ] {
            let reply = q
                .req(Method::POST, &q.item_path(&item.id, ""))
                .raw(raw)
                .send()
                .await;
            reply.error(400, "invalid_request_error");
        }
        assert_eq!(q.get(&item.id).await, before);
        // Metadata update ignores unknown fields.
        let reply = q
            .req(Method::POST, &q.item_path(&item.id, ""))
            .json(json!({"metadata": {"a": "b"}, "other": [1]}))
            .send()
            .await;
        assert_eq!(reply.ok()["metadata"], json!({"a": "b"}));

        // Bodies elsewhere: malformed → 400 envelope; unknown fields ignored.
        req(server, Method::POST, "/environments")
            .raw("{\"name\": ")
            .send()
            .await
            .error(400, "invalid_request_error");
        req(server, Method::POST, "/agents")
            .raw("nope")
            .send()
            .await
            .error(400, "invalid_request_error");
        req(server, Method::POST, "/sessions")
            .raw("[1]")
            .send()
            .await
            .error(400, "invalid_request_error");
        let env = req(server, Method::POST, "/environments")
            .json(json!({"name": "n", "config": {"type": "self_hosted"}, "unknown": 1}))
            .send()
            .await;
        assert_eq!(env.ok()["name"], "n");
    })
    .await;
}

#[tokio::test]
async fn oversized_bodies_are_400() {
    for backend in backends() {
        let limit = 4096;
        let server = TestServer::start_with(
            &backend,
            Options {
                body_limit: limit,
                ..Options::default()
            },
        )
        .await;
        let q = Queue::new(&server).await;
        let item = q.item_in("active").await;
        let pad = "x".repeat(limit * 2);
        let big_stop = json!({"force": true, "pad": pad});
        q.stop(&item.id, big_stop)
            .await
            .error(400, "invalid_request_error");
        let big_meta = json!({"metadata": {"k": "v"}, "pad": pad});
        q.req(Method::POST, &q.item_path(&item.id, ""))
            .json(big_meta)
            .send()
            .await
            .error(400, "invalid_request_error");
        let big_env = json!({"name": "n", "config": {"type": "self_hosted"}, "description": pad});
        req(&server, Method::POST, "/environments")
            .json(big_env)
            .send()
            .await
            .error(400, "invalid_request_error");
        let big_session = json!({"agent": q.agent, "environment_id": q.env, "title": pad});
        req(&server, Method::POST, "/sessions")
            .json(big_session)
            .send()
            .await
            .error(400, "invalid_request_error");
        assert_eq!(
            q.get(&item.id).await["state"],
            "active",
            "the oversized stop did nothing"
        );
        // Just under the limit is fine.
        let fits = json!({"force": true, "pad": "x".repeat(limit - 100)});
        assert_eq!(q.stop(&item.id, fits).await.ok()["state"], "stopped");
        server.shutdown().await;
    }
}

#[tokio::test]
async fn request_ids_are_echoed_or_generated() {
    each_backend(async |server| {
        let q = Queue::new(server).await;
        let item = q.enqueue().await;

        // Echoed on success and on error, in the header and in the envelope (D-18).
        let ok = q
            .req(Method::GET, &q.item_path(&item.id, ""))
            .header("x-request-id", "client-req-1")
            .send()
            .await;
        ok.ok();
        assert_eq!(ok.header("x-request-id"), Some("client-req-1"));
        let err = q
            .req(Method::GET, &q.item_path(&unknown_id("work"), ""))
            .header("X-Request-ID", "client-req-2")
            .send()
            .await;
        err.error(404, "not_found_error");
        assert_eq!(err.body["request_id"], "client-req-2");
        let unauth = q
            .req(Method::GET, &q.path(""))
            .anonymous()
            .header("x-request-id", "client-req-3")
            .send()
            .await;
        unauth.error(401, "authentication_error");
        assert_eq!(unauth.body["request_id"], "client-req-3");
        let bad = q.poll("?block_ms=0", None).await;
        bad.bad_param("block_ms");

        // Generated otherwise: a dashed UUID, the same in the header and the envelope, fresh each time.
        let generated = bad.header("x-request-id").unwrap().to_owned();
        let uuid = uuid::Uuid::parse_str(&generated).expect("a UUID");
        assert_eq!(uuid.hyphenated().to_string(), generated, "dashed form");
        assert_eq!(bad.body["request_id"], json!(generated));
        let again = q.poll("?block_ms=0", None).await;
        assert_ne!(again.header("x-request-id"), Some(generated.as_str()));
        let success = q.stats().await;
        assert_eq!(success["type"], "work_queue_stats");
        let reply = q.req(Method::GET, &q.path("/stats")).send().await;
        assert!(reply
            .header("x-request-id")
            .is_some_and(|id| uuid::Uuid::parse_str(id).is_ok()));

        // One that is too long is replaced by a generated one.
        let reply = q
            .req(Method::GET, &q.path("/stats"))
            .header("x-request-id", &"a".repeat(201))
            .send()
            .await;
        let id = reply.header("x-request-id").unwrap();
        assert!(uuid::Uuid::parse_str(id).is_ok(), "{id}");
        // Any other is echoed as it came (only the log escapes it): trace contexts, prefixed ids,
        // base64, and text that could pass for more of a log line.
        for plain in [
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "req_011CSHoEeqs5C35K2UUqR7Fy",
            "YWJjZA==",
            "x}: tether::access: request status=200",
        ] {
            let reply = q
                .req(Method::GET, &q.path("/stats"))
                .header("x-request-id", plain)
                .send()
                .await;
            assert_eq!(reply.header("x-request-id"), Some(plain));
        }
    })
    .await;
}

#[tokio::test]
async fn no_cache_keeps_an_answer() {
    each_backend(async |server| {
        let q = Queue::new(server).await;
        q.enqueue().await;
        let delivered = q.poll("?block_ms=1", None).await;
        delivered.ok();
        assert!(delivered.body["secret"].is_string(), "{}", delivered.body);
        let refused = q
            .req(Method::GET, &q.item_path(&unknown_id("work"), ""))
            .send()
            .await;
        refused.error(404, "not_found_error");
        let unrouted = q.req(Method::GET, "/api/v1/cloud/nowhere").send().await;
        for reply in [&delivered, &refused, &unrouted] {
            assert_eq!(
                reply.header("cache-control"),
                Some("no-store"),
                "{}",
                reply.body
            );
            assert_eq!(reply.header("x-content-type-options"), Some("nosniff"));
        }
    })
    .await;
}

#[tokio::test]
async fn unknown_routes_and_methods_answer_in_the_envelope() {
    each_backend(async |server| {
        let q = Queue::new(server).await;
        let item = q.enqueue().await;
        for url in [
            server.url("/nope"),
            server.url("/environments/x/y/z/w"),
            format!("{}/nope", server.base),
            server.v1("/nope"),
        ] {
            let reply = Req::new(server, Method::GET, url.clone()).send().await;
            reply.error(404, "not_found_error");
        }
        for (m, path) in [
            (Method::DELETE, q.path("/poll")),
            (Method::POST, q.path("/stats")),
            (Method::PUT, q.item_path(&item.id, "")),
            (Method::GET, q.item_path(&item.id, "/ack")),
            (Method::GET, q.item_path(&item.id, "/stop")),
            (Method::PATCH, "/environments".to_owned()),
        ] {
            let reply = req(server, m.clone(), &path).send().await;
            assert_eq!(
                reply.status,
                StatusCode::METHOD_NOT_ALLOWED,
                "{m} {path}: {}",
                reply.body
            );
            assert_eq!(reply.body["type"], "error", "{m} {path}: {}", reply.body);
            assert!(reply.body["error"]["type"].is_string());
            assert_eq!(
                reply.header("x-request-id"),
                reply.body["request_id"].as_str()
            );
            // RFC 9110 §15.5.6: a 405 names the methods the path has.
            let allow = reply.header("allow").unwrap_or_default();
            assert!(
                !allow.is_empty() && !allow.contains(m.as_str()),
                "{m} {path}: allow {allow:?}"
            );
            if path == q.path("/poll") {
                assert_eq!(
                    allow, "GET",
                    "the poll refuses HEAD, so it does not offer it"
                );
            }
        }
        assert_eq!(
            q.causes(&item.id).await,
            ["enqueued"],
            "GET …/ack did not ack"
        );

        // HEAD is served as GET without the body, except on the poll, which would claim an item
        // that nobody then sees.
        let head = q
            .req(Method::HEAD, &q.path("/poll"))
            .worker("head-only")
            .send()
            .await;
        assert_eq!(head.status, StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(head.header("allow"), Some("GET"));
        assert!(head.header("x-request-id").is_some());
        assert_eq!(q.causes(&item.id).await, ["enqueued"], "HEAD did not claim");
        assert_eq!(q.stats().await["workers_polling"], 0);
        let head = q.req(Method::HEAD, &q.path("/stats")).send().await;
        assert_eq!(head.status, StatusCode::OK);
    })
    .await;
}

/// D-32 beyond the work endpoints: who may call (403) and whether the target exists (404) are settled
/// before a body is judged (400).
#[tokio::test]
async fn check_order_d32_on_resource_bodies() {
    each_backend(async |server| {
        let q = Queue::new(server).await;
        let item = q.enqueue().await;
        let key = req(
            server,
            Method::POST,
            &format!("/environments/{}/keys", q.env),
        )
        .send()
        .await;
        let key = key.ok()["token"].as_str().unwrap().to_owned();
        let with_body = [
            "/environments".to_owned(),
            format!("/environments/{}", q.env),
            format!("/environments/{}/keys", q.env),
            "/tokens".to_owned(),
            "/agents".to_owned(),
            format!("/agents/{}", q.agent),
            "/sessions".to_owned(),
            format!("/sessions/{}", item.session),
        ];
        for path in &with_body {
            let reply = req(server, Method::POST, path)
                .bearer(&key)
                .raw("{not json")
                .send()
                .await;
            assert_eq!(
                reply.status,
                StatusCode::FORBIDDEN,
                "POST {path} by an environment key with a malformed body: {}",
                reply.body
            );
            reply.error(403, "permission_error");
            let reply = req(server, Method::POST, path)
                .anonymous()
                .raw("{not json")
                .send()
                .await;
            reply.error(401, "authentication_error");
        }
        for path in [
            format!("/environments/{}", unknown_id("env")),
            format!("/environments/{}/keys", unknown_id("env")),
            format!("/agents/{}", unknown_id("agent")),
            format!("/sessions/{}", unknown_id("sess")),
        ] {
            let reply = req(server, Method::POST, &path)
                .raw("{not json")
                .send()
                .await;
            assert_eq!(
                reply.status,
                StatusCode::NOT_FOUND,
                "POST {path} with a malformed body: {}",
                reply.body
            );
            reply.error(404, "not_found_error");
        }
    })
    .await;
}

/// `depth` nested arrays.
fn nested_arrays(depth: usize) -> Value {
    serde_json::from_str(&format!("{}{}", "[".repeat(depth), "]".repeat(depth))).expect("nested")
}

#[tokio::test]
async fn bodies_nested_too_deep_are_400_and_what_was_accepted_stays_readable() {
    each_backend(async |server| {
        let env = server.self_hosted_environment().await;
        // The body, its `tools` array and the tool object are three levels; the tool's field the rest.
        let agent_nested = |depth: usize| {
            json!({"name": "deep", "model": "m", "tools": [{"x": nested_arrays(depth - 3)}]})
        };

        let too_deep = req(server, Method::POST, "/agents")
            .json(agent_nested(101))
            .send()
            .await;
        let error = too_deep.error(400, "invalid_request_error");
        assert!(
            error["message"].as_str().unwrap().contains("100 deep"),
            "{error}"
        );

        // The deepest accepted agent: its sessions embed it a level deeper, and must still be read,
        // listed, archived and deleted, on both dialects.
        let agent = req(server, Method::POST, "/agents")
            .json(agent_nested(100))
            .send()
            .await;
        let agent = agent.ok()["id"].as_str().expect("agent id").to_owned();
        let session = req(server, Method::POST, "/sessions")
            .json(json!({"agent": agent, "environment_id": env}))
            .send()
            .await;
        let session = session.ok()["id"].as_str().expect("session id").to_owned();
        let read = req(server, Method::GET, &format!("/sessions/{session}"))
            .send()
            .await;
        assert_eq!(read.ok()["agent"]["tools"][0]["x"], nested_arrays(97));
        let read = req_v1(server, Method::GET, &format!("/sessions/{session}"))
            .send()
            .await;
        assert_eq!(read.ok()["id"], json!(session));
        let listed = req(server, Method::GET, "/sessions").send().await;
        assert_eq!(listed.ok()["data"][0]["id"], json!(session));
        let archived = req(server, Method::POST, &format!("/sessions/{session}/archive"))
            .send()
            .await;
        assert!(archived.ok()["archived_at"].is_string());
        let deleted = req(server, Method::DELETE, &format!("/sessions/{session}"))
            .send()
            .await;
        assert_eq!(deleted.status, StatusCode::OK, "{}", deleted.body);
    })
    .await;
}

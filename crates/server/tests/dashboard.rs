//! What the dashboard needs from the server, over real HTTP on each backend: its files at `GET /` with
//! caching and a strict Content-Security-Policy, the work list's `state` filter, and the queue history
//! the sampler keeps (`GET …/work/stats/history`). The dashboard itself is tested in a browser
//! (tests/dashboard, run by scripts/dashboard-tests).

mod conformance;

use std::time::Duration;

use conformance::*;

fn ids(list: &Value) -> Vec<String> {
    list["data"]
        .as_array()
        .expect("data")
        .iter()
        .map(|i| i["id"].as_str().expect("id").to_owned())
        .collect()
}

#[tokio::test]
async fn the_dashboard_is_served_with_caching_headers_and_a_strict_policy() {
    let server = TestServer::start(&Backend::Sqlite).await;
    let http = reqwest::Client::new();
    let index = http.get(format!("{}/", server.base)).send().await.unwrap();
    assert_eq!(index.status(), 200);
    let header = |r: &reqwest::Response, name: &str| {
        r.headers()
            .get(name)
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default()
    };
    assert!(header(&index, "content-type").starts_with("text/html"));
    let policy = header(&index, "content-security-policy");
    assert!(policy.contains("default-src 'none'"), "{policy}");
    assert!(policy.contains("script-src 'self'"), "{policy}");
    assert!(!policy.contains("unsafe-inline"), "{policy}");
    assert_eq!(header(&index, "x-content-type-options"), "nosniff");
    assert_eq!(header(&index, "cache-control"), "no-cache");
    let etag = header(&index, "etag");
    assert!(etag.starts_with('"') && etag.len() > 10, "{etag}");
    let html = index.text().await.unwrap();
    assert!(html.contains(r#"<script type="module" src="/dashboard/app.js">"#));
    assert!(!html.contains("<script>"), "no inline script");

    let again = http
        .get(format!("{}/", server.base))
        .header("if-none-match", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 304);
    assert_eq!(header(&again, "etag"), etag);

    let script = http
        .get(format!("{}/dashboard/app.js", server.base))
        .send()
        .await
        .unwrap();
    assert_eq!(script.status(), 200);
    assert!(header(&script, "content-type").starts_with("text/javascript"));
    assert_ne!(header(&script, "etag"), etag);

    for missing in [
        "/dashboard/nope.js",
        "/dashboard/..%2FCargo.toml",
        "/dashboard/index.html",
    ] {
        let reply = Req::new(&server, Method::GET, format!("{}{missing}", server.base))
            .anonymous()
            .send()
            .await;
        reply.error(404, "not_found_error");
    }
    server.shutdown().await;
}

#[tokio::test]
async fn the_work_list_filters_by_state() {
    each_backend(async |server| {
        let q = Queue::new(server).await;
        let a = q.enqueue().await;
        let b = q.enqueue().await;
        let c = q.enqueue().await;
        q.stop(&b.id, json!({"force": true})).await.ok();

        let list = |query: &'static str| {
            let q = &q;
            async move { q.req(Method::GET, &q.path(query)).send().await }
        };
        assert_eq!(
            ids(list("").await.ok()),
            [a.id.as_str(), b.id.as_str(), c.id.as_str()],
            "all states by default"
        );
        assert_eq!(
            ids(list("?state=queued").await.ok()),
            [a.id.as_str(), c.id.as_str()]
        );
        assert_eq!(ids(list("?state=stopped").await.ok()), [b.id.as_str()]);
        assert_eq!(
            ids(list("?state=queued,stopped").await.ok()),
            [a.id.as_str(), b.id.as_str(), c.id.as_str()]
        );
        assert_eq!(
            ids(list("?state=active&state=stopped").await.ok()),
            [b.id.as_str()]
        );
        assert!(ids(list("?state=active").await.ok()).is_empty());
        // The filter and the cursors compose: a page of one, then the next.
        let first = list("?state=queued&limit=1").await;
        assert_eq!(ids(first.ok()), [a.id.as_str()]);
        assert_eq!(first.ok()["has_more"], true);
        let path = q.path(&format!("?state=queued&limit=1&page={}", a.id));
        let next = q.req(Method::GET, &path).send().await;
        assert_eq!(ids(next.ok()), [c.id.as_str()]);
        assert_eq!(next.ok()["has_more"], false);

        list("?state=sleeping").await.bad_param("state");
        let v1 = req_v1(server, Method::GET, &q.path("?state=stopped"))
            .send()
            .await;
        assert_eq!(ids(v1.ok()), [b.id.as_str()], "both prefixes");
    })
    .await;
}

#[tokio::test]
async fn the_sampler_keeps_the_queue_history_of_each_environment() {
    for backend in backends() {
        let mut options = Options::default();
        options.config.sample_interval = Duration::from_millis(100);
        let server = TestServer::start_with(&backend, options).await;
        let q = Queue::new(&server).await;
        q.enqueue().await;
        q.enqueue().await;

        // Bounded wait for a sample that has seen both items.
        let mut history = Value::Null;
        for _ in 0..100 {
            history = q
                .req(Method::GET, &q.path("/stats/history"))
                .send()
                .await
                .ok()
                .clone();
            let seen = history["data"]
                .as_array()
                .unwrap()
                .iter()
                .any(|s| s["depth"] == 2);
            if seen {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(history["type"], "work_queue_stats_history");
        assert_eq!(history["environment_id"], q.env.as_str());
        assert_eq!(history["interval_seconds"], 0.1);
        let samples = history["data"].as_array().unwrap();
        let last = samples.last().expect("a sample");
        assert_eq!(last["depth"], 2, "{history}");
        for field in [
            "pending",
            "starting",
            "active",
            "stopping",
            "workers_polling",
        ] {
            assert_eq!(last[field], 0, "{field}: {history}");
        }
        let times: Vec<i64> = samples.iter().map(|s| micros(&s["at"])).collect();
        assert!(
            times.windows(2).all(|w| w[0] < w[1]),
            "oldest first: {times:?}"
        );

        // An environment key of that environment may read it, not another's; a cloud environment has none.
        let other = server.self_hosted_environment().await;
        let key = req(
            &server,
            Method::POST,
            &format!("/environments/{other}/keys"),
        )
        .json(json!({}))
        .send()
        .await;
        let key = key.ok()["token"].as_str().unwrap().to_owned();
        q.req(Method::GET, &q.path("/stats/history"))
            .bearer(&key)
            .send()
            .await
            .error(403, "permission_error");
        let cloud = req(&server, Method::POST, "/environments")
            .json(json!({"name": "cloud", "config": {"type": "cloud"}}))
            .send()
            .await;
        let cloud = cloud.ok()["id"].as_str().unwrap().to_owned();
        req(
            &server,
            Method::GET,
            &format!("/environments/{cloud}/work/stats/history"),
        )
        .send()
        .await
        .bad_param("environment_id");
        req(
            &server,
            Method::GET,
            &format!("/environments/{}/work/stats/history", unknown_id("env_")),
        )
        .send()
        .await
        .error(404, "not_found_error");
        server.shutdown().await;
    }
}

#[tokio::test]
async fn the_history_endpoint_and_the_state_filter_are_documented() {
    let server = TestServer::start(&Backend::Sqlite).await;
    let doc: Value = reqwest::get(format!("{}/openapi.json", server.base))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    for prefix in ["/api/v1/cloud", "/v1"] {
        let history = &doc["paths"]
            [format!("{prefix}/environments/{{environment_id}}/work/stats/history")]["get"];
        assert!(history.is_object(), "{prefix}: history undocumented");
        let list = &doc["paths"][format!("{prefix}/environments/{{environment_id}}/work")]["get"];
        let params = string_fields(&list["parameters"], "name");
        assert!(params.contains(&"state"), "{prefix}: {params:?}");
    }
    assert!(doc["paths"]["/"]["get"].is_object());
    assert!(doc["components"]["schemas"]["WorkQueueStatsHistory"].is_object());
    server.shutdown().await;
}

/// Reads `server`'s queue history of `env` until a sample shows `depth` (bounded: 100 tries).
async fn history_showing(server: &TestServer, env: &str, depth: u64) -> Value {
    let mut history = Value::Null;
    for _ in 0..100 {
        history = req(
            server,
            Method::GET,
            &format!("/environments/{env}/work/stats/history"),
        )
        .send()
        .await
        .ok()
        .clone();
        let last = history["data"].as_array().unwrap().last().cloned();
        if last.is_some_and(|s| s["depth"] == depth) {
            return history;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no sample with depth {depth}: {history}");
}

#[tokio::test]
async fn every_server_on_one_database_samples_the_whole_cluster() {
    for backend in backends() {
        // An embedded SQLite store belongs to one process; only a shared database has neighbours.
        if backend == Backend::Sqlite {
            continue;
        }
        let mut options = Options::default();
        options.config.sample_interval = Duration::from_millis(100);
        let first = TestServer::start_with(&backend, options.clone()).await;
        let second = TestServer::start_on(
            &backend,
            first.location.clone(),
            options,
            first.clock.clone(),
        )
        .await;
        // Work enqueued through the first server shows in the second one's history, and the reverse.
        let q = Queue::new(&first).await;
        q.enqueue().await;
        history_showing(&second, &q.env, 1).await;
        let agent = q.agent.clone();
        req(&second, Method::POST, "/sessions")
            .json(json!({"agent": agent, "environment_id": q.env}))
            .send()
            .await
            .ok();
        history_showing(&first, &q.env, 2).await;
        history_showing(&second, &q.env, 2).await;
        second.shutdown().await;
        first.shutdown().await;
    }
}

//! Running Tether in production, tried as an operator would with the real binary: the metrics an
//! autoscaler reads, logs that can be followed and hold no secret, poison items recovered through the
//! CLI, the worker's --workdir, --max-idle and run-one with a real program, completions, man pages and
//! the systemd units.

mod support;

use std::collections::HashSet;
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use prometheus_parse::{Scrape, Value as Prom};
use serde_json::Value;

const ADMIN_TOKEN: &str = "tth_adm_operations-test-admin-token-0123456789";
/// How long anything in these tests may take before it counts as hung.
const PATIENCE: Duration = Duration::from_secs(90);

/// `tether serve` with JSON logs at `info` into `<dir>/server.log`; killed on drop.
type Server = support::LoggedServer;

impl Server {
    fn start(dir: &Path, extra: &[&str]) -> Server {
        let mut args = vec!["--log-format", "json"];
        args.extend_from_slice(extra);
        Server::spawn(dir, ADMIN_TOKEN, &args, &[("TETHER_LOG", "info")], PATIENCE)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }

    /// An environment, its key, an agent and a session (which queues the first item).
    fn setup(&self) -> Setup {
        let env = support::id(&self.json(&["env", "create", "--name", "ops"]));
        let key = self.json(&["env", "key", "create", &env])["token"]
            .as_str()
            .expect("a key")
            .to_owned();
        let agent = support::id(&self.json(&["agent", "create", "--name", "a", "--model", "none"]));
        let session =
            support::id(&self.json(&["session", "create", "--agent", &agent, "--env", &env]));
        Setup {
            env,
            key,
            agent,
            session,
        }
    }

    /// Another session of `setup`'s agent and environment (another queued item).
    fn another_session(&self, setup: &Setup) {
        let (agent, env) = (setup.agent.as_str(), setup.env.as_str());
        self.json(&["session", "create", "--agent", agent, "--env", env]);
    }

    /// `tether worker [ARGS…] -- sh -c SCRIPT` with its log in `<dir>/<name>.log`.
    fn worker(&self, name: &str, setup: &Setup, args: &[&str], script: &str) -> Child {
        self.worker_running(name, setup, args, &["sh", "-c", script, "sh"])
    }

    /// A worker started in the server's directory, running `program` for each item.
    fn worker_running(&self, name: &str, setup: &Setup, args: &[&str], program: &[&str]) -> Child {
        support::tether_command()
            .arg("worker")
            .args(args)
            .args([
                "--server",
                &self.url,
                "--environment",
                &setup.env,
                "--key",
                &setup.key,
            ])
            .arg("--")
            .args(program)
            .current_dir(&self.dir)
            .env("OUT", &self.dir)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(self.dir.join(format!("{name}.log"))).expect("log"))
            .spawn()
            .expect("spawn tether worker")
    }
}

struct Setup {
    env: String,
    key: String,
    agent: String,
    session: String,
}

/// What `GET /metrics` of `server` answers.
async fn metrics_text(server: &Server) -> String {
    let url = format!("{}/metrics", server.url);
    reqwest::get(url).await.unwrap().text().await.unwrap()
}

/// The sum of the observations of the histogram `name` (its `_sum` line) in a scrape of `server`,
/// which must have explicit buckets.
async fn histogram_sum(server: &Server, name: &str) -> f64 {
    let text = metrics_text(server).await;
    let bucket = format!("{name}_bucket{{");
    let buckets = text.lines().filter(|l| l.starts_with(&bucket)).count();
    assert!(buckets >= 10, "{name} has explicit buckets:\n{text}");
    let sum = format!("{name}_sum");
    series_value(&text, &sum).unwrap_or_else(|| panic!("no {sum} in\n{text}"))
}

/// The value of the unlabelled series `series` (e.g. a histogram's `_sum` or `_count`) in
/// Prometheus text; `None` when it is not there.
fn series_value(text: &str, series: &str) -> Option<f64> {
    let line = text.lines().find(|l| l.split(' ').next() == Some(series))?;
    Some(line.rsplit(' ').next()?.parse().expect("a number"))
}

/// What a worker that polls (§8, as the official SDKs' do) takes between its calls is what the pace
/// histograms observe: delivery to ack, ack to first heartbeat.
#[tokio::test]
async fn the_pace_histograms_measure_a_polling_workers_pace() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    let setup = server.setup();
    let http = reqwest::Client::new();
    let call = |method: reqwest::Method, path: String| {
        http.request(method, format!("{}/api/v1/cloud{path}", server.url))
            .bearer_auth(server.admin_token)
            .header("worker-id", "w1")
    };
    let work = format!("/environments/{}/work", setup.env);
    let item: Value = call(reqwest::Method::GET, format!("{work}/poll"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = item["id"].as_str().expect("the session's item").to_owned();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let acked = call(reqwest::Method::POST, format!("{work}/{id}/ack"))
        .send()
        .await;
    assert_eq!(acked.unwrap().status(), 200);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let first = format!("{work}/{id}/heartbeat?expected_last_heartbeat=NO_HEARTBEAT");
    let beat = call(reqwest::Method::POST, first).send().await;
    assert_eq!(beat.unwrap().status(), 200);
    // Lower bounds only: each wait was at least this long, however slow the machine.
    let delivery_to_ack = histogram_sum(&server, "tether_delivery_to_ack_seconds").await;
    assert!(
        delivery_to_ack >= 0.3,
        "delivery to ack: {delivery_to_ack} s"
    );
    let ack_to_beat = histogram_sum(&server, "tether_ack_to_first_heartbeat_seconds").await;
    assert!(
        ack_to_beat >= 0.2,
        "ack to first heartbeat: {ack_to_beat} s"
    );
}

/// Polls `check` until it gives a value (bounded by PATIENCE).
fn eventually<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(Instant::now() < deadline, "never happened: {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The program of the full cycle: leaves its session token and working directory behind, then fails
/// with status 3.
const CYCLE: &str = r#"echo "$TETHER_SESSION_TOKEN" > "$OUT/token-$TETHER_WORK_ID"
pwd > "$OUT/pwd-$TETHER_WORK_ID"
echo scratch > scratch
echo "a line of output"
exit 3"#;

#[tokio::test]
async fn a_work_cycle_shows_in_the_metrics_and_the_logs_hold_no_secret() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    let setup = server.setup();
    let workdir = dir.path().join("items");
    let program = dir.path().join("cycle.sh");
    std::fs::write(&program, format!("#!/bin/sh\n{CYCLE}\n")).unwrap();
    std::fs::set_permissions(&program, std::fs::Permissions::from_mode(0o755)).unwrap();

    // run-one: claims the session's item, runs the program in a fresh directory, exits with its status.
    // The program is named relative to the worker's directory, as `./agent.sh` is in the README.
    let mut worker = server.worker_running(
        "worker",
        &setup,
        &[
            "run-one",
            "--log-format",
            "json",
            "--workdir",
            workdir.to_str().unwrap(),
        ],
        &["./cycle.sh"],
    );
    let status = support::wait_exit(&mut worker, "tether worker run-one", PATIENCE);
    let worker_log = std::fs::read_to_string(dir.path().join("worker.log")).unwrap();
    assert_eq!(
        status.code(),
        Some(3),
        "run-one exits with the program's status:\n{worker_log}"
    );
    let items = server.json(&["work", "list", &setup.env]);
    let work = support::id(&items["data"][0]);
    assert_eq!(items["data"][0]["state"], "stopped");
    let pwd = std::fs::read_to_string(dir.path().join(format!("pwd-{work}"))).unwrap();
    assert_eq!(
        Path::new(pwd.trim()),
        workdir.canonicalize().unwrap().join(&work)
    );
    assert!(
        !workdir.join(&work).exists(),
        "the item's directory is removed after it"
    );
    assert!(workdir.exists());

    // A second session waits in the queue: the depth an autoscaler would scale on.
    server.another_session(&setup);

    let text = metrics_text(&server).await;
    let scrape = Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).expect("Prometheus text");
    fn samples<'a>(
        scrape: &'a Scrape,
        name: &'a str,
    ) -> impl Iterator<Item = &'a prometheus_parse::Sample> + 'a {
        scrape.samples.iter().filter(move |s| s.metric == name)
    }
    let named = |name: &'static str| samples(&scrape, name);
    // Histograms with explicit buckets, each with observations after the cycle. (The worker
    // claimed its item: the pace between a poll's calls is checked with a polling worker, in
    // `the_pace_histograms_measure_a_polling_workers_pace`.)
    for name in [
        "tether_http_request_duration_seconds",
        "tether_enqueue_to_delivery_seconds",
        "tether_store_commit_duration_seconds",
    ] {
        let mut observed = false;
        for sample in named(name) {
            let Prom::Histogram(buckets) = &sample.value else {
                panic!("{name} is not a histogram: {:?}", sample.value);
            };
            assert!(
                buckets.len() >= 10,
                "{name} has explicit buckets: {buckets:?}"
            );
            observed |= buckets.iter().any(|b| b.count > 0.0);
        }
        assert!(observed, "{name} has no observation:\n{text}");
    }
    // The worker claimed: a claim adds no sample to the pace between a poll's calls, and the
    // histograms are there all the same, empty.
    for name in [
        "tether_delivery_to_ack_seconds",
        "tether_ack_to_first_heartbeat_seconds",
    ] {
        let count = series_value(&text, &format!("{name}_count"));
        assert_eq!(count, Some(0.0), "{name} after a claimed cycle:\n{text}");
    }
    let routes: HashSet<(String, String)> = named("tether_http_request_duration_seconds")
        .map(|s| (s.labels["route"].to_owned(), s.labels["status"].to_owned()))
        .collect();
    assert!(
        routes.contains(&(
            "/api/v1/cloud/environments/:environment_id/work/claim".into(),
            "200".into()
        )),
        "durations per matched route and status: {routes:?}"
    );
    // Nothing the parser could not read was dropped: every series line of the text is a sample.
    let bucket_series = text
        .lines()
        .filter(|l| l.starts_with("tether_") && l.contains("_bucket{"))
        .count();
    let parsed_buckets: usize = scrape
        .samples
        .iter()
        .map(|s| match &s.value {
            Prom::Histogram(b) => b.len(),
            _ => 0,
        })
        .sum();
    assert_eq!(
        parsed_buckets, bucket_series,
        "the parser read every bucket:\n{text}"
    );
    let typed: HashSet<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .collect();
    let parsed: HashSet<&str> = scrape.samples.iter().map(|s| s.metric.as_str()).collect();
    assert!(
        typed.is_subset(&parsed),
        "families the parser missed: {:?}",
        typed.difference(&parsed).collect::<Vec<_>>()
    );
    // HELP on every series; Prometheus naming.
    for sample in &scrape.samples {
        // A histogram's `_sum` and `_count` come out of the parser as samples of their own.
        let family = [
            sample.metric.strip_suffix("_sum"),
            sample.metric.strip_suffix("_count"),
        ]
        .into_iter()
        .flatten()
        .find(|base| typed.contains(base))
        .unwrap_or(&sample.metric);
        assert!(
            scrape.docs.contains_key(family),
            "{} has no HELP",
            sample.metric
        );
        assert!(sample.metric.starts_with("tether_"), "{}", sample.metric);
        if matches!(sample.value, Prom::Counter(_)) {
            assert!(sample.metric.ends_with("_total"), "{}", sample.metric);
        }
    }
    // The dashboard and the autoscaler example ask for series that exist; the counters without
    // labels are there from the start, at 0.
    let deploy = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy");
    for file in [
        "grafana/tether-dashboard.json",
        "kubernetes/keda-scaledobject.yaml",
    ] {
        let text = std::fs::read_to_string(deploy.join(file)).unwrap();
        for word in text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
            if !word.starts_with("tether_") {
                continue;
            }
            let family = word.trim_end_matches("_bucket");
            // A series with a label only its first event gives (README, Metrics).
            let labelled_by_its_first_event = family == "tether_http_connections_timed_out_total";
            assert!(
                typed.contains(family) || labelled_by_its_first_event,
                "{file} uses {word}, which /metrics does not have"
            );
        }
    }
    for counter in [
        "tether_lease_expiries_total",
        "tether_http_connections_refused_total",
        "tether_http_connections_displaced_total",
        "tether_worker_polls_unrecorded_total",
    ] {
        assert!(
            named(counter).any(|s| matches!(s.value, Prom::Counter(_))),
            "{counter} is exported before its first event"
        );
    }
    // Each background service's restarts, at 0 from the start.
    for service in ["dispatcher", "sampler"] {
        let restarts = named("tether_service_restarts_total")
            .find(|s| s.labels.get("service") == Some(service))
            .map(|s| &s.value);
        assert!(
            matches!(restarts, Some(Prom::Counter(v)) if *v == 0.0),
            "tether_service_restarts_total{{service={service:?}}} is exported at 0: {restarts:?}"
        );
    }
    let build = named("tether_build_info")
        .next()
        .expect("tether_build_info");
    assert_eq!(build.labels["version"], env!("CARGO_PKG_VERSION"));
    assert!(matches!(build.value, Prom::Gauge(v) if v == 1.0));
    // Per-environment gauges, read from the store.
    let gauge = |name: &'static str, state: Option<&str>| -> f64 {
        let sample = named(name)
            .find(|s| {
                s.labels.get("environment_id") == Some(setup.env.as_str())
                    && s.labels.get("state") == state
            })
            .unwrap_or_else(|| panic!("no {name} for {}:\n{text}", setup.env));
        match sample.value {
            Prom::Gauge(v) => v,
            ref other => panic!("{name} is not a gauge: {other:?}"),
        }
    };
    assert_eq!(gauge("tether_queue_depth", None), 1.0);
    assert_eq!(gauge("tether_queue_pending", None), 0.0);
    assert_eq!(gauge("tether_queue_items", Some("queued")), 1.0);
    assert_eq!(gauge("tether_queue_items", Some("active")), 0.0);
    assert!(gauge("tether_queue_oldest_queued_age_seconds", None) >= 0.0);
    assert_eq!(gauge("tether_queue_workers_polling", None), 1.0);

    // The logs: JSON lines of one shape, an access line per request, no secret anywhere.
    let server_log = server.log();
    let session_token = std::fs::read_to_string(dir.path().join(format!("token-{work}"))).unwrap();
    let session_token = session_token.trim();
    assert!(session_token.starts_with("tth_"), "{session_token}");
    for (secret, what) in [
        (ADMIN_TOKEN, "admin token"),
        (setup.key.as_str(), "environment key"),
        (session_token, "session token"),
    ] {
        assert!(
            !server_log.contains(secret),
            "the server log shows the {what}"
        );
        assert!(
            !worker_log.contains(secret),
            "the worker log shows the {what}"
        );
    }
    let lines = |log: &str| -> Vec<Value> {
        log.lines()
            .filter(|l| l.starts_with('{'))
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
            .collect()
    };
    let server_lines = lines(&server_log);
    // JSON through and through: what the server says at start is an event too.
    assert!(
        server_log.lines().all(|l| l.starts_with('{')),
        "{server_log}"
    );
    for said in [
        "tether is listening",
        "adopted TETHER_ADMIN_TOKEN as the first admin token",
    ] {
        assert!(
            server_lines.iter().any(|l| l["fields"]["message"] == said),
            "{said}: {server_log}"
        );
    }
    let worker_lines = lines(&worker_log);
    assert!(worker_lines.len() >= 4, "{worker_log}");
    for line in server_lines.iter().chain(&worker_lines) {
        for key in ["timestamp", "level", "fields", "target"] {
            assert!(line.get(key).is_some(), "{key} missing: {line}");
        }
    }
    assert!(worker_lines
        .iter()
        .any(|l| l["fields"]["message"] == "output"
            && l["fields"]["line"] == "a line of output"
            && l["fields"]["work_id"] == work.as_str()));
    let access: Vec<&Value> = server_lines
        .iter()
        .filter(|l| l["target"] == "tether::access")
        .collect();
    let claim = access
        .iter()
        .find(|l| {
            l["span"]["route"] == "/api/v1/cloud/environments/:environment_id/work/claim"
                && l["fields"]["status"] == 200
        })
        .unwrap_or_else(|| panic!("no access line for a claim:\n{server_log}"));
    assert_eq!(claim["span"]["method"], "POST");
    assert_eq!(claim["span"]["credential"], "environment_key");
    assert!(claim["span"]["request_id"]
        .as_str()
        .is_some_and(|r| !r.is_empty()));
    assert!(claim["fields"]["latency_ms"].as_f64().is_some());
    assert!(access
        .iter()
        .any(|l| l["span"]["credential"] == "session_token"));
    assert!(access.iter().any(|l| l["span"]["credential"] == "admin"));
    // Every request's lines carry its id: a refused one logs its access line inside its span too.
    let refused = reqwest::Client::new()
        .get(format!("{}/api/v1/cloud/environments", server.url))
        .header("authorization", "Bearer tth_adm_not-a-real-token-at-all")
        .header("x-request-id", "req-ops-test-1")
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);
    let again = eventually("the access line of the refused request", || {
        lines(&server.log())
            .into_iter()
            .find(|l| l["span"]["request_id"] == "req-ops-test-1")
    });
    assert_eq!(again["fields"]["status"], 401);
    assert!(again["span"].get("credential").is_none());
    assert!(!server.log().contains("tth_adm_not-a-real-token-at-all"));
}

#[tokio::test]
async fn a_poison_item_is_listed_and_requeued_through_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    // Leases of 1 s, and the first lease that lapses makes the item poison.
    let server = Server::start(
        dir.path(),
        &[
            "--lease-ttl",
            "1",
            "--lease-ttl-min",
            "1",
            "--max-requeues",
            "0",
            "--tick-ms",
            "100",
        ],
    );
    let setup = server.setup();
    let mut worker = server.worker("doomed", &setup, &["--ttl", "1"], "exec sleep 600");
    let work = eventually("the worker holds the item", || {
        let items = server.json(&["work", "list", &setup.env]);
        (items["data"][0]["state"] == "active").then(|| support::id(&items["data"][0]))
    });
    // The worker dies without a word; its program goes with it; the lease lapses.
    worker.kill().unwrap();
    worker.wait().unwrap();
    let poison = eventually("the item is listed as poison", || {
        let listed = server.json(&["work", "list", &setup.env, "--poison"]);
        let data = listed["data"].as_array().cloned().unwrap_or_default();
        (!data.is_empty()).then_some(data)
    });
    assert_eq!(poison.len(), 1);
    assert_eq!(support::id(&poison[0]), work);
    let history = server.json(&["work", "history", &setup.env, &work]);
    assert_eq!(
        history["data"].as_array().unwrap().last().unwrap()["cause"],
        "poison_stopped"
    );

    // Only an admin may requeue.
    let refused = reqwest::Client::new()
        .post(format!(
            "{}/v1/environments/{}/work/{work}/requeue",
            server.url, setup.env
        ))
        .bearer_auth(&setup.key)
        .json(&serde_json::json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 403);

    let fresh = server.json(&[
        "work",
        "requeue",
        &setup.env,
        &work,
        "--reason",
        "the agent is fixed",
    ]);
    let fresh_id = support::id(&fresh);
    assert_ne!(fresh_id, work);
    assert_eq!(fresh["state"], "queued");
    assert_eq!(fresh["data"]["id"], setup.session.as_str());
    let admin_id = server.json(&["token", "list"])["data"][0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let old = server.json(&["work", "history", &setup.env, &work]);
    let last = old["data"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(
        (
            last["cause"].as_str(),
            last["from"].as_str(),
            last["to"].as_str()
        ),
        (Some("requeued"), Some("stopped"), Some("stopped"))
    );
    assert_eq!(
        last["detail"],
        format!("requeued as {fresh_id} by admin token {admin_id}: the agent is fixed")
    );
    let new = server.json(&["work", "history", &setup.env, &fresh_id]);
    assert_eq!(new["data"][0]["cause"], "enqueued");
    assert_eq!(
        new["data"][0]["detail"],
        format!("requeue of {work} by admin token {admin_id}: the agent is fixed")
    );

    // Requeued items leave the poison list; a second requeue is refused.
    assert_eq!(
        server.json(&["work", "list", &setup.env, "--poison"])["data"],
        serde_json::json!([])
    );
    let out = server.run(&["work", "requeue", &setup.env, &work]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("another requeue"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A healthy worker now serves the session.
    let mut worker = server.worker("healthy", &setup, &["run-one", "--ttl", "1"], "exit 0");
    assert_eq!(
        support::wait_exit(&mut worker, "run-one", PATIENCE).code(),
        Some(0)
    );
    let item = server.json(&["work", "get", &setup.env, &fresh_id]);
    assert_eq!(item["state"], "stopped");
    assert_eq!(item["metadata"]["tether.exit_code"], "0");
}

#[tokio::test]
async fn max_idle_ends_the_worker_and_keep_workdir_keeps_the_directory() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    let setup = server.setup();
    let workdir = dir.path().join("kept");
    let mut worker = support::tether_command();
    worker
        .args([
            "worker",
            "--max-idle",
            "1500ms",
            "--keep-workdir",
            "--workdir",
        ])
        .arg(&workdir)
        .args([
            "--server",
            &server.url,
            "--environment",
            &setup.env,
            "--key",
            &setup.key,
        ])
        .args(["--", "sh", "-c", "echo scratch > scratch"])
        // TETHER_LOG works for the worker too: warnings only.
        .env("TETHER_LOG", "warn");
    let (status, log) = support::exit_and_stderr(&mut worker, "tether worker --max-idle", PATIENCE);
    assert!(status.success(), "--max-idle exits 0: {log}");
    assert!(
        !log.contains("worker started"),
        "TETHER_LOG=warn hides info lines:\n{log}"
    );
    let items = server.json(&["work", "list", &setup.env]);
    let work = support::id(&items["data"][0]);
    assert_eq!(items["data"][0]["metadata"]["tether.exit_code"], "0");
    assert_eq!(
        std::fs::read_to_string(workdir.join(&work).join("scratch")).unwrap(),
        "scratch\n"
    );

    // run-one with nothing to do and --max-idle gives up cleanly.
    let mut idle = server.worker("idle", &setup, &["run-one", "--max-idle", "1s"], "exit 7");
    assert_eq!(
        support::wait_exit(&mut idle, "run-one --max-idle", PATIENCE).code(),
        Some(0)
    );
}

/// A TETHER_LOG that does not parse is said in the log, not silently replaced by `info`; nor is one
/// whose only word is read as the name of what logs (`inof` for `info`), which would log nothing
/// of the worker's at all.
#[test]
fn a_log_filter_that_does_not_parse_is_said() {
    let log_with = |filter: &str| {
        let output = support::tether_command()
            .args([
                "worker",
                "--max-idle",
                "1ms",
                "--server",
                "http://127.0.0.1:9",
            ])
            .args(["--environment", "env_x", "--key", "tth_env_x", "--", "true"])
            .env("TETHER_LOG", filter)
            .output()
            .unwrap();
        String::from_utf8_lossy(&output.stderr).into_owned()
    };
    let log = log_with("bogus===");
    assert!(
        log.contains("TETHER_LOG \"bogus===\" ignored") && log.contains("logging at info"),
        "{log}"
    );
    let said = "read as the name of what logs, not as a level";
    let log = log_with("inof");
    assert!(
        log.contains("TETHER_LOG \"inof\": inof") && log.contains(said),
        "{log}"
    );
    for meant in ["info,hyper", "tether", "warn"] {
        assert!(!log_with(meant).contains(said), "{meant}");
    }
}

/// A worker that never reached its server was not idle: `--max-idle` ends it with an error that
/// says so, not with the 0 of a quiet queue (under cron or an autoscaler, a mistyped --server would
/// look like success).
#[test]
fn max_idle_without_a_single_answered_poll_is_a_failure() {
    // A port nobody listens on: bound, then closed.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let server = format!("http://127.0.0.1:{port}");
    for mode in [&["worker"][..], &["worker", "run-one"][..]] {
        let mut worker = support::tether_command();
        worker
            .args(mode)
            .args(["--max-idle", "1s", "--server", &server])
            .args(["--environment", "env_x", "--key", "tth_env_x"])
            .args(["--", "true"]);
        let (status, log) =
            support::exit_and_stderr(&mut worker, "tether worker --max-idle", PATIENCE);
        assert_eq!(status.code(), Some(1), "{mode:?}: {log}");
        assert!(
            log.contains("the server answered no poll for --max-idle") && log.contains(&server),
            "{mode:?}: {log}"
        );
        assert!(!log.contains("no work for --max-idle"), "{mode:?}: {log}");
    }
}

#[test]
fn completions_are_generated_for_each_shell() {
    for shell in ["bash", "zsh", "fish"] {
        let out = support::tether_command()
            .args(["completions", shell])
            .output()
            .unwrap();
        assert!(out.status.success(), "{shell}");
        let script = String::from_utf8(out.stdout).unwrap();
        for word in [
            "tether", "worker", "run-one", "requeue", "poison", "max-idle",
        ] {
            assert!(script.contains(word), "{shell} completions lack {word}");
        }
        // Syntax-check the script with the shell itself when it is installed.
        if let Ok(status) = Command::new(shell)
            .arg("-n")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .and_then(|mut c| {
                use std::io::Write as _;
                c.stdin.take().unwrap().write_all(script.as_bytes())?;
                c.wait()
            })
        {
            assert!(status.success(), "{shell} -n refuses the completion script");
        } else {
            eprintln!("{shell} is not installed: its completion script is not syntax-checked");
        }
    }
    let out = support::tether_command()
        .args(["completions", "powershell"])
        .output()
        .unwrap();
    assert!(!out.status.success());
}

#[test]
fn man_pages_are_written_for_every_command() {
    let dir = tempfile::tempdir().unwrap();
    let out = support::tether_command()
        .arg("man")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for page in [
        "tether.1",
        "tether-serve.1",
        "tether-worker.1",
        "tether-worker-run-one.1",
        "tether-work-requeue.1",
    ] {
        let text =
            std::fs::read_to_string(dir.path().join(page)).unwrap_or_else(|_| panic!("no {page}"));
        assert!(text.contains(".TH"), "{page} is not a man page");
    }
    let worker = std::fs::read_to_string(dir.path().join("tether-worker.1")).unwrap();
    assert!(
        worker.contains("max\\-idle"),
        "the worker's page lists its flags"
    );
}

#[test]
fn man_pages_into_a_file_say_it_is_not_a_directory() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("afile");
    std::fs::write(&file, "").unwrap();
    let out = support::tether_command()
        .arg("man")
        .arg(&file)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("{} is not a directory", file.display())),
        "{err}"
    );
}

/// `systemd-analyze verify` on the units under deploy/systemd (with the binary path pointed at the one
/// just built, since verify checks that it exists). Skipped, saying so, without systemd-analyze.
#[test]
fn the_systemd_units_verify() {
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("SKIPPED: systemd-analyze is not installed (Debian package `systemd`)");
        return;
    }
    let units = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/systemd");
    let dir = tempfile::tempdir().unwrap();
    let mut paths = Vec::new();
    for (file, instance) in [
        ("tether.service", "tether.service"),
        ("tether-worker@.service", "tether-worker@ci.service"),
    ] {
        let text = std::fs::read_to_string(units.join(file)).unwrap();
        for needed in [
            "ProtectSystem=strict",
            "NoNewPrivileges=yes",
            "StateDirectory=",
            "User=",
        ] {
            assert!(text.contains(needed), "{file} lacks {needed}");
        }
        let path = dir.path().join(instance);
        std::fs::write(&path, text.replace("/usr/local/bin/tether", support::BIN)).unwrap();
        paths.push(path);
    }
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .args(&paths)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stderr.trim().is_empty(),
        "systemd-analyze verify:\n{stderr}"
    );
}

/// A client's own `x-request-id` is echoed as it came (D-18), but the text log writes it %-escaped:
/// an unauthenticated request cannot make its own refusal's access line read as an admin's 200.
#[tokio::test]
async fn a_request_id_cannot_forge_an_access_log_line() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::spawn(
        dir.path(),
        ADMIN_TOKEN,
        &["--log-format", "text"],
        &[("TETHER_LOG", "info")],
        PATIENCE,
    );
    let forged = r#"x}: tether::access: request status=200 credential="admin""#;
    let response = reqwest::Client::new()
        .get(format!("{}/api/v1/cloud/environments", server.url))
        .header("x-request-id", forged)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    assert_eq!(
        response.headers()["x-request-id"].to_str().unwrap(),
        forged,
        "echoed as it came"
    );
    let log = eventually("the refusal's access line", || {
        let log = server.log();
        log.contains("status=401").then_some(log)
    });
    assert!(!log.contains("status=200"), "{log}");
    assert!(!log.contains(r#"credential="admin""#), "{log}");
    assert!(
        log.contains("x%7D:%20tether::access:%20request%20status%3D200"),
        "{log}"
    );
}

/// A poll or claim that took nothing, which every idle worker makes each second, is logged at
/// `debug`; one that took an item, one refused, one that stopped an item though it took nothing,
/// and any other request, at `info`.
#[tokio::test]
async fn a_take_that_took_nothing_is_logged_at_debug() {
    for (filter, debug) in [("info", false), ("debug", true)] {
        let dir = tempfile::tempdir().unwrap();
        let server = Server::spawn(
            dir.path(),
            ADMIN_TOKEN,
            &["--log-format", "json"],
            &[("TETHER_LOG", filter)],
            PATIENCE,
        );
        let setup = server.setup();
        let http = reqwest::Client::new();
        let take_with = async |take: &str, key: &str, body: Option<Value>| {
            let url = format!(
                "{}/api/v1/cloud/environments/{}/work/{take}",
                server.url, setup.env
            );
            let method = match take {
                "claim" => reqwest::Method::POST,
                _ => reqwest::Method::GET,
            };
            let response = http
                .request(method, url)
                .bearer_auth(key)
                .header("Worker-ID", "w1");
            let response = match body {
                Some(body) => response.json(&body),
                None => response,
            };
            let response = response.send().await.unwrap();
            let status = response.status().as_u16();
            (status, response.json::<Value>().await.unwrap())
        };
        let take = async |take: &str, key: &str| take_with(take, key, None).await;
        // The session's item, then nothing, by a claim and by a poll; another session's item by a
        // poll; and a poll refused.
        let key = setup.key.as_str();
        let claimed = take("claim", key).await.1;
        assert!(claimed.is_object());
        assert!(take("claim", key).await.1.is_null());
        // A claim that ends the item claimed first and takes nothing.
        let secret = claimed["work"]["secret"].as_str().unwrap();
        let token = tether_client::WorkSecret::decode(secret)
            .unwrap()
            .sessions_token;
        let stop =
            serde_json::json!({"stop": {"work_id": claimed["work"]["id"], "session_token": token}});
        assert!(take_with("claim", key, Some(stop)).await.1.is_null());
        assert!(take("poll", key).await.1.is_null());
        server.another_session(&setup);
        assert!(take("poll", key).await.1.is_object());
        assert_eq!(take("poll", "tth_env_not-a-key").await.0, 401);
        let route = |l: &Value, take: &str| {
            l["target"] == "tether::access"
                && l["span"]["route"]
                    == format!("/api/v1/cloud/environments/:environment_id/work/{take}")
        };
        let levels = |lines: &[Value], take: &str| -> Vec<String> {
            let levels = lines.iter().filter(|l| route(l, take));
            levels
                .map(|l| l["level"].as_str().unwrap().to_owned())
                .collect()
        };
        let (claims, polls) = match debug {
            false => (vec!["INFO", "INFO"], vec!["INFO", "INFO"]),
            true => (vec!["INFO", "DEBUG", "INFO"], vec!["DEBUG", "INFO", "INFO"]),
        };
        // Every line is there once the refused poll's, the last request's, is.
        let (log, lines) = eventually("the access lines", || {
            let log = server.log();
            let lines: Vec<Value> = log
                .lines()
                .filter_map(|l| serde_json::from_str(l).ok())
                .collect();
            let refused = lines
                .iter()
                .any(|l| route(l, "poll") && l["fields"]["status"] == 401);
            refused.then_some((log, lines))
        });
        assert_eq!(levels(&lines, "claim"), claims, "{log}");
        assert_eq!(levels(&lines, "poll"), polls, "{log}");
    }
}

/// With `--metrics-token`, `/metrics` answers its scraper only: no credential, another token or even
/// an admin token get 401 in the envelope. A token too short to keep anyone out, or one a scraper
/// could not send back, stops the server at start.
#[tokio::test]
async fn a_metrics_token_keeps_the_metrics_to_their_scraper() {
    const TOKEN: &str = "scraper-secret-0123456789";
    let dir = tempfile::tempdir().unwrap();
    let server = support::ServerProcess::start(dir.path(), &["--metrics-token", TOKEN]);
    let scrape = |token: Option<&str>| {
        let mut request = reqwest::Client::new().get(format!("{}/metrics", server.base));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        async move {
            let answer = request.send().await.unwrap();
            (answer.status().as_u16(), answer.text().await.unwrap())
        }
    };
    for refused in [
        None,
        Some("scraper-secret-9876543210"),
        Some(support::ADMIN_TOKEN),
    ] {
        let (status, body) = scrape(refused).await;
        assert_eq!(status, 401, "{refused:?}: {body}");
        let envelope: Value = serde_json::from_str(&body).expect("the error envelope");
        assert_eq!(envelope["error"]["type"], "authentication_error", "{body}");
    }
    let (status, body) = scrape(Some(TOKEN)).await;
    assert_eq!(status, 200);
    assert!(body.contains("tether_build_info"), "{body}");
    // Everything else is as it was: health needs nothing, the API its own credentials.
    let health = reqwest::get(format!("{}/healthz", server.base))
        .await
        .unwrap();
    assert_eq!(health.status().as_u16(), 200);

    for (bad, why) in [
        ("short", "at least 16"),
        ("scraper-secret-0123456789\n", "visible ASCII"),
    ] {
        let out = support::tether_command()
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir.path().join("refused"))
            .args(["--metrics-token", bad])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{bad:?} was taken");
        assert!(stderr.contains(why), "{bad:?}: {stderr}");
    }
}

//! Several `tether serve` processes on one PostgreSQL database behave as one server.
//!
//! Real processes, real sockets, plain HTTP workers written here: two servers drain a queue without
//! handing an item out twice; a long poll on one server wakes for work created through the other;
//! a server killed with SIGKILL loses nothing; a database restart answers 503 meanwhile, loses no
//! acknowledged write, heals by itself and expires no lease.
//!
//! Needs `TETHER_TEST_POSTGRES_URL` (`scripts/test` starts a cluster with `scripts/pg` and sets it);
//! the restart test also needs the PostgreSQL server binaries, because it restarts a cluster of its
//! own rather than the shared one. Without them these tests say why and pass, except under CI.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{json, Value};
use support::proxy::{Mode, Proxy};

mod support;

const ADMIN_TOKEN: &str = "tth_adm_cluster-test-token-0123456789abcdef";

/// One test at a time: each runs several servers and workers, and the figures they print mean more
/// without the others competing for the same two cores.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn postgres_url() -> Option<String> {
    tether_testkit::required_url("TETHER_TEST_POSTGRES_URL", "the cluster tests")
}

async fn fresh_database(admin_url: &str) -> String {
    tether_testkit::postgres::create_test_database(admin_url)
        .await
        .expect("create a test database")
}

/// This test's turn (see [`SERIAL`]) and a database of its own on the shared server; `None`
/// (the test then passes, saying why) without one.
async fn serial_fresh_database() -> Option<(tokio::sync::MutexGuard<'static, ()>, String)> {
    let admin_url = postgres_url()?;
    let serial = SERIAL.lock().await;
    Some((serial, fresh_database(&admin_url).await))
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A `tether serve` process.
struct Server {
    name: &'static str,
    base: String,
    child: Option<Child>,
    log: PathBuf,
    _data: tempfile::TempDir,
}

impl Server {
    async fn start(name: &'static str, database_url: &str, extra: &[&str]) -> Server {
        let data = tempfile::tempdir().expect("data dir");
        let dir = data.path().to_owned();
        Server::start_in(name, database_url, extra, Some(ADMIN_TOKEN), (data, &dir)).await
    }

    /// Started with `admin_token` as `TETHER_ADMIN_TOKEN` (`None`: unset) and `--data-dir dir`,
    /// within `data` (which holds its log, and goes when the server does).
    async fn start_in(
        name: &'static str,
        database_url: &str,
        extra: &[&str],
        admin_token: Option<&str>,
        (data, dir): (tempfile::TempDir, &Path),
    ) -> Server {
        let server = Server::spawn_in(name, database_url, extra, admin_token, (data, dir));
        server.wait_ready().await;
        server
    }

    /// [`Server::start_in`] without waiting for it to be ready.
    fn spawn_in(
        name: &'static str,
        database_url: &str,
        extra: &[&str],
        admin_token: Option<&str>,
        (data, dir): (tempfile::TempDir, &Path),
    ) -> Server {
        let port = free_port();
        let log = data.path().join(format!("server-{name}.log"));
        let mut command = Command::new(env!("CARGO_BIN_EXE_tether"));
        command
            .arg("serve")
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--database", database_url])
            .arg("--data-dir")
            .arg(dir)
            .args(extra)
            .env_remove("TETHER_ADMIN_TOKEN")
            .env("TETHER_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"));
        if let Some(token) = admin_token {
            command.env("TETHER_ADMIN_TOKEN", token);
        }
        Server {
            name,
            base: format!("http://127.0.0.1:{port}"),
            child: Some(command.spawn().expect("spawn tether serve")),
            log,
            _data: data,
        }
    }

    async fn wait_ready(&self) {
        let http = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(r) = http.get(format!("{}/readyz", self.base)).send().await {
                if r.status() == 200 {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "server {} did not become ready:\n{}",
                self.name,
                self.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn api(&self) -> Api {
        Api::new(&self.base)
    }

    /// SIGKILL: no shutdown, no drain.
    fn kill_hard(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().expect("kill -9");
            child.wait().expect("reap");
        }
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- log of server {} ---\n{}", self.name, self.log_tail());
        }
        self.kill_hard();
    }
}

/// Plain HTTP against one server, with the admin token.
#[derive(Clone)]
struct Api {
    http: reqwest::Client,
    base: String,
}

/// A status and a JSON body; a transport failure (server gone) is `None`.
type Reply = Option<(u16, Value)>;

impl Api {
    fn new(base: &str) -> Api {
        Api {
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(15))
                .build()
                .expect("client"),
            base: base.to_owned(),
        }
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
        worker: Option<&str>,
    ) -> Reply {
        let mut req = self
            .http
            .request(method, format!("{}/api/v1/cloud{path}", self.base))
            .bearer_auth(ADMIN_TOKEN);
        if let Some(w) = worker {
            req = req.header("Worker-ID", w);
        }
        if let Some(body) = body {
            req = req.json(&body);
        }
        let resp = req.send().await.ok()?;
        let status = resp.status().as_u16();
        let text = resp.text().await.ok()?;
        Some((
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        ))
    }

    async fn ok(&self, method: Method, path: &str, body: Option<Value>) -> Value {
        match self.call(method.clone(), path, body, None).await {
            Some((200, v)) => v,
            other => panic!("{method} {path}: {other:?}"),
        }
    }

    async fn readyz(&self) -> Reply {
        let resp = self
            .http
            .get(format!("{}/readyz", self.base))
            .send()
            .await
            .ok()?;
        let status = resp.status().as_u16();
        Some((status, resp.json().await.unwrap_or(Value::Null)))
    }

    async fn environment(&self) -> String {
        let env = self
            .ok(
                Method::POST,
                "/environments",
                Some(json!({"name": "cluster", "config": {"type": "self_hosted"}})),
            )
            .await;
        env["id"].as_str().expect("id").to_owned()
    }

    async fn agent(&self) -> String {
        let agent = self
            .ok(
                Method::POST,
                "/agents",
                Some(json!({"name": "cluster-agent", "model": "test-model"})),
            )
            .await;
        agent["id"].as_str().expect("id").to_owned()
    }

    async fn session(&self, env: &str, agent: &str) -> String {
        let s = self
            .ok(
                Method::POST,
                "/sessions",
                Some(json!({"agent": agent, "environment_id": env})),
            )
            .await;
        s["id"].as_str().expect("id").to_owned()
    }

    async fn stats(&self, env: &str) -> Value {
        self.ok(
            Method::GET,
            &format!("/environments/{env}/work/stats"),
            None,
        )
        .await
    }

    /// Every work item of the environment.
    async fn all_work(&self, env: &str) -> Vec<Value> {
        let mut out = Vec::new();
        let mut after = String::new();
        loop {
            let cursor = if after.is_empty() {
                String::new()
            } else {
                format!("&after_id={after}")
            };
            let page = self
                .ok(
                    Method::GET,
                    &format!("/environments/{env}/work?limit=100{cursor}"),
                    None,
                )
                .await;
            out.extend(page["data"].as_array().expect("data").iter().cloned());
            if page["has_more"] != json!(true) {
                return out;
            }
            after = page["last_id"].as_str().expect("last_id").to_owned();
        }
    }
}

/// Fills the queue with `n` items (one per session), creating them through all `apis` in turn.
async fn enqueue(apis: &[Api], env: &str, agent: &str, n: usize) {
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for i in 0..8 {
        let api = apis[i % apis.len()].clone();
        let (env, agent, next) = (env.to_owned(), agent.to_owned(), next.clone());
        tasks.push(tokio::spawn(async move {
            while next.fetch_add(1, Ordering::SeqCst) < n {
                api.session(&env, &agent).await;
            }
        }));
    }
    for t in tasks {
        t.await.expect("enqueue task");
    }
}

fn is_503_envelope(body: &Value) -> bool {
    body["type"] == "error"
        && body["request_id"].is_string()
        && body["error"]["message"].is_string()
        && matches!(
            body["error"]["type"].as_str(),
            Some("overloaded_error" | "api_error")
        )
}

/// What the workers of a test saw, shared between them.
#[derive(Default)]
struct Ledger {
    /// Deliveries per item.
    delivered: Mutex<HashMap<String, usize>>,
    /// Items this side stopped (the stop was answered 200, or 409 after an unanswered attempt).
    finished: AtomicUsize,
    /// Answers that were neither 200 nor an expected 503, with what was asked.
    unexpected: Mutex<Vec<String>>,
    /// 503 answers with the error envelope.
    unavailable: AtomicUsize,
    /// Requests that got no answer at all (the server was gone).
    unanswered: AtomicUsize,
    /// Items each worker finished.
    per_worker: Mutex<HashMap<String, usize>>,
}

impl Ledger {
    fn note_unexpected(&self, what: String) {
        self.unexpected.lock().unwrap().push(what);
    }
}

/// How a worker behaves.
#[derive(Clone)]
struct WorkerPlan {
    /// Servers in the order the worker tries them; it moves on when one stops answering.
    apis: Vec<Api>,
    env: String,
    worker_id: String,
    total: usize,
    /// How long it holds each item, heartbeating every `beat`.
    hold: Duration,
    beat: Duration,
    /// 503 answers are expected (the database is being restarted).
    tolerate_unavailable: bool,
    deadline: Instant,
}

impl WorkerPlan {
    /// Workers that serve `total` items of `env` within `within`, holding each for `hold` and
    /// heartbeating every `beat`; 503 answers count as failures.
    fn new(
        env: &str,
        total: usize,
        hold: Duration,
        beat: Duration,
        within: Duration,
    ) -> WorkerPlan {
        WorkerPlan {
            apis: Vec::new(),
            env: env.to_owned(),
            worker_id: String::new(),
            total,
            hold,
            beat,
            tolerate_unavailable: false,
            deadline: Instant::now() + within,
        }
    }

    /// The same plan with 503 answers expected.
    fn tolerating_unavailable(self) -> WorkerPlan {
        WorkerPlan {
            tolerate_unavailable: true,
            ..self
        }
    }

    /// Starts four workers `{prefix}-0` … `{prefix}-3` on this plan, worker `i` trying the servers
    /// `apis(i)` in order, all recording into `ledger`.
    fn spawn_four(
        &self,
        prefix: &str,
        apis: impl Fn(usize) -> Vec<Api>,
        ledger: &Arc<Ledger>,
    ) -> Vec<tokio::task::JoinHandle<()>> {
        (0..4)
            .map(|i| {
                let plan = WorkerPlan {
                    apis: apis(i),
                    worker_id: format!("{prefix}-{i}"),
                    ..self.clone()
                };
                tokio::spawn(run_worker(plan, ledger.clone()))
            })
            .collect()
    }
}

/// Sends one step until a live server answers it with something other than 503, moving to the next
/// server when the current one does not answer at all. Returns the answer (`None` past the deadline)
/// and the server that gave it.
async fn attempt(
    plan: &WorkerPlan,
    ledger: &Ledger,
    mut at: usize,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> (Reply, usize) {
    loop {
        if Instant::now() > plan.deadline {
            return (None, at);
        }
        match plan.apis[at]
            .call(method.clone(), path, body.clone(), Some(&plan.worker_id))
            .await
        {
            None => {
                ledger.unanswered.fetch_add(1, Ordering::SeqCst);
                at = (at + 1) % plan.apis.len();
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Some((503, reply)) if is_503_envelope(&reply) => {
                ledger.unavailable.fetch_add(1, Ordering::SeqCst);
                if !plan.tolerate_unavailable {
                    ledger.note_unexpected(format!("{method} {path}: 503 {reply}"));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Some(reply) => return (Some(reply), at),
        }
    }
}

/// The worker loop of §8 reduced to its protocol: poll (block_ms=999, Worker-ID), ack, heartbeat
/// while holding the item, force stop. Every step is safe to repeat for the same worker, so a step
/// whose answer was lost is simply sent again.
async fn run_worker(plan: WorkerPlan, ledger: Arc<Ledger>) {
    let env = plan.env.clone();
    let mut at = 0;
    let failures = |ledger: &Ledger| {
        ledger.unavailable.load(Ordering::SeqCst) + ledger.unanswered.load(Ordering::SeqCst)
    };
    loop {
        if ledger.finished.load(Ordering::SeqCst) >= plan.total || Instant::now() > plan.deadline {
            return;
        }
        let path = format!("/environments/{env}/work/poll?block_ms=999");
        let (reply, server) = attempt(&plan, &ledger, at, Method::GET, &path, None).await;
        at = server;
        let item = match reply {
            Some((200, Value::Null)) | None => continue,
            Some((200, item)) => item,
            Some((status, body)) => {
                ledger.note_unexpected(format!("poll: {status} {body}"));
                continue;
            }
        };
        let id = item["id"].as_str().expect("work id").to_owned();
        *ledger
            .delivered
            .lock()
            .unwrap()
            .entry(id.clone())
            .or_default() += 1;

        let path = format!("/environments/{env}/work/{id}/ack");
        let (reply, server) = attempt(&plan, &ledger, at, Method::POST, &path, None).await;
        at = server;
        match reply {
            Some((200, body)) if body["state"] == "starting" || body["state"] == "active" => {}
            other => {
                ledger.note_unexpected(format!("ack {id}: {other:?}"));
                continue;
            }
        }
        // Unconditional heartbeats with the Worker-ID guard (D-7b): repeating one whose answer was
        // lost is harmless, and a 409 still means the lease is gone.
        let held = Instant::now();
        let path = format!("/environments/{env}/work/{id}/heartbeat");
        loop {
            let (reply, server) = attempt(&plan, &ledger, at, Method::POST, &path, None).await;
            at = server;
            match reply {
                Some((200, hb))
                    if hb["state"] == "active" && hb["lease_extended"] == json!(true) => {}
                other => {
                    ledger.note_unexpected(format!("heartbeat {id}: {other:?}"));
                    break;
                }
            }
            if held.elapsed() >= plan.hold {
                break;
            }
            tokio::time::sleep(plan.beat).await;
        }
        let before = failures(&ledger);
        let path = format!("/environments/{env}/work/{id}/stop");
        let (reply, server) = attempt(
            &plan,
            &ledger,
            at,
            Method::POST,
            &path,
            Some(json!({"force": true})),
        )
        .await;
        at = server;
        match reply {
            Some((200, body)) if body["state"] == "stopped" => {}
            // An earlier attempt committed but its answer was lost.
            Some((409, _)) if failures(&ledger) > before => {}
            other => {
                ledger.note_unexpected(format!("stop {id}: {other:?}"));
                continue;
            }
        }
        ledger.finished.fetch_add(1, Ordering::SeqCst);
        *ledger
            .per_worker
            .lock()
            .unwrap()
            .entry(plan.worker_id.clone())
            .or_default() += 1;
    }
}

fn assert_clean(ledger: &Ledger) {
    let unexpected = ledger.unexpected.lock().unwrap();
    assert!(
        unexpected.is_empty(),
        "unexpected answers:\n{}",
        unexpected.join("\n")
    );
}

/// Every item of `env` was delivered, finished by a worker and is stopped, and none ever lost its
/// lease. (A worker whose ack found its item held by another would have been an unexpected answer.)
async fn assert_all_done(api: &Api, env: &str, ledger: &Ledger, n: usize) {
    let items = api.all_work(env).await;
    assert_eq!(items.len(), n, "items in the queue");
    for item in &items {
        assert_eq!(item["state"], "stopped", "{item}");
        assert_eq!(item["requeue_count"], json!(0), "no lease expired: {item}");
    }
    let delivered = ledger.delivered.lock().unwrap().len();
    assert_eq!(delivered, n, "every item was delivered");
    assert_eq!(
        ledger.finished.load(Ordering::SeqCst),
        n,
        "every item was finished once"
    );
    let stats = api.stats(env).await;
    assert_eq!(
        (stats["depth"].as_u64(), stats["pending"].as_u64()),
        (Some(0), Some(0)),
        "{stats}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_servers_drain_one_queue_without_double_delivery() {
    let Some((_serial, url)) = serial_fresh_database().await else {
        return;
    };
    let a = Server::start("A", &url, &[]).await;
    let b = Server::start("B", &url, &[]).await;
    let (api_a, api_b) = (a.api(), b.api());
    let env = api_a.environment().await;
    let agent = api_b.agent().await;

    const N: usize = 1_000;
    let started = Instant::now();
    enqueue(&[api_a.clone(), api_b.clone()], &env, &agent, N).await;
    let enqueue_time = started.elapsed();
    let stats = api_b.stats(&env).await;
    assert_eq!(stats["depth"], json!(N), "{stats}");

    let ledger = Arc::new(Ledger::default());
    let started = Instant::now();
    let workers = WorkerPlan::new(
        &env,
        N,
        Duration::ZERO,
        Duration::ZERO,
        Duration::from_secs(150),
    )
    .spawn_four(
        "drain",
        |i| vec![if i < 2 { api_a.clone() } else { api_b.clone() }],
        &ledger,
    );
    for w in workers {
        w.await.expect("worker");
    }
    let drain_time = started.elapsed();
    assert_clean(&ledger);
    for (item, times) in ledger.delivered.lock().unwrap().iter() {
        assert_eq!(*times, 1, "{item} was delivered {times} times");
    }
    assert_all_done(&api_a, &env, &ledger, N).await;
    // Workers are stored rows, so both servers count all four.
    for api in [&api_a, &api_b] {
        let stats = api.stats(&env).await;
        assert_eq!(stats["workers_polling"], json!(4), "{stats}");
    }
    let per_worker = ledger.per_worker.lock().unwrap().clone();
    eprintln!(
        "cluster drain: {N} items enqueued through 2 servers in {:.2?} ({:.0}/s); drained by 4 workers \
         on 2 servers in {:.2?} ({:.0} items/s); per worker {per_worker:?}",
        enqueue_time,
        N as f64 / enqueue_time.as_secs_f64(),
        drain_time,
        N as f64 / drain_time.as_secs_f64()
    );
}

/// Each server of a cluster given an admin token of its own (one made on each machine) leaves every
/// one but the first without use: that server says so at start, and the token it was given is
/// refused. A data directory a server makes is its user's alone on this store too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_admin_token_that_is_not_adopted_is_said_so() {
    let Some((_serial, url)) = serial_fresh_database().await else {
        return;
    };
    // The first server adopts its token, and writes it into a data directory it makes. Started
    // with a shell's usual umask (see `the_store_is_readable_by_its_user_only`).
    let data = tempfile::tempdir().expect("data dir");
    let dir = data.path().join("made-by-the-server");
    let runner = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o022));
    let first = Server::start_in("A", &url, &[], Some(ADMIN_TOKEN), (data, &dir)).await;
    nix::sys::stat::umask(runner);
    let other_token = "tth_adm_made-on-the-second-machine-0123456789";
    let data = tempfile::tempdir().expect("data dir");
    let second_dir = data.path().to_owned();
    let second = Server::start_in("B", &url, &[], Some(other_token), (data, &second_dir)).await;
    let said = "TETHER_ADMIN_TOKEN is set but is not a live admin token of this store";
    let warned_by = |server: &Server| std::fs::read_to_string(&server.log).unwrap().contains(said);
    assert!(warned_by(&second), "{}", second.log_tail());
    // Neither the server that adopted the token nor one given the adopted token says anything.
    let third = Server::start("C", &url, &[]).await;
    for server in [&first, &third] {
        assert!(!warned_by(server), "{}", server.log_tail());
    }
    let refused = reqwest::Client::new()
        .get(format!("{}/api/v1/cloud/environments", second.base))
        .bearer_auth(other_token)
        .send()
        .await
        .expect("a request");
    assert_eq!(refused.status(), 401);
    // The token the first server adopted works on both.
    second.api().environment().await;
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700, "the data directory has mode {mode:o}");
    assert!(dir.join("admin-token").exists());
}

/// Servers of a cluster sharing one data directory, all started at once on an empty store, leave
/// in `admin-token` the one token the store took, whichever start made it: each saved the token it
/// made in the same file before the store had it, and one could put another's in place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servers_started_at_once_on_one_data_directory_save_the_token_the_store_took() {
    let Some(admin_url) = postgres_url() else {
        return;
    };
    let _serial = SERIAL.lock().await;
    for round in 0..8 {
        let url = fresh_database(&admin_url).await;
        let shared = tempfile::tempdir().expect("data dir");
        let servers: Vec<Server> = ["A", "B", "C"]
            .into_iter()
            .map(|name| {
                let logs = tempfile::tempdir().expect("log dir");
                Server::spawn_in(name, &url, &[], None, (logs, shared.path()))
            })
            .collect();
        for server in &servers {
            server.wait_ready().await;
        }
        let token = std::fs::read_to_string(shared.path().join("admin-token")).expect("the file");
        for server in &servers {
            let answer = reqwest::Client::new()
                .get(format!("{}/api/v1/cloud/environments", server.base))
                .bearer_auth(token.trim())
                .send()
                .await
                .expect("a request");
            assert_eq!(answer.status(), 200, "round {round}: {}", server.log_tail());
        }
        assert!(
            !shared.path().join("admin-token.new").exists(),
            "round {round}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_poll_on_one_server_wakes_for_work_created_on_another() {
    let Some((_serial, url)) = serial_fresh_database().await else {
        return;
    };
    // The default one-second dispatcher tick: a wake-up well under it came through the notification.
    let a = Server::start("A", &url, &[]).await;
    let b = Server::start("B", &url, &[]).await;
    let (api_a, api_b) = (a.api(), b.api());
    let env = api_a.environment().await;
    let agent = api_a.agent().await;

    let (mut latencies, mut since_sent) = (Vec::new(), Vec::new());
    for round in 0..20 {
        let poller = {
            let (api_b, env) = (api_b.clone(), env.clone());
            tokio::spawn(async move {
                // Re-poll until the item arrives: a null at the deadline is not a failure.
                loop {
                    match api_b
                        .call(
                            Method::GET,
                            &format!("/environments/{env}/work/poll?block_ms=999"),
                            None,
                            Some("waiter"),
                        )
                        .await
                    {
                        Some((200, Value::Null)) => continue,
                        Some((200, item)) => return (item, Instant::now()),
                        other => panic!("poll on B: {other:?}"),
                    }
                }
            })
        };
        // Let the poll block first.
        tokio::time::sleep(Duration::from_millis(150)).await;
        let sent = Instant::now();
        let session = api_a.session(&env, &agent).await;
        let created = Instant::now();
        let (item, woke) = tokio::time::timeout(Duration::from_secs(10), poller)
            .await
            .expect("B's poll got the item")
            .expect("poller");
        assert_eq!(item["data"]["id"], json!(session), "round {round}");
        let id = item["id"].as_str().unwrap();
        api_b
            .ok(
                Method::POST,
                &format!("/environments/{env}/work/{id}/stop"),
                Some(json!({"force": true})),
            )
            .await;
        latencies.push(woke.saturating_duration_since(created));
        since_sent.push(woke.saturating_duration_since(sent));
    }
    let summary = |mut d: Vec<Duration>| {
        d.sort();
        format!(
            "min {:.2?}, median {:.2?}, p90 {:.2?}, max {:.2?}",
            d[0],
            d[d.len() / 2],
            d[d.len() * 9 / 10],
            d[d.len() - 1]
        )
    };
    eprintln!(
        "cross-server wake-up over 20 rounds, until the blocked poll on B returns the item: \
         after A answered the session create {}; after the create was sent {}",
        summary(latencies),
        summary(since_sent)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_server_loses_nothing_and_its_workers_carry_on() {
    let Some((_serial, url)) = serial_fresh_database().await else {
        return;
    };
    let a = Server::start("A", &url, &[]).await;
    let mut b = Server::start("B", &url, &[]).await;
    let (api_a, api_b) = (a.api(), b.api());
    let env = api_a.environment().await;
    let agent = api_a.agent().await;

    const N: usize = 300;
    enqueue(&[api_a.clone(), api_b.clone()], &env, &agent, N).await;
    let ledger = Arc::new(Ledger::default());
    let hold = Duration::from_millis(20);
    let beat = Duration::from_millis(10);
    // Workers 2 and 3 start on B and fall back to A.
    let workers = WorkerPlan::new(&env, N, hold, beat, Duration::from_secs(120)).spawn_four(
        "kill",
        |i| {
            if i < 2 {
                vec![api_a.clone(), api_b.clone()]
            } else {
                vec![api_b.clone(), api_a.clone()]
            }
        },
        &ledger,
    );
    while ledger.finished.load(Ordering::SeqCst) < N / 3 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let at_kill: HashMap<String, usize> = ledger.per_worker.lock().unwrap().clone();
    b.kill_hard();
    let killed = Instant::now();
    for w in workers {
        w.await.expect("worker");
    }
    let after = killed.elapsed();
    assert_clean(&ledger);
    assert_all_done(&api_a, &env, &ledger, N).await;
    let per_worker = ledger.per_worker.lock().unwrap().clone();
    for w in ["kill-2", "kill-3"] {
        assert!(
            per_worker.get(w).copied().unwrap_or(0) > at_kill.get(w).copied().unwrap_or(0),
            "{w} carried on through A: {per_worker:?} (at the kill: {at_kill:?})"
        );
    }
    let redelivered = ledger
        .delivered
        .lock()
        .unwrap()
        .values()
        .filter(|n| **n > 1)
        .count();
    eprintln!(
        "kill -9 of B after {} of {N} items: the rest finished through A in {after:.2?}; \
         requests left unanswered by the dead server: {}; items re-delivered after a lost answer: {redelivered}",
        at_kill.values().sum::<usize>(),
        ledger.unanswered.load(Ordering::SeqCst)
    );
}

/// How many private clusters this process made (each gets a directory of its own).
static CLUSTERS: AtomicUsize = AtomicUsize::new(0);

/// A private PostgreSQL cluster and its URL, for the `which` test. Without the server binaries the
/// test says so and passes, except under CI, where that is an error.
fn private_cluster(which: &str) -> Option<(PrivateCluster, String)> {
    match PrivateCluster::start() {
        Ok(c) => Some(c),
        Err(why) if std::env::var_os("CI").is_none() => {
            eprintln!("skipped: the {which} test needs the PostgreSQL server binaries for a cluster of its own: {why}");
            None
        }
        Err(why) => panic!("cannot start a private PostgreSQL cluster: {why}"),
    }
}

/// A PostgreSQL cluster of this test's own, so that restarting it disturbs nobody else.
struct PrivateCluster {
    dir: PathBuf,
    port: u16,
}

impl PrivateCluster {
    fn script(&self, command: &str, stop_mode: &str) -> std::process::Output {
        Command::new(workspace_root().join("scripts/pg"))
            .arg(command)
            .env("TETHER_PG_DIR", &self.dir)
            .env("TETHER_PG_PORT", self.port.to_string())
            .env("TETHER_PG_STOP_MODE", stop_mode)
            .output()
            .expect("run scripts/pg")
    }

    fn start() -> Result<(PrivateCluster, String), String> {
        let cluster = PrivateCluster {
            dir: PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!(
                "pg-restart-{}-{}",
                std::process::id(),
                CLUSTERS.fetch_add(1, Ordering::SeqCst)
            )),
            port: free_port(),
        };
        let out = cluster.script("start", "fast");
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        let url = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        Ok((cluster, url))
    }

    fn run(&self, command: &str, stop_mode: &str) {
        let out = self.script(command, stop_mode);
        assert!(
            out.status.success(),
            "scripts/pg {command}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for PrivateCluster {
    fn drop(&mut self) {
        let _ = self.script("destroy", "immediate");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_restart_is_survived_without_losses_or_expired_leases() {
    if postgres_url().is_none() {
        return;
    }
    let _serial = SERIAL.lock().await;
    let Some((cluster, url)) = private_cluster("restart") else {
        return;
    };
    // Leases of 4 s, heartbeats every 300 ms; the database stays away for 6 s, longer than a lease.
    // Every lease would have run out by the time it is back; the first server to reach it again
    // grants lease amnesty (`App::amnesty_after_outage`; the other finds it marked the leases kept
    // after the outage, and need not), so no worker loses its item.
    let lease = [
        "--lease-ttl",
        "4",
        "--lease-ttl-min",
        "1",
        "--tick-ms",
        "200",
    ];
    let a = Server::start("A", &url, &lease).await;
    let b = Server::start("B", &url, &lease).await;
    let (api_a, api_b) = (a.api(), b.api());
    let env = api_a.environment().await;
    let agent = api_a.agent().await;

    const N: usize = 60;
    enqueue(&[api_a.clone(), api_b.clone()], &env, &agent, N).await;
    let ledger = Arc::new(Ledger::default());
    let hold = Duration::from_millis(800);
    let beat = Duration::from_millis(300);
    let workers = WorkerPlan::new(&env, N, hold, beat, Duration::from_secs(120))
        .tolerating_unavailable()
        .spawn_four(
            "restart",
            |i| vec![if i < 2 { api_a.clone() } else { api_b.clone() }],
            &ledger,
        );
    // Under load: items are held by every worker.
    while ledger.finished.load(Ordering::SeqCst) < 8 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let before = ledger.finished.load(Ordering::SeqCst);
    // Immediate mode is a crash of the database: what it acknowledged must come back from its log.
    cluster.run("stop", "immediate");
    let down = Instant::now();
    tokio::time::sleep(Duration::from_secs(1)).await;
    for api in [&api_a, &api_b] {
        let (status, body) = api.readyz().await.expect("the server itself stays up");
        assert_eq!(status, 503, "readiness while the database is down: {body}");
        assert_a_read_is_answered_503(api, &env).await;
    }
    tokio::time::sleep(Duration::from_secs(6).saturating_sub(down.elapsed())).await;
    cluster.run("start", "fast");
    let up = Instant::now();
    let outage = down.elapsed();
    // Nobody restarts the servers: they find the database again by themselves.
    for api in [&api_a, &api_b] {
        while !matches!(api.readyz().await, Some((200, _))) {
            assert!(up.elapsed() < Duration::from_secs(30), "service resumed");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let resumed = up.elapsed();
    for w in workers {
        w.await.expect("worker");
    }
    assert_clean(&ledger);
    assert!(
        ledger.unavailable.load(Ordering::SeqCst) > 0,
        "workers saw 503 during the outage"
    );
    assert_eq!(
        ledger.unanswered.load(Ordering::SeqCst),
        0,
        "the servers answered throughout"
    );
    assert_all_done(&api_b, &env, &ledger, N).await;
    // The outage is said once by each server, not by every duty at every tick of it.
    for server in [&a, &b] {
        let log = std::fs::read_to_string(&server.log).unwrap();
        assert!(log.contains("lost the database"), "{log}");
        for duty in ["dispatcher:", "sampler:"] {
            assert!(
                !log.contains(duty),
                "{duty} lines during the outage:\n{log}"
            );
        }
        // Nor by the pool for each connection it loses, nor by every failed request: the
        // store's failures at most once every 10 s.
        assert!(!log.contains("deadpool"), "the pool's own lines:\n{log}");
        let failures = log.matches("store unavailable").count() as u64;
        let windows = 2 + (outage + resumed).as_secs() / 10;
        assert!(
            failures <= windows,
            "{failures} lines of a store unavailable, more than {windows}:\n{log}"
        );
    }
    eprintln!(
        "database down for {outage:.2?} (longer than the 4 s leases) with {} of {N} items done: \
         {} requests answered 503 meanwhile; both servers ready {resumed:.2?} after the database; \
         every item finished, none re-queued",
        before,
        ledger.unavailable.load(Ordering::SeqCst)
    );
    drop((a, b));
}

/// A real `tether worker` whose program records each start, on an item of a new session.
struct RecordedWorker {
    child: Child,
    record: PathBuf,
    log: PathBuf,
    work: String,
    _dir: tempfile::TempDir,
}

impl RecordedWorker {
    /// Starts the worker with a lease of `ttl` seconds and waits until it runs the session's item.
    async fn serving(server: &Server, api: &Api, env: &str, agent: &str, ttl: &str) -> Self {
        let mut worker = Self::start(server, api, env, ttl, "outage").await;
        let session = api.session(env, agent).await;
        let deadline = Instant::now() + Duration::from_secs(60);
        worker.work = loop {
            let items = api.all_work(env).await;
            if let Some(item) = items
                .iter()
                .find(|i| i["data"]["id"] == session.as_str() && i["state"] == "active")
            {
                break item["id"].as_str().expect("id").to_owned();
            }
            assert!(Instant::now() < deadline, "the session was never served");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        worker
    }

    /// Starts the worker `worker_id` on `server` with a lease of `ttl` seconds. Its program notes
    /// when it starts, and the time every tenth of a second while it runs ([`Self::alive`]).
    async fn start(server: &Server, api: &Api, env: &str, ttl: &str, worker_id: &str) -> Self {
        let key = api
            .ok(
                Method::POST,
                &format!("/environments/{env}/keys"),
                Some(json!({})),
            )
            .await["token"]
            .as_str()
            .expect("key")
            .to_owned();
        let dir = tempfile::tempdir().expect("records");
        let record = dir.path().join("program");
        let log = dir.path().join("worker.log");
        let child = Command::new(env!("CARGO_BIN_EXE_tether"))
            .arg("worker")
            .args([
                "--server",
                &server.base,
                "--environment",
                env,
                "--key",
                &key,
            ])
            .args(["--worker-id", worker_id, "--ttl", ttl, "--grace", "1"])
            .args([
                "--",
                "sh",
                "-c",
                r#"echo "start $$" >> "$RECORD"; while :; do date +%s%N >> "$RECORD.alive"; sleep 0.1; done"#,
            ])
            .env_remove("TETHER_KEY")
            .env("RECORD", &record)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("worker log"))
            .spawn()
            .expect("spawn tether worker");
        RecordedWorker {
            child,
            record,
            log,
            work: String::new(),
            _dir: dir,
        }
    }

    /// The wall-clock times (ns since the epoch) at which this worker's programs were seen running.
    fn alive(&self) -> Vec<u128> {
        let mut path = self.record.clone().into_os_string();
        path.push(".alive");
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .filter_map(|line| line.trim().parse().ok())
            .collect()
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// One program ran from start to now, under one delivery of the item that was never requeued.
    async fn assert_kept_its_program(mut self, api: &Api, env: &str) {
        let log = self.log_text();
        let starts = std::fs::read_to_string(&self.record).unwrap_or_default();
        assert_eq!(
            starts.lines().count(),
            1,
            "one program, never restarted:\n{starts}\n{log}"
        );
        assert!(
            !log.contains("lease lost"),
            "the worker kept its lease:\n{log}"
        );
        let item = api
            .all_work(env)
            .await
            .into_iter()
            .find(|i| i["id"] == self.work.as_str())
            .expect("the item");
        assert_eq!(item["state"], "active", "{item}");
        assert_eq!(item["requeue_count"], 0, "{item}");
        assert_eq!(item["delivery_count"], 1, "{item}");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The answer to `method path` during an outage: a 503 in the envelope; its body.
async fn outage_answer(api: &Api, method: Method, path: &str) -> Value {
    let (status, body) = api
        .call(method, path, None, None)
        .await
        .expect("the server answers during the outage");
    assert_eq!(status, 503, "{body}");
    assert!(is_503_envelope(&body), "a clear envelope: {body}");
    body
}

/// A read during an outage: answered, 503 in the envelope.
async fn assert_a_read_is_answered_503(api: &Api, env: &str) {
    outage_answer(api, Method::GET, &format!("/environments/{env}/work/stats")).await;
}

/// The 503 of an outage, with its promise of lease amnesty, in answer to a heartbeat.
async fn assert_heartbeat_promises_amnesty(api: &Api, env: &str, work: &str) {
    let path = format!("/environments/{env}/work/{work}/heartbeat");
    let body = outage_answer(api, Method::POST, &path).await;
    assert_eq!(body["error"]["code"], "store_unavailable", "{body}");
    assert!(
        body["error"]["details"]["lease_amnesty_ms"].as_u64() > Some(0),
        "the 503 promises amnesty: {body}"
    );
}

/// Issue 10, defect 2: a worker with a short lease keeps its program through a database outage longer
/// than the lease. During the outage every heartbeat is answered 503 with the server's promise of lease
/// amnesty (`error.details.lease_amnesty_ms`), which the worker takes in place of a renewal; once the
/// database is back the server grants the amnesty before deciding any expiry, and the heartbeats are
/// accepted again. One program ran, from start to end, and the item was never requeued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_keeps_its_program_through_a_database_outage() {
    if postgres_url().is_none() {
        return;
    }
    let _serial = SERIAL.lock().await;
    let Some((cluster, url)) = private_cluster("outage") else {
        return;
    };
    let server = Server::start("A", &url, &["--lease-ttl-min", "1", "--tick-ms", "200"]).await;
    let api = server.api();
    let env = api.environment().await;
    let agent = api.agent().await;
    let worker = RecordedWorker::serving(&server, &api, &env, &agent, "4").await;

    // Away for 10 s: two and a half of the worker's 4 s leases.
    cluster.run("stop", "immediate");
    let down = Instant::now();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_heartbeat_promises_amnesty(&api, &env, &worker.work).await;
    tokio::time::sleep(Duration::from_secs(10).saturating_sub(down.elapsed())).await;
    cluster.run("start", "fast");
    server.wait_ready().await;
    // Two leases' worth of heartbeats after the database came back.
    tokio::time::sleep(Duration::from_secs(8)).await;
    worker.assert_kept_its_program(&api, &env).await;
    drop(server);
}

/// A database that stops answering without closing its connections (frozen, its host paused, a
/// partition that drops packets), here a proxy that stops passing bytes on: no error ever comes, so
/// the server notices by its probe. Requests are answered 503 within the probe's bound rather than
/// held for as long as it lasts, and a worker on the shortest default lease (10 s) keeps its
/// program through 15 s of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_that_stops_answering_is_an_outage_not_a_hang() {
    let Some((_serial, url)) = serial_fresh_database().await else {
        return;
    };
    let Some((proxy, proxied)) = behind_a_proxy(&url).await else {
        return;
    };
    let server = Server::start("A", &proxied, &["--tick-ms", "200"]).await;
    let api = server.api();
    let env = api.environment().await;
    let agent = api.agent().await;
    let worker = RecordedWorker::serving(&server, &api, &env, &agent, "10").await;

    proxy.set(Mode::Freeze);
    let frozen = Instant::now();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_heartbeat_promises_amnesty(&api, &env, &worker.work).await;
    assert_a_read_is_answered_503(&api, &env).await;
    let answered = frozen.elapsed();
    // A liveness bound with slack (the probe's is 3 s), not a speed claim.
    assert!(
        answered < Duration::from_secs(10),
        "answered after {answered:.2?}"
    );
    tokio::time::sleep(Duration::from_secs(15).saturating_sub(frozen.elapsed())).await;
    proxy.set(Mode::Forward);
    server.wait_ready().await;
    // A lease's worth of heartbeats after the database answers again.
    tokio::time::sleep(Duration::from_secs(10)).await;
    worker.assert_kept_its_program(&api, &env).await;
    eprintln!(
        "database unanswering for 15 s: a heartbeat and a read were answered 503 within {answered:.2?} of its start"
    );
    drop(server);
}

/// A proxy in front of the database at `url`, and the URL that goes through it; `None` (saying
/// why) when the URL's address is not an IP address and port.
async fn behind_a_proxy(url: &str) -> Option<(Proxy, String)> {
    let address = url
        .split_once('@')
        .and_then(|(_, rest)| rest.split(['/', '?']).next())
        .filter(|address| address.parse::<std::net::SocketAddr>().is_ok());
    let Some(address) = address else {
        eprintln!("skipped: the database's address in {url} is not an IP address and port");
        return None;
    };
    let proxy = Proxy::start(&format!("http://{address}")).await;
    let proxied = url.replacen(address, proxy.url.trim_start_matches("http://"), 1);
    Some((proxy, proxied))
}

/// A lone server cut off from its database by a fault that spares the database (a proxy that
/// refuses it), and a second server started meanwhile on the database itself, with a worker of
/// its own. The first promises its worker lease amnesty, up to the end its last mark in the
/// database gave (`--amnesty-ms` after it) and not past it; the second, having read that mark,
/// settles the lease only after that end. So the session's item goes to the second server's worker
/// only after the first worker's program is dead: never two programs at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_cut_off_alone_and_one_started_meanwhile_never_run_a_session_twice() {
    let Some((_serial, url)) = serial_fresh_database().await else {
        return;
    };
    let Some((proxy, proxied)) = behind_a_proxy(&url).await else {
        return;
    };
    let flags = [
        "--lease-ttl-min",
        "1",
        "--tick-ms",
        "200",
        "--amnesty-ms",
        "6000",
    ];
    let a = Server::start("A", &proxied, &flags).await;
    let api_a = a.api();
    let env = api_a.environment().await;
    let agent = api_a.agent().await;
    let first = RecordedWorker::serving(&a, &api_a, &env, &agent, "3").await;
    // A marks the leases kept, alone, a few times.
    tokio::time::sleep(Duration::from_secs(1)).await;

    proxy.set(Mode::Refuse);
    let cut = Instant::now();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_heartbeat_promises_amnesty(&api_a, &env, &first.work).await;
    let b = Server::start("B", &url, &flags).await;
    let api_b = b.api();
    let second = RecordedWorker::start(&b, &api_b, &env, "3", "second").await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while second.alive().is_empty() {
        assert!(
            Instant::now() < deadline,
            "the item never went to the second server's worker:\n{}\n{}",
            first.log_text(),
            second.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let handed_over = cut.elapsed();
    // Long enough for a program still running to note so a few times.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let first_alive = first.alive();
    let (Some(&first_last), Some(&second_first)) = (first_alive.last(), second.alive().first())
    else {
        panic!("both programs ran");
    };
    assert!(
        first_last < second_first,
        "two programs for one session: the first was seen running {} ms after the second started\n\
         first worker:\n{}\nsecond worker:\n{}",
        (first_last - second_first) / 1_000_000,
        first.log_text(),
        second.log_text()
    );
    let item = api_b
        .all_work(&env)
        .await
        .into_iter()
        .find(|i| i["id"] == first.work.as_str())
        .expect("the item");
    assert_eq!(item["delivery_count"], 2, "{item}");
    eprintln!(
        "cut off alone: the item went to a worker of the server started meanwhile {handed_over:.2?} \
         after the cut, {} ms after the first program was last seen running",
        (second_first - first_last) / 1_000_000
    );
    for mut worker in [first, second] {
        let _ = worker.child.kill();
        let _ = worker.child.wait();
    }
    drop((a, b));
}

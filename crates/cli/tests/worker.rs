//! `tether worker` end to end: real `tether serve` processes, real `tether worker` processes, real child
//! programs (small `sh` scripts that stamp what they do into files named after their work item).
//!
//! The server runs with short leases (`--lease-ttl-min 1 --lease-ttl 2 --tick-ms 100`) and the workers
//! ask for 4 s leases (a worker kills its program a quarter of the TTL before its deadline), so a lost
//! lease shows within seconds. Nothing here asserts how long anything took:
//! waits are bounded only so that a hang fails instead of blocking the suite.

mod support;

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use reqwest::Method;
use serde_json::{json, Value};
use support::api::Deployment;
use support::http_proxy::{HttpProxy, Meddling};
use support::proxy::{Mode, Proxy};
use support::worker::WorkerChild;

/// How long any one wait may take before the test gives up (a liveness bound, not a timing assertion).
const PATIENCE: Duration = Duration::from_secs(60);

const SHORT_LEASES: [&str; 6] = [
    "--lease-ttl-min",
    "1",
    "--lease-ttl",
    "2",
    "--tick-ms",
    "100",
];

// ---- the server and its API --------------------------------------------------------------------------

/// The deployment the workers run against; its methods below are what these tests ask of it.
type Setup = Deployment;

impl Setup {
    async fn new() -> Setup {
        let setup = Deployment::start(&SHORT_LEASES, "workers").await;
        std::fs::create_dir_all(setup.stamps()).expect("stamps dir");
        setup
    }

    fn stamps(&self) -> PathBuf {
        self.dir.path().join("stamps")
    }

    /// Queues one session, waits until a worker has started its program once and the item is
    /// active; returns the item's id and when the program started.
    async fn session_started_and_active(&self) -> (String, Stamp) {
        let work = self.session(json!({})).await;
        let start = started(&self.stamps(), &work, 1).await;
        self.wait_for_state(&work, "active").await;
        (work, start)
    }

    /// Creates a session (which queues one work item) and returns the item's id.
    async fn session(&self, metadata: Value) -> String {
        let session = self
            .api
            .ok(
                Method::POST,
                "/sessions",
                json!({"agent": self.agent, "environment_id": self.env, "metadata": metadata}),
            )
            .await;
        let session = session["id"].as_str().expect("session id").to_owned();
        self.work_items()
            .await
            .into_iter()
            .find(|i| i["data"]["id"] == session.as_str())
            .and_then(|i| i["id"].as_str().map(str::to_owned))
            .expect("a session on a self-hosted environment has a work item")
    }

    async fn work_items(&self) -> Vec<Value> {
        let mut out = Vec::new();
        let mut page: Option<String> = None;
        loop {
            let mut path = format!("/environments/{}/work?limit=100", self.env);
            if let Some(p) = &page {
                path.push_str(&format!("&page={p}"));
            }
            let body = self.api.get(&path).await;
            out.extend(body["data"].as_array().expect("data").iter().cloned());
            match body["next_page"].as_str() {
                Some(next) => page = Some(next.to_owned()),
                None => return out,
            }
        }
    }

    async fn item(&self, work: &str) -> Value {
        self.api
            .get(&format!("/environments/{}/work/{work}", self.env))
            .await
    }

    async fn causes(&self, work: &str) -> Vec<String> {
        self.history(work)
            .await
            .iter()
            .map(|t| t["cause"].as_str().expect("cause").to_owned())
            .collect()
    }

    async fn history(&self, work: &str) -> Vec<Value> {
        let history = self
            .api
            .get(&format!(
                "/environments/{}/work/{work}/history?limit=100",
                self.env
            ))
            .await;
        history["data"].as_array().expect("data").clone()
    }

    /// Whether the item's delivery, ack and first heartbeat were one request's (a claim's): they
    /// then share one instant, where three requests each have their own.
    async fn claimed_in_one_request(&self, work: &str) -> bool {
        let history = self.history(work).await;
        let at = |cause: &str| {
            let transition = history.iter().find(|t| t["cause"] == cause);
            transition.map(|t| t["at"].clone())
        };
        let delivered = at("delivered");
        delivered.is_some() && delivered == at("acked") && delivered == at("first_heartbeat")
    }

    /// Whether the worker ended the item with the claim of its next (`crate::chain` of the worker).
    async fn stopped_with_a_claim(&self, work: &str) -> bool {
        let history = self.history(work).await;
        let stop = history.iter().rev().find(|t| t["cause"] == "force_stopped");
        let detail = stop.and_then(|t| t["detail"].as_str()).unwrap_or_default();
        detail.ends_with("asked for by the item's session token, sent with a claim")
    }

    async fn stop(&self, work: &str, force: bool) -> Value {
        self.api
            .ok(
                Method::POST,
                &format!("/environments/{}/work/{work}/stop", self.env),
                json!({ "force": force }),
            )
            .await
    }

    async fn wait_for_state(&self, work: &str, state: &str) -> Value {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let item = self.item(work).await;
            if item["state"] == state {
                return item;
            }
            assert!(
                Instant::now() < deadline,
                "{work} never became {state}: {item}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A worker `w1` that reaches the server through an HTTP proxy meddling with its claims, and
    /// records each item's end.
    async fn worker_behind(&self, meddling: Meddling) -> (HttpProxy, WorkerProcess) {
        let proxy = HttpProxy::start(&self.server.base, meddling).await;
        let script = format!("{PRELUDE}{ENDS_AT_ONCE}");
        let options = WorkerOptions::running(&script).via(&proxy.url);
        let worker = self.worker("w1", options);
        (proxy, worker)
    }

    fn worker(&self, name: &str, options: WorkerOptions) -> WorkerProcess {
        let server = options
            .server
            .clone()
            .unwrap_or_else(|| self.server.base.clone());
        WorkerProcess::start(
            name,
            &server,
            &self.env,
            &self.key,
            &self.stamps(),
            self.dir.path(),
            &options,
        )
    }
}

// ---- worker processes ----------------------------------------------------------------------------------
#[derive(Clone)]
struct WorkerOptions {
    /// Another URL for the server (a proxy); the server's own by default.
    server: Option<String>,
    /// Pass the key as TETHER_KEY instead of --key.
    key_in_env: bool,
    concurrency: &'static str,
    ttl: &'static str,
    grace: &'static str,
    drain_timeout: &'static str,
    log_dir: Option<PathBuf>,
    script: String,
}

impl WorkerOptions {
    /// Reaching the server at `url` (a proxy in front of it).
    fn via(self, url: &str) -> WorkerOptions {
        WorkerOptions {
            server: Some(url.to_owned()),
            ..self
        }
    }

    fn running(script: &str) -> WorkerOptions {
        WorkerOptions {
            server: None,
            key_in_env: false,
            concurrency: "1",
            ttl: "4",
            grace: "1",
            drain_timeout: "2",
            log_dir: None,
            script: script.to_owned(),
        }
    }
}

/// The lines every script starts with: `$f` is the item's stamp file, and the start is stamped.
const PRELUDE: &str = r#"f="$STAMPS/$TETHER_WORK_ID"
echo "start $TETHER_WORKER_ID $$" >> "$f"
"#;

/// Stamps its end at once and exits 0 (after [`PRELUDE`]).
const ENDS_AT_ONCE: &str = r#"echo "end $TETHER_WORKER_ID $$" >> "$f"
"#;

/// Runs until `$f.release` exists, then stamps its end and exits 0.
const UNTIL_RELEASED: &str = r#"while [ ! -e "$f.release" ]; do sleep 0.1; done
echo "end $TETHER_WORKER_ID $$" >> "$f"
"#;

/// On SIGTERM: stamps it and exits 0. Goes before [`PRELUDE`]: once the start is stamped, a stop may come.
const TRAP_TERM: &str = r#"trap 'echo "term $TETHER_WORKER_ID $$" >> "$f"; exit 0' TERM
"#;

/// A `tether worker` of these tests; its methods below are what the tests ask of it.
type WorkerProcess = WorkerChild;

impl WorkerProcess {
    fn start(
        name: &str,
        server: &str,
        env: &str,
        key: &str,
        stamps: &Path,
        dir: &Path,
        options: &WorkerOptions,
    ) -> WorkerProcess {
        let mut command = WorkerChild::command(server, env, name);
        command
            .args(["--concurrency", options.concurrency, "--ttl", options.ttl])
            .args([
                "--grace",
                options.grace,
                "--drain-timeout",
                options.drain_timeout,
            ]);
        if options.key_in_env {
            // With the server's secrets beside it, as on a machine set up to run both.
            command.env("TETHER_KEY", key).envs(SERVER_SECRETS);
        } else {
            command.args(["--key", key]);
        }
        if let Some(log_dir) = &options.log_dir {
            command.arg("--log-dir").arg(log_dir);
        }
        command
            .args(["--", "sh", "-c", &options.script, "sh"])
            .env("STAMPS", stamps);
        WorkerChild::spawn(name, dir, command)
    }

    fn signal(&self, signal: Signal) {
        kill(self.pid(), signal).expect("signal the worker");
    }

    async fn wait_for_log(&self, needle: &str) {
        let deadline = Instant::now() + PATIENCE;
        while !self.log().contains(needle) {
            assert!(
                Instant::now() < deadline,
                "worker {} never logged {needle:?}:\n{}",
                self.name,
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn wait_exit(&mut self) -> ExitStatus {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "worker {} did not exit:\n{}",
                self.name,
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGTERM, and the exit status.
    async fn shut_down(&mut self) -> ExitStatus {
        self.signal(Signal::SIGTERM);
        self.wait_exit().await
    }

    /// [`Self::shut_down`], which must end in a successful exit.
    async fn shut_down_cleanly(&mut self) {
        let status = self.shut_down().await;
        assert!(status.success(), "{status:?}");
    }
}

/// Runs `tether worker` to its end with `args` (and `PROGRAM` after `--`); returns its status and stderr.
async fn run_worker_to_end(args: &[&str], program: &[&str]) -> (ExitStatus, String) {
    let dir = tempfile::tempdir().expect("temp dir");
    let log = dir.path().join("stderr");
    let mut child = Command::new(env!("CARGO_BIN_EXE_tether"))
        .arg("worker")
        .args(args)
        .arg("--")
        .args(program)
        .env_remove("TETHER_KEY")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(File::create(&log).expect("log"))
        .spawn()
        .expect("spawn tether worker");
    let deadline = Instant::now() + PATIENCE;
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!(
                "tether worker {args:?} did not exit: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    (status, std::fs::read_to_string(&log).unwrap_or_default())
}

// ---- stamps and processes --------------------------------------------------------------------------------

/// One line a script stamped: what (`start`, `end`, `term`), which worker, which process.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Stamp {
    what: String,
    worker: String,
    pid: i32,
}

fn stamps(dir: &Path, work: &str) -> Vec<Stamp> {
    std::fs::read_to_string(dir.join(work))
        .unwrap_or_default()
        .lines()
        .map(|line| {
            let mut parts = line.split_whitespace();
            let mut next = || parts.next().unwrap_or_default().to_owned();
            Stamp {
                what: next(),
                worker: next(),
                pid: next().parse().unwrap_or(0),
            }
        })
        .collect()
}

fn stamp(what: &str, worker: &str, pid: i32) -> Stamp {
    Stamp {
        what: what.into(),
        worker: worker.into(),
        pid,
    }
}

/// Waits for the `n`th start stamp of `work`; returns it.
async fn started(dir: &Path, work: &str, n: usize) -> Stamp {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let starts: Vec<Stamp> = stamps(dir, work)
            .into_iter()
            .filter(|s| s.what == "start")
            .collect();
        if starts.len() >= n {
            return starts[n - 1].clone();
        }
        assert!(
            Instant::now() < deadline,
            "{work} was never started {n} time(s)"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The history of an item claimed once and served to its end by the worker that claimed it.
const SERVED_ONCE: [&str; 5] = [
    "enqueued",
    "delivered",
    "acked",
    "first_heartbeat",
    "force_stopped",
];

/// A history without `first_heartbeat`: a program that ends at once may be done, and its item stopped,
/// before the first heartbeat (sent concurrently with the start) lands.
fn without_first_heartbeat(causes: Vec<String>) -> Vec<String> {
    causes
        .into_iter()
        .filter(|c| c != "first_heartbeat")
        .collect()
}

fn release(dir: &Path, work: &str) {
    File::create(dir.join(format!("{work}.release"))).expect("release file");
}

/// Whether a process runs (a zombie does not: nothing may reap orphans inside a container).
fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => false,
        Ok(stat) => {
            let state = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next());
            !matches!(state, Some("Z" | "X") | None)
        }
    }
}

async fn wait_dead(pid: i32) {
    let deadline = Instant::now() + PATIENCE;
    while alive(pid) {
        assert!(Instant::now() < deadline, "process {pid} is still running");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Secrets of `tether serve` that a worker started from the same shell or unit may have.
const SERVER_SECRETS: [(&str, &str); 3] = [
    ("TETHER_ADMIN_TOKEN", "tth_adm_not-for-programs-0123456789"),
    ("TETHER_DATABASE_URL", "postgres://tether:secret@db/tether"),
    ("TETHER_METRICS_TOKEN", "not-for-programs"),
];

// ---- the tests ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn serves_a_session_end_to_end() {
    let setup = Setup::new().await;
    let script = format!(
        r#"{PRELUDE}env | grep '^TETHER_' | sort > "$f.env"
cat > "$f.stdin"
echo "hello from the program"
echo "complaint on stderr" >&2
echo "end $TETHER_WORKER_ID $$" >> "$f"
"#
    );
    let mut worker = setup.worker(
        "w1",
        WorkerOptions {
            key_in_env: true,
            ..WorkerOptions::running(&script)
        },
    );
    let work = setup.session(json!({"job": "daily-report"})).await;
    let item = setup.wait_for_state(&work, "stopped").await;
    let dir = setup.stamps();
    let s = stamps(&dir, &work);
    assert_eq!(s.len(), 2, "{s:?}");
    assert_eq!(s[0], stamp("start", "w1", s[0].pid));
    assert_eq!(s[1], stamp("end", "w1", s[0].pid));

    // The program's environment: the item's identifiers and its session token, never the worker's key.
    let env: BTreeMap<String, String> = std::fs::read_to_string(dir.join(format!("{work}.env")))
        .expect("env file")
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    assert_eq!(
        env["TETHER_API_URL"],
        format!("{}/api/v1/cloud", setup.server.base)
    );
    assert_eq!(env["TETHER_WORK_ID"], work);
    assert_eq!(env["TETHER_ENVIRONMENT_ID"], setup.env);
    assert_eq!(
        env["TETHER_SESSION_ID"],
        item["data"]["id"].as_str().unwrap()
    );
    assert_eq!(env["TETHER_WORKER_ID"], "w1");
    assert!(
        env["TETHER_SESSION_TOKEN"].starts_with("tth_ses_"),
        "{env:?}"
    );
    assert!(!env.contains_key("TETHER_KEY"), "the key leaked: {env:?}");
    for (name, _) in SERVER_SECRETS {
        assert!(!env.contains_key(name), "{name} leaked: {env:?}");
    }
    // The work item on stdin.
    let stdin: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join(format!("{work}.stdin"))).expect("stdin file"),
    )
    .expect("the work item as JSON");
    assert_eq!(stdin["id"], work.as_str());
    assert_eq!(stdin["data"]["type"], "session");
    assert_eq!(stdin["metadata"]["job"], "daily-report");

    // Exit status recorded, then the item stopped by the worker.
    assert_eq!(item["metadata"]["tether.exit_code"], "0", "{item}");
    assert_eq!(item["metadata"]["tether.worker_id"], "w1", "{item}");
    assert_eq!(item["metadata"]["job"], "daily-report");
    assert_eq!(
        without_first_heartbeat(setup.causes(&work).await),
        ["enqueued", "delivered", "acked", "force_stopped"]
    );
    assert!(
        setup.claimed_in_one_request(&work).await,
        "{:?}",
        setup.history(&work).await
    );
    // The stop went with a claim, which found nothing more to take.
    assert!(
        setup.stopped_with_a_claim(&work).await,
        "{:?}",
        setup.history(&work).await
    );
    // Output reaches the worker's log, line by line, prefixed with the work id.
    worker
        .wait_for_log(&format!("[{work}] hello from the program"))
        .await;
    worker
        .wait_for_log(&format!("[{work}] complaint on stderr"))
        .await;

    let status = worker.shut_down().await;
    assert!(status.success(), "{status:?}\n{}", worker.log());
}

/// Input that comes while PROGRAM is ending, having ended its last turn, would make the item's end
/// a failed turn that nothing read: the worker runs PROGRAM again for it instead, on the same item,
/// and ends the item once the turn is ended.
#[tokio::test]
async fn input_that_comes_as_the_program_ends_is_served_by_running_it_again() {
    let setup = Setup::new().await;
    // Each run waits for a release of its own (`$f.release1`, `$f.release2`, …).
    let script = format!(
        r#"{PRELUDE}echo "$TETHER_SESSION_TOKEN" > "$f.token"
n=$(grep -c '^start' "$f")
while [ ! -e "$f.release$n" ]; do sleep 0.1; done
echo "end $TETHER_WORKER_ID $$" >> "$f"
"#
    );
    let mut worker = setup.worker("w1", WorkerOptions::running(&script));
    let work = setup.session(json!({})).await;
    started(&setup.stamps(), &work, 1).await;
    let session = setup.item(&work).await["data"]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let events = format!("/sessions/{session}/events");
    let text =
        |kind: &str, text: &str| json!({"type": kind, "content": [{"type": "text", "text": text}]});
    // The run has done what it does (nothing, here) and is ending as the message comes.
    setup
        .api
        .ok(
            Method::POST,
            &events,
            json!({"events": [text("user.message", "one more")]}),
        )
        .await;
    let release = |n: usize| {
        std::fs::write(setup.stamps().join(format!("{work}.release{n}")), "").unwrap();
    };
    release(1);
    started(&setup.stamps(), &work, 2).await;
    worker
        .wait_for_log("input came while PROGRAM was ending: running it again for the open turn")
        .await;
    // The second run answers and ends the turn, as its session token.
    let token = std::fs::read_to_string(setup.stamps().join(format!("{work}.token"))).unwrap();
    let as_program = support::api::Api {
        token: token.trim().to_owned(),
        ..setup.api.clone()
    };
    let end_turn = json!({"type": "session.status_idle", "stop_reason": {"type": "end_turn"}});
    as_program
        .ok(
            Method::POST,
            &events,
            json!({"events": [text("agent.message", "done"), end_turn]}),
        )
        .await;
    release(2);
    let item = setup.wait_for_state(&work, "stopped").await;
    assert_eq!(item["metadata"]["tether.exit_code"], "0", "{item}");
    let session_now = setup.api.get(&format!("/sessions/{session}")).await;
    assert_eq!(session_now["status"], "idle", "{session_now}");
    let log = setup.api.get(&format!("{events}?limit=100")).await;
    let kinds: Vec<&str> = log["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["type"].as_str().unwrap())
        .collect();
    assert!(!kinds.contains(&"session.error"), "{kinds:?}");
    assert_eq!(kinds.last(), Some(&"session.status_idle"), "{kinds:?}");
    assert_eq!(
        stamps(&setup.stamps(), &work).len(),
        4,
        "two runs, each started and ended"
    );
    let status = worker.shut_down().await;
    assert!(status.success(), "{status:?}\n{}", worker.log());
}

/// A server without claims (another platform, an older Tether) answers 404 to the first claim; the
/// worker polls, acks and heartbeats from then on, as §8 says.
#[tokio::test]
async fn a_server_without_claims_is_served_by_polls() {
    let setup = Setup::new().await;
    let (proxy, mut worker) = setup.worker_behind(Meddling::NoClaims).await;
    worker.wait_for_log("the server takes no claims").await;
    let mut served = Vec::new();
    for _ in 0..2 {
        let work = setup.session(json!({})).await;
        setup.wait_for_state(&work, "stopped").await;
        served.push(work);
    }
    for work in &served {
        assert_eq!(
            without_first_heartbeat(setup.causes(work).await),
            ["enqueued", "delivered", "acked", "force_stopped"]
        );
        assert!(!setup.claimed_in_one_request(work).await);
    }
    assert_eq!(proxy.seen("claim"), 1, "asked once, then never again");
    assert!(proxy.seen("ack") >= 2, "each item acknowledged");
    assert!(
        proxy.seen("heartbeat") >= 2,
        "each lease begun by a heartbeat of its own"
    );
    let status = worker.shut_down().await;
    assert!(status.success(), "{status:?}\n{}", worker.log());
}

#[tokio::test]
async fn a_claim_whose_answer_is_lost_is_answered_again() {
    let setup = Setup::new().await;
    let (proxy, mut worker) = setup.worker_behind(Meddling::LoseFirstTakenClaim).await;
    let work = setup.session(json!({})).await;
    setup.wait_for_state(&work, "stopped").await;
    // The claim was taken once and served by the worker that took it: no lease ran out, no
    // second delivery, though its first answer never arrived.
    assert_eq!(setup.causes(&work).await, SERVED_ONCE);
    assert!(setup.claimed_in_one_request(&work).await);
    assert!(proxy.seen("claim") >= 2, "the claim was sent again");
    assert!(
        proxy.seen("claim retry=true") >= 1,
        "sent again as a try of the same claim"
    );
    assert!(
        worker.log().contains("poll failed; retrying"),
        "the lost answer was seen as one:\n{}",
        worker.log()
    );
    worker
        .wait_for_log("polls succeed again, after 1 failed")
        .await;
    let status = worker.shut_down().await;
    assert!(status.success(), "{status:?}\n{}", worker.log());
}

/// A finished item's stop goes with the claim of the next; that answer lost, the worker sends the
/// same claim again, whose stop is found done and whose answer is the item the first try took:
/// each item served once, no lease run out.
#[tokio::test]
async fn a_claim_sent_with_a_stop_whose_answer_is_lost_is_answered_again() {
    let setup = Setup::new().await;
    // Both queued before the worker starts: the first item's stop takes the second.
    let first = setup.session(json!({})).await;
    let second = setup.session(json!({})).await;
    let (proxy, mut worker) = setup
        .worker_behind(Meddling::LoseFirstTakenChainedClaim)
        .await;
    setup.wait_for_state(&second, "stopped").await;
    for work in [&first, &second] {
        assert_eq!(setup.causes(work).await, SERVED_ONCE, "{}", worker.log());
        assert!(setup.stopped_with_a_claim(work).await, "{}", worker.log());
    }
    assert_eq!(stamps(&setup.stamps(), &second).len(), 2, "run once");
    // The first item's stop and its try sent again, then the second's (which found nothing).
    assert!(proxy.seen("claim stop") >= 3, "{}", worker.log());
    assert!(proxy.seen("claim retry=true") >= 1, "{}", worker.log());
    assert!(
        worker
            .log()
            .contains("stopping the item failed; trying again while the lease lasts"),
        "the lost answer was seen as one:\n{}",
        worker.log()
    );
    worker.wait_for_log("stopping the item got through").await;
    let status = worker.shut_down().await;
    assert!(status.success(), "{status:?}\n{}", worker.log());
}

/// A server that does not know a claim's stop (an older Tether, one of several sharing a database
/// during an upgrade) claims and leaves the item: its answer does not say the stop was made, and
/// the worker stops the item on its own, each item still served once.
#[tokio::test]
async fn an_item_whose_stop_a_claim_carried_in_vain_is_stopped_on_its_own() {
    stopped_on_its_own_behind(Meddling::DropClaimBodies).await;
}

/// A claim that carries a stop refused for a reason of the claim's own (a 400 that is not the
/// stop's): the worker stops the item on its own, and each item is served once.
#[tokio::test]
async fn an_item_whose_claim_was_refused_for_its_own_reason_is_stopped_on_its_own() {
    stopped_on_its_own_behind(Meddling::RefuseClaimsWithStops).await;
}

async fn stopped_on_its_own_behind(meddling: Meddling) {
    let setup = Setup::new().await;
    let first = setup.session(json!({})).await;
    let second = setup.session(json!({})).await;
    let (proxy, mut worker) = setup.worker_behind(meddling).await;
    setup.wait_for_state(&second, "stopped").await;
    setup.wait_for_state(&first, "stopped").await;
    for work in [&first, &second] {
        assert_eq!(setup.causes(work).await, SERVED_ONCE, "{}", worker.log());
        assert!(!setup.stopped_with_a_claim(work).await, "{}", worker.log());
        assert_eq!(stamps(&setup.stamps(), work).len(), 2, "run once");
    }
    // One try, then the stops go on their own for a while.
    assert_eq!(proxy.seen("claim stop"), 1, "{}", worker.log());
    assert!(proxy.seen("stop") >= 2, "{}", worker.log());
    worker
        .wait_for_log("the server did not make the stop sent with a claim")
        .await;
    let status = worker.shut_down().await;
    assert!(status.success(), "{status:?}\n{}", worker.log());
}

/// A claim whose answer is lost as the worker begins to drain: the worker asks once more for
/// what it may have taken, taking no new work, and serves that item before it exits, rather than
/// leave it leased to nobody until its lease runs out. (The proxy answers 503 to every try sent
/// again with `retry=true`, so that the drain finds the claim still unheard.)
#[tokio::test]
async fn a_claim_whose_answer_is_lost_as_the_drain_begins_is_served() {
    let setup = Setup::new().await;
    let meddling = Meddling::LoseFirstTakenClaimUntilDrain;
    let (proxy, mut worker) = setup.worker_behind(meddling).await;
    let work = setup.session(json!({})).await;
    let deadline = Instant::now() + PATIENCE;
    while proxy.seen("claim retry=true") == 0 {
        assert!(
            Instant::now() < deadline,
            "never sent again:\n{}",
            worker.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        setup.item(&work).await["state"],
        "active",
        "leased, unheard"
    );
    let other = setup.session(json!({})).await;
    let status = worker.shut_down().await;
    assert!(status.success(), "{status:?}\n{}", worker.log());
    assert!(proxy.seen("claim retry=only") >= 1, "{}", worker.log());
    // Served by the worker that took it before it exited: no lease ran out, no second delivery.
    assert_eq!(setup.causes(&work).await, SERVED_ONCE, "{}", worker.log());
    // Nothing more was taken as it drained.
    assert_eq!(setup.causes(&other).await, ["enqueued"]);
}

#[tokio::test]
async fn failures_are_recorded_and_the_items_stopped() {
    let setup = Setup::new().await;
    let logs = setup.dir.path().join("item-logs");
    let script = r#"input=$(cat)
echo "about to fail"
case "$input" in
  *'"mode":"kill"'*) kill -KILL $$ ;;
  *'"mode":"term"'*) kill -TERM $$ ;;
esac
exit 3
"#;
    let mut worker = setup.worker(
        "w1",
        WorkerOptions {
            log_dir: Some(logs.clone()),
            ..WorkerOptions::running(script)
        },
    );
    let failing = setup.session(json!({})).await;
    let killed = setup.session(json!({"mode": "kill"})).await;
    // A signal the guard itself catches (SIGTERM) must still read as the program's end.
    let terminated = setup.session(json!({"mode": "term"})).await;
    let item = setup.wait_for_state(&failing, "stopped").await;
    assert_eq!(item["metadata"]["tether.exit_code"], "3", "{item}");
    assert!(item["metadata"].get("tether.signal").is_none(), "{item}");
    let item = setup.wait_for_state(&killed, "stopped").await;
    assert_eq!(item["metadata"]["tether.exit_code"], "137", "{item}");
    assert_eq!(item["metadata"]["tether.signal"], "SIGKILL", "{item}");
    let item = setup.wait_for_state(&terminated, "stopped").await;
    assert_eq!(item["metadata"]["tether.exit_code"], "143", "{item}");
    assert_eq!(item["metadata"]["tether.signal"], "SIGTERM", "{item}");
    for work in [&failing, &killed, &terminated] {
        assert_eq!(
            setup.causes(work).await.last().map(String::as_str),
            Some("force_stopped")
        );
        // With --log-dir the output goes to a file per item, not to the worker's log.
        let text = std::fs::read_to_string(logs.join(format!("{work}.log"))).expect("item log");
        assert!(text.contains("about to fail"), "{text}");
    }
    assert!(
        !worker.log().contains("] about to fail"),
        "{}",
        worker.log()
    );
    worker.shut_down_cleanly().await;
    assert!(
        worker.log().contains("0 done, 3 failed"),
        "{}",
        worker.log()
    );
}

#[tokio::test]
async fn refuses_to_start_when_it_cannot_work() {
    let setup = Setup::new().await;
    let work = setup.session(json!({})).await;
    let server = setup.server.base.as_str();
    let env = setup.env.as_str();
    let key = setup.key.as_str();
    let base = ["--server", server, "--environment", env];

    // PROGRAM is checked before anything is claimed.
    let not_executable = setup.dir.path().join("plain-file");
    std::fs::write(&not_executable, "#!/bin/sh\n").unwrap();
    for (program, says) in [
        ("/nonexistent/agent", "no such file"),
        (
            "no-such-program-in-path",
            "no executable of that name in PATH",
        ),
        (not_executable.to_str().unwrap(), "not executable"),
    ] {
        let args = [&base[..], &["--key", key]].concat();
        let (status, stderr) = run_worker_to_end(&args, &[program]).await;
        assert_eq!(status.code(), Some(78), "{program}: {stderr}");
        assert!(
            stderr.contains("cannot run PROGRAM") && stderr.contains(says),
            "{program}: {stderr}"
        );
    }
    // So are its flags, whether the command line cannot be read or its flags do not go together.
    for (flags, says) in [
        (&["--concurrency", "0"][..], "--concurrency"),
        (&["--grace", "banana"][..], "--grace"),
        (&["--keep-workdir"][..], "needs --workdir"),
        (&["--no-such-flag"][..], "--no-such-flag"),
    ] {
        let args = [&base[..], &["--key", key], flags].concat();
        let (status, stderr) = run_worker_to_end(&args, &["true"]).await;
        assert_eq!(status.code(), Some(78), "{flags:?}: {stderr}");
        assert!(stderr.contains(says), "{flags:?}: {stderr}");
    }
    let item = setup.item(&work).await;
    assert_eq!(item["state"], "queued");
    assert_eq!(item["delivery_count"], 0, "nothing was claimed: {item}");

    // Refusals that another try cannot fix end the worker with what to fix.
    let other_env = setup.api.self_hosted_environment("other").await;
    let other_key = setup.api.key(&other_env).await;
    let cloud_env = setup
        .api
        .ok(
            Method::POST,
            "/environments",
            json!({"name": "cloud", "config": {"type": "cloud", "networking": {"type": "unrestricted"}}}),
        )
        .await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let cloud_key = setup.api.key(&cloud_env).await;
    let unknown_env = "env_0000000000000000000000000000abcd";
    let admin = setup.server.token.as_str();
    let deleted_env = setup.api.self_hosted_environment("deleted").await;
    let deleted_key = setup.api.key(&deleted_env).await;
    setup
        .api
        .ok(
            Method::DELETE,
            &format!("/environments/{deleted_env}"),
            json!({}),
        )
        .await;
    let deleted_says = format!("environment {deleted_env} deleted with its keys");
    for (environment, key, says) in [
        (env, "tth_env_not-a-real-key", "refused the key"),
        (
            deleted_env.as_str(),
            deleted_key.as_str(),
            deleted_says.as_str(),
        ),
        (
            env,
            other_key.as_str(),
            "may not take work from environment",
        ),
        (unknown_env, admin, "does not exist"),
        (
            cloud_env.as_str(),
            cloud_key.as_str(),
            "will not hand out work",
        ),
    ] {
        let args = [
            "--server",
            server,
            "--environment",
            environment,
            "--key",
            key,
        ];
        let (status, stderr) = run_worker_to_end(&args, &["true"]).await;
        // EX_CONFIG: a service manager should not start it again to be refused again.
        assert_eq!(status.code(), Some(78), "{says}: {stderr}");
        assert!(stderr.contains(says), "{says}: {stderr}");
    }
}

#[tokio::test]
async fn a_graceful_stop_sends_sigterm_then_confirms() {
    let setup = Setup::new().await;
    let script = format!("{TRAP_TERM}{PRELUDE}{UNTIL_RELEASED}");
    let mut worker = setup.worker("w1", WorkerOptions::running(&script));
    let (work, start) = setup.session_started_and_active().await;
    let dir = setup.stamps();
    assert_eq!(setup.stop(&work, false).await["state"], "stopping");
    let item = setup.wait_for_state(&work, "stopped").await;
    assert_eq!(
        stamps(&dir, &work),
        [start.clone(), stamp("term", "w1", start.pid)]
    );
    assert_eq!(item["metadata"]["tether.exit_code"], "0", "{item}");
    assert_eq!(
        setup.causes(&work).await,
        [
            "enqueued",
            "delivered",
            "acked",
            "first_heartbeat",
            "stop_requested",
            "stop_confirmed"
        ]
    );
    worker.shut_down_cleanly().await;
}

#[tokio::test]
async fn a_force_stop_kills_the_program() {
    let setup = Setup::new().await;
    let script = format!("{TRAP_TERM}{PRELUDE}{UNTIL_RELEASED}");
    let mut worker = setup.worker("w1", WorkerOptions::running(&script));
    let (work, start) = setup.session_started_and_active().await;
    let dir = setup.stamps();
    setup.stop(&work, true).await;
    // The next heartbeat finds the item gone (its token died with it): SIGKILL, no SIGTERM.
    wait_dead(start.pid).await;
    worker.wait_for_log("lease lost").await;
    assert_eq!(stamps(&dir, &work), [start]);
    let item = setup.item(&work).await;
    assert!(
        item["metadata"].get("tether.exit_code").is_none(),
        "a worker that lost the item leaves it alone: {item}"
    );
    assert_eq!(setup.causes(&work).await, SERVED_ONCE);
    worker.shut_down_cleanly().await;
}

/// A program that ends because its session was deleted (as the shell agent does when its event
/// stream ends), before the worker's next heartbeat: the worker says the item had ended, without
/// announcing tries it will not make.
#[tokio::test]
async fn a_program_ending_with_its_deleted_session_is_told_quietly() {
    let setup = Setup::new().await;
    let script = format!("{TRAP_TERM}{PRELUDE}{UNTIL_RELEASED}");
    // Heartbeats every 10 s: the first has just been made once the item is active.
    let options = WorkerOptions {
        ttl: "20",
        ..WorkerOptions::running(&script)
    };
    let mut worker = setup.worker("w1", options);
    let (work, start) = setup.session_started_and_active().await;
    let session = setup.item(&work).await["data"]["id"]
        .as_str()
        .expect("session id")
        .to_owned();
    setup
        .api
        .ok(Method::DELETE, &format!("/sessions/{session}"), json!({}))
        .await;
    release(&setup.stamps(), &work);
    wait_dead(start.pid).await;
    worker
        .wait_for_log("item already ended; its outcome is not recorded")
        .await;
    let log = worker.log();
    assert!(!log.contains("trying again"), "{log}");
    assert!(!log.contains("could not"), "{log}");
    // The token's refusal is put down to the stop, not left to read as a credential to mend.
    assert!(log.contains("session token no longer holds"), "{log}");
    worker.shut_down_cleanly().await;
}

#[tokio::test]
async fn the_item_of_a_killed_worker_is_served_by_another() {
    let setup = Setup::new().await;
    // The program starts a process of its own (a tool, a build), and notes its pid.
    let script = format!(
        "{PRELUDE}sleep 600 &\necho $! > \"$f.child.tmp\"; mv \"$f.child.tmp\" \"$f.child\"\n{UNTIL_RELEASED}"
    );
    let mut first = setup.worker("w1", WorkerOptions::running(&script));
    let (work, start) = setup.session_started_and_active().await;
    let dir = setup.stamps();
    let child = dir.join(format!("{work}.child"));
    let deadline = Instant::now() + PATIENCE;
    while !child.exists() {
        assert!(
            Instant::now() < deadline,
            "the program never started its child"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let child: i32 = std::fs::read_to_string(&child)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(alive(child));

    first.signal(Signal::SIGKILL);
    first.wait_exit().await;
    // Neither the program nor anything it started outlives its worker.
    wait_dead(start.pid).await;
    wait_dead(child).await;
    let item = setup.wait_for_state(&work, "queued").await;
    assert_eq!(item["requeue_count"], 1, "{item}");

    release(&dir, &work);
    let mut second = setup.worker("w2", WorkerOptions::running(&script));
    let item = setup.wait_for_state(&work, "stopped").await;
    let second_start = started(&dir, &work, 2).await;
    assert_eq!(
        stamps(&dir, &work),
        [
            start,
            second_start.clone(),
            stamp("end", "w2", second_start.pid)
        ],
        "the first program never ran again"
    );
    assert_eq!(item["metadata"]["tether.worker_id"], "w2", "{item}");
    assert_eq!(item["metadata"]["tether.exit_code"], "0", "{item}");
    let causes = setup.causes(&work).await;
    assert_eq!(
        causes[..5],
        [
            "enqueued",
            "delivered",
            "acked",
            "first_heartbeat",
            "lease_expired_requeued"
        ],
        "{causes:?}"
    );
    assert_eq!(
        without_first_heartbeat(causes[5..].to_vec()),
        ["delivered", "acked", "force_stopped"]
    );
    second.shut_down_cleanly().await;
}

#[tokio::test]
async fn a_worker_cut_off_from_the_server_abandons_its_item() {
    let setup = Setup::new().await;
    let proxy = Proxy::start(&setup.server.base).await;
    let script = format!("{TRAP_TERM}{PRELUDE}{UNTIL_RELEASED}");
    let mut cut_off = setup.worker("w1", WorkerOptions::running(&script).via(&proxy.url));
    let (work, start) = setup.session_started_and_active().await;
    let dir = setup.stamps();

    // No heartbeat gets through for longer than the lease: the worker kills its program, the server
    // puts the item back in the queue.
    proxy.set(Mode::Drop);
    wait_dead(start.pid).await;
    cut_off.wait_for_log("lease lost").await;
    let item = setup.wait_for_state(&work, "queued").await;
    assert_eq!(item["requeue_count"], 1, "{item}");
    assert_eq!(stamps(&dir, &work), [start], "SIGKILL, not SIGTERM");

    release(&dir, &work);
    let mut other = setup.worker("w2", WorkerOptions::running(&script));
    let item = setup.wait_for_state(&work, "stopped").await;
    assert_eq!(item["metadata"]["tether.worker_id"], "w2", "{item}");

    // Back on the network, the first worker leaves the item alone and keeps working.
    proxy.set(Mode::Forward);
    let next = setup.session(json!({})).await;
    release(&dir, &next);
    setup.wait_for_state(&next, "stopped").await;
    // A long poll of the first worker that was under way when the line went dead may still have been
    // handed the item before the second worker got it; what matters is who stopped it, and how often.
    let causes = setup.causes(&work).await;
    assert_eq!(
        causes[..5],
        [
            "enqueued",
            "delivered",
            "acked",
            "first_heartbeat",
            "lease_expired_requeued"
        ],
        "{causes:?}"
    );
    let stops: Vec<&String> = causes.iter().filter(|c| c.contains("stop")).collect();
    assert_eq!(stops, ["force_stopped"], "{causes:?}");
    assert_eq!(causes.last().map(String::as_str), Some("force_stopped"));
    assert_eq!(
        setup.item(&work).await["metadata"]["tether.worker_id"],
        "w2"
    );
    for worker in [&mut cut_off, &mut other] {
        let status = worker.shut_down().await;
        assert!(status.success(), "{status:?}\n{}", worker.log());
    }
}

/// A server the worker cannot reach for a while, shorter than the lease: the worker says so as its
/// heartbeats fail and when they get through again, and likewise for the calls that end the item
/// its program finished meanwhile. Before, only failed polls were logged, and an item ended seconds
/// late without a word.
#[tokio::test]
async fn a_server_away_for_a_while_shows_in_the_workers_log() {
    let setup = Setup::new().await;
    let proxy = Proxy::start(&setup.server.base).await;
    let script = format!("{PRELUDE}{UNTIL_RELEASED}");
    let mut worker = setup.worker(
        "w1",
        WorkerOptions {
            // Beats every 5 s, retried every 1.25 s: each time away lasts a failed beat or call and
            // a retry, well within the lease.
            ttl: "10",
            ..WorkerOptions::running(&script).via(&proxy.url)
        },
    );
    let (work, start) = setup.session_started_and_active().await;
    proxy.set(Mode::Refuse);
    worker.wait_for_log("heartbeat failed; trying again").await;
    proxy.set(Mode::Forward);
    worker.wait_for_log("heartbeats get through again").await;

    proxy.set(Mode::Refuse);
    release(&setup.stamps(), &work);
    worker
        .wait_for_log("recording the outcome in the item's metadata failed; trying again")
        .await;
    proxy.set(Mode::Forward);
    let item = setup.wait_for_state(&work, "stopped").await;
    assert_eq!(item["requeue_count"], 0, "the lease held: {item}");
    worker
        .wait_for_log("recording the outcome in the item's metadata got through")
        .await;
    assert_eq!(
        stamps(&setup.stamps(), &work).len(),
        2,
        "one run: {start:?}"
    );
    worker.shut_down_cleanly().await;
}

#[tokio::test]
async fn two_workers_serve_two_hundred_sessions_exactly_once() {
    const SESSIONS: usize = 200;
    let setup = Setup::new().await;
    let script = format!(
        r#"{PRELUDE}sleep 0.05
echo "end $TETHER_WORKER_ID $$" >> "$f"
"#
    );
    let options = WorkerOptions {
        concurrency: "4",
        ttl: "10",
        ..WorkerOptions::running(&script)
    };
    let mut workers = [
        setup.worker("w1", options.clone()),
        setup.worker("w2", options),
    ];
    let mut created = Vec::new();
    for chunk in (0..SESSIONS).collect::<Vec<_>>().chunks(10) {
        let batch = chunk.iter().map(|_| {
            setup.api.ok(
                Method::POST,
                "/sessions",
                json!({"agent": setup.agent, "environment_id": setup.env}),
            )
        });
        created.extend(futures::future::join_all(batch).await);
    }
    assert_eq!(created.len(), SESSIONS);

    let deadline = Instant::now() + PATIENCE;
    let items = loop {
        let items = setup.work_items().await;
        if items.len() == SESSIONS && items.iter().all(|i| i["state"] == "stopped") {
            break items;
        }
        assert!(
            Instant::now() < deadline,
            "not every item was served: {} of {} stopped",
            items.iter().filter(|i| i["state"] == "stopped").count(),
            items.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let dir = setup.stamps();
    let mut served_by: BTreeMap<String, usize> = BTreeMap::new();
    for item in &items {
        let work = item["id"].as_str().unwrap();
        let s = stamps(&dir, work);
        // Served once, and the one run started and ended before anything else touched the item.
        assert_eq!(s.len(), 2, "{work}: {s:?}");
        assert_eq!(s[0].what, "start", "{work}: {s:?}");
        assert_eq!(s[1], stamp("end", &s[0].worker, s[0].pid), "{work}: {s:?}");
        assert_eq!(item["metadata"]["tether.exit_code"], "0", "{item}");
        assert_eq!(item["metadata"]["tether.worker_id"], s[0].worker.as_str());
        assert_eq!(item["requeue_count"], 0, "{item}");
        // Each stop went with the claim of the next item (or of none, once the queue was empty).
        assert!(setup.stopped_with_a_claim(work).await, "{item}");
        *served_by.entry(s[0].worker.clone()).or_default() += 1;
    }
    eprintln!("items served per worker: {served_by:?}");
    for worker in &mut workers {
        let status = worker.shut_down().await;
        assert!(status.success(), "{status:?}\n{}", worker.log());
    }
}

#[tokio::test]
async fn shutting_down_drains_then_terminates_and_leaves_nothing_live() {
    let setup = Setup::new().await;
    let script = format!(
        r#"{PRELUDE}input=$(cat)
case "$input" in
  *'"mode":"stubborn"'*) trap '' TERM ;;
  *) trap 'echo "term $TETHER_WORKER_ID $$" >> "$f"; exit 0' TERM ;;
esac
{UNTIL_RELEASED}"#
    );
    let mut worker = setup.worker(
        "w1",
        WorkerOptions {
            concurrency: "3",
            drain_timeout: "3",
            ..WorkerOptions::running(&script)
        },
    );
    let stubborn = setup.session(json!({"mode": "stubborn"})).await;
    let polite = setup.session(json!({})).await;
    let finishing = setup.session(json!({})).await;
    let dir = setup.stamps();
    let mut starts = BTreeMap::new();
    for work in [&stubborn, &polite, &finishing] {
        starts.insert(work.clone(), started(&dir, work, 1).await);
        setup.wait_for_state(work, "active").await;
    }

    worker.signal(Signal::SIGTERM);
    worker.wait_for_log("taking no new work").await;
    // One program finishes by itself within the drain timeout; the others are still at it when it ends.
    release(&dir, &finishing);
    let status = worker.wait_exit().await;
    assert!(status.success(), "{status:?}\n{}", worker.log());

    for item in setup.work_items().await {
        assert_eq!(item["state"], "stopped", "left live: {item}");
    }
    let finished = setup.item(&finishing).await;
    assert_eq!(finished["metadata"]["tether.exit_code"], "0");
    let f = &starts[&finishing];
    assert_eq!(
        stamps(&dir, &finishing),
        [f.clone(), stamp("end", "w1", f.pid)]
    );
    let p = &starts[&polite];
    assert_eq!(
        stamps(&dir, &polite),
        [p.clone(), stamp("term", "w1", p.pid)]
    );
    assert_eq!(
        setup.item(&polite).await["metadata"]["tether.exit_code"],
        "0"
    );
    let s = setup.item(&stubborn).await;
    assert_eq!(s["metadata"]["tether.signal"], "SIGKILL", "{s}");
    assert_eq!(stamps(&dir, &stubborn), [starts[&stubborn].clone()]);
    for work in [&polite, &stubborn] {
        let causes = setup.causes(work).await;
        assert_eq!(
            &causes[causes.len() - 2..],
            ["stop_requested", "stop_confirmed"],
            "{work}"
        );
        assert!(!alive(starts[work].pid));
    }
}

/// A claim that took an item just as the drain began is answered after it began: the item is served
/// (its program runs, and the drain waits for it), not left leased to a worker that has gone until
/// its lease runs out.
#[tokio::test]
async fn an_item_claimed_as_the_drain_begins_is_served() {
    let setup = Setup::new().await;
    let proxy = Proxy::start(&setup.server.base).await;
    let script = format!("{PRELUDE}{ENDS_AT_ONCE}");
    let mut worker = setup.worker(
        "w1",
        WorkerOptions {
            // A lease long enough for the slow answers below on a loaded machine.
            ttl: "10",
            ..WorkerOptions::running(&script).via(&proxy.url)
        },
    );
    worker.wait_for_log("worker started").await;
    // From now on every answer comes back half a second late: the claim that takes the item
    // commits on the server, and its answer is still on its way when the drain begins.
    proxy.set(Mode::Delay(Duration::from_millis(500)));
    let work = setup.session(json!({})).await;
    setup.wait_for_state(&work, "active").await;
    worker.signal(Signal::SIGTERM);
    let status = worker.wait_exit().await;
    assert!(status.success(), "{status:?}\n{}", worker.log());

    let item = setup.item(&work).await;
    assert_eq!(item["state"], "stopped", "{item}");
    assert_eq!(item["metadata"]["tether.exit_code"], "0", "{item}");
    let dir = setup.stamps();
    let s = stamps(&dir, &work);
    assert_eq!(
        s,
        [stamp("start", "w1", s[0].pid), stamp("end", "w1", s[0].pid)]
    );
    assert!(setup.claimed_in_one_request(&work).await);
    // The claim's answer came after the drain began: what this test is about.
    let log = worker.log();
    let drained = log.find("taking no new work").expect("the drain's line");
    let claimed = log
        .find(&format!("claimed work_id=\"{work}\""))
        .expect("the claim's line");
    assert!(drained < claimed, "{log}");
}

/// The parent's process id of `pid`, from `/proc/<pid>/stat`.
fn parent_of(pid: i32) -> i32 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    let (_, rest) = stat.rsplit_once(')').expect("stat format");
    rest.split_whitespace()
        .nth(1)
        .and_then(|ppid| ppid.parse().ok())
        .expect("ppid")
}

/// SIGHUP, as `kill -HUP $(pidof tether)` sends it after a certificate's renewal, or a terminal that
/// went away: the server, the worker and the guard between the worker and its program all go on, and
/// the item ends when its program does.
#[tokio::test]
async fn a_sighup_to_every_tether_process_stops_nothing() {
    let setup = Setup::new().await;
    let script = format!("{PRELUDE}{UNTIL_RELEASED}");
    let mut worker = setup.worker("w1", WorkerOptions::running(&script));
    let (work, start) = setup.session_started_and_active().await;
    let guard = parent_of(start.pid);
    assert_eq!(
        parent_of(guard),
        worker.pid().as_raw(),
        "the guard is the worker's child"
    );

    let server = nix::unistd::Pid::from_raw(setup.server.child.id() as i32);
    for pid in [server, worker.pid(), nix::unistd::Pid::from_raw(guard)] {
        kill(pid, Signal::SIGHUP).expect("SIGHUP");
    }
    worker.wait_for_log("SIGHUP ignored").await;
    // A SIGHUP that ended any of them would have ended the program, or the item, by now.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(alive(start.pid), "the program runs on");
    assert!(alive(guard), "the guard runs on");
    assert_eq!(setup.item(&work).await["state"], "active");

    release(&setup.stamps(), &work);
    setup.wait_for_state(&work, "stopped").await;
    assert_eq!(setup.item(&work).await["metadata"]["tether.exit_code"], "0");
    assert_eq!(
        stamps(&setup.stamps(), &work),
        [start.clone(), stamp("end", "w1", start.pid)]
    );
    worker.shut_down_cleanly().await;
}

/// A worker whose standard error nobody reads (a full pipe) keeps its leases and runs its programs,
/// even ones with much output: what does not fit is dropped, not waited for.
#[tokio::test]
async fn a_standard_error_nobody_reads_blocks_neither_the_worker_nor_its_programs() {
    runs_with_a_standard_error_nobody_reads(Stdio::piped(), |worker| worker.stderr.take()).await;
}

/// The same on a terminal that stops taking output (Ctrl-S, a stopped pager): there the worker draws
/// a live status line, and its drawing must not wait for the terminal either.
#[tokio::test]
async fn a_terminal_that_stops_reading_blocks_neither_the_worker_nor_its_programs() {
    let terminal = nix::pty::openpty(None, None).expect("a pseudo-terminal");
    // The terminal's other end: held, never read.
    let _screen = terminal.master;
    runs_with_a_standard_error_nobody_reads(Stdio::from(terminal.slave), |_| ()).await;
}

/// Started in the background of a shell with job control (`tether worker … &`), the worker draws no
/// status line over the terminal its shell and the foreground jobs have; its log lines still go
/// out. In the foreground of the same terminal, it draws one.
#[tokio::test]
async fn a_worker_in_the_background_of_a_shell_draws_no_status_line() {
    let setup = Setup::new().await;
    for (job, draws) in [("&", false), ("", true)] {
        let terminal = nix::pty::openpty(None, None).expect("a pseudo-terminal");
        let screen = File::from(terminal.master);
        // A new session whose controlling terminal is the pseudo-terminal, and a shell with job
        // control in it: a job started with `&` gets a process group of its own, which is not the
        // terminal's foreground group; one started without it is.
        let script = format!(
            "set -m; \"$0\" worker --server \"$1\" --environment \"$2\" --worker-id w1 \
             --key \"$3\" -- sleep 60 {job}\nwait"
        );
        // Built and dropped here: the terminal's other end must be held by the session alone, so
        // that reading this end ends once the session has gone.
        let mut shell = {
            let slave = File::from(terminal.slave);
            let mut command = Command::new("setsid");
            command
                .args(["--ctty", "sh", "-c", &script, support::BIN])
                .args([&setup.server.base, &setup.env, &setup.key])
                .stdin(slave.try_clone().unwrap())
                .stdout(slave.try_clone().unwrap())
                .stderr(slave);
            for name in support::AMBIENT {
                command.env_remove(name);
            }
            command.spawn().expect("setsid sh")
        };
        // What the terminal shows, read on a thread of its own until the terminal closes.
        let shown = std::thread::spawn(move || {
            let mut screen = screen;
            let mut shown = Vec::new();
            let mut buffer = [0u8; 4096];
            while let Ok(n) = std::io::Read::read(&mut screen, &mut buffer) {
                if n == 0 {
                    break;
                }
                shown.extend_from_slice(&buffer[..n]);
            }
            String::from_utf8_lossy(&shown).into_owned()
        });
        // The status line is redrawn every half second at least: a few seconds show it, if drawn.
        tokio::time::sleep(Duration::from_secs(3)).await;
        // The whole session goes (the shell, the worker in its job's group, the worker's program).
        let _ = Command::new("pkill")
            .args(["-KILL", "-s", &shell.id().to_string()])
            .status();
        let _ = shell.wait();
        let shown = shown.join().expect("the reader");
        assert!(shown.contains("worker started"), "{job:?}: {shown}");
        let spinner = shown
            .chars()
            .any(|c| ('\u{2800}'..='\u{28ff}').contains(&c));
        assert_eq!(spinner, draws, "{job:?}: {shown}");
    }
}

/// Runs two items whose programs write far more than `stderr` holds, then outlive a lease (4 s)
/// with it full; `hold` keeps whatever end of it the test has.
async fn runs_with_a_standard_error_nobody_reads<T>(
    stderr: Stdio,
    hold: impl FnOnce(&mut std::process::Child) -> T,
) {
    let setup = Setup::new().await;
    let script =
        format!("{PRELUDE}seq 1 40000\nsleep 6\necho \"end $TETHER_WORKER_ID $$\" >> \"$f\"\n");
    let mut command = WorkerChild::command(&setup.server.base, &setup.env, "w1");
    command
        .args(["--key", &setup.key, "--ttl", "4", "--grace", "1"])
        .args(["--", "sh", "-c", &script, "sh"])
        .env("STAMPS", setup.stamps());
    let mut worker = command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .expect("spawn tether worker");
    let _held = hold(&mut worker);
    for _ in 0..2 {
        let work = setup.session(json!({})).await;
        let item = setup.wait_for_state(&work, "stopped").await;
        assert_eq!(item["metadata"]["tether.exit_code"], "0", "{item}");
        let stamped = std::fs::read_to_string(setup.stamps().join(&work)).unwrap_or_default();
        assert_eq!(stamped.lines().count(), 2, "one run, to its end: {stamped}");
        assert!(
            worker.try_wait().expect("try_wait").is_none(),
            "the worker died"
        );
    }
    // Two signals while a program runs: a forced shutdown, whose last words ("error: forced
    // shutdown") find standard error full. The worker must end all the same.
    let work = setup.session(json!({})).await;
    setup.wait_for_state(&work, "active").await;
    // SIGTERM again and again until it ends: signals that come together may be taken as one.
    let pid = nix::unistd::Pid::from_raw(worker.id() as i32);
    let deadline = Instant::now() + PATIENCE;
    while worker.try_wait().expect("try_wait").is_none() {
        if Instant::now() > deadline {
            let _ = worker.kill();
            panic!("the worker did not end after a forced shutdown with its standard error full");
        }
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let status = worker.try_wait().expect("try_wait").expect("ended");
    assert!(
        !status.success(),
        "a forced shutdown is a failure: {status}"
    );
}

/// A server that cannot be reached is logged with the reason the operating system gave.
#[tokio::test]
async fn a_refused_connection_is_logged_with_its_cause() {
    let dir = tempfile::tempdir().expect("tempdir");
    // A port nobody listens on: bound, then closed.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let mut command = WorkerChild::command(&format!("http://127.0.0.1:{port}"), "env_1", "w1");
    command.args(["--key", "tth_env_unused", "--", "true"]);
    let worker = WorkerChild::spawn("w1", dir.path(), command);
    let deadline = Instant::now() + PATIENCE;
    while !worker.log().contains("poll failed") {
        assert!(
            Instant::now() < deadline,
            "no failed poll:\n{}",
            worker.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        worker.log().contains("Connection refused"),
        "{}",
        worker.log()
    );
}

/// `--server` naming a web server that is not Tether's (Python's `http.server` answers a POST
/// with 501 and an HTML page): the worker says so and ends, rather than trying again for ever as
/// if a claim's answer had been lost.
#[tokio::test]
async fn a_server_that_is_not_tethers_ends_the_worker_with_the_reason() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut request = [0u8; 8192];
                let _ = stream.read(&mut request).await;
                let page =
                    "<html><body><h1>Error response</h1><p>Error code: 501</p></body></html>";
                let answer = format!(
                    "HTTP/1.0 501 Unsupported method ('POST')\r\nContent-Type: text/html\r\n\
                     Content-Length: {}\r\nConnection: close\r\n\r\n{page}",
                    page.len()
                );
                let _ = stream.write_all(answer.as_bytes()).await;
            });
        }
    });
    let args = [
        "--server",
        &url,
        "--environment",
        "env_1",
        "--key",
        "tth_env_unused",
    ];
    let (status, log) = run_worker_to_end(&args, &["true"]).await;
    // 1, not 78: the answer is not Tether's (a proxy's while the server is redeployed, say), and a
    // later start may reach the server.
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(
        log.contains("it is not a Tether server") && log.contains("--server"),
        "{log}"
    );
    assert!(!log.contains("lost"), "no claim taken as lost:\n{log}");
}

#[tokio::test]
async fn a_second_signal_forces_the_shutdown() {
    let setup = Setup::new().await;
    let script = format!("{PRELUDE}trap '' TERM\n{UNTIL_RELEASED}");
    let mut worker = setup.worker(
        "w1",
        WorkerOptions {
            drain_timeout: "60",
            grace: "60",
            ..WorkerOptions::running(&script)
        },
    );
    let (work, start) = setup.session_started_and_active().await;
    worker.signal(Signal::SIGTERM);
    worker.wait_for_log("taking no new work").await;
    worker.signal(Signal::SIGINT);
    let status = worker.wait_exit().await;
    assert!(
        !status.success(),
        "a forced shutdown is a failure: {status:?}"
    );
    assert!(!alive(start.pid));
    let item = setup.item(&work).await;
    assert_eq!(item["state"], "stopped", "{item}");
    assert_eq!(item["metadata"]["tether.signal"], "SIGKILL", "{item}");
    assert_eq!(
        setup.causes(&work).await.last().map(String::as_str),
        Some("force_stopped")
    );
}

/// A server that answers every poll with `poll` at once, every claim with `claim` when given (a
/// server without claims otherwise), and anything else 404; the request lines it got.
async fn hostile_server(
    poll: Value,
    claim: Option<Value>,
) -> (String, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let requests = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = requests.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let seen = seen.clone();
            let (poll, claim) = (poll.clone(), claim.clone());
            tokio::spawn(async move {
                let mut stream = BufReader::new(stream);
                loop {
                    let mut line = String::new();
                    if stream.read_line(&mut line).await.unwrap_or(0) == 0 {
                        return;
                    }
                    let mut length = 0;
                    loop {
                        let mut header = String::new();
                        if stream.read_line(&mut header).await.unwrap_or(0) == 0 {
                            return;
                        }
                        if header == "\r\n" {
                            break;
                        }
                        if let Some((name, value)) = header.split_once(':') {
                            if name.eq_ignore_ascii_case("content-length") {
                                length = value.trim().parse().unwrap_or(0);
                            }
                        }
                    }
                    let mut body = vec![0u8; length];
                    let _ = tokio::io::AsyncReadExt::read_exact(&mut stream, &mut body).await;
                    seen.lock().unwrap().push(line.trim().to_owned());
                    let claimed = claim.as_ref().filter(|_| line.contains("/work/claim"));
                    let (status, body) = if line.contains("/work/poll") {
                        ("200 OK", poll.to_string())
                    } else if let Some(claim) = claimed {
                        ("200 OK", claim.to_string())
                    } else {
                        let error = json!({"type": "error", "error": {"type": "not_found_error", "message": "no"}});
                        ("404 Not Found", error.to_string())
                    };
                    let response = format!(
                        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    if stream
                        .get_mut()
                        .write_all(response.as_bytes())
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    (base, requests)
}

/// Work ids become paths (the item's directory, which is removed whole; its log file): one that is
/// not a plain name, from a server that should not be trusted with the worker's files, is neither
/// acknowledged nor run, and the directory it names is left alone.
#[tokio::test]
async fn a_work_id_that_is_not_a_plain_name_is_not_run() {
    // Handed out by a poll (from a server that takes no claims), then by a claim.
    for claims in [false, true] {
        a_work_id_that_is_not_a_plain_name_is_refused(claims).await;
    }
}

async fn a_work_id_that_is_not_a_plain_name_is_refused(claims: bool) {
    let dir = tempfile::tempdir().unwrap();
    let victim = dir.path().join("victim");
    std::fs::create_dir(&victim).unwrap();
    std::fs::write(victim.join("kept"), "x").unwrap();
    let items = dir.path().join("items");
    std::fs::create_dir(&items).unwrap();
    let item = json!({
        "type": "work", "id": "../victim", "environment_id": "env_1",
        "data": {"type": "session", "id": "sess_1"}, "state": "starting",
        "created_at": "2026-07-01T08:15:00Z",
    });
    let claim = claims.then(|| {
        let mut claimed = item.clone();
        claimed["state"] = json!("active");
        json!({
            "type": "work_claim", "work": claimed,
            "lease": {"type": "work_heartbeat", "last_heartbeat": "2026-07-01T08:15:00Z",
                      "lease_extended": true, "state": "active", "ttl_seconds": 60},
        })
    });
    let (base, requests) = hostile_server(item, claim).await;
    let log = dir.path().join("worker.log");
    let mut worker = Command::new(support::BIN)
        .args(["worker", "--server", &base, "--environment", "env_1"])
        .args(["--key", "tth_env_hostile_server_test_0123456789"])
        .args(["--workdir", items.to_str().unwrap(), "--log-dir"])
        .arg(dir.path())
        .args(["--", "sh", "-c", "touch ran"])
        .current_dir(dir.path())
        .stdout(Stdio::null())
        .stderr(File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + PATIENCE;
    // Two takes: the second one after the item of the first was turned away.
    let take = if claims { "/work/claim" } else { "/work/poll" };
    while requests
        .lock()
        .unwrap()
        .iter()
        .filter(|l| l.contains(take))
        .count()
        < 2
    {
        assert!(Instant::now() < deadline, "never took twice");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = worker.kill();
    let _ = worker.wait();
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(log.contains("not a plain name"), "{log}");
    let requests = requests.lock().unwrap().clone();
    if claims {
        assert!(
            requests.iter().all(|l| l.contains("/work/claim")),
            "nothing but claims: {requests:?}"
        );
    } else {
        // The first request is a claim, which this server does not take (404): polls follow.
        assert!(requests[0].contains("/work/claim"), "{requests:?}");
        assert!(
            requests[1..].iter().all(|l| l.contains("/work/poll")),
            "nothing but polls after the claim: {requests:?}"
        );
    }
    assert!(
        victim.join("kept").exists(),
        "the directory it names is left alone"
    );
    assert!(!dir.path().join("ran").exists() && !victim.join("ran").exists());
    assert!(!dir.path().join("victim.log").exists());
}

/// A server that answers every poll with `null` at once, without holding it: the worker waits 1 to
/// 3 s before the next one (§8), rather than polling as fast as the server answers.
#[tokio::test]
async fn a_server_that_answers_polls_at_once_is_not_polled_in_a_loop() {
    let (base, requests) = hostile_server(Value::Null, None).await;
    let mut worker = Command::new(support::BIN)
        .args(["worker", "--server", &base, "--environment", "env_1"])
        .args(["--key", "tth_env_hostile_server_test_0123456789"])
        .args(["--", "true"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + PATIENCE;
    while requests.lock().unwrap().is_empty() {
        assert!(Instant::now() < deadline, "never polled");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let _ = worker.kill();
    let _ = worker.wait();
    let polls = requests.lock().unwrap().len();
    // At most one poll a second; polling in a loop makes thousands.
    assert!(polls <= 4, "{polls} polls in 2.5 s");
}

/// A PROGRAM removed or made non-executable while the worker runs (a deploy replacing it) would fail
/// every item handed to it, each a session's turn: the worker takes no work until it can run again.
#[tokio::test]
async fn a_program_that_can_no_longer_run_takes_no_work_until_it_can() {
    use std::os::unix::fs::PermissionsExt;
    let setup = Setup::new().await;
    let program = setup.dir.path().join("agent.sh");
    std::fs::write(&program, format!("#!/bin/sh\n{PRELUDE}{UNTIL_RELEASED}")).unwrap();
    let mode = |bits: u32| {
        std::fs::set_permissions(&program, std::fs::Permissions::from_mode(bits)).unwrap();
    };
    mode(0o755);
    let mut command = WorkerChild::command(&setup.server.base, &setup.env, "w1");
    command
        .args(["--key", &setup.key, "--ttl", "4", "--grace", "1"])
        .arg("--")
        .arg(&program)
        .env("STAMPS", setup.stamps());
    let mut worker = WorkerChild::spawn("w1", setup.dir.path(), command);
    worker.wait_for_log("worker started").await;

    mode(0o644);
    // The claim under way (the queue is empty) comes back, and the loop sees PROGRAM cannot run
    // before it takes anything more.
    worker
        .wait_for_log("PROGRAM cannot run: taking no work until it can")
        .await;
    let work = setup.session(json!({})).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let item = setup.item(&work).await;
    // Nothing takes it: it waits in the queue, and nothing ran.
    assert!(
        item["state"] == "queued" || item["state"] == "active",
        "{item}"
    );
    assert_eq!(
        (&item["state"], &item["delivery_count"]),
        (&json!("queued"), &json!(0)),
        "{item}"
    );
    assert!(item["delivery_count"].as_u64() <= Some(1), "{item}");
    assert!(item["metadata"].get("tether.exit_code").is_none(), "{item}");
    assert!(stamps(&setup.stamps(), &work).is_empty());

    mode(0o755);
    started(&setup.stamps(), &work, 1).await;
    worker
        .wait_for_log("PROGRAM can run again: taking work")
        .await;
    release(&setup.stamps(), &work);
    let item = setup.wait_for_state(&work, "stopped").await;
    assert_eq!(item["metadata"]["tether.exit_code"], "0", "{item}");
    // Taken once, by whichever take came first, and never left to lapse meanwhile.
    assert_eq!(item["delivery_count"], 1, "{item}");
    let causes = setup.causes(&work).await;
    assert!(
        !causes.iter().any(|c| c == "lease_expired_requeued"),
        "{causes:?}"
    );
    let status = worker.shut_down().await;
    assert!(status.success(), "{status:?}\n{}", worker.log());
}

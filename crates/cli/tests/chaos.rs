//! Chaos between workers and the server: a real `tether serve`, real `tether worker` processes, each
//! behind a TCP proxy of its own (`support::proxy`) that forwards, delays, refuses, drops or freezes on a
//! seeded schedule, while workers are killed with SIGKILL and stopped with SIGSTOP.
//!
//! The programs record themselves: every program appends `start`, then an `alive` line every 50 ms (and
//! `stop` on SIGTERM), each with the wall clock in nanoseconds, to a file named after its session. From
//! those records alone the suite checks the cardinal rule: never two programs running for one session at
//! once. From the items' histories it checks the server's side: a lease nobody renews is requeued
//! within TTL + 1 s of the last heartbeat it accepted (a liveness bound with slack, not a speed claim).
//!
//! The schedule is seeded: the seed is printed; `TETHER_CHAOS_SEED=<n>` replays it. Everything runs on
//! loopback; every wait is bounded.

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use reqwest::Method;
use serde_json::{json, Value};
use support::api::Deployment;
use support::proxy::{Mode, Proxy};
use support::seed::Rng;
use support::worker::WorkerChild;
use tether_core::time::Timestamp;

/// How long any one wait may take before the test gives up (a liveness bound, not a timing assertion).
const PATIENCE: Duration = Duration::from_secs(60);

/// The lease workers ask for, in seconds.
const TTL: i64 = 4;

/// Short leases, a fast dispatcher tick, and no poison limit: under chaos an item may be requeued many
/// times, and every session must still be served at the end.
const SERVER_ARGS: [&str; 8] = [
    "--lease-ttl-min",
    "1",
    "--lease-ttl",
    "4",
    "--tick-ms",
    "100",
    "--max-requeues",
    "1000",
];

/// A program that records its life and never ends by itself.
const RECORDING_PROGRAM: &str = r#"r="$RECORDS/$TETHER_SESSION_ID"
trap 'echo "stop $(date +%s%N) $$ $TETHER_WORKER_ID" >> "$r"; exit 0' TERM
echo "start $(date +%s%N) $$ $TETHER_WORKER_ID" >> "$r"
while :; do echo "alive $(date +%s%N) $$ $TETHER_WORKER_ID" >> "$r"; sleep 0.05; done
"#;

// ---- the server, its API and the workers --------------------------------------------------------------

/// The deployment the chaos runs against; its methods below are what these tests ask of it.
type Setup = Deployment;

impl Setup {
    async fn new() -> Setup {
        let setup = Deployment::start(&SERVER_ARGS, "chaos").await;
        std::fs::create_dir_all(setup.records()).expect("records dir");
        setup
    }

    fn records(&self) -> PathBuf {
        self.dir.path().join("records")
    }

    /// A new session; returns its id.
    async fn session(&self) -> String {
        self.api
            .ok(
                Method::POST,
                "/sessions",
                json!({"agent": self.agent, "environment_id": self.env}),
            )
            .await["id"]
            .as_str()
            .expect("session")
            .to_owned()
    }

    async fn items(&self) -> Vec<Value> {
        self.api
            .get(&format!("/environments/{}/work?limit=100", self.env))
            .await["data"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    async fn history(&self, work: &str) -> Vec<Value> {
        self.api
            .get(&format!(
                "/environments/{}/work/{work}/history?limit=100",
                self.env
            ))
            .await["data"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// Waits until `session`'s item is active; returns its id.
    async fn active_item_of(&self, session: &str) -> String {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let items = self.items().await;
            let active = items
                .iter()
                .find(|i| i["data"]["id"] == session && i["state"] == "active");
            if let Some(item) = active {
                return item["id"].as_str().expect("id").to_owned();
            }
            assert!(
                Instant::now() < deadline,
                "session {session} was never served"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until `work` is renewed by a heartbeat after the one it has now: the moment just after a
    /// renewal.
    async fn next_renewal(&self, work: &str) {
        let beat = async || {
            self.items()
                .await
                .into_iter()
                .find(|i| i["id"] == work)
                .map(|i| i["latest_heartbeat_at"].clone())
        };
        let first = beat().await;
        let deadline = Instant::now() + PATIENCE;
        while beat().await == first {
            assert!(Instant::now() < deadline, "no heartbeat after {first:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Force-stops `work` as an operator does: `tether work stop --force`.
    async fn force_stop(&self, work: &str) {
        let env = self.env.clone();
        let (server, token) = (self.server.base.clone(), self.server.token.clone());
        let work = work.to_owned();
        let out = tokio::task::spawn_blocking(move || {
            support::tether_command()
                .args(["work", "stop", &env, &work, "--force", "--json"])
                .env("TETHER_SERVER", server)
                .env("TETHER_TOKEN", token)
                .output()
                .expect("run tether work stop")
        })
        .await
        .expect("join");
        let stopped = support::json_output(&["work", "stop"], &out);
        assert_eq!(stopped["state"], "stopped", "{stopped}");
    }

    fn worker(&self, name: &str, server: &str) -> Worker {
        self.worker_with_ttl(name, server, TTL)
    }

    fn worker_with_ttl(&self, name: &str, server: &str, ttl: i64) -> Worker {
        self.worker_running(name, server, ttl, RECORDING_PROGRAM)
    }

    /// Worker `name` of `server`, asking for leases of `ttl` seconds, running the shell script
    /// `program` with `$RECORDS` set.
    fn worker_running(&self, name: &str, server: &str, ttl: i64, program: &str) -> Worker {
        let mut command = WorkerChild::command(server, &self.env, name);
        command
            .args(["--key", &self.key])
            .args(["--concurrency", "3", "--ttl", &ttl.to_string()])
            .args(["--grace", "1", "--drain-timeout", "2"])
            .args(["--", "sh", "-c", program, "sh"])
            .env("RECORDS", self.records());
        Worker {
            process: WorkerChild::spawn(name, self.dir.path(), command),
            stopped: false,
        }
    }
}

/// A worker that may be stopped (SIGSTOP) and continued.
struct Worker {
    process: WorkerChild,
    stopped: bool,
}

impl Worker {
    fn signal(&mut self, signal: Signal) {
        let _ = kill(self.process.pid(), signal);
        match signal {
            Signal::SIGSTOP => self.stopped = true,
            Signal::SIGCONT => self.stopped = false,
            _ => {}
        }
    }

    fn running(&mut self) -> bool {
        matches!(self.process.child.try_wait(), Ok(None))
    }
}

// ---- records ------------------------------------------------------------------------------------------

/// One program's life as it recorded it: first and last record, in µs since the epoch.
#[derive(Clone, Debug)]
#[allow(dead_code)] // shown when the rule is broken
struct Run {
    pid: u32,
    worker: String,
    first: i64,
    last: i64,
}

fn runs(dir: &Path) -> BTreeMap<String, Vec<Run>> {
    let mut all = BTreeMap::new();
    for entry in std::fs::read_dir(dir).expect("records").flatten() {
        let session = entry.file_name().to_string_lossy().into_owned();
        let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
        let mut by_pid: BTreeMap<u32, Run> = BTreeMap::new();
        for line in text.lines() {
            let parts: Vec<&str> = line.split_whitespace().collect();
            // A line cut short by a SIGKILL mid-write is no record.
            let [_, nanos, pid, worker] = parts[..] else {
                continue;
            };
            let (Ok(nanos), Ok(pid)) = (nanos.parse::<i64>(), pid.parse::<u32>()) else {
                continue;
            };
            let micros = nanos / 1_000;
            let run = by_pid.entry(pid).or_insert(Run {
                pid,
                worker: worker.to_owned(),
                first: micros,
                last: micros,
            });
            run.first = run.first.min(micros);
            run.last = run.last.max(micros);
        }
        let mut runs: Vec<Run> = by_pid.into_values().collect();
        runs.sort_by_key(|r| r.first);
        all.insert(session, runs);
    }
    all
}

/// The cardinal rule, from the programs' own records.
fn assert_never_two_at_once(dir: &Path) -> usize {
    let mut programs = 0;
    for (session, runs) in runs(dir) {
        programs += runs.len();
        for pair in runs.windows(2) {
            assert!(
                pair[0].last < pair[1].first,
                "two programs ran for session {session} at once: {:?} (last record {} µs after the other started)",
                pair,
                pair[0].last - pair[1].first
            );
        }
    }
    programs
}

fn micros(value: &Value) -> Option<i64> {
    Timestamp::parse_rfc3339(value.as_str()?).map(|t| t.0)
}

/// Watches every item's last accepted heartbeat (or ack) while the chaos runs, so that each requeue can
/// be held against the renewal it followed.
#[derive(Default)]
struct Renewals {
    /// work id → the latest `latest_heartbeat_at` / `acknowledged_at` seen, in µs.
    last: BTreeMap<String, Vec<i64>>,
}

impl Renewals {
    async fn observe(&mut self, setup: &Setup) {
        for item in setup.items().await {
            let id = item["id"].as_str().unwrap_or_default().to_owned();
            let seen = [&item["latest_heartbeat_at"], &item["acknowledged_at"]]
                .into_iter()
                .filter_map(micros)
                .max();
            if let Some(at) = seen {
                let list = self.last.entry(id).or_default();
                if list.last() != Some(&at) {
                    list.push(at);
                }
            }
        }
    }

    /// Every `lease_expired_requeued` comes at most TTL + 1 s after the last renewal before it.
    async fn assert_requeues_timely(&self, setup: &Setup) -> usize {
        let mut requeues = 0;
        for (work, renewals) in &self.last {
            for transition in setup.history(work).await {
                if transition["cause"] != "lease_expired_requeued" {
                    continue;
                }
                requeues += 1;
                let at = micros(&transition["at"]).expect("transition time");
                let Some(renewed) = renewals.iter().filter(|r| **r < at).max() else {
                    continue;
                };
                assert!(
                    at - renewed <= (TTL + 1) * 1_000_000,
                    "{work} was requeued {} ms after its last renewal (TTL {TTL} s)",
                    (at - renewed) / 1_000
                );
            }
        }
        requeues
    }
}

async fn sleep_observing(setup: &Setup, renewals: &mut Renewals, how_long: Duration) {
    let until = Instant::now() + how_long;
    while Instant::now() < until {
        renewals.observe(setup).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// ---- the tests ----------------------------------------------------------------------------------------

/// Issue 10, defect 1: right after a good heartbeat the worker's connection fails fast for a while, then
/// hangs. The program must be dead before the server requeues the item, not some seconds later.
#[tokio::test]
async fn a_line_that_fails_fast_then_hangs_loses_the_program_before_the_lease() {
    let setup = Setup::new().await;
    let proxy = Proxy::start(&setup.server.base).await;
    let _worker = setup.worker("cut", &proxy.url);
    let session = setup.session().await;
    let work = setup.active_item_of(&session).await;
    setup.next_renewal(&work).await;
    let deadline = Instant::now() + PATIENCE;
    proxy.set(Mode::Refuse);
    tokio::time::sleep(Duration::from_millis(2_600)).await;
    proxy.set(Mode::Freeze);
    let requeued_at = loop {
        let history = setup.history(&work).await;
        if let Some(t) = history
            .iter()
            .find(|t| t["cause"] == "lease_expired_requeued")
        {
            break micros(&t["at"]).expect("at");
        }
        assert!(Instant::now() < deadline, "the item was never requeued");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // Whatever was still to come from the program has been written by now.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let runs = runs(&setup.records());
    let run = &runs[&session][0];
    assert!(
        run.last < requeued_at,
        "the program was still running {} ms after the server requeued its item",
        (run.last - requeued_at) / 1_000
    );
}

/// A NAT or a failover forgets the worker's open connections: what the worker sends on them vanishes
/// without an error. The heartbeat stuck on one is tried again on a fresh connection while the lease
/// lasts, and the program keeps running.
#[tokio::test]
async fn connections_forgotten_on_the_way_cost_no_lease() {
    // A lease of 10 s is beaten every 5 s, with 3.9 s left for the tries of each beat.
    const LEASE: i64 = 10;
    let setup = Setup::new().await;
    let proxy = Proxy::start(&setup.server.base).await;
    let _worker = setup.worker_with_ttl("nat", &proxy.url, LEASE);
    let session = setup.session().await;
    let work = setup.active_item_of(&session).await;
    // Just after a renewal, every connection the worker holds is forgotten.
    setup.next_renewal(&work).await;
    proxy.forget_connections();
    // Three beats later, the lease has been renewed all along, and the same program runs.
    tokio::time::sleep(Duration::from_secs(3 * LEASE as u64 / 2)).await;
    let causes: Vec<Value> = setup
        .history(&work)
        .await
        .iter()
        .map(|t| t["cause"].clone())
        .collect();
    assert_eq!(
        causes,
        [
            json!("enqueued"),
            json!("delivered"),
            json!("acked"),
            json!("first_heartbeat")
        ],
        "the lease was lost"
    );
    let runs = runs(&setup.records());
    let runs = &runs[&session];
    assert_eq!(runs.len(), 1, "{runs:?}");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_micros() as i64;
    assert!(
        now - runs[0].last < 1_000_000,
        "the program stopped recording {} ms ago",
        (now - runs[0].last) / 1_000
    );
}

/// A program ends just after every connection its worker holds was forgotten on the way. The first
/// call that ends its item (the exit's record) is given up after 10 s, not the client's 30 s, and
/// sent again; before, it waited out its 30 s on the dead connection. That the retry then goes on a
/// fresh connection does not decide this test: the heartbeats of its short lease have opened a
/// pooled connection that works by then.
#[tokio::test]
async fn an_items_end_is_told_soon_after_its_connections_are_forgotten() {
    const ENDING_PROGRAM: &str = r#"while [ ! -e "$RECORDS/end" ]; do sleep 0.05; done; exit 3"#;
    let setup = Setup::new().await;
    let proxy = Proxy::start(&setup.server.base).await;
    let _worker = setup.worker_running("nat", &proxy.url, TTL, ENDING_PROGRAM);
    let session = setup.session().await;
    let work = setup.active_item_of(&session).await;
    setup.next_renewal(&work).await;
    proxy.forget_connections();
    std::fs::write(setup.records().join("end"), "").expect("end the program");
    let forgotten = Instant::now();
    let item = loop {
        let items = setup.items().await;
        let item = items.into_iter().find(|i| i["id"] == work.as_str());
        let item = item.expect("the item is listed");
        if item["state"] == "stopped" {
            break item;
        }
        // A liveness bound with slack: one call's 10 s, a backoff, two answered calls.
        assert!(
            forgotten.elapsed() < Duration::from_secs(25),
            "the item's end was not told within 25 s of the connections' loss: {item}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(item["metadata"]["tether.exit_code"], "3", "{item}");
    eprintln!(
        "stopped {:.1?} after the connections were forgotten",
        forgotten.elapsed()
    );
}

/// The worker's idle connection to the server is forgotten on the way while it long-polls. The poll
/// that went on it never gets an answer; the worker gives it up once the wait and a margin are over
/// (not after the client's 30 s), polls again on a fresh connection, and serves the session that came
/// meanwhile.
#[tokio::test]
async fn a_poll_on_a_forgotten_connection_is_given_up_and_sent_again_on_a_fresh_one() {
    let setup = Setup::new().await;
    let proxy = Proxy::start(&setup.server.base).await;
    let _worker = setup.worker("idle", &proxy.url);
    // Idle, polling: the first poll has gone out (and been answered empty) by now.
    tokio::time::sleep(Duration::from_secs(2)).await;
    proxy.forget_connections();
    let forgotten = Instant::now();
    let session = setup.session().await;
    loop {
        let served = setup
            .items()
            .await
            .iter()
            .any(|i| i["data"]["id"] == session.as_str() && i["state"] == "active");
        if served {
            break;
        }
        // A liveness bound with slack: the poll's answer is due within its wait and 10 s, then
        // backoff; before, only the client's 30 s ended it.
        assert!(
            forgotten.elapsed() < Duration::from_secs(25),
            "the session was not served within 25 s of the connection's loss"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "served {:.1?} after the connection was forgotten",
        forgotten.elapsed()
    );
}

/// An operator force-stops a session's item while its program runs, and a message for the session
/// follows at once. The worker learns of the stop only at its next heartbeat; the session's fresh item
/// must not start a second program before then, whichever worker takes it.
#[tokio::test]
async fn an_operators_force_stop_never_runs_a_session_twice() {
    let setup = Setup::new().await;
    let _first = setup.worker("first", &setup.server.base);
    let session = setup.session().await;
    let deadline = Instant::now() + PATIENCE;
    let running = setup.active_item_of(&session).await;
    // A second worker, idle and polling, ready to take whatever comes.
    let _second = setup.worker("second", &setup.server.base);
    tokio::time::sleep(Duration::from_millis(500)).await;
    setup.force_stop(&running).await;
    setup
        .api
        .ok(
            Method::POST,
            &format!("/sessions/{session}/events"),
            json!({"events": [{"type": "user.message", "content": [{"type": "text", "text": "again"}]}]}),
        )
        .await;
    // Until a second program has started, and recorded a little.
    loop {
        if runs(&setup.records()).get(&session).map_or(0, Vec::len) >= 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the session's fresh item never ran"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let programs = assert_never_two_at_once(&setup.records());
    assert_eq!(programs, 2);
}

/// Partitions, hangs, delays, SIGKILL and SIGSTOP of workers on a seeded schedule: never two programs for
/// one session, requeues within TTL + 1 s of the last renewal, and at the end every session served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_between_workers_and_server_never_runs_a_session_twice() {
    const WORKERS: usize = 3;
    const SESSIONS: usize = 6;
    const STEPS: usize = 12;
    let mut rng = Rng::from_env();
    let setup = Setup::new().await;
    let mut proxies = Vec::new();
    let mut workers = Vec::new();
    for i in 0..WORKERS {
        let proxy = Proxy::start(&setup.server.base).await;
        workers.push(setup.worker(&format!("w{i}-0"), &proxy.url));
        proxies.push(proxy);
    }
    for _ in 0..SESSIONS {
        setup.session().await;
    }
    let mut renewals = Renewals::default();
    let mut generation = 1;
    let started = Instant::now();
    for step in 0..STEPS {
        let target = rng.below(WORKERS as u64) as usize;
        let pause = rng.millis(500, 3_000);
        let action = match rng.below(10) {
            0 => {
                workers[target].signal(Signal::SIGKILL);
                "SIGKILL".to_owned()
            }
            1 | 2 if !workers[target].stopped => {
                workers[target].signal(Signal::SIGSTOP);
                "SIGSTOP".to_owned()
            }
            1 | 2 => {
                workers[target].signal(Signal::SIGCONT);
                "SIGCONT".to_owned()
            }
            network => {
                let mode = match network {
                    3 => Mode::Refuse,
                    4 => Mode::Drop,
                    5 => Mode::Freeze,
                    6 => Mode::Delay(rng.millis(20, 1_500)),
                    _ => Mode::Forward,
                };
                proxies[target].set(mode);
                format!("proxy {mode:?}")
            }
        };
        eprintln!("step {step}: worker {target}: {action}, then {pause:?}");
        sleep_observing(&setup, &mut renewals, pause).await;
        // A worker that died (SIGKILL, or its dead man's switch while stopped) is replaced.
        for (i, worker) in workers.iter_mut().enumerate() {
            if !worker.running() {
                eprintln!("worker {i} is gone: a new one takes its place");
                *worker = setup.worker(&format!("w{i}-{generation}"), &proxies[i].url);
                generation += 1;
            }
        }
    }
    // Heal everything; every session is served again.
    for (proxy, worker) in proxies.iter().zip(workers.iter_mut()) {
        proxy.set(Mode::Forward);
        if worker.stopped {
            worker.signal(Signal::SIGCONT);
        }
    }
    let deadline = Instant::now() + PATIENCE;
    loop {
        renewals.observe(&setup).await;
        for (i, worker) in workers.iter_mut().enumerate() {
            if !worker.running() {
                *worker = setup.worker(&format!("w{i}-{generation}"), &proxies[i].url);
                generation += 1;
            }
        }
        let items = setup.items().await;
        let live = items.iter().filter(|i| i["state"] != "stopped").count();
        let active = items.iter().filter(|i| i["state"] == "active").count();
        if live == SESSIONS && active == SESSIONS {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not every session is served again: {items:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let chaos = started.elapsed();
    // Let the last programs record a little, then stop everything and judge from the records.
    sleep_observing(&setup, &mut renewals, Duration::from_millis(500)).await;
    let programs = assert_never_two_at_once(&setup.records());
    let requeues = renewals.assert_requeues_timely(&setup).await;
    for item in setup.items().await {
        setup.force_stop(item["id"].as_str().expect("id")).await;
    }
    drop(workers);
    assert_never_two_at_once(&setup.records());
    eprintln!(
        "{STEPS} chaos steps over {chaos:.1?}: {programs} programs for {SESSIONS} sessions, \
         {requeues} lease requeues, never two at once"
    );
}

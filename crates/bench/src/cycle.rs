//! What one worker cycle costs the server, on each backend:
//!
//! - full-cycle throughput (poll, ack, heartbeat, stop) with 16 workers, SQLite against PostgreSQL;
//! - poll+ack latency with a deep backlog (100k queued, in the same environment or in another one)
//!   against a shallow one (1k): the ratio shows whether a request's cost grows with the backlog.
//!
//! Every poll long-polls (`block_ms=999`) as `tether worker` does, and an idle worker waits in an empty
//! environment throughout, so a waiter exists whenever a dispatcher pass runs. Backlogs are written
//! straight into the store in large change sets (enqueueing 100k items over HTTP would take minutes).
//! PostgreSQL runs when `TETHER_BENCH_POSTGRES_URL` (or `TETHER_TEST_POSTGRES_URL`) names a server
//! that allows `CREATE DATABASE`; each measurement gets a fresh database.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde_json::{json, Value};
use tether_core::ids::{self, IdKind};
use tether_core::resources::Session;
use tether_core::session::SessionStatus;
use tether_core::work::{self, WorkData};
use tether_core::{Clock, LeasePolicy, SystemClock};
use tether_server::{App, ServiceConfig};
use tether_store::{ChangeSet, Store, Write};

/// A backend to measure on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Sqlite => "SQLite",
            Backend::Postgres => "PostgreSQL",
        }
    }
}

/// The PostgreSQL server to measure on, if one was named.
pub fn postgres_url() -> Option<String> {
    std::env::var("TETHER_BENCH_POSTGRES_URL")
        .or_else(|_| std::env::var("TETHER_TEST_POSTGRES_URL"))
        .ok()
        .filter(|u| !u.is_empty())
}

struct Served {
    base: String,
    token: String,
    store: Arc<dyn Store>,
    http: reqwest::Client,
    _dir: tempfile::TempDir,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    idle: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for Served {
    fn drop(&mut self) {
        if let Some(idle) = self.idle.take() {
            idle.abort();
        }
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

impl Served {
    async fn start(backend: Backend) -> Result<Served> {
        let dir = tempfile::tempdir()?;
        let store: Arc<dyn Store> = match backend {
            Backend::Sqlite => Arc::new(tether_store::sqlite::open(&dir.path().join("tether.db"))?),
            Backend::Postgres => {
                let admin = postgres_url().context("no PostgreSQL URL")?;
                let url = tether_testkit::postgres::create_test_database(&admin).await?;
                Arc::new(tether_store::postgres::connect(&url).await?)
            }
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let clock: Arc<dyn Clock> = Arc::new(SystemClock);
        let config = ServiceConfig {
            public_url: format!("http://{addr}"),
            ..ServiceConfig::default()
        };
        let app = App::new(store.clone(), clock, config);
        let token = app
            .bootstrap_admin_token(None)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .context("fresh store")?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(tether_server::serve_with(
            app,
            listener,
            tether_server::ServeOptions::plain(1 << 20),
            async move {
                let _ = stopped.await;
            },
        ));
        Ok(Served {
            base: format!("http://{addr}/api/v1/cloud"),
            token,
            store,
            http: reqwest::Client::new(),
            _dir: dir,
            stop: Some(stop),
            idle: None,
        })
    }

    async fn send(&self, request: reqwest::RequestBuilder) -> Result<Value> {
        let resp = request
            .bearer_auth(&self.token)
            .header("Worker-ID", "bench")
            .send()
            .await?;
        anyhow::ensure!(resp.status().is_success(), "{}", resp.status());
        Ok(resp.json().await?)
    }

    async fn post(&self, path: &str, body: Value) -> Result<Value> {
        let request = self.http.post(format!("{}{path}", self.base)).json(&body);
        self.send(request).await
    }

    async fn get(&self, path: &str) -> Result<Value> {
        self.send(self.http.get(format!("{}{path}", self.base)))
            .await
    }

    async fn environment(&self, name: &str) -> Result<String> {
        let env = self
            .post(
                "/environments",
                json!({"name": name, "config": {"type": "self_hosted"}}),
            )
            .await?;
        Ok(env["id"].as_str().context("environment id")?.to_owned())
    }

    async fn agent(&self) -> Result<String> {
        let agent = self
            .post("/agents", json!({"name": "bench", "model": "m"}))
            .await?;
        Ok(agent["id"].as_str().context("agent id")?.to_owned())
    }

    /// Keeps one worker long-polling an empty environment for as long as the server runs.
    async fn keep_an_idle_worker(&mut self) -> Result<()> {
        let env = self.environment("idle").await?;
        let (http, base, token) = (self.http.clone(), self.base.clone(), self.token.clone());
        self.idle = Some(tokio::spawn(async move {
            loop {
                let _ = http
                    .get(format!("{base}/environments/{env}/work/poll?block_ms=999"))
                    .bearer_auth(&token)
                    .header("Worker-ID", "idle")
                    .send()
                    .await;
            }
        }));
        Ok(())
    }

    /// `count` queued sessions in `environment_id`, written straight into the store.
    async fn backlog(&self, environment_id: &str, agent_id: &str, count: usize) -> Result<()> {
        let agent = self
            .store
            .get_agent(agent_id)
            .await?
            .context("agent")?
            .value;
        let policy = LeasePolicy::default();
        let mut left = count;
        while left > 0 {
            let batch = left.min(1_000);
            let mut changes = ChangeSet::new();
            for _ in 0..batch {
                let now = SystemClock.now();
                let session = Session {
                    id: ids::new_id(IdKind::Session),
                    agent: agent.clone(),
                    environment_id: environment_id.to_owned(),
                    status: SessionStatus::Idle,
                    title: None,
                    metadata: Default::default(),
                    environment_variables: Default::default(),
                    resources: Value::Array(Vec::new()),
                    budget: None,
                    created_at: now,
                    updated_at: now,
                    archived_at: None,
                    pending_input: false,
                    last_event_id: None,
                    next_item_not_before: None,
                    turns_started: 0,
                };
                let step = work::enqueue(
                    ids::new_id(IdKind::Work),
                    environment_id.to_owned(),
                    WorkData {
                        kind: "session".into(),
                        id: session.id.clone(),
                    },
                    Default::default(),
                    now,
                    None,
                    &policy,
                );
                changes.push(Write::InsertSession {
                    session,
                    agent_version: None,
                });
                changes.push(Write::InsertWork {
                    item: step.item,
                    transitions: step.transitions,
                });
            }
            self.store.commit(changes).await?;
            left -= batch;
        }
        Ok(())
    }
}

/// Items fully served (poll, ack, heartbeat, stop) per second by `workers` concurrent workers.
pub async fn throughput(backend: Backend, workers: usize, items: usize) -> Result<f64> {
    let mut served = Served::start(backend).await?;
    served.keep_an_idle_worker().await?;
    let env = served.environment("bench").await?;
    let agent = served.agent().await?;
    served.backlog(&env, &agent, items).await?;
    let served = Arc::new(served);
    let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..workers {
        let (served, env, done) = (served.clone(), env.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                // A short block: a worker that finds the queue empty is done.
                let item = served
                    .get(&format!("/environments/{env}/work/poll?block_ms=1"))
                    .await?;
                let Some(id) = item["id"].as_str() else { break };
                let base = format!("/environments/{env}/work/{id}");
                served.post(&format!("{base}/ack"), json!({})).await?;
                served
                    .post(
                        &format!("{base}/heartbeat?expected_last_heartbeat=NO_HEARTBEAT"),
                        json!({}),
                    )
                    .await?;
                served
                    .post(&format!("{base}/stop"), json!({"force": true}))
                    .await?;
                done.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let count = done.load(std::sync::atomic::Ordering::SeqCst);
    anyhow::ensure!(count == items, "served {count} of {items}");
    Ok(count as f64 / started.elapsed().as_secs_f64())
}

/// Session creations (each enqueues an item) per second by `clients` concurrent clients, all in one
/// environment.
pub async fn enqueues_per_second(backend: Backend, clients: usize, total: usize) -> Result<f64> {
    let served = Arc::new(Served::start(backend).await?);
    let env = served.environment("bench").await?;
    let agent = served.agent().await?;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (served, env, agent) = (served.clone(), env.clone(), agent.clone());
        tasks.push(tokio::spawn(async move {
            for _ in 0..total / clients {
                served
                    .post("/sessions", json!({"agent": agent, "environment_id": env}))
                    .await?;
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok((total / clients * clients) as f64 / started.elapsed().as_secs_f64())
}

/// Where the backlog of a poll+ack measurement lies.
#[derive(Clone, Copy, Debug)]
pub enum Backlog {
    /// `n` queued items in the polled environment.
    Here(usize),
    /// 1k in the polled environment and `n` more in another one.
    Elsewhere(usize),
}

/// Median and 99th percentile (ms) of one poll+ack pair, `samples` times in a row.
pub async fn poll_ack_ms(backend: Backend, backlog: Backlog, samples: usize) -> Result<(f64, f64)> {
    let mut served = Served::start(backend).await?;
    served.keep_an_idle_worker().await?;
    let env = served.environment("bench").await?;
    let agent = served.agent().await?;
    match backlog {
        Backlog::Here(n) => served.backlog(&env, &agent, n).await?,
        Backlog::Elsewhere(n) => {
            served.backlog(&env, &agent, 1_000).await?;
            let other = served.environment("other").await?;
            served.backlog(&other, &agent, n).await?;
        }
    }
    // Let the server settle after the bulk write (a checkpoint, the planner's statistics).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut latencies = Vec::with_capacity(samples);
    for _ in 0..samples {
        let started = Instant::now();
        let item = served
            .get(&format!("/environments/{env}/work/poll?block_ms=999"))
            .await?;
        let id = item["id"].as_str().context("an item")?;
        served
            .post(&format!("/environments/{env}/work/{id}/ack"), json!({}))
            .await?;
        latencies.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    latencies.sort_by(|a, b| a.total_cmp(b));
    let p50 = latencies[latencies.len() / 2];
    let p99 = latencies[(latencies.len() * 99 / 100).min(latencies.len() - 1)];
    Ok((p50, p99))
}

/// The ratio column of a rate: the first backend measured (SQLite, which `sqlite_rate` then holds) is
/// the baseline, every later one is shown as a multiple of it.
fn versus_sqlite(sqlite_rate: &mut Option<f64>, rate: f64) -> String {
    let ratio = sqlite_rate
        .map(|s| format!("   {:.2}x of SQLite", rate / s))
        .unwrap_or_else(|| "   (baseline)".into());
    sqlite_rate.get_or_insert(rate);
    ratio
}

/// Runs every figure of this module and prints it (section `number` of the report).
pub async fn report(number: usize, quick: bool) -> Result<()> {
    let mut backends = vec![Backend::Sqlite];
    if postgres_url().is_some() {
        backends.push(Backend::Postgres);
    }
    let (items, deep, samples) = if quick {
        (200, 5_000, 50)
    } else {
        (2_000, 100_000, 400)
    };
    println!(
        "{number}. the cycle's cost, 16 workers, {items} items (an idle long poll waits elsewhere)"
    );
    let mut sqlite_rate = None;
    for &backend in &backends {
        let rate = throughput(backend, 16, items).await?;
        let ratio = versus_sqlite(&mut sqlite_rate, rate);
        println!("   {:<23} {rate:>9.0} items/s{ratio}", backend.name());
    }
    let creations = items * 2;
    println!("{number}b. session creations (enqueue), 32 concurrent clients, {creations} in one environment");
    let mut sqlite_rate = None;
    for &backend in &backends {
        let rate = enqueues_per_second(backend, 32, creations).await?;
        let ratio = versus_sqlite(&mut sqlite_rate, rate);
        println!("   {:<23} {rate:>9.0} sessions/s{ratio}", backend.name());
    }
    println!("{number}c. poll+ack p50/p99 (ms), {samples} in a row, backlog 1k vs {deep}");
    for &backend in &backends {
        let (shallow, _) = poll_ack_ms(backend, Backlog::Here(1_000), samples).await?;
        let (here, here99) = poll_ack_ms(backend, Backlog::Here(deep), samples).await?;
        let (there, there99) = poll_ack_ms(backend, Backlog::Elsewhere(deep), samples).await?;
        println!(
            "   {:<10} 1k {shallow:>6.2}   {deep} here {here:>6.2} (p99 {here99:.2}) {:.2}x   \
             {deep} elsewhere {there:>6.2} (p99 {there99:.2}) {:.2}x",
            backend.name(),
            here / shallow,
            there / shallow
        );
    }
    Ok(())
}

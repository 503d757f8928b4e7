//! `tether-bench`: measures a real server (real socket, real SQLite with fsync) and reports each figure
//! next to a baseline measured in the same run, as a ratio — absolute numbers on a shared machine mean
//! little, ratios mean more.
//!
//! Scenarios:
//! 1. Concurrent writes (session creations) with group commit vs one fsync per write.
//! 2. The worker cycle (poll → ack → heartbeat → stop) with concurrent workers, group commit vs not.
//! 3. Long-poll wake-up latency (an enqueue wakes a blocked poll) vs a client that re-polls every 50 ms.
//! 4. The worker cycle over HTTPS (rustls, certificates made for the run) vs plain HTTP.
//!
//! Usage: `cargo run --release -p tether-bench [-- --quick]`.

mod cycle;

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use serde_json::{json, Value};
use tether_core::{Clock, SystemClock};
use tether_server::{App, ServiceConfig};
use tether_store::sqlite::{self, SqliteOptions};

struct Server {
    base: String,
    token: String,
    /// PEM of the CA that signed the server's certificate, when it serves HTTPS.
    ca_pem: Option<String>,
    _dir: tempfile::TempDir,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

/// A throwaway CA and a certificate for 127.0.0.1 signed by it, written into `dir`.
fn make_certificates(dir: &std::path::Path) -> Result<(tether_server::TlsFiles, String)> {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate()?;
    let cert = CertificateParams::new(vec!["127.0.0.1".to_owned()])?.signed_by(&key, &issuer)?;
    let files = tether_server::TlsFiles {
        cert: dir.join("server.crt"),
        key: dir.join("server.key"),
    };
    std::fs::write(&files.cert, cert.pem())?;
    std::fs::write(&files.key, key.serialize_pem())?;
    Ok((files, ca_cert.pem()))
}

impl Server {
    async fn start(max_batch: usize) -> Result<Server> {
        Self::start_with(max_batch, false).await
    }

    async fn start_with(max_batch: usize, tls: bool) -> Result<Server> {
        let dir = tempfile::tempdir()?;
        let store = Arc::new(sqlite::open_with(
            &dir.path().join("tether.db"),
            SqliteOptions { max_batch },
        )?);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let clock: Arc<dyn Clock> = Arc::new(SystemClock);
        let (tls, ca_pem) = if tls {
            let (files, ca) = make_certificates(dir.path())?;
            (Some(tether_server::TlsSettings::load(files)?), Some(ca))
        } else {
            (None, None)
        };
        let scheme = if tls.is_some() { "https" } else { "http" };
        let config = ServiceConfig {
            public_url: format!("{scheme}://{addr}"),
            ..ServiceConfig::default()
        };
        let app = App::new(store, clock, config);
        let token = app
            .bootstrap_admin_token(None)
            .await
            .map_err(anyhow::Error::new)?
            .expect("fresh store");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let options = tether_server::ServeOptions {
            tls,
            ..tether_server::ServeOptions::plain(1 << 20)
        };
        tokio::spawn(tether_server::serve_with(
            app,
            listener,
            options,
            async move {
                let _ = stopped.await;
            },
        ));
        Ok(Server {
            base: format!("{scheme}://{addr}/api/v1/cloud"),
            token,
            ca_pem,
            _dir: dir,
            stop: Some(stop),
        })
    }

    /// An HTTP client for this server (trusting its CA when it serves HTTPS).
    fn client(&self) -> Result<reqwest::Client> {
        let mut builder = reqwest::Client::builder();
        if let Some(pem) = &self.ca_pem {
            builder = builder
                .use_rustls_tls()
                .add_root_certificate(reqwest::Certificate::from_pem(pem.as_bytes())?);
        }
        Ok(builder.build()?)
    }

    async fn post(&self, http: &reqwest::Client, path: &str, body: Value) -> Result<Value> {
        let resp = http
            .post(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .json(&body)
            .send()
            .await?;
        anyhow::ensure!(resp.status().is_success(), "POST {path}: {}", resp.status());
        Ok(resp.json().await?)
    }

    async fn get(&self, http: &reqwest::Client, path: &str, worker: &str) -> Result<Value> {
        let resp = http
            .get(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .header("Worker-ID", worker)
            .send()
            .await?;
        anyhow::ensure!(resp.status().is_success(), "GET {path}: {}", resp.status());
        Ok(resp.json().await?)
    }

    /// A self-hosted environment and an agent.
    async fn fixtures(&self, http: &reqwest::Client) -> Result<(String, String)> {
        let env = self
            .post(
                http,
                "/environments",
                json!({"name": "bench", "config": {"type": "self_hosted"}}),
            )
            .await?;
        let agent = self
            .post(http, "/agents", json!({"name": "bench", "model": "m"}))
            .await?;
        Ok((
            env["id"].as_str().unwrap().to_owned(),
            agent["id"].as_str().unwrap().to_owned(),
        ))
    }

    /// `POST /sessions` on the self-hosted `env`, which enqueues one work item.
    async fn create_session(
        &self,
        http: &reqwest::Client,
        env: &str,
        agent: &str,
    ) -> Result<Value> {
        self.post(
            http,
            "/sessions",
            json!({"agent": agent, "environment_id": env}),
        )
        .await
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Session creations per second with `writers` concurrent clients.
async fn writes_per_second(max_batch: usize, writers: usize, total: usize) -> Result<f64> {
    let server = Arc::new(Server::start(max_batch).await?);
    let http = reqwest::Client::new();
    let (env, agent) = server.fixtures(&http).await?;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..writers {
        let (server, http, env, agent) = (server.clone(), http.clone(), env.clone(), agent.clone());
        tasks.push(tokio::spawn(async move {
            for _ in 0..total / writers {
                server.create_session(&http, &env, &agent).await?;
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok((total / writers * writers) as f64 / started.elapsed().as_secs_f64())
}

/// Items fully served (poll, ack, heartbeat, stop) per second by `workers` concurrent workers.
async fn cycles_per_second(
    max_batch: usize,
    tls: bool,
    workers: usize,
    items: usize,
) -> Result<f64> {
    let server = Arc::new(Server::start_with(max_batch, tls).await?);
    let http = server.client()?;
    let (env, agent) = server.fixtures(&http).await?;
    for _ in 0..items {
        server.create_session(&http, &env, &agent).await?;
    }
    let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..workers {
        let (server, http, env, done) = (server.clone(), http.clone(), env.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            let worker = format!("bench-{w}");
            loop {
                let item = server
                    .get(&http, &format!("/environments/{env}/work/poll"), &worker)
                    .await?;
                let Some(id) = item["id"].as_str() else { break };
                let base = format!("/environments/{env}/work/{id}");
                server
                    .post(&http, &format!("{base}/ack"), json!({}))
                    .await?;
                server
                    .post(
                        &http,
                        &format!("{base}/heartbeat?expected_last_heartbeat=NO_HEARTBEAT"),
                        json!({}),
                    )
                    .await?;
                server
                    .post(&http, &format!("{base}/stop"), json!({"force": true}))
                    .await?;
                done.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let served = done.load(std::sync::atomic::Ordering::SeqCst);
    anyhow::ensure!(served == items, "served {served} of {items}");
    Ok(served as f64 / started.elapsed().as_secs_f64())
}

/// Median time from an enqueue to the worker holding the item: a blocked long poll, or (baseline) a
/// client that polls without blocking every 50 ms.
async fn wake_latency_ms(blocking: bool, samples: usize) -> Result<f64> {
    let server = Arc::new(Server::start(sqlite::MAX_BATCH).await?);
    let http = reqwest::Client::new();
    let (env, agent) = server.fixtures(&http).await?;
    let mut latencies = Vec::new();
    for _ in 0..samples {
        let (s, h, e) = (server.clone(), http.clone(), env.clone());
        let waiter = tokio::spawn(async move {
            loop {
                let path = if blocking {
                    format!("/environments/{e}/work/poll?block_ms=999")
                } else {
                    format!("/environments/{e}/work/poll")
                };
                let item = s.get(&h, &path, "bench").await?;
                if let Some(id) = item["id"].as_str() {
                    let base = format!("/environments/{e}/work/{id}");
                    s.post(&h, &format!("{base}/stop"), json!({"force": true}))
                        .await?;
                    return anyhow::Ok(Instant::now());
                }
                if !blocking {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        });
        tokio::time::sleep(Duration::from_millis(120)).await;
        let enqueued = Instant::now();
        server.create_session(&http, &env, &agent).await?;
        let got = waiter.await??;
        latencies.push(got.duration_since(enqueued).as_secs_f64() * 1000.0);
    }
    latencies.sort_by(|a, b| a.partial_cmp(b).unwrap());
    Ok(latencies[latencies.len() / 2])
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    values[values.len() / 2]
}

#[tokio::main]
async fn main() -> Result<()> {
    let mut quick = false;
    let mut only_cycle = false;
    for arg in std::env::args().skip(1) {
        match arg.as_str() {
            "--quick" => quick = true,
            "--cycle" => only_cycle = true,
            "-h" | "--help" => {
                println!("Usage: tether-bench [--quick]\n\nStarts real servers (real sockets, SQLite with fsync) and prints each figure next to a\nbaseline measured in the same run. --quick runs a quarter of the work; --cycle runs only the\ncycle's cost (5), on PostgreSQL too when TETHER_BENCH_POSTGRES_URL names a server.");
                return Ok(());
            }
            other => {
                eprintln!(
                    "tether-bench: unknown argument {other:?} (usage: tether-bench [--quick] [--cycle])"
                );
                std::process::exit(2);
            }
        }
    }
    let scale = if quick { 1 } else { 4 };
    println!(
        "tether-bench ({} run; figures on a shared machine: compare the ratios)",
        if quick { "quick" } else { "full" }
    );

    if only_cycle {
        return cycle::report(5, quick).await;
    }

    let writes = 500 * scale;
    let grouped = writes_per_second(sqlite::MAX_BATCH, 32, writes).await?;
    let single = writes_per_second(1, 32, writes).await?;
    println!("1. session creations, 32 concurrent clients, {writes} writes");
    println!("   group commit            {grouped:>9.0} writes/s");
    println!("   one fsync per write     {single:>9.0} writes/s   (baseline)");
    println!("   ratio                   {:>9.2}x", grouped / single);

    let items = 200 * scale;
    let grouped = cycles_per_second(sqlite::MAX_BATCH, false, 16, items).await?;
    let single = cycles_per_second(1, false, 16, items).await?;
    println!("2. worker cycle (poll, ack, heartbeat, stop), 16 workers, {items} items");
    println!("   group commit            {grouped:>9.0} items/s");
    println!("   one fsync per write     {single:>9.0} items/s    (baseline)");
    println!("   ratio                   {:>9.2}x", grouped / single);

    let samples = 10 * scale;
    let blocked = wake_latency_ms(true, samples).await?;
    let polled = wake_latency_ms(false, samples).await?;
    println!("3. enqueue → worker holds the item, median of {samples}");
    println!("   blocked long poll       {blocked:>9.1} ms");
    println!("   re-poll every 50 ms     {polled:>9.1} ms       (baseline)");
    println!(
        "   ratio                   {:>9.2}x faster",
        polled / blocked
    );

    // Alternating rounds, median of each: on a shared machine one run of each is mostly noise.
    let (mut https, mut http) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        https.push(cycles_per_second(sqlite::MAX_BATCH, true, 16, items).await?);
        http.push(cycles_per_second(sqlite::MAX_BATCH, false, 16, items).await?);
    }
    let (https, http) = (median(https), median(http));
    println!("4. worker cycle over HTTPS (rustls), 16 workers, {items} items, median of 3 alternating rounds");
    println!("   HTTPS                   {https:>9.0} items/s");
    println!("   plain HTTP              {http:>9.0} items/s    (baseline)");
    println!("   ratio                   {:>9.2}x", https / http);

    cycle::report(5, quick).await
}

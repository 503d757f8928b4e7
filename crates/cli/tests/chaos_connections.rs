//! Connection abuse against the real `tether serve`: 5,000 idle TCP connections held open, slowloris
//! connections dribbling header bytes, and 1,000 concurrent long polls, all at once. Meanwhile the
//! server must answer `/healthz` on a fresh connection and a work-item heartbeat, the slowloris
//! connections must be closed by the header timeout, and the server's resident memory must stay under
//! a bound (printed). Loopback only; bounded by the header timeout plus a fixed patience (about 30 s
//! on an idle machine).

mod support;

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use support::ServerProcess;
use tether_client::{Client, CreateEnvironment, HeartbeatOptions, PollOptions, NO_HEARTBEAT};
use tether_testkit::client::environment_agent_and_session;

const IDLE_CONNECTIONS: usize = 5_000;
const SLOWLORIS_CONNECTIONS: usize = 100;
const LONG_POLLS: usize = 1_000;
/// Long enough that the idle connections are still open while the server is checked.
const HEADER_TIMEOUT_SECS: u64 = 20;
/// The server's resident memory must stay under this while under abuse (MiB). About 10 KiB per
/// connection on top of an idle server (about 70 MiB measured in all), with a wide margin.
const RSS_BOUND_MIB: u64 = 256;

fn raise_own_file_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    let (soft, _) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    let needed = (IDLE_CONNECTIONS + SLOWLORIS_CONNECTIONS + LONG_POLLS + 200) as u64;
    assert!(
        soft >= needed,
        "this test needs {needed} open files; the hard limit is {soft} (raise it with ulimit -Hn)"
    );
}

/// `tether serve` on `data` with `extra` arguments, its pid and address (host:port), and a runtime
/// for the test's clients.
fn start(
    data: &std::path::Path,
    extra: &[&str],
) -> (ServerProcess, u32, String, tokio::runtime::Runtime) {
    let server = ServerProcess::start(data, extra);
    let pid = server.child.id();
    let addr = server.base.trim_start_matches("http://").to_owned();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    (server, pid, addr, rt)
}

/// VmRSS of `pid`, in KiB.
fn resident_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/<pid>/status")
}

fn is_closed(mut stream: &TcpStream) -> bool {
    let mut byte = [0u8; 1];
    match stream.read(&mut byte) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) if e.kind() == ErrorKind::WouldBlock => false,
        Err(_) => true,
    }
}

#[test]
fn the_server_keeps_serving_under_idle_slowloris_and_long_poll_floods() {
    raise_own_file_limit();
    let started = Instant::now();
    let data = tempfile::tempdir().unwrap();
    let header_timeout = format!("{HEADER_TIMEOUT_SECS}s");
    let (server, pid, addr, rt) = start(data.path(), &["--header-timeout", &header_timeout]);

    // A work item with a live lease, to heartbeat under load; and an empty environment to long-poll.
    let admin = Client::new(&server.base, &server.token).unwrap();
    let (work_env, work_id, mut last) = rt.block_on(async {
        let (env, _, _) = environment_agent_and_session(&admin, "leased").await;
        let poll = PollOptions {
            block_ms: Some(999),
            worker_id: Some("w".into()),
            ..Default::default()
        };
        let item = admin.poll_work(&env.id, &poll).await.unwrap().unwrap();
        admin.ack_work(&env.id, &item.id, Some("w")).await.unwrap();
        let beat = admin
            .heartbeat(
                &env.id,
                &item.id,
                &HeartbeatOptions {
                    expected_last_heartbeat: Some(NO_HEARTBEAT.into()),
                    worker_id: Some("w".into()),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        (env.id, item.id, beat.last_heartbeat)
    });
    let poll_env = rt
        .block_on(admin.create_environment(&CreateEnvironment::self_hosted("polled")))
        .unwrap()
        .id;
    let baseline = resident_kib(pid);

    // 5,000 connections that never send a byte.
    let mut idle = Vec::with_capacity(IDLE_CONNECTIONS);
    for _ in 0..IDLE_CONNECTIONS {
        idle.push(TcpStream::connect(&addr).expect("connect an idle connection"));
    }

    // Slowloris: a request line, then a header byte now and then, never the blank line.
    let mut slow: Vec<TcpStream> = (0..SLOWLORIS_CONNECTIONS)
        .map(|_| {
            let mut s = TcpStream::connect(&addr).unwrap();
            s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
                .unwrap();
            s.set_nonblocking(true).unwrap();
            s
        })
        .collect();

    // 1,000 long polls at once, each on its own connection, polling again as soon as one ends.
    let stop_polling = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let pollers: Vec<_> = (0..LONG_POLLS)
        .map(|i| {
            let client = Client::new(&server.base, &server.token).unwrap();
            let env = poll_env.clone();
            let stop = stop_polling.clone();
            rt.spawn(async move {
                let options = PollOptions {
                    block_ms: Some(999),
                    worker_id: Some(format!("poller-{i}")),
                    ..Default::default()
                };
                let mut answered = 0u32;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    match client.poll_work(&env, &options).await {
                        Ok(None) => answered += 1,
                        other => panic!("a long poll failed under load: {other:?}"),
                    }
                }
                answered
            })
        })
        .collect();

    // Under all of that: /healthz on a fresh connection and a heartbeat answer, a few times over.
    let mut peak = 0;
    for round in 0..5 {
        for s in &mut slow {
            let _ = s.write(b"a");
        }
        let fresh = Client::new(&server.base, &server.token).unwrap();
        let healthz = rt.block_on(async {
            reqwest::Client::new()
                .get(format!("{}/healthz", server.base))
                .timeout(Duration::from_secs(30))
                .send()
                .await
        });
        let status = healthz.expect("/healthz answered under load").status();
        assert_eq!(status, 200, "round {round}");
        let beat = rt
            .block_on(fresh.heartbeat(
                &work_env,
                &work_id,
                &HeartbeatOptions {
                    expected_last_heartbeat: Some(last.clone()),
                    worker_id: Some("w".into()),
                    ..Default::default()
                },
            ))
            .expect("a heartbeat answered under load");
        assert!(beat.lease_extended);
        last = beat.last_heartbeat;
        peak = peak.max(resident_kib(pid));
        std::thread::sleep(Duration::from_millis(500));
    }
    stop_polling.store(true, std::sync::atomic::Ordering::Relaxed);
    let answered: u32 = rt
        .block_on(futures::future::join_all(pollers))
        .into_iter()
        .map(|r| r.unwrap())
        .sum();
    assert!(answered >= LONG_POLLS as u32, "{answered} polls answered");

    // The slowloris connections are closed by the header timeout (however hard they keep dribbling).
    let deadline = Instant::now() + Duration::from_secs(HEADER_TIMEOUT_SECS + 60);
    loop {
        let open = slow.iter().filter(|s| !is_closed(s)).count();
        if open == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{open} slowloris connections still open well after the header timeout"
        );
        for s in &mut slow {
            let _ = s.write(b"a");
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    // So are the idle ones; the server is still fine afterwards.
    for s in &idle {
        s.set_nonblocking(true).unwrap();
    }
    let mut still_open;
    loop {
        still_open = idle.iter().filter(|s| !is_closed(s)).count();
        if still_open == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{still_open} idle connections still open well after the header timeout"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let status = rt
        .block_on(reqwest::get(format!("{}/healthz", server.base)))
        .unwrap()
        .status();
    assert_eq!(status, 200);

    let peak_mib = peak / 1024;
    println!(
        "connection abuse: {IDLE_CONNECTIONS} idle + {SLOWLORIS_CONNECTIONS} slowloris + \
         {LONG_POLLS} long polls; server RSS {} MiB idle, {peak_mib} MiB peak (bound {RSS_BOUND_MIB} \
         MiB); {answered} polls answered; {still_open} idle connections still open after the \
         header timeout; {:.1} s",
        baseline / 1024,
        started.elapsed().as_secs_f64()
    );
    assert!(
        peak_mib < RSS_BOUND_MIB,
        "resident memory {peak_mib} MiB above the bound {RSS_BOUND_MIB} MiB"
    );
}

/// Clients without a credential, on HTTP/2, ask for the largest public answers — `/openapi.json`
/// (about 120 KB) and `/metrics` of a server with 200 environments — a hundred at once on each
/// connection, and read none of them. The server must hold little for them: every ask of a public
/// document shares one copy, and what hyper holds of one connection's answers is bounded
/// (`H2_MAX_UNSENT`). Before, 50 such connections took the server from 16 MB to 630 MB.
#[test]
fn public_answers_nobody_reads_cost_the_server_little_memory() {
    use tether_testkit::net::h2_client_that_may_stop_reading;
    const CONNECTIONS: usize = 50;
    const STREAMS: usize = 100;
    /// What one such connection may cost: the bound on what hyper holds (256 KiB) and the state of
    /// a hundred streams, with a wide margin.
    const PER_CONNECTION_KIB: u64 = 1024;
    let data = tempfile::tempdir().unwrap();
    let (server, pid, addr, rt) = start(data.path(), &[]);
    let admin = Client::new(&server.base, &server.token).unwrap();
    let metrics_len = rt.block_on(async {
        for i in 0..200 {
            let name = format!("env-{i}");
            admin
                .create_environment(&CreateEnvironment::self_hosted(&name))
                .await
                .unwrap();
        }
        let text = reqwest::get(format!("{}/metrics", server.base))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        text.len()
    });
    let baseline = resident_kib(pid);

    let held = rt.block_on(async {
        let mut held = Vec::new();
        for c in 0..CONNECTIONS {
            let (mut sender, reading, conn) = h2_client_that_may_stop_reading(&addr).await;
            held.push(conn);
            let path = if c % 2 == 0 {
                "openapi.json"
            } else {
                "metrics"
            };
            let ask = || {
                hyper::Request::get(format!("http://{addr}/{path}"))
                    .body(String::new())
                    .unwrap()
            };
            // The first answer's head comes back; from then on this client reads nothing.
            let first = sender.send_request(ask()).await.unwrap();
            assert_eq!(first.status(), 200);
            reading.stop_reading();
            let rest: Vec<_> = (1..STREAMS).map(|_| sender.send_request(ask())).collect();
            held.push(tokio::spawn(async move {
                let _first = first;
                let _ = futures::future::join_all(rest).await;
            }));
        }
        held
    });
    // Until the server has taken every ask and its memory stays level.
    let mut peak = resident_kib(pid);
    let mut level_since = Instant::now();
    let started = Instant::now();
    while level_since.elapsed() < Duration::from_secs(2)
        && started.elapsed() < Duration::from_secs(30)
    {
        std::thread::sleep(Duration::from_millis(100));
        let now = resident_kib(pid);
        if now > peak {
            peak = now;
            level_since = Instant::now();
        }
    }
    // Others are still served meanwhile.
    let status = rt
        .block_on(reqwest::get(format!("{}/healthz", server.base)))
        .unwrap()
        .status();
    assert_eq!(status, 200);
    let grown = peak.saturating_sub(baseline);
    let bound = CONNECTIONS as u64 * PER_CONNECTION_KIB;
    println!(
        "unread public answers: {CONNECTIONS} HTTP/2 connections × {STREAMS} asks of /openapi.json \
         or /metrics ({metrics_len} bytes); server RSS {} MiB before, {} MiB peak: {} KiB per \
         connection (bound {PER_CONNECTION_KIB})",
        baseline / 1024,
        peak / 1024,
        grown / CONNECTIONS as u64
    );
    assert!(
        grown <= bound,
        "the server grew by {} MiB for answers nobody reads (bound {} MiB)",
        grown / 1024,
        bound / 1024
    );
    drop(held);
}

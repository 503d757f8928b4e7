//! The Tether worker's runtime (§8): claims work items of one environment with an environment key and
//! runs PROGRAM for each item (again for a turn that came as it ended), in a process group of its own, with the item's session token as the
//! program's only credential. The `tether worker` command only turns its flags into a [`Config`] and
//! calls [`run`].
//!
//! * [`claim`]: the long-poll loop, its backoff and the refusals that end the worker;
//! * [`supervisor`]: one item from ack to stop, and the next its stop's claim brings ([`chain`]);
//! * [`heartbeat`]: one item's lease (the arithmetic is `tether_core::lease`);
//! * [`program`]: the child process;
//! * [`sandbox`], [`limits`], [`proxy`], [`forward`]: `--sandbox` (bubblewrap), its caps (cgroups or
//!   rlimits), and the API proxy of `--sandbox-network api` with its forwarder inside the sandbox;
//! * [`shutdown`]: signals and draining;
//! * [`status`]: log lines and the live status line.

pub mod backoff;
mod chain;
mod claim;
mod deadman;
mod error;
pub mod forward;
pub mod guard;
pub mod heartbeat;
pub mod limits;
mod logsink;
pub mod program;
pub mod proxy;
pub mod sandbox;
pub mod shutdown;
pub mod status;
mod supervisor;
pub mod workdir;

use std::ffi::OsString;
use std::os::unix::fs::DirBuilderExt as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tether_client::Client;
use tokio::sync::watch;
use tokio::task::JoinSet;

pub use error::{Error, Result, EXIT_NEEDS_THE_OPERATOR};
pub use program::Exit;
pub use sandbox::{Bind, Network, SandboxConfig};
pub use status::LogWriter;

use program::{Output, Program};
use status::{Activity, Reporter};
use workdir::Workdirs;

/// How the worker writes its log lines (the subscriber itself is installed by the caller, with
/// [`LogWriter`] as its writer, so that `serve` and `worker` share one log shape).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// Everything `tether worker` is told on its command line.
#[derive(Clone, Debug)]
pub struct Config {
    /// URL of the Tether server.
    pub server: String,
    /// A private CA to trust, handed on to PROGRAM as TETHER_CA_CERT.
    pub ca_cert: Option<PathBuf>,
    pub environment: String,
    /// The environment's key (tth_env_…).
    pub key: String,
    /// Identity sent on poll, ack and heartbeat; a fresh `<hostname>-<hex>` when absent.
    pub worker_id: Option<String>,
    /// Items run at the same time.
    pub concurrency: u32,
    /// Lease to ask for, in seconds.
    pub ttl: Option<u32>,
    /// Time PROGRAM gets between SIGTERM and SIGKILL.
    pub grace: Duration,
    /// After the first signal, how long running programs may take to finish.
    pub drain_timeout: Duration,
    /// Each item's output to `<dir>/<work_id>.log` instead of the log.
    pub log_dir: Option<PathBuf>,
    pub log_format: LogFormat,
    /// A fresh directory `<dir>/<work_id>` per item.
    pub workdir: Option<PathBuf>,
    pub keep_workdir: bool,
    /// Stop claiming after this long without work.
    pub max_idle: Option<Duration>,
    /// Claim one item, run it, and end.
    pub run_one: bool,
    /// PROGRAM and its arguments.
    pub program: Vec<OsString>,
    /// `--sandbox`: run each item's PROGRAM confined.
    pub sandbox: Option<SandboxConfig>,
    /// An executable that answers `program-guard` (the `tether` binary does: [`guard`]), to run each
    /// unconfined PROGRAM under, so that nothing PROGRAM starts outlives a worker that dies outright.
    /// Without one (and off Linux), PROGRAM itself dies with the worker, but not what it started.
    pub guard: Option<PathBuf>,
}

/// How a run of the worker ended (when it ended without an error).
#[derive(Clone, Debug, Default)]
pub struct Summary {
    /// At least one item was claimed.
    pub claimed: bool,
    /// How PROGRAM exited, per item run (kept for `run-one` only).
    pub exits: Vec<Exit>,
}

/// Where the worker is in its life. Only ever moves forward.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    /// Claiming and running.
    Running,
    /// No new work; running programs may finish.
    Draining,
    /// The drain time is up: programs get SIGTERM, then SIGKILL after the grace period.
    Terminating,
    /// Programs are killed at once and their items force-stopped.
    Forced,
}

/// Waits until the worker is at `phase` or further along.
pub async fn reached(watch: &mut watch::Receiver<Phase>, phase: Phase) {
    // A closed channel means the worker is going away: as good as any phase.
    let _ = watch.wait_for(|p| *p >= phase).await;
}

/// What every part of the worker shares.
pub(crate) struct Shared {
    /// Carries the environment key (poll, ack).
    pub client: Client,
    pub environment_id: String,
    /// The private CA to trust (--ca-cert), handed on to PROGRAM.
    pub ca_cert: Option<PathBuf>,
    pub worker_id: String,
    pub program: Program,
    pub output: Output,
    pub desired_ttl: Option<u32>,
    pub grace: Duration,
    pub report: Reporter,
    pub phase: watch::Receiver<Phase>,
    /// `--workdir`: a fresh directory per item.
    pub workdirs: Option<Workdirs>,
    /// `--max-idle`: stop claiming after this long without work.
    pub max_idle: Option<Duration>,
    /// `run-one`: stop claiming after the first item.
    pub run_one: bool,
    /// How PROGRAM exited, per item run (for `run-one`'s exit status).
    pub exits: std::sync::Mutex<Vec<Exit>>,
    /// An item was handed to a supervisor, however it came (a poll, a claim, a lost claim's item
    /// asked for again as the drain began): `claim::hand_over` sets it. `run-one` ends on it.
    pub took_any: std::sync::atomic::AtomicBool,
    /// A drain task is asking for a lost claim's item (`claim::ask_again_taking_nothing`), not yet
    /// running one: what the drain's message counts apart from the items running.
    pub asking_for_lost_claim: std::sync::atomic::AtomicBool,
    /// Whether the server makes the stops claims carry (`chain`): once it left one undone, items
    /// are stopped on their own for a while, as claims give way to polls when refused.
    pub stops_with_claims: std::sync::Mutex<claim::ClaimSupport>,
    /// `--sandbox`, checked at start-up.
    pub sandbox: Option<sandbox::Sandbox>,
    /// `--sandbox-network api`: where each item's proxy sends requests, and where its socket goes.
    pub api_proxy: Option<ApiProxySetup>,
    /// Whether a running program arms the dead man's switch ([`deadman`]). Always in a worker; off
    /// only in unit tests on tokio's paused clock, whose instants the kernel's timer cannot follow.
    pub dead_mans_switch: bool,
}

pub(crate) struct ApiProxySetup {
    pub upstream: proxy::Upstream,
    /// A directory of the worker's own (mode 0700, hidden from the programs) for the items' sockets.
    pub sockets: PathBuf,
}

impl Shared {
    pub fn note_exit(&self, exit: Exit) {
        if self.run_one {
            self.exits
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(exit);
        }
    }
}

/// Runs the worker to its end: until a signal drained it, `--max-idle` passed, the one item of
/// `run-one` ended, or the server refused to hand out work (an error that says why).
pub async fn run(config: Config) -> Result<Summary> {
    let ended = run_to_end(config).await;
    // Whichever way it ended, early refusals included: the log lines still waiting for standard
    // error go out (for at most about a second) before the caller reports the outcome.
    logsink::stderr().flush();
    ended
}

async fn run_to_end(config: Config) -> Result<Summary> {
    // Everything that cannot work is found out before the first claim.
    let program = Program {
        guard: config.guard.clone(),
        ..Program::resolve(&config.program)?
    };
    let worker_id = match &config.worker_id {
        Some(id) => check_worker_id(id.trim())?,
        None => default_worker_id(),
    };
    let key = config.key.trim().to_owned();
    if key.is_empty() {
        return Err(Error::config(
            "--key / TETHER_KEY is empty: pass the environment key from `tether env key create`",
        ));
    }
    // Absolute, so that PROGRAM finds it from whatever directory it runs in.
    let ca_cert = match &config.ca_cert {
        Some(path) => Some(
            std::path::absolute(path)
                .map_err(|e| Error::config(format!("invalid --ca-cert {}: {e}", path.display())))?,
        ),
        None => None,
    };
    let mut builder = Client::builder(config.server.clone())
        .token(key)
        .user_agent(format!("tether-worker/{}", env!("CARGO_PKG_VERSION")));
    if let Some(path) = &ca_cert {
        builder = builder.ca_cert_file(path);
    }
    let client = builder.build().map_err(|e| {
        // The builder reads the URL first, then the CA file: the URL alone says which was wrong.
        let url_alone = Client::builder(config.server.clone()).build();
        let flag = match (&ca_cert, url_alone) {
            (Some(_), Ok(_)) => "--ca-cert / TETHER_CA_CERT",
            _ => "--server / TETHER_SERVER",
        };
        Error::config(format!("invalid {flag}: {e}"))
    })?;
    let concurrency = config.concurrency.max(1) as usize;
    let report = Reporter::new(config.log_format, concurrency);
    let output = match &config.log_dir {
        Some(dir) => {
            std::fs::create_dir_all(dir).map_err(|e| {
                Error::config(format!("cannot create --log-dir {}: {e}", dir.display()))
            })?;
            Output::Dir(dir.clone())
        }
        None => Output::Log(report.clone()),
    };
    let workdirs = match &config.workdir {
        Some(root) => Some(Workdirs::new(root.clone(), config.keep_workdir)?),
        // A sandboxed program always gets a fresh directory of its own, the only place it may write.
        None if config.sandbox.is_some() => Some(Workdirs::new(
            std::env::temp_dir().join(format!("tether-items-{}", std::process::id())),
            false,
        )?),
        None => None,
    };
    let sandbox = match &config.sandbox {
        Some(wanted) => {
            // The worker's own places are hidden from the programs: the item directories (each
            // program sees its own only), the logs, the worker's working directory and the home of
            // the user it runs as, wherever that lives (not every home is under /home or /root:
            // service users, CI runners and containers put it anywhere).
            let mut hidden = Vec::new();
            hidden.extend(std::env::var_os("HOME").map(std::path::PathBuf::from));
            hidden.extend(std::env::current_dir().ok());
            hidden.extend(workdirs.as_ref().map(|w| w.root().to_owned()));
            hidden.extend(
                config
                    .log_dir
                    .iter()
                    .filter_map(|d| std::path::absolute(d).ok()),
            );
            Some(sandbox::Sandbox::check(wanted.clone(), hidden)?)
        }
        None => None,
    };
    let api_proxy = match &sandbox {
        Some(sandbox) if sandbox.network() == Network::Api => {
            let upstream = proxy::Upstream::new(client.api_base_url(), ca_cert.as_deref())?;
            let sockets = std::env::temp_dir().join(format!("tether-api-{}", std::process::id()));
            std::fs::DirBuilder::new()
                .mode(0o700)
                .create(&sockets)
                .map_err(|e| {
                    Error::config(format!(
                        "cannot create the API proxy's directory {}: {e}",
                        sockets.display()
                    ))
                })?;
            Some(ApiProxySetup { upstream, sockets })
        }
        _ => None,
    };
    let (phase_tx, phase) = watch::channel(Phase::Running);
    let phase_tx = Arc::new(phase_tx);
    let signals = shutdown::watch_signals(phase_tx.clone(), report.clone(), config.drain_timeout)?;
    report.info(
        "worker started",
        &[
            ("worker_id", &worker_id),
            ("environment_id", &config.environment),
            ("server", client.api_base_url()),
            ("program", &program.display()),
            ("concurrency", &concurrency.to_string()),
        ],
    );
    match &sandbox {
        Some(sandbox) => report.info(
            &format!("confinement: sandbox, {}", sandbox.describe()),
            &[],
        ),
        None => report.info(
            "confinement: none (programs run with the worker's rights; see --sandbox)",
            &[],
        ),
    }
    let shared = Arc::new(Shared {
        client,
        environment_id: config.environment.clone(),
        ca_cert,
        worker_id,
        program,
        output,
        desired_ttl: config.ttl,
        grace: config.grace,
        report: report.clone(),
        phase: phase.clone(),
        workdirs,
        max_idle: config.max_idle,
        run_one: config.run_one,
        exits: std::sync::Mutex::default(),
        took_any: Default::default(),
        asking_for_lost_claim: Default::default(),
        stops_with_claims: Default::default(),
        sandbox,
        api_proxy,
        dead_mans_switch: true,
    });
    let mut tasks = JoinSet::new();
    let claimed = claim::run(shared.clone(), concurrency, &mut tasks).await;
    if shared.run_one {
        // The item runs to its end; a signal still drains (and then terminates) it as usual.
        let mut phase = phase.clone();
        tokio::select! {
            _ = async { while tasks.join_next().await.is_some() {} } => {}
            _ = reached(&mut phase, Phase::Draining) => {}
        }
    }
    shutdown::advance(&phase_tx, Phase::Draining);
    report.activity(Activity::Draining);
    if let Err(e) = &claimed {
        if !tasks.is_empty() {
            report.error(&e.to_string(), &[]);
        }
    }
    let asking = &shared.asking_for_lost_claim;
    shutdown::drain(&mut tasks, &phase_tx, config.drain_timeout, &report, asking).await;
    signals.abort();
    if let Some(sandbox) = &shared.sandbox {
        limits::remove_worker_groups(sandbox.caps());
    }
    if let Some(api) = &shared.api_proxy {
        let _ = std::fs::remove_dir_all(&api.sockets);
    }
    // The temporary root of the items' directories is the worker's own (a `--workdir` is the user's).
    if let (None, Some(dirs)) = (&config.workdir, &shared.workdirs) {
        let _ = std::fs::remove_dir(dirs.root());
    }
    let forced = *phase.borrow() == Phase::Forced;
    report.info(&format!("worker stopped: {}", report.totals()), &[]);
    report.finish();
    claimed?;
    if forced {
        return Err(Error::Forced);
    }
    let exits = std::mem::take(&mut *shared.exits.lock().unwrap_or_else(|e| e.into_inner()));
    Ok(Summary {
        claimed: shared.took_any.load(std::sync::atomic::Ordering::Relaxed),
        exits,
    })
}

/// `<hostname>-<12 random hex digits>`: stable for the life of the process, unique across processes.
fn default_worker_id() -> String {
    let host = hostname::get()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_default();
    let host: String = host
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_') {
                c
            } else {
                '-'
            }
        })
        .take(200)
        .collect();
    let host = if host.is_empty() {
        "worker".to_owned()
    } else {
        host
    };
    format!("{host}-{:012x}", rand::random::<u64>() & 0xffff_ffff_ffff)
}

/// D-24: 1 to 256 printable ASCII characters.
fn check_worker_id(id: &str) -> Result<String> {
    if id.is_empty() || id.len() > 256 || !id.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        return Err(Error::config(
            "--worker-id / TETHER_WORKER_ID must be 1 to 256 printable ASCII characters",
        ));
    }
    Ok(id.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worker_ids_are_checked_and_defaulted() {
        let id = default_worker_id();
        let (host, suffix) = id.rsplit_once('-').unwrap();
        assert!(!host.is_empty());
        assert_eq!(suffix.len(), 12);
        assert!(suffix.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_ne!(default_worker_id(), id);
        assert!(check_worker_id(&id).is_ok());
        assert!(check_worker_id("").is_err());
        assert!(check_worker_id(&"w".repeat(257)).is_err());
        assert!(check_worker_id("tab\there").is_err());
    }
}

//! `tether worker`: runs the sessions of one environment on this machine (§8). It claims work items with
//! an environment key and runs PROGRAM once per item, in a process group of its own, with the item's
//! session token as the program's only credential.
//!
//! * [`claim`]: the long-poll loop, its backoff and the refusals that end the worker;
//! * [`supervisor`]: one item from ack to stop;
//! * [`heartbeat`]: one item's lease;
//! * [`program`]: the child process;
//! * [`shutdown`]: signals and draining;
//! * [`status`]: log lines and the live status line.

mod backoff;
mod claim;
mod deadman;
mod heartbeat;
mod program;
mod shutdown;
mod status;
mod supervisor;
mod workdir;

use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use tether_client::Client;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::serve::LogFormat;
use program::{Exit, Output, Program};
use status::{Activity, Reporter};
use workdir::Workdirs;

/// `tether worker [run-one] … -- PROGRAM`.
#[derive(Debug)]
pub struct WorkerCommand {
    mode: Option<Mode>,
    args: Option<WorkerArgs>,
}

// By hand rather than derived: a derived `Option<WorkerArgs>` counts a value from the environment
// (TETHER_KEY, …) as the flags being given, and then wants all of them even when `run-one` is used.
impl clap::FromArgMatches for WorkerCommand {
    fn from_arg_matches(matches: &clap::ArgMatches) -> Result<Self, clap::Error> {
        match matches.subcommand() {
            Some(_) => Ok(WorkerCommand {
                mode: Some(Mode::from_arg_matches(matches)?),
                args: None,
            }),
            None => Ok(WorkerCommand {
                mode: None,
                args: Some(WorkerArgs::from_arg_matches(matches)?),
            }),
        }
    }

    fn update_from_arg_matches(&mut self, matches: &clap::ArgMatches) -> Result<(), clap::Error> {
        *self = Self::from_arg_matches(matches)?;
        Ok(())
    }
}

impl clap::Args for WorkerCommand {
    fn augment_args(cmd: clap::Command) -> clap::Command {
        use clap::Subcommand as _;
        Mode::augment_subcommands(WorkerArgs::augment_args(cmd))
            .subcommand_negates_reqs(true)
            .args_conflicts_with_subcommands(true)
    }

    fn augment_args_for_update(cmd: clap::Command) -> clap::Command {
        Self::augment_args(cmd)
    }
}

#[derive(clap::Subcommand, Debug)]
enum Mode {
    /// Claim one item, run PROGRAM for it, and exit with PROGRAM's status (for cron and CI runners).
    /// With --max-idle, exit 0 when no item came within that time.
    RunOne(WorkerArgs),
}

/// Runs the worker; the exit code is PROGRAM's for `run-one`, else 0.
pub async fn main(command: WorkerCommand) -> Result<std::process::ExitCode> {
    match (command.mode, command.args) {
        (Some(Mode::RunOne(args)), _) => run_one(args).await,
        (None, Some(args)) => run(args).await.map(|()| std::process::ExitCode::SUCCESS),
        (None, None) => {
            bail!("tether worker needs --environment, --key and a PROGRAM (see --help)")
        }
    }
}

async fn run_one(mut args: WorkerArgs) -> Result<std::process::ExitCode> {
    args.concurrency = 1;
    args.run_one = true;
    let exits = Arc::new(std::sync::Mutex::new(Vec::new()));
    let claimed = run_with(args, exits.clone()).await?;
    let exit = exits
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .first()
        .copied();
    match (claimed, exit) {
        (false, _) => Ok(std::process::ExitCode::SUCCESS),
        (true, Some(exit)) => Ok(std::process::ExitCode::from(
            u8::try_from(exit.shell_code()).unwrap_or(1),
        )),
        (true, None) => bail!("the item ended without PROGRAM running to its end (see the log)"),
    }
}

#[derive(Args, Debug)]
#[command(after_help = "\
PROGRAM runs once per work item, in its own process group, with TETHER_API_URL, TETHER_WORK_ID, \
TETHER_ENVIRONMENT_ID, TETHER_SESSION_ID, TETHER_SESSION_TOKEN and TETHER_WORKER_ID (and \
TETHER_CA_CERT with --ca-cert) in its environment and the work item as JSON on stdin. Its exit status is recorded in the item's metadata \
(tether.exit_code, tether.signal) and the item is stopped. When the server asks for a stop, PROGRAM \
gets SIGTERM, then SIGKILL after --grace.

Example:
  tether worker --server http://127.0.0.1:4780 --environment env_… --key tth_env_… -- ./agent.sh")]
pub struct WorkerArgs {
    /// URL of the Tether server.
    #[arg(long, env = "TETHER_SERVER", default_value = "http://127.0.0.1:4780")]
    server: String,
    /// Also trust the certificate authorities in this PEM file (for a server whose certificate a
    /// private CA signed); handed on to PROGRAM as TETHER_CA_CERT.
    #[arg(long, env = "TETHER_CA_CERT", value_name = "PEM")]
    ca_cert: Option<PathBuf>,
    /// The environment whose work to run (env_…).
    #[arg(long, env = "TETHER_ENVIRONMENT")]
    environment: String,
    /// The environment's key (tth_env_…, from `tether env key create`).
    #[arg(long, env = "TETHER_KEY", hide_env_values = true)]
    key: String,
    /// Identity sent on poll, ack and heartbeat [default: <hostname>-<12 random hex digits>].
    #[arg(long, env = "TETHER_WORKER_ID")]
    worker_id: Option<String>,
    /// Items run at the same time.
    #[arg(long, env = "TETHER_CONCURRENCY", default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..=1024))]
    concurrency: u32,
    /// Lease to ask for, in seconds (the server clamps it) [default: the server's].
    #[arg(long, env = "TETHER_TTL", value_parser = clap::value_parser!(u32).range(1..))]
    ttl: Option<u32>,
    /// Time PROGRAM gets between SIGTERM and SIGKILL (e.g. 30, 30s, 500ms, 2m).
    #[arg(long, env = "TETHER_GRACE", default_value = "30s", value_parser = parse_duration)]
    grace: Duration,
    /// After SIGTERM/SIGINT, how long running programs may take to finish before they are terminated.
    #[arg(long, env = "TETHER_DRAIN_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    drain_timeout: Duration,
    /// Write each item's output to <DIR>/<work_id>.log instead of the worker's log.
    #[arg(long, env = "TETHER_LOG_DIR", value_name = "DIR")]
    log_dir: Option<PathBuf>,
    /// Log format.
    #[arg(long, env = "TETHER_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Run each item in a fresh directory <DIR>/<work_id> (PROGRAM's working directory, also in
    /// TETHER_WORKDIR), removed when the item is done.
    #[arg(long, env = "TETHER_WORKDIR", value_name = "DIR")]
    workdir: Option<PathBuf>,
    /// Keep each item's --workdir directory instead of removing it.
    #[arg(long, env = "TETHER_KEEP_WORKDIR", requires = "workdir")]
    keep_workdir: bool,
    /// Exit 0 after this long without work (no item claimed or running), e.g. 5m.
    #[arg(long, env = "TETHER_MAX_IDLE", value_parser = parse_duration)]
    max_idle: Option<Duration>,
    /// Set by `run-one`.
    #[arg(skip)]
    run_one: bool,
    /// The program to run for each item, and its arguments.
    #[arg(last = true, required = true, value_name = "PROGRAM")]
    program: Vec<OsString>,
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
pub struct Shared {
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
    pub exits: Arc<std::sync::Mutex<Vec<Exit>>>,
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

pub async fn run(args: WorkerArgs) -> Result<()> {
    run_with(args, Arc::default()).await.map(|_| ())
}

/// Runs the worker to its end; `Ok(true)` when it claimed at least one item.
async fn run_with(args: WorkerArgs, exits: Arc<std::sync::Mutex<Vec<Exit>>>) -> Result<bool> {
    // Everything that cannot work is found out before the first claim.
    let program = Program::resolve(&args.program)?;
    let worker_id = match args.worker_id {
        Some(id) => check_worker_id(id.trim())?,
        None => default_worker_id(),
    };
    let key = args.key.trim().to_owned();
    if key.is_empty() {
        bail!("--key / TETHER_KEY is empty: pass the environment key from `tether env key create`");
    }
    // Absolute, so that PROGRAM finds it from whatever directory it runs in.
    let ca_cert = match &args.ca_cert {
        Some(path) => Some(
            std::path::absolute(path)
                .with_context(|| format!("invalid --ca-cert {}", path.display()))?,
        ),
        None => None,
    };
    let mut builder = Client::builder(args.server.clone())
        .token(key)
        .user_agent(format!("tether-worker/{}", env!("CARGO_PKG_VERSION")));
    if let Some(path) = &ca_cert {
        builder = builder.ca_cert_file(path);
    }
    let client = builder.build().with_context(|| {
        format!(
            "invalid --server / TETHER_SERVER {:?} or --ca-cert",
            args.server
        )
    })?;
    let concurrency = args.concurrency as usize;
    crate::serve::init_logging_to(args.log_format, status::LogWriter);
    let report = Reporter::new(args.log_format, concurrency);
    let output = match &args.log_dir {
        Some(dir) => {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create --log-dir {}", dir.display()))?;
            Output::Dir(dir.clone())
        }
        None => Output::Log(report.clone()),
    };
    let workdirs = match &args.workdir {
        Some(root) => Some(Workdirs::new(root.clone(), args.keep_workdir)?),
        None => None,
    };
    let (phase_tx, phase) = watch::channel(Phase::Running);
    let phase_tx = Arc::new(phase_tx);
    let signals = shutdown::watch_signals(phase_tx.clone(), report.clone(), args.drain_timeout)?;
    report.info(
        "worker started",
        &[
            ("worker_id", &worker_id),
            ("environment_id", &args.environment),
            ("server", client.api_base_url()),
            ("program", &program.display()),
            ("concurrency", &concurrency.to_string()),
        ],
    );
    let shared = Arc::new(Shared {
        client,
        environment_id: args.environment,
        ca_cert,
        worker_id,
        program,
        output,
        desired_ttl: args.ttl,
        grace: args.grace,
        report: report.clone(),
        phase: phase.clone(),
        workdirs,
        max_idle: args.max_idle,
        run_one: args.run_one,
        exits,
    });
    let mut tasks = JoinSet::new();
    let claimed = claim::run(shared.clone(), concurrency, &mut tasks).await;
    let any_claimed = matches!(claimed, Ok(n) if n > 0);
    let claimed = claimed.map(|_| ());
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
            report.error(&format!("{e:#}"), &[]);
        }
    }
    shutdown::drain(&mut tasks, &phase_tx, args.drain_timeout, &report).await;
    signals.abort();
    let forced = *phase.borrow() == Phase::Forced;
    report.info(&format!("worker stopped: {}", report.totals()), &[]);
    report.finish();
    claimed?;
    if forced {
        bail!("forced shutdown: programs were killed and their items force-stopped");
    }
    Ok(any_claimed)
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
        bail!("--worker-id / TETHER_WORKER_ID must be 1 to 256 printable ASCII characters");
    }
    Ok(id.to_owned())
}

/// Seconds (`30`, `1.5`), or a number with a unit: `500ms`, `30s`, `2m`.
pub(crate) fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, scale) = if let Some(n) = text.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = text.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = text.strip_suffix('m') {
        (n, 60.0)
    } else {
        (text, 1.0)
    };
    let value: f64 = number
        .trim()
        .parse()
        .map_err(|_| format!("{text:?} is not a duration (e.g. 30, 30s, 500ms, 2m)"))?;
    if !value.is_finite() || value < 0.0 {
        return Err(format!(
            "{text:?} is not a duration (e.g. 30, 30s, 500ms, 2m)"
        ));
    }
    Duration::try_from_secs_f64(value * scale).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_with_or_without_units() {
        assert_eq!(parse_duration("30"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("1.5"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
        assert!(parse_duration("-1").is_err());
        assert!(parse_duration("soon").is_err());
    }

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

//! `tether worker`: the command line of the worker. The runtime itself is the `tether-worker` crate;
//! this module turns flags and environment variables into its `Config` and installs the log.

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Result};
use clap::Args;
use tether_worker::{Config, Summary};

use crate::serve::LogFormat;

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
    /// With --max-idle, exit 0 when no item came within that time (1 when the server answered no
    /// poll in it).
    RunOne(WorkerArgs),
}

/// Runs the worker; the exit code is PROGRAM's for `run-one`, else 0. On an error `main` exits 78
/// when only the operator can fix it ([`tether_worker::Error::needs_the_operator`]), else 1.
pub async fn main(command: WorkerCommand) -> Result<std::process::ExitCode> {
    match (command.mode, command.args) {
        (Some(Mode::RunOne(args)), _) => run_one(args).await,
        (None, Some(args)) => run_with(args)
            .await
            .map(|_| std::process::ExitCode::SUCCESS),
        (None, None) => {
            bail!("tether worker needs --environment, --key and a PROGRAM (see --help)")
        }
    }
}

async fn run_one(mut args: WorkerArgs) -> Result<std::process::ExitCode> {
    args.concurrency = 1;
    args.run_one = true;
    let summary = run_with(args).await?;
    match (summary.claimed, summary.exits.first().copied()) {
        (false, _) => Ok(std::process::ExitCode::SUCCESS),
        (true, Some(exit)) => Ok(std::process::ExitCode::from(
            u8::try_from(exit.shell_code()).unwrap_or(1),
        )),
        (true, None) => Err(tether_worker::Error::NotRun.into()),
    }
}

#[derive(Args, Debug)]
#[command(after_help = "\
PROGRAM runs once per work item, in its own process group, with TETHER_API_URL, TETHER_WORK_ID, \
TETHER_ENVIRONMENT_ID, TETHER_SESSION_ID, TETHER_SESSION_TOKEN and TETHER_WORKER_ID (and \
TETHER_CA_CERT with --ca-cert) in its environment and the work item as JSON on stdin. Its exit status is recorded in the item's metadata \
(tether.exit_code, tether.signal, and tether.exit_reason when a --sandbox cap ended it) and the item is stopped. When the server asks for a stop, PROGRAM \
gets SIGTERM, then SIGKILL after --grace.

The worker exits 78 (EX_CONFIG) when only its operator can fix what ended it (its flags, its PROGRAM, \
a revoked key): for systemd, RestartPreventExitStatus=78. Other errors exit 1.

TETHER_LOG sets what is logged: a level (trace, debug, info, warn, error, off; default info) or tracing \
directives (info,tether=debug).

Example (the key in TETHER_KEY: a --key on the command line is visible to every local user):
  TETHER_KEY=tth_env_… tether worker --server http://127.0.0.1:4780 --environment env_… -- ./agent.sh")]
pub struct WorkerArgs {
    /// URL of the Tether server.
    #[arg(long, env = "TETHER_SERVER", default_value = "http://127.0.0.1:4780")]
    server: String,
    /// Also trust the certificate authorities in this PEM file (for a server whose certificate a
    /// private CA signed); handed on to PROGRAM as TETHER_CA_CERT.
    #[arg(long, env = "TETHER_CA_CERT", value_name = "PEM")]
    ca_cert: Option<PathBuf>,
    /// The environment whose work to run (env_…).
    #[arg(long, env = "TETHER_ENVIRONMENT", value_parser = clap::builder::NonEmptyStringValueParser::new())]
    environment: String,
    /// The environment's key (tth_env_…, from `tether env key create`). Prefer TETHER_KEY: a command
    /// line is visible to every user of the machine.
    #[arg(long, env = "TETHER_KEY", hide_env_values = true, value_parser = clap::builder::NonEmptyStringValueParser::new())]
    key: String,
    /// Identity sent on poll, ack and heartbeat [default: <hostname>-<12 random hex digits>].
    #[arg(long, env = "TETHER_WORKER_ID")]
    worker_id: Option<String>,
    /// Items run at the same time (`run-one` runs one, whatever this says).
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
    #[arg(long, env = "TETHER_KEEP_WORKDIR", action = clap::ArgAction::SetTrue,
          value_parser = clap::builder::BoolishValueParser::new())]
    keep_workdir: bool,
    /// Exit 0 after this long without work (no item claimed or running), e.g. 5m; exit 1 instead
    /// when the server answered no poll in that time.
    #[arg(long, env = "TETHER_MAX_IDLE", value_parser = parse_duration)]
    max_idle: Option<Duration>,
    /// Run each item's PROGRAM confined (bubblewrap): read-only system, its own directory the only
    /// writable place, home and other items hidden, own PID namespace. Refuses to start where the
    /// kernel cannot do it.
    #[arg(long, env = "TETHER_SANDBOX", action = clap::ArgAction::SetTrue,
          value_parser = clap::builder::BoolishValueParser::new())]
    sandbox: bool,
    /// What a sandboxed PROGRAM may reach: full (the host's network), api (only the Tether API,
    /// through the worker's proxy: TETHER_API_URL is http://127.0.0.1:4780/… inside) or none
    /// [default: full].
    #[arg(long, env = "TETHER_SANDBOX_NETWORK", value_enum)]
    sandbox_network: Option<SandboxNetwork>,
    /// Memory cap of a sandboxed PROGRAM, e.g. 512M, 2G: a cgroup (v2 where delegated, else v1)
    /// where the worker may create one, else RLIMIT_AS. The start-up line says which.
    #[arg(long, env = "TETHER_SANDBOX_MEMORY", value_parser = tether_worker::sandbox::parse_size)]
    sandbox_memory: Option<u64>,
    /// Process cap of a sandboxed PROGRAM: a pids cgroup where the worker may create one, else
    /// RLIMIT_NPROC (refused for a worker running as root, to which the kernel does not apply it).
    #[arg(long, env = "TETHER_SANDBOX_PIDS", value_parser = clap::value_parser!(u32).range(1..))]
    sandbox_pids: Option<u32>,
    /// Make PATH visible inside the sandbox, writable, or read-only with :ro (repeatable; in
    /// TETHER_SANDBOX_BIND, one).
    #[arg(long, env = "TETHER_SANDBOX_BIND", value_name = "PATH[:ro]")]
    sandbox_bind: Vec<tether_worker::Bind>,
    /// Set by `run-one`.
    #[arg(skip)]
    run_one: bool,
    /// The program to run for each item, and its arguments.
    #[arg(last = true, required = true, value_name = "PROGRAM")]
    program: Vec<OsString>,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum SandboxNetwork {
    Full,
    Api,
    None,
}

impl From<LogFormat> for tether_worker::LogFormat {
    fn from(format: LogFormat) -> Self {
        match format {
            LogFormat::Text => tether_worker::LogFormat::Text,
            LogFormat::Json => tether_worker::LogFormat::Json,
        }
    }
}

/// Flags that mean something only beside another, checked here rather than with clap's `requires`:
/// clap counts a variable set to false (`TETHER_SANDBOX=0`) as the flag given, so
/// `TETHER_SANDBOX=0 … --sandbox-memory 1G` ran the programs unconfined without a word, and
/// `TETHER_KEEP_WORKDIR=0` without `--workdir` was refused.
pub fn usage_error(command: &WorkerCommand) -> Option<(&'static [&'static str], String)> {
    let (path, args): (&'static [&'static str], _) = match (&command.mode, &command.args) {
        (Some(Mode::RunOne(args)), _) => (&["worker", "run-one"], args),
        (None, Some(args)) => (&["worker"], args),
        (None, None) => return None,
    };
    args.flags_without_their_base()
        .map(|message| (path, message))
}

impl WorkerArgs {
    fn flags_without_their_base(&self) -> Option<String> {
        if self.keep_workdir && self.workdir.is_none() {
            return Some("--keep-workdir (TETHER_KEEP_WORKDIR) needs --workdir".to_owned());
        }
        let sandbox_flags = [
            ("--sandbox-network", self.sandbox_network.is_some()),
            ("--sandbox-memory", self.sandbox_memory.is_some()),
            ("--sandbox-pids", self.sandbox_pids.is_some()),
            ("--sandbox-bind", !self.sandbox_bind.is_empty()),
        ];
        let given: Vec<&str> = sandbox_flags
            .iter()
            .filter(|(_, given)| *given)
            .map(|(flag, _)| *flag)
            .collect();
        let (flags, variables, need) = match given.as_slice() {
            [] => return None,
            [one] => (one.to_string(), "its TETHER_SANDBOX_* variable", "needs"),
            [first @ .., last] => (
                format!("{} and {last}", first.join(", ")),
                "their TETHER_SANDBOX_* variables",
                "need",
            ),
        };
        (!self.sandbox).then(|| {
            format!(
                "{flags} (or {variables}) {need} --sandbox, which is off: without it PROGRAM \
                 would run unconfined"
            )
        })
    }

    fn into_config(self) -> Config {
        Config {
            server: self.server,
            ca_cert: self.ca_cert,
            environment: self.environment,
            key: self.key,
            worker_id: self.worker_id,
            concurrency: self.concurrency,
            ttl: self.ttl,
            grace: self.grace,
            drain_timeout: self.drain_timeout,
            log_dir: self.log_dir,
            log_format: self.log_format.into(),
            workdir: self.workdir,
            keep_workdir: self.keep_workdir,
            max_idle: self.max_idle,
            run_one: self.run_one,
            program: self.program,
            // This binary answers `program-guard`; `/proc/self/exe` still names it if it has been
            // replaced on disk since the worker started.
            guard: cfg!(target_os = "linux").then(|| "/proc/self/exe".into()),
            sandbox: self.sandbox.then_some(tether_worker::SandboxConfig {
                network: match self.sandbox_network.unwrap_or(SandboxNetwork::Full) {
                    SandboxNetwork::Full => tether_worker::Network::Full,
                    SandboxNetwork::Api => tether_worker::Network::Api,
                    SandboxNetwork::None => tether_worker::Network::None,
                },
                memory: self.sandbox_memory,
                pids: self.sandbox_pids,
                binds: self.sandbox_bind,
            }),
        }
    }
}

/// Runs the worker, its log lines in the shape of `serve`'s (above the status line on a terminal).
async fn run_with(args: WorkerArgs) -> Result<Summary> {
    crate::serve::init_logging_to(args.log_format, tether_worker::LogWriter);
    Ok(tether_worker::run(args.into_config()).await?)
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
    use clap::FromArgMatches as _;

    use super::*;

    #[test]
    fn the_help_passes_the_key_in_the_environment() {
        let mut command = WorkerArgs::augment_args(clap::Command::new("worker"));
        let help = command.render_long_help().to_string();
        assert!(
            help.contains("TETHER_KEY=tth_env_… tether worker"),
            "{help}"
        );
        assert!(!help.contains("--key tth_env_"), "{help}");
    }

    /// The README promises a variable for every flag, so that a worker can be configured from its
    /// unit's environment alone.
    #[test]
    fn every_flag_has_an_environment_variable() {
        let command = WorkerArgs::augment_args(clap::Command::new("worker"));
        let without: Vec<_> = command
            .get_arguments()
            .filter(|a| a.get_long().is_some() && a.get_env().is_none())
            .map(|a| a.get_id().to_string())
            .filter(|id| id != "help")
            .collect();
        assert_eq!(without, Vec::<String>::new());
    }

    /// Switches set from a unit's environment take the spellings people write there.
    #[test]
    fn switches_from_the_environment_take_1_yes_and_on() {
        // A variable of this test's own (an argument reads its variable when it is named), so that
        // no other test sees it.
        const VARIABLE: &str = "TETHER_TEST_SANDBOX_SWITCH";
        let parse = |value: &str| {
            std::env::set_var(VARIABLE, value);
            let command = WorkerArgs::augment_args(clap::Command::new("worker"))
                .mut_arg("sandbox", |a| a.env(VARIABLE));
            std::env::remove_var(VARIABLE);
            command
                .try_get_matches_from(["worker", "--environment", "e", "--key", "k", "--", "p"])
                .map(|m| m.get_flag("sandbox"))
        };
        for on in ["1", "yes", "on", "true", "TRUE", "y"] {
            assert_eq!(parse(on).ok(), Some(true), "{on}");
        }
        for off in ["0", "no", "off", "false", "n"] {
            assert_eq!(parse(off).ok(), Some(false), "{off}");
        }
        assert!(parse("maybe").is_err());
    }

    /// A switch set to false in the environment is off: the flags that need it are refused, not
    /// ignored, and the one it would need is not asked for.
    #[test]
    fn a_switch_off_in_the_environment_is_not_a_flag_given() {
        // Variables of this test's own, as above.
        const SANDBOX: &str = "TETHER_TEST_SANDBOX_OFF";
        const KEEP: &str = "TETHER_TEST_KEEP_WORKDIR_OFF";
        std::env::set_var(SANDBOX, "0");
        std::env::set_var(KEEP, "no");
        let command = WorkerArgs::augment_args(clap::Command::new("worker"))
            .mut_arg("sandbox", |a| a.env(SANDBOX))
            .mut_arg("keep_workdir", |a| a.env(KEEP));
        std::env::remove_var(SANDBOX);
        std::env::remove_var(KEEP);
        let refusal = |flags: &[&str]| {
            let base = ["worker", "--environment", "e", "--key", "k"];
            let matches = command
                .clone()
                .try_get_matches_from([&base[..], flags, &["--", "p"]].concat())
                .expect("parses");
            WorkerArgs::from_arg_matches(&matches)
                .expect("arguments")
                .flags_without_their_base()
        };
        assert_eq!(refusal(&[]), None);
        assert_eq!(refusal(&["--sandbox", "--sandbox-memory", "1G"]), None);
        assert_eq!(refusal(&["--workdir", "/w", "--keep-workdir"]), None);
        let memory = refusal(&["--sandbox-memory", "1G"]).expect("refused");
        assert!(
            memory
                .starts_with("--sandbox-memory (or its TETHER_SANDBOX_* variable) needs --sandbox"),
            "{memory}"
        );
        let several = refusal(&["--sandbox-pids", "4", "--sandbox-bind", "/tmp"]).expect("refused");
        assert!(
            several.starts_with("--sandbox-pids and --sandbox-bind (or their"),
            "{several}"
        );
        let keep = refusal(&["--keep-workdir"]).expect("refused");
        assert!(keep.contains("needs --workdir"), "{keep}");
    }

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
}

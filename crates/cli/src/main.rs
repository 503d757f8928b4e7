//! `tether`: the server, the worker and the admin CLI in one binary.

mod admin;
mod install;
mod serve;
mod worker;

use std::process::ExitCode;

use clap::{CommandFactory as _, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "tether",
    version,
    about = "A control plane for running AI-agent sessions on your own machines"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the HTTP server.
    Serve(serve::ServeArgs),
    /// Run the sessions of an environment on this machine: PROGRAM once per work item.
    Worker(Box<worker::WorkerCommand>),
    #[command(flatten)]
    Admin(admin::AdminCommand),
    /// Print a shell completion script (bash, zsh or fish) to standard output.
    Completions {
        #[arg(value_enum)]
        shell: install::Shell,
    },
    /// Write the man pages (tether.1 and one per subcommand) into DIR.
    Man {
        #[arg(value_name = "DIR")]
        dir: std::path::PathBuf,
    },
    /// Inside a sandbox under `--sandbox-network api`: forward LISTEN to SOCKET, then exec PROGRAM.
    #[command(name = tether_worker::forward::SUBCOMMAND, hide = true)]
    SandboxForward {
        #[arg(long)]
        listen: std::net::SocketAddr,
        #[arg(long)]
        socket: std::path::PathBuf,
        #[arg(last = true, required = true)]
        program: Vec<std::ffi::OsString>,
    },
    /// Between the worker and an unconfined program: runs PROGRAM (path, argv[0], arguments) and kills
    /// its whole process group if the worker dies.
    #[command(name = tether_worker::guard::SUBCOMMAND, hide = true)]
    ProgramGuard {
        /// The worker's process id.
        #[arg(long)]
        worker: u32,
        #[arg(last = true, required = true)]
        program: Vec<std::ffi::OsString>,
    },
}

/// See the workspace manifest for why.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    // Before the arguments are read (clap reads each variable as it builds the command), and while
    // this is the only thread.
    for name in empty_settings(std::env::vars_os()) {
        std::env::remove_var(name);
    }
    let cli = Cli::try_parse().unwrap_or_else(|error| with_plain_usage(error).exit());
    let usage_error = match &cli.command {
        Command::Admin(admin) => admin::usage_error(admin),
        Command::Worker(worker) => worker::usage_error(worker),
        _ => None,
    };
    if let Some((path, message)) = usage_error {
        let mut command = Cli::command();
        command.build();
        let subcommand = path.iter().fold(&mut command, |command, name| {
            command
                .find_subcommand_mut(name)
                .expect("usage_error names a subcommand that exists")
        });
        subcommand
            .error(clap::error::ErrorKind::MissingRequiredArgument, message)
            .exit();
    }
    match &cli.command {
        Command::Completions { shell } => {
            return match install::completions(*shell, Cli::command(), &mut std::io::stdout()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            };
        }
        Command::Man { dir } => {
            return match install::man_pages(Cli::command(), dir) {
                Ok(n) => {
                    eprintln!("wrote {n} man pages to {}", dir.display());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::FAILURE
                }
            };
        }
        Command::SandboxForward {
            listen,
            socket,
            program,
        } => {
            // Before any thread exists: it forks.
            let error = tether_worker::forward::main(*listen, socket.clone(), program.clone());
            eprintln!("error: {error}");
            return ExitCode::from(127);
        }
        Command::ProgramGuard { worker, program } => {
            // Before any thread exists: it installs signal handlers and waits for its child.
            let error = tether_worker::guard::main(*worker, program.clone());
            eprintln!("error: {error}");
            return ExitCode::from(127);
        }
        _ => {}
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let result = runtime.block_on(async {
        match cli.command {
            Command::Serve(args) => serve::run(args).await.map(|()| ExitCode::SUCCESS),
            Command::Worker(command) => worker::main(*command).await,
            Command::Admin(command) => admin::run(command).await.map(|()| ExitCode::SUCCESS),
            Command::Completions { .. }
            | Command::Man { .. }
            | Command::SandboxForward { .. }
            | Command::ProgramGuard { .. } => unreachable!("answered above"),
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            // The message may carry a server's words (an error envelope's): shown escaped.
            let message = admin::output::printable(&format!("{e:#}"), &['\n']);
            last_words(format!("error: {message}"));
            std::process::ExitCode::FAILURE
        }
    }
}

/// A usage error with the usage of its command as `--help` shows it. clap's own names the arguments
/// that were given as if they were required, and counts as given those read from the environment:
/// with TETHER_SERVER set, a missing `--name` of `tether env create` showed
/// `Usage: tether env create --name <NAME> --server <SERVER>`.
fn with_plain_usage(mut error: clap::Error) -> clap::Error {
    use clap::error::{ContextKind, ContextValue};
    let Some(ContextValue::StyledStr(usage)) = error.get(ContextKind::Usage) else {
        return error;
    };
    // `Usage: tether env create …`: the command's path is the words before the first argument.
    let usage = usage.to_string();
    let path: Vec<&str> = usage
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(2)
        .take_while(|word| !word.starts_with(['-', '<', '[']))
        .collect();
    let mut root = Cli::command();
    root.build();
    let mut command = &root;
    for name in path {
        match command.find_subcommand(name) {
            Some(subcommand) => command = subcommand,
            None => break,
        }
    }
    let plain = command.clone().render_usage();
    error.insert(ContextKind::Usage, ContextValue::StyledStr(plain));
    error
}

/// The `TETHER_*` variables set to nothing. Each counts as unset, as if its line were not there: a
/// systemd `EnvironmentFile` line or a shell `export` with no value must neither hand an empty id on
/// (`TETHER_ENVIRONMENT=`) nor make a flag with a default fail (`TETHER_DATA_DIR=`).
fn empty_settings(
    variables: impl IntoIterator<Item = (std::ffi::OsString, std::ffi::OsString)>,
) -> Vec<std::ffi::OsString> {
    variables
        .into_iter()
        .filter(|(name, value)| value.is_empty() && name.as_encoded_bytes().starts_with(b"TETHER_"))
        .map(|(name, _)| name)
        .collect()
}

/// Prints the line a failed command ends with, waiting for standard error at most a second. A
/// worker's standard error may be a pipe nobody reads, and the worker's own log thread may be
/// blocked writing to it, holding its lock: the worker must end all the same, without that line.
fn last_words(line: String) {
    let (printed, wait) = std::sync::mpsc::channel();
    let spawned = std::thread::Builder::new()
        .name("last-words".into())
        .spawn(move || {
            eprintln!("{line}");
            let _ = printed.send(());
        });
    if spawned.is_ok() {
        let _ = wait.recv_timeout(std::time::Duration::from_secs(1));
    }
}

#[cfg(test)]
mod tests {
    use std::ffi::OsString;

    use clap::Parser as _;

    /// The usage shown with an error names the required arguments, not the ones that were given.
    #[test]
    fn usage_errors_show_only_what_is_required() {
        for (args, usage) in [
            (
                &["tether", "env", "create", "--server", "http://h:1"][..],
                "Usage: tether env create [OPTIONS] --name <NAME>\n",
            ),
            (
                &[
                    "tether",
                    "serve",
                    "--tls-cert",
                    "x",
                    "--listen",
                    "127.0.0.1:1",
                ][..],
                "Usage: tether serve [OPTIONS]\n",
            ),
        ] {
            let Err(error) = super::Cli::try_parse_from(args) else {
                panic!("{args:?} parsed")
            };
            let shown = super::with_plain_usage(error).render().to_string();
            assert!(shown.contains(usage), "{args:?}: {shown}");
        }
    }

    #[test]
    fn only_empty_tether_variables_count_as_unset() {
        let variables = [
            ("TETHER_ENVIRONMENT", ""),
            ("TETHER_DATA_DIR", ""),
            ("TETHER_SERVER", "http://127.0.0.1:4780"),
            ("HOME", ""),
        ]
        .map(|(name, value)| (OsString::from(name), OsString::from(value)));
        assert_eq!(
            super::empty_settings(variables),
            ["TETHER_ENVIRONMENT", "TETHER_DATA_DIR"].map(OsString::from)
        );
    }
}

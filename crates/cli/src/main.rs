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
        /// The shell the script is for.
        #[arg(value_enum)]
        shell: install::Shell,
    },
    /// Write the man pages (tether.1 and one per subcommand) into DIR.
    Man {
        /// Where the pages go (made if missing), e.g. /usr/local/share/man/man1.
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

/// An admin command whose reader went away (`tether session list --json | head -1`) ends as any
/// Unix filter does, by SIGPIPE, quietly and with the shell's usual status: Rust ignores the
/// signal, and every `print!` would panic at the broken pipe instead. Only for the admin commands,
/// which write their answers to standard output; their network writes are not signalled (sockets
/// are written with `MSG_NOSIGNAL`). The server and the worker keep ignoring it.
fn end_quietly_on_closed_stdout() {
    use nix::sys::signal::{signal, SigHandler, Signal};
    // SAFETY: restores the default disposition, with no handler to run; before any other thread.
    let restored = unsafe { signal(Signal::SIGPIPE, SigHandler::SigDfl) };
    debug_assert!(restored.is_ok(), "SIGPIPE is a valid signal");
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
    let cli = Cli::try_parse().unwrap_or_else(|error| {
        let names_the_worker = std::env::args_os()
            .nth(1)
            .is_some_and(|arg| arg == "worker");
        exit_for_usage(with_plain_usage(error), names_the_worker)
    });
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
        let error = subcommand.error(clap::error::ErrorKind::MissingRequiredArgument, message);
        exit_for_usage(error, matches!(cli.command, Command::Worker(_)));
    }
    if let Command::Admin(_) = &cli.command {
        end_quietly_on_closed_stdout();
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
            let needs_the_operator = e
                .downcast_ref::<tether_worker::Error>()
                .is_some_and(tether_worker::Error::needs_the_operator);
            if needs_the_operator {
                std::process::ExitCode::from(tether_worker::EXIT_NEEDS_THE_OPERATOR)
            } else {
                std::process::ExitCode::FAILURE
            }
        }
    }
}

/// A usage error with the usage of its command as `--help` shows it. clap's own names the arguments
/// that were given as if they were required, and counts as given those read from the environment:
/// with TETHER_SERVER set, a missing `--name` of `tether env create` showed
/// `Usage: tether env create --name <NAME> --server <SERVER>`.
/// Ends the process for a command line that cannot run, as clap does (2; 0 for `--help` and
/// `--version`), but for the worker (`tether worker`, `tether worker run-one`): 78 (`EX_CONFIG`),
/// as for every other refusal only its operator can fix, so that a service manager told not to
/// start it again on 78 does not start it again for ever with the same flags.
fn exit_for_usage(error: clap::Error, worker: bool) -> ! {
    if worker && error.use_stderr() {
        let _ = error.print();
        std::process::exit(tether_worker::EXIT_NEEDS_THE_OPERATOR.into());
    }
    error.exit()
}

fn with_plain_usage(mut error: clap::Error) -> clap::Error {
    use clap::error::{ContextKind, ContextValue};
    let mut root = Cli::command();
    root.build();
    let with_tip = |mut error: clap::Error, tip: Option<String>| {
        if let Some(tip) = tip {
            let tip = ContextValue::StyledStrs(vec![tip.into()]);
            error.insert(ContextKind::Suggested, tip);
        }
        error
    };
    // A wrong value's error carries no usage line to tell its command by.
    let tip = variable_value_tip(&error, &root, |name| std::env::var_os(name));
    error = with_tip(error, tip);
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
    let mut command = &root;
    for name in path {
        match command.find_subcommand(name) {
            Some(subcommand) => command = subcommand,
            None => break,
        }
    }
    let plain = command.clone().render_usage();
    error.insert(ContextKind::Usage, ContextValue::StyledStr(plain));
    let tip = program_after_dashes_tip(&error, command)
        .or_else(|| missing_variables_tip(&error, command));
    with_tip(error, tip)
}

/// For `TETHER_TTL=abc tether worker …`: clap names the flag whose value is wrong, and a user who
/// never typed that flag looks for it on the command line. The error does not say which command
/// it is about, so the flag is looked for in every command under `root`; `variable` reads the
/// environment.
fn variable_value_tip(
    error: &clap::Error,
    root: &clap::Command,
    variable: impl Fn(&std::ffi::OsStr) -> Option<std::ffi::OsString>,
) -> Option<String> {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    if !matches!(
        error.kind(),
        ErrorKind::ValueValidation | ErrorKind::InvalidValue
    ) {
        return None;
    }
    let (Some(ContextValue::String(flag)), Some(ContextValue::String(value))) = (
        error.get(ContextKind::InvalidArg),
        error.get(ContextKind::InvalidValue),
    ) else {
        return None;
    };
    let (long, mut names) = variables_of(root, flag)?;
    let name = names
        .find(|name| variable(name).is_some_and(|set| set.to_str() == Some(value.as_str())))?;
    Some(format!(
        "'{value}' is the value of {}, which sets --{long}",
        name.to_string_lossy()
    ))
}

/// For `tether worker` without `--key`: the README passes the key as `TETHER_KEY`, and clap's list
/// of missing flags does not say that a variable would do. `command` is the one the error is about.
fn missing_variables_tip(error: &clap::Error, command: &clap::Command) -> Option<String> {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    if error.kind() != ErrorKind::MissingRequiredArgument {
        return None;
    }
    let Some(ContextValue::Strings(missing)) = error.get(ContextKind::InvalidArg) else {
        return None;
    };
    let variables: Vec<String> = missing
        .iter()
        .filter_map(|flag| {
            let (long, mut names) = variables_of(command, flag)?;
            Some(format!("--{long} as {}", names.next()?.to_string_lossy()))
        })
        .collect();
    (!variables.is_empty()).then(|| {
        format!(
            "may be given in the environment instead: {}",
            variables.join(", ")
        )
    })
}

/// For a flag as clap's errors name it (`--key <KEY>`): its long name, and the variables that set it
/// in `root` and the commands under it (one flag name may be another command's too).
fn variables_of<'a>(
    root: &'a clap::Command,
    flag: &'a str,
) -> Option<(&'a str, impl Iterator<Item = &'a std::ffi::OsStr>)> {
    let long = flag.split_whitespace().next()?.strip_prefix("--")?;
    let names = commands_under(root)
        .flat_map(|command| command.get_arguments())
        .filter(move |arg| arg.get_long() == Some(long))
        .filter_map(|arg| arg.get_env());
    Some((long, names))
}

/// `command` and every command under it.
fn commands_under(command: &clap::Command) -> Box<dyn Iterator<Item = &clap::Command> + '_> {
    Box::new(std::iter::once(command).chain(command.get_subcommands().flat_map(commands_under)))
}

/// For `tether worker ./run.sh`: the command runs a program given after `--` (so that the program's
/// own options are never taken for the worker's), and clap's "unexpected argument" alone does not
/// say so.
fn program_after_dashes_tip(error: &clap::Error, command: &clap::Command) -> Option<String> {
    use clap::error::{ContextKind, ContextValue};
    if error.kind() != clap::error::ErrorKind::UnknownArgument {
        return None;
    }
    let Some(ContextValue::String(unexpected)) = error.get(ContextKind::InvalidArg) else {
        return None;
    };
    let program = command.get_positionals().find(|arg| arg.is_last_set())?;
    if unexpected.starts_with('-') {
        return None;
    }
    let name = program
        .get_value_names()
        .and_then(|names| names.first())
        .map_or_else(
            || program.get_id().to_string().to_uppercase(),
            |n| n.to_string(),
        );
    Some(format!(
        "{name} and its arguments go after `--`: {} [OPTIONS] -- {unexpected} …",
        command.get_bin_name().unwrap_or(command.get_name())
    ))
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

    /// Every argument says in `--help` what it is: a bare `<ID>` leaves the reader to guess
    /// whose.
    #[test]
    fn every_positional_argument_is_described() {
        fn undescribed(command: &clap::Command, path: &str, out: &mut Vec<String>) {
            for arg in command.get_positionals() {
                if arg.get_help().is_none() && !arg.is_hide_set() {
                    out.push(format!("{path} <{}>", arg.get_id()));
                }
            }
            for sub in command.get_subcommands().filter(|sub| !sub.is_hide_set()) {
                undescribed(sub, &format!("{path} {}", sub.get_name()), out);
            }
        }
        let mut missing = Vec::new();
        let mut cli = <super::Cli as clap::CommandFactory>::command();
        cli.build();
        undescribed(&cli, "tether", &mut missing);
        assert!(missing.is_empty(), "{missing:#?}");
    }

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

    /// A program given without `--` is explained; an option clap does not know is not.
    #[test]
    fn a_program_without_dashes_is_told_where_it_goes() {
        let shown = |args: &[&str]| {
            let Err(error) = super::Cli::try_parse_from(args) else {
                panic!("{args:?} parsed")
            };
            super::with_plain_usage(error).render().to_string()
        };
        let worker = shown(&["tether", "worker", "--environment", "e", "./run.sh", "-v"]);
        assert!(
            worker.contains("tip: PROGRAM and its arguments go after `--`: tether worker [OPTIONS] -- ./run.sh …"),
            "{worker}"
        );
        let run_one = shown(&["tether", "worker", "run-one", "./run.sh"]);
        assert!(
            run_one.contains("go after `--`: tether worker run-one [OPTIONS] -- ./run.sh …"),
            "{run_one}"
        );
        let option = shown(&["tether", "worker", "--no-such-flag"]);
        assert!(!option.contains("go after `--`"), "{option}");
        let elsewhere = shown(&["tether", "env", "list", "stray"]);
        assert!(!elsewhere.contains("go after `--`"), "{elsewhere}");
    }

    /// A wrong value that came from a variable names the variable.
    #[test]
    fn a_wrong_value_from_a_variable_names_it() {
        let tip = |args: &[&str], set: (&str, &str)| {
            let Err(error) = super::Cli::try_parse_from(args) else {
                panic!("{args:?} parsed")
            };
            let mut root = <super::Cli as clap::CommandFactory>::command();
            root.build();
            super::variable_value_tip(&error, &root, |name| (name == set.0).then(|| set.1.into()))
        };
        let worker = [
            "tether",
            "worker",
            "--environment",
            "e",
            "--ttl",
            "abc",
            "--",
            "x",
        ];
        assert_eq!(
            tip(&worker, ("TETHER_TTL", "abc")).as_deref(),
            Some("'abc' is the value of TETHER_TTL, which sets --ttl")
        );
        // The variable holds something else: the value was typed.
        assert_eq!(tip(&worker, ("TETHER_TTL", "60")), None);
        assert_eq!(tip(&worker, ("TETHER_GRACE", "abc")), None);
    }

    /// Missing flags that a variable may give are named with it.
    #[test]
    fn missing_flags_name_their_variables() {
        let mut root = <super::Cli as clap::CommandFactory>::command();
        root.build();
        // Parsed as if no variable were set, whatever this runner's environment holds (a
        // developer's TETHER_KEY, say).
        fn without_variables(command: clap::Command) -> clap::Command {
            command
                .mut_args(|arg| arg.env(None))
                .mut_subcommands(without_variables)
        }
        let parser = without_variables(root.clone());
        let tip = |args: &[&str]| {
            let Err(error) = parser.clone().try_get_matches_from(args) else {
                panic!("{args:?} parsed")
            };
            let worker = root.find_subcommand("worker").expect("worker");
            super::missing_variables_tip(&error, worker)
        };
        assert_eq!(
            tip(&["tether", "worker", "--", "./x"]).as_deref(),
            Some(
                "may be given in the environment instead: --environment as TETHER_ENVIRONMENT, \
                 --key as TETHER_KEY"
            )
        );
        assert_eq!(
            tip(&["tether", "worker", "--environment", "e", "--", "./x"]).as_deref(),
            Some("may be given in the environment instead: --key as TETHER_KEY")
        );
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

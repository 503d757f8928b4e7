//! The per-item child process: finding PROGRAM, starting it in a process group of its own with the item's
//! identifiers and credential in its environment and the work item on stdin, routing its output, and
//! signalling the whole group so that nothing it started outlives it (nor the worker: see
//! [`crate::guard`]).

use std::ffi::OsString;
use std::fs::OpenOptions;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};
use tokio::task::JoinHandle;

use crate::limits::ItemGroups;
use crate::proxy::ApiProxy;
use crate::sandbox::Sandbox;
use crate::status::Reporter;
use crate::{Error, Result};

/// Environment variables of the worker that its programs must not see: the program's credential is its
/// item's session token, scoped to that item, not the key the worker claims with (`TETHER_KEY`) nor
/// an admin token (`TETHER_TOKEN`, the CLI's). Nor the server's secrets, which a machine that runs
/// `tether serve` beside its worker may have exported for both (the admin token, the database's
/// URL with its password, the metrics token).
const WITHHELD: [&str; 5] = [
    "TETHER_KEY",
    "TETHER_TOKEN",
    "TETHER_ADMIN_TOKEN",
    "TETHER_DATABASE_URL",
    "TETHER_METRICS_TOKEN",
];

/// PROGRAM and its arguments, resolved once at start-up.
#[derive(Clone, Debug)]
pub struct Program {
    /// As given on the command line (the child's `argv[0]`).
    pub name: OsString,
    pub path: PathBuf,
    pub args: Vec<OsString>,
    /// Runs it when it is not sandboxed: see [`crate::Config::guard`].
    pub guard: Option<PathBuf>,
}

impl Program {
    /// Finds PROGRAM the way a shell would (a name without `/` is looked up in `PATH`) and checks that it
    /// is an executable file. Failing here is fatal for the whole worker: claiming work it cannot run would
    /// only bounce every item. The path is made absolute against the worker's directory, where it was
    /// checked: an item runs in a directory of its own (`--workdir`) or a sandbox, where `./agent.sh`
    /// would name another file, or none.
    pub fn resolve(argv: &[OsString]) -> Result<Program> {
        let Some((name, args)) = argv.split_first() else {
            return Err(Error::config(
                "no PROGRAM given: put the command to run per item after `--`",
            ));
        };
        let shown = name.to_string_lossy();
        let path = if name.as_encoded_bytes().contains(&b'/') {
            let path = PathBuf::from(name);
            check_executable(&path)
                .map_err(|why| Error::config(format!("cannot run PROGRAM {shown}: {why}")))?;
            path
        } else {
            find_in_path(name).ok_or_else(|| {
                // A name without `/` is looked up in PATH only, as a shell does, which
                // surprises most with a script in the current directory.
                let here = match Path::new(name).is_file() {
                    true => {
                        format!(" (a file of that name is here: to run it, write ./{shown})")
                    }
                    false => String::new(),
                };
                Error::config(format!(
                    "cannot run PROGRAM {shown}: no executable of that name in PATH{here}"
                ))
            })?
        };
        let path = std::path::absolute(&path)
            .map_err(|e| Error::config(format!("cannot run PROGRAM {shown}: {e}")))?;
        check_interpreter(&path)
            .map_err(|why| Error::config(format!("cannot run PROGRAM {shown}: {why}")))?;
        Ok(Program {
            name: name.clone(),
            path,
            args: args.to_vec(),
            guard: None,
        })
    }

    /// Whether the file is still there to run, as it was at start-up: a file, executable, and
    /// for a script, its interpreter there too.
    pub fn runnable(&self) -> std::result::Result<(), String> {
        check_executable(&self.path)?;
        check_interpreter(&self.path)
    }

    pub fn display(&self) -> String {
        let mut out = self.name.to_string_lossy().into_owned();
        for arg in &self.args {
            out.push(' ');
            out.push_str(&arg.to_string_lossy());
        }
        out
    }
}

fn check_executable(path: &Path) -> std::result::Result<(), String> {
    let meta = std::fs::metadata(path).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => "no such file".to_owned(),
        _ => e.to_string(),
    })?;
    if !meta.is_file() {
        return Err("not a file".into());
    }
    if meta.permissions().mode() & 0o111 == 0 {
        return Err("not executable (chmod +x?)".into());
    }
    Ok(())
}

/// How much of a file the kernel reads for its `#!` line (Linux's `BINPRM_BUF_SIZE`).
const SHEBANG_READ: usize = 256;

/// A script's `#!` line names the program the kernel runs it with. A script whose interpreter is
/// missing starts and fails at once on every run (exit 127, the kernel's "no such file"), which
/// would end every item's session turn: such a PROGRAM cannot run, as a missing file cannot.
///
/// Read as Linux reads it: the interpreter runs to the first space or tab, and the rest of the line
/// is one argument. A line that ends in a carriage return (a script saved with CRLF line endings)
/// is refused: the return stays on its last word, the interpreter (`/bin/sh\r`, missing) or its
/// argument (`env`'s `bash\r`). The interpreter must be an executable file. With
/// `#!/usr/bin/env NAME`, NAME is looked up as `env` would, in `PATH` (glibc's `/bin:/usr/bin`
/// without one), when it is one plain word; an argument `env` would parse (options, `-S`
/// strings, `VAR=value`) is left to it, so that nothing that runs is refused. A file that cannot be
/// read (execute-only) is left to the kernel. A file without a `#!` line must be a binary: an
/// empty file, or one of text, is refused.
fn check_interpreter(path: &Path) -> std::result::Result<(), String> {
    use std::io::Read as _;
    use std::os::unix::ffi::OsStrExt as _;
    let mut head = [0u8; SHEBANG_READ];
    let Ok(read) = std::fs::File::open(path).and_then(|mut file| file.read(&mut head)) else {
        return Ok(());
    };
    let head = &head[..read];
    let Some(line) = head.strip_prefix(b"#!") else {
        // No interpreter: the kernel runs only a binary (an ELF file, or one a binfmt handler
        // takes, which text is not). A shell would run a text file with `sh`; `execve` answers
        // "exec format error", every time.
        // A zero byte marks a binary (an ELF header has several in its first bytes).
        let text = !head.contains(&0);
        return match head.is_empty() || text {
            true => Err(
                "it has no #! line naming its interpreter, so the kernel cannot run it (exec \
                 format error): make its first line one, such as #!/bin/sh"
                    .into(),
            ),
            false => Ok(()),
        };
    };
    let line = line.split(|&b| b == b'\n').next().unwrap_or_default();
    let is_blank = |b: &u8| *b == b' ' || *b == b'\t';
    let line = &line[line.iter().position(|b| !is_blank(b)).unwrap_or(line.len())..];
    // The kernel trims spaces and tabs only: a carriage return stays on the line's last word,
    // whether that is the interpreter (`#!/bin/sh\r`) or what `env` is to find (`bash\r`).
    let line = &line[..line
        .iter()
        .rposition(|b| !is_blank(b))
        .map_or(0, |end| end + 1)];
    if line.ends_with(b"\r") {
        let last = line.rsplit(is_blank).next().unwrap_or(line);
        return Err(format!(
            "its #! line, which names its interpreter, ends in a carriage return (CRLF line \
             endings), so its last word is read as {:?}, carriage return and all: save it with LF \
             line endings",
            String::from_utf8_lossy(last)
        ));
    }
    let interpreter_end = line.iter().position(is_blank).unwrap_or(line.len());
    let (interpreter, rest) = line.split_at(interpreter_end);
    if interpreter.is_empty() {
        return Err("its #! line names no interpreter".into());
    }
    let shown = String::from_utf8_lossy(interpreter);
    let interpreter = Path::new(std::ffi::OsStr::from_bytes(interpreter));
    if let Err(why) = check_executable(interpreter) {
        return Err(format!("its interpreter {shown} (its #! line): {why}"));
    }
    if interpreter.file_name() != Some(std::ffi::OsStr::new("env")) {
        return Ok(());
    }
    let argument = rest.trim_ascii();
    let plain_word = !argument.is_empty()
        && !argument.starts_with(b"-")
        && !argument.iter().any(|b| is_blank(b) || *b == b'=');
    if !plain_word {
        return Ok(());
    }
    let command = Path::new(std::ffi::OsStr::from_bytes(argument));
    let shown = String::from_utf8_lossy(argument);
    if argument.contains(&b'/') {
        return check_executable(command)
            .map_err(|why| format!("its interpreter {shown} (its #! line, through env): {why}"));
    }
    match find_in_path(command) {
        Some(_) => Ok(()),
        None => Err(format!(
            "its interpreter {shown} (its #! line, through env) is not in PATH"
        )),
    }
}

/// The executable file `name` (without a `/`) names, looked up in `PATH` as `execvp` looks it up:
/// the first directory that has one; without `PATH`, glibc's `/bin:/usr/bin`.
pub(crate) fn find_in_path(name: impl AsRef<std::ffi::OsStr>) -> Option<PathBuf> {
    let search = std::env::var_os("PATH").unwrap_or_else(|| "/bin:/usr/bin".into());
    std::env::split_paths(&search)
        .map(|dir| dir.join(name.as_ref()))
        .find(|candidate| check_executable(candidate).is_ok())
}

/// Where a program's stdout and stderr go.
#[derive(Clone)]
pub enum Output {
    /// The worker's log, line by line, prefixed with the work id.
    Log(Reporter),
    /// `<dir>/<work_id>.log`, appended to.
    Dir(PathBuf),
}

/// How a program ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Exit {
    pub code: Option<i32>,
    pub signal: Option<i32>,
    /// The sandbox's cap that ended it (`memory_limit`, `pids_limit`), when the kernel says so.
    pub reason: Option<&'static str>,
}

impl Exit {
    fn from_status(status: ExitStatus) -> Exit {
        use std::os::unix::process::ExitStatusExt;
        Exit {
            code: status.code(),
            signal: status.signal(),
            reason: None,
        }
    }

    pub fn success(&self) -> bool {
        self.code == Some(0)
    }

    /// The exit code a shell would report: the code, or 128 + the signal number.
    pub fn shell_code(&self) -> i32 {
        match (self.code, self.signal) {
            (Some(code), _) => code,
            (None, Some(signal)) => 128 + signal,
            (None, None) => -1,
        }
    }

    pub fn signal_name(&self) -> Option<String> {
        self.signal.map(|n| match Signal::try_from(n) {
            Ok(s) => s.as_str().to_owned(),
            Err(_) => format!("signal {n}"),
        })
    }

    pub fn describe(&self) -> String {
        match (self.code, self.signal_name()) {
            (Some(code), _) => format!("exit code {code}"),
            (None, Some(name)) => format!("killed by {name}"),
            (None, None) => "unknown exit status".to_owned(),
        }
    }
}

/// What a sandboxed program gets besides its command: its cgroups and its API proxy, both held (and
/// the groups emptied) until the program is reaped.
pub struct Confined<'a> {
    pub sandbox: &'a Sandbox,
    pub groups: ItemGroups,
    pub proxy: Option<ApiProxy>,
}

/// A started program, in a process group of its own.
pub struct Running {
    child: Child,
    group: Pid,
    /// The process the worker started, leader of the group: the program's guard ([`crate::guard`]) on
    /// Linux, bwrap for a sandboxed program, else the program itself.
    pub pid: u32,
    readers: Vec<JoinHandle<()>>,
    reaped: bool,
    cgroups: Option<ItemGroups>,
    proxy: Option<ApiProxy>,
    /// The dead man's switch of the program's lease ([`crate::deadman`]), disarmed once the program
    /// and its group are killed.
    dead_man: Option<crate::deadman::Guard>,
}

impl Running {
    /// Hands the program its lease's dead man's switch, to hold until it is killed.
    pub fn arm(&mut self, dead_man: Option<crate::deadman::Guard>) {
        self.dead_man = dead_man;
    }

    /// Starts `program` for `work_id` with `env` added to the worker's environment (minus [`WITHHELD`])
    /// and `stdin` written to its standard input. With a `sandbox`, the program runs confined in
    /// `cwd` (then required) with `env` as its whole environment, and `read_only` visible.
    #[allow(clippy::too_many_arguments)]
    pub fn spawn(
        program: &Program,
        work_id: &str,
        env: &[(&str, String)],
        stdin: Vec<u8>,
        output: &Output,
        cwd: Option<&std::path::Path>,
        confined: Option<Confined<'_>>,
        read_only: &[&Path],
    ) -> io::Result<Running> {
        let mut cgroups = None;
        let mut proxy = None;
        // A sandbox (bwrap) dies outright with the worker, and its PID namespace with it; an
        // unconfined program's guard is told, and takes the program's whole group with it.
        let death_signal = match (&confined, &program.guard) {
            (None, Some(_)) => Signal::SIGHUP,
            _ => Signal::SIGKILL,
        };
        let mut command = match (confined, cwd) {
            (Some(confined), Some(dir)) => {
                let mut command = confined.sandbox.command(
                    &program.path,
                    &program.args,
                    dir,
                    env,
                    read_only,
                    confined.proxy.as_ref().map(|p| p.socket()),
                );
                confined_session(&mut command, confined.groups.procs_files());
                cgroups = Some(confined.groups);
                proxy = confined.proxy;
                command
            }
            (Some(_), None) => {
                return Err(io::Error::other(
                    "a sandboxed program needs a working directory of its own",
                ))
            }
            (None, _) => {
                let mut command = guarded(program);
                if let Some(dir) = cwd {
                    command.current_dir(dir);
                }
                // Its own group: one signal reaches everything it starts, and a Ctrl-C at the
                // worker's terminal reaches the worker only, which then decides what the programs
                // get.
                command.process_group(0);
                for name in WITHHELD {
                    command.env_remove(name);
                }
                for (k, v) in env {
                    command.env(k, v);
                }
                command
            }
        };
        command.stdin(Stdio::piped()).kill_on_drop(true);
        match output {
            Output::Log(_) => {
                command.stdout(Stdio::piped()).stderr(Stdio::piped());
            }
            Output::Dir(dir) => {
                let file = OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(dir.join(format!("{work_id}.log")))?;
                command.stdout(file.try_clone()?).stderr(file);
            }
        }
        die_with_the_worker(&mut command, death_signal);
        let mut child = command.spawn()?;
        let pid = child
            .id()
            .ok_or_else(|| io::Error::other("the program exited at once"))?;
        let mut readers = Vec::new();
        if let Output::Log(report) = output {
            if let Some(out) = child.stdout.take() {
                readers.push(forward(out, report.clone(), work_id.to_owned(), "stdout"));
            }
            if let Some(err) = child.stderr.take() {
                readers.push(forward(err, report.clone(), work_id.to_owned(), "stderr"));
            }
        }
        if let Some(mut pipe) = child.stdin.take() {
            // A program that never reads its stdin must not stall the worker on a full pipe.
            tokio::spawn(async move {
                let _ = pipe.write_all(&stdin).await;
                let _ = pipe.shutdown().await;
            });
        }
        Ok(Running {
            child,
            group: Pid::from_raw(pid as i32),
            pid,
            readers,
            reaped: false,
            cgroups,
            proxy,
            dead_man: None,
        })
    }

    /// Sends `signal` to the program's whole process group.
    pub fn signal(&self, signal: Signal) {
        if !self.reaped {
            let _ = killpg(self.group, signal);
        }
    }

    /// Waits for the program to exit. Whatever it left behind in its group (and its cgroups) is killed
    /// then, and its output is given a moment to drain into the log.
    pub async fn wait(&mut self) -> Exit {
        let status = self.child.wait().await;
        if !self.reaped {
            // The group outlives its leader while anything started in it is still running.
            let _ = killpg(self.group, Signal::SIGKILL);
            self.reaped = true;
        }
        // Read before the groups go: their counters say whether a cap ended the program.
        let reason = self.cgroups.as_ref().and_then(ItemGroups::exit_reason);
        if let Some(mut groups) = self.cgroups.take() {
            // Emptying may wait a moment for the last processes to die: off the runtime's threads.
            let _ = tokio::task::spawn_blocking(move || groups.remove()).await;
        }
        // The program and its group are killed: the switch has nothing left to guard. Disarmed
        // before the wait for its output below, which a process that left the group can keep open
        // for the full second per reader; past the lease's deadline the switch would end the whole
        // worker, and every other item's program with it.
        self.dead_man = None;
        self.proxy = None;
        for reader in self.readers.drain(..) {
            let _ = tokio::time::timeout(Duration::from_secs(1), reader).await;
        }
        match status {
            Ok(status) => Exit {
                reason,
                ..Exit::from_status(status)
            },
            Err(_) => Exit {
                code: None,
                signal: None,
                reason,
            },
        }
    }

    /// SIGKILL to the group at once, then reap.
    pub async fn kill(&mut self) -> Exit {
        self.signal(Signal::SIGKILL);
        self.wait().await
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        // A supervisor that is torn down before it reaped its program must not leave the group behind.
        if !self.reaped {
            let _ = killpg(self.group, Signal::SIGKILL);
        }
    }
}

/// The command that runs an unconfined `program`: through its guard ([`crate::guard`]) when there is
/// one, else the program itself.
fn guarded(program: &Program) -> Command {
    match &program.guard {
        Some(guard) => {
            let mut command = Command::new(guard);
            command
                .arg(crate::guard::SUBCOMMAND)
                .arg("--worker")
                .arg(std::process::id().to_string())
                .arg("--")
                .arg(&program.path)
                .arg(&program.name)
                .args(&program.args);
            command
        }
        None => {
            let mut command = Command::new(&program.path);
            command.arg0(&program.name).args(&program.args);
            command
        }
    }
}

/// On Linux the worker's child is also sent `signal` if the worker dies without a chance to clean up
/// (SIGKILL, a crash): SIGKILL for a sandbox, SIGHUP for an unconfined program's guard, which then
/// kills the program's whole group. So an item whose lease then expires is never run twice at once.
/// The death signal follows the thread that forked; tokio's runtime threads live as long as the
/// worker.
#[cfg(target_os = "linux")]
fn die_with_the_worker(command: &mut Command, signal: Signal) {
    let parent = std::process::id();
    // SAFETY: between fork and exec the closure makes two system calls and allocates nothing.
    unsafe {
        command.pre_exec(move || {
            nix::sys::prctl::set_pdeathsig(signal).map_err(io::Error::from)?;
            // The worker may have died before the call above took effect.
            if nix::unistd::getppid().as_raw() as u32 != parent {
                return Err(io::Error::other("the worker exited"));
            }
            Ok(())
        });
    }
}

#[cfg(not(target_os = "linux"))]
fn die_with_the_worker(_: &mut Command, _: Signal) {}

/// bwrap starts in a session of its own: leader of its own process group (signalled as a whole, like
/// an unconfined program's) and without the worker's controlling terminal, so that nothing inside can
/// push input into it. bwrap itself ignores SIGTERM and SIGINT, so that a stop's SIGTERM reaches the
/// program (which gets the default action back from `env --default-signal`) without killing bwrap,
/// and with it the whole sandbox, before the grace period.
///
/// It also joins the item's cgroups (`cgroups`, their `cgroup.procs` files) before it execs, so that
/// everything in the sandbox is counted and capped from its first instruction.
fn confined_session(command: &mut Command, cgroups: Vec<std::ffi::CString>) {
    use nix::sys::signal::{signal, SigHandler};
    // SAFETY: between fork and exec the closure makes only system calls (setsid, sigaction, open,
    // write) and allocates nothing: the paths were built before the fork.
    unsafe {
        command.pre_exec(move || {
            nix::unistd::setsid().map_err(io::Error::from)?;
            signal(Signal::SIGTERM, SigHandler::SigIgn).map_err(io::Error::from)?;
            signal(Signal::SIGINT, SigHandler::SigIgn).map_err(io::Error::from)?;
            crate::limits::join(&cgroups)?;
            Ok(())
        });
    }
}

/// The longest line of a program's output the worker logs as one; a longer one is logged in pieces
/// of this length. Output is read as it comes, so a program that never ends a line (or writes
/// `/dev/zero`) costs the worker this much memory, not as much as it printed.
pub const MAX_LOG_LINE: usize = 16 * 1024;

fn forward<R: AsyncRead + Unpin + Send + 'static>(
    stream: R,
    report: Reporter,
    work_id: String,
    name: &'static str,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        each_line(stream, MAX_LOG_LINE, |line| {
            let line = String::from_utf8_lossy(line);
            report.program_line(&work_id, name, line.trim_end_matches('\r'));
        })
        .await;
    })
}

/// Calls `line` with each line `stream` yields, without its `\n`, and with each `max` bytes of a line
/// longer than that; a last line without `\n` too. Stops at the end of the stream or at a read error.
async fn each_line<R: AsyncRead + Unpin>(stream: R, max: usize, mut line: impl FnMut(&[u8])) {
    assert!(max > 0);
    let mut reader = BufReader::new(stream);
    let mut pending: Vec<u8> = Vec::new();
    // A line cut at `max` whose `\n` comes right after the cut ends there, not with an empty line.
    let mut cut = false;
    loop {
        let available = match reader.fill_buf().await {
            Ok([]) | Err(_) => break,
            Ok(available) => available,
        };
        if std::mem::take(&mut cut) && available[0] == b'\n' {
            reader.consume(1);
            continue;
        }
        let room = &available[..available.len().min(max - pending.len())];
        let (taken, ended) = match room.iter().position(|&b| b == b'\n') {
            Some(at) => {
                pending.extend_from_slice(&room[..at]);
                (at + 1, true)
            }
            None => {
                pending.extend_from_slice(room);
                cut = pending.len() == max;
                (room.len(), cut)
            }
        };
        reader.consume(taken);
        if ended {
            line(&pending);
            pending.clear();
        }
        debug_assert!(pending.len() < max);
    }
    if !pending.is_empty() {
        line(&pending);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_names_in_path_and_refuses_what_cannot_run() {
        let sh = Program::resolve(&["sh".into(), "-c".into(), "true".into()]).unwrap();
        assert!(sh.path.is_absolute(), "{:?}", sh.path);
        assert_eq!(sh.display(), "sh -c true");
        let missing = Program::resolve(&["no-such-program-anywhere".into()]).unwrap_err();
        assert!(missing.to_string().contains("no executable"), "{missing}");
        assert!(!missing.to_string().contains("./"), "{missing}");
        // A script in the current directory, named as a shell would not find it.
        let here = std::env::current_dir().unwrap();
        let name = format!("resolve-test-{}.sh", std::process::id());
        std::fs::write(here.join(&name), "#!/bin/sh\n").unwrap();
        let err = Program::resolve(&[name.clone().into()])
            .unwrap_err()
            .to_string();
        std::fs::remove_file(here.join(&name)).unwrap();
        assert!(err.contains(&format!("write ./{name}")), "{err}");
        let dir = tempfile::tempdir().unwrap();
        let plain = dir.path().join("script");
        std::fs::write(&plain, "#!/bin/sh\n").unwrap();
        let err = Program::resolve(&[plain.clone().into()]).unwrap_err();
        assert!(err.to_string().contains("not executable"), "{err}");
        let err = Program::resolve(&[dir.path().join("nope").into()]).unwrap_err();
        assert!(err.to_string().contains("no such file"), "{err}");
        assert!(Program::resolve(&[]).is_err());
    }

    /// A script runs only where its `#!` line's interpreter does: one whose interpreter is missing
    /// is refused at start-up, and once it goes missing, the program can no longer run.
    #[test]
    fn a_script_whose_interpreter_is_missing_cannot_run() {
        let dir = tempfile::tempdir().unwrap();
        let script = |name: &str, text: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, text).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
            path
        };
        for (name, text) in [
            ("sh", "#!/bin/sh\ntrue\n"),
            ("sh-with-arg", "#! /bin/sh -e\ntrue\n"),
            ("env-sh", "#!/usr/bin/env sh\ntrue\n"),
            // What env parses itself is left to it, whatever it names.
            ("env-split", "#!/usr/bin/env -S LC_ALL=C sh -e\ntrue\n"),
            ("env-unset", "#!/usr/bin/env -S -u NAME sh\ntrue\n"),
            ("env-chdir", "#!/usr/bin/env -S -C /tmp sh\ntrue\n"),
            ("env-assign", "#!/usr/bin/env LC_ALL=C\ntrue\n"),
            ("crlf-body", "#!/bin/sh\ntrue\r\n"),
        ] {
            let path = script(name, text);
            let program = Program::resolve(&[path.into()]);
            assert!(program.is_ok(), "{name}: {:?}", program.err());
        }
        for (name, text, why) in [
            (
                "missing",
                "#!/no/such/interpreter\n",
                "/no/such/interpreter",
            ),
            ("empty", "#!\n", "names no interpreter"),
            ("blank", "#!  \t\n", "names no interpreter"),
            ("crlf", "#!/bin/sh\r\ntrue\r\n", "carriage return"),
            ("crlf-arg", "#!/bin/sh -e\r\ntrue\r\n", "carriage return"),
            ("env-crlf", "#!/usr/bin/env sh\r\ntrue\r\n", "\"sh\\r\""),
            (
                "env-missing",
                "#!/usr/bin/env no-such-interpreter-anywhere\n",
                "not in PATH",
            ),
            (
                "env-path",
                "#!/usr/bin/env /no/such/python\n",
                "/no/such/python",
            ),
            ("no-shebang", "echo no interpreter named\n", "#!/bin/sh"),
            ("empty-file", "", "#!/bin/sh"),
        ] {
            let path = script(name, text);
            let err = Program::resolve(&[path.into()]).unwrap_err().to_string();
            assert!(
                err.contains("interpreter") && err.contains(why),
                "{name}: {err}"
            );
        }
        // A binary without a #! line is the kernel's to judge (a real one runs).
        let binary = Program::resolve(&["sh".into()]).unwrap();
        assert_eq!(binary.runnable(), Ok(()));
        let path = script("not-elf", "\0\u{1}binary of some other format");
        assert!(Program::resolve(&[path.into()]).is_ok());
        // Taken away after start-up (a deploy that changed the #! line): it can no longer run.
        let path = script("later", "#!/bin/sh\ntrue\n");
        let program = Program::resolve(&[path.clone().into()]).unwrap();
        assert_eq!(program.runnable(), Ok(()));
        std::fs::write(&path, "#!/no/such/shell\ntrue\n").unwrap();
        let why = program.runnable().unwrap_err();
        assert!(why.contains("/no/such/shell"), "{why}");
    }

    #[tokio::test]
    async fn output_is_logged_line_by_line_and_a_long_line_in_pieces() {
        let lines = |text: &'static [u8], max: usize| async move {
            let mut got = Vec::new();
            each_line(text, max, |l| {
                got.push(String::from_utf8_lossy(l).into_owned())
            })
            .await;
            got
        };
        assert_eq!(lines(b"a\nbc\n\nd", 8).await, ["a", "bc", "", "d"]);
        assert_eq!(lines(b"abcdefgh\nij", 4).await, ["abcd", "efgh", "ij"]);
        assert_eq!(
            lines(b"abcdefghi\n\nj", 4).await,
            ["abcd", "efgh", "i", "", "j"]
        );
        assert_eq!(lines(b"", 4).await, Vec::<String>::new());
        // A stream that never ends a line is read in pieces, however long it is.
        let endless = tokio::io::repeat(b'z');
        let mut pieces = 0;
        let _ = tokio::time::timeout(
            Duration::from_millis(200),
            each_line(endless, 1024, |l| {
                assert_eq!(l.len(), 1024);
                pieces += 1;
            }),
        )
        .await;
        assert!(pieces > 0);
    }

    #[test]
    fn exit_statuses_read_as_a_shell_would() {
        let killed = Exit {
            code: None,
            signal: Some(9),
            reason: None,
        };
        assert_eq!(killed.shell_code(), 137);
        assert_eq!(killed.signal_name().as_deref(), Some("SIGKILL"));
        assert_eq!(killed.describe(), "killed by SIGKILL");
        let failed = Exit {
            code: Some(3),
            signal: None,
            reason: None,
        };
        assert!(!failed.success());
        assert_eq!(failed.describe(), "exit code 3");
    }
}

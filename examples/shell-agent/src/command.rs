//! Running one command: `sh -c TEXT` in its own process group, with its output (standard output and
//! standard error interleaved as the command wrote them) and its run time both bounded.

use std::collections::BTreeMap;
use std::future::Future;
use std::io::Read;
use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

/// How long to keep reading output after the command exited. Processes it left running in the
/// background may hold the output pipe open indefinitely; their later output is not waited for.
const OUTPUT_GRACE: Duration = Duration::from_secs(2);

/// Bounds of one run.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Kill the command after this long; `None` lets it run as long as it likes.
    pub timeout: Option<Duration>,
    /// Keep at most this many bytes of output.
    pub max_output: usize,
}

/// How a run ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ending {
    Exited(i32),
    Signalled(i32),
    TimedOut(Duration),
    /// Killed on request (an interrupt, or the agent shutting down).
    Stopped,
    FailedToStart(String),
}

/// A finished run.
#[derive(Clone, Debug)]
pub struct Outcome {
    pub ending: Ending,
    /// The output, cut to the limit, with a note saying so when it was cut.
    pub output: String,
}

impl Outcome {
    pub fn is_error(&self) -> bool {
        self.ending != Ending::Exited(0)
    }

    /// One sentence for people.
    pub fn summary(&self) -> String {
        match &self.ending {
            Ending::Exited(code) => format!("Command finished with exit status {code}."),
            Ending::Signalled(signal) => {
                let name = Signal::try_from(*signal)
                    .map(|s| s.as_str().to_owned())
                    .unwrap_or_else(|_| format!("signal {signal}"));
                format!("Command was killed by {name}.")
            }
            Ending::TimedOut(limit) => format!(
                "Command was still running after {} s, the limit, and was killed.",
                limit.as_secs_f64()
            ),
            Ending::Stopped => "Command was interrupted and killed.".to_owned(),
            Ending::FailedToStart(e) => format!("Could not start `sh`: {e}."),
        }
    }
}

/// What the output reader has seen so far.
#[derive(Default)]
struct Collected {
    kept: Vec<u8>,
    total: u64,
    finished: bool,
}

/// Runs `sh -c text` in `cwd` with `env` added to the agent's own environment (minus its session
/// token, which the command has no use for), until it exits, runs out of time, or `stop` resolves.
pub async fn run(
    text: &str,
    cwd: &Path,
    env: &BTreeMap<String, String>,
    limits: Limits,
    stop: impl Future<Output = ()>,
) -> Outcome {
    let failed = |e: std::io::Error| Outcome {
        ending: Ending::FailedToStart(e.to_string()),
        output: String::new(),
    };
    // One pipe for both streams keeps their lines in the order the command wrote them.
    let (reader, writer) = match std::io::pipe() {
        Ok(pipe) => pipe,
        Err(e) => return failed(e),
    };
    let err_writer = match writer.try_clone() {
        Ok(w) => w,
        Err(e) => return failed(e),
    };
    let mut command = tokio::process::Command::new("sh");
    command
        .arg("-c")
        .arg(text)
        .current_dir(cwd)
        .envs(env)
        .env_remove("TETHER_SESSION_TOKEN")
        .stdin(Stdio::null())
        .stdout(writer)
        .stderr(err_writer)
        // Its own process group, so that a timeout or an interrupt kills what it started too.
        .process_group(0)
        .kill_on_drop(true);
    let spawned = command.spawn();
    // The command object holds the parent's copies of the pipe's write end; while they live the
    // output never reaches its end.
    drop(command);
    let mut child = match spawned {
        Ok(child) => child,
        Err(e) => return failed(e),
    };
    let group = child.id().map(|id| Pid::from_raw(id as i32));

    let collected = Arc::new(Mutex::new(Collected::default()));
    let done = {
        let collected = collected.clone();
        let max = limits.max_output;
        tokio::task::spawn_blocking(move || collect(reader, max, &collected))
    };

    let kill = || {
        if let Some(group) = group {
            let _ = killpg(group, Signal::SIGKILL);
        }
    };
    let timeout = async {
        match limits.timeout {
            Some(limit) => tokio::time::sleep(limit).await,
            None => std::future::pending().await,
        }
    };
    let ending = tokio::select! {
        status = child.wait() => match status {
            Ok(status) => ending_of(status),
            Err(e) => Ending::FailedToStart(e.to_string()),
        },
        () = timeout => {
            kill();
            let _ = child.wait().await;
            Ending::TimedOut(limits.timeout.unwrap_or_default())
        }
        () = stop => {
            kill();
            let _ = child.wait().await;
            Ending::Stopped
        }
    };
    let _ = tokio::time::timeout(OUTPUT_GRACE, done).await;

    let collected = collected.lock().expect("output lock");
    let mut output = String::from_utf8_lossy(&collected.kept).into_owned();
    if collected.total > collected.kept.len() as u64 {
        output.push_str(&format!(
            "\n[output truncated: {} bytes in all, only the first {} are shown]",
            collected.total,
            collected.kept.len()
        ));
    }
    if !collected.finished {
        output.push_str("\n[processes the command left running still hold its output; their further output is not shown]");
    }
    Outcome { ending, output }
}

/// Reads the pipe to its end, keeping the first `max` bytes and counting the rest, so that a command
/// with endless output neither blocks on a full pipe nor fills the agent's memory.
fn collect(mut reader: std::io::PipeReader, max: usize, into: &Mutex<Collected>) {
    let mut buf = [0u8; 8192];
    loop {
        match reader.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let mut c = into.lock().expect("output lock");
                let room = max.saturating_sub(c.kept.len());
                c.kept.extend_from_slice(&buf[..n.min(room)]);
                c.total += n as u64;
            }
        }
    }
    into.lock().expect("output lock").finished = true;
}

fn ending_of(status: ExitStatus) -> Ending {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => Ending::Exited(code),
        (None, Some(signal)) => Ending::Signalled(signal),
        (None, None) => Ending::Exited(-1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max_output: usize) -> Limits {
        Limits {
            timeout: Some(Duration::from_secs(60)),
            max_output,
        }
    }

    async fn sh(text: &str, limits: Limits) -> Outcome {
        let cwd = std::env::current_dir().unwrap();
        run(text, &cwd, &BTreeMap::new(), limits, std::future::pending()).await
    }

    #[tokio::test]
    async fn both_streams_in_order_and_the_exit_status() {
        let out = sh("echo one; echo two >&2; echo three; exit 3", limits(1024)).await;
        assert_eq!(out.output, "one\ntwo\nthree\n");
        assert_eq!(out.ending, Ending::Exited(3));
        assert!(out.is_error());
    }

    #[tokio::test]
    async fn output_is_cut_with_a_note() {
        let out = sh("yes | head -c 100000", limits(10)).await;
        assert!(out.output.starts_with("y\ny\ny\ny\ny\n\n[output truncated: 100000 bytes in all, only the first 10 are shown]"), "{}", out.output);
        assert!(!out.is_error());
    }

    #[tokio::test]
    async fn a_stop_kills_the_whole_group() {
        let cwd = std::env::current_dir().unwrap();
        let out = run(
            "sleep 1000 & sleep 1000; echo never",
            &cwd,
            &BTreeMap::new(),
            limits(1024),
            async {},
        )
        .await;
        assert_eq!(out.ending, Ending::Stopped);
        assert!(!out.output.contains("never"));
        assert!(!out.output.contains("still hold"), "{}", out.output);
    }

    #[tokio::test]
    async fn a_timeout_kills_the_command() {
        let limit = Duration::from_millis(500);
        let out = sh(
            "sleep 1000",
            Limits {
                timeout: Some(limit),
                max_output: 1024,
            },
        )
        .await;
        assert_eq!(out.ending, Ending::TimedOut(limit));
        assert!(out.is_error());
    }

    #[tokio::test]
    async fn the_session_token_is_not_passed_on() {
        let cwd = std::env::current_dir().unwrap();
        let env = BTreeMap::from([
            ("GREETING".to_owned(), "hi".to_owned()),
            (
                "TETHER_SESSION_TOKEN".to_owned(),
                "tth_ses_secret".to_owned(),
            ),
        ]);
        let out = run(
            "echo \"$GREETING ${TETHER_SESSION_TOKEN:-none}\"",
            &cwd,
            &env,
            limits(1024),
            std::future::pending(),
        )
        .await;
        assert_eq!(out.output, "hi none\n");
    }
}

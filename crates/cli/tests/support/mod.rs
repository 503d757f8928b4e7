//! Running the real `tether` binary as a server process.

#![allow(dead_code)]

pub mod api;
pub mod http_proxy;
pub mod lines;
pub mod proxy;
pub mod seed;
pub mod worker;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

/// The `tether` binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_tether");

/// Variables that would otherwise leak from the caller's shell into the commands under test.
pub const AMBIENT: &[&str] = &[
    "TETHER_SERVER",
    "TETHER_TOKEN",
    "TETHER_DATA_DIR",
    "TETHER_LISTEN",
    "TETHER_DATABASE_URL",
    "TETHER_PUBLIC_URL",
    "TETHER_ADMIN_TOKEN",
    "TETHER_KEY",
    "TETHER_LOG",
    "TETHER_LOG_FORMAT",
    "TETHER_LOG_DIR",
    "TETHER_WORKDIR",
    "TETHER_MAX_IDLE",
    "NO_COLOR",
    "TETHER_ENVIRONMENT",
    "TETHER_WORKER_ID",
    "TETHER_CONCURRENCY",
    "TETHER_TTL",
    "TETHER_GRACE",
    "TETHER_DRAIN_TIMEOUT",
    "TETHER_AGENT_MAX_IDLE",
    "TETHER_AGENT_COMMAND_TIMEOUT",
    "TETHER_AGENT_MAX_OUTPUT",
    "TETHER_CA_CERT",
    "TETHER_TLS_CERT",
    "TETHER_TLS_KEY",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
];

/// The `tether` binary with none of [`AMBIENT`] inherited and no standard input.
pub fn tether_command() -> Command {
    let mut command = Command::new(BIN);
    for name in AMBIENT {
        command.env_remove(name);
    }
    command.stdin(Stdio::null());
    command
}

/// [`tether_command`] with `args`, run as the admin of `server` (`TETHER_SERVER`, `TETHER_TOKEN`).
pub fn tether_as_admin(server: &ServerProcess, args: &[&str]) -> Command {
    let mut command = tether_command();
    command
        .args(args)
        .env("TETHER_SERVER", &server.base)
        .env("TETHER_TOKEN", &server.token);
    command
}

/// A `tether serve` child process.
pub struct ServerProcess {
    pub child: Child,
    pub base: String,
    pub token: String,
}

pub const ADMIN_TOKEN: &str = "tth_adm_test-admin-token-for-integration-tests";

impl ServerProcess {
    /// Starts `tether serve` on a free port with `data_dir` and extra arguments; waits until it listens.
    pub fn start(data_dir: &Path, extra: &[&str]) -> ServerProcess {
        ServerProcess::start_logging(data_dir, extra, "warn", |_| {})
    }

    /// [`ServerProcess::start`] with `TETHER_LOG=level`, handing each line the server logs to `on_line`
    /// (on a thread of its own, for as long as the server runs).
    pub fn start_logging(
        data_dir: &Path,
        extra: &[&str],
        level: &str,
        mut on_line: impl FnMut(String) + Send + 'static,
    ) -> ServerProcess {
        let mut child = tether_command()
            .arg("serve")
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--data-dir")
            .arg(data_dir)
            .args(extra)
            .env("TETHER_ADMIN_TOKEN", ADMIN_TOKEN)
            .env("TETHER_LOG", level)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn tether serve");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut sent = false;
            // Reads to the end, so that the child never blocks on a full pipe.
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if !sent {
                    if let Some(rest) = line.split("tether listening on ").nth(1) {
                        let url = rest
                            .split_whitespace()
                            .next()
                            .unwrap_or_default()
                            .to_owned();
                        let _ = tx.send(url);
                        sent = true;
                    }
                }
                on_line(line);
            }
        });
        let base = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("server did not report its address");
        ServerProcess {
            child,
            base,
            token: ADMIN_TOKEN.to_owned(),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}/api/v1/cloud{path}", self.base)
    }

    /// A `GET` of `path` (on the `/api/v1/cloud` prefix) with the admin token, sent through `http`.
    pub fn admin_get(&self, http: &reqwest::Client, path: &str) -> reqwest::RequestBuilder {
        http.get(self.url(path)).bearer_auth(&self.token)
    }

    /// SIGKILL: no chance to flush or clean up.
    pub fn kill_hard(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM and wait for a clean exit.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = self.child.id() as i32;
        unsafe_kill(pid, 15);
        self.child.wait().expect("wait")
    }
}

fn unsafe_kill(pid: i32, signal: i32) {
    let _ = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status();
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The JSON that `tether {args}` printed; panics with its stderr if it failed, or with its stdout if
/// that is not JSON.
pub fn json_output(args: &[&str], out: &Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "tether {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "tether {args:?} printed no JSON ({e}):\n{}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// Waits (at most `patience`) until the `tether serve` whose standard error goes to `log` says where it
/// listens, and returns that URL.
pub fn listening_url_in(log: &Path, patience: Duration) -> String {
    let deadline = std::time::Instant::now() + patience;
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if let Some(url) = listening_url(&text) {
            return url;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "tether serve did not start:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The URL a server's log says it listens at: the `tether listening on URL` line of a text log, or
/// the `url` of the `tether is listening` event of a JSON one.
pub fn listening_url(log: &str) -> Option<String> {
    if let Some(rest) = log.split("tether listening on ").nth(1) {
        return rest.split_whitespace().next().map(str::to_owned);
    }
    log.lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .find(|event| event["fields"]["message"] == "tether is listening")
        .and_then(|event| event["fields"]["url"].as_str().map(str::to_owned))
}

/// `tether serve` on a loopback port with its store in `<dir>/data` and its standard error in
/// `<dir>/server.log`; killed on drop.
pub struct LoggedServer {
    pub child: Child,
    pub url: String,
    pub dir: std::path::PathBuf,
    pub admin_token: &'static str,
}

impl LoggedServer {
    /// Starts `tether serve --listen 127.0.0.1:0 --data-dir <dir>/data ARGS…` with `env` and
    /// `admin_token`, and waits (at most `patience`) until it listens.
    pub fn spawn(
        dir: &Path,
        admin_token: &'static str,
        args: &[&str],
        env: &[(&str, &str)],
        patience: Duration,
    ) -> LoggedServer {
        let log = dir.join("server.log");
        let child = tether_command()
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir.join("data"))
            .args(args)
            .envs(env.iter().copied())
            .env("TETHER_ADMIN_TOKEN", admin_token)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("server log"))
            .spawn()
            .expect("spawn tether serve");
        let url = listening_url_in(&log, patience);
        LoggedServer {
            child,
            url,
            dir: dir.to_owned(),
            admin_token,
        }
    }

    /// Runs `tether ARGS…` as the admin of this server.
    pub fn run(&self, args: &[&str]) -> Output {
        tether_command()
            .args(args)
            .env("TETHER_SERVER", &self.url)
            .env("TETHER_TOKEN", self.admin_token)
            .output()
            .expect("run tether")
    }

    /// A command that must succeed and print JSON (`--json` is added).
    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut args = args.to_vec();
        args.push("--json");
        let out = self.run(&args);
        json_output(&args, &out)
    }
}

impl Drop for LoggedServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `id` of a created resource.
pub fn id(value: &serde_json::Value) -> String {
    value["id"].as_str().expect("an id").to_owned()
}

/// Waits (at most `patience`) for `child`, named `what` in the failure, to exit; kills it and fails
/// when it does not.
pub fn wait_exit(child: &mut Child, what: &str, patience: Duration) -> std::process::ExitStatus {
    let deadline = std::time::Instant::now() + patience;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("{what} did not exit");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Runs `command` (its stdout dropped, its stderr piped) to its exit within `patience`, named
/// `what` in a failure: its status and all it wrote to stderr. It must not write more than a pipe
/// holds before it exits (about 64 KiB): the pipe is read after the exit.
pub fn exit_and_stderr(
    command: &mut Command,
    what: &str,
    patience: Duration,
) -> (std::process::ExitStatus, String) {
    let mut child = command
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let status = wait_exit(&mut child, what, patience);
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().expect("piped stderr"), &mut stderr)
        .expect("read stderr");
    (status, stderr)
}

/// The example agent's binary, which lives next to `tether` in the target directory. `cargo test
/// --workspace` (and scripts/test) build it; a run of this package's tests alone may not have.
pub fn shell_agent() -> std::path::PathBuf {
    let dir = Path::new(BIN).parent().expect("a target directory");
    let agent = dir.join("tether-shell-agent");
    if !agent.exists() {
        let mut build = Command::new(env!("CARGO"));
        build.args([
            "build",
            "-p",
            "tether-shell-agent",
            "--bin",
            "tether-shell-agent",
        ]);
        if dir.ends_with("release") {
            build.arg("--release");
        }
        let status = build.status().expect("run cargo build");
        assert!(status.success(), "cannot build tether-shell-agent");
    }
    agent
}

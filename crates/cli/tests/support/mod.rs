//! Running the real `tether` binary as a server process.

#![allow(dead_code)]

pub mod api;
pub mod lines;
pub mod proxy;
pub mod seed;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

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
];

/// The `tether` binary with none of [`AMBIENT`] inherited and no standard input.
pub fn tether_command() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_tether"));
    for name in AMBIENT {
        command.env_remove(name);
    }
    command.stdin(Stdio::null());
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
        let mut child = Command::new(env!("CARGO_BIN_EXE_tether"))
            .arg("serve")
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--data-dir")
            .arg(data_dir)
            .args(extra)
            .env("TETHER_ADMIN_TOKEN", ADMIN_TOKEN)
            .env("TETHER_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn tether serve");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut sent = false;
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
                // Keep draining so the child never blocks on a full pipe.
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

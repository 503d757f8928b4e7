//! A `tether worker` child process with its standard error in a log file, for tests that run workers.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use nix::unistd::Pid;

/// `tether worker` running as worker `name` with its standard error in `log`; killed on drop, and its
/// log shown when the test is failing.
pub struct WorkerChild {
    pub name: String,
    pub child: Child,
    pub log: PathBuf,
}

impl WorkerChild {
    /// `tether worker --server SERVER --environment ENV --worker-id NAME`, without the caller's ambient
    /// `TETHER_*` variables; the caller adds the rest.
    pub fn command(server: &str, environment: &str, name: &str) -> Command {
        let mut command = super::tether_command();
        command
            .arg("worker")
            .args(["--server", server, "--environment", environment])
            .args(["--worker-id", name]);
        command
    }

    /// Spawns `command` as worker `name`, with no standard input or output and its standard error in
    /// `<dir>/<name>.log`.
    pub fn spawn(name: &str, dir: &Path, mut command: Command) -> WorkerChild {
        let log = dir.join(format!("{name}.log"));
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log).expect("worker log"))
            .spawn()
            .expect("spawn tether worker");
        WorkerChild {
            name: name.to_owned(),
            child,
            log,
        }
    }

    pub fn pid(&self) -> Pid {
        Pid::from_raw(self.child.id() as i32)
    }

    /// What the worker has logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for WorkerChild {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- log of worker {} ---\n{}", self.name, self.log());
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

//! A child process whose standard output a test reads line by line.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

/// How long to wait for something that should happen in well under a second before calling it a hang.
pub const PATIENCE: Duration = Duration::from_secs(60);

/// A running command; killed on drop.
pub struct Lines {
    pub child: Child,
    lines: Receiver<String>,
    /// Every line of standard output read so far.
    pub seen: Vec<String>,
}

impl Lines {
    /// Starts `command` with `input` on its standard input. Its standard error is passed on to the
    /// test's, each line prefixed with `label`; with `ready`, waits until a line of it contains that.
    pub fn spawn(mut command: Command, input: &str, label: &str, ready: Option<&str>) -> Lines {
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn a command");
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(input.as_bytes()).unwrap();
        drop(stdin);
        let (tx, lines) = mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let (ready_tx, ready_rx) = mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        let wanted = ready.map(str::to_owned);
        let prefix = label.to_owned();
        // Draining standard error also keeps the child from blocking on a full pipe.
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("[{prefix}] {line}");
                if wanted.as_deref().is_some_and(|w| line.contains(w)) {
                    let _ = ready_tx.send(());
                }
            }
        });
        if let Some(ready) = ready {
            ready_rx
                .recv_timeout(PATIENCE)
                .unwrap_or_else(|_| panic!("[{label}] never said {ready:?}"));
        }
        Lines {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// The next line satisfying `wanted`, reading (and keeping) every line before it.
    pub fn until(&mut self, wanted: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if wanted(&line) {
                        return line;
                    }
                }
                Err(e) => panic!("no such line ({e}); seen so far:\n{}", self.seen.join("\n")),
            }
        }
    }

    /// Waits for the command to exit by itself, which it must do successfully with `last` in the
    /// last line it printed.
    pub fn exits_successfully_after(&mut self, last: &str) {
        let status = self.exit();
        assert!(status.success(), "{status}");
        assert!(self.seen.last().unwrap().contains(last), "{:?}", self.seen);
    }

    /// Waits for the command to exit by itself; then every line it printed is in `seen`.
    pub fn exit(&mut self) -> ExitStatus {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                // The reader ends with the pipe; collect what it still holds.
                while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(5)) {
                    self.seen.push(line);
                }
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the command did not exit; seen:\n{}",
                self.seen.join("\n")
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM, and the exit status once it is gone.
    pub fn terminate(&mut self) -> ExitStatus {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        self.exit()
    }
}

impl Drop for Lines {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

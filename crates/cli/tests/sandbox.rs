//! `tether worker --sandbox`, tried with real namespaces (bubblewrap) and real programs that try to get
//! out: each attempt must be refused, and each test would fail with the confinement removed (the same
//! script, unconfined, succeeds at what it tries).
//!
//! Needs `bwrap` and unprivileged user namespaces (`.ci/run` installs bubblewrap); without them the
//! tests fail, as they should on a machine where `--sandbox` would refuse to start.

mod support;

use std::io::Read as _;
use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::time::Duration;

use serde_json::Value;

const ADMIN_TOKEN: &str = "tth_adm_sandbox-test-admin-token-0123456789";
/// How long anything in these tests may take before it counts as hung.
const PATIENCE: Duration = Duration::from_secs(90);

/// `tether serve` on a loopback port with its store in `<dir>/data`; killed on drop.
type Server = support::LoggedServer;

impl Server {
    fn start(dir: &Path) -> Server {
        Server::spawn(dir, ADMIN_TOKEN, &[], &[], PATIENCE)
    }

    /// An environment and its key.
    fn environment(&self) -> (String, String) {
        let env = support::id(&self.json(&["env", "create", "--name", "sandbox"]));
        let key = self.json(&["env", "key", "create", &env])["token"]
            .as_str()
            .expect("a key")
            .to_owned();
        (env, key)
    }

    /// Queues one session (one work item) in `env`.
    fn session(&self, env: &str) -> String {
        let agent = support::id(&self.json(&["agent", "create", "--name", "a", "--model", "none"]));
        support::id(&self.json(&["session", "create", "--agent", &agent, "--env", env]))
    }

    /// `tether worker run-one [ARGS…] -- bash -c SCRIPT`, the key in the worker's environment (where a
    /// program could look for it), the program's output in `<dir>/out/<work_id>.log`. Returns the
    /// worker's exit status, its log and the program's output.
    fn run_one(&self, env: &str, key: &str, args: &[&str], script: &str) -> Ran {
        self.run_one_at_home(env, key, args, script, None)
    }

    /// `run_one` with the worker's `HOME` set to `home` (a stand-in for the user's home).
    fn run_one_at_home(
        &self,
        env: &str,
        key: &str,
        args: &[&str],
        script: &str,
        home: Option<&Path>,
    ) -> Ran {
        let out = self.dir.join("out");
        let log = self.dir.join(format!("worker-{}.log", rand_suffix()));
        let mut worker = support::tether_command()
            .args(["worker", "run-one", "--log-format", "json", "--log-dir"])
            .arg(&out)
            .args(args)
            .args(["--server", &self.url, "--environment", env])
            .args(["--", "bash", "-c", script, "bash"])
            .env("TETHER_KEY", key)
            .env("TETHER_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("worker log"))
            .envs(home.map(|home| ("HOME", home)))
            .spawn()
            .expect("spawn tether worker");
        let status = support::wait_exit(&mut worker, "tether worker run-one", PATIENCE);
        let log = std::fs::read_to_string(&log).unwrap_or_default();
        let output = std::fs::read_dir(&out)
            .map(|entries| {
                entries
                    .filter_map(|e| e.ok())
                    .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
                    .collect::<Vec<_>>()
                    .join("\n")
            })
            .unwrap_or_default();
        let _ = std::fs::remove_dir_all(&out);
        Ran {
            status,
            log,
            output,
        }
    }
}

struct Ran {
    status: ExitStatus,
    log: String,
    output: String,
}

impl Ran {
    fn expect_success(&self, what: &str) {
        assert!(
            self.status.success(),
            "{what}: the worker failed ({}):\nlog:\n{}\nprogram:\n{}",
            self.status,
            self.log,
            self.output
        );
    }
}

fn rand_suffix() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(0);
    h.finish()
}

/// The processes on the host that have `marker` in their command line.
fn processes_with(marker: &str) -> Vec<i32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let pid: i32 = e.file_name().to_string_lossy().parse().ok()?;
            let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
            String::from_utf8_lossy(&cmdline)
                .contains(marker)
                .then_some(pid)
        })
        .collect()
}

fn process_with(marker: &str) -> bool {
    !processes_with(marker).is_empty()
}

/// Everything a program might try, in one script: each line prints a word only when the attempt
/// worked. Paths and pids are written into the script, because the sandbox gives the program no
/// environment of the worker's.
fn escape_script(
    outside: &Path,
    secret: &Path,
    other_item: &Path,
    host_pid: u32,
    daemon: &str,
) -> String {
    format!(
        r#"
# Each probe prints its name with its verdict: ESCAPED_<NAME> when the attempt worked, refused_<NAME>
# when it did not, so a failing run says which one got out.
verdict() {{ if [ "$1" -eq 0 ]; then echo "ESCAPED_$2"; else echo "refused_$2"; fi; }}
echo probe > "{outside}/escaped" 2>/dev/null; verdict $? WRITE
echo probe > /etc/tether-sandbox-probe 2>/dev/null; verdict $? ETC
cat "{secret}" 2>/dev/null | grep -q ssh-key; verdict $? SSH
cat "{other_item}" 2>/dev/null | grep -q item-secret; verdict $? OTHER_ITEM
# The key's prefix is searched as `tth_en[v]_`: the pattern itself must not match, or the probe finds
# its own grep's command line in /proc (the pipeline's processes start together) and reports an
# escape that is not one.
cat /proc/[0-9]*/environ /proc/[0-9]*/cmdline 2>/dev/null | tr '\0' '\n' | grep -q 'tth_en[v]_'; verdict $? KEY_PROC
env | grep -q 'tth_en[v]_'; verdict $? KEY_ENV
kill -0 {host_pid} 2>/dev/null; verdict $? SEE_HOST
kill -9 {host_pid} 2>/dev/null; verdict $? KILL_HOST
! grep -q '^NoNewPrivs:[[:space:]]*1' /proc/self/status; verdict $? PRIVS
( setsid sleep {daemon} </dev/null >/dev/null 2>&1 & ) ; sleep 0.2
echo inside > "$TETHER_WORKDIR/own-file" && echo WROTE_OWN
echo tmp > /tmp/own-tmp && echo WROTE_TMP
echo PROCESSES $(ls -d /proc/[0-9]* | wc -l)
echo SCRIPT_DONE
"#,
        outside = outside.display(),
        secret = secret.display(),
        other_item = other_item.display(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn escape_attempts_from_a_sandboxed_program_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let (env, key) = server.environment();
    let outside = dir.path().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    // The worker's HOME, with a key in it. It is the worker's real `$HOME` (set below), not just a
    // directory that happens to be under the hidden /tmp: with TMPDIR elsewhere the sandbox used to
    // leave a home outside /home and /root readable.
    let home = dir.path().join("home");
    std::fs::create_dir_all(home.join(".ssh")).unwrap();
    let secret = home.join(".ssh/id_test");
    std::fs::write(&secret, "ssh-key PRIVATE\n").unwrap();
    let items = dir.path().join("items");
    std::fs::create_dir_all(items.join("work_other")).unwrap();
    let other_item = items.join("work_other/notes");
    std::fs::write(&other_item, "item-secret\n").unwrap();
    let mut host = Command::new("sleep").arg("300").spawn().unwrap();

    // The same script unconfined gets out: the test is able to see an escape.
    let daemon_free = "301.7071";
    server.session(&env);
    let free = server.run_one_at_home(
        &env,
        &key,
        &["--workdir", items.to_str().unwrap()],
        &escape_script(&outside, &secret, &other_item, host.id(), daemon_free),
        Some(&home),
    );
    free.expect_success("unconfined");
    for word in [
        "ESCAPED_WRITE",
        "ESCAPED_SSH",
        "ESCAPED_OTHER_ITEM",
        "ESCAPED_KEY_PROC",
        "ESCAPED_SEE_HOST",
    ] {
        assert!(
            free.output.contains(word),
            "unconfined, {word} expected:\n{}",
            free.output
        );
    }
    assert!(
        process_with(daemon_free),
        "unconfined, the daemon outlives its item"
    );
    // Clean up what the unconfined run left (the daemon; the host process it killed is replaced).
    for pid in processes_with(daemon_free) {
        let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
    }
    let _ = std::fs::remove_file("/etc/tether-sandbox-probe");
    let _ = host.kill();
    let _ = host.wait();
    let _ = std::fs::remove_file(outside.join("escaped"));
    let mut host = Command::new("sleep").arg("300").spawn().unwrap();

    let daemon = "302.7071";
    server.session(&env);
    let boxed = server.run_one_at_home(
        &env,
        &key,
        &["--sandbox", "--workdir", items.to_str().unwrap()],
        &escape_script(&outside, &secret, &other_item, host.id(), daemon),
        Some(&home),
    );
    boxed.expect_success("sandboxed");
    assert!(boxed.output.contains("SCRIPT_DONE"), "{}", boxed.output);
    let escaped: Vec<&str> = boxed
        .output
        .split_whitespace()
        .filter(|word| word.starts_with("ESCAPED"))
        .collect();
    assert!(
        escaped.is_empty(),
        "escapes worked: {escaped:?}\n{}\nlog:\n{}",
        boxed.output,
        boxed.log
    );
    for probe in [
        "WRITE",
        "ETC",
        "SSH",
        "OTHER_ITEM",
        "KEY_PROC",
        "KEY_ENV",
        "SEE_HOST",
        "KILL_HOST",
        "PRIVS",
    ] {
        let refused = format!("refused_{probe}");
        assert!(
            boxed.output.contains(&refused),
            "{refused}:\n{}",
            boxed.output
        );
    }
    assert!(boxed.output.contains("WROTE_OWN") && boxed.output.contains("WROTE_TMP"));
    assert!(!outside.join("escaped").exists());
    assert!(!Path::new("/etc/tether-sandbox-probe").exists());
    assert!(
        host.try_wait().unwrap().is_none(),
        "the host process survived"
    );
    assert!(!process_with(daemon), "a daemon of the item outlived it");
    let processes: u32 = boxed
        .output
        .split("PROCESSES ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .expect("a process count");
    assert!(processes < 10, "the program sees {processes} processes");
    // The start-up line says what is confined.
    assert!(boxed.log.contains("sandbox"), "{}", boxed.log);
    assert!(boxed.log.contains("network full"), "{}", boxed.log);
    let _ = host.kill();
    let _ = host.wait();
}

#[tokio::test(flavor = "multi_thread")]
async fn without_network_a_host_listener_is_unreachable() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let (env, key) = server.environment();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    listener.set_nonblocking(true).unwrap();
    let script = format!(
        "(echo hello > /dev/tcp/127.0.0.1/{port}) 2>/dev/null && echo REACHED; echo SCRIPT_DONE"
    );
    server.session(&env);
    let free = server.run_one(&env, &key, &["--sandbox"], &script);
    free.expect_success("network full");
    assert!(free.output.contains("REACHED"), "{}", free.output);
    let mut accepted = 0;
    while let Ok((mut stream, _)) = listener.accept() {
        let mut text = String::new();
        let _ = stream.read_to_string(&mut text);
        accepted += 1;
    }
    assert_eq!(accepted, 1);

    server.session(&env);
    let none = server.run_one(
        &env,
        &key,
        &["--sandbox", "--sandbox-network", "none"],
        &script,
    );
    none.expect_success("network none");
    assert!(none.output.contains("SCRIPT_DONE"), "{}", none.output);
    assert!(!none.output.contains("REACHED"), "{}", none.output);
    assert!(listener.accept().is_err(), "nothing connected");
    assert!(none.log.contains("network none"), "{}", none.log);
}

#[tokio::test(flavor = "multi_thread")]
async fn memory_past_the_cap_cannot_be_had() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let (env, key) = server.environment();
    // 512 MiB in one piece: python's allocation either succeeds or raises MemoryError.
    let script = "python3 -c 'b = bytearray(512 * 1024 * 1024); print(\"ALLOCATED\", len(b))'; echo SCRIPT_DONE";
    server.session(&env);
    let free = server.run_one(&env, &key, &["--sandbox"], script);
    free.expect_success("no cap");
    assert!(free.output.contains("ALLOCATED"), "{}", free.output);

    server.session(&env);
    let capped = server.run_one(
        &env,
        &key,
        &["--sandbox", "--sandbox-memory", "128M"],
        script,
    );
    capped.expect_success("capped");
    assert!(capped.output.contains("SCRIPT_DONE"), "{}", capped.output);
    assert!(!capped.output.contains("ALLOCATED"), "{}", capped.output);
    assert!(capped.output.contains("MemoryError"), "{}", capped.output);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sandbox_that_cannot_be_had_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    // No bwrap in PATH: the worker refuses to start instead of running anything unconfined.
    let empty = dir.path().join("bin");
    std::fs::create_dir_all(&empty).unwrap();
    std::os::unix::fs::symlink("/bin/sh", empty.join("sh")).unwrap();
    let out = support::tether_command()
        .args([
            "worker",
            "--environment",
            "env_x",
            "--key",
            "tth_env_x",
            "--sandbox",
        ])
        .args(["--", "/bin/sh", "-c", "true"])
        .env("PATH", &empty)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bubblewrap"), "{err}");
}

/// Seconds since midnight UTC of an RFC 3339 `...THH:MM:SS.fffZ` or a bare `HH:MM:SS.fff`.
fn seconds_of_day(text: &str) -> Option<f64> {
    let clock = text.rsplit('T').next()?.trim_end_matches('Z');
    let mut parts = clock.split(':');
    let hours: f64 = parts.next()?.parse().ok()?;
    let minutes: f64 = parts.next()?.parse().ok()?;
    let seconds: f64 = parts.next()?.parse().ok()?;
    Some(hours * 3600.0 + minutes * 60.0 + seconds)
}

/// Claim to PROGRAM running, in seconds: the worker's "claimed" log line to the first thing the
/// program does (print the clock).
fn claim_to_program(ran: &Ran) -> Option<f64> {
    let claimed = ran.log.lines().find(|line| line.contains("\"claimed\""))?;
    let claimed: Value = serde_json::from_str(claimed).ok()?;
    let claimed = seconds_of_day(claimed["timestamp"].as_str()?)?;
    let started = ran
        .output
        .split("STARTED_AT ")
        .nth(1)?
        .split_whitespace()
        .next()?;
    let started = seconds_of_day(started)?;
    // Negative only across midnight: no sample.
    (started >= claimed).then_some(started - claimed)
}

/// The cost of confinement per item, printed (no timing assertion: the machine is shared): the
/// median time from claim to PROGRAM running, sandboxed and unconfined, in the same run.
#[tokio::test(flavor = "multi_thread")]
async fn claim_to_program_cost_of_the_sandbox_is_printed() {
    const RUNS: usize = 5;
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let (env, key) = server.environment();
    let script = "echo STARTED_AT $(date -u +%H:%M:%S.%N)";
    let mut medians = Vec::new();
    for args in [&[][..], &["--sandbox"][..]] {
        let mut samples = Vec::new();
        for _ in 0..RUNS {
            server.session(&env);
            let ran = server.run_one(&env, &key, args, script);
            ran.expect_success("timed run");
            samples.extend(claim_to_program(&ran));
        }
        assert!(!samples.is_empty(), "no timing sample for {args:?}");
        samples.sort_by(f64::total_cmp);
        medians.push(samples[samples.len() / 2]);
    }
    let (free, boxed) = (medians[0] * 1000.0, medians[1] * 1000.0);
    println!(
        "claim to program running, median of {RUNS}: unconfined {free:.1} ms, sandboxed {boxed:.1} ms \
         (+{:.1} ms, x{:.2})",
        boxed - free,
        boxed / free.max(0.001)
    );
}

//! `tether worker --sandbox`, tried with real namespaces (bubblewrap) and real programs that try to get
//! out: each attempt must be refused, and each test would fail with the confinement removed (the same
//! script, unconfined, succeeds at what it tries).
//!
//! Needs `bwrap` and unprivileged user namespaces (`.ci/run` installs bubblewrap); without them the
//! tests fail, as they should on a machine where `--sandbox` would refuse to start.

mod support;

use std::ffi::OsStr;
use std::io::Read as _;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const ADMIN_TOKEN: &str = "tth_adm_sandbox-test-admin-token-0123456789";
/// How long anything in these tests may take before it counts as hung.
const PATIENCE: Duration = Duration::from_secs(90);

/// `tether serve` on a loopback port with its store in `<dir>/data`; killed on drop.
type Server = support::LoggedServer;

impl Server {
    fn start(dir: &Path) -> Server {
        Server::start_with(dir, &[])
    }

    /// With extra `tether serve` arguments.
    fn start_with(dir: &Path, extra: &[&str]) -> Server {
        Server::spawn(dir, ADMIN_TOKEN, extra, &[], PATIENCE)
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

    /// The work item of `session` (the newest, if it had several).
    fn item_of(&self, env: &str, session: &str) -> Value {
        self.json(&["work", "list", env, "--all"])["data"]
            .as_array()
            .expect("items")
            .iter()
            .rfind(|item| item["data"]["id"] == session)
            .cloned()
            .unwrap_or_else(|| panic!("no item for {session}"))
    }

    /// Waits until the item of `session` is in `state`.
    fn wait_for_item(&self, env: &str, session: &str, state: &str) -> Value {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let item = self.item_of(env, session);
            if item["state"] == state {
                return item;
            }
            assert!(Instant::now() < deadline, "never {state}: {item}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `tether worker [ARGS…] -- PROGRAM…` running until dropped, its JSON log in `<dir>/<name>.log`.
    fn worker(
        &self,
        env: &str,
        key: &str,
        name: &str,
        args: &[&str],
        program: &[&OsStr],
    ) -> Worker {
        let log = self.dir.join(format!("{name}.log"));
        let child = support::tether_command()
            .args(["worker", "--log-format", "json", "--worker-id", name])
            .args(args)
            .args(["--environment", env])
            .arg("--")
            .args(program)
            .env("TETHER_SERVER", &self.url)
            .env("TETHER_KEY", key)
            .env("TETHER_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("worker log"))
            .spawn()
            .expect("spawn tether worker");
        Worker { child, log }
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

/// A `tether worker` process, killed on drop.
struct Worker {
    child: Child,
    log: PathBuf,
}

impl Worker {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Worker {
    /// SIGTERM first, so that the worker removes its own places (cgroups, proxy sockets); SIGKILL if
    /// it has not gone after a while.
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
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

/// Tries a host listener (`REACHED`), the server's own port (`REACHED_SERVER`), the API through the
/// program's `TETHER_API_URL` (`API:` lines: the server's answer) and a path outside the API through
/// the same address (`OUTSIDE:` lines).
fn network_script(port: u16, server_port: &str) -> String {
    format!(
        r#"
(echo hello > /dev/tcp/127.0.0.1/{port}) 2>/dev/null && echo REACHED
(echo hello > /dev/tcp/127.0.0.1/{server_port}) 2>/dev/null && echo REACHED_SERVER
hostport=${{TETHER_API_URL#http://}}; hostport=${{hostport%%/*}}
host=${{hostport%:*}}; p=${{hostport##*:}}; path="/${{TETHER_API_URL#http://*/}}"
echo "API_URL $TETHER_API_URL"
if exec 3<>"/dev/tcp/$host/$p"; then
  printf 'GET %s/environments HTTP/1.0\r\nHost: x\r\n\r\n' "$path" >&3
  head -c 4000 <&3 | tr -d '\r' | sed 's/^/API: /'; exec 3<&-
fi 2>/dev/null
if exec 3<>"/dev/tcp/$host/$p"; then
  printf 'GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n' >&3
  head -c 4000 <&3 | tr -d '\r' | sed 's/^/OUTSIDE: /'; exec 3<&-
fi 2>/dev/null
echo SCRIPT_DONE
"#
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn without_network_or_with_the_api_only_a_host_listener_is_unreachable() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let (env, key) = server.environment();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    listener.set_nonblocking(true).unwrap();
    let server_port = server.url.rsplit(':').next().unwrap().trim_end_matches('/');
    let script = network_script(port, server_port);
    let drain = |listener: &TcpListener| {
        let mut accepted = 0;
        while let Ok((mut stream, _)) = listener.accept() {
            let mut text = String::new();
            let _ = stream.read_to_string(&mut text);
            accepted += 1;
        }
        accepted
    };

    // Shared network: the same script reaches both (the test can see a connection that works).
    server.session(&env);
    let free = server.run_one(&env, &key, &["--sandbox"], &script);
    free.expect_success("network full");
    assert!(free.output.contains("REACHED\n"), "{}", free.output);
    assert!(free.output.contains("REACHED_SERVER"), "{}", free.output);
    assert_eq!(drain(&listener), 1);

    for network in ["none", "api"] {
        server.session(&env);
        let ran = server.run_one(
            &env,
            &key,
            &["--sandbox", "--sandbox-network", network],
            &script,
        );
        ran.expect_success(network);
        assert!(ran.output.contains("SCRIPT_DONE"), "{}", ran.output);
        assert!(!ran.output.contains("REACHED"), "{network}: {}", ran.output);
        assert_eq!(drain(&listener), 0, "{network}: something connected");
        assert!(
            ran.log.contains(&format!("network {network}")),
            "{}",
            ran.log
        );
        match network {
            "none" => assert!(!ran.output.contains("API: "), "{}", ran.output),
            _ => {
                // The API answers through the proxy (the server's own 401, not the proxy's), and
                // nothing else of the server does.
                assert!(
                    ran.output
                        .contains("API_URL http://127.0.0.1:4780/api/v1/cloud"),
                    "{}",
                    ran.output
                );
                assert!(
                    ran.output.contains("API: HTTP/1.0 401")
                        && ran.output.contains("authentication_error"),
                    "{}",
                    ran.output
                );
                assert!(
                    ran.output.contains("OUTSIDE: HTTP/1.0 404")
                        && ran.output.contains("only the Tether API"),
                    "{}",
                    ran.output
                );
            }
        }
    }
}

/// Which mechanism the start-up line says enforces `controller`'s cap: `cgroup` or an rlimit.
fn cap_mechanism(log: &str, controller: &str) -> &'static str {
    if log.contains(&format!("cgroup v1 {controller}"))
        || log.contains(&format!("cgroup v2 {controller}"))
    {
        "cgroup"
    } else {
        "rlimit"
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn memory_past_the_cap_cannot_be_had() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let (env, key) = server.environment();
    // 512 MiB, every page written: under an rlimit the allocation fails (MemoryError), under a
    // cgroup the kernel's OOM killer ends the program.
    let script = "python3 -c 'b = b\"x\" * (512 * 1024 * 1024); print(\"ALLOCATED\", len(b))'";
    server.session(&env);
    let free = server.run_one(&env, &key, &["--sandbox"], script);
    free.expect_success("no cap");
    assert!(free.output.contains("ALLOCATED"), "{}", free.output);

    let session = server.session(&env);
    let capped = server.run_one(
        &env,
        &key,
        &["--sandbox", "--sandbox-memory", "128M"],
        script,
    );
    assert!(!capped.status.success(), "{}", capped.log);
    assert!(!capped.output.contains("ALLOCATED"), "{}", capped.output);
    let metadata = &server.item_of(&env, &session)["metadata"];
    match cap_mechanism(&capped.log, "memory") {
        "cgroup" => {
            assert_eq!(metadata["tether.exit_reason"], "memory_limit", "{metadata}");
            // SIGKILL, as bwrap reports it: 128 + 9.
            assert_eq!(metadata["tether.exit_code"], "137", "{metadata}");
        }
        _ => {
            assert!(capped.output.contains("MemoryError"), "{}", capped.output);
            assert!(metadata.get("tether.exit_reason").is_none(), "{metadata}");
        }
    }
}

/// A fork bomb stops at `--sandbox-pids`: the program's forks are refused at the cap, everything it
/// started dies with it, and the host can still start processes.
#[tokio::test(flavor = "multi_thread")]
async fn a_fork_bomb_stops_at_the_process_cap() {
    const CAP: u32 = 16;
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let (env, key) = server.environment();
    // Each child sleeps: the processes pile up until a fork is refused. The marker is in every
    // child's command line, for the host to look for afterwards.
    let marker = "fork-bomb-7071";
    let script = format!(
        r#"exec python3 -c '
import os, sys, time
# {marker}
n = 0
try:
    while n < 1000:
        if os.fork() == 0:
            time.sleep(300)
            os._exit(0)
        n += 1
except OSError as e:
    print("FORK_REFUSED", n, e, flush=True)
    sys.exit(3)
print("FORKED_ALL", n, flush=True)
'"#
    );
    let session = server.session(&env);
    let ran = server.run_one(
        &env,
        &key,
        &["--sandbox", "--sandbox-pids", &CAP.to_string()],
        &script,
    );
    assert_eq!(ran.status.code(), Some(3), "{}\n{}", ran.log, ran.output);
    let forked: u32 = ran
        .output
        .split("FORK_REFUSED ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no refusal:\n{}", ran.output));
    // The program itself counts too.
    assert!(
        forked < CAP,
        "{forked} processes started under a cap of {CAP}"
    );
    assert!(forked > 0, "{}", ran.output);
    assert!(ran.log.contains(&format!("{CAP} processes")), "{}", ran.log);
    let metadata = &server.item_of(&env, &session)["metadata"];
    assert_eq!(metadata["tether.exit_code"], "3", "{metadata}");
    if cap_mechanism(&ran.log, "pids") == "cgroup" {
        assert_eq!(metadata["tether.exit_reason"], "pids_limit", "{metadata}");
    }
    // Nothing of the bomb is left, and the host forks as ever.
    wait_gone(marker, &ran.log);
    assert!(Command::new("true").status().unwrap().success());
}

/// Waits (bounded) until no process with `marker` in its command line is left.
fn wait_gone(marker: &str, log: &str) {
    let deadline = Instant::now() + PATIENCE;
    while process_with(marker) {
        assert!(
            Instant::now() < deadline,
            "{marker} outlived its item:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits (bounded) until a process with `marker` in its command line runs.
fn wait_running(marker: &str, worker: &Worker) {
    let deadline = Instant::now() + PATIENCE;
    while !process_with(marker) {
        assert!(
            Instant::now() < deadline,
            "{marker} never started:\n{}",
            worker.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Starts a double-forked daemon named after the session (`tether-daemon-<session>` in its command
/// line), then runs until told to stop.
const DAEMON_PROGRAM: &str = r#"( setsid bash -c 'exec -a "tether-daemon-$TETHER_SESSION_ID" sleep 300' </dev/null >/dev/null 2>&1 & )
trap 'exit 0' TERM
while :; do sleep 0.1; done
"#;

/// A double-forked daemon started by a sandboxed program dies with the item however it ends: the
/// program exits, the item is stopped, force-stopped, or the worker loses its lease.
#[tokio::test(flavor = "multi_thread")]
async fn a_daemon_dies_with_its_item_on_exit_stop_force_stop_and_lease_loss() {
    let dir = tempfile::tempdir().unwrap();
    // Short leases, so that a cut line ends the lease within seconds.
    let server = Server::start_with(dir.path(), &["--lease-ttl-min", "1", "--tick-ms", "100"]);
    let (env, key) = server.environment();

    // The program exits at once.
    let session = server.session(&env);
    let ran = server.run_one(
        &env,
        &key,
        &["--sandbox"],
        "( setsid bash -c 'exec -a \"tether-daemon-$TETHER_SESSION_ID\" sleep 300' </dev/null >/dev/null 2>&1 & ); sleep 0.3; exit 0",
    );
    ran.expect_success("exit");
    wait_gone(&format!("tether-daemon-{session}"), &ran.log);

    // The other endings, with a worker that reaches the server through a line the test can cut.
    let line = support::proxy::Proxy::start(&server.url).await;
    let worker = server.worker(
        &env,
        &key,
        "daemons",
        &[
            "--sandbox",
            "--server",
            &line.url,
            "--ttl",
            "2",
            "--grace",
            "5s",
        ],
        &[
            OsStr::new("bash"),
            OsStr::new("-c"),
            OsStr::new(DAEMON_PROGRAM),
        ],
    );
    for ending in ["stop", "force-stop", "lease-loss"] {
        let session = server.session(&env);
        let marker = format!("tether-daemon-{session}");
        wait_running(&marker, &worker);
        let item = server.item_of(&env, &session);
        let work = item["id"].as_str().expect("an id");
        match ending {
            "stop" => {
                server.json(&["work", "stop", &env, work]);
                server.wait_for_item(&env, &session, "stopped");
            }
            "force-stop" => {
                server.json(&["work", "stop", &env, work, "--force"]);
            }
            _ => line.set(support::proxy::Mode::Refuse),
        }
        wait_gone(&marker, &worker.log());
        assert!(
            !worker.log().contains("cannot start PROGRAM"),
            "{}",
            worker.log()
        );
    }
    let log = worker.log();
    assert!(log.contains("lease lost"), "{log}");
}

/// The recommended set-up: the shell agent under `--sandbox --sandbox-network api` answers a message,
/// every call of its own going through the worker's proxy.
#[tokio::test(flavor = "multi_thread")]
async fn the_shell_agent_answers_through_the_api_proxy() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let (env, key) = server.environment();
    let session = server.session(&env);
    server.json(&["session", "send", &session, "echo hello from the box; pwd"]);
    let agent = support::shell_agent();
    let worker = server.worker(
        &env,
        &key,
        "boxed-agent",
        &["--sandbox", "--sandbox-network", "api"],
        &[
            agent.as_os_str(),
            OsStr::new("--max-idle"),
            OsStr::new("2s"),
        ],
    );
    // The agent idles out after its answer, and the worker stops the item.
    let item = server.wait_for_item(&env, &session, "stopped");
    assert_eq!(
        item["metadata"]["tether.exit_code"],
        "0",
        "{item}\n{}",
        worker.log()
    );
    let events = server.json(&["session", "events", &session]);
    // The command ran in the item's own directory, and the agent posted its answer itself.
    let results: Vec<&Value> = events["data"]
        .as_array()
        .expect("events")
        .iter()
        .filter(|e| e["type"] == "agent.tool_result")
        .collect();
    assert_eq!(results.len(), 1, "{events:#}");
    let result = results[0].to_string();
    assert!(
        result.contains("hello from the box") && result.contains("tether-items-"),
        "{events:#}"
    );
    assert!(worker.log().contains("network api"), "{}", worker.log());
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
/// median time from claim to PROGRAM running, unconfined, sandboxed, and sandboxed with the API proxy
/// and both caps, in the same run.
#[tokio::test(flavor = "multi_thread")]
async fn claim_to_program_cost_of_the_sandbox_is_printed() {
    const RUNS: usize = 5;
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let (env, key) = server.environment();
    let script = "echo STARTED_AT $(date -u +%H:%M:%S.%N)";
    let mut medians = Vec::new();
    let full: &[&str] = &[
        "--sandbox",
        "--sandbox-network",
        "api",
        "--sandbox-memory",
        "256M",
        "--sandbox-pids",
        "64",
    ];
    for args in [&[][..], &["--sandbox"][..], full] {
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
    let (free, boxed, api) = (
        medians[0] * 1000.0,
        medians[1] * 1000.0,
        medians[2] * 1000.0,
    );
    println!(
        "claim to program running, median of {RUNS}: unconfined {free:.1} ms, sandboxed {boxed:.1} ms \
         (+{:.1} ms, x{:.2}), sandboxed with api and caps {api:.1} ms (+{:.1} ms, x{:.2})",
        boxed - free,
        boxed / free.max(0.001),
        api - free,
        api / free.max(0.001)
    );
}

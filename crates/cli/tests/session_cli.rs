//! `tether session send|events|watch` against a real `tether serve` process; the agent's side of the
//! conversation is posted over HTTP, as a worker's program would.

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;

use serde_json::{json, Value};
use support::lines::{Lines, PATIENCE};
use support::ServerProcess;
use support::BIN;
use tether_client::{Client, NewEvent};
use tether_testkit::string_fields;

fn run(server: &ServerProcess, args: &[&str]) -> Output {
    support::tether_as_admin(server, args)
        .stdin(Stdio::null())
        .output()
        .expect("run tether")
}

fn ok(server: &ServerProcess, args: &[&str]) -> String {
    let out = run(server, args);
    assert!(
        out.status.success(),
        "tether {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn json(server: &ServerProcess, args: &[&str]) -> Value {
    let mut args = args.to_vec();
    args.push("--json");
    let text = ok(server, &args);
    serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("tether {args:?}: not JSON ({e}):\n{text}"))
}

/// Posts the agent's side of a turn (as an admin, who may send every type).
fn agent_turn(
    rt: &tokio::runtime::Runtime,
    client: &Client,
    session: &str,
    command: &str,
    output: &str,
) {
    rt.block_on(async {
        let tool_use = client
            .send_events(
                session,
                &[NewEvent::new(
                    "agent.tool_use",
                    json!({"name": "shell", "input": {"command": command}}),
                )],
            )
            .await
            .unwrap();
        client
            .send_events(
                session,
                &[
                    NewEvent::new(
                        "agent.tool_result",
                        json!({"tool_use_id": tool_use[0].id, "content": [{"type": "text", "text": output}], "is_error": false}),
                    ),
                    NewEvent::agent_message("Command finished with exit status 0."),
                    NewEvent::status_idle("end_turn"),
                ],
            )
            .await
            .unwrap();
    });
}

/// `tether serve` on a given address, so that a restart comes back where clients expect it.
fn serve_on(data: &std::path::Path, listen: &str) -> ServerProcess {
    let mut child = Command::new(BIN)
        .args(["serve", "--listen", listen, "--data-dir"])
        .arg(data)
        .env("TETHER_ADMIN_TOKEN", support::ADMIN_TOKEN)
        .env("TETHER_LOG", "warn")
        .env_remove("TETHER_DATABASE_URL")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn tether serve");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        // Keeps draining after the address, so that the server never blocks on a full pipe.
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(rest) = line.split("tether listening on ").nth(1) {
                let _ = tx.send(rest.split_whitespace().next().unwrap_or("").to_owned());
            }
        }
    });
    let base = rx
        .recv_timeout(PATIENCE)
        .expect("tether serve did not report its address");
    ServerProcess {
        child,
        base,
        token: support::ADMIN_TOKEN.to_owned(),
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Creates an environment, an agent and a session on them with `tether … create` (the session with
/// `extra` arguments); returns the session's id.
fn laptop_session(server: &ServerProcess, extra: &[&str]) -> String {
    let env = json(server, &["env", "create", "--name", "laptop"]);
    let agent = json(
        server,
        &["agent", "create", "--name", "shell", "--model", "none"],
    );
    let mut args = vec![
        "session",
        "create",
        "--agent",
        agent["id"].as_str().unwrap(),
        "--env",
        env["id"].as_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    json(server, &args)["id"].as_str().unwrap().to_owned()
}

#[test]
fn send_events_and_watch() {
    let data = tempfile::tempdir().unwrap();
    let listen = format!("127.0.0.1:{}", free_port());
    let mut server = serve_on(data.path(), &listen);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let client = Client::new(&server.base, &server.token).unwrap();

    let session = laptop_session(&server, &[]);
    let s = session.as_str();

    // An empty log lists as such.
    assert_eq!(ok(&server, &["session", "events", s]), "No events.\n");

    let mut watch = Lines::spawn(
        support::tether_as_admin(&server, &["session", "watch", s]),
        "",
        "tether",
        Some("Watching session"),
    );

    // send: a user message starts a turn.
    let sent = json(&server, &["session", "send", s, "echo hello"]);
    assert_eq!(sent["type"], "user.message");
    assert_eq!(sent["content"][0]["text"], "echo hello");
    assert!(sent["id"].as_str().unwrap().starts_with("evt_"), "{sent}");
    assert_eq!(json(&server, &["session", "get", s])["status"], "running");

    // A second message while the turn runs is refused, and the error says why.
    let refused = run(&server, &["session", "send", s, "too soon"]);
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        err.contains("running a turn") && err.contains("409"),
        "{err}"
    );

    // watch: one readable line per event, in order, without colours on a pipe.
    let line = watch.until(|l| l.contains("user.message"));
    assert!(line.ends_with("user.message        echo hello"), "{line:?}");
    assert!(
        line.as_bytes()[..8]
            .iter()
            .all(|b| b.is_ascii_digit() || *b == b':'),
        "{line:?}"
    );
    watch.until(|l| l.contains("session.status_running"));
    agent_turn(&rt, &client, s, "echo hello", "hello\nworld\n");
    let line = watch.until(|l| l.contains("agent.tool_use"));
    assert!(
        line.ends_with("agent.tool_use      shell: echo hello"),
        "{line:?}"
    );
    let line = watch.until(|l| l.contains("agent.tool_result"));
    assert!(line.ends_with("agent.tool_result   hello"), "{line:?}");
    // Further lines of a multi-line output are indented under the first.
    let next = watch.until(|_| true);
    assert_eq!(next.trim_start(), "world");
    assert_eq!(
        next.len() - next.trim_start().len(),
        line.len() - "hello".len()
    );
    watch.until(|l| l.contains("agent.message") && l.contains("exit status 0"));
    let line = watch.until(|l| l.contains("session.status_idle"));
    assert!(line.ends_with("session.status_idle end_turn"), "{line:?}");
    assert!(
        watch.seen.iter().all(|l| !l.contains('\x1b')),
        "{:?}",
        watch.seen
    );

    // events --json: the whole log, oldest first.
    let page = json(&server, &["session", "events", s]);
    let kinds = string_fields(&page["data"], "type");
    assert_eq!(
        kinds,
        [
            "user.message",
            "session.status_running",
            "agent.tool_use",
            "agent.tool_result",
            "agent.message",
            "session.status_idle"
        ]
    );
    assert_eq!(page["data"][0]["id"], sent["id"]);
    let newest = json(
        &server,
        &["session", "events", s, "--order", "desc", "--limit", "2"],
    );
    assert_eq!(newest["data"][0]["type"], "session.status_idle");
    assert_eq!(newest["data"][1]["type"], "agent.message");
    assert_eq!(newest["has_more"], true);
    let all = json(&server, &["session", "events", s, "--limit", "4", "--all"]);
    assert_eq!(all["data"].as_array().unwrap().len(), 6);
    // And for people: the same lines as watch.
    let listed = ok(&server, &["session", "events", s]);
    assert_eq!(listed.lines().count(), 7, "{listed}");
    assert!(
        listed
            .lines()
            .next()
            .unwrap()
            .ends_with("user.message        echo hello"),
        "{listed}"
    );

    // send --wait (the message from standard input): shows the turn, returns when it ends.
    let mut waiting = Lines::spawn(
        support::tether_as_admin(&server, &["session", "send", s, "-", "--wait"]),
        "ls -l\n",
        "tether",
        None,
    );
    let line = waiting.until(|l| l.contains("user.message"));
    assert!(line.ends_with("user.message        ls -l"), "{line:?}");
    agent_turn(&rt, &client, s, "ls -l", "total 0\n");
    waiting.exits_successfully_after("session.status_idle");
    assert!(waiting
        .seen
        .iter()
        .any(|l| l.contains("agent.tool_result   total 0")));
    // watch saw that turn too.
    watch.until(|l| l.contains("user.message") && l.contains("ls -l"));
    watch.until(|l| l.contains("session.status_idle"));

    // The server goes away and comes back: watch resumes where it was, losing and repeating nothing.
    server.terminate();
    let server = serve_on(data.path(), &listen);
    let client = Client::new(&server.base, &server.token).unwrap();
    let sent = json(&server, &["session", "send", s, "after the restart"]);
    let line = watch.until(|l| l.contains("user.message"));
    assert!(line.ends_with("after the restart"), "{line:?}");
    // cancel interrupts a running turn (the agent ends it), and is a no-op between turns.
    let cancel = ok(&server, &["session", "cancel", s]);
    assert!(cancel.contains("Interrupting the running turn"), "{cancel}");
    watch.until(|l| l.contains("user.interrupt"));
    agent_turn(&rt, &client, s, "true", "");
    watch.until(|l| l.contains("session.status_idle"));
    let user_lines = watch
        .seen
        .iter()
        .filter(|l| l.contains("user.message"))
        .count();
    assert_eq!(user_lines, 3, "{:#?}", watch.seen);
    assert_eq!(sent["type"], "user.message");

    let cancel = ok(&server, &["session", "cancel", s]);
    assert!(cancel.contains("not running a turn"), "{cancel}");

    // Deleting the session ends watch, successfully.
    ok(&server, &["session", "delete", s]);
    watch.exits_successfully_after("session.deleted");

    // watch on a session that does not exist says so.
    let out = run(&server, &["session", "watch", s]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not found"));
}

#[test]
fn watch_from_start_replays_the_log_and_json_prints_one_object_per_line() {
    let data = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(data.path(), &[]);
    let session = laptop_session(&server, &["--message", "uname"]);
    let s = session.as_str();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let client = Client::new(&server.base, &server.token).unwrap();
    agent_turn(&rt, &client, s, "uname", "Linux\n");

    let mut watch = Lines::spawn(
        support::tether_as_admin(&server, &["session", "watch", s, "--from-start", "--json"]),
        "",
        "tether",
        None,
    );
    let first: Value = serde_json::from_str(&watch.until(|_| true)).unwrap();
    assert_eq!(first["type"], "user.message");
    assert_eq!(first["content"][0]["text"], "uname");
    let last: Value =
        serde_json::from_str(&watch.until(|l| l.contains("session.status_idle"))).unwrap();
    assert_eq!(last["stop_reason"]["type"], "end_turn");
    assert_eq!(watch.seen.len(), 6, "{:#?}", watch.seen);

    ok(&server, &["session", "delete", s]);
    assert!(watch.exit().success());
    let deleted: Value = serde_json::from_str(watch.seen.last().unwrap()).unwrap();
    assert_eq!(deleted["type"], "session.deleted");
}

#[test]
fn send_wait_says_when_no_worker_serves_the_environment_and_gives_up_at_its_timeout() {
    let data = tempfile::tempdir().unwrap();
    let server = support::ServerProcess::start(data.path(), &[]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let agent = json(
        &server,
        &["agent", "create", "--name", "shell", "--model", "none"],
    );
    let agent = agent["id"].as_str().unwrap();
    let session_on = |env: &str| {
        let session = json(
            &server,
            &["session", "create", "--agent", agent, "--env", env],
        );
        session["id"].as_str().unwrap().to_owned()
    };

    // An environment no worker has ever polled.
    let lonely = json(&server, &["env", "create", "--name", "lonely"]);
    let lonely = lonely["id"].as_str().unwrap().to_owned();
    let unserved = session_on(&lonely);
    // One whose worker polled a moment ago and found nothing (the session comes after): it may be
    // busy elsewhere, or about to poll again, so nothing is said.
    let served = json(&server, &["env", "create", "--name", "served"]);
    let served = served["id"].as_str().unwrap().to_owned();
    let key = json(&server, &["env", "key", "create", &served]);
    let worker = Client::new(&server.base, key["token"].as_str().unwrap()).unwrap();
    let poll = tether_client::PollOptions {
        block_ms: None,
        worker_id: Some("w1".into()),
        ..Default::default()
    };
    assert!(rt
        .block_on(worker.poll_work(&served, &poll))
        .unwrap()
        .is_none());
    let polled = session_on(&served);

    // Both wait at once, each until its timeout.
    let started = std::time::Instant::now();
    let waits: Vec<_> = [&unserved, &polled]
        .map(|session| {
            let mut command = support::tether_as_admin(
                &server,
                &[
                    "session",
                    "send",
                    session,
                    "hi",
                    "--wait",
                    "--timeout",
                    "8s",
                ],
            );
            command.stdin(Stdio::null());
            std::thread::spawn(move || command.output().expect("run tether"))
        })
        .into_iter()
        .map(|wait| wait.join().unwrap())
        .collect();
    // The hint (due after 5 s) does not end the wait.
    assert!(started.elapsed() >= std::time::Duration::from_secs(8));
    for out in &waits {
        assert!(!out.status.success());
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(stdout.contains("user.message"), "{stdout}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("the turn did not end within 8s"),
            "{stderr}"
        );
    }
    let stderr = String::from_utf8_lossy(&waits[0].stderr);
    assert!(
        stderr.contains(&format!(
            "its work item is queued and no worker has polled environment {lonely} in the last \
             5 minutes"
        )),
        "{stderr}"
    );
    assert_eq!(
        stderr.matches("no worker has polled").count(),
        1,
        "{stderr}"
    );
    let stderr = String::from_utf8_lossy(&waits[1].stderr);
    assert!(!stderr.contains("no worker has polled"), "{stderr}");

    // A timeout before the hint is due says why all the same, once.
    let another = session_on(&lonely);
    let out = run(
        &server,
        &[
            "session",
            "send",
            &another,
            "x",
            "--wait",
            "--timeout",
            "1s",
        ],
    );
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "the turn did not end within 1s, and has not started: its work item is queued and \
             no worker has polled environment {lonely}"
        )),
        "{stderr}"
    );
    assert_eq!(
        stderr.matches("no worker has polled").count(),
        1,
        "{stderr}"
    );

    // --timeout belongs to --wait.
    let out = run(
        &server,
        &["session", "send", &unserved, "x", "--timeout", "1s"],
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--wait"));
}

/// `send --wait` on a turn that fails: every event is shown, and the exit status and standard
/// error say that it failed. A turn that waits for the user did not fail.
#[test]
fn send_wait_fails_when_the_turn_fails() {
    let data = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(data.path(), &[]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let client = Client::new(&server.base, &server.token).unwrap();
    let session = laptop_session(&server, &[]);
    let s = session.as_str();

    // Runs `send --wait` with `message`; once the message is in the log, the agent's side answers
    // with `answer`. Returns how the command ended.
    let turn = |message: &str, answer: Vec<NewEvent>| {
        let mut command =
            support::tether_as_admin(&server, &["session", "send", s, message, "--wait"]);
        command.stdin(Stdio::null());
        let waiting = std::thread::spawn(move || command.output().expect("run tether"));
        rt.block_on(async {
            let deadline = std::time::Instant::now() + PATIENCE;
            loop {
                let log = client.list_events(s, &Default::default()).await.unwrap();
                let sent = log.data.iter().any(|e| {
                    e.kind == "user.message"
                        && serde_json::to_string(&e.fields).unwrap().contains(message)
                });
                if sent {
                    break;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "the message never came"
                );
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            client.send_events(s, &answer).await.unwrap();
        });
        waiting.join().unwrap()
    };

    let failed = turn(
        "make",
        vec![
            NewEvent::new(
                "session.error",
                json!({"error": {"type": "model_error", "message": "the model is overloaded"}}),
            ),
            NewEvent::status_idle("retries_exhausted"),
        ],
    );
    let stdout = String::from_utf8_lossy(&failed.stdout);
    let stderr = String::from_utf8_lossy(&failed.stderr);
    assert_eq!(failed.status.code(), Some(1), "{stdout}\n{stderr}");
    assert!(stdout.contains("session.error"), "{stdout}");
    assert!(
        stdout.contains("session.status_idle retries_exhausted"),
        "{stdout}"
    );
    assert!(
        stderr
            .contains("the turn failed: retries_exhausted (model_error: the model is overloaded)"),
        "{stderr}"
    );

    let asks = turn("deploy", vec![NewEvent::status_idle("requires_action")]);
    assert!(
        asks.status.success(),
        "{}",
        String::from_utf8_lossy(&asks.stderr)
    );
}

/// A cloud environment's sessions are stored and never run: creating one says so, and `send
/// --wait`, which would wait for ever, refuses before it sends anything.
#[test]
fn a_cloud_environments_session_is_said_never_to_run() {
    let data = tempfile::tempdir().unwrap();
    let server = support::ServerProcess::start(data.path(), &[]);
    let agent = json(
        &server,
        &["agent", "create", "--name", "shell", "--model", "none"],
    );
    let agent = agent["id"].as_str().unwrap();
    let env_named = |name: &str, cloud: bool| {
        let mut args = vec!["env", "create", "--name", name];
        if cloud {
            args.push("--cloud");
        }
        json(&server, &args)["id"].as_str().unwrap().to_owned()
    };
    let cloud = env_named("sandboxes", true);
    let own = env_named("laptop", false);

    let out = run(
        &server,
        &[
            "session", "create", "--agent", agent, "--env", &cloud, "--json",
        ],
    );
    assert!(out.status.success());
    let session: Value = serde_json::from_slice(&out.stdout).expect("the session as JSON");
    let session = session["id"].as_str().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("environment {cloud} is a cloud environment")),
        "{stderr}"
    );
    let out = run(&server, &["session", "send", session, "hi", "--wait"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("its turn would never end"), "{stderr}");
    let events = json(&server, &["session", "events", session]);
    assert_eq!(events["data"], serde_json::json!([]), "nothing was sent");
    // Without --wait the message is stored, as the API does.
    ok(&server, &["session", "send", session, "hi"]);

    let out = run(
        &server,
        &["session", "create", "--agent", agent, "--env", &own],
    );
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("cloud"), "{stderr}");
}

//! The shell agent alone against a real server: the test plays the worker (poll, ack, heartbeat, the
//! TETHER_* variables, the work item on standard input) and drives the session as a user would.

use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;
use tether_client::{
    Client, Event, HeartbeatOptions, ListEvents, ListParams, NewEvent, PollOptions, SessionStatus,
    WorkItem,
};
use tether_testkit::client::environment_agent_and_session;
use tether_testkit::{Backend, TestServer};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};
use tokio::task::JoinHandle;

const AGENT: &str = env!("CARGO_BIN_EXE_tether-shell-agent");
const WORKER_ID: &str = "agent-test-worker";
/// How long to wait for something that should happen in well under a second before calling it a hang.
const PATIENCE: Duration = Duration::from_secs(60);

struct Served {
    admin: Client,
    env_id: String,
    session_id: String,
    item: WorkItem,
    item_client: Client,
    heartbeats: JoinHandle<()>,
}

/// An environment, an agent and a session, and the session's work item claimed the way `tether
/// worker` claims it: poll, ack, first heartbeat, and a heartbeat loop.
async fn claimed_session(server: &TestServer) -> Served {
    let admin = Client::new(&server.base, &server.admin_token).unwrap();
    let (env, _agent, session) = environment_agent_and_session(&admin, "shell").await;
    let poll = PollOptions {
        block_ms: Some(999),
        worker_id: Some(WORKER_ID.into()),
        ..Default::default()
    };
    let item = loop {
        if let Some(item) = admin.poll_work(&env.id, &poll).await.unwrap() {
            break item;
        }
    };
    assert_eq!(item.session_id(), Some(session.id.as_str()));
    let secret = item
        .decode_secret()
        .unwrap()
        .expect("a polled item has a secret");
    admin
        .ack_work(&env.id, &item.id, Some(WORKER_ID))
        .await
        .unwrap();
    let item_client = Client::for_work_secret(&secret, &server.base).unwrap();
    let heartbeats = {
        let (client, env_id, work_id) = (item_client.clone(), env.id.clone(), item.id.clone());
        tokio::spawn(async move {
            let mut options = HeartbeatOptions::first();
            options.worker_id = Some(WORKER_ID.into());
            loop {
                // The item stops when the test is done with it; so do the heartbeats.
                let Ok(beat) = client.heartbeat(&env_id, &work_id, &options).await else {
                    return;
                };
                options.expected_last_heartbeat = Some(beat.last_heartbeat);
                tokio::time::sleep(Duration::from_secs(u64::from(beat.ttl_seconds / 2).max(1)))
                    .await;
            }
        })
    };
    Served {
        admin,
        env_id: env.id,
        session_id: session.id,
        item,
        item_client,
        heartbeats,
    }
}

/// Starts the agent the way `tether worker` runs its program, and waits until it serves the session.
async fn spawn_agent(
    server: &TestServer,
    served: &Served,
    dir: &std::path::Path,
    args: &[&str],
) -> Child {
    let secret = served.item.decode_secret().unwrap().unwrap();
    let mut command = Command::new(AGENT);
    command
        .args(args)
        .current_dir(dir)
        .env("TETHER_API_URL", format!("{}/api/v1/cloud", server.base))
        .env("TETHER_WORK_ID", &served.item.id)
        .env("TETHER_ENVIRONMENT_ID", &served.env_id)
        .env("TETHER_SESSION_ID", &served.session_id)
        .env("TETHER_SESSION_TOKEN", &secret.sessions_token)
        .env_remove("TETHER_AGENT_MAX_IDLE")
        .env_remove("TETHER_AGENT_COMMAND_TIMEOUT")
        .env_remove("TETHER_AGENT_MAX_OUTPUT")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = command.spawn().expect("spawn the agent");
    let mut stdin = child.stdin.take().unwrap();
    stdin
        .write_all(serde_json::to_string(&served.item).unwrap().as_bytes())
        .await
        .unwrap();
    drop(stdin);
    until_serving(&mut child).await;
    child
}

/// Waits until the agent says it serves the session (it then follows the stream), passing its log on.
async fn until_serving(child: &mut Child) {
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let mut lines = BufReader::new(stderr).lines();
        let mut tx = Some(tx);
        while let Ok(Some(line)) = lines.next_line().await {
            eprintln!("{line}");
            if line.contains("serving session") {
                if let Some(tx) = tx.take() {
                    let _ = tx.send(());
                }
            }
        }
    });
    tokio::time::timeout(PATIENCE, rx)
        .await
        .expect("the agent did not start")
        .expect("the agent exited before serving");
}

async fn events(client: &Client, session_id: &str) -> Vec<Event> {
    tether_client::collect_all(|cursor| {
        let client = client.clone();
        let params = ListEvents {
            list: ListParams {
                limit: Some(100),
                page: cursor,
                ..Default::default()
            },
            order: None,
        };
        let id = session_id.to_owned();
        async move { client.list_events(&id, &params).await }
    })
    .await
    .unwrap()
}

/// The events after `after` once a `session.status_idle` has arrived among them.
async fn turn_after(client: &Client, session_id: &str, after: &str) -> Vec<Event> {
    let wait = async {
        loop {
            let later: Vec<Event> = events(client, session_id)
                .await
                .into_iter()
                .filter(|e| e.id.as_str() > after)
                .collect();
            if later.iter().any(|e| e.kind == "session.status_idle") {
                return later;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    tokio::time::timeout(PATIENCE, wait)
        .await
        .expect("the turn did not end")
}

/// Waits until the agent has started a command for a message after `after`.
async fn until_tool_use(client: &Client, session_id: &str, after: &str) {
    let started = async {
        loop {
            let all = events(client, session_id).await;
            if all
                .iter()
                .any(|e| e.id.as_str() > after && e.kind == "agent.tool_use")
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::time::timeout(PATIENCE, started)
        .await
        .expect("the agent never started the command");
}

/// Waits for the agent to exit, which it must do with status 0; `on_hang` is the failure when it does
/// not exit at all.
async fn exits_cleanly(agent: &mut Child, on_hang: &str) {
    let status = tokio::time::timeout(PATIENCE, agent.wait())
        .await
        .expect(on_hang)
        .unwrap();
    assert!(status.success(), "{status}");
}

/// Asserts that the turn holds a command result, and that it is an error.
#[track_caller]
fn assert_failed_result(turn: &[Event]) {
    let result = turn
        .iter()
        .find(|e| e.kind == "agent.tool_result")
        .expect("a result");
    assert_eq!(result.fields["is_error"], Value::Bool(true));
}

fn kinds(events: &[Event]) -> Vec<&str> {
    events.iter().map(|e| e.kind.as_str()).collect()
}

fn result_text(event: &Event) -> String {
    event.fields["content"][0]["text"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

/// A served turn: the command, its result naming it, a message, and the end of the turn.
fn check_turn(turn: &[Event], command: &str) -> (Event, Event) {
    assert_eq!(
        kinds(turn),
        vec![
            "session.status_running",
            "agent.tool_use",
            "agent.tool_result",
            "agent.message",
            "session.status_idle"
        ],
        "{turn:#?}"
    );
    let tool_use = &turn[1];
    assert_eq!(tool_use.fields["name"], "shell");
    assert_eq!(tool_use.fields["input"]["command"], command);
    let result = &turn[2];
    assert_eq!(result.fields["tool_use_id"], tool_use.id.as_str());
    assert_eq!(turn[4].fields["stop_reason"]["type"], "end_turn");
    (tool_use.clone(), result.clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_a_waiting_message_then_exits_when_idle() {
    let server = TestServer::start(&Backend::Sqlite).await;
    let served = claimed_session(&server).await;
    let dir = tempfile::tempdir().unwrap();

    // The message is there before the agent starts, as when a session is created with one.
    let sent = served
        .admin
        .send_events(&served.session_id, &[NewEvent::user_message("echo hello")])
        .await
        .unwrap();
    let mut agent = spawn_agent(&server, &served, dir.path(), &["--max-idle", "1s"]).await;

    let turn = turn_after(&served.admin, &served.session_id, &sent[0].id).await;
    let (_, result) = check_turn(&turn, "echo hello");
    assert_eq!(result_text(&result), "hello\n");
    assert_eq!(result.fields["is_error"], false);
    assert_eq!(
        served
            .admin
            .get_session(&served.session_id)
            .await
            .unwrap()
            .status,
        SessionStatus::Idle
    );

    // Nothing more comes: the agent leaves by itself, and the worker stops the item.
    exits_cleanly(&mut agent, "the idle agent did not exit").await;
    served.heartbeats.abort();
    let stopped = served
        .item_client
        .stop_work(&served.env_id, &served.item.id, true)
        .await
        .unwrap();
    assert_eq!(stopped.state.as_str(), "stopped");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follows_the_stream_runs_in_its_directory_and_can_be_interrupted() {
    let server = TestServer::start(&Backend::Sqlite).await;
    let served = claimed_session(&server).await;
    let dir = tempfile::tempdir().unwrap();
    let mut agent = spawn_agent(&server, &served, dir.path(), &["--max-idle", "0"]).await;
    let admin = &served.admin;
    let session = served.session_id.as_str();

    // A message sent while the agent waits arrives through the live stream.
    let sent = admin
        .send_events(
            session,
            &[NewEvent::user_message(
                "echo hello; pwd; echo oops >&2; exit 3",
            )],
        )
        .await
        .unwrap();
    let turn = turn_after(admin, session, &sent[0].id).await;
    let (_, result) = check_turn(&turn, "echo hello; pwd; echo oops >&2; exit 3");
    let expected_dir = dir.path().canonicalize().unwrap();
    assert_eq!(
        result_text(&result),
        format!("hello\n{}\noops\n", expected_dir.display())
    );
    assert_eq!(result.fields["is_error"], true);
    assert!(
        turn[3].text().unwrap().contains("exit status 3"),
        "{:?}",
        turn[3]
    );

    // A long command is killed by an interrupt, and the turn still ends properly.
    let sent = admin
        .send_events(
            session,
            &[NewEvent::user_message("echo started; sleep 1000")],
        )
        .await
        .unwrap();
    until_tool_use(admin, session, &sent[0].id).await;
    assert!(admin.cancel_session(session).await.unwrap().is_canceling());
    let turn = turn_after(admin, session, &sent[0].id).await;
    assert_failed_result(&turn);
    assert!(turn.iter().any(|e| e.kind == "user.interrupt"));
    assert_eq!(
        turn.last().unwrap().fields["stop_reason"]["type"],
        "end_turn"
    );
    assert_eq!(
        admin.get_session(session).await.unwrap().status,
        SessionStatus::Idle
    );

    // Deleting the session ends the agent, however long it was willing to wait.
    admin.delete_session(session).await.unwrap();
    exits_cleanly(
        &mut agent,
        "the agent did not exit after the session was deleted",
    )
    .await;
    served.heartbeats.abort();
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_kills_the_command_reports_it_and_ends_the_turn() {
    let server = TestServer::start(&Backend::Sqlite).await;
    let served = claimed_session(&server).await;
    let dir = tempfile::tempdir().unwrap();
    let mut agent = spawn_agent(&server, &served, dir.path(), &["--max-idle", "0"]).await;
    let admin = &served.admin;
    let session = served.session_id.as_str();

    let sent = admin
        .send_events(session, &[NewEvent::user_message("sleep 1000")])
        .await
        .unwrap();
    until_tool_use(admin, session, &sent[0].id).await;

    // What `tether worker` does when the item is to stop.
    let pid = nix::unistd::Pid::from_raw(agent.id().unwrap() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    exits_cleanly(&mut agent, "the agent did not exit on SIGTERM").await;

    let turn = turn_after(admin, session, &sent[0].id).await;
    assert_failed_result(&turn);
    assert_eq!(turn.last().unwrap().fields["stop_reason"]["type"], "error");
    assert_eq!(
        admin.get_session(session).await.unwrap().status,
        SessionStatus::Idle
    );
    served.heartbeats.abort();
    server.shutdown().await;
}

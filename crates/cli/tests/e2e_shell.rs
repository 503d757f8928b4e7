//! End to end, as a new user would run it: `tether serve`, a `tether worker` running the example shell
//! agent, and a session talked to with `tether session send` and followed with `tether session watch`.
//! When the agent has been idle long enough its item stops; the next message wakes the dormant session
//! with a new item, which another worker process serves.

mod support;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use serde_json::Value;
use support::lines::{Lines, PATIENCE};
use support::{id, ServerProcess};

fn tether(server: &ServerProcess, args: &[&str]) -> Command {
    let mut command = support::tether_as_admin(server, args);
    command.env("TETHER_LOG", "info");
    command
}

/// Runs an admin command that must succeed and print JSON (`--json` is added).
fn json(server: &ServerProcess, args: &[&str]) -> Value {
    let out = tether(server, args)
        .arg("--json")
        .stdin(Stdio::null())
        .output()
        .expect("run tether");
    support::json_output(args, &out)
}

/// `tether worker` with the shell agent as its program, in `sandbox` (the commands' directory).
fn worker(server: &ServerProcess, env: &str, key: &str, name: &str, sandbox: &Path) -> Lines {
    let agent = support::shell_agent();
    let mut command = tether(
        server,
        &[
            "worker",
            "--environment",
            env,
            "--key",
            key,
            "--worker-id",
            name,
            "--",
        ],
    );
    command
        .arg(&agent)
        .args(["--max-idle", "2s"])
        .current_dir(sandbox);
    Lines::spawn(command, "", name, Some("worker started"))
}

/// The session's work items, oldest first.
fn items(server: &ServerProcess, env: &str) -> Vec<Value> {
    json(server, &["work", "list", env, "--all"])["data"]
        .as_array()
        .unwrap()
        .clone()
}

/// Waits until `check` holds of the environment's items.
fn wait_for_items(server: &ServerProcess, env: &str, what: &str, check: impl Fn(&[Value]) -> bool) {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let now = items(server, env);
        if check(&now) {
            return;
        }
        assert!(Instant::now() < deadline, "never {what}: {now:#?}");
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

/// Who each delivery of an item went to.
fn delivered_to(server: &ServerProcess, env: &str, work: &str) -> Vec<String> {
    json(server, &["work", "history", env, work, "--all"])["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["cause"] == "delivered")
        .map(|t| t["worker_id"].as_str().unwrap_or("").to_owned())
        .collect()
}

#[test]
fn a_session_served_by_workers_on_this_machine() {
    let data = tempfile::tempdir().unwrap();
    let sandbox = tempfile::tempdir().unwrap();
    let sandbox_path = sandbox.path().canonicalize().unwrap();
    let server = ServerProcess::start(data.path(), &[]);

    let env = id(&json(&server, &["env", "create", "--name", "laptop"]));
    let key = json(&server, &["env", "key", "create", &env, "--name", "laptop"]);
    let key = key["token"].as_str().unwrap().to_owned();
    let agent = id(&json(
        &server,
        &["agent", "create", "--name", "shell", "--model", "none"],
    ));
    let session = id(&json(
        &server,
        &["session", "create", "--agent", &agent, "--env", &env],
    ));
    let s = session.as_str();
    let first_item = id(&items(&server, &env)[0]);

    let mut watch = Lines::spawn(
        tether(&server, &["session", "watch", s]),
        "",
        "watch",
        Some("Watching session"),
    );

    // The first message waits in the log until a worker takes the session's item.
    json(&server, &["session", "send", s, "echo hello"]);
    let mut worker_a = worker(&server, &env, &key, "worker-a", sandbox.path());

    let line = watch.until(|l| l.contains("agent.tool_use"));
    assert!(line.ends_with("shell: echo hello"), "{line:?}");
    let line = watch.until(|l| l.contains("agent.tool_result"));
    assert!(line.ends_with("agent.tool_result   hello"), "{line:?}");
    watch.until(|l| l.contains("agent.message") && l.contains("exit status 0"));
    let line = watch.until(|l| l.contains("session.status_idle"));
    assert!(line.ends_with("end_turn"), "{line:?}");
    assert_eq!(json(&server, &["session", "get", s])["status"], "idle");

    // No more input: the agent leaves after its idle time, and the worker stops the item.
    wait_for_items(&server, &env, "stopped the first item", |items| {
        items
            .iter()
            .all(|i| i["state"] == "stopped" && i["id"] == first_item.as_str())
    });
    let item = json(&server, &["work", "get", &env, &first_item]);
    assert_eq!(item["metadata"]["tether.exit_code"], "0", "{item}");
    assert_eq!(delivered_to(&server, &env, &first_item), ["worker-a"]);
    let status = worker_a.terminate();
    assert!(status.success(), "{status}");

    // The dormant session wakes up: the next message queues a new item ...
    json(&server, &["session", "send", s, "pwd"]);
    let queued = items(&server, &env);
    assert_eq!(queued.len(), 2, "{queued:#?}");
    let second_item = id(&queued[1]);
    assert_eq!(queued[1]["state"], "queued");
    assert_eq!(queued[1]["data"]["id"], s);

    // ... which another worker process serves, in its sandbox.
    let mut worker_b = worker(&server, &env, &key, "worker-b", sandbox.path());
    let line = watch.until(|l| l.contains("agent.tool_result"));
    assert!(
        line.ends_with(&format!("agent.tool_result   {}", sandbox_path.display())),
        "{line:?}"
    );
    watch.until(|l| l.contains("session.status_idle"));
    wait_for_items(&server, &env, "stopped the second item", |items| {
        items.iter().all(|i| i["state"] == "stopped")
    });
    assert_eq!(delivered_to(&server, &env, &second_item), ["worker-b"]);

    // Each turn appears once, in order.
    let turns: Vec<&String> = watch
        .seen
        .iter()
        .filter(|l| l.contains("user.message"))
        .collect();
    assert_eq!(turns.len(), 2, "{:#?}", watch.seen);
    assert!(turns[0].ends_with("echo hello") && turns[1].ends_with("pwd"));

    // Deleting the session ends the watch.
    json(&server, &["session", "delete", s]);
    assert!(watch.exit().success());
    assert!(worker_b.terminate().success());
}

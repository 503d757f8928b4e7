//! The real `tether` binary: `tether serve` on a free port with a temporary data directory, driven by
//! the admin commands exactly as a person or a script would run them.

mod support;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::{json, Value};
use support::{id, AMBIENT, BIN};
use tether_testkit::string_fields;

/// A `tether serve` child process; killed on drop.
struct Server {
    child: Child,
    url: String,
    data: tempfile::TempDir,
}

impl Server {
    fn start() -> Server {
        let data = tempfile::tempdir().expect("temp dir");
        let mut command = Command::new(BIN);
        command
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(data.path())
            .env("TETHER_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for name in AMBIENT {
            command.env_remove(name);
        }
        let mut child = command.spawn().expect("spawn tether serve");
        // The server announces the address it bound; keep draining its stderr afterwards so that it
        // never blocks on a full pipe.
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(rest) = line.strip_prefix("tether listening on ") {
                    let url = rest.split_whitespace().next().unwrap_or("").to_owned();
                    let _ = tx.send(url);
                }
            }
        });
        let url = match rx.recv_timeout(Duration::from_secs(120)) {
            Ok(url) => url,
            Err(_) => {
                let _ = child.kill();
                panic!("tether serve did not start: {:?}", child.wait());
            }
        };
        Server { child, url, data }
    }

    fn data_dir(&self) -> &Path {
        self.data.path()
    }

    /// Runs `tether ARGS` against this server; the token comes from the data directory.
    fn run(&self, args: &[&str]) -> Output {
        let mut command = Command::new(BIN);
        command
            .args(args)
            .env("TETHER_SERVER", &self.url)
            .env("TETHER_DATA_DIR", self.data_dir())
            .stdin(Stdio::null());
        for name in AMBIENT
            .iter()
            .filter(|n| !matches!(**n, "TETHER_SERVER" | "TETHER_DATA_DIR"))
        {
            command.env_remove(name);
        }
        command.output().expect("run tether")
    }

    /// Runs a command that must succeed and prints JSON (`--json` is added).
    fn json(&self, args: &[&str]) -> Value {
        let mut args = args.to_vec();
        args.push("--json");
        let out = self.run(&args);
        support::json_output(&args, &out)
    }

    /// Runs a command that must fail; returns its stderr.
    fn fails(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            !out.status.success(),
            "tether {args:?} unexpectedly succeeded:\n{}",
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn admin_commands_drive_a_real_server() {
    let server = Server::start();

    // Environments, with the admin token read from the data directory.
    let env = server.json(&[
        "env",
        "create",
        "--name",
        "laptop",
        "--self-hosted",
        "--description",
        "my box",
        "--metadata",
        "team=a",
        "--metadata",
        "drop=me",
    ]);
    let env_id = id(&env);
    assert!(env_id.starts_with("env_"), "{env}");
    assert_eq!(env["config"]["type"], "self_hosted");
    assert_eq!(env["description"], "my box");
    assert_eq!(env["metadata"]["team"], "a");
    let cloud = server.json(&["env", "create", "--name", "managed", "--cloud"]);
    assert_eq!(cloud["config"]["type"], "cloud");
    assert_eq!(server.json(&["env", "get", &env_id])["name"], "laptop");
    let updated = server.json(&[
        "env",
        "update",
        &env_id,
        "--name",
        "desk",
        "--metadata",
        "x=1",
        "--unset-metadata",
        "drop",
    ]);
    assert_eq!(updated["name"], "desk");
    assert_eq!(
        updated["metadata"],
        serde_json::json!({"team": "a", "x": "1"})
    );
    let first = server.json(&["env", "list", "--limit", "1"]);
    assert_eq!(first["data"].as_array().unwrap().len(), 1);
    assert_eq!(first["has_more"], true);
    let all = server.json(&["env", "list", "--limit", "1", "--all"]);
    let ids = string_fields(&all["data"], "id");
    assert_eq!(ids, vec![env_id.as_str(), cloud["id"].as_str().unwrap()]);

    // Worker keys.
    let key = server.json(&["env", "key", "create", &env_id, "--name", "box-1"]);
    assert!(
        key["token"].as_str().unwrap().starts_with("tth_env_"),
        "{key}"
    );
    let keys = server.json(&["env", "key", "list", &env_id]);
    assert_eq!(keys["data"][0]["id"], key["id"]);
    assert!(keys["data"][0].get("token").is_none(), "{keys}");
    let revoked = server.json(&["env", "key", "revoke", &env_id, &id(&key)]);
    assert!(revoked["revoked_at"].is_string(), "{revoked}");

    // Agents.
    let agent = server.json(&[
        "agent",
        "create",
        "--name",
        "helper",
        "--model",
        "model-a",
        "--system",
        "be brief",
        "--tools",
        r#"[{"type": "bash"}]"#,
    ]);
    let agent_id = id(&agent);
    assert_eq!(agent["version"], 1);
    assert_eq!(agent["tools"][0]["type"], "bash");
    let v2 = server.json(&["agent", "update", &agent_id, "--model", "model-b"]);
    assert_eq!(
        (v2["version"].as_u64(), v2["model"].as_str()),
        (Some(2), Some("model-b"))
    );
    assert_eq!(server.json(&["agent", "get", &agent_id])["version"], 2);
    assert_eq!(
        server.json(&["agent", "list"])["data"][0]["id"],
        agent_id.as_str()
    );

    // Sessions: creating one queues a work item on the self-hosted environment.
    let session = server.json(&[
        "session",
        "create",
        "--agent",
        &agent_id,
        "--env",
        &env_id,
        "--title",
        "first",
        "--metadata",
        "job=report",
        "--env-var",
        "MODE=fast",
    ]);
    let session_id = id(&session);
    assert_eq!(session["agent_id"], agent_id.as_str());
    assert_eq!(session["environment_id"], env_id.as_str());
    assert_eq!(session["environment_variables"]["MODE"], "fast");
    let listed = server.json(&["session", "list", "--env", &env_id, "--status", "idle"]);
    assert_eq!(listed["data"][0]["id"], session_id.as_str());
    let listed = server.json(&["session", "list", "--status", "running,idle"]);
    assert_eq!(listed["data"][0]["id"], session_id.as_str());
    // A status that is none is the flag's mistake, said in its terms before anything is sent.
    let out = server.run(&["session", "list", "--status", "idel"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("'--status <STATUS>'") && err.contains("idle, running, rescheduling"),
        "{err}"
    );
    let renamed = server.json(&["session", "update", &session_id, "--title", "second"]);
    assert_eq!(renamed["title"], "second");
    assert_eq!(
        server.json(&["session", "get", &session_id])["title"],
        "second"
    );

    // Work.
    let work = server.json(&["work", "list", &env_id]);
    let item = &work["data"][0];
    let work_id = id(item);
    assert_eq!(item["state"], "queued");
    assert_eq!(item["data"]["id"], session_id.as_str());
    assert_eq!(item["metadata"]["job"], "report");
    assert_eq!(
        server.json(&["work", "get", &env_id, &work_id])["id"],
        work_id.as_str()
    );
    let stats = server.json(&["work", "stats", &env_id]);
    assert_eq!(
        (stats["depth"].as_u64(), stats["pending"].as_u64()),
        (Some(1), Some(0))
    );
    let stopped = server.json(&["work", "stop", &env_id, &work_id, "--force"]);
    assert_eq!(stopped["state"], "stopped");
    let history = server.json(&["work", "history", &env_id, &work_id, "--all"]);
    let causes = string_fields(&history["data"], "cause");
    assert_eq!(causes, vec!["enqueued", "force_stopped"]);
    let err = server.fails(&["work", "stop", &env_id, &work_id]);
    // The whole envelope as the client renders it, not a bare "409" (which an id may contain).
    assert!(
        err.contains("(409 invalid_request_error, request id "),
        "{err}"
    );
    assert!(
        err.contains("is stopped, which does not allow stop"),
        "{err}"
    );
    assert_eq!(
        server.json(&["work", "workers", &env_id])["data"],
        serde_json::json!([])
    );

    // Tearing down: a referenced environment refuses deletion until its session is gone.
    let err = server.fails(&["env", "delete", &env_id]);
    assert!(
        err.contains("(409 invalid_request_error, request id "),
        "{err}"
    );
    assert!(err.contains("delete them first"), "{err}");
    let archived = server.json(&["session", "archive", &session_id]);
    assert!(archived["archived_at"].is_string());
    let deleted = server.json(&["session", "delete", &session_id]);
    assert_eq!(deleted["type"], "session_deleted");
    assert!(server.json(&["agent", "archive", &agent_id])["archived_at"].is_string());
    assert_eq!(
        server.json(&["env", "archive", &id(&cloud)])["status"],
        "archived"
    );
    let gone = server.json(&["env", "delete", &env_id]);
    assert_eq!(gone["type"], "environment_deleted");
    let err = server.fails(&["env", "get", &env_id]);
    assert!(
        err.contains(&format!("not found: no environment {env_id}")),
        "{err}"
    );

    // Admin tokens: a new one works until it is revoked.
    let token = server.json(&["token", "create", "--name", "ci"]);
    let secret = token["token"].as_str().unwrap().to_owned();
    assert!(secret.starts_with("tth_adm_"));
    let tokens = server.json(&["token", "list", "--token", &secret]);
    assert!(tokens["data"]
        .as_array()
        .unwrap()
        .iter()
        .any(|t| t["id"] == token["id"] && t["name"] == "ci"));
    let revoked = server.run(&["token", "revoke", &id(&token)]);
    assert!(revoked.status.success());
    let said = String::from_utf8_lossy(&revoked.stderr);
    assert!(!said.contains("last admin token"), "{said}");
    let err = server.fails(&["token", "list", "--token", &secret]);
    assert!(err.contains("rejected the admin token"), "{err}");
}

/// `tether … --json | head -1` on a long answer: the reader goes away and the command ends as a
/// Unix filter does (SIGPIPE), without a panic's message.
#[test]
fn an_answer_into_a_closed_pipe_ends_the_command_quietly() {
    use std::os::unix::process::ExitStatusExt as _;
    let server = Server::start();
    let env = id(&server.json(&["env", "create", "--name", "piped"]));
    let (reader, writer) = std::io::pipe().expect("a pipe");
    // Closed before the command writes: its first write finds no reader.
    drop(reader);
    let mut command = Command::new(BIN);
    command
        .args(["env", "get", &env, "--json"])
        .env("TETHER_SERVER", &server.url)
        .env("TETHER_DATA_DIR", server.data_dir())
        .stdin(Stdio::null())
        .stdout(writer);
    for name in AMBIENT
        .iter()
        .filter(|n| !matches!(**n, "TETHER_SERVER" | "TETHER_DATA_DIR"))
    {
        command.env_remove(name);
    }
    let out = command.output().expect("run tether");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.signal(),
        Some(13),
        "ended by SIGPIPE: {:?}\n{stderr}",
        out.status
    );
    assert!(stderr.is_empty(), "{stderr}");
}

#[test]
fn revoking_the_last_admin_token_says_how_to_get_one_back() {
    let server = Server::start();
    let bootstrap = server.json(&["token", "list"])["data"][0]["id"]
        .as_str()
        .expect("the bootstrap token is listed")
        .to_owned();
    let spare = server.json(&["token", "create", "--name", "spare"]);
    let spare_secret = spare["token"].as_str().unwrap().to_owned();

    let first = server.run(&["token", "revoke", &bootstrap, "--token", &spare_secret]);
    assert!(first.status.success());
    let said = String::from_utf8_lossy(&first.stderr);
    assert!(!said.contains("last admin token"), "one is left: {said}");

    // The spare revokes itself: the CLI's own token, and the last one. Refused unless asked
    // for in so many words.
    let refused = server.run(&["token", "revoke", &id(&spare), "--token", &spare_secret]);
    assert!(!refused.status.success());
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(
        said.contains("is the last admin token") && said.contains("--even-if-last"),
        "{said}"
    );
    let listed = server.json(&["token", "list", "--token", &spare_secret]);
    assert!(
        listed["data"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["id"] == id(&spare) && t["revoked_at"].is_null()),
        "{listed}"
    );
    let last = server.run(&[
        "token",
        "revoke",
        &id(&spare),
        "--even-if-last",
        "--token",
        &spare_secret,
    ]);
    assert!(last.status.success());
    let said = String::from_utf8_lossy(&last.stderr);
    assert!(
        said.contains("last admin token") && said.contains("restarted"),
        "{said}"
    );
    let err = server.fails(&["token", "list", "--token", &spare_secret]);
    assert!(err.contains("rejected the admin token"), "{err}");
}

#[test]
fn tables_for_people_and_errors_that_say_what_to_do() {
    let server = Server::start();
    let created = server.run(&["env", "create", "--name", "laptop"]);
    assert!(created.status.success());
    let shown = String::from_utf8(created.stdout).unwrap();
    assert!(
        shown.contains("kind:") && shown.contains("self_hosted"),
        "{shown}"
    );

    let out = server.run(&["env", "list"]);
    assert!(out.status.success());
    let table = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 2, "{table}");
    let header = lines[0];
    assert!(header.starts_with("ID "), "{table}");
    // Columns are aligned: each value starts where its header does.
    for (column, value) in [
        ("NAME", "laptop"),
        ("KIND", "self_hosted"),
        ("STATUS", "ready"),
    ] {
        assert_eq!(header.find(column), lines[1].find(value), "{table}");
    }

    // A wrong token: non-zero exit, and where tokens come from.
    let err = server.fails(&["env", "list", "--token", "tth_adm_not-a-real-token"]);
    assert!(err.contains("rejected the admin token"), "{err}");
    assert!(
        err.contains("--token") && err.contains("TETHER_TOKEN"),
        "{err}"
    );
    assert!(err.contains("admin-token"), "{err}");

    // No token at all.
    let out = Command::new(BIN)
        .args(["env", "list", "--server", &server.url, "--data-dir"])
        .arg(server.data_dir().join("missing"))
        .env_remove("TETHER_TOKEN")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no admin token") && err.contains("TETHER_TOKEN"),
        "{err}"
    );

    // Nothing listening.
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", listener.local_addr().unwrap())
    };
    let err = server.fails(&["env", "list", "--server", &closed]);
    assert!(
        err.contains(&format!("is `tether serve` running at {closed}?")),
        "{err}"
    );
}

#[test]
fn a_server_url_with_the_api_path_is_refused_with_the_base_url_to_give() {
    let server = Server::start();
    // The shape a worker's program sees in TETHER_API_URL.
    for path in ["/api/v1/cloud", "/api/v1/cloud/", "/v1"] {
        let url = format!("{}{path}", server.url);
        let err = server.fails(&["env", "list", "--server", &url]);
        assert!(
            err.contains(&format!("give the server's base URL ({})", server.url)),
            "{err}"
        );
        assert!(!err.contains("not found"), "{err}");
    }
}

/// An agent update that changes nothing would still make a new version: it is refused as a usage
/// error before anything is sent.
#[test]
fn an_agent_update_without_a_change_is_refused() {
    let server = Server::start();
    let agent = server.json(&["agent", "create", "--name", "a", "--model", "none"]);
    let id = agent["id"].as_str().unwrap();
    let out = server.run(&["agent", "update", id]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("nothing to update: give at least one of --name, --model"),
        "{err}"
    );
    assert!(err.contains("Usage: tether agent update"), "{err}");
    assert_eq!(server.json(&["agent", "get", id])["version"], 1);
    let updated = server.json(&["agent", "update", id, "--name", "b"]);
    assert_eq!(updated["version"], 2);
}

/// `--env-var` takes what an agent's commands can read as an environment variable; any other name
/// (a space, a dash, a leading digit) is a usage error, and no session is created.
#[test]
fn an_env_var_that_no_shell_can_read_is_refused() {
    let server = Server::start();
    let env = id(&server.json(&["env", "create", "--name", "e"]));
    let agent = id(&server.json(&["agent", "create", "--name", "a", "--model", "none"]));
    let create = |env_var| {
        [
            "session",
            "create",
            "--agent",
            &agent,
            "--env",
            &env,
            "--env-var",
            env_var,
        ]
    };
    for bad in ["BAD NAME=1", "A-B=1", "1ST=x", "=x", "NO_VALUE"] {
        let out = server.run(&create(bad));
        assert_eq!(out.status.code(), Some(2), "{bad}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("--env-var"), "{bad}: {err}");
    }
    let sessions = server.json(&["session", "list", "--env", &env]);
    assert_eq!(sessions["data"].as_array().map(Vec::len), Some(0));
    let session = server.json(&create("_Ok_2=a=b"));
    assert_eq!(session["environment_variables"]["_Ok_2"], "a=b");
}

/// Updates of environments and sessions without a change flag are refused as usage errors too, as
/// an agent's are: they would only move `updated_at`.
#[test]
fn environment_and_session_updates_without_a_change_are_refused() {
    let server = Server::start();
    let env = server.json(&["env", "create", "--name", "e"]);
    let agent = server.json(&["agent", "create", "--name", "a", "--model", "none"]);
    let session = server.json(&[
        "session",
        "create",
        "--agent",
        &id(&agent),
        "--env",
        &id(&env),
    ]);
    for (command, id, flags) in [
        ("env", id(&env), "--name, --description, --setup-script"),
        ("session", id(&session), "--title, --metadata"),
    ] {
        let out = server.run(&[command, "update", &id]);
        assert_eq!(out.status.code(), Some(2), "{command}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(&format!("nothing to update: give at least one of {flags}")),
            "{err}"
        );
        assert!(
            err.contains(&format!("Usage: tether {command} update")),
            "{err}"
        );
    }
}

/// A self-hosted environment's setup script is set, shown and removed from the CLI; the rest of
/// its config stays as it was.
#[test]
fn an_environments_setup_script_is_changed_and_shown() {
    let server = Server::start();
    let env = server.json(&[
        "env",
        "create",
        "--name",
        "e",
        "--setup-script",
        "apt-get install foo",
    ]);
    let env_id = &id(&env);
    let shown = server.run(&["env", "get", env_id]);
    let shown = String::from_utf8_lossy(&shown.stdout);
    assert!(shown.contains("apt-get install foo"), "{shown}");
    let updated = server.json(&[
        "env",
        "update",
        env_id,
        "--setup-script",
        "make\nmake install",
    ]);
    assert_eq!(updated["config"]["setup_script"], "make\nmake install");
    assert_eq!(updated["config"]["type"], "self_hosted");
    let shown = server.run(&["env", "get", env_id]);
    let shown = String::from_utf8_lossy(&shown.stdout);
    assert!(shown.contains("make … (1 more lines"), "{shown}");
    let removed = server.json(&["env", "update", env_id, "--setup-script", ""]);
    assert_eq!(removed["config"], json!({"type": "self_hosted"}));
}

/// A token given blank is a mistake, not a wish for the admin-token file; a page size outside what
/// the help says is refused before anything is sent.
#[test]
fn a_blank_token_and_a_page_size_out_of_range_are_refused() {
    let server = Server::start();
    for (args, refusal) in [
        (
            vec!["env", "list", "--token", ""],
            "a value is required for '--token",
        ),
        (
            vec!["env", "list", "--token", "  "],
            "--token (TETHER_TOKEN) is blank",
        ),
        (
            vec!["env", "list", "--limit", "101"],
            "101 is not in 1..=100",
        ),
        (vec!["env", "list", "--limit", "0"], "0 is not in 1..=100"),
    ] {
        let err = server.fails(&args);
        assert!(err.contains(refusal), "{args:?}: {err}");
    }
    // The variable given empty counts as unset, as every TETHER_ variable does: the file is read.
    let out = support::tether_command()
        .args(["env", "list"])
        .env("TETHER_SERVER", &server.url)
        .env("TETHER_DATA_DIR", server.data_dir())
        .env("TETHER_TOKEN", "")
        .output()
        .expect("run tether");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A connection setting that cannot be used is named alone, and quoted as given.
#[test]
fn a_bad_server_url_or_ca_file_is_named() {
    let server = Server::start();
    let err = server.fails(&["env", "list", "--server", "http://"]);
    assert!(
        err.starts_with("error: invalid --server / TETHER_SERVER: "),
        "{err}"
    );
    assert!(
        err.contains("the server URL \"http://\" is not a URL"),
        "{err}"
    );
    assert!(!err.contains("--ca-cert"), "{err}");
    let missing = server.data_dir().join("no-such-ca.pem");
    let err = server.fails(&["env", "list", "--ca-cert", missing.to_str().unwrap()]);
    assert!(
        err.starts_with("error: invalid --ca-cert / TETHER_CA_CERT: "),
        "{err}"
    );
    assert!(err.contains("cannot read the CA certificate file"), "{err}");
    assert!(!err.contains("TETHER_SERVER"), "{err}");
}

/// A variable set to nothing (a unit's `EnvironmentFile` line with no value) counts as unset: flags
/// with a default keep it, and a required one is missing rather than empty.
#[test]
fn empty_variables_count_as_unset() {
    let server = Server::start();
    let token = std::fs::read_to_string(server.data_dir().join("admin-token")).unwrap();
    let out = support::tether_command()
        .args(["env", "list", "--server", &server.url])
        .env("TETHER_TOKEN", token.trim())
        .env("TETHER_DATA_DIR", "")
        .env("TETHER_CA_CERT", "")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let worker = |environment: Option<&str>| {
        let mut command = support::tether_command();
        command
            .args(["worker", "--server", &server.url, "--key", "tth_env_x"])
            .env("TETHER_ENVIRONMENT", "");
        if let Some(environment) = environment {
            command.args(["--environment", environment]);
        }
        let out = command.args(["--", "true"]).output().unwrap();
        // The worker's usage errors are its operator's to fix: EX_CONFIG.
        assert_eq!(out.status.code(), Some(78), "{environment:?}");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let err = worker(None);
    assert!(
        err.contains("required arguments were not provided") && err.contains("--environment"),
        "{err}"
    );
    // Given empty on the command line, it is refused as such.
    let err = worker(Some(""));
    assert!(
        err.contains("a value is required for '--environment <ENVIRONMENT>'"),
        "{err}"
    );
}

/// `tether serve --listen` that cannot listen says why in terms of the flag: an address taken by
/// another server, or a value that is no address at all.
#[test]
fn a_listen_address_that_cannot_be_used_is_explained() {
    let server = Server::start();
    let taken = server.url.trim_start_matches("http://").to_owned();
    for (listen, hint) in [
        (taken.as_str(), "is another server running?"),
        ("4780", "--listen takes HOST:PORT"),
        ("localhost", "--listen takes HOST:PORT"),
        (":4780", "0.0.0.0:PORT for every interface"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let out = support::tether_command()
            .args(["serve", "--listen", listen, "--data-dir"])
            .arg(dir.path())
            .output()
            .expect("run tether serve");
        assert!(!out.status.success(), "{listen}");
        let err = String::from_utf8_lossy(&out.stderr);
        let line = err
            .lines()
            .find(|l| l.starts_with("error:"))
            .unwrap_or_else(|| panic!("{listen}: no error line in {err}"));
        assert!(
            line.contains(&format!("cannot listen on {listen}")),
            "{line}"
        );
        assert!(line.contains(hint), "{listen}: {line}");
        assert!(
            std::fs::read_dir(dir.path()).unwrap().next().is_none(),
            "{listen}: a start that cannot listen creates no store"
        );
    }
}

/// A `--server` that is not a Tether server (here a web server's 404 page) is said to be one.
#[test]
fn a_server_that_is_not_tethers_is_told_apart() {
    use std::io::{Read as _, Write as _};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let answering = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        let mut request = [0u8; 4096];
        let _ = stream.read(&mut request);
        let page = "<html><body>404 Not Found</body></html>";
        let answer = format!(
            "HTTP/1.1 404 Not Found\r\nContent-Type: text/html\r\nContent-Length: {}\r\n\
             Connection: close\r\n\r\n{page}",
            page.len()
        );
        stream.write_all(answer.as_bytes()).unwrap();
    });
    let out = support::tether_command()
        .args(["env", "list", "--server", &url, "--token"])
        .arg(format!("tth_adm_{}", "x".repeat(32)))
        .output()
        .expect("run tether env list");
    answering.join().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("did not answer as a Tether server does") && err.contains("--server"),
        "{err}"
    );
}

/// A `--data-dir` that names a file is refused with a message that says so.
#[test]
fn a_data_dir_that_is_a_file_is_explained() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("a-file");
    std::fs::write(&file, "not a directory").unwrap();
    let out = support::tether_command()
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&file)
        .output()
        .expect("run tether serve");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is not a directory"), "{err}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "not a directory");
}

/// A store file that cannot be opened is refused with the system's reason, which SQLite leaves
/// out (here a directory where the store's file goes; a file of another user reads the same way).
#[test]
fn a_store_that_cannot_be_opened_says_why() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("tether.db")).unwrap();
    let out = support::tether_command()
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .output()
        .expect("run tether serve");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot open the store at") && err.contains("(Is a directory"),
        "{err}"
    );
}

/// Every setting is judged before the store is made: a start refused for one leaves nothing behind
/// to be mistaken for a server's store.
#[test]
fn a_start_refused_for_its_settings_creates_no_store() {
    let missing = "/nonexistent/tether/cert.pem";
    for (args, admin_token, refusal) in [
        (
            vec![],
            "tth_adm_short",
            "TETHER_ADMIN_TOKEN must start with",
        ),
        (vec!["--metrics-token", "short"], "", "--metrics-token"),
        (
            vec!["--tls-cert", missing, "--tls-key", missing],
            "",
            "cannot serve HTTPS (check --tls-cert and --tls-key)",
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let out = support::tether_command()
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir.path())
            .args(&args)
            .env("TETHER_ADMIN_TOKEN", admin_token)
            .output()
            .expect("run tether serve");
        assert!(!out.status.success(), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(refusal), "{args:?}: {err}");
        assert!(
            std::fs::read_dir(dir.path()).unwrap().next().is_none(),
            "{args:?}: a start refused for its settings creates no store"
        );
    }
}

/// The embedded store holds every conversation and session variable: whatever the umask it was
/// started with, the server's files are its user's alone.
#[test]
fn the_store_is_readable_by_its_user_only() {
    use nix::sys::stat::{umask, Mode};
    use std::os::unix::fs::PermissionsExt as _;
    // Started with a shell's usual umask, whatever this runner's is: under 077 the files would be
    // private without the server's doing. (Process-wide for the moment of the spawn; 022 is what
    // the other tests would get from a shell anyway.)
    let runner = umask(Mode::from_bits_truncate(0o022));
    let server = Server::start();
    umask(runner);
    // A write, so that the journal files exist.
    server.json(&["env", "create", "--name", "private"]);
    let mut seen = Vec::new();
    for entry in std::fs::read_dir(server.data_dir()).unwrap() {
        let entry = entry.unwrap();
        let mode = entry.metadata().unwrap().permissions().mode() & 0o777;
        let name = entry.file_name().to_string_lossy().into_owned();
        assert_eq!(mode & 0o077, 0, "{name} has mode {mode:o}");
        seen.push(name);
    }
    seen.sort();
    for name in ["admin-token", "lock", "tether.db", "tether.db-wal"] {
        assert!(seen.iter().any(|s| s == name), "{name} not in {seen:?}");
    }
}

/// A start that mints a token where the data directory holds another's (a cluster member started
/// without its database, say) keeps the one it replaces.
#[test]
fn a_token_file_replaced_by_a_new_token_is_kept_beside_it() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("admin-token");
    let theirs = "tth_adm_the-only-copy-of-another-stores-token";
    std::fs::write(&file, theirs).unwrap();
    let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = lines.clone();
    let mut server = support::ServerProcess::start_logging(dir.path(), &[], "warn", move |line| {
        seen.lock().unwrap().push(line)
    });
    server.terminate();
    assert_eq!(
        std::fs::read_to_string(dir.path().join("admin-token.old")).unwrap(),
        theirs
    );
    assert_eq!(
        std::fs::read_to_string(&file).unwrap().trim(),
        support::ADMIN_TOKEN
    );
    let lines = lines.lock().unwrap().join("\n");
    assert!(
        lines.contains("no live admin token of this store") && lines.contains("admin-token.old"),
        "{lines}"
    );
    // Another such start (on a store made anew) keeps the one before as well.
    for entry in std::fs::read_dir(dir.path()).unwrap() {
        let path = entry.unwrap().path();
        if path
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("tether.db")
        {
            std::fs::remove_file(path).unwrap();
        }
    }
    std::fs::write(&file, "tth_adm_a-second-stores-token").unwrap();
    let mut server = support::ServerProcess::start(dir.path(), &[]);
    server.terminate();
    assert_eq!(
        std::fs::read_to_string(dir.path().join("admin-token.old")).unwrap(),
        theirs
    );
    assert_eq!(
        std::fs::read_to_string(dir.path().join("admin-token.old.1")).unwrap(),
        "tth_adm_a-second-stores-token"
    );
    assert!(!dir.path().join("admin-token.new").exists());
    // A start that writes the same token again has nothing to keep.
    let fresh = tempfile::tempdir().unwrap();
    std::fs::write(fresh.path().join("admin-token"), support::ADMIN_TOKEN).unwrap();
    let mut server = support::ServerProcess::start(fresh.path(), &[]);
    server.terminate();
    assert!(!fresh.path().join("admin-token.old").exists());
}

/// A start stopped after the store took the admin token it made and before the token's file had
/// it (a kill -9, a power cut) left a store whose only admin token nobody had. The token is saved
/// first now, in `admin-token.new`: the next start puts it in place when the store has it, and
/// throws it away when the store never took it.
#[test]
fn a_token_saved_by_a_start_stopped_halfway_is_put_in_place_by_the_next() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("admin-token");
    let saved = dir.path().join("admin-token.new");
    let mut server = support::ServerProcess::start(dir.path(), &[]);
    // A live admin token that only the saved file has, as such a start leaves it.
    let args = ["token", "create", "--name", "made-then-stopped", "--json"];
    let out = support::tether_command()
        .args(args)
        .env("TETHER_SERVER", &server.base)
        .env("TETHER_TOKEN", support::ADMIN_TOKEN)
        .output()
        .unwrap();
    let made = support::json_output(&args, &out);
    let secret = made["token"].as_str().unwrap().to_owned();
    server.terminate();
    // The file as a kill in the middle of writing it leaves it.
    std::fs::write(&file, "").unwrap();
    std::fs::write(&saved, format!("{secret}\n")).unwrap();
    let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = lines.clone();
    let mut server = support::ServerProcess::start_logging(dir.path(), &[], "warn", move |line| {
        seen.lock().unwrap().push(line)
    });
    server.terminate();
    assert_eq!(std::fs::read_to_string(&file).unwrap().trim(), secret);
    assert!(!saved.exists());
    let lines = lines.lock().unwrap().join("\n");
    assert!(lines.contains("it is saved now"), "{lines}");

    // One the store never took is thrown away, and the file stays as it is.
    std::fs::write(&saved, "tth_adm_never-taken-by-this-store-0000\n").unwrap();
    let mut server = support::ServerProcess::start(dir.path(), &[]);
    server.terminate();
    assert!(!saved.exists());
    assert_eq!(std::fs::read_to_string(&file).unwrap().trim(), secret);
}

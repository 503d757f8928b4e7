//! HTTPS on every hop, with the real binary: `tether serve --tls-cert/--tls-key`, the admin CLI, a
//! worker running the example shell agent and an event stream over HTTPS with a private CA; key
//! formats and chains; SIGHUP reloading a rotated certificate under load; certificate refusals that
//! end the worker and the CLI at once; plain HTTP on the TLS port. Certificates are made here, with a
//! throwaway CA (tether_testkit::tls).

mod support;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::lines::{Lines, PATIENCE};
use support::{id, tether_command, ServerProcess, ADMIN_TOKEN};
use tether_testkit::tls::{KeyKind, TestCa};

/// `tether serve` with TLS; its log lines are kept to be waited for.
struct TlsServer {
    server: ServerProcess,
    base: String,
    log: Receiver<String>,
    _data: tempfile::TempDir,
}

impl TlsServer {
    fn start(cert: &Path, key: &Path, extra: &[&str]) -> TlsServer {
        let data = tempfile::tempdir().unwrap();
        let (cert, key) = (cert.to_str().unwrap(), key.to_str().unwrap());
        let mut args = vec!["--tls-cert", cert, "--tls-key", key];
        args.extend(extra);
        let (tx, log) = mpsc::channel();
        let server = ServerProcess::start_logging(data.path(), &args, "info", move |line| {
            eprintln!("[serve] {line}");
            let _ = tx.send(line);
        });
        TlsServer {
            base: server.base.clone(),
            server,
            log,
            _data: data,
        }
    }

    fn wait_log(&mut self, wanted: &str) -> String {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.log.recv_timeout(left) {
                Ok(line) if line.contains(wanted) => return line,
                Ok(_) => {}
                Err(e) => panic!("the server never logged {wanted:?} ({e})"),
            }
        }
    }

    fn port(&self) -> u16 {
        self.base.rsplit(':').next().unwrap().parse().unwrap()
    }

    fn hangup(&self) {
        let status = Command::new("kill")
            .args(["-HUP", &self.server.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }
}

/// A `tether` command against `server`, trusting `ca` (when given).
fn tether(server: &str, ca: Option<&Path>, args: &[&str]) -> Command {
    let mut command = tether_command();
    command
        .args(args)
        .env("TETHER_SERVER", server)
        .env("TETHER_TOKEN", ADMIN_TOKEN)
        .env("TETHER_LOG", "info");
    if let Some(ca) = ca {
        command.env("TETHER_CA_CERT", ca);
    }
    command
}

fn json(server: &str, ca: &Path, args: &[&str]) -> Value {
    let out = tether(server, Some(ca), args)
        .arg("--json")
        .output()
        .unwrap();
    support::json_output(args, &out)
}

/// What [`seed`] made through the admin CLI.
struct Seeded {
    env: String,
    /// The secret of a worker key of `env`.
    key: String,
    session: String,
}

/// A self-hosted environment named `env_name` with a worker key, and a session on it of a fresh agent.
fn seed(base: &str, ca: &Path, env_name: &str) -> Seeded {
    let env = id(&json(base, ca, &["env", "create", "--name", env_name]));
    let key = json(base, ca, &["env", "key", "create", &env, "--name", "w"]);
    let key = key["token"].as_str().unwrap().to_owned();
    let agent = id(&json(
        base,
        ca,
        &["agent", "create", "--name", "shell", "--model", "none"],
    ));
    let session = id(&json(
        base,
        ca,
        &["session", "create", "--agent", &agent, "--env", &env],
    ));
    Seeded { env, key, session }
}

/// A worker of `env` (with `options` before the program) running the shell agent until it has been
/// idle for 2 s; it trusts `ca` through `--ca-cert` only (no `TETHER_CA_CERT` in its environment).
fn shell_worker(base: &str, ca: &Path, env: &str, key: &str, options: &[&str]) -> Command {
    let ca = ca.to_str().unwrap();
    let mut args = vec![
        "worker",
        "--environment",
        env,
        "--key",
        key,
        "--ca-cert",
        ca,
    ];
    args.extend(options);
    args.push("--");
    let mut command = tether(base, None, &args);
    command
        .arg(support::shell_agent())
        .args(["--max-idle", "2s"]);
    command
}

/// Waits until the first item of `env` has stopped, and asserts its program exited with 0.
fn wait_for_clean_stop(base: &str, ca: &Path, env: &str) {
    let items = json(base, ca, &["work", "list", env, "--all"]);
    let work = items["data"][0]["id"].as_str().unwrap().to_owned();
    let deadline = Instant::now() + PATIENCE;
    loop {
        let item = json(base, ca, &["work", "get", env, &work]);
        if item["state"] == "stopped" {
            assert_eq!(item["metadata"]["tether.exit_code"], "0", "{item}");
            return;
        }
        assert!(Instant::now() < deadline, "the item never stopped: {item}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A blocking HTTPS client that trusts only `ca`.
fn https_client(ca: &Path) -> reqwest::Client {
    let pem = std::fs::read(ca).unwrap();
    reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(&pem).unwrap())
        .build()
        .unwrap()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// A throwaway root CA and a certificate it signs for 127.0.0.1, written into `dir`: the CA's file,
/// then the certificate's and its key's.
fn root_and_loopback_certificate(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let root = TestCa::new("root");
    let ca = root.write(dir, "root");
    let (cert, key) = root.leaf(&["127.0.0.1"]).write(dir, "server");
    (ca, cert, key)
}

#[test]
fn a_session_served_end_to_end_over_https_with_a_private_ca() {
    let dir = tempfile::tempdir().unwrap();
    let root = TestCa::new("tether test root");
    let intermediate = root.intermediate("tether test intermediate");
    let ca = root.write(dir.path(), "root");
    // The server presents its leaf and the intermediate; clients trust only the root.
    let (cert, key) = intermediate
        .leaf(&["localhost", "127.0.0.1"])
        .write(dir.path(), "server");
    let server = TlsServer::start(&cert, &key, &[]);
    assert!(
        server.base.starts_with("https://127.0.0.1:"),
        "{}",
        server.base
    );
    let base = server.base.as_str();

    // The admin CLI over HTTPS.
    let Seeded { env, key, session } = seed(base, &ca, "laptop");

    // An event stream over HTTPS.
    let mut watch = Lines::spawn(
        tether(base, Some(&ca), &["session", "watch", &session]),
        "",
        "watch",
        Some("Watching session"),
    );
    json(base, &ca, &["session", "send", &session, "echo over-tls"]);

    // The worker trusts the CA with --ca-cert and hands it to the shell agent as TETHER_CA_CERT.
    let sandbox = tempfile::tempdir().unwrap();
    let mut command = shell_worker(base, &ca, &env, &key, &[]);
    command.current_dir(sandbox.path());
    let mut worker = Lines::spawn(command, "", "worker", Some("worker started"));

    let line = watch.until(|l| l.contains("agent.tool_result"));
    assert!(line.ends_with("over-tls"), "{line:?}");
    watch.until(|l| l.contains("session.status_idle"));

    // The item's secret names the HTTPS URL the server is reached at (its public URL).
    wait_for_clean_stop(base, &ca, &env);
    assert!(worker.terminate().success());
    json(base, &ca, &["session", "delete", &session]);
    assert!(watch.exit().success());
}

#[test]
fn work_secrets_carry_the_public_url() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = root_and_loopback_certificate(dir.path());
    let rt = runtime();
    for public in [None, Some("https://tether.example.com/base")] {
        let extra: Vec<&str> = public.iter().flat_map(|p| ["--public-url", p]).collect();
        let server = TlsServer::start(&cert, &key, &extra);
        let base = server.base.clone();
        let env = id(&json(&base, &ca, &["env", "create", "--name", "e"]));
        let agent = id(&json(
            &base,
            &ca,
            &["agent", "create", "--name", "a", "--model", "none"],
        ));
        json(
            &base,
            &ca,
            &["session", "create", "--agent", &agent, "--env", &env],
        );
        let secret = rt.block_on(async {
            let client = tether_client::Client::builder(&base)
                .token(ADMIN_TOKEN)
                .ca_cert_file(&ca)
                .build()
                .unwrap();
            let options = tether_client::PollOptions {
                block_ms: Some(999),
                worker_id: Some("w".into()),
                ..Default::default()
            };
            let item = client.poll_work(&env, &options).await.unwrap().unwrap();
            item.decode_secret().unwrap().unwrap()
        });
        let want = format!("{}/api/v1/cloud", public.unwrap_or(&base));
        assert_eq!(secret.api_base_url.as_deref(), Some(want.as_str()));
        assert!(want.starts_with("https://"));
    }
}

#[test]
fn every_key_format_loads_and_alpn_offers_http2_and_http1() {
    let dir = tempfile::tempdir().unwrap();
    let root = TestCa::new("root");
    let ca = root.write(dir.path(), "root");
    let rt = runtime();
    for (i, kind) in [
        KeyKind::EcPkcs8,
        KeyKind::EcSec1,
        KeyKind::RsaPkcs8,
        KeyKind::RsaPkcs1,
    ]
    .into_iter()
    .enumerate()
    {
        let leaf = root.leaf_with(&["127.0.0.1"], kind, false);
        let (cert, key) = leaf.write(dir.path(), &format!("server{i}"));
        let server = TlsServer::start(&cert, &key, &[]);
        let client = https_client(&ca);
        let status = rt
            .block_on(client.get(format!("{}/healthz", server.base)).send())
            .unwrap_or_else(|e| panic!("{kind:?}: {e:?}"))
            .status();
        assert_eq!(status, 200, "{kind:?}");
        if kind == KeyKind::EcPkcs8 {
            for (offer, want) in [("h2", "HTTP/2.0"), ("http/1.1", "HTTP/1.1")] {
                let version = rt.block_on(alpn_get(&ca, server.port(), offer));
                assert_eq!(version, want);
            }
        }
    }
}

/// A TLS connection to the server that negotiated `offer` by ALPN.
async fn tls_connect(
    ca: &Path,
    port: u16,
    offer: &str,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pki_types::CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![offer.as_bytes().to_vec()];
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let name = rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(offer.as_bytes()));
    tls
}

/// Negotiates `offer` by ALPN and sends `GET /healthz` in that protocol; the answer's HTTP version.
async fn alpn_get(ca: &Path, port: u16, offer: &str) -> String {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let tls = tls_connect(ca, port, offer).await;
    let request = hyper::Request::get(format!("https://127.0.0.1:{port}/healthz"))
        .body(String::new())
        .unwrap();
    let response = if offer == "h2" {
        let (mut sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                .await
                .unwrap();
        tokio::spawn(conn);
        sender.send_request(request).await.unwrap()
    } else {
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .unwrap();
        tokio::spawn(conn);
        sender.send_request(request).await.unwrap()
    };
    assert_eq!(response.status(), 200);
    format!("{:?}", response.version())
}

#[test]
fn sighup_serves_a_rotated_certificate_without_dropping_connections() {
    let dir = tempfile::tempdir().unwrap();
    let old_ca = TestCa::new("old root");
    let new_ca = TestCa::new("new root");
    let old_ca_path = old_ca.write(dir.path(), "old-root");
    let new_ca_path = new_ca.write(dir.path(), "new-root");
    let (cert, key) = old_ca.leaf(&["127.0.0.1"]).write(dir.path(), "server");
    let mut server = TlsServer::start(&cert, &key, &[]);
    let base = server.base.clone();
    let rt = runtime();

    let env = id(&json(
        &base,
        &old_ca_path,
        &["env", "create", "--name", "e"],
    ));
    let old_client = tether_client::Client::builder(&base)
        .token(ADMIN_TOKEN)
        .ca_cert_file(&old_ca_path)
        .build()
        .unwrap();
    // Long polls back to back over one kept-alive connection, across the reload.
    let poller = {
        let client = old_client.clone();
        let env = env.clone();
        rt.spawn(async move {
            let options = tether_client::PollOptions {
                block_ms: Some(999),
                worker_id: Some("w".into()),
                ..Default::default()
            };
            let mut answered = 0;
            for _ in 0..4 {
                let polled = client.poll_work(&env, &options).await;
                assert!(matches!(polled, Ok(None)), "{polled:?}");
                answered += 1;
            }
            answered
        })
    };
    std::thread::sleep(Duration::from_millis(1500));

    // A broken certificate: a clear log line, and the old one stays.
    std::fs::write(&cert, "not a certificate").unwrap();
    server.hangup();
    let line = server.wait_log("cannot reload the TLS certificate");
    assert!(line.contains("still serving the previous one"), "{line}");
    let status = rt
        .block_on(
            https_client(&old_ca_path)
                .get(format!("{base}/healthz"))
                .send(),
        )
        .unwrap()
        .status();
    assert_eq!(status, 200);

    // The rotated certificate, from another CA.
    new_ca.leaf(&["127.0.0.1"]).write(dir.path(), "server");
    server.hangup();
    server.wait_log("TLS certificate reloaded");
    assert_eq!(rt.block_on(poller).unwrap(), 4, "every long poll completed");

    // The connection opened before the reload still works; new connections get the new certificate.
    assert!(rt.block_on(old_client.get_environment(&env)).is_ok());
    let new_client = https_client(&new_ca_path);
    let status = rt
        .block_on(new_client.get(format!("{base}/healthz")).send())
        .unwrap()
        .status();
    assert_eq!(status, 200);
    let refused = rt.block_on(
        https_client(&old_ca_path)
            .get(format!("{base}/healthz"))
            .send(),
    );
    assert!(
        refused.is_err(),
        "the old CA must not verify the new certificate"
    );
}

/// Runs `command` to its end (it must end by itself) and returns its exit status and standard error.
fn run_to_end(mut command: Command) -> (std::process::ExitStatus, String) {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    let deadline = Instant::now() + PATIENCE;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the command kept retrying: {}", reader.join().unwrap());
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    (status, reader.join().unwrap())
}

#[test]
fn certificate_refusals_end_the_worker_and_the_cli_with_one_clear_line() {
    let dir = tempfile::tempdir().unwrap();
    let root = TestCa::new("root");
    let stranger = TestCa::new("some other root");
    let root_ca = root.write(dir.path(), "root");
    let cases = [
        (
            "untrusted",
            stranger.leaf(&["127.0.0.1"]),
            "not signed by an authority",
        ),
        (
            "wrong-name",
            root.leaf(&["tether.invalid"]),
            "not valid for 127.0.0.1",
        ),
        (
            "expired",
            root.leaf_with(&["127.0.0.1"], KeyKind::EcPkcs8, true),
            "expired",
        ),
        // Trusted as the clients' CA and served as the server's certificate.
        (
            "self-signed",
            tether_testkit::tls::self_signed_ca_as_leaf(&["127.0.0.1"]),
            "a CA's, not a server's",
        ),
    ];
    for (name, leaf, reason) in cases {
        let (cert, key) = leaf.write(dir.path(), name);
        let ca = if name == "self-signed" {
            cert.clone()
        } else {
            root_ca.clone()
        };
        let server = TlsServer::start(&cert, &key, &[]);
        let base = server.base.clone();
        let worker = tether(
            &base,
            Some(&ca),
            &[
                "worker",
                "--environment",
                "env_x",
                "--key",
                "tth_env_x",
                "--",
                "true",
            ],
        );
        let admin = tether(&base, Some(&ca), &["env", "list"]);
        for (who, command) in [("worker", worker), ("cli", admin)] {
            let (status, stderr) = run_to_end(command);
            assert!(!status.success(), "{name} {who}: {stderr}");
            let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
            assert_eq!(errors.len(), 1, "{name} {who}: {stderr}");
            assert!(errors[0].contains(&base), "{name} {who}: {}", errors[0]);
            assert!(errors[0].contains(reason), "{name} {who}: {}", errors[0]);
            assert!(
                !stderr.contains("retrying"),
                "{name} {who} retried: {stderr}"
            );
        }
    }
}

#[test]
fn plain_http_to_the_tls_port_is_answered_and_https_to_a_plain_port_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = root_and_loopback_certificate(dir.path());
    let server = TlsServer::start(&cert, &key, &[]);

    // A plain-HTTP request gets a 400 in the error envelope.
    let ask = |request: &[u8]| {
        let mut tcp = std::net::TcpStream::connect(("127.0.0.1", server.port())).unwrap();
        tcp.set_read_timeout(Some(PATIENCE)).unwrap();
        tcp.write_all(request).unwrap();
        let mut answer = String::new();
        tcp.read_to_string(&mut answer).unwrap();
        answer
    };
    let answer = ask(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Request-Id:  mine-1 \r\n\r\n");
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("use an https:// URL"), "{answer}");
    // Its request id is the client's (D-18), in the envelope and the headers.
    assert!(answer.contains("\r\nx-request-id: mine-1\r\n"), "{answer}");
    assert!(answer.contains(r#""request_id":"mine-1""#), "{answer}");
    // Without one, a generated id.
    let answer = ask(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
    let envelope: Value = serde_json::from_str(answer.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    let id = envelope["request_id"]
        .as_str()
        .expect("a generated request id");
    assert!(
        answer.contains(&format!("\r\nx-request-id: {id}\r\n")),
        "{answer}"
    );
    // Bytes that are neither HTTP nor TLS: the connection is closed.
    let mut tcp = std::net::TcpStream::connect(("127.0.0.1", server.port())).unwrap();
    tcp.set_read_timeout(Some(PATIENCE)).unwrap();
    let _ = tcp.write_all(&[0u8; 64]);
    let mut rest = Vec::new();
    let _ = tcp.read_to_end(&mut rest);

    // The server still serves HTTPS.
    let rt = runtime();
    let status = rt
        .block_on(
            https_client(&ca)
                .get(format!("{}/healthz", server.base))
                .send(),
        )
        .unwrap()
        .status();
    assert_eq!(status, 200);

    // The CLI with an http:// URL to the TLS port, and with an https:// URL to a plain port.
    let plain_url = server.base.replace("https://", "http://");
    let (status, stderr) = run_to_end(tether(&plain_url, None, &["env", "list"]));
    assert!(!status.success());
    assert!(stderr.contains("use an https:// URL"), "{stderr}");
    let plain = support::ServerProcess::start(&dir.path().join("plain"), &[]);
    let https_url = plain.base.replace("http://", "https://");
    let (status, stderr) = run_to_end(tether(&https_url, None, &["env", "list"]));
    assert!(!status.success());
    assert!(stderr.contains("does it serve HTTPS"), "{stderr}");
}

#[test]
fn a_request_hyper_cannot_parse_over_tls_is_answered_in_the_error_envelope() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = root_and_loopback_certificate(dir.path());
    let server = TlsServer::start(&cert, &key, &[]);
    let rt = runtime();
    let answer = rt.block_on(async {
        let mut tls = tls_connect(&ca, server.port(), "http/1.1").await;
        tls.write_all(b"GET /\x01 HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let mut answer = Vec::new();
        // The server closes after answering; how it closes (close_notify or not) is no concern here.
        let read = tls.read_to_end(&mut answer);
        let _ = tokio::time::timeout(Duration::from_secs(20), read).await;
        String::from_utf8(answer).unwrap()
    });
    let (head, body) = answer.split_once("\r\n\r\n").expect("a full answer");
    assert!(head.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{head}");
    assert!(
        head.contains("\r\ncontent-type: application/json\r\n"),
        "{head}"
    );
    let body: Value = serde_json::from_str(body).unwrap();
    assert_eq!(body["type"], "error");
    assert_eq!(body["error"]["type"], "invalid_request_error");
    let id = body["request_id"].as_str().unwrap();
    assert!(
        head.contains(&format!("\r\nrequest-id: {id}\r\n")),
        "{head}"
    );
}

/// `--sandbox-network api` against an HTTPS server: the shell agent talks plain HTTP to its loopback
/// inside the sandbox and needs no CA of its own; the worker's proxy makes the TLS connection, trusting
/// `--ca-cert`.
#[test]
fn a_sandboxed_agent_reaches_an_https_server_through_the_api_proxy() {
    let dir = tempfile::tempdir().unwrap();
    let root = TestCa::new("tether test root");
    let ca = root.write(dir.path(), "root");
    let (cert, key) = root
        .leaf(&["localhost", "127.0.0.1"])
        .write(dir.path(), "server");
    let server = TlsServer::start(&cert, &key, &[]);
    let base = server.base.as_str();
    let Seeded { env, key, session } = seed(base, &ca, "boxed");
    json(
        base,
        &ca,
        &["session", "send", &session, "echo over-tls-proxy; env"],
    );
    let command = shell_worker(
        base,
        &ca,
        &env,
        &key,
        &["--sandbox", "--sandbox-network", "api"],
    );
    let mut worker = Lines::spawn(command, "", "worker", Some("worker started"));
    wait_for_clean_stop(base, &ca, &env);
    let events = json(base, &ca, &["session", "events", &session]);
    let result = events["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["type"] == "agent.tool_result")
        .unwrap_or_else(|| panic!("no tool result: {events:#}"))
        .to_string();
    assert!(result.contains("over-tls-proxy"), "{result}");
    // Inside, the API is plain HTTP on the sandbox's loopback, and no CA file is handed on.
    assert!(
        result.contains("TETHER_API_URL=http://127.0.0.1:4780/api/v1/cloud"),
        "{result}"
    );
    assert!(!result.contains("TETHER_CA_CERT"), "{result}");
    assert!(worker.terminate().success());
}

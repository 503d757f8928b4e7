//! The admin's view of a `tether serve` child process over HTTP, for tests that drive it.

use reqwest::Method;
use serde_json::{json, Value};

use super::ServerProcess;

/// Calls the server's `/api/v1/cloud` API with the admin token.
#[derive(Clone)]
pub struct Api {
    pub http: reqwest::Client,
    pub base: String,
    pub token: String,
}

impl Api {
    /// The API of `server`, with a client that gives up on a request after 30 s.
    pub fn of(server: &ServerProcess) -> Api {
        Api {
            http: reqwest::Client::builder()
                .timeout(std::time::Duration::from_secs(30))
                .build()
                .expect("client"),
            base: server.base.clone(),
            token: server.token.clone(),
        }
    }

    pub async fn call(&self, method: Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut req = self
            .http
            .request(method, format!("{}/api/v1/cloud{path}", self.base))
            .bearer_auth(&self.token);
        if let Some(body) = body {
            req = req.json(&body);
        }
        let resp = req.send().await.expect("request");
        let status = resp.status().as_u16();
        let text = resp.text().await.expect("body");
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    pub async fn ok(&self, method: Method, path: &str, body: Value) -> Value {
        let (status, body) = self.call(method.clone(), path, Some(body)).await;
        assert_eq!(status, 200, "{method} {path}: {body}");
        body
    }

    pub async fn get(&self, path: &str) -> Value {
        let (status, body) = self.call(Method::GET, path, None).await;
        assert_eq!(status, 200, "GET {path}: {body}");
        body
    }

    /// Creates a self-hosted environment named `name`; returns its id.
    pub async fn self_hosted_environment(&self, name: &str) -> String {
        self.ok(
            Method::POST,
            "/environments",
            json!({"name": name, "config": {"type": "self_hosted"}}),
        )
        .await["id"]
            .as_str()
            .expect("environment id")
            .to_owned()
    }

    /// Creates an agent named `name` on a model no one serves; returns its id.
    pub async fn agent(&self, name: &str) -> String {
        self.ok(
            Method::POST,
            "/agents",
            json!({"name": name, "model": "none"}),
        )
        .await["id"]
            .as_str()
            .expect("agent id")
            .to_owned()
    }

    pub async fn key(&self, env: &str) -> String {
        let key = self
            .ok(
                Method::POST,
                &format!("/environments/{env}/keys"),
                json!({}),
            )
            .await;
        key["token"].as_str().expect("token").to_owned()
    }
}

/// A `tether serve` child process with its data in a temporary directory, and what the tests that
/// run workers against it all need: a self-hosted environment, a key for it and an agent.
pub struct Deployment {
    pub server: ServerProcess,
    pub api: Api,
    pub env: String,
    pub key: String,
    pub agent: String,
    pub dir: tempfile::TempDir,
}

impl Deployment {
    /// Starts `tether serve SERVER_ARGS…` and creates the environment and the agent, both named `name`.
    pub async fn start(server_args: &[&str], name: &str) -> Deployment {
        let dir = tempfile::tempdir().expect("temp dir");
        let server = ServerProcess::start(&dir.path().join("data"), server_args);
        let api = Api::of(&server);
        let env = api.self_hosted_environment(name).await;
        let key = api.key(&env).await;
        let agent = api.agent(name).await;
        Deployment {
            server,
            api,
            env,
            key,
            agent,
            dir,
        }
    }
}

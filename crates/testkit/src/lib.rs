//! Real servers for tests: a `tether-server` bound to a real TCP socket on 127.0.0.1, over a real
//! store (SQLite in a temporary directory, or a fresh PostgreSQL database), with an [`OffsetClock`] that
//! tests can jump forward to make leases expire without waiting.
//!
//! Behavioural tests run once per backend: `for backend in backends() { … }`. PostgreSQL joins when
//! `TETHER_TEST_POSTGRES_URL` names a server the tests may create databases on; under CI (`CI` set) its
//! absence is an error, so a green CI always means both backends passed.

pub mod client;
pub mod net;
pub mod postgres;
pub mod schema;
pub mod tls;

use std::sync::Arc;
use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::Value;
use tether_core::{Clock, OffsetClock};
use tether_server::{App, ServiceConfig};
use tether_store::Store;

/// Which store a test server uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    /// Admin URL of a PostgreSQL server; each test server gets a fresh database on it.
    Postgres(String),
}

impl Backend {
    pub fn name(&self) -> &'static str {
        match self {
            Backend::Sqlite => "sqlite",
            Backend::Postgres(_) => "postgres",
        }
    }
}

/// The backends every behavioural test must pass on.
pub fn backends() -> Vec<Backend> {
    let mut out = vec![Backend::Sqlite];
    match std::env::var("TETHER_TEST_POSTGRES_URL") {
        Ok(url) if !url.is_empty() => out.push(Backend::Postgres(url)),
        _ if std::env::var_os("CI").is_some() => {
            panic!("CI must run the suite against PostgreSQL too: set TETHER_TEST_POSTGRES_URL (see .ci/run)")
        }
        _ => eprintln!("note: TETHER_TEST_POSTGRES_URL is not set; running on SQLite only"),
    }
    out
}

/// The URL in the environment variable `variable`, when it is set and not empty. Without it the tests
/// that need it (`which`, e.g. "the cluster tests") say so and pass, except under CI (`CI` set), where
/// its absence is an error: a green CI means they ran.
pub fn required_url(variable: &str, which: &str) -> Option<String> {
    match std::env::var(variable) {
        Ok(url) if !url.is_empty() => Some(url),
        _ if std::env::var_os("CI").is_some() => {
            panic!("CI must run {which}: set {variable} (scripts/test does, with scripts/pg)")
        }
        _ => {
            eprintln!("skipped: {which} need {variable} (e.g. `scripts/pg start`)");
            None
        }
    }
}

/// Runs `test` once per backend ([`backends`]), each time against a fresh server with the default
/// [`Options`], and shuts that server down afterwards.
pub async fn each_backend(test: impl AsyncFn(&TestServer)) {
    each_backend_with(Options::default(), test).await
}

/// [`each_backend`] with a server started with `options`.
pub async fn each_backend_with(options: Options, test: impl AsyncFn(&TestServer)) {
    for backend in backends() {
        let server = TestServer::start_with(&backend, options.clone()).await;
        test(&server).await;
        server.shutdown().await;
    }
}

/// Where a store lives, so that a server can be restarted on the same data.
pub enum StoreLocation {
    Sqlite(tempfile::TempDir),
    Postgres { url: String },
}

impl StoreLocation {
    /// A fresh, empty location for `backend`.
    pub async fn fresh(backend: &Backend) -> anyhow::Result<StoreLocation> {
        Ok(match backend {
            Backend::Sqlite => StoreLocation::Sqlite(tempfile::tempdir()?),
            Backend::Postgres(admin_url) => StoreLocation::Postgres {
                url: postgres::create_test_database(admin_url).await?,
            },
        })
    }

    pub async fn open(&self) -> anyhow::Result<Arc<dyn Store>> {
        Ok(match self {
            StoreLocation::Sqlite(dir) => {
                Arc::new(tether_store::sqlite::open(&dir.path().join("tether.db"))?)
            }
            StoreLocation::Postgres { url } => {
                Arc::new(tether_store::postgres::connect(url).await?)
            }
        })
    }
}

/// Settings for a test server; defaults are the production defaults with a fast dispatcher tick.
#[derive(Clone, Debug)]
pub struct Options {
    pub config: ServiceConfig,
    pub body_limit: usize,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            config: ServiceConfig {
                tick: Duration::from_millis(100),
                ..ServiceConfig::default()
            },
            body_limit: 1024 * 1024,
        }
    }
}

/// A running server.
pub struct TestServer {
    pub base: String,
    pub admin_token: String,
    pub app: App,
    pub clock: OffsetClock,
    pub backend: Backend,
    pub location: Arc<StoreLocation>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
    http: reqwest::Client,
}

impl TestServer {
    pub async fn start(backend: &Backend) -> TestServer {
        Self::start_with(backend, Options::default()).await
    }

    pub async fn start_with(backend: &Backend, options: Options) -> TestServer {
        let location = Arc::new(StoreLocation::fresh(backend).await.expect("fresh store"));
        Self::start_on(backend, location, options, OffsetClock::new()).await
    }

    /// Starts a server on an existing store (a restart), sharing `clock`.
    pub async fn start_on(
        backend: &Backend,
        location: Arc<StoreLocation>,
        options: Options,
        clock: OffsetClock,
    ) -> TestServer {
        let store = location.open().await.expect("open store");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let mut config = options.config.clone();
        config.public_url = format!("http://{addr}");
        let shared_clock: Arc<dyn Clock> = Arc::new(clock.clone());
        let app = App::new(store, shared_clock, config);
        let admin_token = match app.bootstrap_admin_token(None).await.expect("bootstrap") {
            Some(t) => t,
            None => {
                app.create_admin_token(Default::default())
                    .await
                    .expect("admin token")
                    .1
            }
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(tether_server::serve(
            app.clone(),
            listener,
            options.body_limit,
            async move {
                let _ = stopped.await;
            },
        ));
        TestServer {
            base: format!("http://{addr}"),
            admin_token,
            app,
            clock,
            backend: backend.clone(),
            location,
            stop: Some(stop),
            task: Some(task),
            http: reqwest::Client::new(),
        }
    }

    /// Shuts the server down gracefully and waits for it.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }

    /// `/api/v1/cloud` + `path`.
    pub fn url(&self, path: &str) -> String {
        format!("{}/api/v1/cloud{path}", self.base)
    }

    /// `/v1` + `path`.
    pub fn v1(&self, path: &str) -> String {
        format!("{}/v1{path}", self.base)
    }

    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    /// Sends a request with the admin token on the Qoder prefix.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        self.call_as(&self.admin_token.clone(), method, path, body, &[])
            .await
    }

    /// Sends a request with `token` and extra headers on the Qoder prefix.
    pub async fn call_as(
        &self,
        token: &str,
        method: Method,
        path: &str,
        body: Option<Value>,
        headers: &[(&str, &str)],
    ) -> (StatusCode, Value) {
        let method_sent = method.clone();
        let mut req = self.http.request(method, self.url(path)).bearer_auth(token);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        if let Some(body) = body {
            req = req.json(&body);
        }
        let resp = req.send().await.expect("request");
        read_checked(&method_sent, resp).await
    }

    pub async fn get(&self, path: &str) -> (StatusCode, Value) {
        self.call(Method::GET, path, None).await
    }

    pub async fn post(&self, path: &str, body: Value) -> (StatusCode, Value) {
        self.call(Method::POST, path, Some(body)).await
    }

    /// Every page of the listing at `path`, whose query has a parameter already (`&page=` is appended),
    /// following `next_page` to the end. Asserts that each page answers 200 and that `has_more` says
    /// whether a next page follows; gives up after 100 pages.
    pub async fn pages(&self, path: &str) -> Vec<Value> {
        let mut pages = Vec::new();
        let mut cursor = String::new();
        for _ in 0..100 {
            let (status, body) = self.get(&format!("{path}{cursor}")).await;
            assert_eq!(status, StatusCode::OK, "{body}");
            let next = body["next_page"].as_str().map(str::to_owned);
            assert_eq!(body["has_more"].as_bool(), Some(next.is_some()), "{body}");
            pages.push(body);
            match next {
                Some(next) => cursor = format!("&page={next}"),
                None => return pages,
            }
        }
        panic!("the listing {path} did not end within 100 pages");
    }

    /// Polls environment `env`'s queue with the admin token as worker `worker` (the `Worker-ID`
    /// header); `query` goes after the path (e.g. `?block_ms=500`, or empty). Asserts 200 and returns
    /// the reply: the item, or `null` when there was none.
    pub async fn poll_as_worker(&self, env: &str, worker: &str, query: &str) -> Value {
        let path = format!("/environments/{env}/work/poll{query}");
        self.ok_as_worker(Method::GET, &path, worker).await
    }

    /// Acks item `work` of environment `env` with the admin token as worker `worker`; asserts 200 and
    /// returns the acked item.
    pub async fn ack_as_worker(&self, env: &str, work: &str, worker: &str) -> Value {
        let path = format!("/environments/{env}/work/{work}/ack");
        self.ok_as_worker(Method::POST, &path, worker).await
    }

    /// A body-less request with the admin token and `Worker-ID: worker_id` that must answer 200.
    async fn ok_as_worker(&self, method: Method, path: &str, worker_id: &str) -> Value {
        let headers = [("Worker-ID", worker_id)];
        let (status, body) = self
            .call_as(&self.admin_token, method, path, None, &headers)
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body
    }

    /// Creates a self-hosted environment and returns its id.
    pub async fn self_hosted_environment(&self) -> String {
        let (status, env) = self
            .post(
                "/environments",
                serde_json::json!({"name": "test", "config": {"type": "self_hosted"}}),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{env}");
        env["id"].as_str().expect("id").to_owned()
    }

    /// Creates an agent and returns its id.
    pub async fn agent(&self) -> String {
        let (status, agent) = self
            .post(
                "/agents",
                serde_json::json!({"name": "test-agent", "model": "test-model"}),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{agent}");
        agent["id"].as_str().expect("id").to_owned()
    }

    /// Creates a self-hosted environment and an agent; returns their ids.
    pub async fn environment_and_agent(&self) -> (String, String) {
        (self.self_hosted_environment().await, self.agent().await)
    }

    /// Creates a self-hosted environment, an agent, and a session of that agent there (which
    /// enqueues one work item); returns the three ids.
    pub async fn environment_agent_and_session(&self) -> (String, String, String) {
        let (environment_id, agent_id) = self.environment_and_agent().await;
        let session_id = self.session(&environment_id, &agent_id).await;
        (environment_id, agent_id, session_id)
    }

    /// Creates a session (which enqueues one work item on a self-hosted environment); returns its id.
    pub async fn session(&self, environment_id: &str, agent_id: &str) -> String {
        let (status, s) = self
            .post(
                "/sessions",
                serde_json::json!({"agent": agent_id, "environment_id": environment_id}),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{s}");
        s["id"].as_str().expect("id").to_owned()
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// [`read`], with the body checked against the schema `/openapi.json` declares for it
/// ([`schema::check_response`]).
pub async fn read_checked(method: &Method, resp: reqwest::Response) -> (StatusCode, Value) {
    let url = resp.url().to_string();
    let content_type = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok().map(str::to_owned));
    let (status, body) = read(resp).await;
    schema::check_response(method, &url, status, content_type.as_deref(), &body);
    (status, body)
}

/// Status and JSON body (or `Value::String` of the raw text when it is not JSON).
pub async fn read(resp: reqwest::Response) -> (StatusCode, Value) {
    let status = resp.status();
    let text = resp.text().await.expect("body");
    let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, value)
}

/// The string `field` of every element of the JSON array `array` (a listing's `data`, say), in order;
/// panics when `array` is not an array or an element lacks a string `field`.
pub fn string_fields<'a>(array: &'a Value, field: &str) -> Vec<&'a str> {
    array
        .as_array()
        .unwrap_or_else(|| panic!("not an array: {array}"))
        .iter()
        .map(|element| {
            element[field]
                .as_str()
                .unwrap_or_else(|| panic!("no string {field:?} in {element}"))
        })
        .collect()
}

/// The ids of a listing's `data`, in order.
pub fn listed_ids(page: &Value) -> Vec<String> {
    string_fields(&page["data"], "id")
        .into_iter()
        .map(str::to_owned)
        .collect()
}

/// Sends `request` and returns its body as JSON; panics when the request fails or the body is not JSON.
pub async fn json_of(request: reqwest::RequestBuilder) -> Value {
    let response = request.send().await.expect("request");
    response.json().await.expect("a JSON body")
}

/// Sends `request` and returns its status and body as [`read`] does; panics when the request fails.
pub async fn send_and_read(request: reqwest::RequestBuilder) -> (StatusCode, Value) {
    read(request.send().await.expect("request")).await
}

//! The HTTP client.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use reqwest::header::{HeaderValue, ACCEPT};
use reqwest::{Method, RequestBuilder};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::error::{ApiError, Error, Result};
use crate::params::{
    ClaimOptions, HeartbeatOptions, ListEvents, ListParams, ListResources, ListSessions,
    PollOptions, Query,
};
use crate::sse::EventStream;
use crate::types::{
    Agent, Cancel, Claim, CreateAgent, CreateEnvironment, CreateSession, Credential, Deleted,
    Environment, Event, Heartbeat, MetadataPatch, NewEvent, Page, PostEvents, PostedEvents,
    QueueStats, Session, StopThenClaim, StopWithClaim, UpdateAgent, UpdateEnvironment,
    UpdateSession, WorkHistory, WorkItem, WorkSecret, Worker, STOPPED_HEADER,
};

/// The path prefix of the Qoder dialect, which this client speaks.
pub const API_PREFIX: &str = "/api/v1/cloud";

/// The path prefixes of the server's two dialects (§1.1): the Qoder one this client speaks, and `/v1`.
const DIALECT_PREFIXES: [&str; 2] = [API_PREFIX, "/v1"];

/// The default time allowed for one ordinary request.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// The default time allowed to open a connection.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The default longest silence on an open connection; it bounds how long a dead event stream goes
/// unnoticed and is well above the server's 15 s keep-alive.
pub const DEFAULT_READ_TIMEOUT: Duration = Duration::from_secs(60);

/// Most bytes of a response body this client reads: above any answer of this API (a request body
/// is at most 32 MiB, an event page about 2 MiB), and a bound on memory whatever a server sends.
pub const MAX_RESPONSE_BYTES: usize = 64 << 20;

/// Most bytes of an error response's body read: an envelope is small; the rest of a larger one
/// (a proxy's page) is not needed to say what went wrong.
const MAX_ERROR_BYTES: usize = 64 << 10;

/// Settings for a [`Client`].
#[derive(Clone, Debug)]
pub struct ClientBuilder {
    server: String,
    prefix: String,
    token: Option<String>,
    timeout: Duration,
    connect_timeout: Duration,
    read_timeout: Duration,
    user_agent: String,
    ca_cert_files: Vec<PathBuf>,
}

impl ClientBuilder {
    /// Also trust the certificate authorities in this PEM file (a private CA), besides the system's
    /// roots. The file is read by [`ClientBuilder::build`].
    pub fn ca_cert_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.ca_cert_files.push(path.into());
        self
    }

    /// The bearer token sent on every request (an admin token, an environment key or a session token).
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// The path prefix of the API under the server URL; [`API_PREFIX`] by default. Use `""` when the
    /// URL given to [`Client::builder`] already ends in the prefix (like a work secret's `api_base_url`).
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// Time allowed for one ordinary request ([`DEFAULT_TIMEOUT`]). A long poll gets its `block_ms`
    /// on top; an event stream has no overall limit.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Time allowed to open a connection ([`DEFAULT_CONNECT_TIMEOUT`]).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Longest silence tolerated on an open connection ([`DEFAULT_READ_TIMEOUT`]).
    pub fn read_timeout(mut self, timeout: Duration) -> Self {
        self.read_timeout = timeout;
        self
    }

    /// The `User-Agent` header.
    pub fn user_agent(mut self, user_agent: impl Into<String>) -> Self {
        self.user_agent = user_agent.into();
        self
    }

    /// Builds the client.
    pub fn build(self) -> Result<Client> {
        // Refusals quote the URL as given: `http://` trimmed would read back as `http:`.
        let given = self.server.trim();
        let server = given.trim_end_matches('/').to_owned();
        // `127.0.0.1:4780`, `[::1]:4780`, `tether.example`: a host (and port) without a scheme,
        // which the URL parser calls relative or takes the host for the scheme of.
        if !given.contains("://") {
            return Err(Error::Config(format!(
                "the server URL {given:?} must start with http:// or https:// (http://{server})"
            )));
        }
        let parsed = reqwest::Url::parse(&server)
            .map_err(|e| Error::Config(format!("the server URL {given:?} is not a URL: {e}")))?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(Error::Config(format!(
                "the server URL {given:?} must start with http:// or https://"
            )));
        }
        let prefix = self.prefix.trim_end_matches('/');
        let prefix = if prefix.is_empty() || prefix.starts_with('/') {
            prefix.to_owned()
        } else {
            format!("/{prefix}")
        };
        // A server URL that already ends in a dialect's prefix (the shape of a program's
        // TETHER_API_URL, or of a work secret's api_base_url) would have the prefix added twice,
        // and every call would then be a bare 404. It is refused here with words that say what to
        // give instead, rather than stripped: a URL that is not what its user thinks is better
        // corrected at its source than guessed at, and a stripped `/v1` would silently change the
        // dialect spoken. A URL that is the API base itself is for `prefix("")`.
        if !prefix.is_empty() {
            let path = parsed.path().trim_end_matches('/');
            if let Some(dialect) = DIALECT_PREFIXES.iter().find(|p| path.ends_with(*p)) {
                let base = server
                    .strip_suffix(*dialect)
                    .filter(|_| parsed.query().is_none() && parsed.fragment().is_none())
                    .unwrap_or("the URL without it");
                return Err(Error::Config(format!(
                    "the server URL {server:?} ends in the API path {dialect}; give the \
                     server's base URL ({base}): the client adds {prefix} itself"
                )));
            }
        }
        let mut certificates = Vec::new();
        for path in &self.ca_cert_files {
            let pem = std::fs::read(path).map_err(|e| {
                Error::Config(format!(
                    "cannot read the CA certificate file {}: {e}",
                    path.display()
                ))
            })?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem)
                .ok()
                .filter(|certs| !certs.is_empty())
                .ok_or_else(|| {
                    Error::Config(format!(
                        "{} holds no PEM certificate (BEGIN CERTIFICATE)",
                        path.display()
                    ))
                })?;
            certificates.extend(certs);
        }
        let transport = Transport {
            certificates,
            connect_timeout: self.connect_timeout,
            read_timeout: self.read_timeout,
            user_agent: self.user_agent,
            unpooled: OnceLock::new(),
        };
        let http = transport.http(true)?;
        Ok(Client {
            http,
            transport: Arc::new(transport),
            api_base: Arc::from(format!("{server}{prefix}")),
            server: Arc::from(server),
            token: self.token.map(Arc::from),
            timeout: self.timeout,
        })
    }
}

/// What a [`Client`]'s HTTP clients are built from: the pooled one at once, the one without a pool
/// ([`Client::on_fresh_connections`]) when first asked for, then shared by every clone.
#[derive(Debug)]
struct Transport {
    certificates: Vec<reqwest::Certificate>,
    connect_timeout: Duration,
    read_timeout: Duration,
    user_agent: String,
    unpooled: OnceLock<reqwest::Client>,
}

impl Transport {
    /// An HTTP client: rustls, trusting the system's roots (rustls-native-certs, which also honours
    /// SSL_CERT_FILE and SSL_CERT_DIR) plus any CA files given. Without `pooled`, no connection is
    /// kept once its answer is read.
    fn http(&self, pooled: bool) -> Result<reqwest::Client> {
        let mut http = reqwest::Client::builder().use_rustls_tls();
        for cert in &self.certificates {
            http = http.add_root_certificate(cert.clone());
        }
        if !pooled {
            http = http.pool_max_idle_per_host(0);
        }
        http.connect_timeout(self.connect_timeout)
            .read_timeout(self.read_timeout)
            .user_agent(self.user_agent.clone())
            .build()
            .map_err(|e| Error::Config(format!("cannot build the HTTP client: {e}")))
    }
}

/// A typed client of Tether's HTTP API (the `/api/v1/cloud` dialect). Cheap to clone; clones share
/// one connection pool.
///
/// Every method returns [`Error::Api`] with the server's error envelope when the server refuses, and
/// a transport variant ([`Error::Connect`], [`Error::Timeout`], [`Error::Transport`]) when no answer
/// came back.
#[derive(Clone, Debug)]
pub struct Client {
    http: reqwest::Client,
    transport: Arc<Transport>,
    server: Arc<str>,
    api_base: Arc<str>,
    token: Option<Arc<str>>,
    timeout: Duration,
}

impl Client {
    /// Settings for a client of the server at `server` (e.g. `http://127.0.0.1:4780`). With the
    /// default prefix, [`ClientBuilder::build`] refuses a URL whose path already ends in an API path
    /// (`/api/v1/cloud` or `/v1`).
    pub fn builder(server: impl Into<String>) -> ClientBuilder {
        ClientBuilder {
            server: server.into(),
            prefix: API_PREFIX.to_owned(),
            token: None,
            timeout: DEFAULT_TIMEOUT,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            read_timeout: DEFAULT_READ_TIMEOUT,
            user_agent: format!("tether-client/{}", env!("CARGO_PKG_VERSION")),
            ca_cert_files: Vec::new(),
        }
    }

    /// A client of the server at `server` using `token`, with default settings.
    pub fn new(server: impl Into<String>, token: impl Into<String>) -> Result<Client> {
        Client::builder(server).token(token).build()
    }

    /// A client for one polled work item: it calls the secret's `api_base_url` (or `fallback_server`
    /// with the default prefix when the secret has none) with the item's session token. It trusts the
    /// system's roots only; for a private CA build one with [`Client::builder`] and
    /// [`ClientBuilder::ca_cert_file`].
    pub fn for_work_secret(secret: &WorkSecret, fallback_server: &str) -> Result<Client> {
        let builder = match &secret.api_base_url {
            Some(base) => Client::builder(base.clone()).prefix(""),
            None => Client::builder(fallback_server),
        };
        builder.token(secret.sessions_token.clone()).build()
    }

    /// The same client, except that each of its requests opens a connection of its own and closes it
    /// after the answer. For a retry that must not land on a pooled connection that may be dead: a
    /// NAT or a load balancer that forgot a connection drops what is sent on it without a word, and
    /// the request then hangs until its timeout.
    pub fn on_fresh_connections(&self) -> Client {
        let unpooled = self.transport.unpooled.get_or_init(|| {
            // The settings built the pooled client already, so they build this one too; were it to
            // fail all the same, the pooled client is the best left.
            self.transport
                .http(false)
                .unwrap_or_else(|_| self.http.clone())
        });
        Client {
            http: unpooled.clone(),
            ..self.clone()
        }
    }

    /// The same client (and connection pool), allowing `timeout` for each ordinary request instead.
    pub fn with_timeout(&self, timeout: Duration) -> Client {
        Client {
            timeout,
            ..self.clone()
        }
    }

    /// The same client (and connection pool) with another token.
    pub fn with_token(&self, token: impl Into<String>) -> Client {
        Client {
            token: Some(Arc::from(token.into())),
            ..self.clone()
        }
    }

    /// The server URL, without the API prefix.
    pub fn server_url(&self) -> &str {
        &self.server
    }

    /// The API base URL: the server URL and the prefix.
    pub fn api_base_url(&self) -> &str {
        &self.api_base
    }

    // ---- plumbing -------------------------------------------------------------------------------

    fn url(&self, segments: &[&str]) -> String {
        let mut url = String::from(&*self.api_base);
        for segment in segments {
            url.push('/');
            url.push_str(&encode_segment(segment));
        }
        url
    }

    fn request(&self, method: Method, url: &str) -> RequestBuilder {
        let mut builder = self.http.request(method, url).timeout(self.timeout);
        if let Some(token) = &self.token {
            builder = builder.bearer_auth(token);
        }
        builder
    }

    /// Sends a request and decodes a success body as `T`, or the error envelope as [`Error::Api`].
    async fn send<T: DeserializeOwned>(&self, builder: RequestBuilder, url: &str) -> Result<T> {
        self.send_reading_headers(builder, url)
            .await
            .map(|(body, _)| body)
    }

    /// [`Client::send`], with the answer's headers.
    async fn send_reading_headers<T: DeserializeOwned>(
        &self,
        builder: RequestBuilder,
        url: &str,
    ) -> Result<(T, reqwest::header::HeaderMap)> {
        let response = builder.send().await.map_err(|e| Error::transport(url, e))?;
        let status = response.status().as_u16();
        let request_id = response
            .headers()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        if !(200..300).contains(&status) {
            let body = error_body(response).await;
            return Err(ApiError::from_response(status, request_id, &body).into());
        }
        let headers = response.headers().clone();
        let body = body_within(response, url, MAX_RESPONSE_BYTES).await?;
        let body = serde_json::from_slice(&body).map_err(|source| Error::Decode {
            url: url.to_owned(),
            status,
            source,
        })?;
        Ok((body, headers))
    }

    async fn get<T: DeserializeOwned>(&self, segments: &[&str], query: &Query) -> Result<T> {
        let url = self.url(segments);
        self.send(self.request(Method::GET, &url).query(query), &url)
            .await
    }

    async fn post<T: DeserializeOwned, B: Serialize + ?Sized>(
        &self,
        segments: &[&str],
        body: Option<&B>,
    ) -> Result<T> {
        let url = self.url(segments);
        let mut builder = self.request(Method::POST, &url);
        if let Some(body) = body {
            builder = builder.json(body);
        }
        self.send(builder, &url).await
    }

    async fn delete<T: DeserializeOwned>(&self, segments: &[&str]) -> Result<T> {
        let url = self.url(segments);
        self.send(self.request(Method::DELETE, &url), &url).await
    }

    /// Any call, for endpoints this client does not model: `path` is relative to the API base
    /// (e.g. `/environments`), the answer is the raw JSON.
    pub async fn raw(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, &str)],
        body: Option<&Value>,
    ) -> Result<Value> {
        let url = format!("{}/{}", self.api_base, path.trim_start_matches('/'));
        let mut builder = self.request(method, &url).query(query);
        if let Some(body) = body {
            builder = builder.json(body);
        }
        self.send(builder, &url).await
    }

    /// `GET /healthz`: whether the server process is up.
    pub async fn health(&self) -> Result<()> {
        let url = format!("{}/healthz", self.server);
        self.send::<Value>(self.request(Method::GET, &url), &url)
            .await
            .map(drop)
    }

    // ---- environments (§7.1) --------------------------------------------------------------------

    /// `POST /environments`.
    pub async fn create_environment(&self, body: &CreateEnvironment) -> Result<Environment> {
        self.post(&["environments"], Some(body)).await
    }

    /// `GET /environments`: one page (archived ones only when asked for).
    pub async fn list_environments(&self, params: &ListResources) -> Result<Page<Environment>> {
        self.get(&["environments"], &params.query()).await
    }

    /// `GET /environments/{id}`.
    pub async fn get_environment(&self, id: &str) -> Result<Environment> {
        self.get(&["environments", id], &Query::new()).await
    }

    /// `POST /environments/{id}`: partial update.
    pub async fn update_environment(
        &self,
        id: &str,
        body: &UpdateEnvironment,
    ) -> Result<Environment> {
        self.post(&["environments", id], Some(body)).await
    }

    /// `POST /environments/{id}/archive`: no new sessions; existing work continues. 409 if archived.
    pub async fn archive_environment(&self, id: &str) -> Result<Environment> {
        self.post::<_, Value>(&["environments", id, "archive"], None)
            .await
    }

    /// `DELETE /environments/{id}`: 409 while sessions still reference it.
    pub async fn delete_environment(&self, id: &str) -> Result<Deleted> {
        self.delete(&["environments", id]).await
    }

    // ---- environment keys (§11.1) ---------------------------------------------------------------

    /// `POST /environments/{id}/keys`: mints a worker key for one environment; the answer's `token`
    /// is the only time the secret is shown.
    pub async fn create_environment_key(
        &self,
        environment_id: &str,
        name: Option<&str>,
    ) -> Result<Credential> {
        self.post(
            &["environments", environment_id, "keys"],
            Some(&named(name)),
        )
        .await
    }

    /// `GET /environments/{id}/keys` (secrets are never listed).
    pub async fn list_environment_keys(
        &self,
        environment_id: &str,
        params: &ListParams,
    ) -> Result<Page<Credential>> {
        self.get(&["environments", environment_id, "keys"], &params.query())
            .await
    }

    /// `DELETE /environments/{id}/keys/{key_id}`: revoking twice is harmless.
    pub async fn revoke_environment_key(
        &self,
        environment_id: &str,
        key_id: &str,
    ) -> Result<Credential> {
        self.delete(&["environments", environment_id, "keys", key_id])
            .await
    }

    // ---- admin tokens (§11.1) -------------------------------------------------------------------

    /// `POST /tokens`: mints an admin token; the answer's `token` is the only time it is shown.
    pub async fn create_token(&self, name: Option<&str>) -> Result<Credential> {
        self.post(&["tokens"], Some(&named(name))).await
    }

    /// `GET /tokens` (secrets are never listed).
    pub async fn list_tokens(&self, params: &ListParams) -> Result<Page<Credential>> {
        self.get(&["tokens"], &params.query()).await
    }

    /// `DELETE /tokens/{id}`: revoking twice is harmless.
    pub async fn revoke_token(&self, id: &str) -> Result<Credential> {
        self.delete(&["tokens", id]).await
    }

    // ---- agents (§12.1) -------------------------------------------------------------------------

    /// `POST /agents`.
    pub async fn create_agent(&self, body: &CreateAgent) -> Result<Agent> {
        self.post(&["agents"], Some(body)).await
    }

    /// `GET /agents`: one page.
    pub async fn list_agents(&self, params: &ListResources) -> Result<Page<Agent>> {
        self.get(&["agents"], &params.query()).await
    }

    /// `GET /agents/{id}`: the current version.
    pub async fn get_agent(&self, id: &str) -> Result<Agent> {
        self.get(&["agents", id], &Query::new()).await
    }

    /// `POST /agents/{id}`: partial update, making a new version.
    pub async fn update_agent(&self, id: &str, body: &UpdateAgent) -> Result<Agent> {
        self.post(&["agents", id], Some(body)).await
    }

    /// `POST /agents/{id}/archive`: 409 if archived already.
    pub async fn archive_agent(&self, id: &str) -> Result<Agent> {
        self.post::<_, Value>(&["agents", id, "archive"], None)
            .await
    }

    // ---- sessions (§12.2) -----------------------------------------------------------------------

    /// `POST /sessions`: on a `self_hosted` environment this enqueues a work item.
    pub async fn create_session(&self, body: &CreateSession) -> Result<Session> {
        self.post(&["sessions"], Some(body)).await
    }

    /// `GET /sessions`: one page.
    pub async fn list_sessions(&self, params: &ListSessions) -> Result<Page<Session>> {
        self.get(&["sessions"], &params.query()).await
    }

    /// `GET /sessions/{id}`.
    pub async fn get_session(&self, id: &str) -> Result<Session> {
        self.get(&["sessions", id], &Query::new()).await
    }

    /// `POST /sessions/{id}`: title and metadata patch.
    pub async fn update_session(&self, id: &str, body: &UpdateSession) -> Result<Session> {
        self.post(&["sessions", id], Some(body)).await
    }

    /// `POST /sessions/{id}/archive`: force-stops its live work item; 409 if archived already.
    pub async fn archive_session(&self, id: &str) -> Result<Session> {
        self.post::<_, Value>(&["sessions", id, "archive"], None)
            .await
    }

    /// `DELETE /sessions/{id}`: force-stops its live work item, then removes it and its events.
    pub async fn delete_session(&self, id: &str) -> Result<Deleted> {
        self.delete(&["sessions", id]).await
    }

    /// `POST /sessions/{id}/cancel`: interrupts the running turn (`status` comes back as
    /// `canceling`); a no-op on an idle session (the session comes back unchanged).
    pub async fn cancel_session(&self, id: &str) -> Result<Cancel> {
        self.post::<_, Value>(&["sessions", id, "cancel"], None)
            .await
    }

    // ---- session events (§12.3) -----------------------------------------------------------------

    /// `POST /sessions/{id}/events` with 1–100 events; returns them as stored (with ids).
    pub async fn send_events(&self, session_id: &str, events: &[NewEvent]) -> Result<Vec<Event>> {
        let body = PostEvents::new(events.iter().cloned());
        let stored: PostedEvents = self
            .post(&["sessions", session_id, "events"], Some(&body))
            .await?;
        Ok(stored.data)
    }

    /// `GET /sessions/{id}/events`: one page of the session's event log.
    pub async fn list_events(&self, session_id: &str, params: &ListEvents) -> Result<Page<Event>> {
        self.get(&["sessions", session_id, "events"], &params.query())
            .await
    }

    /// `GET /sessions/{id}/events/stream`: the live event stream. With `last_event_id` the server
    /// first replays every later event, then follows live; without it the stream starts with events
    /// written after it opened.
    ///
    /// The stream has no overall timeout; a connection silent for longer than the read timeout ends
    /// it with [`Error::Timeout`].
    pub async fn stream_events(
        &self,
        session_id: &str,
        last_event_id: Option<&str>,
    ) -> Result<EventStream> {
        let url = self.url(&["sessions", session_id, "events", "stream"]);
        let mut builder = self
            .http
            .get(&url)
            .header(ACCEPT, HeaderValue::from_static("text/event-stream"));
        if let Some(token) = &self.token {
            builder = builder.bearer_auth(token);
        }
        if let Some(id) = last_event_id {
            builder = builder.header("last-event-id", id);
        }
        let response = builder
            .send()
            .await
            .map_err(|e| Error::transport(&url, e))?;
        let status = response.status().as_u16();
        if !(200..300).contains(&status) {
            let request_id = response
                .headers()
                .get("x-request-id")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            // This request has no overall timeout (it is a stream): its error's body gets the
            // client's timeout of its own.
            let body = tokio::time::timeout(self.timeout, error_body(response))
                .await
                .unwrap_or_default();
            return Err(ApiError::from_response(status, request_id, &body).into());
        }
        Ok(EventStream::new(
            response,
            url,
            last_event_id.map(str::to_owned),
        ))
    }

    // ---- work (§6, §11.2, §11.4) ----------------------------------------------------------------

    /// `GET /environments/{id}/work`: every state, in queue order.
    pub async fn list_work(
        &self,
        environment_id: &str,
        params: &ListParams,
    ) -> Result<Page<WorkItem>> {
        self.get(&["environments", environment_id, "work"], &params.query())
            .await
    }

    /// `GET /environments/{id}/work/poll`: claims the oldest claimable item, or `None` when there is
    /// none (after waiting up to `block_ms`). The item carries its `secret`; acknowledge it promptly
    /// or it is handed out again after `reclaim_older_than_ms`.
    pub async fn poll_work(
        &self,
        environment_id: &str,
        options: &PollOptions,
    ) -> Result<Option<WorkItem>> {
        let url = self.url(&["environments", environment_id, "work", "poll"]);
        let builder = self.taking(Method::GET, &url, options, &options.query());
        self.send(builder, &url).await
    }

    /// `POST /environments/{id}/work/claim` (a Tether extension): a poll, its ack and the first
    /// heartbeat in one request. The item comes back `active` and leased to the caller, with its
    /// `secret`; heartbeat with `lease.last_heartbeat` as `expected_last_heartbeat`, and stop it at
    /// the end. `None` when there is no item (after waiting up to `block_ms`). Servers other than
    /// Tether answer 404. [`Client::stop_then_claim_work`] also stops the item before.
    pub async fn claim_work(
        &self,
        environment_id: &str,
        options: &ClaimOptions,
    ) -> Result<Option<Claim>> {
        let (url, builder) = self.claiming(environment_id, options);
        self.send(builder, &url).await
    }

    /// [`Client::claim_work`] that first stops `stop`, the caller's item whose program has ended
    /// (a Tether extension): the holder's forced stop, proven by the item's session token, so that
    /// a worker taking one item after another sends one request per item. A refused stop is the
    /// error (409 `not_held` for a token that no longer holds the item,
    /// [`crate::Error::turn_left_open`] with `unless_turn_open`), and nothing is claimed; an item
    /// already stopped counts as stopped, so a try sent again with the claim's key may carry the
    /// stop again. [`StopThenClaim::stopped`] is false when the server did not say that it made the
    /// stop (a Tether server older than this client ignores the request's body and only claims):
    /// then stop the item on its own.
    pub async fn stop_then_claim_work(
        &self,
        environment_id: &str,
        stop: &StopWithClaim,
        options: &ClaimOptions,
    ) -> Result<StopThenClaim> {
        let (url, builder) = self.claiming(environment_id, options);
        let body = tether_api::ClaimRequest {
            stop: Some(stop.clone()),
        };
        let (claim, headers) = self.send_reading_headers(builder.json(&body), &url).await?;
        let said = headers.get(STOPPED_HEADER).and_then(|v| v.to_str().ok());
        Ok(StopThenClaim {
            stopped: said == Some(stop.work_id.as_str()),
            claim,
        })
    }

    /// A claim's URL and request, as `options` say (its body is the caller's).
    fn claiming(&self, environment_id: &str, options: &ClaimOptions) -> (String, RequestBuilder) {
        let url = self.url(&["environments", environment_id, "work", "claim"]);
        let builder = self.taking(Method::POST, &url, &options.poll, &options.query());
        let builder = match &options.idempotency_key {
            Some(key) => builder.header("idempotency-key", key),
            None => builder,
        };
        (url, builder)
    }

    /// A poll's or a claim's request: `query`, the `Worker-ID`, and a timeout that lets the server
    /// hold it for `block_ms` on top of the answer's own bound.
    fn taking(
        &self,
        method: Method,
        url: &str,
        poll: &PollOptions,
        query: &Query,
    ) -> RequestBuilder {
        let wait = Duration::from_millis(u64::from(poll.block_ms.unwrap_or(0)));
        let builder = self
            .request(method, url)
            .query(query)
            .timeout(poll.timeout.unwrap_or(self.timeout) + wait);
        match &poll.worker_id {
            Some(worker) => builder.header("worker-id", worker),
            None => builder,
        }
    }

    /// `GET /environments/{id}/work/stats`.
    pub async fn work_stats(&self, environment_id: &str) -> Result<QueueStats> {
        self.get(
            &["environments", environment_id, "work", "stats"],
            &Query::new(),
        )
        .await
    }

    /// `GET /environments/{id}/work/{work_id}`.
    pub async fn get_work(&self, environment_id: &str, work_id: &str) -> Result<WorkItem> {
        self.get(
            &["environments", environment_id, "work", work_id],
            &Query::new(),
        )
        .await
    }

    /// `POST /environments/{id}/work/{work_id}`: merge-patches the item's metadata (allowed in every
    /// state).
    pub async fn update_work_metadata(
        &self,
        environment_id: &str,
        work_id: &str,
        metadata: &MetadataPatch,
    ) -> Result<WorkItem> {
        self.post(
            &["environments", environment_id, "work", work_id],
            Some(&json!({ "metadata": metadata })),
        )
        .await
    }

    /// `POST /environments/{id}/work/{work_id}/ack`: queued → starting. Repeating it on a started
    /// item is a harmless 200; a different `worker_id` than the one the item was delivered to is 409.
    pub async fn ack_work(
        &self,
        environment_id: &str,
        work_id: &str,
        worker_id: Option<&str>,
    ) -> Result<WorkItem> {
        let url = self.url(&["environments", environment_id, "work", work_id, "ack"]);
        let mut builder = self.request(Method::POST, &url);
        if let Some(worker) = worker_id {
            builder = builder.header("worker-id", worker);
        }
        self.send(builder, &url).await
    }

    /// `POST /environments/{id}/work/{work_id}/heartbeat`: renews the lease. 409 means the item is no
    /// longer this worker's (stop working on it, do not stop it); 412 means the lease was lost.
    pub async fn heartbeat(
        &self,
        environment_id: &str,
        work_id: &str,
        options: &HeartbeatOptions,
    ) -> Result<Heartbeat> {
        let url = self.url(&["environments", environment_id, "work", work_id, "heartbeat"]);
        let mut builder = self
            .request(Method::POST, &url)
            .query(&options.query())
            .timeout(options.timeout.unwrap_or(self.timeout));
        if let Some(worker) = &options.worker_id {
            builder = builder.header("worker-id", worker);
        }
        self.send(builder, &url).await
    }

    /// `POST /environments/{id}/work/{work_id}/stop`: graceful (`force = false`: starting/active →
    /// stopping, stopping → stopped) or forced (any live state → stopped). 409 once stopped. The
    /// worker's own stop, once its program ended: it sends no `hold_next_item`, and holds nothing
    /// unless an admin token sends it on `/v1` (see [`Client::stop_work_as_operator`]).
    pub async fn stop_work(
        &self,
        environment_id: &str,
        work_id: &str,
        force: bool,
    ) -> Result<WorkItem> {
        self.stop_work_holding(environment_id, work_id, force, false)
            .await
    }

    /// [`Client::stop_work`] by an operator, for an item whose worker may still be running its
    /// program: with `hold_next_item` (Tether extension), the session's next item is not handed out
    /// before the stopped lease's deadline, by which the worker has learned of the stop and killed
    /// its program.
    pub async fn stop_work_as_operator(
        &self,
        environment_id: &str,
        work_id: &str,
        force: bool,
    ) -> Result<WorkItem> {
        self.stop_work_holding(environment_id, work_id, force, true)
            .await
    }

    /// A forced [`Client::stop_work`] by the item's worker once its program has ended well, refused
    /// (409, [`crate::Error::turn_left_open`]) while the session has a turn open (Tether extension:
    /// input came while the program was ending; run it again rather than fail the turn).
    pub async fn stop_work_unless_turn_open(
        &self,
        environment_id: &str,
        work_id: &str,
    ) -> Result<WorkItem> {
        self.post(
            &["environments", environment_id, "work", work_id, "stop"],
            Some(&json!({ "force": true, "unless_turn_open": true })),
        )
        .await
    }

    async fn stop_work_holding(
        &self,
        environment_id: &str,
        work_id: &str,
        force: bool,
        hold_next_item: bool,
    ) -> Result<WorkItem> {
        // The field only when set: the body a worker sends stays the contract's.
        let body = match hold_next_item {
            true => json!({ "force": force, "hold_next_item": true }),
            false => json!({ "force": force }),
        };
        self.post(
            &["environments", environment_id, "work", work_id, "stop"],
            Some(&body),
        )
        .await
    }

    /// `GET /environments/{id}/work?cause=poison` (Tether extension): the items stopped after too many
    /// lease expiries (D-5) that no one has requeued yet.
    pub async fn list_poison_work(
        &self,
        environment_id: &str,
        params: &ListParams,
    ) -> Result<Page<WorkItem>> {
        let mut query = params.query();
        query.push(("cause", "poison".to_owned()));
        self.get(&["environments", environment_id, "work"], &query)
            .await
    }

    /// `POST /environments/{id}/work/{work_id}/requeue` (Tether extension, admin only): gives the
    /// session of a stopped item a fresh queued item, which is returned. `reason` goes into the history.
    pub async fn requeue_work(
        &self,
        environment_id: &str,
        work_id: &str,
        reason: Option<&str>,
    ) -> Result<WorkItem> {
        self.post(
            &["environments", environment_id, "work", work_id, "requeue"],
            Some(&json!({ "reason": reason })),
        )
        .await
    }

    /// `GET /environments/{id}/work/{work_id}/history`: one page of transitions, oldest first.
    pub async fn work_history(
        &self,
        environment_id: &str,
        work_id: &str,
        params: &ListParams,
    ) -> Result<WorkHistory> {
        self.get(
            &["environments", environment_id, "work", work_id, "history"],
            &params.query(),
        )
        .await
    }

    /// `GET /environments/{id}/workers`: workers seen polling in the last five minutes.
    pub async fn list_workers(&self, environment_id: &str) -> Result<Vec<Worker>> {
        #[derive(Deserialize)]
        struct Workers {
            data: Vec<Worker>,
        }
        let workers: Workers = self
            .get(&["environments", environment_id, "workers"], &Query::new())
            .await?;
        Ok(workers.data)
    }
}

/// `{"name": …}` or `{}`.
fn named(name: Option<&str>) -> Value {
    match name {
        Some(name) => json!({ "name": name }),
        None => json!({}),
    }
}

/// Percent-encodes one path segment, so that an id can never change the path it is placed in.
fn encode_segment(segment: &str) -> String {
    let mut out = String::with_capacity(segment.len());
    for byte in segment.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b'~') {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// A success response's body, refused past `limit` bytes (a declared length past it is refused
/// before anything is read).
async fn body_within(
    mut response: reqwest::Response,
    url: &str,
    limit: usize,
) -> Result<bytes::Bytes> {
    let too_large = || Error::TooLarge {
        url: url.to_owned(),
        limit,
    };
    if response.content_length().is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    let mut body = bytes::BytesMut::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| Error::transport(url, e))?
    {
        if body.len() + chunk.len() > limit {
            return Err(too_large());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body.freeze())
}

/// The first [`MAX_ERROR_BYTES`] of an error response's body; what could not be read is left out.
async fn error_body(mut response: reqwest::Response) -> bytes::Bytes {
    let mut body = bytes::BytesMut::new();
    while let Ok(Some(chunk)) = response.chunk().await {
        let room = MAX_ERROR_BYTES - body.len();
        body.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if body.len() == MAX_ERROR_BYTES {
            break;
        }
    }
    body.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_cannot_escape_their_path_segment() {
        assert_eq!(encode_segment("env_0123abc"), "env_0123abc");
        assert_eq!(encode_segment("../tokens"), "..%2Ftokens");
        assert_eq!(encode_segment("a b?c"), "a%20b%3Fc");
    }

    #[test]
    fn urls_are_built_from_server_and_prefix() {
        let client = Client::new("http://127.0.0.1:4780/", "t").unwrap();
        assert_eq!(client.api_base_url(), "http://127.0.0.1:4780/api/v1/cloud");
        assert_eq!(
            client.url(&["environments", "env_1", "work", "poll"]),
            "http://127.0.0.1:4780/api/v1/cloud/environments/env_1/work/poll"
        );
        let secret = WorkSecret {
            sessions_token: "tth_ses_x".into(),
            api_base_url: Some("http://h:1/api/v1/cloud".into()),
        };
        let item_client = Client::for_work_secret(&secret, "http://unused").unwrap();
        assert_eq!(item_client.api_base_url(), "http://h:1/api/v1/cloud");
    }

    #[test]
    fn a_host_and_port_without_a_scheme_are_told_what_to_add() {
        for given in ["127.0.0.1:4780", "[::1]:4780", "tether.example/"] {
            match Client::new(given, "t") {
                Err(Error::Config(message)) => assert!(
                    message.contains("must start with http:// or https:// (http://")
                        && message.contains(given.trim_end_matches('/')),
                    "{given}: {message}"
                ),
                other => panic!("{given}: {other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn a_refused_connection_names_its_url_once() {
        // A port just given back: nothing listens there.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let client = Client::new(format!("http://127.0.0.1:{port}"), "t").unwrap();
        let options = crate::PollOptions {
            block_ms: Some(999),
            ..Default::default()
        };
        let error = client.poll_work("env_x", &options).await.unwrap_err();
        let message = error.to_string();
        assert!(matches!(error, Error::Connect { .. }), "{error:?}");
        assert_eq!(message.matches("127.0.0.1").count(), 1, "{message}");
        assert!(!message.contains("block_ms"), "{message}");
    }

    #[test]
    fn a_server_url_that_is_not_one_is_quoted_as_given() {
        match Client::new("http://", "t") {
            Err(Error::Config(message)) => {
                assert!(
                    message.starts_with("the server URL \"http://\" is not a URL"),
                    "{message}"
                );
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_server_url_that_ends_in_an_api_path_is_refused_with_the_base_url_to_give() {
        for (url, base) in [
            (
                "http://127.0.0.1:4780/api/v1/cloud",
                "http://127.0.0.1:4780",
            ),
            (
                "http://127.0.0.1:4780/api/v1/cloud/",
                "http://127.0.0.1:4780",
            ),
            ("https://h.example/tether/v1", "https://h.example/tether"),
        ] {
            match Client::new(url, "t") {
                Err(Error::Config(message)) => {
                    assert!(message.contains("API path"), "{message}");
                    assert!(
                        message.contains(&format!("give the server's base URL ({base})")),
                        "{message}"
                    );
                }
                other => panic!("{url}: {other:?}"),
            }
        }
        // The API base itself, with no prefix added, and a server under some other path, are fine.
        let client = Client::builder("http://127.0.0.1:4780/api/v1/cloud")
            .prefix("")
            .build()
            .unwrap();
        assert_eq!(client.api_base_url(), "http://127.0.0.1:4780/api/v1/cloud");
        let client = Client::new("https://h.example/tether", "t").unwrap();
        assert_eq!(
            client.api_base_url(),
            "https://h.example/tether/api/v1/cloud"
        );
        let client = Client::new("https://h.example/v10", "t").unwrap();
        assert_eq!(client.api_base_url(), "https://h.example/v10/api/v1/cloud");
    }

    #[test]
    fn bad_server_urls_are_configuration_errors() {
        assert!(matches!(
            Client::new("127.0.0.1:4780", "t"),
            Err(Error::Config(_))
        ));
        assert!(matches!(
            Client::new("not a url", "t"),
            Err(Error::Config(_))
        ));
    }
}

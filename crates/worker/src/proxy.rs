//! `--sandbox-network api`: the worker's side of the program's only way out.
//!
//! A program under `api` lives in a network namespace with nothing but its own loopback. Inside it,
//! `tether sandbox-forward` (see [`crate::forward`]) listens on `127.0.0.1:4780` and passes each
//! connection, byte for byte, to a Unix socket bound into the sandbox. This module serves that socket:
//! an HTTP reverse proxy that sends every request to the worker's configured server and nowhere else,
//! with the worker's own TLS settings (`--ca-cert`).
//!
//! Plain HTTP inside, TLS outside: the program talks plain HTTP to its loopback, where nobody else can
//! listen (the namespace is its own), and the worker makes the HTTPS connection to the server. The
//! program therefore needs no CA file and cannot name another host: the proxy decides where requests
//! go (the server's origin), and only paths under the API's base path pass.
//!
//! Bounds, per item: [`MAX_CONNECTIONS`] connections at once, request headers within
//! [`HEADER_TIMEOUT`], request bodies up to [`MAX_BODY`], a connection to the server within
//! [`CONNECT_TIMEOUT`] and no silence from it longer than [`READ_TIMEOUT`] (the server breaks an idle
//! event stream every 15 s, §12.3). Responses are streamed, so an event stream lasts as long as the
//! program reads it, and the whole proxy ends with the item.

use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::TryStreamExt as _;
use http_body_util::{combinators::BoxBody, BodyExt as _, Full, Limited, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::UnixListener;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

use crate::{Error, Result};

/// Connections one item's program may hold through the proxy at once; more are closed at once.
pub const MAX_CONNECTIONS: usize = 32;
/// The largest request body passed on (the server's own limits are smaller).
pub const MAX_BODY: usize = 16 << 20;
/// Time a connection gets to send a request's headers.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(30);
/// Time to open a connection to the server.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest silence from the server within one response.
pub const READ_TIMEOUT: Duration = Duration::from_secs(60);

/// Where the proxy sends requests: the server's origin, for paths under its API base path.
#[derive(Clone, Debug)]
pub struct Upstream {
    http: reqwest::Client,
    /// `scheme://host:port` of the server.
    origin: String,
    /// The API's base path (`/api/v1/cloud`), without a trailing slash.
    prefix: String,
}

type ProxyBody = BoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

/// Request and response headers that concern one connection, not the request (RFC 9110 §7.6.1), and
/// the host, which the proxy sets.
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
];

impl Upstream {
    /// For the API at `api_base` (`https://tether.example/api/v1/cloud`), trusting `ca_cert` too.
    pub fn new(api_base: &str, ca_cert: Option<&Path>) -> Result<Upstream> {
        let url = reqwest::Url::parse(api_base)
            .map_err(|e| Error::config(format!("the server URL {api_base:?}: {e}")))?;
        let origin = url.origin().ascii_serialization();
        let prefix = url.path().trim_end_matches('/').to_owned();
        let mut http = reqwest::Client::builder()
            .use_rustls_tls()
            .connect_timeout(CONNECT_TIMEOUT)
            .read_timeout(READ_TIMEOUT)
            // The server is the only destination: a redirect elsewhere is handed to the program as
            // it is, never followed.
            .redirect(reqwest::redirect::Policy::none());
        if let Some(path) = ca_cert {
            let pem = std::fs::read(path).map_err(|e| {
                Error::config(format!("cannot read --ca-cert {}: {e}", path.display()))
            })?;
            for cert in reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| Error::config(format!("invalid --ca-cert {}: {e}", path.display())))?
            {
                http = http.add_root_certificate(cert);
            }
        }
        let http = http
            .build()
            .map_err(|e| Error::config(format!("the API proxy's HTTP client: {e}")))?;
        Ok(Upstream {
            http,
            origin,
            prefix,
        })
    }

    /// The API's base path, which the program's `TETHER_API_URL` keeps.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    fn allows(&self, path: &str) -> bool {
        let rest = path.strip_prefix(self.prefix.as_str());
        matches!(rest, Some(rest) if rest.is_empty() || rest.starts_with('/'))
    }
}

/// One item's proxy, serving its Unix socket until dropped.
pub struct ApiProxy {
    task: JoinHandle<()>,
    socket: PathBuf,
}

impl ApiProxy {
    /// Listens on `socket` (created here, removed on drop).
    pub fn start(socket: PathBuf, upstream: Upstream) -> std::io::Result<ApiProxy> {
        let _ = std::fs::remove_file(&socket);
        let listener = UnixListener::bind(&socket)?;
        let upstream = Arc::new(upstream);
        let task = tokio::spawn(serve(listener, upstream));
        Ok(ApiProxy { task, socket })
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }
}

impl Drop for ApiProxy {
    fn drop(&mut self) {
        // The connections are tasks of the accept loop's: aborting it ends them with it.
        self.task.abort();
        let _ = std::fs::remove_file(&self.socket);
    }
}

async fn serve(listener: UnixListener, upstream: Arc<Upstream>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
        };
        let Ok((stream, _)) = accepted else {
            // A transient failure (out of descriptors): give the program's connections a moment.
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            drop(stream);
            continue;
        };
        let upstream = upstream.clone();
        connections.spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let upstream = upstream.clone();
                async move { Ok::<_, Infallible>(forward(&upstream, request).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service)
                .await;
            drop(slot);
        });
    }
}

/// One request, passed to the server; the answer streamed back.
async fn forward(upstream: &Upstream, request: Request<Incoming>) -> Response<ProxyBody> {
    let path_and_query = request
        .uri()
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    // Judged on the URL as it will be sent, after `..` and `%2e%2e` are resolved.
    let url = match reqwest::Url::parse(&format!("{}{path_and_query}", upstream.origin)) {
        Ok(url) if upstream.allows(url.path()) => url,
        _ => {
            return refusal(
                StatusCode::NOT_FOUND,
                "not_found_error",
                &format!(
                    "only the Tether API ({}/…) is reachable from the sandbox",
                    upstream.prefix
                ),
            )
        }
    };
    let (parts, body) = request.into_parts();
    let body = match Limited::new(body, MAX_BODY).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            return refusal(
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                &format!(
                "request bodies through the sandbox's API proxy are limited to {MAX_BODY} bytes"
            ),
            )
        }
        Err(e) => {
            return refusal(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                &format!("the request body could not be read: {e}"),
            )
        }
    };
    let mut outbound = upstream.http.request(parts.method, url).body(body);
    for (name, value) in &parts.headers {
        if !HOP_BY_HOP.contains(&name.as_str()) && name != "content-length" {
            outbound = outbound.header(name, value);
        }
    }
    let answer = match outbound.send().await {
        Ok(answer) => answer,
        Err(e) => {
            return refusal(
                StatusCode::BAD_GATEWAY,
                "api_error",
                &format!("the sandbox's API proxy could not reach the server: {e}"),
            )
        }
    };
    let mut response = Response::builder().status(answer.status());
    for (name, value) in answer.headers() {
        if !HOP_BY_HOP.contains(&name.as_str()) {
            response = response.header(name, value);
        }
    }
    let stream = answer
        .bytes_stream()
        .map_ok(Frame::data)
        .map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>);
    response
        .body(StreamBody::new(stream).boxed())
        .unwrap_or_else(|e| {
            refusal(
                StatusCode::BAD_GATEWAY,
                "api_error",
                &format!("the server's answer could not be passed on: {e}"),
            )
        })
}

/// An answer of the proxy's own, in the API's error envelope (§1.7).
fn refusal(status: StatusCode, kind: &str, message: &str) -> Response<ProxyBody> {
    let body = serde_json::json!({
        "type": "error",
        "request_id": uuid::Uuid::new_v4().to_string(),
        "error": { "type": kind, "message": message },
    });
    let mut response = Response::new(
        Full::new(Bytes::from(body.to_string()))
            .map_err(|never| match never {})
            .boxed(),
    );
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_paths_under_the_api_base_pass() {
        let upstream = Upstream::new("https://tether.example:8443/api/v1/cloud", None).unwrap();
        assert_eq!(upstream.origin, "https://tether.example:8443");
        assert_eq!(upstream.prefix(), "/api/v1/cloud");
        assert!(upstream.allows("/api/v1/cloud"));
        assert!(upstream.allows("/api/v1/cloud/sessions/x/events"));
        assert!(!upstream.allows("/api/v1/cloudy"));
        assert!(!upstream.allows("/"));
        assert!(!upstream.allows("/metrics"));
        assert!(Upstream::new("not a url", None).is_err());
    }

    /// One raw HTTP/1.1 request through the proxy's socket; the status line of the answer.
    async fn status_line(socket: &Path, head: &str, body: &[u8]) -> String {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let mut stream = tokio::net::UnixStream::connect(socket).await.unwrap();
        stream.write_all(head.as_bytes()).await.unwrap();
        // The proxy may answer (and close) before it has read a body past its limit.
        let _ = stream.write_all(body).await;
        let mut answer = Vec::new();
        let _ =
            tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut answer)).await;
        String::from_utf8_lossy(&answer)
            .lines()
            .next()
            .unwrap_or_default()
            .to_owned()
    }

    /// [`status_line`] of a body-less `GET path`.
    async fn get_status_line(socket: &Path, path: &str) -> String {
        let head = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        status_line(socket, &head, b"").await
    }

    #[tokio::test]
    async fn the_proxy_refuses_other_paths_large_bodies_and_says_when_the_server_is_away() {
        let dir = tempfile::tempdir().unwrap();
        // A port nothing listens on: the server is away.
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = closed.local_addr().unwrap().port();
        drop(closed);
        let upstream =
            Upstream::new(&format!("http://127.0.0.1:{port}/api/v1/cloud"), None).unwrap();
        let proxy = ApiProxy::start(dir.path().join("api.sock"), upstream).unwrap();
        let socket = proxy.socket().to_owned();
        let outside = get_status_line(&socket, "/metrics").await;
        assert!(outside.contains(" 404"), "{outside}");
        let dotted = get_status_line(&socket, "/api/v1/cloud/../../metrics").await;
        assert!(dotted.contains(" 404"), "{dotted}");
        let big = vec![b'x'; MAX_BODY + 1];
        let head = format!(
            "POST /api/v1/cloud/x HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
            big.len()
        );
        let large = status_line(&socket, &head, &big).await;
        assert!(large.contains(" 413"), "{large}");
        let away = get_status_line(&socket, "/api/v1/cloud/environments").await;
        assert!(away.contains(" 502"), "{away}");
        drop(proxy);
        assert!(!socket.exists(), "the socket goes with the proxy");
    }
}

//! The accept loop: plain TCP or TLS, HTTP/1.1 and HTTP/2, with the limits that keep a flood of
//! connections from taking the server down.
//!
//! * **A cap on open connections** ([`ConnectionLimits::max_connections`]). At it, a new connection
//!   takes the place of the one that has waited longest without a request in flight ([`slots`]), or
//!   failing that of one whose requests in flight all yield ([`Yieldable`]: event streams, which
//!   resume, and bodies still trickling in); when every one looked at is doing other work, the new
//!   one is accepted and closed at once: the client learns at once, and the listen backlog never
//!   fills up with connections nobody will serve.
//! * **A header timeout**: from accept (and, on a kept-alive connection, from the first byte of the
//!   next request) to the end of the request's headers, TLS handshake included. Slowloris connections
//!   and connections that never say anything are closed by it.
//! * **An idle timeout**: a connection with no request in flight is closed gracefully (HTTP/2: GOAWAY)
//!   after this long.
//! * **A write-stall timeout** (the idle timeout again): a response the client has stopped reading,
//!   whether that shows as a write waiting on the socket (HTTP/1) or as a response body hyper has
//!   stopped asking for more (an HTTP/2 stream whose window the client keeps shut:
//!   [`responses`]).
//! * **HTTP/2 streams**: at most [`H2_MAX_STREAMS`] at once per connection, each with at most
//!   [`H2_MAX_SEND_BUFFER`] buffered for sending, and all of them together with at most
//!   [`H2_MAX_UNSENT`] handed to hyper and not yet written ([`outbox`]).
//!
//! A request in flight is never cut by the header or idle timeouts, so long polls (≤ 999 ms) and event
//! streams (a keep-alive comment every 15 s) are untouched by them. The timeouts are enforced per
//! connection by a watchdog that reads a few atomics ([`ConnState`]) kept up to date by the I/O
//! wrapper ([`Tracked`]) and the response body wrapper ([`responses::TrackedBody`]).

mod outbox;
mod responses;
pub use responses::STALLED_AFTER;
mod slots;

use std::convert::Infallible;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use futures::FutureExt as _;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::tls::{TlsSettings, ALPN_H2};

/// The limits on connections. [`Default`] gives the documented defaults of `tether serve`.
#[derive(Clone, Debug)]
pub struct ConnectionLimits {
    /// Most connections open at once.
    pub max_connections: usize,
    /// From accept, or from the first byte of a request on a kept-alive connection, to the end of
    /// its headers (the TLS handshake included).
    pub header_timeout: Duration,
    /// A connection with no request in flight is closed after this long; a response the client does
    /// not read for this long is abandoned.
    pub idle_timeout: Duration,
}

/// `--max-connections`.
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
/// `--header-timeout`.
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// `--idle-timeout`: above the 15 s event-stream keep-alive and the 60 s idle limits of common proxies'
/// upstream pools, so the proxy closes first.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(75);

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits {
            max_connections: DEFAULT_MAX_CONNECTIONS,
            header_timeout: DEFAULT_HEADER_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
        }
    }
}

/// The most HTTP/2 streams one connection may have open at once: the least RFC 9113 advises (hyper's
/// default is 200). With [`H2_MAX_SEND_BUFFER`] it bounds what a connection's unread answers hold.
pub const H2_MAX_STREAMS: u32 = 100;

/// The most one HTTP/2 stream buffers for sending (hyper's default is 400 KiB): a client that does not
/// read an answer leaves at most this much, and a piece ([`responses::SPLIT`]), in the server's memory.
pub const H2_MAX_SEND_BUFFER: usize = 64 * 1024;

/// The most data of one HTTP/2 connection's answers that hyper may hold at once, over all its streams:
/// four streams' send buffers ([`outbox`]). Bodies asked at the same moment may each add one frame (a
/// piece, at most 16 KiB) beyond it. A client that leaves this much unread on some
/// streams slows its other streams on the same connection, and no one else.
pub const H2_MAX_UNSENT: usize = 4 * H2_MAX_SEND_BUFFER;

/// The read buffer hyper may fill on an HTTP/1 connection before it refuses an unfinished head with
/// 431 (hyper's default is about 400 KiB). Its last read may take up to as much again, the buffer
/// having doubled to make room for it, so a head of up to this much is always read, a head of over
/// twice this much never is, and a client that never ends its headers holds at most twice this
/// until the header timeout. As generous as common servers' header limits (nginx: 4 × 8 KiB).
pub const H1_MAX_BUFFER: usize = 32 * 1024;

/// An HTTP server for one connection, with the HTTP/1 and HTTP/2 bounds above.
fn http_builder() -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().max_buf_size(H1_MAX_BUFFER);
    builder
        .http2()
        .max_concurrent_streams(H2_MAX_STREAMS)
        .max_send_buf_size(H2_MAX_SEND_BUFFER);
    builder
}

/// An HTTP/1 server for a connection known to speak it, with the same bounds as [`http_builder`]'s.
/// hyper's HTTP/1 connection on its own, not the one that may speak either: the latter's state has
/// room for HTTP/2's, about 900 bytes more in every connection's task (2,000 idle workers, 2,000
/// tasks).
fn http1_builder() -> hyper::server::conn::http1::Builder {
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder.max_buf_size(H1_MAX_BUFFER);
    builder
}

/// How long a connection told to close gracefully may take to finish what it is doing.
const CLOSING_GRACE: Duration = Duration::from_secs(10);

/// Accepts connections until `stop` is cancelled, then waits (at most `drain`) for the open ones to
/// finish. Each connection closes gracefully once `stop` is cancelled.
pub async fn run(
    listener: TcpListener,
    api: crate::http::Api,
    tls: Option<TlsSettings>,
    limits: ConnectionLimits,
    stop: CancellationToken,
    drain: Duration,
) {
    assert!(
        u32::try_from(limits.max_connections).is_ok(),
        "max_connections too large"
    );
    let shared = Arc::new(Shared {
        api,
        acceptor: tls.map(|t| t.acceptor()),
        limits: limits.clone(),
        auto: http_builder(),
        http1: http1_builder(),
        http2: http_builder().http2_only(),
        stop: stop.clone(),
    });
    let slots = slots::Slots::new(limits.max_connections);
    // At most one warning a while, however many connections a flood brings.
    let mut refusals = crate::telemetry::RateLimitedLog::new();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stop.cancelled() => break,
        };
        let (stream, _peer) = match accepted {
            Ok(pair) => pair,
            Err(e) => {
                // Out of file descriptors (or another resource): wait a little instead of spinning;
                // the cap normally keeps this from happening at all.
                if let Some(unlogged) = refusals.due() {
                    tracing::warn!(error = %e, unlogged_since_last = unlogged, "cannot accept a connection");
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let state = Arc::new(ConnState::new());
        let slot = match slots.admit(state.clone()) {
            slots::Admission::Free(slot) => slot,
            slots::Admission::Displaced(slot) => {
                metrics::counter!("tether_http_connections_displaced_total").increment(1);
                slot
            }
            slots::Admission::Refused => {
                metrics::counter!("tether_http_connections_refused_total").increment(1);
                if let Some(unlogged) = refusals.due() {
                    tracing::warn!(
                        max_connections = limits.max_connections,
                        unlogged_since_last = unlogged,
                        "connection limit reached with a request in flight on every connection: \
                         closing new connections (see --max-connections)"
                    );
                }
                drop(stream);
                continue;
            }
        };
        tokio::spawn(connection(stream, shared.clone(), state, slot));
    }
    drop(listener);
    if tokio::time::timeout(drain, slots.all_gone()).await.is_err() {
        tracing::warn!("connections still open after the shutdown grace; closing anyway");
    }
}

struct Shared {
    api: crate::http::Api,
    acceptor: Option<tokio_rustls::TlsAcceptor>,
    limits: ConnectionLimits,
    auto: auto::Builder<TokioExecutor>,
    http1: hyper::server::conn::http1::Builder,
    http2: auto::Builder<TokioExecutor>,
    stop: CancellationToken,
}

/// Which HTTP version to speak on a connection.
#[derive(Clone, Copy)]
enum Protocol {
    /// Plain TCP: HTTP/1.1, or HTTP/2 with prior knowledge, told apart by the first bytes.
    Sniff,
    Http1,
    Http2,
}

async fn connection(
    stream: TcpStream,
    shared: Arc<Shared>,
    state: Arc<ConnState>,
    _slot: slots::Slot,
) {
    let _ = stream.set_nodelay(true);
    metrics::gauge!("tether_http_connections").increment(1.0);
    match &shared.acceptor {
        None => serve_plain(stream, &shared, state).await,
        // Boxed: a TLS connection's state (the handshake, rustls' session) would otherwise make
        // every connection's task as large, about 9 KiB where a plain one needs under 4.
        Some(acceptor) => Box::pin(serve_tls(acceptor, stream, &shared, state)).await,
    }
    metrics::gauge!("tether_http_connections").decrement(1.0);
}

/// What a connection does before its first request (its TLS handshake, a look at its first bytes),
/// held to the header timeout from the connection's opening, as the head that follows would be,
/// and given up at once when the connection is displaced at the cap or the server stops: it has
/// nothing to finish. `None` when given up; a timeout is counted under `reason`.
async fn before_the_first_request<T>(
    work: impl std::future::Future<Output = Option<T>>,
    state: &ConnState,
    shared: &Shared,
    reason: &'static str,
) -> Option<T> {
    let work = async {
        tokio::select! {
            done = work => done,
            _ = state.displaced.cancelled() => None,
            _ = shared.stop.cancelled() => None,
        }
    };
    let deadline = state.opened + shared.limits.header_timeout;
    match tokio::time::timeout_at(deadline, work).await {
        Ok(done) => done,
        Err(_) => {
            metrics::counter!("tether_http_connections_timed_out_total", "reason" => reason)
                .increment(1);
            None
        }
    }
}

async fn serve_plain(stream: TcpStream, shared: &Shared, state: Arc<ConnState>) {
    let first_bytes = async { Some(sniff(&stream).await) };
    if let Some(protocol) = before_the_first_request(first_bytes, &state, shared, "header").await {
        drive(
            Tracked::new(stream, state.clone(), protocol),
            protocol,
            shared,
            state,
        )
        .await
    }
}

/// Which HTTP a plain connection speaks, from its first bytes, read without taking them: HTTP/1 when
/// they cannot begin the HTTP/2 preface (`PRI * HTTP/2.0…`), else left to hyper to tell. hyper's own
/// sniffing reads the first bytes and hands them back as a short first read, after which its
/// HTTP/1 read buffer grows to 16 KiB on every connection; unread, the head arrives whole in 8.
async fn sniff(stream: &TcpStream) -> Protocol {
    let mut first = [0u8; 2];
    match stream.peek(&mut first).await {
        Ok(1) if first[0] != b'P' => Protocol::Http1,
        Ok(2) if first != *b"PR" => Protocol::Http1,
        _ => Protocol::Sniff,
    }
}

async fn serve_tls(
    acceptor: &tokio_rustls::TlsAcceptor,
    stream: TcpStream,
    shared: &Shared,
    state: Arc<ConnState>,
) {
    let handshake = async {
        if speaks_plain_http(&stream).await {
            refuse_plain_http(stream).await;
            return None;
        }
        match acceptor.accept(stream).await {
            Ok(tls) => Some(tls),
            Err(e) => {
                tracing::debug!(error = %e, "TLS handshake failed");
                None
            }
        }
    };
    let tls = before_the_first_request(handshake, &state, shared, "handshake")
        .await
        .map(|tls| {
            let protocol = match tls.get_ref().1.alpn_protocol() {
                Some(p) if p == ALPN_H2 => Protocol::Http2,
                _ => Protocol::Http1,
            };
            (tls, protocol)
        });
    if let Some((tls, protocol)) = tls {
        if matches!(protocol, Protocol::Http2) {
            state.track_heads.store(false, Ordering::Relaxed);
        }
        drive(
            Tracked::new(tls, state.clone(), protocol),
            protocol,
            shared,
            state,
        )
        .await;
    }
}

/// Whether the first bytes on a TLS port are a plain-HTTP request line rather than a TLS handshake
/// (which starts with the record type 0x16). Waits for at least one byte.
async fn speaks_plain_http(stream: &TcpStream) -> bool {
    let mut first = [0u8; 1];
    match stream.peek(&mut first).await {
        Ok(1) => first[0].is_ascii_uppercase(),
        _ => false,
    }
}

/// Answers a plain-HTTP request on the TLS port with a 400 in the error envelope, then closes.
async fn refuse_plain_http(mut stream: TcpStream) {
    use tokio::io::AsyncReadExt as _;
    // Read the request first: closing a socket with unread bytes resets it, and the client would then
    // lose the answer.
    let mut request = [0u8; 4096];
    let read = tokio::time::timeout(Duration::from_secs(1), stream.read(&mut request)).await;
    let head = match read {
        Ok(Ok(n)) => &request[..n],
        _ => &[],
    };
    let request_id = crate::http::request_id(header_of(head, "x-request-id"));
    let response = crate::parse_error::raw_refusal(
        axum::http::StatusCode::BAD_REQUEST,
        "this port speaks HTTPS: use an https:// URL",
        &request_id,
        None,
    );
    let _ = stream.write_all(&response).await;
    let _ = stream.shutdown().await;
    let drained = async { while matches!(stream.read(&mut request).await, Ok(n) if n > 0) {} };
    let _ = tokio::time::timeout(Duration::from_secs(1), drained).await;
}

/// The value of the header `name` in the head of an HTTP/1 request as it came (lines after the
/// request line, up to the blank line), its surrounding blanks trimmed.
fn header_of<'a>(head: &'a [u8], name: &str) -> Option<&'a [u8]> {
    head.split(|&b| b == b'\n')
        .skip(1)
        .map(|line| line.strip_suffix(b"\r").unwrap_or(line))
        .take_while(|line| !line.is_empty())
        .find_map(|line| {
            let colon = line.iter().position(|&b| b == b':')?;
            let (key, value) = (&line[..colon], &line[colon + 1..]);
            key.eq_ignore_ascii_case(name.as_bytes())
                .then(|| value.trim_ascii())
        })
}

/// Serves HTTP on one connection until it ends, a timeout closes it, or the server stops.
async fn drive<IO>(io: Tracked<IO>, protocol: Protocol, shared: &Shared, state: Arc<ConnState>)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let api = shared.api.clone();
    let service_state = state.clone();
    let service = hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
        let in_flight = InFlight::begin(service_state.clone());
        request.extensions_mut().insert(in_flight.yieldable());
        let http2 = request.version() == hyper::Version::HTTP_2;
        // Handed over at once, not from an `async` block awaiting a `oneshot`: the answer's future
        // is then the router's own, mapped, with no room for the request beside it for as long as
        // it is in flight. `Api` is always ready (see its `poll_ready`), so it is not asked.
        let answer = tower::Service::call(&mut api.clone(), request.map(axum::body::Body::new));
        answer.map(move |answer| {
            let response = answer.unwrap_or_else(|never: Infallible| match never {});
            Ok::<_, Infallible>(
                response.map(|inner| responses::TrackedBody::new(inner, in_flight, http2)),
            )
        })
    });
    let io = TokioIo::new(io);
    // Each connection pinned here and watched through a reference: a connection moved into
    // `watch` would be kept there twice, as its argument and as the local it is pinned in.
    match protocol {
        Protocol::Http1 => {
            let conn = std::pin::pin!(shared.http1.serve_connection(io, service));
            watch(conn, shared, state).await
        }
        // Boxed: inline, HTTP/2's state would make every connection's task, HTTP/1 ones included,
        // as large as an HTTP/2 one.
        Protocol::Sniff | Protocol::Http2 => {
            let builder = match protocol {
                Protocol::Http2 => &shared.http2,
                _ => &shared.auto,
            };
            let mut conn = Box::pin(builder.serve_connection(io, service));
            watch(conn.as_mut(), shared, state).await
        }
    }
}

/// A connection hyper serves, told to close gracefully by [`watch`].
trait ServedConnection: std::future::Future<Output = Result<(), Self::Error>> {
    type Error: std::fmt::Display;
    /// Finishes the requests in flight, takes no more, then ends (HTTP/2: GOAWAY).
    fn close_gracefully(self: Pin<&mut Self>);
}

impl<I, S, B> ServedConnection for hyper::server::conn::http1::Connection<I, S>
where
    S: hyper::service::HttpService<Incoming, ResBody = B>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin,
    B: hyper::body::Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Error = hyper::Error;
    fn close_gracefully(self: Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

impl<I, S, B> ServedConnection for auto::Connection<'_, I, S, TokioExecutor>
where
    S: hyper::service::Service<hyper::Request<Incoming>, Response = hyper::Response<B>>,
    S::Future: 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    TokioExecutor: hyper::rt::bounds::Http2ServerConnExec<S::Future, B>,
{
    type Error = Box<dyn std::error::Error + Send + Sync>;
    fn close_gracefully(self: Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

/// Watches a connection hyper serves until it ends, a timeout closes it, or the server stops.
async fn watch<C: ServedConnection>(mut conn: Pin<&mut C>, shared: &Shared, state: Arc<ConnState>) {
    let stop = shared.stop.cancelled();
    tokio::pin!(stop);
    let limits = &shared.limits;
    // When a connection told to close gracefully is closed anyway.
    let mut closing: Option<Instant> = None;
    loop {
        let now = Instant::now();
        let wake = match closing {
            Some(deadline) => deadline,
            None => state.next_check(limits, now),
        };
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
                return;
            }
            _ = tokio::time::sleep_until(wake) => {
                let now = Instant::now();
                if closing.is_some() {
                    return;
                }
                match state.verdict(limits, now) {
                    Verdict::Fine => {}
                    Verdict::Close(reason) => {
                        metrics::counter!("tether_http_connections_timed_out_total", "reason" => reason).increment(1);
                        tracing::debug!(reason, "closing a connection");
                        // Dropping the connection closes the socket.
                        return;
                    }
                    Verdict::CloseGracefully => {
                        metrics::counter!("tether_http_connections_timed_out_total", "reason" => "idle").increment(1);
                        conn.as_mut().close_gracefully();
                        closing = Some(now + CLOSING_GRACE);
                    }
                }
            }
            _ = &mut stop, if closing.is_none() => {
                conn.as_mut().close_gracefully();
                closing = Some(Instant::now() + CLOSING_GRACE);
            }
            _ = state.displaced.cancelled(), if closing.is_none() => {
                if state.head_started.load(Ordering::Acquire) != UNSET
                    || state.only_yielding_or_stalled()
                {
                    // Nothing of a request yet, or part of its headers: nothing to finish. Or only
                    // requests that yield: an event stream resumes from its Last-Event-ID, and a
                    // body that trickles in is what is being refused. Or answers the client does
                    // not take.
                    return;
                }
                // Idle between requests (or a request that came since it was chosen): close as
                // the idle timeout does, sooner.
                conn.as_mut().close_gracefully();
                closing = Some(Instant::now() + slots::DISPLACED_GRACE);
            }
        }
    }
}

/// "Not set" in the millisecond fields of [`ConnState`].
const UNSET: u64 = u64::MAX;

/// How readily a connection gives its place at the cap: the lesser first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Yield {
    /// No request in flight.
    Idle,
    /// Only requests that yield ([`Yieldable`]).
    Requests,
}

/// The connection a request came on, in the request's extensions, for a request to say that for a
/// while it may be cut when the server is at its connection cap and a new client needs the place
/// ([`Yieldable::mark`]). Without this, a client holding every place with requests that never end
/// (event streams, bodies sent a byte at a time) would keep everyone else out.
#[derive(Clone)]
pub struct Yieldable {
    conn: Arc<ConnState>,
    request: Arc<RequestYields>,
}

impl Yieldable {
    /// The request yields until the guard is dropped: an event stream for as long as it lasts (its
    /// client resumes from its `Last-Event-ID`), a body until it has arrived. A request marked
    /// twice (a stream whose body is also read) counts once.
    pub fn mark(&self) -> YieldGuard {
        if self.request.0.fetch_add(1, Ordering::AcqRel) == 0 {
            let state = &self.conn;
            state.yielding.fetch_add(1, Ordering::AcqRel);
            if state.only_yielding() {
                let _ = state.yielding_since.compare_exchange(
                    UNSET,
                    state.now_ms(),
                    Ordering::AcqRel,
                    Ordering::Acquire,
                );
            }
        }
        YieldGuard(self.clone())
    }
}

/// See [`Yieldable::mark`].
pub struct YieldGuard(Yieldable);

impl Drop for YieldGuard {
    fn drop(&mut self) {
        if self.0.request.0.fetch_sub(1, Ordering::AcqRel) != 1 {
            return;
        }
        let state = &self.0.conn;
        if state.yielding.fetch_sub(1, Ordering::AcqRel) == 1 {
            state.yielding_since.store(UNSET, Ordering::Release);
        }
    }
}

/// How many marks ([`Yieldable::mark`]) one request in flight holds: it yields while any does.
#[derive(Default)]
struct RequestYields(AtomicU32);

impl RequestYields {
    fn yields(&self) -> bool {
        self.0.load(Ordering::Acquire) > 0
    }
}

/// What the watchdog of a connection knows about it, as milliseconds since it was accepted.
struct ConnState {
    opened: Instant,
    /// HTTP/1: a byte after an idle spell starts the next request's header clock. Not on HTTP/2,
    /// where an idle client may send PING or WINDOW_UPDATE frames without starting a request.
    track_heads: std::sync::atomic::AtomicBool,
    in_flight: AtomicU32,
    /// Of the requests in flight, those that may be cut at the cap ([`Yieldable`]). Their answers,
    /// and those that wait for the client to take them ([`responses::Responses::stalled`]), are
    /// what a connection at the cap may lose.
    yielding: AtomicU32,
    /// When the connection's requests in flight last became all yielding; `UNSET` when not.
    yielding_since: AtomicU64,
    /// When the current request's first byte arrived while nothing was in flight (from accept, for the
    /// first request); `UNSET` while a request is in flight or the connection idles after one.
    head_started: AtomicU64,
    /// When the last request in flight finished; `UNSET` before the first.
    idle_since: AtomicU64,
    /// Since when a write has been waiting for the client to read; `UNSET` when none waits.
    write_blocked: AtomicU64,
    /// Cancelled when a new connection at the cap takes this one's place ([`slots`]).
    displaced: CancellationToken,
    /// The response bodies in flight, and how long each has waited for the client to take more.
    responses: responses::Responses,
    /// HTTP/2: what the connection's answers have handed to hyper and hyper still holds.
    outbox: Arc<outbox::Outbox>,
}

enum Verdict {
    Fine,
    Close(&'static str),
    CloseGracefully,
}

impl ConnState {
    fn new() -> ConnState {
        let opened = Instant::now();
        ConnState {
            opened,
            displaced: CancellationToken::new(),
            responses: responses::Responses::new(opened),
            outbox: Arc::default(),
            track_heads: std::sync::atomic::AtomicBool::new(true),
            in_flight: AtomicU32::new(0),
            yielding: AtomicU32::new(0),
            yielding_since: AtomicU64::new(UNSET),
            head_started: AtomicU64::new(0),
            idle_since: AtomicU64::new(UNSET),
            write_blocked: AtomicU64::new(UNSET),
        }
    }

    fn now_ms(&self) -> u64 {
        self.opened.elapsed().as_millis() as u64
    }

    fn at(&self, ms: u64) -> Instant {
        self.opened + Duration::from_millis(ms)
    }

    /// The deadline the connection's current state is held to, and what happens when it passes.
    fn deadline(&self, limits: &ConnectionLimits) -> Option<(Instant, Verdict)> {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            let blocked = self.write_blocked.load(Ordering::Acquire);
            let blocked = (blocked != UNSET).then_some(blocked);
            let stalled = blocked
                .into_iter()
                .chain(self.responses.longest_wait())
                .min();
            return stalled.map(|since| {
                (
                    self.at(since) + limits.idle_timeout,
                    Verdict::Close("write_stalled"),
                )
            });
        }
        let head = self.head_started.load(Ordering::Acquire);
        if head != UNSET {
            return Some((
                self.at(head) + limits.header_timeout,
                Verdict::Close("header"),
            ));
        }
        let idle = self.idle_since.load(Ordering::Acquire);
        (idle != UNSET).then(|| {
            (
                self.at(idle) + limits.idle_timeout,
                Verdict::CloseGracefully,
            )
        })
    }

    /// Whether this connection may give its place to a new one at the cap, and how readily: first
    /// those with no request in flight, by how long they have waited (for their first request, for
    /// the rest of a request's headers, or for the next request); then those whose every request in
    /// flight yields ([`Yieldable`]: an event stream, a body still arriving) or has an answer that
    /// has waited [`responses::STALLED_AFTER`] or more for the client to take it (an HTTP/2 stream
    /// whose window the client keeps shut: its request is done, and a client that does not read it
    /// loses nothing it would have had), by how long they have done only that. `None` for one doing
    /// other work, or displaced already.
    fn displaceable(&self, now: Instant) -> Option<(Yield, Instant)> {
        if self.displaced.is_cancelled() {
            return None;
        }
        let in_flight = self.in_flight.load(Ordering::Acquire);
        if in_flight > 0 {
            let yielding = self.yielding.load(Ordering::Acquire);
            let (stalled, stalled_since) = self.responses.stalled(self.now_ms());
            if (yielding as usize).saturating_add(stalled) < in_flight as usize {
                return None;
            }
            let yielding_since = self.yielding_since.load(Ordering::Acquire);
            // Since the last of them began to yield or wait; a request that yields beside others
            // that did not (its mark found them working) counts from now.
            let since = match (yielding, yielding_since) {
                (0, _) => stalled_since,
                (_, UNSET) => Some(self.now_ms()),
                (_, since) => Some(stalled_since.map_or(since, |stalled| stalled.max(since))),
            };
            return since.map(|since| (Yield::Requests, self.at(since)));
        }
        let head = self.head_started.load(Ordering::Acquire);
        let idle = self.idle_since.load(Ordering::Acquire);
        // A request may begin and end between the loads; then the connection is not waiting for long.
        let since = if head != UNSET { head } else { idle };
        Some((
            Yield::Idle,
            if since == UNSET { now } else { self.at(since) },
        ))
    }

    /// Whether every request in flight yields (and at least one is in flight).
    fn only_yielding(&self) -> bool {
        let in_flight = self.in_flight.load(Ordering::Acquire);
        in_flight > 0 && self.yielding.load(Ordering::Acquire) >= in_flight
    }

    /// Whether every request in flight yields or has an answer that waits for the client (and at
    /// least one is in flight): a connection displaced so has nothing to finish.
    fn only_yielding_or_stalled(&self) -> bool {
        let in_flight = self.in_flight.load(Ordering::Acquire) as usize;
        let yielding = self.yielding.load(Ordering::Acquire) as usize;
        in_flight > 0
            && yielding.saturating_add(self.responses.stalled(self.now_ms()).0) >= in_flight
    }

    fn verdict(&self, limits: &ConnectionLimits, now: Instant) -> Verdict {
        match self.deadline(limits) {
            Some((deadline, verdict)) if deadline <= now => verdict,
            _ => Verdict::Fine,
        }
    }

    /// When to look again: at the deadline, but no later than the shortest timeout from now, because
    /// a deadline that starts meanwhile (a request's first byte) may be due before the current one.
    fn next_check(&self, limits: &ConnectionLimits, now: Instant) -> Instant {
        let horizon = now + limits.header_timeout.min(limits.idle_timeout);
        match self.deadline(limits) {
            Some((deadline, _)) => deadline.min(horizon).max(now),
            None => horizon,
        }
    }

    fn bytes_read(&self) {
        if !self.track_heads.load(Ordering::Relaxed) {
            return;
        }
        if self.in_flight.load(Ordering::Acquire) == 0
            && self.head_started.load(Ordering::Acquire) == UNSET
        {
            self.head_started.store(self.now_ms(), Ordering::Release);
        }
    }

    fn write_pending(&self, pending: bool) {
        let current = self.write_blocked.load(Ordering::Relaxed);
        if pending && current == UNSET {
            self.write_blocked.store(self.now_ms(), Ordering::Release);
        } else if !pending && current != UNSET {
            self.write_blocked.store(UNSET, Ordering::Release);
        }
    }
}

/// One request in flight on a connection, from the call of the service to the end of its response
/// body (an event stream stays in flight while it lasts).
struct InFlight {
    conn: Arc<ConnState>,
    request: Arc<RequestYields>,
}

impl InFlight {
    fn begin(state: Arc<ConnState>) -> InFlight {
        state.in_flight.fetch_add(1, Ordering::AcqRel);
        state.head_started.store(UNSET, Ordering::Release);
        InFlight {
            conn: state,
            request: Arc::default(),
        }
    }

    /// What the request's handlers mark it by.
    fn yieldable(&self) -> Yieldable {
        Yieldable {
            conn: self.conn.clone(),
            request: self.request.clone(),
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let state = &self.conn;
        if state.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            state.idle_since.store(state.now_ms(), Ordering::Release);
            state.head_started.store(UNSET, Ordering::Release);
        }
    }
}

/// A connection's byte stream, reporting reads and stalled writes to its [`ConnState`]. On HTTP/1 it
/// also swaps hyper's bare answer to an unparsable request for the enveloped one ([`crate::parse_error`]).
struct Tracked<IO> {
    io: IO,
    state: Arc<ConnState>,
    /// Whether this connection speaks HTTP/1 (where hyper's parse-error answers are rewritten); `None`
    /// until the first byte written tells (a plain-TCP connection may turn out to be HTTP/2).
    http1: Option<bool>,
    /// The enveloped answer and how much of it is written. Hyper was told its own answer was written
    /// as soon as this was buffered; every later write, flush or shutdown writes this out first.
    replacement: Option<(Vec<u8>, usize)>,
}

impl<IO> Tracked<IO> {
    fn new(io: IO, state: Arc<ConnState>, protocol: Protocol) -> Tracked<IO> {
        let http1 = match protocol {
            Protocol::Sniff => None,
            Protocol::Http1 => Some(true),
            Protocol::Http2 => Some(false),
        };
        Tracked {
            io,
            state,
            http1,
            replacement: None,
        }
    }
}

impl<IO: AsyncWrite + Unpin> Tracked<IO> {
    /// Writes out what is left of the replacement, if any.
    fn poll_replacement(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while let Some((bytes, written)) = &mut self.replacement {
            if *written == bytes.len() {
                self.replacement = None;
                break;
            }
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &bytes[*written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            *written += n;
        }
        Poll::Ready(Ok(()))
    }

    /// Writes `bufs`, unless they end with hyper's answer to an unparsable request: then the bytes
    /// before it are written first, and the answer itself is taken as written and replaced.
    fn poll_write_bufs(
        &mut self,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        ready!(self.poll_replacement(cx))?;
        if self.http1.is_none() {
            // An HTTP/1 response starts with "HTTP/"; an HTTP/2 server starts with a SETTINGS frame.
            self.http1 = bufs.iter().find(|b| !b.is_empty()).map(|b| b[0] == b'H');
            if self.http1 == Some(false) {
                // HTTP/2 on the plain port: from here on as over TLS (see `ConnState::track_heads`).
                self.state.track_heads.store(false, Ordering::Relaxed);
            }
        }
        // Hyper answers a parse error only when no request is in flight: no need to look otherwise.
        // (Our own responses may also be written then; `find` tells them apart by their headers.)
        if self.http1 == Some(true) && self.state.in_flight.load(Ordering::Acquire) == 0 {
            let total: usize = bufs.iter().map(|b| b.len()).sum();
            let tail = last_bytes(bufs, crate::parse_error::MAX_HEAD);
            if let Some(head) = crate::parse_error::find(&tail) {
                let at = total - tail.len() + head.at;
                if at == 0 {
                    self.replacement = Some((crate::parse_error::enveloped(&head), 0));
                    // Start writing it now; a partial write is finished by the next call or the flush.
                    if let Poll::Ready(Err(e)) = self.poll_replacement(cx) {
                        return Poll::Ready(Err(e));
                    }
                    return Poll::Ready(Ok(total));
                }
                // The end of the previous response comes first; the head is found again next call.
                // (A shorter write than offered is allowed: hyper offers the rest again.)
                let first = bufs
                    .iter()
                    .find(|b| !b.is_empty())
                    .expect("the head is in bufs");
                let before = &first[..at.min(first.len())];
                return Pin::new(&mut self.io).poll_write(cx, before);
            }
        }
        if bufs.len() == 1 {
            Pin::new(&mut self.io).poll_write(cx, &bufs[0])
        } else {
            Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
        }
    }
}

/// The last `n` bytes (or fewer) of `bufs`, joined.
fn last_bytes(bufs: &[io::IoSlice<'_>], n: usize) -> Vec<u8> {
    let mut tail = Vec::with_capacity(n);
    for buf in bufs.iter().rev() {
        let take = buf.len().min(n - tail.len());
        tail.splice(0..0, buf[buf.len() - take..].iter().copied());
        if tail.len() == n {
            break;
        }
    }
    tail
}

impl<IO: AsyncRead + Unpin> AsyncRead for Tracked<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.io).poll_read(cx, buf);
        if matches!(result, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.state.bytes_read();
        }
        result
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Tracked<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let result = self.poll_write_bufs(cx, &[io::IoSlice::new(buf)]);
        self.state.write_pending(result.is_pending());
        result
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let result = self.poll_write_bufs(cx, bufs);
        self.state.write_pending(result.is_pending());
        result
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let result = match self.poll_replacement(cx) {
            Poll::Ready(Ok(())) => Pin::new(&mut self.io).poll_flush(cx),
            other => other,
        };
        self.state.write_pending(result.is_pending());
        result
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_replacement(cx))?;
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

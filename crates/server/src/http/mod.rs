//! The HTTP surface: one API router mounted under both dialect prefixes, and the middleware that gives
//! every response a request id and every error the envelope.

pub mod access;
mod around;
pub mod budget;
mod commands;
pub mod dashboard;
pub mod decode;
pub mod events;
pub mod extract;
pub mod openapi;
pub mod ops;
pub mod resources;
pub mod routes;
pub mod wire;
pub mod work;

use std::time::Instant;

use axum::extract::{DefaultBodyLimit, MatchedPath, Request};
use axum::http::HeaderValue;
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use futures::future::Either;
use futures::FutureExt as _;
use tower_http::catch_panic::CatchPanicLayer;
use tracing::Instrument as _;

use crate::dialect::Dialect;
use crate::error::ApiError;
use crate::service::tokens::Principal;
use crate::service::App;

/// Routes from the route table under `prefix`, each behind its guard ([`guard_route`]) built from
/// what its entry declares.
fn guarded(
    router: Router<App>,
    app: &App,
    prefix: &str,
    endpoints: Vec<routes::Endpoint>,
    bodies: &budget::BodyPolicy,
) -> Router<App> {
    endpoints.into_iter().fold(router, |router, e| {
        let guard = std::sync::Arc::new(RouteGuard {
            access: access::Guard {
                app: app.clone(),
                access: e.access,
            },
            bodies: bodies.clone(),
            takes_body: !matches!(e.body, routes::Body::None),
            reads: !e.changes_state,
            answers: app.page_memory.clone(),
        });
        let route = e.route.route_layer(around::AroundLayer(guard));
        router.route(&format!("{prefix}{}", e.path), route)
    })
}

/// What one route's guard judges its requests by (shared: each request in flight holds it).
struct RouteGuard {
    access: access::Guard,
    bodies: budget::BodyPolicy,
    /// The entry takes a body (`Body::Optional` or `Body::Required`), else it has none.
    takes_body: bool,
    /// A GET of the entry only reads; one that changes state (a poll's delivery) is answered as a
    /// write is: its answer is not paid for, as it could be refused only after the change.
    reads: bool,
    /// The answers' budget, which reads pay from ([`budget::pay_for_answer`]).
    answers: crate::memory::MemoryBudget,
}

/// Each route's guard ([`guard_route`]).
impl around::Middleware for std::sync::Arc<RouteGuard> {
    fn around<S: around::Rest>(
        &self,
        request: Request,
        next: around::Next<S>,
    ) -> impl std::future::Future<Output = Response> + Send + 'static {
        guard_route(self.clone(), request, next)
    }
}

/// Each route's guard, in the order its steps must go: the caller is admitted by the route's
/// declared access ([`access::admit`]: 401 and 403 come before anything costs memory); then the
/// body is read whole and paid for from the memory budget where the entry takes one, or read and
/// dropped where it takes none ([`budget`]); the handler runs; a write's answer keeps its body's
/// share until it is sent, and a read's answer is paid for by its caller.
///
/// One middleware rather than one per step: each layer of a route costs every request in flight a
/// few boxed futures and a clone of the rest of the route, and a long poll keeps them for its
/// whole wait (2,000 idle workers, 2,000 of each).
fn guard_route<S: around::Rest>(
    guard: std::sync::Arc<RouteGuard>,
    request: Request,
    next: around::Next<S>,
) -> impl std::future::Future<Output = Response> + Send + 'static {
    // The steps before the handler in a boxed future of their own, dropped once done: each is
    // large (the credential's and the session's reads, the body's), and inline they, and the
    // request they take, would be part of this future's size all through the handler's run, a
    // long poll's whole wait included.
    let before = Box::pin(before_the_handler(guard.clone(), request));
    async move {
        let (request, payer, share) = match before.await {
            Ok(admitted) => admitted,
            Err(refusal) => return refusal,
        };
        let response = next.run(request).await;
        let response = match share {
            Some(share) => budget::holding(response, share),
            None => response,
        };
        match payer {
            // Boxed too: inline, its room would be kept through the handler's run.
            Some(caller) => {
                Box::pin(budget::pay_for_answer(&guard.answers, &caller, response)).await
            }
            None => response,
        }
    }
}

/// The guard's steps before the handler: the request admitted, its body read (and its share of
/// the memory budget) or skipped, and who pays for its answer if it is a read. Or the refusal.
async fn before_the_handler(
    guard: std::sync::Arc<RouteGuard>,
    request: Request,
) -> Result<(Request, Option<Principal>, Option<crate::memory::Share>), Response> {
    let request = access::admit(&guard.access, request).await?;
    let payer = guard
        .reads
        .then(|| budget::answer_payer(&request))
        .flatten();
    if guard.takes_body {
        let (request, share) = budget::read_body(&guard.bodies, request).await?;
        Ok((request, payer, Some(share)))
    } else {
        let request = budget::skip_body(&guard.bodies, request).await?;
        Ok((request, payer, None))
    }
}

/// The whole application.
pub fn router(app: App, body_limit: usize) -> Api {
    let bodies = budget::BodyPolicy {
        limit: body_limit,
        budget: app.memory.clone(),
    };
    let mut router = guarded(Router::new(), &app, "", routes::ops(), &bodies);
    for dialect in Dialect::ALL {
        // Each dialect's routes under its prefix, in one flat table: a nested router per prefix cost
        // every request a second routing, a rewritten URI and two request extensions (the handlers
        // take the dialect from the path, `extract::dialect_of`).
        router = guarded(router, &app, dialect.prefix(), routes::api(), &bodies);
    }
    let router = router
        // Both refusals drain what they can of the body, as an authorization refusal does, so that the
        // client keeps its connection. Each route's `Allow` header is kept on its 405.
        .method_not_allowed_fallback(|request: axum::extract::Request| async {
            budget::drain_refused(request).await;
            ApiError::for_status(axum::http::StatusCode::METHOD_NOT_ALLOWED)
        })
        .fallback(|request: axum::extract::Request| async {
            budget::drain_refused(request).await;
            ApiError::not_found("no such endpoint")
        })
        // One layer of three (the first is the outermost): each `Router::layer` wraps every route in one
        // more boxed service, which each request in flight pays for (see `guard_route`).
        .layer(
            tower::ServiceBuilder::new()
                .layer(around::AroundLayer(Envelope))
                .layer(CatchPanicLayer::custom(|_| {
                    ApiError::internal("internal error").into_response()
                }))
                .layer(DefaultBodyLimit::max(body_limit)),
        )
        .with_state(app);
    Api::from(router)
}

/// A router as the listener serves it: behind the path's rewrite ([`readable_path`]), before
/// routing, so that the rewritten path is what the routes see.
///
/// Each request is one call of the router, whose future is the router's own (a router around the
/// router, whose fallback was this one, cost every request a second routing and a boxed future,
/// which a long poll holds through its whole wait). What `MapRequestLayer` over the router would
/// be, as a type of its own: the listener names it, and tests serve their routers through it.
#[derive(Clone)]
pub struct Api(Router);

impl From<Router> for Api {
    fn from(router: Router) -> Api {
        Api(router)
    }
}

impl tower::Service<Request> for Api {
    type Response = Response;
    type Error = std::convert::Infallible;
    type Future = axum::routing::future::RouteFuture<std::convert::Infallible>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        // Always ready, as axum's router is: the listener relies on it and calls without asking
        // (`listener::drive`). A layer here that could say "not yet" would have to change that.
        tower::Service::<Request>::poll_ready(&mut self.0, cx)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        self.0.call(readable_path(request))
    }
}

/// A path segment whose %-escapes decode to no UTF-8 text is read as one U+FFFD, escaped. Ids are
/// ASCII, so such a segment names nothing either way: the request is routed as any other and its id
/// is not found — 404 after the credential's 401 and 403 (D-2, D-32). Left as they came, the router
/// refuses the undecodable parameter with a 400 before any of those checks.
fn readable_path(mut request: Request) -> Request {
    const UNREADABLE: &str = "%EF%BF%BD";
    let undecodable = |segment: &str| {
        percent_encoding::percent_decode_str(segment)
            .decode_utf8()
            .is_err()
    };
    let path = request.uri().path();
    if !path.contains('%') || !path.split('/').any(undecodable) {
        return request;
    }
    let mut readable: String = path
        .split('/')
        .map(|segment| {
            if undecodable(segment) {
                UNREADABLE
            } else {
                segment
            }
        })
        .collect::<Vec<_>>()
        .join("/");
    if let Some(query) = request.uri().query() {
        readable.push('?');
        readable.push_str(query);
    }
    // A path of many short undecodable segments (`/%ff/%ff/…`) grows with each, and may outgrow what
    // a URI may hold (64 KiB): it then stands for a path that names nothing at all, answered 404 as
    // it would be.
    let path_and_query = readable
        .parse()
        .unwrap_or_else(|_| axum::http::uri::PathAndQuery::from_static("/%EF%BF%BD"));
    let mut parts = request.uri().clone().into_parts();
    parts.path_and_query = Some(path_and_query);
    if let Ok(uri) = axum::http::Uri::from_parts(parts) {
        *request.uri_mut() = uri;
    }
    request
}

/// A request id as the log shows it: the characters ids are made of as they are, any other
/// %-escaped (`%20` for a space). A client's own id (D-18) is echoed as it came, up to 200 visible
/// characters; but the log's text format writes it unquoted, and spaces, braces, quotes or `=`
/// could pass for more of the line than the id (a forged `status=200` on a refused request).
fn loggable_request_id(id: &str) -> std::borrow::Cow<'_, str> {
    let plain = |b: u8| b.is_ascii_alphanumeric() || b"-_.:/+@".contains(&b);
    if id.bytes().all(plain) {
        return id.into();
    }
    id.bytes()
        .map(|b| {
            if plain(b) {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect::<String>()
        .into()
}

/// A request's id (D-18): the client's own `x-request-id` when it has one of 1 to 200 visible ASCII
/// characters, else a new UUID.
pub fn request_id(client: Option<&[u8]>) -> String {
    let visible = |b: &u8| *b == b'\t' || (0x20..0x7f).contains(b);
    match client {
        Some(id) if !id.is_empty() && id.len() <= 200 && id.iter().all(visible) => {
            String::from_utf8_lossy(id).into_owned()
        }
        _ => uuid::Uuid::new_v4().to_string(),
    }
}

/// An HTTP/1.1 request must name its host once (RFC 9112 §3.2: a server answers 400 to one with none
/// or several): a proxy in front and this server could otherwise take it for different requests.
/// One whose target is a whole URL (`GET https://host/path`) names it there, and is let through
/// without a Host header, as clients built on bare HTTP connections send it. HTTP/1.0 has no such
/// rule, and HTTP/2 names the host in the `:authority` pseudo-header instead.
fn host_refusal(request: &Request) -> Option<ApiError> {
    if request.version() != axum::http::Version::HTTP_11 {
        return None;
    }
    let hosts = request
        .headers()
        .get_all(axum::http::header::HOST)
        .iter()
        .count();
    if hosts == 1 || (hosts == 0 && request.uri().authority().is_some()) {
        return None;
    }
    Some(ApiError::bad_request(if hosts == 0 {
        "an HTTP/1.1 request needs a Host header"
    } else {
        "an HTTP/1.1 request may have only one Host header"
    }))
}

/// Marks a response whose access line is written at `debug`, not `info`: a poll or claim that took
/// nothing. Each idle worker asks once a second (`block_ms` is at most 999), and their lines would
/// bury every other in the log; the metrics count them all the same.
#[derive(Clone, Copy, Debug)]
pub struct RoutineAccess;

impl RoutineAccess {
    /// For the answer of a take: routine when it took nothing.
    pub fn unless_taken<T>(taken: &Option<T>) -> Option<axum::Extension<RoutineAccess>> {
        taken.is_none().then_some(axum::Extension(RoutineAccess))
    }
}

/// The middleware around every route ([`envelope`]).
#[derive(Clone)]
struct Envelope;

impl around::Middleware for Envelope {
    fn around<S: around::Rest>(
        &self,
        request: Request,
        next: around::Next<S>,
    ) -> impl std::future::Future<Output = Response> + Send + 'static {
        envelope(request, next)
    }
}

/// Request ids (D-18), the error envelope (§1.7), request metrics and the access log. Everything the
/// request causes is logged inside its span, so every line carries the request id.
fn envelope<S: around::Rest>(
    request: Request,
    next: around::Next<S>,
) -> impl std::future::Future<Output = Response> + Send + 'static {
    // What the answer needs of the request is taken now, and the request handed on at once: the
    // future waiting for the answer then holds nothing of it, where an `async` block would keep
    // room for the request (240 bytes) for as long as it lives: a long poll's whole wait, on each
    // of thousands of idle workers' connections.
    let asked = Asked::of(&request);
    let answer = match host_refusal(&request) {
        None => Either::Left(next.run(request)),
        // Boxed: inline, it would make every answer's future as large.
        Some(refusal) => Either::Right(Box::pin(async move {
            budget::drain_refused(request).await;
            refusal.into_response()
        })),
    };
    answer
        .instrument(asked.span.clone())
        .map(move |response| asked.answer(response))
}

/// What a request's answer is marked, counted and logged by.
struct Asked {
    request_id: String,
    route: String,
    method: String,
    started: Instant,
    /// The request's span: everything the request causes is logged inside it.
    span: tracing::Span,
}

impl Asked {
    fn of(request: &Request) -> Asked {
        let request_id = request_id(
            request
                .headers()
                .get("x-request-id")
                .map(HeaderValue::as_bytes),
        );
        let route = request
            .extensions()
            .get::<MatchedPath>()
            .map(|p| crate::telemetry::route_label(p.as_str()))
            .unwrap_or_else(|| "unmatched".into());
        let method = request.method().as_str().to_owned();
        let span = tracing::info_span!(
            "request",
            request_id = %loggable_request_id(&request_id),
            method = %method,
            route = %route,
            credential = tracing::field::Empty,
            credential_id = tracing::field::Empty,
        );
        Asked {
            request_id,
            route,
            method,
            started: Instant::now(),
            span,
        }
    }

    /// `response` with its request id, in the envelope if it is an error, counted and logged.
    fn answer(self, mut response: Response) -> Response {
        let mut may_have_been_applied = false;
        if let Some(error) = response.extensions_mut().remove::<ApiError>() {
            may_have_been_applied = error.code == Some(crate::error::STORE_OUTCOME_UNKNOWN);
            response = enveloped(response, &error, &self.request_id);
        } else if (response.status().is_client_error() || response.status().is_server_error())
            && !is_json(&response)
        {
            let error = ApiError::for_status(response.status());
            response = enveloped(response, &error, &self.request_id);
        }
        if let Ok(value) = HeaderValue::from_str(&self.request_id) {
            // The Anthropic SDK reads `request-id`; D-18 names `x-request-id`. Both carry the same value.
            response.headers_mut().insert("request-id", value.clone());
            response.headers_mut().insert("x-request-id", value);
        }
        // Answers carry secrets (a new token, a poll's `secret`) and a tenant's data: no cache on the way,
        // a proxy's or the browser's, may keep one. The dashboard's files and the event stream say their
        // own. And no browser may take a JSON answer, whose messages echo what the caller sent, for a page.
        let headers = response.headers_mut();
        headers
            .entry(axum::http::header::CACHE_CONTROL)
            .or_insert(HeaderValue::from_static("no-store"));
        headers
            .entry(axum::http::header::X_CONTENT_TYPE_OPTIONS)
            .or_insert(HeaderValue::from_static("nosniff"));
        let status = response.status();
        if (status.is_client_error() && !matches!(status.as_u16(), 408 | 429))
            || may_have_been_applied
        {
            // Our 4xx answers are deterministic: tell SDKs that honour it (both official ones do) not to
            // retry them — the Anthropic SDK would otherwise retry every 409 twice. Nor a write that may
            // have been applied: sent again, it could be applied twice.
            response
                .headers_mut()
                .insert("x-should-retry", HeaderValue::from_static("false"));
        }
        crate::telemetry::record_request(
            &self.method,
            &self.route,
            status.as_u16(),
            self.started.elapsed(),
        );
        let routine = response.extensions().get::<RoutineAccess>().is_some();
        // Whole microseconds: 0.395, not 0.39458800000000005.
        let latency_ms = self.started.elapsed().as_micros() as f64 / 1000.0;
        macro_rules! access {
            ($level:expr) => {
                tracing::event!(
                    target: "tether::access",
                    $level,
                    status = status.as_u16(),
                    latency_ms,
                    "request"
                )
            };
        }
        self.span.in_scope(|| match routine {
            true => access!(tracing::Level::DEBUG),
            false => access!(tracing::Level::INFO),
        });
        response
    }
}

/// `error` as a response that asks the client to try again in a second (`retry-after`, SPEC §1.10):
/// a 503 of a busy server, a 429 of a limit that frees up as the caller's other requests end.
pub fn retry_shortly(error: ApiError) -> Response {
    let mut response = error.into_response();
    response
        .headers_mut()
        .insert("retry-after", HeaderValue::from_static("1"));
    response
}

/// `error` in the envelope, in place of `response`'s body. The headers the refusal was given are kept
/// (`Allow` on a 405, `retry-after` on a 503), but not those that described the body it replaces.
fn enveloped(response: Response, error: &ApiError, request_id: &str) -> Response {
    let mut enveloped = (error.status, Json(error.body(request_id))).into_response();
    let (parts, _) = response.into_parts();
    for (name, value) in &parts.headers {
        if !matches!(
            *name,
            axum::http::header::CONTENT_TYPE
                | axum::http::header::CONTENT_LENGTH
                | axum::http::header::TRANSFER_ENCODING
        ) {
            enveloped.headers_mut().append(name, value.clone());
        }
    }
    enveloped
}

fn is_json(response: &Response) -> bool {
    response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_id_in_the_log_is_one_word() {
        assert_eq!(
            loggable_request_id("req_01a-b.c:d/e+f@g"),
            "req_01a-b.c:d/e+f@g"
        );
        assert_eq!(
            loggable_request_id("x}: status=200 \"y\""),
            "x%7D:%20status%3D200%20%22y%22"
        );
    }

    /// The size of the futures `service` answers with.
    fn future_size<S: tower::Service<Request>>(_: &S) -> usize {
        std::mem::size_of::<S::Future>()
    }

    /// A long poll's request lives through its whole wait, on each of thousands of idle workers'
    /// connections: what the envelope holds meanwhile, beside the rest of the route's future, is
    /// what the answer needs, and no room for the request it handed on.
    #[test]
    fn the_envelope_holds_nothing_of_the_request_while_the_route_answers() {
        let route = tower::service_fn(|_: Request| {
            std::future::ready(Ok::<Response, std::convert::Infallible>(Response::default()))
        });
        let routes_future = future_size(&route);
        let answer = envelope(Request::default(), around::Next::ready(route));
        let held = std::mem::size_of_val(&answer) - routes_future - std::mem::size_of::<Asked>();
        assert!(
            held < std::mem::size_of::<Request>(),
            "the envelope holds {held} bytes beside the route's future and what the answer needs"
        );
    }
}

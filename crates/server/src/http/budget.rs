//! What request bodies may cost in memory, all of them together.
//!
//! A body is read only once the request's credential has been accepted: the router puts
//! authorization in front of the two middlewares here, so a caller without a credential never spends
//! the budget (a refusal reads a small body, and only that, to keep the connection usable:
//! [`drain_refused`]). An endpoint that takes no body reads and drops whatever was sent, keeping and
//! charging nothing ([`skip_body`]); so a long-lived answer to a request that sent one (an event
//! stream) holds no share either.
//!
//! An endpoint that takes a body reads it whole before its handler runs ([`read_body`]) and parses
//! it into a JSON tree, which
//! can take many times the bytes of its text: `[0,0,0,…]` costs some 32 bytes of tree per 2 bytes of
//! text. So every request pays, from one budget shared by the process (`--request-memory`),
//! [`BYTE_COST`] per byte of body (the text, and the copies of its strings that the handler makes: the
//! parsed tree, the events built from it, the stored documents, the answer), then [`VALUE_COST`] per
//! JSON value of the tree, counted first by a scan that builds nothing. A request that cannot get its
//! share within [`BUDGET_WAIT`] is answered 503; one whose share alone exceeds what one caller may
//! hold, or that holds more than [`MAX_JSON_VALUES`] values, is answered 400. Requests without a body
//! (polls, heartbeats, `/healthz`) pay nothing and are never held up by large ones.
//!
//! One caller may hold at most [`CALLER_PART`] of the budget at once, over all its requests: a
//! caller is an environment (its key and the session tokens of its items together) or an admin
//! token. A caller that declares large bodies and never sends them (a `Content-Length` that lies)
//! then waits for its own requests, and the rest of the budget stays for everyone else. The part is
//! large enough for one body of the default `--body-limit` at the default `--request-memory`.

use std::cell::Cell;
use std::collections::HashMap;
use std::fmt;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use serde::de::{DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::ApiError;
use crate::service::tokens::Principal;

/// The default `--request-memory`: 256 MiB.
pub const DEFAULT_REQUEST_MEMORY: usize = 256 << 20;

/// The most JSON values (objects, arrays, strings, numbers, …; object keys count too) one body may hold.
pub const MAX_JSON_VALUES: u64 = 1_000_000;

/// What one parsed JSON value is charged, in bytes: the tree node, the slack of the vector or map that
/// holds it, and the handler's one copy of it.
pub const VALUE_COST: usize = 128;

/// What one byte of body is charged: the text itself and the handler's copies of its strings (the
/// parsed tree, the events built from it, the stored documents and the answer).
pub const BYTE_COST: usize = 5;

/// How long a whole request body may take to arrive (408 after that).
pub const BODY_READ_TIMEOUT: Duration = Duration::from_secs(60);

fn charge_for_bytes(n: usize) -> usize {
    n.saturating_mul(BYTE_COST)
}

/// The most a refused request's body is read (and dropped) before the refusal is sent, and how long
/// that may take: enough for any body a client with the wrong credential meant to send, and not a
/// way for one without any to hold its connection open. A longer body is left unread, and the
/// connection closes after the answer.
pub const REFUSED_BODY_DRAIN: usize = 64 * 1024;
pub const REFUSED_BODY_WAIT: Duration = Duration::from_secs(1);

/// How long a request waits for its share of the budget before it is answered 503.
pub const BUDGET_WAIT: Duration = Duration::from_secs(10);

/// The most of the budget one caller may hold at once, as a fraction: three quarters, so that a
/// quarter always stays for the others.
pub const CALLER_PART: (usize, usize) = (3, 4);

/// The budget is counted in KiB, so that a semaphore's `u32` permits cover any size.
const UNIT: usize = 1024;

/// Request-body memory, shared by every request of the process, of which each caller may hold
/// [`CALLER_PART`].
#[derive(Clone)]
pub struct MemoryBudget {
    units: Arc<Semaphore>,
    caller_units: usize,
    /// The part of each caller that holds some of the budget now; a caller's entry goes when its
    /// last share does, so the map is bounded by the requests in flight.
    callers: Arc<Mutex<HashMap<String, Arc<Semaphore>>>>,
}

/// Why a request did not get its share.
#[derive(Debug)]
enum Refusal {
    /// More than one caller may hold: it can never be served.
    TooLarge,
    /// The budget, or the caller's part of it, stayed spent by other requests for [`BUDGET_WAIT`].
    Busy,
}

impl MemoryBudget {
    pub fn new(bytes: usize) -> Self {
        let total_units = bytes.div_ceil(UNIT).max(1);
        let (part, whole) = CALLER_PART;
        MemoryBudget {
            units: Arc::new(Semaphore::new(total_units)),
            caller_units: (total_units * part / whole).max(1),
            callers: Arc::default(),
        }
    }

    /// An empty share for one request of `caller` (any string that names a caller: [`caller_of`]).
    fn share_for(&self, caller: &str) -> Share {
        let part = self
            .callers
            .lock()
            .expect("no code panics holding the callers' map")
            .entry(caller.to_owned())
            .or_insert_with(|| Arc::new(Semaphore::new(self.caller_units)))
            .clone();
        Share {
            budget: self.clone(),
            caller: caller.to_owned(),
            part,
            units: 0,
            held: Vec::new(),
        }
    }
}

/// Who pays for a request: its environment, for an environment key and the session tokens of the
/// environment's items alike (so that claiming items gives no more of the budget); the admin token
/// by its id.
fn caller_of(principal: Option<&Principal>) -> String {
    match principal {
        Some(Principal::EnvironmentKey { environment_id, .. })
        | Some(Principal::SessionToken { environment_id, .. }) => format!("env:{environment_id}"),
        Some(Principal::Admin { credential_id }) => format!("admin:{credential_id}"),
        // No route that takes a body is public; were one added, its callers would share one part.
        None => "public".to_owned(),
    }
}

/// What one request holds of the budget and of its caller's part, given back when it drops.
struct Share {
    budget: MemoryBudget,
    caller: String,
    part: Arc<Semaphore>,
    /// What this request holds, in units, of each.
    units: usize,
    held: Vec<OwnedSemaphorePermit>,
}

impl Share {
    /// Adds `bytes` to what the request holds: from its caller's part first, then from the whole,
    /// each within [`BUDGET_WAIT`].
    async fn take(&mut self, bytes: usize) -> Result<(), Refusal> {
        let units = bytes.div_ceil(UNIT);
        if units == 0 {
            return Ok(());
        }
        let total = self.units.saturating_add(units);
        if total > self.budget.caller_units {
            return Err(Refusal::TooLarge);
        }
        let units = u32::try_from(units).map_err(|_| Refusal::TooLarge)?;
        let deadline = tokio::time::Instant::now() + BUDGET_WAIT;
        for pool in [&self.part, &self.budget.units] {
            let permit = tokio::time::timeout_at(deadline, pool.clone().acquire_many_owned(units))
                .await
                .map_err(|_| Refusal::Busy)?
                .map_err(|_| Refusal::Busy)?;
            self.held.push(permit);
        }
        self.units = total;
        Ok(())
    }

    fn is_empty(&self) -> bool {
        self.units == 0
    }
}

impl Drop for Share {
    fn drop(&mut self) {
        self.held.clear();
        let mut callers = self
            .budget
            .callers
            .lock()
            .expect("no code panics holding the callers' map");
        // Only the map and this share still know the part: no other request of the caller holds or
        // waits for it (each got its handle under this lock), so the entry can go.
        if Arc::strong_count(&self.part) == 2 {
            debug_assert_eq!(self.part.available_permits(), self.budget.caller_units);
            callers.remove(&self.caller);
        }
    }
}

/// Counts the values of a JSON text without building anything, stopping at `max`. `None`: the text is
/// not JSON (the handler's parser will say so; a text that breaks off is charged what was counted).
pub fn count_json_values(text: &[u8], max: u64) -> (u64, bool) {
    let count = Cell::new(0u64);
    let mut de = serde_json::Deserializer::from_slice(text);
    let ok = Counter { count: &count, max }.deserialize(&mut de).is_ok();
    (count.get(), ok)
}

#[derive(Clone, Copy)]
struct Counter<'a> {
    count: &'a Cell<u64>,
    max: u64,
}

impl Counter<'_> {
    fn bump<E: serde::de::Error>(self) -> Result<(), E> {
        let n = self.count.get() + 1;
        self.count.set(n);
        if n > self.max {
            return Err(E::custom("too many JSON values"));
        }
        Ok(())
    }
}

impl<'de> DeserializeSeed<'de> for Counter<'_> {
    type Value = ();
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Counter<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E: serde::de::Error>(self, _: bool) -> Result<(), E> {
        self.bump()
    }
    fn visit_i64<E: serde::de::Error>(self, _: i64) -> Result<(), E> {
        self.bump()
    }
    fn visit_u64<E: serde::de::Error>(self, _: u64) -> Result<(), E> {
        self.bump()
    }
    fn visit_f64<E: serde::de::Error>(self, _: f64) -> Result<(), E> {
        self.bump()
    }
    fn visit_str<E: serde::de::Error>(self, _: &str) -> Result<(), E> {
        self.bump()
    }
    fn visit_unit<E: serde::de::Error>(self) -> Result<(), E> {
        self.bump()
    }
    fn visit_none<E: serde::de::Error>(self) -> Result<(), E> {
        self.bump()
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        self.bump()?;
        while seq.next_element_seed(self)?.is_some() {}
        Ok(())
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        self.bump()?;
        while map.next_key::<IgnoredAny>()?.is_some() {
            self.bump()?;
            map.next_value_seed(self)?;
        }
        Ok(())
    }
}

/// The state [`read_body`] needs.
#[derive(Clone)]
pub struct BodyPolicy {
    pub limit: usize,
    pub budget: MemoryBudget,
}

fn too_large() -> ApiError {
    ApiError::bad_request("the request body is larger than the server accepts")
}

fn late() -> ApiError {
    ApiError::new(
        axum::http::StatusCode::REQUEST_TIMEOUT,
        "invalid_request_error",
        "the request body did not arrive in time",
    )
}

fn unreadable() -> ApiError {
    ApiError::bad_request("the request body could not be read")
}

/// The next chunk of a body that must have arrived whole by `deadline`; `None` at its end.
async fn next_chunk(
    stream: &mut axum::body::BodyDataStream,
    deadline: tokio::time::Instant,
) -> Result<Option<Bytes>, ApiError> {
    match tokio::time::timeout_at(deadline, stream.next()).await {
        Err(_) => Err(late()),
        Ok(None) => Ok(None),
        Ok(Some(Err(_))) => Err(unreadable()),
        Ok(Some(Ok(chunk))) => Ok(Some(chunk)),
    }
}

/// Reads `body` to its end and drops it as it comes, keeping nothing: at most `cap` bytes (a longer
/// declared length is refused before any byte is read), within `wait`.
async fn drain(body: Body, cap: usize, wait: Duration) -> Result<(), ApiError> {
    if http_body::Body::is_end_stream(&body) {
        return Ok(());
    }
    if http_body::Body::size_hint(&body).lower() > cap as u64 {
        return Err(too_large());
    }
    let mut stream = body.into_data_stream();
    let deadline = tokio::time::Instant::now() + wait;
    let mut read = 0usize;
    while let Some(chunk) = next_chunk(&mut stream, deadline).await? {
        read = read.saturating_add(chunk.len());
        if read > cap {
            return Err(too_large());
        }
    }
    Ok(())
}

/// For an endpoint that takes no body (its table entry says `Body::None`): whatever was sent is read
/// and dropped, charged nothing since nothing is kept, and the handler gets an empty body. Reading it
/// still matters, for the reason [`read_body`] gives.
pub async fn skip_body(State(policy): State<BodyPolicy>, request: Request, next: Next) -> Response {
    let (parts, body) = request.into_parts();
    if let Err(e) = drain(body, policy.limit, BODY_READ_TIMEOUT).await {
        return e.into_response();
    }
    next.run(Request::from_parts(parts, Body::empty())).await
}

/// Before a refusal that no handler answers (no credential, a credential that may not, no such
/// endpoint, a method the path does not have): reads what is left of a small body (see
/// [`REFUSED_BODY_DRAIN`]), so that the client's connection stays usable for its next request.
pub async fn drain_refused(body: Body) {
    let _ = drain(body, REFUSED_BODY_DRAIN, REFUSED_BODY_WAIT).await;
}

fn refused(refusal: Refusal) -> Response {
    match refusal {
        Refusal::TooLarge => ApiError::bad_request(
            "the request body would take more memory than the server grants one caller's requests \
             together (three quarters of --request-memory)",
        )
        .into_response(),
        Refusal::Busy => {
            let mut response = ApiError::unavailable(
                "the server is busy with other large requests; retry shortly",
            )
            .into_response();
            response
                .headers_mut()
                .insert("retry-after", HeaderValue::from_static("1"));
            response
        }
    }
}

/// Reads the whole request body before the handler runs, paying for it from the memory budget. (Reading
/// it first matters on its own: a handler that answers without reading the body — ack, heartbeat,
/// archive: the SDKs send `{}` or `Content-Length: 0` there; any early error — would leave unread bytes
/// on a keep-alive connection, and hyper then closes it after the response; a client that reuses that
/// pooled connection sees "server disconnected", and the Qoder SDK never retries a POST after a
/// transport error.) The share is held until the response has been written out.
pub async fn read_body(State(policy): State<BodyPolicy>, request: Request, next: Next) -> Response {
    let (parts, body) = request.into_parts();
    let declared = parts
        .headers
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > policy.limit as u64) {
        return too_large().into_response();
    }
    // The authorization layer in front of this one left the principal.
    let mut share = policy
        .budget
        .share_for(&caller_of(parts.extensions.get::<Principal>()));
    // A body of declared length pays for all of it at once, so that requests never each hold part of
    // what they need while waiting for the rest; one sent in chunks pays as they arrive. Either way the
    // whole body must arrive within BODY_READ_TIMEOUT, so that a slow sender holds its share only so long.
    if let Some(n) = declared {
        if let Err(refusal) = share.take(charge_for_bytes(n as usize)).await {
            return refused(refusal);
        }
    }
    let mut bytes: Vec<u8> = Vec::new();
    let mut stream = body.into_data_stream();
    let deadline = tokio::time::Instant::now() + BODY_READ_TIMEOUT;
    loop {
        let chunk = match next_chunk(&mut stream, deadline).await {
            Err(e) => return e.into_response(),
            Ok(None) => break,
            Ok(Some(chunk)) => chunk,
        };
        if bytes.len() + chunk.len() > policy.limit {
            return too_large().into_response();
        }
        if declared.is_none() {
            if let Err(refusal) = share.take(charge_for_bytes(chunk.len())).await {
                return refused(refusal);
            }
        }
        bytes.extend_from_slice(&chunk);
    }
    if !bytes.is_empty() {
        let (values, _) = count_json_values(&bytes, MAX_JSON_VALUES);
        if values > MAX_JSON_VALUES {
            return ApiError::bad_request(format!(
                "the request body holds more than {MAX_JSON_VALUES} JSON values"
            ))
            .into_response();
        }
        let tree = (values as usize).saturating_mul(VALUE_COST);
        if let Err(refusal) = share.take(tree).await {
            return refused(refusal);
        }
    }
    let response = next
        .run(Request::from_parts(parts, Body::from(Bytes::from(bytes))))
        .await;
    if share.is_empty() {
        return response;
    }
    let (parts, body) = response.into_parts();
    Response::from_parts(parts, Body::new(Holding { body, share }))
}

/// A response body that keeps the request's memory share until it has been sent (or dropped).
struct Holding {
    body: Body,
    #[allow(dead_code)] // held for its `Drop`
    share: Share,
}

impl http_body::Body for Holding {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_values_without_building_them() {
        assert_eq!(count_json_values(b"{}", 10), (1, true));
        assert_eq!(
            count_json_values(br#"{"a":[1,2,"x"],"b":null}"#, 100),
            (8, true)
        );
        let (n, ok) = count_json_values(b"[0,0,0,0,0,0]", 3);
        assert_eq!((n, ok), (4, false));
        assert!(!count_json_values(b"[1,", 100).1);
    }

    #[tokio::test]
    async fn a_share_larger_than_a_callers_part_is_refused_at_once() {
        let budget = MemoryBudget::new(64 * 1024);
        let mut share = budget.share_for("env:a");
        assert!(matches!(
            share.take(49 * 1024).await,
            Err(Refusal::TooLarge)
        ));
        share.take(40 * 1024).await.unwrap();
        // The request's own shares add up.
        assert!(matches!(share.take(9 * 1024).await, Err(Refusal::TooLarge)));
        share.take(8 * 1024).await.unwrap();
        assert!(!share.is_empty());
        let mut nothing = budget.share_for("env:a");
        nothing.take(0).await.unwrap();
        assert!(nothing.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_caller_waits_for_its_own_requests_and_leaves_the_rest_to_others() {
        let budget = MemoryBudget::new(64 * 1024);
        let mut first = budget.share_for("env:a");
        first.take(40 * 1024).await.unwrap();
        // The same caller again (its key, or a session token of its environment): its part is spent.
        let mut second = budget.share_for("env:a");
        let started = tokio::time::Instant::now();
        assert!(matches!(second.take(16 * 1024).await, Err(Refusal::Busy)));
        assert_eq!(started.elapsed(), BUDGET_WAIT);
        // Another caller gets what is left of the whole at once.
        let mut other = budget.share_for("env:b");
        other.take(24 * 1024).await.unwrap();
        // The whole is spent now, for everyone.
        let mut third = budget.share_for("admin:t");
        assert!(matches!(third.take(1024).await, Err(Refusal::Busy)));
        drop((first, second, third));
        let mut again = budget.share_for("env:a");
        again.take(40 * 1024).await.unwrap();
        drop((again, other));
        assert!(
            budget.callers.lock().unwrap().is_empty(),
            "a caller's entry goes with its last share"
        );
        assert_eq!(budget.units.available_permits(), 64);
    }
}

//! What request bodies may cost in memory, all of them together.
//!
//! A body is read only once the request's credential has been accepted: each route's guard
//! ([`super::guard_route`]) admits the caller before it reads the body, so a caller without a credential never spends
//! the budget (a refusal reads a small body, and only that, to keep the connection usable:
//! [`drain_refused`]). An endpoint that takes no body reads and drops whatever was sent, keeping and
//! charging nothing ([`skip_body`]); so a long-lived answer to a request that sent one (an event
//! stream) holds no share either.
//!
//! An endpoint that takes a body reads it whole before its handler runs ([`read_body`]) and parses
//! it into a JSON tree, which
//! can take many times the bytes of its text: `[0,0,0,…]` costs some 32 bytes of tree per 2 bytes of
//! text. So every request pays, from one budget shared by the process (`--request-memory`), as
//! its body arrives, [`BYTE_COST`] per byte of body (the text, and the copies of its strings that the handler makes: the
//! parsed tree, the events built from it, the stored documents, the answer), then [`VALUE_COST`] per
//! JSON value of the tree, counted first by a scan that builds nothing. A request that cannot get its
//! share within [`crate::memory::BUDGET_WAIT`] is answered 503; one whose share alone exceeds what one caller may
//! hold, or that holds more than [`MAX_JSON_VALUES`] values, is answered 400. Requests without a body
//! (polls, heartbeats, `/healthz`) pay nothing for a body and are never held up by large ones;
//! a read's answer over [`ANSWER_FREE`] pays from the answers' budget ([`pay_for_answer`]).
//!
//! The budget and what one caller may hold of it are [`crate::memory`]'s.

use std::cell::Cell;
use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::Request;
use axum::http::Method;
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use serde::de::{DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};

use crate::error::ApiError;
use crate::memory::{MemoryBudget, Refusal, Share};
use crate::service::tokens::Principal;

/// The most JSON values (objects, arrays, strings, numbers, …; object keys count too) one body may hold.
pub const MAX_JSON_VALUES: u64 = 1_000_000;

/// What one parsed JSON value is charged, in bytes: the tree node, the slack of the vector or map that
/// holds it, and the handler's one copy of it.
pub const VALUE_COST: usize = 128;

/// What one byte of body is charged: the text itself and the handler's copies of its strings (the
/// parsed tree, the events built from it, the stored documents and the answer).
pub const BYTE_COST: usize = 5;

/// How long a whole request body may take to arrive (408 after that), not counting the time the
/// server waits for memory for it (see [`read_body`]).
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
pub async fn skip_body(policy: &BodyPolicy, request: Request) -> Result<Request, Response> {
    let (parts, body) = request.into_parts();
    let arriving = body_arriving(&parts);
    if let Err(e) = drain(body, policy.limit, BODY_READ_TIMEOUT).await {
        return Err(e.into_response());
    }
    drop(arriving);
    Ok(Request::from_parts(parts, Body::empty()))
}

/// While a request's body arrives, its connection may give its place to a new one at the
/// connection cap (`crate::listener::Yieldable`): a body sent a byte at a time must not keep other
/// clients out. `None` where the request did not come through the listener (tests of the router).
fn body_arriving(parts: &axum::http::request::Parts) -> Option<crate::listener::YieldGuard> {
    parts
        .extensions
        .get::<crate::listener::Yieldable>()
        .map(crate::listener::Yieldable::mark)
}

/// Before a refusal that no handler answers (no credential, a credential that may not, no such
/// endpoint, a method the path does not have): reads what is left of a small body (see
/// [`REFUSED_BODY_DRAIN`]), so that the client's connection stays usable for its next request. The
/// connection yields its place at the cap meanwhile, as for any body still arriving: a client
/// without a credential that sends one body after another, each a byte at a time, must not keep
/// others out for even that second.
pub async fn drain_refused(request: Request) {
    let (parts, body) = request.into_parts();
    let _arriving = body_arriving(&parts);
    let _ = drain(body, REFUSED_BODY_DRAIN, REFUSED_BODY_WAIT).await;
}

/// The answer to a request that did not get its share of the memory budget.
pub fn refused(refusal: Refusal) -> Response {
    match refusal {
        Refusal::TooLarge => ApiError::bad_request(
            "the request body would take more memory than the server grants one caller's requests \
             together (three quarters of --request-memory)",
        )
        .into_response(),
        Refusal::Busy => super::retry_shortly(ApiError::unavailable(
            "the server is busy with other large requests; retry shortly",
        )),
    }
}

/// Reads the whole request body before the handler runs, paying for it from the memory budget. (Reading
/// it first matters on its own: a handler that answers without reading the body — ack, heartbeat,
/// archive: the SDKs send `{}` or `Content-Length: 0` there; any early error — would leave unread bytes
/// on a keep-alive connection, and hyper then closes it after the response; a client that reuses that
/// pooled connection sees "server disconnected", and the Qoder SDK never retries a POST after a
/// transport error.) The share it returns is to be held until the response has been written out
/// ([`holding`]).
pub async fn read_body(
    policy: &BodyPolicy,
    request: Request,
) -> Result<(Request, Share), Response> {
    let (parts, body) = request.into_parts();
    let arriving = body_arriving(&parts);
    let declared = parts
        .headers
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > policy.limit as u64) {
        return Err(too_large().into_response());
    }
    // The route's guard admitted the caller and left the principal.
    let mut share = policy.budget.share_for(parts.extensions.get::<Principal>());
    // A body pays as it arrives, whatever its `Content-Length` says: paid for up front, a length
    // that lies held memory for nothing, and the callers of two environments, each declaring
    // bodies they never sent, held all of it (each caller may hold three quarters). So memory is
    // held only for bytes a client has sent, and the whole body must arrive within
    // BODY_READ_TIMEOUT: a slow sender holds its share only so long. The cost: large bodies
    // arriving together may each hold part of what they need while waiting for the rest, and the
    // one that waits out BUDGET_WAIT is answered 503.
    //
    // The time the server waits for memory for a body is not the client's: it does not count
    // against BODY_READ_TIMEOUT, and counts against BUDGET_WAIT over all the body's chunks
    // together, so that a body the server kept waiting is refused as busy (503, retry shortly),
    // never as late (408, the client's fault), and within a bound.
    let mut bytes: Vec<u8> = Vec::new();
    let mut stream = body.into_data_stream();
    let mut deadline = tokio::time::Instant::now() + BODY_READ_TIMEOUT;
    let mut budget_wait_left = crate::memory::BUDGET_WAIT;
    loop {
        let chunk = match next_chunk(&mut stream, deadline).await {
            Err(e) => return Err(e.into_response()),
            Ok(None) => break,
            Ok(Some(chunk)) => chunk,
        };
        if bytes.len() + chunk.len() > policy.limit {
            return Err(too_large().into_response());
        }
        let waiting = tokio::time::Instant::now();
        let paid = share
            .take_within(charge_for_bytes(chunk.len()), budget_wait_left)
            .await;
        if let Err(refusal) = paid {
            return Err(refused(refusal));
        }
        let waited = waiting.elapsed();
        budget_wait_left = budget_wait_left.saturating_sub(waited);
        deadline += waited;
        bytes.extend_from_slice(&chunk);
    }
    drop(arriving);
    if !bytes.is_empty() {
        let (values, _) = count_json_values(&bytes, MAX_JSON_VALUES);
        if values > MAX_JSON_VALUES {
            return Err(ApiError::bad_request(format!(
                "the request body holds more than {MAX_JSON_VALUES} JSON values"
            ))
            .into_response());
        }
        let tree = (values as usize).saturating_mul(VALUE_COST);
        if let Err(refusal) = share.take(tree).await {
            return Err(refused(refusal));
        }
    }
    Ok((
        Request::from_parts(parts, Body::from(Bytes::from(bytes))),
        share,
    ))
}

/// The largest answer that pays nothing for the memory it holds until it is sent: the polls,
/// heartbeats, acks and single records that make most of the traffic. An HTTP/2 connection can
/// leave its 100 streams' answers unread, so such answers cost a connection at most 100 times this.
pub const ANSWER_FREE: usize = 16 * 1024;

/// Who pays for the answer to `request` ([`pay_for_answer`]): its caller, admitted already, when it
/// is a read (`GET`, `HEAD`; the guard leaves out a GET that changes state, the poll).
pub fn answer_payer(request: &Request) -> Option<Principal> {
    matches!(*request.method(), Method::GET | Method::HEAD)
        .then(|| request.extensions().get::<Principal>().cloned())
        .flatten()
}

/// Pays for a larger answer made whole (a record, a page of a listing) from the answers' budget
/// (`App::page_memory`, which pages of events share) by the request's caller, for as long as
/// anything holds its bytes: until hyper has written them out, or thrown them away with the
/// connection. Without this a caller could make the server hold answers it never reads: one
/// session's record with a large agent, asked for on a hundred HTTP/2 streams per connection.
///
/// The answer is made before its cost is known, so it is paid for at once or not at all: a wait
/// would hold it meanwhile. One that does not fit is dropped and answered 503 (retry shortly).
/// An answer larger than a caller's whole part pays the part: one such answer at a time per
/// caller, rather than a record nobody could ever read. Only reads are paid for so: the answer to
/// a write comes once the write is committed, and a 503 then would have its client send it again
/// (a second session, the same events twice); a write's answer keeps its body's share instead
/// ([`read_body`]). Streamed answers (event pages, event streams) pay as they go, and public
/// answers share one copy; neither comes through here.
pub async fn pay_for_answer(
    budget: &MemoryBudget,
    caller: &Principal,
    response: Response,
) -> Response {
    let size = match http_body::Body::size_hint(response.body()).exact() {
        Some(size) if size as usize > ANSWER_FREE => size as usize,
        _ => return response,
    };
    let mut share = budget.share_for(Some(caller));
    if share
        .take_now(size.min(budget.caller_part()))
        .await
        .is_err()
    {
        drop(response);
        return super::retry_shortly(ApiError::unavailable(
            "the server holds as many unsent answers as it may for this caller, or for all; retry \
             shortly",
        ));
    }
    let (parts, body) = response.into_parts();
    // A body of exact size is whole already: collecting it takes no wait.
    let bytes = match axum::body::to_bytes(body, size).await {
        Ok(bytes) => bytes,
        Err(_) => return ApiError::internal("an answer could not be read").into_response(),
    };
    Response::from_parts(parts, Body::from(share.paying_for(bytes)))
}

/// `response`, keeping `share` until its body has been sent (or dropped).
pub fn holding(response: Response, share: Share) -> Response {
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

    /// A body that arrives as `chunks` say, each sent at its second from the start (paused time),
    /// read by [`read_body`] under `budget`: the answer's status, 200 for a body read whole.
    async fn read_as_sent(budget: &MemoryBudget, chunks: Vec<(u64, usize)>) -> u16 {
        use futures::SinkExt as _;
        let start = tokio::time::Instant::now();
        let (mut sending, arriving) =
            futures::channel::mpsc::channel::<Result<Bytes, std::io::Error>>(1);
        tokio::spawn(async move {
            for (at, size) in chunks {
                tokio::time::sleep_until(start + Duration::from_secs(at)).await;
                let _ = sending.send(Ok(Bytes::from(vec![b' '; size]))).await;
            }
        });
        let mut request = Request::new(axum::body::Body::from_stream(arriving));
        request.extensions_mut().insert(Principal::EnvironmentKey {
            credential_id: "key_poster".into(),
            environment_id: "env_poster".into(),
        });
        let policy = BodyPolicy {
            limit: 1 << 20,
            budget: budget.clone(),
        };
        match read_body(&policy, request).await {
            Ok(_) => 200,
            Err(refusal) => refusal.status().as_u16(),
        }
    }

    /// `budget`'s memory held by a caller of its own from second `from` to second `to`.
    fn held(budget: &MemoryBudget, caller: &str, kib: usize, from: u64, to: u64) {
        let budget = budget.clone();
        let caller = Principal::Admin {
            credential_id: caller.to_owned(),
        };
        let start = tokio::time::Instant::now();
        tokio::spawn(async move {
            tokio::time::sleep_until(start + Duration::from_secs(from)).await;
            let mut share = budget.share_for(Some(&caller));
            share.take(kib * 1024).await.expect("room for the holder");
            tokio::time::sleep_until(start + Duration::from_secs(to)).await;
        });
    }

    /// The time the server waits for memory for a body is not the client's: a body sent in time
    /// is read whole however long the server kept it waiting first, up to `BUDGET_WAIT` in all;
    /// past that, over all its chunks, it is refused as busy (503), not late (408).
    #[tokio::test(start_paused = true)]
    async fn the_servers_waits_for_memory_are_not_the_clients_time() {
        // 16 KiB, of which a caller may hold 12; a byte of body costs 5.
        let budget = MemoryBudget::new(16 * 1024);
        // 12 KiB held until second 63: the second chunk (4 KiB) waits from 55 to 63, and the
        // third, sent at 64, comes after the client's 60 s but within them once the wait is
        // left out.
        held(&budget, "first", 12, 0, 63);
        tokio::task::yield_now().await;
        let sent = vec![(0, 100), (55, 700), (64, 100)];
        assert_eq!(read_as_sent(&budget, sent).await, 200);

        // Waits of 6 s and then of more than 4 s: refused once they make BUDGET_WAIT together,
        // though each is shorter.
        let budget = MemoryBudget::new(16 * 1024);
        held(&budget, "first", 12, 0, 7);
        held(&budget, "second", 11, 8, 30);
        tokio::task::yield_now().await;
        let started = tokio::time::Instant::now();
        let sent = vec![(0, 100), (1, 700), (9, 100)];
        assert_eq!(read_as_sent(&budget, sent).await, 503);
        assert_eq!(
            started.elapsed(),
            Duration::from_secs(13),
            "6 s, then the 4 s left"
        );
    }

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
}

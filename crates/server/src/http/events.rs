//! Session events over HTTP (§12.3): post, list, the live stream; and cancel (§7.2, §12.2).

use std::convert::Infallible;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Extension, Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::StreamExt as _;
use tether_api as api;
use tether_core::events::{self as rules, Sender};
use tether_core::ids::IdKind;

use super::access::{self, ReadableSession};
use super::extract::{Caller, JsonBody, Params, Wire};
use super::{budget, decode, wire};
use crate::error::{ApiError, ApiResult};
use crate::listener::Yieldable;
use crate::memory::Share;
use crate::service::events::{page_bytes, EventFilter, NewEvents};
use crate::service::tokens::Principal;
use crate::service::App;

/// Silence on a stream longer than this is broken by a `:keep-alive` comment (§12.3), so that proxies and
/// clients do not take an idle session for a dead connection.
pub const KEEP_ALIVE: Duration = Duration::from_secs(15);

fn sender(p: &Principal) -> Sender {
    if access::is_worker(p) {
        Sender::Worker
    } else {
        Sender::Admin
    }
}

pub async fn post_events(
    State(app): State<App>,
    Caller(p): Caller,
    ReadableSession(session): ReadableSession,
    body: Result<JsonBody, ApiError>,
) -> ApiResult<Json<api::PostedEvents>> {
    // D-32: the body is judged (400) only once the session is known to exist and be the caller's.
    let api::PostEvents { events } = decode::optional(body)?;
    let stored = app
        .post_events(&session, sender(&p), NewEvents { events })
        .await?;
    let data = stored
        .into_iter()
        .map(|e| serde_json::from_value(e.body))
        .collect::<Result<_, _>>()
        .map_err(|e| ApiError::internal(format!("a stored event is not an event: {e}")))?;
    Ok(Json(api::PostedEvents { data }))
}

pub async fn list_events(
    State(app): State<App>,
    Wire(d): Wire,
    Caller(caller): Caller,
    ReadableSession(session): ReadableSession,
    params: Params,
) -> ApiResult<Response> {
    // The Anthropic worker reconciles with `limit=1000`; the dialect table says how far each one goes.
    let page = params.page(d.max_list_limit(), false, Some(IdKind::Event))?;
    let filter = EventFilter {
        types: params.all("types"),
        created_gt: params.timestamp("created_at[gt]")?,
        created_gte: params.timestamp("created_at[gte]")?,
        created_lt: params.timestamp("created_at[lt]")?,
        created_lte: params.timestamp("created_at[lte]")?,
    };
    // The page is paid for from the memory budget until it has been handed out: a client that
    // leaves pages unread holds no more than its caller's part.
    let mut share = app.page_memory.share_for(Some(&caller));
    if let Err(refusal) = share.take(app.page_reservation()).await {
        return Ok(budget::refused(refusal));
    }
    let events = app.list_events(&session.id, &page, &filter).await?;
    share.shrink_to(page_bytes(&events.items));
    Ok(budget::holding(streamed_list(events), share))
}

/// A list envelope (§1.8) of stored events, written out piece by piece: each event's JSON goes to the
/// socket as it was stored, never parsed into a tree nor copied into one big response text.
fn streamed_list(page: tether_store::Page<tether_store::EventDoc>) -> Response {
    // The envelope without its events: `{"data":[],"first_id":…}`.
    let cursors = wire::list(&page, |e| e.id.clone(), |_| ());
    let envelope = serde_json::to_string(&api::Page {
        data: Vec::new(),
        ..cursors
    })
    .expect("a page envelope always serializes");
    let tail = envelope
        .strip_prefix("{\"data\":[]")
        .expect("a page's first member is data");
    let mut chunks: Vec<Bytes> = Vec::with_capacity(page.items.len() * 2 + 2);
    chunks.push(Bytes::from_static(b"{\"data\":["));
    for (i, event) in page.items.into_iter().enumerate() {
        if i > 0 {
            chunks.push(Bytes::from_static(b","));
        }
        let text: Box<str> = event.body.into();
        chunks.push(Bytes::from(String::from(text)));
    }
    // The envelope's other members follow `data`: `,"first_id":…}` after the events' `]`.
    chunks.push(Bytes::from(format!("]{tail}")));
    let body = Body::from_stream(futures::stream::iter(
        chunks.into_iter().map(Ok::<_, Infallible>),
    ));
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// Where a resumed stream starts: the `Last-Event-ID` header, else the `last_event_id` query parameter.
/// Blank means absent. A well-formed id that names no event is used positionally (as list cursors are, D-4).
fn resume_point(headers: &HeaderMap, params: &Params) -> ApiResult<Option<String>> {
    let from_header = headers
        .get("last-event-id")
        .map(|v| v.to_str().map(str::trim));
    let (param, value) = match from_header {
        Some(Err(_)) => {
            return Err(ApiError::bad_param(
                "Last-Event-ID",
                "Last-Event-ID must be an event id",
            ))
        }
        Some(Ok(v)) if !v.is_empty() => ("Last-Event-ID", v),
        _ => match params.get("last_event_id")?.map(str::trim) {
            Some(v) if !v.is_empty() => ("last_event_id", v),
            _ => return Ok(None),
        },
    };
    if !rules::is_event_id(value) {
        return Err(ApiError::bad_param(
            param,
            format!("{param} must be an event id (evt_…)"),
        ));
    }
    Ok(Some(value.to_owned()))
}

/// `GET /sessions/{id}/events/stream`: Server-Sent Events, one frame per event with `id:`, `event:` (the
/// Anthropic SDK drops frames without it) and `data:`. The response head goes out at once, before any event.
pub async fn stream(
    State(app): State<App>,
    Caller(caller): Caller,
    ReadableSession(session): ReadableSession,
    params: Params,
    headers: HeaderMap,
    connection: Option<Extension<Yieldable>>,
) -> ApiResult<Response> {
    let after = resume_point(&headers, &params)?;
    let place = match app.open_stream(&caller) {
        Ok(place) => place,
        Err(e) => return Ok(super::retry_shortly(e.into())),
    };
    let share = app.page_memory.share_for(Some(&caller));
    let (_, tail) = app
        .tail_events(&session.id, after, share, caller.clone())
        .await?;
    // A stream resumes from its Last-Event-ID: at the connection cap, it gives its place to a new
    // client rather than keep it out.
    let yielding = connection.map(|Extension(c)| c.mark());
    // The stream's place among its environment's goes with it.
    let frames = futures::stream::unfold(
        (tail, yielding, place),
        |(mut tail, yielding, place)| async move {
            let (event, held) = tail.next().await?;
            Some((frame(&event, held), (tail, yielding, place)))
        },
    )
    // The stream ends once its caller's credential is revoked or its session token dies, as its
    // next request would be refused: a client that reconnects then gets the 401.
    .take_until(CallerCheck(tokio::spawn(app.clone().lapsed(caller))));
    let body = Body::from_stream(KeepAlive::new(frames).map(Ok::<_, Infallible>));
    Ok((
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response())
}

/// A stream of SSE frames with a `:keep-alive` comment after every [`KEEP_ALIVE`] without one.
struct KeepAlive<S> {
    frames: std::pin::Pin<Box<S>>,
    timer: std::pin::Pin<Box<tokio::time::Sleep>>,
}

impl<S> KeepAlive<S> {
    fn new(frames: S) -> KeepAlive<S> {
        KeepAlive {
            frames: Box::pin(frames),
            timer: Box::pin(tokio::time::sleep(KEEP_ALIVE)),
        }
    }
}

impl<S: futures::Stream<Item = Bytes>> futures::Stream for KeepAlive<S> {
    type Item = Bytes;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Bytes>> {
        use std::future::Future as _;
        use std::task::Poll;
        let next = match self.frames.as_mut().poll_next(cx) {
            Poll::Ready(frame) => frame,
            Poll::Pending => {
                std::task::ready!(self.timer.as_mut().poll(cx));
                Some(Bytes::from_static(b":keep-alive\n\n"))
            }
        };
        self.timer
            .as_mut()
            .reset(tokio::time::Instant::now() + KEEP_ALIVE);
        Poll::Ready(next)
    }
}

/// A stream's check of its caller, as a task of its own, stopped with the stream.
///
/// Not polled as part of the response body: a client that stops reading (an HTTP/2 stream whose
/// window it keeps shut) stops the server from polling the body, and a check caught there in the
/// middle of a store read would hold one of the pool's few connections for as long as the client
/// likes. A thousand such streams took every connection, and every other request got 503.
struct CallerCheck(tokio::task::JoinHandle<()>);

impl std::future::Future for CallerCheck {
    type Output = ();

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<()> {
        std::pin::Pin::new(&mut self.0).poll(cx).map(drop)
    }
}

impl Drop for CallerCheck {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// One event as an SSE frame (`id:`, `event:` — the Anthropic SDK drops frames without it — and
/// `data:`), holding `held`, the event's part of the stream's memory share, for as long as anything
/// (hyper's buffers, while the client takes nothing) holds the frame's bytes.
fn frame(event: &tether_store::EventDoc, held: Share) -> Bytes {
    let head = event.head();
    let data = event.body.get();
    let mut text = Vec::with_capacity(data.len() + event.id.len() + head.kind.len() + 32);
    text.extend_from_slice(b"id: ");
    text.extend_from_slice(event.id.as_bytes());
    text.push(b'\n');
    if !head.kind.is_empty() {
        text.extend_from_slice(b"event: ");
        text.extend_from_slice(head.kind.as_bytes());
        text.push(b'\n');
    }
    // Stored events are compact JSON, but a line break in one would end the field: each line is a
    // `data:` field of its own, which the client joins back with line breaks.
    for line in data.split(['\n', '\r']) {
        text.extend_from_slice(b"data: ");
        text.extend_from_slice(line.as_bytes());
        text.push(b'\n');
    }
    text.push(b'\n');
    held.paying_for(text)
}

/// `POST /sessions/{id}/cancel`. While a turn runs (`running`, or `rescheduling` while its item waits for a
/// new worker) a `user.interrupt` is appended and the answer is 202 `{id, type:"session",
/// status:"canceling"}` (§7.2); the session stays `running` until the worker ends the turn with
/// `session.status_idle`, because only the worker can stop what it is doing. Otherwise nothing happens and
/// the answer is 200 with the session, whose `id`, `type` and `status` have the same places.
pub async fn cancel(
    State(app): State<App>,
    Wire(d): Wire,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    // Interrupting is a user-side act (§12.3): workers may not (the route is admin-only).
    let (canceling, session) = app.cancel_session(&id).await?;
    Ok(if canceling {
        (StatusCode::ACCEPTED, Json(api::Canceling::new(session.id))).into_response()
    } else {
        Json(wire::session(&session, d)).into_response()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(query: &str) -> Params {
        Params::parse(query)
    }

    #[test]
    fn resume_point_prefers_the_header() {
        let a = "evt_019f3be4fd2475d9a784bf2c739e11ff";
        let b = "evt_019f3be4fd2475d9a784bf2c739e1200";
        let mut headers = HeaderMap::new();
        assert_eq!(resume_point(&headers, &params("")).unwrap(), None);
        assert_eq!(
            resume_point(&headers, &params(&format!("last_event_id={b}"))).unwrap(),
            Some(b.to_owned())
        );
        headers.insert("last-event-id", a.parse().unwrap());
        assert_eq!(
            resume_point(&headers, &params(&format!("last_event_id={b}"))).unwrap(),
            Some(a.to_owned())
        );
        headers.insert("last-event-id", " ".parse().unwrap());
        assert_eq!(resume_point(&headers, &params("")).unwrap(), None);
        headers.insert("last-event-id", "work_1".parse().unwrap());
        let e = resume_point(&headers, &params("")).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("Last-Event-ID"));
        let e = resume_point(&HeaderMap::new(), &params("last_event_id=nope")).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("last_event_id"));
    }
}

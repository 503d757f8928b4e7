//! Response bodies as a connection's watchdog sees them: whether each one is still being taken.
//!
//! On HTTP/1 a response the client stops reading shows up as a write that waits on the socket
//! (`Tracked`). On HTTP/2 it need not: a client that keeps one stream's flow-control window shut
//! stops hyper from asking that body for more, while the socket and the other streams go on. So each
//! response body reports when it is waiting for hyper to take its next frame ([`Progress`]): from when
//! it hands a frame out, or, having had nothing to give, from when it is woken with more, until it is
//! asked again. A body that waits longer than the idle timeout closes its connection, as a stalled
//! write does on HTTP/1; closing frees what the response holds (its rows, its memory-budget share,
//! what hyper buffered for it).
//!
//! On HTTP/2 a data frame larger than [`SPLIT`] is handed out in copied pieces of that size, so that
//! what hyper and h2 buffer for a stream (at most the send buffer, `H2_MAX_SEND_BUFFER`, and a piece
//! or two) never keeps the whole of a large answer alive: the rest stays with the body, and goes
//! when the watchdog closes the connection. And a body hands out its next frame only while its
//! connection's answers hold less than [`super::H2_MAX_UNSENT`] in hyper; waiting for that
//! counts as waiting to be taken.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, Wake, Waker};

use bytes::{Buf, Bytes};
use futures::task::AtomicWaker;
use tokio::time::Instant;

use super::outbox::Outbox;
use super::{InFlight, RequestYields, UNSET};

/// How long an answer must have waited for its client to take more before, at the connection cap,
/// its connection may give its place to a new one: a client reading an answer takes the next piece
/// well within it, even on a slow link, and one that reads nothing is found out soon after.
pub const STALLED_AFTER: std::time::Duration = std::time::Duration::from_secs(5);

/// The size of the pieces a large HTTP/2 data frame is handed out in: h2's default frame size.
pub const SPLIT: usize = 16 * 1024;

/// Every live response body of one connection, for the watchdog to ask how long the longest waiting
/// one has waited.
///
/// At the cap, a connection's answers are also judged together ([`Untaken`]): since when some of
/// them have waited without a break, none taken whole meanwhile. A client that keeps its streams'
/// windows shut and resets each stream before its answer has waited long, having asked again
/// first, never has one answer wait long; together, its answers have waited since its first.
/// Taken means written out: hyper asks a body for its first frame before the client's window has
/// room for a byte of it, and lets a frame go unsent with a stream the client resets, so only a
/// frame consumed whole for the socket ([`Sent`]) counts, or a moment with no answer waiting at
/// all. (Only for the cap: a connection closed for a stalled write is judged by each answer's own
/// wait.)
pub(super) struct Responses {
    opened: Instant,
    live: Mutex<Vec<Weak<Progress>>>,
    untaken: Arc<Untaken>,
}

/// How long a connection's answers have waited together: see [`Responses`].
#[derive(Debug)]
pub(super) struct Untaken {
    /// Since when (ms after the connection opened) some answer has waited without a break, with no
    /// frame taken whole since; `UNSET` while none waits, and from a frame taken until the next
    /// answer begins to wait. (A body that begins to wait just as the last other one stops may
    /// find it cleared: the connection is then judged by its answers' own waits, the lenient way.)
    since: AtomicU64,
    /// The answers waiting now.
    waiting: AtomicUsize,
}

impl Untaken {
    fn began_waiting(&self, now: u64) {
        self.waiting.fetch_add(1, Ordering::AcqRel);
        let _ = self
            .since
            .compare_exchange(UNSET, now, Ordering::AcqRel, Ordering::Acquire);
    }

    fn stopped_waiting(&self) {
        let before = self.waiting.fetch_sub(1, Ordering::AcqRel);
        debug_assert!(before > 0, "more answers stopped waiting than began");
        if before == 1 {
            self.since.store(UNSET, Ordering::Release);
        }
    }

    fn frame_taken(&self) {
        self.since.store(UNSET, Ordering::Release);
    }
}

impl Responses {
    pub(super) fn new(opened: Instant) -> Responses {
        Responses {
            opened,
            live: Mutex::new(Vec::new()),
            untaken: Arc::new(Untaken {
                since: AtomicU64::new(UNSET),
                waiting: AtomicUsize::new(0),
            }),
        }
    }

    /// A new body's progress, waiting from now: hyper asks a body as soon as it has its head.
    fn track(&self, request: Arc<RequestYields>) -> Arc<Progress> {
        let progress = Arc::new(Progress {
            opened: self.opened,
            waiting_since: AtomicU64::new(UNSET),
            untaken: self.untaken.clone(),
            waker: AtomicWaker::new(),
            request,
        });
        progress.wait_from_now();
        let mut live = self.live.lock().expect("no code panics holding the list");
        // The list holds only the bodies in flight (HTTP/2 caps them per connection), so pruning it
        // here keeps it that size.
        live.retain(|p| p.strong_count() > 0);
        live.push(Arc::downgrade(&progress));
        progress
    }

    /// Since when (ms after the connection opened) the body that has waited longest has waited.
    pub(super) fn longest_wait(&self) -> Option<u64> {
        let live = self.live.lock().expect("no code panics holding the list");
        live.iter()
            .filter_map(Weak::upgrade)
            .map(|p| p.waiting_since.load(Ordering::Acquire))
            .filter(|&since| since != UNSET && since != GONE)
            .min()
    }

    /// The bodies that have waited at least [`STALLED_AFTER`] at `now_ms` (ms after the connection
    /// opened) for the client to take them (or that wait on a connection whose client has taken
    /// nothing for as long), whose requests do not yield otherwise, and since when the last of them
    /// has waited.
    pub(super) fn stalled(&self, now_ms: u64) -> (usize, Option<u64>) {
        let stalled_after = STALLED_AFTER.as_millis() as u64;
        let live = self.live.lock().expect("no code panics holding the list");
        live.iter()
            .filter_map(Weak::upgrade)
            .filter(|p| !p.request.yields())
            .map(|p| p.waited_since())
            .filter(|&since| since != UNSET && since.saturating_add(stalled_after) <= now_ms)
            .fold((0, None), |(count, latest), since| {
                (count + 1, Some(latest.map_or(since, |l: u64| l.max(since))))
            })
    }
}

/// In [`Progress::waiting_since`]: the body is gone; a waker it left behind starts no wait.
const GONE: u64 = UNSET - 1;

/// Whether one response body is waiting for hyper to take its next frame, and since when.
struct Progress {
    opened: Instant,
    /// ms after the connection opened; `UNSET` when not waiting, [`GONE`] once the body is.
    waiting_since: AtomicU64,
    /// The connection's answers together.
    untaken: Arc<Untaken>,
    /// Hyper's waker, woken through this one, so that more to send starts the clock too.
    waker: AtomicWaker,
    /// Whether the body's request yields (an event stream): its wait is counted as that.
    request: Arc<RequestYields>,
}

impl Progress {
    fn now_ms(&self) -> u64 {
        self.opened.elapsed().as_millis() as u64
    }

    /// Waiting for hyper to ask for more, or to write out what it was handed.
    fn wait_from_now(&self) {
        let now = self.now_ms();
        if self.waiting_since.swap(now, Ordering::AcqRel) == UNSET {
            self.untaken.began_waiting(now);
        }
    }

    /// Hyper asks for more: it has sent what this body handed out before, or asks for the first
    /// frame (which it does before the client has room for it).
    fn asked(&self) {
        if self.waiting_since.swap(UNSET, Ordering::AcqRel) != UNSET {
            self.untaken.stopped_waiting();
        }
    }

    /// The body is gone (finished, or dropped with a stream the client reset).
    fn gone(&self) {
        if !matches!(
            self.waiting_since.swap(GONE, Ordering::AcqRel),
            UNSET | GONE
        ) {
            self.untaken.stopped_waiting();
        }
    }

    /// Since when this body has waited, or, if earlier, since when its connection's answers have
    /// waited together; `UNSET` when it is not waiting.
    fn waited_since(&self) -> u64 {
        match self.waiting_since.load(Ordering::Acquire) {
            UNSET | GONE => UNSET,
            since => since.min(self.untaken.since.load(Ordering::Acquire)),
        }
    }
}

impl Wake for Progress {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        // The body has more to give from now; hyper asks at once if the client takes it.
        let now = self.now_ms();
        let began =
            self.waiting_since
                .compare_exchange(UNSET, now, Ordering::AcqRel, Ordering::Acquire);
        if began.is_ok() {
            self.untaken.began_waiting(now);
        }
        self.waker.wake();
    }
}

/// A response body that keeps its request counted as in flight until it is finished or dropped, and
/// reports its progress to the connection's [`Responses`].
pub(super) struct TrackedBody {
    inner: axum::body::Body,
    /// What is left of a data frame being handed out in pieces (HTTP/2 only).
    rest: Option<Bytes>,
    /// HTTP/2: frames go out in pieces, counted in the connection's outbox.
    http2: bool,
    progress: Arc<Progress>,
    waker: Waker,
    in_flight: InFlight,
}

impl Drop for TrackedBody {
    fn drop(&mut self) {
        self.progress.gone();
    }
}

impl TrackedBody {
    /// `http2`: hand large data frames out in pieces of [`SPLIT`], within the connection's outbox.
    pub(super) fn new(inner: axum::body::Body, in_flight: InFlight, http2: bool) -> TrackedBody {
        let state = &in_flight.conn;
        let progress = state.responses.track(in_flight.request.clone());
        TrackedBody {
            inner,
            rest: None,
            http2,
            waker: Waker::from(progress.clone()),
            progress,
            in_flight,
        }
    }

    /// The connection's outbox, on HTTP/2.
    fn outbox(&self) -> Option<&Arc<Outbox>> {
        self.http2.then_some(&self.in_flight.conn.outbox)
    }

    /// `data` as handed to hyper: on HTTP/2, counted in the connection's outbox while hyper holds it,
    /// and telling the connection when it is written out.
    fn hand(&self, data: Bytes) -> Sent {
        let data = match self.outbox() {
            Some(outbox) => outbox.hand(data),
            None => data,
        };
        Sent {
            data,
            untaken: self.progress.untaken.clone(),
        }
    }

    /// The next piece of `rest`, copied so that it keeps nothing else alive.
    fn next_piece(&mut self) -> Option<Bytes> {
        let rest = self.rest.as_mut()?;
        let piece = Bytes::copy_from_slice(&rest[..rest.len().min(SPLIT)]);
        rest.advance(piece.len());
        if rest.is_empty() {
            self.rest = None;
        }
        Some(piece)
    }
}

/// A data frame as hyper writes it out: the frame consumed whole for the socket tells the connection
/// that its client takes its answers ([`Untaken`]). Whole, not a byte: a client
/// that opens its window a byte at a time, now and then, has taken nothing worth a place at the cap
/// (a frame is at most [`SPLIT`], so a client reading at a few kB/s keeps its place).
#[derive(Debug)]
pub(super) struct Sent {
    data: Bytes,
    untaken: Arc<Untaken>,
}

impl Sent {
    #[cfg(test)]
    fn into_bytes(self) -> Bytes {
        self.data
    }
}

impl Buf for Sent {
    fn remaining(&self) -> usize {
        self.data.remaining()
    }

    fn chunk(&self) -> &[u8] {
        self.data.chunk()
    }

    fn advance(&mut self, count: usize) {
        self.data.advance(count);
        if count > 0 && !self.data.has_remaining() {
            self.untaken.frame_taken();
        }
    }

    fn copy_to_bytes(&mut self, count: usize) -> Bytes {
        // Bytes' own: a slice, not a copy.
        let taken = self.data.copy_to_bytes(count);
        if count > 0 && !self.data.has_remaining() {
            self.untaken.frame_taken();
        }
        taken
    }
}

impl http_body::Body for TrackedBody {
    type Data = Sent;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        this.progress.asked();
        if let Some(outbox) = this.outbox() {
            if outbox.poll_room(cx).is_pending() {
                // Waiting for the client to take what hyper holds for this connection.
                this.progress.wait_from_now();
                return Poll::Pending;
            }
        }
        if let Some(piece) = this.next_piece() {
            this.progress.wait_from_now();
            return Poll::Ready(Some(Ok(http_body::Frame::data(this.hand(piece)))));
        }
        this.progress.waker.register(cx.waker());
        let mut inner_cx = Context::from_waker(&this.waker);
        match Pin::new(&mut this.inner).poll_frame(&mut inner_cx) {
            Poll::Ready(Some(Ok(frame))) => {
                let frame = match frame.into_data() {
                    Ok(data) if this.http2 && data.len() > SPLIT => {
                        this.rest = Some(data);
                        let piece = this.next_piece().expect("a frame larger than a piece");
                        http_body::Frame::data(this.hand(piece))
                    }
                    Ok(data) => http_body::Frame::data(this.hand(data)),
                    Err(other) => other.map_data(|data| this.hand(data)),
                };
                this.progress.wait_from_now();
                Poll::Ready(Some(Ok(frame)))
            }
            // The end, or an error: nothing more to wait for.
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.rest.is_none() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        let rest = self.rest.as_ref().map_or(0, |r| r.len() as u64);
        let inner = self.inner.size_hint();
        let mut hint = http_body::SizeHint::new();
        hint.set_lower(inner.lower() + rest);
        if let Some(upper) = inner.upper() {
            hint.set_upper(upper + rest);
        }
        hint
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU32;

    use http_body_util::BodyExt as _;

    use super::*;
    use crate::listener::ConnState;

    fn body(inner: axum::body::Body, http2: bool) -> (TrackedBody, Arc<ConnState>) {
        let state = Arc::new(ConnState::new());
        let in_flight = InFlight::begin(state.clone());
        (TrackedBody::new(inner, in_flight, http2), state)
    }

    #[tokio::test]
    async fn a_large_frame_is_handed_out_in_pieces_that_add_up_to_it() {
        let whole: Vec<u8> = (0..(3 * SPLIT + 5)).map(|i| i as u8).collect();
        let (mut tracked, _state) = body(axum::body::Body::from(whole.clone()), true);
        assert_eq!(
            http_body::Body::size_hint(&tracked).exact(),
            Some(whole.len() as u64)
        );
        let mut pieces = Vec::new();
        while let Some(frame) = tracked.frame().await {
            let data = frame.unwrap().into_data().unwrap().into_bytes();
            assert!(data.len() <= SPLIT);
            pieces.push(data);
            let left: usize = whole.len() - pieces.iter().map(|p| p.len()).sum::<usize>();
            assert_eq!(
                http_body::Body::size_hint(&tracked).exact(),
                Some(left as u64)
            );
        }
        assert_eq!(pieces.len(), 4);
        assert_eq!(pieces.concat(), whole);
        assert!(http_body::Body::is_end_stream(&tracked));
        // Over HTTP/1, frames go out as they are.
        let (mut tracked, _state) = body(axum::body::Body::from(whole.clone()), false);
        let frame = tracked.frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap().remaining(), whole.len());
    }

    #[tokio::test]
    async fn a_body_waits_from_each_frame_it_hands_out_until_it_is_asked_again() {
        let (tx, rx) = futures::channel::mpsc::unbounded::<Result<Bytes, std::io::Error>>();
        let (mut tracked, state) = body(axum::body::Body::from_stream(rx), true);
        // Waiting from the start: hyper has not asked yet.
        assert!(state.responses.longest_wait().is_some());
        // Asked, with nothing to give: not waiting.
        let woken = Arc::new(AtomicU32::new(0));
        let waker = Waker::from(Arc::new(CountingWaker(woken.clone())));
        let mut cx = Context::from_waker(&waker);
        assert!(http_body::Body::poll_frame(Pin::new(&mut tracked), &mut cx).is_pending());
        assert_eq!(state.responses.longest_wait(), None);
        // More to give: waiting again, and hyper is woken.
        tx.unbounded_send(Ok(Bytes::from_static(b"event"))).unwrap();
        assert!(state.responses.longest_wait().is_some());
        assert_eq!(woken.load(Ordering::Relaxed), 1);
        // Handed out: still waiting, for the next ask.
        assert!(http_body::Body::poll_frame(Pin::new(&mut tracked), &mut cx).is_ready());
        assert!(state.responses.longest_wait().is_some());
        drop(tracked);
        assert_eq!(
            state.responses.longest_wait(),
            None,
            "a finished body is forgotten"
        );
    }

    struct CountingWaker(Arc<AtomicU32>);

    impl Wake for CountingWaker {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }
}

//! Server-sent events (§12.3 `GET /sessions/{id}/events/stream`): a decoder for the `text/event-stream`
//! format and the [`EventStream`] the client returns.
//!
//! The decoder follows the WHATWG rules that matter here: lines end in CR, LF or CRLF (also when the
//! pair is split across network reads), `:` starts a comment (the server's keep-alive), `data` lines
//! of one event are joined with `\n`, a blank line dispatches, and an unterminated event at the end of
//! the stream is dropped.

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures::Stream;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Error, Result};
use crate::types::Event;

/// One decoded server-sent event whose data is JSON.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SseEvent {
    /// The `id:` field of this event (an `evt_…` id on Tether's stream).
    pub id: Option<String>,
    /// The `event:` field (the event's `type` on Tether's stream); `message` when absent.
    pub event: String,
    /// The `data:` payload, parsed as JSON.
    pub data: Value,
}

impl SseEvent {
    /// The payload as a session [`Event`].
    pub fn into_event(self) -> Result<Event> {
        serde_json::from_value(self.data)
            .map_err(|e| Error::Stream(format!("the event's data is not a session event: {e}")))
    }
}

/// An event as it appears on the wire, before its data is parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct RawEvent {
    pub id: Option<String>,
    pub event: String,
    pub data: String,
}

/// Most bytes one event may take on the wire (its lines together, the line being read included):
/// far above any event of this API (the server's own limit is 1 MiB by default), and a bound on
/// the decoder's memory whatever a server sends.
pub const MAX_EVENT_BYTES: usize = 16 << 20;

/// Incremental `text/event-stream` decoder: feed it bytes as they arrive, collect complete events.
#[derive(Debug, Default)]
pub(crate) struct SseDecoder {
    buffer: Vec<u8>,
    /// How much of `buffer` is known to hold no line end: each byte is looked at once.
    scanned: usize,
    /// Bytes of the event under way, its complete lines.
    event_bytes: usize,
    started: bool,
    /// A CR ended the previous line; an LF at the start of the next chunk belongs to it.
    after_cr: bool,
    id: Option<String>,
    event: Option<String>,
    data: String,
    has_data: bool,
}

impl SseDecoder {
    /// Decodes `chunk`, appending every event it completes to `out`. Refuses an event longer than
    /// [`MAX_EVENT_BYTES`].
    pub fn feed(&mut self, chunk: &[u8], out: &mut VecDeque<RawEvent>) -> Result<(), String> {
        let mut chunk = chunk;
        if self.after_cr && !chunk.is_empty() {
            self.after_cr = false;
            if chunk[0] == b'\n' {
                chunk = &chunk[1..];
            }
        }
        self.buffer.extend_from_slice(chunk);
        if !self.started {
            if self.buffer.len() < 3 && b"\xEF\xBB\xBF".starts_with(&self.buffer) {
                return Ok(());
            }
            self.started = true;
            if self.buffer.starts_with(b"\xEF\xBB\xBF") {
                self.buffer.drain(..3);
            }
        }
        let mut start = 0;
        let mut i = self.scanned;
        while i < self.buffer.len() {
            match self.buffer[i] {
                b'\n' => {
                    let line = self.buffer[start..i].to_vec();
                    self.event_bytes += i + 1 - start;
                    self.line(&line, out);
                    i += 1;
                    start = i;
                }
                b'\r' => {
                    let line = self.buffer[start..i].to_vec();
                    self.event_bytes += i + 1 - start;
                    self.line(&line, out);
                    i += 1;
                    if i < self.buffer.len() {
                        if self.buffer[i] == b'\n' {
                            i += 1;
                        }
                    } else {
                        self.after_cr = true;
                    }
                    start = i;
                }
                _ => i += 1,
            }
        }
        self.buffer.drain(..start);
        self.scanned = self.buffer.len();
        if self.event_bytes + self.buffer.len() > MAX_EVENT_BYTES {
            return Err(format!(
                "an event longer than {MAX_EVENT_BYTES} bytes (or a line that does not end)"
            ));
        }
        Ok(())
    }

    fn line(&mut self, line: &[u8], out: &mut VecDeque<RawEvent>) {
        if line.is_empty() {
            self.dispatch(out);
            return;
        }
        if line[0] == b':' {
            return;
        }
        let line = String::from_utf8_lossy(line);
        let (field, value) = match line.split_once(':') {
            Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
            None => (line.as_ref(), ""),
        };
        match field {
            "event" => self.event = Some(value.to_owned()),
            "data" => {
                if self.has_data {
                    self.data.push('\n');
                }
                self.data.push_str(value);
                self.has_data = true;
            }
            "id" if !value.contains('\0') => self.id = Some(value.to_owned()),
            _ => {}
        }
    }

    fn dispatch(&mut self, out: &mut VecDeque<RawEvent>) {
        self.event_bytes = 0;
        let event = self.event.take();
        let id = self.id.take();
        if !self.has_data {
            return;
        }
        self.has_data = false;
        out.push_back(RawEvent {
            id,
            event: event
                .filter(|e| !e.is_empty())
                .unwrap_or_else(|| "message".to_owned()),
            data: std::mem::take(&mut self.data),
        });
    }
}

type ByteStream = Pin<Box<dyn Stream<Item = reqwest::Result<Bytes>> + Send>>;

/// A live session event stream: yields each event as it arrives, and ends when the server closes the
/// stream (after `session.status_terminated`, or when the session is deleted).
///
/// To resume after a dropped connection, open a new stream with [`EventStream::last_event_id`]: the
/// server replays every event after it.
pub struct EventStream {
    body: ByteStream,
    url: String,
    decoder: SseDecoder,
    ready: VecDeque<RawEvent>,
    last_event_id: Option<String>,
    done: bool,
}

impl EventStream {
    pub(crate) fn new(
        response: reqwest::Response,
        url: String,
        resumed_from: Option<String>,
    ) -> Self {
        EventStream {
            body: Box::pin(response.bytes_stream()),
            url,
            decoder: SseDecoder::default(),
            ready: VecDeque::new(),
            last_event_id: resumed_from,
            done: false,
        }
    }

    /// The id of the newest event received (or the one the stream was resumed from).
    pub fn last_event_id(&self) -> Option<&str> {
        self.last_event_id.as_deref()
    }

    fn next_ready(&mut self) -> Option<Result<SseEvent>> {
        let raw = self.ready.pop_front()?;
        if let Some(id) = &raw.id {
            self.last_event_id = Some(id.clone());
        }
        Some(
            serde_json::from_str(&raw.data)
                .map(|data| SseEvent {
                    id: raw.id,
                    event: raw.event.clone(),
                    data,
                })
                .map_err(|e| {
                    Error::Stream(format!(
                        "the data of a {:?} event is not JSON: {e}",
                        raw.event
                    ))
                }),
        )
    }
}

impl Stream for EventStream {
    type Item = Result<SseEvent>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if let Some(event) = this.next_ready() {
                return Poll::Ready(Some(event));
            }
            if this.done {
                return Poll::Ready(None);
            }
            match this.body.as_mut().poll_next(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => this.done = true,
                Poll::Ready(Some(Ok(chunk))) => {
                    if let Err(why) = this.decoder.feed(&chunk, &mut this.ready) {
                        this.done = true;
                        return Poll::Ready(Some(Err(Error::Stream(why))));
                    }
                }
                Poll::Ready(Some(Err(e))) => {
                    this.done = true;
                    return Poll::Ready(Some(Err(Error::transport(&this.url, e))));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(chunks: &[&[u8]]) -> Vec<RawEvent> {
        let mut decoder = SseDecoder::default();
        let mut out = VecDeque::new();
        for chunk in chunks {
            decoder.feed(chunk, &mut out).unwrap();
        }
        out.into_iter().collect()
    }

    fn raw(id: Option<&str>, event: &str, data: &str) -> RawEvent {
        RawEvent {
            id: id.map(str::to_owned),
            event: event.to_owned(),
            data: data.to_owned(),
        }
    }

    #[test]
    fn an_event_or_a_line_past_the_bound_is_refused() {
        let mut decoder = SseDecoder::default();
        let mut out = VecDeque::new();
        // Events right up to the bound pass, one after another.
        let line = format!("data: {}\n", "x".repeat(MAX_EVENT_BYTES / 2));
        for _ in 0..3 {
            decoder.feed(line.as_bytes(), &mut out).unwrap();
            decoder.feed(b"\n", &mut out).unwrap();
        }
        assert_eq!(out.len(), 3);
        // A line that does not end, fed in pieces.
        let piece = vec![b'y'; 1 << 20];
        let fed = (0..20)
            .map(|_| decoder.feed(&piece, &mut out))
            .find(|r| r.is_err());
        assert!(fed.is_some(), "refused before 20 MiB");
        // Lines that never end their event.
        let mut decoder = SseDecoder::default();
        let line = format!("data: {}\n", "z".repeat(1 << 20));
        let fed = (0..20)
            .map(|_| decoder.feed(line.as_bytes(), &mut out))
            .find(|r| r.is_err());
        assert!(fed.is_some(), "refused before 20 MiB");
    }

    #[test]
    fn decodes_events_comments_and_multiline_data() {
        let events = decode(&[
            b": keep-alive\n\nid: evt_1\nevent: user.message\ndata: {\"a\":1}\n\n",
            b"data: line one\ndata:line two\n\n",
        ]);
        assert_eq!(
            events,
            vec![
                raw(Some("evt_1"), "user.message", "{\"a\":1}"),
                raw(None, "message", "line one\nline two"),
            ]
        );
    }

    #[test]
    fn lines_may_end_in_cr_lf_or_crlf_even_across_chunks() {
        let events = decode(&[
            b"id: a\r",
            b"\ndata: 1\r\r",
            b"data: 2\n",
            b"\n",
            b"data: 3\r\n\r\n",
        ]);
        assert_eq!(
            events,
            vec![
                raw(Some("a"), "message", "1"),
                raw(None, "message", "2"),
                raw(None, "message", "3")
            ]
        );
    }

    #[test]
    fn bytes_may_arrive_one_at_a_time() {
        let text = "\u{feff}id: evt_9\nevent: x\ndata: {\"k\": \"v\"}\n\n";
        let chunks: Vec<&[u8]> = text.as_bytes().chunks(1).collect();
        assert_eq!(
            decode(&chunks),
            vec![raw(Some("evt_9"), "x", "{\"k\": \"v\"}")]
        );
    }

    #[test]
    fn an_unterminated_event_is_dropped_and_empty_events_are_skipped() {
        assert_eq!(decode(&[b"event: a\n\nid: 1\ndata: x"]), vec![]);
    }
}

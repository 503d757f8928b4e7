//! Session events for people: one line per event (time, type, the readable part), colours only on a
//! terminal; and following a session's live stream across dropped connections.

use std::io::IsTerminal;
use std::time::Duration;

use super::output;
use anyhow::Result;
use futures::StreamExt;
use serde_json::{Map, Value};
use tether_client::{event_type, Client, Event, ListEvents, ListParams, Order, SessionStatus};
use tether_worker::backoff::Backoff;

/// A well-formed event id that sorts before every real one. The server reads a resume point that names
/// no event by its position, so resuming "after" it replays the whole log.
pub const BEFORE_FIRST_EVENT: &str = "evt_00000000000000000000000000000000";

/// Width of the type column; longer types push the detail one space further.
const TYPE_WIDTH: usize = 20;

/// Turns events into lines of text.
#[derive(Clone, Copy, Debug)]
pub struct Renderer {
    color: bool,
}

/// How a piece of a line is coloured.
#[derive(Clone, Copy)]
enum Tone {
    Plain,
    Dim,
    User,
    Agent,
    Tool,
    Server,
    Error,
}

impl Tone {
    fn code(self) -> &'static str {
        match self {
            Tone::Plain => "",
            Tone::Dim => "\x1b[2m",
            Tone::User => "\x1b[1;36m",
            Tone::Agent => "\x1b[32m",
            Tone::Tool => "\x1b[33m",
            Tone::Server => "\x1b[35m",
            Tone::Error => "\x1b[1;31m",
        }
    }
}

impl Renderer {
    /// Colours when standard output is a terminal that wants them (`NO_COLOR` and `TERM=dumb` opt out),
    /// so that pipes and files get plain text.
    pub fn for_stdout() -> Renderer {
        let no_color = matches!(std::env::var_os("NO_COLOR"), Some(v) if !v.is_empty());
        let dumb = matches!(std::env::var_os("TERM"), Some(t) if t == "dumb");
        Renderer {
            color: !no_color && !dumb && std::io::stdout().is_terminal(),
        }
    }

    fn paint(&self, tone: Tone, text: &str) -> String {
        if !self.color || matches!(tone, Tone::Plain) || text.is_empty() {
            return text.to_owned();
        }
        format!("{}{text}\x1b[0m", tone.code())
    }

    /// `HH:MM:SS  type  detail`, with further lines of a multi-line detail indented under the first;
    /// ends in a newline.
    pub fn render(&self, event: &Event) -> String {
        let (detail, detail_tone) = detail(event);
        let kind_tone = kind_tone(&event.kind);
        // Every part comes from the server: none is printed as it came (see `clean`).
        let kind = clean(&event.kind);
        let time = clean(&clock(event.processed_at.as_deref()));
        let pad = TYPE_WIDTH.saturating_sub(kind.chars().count()).max(1);
        let indent = " ".repeat(time.chars().count() + 2 + kind.chars().count() + pad);
        let mut out = format!(
            "{}  {}{}",
            self.paint(Tone::Dim, &time),
            self.paint(kind_tone, &kind),
            " ".repeat(pad)
        );
        let mut lines = detail.split('\n');
        out.push_str(&self.paint(detail_tone, lines.next().unwrap_or("")));
        for line in lines {
            out.push('\n');
            out.push_str(&indent);
            out.push_str(&self.paint(detail_tone, line));
        }
        let trimmed = out.trim_end_matches(' ').len();
        out.truncate(trimmed);
        out.push('\n');
        out
    }
}

fn kind_tone(kind: &str) -> Tone {
    match kind {
        event_type::SESSION_ERROR => Tone::Error,
        event_type::AGENT_TOOL_USE | event_type::AGENT_CUSTOM_TOOL_USE => Tone::Tool,
        k if k.starts_with("user.") => Tone::User,
        k if k.starts_with("agent.") => Tone::Agent,
        _ => Tone::Server,
    }
}

/// The time of day (UTC) of an RFC 3339 instant, or `--:--:--`.
fn clock(processed_at: Option<&str>) -> String {
    processed_at
        .and_then(|t| t.split_once('T'))
        .map(|(_, time)| time.get(..8).unwrap_or(time).to_owned())
        .unwrap_or_else(|| "--:--:--".to_owned())
}

/// The readable part of an event and how to colour it.
fn detail(event: &Event) -> (String, Tone) {
    let fields = &event.fields;
    let text = match event.kind.as_str() {
        event_type::USER_MESSAGE | event_type::AGENT_MESSAGE | event_type::AGENT_THINKING => {
            content_text(fields.get("content")).unwrap_or_default()
        }
        event_type::AGENT_TOOL_USE | event_type::AGENT_CUSTOM_TOOL_USE => {
            let name = fields.get("name").and_then(Value::as_str).unwrap_or("?");
            let input = fields.get("input").cloned().unwrap_or(Value::Null);
            match input.get("command").and_then(Value::as_str) {
                Some(command) => format!("{name}: {command}"),
                None => format!("{name} {input}"),
            }
        }
        event_type::AGENT_TOOL_RESULT
        | event_type::USER_TOOL_RESULT
        | event_type::USER_CUSTOM_TOOL_RESULT => {
            let output = content_text(fields.get("content")).unwrap_or_default();
            let output = output.trim_end_matches('\n');
            if fields.get("is_error").and_then(Value::as_bool) == Some(true) {
                return (format!("[error] {}", clean(output)), Tone::Error);
            }
            output.to_owned()
        }
        event_type::SESSION_STATUS_IDLE => {
            let reason = fields
                .get("stop_reason")
                .and_then(|r| r.get("type"))
                .and_then(Value::as_str)
                .unwrap_or("");
            // The contract's name for any turn that ended in an error, whether or not anything
            // was retried (the SDKs read it so): said plainly beside it.
            match reason {
                "retries_exhausted" => "retries_exhausted (the turn ended in an error)".to_owned(),
                reason => reason.to_owned(),
            }
        }
        event_type::SESSION_ERROR => {
            let error = fields.get("error");
            let kind = error
                .and_then(|e| e.get("type"))
                .and_then(Value::as_str)
                .unwrap_or("error");
            let message = error
                .and_then(|e| e.get("message"))
                .and_then(Value::as_str)
                .unwrap_or("");
            // `unknown_error` is the contract's type for every error it has no other type for: a
            // program that failed, a stopped item. Its message says what happened.
            let text = match kind {
                "unknown_error" if !message.is_empty() => message.to_owned(),
                kind => format!("{kind}: {message}"),
            };
            return (clean(&text), Tone::Error);
        }
        event_type::USER_TOOL_CONFIRMATION => format!(
            "{} {}",
            fields.get("result").and_then(Value::as_str).unwrap_or("?"),
            fields
                .get("tool_use_id")
                .and_then(Value::as_str)
                .unwrap_or("?")
        ),
        event_type::USER_INTERRUPT
        | event_type::SESSION_STATUS_RUNNING
        | event_type::SESSION_STATUS_RESCHEDULED
        | event_type::SESSION_STATUS_TERMINATED
        | event_type::SESSION_DELETED => String::new(),
        _ => {
            let rest: Map<String, Value> = fields
                .iter()
                .filter(|(k, _)| k.as_str() != "processed_at")
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            if rest.is_empty() {
                String::new()
            } else {
                Value::Object(rest).to_string()
            }
        }
    };
    (clean(text.trim_end_matches('\n')), Tone::Plain)
}

/// The text of `content`: a string, or the text blocks of an array joined.
fn content_text(content: Option<&Value>) -> Option<String> {
    match content? {
        Value::String(s) => Some(s.clone()),
        Value::Array(blocks) => {
            let texts: Vec<&str> = blocks
                .iter()
                .filter(|b| b.get("type").and_then(Value::as_str) == Some("text"))
                .filter_map(|b| b.get("text").and_then(Value::as_str))
                .collect();
            Some(texts.join(""))
        }
        _ => None,
    }
}

/// Event text, fit for a terminal ([`output::printable`]); its line breaks and tabs stay.
fn clean(text: &str) -> String {
    output::printable(&text.replace("\r\n", "\n"), &['\n', '\t'])
}

/// Why following a stream ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Ending {
    /// The session was deleted.
    Deleted,
    /// The session was terminated.
    Terminated,
    /// The caller asked to stop.
    Done,
}

/// The id of the newest event of a session, or [`BEFORE_FIRST_EVENT`] when it has none: a resume point
/// from which a stream shows only what comes next, and loses nothing written before it connects.
pub async fn newest_event(client: &Client, session_id: &str) -> tether_client::Result<String> {
    let params = ListEvents {
        list: ListParams::limit(1),
        order: Some(Order::Desc),
    };
    let page = client.list_events(session_id, &params).await?;
    Ok(page
        .data
        .into_iter()
        .next()
        .map_or_else(|| BEFORE_FIRST_EVENT.to_owned(), |e| e.id))
}

/// Follows a session's event stream from after `after`, handing each event to `on_event` until it
/// returns `false` or the session is deleted or terminated. A dropped connection (or a server restart)
/// is resumed with `Last-Event-ID`, so no event is lost or repeated; while the server cannot be
/// reached it retries with growing pauses, saying so once on standard error.
pub async fn follow(
    client: &Client,
    session_id: &str,
    mut after: String,
    mut on_event: impl FnMut(&Event) -> bool,
) -> Result<Ending> {
    // ½ s doubling to 10 s between reconnects, without jitter: one person is waiting, not a fleet.
    let mut pause = Backoff::new(
        Duration::from_millis(500),
        Duration::from_secs(10),
        Duration::ZERO,
    );
    let mut warned = false;
    loop {
        match client.stream_events(session_id, Some(&after)).await {
            Ok(mut stream) => {
                if warned {
                    eprintln!("(reconnected)");
                    warned = false;
                }
                pause.reset();
                while let Some(item) = stream.next().await {
                    let sse = match item {
                        Ok(sse) => sse,
                        Err(e) => {
                            eprintln!("(the event stream broke: {e}; resuming)");
                            warned = true;
                            break;
                        }
                    };
                    let event = match sse.into_event() {
                        Ok(event) => event,
                        Err(e) => {
                            eprintln!("(skipping an event this version cannot read: {e})");
                            continue;
                        }
                    };
                    let kind = event.kind.as_str();
                    if kind == event_type::SESSION_DELETED {
                        on_event(&event);
                        return Ok(Ending::Deleted);
                    }
                    after = event.id.clone();
                    if !on_event(&event) {
                        return Ok(Ending::Done);
                    }
                    if kind == event_type::SESSION_STATUS_TERMINATED {
                        return Ok(Ending::Terminated);
                    }
                }
                // The server ends a stream for good only after a deletion or termination, which the
                // stream itself reports; otherwise it went away (a restart, a store failure). Ask which.
                match client.get_session(session_id).await {
                    Err(e) if e.is_not_found() => return Ok(Ending::Deleted),
                    Ok(s) if s.status == SessionStatus::Terminated => {
                        return Ok(Ending::Terminated)
                    }
                    _ => {}
                }
            }
            Err(e) if e.is_not_found() => return Ok(Ending::Deleted),
            Err(e) if e.is_retryable() => {
                if !warned {
                    eprintln!("(cannot reach the server: {e}; retrying)");
                    warned = true;
                }
            }
            Err(e) => return Err(e.into()),
        }
        tokio::time::sleep(pause.next_delay()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn event(value: Value) -> Event {
        serde_json::from_value(value).unwrap()
    }

    const PLAIN: Renderer = Renderer { color: false };

    #[test]
    fn one_line_per_event_with_time_type_and_text() {
        let cases = [
            (
                json!({"type": "user.message", "processed_at": "2026-07-01T08:15:01.123456Z",
                       "content": [{"type": "text", "text": "echo hello"}]}),
                "08:15:01  user.message        echo hello\n",
            ),
            (
                json!({"type": "agent.tool_use", "processed_at": "2026-07-01T08:15:02Z",
                       "name": "shell", "input": {"command": "ls"}}),
                "08:15:02  agent.tool_use      shell: ls\n",
            ),
            (
                json!({"type": "session.status_idle", "processed_at": "2026-07-01T08:15:03Z",
                       "stop_reason": {"type": "end_turn"}}),
                "08:15:03  session.status_idle end_turn\n",
            ),
            // The contract's names for any failed turn, said plainly.
            (
                json!({"type": "session.error", "processed_at": "2026-07-01T08:15:04Z",
                       "error": {"type": "unknown_error",
                                 "message": "the work item serving this turn stopped"}}),
                "08:15:04  session.error       the work item serving this turn stopped\n",
            ),
            (
                json!({"type": "session.error", "processed_at": "2026-07-01T08:15:04Z",
                       "error": {"type": "model_overloaded_error", "message": "busy"}}),
                "08:15:04  session.error       model_overloaded_error: busy\n",
            ),
            (
                json!({"type": "session.status_idle", "processed_at": "2026-07-01T08:15:05Z",
                       "stop_reason": {"type": "retries_exhausted"}}),
                "08:15:05  session.status_idle retries_exhausted (the turn ended in an error)\n",
            ),
            (
                json!({"type": "session.status_running"}),
                "--:--:--  session.status_running\n",
            ),
        ];
        for (i, (mut fields, line)) in cases.into_iter().enumerate() {
            fields["id"] = json!(format!("evt_{i}"));
            assert_eq!(PLAIN.render(&event(fields)), line);
        }
    }

    #[test]
    fn multi_line_output_is_indented_and_control_characters_escaped() {
        let e = event(json!({
            "id": "evt_1", "type": "agent.tool_result", "processed_at": "2026-07-01T08:15:01Z",
            "tool_use_id": "evt_0", "content": [{"type": "text", "text": "a\r\nb\x1b[2J\n"}],
            "is_error": false
        }));
        assert_eq!(
            PLAIN.render(&e),
            "08:15:01  agent.tool_result   a\n                              b\\u{1b}[2J\n"
        );
        let e = event(json!({
            "id": "evt_1", "type": "agent.tool_result", "processed_at": "2026-07-01T08:15:01Z",
            "tool_use_id": "evt_0", "content": "boom", "is_error": true
        }));
        assert_eq!(
            PLAIN.render(&e),
            "08:15:01  agent.tool_result   [error] boom\n"
        );
        // The type and the time come from the server too.
        let e = event(json!({
            "id": "evt_1", "type": "x\x1b]0;owned\x07", "processed_at": "2026-07-01T\x1b[5m:01Z"
        }));
        let line = PLAIN.render(&e);
        assert!(!line.contains('\x1b') && !line.contains('\x07'), "{line:?}");
    }

    #[test]
    fn colours_only_when_asked() {
        let e = event(
            json!({"id": "evt_1", "type": "session.error", "processed_at": "2026-07-01T08:15:01Z",
            "error": {"type": "work_stopped", "message": "gone"}}),
        );
        let coloured = Renderer { color: true }.render(&e);
        assert!(
            coloured.contains("\x1b[1;31mwork_stopped: gone\x1b[0m"),
            "{coloured:?}"
        );
        assert!(!PLAIN.render(&e).contains('\x1b'));
    }
}

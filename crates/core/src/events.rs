//! Session events (§12.3) as pure rules: which types exist, who may send which, the shape each type must
//! have, and what an accepted event does to its session's turn (§12.4).
//!
//! Shapes are checked field by field so that a refusal can name the offending field in `param` (§1.7).
//! Fields a type does not define are kept as given (D-17): an event log is worth more complete than tidy.

use serde_json::{Map, Value};
use tether_api::event_type as name;

use crate::ids::{self, IdKind};
use crate::session::{self, IdleReason, InputDecision, QueueEffect, ServerEvent, SessionStatus};
use crate::work::WorkState;

/// The most events one `POST /sessions/{id}/events` may carry (§12.3).
pub const MAX_EVENTS_PER_BATCH: usize = 100;

/// Who produces an event type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    User,
    Agent,
    /// Written by the server only; never accepted on input.
    Server,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EventType {
    UserMessage,
    UserInterrupt,
    UserToolConfirmation,
    UserToolResult,
    UserCustomToolResult,
    UserDefineOutcome,
    AgentMessage,
    AgentThinking,
    AgentToolUse,
    AgentCustomToolUse,
    AgentToolResult,
    SessionStatusIdle,
    SessionError,
    SessionStatusRunning,
    SessionStatusRescheduled,
    SessionStatusTerminated,
    SessionDeleted,
}

impl EventType {
    pub const ALL: [EventType; 17] = [
        EventType::UserMessage,
        EventType::UserInterrupt,
        EventType::UserToolConfirmation,
        EventType::UserToolResult,
        EventType::UserCustomToolResult,
        EventType::UserDefineOutcome,
        EventType::AgentMessage,
        EventType::AgentThinking,
        EventType::AgentToolUse,
        EventType::AgentCustomToolUse,
        EventType::AgentToolResult,
        EventType::SessionStatusIdle,
        EventType::SessionError,
        EventType::SessionStatusRunning,
        EventType::SessionStatusRescheduled,
        EventType::SessionStatusTerminated,
        EventType::SessionDeleted,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            EventType::UserMessage => name::USER_MESSAGE,
            EventType::UserInterrupt => name::USER_INTERRUPT,
            EventType::UserToolConfirmation => name::USER_TOOL_CONFIRMATION,
            EventType::UserToolResult => name::USER_TOOL_RESULT,
            EventType::UserCustomToolResult => name::USER_CUSTOM_TOOL_RESULT,
            EventType::UserDefineOutcome => name::USER_DEFINE_OUTCOME,
            EventType::AgentMessage => name::AGENT_MESSAGE,
            EventType::AgentThinking => name::AGENT_THINKING,
            EventType::AgentToolUse => name::AGENT_TOOL_USE,
            EventType::AgentCustomToolUse => name::AGENT_CUSTOM_TOOL_USE,
            EventType::AgentToolResult => name::AGENT_TOOL_RESULT,
            EventType::SessionStatusIdle => name::SESSION_STATUS_IDLE,
            EventType::SessionError => name::SESSION_ERROR,
            EventType::SessionStatusRunning => name::SESSION_STATUS_RUNNING,
            EventType::SessionStatusRescheduled => name::SESSION_STATUS_RESCHEDULED,
            EventType::SessionStatusTerminated => name::SESSION_STATUS_TERMINATED,
            EventType::SessionDeleted => name::SESSION_DELETED,
        }
    }

    pub fn parse(text: &str) -> Option<EventType> {
        EventType::ALL.into_iter().find(|t| t.as_str() == text)
    }

    /// §12.3 sorts `session.status_idle` and `session.error` with the agent side: the agent's runtime
    /// reports them.
    pub const fn side(self) -> Side {
        use EventType::*;
        match self {
            UserMessage | UserInterrupt | UserToolConfirmation | UserToolResult
            | UserCustomToolResult | UserDefineOutcome => Side::User,
            AgentMessage | AgentThinking | AgentToolUse | AgentCustomToolUse | AgentToolResult
            | SessionStatusIdle | SessionError => Side::Agent,
            SessionStatusRunning
            | SessionStatusRescheduled
            | SessionStatusTerminated
            | SessionDeleted => Side::Server,
        }
    }

    /// Input that needs a worker to act on it: it enqueues work for a session without a live item
    /// (§7.2, D-12b).
    pub const fn is_runnable_input(self) -> bool {
        matches!(self, EventType::UserMessage | EventType::UserDefineOutcome)
    }

    /// For a tool result: the field naming the tool call, and the type that call's event must have.
    pub const fn tool_reference(self) -> Option<(&'static str, EventType)> {
        match self {
            EventType::UserToolResult | EventType::AgentToolResult => {
                Some(("tool_use_id", EventType::AgentToolUse))
            }
            EventType::UserCustomToolResult => {
                Some(("custom_tool_use_id", EventType::AgentCustomToolUse))
            }
            _ => None,
        }
    }
}

/// The two kinds of sender §12.3 distinguishes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sender {
    /// An admin token: the operator, or a platform-side agent runtime.
    Admin,
    /// An environment key of the session's environment, or the session token of its live item.
    Worker,
}

/// Who may send what (§12.3): an admin every postable type; a worker the agent side and the tool results
/// a sandbox returns. Server-written types are nobody's to send.
pub fn may_send(sender: Sender, kind: EventType) -> bool {
    match (sender, kind.side()) {
        (_, Side::Server) => false,
        (Sender::Admin, _) => true,
        (Sender::Worker, Side::Agent) => true,
        (Sender::Worker, Side::User) => matches!(
            kind,
            EventType::UserToolResult | EventType::UserCustomToolResult
        ),
    }
}

/// A refused event shape: `param` names the offending field, e.g. `events[2].content[0].text`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ShapeError {
    pub param: String,
    pub message: String,
}

fn shape_error(param: impl Into<String>, message: impl Into<String>) -> ShapeError {
    ShapeError {
        param: param.into(),
        message: message.into(),
    }
}

/// The type of one incoming event; `at` names the event (`events[0]`). Unknown types and the types only the
/// server writes are refused here.
pub fn event_type(at: &str, event: &Value) -> Result<EventType, ShapeError> {
    let Value::Object(map) = event else {
        return Err(shape_error(at, format!("{at} must be an object")));
    };
    let param = format!("{at}.type");
    let text = match map.get("type") {
        Some(Value::String(t)) => t,
        None | Some(Value::Null) => {
            return Err(shape_error(param, format!("{at}.type is required")))
        }
        Some(_) => return Err(shape_error(param, format!("{at}.type must be a string"))),
    };
    match EventType::parse(text) {
        Some(kind) if kind.side() == Side::Server => Err(shape_error(
            param,
            format!("{text} events are written by the server only"),
        )),
        Some(kind) => Ok(kind),
        None => Err(shape_error(param, format!("unknown event type {text:?}"))),
    }
}

/// Checks the fields of an event of type `kind` (§12.3).
pub fn validate(at: &str, kind: EventType, event: &Value) -> Result<(), ShapeError> {
    let Value::Object(map) = event else {
        return Err(shape_error(at, format!("{at} must be an object")));
    };
    let f = Fields { at, map };
    match kind {
        EventType::UserMessage | EventType::AgentMessage => f.blocks("content", true),
        EventType::UserInterrupt | EventType::UserDefineOutcome => Ok(()),
        EventType::UserToolConfirmation => {
            f.string("tool_use_id", true)?;
            f.one_of("result", &["allow", "deny"])?;
            f.string("deny_message", false)
        }
        EventType::UserToolResult
        | EventType::UserCustomToolResult
        | EventType::AgentToolResult => {
            let (field, _) = kind.tool_reference().expect("a tool result names its call");
            f.string(field, true)?;
            f.result_content()?;
            f.boolean("is_error")
        }
        EventType::AgentThinking => match map.get("content") {
            None | Some(Value::Null | Value::String(_)) => Ok(()),
            Some(_) => f.blocks("content", false),
        },
        EventType::AgentToolUse | EventType::AgentCustomToolUse => {
            f.non_empty_string("name")?;
            match map.get("input") {
                Some(Value::Object(_)) => Ok(()),
                None | Some(Value::Null) => Err(f.error("input", "is required (an object)")),
                Some(_) => Err(f.error("input", "must be an object")),
            }
        }
        EventType::SessionStatusIdle => f.stop_reason(),
        EventType::SessionError => f.error_object(),
        EventType::SessionStatusRunning
        | EventType::SessionStatusRescheduled
        | EventType::SessionStatusTerminated
        | EventType::SessionDeleted => Err(shape_error(
            format!("{at}.type"),
            format!("{} events are written by the server only", kind.as_str()),
        )),
    }
}

/// `session.status_idle.stop_reason.type`: §12.3 lists the first three; the official SDKs model the rest.
pub const STOP_REASONS: [&str; 6] = [
    "end_turn",
    "requires_action",
    "error",
    "retries_exhausted",
    "budget_reached",
    "refusal",
];

struct Fields<'a> {
    at: &'a str,
    map: &'a Map<String, Value>,
}

impl Fields<'_> {
    fn param(&self, field: &str) -> String {
        format!("{}.{field}", self.at)
    }

    fn error(&self, field: &str, what: &str) -> ShapeError {
        let param = self.param(field);
        shape_error(param.clone(), format!("{param} {what}"))
    }

    fn string(&self, field: &str, required: bool) -> Result<(), ShapeError> {
        match self.map.get(field) {
            Some(Value::String(_)) => Ok(()),
            None | Some(Value::Null) if !required => Ok(()),
            None | Some(Value::Null) => Err(self.error(field, "is required (a string)")),
            Some(_) => Err(self.error(field, "must be a string")),
        }
    }

    fn non_empty_string(&self, field: &str) -> Result<(), ShapeError> {
        self.string(field, true)?;
        match self.map.get(field) {
            Some(Value::String(s)) if s.trim().is_empty() => {
                Err(self.error(field, "must not be empty"))
            }
            _ => Ok(()),
        }
    }

    fn boolean(&self, field: &str) -> Result<(), ShapeError> {
        match self.map.get(field) {
            None | Some(Value::Null | Value::Bool(_)) => Ok(()),
            Some(_) => Err(self.error(field, "must be a boolean")),
        }
    }

    fn one_of(&self, field: &str, allowed: &[&str]) -> Result<(), ShapeError> {
        match self.map.get(field) {
            Some(Value::String(s)) if allowed.contains(&s.as_str()) => Ok(()),
            _ => Err(self.error(field, &format!("must be one of {allowed:?}"))),
        }
    }

    /// An array of content blocks: objects with a string `type`; a `text` block carries a string `text`.
    fn blocks(&self, field: &str, required_non_empty: bool) -> Result<(), ShapeError> {
        let param = self.param(field);
        let blocks = match self.map.get(field) {
            Some(Value::Array(blocks)) => blocks,
            None | Some(Value::Null) if !required_non_empty => return Ok(()),
            None | Some(Value::Null) => {
                return Err(self.error(field, "is required (an array of content blocks)"))
            }
            Some(_) => return Err(self.error(field, "must be an array of content blocks")),
        };
        if required_non_empty && blocks.is_empty() {
            return Err(self.error(field, "must hold at least one content block"));
        }
        check_blocks(&param, blocks)
    }

    /// A tool result's `content`: a string, or an array of content blocks.
    fn result_content(&self) -> Result<(), ShapeError> {
        match self.map.get("content") {
            Some(Value::String(_)) => Ok(()),
            Some(Value::Array(blocks)) => check_blocks(&self.param("content"), blocks),
            None | Some(Value::Null) => Err(self.error(
                "content",
                "is required (a string or an array of content blocks)",
            )),
            Some(_) => Err(self.error("content", "must be a string or an array of content blocks")),
        }
    }

    /// The required object `field`, whose members are checked as fields of their own; `holds` says
    /// what it must hold when it is missing.
    fn object(&self, field: &str, holds: &str) -> Result<&Map<String, Value>, ShapeError> {
        match self.map.get(field) {
            Some(Value::Object(map)) => Ok(map),
            None | Some(Value::Null) => Err(self.error(field, &format!("is required ({holds})"))),
            Some(_) => Err(self.error(field, "must be an object")),
        }
    }

    fn stop_reason(&self) -> Result<(), ShapeError> {
        let at = self.param("stop_reason");
        let inner = Fields {
            at: &at,
            map: self.object("stop_reason", "{\"type\": …}")?,
        };
        inner.one_of("type", &STOP_REASONS)?;
        match inner.map.get("event_ids") {
            None | Some(Value::Null) => Ok(()),
            Some(Value::Array(ids)) if ids.iter().all(Value::is_string) => Ok(()),
            Some(_) => Err(inner.error("event_ids", "must be an array of event ids")),
        }
    }

    fn error_object(&self) -> Result<(), ShapeError> {
        let at = self.param("error");
        let inner = Fields {
            at: &at,
            map: self.object("error", "{\"type\", \"message\"}")?,
        };
        inner.string("type", true)?;
        inner.string("message", true)?;
        match inner.map.get("retry_status") {
            None | Some(Value::Null | Value::Object(_)) => Ok(()),
            Some(_) => Err(inner.error("retry_status", "must be an object")),
        }
    }
}

fn check_blocks(param: &str, blocks: &[Value]) -> Result<(), ShapeError> {
    for (i, block) in blocks.iter().enumerate() {
        let at = format!("{param}[{i}]");
        let Value::Object(map) = block else {
            return Err(shape_error(at.clone(), format!("{at} must be an object")));
        };
        let f = Fields { at: &at, map };
        f.non_empty_string("type")?;
        if map.get("type").and_then(Value::as_str) == Some("text") {
            f.string("text", true)?;
        }
    }
    Ok(())
}

/// Whether `id` could name an event at all; anything else names no tool call.
pub fn is_event_id(id: &str) -> bool {
    ids::is_well_formed(IdKind::Event, id)
}

/// What the turn rules need to know about a session while a batch of events is applied to it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TurnState {
    pub status: SessionStatus,
    pub archived: bool,
    pub self_hosted: bool,
    /// The state of the session's live work item, if it has one.
    pub live_item: Option<WorkState>,
    /// Input waits for the `stopping` item to stop (§7.3 rule 3).
    pub pending_input: bool,
}

/// Why an event was refused: every such refusal is a 409 (§12.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub reason: &'static str,
    /// Machine code (D-14).
    pub code: &'static str,
}

/// What accepting one event does besides storing it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Applied {
    /// Events the server writes right after the accepted one.
    pub server_events: Vec<ServerEvent>,
    /// A new work item is due now (the session had no live item).
    pub enqueue: bool,
}

/// What an archived session answers to anything sent to it.
const ARCHIVED: Refusal = Refusal {
    reason: "the session is archived and refuses new events",
    code: "session_archived",
};

/// `cancel` (§7.2, §12.2): whether a `user.interrupt` is appended for the worker to act on. Only a
/// running turn (`running`, or `rescheduling` while its item waits for a new worker) is interrupted;
/// otherwise nothing happens. An archived session refuses the interrupt as it refuses every event.
pub fn interrupt(status: SessionStatus, archived: bool) -> Result<bool, Refusal> {
    if !matches!(status, SessionStatus::Running | SessionStatus::Rescheduling) {
        return Ok(false);
    }
    if archived {
        return Err(ARCHIVED);
    }
    Ok(true)
}

impl ServerEvent {
    /// The type of the event the server writes.
    pub const fn kind(&self) -> EventType {
        match self {
            ServerEvent::StatusRunning => EventType::SessionStatusRunning,
            ServerEvent::StatusRescheduled => EventType::SessionStatusRescheduled,
            ServerEvent::StatusIdle(_) => EventType::SessionStatusIdle,
            ServerEvent::Error { .. } => EventType::SessionError,
        }
    }

    /// The event's fields besides `id`, `type` and `processed_at`.
    pub fn fields(&self) -> Map<String, Value> {
        let mut fields = Map::new();
        match self {
            ServerEvent::StatusRunning | ServerEvent::StatusRescheduled => {}
            // A turn that died with the item that served it, while the session takes new input: in
            // the official SDKs' terms the retries are exhausted (`retry_status: exhausted`;
            // `terminal` would promise a `terminated` session). Both SDKs know these values; §12.3's
            // `error` stop reason is known to neither (docs/dialects.md). A turn cancelled before
            // any worker started it ended as the user asked: `end_turn`.
            ServerEvent::StatusIdle(reason) => {
                let reason = match reason {
                    IdleReason::EndTurn => "end_turn",
                    IdleReason::RetriesExhausted => "retries_exhausted",
                };
                fields.insert("stop_reason".into(), serde_json::json!({ "type": reason }));
            }
            ServerEvent::Error { message } => {
                fields.insert(
                    "error".into(),
                    serde_json::json!({
                        "type": "unknown_error",
                        "message": message,
                        "retry_status": {"type": "exhausted"},
                        "code": "work_stopped",
                    }),
                );
            }
        }
        fields
    }
}

/// Applies one accepted event to `state` (§7.2, §7.3, §12.4). On refusal `state` is unchanged.
///
/// * `user.message` on an idle session starts a turn (`running` + `session.status_running`) and, on a
///   self-hosted environment, enqueues an item when none is live or buffers the input while the live item
///   is `stopping`.
/// * `user.define_outcome` is runnable input too (§7.2), but only `user.message` starts a turn (§12.4).
/// * `session.status_idle` ends the turn.
/// * Nothing is accepted by an archived or terminated session.
pub fn apply(state: &mut TurnState, kind: EventType) -> Result<Applied, Refusal> {
    if state.archived {
        return Err(ARCHIVED);
    }
    if state.status == SessionStatus::Terminated {
        return Err(Refusal {
            reason: "the session is terminated and refuses new events",
            code: "session_terminated",
        });
    }
    let mut applied = Applied::default();
    match kind {
        EventType::UserMessage => {
            match session::on_user_message(
                state.status,
                state.archived,
                state.self_hosted,
                state.live_item,
            ) {
                InputDecision::Refuse(reason) => {
                    return Err(Refusal {
                        reason,
                        code: "session_running",
                    })
                }
                InputDecision::Accept { start_turn, queue } => {
                    if start_turn {
                        state.status = SessionStatus::Running;
                        applied.server_events.push(ServerEvent::StatusRunning);
                    }
                    applied.enqueue = queue_input(state, queue);
                }
            }
        }
        EventType::UserDefineOutcome => {
            let queue = session::queue_effect(state.self_hosted, state.live_item);
            applied.enqueue = queue_input(state, queue);
        }
        EventType::SessionStatusIdle => {
            if matches!(
                state.status,
                SessionStatus::Running | SessionStatus::Rescheduling
            ) {
                state.status = SessionStatus::Idle;
            }
        }
        _ => {}
    }
    Ok(applied)
}

fn queue_input(state: &mut TurnState, queue: QueueEffect) -> bool {
    match queue {
        QueueEffect::None => false,
        QueueEffect::Enqueue => {
            state.live_item = Some(WorkState::Queued);
            true
        }
        QueueEffect::Buffer => {
            state.pending_input = true;
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const EVT: &str = "evt_019f3be4fd2475d9a784bf2c739e11ff";

    #[test]
    fn names_round_trip() {
        for kind in EventType::ALL {
            assert_eq!(EventType::parse(kind.as_str()), Some(kind));
        }
        assert_eq!(EventType::parse("user.shout"), None);
    }

    #[test]
    fn who_may_send_what() {
        use EventType::*;
        let table = [
            // (type, admin, worker)
            (UserMessage, true, false),
            (UserInterrupt, true, false),
            (UserToolConfirmation, true, false),
            (UserToolResult, true, true),
            (UserCustomToolResult, true, true),
            (UserDefineOutcome, true, false),
            (AgentMessage, true, true),
            (AgentThinking, true, true),
            (AgentToolUse, true, true),
            (AgentCustomToolUse, true, true),
            (AgentToolResult, true, true),
            (SessionStatusIdle, true, true),
            (SessionError, true, true),
            (SessionStatusRunning, false, false),
            (SessionStatusRescheduled, false, false),
            (SessionStatusTerminated, false, false),
            (SessionDeleted, false, false),
        ];
        assert_eq!(table.len(), EventType::ALL.len());
        for (kind, admin, worker) in table {
            assert_eq!(may_send(Sender::Admin, kind), admin, "admin {kind:?}");
            assert_eq!(may_send(Sender::Worker, kind), worker, "worker {kind:?}");
        }
    }

    #[test]
    fn event_type_is_read_first() {
        let cases = [
            (json!({"type": "user.message"}), Ok(EventType::UserMessage)),
            (json!("user.message"), Err("events[0]")),
            (json!({}), Err("events[0].type")),
            (json!({"type": 7}), Err("events[0].type")),
            (json!({"type": "user.shout"}), Err("events[0].type")),
            (
                json!({"type": "session.status_running"}),
                Err("events[0].type"),
            ),
            (json!({"type": "session.deleted"}), Err("events[0].type")),
        ];
        for (event, want) in cases {
            let got = event_type("events[0]", &event).map_err(|e| e.param);
            assert_eq!(got, want.map_err(str::to_owned), "{event}");
        }
    }

    /// Each row: an event, and `None` when valid or the `param` its refusal must name.
    #[test]
    fn shapes() {
        let text = json!([{"type": "text", "text": "hi"}]);
        let cases: Vec<(Value, Option<&str>)> = vec![
            // user.message
            (json!({"type": "user.message", "content": text}), None),
            (
                json!({"type": "user.message", "content": [{"type": "image", "source": {}}]}),
                None,
            ),
            (json!({"type": "user.message"}), Some("e.content")),
            (
                json!({"type": "user.message", "content": "hi"}),
                Some("e.content"),
            ),
            (
                json!({"type": "user.message", "content": []}),
                Some("e.content"),
            ),
            (
                json!({"type": "user.message", "content": [7]}),
                Some("e.content[0]"),
            ),
            (
                json!({"type": "user.message", "content": [{"text": "hi"}]}),
                Some("e.content[0].type"),
            ),
            (
                json!({"type": "user.message", "content": [{"type": "text"}]}),
                Some("e.content[0].text"),
            ),
            (
                json!({"type": "user.message", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": 1}]}),
                Some("e.content[1].text"),
            ),
            // user.interrupt, user.define_outcome: stored as given
            (json!({"type": "user.interrupt"}), None),
            (
                json!({"type": "user.define_outcome", "anything": [1, 2]}),
                None,
            ),
            // user.tool_confirmation
            (
                json!({"type": "user.tool_confirmation", "tool_use_id": EVT, "result": "allow"}),
                None,
            ),
            (
                json!({"type": "user.tool_confirmation", "tool_use_id": EVT, "result": "deny", "deny_message": "no"}),
                None,
            ),
            (
                json!({"type": "user.tool_confirmation", "result": "allow"}),
                Some("e.tool_use_id"),
            ),
            (
                json!({"type": "user.tool_confirmation", "tool_use_id": EVT, "result": "maybe"}),
                Some("e.result"),
            ),
            (
                json!({"type": "user.tool_confirmation", "tool_use_id": EVT}),
                Some("e.result"),
            ),
            // tool results
            (
                json!({"type": "user.tool_result", "tool_use_id": EVT, "content": "ok"}),
                None,
            ),
            (
                json!({"type": "user.tool_result", "tool_use_id": EVT, "content": text, "is_error": false}),
                None,
            ),
            (
                json!({"type": "user.tool_result", "content": "ok"}),
                Some("e.tool_use_id"),
            ),
            (
                json!({"type": "user.tool_result", "tool_use_id": 5, "content": "ok"}),
                Some("e.tool_use_id"),
            ),
            (
                json!({"type": "user.tool_result", "tool_use_id": EVT}),
                Some("e.content"),
            ),
            (
                json!({"type": "user.tool_result", "tool_use_id": EVT, "content": {"a": 1}}),
                Some("e.content"),
            ),
            (
                json!({"type": "user.tool_result", "tool_use_id": EVT, "content": "ok", "is_error": "no"}),
                Some("e.is_error"),
            ),
            (
                json!({"type": "user.custom_tool_result", "custom_tool_use_id": EVT, "content": text}),
                None,
            ),
            (
                json!({"type": "user.custom_tool_result", "tool_use_id": EVT, "content": text}),
                Some("e.custom_tool_use_id"),
            ),
            (
                json!({"type": "agent.tool_result", "tool_use_id": EVT, "content": [{"type": "text", "text": "3"}]}),
                None,
            ),
            // agent.message, agent.thinking
            (json!({"type": "agent.message", "content": text}), None),
            (json!({"type": "agent.message"}), Some("e.content")),
            (json!({"type": "agent.thinking"}), None),
            (json!({"type": "agent.thinking", "content": "hmm"}), None),
            (json!({"type": "agent.thinking", "content": text}), None),
            (
                json!({"type": "agent.thinking", "content": 3}),
                Some("e.content"),
            ),
            // tool calls
            (
                json!({"type": "agent.tool_use", "name": "bash", "input": {"command": "ls"}}),
                None,
            ),
            (
                json!({"type": "agent.custom_tool_use", "name": "add", "input": {}}),
                None,
            ),
            (
                json!({"type": "agent.tool_use", "input": {}}),
                Some("e.name"),
            ),
            (
                json!({"type": "agent.tool_use", "name": " ", "input": {}}),
                Some("e.name"),
            ),
            (
                json!({"type": "agent.tool_use", "name": "bash"}),
                Some("e.input"),
            ),
            (
                json!({"type": "agent.custom_tool_use", "name": "add", "input": [1]}),
                Some("e.input"),
            ),
            // session.status_idle
            (
                json!({"type": "session.status_idle", "stop_reason": {"type": "end_turn"}}),
                None,
            ),
            (
                json!({"type": "session.status_idle", "stop_reason": {"type": "requires_action", "event_ids": [EVT]}}),
                None,
            ),
            (
                json!({"type": "session.status_idle", "stop_reason": {"type": "retries_exhausted"}}),
                None,
            ),
            (
                json!({"type": "session.status_idle"}),
                Some("e.stop_reason"),
            ),
            (
                json!({"type": "session.status_idle", "stop_reason": "end_turn"}),
                Some("e.stop_reason"),
            ),
            (
                json!({"type": "session.status_idle", "stop_reason": {"type": "bored"}}),
                Some("e.stop_reason.type"),
            ),
            (
                json!({"type": "session.status_idle", "stop_reason": {"type": "requires_action", "event_ids": [1]}}),
                Some("e.stop_reason.event_ids"),
            ),
            // session.error
            (
                json!({"type": "session.error", "error": {"type": "unknown_error", "message": "boom"}}),
                None,
            ),
            (
                json!({"type": "session.error", "error": {"type": "unknown_error", "message": "boom", "retry_status": {"type": "terminal"}}}),
                None,
            ),
            (json!({"type": "session.error"}), Some("e.error")),
            (
                json!({"type": "session.error", "error": {"type": "x"}}),
                Some("e.error.message"),
            ),
            (
                json!({"type": "session.error", "error": {"message": "x"}}),
                Some("e.error.type"),
            ),
            (
                json!({"type": "session.error", "error": {"type": "x", "message": "y", "retry_status": "no"}}),
                Some("e.error.retry_status"),
            ),
        ];
        for (event, want) in cases {
            let kind = event_type("e", &event).expect("postable type");
            let got = validate("e", kind, &event).err().map(|e| e.param);
            assert_eq!(got.as_deref(), want, "{event}");
        }
    }

    fn idle(self_hosted: bool, live_item: Option<WorkState>) -> TurnState {
        TurnState {
            status: SessionStatus::Idle,
            archived: false,
            self_hosted,
            live_item,
            pending_input: false,
        }
    }

    #[test]
    fn user_message_starts_a_turn_and_feeds_the_queue() {
        // (live item, enqueue, buffered)
        let cases = [
            (None, true, false),
            (Some(WorkState::Stopped), true, false),
            (Some(WorkState::Queued), false, false),
            (Some(WorkState::Starting), false, false),
            (Some(WorkState::Active), false, false),
            (Some(WorkState::Stopping), false, true),
        ];
        for (live, enqueue, buffered) in cases {
            let mut state = idle(true, live);
            let applied = apply(&mut state, EventType::UserMessage).unwrap();
            assert_eq!(state.status, SessionStatus::Running, "{live:?}");
            assert_eq!(applied.server_events, vec![ServerEvent::StatusRunning]);
            assert_eq!(applied.enqueue, enqueue, "{live:?}");
            assert_eq!(state.pending_input, buffered, "{live:?}");
            if enqueue {
                assert_eq!(state.live_item, Some(WorkState::Queued));
            }
        }
        // A cloud environment has no queue: the turn starts, nothing is enqueued.
        let mut state = idle(false, None);
        let applied = apply(&mut state, EventType::UserMessage).unwrap();
        assert_eq!(state.status, SessionStatus::Running);
        assert!(!applied.enqueue);
    }

    #[test]
    fn refusals_leave_the_state_alone() {
        for status in [SessionStatus::Running, SessionStatus::Rescheduling] {
            let mut state = idle(true, Some(WorkState::Active));
            state.status = status;
            let before = state.clone();
            let refusal = apply(&mut state, EventType::UserMessage).unwrap_err();
            assert_eq!(refusal.code, "session_running");
            assert_eq!(state, before);
        }
        for kind in EventType::ALL
            .into_iter()
            .filter(|k| k.side() != Side::Server)
        {
            let mut archived = idle(true, None);
            archived.archived = true;
            assert_eq!(
                apply(&mut archived, kind).unwrap_err().code,
                "session_archived"
            );
            let mut terminated = idle(true, None);
            terminated.status = SessionStatus::Terminated;
            assert_eq!(
                apply(&mut terminated, kind).unwrap_err().code,
                "session_terminated"
            );
        }
    }

    #[test]
    fn a_second_message_in_one_batch_meets_a_running_session() {
        let mut state = idle(true, None);
        apply(&mut state, EventType::UserMessage).unwrap();
        assert!(apply(&mut state, EventType::UserMessage).is_err());
    }

    #[test]
    fn status_idle_ends_the_turn() {
        for status in [
            SessionStatus::Running,
            SessionStatus::Rescheduling,
            SessionStatus::Idle,
        ] {
            let mut state = idle(true, Some(WorkState::Active));
            state.status = status;
            let applied = apply(&mut state, EventType::SessionStatusIdle).unwrap();
            assert_eq!(state.status, SessionStatus::Idle);
            assert_eq!(applied, Applied::default());
        }
    }

    #[test]
    fn define_outcome_feeds_the_queue_without_a_turn() {
        let mut state = idle(true, None);
        assert!(
            apply(&mut state, EventType::UserDefineOutcome)
                .unwrap()
                .enqueue
        );
        assert_eq!(state.status, SessionStatus::Idle);
        let mut state = idle(true, Some(WorkState::Stopping));
        state.status = SessionStatus::Running;
        assert!(
            !apply(&mut state, EventType::UserDefineOutcome)
                .unwrap()
                .enqueue
        );
        assert!(state.pending_input);
    }

    #[test]
    fn other_events_change_nothing() {
        for kind in [
            EventType::UserInterrupt,
            EventType::UserToolConfirmation,
            EventType::UserToolResult,
            EventType::UserCustomToolResult,
            EventType::AgentMessage,
            EventType::AgentThinking,
            EventType::AgentToolUse,
            EventType::AgentCustomToolUse,
            EventType::AgentToolResult,
            EventType::SessionError,
        ] {
            for status in [SessionStatus::Idle, SessionStatus::Running] {
                let mut state = idle(true, None);
                state.status = status;
                let before = state.clone();
                assert_eq!(apply(&mut state, kind).unwrap(), Applied::default());
                assert_eq!(state, before, "{kind:?}");
            }
        }
    }
}

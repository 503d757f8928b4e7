//! Session events (§12.3).

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use utoipa::ToSchema;

/// The names of the event types (§12.3), written once: `tether-core`'s `EventType` (which owns what each
/// type means) and every client name them through these constants.
pub mod event_type {
    /// `user.message`
    pub const USER_MESSAGE: &str = "user.message";
    /// `user.interrupt`
    pub const USER_INTERRUPT: &str = "user.interrupt";
    /// `user.tool_confirmation`
    pub const USER_TOOL_CONFIRMATION: &str = "user.tool_confirmation";
    /// `user.tool_result`
    pub const USER_TOOL_RESULT: &str = "user.tool_result";
    /// `user.custom_tool_result`
    pub const USER_CUSTOM_TOOL_RESULT: &str = "user.custom_tool_result";
    /// `user.define_outcome`
    pub const USER_DEFINE_OUTCOME: &str = "user.define_outcome";
    /// `agent.message`
    pub const AGENT_MESSAGE: &str = "agent.message";
    /// `agent.thinking`
    pub const AGENT_THINKING: &str = "agent.thinking";
    /// `agent.tool_use`
    pub const AGENT_TOOL_USE: &str = "agent.tool_use";
    /// `agent.custom_tool_use`
    pub const AGENT_CUSTOM_TOOL_USE: &str = "agent.custom_tool_use";
    /// `agent.tool_result`
    pub const AGENT_TOOL_RESULT: &str = "agent.tool_result";
    /// `session.status_idle`
    pub const SESSION_STATUS_IDLE: &str = "session.status_idle";
    /// `session.error`
    pub const SESSION_ERROR: &str = "session.error";
    /// `session.status_running`
    pub const SESSION_STATUS_RUNNING: &str = "session.status_running";
    /// `session.status_rescheduled`
    pub const SESSION_STATUS_RESCHEDULED: &str = "session.status_rescheduled";
    /// `session.status_terminated`
    pub const SESSION_STATUS_TERMINATED: &str = "session.status_terminated";
    /// `session.deleted`
    pub const SESSION_DELETED: &str = "session.deleted";
}

/// A stored session event (§12.3): `id`, `type`, `processed_at` and the fields of its type.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Event {
    /// `evt_…`; the log is ordered by it.
    pub id: String,
    /// e.g. `user.message`, `agent.tool_use`, `session.status_idle`.
    #[serde(rename = "type")]
    pub kind: String,
    /// When the server stored it.
    #[serde(default)]
    #[schema(required = true, format = DateTime)]
    pub processed_at: Option<String>,
    /// The type's fields (`content`, `name`, `input`, `stop_reason`, …).
    #[serde(flatten)]
    pub fields: Map<String, Value>,
}

impl Event {
    /// The text blocks of `content`, joined: the readable part of a message event.
    pub fn text(&self) -> Option<String> {
        let blocks = self.fields.get("content")?.as_array()?;
        let texts: Vec<&str> = blocks
            .iter()
            .filter(|b| b.get("type").and_then(Value::as_str) == Some("text"))
            .filter_map(|b| b.get("text").and_then(Value::as_str))
            .collect();
        (!texts.is_empty()).then(|| texts.join(""))
    }
}

/// An event to send (§12.3): a `type` and its fields; the server adds `id` and `processed_at`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct NewEvent {
    /// The event type.
    #[serde(rename = "type")]
    pub kind: String,
    /// Its fields.
    #[serde(flatten)]
    pub fields: Map<String, Value>,
}

impl NewEvent {
    /// Any event: `fields` must be a JSON object (anything else is ignored).
    pub fn new(kind: impl Into<String>, fields: Value) -> Self {
        NewEvent {
            kind: kind.into(),
            fields: match fields {
                Value::Object(map) => map,
                _ => Map::new(),
            },
        }
    }

    /// `user.message` with one text block: starts a turn on an idle session.
    pub fn user_message(text: impl Into<String>) -> Self {
        Self::new(
            event_type::USER_MESSAGE,
            json!({"content": [{"type": "text", "text": text.into()}]}),
        )
    }

    /// `user.interrupt`: asks the running turn to stop.
    pub fn user_interrupt() -> Self {
        Self::new(event_type::USER_INTERRUPT, json!({}))
    }

    /// `agent.message` with one text block.
    pub fn agent_message(text: impl Into<String>) -> Self {
        Self::new(
            event_type::AGENT_MESSAGE,
            json!({"content": [{"type": "text", "text": text.into()}]}),
        )
    }

    /// `session.status_idle` with a stop reason (`end_turn`, `requires_action` or `error`): ends a turn.
    pub fn status_idle(stop_reason: &str) -> Self {
        Self::new(
            event_type::SESSION_STATUS_IDLE,
            json!({"stop_reason": {"type": stop_reason}}),
        )
    }
}

impl From<NewEvent> for Value {
    fn from(event: NewEvent) -> Value {
        let mut fields = event.fields;
        fields.insert("type".to_owned(), Value::String(event.kind));
        Value::Object(fields)
    }
}

/// Body of `POST /sessions/{id}/events`: 1 to 100 events.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct PostEvents {
    /// The events, appended in order. Each is a [`NewEvent`], held as the JSON sent: event types are
    /// open-ended (a user event may carry fields of its own), and the server judges each against its
    /// type's rules, naming the field at fault (`events[1].content`), which a typed decode could not.
    #[schema(value_type = Vec<NewEvent>, min_items = 1, max_items = 100)]
    pub events: Vec<Value>,
}

impl PostEvents {
    /// A batch of events to send.
    pub fn new(events: impl IntoIterator<Item = NewEvent>) -> Self {
        PostEvents {
            events: events.into_iter().map(Value::from).collect(),
        }
    }
}

/// The answer to `POST /sessions/{id}/events`: the events as stored.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct PostedEvents {
    /// With their `id` and `processed_at`.
    pub data: Vec<Event>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_text_is_readable() {
        let event: Event = serde_json::from_value(json!({
            "id": "evt_1", "type": "agent.message", "processed_at": null,
            "content": [{"type": "text", "text": "hello "}, {"type": "image"}, {"type": "text", "text": "world"}]
        }))
        .unwrap();
        assert_eq!(event.text().as_deref(), Some("hello world"));
    }
}

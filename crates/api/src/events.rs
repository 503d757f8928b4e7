//! Session events (§12.3).

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use utoipa::ToSchema;

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
            "user.message",
            json!({"content": [{"type": "text", "text": text.into()}]}),
        )
    }

    /// `user.interrupt`: asks the running turn to stop.
    pub fn user_interrupt() -> Self {
        Self::new("user.interrupt", json!({}))
    }

    /// `agent.message` with one text block.
    pub fn agent_message(text: impl Into<String>) -> Self {
        Self::new(
            "agent.message",
            json!({"content": [{"type": "text", "text": text.into()}]}),
        )
    }

    /// `session.status_idle` with a stop reason (`end_turn`, `requires_action` or `error`): ends a turn.
    pub fn status_idle(stop_reason: &str) -> Self {
        Self::new(
            "session.status_idle",
            json!({"stop_reason": {"type": stop_reason}}),
        )
    }
}

/// Body of `POST /sessions/{id}/events`: 1 to 100 events.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct PostEvents {
    /// The events, appended in order.
    #[schema(min_items = 1, max_items = 100)]
    pub events: Vec<NewEvent>,
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

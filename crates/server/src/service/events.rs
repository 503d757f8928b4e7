//! Building session events: ids that only grow within a session, and the bodies the server writes itself.

use serde_json::{json, Map, Value};
use tether_core::ids::{self, IdKind};
use tether_core::resources::{Session, SessionEvent};
use tether_core::session::ServerEvent;
use tether_core::Timestamp;

/// Appends an event of `kind` with `fields` to `session` (which remembers the newest id). The id is a
/// fresh UUIDv7 unless that would not sort after the session's newest event (clock skew between
/// servers), in which case it is the newest id's successor.
pub fn new_event(
    session: &mut Session,
    kind: &str,
    fields: Map<String, Value>,
    now: Timestamp,
) -> SessionEvent {
    let mut id = ids::new_id(IdKind::Event);
    if let Some(last) = &session.last_event_id {
        if id.as_str() <= last.as_str() {
            id = ids::successor(IdKind::Event, last).expect("event ids are well formed");
        }
    }
    session.last_event_id = Some(id.clone());
    let mut body = Map::new();
    body.insert("id".into(), json!(id));
    body.insert("type".into(), json!(kind));
    body.insert("processed_at".into(), json!(now.to_rfc3339()));
    for (k, v) in fields {
        if !matches!(k.as_str(), "id" | "type" | "processed_at") {
            body.insert(k, v);
        }
    }
    SessionEvent {
        id,
        session_id: session.id.clone(),
        body: Value::Object(body),
    }
}

/// The event the server writes for a coupling decision.
pub fn server_event(session: &mut Session, event: &ServerEvent, now: Timestamp) -> SessionEvent {
    let (kind, fields) = match event {
        ServerEvent::StatusRunning => ("session.status_running", Map::new()),
        ServerEvent::StatusRescheduled => ("session.status_rescheduled", Map::new()),
        ServerEvent::StatusIdle => {
            let mut m = Map::new();
            m.insert("stop_reason".into(), json!({"type": "error"}));
            ("session.status_idle", m)
        }
        ServerEvent::Error { message } => {
            let mut m = Map::new();
            m.insert(
                "error".into(),
                json!({"type": "work_stopped", "message": message}),
            );
            ("session.error", m)
        }
    };
    new_event(session, kind, fields, now)
}

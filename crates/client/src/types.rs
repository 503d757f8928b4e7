//! The resources the API returns and the bodies it accepts (§2, §7, §11, §12): the wire model of
//! `tether-api`, which the server renders its answers with. Reading stays tolerant — unknown fields land
//! in `extra`, unknown states in an `Other` variant — so this client keeps working against a newer server.

pub use tether_api::{
    event_type, Agent, AgentRef, Cancel, Claim, CreateAgent, CreateEnvironment, CreateSession,
    Credential, Deleted, Environment, Event, Heartbeat, Metadata, MetadataPatch, NewEvent, Page,
    PostEvents, PostedEvents, QueueStats, SecretError, Session, SessionStatus, StopWithClaim,
    UpdateAgent, UpdateEnvironment, UpdateSession, WorkData, WorkHistory, WorkItem, WorkSecret,
    WorkState, WorkTransition, Worker, WorkerItem, STOPPED_HEADER,
};

/// The answer of [`crate::Client::stop_then_claim_work`].
#[derive(Clone, Debug, PartialEq)]
pub struct StopThenClaim {
    /// The server said that it stopped the item (or found it stopped). False from a server that
    /// ignored the stop: the item is as it was, to be stopped on its own.
    pub stopped: bool,
    /// The item claimed, if any.
    pub claim: Option<Claim>,
}

impl From<SecretError> for crate::Error {
    fn from(e: SecretError) -> Self {
        crate::Error::Secret(e.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn work_items_keep_fields_the_client_does_not_know() {
        let raw = json!({
            "id": "work_1", "type": "work", "environment_id": "env_1",
            "data": {"type": "session", "id": "sess_1"}, "state": "queued",
            "created_at": "2026-07-01T08:15:01Z", "metadata": {}, "secret": null,
            "brand_new_field": {"x": 1}
        });
        let item: WorkItem = serde_json::from_value(raw).unwrap();
        assert_eq!(item.session_id(), Some("sess_1"));
        assert_eq!(item.extra["brand_new_field"], json!({"x": 1}));
        assert_eq!(item.decode_secret().unwrap(), None);
        let back = serde_json::to_value(&item).unwrap();
        assert_eq!(back["brand_new_field"], json!({"x": 1}));
    }

    #[test]
    fn unknown_session_statuses_are_kept() {
        let s: SessionStatus = serde_json::from_value(json!("paused")).unwrap();
        assert_eq!(s, SessionStatus::Other("paused".into()));
    }

    #[test]
    fn bad_secrets_are_client_errors() {
        let item = WorkItem {
            secret: Some("!!!".into()),
            ..serde_json::from_value(json!({
                "id": "work_1", "environment_id": "env_1", "data": {"type": "session", "id": "s"},
                "state": "queued", "created_at": "2026-07-01T08:15:01Z"
            }))
            .unwrap()
        };
        let error: crate::Error = item.decode_secret().unwrap_err().into();
        assert!(matches!(error, crate::Error::Secret(_)));
    }
}

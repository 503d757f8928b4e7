//! The wire model of Tether's HTTP API (SPEC §2, §7, §11, §12): every request and response body of both
//! dialects (`/api/v1/cloud/…` and `/v1/…`), written once. The server renders its answers as these types
//! and derives `/openapi.json` from them (`utoipa::ToSchema`); `tether-client` reads the same types.
//!
//! Reading is tolerant so that a client keeps working against a newer server: unknown fields land in
//! each resource's `extra` map (re-serializing loses nothing), optional fields may be absent, and state
//! strings this crate does not know decode into an `Other` variant. Timestamps stay the RFC 3339 strings
//! the server sent: `last_heartbeat` is an optimistic-concurrency token that must be echoed byte for byte.
//!
//! This crate has no I/O: it depends on serde, base64 and utoipa only (never on the server, the store or
//! an async runtime).

mod events;
mod requests;
mod resources;
mod schemas;
mod secret;
mod states;
mod work;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

pub use events::{event_type, Event, NewEvent, PostEvents, PostedEvents};
pub use requests::{
    AgentRef, ClaimRequest, CreateAgent, CreateCredential, CreateEnvironment, CreateSession,
    RequeueRequest, StopRequest, StopWithClaim, UpdateAgent, UpdateEnvironment, UpdateSession,
    WorkMetadataPatch, STOPPED_HEADER,
};
pub use resources::{
    Agent, Cancel, Canceling, Credential, Deleted, Environment, EnvironmentConfig, ErrorBody,
    ErrorEnvelope, Health, Session, SessionStats, SessionUsage,
};
pub use secret::{SecretError, WorkSecret};
pub use states::{SessionStatus, WorkState};
pub use work::{
    Claim, Heartbeat, QueueSample, QueueStats, QueueStatsHistory, WorkData, WorkHistory, WorkItem,
    WorkTransition, Worker, WorkerItem, Workers,
};

/// A metadata map (§1.9): string keys to string values, at most 16 keys.
pub type Metadata = BTreeMap<String, String>;

/// A metadata merge patch (§1.9): `Some(value)` upserts a key, `None` (JSON `null`) deletes it, keys
/// not mentioned stay as they are.
pub type MetadataPatch = BTreeMap<String, Option<String>>;

/// One page of a list endpoint (§1.8). `next_page` is `null` on the last page; pass it back as `page`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Page<T> {
    /// The items of this page, in the endpoint's order.
    pub data: Vec<T>,
    /// Id of the first item (`None` on an empty page or where the server omits it).
    #[serde(default)]
    #[schema(required = true)]
    pub first_id: Option<String>,
    /// Id of the last item.
    #[serde(default)]
    #[schema(required = true)]
    pub last_id: Option<String>,
    /// Whether more items follow this page.
    #[serde(default)]
    pub has_more: bool,
    /// The cursor for the following page.
    #[serde(default)]
    #[schema(required = true)]
    pub next_page: Option<String>,
}

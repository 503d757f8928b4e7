//! The work queue's bodies (§2.3–§2.5, §6, §11.2–§11.4).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use utoipa::ToSchema;

use crate::secret::{SecretError, WorkSecret};
use crate::{Metadata, WorkState};

/// What a work item asks a worker to serve: `{"type": "session", "id": "sess_…"}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct WorkData {
    /// `session` (the only kind Tether emits; a worker should force-stop anything else).
    #[serde(rename = "type")]
    #[schema(pattern = "^session$")]
    pub kind: String,
    /// The id of what to serve.
    pub id: String,
}

/// A work item (§2.3, §11.3). `secret` is set on poll answers only.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct WorkItem {
    /// `work_…`.
    pub id: String,
    /// `"work"`.
    #[serde(rename = "type", default)]
    #[schema(pattern = "^work$")]
    pub object: String,
    /// The owning environment.
    pub environment_id: String,
    /// What to serve.
    pub data: WorkData,
    /// Lifecycle state.
    pub state: WorkState,
    /// First enqueue time (unchanged by requeues).
    #[schema(format = DateTime)]
    pub created_at: String,
    /// Set by a successful ack.
    #[serde(default)]
    #[schema(required = true, format = DateTime)]
    pub acknowledged_at: Option<String>,
    /// Set by the first heartbeat.
    #[serde(default)]
    #[schema(required = true, format = DateTime)]
    pub started_at: Option<String>,
    /// The newest accepted heartbeat.
    #[serde(default)]
    #[schema(required = true, format = DateTime)]
    pub latest_heartbeat_at: Option<String>,
    /// When a stop was requested.
    #[serde(default)]
    #[schema(required = true, format = DateTime)]
    pub stop_requested_at: Option<String>,
    /// When it reached `stopped`.
    #[serde(default)]
    #[schema(required = true, format = DateTime)]
    pub stopped_at: Option<String>,
    /// Metadata (a snapshot of the session's at enqueue time, plus worker patches).
    #[serde(default)]
    pub metadata: Metadata,
    /// Credential payload; only on poll responses. Decode it with [`WorkItem::decode_secret`].
    #[serde(default)]
    #[schema(required = true)]
    pub secret: Option<String>,
    /// Polls that handed it out.
    #[serde(default)]
    pub delivery_count: Option<u64>,
    /// Lease expiries that sent it back to the queue.
    #[serde(default)]
    pub requeue_count: Option<u64>,
    /// Fields this crate does not model.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl WorkItem {
    /// The session to serve, when the item is a session item.
    pub fn session_id(&self) -> Option<&str> {
        (self.data.kind == "session").then_some(self.data.id.as_str())
    }

    /// Decodes `secret`; `Ok(None)` when the item carries none (every response but a poll).
    pub fn decode_secret(&self) -> Result<Option<WorkSecret>, SecretError> {
        self.secret.as_deref().map(WorkSecret::decode).transpose()
    }
}

/// The answer to a heartbeat (§2.4); echo `last_heartbeat` as the next `expected_last_heartbeat`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[schema(as = WorkHeartbeat)]
pub struct Heartbeat {
    /// `"work_heartbeat"`.
    #[serde(rename = "type", default)]
    #[schema(pattern = "^work_heartbeat$")]
    pub object: String,
    /// Echo this verbatim as `expected_last_heartbeat` on the next call.
    #[schema(format = DateTime)]
    pub last_heartbeat: String,
    /// Whether the lease was pushed forward; `false` means stop working on the item.
    pub lease_extended: bool,
    /// `active`, or `stopping` when a stop was requested.
    pub state: WorkState,
    /// The lease length now in force.
    pub ttl_seconds: u32,
    /// Fields this crate does not model.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// The answer to a claim (a Tether extension): the item, leased to the claimant (`active`; an earlier
/// try's item may since have been asked to stop), with its `secret` as a poll's; and its lease, whose
/// `last_heartbeat` the next heartbeat echoes as `expected_last_heartbeat`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[schema(as = WorkClaim)]
pub struct Claim {
    /// `"work_claim"`.
    #[serde(rename = "type", default)]
    #[schema(pattern = "^work_claim$")]
    pub object: String,
    /// The claimed item.
    pub work: WorkItem,
    /// The lease, as a heartbeat's answer gives it: the one the claim's first heartbeat started, or,
    /// for an earlier try's item (`earlier_try`), the lease as it stands after any heartbeat since.
    pub lease: Heartbeat,
    /// The item is the one an earlier try of this claim (the same `Idempotency-Key`) took, answered
    /// again: its lease began when that try was committed, so a worker counts it from when it sent
    /// that try. False for an item this try took.
    #[serde(default)]
    pub earlier_try: bool,
    /// Fields this crate does not model.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// Queue statistics (§2.5, §11.3).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[schema(as = WorkQueueStats)]
pub struct QueueStats {
    /// `"work_queue_stats"`.
    #[serde(rename = "type", default)]
    #[schema(pattern = "^work_queue_stats$")]
    pub object: String,
    /// Queued items claimable now.
    pub depth: u64,
    /// Queued items delivered and not yet acknowledged.
    pub pending: u64,
    /// The oldest enqueue instant over all queued items.
    #[serde(default)]
    #[schema(required = true, format = DateTime)]
    pub oldest_queued_at: Option<String>,
    /// Distinct worker ids that polled in the last 30 s.
    #[serde(default)]
    #[schema(required = true)]
    pub workers_polling: Option<u64>,
    /// Live items per state (a Tether addition).
    #[serde(default)]
    pub states: BTreeMap<String, u64>,
    /// Fields this crate does not model.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// One sample of the queue statistics.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct QueueSample {
    /// When it was taken.
    #[schema(format = DateTime)]
    pub at: String,
    /// Queued items claimable.
    pub depth: u64,
    /// Queued items delivered and not yet acknowledged.
    pub pending: u64,
    /// Items starting.
    pub starting: u64,
    /// Items active.
    pub active: u64,
    /// Items stopping.
    pub stopping: u64,
    /// Distinct workers polling.
    pub workers_polling: u64,
}

/// Queue statistics of the last hour, oldest first. Every server samples the shared store on its own
/// tick, so any server's answer covers the whole cluster; a server that started less than an hour ago
/// has fewer samples.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[schema(as = WorkQueueStatsHistory)]
pub struct QueueStatsHistory {
    /// `"work_queue_stats_history"`.
    #[serde(rename = "type", default)]
    #[schema(pattern = "^work_queue_stats_history$")]
    pub object: String,
    /// The environment.
    pub environment_id: String,
    /// Seconds between samples.
    pub interval_seconds: f64,
    /// The samples, oldest first.
    pub data: Vec<QueueSample>,
}

/// One state change of a work item (§11.2).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct WorkTransition {
    /// `"work_transition"`.
    #[serde(rename = "type", default)]
    #[schema(pattern = "^work_transition$")]
    pub object: String,
    /// When it happened.
    #[schema(format = DateTime)]
    pub at: String,
    /// The state before (`None` for the first enqueue).
    #[serde(default)]
    #[schema(required = true)]
    pub from: Option<WorkState>,
    /// The state after.
    pub to: WorkState,
    /// `enqueued`, `delivered`, `acked`, `lease_expired_requeued`, …
    pub cause: String,
    /// The worker involved, if known.
    #[serde(default)]
    #[schema(required = true)]
    pub worker_id: Option<String>,
    /// Extra explanation.
    #[serde(default)]
    #[schema(required = true, value_type = Option<String>)]
    pub detail: Option<Value>,
    /// Fields this crate does not model.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// A page of a work item's history, oldest first (§11.2), with its heartbeat count.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct WorkHistory {
    /// The item.
    #[serde(default)]
    #[schema(required = true)]
    pub work_id: Option<String>,
    /// Transitions, oldest first.
    pub data: Vec<WorkTransition>,
    /// Cursor of the first entry.
    #[serde(default)]
    #[schema(required = true)]
    pub first_id: Option<String>,
    /// Cursor of the last entry.
    #[serde(default)]
    #[schema(required = true)]
    pub last_id: Option<String>,
    /// Whether more entries follow.
    #[serde(default)]
    pub has_more: bool,
    /// Cursor for the next page.
    #[serde(default)]
    #[schema(required = true)]
    pub next_page: Option<String>,
    /// Heartbeats that only extended the lease (not listed one by one).
    #[serde(default)]
    #[schema(required = true)]
    pub heartbeat_count: Option<u64>,
}

/// Workers seen polling recently (§11.4).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Workers {
    /// One entry per worker id.
    pub data: Vec<Worker>,
}

/// A worker seen polling an environment recently (§11.4).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Worker {
    /// `"worker"`.
    #[serde(rename = "type", default)]
    #[schema(pattern = "^worker$")]
    pub object: String,
    /// The `Worker-ID` it sends.
    pub worker_id: String,
    /// Its latest poll.
    #[schema(format = DateTime)]
    pub last_poll_at: String,
    /// The live items it holds.
    #[serde(default)]
    pub items: Vec<WorkerItem>,
    /// Fields this crate does not model.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// A live item held by a worker.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct WorkerItem {
    /// `work_…`.
    pub id: String,
    /// Its state.
    pub state: WorkState,
    /// The session it serves.
    #[serde(default)]
    pub session_id: Option<String>,
}

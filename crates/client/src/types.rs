//! The resources the API returns and the bodies it accepts (§2, §7, §11, §12).
//!
//! Responses are tolerant: unknown fields are kept in each resource's `extra` map (so that re-serializing
//! a resource loses nothing a newer server sent), optional fields may be absent, and state strings this
//! client does not know decode into an `Other` variant instead of failing. Timestamps stay the RFC 3339
//! strings the server sent: `last_heartbeat` is an optimistic-concurrency token that must be echoed
//! byte for byte, and callers that want instants can parse them with the date library of their choice.

use std::collections::BTreeMap;
use std::fmt;

use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use base64::Engine as _;
use serde::{Deserialize, Serialize, Serializer};
use serde_json::{json, Map, Value};

use crate::error::{Error, Result};

/// A metadata map (§1.9): string keys to string values, at most 16 keys.
pub type Metadata = BTreeMap<String, String>;

/// A metadata merge patch (§1.9): `Some(value)` upserts a key, `None` (JSON `null`) deletes it, keys
/// not mentioned stay as they are.
pub type MetadataPatch = BTreeMap<String, Option<String>>;

/// Declares an enum over the string values of a state field that keeps unknown values as `Other`.
macro_rules! string_enum {
    ($(#[$meta:meta])* pub enum $name:ident { $($(#[$vmeta:meta])* $variant:ident = $text:literal,)* }) => {
        $(#[$meta])*
        #[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
        #[serde(from = "String", into = "String")]
        pub enum $name {
            $($(#[$vmeta])* $variant,)*
            /// A value this client does not know, as the server sent it.
            Other(String),
        }

        impl $name {
            /// The wire spelling.
            pub fn as_str(&self) -> &str {
                match self {
                    $($name::$variant => $text,)*
                    $name::Other(s) => s,
                }
            }
        }

        impl From<String> for $name {
            fn from(s: String) -> Self {
                match s.as_str() {
                    $($text => $name::$variant,)*
                    _ => $name::Other(s),
                }
            }
        }

        impl From<&str> for $name {
            fn from(s: &str) -> Self {
                $name::from(s.to_owned())
            }
        }

        impl From<$name> for String {
            fn from(v: $name) -> String {
                v.as_str().to_owned()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

string_enum! {
    /// The state of a work item (§2.3). Live states are all but `Stopped`.
    pub enum WorkState {
        /// Waiting for a worker (possibly delivered by a poll and not yet acknowledged).
        Queued = "queued",
        /// Acknowledged by a worker, no heartbeat yet.
        Starting = "starting",
        /// Heartbeating.
        Active = "active",
        /// A graceful stop was requested; the worker drains and confirms with another stop.
        Stopping = "stopping",
        /// Terminal.
        Stopped = "stopped",
    }
}

impl WorkState {
    /// Everything but `stopped` (and unknown states) is live.
    pub fn is_live(&self) -> bool {
        matches!(
            self,
            WorkState::Queued | WorkState::Starting | WorkState::Active | WorkState::Stopping
        )
    }
}

string_enum! {
    /// The status of a session (§2.2).
    pub enum SessionStatus {
        /// Waiting for input.
        Idle = "idle",
        /// A turn is being served.
        Running = "running",
        /// Its work item lost its lease and went back to the queue.
        Rescheduling = "rescheduling",
        /// Final.
        Terminated = "terminated",
    }
}

/// One page of a list endpoint (§1.8).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Page<T> {
    /// The items of this page, in the endpoint's order.
    pub data: Vec<T>,
    /// Id of the first item (`None` on an empty page or where the server omits it).
    #[serde(default)]
    pub first_id: Option<String>,
    /// Id of the last item.
    #[serde(default)]
    pub last_id: Option<String>,
    /// Whether more items follow this page.
    #[serde(default)]
    pub has_more: bool,
    /// The cursor for the following page (pass it as [`crate::ListParams::page`]).
    #[serde(default)]
    pub next_page: Option<String>,
}

/// The stub a delete returns: `{"id": …, "type": "environment_deleted" | "session_deleted"}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deleted {
    /// The id of what was deleted.
    pub id: String,
    /// `environment_deleted` or `session_deleted`.
    #[serde(rename = "type")]
    pub object: String,
}

/// An environment (§2.1).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Environment {
    /// `env_…`.
    pub id: String,
    /// `"environment"`.
    #[serde(rename = "type", default)]
    pub object: String,
    /// Display name.
    pub name: String,
    /// Free text (`null` is possible in the Anthropic dialect).
    #[serde(default)]
    pub description: Option<String>,
    /// `{"type": "self_hosted", …}` or `{"type": "cloud", …}`.
    #[serde(default)]
    pub config: Value,
    /// Metadata map.
    #[serde(default)]
    pub metadata: Metadata,
    /// `ready` or `archived` (a Tether addition).
    #[serde(default)]
    pub status: Option<String>,
    /// Mirrors `archived_at != null` (a Tether addition).
    #[serde(default)]
    pub archived: Option<bool>,
    /// Anthropic dialect only.
    #[serde(default)]
    pub scope: Option<String>,
    /// When it was archived.
    #[serde(default)]
    pub archived_at: Option<String>,
    /// Creation time (RFC 3339).
    pub created_at: String,
    /// Last change (RFC 3339).
    pub updated_at: String,
    /// Fields this client does not model.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl Environment {
    /// `config.type`: `self_hosted` or `cloud`.
    pub fn kind(&self) -> Option<&str> {
        self.config.get("type").and_then(Value::as_str)
    }

    /// Whether it has been archived.
    pub fn is_archived(&self) -> bool {
        self.archived_at.is_some()
    }
}

/// Body of `POST /environments`.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct CreateEnvironment {
    /// Required, non-empty.
    pub name: String,
    /// Optional free text.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Required: `{"type": "self_hosted"}` makes a work queue.
    pub config: Value,
    /// Initial metadata.
    #[serde(skip_serializing_if = "Metadata::is_empty")]
    pub metadata: Metadata,
    /// Further fields sent as given.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl CreateEnvironment {
    /// A `self_hosted` environment: the kind that owns a work queue served by your own workers.
    pub fn self_hosted(name: impl Into<String>) -> Self {
        CreateEnvironment {
            name: name.into(),
            config: json!({"type": "self_hosted"}),
            ..Default::default()
        }
    }

    /// A `cloud` environment (stored, never run by Tether) with unrestricted networking.
    pub fn cloud(name: impl Into<String>) -> Self {
        CreateEnvironment {
            name: name.into(),
            config: json!({"type": "cloud", "networking": {"type": "unrestricted"}}),
            ..Default::default()
        }
    }
}

/// Body of `POST /environments/{id}`: only the fields set are changed.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct UpdateEnvironment {
    /// New name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// New description.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Replaces the whole config; its `type` cannot change.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub config: Option<Value>,
    /// Metadata merge patch.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metadata: Option<MetadataPatch>,
    /// Further fields sent as given.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// An admin token or an environment key as listed (§11.1). `token` carries the secret only in the
/// answer to a create, the one time it is shown.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Credential {
    /// `tok_…` (admin token) or `envkey_…` (environment key); revoke it by this id.
    pub id: String,
    /// `token` (admin) or `environment_key`.
    #[serde(rename = "type", default)]
    pub object: String,
    /// Optional label.
    #[serde(default)]
    pub name: Option<String>,
    /// For environment keys, the environment they serve.
    #[serde(default)]
    pub environment_id: Option<String>,
    /// The first characters of the secret, to tell credentials apart.
    #[serde(default)]
    pub hint: Option<String>,
    /// Creation time.
    pub created_at: String,
    /// When it was revoked.
    #[serde(default)]
    pub revoked_at: Option<String>,
    /// The secret, present only when just created.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// Fields this client does not model.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// An agent (§12.1).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Agent {
    /// `agent_…`.
    pub id: String,
    /// `"agent"`.
    #[serde(rename = "type", default)]
    pub object: String,
    /// Display name.
    pub name: String,
    /// A model name, or an object with an `id` and settings.
    #[serde(default)]
    pub model: Value,
    /// Free text.
    #[serde(default)]
    pub description: Option<String>,
    /// System prompt.
    #[serde(default)]
    pub system: Option<String>,
    /// Tool definitions, stored as given.
    #[serde(default)]
    pub tools: Vec<Value>,
    /// Skills, stored as given.
    #[serde(default)]
    pub skills: Vec<Value>,
    /// MCP servers, stored as given.
    #[serde(default)]
    pub mcp_servers: Vec<Value>,
    /// Metadata map.
    #[serde(default)]
    pub metadata: Metadata,
    /// Starts at 1; every update adds 1.
    #[serde(default)]
    pub version: u32,
    /// Creation time.
    pub created_at: String,
    /// Last change.
    pub updated_at: String,
    /// When it was archived.
    #[serde(default)]
    pub archived_at: Option<String>,
    /// Fields this client does not model.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl Agent {
    /// The model's name: the string itself, or the `id` of a model object.
    pub fn model_name(&self) -> Option<&str> {
        self.model
            .as_str()
            .or_else(|| self.model.get("id").and_then(Value::as_str))
    }
}

/// Body of `POST /agents`.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct CreateAgent {
    /// Required, 1–64 characters.
    pub name: String,
    /// Required: a model name (`json!("model-name")`) or `{"id": …, …}`.
    pub model: Value,
    /// Free text.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// System prompt.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub system: Option<String>,
    /// Tool definitions.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tools: Option<Vec<Value>>,
    /// Skills.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub skills: Option<Vec<Value>>,
    /// MCP servers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mcp_servers: Option<Vec<Value>>,
    /// Initial metadata.
    #[serde(skip_serializing_if = "Metadata::is_empty")]
    pub metadata: Metadata,
    /// Further fields sent as given.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl CreateAgent {
    /// An agent with a name and a model name.
    pub fn new(name: impl Into<String>, model: impl Into<String>) -> Self {
        CreateAgent {
            name: name.into(),
            model: Value::String(model.into()),
            ..Default::default()
        }
    }
}

/// Body of `POST /agents/{id}`: only the fields set are changed; any change makes a new version.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct UpdateAgent {
    /// New name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// New model.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<Value>,
    /// New description.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// New system prompt.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub system: Option<String>,
    /// Replaces the tools.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tools: Option<Vec<Value>>,
    /// Replaces the skills.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub skills: Option<Vec<Value>>,
    /// Replaces the MCP servers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mcp_servers: Option<Vec<Value>>,
    /// Metadata merge patch.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metadata: Option<MetadataPatch>,
    /// Further fields sent as given.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// A session (§2.2, §12.2).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Session {
    /// `sess_…`.
    pub id: String,
    /// `"session"`.
    #[serde(rename = "type", default)]
    pub object: String,
    /// The agent at the version the session uses; workers read tools and prompt from here.
    pub agent: Agent,
    /// The agent's id.
    pub agent_id: String,
    /// The environment whose queue serves the session.
    pub environment_id: String,
    /// `idle`, `running`, `rescheduling` or `terminated`.
    pub status: SessionStatus,
    /// `idle` or `running`.
    #[serde(default)]
    pub turn_status: Option<String>,
    /// Optional title.
    #[serde(default)]
    pub title: Option<String>,
    /// Metadata map; copied into each new work item.
    #[serde(default)]
    pub metadata: Metadata,
    /// Variables for the worker's program.
    #[serde(default)]
    pub environment_variables: BTreeMap<String, String>,
    /// Resources, stored as given.
    #[serde(default)]
    pub resources: Vec<Value>,
    /// Creation time.
    pub created_at: String,
    /// Last change.
    pub updated_at: String,
    /// When it was archived (archiving does not change `status`).
    #[serde(default)]
    pub archived_at: Option<String>,
    /// Fields this client does not model.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// How a new session names its agent: by id (latest version) or pinned to a version.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AgentRef {
    /// The agent's current version.
    Id(String),
    /// A given version of the agent.
    Version {
        /// `agent_…`.
        id: String,
        /// The version to use.
        version: u32,
    },
}

impl Default for AgentRef {
    fn default() -> Self {
        AgentRef::Id(String::new())
    }
}

impl From<&str> for AgentRef {
    fn from(id: &str) -> Self {
        AgentRef::Id(id.to_owned())
    }
}

impl From<String> for AgentRef {
    fn from(id: String) -> Self {
        AgentRef::Id(id)
    }
}

impl Serialize for AgentRef {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            AgentRef::Id(id) => serializer.serialize_str(id),
            AgentRef::Version { id, version } => {
                json!({"type": "agent", "id": id, "version": version}).serialize(serializer)
            }
        }
    }
}

/// Body of `POST /sessions`.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct CreateSession {
    /// The agent.
    pub agent: AgentRef,
    /// The environment whose queue serves the session (a `self_hosted` one enqueues a work item).
    pub environment_id: String,
    /// Optional title.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    /// Metadata, copied into the session's work items.
    #[serde(skip_serializing_if = "Metadata::is_empty")]
    pub metadata: Metadata,
    /// Variables for the worker's program.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub environment_variables: BTreeMap<String, String>,
    /// User-side events appended right after creation, e.g. a first `user.message`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub initial_events: Vec<NewEvent>,
    /// Resources, stored as given.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resources: Option<Vec<Value>>,
    /// Further fields sent as given.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl CreateSession {
    /// A session of `agent` on `environment_id`.
    pub fn new(agent: impl Into<AgentRef>, environment_id: impl Into<String>) -> Self {
        CreateSession {
            agent: agent.into(),
            environment_id: environment_id.into(),
            ..Default::default()
        }
    }
}

/// Body of `POST /sessions/{id}`.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct UpdateSession {
    /// New title.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    /// Metadata merge patch.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metadata: Option<MetadataPatch>,
    /// Further fields sent as given.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// The answer to a cancel: `{id, type: "session", status: "canceling"}` while a turn was running,
/// else the whole session (its other fields land in `extra`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Cancel {
    /// `sess_…`.
    pub id: String,
    /// `"session"`.
    #[serde(rename = "type", default)]
    pub object: String,
    /// `canceling` (as [`SessionStatus::Other`]) when a turn is being interrupted, else the session's
    /// unchanged status.
    pub status: SessionStatus,
    /// The rest of the session, when the cancel was a no-op.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl Cancel {
    /// Whether a running turn is being interrupted.
    pub fn is_canceling(&self) -> bool {
        self.status.as_str() == "canceling"
    }
}

/// What a work item asks a worker to serve: `{"type": "session", "id": "sess_…"}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkData {
    /// `session` (the only kind Tether emits; a worker should force-stop anything else).
    #[serde(rename = "type")]
    pub kind: String,
    /// The id of what to serve.
    pub id: String,
}

/// A work item (§2.3, §11.3).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WorkItem {
    /// `work_…`.
    pub id: String,
    /// `"work"`.
    #[serde(rename = "type", default)]
    pub object: String,
    /// The owning environment.
    pub environment_id: String,
    /// What to serve.
    pub data: WorkData,
    /// Lifecycle state.
    pub state: WorkState,
    /// First enqueue time (unchanged by requeues).
    pub created_at: String,
    /// Set by a successful ack.
    #[serde(default)]
    pub acknowledged_at: Option<String>,
    /// Set by the first heartbeat.
    #[serde(default)]
    pub started_at: Option<String>,
    /// The newest accepted heartbeat.
    #[serde(default)]
    pub latest_heartbeat_at: Option<String>,
    /// When a stop was requested.
    #[serde(default)]
    pub stop_requested_at: Option<String>,
    /// When it reached `stopped`.
    #[serde(default)]
    pub stopped_at: Option<String>,
    /// Metadata (a snapshot of the session's at enqueue time, plus worker patches).
    #[serde(default)]
    pub metadata: Metadata,
    /// Credential payload; only on poll responses. Decode it with [`WorkItem::decode_secret`].
    #[serde(default)]
    pub secret: Option<String>,
    /// Polls that handed it out.
    #[serde(default)]
    pub delivery_count: Option<u64>,
    /// Lease expiries that sent it back to the queue.
    #[serde(default)]
    pub requeue_count: Option<u64>,
    /// Fields this client does not model.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl WorkItem {
    /// The session to serve, when the item is a session item.
    pub fn session_id(&self) -> Option<&str> {
        (self.data.kind == "session").then_some(self.data.id.as_str())
    }

    /// Decodes `secret`; `Ok(None)` when the item carries none (every response but a poll).
    pub fn decode_secret(&self) -> Result<Option<WorkSecret>> {
        self.secret.as_deref().map(WorkSecret::decode).transpose()
    }
}

/// The decoded `secret` of a polled work item (§11.1): the item's own bearer token and the base URL
/// (with the dialect prefix) the worker should call with it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkSecret {
    /// `tth_ses_…`: may heartbeat, stop, get and update this one item, read its session and agent, and
    /// post worker-side events to the session. Dies when the item is re-delivered or stops.
    pub sessions_token: String,
    /// e.g. `http://host:4780/api/v1/cloud`.
    #[serde(default)]
    pub api_base_url: Option<String>,
}

/// URL-safe base64 that accepts the secret with or without padding.
const SECRET_ENGINE: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::URL_SAFE,
    GeneralPurposeConfig::new()
        .with_encode_padding(false)
        .with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

impl WorkSecret {
    /// Decodes the URL-safe base64 JSON payload.
    pub fn decode(secret: &str) -> Result<WorkSecret> {
        let bytes = SECRET_ENGINE
            .decode(secret.trim())
            .map_err(|e| Error::Secret(format!("not URL-safe base64: {e}")))?;
        serde_json::from_slice(&bytes)
            .map_err(|e| Error::Secret(format!("not the expected JSON object: {e}")))
    }

    /// The wire form: URL-safe base64 without padding of the JSON object.
    pub fn encode(&self) -> String {
        let json = serde_json::to_vec(self).expect("a WorkSecret always serializes");
        SECRET_ENGINE.encode(json)
    }
}

/// The answer to a heartbeat (§2.4).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// `"work_heartbeat"`.
    #[serde(rename = "type", default)]
    pub object: String,
    /// Echo this verbatim as `expected_last_heartbeat` on the next call.
    pub last_heartbeat: String,
    /// Whether the lease was pushed forward; `false` means stop working on the item.
    pub lease_extended: bool,
    /// `active`, or `stopping` when a stop was requested.
    pub state: WorkState,
    /// The lease length now in force.
    pub ttl_seconds: u32,
    /// Fields this client does not model.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// Queue statistics (§2.5, §11.3).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct QueueStats {
    /// `"work_queue_stats"`.
    #[serde(rename = "type", default)]
    pub object: String,
    /// Queued items claimable now.
    pub depth: u64,
    /// Queued items delivered and not yet acknowledged.
    pub pending: u64,
    /// The oldest enqueue instant over all queued items.
    #[serde(default)]
    pub oldest_queued_at: Option<String>,
    /// Distinct worker ids that polled in the last 30 s.
    #[serde(default)]
    pub workers_polling: Option<u64>,
    /// Live items per state (a Tether addition).
    #[serde(default)]
    pub states: BTreeMap<String, u64>,
    /// Fields this client does not model.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// One entry of a work item's history (§11.2).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WorkTransition {
    /// `"work_transition"`.
    #[serde(rename = "type", default)]
    pub object: String,
    /// When it happened.
    pub at: String,
    /// The state before (`None` for the first enqueue).
    #[serde(default)]
    pub from: Option<WorkState>,
    /// The state after.
    pub to: WorkState,
    /// `enqueued`, `delivered`, `acked`, `lease_expired_requeued`, …
    pub cause: String,
    /// The worker involved, if known.
    #[serde(default)]
    pub worker_id: Option<String>,
    /// Extra explanation.
    #[serde(default)]
    pub detail: Option<Value>,
    /// Fields this client does not model.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// A page of a work item's history, with its heartbeat count.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WorkHistory {
    /// The item.
    #[serde(default)]
    pub work_id: Option<String>,
    /// Transitions, oldest first.
    pub data: Vec<WorkTransition>,
    /// Cursor of the first entry.
    #[serde(default)]
    pub first_id: Option<String>,
    /// Cursor of the last entry.
    #[serde(default)]
    pub last_id: Option<String>,
    /// Whether more entries follow.
    #[serde(default)]
    pub has_more: bool,
    /// Cursor for the next page.
    #[serde(default)]
    pub next_page: Option<String>,
    /// Heartbeats that only extended the lease (not listed one by one).
    #[serde(default)]
    pub heartbeat_count: Option<u64>,
}

/// A worker seen polling an environment recently (§11.4).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Worker {
    /// The `Worker-ID` it sends.
    pub worker_id: String,
    /// Its latest poll.
    pub last_poll_at: String,
    /// The live items it holds.
    #[serde(default)]
    pub items: Vec<WorkerItem>,
    /// Fields this client does not model.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// A live item held by a worker.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WorkerItem {
    /// `work_…`.
    pub id: String,
    /// Its state.
    pub state: WorkState,
    /// The session it serves.
    #[serde(default)]
    pub session_id: Option<String>,
}

/// A stored session event (§12.3): `id`, `type`, `processed_at` and the type's own fields.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// `evt_…`; the log is ordered by it.
    pub id: String,
    /// e.g. `user.message`, `agent.tool_use`, `session.status_idle`.
    #[serde(rename = "type")]
    pub kind: String,
    /// When the server stored it.
    #[serde(default)]
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
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_states_survive_a_round_trip() {
        let s: WorkState = serde_json::from_value(json!("paused")).unwrap();
        assert_eq!(s, WorkState::Other("paused".into()));
        assert_eq!(serde_json::to_value(&s).unwrap(), json!("paused"));
        let s: WorkState = serde_json::from_value(json!("active")).unwrap();
        assert_eq!(s, WorkState::Active);
        assert!(s.is_live());
    }

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
    fn secrets_decode_with_or_without_padding() {
        let secret = WorkSecret {
            sessions_token: "tth_ses_abc".into(),
            api_base_url: Some("http://h:1/api/v1/cloud".into()),
        };
        let encoded = secret.encode();
        assert!(!encoded.contains('='));
        assert_eq!(WorkSecret::decode(&encoded).unwrap(), secret);
        let padded =
            base64::engine::general_purpose::URL_SAFE.encode(serde_json::to_vec(&secret).unwrap());
        assert_eq!(WorkSecret::decode(&padded).unwrap(), secret);
        assert!(matches!(WorkSecret::decode("!!!"), Err(Error::Secret(_))));
        assert!(matches!(
            WorkSecret::decode(&SECRET_ENGINE.encode(b"[1]")),
            Err(Error::Secret(_))
        ));
    }

    #[test]
    fn agent_refs_serialize_as_id_or_object() {
        assert_eq!(
            serde_json::to_value(AgentRef::from("agent_1")).unwrap(),
            json!("agent_1")
        );
        assert_eq!(
            serde_json::to_value(AgentRef::Version {
                id: "agent_1".into(),
                version: 2
            })
            .unwrap(),
            json!({"type": "agent", "id": "agent_1", "version": 2})
        );
    }

    #[test]
    fn metadata_patches_send_null_for_deletions() {
        let update = UpdateEnvironment {
            metadata: Some(MetadataPatch::from([
                ("keep".to_owned(), Some("v".to_owned())),
                ("drop".to_owned(), None),
            ])),
            ..Default::default()
        };
        assert_eq!(
            serde_json::to_value(update).unwrap(),
            json!({"metadata": {"keep": "v", "drop": null}})
        );
    }

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

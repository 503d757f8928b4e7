//! Environments, agents, sessions, credentials and the small bodies around them (§2, §7.1, §11, §12).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use utoipa::ToSchema;

use crate::{Metadata, SessionStatus};

/// The stub a delete returns: `{"id": …, "type": "environment_deleted" | "session_deleted"}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Deleted {
    /// The id of what was deleted.
    pub id: String,
    /// `environment_deleted` or `session_deleted`.
    #[serde(rename = "type")]
    #[schema(pattern = "^(environment|session)_deleted$")]
    pub object: String,
}

/// An environment's `config`: `{"type":"self_hosted", "setup_script"?}` owns a work queue; `cloud`
/// (alias `managed`) is stored but never runs anything. Other members are kept as given.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct EnvironmentConfig {
    /// `self_hosted`, `cloud` or `managed`.
    #[serde(rename = "type")]
    #[schema(pattern = "^(self_hosted|cloud|managed)$")]
    pub kind: String,
    /// Run once by the worker before a session's program (self-hosted only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub setup_script: Option<String>,
    /// Further settings (`networking`, `packages`, …), stored as given.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// An environment (§2.1).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Environment {
    /// `env_…`.
    pub id: String,
    /// `"environment"`.
    #[serde(rename = "type", default)]
    #[schema(pattern = "^environment$")]
    pub object: String,
    /// Display name.
    pub name: String,
    /// Free text (`null` is possible in the Anthropic dialect).
    #[serde(default)]
    #[schema(required = true)]
    pub description: Option<String>,
    /// `{"type": "self_hosted", …}` or `{"type": "cloud", …}`.
    #[serde(default)]
    #[schema(value_type = EnvironmentConfig)]
    pub config: Value,
    /// Metadata map.
    #[serde(default)]
    pub metadata: Metadata,
    /// Anthropic dialect only.
    #[serde(default)]
    pub scope: Option<String>,
    /// `ready` or `archived` (a Tether addition).
    #[serde(default)]
    #[schema(pattern = "^(ready|archived)$")]
    pub status: Option<String>,
    /// Mirrors `archived_at != null` (a Tether addition).
    #[serde(default)]
    pub archived: Option<bool>,
    /// When it was archived.
    #[serde(default)]
    #[schema(required = true, format = DateTime)]
    pub archived_at: Option<String>,
    /// Creation time (RFC 3339).
    #[schema(format = DateTime)]
    pub created_at: String,
    /// Last change (RFC 3339).
    #[schema(format = DateTime)]
    pub updated_at: String,
    /// Fields this crate does not model.
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

/// An admin token or an environment key (§11.1). `token` carries the secret only in the answer to a
/// create, the one time it is shown.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Credential {
    /// `tok_…` (admin token) or `envkey_…` (environment key); revoke it by this id.
    pub id: String,
    /// `token` (admin) or `environment_key`.
    #[serde(rename = "type", default)]
    #[schema(pattern = "^(token|environment_key)$")]
    pub object: String,
    /// Optional label.
    #[serde(default)]
    #[schema(required = true)]
    pub name: Option<String>,
    /// For environment keys, the environment they serve.
    #[serde(default)]
    #[schema(required = true)]
    pub environment_id: Option<String>,
    /// The first characters of the secret, to tell credentials apart.
    #[serde(default)]
    #[schema(required = true)]
    pub hint: Option<String>,
    /// Creation time.
    #[schema(format = DateTime)]
    pub created_at: String,
    /// When it was revoked.
    #[serde(default)]
    #[schema(required = true, format = DateTime)]
    pub revoked_at: Option<String>,
    /// The secret, present only when just created.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// Fields this crate does not model.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// An agent at one version (§12.1).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Agent {
    /// `agent_…`.
    pub id: String,
    /// `"agent"`.
    #[serde(rename = "type", default)]
    #[schema(pattern = "^agent$")]
    pub object: String,
    /// Display name.
    pub name: String,
    /// A model name, or an object with an `id` and settings. Under /v1 a name is always shown as
    /// `{"id": name}`.
    #[serde(default)]
    pub model: Value,
    /// Free text.
    #[serde(default)]
    #[schema(required = true)]
    pub description: Option<String>,
    /// System prompt.
    #[serde(default)]
    #[schema(required = true)]
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
    /// `{"type": "service_account" | "aws_role" | …, …}`, stored as given; `null` when none was set
    /// (under /v1, `{"type": "service_account"}`).
    #[serde(default)]
    #[schema(required = true, value_type = Option<Object>)]
    pub execution_identity: Option<Value>,
    /// Metadata map.
    #[serde(default)]
    pub metadata: Metadata,
    /// Starts at 1; every update adds 1.
    #[serde(default)]
    pub version: u32,
    /// Creation time.
    #[schema(format = DateTime)]
    pub created_at: String,
    /// Last change.
    #[schema(format = DateTime)]
    pub updated_at: String,
    /// When it was archived.
    #[serde(default)]
    #[schema(required = true, format = DateTime)]
    pub archived_at: Option<String>,
    /// Fields this crate does not model.
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

/// A session's `stats` (always zero: Tether does not meter sessions; the Anthropic SDK requires it).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct SessionStats {
    /// Seconds spent running.
    #[serde(default)]
    pub active_seconds: u64,
    /// Seconds since creation.
    #[serde(default)]
    pub duration_seconds: u64,
    /// Fields this crate does not model.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// A session's `usage` (always zero, as [`SessionStats`]).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct SessionUsage {
    /// Credits used.
    #[serde(default)]
    pub total_credits: u64,
    /// Fields this crate does not model.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// A session (§2.2, §12.2). Workers iterate `resources` and `agent.skills`, and the Anthropic SDK
/// requires `outcome_evaluations`, `stats`, `usage` and `vault_ids`: the server always sends them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Session {
    /// `sess_…`.
    pub id: String,
    /// `"session"`.
    #[serde(rename = "type", default)]
    #[schema(pattern = "^session$")]
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
    #[schema(required = true)]
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
    /// Always empty.
    #[serde(default)]
    pub vault_ids: Vec<String>,
    /// Always empty.
    #[serde(default)]
    pub memory_store_ids: Vec<String>,
    /// Always `null`.
    #[serde(default)]
    pub deployment_id: Option<String>,
    /// Always empty.
    #[serde(default)]
    pub outcome_evaluations: Vec<Value>,
    /// Always zero.
    #[serde(default)]
    pub stats: SessionStats,
    /// Always zero.
    #[serde(default)]
    pub usage: SessionUsage,
    /// Creation time.
    #[schema(format = DateTime)]
    pub created_at: String,
    /// Last change.
    #[schema(format = DateTime)]
    pub updated_at: String,
    /// When it was archived (archiving does not change `status`).
    #[serde(default)]
    #[schema(required = true, format = DateTime)]
    pub archived_at: Option<String>,
    /// Fields this crate does not model.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// The 202 answer to a cancel that interrupted a running turn.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Canceling {
    /// `sess_…`.
    pub id: String,
    /// `"session"`.
    #[serde(rename = "type")]
    #[schema(pattern = "^session$")]
    pub object: String,
    /// `"canceling"`.
    #[schema(pattern = "^canceling$")]
    pub status: String,
}

impl Canceling {
    /// The answer for session `id`.
    pub fn new(id: impl Into<String>) -> Canceling {
        Canceling {
            id: id.into(),
            object: "session".into(),
            status: "canceling".into(),
        }
    }
}

/// The answer to a cancel as a reader sees it: `{id, type: "session", status: "canceling"}` while a
/// turn was running, else the whole session (its other fields land in `extra`).
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

/// Process or store health (§11.4).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Health {
    /// `ok` (the process) or `ready` (the store answers).
    pub status: String,
    /// The store's backend, on readiness.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store: Option<String>,
}

/// The error envelope (§1.7).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[schema(as = Error)]
pub struct ErrorEnvelope {
    /// `"error"`.
    #[serde(rename = "type")]
    #[schema(pattern = "^error$")]
    pub object: String,
    /// The request's id (also in the `x-request-id` and `request-id` headers).
    pub request_id: String,
    /// What went wrong.
    pub error: ErrorBody,
}

/// What went wrong.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    /// `invalid_request_error`, `authentication_error`, `not_found_error`, …
    #[serde(rename = "type")]
    pub kind: String,
    /// For people.
    pub message: String,
    /// The parameter or field at fault.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub param: Option<String>,
    /// A machine-readable reason.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    /// Further facts (e.g. `lease_amnesty_ms`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub details: Option<Value>,
}

//! Request bodies, as the server deserializes them and clients send them. None keeps a flattened
//! `extra` map: serde ignores unknown fields anyway (§1.3), and a flattened map would hide the failing
//! field's path, which the server's field errors name (`param`).

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{json, Value};
use utoipa::openapi::schema::{ObjectBuilder, OneOfBuilder, Schema, Type};
use utoipa::openapi::RefOr;
use utoipa::ToSchema;

use crate::events::NewEvent;
use crate::resources::EnvironmentConfig;
use crate::{Metadata, MetadataPatch};

/// Body of `POST /environments`. `config` is required under /api/v1/cloud; under /v1 its absence means
/// a cloud environment.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct CreateEnvironment {
    /// 1 to 256 characters, not all blank.
    #[schema(min_length = 1, max_length = 256, pattern = r"\S")]
    pub name: String,
    /// Optional free text, at most 65,536 characters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(max_length = 65536)]
    pub description: Option<String>,
    /// `{"type": "self_hosted"}` makes a work queue.
    #[serde(default)]
    #[schema(value_type = Option<EnvironmentConfig>)]
    pub config: Value,
    /// Initial metadata: at most 16 keys of 1 to 64 characters, values of at most 512. `null` means none.
    #[serde(
        default,
        skip_serializing_if = "Metadata::is_empty",
        deserialize_with = "null_as_default"
    )]
    #[schema(schema_with = crate::schemas::metadata_map)]
    pub metadata: Metadata,
    /// `organization` or `account` (Anthropic dialect).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
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

/// Body of `POST /environments/{id}`: only the fields set are changed; `config.type` cannot change.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct UpdateEnvironment {
    /// New name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(min_length = 1, max_length = 256, pattern = r"\S")]
    pub name: Option<String>,
    /// New description, at most 65,536 characters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(max_length = 65536)]
    pub description: Option<String>,
    /// Replaces the whole config; its `type` cannot change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<EnvironmentConfig>)]
    pub config: Option<Value>,
    /// Metadata merge patch: a string sets a key, null deletes it, absent keys stay.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(schema_with = crate::schemas::metadata_patch)]
    pub metadata: Option<MetadataPatch>,
}

/// Body of `POST /tokens` and `POST /environments/{id}/keys`: without `name` the credential has none.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct CreateCredential {
    /// 1 to 256 characters, not all blank. Omit it for none: `null` is refused.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "present"
    )]
    #[schema(nullable = false, min_length = 1, max_length = 256, pattern = r"\S")]
    pub name: Option<String>,
}

/// A field that may be omitted but, when sent, must hold a value: `null` is refused rather than read as
/// "none", since a `null` standing for "no name" hides a client's bug.
fn present<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    deserializer: D,
) -> Result<Option<T>, D::Error> {
    T::deserialize(deserializer).map(Some)
}

/// A field whose `null` means the same as its absence: the type's default.
fn null_as_default<'de, D: Deserializer<'de>, T: Deserialize<'de> + Default>(
    deserializer: D,
) -> Result<T, D::Error> {
    Option::<T>::deserialize(deserializer).map(Option::unwrap_or_default)
}

/// A list that may be omitted (no change) or sent as `null`, which means the empty list.
fn null_as_empty<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    deserializer: D,
) -> Result<Option<Vec<T>>, D::Error> {
    Option::<Vec<T>>::deserialize(deserializer).map(|list| Some(list.unwrap_or_default()))
}

/// Body of `POST /agents`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct CreateAgent {
    /// Required, 1–64 characters.
    #[schema(min_length = 1, max_length = 64, pattern = r"\S")]
    pub name: String,
    /// Required: a model name (`json!("model-name")`) or `{"id": …, …}`.
    pub model: Value,
    /// Free text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// System prompt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system: Option<String>,
    /// Tool definitions: objects, stored as given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Vec<Object>>)]
    pub tools: Option<Vec<Value>>,
    /// Skills.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skills: Option<Vec<Value>>,
    /// MCP servers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mcp_servers: Option<Vec<Value>>,
    /// `{"type": …, …}`, stored as given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub execution_identity: Option<Value>,
    /// Initial metadata. `null` means none.
    #[serde(
        default,
        skip_serializing_if = "Metadata::is_empty",
        deserialize_with = "null_as_default"
    )]
    #[schema(schema_with = crate::schemas::metadata_map)]
    pub metadata: Metadata,
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
/// `version`, when given, must be the current version (else 409 and nothing changes).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct UpdateAgent {
    /// The version the caller last saw.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1)]
    pub version: Option<u32>,
    /// New name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(min_length = 1, max_length = 64, pattern = r"\S")]
    pub name: Option<String>,
    /// New model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<Value>,
    /// New description.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// New system prompt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system: Option<String>,
    /// Replaces the tools (objects); `null` clears them.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "null_as_empty"
    )]
    #[schema(value_type = Option<Vec<Object>>)]
    pub tools: Option<Vec<Value>>,
    /// Replaces the skills; `null` clears them.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "null_as_empty"
    )]
    pub skills: Option<Vec<Value>>,
    /// Replaces the MCP servers; `null` clears them.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "null_as_empty"
    )]
    pub mcp_servers: Option<Vec<Value>>,
    /// Replaces the execution identity; `Some(Value::Null)` (a `null` sent) removes it.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "present"
    )]
    #[schema(value_type = Option<Object>)]
    pub execution_identity: Option<Value>,
    /// Metadata merge patch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(schema_with = crate::schemas::metadata_patch)]
    pub metadata: Option<MetadataPatch>,
}

/// How a new session names its agent: by id (latest version) or pinned to a version
/// (`{"type": "agent", "id": …, "version": …}`).
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

impl utoipa::PartialSchema for AgentRef {
    fn schema() -> RefOr<Schema> {
        let pinned = ObjectBuilder::new()
            .schema_type(Type::Object)
            .description(Some("An agent at a version."))
            .property(
                "type",
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .enum_values(Some(["agent"])),
            )
            .property("id", ObjectBuilder::new().schema_type(Type::String))
            .required("id")
            .property(
                "version",
                ObjectBuilder::new()
                    .schema_type(Type::Integer)
                    .minimum(Some(1)),
            );
        OneOfBuilder::new()
            .item(ObjectBuilder::new().schema_type(Type::String))
            .item(pinned)
            .into()
    }
}

impl ToSchema for AgentRef {}

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

impl<'de> Deserialize<'de> for AgentRef {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        AgentRef::from_json(Value::deserialize(deserializer)?).map_err(serde::de::Error::custom)
    }
}

impl AgentRef {
    /// Reads an agent reference, refusing anything else in the API's words (the server reports them
    /// under `param: "agent"`). `{"type": "agent", "id": …}` without a version is the current version.
    fn from_json(value: Value) -> Result<AgentRef, String> {
        let mut fields = match value {
            Value::String(id) => return Ok(AgentRef::Id(id)),
            Value::Object(fields) => fields,
            Value::Null => return Err("agent is required".to_owned()),
            _ => {
                return Err(
                    "agent must be an agent id or {\"type\": \"agent\", \"id\": …}".to_owned(),
                )
            }
        };
        // Both SDKs also offer `{"type":"agent_with_overrides", …}`. Serving it as a plain reference
        // would silently drop the overrides, so anything but `agent` is refused.
        match fields.get("type") {
            None | Some(Value::Null) => {}
            Some(Value::String(kind)) if kind == "agent" => {}
            Some(other) => {
                return Err(format!(
                    "agent.type {other} is not supported: send an agent id or \
                     {{\"type\": \"agent\", \"id\": …, \"version\": …}}"
                ))
            }
        }
        let Some(Value::String(id)) = fields.remove("id") else {
            return Err("agent.id is required".to_owned());
        };
        match fields.remove("version") {
            None | Some(Value::Null) => Ok(AgentRef::Id(id)),
            Some(version) => version
                .as_u64()
                .filter(|v| *v >= 1)
                .and_then(|v| u32::try_from(v).ok())
                .map(|version| AgentRef::Version { id, version })
                .ok_or_else(|| "agent.version must be a positive integer".to_owned()),
        }
    }
}

/// Body of `POST /sessions`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct CreateSession {
    /// The agent: its id, or `{"type": "agent", "id": …, "version"?: …}`.
    pub agent: AgentRef,
    /// The environment whose queue serves the session (a `self_hosted` one enqueues a work item).
    pub environment_id: String,
    /// Optional title, at most 512 characters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(max_length = 512)]
    pub title: Option<String>,
    /// Metadata, copied into the session's work items. `null` means none.
    #[serde(
        default,
        skip_serializing_if = "Metadata::is_empty",
        deserialize_with = "null_as_default"
    )]
    #[schema(schema_with = crate::schemas::metadata_map)]
    pub metadata: Metadata,
    /// Variables for the worker's program. `null` means none.
    #[serde(
        default,
        skip_serializing_if = "BTreeMap::is_empty",
        deserialize_with = "null_as_default"
    )]
    pub environment_variables: BTreeMap<String, String>,
    /// User-side events appended right after creation, e.g. a first `user.message` (see
    /// [`PostEvents::events`] for why they are JSON values here).
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "null_as_default"
    )]
    #[schema(value_type = Vec<NewEvent>, max_items = 100)]
    pub initial_events: Vec<Value>,
    /// Resources, stored as given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<Vec<Value>>,
    /// A budget, stored as given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub budget: Option<Value>,
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

    /// Adds events to append right after creation.
    pub fn with_initial_events(mut self, events: impl IntoIterator<Item = NewEvent>) -> Self {
        self.initial_events
            .extend(events.into_iter().map(Value::from));
        self
    }
}

/// Body of `POST /sessions/{id}`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct UpdateSession {
    /// New title.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(max_length = 512)]
    pub title: Option<String>,
    /// Metadata merge patch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(schema_with = crate::schemas::metadata_patch)]
    pub metadata: Option<MetadataPatch>,
}

/// Body of `POST /environments/{id}/work/{work_id}`: a metadata merge patch.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct WorkMetadataPatch {
    /// A string sets a key, null deletes it, absent keys stay.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(schema_with = crate::schemas::metadata_patch)]
    pub metadata: Option<MetadataPatch>,
}

/// Body of `POST …/work/claim` (Tether's claim), optional: what the claim does before it takes
/// anything.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ClaimRequest {
    /// The item whose program has ended, stopped first, so that a worker taking one item after
    /// another sends one request per item. If the stop is refused, that is the answer, and nothing
    /// is claimed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop: Option<StopWithClaim>,
}

/// The header of a claim's answer that names the item its `stop` ended (or found stopped). A server
/// that does not know `stop` ignores the body and claims all the same: without the header, the
/// item is not stopped.
pub const STOPPED_HEADER: &str = "tether-stopped";

/// The stop a claim makes first: the holder's own forced stop of an item of the claim's
/// environment, proven by the item's session token, as a stop sent with that token would be. An
/// item already stopped counts as stopped (a try of the claim whose answer was lost may have
/// stopped it); a token that no longer holds the item (its lease ran out, it went to another
/// worker) is refused with 409 `not_held`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct StopWithClaim {
    /// The item's id.
    pub work_id: String,
    /// The item's session token (`tth_ses_…`, from its `secret`).
    pub session_token: String,
    /// As a stop's `unless_turn_open`: refused (409 `turn_open`) while the item's session has a
    /// turn open.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unless_turn_open: Option<bool>,
}

impl StopWithClaim {
    /// The stop of `work_id`, proven by its `session_token`.
    pub fn new(work_id: impl Into<String>, session_token: impl Into<String>) -> StopWithClaim {
        StopWithClaim {
            work_id: work_id.into(),
            session_token: session_token.into(),
            unless_turn_open: None,
        }
    }
}

/// Body of `POST …/work/{work_id}/stop`: `force: true` stops at once; otherwise a graceful stop (or its
/// confirmation).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct StopRequest {
    /// Stop at once. `null` is a graceful stop, as absent: the Qoder SDK's `stop` takes
    /// `force=None` and sends it so.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub force: Option<bool>,
    /// Tether extension, for an operator stopping an item its worker is running: the worker learns
    /// of the stop only at its next heartbeat, so the session's next item is not handed out before
    /// the stopped lease's deadline. Absent, an admin token's stop on `/v1` holds (no worker holds
    /// an admin token there); any other is taken as the worker's own, sent once its program ended
    /// (SPEC §8, step 5), and holds nothing. Ignored with the item's session token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hold_next_item: Option<bool>,
    /// Tether extension, for a worker whose program has ended well: a forced stop of a `starting`
    /// or `active` item goes ahead only if the session has no turn open (status `running` or
    /// `rescheduling` with no input waiting for a fresh item). Otherwise nothing changes and the
    /// answer is 409 with code `turn_open`, `details.turn` (which turn: the count of turns input
    /// has started) and `details.session_updated_at`: input came while the
    /// program was ending, which the item's end would turn into a failed turn though nothing read
    /// it, and the worker runs its program again for it instead. Other stops ignore it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unless_turn_open: Option<bool>,
}

/// Body of `POST …/work/{work_id}/requeue` (a Tether extension): why the item is requeued (kept in the
/// history of both items, at most 500 characters).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct RequeueRequest {
    /// Free text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(max_length = 500)]
    pub reason: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_refs_serialize_as_id_or_object() {
        assert_eq!(
            serde_json::to_value(AgentRef::from("agent_1")).unwrap(),
            json!("agent_1")
        );
        let pinned = AgentRef::Version {
            id: "agent_1".into(),
            version: 2,
        };
        let wire = serde_json::to_value(&pinned).unwrap();
        assert_eq!(
            wire,
            json!({"type": "agent", "id": "agent_1", "version": 2})
        );
        assert_eq!(serde_json::from_value::<AgentRef>(wire).unwrap(), pinned);
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
}

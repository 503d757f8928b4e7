//! Agents (§12.1).

use serde_json::Value;
use tether_core::ids::{self, IdKind};
use tether_core::metadata::{self, Metadata, MetadataPatch};
use tether_core::resources::Agent;
use tether_store::{ArchiveFilter, ChangeSet, Page, PageRequest, Versioned, Write};

use super::{with_retries, App, Error, Missing, Result, Retry};

/// The longest agent name (§12.1).
pub const MAX_NAME_CHARS: usize = 64;

/// An optional object that must name itself with a non-empty string `field` (stored as given), or —
/// when `name_alone` — that bare name as a string.
fn named_object(
    value: Option<&Value>,
    field: &str,
    name_alone: bool,
    param: &str,
    message: &str,
) -> Result<Option<Value>> {
    let names_itself = |m: &serde_json::Map<String, Value>| {
        m.get(field)
            .and_then(Value::as_str)
            .is_some_and(|s| !s.is_empty())
    };
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if name_alone && !s.is_empty() => Ok(Some(Value::String(s.clone()))),
        Some(v @ Value::Object(m)) if names_itself(m) => Ok(Some(v.clone())),
        Some(_) => Err(Error::invalid(param, message)),
    }
}

/// `model`: a model name, or an object with a string `id` and further settings (§12.1).
fn model(value: Option<&Value>) -> Result<Option<Value>> {
    named_object(
        value,
        "id",
        true,
        "model",
        "model must be a model name or an object with a string \"id\"",
    )
}

/// `execution_identity`: an object naming its `type` (`service_account`, `aws_role`, …), stored as given.
fn execution_identity(value: Option<&Value>) -> Result<Option<Value>> {
    named_object(
        value,
        "type",
        false,
        "execution_identity",
        "execution_identity must be an object with a string \"type\"",
    )
}

/// `tools`: an array of objects, stored as given (§12.1). Workers read each one from the session's
/// agent, so an element that is no definition at all (`null`, a string) is refused here rather than
/// handed to every worker. `skills` and `mcp_servers` have no element type in the spec and are
/// stored as given.
fn tools(given: Option<Vec<Value>>) -> Result<Option<Vec<Value>>> {
    if let Some(at) = given.iter().flatten().position(|tool| !tool.is_object()) {
        return Err(Error::invalid(
            "tools",
            format!("tools must be an array of objects: tools[{at}] is not an object"),
        ));
    }
    Ok(given)
}

/// The optional `version` of an update: the version the caller last saw (both official SDKs send it as
/// an optimistic-concurrency precondition).
fn expected_version(version: Option<u32>) -> Result<Option<u32>> {
    match version {
        Some(0) => Err(Error::invalid(
            "version",
            "version must be a positive integer",
        )),
        other => Ok(other),
    }
}

/// A new agent.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct NewAgent {
    pub name: String,
    /// A model name or `{"id": …, …}`; required (`None` is refused).
    pub model: Option<Value>,
    pub description: Option<String>,
    pub system: Option<String>,
    /// `None` reads as the empty list.
    pub tools: Option<Vec<Value>>,
    pub skills: Option<Vec<Value>>,
    pub mcp_servers: Option<Vec<Value>>,
    /// `{"type": …, …}`, stored as given.
    pub execution_identity: Option<Value>,
    pub metadata: Metadata,
}

/// The changes of an agent update: only what is set changes, and any change makes a new version.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AgentChanges {
    /// The version the caller last saw: when given, it must be the current one.
    pub version: Option<u32>,
    pub name: Option<String>,
    pub model: Option<Value>,
    pub description: Option<String>,
    pub system: Option<String>,
    pub tools: Option<Vec<Value>>,
    pub skills: Option<Vec<Value>>,
    pub mcp_servers: Option<Vec<Value>>,
    /// `Some(None)` removes the execution identity.
    pub execution_identity: Option<Option<Value>>,
    /// A merge patch: a value sets its key, `None` deletes it, keys not named stay.
    pub metadata: Option<MetadataPatch>,
}

impl App {
    pub(crate) async fn agent_versioned(&self, id: &str) -> Result<Versioned<Agent>> {
        if !ids::is_well_formed(IdKind::Agent, id) {
            return Err(not_found_agent(id));
        }
        self.store
            .get_agent(id)
            .await?
            .ok_or_else(|| not_found_agent(id))
    }

    pub async fn agent(&self, id: &str) -> Result<Agent> {
        Ok(self.agent_versioned(id).await?.value)
    }

    /// One version of an agent, as sessions created on it see it.
    pub async fn agent_version(&self, id: &str, version: i64) -> Result<Agent> {
        let version = u32::try_from(version)
            .ok()
            .filter(|v| *v >= 1)
            .ok_or_else(|| Error::invalid("version", "version must be a positive integer"))?;
        self.agent_versioned(id).await?;
        self.store
            .get_agent_version(id, version)
            .await?
            .ok_or_else(|| Error::not_found(Missing::AgentVersion(version), id))
    }

    pub async fn create_agent(&self, command: NewAgent) -> Result<Agent> {
        self.disk.room_to_grow()?;
        let name = super::bounded_name(command.name, "name", MAX_NAME_CHARS)?;
        let model = model(command.model.as_ref())?
            .ok_or_else(|| Error::invalid("model", "model is required"))?;
        let execution_identity = execution_identity(command.execution_identity.as_ref())?;
        let tools = tools(command.tools)?;
        metadata::validate(&command.metadata)?;
        let now = self.now();
        let agent = Agent {
            id: ids::new_id(IdKind::Agent),
            name,
            model,
            description: command.description,
            system: command.system,
            tools: list(tools),
            skills: list(command.skills),
            mcp_servers: list(command.mcp_servers),
            execution_identity,
            metadata: command.metadata,
            version: 1,
            created_at: now,
            updated_at: now,
            archived_at: None,
        };
        self.commit(ChangeSet::one(Write::InsertAgent(agent.clone())))
            .await?;
        Ok(agent)
    }

    pub async fn list_agents(
        &self,
        filter: &ArchiveFilter,
        page: &PageRequest,
    ) -> Result<Page<Agent>> {
        super::in_list_order(
            page,
            |a: &Agent| &a.id,
            |page| async move { Ok(self.store.list_agents(filter, &page).await?) },
        )
        .await
    }

    /// Partial update; every accepted update makes a new version (§12.1). A `version` in the body must
    /// equal the current version, else nothing changes and the answer is 409 (docs/dialects.md).
    /// Refused while the disk is low ([`crate::disk`]): every update keeps a new version.
    pub async fn update_agent(&self, id: &str, changes: AgentChanges) -> Result<Agent> {
        self.disk.room_to_grow()?;
        let name = changes
            .name
            .map(|n| super::bounded_name(n, "name", MAX_NAME_CHARS))
            .transpose()?;
        let model = model(changes.model.as_ref())?;
        let description = changes.description;
        let system = changes.system;
        let arrays: Vec<(&str, Option<Value>)> = vec![
            ("tools", tools(changes.tools)?.map(Value::Array)),
            ("skills", changes.skills.map(Value::Array)),
            ("mcp_servers", changes.mcp_servers.map(Value::Array)),
        ];
        let identity = match changes.execution_identity {
            None => None,
            Some(given) => Some(execution_identity(given.as_ref())?),
        };
        let expected = expected_version(changes.version)?;
        let patch = changes.metadata;
        with_retries(|| async {
            let current = self.agent_versioned(id).await?;
            if current.value.archived_at.is_some() {
                return Err(Retry::Fail(Error::malformed("the agent is archived")));
            }
            if let Some(expected) = expected {
                if expected != current.value.version {
                    return Err(Retry::Fail(Error::VersionMismatch {
                        current: current.value.version,
                        expected,
                    }));
                }
            }
            let mut next = current.value.clone();
            if let Some(v) = &name {
                next.name = v.clone();
            }
            if let Some(v) = &model {
                next.model = v.clone();
            }
            if description.is_some() {
                next.description = description.clone();
            }
            if system.is_some() {
                next.system = system.clone();
            }
            if let Some(v) = &identity {
                next.execution_identity = v.clone();
            }
            for (field, value) in &arrays {
                if let Some(value) = value {
                    match *field {
                        "tools" => next.tools = value.clone(),
                        "skills" => next.skills = value.clone(),
                        _ => next.mcp_servers = value.clone(),
                    }
                }
            }
            if let Some(patch) = &patch {
                next.metadata = metadata::merge(&next.metadata, patch)?;
            }
            next.version = current.value.version + 1;
            next.updated_at = self.now();
            Ok(self.replace_agent(&current, next).await?)
        })
        .await
    }

    /// Writes `next` over the version `current` was read at; a write since then makes this a
    /// conflict, so the caller reads again and decides again.
    async fn replace_agent(
        &self,
        current: &Versioned<Agent>,
        next: Agent,
    ) -> tether_store::StoreResult<Agent> {
        self.commit(ChangeSet::one(Write::UpdateAgent {
            agent: next.clone(),
            expected_version: current.version,
        }))
        .await?;
        Ok(next)
    }

    pub async fn archive_agent(&self, id: &str) -> Result<Agent> {
        with_retries(|| async {
            let current = self.agent_versioned(id).await?;
            if current.value.archived_at.is_some() {
                return Err(Retry::Fail(Error::AlreadyArchived { what: "agent" }));
            }
            let mut next = current.value.clone();
            let now = self.now();
            next.archived_at = Some(now);
            next.updated_at = now;
            Ok(self.replace_agent(&current, next).await?)
        })
        .await
    }
}

/// A list field of a new agent, stored as a JSON array; absent is empty.
fn list(given: Option<Vec<Value>>) -> Value {
    Value::Array(given.unwrap_or_default())
}

fn not_found_agent(id: &str) -> Error {
    Error::not_found(Missing::Agent, id)
}

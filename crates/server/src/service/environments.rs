//! Environments (§7.1).

use std::sync::Arc;

use serde_json::Value;
use tether_core::ids::{self, IdKind};
use tether_core::metadata::{self, Metadata, MetadataPatch};
use tether_core::resources::{normalize_config, Environment};
use tether_store::{ArchiveFilter, ChangeSet, Page, PageRequest, Versioned, Write};

use super::{with_retries, App, Error, Missing, Result, Retry};

/// The longest environment name.
pub const MAX_NAME_CHARS: usize = 256;

/// The longest `description` (the spec gives none): room for a page of text. Every read of the
/// environment carries it, and a key may read its environment as often as it likes, so it is
/// bounded like the `setup_script` beside it rather than by the body limit alone.
pub const MAX_DESCRIPTION_CHARS: usize = 64 * 1024;

/// A new environment.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct NewEnvironment {
    pub name: String,
    pub description: Option<String>,
    /// `None`: the dialect's default, if it has one.
    pub config: Option<Value>,
    pub metadata: Metadata,
    /// `organization` or `account`.
    pub scope: Option<String>,
}

/// The changes of an environment update: only what is set changes.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EnvironmentChanges {
    pub name: Option<String>,
    pub description: Option<String>,
    /// Replaces the whole config; its `type` cannot change.
    pub config: Option<Value>,
    /// A merge patch: a value sets its key, `None` deletes it, keys not named stay.
    pub metadata: Option<MetadataPatch>,
}

impl App {
    async fn environment_versioned(&self, id: &str) -> Result<Versioned<Environment>> {
        if !ids::is_well_formed(IdKind::Environment, id) {
            return Err(not_found_environment(id));
        }
        self.store
            .get_environment(id)
            .await?
            .ok_or_else(|| not_found_environment(id))
    }

    pub async fn environment(&self, id: &str) -> Result<Environment> {
        Ok(self.environment_versioned(id).await?.value)
    }

    /// The environment as this process read it within the last second (`crate::cache`), else as the
    /// store has it now. Shared, not copied. An archive or delete made through another process is
    /// seen within that bound; the writes that depend on it (a session's insert, an environment's
    /// delete) re-check the environment in their own conditional write, so they never act on a stale
    /// copy. A change of `config` made elsewhere is seen within the same second.
    pub async fn recent_environment(&self, id: &str) -> Result<Arc<Environment>> {
        if let Some(env) = self.environments_read.get(id) {
            return Ok(env);
        }
        let read_at = std::time::Instant::now();
        let env = Arc::new(self.environment(id).await?);
        self.environments_read
            .put(env.id.clone(), env.clone(), read_at);
        Ok(env)
    }

    /// `config` may be omitted only where the dialect allows it; the caller passes the default then.
    pub async fn create_environment(
        &self,
        command: NewEnvironment,
        default_config: Option<Value>,
    ) -> Result<Environment> {
        self.disk.room_to_grow()?;
        let name = super::bounded_name(command.name, "name", MAX_NAME_CHARS)?;
        let description = checked_description(command.description.unwrap_or_default())?;
        let config = match (command.config, default_config) {
            (Some(c), _) => c,
            (None, Some(default)) => default,
            _ => {
                return Err(Error::invalid(
                    "config",
                    "config is required, e.g. {\"type\": \"self_hosted\"}",
                ))
            }
        };
        let config = normalize_config(&config).map_err(|e| Error::invalid("config", e.message))?;
        let metadata = command.metadata;
        metadata::validate(&metadata)?;
        let scope = command.scope;
        if let Some(scope) = &scope {
            if !matches!(scope.as_str(), "organization" | "account") {
                return Err(Error::invalid(
                    "scope",
                    "scope must be \"organization\" or \"account\"",
                ));
            }
        }
        let now = self.now();
        let env = Environment {
            id: ids::new_id(IdKind::Environment),
            name,
            description,
            config,
            metadata,
            scope,
            created_at: now,
            updated_at: now,
            archived_at: None,
        };
        self.commit(ChangeSet::one(Write::InsertEnvironment(env.clone())))
            .await?;
        Ok(env)
    }

    pub async fn list_environments(
        &self,
        filter: &ArchiveFilter,
        page: &PageRequest,
    ) -> Result<Page<Environment>> {
        super::in_list_order(
            page,
            |e: &Environment| &e.id,
            |page| async move { Ok(self.store.list_environments(filter, &page).await?) },
        )
        .await
    }

    pub async fn update_environment(
        &self,
        id: &str,
        changes: EnvironmentChanges,
    ) -> Result<Environment> {
        let name = changes
            .name
            .map(|n| super::bounded_name(n, "name", MAX_NAME_CHARS))
            .transpose()?;
        let description = changes.description.map(checked_description).transpose()?;
        let patch = changes.metadata;
        let config = match changes.config {
            None => None,
            Some(c) => Some(normalize_config(&c).map_err(|e| Error::invalid("config", e.message))?),
        };
        with_retries(|| async {
            let current = self.environment_versioned(id).await?;
            let mut next = current.value.clone();
            if let Some(name) = &name {
                next.name = name.clone();
            }
            if let Some(description) = &description {
                next.description = description.clone();
            }
            if let Some(config) = &config {
                if config.get("type") != current.value.config.get("type") {
                    return Err(Retry::Fail(Error::invalid(
                        "config",
                        "config.type cannot change after creation",
                    )));
                }
                next.config = config.clone();
            }
            if let Some(patch) = &patch {
                next.metadata = metadata::merge(&next.metadata, patch)?;
            }
            next.updated_at = self.now();
            Ok(self.replace_environment(&current, next).await?)
        })
        .await
    }

    /// Writes `next` over the version `current` was read at; a write since then makes this a
    /// conflict, so the caller reads again and decides again.
    async fn replace_environment(
        &self,
        current: &Versioned<Environment>,
        next: Environment,
    ) -> tether_store::StoreResult<Environment> {
        self.commit(ChangeSet::one(Write::UpdateEnvironment {
            environment: next.clone(),
            expected_version: current.version,
        }))
        .await?;
        Ok(next)
    }

    pub async fn archive_environment(&self, id: &str) -> Result<Environment> {
        with_retries(|| async {
            let current = self.environment_versioned(id).await?;
            if current.value.archived_at.is_some() {
                return Err(Retry::Fail(Error::AlreadyArchived {
                    what: "environment",
                }));
            }
            let mut next = current.value.clone();
            let now = self.now();
            next.archived_at = Some(now);
            next.updated_at = now;
            Ok(self.replace_environment(&current, next).await?)
        })
        .await
    }

    pub async fn delete_environment(&self, id: &str) -> Result<()> {
        with_retries(|| async {
            let current = self.environment_versioned(id).await?;
            let sessions = self.store.count_sessions_in_environment(id).await?;
            if sessions > 0 {
                return Err(Retry::Fail(Error::EnvironmentInUse { sessions }));
            }
            match self
                .commit(ChangeSet::one(Write::DeleteEnvironment {
                    id: id.to_owned(),
                    expected_version: current.version,
                }))
                .await
            {
                Ok(()) => Ok(()),
                Err(e) => Err(Retry::from(e)),
            }
        })
        .await
    }
}

fn not_found_environment(id: &str) -> Error {
    Error::not_found(Missing::Environment, id)
}

/// An environment's `description`: empty or up to [`MAX_DESCRIPTION_CHARS`].
fn checked_description(description: String) -> Result<String> {
    if description.chars().count() > MAX_DESCRIPTION_CHARS {
        return Err(Error::invalid(
            "description",
            format!("description may be at most {MAX_DESCRIPTION_CHARS} characters"),
        ));
    }
    Ok(description)
}

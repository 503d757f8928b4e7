//! Sessions (§12.2) and the parts of their lifecycle that touch the queue (§7.2).

use std::collections::BTreeMap;

use serde_json::Value;
use tether_core::events::{Sender, TurnState};
use tether_core::ids::{self, IdKind};
use tether_core::metadata::{self, Metadata, MetadataPatch};
use tether_core::resources::{Agent, Environment, Session};
use tether_core::session::{self, SessionStatus};
use tether_core::work::{self, Cause};
use tether_store::{ChangeSet, Page, PageRequest, SessionFilter, StoreError, Versioned, Write};

use super::events::append_batch;
use super::{with_retries, App, Error, Missing, Result, Retry};

pub const MAX_TITLE_CHARS: usize = 512;

/// A new session (§12.2).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct NewSession {
    pub environment_id: String,
    /// The agent's id; it must not be archived.
    pub agent: String,
    /// The agent's version to run; `None` is its current version.
    pub agent_version: Option<u32>,
    pub title: Option<String>,
    pub metadata: Metadata,
    /// Variables for the worker's program.
    pub environment_variables: BTreeMap<String, String>,
    /// Stored as given.
    pub resources: Vec<Value>,
    /// Stored as given.
    pub budget: Option<Value>,
    /// Events appended right after creation, as sent: judged as `POST /sessions/{id}/events` judges
    /// an admin's (`App::incoming_events`).
    pub initial_events: Vec<Value>,
}

/// The changes of a session update: only what is set changes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SessionChanges {
    pub title: Option<String>,
    /// A merge patch: a value sets its key, `None` deletes it, keys not named stay.
    pub metadata: Option<MetadataPatch>,
}

impl App {
    pub(crate) async fn session_versioned(&self, id: &str) -> Result<Versioned<Session>> {
        if !ids::is_well_formed(IdKind::Session, id) {
            return Err(not_found_session(id));
        }
        self.store
            .get_session(id)
            .await?
            .ok_or_else(|| not_found_session(id))
    }

    pub async fn session(&self, id: &str) -> Result<Session> {
        Ok(self.session_versioned(id).await?.value)
    }

    /// The agent a new session runs — its current version, or the version named — with the row
    /// version of the agent as it was read. `recent` takes a copy up to `ServiceConfig::record_ttl`
    /// old: the session's insert is then conditional on that row version, so a copy that is stale
    /// (the agent was changed or archived since) refuses the insert, which is decided again from a
    /// fresh read.
    async fn resolve_agent(
        &self,
        id: &str,
        version: Option<u32>,
        recent: bool,
    ) -> Result<(Agent, i64)> {
        let current = self.read_agent(id, recent).await?;
        if current.value.archived_at.is_some() {
            return Err(Error::invalid("agent", "the agent is archived"));
        }
        let agent =
            match version {
                None => current.value.clone(),
                Some(v) if v == current.value.version => current.value.clone(),
                Some(v) => self.store.get_agent_version(id, v).await?.ok_or_else(|| {
                    Error::invalid("agent", format!("agent {id} has no version {v}"))
                })?,
            };
        Ok((agent, current.version))
    }

    /// An agent as read now, or (`recent`) up to `ServiceConfig::record_ttl` ago; either way the
    /// copy read is what the next `recent` read takes.
    async fn read_agent(&self, id: &str, recent: bool) -> Result<std::sync::Arc<Versioned<Agent>>> {
        if let Some(agent) = self.agents_read.get(id).filter(|_| recent) {
            return Ok(agent);
        }
        let read_at = std::time::Instant::now();
        let agent = std::sync::Arc::new(self.agent_versioned(id).await?);
        self.agents_read.put(id.to_owned(), agent.clone(), read_at);
        Ok(agent)
    }

    pub async fn create_session(&self, mut command: NewSession) -> Result<Session> {
        self.disk.room_to_grow()?;
        let first_agent = self
            .resolve_agent(&command.agent, command.agent_version, true)
            .await?;
        let environment_id = &command.environment_id;
        // A copy up to a second old will do: the session's insert is conditional on the environment
        // existing unarchived, and a conflict is answered from a fresh read below.
        let env = self.recent_environment(environment_id).await?;
        refuse_archived(&env)?;
        command.title = checked_title(command.title.take())?;
        metadata::validate(&command.metadata)?;
        let id = ids::new_id(IdKind::Session);
        // `initial_events` are appended as if the creator sent them right after creation (§12.2): the same
        // checks and turn rules as `POST /sessions/{id}/events` from an admin, in the same atomic write.
        let initial = self
            .incoming_events(
                &id,
                "initial_events",
                std::mem::take(&mut command.initial_events),
                Sender::Admin,
                0,
            )
            .await?;
        // Counted against the disk's last reading as a post of them would be.
        self.disk.room_to_add(super::events::disk_cost(&initial))?;
        let retried = std::sync::atomic::AtomicBool::new(false);
        let session = with_retries(|| async {
            // The first attempt takes the agent as recently read; a conflict may mean that copy is
            // stale, so every later attempt reads it again.
            let (agent, agent_version) = if retried.swap(true, std::sync::atomic::Ordering::Relaxed)
            {
                self.resolve_agent(&command.agent, command.agent_version, false)
                    .await?
            } else {
                first_agent.clone()
            };
            let (session, changes) =
                self.new_session_changes(&id, agent, agent_version, &env, &command, &initial)?;
            match self.commit(changes).await {
                Err(StoreError::Conflict) => {
                    // The environment was deleted or archived since it was read, or the agent changed:
                    // answer as if that had happened first.
                    refuse_archived(&self.environment(&command.environment_id).await?)?;
                    Err(Retry::Conflict)
                }
                Err(e) => Err(Retry::Fail(e.into())),
                Ok(()) => Ok(session),
            }
        })
        .await?;
        if env.is_self_hosted() {
            self.announce_claimable(std::slice::from_ref(&env.id)).await;
        }
        Ok(session)
    }

    /// The session `create_session` inserts, running `agent` (whose row is at `agent_version`), and
    /// the change set that inserts it with its work item and initial events. `command` is checked
    /// already; its initial events are in `initial`.
    fn new_session_changes(
        &self,
        id: &str,
        agent: Agent,
        agent_version: i64,
        env: &Environment,
        command: &NewSession,
        initial: &[super::events::Incoming],
    ) -> Result<(Session, ChangeSet)> {
        // Each attempt's own time: the session is created when the attempt that commits decided.
        let now = self.now();
        let mut session = Session {
            id: id.to_owned(),
            agent,
            environment_id: env.id.clone(),
            status: SessionStatus::Idle,
            title: command.title.clone(),
            metadata: command.metadata.clone(),
            environment_variables: command.environment_variables.clone(),
            resources: Value::Array(command.resources.clone()),
            budget: command.budget.clone(),
            created_at: now,
            updated_at: now,
            archived_at: None,
            pending_input: false,
            last_event_id: None,
            next_item_not_before: None,
            turns_started: 0,
        };
        let mut work = Vec::new();
        let mut live_item = None;
        if env.is_self_hosted() {
            let (item, write) = self.enqueue_for_session(&session, now);
            work.push(write);
            live_item = Some(item.state);
        }
        let mut events = Vec::new();
        if !initial.is_empty() {
            let mut turn = TurnState {
                status: session.status,
                archived: false,
                self_hosted: env.is_self_hosted(),
                live_item,
                pending_input: false,
            };
            let appended = append_batch(&mut session, &mut turn, initial, now)?;
            if appended.enqueue {
                work.push(self.enqueue_for_session(&session, now).1);
            }
            events = appended.all;
        }
        let mut changes = ChangeSet::one(Write::InsertSession {
            session: session.clone(),
            agent_version: Some(agent_version),
        });
        changes.writes.extend(work);
        changes
            .writes
            .extend(events.into_iter().map(Write::InsertEvent));
        Ok((session, changes))
    }

    pub async fn list_sessions(
        &self,
        filter: &SessionFilter,
        page: &PageRequest,
    ) -> Result<Page<Session>> {
        super::in_list_order(
            page,
            |s: &Session| &s.id,
            |page| async move { Ok(self.store.list_sessions(filter, &page).await?) },
        )
        .await
    }

    pub async fn update_session(&self, id: &str, changes: SessionChanges) -> Result<Session> {
        let title = checked_title(changes.title)?;
        let patch = changes.metadata;
        self.with_session_retries(id, || async {
            let current = self.session_versioned(id).await?;
            let mut next = current.value.clone();
            if title.is_some() {
                next.title = title.clone();
            }
            if let Some(patch) = &patch {
                next.metadata = metadata::merge(&next.metadata, patch)?;
            }
            next.updated_at = self.now();
            self.commit(ChangeSet::one(Write::UpdateSession {
                session: next.clone(),
                expected_version: current.version,
            }))
            .await?;
            Ok(next)
        })
        .await
    }

    /// Archive: the session stays readable, refuses input, and its live item is force-stopped (§12.2).
    pub async fn archive_session(&self, id: &str) -> Result<Session> {
        self.with_session_retries(id, || async {
            let current = self.session_versioned(id).await?;
            if current.value.archived_at.is_some() {
                return Err(Retry::Fail(Error::AlreadyArchived { what: "session" }));
            }
            let now = self.now();
            let mut next = current.value.clone();
            next.archived_at = Some(now);
            next.updated_at = now;
            next.pending_input = false;
            let mut changes = ChangeSet::new();
            self.stop_live_item(&mut next, Cause::SessionArchived, now, &mut changes)
                .await?;
            changes.push(Write::UpdateSession {
                session: next.clone(),
                expected_version: current.version,
            });
            self.commit(changes).await?;
            self.announce_session(&next.id).await;
            Ok(next)
        })
        .await
    }

    /// Delete: force-stops the live item, then removes the session and its events.
    pub async fn delete_session(&self, id: &str) -> Result<()> {
        self.with_session_retries(id, || async {
            let current = self.session_versioned(id).await?;
            let now = self.now();
            let mut doomed = current.value.clone();
            let mut changes = ChangeSet::new();
            self.stop_live_item(&mut doomed, Cause::SessionDeleted, now, &mut changes)
                .await?;
            changes.push(Write::DeleteSession {
                id: id.to_owned(),
                expected_version: current.version,
            });
            self.commit(changes).await?;
            self.announce_session(id).await;
            // What the delete left of its events goes now, a batch at a time.
            self.purge_now.notify_one();
            Ok(())
        })
        .await
    }

    /// Adds the force-stop of the session's live item (if any) to `changes`.
    async fn stop_live_item(
        &self,
        session: &mut Session,
        cause: Cause,
        now: tether_core::Timestamp,
        changes: &mut ChangeSet,
    ) -> Result<(), Retry> {
        self.end_live_item(session, now, changes, |item| {
            work::force_stop_for(item, now, cause)
        })
        .await
        .map(|_had_one| ())
    }

    /// Adds to `changes` what `stop` makes of the session's live item (if any), and what that
    /// does to the session (§7.3): the session's own change (archive, delete, cancel) is the
    /// caller's, and the item's write goes in the same commit. Returns whether the session had a
    /// live item at all.
    pub(super) async fn end_live_item(
        &self,
        session: &mut Session,
        now: tether_core::Timestamp,
        changes: &mut ChangeSet,
        stop: impl FnOnce(&tether_core::WorkItem) -> Option<tether_core::Step>,
    ) -> Result<bool, Retry> {
        let Some(live) = self.store.live_work_for_session(&session.id).await? else {
            return Ok(false);
        };
        // A lapsed lease that another server's promise holds may still have its program running.
        let held = self.held_lease(&live.value, now).await?;
        let Some(step) = stop(held.as_ref().unwrap_or(&live.value)) else {
            return Ok(true);
        };
        let coupling = session::couple(session.status, session.pending_input, &step.transitions);
        assert!(
            !coupling.enqueue_fresh_item,
            "a session's own end of its item never asks for a fresh one"
        );
        session.next_item_not_before =
            session::hold_next_item(session.next_item_not_before, step.holder_may_run_until, now);
        for event in super::events::apply_coupling(session, &coupling, now) {
            changes.push(Write::InsertEvent(event));
        }
        changes.push(Write::UpdateWork {
            item: step.item,
            expected_version: live.version,
            transitions: step.transitions,
            session_version: None,
        });
        Ok(true)
    }
}

/// The optional `title` of a create or update, at most [`MAX_TITLE_CHARS`] long.
fn checked_title(title: Option<String>) -> Result<Option<String>> {
    if title
        .as_ref()
        .is_some_and(|t| t.chars().count() > MAX_TITLE_CHARS)
    {
        return Err(Error::invalid(
            "title",
            format!("title may be at most {MAX_TITLE_CHARS} characters"),
        ));
    }
    Ok(title)
}

fn refuse_archived(env: &Environment) -> Result<()> {
    if env.archived_at.is_some() {
        return Err(Error::invalid(
            "environment_id",
            "the environment is archived and takes no new sessions",
        ));
    }
    Ok(())
}

fn not_found_session(id: &str) -> Error {
    Error::not_found(Missing::Session, id)
}

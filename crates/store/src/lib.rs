//! Tether's storage interface and its backends.
//!
//! The interface is deliberately small and dumb: reads return records with their row `version`, and every
//! state change is a [`ChangeSet`] committed atomically, where each update is conditional on the version
//! it was computed from. The decisions (what the new record is) are made by `tether-core`; the store only
//! guarantees that a change computed from a stale read is refused with [`StoreError::Conflict`], so that
//! the caller re-reads and decides again. That is what makes several server processes on one database
//! behave as one, and it needs nothing beyond plain conditional `UPDATE`s, which PostgreSQL-compatible
//! distributed engines support too.
//!
//! Both backends run the same SQL text (see [`sql`]), so they cannot drift apart.

pub mod executor;
pub mod postgres;
pub mod sql;
pub mod sqlite;
pub mod tls;

pub use executor::{Executor, SqlStore};

use std::collections::BTreeMap;

use async_trait::async_trait;
use tether_core::lease::LeaseKeeperMark;
use tether_core::resources::{
    Agent, Credential, CredentialKind, Environment, Session, SessionEvent,
};
use tether_core::session::SessionStatus;
use tether_core::{Timestamp, Transition, WorkItem, WorkState};

/// A record together with the row version its update must name.
#[derive(Clone, Debug, PartialEq)]
pub struct Versioned<T> {
    pub value: T,
    pub version: i64,
}

/// A work item and its session, read together (see [`Store::get_work_with_session`]).
pub type WorkWithSession = (Versioned<WorkItem>, Option<Versioned<Session>>);

#[derive(Clone, Debug, thiserror::Error)]
pub enum StoreError {
    /// A conditional write found a newer version (or a uniqueness rule refused it): re-read and retry.
    #[error("the record changed concurrently")]
    Conflict,
    /// The database cannot be reached or refused service; retrying later may succeed.
    #[error("the store is unavailable: {0}")]
    Unavailable(String),
    /// The connection was lost, or the database stopped answering, after a write had been sent for
    /// its commit: it may have been applied or not, and no answer will say which. An outage as
    /// [`StoreError::Unavailable`] is, but the write is not to be sent again blindly (it would be
    /// applied twice if the first one was). PostgreSQL only: the embedded store's commits are
    /// answered in this process.
    #[error("the store's answer to a write was lost: {0}")]
    OutcomeUnknown(String),
    /// The database has no room for the write: its disk is full (SQLite's `SQLITE_FULL`,
    /// PostgreSQL's `disk_full`). Nothing was written; the same write can succeed once space is
    /// freed, which takes an operator, not a moment's wait.
    #[error("the database's disk is full: {0}")]
    Full(String),
    /// Anything else: a bug or a corrupt row.
    #[error("store error: {0}")]
    Internal(String),
}

pub type StoreResult<T> = Result<T, StoreError>;

impl StoreError {
    /// The database cannot be reached: an outage, which the store announces itself.
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            StoreError::Unavailable(_) | StoreError::OutcomeUnknown(_)
        )
    }
}

/// One write of a change set.
#[derive(Clone, Debug)]
pub enum Write {
    InsertEnvironment(Environment),
    UpdateEnvironment {
        environment: Environment,
        expected_version: i64,
    },
    /// Removes the environment with its queue, provided no session references it (else `Conflict`).
    DeleteEnvironment {
        id: String,
        expected_version: i64,
    },
    /// Also records this version of the agent, so that sessions can name it later.
    InsertAgent(Agent),
    UpdateAgent {
        agent: Agent,
        expected_version: i64,
    },
    /// Refused with `Conflict` unless the session's environment exists and is not archived. It locks
    /// one of the environment's session slots (`sql::SESSION_SLOTS`), which a delete or update of the
    /// environment locks all of first: a delete then sees the session and conflicts, and an archive
    /// conflicts when a session was created after its `archived_at`, instead of leaving a session (and
    /// its work item) in an environment that is gone or archived. Inserts into one environment do not
    /// queue behind each other unless they pick the same slot.
    InsertSession {
        session: Session,
        /// Also conditional on the session's agent row being at this version (else `Conflict`): a
        /// session whose copy of its agent came from a cached read is created only if the agent has
        /// neither changed nor been archived since.
        agent_version: Option<i64>,
    },
    UpdateSession {
        session: Session,
        expected_version: i64,
    },
    /// Removes the session, and its events: the first [`sql::EVENT_PURGE_BATCH`] at once, the rest
    /// through [`Store::purge_deleted_events`].
    DeleteSession {
        id: String,
        expected_version: i64,
    },
    /// Refused with `Conflict` if the session already has a live item (§7.3 rule 1).
    InsertWork {
        item: WorkItem,
        transitions: Vec<Transition>,
    },
    UpdateWork {
        item: WorkItem,
        expected_version: i64,
        transitions: Vec<Transition>,
        /// Also conditional on the item's session being at this version, which the change set does
        /// not write: a decision that took the session's state into account and left it as it was
        /// stands only if nobody changed it since (else `Conflict`).
        session_version: Option<i64>,
    },
    InsertEvent(SessionEvent),
    InsertCredential(Credential),
    RevokeCredential {
        id: String,
        at: Timestamp,
    },
    /// Records that a worker polled (cluster-wide `workers_polling`).
    TouchWorker {
        environment_id: String,
        worker_id: String,
        at: Timestamp,
    },
    /// Forgets every worker whose last poll was before `before`, in every environment.
    ForgetWorkers {
        before: Timestamp,
    },
    /// Records that the server process `server_id` has just checked the leases (a shared store's
    /// processes tell each other they are keeping them: see `lease::others_keep_leases`).
    MarkLeasesKept {
        server_id: String,
        mark: LeaseKeeperMark,
    },
    /// Forgets the mark of the server process `server_id`: it has stopped keeping the leases.
    UnmarkLeasesKept {
        server_id: String,
    },
    /// Forgets the marks of server processes last heard of before `before`.
    ForgetLeaseKeepers {
        before: Timestamp,
    },
}

/// Writes committed all together or not at all.
#[derive(Clone, Debug, Default)]
pub struct ChangeSet {
    pub writes: Vec<Write>,
}

impl ChangeSet {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn one(write: Write) -> Self {
        ChangeSet {
            writes: vec![write],
        }
    }

    pub fn push(&mut self, write: Write) -> &mut Self {
        self.writes.push(write);
        self
    }

    pub fn is_empty(&self) -> bool {
        self.writes.is_empty()
    }
}

/// Where a page starts (§1.8). `page` is the same as `after_id` (D-3).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Cursor {
    #[default]
    Start,
    After(String),
    Before(String),
}

/// What a poll at `now` may take: items delivered at or before `reclaim_cutoff` (or never), and
/// held until no later than `now` (or not at all).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClaimWindow {
    pub now: Timestamp,
    pub reclaim_cutoff: Timestamp,
}

impl ClaimWindow {
    /// The window of a poll at `now` that takes back deliveries older than `reclaim_older_than_ms`.
    pub fn at(now: Timestamp, reclaim_older_than_ms: i64) -> ClaimWindow {
        ClaimWindow {
            now,
            reclaim_cutoff: now.minus_millis(reclaim_older_than_ms),
        }
    }
}

/// A queued item a poll may take. Its document is decoded only when the poll takes it: a poll reads a
/// few candidates, to step past those that other polls of this process are taking, and uses one.
#[derive(Clone, Debug, PartialEq)]
pub struct Candidate {
    pub id: String,
    pub version: i64,
    doc: String,
}

impl Candidate {
    pub fn new(id: String, version: i64, doc: String) -> Self {
        Candidate { id, version, doc }
    }

    /// The bytes its document takes.
    pub fn document_len(&self) -> usize {
        self.doc.len()
    }

    /// The item, as it was when the candidate was read.
    pub fn decode(&self) -> StoreResult<Versioned<WorkItem>> {
        Ok(Versioned {
            version: self.version,
            value: read_record(&self.doc)
                .map_err(|e| StoreError::Internal(format!("corrupt record: {e}")))?,
        })
    }
}

/// Reads a stored document, without serde_json's limit of 128 nested arrays and objects. A record
/// holds what a client sent a level or two deeper than the client sent it (a session embeds its
/// agent), so a body the server accepted must not make its record unreadable: the limit would turn
/// every read of the session, and every list that holds it, into an error. Records are written only
/// by the server, from values it parsed itself, so their depth stays bounded by what it accepts (the
/// server's `MAX_BODY_DEPTH`, or 128 for records written before that bound).
pub fn read_record<T: serde::de::DeserializeOwned>(text: &str) -> serde_json::Result<T> {
    let mut de = serde_json::Deserializer::from_str(text);
    de.disable_recursion_limit();
    let value = T::deserialize(&mut de)?;
    de.end()?;
    Ok(value)
}

/// A page request: at most `limit` rows in ascending id order (descending when `descending`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PageRequest {
    pub cursor: Cursor,
    pub limit: u32,
    pub descending: bool,
}

impl PageRequest {
    pub fn first(limit: u32) -> Self {
        PageRequest {
            cursor: Cursor::Start,
            limit,
            descending: false,
        }
    }
}

/// A page of rows in the requested order, and whether more follow.
/// A stored event, its body kept as the JSON text it was stored as.
#[derive(Clone, Debug)]
pub struct EventDoc {
    pub id: String,
    /// The whole event as it is rendered (`id`, `type`, `processed_at`, and the type's fields).
    pub body: Box<serde_json::value::RawValue>,
}

impl EventDoc {
    /// The event's `type` and `processed_at`, read without building the rest of it.
    pub fn head(&self) -> EventHead {
        serde_json::from_str(self.body.get()).unwrap_or_default()
    }
}

/// The few fields of an event that listings filter on.
#[derive(Clone, Debug, Default, serde::Deserialize)]
pub struct EventHead {
    #[serde(rename = "type", default)]
    pub kind: String,
    #[serde(default)]
    pub processed_at: Option<String>,
}

/// The most bytes of stored JSON one page of environments, agents or sessions holds, unless its
/// one record alone is larger: a session holds its agent, whose prompt and tools may each be as
/// large as a request body, and a page of 1,000 such records would otherwise be read, and answered,
/// whole. A page cut short says `has_more`, and the next goes on from its last record (§1.8).
pub const LIST_PAGE_BYTES: usize = 1 << 20;

#[derive(Clone, Debug, PartialEq)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub has_more: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ArchiveFilter {
    pub include_archived: bool,
    pub created_gte: Option<Timestamp>,
    pub created_lte: Option<Timestamp>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SessionFilter {
    pub agent_id: Option<String>,
    pub environment_id: Option<String>,
    pub statuses: Vec<SessionStatus>,
    pub include_archived: bool,
    pub created_gte: Option<Timestamp>,
    pub created_lte: Option<Timestamp>,
}

/// Which items a work listing returns; the default is every item (D-4). Both filters are Tether
/// extensions (neither dialect filters the work list), and they combine.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WorkFilter {
    /// Only items in one of these states (empty: all states).
    pub states: Vec<WorkState>,
    /// Only items stopped as poison (`poison_stopped`, D-5) that no operator has requeued yet.
    pub poison: bool,
}

/// Counts behind `GET …/work/stats` (§2.5, D-9).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct QueueCounts {
    /// Queued items without an outstanding delivery.
    pub depth: u64,
    /// Queued items with an outstanding delivery.
    pub pending: u64,
    pub oldest_queued_at: Option<Timestamp>,
    /// Live items per state.
    pub states: BTreeMap<WorkState, u64>,
}

/// A history row with its position, for paging.
#[derive(Clone, Debug, PartialEq)]
pub struct HistoryRow {
    pub seq: i64,
    pub transition: Transition,
}

/// A change another process made, announced so that waiters here wake up (a hint, never the truth).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Notice {
    /// Items may have become claimable in this environment.
    WorkClaimable { environment_id: String },
    /// A session's log or status changed.
    Session { session_id: String },
    /// Notices from other processes may have been missed (the channel carrying them was down for a
    /// while): every waiter and stream should look again. Raised locally, never sent.
    Resync,
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Human-readable backend name, for logs and `/readyz`.
    fn backend(&self) -> &'static str;

    /// Commits every write or none. `Conflict` when a condition failed.
    async fn commit(&self, changes: ChangeSet) -> StoreResult<()>;

    /// Announces a notice to the other server processes sharing this store (no-op for an embedded store).
    async fn announce(&self, notices: Vec<Notice>) -> StoreResult<()>;

    /// Whether other server processes may use this store at the same time. An embedded store is
    /// one process's alone.
    fn shared(&self) -> bool {
        false
    }

    /// The newest marks of the server processes other than `server_id` that said they were keeping
    /// the leases ([`Write::MarkLeasesKept`]).
    async fn lease_keeper_marks_elsewhere(
        &self,
        server_id: &str,
    ) -> StoreResult<Vec<LeaseKeeperMark>>;

    /// The mark `server_id` left last, by an earlier run of the same server process maybe
    /// ([`Write::MarkLeasesKept`]).
    async fn lease_keeper_mark_of(&self, server_id: &str) -> StoreResult<Option<LeaseKeeperMark>>;

    /// Notices from other server processes.
    fn subscribe(&self) -> tokio::sync::broadcast::Receiver<Notice>;

    /// How many times the store lost its database and got it back. Whenever this grows, leases may
    /// have run out while nobody could renew them; the service answers with lease amnesty (§3.1).
    /// The count has grown by the time the first successful call after the outage returns. An
    /// embedded store never loses its database.
    fn reconnections(&self) -> u64 {
        0
    }

    /// How many times the store lost its database (counted when it notices, before the call that noticed
    /// returns its error). A decision read before the count grew may rest on a lease a worker could not
    /// renew since; the service decides such an expiry again from a fresh read.
    ///
    /// A loss is counted once [`Store::in_outage`] holds, and its reconnection before it no longer
    /// does: so there are never more reconnections than losses, and fewer exactly while a counted
    /// outage is under way (the service tells one outage from the next by this).
    fn losses(&self) -> u64 {
        0
    }

    /// Whether the store has lost its database and not reached it since. While this holds, the next
    /// successful call grows [`Store::reconnections`] before it returns, so every lease gets amnesty
    /// before any expiry is decided again: the server may promise a worker that its lease will not expire
    /// because of the outage.
    fn in_outage(&self) -> bool {
        false
    }

    /// The bytes free for this store's files on the filesystem that holds them, for a store on
    /// this machine's own disk; `None` for a database elsewhere, whose disk its own operator
    /// watches. A blocking call (`statvfs`): call it off the async threads.
    fn free_space(&self) -> Option<std::io::Result<u64>> {
        None
    }

    /// Cheap round trip, for readiness.
    async fn ping(&self) -> StoreResult<()>;

    async fn get_environment(&self, id: &str) -> StoreResult<Option<Versioned<Environment>>>;
    async fn list_environments(
        &self,
        filter: &ArchiveFilter,
        page: &PageRequest,
    ) -> StoreResult<Page<Environment>>;
    /// How many sessions reference the environment.
    async fn count_sessions_in_environment(&self, environment_id: &str) -> StoreResult<u64>;

    async fn get_agent(&self, id: &str) -> StoreResult<Option<Versioned<Agent>>>;
    async fn get_agent_version(&self, id: &str, version: u32) -> StoreResult<Option<Agent>>;
    async fn list_agents(
        &self,
        filter: &ArchiveFilter,
        page: &PageRequest,
    ) -> StoreResult<Page<Agent>>;

    async fn get_session(&self, id: &str) -> StoreResult<Option<Versioned<Session>>>;
    async fn list_sessions(
        &self,
        filter: &SessionFilter,
        page: &PageRequest,
    ) -> StoreResult<Page<Session>>;

    /// A page of a session's events, as stored (never parsed into a tree: a listing costs the bytes of
    /// the events it returns, not a multiple of them). The page holds at most `page.limit` events and
    /// stops before the event that would take the documents it holds past `max_bytes`; it always holds
    /// at least one event when any is left, so a page may exceed `max_bytes` by one event.
    async fn list_events(
        &self,
        session_id: &str,
        page: &PageRequest,
        max_bytes: usize,
    ) -> StoreResult<Page<EventDoc>>;

    async fn get_work(&self, id: &str) -> StoreResult<Option<Versioned<WorkItem>>>;
    /// An item with its session as one read (`None` for the session when the item has none, or it is
    /// gone): for the operations whose steps usually change the session too (ack, stop).
    async fn get_work_with_session(&self, id: &str) -> StoreResult<Option<WorkWithSession>>;
    async fn list_work(
        &self,
        environment_id: &str,
        filter: &WorkFilter,
        page: &PageRequest,
    ) -> StoreResult<Page<WorkItem>>;
    /// Queued items a poll may take (`tether_core::work::is_claimable`, in SQL): undelivered or
    /// delivered at or before the window's reclaim cutoff, and not held past its `now`; oldest
    /// `enqueued_at` first, then smallest id (D-22).
    async fn claim_candidates(
        &self,
        environment_id: &str,
        window: ClaimWindow,
        limit: u32,
    ) -> StoreResult<Vec<Candidate>>;
    async fn live_work_for_session(
        &self,
        session_id: &str,
    ) -> StoreResult<Option<Versioned<WorkItem>>>;
    /// The environment's items that hold a lease (`starting`, `active`, `stopping`), in id order.
    async fn leased_work_in_environment(&self, environment_id: &str) -> StoreResult<Vec<WorkItem>>;
    /// Leased items whose deadline is before `before`, across all environments, oldest deadline first.
    async fn leases_due_before(
        &self,
        before: Timestamp,
        limit: u32,
    ) -> StoreResult<Vec<Versioned<WorkItem>>>;
    async fn queue_counts(&self, environment_id: &str) -> StoreResult<QueueCounts>;
    async fn work_by_token_hash(
        &self,
        token_hash: &str,
    ) -> StoreResult<Option<Versioned<WorkItem>>>;
    async fn list_history(
        &self,
        work_id: &str,
        after_seq: Option<i64>,
        limit: u32,
    ) -> StoreResult<Page<HistoryRow>>;

    /// Workers that polled at or after `since`, most recent first, at most `limit`.
    async fn workers_seen(
        &self,
        environment_id: &str,
        since: Timestamp,
        limit: u32,
    ) -> StoreResult<Vec<(String, Timestamp)>>;

    async fn credential_by_hash(&self, secret_hash: &str) -> StoreResult<Option<Credential>>;
    async fn get_credential(&self, id: &str) -> StoreResult<Option<Credential>>;
    async fn list_credentials(
        &self,
        kind: CredentialKind,
        environment_id: Option<&str>,
        page: &PageRequest,
    ) -> StoreResult<Page<Credential>>;
    /// The credentials of `kind` not revoked, or with `revoked_too` all ever made.
    async fn count_credentials(&self, kind: CredentialKind, revoked_too: bool) -> StoreResult<u64>;
    /// Deletes up to `batch` of the events that deleted sessions left (their deletes take the
    /// first batch of each), each batch a commit of its own, so that no commit holds the writer
    /// long. `true` when it found some to delete: call again until `false`. With a `batch` of 0 it
    /// deletes none and says whether any are left.
    async fn purge_deleted_events(&self, batch: u32) -> StoreResult<bool>;
}

/// The `seq` of the `index`-th transition written with the item's `version`: versions increase by one per
/// write, so this orders an item's history without a global sequence (which distributed engines lack).
/// The last seq of each version (`index` 63) is kept for [`history_chunk_seq`].
pub fn history_seq(version: i64, index: usize) -> i64 {
    assert!(index < 63, "a single step never has this many transitions");
    version * 64 + index as i64
}

/// The `seq` of the chunk row that the write creating `version` moves the item's history lines into
/// (`sql::HISTORY_SPILL_EVERY`): above every line written before that version, below every line
/// written with it or after.
pub fn history_chunk_seq(version: i64) -> i64 {
    history_seq(version, 0) - 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_nested_past_the_parsers_limit_is_read() {
        let depth = 200;
        let text = format!(r#"{{"tools":{}{}}}"#, "[".repeat(depth), "]".repeat(depth));
        assert!(serde_json::from_str::<serde_json::Value>(&text).is_err());
        let value: serde_json::Value = read_record(&text).expect("read");
        assert!(value["tools"].is_array());
        assert!(read_record::<serde_json::Value>(r#"{"a":1} trailing"#).is_err());
    }
}

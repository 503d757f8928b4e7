//! The SQL both backends run, written once.
//!
//! Statements use `$n` placeholders (PostgreSQL's form; the SQLite backend rewrites them to `?n`) and
//! only portable SQL: `BIGINT`/`TEXT` columns, partial indexes, `INSERT … ON CONFLICT`, conditional
//! `UPDATE … WHERE version = $n`. Records are stored as a JSON document plus the few columns that
//! queries filter or sort on; `work_values` and friends derive those columns from the record in one
//! place, so the two can never disagree. A work item's history lives in its own row (see
//! [`HISTORY_SPILL_EVERY`]), so that a transition is one conditional `UPDATE` on either backend.

use tether_core::lease::LeaseKeeperMark;
use tether_core::resources::{Agent, Credential, CredentialKind};
use tether_core::{Cause, Timestamp, WorkItem, WorkState};

use crate::{
    history_chunk_seq, history_seq, ArchiveFilter, ChangeSet, ClaimWindow, Cursor, HistoryRow,
    Page, PageRequest, QueueCounts, SessionFilter, StoreError, StoreResult, Versioned, WorkFilter,
    Write,
};

/// A bound parameter or a fetched column value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Int(i64),
    Text(String),
    Null,
}

impl From<i64> for Value {
    fn from(v: i64) -> Self {
        Value::Int(v)
    }
}
impl From<bool> for Value {
    fn from(v: bool) -> Self {
        Value::Int(i64::from(v))
    }
}
impl From<String> for Value {
    fn from(v: String) -> Self {
        Value::Text(v)
    }
}
impl From<&str> for Value {
    fn from(v: &str) -> Self {
        Value::Text(v.to_owned())
    }
}
impl From<Timestamp> for Value {
    fn from(v: Timestamp) -> Self {
        Value::Int(v.as_micros())
    }
}
impl<T: Into<Value>> From<Option<T>> for Value {
    fn from(v: Option<T>) -> Self {
        v.map_or(Value::Null, Into::into)
    }
}

/// One statement with its parameters.
#[derive(Clone, Debug, PartialEq)]
pub struct Statement {
    pub sql: String,
    pub params: Vec<Value>,
    /// The read touches a few rows through an index (a lookup by key, or a `LIMIT` in index order), so
    /// it takes microseconds: the embedded store runs it on the caller's thread instead of handing it
    /// to a blocking thread and back.
    pub bounded: bool,
}

impl Statement {
    pub fn new(sql: impl Into<String>, params: Vec<Value>) -> Self {
        Statement {
            sql: sql.into(),
            params,
            bounded: false,
        }
    }

    /// Marks the statement as a bounded read (see its `bounded` field).
    pub fn bounded(mut self) -> Self {
        self.bounded = true;
        self
    }
}

/// What a write statement must achieve for its change set to stand.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expect {
    /// Exactly one row affected, else the change set is a `Conflict`.
    OneRow,
    /// Any number of rows.
    Any,
}

impl Expect {
    /// Whether a statement that affected `changed` rows did what its change set needs.
    pub fn met_by(self, changed: u64) -> bool {
        match self {
            Expect::OneRow => changed == 1,
            Expect::Any => true,
        }
    }
}

pub type Row = Vec<Value>;

/// Versioned schema migrations, applied in order; each runs once.
pub const MIGRATIONS: &[(i64, &str)] = &[
    (
        1,
        r#"
CREATE TABLE IF NOT EXISTS environments (
    id TEXT PRIMARY KEY,
    version BIGINT NOT NULL,
    archived BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    doc TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS agents (
    id TEXT PRIMARY KEY,
    version BIGINT NOT NULL,
    archived BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    doc TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS agent_versions (
    agent_id TEXT NOT NULL,
    agent_version BIGINT NOT NULL,
    doc TEXT NOT NULL,
    PRIMARY KEY (agent_id, agent_version)
);
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY,
    version BIGINT NOT NULL,
    environment_id TEXT NOT NULL,
    agent_id TEXT NOT NULL,
    status TEXT NOT NULL,
    archived BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    doc TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS sessions_by_environment ON sessions (environment_id, id);
CREATE TABLE IF NOT EXISTS session_events (
    id TEXT PRIMARY KEY,
    session_id TEXT NOT NULL,
    doc TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_by_session ON session_events (session_id, id);
CREATE TABLE IF NOT EXISTS work_items (
    id TEXT PRIMARY KEY,
    version BIGINT NOT NULL,
    environment_id TEXT NOT NULL,
    session_id TEXT NOT NULL,
    state TEXT NOT NULL,
    enqueued_at BIGINT NOT NULL,
    delivered_at BIGINT,
    lease_expires_at BIGINT,
    token_hash TEXT,
    doc TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS work_by_environment ON work_items (environment_id, id);
CREATE INDEX IF NOT EXISTS work_queue ON work_items (environment_id, state, enqueued_at, id);
CREATE UNIQUE INDEX IF NOT EXISTS one_live_item_per_session ON work_items (session_id) WHERE state <> 'stopped';
CREATE INDEX IF NOT EXISTS work_leases ON work_items (lease_expires_at) WHERE lease_expires_at IS NOT NULL;
CREATE INDEX IF NOT EXISTS work_tokens ON work_items (token_hash) WHERE token_hash IS NOT NULL;
CREATE TABLE IF NOT EXISTS work_transitions (
    work_id TEXT NOT NULL,
    seq BIGINT NOT NULL,
    doc TEXT NOT NULL,
    PRIMARY KEY (work_id, seq)
);
CREATE TABLE IF NOT EXISTS credentials (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    environment_id TEXT,
    secret_hash TEXT NOT NULL UNIQUE,
    revoked_at BIGINT,
    doc TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS workers (
    environment_id TEXT NOT NULL,
    worker_id TEXT NOT NULL,
    last_poll_at BIGINT NOT NULL,
    PRIMARY KEY (environment_id, worker_id)
);
"#,
    ),
    (
        2,
        // Session slots (see `SESSION_SLOTS`), and the slots of every environment that exists already.
        r#"
CREATE TABLE IF NOT EXISTS session_slots (
    environment_id TEXT NOT NULL,
    slot BIGINT NOT NULL,
    sessions_inserted BIGINT NOT NULL,
    PRIMARY KEY (environment_id, slot)
);
WITH RECURSIVE slots(n) AS (SELECT 0 UNION ALL SELECT n + 1 FROM slots WHERE n < 31)
INSERT INTO session_slots (environment_id, slot, sessions_inserted)
SELECT environments.id, slots.n, 0 FROM environments, slots WHERE 1 = 1
ON CONFLICT (environment_id, slot) DO NOTHING;
"#,
    ),
    (
        3,
        // A work item's history in its own row (see `HISTORY_SPILL_EVERY`). The rows of
        // `work_transitions` written before stay where they are and are read with it.
        r#"
ALTER TABLE work_items ADD COLUMN history TEXT NOT NULL DEFAULT '';
"#,
    ),
    (
        4,
        // When a held item may be handed out (`WorkItem::not_before`); null for any other item.
        r#"
ALTER TABLE work_items ADD COLUMN not_before BIGINT;
"#,
    ),
    (
        5,
        // When each server process sharing the store last checked the leases (`Write::MarkLeasesKept`).
        r#"
CREATE TABLE IF NOT EXISTS lease_keepers (
    server_id TEXT PRIMARY KEY,
    kept_at BIGINT NOT NULL
);
"#,
    ),
    (
        6,
        // Until when each mark holds: a few of its server's ticks (`lease::LeaseKeeperMark`); null
        // in a mark written before.
        r#"
ALTER TABLE lease_keepers ADD COLUMN holds_until BIGINT;
"#,
    ),
    (
        7,
        // Until when each mark's server may promise its workers lease amnesty while it cannot reach
        // the database (`lease::LeaseKeeperMark::promises_until`); null: it promises none.
        r#"
ALTER TABLE lease_keepers ADD COLUMN promises_until BIGINT;
"#,
    ),
    (
        8,
        // One live item per session token: a token names the item it acts on. Minted tokens never
        // collide; a claim's token derived from its idempotency key (Tether's claim) could, when two
        // tries of one claim race, and the second must then lose rather than lease a second item
        // under the same token. Only live items carry a token (it is cleared when an item stops or
        // its lease lapses), so the index is small; building it reads the table once, during which
        // writes to work items wait (PostgreSQL's CONCURRENTLY cannot run in a migration's
        // transaction, nor on SQLite).
        r#"
DROP INDEX IF EXISTS work_tokens;
CREATE UNIQUE INDEX IF NOT EXISTS work_token_unique ON work_items (token_hash) WHERE token_hash IS NOT NULL;
"#,
    ),
    (
        9,
        // The queue's index holds live items only. Stopped items pile up and no read of the queue
        // wants them, yet every stop inserted the stopped row into this index too: on PostgreSQL
        // an update that is not HOT adds an entry to every index whose predicate the new row meets,
        // so a stop now writes two index entries (the primary key, `work_by_environment`) instead
        // of three, and the index stays the size of the live queue however long the store lives.
        // The reads it serves repeat its predicate word for word (see [`LIVE`]): SQLite uses a
        // partial index only for a query whose WHERE holds the index's terms.
        r#"
DROP INDEX IF EXISTS work_queue;
CREATE INDEX IF NOT EXISTS work_queue ON work_items (environment_id, state, enqueued_at, id) WHERE state <> 'stopped';
"#,
    ),
    (
        10,
        // A session's delete removes its row and leaves its events to be deleted a batch at a time
        // (`Store::purge_deleted_events`): deleting millions of events in the delete's own
        // transaction held the embedded store's one writer, and so every write of every tenant,
        // for many seconds (leases lapsed meanwhile), and needed free disk for a WAL the size of
        // most of the session. Nothing reads a deleted session's events: every read of events
        // finds its session first.
        r#"
CREATE TABLE IF NOT EXISTS session_event_purges (
    session_id TEXT PRIMARY KEY
);
"#,
    ),
];

/// How many of a deleted session's events its delete removes itself, and each later purge: small
/// enough that a commit of them takes a few milliseconds.
pub const EVENT_PURGE_BATCH: u32 = 1000;

/// The statement that reads the newest migration a database has had.
pub const NEWEST_MIGRATION: &str = "SELECT CAST(MAX(version) AS BIGINT) FROM schema_migrations";

/// Refuses a database that a newer build has migrated past the migrations this one knows: its SQL
/// may no longer match the schema (a newer build keeps a work item's history where this one would
/// not look for it, say). Servers sharing one database run the same build; an upgrade stops them
/// all, starts one of the new build (which migrates), then the rest.
pub fn check_schema_known(newest_applied: Option<i64>) -> StoreResult<()> {
    let known = MIGRATIONS.last().map_or(0, |(version, _)| *version);
    match newest_applied {
        Some(newest) if newest > known => Err(StoreError::Internal(format!(
            "the database's schema is at migration {newest}, newer than this build knows ({known}): \
             run the build that migrated it (servers sharing a database must run the same build)"
        ))),
        _ => Ok(()),
    }
}

/// A work item's history is appended to the item's own `history` column, one line per transition
/// (`<seq> <transition as JSON>`), by the same `UPDATE` that writes the item: no row of its own per
/// transition, which measured as the largest single cost of a transition on PostgreSQL
/// (`scripts/bench-pg-cycle`). So that the row stays small however long the item lives, a write whose
/// new version is a multiple of this first moves the lines gathered so far into one row of
/// `work_transitions` (a "chunk", whose `seq` is above every line in it), in the same transaction.
pub const HISTORY_SPILL_EVERY: i64 = 32;

/// The `seq` the history's read gives the item's own lines: after every row of `work_transitions`.
const INLINE_HISTORY: i64 = i64::MAX;

/// Rows per environment that a session insert locks one of (chosen by the session's id) instead of the
/// environment's own row, which every insert would otherwise queue behind. A change of the environment
/// (archive, delete, any update) locks all of them first, so it waits for the inserts in flight and then
/// sees their sessions. Must match the `31` of migration 2.
pub const SESSION_SLOTS: u64 = 32;

/// The slot a session's insert locks: spread by its (random) id.
pub fn session_slot(session_id: &str) -> i64 {
    let hash = session_id
        .bytes()
        .fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(u64::from(b)));
    (hash % SESSION_SLOTS) as i64
}

/// Locks every session slot of an environment (`Any`: an environment that is gone has none).
fn lock_session_slots(environment_id: &str) -> (Statement, Expect) {
    (
        Statement::new(
            "UPDATE session_slots SET sessions_inserted = sessions_inserted + 1 WHERE environment_id = $1",
            vec![environment_id.into()],
        ),
        Expect::Any,
    )
}

/// Splits a migration script into statements (none of ours contain a `;` inside a literal).
pub fn split_script(script: &str) -> impl Iterator<Item = &str> {
    script.split(';').map(str::trim).filter(|s| !s.is_empty())
}

fn to_doc<T: serde::Serialize>(value: &T) -> Value {
    Value::Text(serde_json::to_string(value).expect("records always serialize"))
}

fn from_doc<T: serde::de::DeserializeOwned>(value: &Value) -> StoreResult<T> {
    match value {
        Value::Text(text) => crate::read_record(text)
            .map_err(|e| StoreError::Internal(format!("corrupt record: {e}"))),
        other => Err(StoreError::Internal(format!(
            "expected a document, found {other:?}"
        ))),
    }
}

fn int(value: &Value) -> StoreResult<i64> {
    match value {
        Value::Int(v) => Ok(*v),
        other => Err(StoreError::Internal(format!(
            "expected an integer, found {other:?}"
        ))),
    }
}

fn opt_int(value: &Value) -> StoreResult<Option<i64>> {
    match value {
        Value::Null => Ok(None),
        other => int(other).map(Some),
    }
}

fn text(value: &Value) -> StoreResult<String> {
    match value {
        Value::Text(v) => Ok(v.clone()),
        other => Err(StoreError::Internal(format!(
            "expected text, found {other:?}"
        ))),
    }
}

/// Decodes `(version, doc)` rows.
pub fn versioned<T: serde::de::DeserializeOwned>(row: &Row) -> StoreResult<Versioned<T>> {
    versioned_at(row, 0)
}

/// Decodes the `(version, doc)` pair that starts at column `at`.
fn versioned_at<T: serde::de::DeserializeOwned>(row: &Row, at: usize) -> StoreResult<Versioned<T>> {
    Ok(Versioned {
        version: int(&row[at])?,
        value: from_doc(&row[at + 1])?,
    })
}

/// Decodes the rows of [`get_work_with_session`].
pub fn work_with_session(row: &Row) -> StoreResult<crate::WorkWithSession> {
    let item = versioned_at(row, 0)?;
    let session = match row[3] {
        Value::Null => None,
        _ => Some(versioned_at(row, 2)?),
    };
    Ok((item, session))
}

/// Decodes `(doc)` rows.
pub fn doc<T: serde::de::DeserializeOwned>(row: &Row) -> StoreResult<T> {
    from_doc(&row[0])
}

/// The values every write of a work item sets, in this order: `state`, `enqueued_at`, `delivered_at`,
/// `lease_expires_at`, `token_hash`, `not_before` (the columns queries filter or sort on, derived
/// from the record) and `doc`.
fn work_values(item: &WorkItem) -> [Value; 7] {
    [
        item.state.as_str().into(),
        item.enqueued_at.into(),
        item.delivery.as_ref().map(|d| d.delivered_at).into(),
        item.lease_expires_at.into(),
        item.session_token_hash.clone().into(),
        item.not_before.into(),
        to_doc(item),
    ]
}

/// The history lines of `transitions`, written with the item's `version` (see [`HISTORY_SPILL_EVERY`]).
fn history_lines(version: i64, transitions: &[tether_core::Transition]) -> String {
    let mut lines = String::new();
    for (i, t) in transitions.iter().enumerate() {
        lines.push_str(&history_seq(version, i).to_string());
        lines.push(' ');
        // Compact JSON escapes every line break inside strings, so a line is one transition.
        lines.push_str(&serde_json::to_string(t).expect("transitions always serialize"));
        lines.push('\n');
    }
    lines
}

/// The statements of a change set, in order.
pub fn change_statements(changes: &ChangeSet) -> Vec<(Statement, Expect)> {
    let mut out = Vec::new();
    for write in &changes.writes {
        write_statements(write, &mut out);
    }
    out
}

fn write_statements(write: &Write, out: &mut Vec<(Statement, Expect)>) {
    use Expect::*;
    match write {
        Write::InsertEnvironment(env) => {
            out.push((
                Statement::new(
                    "INSERT INTO environments (id, version, archived, created_at, doc) VALUES ($1, 1, $2, $3, $4)",
                    vec![env.id.as_str().into(), env.archived_at.is_some().into(), env.created_at.into(), to_doc(env)],
                ),
                OneRow,
            ));
            let rows: Vec<String> = (0..SESSION_SLOTS).map(|slot| format!("($1, {slot}, 0)")).collect();
            out.push((
                Statement::new(
                    format!("INSERT INTO session_slots (environment_id, slot, sessions_inserted) VALUES {}", rows.join(", ")),
                    vec![env.id.as_str().into()],
                ),
                Any,
            ));
        }
        Write::UpdateEnvironment { environment: env, expected_version } => {
            out.push(lock_session_slots(&env.id));
            // Archiving: no session may have been created after the archive's own time (a session
            // insert committed since the environment was read conflicts, and the archive decides again
            // with a later time). An environment archived before keeps its sessions as they are.
            out.push((
                Statement::new(
                    "UPDATE environments SET version = version + 1, archived = $2, doc = $3 WHERE id = $1 AND version = $4 \
                     AND (archived = 1 OR CAST($5 AS BIGINT) IS NULL OR NOT EXISTS \
                     (SELECT 1 FROM sessions WHERE environment_id = $1 AND created_at > CAST($5 AS BIGINT)))",
                    vec![
                        env.id.as_str().into(),
                        env.archived_at.is_some().into(),
                        to_doc(env),
                        (*expected_version).into(),
                        env.archived_at.into(),
                    ],
                ),
                OneRow,
            ));
        }
        Write::DeleteEnvironment { id, expected_version } => {
            out.push(lock_session_slots(id));
            out.push((
                Statement::new(
                    "DELETE FROM environments WHERE id = $1 AND version = $2 \
                     AND NOT EXISTS (SELECT 1 FROM sessions WHERE environment_id = $1)",
                    vec![id.as_str().into(), (*expected_version).into()],
                ),
                OneRow,
            ));
            for sql in [
                "DELETE FROM work_transitions WHERE work_id IN (SELECT id FROM work_items WHERE environment_id = $1)",
                "DELETE FROM work_items WHERE environment_id = $1",
                "DELETE FROM workers WHERE environment_id = $1",
                "DELETE FROM session_slots WHERE environment_id = $1",
                "DELETE FROM credentials WHERE environment_id = $1",
            ] {
                out.push((Statement::new(sql, vec![id.as_str().into()]), Any));
            }
        }
        Write::InsertAgent(agent) => {
            out.push((
                Statement::new(
                    "INSERT INTO agents (id, version, archived, created_at, doc) VALUES ($1, 1, $2, $3, $4)",
                    vec![agent.id.as_str().into(), agent.archived_at.is_some().into(), agent.created_at.into(), to_doc(agent)],
                ),
                OneRow,
            ));
            out.push(agent_version_statement(agent));
        }
        Write::UpdateAgent { agent, expected_version } => {
            out.push((
                Statement::new(
                    "UPDATE agents SET version = version + 1, archived = $2, doc = $3 WHERE id = $1 AND version = $4",
                    vec![agent.id.as_str().into(), agent.archived_at.is_some().into(), to_doc(agent), (*expected_version).into()],
                ),
                OneRow,
            ));
            out.push(agent_version_statement(agent));
        }
        Write::InsertSession { session: s, agent_version } => {
            // First, one of the environment's session slots: a concurrent delete or archive locks them
            // all, so it waits for this insert and then sees the session, or this insert waits for it
            // and then sees it (the slot is gone, or the environment is archived). Inserts into the same
            // environment queue only when they pick the same slot.
            out.push((
                Statement::new(
                    "UPDATE session_slots SET sessions_inserted = sessions_inserted + 1 \
                     WHERE environment_id = $1 AND slot = $2",
                    vec![s.environment_id.as_str().into(), session_slot(&s.id).into()],
                ),
                OneRow,
            ));
            let mut params = vec![
                s.id.as_str().into(),
                s.environment_id.as_str().into(),
                s.agent.id.as_str().into(),
                s.status.as_str().into(),
                s.archived_at.is_some().into(),
                s.created_at.into(),
                to_doc(s),
            ];
            let agent_guard = match agent_version {
                Some(version) => {
                    params.push((*version).into());
                    " AND EXISTS (SELECT 1 FROM agents WHERE id = $3 AND version = $8)"
                }
                None => "",
            };
            out.push((
                Statement::new(
                    format!(
                        "INSERT INTO sessions (id, version, environment_id, agent_id, status, archived, created_at, doc) \
                         SELECT CAST($1 AS TEXT), 1, CAST($2 AS TEXT), CAST($3 AS TEXT), CAST($4 AS TEXT), \
                         CAST($5 AS BIGINT), CAST($6 AS BIGINT), CAST($7 AS TEXT) \
                         WHERE EXISTS (SELECT 1 FROM environments WHERE id = $2 AND archived = 0){agent_guard}"
                    ),
                    params,
                ),
                OneRow,
            ));
        }
        Write::UpdateSession { session: s, expected_version } => out.push((
            Statement::new(
                "UPDATE sessions SET version = version + 1, status = $2, archived = $3, doc = $4 \
                 WHERE id = $1 AND version = $5",
                vec![
                    s.id.as_str().into(),
                    s.status.as_str().into(),
                    s.archived_at.is_some().into(),
                    to_doc(s),
                    (*expected_version).into(),
                ],
            ),
            OneRow,
        )),
        Write::DeleteSession { id, expected_version } => {
            out.push((
                Statement::new(
                    "DELETE FROM sessions WHERE id = $1 AND version = $2",
                    vec![id.as_str().into(), (*expected_version).into()],
                ),
                OneRow,
            ));
            // The first batch of its events goes now, which for most sessions is all of them; the
            // rest are deleted later, a batch at a time (see migration 10).
            out.push((purge_events(id, EVENT_PURGE_BATCH), Any));
            out.push((
                Statement::new(
                    "INSERT INTO session_event_purges (session_id) VALUES ($1) ON CONFLICT DO NOTHING",
                    vec![id.as_str().into()],
                ),
                Any,
            ));
        }
        Write::InsertWork { item, transitions } => {
            let mut params: Vec<Value> = vec![
                item.id.as_str().into(),
                item.environment_id.as_str().into(),
                item.data.id.as_str().into(),
            ];
            params.extend(work_values(item));
            params.push(history_lines(1, transitions).into());
            out.push((
                Statement::new(
                    "INSERT INTO work_items (id, version, environment_id, session_id, state, enqueued_at, \
                     delivered_at, lease_expires_at, token_hash, not_before, doc, history) \
                     VALUES ($1, 1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
                    params,
                ),
                OneRow,
            ));
        }
        Write::UpdateWork { item, expected_version, transitions, session_version } => {
            let version = expected_version + 1;
            let spill = version % HISTORY_SPILL_EVERY == 0;
            if spill {
                // The lines so far become one chunk row, read from the very version this change set
                // is conditional on (a row changed since inserts nothing, and the update below then
                // fails and takes this insert back with it).
                out.push((
                    Statement::new(
                        "INSERT INTO work_transitions (work_id, seq, doc) \
                         SELECT id, CAST($3 AS BIGINT), history FROM work_items \
                         WHERE id = $1 AND version = $2 AND history <> ''",
                        vec![item.id.as_str().into(), (*expected_version).into(), history_chunk_seq(version).into()],
                    ),
                    Any,
                ));
            }
            let mut params: Vec<Value> = vec![item.id.as_str().into()];
            params.extend(work_values(item));
            params.push((*expected_version).into());
            // A write without transitions (a heartbeat after the first) leaves the column alone: on
            // PostgreSQL an unchanged value, stored apart once it has grown, is not written again.
            let history = if spill {
                ", history = $10"
            } else if transitions.is_empty() {
                ""
            } else {
                ", history = history || $10"
            };
            if !history.is_empty() {
                params.push(history_lines(version, transitions).into());
            }
            let session_guard = match (session_version, item.data.session_id()) {
                (Some(session_version), Some(session_id)) => {
                    params.push(session_id.into());
                    params.push((*session_version).into());
                    let (id, version) = (params.len() - 1, params.len());
                    format!(" AND EXISTS (SELECT 1 FROM sessions WHERE id = ${id} AND version = ${version})")
                }
                // An item without a session has none to guard: its write is refused as if the
                // session had changed, rather than standing on nothing.
                (Some(_), None) => " AND 1 = 0".to_owned(),
                (None, _) => String::new(),
            };
            out.push((
                Statement::new(
                    format!(
                        "UPDATE work_items SET version = version + 1, state = $2, enqueued_at = $3, delivered_at = $4, \
                         lease_expires_at = $5, token_hash = $6, not_before = $7, doc = $8{history} \
                         WHERE id = $1 AND version = $9{session_guard}"
                    ),
                    params,
                ),
                OneRow,
            ));
        }
        Write::InsertEvent(event) => out.push((
            Statement::new(
                "INSERT INTO session_events (id, session_id, doc) VALUES ($1, $2, $3)",
                vec![event.id.as_str().into(), event.session_id.as_str().into(), to_doc(event)],
            ),
            OneRow,
        )),
        Write::InsertCredential(c) => out.push((
            Statement::new(
                "INSERT INTO credentials (id, kind, environment_id, secret_hash, revoked_at, doc) \
                 VALUES ($1, $2, $3, $4, $5, $6)",
                vec![
                    c.id.as_str().into(),
                    kind_str(c.kind).into(),
                    c.environment_id.clone().into(),
                    c.secret_hash.as_str().into(),
                    c.revoked_at.into(),
                    to_doc(c),
                ],
            ),
            OneRow,
        )),
        Write::RevokeCredential { id, at } => {
            // `revoked_at` lives in its column only (the document never carries it).
            out.push((
                Statement::new(
                    "UPDATE credentials SET revoked_at = $2 WHERE id = $1 AND revoked_at IS NULL",
                    vec![id.as_str().into(), (*at).into()],
                ),
                OneRow,
            ))
        }
        Write::TouchWorker { environment_id, worker_id, at } => out.push((
            Statement::new(
                "INSERT INTO workers (environment_id, worker_id, last_poll_at) VALUES ($1, $2, $3) \
                 ON CONFLICT (environment_id, worker_id) DO UPDATE SET last_poll_at = \
                 CASE WHEN excluded.last_poll_at > workers.last_poll_at THEN excluded.last_poll_at \
                 ELSE workers.last_poll_at END",
                vec![environment_id.as_str().into(), worker_id.as_str().into(), (*at).into()],
            ),
            Any,
        )),
        Write::ForgetWorkers { before } => out.push((
            Statement::new("DELETE FROM workers WHERE last_poll_at < $1", vec![(*before).into()]),
            Any,
        )),
        Write::MarkLeasesKept { server_id, mark } => out.push((
            Statement::new(
                "INSERT INTO lease_keepers (server_id, kept_at, holds_until, promises_until) \
                 VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (server_id) DO UPDATE \
                 SET kept_at = excluded.kept_at, holds_until = excluded.holds_until, \
                 promises_until = excluded.promises_until",
                vec![
                    server_id.as_str().into(),
                    mark.kept_at.into(),
                    mark.holds_until.into(),
                    mark.promises_until.into(),
                ],
            ),
            Any,
        )),
        Write::UnmarkLeasesKept { server_id } => out.push((
            Statement::new(
                "DELETE FROM lease_keepers WHERE server_id = $1",
                vec![server_id.as_str().into()],
            ),
            Any,
        )),
        Write::ForgetLeaseKeepers { before } => out.push((
            Statement::new("DELETE FROM lease_keepers WHERE kept_at < $1", vec![(*before).into()]),
            Any,
        )),
    }
}

fn agent_version_statement(agent: &Agent) -> (Statement, Expect) {
    (
        Statement::new(
            "INSERT INTO agent_versions (agent_id, agent_version, doc) VALUES ($1, $2, $3) \
             ON CONFLICT (agent_id, agent_version) DO UPDATE SET doc = excluded.doc",
            vec![
                agent.id.as_str().into(),
                i64::from(agent.version).into(),
                to_doc(agent),
            ],
        ),
        Expect::Any,
    )
}

pub fn kind_str(kind: CredentialKind) -> &'static str {
    match kind {
        CredentialKind::Admin => "admin",
        CredentialKind::Environment => "environment",
    }
}

/// Builds `WHERE …` clauses with numbered parameters.
#[derive(Clone, Default)]
struct Filter {
    clauses: Vec<String>,
    params: Vec<Value>,
}

impl Filter {
    fn param(&mut self, v: impl Into<Value>) -> String {
        self.params.push(v.into());
        format!("${}", self.params.len())
    }

    fn add(&mut self, clause: String) {
        self.clauses.push(clause);
    }

    fn archive(&mut self, f: &ArchiveFilter) {
        if !f.include_archived {
            self.add("archived = 0".into());
        }
        if let Some(t) = f.created_gte {
            let p = self.param(t);
            self.add(format!("created_at >= {p}"));
        }
        if let Some(t) = f.created_lte {
            let p = self.param(t);
            self.add(format!("created_at <= {p}"));
        }
    }

    /// Appends the cursor condition and returns `ORDER BY … LIMIT …`. The page is fetched one row longer
    /// than asked, to learn `has_more`; a `Before` page is fetched backwards and flipped by [`page`].
    fn paginate(&mut self, column: &str, page: &PageRequest) -> String {
        let (forward_cmp, forward_dir, backward_cmp, backward_dir) = if page.descending {
            ("<", "DESC", ">", "ASC")
        } else {
            (">", "ASC", "<", "DESC")
        };
        let dir = match &page.cursor {
            Cursor::Start => forward_dir,
            Cursor::After(id) => {
                let p = self.param(id.as_str());
                self.add(format!("{column} {forward_cmp} {p}"));
                forward_dir
            }
            Cursor::Before(id) => {
                let p = self.param(id.as_str());
                self.add(format!("{column} {backward_cmp} {p}"));
                backward_dir
            }
        };
        let limit = self.param(i64::from(page.limit) + 1);
        format!(" ORDER BY {column} {dir} LIMIT {limit}")
    }

    fn statement(self, select: &str, tail: &str) -> Statement {
        let mut sql = select.to_owned();
        if !self.clauses.is_empty() {
            sql.push_str(" WHERE ");
            sql.push_str(&self.clauses.join(" AND "));
        }
        sql.push_str(tail);
        Statement::new(sql, self.params)
    }
}

/// Turns `limit + 1` fetched rows into a page in list order.
pub fn page<T>(mut rows: Vec<T>, request: &PageRequest) -> Page<T> {
    let has_more = rows.len() > request.limit as usize;
    rows.truncate(request.limit as usize);
    if matches!(request.cursor, Cursor::Before(_)) {
        rows.reverse();
    }
    Page {
        items: rows,
        has_more,
    }
}

pub fn get_by_id(table: &str, id: &str) -> Statement {
    Statement::new(
        format!("SELECT version, doc FROM {table} WHERE id = $1"),
        vec![id.into()],
    )
    .bounded()
}

/// An item and the session it serves, by the item's id (the session's columns are null when there is
/// none).
pub fn get_work_with_session(id: &str) -> Statement {
    Statement::new(
        "SELECT w.version, w.doc, s.version, s.doc FROM work_items w \
         LEFT JOIN sessions s ON s.id = w.session_id WHERE w.id = $1",
        vec![id.into()],
    )
    .bounded()
}

/// A listing of records bounded by bytes as well as by count ([`crate::LIST_PAGE_BYTES`]): first
/// the ids and sizes of the page's candidates (nearest the cursor first), then the documents of
/// the run of them that fits.
pub struct BoundedListing {
    table: &'static str,
    filter: Filter,
}

impl BoundedListing {
    pub fn environments(filter: &ArchiveFilter) -> BoundedListing {
        BoundedListing::archivable("environments", filter)
    }

    pub fn agents(filter: &ArchiveFilter) -> BoundedListing {
        BoundedListing::archivable("agents", filter)
    }

    fn archivable(table: &'static str, filter: &ArchiveFilter) -> BoundedListing {
        let mut f = Filter::default();
        f.archive(filter);
        BoundedListing { table, filter: f }
    }

    pub fn sessions(filter: &SessionFilter) -> BoundedListing {
        let mut f = Filter::default();
        f.archive(&ArchiveFilter {
            include_archived: filter.include_archived,
            created_gte: filter.created_gte,
            created_lte: filter.created_lte,
        });
        if let Some(agent) = &filter.agent_id {
            let p = f.param(agent.as_str());
            f.add(format!("agent_id = {p}"));
        }
        if let Some(env) = &filter.environment_id {
            let p = f.param(env.as_str());
            f.add(format!("environment_id = {p}"));
        }
        if !filter.statuses.is_empty() {
            let ps: Vec<String> = filter
                .statuses
                .iter()
                .map(|s| f.param(s.as_str()))
                .collect();
            f.add(format!("status IN ({})", ps.join(", ")));
        }
        BoundedListing {
            table: "sessions",
            filter: f,
        }
    }

    /// The ids and sizes of the page's candidates, in the order they are read (`limit + 1`).
    pub fn sizes(&self, page: &PageRequest) -> Statement {
        let mut f = self.filter.clone();
        let tail = f.paginate("id", page);
        f.statement(
            &format!("SELECT id, OCTET_LENGTH(doc) FROM {}", self.table),
            &tail,
        )
    }

    /// The ids and documents of the records the filter keeps from `low` to `high` (both
    /// included), in id order.
    pub fn between(&self, low: &str, high: &str) -> Statement {
        let mut f = self.filter.clone();
        let (low, high) = (f.param(low), f.param(high));
        f.add(format!("id >= {low} AND id <= {high}"));
        f.statement(
            &format!("SELECT id, doc FROM {}", self.table),
            " ORDER BY id",
        )
    }
}

/// Of candidates of these sizes (in the order read), how many make the page: at most `limit`, and
/// no more than `max_bytes` together unless one alone is larger; and whether any follow.
pub fn fitting(sizes: &[i64], limit: usize, max_bytes: usize) -> (usize, bool) {
    let mut kept = 0;
    let mut bytes = 0usize;
    for size in sizes.iter().take(limit) {
        let size = usize::try_from(*size).unwrap_or(usize::MAX);
        if kept > 0 && bytes.saturating_add(size) > max_bytes {
            break;
        }
        bytes = bytes.saturating_add(size);
        kept += 1;
    }
    (kept, sizes.len() > kept)
}

pub fn count_sessions_in_environment(environment_id: &str) -> Statement {
    Statement::new(
        "SELECT COUNT(*) FROM sessions WHERE environment_id = $1",
        vec![environment_id.into()],
    )
}

pub fn get_agent_version(id: &str, version: u32) -> Statement {
    Statement::new(
        "SELECT doc FROM agent_versions WHERE agent_id = $1 AND agent_version = $2",
        vec![id.into(), i64::from(version).into()],
    )
    .bounded()
}

/// The ids and stored sizes (bytes) of a page of events, nearest the cursor first, one more than asked.
/// None once the session is deleted: its events are deleted after it, a batch at a time (migration
/// 10), and a stream behind them must not go on showing them meanwhile.
pub fn event_sizes(session_id: &str, page: &PageRequest) -> Statement {
    let mut f = Filter::default();
    let p = f.param(session_id);
    f.add(format!("session_id = {p}"));
    f.add(format!("EXISTS (SELECT 1 FROM sessions WHERE id = {p})"));
    let tail = f.paginate("id", page);
    f.statement("SELECT id, OCTET_LENGTH(doc) FROM session_events", &tail)
}

/// The events of a session from `low` to `high` (both included), in id order.
pub fn events_between(session_id: &str, low: &str, high: &str) -> Statement {
    Statement::new(
        "SELECT doc FROM session_events WHERE session_id = $1 AND id >= $2 AND id <= $3 ORDER BY id",
        vec![session_id.into(), low.into(), high.into()],
    )
}

/// A row of `id, doc`.
pub fn id_and_doc<T: serde::de::DeserializeOwned>(row: &Row) -> StoreResult<(String, T)> {
    Ok((text(&row[0])?, from_doc(&row[1])?))
}

/// An event's document ([`event_doc`]) with its id.
pub fn event_doc_and_id(row: &Row) -> StoreResult<(String, crate::EventDoc)> {
    let event = event_doc(row)?;
    Ok((event.id.clone(), event))
}

pub fn decode_id_size(row: &Row) -> StoreResult<(String, i64)> {
    Ok((text(&row[0])?, int(&row[1])?))
}

/// An event's document, its body kept as JSON text.
pub fn event_doc(row: &Row) -> StoreResult<crate::EventDoc> {
    #[derive(serde::Deserialize)]
    struct Stored<'a> {
        id: String,
        #[serde(borrow)]
        body: &'a serde_json::value::RawValue,
    }
    let Value::Text(doc) = &row[0] else {
        return Err(StoreError::Internal("expected an event document".into()));
    };
    let stored: Stored<'_> = serde_json::from_str(doc)
        .map_err(|e| StoreError::Internal(format!("corrupt event: {e}")))?;
    Ok(crate::EventDoc {
        id: stored.id,
        body: stored.body.to_owned(),
    })
}

pub fn list_work(environment_id: &str, filter: &WorkFilter, page: &PageRequest) -> Statement {
    let mut f = Filter::default();
    let p = f.param(environment_id);
    f.add(format!("environment_id = {p}"));
    if !filter.states.is_empty() {
        let ps: Vec<String> = filter.states.iter().map(|s| f.param(s.as_str())).collect();
        f.add(format!("state IN ({})", ps.join(", ")));
    }
    if filter.poison {
        // The cause lives in the history (one serialization, `"cause":"…"`, on both backends): in
        // the item's own lines or in its rows of `work_transitions` (chunks, and rows written before
        // migration 3), read through the primary key. A poison item's history is a handful of lines.
        let has = |cause: &str| {
            let pattern = format!("'%\"cause\":\"{cause}\"%'");
            format!(
                "(work_items.history LIKE {pattern} OR EXISTS (SELECT 1 FROM work_transitions t \
                 WHERE t.work_id = work_items.id AND t.doc LIKE {pattern}))"
            )
        };
        f.add("state = 'stopped'".into());
        f.add(has(Cause::PoisonStopped.as_str()));
        f.add(format!("NOT {}", has(Cause::Requeued.as_str())));
    }
    let tail = f.paginate("id", page);
    f.statement("SELECT doc FROM work_items", &tail)
}

/// The predicate of the partial indexes over live items (`work_queue`, `one_live_item_per_session`),
/// which every read meant for them repeats as it stands: SQLite takes a partial index only for a
/// query whose WHERE holds the index's own terms (`state = 'queued'` alone would not do), and
/// PostgreSQL proves the implication either way. `tests::hot_reads_use_their_indexes` (SQLite) and
/// the PostgreSQL store tests check the plans.
const LIVE: &str = "state <> 'stopped'";

/// The limit is written into the text, not bound: SQLite (built with STAT4) prepares a statement
/// again whenever a bound `LIMIT` is rebound, which for the busiest read of all cost about 7 % of the
/// server's CPU. Polls ask for few distinct limits (1 to 64), so the texts stay few.
pub fn claim_candidates(environment_id: &str, window: ClaimWindow, limit: u32) -> Statement {
    Statement::new(
        format!(
            "SELECT id, version, doc FROM work_items WHERE environment_id = $1 AND state = 'queued' AND {LIVE} \
             AND (delivered_at IS NULL OR delivered_at <= $2) AND (not_before IS NULL OR not_before <= $3) \
             ORDER BY enqueued_at, id LIMIT {limit}"
        ),
        vec![environment_id.into(), window.reclaim_cutoff.into(), window.now.into()],
    )
    .bounded()
}

/// The reads on the queue's busy paths, each with the index that must serve it: what the plan tests
/// of both backends check (`hot_reads_use_their_indexes`), on a database migrated from scratch.
pub fn busy_reads_and_their_indexes() -> Vec<(Statement, &'static str)> {
    let now = Timestamp::from_micros(1_700_000_000_000_000);
    vec![
        (
            claim_candidates("env", ClaimWindow::at(now, 5_000), 8),
            "work_queue",
        ),
        (leased_work_in_environment("env"), "work_queue"),
        (queue_counts("env"), "work_queue"),
        (
            live_work_for_session("session"),
            "one_live_item_per_session",
        ),
        (leases_due_before(now, 64), "work_leases"),
        (work_by_token_hash("hash"), "work_token_unique"),
        (
            list_work("env", &WorkFilter::default(), &PageRequest::first(20)),
            "work_by_environment",
        ),
        (
            list_work(
                "env",
                &WorkFilter {
                    states: vec![WorkState::Queued],
                    poison: false,
                },
                &PageRequest::first(20),
            ),
            // Paginated by id: both planners walk the environment's items in id order rather
            // than sort the matches (a filtered list is an operator's, not a worker's, read).
            "work_by_environment",
        ),
    ]
}

/// Decodes `(id, version, doc)` rows, leaving the document as text.
pub fn candidate(row: &Row) -> StoreResult<crate::Candidate> {
    Ok(crate::Candidate::new(
        text(&row[0])?,
        int(&row[1])?,
        text(&row[2])?,
    ))
}

pub fn live_work_for_session(session_id: &str) -> Statement {
    Statement::new(
        format!("SELECT version, doc FROM work_items WHERE session_id = $1 AND {LIVE}"),
        vec![session_id.into()],
    )
    .bounded()
}

/// Served by the `work_queue` index (environment, state, …); stopped items, which pile up, are not read.
/// In no particular order (the store sorts them).
pub fn leased_work_in_environment(environment_id: &str) -> Statement {
    Statement::new(
        format!(
            "SELECT doc FROM work_items WHERE environment_id = $1 AND {LIVE} \
             AND state IN ('starting', 'active', 'stopping')"
        ),
        vec![environment_id.into()],
    )
}

pub fn leases_due_before(before: Timestamp, limit: u32) -> Statement {
    Statement::new(
        "SELECT version, doc FROM work_items WHERE lease_expires_at IS NOT NULL AND lease_expires_at < $1 \
         ORDER BY lease_expires_at LIMIT $2",
        vec![before.into(), i64::from(limit).into()],
    )
    .bounded()
}

pub fn queue_counts(environment_id: &str) -> Statement {
    Statement::new(
        format!(
            "SELECT \
               COALESCE(SUM(CASE WHEN state = 'queued' AND delivered_at IS NULL THEN 1 ELSE 0 END), 0), \
               COALESCE(SUM(CASE WHEN state = 'queued' AND delivered_at IS NOT NULL THEN 1 ELSE 0 END), 0), \
               MIN(CASE WHEN state = 'queued' THEN enqueued_at ELSE NULL END), \
               COALESCE(SUM(CASE WHEN state = 'starting' THEN 1 ELSE 0 END), 0), \
               COALESCE(SUM(CASE WHEN state = 'active' THEN 1 ELSE 0 END), 0), \
               COALESCE(SUM(CASE WHEN state = 'stopping' THEN 1 ELSE 0 END), 0) \
             FROM work_items WHERE environment_id = $1 AND {LIVE}"
        ),
        vec![environment_id.into()],
    )
}

pub fn decode_queue_counts(row: &Row) -> StoreResult<QueueCounts> {
    let n = |i: usize| -> StoreResult<u64> { Ok(opt_int(&row[i])?.unwrap_or(0).max(0) as u64) };
    let (depth, pending) = (n(0)?, n(1)?);
    let mut counts = QueueCounts {
        depth,
        pending,
        oldest_queued_at: opt_int(&row[2])?.map(Timestamp::from_micros),
        states: Default::default(),
    };
    counts.states.insert(WorkState::Queued, depth + pending);
    counts.states.insert(WorkState::Starting, n(3)?);
    counts.states.insert(WorkState::Active, n(4)?);
    counts.states.insert(WorkState::Stopping, n(5)?);
    Ok(counts)
}

pub fn work_by_token_hash(token_hash: &str) -> Statement {
    Statement::new(
        "SELECT version, doc FROM work_items WHERE token_hash = $1",
        vec![token_hash.into()],
    )
    .bounded()
}

/// An item's history after `after_seq`: the rows of `work_transitions` (one transition each, as written
/// before migration 3, or chunks of lines) and then the item's own lines, in one statement so that a
/// concurrent spill cannot move lines between the two reads. Every row holds at least one transition,
/// and only the first row may hold none after `after_seq` (a chunk's `seq` is above its lines'), so
/// `limit + 2` rows of `work_transitions` and the item's own row give [`decode_history`] more than
/// `limit` transitions whenever there are.
pub fn list_history(work_id: &str, after_seq: Option<i64>, limit: u32) -> Statement {
    Statement::new(
        "SELECT seq, doc FROM work_transitions WHERE work_id = $1 AND seq > $2 \
         UNION ALL SELECT CAST($3 AS BIGINT), history FROM work_items WHERE id = $1 \
         ORDER BY 1 LIMIT $4",
        vec![
            work_id.into(),
            after_seq.unwrap_or(-1).into(),
            INLINE_HISTORY.into(),
            (i64::from(limit) + 3).into(),
        ],
    )
}

/// Decodes the rows of [`list_history`] into the transitions after `after_seq`, in order.
pub fn decode_history(rows: &[Row], after_seq: Option<i64>) -> StoreResult<Vec<HistoryRow>> {
    let corrupt = |why: String| StoreError::Internal(format!("corrupt history: {why}"));
    let mut history = Vec::new();
    for row in rows {
        let seq = int(&row[0])?;
        let doc = text(&row[1])?;
        if seq != INLINE_HISTORY && doc.starts_with('{') {
            // A row of its own, as written before migration 3.
            history.push(HistoryRow {
                seq,
                transition: from_doc(&row[1])?,
            });
            continue;
        }
        for line in doc.lines() {
            let (seq, transition) = line
                .split_once(' ')
                .ok_or_else(|| corrupt(format!("a line without its seq: {line:?}")))?;
            history.push(HistoryRow {
                seq: seq
                    .parse()
                    .map_err(|e| corrupt(format!("seq {seq:?}: {e}")))?,
                transition: serde_json::from_str(transition)
                    .map_err(|e| corrupt(format!("transition {transition:?}: {e}")))?,
            });
        }
    }
    let after = after_seq.unwrap_or(-1);
    history.retain(|h| h.seq > after);
    // Already in order, unless a build from before migration 3 wrote rows after this build's lines,
    // which the README's upgrade rule forbids: the order is the seq's even then.
    history.sort_by_key(|h| h.seq);
    Ok(history)
}

pub fn workers_seen(environment_id: &str, since: Timestamp, limit: u32) -> Statement {
    Statement::new(
        "SELECT worker_id, last_poll_at FROM workers WHERE environment_id = $1 AND last_poll_at >= $2 \
         ORDER BY last_poll_at DESC LIMIT $3",
        vec![environment_id.into(), since.into(), i64::from(limit).into()],
    )
}

pub fn decode_worker(row: &Row) -> StoreResult<(String, Timestamp)> {
    Ok((text(&row[0])?, Timestamp::from_micros(int(&row[1])?)))
}

const CREDENTIAL_COLUMNS: &str = "SELECT revoked_at, doc FROM credentials";

pub fn credential_by_hash(secret_hash: &str) -> Statement {
    Statement::new(
        format!("{CREDENTIAL_COLUMNS} WHERE secret_hash = $1"),
        vec![secret_hash.into()],
    )
    .bounded()
}

pub fn get_credential(id: &str) -> Statement {
    Statement::new(
        format!("{CREDENTIAL_COLUMNS} WHERE id = $1"),
        vec![id.into()],
    )
    .bounded()
}

pub fn list_credentials(
    kind: CredentialKind,
    environment_id: Option<&str>,
    page: &PageRequest,
) -> Statement {
    let mut f = Filter::default();
    let p = f.param(kind_str(kind));
    f.add(format!("kind = {p}"));
    if let Some(env) = environment_id {
        let p = f.param(env);
        f.add(format!("environment_id = {p}"));
    }
    let tail = f.paginate("id", page);
    f.statement(CREDENTIAL_COLUMNS, &tail)
}

/// Deletes up to `batch` events of the session `session_id`, oldest first.
pub fn purge_events(session_id: &str, batch: u32) -> Statement {
    Statement::new(
        "DELETE FROM session_events WHERE id IN \
         (SELECT id FROM session_events WHERE session_id = $1 ORDER BY id LIMIT $2)",
        vec![session_id.into(), i64::from(batch).into()],
    )
}

/// A deleted session whose events are still being deleted, if there is one.
pub fn next_purge() -> Statement {
    Statement::new(
        "SELECT session_id FROM session_event_purges ORDER BY session_id LIMIT 1",
        vec![],
    )
}

/// 1 when the session `session_id` has events left, else 0.
pub fn events_left(session_id: &str) -> Statement {
    Statement::new(
        "SELECT COUNT(*) FROM (SELECT 1 FROM session_events WHERE session_id = $1 LIMIT 1) AS one",
        vec![session_id.into()],
    )
}

/// The end of a deleted session's purge: its events are all gone.
pub fn end_purge(session_id: &str) -> Statement {
    Statement::new(
        "DELETE FROM session_event_purges WHERE session_id = $1",
        vec![session_id.into()],
    )
}

/// The first column of a row as text.
pub fn decode_text(row: &Row) -> StoreResult<String> {
    row.first()
        .ok_or_else(|| StoreError::Internal("a row without columns".into()))
        .and_then(text)
}

pub fn count_credentials(kind: CredentialKind, revoked_too: bool) -> Statement {
    Statement::new(
        if revoked_too {
            "SELECT COUNT(*) FROM credentials WHERE kind = $1"
        } else {
            "SELECT COUNT(*) FROM credentials WHERE kind = $1 AND revoked_at IS NULL"
        },
        vec![kind_str(kind).into()],
    )
}

/// The newest marks of the lease keepers other than `server_id`: a cluster has a few servers, and
/// the marks of those gone an hour are forgotten, so the bound is never reached in practice.
pub fn lease_keeper_marks_elsewhere(server_id: &str) -> Statement {
    Statement::new(
        "SELECT kept_at, holds_until, promises_until FROM lease_keepers WHERE server_id <> $1 \
         ORDER BY kept_at DESC LIMIT 64",
        vec![server_id.into()],
    )
}

/// The mark of `server_id` alone.
pub fn lease_keeper_mark_of(server_id: &str) -> Statement {
    Statement::new(
        "SELECT kept_at, holds_until, promises_until FROM lease_keepers WHERE server_id = $1",
        vec![server_id.into()],
    )
    .bounded()
}

pub fn lease_keeper_mark(row: &Row) -> StoreResult<LeaseKeeperMark> {
    let kept_at = Timestamp::from_micros(int(&row[0])?);
    Ok(match opt_int(&row[1])? {
        Some(holds_until) => LeaseKeeperMark {
            kept_at,
            holds_until: Timestamp::from_micros(holds_until),
            promises_until: opt_int(&row[2])?.map(Timestamp::from_micros),
        },
        None => LeaseKeeperMark::of_unknown_tick(kept_at),
    })
}

/// Credentials are revoked by a column update; the column is the truth for `revoked_at`.
pub fn credential_from_row(row: &Row) -> StoreResult<Credential> {
    let mut c: Credential = from_doc(&row[1])?;
    c.revoked_at = opt_int(&row[0])?.map(Timestamp::from_micros);
    Ok(c)
}

pub fn count(row: &Row) -> StoreResult<u64> {
    Ok(int(&row[0])?.max(0) as u64)
}

/// Records kept only as documents, decoded by type.
pub fn decode_docs<T: serde::de::DeserializeOwned>(rows: &[Row]) -> StoreResult<Vec<T>> {
    rows.iter().map(doc).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tether_core::work::{self, WorkData};

    fn enqueued() -> (WorkItem, Vec<tether_core::Transition>) {
        let step = work::enqueue(
            "work_1".into(),
            "env_1".into(),
            WorkData::session("sesn_1".to_owned()),
            Default::default(),
            Timestamp::from_micros(1),
            None,
            &Default::default(),
        );
        (step.item, step.transitions)
    }

    /// Each statement of a write: whether it writes `work_transitions`, and its expectation.
    fn shapes(write: Write) -> Vec<(bool, Expect)> {
        change_statements(&ChangeSet::one(write))
            .into_iter()
            .map(|(statement, expect)| (statement.sql.contains("INTO work_transitions"), expect))
            .collect()
    }

    #[test]
    fn a_transition_is_one_statement_and_a_spill_precedes_it_every_so_many_versions() {
        let (item, transitions) = enqueued();
        let two = vec![transitions[0].clone(), transitions[0].clone()];
        let update =
            |expected_version, transitions: Vec<tether_core::Transition>| Write::UpdateWork {
                item: item.clone(),
                expected_version,
                transitions,
                session_version: None,
            };
        use Expect::*;
        for expected in [
            1,
            3,
            HISTORY_SPILL_EVERY,
            HISTORY_SPILL_EVERY + 1,
            2 * HISTORY_SPILL_EVERY,
        ] {
            assert_eq!(
                shapes(update(expected, two.clone())),
                vec![(false, OneRow)],
                "{expected}"
            );
            assert_eq!(
                shapes(update(expected, vec![])),
                vec![(false, OneRow)],
                "{expected}"
            );
        }
        for expected in [HISTORY_SPILL_EVERY - 1, 3 * HISTORY_SPILL_EVERY - 1] {
            assert_eq!(
                shapes(update(expected, two.clone())),
                vec![(true, Any), (false, OneRow)],
                "{expected}"
            );
        }
        let sql = |write| {
            change_statements(&ChangeSet::one(write))
                .pop()
                .unwrap()
                .0
                .sql
        };
        assert!(
            !sql(update(3, vec![])).contains("history"),
            "a heartbeat leaves the history alone"
        );
        assert!(sql(update(3, two.clone())).contains("history = history || $10"));
        assert!(sql(update(HISTORY_SPILL_EVERY - 1, vec![])).contains("history = $10"));
        let insert = Write::InsertWork {
            item: item.clone(),
            transitions,
        };
        assert_eq!(shapes(insert), vec![(false, OneRow)]);
    }

    fn transition(cause: tether_core::Cause) -> tether_core::Transition {
        let (_, mut transitions) = enqueued();
        let mut t = transitions.remove(0);
        t.cause = cause;
        t
    }

    #[test]
    fn history_reads_old_rows_chunks_and_the_items_own_lines_in_order() {
        use tether_core::Cause::*;
        let old = |seq: i64, cause| vec![Value::Int(seq), to_doc(&transition(cause))];
        let lines = |version: i64, causes: &[tether_core::Cause]| {
            let transitions: Vec<_> = causes.iter().map(|c| transition(*c)).collect();
            history_lines(version, &transitions)
        };
        let chunk = format!(
            "{}{}",
            lines(2, &[Delivered]),
            lines(3, &[Acked, FirstHeartbeat])
        );
        let rows = vec![
            old(history_seq(1, 0), Enqueued),
            vec![Value::Int(history_chunk_seq(4)), Value::Text(chunk)],
            vec![
                Value::Int(INLINE_HISTORY),
                Value::Text(lines(5, &[StopRequested])),
            ],
        ];
        let all = decode_history(&rows, None).unwrap();
        let seqs: Vec<i64> = all.iter().map(|h| h.seq).collect();
        assert_eq!(seqs, vec![64, 128, 192, 193, 320]);
        let causes: Vec<_> = all.iter().map(|h| h.transition.cause).collect();
        assert_eq!(
            causes,
            vec![Enqueued, Delivered, Acked, FirstHeartbeat, StopRequested]
        );
        // A cursor inside a chunk skips the chunk's earlier lines.
        let after: Vec<i64> = decode_history(&rows, Some(192))
            .unwrap()
            .iter()
            .map(|h| h.seq)
            .collect();
        assert_eq!(after, vec![193, 320]);
        // An item without lines of its own yet.
        let empty = vec![vec![Value::Int(INLINE_HISTORY), Value::Text(String::new())]];
        assert!(decode_history(&empty, None).unwrap().is_empty());
        // A damaged line is an error, never a silently shorter history.
        let damaged = vec![vec![
            Value::Int(INLINE_HISTORY),
            Value::Text("64 {not json\n".into()),
        ]];
        assert!(matches!(
            decode_history(&damaged, None),
            Err(StoreError::Internal(_))
        ));
    }

    #[test]
    fn expectations_hold_for_their_row_counts_only() {
        for (expect, changed, holds) in [
            (Expect::OneRow, 1, true),
            (Expect::OneRow, 0, false),
            (Expect::OneRow, 2, false),
            (Expect::Any, 0, true),
            (Expect::Any, 7, true),
        ] {
            assert_eq!(expect.met_by(changed), holds, "{expect:?} with {changed}");
        }
    }
}

//! The embedded store: SQLite in WAL mode with `synchronous=FULL`.
//!
//! One writer thread owns the only writing connection. Writers queue their statement lists; the thread
//! takes everything waiting (up to [`MAX_BATCH`]), runs each list inside its own savepoint of a single
//! transaction (a list alone needs none), and commits once: one fsync per batch instead of one per
//! request (group commit). A list whose condition fails is rolled back to its savepoint alone and
//! answered `Conflict`; the others still commit. An error after which SQLite rolls back the whole
//! transaction itself (I/O, a full disk) is answered `Unavailable` to every list of the batch. Nobody
//! is answered before the commit that contains their write has returned, so an answered write
//! survives `kill -9`. Reads use a small pool of read-only connections and see the last commit.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use async_trait::async_trait;
use rusqlite::types::{ToSqlOutput, Value as SqlValue, ValueRef};
use rusqlite::{Connection, ErrorCode, OpenFlags};
use tokio::sync::{broadcast, mpsc, oneshot, OwnedSemaphorePermit, Semaphore};

use crate::executor::{Executor, SqlStore};
use crate::sql::{self, Expect, Row, Statement, Value};
use crate::{Notice, StoreError, StoreResult};

/// The most write lists one transaction commits together.
pub const MAX_BATCH: usize = 512;
/// How many write lists may wait for the writer before callers are held back.
pub const WRITE_QUEUE_BOUND: usize = 8_192;
/// Read-only connections.
pub const READERS: usize = 4;
/// Prepared statements each connection keeps. rusqlite keeps 16 by default, fewer than the distinct
/// statements the server runs (the claim's text names its limit, see `sql::claim_candidates`); one
/// pushed out is parsed and planned again on its next use.
const STATEMENTS_CACHED: usize = 256;

struct WriteJob {
    statements: Vec<(Statement, Expect)>,
    reply: oneshot::Sender<StoreResult<()>>,
}

pub struct SqliteExecutor {
    writer: mpsc::Sender<WriteJob>,
    readers: Arc<ReadPool>,
    notices: broadcast::Sender<Notice>,
    /// The directory of the database file, where SQLite keeps its write-ahead log too.
    directory: PathBuf,
}

struct ReadPool {
    connections: Mutex<Vec<Connection>>,
    /// One per connection. A read holds its permit until its connection is back in the pool, also
    /// when the caller stops waiting for it (a client gone, a timeout): a read on a blocking thread
    /// runs on after its caller's future is dropped, and a permit released with that future would
    /// let another read find the pool empty.
    permits: Arc<Semaphore>,
    /// Bounded reads running on the runtime's own threads right now (see [`ReadPool::run_inline`]).
    inline: AtomicUsize,
}

/// A bounded read's claim on a runtime thread; given back when the read is done.
struct InlineSlot<'a>(&'a AtomicUsize);

impl Drop for InlineSlot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Release);
    }
}

impl ReadPool {
    /// Claims a runtime thread for a bounded read, if that leaves one of the runtime's threads free.
    ///
    /// A bounded read takes microseconds, but a disk that stalls (a frozen file system, a lost
    /// network volume, a lock held on the database's shared memory) blocks it in the kernel for as
    /// long as the stall lasts. Were every runtime thread inside such a read, nothing else would run:
    /// not `/healthz`, not requests that need no store, not timeouts. So at most all threads but one
    /// read inline; the other reads take a blocking thread, as unbounded reads always do. A runtime
    /// with one thread reads nothing inline.
    fn run_inline(&self) -> Option<InlineSlot<'_>> {
        let workers = tokio::runtime::Handle::try_current()
            .map(|runtime| runtime.metrics().num_workers())
            .unwrap_or(1);
        let most = workers.saturating_sub(1);
        self.inline
            .fetch_update(Ordering::Acquire, Ordering::Relaxed, |running| {
                (running < most).then_some(running + 1)
            })
            .ok()
            .map(|_| InlineSlot(&self.inline))
    }

    /// Runs one read on a pooled connection and puts the connection back. The caller holds a permit,
    /// so a connection is there to take.
    fn query(
        &self,
        statement: &Statement,
        _permit: &OwnedSemaphorePermit,
    ) -> StoreResult<Vec<Row>> {
        let taken = self.connections.lock().expect("reader pool lock").pop();
        // Checked with the lock let go: a broken invariant fails this read, not every read after it.
        let conn = taken.expect("a permit guarantees a connection");
        let result = query_rows(&conn, statement);
        self.connections
            .lock()
            .expect("reader pool lock")
            .push(conn);
        result
    }
}

/// Tuning of the embedded store.
#[derive(Clone, Copy, Debug)]
pub struct SqliteOptions {
    /// The most write lists one commit carries. 1 turns group commit off (one fsync per write), which
    /// only the benchmark's baseline wants.
    pub max_batch: usize,
}

impl Default for SqliteOptions {
    fn default() -> Self {
        SqliteOptions {
            max_batch: MAX_BATCH,
        }
    }
}

/// Opens (creating if needed) the database at `path`, applies migrations and starts the writer thread.
pub fn open(path: &Path) -> StoreResult<SqlStore<SqliteExecutor>> {
    open_with(path, SqliteOptions::default())
}

/// [`open`] with explicit options.
pub fn open_with(path: &Path, options: SqliteOptions) -> StoreResult<SqlStore<SqliteExecutor>> {
    assert!(
        (1..=MAX_BATCH).contains(&options.max_batch),
        "max_batch must be 1..={MAX_BATCH}"
    );
    // The connections read the database file with `pread`, not through a memory map (`mmap_size`
    // stays 0). A reader's page cache is emptied whenever another connection has committed since its
    // last read, which here is hundreds of times a second, and with a map SQLite then also unmaps the
    // whole file (`unixUnfetch`) and maps it again: a `munmap` whose TLB shootdown interrupts the
    // other cores, and a page fault for every page read after it. With the map, that took a quarter
    // of a poll's candidate read in the throughput benchmark (README, "B on SQLite").
    let mut writer = Connection::open(path).map_err(internal)?;
    writer
        .execute_batch(
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; PRAGMA busy_timeout = 5000;",
        )
        .map_err(internal)?;
    migrate(&mut writer)?;
    writer.set_prepared_statement_cache_capacity(STATEMENTS_CACHED);
    let mut connections = Vec::with_capacity(READERS);
    for _ in 0..READERS {
        let reader = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(internal)?;
        reader
            .execute_batch("PRAGMA busy_timeout = 5000; PRAGMA query_only = 1;")
            .map_err(internal)?;
        reader.set_prepared_statement_cache_capacity(STATEMENTS_CACHED);
        connections.push(reader);
    }
    let (tx, rx) = mpsc::channel(WRITE_QUEUE_BOUND);
    std::thread::Builder::new()
        .name("tether-sqlite-writer".into())
        .spawn(move || writer_loop(writer, rx, options.max_batch))
        .map_err(|e| StoreError::Internal(format!("cannot start the writer thread: {e}")))?;
    let (notices, _) = broadcast::channel(16);
    Ok(SqlStore::new(SqliteExecutor {
        writer: tx,
        readers: Arc::new(ReadPool {
            connections: Mutex::new(connections),
            permits: Arc::new(Semaphore::new(READERS)),
            inline: AtomicUsize::new(0),
        }),
        notices,
        directory: match path.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
            _ => PathBuf::from("."),
        },
    }))
}

fn migrate(conn: &mut Connection) -> StoreResult<()> {
    conn.execute_batch("CREATE TABLE IF NOT EXISTS schema_migrations (version BIGINT PRIMARY KEY)")
        .map_err(internal)?;
    let newest: Option<i64> = conn
        .query_row(sql::NEWEST_MIGRATION, [], |r| r.get(0))
        .map_err(internal)?;
    sql::check_schema_known(newest)?;
    for (version, script) in sql::MIGRATIONS {
        let applied: bool = conn
            .query_row(
                "SELECT COUNT(*) FROM schema_migrations WHERE version = ?1",
                [version],
                |r| r.get::<_, i64>(0),
            )
            .map_err(internal)?
            > 0;
        if applied {
            continue;
        }
        let tx = conn.transaction().map_err(internal)?;
        for statement in sql::split_script(script) {
            tx.execute_batch(statement).map_err(internal)?;
        }
        tx.execute(
            "INSERT INTO schema_migrations (version) VALUES (?1)",
            [version],
        )
        .map_err(internal)?;
        tx.commit().map_err(internal)?;
    }
    Ok(())
}

fn writer_loop(mut conn: Connection, mut rx: mpsc::Receiver<WriteJob>, max_batch: usize) {
    while let Some(first) = rx.blocking_recv() {
        let mut batch = vec![first];
        while batch.len() < max_batch {
            match rx.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let started = Instant::now();
        let results = commit_batch(&mut conn, &batch);
        metrics::histogram!("tether_store_commit_duration_seconds")
            .record(started.elapsed().as_secs_f64());
        metrics::histogram!("tether_store_commit_batch_size").record(batch.len() as f64);
        for (job, result) in batch.into_iter().zip(results) {
            let _ = job.reply.send(result);
        }
    }
}

/// Commits `lists` on `conn` exactly as the writer thread commits one batch (one transaction, each list
/// in a savepoint of its own unless it is alone) and returns each list's outcome in order. The writer
/// groups whatever is waiting, which a test cannot choose; this lets the group commit's per-list
/// rollback be tested on a batch of known composition.
#[doc(hidden)]
pub fn commit_as_one_batch(
    conn: &mut Connection,
    lists: Vec<Vec<(Statement, Expect)>>,
) -> Vec<StoreResult<()>> {
    let batch: Vec<WriteJob> = lists
        .into_iter()
        .map(|statements| WriteJob {
            statements,
            reply: oneshot::channel().0,
        })
        .collect();
    commit_batch(conn, &batch)
}

fn commit_batch(conn: &mut Connection, batch: &[WriteJob]) -> Vec<StoreResult<()>> {
    let unwritten = |error: StoreError| batch.iter().map(|_| Err(error.clone())).collect();
    let unavailable = |e: rusqlite::Error| unwritten(not_written(e));
    // Some errors (I/O, a full disk) make SQLite roll back the whole transaction itself: every list
    // run before is undone as well, and a savepoint opened after it would start a transaction of
    // its own. The whole batch is then answered as not written.
    let rolled_back = |e: StoreError| match e {
        StoreError::Full(_) => unwritten(e),
        e => unwritten(StoreError::Unavailable(format!(
            "the batch's transaction was rolled back: {e}"
        ))),
    };
    if !conn.is_autocommit() {
        // Left open by a failure whose `ROLLBACK` was refused; every `BEGIN` would fail behind it.
        let _ = control(conn, "ROLLBACK");
    }
    if let Err(e) = control(conn, "BEGIN IMMEDIATE") {
        return unavailable(e);
    }
    let mut results = Vec::with_capacity(batch.len());
    if let [job] = batch {
        // A list alone needs no savepoint: if it fails, rolling back the whole transaction undoes
        // exactly that list. This spares most commits at low load two statements and the savepoint's
        // copies of the pages the list changes.
        if let Err(e) = run_statements(conn, &job.statements) {
            if conn.is_autocommit() {
                return rolled_back(e);
            }
            if let Err(refused) = control(conn, "ROLLBACK") {
                return unavailable(refused);
            }
            return vec![Err(e)];
        }
        results.push(Ok(()));
    } else {
        for job in batch {
            match run_in_savepoint(conn, &job.statements) {
                Ok(outcome) => results.push(outcome),
                // SQLite has ended the transaction itself, or the savepoint could not be rolled
                // back or released: what the batch wrote is unknown, so none of it stays.
                Err(e) => {
                    if !conn.is_autocommit() {
                        let _ = control(conn, "ROLLBACK");
                    }
                    return rolled_back(e);
                }
            }
        }
    }
    if let Err(e) = control(conn, "COMMIT") {
        let _ = control(conn, "ROLLBACK");
        return unavailable(e);
    }
    results
}

/// Runs a transaction-control statement (`BEGIN`, `SAVEPOINT`, `COMMIT`, …) through the statement
/// cache: the writer runs two to four of them for every list it commits, and `execute_batch` would
/// parse each one every time.
fn control(conn: &Connection, sql: &str) -> rusqlite::Result<()> {
    conn.prepare_cached(sql)?.execute([]).map(|_| ())
}

/// Runs one write list in a savepoint of the batch's transaction and answers its outcome, having
/// undone what it wrote if it failed; `Err` when the list's failure made SQLite roll back the whole
/// transaction (that failure), or a savepoint statement itself fails: either leaves the transaction
/// in a state the caller must not commit.
fn run_in_savepoint(
    conn: &Connection,
    statements: &[(Statement, Expect)],
) -> Result<StoreResult<()>, StoreError> {
    control(conn, "SAVEPOINT job").map_err(classify)?;
    let outcome = run_statements(conn, statements);
    if let Err(e) = &outcome {
        if conn.is_autocommit() {
            return Err(e.clone());
        }
        control(conn, "ROLLBACK TO job").map_err(classify)?;
    }
    control(conn, "RELEASE job").map_err(classify)?;
    Ok(outcome)
}

/// Runs one write list's statements in order, stopping at the first that fails or misses its
/// [`Expect`]; undoing what the ones before it did is the caller's part.
fn run_statements(conn: &Connection, statements: &[(Statement, Expect)]) -> StoreResult<()> {
    statements.iter().try_for_each(|(statement, expect)| {
        let mut prepared = conn
            .prepare_cached(&placeholders(&statement.sql))
            .map_err(classify)?;
        let changed = prepared
            .execute(rusqlite::params_from_iter(
                statement.params.iter().map(Param),
            ))
            .map_err(classify)?;
        if expect.met_by(changed as u64) {
            Ok(())
        } else {
            Err(StoreError::Conflict)
        }
    })
}

/// `$n` → `?n`: SQLite numbers parameters by the digits, whatever order they appear in.
fn placeholders(sql: &str) -> String {
    sql.replace('$', "?")
}

/// A statement's parameter as SQLite binds it: text is lent, not copied (a work item's document and
/// history go out with every write of it; SQLite takes its own copy when it binds).
struct Param<'a>(&'a Value);

impl rusqlite::ToSql for Param<'_> {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(match self.0 {
            Value::Int(v) => ToSqlOutput::Owned(SqlValue::Integer(*v)),
            Value::Text(t) => ToSqlOutput::Borrowed(ValueRef::Text(t.as_bytes())),
            Value::Null => ToSqlOutput::Owned(SqlValue::Null),
        })
    }
}

fn from_sql(value: ValueRef<'_>) -> StoreResult<Value> {
    Ok(match value {
        ValueRef::Null => Value::Null,
        ValueRef::Integer(v) => Value::Int(v),
        // `from_utf8` checks ASCII a word at a time; `from_utf8_lossy` walks every byte, which
        // took 1.5 % of the server's CPU in a claim cycle (`perf`, B on SQLite: a claim reads its
        // candidates' documents). Only text that is not UTF-8, which this store never writes,
        // takes the lossy path.
        ValueRef::Text(t) => Value::Text(match std::str::from_utf8(t) {
            Ok(text) => text.to_owned(),
            Err(_) => String::from_utf8_lossy(t).into_owned(),
        }),
        ValueRef::Real(r) => Value::Int(r as i64),
        ValueRef::Blob(_) => return Err(StoreError::Internal("unexpected blob column".into())),
    })
}

fn classify(e: rusqlite::Error) -> StoreError {
    match &e {
        rusqlite::Error::SqliteFailure(f, _) if f.code == ErrorCode::ConstraintViolation => {
            StoreError::Conflict
        }
        rusqlite::Error::SqliteFailure(f, _)
            if matches!(
                f.code,
                // `FileLockingProtocolFailed` (SQLITE_PROTOCOL) is what a WAL reader answers when it
                // could not take a read lock in the retries SQLite makes itself: the same wait for
                // locks as `busy`, not a broken database.
                ErrorCode::DatabaseBusy
                    | ErrorCode::DatabaseLocked
                    | ErrorCode::FileLockingProtocolFailed
            ) =>
        {
            StoreError::Unavailable(e.to_string())
        }
        rusqlite::Error::SqliteFailure(f, _) if f.code == ErrorCode::DiskFull => {
            StoreError::Full(e.to_string())
        }
        _ => StoreError::Internal(e.to_string()),
    }
}

/// Why a batch's transaction as a whole was not written (it could not begin, roll back or
/// commit): a full disk as such, anything else as the store being unavailable.
fn not_written(e: rusqlite::Error) -> StoreError {
    match e.sqlite_error_code() {
        Some(ErrorCode::DiskFull) => StoreError::Full(e.to_string()),
        _ => StoreError::Unavailable(e.to_string()),
    }
}

/// The bytes an unprivileged process may still write on the filesystem holding `directory` (the
/// blocks root keeps for itself are not counted: the server should not rely on them).
fn free_space_at(directory: &Path) -> std::io::Result<u64> {
    let stats = nix::sys::statvfs::statvfs(directory).map_err(std::io::Error::from)?;
    Ok((stats.blocks_available() as u64).saturating_mul(stats.fragment_size() as u64))
}

fn internal(e: rusqlite::Error) -> StoreError {
    StoreError::Internal(e.to_string())
}

fn query_rows(conn: &Connection, statement: &Statement) -> StoreResult<Vec<Row>> {
    let mut prepared = conn
        .prepare_cached(&placeholders(&statement.sql))
        .map_err(classify)?;
    let columns = prepared.column_count();
    let mut rows = prepared
        .query(rusqlite::params_from_iter(
            statement.params.iter().map(Param),
        ))
        .map_err(classify)?;
    let mut out = Vec::new();
    while let Some(row) = rows.next().map_err(classify)? {
        let mut values = Vec::with_capacity(columns);
        for i in 0..columns {
            values.push(from_sql(row.get_ref(i).map_err(classify)?)?);
        }
        out.push(values);
    }
    Ok(out)
}

#[async_trait]
impl Executor for SqliteExecutor {
    fn backend(&self) -> &'static str {
        "sqlite"
    }

    fn free_space(&self) -> Option<std::io::Result<u64>> {
        Some(free_space_at(&self.directory))
    }

    async fn query(&self, statement: Statement) -> StoreResult<Vec<Row>> {
        let pool = self.readers.clone();
        let permit = pool
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| StoreError::Unavailable("store closed".into()))?;
        if statement.bounded {
            // A few rows through an index (WAL readers never wait for the writer): cheaper here than
            // the two thread switches of a blocking task, while a runtime thread stays free.
            if let Some(_slot) = pool.run_inline() {
                return pool.query(&statement, &permit);
            }
        }
        // The permit goes with the task (see `ReadPool::permits`).
        tokio::task::spawn_blocking(move || pool.query(&statement, &permit))
            .await
            .map_err(|e| StoreError::Internal(format!("read task failed: {e}")))?
    }

    async fn execute(&self, statements: Vec<(Statement, Expect)>) -> StoreResult<()> {
        let (reply, answer) = oneshot::channel();
        self.writer
            .send(WriteJob { statements, reply })
            .await
            .map_err(|_| StoreError::Unavailable("the writer thread has stopped".into()))?;
        answer
            .await
            .map_err(|_| StoreError::Unavailable("the writer thread has stopped".into()))?
    }

    async fn announce(&self, _notices: Vec<Notice>) -> StoreResult<()> {
        // One process owns an embedded store: the server already woke its own waiters.
        Ok(())
    }

    fn subscribe(&self) -> broadcast::Receiver<Notice> {
        self.notices.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool() -> ReadPool {
        ReadPool {
            connections: Mutex::new(Vec::new()),
            permits: Arc::new(Semaphore::new(0)),
            inline: AtomicUsize::new(0),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 3)]
    async fn bounded_reads_run_inline_on_all_runtime_threads_but_one() {
        let pool = pool();
        let first = pool.run_inline().expect("a thread of three");
        let second = pool.run_inline().expect("another");
        assert!(pool.run_inline().is_none(), "the last thread stays free");
        drop(first);
        let third = pool.run_inline().expect("a slot given back is taken again");
        assert!(pool.run_inline().is_none());
        drop((second, third));
        assert_eq!(pool.inline.load(Ordering::Acquire), 0);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_runtime_of_one_thread_reads_nothing_inline() {
        assert!(pool().run_inline().is_none());
    }

    #[test]
    fn text_reads_as_written_and_text_that_is_not_utf8_reads_with_replacements() {
        let text = |bytes: &[u8]| match from_sql(ValueRef::Text(bytes)).expect("a text column") {
            Value::Text(t) => t,
            other => panic!("not text: {other:?}"),
        };
        assert_eq!(text(b"{\"id\":\"wrk_1\"}"), "{\"id\":\"wrk_1\"}");
        assert_eq!(text("café ✓".as_bytes()), "café ✓");
        assert_eq!(text(b"ok \xff\xfe end"), "ok \u{FFFD}\u{FFFD} end");
    }

    /// SQLite's plan for `statement`, one line per step.
    fn plan(conn: &Connection, statement: &Statement) -> String {
        let explain = Statement::new(
            format!("EXPLAIN QUERY PLAN {}", statement.sql),
            statement.params.clone(),
        );
        let rows = query_rows(conn, &explain).unwrap();
        rows.iter()
            .map(|row| match &row[3] {
                Value::Text(step) => step.clone(),
                other => panic!("a plan step is text, not {other:?}"),
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The reads on the queue's busy paths are each served by the index meant for them, in the
    /// index's order (no sort), on a database migrated from scratch. A partial index serves only
    /// queries that repeat its predicate, so a read that lost the predicate would scan the table.
    #[test]
    fn hot_reads_use_their_indexes() {
        let mut conn = Connection::open_in_memory().unwrap();
        migrate(&mut conn).unwrap();
        for (read, index) in sql::busy_reads_and_their_indexes() {
            let plan = plan(&conn, &read);
            assert!(
                plan.contains(&format!("INDEX {index} (")),
                "{} is not served by {index}:\n{plan}",
                read.sql
            );
            assert!(
                !plan.contains("TEMP B-TREE"),
                "{} sorts its rows:\n{plan}",
                read.sql
            );
        }
    }
}

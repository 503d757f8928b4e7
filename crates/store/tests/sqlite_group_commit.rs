//! The embedded store's group commit, on real SQLite files: one transaction carries many write lists,
//! each in a savepoint of its own, and a list that fails is rolled back to its savepoint alone while the
//! lists around it commit. A list alone in its batch has no savepoint: if it fails, its transaction is
//! rolled back.
//!
//! The writer thread groups whatever happens to be waiting, which a test cannot choose, so most tests
//! here hand a batch of known composition to `sqlite::commit_as_one_batch`, the function the writer
//! runs on each batch. The last tests go through the writer thread itself.

use std::time::Duration;

use rusqlite::Connection;
use tether_store::executor::Executor;
use tether_store::sql::{Expect, Statement, Value};
use tether_store::sqlite::{self, SqliteExecutor};
use tether_store::{SqlStore, StoreError, StoreResult};

type List = Vec<(Statement, Expect)>;

/// A migrated store in a temporary directory with an extra `scratch (id, n)` table, and a second
/// writing connection to the same file for handing batches to the group commit directly.
struct Fixture {
    dir: tempfile::TempDir,
    store: SqlStore<SqliteExecutor>,
    conn: Connection,
}

impl Fixture {
    async fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let store = sqlite::open(&dir.path().join("tether.db")).unwrap();
        store
            .executor()
            .execute(vec![(
                Statement::new(
                    "CREATE TABLE scratch (id TEXT PRIMARY KEY, n BIGINT NOT NULL)",
                    vec![],
                ),
                Expect::Any,
            )])
            .await
            .unwrap();
        let conn = Connection::open(dir.path().join("tether.db")).unwrap();
        Fixture { dir, store, conn }
    }

    /// Runs `lists` as one batch and checks that no transaction is left open behind it.
    fn batch(&mut self, lists: Vec<List>) -> Vec<StoreResult<()>> {
        let count = lists.len();
        let results = sqlite::commit_as_one_batch(&mut self.conn, lists);
        assert_eq!(results.len(), count, "one outcome per list");
        assert!(
            self.conn.is_autocommit(),
            "the batch left a transaction open"
        );
        results
    }

    /// Checks that the failed batches before left only `x` at 1 behind, and that the connection
    /// still commits.
    async fn only_x_was_written_and_commits_go_on(&mut self) {
        assert_eq!(self.rows().await, rows(&[("x", 1)]));
        assert!(self.batch(vec![vec![bump("x", 1)]])[0].is_ok());
        assert_eq!(self.rows().await, rows(&[("x", 2)]));
    }

    /// The scratch rows, read through the store's own read path (another connection).
    async fn rows(&self) -> Vec<(String, i64)> {
        scratch_rows(&self.store).await
    }
}

async fn scratch_rows(store: &SqlStore<SqliteExecutor>) -> Vec<(String, i64)> {
    store
        .executor()
        .query(Statement::new(
            "SELECT id, n FROM scratch ORDER BY id",
            vec![],
        ))
        .await
        .unwrap()
        .into_iter()
        .map(|row| match row.as_slice() {
            [Value::Text(id), Value::Int(n)] => (id.clone(), *n),
            other => panic!("unexpected row {other:?}"),
        })
        .collect()
}

fn insert(id: &str, n: i64) -> (Statement, Expect) {
    (
        Statement::new(
            "INSERT INTO scratch (id, n) VALUES ($1, $2)",
            vec![Value::Text(id.into()), Value::Int(n)],
        ),
        Expect::OneRow,
    )
}

/// Increments `id` provided it still holds `from`: the shape of every versioned update.
fn bump(id: &str, from: i64) -> (Statement, Expect) {
    (
        Statement::new(
            "UPDATE scratch SET n = n + 1 WHERE id = $1 AND n = $2",
            vec![Value::Text(id.into()), Value::Int(from)],
        ),
        Expect::OneRow,
    )
}

/// A statement SQLite refuses outright (not a condition: an error).
fn broken() -> (Statement, Expect) {
    (
        Statement::new(
            "INSERT INTO no_such_table (id) VALUES ($1)",
            vec![Value::Int(1)],
        ),
        Expect::Any,
    )
}

/// An insert of an id already there that makes SQLite roll back the whole transaction itself, as
/// it does after an I/O error or a full disk.
fn rolls_back_everything(id: &str) -> (Statement, Expect) {
    (
        Statement::new(
            "INSERT OR ROLLBACK INTO scratch (id, n) VALUES ($1, 0)",
            vec![Value::Text(id.into())],
        ),
        Expect::OneRow,
    )
}

fn rows(expected: &[(&str, i64)]) -> Vec<(String, i64)> {
    expected
        .iter()
        .map(|(id, n)| (id.to_string(), *n))
        .collect()
}

/// Each list's outcome by kind, in order, so that a batch's answers are checked in one assertion.
fn outcomes(results: &[StoreResult<()>]) -> Vec<&'static str> {
    results
        .iter()
        .map(|r| match r {
            Ok(()) => "ok",
            Err(StoreError::Conflict) => "conflict",
            Err(StoreError::Internal(_)) => "internal",
            Err(StoreError::Unavailable(_)) => "unavailable",
            Err(StoreError::Full(_)) => "full",
            // The embedded store's commits are answered in this process.
            Err(StoreError::OutcomeUnknown(_)) => "outcome unknown",
        })
        .collect()
}

#[tokio::test]
async fn a_list_alone_in_its_batch_that_fails_leaves_nothing_behind() {
    let mut f = Fixture::new().await;
    assert!(f.batch(vec![vec![insert("x", 1)]])[0].is_ok());
    // No savepoint here: what the first statement of each list did must still be undone.
    let results = f.batch(vec![vec![insert("a", 1), bump("x", 5)]]);
    assert_eq!(outcomes(&results), ["conflict"], "{results:?}");
    let results = f.batch(vec![vec![insert("b", 1), broken()]]);
    assert_eq!(outcomes(&results), ["internal"], "{results:?}");
    f.only_x_was_written_and_commits_go_on().await;
}

#[tokio::test]
async fn a_transaction_sqlite_rolled_back_itself_answers_every_list_unavailable() {
    let mut f = Fixture::new().await;
    assert!(f.batch(vec![vec![insert("x", 1)]])[0].is_ok());
    // Alone: no savepoint, and no transaction left to roll back.
    let results = f.batch(vec![vec![insert("a", 1), rolls_back_everything("x")]]);
    assert!(
        matches!(&results[..], [Err(StoreError::Unavailable(m))] if m.contains("rolled back")),
        "{results:?}"
    );
    // In a batch: the list before was undone with it, and the list after must not run on in a
    // transaction of its own.
    let results = f.batch(vec![
        vec![insert("b", 1)],
        vec![insert("c", 1), rolls_back_everything("x")],
        vec![insert("d", 1)],
    ]);
    assert_eq!(
        outcomes(&results),
        ["unavailable", "unavailable", "unavailable"],
        "{results:?}"
    );
    f.only_x_was_written_and_commits_go_on().await;
}

/// A row of `bytes` bytes under `id`, in a table of their own (`large`).
fn insert_large(id: &str, bytes: usize) -> (Statement, Expect) {
    (
        Statement::new(
            "INSERT INTO large (id, body) VALUES ($1, $2)",
            vec![Value::Text(id.into()), Value::Text("x".repeat(bytes))],
        ),
        Expect::OneRow,
    )
}

#[tokio::test]
async fn a_full_database_answers_full_and_writes_nothing_of_the_list() {
    let mut f = Fixture::new().await;
    assert!(f.batch(vec![vec![insert("x", 1)]])[0].is_ok());
    f.conn
        .execute_batch("CREATE TABLE large (id TEXT PRIMARY KEY, body TEXT NOT NULL)")
        .unwrap();
    // SQLite answers a database grown to `max_page_count` exactly as it answers a full disk
    // (SQLITE_FULL): room for a few pages more, not for a megabyte.
    let pages: i64 = f
        .conn
        .query_row("PRAGMA page_count", [], |row| row.get(0))
        .unwrap();
    f.conn
        .execute_batch(&format!("PRAGMA max_page_count = {}", pages + 4))
        .unwrap();
    let results = f.batch(vec![vec![insert("a", 1), insert_large("big", 1 << 20)]]);
    assert_eq!(outcomes(&results), ["full"], "{results:?}");
    // SQLite rolls back the whole transaction on a full database: the lists around are not
    // written either, and are told why.
    let results = f.batch(vec![
        vec![insert("b", 1)],
        vec![insert("c", 1), insert_large("big", 1 << 20)],
        vec![insert("d", 1)],
    ]);
    assert_eq!(outcomes(&results), ["full", "full", "full"], "{results:?}");
    assert_eq!(f.rows().await, rows(&[("x", 1)]));
    // Once there is room again, the same write is made.
    f.conn
        .execute_batch(&format!("PRAGMA max_page_count = {}", pages + 4096))
        .unwrap();
    let results = f.batch(vec![vec![insert_large("big", 1 << 20)]]);
    assert_eq!(outcomes(&results), ["ok"], "{results:?}");
}

#[tokio::test]
async fn a_failing_list_rolls_back_alone_and_its_neighbours_commit() {
    let mut f = Fixture::new().await;
    let results = f.batch(vec![
        vec![insert("a", 1)],
        // Its first statement ran inside the batch's transaction before the second failed.
        vec![insert("b", 1), broken()],
        vec![insert("c", 1)],
    ]);
    assert_eq!(outcomes(&results), ["ok", "internal", "ok"], "{results:?}");
    assert_eq!(f.rows().await, rows(&[("a", 1), ("c", 1)]));

    // Committed, not merely visible: the rows are there after the store is closed and reopened.
    let path = f.dir.path().join("tether.db");
    let Fixture { dir, store, conn } = f;
    drop((store, conn));
    let reopened = sqlite::open(&path).unwrap();
    assert_eq!(scratch_rows(&reopened).await, rows(&[("a", 1), ("c", 1)]));
    drop(dir);
}

#[tokio::test]
async fn a_list_whose_condition_fails_is_a_conflict_and_leaves_nothing_behind() {
    let mut f = Fixture::new().await;
    assert!(f.batch(vec![vec![insert("x", 1)]])[0].is_ok());
    let results = f.batch(vec![
        vec![insert("a", 1)],
        // Decided from a stale read of `x`: its insert of `b` must go with it.
        vec![insert("b", 1), bump("x", 5)],
        vec![bump("x", 1)],
    ]);
    assert_eq!(outcomes(&results), ["ok", "conflict", "ok"], "{results:?}");
    assert_eq!(f.rows().await, rows(&[("a", 1), ("x", 2)]));
}

#[tokio::test]
async fn a_uniqueness_violation_is_a_conflict_for_that_list_only() {
    let mut f = Fixture::new().await;
    let results = f.batch(vec![
        vec![insert("d", 1)],
        // The same key as the list before it, which the batch has already written.
        vec![insert("e", 1), insert("d", 2)],
        vec![insert("f", 1)],
    ]);
    assert_eq!(outcomes(&results), ["ok", "conflict", "ok"], "{results:?}");
    assert_eq!(f.rows().await, rows(&[("d", 1), ("f", 1)]));
}

#[tokio::test]
async fn a_list_of_one_statement_that_fails_leaves_its_neighbours_alone() {
    let mut f = Fixture::new().await;
    assert!(f.batch(vec![vec![insert("x", 1)]])[0].is_ok());
    let results = f.batch(vec![
        vec![insert("a", 1)],
        // One statement, each: a key the batch has already written, a condition on a stale
        // value, a statement SQLite refuses, and one that changes a row and then fails on the
        // next (both rows get the id `a`). None of them leaves anything behind, and the lists
        // around them commit.
        vec![insert("a", 2)],
        vec![bump("x", 5)],
        vec![broken()],
        vec![(
            Statement::new("UPDATE scratch SET id = 'a', n = 9", vec![]),
            Expect::Any,
        )],
        vec![bump("x", 1)],
    ]);
    assert_eq!(
        outcomes(&results),
        ["ok", "conflict", "conflict", "internal", "conflict", "ok"],
        "{results:?}"
    );
    assert_eq!(f.rows().await, rows(&[("a", 1), ("x", 2)]));
}

#[tokio::test]
async fn lists_see_earlier_lists_of_their_batch_but_never_rolled_back_ones() {
    let mut f = Fixture::new().await;
    let results = f.batch(vec![
        vec![insert("a", 1)],
        // Sees the insert of the list before it.
        vec![bump("a", 1)],
        vec![insert("z", 1), broken()],
        // `z` was rolled back with its list, so this condition finds no row.
        vec![bump("z", 1)],
        // And the batch goes on after two failures.
        vec![bump("a", 2)],
    ]);
    assert_eq!(
        outcomes(&results),
        ["ok", "ok", "internal", "conflict", "ok"],
        "{results:?}"
    );
    assert_eq!(f.rows().await, rows(&[("a", 3)]));
}

#[tokio::test]
async fn every_list_failing_commits_nothing_and_leaves_the_connection_usable() {
    let mut f = Fixture::new().await;
    let results = f.batch(vec![
        vec![insert("a", 1), broken()],
        vec![bump("nobody", 1)],
    ]);
    assert_eq!(outcomes(&results), ["internal", "conflict"], "{results:?}");
    assert!(f.rows().await.is_empty());
    assert!(f.batch(vec![vec![insert("a", 1)]])[0].is_ok());
    assert_eq!(f.rows().await, rows(&[("a", 1)]));
}

#[tokio::test]
async fn a_batch_that_cannot_begin_answers_every_list_unavailable_and_writes_nothing() {
    let mut f = Fixture::new().await;
    // Another connection holds the write lock; this one gives up at once instead of waiting.
    let holder = Connection::open(f.dir.path().join("tether.db")).unwrap();
    holder.execute_batch("BEGIN IMMEDIATE").unwrap();
    f.conn.busy_timeout(Duration::ZERO).unwrap();
    let results = f.batch(vec![vec![insert("a", 1)], vec![insert("b", 1)]]);
    for result in &results {
        assert!(
            matches!(result, Err(StoreError::Unavailable(_))),
            "{result:?}"
        );
    }
    holder.execute_batch("ROLLBACK").unwrap();
    assert!(f.rows().await.is_empty());
    // Nothing of the refused batch lingers on the connection.
    assert!(f.batch(vec![vec![insert("b", 1)]])[0].is_ok());
    assert_eq!(f.rows().await, rows(&[("b", 1)]));
}

#[tokio::test]
async fn a_list_through_the_writer_thread_is_all_or_nothing() {
    let f = Fixture::new().await;
    let exec = f.store.executor();
    exec.execute(vec![insert("x", 1)]).await.unwrap();
    let outcome = exec.execute(vec![insert("a", 1), bump("x", 7)]).await;
    assert!(matches!(outcome, Err(StoreError::Conflict)), "{outcome:?}");
    exec.execute(vec![insert("b", 1), bump("x", 1)])
        .await
        .unwrap();
    assert_eq!(f.rows().await, rows(&[("b", 1), ("x", 2)]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_lists_through_the_writer_thread_each_get_their_own_outcome() {
    let f = Fixture::new().await;
    // However the writer happens to group them, every failing list fails alone.
    let lists = (0..60).map(|i| {
        let id = format!("k{i:02}");
        let list = match i % 3 {
            0 => vec![insert(&id, i)],
            1 => vec![insert(&id, i), broken()],
            _ => vec![insert(&id, i), bump("missing", 0)],
        };
        (i, f.store.executor().execute(list))
    });
    let outcomes =
        futures::future::join_all(lists.map(|(i, write)| async move { (i, write.await) })).await;
    for (i, outcome) in &outcomes {
        match i % 3 {
            0 => assert!(outcome.is_ok(), "{i}: {outcome:?}"),
            1 => assert!(
                matches!(outcome, Err(StoreError::Internal(_))),
                "{i}: {outcome:?}"
            ),
            _ => assert!(
                matches!(outcome, Err(StoreError::Conflict)),
                "{i}: {outcome:?}"
            ),
        }
    }
    let expected: Vec<(String, i64)> = (0..60)
        .filter(|i| i % 3 == 0)
        .map(|i| (format!("k{i:02}"), i))
        .collect();
    assert_eq!(f.rows().await, expected);
}

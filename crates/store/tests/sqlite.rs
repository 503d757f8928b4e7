//! The embedded store on a real file: the checks every backend passes, its bookkeeping tables, and
//! its prepared statements.

mod common;

use tether_core::Timestamp;
use tether_store::{sqlite, ChangeSet, Store, Write};

#[tokio::test]
async fn an_items_history_is_written_with_its_row_or_not_at_all() {
    let dir = tempfile::tempdir().unwrap();
    let store = sqlite::open(&dir.path().join("tether.db")).unwrap();
    common::an_items_history_is_written_with_its_row_or_not_at_all(&store).await;
}

#[tokio::test]
async fn an_items_long_history_reads_whole_in_pages() {
    let dir = tempfile::tempdir().unwrap();
    let store = sqlite::open(&dir.path().join("tether.db")).unwrap();
    let shapes = common::an_items_long_history_reads_whole_in_pages(&store).await;
    let conn = rusqlite::Connection::open(dir.path().join("tether.db")).unwrap();
    for shape in shapes {
        let (chunks, lines): (i64, String) = conn
            .query_row(
                "SELECT (SELECT COUNT(*) FROM work_transitions WHERE work_id = ?1), \
                 (SELECT history FROM work_items WHERE id = ?1)",
                [shape.work_id],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        assert_eq!(
            chunks as usize, shape.chunks,
            "{}: chunk rows",
            shape.work_id
        );
        assert_eq!(
            lines.lines().count(),
            shape.lines,
            "{}: lines in the row",
            shape.work_id
        );
    }
}

#[tokio::test]
async fn an_item_is_read_with_its_session() {
    let dir = tempfile::tempdir().unwrap();
    let store = sqlite::open(&dir.path().join("tether.db")).unwrap();
    common::an_item_is_read_with_its_session(&store).await;
}

#[tokio::test]
async fn a_sessions_insert_can_be_conditional_on_its_agent() {
    let dir = tempfile::tempdir().unwrap();
    let store = sqlite::open(&dir.path().join("tether.db")).unwrap();
    common::a_sessions_insert_can_be_conditional_on_its_agent(&store).await;
}

#[tokio::test]
async fn an_items_write_can_be_conditional_on_its_session() {
    let dir = tempfile::tempdir().unwrap();
    let store = sqlite::open(&dir.path().join("tether.db")).unwrap();
    common::an_items_write_can_be_conditional_on_its_session(&store).await;
}

#[tokio::test]
async fn lease_keeper_marks_are_kept_one_per_server() {
    let dir = tempfile::tempdir().unwrap();
    let store = sqlite::open(&dir.path().join("tether.db")).unwrap();
    common::lease_keeper_marks_are_kept_one_per_server(&store).await;
}

#[tokio::test]
async fn a_session_token_holds_one_item_at_most() {
    let dir = tempfile::tempdir().unwrap();
    let store = sqlite::open(&dir.path().join("tether.db")).unwrap();
    common::a_session_token_holds_one_item_at_most(&store).await;
}

#[tokio::test]
async fn workers_seen_are_the_most_recent_up_to_the_limit() {
    let dir = tempfile::tempdir().unwrap();
    let store = sqlite::open(&dir.path().join("tether.db")).unwrap();
    common::workers_seen_are_the_most_recent_up_to_the_limit(&store).await;
}

#[tokio::test]
async fn idle_workers_are_forgotten_and_recent_ones_kept() {
    let dir = tempfile::tempdir().unwrap();
    let store = sqlite::open(&dir.path().join("tether.db")).unwrap();
    let (old, recent) = (
        Timestamp::from_micros(1_000_000),
        Timestamp::from_micros(9_000_000),
    );
    for (env, worker, at) in [
        ("env_a", "w-old", old),
        ("env_b", "w-old", old),
        ("env_a", "w-new", recent),
    ] {
        store
            .commit(ChangeSet::one(Write::TouchWorker {
                environment_id: env.into(),
                worker_id: worker.into(),
                at,
            }))
            .await
            .unwrap();
    }
    store
        .commit(ChangeSet::one(Write::ForgetWorkers { before: recent }))
        .await
        .unwrap();
    let epoch = Timestamp::from_micros(0);
    assert_eq!(
        store.workers_seen("env_a", epoch, 100).await.unwrap(),
        vec![("w-new".to_owned(), recent)]
    );
    assert!(store
        .workers_seen("env_b", epoch, 100)
        .await
        .unwrap()
        .is_empty());
}

/// The poll's claim query runs hundreds of times a second with a new reclaim cutoff each time. SQLite
/// (built with STAT4) prepares a statement again on every rebinding of a parameter that may steer its
/// plan, such as a bound `LIMIT`; the claim's text must keep its plan across cutoffs.
#[test]
fn the_claim_query_is_not_prepared_again_for_each_cutoff() {
    let conn = rusqlite::Connection::open_in_memory().unwrap();
    for (_, script) in tether_store::sql::MIGRATIONS {
        for statement in tether_store::sql::split_script(script) {
            conn.execute_batch(statement).unwrap();
        }
    }
    let text = tether_store::sql::claim_candidates(
        "env_a",
        tether_store::ClaimWindow::at(Timestamp::from_micros(0), 0),
        9,
    )
    .sql
    .replace('$', "?");
    let mut statement = conn.prepare(&text).unwrap();
    for cutoff in 0..10_i64 {
        // Each poll binds the statement's parameters afresh, whatever they are.
        let window = tether_store::ClaimWindow::at(Timestamp::from_micros(cutoff), 1);
        let claim = tether_store::sql::claim_candidates("env_a", window, 9);
        let params: Vec<rusqlite::types::Value> = claim
            .params
            .iter()
            .map(|value| match value {
                tether_store::sql::Value::Int(n) => rusqlite::types::Value::Integer(*n),
                tether_store::sql::Value::Text(t) => rusqlite::types::Value::Text(t.clone()),
                tether_store::sql::Value::Null => rusqlite::types::Value::Null,
            })
            .collect();
        let mut rows = statement.query(rusqlite::params_from_iter(params)).unwrap();
        while rows.next().unwrap().is_some() {}
    }
    assert_eq!(
        statement.get_status(rusqlite::StatementStatus::RePrepare),
        0,
        "the claim query was prepared again on a new binding: {text}"
    );
}

/// A database written before migration 3 kept each transition in a row of `work_transitions`. Opened
/// now, its items' histories read whole: the old rows first, then the lines their later writes keep
/// in the item's row; and those lines move to a chunk row at the spill version like any others.
#[tokio::test]
async fn history_written_before_migration_3_reads_with_what_came_after() {
    use tether_core::work::{self, WorkData};
    use tether_store::sql::{HISTORY_SPILL_EVERY, MIGRATIONS};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tether.db");
    let at = Timestamp::from_micros(5_000_000);
    let enqueued = work::enqueue(
        "work_old".into(),
        "env_old".into(),
        WorkData::session("sesn_old".to_owned()),
        Default::default(),
        at,
        None,
        &Default::default(),
    );
    {
        // The schema and rows as the build before migration 3 wrote them.
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.execute_batch("CREATE TABLE schema_migrations (version BIGINT PRIMARY KEY)")
            .unwrap();
        for (version, script) in MIGRATIONS.iter().filter(|(v, _)| *v < 3) {
            for statement in tether_store::sql::split_script(script) {
                conn.execute_batch(statement).unwrap();
            }
            conn.execute(
                "INSERT INTO schema_migrations (version) VALUES (?1)",
                [version],
            )
            .unwrap();
        }
        let item = &enqueued.item;
        conn.execute(
            "INSERT INTO work_items (id, version, environment_id, session_id, state, enqueued_at, doc) \
             VALUES (?1, 1, ?2, ?3, 'queued', ?4, ?5)",
            rusqlite::params![
                item.id,
                item.environment_id,
                item.data.id,
                item.enqueued_at.as_micros(),
                serde_json::to_string(item).unwrap()
            ],
        )
        .unwrap();
        conn.execute(
            "INSERT INTO work_transitions (work_id, seq, doc) VALUES (?1, ?2, ?3)",
            rusqlite::params![
                item.id,
                tether_store::history_seq(1, 0),
                serde_json::to_string(&enqueued.transitions[0]).unwrap()
            ],
        )
        .unwrap();
    }
    let store = sqlite::open(&path).unwrap();
    let delivered =
        work::deliver(&enqueued.item, Some("w"), "hash".into(), None, at.next(), 0).unwrap();
    for version in 1..HISTORY_SPILL_EVERY + 2 {
        store
            .commit(ChangeSet::one(Write::UpdateWork {
                item: delivered.item.clone(),
                expected_version: version,
                transitions: delivered.transitions.clone(),
                session_version: None,
            }))
            .await
            .unwrap();
    }
    let history = store.list_history("work_old", None, 1_000).await.unwrap();
    assert_eq!(
        history.items.len(),
        1 + (HISTORY_SPILL_EVERY as usize + 1) * delivered.transitions.len()
    );
    assert_eq!(history.items[0].transition, enqueued.transitions[0]);
    assert!(history.items.windows(2).all(|w| w[0].seq < w[1].seq));
    drop(store);
    let conn = rusqlite::Connection::open(&path).unwrap();
    let (rows, lines): (i64, String) = conn
        .query_row(
            "SELECT (SELECT COUNT(*) FROM work_transitions WHERE work_id = 'work_old'), \
             (SELECT history FROM work_items WHERE id = 'work_old')",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!(rows, 2, "the old row and one chunk");
    assert_eq!(
        lines.lines().count(),
        3 * delivered.transitions.len(),
        "the spilling write (version 32) and the two after it keep their lines in the row: {lines:?}"
    );
}

/// A database that a newer build has migrated further is refused at open, with the reason: this
/// build's SQL may no longer fit its schema.
#[test]
fn a_database_migrated_by_a_newer_build_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tether.db");
    drop(sqlite::open(&path).unwrap());
    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.execute("INSERT INTO schema_migrations (version) VALUES (1000)", [])
        .unwrap();
    drop(conn);
    let refused = sqlite::open(&path)
        .err()
        .expect("a newer schema is refused");
    assert!(
        refused.to_string().contains("newer than this build knows"),
        "{refused}"
    );
}

/// `ping` (behind `/readyz`) reads the database, not only the engine: a database whose tables can no
/// longer be read is not ready.
#[tokio::test]
async fn ping_reads_the_database() {
    let dir = tempfile::tempdir().unwrap();
    let store = sqlite::open(&dir.path().join("tether.db")).unwrap();
    store.ping().await.expect("ready");
    let conn = rusqlite::Connection::open(dir.path().join("tether.db")).unwrap();
    conn.execute_batch("PRAGMA foreign_keys = OFF; DROP TABLE environments;")
        .unwrap();
    assert!(
        store.ping().await.is_err(),
        "a database that cannot be read is not ready"
    );
}

#[tokio::test]
async fn a_held_item_is_a_claim_candidate_from_its_moment_on() {
    let dir = tempfile::tempdir().unwrap();
    let store = sqlite::open(&dir.path().join("tether.db")).unwrap();
    common::a_held_item_is_a_claim_candidate_from_its_moment_on(&store).await;
}

#[tokio::test]
async fn a_deleted_sessions_events_go_a_batch_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let store = sqlite::open(&dir.path().join("tether.db")).unwrap();
    common::a_deleted_sessions_events_go_a_batch_at_a_time(&store).await;
}

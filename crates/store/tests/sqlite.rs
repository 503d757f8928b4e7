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
async fn an_item_is_read_with_its_session() {
    let dir = tempfile::tempdir().unwrap();
    let store = sqlite::open(&dir.path().join("tether.db")).unwrap();
    common::an_item_is_read_with_its_session(&store).await;
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
        store.workers_seen("env_a", epoch).await.unwrap(),
        vec![("w-new".to_owned(), recent)]
    );
    assert!(store.workers_seen("env_b", epoch).await.unwrap().is_empty());
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
    let text = tether_store::sql::claim_candidates("env_a", Timestamp::from_micros(0), 9)
        .sql
        .replace('$', "?");
    let mut statement = conn.prepare(&text).unwrap();
    for cutoff in 0..10_i64 {
        // Each poll binds the statement's parameters afresh, whatever they are.
        let claim = tether_store::sql::claim_candidates("env_a", Timestamp::from_micros(cutoff), 9);
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

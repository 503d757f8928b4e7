//! The embedded store's read pool, on a real SQLite file: a connection is lent to one read at a time,
//! whatever happens to the request that asked for it.

use std::time::Duration;

use tether_store::executor::Executor;
use tether_store::sql::{Statement, Value};
use tether_store::sqlite;

/// A read that takes a while (it counts to `n`) and is not marked bounded, so that it runs on a
/// blocking thread of its own.
fn counting_read(n: i64) -> Statement {
    Statement::new(
        "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < $1) \
         SELECT COUNT(*) FROM c",
        vec![Value::Int(n)],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_read_whose_caller_gave_up_keeps_its_connection_until_it_ends() {
    let dir = tempfile::tempdir().unwrap();
    let store = sqlite::open(&dir.path().join("tether.db")).unwrap();
    let exec = store.executor();
    // The caller goes away (a client that disconnected, a timeout) while its read is still running
    // on its blocking thread, holding one of the pool's connections.
    let gave_up = tokio::time::timeout(
        Duration::from_millis(20),
        exec.query(counting_read(5_000_000)),
    )
    .await;
    assert!(gave_up.is_err(), "the slow read finished within 20 ms");
    // As many reads as the pool has connections, at once and long enough to overlap: one of them
    // must wait for the abandoned read's connection instead of finding the pool empty.
    let reads = (0..sqlite::READERS).map(|_| exec.query(counting_read(1_000_000)));
    for outcome in futures::future::join_all(reads).await {
        let rows = outcome.expect("a read while another's caller gave up");
        assert_eq!(rows, vec![vec![Value::Int(1_000_000)]]);
    }
    // And the pool is whole afterwards.
    let reads = (0..sqlite::READERS * 2).map(|_| exec.query(counting_read(1_000)));
    for outcome in futures::future::join_all(reads).await {
        outcome.expect("a read after the abandoned one ended");
    }
}

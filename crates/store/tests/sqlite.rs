//! The embedded store's bookkeeping tables, on a real file.

use tether_core::Timestamp;
use tether_store::{sqlite, ChangeSet, Store, Write};

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

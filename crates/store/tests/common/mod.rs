//! Checks of the store interface that every backend must pass, whatever SQL it runs for them.

use serde_json::{json, Value};
use tether_core::resources::{Agent, Environment, Session};
use tether_core::session::SessionStatus;
use tether_core::work::{self, WorkData};
use tether_core::Timestamp;
use tether_store::{ChangeSet, Store, StoreError, Write};

const AT: Timestamp = Timestamp::from_micros(5_000_000);

fn environment(id: &str) -> Environment {
    Environment {
        id: id.into(),
        name: id.into(),
        description: String::new(),
        config: json!({"type": "self_hosted"}),
        metadata: Default::default(),
        scope: None,
        created_at: AT,
        updated_at: AT,
        archived_at: None,
    }
}

fn session(id: &str, environment_id: &str) -> Session {
    Session {
        id: id.into(),
        agent: Agent {
            id: "agent_1".into(),
            name: "agent".into(),
            model: json!("model"),
            description: None,
            system: None,
            tools: json!([]),
            skills: json!([]),
            mcp_servers: json!([]),
            execution_identity: None,
            metadata: Default::default(),
            version: 1,
            created_at: AT,
            updated_at: AT,
            archived_at: None,
        },
        environment_id: environment_id.into(),
        status: SessionStatus::Idle,
        title: None,
        metadata: Default::default(),
        environment_variables: Default::default(),
        resources: Value::Array(vec![]),
        budget: None,
        created_at: AT,
        updated_at: AT,
        archived_at: None,
        pending_input: false,
        last_event_id: None,
    }
}

/// A queued item for `session_id`, committed; returns the step that enqueued it.
async fn enqueue(store: &impl Store, work_id: &str, session_id: &str) -> work::Step {
    let step = work::enqueue(
        work_id.into(),
        "env_store".into(),
        WorkData::session(session_id.to_owned()),
        Default::default(),
        AT,
        &Default::default(),
    );
    store
        .commit(ChangeSet::one(Write::InsertWork {
            item: step.item.clone(),
            transitions: step.transitions.clone(),
        }))
        .await
        .unwrap();
    step
}

async fn history_len(store: &impl Store, work_id: &str) -> usize {
    let page = store.list_history(work_id, None, 100).await;
    page.unwrap().items.len()
}

/// An item's history rows are written exactly when the conditional write of its row is, never alone
/// (PostgreSQL writes both in one statement, SQLite in one transaction).
pub async fn an_items_history_is_written_with_its_row_or_not_at_all(store: &impl Store) {
    let enqueued = enqueue(store, "work_history", "sesn_history").await;
    assert_eq!(history_len(store, "work_history").await, 1);
    let delivered =
        work::deliver(&enqueued.item, Some("w"), "hash".into(), None, AT.next(), 0).unwrap();
    assert!(!delivered.transitions.is_empty());
    let update = |expected_version| {
        ChangeSet::one(Write::UpdateWork {
            item: delivered.item.clone(),
            expected_version,
            transitions: delivered.transitions.clone(),
        })
    };
    assert!(matches!(
        store.commit(update(7)).await,
        Err(StoreError::Conflict)
    ));
    assert_eq!(
        history_len(store, "work_history").await,
        1,
        "a refused write leaves no history"
    );
    store.commit(update(1)).await.unwrap();
    assert_eq!(
        history_len(store, "work_history").await,
        1 + delivered.transitions.len(),
        "the history of a committed write is all there"
    );
    let read = store.get_work("work_history").await.unwrap().unwrap();
    assert_eq!((read.version, read.value), (2, delivered.item));
}

/// An item's history stays whole and in order, page after page, however many writes it has had: the
/// lines kept in the item's row move to chunk rows every `HISTORY_SPILL_EVERY` versions, and a refused
/// write at such a version moves nothing.
pub async fn an_items_long_history_reads_whole_in_pages(store: &impl Store) {
    use tether_store::sql::HISTORY_SPILL_EVERY;
    let enqueued = enqueue(store, "work_long", "sesn_long").await;
    let delivered =
        work::deliver(&enqueued.item, Some("w"), "hash".into(), None, AT.next(), 0).unwrap();
    let update = |expected_version| {
        ChangeSet::one(Write::UpdateWork {
            item: delivered.item.clone(),
            expected_version,
            transitions: delivered.transitions.clone(),
        })
    };
    let mut expected = vec![tether_store::history_seq(1, 0)];
    for version in 1..3 * HISTORY_SPILL_EVERY + 5 {
        if (version + 1) % HISTORY_SPILL_EVERY == 0 {
            assert!(matches!(
                store.commit(update(version + 1)).await,
                Err(StoreError::Conflict)
            ));
        }
        store.commit(update(version)).await.unwrap();
        expected.extend(
            (0..delivered.transitions.len()).map(|i| tether_store::history_seq(version + 1, i)),
        );
    }
    let mut read = Vec::new();
    let mut after = None;
    loop {
        let page = store.list_history("work_long", after, 7).await.unwrap();
        assert!(page.items.len() <= 7);
        read.extend(page.items.iter().map(|h| h.seq));
        after = read.last().copied();
        if !page.has_more {
            break;
        }
        assert_eq!(
            page.items.len(),
            7,
            "a page short of its limit says there is no more"
        );
    }
    assert_eq!(read, expected);
    let whole = store.list_history("work_long", None, 1_000).await.unwrap();
    assert!(!whole.has_more);
    assert_eq!(whole.items[0].transition, enqueued.transitions[0]);
    assert!(whole.items[1..]
        .iter()
        .all(|h| h.transition == delivered.transitions[0]));
}

/// `get_work_with_session` answers the item and its session as they are, the session `None` when it
/// is gone, and nothing for an unknown item.
pub async fn an_item_is_read_with_its_session(store: &impl Store) {
    let mut changes = ChangeSet::one(Write::InsertEnvironment(environment("env_store")));
    changes.push(Write::InsertSession(session("sesn_joined", "env_store")));
    store.commit(changes).await.unwrap();
    let enqueued = enqueue(store, "work_joined", "sesn_joined").await;
    let orphan = enqueue(store, "work_orphan", "sesn_gone").await;

    let (item, session) = store
        .get_work_with_session("work_joined")
        .await
        .unwrap()
        .expect("the item exists");
    assert_eq!((item.version, item.value), (1, enqueued.item));
    let session = session.expect("the session exists");
    assert_eq!(session.version, 1);
    assert_eq!(session.value, self::session("sesn_joined", "env_store"));

    let (item, session) = store
        .get_work_with_session("work_orphan")
        .await
        .unwrap()
        .expect("the item exists");
    assert_eq!(item.value, orphan.item);
    assert!(session.is_none());

    assert!(store
        .get_work_with_session("work_unknown")
        .await
        .unwrap()
        .is_none());
}

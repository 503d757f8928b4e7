//! Checks of the store interface that every backend must pass, whatever SQL it runs for them.

use serde_json::{json, Value};
use tether_core::resources::{Agent, Environment, Session};
use tether_core::session::SessionStatus;
use tether_core::work::{self, WorkData};
use tether_core::Timestamp;
use tether_store::{ChangeSet, ClaimWindow, Store, StoreError, Write};

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
        next_item_not_before: None,
        turns_started: 0,
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
        None,
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

/// An item's history is written exactly when the conditional write of its row is, never alone (its
/// lines are part of that one `UPDATE` or `INSERT`).
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
            session_version: None,
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

/// How many chunk rows of `work_transitions` and lines of its own an item should have.
pub struct HistoryShape {
    pub work_id: &'static str,
    pub chunks: usize,
    pub lines: usize,
}

/// Reads an item's whole history `limit` transitions at a time; checks that every page but the last
/// is full and says there is more, and the last says there is not.
async fn history_in_pages(store: &impl Store, work_id: &str, limit: u32) -> Vec<i64> {
    let mut read = Vec::new();
    let mut after = None;
    for _ in 0..10_000 {
        let page = store.list_history(work_id, after, limit).await.unwrap();
        read.extend(page.items.iter().map(|h| h.seq));
        after = read.last().copied();
        if !page.has_more {
            return read;
        }
        assert_eq!(
            page.items.len(),
            limit as usize,
            "{work_id}: a page that says there is more is full"
        );
    }
    panic!("{work_id}: the pages never end");
}

/// An item's history stays whole and in order, page after page, however many writes it has had: the
/// lines kept in the item's row move to chunk rows every `HISTORY_SPILL_EVERY` versions, and a change
/// set refused after its spill moves nothing. Returns what each item's rows should hold, for the
/// caller to check with its backend's own SQL.
pub async fn an_items_long_history_reads_whole_in_pages(store: &impl Store) -> Vec<HistoryShape> {
    use tether_store::history_seq;
    use tether_store::sql::HISTORY_SPILL_EVERY as EVERY;
    let update = |item: &tether_core::WorkItem,
                  expected_version,
                  transitions: &[tether_core::Transition]| Write::UpdateWork {
        item: item.clone(),
        expected_version,
        transitions: transitions.to_vec(),
        session_version: None,
    };

    // An item with a transition at every write: three chunks, and six versions' lines in its row.
    let enqueued = enqueue(store, "work_long", "sesn_long").await;
    let delivered =
        work::deliver(&enqueued.item, Some("w"), "hash".into(), None, AT.next(), 0).unwrap();
    let per_write = delivered.transitions.len();
    let mut expected = vec![history_seq(1, 0)];
    for version in 1..3 * EVERY + 5 {
        let write = update(&delivered.item, version, &delivered.transitions);
        if (version + 1) % EVERY == 0 {
            // The same write twice in one change set: the second finds the version moved on, and the
            // whole set, the first write's spill included, is taken back. Were the spill's chunk row
            // left behind, the retry below would collide with it.
            let mut refused = ChangeSet::one(write.clone());
            refused.push(write.clone());
            assert!(matches!(
                store.commit(refused).await,
                Err(StoreError::Conflict)
            ));
        }
        store.commit(ChangeSet::one(write)).await.unwrap();
        expected.extend((0..per_write).map(|i| history_seq(version + 1, i)));
    }
    for limit in [1, 7, 1_000] {
        assert_eq!(
            history_in_pages(store, "work_long", limit).await,
            expected,
            "limit {limit}"
        );
    }
    let whole = store.list_history("work_long", None, 1_000).await.unwrap();
    assert_eq!(whole.items[0].transition, enqueued.transitions[0]);
    assert!(whole.items[1..]
        .iter()
        .all(|h| h.transition == delivered.transitions[0]));

    // An item whose writes mostly carry no transition (heartbeats): each chunk holds one line, so a
    // cursor at a chunk's end leaves that chunk with nothing after it.
    let enqueued = enqueue(store, "work_sparse", "sesn_sparse").await;
    let mut expected = vec![history_seq(1, 0)];
    for version in 1..=5 * EVERY {
        let transitions: &[tether_core::Transition] = if (version + 1) % EVERY == 1 {
            &delivered.transitions
        } else {
            &[]
        };
        store
            .commit(ChangeSet::one(update(&enqueued.item, version, transitions)))
            .await
            .unwrap();
        expected.extend((0..transitions.len()).map(|i| history_seq(version + 1, i)));
    }
    for limit in [1, 2, 3, 1_000] {
        assert_eq!(
            history_in_pages(store, "work_sparse", limit).await,
            expected,
            "limit {limit}"
        );
    }

    vec![
        HistoryShape {
            work_id: "work_long",
            chunks: 3,
            lines: 6 * per_write,
        },
        HistoryShape {
            work_id: "work_sparse",
            chunks: 5,
            lines: per_write,
        },
    ]
}

/// `get_work_with_session` answers the item and its session as they are, the session `None` when it
/// is gone, and nothing for an unknown item.
pub async fn an_item_is_read_with_its_session(store: &impl Store) {
    let mut changes = ChangeSet::one(Write::InsertEnvironment(environment("env_store")));
    changes.push(Write::InsertSession {
        session: session("sesn_joined", "env_store"),
        agent_version: None,
    });
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

/// An item's write conditional on its session's version (`UpdateWork::session_version`) is refused
/// when the session is at another version or gone, and changes neither row then.
pub async fn an_items_write_can_be_conditional_on_its_session(store: &impl Store) {
    let mut changes = ChangeSet::one(Write::InsertEnvironment(environment("env_store")));
    changes.push(Write::InsertSession {
        session: session("sesn_judged", "env_store"),
        agent_version: None,
    });
    store.commit(changes).await.unwrap();
    let enqueued = enqueue(store, "work_judged", "sesn_judged").await;
    let delivered =
        work::deliver(&enqueued.item, Some("w"), "hash".into(), None, AT.next(), 0).unwrap();
    let update = |session_version| {
        ChangeSet::one(Write::UpdateWork {
            item: delivered.item.clone(),
            expected_version: 1,
            transitions: delivered.transitions.clone(),
            session_version,
        })
    };
    for stale in [0, 2] {
        assert!(
            matches!(
                store.commit(update(Some(stale))).await,
                Err(StoreError::Conflict)
            ),
            "judged at version {stale}, the session is at 1"
        );
    }
    assert_eq!(
        store
            .get_work("work_judged")
            .await
            .unwrap()
            .unwrap()
            .version,
        1
    );
    store.commit(update(Some(1))).await.unwrap();
    let read = store.get_work("work_judged").await.unwrap().unwrap();
    assert_eq!((read.version, read.value), (2, delivered.item.clone()));
    assert_eq!(
        history_len(store, "work_judged").await,
        1 + delivered.transitions.len()
    );

    // A session gone refuses the write too.
    let orphan = enqueue(store, "work_unjudged", "sesn_never").await;
    let delivered =
        work::deliver(&orphan.item, Some("w"), "hash2".into(), None, AT.next(), 0).unwrap();
    assert!(matches!(
        store
            .commit(ChangeSet::one(Write::UpdateWork {
                item: delivered.item,
                expected_version: 1,
                transitions: delivered.transitions,
                session_version: Some(1),
            }))
            .await,
        Err(StoreError::Conflict)
    ));
}

/// A session's insert conditional on its agent's row version (`InsertSession::agent_version`) is
/// refused when the agent has moved on (updated or archived) or does not exist, and inserts nothing
/// then; at the agent's current version it succeeds.
pub async fn a_sessions_insert_can_be_conditional_on_its_agent(store: &impl Store) {
    let agent = session("sesn_unused", "env_store").agent;
    let mut changes = ChangeSet::one(Write::InsertEnvironment(environment("env_store")));
    changes.push(Write::InsertAgent(agent.clone()));
    store.commit(changes).await.unwrap();
    let mut updated = agent.clone();
    updated.version = 2;
    store
        .commit(ChangeSet::one(Write::UpdateAgent {
            agent: updated,
            expected_version: 1,
        }))
        .await
        .unwrap();
    let insert = |id: &str, agent_id: &str, agent_version| {
        let mut session = session(id, "env_store");
        session.agent.id = agent_id.into();
        ChangeSet::one(Write::InsertSession {
            session,
            agent_version: Some(agent_version),
        })
    };
    for (id, agent_id, version) in [
        ("sesn_stale", "agent_1", 1),
        ("sesn_ahead", "agent_1", 3),
        ("sesn_no_agent", "agent_none", 1),
    ] {
        assert!(
            matches!(
                store.commit(insert(id, agent_id, version)).await,
                Err(StoreError::Conflict)
            ),
            "{id}: the agent row is at version 2"
        );
        assert!(store.get_session(id).await.unwrap().is_none(), "{id}");
    }
    store
        .commit(insert("sesn_current", "agent_1", 2))
        .await
        .unwrap();
    assert_eq!(
        store
            .get_session("sesn_current")
            .await
            .unwrap()
            .map(|s| s.version),
        Some(1)
    );
}

/// The workers seen since a time are the most recent first, at most as many as asked for.
pub async fn workers_seen_are_the_most_recent_up_to_the_limit(store: &impl Store) {
    for (worker, second) in [("w1", 1), ("w2", 3), ("w3", 2), ("w4", 4)] {
        store
            .commit(ChangeSet::one(Write::TouchWorker {
                environment_id: "env_limit".into(),
                worker_id: worker.into(),
                at: Timestamp::from_micros(second * 1_000_000),
            }))
            .await
            .unwrap();
    }
    let since = Timestamp::from_micros(2_000_000);
    let names =
        |seen: Vec<(String, Timestamp)>| seen.into_iter().map(|(w, _)| w).collect::<Vec<_>>();
    assert_eq!(
        names(store.workers_seen("env_limit", since, 10).await.unwrap()),
        ["w4", "w2", "w3"]
    );
    assert_eq!(
        names(store.workers_seen("env_limit", since, 2).await.unwrap()),
        ["w4", "w2"]
    );
}

/// A held item (`WorkItem::not_before`) is no claim candidate before its moment, whatever its place in
/// the queue, through its insert and every later write; from its moment on it takes its place again.
pub async fn a_held_item_is_a_claim_candidate_from_its_moment_on(store: &impl Store) {
    let until = AT.plus_seconds(60);
    let mut changes = ChangeSet::new();
    changes.push(Write::InsertEnvironment(environment("env_held")));
    let held = work::enqueue(
        "work_held".into(),
        "env_held".into(),
        WorkData::session("sesn_held"),
        Default::default(),
        AT,
        Some(until),
        &Default::default(),
    );
    let plain = work::enqueue(
        "work_plain".into(),
        "env_held".into(),
        WorkData::session("sesn_plain"),
        Default::default(),
        AT.plus_seconds(1),
        None,
        &Default::default(),
    );
    for step in [&held, &plain] {
        changes.push(Write::InsertWork {
            item: step.item.clone(),
            transitions: step.transitions.clone(),
        });
    }
    store.commit(changes).await.unwrap();
    let candidates = async |now: Timestamp| {
        store
            .claim_candidates("env_held", ClaimWindow::at(now, 30_000), 10)
            .await
            .unwrap()
            .into_iter()
            .map(|c| c.id)
            .collect::<Vec<_>>()
    };
    assert_eq!(candidates(AT.plus_seconds(2)).await, ["work_plain"]);
    assert_eq!(candidates(until.minus_millis(1)).await, ["work_plain"]);
    assert_eq!(candidates(until).await, ["work_held", "work_plain"]);

    // A write that keeps it held keeps it out.
    let patch =
        tether_core::metadata::MetadataPatch::from([("k".to_owned(), Some("v".to_owned()))]);
    let patched = work::patch_metadata(&held.item, &patch).unwrap();
    store
        .commit(ChangeSet::one(Write::UpdateWork {
            item: patched.item.clone(),
            expected_version: 1,
            transitions: patched.transitions,
            session_version: None,
        }))
        .await
        .unwrap();
    assert_eq!(candidates(AT.plus_seconds(2)).await, ["work_plain"]);
    let read = store.get_work("work_held").await.unwrap().unwrap();
    assert_eq!(read.value.not_before, Some(until));
}

/// The marks of the server processes keeping the leases: each server's latest replaces its earlier
/// one, promise of amnesty included, a server never reads its own, a stopping server's is taken
/// back, and marks older than a moment are forgotten.
pub async fn lease_keeper_marks_are_kept_one_per_server(store: &impl Store) {
    use std::time::Duration;
    use tether_core::lease::LeaseKeeperMark;
    let mark = |server_id: &str, at_ms: i64| {
        // Only `host-a`'s second mark promises amnesty: a later mark without one replaces it.
        let mark = LeaseKeeperMark::new(Timestamp::from_millis(at_ms), Duration::from_secs(1))
            .promising(if at_ms == 2_000 { 30_000 } else { 0 });
        (
            Write::MarkLeasesKept {
                server_id: server_id.into(),
                mark,
            },
            mark,
        )
    };
    let (a1, _) = mark("host-a/127.0.0.1:4780", 1_000);
    let (a2, a2_mark) = mark("host-a/127.0.0.1:4780", 2_000);
    let (b, b_mark) = mark("host-b/127.0.0.1:4780", 1_500);
    store
        .commit(ChangeSet {
            writes: vec![a1, b],
        })
        .await
        .unwrap();
    store.commit(ChangeSet::one(a2)).await.unwrap();
    let elsewhere = |server_id: &'static str| store.lease_keeper_marks_elsewhere(server_id);
    assert_eq!(
        elsewhere("host-b/127.0.0.1:4780").await.unwrap(),
        vec![a2_mark]
    );
    assert_eq!(
        elsewhere("host-a/127.0.0.1:4780").await.unwrap(),
        vec![b_mark]
    );
    // Newest first, for a server that is neither.
    assert_eq!(
        elsewhere("host-c/127.0.0.1:4780").await.unwrap(),
        vec![a2_mark, b_mark]
    );
    assert!(a2_mark.promises_until.is_some() && b_mark.promises_until.is_none());
    // A server's own mark, as its next run reads it: the promise in it included.
    let own = |server_id: &'static str| store.lease_keeper_mark_of(server_id);
    assert_eq!(own("host-a/127.0.0.1:4780").await.unwrap(), Some(a2_mark));
    assert_eq!(own("host-b/127.0.0.1:4780").await.unwrap(), Some(b_mark));
    assert_eq!(own("host-c/127.0.0.1:4780").await.unwrap(), None);
    let (a3, a3_mark) = mark("host-a/127.0.0.1:4780", 2_500);
    store.commit(ChangeSet::one(a3)).await.unwrap();
    assert_eq!(
        elsewhere("host-b/127.0.0.1:4780").await.unwrap(),
        vec![a3_mark],
        "a mark promising nothing replaces one that promised"
    );
    store
        .commit(ChangeSet::one(Write::UnmarkLeasesKept {
            server_id: "host-a/127.0.0.1:4780".into(),
        }))
        .await
        .unwrap();
    assert_eq!(
        elsewhere("host-c/127.0.0.1:4780").await.unwrap(),
        vec![b_mark]
    );
    assert_eq!(own("host-a/127.0.0.1:4780").await.unwrap(), None);
    store
        .commit(ChangeSet::one(Write::ForgetLeaseKeepers {
            before: Timestamp::from_millis(1_501),
        }))
        .await
        .unwrap();
    assert!(elsewhere("host-c/127.0.0.1:4780").await.unwrap().is_empty());
}

/// A session token names one live item: a write that would give a second item the token hash
/// another holds is refused as a conflict, and once the first lets go of it the second may take it.
pub async fn a_session_token_holds_one_item_at_most(store: &impl Store) {
    let first = enqueue(store, "work_token_1", "sesn_token_1").await;
    let second = enqueue(store, "work_token_2", "sesn_token_2").await;
    let deliver = |item: &tether_core::WorkItem| {
        work::deliver(item, Some("w"), "same-hash".into(), None, AT, 5_000).unwrap()
    };
    let update = |step: work::Step, expected_version: i64| {
        ChangeSet::one(Write::UpdateWork {
            item: step.item,
            expected_version,
            transitions: step.transitions,
            session_version: None,
        })
    };
    let taken = deliver(&first.item);
    store.commit(update(taken.clone(), 1)).await.unwrap();
    let refused = store.commit(update(deliver(&second.item), 1)).await;
    assert!(matches!(refused, Err(StoreError::Conflict)), "{refused:?}");
    let read = store.get_work("work_token_2").await.unwrap().unwrap();
    assert_eq!((read.version, read.value.session_token_hash), (1, None));
    let holder = store
        .work_by_token_hash("same-hash")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(holder.value.id, "work_token_1");

    let stopped = work::stop(&taken.item, true, AT).unwrap();
    store.commit(update(stopped, 2)).await.unwrap();
    store
        .commit(update(deliver(&second.item), 1))
        .await
        .unwrap();
    let holder = store
        .work_by_token_hash("same-hash")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(holder.value.id, "work_token_2");
}

/// A session's delete removes its row and the first [`EVENT_PURGE_BATCH`] of its events; the rest
/// go a batch per call of `purge_deleted_events`, which says `true` while it found some to delete,
/// and leaves the events of sessions not deleted alone. No read shows a deleted session's events
/// meanwhile.
pub async fn a_deleted_sessions_events_go_a_batch_at_a_time(store: &impl Store) {
    use tether_store::sql::EVENT_PURGE_BATCH;
    use tether_store::PageRequest;
    let mut changes = ChangeSet::one(Write::InsertEnvironment(environment("env_store")));
    for id in ["sesn_large", "sesn_small", "sesn_kept"] {
        changes.push(Write::InsertSession {
            session: session(id, "env_store"),
            agent_version: None,
        });
    }
    store.commit(changes).await.unwrap();
    let batch = EVENT_PURGE_BATCH as usize;
    for (session_id, count) in [
        ("sesn_large", 2 * batch + 5),
        ("sesn_small", 3),
        ("sesn_kept", 2),
    ] {
        let events: Vec<Write> = (0..count)
            .map(|n| {
                Write::InsertEvent(tether_core::resources::SessionEvent {
                    id: format!("sevt_{session_id}_{n:06}"),
                    session_id: session_id.into(),
                    body: json!({"type": "agent.message", "n": n}),
                })
            })
            .collect();
        for chunk in events.chunks(500) {
            let mut changes = ChangeSet::default();
            for write in chunk {
                changes.push(write.clone());
            }
            store.commit(changes).await.unwrap();
        }
    }
    let events_of = |session_id: &'static str| async move {
        let page = store
            .list_events(session_id, &PageRequest::first(10_000), usize::MAX)
            .await;
        page.unwrap().items.len()
    };
    assert_eq!(events_of("sesn_large").await, 2 * batch + 5);
    assert!(!store.purge_deleted_events(EVENT_PURGE_BATCH).await.unwrap());

    let mut deletes = ChangeSet::default();
    for id in ["sesn_large", "sesn_small"] {
        deletes.push(Write::DeleteSession {
            id: id.into(),
            expected_version: 1,
        });
    }
    store.commit(deletes).await.unwrap();
    assert_eq!(
        events_of("sesn_small").await,
        0,
        "none is read once its session is gone"
    );
    assert_eq!(
        events_of("sesn_large").await,
        0,
        "none is read once its session is gone"
    );
    let mut calls = 0;
    while store.purge_deleted_events(EVENT_PURGE_BATCH).await.unwrap() {
        calls += 1;
        assert!(calls <= 3, "each call deletes a batch");
    }
    assert_eq!(
        calls, 3,
        "the delete took one batch: a whole batch is left, then 5, then the small session's end"
    );
    assert_eq!(
        events_of("sesn_kept").await,
        2,
        "a session not deleted keeps its events"
    );
}

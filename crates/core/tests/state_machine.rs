//! Table tests for the work-item state machine: one row per cell of SPEC §5.1, §5.2, §5.3 and §5.4.
//!
//! Every row names a fixture item (built through the public operations, the way a server would reach
//! that state), an operation, and what the table says: the exact item after the call (field by field),
//! the single transition and its cause, or the refusal. Operations run through `work::evaluate` at an
//! instant where the fixture's lease still holds, so a refusal must leave the stored item untouched.

use tether_core::lease::LeasePolicy;
use tether_core::metadata::{Metadata, MetadataError, MetadataPatch};
use tether_core::time::Timestamp;
use tether_core::work::{
    self, Cause, Delivery, ExpectedHeartbeat, Step, WorkData, WorkError, WorkItem, WorkState,
};

const W1: &str = "worker-1";
const W2: &str = "worker-2";
const TOKEN_1: &str = "token-hash-1";
const TOKEN_NEW: &str = "token-hash-new";

/// Seconds after the fixtures' epoch (2026-07-01T08:15:00Z).
fn t(secs: i64) -> Timestamp {
    Timestamp::parse_rfc3339("2026-07-01T08:15:00Z")
        .unwrap()
        .plus_seconds(secs)
}

/// The instant every row runs at: well inside every fixture's lease.
fn now() -> Timestamp {
    t(10)
}

fn policy() -> LeasePolicy {
    LeasePolicy::default()
}

fn meta(pairs: &[(&str, &str)]) -> Metadata {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn enqueue_at(at: Timestamp, policy: &LeasePolicy) -> WorkItem {
    let step = work::enqueue(
        "work_019f3be4fd2475d9a784bf2c739e1194".into(),
        "env_019e64e01a137caf953ac2ac7b42ec5c".into(),
        WorkData {
            kind: "session".into(),
            id: "sess_019f3be3fa66750bb9a1fbcde85b5fe1".into(),
        },
        meta(&[("job", "daily-report")]),
        at,
        None,
        policy,
    );
    assert_eq!(step.transitions.len(), 1);
    assert_eq!(step.transitions[0].from, None);
    assert_eq!(step.transitions[0].to, WorkState::Queued);
    assert_eq!(step.transitions[0].cause, Cause::Enqueued);
    assert!(work::invariant_violation(&step.item).is_none());
    step.item
}

/// The states (and the variants of a state that make a difference to some cell) a row can start from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fx {
    /// Queued, never delivered.
    Queued,
    /// Queued, delivered at t(1) to `W1`.
    QueuedDelivered,
    /// Queued, delivered at t(1) by a poll without Worker-ID.
    QueuedDeliveredAnon,
    /// Acked at t(2) by `W1`.
    Starting,
    /// Acked at t(2) without Worker-ID after an anonymous poll: no recorded owner.
    StartingAnon,
    /// First heartbeat at t(3) by `W1`.
    Active,
    /// Like `Active`, no recorded owner.
    ActiveAnon,
    /// Graceful stop at t(4) of an active item (a heartbeat exists).
    Stopping,
    /// Graceful stop at t(4) of a starting item: a stop requested before the first beat.
    StoppingUnbeaten,
    /// Force-stopped at t(4) while active.
    Stopped,
}

impl Fx {
    const ALL: [Fx; 10] = [
        Fx::Queued,
        Fx::QueuedDelivered,
        Fx::QueuedDeliveredAnon,
        Fx::Starting,
        Fx::StartingAnon,
        Fx::Active,
        Fx::ActiveAnon,
        Fx::Stopping,
        Fx::StoppingUnbeaten,
        Fx::Stopped,
    ];

    fn build(self) -> WorkItem {
        let p = policy();
        let fresh = || enqueue_at(t(0), &p);
        let delivered = |w: Option<&str>| {
            work::deliver(&fresh(), w, TOKEN_1.into(), None, t(1), 5_000)
                .unwrap()
                .item
        };
        let starting = |w: Option<&str>| work::ack(&delivered(w), w, t(2)).unwrap().item;
        let active = |w: Option<&str>| {
            work::heartbeat(&starting(w), ExpectedHeartbeat::None, None, w, t(3), &p)
                .unwrap()
                .0
                .item
        };
        let item = match self {
            Fx::Queued => fresh(),
            Fx::QueuedDelivered => delivered(Some(W1)),
            Fx::QueuedDeliveredAnon => delivered(None),
            Fx::Starting => starting(Some(W1)),
            Fx::StartingAnon => starting(None),
            Fx::Active => active(Some(W1)),
            Fx::ActiveAnon => active(None),
            Fx::Stopping => work::stop(&active(Some(W1)), false, t(4)).unwrap().item,
            Fx::StoppingUnbeaten => work::stop(&starting(Some(W1)), false, t(4)).unwrap().item,
            Fx::Stopped => work::stop(&active(Some(W1)), true, t(4)).unwrap().item,
        };
        assert!(work::invariant_violation(&item).is_none(), "{self:?}");
        item
    }

    fn state(self) -> WorkState {
        match self {
            Fx::Queued | Fx::QueuedDelivered | Fx::QueuedDeliveredAnon => WorkState::Queued,
            Fx::Starting | Fx::StartingAnon => WorkState::Starting,
            Fx::Active | Fx::ActiveAnon => WorkState::Active,
            Fx::Stopping | Fx::StoppingUnbeaten => WorkState::Stopping,
            Fx::Stopped => WorkState::Stopped,
        }
    }
}

#[test]
fn fixtures_are_in_the_state_they_claim() {
    for fx in Fx::ALL {
        let item = fx.build();
        assert_eq!(item.state, fx.state(), "{fx:?}");
    }
    let active = Fx::Active.build();
    assert_eq!(active.acknowledged_at, Some(t(2)));
    assert_eq!(active.started_at, Some(t(3)));
    assert_eq!(active.latest_heartbeat_at, Some(t(3)));
    assert_eq!(active.lease_expires_at, Some(t(63)));
    assert_eq!(active.owner_worker_id.as_deref(), Some(W1));
    assert_eq!(Fx::Starting.build().lease_expires_at, Some(t(62)));
    assert_eq!(Fx::StoppingUnbeaten.build().latest_heartbeat_at, None);
    assert_eq!(Fx::Stopped.build().stopped_at, Some(t(4)));
}

/// Which refusal a cell names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Refusal {
    /// 409 because of the state.
    InvalidState,
    /// 409 because a different worker is recorded.
    WorkerMismatch,
    /// 412.
    Precondition,
    /// Poll does not select the item.
    NotClaimable,
    /// 409: an implicit claim of a held item.
    Held,
    /// 400 on metadata limits.
    Metadata,
    /// 409: a session token acting on an item it no longer holds.
    NotHeld,
    /// 409: a stop asked to leave an open turn found one (the session's rule, not the item's).
    TurnOpen,
}

fn refusal_of(error: &WorkError) -> Refusal {
    match error {
        WorkError::InvalidState { .. } => Refusal::InvalidState,
        WorkError::WorkerMismatch => Refusal::WorkerMismatch,
        WorkError::PreconditionFailed { .. } => Refusal::Precondition,
        WorkError::NotClaimable => Refusal::NotClaimable,
        WorkError::Held { .. } => Refusal::Held,
        WorkError::Metadata(_) => Refusal::Metadata,
        WorkError::NotHeld => Refusal::NotHeld,
        WorkError::TurnOpen { .. } => Refusal::TurnOpen,
    }
}

/// Builds the exact item the table expects from the item before the call.
type Expect = Box<dyn Fn(&WorkItem) -> WorkItem>;
type Op = Box<dyn Fn(&WorkItem, Timestamp) -> Result<Step, WorkError>>;

enum Want {
    /// `=`: accepted, the item is returned unchanged, nothing to write, no transition.
    Same,
    /// Accepted, the state stays, other fields change exactly as described, no transition.
    Updated(Expect),
    /// Accepted with exactly one transition to the expected item's state, for this cause.
    Moves(Cause, Expect),
    /// Refused; nothing changes.
    Refused(Refusal),
}

struct Row {
    cell: String,
    fx: Fx,
    op: Op,
    want: Want,
}

fn row(
    cell: impl Into<String>,
    fx: Fx,
    op: impl Fn(&WorkItem, Timestamp) -> Result<Step, WorkError> + 'static,
    want: Want,
) -> Row {
    Row {
        cell: cell.into(),
        fx,
        op: Box::new(op),
        want,
    }
}

fn expect(f: impl Fn(&WorkItem) -> WorkItem + 'static) -> Expect {
    Box::new(f)
}

fn run(rows: Vec<Row>) {
    for row in rows {
        let cell = format!("{} [{:?}]", row.cell, row.fx);
        let before = row.fx.build();
        assert_eq!(before.state, row.fx.state(), "{cell}");
        let at = now();
        let evaluation = work::evaluate(&before, at, &policy(), |cur| (row.op)(cur, at));
        assert!(
            evaluation.expired.is_none(),
            "{cell}: the fixture's lease must still hold"
        );
        // The operation only ever sees a borrowed item: a refusal writes nothing, so what is stored
        // afterwards is `before`, which must still be the fixture.
        assert_eq!(before, row.fx.build(), "{cell}: the input item was altered");
        match (row.want, evaluation.outcome) {
            (Want::Refused(kind), Err(error)) => {
                assert_eq!(refusal_of(&error), kind, "{cell}: {error}");
                match error {
                    WorkError::InvalidState { state, .. } => {
                        assert_eq!(state, before.state, "{cell}")
                    }
                    WorkError::PreconditionFailed { current, .. } => {
                        assert_eq!(current.state, before.state, "{cell}");
                        assert_eq!(current.ttl_seconds, before.ttl_seconds, "{cell}");
                        assert_eq!(current.last_heartbeat, before.latest_heartbeat_at, "{cell}");
                    }
                    _ => {}
                }
            }
            (Want::Refused(kind), Ok(step)) => {
                panic!("{cell}: expected {kind:?}, got accepted {:?}", step.item)
            }
            (_, Err(error)) => panic!("{cell}: expected acceptance, got {error:?}"),
            (Want::Same, Ok(step)) => {
                assert_eq!(step.item, before, "{cell}");
                assert!(step.transitions.is_empty(), "{cell}");
                assert!(!step.changes(&before), "{cell}");
            }
            (Want::Updated(want), Ok(step)) => {
                let expected = want(&before);
                assert_eq!(expected.state, before.state, "{cell}: bad row");
                assert_eq!(step.item, expected, "{cell}");
                assert!(
                    step.transitions.is_empty(),
                    "{cell}: {:?}",
                    step.transitions
                );
                assert!(work::invariant_violation(&step.item).is_none(), "{cell}");
            }
            (Want::Moves(cause, want), Ok(step)) => {
                let expected = want(&before);
                assert_eq!(step.item, expected, "{cell}");
                assert_eq!(step.transitions.len(), 1, "{cell}: {:?}", step.transitions);
                let tr = &step.transitions[0];
                assert_eq!(tr.from, Some(before.state), "{cell}");
                assert_eq!(tr.to, expected.state, "{cell}");
                assert_eq!(tr.cause, cause, "{cell}");
                assert_eq!(tr.at, at, "{cell}");
                let worker = if matches!(cause, Cause::Delivered | Cause::Redelivered) {
                    step.item
                        .delivery
                        .as_ref()
                        .and_then(|d| d.worker_id.clone())
                } else {
                    before
                        .owner_worker_id
                        .clone()
                        .or(step.item.owner_worker_id.clone())
                };
                assert_eq!(tr.worker_id, worker, "{cell}");
                assert!(step.changes(&before), "{cell}");
                assert!(work::invariant_violation(&step.item).is_none(), "{cell}");
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------------
// §5.1 poll / ack / get / update-metadata

fn deliver_op(worker: Option<&'static str>, reclaim_ms: i64) -> Op {
    Box::new(move |item, at| {
        let claimable = work::is_claimable(item, at, reclaim_ms);
        let result = work::deliver(item, worker, TOKEN_NEW.into(), None, at, reclaim_ms);
        assert_eq!(
            claimable,
            result.is_ok(),
            "deliver must agree with is_claimable"
        );
        result
    })
}

fn delivered_to(worker: Option<&'static str>) -> Expect {
    expect(move |b| WorkItem {
        delivery: Some(Delivery {
            worker_id: worker.map(str::to_owned),
            delivered_at: now(),
        }),
        delivery_count: b.delivery_count + 1,
        session_token_hash: Some(TOKEN_NEW.into()),
        session_token_issuer: None,
        // A redelivery counts in a row; a first delivery starts afresh.
        redeliveries_in_a_row: if b.delivery.is_some() {
            b.redeliveries_in_a_row + 1
        } else {
            0
        },
        ..b.clone()
    })
}

#[test]
fn table_5_1_poll() {
    // Fixtures were delivered at t(1); rows run at t(10), 9 000 ms later.
    let mut rows = vec![
        row(
            "poll, queued & undelivered",
            Fx::Queued,
            deliver_op(Some(W2), 5_000),
            Want::Moves(Cause::Delivered, delivered_to(Some(W2))),
        ),
        row(
            "poll without Worker-ID, queued & undelivered",
            Fx::Queued,
            deliver_op(None, 5_000),
            Want::Moves(Cause::Delivered, delivered_to(None)),
        ),
        row(
            "poll, undelivered, huge window",
            Fx::Queued,
            deliver_op(Some(W2), i64::MAX),
            Want::Moves(Cause::Delivered, delivered_to(Some(W2))),
        ),
        row(
            "poll, delivery younger than the window",
            Fx::QueuedDelivered,
            deliver_op(Some(W2), 60_000),
            Want::Refused(Refusal::NotClaimable),
        ),
        row(
            "poll, delivery 1 ms younger than the window",
            Fx::QueuedDelivered,
            deliver_op(Some(W2), 9_001),
            Want::Refused(Refusal::NotClaimable),
        ),
        row(
            "poll, delivery exactly as old as the window",
            Fx::QueuedDelivered,
            deliver_op(Some(W2), 9_000),
            Want::Moves(Cause::Redelivered, delivered_to(Some(W2))),
        ),
        row(
            "poll, delivery older than the window",
            Fx::QueuedDelivered,
            deliver_op(Some(W2), 5_000),
            Want::Moves(Cause::Redelivered, delivered_to(Some(W2))),
        ),
        row(
            "poll, reclaim window 0",
            Fx::QueuedDelivered,
            deliver_op(Some(W1), 0),
            Want::Moves(Cause::Redelivered, delivered_to(Some(W1))),
        ),
        row(
            "poll, anonymous delivery older than the window",
            Fx::QueuedDeliveredAnon,
            deliver_op(None, 0),
            Want::Moves(Cause::Redelivered, delivered_to(None)),
        ),
        row(
            "poll, anonymous delivery younger than the window",
            Fx::QueuedDeliveredAnon,
            deliver_op(Some(W2), 10_000),
            Want::Refused(Refusal::NotClaimable),
        ),
    ];
    for fx in [
        Fx::Starting,
        Fx::StartingAnon,
        Fx::Active,
        Fx::ActiveAnon,
        Fx::Stopping,
        Fx::StoppingUnbeaten,
        Fx::Stopped,
    ] {
        for reclaim in [0, 5_000, i64::MAX] {
            rows.push(row(
                "poll never selects a non-queued item",
                fx,
                deliver_op(Some(W2), reclaim),
                Want::Refused(Refusal::NotClaimable),
            ));
        }
    }
    run(rows);
}

fn ack_op(worker: Option<&'static str>) -> Op {
    Box::new(move |item, at| work::ack(item, worker, at))
}

fn acked_by(owner: Option<&'static str>) -> Expect {
    expect(move |b| WorkItem {
        state: WorkState::Starting,
        acknowledged_at: Some(now()),
        owner_worker_id: owner.map(str::to_owned),
        delivery: None,
        lease_expires_at: Some(now().plus_seconds(60)),
        ..b.clone()
    })
}

#[test]
fn table_5_1_ack_without_conflict() {
    let rows = vec![
        // queued: → starting; D-6 implicit claim of a never-delivered item.
        row(
            "ack W, undelivered",
            Fx::Queued,
            ack_op(Some(W2)),
            Want::Moves(Cause::Acked, acked_by(Some(W2))),
        ),
        row(
            "ack no W, undelivered",
            Fx::Queued,
            ack_op(None),
            Want::Moves(Cause::Acked, acked_by(None)),
        ),
        row(
            "ack W = delivery worker",
            Fx::QueuedDelivered,
            ack_op(Some(W1)),
            Want::Moves(Cause::Acked, acked_by(Some(W1))),
        ),
        row(
            "ack no W, owner taken from the delivery",
            Fx::QueuedDelivered,
            ack_op(None),
            Want::Moves(Cause::Acked, acked_by(Some(W1))),
        ),
        row(
            "ack W after anonymous poll",
            Fx::QueuedDeliveredAnon,
            ack_op(Some(W2)),
            Want::Moves(Cause::Acked, acked_by(Some(W2))),
        ),
        row(
            "ack no W after anonymous poll",
            Fx::QueuedDeliveredAnon,
            ack_op(None),
            Want::Moves(Cause::Acked, acked_by(None)),
        ),
        // starting / active: idempotent (D-28).
        row("re-ack same W", Fx::Starting, ack_op(Some(W1)), Want::Same),
        row("re-ack no W", Fx::Starting, ack_op(None), Want::Same),
        row(
            "re-ack W, no recorded owner",
            Fx::StartingAnon,
            ack_op(Some(W2)),
            Want::Same,
        ),
        row("re-ack same W", Fx::Active, ack_op(Some(W1)), Want::Same),
        row("re-ack no W", Fx::Active, ack_op(None), Want::Same),
        row(
            "re-ack W, no recorded owner",
            Fx::ActiveAnon,
            ack_op(Some(W2)),
            Want::Same,
        ),
        // stopping / stopped: 409.
        row(
            "ack same W",
            Fx::Stopping,
            ack_op(Some(W1)),
            Want::Refused(Refusal::InvalidState),
        ),
        row(
            "ack no W",
            Fx::Stopping,
            ack_op(None),
            Want::Refused(Refusal::InvalidState),
        ),
        row(
            "ack same W",
            Fx::StoppingUnbeaten,
            ack_op(Some(W1)),
            Want::Refused(Refusal::InvalidState),
        ),
        row(
            "ack same W",
            Fx::Stopped,
            ack_op(Some(W1)),
            Want::Refused(Refusal::InvalidState),
        ),
        row(
            "ack no W",
            Fx::Stopped,
            ack_op(None),
            Want::Refused(Refusal::InvalidState),
        ),
    ];
    run(rows);
}

#[test]
fn table_5_1_ack_with_a_different_worker() {
    let rows = vec![
        row(
            "ack W ≠ delivery worker",
            Fx::QueuedDelivered,
            ack_op(Some(W2)),
            Want::Refused(Refusal::WorkerMismatch),
        ),
        row(
            "ack W ≠ owner",
            Fx::Starting,
            ack_op(Some(W2)),
            Want::Refused(Refusal::WorkerMismatch),
        ),
        row(
            "ack W ≠ owner",
            Fx::Active,
            ack_op(Some(W2)),
            Want::Refused(Refusal::WorkerMismatch),
        ),
        row(
            "ack W ≠ owner (409 by state)",
            Fx::Stopping,
            ack_op(Some(W2)),
            Want::Refused(Refusal::InvalidState),
        ),
        row(
            "ack W ≠ owner (409 by state)",
            Fx::StoppingUnbeaten,
            ack_op(Some(W2)),
            Want::Refused(Refusal::InvalidState),
        ),
        row(
            "ack W ≠ owner (409 by state)",
            Fx::Stopped,
            ack_op(Some(W2)),
            Want::Refused(Refusal::InvalidState),
        ),
    ];
    run(rows);
}

#[test]
fn a_reclaimable_delivery_still_protects_its_worker_against_a_foreign_ack() {
    // §5.1: the recorded worker while queued is the delivery worker, whatever the delivery's age.
    let item = Fx::QueuedDelivered.build();
    let late = t(3_600);
    assert!(work::is_claimable(&item, late, 5_000));
    assert_eq!(
        work::ack(&item, Some(W2), late),
        Err(WorkError::WorkerMismatch)
    );
    // Once re-delivered to W2, W2 may ack and W1 may not.
    let redelivered = work::deliver(&item, Some(W2), TOKEN_NEW.into(), None, late, 5_000)
        .unwrap()
        .item;
    assert_eq!(
        work::ack(&redelivered, Some(W1), late),
        Err(WorkError::WorkerMismatch)
    );
    let acked = work::ack(&redelivered, Some(W2), late).unwrap().item;
    assert_eq!(acked.owner_worker_id.as_deref(), Some(W2));
    assert_eq!(acked.session_token_hash.as_deref(), Some(TOKEN_NEW));
}

#[test]
fn table_5_1_get() {
    let get: fn(&WorkItem, Timestamp) -> Result<Step, WorkError> =
        |item, _| Ok(Step::unchanged(item));
    run(Fx::ALL
        .into_iter()
        .map(|fx| row("get", fx, get, Want::Same))
        .collect());
}

fn patch_op(pairs: &'static [(&'static str, Option<&'static str>)]) -> Op {
    Box::new(move |item, _| {
        let patch: MetadataPatch = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.map(str::to_owned)))
            .collect();
        work::patch_metadata(item, &patch)
    })
}

#[test]
fn table_5_1_update_metadata_in_every_state() {
    static MERGE: [(&str, Option<&str>); 3] = [
        ("job", None),
        ("worker", Some("byoc-worker-01")),
        ("obsolete_key", None),
    ];
    static TOO_MANY: [(&str, Option<&str>); 16] = [
        ("k0", Some("v")),
        ("k1", Some("v")),
        ("k2", Some("v")),
        ("k3", Some("v")),
        ("k4", Some("v")),
        ("k5", Some("v")),
        ("k6", Some("v")),
        ("k7", Some("v")),
        ("k8", Some("v")),
        ("k9", Some("v")),
        ("k10", Some("v")),
        ("k11", Some("v")),
        ("k12", Some("v")),
        ("k13", Some("v")),
        ("k14", Some("v")),
        ("k15", Some("v")),
    ];
    // 15 new keys + the existing "job" = 16: at the limit, allowed.
    static AT_LIMIT: [(&str, Option<&str>); 15] = [
        ("k0", Some("v")),
        ("k1", Some("v")),
        ("k2", Some("v")),
        ("k3", Some("v")),
        ("k4", Some("v")),
        ("k5", Some("v")),
        ("k6", Some("v")),
        ("k7", Some("v")),
        ("k8", Some("v")),
        ("k9", Some("v")),
        ("k10", Some("v")),
        ("k11", Some("v")),
        ("k12", Some("v")),
        ("k13", Some("v")),
        ("k14", Some("v")),
    ];
    static EMPTY: [(&str, Option<&str>); 0] = [];
    static SAME_VALUE: [(&str, Option<&str>); 1] = [("job", Some("daily-report"))];
    let mut rows = Vec::new();
    for fx in Fx::ALL {
        rows.push(row(
            "update metadata (merge; D-10)",
            fx,
            patch_op(&MERGE),
            Want::Updated(expect(|b| WorkItem {
                metadata: meta(&[("worker", "byoc-worker-01")]),
                ..b.clone()
            })),
        ));
        rows.push(row(
            "update metadata up to the limit",
            fx,
            patch_op(&AT_LIMIT),
            Want::Updated(expect(|b| {
                let mut metadata = b.metadata.clone();
                for (k, v) in AT_LIMIT.iter() {
                    metadata.insert(k.to_string(), v.unwrap().to_string());
                }
                assert_eq!(metadata.len(), 16);
                WorkItem {
                    metadata,
                    ..b.clone()
                }
            })),
        ));
        rows.push(row(
            "update metadata, empty patch",
            fx,
            patch_op(&EMPTY),
            Want::Same,
        ));
        rows.push(row(
            "update metadata, same value",
            fx,
            patch_op(&SAME_VALUE),
            Want::Same,
        ));
        rows.push(row(
            "update metadata past the limit",
            fx,
            patch_op(&TOO_MANY),
            Want::Refused(Refusal::Metadata),
        ));
    }
    run(rows);
    let item = Fx::Stopped.build();
    let patch: MetadataPatch = TOO_MANY
        .iter()
        .map(|(k, v)| (k.to_string(), v.map(str::to_owned)))
        .collect();
    assert_eq!(
        work::patch_metadata(&item, &patch),
        Err(WorkError::Metadata(MetadataError::TooManyKeys))
    );
}

// ---------------------------------------------------------------------------------------------------
// §5.2 heartbeat

/// The `expected_last_heartbeat` a row sends, resolved against the item it is sent to.
#[derive(Clone, Copy, Debug)]
enum E {
    NoHeartbeat,
    Omitted,
    /// Equal to the current `last_heartbeat`; where none exists, a plausible instant (t(3)).
    Current,
    /// Not equal: one microsecond off the current value (or an arbitrary instant where none exists).
    Wrong,
}

fn resolve(e: E, item: &WorkItem) -> ExpectedHeartbeat {
    match e {
        E::NoHeartbeat => ExpectedHeartbeat::None,
        E::Omitted => ExpectedHeartbeat::Any,
        E::Current => ExpectedHeartbeat::At(item.latest_heartbeat_at.unwrap_or(t(3))),
        E::Wrong => ExpectedHeartbeat::At(
            item.latest_heartbeat_at
                .map(|l| Timestamp::from_micros(l.as_micros() - 1))
                .unwrap_or(t(5)),
        ),
    }
}

fn hb_op(e: E, desired_ttl: Option<u32>, worker: Option<&'static str>) -> Op {
    Box::new(move |item, at| {
        let (step, reply) =
            work::heartbeat(item, resolve(e, item), desired_ttl, worker, at, &policy())?;
        // §2.4: the reply mirrors the stored item.
        assert_eq!(Some(reply.last_heartbeat), step.item.latest_heartbeat_at);
        assert_eq!(reply.last_heartbeat, at, "the accepted instant is now (µs)");
        assert!(reply.lease_extended);
        assert_eq!(reply.state, step.item.state);
        assert!(matches!(
            reply.state,
            WorkState::Active | WorkState::Stopping
        ));
        assert_eq!(reply.ttl_seconds, step.item.ttl_seconds);
        Ok(step)
    })
}

/// "HB accepted": last_heartbeat := now, ttl := clamp(desired or current), lease := now + ttl.
fn beat(ttl: u32) -> impl Fn(&WorkItem) -> WorkItem {
    move |b| WorkItem {
        latest_heartbeat_at: Some(now()),
        heartbeat_floor: Some(now()),
        ttl_seconds: ttl,
        lease_expires_at: Some(now().plus_seconds(i64::from(ttl))),
        heartbeat_count: b.heartbeat_count + 1,
        ..b.clone()
    }
}

fn first_beat(ttl: u32) -> Expect {
    expect(move |b| WorkItem {
        state: WorkState::Active,
        started_at: Some(now()),
        ..beat(ttl)(b)
    })
}

fn same_state_beat(ttl: u32) -> Expect {
    expect(beat(ttl))
}

#[test]
fn table_5_2_heartbeat() {
    use Refusal::{InvalidState, Precondition};
    let refused = Want::Refused;
    let cells: Vec<(E, Fx, Want)> = vec![
        // NO_HEARTBEAT
        (E::NoHeartbeat, Fx::Queued, refused(InvalidState)),
        (E::NoHeartbeat, Fx::QueuedDelivered, refused(InvalidState)),
        (
            E::NoHeartbeat,
            Fx::Starting,
            Want::Moves(Cause::FirstHeartbeat, first_beat(60)),
        ),
        (E::NoHeartbeat, Fx::Active, refused(Precondition)),
        (E::NoHeartbeat, Fx::Stopping, refused(Precondition)),
        (
            E::NoHeartbeat,
            Fx::StoppingUnbeaten,
            Want::Updated(same_state_beat(60)),
        ),
        (E::NoHeartbeat, Fx::Stopped, refused(InvalidState)),
        // omitted
        (E::Omitted, Fx::Queued, refused(InvalidState)),
        (E::Omitted, Fx::QueuedDelivered, refused(InvalidState)),
        (
            E::Omitted,
            Fx::Starting,
            Want::Moves(Cause::FirstHeartbeat, first_beat(60)),
        ),
        (E::Omitted, Fx::Active, Want::Updated(same_state_beat(60))),
        (E::Omitted, Fx::Stopping, Want::Updated(same_state_beat(60))),
        (
            E::Omitted,
            Fx::StoppingUnbeaten,
            Want::Updated(same_state_beat(60)),
        ),
        (E::Omitted, Fx::Stopped, refused(InvalidState)),
        // equal to the current last_heartbeat
        (E::Current, Fx::Queued, refused(InvalidState)),
        (E::Current, Fx::QueuedDelivered, refused(InvalidState)),
        (E::Current, Fx::Starting, refused(Precondition)),
        (E::Current, Fx::Active, Want::Updated(same_state_beat(60))),
        (E::Current, Fx::Stopping, Want::Updated(same_state_beat(60))),
        (E::Current, Fx::StoppingUnbeaten, refused(Precondition)),
        (E::Current, Fx::Stopped, refused(InvalidState)),
        // not equal
        (E::Wrong, Fx::Queued, refused(InvalidState)),
        (E::Wrong, Fx::QueuedDelivered, refused(InvalidState)),
        (E::Wrong, Fx::Starting, refused(Precondition)),
        (E::Wrong, Fx::Active, refused(Precondition)),
        (E::Wrong, Fx::Stopping, refused(Precondition)),
        (E::Wrong, Fx::StoppingUnbeaten, refused(Precondition)),
        (E::Wrong, Fx::Stopped, refused(InvalidState)),
    ];
    assert_eq!(cells.len(), 4 * 7);
    let mut rows = Vec::new();
    for (e, fx, want) in cells {
        // The same cell with the owner's Worker-ID and without one.
        let with_owner = match &want {
            Want::Refused(r) => Want::Refused(*r),
            Want::Same => Want::Same,
            Want::Updated(_) => Want::Updated(if fx == Fx::Starting {
                first_beat(60)
            } else {
                same_state_beat(60)
            }),
            Want::Moves(c, _) => Want::Moves(*c, first_beat(60)),
        };
        rows.push(row(
            format!("heartbeat E={e:?}, owner's W"),
            fx,
            hb_op(e, None, Some(W1)),
            with_owner,
        ));
        rows.push(row(
            format!("heartbeat E={e:?}, no W"),
            fx,
            hb_op(e, None, None),
            want,
        ));
    }
    run(rows);
}

#[test]
fn table_5_2_heartbeat_from_a_different_worker_d7b() {
    use Refusal::{InvalidState, Precondition};
    let mut rows = Vec::new();
    for e in [E::NoHeartbeat, E::Omitted, E::Current, E::Wrong] {
        // State first (409), then the Worker-ID guard (412), whatever E is.
        for fx in [Fx::Queued, Fx::QueuedDelivered, Fx::Stopped] {
            rows.push(row(
                format!("heartbeat E={e:?}, foreign W"),
                fx,
                hb_op(e, None, Some(W2)),
                Want::Refused(InvalidState),
            ));
        }
        for fx in [Fx::Starting, Fx::Active, Fx::Stopping, Fx::StoppingUnbeaten] {
            rows.push(row(
                format!("heartbeat E={e:?}, foreign W"),
                fx,
                hb_op(e, None, Some(W2)),
                Want::Refused(Precondition),
            ));
        }
    }
    // Without a recorded owner the header checks nothing.
    rows.push(row(
        "heartbeat, W, no recorded owner",
        Fx::StartingAnon,
        hb_op(E::NoHeartbeat, None, Some(W2)),
        Want::Moves(Cause::FirstHeartbeat, first_beat(60)),
    ));
    rows.push(row(
        "heartbeat, W, no recorded owner",
        Fx::ActiveAnon,
        hb_op(E::Current, None, Some(W2)),
        Want::Updated(same_state_beat(60)),
    ));
    run(rows);
}

#[test]
fn table_5_2_heartbeat_ttl_is_clamped_and_sticky() {
    let mut rows = Vec::new();
    for (desired, applied) in [
        (None, 60),
        (Some(1), 10),
        (Some(10), 10),
        (Some(90), 90),
        (Some(600), 600),
        (Some(601), 600),
        (Some(u32::MAX), 600),
    ] {
        rows.push(row(
            format!("first heartbeat, desired ttl {desired:?}"),
            Fx::Starting,
            hb_op(E::NoHeartbeat, desired, Some(W1)),
            Want::Moves(Cause::FirstHeartbeat, first_beat(applied)),
        ));
        rows.push(row(
            format!("heartbeat, desired ttl {desired:?}"),
            Fx::Active,
            hb_op(E::Current, desired, Some(W1)),
            Want::Updated(same_state_beat(applied)),
        ));
        rows.push(row(
            format!("heartbeat while stopping, desired ttl {desired:?}"),
            Fx::Stopping,
            hb_op(E::Omitted, desired, None),
            Want::Updated(same_state_beat(applied)),
        ));
    }
    run(rows);

    // D-9b: an explicit TTL persists for later heartbeats that omit it, and for a later ack's provisional lease.
    let p = policy();
    let item = Fx::Active.build();
    let (step, reply) =
        work::heartbeat(&item, ExpectedHeartbeat::Any, Some(90), None, t(5), &p).unwrap();
    assert_eq!(reply.ttl_seconds, 90);
    let (step, reply) = work::heartbeat(
        &step.item,
        ExpectedHeartbeat::At(reply.last_heartbeat),
        None,
        None,
        t(6),
        &p,
    )
    .unwrap();
    assert_eq!(reply.ttl_seconds, 90);
    assert_eq!(step.item.lease_expires_at, Some(t(96)));
}

#[test]
fn table_5_2_expected_last_heartbeat_syntax_d29() {
    // The malformed row answers 400 in every state: the parse happens before any state is looked at,
    // and does not depend on the item.
    for bad in [
        "",
        " ",
        "no_heartbeat",
        "No_Heartbeat",
        "NO_HEARTBEAT ",
        " NO_HEARTBEAT",
        "NOHEARTBEAT",
        "null",
        "2026-07-01",
        "08:15:06Z",
        "2026-07-01 08:15:06",
        "1782893706",
        "yesterday",
        "2026-13-01T00:00:00Z",
    ] {
        assert_eq!(ExpectedHeartbeat::parse(Some(bad)), None, "{bad:?}");
    }
    assert_eq!(ExpectedHeartbeat::parse(None), Some(ExpectedHeartbeat::Any));
    assert_eq!(
        ExpectedHeartbeat::parse(Some("NO_HEARTBEAT")),
        Some(ExpectedHeartbeat::None)
    );
    assert_eq!(
        ExpectedHeartbeat::parse(Some(work::NO_HEARTBEAT)),
        Some(ExpectedHeartbeat::None)
    );

    // An RFC 3339 value is compared as an instant at microsecond resolution (§6.7).
    let p = policy();
    let item = Fx::Active.build();
    let (step, reply) = work::heartbeat(
        &item,
        ExpectedHeartbeat::Any,
        None,
        None,
        t(5).plus_millis(120).next(),
        &p,
    )
    .unwrap();
    let token = reply.last_heartbeat.to_rfc3339();
    assert_eq!(token, "2026-07-01T08:15:05.120001Z");
    for spelling in [
        token.as_str(),
        "2026-07-01T10:15:05.120001+02:00",
        "2026-07-01T08:15:05.120001999Z",
        "2026-07-01t08:15:05.120001z",
    ] {
        let expected =
            ExpectedHeartbeat::parse(Some(spelling)).unwrap_or_else(|| panic!("{spelling}"));
        assert_eq!(
            expected,
            ExpectedHeartbeat::At(reply.last_heartbeat),
            "{spelling}"
        );
        assert!(
            work::heartbeat(&step.item, expected, None, None, t(6), &p).is_ok(),
            "{spelling}"
        );
    }
    let off = ExpectedHeartbeat::parse(Some("2026-07-01T08:15:05.120002Z")).unwrap();
    assert!(matches!(
        work::heartbeat(&step.item, off, None, None, t(6), &p),
        Err(WorkError::PreconditionFailed { .. })
    ));
}

#[test]
fn heartbeat_tokens_stay_strictly_increasing_d30() {
    let p = policy();
    let item = Fx::Active.build();
    // Two heartbeats in the same microsecond hand out different, increasing tokens.
    let at = t(20);
    let (a, ra) = work::heartbeat(&item, ExpectedHeartbeat::Any, None, None, at, &p).unwrap();
    let (b, rb) = work::heartbeat(
        &a.item,
        ExpectedHeartbeat::At(ra.last_heartbeat),
        None,
        None,
        at,
        &p,
    )
    .unwrap();
    assert_eq!(ra.last_heartbeat, at);
    assert_eq!(rb.last_heartbeat, at.next());
    assert_eq!(b.item.latest_heartbeat_at, Some(at.next()));
    assert_eq!(b.item.lease_expires_at, Some(at.next().plus_seconds(60)));
    // The previous token is now stale.
    assert!(matches!(
        work::heartbeat(
            &b.item,
            ExpectedHeartbeat::At(ra.last_heartbeat),
            None,
            None,
            at,
            &p
        ),
        Err(WorkError::PreconditionFailed { .. })
    ));
    // A server whose clock lags behind the last token still hands out a later one.
    let (c, rc) = work::heartbeat(&b.item, ExpectedHeartbeat::Any, None, None, t(15), &p).unwrap();
    assert_eq!(rc.last_heartbeat, at.next().next());
    assert_eq!(c.item.heartbeat_floor, Some(rc.last_heartbeat));

    // The floor survives a requeue: the next lease's tokens are later than every earlier one.
    let requeued = work::expire_if_due(&c.item, t(200), &p).unwrap().item;
    assert_eq!(requeued.latest_heartbeat_at, None);
    assert_eq!(requeued.heartbeat_floor, Some(rc.last_heartbeat));
    let acked = work::ack(&requeued, None, t(201)).unwrap().item;
    let (_, rd) = work::heartbeat(&acked, ExpectedHeartbeat::None, None, None, t(19), &p).unwrap();
    assert!(rd.last_heartbeat > rc.last_heartbeat);
}

// ---------------------------------------------------------------------------------------------------
// §5.3 stop

fn stop_op(force: bool) -> Op {
    Box::new(move |item, at| work::stop(item, force, at))
}

/// Entry to `stopped` at now: stop_requested_at = now if it was null, and nothing lets a worker act.
fn stopped_now() -> Expect {
    expect(|b| WorkItem {
        state: WorkState::Stopped,
        stop_requested_at: b.stop_requested_at.or(Some(now())),
        stopped_at: Some(now()),
        delivery: None,
        lease_expires_at: None,
        session_token_hash: None,
        session_token_issuer: None,
        ..b.clone()
    })
}

#[test]
fn table_5_3_stop() {
    let stopping_now = || {
        expect(|b| WorkItem {
            state: WorkState::Stopping,
            stop_requested_at: Some(now()),
            ..b.clone()
        })
    };
    let rows = vec![
        // force = false
        row(
            "graceful stop (D-7, D-26)",
            Fx::Queued,
            stop_op(false),
            Want::Moves(Cause::StopRequested, stopped_now()),
        ),
        row(
            "graceful stop (D-7, D-26)",
            Fx::QueuedDelivered,
            stop_op(false),
            Want::Moves(Cause::StopRequested, stopped_now()),
        ),
        row(
            "graceful stop",
            Fx::Starting,
            stop_op(false),
            Want::Moves(Cause::StopRequested, stopping_now()),
        ),
        row(
            "graceful stop",
            Fx::Active,
            stop_op(false),
            Want::Moves(Cause::StopRequested, stopping_now()),
        ),
        row(
            "graceful stop = done confirmation",
            Fx::Stopping,
            stop_op(false),
            Want::Moves(Cause::StopConfirmed, stopped_now()),
        ),
        row(
            "graceful stop = done confirmation",
            Fx::StoppingUnbeaten,
            stop_op(false),
            Want::Moves(Cause::StopConfirmed, stopped_now()),
        ),
        row(
            "graceful stop (D-7c)",
            Fx::Stopped,
            stop_op(false),
            Want::Refused(Refusal::InvalidState),
        ),
        // force = true
        row(
            "force stop",
            Fx::Queued,
            stop_op(true),
            Want::Moves(Cause::ForceStopped, stopped_now()),
        ),
        row(
            "force stop",
            Fx::QueuedDelivered,
            stop_op(true),
            Want::Moves(Cause::ForceStopped, stopped_now()),
        ),
        row(
            "force stop",
            Fx::Starting,
            stop_op(true),
            Want::Moves(Cause::ForceStopped, stopped_now()),
        ),
        row(
            "force stop",
            Fx::Active,
            stop_op(true),
            Want::Moves(Cause::ForceStopped, stopped_now()),
        ),
        row(
            "force stop",
            Fx::Stopping,
            stop_op(true),
            Want::Moves(Cause::ForceStopped, stopped_now()),
        ),
        row(
            "force stop",
            Fx::StoppingUnbeaten,
            stop_op(true),
            Want::Moves(Cause::ForceStopped, stopped_now()),
        ),
        row(
            "force stop (D-7c)",
            Fx::Stopped,
            stop_op(true),
            Want::Refused(Refusal::InvalidState),
        ),
    ];
    run(rows);

    // Spot checks of the stamps the expectations derive.
    let q = work::stop(&Fx::Queued.build(), false, now()).unwrap().item;
    assert_eq!(
        (q.stop_requested_at, q.stopped_at),
        (Some(now()), Some(now()))
    );
    let s = work::stop(&Fx::Stopping.build(), true, now()).unwrap().item;
    assert_eq!(
        (s.stop_requested_at, s.stopped_at),
        (Some(t(4)), Some(now()))
    );
    let a = work::stop(&Fx::Active.build(), false, now()).unwrap().item;
    assert_eq!(
        a.lease_expires_at,
        Some(t(63)),
        "a graceful stop keeps the lease"
    );
}

// ---------------------------------------------------------------------------------------------------
// §5.4 timers and external events

#[test]
fn table_5_4_reclaim_window() {
    let delivered = Fx::QueuedDelivered.build(); // delivered at t(1)
    let cases = [
        (t(1), 0, true),
        (t(1), 1, false),
        (t(6).plus_millis(-1).next(), 5_000, false),
        (t(6), 5_000, true),
        (t(6).next(), 5_000, true),
        (t(3_600), i64::MAX, false),
    ];
    for (at, window, claimable) in cases {
        assert_eq!(
            work::is_claimable(&delivered, at, window),
            claimable,
            "{at} {window}"
        );
        assert_eq!(
            work::deliver(&delivered, Some(W2), TOKEN_NEW.into(), None, at, window).is_ok(),
            claimable,
            "{at} {window}"
        );
    }
    let undelivered = Fx::Queued.build();
    assert!(work::is_claimable(&undelivered, t(0), i64::MAX));
    for fx in Fx::ALL
        .into_iter()
        .filter(|fx| fx.state() != WorkState::Queued)
    {
        let item = fx.build();
        for window in [0, 5_000, i64::MAX] {
            assert!(!work::is_claimable(&item, t(10_000), window), "{fx:?}");
        }
    }
    // Re-delivery overwrites the delivery and mints a new token.
    let again = work::deliver(&delivered, Some(W2), TOKEN_NEW.into(), None, t(7), 5_000).unwrap();
    assert_eq!(again.transitions[0].cause, Cause::Redelivered);
    assert_eq!(
        again.item.delivery,
        Some(Delivery {
            worker_id: Some(W2.into()),
            delivered_at: t(7)
        })
    );
    assert_eq!(again.item.delivery_count, 2);
    assert_eq!(again.item.session_token_hash.as_deref(), Some(TOKEN_NEW));
}

/// Acks and lets the lease lapse `n` times (each at a later instant), returning the queued item.
fn requeued(n: u32, p: &LeasePolicy) -> (WorkItem, Timestamp) {
    let mut item = Fx::QueuedDelivered.build();
    let mut at = t(2);
    for i in 0..n {
        let acked = work::ack(&item, None, at).unwrap().item;
        let deadline = acked.lease_expires_at.unwrap();
        assert!(
            work::expire_if_due(&acked, deadline, p).is_none(),
            "expiry is strict"
        );
        at = deadline.next();
        let step = work::expire_if_due(&acked, at, p).unwrap();
        assert_eq!(step.transitions[0].cause, Cause::LeaseExpiredRequeued);
        item = step.item;
        assert_eq!(item.requeue_count, i + 1);
        at = at.plus_seconds(1);
    }
    (item, at)
}

fn requeued_to(at: Timestamp) -> impl Fn(&WorkItem) -> WorkItem {
    move |b| WorkItem {
        state: WorkState::Queued,
        enqueued_at: at,
        acknowledged_at: None,
        started_at: None,
        latest_heartbeat_at: None,
        owner_worker_id: None,
        lease_expires_at: None,
        session_token_hash: None,
        session_token_issuer: None,
        requeue_count: b.requeue_count + 1,
        ..b.clone()
    }
}

fn poisoned_at(at: Timestamp) -> impl Fn(&WorkItem) -> WorkItem {
    move |b| WorkItem {
        state: WorkState::Stopped,
        stop_requested_at: b.stop_requested_at.or(Some(at)),
        stopped_at: Some(at),
        lease_expires_at: None,
        session_token_hash: None,
        session_token_issuer: None,
        ..b.clone()
    }
}

fn check_expiry(
    label: &str,
    before: &WorkItem,
    at: Timestamp,
    p: &LeasePolicy,
    want: Option<(Cause, WorkItem)>,
) {
    let got = work::expire_if_due(before, at, p);
    match (want, got) {
        (None, None) => {}
        (None, Some(step)) => panic!("{label}: unexpected expiry {step:?}"),
        (Some(_), None) => panic!("{label}: the lease should have expired"),
        (Some((cause, expected)), Some(step)) => {
            assert_eq!(step.item, expected, "{label}");
            assert_eq!(step.transitions.len(), 1, "{label}");
            let tr = &step.transitions[0];
            assert_eq!(
                (tr.from, tr.to, tr.cause, tr.at),
                (Some(before.state), expected.state, cause, at),
                "{label}"
            );
            assert_eq!(tr.worker_id, before.owner_worker_id, "{label}");
            assert!(work::invariant_violation(&step.item).is_none(), "{label}");
            assert!(step.item.requeue_count <= p.max_requeues, "{label}");
        }
    }
}

#[test]
fn table_5_4_lease_expiry() {
    let p = policy();
    let far = t(1_000_000);
    // queued and stopped: no lease, nothing happens however late it is.
    for fx in [
        Fx::Queued,
        Fx::QueuedDelivered,
        Fx::QueuedDeliveredAnon,
        Fx::Stopped,
    ] {
        check_expiry(&format!("{fx:?}"), &fx.build(), far, &p, None);
    }
    // starting (deadline t(62)) and active (deadline t(63)) → queued, D-5.
    for (fx, deadline) in [
        (Fx::Starting, t(62)),
        (Fx::StartingAnon, t(62)),
        (Fx::Active, t(63)),
        (Fx::ActiveAnon, t(63)),
    ] {
        let item = fx.build();
        assert_eq!(item.lease_expires_at, Some(deadline));
        check_expiry(
            &format!("{fx:?} at its deadline"),
            &item,
            deadline,
            &p,
            None,
        );
        let at = deadline.next();
        check_expiry(
            &format!("{fx:?} 1µs past"),
            &item,
            at,
            &p,
            Some((Cause::LeaseExpiredRequeued, requeued_to(at)(&item))),
        );
        check_expiry(
            &format!("{fx:?} long past"),
            &item,
            far,
            &p,
            Some((Cause::LeaseExpiredRequeued, requeued_to(far)(&item))),
        );
        // Later re-queues keep created_at and the D-30 floor.
        let back = work::expire_if_due(&item, at, &p).unwrap().item;
        assert_eq!(back.created_at, t(0));
        assert_eq!(back.heartbeat_floor, item.heartbeat_floor);
        assert!(work::is_claimable(&back, at, i64::MAX));
    }
    // stopping → stopped, stopped_at = the expiry instant (the deadline), whatever the requeue count.
    for (fx, deadline) in [(Fx::Stopping, t(63)), (Fx::StoppingUnbeaten, t(62))] {
        let item = fx.build();
        assert_eq!(item.lease_expires_at, Some(deadline));
        check_expiry(
            &format!("{fx:?} at its deadline"),
            &item,
            deadline,
            &p,
            None,
        );
        for at in [deadline.next(), far] {
            let expected = WorkItem {
                state: WorkState::Stopped,
                stopped_at: Some(deadline),
                lease_expires_at: None,
                session_token_hash: None,
                session_token_issuer: None,
                ..item.clone()
            };
            check_expiry(
                &format!("{fx:?} past"),
                &item,
                at,
                &p,
                Some((Cause::LeaseExpiredStopped, expected)),
            );
        }
    }
}

#[test]
fn table_5_4_poison_after_max_requeues() {
    let p = policy();
    assert_eq!(p.max_requeues, 3);
    // Three expiries re-queue; requeue_count reaches 3.
    let (item, at) = requeued(3, &p);
    assert_eq!(item.requeue_count, 3);
    assert_eq!(item.state, WorkState::Queued);
    // The fourth expiry ("requeue_count > 3") stops the item instead: from starting...
    let starting = work::ack(&item, Some(W1), at).unwrap().item;
    let late = starting.lease_expires_at.unwrap().next();
    check_expiry(
        "starting, 4th expiry",
        &starting,
        late,
        &p,
        Some((Cause::PoisonStopped, poisoned_at(late)(&starting))),
    );
    // ...and from active.
    let (active, _) = work::heartbeat(
        &starting,
        ExpectedHeartbeat::None,
        None,
        Some(W1),
        at.plus_seconds(1),
        &p,
    )
    .unwrap();
    let active = active.item;
    let late = active.lease_expires_at.unwrap().next();
    check_expiry(
        "active, 4th expiry",
        &active,
        late,
        &p,
        Some((Cause::PoisonStopped, poisoned_at(late)(&active))),
    );
    let poisoned = work::expire_if_due(&active, late, &p).unwrap();
    assert_eq!(poisoned.item.requeue_count, 3);
    assert!(poisoned.transitions[0]
        .detail
        .as_deref()
        .unwrap()
        .contains('3'));
    // A stopping item past the limit still just stops at its deadline.
    let stopping = work::stop(&active, false, at.plus_seconds(2)).unwrap().item;
    let deadline = stopping.lease_expires_at.unwrap();
    let step = work::expire_if_due(&stopping, deadline.next(), &p).unwrap();
    assert_eq!(step.transitions[0].cause, Cause::LeaseExpiredStopped);
    assert_eq!(step.item.stopped_at, Some(deadline));

    // Other policies: the limit is the policy's.
    for max in [0, 1, 5] {
        let q = LeasePolicy {
            max_requeues: max,
            ..LeasePolicy::default()
        };
        let (item, at) = requeued(max, &q);
        let acked = work::ack(&item, None, at).unwrap().item;
        let late = acked.lease_expires_at.unwrap().next();
        let step = work::expire_if_due(&acked, late, &q).unwrap();
        assert_eq!(step.item.state, WorkState::Stopped, "max {max}");
        assert_eq!(step.transitions[0].cause, Cause::PoisonStopped, "max {max}");
        assert_eq!(step.item.requeue_count, max);
    }
}

#[test]
fn table_5_4_lazy_expiry_runs_before_every_operation() {
    let p = policy();
    let item = Fx::Active.build();
    let late = t(64);
    // Heartbeat on a lapsed lease: the expiry is returned (to be persisted) and the heartbeat gets 409.
    let ev = work::evaluate(&item, late, &p, |cur| {
        work::heartbeat(cur, ExpectedHeartbeat::At(t(3)), None, Some(W1), late, &p)
    });
    let expired = ev.expired.expect("expired");
    assert_eq!(expired.item.state, WorkState::Queued);
    assert_eq!(
        ev.outcome.unwrap_err(),
        WorkError::InvalidState {
            state: WorkState::Queued,
            operation: "heartbeat"
        }
    );
    // A different worker's ack now claims the re-queued item (D-6), and the two steps chain.
    let ev = work::evaluate(&item, late, &p, |cur| work::ack(cur, Some(W2), late));
    let step = work::chain(ev.expired, ev.outcome.unwrap());
    let path: Vec<_> = step
        .transitions
        .iter()
        .map(|t| (t.from, t.to, t.cause))
        .collect();
    assert_eq!(
        path,
        vec![
            (
                Some(WorkState::Active),
                WorkState::Queued,
                Cause::LeaseExpiredRequeued
            ),
            (Some(WorkState::Queued), WorkState::Starting, Cause::Acked),
        ]
    );
    assert_eq!(step.item.owner_worker_id.as_deref(), Some(W2));
    assert_eq!(step.item.requeue_count, 1);
    assert!(work::invariant_violation(&step.item).is_none());
    // Stop on a lapsed stopping item: expiry stops it, the stop itself is 409.
    let stopping = Fx::Stopping.build();
    let ev = work::evaluate(&stopping, late, &p, |cur| work::stop(cur, false, late));
    assert_eq!(ev.expired.unwrap().item.stopped_at, Some(t(63)));
    assert!(matches!(
        ev.outcome,
        Err(WorkError::InvalidState {
            state: WorkState::Stopped,
            ..
        })
    ));
    // Metadata still merges after the expiry.
    let patch: MetadataPatch = [("k".to_string(), Some("v".to_string()))].into();
    let ev = work::evaluate(&item, late, &p, |cur| work::patch_metadata(cur, &patch));
    let step = work::chain(ev.expired, ev.outcome.unwrap());
    assert_eq!(step.item.state, WorkState::Queued);
    assert_eq!(step.item.metadata.get("k").map(String::as_str), Some("v"));
    assert_eq!(step.transitions.len(), 1);
}

#[test]
fn table_5_4_session_archived_or_deleted() {
    for cause in [Cause::SessionArchived, Cause::SessionDeleted] {
        for fx in Fx::ALL {
            let before = fx.build();
            let got = work::force_stop_for(&before, now(), cause);
            if fx == Fx::Stopped {
                assert!(got.is_none(), "{fx:?}: stopped stays =");
                continue;
            }
            let step = got.unwrap_or_else(|| panic!("{fx:?}: a live item is stopped"));
            assert_eq!(step.item, stopped_now()(&before), "{fx:?} {cause:?}");
            assert_eq!(step.transitions.len(), 1);
            let tr = &step.transitions[0];
            assert_eq!(
                (tr.from, tr.to, tr.cause, tr.at),
                (Some(before.state), WorkState::Stopped, cause, now())
            );
            assert!(work::invariant_violation(&step.item).is_none());
        }
    }
    // "environment archived" is `=` in every state: the core has no operation for it, so nothing moves.
}

#[test]
fn every_refusal_keeps_the_state_names_straight() {
    let e = work::stop(&Fx::Stopped.build(), false, now()).unwrap_err();
    assert_eq!(
        e,
        WorkError::InvalidState {
            state: WorkState::Stopped,
            operation: "stop"
        }
    );
    let e = work::ack(&Fx::Stopping.build(), None, now()).unwrap_err();
    assert_eq!(
        e,
        WorkError::InvalidState {
            state: WorkState::Stopping,
            operation: "ack"
        }
    );
    let e = work::heartbeat(
        &Fx::Queued.build(),
        ExpectedHeartbeat::Any,
        None,
        None,
        now(),
        &policy(),
    )
    .unwrap_err();
    assert_eq!(
        e,
        WorkError::InvalidState {
            state: WorkState::Queued,
            operation: "heartbeat"
        }
    );
}

#[test]
fn a_lease_held_by_a_promise_runs_until_its_end_and_nothing_else_moves() {
    // A lapsed lease that another server's promise holds: judged as live until the hold's end.
    for fx in Fx::ALL {
        let item = fx.build();
        let got = work::hold_lease(&item, t(90));
        if item.state.is_leased() {
            // Fixture deadlines are t(62)/t(63), before t(90).
            let held = got.unwrap_or_else(|| panic!("{fx:?}"));
            assert_eq!(
                held,
                WorkItem {
                    lease_expires_at: Some(t(90)),
                    ..item.clone()
                },
                "{fx:?}"
            );
            assert!(!work::lease_lapsed(&held, t(90)), "{fx:?}");
            assert!(work::lease_lapsed(&held, t(90).next()), "{fx:?}");
            // A hold that ends before the deadline moves nothing.
            assert!(work::hold_lease(&item, t(10)).is_none(), "{fx:?}");
        } else {
            assert!(got.is_none(), "{fx:?}");
        }
    }
}

#[test]
fn lease_amnesty_only_extends_live_leases() {
    // §3.1: at server start, leases expiring within the grace window move to its end; nothing else moves.
    let restart = t(50);
    let grace_ms = 30_000;
    for fx in Fx::ALL {
        let item = fx.build();
        let got = work::grant_amnesty(&item, restart, grace_ms);
        if item.state.is_leased() {
            // Fixture deadlines are t(62)/t(63), before t(80).
            let extended = got.unwrap_or_else(|| panic!("{fx:?}"));
            assert_eq!(
                extended,
                WorkItem {
                    lease_expires_at: Some(t(80)),
                    ..item.clone()
                },
                "{fx:?}"
            );
            assert!(
                work::grant_amnesty(&item, t(0), grace_ms).is_none(),
                "{fx:?}: t(30) < deadline"
            );
        } else {
            assert!(got.is_none(), "{fx:?}");
        }
    }
}

/// Who asked for a step goes into each of its transitions' detail, after what was there; the
/// item itself is what the step made of it.
#[test]
fn asked_by_notes_the_asker_after_the_detail() {
    for fx in [Fx::Queued, Fx::Active, Fx::Stopping] {
        for force in [false, true] {
            let item = fx.build();
            let step = work::stop(&item, force, now()).unwrap();
            let before: Vec<Option<String>> =
                step.transitions.iter().map(|t| t.detail.clone()).collect();
            let asked = step.clone().asked_by("admin token tok_x");
            assert_eq!(asked.item, step.item, "{fx:?} force={force}");
            assert_eq!(asked.transitions.len(), before.len());
            for (transition, detail) in asked.transitions.iter().zip(before) {
                let expected = match detail {
                    Some(d) => format!("{d}; asked for by admin token tok_x"),
                    None => "asked for by admin token tok_x".to_owned(),
                };
                assert_eq!(transition.detail.as_deref(), Some(expected.as_str()));
            }
        }
    }
}

/// A worker that polls one item again and again without acking it (`reclaim_older_than_ms=0`) gets
/// a history line for each of the first `RECORDED_REDELIVERIES` redeliveries in a row, and then none:
/// the history stays bounded. The next other transition says how many went unrecorded, and starts
/// the count again.
#[test]
fn redeliveries_in_a_row_are_recorded_up_to_a_bound_then_counted() {
    let p = LeasePolicy::default();
    let mut item = enqueue_at(t(0), &p);
    let mut lines = Vec::new();
    let polls = work::RECORDED_REDELIVERIES + 25;
    for i in 0..=polls {
        let step = work::deliver(
            &item,
            Some(W1),
            TOKEN_1.into(),
            None,
            t(1 + i64::from(i)),
            0,
        )
        .unwrap();
        assert!(step.changes(&item), "every delivery is written (poll {i})");
        lines.extend(step.transitions.iter().map(|t| t.cause));
        item = step.item;
        assert_eq!(item.delivery_count, i + 1);
    }
    let redelivered = lines.iter().filter(|c| **c == Cause::Redelivered).count();
    assert_eq!(lines[0], Cause::Delivered);
    assert_eq!(redelivered, work::RECORDED_REDELIVERIES as usize);
    assert_eq!(item.redeliveries_in_a_row, polls);

    let acked = work::ack(&item, Some(W1), t(100)).unwrap();
    assert_eq!(acked.item.redeliveries_in_a_row, 0);
    assert_eq!(
        acked.transitions[0].detail.as_deref(),
        Some("after 25 more redeliveries, not recorded one by one")
    );
    assert!(work::invariant_violation(&acked.item).is_none());

    // Within the bound, nothing is said, and a stop's own detail is kept after the note.
    let mut item = enqueue_at(t(0), &p);
    for i in 0..3 {
        item = work::deliver(&item, Some(W1), TOKEN_1.into(), None, t(1 + i), 0)
            .unwrap()
            .item;
    }
    let acked = work::ack(&item, Some(W1), t(10)).unwrap();
    assert_eq!(acked.transitions[0].detail, None);
    let mut item = enqueue_at(t(0), &p);
    for i in 0..=i64::from(work::RECORDED_REDELIVERIES) + 1 {
        item = work::deliver(&item, Some(W1), TOKEN_1.into(), None, t(1 + i), 0)
            .unwrap()
            .item;
    }
    let stopped = work::stop(&item, false, t(50)).unwrap();
    assert_eq!(
        stopped.transitions[0].detail.as_deref(),
        Some("after 1 more redeliveries, not recorded one by one; stopped while queued: no worker held it")
    );
}

#[test]
fn a_cancel_stops_only_an_item_no_worker_has_started() {
    for fx in Fx::ALL {
        let item = fx.build();
        let step = work::interrupt_unstarted(&item, t(9));
        if fx.state() != WorkState::Queued {
            assert!(
                step.is_none(),
                "{fx:?}: a started item hears the interrupt itself"
            );
            continue;
        }
        let step = step.expect("a queued item is stopped");
        assert_eq!(step.item.state, WorkState::Stopped, "{fx:?}");
        assert_eq!(
            step.item.delivery, None,
            "{fx:?}: its delivery dies with it"
        );
        assert_eq!(step.item.session_token_hash, None, "{fx:?}");
        assert_eq!(step.transitions.len(), 1);
        assert_eq!(step.transitions[0].cause, Cause::SessionInterrupted);
        assert_eq!(step.holder_may_run_until, None, "{fx:?}: no program ran");
        assert!(work::invariant_violation(&step.item).is_none(), "{fx:?}");
    }
}

/// A session token holds its item from its delivery until the item stops, is handed out again, or
/// its lease lapses: judged on the item once that lapse is settled, the token that was minted for
/// it holds no requeued item.
#[test]
fn a_session_token_holds_its_item_until_its_lease_lapses() {
    let p = policy();
    for fx in Fx::ALL {
        let item = fx.build();
        let held = !matches!(fx, Fx::Queued | Fx::Stopped);
        assert_eq!(work::held_by(&item, TOKEN_1).is_ok(), held, "{fx:?}");
        assert_eq!(
            work::held_by(&item, TOKEN_NEW).map_err(|e| refusal_of(&e)),
            Err(Refusal::NotHeld),
            "{fx:?}: another token"
        );
        let Some(deadline) = item.lease_expires_at else {
            continue;
        };
        let later = deadline.plus_millis(1);
        assert!(work::lease_lapsed(&item, later), "{fx:?}");
        let settled = work::expire_if_due(&item, later, &p).expect("lapsed").item;
        assert_eq!(
            work::held_by(&settled, TOKEN_1).map_err(|e| refusal_of(&e)),
            Err(Refusal::NotHeld),
            "{fx:?}: its lease lapsed, into {:?}",
            settled.state
        );
    }
}

#[test]
fn the_holders_stop_tells_how_its_program_ended() {
    let mut item = Fx::Active.build();
    let stop = |item: &WorkItem, stopper| {
        work::stop_by(item, true, t(9), stopper)
            .unwrap()
            .transitions[0]
            .detail
            .clone()
    };
    // Nothing recorded (a worker of another make): nothing said.
    assert_eq!(stop(&item, work::Stopper::Holder), None);
    item.metadata
        .insert("tether.exit_code".into(), "137".into());
    item.metadata
        .insert("tether.signal".into(), "SIGKILL".into());
    assert_eq!(
        stop(&item, work::Stopper::Holder).as_deref(),
        Some("its program ended: tether.exit_code=137, tether.signal=SIGKILL")
    );
    // An operator's stop comes while the program may still run: what is recorded is not its end.
    assert_eq!(stop(&item, work::Stopper::Operator), None);
}

/// A claim asked again answers the lease it started, for its own worker only, while the item is
/// leased under that lease: one cell per fixture and worker.
#[test]
fn table_claimed_lease_asked_again() {
    for fx in Fx::ALL {
        let item = fx.build();
        for worker in [Some(W1), Some(W2), None] {
            let answered = work::claimed_lease(&item, worker);
            let expected = match fx {
                Fx::Active | Fx::Stopping if worker == Some(W1) => Ok(()),
                Fx::ActiveAnon if worker.is_none() => Ok(()),
                Fx::Active | Fx::Stopping | Fx::ActiveAnon => Err(Refusal::WorkerMismatch),
                // No heartbeat yet (a claim makes one) or no lease at all.
                _ => Err(Refusal::InvalidState),
            };
            match (answered, expected) {
                (Ok(reply), Ok(())) => {
                    assert_eq!(reply.last_heartbeat, t(3), "{fx:?}");
                    assert_eq!(reply.ttl_seconds, item.ttl_seconds, "{fx:?}");
                    assert_eq!(reply.state, item.state, "{fx:?}");
                    assert!(reply.lease_extended, "{fx:?}");
                }
                (Err(WorkError::WorkerMismatch), Err(Refusal::WorkerMismatch)) => {}
                (Err(WorkError::InvalidState { state, .. }), Err(Refusal::InvalidState)) => {
                    assert_eq!(state, item.state, "{fx:?}");
                }
                (answered, expected) => {
                    panic!("{fx:?} asked by {worker:?}: {answered:?}, expected {expected:?}")
                }
            }
        }
    }
}

/// The stop a claim carries: the holder's forced stop, proven by the item's session token, which
/// finds a stopped item stopped already. One cell per fixture and token; an accepted one must be
/// exactly the holder's forced stop.
#[test]
fn table_stop_with_claim() {
    for fx in Fx::ALL {
        let item = fx.build();
        for token in [TOKEN_1, TOKEN_NEW] {
            let cell = format!("{fx:?} stopped with the claim carrying {token}");
            let answered = work::stop_with_claim(&item, token, now());
            let holds = item.session_token_hash.as_deref() == Some(token);
            let expected = match fx {
                Fx::Stopped => Want::Same,
                _ if !holds => Want::Refused(Refusal::NotHeld),
                _ => Want::Moves(Cause::ForceStopped, stopped_now()),
            };
            match (answered, expected) {
                (Ok(step), Want::Same) => {
                    assert_eq!(step.item, item, "{cell}");
                    assert!(step.transitions.is_empty(), "{cell}");
                }
                (Ok(step), Want::Moves(cause, _)) => {
                    let holders = work::stop_by(&item, true, now(), work::Stopper::Holder).unwrap();
                    assert_eq!(step.item, holders.item, "{cell}");
                    assert_eq!(step.transitions, holders.transitions, "{cell}");
                    assert_eq!(step.holder_may_run_until, None, "{cell}: nothing runs on");
                    assert_eq!(step.transitions.len(), 1, "{cell}");
                    assert_eq!(step.transitions[0].cause, cause, "{cell}");
                    assert_eq!(step.item.state, WorkState::Stopped, "{cell}");
                }
                (Err(error), Want::Refused(refusal)) => {
                    assert_eq!(refusal_of(&error), refusal, "{cell}")
                }
                (answered, _) => panic!("{cell}: {answered:?}"),
            }
        }
    }
    // The cells that decide: the holder's token stops its item, any other is refused, and a queued
    // item (a lease that ran out sends it back there, its token dead) is no longer the late worker's.
    // (A delivered item's token is its poll's: it may stop it, as it may with `POST …/stop`.)
    let stops = |fx: Fx, token| work::stop_with_claim(&fx.build(), token, now()).is_ok();
    assert!(stops(Fx::Active, TOKEN_1));
    assert!(stops(Fx::Stopping, TOKEN_1));
    assert!(!stops(Fx::Active, TOKEN_NEW));
    assert!(!stops(Fx::Queued, TOKEN_1), "a queued item has no holder");
    assert!(stops(Fx::Stopped, TOKEN_NEW));
}

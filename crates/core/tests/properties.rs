//! Property tests for the work-item state machine.
//!
//! Each case enqueues a few items and applies a random sequence of operations to them the way a server
//! does: lazy expiry first (`work::evaluate`), then the operation on the result, then one write of
//! `work::chain(expired, step)` (or of the expiry alone when the operation is refused). The clock only
//! moves forward, by random amounts that include zero (same-microsecond requests) and jumps far past
//! any lease. After every step the invariants of §2.3 and the rules of §5 / D-5..D-10 / D-28..D-30 are
//! checked against an oracle written from the SPEC tables.
//!
//! Reproduce a run with a fixed seed: `PROPTEST_RNG_SEED=<u64> cargo test -p tether-core --test properties`.

use std::collections::HashSet;

use proptest::collection::vec;
use proptest::option;
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::TestRunner;
use tether_core::lease::LeasePolicy;
use tether_core::metadata::{self, Metadata, MetadataPatch};
use tether_core::time::Timestamp;
use tether_core::work::{
    self, Cause, Delivery, ExpectedHeartbeat, Step, Transition, WorkData, WorkError, WorkItem,
    WorkState,
};

const WORKERS: [&str; 3] = ["w0", "w1", "w2"];
const MAX_ITEMS: usize = 6;

/// How an ack or heartbeat picks its Worker-ID relative to the worker the server has on record.
#[derive(Clone, Copy, Debug)]
enum Who {
    Absent,
    /// The recorded worker (or some worker when none is recorded).
    Matching,
    /// A worker different from the recorded one (any worker when none is recorded).
    Mismatching,
    Named(usize),
}

/// How a heartbeat picks `expected_last_heartbeat`.
#[derive(Clone, Copy, Debug)]
enum Expect {
    Any,
    NoHeartbeat,
    /// The current `last_heartbeat` (where none exists: the last token ever handed out, or now).
    Correct,
    /// Some token handed out earlier for this item (possibly the current one).
    Stale(usize),
    /// The current token (or now) shifted by a non-zero number of microseconds.
    OffBy(i64),
}

#[derive(Clone, Debug)]
enum Action {
    Enqueue,
    Poll {
        worker: Option<usize>,
        reclaim_ms: i64,
    },
    Ack {
        who: Who,
    },
    /// Tether's claim: poll, ack and first heartbeat at one instant.
    Claim {
        worker: Option<usize>,
        reclaim_ms: i64,
        desired_ttl: Option<u32>,
    },
    Heartbeat {
        expected: Expect,
        desired_ttl: Option<u32>,
        who: Who,
    },
    Stop {
        force: bool,
    },
    /// The stop a claim carries (`work::stop_with_claim`), with the token the last claim or poll
    /// minted (`None`), or with an earlier one, `n` mints back (`Some(n)`).
    StopWithClaim {
        token_back: Option<u64>,
    },
    /// The dispatcher's expiry pass.
    Sweep,
    /// Session archived (false) or deleted (true).
    SessionGone {
        deleted: bool,
    },
    /// Upserts (`Some`) and deletes (`None`) of keys `k0`‥`k23`; the 16-key limit is reachable.
    Patch {
        entries: Vec<(u8, Option<u8>)>,
    },
    Get,
}

#[derive(Clone, Debug)]
struct Op {
    /// Microseconds the clock moves before the operation.
    dt: i64,
    item: usize,
    action: Action,
}

fn dt_strategy() -> impl Strategy<Value = i64> {
    prop_oneof![
        3 => Just(0i64),
        3 => 0i64..2_000,
        5 => 0i64..20_000_000,
        1 => 0i64..700_000_000,
    ]
}

fn who_strategy() -> impl Strategy<Value = Who> {
    prop_oneof![
        1 => Just(Who::Absent),
        2 => Just(Who::Matching),
        1 => Just(Who::Mismatching),
        1 => (0..WORKERS.len()).prop_map(Who::Named),
    ]
}

fn expect_strategy() -> impl Strategy<Value = Expect> {
    prop_oneof![
        2 => Just(Expect::Any),
        2 => Just(Expect::NoHeartbeat),
        4 => Just(Expect::Correct),
        1 => any::<usize>().prop_map(Expect::Stale),
        1 => prop_oneof![-2_000_000i64..0, 1i64..2_000_000].prop_map(Expect::OffBy),
    ]
}

fn action_strategy() -> impl Strategy<Value = Action> {
    prop_oneof![
        1 => Just(Action::Enqueue),
        6 => (
            option::of(0..WORKERS.len()),
            prop_oneof![Just(0i64), Just(1_000), Just(5_000), Just(60_000), 0i64..120_000],
        )
            .prop_map(|(worker, reclaim_ms)| Action::Poll { worker, reclaim_ms }),
        6 => who_strategy().prop_map(|who| Action::Ack { who }),
        3 => (
            option::of(0..WORKERS.len()),
            prop_oneof![Just(0i64), Just(5_000), 0i64..120_000],
            option::of(prop_oneof![1u32..1_000, Just(u32::MAX)]),
        )
            .prop_map(|(worker, reclaim_ms, desired_ttl)| Action::Claim { worker, reclaim_ms, desired_ttl }),
        10 => (
            expect_strategy(),
            option::of(prop_oneof![1u32..1_000, Just(u32::MAX)]),
            who_strategy(),
        )
            .prop_map(|(expected, desired_ttl, who)| Action::Heartbeat { expected, desired_ttl, who }),
        2 => any::<bool>().prop_map(|force| Action::Stop { force }),
        2 => option::of(0u64..4).prop_map(|token_back| Action::StopWithClaim { token_back }),
        3 => Just(Action::Sweep),
        1 => any::<bool>().prop_map(|deleted| Action::SessionGone { deleted }),
        2 => vec((0u8..24, option::weighted(0.8, 0u8..3)), 0..8).prop_map(|entries| Action::Patch { entries }),
        1 => Just(Action::Get),
    ]
}

fn op_strategy() -> impl Strategy<Value = Op> {
    (dt_strategy(), 0..MAX_ITEMS, action_strategy()).prop_map(|(dt, item, action)| Op {
        dt,
        item,
        action,
    })
}

fn policy_strategy() -> impl Strategy<Value = LeasePolicy> {
    (0u32..=4, prop_oneof![Just(60u32), 10u32..=600]).prop_map(
        |(max_requeues, default_ttl_seconds)| LeasePolicy {
            default_ttl_seconds,
            min_ttl_seconds: 10,
            max_ttl_seconds: 600,
            max_requeues,
        },
    )
}

/// What a run exercised: lets a test make sure the generator reaches every corner of the tables.
#[derive(Default)]
struct Coverage {
    edges: HashSet<(WorkState, WorkState, Cause)>,
    refusals: HashSet<&'static str>,
    /// Heartbeats whose token had to be bumped past `now` (D-30).
    bumped_beats: usize,
    /// Heartbeats accepted in `stopping` (D-8).
    stopping_beats: usize,
    /// Ack retries accepted unchanged (D-28).
    idempotent_acks: usize,
    /// Claims accepted.
    claims: usize,
}

impl Coverage {
    fn refusal(&mut self, error: &WorkError) {
        self.refusals.insert(match error {
            WorkError::InvalidState { .. } => "invalid_state",
            WorkError::WorkerMismatch => "worker_mismatch",
            WorkError::PreconditionFailed { .. } => "precondition_failed",
            WorkError::NotClaimable => "not_claimable",
            WorkError::Held { .. } => "held",
            WorkError::NotHeld => "not_held",
            WorkError::Metadata(_) => "metadata",
            WorkError::TurnOpen { .. } => "turn_open",
        });
    }
}

/// One item as the store holds it, plus what the test remembers about it.
struct Tracked {
    item: WorkItem,
    /// Every `last_heartbeat` handed out for this item, in order.
    beats: Vec<Timestamp>,
}

fn start() -> Timestamp {
    Timestamp::parse_rfc3339("2026-07-01T08:15:00Z").unwrap()
}

fn enqueue(n: usize, now: Timestamp, policy: &LeasePolicy) -> Result<WorkItem, TestCaseError> {
    let step = work::enqueue(
        format!("work_{n:032x}"),
        "env_019e64e01a137caf953ac2ac7b42ec5c".into(),
        WorkData {
            kind: "session".into(),
            id: format!("sess_{n:032x}"),
        },
        Metadata::from([("job".to_string(), format!("job-{n}"))]),
        now,
        None,
        policy,
    );
    prop_assert!(work::invariant_violation(&step.item).is_none());
    prop_assert_eq!(step.item.state, WorkState::Queued);
    prop_assert_eq!(step.transitions.len(), 1);
    prop_assert_eq!(step.transitions[0].cause, Cause::Enqueued);
    prop_assert_eq!(step.item.ttl_seconds, policy.default_ttl_seconds);
    Ok(step.item)
}

fn unchanged(item: &WorkItem) -> Step {
    Step::unchanged(item)
}

/// The worker the server has on record for ack (§5.1): the delivery worker while queued, the owner after.
/// What stopping `item` at `now` (forced or on confirmation) must leave: stopped, with the stop
/// request kept if one was made earlier, and no delivery, lease or session token left.
fn stopped_now(item: &WorkItem, now: Timestamp) -> WorkItem {
    WorkItem {
        state: WorkState::Stopped,
        stop_requested_at: item.stop_requested_at.or(Some(now)),
        stopped_at: Some(now),
        delivery: None,
        lease_expires_at: None,
        session_token_hash: None,
        session_token_issuer: None,
        redeliveries_in_a_row: 0,
        ..item.clone()
    }
}

fn recorded_for_ack(item: &WorkItem) -> Option<&str> {
    match item.state {
        WorkState::Queued => item.delivery.as_ref().and_then(|d| d.worker_id.as_deref()),
        _ => item.owner_worker_id.as_deref(),
    }
}

fn resolve_who(who: Who, recorded: Option<&str>) -> Option<&'static str> {
    match who {
        Who::Absent => None,
        Who::Named(i) => Some(WORKERS[i]),
        Who::Matching => Some(
            recorded
                .and_then(|r| WORKERS.into_iter().find(|w| *w == r))
                .unwrap_or(WORKERS[0]),
        ),
        Who::Mismatching => WORKERS.into_iter().find(|w| Some(*w) != recorded),
    }
}

fn resolve_expected(
    expected: Expect,
    item: &WorkItem,
    beats: &[Timestamp],
    now: Timestamp,
) -> ExpectedHeartbeat {
    let base = item
        .latest_heartbeat_at
        .or(beats.last().copied())
        .unwrap_or(now);
    match expected {
        Expect::Any => ExpectedHeartbeat::Any,
        Expect::NoHeartbeat => ExpectedHeartbeat::None,
        Expect::Correct => ExpectedHeartbeat::At(base),
        Expect::Stale(i) if !beats.is_empty() => ExpectedHeartbeat::At(beats[i % beats.len()]),
        Expect::Stale(_) => ExpectedHeartbeat::At(Timestamp::from_micros(now.as_micros() - 1)),
        Expect::OffBy(d) => ExpectedHeartbeat::At(Timestamp::from_micros(
            item.latest_heartbeat_at.unwrap_or(now).as_micros() + d,
        )),
    }
}

/// Every edge of the §4 lifecycle, with the causes that may take it.
fn allowed(from: WorkState, to: WorkState, cause: Cause) -> bool {
    use Cause::*;
    use WorkState::*;
    match (from, to) {
        (Queued, Queued) => matches!(cause, Delivered | Redelivered),
        (Queued, Starting) => cause == Acked,
        (Queued, Stopped) => matches!(
            cause,
            StopRequested | ForceStopped | SessionArchived | SessionDeleted
        ),
        (Starting, Active) => cause == FirstHeartbeat,
        (Starting | Active, Stopping) => cause == StopRequested,
        (Starting | Active, Queued) => cause == LeaseExpiredRequeued,
        (Starting | Active, Stopped) => {
            matches!(
                cause,
                ForceStopped | PoisonStopped | SessionArchived | SessionDeleted
            )
        }
        (Stopping, Stopped) => {
            matches!(
                cause,
                StopConfirmed
                    | ForceStopped
                    | LeaseExpiredStopped
                    | SessionArchived
                    | SessionDeleted
            )
        }
        _ => false,
    }
}

/// A step's transitions walk from `from` to the step's item state, one edge per state change, all at `now`.
fn check_transitions(from: WorkState, step: &Step, now: Timestamp) -> Result<(), TestCaseError> {
    let mut state = from;
    for tr in &step.transitions {
        prop_assert_eq!(
            tr.from,
            Some(state),
            "transition chain broken: {:?}",
            step.transitions
        );
        prop_assert!(
            allowed(state, tr.to, tr.cause),
            "edge not in the lifecycle: {:?}",
            tr
        );
        prop_assert_eq!(tr.at, now);
        if tr.from == Some(tr.to) {
            prop_assert!(
                matches!(tr.cause, Cause::Delivered | Cause::Redelivered),
                "{:?}",
                tr
            );
        }
        state = tr.to;
    }
    prop_assert_eq!(
        state,
        step.item.state,
        "transitions end elsewhere: {:?}",
        step.transitions
    );
    Ok(())
}

/// §5.4 / D-5: what an expiry must look like.
fn check_expiry(
    before: &WorkItem,
    expired: Option<&Step>,
    now: Timestamp,
    policy: &LeasePolicy,
) -> Result<(), TestCaseError> {
    let due = before.state.is_leased()
        && now
            > before
                .lease_expires_at
                .expect("leased items have a deadline");
    prop_assert_eq!(
        expired.is_some(),
        due,
        "expiry decided wrongly for {:?} at {}",
        before,
        now
    );
    let Some(step) = expired else { return Ok(()) };
    prop_assert_eq!(step.transitions.len(), 1);
    check_transitions(before.state, step, now)?;
    let tr = &step.transitions[0];
    prop_assert_eq!(&tr.worker_id, &before.owner_worker_id);
    let after = &step.item;
    let deadline = before.lease_expires_at.unwrap();
    if before.state == WorkState::Stopping {
        let want = WorkItem {
            state: WorkState::Stopped,
            stopped_at: Some(deadline),
            lease_expires_at: None,
            session_token_hash: None,
            session_token_issuer: None,
            ..before.clone()
        };
        prop_assert_eq!(after, &want);
        prop_assert_eq!(tr.cause, Cause::LeaseExpiredStopped);
    } else if before.requeue_count >= policy.max_requeues {
        // Poison: the expiry past the limit stops the item instead of re-queueing it.
        let want = WorkItem {
            state: WorkState::Stopped,
            stop_requested_at: before.stop_requested_at.or(Some(now)),
            stopped_at: Some(now),
            lease_expires_at: None,
            session_token_hash: None,
            session_token_issuer: None,
            ..before.clone()
        };
        prop_assert_eq!(after, &want);
        prop_assert_eq!(tr.cause, Cause::PoisonStopped);
    } else {
        let want = WorkItem {
            state: WorkState::Queued,
            enqueued_at: now,
            acknowledged_at: None,
            started_at: None,
            latest_heartbeat_at: None,
            stop_requested_at: None,
            owner_worker_id: None,
            lease_expires_at: None,
            session_token_hash: None,
            session_token_issuer: None,
            delivery: None,
            requeue_count: before.requeue_count + 1,
            ..before.clone()
        };
        prop_assert_eq!(after, &want);
        prop_assert_eq!(tr.cause, Cause::LeaseExpiredRequeued);
    }
    Ok(())
}

/// Checks that hold after every step, whatever the operation.
fn check_step(
    before: &WorkItem,
    stored: &WorkItem,
    transitions: &[Transition],
    now: Timestamp,
    policy: &LeasePolicy,
) -> Result<(), TestCaseError> {
    prop_assert_eq!(work::invariant_violation(stored), None, "{:?}", stored);
    // Stopped is terminal: only metadata may still change (D-10).
    if before.state == WorkState::Stopped {
        let same_but_metadata = WorkItem {
            metadata: before.metadata.clone(),
            ..stored.clone()
        };
        prop_assert_eq!(&same_but_metadata, before, "a stopped item changed");
        prop_assert!(transitions.is_empty());
    }
    // Poison bound.
    prop_assert!(stored.requeue_count <= policy.max_requeues);
    prop_assert!(stored.requeue_count >= before.requeue_count);
    prop_assert!(stored.requeue_count <= before.requeue_count + 1);
    // No live lease is ever stored past its deadline: expiry always runs first.
    if stored.state.is_leased() {
        prop_assert!(
            stored.lease_expires_at.unwrap() >= now,
            "stale lease stored: {:?}",
            stored
        );
    }
    // Identity and history never change.
    prop_assert_eq!(&stored.id, &before.id);
    prop_assert_eq!(&stored.environment_id, &before.environment_id);
    prop_assert_eq!(&stored.data, &before.data);
    prop_assert_eq!(stored.created_at, before.created_at);
    prop_assert!(stored.enqueued_at >= before.enqueued_at);
    prop_assert!(stored.delivery_count >= before.delivery_count);
    prop_assert!(stored.heartbeat_count >= before.heartbeat_count);
    prop_assert!(stored.heartbeat_floor >= before.heartbeat_floor);
    prop_assert!(stored.ttl_seconds >= policy.min_ttl_seconds.min(policy.default_ttl_seconds));
    prop_assert!(stored.ttl_seconds <= policy.max_ttl_seconds.max(policy.default_ttl_seconds));
    // Stamps are ordered.
    if let (Some(a), Some(s)) = (stored.acknowledged_at, stored.started_at) {
        prop_assert!(a <= s);
    }
    if let (Some(r), Some(s)) = (stored.stop_requested_at, stored.stopped_at) {
        prop_assert!(r <= s, "stop_requested_at after stopped_at: {:?}", stored);
    }
    prop_assert!(stored.created_at <= stored.enqueued_at);
    if let (Some(l), Some(f)) = (stored.latest_heartbeat_at, stored.heartbeat_floor) {
        prop_assert_eq!(l, f, "the current token is the latest ever handed out");
    }
    // The transitions of the stored step walk from the old state to the new one.
    let mut step = Step::unchanged(stored);
    step.transitions = transitions.to_vec();
    check_transitions(before.state, &step, now)?;
    if before.state != stored.state {
        prop_assert!(!transitions.is_empty());
    }
    Ok(())
}

/// Runs one operation the way a server does and checks it against the SPEC oracle. Returns the item to store.
fn apply(
    tracked: &mut Tracked,
    action: &Action,
    now: Timestamp,
    policy: &LeasePolicy,
    tokens: &mut u64,
    coverage: &mut Coverage,
) -> Result<WorkItem, TestCaseError> {
    let before = tracked.item.clone();
    let (expired, outcome, cur): (Option<Step>, Result<Step, WorkError>, WorkItem) = match *action {
        Action::Enqueue => unreachable!("handled by the caller"),
        Action::Sweep => {
            let expired = work::expire_if_due(&before, now, policy);
            let cur = expired.as_ref().map_or(&before, |s| &s.item).clone();
            (expired, Ok(unchanged(&cur)), cur)
        }
        Action::SessionGone { deleted } => {
            let cause = if deleted {
                Cause::SessionDeleted
            } else {
                Cause::SessionArchived
            };
            let ev = work::evaluate(&before, now, policy, |cur| {
                Ok(work::force_stop_for(cur, now, cause).unwrap_or_else(|| unchanged(cur)))
            });
            let cur = ev.expired.as_ref().map_or(&before, |s| &s.item).clone();
            let step = ev.outcome.clone().unwrap();
            if cur.state.is_live() {
                let want = stopped_now(&cur, now);
                prop_assert_eq!(&step.item, &want);
                prop_assert_eq!(step.transitions.len(), 1);
                prop_assert_eq!(step.transitions[0].cause, cause);
            } else {
                prop_assert_eq!(&step.item, &cur);
                prop_assert!(step.transitions.is_empty());
            }
            (ev.expired, ev.outcome, cur)
        }
        Action::Get => {
            let ev = work::evaluate(&before, now, policy, |cur| Ok(unchanged(cur)));
            let cur = ev.expired.as_ref().map_or(&before, |s| &s.item).clone();
            (ev.expired, ev.outcome, cur)
        }
        Action::Patch { ref entries } => {
            let patch: MetadataPatch = entries
                .iter()
                .map(|(key, value)| (format!("k{key}"), value.map(|v| format!("v{v}"))))
                .collect();
            let ev = work::evaluate(&before, now, policy, |cur| {
                work::patch_metadata(cur, &patch)
            });
            let cur = ev.expired.as_ref().map_or(&before, |s| &s.item).clone();
            match (metadata::merge(&cur.metadata, &patch), &ev.outcome) {
                (Ok(merged), Ok(step)) => {
                    prop_assert_eq!(
                        &step.item,
                        &WorkItem {
                            metadata: merged,
                            ..cur.clone()
                        }
                    );
                    prop_assert!(step.transitions.is_empty());
                }
                (Err(e), Err(got)) => prop_assert_eq!(got, &WorkError::Metadata(e)),
                (want, got) => prop_assert!(false, "metadata: want {:?}, got {:?}", want, got),
            }
            (ev.expired, ev.outcome, cur)
        }
        Action::Poll { worker, reclaim_ms } => {
            *tokens += 1;
            let token = format!("token-{tokens}");
            let w = worker.map(|i| WORKERS[i]);
            let ev = work::evaluate(&before, now, policy, |cur| {
                work::deliver(cur, w, token.clone(), None, now, reclaim_ms)
            });
            let cur = ev.expired.as_ref().map_or(&before, |s| &s.item).clone();
            let claimable = work::is_claimable(&cur, now, reclaim_ms);
            match &ev.outcome {
                Ok(step) => {
                    prop_assert!(claimable, "delivered a non-claimable item: {:?}", cur);
                    let redelivery = cur.delivery.is_some();
                    let in_a_row = if redelivery {
                        cur.redeliveries_in_a_row + 1
                    } else {
                        0
                    };
                    let want = WorkItem {
                        delivery: Some(Delivery {
                            worker_id: w.map(str::to_owned),
                            delivered_at: now,
                        }),
                        delivery_count: cur.delivery_count + 1,
                        session_token_hash: Some(token.clone()),
                        session_token_issuer: None,
                        redeliveries_in_a_row: in_a_row,
                        ..cur.clone()
                    };
                    prop_assert_eq!(&step.item, &want);
                    // Redeliveries in a row past the bound get no line of their own.
                    let recorded = in_a_row <= work::RECORDED_REDELIVERIES;
                    prop_assert_eq!(step.transitions.len(), usize::from(recorded));
                    let cause = if redelivery {
                        Cause::Redelivered
                    } else {
                        Cause::Delivered
                    };
                    if recorded {
                        prop_assert_eq!(step.transitions[0].cause, cause);
                        prop_assert_eq!(step.transitions[0].worker_id.as_deref(), w);
                    }
                }
                Err(e) => {
                    prop_assert!(!claimable, "a claimable item was refused");
                    prop_assert_eq!(e, &WorkError::NotClaimable);
                }
            }
            (ev.expired, ev.outcome, cur)
        }
        Action::Claim {
            worker,
            reclaim_ms,
            desired_ttl,
        } => {
            *tokens += 1;
            let token = format!("token-{tokens}");
            let w = worker.map(|i| WORKERS[i]);
            let request = work::ClaimRequest {
                worker_id: w,
                session_token_hash: token.clone(),
                issuer: None,
                reclaim_older_than_ms: reclaim_ms,
                desired_ttl_seconds: desired_ttl,
            };
            let ev = work::evaluate(&before, now, policy, |cur| {
                work::claim(cur, request, now, policy)
            });
            let cur = ev.expired.as_ref().map_or(&before, |s| &s.item).clone();
            let claimable = work::is_claimable(&cur, now, reclaim_ms);
            let outcome = match ev.outcome {
                Err(e) => {
                    prop_assert!(!claimable, "a claimable item was refused");
                    prop_assert_eq!(&e, &WorkError::NotClaimable);
                    Err(e)
                }
                Ok((step, reply)) => {
                    prop_assert!(claimable, "claimed a non-claimable item: {:?}", cur);
                    // Exactly what the three requests would have done, one after the other, at
                    // the same instant: each of them is checked against its own oracle above.
                    let delivered =
                        work::deliver(&cur, w, token.clone(), None, now, reclaim_ms).unwrap();
                    let acked = work::ack(&delivered.item, w, now).unwrap();
                    let (started, beat) = work::heartbeat(
                        &acked.item,
                        ExpectedHeartbeat::None,
                        desired_ttl,
                        w,
                        now,
                        policy,
                    )
                    .unwrap();
                    prop_assert_eq!(&step.item, &started.item);
                    prop_assert_eq!(&reply, &beat);
                    let mut transitions = delivered.transitions;
                    transitions.extend(acked.transitions);
                    transitions.extend(started.transitions);
                    prop_assert_eq!(&step.transitions, &transitions);
                    // What the claimant relies on: the item is its own, leased, with no delivery
                    // left for another poll to take over.
                    prop_assert_eq!(step.item.state, WorkState::Active);
                    prop_assert_eq!(step.item.owner_worker_id.as_deref(), w);
                    prop_assert!(step.item.delivery.is_none());
                    prop_assert_eq!(
                        step.item.session_token_hash.as_deref(),
                        Some(token.as_str())
                    );
                    let ttl = i64::from(reply.ttl_seconds);
                    prop_assert_eq!(
                        step.item.lease_expires_at,
                        Some(reply.last_heartbeat.plus_seconds(ttl))
                    );
                    // Asked again (a retry whose answer was lost), it answers the same lease.
                    prop_assert_eq!(work::claimed_lease(&step.item, w), Ok(reply.clone()));
                    if let Some(last) = tracked.beats.last() {
                        prop_assert!(reply.last_heartbeat > *last);
                    }
                    tracked.beats.push(reply.last_heartbeat);
                    coverage.claims += 1;
                    Ok(step)
                }
            };
            (ev.expired, outcome, cur)
        }
        Action::Ack { who } => {
            let mut sent = None;
            let ev = work::evaluate(&before, now, policy, |cur| {
                sent = resolve_who(who, recorded_for_ack(cur));
                work::ack(cur, sent, now)
            });
            let cur = ev.expired.as_ref().map_or(&before, |s| &s.item).clone();
            let recorded = recorded_for_ack(&cur).map(str::to_owned);
            let mismatch = matches!((sent, recorded.as_deref()), (Some(w), Some(r)) if w != r);
            match cur.state {
                WorkState::Stopping | WorkState::Stopped => {
                    prop_assert_eq!(
                        ev.outcome.as_ref().err(),
                        Some(&WorkError::InvalidState {
                            state: cur.state,
                            operation: "ack"
                        })
                    );
                }
                _ if mismatch => {
                    prop_assert_eq!(ev.outcome.as_ref().err(), Some(&WorkError::WorkerMismatch));
                }
                WorkState::Queued => {
                    let step = ev
                        .outcome
                        .as_ref()
                        .map_err(|e| TestCaseError::fail(format!("ack refused: {e}")))?;
                    let want = WorkItem {
                        state: WorkState::Starting,
                        acknowledged_at: Some(now),
                        owner_worker_id: sent.map(str::to_owned).or(recorded.clone()),
                        delivery: None,
                        lease_expires_at: Some(now.plus_seconds(i64::from(cur.ttl_seconds))),
                        redeliveries_in_a_row: 0,
                        ..cur.clone()
                    };
                    prop_assert_eq!(&step.item, &want);
                    prop_assert_eq!(step.transitions.len(), 1);
                    prop_assert_eq!(step.transitions[0].cause, Cause::Acked);
                }
                WorkState::Starting | WorkState::Active => {
                    // D-28: a safe retry returns the item unchanged.
                    let step = ev
                        .outcome
                        .as_ref()
                        .map_err(|e| TestCaseError::fail(format!("re-ack refused: {e}")))?;
                    prop_assert_eq!(&step.item, &cur);
                    prop_assert!(step.transitions.is_empty());
                    coverage.idempotent_acks += 1;
                }
            }
            if mismatch || ev.outcome.is_err() {
                // An ack by a mismatching worker never changes the item (only a due expiry is written).
                prop_assert!(ev.outcome.is_err());
                if ev.expired.is_none() {
                    prop_assert_eq!(&cur, &before);
                }
            }
            (ev.expired, ev.outcome, cur)
        }
        Action::Heartbeat {
            expected,
            desired_ttl,
            who,
        } => {
            let mut sent = (ExpectedHeartbeat::Any, None);
            let ev = work::evaluate(&before, now, policy, |cur| {
                sent = (
                    resolve_expected(expected, cur, &tracked.beats, now),
                    resolve_who(who, cur.owner_worker_id.as_deref()),
                );
                work::heartbeat(cur, sent.0, desired_ttl, sent.1, now, policy)
            });
            let (e, w) = sent;
            let cur = ev.expired.as_ref().map_or(&before, |s| &s.item).clone();
            // §5.2: state (409) → Worker-ID guard (412, D-7b) → precondition (412).
            let foreign =
                matches!((w, cur.owner_worker_id.as_deref()), (Some(w), Some(o)) if w != o);
            let matches = match e {
                ExpectedHeartbeat::Any => true,
                ExpectedHeartbeat::None => cur.latest_heartbeat_at.is_none(),
                ExpectedHeartbeat::At(t) => cur.latest_heartbeat_at == Some(t),
            };
            let outcome = match ev.outcome {
                Err(err) => Err(err),
                Ok((step, reply)) => {
                    // D-30: tokens strictly increase per item over the whole run.
                    if let Some(last) = tracked.beats.last() {
                        prop_assert!(
                            reply.last_heartbeat > *last,
                            "token {} not after {}",
                            reply.last_heartbeat,
                            last
                        );
                    }
                    prop_assert!(reply.last_heartbeat >= now);
                    coverage.bumped_beats += usize::from(reply.last_heartbeat > now);
                    coverage.stopping_beats += usize::from(cur.state == WorkState::Stopping);
                    tracked.beats.push(reply.last_heartbeat);
                    let ttl = policy.effective_ttl(desired_ttl, cur.ttl_seconds);
                    let mut want = WorkItem {
                        ttl_seconds: ttl,
                        latest_heartbeat_at: Some(reply.last_heartbeat),
                        heartbeat_floor: Some(reply.last_heartbeat),
                        lease_expires_at: Some(reply.last_heartbeat.plus_seconds(i64::from(ttl))),
                        heartbeat_count: cur.heartbeat_count + 1,
                        ..cur.clone()
                    };
                    if cur.state == WorkState::Starting {
                        want.state = WorkState::Active;
                        want.started_at = Some(now);
                    }
                    prop_assert_eq!(&step.item, &want);
                    prop_assert!(reply.lease_extended);
                    prop_assert_eq!(reply.state, want.state);
                    prop_assert!(matches!(
                        reply.state,
                        WorkState::Active | WorkState::Stopping
                    ));
                    prop_assert_eq!(reply.ttl_seconds, ttl);
                    let moved = usize::from(cur.state == WorkState::Starting);
                    prop_assert_eq!(step.transitions.len(), moved);
                    Ok(step)
                }
            };
            match &outcome {
                Err(WorkError::InvalidState { state, operation }) => {
                    prop_assert!(!cur.state.is_leased());
                    prop_assert_eq!(*state, cur.state);
                    prop_assert_eq!(*operation, "heartbeat");
                }
                Err(WorkError::PreconditionFailed { current, .. }) => {
                    prop_assert!(cur.state.is_leased());
                    prop_assert!(
                        foreign || !matches,
                        "412 although E={:?} matches {:?}",
                        e,
                        cur
                    );
                    prop_assert_eq!(current.state, cur.state);
                    prop_assert_eq!(current.last_heartbeat, cur.latest_heartbeat_at);
                    prop_assert_eq!(current.ttl_seconds, cur.ttl_seconds);
                }
                Err(other) => prop_assert!(false, "unexpected heartbeat error {:?}", other),
                Ok(_) => {
                    prop_assert!(
                        cur.state.is_leased() && !foreign && matches,
                        "accepted E={:?} W={:?} on {:?}",
                        e,
                        w,
                        cur
                    );
                }
            }
            (ev.expired, outcome, cur)
        }
        Action::Stop { force } => {
            let ev = work::evaluate(&before, now, policy, |cur| work::stop(cur, force, now));
            let cur = ev.expired.as_ref().map_or(&before, |s| &s.item).clone();
            let stopped = stopped_now(&cur, now);
            let want = match (cur.state, force) {
                (WorkState::Stopped, _) => None,
                (_, true) => Some((stopped, Cause::ForceStopped)),
                (WorkState::Queued, false) => Some((stopped, Cause::StopRequested)),
                (WorkState::Stopping, false) => Some((stopped, Cause::StopConfirmed)),
                (WorkState::Starting | WorkState::Active, false) => Some((
                    WorkItem {
                        state: WorkState::Stopping,
                        stop_requested_at: Some(now),
                        ..cur.clone()
                    },
                    Cause::StopRequested,
                )),
            };
            match (want, &ev.outcome) {
                (None, Err(e)) => prop_assert_eq!(
                    e,
                    &WorkError::InvalidState {
                        state: WorkState::Stopped,
                        operation: "stop"
                    }
                ),
                (Some((item, cause)), Ok(step)) => {
                    prop_assert_eq!(&step.item, &item);
                    prop_assert_eq!(step.transitions.len(), 1);
                    prop_assert_eq!(step.transitions[0].cause, cause);
                }
                (want, got) => prop_assert!(false, "stop: want {:?}, got {:?}", want, got),
            }
            (ev.expired, ev.outcome, cur)
        }
        Action::StopWithClaim { token_back } => {
            let token = format!("token-{}", tokens.saturating_sub(token_back.unwrap_or(0)));
            let ev = work::evaluate(&before, now, policy, |cur| {
                work::stop_with_claim(cur, &token, now)
            });
            let cur = ev.expired.as_ref().map_or(&before, |s| &s.item).clone();
            let holds = cur.session_token_hash.as_deref() == Some(token.as_str());
            match &ev.outcome {
                // Already stopped: counts as stopped, changes nothing.
                Ok(step) if cur.state == WorkState::Stopped => {
                    prop_assert_eq!(&step.item, &cur);
                    prop_assert!(step.transitions.is_empty());
                }
                // The token's holder: exactly its own forced stop.
                Ok(step) if holds => {
                    let own = work::stop_by(&cur, true, now, work::Stopper::Holder).unwrap();
                    prop_assert_eq!(&step.item, &own.item);
                    prop_assert_eq!(&step.transitions, &own.transitions);
                    prop_assert_eq!(step.item.state, WorkState::Stopped);
                }
                Err(e) if cur.state.is_live() && !holds => {
                    prop_assert_eq!(e, &WorkError::NotHeld)
                }
                got => prop_assert!(false, "stop with a claim of {:?}: {:?}", cur, got),
            }
            (ev.expired, ev.outcome, cur)
        }
    };

    check_expiry(&before, expired.as_ref(), now, policy)?;
    prop_assert_eq!(&cur, expired.as_ref().map_or(&before, |s| &s.item));
    if let Err(error) = &outcome {
        coverage.refusal(error);
    }
    let (stored, transitions) = match outcome {
        Ok(step) => {
            // A claim is three operations, and their three transitions (checked above).
            let claim = matches!(action, Action::Claim { .. });
            if step.item.state != cur.state && !claim {
                prop_assert_eq!(step.transitions.len(), 1, "one transition per state change");
            }
            let expired_count = usize::from(expired.is_some());
            let step_count = step.transitions.len();
            let chained = work::chain(expired, step);
            prop_assert_eq!(chained.transitions.len(), expired_count + step_count);
            (chained.item, chained.transitions)
        }
        // A refusal writes nothing but the expiry that was due.
        Err(_) => match expired {
            Some(step) => (step.item, step.transitions),
            None => (before.clone(), Vec::new()),
        },
    };
    check_step(&before, &stored, &transitions, now, policy)?;
    for tr in &transitions {
        coverage.edges.insert((tr.from.unwrap(), tr.to, tr.cause));
    }
    Ok(stored)
}

fn run(
    policy: LeasePolicy,
    initial: usize,
    ops: Vec<Op>,
    coverage: &mut Coverage,
) -> Result<(), TestCaseError> {
    let mut now = start();
    let mut items = Vec::new();
    for n in 0..initial {
        items.push(Tracked {
            item: enqueue(n, now, &policy)?,
            beats: Vec::new(),
        });
    }
    let mut tokens = 0;
    for op in ops {
        prop_assert!(op.dt >= 0);
        now = Timestamp::from_micros(now.as_micros() + op.dt);
        if let Action::Enqueue = op.action {
            if items.len() < MAX_ITEMS {
                let n = items.len();
                items.push(Tracked {
                    item: enqueue(n, now, &policy)?,
                    beats: Vec::new(),
                });
            }
            continue;
        }
        let index = op.item % items.len();
        let tracked = &mut items[index];
        let was_stopped = tracked.item.state == WorkState::Stopped;
        let stored = apply(tracked, &op.action, now, &policy, &mut tokens, coverage)?;
        if was_stopped {
            prop_assert_eq!(stored.state, WorkState::Stopped, "stopped is terminal");
        }
        tracked.item = stored;
    }
    // The history of tokens per item is strictly increasing.
    for tracked in &items {
        prop_assert!(tracked.beats.windows(2).all(|w| w[0] < w[1]));
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn random_operation_sequences_respect_the_state_machine(
        policy in policy_strategy(),
        initial in 1usize..=3,
        ops in vec(op_strategy(), 1..150),
    ) {
        run(policy, initial, ops, &mut Coverage::default())?;
    }

    /// A worker that follows the protocol (poll, ack, heartbeat echoing its token, stop) keeps its item
    /// as long as it beats in time, and sees every accepted token exactly once.
    #[test]
    fn a_well_behaved_worker_keeps_its_lease(
        gaps in vec(0i64..9_000_000, 1..60),
        desired in option::of(10u32..=600),
        force in any::<bool>(),
    ) {
        let policy = LeasePolicy::default();
        let mut now = start();
        let item = enqueue(0, now, &policy)?;
        let item = work::deliver(&item, Some("w0"), "tok".into(), None, now, 5_000).unwrap().item;
        let mut item = work::ack(&item, Some("w0"), now).unwrap().item;
        let mut expected = ExpectedHeartbeat::None;
        let mut last: Option<Timestamp> = None;
        for gap in gaps {
            now = Timestamp::from_micros(now.as_micros() + gap);
            let ev = work::evaluate(&item, now, &policy, |cur| work::heartbeat(cur, expected, desired, Some("w0"), now, &policy));
            prop_assert!(ev.expired.is_none(), "lease lapsed although the worker beat every < 10 s");
            let (step, reply) = ev.outcome.unwrap();
            prop_assert_eq!(reply.state, WorkState::Active);
            if let Some(last) = last {
                prop_assert!(reply.last_heartbeat > last);
            }
            last = Some(reply.last_heartbeat);
            expected = ExpectedHeartbeat::At(reply.last_heartbeat);
            item = step.item;
        }
        prop_assert_eq!(item.requeue_count, 0);
        let step = work::stop(&item, force, now).unwrap();
        prop_assert_eq!(step.item.state, if force { WorkState::Stopped } else { WorkState::Stopping });
    }
}

/// The generator is worth something only if it reaches every edge of the lifecycle and every refusal.
/// Runs the same strategies with proptest's fixed-seed RNG and checks what they exercised.
#[test]
fn the_generator_reaches_every_cell() {
    let mut runner = TestRunner::deterministic();
    let strategy = (policy_strategy(), 1usize..=3, vec(op_strategy(), 1..150));
    let mut coverage = Coverage::default();
    for _ in 0..256 {
        let (policy, initial, ops) = strategy.new_tree(&mut runner).unwrap().current();
        run(policy, initial, ops, &mut coverage).unwrap();
    }
    use Cause::*;
    use WorkState::*;
    let every_edge = [
        (Queued, Queued, Delivered),
        (Queued, Queued, Redelivered),
        (Queued, Starting, Acked),
        (Queued, Stopped, StopRequested),
        (Queued, Stopped, ForceStopped),
        (Queued, Stopped, SessionArchived),
        (Queued, Stopped, SessionDeleted),
        (Starting, Active, FirstHeartbeat),
        (Starting, Stopping, StopRequested),
        (Active, Stopping, StopRequested),
        (Starting, Queued, LeaseExpiredRequeued),
        (Active, Queued, LeaseExpiredRequeued),
        (Starting, Stopped, ForceStopped),
        (Active, Stopped, ForceStopped),
        (Starting, Stopped, PoisonStopped),
        (Active, Stopped, PoisonStopped),
        (Active, Stopped, SessionArchived),
        (Stopping, Stopped, StopConfirmed),
        (Stopping, Stopped, ForceStopped),
        (Stopping, Stopped, LeaseExpiredStopped),
    ];
    let missing: Vec<_> = every_edge
        .iter()
        .filter(|e| !coverage.edges.contains(e))
        .collect();
    assert!(missing.is_empty(), "never exercised: {missing:?}");
    for refusal in [
        "invalid_state",
        "worker_mismatch",
        "precondition_failed",
        "not_claimable",
        "not_held",
        "metadata",
    ] {
        assert!(
            coverage.refusals.contains(refusal),
            "never refused with {refusal}"
        );
    }
    assert!(
        coverage.bumped_beats > 0,
        "never handed out a D-30 bumped token"
    );
    assert!(
        coverage.stopping_beats > 0,
        "never heartbeat while stopping"
    );
    assert!(coverage.idempotent_acks > 0, "never re-acked");
    assert!(coverage.claims > 0, "never claimed an item");
}

//! One program per session, not only one live item (§7.3 rule 1 with §8): a stop that the worker
//! holding the lease did not ask for leaves its program running until the worker learns of it, at
//! the lease's deadline at the latest. The step says so (`Step::holder_may_run_until`), the session
//! keeps the later of such moments (`session::hold_next_item`), and the session's next item is held
//! until then (`WorkItem::not_before`): no poll hands it out and no implicit claim takes it.
//!
//! Reproduce a run with a fixed seed: `PROPTEST_RNG_SEED=<u64> cargo test -p tether-core --test one_program_per_session`.

use proptest::prelude::*;
use tether_core::lease::LeasePolicy;
use tether_core::session::hold_next_item;
use tether_core::time::Timestamp;
use tether_core::work::{
    self, Cause, ExpectedHeartbeat, Step, Stopper, WorkData, WorkError, WorkItem, WorkState,
};

const RECLAIM_MS: i64 = 30_000;

fn t(seconds: i64) -> Timestamp {
    Timestamp::parse_rfc3339("2026-07-01T08:00:00Z")
        .unwrap()
        .plus_seconds(seconds)
}

fn enqueue_at(at: Timestamp, not_before: Option<Timestamp>) -> Step {
    work::enqueue(
        "work_1".into(),
        "env_1".into(),
        WorkData::session("sess_1"),
        Default::default(),
        at,
        not_before,
        &LeasePolicy::default(),
    )
}

/// An item in `state`, enqueued at `t(0)`, delivered and acked at `t(1)`, beaten at `t(2)`, asked to
/// stop at `t(3)` as far as `state` goes. Its lease ends one TTL after the last of those.
fn item_in(state: WorkState) -> WorkItem {
    let queued = enqueue_at(t(0), None).item;
    if state == WorkState::Queued {
        return queued;
    }
    let delivered = work::deliver(&queued, Some("w1"), "hash".into(), None, t(1), RECLAIM_MS)
        .unwrap()
        .item;
    let starting = work::ack(&delivered, Some("w1"), t(1)).unwrap().item;
    if state == WorkState::Starting {
        return starting;
    }
    let policy = LeasePolicy::default();
    let (beaten, _) = work::heartbeat(
        &starting,
        ExpectedHeartbeat::None,
        None,
        Some("w1"),
        t(2),
        &policy,
    )
    .unwrap();
    if state == WorkState::Active {
        return beaten.item;
    }
    let stopping = work::stop(&beaten.item, false, t(3)).unwrap().item;
    if state == WorkState::Stopping {
        return stopping;
    }
    work::stop(&stopping, false, t(4)).unwrap().item
}

#[test]
fn a_stop_of_a_leased_item_leaves_its_program_running_until_the_lease_ends() {
    let now = t(5);
    // (state, force, what runs on)
    let cases = [
        (WorkState::Starting, true, true),
        (WorkState::Active, true, true),
        (WorkState::Stopping, true, true),
        // The confirmation of a stop request, sent by someone other than the draining worker.
        (WorkState::Stopping, false, true),
        // Graceful: the item is not stopped yet; the worker drains and confirms.
        (WorkState::Active, false, false),
        (WorkState::Starting, false, false),
        // Nobody ran anything.
        (WorkState::Queued, true, false),
        (WorkState::Queued, false, false),
    ];
    for (state, force, runs_on) in cases {
        let item = item_in(state);
        let step = work::stop(&item, force, now).unwrap();
        let expected = runs_on.then(|| item.lease_expires_at.unwrap());
        assert_eq!(
            step.holder_may_run_until, expected,
            "stop of a {state} item, force {force}"
        );
        assert_eq!(
            step.clone().asked_by_holder().holder_may_run_until,
            None,
            "the holder's own stop comes after its program ended"
        );
        assert_eq!(
            step.asked_by_holder().item,
            work::stop(&item, force, now).unwrap().item
        );
    }
}

#[test]
fn who_asks_decides_whether_the_program_may_run_on() {
    let now = t(5);
    // (state, force, who asks, whether the program may run on)
    let mut cases = Vec::new();
    for state in [WorkState::Starting, WorkState::Active, WorkState::Stopping] {
        for force in [false, true] {
            // Stopped now: a forced stop, or the confirmation of a stopping item.
            let stopped = force || state == WorkState::Stopping;
            cases.push((state, force, Stopper::Holder, false));
            cases.push((state, force, Stopper::Operator, stopped));
        }
    }
    // Nothing is leased: nothing runs on, whoever asks.
    cases.push((WorkState::Queued, true, Stopper::Operator, false));
    cases.push((WorkState::Queued, false, Stopper::Operator, false));
    for (state, force, stopper, runs_on) in cases {
        let item = item_in(state);
        let step = work::stop_by(&item, force, now, stopper).unwrap();
        assert_eq!(
            step.holder_may_run_until.is_some(),
            runs_on,
            "{state} item, force {force}, asked by {stopper:?}"
        );
        assert_eq!(step.item, work::stop(&item, force, now).unwrap().item);
    }
    for stopper in [Stopper::Holder, Stopper::Operator] {
        assert!(work::stop_by(&item_in(WorkState::Stopped), true, now, stopper).is_err());
    }
}

#[test]
fn a_session_archive_or_delete_leaves_the_program_running_too() {
    for cause in [Cause::SessionArchived, Cause::SessionDeleted] {
        let item = item_in(WorkState::Active);
        let step = work::force_stop_for(&item, t(5), cause).unwrap();
        assert_eq!(step.holder_may_run_until, item.lease_expires_at);
    }
}

#[test]
fn a_lease_already_over_leaves_nothing_running() {
    let item = item_in(WorkState::Active);
    let deadline = item.lease_expires_at.unwrap();
    for now in [deadline, deadline.plus_seconds(1)] {
        let step = work::stop(&item, true, now).unwrap();
        assert_eq!(step.holder_may_run_until, None, "stopped at {now}");
    }
    // Expiry itself: the worker killed its program before the deadline (§8).
    let policy = LeasePolicy::default();
    let expired = work::expire_if_due(&item, deadline.plus_seconds(1), &policy).unwrap();
    assert_eq!(expired.holder_may_run_until, None);
}

#[test]
fn a_held_item_is_neither_delivered_nor_claimed_before_its_time() {
    let until = t(60);
    let step = enqueue_at(t(0), Some(until));
    let held = step.item;
    assert_eq!(held.not_before, Some(until));
    let detail = step.transitions[0].detail.as_deref().unwrap();
    assert!(detail.starts_with("held until "), "{detail}");

    for now in [t(0), t(59), until.minus_millis(1)] {
        assert!(work::is_held(&held, now));
        assert!(!work::is_claimable(&held, now, RECLAIM_MS), "at {now}");
        assert_eq!(
            work::deliver(&held, Some("w1"), "hash".into(), None, now, RECLAIM_MS),
            Err(WorkError::NotClaimable)
        );
        assert_eq!(
            work::ack(&held, Some("w1"), now),
            Err(WorkError::Held { until })
        );
    }
    // From its moment on it is an item like any other, and no longer held once it leaves `queued`.
    for now in [until, t(61)] {
        assert!(work::is_claimable(&held, now, RECLAIM_MS));
        let delivered = work::deliver(&held, Some("w1"), "hash".into(), None, now, RECLAIM_MS)
            .unwrap()
            .item;
        assert!(work::is_claimable(
            &delivered,
            now.plus_millis(RECLAIM_MS),
            RECLAIM_MS
        ));
        let acked = work::ack(&delivered, Some("w1"), now).unwrap().item;
        assert_eq!(acked.not_before, None);
        let implicit = work::ack(&held, None, now).unwrap().item;
        assert_eq!(implicit.not_before, None);
    }
    // A stop while held ends it; a stopped item is held no more.
    let stopped = work::stop(&held, true, t(1)).unwrap();
    assert_eq!(stopped.item.state, WorkState::Stopped);
    assert_eq!(stopped.item.not_before, None);
    assert_eq!(stopped.holder_may_run_until, None);
}

#[test]
fn a_moment_already_past_holds_nothing() {
    for not_before in [None, Some(t(0)), Some(t(-5))] {
        let step = enqueue_at(t(0), not_before);
        assert_eq!(step.item.not_before, None, "{not_before:?}");
        assert_eq!(step.transitions[0].detail, None);
    }
}

#[test]
fn a_requeued_item_is_held_as_its_session_says() {
    let stopped = work::stop(&item_in(WorkState::Active), true, t(5))
        .unwrap()
        .item;
    let request = |not_before| work::RequeueRequest {
        fresh_id: "work_2".into(),
        by: "admin token tok_1",
        reason: None,
        already_requeued: false,
        not_before,
    };
    let policy = LeasePolicy::default();
    let held = work::requeue(&stopped, request(Some(t(60))), t(6), &policy).unwrap();
    assert_eq!(held.fresh.item.not_before, Some(t(60)));
    let detail = held.fresh.transitions[0].detail.as_deref().unwrap();
    assert!(
        detail.starts_with("requeue of work_1 by admin token tok_1; held until "),
        "{detail}"
    );
    let free = work::requeue(&stopped, request(None), t(6), &policy).unwrap();
    assert_eq!(free.fresh.item.not_before, None);
}

fn moment() -> impl Strategy<Value = Option<Timestamp>> {
    prop::option::of((-100i64..100).prop_map(t))
}

proptest! {
    /// The session keeps the latest moment any stop left running, and forgets it once it passed.
    #[test]
    fn the_session_holds_the_latest_moment_still_to_come(
        held in moment(),
        left in moment(),
        now in (-100i64..100).prop_map(t),
    ) {
        let hold = hold_next_item(held, left, now);
        match hold {
            Some(until) => {
                prop_assert!(until > now);
                prop_assert!(Some(until) == held || Some(until) == left);
                prop_assert!(held.is_none_or(|h| h <= until));
                prop_assert!(left.is_none_or(|l| l <= until));
            }
            None => {
                prop_assert!(held.is_none_or(|h| h <= now));
                prop_assert!(left.is_none_or(|l| l <= now));
            }
        }
        // The item the session enqueues next is held exactly until then.
        prop_assert_eq!(enqueue_at(now, hold).item.not_before, hold);
        prop_assert_eq!(enqueue_at(now, held.max(left)).item.not_before, hold);
    }
}

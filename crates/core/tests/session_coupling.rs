//! The session rules the service calls instead of restating them: which work transitions touch a
//! session, what one transition and a step's transitions do to it (one loop, with the buffered-input
//! rule of D-34), what a user message and `cancel` do, and the events the server writes on its own
//! account.
//!
//! Reproduce a run with a fixed seed: `PROPTEST_RNG_SEED=<u64> cargo test -p tether-core --test session_coupling`.

use proptest::collection::vec;
use proptest::prelude::*;
use serde_json::json;
use tether_core::events::{self, EventType};
use tether_core::session::{
    self, couple, on_interrupt_without_item, on_user_message, on_work_transition, touches_session,
    IdleReason, InputDecision, QueueEffect, ServerEvent, SessionStatus, TurnView,
};
use tether_core::time::Timestamp;
use tether_core::work::{Cause, Transition, WorkData, WorkError, WorkState};

const CAUSES: [Cause; 15] = [
    Cause::Enqueued,
    Cause::Delivered,
    Cause::Redelivered,
    Cause::Acked,
    Cause::FirstHeartbeat,
    Cause::StopRequested,
    Cause::StopConfirmed,
    Cause::ForceStopped,
    Cause::LeaseExpiredRequeued,
    Cause::LeaseExpiredStopped,
    Cause::PoisonStopped,
    Cause::SessionArchived,
    Cause::SessionDeleted,
    Cause::SessionInterrupted,
    Cause::Requeued,
];

fn t(cause: Cause, to: WorkState) -> Transition {
    Transition {
        at: Timestamp(0),
        from: None,
        to,
        cause,
        worker_id: None,
        detail: None,
    }
}

fn transition() -> impl Strategy<Value = Transition> {
    (
        proptest::sample::select(CAUSES.to_vec()),
        proptest::sample::select(WorkState::ALL.to_vec()),
    )
        .prop_map(|(cause, to)| t(cause, to))
}

fn status() -> impl Strategy<Value = SessionStatus> {
    proptest::sample::select(SessionStatus::ALL.to_vec())
}

#[test]
fn the_cause_filter_is_exactly_what_coupling_reacts_to() {
    for cause in CAUSES {
        for to in WorkState::ALL {
            let transition = t(cause, to);
            let reacts = SessionStatus::ALL.into_iter().any(|status| {
                [false, true]
                    .into_iter()
                    .any(|pending| !on_work_transition(status, pending, &transition).is_empty())
            });
            if reacts {
                assert!(touches_session(&transition), "{cause:?} → {to:?}");
            }
        }
    }
    // The three kinds of transition the filter lets through.
    assert!(touches_session(&t(Cause::Acked, WorkState::Starting)));
    assert!(touches_session(&t(
        Cause::LeaseExpiredRequeued,
        WorkState::Queued
    )));
    assert!(touches_session(&t(Cause::ForceStopped, WorkState::Stopped)));
    assert!(!touches_session(&t(Cause::Delivered, WorkState::Queued)));
    assert!(!touches_session(&t(
        Cause::FirstHeartbeat,
        WorkState::Active
    )));
    assert!(!touches_session(&t(
        Cause::StopRequested,
        WorkState::Stopping
    )));
}

#[test]
fn requeue_while_running_reschedules_and_ack_resumes() {
    let e = on_work_transition(
        SessionStatus::Running,
        false,
        &t(Cause::LeaseExpiredRequeued, WorkState::Queued),
    );
    assert_eq!(e.status, Some(SessionStatus::Rescheduling));
    assert_eq!(e.events, vec![ServerEvent::StatusRescheduled]);
    let e = on_work_transition(
        SessionStatus::Rescheduling,
        false,
        &t(Cause::Acked, WorkState::Starting),
    );
    assert_eq!(e.status, Some(SessionStatus::Running));
    let e = on_work_transition(
        SessionStatus::Idle,
        false,
        &t(Cause::LeaseExpiredRequeued, WorkState::Queued),
    );
    assert!(e.is_empty());
}

#[test]
fn stop_mid_turn_goes_idle_with_error() {
    for cause in [
        Cause::ForceStopped,
        Cause::PoisonStopped,
        Cause::StopConfirmed,
    ] {
        let e = on_work_transition(SessionStatus::Running, false, &t(cause, WorkState::Stopped));
        assert_eq!(e.status, Some(SessionStatus::Idle));
        assert!(matches!(e.events[0], ServerEvent::Error { .. }));
        assert!(!e.enqueue_fresh_item);
    }
    let e = on_work_transition(
        SessionStatus::Idle,
        false,
        &t(Cause::StopConfirmed, WorkState::Stopped),
    );
    assert!(e.is_empty());
}

#[test]
fn a_stop_says_why_in_the_sessions_error() {
    let mut stop = t(Cause::ForceStopped, WorkState::Stopped);
    stop.detail = Some("its program ended: tether.exit_code=1".into());
    let e = on_work_transition(SessionStatus::Running, false, &stop);
    assert_eq!(
        e.events[0],
        ServerEvent::Error {
            message: "the work item serving this turn stopped (force_stopped: its program ended: \
                      tether.exit_code=1)"
                .into()
        }
    );
    let e = on_work_transition(
        SessionStatus::Running,
        false,
        &t(Cause::ForceStopped, WorkState::Stopped),
    );
    assert_eq!(
        e.events[0],
        ServerEvent::Error {
            message: "the work item serving this turn stopped (force_stopped)".into()
        }
    );
}

#[test]
fn a_turn_cancelled_before_a_worker_started_it_ends_without_an_error() {
    for status in [SessionStatus::Running, SessionStatus::Rescheduling] {
        for pending in [false, true] {
            let e = on_work_transition(
                status,
                pending,
                &t(Cause::SessionInterrupted, WorkState::Stopped),
            );
            assert_eq!(e.status, Some(SessionStatus::Idle), "{status:?}");
            assert_eq!(
                e.events,
                vec![ServerEvent::StatusIdle(IdleReason::EndTurn)],
                "{status:?}"
            );
            assert!(!e.enqueue_fresh_item);
            assert_eq!(e.clear_pending_input, pending);
        }
    }
    let e = on_work_transition(
        SessionStatus::Idle,
        false,
        &t(Cause::SessionInterrupted, WorkState::Stopped),
    );
    assert!(e.is_empty());
}

/// A turn no item serves (a `cloud` environment's) ends at its cancel exactly as one whose item no
/// worker had started: the same status, events and input flag as the coupling of that stop.
#[test]
fn a_cancelled_turn_without_an_item_ends_as_one_no_worker_started() {
    for status in [
        SessionStatus::Idle,
        SessionStatus::Running,
        SessionStatus::Rescheduling,
        SessionStatus::Terminated,
    ] {
        for pending in [false, true] {
            let without_item = on_interrupt_without_item(status, pending);
            let unstarted = couple(
                status,
                pending,
                &[t(Cause::SessionInterrupted, WorkState::Stopped)],
            );
            assert_eq!(without_item, unstarted, "{status:?} pending={pending}");
        }
    }
    let ended = on_interrupt_without_item(SessionStatus::Running, true);
    assert_eq!(
        (ended.status, ended.pending_input, ended.events),
        (
            SessionStatus::Idle,
            false,
            vec![ServerEvent::StatusIdle(IdleReason::EndTurn)]
        )
    );
}

#[test]
fn buffered_input_is_served_by_a_fresh_item() {
    let e = on_work_transition(
        SessionStatus::Running,
        true,
        &t(Cause::StopConfirmed, WorkState::Stopped),
    );
    assert!(e.enqueue_fresh_item && e.clear_pending_input);
    assert_eq!(
        e.status, None,
        "the buffered turn goes on with the fresh item"
    );
    assert!(e.events.is_empty());
    let e = on_work_transition(
        SessionStatus::Idle,
        true,
        &t(Cause::SessionArchived, WorkState::Stopped),
    );
    assert!(!e.enqueue_fresh_item);
}

#[test]
fn user_message_table() {
    use InputDecision::*;
    use QueueEffect::{Buffer, Enqueue};
    let cases = [
        (
            SessionStatus::Idle,
            false,
            true,
            Option::None,
            Accept {
                start_turn: true,
                queue: Enqueue,
            },
        ),
        (
            SessionStatus::Idle,
            false,
            true,
            Some(WorkState::Stopped),
            Accept {
                start_turn: true,
                queue: Enqueue,
            },
        ),
        (
            SessionStatus::Idle,
            false,
            true,
            Some(WorkState::Active),
            Accept {
                start_turn: true,
                queue: QueueEffect::None,
            },
        ),
        (
            SessionStatus::Idle,
            false,
            true,
            Some(WorkState::Queued),
            Accept {
                start_turn: true,
                queue: QueueEffect::None,
            },
        ),
        (
            SessionStatus::Idle,
            false,
            true,
            Some(WorkState::Stopping),
            Accept {
                start_turn: true,
                queue: Buffer,
            },
        ),
        (
            SessionStatus::Idle,
            false,
            false,
            Option::None,
            Accept {
                start_turn: true,
                queue: QueueEffect::None,
            },
        ),
    ];
    for (status, archived, self_hosted, live, want) in cases {
        assert_eq!(
            on_user_message(status, archived, self_hosted, live),
            want,
            "{status:?} {live:?}"
        );
    }
    for status in [
        SessionStatus::Running,
        SessionStatus::Rescheduling,
        SessionStatus::Terminated,
    ] {
        assert!(matches!(
            on_user_message(status, false, true, None),
            Refuse(_)
        ));
    }
    assert!(matches!(
        on_user_message(SessionStatus::Idle, true, true, None),
        Refuse(_)
    ));
}

#[test]
fn documented_status_transitions() {
    use SessionStatus::*;
    assert!(Idle.may_become(Running));
    assert!(!Terminated.may_become(Idle));
    assert!(Rescheduling.may_become(Running));
}

/// (status, pending input, transitions, status after, pending after, event types, fresh item)
type Row = (
    SessionStatus,
    bool,
    Vec<Transition>,
    SessionStatus,
    bool,
    Vec<EventType>,
    bool,
);

/// Each row: the session before, the step's transitions, and what it must come to.
#[test]
fn coupling_table() {
    use SessionStatus::*;
    let stop = t(Cause::StopConfirmed, WorkState::Stopped);
    let expire = t(Cause::LeaseExpiredRequeued, WorkState::Queued);
    let ack = t(Cause::Acked, WorkState::Starting);
    let archived = t(Cause::SessionArchived, WorkState::Stopped);
    // (status, pending input, transitions, status after, pending after, event types, fresh item)
    let cases: Vec<Row> = vec![
        (
            Running,
            false,
            vec![expire.clone()],
            Rescheduling,
            false,
            vec![EventType::SessionStatusRescheduled],
            false,
        ),
        (
            Rescheduling,
            false,
            vec![ack.clone()],
            Running,
            false,
            vec![EventType::SessionStatusRunning],
            false,
        ),
        // Expired and re-acked within one step: both events, in order.
        (
            Running,
            false,
            vec![expire.clone(), ack.clone()],
            Running,
            false,
            vec![
                EventType::SessionStatusRescheduled,
                EventType::SessionStatusRunning,
            ],
            false,
        ),
        (
            Running,
            false,
            vec![stop.clone()],
            Idle,
            false,
            vec![EventType::SessionError, EventType::SessionStatusIdle],
            false,
        ),
        (
            Rescheduling,
            false,
            vec![stop.clone()],
            Idle,
            false,
            vec![EventType::SessionError, EventType::SessionStatusIdle],
            false,
        ),
        (Idle, false, vec![stop.clone()], Idle, false, vec![], false),
        // Input buffered while the item was stopping: a fresh item carries the turn on (D-34).
        (
            Running,
            true,
            vec![stop.clone()],
            Running,
            false,
            vec![],
            true,
        ),
        (Idle, true, vec![stop.clone()], Idle, false, vec![], true),
        // An archive or delete never serves buffered input.
        (
            Running,
            true,
            vec![archived.clone()],
            Idle,
            true,
            vec![EventType::SessionError, EventType::SessionStatusIdle],
            false,
        ),
        (Idle, true, vec![archived], Idle, true, vec![], false),
        (
            Terminated,
            true,
            vec![stop, expire, ack],
            Terminated,
            true,
            vec![],
            false,
        ),
    ];
    for (status, pending, transitions, want_status, want_pending, want_events, want_fresh) in cases
    {
        let coupling = couple(status, pending, &transitions);
        let kinds: Vec<EventType> = coupling.events.iter().map(ServerEvent::kind).collect();
        let case = format!("{status:?} pending={pending} {transitions:?}");
        assert_eq!(coupling.status, want_status, "{case}");
        assert_eq!(coupling.pending_input, want_pending, "{case}");
        assert_eq!(kinds, want_events, "{case}");
        assert_eq!(coupling.enqueue_fresh_item, want_fresh, "{case}");
        assert_eq!(
            coupling.changes(status, pending),
            want_status != status
                || want_pending != pending
                || !want_events.is_empty()
                || want_fresh,
            "{case}"
        );
    }
}

proptest! {
    /// `couple` is `on_work_transition` folded over the step: every status it passes through is a
    /// documented one, and transitions the filter drops change nothing.
    #[test]
    fn coupling_folds_the_single_transition_rule(
        start in status(),
        pending in any::<bool>(),
        transitions in vec(transition(), 0..6),
    ) {
        let coupling = couple(start, pending, &transitions);
        let (mut status, mut waiting, mut events, mut fresh) = (start, pending, Vec::new(), false);
        for transition in &transitions {
            let effect = on_work_transition(status, waiting, transition);
            if !touches_session(transition) {
                prop_assert!(effect.is_empty());
            }
            if let Some(next) = effect.status {
                prop_assert!(status.may_become(next));
                status = next;
            }
            events.extend(effect.events);
            waiting &= !effect.clear_pending_input;
            fresh |= effect.enqueue_fresh_item;
        }
        prop_assert_eq!(coupling.status, status);
        prop_assert_eq!(coupling.pending_input, waiting);
        prop_assert_eq!(coupling.events, events);
        prop_assert_eq!(coupling.enqueue_fresh_item, fresh);
        let filtered: Vec<Transition> =
            transitions.iter().filter(|t| touches_session(t)).cloned().collect();
        prop_assert_eq!(couple(start, pending, &filtered), couple(start, pending, &transitions));
    }

    /// A terminated session is never touched, whatever happens to its items.
    #[test]
    fn a_terminated_session_stays_as_it_is(pending in any::<bool>(), transitions in vec(transition(), 0..6)) {
        let coupling = couple(SessionStatus::Terminated, pending, &transitions);
        prop_assert!(!coupling.changes(SessionStatus::Terminated, pending));
    }
}

#[test]
fn cancel_interrupts_only_a_running_turn() {
    use SessionStatus::*;
    // (status, archived, answer: Ok(interrupt) or Err(code))
    let cases = [
        (Idle, false, Ok(false)),
        (Idle, true, Ok(false)),
        (Terminated, false, Ok(false)),
        (Terminated, true, Ok(false)),
        (Running, false, Ok(true)),
        (Rescheduling, false, Ok(true)),
        (Running, true, Err("session_archived")),
        (Rescheduling, true, Err("session_archived")),
    ];
    for (status, archived, want) in cases {
        let got = events::interrupt(status, archived).map_err(|r| r.code);
        assert_eq!(got, want, "{status:?} archived={archived}");
    }
    // The refusal is the one every event meets on an archived session.
    let mut turn = events::TurnState {
        status: Running,
        archived: true,
        self_hosted: true,
        live_item: None,
        pending_input: false,
    };
    assert_eq!(
        events::interrupt(Running, true).unwrap_err(),
        events::apply(&mut turn, EventType::UserInterrupt).unwrap_err()
    );
}

#[test]
fn server_events_name_server_side_types_and_carry_their_fields() {
    let cases = [
        (
            ServerEvent::StatusRunning,
            "session.status_running",
            json!({}),
        ),
        (
            ServerEvent::StatusRescheduled,
            "session.status_rescheduled",
            json!({}),
        ),
        (
            ServerEvent::StatusIdle(IdleReason::RetriesExhausted),
            "session.status_idle",
            json!({"stop_reason": {"type": "retries_exhausted"}}),
        ),
        (
            ServerEvent::StatusIdle(IdleReason::EndTurn),
            "session.status_idle",
            json!({"stop_reason": {"type": "end_turn"}}),
        ),
        (
            ServerEvent::Error {
                message: "gone".into(),
            },
            "session.error",
            json!({"error": {"type": "unknown_error", "message": "gone",
                "retry_status": {"type": "exhausted"}, "code": "work_stopped"}}),
        ),
    ];
    for (event, kind, fields) in cases {
        assert_eq!(event.kind().as_str(), kind);
        assert_eq!(serde_json::Value::Object(event.fields()), fields, "{kind}");
        // What the server writes passes the shape rules a client's event of that type must pass.
        let mut body = event.fields();
        body.insert("type".into(), json!(kind));
        if matches!(
            event,
            ServerEvent::StatusIdle(_) | ServerEvent::Error { .. }
        ) {
            events::validate("e", event.kind(), &serde_json::Value::Object(body))
                .expect("a well-formed event");
        }
    }
}

#[test]
fn session_work_data() {
    let data = WorkData::session("sesn_1");
    assert_eq!(data.kind, "session");
    assert_eq!(data.session_id(), Some("sesn_1"));
    let other = WorkData {
        kind: "batch".into(),
        id: "x".into(),
    };
    assert_eq!(other.session_id(), None);
}

/// A stop asked to leave an open turn to the item's program is refused exactly when it would end that
/// turn in an error: forced, of a `starting` or `active` item, the turn open, no input waiting for a
/// fresh item. It names how far the session had got. Any other stop goes ahead as the SPEC says.
#[test]
fn a_stop_unless_turn_open_is_refused_exactly_when_it_would_fail_an_open_turn() {
    let at = Timestamp::from_millis(1_700_000_000_000);
    let items = [
        WorkState::Queued,
        WorkState::Starting,
        WorkState::Active,
        WorkState::Stopping,
        WorkState::Stopped,
    ];
    let view = |status, pending_input| TurnView {
        status,
        pending_input,
        updated_at: at,
        turns_started: 7,
    };
    // The cases that matter, spelled out: the worker's stop as a message came while its program
    // ended; an operator's stop racing it (input waits for a fresh item); a graceful request; an
    // item whose lease lapsed (its turn `rescheduling`), no longer the worker's.
    let running = SessionStatus::Running;
    assert!(session::may_stop(WorkState::Active, true, view(running, false), true).is_err());
    assert!(session::may_stop(WorkState::Stopping, true, view(running, true), true).is_ok());
    assert!(session::may_stop(WorkState::Active, false, view(running, false), true).is_ok());
    let rescheduling = SessionStatus::Rescheduling;
    assert!(session::may_stop(WorkState::Queued, true, view(rescheduling, false), true).is_ok());
    for status in SessionStatus::ALL {
        let open = matches!(status, SessionStatus::Running | SessionStatus::Rescheduling);
        assert_eq!(session::turn_is_open(status), open, "{status:?}");
        for (item, force, pending_input) in items
            .iter()
            .flat_map(|&item| [(item, false), (item, true)].into_iter())
            .flat_map(|(item, force)| [(item, force, false), (item, force, true)].into_iter())
        {
            let turn = view(status, pending_input);
            let case = format!("{item:?} force={force} {status:?} pending_input={pending_input}");
            assert!(
                session::may_stop(item, force, turn, false).is_ok(),
                "{case}"
            );
            let fails_the_turn = force
                && matches!(item, WorkState::Starting | WorkState::Active)
                && open
                && !pending_input;
            match session::may_stop(item, force, turn, true) {
                Ok(()) => assert!(!fails_the_turn, "{case} let through"),
                Err(WorkError::TurnOpen {
                    session_updated_at,
                    turn,
                }) => {
                    assert!(fails_the_turn, "{case} refused");
                    assert_eq!((session_updated_at, turn), (at, 7));
                }
                Err(other) => panic!("{case}: {other:?}"),
            }
        }
    }
}

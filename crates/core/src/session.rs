//! Session status and the work ↔ session coupling rules (§7.3, §12.4), as pure decisions.
//!
//! Where §7.3 rule 5 ("stopping a work item never changes session status") and §12.4 ("an item that reaches
//! `stopped` while its session is `running` makes the session `idle` with a `session.error`") meet, the
//! later and more specific §12.4 wins: a turn that nobody can finish must not leave the session `running`
//! for ever.

use serde::{Deserialize, Serialize};

use crate::time::Timestamp;
use crate::work::{Cause, Transition, WorkState};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SessionStatus {
    Idle,
    Running,
    Rescheduling,
    Terminated,
}

impl SessionStatus {
    pub const ALL: [SessionStatus; 4] = [
        SessionStatus::Idle,
        SessionStatus::Running,
        SessionStatus::Rescheduling,
        SessionStatus::Terminated,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            SessionStatus::Idle => "idle",
            SessionStatus::Running => "running",
            SessionStatus::Rescheduling => "rescheduling",
            SessionStatus::Terminated => "terminated",
        }
    }

    pub fn parse(text: &str) -> Option<SessionStatus> {
        SessionStatus::ALL.into_iter().find(|s| s.as_str() == text)
    }

    /// Documented transitions (§2.2). Staying put is always allowed.
    pub fn may_become(self, next: SessionStatus) -> bool {
        use SessionStatus::*;
        self == next
            || matches!(
                (self, next),
                (Idle, Running | Rescheduling | Terminated)
                    | (Running, Idle | Rescheduling | Terminated)
                    | (Rescheduling, Idle | Running | Terminated)
            )
    }
}

/// An event the server writes into a session's log on its own account.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServerEvent {
    StatusRunning,
    StatusRescheduled,
    StatusIdle(IdleReason),
    Error { message: String },
}

/// Why the server ended a turn (the `stop_reason` of its `session.status_idle`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IdleReason {
    /// The turn was cancelled before any worker started it: ended as asked, not failed.
    EndTurn,
    /// The item serving the turn stopped without the worker ending the turn.
    RetriesExhausted,
}

/// What a work transition does to its session.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SessionEffect {
    pub status: Option<SessionStatus>,
    pub events: Vec<ServerEvent>,
    /// Input arrived while the item was `stopping` (§7.3 rule 3): a fresh item is due now.
    pub enqueue_fresh_item: bool,
    /// Clear the remembered "input is waiting" flag.
    pub clear_pending_input: bool,
}

impl SessionEffect {
    pub fn is_empty(&self) -> bool {
        self == &SessionEffect::default()
    }
}

/// The coupling rules applied to one work transition of the session's item.
pub fn on_work_transition(
    status: SessionStatus,
    pending_input: bool,
    transition: &Transition,
) -> SessionEffect {
    let mut effect = SessionEffect::default();
    if status == SessionStatus::Terminated {
        return effect;
    }
    match (transition.cause, transition.to) {
        (Cause::LeaseExpiredRequeued, WorkState::Queued) if status == SessionStatus::Running => {
            effect.status = Some(SessionStatus::Rescheduling);
            effect.events.push(ServerEvent::StatusRescheduled);
        }
        (Cause::Acked, WorkState::Starting) if status == SessionStatus::Rescheduling => {
            effect.status = Some(SessionStatus::Running);
            effect.events.push(ServerEvent::StatusRunning);
        }
        (Cause::SessionInterrupted, WorkState::Stopped) => {
            // Asked for by the user (cancel), of an item no program had started.
            effect = interrupted_turn(status, pending_input);
        }
        (_, WorkState::Stopped) => {
            let by_session = matches!(
                transition.cause,
                Cause::SessionArchived | Cause::SessionDeleted
            );
            if pending_input && !by_session {
                // The input (and the turn it started) arrived while this item was already `stopping`:
                // the item was never going to serve it, so the turn goes on with a fresh item (D-34)
                // instead of ending in an error.
                effect.enqueue_fresh_item = true;
                effect.clear_pending_input = true;
            } else if matches!(status, SessionStatus::Running | SessionStatus::Rescheduling) {
                effect.status = Some(SessionStatus::Idle);
                let why = match &transition.detail {
                    Some(detail) => format!("{}: {detail}", transition.cause.as_str()),
                    None => transition.cause.as_str().to_owned(),
                };
                effect.events.push(ServerEvent::Error {
                    message: format!("the work item serving this turn stopped ({why})"),
                });
                effect
                    .events
                    .push(ServerEvent::StatusIdle(IdleReason::RetriesExhausted));
            }
        }
        _ => {}
    }
    effect
}

/// Whether the session has a turn nobody has ended: input came (`running`), or its item went back to
/// the queue mid-turn (`rescheduling`). A stop of the item asked to leave such a turn to the item's
/// program (Tether's `unless_turn_open`, which a worker sends when its program has ended well) is
/// refused: input that came while the program was ending would otherwise end its turn in an error
/// with the item (§12.4), though nothing ever read it.
pub fn turn_is_open(status: SessionStatus) -> bool {
    matches!(status, SessionStatus::Running | SessionStatus::Rescheduling)
}

/// Whether a stop of `item` whose session is `session` may go ahead: always, unless it was asked to
/// leave an open turn to the item's program (`unless_turn_open`) and it would end that turn in an
/// error (§12.4): a forced stop of a `starting` or `active` item while the session's turn is open
/// ([`turn_is_open`]) with no input waiting for a fresh item (D-34, which serves input that came
/// while the item was `stopping`). A graceful request ends no turn; an item `stopping` leaves its
/// waiting input to a fresh item; one `queued` (its lease lapsed: `rescheduling`) or `stopped` is
/// not its worker's to stop, and is refused as such.
pub fn may_stop(
    item: WorkState,
    force: bool,
    session: TurnView,
    unless_turn_open: bool,
) -> Result<(), crate::work::WorkError> {
    let ends_a_turn = force
        && matches!(item, WorkState::Starting | WorkState::Active)
        && turn_is_open(session.status)
        && !session.pending_input;
    match unless_turn_open && ends_a_turn {
        false => Ok(()),
        true => Err(crate::work::WorkError::TurnOpen {
            session_updated_at: session.updated_at,
            turn: session.turns_started,
        }),
    }
}

/// What [`may_stop`] looks at in a session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TurnView {
    pub status: SessionStatus,
    /// Input came while the item was `stopping`, for a fresh item (D-34).
    pub pending_input: bool,
    /// How far the session had got, said to the worker with a refusal.
    pub updated_at: Timestamp,
    /// Which turn is open ([`crate::resources::Session::turns_started`]).
    pub turns_started: u64,
}

impl From<&crate::resources::Session> for TurnView {
    fn from(session: &crate::resources::Session) -> TurnView {
        TurnView {
            status: session.status,
            pending_input: session.pending_input,
            updated_at: session.updated_at,
            turns_started: session.turns_started,
        }
    }
}

/// Whether a work transition can matter to its session at all: the only ones [`on_work_transition`]
/// reacts to. The service reads the session only for these.
pub fn touches_session(transition: &Transition) -> bool {
    transition.to == WorkState::Stopped
        || matches!(transition.cause, Cause::LeaseExpiredRequeued | Cause::Acked)
}

/// What a step's transitions, applied in order, do to the session of the item (§7.3, §12.4).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Coupling {
    pub status: SessionStatus,
    pub pending_input: bool,
    /// The events the server writes, in order.
    pub events: Vec<ServerEvent>,
    /// Input was waiting for the item to stop: a fresh item is due now (D-34).
    pub enqueue_fresh_item: bool,
}

impl Coupling {
    /// Whether the session changes at all.
    pub fn changes(&self, status: SessionStatus, pending_input: bool) -> bool {
        self.status != status
            || self.pending_input != pending_input
            || !self.events.is_empty()
            || self.enqueue_fresh_item
    }
}

/// Applies [`on_work_transition`] to each transition of a step in turn, starting from the session's
/// `status` and `pending_input`. Every caller that couples a work change to its session uses this, so
/// the buffered-input rule (D-34) cannot be left out of one of them.
pub fn couple(status: SessionStatus, pending_input: bool, transitions: &[Transition]) -> Coupling {
    let mut coupling = Coupling {
        status,
        pending_input,
        events: Vec::new(),
        enqueue_fresh_item: false,
    };
    for transition in transitions {
        let effect = on_work_transition(coupling.status, coupling.pending_input, transition);
        if let Some(next) = effect.status {
            assert!(
                coupling.status.may_become(next),
                "undocumented session transition {:?} -> {next:?}",
                coupling.status
            );
            coupling.status = next;
        }
        coupling.events.extend(effect.events);
        if effect.clear_pending_input {
            coupling.pending_input = false;
        }
        coupling.enqueue_fresh_item |= effect.enqueue_fresh_item;
    }
    coupling
}

/// A cancel (§12.2) of a turn that no work item serves: a session on an environment without a
/// queue (`cloud`, stored but never run, §0) starts a turn with a message, and no worker would ever
/// end it. It ends now, as a turn cancelled before a worker started it does
/// ([`on_work_transition`] with `SessionInterrupted`): `idle`, without an error.
pub fn on_interrupt_without_item(status: SessionStatus, pending_input: bool) -> Coupling {
    let effect = if status == SessionStatus::Terminated {
        SessionEffect::default()
    } else {
        interrupted_turn(status, pending_input)
    };
    Coupling {
        status: effect.status.unwrap_or(status),
        pending_input: pending_input && !effect.clear_pending_input,
        events: effect.events,
        enqueue_fresh_item: effect.enqueue_fresh_item,
    }
}

/// A turn cancelled before any program started it, with or without an item: it ends there,
/// without an error, and any input it had is part of the cancelled turn.
fn interrupted_turn(status: SessionStatus, pending_input: bool) -> SessionEffect {
    let mut effect = SessionEffect {
        clear_pending_input: pending_input,
        ..SessionEffect::default()
    };
    if matches!(status, SessionStatus::Running | SessionStatus::Rescheduling) {
        effect.status = Some(SessionStatus::Idle);
        effect
            .events
            .push(ServerEvent::StatusIdle(IdleReason::EndTurn));
    }
    effect
}

/// Until when the session's next item is held (§7.3 rule 1, kept for programs as well as items):
/// the later of what the session holds already (`held`) and what a step that stopped its item leaves
/// running (`work::Step::holder_may_run_until`). A moment already past holds nothing and is
/// forgotten, so that a session's document does not keep it.
pub fn hold_next_item(
    held: Option<Timestamp>,
    left_running_until: Option<Timestamp>,
    now: Timestamp,
) -> Option<Timestamp> {
    held.max(left_running_until).filter(|t| *t > now)
}

/// What runnable user input (a `user.message`) does, given the session and its live item (§7.3, §12.4).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InputDecision {
    /// Refused: 409 (a turn is running, or the session is archived/terminated).
    Refuse(&'static str),
    /// Accepted. `start_turn`: the session becomes `running`. The queue effect says what to do with work.
    Accept {
        start_turn: bool,
        queue: QueueEffect,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QueueEffect {
    /// A live item serves the session already; the worker reads input from the event log.
    None,
    /// No live item: enqueue one now (D-12b).
    Enqueue,
    /// The live item is `stopping`: remember, and enqueue when it stops (D-34).
    Buffer,
}

pub fn on_user_message(
    status: SessionStatus,
    archived: bool,
    self_hosted: bool,
    live_item: Option<WorkState>,
) -> InputDecision {
    if archived {
        return InputDecision::Refuse("the session is archived");
    }
    match status {
        SessionStatus::Terminated => InputDecision::Refuse("the session is terminated"),
        SessionStatus::Running | SessionStatus::Rescheduling => InputDecision::Refuse(
            "the session is running a turn; wait for session.status_idle or cancel it",
        ),
        SessionStatus::Idle => InputDecision::Accept {
            start_turn: true,
            queue: queue_effect(self_hosted, live_item),
        },
    }
}

/// What runnable input does to the queue, given the session's live item (D-12b, D-34).
pub fn queue_effect(self_hosted: bool, live_item: Option<WorkState>) -> QueueEffect {
    match (self_hosted, live_item) {
        (false, _) => QueueEffect::None,
        (true, None | Some(WorkState::Stopped)) => QueueEffect::Enqueue,
        (true, Some(WorkState::Stopping)) => QueueEffect::Buffer,
        (true, Some(_)) => QueueEffect::None,
    }
}

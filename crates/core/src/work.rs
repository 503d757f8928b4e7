//! The work-item state machine (§5). Every operation is a pure function from the current item, the
//! request and `now` to either a new item plus the transitions it went through, or a typed refusal.
//! Storage writes the result with one conditional write; HTTP maps refusals to status codes.

use serde::{Deserialize, Serialize};

use crate::lease::{self, LeasePolicy};
use crate::metadata::{self, Metadata, MetadataError, MetadataPatch};
use crate::time::Timestamp;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkState {
    Queued,
    Starting,
    Active,
    Stopping,
    Stopped,
}

impl WorkState {
    pub const ALL: [WorkState; 5] = [
        WorkState::Queued,
        WorkState::Starting,
        WorkState::Active,
        WorkState::Stopping,
        WorkState::Stopped,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            WorkState::Queued => "queued",
            WorkState::Starting => "starting",
            WorkState::Active => "active",
            WorkState::Stopping => "stopping",
            WorkState::Stopped => "stopped",
        }
    }

    pub fn parse(text: &str) -> Option<WorkState> {
        WorkState::ALL.into_iter().find(|s| s.as_str() == text)
    }

    /// Live = not yet stopped.
    pub const fn is_live(self) -> bool {
        !matches!(self, WorkState::Stopped)
    }

    /// States that hold a lease.
    pub const fn is_leased(self) -> bool {
        matches!(
            self,
            WorkState::Starting | WorkState::Active | WorkState::Stopping
        )
    }
}

impl std::fmt::Display for WorkState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why an item moved (§11.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Cause {
    Enqueued,
    Delivered,
    Redelivered,
    Acked,
    FirstHeartbeat,
    StopRequested,
    StopConfirmed,
    ForceStopped,
    LeaseExpiredRequeued,
    LeaseExpiredStopped,
    PoisonStopped,
    SessionArchived,
    SessionDeleted,
    /// The session's turn was cancelled before any worker started it (Tether extension).
    SessionInterrupted,
    /// An operator requeued a stopped item: its session got a fresh item (Tether extension).
    Requeued,
}

impl Cause {
    pub fn as_str(self) -> &'static str {
        match self {
            Cause::Enqueued => "enqueued",
            Cause::Delivered => "delivered",
            Cause::Redelivered => "redelivered",
            Cause::Acked => "acked",
            Cause::FirstHeartbeat => "first_heartbeat",
            Cause::StopRequested => "stop_requested",
            Cause::StopConfirmed => "stop_confirmed",
            Cause::ForceStopped => "force_stopped",
            Cause::LeaseExpiredRequeued => "lease_expired_requeued",
            Cause::LeaseExpiredStopped => "lease_expired_stopped",
            Cause::PoisonStopped => "poison_stopped",
            Cause::SessionArchived => "session_archived",
            Cause::SessionDeleted => "session_deleted",
            Cause::SessionInterrupted => "session_interrupted",
            Cause::Requeued => "requeued",
        }
    }
}

/// One line of an item's history.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transition {
    pub at: Timestamp,
    pub from: Option<WorkState>,
    pub to: WorkState,
    pub cause: Cause,
    pub worker_id: Option<String>,
    pub detail: Option<String>,
}

/// What the item asks a worker to do.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkData {
    #[serde(rename = "type")]
    pub kind: String,
    pub id: String,
}

impl WorkData {
    /// The `data.type` of an item that serves a session (§7.2).
    pub const SESSION: &'static str = "session";

    /// The data of an item that serves session `id`.
    pub fn session(id: impl Into<String>) -> WorkData {
        WorkData {
            kind: WorkData::SESSION.into(),
            id: id.into(),
        }
    }

    /// The session the item serves, if it serves one.
    pub fn session_id(&self) -> Option<&str> {
        (self.kind == WorkData::SESSION).then_some(self.id.as_str())
    }
}

/// An outstanding, un-acked poll delivery.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delivery {
    pub worker_id: Option<String>,
    pub delivered_at: Timestamp,
}

/// A work item with its public fields and the bookkeeping of §3.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkItem {
    pub id: String,
    pub environment_id: String,
    pub data: WorkData,
    pub state: WorkState,
    pub created_at: Timestamp,
    /// When the item (re)entered `queued`: FIFO order and `oldest_queued_at`.
    pub enqueued_at: Timestamp,
    pub acknowledged_at: Option<Timestamp>,
    pub started_at: Option<Timestamp>,
    /// The `last_heartbeat` of the current lease: the optimistic-concurrency token.
    pub latest_heartbeat_at: Option<Timestamp>,
    pub stop_requested_at: Option<Timestamp>,
    pub stopped_at: Option<Timestamp>,
    pub metadata: Metadata,
    pub delivery: Option<Delivery>,
    pub owner_worker_id: Option<String>,
    pub lease_expires_at: Option<Timestamp>,
    pub ttl_seconds: u32,
    /// The greatest `last_heartbeat` ever handed out for this item, across requeues (D-30).
    pub heartbeat_floor: Option<Timestamp>,
    pub delivery_count: u32,
    pub requeue_count: u32,
    pub heartbeat_count: u64,
    /// SHA-256 (hex) of the session token minted by the current delivery; cleared when it must die.
    pub session_token_hash: Option<String>,
    /// The credential the current delivery was made to (the poller's environment key). Revoking it ends
    /// the session token too.
    #[serde(default)]
    pub session_token_issuer: Option<String>,
    /// Not to be delivered before this moment (Tether). Its session's previous item was stopped by
    /// someone other than the worker that held it, and that worker's program may run until the end
    /// of the lease it held (see [`Step::holder_may_run_until`]): a worker learns of such a stop only
    /// at its next heartbeat, and kills its program before its lease ends at the latest (§8). Only a
    /// queued item is held.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_before: Option<Timestamp>,
    /// Redeliveries since the item's last other transition. Past [`RECORDED_REDELIVERIES`] they get
    /// no history line each: a worker that polls the same item again and again without acking it
    /// (`reclaim_older_than_ms=0`) would otherwise grow the history without bound. The next other
    /// transition says how many went unrecorded.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub redeliveries_in_a_row: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// How many redeliveries in a row get a history line each (see [`WorkItem::redeliveries_in_a_row`]).
pub const RECORDED_REDELIVERIES: u32 = 10;

/// The result of an accepted operation: the item after it and the transitions on the way.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Step {
    pub item: WorkItem,
    pub transitions: Vec<Transition>,
    /// The step stopped an item whose lease had not run out, and nobody has said that the program
    /// behind that lease has ended: it may run until this moment, the lease's deadline. The session's
    /// next item waits for it (§7.3 rule 1 read as "one program per session", not only one live
    /// item). Set by every stop of a leased item (an archive, a delete, an operator's stop);
    /// [`Step::asked_by_holder`] clears it.
    pub holder_may_run_until: Option<Timestamp>,
}

impl Step {
    fn new(item: WorkItem, transitions: Vec<Transition>) -> Step {
        Step {
            item,
            transitions,
            holder_may_run_until: None,
        }
    }

    /// The step that changes nothing.
    pub fn unchanged(item: &WorkItem) -> Step {
        Step::new(item.clone(), Vec::new())
    }

    /// The step was asked for by the holder of the item's lease itself ([`Stopper::Holder`]). A
    /// worker stops its item once its program has ended (§8, step 5), so nothing of the lease runs
    /// on and the session's next item need not wait.
    pub fn asked_by_holder(mut self) -> Step {
        self.holder_may_run_until = None;
        self
    }

    /// Adds how the program ended ([`recorded_end`]) to the detail of the step's last transition:
    /// the stop that the session's error, if any, then explains.
    fn noting_the_programs_end(mut self) -> Step {
        if let (Some(end), Some(last)) = (recorded_end(&self.item), self.transitions.last_mut()) {
            last.detail = Some(match last.detail.take() {
                Some(detail) => format!("{detail}; {end}"),
                None => end,
            });
        }
        self
    }

    /// This step, then `next` (taken from this step's item): the item after both, the transitions
    /// of both in order. What may run on is `next`'s to say: it is the later word on the item.
    pub fn then(mut self, next: Step) -> Step {
        self.transitions.extend(next.transitions);
        Step {
            item: next.item,
            transitions: self.transitions,
            holder_may_run_until: next.holder_may_run_until,
        }
    }

    /// Whether anything must be written.
    pub fn changes(&self, before: &WorkItem) -> bool {
        &self.item != before
    }

    /// Notes who asked for the step (`asker`: the caller's credential in words, e.g. the server's
    /// `Principal::asker`) on each of its transitions, after the detail they already have. A
    /// transition's `worker_id` is the worker that held the item, which is not always who acted on
    /// it: a stop may come from the worker or from an operator.
    pub fn asked_by(mut self, asker: &str) -> Step {
        let asked = format!("asked for by {asker}");
        for transition in &mut self.transitions {
            let asked = asked.clone();
            transition.detail = Some(match transition.detail.take() {
                Some(detail) => format!("{detail}; {asked}"),
                None => asked,
            });
        }
        self
    }
}

/// Why an operation was refused. Each maps to one documented status code.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WorkError {
    /// 409: the item's state does not allow the operation.
    #[error("work item is {state}, which does not allow {operation}")]
    InvalidState {
        state: WorkState,
        operation: &'static str,
    },
    /// 409: another worker holds the delivery or the lease.
    #[error("work item is claimed by a different worker")]
    WorkerMismatch,
    /// 412: `expected_last_heartbeat` does not match, or a different Worker-ID heartbeats (D-7b).
    #[error("{reason}")]
    PreconditionFailed {
        reason: &'static str,
        current: CurrentLease,
    },
    /// 409: an ack without a delivery (D-6) of an item that is held (see [`WorkItem::not_before`]).
    #[error(
        "work item is held until {until}: the program of its session's previous item may run until then"
    )]
    Held { until: Timestamp },
    /// 409: a session token acts on an item it no longer holds. Its lease lapsed, settled by the
    /// very request (a token is judged live before the request waits its turn), or the item was
    /// stopped (an operator's force stop racing the worker's own) or handed out again since.
    #[error(
        "this session token no longer holds the work item: it was stopped, or its lease ran out \
         (and it may have been handed to another worker since)"
    )]
    NotHeld,
    /// Poll lost a race for this item (not an HTTP error: the poll tries the next candidate).
    #[error("work item is not claimable")]
    NotClaimable,
    /// 409: a stop asked to leave an open turn to the item's program (Tether's `unless_turn_open`)
    /// found the session's turn open ([`crate::session::may_stop`]). `turn` says which, so that a
    /// worker can tell a turn that came since it last ran its program again from the same one.
    #[error(
        "the session has a turn open that this item's program did not end (input that came while \
         it was ending): the stop was asked to leave it to the program"
    )]
    TurnOpen {
        session_updated_at: Timestamp,
        /// Which turn is open ([`crate::resources::Session::turns_started`]).
        turn: u64,
    },
    /// 400 on metadata limits.
    #[error(transparent)]
    Metadata(#[from] MetadataError),
}

/// What a 412 reports in `error.details.current_state`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CurrentLease {
    pub state: WorkState,
    pub ttl_seconds: u32,
    pub last_heartbeat: Option<Timestamp>,
}

impl CurrentLease {
    fn of(item: &WorkItem) -> CurrentLease {
        CurrentLease {
            state: item.state,
            ttl_seconds: item.ttl_seconds,
            last_heartbeat: item.latest_heartbeat_at,
        }
    }
}

/// The `expected_last_heartbeat` query parameter, parsed (D-29).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExpectedHeartbeat {
    /// Omitted: unconditional.
    Any,
    /// `NO_HEARTBEAT`: claim the first heartbeat of the current lease.
    None,
    /// The exact `last_heartbeat` of the previous response.
    At(Timestamp),
}

pub const NO_HEARTBEAT: &str = "NO_HEARTBEAT";

impl ExpectedHeartbeat {
    /// Parses the raw query value; `None` for anything that is neither the sentinel nor RFC 3339.
    pub fn parse(raw: Option<&str>) -> Option<ExpectedHeartbeat> {
        match raw {
            None => Some(ExpectedHeartbeat::Any),
            Some(NO_HEARTBEAT) => Some(ExpectedHeartbeat::None),
            Some(text) => Timestamp::parse_rfc3339(text).map(ExpectedHeartbeat::At),
        }
    }

    fn matches(self, item: &WorkItem) -> bool {
        match self {
            ExpectedHeartbeat::Any => true,
            ExpectedHeartbeat::None => item.latest_heartbeat_at.is_none(),
            ExpectedHeartbeat::At(t) => item.latest_heartbeat_at == Some(t),
        }
    }
}

/// What an accepted heartbeat answers (§2.4).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeartbeatReply {
    pub last_heartbeat: Timestamp,
    pub lease_extended: bool,
    pub state: WorkState,
    pub ttl_seconds: u32,
}

/// A fresh item for a session, in `queued`.
///
/// `not_before`: when the program of the session's previous item may run until (the session's
/// [`crate::resources::Session::next_item_not_before`]); the item is held until then. A moment
/// already past holds nothing.
pub fn enqueue(
    id: String,
    environment_id: String,
    data: WorkData,
    metadata: Metadata,
    now: Timestamp,
    not_before: Option<Timestamp>,
    policy: &LeasePolicy,
) -> Step {
    let not_before = not_before.filter(|t| *t > now);
    let item = WorkItem {
        id,
        environment_id,
        data,
        state: WorkState::Queued,
        created_at: now,
        enqueued_at: now,
        acknowledged_at: None,
        started_at: None,
        latest_heartbeat_at: None,
        stop_requested_at: None,
        stopped_at: None,
        metadata,
        delivery: None,
        owner_worker_id: None,
        lease_expires_at: None,
        ttl_seconds: policy.default_ttl_seconds,
        heartbeat_floor: None,
        delivery_count: 0,
        requeue_count: 0,
        heartbeat_count: 0,
        session_token_hash: None,
        session_token_issuer: None,
        not_before,
        redeliveries_in_a_row: 0,
    };
    let transition = Transition {
        at: now,
        from: None,
        to: WorkState::Queued,
        cause: Cause::Enqueued,
        worker_id: None,
        detail: not_before.map(|t| {
            format!("held until {t}: the program of the session's previous item may run until then")
        }),
    };
    check_invariants(&item);
    Step::new(item, vec![transition])
}

/// Whether a poll with this reclaim window may hand the item out now (§6.2 step 2).
pub fn is_claimable(item: &WorkItem, now: Timestamp, reclaim_older_than_ms: i64) -> bool {
    item.state == WorkState::Queued
        && !is_held(item, now)
        && match &item.delivery {
            None => true,
            Some(d) => d.delivered_at <= now.minus_millis(reclaim_older_than_ms),
        }
}

/// Whether the item may not be handed out yet (see [`WorkItem::not_before`]).
pub fn is_held(item: &WorkItem, now: Timestamp) -> bool {
    item.not_before.is_some_and(|t| t > now)
}

/// Poll delivery: records `{worker, now}`, the hash of the session token minted for it and the credential
/// it was minted under. The state stays `queued`. A previous delivery's token dies here (D-27).
pub fn deliver(
    item: &WorkItem,
    worker_id: Option<&str>,
    session_token_hash: String,
    issuer: Option<&str>,
    now: Timestamp,
    reclaim_older_than_ms: i64,
) -> Result<Step, WorkError> {
    if !is_claimable(item, now, reclaim_older_than_ms) {
        return Err(WorkError::NotClaimable);
    }
    let cause = if item.delivery.is_some() {
        Cause::Redelivered
    } else {
        Cause::Delivered
    };
    let mut next = item.clone();
    next.delivery = Some(Delivery {
        worker_id: worker_id.map(str::to_owned),
        delivered_at: now,
    });
    next.delivery_count += 1;
    next.session_token_hash = Some(session_token_hash);
    next.session_token_issuer = issuer.map(str::to_owned);
    if cause == Cause::Redelivered {
        next.redeliveries_in_a_row = item.redeliveries_in_a_row.saturating_add(1);
        if next.redeliveries_in_a_row > RECORDED_REDELIVERIES {
            check_invariants(&next);
            return Ok(Step::new(next, Vec::new()));
        }
    }
    Ok(finish(item, next, now, cause, worker_id, None))
}

/// Ack (§5.1, D-6, D-28).
pub fn ack(item: &WorkItem, worker_id: Option<&str>, now: Timestamp) -> Result<Step, WorkError> {
    let recorded = match item.state {
        WorkState::Queued => item.delivery.as_ref().and_then(|d| d.worker_id.as_deref()),
        WorkState::Starting | WorkState::Active => item.owner_worker_id.as_deref(),
        WorkState::Stopping | WorkState::Stopped => {
            return Err(WorkError::InvalidState {
                state: item.state,
                operation: "ack",
            });
        }
    };
    if let (Some(w), Some(r)) = (worker_id, recorded) {
        if w != r {
            return Err(WorkError::WorkerMismatch);
        }
    }
    if item.state != WorkState::Queued {
        return Ok(Step::unchanged(item));
    }
    // Only an ack without a delivery (D-6's implicit claim) can meet a held item: no poll hands one
    // out.
    if let Some(until) = item.not_before.filter(|_| is_held(item, now)) {
        return Err(WorkError::Held { until });
    }
    let mut next = item.clone();
    next.state = WorkState::Starting;
    next.not_before = None;
    next.acknowledged_at = Some(now);
    next.owner_worker_id = worker_id
        .map(str::to_owned)
        .or_else(|| recorded.map(str::to_owned));
    next.delivery = None;
    next.lease_expires_at = Some(now.plus_seconds(i64::from(item.ttl_seconds)));
    let owner = next.owner_worker_id.clone();
    Ok(finish(
        item,
        next,
        now,
        Cause::Acked,
        owner.as_deref(),
        None,
    ))
}

/// Heartbeat (§5.2, D-7b, D-8, D-30).
pub fn heartbeat(
    item: &WorkItem,
    expected: ExpectedHeartbeat,
    desired_ttl_seconds: Option<u32>,
    worker_id: Option<&str>,
    now: Timestamp,
    policy: &LeasePolicy,
) -> Result<(Step, HeartbeatReply), WorkError> {
    if !item.state.is_leased() {
        return Err(WorkError::InvalidState {
            state: item.state,
            operation: "heartbeat",
        });
    }
    if let (Some(w), Some(owner)) = (worker_id, item.owner_worker_id.as_deref()) {
        if w != owner {
            return Err(WorkError::PreconditionFailed {
                reason: "the work item is leased by a different worker",
                current: CurrentLease::of(item),
            });
        }
    }
    if !expected.matches(item) {
        let reason = match (expected, item.latest_heartbeat_at) {
            (ExpectedHeartbeat::None, Some(_)) => "a heartbeat was already recorded for this lease",
            (ExpectedHeartbeat::At(_), None) => "no heartbeat has been recorded for this lease yet",
            _ => "expected_last_heartbeat does not match the current lease",
        };
        return Err(WorkError::PreconditionFailed {
            reason,
            current: CurrentLease::of(item),
        });
    }
    let beat = match item.heartbeat_floor {
        Some(floor) if now <= floor => floor.next(),
        _ => now,
    };
    let ttl = policy.effective_ttl(desired_ttl_seconds, item.ttl_seconds);
    let mut next = item.clone();
    next.ttl_seconds = ttl;
    next.latest_heartbeat_at = Some(beat);
    next.heartbeat_floor = Some(beat);
    next.lease_expires_at = Some(beat.plus_seconds(i64::from(ttl)));
    next.heartbeat_count += 1;
    let step = if item.state == WorkState::Starting {
        next.state = WorkState::Active;
        next.started_at = Some(now);
        let owner = next.owner_worker_id.clone();
        finish(
            item,
            next,
            now,
            Cause::FirstHeartbeat,
            owner.as_deref(),
            None,
        )
    } else {
        check_invariants(&next);
        Step::new(next, Vec::new())
    };
    let reply = HeartbeatReply {
        last_heartbeat: beat,
        lease_extended: true,
        state: step.item.state,
        ttl_seconds: ttl,
    };
    Ok((step, reply))
}

/// What a worker asks of a claim ([`claim`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClaimRequest<'a> {
    pub worker_id: Option<&'a str>,
    /// The hash of the session token minted for the delivery.
    pub session_token_hash: String,
    /// The credential the token is minted under (it dies with it).
    pub issuer: Option<&'a str>,
    pub reclaim_older_than_ms: i64,
    pub desired_ttl_seconds: Option<u32>,
}

/// Claim (Tether's worker cycle, an extension: §11 allows extra endpoints): a poll's delivery, the
/// ack and the first heartbeat (`NO_HEARTBEAT`) in one step, as if the worker had sent the three
/// requests at the same instant. The item leaves the queue `active`, leased to the claimant, and
/// its history has the three transitions; every rule is the three operations' own, so that a claim
/// can do nothing they could not.
pub fn claim(
    item: &WorkItem,
    request: ClaimRequest<'_>,
    now: Timestamp,
    policy: &LeasePolicy,
) -> Result<(Step, HeartbeatReply), WorkError> {
    let delivered = deliver(
        item,
        request.worker_id,
        request.session_token_hash,
        request.issuer,
        now,
        request.reclaim_older_than_ms,
    )?;
    let acked = ack(&delivered.item, request.worker_id, now)?;
    let (started, reply) = heartbeat(
        &acked.item,
        ExpectedHeartbeat::None,
        request.desired_ttl_seconds,
        request.worker_id,
        now,
        policy,
    )?;
    debug_assert_eq!(started.item.state, WorkState::Active);
    Ok((delivered.then(acked).then(started), reply))
}

/// A claim asked again (Tether's idempotent claim: a retry whose first try committed but whose
/// answer was lost): the lease that claim started, as it stands, for the worker that made it. It
/// changes nothing, so asking again any number of times answers the same. The caller has found
/// `item` by the session token the claim minted, and has judged that token live (a lapsed lease
/// is not answered again: its item is on its way back to the queue).
pub fn claimed_lease(
    item: &WorkItem,
    worker_id: Option<&str>,
) -> Result<HeartbeatReply, WorkError> {
    let (true, Some(last_heartbeat)) = (item.state.is_leased(), item.latest_heartbeat_at) else {
        return Err(WorkError::InvalidState {
            state: item.state,
            operation: "claim",
        });
    };
    if item.owner_worker_id.as_deref() != worker_id {
        return Err(WorkError::WorkerMismatch);
    }
    Ok(HeartbeatReply {
        last_heartbeat,
        lease_extended: true,
        state: item.state,
        ttl_seconds: item.ttl_seconds,
    })
}

/// Who asks for a stop, as far as the session's next item is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stopper {
    /// The worker that holds the lease, ending its item once its program has ended (§8, step 5), or
    /// a caller not known to be anyone else: the credential alone does not always tell a worker's
    /// stop from an operator's (the Qoder dialect's workers and its operators hold the same org
    /// token).
    Holder,
    /// An operator, who says that the holder's program may still be running (Tether's
    /// `hold_next_item`): the worker learns of the stop only at its next heartbeat.
    Operator,
}

/// [`stop`], knowing who asks. An operator's stop of a leased item leaves the holder's program
/// running until the lease's deadline at the latest ([`Step::holder_may_run_until`]); the holder's
/// own comes after its program ended, and leaves nothing running.
pub fn stop_by(
    item: &WorkItem,
    force: bool,
    now: Timestamp,
    stopper: Stopper,
) -> Result<Step, WorkError> {
    let step = stop(item, force, now)?;
    Ok(match stopper {
        Stopper::Holder => step.asked_by_holder().noting_the_programs_end(),
        Stopper::Operator => step,
    })
}

/// The stop a worker sends with its next claim (Tether's claim with `stop`): its own forced stop of
/// the item whose program has ended ([`stop_by`] with `force` and [`Stopper::Holder`]), proven by
/// the item's session token (`token_hash`) as a stop sent with that token is: a token that no longer
/// holds the item (its lease ran out and it went back to the queue, or to another worker, or to this
/// one again under a new token) is refused ([`WorkError::NotHeld`]), so a worker late with its stop
/// cannot end another run. One difference, because the claim may be sent again: an item already
/// `stopped` is left as it is and counts as stopped, not refused (a try of the claim whose answer
/// was lost may have stopped it, and so may an operator meanwhile; either way what the worker asked
/// for holds).
pub fn stop_with_claim(
    item: &WorkItem,
    token_hash: &str,
    now: Timestamp,
) -> Result<Step, WorkError> {
    if item.state == WorkState::Stopped {
        return Ok(Step::unchanged(item));
    }
    held_by(item, token_hash)?;
    stop_by(item, true, now, Stopper::Holder)
}

/// The metadata key in which Tether's worker records its program's exit code, as a shell shows it
/// (128 + the signal for a program a signal ended).
pub const EXIT_CODE_KEY: &str = "tether.exit_code";
/// The metadata key for the signal that ended the program (`SIGKILL`), or absent.
pub const EXIT_SIGNAL_KEY: &str = "tether.signal";
/// The metadata key for the cap that ended a failed program (`--sandbox` limits), or absent.
pub const EXIT_REASON_KEY: &str = "tether.exit_reason";
/// The metadata keys in which Tether's worker records how its program ended, before it stops the
/// item (§8, step 5). The worker writes them and the server reads them back for a turn's error, so
/// both name them from here.
pub const EXIT_RECORD_KEYS: [&str; 3] = [EXIT_CODE_KEY, EXIT_SIGNAL_KEY, EXIT_REASON_KEY];

/// How the item's program ended, as its worker recorded it in the item's metadata
/// ([`EXIT_RECORD_KEYS`]), e.g. `its program ended: tether.exit_code=1`; `None` when nothing was
/// recorded (a worker of another make).
pub fn recorded_end(item: &WorkItem) -> Option<String> {
    let recorded: Vec<String> = EXIT_RECORD_KEYS
        .iter()
        .filter_map(|key| {
            item.metadata
                .get(*key)
                .map(|value| format!("{key}={value}"))
        })
        .collect();
    (!recorded.is_empty()).then(|| format!("its program ended: {}", recorded.join(", ")))
}

/// Cancel (§12.2) of a turn whose item no worker has started: a `queued` item (delivered or not:
/// a program starts only once its ack is accepted) is stopped, since nothing would read the
/// interrupt until some worker took the item, and the session stays `running` until then. `None`
/// for an item a worker has started: its program gets the interrupt and ends the turn itself.
pub fn interrupt_unstarted(item: &WorkItem, now: Timestamp) -> Option<Step> {
    (item.state == WorkState::Queued).then(|| {
        stop_now(
            item,
            now,
            Cause::SessionInterrupted,
            Some("the turn was cancelled before a worker started it"),
        )
    })
}

/// Stop (§5.3, D-7, D-7c, D-8), by someone who may not hold the lease: see [`stop_by`].
pub fn stop(item: &WorkItem, force: bool, now: Timestamp) -> Result<Step, WorkError> {
    match (item.state, force) {
        (WorkState::Stopped, _) => Err(WorkError::InvalidState {
            state: item.state,
            operation: "stop",
        }),
        (_, true) => Ok(stop_now(item, now, Cause::ForceStopped, None)),
        (WorkState::Queued, false) => Ok(stop_now(
            item,
            now,
            Cause::StopRequested,
            Some("stopped while queued: no worker held it"),
        )),
        (WorkState::Starting | WorkState::Active, false) => {
            let mut next = item.clone();
            next.state = WorkState::Stopping;
            next.stop_requested_at = Some(now);
            let owner = item.owner_worker_id.clone();
            Ok(finish(
                item,
                next,
                now,
                Cause::StopRequested,
                owner.as_deref(),
                None,
            ))
        }
        (WorkState::Stopping, false) => Ok(stop_now(item, now, Cause::StopConfirmed, None)),
    }
}

/// Force-stop for a reason outside the work API (session archived or deleted). `None` if already stopped.
pub fn force_stop_for(item: &WorkItem, now: Timestamp, cause: Cause) -> Option<Step> {
    item.state
        .is_live()
        .then(|| stop_now(item, now, cause, None))
}

fn stop_now(item: &WorkItem, now: Timestamp, cause: Cause, detail: Option<&str>) -> Step {
    debug_assert!(item.state.is_live());
    let mut next = item.clone();
    next.state = WorkState::Stopped;
    next.stop_requested_at = item.stop_requested_at.or(Some(now));
    next.stopped_at = Some(now);
    release(&mut next);
    let owner = item.owner_worker_id.clone();
    let mut step = finish(item, next, now, cause, owner.as_deref(), detail);
    step.holder_may_run_until = item
        .lease_expires_at
        .filter(|deadline| item.state.is_leased() && *deadline > now);
    step
}

/// Clears everything that lets a worker act on the item: delivery, lease and session token.
fn release(item: &mut WorkItem) {
    item.not_before = None;
    item.delivery = None;
    item.lease_expires_at = None;
    item.session_token_hash = None;
    item.session_token_issuer = None;
}

/// Whether the session token hashing to `token_hash` still holds `item`: an item carries its latest
/// delivery's token (D-27) until its lease lapses or it stops ([`lease_lapsed`]). Asked of the item
/// as it is once any lapsed lease is settled, so that a worker that lost its lease cannot stop, or
/// write the outcome into, the item that went back to the queue for another.
pub fn held_by(item: &WorkItem, token_hash: &str) -> Result<(), WorkError> {
    if item.session_token_hash.as_deref() == Some(token_hash) {
        Ok(())
    } else {
        Err(WorkError::NotHeld)
    }
}

/// Whether the item's lease has run out by `now`: the next look at it settles it
/// ([`expire_if_due`]). Its session token dies with it: a token is its lease's credential, and
/// the item is about to go back to the queue (or to stop), where the token has nothing to act on.
pub fn lease_lapsed(item: &WorkItem, now: Timestamp) -> bool {
    item.state.is_leased() && lease::is_expired(item.lease_expires_at, now)
}

/// Lazy expiry (§5.4, D-5): what a lapsed lease turns the item into, or `None` while the lease holds.
pub fn expire_if_due(item: &WorkItem, now: Timestamp, policy: &LeasePolicy) -> Option<Step> {
    if !lease_lapsed(item, now) {
        return None;
    }
    let deadline = item.lease_expires_at.expect("a leased item has a deadline");
    let owner = item.owner_worker_id.clone();
    let mut next = item.clone();
    if item.state == WorkState::Stopping {
        next.state = WorkState::Stopped;
        next.stopped_at = Some(deadline);
        release(&mut next);
        return Some(finish(
            item,
            next,
            now,
            Cause::LeaseExpiredStopped,
            owner.as_deref(),
            None,
        ));
    }
    if item.requeue_count >= policy.max_requeues {
        next.state = WorkState::Stopped;
        next.stop_requested_at = item.stop_requested_at.or(Some(now));
        next.stopped_at = Some(now);
        release(&mut next);
        let detail = format!("lease expired after {} requeues", item.requeue_count);
        return Some(finish(
            item,
            next,
            now,
            Cause::PoisonStopped,
            owner.as_deref(),
            Some(&detail),
        ));
    }
    next.state = WorkState::Queued;
    next.enqueued_at = now;
    next.acknowledged_at = None;
    next.started_at = None;
    next.latest_heartbeat_at = None;
    next.stop_requested_at = None;
    next.owner_worker_id = None;
    next.requeue_count += 1;
    release(&mut next);
    Some(finish(
        item,
        next,
        now,
        Cause::LeaseExpiredRequeued,
        owner.as_deref(),
        None,
    ))
}

/// Lease amnesty at server start (§3.1). `None` when the lease is far enough out already.
pub fn grant_amnesty(item: &WorkItem, now: Timestamp, grace_millis: i64) -> Option<WorkItem> {
    hold_lease(item, now.plus_millis(grace_millis))
}

/// Metadata merge-patch, allowed in every state (D-10).
pub fn patch_metadata(item: &WorkItem, patch: &MetadataPatch) -> Result<Step, WorkError> {
    let merged = metadata::merge(&item.metadata, patch)?;
    let mut next = item.clone();
    next.metadata = merged;
    Ok(Step::new(next, Vec::new()))
}

/// An operator's requeue of a stopped item (Tether extension, §11): what it changes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Requeue {
    /// The stopped item, unchanged but for a `requeued` line in its history (stopped → stopped).
    pub stopped: Step,
    /// The session's fresh item, in `queued`, whose history says whose requeue made it.
    pub fresh: Step,
}

/// Who asks for a requeue and what is known about the item's past, for [`requeue`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequeueRequest<'a> {
    /// The id for the fresh item.
    pub fresh_id: String,
    /// Who asks, as a history names an asker: "admin token tok_…" (see [`Step::asked_by`]).
    pub by: &'a str,
    /// Why, in the operator's words.
    pub reason: Option<&'a str>,
    /// Whether the item's history already has a `requeued` line (it was requeued once).
    pub already_requeued: bool,
    /// The session's [`crate::resources::Session::next_item_not_before`]: the fresh item is held
    /// until then, as any of the session's items is.
    pub not_before: Option<Timestamp>,
}

/// Requeue (Tether extension): a `stopped` item stays stopped — `stopped` is final (§5), and D-33's
/// "same id" is about lease expiry — so the session gets a fresh queued item with the same work data
/// and metadata, and the old item's history records who requeued it, why, and as which item. An item
/// is requeued once at most; a live item cannot be requeued (stop it first).
pub fn requeue(
    item: &WorkItem,
    request: RequeueRequest<'_>,
    now: Timestamp,
    policy: &LeasePolicy,
) -> Result<Requeue, WorkError> {
    if item.state != WorkState::Stopped {
        return Err(WorkError::InvalidState {
            state: item.state,
            operation: "requeue",
        });
    }
    if request.already_requeued {
        // Its history names the fresh item; that one is the item to act on now.
        return Err(WorkError::InvalidState {
            state: item.state,
            operation: "another requeue",
        });
    }
    let because = request
        .reason
        .map(str::trim)
        .filter(|r| !r.is_empty())
        .map(|r| format!(": {r}"))
        .unwrap_or_default();
    let mut fresh = enqueue(
        request.fresh_id,
        item.environment_id.clone(),
        item.data.clone(),
        item.metadata.clone(),
        now,
        request.not_before,
        policy,
    );
    let requeue_of = format!("requeue of {} by {}{because}", item.id, request.by);
    let detail = &mut fresh.transitions[0].detail;
    *detail = Some(match detail.take() {
        Some(held) => format!("{requeue_of}; {held}"),
        None => requeue_of,
    });
    let stopped = Step::new(
        item.clone(),
        vec![Transition {
            at: now,
            from: Some(WorkState::Stopped),
            to: WorkState::Stopped,
            cause: Cause::Requeued,
            worker_id: None,
            detail: Some(format!(
                "requeued as {} by {}{because}",
                fresh.item.id, request.by
            )),
        }],
    );
    Ok(Requeue { stopped, fresh })
}

/// Runs lazy expiry first, then `op` on the result. The expiry, if any, must be persisted even when the
/// operation is refused; hence both parts are returned.
pub struct Evaluation<T> {
    pub expired: Option<Step>,
    pub outcome: Result<T, WorkError>,
}

pub fn evaluate<T>(
    item: &WorkItem,
    now: Timestamp,
    policy: &LeasePolicy,
    op: impl FnOnce(&WorkItem) -> Result<T, WorkError>,
) -> Evaluation<T> {
    let expired = expire_if_due(item, now, policy);
    let current = expired.as_ref().map_or(item, |s| &s.item);
    let outcome = op(current);
    Evaluation { expired, outcome }
}

/// The item with its lease running until `until` at least: an amnesty ([`grant_amnesty`]), or a
/// lapsed lease that another server process's promise holds (`lease::expiry_held_until`), which
/// every operation then judges as the live lease it is for that worker (a stop holds the
/// session's next item until then), and a write keeps, as an amnesty's. `None` when the item holds
/// no lease due before.
pub fn hold_lease(item: &WorkItem, until: Timestamp) -> Option<WorkItem> {
    if !item.state.is_leased() {
        return None;
    }
    let deadline = lease::deadline_at_least(item.lease_expires_at, until)?;
    let mut held = item.clone();
    held.lease_expires_at = Some(deadline);
    Some(held)
}

/// Concatenates an expiry step with the step of the operation that followed it.
pub fn chain(expired: Option<Step>, then: Step) -> Step {
    match expired {
        None => then,
        Some(first) => {
            // An expiry never leaves a program running (its lease is over); only `then` can.
            debug_assert!(first.holder_may_run_until.is_none());
            first.then(then)
        }
    }
}

fn finish(
    before: &WorkItem,
    mut next: WorkItem,
    now: Timestamp,
    cause: Cause,
    worker_id: Option<&str>,
    detail: Option<&str>,
) -> Step {
    let mut detail = detail.map(str::to_owned);
    if cause != Cause::Redelivered {
        let unrecorded = before
            .redeliveries_in_a_row
            .saturating_sub(RECORDED_REDELIVERIES);
        if unrecorded > 0 {
            let note = format!("after {unrecorded} more redeliveries, not recorded one by one");
            detail = Some(match detail {
                Some(detail) => format!("{note}; {detail}"),
                None => note,
            });
        }
        next.redeliveries_in_a_row = 0;
    }
    check_invariants(&next);
    let transition = Transition {
        at: now,
        from: Some(before.state),
        to: next.state,
        cause,
        worker_id: worker_id.map(str::to_owned),
        detail,
    };
    Step::new(next, vec![transition])
}

/// The field invariants of §2.3, plus the bookkeeping that goes with them. Violations are bugs.
pub fn invariant_violation(item: &WorkItem) -> Option<&'static str> {
    use WorkState::*;
    let checks: [(bool, &'static str); 11] = [
        (
            item.state != Queued || item.acknowledged_at.is_none(),
            "queued item has acknowledged_at",
        ),
        (
            item.state != Queued || item.started_at.is_none(),
            "queued item has started_at",
        ),
        (
            item.state != Queued || item.latest_heartbeat_at.is_none(),
            "queued item has latest_heartbeat_at",
        ),
        (
            item.state != Queued || item.stopped_at.is_none(),
            "queued item has stopped_at",
        ),
        (
            item.state != Starting || (item.acknowledged_at.is_some() && item.started_at.is_none()),
            "starting item stamps",
        ),
        (
            item.state != Active
                || (item.acknowledged_at.is_some()
                    && item.started_at.is_some()
                    && item.latest_heartbeat_at.is_some()),
            "active item stamps",
        ),
        (
            item.state != Stopping || item.stop_requested_at.is_some(),
            "stopping item without stop_requested_at",
        ),
        (
            item.state != Stopped || item.stopped_at.is_some(),
            "stopped item without stopped_at",
        ),
        (
            item.state.is_leased() == item.lease_expires_at.is_some(),
            "lease deadline exists iff leased",
        ),
        (
            item.state == Queued || item.delivery.is_none(),
            "only queued items carry a delivery",
        ),
        (
            item.state == Queued || item.not_before.is_none(),
            "only queued items are held",
        ),
    ];
    checks.iter().find(|(ok, _)| !ok).map(|(_, what)| *what)
}

fn check_invariants(item: &WorkItem) {
    if let Some(what) = invariant_violation(item) {
        panic!("work item invariant violated: {what}: {item:?}");
    }
}

#[cfg(test)]
mod requeue_tests {
    use super::*;

    fn policy() -> LeasePolicy {
        LeasePolicy {
            max_requeues: 1,
            ..LeasePolicy::default()
        }
    }

    /// A fresh queued item `id` of session `sesn_1`, enqueued at `t0`.
    fn queued(id: &str, t0: Timestamp) -> WorkItem {
        let data = WorkData::session("sesn_1");
        enqueue(
            id.into(),
            "env_1".into(),
            data,
            Metadata::new(),
            t0,
            None,
            &policy(),
        )
        .item
    }

    /// An item delivered, acked and left to expire until it is stopped as poison.
    fn poisoned(t0: Timestamp) -> WorkItem {
        let policy = policy();
        let mut item = queued("work_old", t0);
        let mut now = t0;
        for _ in 0..=policy.max_requeues {
            item = deliver(&item, Some("w"), "hash".into(), None, now, 5_000)
                .unwrap()
                .item;
            item = ack(&item, Some("w"), now).unwrap().item;
            now = now.plus_millis(120_000);
            item = expire_if_due(&item, now, &policy).unwrap().item;
        }
        assert_eq!(item.state, WorkState::Stopped);
        item
    }

    fn request(already_requeued: bool) -> RequeueRequest<'static> {
        RequeueRequest {
            fresh_id: "work_new".into(),
            by: "admin token tok_admin",
            reason: Some("fixed the agent"),
            already_requeued,
            not_before: None,
        }
    }

    #[test]
    fn a_stopped_item_gives_its_session_a_fresh_queued_item() {
        let t0 = Timestamp::from_millis(1_700_000_000_000);
        let old = poisoned(t0);
        let now = t0.plus_millis(3_600_000);
        let r = requeue(&old, request(false), now, &policy()).unwrap();
        assert_eq!(
            r.stopped.item, old,
            "the stopped item itself does not change"
        );
        let line = &r.stopped.transitions[0];
        assert_eq!(
            (line.from, line.to, line.cause),
            (
                Some(WorkState::Stopped),
                WorkState::Stopped,
                Cause::Requeued
            )
        );
        assert_eq!(
            line.detail.as_deref(),
            Some("requeued as work_new by admin token tok_admin: fixed the agent")
        );
        let fresh = &r.fresh.item;
        assert_eq!(
            (fresh.id.as_str(), fresh.state),
            ("work_new", WorkState::Queued)
        );
        assert_eq!(
            (&fresh.data, &fresh.metadata, &fresh.environment_id),
            (&old.data, &old.metadata, &old.environment_id)
        );
        assert_eq!(
            (fresh.requeue_count, fresh.delivery_count, fresh.enqueued_at),
            (0, 0, now)
        );
        let first = &r.fresh.transitions[0];
        assert_eq!(first.cause, Cause::Enqueued);
        assert_eq!(
            first.detail.as_deref(),
            Some("requeue of work_old by admin token tok_admin: fixed the agent")
        );
    }

    #[test]
    fn only_stopped_items_never_requeued_before_may_be_requeued() {
        let t0 = Timestamp::from_millis(1_700_000_000_000);
        let policy = policy();
        let queued = queued("work_q", t0);
        let starting = ack(
            &deliver(&queued, None, "h".into(), None, t0, 0)
                .unwrap()
                .item,
            None,
            t0,
        )
        .unwrap()
        .item;
        let stopping = stop(&starting, false, t0).unwrap().item;
        let cases: [(&WorkItem, bool, Option<&str>); 5] = [
            (&queued, false, Some("requeue")),
            (&starting, false, Some("requeue")),
            (&stopping, false, Some("requeue")),
            (&poisoned(t0), true, Some("another requeue")),
            (&poisoned(t0), false, None),
        ];
        for (item, already, refused) in cases {
            let got = requeue(item, request(already), t0, &policy);
            match refused {
                None => assert!(got.is_ok(), "{:?} refused: {got:?}", item.state),
                Some(operation) => assert_eq!(
                    got.unwrap_err(),
                    WorkError::InvalidState {
                        state: item.state,
                        operation
                    },
                ),
            }
        }
        let mut silent = request(false);
        silent.reason = Some("  ");
        let r = requeue(&poisoned(t0), silent, t0, &policy).unwrap();
        assert_eq!(
            r.fresh.transitions[0].detail.as_deref(),
            Some("requeue of work_old by admin token tok_admin")
        );
    }
}

//! The work queue: poll, ack, heartbeat, stop, metadata, listing, stats, history, expiry and amnesty.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use tether_core::ids::{self, IdKind};
use tether_core::resources::{Environment, Session};
use tether_core::session;
use tether_core::work::{self, ExpectedHeartbeat, HeartbeatReply, Step, WorkData};
use tether_core::{Timestamp, WorkError, WorkItem, WorkState};
use tether_store::{
    Candidate, ChangeSet, ClaimWindow, HistoryRow, Page, PageRequest, QueueCounts, Versioned,
    WorkFilter, Write,
};

use super::events::apply_coupling;
use super::spare_candidates::{self, SpareCandidates};
use super::tokens::Principal;
use super::worker_records::Record;
use super::{App, Error, Missing, Result, Retry, SessionOfItem};
use crate::credentials;

/// A poll's catch: the item and the session token minted for this delivery.
pub struct Claimed {
    pub item: WorkItem,
    pub session_token: String,
    /// The lease a claim ([`Taking::Start`]) started: what its first heartbeat answered.
    pub lease: Option<HeartbeatReply>,
    /// The item is the one an earlier try of this claim took ([`App::claim`]): its lease began
    /// when that try committed, not when this one was sent.
    pub earlier_try: bool,
}

/// What a poll does with the item it finds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Taking<'a> {
    /// Delivers it (§6.2): the worker acks it and heartbeats in requests of its own.
    Deliver,
    /// Claims it (`work::claim`): delivery, ack and first heartbeat in one write, as `ask` says.
    Start(ClaimAsk<'a>),
}

impl Taking<'_> {
    /// The session token this take must hand out, when it is not a fresh one.
    fn named_token(&self) -> Option<&str> {
        match self {
            Taking::Start(ClaimAsk {
                keyed: Some(keyed), ..
            }) => Some(keyed.session_token),
            _ => None,
        }
    }
}

/// What a claim asks for beyond a poll's parameters (Tether's claim).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClaimAsk<'a> {
    /// The lease length wanted, as a heartbeat's.
    pub desired_ttl_seconds: Option<u32>,
    /// A claim sent with an `Idempotency-Key`, which can be sent again; `None`: the claim hands
    /// out a fresh session token, and a try of it sent again would be a claim anew.
    pub keyed: Option<KeyedTry<'a>>,
}

/// One try of a claim that can be sent again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeyedTry<'a> {
    /// The session token every try of the claim hands out (`credentials::claim_token`, from the
    /// claim's `Idempotency-Key`).
    pub session_token: &'a str,
    pub sent: TrySent,
}

/// Which try of a claim this is (`retry`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TrySent {
    /// The first (`retry` absent or `false`): nothing is looked up before the queue is scanned.
    First,
    /// Sent again after a try whose answer was not heard (`retry=true`): answers what an earlier
    /// try took, and otherwise claims as a first try would.
    Again,
    /// Sent again by a worker that takes no new work (`retry=only`, a worker draining): answers
    /// what an earlier try took, and otherwise nothing, at once, without scanning the queue.
    AgainTakingNothing,
}

/// Observes `from` to `to` in `histogram`, one of the pace histograms of §11.4 (enqueue to
/// delivery, delivery to ack, ack to first heartbeat).
fn record_pace(histogram: &'static str, from: Timestamp, to: Timestamp) {
    metrics::histogram!(histogram).record(to.millis_since(from).max(0) as f64 / 1000.0);
}

/// Queue statistics (§2.5).
pub struct QueueStats {
    pub counts: QueueCounts,
    pub workers_polling: u64,
}

/// What must happen once a change set is committed: whom to wake.
#[derive(Default)]
pub struct Effects {
    pub claimable: Vec<String>,
    pub sessions: Vec<String>,
}

/// What an item operation reads before it decides.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ItemRead {
    /// The item alone: its session is read afterwards, only if a step touches it.
    Item,
    /// The item and its session in one read, for operations whose steps usually change the session
    /// (ack, stop, a lease's expiry): one round trip to the store instead of two.
    ItemAndSession,
}

/// The session an operation read with its item, if it did ([`ItemRead`]). Only a starting point: the
/// session's write is conditional on the version read, as when it is read later.
enum SessionAhead {
    Unread,
    Read(Option<Box<Versioned<Session>>>),
}

/// What a stop asks for (`POST …/stop`).
#[derive(Clone, Copy, Debug, Default)]
pub struct StopAsk {
    /// At once, from any live state; otherwise a graceful request or its confirmation.
    pub force: bool,
    /// Hold the session's next item until the stopped lease's deadline (`Stopper`).
    pub hold_next_item: bool,
    /// Refuse (`WorkError::TurnOpen`) while the session has a turn open.
    pub unless_turn_open: bool,
}

/// About the size of `item` as JSON, for the memory of written records, without writing it out (a
/// work item is written four times per cycle): its fixed fields take well under 1 KB, and what varies
/// is its metadata (at most 16 keys) and a few ids.
pub(super) fn item_weight(item: &WorkItem, _most: usize) -> usize {
    let text = |s: &Option<String>| s.as_ref().map_or(0, String::len);
    1024 + item
        .metadata
        .iter()
        .map(|(key, value)| key.len() + value.len() + 8)
        .sum::<usize>()
        + text(&item.owner_worker_id)
        + text(&item.session_token_issuer)
}

/// Where an attempt of an item operation started from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Start {
    /// The item as this process last wrote it (`crate::cache::WrittenRecords`).
    Remembered,
    /// A read made by this attempt.
    Read,
}

/// The most candidates a poll reads at once.
const CLAIM_BATCH: u32 = 64;
/// Candidates a poll reads beyond the items this process's other polls are taking right now: those
/// head the queue until their delivery commits, and the poll steps past them without a conflict.
/// On a store other servers share, the spare rows are for their claims, which this process cannot
/// see until they commit, and for commits landing meanwhile.
const CLAIM_SPARE: u32 = 8;
/// [`CLAIM_SPARE`] on a store no other process writes: every claim is this process's, reserved
/// (and counted) before it writes, or remembered at its version once committed, so the spare rows
/// cover only the claims that reserve between the count and the read. A poll that finds all its
/// candidates taken reads again, which costs the embedded store no round trip; reading the six
/// rows fewer took the candidates' read from 10 % to 8 % of the server's CPU in a claim cycle
/// (`perf`, B on SQLite).
const CLAIM_SPARE_ALONE: u32 = 2;
/// Items one expiry pass handles at most; the next tick takes the rest.
const EXPIRY_BATCH: u32 = 256;
/// Poll records one commit writes at most.
const WORKER_RECORDS_PER_COMMIT: usize = 1_000;
/// Poll records that may wait in memory for the next tick (beyond it a poll is not recorded; the
/// worker's next poll after the record interval is).
const MAX_UNWRITTEN_WORKER_RECORDS: usize = 100_000;
/// How far back `GET …/workers` (§11.4) looks for polls.
pub const WORKERS_LISTED_MS: i64 = 5 * 60 * 1000;

/// A sixth of the `workers_polling` window, between 1 and 5 s: a worker polling now and then is
/// still counted by a window that ends any time before its next record.
pub fn worker_record_interval_ms(workers_polling_window_ms: i64) -> i64 {
    (workers_polling_window_ms / 6).clamp(1_000, 5_000)
}

/// How long a poll record is read by anyone: the listing's window or the `workers_polling` one.
pub fn workers_window_ms(workers_polling_window_ms: i64) -> i64 {
    WORKERS_LISTED_MS.max(workers_polling_window_ms)
}

/// What this process's polls know of the items they take.
#[derive(Default)]
pub(crate) struct Claims {
    /// Items some poll is committing a delivery for.
    taking: HashSet<String>,
    /// What earlier reads left for the next claims.
    spare: SpareCandidates,
}

impl Claims {
    /// Whether a poll may take the candidate it read at `version`, given the version this process
    /// last wrote of it (`written_here`, from `crate::cache::WrittenRecords`): nobody here is taking
    /// it, and no write here (a delivery, most often) made a later version. A poll whose candidates
    /// were read before such a write committed holds an older version of the item: it passes it
    /// over instead of sending a conditional write that can only conflict (with 16 polls at once,
    /// about one delivery in five did). Only a hint: the conditional write still decides. Marks the
    /// item taken when so.
    fn take(&mut self, work_id: &str, version: i64, written_here: Option<i64>) -> bool {
        if written_here.is_some_and(|written| written > version) {
            return false;
        }
        self.taking.insert(work_id.to_owned())
    }
}

/// A candidate a claim of this process is taking, kept from the others until dropped.
struct Reservation<'a> {
    app: &'a App,
    id: String,
    /// The claim knows what became of the candidate: taken, refused by the core, or its write lost
    /// a race (after which the claim forgets its environment's left-overs itself).
    settled: bool,
}

impl<'a> Reservation<'a> {
    /// The reservation of an item `Claims::take` has just marked taken.
    fn of(app: &'a App, work_id: &str) -> Self {
        Reservation {
            app,
            id: work_id.to_owned(),
            settled: false,
        }
    }

    fn settle(mut self) {
        self.settled = true;
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        let mut claims = self.app.claiming.lock().expect("claiming lock");
        claims.taking.remove(&self.id);
        if !self.settled {
            // Its write failed or its client went away: the candidate may still be claimable, and
            // reads made meanwhile passed it over, leaving younger candidates behind.
            claims.spare.forget_all();
        }
    }
}

impl App {
    /// The environment of a work endpoint: 404 when absent, 400 when it has no queue (§6).
    /// It comes from [`Self::recent_environment`]: every work request (an idle worker's re-poll among
    /// them) takes one.
    pub async fn work_environment(&self, environment_id: &str) -> Result<Arc<Environment>> {
        let env = self.recent_environment(environment_id).await?;
        if !env.is_self_hosted() {
            return Err(Error::invalid(
                "environment_id",
                "the environment is not self_hosted, so it has no work queue",
            ));
        }
        Ok(env)
    }

    pub(super) async fn load_item(
        &self,
        environment_id: &str,
        work_id: &str,
    ) -> Result<Versioned<WorkItem>, Retry> {
        Ok(self
            .load_item_for(environment_id, work_id, ItemRead::Item)
            .await?
            .0)
    }

    /// The item of an operation, with its session when `read` asks for it.
    async fn load_item_for(
        &self,
        environment_id: &str,
        work_id: &str,
        read: ItemRead,
    ) -> Result<(Versioned<WorkItem>, SessionAhead), Retry> {
        if !ids::is_well_formed(IdKind::Work, work_id) {
            return Err(not_found_work(work_id).into());
        }
        let found = match read {
            ItemRead::Item => self
                .store
                .get_work(work_id)
                .await?
                .map(|item| (item, SessionAhead::Unread)),
            ItemRead::ItemAndSession => self
                .store
                .get_work_with_session(work_id)
                .await?
                .map(|(item, session)| (item, SessionAhead::Read(session.map(Box::new)))),
        };
        match found {
            Some((item, session)) if item.value.environment_id == environment_id => {
                Ok((item, session))
            }
            _ => Err(not_found_work(work_id).into()),
        }
    }

    /// The item of an operation, and its session when `read` asks for it, as this process last wrote
    /// them (`crate::cache::WrittenRecords`); `None` when it does not remember them all.
    fn remembered_item_for(
        &self,
        environment_id: &str,
        work_id: &str,
        read: ItemRead,
    ) -> Option<(Versioned<WorkItem>, SessionAhead)> {
        let item = self.written_items.get(work_id)?;
        if item.value.environment_id != environment_id {
            return None;
        }
        let session = match read {
            ItemRead::Item => SessionAhead::Unread,
            ItemRead::ItemAndSession => self.remembered_session_of(&item.value)?,
        };
        Some((item, session))
    }

    /// The session of `item` as this process last wrote it (`crate::cache::WrittenRecords`);
    /// `None` when it does not remember it. Only a starting point, as any read: the coupling's
    /// write is conditional on its version, and a refused write forgets it (`App::commit`).
    fn remembered_session_of(&self, item: &WorkItem) -> Option<SessionAhead> {
        let session = self.written_sessions.get(item.data.session_id()?)?;
        Some(SessionAhead::Read(Some(Box::new(session))))
    }

    /// Runs `op` on the item after lazy expiry, commits the result with its session effects, and retries
    /// from a fresh read when the item changed underneath. An expiry is committed even when `op` refuses.
    ///
    /// An attempt starts from the item as this process last wrote it, when it remembers it, and reads
    /// only when it does not: most operations on an item follow one made here a moment before. Such a
    /// start answers only through a conditional write that succeeds, which proves it was current; an
    /// outcome that writes nothing (a refusal, an expiry, an unchanged item) is decided again from a
    /// fresh read.
    ///
    /// An operation that may change the item's session (`ItemRead::ItemAndSession`) retries in the
    /// session's turn once it has lost a race ([`App::with_retries_then_session_turn`]).
    pub async fn run_item_op<T>(
        &self,
        environment_id: &str,
        work_id: &str,
        read: ItemRead,
        op: impl Fn(&WorkItem, Timestamp) -> Result<(Step, T), WorkError>,
    ) -> Result<(WorkItem, T)> {
        self.run_item_op_seeing_session(environment_id, work_id, read, |item, _, now| op(item, now))
            .await
    }

    /// [`Self::run_item_op`] whose `op` also sees the item's session as the step's coupling judges
    /// it (with `ItemRead::ItemAndSession`; `None` otherwise): the write stands only if the session
    /// is still as seen, so a decision that looked at it is as atomic as the write.
    pub async fn run_item_op_seeing_session<T>(
        &self,
        environment_id: &str,
        work_id: &str,
        read: ItemRead,
        op: impl Fn(&WorkItem, Option<&Session>, Timestamp) -> Result<(Step, T), WorkError>,
    ) -> Result<(WorkItem, T)> {
        let session_of_item = SessionOfItem::default();
        let note_session = |item: &WorkItem| {
            if read == ItemRead::ItemAndSession {
                session_of_item.note(item);
            }
        };
        let attempt = || async {
            let losses = self.store.losses();
            let mut recalled = None;
            if let Some((current, session)) =
                self.remembered_item_for(environment_id, work_id, read)
            {
                note_session(&current.value);
                recalled = Some(current.version);
                if let Some(done) = self
                    .decide_item_op(current, session, Start::Remembered, losses, &op)
                    .await?
                {
                    return Ok(done);
                }
            }
            let (current, session) = self.load_item_for(environment_id, work_id, read).await?;
            note_session(&current.value);
            if recalled.is_some_and(|version| version != current.version) {
                // Written elsewhere since: the next operation would only send a write to be refused.
                self.written_items.forget(work_id);
            }
            let done = self
                .decide_item_op(current, session, Start::Read, losses, &op)
                .await?;
            Ok(done.expect("a decision from a fresh read is always answered"))
        };
        self.with_retries_then_session_turn(&session_of_item, attempt)
            .await
    }

    /// One attempt of [`Self::run_item_op`] from `current`: `Ok(None)` when it started from memory
    /// and its outcome would write nothing, so that it must be decided again from a read. `losses` is
    /// the store's count of lost connections from before `current` was read or recalled.
    async fn decide_item_op<T>(
        &self,
        current: Versioned<WorkItem>,
        session: SessionAhead,
        start: Start,
        losses: u64,
        op: &impl Fn(&WorkItem, Option<&Session>, Timestamp) -> Result<(Step, T), WorkError>,
    ) -> Result<Option<(WorkItem, T)>, Retry> {
        if self.amnesty_after_outage().await? {
            // Deadlines may have moved: decide from a fresh read.
            return Err(Retry::Conflict);
        }
        let now = self.now();
        // A lapsed lease that another server's promise holds is judged as the live lease it is.
        let held = self.held_lease(&current.value, now).await?;
        let judged = held.as_ref().unwrap_or(&current.value);
        let seen = match &session {
            SessionAhead::Read(Some(session)) => Some(&session.value),
            _ => None,
        };
        let evaluation =
            work::evaluate(judged, now, &self.config.lease, |item| op(item, seen, now));
        if evaluation.expired.is_some() && self.store.losses() != losses {
            // The database was lost after this read: a worker may have been told (503 with the
            // amnesty promise) that its lease will outlast the outage. Decide after the amnesty
            // that follows the reconnection, from a read made then.
            return Err(Retry::Conflict);
        }
        let remembered = start == Start::Remembered;
        if remembered && evaluation.expired.is_some() {
            // A lease is settled from a read: after an outage, only a call that reaches the store
            // counts the reconnection, and the amnesty above must have seen it before any expiry.
            return Ok(None);
        }
        match evaluation.outcome {
            Ok((step, extra)) => {
                let step = work::chain(evaluation.expired, step);
                if remembered && !step.changes(&current.value) {
                    return Ok(None);
                }
                self.commit_step(&current, session, &step, now).await?;
                Ok(Some((step.item, extra)))
            }
            Err(_) if remembered => Ok(None),
            Err(refusal) => {
                if let Some(expired) = evaluation.expired {
                    self.commit_step(&current, session, &expired, now).await?;
                }
                Err(Retry::Fail(refusal.into()))
            }
        }
    }

    /// Commits a step taken from `before` (if it changed anything), with its session coupling.
    async fn commit_step(
        &self,
        before: &Versioned<WorkItem>,
        session: SessionAhead,
        step: &Step,
        now: Timestamp,
    ) -> Result<(), Retry> {
        if !step.changes(&before.value) {
            return Ok(());
        }
        let mut changes = ChangeSet::new();
        let mut effects = Effects::default();
        changes.push(Write::UpdateWork {
            item: step.item.clone(),
            expected_version: before.version,
            transitions: step.transitions.clone(),
            session_version: None,
        });
        // Only what enters the queue is news to its waiters: a claim's delivery (queued to queued)
        // takes an item out of it.
        let enters_queue = |t: &tether_core::Transition| {
            t.to == WorkState::Queued && t.from != Some(WorkState::Queued)
        };
        if step.transitions.iter().any(enters_queue) {
            effects.claimable.push(step.item.environment_id.clone());
        }
        let unchanged_session = self
            .couple_session(step, session, now, &mut changes, &mut effects)
            .await?;
        if let Some(Write::UpdateWork {
            session_version, ..
        }) = changes.writes.first_mut()
        {
            // The coupling judged the session (perhaps as remembered, perhaps read a while ago) and
            // left it as it was: the item's write stands only if the session is still as judged.
            *session_version = unchanged_session;
        }
        self.commit(changes).await?;
        self.after_commit(effects, step).await;
        Ok(())
    }

    async fn after_commit(&self, effects: Effects, step: &Step) {
        self.announce_claimable(&effects.claimable).await;
        for session in &effects.sessions {
            self.announce_session(session).await;
        }
        if step.transitions.iter().any(|t| {
            matches!(
                t.cause,
                tether_core::Cause::Acked
                    | tether_core::Cause::StopRequested
                    | tether_core::Cause::StopConfirmed
                    | tether_core::Cause::ForceStopped
            )
        }) {
            // §3.1: ack, stop and requeue run a dispatcher pass at once.
            self.dispatch_now.notify_one();
        }
    }

    /// Applies §7.3/§12.4 to the transitions of a step: session status, server events, and a fresh item
    /// for input that waited while the old item was stopping. Returns the version of a session it
    /// judged and left unchanged, which the item's write is then conditional on.
    async fn couple_session(
        &self,
        step: &Step,
        session: SessionAhead,
        now: Timestamp,
        changes: &mut ChangeSet,
        effects: &mut Effects,
    ) -> Result<Option<i64>, Retry> {
        if !step.transitions.iter().any(session::touches_session) {
            return Ok(None);
        }
        let Some(session_id) = step.item.data.session_id() else {
            return Ok(None);
        };
        // The session read with the item is the one the item names (the join is on the item's
        // `session_id` column); anything else is read now rather than taken for absent, so that a
        // mismatch can never skip the coupling.
        let session = match session {
            SessionAhead::Read(Some(session)) if session.value.id == session_id => Some(*session),
            SessionAhead::Read(None) => None,
            SessionAhead::Read(Some(_)) | SessionAhead::Unread => {
                self.store.get_session(session_id).await?
            }
        };
        let Some(session) = session else {
            return Ok(None);
        };
        let mut next = session.value.clone();
        let coupling = session::couple(next.status, next.pending_input, &step.transitions);
        let hold =
            session::hold_next_item(next.next_item_not_before, step.holder_may_run_until, now);
        if !coupling.changes(next.status, next.pending_input) && hold == next.next_item_not_before {
            return Ok(Some(session.version));
        }
        next.next_item_not_before = hold;
        let events = apply_coupling(&mut next, &coupling, now);
        next.updated_at = now;
        if coupling.enqueue_fresh_item {
            let (item, write) = self.enqueue_for_session(&next, now);
            changes.push(write);
            effects.claimable.push(item.environment_id);
        }
        changes.push(Write::UpdateSession {
            session: next.clone(),
            expected_version: session.version,
        });
        for event in events {
            changes.push(Write::InsertEvent(event));
        }
        effects.sessions.push(next.id);
        Ok(None)
    }

    /// A new queued item for a session (§7.2): its metadata is a snapshot of the session's.
    pub fn enqueue_for_session(&self, session: &Session, now: Timestamp) -> (WorkItem, Write) {
        let step = work::enqueue(
            ids::new_id(IdKind::Work),
            session.environment_id.clone(),
            WorkData::session(session.id.clone()),
            session.metadata.clone(),
            now,
            session.next_item_not_before,
            &self.config.lease,
        );
        let item = step.item.clone();
        (
            item,
            Write::InsertWork {
                item: step.item,
                transitions: step.transitions,
            },
        )
    }

    /// Poll (§6.2): claim the oldest claimable item, waiting up to `block` for one to appear. `issuer` is
    /// the credential the caller presented; the session token minted for a delivery dies with it.
    pub async fn poll(
        &self,
        env: &Environment,
        worker_id: Option<&str>,
        issuer: Option<&str>,
        block: Option<Duration>,
        reclaim_ms: i64,
    ) -> Result<Option<Claimed>> {
        self.take(env, worker_id, issuer, block, reclaim_ms, Taking::Deliver)
            .await
    }

    /// Claim (a Tether extension): a poll that also acks the item and starts its lease
    /// (`work::claim`), so that a worker's whole cycle is this request and its stop.
    ///
    /// A claim that names its session token (`ask.keyed`, the same for every try of it)
    /// can be sent again: a try whose token already holds an item (an earlier try committed, its
    /// answer was lost) answers that item and its lease again, taking nothing more
    /// (`work::claimed_lease`). Without one, a claim whose answer is lost leaves its item leased
    /// to nobody until the lease runs out.
    ///
    /// The store keeps a token on one live item at most, so a try that goes for another item
    /// while an earlier one holds the token loses its write, and then answers that one. A try
    /// marked as sent again ([`TrySent::Again`]) also looks for it first, and once more before it
    /// answers that it found nothing (an earlier try may have committed while it waited); one
    /// that takes nothing new ([`TrySent::AgainTakingNothing`]) only looks, once, and neither
    /// waits nor counts as a poll. A first try costs no read more than a claim without a key,
    /// idle or not, unless it loses a race for an item.
    pub async fn claim(
        &self,
        env: &Environment,
        worker_id: Option<&str>,
        issuer: Option<&str>,
        block: Option<Duration>,
        reclaim_ms: i64,
        ask: ClaimAsk<'_>,
    ) -> Result<Option<Claimed>> {
        let resent = ask.keyed.filter(|keyed| keyed.sent != TrySent::First);
        if let Some(keyed) = resent {
            let earlier = self.claimed_before(keyed.session_token, worker_id);
            if let Some(claimed) = Box::pin(earlier).await? {
                return Ok(Some(claimed));
            }
            if keyed.sent == TrySent::AgainTakingNothing {
                return Ok(None);
            }
        }
        let taking = Taking::Start(ask);
        let taken = self.take(env, worker_id, issuer, block, reclaim_ms, taking);
        match (taken.await?, resent) {
            // Nothing taken (the wait ended, or the server is shutting down): a claim sent again
            // answers what an earlier try of it took meanwhile.
            (None, Some(keyed)) => {
                Box::pin(self.claimed_before(keyed.session_token, worker_id)).await
            }
            (taken, _) => Ok(taken),
        }
    }

    /// The claim whose session token is `token`, answered again: `None` when no item holds the
    /// token (no try of this claim committed, or its item has stopped or gone back to the queue
    /// since). The item is judged as any operation on it is (`run_item_op`): a lease that ran out
    /// is settled there, so that the token lets go of it and the claim takes work anew, and one
    /// that an amnesty holds is live.
    async fn claimed_before(
        &self,
        token: &str,
        worker_id: Option<&str>,
    ) -> Result<Option<Claimed>> {
        let token_hash = credentials::hash(token);
        let Some(found) = self.store.work_by_token_hash(&token_hash).await? else {
            return Ok(None);
        };
        let found = found.value;
        let answered = self.run_item_op(
            &found.environment_id,
            &found.id,
            ItemRead::ItemAndSession,
            |item, _now| {
                work::held_by(item, &token_hash)?;
                let lease = work::claimed_lease(item, worker_id)?;
                Ok((Step::unchanged(item), lease))
            },
        );
        match Box::pin(answered).await {
            Ok((item, lease)) => Ok(Some(Claimed {
                item,
                session_token: token.to_owned(),
                lease: Some(lease),
                earlier_try: true,
            })),
            // The token no longer holds it (its lease ran out, and is settled now; it stopped).
            Err(Error::Refused(WorkError::NotHeld)) | Err(Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// [`Self::poll`] and [`Self::claim`]: takes the oldest claimable item as `taking` says, waiting
    /// up to `block` for one to appear.
    async fn take(
        &self,
        env: &Environment,
        worker_id: Option<&str>,
        issuer: Option<&str>,
        block: Option<Duration>,
        reclaim_ms: i64,
        taking: Taking<'_>,
    ) -> Result<Option<Claimed>> {
        self.record_worker(&env.id, worker_id).await?;
        // Lazy expiry (§3.1): an item whose lease lapsed is claimable now, whether or not the
        // dispatcher's tick has come round yet. Asked of the store only when a lease may be due.
        // The store calls are boxed: a blocked poll then holds, for the whole of its wait, a future the
        // size of its own loop rather than one with room for the largest store call in it (thousands
        // of idle long polls at once each hold one).
        if self.lease_horizon.may_be_due(self.now()) || self.amnesty_pending() {
            Box::pin(self.expire_due_leases()).await?;
        }
        let deadline = tokio::time::Instant::now() + block.unwrap_or_default();
        // The ticket whose wake-up this poll is acting on. The scan that follows spends the wake-up
        // whatever it finds: passing it on after a fruitless scan would send it round every waiter
        // again and again, each time costing a query, for as long as polls keep waiting.
        let mut answering: Option<crate::waiters::Ticket> = None;
        loop {
            // Woken after a wait: the credential may have been revoked meanwhile. A poll that claimed
            // now would hand the item (its session's metadata) to a caller refused from then on, and
            // leave it delivered to nobody for the reclaim window. Its wake-up passes on to the next
            // waiter as the ticket drops.
            if let (Some(_), Some(issuer)) = (&answering, issuer) {
                if !self.credential_alive(issuer).await? {
                    return Err(Error::Unauthenticated);
                }
            }
            let ticket = if block.is_some() && !self.is_shutting_down() {
                self.waiters.register(&env.id)
            } else {
                None
            };
            // A blocked poll whose environment a scan found empty lately, with nothing announced since,
            // waits without scanning again (`crate::waiters`): idle workers re-polling cost no store work.
            let parked = ticket.is_some()
                && answering.is_none()
                && self.waiters.known_empty(
                    &env.id,
                    self.now(),
                    self.parked_scan_ttl(),
                    reclaim_ms,
                );
            // In a scope of its own, so that the claim's result is not kept through the wait below:
            // every blocked poll would hold room for it (an idle worker's poll is mostly that wait).
            let ticket = {
                let claimed = if parked {
                    None
                } else {
                    let scan = ticket
                        .as_ref()
                        .map(|_| self.waiters.begin_scan(&env.id, reclaim_ms));
                    let claim = self.try_claim(env, worker_id, issuer, reclaim_ms, taking, scan);
                    Box::pin(claim).await?
                };
                // An earlier try's item, answered after this try lost its write for an item of the
                // queue: that item is still there, and the wake-up passes on as the tickets drop.
                if claimed.as_ref().is_some_and(|c| c.earlier_try) {
                    return Ok(claimed);
                }
                if let Some(woken) = answering.take() {
                    woken.consume();
                }
                if let Some(claimed) = claimed {
                    if let Some(t) = &ticket {
                        t.consume();
                    }
                    return Ok(Some(claimed));
                }
                let Some(ticket) = ticket else {
                    return Ok(None);
                };
                ticket
            };
            tokio::select! {
                _ = ticket.woken() => answering = Some(ticket),
                _ = tokio::time::sleep_until(deadline) => return Ok(None),
                _ = self.until_shutdown() => return Ok(None),
            }
        }
    }

    async fn try_claim(
        &self,
        env: &Environment,
        worker_id: Option<&str>,
        issuer: Option<&str>,
        reclaim_ms: i64,
        taking: Taking<'_>,
        scan: Option<crate::waiters::Scan>,
    ) -> Result<Option<Claimed>> {
        // A keyed claim's tries in this process scan and write one at a time (`turns`); one that
        // waited for another looks for what that one took first. Not held while a try waits for
        // work: a try sent again may wait while an earlier one takes an item. A turn that does not
        // come within `turns::TURN_WAIT` (a database that answers slowly) is answered 503.
        let _turn = match taking.named_token() {
            Some(token) => {
                let Some(turn) = Box::pin(self.claim_turns.take(token)).await else {
                    return Err(Error::Contended);
                };
                if turn.waited {
                    if let Some(claimed) = Box::pin(self.claimed_before(token, worker_id)).await? {
                        return Ok(Some(claimed));
                    }
                }
                Some(turn)
            }
            None => None,
        };
        // A claim that finds nothing left over waits for the claim reading its queue before it, at
        // most as long as what that read leaves stays fresh.
        let read_turn_wait = Duration::from_millis(spare_candidates::KEEP_FOR_MS.unsigned_abs());
        let window = format!("{}\n{reclaim_ms}", env.id);
        let mut reads = 0;
        // The rest of this claim's own last read that the left-overs did not take (none kept for its
        // window, no room): its next attempts go through them first, as every read's claim did.
        let mut own_rest = VecDeque::new();
        loop {
            // The candidates an earlier read of this process left, while they are fresh
            // (`spare_candidates`). A claim that finds none waits for the claim reading before it,
            // whose read is sized for those waiting, and takes from what it left; one that still
            // finds none reads beside the others rather than after them, so reads of one queue never
            // queue up behind a slow one. Under load most claims read nothing.
            let mut read_turn = None;
            let mut waited = false;
            let spare = loop {
                if let Some(next) = self.reserve_next(&mut own_rest, &env.id, reclaim_ms) {
                    break Some(next);
                }
                if waited || read_turn.is_some() {
                    break None;
                }
                let turn = self.candidate_reads.take_within(&window, read_turn_wait);
                match Box::pin(turn).await {
                    Some(turn) if !turn.waited => read_turn = Some(turn),
                    // Passed on at once: this claim takes what the read before it left, or reads.
                    Some(_) | None => waited = true,
                }
            };
            let (candidate, reservation) = match spare {
                Some(spare) => spare,
                None => {
                    if reads == super::MAX_ATTEMPTS {
                        return Ok(None);
                    }
                    reads += 1;
                    // For the claims taking items now (they head the queue until they commit),
                    // those waiting to read after this one, and a few spare.
                    let now = self.now();
                    let (reserved, generation) = {
                        let claims = self.claiming.lock().expect("claiming lock");
                        (claims.taking.len(), claims.spare.generation())
                    };
                    let waiting = read_turn.as_ref().map_or(0, |turn| turn.others_waiting());
                    let batch = u32::try_from(reserved.saturating_add(waiting))
                        .unwrap_or(u32::MAX)
                        .saturating_add(match self.store.shared() {
                            true => CLAIM_SPARE,
                            false => CLAIM_SPARE_ALONE,
                        })
                        .min(CLAIM_BATCH);
                    let candidates = self
                        .store
                        .claim_candidates(&env.id, ClaimWindow::at(now, reclaim_ms), batch)
                        .await?;
                    let found_some = !candidates.is_empty();
                    let mut candidates = VecDeque::from(candidates);
                    // Under one lock: a reservation given back meanwhile forgets left-overs either
                    // before this one takes (and sees it free) or after it keeps.
                    let taken = {
                        let mut claims = self.claiming.lock().expect("claiming lock");
                        let taken = self.first_takeable(&mut claims, |_| candidates.pop_front());
                        // What it leaves is for the claims after it, this one's next attempts
                        // among them.
                        own_rest = claims
                            .spare
                            .keep(&env.id, reclaim_ms, now, generation, candidates);
                        taken
                    };
                    match taken {
                        Some(candidate) => {
                            let reservation = Reservation::of(self, &candidate.id);
                            (candidate, reservation)
                        }
                        None if !found_some => {
                            if let Some(scan) = scan {
                                self.waiters.found_empty(&env.id, scan, self.now());
                            }
                            return Ok(None);
                        }
                        // Every candidate is being taken by another claim here: read again once
                        // they commit.
                        None => {
                            drop(read_turn);
                            tokio::task::yield_now().await;
                            continue;
                        }
                    }
                }
            };
            drop(read_turn);
            let took = self.take_candidate(
                &candidate,
                reservation,
                worker_id,
                issuer,
                reclaim_ms,
                taking,
            );
            if let Some(claimed) = took.await? {
                return Ok(Some(claimed));
            }
            // Not taken (refused by the core, or its write lost a race): the next attempt goes on
            // with what is left, or reads again.
        }
    }

    /// Takes `candidate`, reserved for this claim by `reservation`, as `taking` says.
    async fn take_candidate(
        &self,
        candidate: &Candidate,
        reservation: Reservation<'_>,
        worker_id: Option<&str>,
        issuer: Option<&str>,
        reclaim_ms: i64,
        taking: Taking<'_>,
    ) -> Result<Option<Claimed>> {
        // Decoded only now: the candidates a poll steps past cost no parsing.
        let candidate = candidate.decode()?;
        let token = match taking.named_token() {
            Some(token) => token.to_owned(),
            None => credentials::mint(credentials::SESSION_PREFIX),
        };
        let now = self.now();
        let taker = (worker_id, issuer);
        let Ok((step, lease)) =
            self.take_step(&candidate.value, &token, taker, reclaim_ms, taking, now)
        else {
            reservation.settle();
            return Ok(None);
        };
        // A claim acks the item, which may move its session (§7.3): the coupling starts from
        // the session as this process remembers it, as an ack's does. A delivery touches
        // no session, and neither reads nor copies one.
        let session = match step.transitions.iter().any(session::touches_session) {
            true => self.remembered_session_of(&step.item),
            false => None,
        };
        let session = session.unwrap_or(SessionAhead::Unread);
        // A reservation is settled once the outcome is known; a write that failed, or a claim
        // dropped before its answer, leaves it unsettled (`Reservation`'s drop).
        match self.commit_step(&candidate, session, &step, now).await {
            Ok(()) => {
                reservation.settle();
                record_pace(
                    crate::telemetry::ENQUEUE_TO_DELIVERY,
                    candidate.value.enqueued_at,
                    now,
                );
                Ok(Some(Claimed {
                    item: step.item,
                    session_token: token,
                    lease,
                    earlier_try: false,
                }))
            }
            Err(Retry::Conflict) => {
                // Whatever the race was about, reads made while this claim held the item passed it
                // over; it may still be claimable, ahead of what they left.
                let environment_id = &candidate.value.environment_id;
                (self.claiming.lock().expect("claiming lock").spare)
                    .forget_environment(environment_id);
                reservation.settle();
                // Another try of this claim may have taken the token first (a token
                // holds one item at most): then its item is this claim's answer.
                if let Some(token) = taking.named_token() {
                    if let Some(claimed) = self.claimed_before(token, worker_id).await? {
                        return Ok(Some(claimed));
                    }
                }
                Ok(None)
            }
            Err(Retry::Fail(e)) => Err(e),
        }
    }

    /// What taking `item` at `now` as `taking` says does to it, with the session token `token`
    /// minted for it, for `(worker_id, issuer)`: a delivery, or a claim and the lease it started.
    fn take_step(
        &self,
        item: &WorkItem,
        token: &str,
        (worker_id, issuer): (Option<&str>, Option<&str>),
        reclaim_ms: i64,
        taking: Taking<'_>,
        now: Timestamp,
    ) -> std::result::Result<(Step, Option<HeartbeatReply>), WorkError> {
        let session_token_hash = credentials::hash(token);
        match taking {
            Taking::Deliver => {
                let step =
                    work::deliver(item, worker_id, session_token_hash, issuer, now, reclaim_ms)?;
                Ok((step, None))
            }
            Taking::Start(ClaimAsk {
                desired_ttl_seconds,
                ..
            }) => {
                let request = work::ClaimRequest {
                    worker_id,
                    session_token_hash,
                    issuer,
                    reclaim_older_than_ms: reclaim_ms,
                    desired_ttl_seconds,
                };
                let (step, lease) = work::claim(item, request, now, &self.config.lease)?;
                Ok((step, Some(lease)))
            }
        }
    }

    /// How long a scan that found nothing spares blocked polls a scan of their own: at most a dispatcher
    /// tick (whose pass probes every environment with a waiter), and never over a second.
    fn parked_scan_ttl(&self) -> Duration {
        self.config.tick.min(Duration::from_secs(1))
    }

    /// The next candidate this claim may take, reserved: from `own_rest` (the rest of its own last
    /// read), else from the window's left-overs (`spare_candidates`).
    fn reserve_next(
        &self,
        own_rest: &mut VecDeque<Candidate>,
        environment_id: &str,
        reclaim_ms: i64,
    ) -> Option<(Candidate, Reservation<'_>)> {
        let now = self.now();
        let mut claims = self.claiming.lock().expect("claiming lock");
        let candidate = match self.first_takeable(&mut claims, |_| own_rest.pop_front()) {
            Some(candidate) => candidate,
            None => self.first_takeable(&mut claims, |claims| {
                claims.spare.next(environment_id, reclaim_ms, now)
            })?,
        };
        let reservation = Reservation::of(self, &candidate.id);
        Some((candidate, reservation))
    }

    /// The first candidate `next` gives that this claim may take, marked taken (`Claims::take`):
    /// nobody here is taking it, and no write here made a version later than the one read. The
    /// caller holds the claims lock: a poll that committed a delivery has remembered it
    /// (`App::commit`) before it lets go of its reservation, so a poll here sees either the
    /// reservation or the delivery's version. Those passed over are dropped.
    fn first_takeable(
        &self,
        claims: &mut Claims,
        mut next: impl FnMut(&mut Claims) -> Option<Candidate>,
    ) -> Option<Candidate> {
        loop {
            let candidate = next(claims)?;
            let written_here = self.written_items.version_of(&candidate.id);
            if claims.take(&candidate.id, candidate.version, written_here) {
                return Some(candidate);
            }
        }
    }

    /// Records a poll for `workers_polling`, at most once per [`worker_record_interval_ms`] per
    /// worker and process (an idle worker re-polls every second), and for at most
    /// `max_workers_per_environment` workers per environment ([`super::worker_records`]). The record waits in memory for the
    /// dispatcher's next tick, which writes every waiting record in one commit; readers of the records
    /// in this process write them first, other processes see them a tick later (the window they count
    /// in is 30 s).
    async fn record_worker(&self, environment_id: &str, worker_id: Option<&str>) -> Result<()> {
        let Some(worker_id) = worker_id else {
            return Ok(());
        };
        let now = self.now();
        let record = self.workers_recorded.lock().expect("workers lock").poll(
            environment_id,
            worker_id,
            now,
        );
        match record {
            Record::Write => {}
            Record::Recent => return Ok(()),
            Record::Full => {
                metrics::counter!("tether_worker_polls_unrecorded_total").increment(1);
                return Ok(());
            }
        }
        let key = (environment_id.to_owned(), worker_id.to_owned());
        let mut unwritten = self.workers_unwritten.lock().expect("workers lock");
        if unwritten.len() < MAX_UNWRITTEN_WORKER_RECORDS {
            unwritten.insert(key, now);
        }
        Ok(())
    }

    /// The most poll records a listing or a `workers_polling` count reads.
    pub fn workers_listed_at_most(&self) -> u32 {
        u32::try_from(self.config.max_workers_per_environment).unwrap_or(u32::MAX)
    }

    /// Writes the poll records waiting in memory (see [`Self::record_worker`]), in one commit per
    /// [`WORKER_RECORDS_PER_COMMIT`]. Records that fail to be written are dropped: the worker's next
    /// poll after the record interval records it again. Writes take turns: a reader (the workers
    /// listing, a scrape) that writes the records before it reads them must not find them taken by
    /// the dispatcher's write and not yet committed.
    pub async fn write_worker_records(&self) -> Result<()> {
        let _turn = self.workers_writing.lock().await;
        let unwritten = std::mem::take(&mut *self.workers_unwritten.lock().expect("workers lock"));
        let writes: Vec<Write> = unwritten
            .into_iter()
            .map(|((environment_id, worker_id), at)| Write::TouchWorker {
                environment_id,
                worker_id,
                at,
            })
            .collect();
        for chunk in writes.chunks(WORKER_RECORDS_PER_COMMIT) {
            self.commit(ChangeSet {
                writes: chunk.to_vec(),
            })
            .await?;
        }
        Ok(())
    }

    /// Ack (§6.6), asked for by `caller`: a session token only while it holds the item, judged on
    /// the item the write is conditional on (a request let in just before its lease lapsed, and
    /// decided after the item went to another worker, acks nothing).
    pub async fn ack(
        &self,
        env: &Environment,
        work_id: &str,
        worker_id: Option<&str>,
        caller: &Principal,
    ) -> Result<WorkItem> {
        let (item, delivered_at) = self
            .run_item_op(&env.id, work_id, ItemRead::ItemAndSession, |item, now| {
                caller.may_act_on(item)?;
                let step = work::ack(item, worker_id, now)?;
                // The delivery this ack answers (none for a retry, or an ack without a poll).
                let delivered_at = item.delivery.as_ref().map(|d| d.delivered_at);
                Ok((
                    step,
                    delivered_at.filter(|_| item.state == WorkState::Queued),
                ))
            })
            .await?;
        if let (Some(delivered), Some(acked)) = (delivered_at, item.acknowledged_at) {
            record_pace(crate::telemetry::DELIVERY_TO_ACK, delivered, acked);
        }
        Ok(item)
    }

    /// Heartbeat (§6.7), asked for by `caller`: a session token only while it holds the item, as
    /// for [`App::ack`] (it would otherwise extend the lease of the item's next holder).
    pub async fn heartbeat(
        &self,
        env: &Environment,
        work_id: &str,
        expected: ExpectedHeartbeat,
        desired_ttl_seconds: Option<u32>,
        worker_id: Option<&str>,
        caller: &Principal,
    ) -> Result<HeartbeatReply> {
        let policy = self.config.lease;
        let (item, reply) = self
            .run_item_op(&env.id, work_id, ItemRead::Item, |item, now| {
                caller.may_act_on(item)?;
                work::heartbeat(item, expected, desired_ttl_seconds, worker_id, now, &policy)
            })
            .await?;
        if reply.state == WorkState::Active && item.heartbeat_count == 1 {
            if let (Some(acked), Some(started)) = (item.acknowledged_at, item.started_at) {
                record_pace(crate::telemetry::ACK_TO_FIRST_HEARTBEAT, acked, started);
            }
        }
        Ok(reply)
    }

    /// Stop (§6.8), asked for by `caller`. With `hold_next_item`, an operator's stop of a leased
    /// item: its program runs on until the worker learns of it, and the session's next item is held
    /// until the lease's deadline (`work::stop_by`, `work::Step::holder_may_run_until`).
    pub async fn stop(
        &self,
        env: &Environment,
        work_id: &str,
        ask: StopAsk,
        caller: &Principal,
    ) -> Result<WorkItem> {
        let asker = caller.asker();
        let read = ItemRead::ItemAndSession;
        let (item, ()) = self
            .run_item_op_seeing_session(&env.id, work_id, read, |item, session, now| {
                caller.may_act_on(item)?;
                if let Some(session) = session {
                    let turn = session.into();
                    session::may_stop(item.state, ask.force, turn, ask.unless_turn_open)?;
                }
                let stopper = caller.stopper_of(item, ask.hold_next_item);
                let step = work::stop_by(item, ask.force, now, stopper)?;
                Ok((step.asked_by(&asker), ()))
            })
            .await?;
        Ok(item)
    }

    /// The stop a claim carries, made before the claim takes anything (`work::stop_with_claim`):
    /// the holder's forced stop of the item whose program has ended, proven by its session token
    /// (`token_hash`), one write of its own. An item already stopped is answered as it is, so that
    /// a claim sent again does not fail on it.
    pub async fn stop_with_claim(
        &self,
        env: &Environment,
        work_id: &str,
        token_hash: &str,
        unless_turn_open: bool,
    ) -> Result<WorkItem> {
        // The token is the stop's credential, as it is for a stop sent with it; the claim's
        // credential only carried it.
        let asker = "the item's session token, sent with a claim";
        let read = ItemRead::ItemAndSession;
        let (item, ()) = self
            .run_item_op_seeing_session(&env.id, work_id, read, |item, session, now| {
                let step = work::stop_with_claim(item, token_hash, now)?;
                if let Some(session) = session {
                    session::may_stop(item.state, true, session.into(), unless_turn_open)?;
                }
                Ok((step.asked_by(asker), ()))
            })
            .await?;
        Ok(item)
    }

    pub async fn get_work(&self, env: &Environment, work_id: &str) -> Result<WorkItem> {
        let (item, ()) = self
            .run_item_op(&env.id, work_id, ItemRead::Item, |item, _| {
                Ok((unchanged(item), ()))
            })
            .await?;
        Ok(item)
    }

    /// Merges `patch` into the item's metadata, asked for by `caller` (a worker's session token
    /// only while it holds the item: its program's outcome belongs to its own run).
    pub async fn patch_work_metadata(
        &self,
        env: &Environment,
        work_id: &str,
        patch: &tether_core::metadata::MetadataPatch,
        caller: &Principal,
    ) -> Result<WorkItem> {
        let (item, ()) = self
            .run_item_op(&env.id, work_id, ItemRead::Item, |item, _| {
                caller.may_act_on(item)?;
                Ok((work::patch_metadata(item, patch)?, ()))
            })
            .await?;
        Ok(item)
    }

    pub async fn list_work(
        &self,
        env: &Environment,
        filter: &WorkFilter,
        page: &PageRequest,
    ) -> Result<Page<WorkItem>> {
        self.expire_due_leases().await?;
        super::in_list_order(
            page,
            |w: &WorkItem| &w.id,
            |page| async move { Ok(self.store.list_work(&env.id, filter, &page).await?) },
        )
        .await
    }

    pub async fn queue_stats(&self, env: &Environment) -> Result<QueueStats> {
        self.expire_due_leases().await?;
        self.write_worker_records().await?;
        let counts = self.store.queue_counts(&env.id).await?;
        let since = self
            .now()
            .minus_millis(self.config.workers_polling_window_ms);
        let workers_polling = self
            .store
            .workers_seen(&env.id, since, self.workers_listed_at_most())
            .await?
            .len() as u64;
        Ok(QueueStats {
            counts,
            workers_polling,
        })
    }

    pub async fn work_history(
        &self,
        env: &Environment,
        work_id: &str,
        after_seq: Option<i64>,
        limit: u32,
    ) -> Result<(WorkItem, Page<HistoryRow>)> {
        let item = self.get_work(env, work_id).await?;
        let page = self.store.list_history(work_id, after_seq, limit).await?;
        Ok((item, page))
    }

    /// Live items per worker seen polling in the last [`WORKERS_LISTED_MS`] (§11.4).
    pub async fn workers(
        &self,
        env: &Environment,
    ) -> Result<Vec<(String, Timestamp, Vec<WorkItem>)>> {
        self.write_worker_records().await?;
        let since = self.now().minus_millis(WORKERS_LISTED_MS);
        let seen = self
            .store
            .workers_seen(&env.id, since, self.workers_listed_at_most())
            .await?;
        let live = self.store.leased_work_in_environment(&env.id).await?;
        Ok(seen
            .into_iter()
            .map(|(worker, at)| {
                let held = live
                    .iter()
                    .filter(|i| i.owner_worker_id.as_deref() == Some(worker.as_str()))
                    .cloned()
                    .collect();
                (worker, at, held)
            })
            .collect())
    }

    /// Forgets workers that no reader of the poll record looks at any more (§3.1): worker ids are
    /// per process, so without this every worker ever started would keep a row for good.
    pub async fn forget_idle_workers(&self) -> Result<()> {
        let now = self.now();
        self.workers_recorded
            .lock()
            .expect("workers lock")
            .forget_aged(now);
        let before = now.minus_millis(workers_window_ms(self.config.workers_polling_window_ms));
        // Marks of servers not heard of for an hour: a server with a new host or address leaves
        // its old one behind.
        const LEASE_KEEPER_MARKS_KEPT_MILLIS: i64 = 3_600_000;
        let keepers_before = now.minus_millis(LEASE_KEEPER_MARKS_KEPT_MILLIS);
        self.commit(ChangeSet {
            writes: vec![
                Write::ForgetWorkers { before },
                Write::ForgetLeaseKeepers {
                    before: keepers_before,
                },
            ],
        })
        .await?;
        Ok(())
    }

    /// One expiry pass: every lease past its deadline is settled (§5.4). Returns how many expired.
    pub async fn expire_due_leases(&self) -> Result<usize> {
        let now = self.now();
        if !self.expiry_allowed(now) {
            // Another server may have promised the leases' workers amnesty: nothing is due yet.
            // An amnesty after an outage of this one's waits for the first pass after the hold,
            // or the first operation on an item, whichever comes first; later is only longer.
            return Ok(0);
        }
        // Before the read of what is due: keeping it may move deadlines.
        self.keep_earlier_runs_promise().await?;
        let mut due = self.store.leases_due_before(now, EXPIRY_BATCH).await?;
        if self.amnesty_after_outage().await? {
            due = self.store.leases_due_before(now, EXPIRY_BATCH).await?;
        }
        let latest_due = due
            .iter()
            .filter_map(|item| item.value.lease_expires_at)
            .max();
        if let Some(deadline) = latest_due {
            if self.promise_holding(deadline, now).await?.is_some() {
                return Ok(0);
            }
        }
        let batch = due.len();
        let mut expired = 0;
        for item in due {
            match self
                .run_item_op(
                    &item.value.environment_id,
                    &item.value.id,
                    // A lease past its deadline is settled, and that changes its session.
                    ItemRead::ItemAndSession,
                    |it, _| Ok((unchanged(it), ())),
                )
                .await
            {
                // Renewed meanwhile (a heartbeat, an amnesty), it is left as it is.
                Ok((after, ())) if after.state != item.value.state => expired += 1,
                Ok(_) | Err(Error::NotFound { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        if expired > 0 {
            metrics::counter!("tether_lease_expiries_total").increment(expired as u64);
        }
        if (batch as u32) < EXPIRY_BATCH {
            self.refresh_lease_horizon().await?;
        }
        Ok(expired)
    }

    /// Reads the earliest lease deadline in the store into [`crate::cache::LeaseHorizon`] (one index
    /// probe). Runs after each expiry pass, so at least once per dispatcher tick.
    async fn refresh_lease_horizon(&self) -> Result<()> {
        let writes_before = self.lease_horizon.before_refresh();
        let earliest = self
            .store
            .leases_due_before(Timestamp(i64::MAX), 1)
            .await?
            .first()
            .and_then(|item| item.value.lease_expires_at);
        self.lease_horizon.refreshed(writes_before, earliest);
        Ok(())
    }

    /// Whether the store reconnected since amnesty was last granted (the next expiry pass grants it).
    fn amnesty_pending(&self) -> bool {
        self.store.reconnections()
            > self
                .amnesty_granted_through
                .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Keeps the in-memory hints true for a change set about to be committed: the lease horizon learns
    /// every deadline it writes, and credentials and environments it changes leave the caches. Returns
    /// whether cached records changed (the caches are cleared once more after the commit).
    pub(super) fn before_commit(&self, changes: &ChangeSet) -> bool {
        let mut cached_records_changed = false;
        for write in &changes.writes {
            match write {
                Write::InsertWork { item, .. } | Write::UpdateWork { item, .. } => {
                    if let Some(deadline) = item.lease_expires_at {
                        self.lease_horizon.wrote(deadline);
                    }
                }
                Write::UpdateEnvironment { .. }
                | Write::DeleteEnvironment { .. }
                | Write::UpdateAgent { .. }
                | Write::RevokeCredential { .. } => cached_records_changed = true,
                _ => {}
            }
        }
        if cached_records_changed {
            self.forget_cached_records();
        }
        cached_records_changed
    }

    pub(super) fn forget_cached_records(&self) {
        self.credentials_by_id.clear();
        self.credentials_by_hash.clear();
        self.environments_read.clear();
        self.agents_read.clear();
    }

    /// Lease amnesty after the store lost its database and got it back: the start-up amnesty of §3.1
    /// applied to the database's downtime, so that no lease expires because workers could not renew
    /// it while the database was away. Granting it once per reconnection, before any expiry is
    /// decided from a read made after the reconnection, is enough: the store counts the reconnection
    /// before that read returns. Several server processes may each grant it; the grants are
    /// conditional writes and only ever move a deadline to `now + grace`, so repeating one is
    /// harmless. The price is that a worker that died during the outage keeps its item up to one
    /// grace window longer. Returns whether amnesty was granted just now.
    pub async fn amnesty_after_outage(&self) -> Result<bool> {
        use std::sync::atomic::Ordering;
        let seen = self.store.reconnections();
        if seen <= self.amnesty_granted_through.load(Ordering::SeqCst) {
            return Ok(false);
        }
        let _running = self.amnesty_running.lock().await;
        if seen <= self.amnesty_granted_through.load(Ordering::SeqCst) {
            // Another request granted it while this one waited.
            return Ok(true);
        }
        // The promises made so far are taken into account only once the decision is made: one
        // that fails, or is dropped with its request, leaves them for the next try.
        let promises_made = self.amnesty_promises_made.load(Ordering::SeqCst);
        let promised = promises_made > self.amnesty_promises_decided.load(Ordering::SeqCst);
        let granted = self.decide_amnesty_after_outage(promised).await?;
        self.amnesty_promises_decided
            .fetch_max(promises_made, Ordering::SeqCst);
        let Some(granted) = granted else {
            tracing::info!(
                "no lease amnesty after the database came back: another server kept the leases \
                 meanwhile, and none was promised"
            );
            self.amnesty_granted_through
                .fetch_max(seen, Ordering::SeqCst);
            return Ok(false);
        };
        tracing::info!(
            granted,
            "lease amnesty after the database came back: no lease expires because of the outage"
        );
        self.amnesty_granted_through
            .fetch_max(seen, Ordering::SeqCst);
        Ok(true)
    }

    /// The amnesty after an outage, granted when owed: how many leases it extended, or `None`
    /// when none was owed.
    async fn decide_amnesty_after_outage(&self, promised: bool) -> Result<Option<usize>> {
        if !self.amnesty_owed_after_outage(promised).await? {
            return Ok(None);
        }
        self.grant_amnesty().await.map(Some)
    }

    /// `lease::amnesty_owed_after_outage`, from what this process promised during the outage
    /// (`promised`, noted as its 503s were answered: a read of the marks made since, a newcomer's
    /// mark in it, says nothing of what was promised before) and the marks of the lease keepers.
    /// Always on a store of this process's own.
    async fn amnesty_owed_after_outage(&self, promised: bool) -> Result<bool> {
        if !self.store.shared() {
            return Ok(true);
        }
        let own_last = *self.own_lease_mark.lock().expect("own lease mark lock");
        let others = self
            .store
            .lease_keeper_marks_elsewhere(&self.server_id)
            .await?;
        Ok(tether_core::lease::amnesty_owed_after_outage(
            promised,
            own_last,
            &others,
            self.now(),
        ))
    }

    /// A 503 because the database is away tells a worker (`error.details.lease_amnesty_ms`) that its
    /// lease will not expire because of the outage: while the store cannot reach its database this
    /// process can expire nothing, and the first successful call after the outage makes it grant
    /// amnesty (`amnesty_grace_ms` from then) before any expiry is decided again ([`Self::run_item_op`]
    /// re-decides an expiry read before a loss). Given only while the store says it is in an outage,
    /// not for a merely busy pool, whose database others can still write to.
    pub fn with_amnesty_promise(&self, error: Error) -> Error {
        match error {
            Error::StoreUnavailable {
                outcome_unknown, ..
            } => Error::StoreUnavailable {
                lease_amnesty_ms: self.lease_amnesty_promise(),
                outcome_unknown,
            },
            other => other,
        }
    }

    /// The lease amnesty promised while the database is away (see [`Self::with_amnesty_promise`]).
    /// None while another server process was keeping the leases when this one last could look:
    /// this process's outage may be its own (a partition between it and the database), and that
    /// process would go on expiring the leases this one promised would not expire, while their
    /// workers kept their programs running beside the ones the items went to next.
    ///
    /// On a store shared with other processes, the promise ends where this process's last mark
    /// said it would (`lease::promise_left`), however long the outage lasts: another process that
    /// keeps the leases meanwhile honours that end and no later one (`lease::expiry_held_until`).
    /// On a store of this process's own, where no other process can expire anything, it is the
    /// whole grace at every answer.
    ///
    /// The promise is noted before it is made, and made only if the outage it was noted in has
    /// not ended since: an amnesty decided after the outage ended may have been decided before
    /// the note, and a worker is then better told nothing than a promise nobody keeps.
    pub fn lease_amnesty_promise(&self) -> Option<i64> {
        use std::sync::atomic::Ordering;
        let grace = self.config.amnesty_grace_ms;
        // The outage under way, by its count: a store counts a loss once it is in an outage, and
        // its reconnection before it is out of it, so until that reconnection is counted there
        // are fewer reconnections than this (a loss not counted yet makes no promise below).
        let outage = self.store.losses();
        if !self.store.in_outage() || grace <= 0 || !self.alone_at_last_look() {
            return None;
        }
        let promise = if self.store.shared() {
            let own_last = *self.own_lease_mark.lock().expect("own lease mark lock");
            tether_core::lease::promise_left(own_last, self.now())?
        } else {
            grace
        };
        self.amnesty_promises_made.fetch_add(1, Ordering::SeqCst);
        // Any decision for this outage reads the promises made after its reconnection is counted.
        (self.store.reconnections() < outage).then_some(promise)
    }

    /// Whether leases may be settled as expired at `now`: not while another server process may
    /// have promised its workers amnesty ([`Self::look_for_other_lease_keepers`]). Until then a
    /// lapsed lease is held as if it were live, by the expiry pass and by every operation.
    pub fn expiry_allowed(&self, now: Timestamp) -> bool {
        self.expiry_held_at(now).is_none()
    }

    /// Until when the marks read last hold every lease, if they still do at `now`
    /// (`lease::still_held`).
    fn expiry_held_at(&self, now: Timestamp) -> Option<Timestamp> {
        let held_until = self
            .last_marks_read()
            .and_then(|read| read.expiry_held_until);
        tether_core::lease::still_held(held_until, now)
    }

    /// Whether `item`'s lease has lapsed at `now` and may be settled (`work::lease_lapsed`, and
    /// no promise holds it: [`Self::held_lease`]).
    pub(crate) async fn lease_lapsed(&self, item: &WorkItem, now: Timestamp) -> Result<bool> {
        Ok(work::lease_lapsed(item, now) && self.held_lease(item, now).await?.is_none())
    }

    /// `item` with its lapsed lease held until another server process's promise ends
    /// (`work::hold_lease`), when one may hold it ([`Self::promise_holding`]); `None` when its
    /// lease is live, or lapsed and free to be settled.
    pub(crate) async fn held_lease(
        &self,
        item: &WorkItem,
        now: Timestamp,
    ) -> Result<Option<WorkItem>> {
        if !work::lease_lapsed(item, now) {
            return Ok(None);
        }
        let deadline = item
            .lease_expires_at
            .expect("a lapsed lease has a deadline");
        Ok(self
            .promise_holding(deadline, now)
            .await?
            .and_then(|until| work::hold_lease(item, until)))
    }

    /// Until when another server process's promise holds a lease due at `deadline`, at `now`
    /// (`None`: it may be settled), by the marks read last, or read again first when one written
    /// since could promise it (`lease::marks_to_read_again`). A read costs one small query, and
    /// only a lease about to be settled asks for it. Every settling of a lease asks this first, so
    /// the amnesty an outage of this process calls for, and the promise an earlier run of it may
    /// have made, are kept before.
    async fn promise_holding(
        &self,
        deadline: Timestamp,
        now: Timestamp,
    ) -> Result<Option<Timestamp>> {
        self.keep_own_promises().await?;
        let read_at = self.last_marks_read().map(|read| read.at);
        if self.store.shared() && tether_core::lease::marks_to_read_again(deadline, read_at) {
            self.look_for_other_lease_keepers().await?;
        }
        Ok(self.expiry_held_at(now))
    }

    /// Keeps the promise an earlier run of this process (the same server id: the same host,
    /// address and boot) may have made its workers from its last mark, cut off from the database
    /// and then stopped: this run's first mark replaces that one, and with it the others' hold.
    /// So before this run settles a lease, writes its mark or takes it back, it grants amnesty
    /// into the leases up to that promise's end, once (a read that fails is tried again by the
    /// next caller).
    pub(crate) async fn keep_earlier_runs_promise(&self) -> Result<()> {
        use std::sync::atomic::Ordering;
        if self.earlier_runs_promise_kept.load(Ordering::SeqCst) {
            return Ok(());
        }
        let _keeping = self.earlier_runs_promise_keeping.lock().await;
        if self.earlier_runs_promise_kept.load(Ordering::SeqCst) {
            return Ok(());
        }
        if self.store.shared() {
            let earlier = self.store.lease_keeper_mark_of(&self.server_id).await?;
            let now = self.now();
            // As long as the others held every lease for it while the mark was theirs to read:
            // any of them may settle what this grants, by its own clock (1 ms more for the
            // rounding down).
            let held = earlier.and_then(|mark| tether_core::lease::expiry_held_until(&[mark], now));
            if let Some(until) = held {
                let granted = self.grant_amnesty_for(until.millis_since(now) + 1).await?;
                tracing::info!(
                    granted,
                    until = %until,
                    "lease amnesty for what an earlier run of this server may have promised"
                );
            }
        }
        self.earlier_runs_promise_kept.store(true, Ordering::SeqCst);
        Ok(())
    }

    /// What this process last read of the other processes' marks (a copy).
    fn last_marks_read(&self) -> Option<super::MarksRead> {
        *self.marks_read.lock().expect("marks read lock")
    }

    /// Keeps what this process may have promised its workers before it settles a lease or
    /// writes or takes back its mark: an earlier run's promise
    /// ([`Self::keep_earlier_runs_promise`]) and the amnesty an outage calls for
    /// ([`Self::amnesty_after_outage`]).
    async fn keep_own_promises(&self) -> Result<()> {
        self.keep_earlier_runs_promise().await?;
        self.amnesty_after_outage().await?;
        Ok(())
    }

    /// Whether no other server process kept the leases when this one last looked
    /// ([`Self::look_for_other_lease_keepers`]): then an outage's 503s promise amnesty, and the
    /// amnesty after it is owed.
    fn alone_at_last_look(&self) -> bool {
        !self.last_marks_read().is_some_and(|read| read.others_keep)
    }

    /// Lease amnesty at start (§3.1), unless another server process sharing the store has just
    /// been checking the leases (`lease::others_keep_leases`). `None` when it was not due. The
    /// promise an earlier run of this process may have made is kept first, in any case
    /// ([`Self::keep_earlier_runs_promise`]).
    pub async fn amnesty_at_start(&self) -> Result<Option<usize>> {
        self.keep_earlier_runs_promise().await?;
        if self.look_for_other_lease_keepers().await? {
            return Ok(None);
        }
        self.grant_amnesty().await.map(Some)
    }

    /// Tells the other server processes sharing the store that this one has just checked the
    /// leases (after a pass of [`Self::expire_due_leases`] that succeeded), and notes whether one
    /// of them has too ([`Self::lease_amnesty_promise`]). A no-op on a store of this process's own.
    pub async fn mark_leases_kept(&self) -> Result<()> {
        if !self.store.shared() {
            return Ok(());
        }
        // The mark replaces the last one, and the promise in it: keep that promise first. A call
        // before, so that a reconnection not yet counted is, and the amnesty it may owe granted:
        // a mark written first would tell the others that the leases were kept meanwhile.
        self.store.ping().await?;
        self.keep_own_promises().await?;
        let mut mark = tether_core::lease::LeaseKeeperMark::new(self.now(), self.config.tick);
        if self.alone_at_last_look() {
            // What an outage before the next mark may promise; written before it is promised.
            mark = mark.promising(self.config.amnesty_grace_ms);
        }
        {
            // A commit that fails may still have been written: until it is known to have been,
            // promise no more than the less of the two marks says.
            let mut own = self.own_lease_mark.lock().expect("own lease mark lock");
            if let Some(last) = own.as_mut() {
                last.promises_until = last.promises_until.min(mark.promises_until);
            }
        }
        self.commit(ChangeSet::one(Write::MarkLeasesKept {
            server_id: self.server_id.clone(),
            mark,
        }))
        .await?;
        *self.own_lease_mark.lock().expect("own lease mark lock") = Some(mark);
        self.look_for_other_lease_keepers().await?;
        Ok(())
    }

    /// Tells the other server processes sharing the store that this one has stopped keeping the
    /// leases: a server that starts next, beside no other, grants amnesty for the time none kept
    /// them, rather than waiting out this one's last mark (three of its ticks). The mark says what
    /// this process may have promised during an outage; the amnesty that promise is owed is
    /// granted first, into the leases themselves, since the others stop honouring it with the mark.
    pub async fn unmark_leases_kept(&self) -> Result<()> {
        if !self.store.shared() {
            return Ok(());
        }
        // A call first, so that a reconnection not yet counted is, and its amnesty granted.
        self.store.ping().await?;
        self.keep_own_promises().await?;
        self.commit(ChangeSet::one(Write::UnmarkLeasesKept {
            server_id: self.server_id.clone(),
        }))
        .await?;
        Ok(())
    }

    /// Whether another server process sharing the store keeps the leases (`lease::others_keep_leases`),
    /// noted for [`Self::lease_amnesty_promise`] too: from the start on, before the first tick's
    /// mark, an outage then promises nothing that another server could break. Never on a store of
    /// this process's own.
    async fn look_for_other_lease_keepers(&self) -> Result<bool> {
        // Before the read: every mark committed by then is in it.
        let read_at = self.now();
        let marks = if self.store.shared() {
            self.store
                .lease_keeper_marks_elsewhere(&self.server_id)
                .await?
        } else {
            Vec::new()
        };
        let now = self.now();
        let others_keep = tether_core::lease::others_keep_leases(&marks, now);
        self.note_marks_read(&marks, read_at, others_keep, now);
        Ok(others_keep)
    }

    /// Notes what the marks read at `read_at` say ([`Self::alone_at_last_look`],
    /// [`Self::expiry_allowed`]), unless a later read was noted meanwhile, and says so when a hold
    /// begins.
    fn note_marks_read(
        &self,
        marks: &[tether_core::lease::LeaseKeeperMark],
        read_at: Timestamp,
        others_keep: bool,
        now: Timestamp,
    ) {
        let held_until = tether_core::lease::expiry_held_until(marks, now);
        let mut last = self.marks_read.lock().expect("marks read lock");
        if last.is_some_and(|last| last.at > read_at) {
            return;
        }
        let held_before = last
            .and_then(|last| last.expiry_held_until)
            .is_some_and(|until| until >= now);
        *last = Some(super::MarksRead {
            at: read_at,
            others_keep,
            expiry_held_until: held_until,
        });
        drop(last);
        if let (Some(until), false) = (held_until, held_before) {
            tracing::info!(
                until = %until,
                "another server may have promised its workers lease amnesty, should it lose \
                 the database: no lease expires before then"
            );
        }
    }

    /// Lease amnesty (§3.1): no lease expires because this process, or its database, was away.
    pub async fn grant_amnesty(&self) -> Result<usize> {
        self.grant_amnesty_for(self.config.amnesty_grace_ms).await
    }

    /// [`Self::grant_amnesty`] with a grace of `grace` milliseconds.
    async fn grant_amnesty_for(&self, grace: i64) -> Result<usize> {
        let mut granted = 0;
        // One `now` for the whole pass: an extended deadline equals the horizon, so it is not read again.
        let now = self.now();
        loop {
            let due = self
                .store
                .leases_due_before(now.plus_millis(grace), EXPIRY_BATCH)
                .await?;
            if due.is_empty() {
                return Ok(granted);
            }
            for item in due {
                let Some(next) = work::grant_amnesty(&item.value, now, grace) else {
                    continue;
                };
                let write = Write::UpdateWork {
                    item: next,
                    expected_version: item.version,
                    transitions: Vec::new(),
                    session_version: None,
                };
                match self.commit(ChangeSet::one(write)).await {
                    Ok(()) => granted += 1,
                    Err(tether_store::StoreError::Conflict) => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
    }
}

fn unchanged(item: &WorkItem) -> Step {
    Step::unchanged(item)
}

pub(super) fn not_found_work(work_id: &str) -> Error {
    Error::not_found(Missing::Work, work_id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_candidate_is_taken_by_one_poll_at_a_time() {
        let mut claims = Claims::default();
        assert!(claims.take("work_a", 3, None));
        assert!(!claims.take("work_a", 3, None), "another poll is taking it");
        assert!(claims.take("work_b", 3, None), "other items are free");
        claims.taking.remove("work_a");
        assert!(
            claims.take("work_a", 3, None),
            "free again once the first poll let go"
        );
    }

    #[test]
    fn a_candidate_read_before_a_delivery_here_is_passed_over() {
        let mut claims = Claims::default();
        assert!(claims.take("work_a", 3, Some(3)));
        claims.taking.remove("work_a");
        assert!(
            !claims.take("work_a", 3, Some(4)),
            "read before the delivery: stale"
        );
        assert!(
            claims.take("work_a", 4, Some(4)),
            "read after it (e.g. reclaimable again): may be taken"
        );
    }

    #[test]
    fn an_items_weight_is_near_its_size_as_json() {
        let now = Timestamp::from_micros(1_700_000_000_000_000);
        let mut item = work::enqueue(
            ids::new_id(IdKind::Work),
            ids::new_id(IdKind::Environment),
            WorkData::session(ids::new_id(IdKind::Session)),
            Default::default(),
            now,
            None,
            &tether_core::LeasePolicy::default(),
        )
        .item;
        item.owner_worker_id = Some("worker-1".into());
        item.session_token_hash = Some("f".repeat(64));
        item.session_token_issuer = Some(format!("tok_{}", "0".repeat(32)));
        let full: tether_core::metadata::Metadata = (0..tether_core::metadata::MAX_KEYS)
            .map(|i| {
                (
                    format!("{i:0>64}"),
                    "v".repeat(tether_core::metadata::MAX_VALUE_CHARS),
                )
            })
            .collect();
        for metadata in [Default::default(), full] {
            item.metadata = metadata;
            let (estimate, json) = (
                item_weight(&item, usize::MAX),
                crate::service::events::json_size_up_to(&item, usize::MAX - 1),
            );
            assert!(
                json <= estimate && estimate <= 2 * json,
                "estimate {estimate} for {json} bytes of JSON"
            );
        }
    }
}

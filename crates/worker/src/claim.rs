//! The claim loop (§8 step 1): long polls with the Worker-ID while a slot is free, hands each item to its
//! own supervisor, backs off on transient failures, and gives up with a clear message on refusals that
//! trying again cannot fix.
//!
//! A Tether server takes a claim (`POST …/work/claim`): the poll, the ack and the first heartbeat
//! in one request, so that an item costs the server two requests and two writes fewer. A server
//! without it (another platform, an older Tether) answers 404 or 405 there; the loop then polls as
//! §8 says, and tries a claim again after [`CLAIMS_AGAIN_AFTER`] (the server may have been upgraded).

use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::Rng as _;

use tether_client::{ClaimOptions, ClaimTry, Client, Error, PollOptions, WorkItem};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

use crate::backoff::Backoff;
use crate::status::{Activity, Holdup};
use crate::{reached, supervisor, Phase, Shared};

/// The longest wait a poll may ask for (§6.2).
const LONG_POLL_MS: u32 = 999;
/// How long a claim under way as the drain begins is waited for: the longest `block_ms` and a
/// second more. The drain time starts once it is answered or given up.
const CLAIM_ANSWERED_IN_DRAIN: Duration = Duration::from_millis(LONG_POLL_MS as u64 + 1_000);
/// The longest wait before a claim whose answer was not heard is sent again: well within any lease
/// (10 s at the least), whatever the backoff has grown to.
const CLAIM_SENT_AGAIN_WITHIN: Duration = Duration::from_secs(2);
/// How long a worker that began draining goes on asking for the item of a claim whose answer it
/// did not hear (`ask_again_taking_nothing`), and how often.
const CLAIM_ASKED_AGAIN_IN_DRAIN: Duration = Duration::from_secs(5);
const CLAIM_SENT_AGAIN_IN_DRAIN_EVERY: Duration = Duration::from_millis(500);
/// How long a worker polls a server that took no claim before it tries a claim again.
pub(crate) const CLAIMS_AGAIN_AFTER: Duration = Duration::from_secs(300);
/// An empty answer sooner than this did not wait for work (see the claim loop).
const EARLY_EMPTY_POLL: Duration = Duration::from_millis(LONG_POLL_MS as u64 / 2);
/// How long a poll's answer may take beyond its wait. A server answers a long poll when the wait is
/// over; a poll without an answer by then most likely went on a connection that is gone without a
/// word (a NAT or a failover forgot it), and the client's 30 s would leave the worker claiming
/// nothing for that long.
const POLL_ANSWER_WITHIN: Duration = Duration::from_secs(10);

/// What the polls of one idle stretch (no item claimed or running) heard from the server.
#[derive(Debug, PartialEq, Eq)]
enum IdleStretch {
    /// No poll was tried yet.
    Untried,
    /// None was answered; the last failure, in words.
    Unanswered(String),
    /// One was: whatever the others did, the server was reached and found no work.
    Answered,
}

/// Claims work until the worker stops claiming (any phase past `Running`, the one item of `run-one`,
/// `--max-idle` without work), or a refusal says that claiming cannot work (the error explains why).
/// Supervisors go into `tasks`; `Shared::took_any` says whether there were any.
pub async fn run(
    shared: Arc<Shared>,
    concurrency: usize,
    tasks: &mut JoinSet<()>,
) -> crate::Result<()> {
    let shared = &shared;
    let mut idle_since = Instant::now();
    let slots = Arc::new(Semaphore::new(concurrency));
    let mut options = ClaimOptions {
        poll: PollOptions {
            block_ms: Some(LONG_POLL_MS),
            worker_id: Some(shared.worker_id.clone()),
            timeout: Some(POLL_ANSWER_WITHIN),
            ..Default::default()
        },
        desired_ttl_seconds: shared.desired_ttl,
        ..Default::default()
    };
    // The claim under way, until an answer is heard (see `ClaimTries`).
    let mut tries: Option<ClaimTries> = None;
    let until_drain = claim_until_drain(
        shared,
        (&slots, tasks),
        &mut idle_since,
        &mut options,
        &mut tries,
    );
    let result = until_drain.await;
    // After a fatal refusal the worker exits at once: nothing more is sent.
    if let (Ok(()), Some(unheard)) = (&result, tries.filter(|tries| tries.unheard)) {
        // The loop's slot was given back as it ended: one is free. The ask runs as a task of the
        // drain, so that the drain time counts it and its end stops it.
        let slot = slots.clone().try_acquire_owned();
        let slot = slot.expect("the claim loop's slot is free once it has ended");
        let asking = AskingForLostClaim::new(shared.clone());
        tasks.spawn(ask_again_taking_nothing(options, unheard, slot, asking));
    }
    result
}

/// Hands an item to a supervisor of its own, which holds `slot` while it runs, and notes that one
/// was taken (`Shared::took_any`): the one way every item, however it came, is served.
fn hand_over(
    shared: &Arc<Shared>,
    item: WorkItem,
    taken: supervisor::Taken,
    slot: OwnedSemaphorePermit,
) -> impl std::future::Future<Output = ()> + Send + 'static {
    shared
        .took_any
        .store(true, std::sync::atomic::Ordering::Relaxed);
    supervisor::serve(shared.clone(), item, taken, slot)
}

/// The claim loop proper, until the worker stops claiming. `tries` is left holding a claim whose
/// answer was not heard, if the loop ends with one.
async fn claim_until_drain(
    shared: &Arc<Shared>,
    (slots, tasks): (&Arc<Semaphore>, &mut JoinSet<()>),
    idle_since: &mut Instant,
    options: &mut ClaimOptions,
    tries: &mut Option<ClaimTries>,
) -> crate::Result<()> {
    let mut phase = shared.phase.clone();
    let mut backoff = Backoff::poll();
    let report = &shared.report;
    let mut claim_support = ClaimSupport::Assumed;
    // After a poll that got no answer, the next goes on a connection of its own: the pooled one it
    // went on may be dead, and so may others in the pool.
    let mut fresh_connection = false;
    // What the polls of the idle stretch so far heard: a worker that never reached its server was
    // not idle, and `--max-idle` must not end it as if it were (under cron or an autoscaler, a
    // mistyped --server would look like a quiet queue).
    let mut heard = IdleStretch::Untried;
    // Since when polls have failed, and how many: the first that succeeds after them is said, or a
    // warning that the server could not be reached would stay the last word in the log.
    let mut failing: Option<(Instant, u32)> = None;
    // Since when claims' tries have gone unheard, across claims (see `UnheardStretch`).
    let mut unheard = UnheardStretch::default();
    // PROGRAM could not run at the last look: its return is said, as its going was.
    let mut program_gone = false;
    loop {
        while tasks.try_join_next().is_some() {}
        let any_taken = shared.took_any.load(std::sync::atomic::Ordering::Relaxed);
        if *phase.borrow() != Phase::Running || (shared.run_one && any_taken) {
            return Ok(());
        }
        if !tasks.is_empty() {
            *idle_since = Instant::now();
            heard = IdleStretch::Untried;
        } else if let Some(max_idle) = shared.max_idle {
            // A stretch is judged once a poll was tried in it, however short --max-idle is.
            if idle_since.elapsed() >= max_idle && heard != IdleStretch::Untried {
                let max_idle = format!("{}s", max_idle.as_secs_f64());
                if let IdleStretch::Unanswered(why) = heard {
                    return Err(crate::Error::Unreached(format!(
                        "the server answered no poll for --max-idle ({max_idle}), so the queue \
                         may not be idle at all; the last try: {why}. Check --server / \
                         TETHER_SERVER ({})",
                        shared.client.server_url()
                    )));
                }
                report.info(
                    "no work for --max-idle: exiting",
                    &[("max_idle", &max_idle)],
                );
                return Ok(());
            }
        }
        let slot = match slots.clone().try_acquire_owned() {
            Ok(slot) => slot,
            Err(_) => {
                report.activity(Activity::Full);
                tokio::select! {
                    slot = slots.clone().acquire_owned() => slot.expect("the semaphore is never closed"),
                    _ = reached(&mut phase, Phase::Draining) => return Ok(()),
                }
            }
        };
        // What went wrong, when the next poll must wait for the backoff: why (for the status line), a
        // message and what it is about (for the log).
        let cannot = cannot_run(shared);
        if std::mem::replace(&mut program_gone, cannot.is_some()) && cannot.is_none() {
            report.info("PROGRAM can run again: taking work", &[]);
        }
        let (holdup, trouble, about) = if let Some(why) = cannot {
            // PROGRAM was removed, replaced or made non-executable since start-up: every item it
            // were handed would fail at once (exit 127) and take a session's turn with it. Claim
            // nothing until it can run again.
            (
                Holdup::ProgramCannotRun,
                "PROGRAM cannot run: taking no work until it can",
                vec![("reason", why)],
            )
        } else {
            report.activity(Activity::Polling);
            let asked = Instant::now();
            let client = if fresh_connection {
                shared.client.on_fresh_connections()
            } else {
                shared.client.clone()
            };
            let claims = claim_support.claims_now(tokio::time::Instant::now());
            let sent = tokio::time::Instant::now();
            if claims {
                ClaimTries::before_try(tries, sent, options);
            }
            let polled = tokio::select! {
                polled = take(&client, &shared.environment_id, options, claims) => polled,
                () = given_up(&mut phase, claims) => {
                    // Not answered in time: the claim may have taken an item all the same.
                    ClaimTries::answered(tries, TryOutcome::Unheard);
                    return Ok(());
                }
            };
            if claims && polled.as_ref().is_err_and(no_claims_here) {
                report.info(
                    "the server takes no claims: polling, acknowledging and heartbeating instead",
                    &[],
                );
                claim_support = ClaimSupport::RefusedAt(tokio::time::Instant::now());
                // Nothing was claimed: the next claim, once tried again, is a new one.
                *tries = None;
                continue;
            }
            let earlier_try = matches!(&polled, Ok(Some((_, Some(taken)))) if taken.earlier_try);
            let lease_from = ClaimTries::lease_start(tries.as_ref(), sent, earlier_try);
            if claims {
                ClaimTries::after_try(tries, &mut unheard, TryOutcome::of(&polled), sent);
            }
            fresh_connection = !crate::error::answered(&polled);
            match (&polled, &mut failing) {
                (Ok(_), Some((since, failed))) => {
                    let over = since.elapsed().as_secs_f64();
                    report.info(
                        &format!("polls succeed again, after {failed} failed over {over:.1}s"),
                        &[],
                    );
                    failing = None;
                }
                // From when the first failed poll was sent.
                (Err(_), Some((_, failed))) => *failed += 1,
                (Err(_), None) => failing = Some((asked, 1)),
                (Ok(_), None) => {}
            }
            // Only a poll's answer tells whether the queue is idle: a 503 does not either.
            heard = match (&polled, heard) {
                (Ok(_), _) | (Err(_), IdleStretch::Answered) => IdleStretch::Answered,
                (Err(e), _) => IdleStretch::Unanswered(crate::error::described(e)),
            };
            match polled {
                // An id the worker would make paths of (its work directory, its log file, its cgroups)
                // must be a plain name: a server that hands out `../x` or `/x` is not trusted with them.
                Ok(Some((item, _))) if !is_plain_name(&item.id) => (
                    Holdup::RefusedItem,
                    NOT_A_PLAIN_NAME,
                    vec![("work_id", format!("{:?}", item.id))],
                ),
                Ok(Some((item, taken))) => match cannot_run(shared).filter(|_| taken.is_none()) {
                    // PROGRAM went between the check above and this answer: a polled item is left
                    // unacked, and the server hands it out again after its reclaim window. (A
                    // claimed item is held, its lease kept, until PROGRAM can run again, as a
                    // passing shortage is: `supervisor`. Either way no more work is taken.)
                    Some(why) => (
                        Holdup::ProgramCannotRun,
                        "PROGRAM cannot run: leaving the item it was handed to be handed out again",
                        vec![("work_id", item.id), ("reason", why)],
                    ),
                    // Capacity left and work found: poll again at once.
                    None => {
                        backoff.reset();
                        *idle_since = Instant::now();
                        let taken = match taken {
                            Some(taken) => supervisor::Taken::Claimed {
                                sent: lease_from,
                                first: taken.lease,
                            },
                            None => supervisor::Taken::Polled,
                        };
                        tasks.spawn(hand_over(shared, item, taken, slot));
                        continue;
                    }
                },
                // The long poll already waited.
                Ok(None) if asked.elapsed() >= EARLY_EMPTY_POLL => {
                    backoff.reset();
                    continue;
                }
                // Nothing, and at once: a server that does not hold polls (or is shutting down) would
                // otherwise be polled as fast as it answers. §8: sleep a random 1–3 s.
                Ok(None) => {
                    backoff.reset();
                    let pause = Duration::from_millis(rand::rng().random_range(1_000..=3_000));
                    if !waited(&mut phase, pause).await {
                        return Ok(());
                    }
                    continue;
                }
                Err(e) if is_fatal(&e) => return Err(explain(&e, shared)),
                Err(e) => (
                    Holdup::PollFailed,
                    "poll failed; retrying",
                    vec![("error", crate::error::described(&e))],
                ),
            }
        };
        // A claim is sent again soon only when one goes out next: while PROGRAM cannot run,
        // nothing does, and the backoff keeps its pace (the supervisor holds what was taken).
        let delay = match holdup {
            Holdup::ProgramCannotRun => backoff.next_delay(),
            _ => ClaimTries::wait_before_next(
                tries.as_ref(),
                &unheard,
                backoff.next_delay(),
                tokio::time::Instant::now(),
            ),
        };
        let retry_in = format!("{:.1}s", delay.as_secs_f64());
        let mut fields: Vec<(&str, &str)> = about.iter().map(|(k, v)| (*k, v.as_str())).collect();
        fields.push(("retry_in", &retry_in));
        report.warn(trouble, &fields);
        report.activity(Activity::Backoff(holdup, delay));
        if !waited(&mut phase, delay).await {
            return Ok(());
        }
    }
}

/// Returns when a take under way is given up, once the drain has begun. An item a poll would have
/// been handed is handed out again after the reclaim window: a poll is given up at once. A claim
/// may have taken an item already, leased to this worker until its TTL runs out: its answer is
/// waited for, for [`CLAIM_ANSWERED_IN_DRAIN`] (a server answers a claim within its `block_ms`), and
/// an item it brings is served as one that was running when the drain began; one not answered by
/// then is asked for again, taking nothing new (`ask_again_taking_nothing`).
async fn given_up(phase: &mut tokio::sync::watch::Receiver<Phase>, claims: bool) {
    reached(phase, Phase::Draining).await;
    if claims {
        tokio::select! {
            () = tokio::time::sleep(CLAIM_ANSWERED_IN_DRAIN) => {}
            () = reached(phase, Phase::Terminating) => {}
        }
    }
}

/// A claim whose answer was not heard when the worker stopped claiming (the drain began during its
/// try or its wait to be sent again) is sent again, taking no new work (`retry=only`): the item an
/// earlier try took, if one did, is served as one that was running when the drain began, rather
/// than left leased to nobody until its lease runs out and counted as a requeue. Tried until a try
/// is answered or refused, for up to [`CLAIM_ASKED_AGAIN_IN_DRAIN`], and not once the drain time
/// is up (this runs as one of the drain's tasks, holding the slot the item would run in).
async fn ask_again_taking_nothing(
    mut options: ClaimOptions,
    tries: ClaimTries,
    slot: OwnedSemaphorePermit,
    asking: AskingForLostClaim,
) {
    let shared = asking.0.clone();
    tries.ask(&mut options);
    options.retry = ClaimTry::AgainTakingNothing;
    // Answered at once, waiting for nothing: the client's timeout is this one alone.
    options.poll.block_ms = None;
    options.poll.timeout = Some(CLAIM_ANSWERED_IN_DRAIN);
    let mut phase = shared.phase.clone();
    let until = tokio::time::Instant::now() + CLAIM_ASKED_AGAIN_IN_DRAIN;
    shared.report.info(
        "asking again for the item of a claim whose answer was lost, taking no new work",
        &[],
    );
    let client = shared.client.on_fresh_connections();
    loop {
        let sent = tokio::time::Instant::now();
        let asked = tokio::select! {
            asked = take(&client, &shared.environment_id, &options, true) => asked,
            () = reached(&mut phase, Phase::Terminating) => return,
        };
        let outcome = TryOutcome::of(&asked);
        match asked {
            Ok(Some((item, Some(taken)))) if is_plain_name(&item.id) => {
                shared.report.info(
                    "the lost answer's item: running it as one taken before the drain",
                    &[("work_id", &item.id)],
                );
                // (An item that is not an earlier try's cannot come from a server that knows
                // `only`, and one that does not refuses it; it would be leased from this try.)
                let taken = supervisor::Taken::Claimed {
                    sent: ClaimTries::lease_start(Some(&tries), sent, taken.earlier_try),
                    first: taken.lease,
                };
                drop(asking);
                hand_over(&shared, item, taken, slot).await;
                return;
            }
            // Nothing taken by an earlier try (or an item not to run, which its lease returns).
            Ok(_) => return,
            // Refused (a server that does not know `only`, a credential revoked): nothing to ask.
            Err(_) if outcome == TryOutcome::Heard => return,
            Err(_) => {}
        }
        if tokio::time::Instant::now() + CLAIM_SENT_AGAIN_IN_DRAIN_EVERY >= until
            || !waited_until(
                &mut phase,
                CLAIM_SENT_AGAIN_IN_DRAIN_EVERY,
                Phase::Terminating,
            )
            .await
        {
            return;
        }
    }
}

/// `Shared::asking_for_lost_claim`, set for as long as this lives: made before the ask's task is
/// spawned and moved into it, so that the flag goes down whichever way the task ends, dropped
/// unpolled included, and before an item the ask brings runs.
struct AskingForLostClaim(Arc<Shared>);

impl AskingForLostClaim {
    fn new(shared: Arc<Shared>) -> AskingForLostClaim {
        let flag = &shared.asking_for_lost_claim;
        flag.store(true, std::sync::atomic::Ordering::Relaxed);
        AskingForLostClaim(shared)
    }
}

impl Drop for AskingForLostClaim {
    fn drop(&mut self) {
        let flag = &self.0.asking_for_lost_claim;
        flag.store(false, std::sync::atomic::Ordering::Relaxed);
    }
}

/// What a claim's answer says of the lease beside its item.
struct ClaimedLease {
    /// The answer of the first heartbeat the claim made.
    lease: tether_client::Heartbeat,
    /// The item is the one an earlier try of this claim took (`Claim::earlier_try`).
    earlier_try: bool,
}

/// Takes an item: by a claim when `claims`, else by a poll (§6.2). A claimed item comes with its
/// lease.
async fn take(
    client: &Client,
    environment_id: &str,
    options: &ClaimOptions,
    claims: bool,
) -> tether_client::Result<Option<(WorkItem, Option<ClaimedLease>)>> {
    if claims {
        let claim = client.claim_work(environment_id, options).await?;
        return Ok(claim.map(|c| {
            let lease = ClaimedLease {
                lease: c.lease,
                earlier_try: c.earlier_try,
            };
            (c.work, Some(lease))
        }));
    }
    let item = client.poll_work(environment_id, &options.poll).await?;
    Ok(item.map(|item| (item, None)))
}

/// The tries of one claim, sent until one is heard: a claim that may have taken an item without
/// the worker hearing of it ([`TryOutcome::Unheard`]) is sent again with the same idempotency
/// key and `retry=true` (`retry=only` once the worker drains: `ask_again_taking_nothing`), and the
/// server answers the item an earlier try took (`earlier_try`), rather than leave it leased to
/// nobody for the lease's whole length.
#[derive(Debug)]
pub(crate) struct ClaimTries {
    /// 128 random bits, as 32 hex digits. With the worker's key, it makes the claim's session
    /// token: it is never logged.
    key: String,
    /// When the first try went out: the earliest its item's lease can have started.
    first_sent: tokio::time::Instant,
    /// A try was sent whose answer was not heard: the next is one sent again.
    unheard: bool,
}

impl ClaimTries {
    pub(crate) fn first_at(sent: tokio::time::Instant) -> ClaimTries {
        let bits: u128 = rand::rng().random();
        ClaimTries {
            key: format!("{bits:032x}"),
            first_sent: sent,
            unheard: false,
        }
    }

    /// Sets the next try's key, and whether it is one sent again.
    pub(crate) fn ask(&self, options: &mut ClaimOptions) {
        options.idempotency_key = Some(self.key.clone());
        options.retry = match self.unheard {
            true => ClaimTry::Again,
            false => ClaimTry::First,
        };
    }

    /// When the lease of an item a claim's try sent at `sent` brought began, at the earliest: an
    /// item an earlier try took (`earlier_try`) was leased when that try committed, so its lease
    /// counts from when the first try went out, however much later this answer brings it.
    pub(crate) fn lease_start(
        tries: Option<&ClaimTries>,
        sent: tokio::time::Instant,
        earlier_try: bool,
    ) -> tokio::time::Instant {
        match tries {
            Some(tries) if earlier_try => tries.first_sent,
            _ => sent,
        }
    }

    /// Before a claim's try sent at `sent`: the claim it belongs to (a new one when there is none,
    /// or the last lapsed), whose key and kind of try go into `options`.
    fn before_try(
        tries: &mut Option<ClaimTries>,
        sent: tokio::time::Instant,
        options: &mut ClaimOptions,
    ) {
        ClaimTries::forget_once_lapsed(tries, sent, LONGEST_LEASE);
        tries
            .get_or_insert_with(|| ClaimTries::first_at(sent))
            .ask(options);
    }

    /// After a claim's try sent at `sent`: what its outcome says of the claim and of the stretch
    /// of unheard tries.
    fn after_try(
        tries: &mut Option<ClaimTries>,
        unheard: &mut UnheardStretch,
        outcome: TryOutcome,
        sent: tokio::time::Instant,
    ) {
        ClaimTries::answered(tries, outcome);
        unheard.after(outcome, sent);
    }

    /// How long to wait at `now` before the next take, the backoff having said `backoff`: a claim
    /// sent again goes within [`CLAIM_SENT_AGAIN_WITHIN`] while tries have not gone unheard for a
    /// lease (`UnheardStretch::sends_again_soon`). The item it may have taken is leased from its
    /// first try; at the poll's backoff (up to a minute) the try would come after the lease.
    fn wait_before_next(
        tries: Option<&ClaimTries>,
        unheard: &UnheardStretch,
        backoff: Duration,
        now: tokio::time::Instant,
    ) -> Duration {
        match tries {
            Some(tries) if tries.unheard && unheard.sends_again_soon(now) => {
                backoff.min(CLAIM_SENT_AGAIN_WITHIN)
            }
            _ => backoff,
        }
    }

    /// Forgets a claim unheard for longer than a lease: an item it took has lapsed by now (and
    /// gone back to the queue), unless the server kept it through an outage of its database
    /// (lease amnesty), and then it goes back once that lease lapses. The worker cannot tell when
    /// such an item's lease began, so it asks for it no more: the next claim is a new one.
    fn forget_once_lapsed(
        tries: &mut Option<ClaimTries>,
        now: tokio::time::Instant,
        lease: Duration,
    ) {
        if tries
            .as_ref()
            .is_some_and(|claim| claim.unheard && now >= claim.first_sent + lease)
        {
            *tries = None;
        }
    }

    /// After a try: heard, the claim is over (the next claim is a new one); unheard, the next
    /// try is this claim's again. A try that did not reach the server changes nothing: a claim
    /// already unheard stays so (an earlier try may still have taken an item), and a first try
    /// took nothing.
    pub(crate) fn answered(tries: &mut Option<ClaimTries>, outcome: TryOutcome) {
        match (tries.as_mut(), outcome) {
            (Some(claim), TryOutcome::Unheard) => claim.unheard = true,
            (Some(claim), TryOutcome::NotReached) if claim.unheard => {}
            _ => *tries = None,
        }
    }
}

/// Since when every try of a claim has gone unheard, across claims: a try heard (or a claim
/// refused) ends the stretch, and one that did not reach the server leaves it as it is.
///
/// A claim unheard is sent again within [`CLAIM_SENT_AGAIN_WITHIN`], so that an item it took is
/// not left leased to nobody; but a server that answers every try with a 5xx (a proxy in front
/// of one that is down) most likely takes nothing, and would be sent a try every two seconds for
/// as long as it stays down, each new claim starting the pace again once the one before was
/// forgotten (`ClaimTries::forget_once_lapsed`). Past a lease of unheard tries, tries go at the
/// backoff's pace: a claim still sent again with its key, only later.
#[derive(Debug, Default, PartialEq, Eq)]
struct UnheardStretch {
    since: Option<tokio::time::Instant>,
}

impl UnheardStretch {
    /// Notes the outcome of a claim's try sent at `sent`.
    fn after(&mut self, outcome: TryOutcome, sent: tokio::time::Instant) {
        match outcome {
            TryOutcome::Heard => self.since = None,
            TryOutcome::Unheard => self.since = self.since.or(Some(sent)),
            TryOutcome::NotReached => {}
        }
    }

    /// Whether a claim unheard is sent again soon: tries have not gone unheard for a whole lease.
    fn sends_again_soon(&self, now: tokio::time::Instant) -> bool {
        self.since.is_none_or(|since| now < since + LONGEST_LEASE)
    }
}

/// What one try of a take says of whether it took an item.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum TryOutcome {
    /// Answered (the answer read whole) or refused: whatever it took, the worker knows.
    Heard,
    /// It may have taken an item that its answer never brought: no answer came (a timeout, a
    /// connection lost), or one that cannot be read (a body cut short), or a 5xx (a database
    /// connection lost during the commit may have committed it). A claim is then tried again
    /// with the same key.
    Unheard,
    /// It did not reach the queue: the connection was refused, or the server turned it away
    /// before looking at it (408, 429).
    NotReached,
}

impl TryOutcome {
    pub(crate) fn of<T>(result: &tether_client::Result<T>) -> TryOutcome {
        match result {
            Ok(_) => TryOutcome::Heard,
            Err(Error::Connect { .. }) => TryOutcome::NotReached,
            Err(e) => match e.status() {
                Some(408 | 429) => TryOutcome::NotReached,
                // 501: the server does not know the request at all (nor answers it with Tether's
                // envelope): it took nothing.
                Some(300..=499 | 501) => TryOutcome::Heard,
                _ => TryOutcome::Unheard,
            },
        }
    }
}

/// How long an item a claim took can stay leased, from the claim's sending: the longest lease any
/// server gives (§5.2's bound, 600 s). Nothing shorter is safe to assume: the server clamps `--ttl`
/// into bounds of its own, and a claim that asks none keeps the TTL an earlier heartbeat set on
/// the item (D-9b).
const LONGEST_LEASE: Duration =
    Duration::from_secs(tether_core::lease::LeasePolicy::MAX_TTL_SECONDS as u64);

/// Whether a refused claim says that the server has no claim endpoint (404 for a path it does not
/// know, 405 for a method): not an environment it does not know, which is `environment_not_found`.
fn no_claims_here(e: &Error) -> bool {
    match e.status() {
        Some(404) => e.code() != Some("environment_not_found"),
        // Some servers answer a method they do not implement so; a poll then says whether they
        // are Tether's peers at all.
        Some(405 | 501) => true,
        _ => false,
    }
}

/// Why PROGRAM cannot run now (its path and the reason), or None when it can.
pub(crate) fn cannot_run(shared: &Shared) -> Option<String> {
    let why = shared.program.runnable().err()?;
    Some(format!("{}: {why}", shared.program.path.display()))
}

/// Waits `delay` before the next poll; false when the worker began draining meanwhile (and claims
/// no more).
async fn waited(phase: &mut tokio::sync::watch::Receiver<Phase>, delay: Duration) -> bool {
    waited_until(phase, delay, Phase::Draining).await
}

/// Waits `delay`; false when the worker reached `until` meanwhile.
async fn waited_until(
    phase: &mut tokio::sync::watch::Receiver<Phase>,
    delay: Duration,
    until: Phase,
) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(delay) => true,
        _ = reached(phase, until) => false,
    }
}

/// What the worker says of an item whose id is not a plain name ([`is_plain_name`]), which it
/// leaves to its lease (or reclaim window) and the server.
pub(crate) const NOT_A_PLAIN_NAME: &str =
    "the server handed out a work item whose id is not a plain name: not running it";

/// Longest work id taken: Tether's are 37 characters.
const MAX_WORK_ID: usize = 128;

/// Whether a work id can name a file or directory as it is: letters, digits, `_` and `-`, at most
/// [`MAX_WORK_ID`] of them. Every id the worker makes a path of has passed this.
pub fn is_plain_name(id: &str) -> bool {
    (1..=MAX_WORK_ID).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// A refusal that another try cannot fix: a 4xx other than 408, 409 and 429, or an answer that is not
/// Tether's at all.
fn is_fatal(e: &Error) -> bool {
    match e.status() {
        // Tether never answers 501 (Not Implemented): something else listens at --server.
        Some(status) => {
            ((400..500).contains(&status) && !matches!(status, 408 | 409 | 429)) || status == 501
        }
        // A refused certificate stays refused.
        None => matches!(
            e,
            Error::Decode { .. } | Error::Config(_) | Error::Tls { .. }
        ),
    }
}

/// What the operator should fix, in words.
fn explain(e: &Error, shared: &Shared) -> crate::Error {
    let env = &shared.environment_id;
    let server = shared.client.server_url();
    let why = match e.status() {
        Some(401) => format!(
            "the server refused the key ({e}). Check --key / TETHER_KEY: it may be mistyped or \
             revoked, or environment {env} deleted with its keys (`tether env get {env}` says \
             whether it still exists); mint a new key with `tether env key create {env}`"
        ),
        Some(403) => format!(
            "the key may not take work from environment {env} ({e}): it is another environment's \
             key, or there is no environment {env} (a key is not told which). An environment key \
             works for its own environment only: check --environment / TETHER_ENVIRONMENT and \
             --key / TETHER_KEY"
        ),
        Some(404) if e.code() == Some("environment_not_found") => format!(
            "environment {env} does not exist on {server} ({e}). Check --environment / \
             TETHER_ENVIRONMENT (`tether env list` shows them)"
        ),
        Some(404) => format!(
            "{server} answered 404 to a poll ({e}). Is --server / TETHER_SERVER the Tether server?"
        ),
        Some(501) => format!(
            "{server} does not implement the poll ({e}): it is not a Tether server. Check \
             --server / TETHER_SERVER"
        ),
        Some(400) => format!("the server will not hand out work from environment {env}: {e}"),
        Some(_) => format!("the server refused to hand out work: {e}"),
        None if e.is_tls() => format!("{e}"),
        None => format!(
            "{server} did not answer like a Tether server ({e}). Check --server / TETHER_SERVER"
        ),
    };
    // An answer without Tether's request id is a proxy's or another program's: the server may be
    // behind it again on the next start (a redeploy), so it is not said to need the operator.
    if e.api().is_some_and(|api| api.request_id.is_none()) {
        crate::Error::NotTethers(why)
    } else {
        crate::Error::Refused(why)
    }
}

/// Whether the server takes claims (or, for `chain`, makes the stops they carry), as far as the
/// worker knows. On tokio's clock, which the supervisor's tests pause.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) enum ClaimSupport {
    /// Until a claim is refused: a Tether server takes them.
    #[default]
    Assumed,
    /// A claim was refused (404 or 405) at this moment; the worker polls instead.
    RefusedAt(tokio::time::Instant),
}

impl ClaimSupport {
    /// Whether the next take is a claim, at `now`. A server that refused one is asked again after
    /// [`CLAIMS_AGAIN_AFTER`]: it may have been upgraded, or the refusal come from another server
    /// behind the same address that is gone now.
    pub(crate) fn claims_now(&mut self, now: tokio::time::Instant) -> bool {
        match *self {
            ClaimSupport::Assumed => true,
            ClaimSupport::RefusedAt(at)
                if now.saturating_duration_since(at) >= CLAIMS_AGAIN_AFTER =>
            {
                *self = ClaimSupport::Assumed;
                true
            }
            ClaimSupport::RefusedAt(_) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::heartbeat::tests::{refusal as api, refusal_with_code};

    #[test]
    fn a_server_that_refused_claims_is_polled_and_asked_again_later() {
        let start = tokio::time::Instant::now();
        let mut support = ClaimSupport::Assumed;
        assert!(support.claims_now(start));
        support = ClaimSupport::RefusedAt(start);
        let almost = start + CLAIMS_AGAIN_AFTER - Duration::from_millis(1);
        assert!(!support.claims_now(start));
        assert!(!support.claims_now(almost));
        assert_eq!(support, ClaimSupport::RefusedAt(start));
        assert!(support.claims_now(start + CLAIMS_AGAIN_AFTER));
        // Once asked again, claims go on until the next refusal.
        assert_eq!(support, ClaimSupport::Assumed);
        assert!(support.claims_now(almost));
    }

    #[test]
    fn only_plain_names_are_taken_as_work_ids() {
        for id in ["work_01a23bd33d127689958ec38dd7ab8310", "w-1", "A_b"] {
            assert!(is_plain_name(id), "{id}");
        }
        let long = "w".repeat(MAX_WORK_ID + 1);
        for id in [
            "",
            "..",
            ".",
            "../victim",
            "/tmp/x",
            "a/b",
            "a\0b",
            "a b",
            "a.log",
            &long,
        ] {
            assert!(!is_plain_name(id), "{id:?}");
        }
    }

    #[tokio::test]
    async fn a_claim_keeps_its_key_while_it_may_have_taken_an_item_unheard() {
        assert_eq!(TryOutcome::of(&Ok(())), TryOutcome::Heard);
        for status in [500, 502, 503, 504] {
            assert_eq!(TryOutcome::of::<()>(&Err(api(status))), TryOutcome::Unheard);
        }
        for status in [400, 401, 403, 404, 409, 501] {
            assert_eq!(TryOutcome::of::<()>(&Err(api(status))), TryOutcome::Heard);
        }
        for status in [408, 429] {
            assert_eq!(
                TryOutcome::of::<()>(&Err(api(status))),
                TryOutcome::NotReached
            );
        }
        // A refused connection (nothing listens on port 1).
        let client = Client::new("http://127.0.0.1:1", "tth_adm_x").unwrap();
        let refused = client.poll_work("env_x", &PollOptions::default()).await;
        assert!(matches!(refused, Err(Error::Connect { .. })), "{refused:?}");
        assert_eq!(TryOutcome::of(&refused), TryOutcome::NotReached);

        // Not reaching the server changes nothing: a first try took nothing, and a claim already
        // unheard stays so, for an earlier try may still have taken an item.
        let start = tokio::time::Instant::now();
        let mut tries = Some(ClaimTries::first_at(start));
        ClaimTries::answered(&mut tries, TryOutcome::NotReached);
        assert!(tries.is_none());
        let mut tries = Some(ClaimTries::first_at(start));
        ClaimTries::answered(&mut tries, TryOutcome::Unheard);
        ClaimTries::answered(&mut tries, TryOutcome::NotReached);
        assert!(tries.as_ref().is_some_and(|tries| tries.unheard));
        ClaimTries::answered(&mut tries, TryOutcome::Heard);
        assert!(tries.is_none());
    }

    #[test]
    fn a_claim_is_sent_again_with_its_key_and_first_sending_until_it_is_heard() {
        let start = tokio::time::Instant::now();
        let mut options = ClaimOptions::default();
        let mut tries = Some(ClaimTries::first_at(start));
        tries.as_ref().unwrap().ask(&mut options);
        let key = options.idempotency_key.clone().expect("a key");
        assert_eq!((key.len(), options.retry), (32, ClaimTry::First));

        ClaimTries::answered(&mut tries, TryOutcome::Unheard);
        let later = start + Duration::from_secs(12);
        let again = tries.get_or_insert_with(|| ClaimTries::first_at(later));
        again.ask(&mut options);
        assert_eq!(options.idempotency_key.as_deref(), Some(key.as_str()));
        assert_eq!(options.retry, ClaimTry::Again, "sent again");
        let long = Duration::from_secs(60);
        assert_eq!(
            ClaimTries::wait_before_next(tries.as_ref(), &UnheardStretch::default(), long, later),
            CLAIM_SENT_AGAIN_WITHIN,
            "sent again well within the lease"
        );
        let never_heard = UnheardStretch::default();
        assert_eq!(
            ClaimTries::wait_before_next(None, &never_heard, long, later),
            long
        );
        assert_eq!(
            ClaimTries::wait_before_next(
                tries.as_ref(),
                &UnheardStretch { since: Some(start) },
                long,
                start + LONGEST_LEASE
            ),
            long,
            "at the backoff's pace once tries have gone unheard for a lease"
        );
        // An earlier try's item is leased from the first try's sending; one this try took, from
        // this try's.
        let tried = tries.as_ref();
        assert_eq!(ClaimTries::lease_start(tried, later, true), start);
        assert_eq!(ClaimTries::lease_start(tried, later, false), later);

        // Unheard for longer than a lease: its item, if any, lapsed; the next claim is a new one.
        let lease = Duration::from_secs(60);
        ClaimTries::forget_once_lapsed(&mut tries, start + lease - Duration::from_millis(1), lease);
        assert!(tries.is_some(), "still within the lease");
        let mut lapsed = Some(ClaimTries::first_at(start));
        ClaimTries::answered(&mut lapsed, TryOutcome::Unheard);
        ClaimTries::forget_once_lapsed(&mut lapsed, start + lease, lease);
        assert!(lapsed.is_none(), "forgotten once the lease is over");

        ClaimTries::answered(&mut tries, TryOutcome::Heard);
        assert!(tries.is_none());
        let next = tries.get_or_insert_with(|| ClaimTries::first_at(later));
        next.ask(&mut options);
        assert_ne!(options.idempotency_key.as_deref(), Some(key.as_str()));
        assert_eq!(options.retry, ClaimTry::First, "a new claim");
        assert_eq!(next.first_sent, later);
        assert_eq!(ClaimTries::lease_start(None, later, false), later);
    }

    /// One try of the claim loop sent at `now` with the outcome given, through the steps the loop
    /// calls around it (`before_try`, `after_try`, `wait_before_next`): the wait
    /// before the next, the backoff having said `backoff`.
    fn one_try(
        tries: &mut Option<ClaimTries>,
        unheard: &mut UnheardStretch,
        now: tokio::time::Instant,
        outcome: TryOutcome,
        backoff: Duration,
    ) -> Duration {
        ClaimTries::before_try(tries, now, &mut ClaimOptions::default());
        ClaimTries::after_try(tries, unheard, outcome, now);
        ClaimTries::wait_before_next(tries.as_ref(), unheard, backoff, now)
    }

    #[test]
    fn a_server_that_answers_every_claim_with_5xx_is_tried_at_the_backoffs_pace_after_a_lease() {
        let start = tokio::time::Instant::now();
        let backoff = Duration::from_secs(60);
        let (mut tries, mut unheard) = (None, UnheardStretch::default());
        let mut now = start;
        let mut first_key = None;
        // Within a lease of unheard tries, the claim is sent again within two seconds.
        while now < start + LONGEST_LEASE - CLAIM_SENT_AGAIN_WITHIN {
            let wait = one_try(&mut tries, &mut unheard, now, TryOutcome::Unheard, backoff);
            assert_eq!(wait, CLAIM_SENT_AGAIN_WITHIN, "at {:?}", now - start);
            let key = tries.as_ref().map(|tries| tries.key.clone());
            assert_eq!(*first_key.get_or_insert(key.clone()), key, "one claim");
            now += wait;
        }
        // Past the lease the claim is forgotten; the next one's tries go unheard too, and are
        // sent again at the backoff's pace, with their own key, however many claims follow.
        now = start + LONGEST_LEASE;
        for _ in 0..30 {
            let wait = one_try(&mut tries, &mut unheard, now, TryOutcome::Unheard, backoff);
            assert_eq!(wait, backoff, "at {:?}", now - start);
            assert!(tries.as_ref().is_some_and(|tries| tries.unheard));
            assert_ne!(
                tries.as_ref().map(|tries| tries.key.clone()),
                first_key.clone().flatten()
            );
            now += wait;
        }
        // A try that does not reach the server ends nothing.
        let wait = one_try(
            &mut tries,
            &mut unheard,
            now,
            TryOutcome::NotReached,
            backoff,
        );
        assert_eq!(wait, backoff);
        // One heard ends the stretch: the next claim unheard is sent again soon.
        now += wait;
        assert_eq!(
            one_try(&mut tries, &mut unheard, now, TryOutcome::Heard, backoff),
            backoff
        );
        assert_eq!(unheard, UnheardStretch::default());
        now += Duration::from_secs(1);
        let wait = one_try(&mut tries, &mut unheard, now, TryOutcome::Unheard, backoff);
        assert_eq!(wait, CLAIM_SENT_AGAIN_WITHIN);
    }

    #[test]
    fn only_a_server_without_the_endpoint_turns_claims_into_polls() {
        for status in [404, 405, 501] {
            assert!(no_claims_here(&api(status)), "{status}");
        }
        for status in [400, 401, 403, 409, 429, 500, 503] {
            assert!(!no_claims_here(&api(status)), "{status}");
        }
        // The environment is unknown: polling would say the same (and the loop explains it).
        let unknown = refusal_with_code(404, Some("environment_not_found"));
        assert!(!no_claims_here(&unknown));
    }

    #[test]
    fn only_refusals_that_cannot_change_are_fatal() {
        for status in [400, 401, 403, 404, 413, 501] {
            assert!(is_fatal(&api(status)), "{status}");
        }
        for status in [408, 409, 429, 500, 502, 503] {
            assert!(!is_fatal(&api(status)), "{status}");
        }
    }
}

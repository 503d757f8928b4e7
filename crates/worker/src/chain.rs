//! The next claim, sent with a finished item's stop (Tether's claim with `stop`): a worker that
//! takes one item after another ends each with the request that takes the next, one request per
//! item where the stop and a claim were two.
//!
//! It is the supervisor's forced stop, only sent otherwise: the claim carries the item's id and its
//! session token, which proves the stop as it does for a stop sent with it (a token that no longer
//! holds the item is refused, 409 `not_held`, as the stop would be with 401), and the server stops
//! the item before it claims, answering a refused stop's refusal and claiming nothing. So the
//! supervisor reads the answer as a stop's, and serves an item the claim brought next, in the
//! same slot. The claim does not wait (no `block_ms`): the stop's answer is not held back, and a
//! claim that finds nothing hands the slot back to the claim loop, which waits for work as always.
//!
//! The answer must say that the stop was made (`Tether-Stopped`): a Tether server older than the
//! worker ignores the body and only claims (one of several sharing a database, say, during an
//! upgrade). Then, and when the claim is refused for a reason of its own (400, 403, a 404 that is
//! not the stop's, 405, 501), the item is stopped on its own, as before, and for
//! [`crate::claim::CLAIMS_AGAIN_AFTER`] no stop carries a claim. An item such an answer brought all
//! the same waits for that stop (and for PROGRAM run again, should the stop find a turn open); one
//! whose lease has run out by then is not run (`Heartbeat::start_claimed`) and goes back to the
//! queue when the server settles its lease.
//!
//! A stop carries a claim only while the worker takes work (not draining, PROGRAM able to run,
//! not `run-one`), for an item that was itself claimed (so the server takes claims) with a
//! session token. Its tries are a claim's (`claim::ClaimTries`): a try whose answer was not heard
//! is sent again with the same key, so that an item an earlier try took comes back rather than
//! wait out its lease; once the worker drains, that try takes nothing new (`retry=only`). Once the
//! supervisor gives up the stop (the lease's deadline passed, the shutdown's bound), a try that
//! was never heard is not asked after: an item it took stays leased to nobody until its lease
//! runs out, and is then served again, as an unheard claim's that the claim loop forgets; so is
//! one when a try sent again is refused for a reason of the claim's own.

use std::sync::{Arc, Mutex, MutexGuard};

use tether_client::{
    ClaimOptions, ClaimTry, Client, PollOptions, StopThenClaim, StopWithClaim, WorkItem, WorkState,
};

use crate::claim::{cannot_run, ClaimSupport, ClaimTries, TryOutcome};
use crate::supervisor::Taken;
use crate::{Phase, Shared};

/// The claim one item's stop may carry, and what it brought.
pub(crate) struct NextClaim {
    shared: Arc<Shared>,
    /// The item's session token: the stop's proof.
    session_token: String,
    /// The claim under way until a try of it is heard.
    tries: Mutex<Option<ClaimTries>>,
    /// The item a heard try brought, for the supervisor to serve next.
    brought: Mutex<Option<(WorkItem, Taken)>>,
}

impl NextClaim {
    /// For an item taken as `taken` with `session_token`; `None` where its stop is to go alone.
    pub fn for_item(
        shared: &Arc<Shared>,
        taken: &Taken,
        session_token: Option<&str>,
    ) -> Option<NextClaim> {
        let claimed = matches!(taken, Taken::Claimed { .. });
        if !claimed || shared.run_one {
            return None;
        }
        Some(NextClaim {
            shared: shared.clone(),
            session_token: session_token?.to_owned(),
            tries: Mutex::new(None),
            brought: Mutex::new(None),
        })
    }

    /// Whether the stop about to be sent carries the claim: one under way (a try unheard) is sent
    /// again, whatever the phase, so that the item an earlier try took is asked for; a new one
    /// only while the worker takes work.
    pub fn carries_the_stop(&self) -> bool {
        // One item brought per item: a later stop of this item (PROGRAM run again after a stop
        // that found a turn open) goes on its own.
        if lock(&self.brought).is_some() {
            return false;
        }
        let now = tokio::time::Instant::now();
        lock(&self.tries).is_some()
            || (*self.shared.phase.borrow() == Phase::Running
                && lock(&self.shared.stops_with_claims).claims_now(now)
                && cannot_run(&self.shared).is_none())
    }

    /// One try: stops `work_id` (unless its session has a turn open, with `unless_turn_open`),
    /// then claims without waiting, over `client` (the environment key's). What it says of the stop
    /// is [`StopCarried`]; an item claimed is kept for [`NextClaim::take_brought`].
    pub async fn stop_then_claim(
        &self,
        client: &Client,
        work_id: &str,
        unless_turn_open: bool,
    ) -> StopCarried {
        let sent = tokio::time::Instant::now();
        let mut options = ClaimOptions {
            poll: PollOptions {
                worker_id: Some(self.shared.worker_id.clone()),
                ..Default::default()
            },
            desired_ttl_seconds: self.shared.desired_ttl,
            ..Default::default()
        };
        let stop = StopWithClaim {
            unless_turn_open: unless_turn_open.then_some(true),
            ..StopWithClaim::new(work_id, self.session_token.as_str())
        };
        lock(&self.tries)
            .get_or_insert_with(|| ClaimTries::first_at(sent))
            .ask(&mut options);
        if options.retry == ClaimTry::Again && *self.shared.phase.borrow() >= Phase::Draining {
            options.retry = ClaimTry::AgainTakingNothing;
        }
        let answer = client
            .stop_then_claim_work(&self.shared.environment_id, &stop, &options)
            .await;
        let lease_from = {
            let mut tries = lock(&self.tries);
            let earlier_try = matches!(
                &answer,
                Ok(StopThenClaim { claim: Some(claim), .. }) if claim.earlier_try
            );
            let lease_from = ClaimTries::lease_start(tries.as_ref(), sent, earlier_try);
            ClaimTries::answered(&mut tries, TryOutcome::of(&answer));
            lease_from
        };
        match answer {
            Ok(StopThenClaim { stopped, claim }) => {
                if let Some(claim) = claim {
                    let taken = Taken::Claimed {
                        sent: lease_from,
                        first: claim.lease,
                    };
                    *lock(&self.brought) = Some((claim.work, taken));
                }
                match stopped {
                    true => StopCarried::Answered(Ok(WorkState::Stopped)),
                    false => self.left("the server claimed without making the stop"),
                }
            }
            Err(e) if is_the_claims_own_refusal(&e) => self.left(&crate::error::described(&e)),
            Err(e) => StopCarried::Answered(Err(e)),
        }
    }

    /// The server left the stop undone: said once, and no stop carries a claim for a while.
    fn left(&self, why: &str) -> StopCarried {
        let now = tokio::time::Instant::now();
        let mut support = lock(&self.shared.stops_with_claims);
        if support.claims_now(now) {
            self.shared.report.info(
                "the server did not make the stop sent with a claim: stopping items on their own \
                 (the next claim to carry a stop goes in 5 minutes)",
                &[("reason", why)],
            );
        }
        *support = ClaimSupport::RefusedAt(now);
        StopCarried::Left
    }

    /// The item a try brought, once.
    pub fn take_brought(&self) -> Option<(WorkItem, Taken)> {
        lock(&self.brought).take()
    }
}

/// What a try of a stop sent with a claim says of the stop.
pub(crate) enum StopCarried {
    /// The server answered for the stop: this, as a stop's own answer would be.
    Answered(tether_client::Result<WorkState>),
    /// The server did not make it: the item is to be stopped on its own.
    Left,
}

/// A refusal of the request for a reason of the claim's, made before the stop was looked at: a
/// body or a parameter it does not take (400), a credential that may not claim (403), no such
/// environment or no claims at all (404 other than the stop's item, 405, 501). Refusals of the stop
/// itself (409, 401, 404 `work_not_found`), and failures worth another try, are the stop's.
fn is_the_claims_own_refusal(error: &tether_client::Error) -> bool {
    match error.status() {
        Some(400 | 403 | 405 | 501) => true,
        Some(404) => error.code() != Some("work_not_found"),
        _ => false,
    }
}

/// A lock that a panic elsewhere does not poison for good: its value is replaced whole.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::heartbeat::tests::refusal_with_code;

    #[test]
    fn refusals_of_the_claim_are_told_from_refusals_of_the_stop() {
        let cases = [
            (400, None, true),
            (403, None, true),
            (405, None, true),
            (501, None, true),
            (404, Some("environment_not_found"), true),
            (404, None, true),
            (404, Some("work_not_found"), false),
            (401, None, false),
            (409, Some("not_held"), false),
            (500, None, false),
            (503, None, false),
        ];
        for (status, code, the_claims) in cases {
            let error = refusal_with_code(status, code);
            assert_eq!(
                is_the_claims_own_refusal(&error),
                the_claims,
                "{status} {code:?}"
            );
        }
    }
}

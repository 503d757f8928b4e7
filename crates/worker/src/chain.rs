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
//! A stop carries a claim only while the worker takes work (not draining, PROGRAM able to run,
//! not `run-one`), for an item that was itself claimed (so the server takes claims) with a
//! session token. Its tries are a claim's (`claim::ClaimTries`): a try whose answer was not heard
//! is sent again with the same key, so that an item an earlier try took comes back rather than
//! wait out its lease; once the worker drains, that try takes nothing new (`retry=only`).

use std::sync::{Arc, Mutex, MutexGuard};

use tether_client::{
    ClaimOptions, ClaimTry, Client, PollOptions, StopWithClaim, WorkItem, WorkState,
};

use crate::claim::{cannot_run, ClaimTries, TryOutcome};
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
        lock(&self.tries).is_some()
            || (*self.shared.phase.borrow() == Phase::Running && cannot_run(&self.shared).is_none())
    }

    /// One try: stops `work_id` (unless its session has a turn open, with `unless_turn_open`),
    /// then claims without waiting, over `client` (the environment key's). The answer is the
    /// stop's, as [`tether_client::Client::stop_work`]'s would be; an item claimed is kept for
    /// [`NextClaim::take_brought`].
    pub async fn stop_then_claim(
        &self,
        client: &Client,
        work_id: &str,
        unless_turn_open: bool,
    ) -> tether_client::Result<WorkState> {
        let sent = tokio::time::Instant::now();
        let mut options = ClaimOptions {
            poll: PollOptions {
                worker_id: Some(self.shared.worker_id.clone()),
                ..Default::default()
            },
            desired_ttl_seconds: self.shared.desired_ttl,
            stop: Some(StopWithClaim {
                unless_turn_open: unless_turn_open.then_some(true),
                ..StopWithClaim::new(work_id, self.session_token.as_str())
            }),
            ..Default::default()
        };
        lock(&self.tries)
            .get_or_insert_with(|| ClaimTries::first_at(sent))
            .ask(&mut options);
        if options.retry == ClaimTry::Again && *self.shared.phase.borrow() >= Phase::Draining {
            options.retry = ClaimTry::AgainTakingNothing;
        }
        let answer = client
            .claim_work(&self.shared.environment_id, &options)
            .await;
        let lease_from = {
            let mut tries = lock(&self.tries);
            let earlier_try = matches!(&answer, Ok(Some(claim)) if claim.earlier_try);
            let lease_from = ClaimTries::lease_start(tries.as_ref(), sent, earlier_try);
            ClaimTries::answered(&mut tries, TryOutcome::of(&answer));
            lease_from
        };
        if let Some(claim) = answer? {
            let taken = Taken::Claimed {
                sent: lease_from,
                first: claim.lease,
            };
            *lock(&self.brought) = Some((claim.work, taken));
        }
        // The server stops the item before it claims: an answer, an item or none, says it is
        // stopped (or was already).
        Ok(WorkState::Stopped)
    }

    /// The item a try brought, once.
    pub fn take_brought(&self) -> Option<(WorkItem, Taken)> {
        lock(&self.brought).take()
    }
}

/// A lock that a panic elsewhere does not poison for good: its value is replaced whole.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

//! Turns at writing one session's document, taken in this process.
//!
//! Every change to a session is a conditional write on its version, retried from a fresh read when it
//! loses ([`super::with_retries`]). That is correct with any number of writers, but not fair: of N
//! requests writing one session at once, one wins each round and the last needs N attempts, so past
//! [`super::MAX_ATTEMPTS`] concurrent writers (clients posting events to one session, say) some were
//! answered 503 although nothing was wrong. Requests of this process therefore queue for their turn
//! first and then write in one attempt; the conditional write still keeps them apart from other server
//! processes.
//!
//! The work queue's operations that may change a session (ack, stop, a lease's expiry) take the
//! session's turn only after losing a race once, so that the common case pays no lock; their first
//! try is kept apart by the conditional write too.
//!
//! Invariant: nothing that holds a turn takes another (the locks are not re-entrant, and two sessions
//! may share one). The holders are the bodies of `App::with_session_retries`, which write one session
//! and its live item directly, never through another operation that could wait for a turn.
//!
//! A fixed number of locks, each shared by the sessions whose ids hash to it: memory stays bounded
//! whatever the number of sessions, and two sessions that share a lock only take turns, which their
//! commits to one SQLite writer do anyway.

use std::hash::BuildHasher as _;
use std::time::Duration;

use tokio::sync::{Mutex, MutexGuard};

/// How many locks; a power of two, so a hash picks one with a mask.
const LOCKS: usize = 256;

/// The longest a request waits for its turn before it is told to retry (503), as it would wait for
/// the request-body budget: a queue behind a database that answers slowly or not at all must not
/// hold its requests for as long as that lasts.
pub const TURN_WAIT: Duration = Duration::from_secs(10);

pub struct SessionTurns {
    locks: Box<[Mutex<()>]>,
    /// Keyed per process, so that which sessions share a lock cannot be chosen from outside.
    hasher: std::collections::hash_map::RandomState,
}

impl Default for SessionTurns {
    fn default() -> Self {
        const { assert!(LOCKS.is_power_of_two()) };
        SessionTurns {
            locks: (0..LOCKS).map(|_| Mutex::new(())).collect(),
            hasher: Default::default(),
        }
    }
}

impl SessionTurns {
    /// Waits for this process's earlier writers of `session_id` (first come, first served) and holds
    /// the turn until the guard is dropped; `None` when the turn did not come within [`TURN_WAIT`].
    pub async fn take(&self, session_id: &str) -> Option<MutexGuard<'_, ()>> {
        self.take_within(session_id, TURN_WAIT).await
    }

    async fn take_within(&self, session_id: &str, wait: Duration) -> Option<MutexGuard<'_, ()>> {
        tokio::time::timeout(wait, self.locks[self.index(session_id)].lock())
            .await
            .ok()
    }

    fn index(&self, session_id: &str) -> usize {
        // Truncating the hash is intended: the mask keeps its low bits only.
        (self.hasher.hash_one(session_id) as usize) & (LOCKS - 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The turn, if it is free now.
    async fn at_once<'a>(turns: &'a SessionTurns, id: &str) -> Option<MutexGuard<'a, ()>> {
        turns.take_within(id, Duration::ZERO).await
    }

    #[tokio::test]
    async fn one_session_waits_for_its_turn_and_others_need_not() {
        let turns = SessionTurns::default();
        let held = turns.take("sesn_a").await.expect("a free turn");
        assert!(
            at_once(&turns, "sesn_a").await.is_none(),
            "a second writer of the session waits"
        );
        let other = (0..)
            .map(|i| format!("sesn_{i}"))
            .find(|id| turns.index(id) != turns.index("sesn_a"))
            .expect("some id hashes elsewhere");
        assert!(
            at_once(&turns, &other).await.is_some(),
            "a session on another lock does not wait"
        );
        drop(held);
        assert!(
            at_once(&turns, "sesn_a").await.is_some(),
            "the turn passes on when the holder is done"
        );
    }

    #[tokio::test]
    async fn a_turn_that_does_not_come_is_given_up_after_the_bound() {
        let turns = SessionTurns::default();
        let _held = turns.take("sesn_a").await.expect("a free turn");
        let wait = Duration::from_millis(50);
        let started = tokio::time::Instant::now();
        assert!(
            turns.take_within("sesn_a", wait).await.is_none(),
            "given up"
        );
        assert!(started.elapsed() >= wait, "not before the bound");
    }
}

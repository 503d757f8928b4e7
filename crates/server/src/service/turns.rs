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

use tokio::sync::{Mutex, MutexGuard};

/// How many locks; a power of two, so a hash picks one with a mask.
const LOCKS: usize = 256;

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
    /// the turn until the guard is dropped.
    pub async fn take(&self, session_id: &str) -> MutexGuard<'_, ()> {
        self.locks[self.index(session_id)].lock().await
    }

    fn index(&self, session_id: &str) -> usize {
        // Truncating the hash is intended: the mask keeps its low bits only.
        (self.hasher.hash_one(session_id) as usize) & (LOCKS - 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn one_session_waits_for_its_turn_and_others_need_not() {
        let turns = SessionTurns::default();
        let held = turns.take("sesn_a").await;
        let waiting = tokio::time::timeout(std::time::Duration::ZERO, turns.take("sesn_a"));
        assert!(
            waiting.await.is_err(),
            "a second writer of the session waits"
        );
        let other = (0..)
            .map(|i| format!("sesn_{i}"))
            .find(|id| turns.index(id) != turns.index("sesn_a"))
            .expect("some id hashes elsewhere");
        let free = tokio::time::timeout(std::time::Duration::ZERO, turns.take(&other));
        assert!(
            free.await.is_ok(),
            "a session on another lock does not wait"
        );
        drop(held);
        let next = tokio::time::timeout(std::time::Duration::ZERO, turns.take("sesn_a"));
        assert!(
            next.await.is_ok(),
            "the turn passes on when the holder is done"
        );
    }
}

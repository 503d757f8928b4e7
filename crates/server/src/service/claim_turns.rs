//! Tries of one keyed claim that reach this process at once take turns.
//!
//! Every try of a claim names the same session token, and the store holds a token on one live
//! item at most, so tries that race in the store are kept apart there: the loser's write fails
//! and it answers the winner's item. Tries racing in one process can lose before they write,
//! though: to the reservation another try holds on an item (`work::Claims`), again and again
//! while that try commits, and then answer that they found nothing while their claim took an
//! item. Taking turns by token settles it: a try that had to wait looks for what the try before
//! it took, and only then takes anew. Only tries of one claim wait on each other; the map holds a
//! token while a try of it is under way, no longer.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::OwnedMutexGuard;

/// The turns of the keyed claims under way in this process, by session token.
#[derive(Default)]
pub struct ClaimTurns {
    by_token: Mutex<HashMap<String, Entry>>,
}

struct Entry {
    turn: Arc<tokio::sync::Mutex<()>>,
    /// Tries holding or waiting for the turn: the entry goes when the last is dropped.
    tries: usize,
}

/// A try's turn: the next try of its claim waits until this is dropped.
pub struct Turn<'a> {
    turns: &'a ClaimTurns,
    token: String,
    guard: Option<OwnedMutexGuard<()>>,
    /// Another try of the claim held the turn first: it may have taken an item.
    pub waited: bool,
}

impl ClaimTurns {
    /// Waits for the turn of the claim whose session token is `token`.
    pub async fn take(&self, token: &str) -> Turn<'_> {
        let lock = {
            let mut by_token = self.by_token.lock().expect("claim turns lock");
            let entry = by_token.entry(token.to_owned()).or_insert_with(|| Entry {
                turn: Arc::default(),
                tries: 0,
            });
            entry.tries += 1;
            entry.turn.clone()
        };
        // Counted from here: a try given up while it waits (its request dropped) drops this too.
        let mut turn = Turn {
            turns: self,
            token: token.to_owned(),
            guard: None,
            waited: false,
        };
        match lock.clone().try_lock_owned() {
            Ok(guard) => turn.guard = Some(guard),
            Err(_) => {
                turn.waited = true;
                turn.guard = Some(lock.lock_owned().await);
            }
        }
        turn
    }

    /// No token has a try under way or waiting.
    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.by_token.lock().expect("claim turns lock").is_empty()
    }
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        drop(self.guard.take());
        let mut by_token = self.turns.by_token.lock().expect("claim turns lock");
        let entry = by_token.get_mut(&self.token);
        let entry = entry.expect("a turn's token stays until its last try is dropped");
        entry.tries -= 1;
        if entry.tries == 0 {
            by_token.remove(&self.token);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn tries_of_one_claim_take_turns_and_others_do_not_wait() {
        let turns = ClaimTurns::default();
        let first = turns.take("a").await;
        assert!(!first.waited);
        // Another claim's try is not held up.
        let other = turns.take("b").await;
        assert!(!other.waited);
        drop(other);
        let second = turns.take("a");
        tokio::pin!(second);
        assert!(
            futures::poll!(second.as_mut()).is_pending(),
            "the second try waits for the first"
        );
        drop(first);
        let second = second.await;
        assert!(second.waited);
        drop(second);
        assert!(turns.is_empty(), "no token is kept once its tries are done");
    }

    #[tokio::test]
    async fn a_try_given_up_while_waiting_leaves_nothing_behind() {
        let turns = ClaimTurns::default();
        let first = turns.take("a").await;
        {
            let waiting = turns.take("a");
            tokio::pin!(waiting);
            assert!(futures::poll!(waiting.as_mut()).is_pending());
            // Dropped here, as a request is when its client goes away.
        }
        drop(first);
        assert!(turns.is_empty());
        assert!(!turns.take("a").await.waited);
    }
}

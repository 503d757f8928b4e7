//! Turns taken in this process: at writing one session's document, at one claim's tries, and
//! (loosely) at reading one queue's candidates.
//!
//! Every change to a session is a conditional write on its version, retried from a fresh read when it
//! loses ([`super::with_retries`]). That is correct with any number of writers, but not fair: of N
//! requests writing one session at once, one wins each round and the last needs N attempts, so past
//! [`super::MAX_ATTEMPTS`] concurrent writers (clients posting events to one session, say) some were
//! answered 503 although nothing was wrong. Requests of this process therefore queue for their turn
//! first and then write in one attempt; the conditional write still keeps them apart from other server
//! processes.
//!
//! The work queue's operations that may change a session (ack, stop, a lease's expiry, requeue) take the
//! session's turn only after losing a race once, so that the common case pays no lock; their first
//! try is kept apart by the conditional write too.
//!
//! Invariant: nothing that holds a turn takes another (the locks are not re-entrant), with one
//! exception that cannot close a cycle: a claim (keyed or not) takes the turn at reading its queue's
//! candidates (`App::candidate_reads`, by environment and reclaim window), and holds it across that one
//! read at most, taking nothing meanwhile. The session turns' holders are the bodies of
//! `App::with_session_retries`, which write one session and its live item directly, never through
//! another operation that could wait for a turn.
//!
//! A session has a lock only while requests hold or wait for its turn: the last one to leave removes
//! it. So memory is bounded by the requests in flight, not by the number of sessions, and a client
//! that floods its own session delays no other session's writers.
//!
//! Tries of one keyed claim take turns the same way, by their session token (`App::claim`): every
//! try names the same token, and the store holds a token on one live item at most, so tries that
//! race in the store are kept apart there (the loser's write fails and it answers the winner's
//! item). Tries racing in one process can lose before they write, though: to the reservation
//! another try holds on an item (`work::Claims`), again and again while that try commits, and then
//! answer that they found nothing while their claim took an item. A try that had to wait for its
//! turn ([`Turn::waited`]) looks for what the try before it took, and only then takes anew.
//!
//! Claims of one queue take turns at reading its candidates, more loosely: one that finds no
//! candidate left over by an earlier read (`spare_candidates`) waits a little
//! ([`KeyedTurns::take_within`]) for the claim reading before it, whose read is sized for those
//! waiting ([`Turn::others_waiting`]), passes the turn on at once, and takes from what that read
//! left; one that still finds nothing reads beside the others, not after them. Under load one read
//! serves many claims, and reads never queue behind a slow one.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::OwnedMutexGuard;

/// The longest a request waits for its turn before it is told to retry (503), as it would wait for
/// the request-body budget: a queue behind a database that answers slowly or not at all must not
/// hold its requests for as long as that lasts.
pub const TURN_WAIT: Duration = Duration::from_secs(10);

/// A key's lock, and how many requests wait for it.
#[derive(Default)]
struct KeyLock {
    turn: Arc<tokio::sync::Mutex<()>>,
    waiting: AtomicUsize,
}

type TurnLock = Arc<KeyLock>;

/// The locks of the keys (sessions, claims' tokens) that have requests in this process now.
#[derive(Default)]
pub struct KeyedTurns {
    locks: Mutex<HashMap<String, TurnLock>>,
}

/// A key's turn, held until dropped.
pub struct Turn<'a> {
    // Declared first, so dropped first: the turn passes on before the ticket is given back.
    _guard: OwnedMutexGuard<()>,
    _ticket: Ticket<'a>,
    /// Another request held the turn first.
    pub waited: bool,
}

/// A place in a session's queue, held or waited for: the lock stays while any ticket does.
struct Ticket<'a> {
    turns: &'a KeyedTurns,
    key: String,
    lock: TurnLock,
}

impl Turn<'_> {
    /// How many other requests of this process wait for the key's turn now.
    pub fn others_waiting(&self) -> usize {
        self._ticket.lock.waiting.load(Ordering::Relaxed)
    }
}

/// Counts a request among those waiting for a turn while it lives.
struct Waiting<'a>(&'a AtomicUsize);

impl<'a> Waiting<'a> {
    fn count(waiting: &'a AtomicUsize) -> Self {
        waiting.fetch_add(1, Ordering::Relaxed);
        Waiting(waiting)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        let mut locks = self.turns.locks.lock().expect("turns lock");
        // The map's reference and this one: nobody else holds or waits for the turn, and nobody can
        // take a new ticket meanwhile, since that needs the map.
        if Arc::strong_count(&self.lock) == 2 {
            let removed = locks.remove(&self.key);
            debug_assert!(removed.is_some_and(|lock| Arc::ptr_eq(&lock, &self.lock)));
        }
    }
}

impl KeyedTurns {
    /// Waits for this process's earlier requests of `key` (first come, first served) and holds
    /// the turn until the guard is dropped; `None` when the turn did not come within [`TURN_WAIT`].
    pub async fn take(&self, key: &str) -> Option<Turn<'_>> {
        self.take_within(key, TURN_WAIT).await
    }

    /// [`Self::take`], waiting at most `wait`.
    pub async fn take_within(&self, key: &str, wait: Duration) -> Option<Turn<'_>> {
        let ticket = self.ticket(key);
        let (guard, waited) = match ticket.lock.turn.clone().try_lock_owned() {
            Ok(guard) => (guard, false),
            Err(_) => {
                let _counted = Waiting::count(&ticket.lock.waiting);
                let waiting = ticket.lock.turn.clone().lock_owned();
                (tokio::time::timeout(wait, waiting).await.ok()?, true)
            }
        };
        Some(Turn {
            _guard: guard,
            _ticket: ticket,
            waited,
        })
    }

    fn ticket(&self, key: &str) -> Ticket<'_> {
        let mut locks = self.locks.lock().expect("turns lock");
        let lock = locks.entry(key.to_owned()).or_default().clone();
        Ticket {
            turns: self,
            key: key.to_owned(),
            lock,
        }
    }

    /// How many keys have a lock now.
    #[cfg(test)]
    fn keys(&self) -> usize {
        self.locks.lock().expect("turns lock").len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The turn, if it is free now.
    async fn at_once<'a>(turns: &'a KeyedTurns, id: &str) -> Option<Turn<'a>> {
        turns.take_within(id, Duration::ZERO).await
    }

    #[tokio::test]
    async fn one_session_waits_for_its_turn_and_others_need_not() {
        let turns = KeyedTurns::default();
        let held = turns.take("sesn_a").await.expect("a free turn");
        assert!(
            at_once(&turns, "sesn_a").await.is_none(),
            "a second writer of the session waits"
        );
        let other = at_once(&turns, "sesn_b").await;
        assert!(other.is_some(), "another session does not wait");
        drop(other);
        drop(held);
        assert!(
            at_once(&turns, "sesn_a").await.is_some(),
            "the turn passes on when the holder is done"
        );
    }

    #[tokio::test]
    async fn the_holder_knows_how_many_wait_behind_it() {
        let turns = Arc::new(KeyedTurns::default());
        let held = turns.take("queue").await.expect("a free turn");
        assert_eq!(held.others_waiting(), 0);
        let mut waiters = Vec::new();
        for _ in 0..3 {
            let turns = turns.clone();
            waiters.push(tokio::spawn(async move {
                turns
                    .take("queue")
                    .await
                    .expect("the turn comes")
                    .others_waiting()
            }));
            tokio::task::yield_now().await;
        }
        let elsewhere = turns.take("another queue").await.expect("a free turn");
        assert_eq!(
            elsewhere.others_waiting(),
            0,
            "another key's waiters are not counted"
        );
        assert_eq!(held.others_waiting(), 3);
        let gave_up = at_once(&turns, "queue").await;
        assert!(gave_up.is_none());
        assert_eq!(
            held.others_waiting(),
            3,
            "one that gave up waiting is not counted"
        );
        drop(held);
        let mut behind = Vec::new();
        for waiter in waiters {
            behind.push(waiter.await.expect("waiter"));
        }
        assert_eq!(behind, [2, 1, 0], "each in turn saw those still behind it");
    }

    #[tokio::test]
    async fn turns_pass_in_the_order_they_were_asked_for() {
        let turns = Arc::new(KeyedTurns::default());
        let held = turns.take("sesn_a").await.expect("a free turn");
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut waiters = Vec::new();
        for i in 0..5 {
            let (turns, order) = (turns.clone(), order.clone());
            waiters.push(tokio::spawn(async move {
                let _turn = turns.take("sesn_a").await.expect("the turn comes");
                order.lock().unwrap().push(i);
            }));
            // On this single-threaded runtime, yielding runs the waiter up to its place in the
            // queue before the next one is spawned.
            tokio::task::yield_now().await;
        }
        drop(held);
        for waiter in waiters {
            waiter.await.expect("waiter");
        }
        assert_eq!(*order.lock().unwrap(), vec![0, 1, 2, 3, 4]);
        assert_eq!(turns.keys(), 0, "the last one out removed the lock");
    }

    #[tokio::test]
    async fn tries_of_one_claim_take_turns_and_others_do_not_wait() {
        let turns = KeyedTurns::default();
        let first = turns.take("a").await.expect("a free turn");
        assert!(!first.waited);
        // Another claim's try is not held up.
        let other = turns.take("b").await.expect("a free turn");
        assert!(!other.waited);
        drop(other);
        let second = turns.take("a");
        tokio::pin!(second);
        assert!(
            futures::poll!(second.as_mut()).is_pending(),
            "the second try waits for the first"
        );
        drop(first);
        let second = second.await.expect("the turn comes");
        assert!(second.waited);
        drop(second);
        assert_eq!(turns.keys(), 0, "no token is kept once its tries are done");
    }

    #[tokio::test]
    async fn a_try_given_up_while_waiting_leaves_nothing_behind() {
        let turns = KeyedTurns::default();
        let first = turns.take("a").await.expect("a free turn");
        {
            let waiting = turns.take("a");
            tokio::pin!(waiting);
            assert!(futures::poll!(waiting.as_mut()).is_pending());
            // Dropped here, as a request is when its client goes away.
        }
        drop(first);
        assert_eq!(turns.keys(), 0);
        assert!(!turns.take("a").await.expect("a free turn").waited);
    }

    #[tokio::test]
    async fn a_turn_that_does_not_come_is_given_up_after_the_bound() {
        let turns = KeyedTurns::default();
        let held = turns.take("sesn_a").await.expect("a free turn");
        let wait = Duration::from_millis(50);
        let started = tokio::time::Instant::now();
        // The outer bound turns a wait that never ends into a failure rather than a hung suite.
        let given_up = tokio::time::timeout(wait * 100, turns.take_within("sesn_a", wait)).await;
        assert!(given_up.expect("the wait ends").is_none(), "given up");
        assert!(started.elapsed() >= wait, "not before the bound");
        drop(held);
        assert_eq!(
            turns.keys(),
            0,
            "a waiter that gave up leaves nothing behind"
        );
    }

    #[tokio::test]
    async fn locks_live_only_while_they_are_wanted() {
        let turns = KeyedTurns::default();
        for i in 0..1_000 {
            let _turn = turns.take(&format!("sesn_{i}")).await.expect("free");
        }
        assert_eq!(turns.keys(), 0);
        let a = turns.take("sesn_a").await.expect("free");
        let b = turns.take("sesn_b").await.expect("free");
        assert_eq!(turns.keys(), 2);
        drop(a);
        assert_eq!(turns.keys(), 1);
        drop(b);
        assert_eq!(turns.keys(), 0);
    }
}

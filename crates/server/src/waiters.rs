//! Long-poll waiters, per environment.
//!
//! A blocked poll registers a [`Ticket`] *before* it scans the queue, so an enqueue that lands between
//! the scan and the wait still wakes it. A newly claimable item wakes exactly one waiter (no thundering
//! herd); a waiter that was woken but gives up without claiming (its deadline hit, its client left) passes
//! the wake-up on to the next waiter when its ticket drops.
//!
//! Idle long polls re-poll about once a second (`block_ms` is at most 999), and most of them would
//! find the queue as empty as the one before them did. A scan that found nothing leaves a [`Scan`] mark
//! on its environment; until the mark is a tick old, or anything wakes the environment's waiters (an
//! enqueue, a requeue, another process's notice, a dispatcher probe that found work), blocked polls
//! of that environment wait without scanning again, provided their reclaim window is no shorter than
//! the scan's (a poll asking to reclaim sooner has candidates the scan did not look for). Nothing that
//! makes an item claimable goes unnoticed for longer than a blocked waiter would miss it anyway: the
//! dispatcher's tick probes every environment that has a waiter.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

#[derive(Default)]
struct Slot {
    notify: Notify,
    woken: std::sync::atomic::AtomicBool,
    consumed: std::sync::atomic::AtomicBool,
}

#[derive(Default)]
struct Inner {
    /// Per environment, its waiters by registration number: the first is the oldest. Registering,
    /// leaving and waking one cost a logarithm of the count, not a pass over every waiter, which with
    /// thousands of idle long polls re-polling every second would be quadratic. Every entry is a live
    /// ticket's: a ticket takes its entry out when it is dropped (`leave`), and a wake-up when it pops
    /// it, so an environment is here exactly while someone waits on it.
    queues: HashMap<String, BTreeMap<u64, Arc<Slot>>>,
    next_waiter: u64,
    /// Per environment: the scan under way or the last one that found nothing (see [`Scan`]).
    scans: HashMap<String, ScanMark>,
    next_scan: u64,
}

/// A scan of an environment's queue: begun, or finished empty at `found_empty` (the server's clock,
/// which tests inject; a clock that steps back ends the mark).
#[derive(Clone, Copy)]
struct ScanMark {
    id: u64,
    found_empty: Option<tether_core::Timestamp>,
    /// The scan's `reclaim_older_than_ms`: it looked for deliveries at least this old.
    reclaim_ms: i64,
}

/// A scan begun with [`Waiters::begin_scan`]; tell [`Waiters::found_empty`] when it found nothing.
#[derive(Clone, Copy, Debug)]
pub struct Scan(u64);

/// Bound on environments with a scan mark (the map is cleared beyond it; marks are only hints).
const MAX_SCAN_MARKS: usize = 100_000;

/// All waiters of one server process.
#[derive(Clone, Default)]
pub struct Waiters {
    inner: Arc<Mutex<Inner>>,
}

/// Bound on waiters per environment: a poll beyond it is answered without blocking.
pub const MAX_WAITERS_PER_ENVIRONMENT: usize = 10_000;

impl Waiters {
    /// Registers a waiter for `environment_id`, or `None` when the environment already has too many.
    pub fn register(&self, environment_id: &str) -> Option<Ticket> {
        let slot = Arc::new(Slot::default());
        let mut inner = self.inner.lock().expect("waiters lock");
        inner.next_waiter += 1;
        let id = inner.next_waiter;
        let queue = inner.queues.entry(environment_id.to_owned()).or_default();
        if queue.len() >= MAX_WAITERS_PER_ENVIRONMENT {
            return None;
        }
        queue.insert(id, slot.clone());
        Some(Ticket {
            waiters: self.clone(),
            environment_id: environment_id.to_owned(),
            id,
            slot,
        })
    }

    /// Whether a scan of the environment found nothing less than `ttl` ago (by `now`), looking for deliveries no older than `reclaim_ms` would reclaim, and nothing has woken
    /// its waiters since: a blocked poll with that reclaim window may then wait without scanning.
    pub fn known_empty(
        &self,
        environment_id: &str,
        now: tether_core::Timestamp,
        ttl: std::time::Duration,
        reclaim_ms: i64,
    ) -> bool {
        let inner = self.inner.lock().expect("waiters lock");
        let Some(mark) = inner.scans.get(environment_id) else {
            return false;
        };
        let Some(at) = mark.found_empty else {
            return false;
        };
        let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
        reclaim_ms >= mark.reclaim_ms && now >= at && now.millis_since(at) < ttl_ms
    }

    /// Notes that a scan of the environment's queue, reclaiming deliveries older than `reclaim_ms`,
    /// begins now (see [`Self::found_empty`]).
    pub fn begin_scan(&self, environment_id: &str, reclaim_ms: i64) -> Scan {
        let mut inner = self.inner.lock().expect("waiters lock");
        inner.next_scan += 1;
        let id = inner.next_scan;
        if inner.scans.len() >= MAX_SCAN_MARKS && !inner.scans.contains_key(environment_id) {
            inner.scans.clear();
        }
        inner.scans.insert(
            environment_id.to_owned(),
            ScanMark {
                id,
                found_empty: None,
                reclaim_ms,
            },
        );
        Scan(id)
    }

    /// The scan found nothing to claim. Marks the environment empty unless something woke its waiters
    /// (or another scan began) since the scan began.
    pub fn found_empty(&self, environment_id: &str, scan: Scan, now: tether_core::Timestamp) {
        let mut inner = self.inner.lock().expect("waiters lock");
        if let Some(mark) = inner.scans.get_mut(environment_id) {
            if mark.id == scan.0 {
                mark.found_empty = Some(now);
            }
        }
    }

    /// Wakes up to `count` waiters of the environment, oldest first. Returns how many were woken.
    /// Any scan mark of the environment goes too: whatever woke it may have made an item claimable.
    pub fn wake(&self, environment_id: &str, count: usize) -> usize {
        let mut inner = self.inner.lock().expect("waiters lock");
        Self::wake_locked(&mut inner, environment_id, count)
    }

    fn wake_locked(inner: &mut Inner, environment_id: &str, count: usize) -> usize {
        let mut woken = 0;
        inner.scans.remove(environment_id);
        let Some(queue) = inner.queues.get_mut(environment_id) else {
            return 0;
        };
        while woken < count {
            let Some((_, slot)) = queue.pop_first() else {
                break;
            };
            slot.woken.store(true, std::sync::atomic::Ordering::SeqCst);
            slot.notify.notify_one();
            woken += 1;
        }
        if queue.is_empty() {
            inner.queues.remove(environment_id);
        }
        woken
    }

    /// A waiter leaves. Still queued, it is taken out (and the environment's entry with it once
    /// empty, so that the map holds only environments being waited on). Already woken, its wake-up is
    /// passed on to the next waiter unless it was spent on an item. Both are decided under the lock
    /// that [`Self::wake`] takes, so a wake-up landing while the waiter leaves is never lost.
    fn leave(&self, ticket: &Ticket) {
        let mut inner = self.inner.lock().expect("waiters lock");
        let queued = match inner.queues.get_mut(&ticket.environment_id) {
            Some(queue) => {
                let queued = queue.remove(&ticket.id).is_some();
                if queue.is_empty() {
                    inner.queues.remove(&ticket.environment_id);
                }
                queued
            }
            None => false,
        };
        let consumed = ticket
            .slot
            .consumed
            .load(std::sync::atomic::Ordering::SeqCst);
        if !queued && !consumed {
            Self::wake_locked(&mut inner, &ticket.environment_id, 1);
        }
    }

    /// Wakes every waiter of every environment (shutdown).
    pub fn wake_all(&self) {
        for env in self.environments_waiting() {
            self.wake(&env, usize::MAX);
        }
    }

    /// Environments with at least one waiter (the map holds no others).
    pub fn environments_waiting(&self) -> Vec<String> {
        let inner = self.inner.lock().expect("waiters lock");
        inner.queues.keys().cloned().collect()
    }

    /// Live waiters across all environments (for metrics).
    pub fn count(&self) -> usize {
        let inner = self.inner.lock().expect("waiters lock");
        inner.queues.values().map(BTreeMap::len).sum()
    }
}

/// One registered waiter.
pub struct Ticket {
    waiters: Waiters,
    environment_id: String,
    /// Its registration number, the key of its place in the environment's queue.
    id: u64,
    slot: Arc<Slot>,
}

impl Ticket {
    /// Waits until woken.
    pub async fn woken(&self) {
        if self.slot.woken.load(std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        self.slot.notify.notified().await;
    }

    /// The waiter took an item: its wake-up is spent.
    pub fn consume(&self) {
        self.slot
            .consumed
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.waiters.leave(self);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn one_item_wakes_one_waiter() {
        let w = Waiters::default();
        let a = w.register("env").unwrap();
        let b = w.register("env").unwrap();
        assert_eq!(w.wake("env", 1), 1);
        tokio::time::timeout(Duration::from_millis(100), a.woken())
            .await
            .expect("first waiter woken");
        assert!(
            tokio::time::timeout(Duration::from_millis(50), b.woken())
                .await
                .is_err(),
            "second still waits"
        );
        a.consume();
    }

    #[tokio::test]
    async fn an_unused_wake_up_passes_on() {
        let w = Waiters::default();
        let a = w.register("env").unwrap();
        let b = w.register("env").unwrap();
        w.wake("env", 1);
        drop(a); // woken but gave up without consuming
        tokio::time::timeout(Duration::from_millis(100), b.woken())
            .await
            .expect("passed on to b");
    }

    #[tokio::test]
    async fn waiters_that_give_up_leave_nothing_behind() {
        let w = Waiters::default();
        for i in 0..100 {
            let env = format!("env-{i}");
            let a = w.register(&env).unwrap();
            let b = w.register(&env).unwrap();
            drop(a);
            drop(b);
        }
        assert_eq!(w.environments_waiting().len(), 0);
        assert_eq!(w.count(), 0);
        // One leaving does not take the others' places.
        let a = w.register("env").unwrap();
        let b = w.register("env").unwrap();
        drop(a);
        assert_eq!(w.wake("env", 1), 1);
        tokio::time::timeout(Duration::from_millis(100), b.woken())
            .await
            .expect("the remaining waiter is woken");
        b.consume();
    }

    /// A poll's reclaim window, the default's.
    const RECLAIM: i64 = 5_000;

    #[test]
    fn an_empty_scan_marks_its_environment_until_a_wake_up() {
        let w = Waiters::default();
        let ttl = Duration::from_secs(60);
        let now = tether_core::Timestamp::from_micros(1_000_000);
        assert!(!w.known_empty("env", now, ttl, RECLAIM), "never scanned");
        let scan = w.begin_scan("env", RECLAIM);
        assert!(
            !w.known_empty("env", now, ttl, RECLAIM),
            "a scan under way proves nothing"
        );
        w.found_empty("env", scan, now);
        assert!(w.known_empty("env", now, ttl, RECLAIM));
        assert!(
            !w.known_empty("other", now, ttl, RECLAIM),
            "per environment"
        );
        assert!(
            !w.known_empty("env", now.plus_millis(60_000), ttl, RECLAIM),
            "the mark ages with the server's clock"
        );
        w.wake("env", 1);
        assert!(
            !w.known_empty("env", now, ttl, RECLAIM),
            "a wake-up ends the mark"
        );
    }

    #[test]
    fn an_empty_scan_spares_only_polls_that_reclaim_no_sooner() {
        let w = Waiters::default();
        let ttl = Duration::from_secs(60);
        let now = tether_core::Timestamp::from_micros(1_000_000);
        let scan = w.begin_scan("env", RECLAIM);
        w.found_empty("env", scan, now);
        assert!(w.known_empty("env", now, ttl, RECLAIM));
        assert!(w.known_empty("env", now, ttl, RECLAIM + 1));
        // A delivery of 1 s ago was no candidate of the scan, but is one of this poll's.
        assert!(!w.known_empty("env", now, ttl, RECLAIM - 1));
        assert!(!w.known_empty("env", now, ttl, 0));
        // A scan that reclaims everything spares every poll.
        let eager = w.begin_scan("env", 0);
        w.found_empty("env", eager, now);
        assert!(w.known_empty("env", now, ttl, 0));
        assert!(w.known_empty("env", now, ttl, RECLAIM));
    }

    #[test]
    fn a_scan_begun_before_a_wake_up_leaves_no_mark() {
        let w = Waiters::default();
        let ttl = Duration::from_secs(60);
        let now = tether_core::Timestamp::from_micros(1_000_000);
        let scan = w.begin_scan("env", RECLAIM);
        // An enqueue commits while the scan runs: the scan may have missed it.
        w.wake("env", 1);
        w.found_empty("env", scan, now);
        assert!(!w.known_empty("env", now, ttl, RECLAIM));
        // A later scan began before this one finished: only the later one may mark.
        let first = w.begin_scan("env", RECLAIM);
        let second = w.begin_scan("env", RECLAIM);
        w.found_empty("env", first, now);
        assert!(!w.known_empty("env", now, ttl, RECLAIM));
        w.found_empty("env", second, now);
        assert!(w.known_empty("env", now, ttl, RECLAIM));
    }

    #[tokio::test]
    async fn waiters_are_woken_oldest_first_whoever_leaves_between() {
        let w = Waiters::default();
        let tickets: Vec<Ticket> = (0..6).map(|_| w.register("env").unwrap()).collect();
        let mut tickets: Vec<Option<Ticket>> = tickets.into_iter().map(Some).collect();
        // The second and the fifth leave; the rest are woken one at a time in the order they came.
        tickets[1].take();
        tickets[4].take();
        assert_eq!(w.count(), 4);
        for expected in [0, 2, 3, 5] {
            assert_eq!(w.wake("env", 1), 1);
            let ticket = tickets[expected].take().unwrap();
            tokio::time::timeout(Duration::from_millis(100), ticket.woken())
                .await
                .unwrap_or_else(|_| panic!("waiter {expected} is the oldest left"));
            ticket.consume();
            for (i, later) in tickets.iter().enumerate() {
                if let Some(later) = later {
                    assert!(
                        !later.slot.woken.load(std::sync::atomic::Ordering::SeqCst),
                        "waiter {i} was woken before its turn"
                    );
                }
            }
        }
        assert_eq!(w.count(), 0);
        assert_eq!(w.environments_waiting().len(), 0);
    }

    #[tokio::test]
    async fn wakes_are_not_lost_between_register_and_wait() {
        let w = Waiters::default();
        let a = w.register("env").unwrap();
        w.wake("env", 1);
        tokio::time::timeout(Duration::from_millis(100), a.woken())
            .await
            .expect("remembered");
    }
}

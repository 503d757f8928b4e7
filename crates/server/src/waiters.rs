//! Long-poll waiters, per environment.
//!
//! A blocked poll registers a [`Ticket`] *before* it scans the queue, so an enqueue that lands between
//! the scan and the wait still wakes it. A newly claimable item wakes exactly one waiter (no thundering
//! herd); a waiter that was woken but gives up without claiming (its deadline hit, its client left) passes
//! the wake-up on to the next waiter when its ticket drops.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, Weak};

use tokio::sync::Notify;

#[derive(Default)]
struct Slot {
    notify: Notify,
    woken: std::sync::atomic::AtomicBool,
    consumed: std::sync::atomic::AtomicBool,
}

#[derive(Default)]
struct Inner {
    queues: HashMap<String, VecDeque<Weak<Slot>>>,
}

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
        let queue = inner.queues.entry(environment_id.to_owned()).or_default();
        queue.retain(|w| w.strong_count() > 0);
        if queue.len() >= MAX_WAITERS_PER_ENVIRONMENT {
            return None;
        }
        queue.push_back(Arc::downgrade(&slot));
        Some(Ticket {
            waiters: self.clone(),
            environment_id: environment_id.to_owned(),
            slot,
        })
    }

    /// Wakes up to `count` waiters of the environment, oldest first. Returns how many were woken.
    pub fn wake(&self, environment_id: &str, count: usize) -> usize {
        let mut woken = 0;
        let mut inner = self.inner.lock().expect("waiters lock");
        let Some(queue) = inner.queues.get_mut(environment_id) else {
            return 0;
        };
        while woken < count {
            let Some(weak) = queue.pop_front() else { break };
            if let Some(slot) = weak.upgrade() {
                slot.woken.store(true, std::sync::atomic::Ordering::SeqCst);
                slot.notify.notify_one();
                woken += 1;
            }
        }
        if queue.is_empty() {
            inner.queues.remove(environment_id);
        }
        woken
    }

    /// Removes a waiter that leaves without having been woken.
    fn forget(&self, environment_id: &str, slot: &Arc<Slot>) {
        let mut inner = self.inner.lock().expect("waiters lock");
        let Some(queue) = inner.queues.get_mut(environment_id) else {
            return;
        };
        let gone = Arc::as_ptr(slot);
        queue.retain(|w| w.strong_count() > 0 && !std::ptr::eq(w.as_ptr(), gone));
        if queue.is_empty() {
            inner.queues.remove(environment_id);
        }
    }

    /// Environments with an entry in the map (for tests of its bound).
    #[cfg(test)]
    fn environments(&self) -> usize {
        self.inner.lock().expect("waiters lock").queues.len()
    }

    /// Wakes every waiter of every environment (shutdown).
    pub fn wake_all(&self) {
        let environments: Vec<String> = self
            .inner
            .lock()
            .expect("waiters lock")
            .queues
            .keys()
            .cloned()
            .collect();
        for env in environments {
            self.wake(&env, usize::MAX);
        }
    }

    /// Environments with at least one live waiter.
    pub fn environments_waiting(&self) -> Vec<String> {
        let inner = self.inner.lock().expect("waiters lock");
        inner
            .queues
            .iter()
            .filter(|(_, q)| q.iter().any(|w| w.strong_count() > 0))
            .map(|(env, _)| env.clone())
            .collect()
    }

    /// Live waiters across all environments (for metrics).
    pub fn count(&self) -> usize {
        let inner = self.inner.lock().expect("waiters lock");
        inner
            .queues
            .values()
            .map(|q| q.iter().filter(|w| w.strong_count() > 0).count())
            .sum()
    }
}

/// One registered waiter.
pub struct Ticket {
    waiters: Waiters,
    environment_id: String,
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
        let woken = self.slot.woken.load(std::sync::atomic::Ordering::SeqCst);
        let consumed = self.slot.consumed.load(std::sync::atomic::Ordering::SeqCst);
        if woken && !consumed {
            self.waiters.wake(&self.environment_id, 1);
            return;
        }
        if !woken {
            // A poll that timed out (or whose client left) is still queued: take it out, and the
            // environment's entry with it once empty, so that the map holds only environments that
            // are being waited on rather than every environment ever polled.
            self.waiters.forget(&self.environment_id, &self.slot);
        }
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
        assert_eq!(w.environments(), 0);
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

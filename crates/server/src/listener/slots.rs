//! Connection slots: at most `--max-connections` connections at once, and what happens at the cap.
//!
//! A connection with a request in flight is doing work; one without is only waiting: for its
//! first request (a TLS handshake, or nothing at all), for the rest of a request's headers, or for
//! the next request of a kept-alive connection. At the cap, a new connection takes the slot of the
//! one that has waited longest without a request in flight, among [`SAMPLE`] looked at in turn
//! (a clock hand over the table). Only when every one looked at has a request in flight is the new
//! connection refused.
//!
//! Without this, a client with no credential could fill the cap with connections that say nothing,
//! renewing each before the header timeout closes it, and every new client would be turned away.
//! With it, such connections are the first to go, and a client that has just connected is the last:
//! it has waited the least. (nginx reuses its idle keep-alive connections the same way when it runs
//! out.) When none of those looked at is idle, the one that has longest done nothing but requests
//! that yield goes: an event stream (its client resumes from its `Last-Event-ID`), a body still
//! arriving, or an answer that has waited `STALLED_AFTER` (5 s) for its client to take it (an
//! HTTP/2 stream whose window the client keeps shut: the request is done). Otherwise a client could hold every place with
//! streams, with bodies sent a byte at a time, or with answers it never reads, and keep everyone
//! else out. Other requests in flight are never displaced.
//!
//! A displaced connection closes at once if it had sent nothing of a request, and gracefully if it
//! idled between requests (HTTP/2: a GOAWAY), within [`DISPLACED_GRACE`]. It stops counting towards
//! the cap as soon as it is displaced, so the file descriptors in use may briefly exceed the cap by the
//! connections still closing.

use std::sync::{Arc, Mutex};

use slab::Slab;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::ConnState;

/// How many connections a new one at the cap looks at for one to displace.
pub const SAMPLE: usize = 64;

/// How long a displaced connection that idled between requests has to close gracefully.
pub const DISPLACED_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

/// The table of open connections.
pub(super) struct Slots {
    max: usize,
    table: Mutex<Table>,
    /// Woken whenever a connection leaves the table, for the shutdown's wait.
    left: Notify,
}

struct Table {
    open: Slab<Arc<ConnState>>,
    /// Open connections not displaced: these count towards the cap.
    counted: usize,
    /// Where the next search for a connection to displace starts.
    hand: usize,
}

/// A connection's place in the table, given back when it is dropped.
pub(super) struct Slot {
    slots: Arc<Slots>,
    key: usize,
}

/// What a new connection gets.
pub(super) enum Admission {
    /// A free slot.
    Free(Slot),
    /// The slot of a connection that was displaced for it.
    Displaced(Slot),
    /// Every connection looked at has a request in flight.
    Refused,
}

impl Slots {
    pub(super) fn new(max: usize) -> Arc<Slots> {
        assert!(max > 0, "max_connections must be positive");
        Arc::new(Slots {
            max,
            table: Mutex::new(Table {
                open: Slab::with_capacity(max.min(1024)),
                counted: 0,
                hand: 0,
            }),
            left: Notify::new(),
        })
    }

    /// Admits the connection `state`, displacing another one at the cap if one may be.
    pub(super) fn admit(self: &Arc<Self>, state: Arc<ConnState>) -> Admission {
        let mut table = self.table.lock().expect("no code panics holding the table");
        let displaced = if table.counted < self.max {
            false
        } else {
            let Some(victim) = table.longest_waiting(Instant::now()) else {
                return Admission::Refused;
            };
            let victim = &table.open[victim];
            victim.displaced.cancel();
            table.counted -= 1;
            true
        };
        table.counted += 1;
        assert!(table.counted <= self.max, "the cap holds");
        let key = table.open.insert(state);
        let slot = Slot {
            slots: self.clone(),
            key,
        };
        if displaced {
            Admission::Displaced(slot)
        } else {
            Admission::Free(slot)
        }
    }

    /// Returns once every connection has left the table.
    pub(super) async fn all_gone(&self) {
        loop {
            let left = self.left.notified();
            tokio::pin!(left);
            left.as_mut().enable();
            if self
                .table
                .lock()
                .expect("no code panics holding the table")
                .open
                .is_empty()
            {
                return;
            }
            left.await;
        }
    }
}

impl Table {
    /// Among the next [`SAMPLE`] connections from the hand, the one that gives its place most readily
    /// (`ConnState::displaceable`: one without a request in flight before one with only yielding
    /// requests, and the longest waiting of either), if any; the hand moves past those looked at.
    fn longest_waiting(&mut self, now: Instant) -> Option<usize> {
        let capacity = self.open.capacity().max(1);
        let mut best: Option<((super::Yield, Instant), usize)> = None;
        let mut looked = 0;
        let mut key = self.hand % capacity;
        // Keys are below the slab's capacity; vacant ones are skipped, and a full turn ends the search.
        for _ in 0..capacity {
            if looked == SAMPLE {
                break;
            }
            if let Some(state) = self.open.get(key) {
                looked += 1;
                if let Some(since) = state.displaceable(now) {
                    if best.is_none_or(|(earliest, _)| since < earliest) {
                        best = Some((since, key));
                    }
                }
            }
            key = (key + 1) % capacity;
        }
        self.hand = key;
        best.map(|(_, key)| key)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut table = self
            .slots
            .table
            .lock()
            .expect("no code panics holding the table");
        let state = table.open.remove(self.key);
        if !state.displaced.is_cancelled() {
            table.counted -= 1;
        }
        drop(table);
        self.slots.left.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::listener::InFlight;

    fn admitted(admission: Admission) -> (Slot, bool) {
        match admission {
            Admission::Free(slot) => (slot, false),
            Admission::Displaced(slot) => (slot, true),
            Admission::Refused => panic!("refused"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn at_the_cap_the_connection_that_has_waited_longest_without_a_request_is_displaced() {
        let slots = Slots::new(3);
        let states: Vec<_> = (0..3).map(|_| Arc::new(ConnState::new())).collect();
        let mut held = Vec::new();
        for state in &states {
            let (slot, displaced) = admitted(slots.admit(state.clone()));
            assert!(!displaced);
            held.push(slot);
            tokio::time::advance(Duration::from_secs(1)).await;
        }
        // The oldest has a request in flight; the second has waited longest of the others.
        let busy = InFlight::begin(states[0].clone());
        let newcomer = Arc::new(ConnState::new());
        let (slot, displaced) = admitted(slots.admit(newcomer.clone()));
        assert!(displaced);
        assert!(!states[0].displaced.is_cancelled());
        assert!(states[1].displaced.is_cancelled());
        assert!(!states[2].displaced.is_cancelled());
        held.push(slot);
        // The displaced one still closing does not count; the others do, and all are busy now.
        let _busy: Vec<_> = [&states[2], &newcomer]
            .into_iter()
            .map(|s| InFlight::begin(s.clone()))
            .collect();
        assert!(matches!(
            slots.admit(Arc::new(ConnState::new())),
            Admission::Refused
        ));
        // The displaced one leaving frees nothing more: its place was already taken.
        drop(held.remove(1));
        assert!(matches!(
            slots.admit(Arc::new(ConnState::new())),
            Admission::Refused
        ));
        // A connection that leaves frees its slot.
        drop(busy);
        drop(held.remove(0));
        let (_slot, displaced) = admitted(slots.admit(Arc::new(ConnState::new())));
        assert!(!displaced);
    }

    #[tokio::test(start_paused = true)]
    async fn the_wait_for_every_connection_to_leave_ends_when_the_last_one_does() {
        let slots = Slots::new(2);
        let (a, _) = admitted(slots.admit(Arc::new(ConnState::new())));
        let (b, _) = admitted(slots.admit(Arc::new(ConnState::new())));
        let waiting = tokio::spawn({
            let slots = slots.clone();
            async move { slots.all_gone().await }
        });
        drop(a);
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        drop(b);
        waiting.await.unwrap();
    }
}

//! The candidates a claim read and did not take, kept a few milliseconds for this process's next
//! claims of the same queue, which then take one without a read of their own.
//!
//! A claim reads the queue's first candidates (as many as this process's claims in flight, plus a
//! few spare) and takes one. Under load the next claim comes within a millisecond and would read the
//! same rows again: on PostgreSQL that read was a third of the statements of a chained claim's
//! cycle. Taking the next spare candidate instead answers the claim as of the read that found it,
//! and keeps every guarantee:
//!
//! - The conditional write decides, as for a candidate just read: one that changed since (taken by
//!   another server, stopped, delivered) conflicts, and the claim forgets the window's spares and
//!   reads afresh. A candidate this process wrote since is passed over before any write (the
//!   reservation's check, `App::reserve`).
//! - Oldest first (D-22): the spares are the candidates that followed the one taken, in queue order.
//!   Nothing that enters the queue later can go before them, since an item (re)enters `queued` with
//!   `enqueued_at = now`; what they can miss is an item that became claimable by time alone since the
//!   read (a hold that ended, a poll's delivery that became reclaimable) or one another server
//!   enqueued with a clock behind this one's, and [`KEEP_FOR_MS`] bounds that: a claim answered from
//!   spares is judged as of a read at most that long ago, where a claim that reads is judged as of
//!   its own read, which also precedes its write.
//! - Spares are kept per environment and reclaim window: a poll with another `reclaim_older_than_ms`
//!   has another candidate set.
//!
//! Bounded: a window keeps at most the rest of one read ([`super::work`]'s batch, at most 64 rows),
//! and at most [`MAX_WINDOWS`] windows are kept.

use std::collections::{HashMap, VecDeque};

use tether_core::Timestamp;
use tether_store::Candidate;

/// How long after its read a spare candidate may be taken.
pub const KEEP_FOR_MS: i64 = 10;
/// Windows kept at most; a read beyond them keeps no spares until stale ones are dropped.
pub const MAX_WINDOWS: usize = 64;

/// A queue's candidate set: the environment and the poll's reclaim window.
type Window = (String, i64);

struct Spares {
    read_at: Timestamp,
    candidates: VecDeque<Candidate>,
}

impl Spares {
    fn fresh_at(&self, now: Timestamp) -> bool {
        self.read_at <= now && now <= self.read_at.plus_millis(KEEP_FOR_MS)
    }
}

#[derive(Default)]
pub(crate) struct SpareCandidates {
    by_window: HashMap<Window, Spares>,
}

impl SpareCandidates {
    /// Keeps `rest`, the candidates after the one a claim took from a read made at `read_at`, for the
    /// next claims of `(environment_id, reclaim_ms)`, in place of any kept before.
    pub fn keep(
        &mut self,
        environment_id: &str,
        reclaim_ms: i64,
        read_at: Timestamp,
        rest: impl Iterator<Item = Candidate>,
    ) {
        let candidates: VecDeque<Candidate> = rest.collect();
        let window = (environment_id.to_owned(), reclaim_ms);
        if candidates.is_empty() {
            self.by_window.remove(&window);
            return;
        }
        if self.by_window.len() >= MAX_WINDOWS && !self.by_window.contains_key(&window) {
            self.by_window.retain(|_, spares| spares.fresh_at(read_at));
            if self.by_window.len() >= MAX_WINDOWS {
                return;
            }
        }
        self.by_window.insert(
            window,
            Spares {
                read_at,
                candidates,
            },
        );
        debug_assert!(self.by_window.len() <= MAX_WINDOWS);
    }

    /// The window's next spare candidate, if one read at most [`KEEP_FOR_MS`] before `now` is left.
    /// It is handed out once: whether it can still be taken is the caller's to find out.
    pub fn next(
        &mut self,
        environment_id: &str,
        reclaim_ms: i64,
        now: Timestamp,
    ) -> Option<Candidate> {
        let window = (environment_id.to_owned(), reclaim_ms);
        let spares = self.by_window.get_mut(&window)?;
        let next = match spares.fresh_at(now) {
            true => spares.candidates.pop_front(),
            false => None,
        };
        if next.is_none() || spares.candidates.is_empty() {
            self.by_window.remove(&window);
        }
        next
    }

    /// Drops the window's spares: one of them changed since it was read.
    pub fn forget(&mut self, environment_id: &str, reclaim_ms: i64) {
        self.by_window
            .remove(&(environment_id.to_owned(), reclaim_ms));
    }

    #[cfg(test)]
    fn windows(&self) -> usize {
        self.by_window.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn candidates<'a>(ids: &'a [&'a str]) -> impl Iterator<Item = Candidate> + 'a {
        ids.iter()
            .map(|id| Candidate::new((*id).to_owned(), 1, "{}".to_owned()))
    }

    fn at(ms: i64) -> Timestamp {
        Timestamp::from_millis(1_700_000_000_000 + ms)
    }

    fn ids(
        spares: &mut SpareCandidates,
        env: &str,
        reclaim_ms: i64,
        now: Timestamp,
    ) -> Vec<String> {
        std::iter::from_fn(|| spares.next(env, reclaim_ms, now))
            .map(|c| c.id)
            .collect()
    }

    #[test]
    fn spares_are_handed_out_once_in_queue_order() {
        let mut spares = SpareCandidates::default();
        spares.keep("env", 5000, at(0), candidates(&["b", "c", "d"]));
        assert_eq!(ids(&mut spares, "env", 5000, at(3)), ["b", "c", "d"]);
        assert_eq!(spares.next("env", 5000, at(3)), None);
        assert_eq!(spares.windows(), 0, "an emptied window is dropped");
    }

    #[test]
    fn spares_are_kept_for_their_window_only() {
        let mut spares = SpareCandidates::default();
        spares.keep("env", 5000, at(0), candidates(&["b"]));
        assert_eq!(spares.next("env", 0, at(0)), None, "another reclaim window");
        assert_eq!(
            spares.next("other", 5000, at(0)),
            None,
            "another environment"
        );
        assert_eq!(ids(&mut spares, "env", 5000, at(0)), ["b"]);
    }

    #[test]
    fn spares_go_stale_after_keep_for_ms() {
        let mut spares = SpareCandidates::default();
        spares.keep("env", 5000, at(0), candidates(&["b", "c"]));
        assert_eq!(
            ids(&mut spares, "env", 5000, at(KEEP_FOR_MS + 1)),
            Vec::<String>::new()
        );
        assert_eq!(spares.windows(), 0, "a stale window is dropped when asked");
        spares.keep("env", 5000, at(0), candidates(&["b", "c"]));
        assert_eq!(ids(&mut spares, "env", 5000, at(KEEP_FOR_MS)), ["b", "c"]);
        spares.keep("env", 5000, at(10), candidates(&["b"]));
        assert_eq!(
            spares.next("env", 5000, at(9)),
            None,
            "a clock that went back"
        );
    }

    #[test]
    fn a_later_read_replaces_the_spares_and_a_conflict_forgets_them() {
        let mut spares = SpareCandidates::default();
        spares.keep("env", 5000, at(0), candidates(&["b", "c"]));
        spares.keep("env", 5000, at(1), candidates(&["d"]));
        assert_eq!(ids(&mut spares, "env", 5000, at(2)), ["d"]);
        spares.keep("env", 5000, at(2), candidates(&["e", "f"]));
        spares.forget("env", 5000);
        assert_eq!(spares.next("env", 5000, at(2)), None);
        spares.keep("env", 5000, at(2), candidates(&["e"]));
        spares.keep("env", 5000, at(2), candidates(&[]));
        assert_eq!(
            spares.windows(),
            0,
            "a read that left nothing spare leaves no window"
        );
    }

    #[test]
    fn at_most_max_windows_are_kept_and_stale_ones_make_room() {
        let mut spares = SpareCandidates::default();
        for n in 0..MAX_WINDOWS {
            spares.keep(&format!("env{n}"), 5000, at(0), candidates(&["x"]));
        }
        spares.keep("one-more", 5000, at(1), candidates(&["x"]));
        assert_eq!(spares.windows(), MAX_WINDOWS);
        assert_eq!(
            spares.next("one-more", 5000, at(1)),
            None,
            "no room while all are fresh"
        );
        spares.keep("env0", 5000, at(1), candidates(&["y"]));
        assert_eq!(spares.windows(), MAX_WINDOWS, "a kept window is replaced");
        spares.keep("one-more", 5000, at(KEEP_FOR_MS + 2), candidates(&["x"]));
        assert_eq!(spares.windows(), 1, "the stale windows made room");
        assert_eq!(
            ids(&mut spares, "one-more", 5000, at(KEEP_FOR_MS + 2)),
            ["x"]
        );
    }
}

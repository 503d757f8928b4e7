//! The candidates a claim read and did not take, kept a few milliseconds for this process's next
//! claims of the same queue, which then take one without a read of their own.
//!
//! A claim reads the queue's first candidates (as many as this process's claims taking an item now,
//! a few spare, and, when it holds the queue's read turn, the claims waiting for it) and takes one. Under load the next claim comes
//! within a millisecond and would read the same rows again: on PostgreSQL that read was a third of
//! the statements of a chained claim's cycle. Taking the next candidate left over instead answers the
//! claim as of the read that found it, which may have begun before the claim arrived: a claim's view
//! of the queue is at most [`KEEP_FOR_MS`] old, where one that reads is judged as of its own read,
//! which also precedes its write. What that keeps:
//!
//! - The conditional write decides, as for a candidate just read: one that changed since (taken by
//!   another server, stopped, delivered) conflicts. A claim whose write loses a race, whatever the
//!   race was about, forgets its environment's left-overs, and reads made meanwhile keep none
//!   ([`SpareCandidates::forget_environment`]): the item may have changed, as others may have, or
//!   still be claimable (a write refused for its session's version, or for a token in use) and
//!   older than what reads made while it was reserved left. A candidate this process wrote since
//!   is passed over before any write (the reservation's check, `App::first_takeable`).
//! - Oldest first (D-22), up to that staleness: the left-overs are the candidates that followed the
//!   one taken, in queue order, and an item that (re)enters `queued` later does so with
//!   `enqueued_at = now`, behind them. What they can miss, for at most [`KEEP_FOR_MS`]:
//!   - an item that became claimable by time alone since the read (a hold that ended, a poll's
//!     delivery older than the reclaim window);
//!   - one another server enqueued with a clock behind this one's;
//!   - one a claim of this process had reserved when the read was made and then did not take (its
//!     write failed, its client went away): such a claim forgets every window's left-overs, and
//!     reads under way keep none (`work`'s `Reservation`, [`SpareCandidates::forget_all`]).
//!
//!   And one case that would not be bounded by time: this process's own poll delivers an item,
//!   which another poll may take again once the reclaim window has passed; with a window no longer
//!   than [`KEEP_FOR_MS`] it could be claimable again while younger left-overs are handed out, so no
//!   left-overs are kept for such a window.
//! - Left-overs are kept per environment and reclaim window: a poll with another
//!   `reclaim_older_than_ms` has another candidate set.
//!
//! What a window does not keep (none for its reclaim window, no room) the claim that read it keeps
//! for its own next attempts, as every claim went through its own read before.
//!
//! Bounded: a window keeps at most what one read left (`work`'s batch, at most 64 rows), at most
//! [`MAX_WINDOWS`] windows are kept, and their documents take at most [`MAX_BYTES`] together; stale
//! windows are dropped whenever a read keeps its own.

use std::collections::{HashMap, VecDeque};

use tether_core::Timestamp;
use tether_store::Candidate;

/// How long after its read a candidate left over may be taken.
pub const KEEP_FOR_MS: i64 = 10;
/// Windows kept at most; a read beyond them keeps nothing until stale ones are dropped.
pub const MAX_WINDOWS: usize = 64;
/// The bytes of the documents kept, over every window: a read that would go beyond keeps fewer.
pub const MAX_BYTES: usize = 4 << 20;

/// A queue's candidate set: the environment and the poll's reclaim window.
type Window = (String, i64);

struct Spares {
    read_at: Timestamp,
    candidates: VecDeque<Candidate>,
    /// The bytes of the candidates' documents.
    bytes: usize,
}

impl Spares {
    fn fresh_at(&self, now: Timestamp) -> bool {
        self.read_at <= now && now <= self.read_at.plus_millis(KEEP_FOR_MS)
    }
}

#[derive(Default)]
pub(crate) struct SpareCandidates {
    by_window: HashMap<Window, Spares>,
    /// Counts the forgettings ([`Self::forget_all`], [`Self::forget_environment`]): a read made before
    /// one keeps nothing.
    generation: u64,
}

impl SpareCandidates {
    /// What a read about to be made notes, to hand back to [`Self::keep`].
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Keeps `rest`, the candidates after the one a claim took from a read made at `read_at` (when
    /// [`Self::generation`] said `generation`), for the next claims of `(environment_id,
    /// reclaim_ms)`, in place of any kept from an earlier read. Returns what it does not keep, for
    /// the claim's own next attempts: everything when the window keeps nothing (a reclaim window of
    /// [`KEEP_FOR_MS`] or less, no room, every left-over forgotten since the read, a later read's
    /// left-overs kept already), or the tail beyond [`MAX_BYTES`].
    pub fn keep(
        &mut self,
        environment_id: &str,
        reclaim_ms: i64,
        read_at: Timestamp,
        generation: u64,
        mut rest: VecDeque<Candidate>,
    ) -> VecDeque<Candidate> {
        // Stale windows go; those of reads made after this one stay, whatever this one's clock says.
        self.by_window
            .retain(|_, spares| spares.read_at > read_at || spares.fresh_at(read_at));
        let window = (environment_id.to_owned(), reclaim_ms);
        let later = self
            .by_window
            .get(&window)
            .is_some_and(|spares| spares.read_at > read_at);
        if later || generation != self.generation || reclaim_ms <= KEEP_FOR_MS {
            return rest;
        }
        self.by_window.remove(&window);
        if self.by_window.len() >= MAX_WINDOWS {
            return rest;
        }
        let mut room = MAX_BYTES.saturating_sub(self.bytes());
        let fitting = rest
            .iter()
            .take_while(
                |candidate| match room.checked_sub(candidate.document_len()) {
                    Some(left) => {
                        room = left;
                        true
                    }
                    None => false,
                },
            )
            .count();
        let beyond = rest.split_off(fitting);
        if !rest.is_empty() {
            let bytes = rest.iter().map(Candidate::document_len).sum();
            self.by_window.insert(
                window,
                Spares {
                    read_at,
                    candidates: rest,
                    bytes,
                },
            );
        }
        debug_assert!(self.by_window.len() <= MAX_WINDOWS);
        debug_assert!(self.bytes() <= MAX_BYTES);
        beyond
    }

    /// The window's next candidate left over, if one read at most [`KEEP_FOR_MS`] before `now` is
    /// left. It is handed out once: whether it can still be taken is the caller's to find out.
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
        if let Some(candidate) = &next {
            spares.bytes -= candidate.document_len();
        }
        if next.is_none() || spares.candidates.is_empty() {
            self.by_window.remove(&window);
        }
        next
    }

    /// Drops the environment's left-overs, and keeps none from reads under way: a claim's write
    /// lost a race for an item of it, which either changed (as others may have) or is still
    /// claimable (a write refused for its session's version, or for a token already in use) and
    /// older than what reads made while it was reserved left.
    pub fn forget_environment(&mut self, environment_id: &str) {
        self.by_window
            .retain(|(environment, _), _| environment != environment_id);
        self.generation += 1;
    }

    /// Drops every window's left-overs: an item that a read passed over, reserved by a claim here,
    /// is claimable after all, and older than what that read left.
    pub fn forget_all(&mut self) {
        self.by_window.clear();
        self.generation += 1;
    }

    fn bytes(&self) -> usize {
        self.by_window.values().map(|spares| spares.bytes).sum()
    }

    #[cfg(test)]
    fn windows(&self) -> usize {
        self.by_window.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn candidates(ids: &[&str]) -> VecDeque<Candidate> {
        ids.iter()
            .map(|id| Candidate::new((*id).to_owned(), 1, "{}".to_owned()))
            .collect()
    }

    /// Keeps the candidates `ids` as a read made at `read_at` left them; returns the ids not kept.
    fn keep(
        spares: &mut SpareCandidates,
        env: &str,
        reclaim_ms: i64,
        read_at: Timestamp,
        ids: &[&str],
    ) -> Vec<String> {
        let generation = spares.generation();
        let rest = spares.keep(env, reclaim_ms, read_at, generation, candidates(ids));
        rest.into_iter().map(|c| c.id).collect()
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
        keep(&mut spares, "env", 5000, at(0), &["b", "c", "d"]);
        assert_eq!(ids(&mut spares, "env", 5000, at(3)), ["b", "c", "d"]);
        assert_eq!(spares.next("env", 5000, at(3)), None);
        assert_eq!(spares.windows(), 0, "an emptied window is dropped");
    }

    #[test]
    fn spares_are_kept_for_their_window_only() {
        let mut spares = SpareCandidates::default();
        keep(&mut spares, "env", 5000, at(0), &["b"]);
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
        keep(&mut spares, "env", 5000, at(0), &["b", "c"]);
        assert_eq!(
            ids(&mut spares, "env", 5000, at(KEEP_FOR_MS + 1)),
            Vec::<String>::new()
        );
        assert_eq!(spares.windows(), 0, "a stale window is dropped when asked");
        keep(&mut spares, "env", 5000, at(0), &["b", "c"]);
        assert_eq!(ids(&mut spares, "env", 5000, at(KEEP_FOR_MS)), ["b", "c"]);
        keep(&mut spares, "env", 5000, at(10), &["b"]);
        assert_eq!(
            spares.next("env", 5000, at(9)),
            None,
            "a clock that went back"
        );
    }

    #[test]
    fn a_later_read_replaces_the_spares_and_a_conflict_forgets_them() {
        let mut spares = SpareCandidates::default();
        keep(&mut spares, "env", 5000, at(0), &["b", "c"]);
        keep(&mut spares, "env", 5000, at(1), &["d"]);
        assert_eq!(ids(&mut spares, "env", 5000, at(2)), ["d"]);
        keep(&mut spares, "env", 5000, at(2), &["e", "f"]);
        keep(&mut spares, "env", 30_000, at(2), &["e", "f"]);
        keep(&mut spares, "other", 5000, at(2), &["g"]);
        let before = spares.generation();
        spares.forget_environment("env");
        assert_eq!(spares.next("env", 5000, at(2)), None);
        assert_eq!(
            spares.next("env", 30_000, at(2)),
            None,
            "every window of it"
        );
        assert_eq!(
            ids(&mut spares, "other", 5000, at(2)),
            ["g"],
            "another's stay"
        );
        let rest = spares.keep("env", 5000, at(2), before, candidates(&["h"]));
        assert_eq!(rest.len(), 1, "a read under way keeps nothing");
        keep(&mut spares, "env", 5000, at(2), &["e"]);
        keep(&mut spares, "env", 5000, at(2), &[]);
        assert_eq!(
            spares.windows(),
            0,
            "a read that left nothing spare leaves no window"
        );
    }

    #[test]
    fn a_reclaim_window_no_longer_than_keep_for_ms_keeps_nothing() {
        let mut spares = SpareCandidates::default();
        for reclaim_ms in [0, KEEP_FOR_MS] {
            keep(&mut spares, "env", reclaim_ms, at(0), &["b"]);
            assert_eq!(spares.next("env", reclaim_ms, at(0)), None, "{reclaim_ms}");
        }
        keep(&mut spares, "env", KEEP_FOR_MS + 1, at(0), &["b"]);
        assert_eq!(ids(&mut spares, "env", KEEP_FOR_MS + 1, at(0)), ["b"]);
    }

    #[test]
    fn the_documents_kept_take_at_most_max_bytes() {
        let mut spares = SpareCandidates::default();
        let doc = "x".repeat(MAX_BYTES / 3);
        let big = |id: &str| Candidate::new(id.to_owned(), 1, doc.clone());
        let kept = spares.keep("env", 5000, at(0), 0, [big("a"), big("b")].into());
        assert!(kept.is_empty());
        let beyond = spares.keep(
            "other",
            5000,
            at(0),
            0,
            [big("c"), big("d"), big("e")].into(),
        );
        let beyond: Vec<_> = beyond.into_iter().map(|c| c.id).collect();
        assert_eq!(beyond, ["d", "e"], "what does not fit is handed back");
        assert_eq!(spares.bytes(), 3 * (MAX_BYTES / 3));
        assert_eq!(
            ids(&mut spares, "other", 5000, at(0)),
            ["c"],
            "what fits, in order"
        );
        assert_eq!(ids(&mut spares, "env", 5000, at(0)), ["a", "b"]);
        assert_eq!(spares.bytes(), 0, "taken ones are no longer counted");
    }

    #[test]
    fn a_read_drops_the_stale_windows_and_forget_all_drops_every_one() {
        let mut spares = SpareCandidates::default();
        keep(&mut spares, "old", 5000, at(0), &["a"]);
        keep(&mut spares, "new", 5000, at(KEEP_FOR_MS + 1), &["b"]);
        assert_eq!(spares.windows(), 1, "the stale window went with the read");
        keep(&mut spares, "other", 5000, at(KEEP_FOR_MS + 1), &["c"]);
        spares.forget_all();
        assert_eq!(spares.windows(), 0);
    }

    #[test]
    fn a_read_made_before_forget_all_or_before_a_later_read_keeps_nothing() {
        let mut spares = SpareCandidates::default();
        let before = spares.generation();
        spares.forget_all();
        let rest = spares.keep("env", 5000, at(0), before, candidates(&["a", "b"]));
        assert_eq!(rest.len(), 2, "handed back for the claim's own use");
        assert_eq!(spares.windows(), 0);
        keep(&mut spares, "env", 5000, at(2), &["c"]);
        assert_eq!(
            keep(&mut spares, "env", 5000, at(1), &["b", "c"]),
            ["b", "c"]
        );
        assert_eq!(
            keep(&mut spares, "env", 5000, at(1), &[]),
            Vec::<String>::new()
        );
        assert_eq!(
            ids(&mut spares, "env", 5000, at(2)),
            ["c"],
            "the later read's stays"
        );
    }

    #[test]
    fn at_most_max_windows_are_kept_and_stale_ones_make_room() {
        let mut spares = SpareCandidates::default();
        for n in 0..MAX_WINDOWS {
            keep(&mut spares, &format!("env{n}"), 5000, at(0), &["x"]);
        }
        keep(&mut spares, "one-more", 5000, at(1), &["x"]);
        assert_eq!(spares.windows(), MAX_WINDOWS);
        assert_eq!(
            spares.next("one-more", 5000, at(1)),
            None,
            "no room while all are fresh"
        );
        keep(&mut spares, "env0", 5000, at(1), &["y"]);
        assert_eq!(spares.windows(), MAX_WINDOWS, "a kept window is replaced");
        keep(&mut spares, "one-more", 5000, at(KEEP_FOR_MS + 2), &["x"]);
        assert_eq!(spares.windows(), 1, "the stale windows made room");
        assert_eq!(
            ids(&mut spares, "one-more", 5000, at(KEEP_FOR_MS + 2)),
            ["x"]
        );
    }
}

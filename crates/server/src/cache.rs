//! Hints kept in server memory to spare the store a read. None of them is a source of truth:
//!
//! - [`TtlCache`] holds a record this process read for at most its time to live, so a change made by
//!   another server process (a revoked credential, an archived environment) is seen within that bound;
//!   this process drops the whole cache on its own change of such a record, so it sees its own changes
//!   at once.
//! - [`LeaseHorizon`] is a lower bound on the earliest lease deadline in the store, so that a poll runs
//!   the expiry query only when some lease may be due. A deadline written by another process may be
//!   earlier; the dispatcher's tick queries the store anyway and refreshes the bound, and every request
//!   that touches an item settles its expiry itself, so the bound only delays an expiry's timeliness by
//!   at most one tick.
//! - [`WrittenRecords`] holds work items and sessions as this process last wrote them, with the row
//!   version the write produced, so that the next operation on the item (a heartbeat after an ack, a
//!   stop after a heartbeat) starts from there instead of reading. Another process may have written
//!   since: the next write is conditional on that version, so a stale record is refused and forgotten,
//!   and the caller reads and decides again. A decision taken from a remembered record that writes
//!   nothing (a refusal, a read) is never answered from it.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tether_core::Timestamp;
use tether_store::Versioned;

/// How long a cached credential or environment may be used: a revocation or archive made through
/// another server process takes effect within this bound.
pub const RECORD_TTL: Duration = Duration::from_secs(1);

/// Entries a cache holds at most; when full it starts again empty (a miss only costs a read).
const MAX_ENTRIES: usize = 10_000;

/// Records read recently, each usable for [`RECORD_TTL`].
pub struct TtlCache<K, V> {
    ttl: Duration,
    entries: Mutex<HashMap<K, (Instant, V)>>,
}

impl<K: Eq + Hash, V: Clone> TtlCache<K, V> {
    pub fn new(ttl: Duration) -> Self {
        TtlCache {
            ttl,
            entries: Mutex::new(HashMap::new()),
        }
    }

    pub fn get<Q>(&self, key: &Q) -> Option<V>
    where
        K: std::borrow::Borrow<Q>,
        Q: Eq + Hash + ?Sized,
    {
        let entries = self.entries.lock().expect("cache lock");
        entries
            .get(key)
            .filter(|(read_at, _)| read_at.elapsed() < self.ttl)
            .map(|(_, value)| value.clone())
    }

    /// Stores `value`, read at `read_at` (taken before the read, so the bound counts from then).
    pub fn put(&self, key: K, value: V, read_at: Instant) {
        let mut entries = self.entries.lock().expect("cache lock");
        if entries.len() >= MAX_ENTRIES {
            entries.clear();
        }
        entries.insert(key, (read_at, value));
    }

    pub fn clear(&self) {
        self.entries.lock().expect("cache lock").clear();
    }
}

/// Records as this process last wrote them (see the module's comment), keyed by id. Bounded: two
/// generations of at most `capacity` each, the older dropped whole when the newer fills, so the
/// records written last are kept and a lookup or a write costs O(1).
pub struct WrittenRecords<V> {
    capacity: usize,
    generations: Mutex<Generations<V>>,
}

struct Generations<V> {
    newer: HashMap<String, Versioned<V>>,
    older: HashMap<String, Versioned<V>>,
}

impl<V: Clone> WrittenRecords<V> {
    pub fn new(capacity: usize) -> Self {
        assert!(capacity > 0, "a memory of no records remembers nothing");
        WrittenRecords {
            capacity,
            generations: Mutex::new(Generations {
                newer: HashMap::new(),
                older: HashMap::new(),
            }),
        }
    }

    /// The record as this process last wrote it, if it still remembers.
    pub fn get(&self, id: &str) -> Option<Versioned<V>> {
        let generations = self.generations.lock().expect("written records lock");
        generations
            .newer
            .get(id)
            .or_else(|| generations.older.get(id))
            .cloned()
    }

    /// This process committed `record`. Two requests on one record may finish their commits in
    /// either order: a version older than the one remembered is not taken.
    pub fn wrote(&self, id: &str, record: Versioned<V>) {
        let mut generations = self.generations.lock().expect("written records lock");
        let Generations { newer, older } = &mut *generations;
        let known = newer.get(id).or_else(|| older.get(id));
        if known.is_some_and(|known| known.version >= record.version) {
            return;
        }
        older.remove(id);
        if newer.len() >= self.capacity {
            *older = std::mem::take(newer);
        }
        newer.insert(id.to_owned(), record);
        debug_assert!(newer.len() <= self.capacity && older.len() <= self.capacity);
    }

    /// Drops the record: a write to it was refused or its outcome is unknown, or it was deleted.
    pub fn forget(&self, id: &str) {
        let mut generations = self.generations.lock().expect("written records lock");
        generations.newer.remove(id);
        generations.older.remove(id);
    }

    pub fn len(&self) -> usize {
        let generations = self.generations.lock().expect("written records lock");
        generations.newer.len() + generations.older.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A lower bound on the earliest lease deadline in the store (see the module's comment).
pub struct LeaseHorizon {
    state: Mutex<Horizon>,
}

struct Horizon {
    /// `None` until the store was asked; `Some(None)`: no lease at all.
    earliest: Option<Option<Timestamp>>,
    /// Lease deadlines this process wrote, counted, so a refresh that raced with one keeps it.
    writes: u64,
}

impl Default for LeaseHorizon {
    fn default() -> Self {
        LeaseHorizon {
            state: Mutex::new(Horizon {
                earliest: None,
                writes: 0,
            }),
        }
    }
}

impl LeaseHorizon {
    /// Whether a lease may be due at `now` (true while the bound is unknown).
    pub fn may_be_due(&self, now: Timestamp) -> bool {
        match self.state.lock().expect("horizon lock").earliest {
            None => true,
            Some(None) => false,
            Some(Some(earliest)) => earliest <= now,
        }
    }

    /// The count to hand back to [`Self::refreshed`], taken before reading the store.
    pub fn before_refresh(&self) -> u64 {
        self.state.lock().expect("horizon lock").writes
    }

    /// The store said its earliest deadline is `earliest`, from a read begun when the write count was
    /// `writes_before`. A deadline this process wrote since is kept (the bound only ever goes lower).
    pub fn refreshed(&self, writes_before: u64, earliest: Option<Timestamp>) {
        let mut state = self.state.lock().expect("horizon lock");
        if state.writes == writes_before {
            state.earliest = Some(earliest);
        } else if let Some(known) = state.earliest {
            state.earliest = Some(earlier(known, earliest));
        }
    }

    /// This process committed a lease deadline.
    pub fn wrote(&self, deadline: Timestamp) {
        let mut state = self.state.lock().expect("horizon lock");
        state.writes += 1;
        if let Some(known) = state.earliest {
            state.earliest = Some(earlier(known, Some(deadline)));
        }
    }

    /// Forgets the bound, so the next poll asks the store (after an outage or amnesty).
    pub fn forget(&self) {
        let mut state = self.state.lock().expect("horizon lock");
        state.writes += 1;
        state.earliest = None;
    }
}

fn earlier(a: Option<Timestamp>, b: Option<Timestamp>) -> Option<Timestamp> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ms: i64) -> Timestamp {
        Timestamp::from_micros(ms * 1000)
    }

    #[test]
    fn an_unknown_horizon_asks_the_store() {
        let h = LeaseHorizon::default();
        assert!(h.may_be_due(at(0)));
        h.wrote(at(5));
        assert!(
            h.may_be_due(at(0)),
            "one write does not make the bound known"
        );
        let n = h.before_refresh();
        h.refreshed(n, None);
        assert!(!h.may_be_due(at(1_000_000)));
    }

    #[test]
    fn a_write_during_a_refresh_is_kept() {
        let h = LeaseHorizon::default();
        let n = h.before_refresh();
        h.refreshed(n, Some(at(100)));
        let n = h.before_refresh();
        h.wrote(at(50));
        h.refreshed(n, Some(at(200)));
        assert!(h.may_be_due(at(50)));
        assert!(!h.may_be_due(at(49)));
    }

    fn record(version: i64) -> Versioned<&'static str> {
        Versioned {
            value: "doc",
            version,
        }
    }

    #[test]
    fn a_written_record_is_remembered_at_its_newest_version() {
        let w = WrittenRecords::new(4);
        assert_eq!(w.get("a"), None);
        w.wrote("a", record(3));
        w.wrote("a", record(2));
        assert_eq!(
            w.get("a").map(|r| r.version),
            Some(3),
            "an older write finishing late"
        );
        w.wrote("a", record(4));
        assert_eq!(w.get("a").map(|r| r.version), Some(4));
        w.forget("a");
        assert_eq!(w.get("a"), None);
        w.wrote("a", record(1));
        assert_eq!(
            w.get("a").map(|r| r.version),
            Some(1),
            "a forgotten record starts over"
        );
    }

    #[test]
    fn written_records_keep_the_latest_within_two_generations() {
        let capacity = 8;
        let w = WrittenRecords::new(capacity);
        for i in 0..100_usize {
            w.wrote(&format!("r{i}"), record(1));
            assert!(w.len() <= 2 * capacity);
            // The last `capacity` writes are always there.
            for j in i.saturating_sub(capacity - 1)..=i {
                assert!(w.get(&format!("r{j}")).is_some(), "r{j} after r{i}");
            }
        }
        // A record rewritten moves to the newer generation and survives the next turnover.
        w.wrote("r92", record(2));
        for i in 100..100 + capacity {
            w.wrote(&format!("r{i}"), record(1));
        }
        assert_eq!(w.get("r92").map(|r| r.version), Some(2));
        assert_eq!(w.get("r93"), None);
    }

    #[test]
    fn cached_records_expire() {
        let c = TtlCache::new(Duration::from_millis(0));
        c.put("k", 1, Instant::now());
        assert_eq!(c.get(&"k"), None);
        let c = TtlCache::new(Duration::from_secs(60));
        c.put("k", 1, Instant::now());
        assert_eq!(c.get(&"k"), Some(1));
        c.clear();
        assert_eq!(c.get(&"k"), None);
    }
}

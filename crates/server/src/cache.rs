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

/// How long a cached credential, environment or agent may be used (`ServiceConfig::record_ttl`): a
/// revocation or archive made through another server process takes effect within this bound.
pub const RECORD_TTL: Duration = Duration::from_secs(1);

/// Entries a cache holds at most; when full it starts again empty (a miss only costs a read).
const MAX_ENTRIES: usize = 10_000;

/// Records read recently, each usable for its time to live. Bounded in count and, when built
/// [`TtlCache::weighed`], in bytes: a record heavier than a [`RECORD_SHARE`]th of the byte bound is not
/// kept (its next use reads it), and a record that would take the cache past either bound empties it
/// first. Expired entries are not swept: the bounds hold them.
pub struct TtlCache<K, V> {
    ttl: Duration,
    max_bytes: usize,
    weigh: fn(&V, usize) -> usize,
    entries: Mutex<Entries<K, V>>,
}

struct Entries<K, V> {
    records: HashMap<K, (Instant, V, usize)>,
    bytes: usize,
}

impl<K: Eq + Hash, V: Clone> TtlCache<K, V> {
    /// Small records (credentials, environments): bounded in count only.
    pub fn new(ttl: Duration) -> Self {
        TtlCache::weighed(ttl, usize::MAX, |_, _| 0)
    }

    /// Records that may be large (an agent with its tools): at most `max_bytes` of them, as `weigh`
    /// counts (told the most a record may weigh, so that it can stop counting there).
    pub fn weighed(ttl: Duration, max_bytes: usize, weigh: fn(&V, usize) -> usize) -> Self {
        assert!(
            max_bytes >= RECORD_SHARE,
            "a cache of no records holds nothing"
        );
        TtlCache {
            ttl,
            max_bytes,
            weigh,
            entries: Mutex::new(Entries {
                records: HashMap::new(),
                bytes: 0,
            }),
        }
    }

    pub fn get<Q>(&self, key: &Q) -> Option<V>
    where
        K: std::borrow::Borrow<Q>,
        Q: Eq + Hash + ?Sized,
    {
        let entries = self.entries.lock().expect("cache lock");
        entries
            .records
            .get(key)
            .filter(|(read_at, _, _)| read_at.elapsed() < self.ttl)
            .map(|(_, value, _)| value.clone())
    }

    /// Stores `value`, read at `read_at` (taken before the read, so the bound counts from then). One
    /// too heavy to keep is not stored, and the older copy of it, if any, is dropped.
    pub fn put(&self, key: K, value: V, read_at: Instant) {
        let weight = weight_within_share(self.max_bytes, self.weigh, &value, 0);
        let mut entries = self.entries.lock().expect("cache lock");
        if let Some((_, _, old)) = entries.records.remove(&key) {
            entries.bytes -= old;
        }
        let Some(weight) = weight else {
            return;
        };
        if entries.records.len() >= MAX_ENTRIES || entries.bytes + weight > self.max_bytes {
            entries.records.clear();
            entries.bytes = 0;
        }
        entries.bytes += weight;
        entries.records.insert(key, (read_at, value, weight));
        assert!(entries.records.len() <= MAX_ENTRIES && entries.bytes <= self.max_bytes);
    }

    pub fn clear(&self) {
        let mut entries = self.entries.lock().expect("cache lock");
        entries.records.clear();
        entries.bytes = 0;
    }
}

/// Records as this process last wrote them (see the module's comment), keyed by id. Bounded in count
/// and in bytes (each record weighed by `weigh`, about its size as JSON, told the most a record may
/// weigh so that it can stop counting there): two generations,
/// the older dropped whole when the newer reaches half of either bound, so the records written last
/// are kept and a lookup or a write costs O(1). A record heavier than a [`RECORD_SHARE`]th of the
/// byte bound is not kept at all (a session carries its agent, whose tools may be large): its next
/// operation reads it, as every operation did before.
pub struct WrittenRecords<V> {
    max_entries: usize,
    max_bytes: usize,
    weigh: fn(&V, usize) -> usize,
    generations: Mutex<Generations<V>>,
}

/// The part of the byte bound one record may take at most.
pub const RECORD_SHARE: usize = 256;

/// What `value` weighs, as `weigh` counts it, plus `extra` (its key, where that is counted), or `None`
/// when that is over a [`RECORD_SHARE`]th of `max_bytes`: too heavy for a bounded memory to keep.
/// `weigh` is told that limit, so that it can stop counting there.
fn weight_within_share<V>(
    max_bytes: usize,
    weigh: fn(&V, usize) -> usize,
    value: &V,
    extra: usize,
) -> Option<usize> {
    let most = max_bytes / RECORD_SHARE;
    let weight = extra.saturating_add(weigh(value, most));
    (weight <= most).then_some(weight)
}

/// A record's weight, within what [`WrittenRecords`] keeps ([`WrittenRecords::weigh`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Weight(usize);

struct Generations<V> {
    newer: Generation<V>,
    older: Generation<V>,
}

struct Generation<V> {
    records: HashMap<String, (Versioned<V>, usize)>,
    bytes: usize,
}

impl<V> Default for Generation<V> {
    fn default() -> Self {
        Generation {
            records: HashMap::new(),
            bytes: 0,
        }
    }
}

impl<V> Generation<V> {
    fn remove(&mut self, id: &str) {
        if let Some((_, weight)) = self.records.remove(id) {
            self.bytes -= weight;
        }
    }
}

impl<V: Clone> WrittenRecords<V> {
    /// At most `max_entries` records and `max_bytes` of them, as `weigh` counts, in all.
    pub fn new(max_entries: usize, max_bytes: usize, weigh: fn(&V, usize) -> usize) -> Self {
        assert!(
            max_entries >= 2 && max_bytes >= 2 * RECORD_SHARE,
            "a memory of no records remembers nothing"
        );
        WrittenRecords {
            max_entries,
            max_bytes,
            weigh,
            generations: Mutex::new(Generations {
                newer: Generation::default(),
                older: Generation::default(),
            }),
        }
    }

    /// The record as this process last wrote it, if it still remembers.
    pub fn get(&self, id: &str) -> Option<Versioned<V>> {
        self.look_up(id, Versioned::clone)
    }

    /// The version of the record as this process last wrote it, if it still remembers.
    pub fn version_of(&self, id: &str) -> Option<i64> {
        self.look_up(id, |record| record.version)
    }

    fn look_up<R>(&self, id: &str, read: impl FnOnce(&Versioned<V>) -> R) -> Option<R> {
        let generations = self.generations.lock().expect("written records lock");
        generations
            .newer
            .records
            .get(id)
            .or_else(|| generations.older.records.get(id))
            .map(|(record, _)| read(record))
    }

    /// The weight of a record with this `id` and `value`, or `None` when it is too heavy to keep:
    /// taken before the record is copied for [`Self::wrote_weighed`], so that one too heavy is
    /// never copied.
    pub fn weigh(&self, id: &str, value: &V) -> Option<Weight> {
        weight_within_share(self.max_bytes, self.weigh, value, id.len()).map(Weight)
    }

    /// This process committed `record`: [`Self::weigh`], then [`Self::wrote_weighed`] (or
    /// [`Self::forget`] when it is too heavy).
    pub fn wrote(&self, id: &str, record: Versioned<V>) {
        match self.weigh(id, &record.value) {
            Some(weight) => self.wrote_weighed(id, record, weight),
            None => self.forget(id),
        }
    }

    /// This process committed `record`, of `weight`. Two requests on one record may finish their
    /// commits in either order: a version older than the one remembered is not taken.
    pub fn wrote_weighed(&self, id: &str, record: Versioned<V>, Weight(weight): Weight) {
        let mut generations = self.generations.lock().expect("written records lock");
        let Generations { newer, older } = &mut *generations;
        let known = newer
            .records
            .get(id)
            .or_else(|| older.records.get(id))
            .map(|(known, _)| known.version);
        if known.is_some_and(|known| known >= record.version) {
            return;
        }
        newer.remove(id);
        older.remove(id);
        if newer.records.len() >= self.max_entries / 2 || newer.bytes + weight > self.max_bytes / 2
        {
            *older = std::mem::take(newer);
        }
        newer.bytes += weight;
        newer.records.insert(id.to_owned(), (record, weight));
        assert!(
            newer.records.len() <= self.max_entries / 2 && newer.bytes <= self.max_bytes / 2,
            "a generation over its bounds"
        );
    }

    /// Drops the record: a write to it was refused or its outcome is unknown, or it was deleted.
    pub fn forget(&self, id: &str) {
        let mut generations = self.generations.lock().expect("written records lock");
        generations.newer.remove(id);
        generations.older.remove(id);
    }

    /// Records and their weight in bytes.
    pub fn size(&self) -> (usize, usize) {
        let generations = self.generations.lock().expect("written records lock");
        let Generations { newer, older } = &*generations;
        (
            newer.records.len() + older.records.len(),
            newer.bytes + older.bytes,
        )
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

    /// A string's weight as a JSON string (no escapes in these tests).
    fn as_json(value: &&'static str, _most: usize) -> usize {
        value.len() + 2
    }

    fn record(version: i64) -> Versioned<&'static str> {
        Versioned {
            value: "doc",
            version,
        }
    }

    #[test]
    fn a_written_record_is_remembered_at_its_newest_version() {
        let w = WrittenRecords::new(8, 1 << 20, as_json);
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
        assert_eq!(w.version_of("a"), Some(4));
        assert_eq!(w.version_of("b"), None);
        assert_eq!(w.size(), (1, "a".len() + "\"doc\"".len()));
        w.forget("a");
        assert_eq!(w.get("a"), None);
        assert_eq!(w.size(), (0, 0));
        w.wrote("a", record(1));
        assert_eq!(
            w.get("a").map(|r| r.version),
            Some(1),
            "a forgotten record starts over"
        );
    }

    #[test]
    fn written_records_keep_the_latest_within_their_count() {
        let generation = 8;
        let w = WrittenRecords::new(2 * generation, 1 << 20, as_json);
        for i in 0..100_usize {
            w.wrote(&format!("r{i}"), record(1));
            assert!(w.size().0 <= 2 * generation);
            // The last `generation` writes are always there.
            for j in i.saturating_sub(generation - 1)..=i {
                assert!(w.get(&format!("r{j}")).is_some(), "r{j} after r{i}");
            }
        }
        // A record rewritten moves to the newer generation and survives the next turnover.
        w.wrote("r92", record(2));
        for i in 100..100 + generation {
            w.wrote(&format!("r{i}"), record(1));
        }
        assert_eq!(w.get("r92").map(|r| r.version), Some(2));
        assert_eq!(w.get("r93"), None);
    }

    /// The bytes the records held weigh, from the records themselves, against the counters.
    fn check_bytes<V: Clone>(w: &WrittenRecords<V>) -> usize {
        let generations = w.generations.lock().unwrap();
        let held = |g: &Generation<V>| g.records.values().map(|(_, weight)| weight).sum::<usize>();
        assert_eq!(held(&generations.newer), generations.newer.bytes);
        assert_eq!(held(&generations.older), generations.older.bytes);
        generations.newer.bytes + generations.older.bytes
    }

    #[test]
    fn written_records_keep_within_their_bytes() {
        let max_bytes = 64 * 1024;
        let w = WrittenRecords::new(1_000_000, max_bytes, |v: &String, _| v.len());
        let heavy = |version, bytes: usize| Versioned {
            value: "x".repeat(bytes),
            version,
        };
        for i in 0..10_000 {
            w.wrote(&format!("r{i}"), heavy(1, 100));
            if i % 7 == 0 {
                // Rewritten, newer: moves between generations.
                w.wrote(&format!("r{}", i / 2), heavy(2 + i as i64, 50 + i % 100));
            }
            if i % 11 == 0 {
                w.forget(&format!("r{}", i / 3));
            }
            assert!(check_bytes(&w) <= max_bytes, "{:?}", w.size());
            assert_eq!(check_bytes(&w), w.size().1);
        }
        assert!(w.get("r9999").is_some());
        // Too heavy to keep (with its id): not remembered, and an older copy is dropped rather
        // than kept.
        w.wrote("r9999", heavy(2, max_bytes / RECORD_SHARE));
        assert_eq!(w.get("r9999"), None);
        w.wrote("r9998", heavy(2, max_bytes / RECORD_SHARE - 10));
        assert_eq!(w.get("r9998").map(|r| r.version), Some(2));
        // Weighed before it is copied: a record too heavy to keep is known as such up front.
        assert_eq!(w.weigh("r", &"x".repeat(max_bytes / RECORD_SHARE)), None);
        assert_eq!(w.weigh("r", &"x".repeat(10)), Some(Weight("r".len() + 10)));
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

    /// The bytes a weighed cache holds: what its entries weigh, as its own count says.
    fn cached_bytes<K: Eq + Hash, V: Clone>(c: &TtlCache<K, V>) -> (usize, usize) {
        let entries = c.entries.lock().expect("cache lock");
        let counted = entries.records.values().map(|(_, _, w)| w).sum();
        (counted, entries.bytes)
    }

    #[test]
    fn a_weighed_cache_holds_no_more_than_its_bytes() {
        let max_bytes = 64 * 1024;
        let most = max_bytes / RECORD_SHARE;
        let c = TtlCache::weighed(Duration::from_secs(60), max_bytes, |v: &String, _| v.len());
        for i in 0..5_000 {
            c.put(
                format!("k{}", i % 700),
                "x".repeat(i % most + 1),
                Instant::now(),
            );
            let (counted, bytes) = cached_bytes(&c);
            assert_eq!(counted, bytes);
            assert!(bytes <= max_bytes, "{bytes} bytes held");
        }
        c.put("k299".to_owned(), "x".repeat(10), Instant::now());
        assert_eq!(c.get("k299").map(|v| v.len()), Some(10));
        // Too heavy to keep: not stored, and the older copy is dropped rather than kept.
        c.put("k299".to_owned(), "x".repeat(most + 1), Instant::now());
        assert_eq!(c.get("k299"), None);
        c.put("k298".to_owned(), "x".repeat(most), Instant::now());
        assert_eq!(c.get("k298").map(|v| v.len()), Some(most));
        c.clear();
        assert_eq!(cached_bytes(&c), (0, 0));
    }
}

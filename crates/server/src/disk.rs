//! The disk watch: a store on this machine's disk (SQLite) keeps a floor of free space
//! (`--min-free-disk`), below which requests that add records are refused, so that the writes
//! which keep what exists going still have room.
//!
//! Without it, any caller that may post events (an environment's key, a session token) fills the
//! disk at the speed of its uploads, and then every write fails alike: heartbeats, acks and stops
//! too, so leases cannot be kept or ended. With it, once the free space falls under the floor,
//! creating sessions, environments and agents (or agents' new versions) and posting events are
//! answered 503 `disk_low` until space is freed, but for one small event that ends or interrupts a
//! turn under way (`service::events`, `turn_control`); work items go on through their
//! states, and sessions, environments and agents may still be archived or deleted. Those writes add
//! little (a line of an item's history, a server event, a fresh item for input that waited), and a
//! turn starts only with input the floor refuses, so what they add is bounded by the items and
//! turns under way; the floor leaves room for it. An interrupt or an error, which leave the turn
//! open and could be sent again and again, may take the disk only down to half the floor
//! ([`DiskRoom::room_in_reserve`]). A write the disk still cannot take is
//! answered 503 `store_full` ([`tether_store::StoreError::Full`]).
//!
//! The free space is read once a [`WATCH_INTERVAL`] by a small service, not by each request: one
//! `statvfs` a second however busy the server is, and a request never waits on the filesystem.
//! Between two readings, the events let through are counted against the last one
//! ([`disk_cost_of_events`]): one key posting as fast as it can took the disk from over a 120 MB
//! floor to 57 MB within the second before the next reading. The count is an estimate, so a
//! write may still take the disk a little under the floor: the floor is a margin for the writes
//! that go on, not an exact quota. A database elsewhere (PostgreSQL) is its own
//! operator's to watch: nothing is read, nothing is refused by the floor.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::service::{App, Error};

/// How often the free space is read.
pub const WATCH_INTERVAL: Duration = Duration::from_secs(1);

/// The default `--min-free-disk`: 256 MiB.
pub const DEFAULT_MIN_FREE_DISK: u64 = 256 << 20;

/// The gauge of the last reading.
pub const FREE_BYTES_GAUGE: &str = "tether_store_disk_free_bytes";

/// A reading not taken yet, or a store with no disk of this machine's to read: nothing is refused.
const UNKNOWN: u64 = u64::MAX;

/// What `count` events of `bytes` bytes of JSON in all are taken to cost the disk until the next
/// reading, on the side of more: the WAL's copy of the pages written and the table's (twice the
/// JSON; 1,053 batches of 100 events of 1 KB took 143 MB of a tmpfs), and each row's own cost
/// with its index entries (5M events of about 180 bytes filled a 3.3 GB database: 660 bytes each).
pub fn disk_cost_of_events(count: usize, bytes: usize) -> u64 {
    (bytes as u64)
        .saturating_mul(2)
        .saturating_add((count as u64).saturating_mul(512))
}

/// The floor, the last reading of the free space, and what requests were let add since.
pub struct DiskRoom {
    floor: u64,
    free: AtomicU64,
    /// Bytes of disk the requests let through since the last reading are taken to use.
    added: AtomicU64,
}

/// What one reading changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Crossing {
    /// The free space fell under the floor: refusals begin.
    WentLow,
    /// It is at or over the floor again: refusals end.
    Recovered,
    /// On the same side of the floor as before.
    Unchanged,
}

impl DiskRoom {
    /// A floor of `floor` bytes (0: none), with no reading yet.
    pub fn new(floor: u64) -> DiskRoom {
        DiskRoom {
            floor,
            free: AtomicU64::new(UNKNOWN),
            added: AtomicU64::new(0),
        }
    }

    pub fn floor(&self) -> u64 {
        self.floor
    }

    /// Keeps a reading of `free` bytes, and says whether it crossed the floor.
    pub fn record(&self, free: u64) -> Crossing {
        let before = self.free.swap(free, Ordering::Relaxed);
        // The reading holds what was written before it.
        self.added.store(0, Ordering::Relaxed);
        match (self.is_low(before), self.is_low(free)) {
            (false, true) => Crossing::WentLow,
            (true, false) => Crossing::Recovered,
            _ => Crossing::Unchanged,
        }
    }

    fn is_low(&self, free: u64) -> bool {
        free != UNKNOWN && free < self.floor
    }

    /// The lower half of the floor: how far under it the events that keep a turn under way in hand
    /// may take the disk ([`Self::room_in_reserve`]).
    fn reserve_floor(&self) -> u64 {
        self.floor / 2
    }

    /// `Ok` when a request may add records; [`Error::DiskLow`] while the last reading, less what
    /// the requests let through since are taken to use, is under the floor.
    pub fn room_to_grow(&self) -> Result<(), Error> {
        self.room_to_add(0)
    }

    /// [`Self::room_to_grow`] for a request taken to use `cost` bytes of disk, counted against the
    /// last reading when it is let through (see [`disk_cost_of_events`]).
    pub fn room_to_add(&self, cost: u64) -> Result<(), Error> {
        self.room_over(self.floor, cost)
    }

    /// [`Self::room_to_add`] for an event that keeps a turn under way in hand without ending it (an
    /// interrupt, an error): let through under the floor, down to half of it. Such events may be
    /// sent again and again while the turn lasts, so they need a bound of their own; the end of
    /// the turn needs none (it closes the turn, and a new one starts only with input the floor
    /// refuses).
    pub fn room_in_reserve(&self, cost: u64) -> Result<(), Error> {
        self.room_over(self.reserve_floor(), cost)
    }

    /// `Ok`, with `cost` counted, when the last reading less what was let through since and
    /// `cost` stays at or over `limit`.
    fn room_over(&self, limit: u64, cost: u64) -> Result<(), Error> {
        let free = self.free.load(Ordering::Relaxed);
        if free == UNKNOWN || self.floor == 0 {
            return Ok(());
        }
        // Counted only when let through, in one step: a reading that resets the count meanwhile
        // never sees part of it taken back.
        let counted = self
            .added
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |added| {
                let next = added.saturating_add(cost);
                (free.saturating_sub(next) >= limit).then_some(next)
            });
        match counted {
            Ok(_) => Ok(()),
            Err(added) => Err(Error::DiskLow {
                // What is taken to be left before this request.
                free: free.saturating_sub(added),
                floor: self.floor,
            }),
        }
    }
}

/// The disk watch's runs: a reading every [`WATCH_INTERVAL`] until shutdown. Ends at once for a
/// store that has no disk of this machine's, or with no floor to keep.
pub async fn run(app: App) {
    if app.disk.floor() == 0 || app.store.free_space().is_none() {
        return;
    }
    let mut tick = tokio::time::interval(WATCH_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => watch_once(&app).await,
            _ = app.until_shutdown() => return,
        }
    }
}

/// One reading of the free space, kept, shown as [`FREE_BYTES_GAUGE`] and said when it crosses the
/// floor.
pub async fn watch_once(app: &App) {
    let store = app.store.clone();
    let reading = match tokio::task::spawn_blocking(move || store.free_space()).await {
        Ok(Some(reading)) => reading,
        Ok(None) => return,
        Err(e) => Err(std::io::Error::other(e)),
    };
    let free = match reading {
        Ok(free) => free,
        Err(e) => {
            // A filesystem that cannot say: nothing is refused on a guess, and the last reading
            // stands until one succeeds.
            crate::services::duty_failed("disk watch: reading the free space", &e);
            return;
        }
    };
    metrics::gauge!(FREE_BYTES_GAUGE).set(free as f64);
    let floor = app.disk.floor();
    match app.disk.record(free) {
        Crossing::WentLow => tracing::error!(
            free_bytes = free,
            min_free_disk = floor,
            "the store's disk has less free space than --min-free-disk: new sessions, \
             environments, agents and events are refused (503 disk_low) until space is freed; \
             work items go on"
        ),
        Crossing::Recovered => tracing::info!(
            free_bytes = free,
            min_free_disk = floor,
            "the store's disk has room again: new sessions and events are taken"
        ),
        Crossing::Unchanged => {}
    }
}

impl crate::services::DutyError for std::io::Error {
    fn is_outage(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_that_add_records_are_refused_only_while_the_last_reading_is_under_the_floor() {
        let room = DiskRoom::new(100);
        assert!(room.room_to_grow().is_ok(), "no reading yet");
        // (reading, what it crossed, refused after it)
        let readings = [
            (150, Crossing::Unchanged, false),
            (100, Crossing::Unchanged, false),
            (99, Crossing::WentLow, true),
            (0, Crossing::Unchanged, true),
            (100, Crossing::Recovered, false),
            (u64::MAX - 1, Crossing::Unchanged, false),
            (1, Crossing::WentLow, true),
        ];
        for (free, crossing, refused) in readings {
            assert_eq!(room.record(free), crossing, "reading {free}");
            match room.room_to_grow() {
                Err(Error::DiskLow { free: said, floor }) => {
                    assert!(refused, "reading {free} refused");
                    assert_eq!((said, floor), (free, 100));
                }
                Ok(()) => assert!(!refused, "reading {free} let through"),
                Err(other) => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn events_let_through_since_the_last_reading_count_against_it() {
        let room = DiskRoom::new(100);
        assert!(room.room_to_add(1_000_000).is_ok(), "no reading yet");
        room.record(1_000);
        // 800 bytes let through: 200 left, over the floor.
        assert!(room.room_to_add(800).is_ok());
        // 160 more would leave 40: refused, and not counted.
        assert!(matches!(
            room.room_to_add(160),
            Err(Error::DiskLow { floor: 100, .. })
        ));
        assert!(room.room_to_add(80).is_ok(), "80 more leaves 120");
        assert!(
            room.room_to_grow().is_ok(),
            "a record without events adds nothing"
        );
        // A new reading holds what was written: the count starts again.
        room.record(1_000);
        assert!(room.room_to_add(800).is_ok());
        assert_eq!(disk_cost_of_events(2, 100), 2 * 100 + 2 * 512);
    }

    #[test]
    fn events_that_keep_a_turn_in_hand_may_take_the_lower_half_of_the_floor_and_no_more() {
        let room = DiskRoom::new(100);
        room.record(90);
        assert!(room.room_to_add(0).is_err(), "under the floor");
        // 30 of the 40 between the reading and half the floor.
        assert!(room.room_in_reserve(30).is_ok());
        assert!(matches!(
            room.room_in_reserve(11),
            Err(Error::DiskLow {
                free: 60,
                floor: 100
            })
        ));
        assert!(
            room.room_in_reserve(10).is_ok(),
            "exactly half the floor left"
        );
        assert!(room.room_in_reserve(1).is_err());
        room.record(49);
        assert!(
            room.room_in_reserve(0).is_err(),
            "a reading under half the floor"
        );
    }

    #[test]
    fn no_floor_refuses_nothing() {
        let room = DiskRoom::new(0);
        assert_eq!(room.record(0), Crossing::Unchanged);
        assert!(room.room_to_grow().is_ok());
    }
}

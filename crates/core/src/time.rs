//! Instants and the injected clock.
//!
//! Every instant in Tether is a count of microseconds since the Unix epoch. The wire format (RFC 3339,
//! UTC, `Z`, microseconds) is produced and parsed here so that the rest of the code never formats time
//! by hand. The clock is injected: production code uses [`SystemClock`], tests use [`ManualClock`].

use std::fmt;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};

/// Microseconds since the Unix epoch, UTC.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Timestamp(pub i64);

impl Timestamp {
    pub const fn from_micros(micros: i64) -> Self {
        Timestamp(micros)
    }

    pub const fn as_micros(self) -> i64 {
        self.0
    }

    pub fn from_millis(millis: i64) -> Self {
        Timestamp(millis.saturating_mul(1_000))
    }

    pub fn plus_millis(self, millis: i64) -> Self {
        Timestamp(self.0.saturating_add(millis.saturating_mul(1_000)))
    }

    pub fn plus_seconds(self, seconds: i64) -> Self {
        Timestamp(self.0.saturating_add(seconds.saturating_mul(1_000_000)))
    }

    pub fn minus_millis(self, millis: i64) -> Self {
        Timestamp(self.0.saturating_sub(millis.saturating_mul(1_000)))
    }

    /// The next representable instant (one microsecond later).
    pub fn next(self) -> Self {
        Timestamp(self.0.saturating_add(1))
    }

    /// Milliseconds from `earlier` to `self` (negative when `earlier` is later).
    pub fn millis_since(self, earlier: Timestamp) -> i64 {
        self.0.saturating_sub(earlier.0) / 1_000
    }

    /// RFC 3339 in UTC with a `Z` suffix and exactly six fractional digits.
    pub fn to_rfc3339(self) -> String {
        let dt = DateTime::<Utc>::from_timestamp_micros(self.0).unwrap_or(DateTime::<Utc>::MIN_UTC);
        dt.to_rfc3339_opts(SecondsFormat::Micros, true)
    }

    /// Parses any RFC 3339 instant. Sub-microsecond digits are truncated.
    pub fn parse_rfc3339(text: &str) -> Option<Timestamp> {
        let dt = DateTime::parse_from_rfc3339(text).ok()?;
        Some(Timestamp(dt.with_timezone(&Utc).timestamp_micros()))
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_rfc3339())
    }
}

/// The source of "now". Injected everywhere a decision depends on time.
pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> Timestamp;
}

/// The wall clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        Timestamp(Utc::now().timestamp_micros())
    }
}

/// A clock that moves only when told to; shared between clones. For deterministic tests.
#[derive(Clone, Debug)]
pub struct ManualClock {
    micros: Arc<AtomicI64>,
}

impl ManualClock {
    pub fn new(start: Timestamp) -> Self {
        ManualClock {
            micros: Arc::new(AtomicI64::new(start.0)),
        }
    }

    pub fn advance_millis(&self, millis: i64) {
        self.micros.fetch_add(millis * 1_000, Ordering::SeqCst);
    }

    pub fn set(&self, to: Timestamp) {
        self.micros.store(to.0, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Timestamp {
        Timestamp(self.micros.load(Ordering::SeqCst))
    }
}

/// The wall clock shifted by an adjustable offset: real time keeps flowing (so timeouts and long polls
/// behave), while a test can jump it forward to make leases expire without waiting.
#[derive(Clone, Debug, Default)]
pub struct OffsetClock {
    offset_micros: Arc<AtomicI64>,
}

impl OffsetClock {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn advance_millis(&self, millis: i64) {
        assert!(millis >= 0, "the clock never goes backwards");
        self.offset_micros
            .fetch_add(millis * 1_000, Ordering::SeqCst);
    }
}

impl Clock for OffsetClock {
    fn now(&self) -> Timestamp {
        let wall = SystemClock.now();
        Timestamp(wall.0 + self.offset_micros.load(Ordering::SeqCst))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_with_microseconds_and_z() {
        let t = Timestamp::parse_rfc3339("2026-07-01T08:16:06.120394Z").unwrap();
        assert_eq!(t.to_rfc3339(), "2026-07-01T08:16:06.120394Z");
        let whole = Timestamp::parse_rfc3339("2026-07-01T08:15:01Z").unwrap();
        assert_eq!(whole.to_rfc3339(), "2026-07-01T08:15:01.000000Z");
    }

    #[test]
    fn parses_offsets_to_the_same_instant() {
        let a = Timestamp::parse_rfc3339("2026-07-01T10:16:06.120394+02:00").unwrap();
        let b = Timestamp::parse_rfc3339("2026-07-01T08:16:06.120394Z").unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn rejects_garbage() {
        for bad in [
            "",
            "NO_HEARTBEAT",
            "2026-07-01",
            "yesterday",
            "2026-13-01T00:00:00Z",
        ] {
            assert!(Timestamp::parse_rfc3339(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn manual_clock_moves_only_when_told() {
        let c = ManualClock::new(Timestamp(1_000_000));
        assert_eq!(c.now(), Timestamp(1_000_000));
        c.advance_millis(5);
        assert_eq!(c.now(), Timestamp(1_005_000));
    }
}

//! Lease arithmetic: TTL clamping, expiry, amnesty and the worker's heartbeat cadence.

use crate::time::Timestamp;

/// Bounds and defaults that govern leases and requeues. One value per server process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeasePolicy {
    /// TTL of a lease when no heartbeat ever asked for another (D-9b).
    pub default_ttl_seconds: u32,
    pub min_ttl_seconds: u32,
    pub max_ttl_seconds: u32,
    /// A lease expiry past this many requeues stops the item instead (D-5, "poison").
    pub max_requeues: u32,
}

impl Default for LeasePolicy {
    fn default() -> Self {
        LeasePolicy {
            default_ttl_seconds: 60,
            min_ttl_seconds: 10,
            max_ttl_seconds: 600,
            max_requeues: 3,
        }
    }
}

impl LeasePolicy {
    /// The TTL applied for a requested one (`None` keeps `current`), clamped into the policy's bounds.
    pub fn effective_ttl(&self, desired: Option<u32>, current: u32) -> u32 {
        debug_assert!(self.min_ttl_seconds <= self.max_ttl_seconds);
        desired
            .unwrap_or(current)
            .clamp(self.min_ttl_seconds, self.max_ttl_seconds)
    }
}

/// A lease has expired once `now` is strictly past its deadline.
pub fn is_expired(lease_expires_at: Option<Timestamp>, now: Timestamp) -> bool {
    matches!(lease_expires_at, Some(deadline) if now > deadline)
}

/// Lease amnesty (§3.1): a deadline that falls before `now + grace` moves to `now + grace`, so that time
/// the server was down never counts against a worker. Returns `None` when nothing changes.
pub fn amnesty_deadline(
    lease_expires_at: Option<Timestamp>,
    now: Timestamp,
    grace_millis: i64,
) -> Option<Timestamp> {
    let floor = now.plus_millis(grace_millis);
    match lease_expires_at {
        Some(deadline) if deadline < floor => Some(floor),
        _ => None,
    }
}

/// The worker's heartbeat interval for a lease of `ttl_seconds` (§8): half the TTL, within 1‥30 s.
pub fn heartbeat_interval_millis(ttl_seconds: u32) -> u64 {
    (u64::from(ttl_seconds) * 1_000 / 2).clamp(1_000, 30_000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttl_is_clamped_and_sticky() {
        let p = LeasePolicy::default();
        assert_eq!(p.effective_ttl(None, 60), 60);
        assert_eq!(p.effective_ttl(Some(1), 60), 10);
        assert_eq!(p.effective_ttl(Some(10_000), 60), 600);
        assert_eq!(p.effective_ttl(None, 120), 120);
    }

    #[test]
    fn expiry_is_strict() {
        let d = Timestamp(1_000);
        assert!(!is_expired(Some(d), Timestamp(1_000)));
        assert!(is_expired(Some(d), Timestamp(1_001)));
        assert!(!is_expired(None, Timestamp(i64::MAX)));
    }

    #[test]
    fn amnesty_only_moves_deadlines_forward() {
        let now = Timestamp::from_millis(100_000);
        assert_eq!(
            amnesty_deadline(Some(Timestamp::from_millis(50_000)), now, 30_000),
            Some(Timestamp::from_millis(130_000))
        );
        assert_eq!(
            amnesty_deadline(Some(Timestamp::from_millis(200_000)), now, 30_000),
            None
        );
        assert_eq!(amnesty_deadline(None, now, 30_000), None);
    }

    #[test]
    fn heartbeat_interval_bounds() {
        assert_eq!(heartbeat_interval_millis(60), 30_000);
        assert_eq!(heartbeat_interval_millis(10), 5_000);
        assert_eq!(heartbeat_interval_millis(600), 30_000);
        assert_eq!(heartbeat_interval_millis(1), 1_000);
    }
}

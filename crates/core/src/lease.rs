//! Lease arithmetic: TTL clamping, expiry, amnesty and the worker's heartbeat cadence.

use std::time::Duration;

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

/// How recently another server process of a cluster must have checked the leases for
/// [`others_keep_leases`] to hold: a few of the default 1 s ticks.
pub const LEASES_KEPT_FRESH_MILLIS: i64 = 5_000;

/// Whether another server process sharing the store is keeping the leases, given when one last
/// checked them (`None`: none ever did, or the store is this process's alone). The check is dated
/// by that server's clock: one further from now than [`LEASES_KEPT_FRESH_MILLIS`], either way,
/// counts as none. Two rules follow from it:
/// - a start grants lease amnesty (§3.1) only when no other server keeps the leases. Amnesty makes
///   up for time in which no server could renew or expire them; a cluster in which another server
///   kept checking them was not down, that server expired what was due, and it granted the amnesty
///   any database outage called for before checking them. Granted at every start anyway, a server
///   restarting in a loop would push back the requeue of every abandoned item for as long as the
///   loop lasts;
/// - a server that loses its database promises amnesty only when no other server kept the leases
///   when it last looked: its outage may be a partition of its own, and the other server would
///   expire the leases it promised would not expire.
pub fn others_keep_leases(kept_elsewhere_at: Option<Timestamp>, now: Timestamp) -> bool {
    match kept_elsewhere_at {
        None => false,
        Some(kept) => now.millis_since(kept).abs() <= LEASES_KEPT_FRESH_MILLIS,
    }
}

/// The shortest heartbeat interval (§8).
pub const HEARTBEAT_INTERVAL_MIN: Duration = Duration::from_secs(1);

/// The longest heartbeat interval (§8): also the cadence while the worker does not know its TTL yet.
pub const HEARTBEAT_INTERVAL_MAX: Duration = Duration::from_secs(30);

/// The worker's heartbeat interval for a lease of `ttl` (§8): half the TTL, within 1‥30 s.
pub fn heartbeat_interval(ttl: Duration) -> Duration {
    (ttl / 2).clamp(HEARTBEAT_INTERVAL_MIN, HEARTBEAT_INTERVAL_MAX)
}

/// How long before its own lease deadline a worker must have killed the program.
///
/// The worker measures its deadline on its own monotonic clock from the moment it *sent* the last
/// heartbeat the server accepted; the server stamps the lease when it processes that request, which is
/// later, so the worker's deadline is never after the server's as long as both clocks run at the same
/// rate. The margin absorbs what remains: a difference in rate (1 % of the TTL, twenty times the
/// 500 ppm an NTP-disciplined clock may be slewed by) and the time to kill the program's process group
/// and reap it (1 s, for a worker that is itself slow to be scheduled). Leases shorter than the
/// protocol's 10 s (a server may be configured to allow them, tests are) keep at least three quarters
/// of their length, so that a beat every half TTL still renews them in time.
pub fn kill_margin(ttl: Duration) -> Duration {
    (KILL_LATENCY + ttl / 100).min(ttl / 4)
}

/// The part of [`kill_margin`] that does not grow with the TTL.
pub const KILL_LATENCY: Duration = Duration::from_secs(1);

/// A worker's own view of one lease, on its monotonic clock.
///
/// Instants are readings of a monotonic clock the caller injects, given as the time elapsed since an
/// origin of its choosing. The rule this keeps: the program runs only before [`WorkerLease::kill_at`],
/// which never lies past the moment the server may expire the lease.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WorkerLease {
    ttl: Duration,
    kill_at: Duration,
    /// The margin `kill_at` keeps before the deadline it was derived from.
    margin: Duration,
}

impl WorkerLease {
    /// The provisional lease of an acknowledgement sent at `sent`: the server starts it with the item's
    /// current TTL when it processes the ack.
    pub fn acknowledged(sent: Duration, ttl: Duration) -> WorkerLease {
        WorkerLease {
            ttl,
            kill_at: kill_time(sent, ttl),
            margin: kill_margin(ttl),
        }
    }

    /// A heartbeat sent at `sent` was accepted with a lease of `ttl`. The server replaces the deadline
    /// (it may shrink with a shorter TTL), so the worker does too.
    pub fn renewed(&mut self, sent: Duration, ttl: Duration) {
        self.ttl = ttl;
        self.kill_at = kill_time(sent, ttl);
        self.margin = kill_margin(ttl);
    }

    /// A heartbeat sent at `sent` was answered at `answered` with the server's promise of lease amnesty:
    /// it could not write, so it expires nothing until it can again, and then first extends every lease
    /// to at least `grace` past that moment. Taken only when the answer came while the lease was still
    /// ours: then the server processed the request before the lease could have expired, and no expiry
    /// can be decided before `sent + grace`. Returns whether the deadline moved.
    pub fn amnesty(&mut self, sent: Duration, answered: Duration, grace: Duration) -> bool {
        if answered >= self.kill_at {
            return false;
        }
        let grace = grace.min(MAX_AMNESTY);
        let promised = kill_time(sent, grace);
        if promised > self.kill_at {
            self.kill_at = promised;
            self.margin = kill_margin(grace);
            true
        } else {
            false
        }
    }

    /// The moment the program must be dead by.
    pub fn kill_at(&self) -> Duration {
        self.kill_at
    }

    /// The last resort: if the program still runs at this moment, the worker could not act (stopped,
    /// starved) and must be ended from outside. Half the margin after [`WorkerLease::kill_at`], so it
    /// never fires on a healthy worker that is merely killing the program, and still comes before the
    /// server may expire the lease.
    pub fn last_resort(&self) -> Duration {
        self.kill_at + self.margin / 2
    }

    /// The TTL of the last renewal (or the provisional one).
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Time left before the program must be killed; `None` once that moment has come.
    pub fn time_left(&self, now: Duration) -> Option<Duration> {
        self.kill_at.checked_sub(now).filter(|left| !left.is_zero())
    }

    /// The timeout of a heartbeat sent at `now`: the beat interval, capped by the time left, so that no
    /// answer is awaited past the moment the program must die. `None`: do not send, kill.
    pub fn request_timeout(&self, now: Duration) -> Option<Duration> {
        self.time_left(now)
            .map(|left| left.min(heartbeat_interval(self.ttl)))
    }
}

/// When a heartbeat with `timeout` that has no answer yet is sent again beside it, on a fresh
/// connection: half-way, but not before [`MIN_HEDGE`]. The first try keeps running: a server slow
/// to answer (its database just stopped answering, and its answer will promise amnesty) is still
/// heard, and a connection that is gone without a word (a NAT or a failover forgot it) costs only
/// the wait before the second try.
pub fn hedge_after(timeout: Duration) -> Duration {
    (timeout / 2).max(MIN_HEDGE.min(timeout))
}

/// The shortest wait before [`hedge_after`] sends a second try.
pub const MIN_HEDGE: Duration = Duration::from_secs(1);

/// Amnesty promises longer than this are taken as this: a server misconfigured with a huge grace window
/// must not keep a program alive for days on a stale answer.
pub const MAX_AMNESTY: Duration = Duration::from_secs(600);

fn kill_time(start: Duration, length: Duration) -> Duration {
    (start + length).saturating_sub(kill_margin(length))
}

#[cfg(test)]
mod tests {

    #[test]
    fn another_server_keeps_the_leases_when_it_checked_them_just_now() {
        let now = Timestamp::from_millis(100_000);
        for (kept, due) in [
            (None, true),
            (Some(now), false),
            (Some(now.minus_millis(LEASES_KEPT_FRESH_MILLIS)), false),
            (Some(now.minus_millis(LEASES_KEPT_FRESH_MILLIS + 1)), true),
            (Some(now.minus_millis(3_600_000)), true),
            // Another clock a little ahead of this one; one far ahead is not taken at its word.
            (Some(now.plus_millis(1_000)), false),
            (Some(now.plus_millis(LEASES_KEPT_FRESH_MILLIS + 1)), true),
        ] {
            assert_eq!(others_keep_leases(kept, now), !due, "{kept:?}");
        }
    }

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
        for (ttl, interval) in [(1, 1), (2, 1), (10, 5), (20, 10), (60, 30), (600, 30)] {
            assert_eq!(
                heartbeat_interval(Duration::from_secs(ttl)),
                Duration::from_secs(interval),
                "{ttl}"
            );
        }
    }

    fn s(secs: f64) -> Duration {
        Duration::from_secs_f64(secs)
    }

    #[test]
    fn margins() {
        for (ttl, margin) in [
            (2.0, 0.5),
            (4.0, 1.0),
            (10.0, 1.1),
            (60.0, 1.6),
            (600.0, 7.0),
        ] {
            assert_eq!(kill_margin(s(ttl)), s(margin), "{ttl}");
        }
    }

    #[test]
    fn the_deadline_counts_from_the_send_of_the_accepted_beat() {
        let mut lease = WorkerLease::acknowledged(s(0.0), s(60.0));
        assert_eq!(lease.kill_at(), s(58.4));
        // Sent at 25 s, answered whenever: the lease runs from 25 s.
        lease.renewed(s(25.0), s(10.0));
        assert_eq!(lease.kill_at(), s(33.9));
        assert_eq!(lease.time_left(s(30.0)), Some(s(3.9)));
        assert_eq!(lease.time_left(s(33.9)), None);
        assert_eq!(lease.time_left(s(40.0)), None);
    }

    #[test]
    fn request_timeouts_are_capped_by_the_time_left() {
        let lease = WorkerLease::acknowledged(s(0.0), s(10.0));
        // kill at 8.9 s; the interval is 5 s.
        for (now, timeout) in [
            (0.0, Some(5.0)),
            (3.9, Some(5.0)),
            (4.0, Some(4.9)),
            (8.0, Some(0.9)),
            (8.9, None),
            (9.5, None),
        ] {
            assert_eq!(lease.request_timeout(s(now)), timeout.map(s), "at {now}");
        }
    }

    #[test]
    fn a_second_try_goes_out_half_way_and_not_before_a_second() {
        for (timeout, hedge) in [
            (30.0, 15.0),
            (3.9, 1.95),
            (2.0, 1.0),
            (1.5, 1.0),
            (0.9, 0.9),
            (0.0, 0.0),
        ] {
            assert_eq!(
                hedge_after(s(timeout)),
                s(hedge),
                "a timeout of {timeout} s"
            );
        }
    }

    #[test]
    fn amnesty_extends_only_on_answers_that_came_in_time() {
        let mut lease = WorkerLease::acknowledged(s(0.0), s(10.0));
        // Answered after the kill time: too late to prove anything.
        assert!(!lease.amnesty(s(5.0), s(9.0), s(30.0)));
        assert_eq!(lease.kill_at(), s(8.9));
        // Answered in time: the server expires nothing before 5 s + 30 s.
        assert!(lease.amnesty(s(5.0), s(6.0), s(30.0)));
        assert_eq!(lease.kill_at(), s(5.0 + 30.0 - 1.3));
        // A shorter promise never shortens the deadline.
        assert!(!lease.amnesty(s(6.0), s(7.0), s(1.0)));
        assert_eq!(lease.kill_at(), s(33.7));
        // Absurd promises are capped.
        assert!(lease.amnesty(s(7.0), s(8.0), s(1e9)));
        assert_eq!(lease.kill_at(), s(7.0 + 600.0 - 7.0));
        assert_eq!(lease.last_resort(), s(600.0 + 3.5));
        // A renewal replaces whatever amnesty gave.
        lease.renewed(s(9.0), s(10.0));
        assert_eq!(lease.kill_at(), s(17.9));
        assert_eq!(lease.last_resort(), s(18.45));
    }
}

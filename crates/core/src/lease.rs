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
            max_ttl_seconds: LeasePolicy::MAX_TTL_SECONDS,
            max_requeues: 3,
        }
    }
}

impl LeasePolicy {
    /// The longest TTL of any policy (§5.2 clamps every TTL into 10‥600; a server may narrow the
    /// bounds, never widen them past this).
    pub const MAX_TTL_SECONDS: u32 = 600;

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

/// A deadline that falls before `floor` moves to `floor`: lease amnesty (§3.1, `floor` is
/// `now + grace`, so that time the server was down never counts against a worker), or a promise's
/// hold. Returns `None` when nothing changes, or there is no deadline.
pub fn deadline_at_least(
    lease_expires_at: Option<Timestamp>,
    floor: Timestamp,
) -> Option<Timestamp> {
    match lease_expires_at {
        Some(deadline) if deadline < floor => Some(floor),
        _ => None,
    }
}

/// How long a server process's word that it has just checked the leases holds at least: a few of
/// the default 1 s ticks. A server with a slower tick has its word hold for three of its ticks
/// ([`LeaseKeeperMark::new`]). It is also how far ahead of this clock another server's clock may
/// run before its word is not taken.
pub const LEASES_KEPT_FRESH_MILLIS: i64 = 5_000;

/// How many of its ticks a server process's word that it keeps the leases holds for: it gives
/// that word once a tick, after its expiry pass, so that a pass running long or a tick that
/// comes late do not make it look gone between two of them.
const TICKS_A_MARK_HOLDS_FOR: u32 = 3;

/// A server process's word that it has just checked the leases (the store's
/// `Write::MarkLeasesKept`), dated by its own clock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeaseKeeperMark {
    /// When it checked them.
    pub kept_at: Timestamp,
    /// Until when the word holds, unless a newer mark follows: [`LEASES_KEPT_FRESH_MILLIS`] or three
    /// of the server's ticks after `kept_at`, whichever is later.
    pub holds_until: Timestamp,
    /// Until when the server may promise its workers, should it lose the database before its next
    /// mark, that their leases will not expire (a 503's `lease_amnesty_ms`, [`promise_left`]): its
    /// amnesty grace after `kept_at`. `None` when it promises nothing: it saw another server keeping
    /// the leases before this mark, or grants no amnesty. No other server settles a lease before
    /// the promise ends ([`expiry_held_until`]), since the loss may be a partition of this server's
    /// own while the database, and the others, go on.
    pub promises_until: Option<Timestamp>,
}

impl LeaseKeeperMark {
    /// The word of a server that checked the leases at `now` and checks them again every `tick`.
    pub fn new(now: Timestamp, tick: Duration) -> Self {
        let ticks = (tick * TICKS_A_MARK_HOLDS_FOR).as_millis();
        let holds_for = i64::try_from(ticks)
            .unwrap_or(i64::MAX)
            .max(LEASES_KEPT_FRESH_MILLIS);
        Self {
            kept_at: now,
            holds_until: now.plus_millis(holds_for),
            promises_until: None,
        }
    }

    /// The same word, and a promise of lease amnesty for `grace_millis` from `kept_at` (none for
    /// a grace of zero).
    pub fn promising(self, grace_millis: i64) -> Self {
        Self {
            promises_until: (grace_millis > 0).then(|| self.kept_at.plus_millis(grace_millis)),
            ..self
        }
    }

    /// Whether the word still holds at `now`: not past `holds_until`, and not dated more than
    /// [`LEASES_KEPT_FRESH_MILLIS`] ahead of this clock (such a clock is not taken at its word).
    pub fn holds_at(&self, now: Timestamp) -> bool {
        self.kept_at.millis_since(now) <= LEASES_KEPT_FRESH_MILLIS && now <= self.holds_until
    }

    /// A mark written before its server said how long it holds: the least that any does.
    pub fn of_unknown_tick(kept_at: Timestamp) -> Self {
        Self {
            kept_at,
            holds_until: kept_at.plus_millis(LEASES_KEPT_FRESH_MILLIS),
            promises_until: None,
        }
    }
}

/// Whether another server process sharing the store is keeping the leases, given the marks the
/// other processes left (none: none ever did, or the store is this process's alone). A mark holds
/// until its `holds_until`; one dated more than [`LEASES_KEPT_FRESH_MILLIS`] ahead of this clock
/// is not taken at its word. Two rules follow from it:
/// - a start grants lease amnesty (§3.1) only when no other server keeps the leases. Amnesty makes
///   up for time in which no server could renew or expire them; a cluster in which another server
///   kept checking them was not down, that server expired what was due, and it granted the amnesty
///   any database outage called for before checking them. Granted at every start anyway, a server
///   restarting in a loop would push back the requeue of every abandoned item for as long as the
///   loop lasts;
/// - a server that loses its database promises amnesty only when no other server kept the leases
///   when it last looked: its outage may be a partition of its own, and the other server would
///   expire the leases it promised would not expire.
pub fn others_keep_leases(marks: &[LeaseKeeperMark], now: Timestamp) -> bool {
    marks.iter().any(|mark| mark.holds_at(now))
}

/// Whether, after this server process lost its database and got it back, lease amnesty is owed
/// for the outage. It is, unless both hold:
/// - the process promised none during the outage (`promised`: none of its 503s did, since
///   another process kept the leases when it last looked, [`others_keep_leases`], or its last
///   mark promised nothing, [`promise_left`]), so that no worker of its own kept a program
///   running on its word;
/// - another process kept the leases while this one could not, and keeps them still: it left a
///   mark later than this one's own last mark held (`own_last`; by more than
///   [`LEASES_KEPT_FRESH_MILLIS`], the skew allowed between two clocks), and that mark holds at
///   `now`. That process was not away, or came back first: either way it expired what was due
///   only after granting any amnesty the outage called for (it judged by this same rule, and a
///   mark of a process that was away too no longer holds).
///
/// An outage that takes every server of a cluster (the database restarting) thus gets its amnesty
/// from the first server back, and a server cut off alone, or reconnecting again and again, does
/// not push back the requeue of abandoned items at each reconnection.
pub fn amnesty_owed_after_outage(
    promised: bool,
    own_last: Option<LeaseKeeperMark>,
    others: &[LeaseKeeperMark],
    now: Timestamp,
) -> bool {
    let kept_while_away = own_last.is_some_and(|own| {
        let after_own_word = own.holds_until.plus_millis(LEASES_KEPT_FRESH_MILLIS);
        others
            .iter()
            .any(|mark| mark.kept_at > after_own_word && mark.holds_at(now))
    });
    promised || !kept_while_away
}

/// How much is left at `now` of the lease amnesty a server sharing its database with others may
/// promise its workers while it cannot reach that database: what its own last mark written there
/// promises ([`LeaseKeeperMark::promises_until`]), and nothing past it. A server cannot tell an
/// outage of the database from a partition of its own, in which a server that starts meanwhile
/// keeps the leases; that server can honour only a promise it can read, and it reads the last mark
/// ([`expiry_held_until`]). `None` when nothing is left.
pub fn promise_left(own_last: Option<LeaseKeeperMark>, now: Timestamp) -> Option<i64> {
    let left = own_last?.promises_until?.millis_since(now);
    (left > 0).then_some(left)
}

/// Until when no lease may be settled as expired, given the marks the other server processes left
/// ([`LeaseKeeperMark::promises_until`]): a process that cannot reach the database may have
/// promised its workers that their leases outlast its outage, up to the end its last mark gave,
/// plus [`LEASES_KEPT_FRESH_MILLIS`] for the skew between two clocks. `None` when no promise
/// holds at `now`.
///
/// A mark dated more than that skew ahead of this clock is not taken at its word, as in
/// [`LeaseKeeperMark::holds_at`]: such a process takes this one's marks for stale and so believes
/// itself alone, and were its promises honoured, two processes with clocks that far apart would
/// hold each other's leases for good. Servers sharing a database keep their clocks within the
/// skew; one that does not has its promises broken rather than the cluster's expiry stopped.
///
/// A mark written after the marks were read is not in them: [`marks_to_read_again`] says when that
/// matters.
pub fn expiry_held_until(others: &[LeaseKeeperMark], now: Timestamp) -> Option<Timestamp> {
    let held_until = others
        .iter()
        .filter(|mark| mark.kept_at.millis_since(now) <= LEASES_KEPT_FRESH_MILLIS)
        .filter_map(|mark| mark.promises_until)
        .max()
        .map(|until| until.plus_millis(LEASES_KEPT_FRESH_MILLIS));
    still_held(held_until, now)
}

/// Whether a server process that last read the other processes' marks at `looked_at` (by its
/// clock; `None`: never) must read them again before it settles a lease due at `deadline`. A
/// promise made from a mark written after that read covers only workers whose leases were live
/// when it was made, so due after the read: a lease due before it (by more than the
/// [`LEASES_KEPT_FRESH_MILLIS`] two clocks may differ by) is held by the marks read, or by none.
pub fn marks_to_read_again(deadline: Timestamp, looked_at: Option<Timestamp>) -> bool {
    looked_at.is_none_or(|looked| deadline.plus_millis(LEASES_KEPT_FRESH_MILLIS) >= looked)
}

/// What is left at `now` of a hold [`expiry_held_until`] gave: while it lasts (to its end
/// included) no lease may be settled as expired. `None`: leases may be settled.
pub fn still_held(held_until: Option<Timestamp>, now: Timestamp) -> Option<Timestamp> {
    held_until.filter(|until| now <= *until)
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
        let second = Duration::from_secs(1);
        let kept = |at: Timestamp| vec![LeaseKeeperMark::new(at, second)];
        for (marks, due) in [
            (vec![], true),
            (kept(now), false),
            (kept(now.minus_millis(LEASES_KEPT_FRESH_MILLIS)), false),
            (kept(now.minus_millis(LEASES_KEPT_FRESH_MILLIS + 1)), true),
            (kept(now.minus_millis(3_600_000)), true),
            // Another clock a little ahead of this one; one far ahead is not taken at its word.
            (kept(now.plus_millis(1_000)), false),
            (kept(now.plus_millis(LEASES_KEPT_FRESH_MILLIS + 1)), true),
            // A mark from before marks said how long they hold.
            (
                vec![LeaseKeeperMark::of_unknown_tick(now.minus_millis(4_000))],
                false,
            ),
            (
                vec![LeaseKeeperMark::of_unknown_tick(now.minus_millis(6_000))],
                true,
            ),
            // Any one mark that holds is enough: a server gone a while beside one still there.
            (
                vec![
                    LeaseKeeperMark::new(now.minus_millis(60_000), second),
                    LeaseKeeperMark::new(now.minus_millis(1_000), second),
                ],
                false,
            ),
        ] {
            assert_eq!(others_keep_leases(&marks, now), !due, "{marks:?}");
        }
    }

    #[test]
    fn amnesty_after_an_outage_is_owed_unless_another_server_kept_the_leases_meanwhile() {
        let second = Duration::from_secs(1);
        let own = LeaseKeeperMark::new(Timestamp::from_millis(100_000), second);
        // This server's word held until 105 s; past 110 s no clock within the allowed skew can
        // date a mark of before its outage.
        let other = |at_ms: i64| LeaseKeeperMark::new(Timestamp::from_millis(at_ms), second);
        let now = Timestamp::from_millis(131_000);
        // (promised, own last mark, the others' marks, owed)
        for (promised, own_last, others, owed) in [
            // Alone: the whole outage is made up for.
            (true, Some(own), vec![], true),
            (false, Some(own), vec![], true),
            // Another server's last mark was from before this one's outage, by its clock or one
            // up to 5 s ahead: the database was away for both.
            (false, Some(own), vec![other(99_000)], true),
            (false, Some(own), vec![other(110_000)], true),
            // It marked later, and its word still holds: it kept the leases while this one was
            // away, or came back first and granted the amnesty.
            (false, Some(own), vec![other(129_000)], false),
            (false, Some(own), vec![other(60_000), other(130_000)], false),
            // It marked later, but its word no longer holds: it went away too.
            (false, Some(own), vec![other(120_000)], true),
            // Promised to its own workers: kept, whatever the others did.
            (true, Some(own), vec![other(130_000)], true),
            // Never marked: there is nothing to tell the others' marks against.
            (false, None, vec![other(130_000)], true),
        ] {
            assert_eq!(
                amnesty_owed_after_outage(promised, own_last, &others, now),
                owed,
                "promised {promised}, own {own_last:?}, others {others:?}"
            );
        }
    }

    #[test]
    fn a_server_promises_amnesty_only_up_to_what_its_last_mark_says() {
        let second = Duration::from_secs(1);
        let kept_at = Timestamp::from_millis(100_000);
        let promising = LeaseKeeperMark::new(kept_at, second).promising(30_000);
        assert_eq!(
            promising.promises_until,
            Some(Timestamp::from_millis(130_000))
        );
        let at = Timestamp::from_millis;
        for (own_last, now, left) in [
            (Some(promising), at(100_000), Some(30_000)),
            (Some(promising), at(129_999), Some(1)),
            // Its end has passed: the outage outlasted the promise, and it is not renewed.
            (Some(promising), at(130_000), None),
            (Some(promising), at(200_000), None),
            // It saw another server keep the leases before its mark, or grants no amnesty.
            (
                Some(LeaseKeeperMark::new(kept_at, second)),
                at(100_000),
                None,
            ),
            (
                Some(LeaseKeeperMark::new(kept_at, second).promising(0)),
                at(100_000),
                None,
            ),
            // It never marked.
            (None, at(100_000), None),
        ] {
            assert_eq!(
                promise_left(own_last, now),
                left,
                "own {own_last:?} at {now}"
            );
        }
    }

    #[test]
    fn no_lease_is_settled_while_another_server_may_have_promised_it() {
        let second = Duration::from_secs(1);
        let now = Timestamp::from_millis(1_000_000);
        let mark = |kept_ago: i64, grace: i64| {
            LeaseKeeperMark::new(now.minus_millis(kept_ago), second).promising(grace)
        };
        let skew = LEASES_KEPT_FRESH_MILLIS;
        for (others, held_until) in [
            (vec![], None),
            // Promising nothing.
            (vec![mark(0, 0)], None),
            (vec![LeaseKeeperMark::new(now, second)], None),
            // A promise up to 30 s after its mark, and the skew two clocks may have.
            (vec![mark(0, 30_000)], Some(now.plus_millis(30_000 + skew))),
            (
                vec![mark(20_000, 30_000)],
                Some(now.plus_millis(10_000 + skew)),
            ),
            // Ended, but within the skew: still held.
            (
                vec![mark(33_000, 30_000)],
                Some(now.plus_millis(skew - 3_000)),
            ),
            (vec![mark(30_000 + skew, 30_000)], Some(now)),
            (vec![mark(30_001 + skew, 30_000)], None),
            // The latest end of all.
            (
                vec![mark(20_000, 30_000), mark(0, 0), mark(1_000, 60_000)],
                Some(now.plus_millis(59_000 + skew)),
            ),
            // A clock up to the skew ahead of this one is taken at its word, one further is not.
            (
                vec![LeaseKeeperMark::new(now.plus_millis(skew), second).promising(30_000)],
                Some(now.plus_millis(30_000 + 2 * skew)),
            ),
            (
                vec![LeaseKeeperMark::new(now.plus_millis(skew + 1), second).promising(30_000)],
                None,
            ),
            (
                vec![LeaseKeeperMark::new(now.plus_millis(3_600_000), second).promising(30_000)],
                None,
            ),
        ] {
            let got = expiry_held_until(&others, now);
            assert_eq!(got, held_until, "{others:?}");
            assert_eq!(still_held(got, now), held_until, "{others:?}");
        }
        let at = Timestamp::from_millis;
        for (deadline, looked_at, again) in [
            (at(100_000), None, true),
            // Read after the deadline, by more than two clocks may differ: a promise made since
            // cannot cover it.
            (at(100_000), Some(at(105_001)), false),
            (at(100_000), Some(at(105_000)), true),
            // Read before the deadline: a promise made since may cover it.
            (at(100_000), Some(at(99_000)), true),
        ] {
            assert_eq!(
                marks_to_read_again(deadline, looked_at),
                again,
                "due {deadline}, read at {looked_at:?}"
            );
        }
        let until = Some(now);
        assert_eq!(still_held(until, now), until);
        assert_eq!(still_held(until, now.next()), None);
        assert_eq!(still_held(None, now), None);
    }

    /// Two servers, B's clock 4.5 s ahead of A's, both cut off by a database restart of 20 s:
    /// whichever comes back first grants the amnesty, and the other then need not.
    #[test]
    fn a_database_restart_gets_its_amnesty_from_the_first_server_back_whatever_their_skew() {
        let second = Duration::from_secs(1);
        let skew = 4_500;
        for a_first in [true, false] {
            // Both marked every second until the outage at 100 s (A's clock).
            let a_last = LeaseKeeperMark::new(Timestamp::from_millis(99_800), second);
            let b_last = LeaseKeeperMark::new(Timestamp::from_millis(99_900 + skew), second);
            let back = 120_000;
            // The first back judges by the others' marks from before the outage.
            let (first_own, first_other, first_now) = if a_first {
                (a_last, b_last, back)
            } else {
                (b_last, a_last, back + skew)
            };
            let first = amnesty_owed_after_outage(
                false,
                Some(first_own),
                &[first_other],
                Timestamp::from_millis(first_now),
            );
            assert!(first, "the first back grants it (A first: {a_first})");
            // It grants, then marks; the second back, a moment later, sees that mark.
            let first_mark = LeaseKeeperMark::new(Timestamp::from_millis(first_now + 200), second);
            let (second_own, second_now) = if a_first {
                (b_last, back + skew + 500)
            } else {
                (a_last, back + 500)
            };
            let second_grants = amnesty_owed_after_outage(
                false,
                Some(second_own),
                &[first_mark],
                Timestamp::from_millis(second_now),
            );
            assert!(!second_grants, "the second need not (A first: {a_first})");
        }
    }

    /// A server that ticks every 20 s marks the leases kept every 20 s: between two of its marks
    /// it is still keeping them, and three ticks without one mean it is not.
    #[test]
    fn a_server_with_a_slow_tick_keeps_the_leases_between_its_marks() {
        let now = Timestamp::from_millis(1_000_000);
        let tick = Duration::from_secs(20);
        for (age_ms, keeps) in [(0, true), (19_000, true), (60_000, true), (60_001, false)] {
            let mark = LeaseKeeperMark::new(now.minus_millis(age_ms), tick);
            assert_eq!(others_keep_leases(&[mark], now), keeps, "{age_ms} ms old");
        }
        // The fastest tick still holds for the least any mark does.
        let fast = LeaseKeeperMark::new(now, Duration::from_millis(10));
        assert_eq!(fast.holds_until, now.plus_millis(LEASES_KEPT_FRESH_MILLIS));
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
            deadline_at_least(
                Some(Timestamp::from_millis(50_000)),
                now.plus_millis(30_000)
            ),
            Some(Timestamp::from_millis(130_000))
        );
        assert_eq!(
            deadline_at_least(
                Some(Timestamp::from_millis(200_000)),
                now.plus_millis(30_000)
            ),
            None
        );
        assert_eq!(deadline_at_least(None, now.plus_millis(30_000)), None);
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

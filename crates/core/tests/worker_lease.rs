//! Property test of the worker's lease arithmetic (`tether_core::lease::WorkerLease`) against a model of
//! the server: whatever the network delays, whatever TTLs the server grants, whatever amnesty it
//! promises, and with the worker's clock running up to 500 ppm fast or slow, the moment the worker
//! kills its program (plus the kill latency it allows for) never comes after the moment the server may
//! expire the lease.
//!
//! Reproduce a run with a fixed seed: `PROPTEST_RNG_SEED=<u64> cargo test -p tether-core --test worker_lease`.

use std::time::Duration;

use proptest::collection::vec;
use proptest::prelude::*;
use tether_core::lease::{
    expiry_held_until, promise_left, still_held, LeaseKeeperMark, WorkerLease, KILL_LATENCY,
};
use tether_core::time::Timestamp;

#[derive(Clone, Debug)]
enum Answer {
    /// The server accepted the heartbeat and set the lease to its processing time + `ttl_s`.
    Accepted { ttl_s: u64 },
    /// The server could not write (503 with the amnesty promise); the database came back `outage_ms`
    /// after the request was processed, and the server then extended leases to `grace_s` past that.
    Amnesty { grace_s: u64, outage_ms: u64 },
    /// No answer the worker can use (a hang, a reset, a 500): nothing changes on either side.
    Nothing,
}

#[derive(Clone, Debug)]
struct Beat {
    /// Real time from the previous answer (or the ack) to sending this beat.
    pause_ms: u64,
    /// Real time from sending to the server processing it, and from there to the answer.
    there_ms: u64,
    back_ms: u64,
    answer: Answer,
}

fn answer() -> impl Strategy<Value = Answer> {
    prop_oneof![
        (10u64..=600).prop_map(|ttl_s| Answer::Accepted { ttl_s }),
        (1u64..=900, 0u64..=120_000)
            .prop_map(|(grace_s, outage_ms)| Answer::Amnesty { grace_s, outage_ms }),
        Just(Answer::Nothing),
    ]
}

fn beat() -> impl Strategy<Value = Beat> {
    (0u64..=40_000, 0u64..=20_000, 0u64..=20_000, answer()).prop_map(
        |(pause_ms, there_ms, back_ms, answer)| Beat {
            pause_ms,
            there_ms,
            back_ms,
            answer,
        },
    )
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2_000))]

    #[test]
    fn the_worker_kills_before_the_server_may_expire(
        // Worker clock rate relative to real time, in parts per million from 1.
        drift_ppm in -500i64..=500,
        ack_ttl_s in 10u64..=600,
        ack_there_ms in 0u64..=20_000,
        beats in vec(beat(), 0..12),
    ) {
        let rate = 1.0 + drift_ppm as f64 / 1e6;
        let worker_clock = |real: Duration| Duration::from_secs_f64(real.as_secs_f64() * rate);
        let real_of = |reading: Duration| Duration::from_secs_f64(reading.as_secs_f64() / rate);

        // The ack: sent at real time 0, processed `ack_there_ms` later.
        let mut now = Duration::ZERO;
        let mut lease = WorkerLease::acknowledged(worker_clock(now), ms(ack_ttl_s * 1_000));
        // The earliest real time at which the server may expire the lease.
        let mut server_may_expire = ms(ack_there_ms) + ms(ack_ttl_s * 1_000);

        for b in beats {
            let sent = now + ms(b.pause_ms);
            let processed = sent + ms(b.there_ms);
            let answered = processed + ms(b.back_ms);
            let alive_when_processed = processed <= server_may_expire;
            // The worker sends only while the lease is its own.
            let Some(_) = lease.request_timeout(worker_clock(sent)) else { break };
            match b.answer {
                Answer::Accepted { ttl_s } if alive_when_processed => {
                    server_may_expire = processed + ms(ttl_s * 1_000);
                    lease.renewed(worker_clock(sent), ms(ttl_s * 1_000));
                }
                // The lease was gone: the server refuses; the worker kills at once (not modelled).
                Answer::Accepted { .. } => break,
                Answer::Amnesty { grace_s, outage_ms } => {
                    if alive_when_processed {
                        let back = processed + ms(outage_ms);
                        server_may_expire = server_may_expire.max(back + ms(grace_s * 1_000));
                    }
                    lease.amnesty(worker_clock(sent), worker_clock(answered), ms(grace_s * 1_000));
                }
                Answer::Nothing => {}
            }
            now = answered;
            let dead_by = real_of(lease.kill_at()) + KILL_LATENCY;
            prop_assert!(
                dead_by <= server_may_expire,
                "the program would still run at {dead_by:?}, the server may expire at {server_may_expire:?}"
            );
            let last_resort = real_of(lease.last_resort());
            prop_assert!(
                last_resort > real_of(lease.kill_at()) && last_resort < server_may_expire,
                "the last resort at {last_resort:?} is not between the kill and {server_may_expire:?}"
            );
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2_000))]

    /// A lone server (A) cut off from its database promises a worker amnesty from its last mark;
    /// another server (B) that read that mark, and keeps the leases meanwhile, settles the lease
    /// only after the program is dead: whatever the two servers' clocks' offsets from real time
    /// (within the 5 s they may differ by), the worker's drift, when the 503 came and when B looked.
    #[test]
    fn a_promise_made_during_a_partition_ends_before_another_server_settles_the_lease(
        a_offset_ms in -2_500i64..=2_500,
        b_offset_ms in -2_500i64..=2_500,
        drift_ppm in -500i64..=500,
        grace_s in 1i64..=900,
        sent_after_mark_ms in 0u64..=1_000_000,
        there_ms in 0u64..=4_000,
        back_ms in 0u64..=4_000,
        look_after_mark_ms in 0u64..=1_000_000,
    ) {
        let rate = 1.0 + drift_ppm as f64 / 1e6;
        let worker_clock = |real: Duration| Duration::from_secs_f64(real.as_secs_f64() * rate);
        let real_of = |reading: Duration| Duration::from_secs_f64(reading.as_secs_f64() / rate);
        // Real time as each server's clock reads it.
        let on_clock = |real: Duration, offset_ms: i64| {
            Timestamp::from_micros(real.as_micros() as i64 + offset_ms * 1_000)
        };
        let real_at = |t: Timestamp, offset_ms: i64| {
            Duration::from_micros((t.as_micros() - offset_ms * 1_000).max(0) as u64)
        };

        // A's last mark, at real 100 s, alone: a promise of `grace_s` from it.
        let marked = ms(100_000);
        let mark = LeaseKeeperMark::new(on_clock(marked, a_offset_ms), Duration::from_secs(1))
            .promising(grace_s * 1_000);
        // A worker's lease of 10 s, renewed just now; its next beat gets A's 503.
        let sent = marked + ms(sent_after_mark_ms);
        let processed = sent + ms(there_ms);
        let answered = processed + ms(back_ms);
        let mut lease = WorkerLease::acknowledged(worker_clock(sent), ms(10_000));
        let base_server_deadline = processed + ms(10_000);
        let Some(left) = promise_left(Some(mark), on_clock(processed, a_offset_ms)) else {
            // Nothing left to promise: a plain 503, which changes nothing.
            return Ok(());
        };
        let moved = lease.amnesty(worker_clock(sent), worker_clock(answered), ms(left as u64));
        // B read the mark at some moment after it was written; from then on it settles no lease
        // while the promise may hold.
        let looked = marked + ms(look_after_mark_ms);
        let held = expiry_held_until(&[mark], on_clock(looked, b_offset_ms));
        let b_may_expire_from = match held {
            Some(until) => {
                let from = real_at(until, b_offset_ms) + Duration::from_micros(1);
                prop_assert!(still_held(held, on_clock(from, b_offset_ms)).is_none());
                prop_assert!(still_held(held, on_clock(from - Duration::from_micros(1), b_offset_ms)).is_some());
                from
            }
            None => looked,
        };
        if moved {
            let dead_by = real_of(lease.kill_at()) + KILL_LATENCY;
            prop_assert!(
                dead_by <= b_may_expire_from.max(base_server_deadline),
                "the program would still run at {dead_by:?}; B may expire from {b_may_expire_from:?}"
            );
        }
    }
}

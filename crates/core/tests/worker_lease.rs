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
use tether_core::lease::{WorkerLease, KILL_LATENCY};

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

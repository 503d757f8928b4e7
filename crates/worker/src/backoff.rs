//! Waiting after failures, in one place: the poll loop's exponential backoff (§8), short retries of one
//! call, and the reconnects of `tether session follow` all use [`Backoff`].

use std::future::Future;
use std::time::Duration;

use rand::Rng;

/// Exponential waits: `first`, doubled after every failure up to `cap`, each plus a random jitter of up
/// to `jitter` so that clients that failed together do not come back together. [`Backoff::reset`] after
/// any success.
#[derive(Clone, Debug)]
pub struct Backoff {
    first: Duration,
    cap: Duration,
    jitter: Duration,
    failures: u32,
}

impl Backoff {
    pub fn new(first: Duration, cap: Duration, jitter: Duration) -> Backoff {
        assert!(
            !first.is_zero() && first <= cap,
            "a backoff grows from a non-zero wait to its cap"
        );
        Backoff {
            first,
            cap,
            jitter,
            failures: 0,
        }
    }

    /// The poll loop's (§8): 1, 2, 4 … seconds, capped at 60 s, plus up to 1 s of jitter.
    pub fn poll() -> Backoff {
        Backoff::new(
            Duration::from_secs(1),
            Duration::from_secs(60),
            Duration::from_secs(1),
        )
    }

    /// Retries of one call: ½ s, 1 s, 2 s … capped at 8 s, no jitter (the calls are the item's own).
    pub fn call() -> Backoff {
        Backoff::new(
            Duration::from_millis(500),
            Duration::from_secs(8),
            Duration::ZERO,
        )
    }

    /// The wait before the next attempt, without jitter.
    pub fn base(&self) -> Duration {
        // 2^20 times any sensible first wait is past any sensible cap; the shift cannot overflow.
        let factor = 1u32 << self.failures.min(20);
        self.first.saturating_mul(factor).min(self.cap)
    }

    /// Records a failure and returns how long to wait.
    pub fn next_delay(&mut self) -> Duration {
        let base = self.base();
        self.failures = self.failures.saturating_add(1);
        if self.jitter.is_zero() {
            return base;
        }
        let jitter_ms = u64::try_from(self.jitter.as_millis()).unwrap_or(u64::MAX);
        base + Duration::from_millis(rand::rng().random_range(0..=jitter_ms))
    }

    pub fn reset(&mut self) {
        self.failures = 0;
    }
}

/// Whether [`retry`] tries a call that failed with `error` again (while it has tries left): the
/// server promised amnesty for an outage, or the failure is one that passes.
pub fn worth_another_try(error: &tether_client::Error) -> bool {
    crate::heartbeat::amnesty_promised(error).is_some() || error.is_retryable()
}

/// Runs `call` until it succeeds, fails for good, or `attempts` tries have failed with errors worth
/// another try (transport failures, 408, 429, 5xx), waiting as [`Backoff::call`] says in between.
///
/// A 503 that promises lease amnesty (the server's database is down) does not count against
/// `attempts` when there is more than one: the server can expire nothing meanwhile and extends every
/// lease once it can write again, so a call that ends an item (recording its program's exit,
/// stopping it) is worth trying until the database is back. Given up, it would leave the lease to
/// expire after the outage, and the item, whose program has already run, to be run again.
pub async fn retry<T, F, Fut>(attempts: u32, mut call: F) -> tether_client::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = tether_client::Result<T>>,
{
    let mut backoff = Backoff::call();
    let mut tried = 1;
    loop {
        match call().await {
            Err(e) if attempts > 1 && crate::heartbeat::amnesty_promised(&e).is_some() => {
                tokio::time::sleep(backoff.next_delay()).await;
            }
            Err(e) if e.is_retryable() && tried < attempts => {
                tokio::time::sleep(backoff.next_delay()).await;
                tried += 1;
            }
            other => return other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};
    use tokio::time::Instant;

    #[test]
    fn the_poll_backoff_doubles_up_to_a_minute_and_resets() {
        let mut b = Backoff::poll();
        let bases: Vec<u64> = (0..9)
            .map(|_| {
                let base = b.base().as_secs();
                let delay = b.next_delay();
                assert!(delay >= Duration::from_secs(base));
                assert!(delay <= Duration::from_secs(base + 1));
                base
            })
            .collect();
        assert_eq!(bases, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
        b.reset();
        assert_eq!(b.base(), Duration::from_secs(1));
        for _ in 0..100 {
            b.next_delay();
        }
        assert_eq!(
            b.base(),
            Duration::from_secs(60),
            "no overflow after many failures"
        );
    }

    fn unavailable() -> tether_client::Error {
        tether_client::ApiError {
            status: 503,
            kind: "overloaded_error".into(),
            message: "busy".into(),
            param: None,
            code: None,
            details: None,
            request_id: None,
        }
        .into()
    }

    /// On tokio's paused clock: the waits between tries are exactly ½ s, 1 s, 2 s, and the number of
    /// tries is bounded.
    #[tokio::test(start_paused = true)]
    async fn retries_wait_longer_each_time_and_give_up_after_the_attempts() {
        let start = Instant::now();
        let tries = AtomicU32::new(0);
        let mut at = Vec::new();
        let result: tether_client::Result<()> = retry(4, || {
            tries.fetch_add(1, Ordering::SeqCst);
            at.push(start.elapsed());
            async { Err(unavailable()) }
        })
        .await;
        assert_eq!(result.unwrap_err().status(), Some(503));
        assert_eq!(tries.load(Ordering::SeqCst), 4);
        assert_eq!(at, [0, 500, 1500, 3500].map(Duration::from_millis).to_vec());
    }

    /// The database is down for 40 s: the call goes on through it, and gives up only on a forced quit
    /// (a single attempt).
    #[tokio::test(start_paused = true)]
    async fn a_database_outage_is_outlasted_unless_there_is_one_attempt_only() {
        let outage = || -> tether_client::Error { crate::heartbeat::tests::outage(30_000).into() };
        let start = Instant::now();
        let tries = AtomicU32::new(0);
        let result: tether_client::Result<()> = retry(3, || {
            tries.fetch_add(1, Ordering::SeqCst);
            let down = start.elapsed() < Duration::from_secs(40);
            async move {
                if down {
                    Err(outage())
                } else {
                    Ok(())
                }
            }
        })
        .await;
        assert!(result.is_ok(), "{result:?}");
        assert!(tries.load(Ordering::SeqCst) > 3);
        let once: tether_client::Result<()> = retry(1, || async { Err(outage()) }).await;
        assert_eq!(once.unwrap_err().status(), Some(503));
    }

    #[tokio::test(start_paused = true)]
    async fn a_refusal_is_not_retried() {
        let tries = AtomicU32::new(0);
        let result: tether_client::Result<()> = retry(5, || {
            tries.fetch_add(1, Ordering::SeqCst);
            async {
                Err(tether_client::ApiError {
                    status: 404,
                    kind: "not_found_error".into(),
                    message: "gone".into(),
                    param: None,
                    code: None,
                    details: None,
                    request_id: None,
                }
                .into())
            }
        })
        .await;
        assert!(result.is_err());
        assert_eq!(tries.load(Ordering::SeqCst), 1);
    }
}

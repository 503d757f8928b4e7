//! Waiting after failures: the poll loop's exponential backoff (§8) and short retries of one call.

use std::future::Future;
use std::time::Duration;

use rand::Rng;

/// 1, 2, 4 … seconds, capped at 60 s, each plus up to 1 s of jitter so that workers that failed together
/// do not come back together. [`Backoff::reset`] after any success.
#[derive(Debug, Default)]
pub struct Backoff {
    failures: u32,
}

const CAP: Duration = Duration::from_secs(60);

impl Backoff {
    pub fn new() -> Backoff {
        Backoff::default()
    }

    /// The wait before the next attempt, without jitter.
    pub fn base(&self) -> Duration {
        let exponent = self.failures.min(6);
        Duration::from_secs(1u64 << exponent).min(CAP)
    }

    /// Records a failure and returns how long to wait.
    pub fn next_delay(&mut self) -> Duration {
        let base = self.base();
        self.failures = self.failures.saturating_add(1);
        base + Duration::from_millis(rand::rng().random_range(0..=1000))
    }

    pub fn reset(&mut self) {
        self.failures = 0;
    }
}

/// Runs `call` until it succeeds, fails for good, or `attempts` tries have failed with errors worth
/// another try (transport failures, 408, 429, 5xx), waiting ½ s, 1 s, 2 s … in between.
pub async fn retry<T, F, Fut>(attempts: u32, mut call: F) -> tether_client::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = tether_client::Result<T>>,
{
    let mut delay = Duration::from_millis(500);
    let mut tried = 1;
    loop {
        match call().await {
            Err(e) if e.is_retryable() && tried < attempts => {
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(8));
                tried += 1;
            }
            other => return other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_a_minute_and_resets() {
        let mut b = Backoff::new();
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
    }
}

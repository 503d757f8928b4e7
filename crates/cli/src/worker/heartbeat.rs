//! The heartbeat task of one item (§8 step 3): renews the lease with the item's session token, first
//! with `NO_HEARTBEAT`, then echoing each `last_heartbeat` verbatim, every clamp(ttl/2, 1 s, 30 s); and
//! says when the server asked for a stop or the lease is gone.

use std::time::Duration;

use tether_client::{Client, Error, Heartbeat as Beat, HeartbeatOptions, WorkState, NO_HEARTBEAT};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// What the supervisor of the item needs to know.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Lease {
    Held,
    /// The item is `stopping`: end the program gracefully, then confirm the stop.
    StopRequested,
    /// The item is not this worker's any more: kill the program at once and leave the item alone.
    Lost(String),
}

/// The lease length assumed until the server says (§8).
const ASSUMED_TTL: Duration = Duration::from_secs(90);

/// How often to beat for a lease of `ttl`.
pub fn interval_for(ttl: Duration) -> Duration {
    (ttl / 2).clamp(Duration::from_secs(1), Duration::from_secs(30))
}

/// What one heartbeat answer means.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Renewed {
        stopping: bool,
    },
    Lost(String),
    /// Worth another try while the lease may still be alive.
    Retry(String),
}

fn judge(result: &Result<Beat, Error>) -> Verdict {
    match result {
        Ok(beat) if !beat.lease_extended => {
            Verdict::Lost("the server did not extend the lease".into())
        }
        Ok(beat) => match beat.state {
            WorkState::Active => Verdict::Renewed { stopping: false },
            WorkState::Stopping => Verdict::Renewed { stopping: true },
            ref other => Verdict::Lost(format!("the heartbeat says the item is {other}")),
        },
        Err(e) => match e.status() {
            Some(412) => Verdict::Lost(format!("another heartbeat holds the lease ({e})")),
            Some(409) => Verdict::Lost(format!(
                "the item went back to the queue or was stopped ({e})"
            )),
            Some(401) => Verdict::Lost(format!(
                "the item's session token died: it was stopped or handed to another worker ({e})"
            )),
            _ if e.is_retryable() => Verdict::Retry(e.to_string()),
            Some(_) => Verdict::Lost(format!("the server refused the heartbeat ({e})")),
            None => Verdict::Retry(e.to_string()),
        },
    }
}

/// The running heartbeat task of one item. Dropping it stops the task.
pub struct Heartbeat {
    task: JoinHandle<()>,
    state: watch::Receiver<Lease>,
}

impl Heartbeat {
    /// Starts beating at once. `client` carries the item's session token.
    pub fn start(
        client: Client,
        environment_id: String,
        work_id: String,
        worker_id: String,
        desired_ttl: Option<u32>,
    ) -> Heartbeat {
        let (tx, state) = watch::channel(Lease::Held);
        let task = tokio::spawn(async move {
            let outcome = beat(
                &client,
                &environment_id,
                &work_id,
                &worker_id,
                desired_ttl,
                &tx,
            )
            .await;
            tx.send_replace(Lease::Lost(outcome));
            // The sender stays, so that waiting on the state never sees a closed channel.
            std::future::pending::<()>().await;
        });
        Heartbeat { task, state }
    }

    pub fn current(&self) -> Lease {
        self.state.borrow().clone()
    }

    /// Waits until the lease is anything but plainly held.
    pub async fn event(&mut self) -> Lease {
        match self.state.wait_for(|l| *l != Lease::Held).await {
            Ok(lease) => lease.clone(),
            Err(_) => Lease::Lost("the heartbeat task ended".into()),
        }
    }

    /// Waits until the lease is lost; returns why.
    pub async fn lost(&mut self) -> String {
        match self.state.wait_for(|l| matches!(l, Lease::Lost(_))).await {
            Ok(lease) => match &*lease {
                Lease::Lost(why) => why.clone(),
                _ => unreachable!("waited for a lost lease"),
            },
            Err(_) => "the heartbeat task ended".into(),
        }
    }
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Beats until the lease is lost; returns why.
async fn beat(
    client: &Client,
    environment_id: &str,
    work_id: &str,
    worker_id: &str,
    desired_ttl: Option<u32>,
    tx: &watch::Sender<Lease>,
) -> String {
    let mut expected = NO_HEARTBEAT.to_owned();
    let mut ttl = desired_ttl.map_or(ASSUMED_TTL, |s| Duration::from_secs(s.into()));
    let mut last_ok = Instant::now();
    loop {
        let interval = interval_for(ttl);
        let options = HeartbeatOptions {
            expected_last_heartbeat: Some(expected.clone()),
            desired_ttl_seconds: desired_ttl,
            worker_id: Some(worker_id.to_owned()),
            // A call that takes longer than the gap between beats is as good as lost.
            timeout: Some(interval),
        };
        let sent = Instant::now();
        let result = client.heartbeat(environment_id, work_id, &options).await;
        let wait = match judge(&result) {
            Verdict::Renewed { stopping } => {
                let beat = result.expect("a renewal is a success");
                expected = beat.last_heartbeat;
                ttl = Duration::from_secs(beat.ttl_seconds.into());
                last_ok = sent;
                if stopping {
                    tx.send_if_modified(|l| {
                        let first = *l == Lease::Held;
                        if first {
                            *l = Lease::StopRequested;
                        }
                        first
                    });
                }
                interval_for(ttl).saturating_sub(sent.elapsed())
            }
            Verdict::Lost(why) => return why,
            Verdict::Retry(why) => {
                // The server forgets the lease one TTL after the last beat it accepted; so do we.
                if last_ok.elapsed() >= ttl {
                    return format!(
                        "no successful heartbeat for {}s (last error: {why})",
                        ttl.as_secs()
                    );
                }
                (interval / 4).max(Duration::from_millis(250))
            }
        };
        tokio::time::sleep(wait).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn beat(state: &str, extended: bool) -> Result<Beat, Error> {
        Ok(serde_json::from_value(serde_json::json!({
            "type": "work_heartbeat",
            "last_heartbeat": "2026-07-01T08:15:06.120394Z",
            "lease_extended": extended,
            "state": state,
            "ttl_seconds": 60,
        }))
        .unwrap())
    }

    fn refused(status: u16) -> Result<Beat, Error> {
        Err(tether_client::ApiError {
            status,
            kind: "x".into(),
            message: "no".into(),
            param: None,
            code: None,
            details: None,
            request_id: None,
        }
        .into())
    }

    #[test]
    fn intervals_are_half_the_ttl_within_bounds() {
        assert_eq!(interval_for(Duration::from_secs(2)), Duration::from_secs(1));
        assert_eq!(interval_for(Duration::from_secs(1)), Duration::from_secs(1));
        assert_eq!(
            interval_for(Duration::from_secs(60)),
            Duration::from_secs(30)
        );
        assert_eq!(
            interval_for(Duration::from_secs(600)),
            Duration::from_secs(30)
        );
        assert_eq!(
            interval_for(Duration::from_secs(20)),
            Duration::from_secs(10)
        );
    }

    #[test]
    fn answers_are_judged_as_the_worker_protocol_says() {
        assert_eq!(
            judge(&beat("active", true)),
            Verdict::Renewed { stopping: false }
        );
        assert_eq!(
            judge(&beat("stopping", true)),
            Verdict::Renewed { stopping: true }
        );
        assert!(matches!(judge(&beat("active", false)), Verdict::Lost(_)));
        assert!(matches!(judge(&beat("stopped", true)), Verdict::Lost(_)));
        for lost in [401, 403, 404, 409, 412, 400] {
            assert!(matches!(judge(&refused(lost)), Verdict::Lost(_)), "{lost}");
        }
        for transient in [408, 429, 500, 502, 503] {
            assert!(
                matches!(judge(&refused(transient)), Verdict::Retry(_)),
                "{transient}"
            );
        }
    }
}

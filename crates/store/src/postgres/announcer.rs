//! Sends this process's notices to the other processes. `announce` hands the notices over and returns;
//! one task sends whatever has gathered since its last send, in one round trip. A burst of commits (32
//! session creations at once) then costs one `pg_notify` round trip instead of one each, and no request
//! waits for a hint to go out.
//!
//! Notices are wake-up hints (see the module above): one that is dropped (the database is away, or
//! more than [`MAX_PENDING`] wait) costs the waiters of other processes their next re-check, never
//! correctness. Each notice is sent once for each time it was announced, since a waiter elsewhere is
//! woken per notice.

use std::sync::{Arc, Mutex};

use deadpool_postgres::Pool;
use tokio::sync::Notify;

use super::listener::encode_payloads;
use super::CHANNEL;
use crate::Notice;

/// Notices that may wait for the sender at most; beyond it new ones are dropped.
const MAX_PENDING: usize = 8_192;

#[derive(Default)]
pub(super) struct Announcer {
    pending: Mutex<Vec<Notice>>,
    wake: Notify,
}

impl Announcer {
    /// Queues `notices` for the sender (see the module's documentation).
    pub(super) fn queue(&self, notices: Vec<Notice>) {
        {
            let mut pending = self.pending.lock().expect("announcer lock");
            let room = MAX_PENDING.saturating_sub(pending.len());
            if notices.len() > room {
                tracing::debug!(
                    dropped = notices.len() - room,
                    "too many notices waiting to be sent: other processes fall back on their re-check"
                );
            }
            pending.extend(notices.into_iter().take(room));
        }
        self.wake.notify_one();
    }

    fn take(&self) -> Vec<Notice> {
        std::mem::take(&mut *self.pending.lock().expect("announcer lock"))
    }
}

/// The sender: waits for notices, then sends all that are waiting, on a pooled connection.
pub(super) async fn send(announcer: Arc<Announcer>, pool: Pool, origin: String) {
    loop {
        announcer.wake.notified().await;
        let notices = announcer.take();
        let payloads = encode_payloads(&notices, &origin);
        if payloads.is_empty() {
            continue;
        }
        let client = match pool.get().await {
            Ok(client) => client,
            Err(e) => {
                tracing::debug!(error = %e, "cannot send notices to other processes");
                continue;
            }
        };
        // Requests polled at once go out together (tokio-postgres pipelines them).
        let params: Vec<[&(dyn tokio_postgres::types::ToSql + Sync); 2]> = payloads
            .iter()
            .map(|payload| [&CHANNEL as _, payload as _])
            .collect();
        let sent = futures::future::join_all(
            params
                .iter()
                .map(|params| client.execute("SELECT pg_notify($1, $2)", params)),
        )
        .await;
        if let Some(Err(e)) = sent.into_iter().find(Result::is_err) {
            tracing::debug!(error = %e, "cannot send notices to other processes");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claimable(n: usize) -> Vec<Notice> {
        (0..n)
            .map(|i| Notice::WorkClaimable {
                environment_id: format!("env_{i}"),
            })
            .collect()
    }

    #[test]
    fn notices_waiting_for_the_sender_are_bounded_and_taken_in_order() {
        let announcer = Announcer::default();
        announcer.queue(claimable(3));
        announcer.queue(claimable(MAX_PENDING));
        let pending = announcer.take();
        assert_eq!(pending.len(), MAX_PENDING, "the overflow is dropped");
        assert_eq!(pending[..3], claimable(3)[..], "the first ones are kept");
        assert!(announcer.take().is_empty(), "taking empties the queue");
        announcer.queue(claimable(1));
        assert_eq!(announcer.take(), claimable(1), "room again once taken");
    }
}

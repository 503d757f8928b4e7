//! Requeue of a stopped item (a Tether extension, §11): the way back for an item stopped as poison.
//! The rule is the core's (`work::requeue`); this reads what it needs and commits its answer at once.

use tether_core::ids::{self, IdKind};
use tether_core::resources::Environment;
use tether_core::work::{self, RequeueRequest};
use tether_core::{Cause, WorkItem};
use tether_store::{ChangeSet, Write};

use super::{App, Error, Result, Retry, SessionOfItem};

/// History lines read to learn whether an item was requeued before. A poison item has a handful
/// (four per lease it went through, at most `max_requeues` + 1 leases); past this many the item is
/// treated as requeued already, which refuses rather than requeues twice.
const HISTORY_READ: u32 = 1000;

/// The longest reason kept in the history.
pub const MAX_REASON_CHARS: usize = 500;

impl App {
    /// Gives the session of the stopped item `work_id` a fresh queued item. Returns the fresh item.
    pub async fn requeue_work(
        &self,
        env: &Environment,
        work_id: &str,
        by: &str,
        reason: Option<&str>,
    ) -> Result<WorkItem> {
        // The requeue writes the session as its guard: under clients posting to it, it takes the
        // session's turn after a lost race, as an ack or a stop does.
        let session_of_item = SessionOfItem::default();
        let attempt = || async {
            let current = self.load_item(&env.id, work_id).await?;
            session_of_item.note(&current.value);
            let history = self.store.list_history(work_id, None, HISTORY_READ).await?;
            let already_requeued = history.has_more
                || history
                    .items
                    .iter()
                    .any(|h| h.transition.cause == Cause::Requeued);
            let session_id = &current.value.data.id;
            let session = self.store.get_session(session_id).await?;
            let now = self.now();
            let request = RequeueRequest {
                fresh_id: ids::new_id(IdKind::Work),
                by,
                reason,
                already_requeued,
                not_before: session.as_ref().and_then(|s| s.value.next_item_not_before),
            };
            let requeue = work::requeue(&current.value, request, now, &self.config.lease)?;
            let session = match session {
                Some(s) if s.value.archived_at.is_none() => s,
                Some(_) => {
                    return Err(Error::invalid_state(format!(
                        "session {session_id} is archived: its work cannot be requeued"
                    ))
                    .into())
                }
                None => {
                    return Err(Error::invalid_state(format!(
                        "session {session_id} no longer exists: its work cannot be requeued"
                    ))
                    .into())
                }
            };
            if let Some(live) = self.store.live_work_for_session(session_id).await? {
                return Err(Error::invalid_state(format!(
                    "session {session_id} already has a live work item ({})",
                    live.value.id
                ))
                .into());
            }
            let mut changes = ChangeSet::new();
            changes.push(Write::UpdateWork {
                item: requeue.stopped.item.clone(),
                expected_version: current.version,
                transitions: requeue.stopped.transitions.clone(),
                session_version: None,
            });
            changes.push(Write::InsertWork {
                item: requeue.fresh.item.clone(),
                transitions: requeue.fresh.transitions.clone(),
            });
            // The session's version is the guard against a concurrent archive or delete; a concurrent
            // fresh item for it is refused by the one-live-item-per-session index.
            changes.push(Write::UpdateSession {
                session: session.value.clone(),
                expected_version: session.version,
            });
            self.commit(changes).await?;
            Ok::<_, Retry>(requeue.fresh.item)
        };
        let fresh = self
            .with_retries_then_session_turn(&session_of_item, attempt)
            .await?;
        self.announce_claimable(std::slice::from_ref(&env.id)).await;
        // §3.1: a requeue runs a dispatcher pass at once.
        self.dispatch_now.notify_one();
        Ok(fresh)
    }
}

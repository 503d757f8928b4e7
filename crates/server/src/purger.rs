//! The event purge: deletes the events that deleted sessions left, one batch per commit
//! (`Store::purge_deleted_events`). A session's delete removes its row and the first batch of its
//! events; deleting millions of events in that one commit held the embedded store's only writer,
//! and so every other write, heartbeats included, for many seconds.

use std::time::Duration;

use crate::service::App;

/// The pause between two batches while events are left to delete: the other writes' commits go
/// between them.
const BETWEEN_BATCHES: Duration = Duration::from_millis(10);

/// How often an idle purge looks for a deleted session's events: this process's deletes wake it
/// (`App::purge_now`), so the look is for what other servers of a cluster left (one that stopped
/// in the middle of a purge), and for this one's after a restart. Rare, because the look is a read
/// of the store like any other, which a stalled disk holds like any other.
const IDLE_LOOK: Duration = Duration::from_secs(60);

pub async fn run(app: App) {
    loop {
        let pause = match app
            .store
            .purge_deleted_events(tether_store::sql::EVENT_PURGE_BATCH)
            .await
        {
            Ok(true) => BETWEEN_BATCHES,
            Ok(false) => IDLE_LOOK,
            Err(e) => {
                crate::services::duty_failed(
                    "event purge: deleting a deleted session's events",
                    &e,
                );
                IDLE_LOOK
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = app.purge_now.notified() => {}
            _ = app.until_shutdown() => return,
        }
    }
}

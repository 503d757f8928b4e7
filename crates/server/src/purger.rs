//! The event purge: deletes the events that deleted sessions left, one batch per commit
//! (`Store::purge_deleted_events`). A session's delete removes its row and the first batch of its
//! events; deleting millions of events in that one commit held the embedded store's only writer,
//! and so every other write, heartbeats included, for many seconds.

use std::time::Duration;

use crate::service::App;

/// The pause between two batches while events are left to delete: the other writes' commits go
/// between them.
const BETWEEN_BATCHES: Duration = Duration::from_millis(10);

/// How often an idle purge looks for a deleted session's events (one read of a table that is
/// nearly always empty).
const IDLE_LOOK: Duration = Duration::from_secs(5);

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
            _ = app.until_shutdown() => return,
        }
    }
}

//! The dispatcher (§3.1): a periodic pass, plus an immediate one when asked (ack, stop, requeue) or
//! when another server process announces a change. Correctness never depends on it: every request
//! settles expired leases of the items it touches itself. The pass makes expiry timely and wakes waiters
//! for items that became claimable without an enqueue (a delivery passing its reclaim window, a
//! notification from another process that got lost). Once a minute it also drops poll records too old
//! for any reader, which keeps the workers table from growing with every worker ever started.

use tether_store::Notice;
use tokio::task::JoinHandle;

use crate::service::App;

/// How often stale poll records are dropped. Readers filter by time anyway, so this only bounds the
/// table; doing it every tick would cost a write (and on SQLite an fsync) per second for nothing.
const PRUNE_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

pub fn spawn(app: App) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut notices = app.store.subscribe();
        let mut tick = tokio::time::interval(app.config.tick);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut prune = tokio::time::interval(PRUNE_EVERY);
        prune.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => pass(&app).await,
                _ = prune.tick() => {
                    if let Err(e) = app.forget_idle_workers().await {
                        tracing::warn!(error = %e, "dispatcher: pruning idle workers failed");
                    }
                }
                _ = app.dispatch_now.notified() => pass(&app).await,
                notice = notices.recv() => match notice {
                    Ok(Notice::WorkClaimable { environment_id }) => { app.waiters.wake(&environment_id, 1); }
                    Ok(Notice::Session { session_id }) => app.hub.notify(&session_id),
                    // Notices were missed: look at every environment and wake every stream.
                    Ok(Notice::Resync) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                        pass(&app).await;
                        app.hub.notify_all();
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => notices = app.store.subscribe(),
                },
                _ = app.until_shutdown() => return,
            }
        }
    })
}

/// One pass over every environment.
pub async fn pass(app: &App) {
    if let Err(e) = app.expire_due_leases().await {
        tracing::warn!(error = %e, "dispatcher: lease expiry pass failed");
    }
    let waiting = app.waiters.environments_waiting();
    if waiting.is_empty() {
        return;
    }
    let cutoff = app.now().minus_millis(app.config.default_reclaim_ms);
    match app.store.environments_with_claimable(cutoff).await {
        Ok(claimable) => {
            for env in waiting.iter().filter(|e| claimable.contains(e)) {
                app.waiters.wake(env, 1);
            }
        }
        Err(e) => tracing::warn!(error = %e, "dispatcher: claimable scan failed"),
    }
}

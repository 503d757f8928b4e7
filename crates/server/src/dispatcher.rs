//! The dispatcher (§3.1): a periodic pass, plus an immediate one when asked (ack, stop, requeue) or
//! when another server process announces a change. Correctness never depends on it: every request
//! settles expired leases of the items it touches itself. The pass makes expiry timely and wakes waiters
//! for items that became claimable without an enqueue (a delivery passing its reclaim window, a
//! notification from another process that got lost). Once a minute it also drops poll records too old
//! for any reader, which keeps the workers table from growing with every worker ever started.

use tether_store::{ClaimWindow, Notice};

use crate::service::App;
use crate::services::duty_failed;

/// How often stale poll records are dropped. Readers filter by time anyway, so this only bounds the
/// table; doing it every tick would cost a write (and on SQLite an fsync) per second for nothing.
const PRUNE_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

/// The dispatcher's loop, until the server shuts down (run as a service: `crate::services`).
pub async fn run(app: App) {
    let mut notices = app.store.subscribe();
    // A run after one that panicked missed the notices of its pause: every stream looks again, as
    // after a resync (the first tick, at once, passes over every environment). On the first run
    // there is no stream yet, and this costs nothing.
    app.hub.notify_all();
    let mut tick = tokio::time::interval(app.config.tick);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut prune = tokio::time::interval(PRUNE_EVERY);
    prune.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                if pass(&app, Expiry::Always).await {
                    if let Err(e) = app.mark_leases_kept().await {
                        duty_failed("dispatcher: marking the leases kept", &e);
                    }
                }
                if let Err(e) = app.write_worker_records().await {
                    duty_failed("dispatcher: writing poll records", &e);
                }
            }
            _ = prune.tick() => {
                if let Err(e) = app.forget_idle_workers().await {
                    duty_failed("dispatcher: pruning idle workers", &e);
                }
            }
            _ = app.dispatch_now.notified() => {
                pass(&app, Expiry::WhenDue).await;
            }
            notice = notices.recv() => match notice {
                Ok(Notice::WorkClaimable { environment_id }) => { app.waiters.wake(&environment_id, 1); }
                Ok(Notice::Session { session_id }) => app.hub.notify(&session_id),
                // Notices were missed: look at every environment and wake every stream.
                Ok(Notice::Resync) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                    pass(&app, Expiry::Always).await;
                    app.hub.notify_all();
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => notices = app.store.subscribe(),
            },
            _ = app.until_shutdown() => {
                if let Err(e) = app.write_worker_records().await {
                    tracing::warn!(error = %e, "dispatcher: writing poll records failed");
                }
                return;
            }
        }
    }
}

/// Whether a pass asks the store for due leases.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Expiry {
    /// Always (the tick): this also refreshes the lease horizon, which bounds how long a deadline
    /// written by another process can go unnoticed by the hinted passes.
    Always,
    /// Only when the lease horizon says a lease may be due (passes on demand, after ack and stop).
    WhenDue,
}

/// One pass over the environments being waited on. Each is probed with one index-backed read of its
/// oldest claimable item, so a pass costs a read per waited-on environment whatever the backlog.
/// Returns whether it checked the leases, and every due one was settled.
pub async fn pass(app: &App, expiry: Expiry) -> bool {
    let mut leases_kept = false;
    if expiry == Expiry::Always || app.lease_horizon.may_be_due(app.now()) {
        match app.expire_due_leases().await {
            Ok(_) => leases_kept = true,
            Err(e) => duty_failed("dispatcher: lease expiry pass", &e),
        }
    }
    let waiting = app.waiters.environments_waiting();
    if waiting.is_empty() {
        return leases_kept;
    }
    let window = ClaimWindow::at(app.now(), app.config.default_reclaim_ms);
    for env in waiting {
        match app.store.claim_candidates(&env, window, 1).await {
            Ok(claimable) if !claimable.is_empty() => {
                app.waiters.wake(&env, 1);
            }
            Ok(_) => {}
            Err(e) => {
                duty_failed("dispatcher: claimable probe", &e);
                break;
            }
        }
    }
    leases_kept
}

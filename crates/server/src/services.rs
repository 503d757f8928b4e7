//! Background services: each duty that runs beside the requests (the dispatcher, the sampler) is a
//! small named service, started with the server and stopped with it.
//!
//! A service that panics is started again after [`RESTART_PAUSE`], logged and counted
//! (`tether_service_restarts_total{service}`). Without that, one bad pass would silently end lease
//! expiry or queue sampling for the life of the process while every request went on answering.
//! Requests do not depend on a service for correctness (each settles the leases it touches), so a
//! restart loses at most the timeliness of one pass.

use std::future::Future;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// The services' names, as `tether_service_restarts_total` labels them.
pub const DISPATCHER: &str = "dispatcher";
pub const SAMPLER: &str = "sampler";
pub const DISK_WATCH: &str = "disk_watch";
pub const EVENT_PURGE: &str = "event_purge";
pub const NAMES: [&str; 4] = [DISPATCHER, SAMPLER, DISK_WATCH, EVENT_PURGE];

/// The counter of runs that panicked, by service.
pub const RESTARTS: &str = "tether_service_restarts_total";

/// How long a service that panicked waits before it runs again: a panic that comes back at once
/// then costs a log line a second, not a busy loop.
pub const RESTART_PAUSE: Duration = Duration::from_secs(1);

/// A duty's error, which says whether it is the database being unavailable or its disk full: a
/// state every write shares until it passes, said on its own (the store announces an outage; a
/// full disk is logged once a while, `service::error`).
pub trait DutyError: std::fmt::Display {
    fn is_outage(&self) -> bool;
}

impl DutyError for crate::service::Error {
    fn is_outage(&self) -> bool {
        crate::service::Error::is_outage(self) || matches!(self, crate::service::Error::StoreFull)
    }
}

impl DutyError for tether_store::StoreError {
    fn is_outage(&self) -> bool {
        self.is_unavailable() || matches!(self, tether_store::StoreError::Full(_))
    }
}

/// Logs a failed pass of a service's duty (`what`, e.g. "dispatcher: lease expiry pass"): at
/// `warn`, but at `debug` while the database is unavailable or its disk full. Those are said on
/// their own, as they begin and end or once a while; a line from every duty at every tick meanwhile
/// would bury them.
pub fn duty_failed(what: &str, error: &dyn DutyError) {
    match error.is_outage() {
        true => tracing::debug!(error = %error, "{what} failed"),
        false => tracing::warn!(error = %error, "{what} failed"),
    }
}

/// A running service.
pub struct Service {
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl Service {
    /// Starts `name`, whose runs `run` makes: a run ends when its service is done (at the server's
    /// shutdown, which it watches itself), and one that panics is followed by a fresh one.
    pub fn start<Run, Fut>(name: &'static str, run: Run) -> Service
    where
        Run: Fn() -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        Service::start_with_pause(name, run, RESTART_PAUSE)
    }

    fn start_with_pause<Run, Fut>(name: &'static str, run: Run, pause: Duration) -> Service
    where
        Run: Fn() -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let stop = CancellationToken::new();
        let stopping = stop.clone();
        let task = tokio::spawn(async move {
            loop {
                let mut running = tokio::spawn(run());
                let ended = tokio::select! {
                    ended = &mut running => ended,
                    () = stopping.cancelled() => {
                        running.abort();
                        let _ = running.await;
                        return;
                    }
                };
                let Err(failure) = ended else {
                    return;
                };
                let why = panic_message(failure);
                metrics::counter!(RESTARTS, "service" => name).increment(1);
                tracing::error!(
                    service = name,
                    panic = %why,
                    "background service panicked; starting it again in {}s",
                    pause.as_secs_f64()
                );
                tokio::select! {
                    () = tokio::time::sleep(pause) => {}
                    () = stopping.cancelled() => return,
                }
            }
        });
        Service { stop, task }
    }

    /// Stops the service: its run is cut off where it waits, and waited for, so that nothing it
    /// does happens after this returns.
    pub async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

/// What a run's failure said: its panic's message, or that it was cancelled.
fn panic_message(failure: tokio::task::JoinError) -> String {
    if !failure.is_panic() {
        return "cancelled".into();
    }
    let payload = failure.into_panic();
    if let Some(message) = payload.downcast_ref::<&str>() {
        (*message).to_owned()
    } else if let Some(message) = payload.downcast_ref::<String>() {
        message.clone()
    } else {
        "a panic without a message".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    /// A service whose first two runs panic runs a third time, and one that ends is not run again.
    #[tokio::test(start_paused = true)]
    async fn a_service_that_panics_runs_again_and_one_that_ends_does_not() {
        let runs = Arc::new(AtomicUsize::new(0));
        let counted = runs.clone();
        let service = Service::start_with_pause(
            "test",
            move || {
                let run = counted.fetch_add(1, Ordering::SeqCst) + 1;
                async move {
                    if run <= 2 {
                        panic!("run {run} fails");
                    }
                }
            },
            Duration::from_millis(10),
        );
        tokio::time::timeout(Duration::from_secs(5), service.task)
            .await
            .expect("the service ends once a run ends")
            .expect("the supervisor itself never panics");
        assert_eq!(runs.load(Ordering::SeqCst), 3);
    }

    /// Stopping cuts off a run that would otherwise go on for ever, and waits for it: what the
    /// run holds is dropped by the time `stop` returns.
    #[tokio::test(start_paused = true)]
    async fn stopping_a_service_ends_its_run_before_it_returns() {
        let held = Arc::new(());
        let holder = held.clone();
        let service = Service::start("test", move || {
            let holder = holder.clone();
            async move {
                let _holding = holder;
                std::future::pending::<()>().await
            }
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(Arc::strong_count(&held), 3, "the run holds its copy");
        service.stop().await;
        assert_eq!(
            Arc::strong_count(&held),
            1,
            "the run and its maker are gone"
        );
    }

    /// A service stopped while it waits to run again after a panic stops at once.
    #[tokio::test(start_paused = true)]
    async fn a_service_waiting_to_run_again_stops_at_once() {
        let service = Service::start_with_pause(
            "test",
            || async { panic!("always") },
            Duration::from_secs(3_600),
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
        tokio::time::timeout(Duration::from_secs(1), service.stop())
            .await
            .expect("stopped without waiting out the pause");
    }
}

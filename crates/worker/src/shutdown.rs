//! Ending the worker: the first SIGTERM/SIGINT stops claiming and lets running programs finish within the
//! drain timeout, after which they are terminated (SIGTERM, grace, SIGKILL) and their stops confirmed; a
//! second signal forces (programs killed at once, what is left of their items' stops within 1 s, non-zero exit).

use std::sync::Arc;
use std::time::Duration;

use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

use crate::status::Reporter;
use crate::{Error, Phase};

/// Moves the worker to `next` unless it is already further along; phases never go back.
pub fn advance(phase: &watch::Sender<Phase>, next: Phase) {
    phase.send_if_modified(|current| {
        let later = next > *current;
        if later {
            *current = next;
        }
        later
    });
}

/// Installs the handlers now (so that a signal during start-up is not fatal) and acts on them.
pub fn watch_signals(
    phase: Arc<watch::Sender<Phase>>,
    report: Reporter,
    drain_timeout: Duration,
) -> Result<JoinHandle<()>, Error> {
    let mut term = signal(SignalKind::terminate())
        .map_err(|e| Error::config(format!("cannot handle SIGTERM: {e}")))?;
    let mut int = signal(SignalKind::interrupt())
        .map_err(|e| Error::config(format!("cannot handle SIGINT: {e}")))?;
    // SIGHUP is caught and ignored, as under `nohup`: its default would end the worker at once, without
    // a drain, killing its programs, whether a terminal went away or an operator sent it to every
    // `tether` process after renewing the server's certificate.
    let mut hangup = signal(SignalKind::hangup())
        .map_err(|e| Error::config(format!("cannot handle SIGHUP: {e}")))?;
    let ignoring = report.clone();
    tokio::spawn(async move {
        while hangup.recv().await.is_some() {
            ignoring.info("SIGHUP ignored: SIGTERM or Ctrl-C stops the worker", &[]);
        }
    });
    Ok(tokio::spawn(async move {
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        report.info(
            &format!(
                "{name}: taking no new work; running programs get {}s to finish (signal again to stop at once)",
                drain_timeout.as_secs_f64()
            ),
            &[],
        );
        advance(&phase, Phase::Draining);
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        report.warn(
            &format!("{name} again: killing programs and force-stopping their items"),
            &[],
        );
        advance(&phase, Phase::Forced);
    }))
}

/// Waits for every task, the items' supervisors and, while `asking` is set, the ask for a lost
/// claim's item among them; once `timeout` has passed, tells them to terminate their programs.
pub async fn drain(
    tasks: &mut JoinSet<()>,
    phase: &watch::Sender<Phase>,
    timeout: Duration,
    report: &Reporter,
    asking: &std::sync::atomic::AtomicBool,
) {
    let running = still_running(tasks);
    if running == 0 {
        return;
    }
    // Read after the count: set now, the ask's task is still there, and was counted.
    let asking = asking.load(std::sync::atomic::Ordering::Relaxed);
    report.info(&drain_message(running, asking, timeout), &[]);
    let deadline = tokio::time::sleep(timeout);
    tokio::pin!(deadline);
    let mut terminating = false;
    loop {
        tokio::select! {
            joined = tasks.join_next() => {
                if joined.is_none() {
                    return;
                }
            }
            _ = &mut deadline, if !terminating => {
                terminating = true;
                advance(phase, Phase::Terminating);
            }
        }
    }
}

/// What the drain waits for, said as it begins: `tasks` still running, one of them the ask for a lost
/// claim's item when `asking`. (How to stop at once is said where the drain is asked for: a drain
/// after a fatal refusal was asked for by no signal.)
fn drain_message(tasks: usize, asking: bool, timeout: Duration) -> String {
    let items = tasks.saturating_sub(usize::from(asking));
    let waiting = match (items, asking) {
        (_, false) => format!("{items} item(s) running to finish"),
        (0, true) => "the item of a claim whose answer was lost, should it come".to_owned(),
        (_, true) => format!(
            "{items} item(s) running to finish, and for the item of a claim whose answer was lost"
        ),
    };
    format!("waiting up to {}s for {waiting}", timeout.as_secs_f64())
}

/// How many supervisors have not ended. A finished task stays in the set until it is joined, and the
/// claim loop joins them only before each poll: the ones that ended since are taken out here, so that
/// an item whose program already stopped is not counted as running.
fn still_running(tasks: &mut JoinSet<()>) -> usize {
    while tasks.try_join_next().is_some() {}
    tasks.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_drain_says_what_it_waits_for() {
        let minute = Duration::from_secs(60);
        for (tasks, asking, says) in [
            (
                2,
                false,
                "waiting up to 60s for 2 item(s) running to finish",
            ),
            (
                1,
                true,
                "waiting up to 60s for the item of a claim whose answer was lost, should",
            ),
            (
                3,
                true,
                "for 2 item(s) running to finish, and for the item of a claim whose",
            ),
        ] {
            let message = drain_message(tasks, asking, minute);
            assert!(message.contains(says), "{tasks} {asking}: {message}");
        }
    }

    #[test]
    fn phases_only_move_forward() {
        let (tx, rx) = watch::channel(Phase::Running);
        advance(&tx, Phase::Terminating);
        advance(&tx, Phase::Draining);
        assert_eq!(*rx.borrow(), Phase::Terminating);
        advance(&tx, Phase::Forced);
        assert_eq!(*rx.borrow(), Phase::Forced);
    }

    #[tokio::test(start_paused = true)]
    async fn an_item_that_ended_is_not_counted_as_running() {
        let mut tasks = JoinSet::new();
        tasks.spawn(async {});
        tasks.spawn(tokio::time::sleep(Duration::from_secs(5)));
        // The first ends; nobody has joined it yet.
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert_eq!(still_running(&mut tasks), 1);
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(still_running(&mut tasks), 0);
    }

    /// On tokio's paused clock: items that finish within the drain timeout are waited for; one that
    /// does not is told to terminate exactly when the timeout is up, and the drain ends once it did.
    #[tokio::test(start_paused = true)]
    async fn the_drain_waits_then_terminates_what_is_left() {
        let report = Reporter::new(crate::LogFormat::Json, 2);
        let (tx, rx) = watch::channel(Phase::Draining);
        let start = tokio::time::Instant::now();
        let timeout = Duration::from_secs(60);
        let mut tasks = JoinSet::new();
        // One item finishes on its own after 5 s.
        tasks.spawn(tokio::time::sleep(Duration::from_secs(5)));
        // One ignores the drain and ends 2 s after it is told to terminate.
        let mut told = rx.clone();
        tasks.spawn(async move {
            crate::reached(&mut told, Phase::Terminating).await;
            tokio::time::sleep(Duration::from_secs(2)).await;
        });
        drain(&mut tasks, &tx, timeout, &report, &Default::default()).await;
        assert!(tasks.is_empty());
        assert_eq!(*rx.borrow(), Phase::Terminating);
        assert_eq!(start.elapsed(), timeout + Duration::from_secs(2));
    }

    #[tokio::test(start_paused = true)]
    async fn a_drain_with_nothing_left_terminates_nothing() {
        let report = Reporter::new(crate::LogFormat::Json, 1);
        let (tx, rx) = watch::channel(Phase::Draining);
        let mut tasks = JoinSet::new();
        tasks.spawn(tokio::time::sleep(Duration::from_secs(1)));
        let asking = Default::default();
        drain(&mut tasks, &tx, Duration::from_secs(60), &report, &asking).await;
        assert_eq!(*rx.borrow(), Phase::Draining);
    }
}

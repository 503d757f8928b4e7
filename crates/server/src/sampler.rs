//! The queue sampler: every `sample_interval` it reads the statistics of each environment with a work
//! queue and keeps them in a bounded ring per environment, so that the dashboard can draw queue depth
//! and active items over the last hour (`GET …/work/stats/history`) and a page reload loses nothing.
//!
//! The samples live in this process's memory, not in the store: every process samples the shared
//! store, so with several servers on one PostgreSQL database each ring holds the same cluster-wide
//! figures and any server may answer. A server that has just started has a short ring; that is the only
//! difference, and a chart is no place for correctness. Keeping them out of the store also costs no
//! write (and, on the embedded store, no fsync) per tick.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use tether_core::{Timestamp, WorkState};
use tether_store::{ArchiveFilter, Cursor, PageRequest};

use crate::service::App;

/// How far back the rings reach.
pub const RETENTION: Duration = Duration::from_secs(60 * 60);
/// Environments sampled per tick at most; beyond that the oldest environments are sampled and a
/// warning says so (a chart per environment for thousands of environments is not what this is for).
pub const MAX_ENVIRONMENTS: usize = 1_000;
/// Environments read per page while listing them.
const LIST_PAGE: u32 = 100;

/// One reading of an environment's queue.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sample {
    pub at: Timestamp,
    pub depth: u64,
    pub pending: u64,
    pub starting: u64,
    pub active: u64,
    pub stopping: u64,
    pub workers_polling: u64,
}

/// The rings, one per environment, each at most `capacity` samples long.
pub struct QueueHistory {
    capacity: usize,
    rings: Mutex<HashMap<String, VecDeque<Sample>>>,
}

impl QueueHistory {
    /// Rings long enough to cover [`RETENTION`] at one sample per `interval`.
    pub fn new(interval: Duration) -> QueueHistory {
        let interval = interval.max(Duration::from_millis(100));
        let capacity = (RETENTION.as_millis() / interval.as_millis()) as usize + 1;
        QueueHistory {
            capacity: capacity.min(36_001),
            rings: Mutex::new(HashMap::new()),
        }
    }

    fn record(&self, environment_id: &str, sample: Sample) {
        let mut rings = self.rings.lock().expect("queue history lock");
        let ring = rings.entry(environment_id.to_owned()).or_default();
        ring.push_back(sample);
        while ring.len() > self.capacity {
            ring.pop_front();
        }
        debug_assert!(ring.len() <= self.capacity);
    }

    /// Drops the rings of environments that were not sampled in the last pass (deleted or archived).
    fn retain(&self, sampled: &HashSet<String>) {
        let mut rings = self.rings.lock().expect("queue history lock");
        rings.retain(|env, _| sampled.contains(env));
    }

    /// The samples of one environment taken at or after `since`, oldest first.
    pub fn since(&self, environment_id: &str, since: Timestamp) -> Vec<Sample> {
        let rings = self.rings.lock().expect("queue history lock");
        rings
            .get(environment_id)
            .map(|ring| ring.iter().filter(|s| s.at >= since).cloned().collect())
            .unwrap_or_default()
    }
}

/// The sampler's loop, until the server shuts down (run as a service: `crate::services`).
pub async fn run(app: App) {
    let mut tick = tokio::time::interval(app.config.sample_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                if let Err(e) = pass(&app).await {
                    crate::services::duty_failed("sampler: queue sampling", &e);
                }
            }
            _ = app.until_shutdown() => return,
        }
    }
}

/// One sample of every environment with a work queue that is not archived.
pub async fn pass(app: &App) -> crate::service::Result<()> {
    let mut environments = Vec::new();
    let mut page = PageRequest::first(LIST_PAGE);
    loop {
        let listed = app
            .store
            .list_environments(&ArchiveFilter::default(), &page)
            .await?;
        let last = listed.items.last().map(|e| e.id.clone());
        environments.extend(listed.items.into_iter().filter(|e| e.is_self_hosted()));
        match last {
            Some(id) if listed.has_more && environments.len() < MAX_ENVIRONMENTS => {
                page.cursor = Cursor::After(id);
            }
            _ => break,
        }
    }
    if environments.len() > MAX_ENVIRONMENTS {
        tracing::warn!(
            limit = MAX_ENVIRONMENTS,
            "sampler: more environments than it samples; the newest have no queue history"
        );
        environments.truncate(MAX_ENVIRONMENTS);
    }
    // Settle due leases once, so that no sample counts an expired lease as live.
    app.expire_due_leases().await?;
    // And write the poll records waiting for the tick, so that `workers_polling` counts them.
    app.write_worker_records().await?;
    let now = app.now();
    let polling_since = now.minus_millis(app.config.workers_polling_window_ms);
    let mut sampled = HashSet::with_capacity(environments.len());
    for env in &environments {
        let counts = app.store.queue_counts(&env.id).await?;
        let workers_polling = app
            .store
            .workers_seen(&env.id, polling_since, app.workers_listed_at_most())
            .await?
            .len() as u64;
        let count = |state: WorkState| counts.states.get(&state).copied().unwrap_or(0);
        app.queue_history.record(
            &env.id,
            Sample {
                at: now,
                depth: counts.depth,
                pending: counts.pending,
                starting: count(WorkState::Starting),
                active: count(WorkState::Active),
                stopping: count(WorkState::Stopping),
                workers_polling,
            },
        );
        sampled.insert(env.id.clone());
    }
    app.queue_history.retain(&sampled);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(at_ms: i64) -> Sample {
        Sample {
            at: Timestamp::from_micros(at_ms * 1000),
            depth: 1,
            pending: 0,
            starting: 0,
            active: 0,
            stopping: 0,
            workers_polling: 0,
        }
    }

    #[test]
    fn a_ring_keeps_one_hour_and_no_more() {
        let history = QueueHistory::new(Duration::from_secs(10));
        assert_eq!(history.capacity, 361);
        for i in 0..1000 {
            history.record("env_a", sample(i * 10_000));
        }
        let kept = history.since("env_a", Timestamp::from_micros(0));
        assert_eq!(kept.len(), 361);
        assert_eq!(
            kept[0].at,
            Timestamp::from_micros((1000 - 361) * 10_000 * 1000)
        );
        assert_eq!(
            history
                .since("env_a", Timestamp::from_micros(999 * 10_000 * 1000))
                .len(),
            1
        );
    }

    #[test]
    fn rings_of_environments_no_longer_sampled_are_dropped() {
        let history = QueueHistory::new(Duration::from_secs(10));
        history.record("env_a", sample(0));
        history.record("env_b", sample(0));
        history.retain(&HashSet::from(["env_b".to_owned()]));
        assert!(history.since("env_a", Timestamp::from_micros(0)).is_empty());
        assert_eq!(history.since("env_b", Timestamp::from_micros(0)).len(), 1);
    }
}

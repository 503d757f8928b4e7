//! Which polls this process records for `workers_polling` and `GET …/workers` (§11.4), and which it
//! leaves out.
//!
//! A worker id is whatever the poll's `Worker-ID` header says, so a caller with an environment key
//! can make up a new one on every poll. Recorded without a bound, each would be a row for the
//! listing window (5 minutes): one key made 225,000 in 20 s, and every listing and every queue-stats
//! read loaded them all. So each environment may have at most [`MAX_WORKERS_PER_ENVIRONMENT`]
//! distinct workers recorded by this process within the window; the polls of further ones are served
//! as ever, but not recorded until older ones age out. Only the environment whose key made them up
//! is affected. The store's reads are capped at the same number (a cluster's processes may each
//! record that many).

use std::collections::HashMap;

use tether_core::time::Timestamp;

/// Distinct workers per environment that one process records within the listing window, and that a
/// listing or count reads at most.
pub const MAX_WORKERS_PER_ENVIRONMENT: usize = 10_000;

/// When an environment's full list may be swept for workers gone from the window again: a sweep
/// walks the whole list, so a stream of made-up ids pays for one a second at most.
const SWEEP_INTERVAL_MS: i64 = 1_000;

/// What one environment's recorded workers are.
#[derive(Default)]
struct Environment {
    last_recorded: HashMap<String, Timestamp>,
    swept_at: Option<Timestamp>,
}

/// The polls this process recorded lately, per environment and worker.
pub struct WorkerRecords {
    environments: HashMap<String, Environment>,
    /// Polls of one worker closer together than this are recorded once.
    interval_ms: i64,
    /// How long a worker stays in the list after its last recorded poll.
    window_ms: i64,
    cap: usize,
}

/// What to do with one poll.
#[derive(Debug, PartialEq, Eq)]
pub enum Record {
    /// Record it (write it at the next tick).
    Write,
    /// The worker's poll was recorded less than the interval ago.
    Recent,
    /// The environment has as many workers recorded as it may have.
    Full,
}

impl WorkerRecords {
    pub fn new(interval_ms: i64, window_ms: i64, cap: usize) -> WorkerRecords {
        assert!(0 < interval_ms && interval_ms <= window_ms && cap > 0);
        WorkerRecords {
            environments: HashMap::new(),
            interval_ms,
            window_ms,
            cap,
        }
    }

    /// Decides about a poll of `worker_id` in `environment_id` at `now`, and remembers it if it is
    /// to be written.
    pub fn poll(&mut self, environment_id: &str, worker_id: &str, now: Timestamp) -> Record {
        let (interval_ms, window_ms, cap) = (self.interval_ms, self.window_ms, self.cap);
        // Looked up before it is inserted: every poll comes here, and `entry` would copy the id each
        // time.
        let environment = match self.environments.get_mut(environment_id) {
            Some(environment) => environment,
            None => self
                .environments
                .entry(environment_id.to_owned())
                .or_default(),
        };
        match environment.last_recorded.get_mut(worker_id) {
            Some(at) if now.millis_since(*at) < interval_ms => return Record::Recent,
            Some(at) => {
                *at = now;
                return Record::Write;
            }
            None => {}
        }
        if environment.last_recorded.len() >= cap {
            let due = environment
                .swept_at
                .is_none_or(|at| now.millis_since(at) >= SWEEP_INTERVAL_MS);
            if !due {
                return Record::Full;
            }
            environment.swept_at = Some(now);
            environment
                .last_recorded
                .retain(|_, at| now.millis_since(*at) < window_ms);
            if environment.last_recorded.len() >= cap {
                return Record::Full;
            }
        }
        environment.last_recorded.insert(worker_id.to_owned(), now);
        debug_assert!(environment.last_recorded.len() <= cap);
        Record::Write
    }

    /// Forgets every worker whose last recorded poll is out of the window, and every environment
    /// left with none (the dispatcher's tick, with the store's own forgetting).
    pub fn forget_aged(&mut self, now: Timestamp) {
        let window_ms = self.window_ms;
        self.environments.retain(|_, environment| {
            environment
                .last_recorded
                .retain(|_, at| now.millis_since(*at) < window_ms);
            !environment.last_recorded.is_empty()
        });
    }

    /// How many workers are remembered, over all environments.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.environments
            .values()
            .map(|e| e.last_recorded.len())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ms: i64) -> Timestamp {
        Timestamp::from_micros(1_700_000_000_000_000 + ms * 1_000)
    }

    #[test]
    fn a_worker_is_recorded_once_per_interval() {
        let mut records = WorkerRecords::new(1_000, 60_000, 10);
        assert_eq!(records.poll("env_a", "w1", at(0)), Record::Write);
        assert_eq!(records.poll("env_a", "w1", at(999)), Record::Recent);
        assert_eq!(records.poll("env_a", "w1", at(1_000)), Record::Write);
        // Another environment's worker of the same name is another worker.
        assert_eq!(records.poll("env_b", "w1", at(1_000)), Record::Write);
    }

    #[test]
    fn an_environment_full_of_made_up_workers_records_no_more_until_they_age_out() {
        let mut records = WorkerRecords::new(1_000, 60_000, 3);
        for (i, w) in ["w1", "w2", "w3"].into_iter().enumerate() {
            assert_eq!(records.poll("env_a", w, at(i as i64)), Record::Write);
        }
        assert_eq!(records.poll("env_a", "w4", at(10)), Record::Full);
        // Workers already recorded go on being recorded, and other environments are untouched.
        assert_eq!(records.poll("env_a", "w1", at(2_000)), Record::Write);
        assert_eq!(records.poll("env_b", "w4", at(2_000)), Record::Write);
        // Once the others are out of the window, there is room again (at the next sweep).
        assert_eq!(records.poll("env_a", "w4", at(60_500)), Record::Write);
        assert_eq!(records.poll("env_a", "w5", at(60_600)), Record::Write);
        assert_eq!(records.poll("env_a", "w6", at(60_700)), Record::Full);
        assert_eq!(records.len(), 4);
    }

    #[test]
    fn a_full_environment_is_swept_at_most_once_a_second() {
        let mut records = WorkerRecords::new(1_000, 5_000, 2);
        records.poll("env_a", "w1", at(0));
        records.poll("env_a", "w2", at(0));
        assert_eq!(records.poll("env_a", "w3", at(4_500)), Record::Full);
        // Both aged out by 5,000, but the last sweep was at 4,500.
        assert_eq!(records.poll("env_a", "w3", at(5_100)), Record::Full);
        assert_eq!(records.poll("env_a", "w3", at(5_500)), Record::Write);
    }

    #[test]
    fn forgetting_drops_aged_workers_and_empty_environments() {
        let mut records = WorkerRecords::new(1_000, 5_000, 10);
        records.poll("env_a", "w1", at(0));
        records.poll("env_b", "w1", at(3_000));
        records.forget_aged(at(5_000));
        assert_eq!(records.len(), 1);
        assert_eq!(records.environments.len(), 1);
        records.forget_aged(at(8_000));
        assert_eq!(records.len(), 0);
        assert!(records.environments.is_empty());
    }
}

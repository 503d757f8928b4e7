//! Long-poll wake-ups cost the store a bounded number of queue scans: one enqueue with many polls
//! waiting makes each woken poll scan about once, instead of handing a fruitless wake-up round the
//! waiters for as long as they wait. On a shared database every scan is a round trip, so this is what
//! lets many workers wait on several servers.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::json;
use tether_core::resources::{Agent, Credential, CredentialKind, Environment, Session};
use tether_core::{ManualClock, SystemClock, Timestamp, WorkItem};
use tether_server::service::environments::NewEnvironment;
use tether_server::{App, ServiceConfig};
use tether_store::{
    ArchiveFilter, ChangeSet, HistoryRow, Notice, Page, PageRequest, QueueCounts, SessionFilter,
    Store, StoreResult, Versioned, WorkFilter,
};
use tether_testkit::{backends, StoreLocation};

// The queue is empty throughout; agents and sessions are not needed.

/// A store that counts queue scans.
struct Counting {
    inner: Arc<dyn Store>,
    scans: AtomicU64,
}

#[async_trait]
impl Store for Counting {
    fn backend(&self) -> &'static str {
        self.inner.backend()
    }
    async fn commit(&self, changes: ChangeSet) -> StoreResult<()> {
        self.inner.commit(changes).await
    }
    async fn announce(&self, notices: Vec<Notice>) -> StoreResult<()> {
        self.inner.announce(notices).await
    }
    fn subscribe(&self) -> tokio::sync::broadcast::Receiver<Notice> {
        self.inner.subscribe()
    }
    fn reconnections(&self) -> u64 {
        self.inner.reconnections()
    }
    fn losses(&self) -> u64 {
        self.inner.losses()
    }
    fn in_outage(&self) -> bool {
        self.inner.in_outage()
    }
    async fn ping(&self) -> StoreResult<()> {
        self.inner.ping().await
    }
    async fn get_environment(&self, id: &str) -> StoreResult<Option<Versioned<Environment>>> {
        self.inner.get_environment(id).await
    }
    async fn list_environments(
        &self,
        filter: &ArchiveFilter,
        page: &PageRequest,
    ) -> StoreResult<Page<Environment>> {
        self.inner.list_environments(filter, page).await
    }
    async fn count_sessions_in_environment(&self, environment_id: &str) -> StoreResult<u64> {
        self.inner
            .count_sessions_in_environment(environment_id)
            .await
    }
    async fn get_agent(&self, id: &str) -> StoreResult<Option<Versioned<Agent>>> {
        self.inner.get_agent(id).await
    }
    async fn get_agent_version(&self, id: &str, version: u32) -> StoreResult<Option<Agent>> {
        self.inner.get_agent_version(id, version).await
    }
    async fn list_agents(
        &self,
        filter: &ArchiveFilter,
        page: &PageRequest,
    ) -> StoreResult<Page<Agent>> {
        self.inner.list_agents(filter, page).await
    }
    async fn get_session(&self, id: &str) -> StoreResult<Option<Versioned<Session>>> {
        self.inner.get_session(id).await
    }
    async fn list_sessions(
        &self,
        filter: &SessionFilter,
        page: &PageRequest,
    ) -> StoreResult<Page<Session>> {
        self.inner.list_sessions(filter, page).await
    }
    async fn list_events(
        &self,
        session_id: &str,
        page: &PageRequest,
        max_bytes: usize,
    ) -> StoreResult<Page<tether_store::EventDoc>> {
        self.inner.list_events(session_id, page, max_bytes).await
    }
    async fn get_work(&self, id: &str) -> StoreResult<Option<Versioned<WorkItem>>> {
        self.inner.get_work(id).await
    }
    async fn get_work_with_session(
        &self,
        id: &str,
    ) -> StoreResult<Option<tether_store::WorkWithSession>> {
        self.inner.get_work_with_session(id).await
    }
    async fn list_work(
        &self,
        environment_id: &str,
        filter: &WorkFilter,
        page: &PageRequest,
    ) -> StoreResult<Page<WorkItem>> {
        self.inner.list_work(environment_id, filter, page).await
    }
    async fn claim_candidates(
        &self,
        environment_id: &str,
        reclaim_cutoff: Timestamp,
        limit: u32,
    ) -> StoreResult<Vec<tether_store::Candidate>> {
        self.scans.fetch_add(1, Ordering::SeqCst);
        self.inner
            .claim_candidates(environment_id, reclaim_cutoff, limit)
            .await
    }
    async fn live_work_for_session(
        &self,
        session_id: &str,
    ) -> StoreResult<Option<Versioned<WorkItem>>> {
        self.inner.live_work_for_session(session_id).await
    }
    async fn leased_work_in_environment(&self, environment_id: &str) -> StoreResult<Vec<WorkItem>> {
        self.inner.leased_work_in_environment(environment_id).await
    }
    async fn leases_due_before(
        &self,
        before: Timestamp,
        limit: u32,
    ) -> StoreResult<Vec<Versioned<WorkItem>>> {
        self.inner.leases_due_before(before, limit).await
    }
    async fn queue_counts(&self, environment_id: &str) -> StoreResult<QueueCounts> {
        self.inner.queue_counts(environment_id).await
    }
    async fn work_by_token_hash(
        &self,
        token_hash: &str,
    ) -> StoreResult<Option<Versioned<WorkItem>>> {
        self.inner.work_by_token_hash(token_hash).await
    }
    async fn list_history(
        &self,
        work_id: &str,
        after_seq: Option<i64>,
        limit: u32,
    ) -> StoreResult<Page<HistoryRow>> {
        self.inner.list_history(work_id, after_seq, limit).await
    }
    async fn workers_seen(
        &self,
        environment_id: &str,
        since: Timestamp,
    ) -> StoreResult<Vec<(String, Timestamp)>> {
        self.inner.workers_seen(environment_id, since).await
    }
    async fn credential_by_hash(&self, secret_hash: &str) -> StoreResult<Option<Credential>> {
        self.inner.credential_by_hash(secret_hash).await
    }
    async fn get_credential(&self, id: &str) -> StoreResult<Option<Credential>> {
        self.inner.get_credential(id).await
    }
    async fn list_credentials(
        &self,
        kind: CredentialKind,
        environment_id: Option<&str>,
        page: &PageRequest,
    ) -> StoreResult<Page<Credential>> {
        self.inner
            .list_credentials(kind, environment_id, page)
            .await
    }
    async fn count_credentials(&self, kind: CredentialKind) -> StoreResult<u64> {
        self.inner.count_credentials(kind).await
    }
}

/// In a cluster a notice often arrives for an item that a poll elsewhere has already taken: the
/// woken poll finds nothing. That wake-up must end with its scan, not travel on to the next waiter,
/// which would find nothing either and pass it on again, a query each time, until the polls end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fruitless_wake_up_costs_one_scan() {
    const WAITERS: u64 = 8;
    for backend in backends() {
        let (_location, app, counting, env) =
            counting_app(&backend, Arc::new(SystemClock), "wakeups").await;

        let polls: Vec<_> = (0..WAITERS)
            .map(|i| {
                let (app, env) = (app.clone(), env.clone());
                tokio::spawn(async move {
                    let worker = format!("w{i}");
                    app.poll(
                        &env,
                        Some(&worker),
                        None,
                        Some(Duration::from_millis(999)),
                        5_000,
                    )
                    .await
                    .expect("poll")
                })
            })
            .collect();
        // Until every poll is waiting (after one scan at least: those that came after a scan found
        // the queue empty wait without one of their own).
        while counting.scans.load(Ordering::SeqCst) < 1 || app.waiters.count() < WAITERS as usize {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let before = counting.scans.load(Ordering::SeqCst);
        assert_eq!(app.waiters.wake(&env.id, 1), 1);
        for poll in polls {
            assert!(poll.await.expect("poll task").is_none());
        }
        let scans = counting.scans.load(Ordering::SeqCst) - before;
        assert!(
            scans <= 2,
            "{}: one fruitless wake-up made {scans} queue scans with {WAITERS} polls waiting",
            backend.name()
        );
        app.begin_shutdown();
    }
}

/// Idle workers re-poll about once a second (`block_ms` is at most 999). A scan that found the queue
/// empty spares the re-polls after it a scan of their own until something is announced, and an
/// enqueue is still delivered to a parked poll at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_re_polls_wait_without_scanning() {
    const ROUNDS: u64 = 5;
    for backend in backends() {
        // The server's clock stands still, so a scan mark cannot age out during the test.
        let clock = ManualClock::new(Timestamp::from_micros(1_700_000_000_000_000));
        let (_location, app, counting, env) =
            counting_app(&backend, Arc::new(clock), "parked").await;
        for _ in 0..ROUNDS {
            let got = app
                .poll(
                    &env,
                    Some("idle"),
                    None,
                    Some(Duration::from_millis(20)),
                    5_000,
                )
                .await
                .expect("poll");
            assert!(got.is_none());
        }
        let scans = counting.scans.load(Ordering::SeqCst);
        // The server's clock stands still here, so the mark cannot age out between the rounds.
        assert_eq!(
            scans,
            1,
            "{}: {ROUNDS} idle polls in a row scanned {scans} times",
            backend.name()
        );
        // Anything that wakes the environment's waiters ends the mark: a woken parked poll scans.
        let waiting = {
            let (app, env) = (app.clone(), env.clone());
            tokio::spawn(async move {
                app.poll(
                    &env,
                    Some("idle"),
                    None,
                    Some(Duration::from_millis(999)),
                    5_000,
                )
                .await
                .expect("poll")
            })
        };
        for _ in 0..2_000 {
            if app.waiters.count() >= 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let before = counting.scans.load(Ordering::SeqCst);
        app.waiters.wake(&env.id, 1);
        assert!(waiting.await.expect("poll task").is_none());
        assert!(
            counting.scans.load(Ordering::SeqCst) > before,
            "{}: a woken poll scans",
            backend.name()
        );
        app.begin_shutdown();
    }
}

/// An app over a fresh store of `backend` that counts claim scans, with no periodic dispatcher pass
/// (every scan counted comes from the test), and one self-hosted environment named `name`.
async fn counting_app(
    backend: &tether_testkit::Backend,
    clock: Arc<dyn tether_core::Clock>,
    name: &str,
) -> (StoreLocation, App, Arc<Counting>, Environment) {
    let location = StoreLocation::fresh(backend).await.expect("store");
    let counting = Arc::new(Counting {
        inner: location.open().await.expect("open"),
        scans: AtomicU64::new(0),
    });
    let app = App::new(
        counting.clone(),
        clock,
        ServiceConfig {
            tick: Duration::from_secs(3600),
            ..ServiceConfig::default()
        },
    );
    let env = app
        .create_environment(
            NewEnvironment {
                name: name.into(),
                config: Some(json!({"type": "self_hosted"})),
                ..NewEnvironment::default()
            },
            None,
        )
        .await
        .expect("environment");
    // The location goes back too: a SQLite one is a directory that must outlive the store.
    (location, app, counting, env)
}

//! A store that counts some of its calls and can be switched off as if its database went away, and an
//! app over it: for tests of how many store round trips an operation costs, and of what happens
//! around an outage.
#![allow(dead_code)] // Each test binary uses part of it.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::json;
use tether_core::lease::LeaseKeeperMark;
use tether_core::resources::{Agent, Credential, CredentialKind, Environment, Session};
use tether_core::{Timestamp, WorkItem};
use tether_server::service::environments::NewEnvironment;
use tether_server::{App, ServiceConfig};
use tether_store::{
    ArchiveFilter, ChangeSet, HistoryRow, Notice, Page, PageRequest, QueueCounts, SessionFilter,
    Store, StoreResult, Versioned, WorkFilter,
};
use tether_testkit::StoreLocation;

impl Counting {
    /// Item and session reads so far.
    pub fn reads(&self) -> u64 {
        self.item_reads.load(Ordering::SeqCst)
    }
}

/// A store that counts queue scans and reads of single work items and sessions.
pub struct Counting {
    inner: Arc<dyn Store>,
    /// `claim_candidates` calls.
    pub scans: AtomicU64,
    /// `get_work`, `get_work_with_session` and `get_session` calls.
    pub item_reads: AtomicU64,
    /// `get_agent` calls.
    pub agent_reads: AtomicU64,
    /// `queue_counts` calls.
    pub queue_counts: AtomicU64,
    /// While set, `queue_counts` does not answer (a database that is slow to).
    pub queue_counts_stalled: AtomicBool,
    /// While set, commits and the work reads fail as `Unavailable`, and the losses and
    /// reconnections are counted as a real backend counts them (a reconnection when a call
    /// succeeds again).
    pub down: AtomicBool,
    lost: AtomicBool,
    losses: AtomicU64,
    reconnections: AtomicU64,
    recovering: std::sync::Mutex<()>,
    /// While set, the next commit is made, and then answered as one whose connection was lost after
    /// it went out for its commit (`OutcomeUnknown`); the flag is cleared by that commit.
    pub answer_lost: AtomicBool,
    /// Set by [`Counting::hold_next_commit`]: the next commit waits here until the hold is released.
    held_commit: std::sync::Mutex<Option<CommitHold>>,
    /// Set by [`Counting::hold_next_scan`]: the next `claim_candidates` waits the same way.
    held_scan: std::sync::Mutex<Option<CommitHold>>,
}

/// The next commit's hold: it says when the commit has arrived, then waits for the release.
struct CommitHold {
    arrived: tokio::sync::oneshot::Sender<()>,
    released: tokio::sync::oneshot::Receiver<()>,
}

/// A held commit, from [`Counting::hold_next_commit`].
pub struct HeldCommit {
    pub arrived: tokio::sync::oneshot::Receiver<()>,
    pub release: tokio::sync::oneshot::Sender<()>,
}

impl Counting {
    /// Holds the next commit, whoever makes it, before it reaches the database: `arrived` fires
    /// when it comes, and it goes on once `release` is sent (or dropped).
    pub fn hold_next_commit(&self) -> HeldCommit {
        Self::hold(&self.held_commit)
    }

    /// Holds the next queue scan (`claim_candidates`) as [`Counting::hold_next_commit`] holds a
    /// commit: a read that the database is slow to answer.
    pub fn hold_next_scan(&self) -> HeldCommit {
        Self::hold(&self.held_scan)
    }

    fn hold(slot: &std::sync::Mutex<Option<CommitHold>>) -> HeldCommit {
        let (arrived_tx, arrived) = tokio::sync::oneshot::channel();
        let (release, released) = tokio::sync::oneshot::channel();
        *slot.lock().expect("hold lock") = Some(CommitHold {
            arrived: arrived_tx,
            released,
        });
        HeldCommit { arrived, release }
    }

    /// Waits at the hold in `slot`, if one is set, and clears it.
    async fn wait_at(slot: &std::sync::Mutex<Option<CommitHold>>) {
        let hold = slot.lock().expect("hold lock").take();
        if let Some(hold) = hold {
            let _ = hold.arrived.send(());
            let _ = hold.released.await;
        }
    }

    /// Counts the reconnection of the outage under way and stops there: the moment a real
    /// backend passes through between counting it and ending the outage.
    pub fn count_the_reconnection_only(&self) {
        assert!(self.lost.load(Ordering::SeqCst), "no outage under way");
        self.reconnections.fetch_add(1, Ordering::SeqCst);
    }

    fn before_call(&self) -> StoreResult<()> {
        if self.down.load(Ordering::SeqCst) {
            if !self.lost.swap(true, Ordering::SeqCst) {
                self.losses.fetch_add(1, Ordering::SeqCst);
            }
            return Err(tether_store::StoreError::Unavailable(
                "the database is switched off".into(),
            ));
        }
        Ok(())
    }

    fn after_call<T>(&self, outcome: StoreResult<T>) -> StoreResult<T> {
        // As a real backend does: the reconnection is counted before the outage ends.
        if self.lost.load(Ordering::SeqCst) {
            let _one_at_a_time = self.recovering.lock().expect("recovering lock");
            if self.lost.load(Ordering::SeqCst) {
                self.reconnections.fetch_add(1, Ordering::SeqCst);
                self.lost.store(false, Ordering::SeqCst);
            }
        }
        outcome
    }
}

#[async_trait]
impl Store for Counting {
    fn backend(&self) -> &'static str {
        self.inner.backend()
    }
    async fn commit(&self, changes: ChangeSet) -> StoreResult<()> {
        Self::wait_at(&self.held_commit).await;
        self.before_call()?;
        let outcome = self.after_call(self.inner.commit(changes).await);
        if outcome.is_ok() && self.answer_lost.swap(false, Ordering::SeqCst) {
            return Err(tether_store::StoreError::OutcomeUnknown(
                "the connection was lost after COMMIT went out".into(),
            ));
        }
        outcome
    }
    async fn announce(&self, notices: Vec<Notice>) -> StoreResult<()> {
        self.inner.announce(notices).await
    }
    fn subscribe(&self) -> tokio::sync::broadcast::Receiver<Notice> {
        self.inner.subscribe()
    }
    fn reconnections(&self) -> u64 {
        self.inner.reconnections() + self.reconnections.load(Ordering::SeqCst)
    }
    fn losses(&self) -> u64 {
        self.inner.losses() + self.losses.load(Ordering::SeqCst)
    }
    fn in_outage(&self) -> bool {
        self.inner.in_outage() || self.lost.load(Ordering::SeqCst)
    }
    async fn ping(&self) -> StoreResult<()> {
        self.before_call()?;
        let outcome = self.inner.ping().await;
        self.after_call(outcome)
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
        self.agent_reads.fetch_add(1, Ordering::SeqCst);
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
        self.before_call()?;
        self.item_reads.fetch_add(1, Ordering::SeqCst);
        self.after_call(self.inner.get_session(id).await)
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
        self.before_call()?;
        self.item_reads.fetch_add(1, Ordering::SeqCst);
        self.after_call(self.inner.get_work(id).await)
    }
    async fn get_work_with_session(
        &self,
        id: &str,
    ) -> StoreResult<Option<tether_store::WorkWithSession>> {
        self.before_call()?;
        self.item_reads.fetch_add(1, Ordering::SeqCst);
        self.after_call(self.inner.get_work_with_session(id).await)
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
        window: tether_store::ClaimWindow,
        limit: u32,
    ) -> StoreResult<Vec<tether_store::Candidate>> {
        self.scans.fetch_add(1, Ordering::SeqCst);
        Self::wait_at(&self.held_scan).await;
        self.inner
            .claim_candidates(environment_id, window, limit)
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
        self.before_call()?;
        self.after_call(self.inner.leases_due_before(before, limit).await)
    }
    async fn queue_counts(&self, environment_id: &str) -> StoreResult<QueueCounts> {
        self.queue_counts.fetch_add(1, Ordering::SeqCst);
        while self.queue_counts_stalled.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
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
        limit: u32,
    ) -> StoreResult<Vec<(String, Timestamp)>> {
        self.inner.workers_seen(environment_id, since, limit).await
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
    fn shared(&self) -> bool {
        self.inner.shared()
    }
    async fn lease_keeper_mark_of(
        &self,
        server_id: &str,
    ) -> StoreResult<Option<tether_core::lease::LeaseKeeperMark>> {
        self.inner.lease_keeper_mark_of(server_id).await
    }
    async fn lease_keeper_marks_elsewhere(
        &self,
        server_id: &str,
    ) -> StoreResult<Vec<LeaseKeeperMark>> {
        self.before_call()?;
        self.after_call(self.inner.lease_keeper_marks_elsewhere(server_id).await)
    }
    async fn count_credentials(&self, kind: CredentialKind, revoked_too: bool) -> StoreResult<u64> {
        self.inner.count_credentials(kind, revoked_too).await
    }
    async fn purge_deleted_events(&self, batch: u32) -> StoreResult<bool> {
        self.inner.purge_deleted_events(batch).await
    }
}

/// An app over a fresh store of `backend` that counts claim scans and item reads, with no periodic dispatcher pass
/// (every scan counted comes from the test), and one self-hosted environment named `name`.
pub async fn counting_app(
    backend: &tether_testkit::Backend,
    clock: Arc<dyn tether_core::Clock>,
    name: &str,
) -> (StoreLocation, App, Arc<Counting>, Environment) {
    let location = StoreLocation::fresh(backend).await.expect("store");
    let counting = Arc::new(Counting {
        inner: location.open().await.expect("open"),
        scans: AtomicU64::new(0),
        item_reads: AtomicU64::new(0),
        agent_reads: AtomicU64::new(0),
        queue_counts: AtomicU64::new(0),
        queue_counts_stalled: AtomicBool::new(false),
        down: AtomicBool::new(false),
        lost: AtomicBool::new(false),
        losses: AtomicU64::new(0),
        reconnections: AtomicU64::new(0),
        recovering: std::sync::Mutex::new(()),
        answer_lost: AtomicBool::new(false),
        held_commit: std::sync::Mutex::new(None),
        held_scan: std::sync::Mutex::new(None),
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

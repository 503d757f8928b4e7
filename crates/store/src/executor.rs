//! The one [`Store`] implementation, generic over how SQL reaches a database.

use async_trait::async_trait;
use tether_core::lease::LeaseKeeperMark;
use tether_core::resources::{Agent, Credential, CredentialKind, Environment, Session};
use tether_core::{Timestamp, WorkItem};
use tokio::sync::broadcast;

use crate::sql::{self, Expect, Row, Statement};
use crate::{
    ArchiveFilter, Candidate, ChangeSet, ClaimWindow, EventDoc, HistoryRow, Notice, Page,
    PageRequest, QueueCounts, SessionFilter, Store, StoreResult, Versioned, WorkFilter,
    WorkWithSession,
};

/// What a backend provides: run a query, run a list of writes atomically, and pass notices around.
#[async_trait]
pub trait Executor: Send + Sync + 'static {
    fn backend(&self) -> &'static str;
    async fn query(&self, statement: Statement) -> StoreResult<Vec<Row>>;
    /// Runs every statement in one transaction; a statement whose [`Expect`] fails, or a uniqueness
    /// violation, rolls the whole list back with `Conflict`.
    async fn execute(&self, statements: Vec<(Statement, Expect)>) -> StoreResult<()>;
    async fn announce(&self, notices: Vec<Notice>) -> StoreResult<()>;
    fn subscribe(&self) -> broadcast::Receiver<Notice>;
    /// See [`Store::shared`].
    fn shared(&self) -> bool {
        false
    }
    /// See [`Store::reconnections`].
    fn reconnections(&self) -> u64 {
        0
    }
    /// See [`Store::losses`].
    fn losses(&self) -> u64 {
        0
    }
    /// See [`Store::in_outage`].
    fn in_outage(&self) -> bool {
        false
    }
    /// See [`Store::free_space`].
    fn free_space(&self) -> Option<std::io::Result<u64>> {
        None
    }
}

/// A [`Store`] over any [`Executor`].
pub struct SqlStore<E> {
    exec: E,
}

impl<E: Executor> SqlStore<E> {
    pub fn new(exec: E) -> Self {
        SqlStore { exec }
    }

    pub fn executor(&self) -> &E {
        &self.exec
    }

    async fn optional<T>(
        &self,
        statement: Statement,
        decode: fn(&Row) -> StoreResult<T>,
    ) -> StoreResult<Option<T>> {
        let rows = self.exec.query(statement).await?;
        rows.first().map(decode).transpose()
    }

    async fn all<T>(
        &self,
        statement: Statement,
        decode: fn(&Row) -> StoreResult<T>,
    ) -> StoreResult<Vec<T>> {
        let rows = self.exec.query(statement).await?;
        rows.iter().map(decode).collect()
    }

    async fn paged<T>(
        &self,
        statement: Statement,
        request: &PageRequest,
        decode: fn(&Row) -> StoreResult<T>,
    ) -> StoreResult<Page<T>> {
        Ok(sql::page(self.all(statement, decode).await?, request))
    }

    /// A page of `listing` within [`crate::LIST_PAGE_BYTES`] (see [`sql::BoundedListing`]).
    async fn bounded<T: serde::de::DeserializeOwned>(
        &self,
        listing: sql::BoundedListing,
        page: &PageRequest,
    ) -> StoreResult<Page<T>> {
        let sizes = listing.sizes(page);
        let between = |low: &str, high: &str| listing.between(low, high);
        self.within_bytes(
            sizes,
            between,
            page,
            crate::LIST_PAGE_BYTES,
            sql::id_and_doc,
        )
        .await
    }

    /// A page within `max_bytes`: first the ids and sizes of its candidates (`sizes`, nearest the
    /// cursor first), without their documents; then, read by `between` from the first to the last
    /// id that fit, the documents of those ids and no others: a record that came into the range or
    /// into the filter between the two reads is left for another page, so the page holds no more
    /// records nor bytes than the sizes allowed.
    async fn within_bytes<T>(
        &self,
        sizes: Statement,
        between: impl FnOnce(&str, &str) -> Statement,
        page: &PageRequest,
        max_bytes: usize,
        decode: fn(&Row) -> StoreResult<(String, T)>,
    ) -> StoreResult<Page<T>> {
        let sizes = self.all(sizes, sql::decode_id_size).await?;
        let lengths: Vec<i64> = sizes.iter().map(|(_, size)| *size).collect();
        let (kept, has_more) = sql::fitting(&lengths, page.limit as usize, max_bytes);
        if kept == 0 {
            return Ok(Page {
                items: Vec::new(),
                has_more,
            });
        }
        let (a, b) = (&sizes[0].0, &sizes[kept - 1].0);
        let (low, high) = if a <= b { (a, b) } else { (b, a) };
        let kept_ids: std::collections::HashSet<&str> =
            sizes[..kept].iter().map(|(id, _)| id.as_str()).collect();
        let read = self.all(between(low, high), decode).await?;
        let mut items: Vec<T> = read
            .into_iter()
            .filter(|(id, _)| kept_ids.contains(id.as_str()))
            .map(|(_, item)| item)
            .collect();
        if page.descending {
            items.reverse();
        }
        Ok(Page { items, has_more })
    }

    async fn count(&self, statement: Statement) -> StoreResult<u64> {
        Ok(self.optional(statement, sql::count).await?.unwrap_or(0))
    }
}

#[async_trait]
impl<E: Executor> Store for SqlStore<E> {
    fn backend(&self) -> &'static str {
        self.exec.backend()
    }

    fn shared(&self) -> bool {
        self.exec.shared()
    }

    async fn commit(&self, changes: ChangeSet) -> StoreResult<()> {
        if changes.is_empty() {
            return Ok(());
        }
        self.exec.execute(sql::change_statements(&changes)).await
    }

    async fn announce(&self, notices: Vec<Notice>) -> StoreResult<()> {
        self.exec.announce(notices).await
    }

    fn subscribe(&self) -> broadcast::Receiver<Notice> {
        self.exec.subscribe()
    }

    fn reconnections(&self) -> u64 {
        self.exec.reconnections()
    }

    fn free_space(&self) -> Option<std::io::Result<u64>> {
        self.exec.free_space()
    }

    fn losses(&self) -> u64 {
        self.exec.losses()
    }

    fn in_outage(&self) -> bool {
        self.exec.in_outage()
    }

    async fn ping(&self) -> StoreResult<()> {
        // A read of a table, not `SELECT 1`: SQLite answers that without opening a read transaction
        // on the database at all, so a file that can no longer be read (a disk gone bad, a file
        // system shut down) would still look ready while every request failed.
        self.exec
            .query(Statement::new("SELECT 1 FROM environments LIMIT 1", vec![]))
            .await
            .map(drop)
    }

    async fn get_environment(&self, id: &str) -> StoreResult<Option<Versioned<Environment>>> {
        self.optional(sql::get_by_id("environments", id), sql::versioned)
            .await
    }

    async fn list_environments(
        &self,
        filter: &ArchiveFilter,
        page: &PageRequest,
    ) -> StoreResult<Page<Environment>> {
        self.bounded(sql::BoundedListing::environments(filter), page)
            .await
    }

    async fn count_sessions_in_environment(&self, environment_id: &str) -> StoreResult<u64> {
        self.count(sql::count_sessions_in_environment(environment_id))
            .await
    }

    async fn get_agent(&self, id: &str) -> StoreResult<Option<Versioned<Agent>>> {
        self.optional(sql::get_by_id("agents", id), sql::versioned)
            .await
    }

    async fn get_agent_version(&self, id: &str, version: u32) -> StoreResult<Option<Agent>> {
        self.optional(sql::get_agent_version(id, version), sql::doc)
            .await
    }

    async fn list_agents(
        &self,
        filter: &ArchiveFilter,
        page: &PageRequest,
    ) -> StoreResult<Page<Agent>> {
        self.bounded(sql::BoundedListing::agents(filter), page)
            .await
    }

    async fn get_session(&self, id: &str) -> StoreResult<Option<Versioned<Session>>> {
        self.optional(sql::get_by_id("sessions", id), sql::versioned)
            .await
    }

    async fn list_sessions(
        &self,
        filter: &SessionFilter,
        page: &PageRequest,
    ) -> StoreResult<Page<Session>> {
        self.bounded(sql::BoundedListing::sessions(filter), page)
            .await
    }

    async fn list_events(
        &self,
        session_id: &str,
        page: &PageRequest,
        max_bytes: usize,
    ) -> StoreResult<Page<EventDoc>> {
        // Ids only grow within a session, so the run read by `events_between` is the events that
        // were sized.
        let sizes = sql::event_sizes(session_id, page);
        let between = |low: &str, high: &str| sql::events_between(session_id, low, high);
        self.within_bytes(sizes, between, page, max_bytes, sql::event_doc_and_id)
            .await
    }

    async fn get_work(&self, id: &str) -> StoreResult<Option<Versioned<WorkItem>>> {
        self.optional(sql::get_by_id("work_items", id), sql::versioned)
            .await
    }

    async fn get_work_with_session(&self, id: &str) -> StoreResult<Option<WorkWithSession>> {
        self.optional(sql::get_work_with_session(id), sql::work_with_session)
            .await
    }

    async fn list_work(
        &self,
        environment_id: &str,
        filter: &WorkFilter,
        page: &PageRequest,
    ) -> StoreResult<Page<WorkItem>> {
        self.paged(sql::list_work(environment_id, filter, page), page, sql::doc)
            .await
    }

    async fn claim_candidates(
        &self,
        environment_id: &str,
        window: ClaimWindow,
        limit: u32,
    ) -> StoreResult<Vec<Candidate>> {
        self.all(
            sql::claim_candidates(environment_id, window, limit),
            sql::candidate,
        )
        .await
    }

    async fn leased_work_in_environment(&self, environment_id: &str) -> StoreResult<Vec<WorkItem>> {
        let mut leased: Vec<WorkItem> = self
            .all(sql::leased_work_in_environment(environment_id), sql::doc)
            .await?;
        // Sorted here, not by the statement: an `ORDER BY id` makes SQLite read the environment's
        // every item, stopped ones too, through `work_by_environment` to spare a sort of a few rows.
        leased.sort_unstable_by(|a, b| a.id.cmp(&b.id));
        Ok(leased)
    }

    async fn live_work_for_session(
        &self,
        session_id: &str,
    ) -> StoreResult<Option<Versioned<WorkItem>>> {
        self.optional(sql::live_work_for_session(session_id), sql::versioned)
            .await
    }

    async fn leases_due_before(
        &self,
        before: Timestamp,
        limit: u32,
    ) -> StoreResult<Vec<Versioned<WorkItem>>> {
        self.all(sql::leases_due_before(before, limit), sql::versioned)
            .await
    }

    async fn queue_counts(&self, environment_id: &str) -> StoreResult<QueueCounts> {
        Ok(self
            .optional(sql::queue_counts(environment_id), sql::decode_queue_counts)
            .await?
            .unwrap_or_default())
    }

    async fn work_by_token_hash(
        &self,
        token_hash: &str,
    ) -> StoreResult<Option<Versioned<WorkItem>>> {
        self.optional(sql::work_by_token_hash(token_hash), sql::versioned)
            .await
    }

    async fn list_history(
        &self,
        work_id: &str,
        after_seq: Option<i64>,
        limit: u32,
    ) -> StoreResult<Page<HistoryRow>> {
        let rows = self
            .exec
            .query(sql::list_history(work_id, after_seq, limit))
            .await?;
        Ok(sql::page(
            sql::decode_history(&rows, after_seq)?,
            &PageRequest::first(limit),
        ))
    }

    async fn workers_seen(
        &self,
        environment_id: &str,
        since: Timestamp,
        limit: u32,
    ) -> StoreResult<Vec<(String, Timestamp)>> {
        self.all(
            sql::workers_seen(environment_id, since, limit),
            sql::decode_worker,
        )
        .await
    }

    async fn credential_by_hash(&self, secret_hash: &str) -> StoreResult<Option<Credential>> {
        self.optional(
            sql::credential_by_hash(secret_hash),
            sql::credential_from_row,
        )
        .await
    }

    async fn get_credential(&self, id: &str) -> StoreResult<Option<Credential>> {
        self.optional(sql::get_credential(id), sql::credential_from_row)
            .await
    }

    async fn list_credentials(
        &self,
        kind: CredentialKind,
        environment_id: Option<&str>,
        page: &PageRequest,
    ) -> StoreResult<Page<Credential>> {
        self.paged(
            sql::list_credentials(kind, environment_id, page),
            page,
            sql::credential_from_row,
        )
        .await
    }

    async fn lease_keeper_marks_elsewhere(
        &self,
        server_id: &str,
    ) -> StoreResult<Vec<LeaseKeeperMark>> {
        self.all(
            sql::lease_keeper_marks_elsewhere(server_id),
            sql::lease_keeper_mark,
        )
        .await
    }

    async fn lease_keeper_mark_of(&self, server_id: &str) -> StoreResult<Option<LeaseKeeperMark>> {
        self.optional(sql::lease_keeper_mark_of(server_id), sql::lease_keeper_mark)
            .await
    }

    async fn count_credentials(&self, kind: CredentialKind, revoked_too: bool) -> StoreResult<u64> {
        self.count(sql::count_credentials(kind, revoked_too)).await
    }

    async fn purge_deleted_events(&self, batch: u32) -> StoreResult<bool> {
        let Some(session_id) = self.optional(sql::next_purge(), sql::decode_text).await? else {
            return Ok(false);
        };
        self.exec
            .execute(vec![(sql::purge_events(&session_id, batch), Expect::Any)])
            .await?;
        if self.count(sql::events_left(&session_id)).await? == 0 {
            self.exec
                .execute(vec![(sql::end_purge(&session_id), Expect::Any)])
                .await?;
        }
        Ok(true)
    }
}

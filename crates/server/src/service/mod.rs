//! The application service: reads records, asks `tether-core` what happens, and commits the answer with
//! one conditional write, retrying from a fresh read when another request (or another server process)
//! changed the record in between. HTTP handlers call only this layer. It answers in domain terms
//! ([`Error`]); only `http/` (through `crate::error`) turns an answer into a status and an envelope.

pub mod agents;
pub mod environments;
mod error;
pub mod events;
pub mod requeue;
pub mod sessions;
pub mod spare_candidates;
pub mod tokens;
mod turns;
pub mod work;
pub mod worker_records;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tether_core::{Clock, LeasePolicy, Timestamp};
use tether_store::{ChangeSet, Notice, Store, Write};
use tokio::sync::watch;

pub use self::error::{Error, Missing, Result};
use crate::cache::{LeaseHorizon, TtlCache, Weight, WrittenRecords, RECORD_TTL};
use crate::hub::SessionHub;
use crate::sampler::QueueHistory;
use crate::waiters::Waiters;
use tokens::Principal;
use turns::KeyedTurns;

/// How many times an operation re-reads and re-decides after losing a race before giving up with 503.
pub const MAX_ATTEMPTS: usize = 32;
/// Work items, and sessions, whose last write here the memory holds at most
/// (`crate::cache::WrittenRecords`): a few thousand live items at once start their next operation
/// from memory; beyond that some read first, as all did before.
const WRITTEN_RECORDS: usize = 8_192;
/// The bytes (as JSON) of those records, each kind: a work item weighs about 1 KB, a session carries
/// its agent and may weigh much more.
const WRITTEN_RECORD_BYTES: usize = 8 << 20;
/// The bytes (as JSON) of the agents read for new sessions that the cache holds at most; an agent
/// over a 256th of it (32 KB, large tools) is read for each new session, as every agent once was.
const AGENTS_READ_BYTES: usize = 8 << 20;

/// Server settings that the service consults.
#[derive(Clone, Debug)]
pub struct ServiceConfig {
    /// The base URL workers are told to use (`api_base_url` in the work secret), without the dialect prefix.
    pub public_url: String,
    pub lease: LeasePolicy,
    /// `reclaim_older_than_ms` when a poll does not say (§6.2).
    pub default_reclaim_ms: i64,
    /// Lease amnesty window at start (§3.1).
    pub amnesty_grace_ms: i64,
    /// Dispatcher tick.
    pub tick: Duration,
    /// Window of `workers_polling` (§2.5).
    pub workers_polling_window_ms: i64,
    /// Distinct workers per environment one process records, and a listing or count reads, at most
    /// ([`worker_records::MAX_WORKERS_PER_ENVIRONMENT`]).
    pub max_workers_per_environment: usize,
    /// How often the sampler records each environment's queue statistics (`crate::sampler`).
    pub sample_interval: Duration,
    /// The largest event, in bytes of its JSON as stored (`--event-limit`).
    pub max_event_bytes: usize,
    /// What request bodies may take in memory, all together (`--request-memory`, `crate::memory`);
    /// pages of events have a quarter of it more.
    pub request_memory: usize,
    /// How long a credential, environment or agent read may be used again ([`RECORD_TTL`], 1 s): a
    /// change made through another server takes effect within it where nothing else checks it.
    /// Tests lengthen it to show that a conditional write, not the expiry, catches such a change.
    pub record_ttl: Duration,
    /// The SHA-256 (hex) of the token `/metrics` asks for (`--metrics-token`); `None`: it asks for
    /// none.
    pub metrics_token_hash: Option<String>,
    /// The most event streams the keys and session tokens of one environment may hold open on this
    /// server at once (`--max-streams-per-environment`); an admin token's are not counted. Below
    /// the connection cap, one leaked key could otherwise hold most connections with streams of
    /// one session, and have every event it posts there written to each of them.
    pub max_streams_per_environment: usize,
    /// What this server is called among those sharing its store, the same from one of its starts
    /// to the next (the host and the address it listens on): a start then tells the marks of its
    /// own earlier run from those of the other servers ([`App::amnesty_at_start`]). `None`: a name
    /// of this process's own.
    pub server_name: Option<String>,
    /// The free space, in bytes, kept on the disk of a store on this machine (`--min-free-disk`):
    /// below it, requests that add records are refused ([`crate::disk`]). 0: no floor.
    pub min_free_disk: u64,
}

/// The default `--max-streams-per-environment`.
pub const DEFAULT_MAX_STREAMS_PER_ENVIRONMENT: usize = 1_000;

/// The default `--event-limit`: 1 MiB.
pub const DEFAULT_MAX_EVENT_BYTES: usize = 1 << 20;

impl Default for ServiceConfig {
    fn default() -> Self {
        ServiceConfig {
            public_url: "http://127.0.0.1:4780".into(),
            lease: LeasePolicy::default(),
            default_reclaim_ms: 5_000,
            amnesty_grace_ms: 30_000,
            tick: Duration::from_secs(1),
            workers_polling_window_ms: 30_000,
            max_workers_per_environment: worker_records::MAX_WORKERS_PER_ENVIRONMENT,
            sample_interval: Duration::from_secs(10),
            max_event_bytes: DEFAULT_MAX_EVENT_BYTES,
            request_memory: crate::memory::DEFAULT_REQUEST_MEMORY,
            record_ttl: RECORD_TTL,
            metrics_token_hash: None,
            max_streams_per_environment: DEFAULT_MAX_STREAMS_PER_ENVIRONMENT,
            server_name: None,
            min_free_disk: crate::disk::DEFAULT_MIN_FREE_DISK,
        }
    }
}

/// Everything a request handler needs. Cheap to clone (an `Arc`).
#[derive(Clone)]
pub struct App(pub Arc<AppInner>);

pub struct AppInner {
    pub store: Arc<dyn Store>,
    pub clock: Arc<dyn Clock>,
    pub config: ServiceConfig,
    pub waiters: Waiters,
    pub hub: SessionHub,
    /// The last hour of queue statistics per environment, for the dashboard's chart.
    pub queue_history: QueueHistory,
    /// What request bodies may hold in memory (`--request-memory`, [`crate::memory`]).
    pub memory: crate::memory::MemoryBudget,
    /// What pages of events may hold until they are handed out: a budget of their own, so that
    /// reads never wait behind a large body ([`crate::memory::page_budget`]).
    pub page_memory: crate::memory::MemoryBudget,
    /// The free space kept on the store's disk, and its last reading ([`crate::disk`]).
    pub disk: crate::disk::DiskRoom,
    /// Items this process's polls are taking or took lately (`work::Claims`), so that its concurrent
    /// polls pick different items instead of colliding (other processes are kept apart by the
    /// conditional write).
    claiming: Mutex<work::Claims>,
    /// Tries of one keyed claim in this process take turns, by their session token (`turns`).
    claim_turns: KeyedTurns,
    /// Turns at reading a queue's candidates, by environment and reclaim window (`work::try_claim`).
    candidate_reads: KeyedTurns,
    /// The polls this process recorded lately, to write each worker's at most once an interval and
    /// to bound the workers each environment may have recorded.
    workers_recorded: Mutex<worker_records::WorkerRecords>,
    /// Poll records not written yet: the dispatcher's tick writes them all in one commit
    /// ([`App::write_worker_records`]), instead of a commit per idle worker's re-poll.
    pub(crate) workers_unwritten: Mutex<HashMap<(String, String), Timestamp>>,
    /// Held by a write of the poll records from taking them to their commit, so that a reader that
    /// writes them first also waits for a write already under way (the dispatcher's tick).
    workers_writing: tokio::sync::Mutex<()>,
    shutdown: watch::Sender<bool>,
    /// Asks the dispatcher for a pass now (§3.1).
    pub dispatch_now: tokio::sync::Notify,
    /// Wakes the event purge (`crate::purger`): this process deleted a session.
    pub purge_now: tokio::sync::Notify,
    /// The store's reconnection count that lease amnesty has been granted for (see
    /// [`App::amnesty_after_outage`]).
    amnesty_granted_through: std::sync::atomic::AtomicU64,
    amnesty_running: tokio::sync::Mutex<()>,
    /// This process among those sharing the store, for the marks of who keeps the leases
    /// ([`App::mark_leases_kept`]).
    server_id: String,
    /// How many of an outage's 503s promised lease amnesty ([`App::lease_amnesty_promise`]), and
    /// how many of them the amnesty decided after an outage took into account: a promise made
    /// since the last decision makes that amnesty owed, whatever is read after. Counts rather than
    /// a flag taken by the decision, so that a decision dropped halfway (its request cancelled)
    /// loses no promise.
    amnesty_promises_made: std::sync::atomic::AtomicU64,
    amnesty_promises_decided: std::sync::atomic::AtomicU64,
    /// Whether the promise an earlier run of this process (the same server id) may have made
    /// from its last mark has been kept ([`App::keep_earlier_runs_promise`]).
    earlier_runs_promise_kept: std::sync::atomic::AtomicBool,
    earlier_runs_promise_keeping: tokio::sync::Mutex<()>,
    /// This process's last mark of the leases kept ([`App::mark_leases_kept`]), to tell whether
    /// another process kept them while this one could not reach the database.
    own_lease_mark: Mutex<Option<tether_core::lease::LeaseKeeperMark>>,
    /// What this process last read of the other processes' marks ([`App::expiry_allowed`]);
    /// `None` before it first read them.
    marks_read: Mutex<Option<MarksRead>>,
    /// Event streams open per environment, for [`ServiceConfig::max_streams_per_environment`].
    streams_open: StreamsOpen,
    /// Hints that spare the store a read (`crate::cache`): credentials (by id and by secret hash) and
    /// environments read in the last second, and a lower bound on the earliest lease deadline.
    pub(crate) credentials_by_id: TtlCache<String, Arc<tether_core::resources::Credential>>,
    pub(crate) credentials_by_hash: TtlCache<String, Arc<tether_core::resources::Credential>>,
    pub(crate) environments_read: TtlCache<String, Arc<tether_core::resources::Environment>>,
    /// Agents as read for new sessions, whose inserts are conditional on the agent's row version.
    pub(crate) agents_read:
        TtlCache<String, Arc<tether_store::Versioned<tether_core::resources::Agent>>>,
    pub(crate) lease_horizon: LeaseHorizon,
    /// Work items and sessions as this process last wrote them (`crate::cache::WrittenRecords`):
    /// where the next operation on an item starts instead of reading it.
    pub(crate) written_items: WrittenRecords<tether_core::WorkItem>,
    pub(crate) written_sessions: WrittenRecords<tether_core::resources::Session>,
    /// Turns at writing a session's document, for the requests of this process that change it
    /// ([`App::with_session_retries`]).
    session_turns: KeyedTurns,
    /// The last reading of `/metrics`' queue gauges, shared by the scrapes of one second.
    pub(crate) queue_gauges: crate::telemetry::QueueGaugeCache,
    pub(crate) live_scrape: crate::telemetry::LiveScrape,
}

/// How many event streams each environment's callers hold open.
type StreamsOpen = Arc<Mutex<HashMap<String, usize>>>;

/// One event stream's place among its environment's ([`App::open_stream`]); given back when
/// dropped, with the stream.
pub struct StreamPlace {
    counted: Option<(StreamsOpen, String)>,
}

impl Drop for StreamPlace {
    fn drop(&mut self) {
        let Some((open, environment_id)) = self.counted.take() else {
            return;
        };
        let mut open = open
            .lock()
            .expect("no code panics holding the streams' map");
        if let Some(count) = open.get_mut(&environment_id) {
            *count -= 1;
            if *count == 0 {
                open.remove(&environment_id);
            }
        }
    }
}

/// The other server processes' marks as this one last read them.
#[derive(Clone, Copy, Debug)]
struct MarksRead {
    /// When, by this process's clock, taken before the read: every mark committed by then is in it.
    at: Timestamp,
    /// Whether another process was keeping the leases (`lease::others_keep_leases`): then a
    /// database this process cannot reach may be one that process still writes to, and this one
    /// promises no amnesty.
    others_keep: bool,
    /// Until when no lease may be settled as expired, because another process may have promised
    /// its workers amnesty (`lease::expiry_held_until`); `None`: none may have.
    expiry_held_until: Option<Timestamp>,
}

impl App {
    /// A place for one more event stream of `caller`: refused when its environment's keys and
    /// session tokens hold [`ServiceConfig::max_streams_per_environment`] already. An admin
    /// token's streams are not counted.
    pub fn open_stream(&self, caller: &Principal) -> Result<StreamPlace> {
        let Some(environment_id) = caller.environment_id() else {
            return Ok(StreamPlace { counted: None });
        };
        let limit = self.config.max_streams_per_environment;
        let mut open = self
            .streams_open
            .lock()
            .expect("no code panics holding the streams' map");
        let count = open.entry(environment_id.to_owned()).or_insert(0);
        if *count >= limit {
            return Err(Error::TooManyStreams {
                environment_id: environment_id.to_owned(),
                limit,
            });
        }
        *count += 1;
        Ok(StreamPlace {
            counted: Some((self.streams_open.clone(), environment_id.to_owned())),
        })
    }
}

impl std::ops::Deref for App {
    type Target = AppInner;
    fn deref(&self) -> &AppInner {
        &self.0
    }
}

impl App {
    pub fn new(store: Arc<dyn Store>, clock: Arc<dyn Clock>, config: ServiceConfig) -> App {
        let (shutdown, _) = watch::channel(false);
        let reconnections = store.reconnections();
        let queue_history = QueueHistory::new(config.sample_interval);
        let ttl = config.record_ttl;
        let memory = crate::memory::MemoryBudget::new(config.request_memory);
        let page_memory =
            crate::memory::MemoryBudget::new(crate::memory::page_budget(config.request_memory));
        let disk = crate::disk::DiskRoom::new(config.min_free_disk);
        let workers_recorded = worker_records::WorkerRecords::new(
            work::worker_record_interval_ms(config.workers_polling_window_ms),
            work::workers_window_ms(config.workers_polling_window_ms),
            config.max_workers_per_environment,
        );
        let server_id = config
            .server_name
            .clone()
            .unwrap_or_else(|| format!("srv_{}", uuid::Uuid::now_v7().simple()));
        App(Arc::new(AppInner {
            store,
            clock,
            config,
            waiters: Waiters::default(),
            hub: SessionHub::default(),
            queue_history,
            memory,
            page_memory,
            disk,
            claiming: Mutex::new(work::Claims::default()),
            claim_turns: KeyedTurns::default(),
            candidate_reads: KeyedTurns::default(),
            workers_recorded: Mutex::new(workers_recorded),
            workers_unwritten: Mutex::new(HashMap::new()),
            workers_writing: tokio::sync::Mutex::new(()),
            shutdown,
            dispatch_now: tokio::sync::Notify::new(),
            purge_now: tokio::sync::Notify::new(),
            amnesty_granted_through: reconnections.into(),
            amnesty_running: tokio::sync::Mutex::new(()),
            server_id,
            amnesty_promises_made: std::sync::atomic::AtomicU64::new(0),
            amnesty_promises_decided: std::sync::atomic::AtomicU64::new(0),
            earlier_runs_promise_kept: std::sync::atomic::AtomicBool::new(false),
            earlier_runs_promise_keeping: tokio::sync::Mutex::new(()),
            own_lease_mark: Mutex::new(None),
            marks_read: Mutex::new(None),
            streams_open: Arc::default(),
            credentials_by_id: TtlCache::new(ttl),
            credentials_by_hash: TtlCache::new(ttl),
            environments_read: TtlCache::new(ttl),
            agents_read: TtlCache::weighed(ttl, AGENTS_READ_BYTES, |agent, most| {
                events::json_size_up_to(&agent.value, most)
            }),
            lease_horizon: LeaseHorizon::default(),
            written_items: WrittenRecords::new(
                WRITTEN_RECORDS,
                WRITTEN_RECORD_BYTES,
                work::item_weight,
            ),
            written_sessions: WrittenRecords::new(
                WRITTEN_RECORDS,
                WRITTEN_RECORD_BYTES,
                events::json_size_up_to,
            ),
            session_turns: KeyedTurns::default(),
            queue_gauges: Default::default(),
            live_scrape: Default::default(),
        }))
    }

    pub fn now(&self) -> Timestamp {
        self.clock.now()
    }

    /// Begins shutdown: blocked polls answer `null` at once, streams end.
    pub fn begin_shutdown(&self) {
        self.shutdown.send_replace(true);
        self.waiters.wake_all();
        self.hub.close_all();
    }

    pub fn shutdown_signal(&self) -> watch::Receiver<bool> {
        self.shutdown.subscribe()
    }

    /// Resolves once shutdown has begun.
    pub async fn until_shutdown(&self) {
        let mut signal = self.shutdown_signal();
        let _ = signal.wait_for(|stopping| *stopping).await;
    }

    pub fn is_shutting_down(&self) -> bool {
        *self.shutdown.borrow()
    }

    /// Commits a change set; once it stands, counts the work transitions it carried by cause
    /// (`tether_work_transitions_total`). Every write of the service goes through here, so the count
    /// covers enqueues, deliveries and stops alike and never counts a write that was refused.
    pub async fn commit(&self, changes: ChangeSet) -> tether_store::StoreResult<()> {
        let transitions: Vec<&'static str> = changes
            .writes
            .iter()
            .flat_map(|w| match w {
                Write::InsertWork { transitions, .. } | Write::UpdateWork { transitions, .. } => {
                    transitions.as_slice()
                }
                _ => &[],
            })
            .map(|t| t.cause.as_str())
            .collect();
        let cached_records_changed = self.before_commit(&changes);
        let written = WrittenSet::of(self, &changes);
        if let Err(e) = self.store.commit(changes).await {
            written.forget(self);
            return Err(e);
        }
        written.remember(self);
        if cached_records_changed {
            // Again: a read that raced with the write may have cached the record as it was.
            self.forget_cached_records();
        }
        for cause in transitions {
            metrics::counter!("tether_work_transitions_total", "cause" => cause).increment(1);
        }
        Ok(())
    }

    /// Wakes local waiters for the environments in `claimable` and tells other processes.
    pub async fn announce_claimable(&self, claimable: &[String]) {
        for env in claimable {
            self.waiters.wake(env, 1);
        }
        if claimable.is_empty() {
            return;
        }
        let notices = claimable
            .iter()
            .map(|e| Notice::WorkClaimable {
                environment_id: e.clone(),
            })
            .collect();
        if let Err(e) = self.store.announce(notices).await {
            tracing::debug!(error = %e, "could not announce claimable work (waiters elsewhere fall back to their re-check)");
        }
    }

    /// Wakes this process's streams of the session and tells other processes.
    pub async fn announce_session(&self, session_id: &str) {
        self.hub.notify(session_id);
        let notice = Notice::Session {
            session_id: session_id.to_owned(),
        };
        if let Err(e) = self.store.announce(vec![notice]).await {
            tracing::debug!(error = %e, "could not announce a session change");
        }
    }
}

impl App {
    /// [`with_retries`] for a request that changes one session's document: it waits for its turn
    /// behind this process's other such requests for the session first (`turns`), so that any number
    /// of them succeed rather than race each other past [`MAX_ATTEMPTS`]. A turn that does not come
    /// within `turns::TURN_WAIT` is [`Error::Contended`] (503, retry).
    pub async fn with_session_retries<T, F, Fut>(&self, session_id: &str, attempt: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, Retry>>,
    {
        let Some(_turn) = self.session_turns.take(session_id).await else {
            return Err(Error::Contended);
        };
        with_retries(attempt).await
    }

    /// [`with_retries`] for an operation on a work item that may change the item's session too (an
    /// ack, a stop, an expiry, a requeue). Its first try takes no turn: most win at once, and the lock
    /// would cost them for nothing. Once it has lost a race, it retries in the turn of the session
    /// that `session_of` names by then (each try notes it when it reads the item), as the requests
    /// that write sessions do, rather than keep losing to clients posting to the session.
    pub async fn with_retries_then_session_turn<T, F, Fut>(
        &self,
        session_of: &SessionOfItem,
        mut attempt: F,
    ) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, Retry>>,
    {
        match attempt().await {
            Ok(done) => return Ok(done),
            Err(Retry::Fail(e)) => return Err(e),
            Err(Retry::Conflict) => {}
        }
        match session_of.0.get() {
            Some(session_id) => self.with_session_retries(session_id, attempt).await,
            None => with_retries(attempt).await,
        }
    }
}

/// The session of the work item an operation is deciding on, as its tries read the item
/// ([`App::with_retries_then_session_turn`]).
#[derive(Default)]
pub struct SessionOfItem(std::sync::OnceLock<String>);

impl SessionOfItem {
    /// Notes `item`'s session, if it serves one. Kept from the first read: an item's session never
    /// changes.
    pub fn note(&self, item: &tether_core::WorkItem) {
        if let Some(id) = item.data.session_id() {
            let _ = self.0.set(id.to_owned());
        }
    }
}

/// Retries `attempt` while it loses races, up to [`MAX_ATTEMPTS`].
pub async fn with_retries<T, F, Fut>(mut attempt: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, Retry>>,
{
    for _ in 0..MAX_ATTEMPTS {
        match attempt().await {
            Ok(v) => return Ok(v),
            Err(Retry::Conflict) => tokio::task::yield_now().await,
            Err(Retry::Fail(e)) => return Err(e),
        }
    }
    Err(Error::Contended)
}

/// The outcome of one attempt that did not succeed.
pub enum Retry {
    /// Lost a race: read again and decide again.
    Conflict,
    Fail(Error),
}

impl From<Error> for Retry {
    fn from(e: Error) -> Self {
        Retry::Fail(e)
    }
}

impl From<tether_store::StoreError> for Retry {
    fn from(e: tether_store::StoreError) -> Self {
        match e {
            tether_store::StoreError::Conflict => Retry::Conflict,
            other => Retry::Fail(other.into()),
        }
    }
}

impl From<tether_core::WorkError> for Retry {
    fn from(e: tether_core::WorkError) -> Self {
        Retry::Fail(e.into())
    }
}

impl From<tether_core::events::Refusal> for Retry {
    fn from(refusal: tether_core::events::Refusal) -> Self {
        Retry::Fail(refusal.into())
    }
}

impl From<tether_core::metadata::MetadataError> for Retry {
    fn from(e: tether_core::metadata::MetadataError) -> Self {
        Retry::Fail(e.into())
    }
}

/// Checks a name-like string: not blank and at most `max` characters.
pub(crate) fn bounded_name(value: String, field: &str, max: usize) -> Result<String> {
    let chars = value.chars().count();
    if chars == 0 || value.trim().is_empty() {
        return Err(Error::invalid(field, format!("{field} must not be empty")));
    }
    if chars > max {
        return Err(Error::invalid(
            field,
            format!("{field} may be at most {max} characters"),
        ));
    }
    Ok(value)
}

/// A record as a change set writes it, with its weight; `None`: to be forgotten (deleted,
/// finished, or too heavy to keep).
type Remembered<V> = Option<(tether_store::Versioned<V>, Weight)>;

/// The work items and sessions a change set writes, as they will be once it commits, and the
/// sessions it is conditional on without writing them.
struct WrittenSet {
    items: Vec<(String, Remembered<tether_core::WorkItem>)>,
    sessions: Vec<(String, Remembered<tether_core::resources::Session>)>,
    judged_sessions: Vec<String>,
}

impl WrittenSet {
    /// What `changes` will leave in `app`'s memory; a record is copied only if it will be kept.
    fn of(app: &App, changes: &ChangeSet) -> Self {
        let mut set = WrittenSet {
            items: Vec::new(),
            sessions: Vec::new(),
            judged_sessions: Vec::new(),
        };
        fn at<V: Clone>(
            memory: &WrittenRecords<V>,
            id: &str,
            value: &V,
            version: i64,
        ) -> Remembered<V> {
            let weight = memory.weigh(id, value)?;
            let value = value.clone();
            Some((tether_store::Versioned { value, version }, weight))
        }
        let (items, sessions) = (&app.written_items, &app.written_sessions);
        for write in &changes.writes {
            match write {
                // A row's first version is 1; each update adds one (`tether_store::sql`). A finished
                // item takes no further operation worth a memory slot.
                Write::InsertWork { item, .. } => set
                    .items
                    .push((item.id.clone(), at(items, &item.id, item, 1))),
                Write::UpdateWork {
                    item,
                    expected_version,
                    session_version,
                    ..
                } => {
                    let kept = item.state.is_live().then_some(item);
                    let kept =
                        kept.and_then(|item| at(items, &item.id, item, expected_version + 1));
                    set.items.push((item.id.clone(), kept));
                    if let (Some(_), Some(session_id)) = (session_version, item.data.session_id()) {
                        set.judged_sessions.push(session_id.to_owned());
                    }
                }
                Write::InsertSession { session, .. } => set
                    .sessions
                    .push((session.id.clone(), at(sessions, &session.id, session, 1))),
                Write::UpdateSession {
                    session,
                    expected_version,
                } => set.sessions.push((
                    session.id.clone(),
                    at(sessions, &session.id, session, expected_version + 1),
                )),
                Write::DeleteSession { id, .. } => set.sessions.push((id.clone(), None)),
                _ => {}
            }
        }
        set
    }

    /// The change set committed: its records are as written (a deleted, finished or too heavy one
    /// is dropped).
    fn remember(self, app: &App) {
        for (id, item) in self.items {
            match item {
                Some((item, weight)) => app.written_items.wrote_weighed(&id, item, weight),
                None => app.written_items.forget(&id),
            }
        }
        for (id, session) in self.sessions {
            match session {
                Some((session, weight)) => app.written_sessions.wrote_weighed(&id, session, weight),
                None => app.written_sessions.forget(&id),
            }
        }
    }

    /// The change set was refused, or its outcome is unknown: what this process remembers of its
    /// records may be stale.
    fn forget(self, app: &App) {
        for (id, _) in self.items {
            app.written_items.forget(&id);
        }
        for (id, _) in self.sessions {
            app.written_sessions.forget(&id);
        }
        // Refused perhaps because the session changed since it was judged.
        for id in self.judged_sessions {
            app.written_sessions.forget(&id);
        }
    }
}

/// One page of a listing, its `has_more` as §1.8 defines it: whether items follow the page in list
/// order, however the page was asked for. A `before_id` page is read backwards from its cursor, and
/// the extra row read there says only that items come *before* it; `next_page` (its last id, D-3)
/// points the other way. So for such a page what follows it is asked for separately: the first item
/// after its last. An empty page has no last id for a `next_page` to name, and says no more.
pub(crate) async fn in_list_order<T, F, Fut>(
    page: &tether_store::PageRequest,
    id: fn(&T) -> &str,
    list: F,
) -> Result<tether_store::Page<T>>
where
    F: Fn(tether_store::PageRequest) -> Fut,
    Fut: std::future::Future<Output = Result<tether_store::Page<T>>>,
{
    let mut listed = list(page.clone()).await?;
    if matches!(page.cursor, tether_store::Cursor::Before(_)) {
        listed.has_more = match listed.items.last() {
            None => false,
            Some(last) => {
                // A page of none: it only says whether one follows, and a filtered scan stops at
                // the first match rather than looking for a second.
                let after = tether_store::PageRequest {
                    cursor: tether_store::Cursor::After(id(last).to_owned()),
                    limit: 0,
                    descending: page.descending,
                };
                let after = list(after).await?;
                after.has_more || !after.items.is_empty()
            }
        };
    }
    Ok(listed)
}

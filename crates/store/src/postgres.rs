//! The PostgreSQL backend: several server processes sharing one database act as one server.
//!
//! Every change set runs in one transaction on a pooled connection. Its conditions are the same
//! conditional `UPDATE … WHERE version = $n` statements SQLite runs, so two processes that decided from
//! the same read cannot both win: the second finds no row to update and gets [`StoreError::Conflict`],
//! re-reads and decides again. Nothing here keeps state that another process would need to see, and
//! the SQL is plain enough for PostgreSQL-compatible distributed engines.
//!
//! Processes wake each other's long polls and session streams with `NOTIFY` on one channel. That is a
//! hint only: a notification sent while a listener was reconnecting is lost, and the dispatcher's
//! periodic re-check (§3.1) is what guarantees progress.
//!
//! Losing the database is reported as [`StoreError::Unavailable`] (503 to clients). The executor also
//! counts the times it got the database back ([`Executor::reconnections`]), which the service uses to
//! grant lease amnesty, so that time the database was away never counts against a worker.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use deadpool_postgres::{Manager, ManagerConfig, Pool, PoolError, RecyclingMethod, Runtime};
use futures::StreamExt;
use tokio::sync::broadcast;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{AsyncMessage, Config};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::executor::{Executor, SqlStore};
use crate::sql::{self, Expect, Row, Statement, Value};
use crate::tls;
use crate::{Notice, StoreError, StoreResult};

/// The channel every process listens on.
pub const CHANNEL: &str = "tether";
/// Connections per process (the listener has its own).
pub const POOL_SIZE: usize = 16;
/// How long a request waits for a pooled connection, or for a new one, before answering 503.
const POOL_WAIT: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Arbitrary, fixed key of the advisory lock that serialises migrations across processes.
const MIGRATION_LOCK: i64 = 0x7e7e_0001;
/// `NOTIFY` payloads must stay below 8000 bytes.
const MAX_PAYLOAD: usize = 7_000;
/// Notices buffered per subscriber; a slow one sees `Lagged` and runs a full pass instead.
const NOTICE_BUFFER: usize = 1_024;
const LISTEN_BACKOFF_MIN: Duration = Duration::from_millis(100);
const LISTEN_BACKOFF_MAX: Duration = Duration::from_secs(5);

pub struct PostgresExecutor {
    pool: Pool,
    notices: broadcast::Sender<Notice>,
    health: Arc<Health>,
    /// Tags this process's notifications, so that it does not wake itself a second time.
    origin: String,
    listener: tokio::task::JoinHandle<()>,
}

impl Drop for PostgresExecutor {
    fn drop(&mut self) {
        self.listener.abort();
    }
}

/// Whether the database was lost, and how many times it came back.
#[derive(Default)]
struct Health {
    lost: AtomicBool,
    reconnections: AtomicU64,
    /// How many times `lost` went from false to true.
    losses: AtomicU64,
    /// Makes "count the recovery, then clear the flag" one step, so that whoever sees the flag clear
    /// also sees the count that goes with it.
    recovering: Mutex<()>,
}

impl Health {
    fn lost(&self, why: &str) {
        if !self.lost.swap(true, Ordering::SeqCst) {
            self.losses.fetch_add(1, Ordering::SeqCst);
            tracing::warn!(reason = %why, "lost the database");
        }
    }

    fn reached(&self) {
        if !self.lost.load(Ordering::SeqCst) {
            return;
        }
        let _guard = self.recovering.lock().expect("health lock");
        if self.lost.load(Ordering::SeqCst) {
            self.reconnections.fetch_add(1, Ordering::SeqCst);
            self.lost.store(false, Ordering::SeqCst);
            tracing::info!("the database is reachable again");
        }
    }
}

/// Connects to the database at `url` (a `postgres://` URL or a `key=value` string, with libpq's
/// `sslmode` and `sslrootcert`: see [`tls`]), applies the migrations once across all processes, and
/// starts listening for other processes' notices.
pub async fn connect(url: &str) -> StoreResult<SqlStore<PostgresExecutor>> {
    let tls::Connection {
        mut config, tls, ..
    } = tls::parse(url)?;
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(CONNECT_TIMEOUT);
    }
    // A database host that vanishes without closing its sockets is noticed within about a minute
    // instead of whenever the kernel gives up.
    config
        .keepalives(true)
        .keepalives_idle(Duration::from_secs(30))
        .keepalives_interval(Duration::from_secs(5))
        .keepalives_retries(3);
    if config.get_application_name().is_none() {
        config.application_name("tether");
    }
    let mut collisions = 0;
    loop {
        match migrate(&config, &tls).await {
            // Only without advisory locks: another server ran the same migration at the same time.
            Err(StoreError::Conflict) if collisions < 5 => {
                collisions += 1;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            outcome => break outcome?,
        }
    }

    let manager = Manager::from_config(
        config.clone(),
        tls.clone(),
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    let pool = Pool::builder(manager)
        .max_size(POOL_SIZE)
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(POOL_WAIT))
        .create_timeout(Some(CONNECT_TIMEOUT))
        .recycle_timeout(Some(CONNECT_TIMEOUT))
        .build()
        .map_err(|e| StoreError::Internal(format!("cannot build the connection pool: {e}")))?;
    let (notices, _) = broadcast::channel(NOTICE_BUFFER);
    let health = Arc::new(Health::default());
    let origin = unique_suffix();
    let listener = tokio::spawn(listen(
        config,
        tls,
        notices.clone(),
        health.clone(),
        origin.clone(),
    ));
    Ok(SqlStore::new(PostgresExecutor {
        pool,
        notices,
        health,
        origin,
        listener,
    }))
}

/// Applies the migrations not yet recorded in `schema_migrations`. Servers starting together queue on
/// an advisory lock, so each migration runs exactly once; the lock belongs to a connection of its own
/// and goes away with it, whatever happens here.
async fn migrate(config: &Config, tls: &MakeRustlsConnect) -> StoreResult<()> {
    let (mut client, connection) = config.connect(tls.clone()).await.map_err(connect_error)?;
    let driver = tokio::spawn(async move {
        let _ = connection.await;
    });
    let outcome = async {
        let locked = match client
            .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
            .await
        {
            Ok(_) => true,
            // Some PostgreSQL-compatible engines lack advisory locks. The migrations are idempotent
            // (IF NOT EXISTS, and a version recorded twice is recorded once), so servers starting
            // together there may both run one; a collision fails a start, which is retried.
            Err(e)
                if e.code() == Some(&SqlState::UNDEFINED_FUNCTION)
                    || e.code() == Some(&SqlState::FEATURE_NOT_SUPPORTED) =>
            {
                tracing::warn!(error = %describe(&e), "no advisory locks: migrating without one");
                false
            }
            Err(e) => return Err(classify(e)),
        };
        client
            .batch_execute(
                // A second server finding the table logs a NOTICE for every `IF NOT EXISTS`; quiet.
                "SET client_min_messages = warning; \
                 CREATE TABLE IF NOT EXISTS schema_migrations (version BIGINT PRIMARY KEY)",
            )
            .await
            .map_err(classify)?;
        for (version, script) in sql::MIGRATIONS {
            let applied = client
                .query_opt(
                    "SELECT version FROM schema_migrations WHERE version = $1",
                    &[version],
                )
                .await
                .map_err(classify)?
                .is_some();
            if applied {
                continue;
            }
            let tx = client.transaction().await.map_err(classify)?;
            for statement in sql::split_script(script) {
                tx.batch_execute(statement)
                    .await
                    .map_err(|e| match classify(e) {
                        StoreError::Internal(why) => {
                            StoreError::Internal(format!("migration {version} failed: {why}"))
                        }
                        other => other,
                    })?;
            }
            tx.execute(
                "INSERT INTO schema_migrations (version) VALUES ($1) ON CONFLICT (version) DO NOTHING",
                &[version],
            )
            .await
            .map_err(classify)?;
            tx.commit().await.map_err(classify)?;
            tracing::info!(version, "applied a schema migration");
        }
        if locked {
            client
                .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK])
                .await
                .map_err(classify)?;
        }
        Ok(())
    }
    .await;
    drop(client);
    let _ = driver.await;
    outcome
}

/// Keeps one connection listening on [`CHANNEL`], reconnecting with backoff whenever it drops.
async fn listen(
    config: Config,
    tls: MakeRustlsConnect,
    notices: broadcast::Sender<Notice>,
    health: Arc<Health>,
    origin: String,
) {
    let mut backoff = LISTEN_BACKOFF_MIN;
    let mut listened_before = false;
    let mut refused_before = false;
    loop {
        match config.connect(tls.clone()).await {
            Ok((client, mut connection)) => {
                let messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
                let mut messages = std::pin::pin!(messages);
                let deliver = |message: AsyncMessage| {
                    if let AsyncMessage::Notification(n) = message {
                        for notice in decode_payload(n.payload(), &origin) {
                            let _ = notices.send(notice);
                        }
                    }
                };
                // The connection has to be driven for LISTEN to complete.
                let statement = format!("LISTEN {CHANNEL}");
                let mut subscribe = std::pin::pin!(client.batch_execute(&statement));
                // Err((whether the database was lost, why)).
                let subscribed = loop {
                    tokio::select! {
                        r = &mut subscribe => break match r {
                            Ok(()) => Ok(()),
                            Err(e) => Err((is_connection_failure(&e), describe(&e))),
                        },
                        m = messages.next() => match m {
                            Some(Ok(message)) => deliver(message),
                            Some(Err(e)) => break Err((true, e.to_string())),
                            None => break Err((true, "the connection closed".into())),
                        },
                    }
                };
                match subscribed {
                    Ok(()) => {
                        health.reached();
                        backoff = LISTEN_BACKOFF_MIN;
                        if std::mem::replace(&mut listened_before, true) {
                            // Whatever was announced while this connection was down is lost.
                            let _ = notices.send(Notice::Resync);
                        }
                        let why = loop {
                            match messages.next().await {
                                Some(Ok(message)) => deliver(message),
                                Some(Err(e)) => break e.to_string(),
                                None => break "the listening connection closed".to_owned(),
                            }
                        };
                        health.lost(&why);
                    }
                    Err((true, why)) => health.lost(&why),
                    Err((false, why)) => {
                        // An engine without LISTEN: correctness never needed it, only promptness.
                        if !std::mem::replace(&mut refused_before, true) {
                            tracing::warn!(error = %why, "the database refuses LISTEN; changes made \
                                through other servers reach this one on the dispatcher's tick");
                        }
                        backoff = LISTEN_BACKOFF_MAX;
                    }
                }
            }
            Err(e) if is_connection_failure(&e) => health.lost(&e.to_string()),
            Err(e) => tracing::warn!(error = %describe(&e), "cannot connect the listener"),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(LISTEN_BACKOFF_MAX);
    }
}

/// `{"o": origin, "w": [environment ids], "s": [session ids]}`.
fn encode_payloads(notices: &[Notice], origin: &str) -> Vec<String> {
    let mut payloads = Vec::new();
    let mut work = Vec::new();
    let mut sessions = Vec::new();
    let mut size = 0;
    let flush = |work: &mut Vec<&str>, sessions: &mut Vec<&str>, payloads: &mut Vec<String>| {
        if !work.is_empty() || !sessions.is_empty() {
            payloads.push(serde_json::json!({"o": origin, "w": work, "s": sessions}).to_string());
        }
        work.clear();
        sessions.clear();
    };
    for notice in notices {
        let id = match notice {
            Notice::WorkClaimable { environment_id } => environment_id.as_str(),
            Notice::Session { session_id } => session_id.as_str(),
            Notice::Resync => continue,
        };
        if size + id.len() + 4 > MAX_PAYLOAD - origin.len() - 32 {
            flush(&mut work, &mut sessions, &mut payloads);
            size = 0;
        }
        size += id.len() + 4;
        match notice {
            Notice::WorkClaimable { .. } => work.push(id),
            Notice::Session { .. } => sessions.push(id),
            Notice::Resync => {}
        }
    }
    flush(&mut work, &mut sessions, &mut payloads);
    payloads
}

fn decode_payload(payload: &str, origin: &str) -> Vec<Notice> {
    let Ok(value) = serde_json::from_str::<serde_json::Value>(payload) else {
        tracing::debug!(payload, "ignoring a notification that is not ours");
        return Vec::new();
    };
    if value["o"].as_str() == Some(origin) {
        return Vec::new();
    }
    let ids = |key: &str| -> Vec<String> {
        value[key]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut out: Vec<Notice> = ids("w")
        .into_iter()
        .map(|environment_id| Notice::WorkClaimable { environment_id })
        .collect();
    out.extend(
        ids("s")
            .into_iter()
            .map(|session_id| Notice::Session { session_id }),
    );
    out
}

/// Binds `value` as a parameter of type `ty` (as the server inferred it from the statement).
fn bind(value: &Value, ty: &Type) -> StoreResult<Box<dyn ToSql + Sync + Send>> {
    let mismatch =
        || StoreError::Internal(format!("cannot bind {value:?} to a parameter of type {ty}"));
    let text_like = matches!(
        *ty,
        Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME | Type::UNKNOWN
    );
    Ok(match value {
        Value::Null => match *ty {
            Type::INT8 => Box::new(None::<i64>),
            Type::INT4 => Box::new(None::<i32>),
            Type::INT2 => Box::new(None::<i16>),
            Type::BOOL => Box::new(None::<bool>),
            _ if text_like => Box::new(None::<String>),
            _ => return Err(mismatch()),
        },
        Value::Int(v) => match *ty {
            Type::INT8 => Box::new(*v),
            Type::INT4 => Box::new(i32::try_from(*v).map_err(|_| mismatch())?),
            Type::INT2 => Box::new(i16::try_from(*v).map_err(|_| mismatch())?),
            Type::BOOL => Box::new(*v != 0),
            _ => return Err(mismatch()),
        },
        Value::Text(t) if text_like => Box::new(t.clone()),
        Value::Text(_) => return Err(mismatch()),
    })
}

fn column(row: &tokio_postgres::Row, i: usize) -> StoreResult<Value> {
    let ty = row.columns()[i].type_();
    let fail = |e: tokio_postgres::Error| StoreError::Internal(format!("column {i}: {e}"));
    Ok(match *ty {
        Type::INT8 => row
            .try_get::<_, Option<i64>>(i)
            .map_err(fail)?
            .map_or(Value::Null, Value::Int),
        Type::INT4 => row
            .try_get::<_, Option<i32>>(i)
            .map_err(fail)?
            .map_or(Value::Null, |v| Value::Int(v.into())),
        Type::INT2 => row
            .try_get::<_, Option<i16>>(i)
            .map_err(fail)?
            .map_or(Value::Null, |v| Value::Int(v.into())),
        Type::BOOL => row
            .try_get::<_, Option<bool>>(i)
            .map_err(fail)?
            .map_or(Value::Null, |v| Value::Int(v.into())),
        Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME => row
            .try_get::<_, Option<String>>(i)
            .map_err(fail)?
            .map_or(Value::Null, Value::Text),
        ref other => {
            return Err(StoreError::Internal(format!(
                "column {i} has type {other}, which the shared SQL never produces (cast it to BIGINT or TEXT)"
            )))
        }
    })
}

/// Whether an error means the database went away (as opposed to refusing one statement).
fn is_connection_failure(e: &tokio_postgres::Error) -> bool {
    if let Some(code) = e.code() {
        let c = code.code();
        return c.starts_with("08")
            || *code == SqlState::ADMIN_SHUTDOWN
            || *code == SqlState::CRASH_SHUTDOWN
            || *code == SqlState::CANNOT_CONNECT_NOW;
    }
    if e.is_closed() {
        return true;
    }
    let text = e.to_string();
    [
        "error communicating with the server",
        "error connecting to server",
        "timeout waiting for server",
        "error performing TLS handshake",
        "unexpected message from server",
    ]
    .iter()
    .any(|prefix| text.starts_with(prefix))
}

/// Maps an error to the store's vocabulary. Unique violations and serialization failures are lost
/// races (re-read and retry); a lost connection or a server that refuses service is `Unavailable`.
fn classify(e: tokio_postgres::Error) -> StoreError {
    if let Some(code) = e.code() {
        if *code == SqlState::UNIQUE_VIOLATION
            || *code == SqlState::T_R_SERIALIZATION_FAILURE
            || *code == SqlState::T_R_DEADLOCK_DETECTED
        {
            return StoreError::Conflict;
        }
        // Too many connections, out of memory or disk: the server is there but refuses service.
        if code.code().starts_with("53") || code.code().starts_with("57P") {
            return StoreError::Unavailable(describe(&e));
        }
    }
    if is_connection_failure(&e) {
        return StoreError::Unavailable(describe(&e));
    }
    StoreError::Internal(describe(&e))
}

fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        None => match std::error::Error::source(e) {
            Some(source) => format!("{e}: {source}"),
            None => e.to_string(),
        },
    }
}

fn connect_error(e: tokio_postgres::Error) -> StoreError {
    match classify(e) {
        StoreError::Internal(m) => StoreError::Unavailable(m),
        other => other,
    }
}

/// A failure together with whether the transaction could not have committed (so retrying on a fresh
/// connection is safe).
struct Failure {
    error: StoreError,
    before_commit: bool,
}

impl PostgresExecutor {
    async fn client(&self) -> StoreResult<deadpool_postgres::Object> {
        match self.pool.get().await {
            Ok(client) => Ok(client),
            Err(PoolError::Backend(e)) => {
                if is_connection_failure(&e) {
                    self.health.lost(&e.to_string());
                }
                Err(connect_error(e))
            }
            Err(PoolError::Timeout(deadpool_postgres::TimeoutType::Wait)) => Err(
                StoreError::Unavailable("every database connection is busy".into()),
            ),
            Err(e) => {
                self.health.lost(&e.to_string());
                Err(StoreError::Unavailable(format!(
                    "cannot reach the database: {e}"
                )))
            }
        }
    }

    /// Notes a connection-level failure; the caller still sees the mapped error.
    fn observe(&self, e: tokio_postgres::Error) -> StoreError {
        if is_connection_failure(&e) {
            self.health.lost(&e.to_string());
        }
        classify(e)
    }

    /// Once, after a lost connection that left no doubt that nothing was committed: the next
    /// attempt takes a fresh connection. A busy pool is not retried, the caller already waited.
    fn worth_retrying<T>(&self, outcome: &Result<T, Failure>) -> bool {
        matches!(
            outcome,
            Err(Failure {
                error: StoreError::Unavailable(_),
                before_commit: true,
            })
        ) && self.health.lost.load(Ordering::SeqCst)
    }

    async fn query_once(&self, statement: &Statement) -> Result<Vec<Row>, Failure> {
        let client = self.client().await.map_err(|error| Failure {
            error,
            before_commit: true,
        })?;
        let fail = |e: tokio_postgres::Error| Failure {
            error: self.observe(e),
            before_commit: true,
        };
        let prepared = client.prepare_cached(&statement.sql).await.map_err(fail)?;
        let params = bind_all(&statement.params, prepared.params()).map_err(|error| Failure {
            error,
            before_commit: false,
        })?;
        let rows = client
            .query(&prepared, &refs(&params))
            .await
            .map_err(fail)?;
        rows.iter()
            .map(|row| (0..row.len()).map(|i| column(row, i)).collect())
            .collect::<StoreResult<Vec<Row>>>()
            .map_err(|error| Failure {
                error,
                before_commit: false,
            })
    }

    async fn execute_once(&self, statements: &[(Statement, Expect)]) -> Result<(), Failure> {
        let mut client = self.client().await.map_err(|error| Failure {
            error,
            before_commit: true,
        })?;
        let fail = |e: tokio_postgres::Error| Failure {
            error: self.observe(e),
            before_commit: true,
        };
        let refused = |error: StoreError| Failure {
            error,
            before_commit: false,
        };
        // A lone statement is atomic by itself: skip BEGIN/COMMIT and their round trips.
        if let [(statement, expect)] = statements {
            let prepared = client.prepare_cached(&statement.sql).await.map_err(fail)?;
            let params = bind_all(&statement.params, prepared.params()).map_err(refused)?;
            let changed = client
                .execute(&prepared, &refs(&params))
                .await
                .map_err(|e| Failure {
                    // The statement may have committed before the connection dropped.
                    before_commit: !is_connection_failure(&e),
                    error: self.observe(e),
                })?;
            return match expect {
                Expect::OneRow if changed != 1 => Err(refused(StoreError::Conflict)),
                _ => Ok(()),
            };
        }
        let tx = client.transaction().await.map_err(fail)?;
        for (statement, expect) in statements {
            let prepared = tx.prepare_cached(&statement.sql).await.map_err(fail)?;
            let params = bind_all(&statement.params, prepared.params()).map_err(refused)?;
            let changed = tx.execute(&prepared, &refs(&params)).await.map_err(fail)?;
            if *expect == Expect::OneRow && changed != 1 {
                // Dropping the transaction rolls it back.
                return Err(refused(StoreError::Conflict));
            }
        }
        tx.commit().await.map_err(|e| Failure {
            before_commit: false,
            error: self.observe(e),
        })
    }
}

fn bind_all(values: &[Value], types: &[Type]) -> StoreResult<Vec<Box<dyn ToSql + Sync + Send>>> {
    if values.len() != types.len() {
        return Err(StoreError::Internal(format!(
            "the statement takes {} parameters, {} given",
            types.len(),
            values.len()
        )));
    }
    values.iter().zip(types).map(|(v, t)| bind(v, t)).collect()
}

fn refs(params: &[Box<dyn ToSql + Sync + Send>]) -> Vec<&(dyn ToSql + Sync)> {
    params
        .iter()
        .map(|p| p.as_ref() as &(dyn ToSql + Sync))
        .collect()
}

#[async_trait]
impl Executor for PostgresExecutor {
    fn backend(&self) -> &'static str {
        "postgres"
    }

    async fn query(&self, statement: Statement) -> StoreResult<Vec<Row>> {
        // A read is always safe to repeat; one retry covers a pooled connection that died with a
        // restarted database before anyone noticed.
        let mut outcome = self.query_once(&statement).await;
        if self.worth_retrying(&outcome) {
            outcome = self.query_once(&statement).await;
        }
        match outcome {
            Ok(rows) => {
                self.health.reached();
                Ok(rows)
            }
            Err(f) => Err(f.error),
        }
    }

    async fn execute(&self, statements: Vec<(Statement, Expect)>) -> StoreResult<()> {
        let started = std::time::Instant::now();
        let mut outcome = self.execute_once(&statements).await;
        if self.worth_retrying(&outcome) {
            outcome = self.execute_once(&statements).await;
        }
        metrics::histogram!("tether_store_commit_duration_seconds")
            .record(started.elapsed().as_secs_f64());
        match outcome {
            Ok(()) => {
                self.health.reached();
                Ok(())
            }
            Err(Failure {
                error: StoreError::Conflict,
                ..
            }) => {
                // A refused condition is still an answer from the database.
                self.health.reached();
                Err(StoreError::Conflict)
            }
            Err(f) => Err(f.error),
        }
    }

    async fn announce(&self, notices: Vec<Notice>) -> StoreResult<()> {
        let payloads = encode_payloads(&notices, &self.origin);
        if payloads.is_empty() {
            return Ok(());
        }
        let client = self.client().await?;
        for payload in payloads {
            client
                .execute("SELECT pg_notify($1, $2)", &[&CHANNEL, &payload])
                .await
                .map_err(|e| self.observe(e))?;
        }
        Ok(())
    }

    fn subscribe(&self) -> broadcast::Receiver<Notice> {
        self.notices.subscribe()
    }

    fn reconnections(&self) -> u64 {
        self.health.reconnections.load(Ordering::SeqCst)
    }

    fn losses(&self) -> u64 {
        self.health.losses.load(Ordering::SeqCst)
    }

    fn in_outage(&self) -> bool {
        self.health.lost.load(Ordering::SeqCst)
    }
}

/// Milliseconds since the epoch, process id and a counter: unique across processes and calls, and
/// sortable by creation time.
fn unique_suffix() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let millis = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or_default();
    format!(
        "{millis:013x}_{:x}_{:x}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

const TEST_DATABASE_PREFIX: &str = "tether_test_";
/// Test databases older than this are dropped by the next test that creates one.
const TEST_DATABASE_MAX_AGE: Duration = Duration::from_secs(6 * 3600);

/// Creates a uniquely named database on the server at `admin_url` (which must allow `CREATE DATABASE`)
/// and returns a URL naming it. Test databases left behind by earlier runs are dropped once they are
/// old enough that no running test can still use them.
pub async fn create_test_database(admin_url: &str) -> StoreResult<String> {
    let tls::Connection { config, tls, .. } = tls::parse(admin_url)?;
    let (client, connection) = config.connect(tls).await.map_err(connect_error)?;
    let driver = tokio::spawn(async move {
        let _ = connection.await;
    });
    let name = format!("{TEST_DATABASE_PREFIX}{}", unique_suffix());
    let outcome = async {
        let mut attempts = 0;
        loop {
            // Two CREATE DATABASE at once may collide on the template; that passes quickly.
            match client
                .batch_execute(&format!("CREATE DATABASE \"{name}\""))
                .await
            {
                Ok(()) => break,
                Err(e) if attempts < 20 && e.code() == Some(&SqlState::OBJECT_IN_USE) => {
                    attempts += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => return Err(classify(e)),
            }
        }
        drop_stale_test_databases(&client).await;
        Ok(())
    }
    .await;
    drop(client);
    let _ = driver.await;
    outcome?;
    Ok(with_database(admin_url, &name))
}

async fn drop_stale_test_databases(client: &tokio_postgres::Client) {
    let Ok(rows) = client
        .query(
            "SELECT datname::TEXT FROM pg_database WHERE starts_with(datname, $1)",
            &[&TEST_DATABASE_PREFIX],
        )
        .await
    else {
        return;
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or_default();
    for row in rows {
        let name: String = row.get(0);
        let created = name
            .strip_prefix(TEST_DATABASE_PREFIX)
            .and_then(|rest| rest.split('_').next())
            .and_then(|hex| u128::from_str_radix(hex, 16).ok());
        if let Some(created) = created {
            if now.saturating_sub(created) > TEST_DATABASE_MAX_AGE.as_millis() {
                let _ = client
                    .batch_execute(&format!("DROP DATABASE IF EXISTS \"{name}\""))
                    .await;
            }
        }
    }
}

/// `url` with its database replaced by `database`, in whichever of the two connection-string forms
/// it was written.
pub fn with_database(url: &str, database: &str) -> String {
    let Some(scheme_end) = url
        .strip_prefix("postgres://")
        .map(|_| "postgres://".len())
        .or_else(|| {
            url.strip_prefix("postgresql://")
                .map(|_| "postgresql://".len())
        })
    else {
        // key=value form: a later key overrides an earlier one.
        return format!("{url} dbname={database}");
    };
    let (base, query) = match url.find('?') {
        Some(q) => (&url[..q], &url[q..]),
        None => (url, ""),
    };
    let authority_end = base[scheme_end..]
        .find('/')
        .map_or(base.len(), |i| scheme_end + i);
    format!("{}/{database}{query}", &base[..authority_end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_names_are_replaced_in_both_url_forms() {
        assert_eq!(
            with_database("postgresql://postgres@127.0.0.1:54329/postgres", "t1"),
            "postgresql://postgres@127.0.0.1:54329/t1"
        );
        assert_eq!(
            with_database("postgres://u:p@h:1", "t1"),
            "postgres://u:p@h:1/t1"
        );
        assert_eq!(
            with_database("postgres://u@h/db?host=/tmp/sock&sslmode=disable", "t1"),
            "postgres://u@h/t1?host=/tmp/sock&sslmode=disable"
        );
        assert_eq!(
            with_database("host=/tmp user=postgres dbname=postgres", "t1"),
            "host=/tmp user=postgres dbname=postgres dbname=t1"
        );
    }

    #[test]
    fn payloads_round_trip_and_skip_their_origin() {
        let notices = vec![
            Notice::WorkClaimable {
                environment_id: "env_1".into(),
            },
            Notice::Session {
                session_id: "sess_1".into(),
            },
        ];
        let payloads = encode_payloads(&notices, "me");
        assert_eq!(payloads.len(), 1);
        assert_eq!(decode_payload(&payloads[0], "other"), notices);
        assert!(decode_payload(&payloads[0], "me").is_empty());
        assert!(decode_payload("not json", "other").is_empty());
    }

    #[test]
    fn large_announcements_are_split_below_the_payload_limit() {
        let notices: Vec<Notice> = (0..2_000)
            .map(|i| Notice::WorkClaimable {
                environment_id: format!("env_{i:032x}"),
            })
            .collect();
        let payloads = encode_payloads(&notices, "me");
        assert!(payloads.len() > 1);
        assert!(payloads.iter().all(|p| p.len() < 8_000));
        let decoded: Vec<Notice> = payloads
            .iter()
            .flat_map(|p| decode_payload(p, "other"))
            .collect();
        assert_eq!(decoded, notices);
    }
}

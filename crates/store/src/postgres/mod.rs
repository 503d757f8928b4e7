//! The PostgreSQL backend: several server processes sharing one database act as one server.
//!
//! Every change set runs in one transaction on a pooled connection. Its conditions are the same
//! conditional `UPDATE … WHERE version = $n` statements SQLite runs, so two processes that decided from
//! the same read cannot both win: the second finds no row to update and gets [`StoreError::Conflict`],
//! re-reads and decides again. Nothing here keeps state that another process would need to see, and
//! the SQL is plain enough for PostgreSQL-compatible distributed engines.
//!
//! Processes wake each other's long polls and session streams with `NOTIFY` on one channel, sent by
//! one task per process in batches (`announcer`). That is a hint only: a notification sent while a listener was reconnecting is lost, and the dispatcher's
//! periodic re-check (§3.1) is what guarantees progress.
//!
//! Losing the database is reported as [`StoreError::Unavailable`] (503 to clients). The executor also
//! counts the times it got the database back ([`crate::Store::reconnections`]), which the service uses to
//! grant lease amnesty, so that time the database was away never counts against a worker.

mod announcer;
mod executor;
mod listener;
mod migrations;

pub use executor::PostgresExecutor;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio::sync::broadcast;
use tokio_postgres::error::SqlState;

use self::listener::{listen, Health, NOTICE_BUFFER};
use self::migrations::migrate;
use crate::executor::SqlStore;
use crate::tls;
use crate::{StoreError, StoreResult};

/// The channel every process listens on.
pub const CHANNEL: &str = "tether";
/// Connections per process (the listener has its own).
pub const POOL_SIZE: usize = 16;
/// How long a request waits for a pooled connection, or for a new one, before answering 503.
const POOL_WAIT: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

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
    let announcer = Arc::new(announcer::Announcer::default());
    let sender = tokio::spawn(announcer::send(announcer.clone(), pool.clone(), origin));
    Ok(SqlStore::new(PostgresExecutor {
        pool,
        notices,
        health,
        listener,
        announcer,
        sender,
    }))
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
        if *code == SqlState::DISK_FULL {
            return StoreError::Full(describe(&e));
        }
        // Too many connections, out of memory: the server is there but refuses service.
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

/// Milliseconds since the epoch (hex), process id and a counter: unique across processes and calls,
/// and sortable by creation time. Also names the test databases (tether-testkit), whose age is read
/// back from the name.
pub fn unique_suffix() -> String {
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

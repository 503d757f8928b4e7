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
//! counts the times it got the database back ([`crate::Store::reconnections`]), which the service uses to
//! grant lease amnesty, so that time the database was away never counts against a worker.

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
    Ok(SqlStore::new(PostgresExecutor {
        pool,
        notices,
        health,
        origin,
        listener,
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
}

//! Throwaway PostgreSQL databases for tests: each test server (or store under test) gets a database of
//! its own on the server a test run names, so tests never see each other's rows. Databases that earlier
//! runs left behind are dropped once no running test can still use them ([`is_stale`]).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use tether_store::postgres::unique_suffix;
use tokio_postgres::error::SqlState;

const TEST_DATABASE_PREFIX: &str = "tether_test_";
/// Test databases older than this are dropped by the next test that creates one.
const TEST_DATABASE_MAX_AGE: Duration = Duration::from_secs(6 * 3600);
/// Test databases older than this that nobody is connected to are dropped too: a test holds its
/// database's connections while it runs, and none runs this long. A suite run on a long-lived
/// cluster (`scripts/pg start`) would otherwise leave hundreds of databases behind for hours.
const TEST_DATABASE_IDLE_AGE: Duration = Duration::from_secs(15 * 60);

/// Whether a test database created at `created` (ms since the epoch) is left over at `now`.
fn is_stale(created: u128, now: u128, connected: bool) -> bool {
    let age = now.saturating_sub(created);
    age > TEST_DATABASE_MAX_AGE.as_millis()
        || (!connected && age > TEST_DATABASE_IDLE_AGE.as_millis())
}

/// Creates a uniquely named database on the server at `admin_url` (which must allow `CREATE DATABASE`)
/// and returns a URL naming it. Test databases left behind by earlier runs are dropped once they are
/// old enough that no running test can still use them.
pub async fn create_test_database(admin_url: &str) -> anyhow::Result<String> {
    let tether_store::tls::Connection { config, tls, .. } = tether_store::tls::parse(admin_url)?;
    let (client, connection) = config
        .connect(tls)
        .await
        .with_context(|| format!("cannot connect to the PostgreSQL server at {admin_url}"))?;
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
                Err(e) => return Err(e).with_context(|| format!("cannot create database {name}")),
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
            "SELECT d.datname::TEXT, \
               EXISTS (SELECT 1 FROM pg_stat_activity a WHERE a.datname = d.datname) \
             FROM pg_database d WHERE starts_with(d.datname, $1)",
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
        let connected: bool = row.get(1);
        let created = name
            .strip_prefix(TEST_DATABASE_PREFIX)
            .and_then(|rest| rest.split('_').next())
            .and_then(|hex| u128::from_str_radix(hex, 16).ok());
        if let Some(created) = created {
            if is_stale(created, now, connected) {
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
    fn a_database_is_stale_when_old_or_idle_for_long() {
        let minute = 60_000;
        let now = 1_000_000 * minute;
        for (age_minutes, connected, stale) in [
            (1, false, false),
            (14, false, false),
            (16, false, true),
            (16, true, false),
            (359, true, false),
            (361, true, true),
        ] {
            assert_eq!(
                is_stale(now - age_minutes * minute, now, connected),
                stale,
                "{age_minutes} min, connected {connected}"
            );
        }
    }

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

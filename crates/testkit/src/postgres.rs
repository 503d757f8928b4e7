//! Throwaway PostgreSQL databases for tests: each test server (or store under test) gets a database of
//! its own on the server a test run names, so tests never see each other's rows. Databases that earlier
//! runs left behind are dropped once they are old enough that no running test can still use them.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use tether_store::postgres::unique_suffix;
use tokio_postgres::error::SqlState;

const TEST_DATABASE_PREFIX: &str = "tether_test_";
/// Test databases older than this are dropped by the next test that creates one.
const TEST_DATABASE_MAX_AGE: Duration = Duration::from_secs(6 * 3600);

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

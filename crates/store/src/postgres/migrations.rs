//! Schema migrations, applied once across every process starting on the same database.

use tokio_postgres::error::SqlState;
use tokio_postgres::Config;
use tokio_postgres_rustls::MakeRustlsConnect;

use super::{classify, connect_error, describe};
use crate::sql;
use crate::{StoreError, StoreResult};

/// Arbitrary, fixed key of the advisory lock that serialises migrations across processes.
const MIGRATION_LOCK: i64 = 0x7e7e_0001;

/// Applies the migrations not yet recorded in `schema_migrations`. Servers starting together queue on
/// an advisory lock, so each migration runs exactly once; the lock belongs to a connection of its own
/// and goes away with it, whatever happens here.
pub(super) async fn migrate(config: &Config, tls: &MakeRustlsConnect) -> StoreResult<()> {
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
            // Some PostgreSQL-compatible engines lack advisory locks. Servers starting together there
            // may both run a migration: most are idempotent (IF NOT EXISTS, and a version recorded
            // twice is recorded once); the second run of one that is not (migration 3 adds a column)
            // fails in its transaction, which fails that start, and the retried start finds it done.
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
        let newest: Option<i64> = client
            .query_one(sql::NEWEST_MIGRATION, &[])
            .await
            .map_err(classify)?
            .get(0);
        sql::check_schema_known(newest)?;
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

//! The pooled executor: every change set in one transaction on a pooled connection, a lone statement
//! without BEGIN/COMMIT, one retry after a connection loss that left no doubt nothing committed, and
//! the mapping between the shared SQL's values and PostgreSQL's types.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use deadpool_postgres::{Pool, PoolError};
use tokio::sync::broadcast;
use tokio_postgres::types::{ToSql, Type};

use super::announcer::Announcer;
use super::listener::Health;
use super::{classify, connect_error, is_connection_failure};
use crate::executor::Executor;
use crate::sql::{Expect, Row, Statement, Value};
use crate::{Notice, StoreError, StoreResult};

pub struct PostgresExecutor {
    pub(super) pool: Pool,
    pub(super) notices: broadcast::Sender<Notice>,
    pub(super) health: Arc<Health>,
    pub(super) listener: tokio::task::JoinHandle<()>,
    pub(super) announcer: Arc<Announcer>,
    pub(super) sender: tokio::task::JoinHandle<()>,
}

impl Drop for PostgresExecutor {
    fn drop(&mut self) {
        self.listener.abort();
        self.sender.abort();
    }
}

/// A failure together with whether the transaction could not have committed (so retrying on a fresh
/// connection is safe).
struct Failure {
    error: StoreError,
    before_commit: bool,
    /// Why the connection it ran on ended, when it did (see [`PostgresExecutor::noted_cut`]).
    cut: Option<String>,
}

impl Failure {
    /// Nothing was sent that could have committed: another connection may try again.
    fn retry_safe(error: StoreError) -> Self {
        Failure {
            error,
            before_commit: true,
            cut: None,
        }
    }

    /// The statement was refused for itself, or may have committed: not to be tried again.
    fn no_retry(error: StoreError) -> Self {
        Failure {
            error,
            before_commit: false,
            cut: None,
        }
    }

    /// `e`, from a connection that was already open; `before_commit` as for [`Failure`].
    fn on_connection(e: tokio_postgres::Error, before_commit: bool) -> Self {
        Failure {
            cut: is_connection_failure(&e).then(|| super::describe(&e)),
            error: classify(e),
            before_commit,
        }
    }
}

impl PostgresExecutor {
    async fn client(&self) -> StoreResult<deadpool_postgres::Object> {
        match self.pool.get().await {
            Ok(client) => Ok(client),
            Err(PoolError::Backend(e)) => {
                if is_connection_failure(&e) {
                    self.health.lost(&super::describe(&e));
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

    /// A pooled connection that ended under a statement is not by itself a lost database: a proxy, a
    /// firewall's idle timeout or an operator may cut one while the database stays up, and each lost
    /// database costs every live lease an amnesty once it is back. So the cut counts as the loss only
    /// when the database does not answer a fresh connection either, as for the listener's cuts.
    /// (A statement tried again after the cut is that fresh connection: its success settles it.)
    ///
    /// A look that gets no answer within the probe's 2 s counts as the loss too, as for the
    /// listener: a proxy that cut the old connections may hold the new ones. Only a pool whose
    /// connections are all busy decides nothing (they are in use, so the database answers them).
    async fn noted_cut(&self, why: &str) {
        if self.health.lost.load(Ordering::SeqCst) {
            return;
        }
        let lost = tokio::time::timeout(super::listener::PROBE_TIMEOUT, async {
            // The pooled connections handed out next may have been cut with this one. Each that
            // fails is dropped from the pool, so the pool's size in tries reaches a new one.
            for _ in 0..=super::POOL_SIZE {
                match self.pool.get().await {
                    Ok(client) => match client.simple_query("").await {
                        Err(e) if is_connection_failure(&e) => {}
                        _ => return false,
                    },
                    Err(PoolError::Timeout(deadpool_postgres::TimeoutType::Wait)) => return false,
                    Err(PoolError::Backend(e)) => return is_connection_failure(&e),
                    Err(_) => return true,
                }
            }
            true
        })
        .await
        .unwrap_or(true);
        if lost {
            self.health.lost(why);
        }
    }

    /// Once, after a lost connection that left no doubt that nothing was committed: the next
    /// attempt takes a fresh connection. A busy pool is not retried, the caller already waited.
    fn worth_retrying<T>(&self, outcome: &Result<T, Failure>) -> bool {
        match outcome {
            Err(Failure {
                error: StoreError::Unavailable(_),
                before_commit: true,
                cut,
            }) => cut.is_some() || self.health.lost.load(Ordering::SeqCst),
            _ => false,
        }
    }

    /// The error a call ends with, once a cut connection under it was looked into.
    async fn failed(&self, failure: Failure) -> StoreError {
        if let Some(why) = &failure.cut {
            self.noted_cut(why).await;
        }
        failure.error
    }

    /// `attempt`, and once more when [`Self::worth_retrying`]; both under [`Self::while_answering`].
    async fn attempted<T, Attempt>(&self, attempt: impl Fn() -> Attempt) -> Result<T, Failure>
    where
        Attempt: std::future::Future<Output = Result<T, Failure>>,
    {
        self.while_answering(async {
            let outcome = attempt().await;
            if !self.worth_retrying(&outcome) {
                return outcome;
            }
            let first_cut = outcome.err().and_then(|f| f.cut);
            // A retry that fails without a cut of its own still ends a call that met one.
            attempt().await.map_err(|mut failure| {
                failure.cut = failure.cut.or(first_cut);
                failure
            })
        })
        .await
    }

    /// Runs `operation` unless the database stops answering meanwhile ([`Health::unresponsive`]);
    /// while it is taken as not answering, for as long as a probe may take. Given up, it is
    /// `Unavailable`. What it had sent may still commit once the database answers again: like a
    /// lost connection's, its outcome is unknown to the caller, who was answered nothing but 503.
    async fn while_answering<T>(
        &self,
        operation: impl std::future::Future<Output = Result<T, Failure>>,
    ) -> Result<T, Failure> {
        let unanswered = || {
            Err(Failure::no_retry(StoreError::Unavailable(
                "the database does not answer".into(),
            )))
        };
        let mut unresponsive = self.health.unresponsive.subscribe();
        let probes_failed = self.health.unanswered_probes.load(Ordering::SeqCst);
        if !*unresponsive.borrow_and_update() {
            return tokio::select! {
                biased;
                _ = unresponsive.wait_for(|unresponsive| *unresponsive) => unanswered(),
                outcome = operation => outcome,
            };
        }
        // Taken as unresponsive: this statement gets as long as a probe to answer, and its answer
        // (a refusal is one too) ends the outage as the listener's would, should the listener be
        // unable to get through itself (no connection slot left for it, say).
        let outcome = match tokio::time::timeout(super::listener::PROBE_TIMEOUT, operation).await {
            Ok(outcome) => outcome,
            Err(_) => return unanswered(),
        };
        if matches!(
            &outcome,
            Ok(_)
                | Err(Failure {
                    error: StoreError::Conflict,
                    ..
                })
        ) {
            self.health.answered_since(probes_failed);
        }
        outcome
    }

    async fn query_once(&self, statement: &Statement) -> Result<Vec<Row>, Failure> {
        let client = self.client().await.map_err(Failure::retry_safe)?;
        let fail = |e| Failure::on_connection(e, true);
        let prepared = client.prepare_cached(&statement.sql).await.map_err(fail)?;
        let params = bind_all(&statement.params, prepared.params()).map_err(Failure::no_retry)?;
        let rows = client
            .query(&prepared, &refs(&params))
            .await
            .map_err(fail)?;
        rows.iter()
            .map(|row| (0..row.len()).map(|i| column(row, i)).collect())
            .collect::<StoreResult<Vec<Row>>>()
            .map_err(Failure::no_retry)
    }

    /// `sent` is set once what could commit the write has gone out (COMMIT, or a lone statement):
    /// from then on a failure leaves the write's outcome unknown.
    async fn execute_once(
        &self,
        statements: &[(Statement, Expect)],
        sent: &AtomicBool,
    ) -> Result<(), Failure> {
        let mut client = self.client().await.map_err(Failure::retry_safe)?;
        let fail = |e| Failure::on_connection(e, true);
        // A lone statement is atomic by itself: skip BEGIN/COMMIT and their round trips.
        if let [(statement, expect)] = statements {
            let prepared = client.prepare_cached(&statement.sql).await.map_err(fail)?;
            let params =
                bind_all(&statement.params, prepared.params()).map_err(Failure::no_retry)?;
            sent.store(true, Ordering::SeqCst);
            let changed = client
                .execute(&prepared, &refs(&params))
                .await
                .map_err(|e| {
                    // The statement may have committed before the connection dropped.
                    let before_commit = !is_connection_failure(&e);
                    Failure::on_connection(e, before_commit)
                })?;
            return if expect.met_by(changed) {
                Ok(())
            } else {
                Err(Failure::no_retry(StoreError::Conflict))
            };
        }
        let tx = client.transaction().await.map_err(fail)?;
        // The statements go out together (tokio-postgres pipelines requests polled at once): one round
        // trip for the whole list instead of one per statement. Each still runs after the one before it,
        // and the outcome is the first failure in order, as if they had run one by one; whatever the
        // statements after a failure did is rolled back with the rest (dropping the transaction rolls
        // it back), and COMMIT is sent only after every result has been checked.
        let prepared = futures::future::try_join_all(
            statements
                .iter()
                .map(|(statement, _)| tx.prepare_cached(&statement.sql)),
        )
        .await
        .map_err(fail)?;
        let params = statements
            .iter()
            .zip(&prepared)
            .map(|((statement, _), prepared)| bind_all(&statement.params, prepared.params()))
            .collect::<StoreResult<Vec<_>>>()
            .map_err(Failure::no_retry)?;
        let params: Vec<_> = params.iter().map(Vec::as_slice).map(refs).collect();
        let outcomes = futures::future::join_all(
            prepared
                .iter()
                .zip(&params)
                .map(|(prepared, params)| tx.execute(prepared, params)),
        )
        .await;
        for ((_, expect), outcome) in statements.iter().zip(outcomes) {
            let changed = outcome.map_err(fail)?;
            if !expect.met_by(changed) {
                return Err(Failure::no_retry(StoreError::Conflict));
            }
        }
        sent.store(true, Ordering::SeqCst);
        tx.commit()
            .await
            .map_err(|e| Failure::on_connection(e, false))
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

    fn shared(&self) -> bool {
        true
    }

    async fn query(&self, statement: Statement) -> StoreResult<Vec<Row>> {
        // A read is always safe to repeat; one retry covers a pooled connection that died with a
        // restarted database before anyone noticed.
        let outcome = self.attempted(|| self.query_once(&statement)).await;
        match outcome {
            Ok(rows) => {
                self.health.reached();
                Ok(rows)
            }
            Err(f) => Err(self.failed(f).await),
        }
    }

    async fn execute(&self, statements: Vec<(Statement, Expect)>) -> StoreResult<()> {
        let started = std::time::Instant::now();
        let sent = AtomicBool::new(false);
        let outcome = self
            .attempted(|| self.execute_once(&statements, &sent))
            .await;
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
            Err(f) => {
                // COMMIT, or a lone statement, went out before the connection was lost or the
                // database stopped answering: nothing says whether it committed. A write still
                // waiting for a connection, or stopped before its COMMIT, is known not to have.
                let unknown = sent.load(Ordering::SeqCst) && f.error.is_unavailable();
                match self.failed(f).await {
                    StoreError::Unavailable(reason) if unknown => {
                        Err(StoreError::OutcomeUnknown(reason))
                    }
                    error => Err(error),
                }
            }
        }
    }

    async fn announce(&self, notices: Vec<Notice>) -> StoreResult<()> {
        // Sent by the announcer's task, together with whatever else gathers meanwhile.
        self.announcer.queue(notices);
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

//! The PostgreSQL backend (several server processes sharing one database).

use crate::executor::SqlStore;
use crate::{StoreError, StoreResult};

/// Placeholder until the backend lands: refuses clearly instead of pretending.
pub struct PostgresExecutor;

pub async fn connect(_url: &str) -> StoreResult<SqlStore<crate::sqlite::SqliteExecutor>> {
    Err(StoreError::Unavailable(
        "the PostgreSQL backend is not built into this version".into(),
    ))
}

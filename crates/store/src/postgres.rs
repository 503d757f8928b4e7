//! The PostgreSQL backend (several server processes sharing one database).

use crate::executor::SqlStore;
use crate::{StoreError, StoreResult};

/// Not yet built: refuses clearly instead of pretending.
pub async fn connect(_url: &str) -> StoreResult<SqlStore<crate::sqlite::SqliteExecutor>> {
    Err(StoreError::Unavailable("the PostgreSQL backend is not built into this version".into()))
}

/// Creates a fresh database for a test and returns its URL.
pub async fn create_test_database(_admin_url: &str) -> StoreResult<String> {
    Err(StoreError::Unavailable("the PostgreSQL backend is not built into this version".into()))
}

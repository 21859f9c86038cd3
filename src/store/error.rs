//! The store's own small error type; the HTTP layer maps it to problem+json.

/// What can go wrong in the store, as far as its callers need to know.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A live spray of the same room or sprayer already holds the token.
    #[error("the token is held by a live spray of this room or sprayer")]
    TokenTaken,
    /// The database cannot be reached or is overloaded; retrying later may work.
    #[error("the database is unavailable: {0}")]
    Unavailable(String),
    /// The stored data breaks an invariant the code relies on.
    #[error("stored data is inconsistent: {0}")]
    Corrupt(String),
    /// The store is misconfigured (a bad URL, a migration failure).
    #[error("store configuration error: {0}")]
    Config(String),
    /// Anything else the database said.
    #[error("database error: {0}")]
    Other(String),
}

impl From<sqlx::Error> for StoreError {
    fn from(error: sqlx::Error) -> StoreError {
        use sqlx::Error as E;
        match &error {
            E::PoolTimedOut | E::PoolClosed | E::Io(_) | E::WorkerCrashed => {
                StoreError::Unavailable(error.to_string())
            }
            E::Database(db) if is_transient(db.as_ref()) => StoreError::Unavailable(error.to_string()),
            E::Configuration(_) | E::Tls(_) => StoreError::Config(error.to_string()),
            _ => StoreError::Other(error.to_string()),
        }
    }
}

impl From<sqlx::migrate::MigrateError> for StoreError {
    fn from(error: sqlx::migrate::MigrateError) -> StoreError {
        match error {
            sqlx::migrate::MigrateError::Execute(inner) => StoreError::from(inner),
            other => StoreError::Config(other.to_string()),
        }
    }
}

/// Errors that say "try again": SQLite busy or locked, MySQL lock wait timeout,
/// deadlock, too many connections, server gone away.
fn is_transient(db: &dyn sqlx::error::DatabaseError) -> bool {
    let code = db.code();
    matches!(
        code.as_deref(),
        Some("5" | "6" | "261" | "517" | "1205" | "1213" | "1040" | "2006" | "2013" | "40001")
    ) && !db.is_unique_violation()
}

/// True when the error is a unique-constraint violation.
pub(crate) fn is_unique_violation(error: &sqlx::Error) -> bool {
    matches!(error, sqlx::Error::Database(db) if db.is_unique_violation())
}

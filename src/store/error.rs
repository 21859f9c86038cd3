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
    /// The transaction lost a deadlock or a lock wait; running it again may succeed.
    #[error("transaction conflict: {0}")]
    Conflict(String),
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
            E::Database(db) if is_conflict(db.as_ref()) => StoreError::Conflict(error.to_string()),
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

/// MySQL deadlocks (1213) and lock wait timeouts (1205): the transaction was rolled back
/// and can run again.
fn is_conflict(db: &dyn sqlx::error::DatabaseError) -> bool {
    db.try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>()
        .is_some_and(|e| matches!(e.number(), 1205 | 1213))
}

/// Errors that say "try again later": SQLite busy or locked; MySQL too many
/// connections, server gone away or shutting down, connection killed.
fn is_transient(db: &dyn sqlx::error::DatabaseError) -> bool {
    if let Some(mysql) = db.try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>() {
        return matches!(mysql.number(), 1040 | 1053 | 1927 | 2006 | 2013);
    }
    matches!(db.code().as_deref(), Some("5" | "6" | "261" | "517"))
}

/// True when the error is a unique-constraint violation.
pub(crate) fn is_unique_violation(error: &sqlx::Error) -> bool {
    matches!(error, sqlx::Error::Database(db) if db.is_unique_violation())
}

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

/// The same mapping for the SQLite money writes, which run on rusqlite (see
/// `store/sqlite_writes.rs`): busy or locked is "try again later", as through sqlx.
impl From<rusqlite::Error> for StoreError {
    fn from(error: rusqlite::Error) -> StoreError {
        match &error {
            rusqlite::Error::SqliteFailure(e, _)
                if matches!(
                    e.code,
                    rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked
                ) =>
            {
                StoreError::Unavailable(error.to_string())
            }
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

/// The unique constraints whose violation a rule turns into an answer, by the names the
/// migrations give them. A violation of any other is an error, not an answer: reading
/// "any unique violation" as "the token is taken" would hide a bug as a retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Unique {
    /// `sprays_room_token`: a live spray of the room holds the token.
    SpraysRoomToken,
    /// `sprays_owner_token`: a live spray of the sprayer holds the token.
    SpraysOwnerToken,
    /// `shares_one_per_receiver`: the user already holds a share of the spray.
    SharesOnePerReceiver,
    /// The idempotency table's primary key: the key is taken.
    IdempotencyKey,
}

impl Unique {
    /// The token is taken in the room or by the sprayer.
    pub(crate) fn is_token_taken(self) -> bool {
        matches!(self, Unique::SpraysRoomToken | Unique::SpraysOwnerToken)
    }
}

/// Which named unique constraint `error` violates, if it is one of [`Unique`]. Neither
/// MySQL nor SQLite gives sqlx the constraint's name, so it is read from the message:
/// MySQL and MariaDB name the key (`Duplicate entry '…' for key 'sprays_room_token'`,
/// MySQL 8 as `'sprays.sprays_room_token'`); SQLite lists the columns
/// (`UNIQUE constraint failed: sprays.room_id, sprays.token, sprays.token_live`).
pub(crate) fn unique_violation(error: &sqlx::Error) -> Option<Unique> {
    let sqlx::Error::Database(db) = error else {
        return None;
    };
    if !db.is_unique_violation() {
        return None;
    }
    constraint_named_in(db.message())
}

/// [`unique_violation`] for an error of rusqlite.
pub(crate) fn sqlite_unique_violation(error: &rusqlite::Error) -> Option<Unique> {
    match error {
        rusqlite::Error::SqliteFailure(e, Some(message))
            if e.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE =>
        {
            constraint_named_in(message)
        }
        _ => None,
    }
}

fn constraint_named_in(message: &str) -> Option<Unique> {
    if let Some((_, key)) = message.rsplit_once(" for key '") {
        let key = key.trim_end_matches('\'');
        let name = key.rsplit_once('.').map_or(key, |(_, name)| name);
        return match name {
            "sprays_room_token" => Some(Unique::SpraysRoomToken),
            "sprays_owner_token" => Some(Unique::SpraysOwnerToken),
            "shares_one_per_receiver" => Some(Unique::SharesOnePerReceiver),
            // Only the idempotency table's primary key is ever inserted twice; MySQL
            // 8 spells it `idempotency.PRIMARY`, MariaDB only `PRIMARY`.
            "PRIMARY" if !key.contains('.') || key.starts_with("idempotency.") => {
                Some(Unique::IdempotencyKey)
            }
            _ => None,
        };
    }
    let columns = message.strip_prefix("UNIQUE constraint failed: ")?;
    match columns {
        "sprays.room_id, sprays.token, sprays.token_live" => Some(Unique::SpraysRoomToken),
        "sprays.owner_id, sprays.token, sprays.token_live" => Some(Unique::SpraysOwnerToken),
        "shares.spray_id, shares.receiver_id" => Some(Unique::SharesOnePerReceiver),
        "idempotency.user_id, idempotency.endpoint, idempotency.idem_key" => Some(Unique::IdempotencyKey),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn named_constraints_are_read_from_either_dialects_message() {
        let cases = [
            (
                "Duplicate entry 'R-abc-1' for key 'sprays_room_token'",
                Some(Unique::SpraysRoomToken),
            ),
            (
                "Duplicate entry '1-abc-1' for key 'sprays.sprays_owner_token'",
                Some(Unique::SpraysOwnerToken),
            ),
            (
                "Duplicate entry '7-2' for key 'shares_one_per_receiver'",
                Some(Unique::SharesOnePerReceiver),
            ),
            (
                "Duplicate entry '2-receive-k' for key 'PRIMARY'",
                Some(Unique::IdempotencyKey),
            ),
            (
                "Duplicate entry '2-receive-k' for key 'idempotency.PRIMARY'",
                Some(Unique::IdempotencyKey),
            ),
            ("Duplicate entry '7-0' for key 'shares.PRIMARY'", None),
            (
                "Duplicate entry '7-DEBIT-1' for key 'ledger_once_per_kind_and_user'",
                None,
            ),
            (
                "UNIQUE constraint failed: sprays.room_id, sprays.token, sprays.token_live",
                Some(Unique::SpraysRoomToken),
            ),
            (
                "UNIQUE constraint failed: sprays.owner_id, sprays.token, sprays.token_live",
                Some(Unique::SpraysOwnerToken),
            ),
            (
                "UNIQUE constraint failed: shares.spray_id, shares.receiver_id",
                Some(Unique::SharesOnePerReceiver),
            ),
            (
                "UNIQUE constraint failed: idempotency.user_id, idempotency.endpoint, idempotency.idem_key",
                Some(Unique::IdempotencyKey),
            ),
            ("UNIQUE constraint failed: shares.spray_id, shares.slot", None),
            (
                "UNIQUE constraint failed: ledger.spray_id, ledger.kind, ledger.user_id",
                None,
            ),
        ];
        for (message, expected) in cases {
            assert_eq!(constraint_named_in(message), expected, "{message}");
        }
    }
}

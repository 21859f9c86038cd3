//! Ending transactions, written once for both backends: [`finish`] commits an outcome that
//! is to be kept and rolls back any other, explicitly (a transaction merely dropped would
//! stay open on its pooled connection, holding locks and, on SQLite, a read snapshot,
//! until the connection is next used); [`finish_confirming`] does the same for a
//! transaction whose outcome a client will be told, and finds that outcome out when the
//! commit's acknowledgement is lost.
//!
//! A failed `COMMIT` does not mean nothing was written. When the connection dies after the
//! server received `COMMIT` and before its OK reached us (the network dropped, the server
//! was killed after making the commit durable), the transaction may well have committed.
//! Answering 503 then would break the contract (a 5xx means nothing was written) and make
//! the client's retry hit a share or a spray it does not know it has. So the outcome is
//! read back, on a fresh connection, from the rows the transaction wrote: they are there
//! (committed) or not (rolled back); nothing else is possible, a transaction being atomic.
//! The idempotency row it completed follows the same fate, being written in the same
//! transaction.
//!
//! An error before `COMMIT` needs none of this: the server rolls back a transaction whose
//! connection ends before it commits.

use std::future::Future;
use std::time::Duration;

use super::StoreError;

/// How long the outcome of a commit is looked for while the database cannot be reached. A
/// restart of MariaDB (crash recovery included) takes a few seconds; past this the
/// request is answered 503 with the outcome unknown (and logged as an error), the one case
/// where a 5xx may hide a committed effect.
pub(super) const VERIFY_FOR: Duration = Duration::from_secs(30);
/// The pause between attempts to read the outcome back.
const VERIFY_PAUSE: Duration = Duration::from_millis(200);
/// One attempt is given up after this long (a connection that hangs on a silent network),
/// so that the next attempt can find the database back.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);

/// What a transaction wrote, as much as it takes to find it again.
#[derive(Debug, Clone)]
pub(super) enum Written {
    /// A new spray row, by its id and what makes it this spray and no other.
    Spray {
        id: i64,
        room: String,
        token: String,
        owner: i64,
        created_at: i64,
    },
    /// One share given to a user at a given time.
    Share {
        spray_id: i64,
        slot: i64,
        user: i64,
        received_at: i64,
    },
}

/// A share a claim transaction took, before it commits: enough to answer the claim and
/// to find the share again (see [`Written::Share`]).
#[derive(Debug, Clone, Copy)]
pub(super) struct TakenShare {
    pub spray_id: i64,
    pub slot: i64,
    pub amount: crate::domain::Amount,
}

/// Commits `tx` when `keep` says the outcome is to be kept; rolls it back otherwise, and
/// always when the outcome is an error.
pub(super) async fn finish<DB, T>(
    tx: sqlx::Transaction<'static, DB>,
    outcome: Result<T, StoreError>,
    keep: impl FnOnce(&T) -> bool,
) -> Result<T, StoreError>
where
    DB: sqlx::Database,
{
    match outcome {
        Ok(value) if keep(&value) => {
            tx.commit().await?;
            Ok(value)
        }
        other => {
            tx.rollback().await?;
            other
        }
    }
}

/// Commits `tx` when `written` names what the outcome wrote, confirming a failed commit
/// with `landed` (see [`commit_and_confirm`]); rolls it back otherwise, and always when the
/// outcome is an error.
pub(super) async fn finish_confirming<DB, T, F, Fut>(
    tx: sqlx::Transaction<'static, DB>,
    outcome: Result<T, StoreError>,
    written: impl FnOnce(&T) -> Option<Written>,
    landed: F,
) -> Result<T, StoreError>
where
    DB: sqlx::Database,
    F: FnMut(Written) -> Fut,
    Fut: Future<Output = Result<bool, StoreError>>,
{
    let what = match &outcome {
        Ok(value) => written(value),
        Err(_) => None,
    };
    match what {
        Some(what) => {
            let mut landed = landed;
            let check = what.clone();
            commit_and_confirm(tx, &what, || landed(check.clone())).await?;
            outcome
        }
        None => {
            tx.rollback().await?;
            outcome
        }
    }
}

impl Written {
    /// What writing `spray` under `id` wrote.
    pub(super) fn spray(id: i64, spray: &super::NewSpray) -> Written {
        Written::Spray {
            id,
            room: spray.room.as_str().to_owned(),
            token: spray.token.as_str().to_owned(),
            owner: spray.owner.get(),
            created_at: super::convert::millis(spray.created_at),
        }
    }

    /// What `claim` wrote when it took `taken`.
    pub(super) fn share(taken: &TakenShare, claim: &super::Claim) -> Written {
        Written::Share {
            spray_id: taken.spray_id,
            slot: taken.slot,
            user: claim.user.get(),
            received_at: super::convert::millis(claim.now),
        }
    }
}

/// Commits `tx`. When the commit itself fails, asks `landed` (which reads `what` back on a
/// fresh connection, waiting for any lock the transaction may still hold) whether it
/// committed, again and again for up to [`VERIFY_FOR`] while the database cannot answer:
/// `Ok(())` if it did, the commit's error if it did not, and 503 (`Unavailable`) if the
/// outcome stays unknown.
pub(super) async fn commit_and_confirm<DB, F, Fut>(
    tx: sqlx::Transaction<'static, DB>,
    what: &Written,
    landed: F,
) -> Result<(), StoreError>
where
    DB: sqlx::Database,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<bool, StoreError>>,
{
    let Err(failed) = tx.commit().await else {
        return Ok(());
    };
    confirm_commit(StoreError::from(failed), what, landed).await
}

/// After a commit of `what` that failed with `failed`: `Ok(())` if it landed after all, as
/// [`commit_and_confirm`] finds out (for a commit run elsewhere, as SQLite's batches are).
pub(super) async fn confirm_commit<F, Fut>(
    failed: StoreError,
    what: &Written,
    landed: F,
) -> Result<(), StoreError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<bool, StoreError>>,
{
    tracing::warn!(error = %failed, written = ?what, "a commit failed; reading back whether it landed");
    confirm(failed, what, VERIFY_FOR, VERIFY_PAUSE, landed).await
}

/// The reading back, with its bounds as inputs so that tests can make them short.
async fn confirm<F, Fut>(
    failed: StoreError,
    what: &Written,
    verify_for: Duration,
    pause: Duration,
    mut landed: F,
) -> Result<(), StoreError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<bool, StoreError>>,
{
    let give_up = tokio::time::Instant::now() + verify_for;
    loop {
        let attempt_ends = (tokio::time::Instant::now() + ATTEMPT_TIMEOUT).min(give_up);
        let last = match tokio::time::timeout_at(attempt_ends, landed()).await {
            Ok(Ok(true)) => {
                tracing::info!(written = ?what, "the commit had landed; answering its success");
                return Ok(());
            }
            Ok(Ok(false)) => {
                tracing::info!(written = ?what, "the commit had not landed; nothing was written");
                return Err(failed);
            }
            Ok(Err(e)) => e.to_string(),
            Err(_) => "timed out".to_owned(),
        };
        if tokio::time::Instant::now() + pause >= give_up {
            tracing::error!(
                written = ?what,
                error = %failed,
                last_attempt = %last,
                "the outcome of a commit could not be found out in time: answering 503 although it may have landed"
            );
            return Err(StoreError::Unavailable(format!(
                "the outcome of a commit is unknown: {failed}"
            )));
        }
        tracing::debug!(error = %last, "the outcome of a commit cannot be read yet");
        tokio::time::sleep(pause).await;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    fn share() -> Written {
        Written::Share {
            spray_id: 1,
            slot: 0,
            user: 2,
            received_at: 0,
        }
    }

    fn lost() -> StoreError {
        StoreError::Unavailable("connection reset during COMMIT".into())
    }

    /// `landed` fails `failures` times (the database is down), then answers `found`.
    async fn read_back(failures: u32, found: bool, verify_for: Duration) -> (Result<(), StoreError>, u32) {
        let calls = AtomicU32::new(0);
        let landed = || {
            let n = calls.fetch_add(1, Ordering::SeqCst);
            async move {
                if n < failures {
                    Err(StoreError::Unavailable("connection refused".into()))
                } else {
                    Ok(found)
                }
            }
        };
        let outcome = confirm(lost(), &share(), verify_for, Duration::from_millis(200), landed).await;
        (outcome, calls.load(Ordering::SeqCst))
    }

    #[tokio::test(start_paused = true)]
    async fn a_commit_that_landed_is_a_success_once_the_database_answers() {
        let (outcome, calls) = read_back(5, true, VERIFY_FOR).await;
        assert!(outcome.is_ok());
        assert_eq!(calls, 6);
    }

    #[tokio::test(start_paused = true)]
    async fn a_commit_that_did_not_land_is_the_commits_error() {
        let (outcome, calls) = read_back(0, false, VERIFY_FOR).await;
        assert!(matches!(outcome, Err(StoreError::Unavailable(m)) if m.contains("COMMIT")));
        assert_eq!(calls, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn an_outcome_still_unknown_at_the_bound_is_unavailable() {
        let started = tokio::time::Instant::now();
        let (outcome, calls) = read_back(u32::MAX, true, Duration::from_secs(30)).await;
        assert!(matches!(outcome, Err(StoreError::Unavailable(m)) if m.contains("unknown")));
        assert!(started.elapsed() <= Duration::from_secs(30));
        assert!(calls > 100, "retried with short pauses: {calls}");
    }
}

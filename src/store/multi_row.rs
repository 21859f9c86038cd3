//! What the MySQL batch writers (`store/slot_batch.rs`, `store/spray_batch.rs`,
//! `store/claim_batch.rs`) share: a
//! batch is tried as one transaction of multi-row statements, again when it loses a
//! deadlock or a lock wait; if one request would fail it as a whole, each request is
//! written alone instead, as it is when it keeps losing conflicts; if nothing of it could be
//! written, every request is answered 503.

use std::future::Future;

use super::StoreError;
use super::batch::unavailable;
use super::queue::Reply;

/// Why a batch was not written as one.
#[derive(Debug)]
pub(super) enum Fallback {
    /// One request would fail the batch's statements (a token taken, a share already
    /// held): write each request alone.
    OneByOne,
    /// Nothing of it was written (the commit did not land, or the database could not be
    /// reached): every request is answered with this, 503.
    Failed(StoreError),
}

/// Writes a batch of `requests` requests and answers each of `replies`: `as_one` tries
/// the whole batch (and answers each request, in order), `alone(i)` writes request `i` by
/// itself.
pub(super) async fn write_and_answer<A, One, OneFut, Alone, AloneFut>(
    replies: Vec<Reply<A>>,
    mut as_one: One,
    mut alone: Alone,
) where
    One: FnMut() -> OneFut,
    OneFut: Future<Output = Result<Vec<Result<A, StoreError>>, Fallback>>,
    Alone: FnMut(usize) -> AloneFut,
    AloneFut: Future<Output = Result<A, StoreError>>,
{
    crate::telemetry::metrics::record_batch(replies.len());
    let mut tries = 1;
    let answers = loop {
        match as_one().await {
            Ok(answers) => break answers,
            Err(Fallback::Failed(StoreError::Conflict(cause))) if tries < super::mysql::ATTEMPTS => {
                tracing::debug!(%cause, tries, "a batch lost a conflict, retrying");
                let pause = rand::random_range(1..=10u64) * u64::from(tries);
                tokio::time::sleep(std::time::Duration::from_millis(pause)).await;
                tries += 1;
            }
            // A batch that keeps losing deadlocks (one spray's batches from several
            // instances, a purge) is written one by one, each with its own retries,
            // rather than answered 503 as a whole.
            Err(Fallback::OneByOne | Fallback::Failed(StoreError::Conflict(_))) => {
                let mut answers = Vec::with_capacity(replies.len());
                for request in 0..replies.len() {
                    answers.push(alone(request).await);
                }
                break answers;
            }
            Err(Fallback::Failed(e)) => break replies.iter().map(|_| Err(unavailable(&e))).collect(),
        }
    };
    for (reply, answer) in replies.into_iter().zip(answers) {
        let _ = reply.send(answer);
    }
}

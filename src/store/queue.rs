//! The queues in front of group commit (`store/batch.rs`, `store/slot_batch.rs`,
//! `store/spray_batch.rs`): callers queue one request each and wait; a writer task per
//! queue takes every request waiting (up to a batch's size), writes them as one batch and
//! answers each. Nothing waits on purpose for a batch to fill: under light load a batch
//! holds one request, under heavy load batches grow by themselves.

use std::future::Future;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use super::StoreError;

/// Requests waiting for a batch, per queue; past this, callers wait to queue (request-path
/// calls are bounded well below it by `--store-concurrency`).
pub(super) const QUEUE: usize = 4096;

/// Where a writer sends one request's answer.
pub(super) type Reply<A> = oneshot::Sender<Result<A, StoreError>>;

/// The queues of one kind of batch, one writer task each.
pub(super) struct BatchQueues<R, A> {
    queues: Vec<mpsc::Sender<(R, Reply<A>)>>,
    /// Which queue the next request without a lane of its own goes to.
    next: std::sync::atomic::AtomicUsize,
}

impl<R: Send + 'static, A: Send + 'static> BatchQueues<R, A> {
    /// Starts `writers` tasks (at least one), each taking up to `max_batch` requests at a
    /// time off its own queue and handing them to `write_batch`, which must answer every
    /// one. They end when the `BatchQueues` is dropped.
    pub(super) fn start<W, Fut>(writers: usize, max_batch: usize, write_batch: W) -> Self
    where
        W: Fn(Vec<(R, Reply<A>)>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let write_batch = Arc::new(write_batch);
        let queues = (0..writers.max(1))
            .map(|_| {
                let (queue, mut waiting) = mpsc::channel::<(R, Reply<A>)>(QUEUE);
                let write_batch = write_batch.clone();
                tokio::spawn(async move {
                    let mut batch = Vec::with_capacity(max_batch);
                    while waiting.recv_many(&mut batch, max_batch).await > 0 {
                        // Each batch in a task of its own, so that one that panics (a bug)
                        // does not end this queue's writer: its requests are answered 503
                        // (their replies dropped unanswered), and the next batch is
                        // written. A transaction it left open is rolled back as its
                        // connection is dropped.
                        let written = tokio::spawn(write_batch(std::mem::take(&mut batch))).await;
                        if let Err(failed) = written {
                            tracing::error!(error = %failed, "a batch of writes panicked; its requests were answered 503");
                        }
                    }
                });
                queue
            })
            .collect();
        BatchQueues {
            queues,
            next: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    /// Queues `request` on the queue `lane` picks (requests of one lane are written in
    /// order, one batch after the other) and waits for its answer.
    pub(super) async fn send_in_lane(&self, lane: u64, request: R) -> Result<A, StoreError> {
        let queues = u64::try_from(self.queues.len()).unwrap_or(1);
        let queue = usize::try_from(lane % queues).unwrap_or(0);
        self.send_to(queue, request).await
    }

    /// Queues `request` on the queues in turn and waits for its answer.
    pub(super) async fn send(&self, request: R) -> Result<A, StoreError> {
        let turn = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.send_to(turn % self.queues.len(), request).await
    }

    async fn send_to(&self, queue: usize, request: R) -> Result<A, StoreError> {
        ask(&self.queues[queue], request).await
    }
}

/// Queues `request` with a reply on `queue` and waits for its answer: 503 when the writer
/// behind the queue has stopped, or stopped before answering.
pub(super) async fn ask<R, A>(queue: &mpsc::Sender<(R, Reply<A>)>, request: R) -> Result<A, StoreError> {
    let (reply, answer) = oneshot::channel();
    queue
        .send((request, reply))
        .await
        .map_err(|_| StoreError::Unavailable("the store's batch writer has stopped".into()))?;
    answer
        .await
        .map_err(|_| StoreError::Unavailable("the store's batch writer stopped before answering".into()))?
}

/// Runs `requests` as one batch through `write_batch`, as a writer task would, and their
/// answers in order: for tests of a batch built by hand.
#[cfg(test)]
pub(super) async fn as_one_batch<R, A, Fut>(
    write_batch: impl FnOnce(Vec<(R, Reply<A>)>) -> Fut,
    requests: Vec<R>,
) -> Vec<Result<A, StoreError>>
where
    Fut: Future<Output = ()>,
{
    let mut answers = Vec::new();
    let mut batch = Vec::new();
    for request in requests {
        let (reply, answer) = oneshot::channel();
        batch.push((request, reply));
        answers.push(answer);
    }
    write_batch(batch).await;
    let mut out = Vec::new();
    for answer in answers {
        out.push(answer.await.expect("every request of a batch is answered"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_batch_that_panics_is_answered_503_and_the_next_batch_is_written() {
        let queues = BatchQueues::start(1, 8, |batch: Vec<(u32, Reply<u32>)>| async move {
            for (request, reply) in batch {
                assert_ne!(request, 0, "a bug in the batch writer");
                let _ = reply.send(Ok(request * 10));
            }
        });
        let first = queues.send(0).await;
        assert!(matches!(first, Err(StoreError::Unavailable(_))), "{first:?}");
        assert_eq!(queues.send(1).await.unwrap(), 10);
        assert_eq!(queues.send_in_lane(7, 2).await.unwrap(), 20);
    }
}

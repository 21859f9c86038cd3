//! The queues in front of group commit (`store/batch.rs`, `store/slot_batch.rs`,
//! `store/spray_batch.rs`) and of batched reads: callers queue one request each and wait;
//! writer tasks take every request waiting (up to a batch's size), write them as one batch
//! and answer each. Nothing waits on purpose for a batch to fill: under light load a batch
//! holds one request, under heavy load batches grow by themselves.
//!
//! Two shapes. Requests with no order among them (new sprays, lookups) wait in one queue
//! that every writer takes from, so a request waits for a batch ahead of it only when
//! every writer is busy. (With a queue per writer, taken in turn, a request waited behind
//! its own writer's batch while the others were idle: at half of the peak load, two
//! commits instead of one for a good share of the requests.) Requests that must be written
//! in order (the claims of one spray) go by lane: one queue and one writer per lane.

use std::future::Future;
use std::sync::Arc;

use tokio::sync::{Mutex, mpsc, oneshot};

use super::StoreError;

/// Requests waiting for a batch, per queue; past this, callers wait to queue (request-path
/// calls are bounded well below it by `--store-concurrency`).
pub(super) const QUEUE: usize = 4096;

/// Where a writer sends one request's answer.
pub(super) type Reply<A> = oneshot::Sender<Result<A, StoreError>>;

/// The queue of requests waiting for a batch, and where they are taken from.
type Waiting<R, A> = Arc<Mutex<mpsc::Receiver<(R, Reply<A>)>>>;

/// The queues of one kind of batch and the writer tasks taking from them.
pub(super) struct BatchQueues<R, A> {
    queues: Vec<mpsc::Sender<(R, Reply<A>)>>,
}

impl<R: Send + 'static, A: Send + 'static> BatchQueues<R, A> {
    /// One queue and `writers` tasks (at least one) taking from it: whichever writer is
    /// free takes up to `max_batch` requests waiting and hands them to `write_batch`, which
    /// must answer every one. For [`BatchQueues::send`]. The writers end when the
    /// `BatchQueues` is dropped.
    pub(super) fn shared<W, Fut>(writers: usize, max_batch: usize, write_batch: W) -> Self
    where
        W: Fn(Vec<(R, Reply<A>)>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let write_batch = Arc::new(write_batch);
        let (queue, waiting) = mpsc::channel(QUEUE);
        let waiting = Arc::new(Mutex::new(waiting));
        for _ in 0..writers.max(1) {
            tokio::spawn(take_and_write(waiting.clone(), max_batch, write_batch.clone()));
        }
        BatchQueues { queues: vec![queue] }
    }

    /// `lanes` queues (at least one), each with a writer task of its own taking up to
    /// `max_batch` requests at a time, as [`BatchQueues::shared`] does. For
    /// [`BatchQueues::send_in_lane`].
    pub(super) fn in_lanes<W, Fut>(lanes: usize, max_batch: usize, write_batch: W) -> Self
    where
        W: Fn(Vec<(R, Reply<A>)>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let write_batch = Arc::new(write_batch);
        let queues = (0..lanes.max(1))
            .map(|_| {
                let (queue, waiting) = mpsc::channel(QUEUE);
                tokio::spawn(take_and_write(
                    Arc::new(Mutex::new(waiting)),
                    max_batch,
                    write_batch.clone(),
                ));
                queue
            })
            .collect();
        BatchQueues { queues }
    }

    /// Queues `request` on the queue `lane` picks (requests of one lane are written in
    /// order, one batch after the other) and waits for its answer.
    pub(super) async fn send_in_lane(&self, lane: u64, request: R) -> Result<A, StoreError> {
        let queues = u64::try_from(self.queues.len()).unwrap_or(1);
        let queue = usize::try_from(lane % queues).unwrap_or(0);
        ask(&self.queues[queue], request).await
    }

    /// Queues `request` for the first free writer and waits for its answer (on queues made
    /// [`BatchQueues::in_lanes`], the first lane's).
    pub(super) async fn send(&self, request: R) -> Result<A, StoreError> {
        ask(&self.queues[0], request).await
    }
}

/// One writer task: takes every request waiting (up to `max_batch`) whenever it is free,
/// until the queue is closed. While it waits for requests it holds the queue's lock, so
/// that requests arriving one at a time go to the free writers in turn (tokio's mutex is
/// fair), each writer with a batch of its own.
async fn take_and_write<R, A, W, Fut>(waiting: Waiting<R, A>, max_batch: usize, write_batch: Arc<W>)
where
    R: Send + 'static,
    A: Send + 'static,
    W: Fn(Vec<(R, Reply<A>)>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut batch = Vec::with_capacity(max_batch);
    loop {
        let taken = waiting.lock().await.recv_many(&mut batch, max_batch).await;
        if taken == 0 {
            return;
        }
        // Each batch in a task of its own, so that one that panics (a bug) does not end
        // this writer: its requests are answered 503 (their replies dropped unanswered),
        // and the next batch is written. A transaction it left open is rolled back as its
        // connection is dropped.
        let written = tokio::spawn(write_batch(std::mem::take(&mut batch))).await;
        if let Err(failed) = written {
            tracing::error!(error = %failed, "a batch of writes panicked; its requests were answered 503");
        }
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
    use std::time::Duration;

    use tokio::sync::{Notify, Semaphore};

    use super::*;

    #[tokio::test]
    async fn a_batch_that_panics_is_answered_503_and_the_next_batch_is_written() {
        for queues in [
            BatchQueues::shared(1, 8, panics_on_zero),
            BatchQueues::in_lanes(1, 8, panics_on_zero),
        ] {
            let first = queues.send(0).await;
            assert!(matches!(first, Err(StoreError::Unavailable(_))), "{first:?}");
            assert_eq!(queues.send(1).await.unwrap(), 10);
            assert_eq!(queues.send_in_lane(7, 2).await.unwrap(), 20);
        }
    }

    async fn panics_on_zero(batch: Vec<(u32, Reply<u32>)>) {
        for (request, reply) in batch {
            assert_ne!(request, 0, "a bug in the batch writer");
            let _ = reply.send(Ok(request * 10));
        }
    }

    type Writing = futures_util::future::BoxFuture<'static, ()>;

    /// A batch writer that answers each request ten times itself, but holds request 0
    /// until `release` has a permit, saying on `started` that it holds it.
    fn holding_zero(
        started: Arc<Notify>,
        release: Arc<Semaphore>,
    ) -> impl Fn(Vec<(u32, Reply<u32>)>) -> Writing + Send + Sync {
        move |batch| {
            let (started, release) = (started.clone(), release.clone());
            Box::pin(async move {
                for (request, reply) in batch {
                    if request == 0 {
                        started.notify_one();
                        let _permit = release.acquire().await;
                    }
                    let _ = reply.send(Ok(request * 10));
                }
            })
        }
    }

    // The paused clock moves on by itself only when every task waits: a timeout that
    // fires means the request could not be written at all while request 0 was held.
    #[tokio::test(start_paused = true)]
    async fn on_a_shared_queue_a_request_waits_only_while_every_writer_is_busy() {
        let (started, release) = (Arc::new(Notify::new()), Arc::new(Semaphore::new(0)));
        let queues = Arc::new(BatchQueues::shared(
            2,
            8,
            holding_zero(started.clone(), release.clone()),
        ));
        let held = tokio::spawn({
            let queues = queues.clone();
            async move { queues.send(0).await }
        });
        started.notified().await;
        for request in 1..=3 {
            let answer = tokio::time::timeout(Duration::from_secs(1), queues.send(request))
                .await
                .unwrap_or_else(|_| {
                    panic!("request {request} waited behind a busy writer while another was free")
                });
            assert_eq!(answer.unwrap(), request * 10);
        }
        release.add_permits(1);
        assert_eq!(held.await.unwrap().unwrap(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn requests_of_one_lane_are_written_one_batch_after_the_other() {
        let (started, release) = (Arc::new(Notify::new()), Arc::new(Semaphore::new(0)));
        let queues = Arc::new(BatchQueues::in_lanes(
            2,
            8,
            holding_zero(started.clone(), release.clone()),
        ));
        let held = tokio::spawn({
            let queues = queues.clone();
            async move { queues.send_in_lane(0, 0).await }
        });
        started.notified().await;
        assert_eq!(
            queues.send_in_lane(1, 1).await.unwrap(),
            10,
            "another lane is written meanwhile"
        );
        let behind = tokio::time::timeout(Duration::from_secs(1), queues.send_in_lane(2, 2)).await;
        assert!(
            behind.is_err(),
            "a request of the held lane was written beside it: {behind:?}"
        );
        release.add_permits(1);
        assert_eq!(held.await.unwrap().unwrap(), 0);
        assert_eq!(queues.send_in_lane(4, 4).await.unwrap(), 40);
    }
}

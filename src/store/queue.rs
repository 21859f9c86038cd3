//! The queues in front of group commit (`store/batch.rs`, `store/slot_batch.rs`,
//! `store/spray_batch.rs`, `store/claim_batch.rs`) and of batched reads: callers queue one
//! request each and wait; writer tasks take every request waiting (up to a batch's size),
//! write them as one batch and answer each. Under heavy load batches grow by themselves.
//!
//! Under moderate load they would not: a free writer would take each request as it came,
//! one or two to a batch, and every batch of writes pays its round trips and its durable
//! commit whatever it holds. So a queue of writes may [`Linger`]: a writer that found work
//! within [`LINGER`] of asking for it (requests are coming close together) and less than a
//! full batch waits [`LINGER`] for more before writing. A writer idle for longer than that
//! (light load) writes what came at once: a lone request is never held back. MySQL's
//! lookups linger too: a batch of them is one statement, and MariaDB's cost is per
//! statement more than per row (`store/lookup_batch.rs`). SQLite's lookups do not: they
//! are read on the service's own threads, and lingering there measured no different.
//!
//! Whichever writer is free takes what waits, so a request waits for a batch ahead of it
//! only when every writer is busy (besides a lingering writer's moment). (With a queue
//! per writer, taken in turn, a request waited behind its own writer's batch while the
//! others were idle: at half of the peak load, two commits instead of one for a good share
//! of the requests.) Two shapes:
//!
//! - [`BatchQueue`]: requests with no order among them (new sprays, lookups), one queue.
//! - [`KeyedBatchQueue`]: requests with a key (a claim's spray), never in two batches
//!   written at once: one spray's claims are written one batch after the other, because
//!   two batches of one spray written at once wait on each other's locks (see `WRITERS` in
//!   `store/slot_batch.rs`), while the claims of other sprays are taken by the free writers.

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use tokio::sync::{Mutex, Notify, OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio::time::Instant;

use super::StoreError;

/// Requests waiting for a batch, per queue; past this, callers wait to queue (request-path
/// calls are bounded well below it by `--store-concurrency`).
pub(super) const QUEUE: usize = 4096;

/// How long a writer of a lingering queue waits for more, and the longest it may have
/// waited for work for that to be worth it. Tokio's timer fires on whole milliseconds, so
/// the wait is half a millisecond to one and a half. Measured against no wait (2026-12-06,
/// BENCHMARKS.md): a quarter less of the machine's CPU for MySQL creates at half their
/// peak, for about 1 ms more at the median there; the mixed workload's p99 at half its
/// peak 24 ms instead of 39 (lower in each of five pairs), its peak 6% higher. A writer
/// that finds work already waiting (a hot spray's claims, gathered while the batch before
/// was written) lingers too: lingering only when the queue was empty saved half as much
/// CPU and nothing measurable besides, the hot spray's p99 included (measured again on
/// 2026-12-07 at one offered rate, 12 pairs: no lower median).
pub(super) const LINGER: Duration = Duration::from_micros(500);

/// Whether a queue's writers wait a moment for a fuller batch (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Linger {
    /// Batches that cost a round trip and a statement (and, for writes, a durable commit)
    /// whatever they hold: MySQL's. Worth a wait while requests come close.
    WhileBusy,
    /// Batches cheap enough to take what waits at once: SQLite's lookups.
    Never,
}

impl Linger {
    /// Whether a writer that waited `idle` for work, and found `waiting` requests of a
    /// batch of at most `max_batch`, should wait [`LINGER`] for more.
    fn worth_it(self, idle: Duration, waiting: usize, max_batch: usize) -> bool {
        self == Linger::WhileBusy && idle < LINGER && waiting < max_batch
    }
}

/// Where a writer sends one request's answer.
pub(super) type Reply<A> = oneshot::Sender<Result<A, StoreError>>;

/// One queue of requests with no order among them, and the writer tasks taking from it.
pub(super) struct BatchQueue<R, A> {
    queue: mpsc::Sender<(R, Reply<A>)>,
}

impl<R: Send + 'static, A: Send + 'static> BatchQueue<R, A> {
    /// Starts `writers` tasks (at least one): whichever is free takes up to `max_batch`
    /// requests waiting (after lingering, if `linger` says so) and hands them to
    /// `write_batch`, which must answer every one. They end when the `BatchQueue` is
    /// dropped.
    pub(super) fn start<W, Fut>(writers: usize, max_batch: usize, linger: Linger, write_batch: W) -> Self
    where
        W: Fn(Vec<(R, Reply<A>)>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let write_batch = Arc::new(write_batch);
        let (queue, waiting) = mpsc::channel(QUEUE);
        let waiting = Arc::new(Mutex::new(waiting));
        for _ in 0..writers.max(1) {
            let (waiting, write_batch) = (waiting.clone(), write_batch.clone());
            tokio::spawn(async move {
                let mut batch = Vec::with_capacity(max_batch);
                loop {
                    // A writer waiting for requests (or lingering) holds the queue's lock,
                    // so that requests arriving one at a time go to the free writers in
                    // turn (tokio's mutex is fair), and a lingering writer gathers them all.
                    let mut waiting = waiting.lock().await;
                    let asked = Instant::now();
                    if waiting.recv_many(&mut batch, max_batch).await == 0 {
                        return;
                    }
                    if linger.worth_it(asked.elapsed(), batch.len(), max_batch) {
                        tokio::time::sleep(LINGER).await;
                        while batch.len() < max_batch {
                            let Ok(request) = waiting.try_recv() else { break };
                            batch.push(request);
                        }
                    }
                    drop(waiting);
                    write_in_own_task(write_batch.as_ref(), std::mem::take(&mut batch)).await;
                }
            });
        }
        BatchQueue { queue }
    }

    /// Queues `request` for the first free writer and waits for its answer.
    pub(super) async fn send(&self, request: R) -> Result<A, StoreError> {
        ask(&self.queue, request).await
    }
}

/// A queue of requests with a key, and the writer tasks taking from it: a free writer
/// takes the requests of the keys no other writer is writing, oldest key first, up to a
/// batch's size.
pub(super) struct KeyedBatchQueue<R, A> {
    shared: Arc<Keyed<R, A>>,
}

/// What the handle and the writers of a [`KeyedBatchQueue`] share.
struct Keyed<R, A> {
    state: std::sync::Mutex<KeyedState<R, A>>,
    /// Rung when a request arrives, a key is freed or the queue closes.
    changed: Notify,
    /// One permit per request waiting, released as a writer takes it: callers wait to
    /// queue past [`QUEUE`], as on a [`BatchQueue`].
    room: Arc<Semaphore>,
}

/// A request waiting in a [`KeyedBatchQueue`], and its place in the queue's bound.
type KeyedEntry<R, A> = (R, Reply<A>, OwnedSemaphorePermit);

struct KeyedState<R, A> {
    /// The requests waiting, by key, each key's in the order they came.
    waiting: HashMap<u64, VecDeque<KeyedEntry<R, A>>>,
    /// The keys with requests waiting that no writer is writing, oldest first.
    ready: VecDeque<u64>,
    /// The keys of the batches being written.
    writing: HashSet<u64>,
    /// Set when the handle is dropped: the writers end once nothing waits.
    closed: bool,
}

impl<R, A> KeyedState<R, A> {
    fn push(&mut self, key: u64, entry: KeyedEntry<R, A>) {
        let requests = self.waiting.entry(key).or_default();
        requests.push_back(entry);
        if requests.len() == 1 && !self.writing.contains(&key) {
            self.ready.push_back(key);
        }
    }

    /// The requests of the next batch and their keys, now being written: every request
    /// waiting of the oldest ready keys, up to `max_batch` (a key with more stays behind
    /// the batch with the rest).
    fn take(&mut self, max_batch: usize) -> (Vec<u64>, Vec<(R, Reply<A>)>) {
        let (mut keys, mut batch) = (Vec::new(), Vec::new());
        while batch.len() < max_batch {
            let Some(key) = self.ready.pop_front() else { break };
            let Some(requests) = self.waiting.get_mut(&key) else {
                continue;
            };
            let count = requests.len().min(max_batch - batch.len());
            batch.extend(
                requests
                    .drain(..count)
                    .map(|(request, reply, _room)| (request, reply)),
            );
            if requests.is_empty() {
                self.waiting.remove(&key);
            }
            self.writing.insert(key);
            keys.push(key);
        }
        (keys, batch)
    }

    /// How many requests the next batch would hold now, up to `max_batch`.
    fn ready_requests(&self, max_batch: usize) -> usize {
        let mut count = 0;
        for key in &self.ready {
            if count >= max_batch {
                break;
            }
            count += self.waiting.get(key).map_or(0, VecDeque::len);
        }
        count.min(max_batch)
    }

    /// The batch of `keys` is written: their requests left waiting are ready again.
    fn written(&mut self, keys: &[u64]) {
        for key in keys {
            self.writing.remove(key);
            if self.waiting.contains_key(key) {
                self.ready.push_back(*key);
            }
        }
    }
}

impl<R: Send + 'static, A: Send + 'static> KeyedBatchQueue<R, A> {
    /// Starts `writers` tasks (at least one), each taking batches as [`KeyedBatchQueue`]
    /// says (after lingering, if `linger` says so) and handing them to `write_batch`, which
    /// must answer every request. They end when the `KeyedBatchQueue` is dropped.
    pub(super) fn start<W, Fut>(writers: usize, max_batch: usize, linger: Linger, write_batch: W) -> Self
    where
        W: Fn(Vec<(R, Reply<A>)>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let shared = Arc::new(Keyed {
            state: std::sync::Mutex::new(KeyedState {
                waiting: HashMap::new(),
                ready: VecDeque::new(),
                writing: HashSet::new(),
                closed: false,
            }),
            changed: Notify::new(),
            room: Arc::new(Semaphore::new(QUEUE)),
        });
        let write_batch = Arc::new(write_batch);
        for _ in 0..writers.max(1) {
            let (shared, write_batch) = (shared.clone(), write_batch.clone());
            tokio::spawn(async move {
                while let Some((keys, batch)) = shared.next_batch(max_batch, linger).await {
                    write_in_own_task(write_batch.as_ref(), batch).await;
                    shared.lock().written(&keys);
                    // The keys are free: a writer waiting may take what waits behind them.
                    shared.changed.notify_waiters();
                }
            });
        }
        KeyedBatchQueue { shared }
    }

    /// Queues `request` behind the other requests of `key` and waits for its answer.
    pub(super) async fn send(&self, key: u64, request: R) -> Result<A, StoreError> {
        let room = self
            .shared
            .room
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| writer_stopped())?;
        let (reply, answer) = oneshot::channel();
        self.shared.lock().push(key, (request, reply, room));
        self.shared.changed.notify_one();
        answer.await.map_err(|_| writer_stopped_before_answering())?
    }
}

impl<R, A> Keyed<R, A> {
    fn lock(&self) -> std::sync::MutexGuard<'_, KeyedState<R, A>> {
        // No code panics while holding it; were one to, the state is still whole.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits for a batch to write (lingering first, if `linger` says so); `None` once the
    /// queue is closed and nothing waits.
    async fn next_batch(&self, max_batch: usize, linger: Linger) -> Option<(Vec<u64>, Vec<(R, Reply<A>)>)> {
        let asked = Instant::now();
        let mut lingered = false;
        loop {
            // Registered before the state is read, so that a change made after the read
            // still wakes this writer.
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if !lingered {
                let waiting = self.lock().ready_requests(max_batch);
                if waiting > 0 && linger.worth_it(asked.elapsed(), waiting, max_batch) {
                    lingered = true;
                    tokio::time::sleep(LINGER).await;
                    continue;
                }
            }
            {
                let mut state = self.lock();
                let (keys, batch) = state.take(max_batch);
                if !batch.is_empty() {
                    return Some((keys, batch));
                }
                if state.closed && state.waiting.is_empty() {
                    return None;
                }
            }
            changed.await;
        }
    }
}

impl<R, A> Drop for KeyedBatchQueue<R, A> {
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.shared.room.close();
        self.shared.changed.notify_waiters();
    }
}

/// Writes one batch in a task of its own, so that one that panics (a bug) does not end
/// its writer: its requests are answered 503 (their replies dropped unanswered), and the
/// next batch is written. A transaction it left open is rolled back as its connection is
/// dropped.
async fn write_in_own_task<R, A, W, Fut>(write_batch: &W, batch: Vec<(R, Reply<A>)>)
where
    W: Fn(Vec<(R, Reply<A>)>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    if let Err(failed) = tokio::spawn(write_batch(batch)).await {
        tracing::error!(error = %failed, "a batch of writes panicked; its requests were answered 503");
    }
}

/// Queues `request` with a reply on `queue` and waits for its answer: 503 when the writer
/// behind the queue has stopped, or stopped before answering.
pub(super) async fn ask<R, A>(queue: &mpsc::Sender<(R, Reply<A>)>, request: R) -> Result<A, StoreError> {
    let (reply, answer) = oneshot::channel();
    queue.send((request, reply)).await.map_err(|_| writer_stopped())?;
    answer.await.map_err(|_| writer_stopped_before_answering())?
}

/// 503: the writer behind a queue has stopped.
fn writer_stopped() -> StoreError {
    StoreError::Unavailable("the store's batch writer has stopped".into())
}

/// 503: the writer took the request and stopped (or its batch panicked) before answering.
fn writer_stopped_before_answering() -> StoreError {
    StoreError::Unavailable("the store's batch writer stopped before answering".into())
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

    use super::*;

    #[tokio::test]
    async fn a_batch_that_panics_is_answered_503_and_the_next_batch_is_written() {
        let queue = BatchQueue::start(1, 8, Linger::WhileBusy, panics_on_zero);
        let first = queue.send(0).await;
        assert!(matches!(first, Err(StoreError::Unavailable(_))), "{first:?}");
        assert_eq!(queue.send(1).await.unwrap(), 10);

        let keyed = KeyedBatchQueue::start(1, 8, Linger::WhileBusy, panics_on_zero);
        let first = keyed.send(7, 0).await;
        assert!(matches!(first, Err(StoreError::Unavailable(_))), "{first:?}");
        assert_eq!(keyed.send(7, 1).await.unwrap(), 10);
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

    // In the two tests below, the paused clock moves on by itself only when every task
    // waits: a timeout that fires means the request could not be written at all while
    // request 0 was held.

    #[tokio::test(start_paused = true)]
    async fn a_request_waits_only_while_every_writer_is_busy() {
        let (started, release) = (Arc::new(Notify::new()), Arc::new(Semaphore::new(0)));
        let queue = Arc::new(BatchQueue::start(
            2,
            8,
            Linger::WhileBusy,
            holding_zero(started.clone(), release.clone()),
        ));
        let held = tokio::spawn({
            let queue = queue.clone();
            async move { queue.send(0).await }
        });
        started.notified().await;
        for request in 1..=3 {
            let answer = tokio::time::timeout(Duration::from_secs(1), queue.send(request))
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
    async fn one_key_is_never_in_two_batches_at_once_and_other_keys_go_to_free_writers() {
        let (started, release) = (Arc::new(Notify::new()), Arc::new(Semaphore::new(0)));
        let queue = Arc::new(KeyedBatchQueue::start(
            2,
            8,
            Linger::WhileBusy,
            holding_zero(started.clone(), release.clone()),
        ));
        let held = tokio::spawn({
            let queue = queue.clone();
            async move { queue.send(0, 0).await }
        });
        started.notified().await;
        for (key, request) in [(1, 1), (2, 3), (4, 5)] {
            let answer = tokio::time::timeout(Duration::from_secs(1), queue.send(key, request))
                .await
                .unwrap_or_else(|_| panic!("key {key} waited behind a busy writer while another was free"));
            assert_eq!(answer.unwrap(), request * 10);
        }
        let behind = tokio::time::timeout(Duration::from_secs(1), queue.send(0, 2)).await;
        assert!(
            behind.is_err(),
            "a request of the key being written was written beside it: {behind:?}"
        );
        release.add_permits(1);
        assert_eq!(held.await.unwrap().unwrap(), 0);
        let after = tokio::time::timeout(Duration::from_secs(1), queue.send(0, 4)).await;
        assert_eq!(
            after.expect("the key is free once its batch is written").unwrap(),
            40
        );
    }

    /// A batch writer that answers each request with itself and notes each batch's size.
    fn noting_sizes(
        sizes: Arc<std::sync::Mutex<Vec<usize>>>,
    ) -> impl Fn(Vec<(u32, Reply<u32>)>) -> Writing + Send + Sync {
        move |batch| {
            sizes.lock().unwrap().push(batch.len());
            Box::pin(async move {
                for (request, reply) in batch {
                    let _ = reply.send(Ok(request));
                }
            })
        }
    }

    /// Either queue, each request under a key of its own.
    enum AnyQueue {
        Plain(BatchQueue<u32, u32>),
        Keyed(KeyedBatchQueue<u32, u32>),
    }

    impl AnyQueue {
        async fn send(&self, request: u32) -> u32 {
            match self {
                AnyQueue::Plain(queue) => queue.send(request).await,
                AnyQueue::Keyed(queue) => queue.send(u64::from(request), request).await,
            }
            .unwrap()
        }
    }

    // The paused clock below moves on by itself only when every task waits: a writer's
    // wait shows as time gone by, and no time gone by means nobody waited for the timer.
    #[tokio::test(start_paused = true)]
    async fn a_lone_request_is_written_at_once_and_requests_coming_close_are_gathered() {
        for keyed in [false, true] {
            let sizes = Arc::new(std::sync::Mutex::new(Vec::new()));
            let queue = Arc::new(if keyed {
                AnyQueue::Keyed(KeyedBatchQueue::start(
                    1,
                    8,
                    Linger::WhileBusy,
                    noting_sizes(sizes.clone()),
                ))
            } else {
                AnyQueue::Plain(BatchQueue::start(
                    1,
                    8,
                    Linger::WhileBusy,
                    noting_sizes(sizes.clone()),
                ))
            });
            let send = |request: u32| {
                let queue = queue.clone();
                tokio::spawn(async move { queue.send(request).await })
            };

            // Light load: the writer has been waiting for work for long.
            for _ in 0..10 {
                tokio::task::yield_now().await;
            }
            tokio::time::advance(Duration::from_millis(10)).await;
            let start = Instant::now();
            assert_eq!(send(1).await.unwrap(), 1);
            assert_eq!(
                start.elapsed(),
                Duration::ZERO,
                "keyed {keyed}: a lone request was held back"
            );

            // Requests close together: the writer takes 2 at once and lingers, and 3,
            // which comes while it lingers, is written with it.
            let start = Instant::now();
            let second = send(2);
            for _ in 0..10 {
                tokio::task::yield_now().await;
            }
            assert_eq!(send(3).await.unwrap(), 3);
            assert_eq!(second.await.unwrap(), 2);
            assert!(start.elapsed() >= LINGER, "keyed {keyed}: {:?}", start.elapsed());
            assert_eq!(
                *sizes.lock().unwrap(),
                [1, 2],
                "keyed {keyed}: 2 and 3 were not gathered"
            );

            // A full batch waiting is written at once, however close its requests came.
            let start = Instant::now();
            let full: Vec<_> = (10..18).map(send).collect();
            for (request, answer) in (10..18).zip(full) {
                assert_eq!(answer.await.unwrap(), request);
            }
            assert_eq!(
                start.elapsed(),
                Duration::ZERO,
                "keyed {keyed}: a full batch lingered"
            );
            assert_eq!(*sizes.lock().unwrap(), [1, 2, 8], "keyed {keyed}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_queue_that_never_lingers_takes_requests_coming_close_at_once() {
        let sizes = Arc::new(std::sync::Mutex::new(Vec::new()));
        let queue = Arc::new(BatchQueue::start(
            1,
            8,
            Linger::Never,
            noting_sizes(sizes.clone()),
        ));
        let start = Instant::now();
        for request in 1..=3 {
            assert_eq!(queue.send(request).await.unwrap(), request);
        }
        assert_eq!(start.elapsed(), Duration::ZERO);
        assert_eq!(*sizes.lock().unwrap(), [1, 1, 1]);
    }

    #[tokio::test(start_paused = true)]
    async fn the_writers_end_when_their_queue_is_dropped() {
        // Each writer holds `alive` through its `write_batch`, so the count falls back to
        // one only when every writer task has ended.
        let alive = Arc::new(());
        let writer = |alive: Arc<()>| {
            move |batch: Vec<(u32, Reply<u32>)>| {
                let _alive = alive.clone();
                async move {
                    for (request, reply) in batch {
                        let _ = reply.send(Ok(request));
                    }
                }
            }
        };
        let queue = BatchQueue::start(3, 8, Linger::WhileBusy, writer(alive.clone()));
        let keyed = KeyedBatchQueue::start(3, 8, Linger::WhileBusy, writer(alive.clone()));
        assert_eq!(queue.send(1).await.unwrap(), 1);
        assert_eq!(keyed.send(5, 2).await.unwrap(), 2);
        assert!(Arc::strong_count(&alive) > 1);
        drop((queue, keyed));
        // The paused clock moves on only once every task waits: by then each writer has
        // seen its queue closed.
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(Arc::strong_count(&alive), 1, "a writer outlived its queue");
    }

    #[test]
    fn a_batch_takes_the_oldest_ready_keys_and_a_key_being_written_waits() {
        let room = Arc::new(Semaphore::new(16));
        let mut state = KeyedState::<u32, u32> {
            waiting: HashMap::new(),
            ready: VecDeque::new(),
            writing: HashSet::new(),
            closed: false,
        };
        let push = |state: &mut KeyedState<u32, u32>, key: u64, request: u32| {
            let permit = room.clone().try_acquire_owned().unwrap();
            state.push(key, (request, oneshot::channel().0, permit));
        };
        let requests = |batch: Vec<(u32, Reply<u32>)>| batch.into_iter().map(|(r, _)| r).collect::<Vec<_>>();
        for (key, request) in [(5, 1), (5, 2), (5, 3), (6, 4), (7, 5)] {
            push(&mut state, key, request);
        }
        let (keys, batch) = state.take(2);
        assert_eq!(
            (keys, requests(batch)),
            (vec![5], vec![1, 2]),
            "the oldest key first, up to the batch's size"
        );
        let (keys, batch) = state.take(8);
        assert_eq!(
            (keys, requests(batch)),
            (vec![6, 7], vec![4, 5]),
            "key 5 is being written"
        );
        push(&mut state, 6, 6);
        assert!(
            state.take(8).1.is_empty(),
            "keys 5, 6 and 7 are all being written"
        );
        state.written(&[6, 7]);
        state.written(&[5]);
        let (keys, batch) = state.take(8);
        assert_eq!(
            (keys, requests(batch)),
            (vec![6, 5], vec![6, 3]),
            "ready again as written"
        );
        assert!(state.waiting.is_empty() && state.ready.is_empty());
    }
}

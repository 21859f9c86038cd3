//! Background work: the sweepers that settle sprays after their receive window, purge
//! them after their lookup window, and forget idempotency keys after a day.
//!
//! Each sweeper is a function that does one bounded pass and says what it did
//! (`settle_expired_once`, `purge_expired_once`, `purge_idempotency_once`); tests call
//! them directly with the time they choose. [`run`] only calls them in a loop, sleeps, and
//! watches for shutdown. Every instance runs the loop: the passes cooperate through the
//! database (a spray is settled by a conditional update that only one can win), so there
//! is no leader to elect.

mod purge;
mod settle;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

pub use purge::{IDEMPOTENCY_RETENTION_HOURS, purge_expired_once, purge_idempotency_once};
pub use settle::settle_expired_once;

use crate::clock::Clock;
pub use crate::config::SweepSettings;
use crate::store::Store;

/// Sprays, or keys, handled per statement or per pass: small enough that no pass holds
/// the single SQLite writer, or MySQL locks, for long.
pub const SWEEP_BATCH: u32 = 200;

/// Runs the sweepers until `stop` turns true (or its sender is dropped): one pass of each,
/// then a pause of `settings.interval`, again and again. A pass that found a full batch
/// of work is followed at once by another, so a backlog drains without waiting.
pub async fn run(
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    settings: SweepSettings,
    stop: watch::Receiver<bool>,
) {
    repeat(settings.interval, stop, || {
        sweep(store.as_ref(), clock.as_ref(), settings)
    })
    .await;
    tracing::info!("sweepers stopped");
}

/// One pass of every sweeper, as [`run`] does it; `true` when any of them found a full
/// batch (more may be waiting). A failure is logged and counted
/// (`spray_sweeper_passes_total`), and the pass goes on: the next pass retries it.
pub async fn sweep(store: &dyn Store, clock: &dyn Clock, settings: SweepSettings) -> bool {
    use crate::telemetry::metrics::{record_settlement_overdue, record_sweep};
    let full = |done: usize| u32::try_from(done).is_ok_and(|done| done >= SWEEP_BATCH);
    let mut busy = false;
    // Sprays the settlement is late with: closed for longer than a healthy sweeper leaves
    // them (two pauses and a minute), counted before this pass settles any. Every
    // instance sees the same number; it stays above 0 only while settling fails.
    let overdue_by = chrono::TimeDelta::from_std(settings.interval.saturating_mul(2))
        .unwrap_or(chrono::TimeDelta::MAX)
        .checked_add(&chrono::TimeDelta::minutes(1))
        .unwrap_or(chrono::TimeDelta::MAX);
    if let Some(closed_by) = clock.now().checked_sub_signed(overdue_by) {
        match store.unsettled_sprays(closed_by, SWEEP_BATCH).await {
            Ok(overdue) => record_settlement_overdue(overdue.len()),
            Err(e) => tracing::warn!(error = %e, "counting overdue sprays failed"),
        }
    }
    match settle_expired_once(store, clock.now(), SWEEP_BATCH).await {
        Ok(0) => record_sweep("settle", true, clock.now()),
        Ok(settled) => {
            record_sweep("settle", true, clock.now());
            tracing::info!(settled, "settled sprays whose receive window closed");
            busy |= full(settled);
        }
        Err(e) => {
            record_sweep("settle", false, clock.now());
            tracing::warn!(error = %e, "settling failed; will retry");
        }
    }
    // Settled just above: purge without settling again.
    let purged = purge_expired_once(store, clock.now(), settings.retention_grace, SWEEP_BATCH).await;
    record_sweep("purge", purged.is_ok(), clock.now());
    match purged {
        Ok(0) => {}
        Ok(purged) => {
            tracing::info!(purged, "purged sprays past their lookup window");
            busy |= full(purged);
        }
        Err(e) => tracing::warn!(error = %e, "purging sprays failed; will retry"),
    }
    let forgotten = purge_idempotency_once(store, clock.now(), SWEEP_BATCH).await;
    record_sweep("idempotency", forgotten.is_ok(), clock.now());
    match forgotten {
        Ok(0) => {}
        Ok(forgotten) => {
            tracing::debug!(forgotten, "purged old idempotency keys");
            busy |= full(forgotten);
        }
        Err(e) => tracing::warn!(error = %e, "purging idempotency keys failed; will retry"),
    }
    busy
}

/// Calls `pass` until `stop` turns true or its sender is dropped, pausing `interval` after
/// each pass that returns `false`. Shutdown is noticed during a pause at once, and between
/// passes; a pass that has started is finished (each is one bounded batch).
pub async fn repeat<F, Fut>(interval: Duration, mut stop: watch::Receiver<bool>, mut pass: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    loop {
        // `has_changed` fails when the sender is gone: treat it as a stop too.
        if *stop.borrow() || stop.has_changed().is_err() {
            return;
        }
        if pass().await {
            continue;
        }
        tokio::select! {
            _ = stop.wait_for(|stopping| *stopping) => return,
            () = tokio::time::sleep(interval) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    /// Counts passes; the first `busy` of them report a full batch.
    fn counting(busy: u32) -> (Arc<AtomicU32>, impl FnMut() -> std::future::Ready<bool>) {
        let passes = Arc::new(AtomicU32::new(0));
        let counter = passes.clone();
        let pass = move || {
            let n = counter.fetch_add(1, Ordering::SeqCst);
            std::future::ready(n < busy)
        };
        (passes, pass)
    }

    #[tokio::test(start_paused = true)]
    async fn the_loop_passes_once_per_interval_and_stops_at_once_on_shutdown() {
        let (stop_tx, stop_rx) = watch::channel(false);
        let (passes, pass) = counting(0);
        let looping = tokio::spawn(repeat(Duration::from_secs(10), stop_rx, pass));
        // The first pass runs at once; then one per interval (paused time: no real waiting).
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert_eq!(passes.load(Ordering::SeqCst), 1);
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert_eq!(passes.load(Ordering::SeqCst), 2);
        tokio::time::sleep(Duration::from_secs(25)).await;
        assert_eq!(passes.load(Ordering::SeqCst), 4);
        // Shutdown in the middle of a pause ends the loop without waiting for the pause.
        let asked = tokio::time::Instant::now();
        stop_tx.send(true).unwrap();
        looping.await.unwrap();
        assert_eq!(tokio::time::Instant::now(), asked);
        assert_eq!(passes.load(Ordering::SeqCst), 4);
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_batch_is_followed_at_once_by_another_pass() {
        let (stop_tx, stop_rx) = watch::channel(false);
        let (passes, pass) = counting(3);
        let looping = tokio::spawn(repeat(Duration::from_secs(10), stop_rx, pass));
        tokio::time::sleep(Duration::from_millis(1)).await;
        // Three busy passes and the idle one after them, all without a pause.
        assert_eq!(passes.load(Ordering::SeqCst), 4);
        stop_tx.send(true).unwrap();
        looping.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn the_loop_stops_when_its_shutdown_sender_is_gone() {
        let (stop_tx, stop_rx) = watch::channel(false);
        let (passes, pass) = counting(0);
        let looping = tokio::spawn(repeat(Duration::from_secs(10), stop_rx, pass));
        tokio::time::sleep(Duration::from_millis(1)).await;
        drop(stop_tx);
        looping.await.unwrap();
        assert_eq!(passes.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_loop_told_to_stop_before_it_starts_never_passes() {
        let (stop_tx, stop_rx) = watch::channel(false);
        stop_tx.send(true).unwrap();
        let (passes, pass) = counting(0);
        repeat(Duration::from_secs(10), stop_rx, pass).await;
        assert_eq!(passes.load(Ordering::SeqCst), 0);
    }
}

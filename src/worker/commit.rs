//! Committing offsets, in one place: what the [`OffsetTracker`] says is
//! committable is committed synchronously — periodically by
//! [`commit_loop`], on a revoke by the consumer's rebalance callback, and
//! once more at shutdown — through [`commit_sync`], which counts every
//! result in `triagem_commits_total` and only then marks the offsets
//! committed.

use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{CommitMode, Consumer, ConsumerContext};
use rdkafka::{Offset, TopicPartitionList};

use super::consume::WorkerConsumer;
use super::offsets::{CommitOffset, OffsetTracker};
use super::Shutdown;
use crate::metrics::Metrics;

/// The commit request for `offsets`.
pub fn offsets_list(offsets: &[CommitOffset]) -> TopicPartitionList {
    let mut tpl = TopicPartitionList::new();
    for c in offsets {
        // Adding an explicit offset to a fresh list cannot fail.
        let _ = tpl.add_partition_offset(&c.topic, c.partition, Offset::Offset(c.offset));
    }
    tpl
}

/// Commits synchronously (blocks for one round trip to the group coordinator),
/// counts the result in `triagem_commits_total`. Returns whether it succeeded.
pub fn commit_sync<C: ConsumerContext, K: Consumer<C>>(
    consumer: &K,
    offsets: &[CommitOffset],
    tracker: &OffsetTracker,
    metrics: &Metrics,
) -> bool {
    if offsets.is_empty() {
        return true;
    }
    let _span = tracing::debug_span!("commit", partitions = offsets.len()).entered();
    match consumer.commit(&offsets_list(offsets), CommitMode::Sync) {
        Ok(()) => {
            metrics.commits.with_label_values(&["ok"]).inc();
            tracker.mark_committed(offsets);
            tracing::debug!(offsets = ?offsets.iter().map(|c| (c.partition, c.offset)).collect::<Vec<_>>(), "committed");
            true
        }
        Err(e) => {
            metrics.commits.with_label_values(&["error"]).inc();
            tracing::warn!(error = %e, "offset commit failed; will retry");
            false
        }
    }
}

/// Commits what became committable, every `interval`.
pub(super) async fn commit_loop(
    consumer: Arc<WorkerConsumer>,
    tracker: Arc<OffsetTracker>,
    metrics: Arc<Metrics>,
    interval: Duration,
    mut stop: Shutdown,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.wait() => break,
            _ = tick.tick() => {}
        }
        metrics.in_flight.set(tracker.pending(None) as i64);
        let offsets = tracker.committable(None);
        if offsets.is_empty() {
            continue;
        }
        // Synchronous, off the async threads: the result is known, counted, and
        // only then are the offsets marked committed.
        let (c, t, m) = (consumer.clone(), tracker.clone(), metrics.clone());
        let _ = tokio::task::spawn_blocking(move || commit_sync(&*c, &offsets, &t, &m)).await;
    }
}

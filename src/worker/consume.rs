//! Consuming: the Kafka consumer, its rebalance handling, and the stage that
//! reads messages, tracks their offsets and hands them on (decoded ones to the
//! batcher, poison ones straight to the router).
//!
//! Backpressure: a message is fetched only after a slot of
//! `kafka.max_in_flight` is taken, and the hand-off channels are bounded, so a
//! slow model or broker pauses consumption instead of growing memory.
//!
//! Rebalance: before partitions are revoked, [`WorkerContext::pre_rebalance`]
//! waits (up to `shutdown.timeout_ms`) until every message taken from them has
//! its output acknowledged, then commits them synchronously, so the next owner
//! starts exactly where this worker stopped.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::error::KafkaResult;
use rdkafka::message::{Headers, Message};
use rdkafka::statistics::Statistics;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio::sync::{mpsc, Semaphore};

use super::message::{decode, Envelope, Pending};
use super::offsets::{CommitOffset, OffsetTracker, TopicPartition};
use super::route::Outcome;
use super::Shutdown;
use crate::config::InputConfig;
use crate::metrics::{Metrics, QUEUE_BATCHER};

/// The consumer's context: rebalance, commit and statistics callbacks.
pub struct WorkerContext {
    /// Offsets in flight, drained and committed on revoke.
    pub tracker: Arc<OffsetTracker>,
    /// Commit results and consumer lag.
    pub metrics: Arc<Metrics>,
    /// Longest wait for revoked partitions' work to finish.
    pub revoke_timeout: Duration,
    /// Set once the worker is closing: revokes then commit what is done without waiting.
    pub closing: AtomicBool,
}

/// The worker's consumer type.
pub type WorkerConsumer = StreamConsumer<WorkerContext>;

impl ClientContext for WorkerContext {
    fn stats(&self, stats: Statistics) {
        for (topic, t) in &stats.topics {
            for (partition, p) in &t.partitions {
                if *partition < 0 || !p.desired {
                    continue;
                }
                if p.consumer_lag >= 0 {
                    self.metrics
                        .consumer_lag
                        .with_label_values(&[topic.as_str(), &partition.to_string()])
                        .set(p.consumer_lag);
                }
            }
        }
    }

    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        tracing::warn!(%error, reason, "kafka client error");
    }
}

impl ConsumerContext for WorkerContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Revoke(tpl) => {
                let parts = partitions(tpl);
                if parts.is_empty() {
                    return;
                }
                // Waiting and committing block: tell tokio, so that the other
                // stages keep running on the remaining worker threads.
                let finish = || self.finish_revoked(consumer, &parts);
                match tokio::runtime::Handle::try_current() {
                    Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
                        tokio::task::block_in_place(finish)
                    }
                    _ => finish(),
                }
            }
            Rebalance::Assign(tpl) => tracing::info!(partitions = ?partitions(tpl), "partitions assigned"),
            Rebalance::Error(e) => tracing::warn!(error = %e, "rebalance error"),
        }
    }

    fn commit_callback(&self, result: KafkaResult<()>, _offsets: &TopicPartitionList) {
        // Commits are synchronous and counted where they are made (`commit_sync`).
        if let Err(e) = result {
            tracing::debug!(error = %e, "offset commit callback reported an error");
        }
    }
}

impl WorkerContext {
    /// Before a revoke: lets the revoked partitions' messages finish (up to
    /// `revoke_timeout`), commits them synchronously and forgets them.
    fn finish_revoked(&self, consumer: &BaseConsumer<Self>, parts: &[TopicPartition]) {
        let pending = self.tracker.pending(Some(parts));
        tracing::info!(partitions = ?parts, pending, "partitions revoked: finishing their messages");
        if pending > 0
            && !self.closing.load(Ordering::SeqCst)
            && !self.tracker.wait_drained(Some(parts), self.revoke_timeout)
        {
            tracing::warn!(
                pending = self.tracker.pending(Some(parts)),
                "revoke: in-flight messages did not finish in time; the next owner will process them again"
            );
        }
        let offsets = self.tracker.committable(Some(parts));
        commit_sync(consumer, &offsets, &self.tracker, &self.metrics);
        self.tracker.remove(parts);
        for (topic, partition) in parts {
            let _ = self.metrics.consumer_lag.remove_label_values(&[topic.as_str(), &partition.to_string()]);
        }
    }
}

fn partitions(tpl: &TopicPartitionList) -> Vec<TopicPartition> {
    tpl.elements().iter().map(|e| (e.topic().to_string(), e.partition())).collect()
}

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

/// Copies what the pipeline needs out of a borrowed message.
pub fn envelope<M: Message>(m: &M) -> Envelope {
    let headers = m
        .headers()
        .map(|hs| hs.iter().map(|h| (h.key.to_string(), h.value.map(<[u8]>::to_vec))).collect())
        .unwrap_or_default();
    Envelope {
        topic: m.topic().to_string(),
        partition: m.partition(),
        offset: m.offset(),
        key: m.key().map(<[u8]>::to_vec),
        headers,
        timestamp_ms: m.timestamp().to_millis(),
        payload: m.payload().map(<[u8]>::to_vec),
    }
}

/// The consume stage's inputs and outputs.
pub struct ConsumeStage {
    /// The subscribed consumer.
    pub consumer: Arc<WorkerConsumer>,
    /// One permit per message in flight (`kafka.max_in_flight`).
    pub slots: Arc<Semaphore>,
    /// How to decode.
    pub input: InputConfig,
    /// Where consumed offsets are recorded.
    pub tracker: Arc<OffsetTracker>,
    /// Consumed counter and the batcher queue gauge.
    pub metrics: Arc<Metrics>,
    /// Decoded messages, to the batcher.
    pub to_batcher: mpsc::Sender<Pending>,
    /// Poison messages, straight to the router.
    pub to_router: mpsc::Sender<Outcome>,
}

impl ConsumeStage {
    /// Reads until `shutdown`; dropping its senders then lets the later stages drain.
    pub async fn run(self, mut shutdown: Shutdown) {
        loop {
            let permit = tokio::select! {
                biased;
                _ = shutdown.wait() => break,
                p = self.slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            };
            let message = tokio::select! {
                biased;
                _ = shutdown.wait() => break,
                m = self.consumer.recv() => m,
            };
            let envelope = match message {
                Ok(m) => envelope(&m),
                Err(e) => {
                    // E.g. the input topic does not exist yet: librdkafka keeps retrying.
                    tracing::warn!(error = %e, "consume error");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            };
            self.metrics.consumed.with_label_values(&[envelope.topic.as_str(), &envelope.partition.to_string()]).inc();
            self.tracker.track(&envelope.topic, envelope.partition, envelope.offset);
            match decode(envelope.payload.as_deref(), &self.input) {
                Ok(decoded) => {
                    self.metrics.queue(QUEUE_BATCHER).inc();
                    let pending = Pending { envelope, decoded, permit: Some(permit) };
                    if self.to_batcher.send(pending).await.is_err() {
                        break;
                    }
                }
                Err(poison) => {
                    let outcome = Outcome::Poison { envelope, poison, permit: Some(permit) };
                    if self.to_router.send(outcome).await.is_err() {
                        break;
                    }
                }
            }
        }
        tracing::info!("stopped fetching");
    }
}

//! Committing offsets, in one place: what the [`OffsetTracker`] says is
//! committable is committed synchronously — periodically by
//! `commit_loop`, on a revoke by the consumer's rebalance callback, and
//! once more at shutdown (after the periodic loop has stopped) — by the one
//! [`Committer`]: the snapshot of committable offsets and its commit happen
//! under one lock, so a stale, lower snapshot can never land after a newer
//! one, and a revoke forgets its partitions under the same lock, so no later
//! commit covers a partition another member now owns. [`commit_sync`] counts
//! every result in `triagem_commits_total` and only then marks the offsets
//! committed.
//!
//! With `kafka.delivery = "exactly_once"` the same committer hands each
//! commit to [`Transactions`]: the offsets go into the open transaction with
//! its outputs, and the transaction is committed (see `transaction`).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::consumer::{CommitMode, Consumer, ConsumerContext};
use rdkafka::{Offset, TopicPartitionList};

use super::consume::WorkerConsumer;
use super::offsets::{CommitOffset, OffsetTracker, TopicPartition};
use super::transaction::Transactions;
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

/// The one committer: snapshot and commit under one lock.
pub struct Committer {
    /// What is committable.
    pub tracker: Arc<OffsetTracker>,
    /// `triagem_commits_total`.
    pub metrics: Arc<Metrics>,
    /// Held from the snapshot to the end of its commit.
    lock: Mutex<()>,
    /// Exactly-once: commits are transactions.
    pub transactions: Option<Arc<Transactions>>,
    /// Tests: a pause between the snapshot and its commit (a thread preempted there).
    #[cfg(test)]
    pause: Duration,
}

impl Committer {
    /// The committer of `tracker`'s offsets.
    pub fn new(tracker: Arc<OffsetTracker>, metrics: Arc<Metrics>) -> Self {
        Committer {
            tracker,
            metrics,
            lock: Mutex::new(()),
            transactions: None,
            #[cfg(test)]
            pause: Duration::ZERO,
        }
    }

    /// The committer of exactly-once delivery: every commit is a transaction's.
    pub fn transactional(tracker: Arc<OffsetTracker>, metrics: Arc<Metrics>, transactions: Arc<Transactions>) -> Self {
        Committer { transactions: Some(transactions), ..Committer::new(tracker, metrics) }
    }

    /// Whether a commit has anything to do.
    pub fn has_work(&self) -> bool {
        !self.tracker.committable(None).is_empty() || self.transactions.as_ref().is_some_and(|t| t.has_outputs())
    }

    /// Commits what is committable now (all partitions, or only `only`; a
    /// transaction always covers all), synchronously. Blocks: run it off the
    /// async threads.
    pub fn commit<C: ConsumerContext, K: Consumer<C>>(&self, consumer: &K, only: Option<&[TopicPartition]>) -> bool {
        let _one = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = &self.transactions {
            return t.commit(consumer, &self.tracker);
        }
        let offsets = self.tracker.committable(only);
        #[cfg(test)]
        std::thread::sleep(self.pause.mul_f64(rand_fraction()));
        commit_sync(consumer, &offsets, &self.tracker, &self.metrics)
    }

    /// On a revoke: commits `parts` and forgets them, under the lock, so that
    /// no later commit covers them.
    /// Exactly-once: the open transaction is committed (or aborted) before
    /// the partitions are given up.
    pub fn commit_and_forget<C: ConsumerContext, K: Consumer<C>>(&self, consumer: &K, parts: &[TopicPartition]) {
        let _one = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = &self.transactions {
            t.commit(consumer, &self.tracker);
            t.rewind.forget(parts);
            self.tracker.remove(parts);
            return;
        }
        let offsets = self.tracker.committable(Some(parts));
        commit_sync(consumer, &offsets, &self.tracker, &self.metrics);
        self.tracker.remove(parts);
    }
}

/// Tests: a pseudo-random fraction in [0, 1) (the low bits of the clock).
#[cfg(test)]
fn rand_fraction() -> f64 {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().subsec_nanos();
    (nanos % 1000) as f64 / 1000.0
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

/// Commits what became committable, every `interval`, until `stop`; updates
/// the in-flight gauges (messages, bytes, oldest unacknowledged) on the way.
pub(super) async fn commit_loop(
    consumer: Arc<WorkerConsumer>,
    committer: Arc<Committer>,
    bytes: Arc<super::consume::ByteBudget>,
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
        committer.metrics.in_flight.set(committer.tracker.pending(None) as i64);
        committer.metrics.in_flight_bytes.set(bytes.used() as i64);
        for ((topic, partition), age) in committer.tracker.oldest_unacked() {
            committer
                .metrics
                .oldest_unacked
                .with_label_values(&[topic.as_str(), &partition.to_string()])
                .set(age.as_secs_f64());
        }
        if !committer.has_work() {
            continue;
        }
        // Synchronous, off the async threads: the result is known, counted, and
        // only then are the offsets marked committed.
        let (c, k) = (consumer.clone(), committer.clone());
        let _ = tokio::task::spawn_blocking(move || k.commit(&*c, None)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::config::ClientConfig;
    use rdkafka::consumer::BaseConsumer;
    use rdkafka::mocking::MockCluster;
    use std::sync::atomic::{AtomicBool, Ordering};

    /// Three threads commit while offsets advance (the periodic loop, a revoke
    /// and the shutdown commit at once), each paused for up to 2 ms between
    /// its snapshot and its commit (as a thread preempted there is): the
    /// group's committed offset, read back all along by another client, never
    /// goes backwards, and ends at the last committable offset.
    #[test]
    fn concurrent_commits_never_move_the_offset_back() {
        let mock = MockCluster::new(1).unwrap();
        mock.create_topic("in", 1, 1).unwrap();
        let client = |group: &str| -> BaseConsumer {
            ClientConfig::new()
                .set("bootstrap.servers", mock.bootstrap_servers())
                .set("group.id", group)
                .set("enable.auto.commit", "false")
                .create()
                .unwrap()
        };
        let consumer = Arc::new(client("g"));
        let tracker = Arc::new(OffsetTracker::new());
        let mut committer = Committer::new(tracker.clone(), Metrics::new().unwrap());
        committer.pause = Duration::from_millis(2);
        let committer = Arc::new(committer);
        let done = Arc::new(AtomicBool::new(false));
        let n = 3000;
        let advance = {
            let t = tracker.clone();
            std::thread::spawn(move || {
                for o in 0..n {
                    t.track("in", 0, o);
                    t.ack("in", 0, o);
                    if o % 10 == 0 {
                        std::thread::sleep(Duration::from_micros(200));
                    }
                }
            })
        };
        let committers: Vec<_> = (0..3)
            .map(|_| {
                let (c, k, d) = (consumer.clone(), committer.clone(), done.clone());
                std::thread::spawn(move || {
                    while !d.load(Ordering::SeqCst) {
                        k.commit(&*c, None);
                    }
                    k.commit(&*c, None);
                })
            })
            .collect();
        let reader = client("g");
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition("in", 0);
        let read = |r: &BaseConsumer| match r.committed_offsets(tpl.clone(), Duration::from_secs(5)) {
            Ok(l) => match l.find_partition("in", 0).map(|e| e.offset()) {
                Some(Offset::Offset(o)) => o,
                _ => -1,
            },
            Err(_) => -1,
        };
        let (mut last, mut backwards, mut reads) = (-1, 0, 0);
        while !advance.is_finished() {
            let now = read(&reader);
            reads += 1;
            if now < last {
                backwards += 1;
            }
            last = last.max(now);
        }
        done.store(true, Ordering::SeqCst);
        for c in committers {
            c.join().unwrap();
        }
        let end = read(&reader);
        println!("{reads} reads of the committed offset, {backwards} went backwards; final {end}");
        assert_eq!(backwards, 0, "a stale commit landed after a newer one");
        assert_eq!(end, n);
    }
}

//! Consuming: the Kafka consumer, its rebalance handling, and the stage that
//! reads messages, tracks their offsets and hands them on (decoded ones to the
//! batcher, poison ones straight to the router).
//!
//! Backpressure: each message takes a [`Slot`]: one of `kafka.max_in_flight`
//! and its bytes of `kafka.max_in_flight_bytes` ([`ByteBudget`]); when no
//! slot is left or the bytes reach the bound, the assigned partitions are
//! paused while the consumer keeps being polled (rebalances, statistics and
//! errors are still served, and librdkafka's `max.poll.interval.ms` never
//! passes), and resumed when room frees. The hand-off channels are bounded,
//! so a slow model or broker pauses consumption instead of growing memory.
//!
//! Rebalance: before partitions are revoked, [`WorkerContext::pre_rebalance`]
//! waits (up to `shutdown.timeout`) until every message taken from them has
//! its output acknowledged, then commits them synchronously, so the next owner
//! starts exactly where this worker stopped.
//!
//! Gaps: [`GapWatch`] checks that each partition's consumed offsets follow one
//! another, and that the first one after an assignment is the group's
//! committed offset. A gap is a warning and `triagem_offset_gaps_total` /
//! `triagem_offsets_skipped_total`. With Apache Kafka only compaction,
//! transaction markers (and aborted transactions) and retention deleting
//! records before they were read make gaps; a broker that returns a later
//! batch than asked for (tansu 0.6.0, see the README) makes them too.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::error::KafkaResult;
use rdkafka::message::{Headers, Message};
use rdkafka::statistics::Statistics;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio::sync::{mpsc, Notify, OwnedSemaphorePermit, Semaphore};

use super::message::{decode, Envelope, Pending};
use super::offsets::{OffsetTracker, TopicPartition};
use super::route::Outcome;
use super::Shutdown;
use crate::config::InputConfig;
use crate::metrics::{Metrics, QUEUE_BATCHER};

/// The consumer's context: rebalance, commit and statistics callbacks.
pub struct WorkerContext {
    /// Offsets in flight, drained and committed on revoke.
    pub tracker: Arc<OffsetTracker>,
    /// The one committer (shared with the periodic loop and the shutdown commit).
    pub committer: Arc<super::commit::Committer>,
    /// Commit results and consumer lag.
    pub metrics: Arc<Metrics>,
    /// Longest wait for revoked partitions' work to finish.
    pub revoke_timeout: Duration,
    /// Set once the worker is closing: revokes then commit what is done without waiting.
    pub closing: AtomicBool,
    /// Where each assigned partition's next offset is expected.
    pub gaps: Arc<GapWatch>,
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
            Rebalance::Assign(tpl) => {
                let parts = partitions(tpl);
                tracing::info!(partitions = ?parts, "partitions assigned");
                self.expect_committed(consumer, tpl);
                for (topic, partition) in &parts {
                    let labels = [topic.as_str(), &partition.to_string()];
                    self.metrics.offset_gaps.with_label_values(&labels);
                    self.metrics.offsets_skipped.with_label_values(&labels);
                }
            }
            Rebalance::Error(e) => tracing::warn!(error = %e, "rebalance error"),
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        // librdkafka keeps a partition's pause across a revoke and a new
        // assignment; the consume stage pauses again if no slot is free.
        if let Rebalance::Assign(tpl) = rebalance {
            if let Err(e) = consumer.resume(tpl) {
                tracing::warn!(error = %e, "cannot resume the assigned partitions");
            }
            self.metrics.consumer_paused.set(0);
        }
        let assigned = consumer.assignment().map(|a| a.count()).unwrap_or(0);
        self.metrics.assigned_partitions.set(assigned as i64);
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
        let _span = tracing::info_span!("revoke", partitions = parts.len()).entered();
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
        self.committer.commit_and_forget(consumer, parts);
        self.gaps.forget(parts);
        for (topic, partition) in parts {
            let _ = self.metrics.consumer_lag.remove_label_values(&[topic.as_str(), &partition.to_string()]);
            let _ = self.metrics.oldest_unacked.remove_label_values(&[topic.as_str(), &partition.to_string()]);
        }
    }
}

impl WorkerContext {
    /// After an assignment: the group's committed offsets are where each
    /// partition's first message must be (a partition without one starts
    /// wherever `auto.offset.reset` says, and is not checked).
    fn expect_committed(&self, consumer: &BaseConsumer<Self>, tpl: &TopicPartitionList) {
        if tpl.count() == 0 {
            return;
        }
        match consumer.committed_offsets(tpl.clone(), Duration::from_secs(5)) {
            Ok(committed) => {
                for e in committed.elements() {
                    if let Offset::Offset(o) = e.offset() {
                        self.gaps.expect(e.topic(), e.partition(), o);
                    }
                }
            }
            Err(e) => tracing::debug!(error = %e, "committed offsets unknown: the first offsets are not checked"),
        }
    }
}

fn partitions(tpl: &TopicPartitionList) -> Vec<TopicPartition> {
    tpl.elements().iter().map(|e| (e.topic().to_string(), e.partition())).collect()
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
        received: Some(std::time::Instant::now()),
        forwarded: None,
        payload: m.payload().map(<[u8]>::to_vec),
        generation: 0,
    }
}

/// The bytes of the messages in flight, against `kafka.max_in_flight_bytes`.
///
/// A soft bound, like Kafka's `fetch.max.bytes`: the consume stage stops
/// taking messages once the bound is reached, and the message that crosses it
/// is kept, so the bytes in flight stay under the bound plus one message
/// (itself at most `input.max_bytes` once decoded, or what the broker allows).
#[derive(Debug)]
pub struct ByteBudget {
    /// Bytes held by live [`Slot`]s.
    used: AtomicU64,
    /// The bound.
    max: u64,
    /// Woken when bytes are released.
    freed: Notify,
}

impl ByteBudget {
    /// A budget of `max` bytes.
    pub fn new(max: u64) -> Arc<Self> {
        Arc::new(ByteBudget { used: AtomicU64::new(0), max, freed: Notify::new() })
    }

    /// Whether the bytes in flight have reached the bound.
    pub fn full(&self) -> bool {
        self.used.load(Ordering::SeqCst) >= self.max
    }

    /// Bytes held now.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::SeqCst)
    }

    /// Resolves once the bytes in flight are under the bound.
    pub async fn room(&self) {
        loop {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            if !self.full() {
                return;
            }
            freed.await;
        }
    }

    fn take(self: &Arc<Self>, bytes: u64) -> HeldBytes {
        self.used.fetch_add(bytes, Ordering::SeqCst);
        HeldBytes { bytes, budget: self.clone() }
    }
}

/// Bytes of a [`ByteBudget`], given back on drop.
#[derive(Debug)]
struct HeldBytes {
    bytes: u64,
    budget: Arc<ByteBudget>,
}

impl Drop for HeldBytes {
    fn drop(&mut self) {
        self.budget.used.fetch_sub(self.bytes, Ordering::SeqCst);
        self.budget.freed.notify_waiters();
    }
}

/// What a message holds while it is in flight — one of `kafka.max_in_flight`
/// (none for a message that arrived while fetching was paused) and its bytes
/// of `kafka.max_in_flight_bytes` —, released when it is dropped (once its
/// output is acknowledged, or its work abandoned).
#[derive(Debug, Default)]
pub struct Slot {
    /// Its place among `kafka.max_in_flight`.
    _permit: Option<OwnedSemaphorePermit>,
    /// Its bytes.
    _bytes: Option<HeldBytes>,
}

impl Slot {
    /// A slot holding `permit` (if any) and `bytes` of `budget`.
    pub fn new(permit: Option<OwnedSemaphorePermit>, budget: &Arc<ByteBudget>, bytes: u64) -> Slot {
        Slot { _permit: permit, _bytes: Some(budget.take(bytes)) }
    }
}

/// The bytes a message holds in the pipeline: value, key and headers.
pub fn message_bytes(envelope: &Envelope) -> u64 {
    let len = |b: &Option<Vec<u8>>| b.as_ref().map_or(0, Vec::len);
    let headers: usize = envelope.headers.iter().map(|(k, v)| k.len() + len(v)).sum();
    (len(&envelope.payload) + len(&envelope.key) + headers) as u64
}

/// The consume stage's inputs and outputs.
pub struct ConsumeStage {
    /// The subscribed consumer.
    pub consumer: Arc<WorkerConsumer>,
    /// One permit per message in flight (`kafka.max_in_flight`).
    pub slots: Arc<Semaphore>,
    /// The bytes in flight (`kafka.max_in_flight_bytes`).
    pub bytes: Arc<ByteBudget>,
    /// How to decode.
    pub input: InputConfig,
    /// Where consumed offsets are recorded.
    pub tracker: Arc<OffsetTracker>,
    /// Consumed counter and the batcher queue gauge.
    pub metrics: Arc<Metrics>,
    /// Checks that consumed offsets follow one another.
    pub gaps: Arc<GapWatch>,
    /// Decoded messages, to the batcher.
    pub to_batcher: mpsc::Sender<Pending>,
    /// Poison messages, straight to the router.
    pub to_router: mpsc::Sender<Outcome>,
    /// Told about a consume error librdkafka calls fatal.
    pub fatal: Arc<super::Fatal>,
    /// Exactly-once: where to seek back after an aborted transaction.
    pub rewind: Option<Arc<super::transaction::Rewind>>,
}

impl ConsumeStage {
    /// Reads until `shutdown`; dropping its senders then lets the later stages drain.
    ///
    /// When every slot of `kafka.max_in_flight` is taken, or the bytes in
    /// flight reach `kafka.max_in_flight_bytes`, the assigned partitions are
    /// paused and the consumer is still polled (so rebalance, statistics and
    /// error events are served and `max.poll.interval.ms` never passes); they
    /// are resumed as soon as there is room again. A message that arrives
    /// while paused (fetched before the pause, or from a partition assigned
    /// meanwhile, which is paused at once) is processed without a slot of
    /// `kafka.max_in_flight`; its bytes are counted.
    ///
    /// Fetching resumes in one place, where a slot is taken, whichever wait
    /// saw the room: a consume error or a message that arrives while paused
    /// also ends the wait, and room that frees meanwhile must resume the
    /// partitions too — paused with nothing in flight, the worker would wait
    /// for good.
    pub async fn run(self, mut shutdown: Shutdown) {
        let mut paused = false;
        loop {
            let room = match self.bytes.full() {
                true => Err(tokio::sync::TryAcquireError::NoPermits),
                false => self.slots.clone().try_acquire_owned(),
            };
            let (permit, message) = match room {
                Ok(p) => {
                    if paused {
                        self.set_paused(false);
                        paused = false;
                    }
                    let m = tokio::select! {
                        biased;
                        _ = shutdown.wait() => break,
                        _ = rewound(&self.rewind) => {
                            self.rewind_if_requested();
                            continue;
                        }
                        m = self.consumer.recv() => m,
                    };
                    (Some(p), m)
                }
                Err(tokio::sync::TryAcquireError::Closed) => break,
                Err(tokio::sync::TryAcquireError::NoPermits) => {
                    // Every time: a partition assigned since is resumed by the rebalance (see post_rebalance).
                    self.set_paused(true);
                    paused = true;
                    let got = tokio::select! {
                        biased;
                        _ = shutdown.wait() => None,
                        _ = rewound(&self.rewind) => {
                            self.rewind_if_requested();
                            continue;
                        }
                        open = self.room() => Some((open, None)),
                        m = self.consumer.recv() => Some((false, Some(m))),
                    };
                    match got {
                        None => break,
                        // Room again: the next turn takes the slot and resumes there.
                        Some((open, None)) => {
                            if !open {
                                break;
                            }
                            continue;
                        }
                        Some((_, Some(m))) => (None, m),
                    }
                }
            };
            let envelope = match message {
                Ok(m) => envelope(&m),
                Err(e @ rdkafka::error::KafkaError::MessageConsumptionFatal(_)) => {
                    self.fatal.set(format!("fatal consume error: {e}"));
                    break;
                }
                Err(e) => {
                    // E.g. the input topic does not exist yet: librdkafka keeps retrying.
                    tracing::warn!(error = %e, "consume error");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            };
            self.metrics.consumed.with_label_values(&[envelope.topic.as_str(), &envelope.partition.to_string()]).inc();
            let mut envelope = envelope;
            match &self.rewind {
                None => envelope.generation = self.tracker.track(&envelope.topic, envelope.partition, envelope.offset),
                Some(rewind) => {
                    // Tracked before a rewind is requested (and abandoned by it), or dropped.
                    let pending = rewind.lock();
                    if pending.is_some() {
                        drop(pending);
                        self.rewind_if_requested();
                        continue;
                    }
                    envelope.generation = self.tracker.track(&envelope.topic, envelope.partition, envelope.offset);
                }
            }
            let slot = Slot::new(permit, &self.bytes, message_bytes(&envelope));
            if let Some(gap) = self.gaps.observe(&envelope.topic, envelope.partition, envelope.offset) {
                gap.emit(&envelope.topic, envelope.partition, &self.metrics);
            }
            match decode(envelope.payload.as_deref(), &self.input) {
                Ok(decoded) => {
                    self.metrics.queue(QUEUE_BATCHER).inc();
                    let pending = Pending { envelope, decoded, ids: Vec::new(), slot };
                    if self.to_batcher.send(pending).await.is_err() {
                        break;
                    }
                }
                Err(poison) => {
                    let outcome = Outcome::Poison { envelope: Box::new(envelope), poison, slot };
                    if self.to_router.send(outcome).await.is_err() {
                        break;
                    }
                }
            }
        }
        tracing::info!("stopped fetching");
    }

    /// Resolves once a slot of `kafka.max_in_flight` is free and the bytes in
    /// flight are under `kafka.max_in_flight_bytes` (false: the slots are closed).
    async fn room(&self) -> bool {
        if self.slots.acquire().await.is_err() {
            return false;
        }
        self.bytes.room().await;
        true
    }

    /// Exactly-once, after an aborted transaction: seeks every partition back
    /// to its committed offset (messages fetched before are dropped by
    /// librdkafka, and the ones already taken were abandoned by the rewind).
    fn rewind_if_requested(&self) {
        let Some(to) = self.rewind.as_ref().and_then(|r| r.lock().take()) else { return };
        for ((topic, partition), offset) in to {
            match self.consumer.seek(&topic, partition, Offset::Offset(offset), Duration::from_secs(5)) {
                Ok(()) => tracing::info!(topic, partition, offset, "rewound to the committed offset"),
                Err(e) => tracing::warn!(topic, partition, offset, error = %e, "cannot seek back after an abort"),
            }
        }
    }

    /// Pauses (or resumes) every assigned partition; `triagem_consumer_paused` with it.
    fn set_paused(&self, paused: bool) {
        let Ok(assignment) = self.consumer.assignment() else { return };
        let result = if paused { self.consumer.pause(&assignment) } else { self.consumer.resume(&assignment) };
        if let Err(e) = result {
            tracing::warn!(error = %e, paused, "cannot pause or resume the assigned partitions");
        }
        if self.metrics.consumer_paused.get() != paused as i64 {
            tracing::debug!(
                paused,
                "kafka.max_in_flight or kafka.max_in_flight_bytes reached: fetching paused, polling goes on"
            );
            self.metrics.consumer_paused.set(paused as i64);
        }
    }
}

/// Resolves when a rewind is requested (never without exactly-once).
async fn rewound(rewind: &Option<Arc<super::transaction::Rewind>>) {
    match rewind {
        Some(r) => r.requested().await,
        None => std::future::pending().await,
    }
}

/// Offsets missing between two consumed messages of a partition (or between
/// the committed offset and the first message after an assignment).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gap {
    /// The offset expected next.
    pub expected: i64,
    /// The offset received.
    pub got: i64,
    /// Whether `expected` was the committed offset (the first message after an assignment).
    pub at_start: bool,
}

impl Gap {
    /// Offsets skipped.
    pub fn skipped(&self) -> i64 {
        self.got - self.expected
    }

    /// A warning and the two counters.
    pub fn emit(&self, topic: &str, partition: i32, metrics: &Metrics) {
        let labels = [topic, &partition.to_string()];
        metrics.offset_gaps.with_label_values(&labels).inc();
        metrics.offsets_skipped.with_label_values(&labels).inc_by(self.skipped() as u64);
        let after = if self.at_start { "the committed offset" } else { "the previous message" };
        tracing::warn!(
            topic, partition, expected = self.expected, got = self.got, skipped = self.skipped(),
            "offset gap: expected offset {} after {after}, the broker returned {}; {} offsets never reached the worker \
             (with Apache Kafka only compaction, transaction markers and retention make gaps)",
            self.expected, self.got, self.skipped()
        );
    }
}

/// Where each partition's next consumed offset is expected.
#[derive(Debug, Default)]
pub struct GapWatch {
    /// Per partition: the next offset, and whether it is the committed offset (nothing consumed since).
    next: Mutex<HashMap<TopicPartition, (i64, bool)>>,
}

impl GapWatch {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<TopicPartition, (i64, bool)>> {
        self.next.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// After an assignment: the first message of the partition should be at `committed`.
    pub fn expect(&self, topic: &str, partition: i32, committed: i64) {
        self.lock().insert((topic.to_string(), partition), (committed, true));
    }

    /// Forgets revoked partitions.
    pub fn forget(&self, parts: &[TopicPartition]) {
        let mut next = self.lock();
        for p in parts {
            next.remove(p);
        }
    }

    /// A consumed offset: the gap before it, if any. An offset below the
    /// expected one (a redelivery after a seek) is no gap.
    pub fn observe(&self, topic: &str, partition: i32, offset: i64) -> Option<Gap> {
        let mut next = self.lock();
        let key = (topic.to_string(), partition);
        let gap = match next.get(&key) {
            Some(&(expected, at_start)) if offset > expected => Some(Gap { expected, got: offset, at_start }),
            _ => None,
        };
        next.insert(key, (offset + 1, false));
        gap
    }
}

/// What one readiness probe saw of the broker and the group.
#[derive(Debug, Clone, Default)]
pub struct Probe {
    /// The broker answered a metadata request for the input topic.
    pub reachable: bool,
    /// Input partitions assigned to this worker.
    pub assigned: usize,
    /// When none is assigned: each input partition's (partition, group position, high watermark);
    /// the position is the committed offset, or the low watermark where nothing is committed.
    pub group: Option<Vec<(i32, i64, i64)>>,
}

/// Asks the broker (blocking: run it off the async threads).
pub fn probe<C: ConsumerContext, K: Consumer<C>>(consumer: &K, topic: &str, timeout: Duration) -> Probe {
    let Ok(metadata) = consumer.fetch_metadata(Some(topic), timeout) else {
        return Probe::default();
    };
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .filter(|t| t.name() == topic)
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    let assigned =
        consumer.assignment().map(|a| a.elements().iter().filter(|e| e.topic() == topic).count()).unwrap_or(0);
    let mut probe = Probe { reachable: true, assigned, group: None };
    if assigned > 0 || partitions.is_empty() {
        return probe;
    }
    let mut tpl = TopicPartitionList::new();
    for p in &partitions {
        tpl.add_partition(topic, *p);
    }
    let Ok(committed) = consumer.committed_offsets(tpl, timeout) else {
        return probe;
    };
    let mut group = Vec::with_capacity(partitions.len());
    for p in partitions {
        let Ok((low, high)) = consumer.fetch_watermarks(topic, p, timeout) else {
            return probe;
        };
        let position = match committed.find_partition(topic, p).map(|e| e.offset()) {
            Some(Offset::Offset(o)) => o.max(low),
            _ => low,
        };
        group.push((p, position, high));
    }
    probe.group = Some(group);
    probe
}

/// Which of `topics` the broker's metadata lacks (None when the broker does
/// not answer). Blocking: run it off the async threads.
pub fn missing_topics<C: ConsumerContext, K: Consumer<C>>(
    consumer: &K,
    topics: &[String],
    timeout: Duration,
) -> Option<Vec<String>> {
    let metadata = consumer.fetch_metadata(None, timeout).ok()?;
    let present: std::collections::HashSet<&str> = metadata
        .topics()
        .iter()
        .filter(|t| t.error().is_none() && !t.partitions().is_empty())
        .map(|t| t.name())
        .collect();
    Some(topics.iter().filter(|t| !present.contains(t.as_str())).cloned().collect())
}

/// Decides whether a worker without partitions sits idle while its group's
/// lag stands still: no partition assigned for `timeout`, and some partition
/// with lag whose group position has not moved for `timeout`. A replica beyond
/// the partition count, idle while the others work the lag off, is not.
#[derive(Debug)]
pub struct IdleWatch {
    /// `kafka.unassigned_timeout`.
    timeout: Duration,
    /// Since when no partition is assigned.
    idle_since: Option<Instant>,
    /// Each partition's group position and since when it has not moved.
    positions: HashMap<i32, (i64, Instant)>,
}

impl IdleWatch {
    /// A watch with `kafka.unassigned_timeout`.
    pub fn new(timeout: Duration) -> Self {
        IdleWatch { timeout, idle_since: None, positions: HashMap::new() }
    }

    /// Takes a probe made at `now`; returns the lag that nobody works off
    /// (messages) when this worker is idle while it stands still.
    pub fn update(&mut self, now: Instant, probe: &Probe) -> Option<i64> {
        if probe.assigned > 0 || !probe.reachable {
            self.idle_since = None;
            self.positions.clear();
            return None;
        }
        let idle_since = *self.idle_since.get_or_insert(now);
        let group = probe.group.as_ref()?;
        let mut stuck = 0;
        for &(partition, position, high) in group {
            let since = match self.positions.get(&partition) {
                Some(&(seen, since)) if seen == position => since,
                _ => {
                    self.positions.insert(partition, (position, now));
                    now
                }
            };
            if high > position && now.duration_since(since) >= self.timeout {
                stuck += high - position;
            }
        }
        (now.duration_since(idle_since) >= self.timeout && stuck > 0).then_some(stuck)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consecutive_offsets_make_no_gap() {
        let w = GapWatch::default();
        for o in 0..5 {
            assert_eq!(w.observe("t", 0, o), None);
        }
        // Partitions are independent.
        assert_eq!(w.observe("t", 1, 40), None, "the first offset of a partition without a commit is not checked");
        assert_eq!(w.observe("t", 1, 41), None);
    }

    #[test]
    fn a_jump_is_a_gap_and_the_watch_goes_on_from_there() {
        let w = GapWatch::default();
        w.observe("t", 0, 10);
        let gap = w.observe("t", 0, 14).unwrap();
        assert_eq!(gap, Gap { expected: 11, got: 14, at_start: false });
        assert_eq!(gap.skipped(), 3);
        assert_eq!(w.observe("t", 0, 15), None);
    }

    #[test]
    fn the_first_offset_after_an_assignment_is_checked_against_the_commit() {
        let w = GapWatch::default();
        w.expect("t", 2, 300);
        assert_eq!(w.observe("t", 2, 1346), Some(Gap { expected: 300, got: 1346, at_start: true }));
        w.expect("t", 3, 161);
        assert_eq!(w.observe("t", 3, 161), None);
    }

    #[test]
    fn a_redelivery_is_no_gap_and_forgotten_partitions_start_afresh() {
        let w = GapWatch::default();
        w.observe("t", 0, 10);
        assert_eq!(w.observe("t", 0, 4), None, "going back (a seek, a reset) is no gap");
        assert_eq!(w.observe("t", 0, 5), None);
        w.forget(&[("t".to_string(), 0)]);
        assert_eq!(w.observe("t", 0, 90), None);
    }

    fn idle(group: Vec<(i32, i64, i64)>) -> Probe {
        Probe { reachable: true, assigned: 0, group: Some(group) }
    }

    #[test]
    fn idle_while_the_lag_stands_still_is_flagged_after_the_timeout() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let mut w = IdleWatch::new(10 * s);
        assert_eq!(w.update(t0, &idle(vec![(0, 5, 100), (1, 0, 0)])), None);
        assert_eq!(w.update(t0 + 9 * s, &idle(vec![(0, 5, 100), (1, 0, 0)])), None);
        assert_eq!(w.update(t0 + 10 * s, &idle(vec![(0, 5, 120), (1, 0, 0)])), Some(115));
        // Partitions assigned again: ready at once.
        assert_eq!(w.update(t0 + 11 * s, &Probe { reachable: true, assigned: 1, group: None }), None);
        assert_eq!(w.update(t0 + 12 * s, &idle(vec![(0, 5, 120)])), None, "the timeout starts again");
    }

    #[test]
    fn idle_while_others_work_the_lag_off_is_fine() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let mut w = IdleWatch::new(10 * s);
        for i in 0..30 {
            // Another member commits: the position moves every few seconds.
            let position = 5 + (i / 3) * 50;
            assert_eq!(w.update(t0 + i * s, &idle(vec![(0, position as i64, 10_000)])), None, "at {i} s");
        }
        // No lag at all.
        let mut w = IdleWatch::new(10 * s);
        assert_eq!(w.update(t0, &idle(vec![(0, 50, 50)])), None);
        assert_eq!(w.update(t0 + 60 * s, &idle(vec![(0, 50, 50)])), None);
    }

    #[test]
    fn a_gap_is_counted() {
        let m = Metrics::new().unwrap();
        Gap { expected: 11, got: 14, at_start: false }.emit("t", 0, &m);
        Gap { expected: 20, got: 21, at_start: false }.emit("t", 0, &m);
        assert_eq!(m.offset_gaps.with_label_values(&["t", "0"]).get(), 2);
        assert_eq!(m.offsets_skipped.with_label_values(&["t", "0"]).get(), 4);
    }
}

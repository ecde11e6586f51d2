//! Exactly-once delivery (`kafka.delivery = "exactly_once"`): the second
//! committer behind [`super::commit::Committer`]. The producer is
//! transactional (`transactional.id` from `kafka.transactional_id`, stable per
//! replica); the router produces every output — routed, review or dead
//! letter — inside the open transaction, and every `kafka.transaction_interval`
//! (and on a revoke, and at shutdown) [`Transactions::commit`] adds the input
//! offsets to it (`send_offsets_to_transaction`, with the consumer's group
//! metadata) and commits it: outputs and offsets become visible together, or
//! not at all.
//!
//! - An output counts as done for its offset once it is *in* the transaction
//!   (enqueued while the transaction is open): the commit flushes and fails if
//!   any output of the transaction failed. [`Transactions::try_enter`] is the
//!   gate: the router enqueues under a shared hold, the commit takes it whole,
//!   so no output straddles two transactions.
//! - A commit that fails with an abortable error is aborted; every partition
//!   is then [`Rewind`]ed: its work since the last commit is abandoned (the
//!   tracker starts a new generation) and the consume stage seeks it back to
//!   its last committed offset, so the aborted outputs are produced again in
//!   the next transaction.
//! - A fatal error (a newer producer with the same `transactional.id` fenced
//!   this one) stops the worker with that reason: a zombie cannot write.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard};
use std::time::{Duration, Instant};

use rdkafka::consumer::{Consumer, ConsumerContext};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, Producer};

use super::commit::offsets_list;
use super::offsets::{CommitOffset, OffsetTracker, TopicPartition};
use super::Fatal;
use crate::metrics::Metrics;

/// Where each partition must be consumed again after an aborted transaction;
/// taken by the consume stage, which seeks there.
#[derive(Debug, Default)]
pub struct Rewind {
    /// Per partition, the offset to seek to; None when no rewind is waiting.
    to: Mutex<Option<BTreeMap<TopicPartition, i64>>>,
    /// Wakes the consume stage when a rewind is requested.
    notify: tokio::sync::Notify,
}

impl Rewind {
    /// The pending rewind. The consume stage holds this lock from the check to
    /// the tracking of a message, so that a message fetched before a rewind is
    /// either tracked before it (and abandoned by it) or dropped.
    pub fn lock(&self) -> MutexGuard<'_, Option<BTreeMap<TopicPartition, i64>>> {
        self.to.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Resolves when a rewind may be waiting (check [`Rewind::lock`]).
    pub async fn requested(&self) {
        self.notify.notified().await
    }

    /// Voids every partition's work since its last commit (a new generation
    /// in the tracker) and asks the consume stage to seek back.
    fn request(&self, tracker: &OffsetTracker) {
        let mut to = self.lock();
        let back = tracker.rewind();
        let pending = to.get_or_insert_with(BTreeMap::new);
        for c in back {
            pending.insert((c.topic, c.partition), c.offset);
        }
        tracing::warn!(partitions = ?pending, "transaction aborted: consuming again from the committed offsets");
        drop(to);
        self.notify.notify_one();
    }

    /// Revoked partitions are not sought back (their next owner starts from the committed offset).
    pub fn forget(&self, parts: &[TopicPartition]) {
        if let Some(to) = self.lock().as_mut() {
            for p in parts {
                to.remove(p);
            }
        }
    }
}

/// Why a transaction could not be committed.
#[derive(Debug, thiserror::Error)]
enum Failure {
    #[error(transparent)]
    Kafka(#[from] KafkaError),
    #[error("the consumer has no group metadata (not in the group)")]
    NoGroup,
}

/// The transactional producer's state, shared by the router and the committer.
pub struct Transactions {
    /// The transactional producer (the router's).
    producer: FutureProducer,
    /// `transactional.id`, for messages.
    id: String,
    /// Shared by enqueues, taken whole by a commit.
    gate: RwLock<()>,
    /// Outputs enqueued in the open transaction.
    produced: AtomicUsize,
    /// When the open transaction began.
    began: Mutex<Instant>,
    /// Where a rewind is requested after an abort.
    pub rewind: Arc<Rewind>,
    /// `triagem_transactions_total`, `triagem_transaction_duration_seconds`.
    metrics: Arc<Metrics>,
    /// Told about a fatal transaction error (fenced).
    fatal: Arc<Fatal>,
    /// Bound on each transactional call (`shutdown.timeout`).
    timeout: Duration,
}

/// The reason a fatal producer error stops the worker, in words.
pub fn fatal_reason(id: &str, code: RDKafkaErrorCode, reason: &str) -> String {
    use RDKafkaErrorCode as C;
    match code {
        C::Fenced | C::ProducerFenced | C::InvalidProducerEpoch => format!(
            "fenced: a newer worker with transactional.id {id:?} started (kafka.transactional_id must be unique per \
             replica), so this one may no longer write ({code:?}: {reason}); its open transaction is aborted"
        ),
        _ => format!("fatal transaction error on transactional.id {id:?}: {code:?}: {reason}"),
    }
}

impl Transactions {
    /// Registers `transactional.id` with the coordinator (fencing any older
    /// producer with the same id, whose open transaction is aborted) and
    /// opens the first transaction. Blocks: run it off the async threads.
    pub fn start(
        producer: FutureProducer,
        id: String,
        metrics: Arc<Metrics>,
        fatal: Arc<Fatal>,
        timeout: Duration,
    ) -> Result<Self, KafkaError> {
        producer.init_transactions(timeout)?;
        producer.begin_transaction()?;
        tracing::info!(transactional_id = %id, "exactly-once: transactions initialised");
        metrics.transactions.with_label_values(&["committed"]);
        metrics.transactions.with_label_values(&["aborted"]);
        Ok(Transactions {
            producer,
            id,
            gate: RwLock::new(()),
            produced: AtomicUsize::new(0),
            began: Mutex::new(Instant::now()),
            rewind: Arc::new(Rewind::default()),
            metrics,
            fatal,
            timeout,
        })
    }

    /// A shared hold on the open transaction, or None while a commit runs
    /// (retry shortly). Enqueue and acknowledge the output's offset under it,
    /// then call [`Transactions::produced`].
    pub fn try_enter(&self) -> Option<RwLockReadGuard<'_, ()>> {
        match self.gate.try_read() {
            Ok(g) => Some(g),
            Err(std::sync::TryLockError::Poisoned(e)) => Some(e.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) => None,
        }
    }

    /// One more output is in the open transaction.
    pub fn produced(&self) {
        self.produced.fetch_add(1, Ordering::SeqCst);
    }

    /// Whether the open transaction holds outputs.
    pub fn has_outputs(&self) -> bool {
        self.produced.load(Ordering::SeqCst) > 0
    }

    /// Commits the open transaction with the committable offsets, and opens
    /// the next one; on an abortable failure aborts it and rewinds every
    /// partition. Blocks: run it off the async threads. Returns whether the
    /// transaction committed (true when there was nothing to commit).
    pub fn commit<C: ConsumerContext, K: Consumer<C>>(&self, consumer: &K, tracker: &OffsetTracker) -> bool {
        let _whole = self.gate.write().unwrap_or_else(|e| e.into_inner());
        if self.producer.client().fatal_error().is_some() {
            // Fenced (or another fatal error): nothing can be committed any more.
            return false;
        }
        let offsets = tracker.committable(None);
        let outputs = self.produced.load(Ordering::SeqCst);
        if offsets.is_empty() && outputs == 0 {
            return true;
        }
        let _span = tracing::debug_span!("transaction", outputs, partitions = offsets.len()).entered();
        let result = self.try_commit(consumer, &offsets);
        let began = *self.began.lock().unwrap_or_else(|e| e.into_inner());
        let committed = match result {
            Ok(()) => {
                tracker.mark_committed(&offsets);
                self.metrics.transactions.with_label_values(&["committed"]).inc();
                tracing::debug!(
                    outputs, offsets = ?offsets.iter().map(|c| (c.partition, c.offset)).collect::<Vec<_>>(),
                    "transaction committed"
                );
                true
            }
            Err(e) => {
                if self.is_fatal(&e) {
                    return false;
                }
                tracing::warn!(error = %e, outputs, "transaction commit failed: aborting it");
                if !self.abort() {
                    return false;
                }
                self.metrics.transactions.with_label_values(&["aborted"]).inc();
                tracing::warn!(outputs, "transaction aborted: its {outputs} outputs will be produced again");
                self.rewind.request(tracker);
                false
            }
        };
        self.metrics.transaction_seconds.observe(began.elapsed().as_secs_f64());
        self.produced.store(0, Ordering::SeqCst);
        if let Err(e) = self.producer.begin_transaction() {
            self.is_fatal(&Failure::Kafka(e.clone()));
            self.fatal.set(format!("cannot begin a transaction on transactional.id {:?}: {e}", self.id));
            return false;
        }
        *self.began.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
        committed
    }

    /// Offsets into the transaction, then its commit (retried while librdkafka calls the error retriable).
    fn try_commit<C: ConsumerContext, K: Consumer<C>>(
        &self,
        consumer: &K,
        offsets: &[CommitOffset],
    ) -> Result<(), Failure> {
        let deadline = Instant::now() + self.timeout;
        if !offsets.is_empty() {
            let group = consumer.group_metadata().ok_or(Failure::NoGroup)?;
            retry(deadline, || {
                self.producer.send_offsets_to_transaction(&offsets_list(offsets), &group, self.timeout)
            })?;
        }
        retry(deadline, || self.producer.commit_transaction(self.timeout))?;
        Ok(())
    }

    /// Aborts the open transaction; false when even that failed (fatal).
    fn abort(&self) -> bool {
        let deadline = Instant::now() + self.timeout;
        match retry(deadline, || self.producer.abort_transaction(self.timeout)) {
            Ok(()) => true,
            Err(e) => {
                if !self.is_fatal(&Failure::Kafka(e.clone())) {
                    self.fatal.set(format!("cannot abort the transaction of transactional.id {:?}: {e}", self.id));
                }
                false
            }
        }
    }

    /// Whether `e` (or the producer's state) is fatal; if so the worker is told to stop, with the reason.
    fn is_fatal(&self, e: &Failure) -> bool {
        if let Some((code, reason)) = self.producer.client().fatal_error() {
            self.fatal.set(fatal_reason(&self.id, code, &reason));
            return true;
        }
        match e {
            Failure::Kafka(KafkaError::Transaction(t)) if t.is_fatal() => {
                self.fatal.set(fatal_reason(&self.id, t.code(), &t.to_string()));
                true
            }
            _ => false,
        }
    }
}

/// Calls `f` until it succeeds, fails with an error librdkafka does not call
/// retriable, or `deadline` passes.
fn retry(deadline: Instant, mut f: impl FnMut() -> Result<(), KafkaError>) -> Result<(), KafkaError> {
    loop {
        match f() {
            Err(KafkaError::Transaction(e)) if e.is_retriable() && Instant::now() < deadline => {
                tracing::debug!(error = %e, "transactional call failed; retrying");
                std::thread::sleep(Duration::from_millis(100));
            }
            r => return r,
        }
    }
}

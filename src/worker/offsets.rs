//! Per-partition offset tracking for at-least-once delivery.
//!
//! Every consumed offset is [`track`](OffsetTracker::track)ed; when its output
//! (routed message or dead letter) is acknowledged by the broker it is
//! [`ack`](OffsetTracker::ack)ed. A partition's committable offset is one past
//! the highest offset whose every consumed predecessor is acknowledged, so a
//! commit never covers a message whose output could still be lost. Acks may
//! arrive in any order (batches finish out of order, dead letters overtake
//! classified messages); offsets need not be contiguous integers (compaction,
//! transaction markers).
//!
//! The tracker is shared by the consume stage, the delivery tasks, the commit
//! loop and the rebalance callback (which blocks on
//! [`wait_drained`](OffsetTracker::wait_drained)), hence the mutex and condvar.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// A topic partition.
pub type TopicPartition = (String, i32);

/// An offset to commit: the next offset to read in `topic`/`partition`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitOffset {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
}

#[derive(Debug, Default)]
struct PartitionState {
    /// Consumed offsets not yet known committable, ascending, with their ack flag and when they were consumed.
    pending: VecDeque<(i64, bool, Instant)>,
    /// Next offset to read once everything before it is acknowledged.
    committable: Option<i64>,
    /// What was last committed successfully.
    committed: Option<i64>,
    /// Which assignment of the partition this is (new after every revoke and rewind).
    generation: u64,
    /// The first offset tracked in this generation: where a rewind goes when nothing was committed since.
    base: Option<i64>,
}

impl PartitionState {
    fn advance(&mut self) {
        while let Some(&(offset, true, _)) = self.pending.front() {
            self.pending.pop_front();
            self.committable = Some(offset + 1);
        }
    }
}

/// Tracks consumed and acknowledged offsets of every assigned partition.
#[derive(Debug, Default)]
pub struct OffsetTracker {
    /// Per-partition state.
    state: Mutex<BTreeMap<TopicPartition, PartitionState>>,
    /// Signalled on every ack and removal, for [`OffsetTracker::wait_drained`].
    changed: Condvar,
    /// When an offset was last acknowledged, or tracked while nothing was pending.
    progress: Mutex<Option<Instant>>,
    /// The last generation handed out.
    generations: std::sync::atomic::AtomicU64,
}

impl OffsetTracker {
    /// An empty tracker.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<TopicPartition, PartitionState>> {
        // A panic while holding the lock leaves consistent data (every update is one step).
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records a consumed offset, not yet acknowledged. Returns the
    /// partition's generation: it changes when the partition is revoked, so
    /// that work taken before a revoke can tell it is no longer this worker's.
    pub fn track(&self, topic: &str, partition: i32, offset: i64) -> u64 {
        let mut state = self.lock();
        if state.values().all(|p| p.pending.is_empty()) {
            self.progressed();
        }
        let p = state.entry((topic.to_string(), partition)).or_insert_with(|| PartitionState {
            generation: self.generations.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1,
            ..Default::default()
        });
        let generation = p.generation;
        p.base.get_or_insert(offset);
        match p.pending.back() {
            Some(&(last, _, _)) if offset <= last => {
                // Redelivery after a seek: keep the deque sorted and unique.
                if let Err(at) = p.pending.binary_search_by_key(&offset, |&(o, _, _)| o) {
                    p.pending.insert(at, (offset, false, Instant::now()));
                }
            }
            _ => p.pending.push_back((offset, false, Instant::now())),
        }
        generation
    }

    /// Whether work on `partition` taken in `generation` is still this
    /// worker's (the partition was not revoked since).
    pub fn is_current(&self, topic: &str, partition: i32, generation: u64) -> bool {
        self.lock().get(&(topic.to_string(), partition)).is_some_and(|p| p.generation == generation)
    }

    /// Marks an offset's output acknowledged. Returns false when the offset is
    /// not tracked (its partition was revoked meanwhile).
    pub fn ack(&self, topic: &str, partition: i32, offset: i64) -> bool {
        let mut state = self.lock();
        let Some(p) = state.get_mut(&(topic.to_string(), partition)) else {
            return false;
        };
        let Ok(at) = p.pending.binary_search_by_key(&offset, |&(o, _, _)| o) else {
            return false;
        };
        p.pending[at].1 = true;
        p.advance();
        drop(state);
        self.progressed();
        self.changed.notify_all();
        true
    }

    /// Offsets that advanced since the last successful commit (all partitions,
    /// or only `only` when given).
    pub fn committable(&self, only: Option<&[TopicPartition]>) -> Vec<CommitOffset> {
        let state = self.lock();
        state
            .iter()
            .filter(|(tp, _)| only.is_none_or(|o| o.contains(tp)))
            .filter_map(|((topic, partition), p)| match (p.committable, p.committed) {
                (Some(c), Some(done)) if c <= done => None,
                (Some(c), _) => Some(CommitOffset { topic: topic.clone(), partition: *partition, offset: c }),
                (None, _) => None,
            })
            .collect()
    }

    /// Records a successful commit.
    pub fn mark_committed(&self, offsets: &[CommitOffset]) {
        let mut state = self.lock();
        for c in offsets {
            if let Some(p) = state.get_mut(&(c.topic.clone(), c.partition)) {
                p.committed = Some(p.committed.map_or(c.offset, |d| d.max(c.offset)));
            }
        }
    }

    /// Consumed messages not yet committable (all partitions, or only `only`).
    pub fn pending(&self, only: Option<&[TopicPartition]>) -> usize {
        let state = self.lock();
        state.iter().filter(|(tp, _)| only.is_none_or(|o| o.contains(tp))).map(|(_, p)| p.pending.len()).sum()
    }

    /// Blocks until nothing is pending (in `only`, when given) or `timeout`
    /// passes. Returns whether it drained.
    pub fn wait_drained(&self, only: Option<&[TopicPartition]>, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let count = |s: &BTreeMap<TopicPartition, PartitionState>| -> usize {
            s.iter().filter(|(tp, _)| only.is_none_or(|o| o.contains(tp))).map(|(_, p)| p.pending.len()).sum()
        };
        let mut state = self.lock();
        loop {
            if count(&state) == 0 {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            state = self.changed.wait_timeout(state, deadline - now).unwrap_or_else(|e| e.into_inner()).0;
        }
    }

    /// Forgets partitions (revoked); later acks for them are ignored.
    pub fn remove(&self, partitions: &[TopicPartition]) {
        let mut state = self.lock();
        for tp in partitions {
            state.remove(tp);
        }
        drop(state);
        self.changed.notify_all();
    }

    /// After an aborted transaction (exactly-once): every partition's work
    /// since its last commit is void. Returns, per partition, where to consume
    /// again (the last committed offset, or the first offset tracked since the
    /// assignment), and starts a new generation of each, so that work taken
    /// before is abandoned; the committed offsets are kept.
    pub fn rewind(&self) -> Vec<CommitOffset> {
        let mut state = self.lock();
        let mut to = Vec::new();
        for ((topic, partition), p) in state.iter_mut() {
            if let Some(offset) = p.committed.or(p.base) {
                to.push(CommitOffset { topic: topic.clone(), partition: *partition, offset });
            }
            *p = PartitionState {
                committed: p.committed,
                generation: self.generations.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1,
                ..Default::default()
            };
        }
        drop(state);
        self.changed.notify_all();
        to
    }

    /// Per tracked partition, how long its oldest unacknowledged message has
    /// been in flight (zero when none is).
    pub fn oldest_unacked(&self) -> Vec<(TopicPartition, Duration)> {
        self.lock()
            .iter()
            .map(|(tp, p)| (tp.clone(), p.pending.front().map_or(Duration::ZERO, |&(_, _, since)| since.elapsed())))
            .collect()
    }

    fn progressed(&self) {
        *self.progress.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
    }

    /// How long messages have been in flight without any acknowledgement
    /// (None when nothing is in flight).
    pub fn stalled_for(&self) -> Option<Duration> {
        if self.pending(None) == 0 {
            return None;
        }
        let since = *self.progress.lock().unwrap_or_else(|e| e.into_inner());
        Some(since.map_or(Duration::ZERO, |t| t.elapsed()))
    }

    /// Partitions currently tracked.
    pub fn partitions(&self) -> Vec<TopicPartition> {
        self.lock().keys().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offsets(t: &OffsetTracker) -> Vec<(i32, i64)> {
        t.committable(None).into_iter().map(|c| (c.partition, c.offset)).collect()
    }

    #[test]
    fn nothing_committable_until_the_first_is_acked() {
        let t = OffsetTracker::new();
        for o in 10..15 {
            t.track("in", 0, o);
        }
        assert!(offsets(&t).is_empty());
        assert!(t.ack("in", 0, 11));
        assert!(t.ack("in", 0, 12));
        assert!(offsets(&t).is_empty(), "10 is not acked: nothing may be committed");
        assert!(t.ack("in", 0, 10));
        assert_eq!(offsets(&t), vec![(0, 13)]);
        assert_eq!(t.pending(None), 2);
    }

    #[test]
    fn out_of_order_acks_commit_only_the_contiguous_prefix() {
        let t = OffsetTracker::new();
        for o in 0..6 {
            t.track("in", 0, o);
        }
        for o in [5, 3, 1, 0] {
            t.ack("in", 0, o);
        }
        assert_eq!(offsets(&t), vec![(0, 2)]);
        t.ack("in", 0, 2);
        assert_eq!(offsets(&t), vec![(0, 4)]);
        t.ack("in", 0, 4);
        assert_eq!(offsets(&t), vec![(0, 6)]);
        assert_eq!(t.pending(None), 0);
    }

    #[test]
    fn gaps_in_offsets_are_fine() {
        let t = OffsetTracker::new();
        for o in [3, 7, 8, 20] {
            t.track("in", 1, o);
        }
        t.ack("in", 1, 7);
        t.ack("in", 1, 3);
        assert_eq!(offsets(&t), vec![(1, 8)]);
        t.ack("in", 1, 20);
        t.ack("in", 1, 8);
        assert_eq!(offsets(&t), vec![(1, 21)]);
    }

    #[test]
    fn partitions_are_independent() {
        let t = OffsetTracker::new();
        t.track("in", 0, 0);
        t.track("in", 1, 0);
        t.track("in", 1, 1);
        t.ack("in", 1, 0);
        t.ack("in", 1, 1);
        assert_eq!(offsets(&t), vec![(1, 2)]);
        assert_eq!(t.pending(Some(&[("in".into(), 0)])), 1);
        assert_eq!(t.pending(Some(&[("in".into(), 1)])), 0);
    }

    #[test]
    fn committed_offsets_are_not_offered_again() {
        let t = OffsetTracker::new();
        t.track("in", 0, 0);
        t.ack("in", 0, 0);
        let c = t.committable(None);
        t.mark_committed(&c);
        assert!(t.committable(None).is_empty());
        t.track("in", 0, 1);
        t.ack("in", 0, 1);
        assert_eq!(offsets(&t), vec![(0, 2)]);
    }

    #[test]
    fn unknown_and_revoked_acks_are_ignored() {
        let t = OffsetTracker::new();
        assert!(!t.ack("in", 0, 0));
        t.track("in", 0, 5);
        assert!(!t.ack("in", 0, 4));
        t.remove(&[("in".into(), 0)]);
        assert!(!t.ack("in", 0, 5));
        assert!(t.committable(None).is_empty());
    }

    #[test]
    fn redelivered_offsets_stay_sorted() {
        let t = OffsetTracker::new();
        t.track("in", 0, 5);
        t.track("in", 0, 3);
        t.track("in", 0, 5);
        assert_eq!(t.pending(None), 2);
        t.ack("in", 0, 3);
        assert_eq!(offsets(&t), vec![(0, 4)]);
    }

    #[test]
    fn oldest_unacked_is_the_front_of_each_partition() {
        let t = OffsetTracker::new();
        t.track("in", 0, 0);
        std::thread::sleep(Duration::from_millis(30));
        t.track("in", 0, 1);
        t.track("in", 1, 0);
        t.ack("in", 1, 0);
        let ages: BTreeMap<i32, Duration> = t.oldest_unacked().into_iter().map(|((_, p), d)| (p, d)).collect();
        assert!(ages[&0] >= Duration::from_millis(30));
        assert_eq!(ages[&1], Duration::ZERO);
        t.ack("in", 0, 0);
        let ages: BTreeMap<i32, Duration> = t.oldest_unacked().into_iter().map(|((_, p), d)| (p, d)).collect();
        assert!(ages[&0] < Duration::from_millis(30));
    }

    #[test]
    fn a_revoke_starts_a_new_generation() {
        let t = OffsetTracker::new();
        let g = t.track("in", 0, 5);
        assert!(t.is_current("in", 0, g));
        t.remove(&[("in".into(), 0)]);
        assert!(!t.is_current("in", 0, g));
        let g2 = t.track("in", 0, 5);
        assert_ne!(g, g2);
        assert!(!t.is_current("in", 0, g) && t.is_current("in", 0, g2));
    }

    #[test]
    fn a_rewind_goes_back_to_the_committed_offset_in_a_new_generation() {
        let t = OffsetTracker::new();
        for o in 10..20 {
            t.track("in", 0, o);
            t.ack("in", 0, o);
        }
        t.mark_committed(&t.committable(None));
        let g = t.track("in", 0, 20);
        t.ack("in", 0, 20);
        t.track("in", 1, 7);
        let to: Vec<(i32, i64)> = t.rewind().into_iter().map(|c| (c.partition, c.offset)).collect();
        assert_eq!(to, vec![(0, 20), (1, 7)], "partition 1 had no commit: back to its first offset");
        assert!(!t.is_current("in", 0, g));
        assert_eq!(t.pending(None), 0);
        assert!(t.committable(None).is_empty(), "the rewound acknowledgement is forgotten");
        let g2 = t.track("in", 0, 20);
        assert!(t.is_current("in", 0, g2) && g2 != g);
        t.ack("in", 0, 20);
        assert_eq!(offsets(&t), vec![(0, 21)]);
    }

    #[test]
    fn stalled_for_counts_from_the_last_ack() {
        let t = OffsetTracker::new();
        assert_eq!(t.stalled_for(), None);
        t.track("in", 0, 0);
        t.track("in", 0, 1);
        std::thread::sleep(Duration::from_millis(30));
        assert!(t.stalled_for().unwrap() >= Duration::from_millis(30));
        t.ack("in", 0, 0);
        assert!(t.stalled_for().unwrap() < Duration::from_millis(30));
        t.ack("in", 0, 1);
        assert_eq!(t.stalled_for(), None);
    }

    #[test]
    fn wait_drained_wakes_on_ack() {
        let t = std::sync::Arc::new(OffsetTracker::new());
        t.track("in", 0, 0);
        assert!(!t.wait_drained(None, Duration::from_millis(10)));
        let t2 = t.clone();
        let h = std::thread::spawn(move || t2.wait_drained(Some(&[("in".into(), 0)]), Duration::from_secs(10)));
        std::thread::sleep(Duration::from_millis(20));
        t.ack("in", 0, 0);
        assert!(h.join().unwrap());
    }
}

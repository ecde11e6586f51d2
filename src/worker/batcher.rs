//! Micro-batching, length-aware. The batcher owns the open window of
//! messages alone. A window closes, once nothing more is waiting in its
//! input, as soon as the model is idle (every batch sent to it computed: it
//! would otherwise sit waiting while messages wait for it) or the window
//! holds a full batch's worth (`max_messages` messages or `max_tokens`
//! tokens); at the latest `max_wait` after its first message, and at
//! [`WINDOW_BATCHES`] × `max_messages`. So `max_wait` bounds the wait while
//! the model is busy; batches grow with the load (as in text-embeddings-
//! inference's or Triton's dynamic batching without a queue delay), and a
//! lone message on an idle worker is not held back. [`plan`] then sorts the window by
//! token count and cuts it into batches of at most `max_messages` messages
//! and `max_tokens` padded tokens (messages × longest, as the model pads): a
//! batch holds messages of similar lengths, so little of it is padding, and a
//! larger batch is never slower per message than a smaller one for padding's
//! sake. Messages leave in length order, not arrival order; the last batch of
//! a window says so ([`Batch::closes_window`]), and the inference thread hands
//! the router a whole window at once, which the router puts back in input
//! order (per partition) before producing: a window holds every message
//! consumed between the previous window and the next, so outputs keep their
//! input order across batches too.
//!
//! The channel it sends closed batches into has capacity 1: one batch waits
//! (prepared) while the inference thread computes the previous one, and when
//! both are taken the batcher blocks, its input channel fills, and the
//! consume stage stops fetching. That chain is the backpressure.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;

use crate::metrics::{Metrics, QUEUE_BATCHER, QUEUE_INFERENCE};

/// A window holds at most this many batches' worth of messages (`max_messages` each) before it is cut.
pub const WINDOW_BATCHES: usize = 4;

/// When a batch closes.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Most messages in a batch.
    pub max_messages: usize,
    /// Most padded tokens (messages × longest) in a batch; a single longer message still forms a batch.
    pub max_tokens: usize,
    /// Longest a window stays open after its first message.
    pub max_wait: Duration,
}

/// A closed batch.
#[derive(Debug)]
pub struct Batch<T> {
    /// The messages, shortest first.
    pub items: Vec<T>,
    /// Token count of the longest message.
    pub longest: usize,
    /// The last batch cut from its window: the window's results can go to the router.
    pub closes_window: bool,
}

impl<T> Batch<T> {
    /// Tokens the model processes once the batch is padded to its longest member.
    pub fn padded_tokens(&self) -> usize {
        self.items.len() * self.longest
    }
}

/// Whether the model is idle: the batcher counts each batch it sends, the
/// inference thread each batch it has computed. Clones share the count.
#[derive(Debug, Clone, Default)]
pub struct ModelIdle(Arc<IdleState>);

#[derive(Debug, Default)]
struct IdleState {
    outstanding: AtomicUsize,
    became_idle: Notify,
}

impl ModelIdle {
    /// A batch is on its way to the model.
    pub fn sent(&self) {
        self.0.outstanding.fetch_add(1, Ordering::AcqRel);
    }

    /// The model has computed a batch.
    pub fn computed(&self) {
        if self.0.outstanding.fetch_sub(1, Ordering::AcqRel) == 1 {
            // A permit is kept when nobody waits yet, so a batcher that saw
            // the model busy just before this cannot miss it.
            self.0.became_idle.notify_one();
        }
    }

    /// Every batch sent has been computed.
    pub fn is_idle(&self) -> bool {
        self.0.outstanding.load(Ordering::Acquire) == 0
    }

    /// Returns when the model may have become idle (check [`Self::is_idle`] again).
    async fn wait(&self) {
        self.0.became_idle.notified().await
    }
}

/// Cuts a window of `(item, tokens)` into batches: sorted by token count
/// (stable: equal lengths keep their order), then filled in that order until
/// the next item would exceed `max_messages` or `max_tokens` padded tokens.
pub fn plan<T>(mut window: Vec<(T, usize)>, limits: &Limits) -> Vec<Batch<T>> {
    window.sort_by_key(|(_, n)| *n);
    let mut batches: Vec<Batch<T>> = Vec::new();
    for (item, n) in window {
        match batches.last_mut() {
            Some(b) if b.items.len() < limits.max_messages && (b.items.len() + 1) * n <= limits.max_tokens => {
                b.items.push(item);
                b.longest = n;
            }
            _ => batches.push(Batch { items: vec![item], longest: n, closes_window: false }),
        }
    }
    if let Some(last) = batches.last_mut() {
        last.closes_window = true;
    }
    batches
}

/// Runs until `rx` is closed and drained; the last open window is flushed.
/// `tokens` prepares the items that have arrived since its last call, all at
/// once (the worker tokenises their texts, once, for the model too, on the
/// model's threads) and returns each one's token count, in order. `idle` is
/// shared with the inference thread, which calls [`ModelIdle::computed`]
/// after each batch. Stops early if `tx` is closed (the inference thread is
/// gone).
pub async fn run<T>(
    mut rx: mpsc::Receiver<T>,
    tx: mpsc::Sender<Batch<T>>,
    limits: Limits,
    idle: ModelIdle,
    tokens: impl Fn(&mut [T]) -> Vec<usize>,
    metrics: Option<Arc<Metrics>>,
) {
    let max_window = limits.max_messages.max(1) * WINDOW_BATCHES;
    let mut closed = false;
    while !closed {
        let Some(first) = rx.recv().await else { return };
        let deadline = Instant::now() + limits.max_wait;
        let mut arrived = vec![first];
        let mut total = 0;
        let mut window: Vec<(T, usize)> = Vec::new();
        loop {
            // What is already waiting joins the window first, prepared in one call.
            while window.len() + arrived.len() < max_window {
                match rx.try_recv() {
                    Ok(item) => arrived.push(item),
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => {
                        closed = true;
                        break;
                    }
                }
            }
            if !arrived.is_empty() {
                let counts = tokens(&mut arrived);
                total += counts.iter().sum::<usize>();
                window.extend(arrived.drain(..).zip(counts));
            }
            let full = window.len() >= limits.max_messages || total >= limits.max_tokens;
            if closed || window.len() >= max_window || full || idle.is_idle() {
                break;
            }
            tokio::select! {
                biased;
                item = rx.recv() => match item {
                    Some(item) => arrived.push(item),
                    None => {
                        closed = true;
                        break;
                    }
                },
                _ = idle.wait() => continue,
                _ = tokio::time::sleep_until(deadline) => break,
            }
        }
        for batch in plan(window, &limits) {
            if let Some(m) = &metrics {
                let n = batch.items.len() as i64;
                m.queue(QUEUE_BATCHER).sub(n);
                m.queue(QUEUE_INFERENCE).add(n);
            }
            idle.sent();
            if tx.send(batch).await.is_err() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max_messages: usize, max_tokens: usize, wait_ms: u64) -> Limits {
        Limits { max_messages, max_tokens, max_wait: Duration::from_millis(wait_ms) }
    }

    /// Spawns a batcher over strings whose token count is their length,
    /// with a model that never finishes computing (windows close on size or
    /// `max_wait` alone).
    fn spawn(l: Limits) -> (mpsc::Sender<String>, mpsc::Receiver<Batch<String>>) {
        let idle = ModelIdle::default();
        idle.sent();
        let (tx, rx, _) = spawn_with(l, idle);
        (tx, rx)
    }

    fn spawn_with(l: Limits, idle: ModelIdle) -> (mpsc::Sender<String>, mpsc::Receiver<Batch<String>>, ModelIdle) {
        let (in_tx, in_rx) = mpsc::channel(100);
        let (out_tx, out_rx) = mpsc::channel(1);
        let tokens = |s: &mut [String]| {
            // Nothing arrived, nothing to prepare: a call for none would hand the model's threads empty work.
            assert!(!s.is_empty(), "tokens called with nothing arrived");
            s.iter().map(String::len).collect()
        };
        tokio::spawn(run(in_rx, out_tx, l, idle.clone(), tokens, None));
        (in_tx, out_rx, idle)
    }

    fn texts(b: &Batch<String>) -> Vec<&str> {
        b.items.iter().map(String::as_str).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn closes_at_max_messages_without_waiting() {
        let (tx, mut rx) = spawn(limits(3, 1000, 60_000));
        let start = Instant::now();
        for s in ["a", "b", "c"] {
            tx.send(s.into()).await.unwrap();
        }
        let b = rx.recv().await.unwrap();
        assert_eq!(texts(&b), ["a", "b", "c"]);
        assert_eq!(start.elapsed(), Duration::ZERO, "a full batch must not wait for max_wait");
        // A later message waits for its own max_wait.
        tx.send("d".into()).await.unwrap();
        let b = rx.recv().await.unwrap();
        assert_eq!(texts(&b), ["d"]);
        assert_eq!(start.elapsed(), Duration::from_secs(60));
    }

    #[tokio::test(start_paused = true)]
    async fn what_is_already_waiting_joins_the_window_and_is_cut_into_batches() {
        let (tx, mut rx) = spawn(limits(3, 1000, 60_000));
        let start = Instant::now();
        for s in ["a", "b", "c", "d"] {
            tx.send(s.into()).await.unwrap();
        }
        assert_eq!(texts(&rx.recv().await.unwrap()), ["a", "b", "c"]);
        assert_eq!(texts(&rx.recv().await.unwrap()), ["d"]);
        assert_eq!(start.elapsed(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn what_arrived_together_is_prepared_in_one_call() {
        let calls = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = calls.clone();
        let idle = ModelIdle::default();
        idle.sent(); // busy: the window stays open until max_wait
        let (in_tx, in_rx) = mpsc::channel(100);
        let (out_tx, mut out_rx) = mpsc::channel(1);
        let tokens = move |items: &mut [String]| {
            seen.lock().unwrap().push(items.iter().map(String::as_str).collect::<Vec<_>>().join(""));
            items.iter().map(String::len).collect()
        };
        tokio::spawn(run(in_rx, out_tx, limits(10, 1000, 50), idle, tokens, None));
        for s in ["a", "b", "c"] {
            in_tx.send(s.into()).await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        for s in ["d", "e"] {
            in_tx.send(s.into()).await.unwrap();
        }
        let b = out_rx.recv().await.unwrap();
        assert_eq!(texts(&b), ["a", "b", "c", "d", "e"]);
        assert_eq!(*calls.lock().unwrap(), ["abc", "de"], "one call for each group that arrived together");
    }

    #[tokio::test(start_paused = true)]
    async fn a_window_is_sorted_by_length_before_it_is_cut() {
        let (tx, mut rx) = spawn(limits(2, 1000, 50));
        for s in ["aaaa", "b", "ccc", "dd"] {
            tx.send(s.into()).await.unwrap();
        }
        let b = rx.recv().await.unwrap();
        assert_eq!((texts(&b), b.longest), (vec!["b", "dd"], 2));
        let b = rx.recv().await.unwrap();
        assert_eq!((texts(&b), b.longest), (vec!["ccc", "aaaa"], 4));
    }

    #[tokio::test(start_paused = true)]
    async fn closes_at_max_wait_after_the_first_message() {
        let (tx, mut rx) = spawn(limits(10, 1000, 50));
        tokio::time::sleep(Duration::from_secs(5)).await; // idle time does not count
        let start = Instant::now();
        tx.send("a".into()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(30)).await;
        tx.send("b".into()).await.unwrap();
        let b = rx.recv().await.unwrap();
        assert_eq!(texts(&b), ["a", "b"]);
        assert_eq!(start.elapsed(), Duration::from_millis(50));
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_model_gets_what_is_waiting_at_once() {
        let (tx, mut rx, idle) = spawn_with(limits(10, 1000, 60_000), ModelIdle::default());
        let start = Instant::now();
        tx.send("a".into()).await.unwrap();
        let b = rx.recv().await.unwrap();
        assert_eq!(texts(&b), ["a"]);
        assert_eq!(start.elapsed(), Duration::ZERO, "an idle model must not wait for max_wait");
        assert!(!idle.is_idle(), "the batch sent is outstanding until the model has computed it");
        // While that batch computes, the next window fills…
        tx.send("b".into()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(30)).await;
        tx.send("c".into()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(10)).await;
        // …and goes as soon as the model is done with it.
        idle.computed();
        let b = rx.recv().await.unwrap();
        assert_eq!(texts(&b), ["b", "c"]);
        assert_eq!(start.elapsed(), Duration::from_millis(40));
    }

    #[tokio::test(start_paused = true)]
    async fn a_busy_model_still_gets_a_window_at_max_wait() {
        let (tx, mut rx, idle) = spawn_with(limits(10, 1000, 50), ModelIdle::default());
        idle.sent(); // computing something
        let start = Instant::now();
        tx.send("a".into()).await.unwrap();
        let b = rx.recv().await.unwrap();
        assert_eq!(texts(&b), ["a"]);
        assert_eq!(start.elapsed(), Duration::from_millis(50));
        // Once the model has computed both batches, the next message goes at once.
        idle.computed();
        idle.computed();
        tokio::time::sleep(Duration::from_millis(5)).await;
        let start = Instant::now();
        tx.send("b".into()).await.unwrap();
        assert_eq!(texts(&rx.recv().await.unwrap()), ["b"]);
        assert_eq!(start.elapsed(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn no_batch_exceeds_max_tokens() {
        let (tx, mut rx) = spawn(limits(10, 10, 1000));
        for s in ["aaa", "bbb", "ccc", "ddddd", "e"] {
            tx.send(s.into()).await.unwrap();
        }
        let start = Instant::now();
        let b = rx.recv().await.unwrap();
        // Sorted: e, aaa, bbb, ccc, ddddd. 3 × 3 = 9 fits; adding "ccc" would make 4 × 3 = 12 > 10.
        assert_eq!(texts(&b), ["e", "aaa", "bbb"]);
        assert_eq!(b.padded_tokens(), 9);
        assert_eq!(start.elapsed(), Duration::ZERO, "a window holding max_tokens must not wait");
        let b = rx.recv().await.unwrap();
        // 2 × 5 = 10 fits.
        assert_eq!(texts(&b), ["ccc", "ddddd"]);
        assert_eq!(b.longest, 5);
    }

    #[tokio::test(start_paused = true)]
    async fn an_oversized_message_forms_its_own_batch() {
        let (tx, mut rx) = spawn(limits(10, 4, 1000));
        tx.send("0123456789".into()).await.unwrap();
        tx.send("a".into()).await.unwrap();
        assert_eq!(texts(&rx.recv().await.unwrap()), ["a"]);
        assert_eq!(texts(&rx.recv().await.unwrap()), ["0123456789"]);
    }

    #[tokio::test(start_paused = true)]
    async fn flushes_the_open_batch_when_input_closes() {
        let (tx, mut rx) = spawn(limits(10, 1000, 60_000));
        tx.send("a".into()).await.unwrap();
        drop(tx);
        let start = Instant::now();
        assert_eq!(texts(&rx.recv().await.unwrap()), ["a"]);
        assert_eq!(start.elapsed(), Duration::ZERO);
        assert!(rx.recv().await.is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn one_batch_is_prepared_while_another_is_taken() {
        let (tx, mut rx) = spawn(limits(1, 1000, 10));
        let sent = ["a", "b", "c", "d", "e", "f", "g", "h", "i", "j"];
        for s in sent {
            tx.send(s.into()).await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        // Nobody has read yet: one batch sits in the channel, the batcher holds
        // the rest of its window waiting to send, the others wait in its input.
        assert_eq!(tx.capacity(), 100 - (sent.len() - WINDOW_BATCHES));
        for s in sent {
            assert_eq!(texts(&rx.recv().await.unwrap()), [s]);
        }
    }

    #[test]
    fn plan_never_pads_more_than_arrival_order() {
        let l = limits(4, 64, 0);
        let lens = [3usize, 17, 4, 9, 2, 16, 5, 5, 12, 1, 8, 3];
        let window: Vec<(usize, usize)> = lens.iter().map(|&n| (n, n)).collect();
        let batches = plan(window, &l);
        assert_eq!(batches.iter().map(|b| b.items.len()).sum::<usize>(), lens.len());
        for b in &batches {
            assert!(b.items.len() <= 4 && b.padded_tokens() <= 64, "{b:?}");
            assert!(b.items.windows(2).all(|w| w[0] <= w[1]), "not sorted: {b:?}");
        }
        let sorted: usize = batches.iter().map(Batch::padded_tokens).sum();
        let arrival: usize = lens.chunks(4).map(|c| c.len() * c.iter().max().unwrap()).sum();
        assert!(sorted < arrival, "{sorted} padded tokens sorted vs {arrival} in arrival order");
        let closing: Vec<bool> = batches.iter().map(|b| b.closes_window).collect();
        assert_eq!(closing.iter().filter(|c| **c).count(), 1, "{closing:?}");
        assert_eq!(closing.last(), Some(&true), "only the window's last batch closes it: {closing:?}");
    }
}

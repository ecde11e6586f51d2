//! Micro-batching. The batcher owns the open batch alone and closes it at
//! `max_messages`, when the next message would push it over `max_tokens`
//! padded tokens (messages × longest, as the model pads), or `max_wait`
//! after its first message, whichever comes first.
//!
//! The channel it sends closed batches into has capacity 1: one batch waits
//! (prepared) while the inference thread computes the previous one, and when
//! both are taken the batcher blocks, its input channel fills, and the
//! consume stage stops fetching. That chain is the backpressure.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::metrics::{Metrics, QUEUE_BATCHER, QUEUE_INFERENCE};

/// When a batch closes.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Most messages in a batch.
    pub max_messages: usize,
    /// Most padded tokens (messages × longest) in a batch; a single longer message still forms a batch.
    pub max_tokens: usize,
    /// Longest a batch stays open after its first message.
    pub max_wait: Duration,
}

/// A closed batch.
#[derive(Debug)]
pub struct Batch<T> {
    /// The messages, in arrival order.
    pub items: Vec<T>,
    /// Token count of the longest message.
    pub longest: usize,
}

impl<T> Batch<T> {
    /// Tokens the model processes once the batch is padded to its longest member.
    pub fn padded_tokens(&self) -> usize {
        self.items.len() * self.longest
    }
}

/// Runs until `rx` is closed and drained; the last open batch is flushed.
/// Stops early if `tx` is closed (the inference thread is gone).
pub async fn run<T>(
    mut rx: mpsc::Receiver<T>,
    tx: mpsc::Sender<Batch<T>>,
    limits: Limits,
    tokens: impl Fn(&T) -> usize,
    metrics: Option<Arc<Metrics>>,
) {
    let mut carry: Option<(T, usize)> = None;
    loop {
        let (first, n) = match carry.take() {
            Some(c) => c,
            None => match rx.recv().await {
                Some(item) => {
                    let n = tokens(&item);
                    (item, n)
                }
                None => return,
            },
        };
        let deadline = Instant::now() + limits.max_wait;
        let mut batch = Batch { items: vec![first], longest: n };
        while batch.items.len() < limits.max_messages {
            tokio::select! {
                biased;
                item = rx.recv() => match item {
                    Some(item) => {
                        let n = tokens(&item);
                        let longest = batch.longest.max(n);
                        if (batch.items.len() + 1) * longest > limits.max_tokens {
                            carry = Some((item, n));
                            break;
                        }
                        batch.items.push(item);
                        batch.longest = longest;
                    }
                    None => break,
                },
                _ = tokio::time::sleep_until(deadline) => break,
            }
        }
        if let Some(m) = &metrics {
            let n = batch.items.len() as i64;
            m.queue(QUEUE_BATCHER).sub(n);
            m.queue(QUEUE_INFERENCE).add(n);
        }
        if tx.send(batch).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max_messages: usize, max_tokens: usize, wait_ms: u64) -> Limits {
        Limits { max_messages, max_tokens, max_wait: Duration::from_millis(wait_ms) }
    }

    /// Spawns a batcher over strings whose token count is their length.
    fn spawn(l: Limits) -> (mpsc::Sender<String>, mpsc::Receiver<Batch<String>>) {
        let (in_tx, in_rx) = mpsc::channel(100);
        let (out_tx, out_rx) = mpsc::channel(1);
        tokio::spawn(run(in_rx, out_tx, l, |s: &String| s.len(), None));
        (in_tx, out_rx)
    }

    fn texts(b: &Batch<String>) -> Vec<&str> {
        b.items.iter().map(String::as_str).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn closes_at_max_messages_without_waiting() {
        let (tx, mut rx) = spawn(limits(3, 1000, 60_000));
        let start = Instant::now();
        for s in ["a", "b", "c", "d"] {
            tx.send(s.into()).await.unwrap();
        }
        let b = rx.recv().await.unwrap();
        assert_eq!(texts(&b), ["a", "b", "c"]);
        assert_eq!(start.elapsed(), Duration::ZERO, "a full batch must not wait for max_wait");
        // The fourth waits for its own max_wait.
        let b = rx.recv().await.unwrap();
        assert_eq!(texts(&b), ["d"]);
        assert_eq!(start.elapsed(), Duration::from_secs(60));
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
    async fn closes_before_exceeding_max_tokens() {
        let (tx, mut rx) = spawn(limits(10, 10, 1000));
        for s in ["aaa", "bbb", "ccc", "ddddd", "e"] {
            tx.send(s.into()).await.unwrap();
        }
        let start = Instant::now();
        let b = rx.recv().await.unwrap();
        // 3 × 3 = 9 fits; adding "ddddd" would make 4 × 5 = 20 > 10.
        assert_eq!(texts(&b), ["aaa", "bbb", "ccc"]);
        assert_eq!(b.padded_tokens(), 9);
        assert_eq!(start.elapsed(), Duration::ZERO);
        let b = rx.recv().await.unwrap();
        // 2 × 5 = 10 fits.
        assert_eq!(texts(&b), ["ddddd", "e"]);
        assert_eq!(b.longest, 5);
    }

    #[tokio::test(start_paused = true)]
    async fn an_oversized_message_forms_its_own_batch() {
        let (tx, mut rx) = spawn(limits(10, 4, 1000));
        tx.send("0123456789".into()).await.unwrap();
        tx.send("a".into()).await.unwrap();
        assert_eq!(texts(&rx.recv().await.unwrap()), ["0123456789"]);
        assert_eq!(texts(&rx.recv().await.unwrap()), ["a"]);
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
        for s in ["a", "b", "c", "d"] {
            tx.send(s.into()).await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        // Nobody has read yet: one batch sits in the channel, one is held by the
        // batcher waiting to send, the rest wait in its input.
        assert_eq!(tx.capacity(), 100 - 2);
        for s in ["a", "b", "c", "d"] {
            assert_eq!(texts(&rx.recv().await.unwrap()), [s]);
        }
    }
}

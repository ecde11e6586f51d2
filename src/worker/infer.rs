//! The inference thread: one `std::thread` owns the model and runs every
//! forward pass, so the model never runs on a tokio worker. Async code stops
//! at the bounded channel in front of it (capacity 1: one batch prepared while
//! this one computes).
//!
//! The pipeline talks to the model through the small [`Predict`] trait: the
//! batcher tokenises each text once with [`Predict::tokenizer`] (for
//! `batch.max_tokens`), and [`Predict::predict`] gets the texts with their
//! token ids. A failure of a whole batch is a `Clone` error fanned out to
//! each of its messages (they go to the dead-letter topic).

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use tokio::sync::mpsc;

use super::batcher::{Batch, ModelIdle};
use super::message::Pending;
use crate::metrics::{ClassifiedSeries, Metrics, QUEUE_INFERENCE};
use crate::model::{Classifier, ModelInfo, Prediction};

/// A text's token ids as the model will see them (truncated, special tokens
/// included); empty when it cannot be tokenised (its batch then fails).
pub type Tokenize = Arc<dyn Fn(&str) -> Vec<u32> + Send + Sync>;

/// What the worker needs from a model.
pub trait Predict: Send + 'static {
    /// Name, version and labels, for outputs and metrics.
    fn info(&self) -> ModelInfo;
    /// The tokenizer, usable from other threads (the batcher's).
    fn tokenizer(&self) -> Tokenize;
    /// One prediction per text, in order, given each text and its token ids from [`Predict::tokenizer`].
    fn predict(&self, texts: &[&str], ids: &[&[u32]]) -> Result<Vec<Prediction>, String>;
}

impl Predict for Classifier {
    fn info(&self) -> ModelInfo {
        Classifier::info(self).clone()
    }

    fn tokenizer(&self) -> Tokenize {
        let encoder = self.encoder().clone();
        Arc::new(move |text: &str| encoder.tokenize(text).unwrap_or_default())
    }

    fn predict(&self, _texts: &[&str], ids: &[&[u32]]) -> Result<Vec<Prediction>, String> {
        Classifier::predict_ids(self, ids).map_err(|e| e.to_string())
    }
}

/// A batch that failed as a whole; cloned into each of its messages.
#[derive(Debug, Clone, thiserror::Error)]
pub enum InferError {
    #[error("{0}")]
    Model(String),
    #[error("the model panicked: {0}")]
    Panic(String),
    #[error("the model returned {got} predictions for {expected} texts")]
    Count { expected: usize, got: usize },
}

/// A message with its prediction, or the error of its batch.
pub struct Classified {
    /// The message.
    pub pending: Pending,
    /// Its prediction.
    pub result: Result<Prediction, InferError>,
}

/// Starts the inference thread. It runs until `rx` is closed and drained or
/// `sink` returns false (the router is gone). `sink` gets the results of a
/// whole window of the batcher at once (the batches up to one that
/// [`Batch::closes_window`]), so that the router can restore input order
/// across the window's length-sorted batches. Each computed batch is counted
/// in `idle`, which the batcher reads.
pub fn spawn<P: Predict>(
    model: P,
    mut rx: mpsc::Receiver<Batch<Pending>>,
    idle: ModelIdle,
    metrics: Arc<Metrics>,
    mut sink: impl FnMut(Vec<Classified>) -> bool + Send + 'static,
) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new().name("triagem-inference".into()).spawn(move || {
        let mut window: Vec<Classified> = Vec::new();
        let mut series = ClassifiedSeries::default();
        while let Some(mut batch) = rx.blocking_recv() {
            let closes_window = batch.closes_window;
            let n = batch.items.len();
            metrics.queue(QUEUE_INFERENCE).sub(n as i64);
            metrics.batch_size.observe(n as f64);
            metrics.batch_tokens.observe(batch.padded_tokens() as f64);
            let texts: Vec<&str> = batch.items.iter().map(|p| p.decoded.text.as_str()).collect();
            let ids: Vec<&[u32]> = batch.items.iter().map(|p| p.ids.as_slice()).collect();
            // One span per batch: a slow batch can be followed in the logs
            // (`RUST_LOG=triagem=debug` prints its close with the forward time).
            let span = tracing::debug_span!(
                "batch",
                size = n,
                tokens = batch.padded_tokens(),
                forward_ms = tracing::field::Empty
            );
            let _entered = span.enter();
            let start = Instant::now();
            let result = match catch_unwind(AssertUnwindSafe(|| model.predict(&texts, &ids))) {
                Ok(Ok(p)) if p.len() == n => Ok(p),
                Ok(Ok(p)) => Err(InferError::Count { expected: n, got: p.len() }),
                Ok(Err(e)) => Err(InferError::Model(e)),
                Err(panic) => Err(InferError::Panic(panic_message(&panic))),
            };
            let forward = start.elapsed();
            drop((texts, ids));
            for p in &mut batch.items {
                p.envelope.forwarded = Some(start);
            }
            idle.computed();
            metrics.inference_seconds.observe(forward.as_secs_f64());
            span.record("forward_ms", forward.as_secs_f64() * 1000.0);
            tracing::debug!("batch classified");
            let classified: Vec<Classified> = match result {
                Ok(predictions) => batch
                    .items
                    .into_iter()
                    .zip(predictions)
                    .map(|(pending, p)| {
                        series.observe(&metrics, &p.label, p.score);
                        Classified { pending, result: Ok(p) }
                    })
                    .collect(),
                Err(e) => {
                    tracing::error!(error = %e, messages = n, "inference failed; the batch goes to the dead-letter topic");
                    batch.items.into_iter().map(|pending| Classified { pending, result: Err(e.clone()) }).collect()
                }
            };
            window.extend(classified);
            if closes_window && !sink(std::mem::take(&mut window)) {
                return;
            }
        }
        if !window.is_empty() {
            sink(window);
        }
    })
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

//! triagem: routes customer chat messages from Kafka to sales (`venda`) or
//! support (`suporte`) with a fine-tuned BERT classifier.
//!
//! # Layout
//!
//! Three floors; each module only uses the ones below it.
//!
//! - **Commands** — `main.rs` parses the command line ([`cli`]) and calls one of
//!   the features.
//! - **Features**
//!   - [`train`]: fine-tunes a BERT (or trains a small one from scratch) on a
//!     JSONL data set and writes a Hugging Face model directory.
//!   - [`eval`]: accuracy, per-label precision/recall/F1 and the confusion matrix.
//!   - [`worker`]: the service. Its stages, in the order a message meets them:
//!     consume → decode → batch → infer (one blocking thread) → route/produce →
//!     commit offsets.
//!   - [`demo`]: the worker against an in-process broker, for a first look.
//!   - [`bench`](mod@bench): the model path's speed as the worker runs it, beside the
//!     peers' and the end-to-end figures, the FLOP ceiling and peak memory.
//!   - [`kafka`]: the librdkafka settings every client starts from, shared
//!     by the worker and loadgen.
//!   - [`loadgen`]: the end-to-end benchmark: sends at a rate, reads every
//!     output back, reports missing/duplicate messages, throughput and latency.
//! - **Foundations**, which know nothing of Kafka or the command line:
//!   [`model`] (BERT, tokenizer, batched prediction), [`data`] (JSONL data
//!   sets), [`config`] (the worker's settings) and [`metrics`].
//!
//! Beside them, `src/bin/triagem-test-broker.rs` is test tooling, not part of
//! the service: librdkafka's mock cluster served by its own process, the
//! broker of the integration tests (`tests/broker_conformance.rs` checks it
//! first).

pub mod bench;
pub mod cli;
pub mod config;
pub mod data;
pub mod demo;
pub mod eval;
pub mod kafka;
pub mod loadgen;
pub mod metrics;
pub mod model;
pub mod train;
pub mod worker;

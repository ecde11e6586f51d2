//! `triagem bench`: how fast the model path is, as the worker runs it, with
//! the figures that put it in context, in one table and one JSON object.
//!
//! Measured here, in this process, over the same texts (a JSONL file's
//! `prompt`s, cycled to `messages`), tokenisation included, through
//! [`Classifier::predict`] on the model's thread pool:
//! - fixed batches of 1, 8 and 32 texts in file order (what the peers do);
//! - the worker's batching: windows as the batcher forms them from a backlog
//!   (token counting included), cut by [`batcher::plan`] into length-sorted
//!   batches under `batch.max_messages` / `batch.max_tokens`.
//!
//! Read from files that `scripts/bench.sh` writes in the same run: the peers
//! (PyTorch eager and ONNX Runtime on the same directory and texts,
//! `peer_throughput.py`'s JSON line) and the worker end to end through a broker
//! (`triagem loadgen --json`). Computed: FLOPs per message from `config.json`
//! and the texts' token counts, the ceiling they allow at the measured matrix
//! product speed of this CPU with the model's threads, and the share of it
//! reached. Peak resident memory is the process's high-water mark.

use std::path::PathBuf;
use std::time::Instant;

use candle_core::{Device, Tensor};
use serde::Serialize;
use serde_json::{json, Value};

use crate::model::{self, threads, BertConfig, Classifier, ModelError};
use crate::worker::batcher::{self, Limits, WINDOW_BATCHES};

/// Texts timed at batch 1 at most (as the peers' script does).
const BATCH1_MESSAGES: usize = 512;

/// What to measure.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Model directory.
    pub model: PathBuf,
    /// Where the model runs.
    pub device: model::ComputeDevice,
    /// JSONL file whose `prompt`s are the texts.
    pub data: PathBuf,
    /// Texts per row (cycled from the file).
    pub messages: usize,
    /// Fixed batch sizes.
    pub batch_sizes: Vec<usize>,
    /// The worker's batch limits (its `[batch]` settings).
    pub limits: Limits,
    /// `peer_throughput.py`'s JSON line, when the peers were run.
    pub peers: Option<PathBuf>,
    /// `triagem loadgen --json` reports of the worker through a broker (as fast as possible, at a rate…).
    pub end_to_end: Vec<PathBuf>,
    /// The CPU's fp32 peak in GFLOP/s; measured with a matrix product on the model's threads when absent.
    pub peak_gflops: Option<f64>,
}

/// Why the benchmark could not run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Data(#[from] crate::data::DataError),
    #[error("{path}: {reason}")]
    Input { path: PathBuf, reason: String },
    #[error("matrix product for the FLOP ceiling: {0}")]
    Peak(#[from] candle_core::Error),
}

/// One measured or imported row.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// `triagem`, `pytorch`, `onnxruntime`, `worker end to end`.
    pub runtime: String,
    /// `1`, `8`, `32`, or `worker` (the batcher's length-aware batching).
    pub batching: String,
    /// Messages per second.
    pub messages_per_second: f64,
    /// Mean tokens computed per message (triagem rows): padded ones after the tensor path's grouping
    /// by length; on the CPU serving path, which does not pad, the message's own.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub padded_tokens_per_message: Option<f64>,
}

/// The whole result, printed as a table and as JSON.
#[derive(Debug, Serialize)]
pub struct BenchReport {
    pub model: PathBuf,
    pub model_version: String,
    pub parameters: usize,
    pub device: String,
    pub threads: usize,
    pub messages: usize,
    /// Mean tokens per text, special tokens included, no padding.
    pub mean_tokens: f64,
    pub model_load_ms: f64,
    pub rows: Vec<Row>,
    /// Forward FLOPs per message at the mean length (matrix products and attention; 2 per multiply-add):
    /// the whole model, as the peers compute it. The ceiling is counted from these.
    pub mflop_per_message: f64,
    /// Those that triagem's path computes: fewer on the CPU serving path (the last layer for `[CLS]` only).
    pub mflop_computed_per_message: f64,
    pub peak_gflops: f64,
    /// `"measured"` (matrix product on the model's threads) or `"given"`.
    pub peak_source: String,
    /// `peak_gflops / mflop_per_message`: messages per second if every FLOP ran at the peak.
    pub ceiling_messages_per_second: f64,
    /// Best triagem row / ceiling.
    pub share_of_ceiling: f64,
    /// triagem / ONNX Runtime at the same batching (`b1`, `b8`, `b32`, `best`), when the peers ran.
    pub ratio_to_onnxruntime: serde_json::Map<String, Value>,
    /// The end-to-end runs' counts, rates and latency, as loadgen reported them.
    pub end_to_end: Vec<Value>,
    pub peak_rss_bytes: u64,
}

/// Runs the measurements.
pub fn run(opts: &BenchOptions) -> Result<BenchReport, BenchError> {
    let load_start = Instant::now();
    let classifier = Classifier::load(&opts.model, &opts.device.open()?)?;
    let model_load_ms = load_start.elapsed().as_secs_f64() * 1000.0;
    let cfg = model::read_config(&opts.model)?;
    let data = crate::data::Dataset::load(&opts.data, None)?;
    let texts: Vec<&str> = data.examples.iter().map(|e| e.text.as_str()).cycle().take(opts.messages).collect();
    let encoder = classifier.encoder();
    let lengths: Vec<usize> = texts.iter().map(|t| encoder.count_tokens(t)).collect();
    let mean_tokens = lengths.iter().sum::<usize>() as f64 / lengths.len().max(1) as f64;

    let mut rows = Vec::new();
    for &size in &opts.batch_sizes {
        let n = if size == 1 { texts.len().min(BATCH1_MESSAGES) } else { texts.len() };
        let chunks: Vec<&[&str]> = texts[..n].chunks(size.max(1)).collect();
        let padded: usize = lengths[..n].chunks(size.max(1)).map(|l| padded_tokens(&classifier, l)).sum();
        classifier.predict(chunks[0])?; // warm-up
        let start = Instant::now();
        for chunk in &chunks {
            classifier.predict(chunk)?;
        }
        rows.push(row("triagem", size.to_string(), n, start, Some(padded as f64 / n as f64)));
    }
    // The worker's batching from a backlog: windows of WINDOW_BATCHES × max_messages in arrival order,
    // each text tokenised once (as the batcher does it, for the batch limits and the model) inside the timing.
    let window = opts.limits.max_messages.max(1) * WINDOW_BATCHES;
    let mut padded = 0;
    let start = Instant::now();
    for chunk in texts.chunks(window) {
        let mut tokenized = Vec::with_capacity(chunk.len());
        for t in chunk {
            let ids = encoder.tokenize(t)?;
            let n = ids.len();
            tokenized.push((ids, n));
        }
        for batch in batcher::plan(tokenized, &opts.limits) {
            padded += padded_tokens(&classifier, &batch.items.iter().map(Vec::len).collect::<Vec<_>>());
            let ids: Vec<&[u32]> = batch.items.iter().map(Vec::as_slice).collect();
            classifier.predict_ids(&ids)?;
        }
    }
    rows.push(row("triagem", "worker".into(), texts.len(), start, Some(padded as f64 / texts.len() as f64)));

    let peers = opts.peers.as_ref().map(read_json).transpose()?;
    let mut ratio_to_onnxruntime = serde_json::Map::new();
    if let Some(p) = &peers {
        for (key, name) in [("torch", "pytorch"), ("onnxrt", "onnxruntime")] {
            for &size in &opts.batch_sizes {
                if let Some(v) = p.get(format!("{key}_b{size}")).and_then(Value::as_f64) {
                    rows.push(Row {
                        runtime: name.into(),
                        batching: size.to_string(),
                        messages_per_second: v,
                        padded_tokens_per_message: None,
                    });
                }
            }
        }
        let ours =
            |b: &str| rows.iter().find(|r| r.runtime == "triagem" && r.batching == b).map(|r| r.messages_per_second);
        let best_ours =
            rows.iter().filter(|r| r.runtime == "triagem").map(|r| r.messages_per_second).fold(0.0, f64::max);
        let mut best_ort: f64 = 0.0;
        for &size in &opts.batch_sizes {
            if let (Some(a), Some(b)) =
                (ours(&size.to_string()), p.get(format!("onnxrt_b{size}")).and_then(Value::as_f64))
            {
                ratio_to_onnxruntime.insert(format!("b{size}"), json!(a / b));
                best_ort = best_ort.max(b);
            }
        }
        if best_ort > 0.0 {
            ratio_to_onnxruntime.insert("best".into(), json!(best_ours / best_ort));
        }
    }
    let mut end_to_end = Vec::new();
    for path in &opts.end_to_end {
        let mut report = read_json(path)?;
        if let Some(obj) = report.as_object_mut() {
            // The per-message lists are not benchmark figures.
            obj.retain(|k, _| !matches!(k.as_str(), "missing_ids" | "run_id"));
        }
        let get = |k: &str| report.get(k).and_then(Value::as_f64).unwrap_or(f64::NAN);
        let (throughput, rate) = (get("throughput"), get("send_rate"));
        rows.push(Row {
            runtime: "worker end to end".into(),
            batching: format!("sent {rate:.0}/s"),
            messages_per_second: throughput,
            padded_tokens_per_message: None,
        });
        end_to_end.push(report);
    }

    let mflop_per_message = flops_per_message(&cfg, classifier.labels().len(), mean_tokens) / 1e6;
    let mflop_computed_per_message = if classifier.serves_on_cpu_path() {
        cpu_path_flops_per_message(&cfg, classifier.labels().len(), mean_tokens) / 1e6
    } else {
        mflop_per_message
    };
    let (peak_gflops, peak_source) = match opts.peak_gflops {
        Some(g) => (g, "given"),
        None => (measure_peak_gflops()?, "measured"),
    };
    let ceiling = peak_gflops * 1e3 / mflop_per_message;
    let best = rows.iter().filter(|r| r.runtime == "triagem").map(|r| r.messages_per_second).fold(0.0, f64::max);
    let info = classifier.info();
    Ok(BenchReport {
        model: opts.model.clone(),
        model_version: info.version.clone(),
        parameters: parameters(&cfg, classifier.labels().len()),
        device: opts.device.to_string(),
        threads: threads::count(),
        messages: texts.len(),
        mean_tokens,
        model_load_ms,
        rows,
        mflop_per_message,
        mflop_computed_per_message,
        peak_gflops,
        peak_source: peak_source.into(),
        ceiling_messages_per_second: ceiling,
        share_of_ceiling: best / ceiling,
        ratio_to_onnxruntime,
        end_to_end,
        peak_rss_bytes: peak_rss_bytes(),
    })
}

/// Tokens a batch of texts of `lengths` costs: on the tensor path once `predict` has grouped it by
/// length and padded each group; on the CPU serving path their sum.
fn padded_tokens(classifier: &Classifier, lengths: &[usize]) -> usize {
    if classifier.serves_on_cpu_path() {
        return lengths.iter().sum();
    }
    model::group_by_length(lengths).iter().map(|g| g.len() * g.iter().map(|&i| lengths[i]).max().unwrap_or(0)).sum()
}

fn row(runtime: &str, batching: String, n: usize, start: Instant, padded: Option<f64>) -> Row {
    Row {
        runtime: runtime.into(),
        batching,
        messages_per_second: n as f64 / start.elapsed().as_secs_f64(),
        padded_tokens_per_message: padded,
    }
}

fn read_json(path: &PathBuf) -> Result<Value, BenchError> {
    let bad = |reason: String| BenchError::Input { path: path.clone(), reason };
    let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
    // The last non-empty line: peer_throughput.py prints its rows first.
    let line = text.lines().rev().find(|l| !l.trim().is_empty()).ok_or_else(|| bad("empty".into()))?;
    serde_json::from_str(line).map_err(|e| bad(format!("not a JSON object: {e}")))
}

/// Forward FLOPs of one message of `tokens` tokens: per layer and token the
/// Q, K, V and output projections (4·h² multiply-adds) and the feed-forward
/// (2·h·i), plus attention scores and their weighted sum (2·tokens·h); then the
/// pooler and the head on `[CLS]`. Two FLOPs per multiply-add; layer norms,
/// softmax and GELU (a few FLOPs per element) are left out.
pub fn flops_per_message(cfg: &BertConfig, labels: usize, tokens: f64) -> f64 {
    let (h, i, l) = (cfg.hidden_size as f64, cfg.intermediate_size as f64, cfg.num_hidden_layers as f64);
    let per_token = l * 2.0 * (4.0 * h * h + 2.0 * h * i + 2.0 * tokens * h);
    tokens * per_token + 2.0 * (h * h + h * labels as f64)
}

/// [`flops_per_message`] as the CPU serving path computes them: every layer
/// but the last in full; in the last, the key and value projections for every
/// token, then the query, attention, output projection and feed-forward for
/// `[CLS]` alone — the model's count less those four for the other tokens.
pub fn cpu_path_flops_per_message(cfg: &BertConfig, labels: usize, tokens: f64) -> f64 {
    let (h, i) = (cfg.hidden_size as f64, cfg.intermediate_size as f64);
    let skipped = if cfg.num_hidden_layers == 0 {
        0.0
    } else {
        (tokens - 1.0) * 2.0 * (2.0 * h * h + 2.0 * h * i + 2.0 * tokens * h)
    };
    flops_per_message(cfg, labels, tokens) - skipped
}

/// Weights of a `BertForSequenceClassification` with this config.
pub fn parameters(cfg: &BertConfig, labels: usize) -> usize {
    let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
    let embeddings = (cfg.vocab_size + cfg.max_position_embeddings + cfg.type_vocab_size) * h + 2 * h;
    let layer = 4 * (h * h + h) + 2 * h + (h * i + i) + (i * h + h) + 2 * h;
    embeddings + cfg.num_hidden_layers * layer + (h * h + h) + (h * labels + labels)
}

/// fp32 GFLOP/s of a 512×512 by 512×512 matrix product on the model's threads (best of 20).
fn measure_peak_gflops() -> Result<f64, candle_core::Error> {
    threads::install(|| {
        let n = 512;
        let a = Tensor::randn(0f32, 1.0, (n, n), &Device::Cpu)?;
        let b = Tensor::randn(0f32, 1.0, (n, n), &Device::Cpu)?;
        a.matmul(&b)?;
        let mut best = f64::MAX;
        for _ in 0..20 {
            let start = Instant::now();
            a.matmul(&b)?;
            best = best.min(start.elapsed().as_secs_f64());
        }
        Ok(2.0 * (n * n * n) as f64 / best / 1e9)
    })
}

/// The process's peak resident set (`VmHWM`), 0 where /proc is absent.
fn peak_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| l.split_whitespace().nth(1))?.parse().ok()
        })
        .map_or(0, |kb: u64| kb * 1024)
}

impl BenchReport {
    /// The table.
    pub fn render(&self) -> String {
        let mut s = format!(
            "model {} ({}, {:.2} M parameters), device {}, {} threads; {} messages, {:.1} tokens on average; \
             model load {:.0} ms\n\n",
            self.model.display(),
            self.model_version,
            self.parameters as f64 / 1e6,
            self.device,
            self.threads,
            self.messages,
            self.mean_tokens,
            self.model_load_ms
        );
        s.push_str(&format!("{:<20} {:>8} {:>12} {:>16}\n", "runtime", "batch", "msg/s", "padded tok/msg"));
        for r in &self.rows {
            let padded = r.padded_tokens_per_message.map_or(String::new(), |p| format!("{p:.1}"));
            s.push_str(&format!(
                "{:<20} {:>8} {:>12.0} {:>16}\n",
                r.runtime, r.batching, r.messages_per_second, padded
            ));
        }
        s.push_str(&format!(
            "\nFLOPs: {:.2} MFLOP/message (triagem's path computes {:.2} of them); peak {:.0} GFLOP/s ({}) → \
             ceiling {:.0} msg/s; best triagem row {:.1} % of it\n",
            self.mflop_per_message,
            self.mflop_computed_per_message,
            self.peak_gflops,
            self.peak_source,
            self.ceiling_messages_per_second,
            self.share_of_ceiling * 100.0
        ));
        if !self.ratio_to_onnxruntime.is_empty() {
            let parts: Vec<String> = self
                .ratio_to_onnxruntime
                .iter()
                .map(|(k, v)| format!("{k} {:.2}×", v.as_f64().unwrap_or(f64::NAN)))
                .collect();
            s.push_str(&format!("triagem / ONNX Runtime: {}\n", parts.join(", ")));
        }
        for e in &self.end_to_end {
            let get = |k: &str| e.get(k).and_then(Value::as_f64).unwrap_or(f64::NAN);
            let lat = |k: &str| e.get("latency").and_then(|l| l.get(k)).and_then(Value::as_f64).unwrap_or(f64::NAN);
            s.push_str(&format!(
                "worker end to end, {:.0} sent at {:.0}/s: {:.0} msg/s, latency p50 {:.0} / p99 {:.0} / max {:.0} ms, \
                 {} missing, {} duplicates\n",
                get("sent"),
                get("send_rate"),
                get("throughput"),
                lat("p50_ms"),
                lat("p99_ms"),
                lat("max_ms"),
                get("missing"),
                get("duplicates")
            ));
        }
        s.push_str(&format!("peak resident memory {:.1} MiB\n", self.peak_rss_bytes as f64 / 1048576.0));
        s
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    #[test]
    fn flops_and_parameters_of_the_fixture() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-model");
        let cfg = model::read_config(&dir).unwrap();
        let classifier = Classifier::load(&dir, &Device::Cpu).unwrap();
        let labels = classifier.labels().len();
        // The count from config.json is the count of the weights in model.safetensors.
        let weights = candle_core::safetensors::load(dir.join(model::WEIGHTS_FILE), &Device::Cpu).unwrap();
        let stored: usize = weights.values().map(|t| t.elem_count()).sum();
        assert_eq!(parameters(&cfg, labels), stored);
        // Twice the multiply-adds of the dense layers, per token, plus attention growing with length.
        let (h, i, l) = (cfg.hidden_size as f64, cfg.intermediate_size as f64, cfg.num_hidden_layers as f64);
        let dense = l * 2.0 * (4.0 * h * h + 2.0 * h * i);
        let one = flops_per_message(&cfg, labels, 1.0);
        let ten = flops_per_message(&cfg, labels, 10.0);
        assert!(one > dense && ten > 10.0 * dense && ten - 10.0 * dense > 10.0 * (one - dense), "{one} {ten}");
        // The CPU serving path: for a one-token message [CLS] is all there is; longer ones skip most of the last layer.
        assert!((cpu_path_flops_per_message(&cfg, labels, 1.0) - one).abs() < 1e-9 * one);
        let served = cpu_path_flops_per_message(&cfg, labels, 10.0);
        assert!(served < ten && served > ten / l, "{served} of {ten}");
    }
}

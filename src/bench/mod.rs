//! `triagem bench`: how fast the model path is, as the worker runs it, with
//! the figures that put it in context, in one table and one JSON object.
//!
//! Measured here, in this process, over the same texts (a JSONL file's
//! `prompt`s, cycled to `messages`), tokenisation included, through
//! [`Classifier::predict`] on the model's thread pool:
//! - fixed batches of 1, 8 and 32 texts in file order (what the peers do);
//! - the worker's batching: windows as the batcher forms them from a backlog
//!   (tokenised on the model's threads, as the worker does), cut by [`batcher::plan`] into length-sorted
//!   batches under `batch.max_messages` / `batch.max_tokens`.
//!
//! Read from files that `scripts/bench.sh` writes in the same run: the peers
//! (PyTorch eager and ONNX Runtime on the same directory and texts,
//! `peer_throughput.py`'s JSON line) and the worker end to end through a broker
//! (`triagem loadgen --json`), and the worker's own `/metrics` scraped before
//! and after its run at half load: the worker's latency (from its receipt of
//! a message to its output's acknowledgement) against the bound
//! `batch.max_wait` + 3 mean forward passes. Computed: FLOPs per message from `config.json`
//! and the texts' token counts, the ceiling they allow at the measured matrix
//! product speed of this CPU with the model's threads, and the share of it
//! reached. Peak resident memory is the process's high-water mark.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::model::{self, threads, BertConfig, Classifier, ModelError};
use crate::worker::batcher::{self, Limits, WINDOW_BATCHES};

mod scrape;
use scrape::is_backlog;
pub use scrape::{drain, worker_latency, Drain, StageLatency, WorkerLatency};

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
    /// How many times each row is timed (rows interleaved); a row reports the median.
    pub repeats: usize,
    /// The worker's batch limits (its `[batch]` settings).
    pub limits: Limits,
    /// `peer_throughput.py`'s JSON line, when the peers were run.
    pub peers: Option<PathBuf>,
    /// `triagem loadgen --json` reports of the worker through a broker (as fast as possible, at a rate…).
    pub end_to_end: Vec<PathBuf>,
    /// The CPU's fp32 peak in GFLOP/s; measured with a matrix product on the model's threads when absent.
    pub peak_gflops: Option<f64>,
    /// The worker's `/metrics` text before and after a run (empty, or two files).
    pub worker_metrics: Vec<PathBuf>,
    /// The worker's `batch.max_wait`, for the latency bound.
    pub max_wait: Duration,
    /// The worker's `/metrics` text before and after the backlog run (empty, or two files): how much of
    /// the drain its model spent computing.
    pub drain_metrics: Vec<PathBuf>,
    /// Who used the cores during the run at half load ([`CpuShares`] as JSON), when measured.
    pub cpu_shares: Option<PathBuf>,
    /// Who used the cores while the worker drained the backlog ([`CpuShares`] as JSON), when measured.
    pub drain_cpu_shares: Option<PathBuf>,
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
    /// Each timing's messages per second, in order, when the row was timed more than once
    /// (`messages_per_second` is their median).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub runs: Vec<f64>,
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
    /// The worker's own latency over the run between the two `/metrics` scrapes, when given.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub worker_latency: Option<WorkerLatency>,
    /// How busy the worker kept its model while it drained the backlog, when its `/metrics` were given.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub drain: Option<Drain>,
    /// Who used the cores during the run at half load, when given: the worker's latency tail depends
    /// on what the broker and the load generator leave it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_shares: Option<CpuShares>,
    /// Who used the cores while the worker drained the backlog, when given: the drain rate is its
    /// model's on what the broker, loadgen's reader and the worker's own Kafka path leave it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub drain_cpu_shares: Option<CpuShares>,
    pub peak_rss_bytes: u64,
}

/// Cores used during a run (the one at half load, or the backlog's drain),
/// from the processes' and the machine's CPU ticks before and after it
/// (`scripts/bench.sh`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CpuShares {
    /// The broker the worker ran against (`test`, `tansu`, …).
    pub broker: String,
    pub worker_cores: f64,
    pub broker_cores: f64,
    /// Everything else: the load generator and whatever else ran.
    pub other_cores: f64,
    /// The machine's cores.
    pub cores: u32,
    /// Busy time over all the cores' time, 0 to 1.
    pub machine_busy: f64,
    /// loadgen's producer's `linger.ms` in that run (how many produce
    /// requests the broker had to answer), when the file says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loadgen_linger_ms: Option<u64>,
    /// loadgen's reader's `fetch.wait.max.ms` in that run (how often it
    /// asked the broker for outputs), when the file says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loadgen_fetch_wait_ms: Option<u64>,
    /// The worker's cores by thread, the numbers dropped from the names (its model's threads
    /// `triagem-model-`, its runtime's `triagem-async`, librdkafka's `rdk:broker`, …), when the file says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker_threads: Option<std::collections::BTreeMap<String, f64>>,
    /// By the same groups, the cores' worth of time the worker's threads were runnable but waiting
    /// for a CPU (`/proc/…/schedstat`): what the rest of the machine kept from them, when the file says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker_threads_waiting: Option<std::collections::BTreeMap<String, f64>>,
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

    // Each row timed `repeats` times, the rows interleaved so that a slow minute of the machine
    // falls on all of them; a row reports the median.
    let fixed = |size: usize| -> Result<(f64, f64), BenchError> {
        let n = if size == 1 { texts.len().min(BATCH1_MESSAGES) } else { texts.len() };
        let chunks: Vec<&[&str]> = texts[..n].chunks(size.max(1)).collect();
        let padded: usize = lengths[..n].chunks(size.max(1)).map(|l| padded_tokens(&classifier, l)).sum();
        classifier.predict(chunks[0])?; // warm-up
        let start = Instant::now();
        for chunk in &chunks {
            classifier.predict(chunk)?;
        }
        Ok((n as f64 / start.elapsed().as_secs_f64(), padded as f64 / n as f64))
    };
    // The worker's batching from a backlog: windows of WINDOW_BATCHES × max_messages in arrival order,
    // each text tokenised once inside the timing, as the batcher does it: the window's texts shared out
    // among the model's threads (the worker's `tokenize_on_model_threads`), then the batches it plans.
    let worker = || -> Result<(f64, f64), BenchError> {
        use rayon::prelude::*;
        let window = opts.limits.max_messages.max(1) * WINDOW_BATCHES;
        let mut padded = 0;
        let start = Instant::now();
        for chunk in texts.chunks(window) {
            let tokenized = threads::install(|| {
                chunk
                    .par_iter()
                    .map(|t| {
                        let ids = encoder.tokenize(t)?;
                        let n = ids.len();
                        Ok((ids, n))
                    })
                    .collect::<Result<Vec<_>, ModelError>>()
            })?;
            for batch in batcher::plan(tokenized, &opts.limits) {
                padded += padded_tokens(&classifier, &batch.items.iter().map(Vec::len).collect::<Vec<_>>());
                let ids: Vec<&[u32]> = batch.items.iter().map(Vec::as_slice).collect();
                classifier.predict_ids(&ids)?;
            }
        }
        Ok((texts.len() as f64 / start.elapsed().as_secs_f64(), padded as f64 / texts.len() as f64))
    };
    let batchings: Vec<Option<usize>> = opts.batch_sizes.iter().map(|&s| Some(s)).chain([None]).collect();
    let mut timed: Vec<(Vec<f64>, f64)> = vec![(Vec::new(), 0.0); batchings.len()];
    for _ in 0..opts.repeats.max(1) {
        for (batching, (runs, padded)) in batchings.iter().zip(&mut timed) {
            let (rate, p) = match batching {
                Some(size) => fixed(*size)?,
                None => worker()?,
            };
            runs.push(rate);
            *padded = p;
        }
    }
    let mut rows: Vec<Row> = batchings
        .iter()
        .zip(timed)
        .map(|(batching, (runs, padded))| Row {
            runtime: "triagem".into(),
            batching: batching.map_or("worker".into(), |s| s.to_string()),
            messages_per_second: median(&runs),
            padded_tokens_per_message: Some(padded),
            runs: if runs.len() > 1 { runs } else { Vec::new() },
        })
        .collect();

    let peers = opts.peers.as_ref().map(read_json).transpose()?;
    let mut ratio_to_onnxruntime = serde_json::Map::new();
    if let Some(p) = &peers {
        for (key, name) in [("torch", "pytorch"), ("onnxrt", "onnxruntime")] {
            for &size in &opts.batch_sizes {
                if let Some(v) = p.get(format!("{key}_b{size}")).and_then(Value::as_f64) {
                    let runs = p.get(format!("{key}_b{size}_runs")).and_then(Value::as_array);
                    rows.push(Row {
                        runtime: name.into(),
                        batching: size.to_string(),
                        messages_per_second: v,
                        padded_tokens_per_message: None,
                        runs: runs.map_or(Vec::new(), |r| r.iter().filter_map(Value::as_f64).collect()),
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
        // A backlog run: sent before the worker read; its rate is the drain rate.
        let (batching, throughput) = if is_backlog(&report) {
            ("backlog".to_string(), get("drain_throughput"))
        } else {
            (format!("sent {:.0}/s", get("send_rate")), get("throughput"))
        };
        rows.push(Row {
            runtime: "worker end to end".into(),
            batching,
            messages_per_second: throughput,
            padded_tokens_per_message: None,
            runs: Vec::new(),
        });
        end_to_end.push(report);
    }

    let worker_latency = from_scrapes(&opts.worker_metrics, "--worker-metrics", "a run", |before, after| {
        worker_latency(before, after, opts.max_wait)
    })?;
    let drain = from_scrapes(&opts.drain_metrics, "--drain-metrics", "the backlog run", |before, after| {
        drain(before, after, &end_to_end)
    })?;

    let cpu_shares = opts.cpu_shares.as_ref().map(read_cpu_shares).transpose()?;
    let drain_cpu_shares = opts.drain_cpu_shares.as_ref().map(read_cpu_shares).transpose()?;

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
        worker_latency,
        drain,
        cpu_shares,
        drain_cpu_shares,
        peak_rss_bytes: peak_rss_bytes(),
    })
}

/// `compute` over two `/metrics` scrapes given as an option's two files, before and after `run`;
/// `None` without them. A file that cannot be read, or that `compute` refuses (the after file
/// named), is one error naming it, as is any other count of files.
fn from_scrapes<T>(
    paths: &[PathBuf],
    option: &str,
    run: &str,
    compute: impl FnOnce(&str, &str) -> Result<T, String>,
) -> Result<Option<T>, BenchError> {
    let input = |path: &PathBuf, reason: String| BenchError::Input { path: path.clone(), reason };
    match paths {
        [] => Ok(None),
        [before, after] => {
            let read = |p: &PathBuf| std::fs::read_to_string(p).map_err(|e| input(p, e.to_string()));
            compute(&read(before)?, &read(after)?).map(Some).map_err(|reason| input(after, reason))
        }
        more => Err(input(&more[0], format!("{option} takes two files (before and after {run}), not {}", more.len()))),
    }
}

/// Tokens a batch of texts of `lengths` costs: on the tensor path once `predict` has grouped it by
/// length and padded each group; on the CPU serving path their sum.
fn padded_tokens(classifier: &Classifier, lengths: &[usize]) -> usize {
    if classifier.serves_on_cpu_path() {
        return lengths.iter().sum();
    }
    classifier.groups(lengths).iter().map(|g| g.len() * g.iter().map(|&i| lengths[i]).max().unwrap_or(0)).sum()
}

impl CpuShares {
    /// "the worker used 0.90 cores, the tansu broker 0.42, the rest 0.12; the machine's 2 cores were 72 % busy".
    pub fn describe(&self) -> String {
        let by_thread = match &self.worker_threads {
            Some(groups) if !groups.is_empty() => {
                let mut groups: Vec<(&String, &f64)> = groups.iter().collect();
                groups.sort_by(|a, b| b.1.total_cmp(a.1).then(a.0.cmp(b.0)));
                let parts: Vec<String> = groups.iter().map(|(name, cores)| format!("{name} {cores:.2}")).collect();
                let waiting = match &self.worker_threads_waiting {
                    Some(waited) if !waited.is_empty() => {
                        let parts: Vec<String> = groups
                            .iter()
                            .filter_map(|(name, _)| waited.get(*name).map(|w| format!("{name} {w:.2}")))
                            .collect();
                        format!("; waiting for a CPU: {}", parts.join(", "))
                    }
                    _ => String::new(),
                };
                format!(" ({}{waiting})", parts.join(", "))
            }
            _ => String::new(),
        };
        format!(
            "the worker used {:.2} cores{by_thread}, the {} broker {:.2}, the rest {:.2}; the machine's {} cores were {:.0} % busy",
            self.worker_cores,
            self.broker,
            self.broker_cores,
            self.other_cores,
            self.cores,
            100.0 * self.machine_busy
        )
    }
}

/// The median of `xs` (the mean of the middle two for an even count); NaN when empty.
fn median(xs: &[f64]) -> f64 {
    let mut sorted = xs.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

/// A [`CpuShares`] JSON file (`scripts/bench.sh`'s `cpu-latency-run.json`).
fn read_cpu_shares(path: &PathBuf) -> Result<CpuShares, BenchError> {
    serde_json::from_value(read_json(path)?).map_err(|e| BenchError::Input {
        path: path.clone(),
        reason: format!("not the cores of a run (broker, worker_cores, broker_cores, …): {e}"),
    })
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
            let (low, high) = r.runs.iter().fold((f64::INFINITY, 0f64), |(l, h), &v| (l.min(v), h.max(v)));
            let spread = if r.runs.is_empty() {
                String::new()
            } else {
                format!("   median of {}: {low:.0}–{high:.0}", r.runs.len())
            };
            s.push_str(&format!(
                "{:<20} {:>8} {:>12.0} {:>16}{spread}\n",
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
        let worker_row = self.rows.iter().find(|r| r.runtime == "triagem" && r.batching == "worker");
        let of_worker_row = |rate: f64| {
            worker_row.map_or(String::new(), |r| {
                format!(" ({:.0} % of the model path at the worker's batching)", 100.0 * rate / r.messages_per_second)
            })
        };
        for e in &self.end_to_end {
            let get = |k: &str| e.get(k).and_then(Value::as_f64).unwrap_or(f64::NAN);
            // Records the broker returned to loadgen twice (tansu does): not the worker's duplicates.
            let rereads = match e.get("rereads").and_then(Value::as_u64) {
                Some(n) if n > 0 => format!(" ({n} records read twice)"),
                _ => String::new(),
            };
            let lat = |k: &str| e.get("latency").and_then(|l| l.get(k)).and_then(Value::as_f64).unwrap_or(f64::NAN);
            if is_backlog(e) {
                s.push_str(&format!(
                    "worker end to end, a backlog of {:.0} sent while it did not read: drained at {:.0} msg/s{}, \
                     first output to last; {} came out while sending, {} missing, {} duplicates{}\n",
                    get("sent"),
                    get("drain_throughput"),
                    of_worker_row(get("drain_throughput")),
                    get("received_while_sending"),
                    get("missing"),
                    get("duplicates"),
                    rereads
                ));
                if let Some(d) = &self.drain {
                    s.push_str(&format!(
                        "  its model computed for {:.2} s of the {:.2} s from the backlog's last send to its last output: \
                         busy {:.0} % (the rest: waiting for batches)\n",
                        d.forward_seconds,
                        d.span_seconds,
                        100.0 * d.model_busy
                    ));
                }
                if let Some(c) = &self.drain_cpu_shares {
                    s.push_str(&format!("  meanwhile {}\n", c.describe()));
                }
                continue;
            }
            s.push_str(&format!(
                "worker end to end, {:.0} sent at {:.0}/s: {:.0} msg/s{}, latency p50 {:.0} / p99 {:.0} / max {:.0} ms, \
                 {} missing, {} duplicates{}\n",
                get("sent"),
                get("send_rate"),
                get("throughput"),
                of_worker_row(get("throughput")),
                lat("p50_ms"),
                lat("p99_ms"),
                lat("max_ms"),
                get("missing"),
                get("duplicates"),
                rereads
            ));
        }
        if let Some(w) = &self.worker_latency {
            s.push_str(&format!(
                "worker's own latency (receipt → output acknowledged, its /metrics) over {:.0} messages: \
                 p50 {:.1} / p99 {:.1} ms; {:.0} batches of {:.1} on average, forward pass {:.2} ms; \
                 bound batch.max_wait + 3 forward passes = {:.0} + 3 × {:.2} = {:.1} ms: {}\n",
                w.messages,
                w.p50_ms,
                w.p99_ms,
                w.batches,
                w.mean_batch,
                w.mean_forward_ms,
                w.max_wait_ms,
                w.mean_forward_ms,
                w.bound_ms,
                if w.p99_ms <= w.bound_ms { "within" } else { "over" }
            ));
            if !w.stages.is_empty() {
                let stages: Vec<String> = w
                    .stages
                    .iter()
                    .map(|st| format!("{} {:.1} / {:.1} / {:.1}", st.stage, st.mean_ms, st.p50_ms, st.p99_ms))
                    .collect();
                s.push_str(&format!("  by stage (mean / p50 / p99 ms): {}\n", stages.join(", ")));
            }
        }
        if let Some(c) = &self.cpu_shares {
            s.push_str(&format!("during the run at half load: {}\n", c.describe()));
            if let Some(ms) = c.loadgen_linger_ms {
                s.push_str(&format!("  loadgen's producer lingered {ms} ms (linger.ms) in that run\n"));
            }
            if let Some(ms) = c.loadgen_fetch_wait_ms {
                s.push_str(&format!(
                    "  loadgen's reader waited up to {ms} ms a fetch (fetch.wait.max.ms) in that run\n"
                ));
            }
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
    fn a_row_timed_several_times_reports_the_median() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
        assert_eq!(median(&[7.0]), 7.0);
        assert!(median(&[]).is_nan());
    }

    #[test]
    fn cpu_shares_are_read_from_scripts_json_and_a_wrong_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("cpu.json");
        std::fs::write(
            &good,
            r#"{"broker": "tansu (sqlite)", "worker_cores": 0.9, "broker_cores": 0.75, "other_cores": 0.1, "cores": 2, "machine_busy": 0.875, "loadgen_linger_ms": 20, "loadgen_fetch_wait_ms": 100}"#,
        )
        .unwrap();
        let c = read_cpu_shares(&good).unwrap();
        assert_eq!((c.broker.as_str(), c.broker_cores, c.cores, c.machine_busy), ("tansu (sqlite)", 0.75, 2, 0.875));
        assert_eq!((c.loadgen_linger_ms, c.loadgen_fetch_wait_ms), (Some(20), Some(100)));
        assert_eq!(
            c.describe(),
            "the worker used 0.90 cores, the tansu (sqlite) broker 0.75, the rest 0.10; the machine's 2 cores were 88 % busy"
        );
        // The drain's file: no loadgen settings (its reader and producer keep their defaults there).
        let drain = dir.path().join("cpu-drain.json");
        std::fs::write(
            &drain,
            r#"{"broker": "test", "worker_cores": 1.65, "broker_cores": 0.05, "other_cores": 0.2, "cores": 2, "machine_busy": 0.95, "worker_threads": {"triagem-async": 0.1, "triagem-model-": 1.5, "rdk:broker": 0.05}}"#,
        )
        .unwrap();
        let d = read_cpu_shares(&drain).unwrap();
        assert_eq!((d.worker_cores, d.loadgen_linger_ms, d.loadgen_fetch_wait_ms), (1.65, None, None));
        assert_eq!(
            d.describe(),
            "the worker used 1.65 cores (triagem-model- 1.50, triagem-async 0.10, rdk:broker 0.05), the test broker 0.05, \
             the rest 0.20; the machine's 2 cores were 95 % busy"
        );
        // With the time each group waited for a CPU, in the same order.
        std::fs::write(
            &drain,
            r#"{"broker": "tansu", "worker_cores": 1.4, "broker_cores": 0.2, "other_cores": 0.15, "cores": 2, "machine_busy": 0.87, "worker_threads": {"triagem-async": 0.13, "triagem-model-": 1.2}, "worker_threads_waiting": {"triagem-async": 0.19, "triagem-model-": 0.52}}"#,
        )
        .unwrap();
        assert_eq!(
            read_cpu_shares(&drain).unwrap().describe(),
            "the worker used 1.40 cores (triagem-model- 1.20, triagem-async 0.13; waiting for a CPU: triagem-model- 0.52, \
             triagem-async 0.19), the tansu broker 0.20, the rest 0.15; the machine's 2 cores were 87 % busy"
        );
        let bad = dir.path().join("other.json");
        std::fs::write(&bad, r#"{"throughput": 7000}"#).unwrap();
        let e = read_cpu_shares(&bad).unwrap_err().to_string();
        assert!(e.starts_with(&bad.display().to_string()) && e.contains("not the cores of a run"), "{e}");
    }

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

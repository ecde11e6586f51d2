//! The classifier: a Hugging Face `BertForSequenceClassification` directory
//! (`config.json`, `model.safetensors`, `tokenizer.json`) loaded into candle,
//! and batched prediction over plain strings.
//!
//! Two implementations of the forward pass: `bert.rs`, candle tensor
//! operations (training, hidden states, the GPU, and the reference), and
//! `cpu.rs`, the CPU serving path over plain slices (no padding, the last
//! layer for `[CLS]` only), which every prediction on the CPU goes through.
//! `erf.rs` is libm's erf, to the bit, in a form the compiler vectorises
//! (the training GELU's).
//!
//! This module is synchronous and knows nothing of Kafka, tokio or the CLI;
//! the worker calls [`Classifier::predict`] from its one inference thread.

pub mod bert;
pub mod config;
pub mod cpu;
pub mod erf;
pub mod threads;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use serde::Serialize;
use sha2::{Digest, Sha256};
use tokenizers::{PaddingParams, PaddingStrategy, Tokenizer, TruncationParams};

pub use bert::{BertClassifier, Mode};
pub use config::BertConfig;

/// File names of a model directory, as Hugging Face lays it out.
pub const CONFIG_FILE: &str = "config.json";
/// Weights, in safetensors format.
pub const WEIGHTS_FILE: &str = "model.safetensors";
/// The fast-tokenizer file.
pub const TOKENIZER_FILE: &str = "tokenizer.json";

/// Longest input, in tokens, when neither the tokenizer nor the caller says otherwise.
pub const DEFAULT_MAX_LEN: usize = 128;

/// Why a model could not be loaded, saved or run.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("model directory {dir} has no {file}: expected a Hugging Face model directory (config.json, model.safetensors, tokenizer.json); train one with `triagem train`")]
    MissingFile { dir: PathBuf, file: &'static str },
    #[error("{path}: {reason}")]
    BadConfig { path: PathBuf, reason: String },
    #[error("{path}: cannot load weights: {reason}")]
    BadWeights { path: PathBuf, reason: String },
    #[error("{path}: cannot load tokenizer: {reason}")]
    BadTokenizer { path: PathBuf, reason: String },
    #[error("cannot write {path}: {reason}")]
    Save { path: PathBuf, reason: String },
    #[error("device {spec:?}: {reason}")]
    Device { spec: String, reason: String },
    #[error("tokenization failed: {0}")]
    Tokenize(String),
    #[error("inference failed: {0}")]
    Inference(#[from] candle_core::Error),
    #[error("{what}: only the tensor path computes them, and this model was loaded to serve on the CPU path (load it with `Classifier::load_tensor_path`)")]
    NeedsTensorPath { what: &'static str },
}

/// Where the model runs, as the user names it (`--device`, `model.device`):
/// parsed once, by clap or serde, and turned into a candle device by [`ComputeDevice::open`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize, clap::ValueEnum)]
#[serde(try_from = "String")]
pub enum ComputeDevice {
    /// The CPU.
    #[default]
    Cpu,
    /// GPU 0; needs the `cuda` build.
    Cuda,
    /// GPU 0 when a CUDA build finds one, else the CPU.
    Auto,
}

impl ComputeDevice {
    /// Its name in settings and metrics labels.
    pub fn as_str(self) -> &'static str {
        match self {
            ComputeDevice::Cpu => "cpu",
            ComputeDevice::Cuda => "cuda",
            ComputeDevice::Auto => "auto",
        }
    }

    /// The candle device. `auto` in a CUDA build that cannot open GPU 0 (no
    /// driver, no device) logs why and falls back to the CPU.
    pub fn open(self) -> Result<Device, ModelError> {
        let err = |reason: String| ModelError::Device { spec: self.as_str().to_string(), reason };
        match self {
            ComputeDevice::Cpu => Ok(Device::Cpu),
            ComputeDevice::Cuda if !candle_core::utils::cuda_is_available() => {
                Err(err("this binary was built without CUDA; rebuild with `--features cuda`".to_string()))
            }
            ComputeDevice::Cuda => Device::new_cuda(0).map_err(|e| {
                err(format!("cannot open GPU 0 (is an NVIDIA driver installed?): {}", without_backtrace(e)))
            }),
            ComputeDevice::Auto if candle_core::utils::cuda_is_available() => match Device::new_cuda(0) {
                Ok(device) => Ok(device),
                Err(e) => {
                    tracing::warn!("device auto: cannot open GPU 0, running on the CPU: {}", without_backtrace(e));
                    Ok(Device::Cpu)
                }
            },
            ComputeDevice::Auto => Ok(Device::Cpu),
        }
    }
}

/// candle's error without the backtrace it attaches under `RUST_BACKTRACE`: the user gets one sentence.
fn without_backtrace(e: candle_core::Error) -> candle_core::Error {
    match e {
        candle_core::Error::WithBacktrace { inner, .. } => *inner,
        e => e,
    }
}

impl TryFrom<String> for ComputeDevice {
    type Error = String;

    fn try_from(name: String) -> Result<Self, String> {
        <Self as clap::ValueEnum>::from_str(&name, false).map_err(|_| format!("{name:?}: expected cpu, cuda or auto"))
    }
}

impl std::fmt::Display for ComputeDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One text's prediction.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Prediction {
    /// The most probable label.
    pub label: String,
    /// Its probability.
    pub score: f32,
    /// Probability of every label, in the model's label order.
    pub scores: Vec<(String, f32)>,
}

/// What identifies a loaded model in logs, metrics and routed messages.
#[derive(Debug, Clone, Serialize)]
pub struct ModelInfo {
    /// Directory name of the model.
    pub name: String,
    /// First 12 hex digits of the SHA-256 of `model.safetensors`: changes with every retrain.
    pub version: String,
    /// Labels in class-index order.
    pub labels: Vec<String>,
    /// Where it was loaded from.
    pub path: PathBuf,
    /// Longest input in tokens; longer texts are truncated.
    pub max_len: usize,
}

/// Token ids of a batch, padded to its longest member.
pub struct Encoded {
    pub ids: Vec<Vec<u32>>,
    pub masks: Vec<Vec<u32>>,
}

impl Encoded {
    /// Each text's token ids without its padding (padding is on the right: a text's tokens are its mask's ones).
    pub fn unpadded(&self) -> Vec<&[u32]> {
        self.ids.iter().zip(&self.masks).map(|(ids, mask)| &ids[..mask.iter().filter(|&&m| m != 0).count()]).collect()
    }
}

/// A tokenizer set up for a model: truncation at `max_len`, padding to the batch's longest text.
#[derive(Clone)]
pub struct TextEncoder {
    tokenizer: Tokenizer,
    max_len: usize,
    /// The padding token's id.
    pad_id: u32,
}

impl TextEncoder {
    /// Configures `tokenizer` to truncate at `max_len` and pad with `pad_id`.
    pub fn new(mut tokenizer: Tokenizer, max_len: usize, pad_id: u32) -> Result<Self, String> {
        let pad_token = tokenizer.id_to_token(pad_id).unwrap_or_else(|| "[PAD]".into());
        tokenizer
            .with_truncation(Some(TruncationParams { max_length: max_len, ..Default::default() }))
            .map_err(|e| e.to_string())?;
        tokenizer.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::BatchLongest,
            pad_id,
            pad_token,
            ..Default::default()
        }));
        Ok(Self { tokenizer, max_len, pad_id })
    }

    /// Reads `tokenizer.json`, truncating at the length it declares (or
    /// [`DEFAULT_MAX_LEN`]), never beyond the model's `max_positions`.
    pub fn load(path: &Path, max_positions: usize, pad_id: u32) -> Result<Self, ModelError> {
        let bad = |reason: String| ModelError::BadTokenizer { path: path.to_path_buf(), reason };
        let tokenizer = Tokenizer::from_file(path).map_err(|e| bad(e.to_string()))?;
        let declared = tokenizer.get_truncation().map_or(DEFAULT_MAX_LEN, |t| t.max_length);
        Self::new(tokenizer, declared.min(max_positions), pad_id).map_err(bad)
    }

    /// The underlying tokenizer, configured.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Longest input in tokens.
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// Ids and attention masks of `texts`, padded to the longest one.
    pub fn encode(&self, texts: &[&str]) -> Result<Encoded, ModelError> {
        let encodings =
            self.tokenizer.encode_batch(texts.to_vec(), true).map_err(|e| ModelError::Tokenize(e.to_string()))?;
        Ok(Encoded {
            ids: encodings.iter().map(|e| e.get_ids().to_vec()).collect(),
            masks: encodings.iter().map(|e| e.get_attention_mask().to_vec()).collect(),
        })
    }

    /// Number of tokens `text` takes after truncation, special tokens included.
    pub fn count_tokens(&self, text: &str) -> usize {
        self.tokenizer.encode_fast(text, true).map(|e| e.get_ids().len()).unwrap_or(self.max_len).min(self.max_len)
    }

    /// The token ids of one text, truncated, special tokens included, unpadded:
    /// what [`Classifier::predict_ids`] takes.
    pub fn tokenize(&self, text: &str) -> Result<Vec<u32>, ModelError> {
        let encoding = self.tokenizer.encode_fast(text, true).map_err(|e| ModelError::Tokenize(e.to_string()))?;
        Ok(encoding.get_ids().to_vec())
    }
}

/// A loaded classifier, ready to predict.
pub struct Classifier {
    engine: Engine,
    encoder: TextEncoder,
    labels: Vec<String>,
    device: Device,
    info: ModelInfo,
    /// Calibration temperature from `config.json` (1 when absent): scores are softmax(logits / T).
    temperature: f32,
}

/// What computes the logits. One copy of the weights either way.
enum Engine {
    /// candle's tensor operations: training, the GPU, hidden states, and the
    /// reference the serving path is tested against.
    Tensor(BertClassifier),
    /// The CPU serving path ([`cpu`]): what [`Classifier::load`] gives on the CPU.
    Cpu(cpu::CpuBert),
}

/// Reads and checks `config.json` of a model directory.
pub fn read_config(dir: &Path) -> Result<BertConfig, ModelError> {
    let path = require(dir, CONFIG_FILE)?;
    let bad = |reason: String| ModelError::BadConfig { path: path.clone(), reason };
    let text = std::fs::read_to_string(&path).map_err(|e| bad(e.to_string()))?;
    let cfg: BertConfig = serde_json::from_str(&text).map_err(|e| bad(format!("not a BERT config.json: {e}")))?;
    if cfg.model_type != "bert" {
        return Err(bad(format!("model_type is {:?}; triagem serves BERT models only", cfg.model_type)));
    }
    Ok(cfg)
}

/// `dir/file`, or an error naming the missing file.
pub fn require(dir: &Path, file: &'static str) -> Result<PathBuf, ModelError> {
    if !dir.is_dir() {
        return Err(ModelError::MissingFile { dir: dir.to_path_buf(), file: CONFIG_FILE });
    }
    let path = dir.join(file);
    if path.is_file() {
        Ok(path)
    } else {
        Err(ModelError::MissingFile { dir: dir.to_path_buf(), file })
    }
}

/// Short content hash of a file, used as the model version (streamed: the
/// weights are memory-mapped afterwards, not read into memory twice).
pub fn file_version(path: &Path) -> std::io::Result<String> {
    let mut hasher = Sha256::new();
    std::io::copy(&mut std::fs::File::open(path)?, &mut hasher)?;
    Ok(hasher.finalize().iter().take(6).map(|b| format!("{b:02x}")).collect())
}

impl Classifier {
    /// Loads a model directory to serve: on the CPU through the CPU serving
    /// path ([`cpu`]; the tensor model is dropped once its weights are
    /// copied there), elsewhere through candle's tensor path.
    pub fn load(dir: &Path, device: &Device) -> Result<Self, ModelError> {
        Self::load_with(dir, device, matches!(device, Device::Cpu))
    }

    /// Loads a model directory computing with candle's tensor operations on
    /// the CPU too: the reference the serving path is tested against, the
    /// only one with hidden states, and what training computes with, so that
    /// a model's training does not depend on how it is served.
    pub fn load_tensor_path(dir: &Path, device: &Device) -> Result<Self, ModelError> {
        Self::load_with(dir, device, false)
    }

    fn load_with(dir: &Path, device: &Device, serve_on_cpu_path: bool) -> Result<Self, ModelError> {
        let cfg = read_config(dir)?;
        let config_path = dir.join(CONFIG_FILE);
        let labels = cfg.labels().map_err(|reason| ModelError::BadConfig { path: config_path.clone(), reason })?;
        let temperature = match cfg.triagem_temperature {
            None => 1.0,
            Some(t) if t.is_finite() && t > 0.0 => t as f32,
            Some(t) => {
                let reason = format!("triagem_temperature is {t}; it must be a positive number");
                return Err(ModelError::BadConfig { path: config_path, reason });
            }
        };
        let encoder = TextEncoder::load(&require(dir, TOKENIZER_FILE)?, cfg.max_position_embeddings, cfg.pad_token_id)?;
        let max_len = encoder.max_len();
        let weights = require(dir, WEIGHTS_FILE)?;
        let bad_weights = |reason: String| ModelError::BadWeights { path: weights.clone(), reason };
        let version = file_version(&weights).map_err(|e| bad_weights(e.to_string()))?;
        // SAFETY: the file is memory-mapped read-only, and only while loading:
        // candle copies each tensor out of the mapping. `triagem train`
        // replaces the files of its output directory by rename, never in
        // place, so a load racing a retrain never maps a half-written file.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[&weights], DType::F32, device) }
            .map_err(|e| bad_weights(e.to_string()))?;
        let mut model = BertClassifier::load(&cfg, labels.len(), vb).map_err(|e| bad_weights(e.to_string()))?;
        // Loaded to serve: its weights never change, so the fused inference path is safe.
        model.fuse_for_inference().map_err(|e| bad_weights(e.to_string()))?;
        let engine = if serve_on_cpu_path {
            Engine::Cpu(model.into_cpu().map_err(|e| bad_weights(e.to_string()))?)
        } else {
            Engine::Tensor(model)
        };
        let name = dir
            .canonicalize()
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_else(|| dir.display().to_string());
        let info = ModelInfo { name, version, labels: labels.clone(), path: dir.to_path_buf(), max_len };
        Ok(Self { engine, encoder, labels, device: device.clone(), info, temperature })
    }

    /// Wraps an in-memory model (used by training to evaluate without a round trip to disk).
    pub fn from_parts(model: BertClassifier, encoder: TextEncoder, labels: Vec<String>, device: Device) -> Self {
        let info = ModelInfo {
            name: "in-training".into(),
            version: "unsaved".into(),
            labels: labels.clone(),
            path: PathBuf::new(),
            max_len: encoder.max_len(),
        };
        Self { engine: Engine::Tensor(model), encoder, labels, device, info, temperature: 1.0 }
    }

    /// Whether predictions come from the CPU serving path ([`cpu`]: no padding,
    /// the last layer for `[CLS]` only) rather than from candle's tensor path.
    pub fn serves_on_cpu_path(&self) -> bool {
        matches!(self.engine, Engine::Cpu(_))
    }

    /// The tensor model, or the error naming `what` needed it.
    fn tensor_model(&self, what: &'static str) -> Result<&BertClassifier, ModelError> {
        match &self.engine {
            Engine::Tensor(model) => Ok(model),
            Engine::Cpu(_) => Err(ModelError::NeedsTensorPath { what }),
        }
    }

    /// The calibration temperature the scores are computed with (1: none).
    pub fn temperature(&self) -> f32 {
        self.temperature
    }

    /// Computes scores with temperature `t` from now on (training sets the one it fitted).
    pub fn set_temperature(&mut self, t: f32) {
        self.temperature = t;
    }

    /// Name, version and labels.
    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    /// Labels in class-index order.
    pub fn labels(&self) -> &[String] {
        &self.labels
    }

    /// The configured tokenizer, for token counting by the batcher.
    pub fn encoder(&self) -> &TextEncoder {
        &self.encoder
    }

    /// Raw logits, one row per text, in one forward pass (before calibration: what `transformers` computes).
    pub fn logits(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>, ModelError> {
        threads::install(|| match &self.engine {
            Engine::Cpu(cpu) => {
                let encoded = self.encoder.encode(texts)?;
                cpu.logits(&encoded.unpadded()).map_err(ModelError::Tokenize)
            }
            Engine::Tensor(model) => {
                let (ids, masks) = self.input_tensors(texts)?;
                Ok(model.forward(&ids, &masks, &mut Mode::Eval)?.to_dtype(DType::F32)?.to_vec2()?)
            }
        })
    }

    /// The encoder's last hidden states, (text, token, hidden), padded to the
    /// longest text: what `transformers` calls `last_hidden_state`. Only on
    /// the tensor path ([`Classifier::load_tensor_path`]): the serving path
    /// computes the last layer for `[CLS]` alone.
    pub fn hidden_states(&self, texts: &[&str]) -> Result<Vec<Vec<Vec<f32>>>, ModelError> {
        let model = self.tensor_model("hidden states")?;
        threads::install(|| {
            let (ids, masks) = self.input_tensors(texts)?;
            Ok(model.hidden_states(&ids, &masks, &mut Mode::Eval)?.to_dtype(DType::F32)?.to_vec3()?)
        })
    }

    /// The tensor path's forward passes for texts of `lengths` tokens: [`group_by_length`] at this
    /// device's [`pass_cost_tokens`].
    pub fn groups(&self, lengths: &[usize]) -> Vec<Vec<usize>> {
        group_by_length(lengths, pass_cost_tokens(&self.device))
    }

    /// Calibrated scores of the tokenised texts `ids`, one row each in their
    /// order: from the CPU serving path when there is one (no padding at
    /// all), else from the tensor path in groups of similar lengths
    /// ([`group_by_length`]) so that a batch of mixed lengths is not padded
    /// to its longest text throughout.
    fn grouped_logits(&self, ids: &[&[u32]]) -> Result<Vec<Vec<f32>>, ModelError> {
        if let Some(i) = ids.iter().position(|t| t.is_empty()) {
            return Err(ModelError::Tokenize(format!("text {i} of the batch has no tokens")));
        }
        let model = match &self.engine {
            Engine::Cpu(cpu) => {
                let logits = cpu.logits(ids).map_err(ModelError::Tokenize)?;
                return Ok(logits.iter().map(|row| softmax(row, self.temperature as f64)).collect());
            }
            Engine::Tensor(model) => model,
        };
        let lengths: Vec<usize> = ids.iter().map(|t| t.len()).collect();
        let pad = self.encoder.pad_id;
        let mut rows = vec![Vec::new(); ids.len()];
        for group in self.groups(&lengths) {
            let longest = group.iter().map(|&i| lengths[i]).max().unwrap_or(0);
            let padded = |i: usize, fill: u32, value: Option<u32>| -> Vec<u32> {
                let mut row: Vec<u32> = match value {
                    Some(v) => vec![v; lengths[i]],
                    None => ids[i].to_vec(),
                };
                row.resize(longest, fill);
                row
            };
            let group_ids: Vec<Vec<u32>> = group.iter().map(|&i| padded(i, pad, None)).collect();
            let masks: Vec<Vec<u32>> = group.iter().map(|&i| padded(i, 0, Some(1))).collect();
            let (ids, masks) = bert::batch_tensors(&group_ids, &masks, &self.device)?;
            let mut logits = model.forward(&ids, &masks, &mut Mode::Eval)?.to_dtype(DType::F32)?;
            if self.temperature != 1.0 {
                logits = (logits / self.temperature as f64)?;
            }
            for (&i, row) in group.iter().zip(bert::probabilities(&logits)?) {
                rows[i] = row;
            }
        }
        Ok(rows)
    }

    /// Token ids and attention masks of `texts`, padded to the longest, on the model's device.
    fn input_tensors(&self, texts: &[&str]) -> Result<(Tensor, Tensor), ModelError> {
        let encoded = self.encoder.encode(texts)?;
        Ok(bert::batch_tensors(&encoded.ids, &encoded.masks, &self.device)?)
    }

    /// Predictions for `texts`, in one forward pass per group of similar lengths, with calibrated scores
    /// (softmax of the logits divided by the model's temperature). An empty
    /// slice gives an empty result.
    /// Runs on the model's thread pool ([`threads`]).
    pub fn predict(&self, texts: &[&str]) -> Result<Vec<Prediction>, ModelError> {
        if texts.is_empty() {
            return Ok(Vec::new());
        }
        threads::install(|| {
            let encoded = self.encoder.encode(texts)?;
            let probs = self.grouped_logits(&encoded.unpadded())?;
            Ok(probs.into_iter().map(|row| self.prediction(row)).collect())
        })
    }

    /// [`Classifier::predict`] of texts already tokenised by
    /// [`TextEncoder::tokenize`] (the worker's batcher does it once, for
    /// `batch.max_tokens` and for the model).
    pub fn predict_ids(&self, ids: &[&[u32]]) -> Result<Vec<Prediction>, ModelError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        threads::install(|| {
            let probs = self.grouped_logits(ids)?;
            Ok(probs.into_iter().map(|row| self.prediction(row)).collect())
        })
    }

    fn prediction(&self, row: Vec<f32>) -> Prediction {
        let best = row.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map_or(0, |(i, _)| i);
        Prediction {
            label: self.labels[best].clone(),
            score: row[best],
            scores: self.labels.iter().cloned().zip(row).collect(),
        }
    }
}

/// softmax(`row` / `temperature`), computed in f64: the calibrated scores of one text's logits.
pub fn softmax(row: &[f32], temperature: f64) -> Vec<f32> {
    let scaled: Vec<f64> = row.iter().map(|&z| z as f64 / temperature).collect();
    let max = scaled.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let exps: Vec<f64> = scaled.iter().map(|z| (z - max).exp()).collect();
    let sum: f64 = exps.iter().sum();
    exps.into_iter().map(|e| (e / sum) as f32).collect()
}

/// What one more forward pass costs, in padded tokens, on the CPU: about 16
/// on the default model on a 2-core CPU (`triagem bench`: ~0.8 ms a pass
/// against ~0.04 ms a padded token).
const PASS_COST_TOKENS: usize = 16;

/// The same on a GPU, where a pass is a few hundred kernel launches (~1–3 ms
/// whatever its size) and a padded token of a BERT-base-sized model costs a
/// few microseconds: splitting a batch pays only when it saves hundreds of
/// padded tokens (see the README's "GPU figures").
const GPU_PASS_COST_TOKENS: usize = 512;

/// What one more forward pass costs on `device`, in padded tokens.
pub fn pass_cost_tokens(device: &Device) -> usize {
    if device.is_cpu() {
        PASS_COST_TOKENS
    } else {
        GPU_PASS_COST_TOKENS
    }
}

/// Splits texts of `lengths` (in tokens) into groups run as one forward pass
/// each: sorted by length, then cut where the padding saved is worth more
/// than another pass (an exact minimum of passes × `pass_cost` + padded
/// tokens over contiguous groups of the sorted order). Returns indices into
/// `lengths`, each group shortest first.
pub fn group_by_length(lengths: &[usize], pass_cost: usize) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.sort_by_key(|&i| lengths[i]);
    let n = order.len();
    // best[j]: least cost of the first j texts in sorted order; cut[j]: where its last group starts.
    let mut best = vec![0usize; n + 1];
    let mut cut = vec![0usize; n + 1];
    for j in 1..=n {
        let longest = lengths[order[j - 1]];
        (best[j], cut[j]) = (0..j).map(|i| (best[i] + pass_cost + (j - i) * longest, i)).min().unwrap_or((0, 0));
    }
    let mut groups = Vec::new();
    let mut j = n;
    while j > 0 {
        groups.push(order[cut[j]..j].to_vec());
        j = cut[j];
    }
    groups.reverse();
    groups
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A copy of the test fixture with `triagem_temperature` set to `value` (absent for `None`).
    fn fixture_with_temperature(value: Option<serde_json::Value>) -> tempfile::TempDir {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-model");
        let dir = tempfile::tempdir().unwrap();
        for file in [CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE] {
            std::fs::copy(src.join(file), dir.path().join(file)).unwrap();
        }
        let mut config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(src.join(CONFIG_FILE)).unwrap()).unwrap();
        if let Some(v) = value {
            config["triagem_temperature"] = v;
        }
        std::fs::write(dir.path().join(CONFIG_FILE), config.to_string()).unwrap();
        dir
    }

    /// Without a usable GPU (this machine, CI): `cpu` and `auto` give the CPU, `cuda` one sentence saying why not.
    /// In a CUDA build on a GPU host the last two open the GPU instead, so the test skips there.
    #[test]
    fn cuda_without_a_gpu_is_an_error_and_auto_falls_back_to_the_cpu() {
        assert!(matches!(ComputeDevice::Cpu.open(), Ok(Device::Cpu)));
        match ComputeDevice::Cuda.open() {
            Ok(_) => return, // a CUDA build with a GPU
            Err(e) => {
                let msg = e.to_string();
                assert!(msg.starts_with("device \"cuda\": "), "{msg}");
                if candle_core::utils::cuda_is_available() {
                    assert!(msg.contains("cannot open GPU 0") && !msg.contains('\n'), "{msg}");
                } else {
                    assert!(msg.contains("built without CUDA") && msg.contains("--features cuda"), "{msg}");
                }
            }
        }
        assert!(matches!(ComputeDevice::Auto.open(), Ok(Device::Cpu)));
    }

    #[test]
    fn calibration_temperature_is_loaded_and_applied_to_scores_only() {
        let texts = ["comprei semana passada e veio com defeito", "quero comprar uma geladeira", "oi"];
        let plain_dir = fixture_with_temperature(None);
        let plain = Classifier::load(plain_dir.path(), &Device::Cpu).unwrap();
        let dir = fixture_with_temperature(Some(serde_json::json!(2.5)));
        let calibrated = Classifier::load(dir.path(), &Device::Cpu).unwrap();
        assert_eq!(plain.temperature(), 1.0);
        assert_eq!(calibrated.temperature(), 2.5);
        // Logits are what transformers computes: untouched.
        assert_eq!(plain.logits(&texts).unwrap(), calibrated.logits(&texts).unwrap());
        let logits = calibrated.logits(&texts).unwrap();
        for ((p, c), z) in plain.predict(&texts).unwrap().iter().zip(calibrated.predict(&texts).unwrap()).zip(logits) {
            assert_eq!(p.label, c.label, "calibration must not change the label");
            let e: Vec<f64> = z.iter().map(|&v| (v as f64 / 2.5).exp()).collect();
            let sum: f64 = e.iter().sum();
            for ((_, got), want) in c.scores.iter().zip(e.iter().map(|v| v / sum)) {
                assert!((*got as f64 - want).abs() < 1e-5, "{got} vs {want}");
            }
            // T > 1 pulls the top score towards 1/2.
            assert!(c.score <= p.score && c.score >= 0.5, "{} vs {}", c.score, p.score);
        }
    }

    #[test]
    fn grouping_by_length_pads_less_and_keeps_every_text_once() {
        let lengths = [12, 5, 60, 7, 13, 58, 6, 11];
        let groups = group_by_length(&lengths, PASS_COST_TOKENS);
        let mut seen: Vec<usize> = groups.iter().flatten().copied().collect();
        seen.sort();
        assert_eq!(seen, (0..lengths.len()).collect::<Vec<_>>());
        let padded: usize = groups.iter().map(|g| g.len() * g.iter().map(|&i| lengths[i]).max().unwrap()).sum();
        let cost = padded + groups.len() * PASS_COST_TOKENS;
        assert!(cost < lengths.len() * 60 + PASS_COST_TOKENS, "{groups:?}");
        assert_eq!(groups.len(), 3, "short, middle and long texts: {groups:?}");
        // Equal lengths: one pass.
        assert_eq!(group_by_length(&[9, 9, 9], PASS_COST_TOKENS).len(), 1);
        assert!(group_by_length(&[], PASS_COST_TOKENS).is_empty());
        // A pass as dear as a GPU's: the same texts in one pass, as padding costs less than a second one.
        assert_eq!(group_by_length(&lengths, GPU_PASS_COST_TOKENS).len(), 1);
        assert_eq!(pass_cost_tokens(&Device::Cpu), PASS_COST_TOKENS);
    }

    #[test]
    fn predictions_do_not_depend_on_the_batch_they_come_in() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-model");
        let c = Classifier::load(&dir, &Device::Cpu).unwrap();
        let texts = [
            "oi",
            "comprei semana passada e veio com defeito, quero trocar o quanto antes por favor",
            "quero comprar uma geladeira",
            "tem airfryer 5l?",
            "meu pedido chegou quebrado e ninguém responde no chat nem no telefone, o que eu faço agora?",
        ];
        let together = c.predict(&texts).unwrap();
        for (text, p) in texts.iter().zip(&together) {
            let alone = &c.predict(&[text]).unwrap()[0];
            assert_eq!(alone.label, p.label, "{text}");
            assert!((alone.score - p.score).abs() < 1e-5, "{text}: {} vs {}", alone.score, p.score);
        }
    }

    #[test]
    fn texts_tokenised_once_predict_the_same_as_texts() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-model");
        let c = Classifier::load(&dir, &Device::Cpu).unwrap();
        let long = "meu pedido chegou quebrado e ninguém responde no chat nem no telefone ".repeat(20);
        let texts = ["oi", "quero comprar uma geladeira", long.as_str(), "tem airfryer 5l?", ""];
        let ids: Vec<Vec<u32>> = texts.iter().map(|t| c.encoder().tokenize(t).unwrap()).collect();
        assert_eq!(ids[2].len(), c.encoder().max_len(), "a long text is truncated");
        assert_eq!(ids.iter().map(Vec::len).collect::<Vec<_>>(), texts.map(|t| c.encoder().count_tokens(t)));
        let refs: Vec<&[u32]> = ids.iter().map(Vec::as_slice).collect();
        let from_ids = c.predict_ids(&refs).unwrap();
        for ((text, a), b) in texts.iter().zip(c.predict(&texts).unwrap()).zip(from_ids) {
            assert_eq!(a.label, b.label, "{text}");
            assert!((a.score - b.score).abs() < 1e-6, "{text}: {} vs {}", a.score, b.score);
        }
        let err = c.predict_ids(&[&ids[0], &[]]).unwrap_err().to_string();
        assert!(err.contains("text 1 of the batch has no tokens"), "{err}");
    }

    #[test]
    fn a_bad_temperature_is_one_clear_error() {
        for bad in [serde_json::json!(0.0), serde_json::json!(-1.0)] {
            let dir = fixture_with_temperature(Some(bad));
            let err = Classifier::load(dir.path(), &Device::Cpu).err().unwrap().to_string();
            assert!(err.contains("config.json") && err.contains("triagem_temperature"), "{err}");
        }
        let dir = fixture_with_temperature(Some(serde_json::json!("hot")));
        let err = Classifier::load(dir.path(), &Device::Cpu).err().unwrap().to_string();
        assert!(err.contains("config.json"), "{err}");
    }
}

//! Where a training run starts: the base (`--base none`, a local Hugging
//! Face BERT directory, or a Hub id in the local cache), and the model and
//! tokenizer built from it, every variable initialised from the base
//! checkpoint or from the run's seeded generator.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use rand::rngs::StdRng;
use rand_distr::{Distribution, Normal};
use tokenizers::Tokenizer;

use super::{scratch, TrainError, TrainOptions};
use crate::data::Example;
use crate::model::{self, BertClassifier, BertConfig, ModelError, TextEncoder};

/// The base `triagem train` starts from by default: the small BERT pretrained by `scripts/pretrain.sh`
/// (`triagem pretrain` on Brazilian Portuguese text), committed with the repository.
pub const DEFAULT_BASE: &str = "models/base/triagem-ptbr";

/// Where the initial weights come from.
#[derive(Debug, Clone, PartialEq)]
pub enum Base {
    /// A small BERT with a tokenizer trained on the training texts.
    Scratch,
    /// A local Hugging Face BERT directory (a `BertModel` or a classifier).
    Dir(PathBuf),
}

impl Base {
    /// Resolves `--base`: `none`, a directory, or a Hub id found in the local Hugging Face cache.
    pub fn parse(spec: &str) -> Result<Self, TrainError> {
        if spec == "none" {
            return Ok(Base::Scratch);
        }
        let path = Path::new(spec);
        if path.is_dir() {
            return Ok(Base::Dir(path.to_path_buf()));
        }
        if let Some(dir) = hub_cache_snapshot(spec) {
            return Ok(Base::Dir(dir));
        }
        let reason = if spec == DEFAULT_BASE {
            "is missing: it ships with the repository (run triagem from the repository root, or rebuild it with \
             scripts/pretrain.sh), or pass --base none to train from scratch"
        } else if spec.split('/').count() == 2 && !spec.starts_with('.') && !spec.starts_with('/') {
            "looks like a Hugging Face Hub id, but it is not in the local Hugging Face cache and triagem does not \
             download: fetch it first (e.g. `hf download ID --local-dir DIR`, or `scripts/fetch-base-model.sh` for \
             all-MiniLM-L6-v2) and pass the directory"
        } else {
            "is neither `none` nor an existing model directory"
        };
        Err(TrainError::Base { spec: spec.to_string(), reason: reason.to_string() })
    }
}

/// `~/.cache/huggingface/hub/models--ORG--NAME/snapshots/*/` holding a `config.json`.
fn hub_cache_snapshot(id: &str) -> Option<PathBuf> {
    let (org, name) = id.split_once('/')?;
    let hub = std::env::var_os("HF_HUB_CACHE").map(PathBuf::from).or_else(|| {
        let home = std::env::var_os("HF_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache/huggingface")))?;
        Some(home.join("hub"))
    })?;
    let snapshots = hub.join(format!("models--{org}--{name}")).join("snapshots");
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(snapshots).ok()?.filter_map(|e| Some(e.ok()?.path())).collect();
    dirs.sort();
    dirs.into_iter().rev().find(|d| d.join(model::CONFIG_FILE).is_file())
}

/// The model under training.
pub(super) struct Trainable {
    pub(super) varmap: VarMap,
    /// Every variable, sorted by name: sums over them must not depend on hash order.
    pub(super) vars: Vec<Var>,
    pub(super) model: BertClassifier,
    pub(super) config: BertConfig,
    pub(super) encoder: TextEncoder,
}

/// Builds the model and its tokenizer from the base, every variable initialised from `rng` or the base.
pub(super) fn build(
    opts: &TrainOptions,
    labels: &[String],
    train: &[Example],
    rng: &mut StdRng,
) -> Result<Trainable, TrainError> {
    let (mut config, tokenizer, base_weights) = match &opts.base {
        Base::Scratch => {
            let texts: Vec<String> = train.iter().map(|e| e.text.clone()).collect();
            let tokenizer = scratch::train_tokenizer(&texts, opts.vocab_size).map_err(TrainError::Tokenizer)?;
            (
                BertConfig::small(
                    tokenizer.get_vocab_size(true),
                    opts.max_len,
                    opts.scratch_hidden,
                    opts.scratch_layers,
                ),
                tokenizer,
                HashMap::new(),
            )
        }
        Base::Dir(dir) => {
            let config = model::read_config(dir)?;
            let tok_path = model::require(dir, model::TOKENIZER_FILE)?;
            let tokenizer = Tokenizer::from_file(&tok_path)
                .map_err(|e| ModelError::BadTokenizer { path: tok_path.clone(), reason: e.to_string() })?;
            let weights = model::require(dir, model::WEIGHTS_FILE)?;
            let tensors = candle_core::safetensors::load(&weights, &opts.device)
                .map_err(|e| ModelError::BadWeights { path: weights.clone(), reason: e.to_string() })?;
            (config, tokenizer, tensors)
        }
    };
    config.set_labels(labels);
    if let Some(p) = opts.dropout {
        config.hidden_dropout_prob = p;
        config.attention_probs_dropout_prob = p;
    }
    let max_len = opts.max_len.min(config.max_position_embeddings);
    let encoder = TextEncoder::new(tokenizer, max_len, config.pad_token_id).map_err(TrainError::Tokenizer)?;
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &opts.device);
    let model = BertClassifier::load(&config, labels.len(), vb)?;
    initialise(&varmap, &config, &base_weights, matches!(opts.base, Base::Dir(_)), rng).map_err(|reason| {
        let Base::Dir(dir) = &opts.base else { unreachable!("scratch models never miss base tensors") };
        ModelError::BadWeights { path: dir.join(model::WEIGHTS_FILE), reason }
    })?;
    let vars = sorted_vars(&varmap).into_iter().map(|(_, v)| v).collect();
    Ok(Trainable { varmap, vars, model, config, encoder })
}

/// Sets every variable: from the base checkpoint when it has the tensor (with
/// or without the `bert.` prefix), otherwise as Hugging Face initialises BERT
/// (normal(0, initializer_range) weights, zero biases, unit layer-norm scales).
/// With a base, every encoder tensor must come from it.
pub(super) fn initialise(
    varmap: &VarMap,
    config: &BertConfig,
    base: &HashMap<String, Tensor>,
    from_base: bool,
    rng: &mut StdRng,
) -> Result<(), String> {
    let data = varmap.data().lock().expect("varmap lock");
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    let mut fresh = Vec::new();
    for name in names {
        let var = &data[name];
        let stripped = name.strip_prefix("bert.").unwrap_or(name);
        let found = base.get(name.as_str()).or_else(|| base.get(stripped));
        match found {
            Some(t) if t.dims() == var.dims() => {
                var.set(&t.to_dtype(DType::F32).map_err(|e| e.to_string())?).map_err(|e| e.to_string())?;
                continue;
            }
            Some(t) => {
                return Err(format!("tensor {name} has shape {:?}, the config implies {:?}", t.dims(), var.dims()))
            }
            None if from_base && name.starts_with("bert.") && !name.starts_with("bert.pooler") => {
                return Err(format!("the base checkpoint has no tensor {stripped} (is it a BERT model?)"))
            }
            None => fresh.push(name.clone()),
        }
        let value = if name.ends_with("LayerNorm.weight") {
            var.ones_like().map_err(|e| e.to_string())?
        } else if name.ends_with("bias") {
            var.zeros_like().map_err(|e| e.to_string())?
        } else {
            let normal = Normal::new(0.0f32, config.initializer_range as f32)
                .map_err(|e| format!("initializer_range {}: {e}", config.initializer_range))?;
            let values: Vec<f32> = normal.sample_iter(&mut *rng).take(var.elem_count()).collect();
            Tensor::from_vec(values, var.shape(), var.device()).map_err(|e| e.to_string())?
        };
        var.set(&value).map_err(|e| e.to_string())?;
    }
    if from_base {
        tracing::info!(initialised = ?fresh, "tensors not in the base checkpoint were initialised");
    }
    Ok(())
}

/// The variables of `varmap` with their names, in name order.
pub(super) fn sorted_vars(varmap: &VarMap) -> Vec<(String, Var)> {
    let data = varmap.data().lock().expect("varmap lock");
    let mut vars: Vec<(String, Var)> = data.iter().map(|(n, v)| (n.clone(), v.clone())).collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    vars
}

//! `config.json` as Hugging Face writes it for `BertForSequenceClassification`.
//!
//! Fields triagem does not use are kept in `extra` and written back unchanged,
//! so a checkpoint that went through triagem still loads in `transformers`
//! with everything its author put there.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The BERT hyper-parameters and the label maps of a checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BertConfig {
    /// Always `["BertForSequenceClassification"]` once triagem saved it.
    #[serde(default)]
    pub architectures: Vec<String>,
    /// Must be `bert`: other encoders have other tensor layouts.
    #[serde(default = "default_model_type")]
    pub model_type: String,
    /// Rows of the word embedding table; the tokenizer's vocabulary size.
    pub vocab_size: usize,
    /// Width of every hidden state.
    pub hidden_size: usize,
    /// Number of encoder layers.
    pub num_hidden_layers: usize,
    /// Attention heads per layer; divides `hidden_size`.
    pub num_attention_heads: usize,
    /// Width of the feed-forward layer inside each encoder layer.
    pub intermediate_size: usize,
    /// Feed-forward activation: `gelu` (erf), `gelu_new`/`gelu_pytorch_tanh` or `relu`.
    #[serde(default = "default_hidden_act")]
    pub hidden_act: String,
    /// Dropout on embeddings, attention outputs, feed-forward outputs and the head.
    #[serde(default = "default_dropout")]
    pub hidden_dropout_prob: f64,
    /// Dropout on the attention probabilities.
    #[serde(default = "default_dropout")]
    pub attention_probs_dropout_prob: f64,
    /// Longest input the position table covers.
    pub max_position_embeddings: usize,
    /// Rows of the segment embedding table (triagem always uses segment 0).
    #[serde(default = "default_type_vocab_size")]
    pub type_vocab_size: usize,
    /// Standard deviation of the normal initialiser for new weights.
    #[serde(default = "default_initializer_range")]
    pub initializer_range: f64,
    /// Epsilon of every layer norm.
    #[serde(default = "default_layer_norm_eps")]
    pub layer_norm_eps: f64,
    /// Id of the padding token.
    #[serde(default)]
    pub pad_token_id: u32,
    /// Class index → label name, keys as decimal strings (Hugging Face's format).
    #[serde(default)]
    pub id2label: BTreeMap<String, String>,
    /// Label name → class index.
    #[serde(default)]
    pub label2id: BTreeMap<String, usize>,
    /// Calibration (triagem's key; `transformers` keeps it as an attribute and ignores it): the
    /// logits are divided by this temperature before the softmax, so that the scores match the
    /// accuracy observed on the dev split it was fitted on. The arg-max, hence every predicted
    /// label, is the same with or without it. Absent: 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub triagem_temperature: Option<f64>,
    /// Everything else the file holds, written back as it was read.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

fn default_model_type() -> String {
    "bert".into()
}
fn default_hidden_act() -> String {
    "gelu".into()
}
fn default_dropout() -> f64 {
    0.1
}
fn default_type_vocab_size() -> usize {
    2
}
fn default_initializer_range() -> f64 {
    0.02
}
fn default_layer_norm_eps() -> f64 {
    1e-12
}

impl BertConfig {
    /// Labels in class-index order, or a description of what is wrong with the maps.
    pub fn labels(&self) -> Result<Vec<String>, String> {
        let n = self.id2label.len();
        if n < 2 {
            return Err(format!("id2label has {n} entries; a classifier needs at least 2"));
        }
        let mut labels = vec![String::new(); n];
        for (id, label) in &self.id2label {
            let i: usize = id.parse().map_err(|_| format!("id2label key {id:?} is not a class index"))?;
            if i >= n {
                return Err(format!("id2label key {i} is out of range for {n} labels"));
            }
            labels[i] = label.clone();
        }
        Ok(labels)
    }

    /// Sets `id2label`, `label2id`, `architectures` and `problem_type` for a
    /// single-label classifier over `labels`.
    pub fn set_labels(&mut self, labels: &[String]) {
        self.id2label = labels.iter().enumerate().map(|(i, l)| (i.to_string(), l.clone())).collect();
        self.label2id = labels.iter().enumerate().map(|(i, l)| (l.clone(), i)).collect();
        self.architectures = vec!["BertForSequenceClassification".into()];
        self.extra.insert("problem_type".into(), "single_label_classification".into());
    }

    /// A small BERT for training from scratch: `hidden` wide (heads of 64, at
    /// least one), `layers` deep, feed-forward four times as wide.
    pub fn small(vocab_size: usize, max_len: usize, hidden: usize, layers: usize) -> Self {
        BertConfig {
            architectures: vec![],
            model_type: default_model_type(),
            vocab_size,
            hidden_size: hidden,
            num_hidden_layers: layers,
            num_attention_heads: (hidden / 64).max(1),
            intermediate_size: 4 * hidden,
            hidden_act: default_hidden_act(),
            hidden_dropout_prob: 0.1,
            attention_probs_dropout_prob: 0.1,
            max_position_embeddings: max_len.max(128),
            type_vocab_size: 2,
            initializer_range: 0.02,
            layer_norm_eps: 1e-12,
            pad_token_id: 0,
            id2label: BTreeMap::new(),
            label2id: BTreeMap::new(),
            triagem_temperature: None,
            extra: serde_json::Map::new(),
        }
    }
}

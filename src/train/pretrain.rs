//! `triagem pretrain`: a small BERT trained from scratch with masked-language
//! modelling on plain text, written as a Hugging Face `BertForMaskedLM`
//! directory that `triagem train --base DIR` fine-tunes.
//!
//! The run: read the corpus (one passage per line) and the texts of JSONL
//! files (their labels unused), repeated `texts_repeat` times so the chat
//! register weighs in → train the WordPiece tokenizer on both → cut every
//! passage into sequences of at most `max_len` tokens, hold out 1 % → steps
//! of `batch_size` sequences (grouped by length, so padding stays small) with
//! BERT's masking: 15 % of the tokens chosen, 80 % of those replaced by
//! `[MASK]`, 10 % by a random token, 10 % left; cross-entropy on the chosen
//! ones → AdamW, warmup then linear decay → the held-out loss and accuracy.
//! As in `train`, every random choice comes from `--seed` (the chat-spelling
//! augmentation of `augment.rs` included), so a run is reproducible.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use indicatif::{ProgressBar, ProgressStyle};
use rand::{rngs::StdRng, seq::SliceRandom, Rng, SeedableRng};
use serde::Serialize;
use sha2::{Digest, Sha256};

use super::base::{initialise, sorted_vars};
use super::checkpoint::{replace_file, save_tokenizer};
use super::optim::{clip_gradients, optimizers};
use super::{augment, schedule, scratch, write_error, TrainError};
use crate::data::Dataset;
use crate::model::{self, bert, BertClassifier, BertConfig, Mode};

/// Everything `triagem pretrain` takes.
#[derive(Debug, Clone)]
pub struct PretrainOptions {
    /// Plain-text files, one passage per line (blank lines skipped).
    pub corpus: Vec<PathBuf>,
    /// JSONL files whose texts (not labels) join the corpus.
    pub texts: Vec<PathBuf>,
    /// How many times each JSONL text is added.
    pub texts_repeat: usize,
    /// Output directory.
    pub out: PathBuf,
    pub vocab_size: usize,
    /// Words seen fewer times than this do not shape the vocabulary's merges.
    pub min_word_count: u64,
    /// The tokenizer cuts each word before a Portuguese inflectional ending (`compr` `ei`).
    pub morphology: bool,
    pub hidden: usize,
    pub layers: usize,
    /// Longest sequence in tokens; the model's position table is at least 128.
    pub max_len: usize,
    pub batch_size: usize,
    /// Optimiser steps.
    pub steps: usize,
    pub lr: f64,
    pub warmup: f64,
    pub weight_decay: f64,
    /// Share of the tokens the model must predict (of the words, with `whole_word`).
    pub mask_prob: f64,
    /// Whole-word masking: words are chosen instead of tokens, every piece of a chosen word with it.
    pub whole_word: bool,
    /// Probability that a passage is rewritten in chat spelling each time it is drawn.
    pub augment: f64,
    pub seed: u64,
    pub device: Device,
    pub quiet: bool,
}

impl Default for PretrainOptions {
    fn default() -> Self {
        Self {
            corpus: vec!["target/corpus/corpus.txt".into()],
            texts: vec!["data/treino.jsonl".into()],
            texts_repeat: 4,
            out: "models/base/triagem-ptbr".into(),
            vocab_size: 8000,
            min_word_count: 3,
            morphology: false,
            hidden: 128,
            layers: 2,
            max_len: 64,
            batch_size: 64,
            steps: 6000,
            lr: 1e-3,
            warmup: 0.05,
            weight_decay: 0.01,
            mask_prob: 0.15,
            whole_word: false,
            augment: 0.3,
            seed: 42,
            device: Device::Cpu,
            quiet: false,
        }
    }
}

/// What a run reports; also written to `OUT/pretrain.json`.
#[derive(Debug, Clone, Serialize)]
pub struct PretrainSummary {
    pub out: PathBuf,
    /// Corpus files and JSONL files with their SHA-256 and passage counts.
    pub sources: Vec<Source>,
    pub sequences: usize,
    pub tokens: usize,
    pub held_out_sequences: usize,
    pub steps: usize,
    /// Mean training loss over each tenth of the run.
    pub loss_curve: Vec<f64>,
    /// Masked-token cross-entropy and accuracy on the held-out sequences, before and after.
    pub held_out_loss_before: f64,
    pub held_out_loss: f64,
    pub held_out_accuracy: f64,
    pub seconds: f64,
    pub parameters: usize,
    pub options: serde_json::Value,
}

/// One input file of the run.
#[derive(Debug, Clone, Serialize)]
pub struct Source {
    pub path: PathBuf,
    pub sha256: String,
    pub passages: usize,
}

/// Runs the pretraining and writes the base model directory.
pub fn pretrain(opts: &PretrainOptions) -> Result<PretrainSummary, TrainError> {
    check_options(opts)?;
    let started = Instant::now();
    let (passages, sources) = read_passages(opts)?;
    eprintln!("{} passages from {} files; training the tokenizer", passages.len(), sources.len());
    let tokenizer = scratch::train_tokenizer_on(&passages, opts.vocab_size, opts.min_word_count, opts.morphology)
        .map_err(TrainError::Tokenizer)?;
    let special = |t: &str| tokenizer.token_to_id(t).ok_or_else(|| TrainError::Tokenizer(format!("no {t} token")));
    let ids = Ids { cls: special("[CLS]")?, sep: special("[SEP]")?, mask: special("[MASK]")?, pad: 0 };
    let vocab = tokenizer.get_vocab_size(true);

    let mut rng = StdRng::seed_from_u64(opts.seed);
    let mut config = BertConfig::small(vocab, opts.max_len, opts.hidden, opts.layers);
    config.architectures = vec!["BertForMaskedLM".into()];
    config.extra.insert("torch_dtype".into(), "float32".into());
    config.extra.insert("tie_word_embeddings".into(), true.into());
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &opts.device);
    let encoder_model = BertClassifier::load(&config, 2, vb.clone())?;
    let head = bert::MaskedLmHead::load(&config, vb.pp("cls").pp("predictions"))?;
    initialise(&varmap, &config, &HashMap::new(), false, &mut rng).map_err(TrainError::Options)?;
    // The pooler and the classifier are not part of a masked language model.
    let trained: Vec<(String, Var)> = sorted_vars(&varmap).into_iter().filter(|(n, _)| kept(n)).collect();
    let parameters: usize = trained.iter().map(|(_, v)| v.elem_count()).sum();

    // Sequences: every passage cut into windows of max_len − 2 tokens, framed by [CLS] … [SEP].
    let cut = |text: &str| -> Result<Vec<Vec<u32>>, TrainError> {
        let enc = tokenizer.encode(text, false).map_err(|e| TrainError::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().chunks(opts.max_len - 2).map(|w| [&[ids.cls][..], w, &[ids.sep]].concat()).collect())
    };
    let mut order: Vec<usize> = (0..passages.len()).collect();
    order.shuffle(&mut rng);
    let held_n = (passages.len() / 100).clamp(1, 2000);
    let mut held_out = Vec::new();
    for &i in &order[..held_n] {
        held_out.extend(cut(&passages[i])?);
    }
    let train_passages: Vec<&String> = order[held_n..].iter().map(|&i| &passages[i]).collect();
    let tokens: usize = train_passages
        .iter()
        .map(|p| cut(p).map(|s| s.iter().map(Vec::len).sum::<usize>()))
        .sum::<Result<usize, _>>()?;
    eprintln!(
        "vocabulary {vocab}; {} training passages ({tokens} tokens), {} held-out sequences; {parameters} parameters",
        train_passages.len(),
        held_out.len()
    );

    let all_vars: Vec<Var> = trained.iter().map(|(_, v)| v.clone()).collect();
    let (mut decay, mut no_decay) = optimizers(trained.clone(), opts.lr, opts.weight_decay)?;
    let warmup_steps = ((opts.steps as f64) * opts.warmup).round() as usize;

    let mut continues = vec![false; vocab];
    for (token, id) in tokenizer.get_vocab(true) {
        if let Some(c) = continues.get_mut(id as usize) {
            *c = token.starts_with(scratch::CONTINUE);
        }
    }
    let mlm = Mlm { model: &encoder_model, head: &head, ids, vocab, continues, device: &opts.device };
    let before = mlm.held_out(&held_out, &mut StdRng::seed_from_u64(opts.seed))?;
    eprintln!("held-out masked-token loss before training {:.3}", before.0);

    let bar = progress_bar(opts.quiet, opts.steps);
    let mut losses = Vec::with_capacity(opts.steps);
    let mut queue: Vec<Vec<Vec<u32>>> = Vec::new();
    for step in 0..opts.steps {
        if queue.is_empty() {
            queue = batches(&train_passages, opts, &cut, &mut rng)?;
        }
        let batch = queue.pop().expect("a refilled queue");
        let lr = opts.lr * schedule(step, warmup_steps, opts.steps);
        decay.set_learning_rate(lr);
        no_decay.set_learning_rate(lr);
        let (inputs, mask, positions, targets) = mlm.mask(&batch, opts.mask_prob, opts.whole_word, &mut rng);
        let (loss, _) = mlm.loss(&inputs, &mask, &positions, &targets, &mut Mode::Train(&mut rng))?;
        let mut grads = loss.backward()?;
        clip_gradients(&mut grads, &all_vars, 1.0)?;
        decay.step(&grads)?;
        no_decay.step(&grads)?;
        let value = loss.to_scalar::<f32>()? as f64;
        losses.push(value);
        bar.inc(1);
        bar.set_message(format!("loss {value:.3} lr {lr:.2e}"));
        let tenth = (opts.steps / 10).max(1);
        if !opts.quiet && (step + 1) % tenth == 0 {
            let recent = &losses[losses.len().saturating_sub(tenth)..];
            let mean = recent.iter().sum::<f64>() / recent.len() as f64;
            let elapsed = started.elapsed().as_secs_f64();
            bar.suspend(|| eprintln!("step {}/{}  loss {mean:.3}  ({elapsed:.0}s)", step + 1, opts.steps));
        }
    }
    bar.finish_and_clear();
    let (held_out_loss, held_out_accuracy) = mlm.held_out(&held_out, &mut StdRng::seed_from_u64(opts.seed))?;
    eprintln!("held-out masked-token loss {held_out_loss:.3}, accuracy {held_out_accuracy:.4}");

    std::fs::create_dir_all(&opts.out).map_err(|e| write_error(&opts.out, e))?;
    let json = serde_json::to_string_pretty(&config).expect("config serialises") + "\n";
    replace_file(&opts.out.join(model::CONFIG_FILE), |p| std::fs::write(p, json).map_err(|e| e.to_string()))?;
    let tensors: HashMap<String, Tensor> = trained.iter().map(|(n, v)| (n.clone(), v.as_tensor().clone())).collect();
    replace_file(&opts.out.join(model::WEIGHTS_FILE), |p| {
        candle_core::safetensors::save(&tensors, p).map_err(|e| e.to_string())
    })?;
    save_tokenizer(&tokenizer, opts.max_len.max(config.max_position_embeddings), &opts.out)?;

    let tenth = (losses.len() / 10).max(1);
    let summary = PretrainSummary {
        out: opts.out.clone(),
        sources,
        sequences: train_passages.len(),
        tokens,
        held_out_sequences: held_out.len(),
        steps: opts.steps,
        loss_curve: losses.chunks(tenth).map(|c| c.iter().sum::<f64>() / c.len() as f64).collect(),
        held_out_loss_before: before.0,
        held_out_loss,
        held_out_accuracy,
        seconds: started.elapsed().as_secs_f64(),
        parameters,
        options: serde_json::json!({
            "texts_repeat": opts.texts_repeat, "vocab_size": opts.vocab_size, "min_word_count": opts.min_word_count,
            "morphology": opts.morphology,
            "hidden": opts.hidden, "layers": opts.layers, "max_len": opts.max_len, "batch_size": opts.batch_size,
            "steps": opts.steps, "lr": opts.lr, "warmup": opts.warmup, "weight_decay": opts.weight_decay,
            "mask_prob": opts.mask_prob, "whole_word_masking": opts.whole_word, "augment": opts.augment, "seed": opts.seed,
        }),
    };
    let json = serde_json::to_string_pretty(&summary).expect("summary serialises") + "\n";
    replace_file(&opts.out.join("pretrain.json"), |p| std::fs::write(p, json).map_err(|e| e.to_string()))?;
    Ok(summary)
}

/// Tensors a masked language model has: the encoder and `cls.predictions`, not the pooler nor a classifier.
fn kept(name: &str) -> bool {
    !name.starts_with("bert.pooler") && !name.starts_with("classifier")
}

/// Token ids the masking needs.
#[derive(Clone, Copy)]
struct Ids {
    cls: u32,
    sep: u32,
    mask: u32,
    pad: u32,
}

/// The encoder and the head, with what masking and scoring need.
struct Mlm<'a> {
    model: &'a BertClassifier,
    head: &'a bert::MaskedLmHead,
    ids: Ids,
    vocab: usize,
    /// By token id: a `##` piece that continues the word before it.
    continues: Vec<bool>,
    device: &'a Device,
}

/// A masked batch: input ids and attention mask (padded rows), flat positions of the chosen tokens, their ids.
type Masked = (Vec<Vec<u32>>, Vec<Vec<u32>>, Vec<u32>, Vec<u32>);

impl Mlm<'_> {
    /// BERT's masking: each token (not `[CLS]`, `[SEP]`) is chosen with `prob`; a chosen one becomes
    /// `[MASK]` (80 %), a random token (10 %) or stays (10 %). With `whole_words`, each word — a token and
    /// the `##` pieces after it — is chosen with `prob`, all its tokens with it, each of them then
    /// replaced as above. At least one token per batch is chosen.
    fn mask(&self, batch: &[Vec<u32>], prob: f64, whole_words: bool, rng: &mut StdRng) -> Masked {
        let len = batch.iter().map(Vec::len).max().unwrap_or(0);
        let (mut inputs, mut masks, mut positions, mut targets) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (r, seq) in batch.iter().enumerate() {
            let mut row = seq.clone();
            let mut start = 0;
            while start < seq.len() {
                if seq[start] == self.ids.cls || seq[start] == self.ids.sep {
                    start += 1;
                    continue;
                }
                let end = if whole_words { self.word_end(seq, start) } else { start + 1 };
                if rng.random_bool(prob) {
                    for (i, id) in row.iter_mut().enumerate().take(end).skip(start) {
                        positions.push((r * len + i) as u32);
                        targets.push(*id);
                        let roll: f64 = rng.random();
                        if roll < 0.8 {
                            *id = self.ids.mask;
                        } else if roll < 0.9 {
                            *id = rng.random_range(5..self.vocab as u32);
                        }
                    }
                }
                start = end;
            }
            let mut mask = vec![1u32; row.len()];
            row.resize(len, self.ids.pad);
            mask.resize(len, 0);
            inputs.push(row);
            masks.push(mask);
        }
        if positions.is_empty() {
            let first = &batch[0];
            if let Some(start) = first.iter().position(|&t| t != self.ids.cls && t != self.ids.sep) {
                let end = if whole_words { self.word_end(first, start) } else { start + 1 };
                for i in start..end {
                    positions.push(i as u32);
                    targets.push(first[i]);
                    inputs[0][i] = self.ids.mask;
                }
            }
        }
        (inputs, masks, positions, targets)
    }

    /// Where the word starting at `start` ends: after the `##` pieces that follow it.
    fn word_end(&self, seq: &[u32], start: usize) -> usize {
        let mut end = start + 1;
        while end < seq.len() && self.continues.get(seq[end] as usize) == Some(&true) {
            end += 1;
        }
        end
    }

    /// Mean cross-entropy over the chosen tokens, and how many of them the model gets right.
    fn loss(
        &self,
        inputs: &[Vec<u32>],
        masks: &[Vec<u32>],
        positions: &[u32],
        targets: &[u32],
        mode: &mut Mode,
    ) -> Result<(Tensor, usize), TrainError> {
        let (ids, attention) = bert::batch_tensors(inputs, masks, self.device)?;
        let hidden = self.model.hidden_states(&ids, &attention, mode)?;
        let (b, s, h) = hidden.dims3()?;
        let chosen = hidden.reshape((b * s, h))?.index_select(&Tensor::new(positions, self.device)?, 0)?;
        let logits = self.head.forward(&chosen, self.model.word_embeddings(), mode)?;
        let targets = Tensor::new(targets, self.device)?;
        let right = logits.argmax(1)?.eq(&targets)?.to_dtype(DType::U32)?.sum_all()?.to_scalar::<u32>()? as usize;
        Ok((candle_nn::loss::cross_entropy(&logits, &targets)?, right))
    }

    /// Masked-token loss and accuracy over `sequences`, without dropout, masks drawn from `rng`.
    fn held_out(&self, sequences: &[Vec<u32>], rng: &mut StdRng) -> Result<(f64, f64), TrainError> {
        let (mut loss, mut right, mut total) = (0.0, 0usize, 0usize);
        for batch in sequences.chunks(64) {
            // Token masking whatever the training used, so that bases compare.
            let (inputs, masks, positions, targets) = self.mask(batch, 0.15, false, rng);
            let (l, r) = self.loss(&inputs, &masks, &positions, &targets, &mut Mode::Eval)?;
            loss += l.to_scalar::<f32>()? as f64 * targets.len() as f64;
            right += r;
            total += targets.len();
        }
        Ok((loss / total.max(1) as f64, right as f64 / total.max(1) as f64))
    }
}

/// Cuts a passage into token-id sequences of at most the sequence length.
type Cut<'a> = dyn Fn(&str) -> Result<Vec<Vec<u32>>, TrainError> + 'a;

/// One pass over the passages: each drawn once (in chat spelling with probability `augment`), cut into
/// sequences, grouped by length in windows of 50 batches, the batches in random order (popped from the end).
fn batches(
    passages: &[&String],
    opts: &PretrainOptions,
    cut: &Cut<'_>,
    rng: &mut StdRng,
) -> Result<Vec<Vec<Vec<u32>>>, TrainError> {
    let mut order: Vec<usize> = (0..passages.len()).collect();
    order.shuffle(rng);
    let mut sequences = Vec::new();
    for i in order {
        sequences.extend(cut(&augment::augment(passages[i], opts.augment, rng))?);
    }
    let mut out = Vec::new();
    for window in sequences.chunks_mut(opts.batch_size * 50) {
        window.sort_by_key(Vec::len);
        out.extend(window.chunks(opts.batch_size).map(<[Vec<u32>]>::to_vec));
    }
    out.shuffle(rng);
    Ok(out)
}

/// The corpus passages and the JSONL texts (each `texts_repeat` times), with the files they came from.
fn read_passages(opts: &PretrainOptions) -> Result<(Vec<String>, Vec<Source>), TrainError> {
    let mut passages = Vec::new();
    let mut sources = Vec::new();
    for path in &opts.corpus {
        let bytes =
            std::fs::read(path).map_err(|e| TrainError::Options(format!("cannot read {}: {e}", path.display())))?;
        let sha256 = hex(&bytes);
        let text = String::from_utf8(bytes)
            .map_err(|e| TrainError::Options(format!("{} is not UTF-8 text: {e}", path.display())))?;
        let before = passages.len();
        passages.extend(text.lines().map(str::trim).filter(|l| !l.is_empty()).map(String::from));
        sources.push(Source { path: path.clone(), sha256, passages: passages.len() - before });
    }
    for path in &opts.texts {
        let data = Dataset::load(path, None)?;
        for _ in 0..opts.texts_repeat {
            passages.extend(data.examples.iter().map(|e| e.text.clone()));
        }
        sources.push(Source { path: path.clone(), sha256: data.sha256.clone(), passages: data.examples.len() });
    }
    if passages.is_empty() {
        return Err(TrainError::Options("the corpus and the texts are empty: nothing to pretrain on".into()));
    }
    Ok((passages, sources))
}

fn hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

fn check_options(opts: &PretrainOptions) -> Result<(), TrainError> {
    let bad = |m: &str| Err(TrainError::Options(m.to_string()));
    if opts.steps == 0 {
        return bad("--steps must be at least 1");
    }
    if opts.batch_size == 0 {
        return bad("--batch-size must be at least 1");
    }
    if opts.max_len < 8 {
        return bad("--max-len must be at least 8");
    }
    if !(opts.mask_prob > 0.0 && opts.mask_prob < 1.0) {
        return bad("--mask-prob must be in (0, 1)");
    }
    if !(opts.lr > 0.0 && opts.lr.is_finite()) {
        return bad("--lr must be a positive number");
    }
    if opts.corpus.is_empty() && opts.texts.is_empty() {
        return bad("give at least one --corpus or --texts file");
    }
    Ok(())
}

fn progress_bar(quiet: bool, steps: usize) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(steps as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "pretrain [{elapsed_precise}] {bar:30} {pos}/{len} steps {per_sec} eta {eta} {msg}",
        )
        .expect("valid template"),
    );
    bar.enable_steady_tick(std::time::Duration::from_millis(500));
    bar
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::train::{train, Base, TrainOptions};

    const SENTENCES: [&str; 6] = [
        "o pedido chegou com a caixa amassada e a porta da geladeira riscada",
        "quero comprar uma geladeira frost free de duas portas para a cozinha",
        "a lavadora parou de centrifugar depois de uma semana de uso",
        "vocês têm fogão de cinco bocas com forno elétrico em promoção",
        "comprei um ventilador de teto e preciso saber como instalar",
        "qual o prazo de entrega de um sofá de três lugares para o meu cep",
    ];

    fn tiny(dir: &Path) -> PretrainOptions {
        let corpus = dir.join("corpus.txt");
        let lines: Vec<&str> = SENTENCES.iter().copied().cycle().take(120).collect();
        std::fs::write(&corpus, lines.join("\n")).unwrap();
        PretrainOptions {
            corpus: vec![corpus],
            texts: vec![],
            out: dir.join("base"),
            vocab_size: 200,
            min_word_count: 2,
            morphology: false,
            hidden: 32,
            max_len: 24,
            batch_size: 8,
            steps: 60,
            lr: 3e-3,
            augment: 0.0,
            quiet: true,
            ..PretrainOptions::default()
        }
    }

    /// The masked-token loss falls on a corpus the model can learn, and the directory
    /// holds an encoder and a head, without the pooler or a classifier.
    #[test]
    fn pretraining_learns_and_writes_a_masked_language_model() {
        let dir = tempfile::tempdir().unwrap();
        let opts = tiny(dir.path());
        let summary = pretrain(&opts).unwrap();
        assert!(
            summary.held_out_loss < summary.held_out_loss_before - 0.5,
            "held-out loss {} → {}",
            summary.held_out_loss_before,
            summary.held_out_loss
        );
        let tensors = candle_core::safetensors::load(opts.out.join(model::WEIGHTS_FILE), &Device::Cpu).unwrap();
        assert!(tensors.contains_key("bert.embeddings.word_embeddings.weight"));
        assert!(tensors.contains_key("cls.predictions.bias"));
        assert!(tensors.keys().all(|k| kept(k)), "{:?}", tensors.keys());
        let config = model::read_config(&opts.out).unwrap();
        assert_eq!(config.architectures, ["BertForMaskedLM"]);
        // Same seed, same corpus: the same weights.
        let again = PretrainOptions { out: dir.path().join("again"), ..opts.clone() };
        pretrain(&again).unwrap();
        let a = std::fs::read(opts.out.join(model::WEIGHTS_FILE)).unwrap();
        let b = std::fs::read(again.out.join(model::WEIGHTS_FILE)).unwrap();
        assert!(a == b, "two runs with the same seed wrote different weights");
    }

    /// `triagem train --base DIR` fine-tunes what `triagem pretrain` wrote, starting from its encoder.
    #[test]
    fn train_takes_the_pretrained_base() {
        let dir = tempfile::tempdir().unwrap();
        let opts = tiny(dir.path());
        pretrain(&opts).unwrap();
        let data = dir.path().join("data.jsonl");
        let rows: Vec<String> = SENTENCES
            .iter()
            .enumerate()
            .map(|(i, s)| {
                serde_json::json!({"prompt": s, "completion": if i % 2 == 0 { "suporte" } else { "venda" }}).to_string()
            })
            .collect();
        std::fs::write(&data, rows.join("\n")).unwrap();
        let out = dir.path().join("model");
        let train_opts = TrainOptions {
            train: data.clone(),
            test: Some(data),
            out: out.clone(),
            base: Base::Dir(opts.out.clone()),
            epochs: 1,
            batch_size: 4,
            dev_fraction: 0.0,
            ensemble: 0,
            quiet: true,
            ..TrainOptions::default()
        };
        train(&train_opts).unwrap();
        let base = candle_core::safetensors::load(opts.out.join(model::WEIGHTS_FILE), &Device::Cpu).unwrap();
        let tuned = candle_core::safetensors::load(out.join(model::WEIGHTS_FILE), &Device::Cpu).unwrap();
        let name = "bert.encoder.layer.1.output.dense.weight";
        let diff = (&base[name] - &tuned[name]).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        // Started from the base (a fresh draw would differ by ~0.02 everywhere), then moved by training.
        assert!(diff > 0.0 && diff < 0.01, "largest change {diff}");
        let vocab = |d: &Path| tokenizers::Tokenizer::from_file(d.join(model::TOKENIZER_FILE)).unwrap().get_vocab(true);
        assert_eq!(vocab(&opts.out), vocab(&out), "the classifier must keep the base's vocabulary");
    }

    /// An encoder and a head of 50 tokens, hidden size 32, two layers, for the masking tests.
    fn tiny_model() -> (BertConfig, VarMap, BertClassifier, bert::MaskedLmHead) {
        let config = BertConfig::small(50, 16, 32, 2);
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let bert = BertClassifier::load(&config, 2, vb.clone()).unwrap();
        let head = bert::MaskedLmHead::load(&config, vb.pp("cls").pp("predictions")).unwrap();
        (config, varmap, bert, head)
    }

    /// Whole-word masking takes a word's `##` pieces with it; token masking chooses them one by one.
    #[test]
    fn whole_word_masking_masks_every_piece_of_a_chosen_word() {
        let (_, _, bert, head) = tiny_model();
        // Ids 11 and 12 are `##` pieces: the words are [10 11 12], [13], [20 11] and [21].
        let mut continues = vec![false; 50];
        continues[11] = true;
        continues[12] = true;
        let mlm = Mlm {
            model: &bert,
            head: &head,
            ids: Ids { cls: 2, sep: 3, mask: 4, pad: 0 },
            vocab: 50,
            continues,
            device: &Device::Cpu,
        };
        let words: [&[usize]; 4] = [&[1, 2, 3], &[4], &[7, 8], &[9]];
        let batch = vec![vec![2, 10, 11, 12, 13, 3], vec![2, 20, 11, 21, 3]];
        let chosen_sets = |whole: bool| -> Vec<Vec<usize>> {
            let mut rng = StdRng::seed_from_u64(9);
            (0..200)
                .map(|_| {
                    let (_, _, positions, targets) = mlm.mask(&batch, 0.3, whole, &mut rng);
                    for (&p, &t) in positions.iter().zip(&targets) {
                        assert_eq!(batch[p as usize / 6][p as usize % 6], t, "the target is the original token");
                    }
                    positions.iter().map(|&p| p as usize).collect()
                })
                .collect()
        };
        let split = |chosen: &[usize]| {
            words.iter().any(|w| w.iter().any(|p| chosen.contains(p)) && !w.iter().all(|p| chosen.contains(p)))
        };
        let whole = chosen_sets(true);
        assert!(whole.iter().all(|c| !split(c)), "a word was masked in part");
        assert!(whole.iter().any(|c| c.contains(&1)) && whole.iter().any(|c| !c.contains(&1)));
        assert!(whole.iter().flatten().all(|&p| ![0, 5, 6, 10, 11].contains(&p)), "[CLS], [SEP] or padding chosen");
        assert!(chosen_sets(false).iter().any(|c| split(c)), "token masking should split words");
    }

    /// Every tensor of the encoder and the head gets a gradient from the masked-token loss.
    #[test]
    fn every_pretrained_tensor_gets_a_gradient() {
        let (config, varmap, bert, head) = tiny_model();
        let mut rng = StdRng::seed_from_u64(4);
        initialise(&varmap, &config, &HashMap::new(), false, &mut rng).unwrap();
        let mlm = Mlm {
            model: &bert,
            head: &head,
            ids: Ids { cls: 2, sep: 3, mask: 4, pad: 0 },
            vocab: 50,
            continues: vec![false; 50],
            device: &Device::Cpu,
        };
        let batch = vec![vec![2, 10, 11, 12, 13, 3], vec![2, 20, 21, 3]];
        let (inputs, masks, positions, targets) = mlm.mask(&batch, 0.5, false, &mut rng);
        assert!(!positions.is_empty());
        assert!(inputs.iter().all(|r| r.len() == 6) && masks[1] == [1, 1, 1, 1, 0, 0]);
        let (loss, _) = mlm.loss(&inputs, &masks, &positions, &targets, &mut Mode::Train(&mut rng)).unwrap();
        let grads = loss.backward().unwrap();
        let missing: Vec<String> = sorted_vars(&varmap)
            .into_iter()
            .filter(|(n, v)| kept(n) && grads.get(v.as_tensor()).is_none())
            .map(|(n, _)| n)
            .collect();
        assert!(missing.is_empty(), "no gradient for {missing:?}");
    }
}

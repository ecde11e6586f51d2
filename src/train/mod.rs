//! `triagem train`: fine-tunes a BERT classifier on a JSONL data set and
//! writes a Hugging Face model directory plus `metrics.json`.
//!
//! The run: load and check the data → carve a stratified dev split from the
//! training file → build the model from the base (a local Hugging Face BERT
//! directory, or from scratch with a tokenizer trained here) → AdamW with
//! weight decay, linear warmup then linear decay, gradient clipping, dropout
//! and chat-spelling augmentation → keep the epoch with the best dev macro-F1
//! → report on the test file. Every random choice (split, init, shuffling,
//! dropout, augmentation) comes from one generator seeded by `--seed`, so the
//! same seed and data give the same model and metrics.
//!
//! Files: this one runs the loop (split, fit, calibrate, refit, report);
//! `adamw.rs` is the optimiser; `optim.rs` which variables it trains at which rate (weight decay or
//! not, `--freeze-embeddings`, `--embedding-lr-scale`) and the gradient clipping; `base.rs` resolves `--base` and builds and initialises the model from it;
//! `checkpoint.rs` writes the model directory; `scratch.rs` trains the
//! tokenizer of `--base none`; `augment.rs` rewrites examples in chat
//! spelling; `average.rs` keeps the weights' moving average of `--ema`;
//! `distill.rs` trains `--ensemble`'s teachers and reads `--teacher-scores`,
//! the soft targets; `loss.rs` is the loss a batch is trained on (labels,
//! soft targets, `--rdrop`'s consistency, `--confidence-ranking`'s term); `ranking.rs` keeps
//! how often each example was got right and ranks the scores by it; `adversarial.rs` is
//! `--adversarial`'s second pass with the word embeddings moved uphill; `soup.rs` trains `--soup`'s models (and their refits)
//! and averages their weights; `jobs.rs` trains independent models (a
//! soup's, an ensemble's teachers) `--jobs` at a time; `calibrate.rs` fits
//! the temperature; `pretrain.rs` is `triagem pretrain`, the
//! masked-language-model base that `--base` takes.

mod adamw;
mod adversarial;
pub mod augment;
mod average;
mod base;
pub mod calibrate;
mod checkpoint;
mod distill;
mod jobs;
mod loss;
mod optim;
pub mod pretrain;
mod ranking;
pub mod scratch;
mod soup;

use adversarial::Adversarial;
use base::{build, Trainable};
pub use base::{Base, DEFAULT_BASE};
use checkpoint::{replace_file, save};
use distill::{read_teacher_scores, teachers_dir, train_teachers, Teachers};
use loss::loss;
use optim::Optimisers;
use ranking::Correctness;
use soup::{cook_soup, refit_soup};

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use indicatif::{ProgressBar, ProgressStyle};
use rand::{rngs::StdRng, seq::SliceRandom, SeedableRng};
use serde::Serialize;

use crate::data::{DataError, Dataset, Example};
use crate::eval::{self, Report};
use crate::model::{self, softmax, BertClassifier, Classifier, ModelError};

/// Why training stopped.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Data(#[from] DataError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("--base {spec:?} {reason}")]
    Base { spec: String, reason: String },
    #[error("invalid option: {0}")]
    Options(String),
    #[error("training the tokenizer failed: {0}")]
    Tokenizer(String),
    #[error("training step failed: {0}")]
    Candle(#[from] candle_core::Error),
    #[error("cannot write {path}: {reason}")]
    Write { path: PathBuf, reason: String },
    #[error("--teacher-scores {path}: {reason}")]
    TeacherScores { path: PathBuf, reason: String },
}

/// Everything `triagem train` takes.
#[derive(Debug, Clone)]
pub struct TrainOptions {
    /// Training JSONL; a dev split is carved from it.
    pub train: PathBuf,
    /// Test JSONL, used once for the final report; None: no test report (`--test none`).
    pub test: Option<PathBuf>,
    /// Output model directory (created; files in it are overwritten).
    pub out: PathBuf,
    /// Initial weights.
    pub base: Base,
    pub epochs: usize,
    /// Peak learning rate, reached after warmup.
    pub lr: f64,
    pub batch_size: usize,
    /// Longest input in tokens.
    pub max_len: usize,
    pub seed: u64,
    /// Share of the training file held out as the dev split.
    pub dev_fraction: f64,
    /// Share of the steps spent warming the learning rate up.
    pub warmup: f64,
    /// AdamW weight decay (not applied to biases and layer norms).
    pub weight_decay: f64,
    /// Probability that a training example is rewritten in chat spelling each epoch.
    pub augment: f64,
    /// Vocabulary size of the tokenizer trained for `--base none`.
    pub vocab_size: usize,
    /// Hidden size of the BERT trained for `--base none`.
    pub scratch_hidden: usize,
    /// Encoder layers of the BERT trained for `--base none`.
    pub scratch_layers: usize,
    /// Where to compute.
    pub device: Device,
    /// Hide the progress bar (tests, CI logs).
    pub quiet: bool,
    /// Label smoothing of the hard targets: this much probability is spread evenly over the labels.
    pub label_smoothing: f64,
    /// Dropout of the hidden states and the attention weights in training; `None`: the base's.
    pub dropout: Option<f64>,
    /// R-Drop: each batch runs through the model twice in training, each pass with its own dropout
    /// masks, and the loss adds this weight times the symmetric KL divergence between the two
    /// passes' predictions (half the sum of both directions). 0: off, one pass.
    pub rdrop: f64,
    /// The word-embedding table keeps the base's values: the optimiser and the gradient clipping
    /// leave it out (positions, token types and the embeddings' layer norm train as the rest).
    pub freeze_embeddings: bool,
    /// The word-embedding table's learning rate is the schedule's times this (1: as the rest).
    pub embedding_lr_scale: f64,
    /// Adversarial training: each batch's loss is differentiated a second time with the
    /// word-embedding table moved by this norm along its gradient, and the two gradients summed
    /// (the fast gradient method). 0: off, one pass.
    pub adversarial: f64,
    /// Correctness Ranking Loss: each batch's loss adds this weight times a margin ranking loss
    /// asking that, of two examples, the one got right in more of the finished epochs have the
    /// higher top probability (`ranking.rs`). 0: off.
    pub confidence_ranking: f64,
    /// Teachers trained first (seeds `seed+1` … `seed+N`, same split, same options) whose averaged
    /// scores the model also learns from (ensemble distillation); 0: none.
    pub ensemble: usize,
    /// Weight of the teachers' soft targets in the loss (the hard labels get 1 minus this).
    pub distill_weight: f64,
    /// Softmax temperature of the soft targets (the soft loss is scaled by its square).
    pub distill_temperature: f64,
    /// Another model's scores of the training texts (JSONL: `prompt`, `scores` by label), learnt
    /// as one more teacher; e.g. a different kind of model's, scored out of fold.
    pub teacher_scores: Option<PathBuf>,
    /// After the dev split has chosen the epoch and fitted the temperature, train again from the
    /// base on the whole training file (dev split included) for that many epochs, on the same
    /// learning-rate schedule, and keep that model with the temperature.
    pub refit: bool,
    /// Exponential moving average of the weights over the steps (`--ema`): the epochs are judged on
    /// the dev split, and saved, with the averaged weights. 0: off (the trained weights are kept).
    pub ema: f64,
    /// Models fine-tuned from the same initial weights on the same split, each with its own order of
    /// examples, dropout and augmentation (seeds `seed` … `seed+N−1`), whose weights are averaged into
    /// the one saved (a uniform model soup); 0 or 1: one model.
    pub soup: usize,
    /// Independent models (a soup's models and their refits, an ensemble's teachers) trained this
    /// many at a time, one thread each; 1: one after another; 0: one a CPU this process may use.
    pub jobs: usize,
}

impl Default for TrainOptions {
    /// The `triagem train` defaults (the CLI takes its defaults from here):
    /// the project's data files, the small BERT pretrained on Brazilian
    /// Portuguese text ([`DEFAULT_BASE`]), fine-tuned for 8 epochs, on the CPU,
    /// as a soup of 5 models refitted on the whole file (chosen by
    /// cross-validation, `scripts/cv.py`: see the README), trained one a CPU at once.
    fn default() -> Self {
        Self {
            train: "data/treino.jsonl".into(),
            test: Some("data/teste.jsonl".into()),
            out: "models/triagem".into(),
            base: Base::Dir(DEFAULT_BASE.into()),
            epochs: 8,
            lr: 5e-4,
            batch_size: 32,
            max_len: 96,
            seed: 42,
            dev_fraction: 0.1,
            warmup: 0.1,
            weight_decay: 0.01,
            augment: 0.5,
            vocab_size: 8000,
            scratch_hidden: 128,
            scratch_layers: 2,
            device: Device::Cpu,
            quiet: false,
            label_smoothing: 0.0,
            dropout: None,
            rdrop: 0.0,
            freeze_embeddings: false,
            embedding_lr_scale: 1.0,
            adversarial: 0.0,
            confidence_ranking: 0.0,
            ensemble: 0,
            distill_weight: 0.5,
            distill_temperature: 2.0,
            teacher_scores: None,
            refit: true,
            ema: 0.0,
            soup: 5,
            jobs: 0,
        }
    }
}

/// Per-epoch figures, printed and stored in `metrics.json`.
#[derive(Debug, Clone, Serialize)]
pub struct EpochLog {
    pub epoch: usize,
    pub train_loss: f64,
    pub dev_accuracy: f64,
    pub dev_macro_f1: f64,
    pub seconds: f64,
    pub examples_per_second: f64,
}

/// What a finished run reports; also written to `OUT/metrics.json`.
#[derive(Debug, Clone, Serialize)]
pub struct TrainSummary {
    pub model_dir: PathBuf,
    pub model_version: String,
    pub base: String,
    pub labels: Vec<String>,
    pub best_epoch: usize,
    pub epochs: Vec<EpochLog>,
    /// The model on the test file; None when trained with `--test none`.
    pub test: Option<Report>,
    pub data: BTreeMap<String, DataInfo>,
    pub hyperparameters: serde_json::Value,
    pub training_seconds: f64,
    pub parameters: usize,
    pub model_bytes: u64,
    pub triagem_version: String,
    /// The temperature fitted on the dev split and the dev ECE before and after it.
    pub calibration: CalibrationLog,
    /// `--refit`: the model kept was trained again on the whole training file (None without it).
    pub refit: Option<RefitLog>,
    /// `--soup`: the models averaged into the one saved (None without it).
    pub soup: Option<SoupLog>,
}

/// What `--soup` did: `epochs` and `best_epoch` are the first ingredient's; the model saved is the mean.
#[derive(Debug, Clone, Serialize)]
pub struct SoupLog {
    pub ingredients: Vec<Ingredient>,
    /// The averaged model on the dev split (None without one).
    pub dev_accuracy: Option<f64>,
    pub dev_macro_f1: Option<f64>,
    /// Training the N models (the first included; with `--refit` their refits too, which run in the
    /// same queue) and scoring their mean on the dev split.
    pub seconds: f64,
}

/// One model of a soup.
#[derive(Debug, Clone, Serialize)]
pub struct Ingredient {
    /// The seed of its order of examples, dropout and augmentation (the initial weights are the first's).
    pub seed: u64,
    pub best_epoch: usize,
    pub dev_macro_f1: f64,
}

/// What `--refit` did: the model in the directory is this run's, not the dev-selected one
/// (whose epochs, temperature and dev figures the rest of the summary reports). With `--soup`
/// each model of the soup is refitted for its own best epoch (in `soup.ingredients`) and the
/// directory holds their mean; `epochs` and `train_loss` are then the first model's.
#[derive(Debug, Clone, Serialize)]
pub struct RefitLog {
    /// Epochs trained: the dev-selected model's best epoch.
    pub epochs: usize,
    /// Training examples: the whole training file.
    pub examples: usize,
    /// The last epoch's mean training loss.
    pub train_loss: f64,
    /// From the refit's start (with `--soup`, its first model's, which may overlap the soup's last
    /// models) to the model written.
    pub seconds: f64,
}

/// Temperature scaling as fitted by this run.
#[derive(Debug, Clone, Serialize)]
pub struct CalibrationLog {
    /// Stored in `config.json` as `triagem_temperature` (1: no dev split to fit on).
    pub temperature: f64,
    /// Dev examples it was fitted on.
    pub dev_examples: usize,
    /// Dev expected calibration error (10 bins) with raw softmax scores.
    pub dev_ece_before: f64,
    /// The same with the temperature applied.
    pub dev_ece_after: f64,
    /// The review curve of the dev split with calibrated scores: where to set `routing.min_confidence`.
    pub dev_review: Vec<eval::ReviewPoint>,
}

/// A data file's identity in `metrics.json`.
#[derive(Debug, Clone, Serialize)]
pub struct DataInfo {
    pub path: PathBuf,
    pub sha256: String,
    pub examples: usize,
}

/// Runs a whole training and writes the model directory.
pub fn train(opts: &TrainOptions) -> Result<TrainSummary, TrainError> {
    check_options(opts)?;
    let started = Instant::now();
    let train_set = Dataset::load(&opts.train, None)?;
    let labels = train_set.training_labels()?;
    let test_set = opts.test.as_deref().map(|p| Dataset::load(p, Some(&labels))).transpose()?;
    let mut rng = StdRng::seed_from_u64(opts.seed);
    let (train_examples, dev_examples) = split_dev(&train_set.examples, &labels, opts.dev_fraction, &mut rng);
    tracing::info!(
        train = train_examples.len(),
        dev = dev_examples.len(),
        test = test_set.as_ref().map_or(0, |t| t.examples.len()),
        labels = ?labels,
        "data loaded"
    );

    std::fs::create_dir_all(&opts.out).map_err(|e| write_error(&opts.out, e))?;
    // The scores file is checked before any teacher trains: a bad one fails in a second, not after them.
    let scored = if opts.refit { &train_set.examples } else { &train_examples };
    let scores = opts.teacher_scores.as_deref().map(|p| read_teacher_scores(p, &labels, scored)).transpose()?;
    let teachers = Teachers { models: train_teachers(opts, &labels, &train_examples, &dev_examples)?, scores };
    // The generator as it stands before the model is built: a soup's ingredients start from it, so that
    // they share the initial weights.
    let init = rng.clone();
    let (Fitted { epochs, best, parameters }, soup, refitted) = if opts.soup > 1 {
        let refit_on = opts.refit.then_some(train_set.examples.as_slice());
        let (first, soup, refitted) =
            cook_soup(opts, &labels, &train_examples, &dev_examples, &teachers, &init, refit_on)?;
        (first, Some(soup), refitted)
    } else {
        (fit(opts, &labels, &train_examples, &dev_examples, &teachers, Run::default(), &mut rng)?, None, None)
    };
    let best_epoch = best.map_or(0, |(e, _)| e);
    // Computed with the tensor path, as the epochs were: a run gives the same temperature and report
    // whichever way the model is later served.
    let mut classifier = Classifier::load_tensor_path(&opts.out, &opts.device)?;
    let calibration = calibrate(&mut classifier, &dev_examples, &opts.out)?;
    eprintln!(
        "calibration: temperature {:.3}, dev ECE {:.4} → {:.4}",
        calibration.temperature, calibration.dev_ece_before, calibration.dev_ece_after
    );
    let refit = if opts.refit && best_epoch > 0 {
        let (fitted, started) = match refitted {
            None => {
                eprintln!(
                    "refit: the first {best_epoch} epochs of the {}-epoch schedule on all {} training examples",
                    opts.epochs,
                    train_set.examples.len()
                );
                let started = Instant::now();
                let run = Run { stop_after: Some(best_epoch), ..Run::default() };
                (fit(opts, &labels, &train_set.examples, &[], &teachers, run, &mut rng)?, started)
            }
            Some(refitted) => {
                let started = refitted.started;
                (refit_soup(opts, refitted)?, started)
            }
        };
        set_temperature(&opts.out, calibration.temperature)?;
        classifier = Classifier::load_tensor_path(&opts.out, &opts.device)?;
        Some(RefitLog {
            epochs: fitted.epochs.len(),
            examples: train_set.examples.len(),
            train_loss: fitted.epochs.last().map_or(0.0, |e| e.train_loss),
            seconds: started.elapsed().as_secs_f64(),
        })
    } else {
        None
    };
    drop(teachers);
    if opts.ensemble > 0 {
        let _ = std::fs::remove_dir_all(teachers_dir(&opts.out));
    }
    let test = test_set.as_ref().map(|t| eval::evaluate(&classifier, &t.examples, 64)).transpose()?;
    let weights = opts.out.join(model::WEIGHTS_FILE);
    let summary = TrainSummary {
        model_dir: opts.out.clone(),
        model_version: classifier.info().version.clone(),
        base: match &opts.base {
            Base::Scratch => "none".into(),
            Base::Dir(d) => d.display().to_string(),
        },
        labels,
        best_epoch,
        epochs,
        test,
        data: std::iter::once(("train".to_string(), data_info(&train_set)))
            .chain(test_set.as_ref().map(|t| ("test".to_string(), data_info(t))))
            .collect(),
        hyperparameters: hyperparameters(opts, train_examples.len(), dev_examples.len()),
        training_seconds: started.elapsed().as_secs_f64(),
        parameters,
        model_bytes: std::fs::metadata(&weights).map(|m| m.len()).unwrap_or(0),
        triagem_version: env!("CARGO_PKG_VERSION").to_string(),
        calibration,
        refit,
        soup,
    };
    let json = serde_json::to_string_pretty(&summary).expect("summary serialises") + "\n";
    replace_file(&opts.out.join("metrics.json"), |p| std::fs::write(p, json).map_err(|e| e.to_string()))?;
    Ok(summary)
}

/// Fits the temperature on the dev split, writes it into `out/config.json`
/// and sets it on `classifier`.
fn calibrate(classifier: &mut Classifier, dev: &[Example], out: &Path) -> Result<CalibrationLog, TrainError> {
    let labels = classifier.labels().to_vec();
    let texts: Vec<&str> = dev.iter().map(|e| e.text.as_str()).collect();
    let mut logits = Vec::with_capacity(dev.len());
    for chunk in texts.chunks(64) {
        logits.extend(classifier.logits(chunk)?);
    }
    let targets: Vec<usize> = dev
        .iter()
        .map(|e| labels.iter().position(|l| l == &e.label).expect("dev labels are training labels"))
        .collect();
    let scored = |t: f64| -> (Vec<f32>, Vec<bool>) {
        logits
            .iter()
            .zip(&targets)
            .map(|(row, &y)| {
                let scores = softmax(row, t);
                let (best, top) = scores.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).expect("a label");
                (*top, best == y)
            })
            .unzip()
    };
    let ece_at = |t: f64| {
        let (conf, right) = scored(t);
        eval::expected_calibration_error(&conf, &right, eval::ECE_BINS)
    };
    // Without a dev split nothing is fitted: the scores stay softmax(logits).
    let temperature = if dev.is_empty() { 1.0 } else { calibrate::fit_temperature(&logits, &targets) };
    let log = CalibrationLog {
        temperature,
        dev_examples: dev.len(),
        dev_ece_before: ece_at(1.0),
        dev_ece_after: ece_at(temperature),
        dev_review: {
            let (conf, right) = scored(temperature);
            eval::review_curve(&conf, &right, &eval::REVIEW_THRESHOLDS)
        },
    };
    if !dev.is_empty() {
        set_temperature(out, temperature)?;
        classifier.set_temperature(temperature as f32);
    }
    Ok(log)
}

/// Writes `temperature` into `out/config.json` (`triagem_temperature`).
fn set_temperature(out: &Path, temperature: f64) -> Result<(), TrainError> {
    let mut config = model::read_config(out)?;
    config.triagem_temperature = Some(temperature);
    let json = serde_json::to_string_pretty(&config).expect("config serialises") + "\n";
    replace_file(&out.join(model::CONFIG_FILE), |p| std::fs::write(p, json).map_err(|e| e.to_string()))
}

/// A directory beside `out` named after it (`OUT.teachers`, `OUT.soup`), for models trained on the
/// way to the one in `out` (removed afterwards).
fn beside(out: &Path, suffix: &str) -> PathBuf {
    let mut name = out.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(suffix);
    out.with_file_name(name)
}

/// `opts` for one of several models trained side by side: no progress bar when they run at once
/// (their epoch lines carry the model's name instead).
fn one_of(opts: &TrainOptions) -> TrainOptions {
    TrainOptions { quiet: opts.quiet || side_by_side(opts), ..opts.clone() }
}

/// Whether `opts`' independent models train more than one at a time.
fn side_by_side(opts: &TrainOptions) -> bool {
    jobs::resolve(opts.jobs) > 1
}

/// How [`fit`] runs beyond the options.
#[derive(Debug, Default, Clone)]
struct Run {
    /// End after this many epochs of the `opts.epochs`-epoch schedule.
    stop_after: Option<usize>,
    /// Once the model is built, draw the rest (order of examples, dropout, augmentation) from a
    /// generator seeded with this instead of going on with the one given.
    reseed: Option<u64>,
    /// Which model this is, at the start of its epoch lines (when several train at once).
    name: Option<String>,
}

/// What [`fit`] did.
struct Fitted {
    /// One line a epoch.
    epochs: Vec<EpochLog>,
    /// The epoch kept in the output directory and its dev macro-F1 (None when no epoch ran).
    best: Option<(usize, f64)>,
    /// Trainable parameters of the model.
    parameters: usize,
}

/// Trains a model on `train` (learning from `teachers` too, when there are
/// any) and keeps the epoch with the best dev macro-F1 in `opts.out` (without
/// dev examples: the last epoch). The learning rate follows the schedule of
/// `opts.epochs` epochs; `run.stop_after` ends the run after that many.
fn fit(
    opts: &TrainOptions,
    labels: &[String],
    train_examples: &[Example],
    dev_examples: &[Example],
    teachers: &Teachers,
    run: Run,
    rng: &mut StdRng,
) -> Result<Fitted, TrainError> {
    let trainable = build(opts, labels, train_examples, rng)?;
    if let Some(seed) = run.reseed {
        *rng = StdRng::seed_from_u64(seed);
    }
    let parameters: usize = trainable.vars.iter().map(|v| v.elem_count()).sum();
    tracing::info!(parameters, base = ?opts.base, "model built");

    let mut optimisers = Optimisers::for_fine_tuning(&trainable, opts)?;
    let adversarial = Adversarial::for_fine_tuning(&trainable, opts)?;
    let steps_per_epoch = train_examples.len().div_ceil(opts.batch_size);
    let total_steps = steps_per_epoch * opts.epochs;
    let warmup_steps = ((total_steps as f64) * opts.warmup).round() as usize;
    let label_index: HashMap<&str, u32> = labels.iter().enumerate().map(|(i, l)| (l.as_str(), i as u32)).collect();

    let mut ema = if opts.ema > 0.0 { Some(average::Ema::new(opts.ema, &trainable.vars)?) } else { None };
    let mut epochs = Vec::new();
    let mut best: Option<(usize, f64)> = None;
    let mut step = 0usize;
    let mut order: Vec<usize> = (0..train_examples.len()).collect();
    let mut correctness = (opts.confidence_ranking > 0.0).then(|| Correctness::new(train_examples.len()));
    let last = run.stop_after.map_or(opts.epochs, |n| n.min(opts.epochs));
    for epoch in 1..=last {
        let epoch_start = Instant::now();
        order.shuffle(rng);
        let bar = progress_bar(opts.quiet, train_examples.len() as u64, epoch, last);
        let mut loss_sum = 0.0;
        for chunk in order.chunks(opts.batch_size) {
            let lr = opts.lr * schedule(step, warmup_steps, total_steps);
            let texts: Vec<String> =
                chunk.iter().map(|&i| augment::augment(&train_examples[i].text, opts.augment, rng)).collect();
            let targets: Vec<u32> = chunk.iter().map(|&i| label_index[train_examples[i].label.as_str()]).collect();
            let originals: Vec<&str> = chunk.iter().map(|&i| train_examples[i].text.as_str()).collect();
            let soft = teachers.soft_targets(&texts, &originals, opts.distill_temperature)?;
            let pairs = correctness.as_ref().and_then(|c| c.pairs(chunk));
            let batch = loss(&trainable, &texts, &targets, soft.as_deref(), pairs.as_ref(), opts, rng)?;
            if let Some(correctness) = &mut correctness {
                correctness.record(chunk, &batch.logits, &targets)?;
            }
            let batch_loss = batch.loss;
            let mut grads = batch_loss.backward()?;
            if let Some(adversarial) = &adversarial {
                adversarial.add_gradients(&mut grads, &trainable.vars, || {
                    Ok(loss(&trainable, &texts, &targets, soft.as_deref(), pairs.as_ref(), opts, rng)?.loss)
                })?;
            }
            optimisers.step(&mut grads, lr)?;
            if let Some(ema) = &mut ema {
                ema.update(&trainable.vars)?;
            }
            step += 1;
            let loss_value = batch_loss.to_scalar::<f32>()? as f64;
            loss_sum += loss_value * chunk.len() as f64;
            bar.inc(chunk.len() as u64);
            bar.set_message(format!("loss {loss_value:.4} lr {lr:.2e}"));
        }
        bar.finish_and_clear();
        if let Some(correctness) = &mut correctness {
            correctness.end_epoch();
        }
        let seconds = epoch_start.elapsed().as_secs_f64();
        // With `--ema` the epoch is judged, and saved, with the averaged weights.
        let dev = average::judged(ema.as_ref(), &trainable.vars, || {
            evaluate_in_memory(&trainable, labels, dev_examples, opts)
        })?;
        let log = EpochLog {
            epoch,
            train_loss: loss_sum / train_examples.len() as f64,
            dev_accuracy: dev.accuracy,
            dev_macro_f1: dev.macro_f1,
            seconds,
            examples_per_second: train_examples.len() as f64 / seconds,
        };
        let dev_figures = if dev_examples.is_empty() {
            "no dev split".to_string()
        } else {
            format!("dev accuracy {:.4}  dev macro-F1 {:.4}", log.dev_accuracy, log.dev_macro_f1)
        };
        eprintln!(
            "{}epoch {epoch}/{last}  loss {:.4}  {dev_figures}  ({:.0}s, {:.1} examples/s)",
            run.name.as_ref().map_or(String::new(), |n| format!("{n}: ")),
            log.train_loss,
            log.seconds,
            log.examples_per_second
        );
        // Without a dev split there is nothing to choose on: the last epoch is the one kept, saved once.
        let keep = if dev_examples.is_empty() { epoch == last } else { best.is_none_or(|(_, f1)| dev.macro_f1 > f1) };
        if keep {
            best = Some((epoch, dev.macro_f1));
            average::judged(ema.as_ref(), &trainable.vars, || save(&trainable, labels, &opts.out))?;
        }
        epochs.push(log);
    }
    Ok(Fitted { epochs, best, parameters })
}

fn check_options(opts: &TrainOptions) -> Result<(), TrainError> {
    let bad = |m: &str| Err(TrainError::Options(m.to_string()));
    if opts.epochs == 0 {
        return bad("--epochs must be at least 1");
    }
    if opts.batch_size == 0 {
        return bad("--batch-size must be at least 1");
    }
    if opts.max_len < 8 {
        return bad("--max-len must be at least 8");
    }
    if !(opts.lr > 0.0 && opts.lr.is_finite()) {
        return bad("--lr must be a positive number");
    }
    if !(0.0..0.5).contains(&opts.dev_fraction) {
        return bad("--dev-fraction must be in [0, 0.5)");
    }
    if !(0.0..1.0).contains(&opts.label_smoothing) {
        return bad("--label-smoothing must be in [0, 1)");
    }
    if opts.dropout.is_some_and(|p| !(0.0..1.0).contains(&p)) {
        return bad("--dropout must be in [0, 1)");
    }
    // The strengths of the optional training terms (R-Drop's weight, the adversarial step, the ranking weight): 0 is off.
    for (option, weight) in [
        ("--rdrop", opts.rdrop),
        ("--adversarial", opts.adversarial),
        ("--confidence-ranking", opts.confidence_ranking),
    ] {
        if !(weight >= 0.0 && weight.is_finite()) {
            return bad(&format!("{option} must be a number at least 0"));
        }
    }
    if !(opts.embedding_lr_scale > 0.0 && opts.embedding_lr_scale.is_finite()) {
        return bad("--embedding-lr-scale must be a positive number");
    }
    if !(0.0..1.0).contains(&opts.ema) {
        return bad("--ema must be in [0, 1)");
    }
    if !(0.0..=1.0).contains(&opts.distill_weight) {
        return bad("--distill-weight must be in [0, 1]");
    }
    if !(opts.distill_temperature > 0.0 && opts.distill_temperature.is_finite()) {
        return bad("--distill-temperature must be a positive number");
    }
    Ok(())
}

fn write_error(path: &Path, e: impl ToString) -> TrainError {
    TrainError::Write { path: path.to_path_buf(), reason: e.to_string() }
}

fn data_info(ds: &Dataset) -> DataInfo {
    DataInfo { path: ds.path.clone(), sha256: ds.sha256.clone(), examples: ds.examples.len() }
}

fn hyperparameters(opts: &TrainOptions, train: usize, dev: usize) -> serde_json::Value {
    serde_json::json!({
        "epochs": opts.epochs, "lr": opts.lr, "batch_size": opts.batch_size, "max_len": opts.max_len,
        "seed": opts.seed, "dev_fraction": opts.dev_fraction, "warmup": opts.warmup,
        "weight_decay": opts.weight_decay, "augment": opts.augment, "vocab_size": opts.vocab_size,
        "scratch_hidden": opts.scratch_hidden, "scratch_layers": opts.scratch_layers,
        "train_examples": train, "dev_examples": dev, "label_smoothing": opts.label_smoothing,
        "dropout": opts.dropout, "rdrop": opts.rdrop, "freeze_embeddings": opts.freeze_embeddings,
        "embedding_lr_scale": opts.embedding_lr_scale, "adversarial": opts.adversarial,
        "confidence_ranking": opts.confidence_ranking,
        "ensemble": opts.ensemble, "distill_weight": opts.distill_weight,
        "distill_temperature": opts.distill_temperature,
        "teacher_scores": opts.teacher_scores, "refit": opts.refit, "ema": opts.ema, "soup": opts.soup,
    })
}

/// Linear warmup to 1, then linear decay to 0.
fn schedule(step: usize, warmup: usize, total: usize) -> f64 {
    if step < warmup {
        (step + 1) as f64 / warmup as f64
    } else {
        ((total - step) as f64 / (total - warmup).max(1) as f64).max(0.0)
    }
}

/// Stratified split: `fraction` of each label goes to the dev set.
fn split_dev(examples: &[Example], labels: &[String], fraction: f64, rng: &mut StdRng) -> (Vec<Example>, Vec<Example>) {
    let (mut train, mut dev) = (Vec::new(), Vec::new());
    for label in labels {
        let mut of_label: Vec<&Example> = examples.iter().filter(|e| &e.label == label).collect();
        of_label.shuffle(rng);
        let n_dev = ((of_label.len() as f64) * fraction).round() as usize;
        dev.extend(of_label[..n_dev].iter().map(|e| (*e).clone()));
        train.extend(of_label[n_dev..].iter().map(|e| (*e).clone()));
    }
    (train, dev)
}

/// Dev-set report of the model as it is now, without writing it to disk.
fn evaluate_in_memory(
    t: &Trainable,
    labels: &[String],
    dev: &[Example],
    opts: &TrainOptions,
) -> Result<Report, TrainError> {
    if dev.is_empty() {
        return Ok(Report::new(labels, &[], &[]));
    }
    // A classifier over the same tensors: the variables are shared, nothing is copied.
    let vb = VarBuilder::from_varmap(&t.varmap, DType::F32, &opts.device);
    let model = BertClassifier::load(&t.config, labels.len(), vb)?;
    let classifier = Classifier::from_parts(model, t.encoder.clone(), labels.to_vec(), opts.device.clone());
    Ok(eval::evaluate(&classifier, dev, 64)?)
}

fn progress_bar(quiet: bool, len: u64, epoch: usize, epochs: usize) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template(&format!(
            "epoch {epoch}/{epochs} [{{elapsed_precise}}] {{bar:30}} {{pos}}/{{len}} {{per_sec}} eta {{eta}} {{msg}}"
        ))
        .expect("valid template"),
    );
    bar.enable_steady_tick(Duration::from_millis(500));
    bar
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_are_replaced_whole_readable_and_without_leftovers() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        std::fs::write(&path, "old").unwrap();
        replace_file(&path, |p| std::fs::write(p, "new").map_err(|e| e.to_string())).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "new");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o644);
        }
        // A writer that puts a new file of its own mode at the path (as the safetensors writer does).
        #[cfg(unix)]
        {
            use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
            replace_file(&path, |p| {
                std::fs::remove_file(p).map_err(|e| e.to_string())?;
                let mut f =
                    std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(p).unwrap();
                std::io::Write::write_all(&mut f, b"newer").map_err(|e| e.to_string())
            })
            .unwrap();
            assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o644);
            assert_eq!(std::fs::read_to_string(&path).unwrap(), "newer");
        }
        // A failed write leaves the old file and no temporary file behind.
        let before = std::fs::read_to_string(&path).unwrap();
        let err = replace_file(&path, |_| Err("disk full".to_string())).unwrap_err();
        assert!(err.to_string().contains("disk full"), "{err}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), before);
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, ["config.json"]);
    }

    pub(super) fn tiny_options() -> TrainOptions {
        TrainOptions {
            train: PathBuf::new(),
            test: None,
            out: PathBuf::new(),
            base: Base::Scratch,
            epochs: 1,
            lr: 1e-3,
            batch_size: 4,
            max_len: 32,
            seed: 3,
            dev_fraction: 0.0,
            warmup: 0.1,
            weight_decay: 0.01,
            augment: 0.0,
            vocab_size: 120,
            scratch_hidden: 64,
            scratch_layers: 2,
            device: Device::Cpu,
            quiet: true,
            label_smoothing: 0.0,
            dropout: None,
            rdrop: 0.0,
            freeze_embeddings: false,
            embedding_lr_scale: 1.0,
            adversarial: 0.0,
            confidence_ranking: 0.0,
            ensemble: 0,
            distill_weight: 0.5,
            distill_temperature: 2.0,
            teacher_scores: None,
            refit: false,
            ema: 0.0,
            soup: 0,
            jobs: 1,
        }
    }

    pub(super) fn examples() -> Vec<Example> {
        let ex = |t: &str, l: &str| Example { text: t.into(), label: l.into() };
        vec![
            ex("quero comprar uma geladeira", "venda"),
            ex("minha geladeira quebrou", "suporte"),
            ex("tem fogão em promoção", "venda"),
            ex("o fogão veio com defeito", "suporte"),
        ]
    }

    /// `--dropout P` is what the model trains with and what its config.json says (both
    /// probabilities); outside [0, 1) it is one sentence naming the option.
    #[test]
    fn the_dropout_given_is_trained_with_and_written_to_the_config() {
        let labels = vec!["suporte".to_string(), "venda".to_string()];
        let out = tempfile::tempdir().unwrap();
        let opts = TrainOptions { dropout: Some(0.3), out: out.path().to_path_buf(), ..tiny_options() };
        let mut rng = StdRng::seed_from_u64(1);
        fit(&opts, &labels, &examples(), &[], &Teachers::default(), Run::default(), &mut rng).unwrap();
        let config = model::read_config(out.path()).unwrap();
        assert_eq!((config.hidden_dropout_prob, config.attention_probs_dropout_prob), (0.3, 0.3));
        for p in [1.0, -0.1, f64::NAN] {
            let err = check_options(&TrainOptions { dropout: Some(p), ..tiny_options() }).unwrap_err().to_string();
            assert!(err.contains("--dropout must be in [0, 1)"), "{p}: {err}");
        }
        assert!(check_options(&TrainOptions { dropout: Some(0.0), ..tiny_options() }).is_ok());
    }

    /// `--ema`: what is saved is the moving average, not the last step's weights. The training
    /// itself does not change (the average draws nothing from the generator), so a decay of almost
    /// 0 saves the same weights as no average, and 0.9 saves others; outside [0, 1) is one sentence.
    #[test]
    fn with_ema_the_average_is_saved_and_the_training_is_the_same() {
        let saved = |ema: f64| fitted_weights(TrainOptions { epochs: 2, ema, ..tiny_options() });
        let (plain, almost_none, averaged) = (saved(0.0), saved(1e-9), saved(0.9));
        assert!(largest_gap(&plain, &almost_none) < 1e-6);
        assert!(largest_gap(&plain, &averaged) > 1e-5, "{}", largest_gap(&plain, &averaged));
        for p in [1.0, -0.1, f64::NAN] {
            let err = check_options(&TrainOptions { ema: p, ..tiny_options() }).unwrap_err().to_string();
            assert!(err.contains("--ema must be in [0, 1)"), "{p}: {err}");
        }
    }

    /// A model directory's weights, tensor by tensor in name order, flattened.
    pub(super) fn saved_weights(dir: &Path) -> Vec<(String, Vec<f32>)> {
        let tensors = candle_core::safetensors::load(dir.join(model::WEIGHTS_FILE), &Device::Cpu).unwrap();
        let mut flat: Vec<(String, Vec<f32>)> =
            tensors.into_iter().map(|(name, t)| (name, t.flatten_all().unwrap().to_vec1::<f32>().unwrap())).collect();
        flat.sort_by(|a, b| a.0.cmp(&b.0));
        flat
    }

    /// The weights `fit` saves for `opts` (its `out` replaced by a temporary directory) on
    /// [`examples`], without a dev split, the generator seeded with 1.
    pub(super) fn fitted_weights(opts: TrainOptions) -> Vec<(String, Vec<f32>)> {
        let labels = vec!["suporte".to_string(), "venda".to_string()];
        let out = tempfile::tempdir().unwrap();
        let opts = TrainOptions { out: out.path().to_path_buf(), ..opts };
        let mut rng = StdRng::seed_from_u64(1);
        fit(&opts, &labels, &examples(), &[], &Teachers::default(), Run::default(), &mut rng).unwrap();
        saved_weights(out.path())
    }

    /// The largest difference between two models' weights, tensor by tensor.
    fn largest_gap(a: &[(String, Vec<f32>)], b: &[(String, Vec<f32>)]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(b)
            .flat_map(|((na, va), (nb, vb))| {
                assert_eq!(na, nb);
                va.iter().zip(vb).map(|(x, y)| (x - y).abs())
            })
            .fold(0.0f32, f32::max)
    }

    /// Options for `train` on files written into `dir`: the four examples in five wordings (20 lines),
    /// 40 % of them the dev split, tested on the four.
    fn file_options(dir: &Path) -> TrainOptions {
        let line = |e: &Example| format!(r#"{{"prompt": "{}", "completion": "{}"}}"#, e.text, e.label);
        let mut train_lines = Vec::new();
        for round in ["", " agora", " hoje", " por favor", " amanhã"] {
            train_lines.extend(examples().iter().map(|e| line(&Example { text: e.text.clone() + round, ..e.clone() })));
        }
        let (train_file, test_file) = (dir.join("treino.jsonl"), dir.join("teste.jsonl"));
        std::fs::write(&train_file, train_lines.join("\n")).unwrap();
        std::fs::write(&test_file, examples().iter().map(line).collect::<Vec<_>>().join("\n")).unwrap();
        TrainOptions { train: train_file, test: Some(test_file), dev_fraction: 0.4, ..tiny_options() }
    }

    /// `--soup N`: the first model is the run without a soup, the others start from its initial
    /// weights (at a learning rate too small to move them, the soup is those weights) and train on
    /// their own seeds (at a real one, the soup is another model); the ingredients' directory goes.
    #[test]
    fn a_soup_averages_models_that_start_from_the_first_ones_initial_weights() {
        let dir = tempfile::tempdir().unwrap();
        let files = file_options(dir.path());
        let run = |soup: usize, lr: f64, out: &str| {
            let opts = TrainOptions { out: dir.path().join(out), epochs: 2, lr, soup, ..files.clone() };
            let summary = train(&opts).unwrap();
            (summary, saved_weights(&dir.path().join(out)))
        };
        let (plain, plain_weights) = run(0, 1e-3, "plain");
        let (one, one_weights) = run(1, 1e-3, "one");
        assert!(plain.soup.is_none() && one.soup.is_none(), "a soup of one is the plain run");
        assert_eq!(largest_gap(&plain_weights, &one_weights), 0.0);

        let (soup, soup_weights) = run(3, 1e-3, "soup");
        let log = soup.soup.as_ref().expect("a soup log");
        let seeds: Vec<u64> = log.ingredients.iter().map(|i| i.seed).collect();
        assert_eq!(seeds, [3, 4, 5]);
        let first = &log.ingredients[0];
        assert_eq!(
            (first.best_epoch, first.dev_macro_f1),
            (plain.best_epoch, plain.epochs[plain.best_epoch - 1].dev_macro_f1)
        );
        assert!(log.dev_macro_f1.is_some());
        assert!(largest_gap(&plain_weights, &soup_weights) > 1e-4, "{}", largest_gap(&plain_weights, &soup_weights));
        assert_eq!(soup.hyperparameters["soup"], 3);
        assert!(!dir.path().join("soup.soup").exists(), "the ingredients are removed");

        // Nothing trained: every ingredient is its initial weights, so their mean is the first's.
        let (_, still) = run(0, 1e-12, "still");
        let (_, still_soup) = run(3, 1e-12, "still-soup");
        assert!(largest_gap(&still, &still_soup) < 1e-6, "{}", largest_gap(&still, &still_soup));
    }

    /// `--soup N --refit`: the soup is chosen and calibrated on the dev split as without `--refit`,
    /// then each of its models is trained again on every example, from shared initial weights, for
    /// its own best epoch; the directory holds their mean with the soup's temperature.
    #[test]
    fn a_refitted_soup_is_the_mean_of_its_models_trained_again_on_every_example() {
        let dir = tempfile::tempdir().unwrap();
        let files = file_options(dir.path());
        let run = |refit: bool, lr: f64, out: &str| {
            let opts = TrainOptions { out: dir.path().join(out), epochs: 2, lr, soup: 3, refit, ..files.clone() };
            (train(&opts).unwrap(), saved_weights(&dir.path().join(out)))
        };
        let (soup, soup_weights) = run(false, 1e-3, "soup");
        let (refitted, refitted_weights) = run(true, 1e-3, "refit");
        let (dev_soup, refitted_soup) = (soup.soup.as_ref().unwrap(), refitted.soup.as_ref().unwrap());
        let chosen = |log: &SoupLog| log.ingredients.iter().map(|i| (i.seed, i.best_epoch)).collect::<Vec<_>>();
        assert_eq!(chosen(dev_soup), chosen(refitted_soup), "the same soup is chosen on the dev split");
        assert_eq!(refitted.calibration.temperature, soup.calibration.temperature);
        let config = model::read_config(&dir.path().join("refit")).unwrap();
        assert_eq!(config.triagem_temperature, Some(soup.calibration.temperature));
        let log = refitted.refit.as_ref().expect("a refit log");
        assert_eq!((log.epochs, log.examples), (refitted_soup.ingredients[0].best_epoch, 20));
        let gap = largest_gap(&soup_weights, &refitted_weights);
        assert!(gap > 1e-4, "the kept model is the refitted soup: {gap}");
        assert!(!dir.path().join("refit.soup").exists(), "the models' directory is removed");

        // The models trained again share their initial weights: at a learning rate too small to move
        // them, a refitted soup of two and one of three are the same weights.
        let still = |soup: usize, out: &str| {
            let opts = TrainOptions { out: dir.path().join(out), lr: 1e-12, soup, refit: true, ..files.clone() };
            train(&opts).unwrap();
            saved_weights(&dir.path().join(out))
        };
        let (two, three) = (still(2, "still-2"), still(3, "still-3"));
        assert!(largest_gap(&two, &three) < 1e-6, "{}", largest_gap(&two, &three));
    }

    /// `--jobs 2`: a soup's models, their refits and an ensemble's teachers trained two at a time
    /// give the model one at a time gives, to the bit, with the same log.
    #[test]
    fn models_trained_side_by_side_are_the_same_bits_as_one_after_another() {
        let dir = tempfile::tempdir().unwrap();
        let files = file_options(dir.path());
        let run = |jobs: usize, soup: usize, refit: bool, ensemble: usize, out: &str| {
            let opts =
                TrainOptions { out: dir.path().join(out), epochs: 2, soup, refit, ensemble, jobs, ..files.clone() };
            let summary = train(&opts).unwrap();
            let weights = std::fs::read(dir.path().join(out).join(model::WEIGHTS_FILE)).unwrap();
            (summary, weights)
        };
        let (alone, alone_weights) = run(1, 3, true, 0, "soup-1");
        let (together, together_weights) = run(2, 3, true, 0, "soup-2");
        assert!(alone_weights == together_weights, "the refitted soup's weights differ");
        let chosen = |s: &TrainSummary| {
            let soup = s.soup.as_ref().unwrap();
            (
                soup.ingredients.iter().map(|i| (i.seed, i.best_epoch, i.dev_macro_f1)).collect::<Vec<_>>(),
                soup.dev_macro_f1,
            )
        };
        assert_eq!(chosen(&alone), chosen(&together));
        assert_eq!(alone.calibration.temperature, together.calibration.temperature);
        assert!(!dir.path().join("soup-2.soup").exists(), "the models' directory is removed");

        let (_, alone) = run(1, 0, false, 2, "ens-1");
        let (_, together) = run(2, 0, false, 2, "ens-2");
        assert!(alone == together, "the model distilled from teachers trained side by side differs");
        assert!(!dir.path().join("ens-2.teachers").exists(), "the teachers' directory is removed");
    }

    /// `--dev-fraction 0`: nothing to choose an epoch on, so the last one is
    /// kept (before, the first was: every later epoch's empty-dev macro-F1
    /// tied it).
    #[test]
    fn without_a_dev_split_the_last_epoch_is_kept() {
        let labels = vec!["suporte".to_string(), "venda".to_string()];
        let out = tempfile::tempdir().unwrap();
        let opts = TrainOptions { epochs: 3, out: out.path().to_path_buf(), ..tiny_options() };
        let mut rng = StdRng::seed_from_u64(1);
        let fitted = fit(&opts, &labels, &examples(), &[], &Teachers::default(), Run::default(), &mut rng).unwrap();
        assert_eq!(fitted.epochs.len(), 3);
        assert_eq!(fitted.best.map(|(epoch, _)| epoch), Some(3));
        assert!(out.path().join(model::WEIGHTS_FILE).exists());
    }

    /// `--refit`: the dev split chooses the epoch and the temperature, then a
    /// model trained that many epochs on every training example replaces the
    /// chosen one, with the chosen temperature.
    #[test]
    fn refit_trains_the_chosen_epochs_on_every_example_and_keeps_the_temperature() {
        let dir = tempfile::tempdir().unwrap();
        let files = file_options(dir.path());
        let run = |refit: bool, out: &str| {
            let opts = TrainOptions { out: dir.path().join(out), epochs: 3, refit, ..files.clone() };
            train(&opts).unwrap()
        };
        let (chosen, refitted) = (run(false, "chosen"), run(true, "refit"));
        assert!(chosen.refit.is_none());
        let log = refitted.refit.as_ref().expect("a refit log");
        assert!(refitted.best_epoch >= 1);
        assert_eq!(log.epochs, refitted.best_epoch);
        assert_eq!(log.examples, 20, "the dev split's 8 examples are trained on too");
        // The dev-selected run is the same in both (same seed): its epochs and temperature.
        assert_eq!(refitted.best_epoch, chosen.best_epoch);
        assert_eq!(refitted.calibration.temperature, chosen.calibration.temperature);
        let config = model::read_config(&dir.path().join("refit")).unwrap();
        assert_eq!(config.triagem_temperature, Some(chosen.calibration.temperature));
        let weights = |out: &str| std::fs::read(dir.path().join(out).join(model::WEIGHTS_FILE)).unwrap();
        assert_ne!(weights("refit"), weights("chosen"), "the kept model is the refitted one");
        assert_eq!(refitted.hyperparameters["refit"], true);
    }

    #[test]
    fn schedule_warms_up_then_decays_to_zero() {
        assert!((schedule(0, 10, 100) - 0.1).abs() < 1e-12);
        assert!((schedule(9, 10, 100) - 1.0).abs() < 1e-12);
        assert!((schedule(10, 10, 100) - 1.0).abs() < 1e-12);
        assert!((schedule(55, 10, 100) - 0.5).abs() < 1e-12);
        assert!(schedule(99, 10, 100) > 0.0);
    }

    #[test]
    fn dev_split_is_stratified_and_seeded() {
        let mut many = Vec::new();
        for i in 0..50 {
            many.push(Example { text: format!("v{i}"), label: "venda".into() });
            many.push(Example { text: format!("s{i}"), label: "suporte".into() });
        }
        let labels = vec!["suporte".to_string(), "venda".to_string()];
        let (tr, dev) = split_dev(&many, &labels, 0.2, &mut StdRng::seed_from_u64(5));
        assert_eq!((tr.len(), dev.len()), (80, 20));
        assert_eq!(dev.iter().filter(|e| e.label == "venda").count(), 10);
        let (_, dev2) = split_dev(&many, &labels, 0.2, &mut StdRng::seed_from_u64(5));
        assert_eq!(dev, dev2);
    }

    #[test]
    fn unknown_base_is_one_clear_error() {
        let err = Base::parse("./no/such/dir").unwrap_err().to_string();
        assert!(err.contains("neither `none` nor an existing model directory"), "{err}");
        let err = Base::parse("acme/bert-that-is-not-cached").unwrap_err().to_string();
        assert!(err.contains("Hub id"), "{err}");
        assert_eq!(Base::parse("none").unwrap(), Base::Scratch);
    }
}

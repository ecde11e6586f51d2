//! The command line: one subcommand per job. Every flag has its help text
//! here and an environment variable (`TRIAGEM_…`).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::model;
use crate::train::pretrain::PretrainOptions;
use crate::train::{Base, TrainError, TrainOptions};

/// Routes customer chat messages from Kafka to sales or support with a fine-tuned BERT classifier.
#[derive(Debug, Parser)]
#[command(name = "triagem", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Log lines as readable text or as one JSON object each (for log pipelines); overrides the worker's
    /// `[log] format`. Colour codes only when stderr is a terminal; RUST_LOG sets the levels.
    #[arg(long, global = true, env = "TRIAGEM_LOG_FORMAT", value_enum)]
    pub log_format: Option<crate::config::LogFormat>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Train a classifier on JSONL data and write a Hugging Face model directory.
    Train(TrainArgs),
    /// Pretrain a small BERT with masked-language modelling on plain text (and the texts of JSONL files);
    /// writes a base model directory for `triagem train --base DIR`.
    Pretrain(PretrainArgs),
    /// Score a model on a labelled JSONL file.
    Eval(EvalArgs),
    /// Classify texts given as arguments, or one per line on stdin.
    Classify(ClassifyArgs),
    /// Run the Kafka worker: consume, classify in micro-batches, route by label (until SIGTERM/SIGINT).
    Worker(WorkerArgs),
    /// A first look without Kafka: an in-memory broker, the worker, and the test set sent through it.
    Demo(DemoArgs),
    /// Put load on a running worker: send messages at a rate, read every output back, and report counts,
    /// missing and duplicate messages, throughput and end-to-end latency (exit 1 when any is missing).
    Loadgen(LoadgenArgs),
    /// Measure the model path as the worker runs it (batch 1/8/32 and the worker's length-aware batching,
    /// tokenisation included), its FLOP ceiling and peak memory; with --peers / --end-to-end, put the
    /// peers' and the worker's end-to-end figures (written by scripts/bench.sh) in the same table.
    Bench(BenchArgs),
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// JSONL file whose `prompt` fields are the texts (cycled to --messages).
    #[arg(long, env = "TRIAGEM_BENCH_DATA", default_value = "data/teste.jsonl")]
    pub data: PathBuf,
    /// Texts per row (batch 1 times at most 512 of them).
    #[arg(long, env = "TRIAGEM_BENCH_MESSAGES", default_value_t = 2048)]
    pub messages: usize,
    /// Fixed batch sizes to time, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
    pub batch_sizes: Vec<usize>,
    /// Times each row is timed, the rows interleaved; a row reports the median (and its runs in the JSON).
    #[arg(long, env = "TRIAGEM_BENCH_REPEATS", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub repeats: u32,
    /// The worker's batch.max_messages for the `worker` row.
    #[arg(long, env = "TRIAGEM__BATCH__MAX_MESSAGES", default_value_t = 32)]
    pub max_messages: usize,
    /// The worker's batch.max_tokens for the `worker` row.
    #[arg(long, env = "TRIAGEM__BATCH__MAX_TOKENS", default_value_t = 4096)]
    pub max_tokens: usize,
    /// JSON line of the peers (/work/shared/bench/peer_throughput.py-style: torch_b1, onnxrt_b32, …).
    #[arg(long)]
    pub peers: Option<PathBuf>,
    /// `triagem loadgen --json` output of the worker through a broker (repeatable: one row each).
    #[arg(long)]
    pub end_to_end: Vec<PathBuf>,
    /// The CPU's fp32 peak in GFLOP/s for the ceiling; measured with a matrix product when absent.
    #[arg(long)]
    pub peak_gflops: Option<f64>,
    /// The worker's /metrics scraped before and after its run at half load (give it twice): its own
    /// latency against batch.max_wait + 3 forward passes.
    #[arg(long)]
    pub worker_metrics: Vec<PathBuf>,
    /// The worker's /metrics scraped before and after the backlog run (`loadgen --backlog`; give it twice):
    /// the share of the drain its model spent computing.
    #[arg(long)]
    pub drain_metrics: Vec<PathBuf>,
    /// Who used the cores during the run at half load (scripts/bench.sh's `cpu-latency-run.json`: the
    /// worker's, the broker's and the rest's cores, and how busy the machine was), to report beside it.
    #[arg(long)]
    pub cpu_shares: Option<PathBuf>,
    /// The same for the backlog run, from the worker's resumption to its last output read back
    /// (scripts/bench.sh's `cpu-drain.json`): what the drain rate shared the cores with.
    #[arg(long)]
    pub drain_cpu_shares: Option<PathBuf>,
    /// The worker's batch.max_wait, for that bound.
    #[arg(long, env = "TRIAGEM__BATCH__MAX_WAIT", value_parser = humantime::parse_duration, default_value = "20ms")]
    pub max_wait: std::time::Duration,
    /// Print only the JSON object.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct WorkerArgs {
    /// TOML settings (see config/default.toml); every key can be overridden as TRIAGEM__SECTION__KEY.
    /// Without it, the built-in defaults and the environment are used.
    #[arg(long, env = "TRIAGEM_CONFIG")]
    pub config: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct LoadgenArgs {
    /// Kafka bootstrap servers, comma-separated host:port.
    #[arg(long, env = "TRIAGEM_LOADGEN_BROKERS", default_value = "localhost:9092")]
    pub brokers: String,
    /// Topic the messages are sent to (the worker's kafka.input_topic).
    #[arg(long, env = "TRIAGEM_LOADGEN_INPUT_TOPIC", default_value = "atendimento.mensagens")]
    pub input_topic: String,
    /// Routing topics read back (the worker's routing.topics), comma-separated.
    #[arg(
        long,
        alias = "output",
        env = "TRIAGEM_LOADGEN_OUTPUT_TOPICS",
        value_delimiter = ',',
        default_value = "atendimento.venda,atendimento.suporte"
    )]
    pub output_topics: Vec<String>,
    /// Review topic read back (the worker's routing.review_topic).
    #[arg(long, env = "TRIAGEM_LOADGEN_REVIEW_TOPIC", default_value = "atendimento.revisao")]
    pub review_topic: String,
    /// Dead-letter topic read back (the worker's routing.dead_letter_topic); poison messages must come out there.
    #[arg(long, env = "TRIAGEM_LOADGEN_DEAD_LETTER_TOPIC", default_value = "atendimento.dlq")]
    pub dead_letter_topic: String,
    /// JSONL file whose `prompt` fields are the texts sent (cycled), as {"id": ..., "text": ...}.
    #[arg(long, env = "TRIAGEM_LOADGEN_DATA", default_value = "data/teste.jsonl")]
    pub data: PathBuf,
    /// Target send rate in messages per second; 0 = as fast as possible.
    #[arg(long, env = "TRIAGEM_LOADGEN_RATE", default_value_t = 0.0)]
    pub rate: f64,
    /// Messages to send (1000 when neither --count nor --duration is given).
    #[arg(long, env = "TRIAGEM_LOADGEN_COUNT", conflicts_with = "duration")]
    pub count: Option<u64>,
    /// Send for this long instead of a count: 500ms, 60s, 5m, 1h, 1m30s.
    #[arg(long, env = "TRIAGEM_LOADGEN_DURATION", value_parser = humantime::parse_duration)]
    pub duration: Option<std::time::Duration>,
    /// Percentage (0-100) of poison messages mixed in: invalid JSON, missing text and invalid UTF-8 in turn.
    #[arg(long, env = "TRIAGEM_LOADGEN_POISON_PERCENT", default_value_t = 0.0)]
    pub poison_percent: f64,
    /// How long to wait after the last send for outputs still missing before reporting them missing.
    #[arg(long, env = "TRIAGEM_LOADGEN_SETTLE_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub settle_timeout: std::time::Duration,
    /// librdkafka setting for the producer and the consumer, key=value (repeatable; comma-separated in the
    /// environment), e.g. --client security.protocol=SASL_SSL --client sasl.mechanisms=SCRAM-SHA-512.
    #[arg(
        long = "client",
        env = "TRIAGEM_LOADGEN_CLIENT",
        value_delimiter = ',',
        value_parser = parse_key_value
    )]
    pub client: Vec<(String, String)>,
    /// librdkafka setting for the producer only (over --client), key=value (repeatable), e.g.
    /// --producer linger.ms=20, as the worker's [kafka.producer].
    #[arg(long, env = "TRIAGEM_LOADGEN_PRODUCER", value_delimiter = ',', value_parser = parse_key_value)]
    pub producer: Vec<(String, String)>,
    /// librdkafka setting for the consumer that reads the outputs only (over --client), key=value
    /// (repeatable), e.g. --consumer fetch.wait.max.ms=1, as the worker's [kafka.consumer].
    #[arg(long, env = "TRIAGEM_LOADGEN_CONSUMER", value_delimiter = ',', value_parser = parse_key_value)]
    pub consumer: Vec<(String, String)>,
    /// Read the outputs with isolation.level=read_committed, as a downstream consumer of a worker with
    /// kafka.delivery = "exactly_once" must: an output counts once its transaction commits (without the flag:
    /// read_uncommitted, an output counts as soon as it is written, an aborted one included).
    #[arg(long, env = "TRIAGEM_LOADGEN_READ_COMMITTED")]
    pub read_committed: bool,
    /// Measure how fast the worker drains a backlog: send while the worker is not reading (stopped, or not
    /// started yet), create FILE once the broker has acknowledged every message — start or resume the worker
    /// then — and read the drain rate (first output to last) in the report.
    #[arg(long, env = "TRIAGEM_LOADGEN_BACKLOG", value_name = "FILE")]
    pub backlog: Option<PathBuf>,
    /// Print the report as one JSON object on stdout instead of the table.
    #[arg(long, env = "TRIAGEM_LOADGEN_JSON")]
    pub json: bool,
    /// No progress bars.
    #[arg(long, env = "TRIAGEM_LOADGEN_QUIET")]
    pub quiet: bool,
}

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Model directory; trained with the `triagem train` defaults when missing.
    #[arg(long, env = "TRIAGEM_MODEL", default_value = "models/triagem")]
    pub model: PathBuf,
    /// JSONL file whose lines are sent as input messages (text in `prompt`).
    #[arg(long, default_value = "data/teste.jsonl")]
    pub data: PathBuf,
    /// Address of the metrics endpoint (`/metrics`, `/healthz`, `/readyz`).
    #[arg(long, default_value = "127.0.0.1:9095")]
    pub metrics_listen: String,
    /// Routed messages to print.
    #[arg(long, default_value_t = 8)]
    pub show: usize,
    /// Exit after the summary instead of serving until Ctrl-C.
    #[arg(long)]
    pub no_wait: bool,
}

/// `--test none`: train without a test report.
const NO_TEST: &str = "none";

#[derive(Debug, Args)]
pub struct TrainArgs {
    /// Training data (JSONL, `{"prompt": ..., "completion": label}` per line); a dev split is carved from it.
    #[arg(long, env = "TRIAGEM_TRAIN", default_value_os_t = TrainOptions::default().train)]
    pub train: PathBuf,
    /// Test data, used only for the final report; `none`: no test report (a run whose figures
    /// should stay out of view, or data with no test file of its own).
    #[arg(long, env = "TRIAGEM_TEST", default_value_os_t = TrainOptions::default().test.unwrap_or_else(|| NO_TEST.into()))]
    pub test: PathBuf,
    /// Output model directory.
    #[arg(long, env = "TRIAGEM_OUT", default_value_os_t = TrainOptions::default().out)]
    pub out: PathBuf,
    /// Initial weights: a local Hugging Face BERT directory (default: the small BERT pretrained on Brazilian
    /// Portuguese text by `triagem pretrain`, committed; or e.g. models/base/all-MiniLM-L6-v2, fetched by
    /// scripts/fetch-base-model.sh), a Hub id present in the local Hugging Face cache, or `none` (a small
    /// BERT and a WordPiece tokenizer trained from scratch on the training texts).
    #[arg(long, env = "TRIAGEM_BASE", default_value = crate::train::DEFAULT_BASE)]
    pub base: String,
    /// Passes over the training data.
    #[arg(long, env = "TRIAGEM_EPOCHS", default_value_t = TrainOptions::default().epochs)]
    pub epochs: usize,
    /// Peak learning rate (after warmup, then linear decay to zero).
    #[arg(long, env = "TRIAGEM_LR", default_value_t = TrainOptions::default().lr)]
    pub lr: f64,
    /// Examples per optimisation step.
    #[arg(long, env = "TRIAGEM_BATCH_SIZE", default_value_t = TrainOptions::default().batch_size)]
    pub batch_size: usize,
    /// Longest input in tokens; longer messages are truncated.
    #[arg(long, env = "TRIAGEM_MAX_LEN", default_value_t = TrainOptions::default().max_len)]
    pub max_len: usize,
    /// Seed of every random choice: same seed and data, same model.
    #[arg(long, env = "TRIAGEM_SEED", default_value_t = TrainOptions::default().seed)]
    pub seed: u64,
    /// Share of the training file held out to pick the best epoch and fit the score calibration;
    /// 0: none (the last epoch is kept, scores are the raw softmax).
    #[arg(long, default_value_t = TrainOptions::default().dev_fraction)]
    pub dev_fraction: f64,
    /// Share of the steps spent warming the learning rate up.
    #[arg(long, default_value_t = TrainOptions::default().warmup)]
    pub warmup: f64,
    /// AdamW weight decay (biases and layer norms excluded).
    #[arg(long, default_value_t = TrainOptions::default().weight_decay)]
    pub weight_decay: f64,
    /// Probability of rewriting a training example in chat spelling (no accents, abbreviations, typos) each epoch.
    #[arg(long, default_value_t = TrainOptions::default().augment)]
    pub augment: f64,
    /// Vocabulary size of the tokenizer trained with `--base none`.
    #[arg(long, default_value_t = TrainOptions::default().vocab_size)]
    pub vocab_size: usize,
    /// Hidden size of the BERT trained with `--base none`.
    #[arg(long, default_value_t = TrainOptions::default().scratch_hidden)]
    pub scratch_hidden: usize,
    /// Encoder layers of the BERT trained with `--base none`.
    #[arg(long, default_value_t = TrainOptions::default().scratch_layers)]
    pub scratch_layers: usize,
    /// Compute device: cpu, cuda (needs the `cuda` build) or auto (the GPU when there is one).
    #[arg(long, env = "TRIAGEM_DEVICE", value_enum, default_value_t = model::ComputeDevice::Cpu)]
    pub device: model::ComputeDevice,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
    /// Label smoothing: this much of each hard target's probability is spread evenly over the labels.
    #[arg(long, default_value_t = TrainOptions::default().label_smoothing)]
    pub label_smoothing: f64,
    /// Dropout probability of the hidden states and the attention weights while training (default:
    /// the base model's, 0.1 for the small BERT); written to the model's config.json.
    #[arg(long)]
    pub dropout: Option<f64>,
    /// R-Drop: run each training batch twice, with different dropout masks, and add this weight times
    /// the symmetric KL divergence between the two passes' predictions to the loss; 0 for off.
    /// About doubles the training time.
    #[arg(long, default_value_t = TrainOptions::default().rdrop)]
    pub rdrop: f64,
    /// Keep the base's word embeddings as they are while fine-tuning (the optimiser leaves the
    /// table out); the layers above, positions and the embeddings' layer norm train as usual.
    #[arg(long)]
    pub freeze_embeddings: bool,
    /// The word-embedding table's learning rate as a multiple of the rest's (default: 1, the same).
    #[arg(long)]
    pub embedding_lr_scale: Option<f64>,
    /// Adversarial training (the fast gradient method): each batch's loss is differentiated again
    /// with the word-embedding table moved a step of this norm along its gradient, and the two
    /// gradients summed (default: 0, off). About doubles the training time.
    #[arg(long)]
    pub adversarial: Option<f64>,
    /// Correctness Ranking Loss: add this weight times a margin ranking loss that asks the scores to
    /// rank the training examples by how often the model got each right in the finished epochs, so
    /// that the ones it keeps getting wrong score lower (default: 0, off).
    #[arg(long)]
    pub confidence_ranking: Option<f64>,
    /// Ensemble distillation: first train this many teachers (seeds SEED+1…SEED+N, same split and options),
    /// then the model, which also learns their averaged scores; 0 for none. Multiplies the training time by N+1.
    #[arg(long, env = "TRIAGEM_ENSEMBLE", default_value_t = TrainOptions::default().ensemble)]
    pub ensemble: usize,
    /// Weight of the teachers' soft targets in the loss (the labels get 1 minus this).
    #[arg(long, default_value_t = TrainOptions::default().distill_weight)]
    pub distill_weight: f64,
    /// Softmax temperature of the soft targets.
    #[arg(long, default_value_t = TrainOptions::default().distill_temperature)]
    pub distill_temperature: f64,
    /// Another model's scores of the training texts, learnt as one more teacher: JSONL, one
    /// `{"prompt": text, "scores": {label: probability}}` a line, every training text
    /// (`scripts/baseline.py --teacher-scores OUT` writes the baseline's, out of fold).
    #[arg(long)]
    pub teacher_scores: Option<PathBuf>,
    /// After the dev split has chosen the epoch and fitted the temperature, train again on the whole
    /// training file (dev split included) for that many epochs and keep that model, with the temperature.
    /// Doubles the training time. On by default; `--refit false` keeps the dev-selected model.
    #[arg(long, num_args = 0..=1, default_value_t = TrainOptions::default().refit, default_missing_value = "true",
          action = clap::ArgAction::Set)]
    pub refit: bool,
    /// Keep an exponential moving average of the weights, updated after every step with this decay
    /// (e.g. 0.99); the epochs are judged on the dev split, and saved, with the averaged weights. 0: off.
    #[arg(long, default_value_t = TrainOptions::default().ema)]
    pub ema: f64,
    /// Fine-tune N models from the same initial weights on the same split, each with its own order of
    /// examples, dropout and augmentation, and save the mean of their weights (a uniform model soup): one
    /// model of the same size and speed. Multiplies the training time by N (divided by --jobs). 0 or 1:
    /// one model. With --refit, each of the N models is trained again on the whole file for its own best
    /// epoch, and the mean of those is saved.
    #[arg(long, default_value_t = TrainOptions::default().soup)]
    pub soup: usize,
    /// CPU threads of training. 1 by default: the small model's products do not gain from a second
    /// thread (its wake-ups cost more), and two trainings can run side by side; more for a large base.
    /// 0 = automatic: RAYON_NUM_THREADS when set, else the CPUs this process may use.
    #[arg(long, env = "TRIAGEM_THREADS", default_value_t = 1)]
    pub threads: usize,
    /// Independent models trained at once, one thread each: --soup's models and their refits,
    /// --ensemble's teachers (up to one a core makes N models take about the time of N / jobs; each
    /// comes out the same bits). 1: one after another. 0 = automatic: the CPUs this process may use.
    #[arg(long, env = "TRIAGEM_JOBS", default_value_t = TrainOptions::default().jobs)]
    pub jobs: usize,
}

#[derive(Debug, Args)]
pub struct PretrainArgs {
    /// Plain-text corpus files, one passage per line (`scripts/pretrain-corpus.py` writes one from Debian's
    /// Brazilian Portuguese packages).
    #[arg(long, num_args = 1.., default_values_os_t = PretrainOptions::default().corpus)]
    pub corpus: Vec<PathBuf>,
    /// JSONL files (`{"prompt": ...}` per line) whose texts join the corpus; their labels are not used.
    #[arg(long, num_args = 1.., default_values_os_t = PretrainOptions::default().texts)]
    pub texts: Vec<PathBuf>,
    /// How many times each JSONL text is added, so that the chat register weighs against the corpus.
    #[arg(long, default_value_t = PretrainOptions::default().texts_repeat)]
    pub texts_repeat: usize,
    /// Output directory (a Hugging Face `BertForMaskedLM`).
    #[arg(long, default_value_os_t = PretrainOptions::default().out)]
    pub out: PathBuf,
    /// Vocabulary size of the WordPiece tokenizer trained on the corpus and the texts.
    #[arg(long, default_value_t = PretrainOptions::default().vocab_size)]
    pub vocab_size: usize,
    /// Words seen fewer times than this do not shape the vocabulary's merges.
    #[arg(long, default_value_t = PretrainOptions::default().min_word_count)]
    pub min_word_count: u64,
    /// Cut each word before a Portuguese inflectional ending when encoding (`comprei` → `compr` `ei`,
    /// `comprar` → `compr` `ar`) instead of keeping inflected forms whole.
    #[arg(long)]
    pub morphology: bool,
    /// Hidden size of the BERT.
    #[arg(long, default_value_t = PretrainOptions::default().hidden)]
    pub hidden: usize,
    /// Encoder layers of the BERT.
    #[arg(long, default_value_t = PretrainOptions::default().layers)]
    pub layers: usize,
    /// Longest sequence in tokens (longer passages are cut).
    #[arg(long, default_value_t = PretrainOptions::default().max_len)]
    pub max_len: usize,
    /// Sequences per step.
    #[arg(long, default_value_t = PretrainOptions::default().batch_size)]
    pub batch_size: usize,
    /// Optimiser steps.
    #[arg(long, default_value_t = PretrainOptions::default().steps)]
    pub steps: usize,
    /// Peak learning rate.
    #[arg(long, default_value_t = PretrainOptions::default().lr)]
    pub lr: f64,
    /// Share of the steps spent warming the learning rate up.
    #[arg(long, default_value_t = PretrainOptions::default().warmup)]
    pub warmup: f64,
    /// AdamW weight decay (not on biases and layer norms).
    #[arg(long, default_value_t = PretrainOptions::default().weight_decay)]
    pub weight_decay: f64,
    /// Share of the tokens the model predicts (of the words, with --whole-word-masking).
    #[arg(long, default_value_t = PretrainOptions::default().mask_prob)]
    pub mask_prob: f64,
    /// Choose words to mask instead of tokens: a word's `##` pieces are masked with it, so the model
    /// cannot fill a piece in from the rest of its own word.
    #[arg(long)]
    pub whole_word_masking: bool,
    /// Probability that a passage is rewritten in chat spelling each time it is drawn.
    #[arg(long, default_value_t = PretrainOptions::default().augment)]
    pub augment: f64,
    #[arg(long, default_value_t = PretrainOptions::default().seed)]
    pub seed: u64,
    /// Compute device: cpu, cuda (needs the `cuda` build) or auto.
    #[arg(long, env = "TRIAGEM_DEVICE", value_enum, default_value_t = model::ComputeDevice::Cpu)]
    pub device: model::ComputeDevice,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
    /// CPU threads of training; 0 = automatic: RAYON_NUM_THREADS when set, else the CPUs this process may
    /// use (its affinity mask and its container's CPU quota).
    #[arg(long, env = "TRIAGEM_THREADS", default_value_t = 0)]
    pub threads: usize,
}

impl PretrainArgs {
    /// Resolves the device into the pretrainer's options.
    pub fn options(self) -> Result<PretrainOptions, TrainError> {
        Ok(PretrainOptions {
            device: self.device.open()?,
            corpus: self.corpus,
            texts: self.texts,
            texts_repeat: self.texts_repeat,
            out: self.out,
            vocab_size: self.vocab_size,
            min_word_count: self.min_word_count,
            morphology: self.morphology,
            hidden: self.hidden,
            layers: self.layers,
            max_len: self.max_len,
            batch_size: self.batch_size,
            steps: self.steps,
            lr: self.lr,
            warmup: self.warmup,
            weight_decay: self.weight_decay,
            mask_prob: self.mask_prob,
            whole_word: self.whole_word_masking,
            augment: self.augment,
            seed: self.seed,
            quiet: self.quiet,
        })
    }
}

/// The model a command serves, and how.
#[derive(Debug, Args)]
pub struct ModelArgs {
    /// Model directory.
    #[arg(long, env = "TRIAGEM_MODEL", default_value = "models/triagem")]
    pub model: PathBuf,
    /// Texts per forward pass.
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    /// Compute device: cpu, cuda (needs the `cuda` build) or auto (the GPU when there is one).
    #[arg(long, env = "TRIAGEM_DEVICE", value_enum, default_value_t = model::ComputeDevice::Cpu)]
    pub device: model::ComputeDevice,
    /// CPU threads of the model; 0 = automatic: RAYON_NUM_THREADS when set, else the CPUs this process may
    /// use (its affinity mask and its container's CPU quota).
    #[arg(long, env = "TRIAGEM_THREADS", default_value_t = 0)]
    pub threads: usize,
}

impl ModelArgs {
    /// Sets the model's thread count (call before other threads start), then loads the model directory
    /// onto the device.
    pub fn load(&self) -> Result<model::Classifier, model::ModelError> {
        model::threads::init(self.threads);
        model::Classifier::load(&self.model, &self.device.open()?)
    }
}

#[derive(Debug, Args)]
pub struct EvalArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Labelled JSONL file.
    #[arg(long, default_value = "data/teste.jsonl")]
    pub data: PathBuf,
    /// Print one JSON object instead of the report.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct ClassifyArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// One JSON object per text (`text`, `label`, `score`, `scores`) instead of tab-separated lines.
    #[arg(long)]
    pub json: bool,
    /// Texts to classify; without any, one text per line is read from stdin.
    pub texts: Vec<String>,
}

impl TrainArgs {
    /// Resolves the base and the device into the trainer's options.
    pub fn options(self) -> Result<TrainOptions, TrainError> {
        Ok(TrainOptions {
            base: Base::parse(&self.base)?,
            device: self.device.open()?,
            train: self.train,
            test: (self.test.as_os_str() != NO_TEST).then_some(self.test),
            out: self.out,
            epochs: self.epochs,
            lr: self.lr,
            batch_size: self.batch_size,
            max_len: self.max_len,
            seed: self.seed,
            dev_fraction: self.dev_fraction,
            warmup: self.warmup,
            weight_decay: self.weight_decay,
            augment: self.augment,
            vocab_size: self.vocab_size,
            scratch_hidden: self.scratch_hidden,
            scratch_layers: self.scratch_layers,
            quiet: self.quiet,
            label_smoothing: self.label_smoothing,
            dropout: self.dropout,
            rdrop: self.rdrop,
            freeze_embeddings: self.freeze_embeddings,
            embedding_lr_scale: self.embedding_lr_scale.unwrap_or(TrainOptions::default().embedding_lr_scale),
            adversarial: self.adversarial.unwrap_or(TrainOptions::default().adversarial),
            confidence_ranking: self.confidence_ranking.unwrap_or(TrainOptions::default().confidence_ranking),
            ensemble: self.ensemble,
            distill_weight: self.distill_weight,
            distill_temperature: self.distill_temperature,
            teacher_scores: self.teacher_scores.clone(),
            refit: self.refit,
            ema: self.ema,
            soup: self.soup,
            jobs: self.jobs,
        })
    }
}

/// Parses `key=value` (a librdkafka setting).
pub fn parse_key_value(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.to_string())),
        _ => Err(format!("{s:?} is not key=value")),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn train_defaults_are_the_libraries() {
        let Command::Train(args) = Cli::parse_from(["triagem", "train"]).command else { unreachable!() };
        assert_eq!(format!("{:?}", args.options().unwrap()), format!("{:?}", TrainOptions::default()));
    }

    #[test]
    fn loadgen_durations_and_settings() {
        let parse = |args: &[&str]| Cli::try_parse_from([&["triagem", "loadgen"], args].concat());
        let loadgen = |args: &[&str]| match parse(args).unwrap().command {
            Command::Loadgen(a) => a,
            other => panic!("not loadgen: {other:?}"),
        };
        assert_eq!(loadgen(&["--duration", "60s"]).duration, Some(Duration::from_secs(60)));
        assert_eq!(loadgen(&["--duration", "1m30s"]).duration, Some(Duration::from_secs(90)));
        assert_eq!(loadgen(&["--settle-timeout", "500ms"]).settle_timeout, Duration::from_millis(500));
        assert_eq!(loadgen(&[]).settle_timeout, Duration::from_secs(30));
        assert!(parse(&["--duration", "soon"]).is_err());
        assert_eq!(
            loadgen(&["--client", "sasl.password=a=b", "--client", "linger.ms=5"]).client,
            [("sasl.password".into(), "a=b".into()), ("linger.ms".into(), "5".into())]
        );
        assert_eq!(parse_key_value("sasl.password=a=b"), Ok(("sasl.password".into(), "a=b".into())));
        assert!(parse_key_value("linger.ms").is_err());
        assert!(parse_key_value("=1").is_err());
        assert!(parse(&["--client", "linger.ms"]).is_err());
        let a = loadgen(&["--producer", "linger.ms=20", "--consumer", "fetch.wait.max.ms=1"]);
        assert_eq!(
            (a.producer, a.consumer, a.client),
            (vec![("linger.ms".into(), "20".into())], vec![("fetch.wait.max.ms".into(), "1".into())], vec![])
        );
        assert!(loadgen(&["--read-committed"]).read_committed);
        assert!(!loadgen(&[]).read_committed);
    }
}

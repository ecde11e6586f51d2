//! `triagem loadgen`: the end-to-end benchmark and correctness check.
//!
//! One run, in order:
//! 1. reads the texts (the `prompt` field of each JSONL line, cycled);
//! 2. assigns a consumer to every partition of the output topics (routing,
//!    review, dead letters) **at its high watermark**, so only what this run
//!    causes is read back, and checks that the input topic exists;
//! 3. sends `{"id": "<run>-<n>", "text": ...}` to the input topic, the id also
//!    as the Kafka key, paced to `rate` (0 = as fast as the producer queue
//!    takes them), for a count or a duration; a share of poison messages
//!    (invalid JSON, missing text, invalid UTF-8, in turn) is mixed in;
//! 4. matches every output to its input by id — the `id` field of a routed
//!    message, the Kafka key of a dead letter (its value is the original bytes;
//!    the worker preserves keys) — counting duplicates, messages on the wrong
//!    topic (poison not on the dead-letter topic, or the reverse) and messages
//!    of other producers;
//! 5. waits until every sent message is accounted for or `settle_timeout` has
//!    passed after the last send, and returns a [`LoadgenReport`].
//!
//! **Latency** is measured from the moment loadgen hands a message to its
//! producer to the moment loadgen's consumer hands the output to this module
//! (the time of receipt, on the monotonic clock of this process: no clock skew
//! between machines, and it includes the broker round trips on both sides).
//! Output timestamps are not used: the worker does not set them, so they
//! would be the worker's produce time, not the arrival time.
//!
//! Duplicates are counted until the last expected output arrives; the run
//! does not linger for late ones.
//!
//! [`run`] returns [`LoadgenError::Incomplete`] (with the report) when any
//! message is missing or came out on the wrong topic.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};

/// Messages sent when neither a count nor a duration is given.
pub const DEFAULT_COUNT: u64 = 1000;
/// Time allowed for each metadata and watermark request at start-up.
const SETUP_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the settle phase checks whether everything came back.
const SETTLE_POLL: Duration = Duration::from_millis(10);
/// Missing ids listed in the report, at most.
const MISSING_SAMPLE: usize = 10;

/// What a run takes (the `triagem loadgen` flags).
#[derive(Debug, Clone)]
pub struct LoadgenOptions {
    /// bootstrap.servers.
    pub brokers: String,
    /// Where the messages are sent (the worker's `kafka.input_topic`).
    pub input_topic: String,
    /// Routing topics read back (the worker's `routing.topics`).
    pub output_topics: Vec<String>,
    /// Review topic read back (low-confidence outputs).
    pub review_topic: String,
    /// Dead-letter topic read back: where poison messages are expected.
    pub dead_letter_topic: String,
    /// JSONL file whose `prompt` fields are the texts (cycled).
    pub data: PathBuf,
    /// Target send rate in messages per second; 0 = as fast as possible.
    pub rate: f64,
    /// When to stop sending.
    pub limit: Limit,
    /// Share of poison messages, 0–100.
    pub poison_percent: f64,
    /// How long to wait after the last send for outputs still missing.
    pub settle_timeout: Duration,
    /// librdkafka settings for both the producer and the consumer.
    pub client: Vec<(String, String)>,
    /// Draw progress bars on stderr.
    pub progress: bool,
}

impl LoadgenOptions {
    /// Options with the CLI defaults, against `brokers`.
    pub fn new(brokers: impl Into<String>) -> Self {
        Self {
            brokers: brokers.into(),
            input_topic: "atendimento.mensagens".into(),
            output_topics: vec!["atendimento.venda".into(), "atendimento.suporte".into()],
            review_topic: "atendimento.revisao".into(),
            dead_letter_topic: "atendimento.dlq".into(),
            data: PathBuf::from("data/teste.jsonl"),
            rate: 0.0,
            limit: Limit::Count(DEFAULT_COUNT),
            poison_percent: 0.0,
            settle_timeout: Duration::from_secs(30),
            client: Vec::new(),
            progress: false,
        }
    }

    /// Every topic read back, without repeats, in a stable order.
    pub fn read_topics(&self) -> Vec<String> {
        let mut topics: Vec<String> = Vec::new();
        let all = self.output_topics.iter().chain([&self.review_topic, &self.dead_letter_topic]);
        for t in all {
            if !topics.contains(t) {
                topics.push(t.clone());
            }
        }
        topics
    }

    fn validate(&self) -> Result<(), LoadgenError> {
        let bad = |m: String| Err(LoadgenError::Options(m));
        if !(self.rate.is_finite() && self.rate >= 0.0) {
            return bad(format!("rate must be 0 (as fast as possible) or a positive number, not {}", self.rate));
        }
        if !(0.0..=100.0).contains(&self.poison_percent) {
            return bad(format!("poison percent must be between 0 and 100, not {}", self.poison_percent));
        }
        if self.input_topic.is_empty() || self.dead_letter_topic.is_empty() || self.review_topic.is_empty() {
            return bad("topic names must not be empty".into());
        }
        if self.output_topics.is_empty() || self.output_topics.iter().any(String::is_empty) {
            return bad("at least one output topic is needed, and none may be empty".into());
        }
        if self.read_topics().contains(&self.input_topic) {
            return bad(format!("the input topic {:?} cannot also be read back as an output", self.input_topic));
        }
        match self.limit {
            Limit::Count(0) => bad("count must be at least 1".into()),
            Limit::Duration(d) if d.is_zero() => bad("duration must be longer than 0".into()),
            _ => Ok(()),
        }
    }
}

/// When sending stops.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Limit {
    /// After this many messages.
    Count(u64),
    /// After this long.
    Duration(Duration),
}

/// Why a run failed.
#[derive(Debug, thiserror::Error)]
pub enum LoadgenError {
    #[error("invalid options: {0}")]
    Options(String),
    #[error("{path}: {reason}")]
    Data { path: PathBuf, reason: String },
    /// The Kafka error is part of the message, not a `source`: its text would repeat in the chain.
    #[error("{context}: {error}")]
    Kafka { context: String, error: KafkaError },
    #[error("topic {topic:?} does not exist on {brokers} (create it, or name an existing one)")]
    TopicMissing { topic: String, brokers: String },
    #[error("a loadgen task failed: {0}")]
    Task(String),
    #[error(
        "{} of {} messages did not come out within {:?} after the last send; {} came out on the wrong topic",
        .report.missing, .report.sent, .settle_timeout, .report.misrouted
    )]
    Incomplete { report: Box<LoadgenReport>, settle_timeout: Duration },
}

fn kafka(context: impl Into<String>) -> impl FnOnce(KafkaError) -> LoadgenError {
    let context = context.into();
    move |error| LoadgenError::Kafka { context, error }
}

/// End-to-end latency quantiles, in milliseconds (nearest rank).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LatencySummary {
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub mean_ms: f64,
}

impl LatencySummary {
    /// Summary of latencies in microseconds; `None` for none.
    pub fn from_micros(mut micros: Vec<u64>) -> Option<Self> {
        micros.sort_unstable();
        let ms = |us: u64| us as f64 / 1000.0;
        let mean = micros.iter().map(|&u| u as f64).sum::<f64>() / micros.len().max(1) as f64 / 1000.0;
        Some(Self {
            p50_ms: ms(percentile(&micros, 50.0)?),
            p95_ms: ms(percentile(&micros, 95.0)?),
            p99_ms: ms(percentile(&micros, 99.0)?),
            max_ms: ms(*micros.last()?),
            mean_ms: mean,
        })
    }
}

/// The `p`-th percentile (0–100) of sorted values by the nearest-rank method:
/// the smallest value with at least `p`% of the values at or below it.
pub fn percentile(sorted: &[u64], p: f64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// What a run measured.
#[derive(Debug, Clone, Serialize)]
pub struct LoadgenReport {
    /// Prefix of every id of this run (`<run_id>-<n>`).
    pub run_id: String,
    /// Where the messages were sent.
    pub input_topic: String,
    /// Messages the broker acknowledged on the input topic.
    pub sent: u64,
    /// Of `sent`, the poison messages (expected on the dead-letter topic).
    pub poison: u64,
    /// Messages whose produce failed; not expected anywhere.
    pub send_failed: u64,
    /// Messages of this run received per output topic, duplicates included.
    pub received: BTreeMap<String, u64>,
    /// Sent messages received at least once.
    pub accounted: u64,
    /// Sent messages never received.
    pub missing: u64,
    /// A few of the missing ids, to look for in the worker's logs.
    pub missing_ids: Vec<String>,
    /// Receipts beyond the first of a message (at-least-once redelivery).
    pub duplicates: u64,
    /// Messages first received on the wrong kind of topic: poison not on the
    /// dead-letter topic, or a valid message on it.
    pub misrouted: u64,
    /// Messages on the output topics that this run did not send.
    pub foreign: u64,
    /// First send to the last delivery acknowledgement, seconds.
    pub send_seconds: f64,
    /// Achieved send rate: `sent / send_seconds`, messages per second.
    pub send_rate: f64,
    /// First send to the last first receipt, seconds.
    pub end_to_end_seconds: f64,
    /// End-to-end throughput: `accounted / end_to_end_seconds`, messages per second.
    pub throughput: f64,
    /// Send → receipt by loadgen's consumer (first receipt of each message).
    pub latency: Option<LatencySummary>,
}

impl LoadgenReport {
    /// Whether every sent message came out once or more, on the right kind of topic.
    pub fn ok(&self) -> bool {
        self.missing == 0 && self.misrouted == 0
    }

    /// The report as a table.
    pub fn render(&self) -> String {
        let mut s = String::new();
        let mut line = |l: String| {
            s.push_str(&l);
            s.push('\n');
        };
        line(format!("triagem loadgen — run {}", self.run_id));
        line(String::new());
        line(format!("{:<28} {:>10}", "topic", "messages"));
        line(format!(
            "{:<28} {:>10}  sent ({} poison, {} failed)",
            self.input_topic, self.sent, self.poison, self.send_failed
        ));
        for (topic, n) in &self.received {
            line(format!("{topic:<28} {n:>10}  received"));
        }
        line(String::new());
        line(format!("{:<28} {:>10}", "accounted for", self.accounted));
        line(format!("{:<28} {:>10}", "missing", self.missing));
        line(format!("{:<28} {:>10}", "duplicates", self.duplicates));
        line(format!("{:<28} {:>10}", "misrouted", self.misrouted));
        line(format!("{:<28} {:>10}", "from other producers", self.foreign));
        line(String::new());
        line(format!("{:<28} {:>10.1} msg/s  ({:.2} s)", "send rate", self.send_rate, self.send_seconds));
        line(format!(
            "{:<28} {:>10.1} msg/s  ({:.2} s)",
            "end-to-end throughput", self.throughput, self.end_to_end_seconds
        ));
        match &self.latency {
            Some(l) => line(format!(
                "{:<28} p50 {:.1}  p95 {:.1}  p99 {:.1}  max {:.1}  mean {:.1}",
                "latency ms (send→receipt)", l.p50_ms, l.p95_ms, l.p99_ms, l.max_ms, l.mean_ms
            )),
            None => line(format!("{:<28} no message came back", "latency ms (send→receipt)")),
        }
        if !self.missing_ids.is_empty() {
            line(format!("missing, e.g.: {}", self.missing_ids.join(", ")));
        }
        s
    }
}

/// What happened to one sent message.
#[derive(Debug, Clone, Copy, PartialEq)]
enum State {
    /// Sent; not received yet.
    Pending,
    /// The produce failed.
    Failed,
    /// Received at least once.
    Received,
}

/// One sent message.
#[derive(Debug, Clone)]
struct Slot {
    /// When it was handed to the producer.
    sent_at: Instant,
    /// Expected on the dead-letter topic.
    poison: bool,
    /// Pending, failed or received.
    state: State,
}

/// What [`Tracker::receive`] made of a message.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Receipt {
    /// The first receipt of a message of this run.
    First,
    /// A message of this run seen before.
    Duplicate,
    /// Not a message of this run.
    Foreign,
}

/// Matches outputs to sent messages by id. Pure bookkeeping: no Kafka, no clock.
#[derive(Debug)]
pub struct Tracker {
    /// `<run_id>-` starts every id of this run.
    prefix: String,
    /// Where poison messages are expected.
    dead_letter_topic: String,
    /// One per sent message; the index is the sequence number in the id.
    slots: Vec<Slot>,
    /// Receipts per output topic.
    received: BTreeMap<String, u64>,
    /// Receipts beyond the first.
    duplicates: u64,
    /// First receipts on the wrong kind of topic.
    misrouted: u64,
    /// Receipts of other producers' messages.
    foreign: u64,
    /// Slots still pending.
    outstanding: u64,
    /// Send → first receipt, microseconds.
    latencies_us: Vec<u64>,
    /// The latest first receipt.
    last_receipt: Option<Instant>,
}

impl Tracker {
    /// A tracker for ids `<run_id>-<n>`, counting receipts on `topics`.
    pub fn new(run_id: &str, dead_letter_topic: &str, topics: &[String]) -> Self {
        Self {
            prefix: format!("{run_id}-"),
            dead_letter_topic: dead_letter_topic.to_string(),
            slots: Vec::new(),
            received: topics.iter().map(|t| (t.clone(), 0)).collect(),
            duplicates: 0,
            misrouted: 0,
            foreign: 0,
            outstanding: 0,
            latencies_us: Vec::new(),
            last_receipt: None,
        }
    }

    /// The id of the next message.
    pub fn next_id(&self) -> String {
        format!("{}{}", self.prefix, self.slots.len())
    }

    /// Records a send; returns its sequence number.
    pub fn sent(&mut self, at: Instant, poison: bool) -> u64 {
        self.slots.push(Slot { sent_at: at, poison, state: State::Pending });
        self.outstanding += 1;
        self.slots.len() as u64 - 1
    }

    /// Records that the produce of `seq` failed (unless it came out anyway).
    pub fn failed(&mut self, seq: u64) {
        if let Some(slot) = self.slots.get_mut(seq as usize) {
            if slot.state == State::Pending {
                slot.state = State::Failed;
                self.outstanding -= 1;
            }
        }
    }

    /// The sequence number in `id` when it is an id of this run.
    pub fn sequence(&self, id: &str) -> Option<u64> {
        let n: u64 = id.strip_prefix(&self.prefix)?.parse().ok()?;
        ((n as usize) < self.slots.len()).then_some(n)
    }

    /// Records a message received on `topic` at `at` with `id` (see [`output_id`]).
    pub fn receive(&mut self, topic: &str, id: Option<&str>, at: Instant) -> Receipt {
        let Some(seq) = id.and_then(|id| self.sequence(id)) else {
            self.foreign += 1;
            return Receipt::Foreign;
        };
        *self.received.entry(topic.to_string()).or_default() += 1;
        let slot = &mut self.slots[seq as usize];
        if slot.state == State::Received {
            self.duplicates += 1;
            return Receipt::Duplicate;
        }
        if slot.state == State::Pending {
            self.outstanding -= 1;
        }
        slot.state = State::Received;
        if slot.poison != (topic == self.dead_letter_topic) {
            self.misrouted += 1;
        }
        self.latencies_us.push(at.saturating_duration_since(slot.sent_at).as_micros() as u64);
        self.last_receipt = Some(self.last_receipt.map_or(at, |t| t.max(at)));
        Receipt::First
    }

    /// Sent messages neither received nor failed.
    pub fn outstanding(&self) -> u64 {
        self.outstanding
    }

    /// Duplicate receipts so far.
    pub fn duplicates(&self) -> u64 {
        self.duplicates
    }

    /// The ids still pending, the first `limit` of them.
    pub fn missing_ids(&self, limit: usize) -> Vec<String> {
        let pending = self.slots.iter().enumerate().filter(|(_, s)| s.state == State::Pending);
        pending.take(limit).map(|(i, _)| format!("{}{i}", self.prefix)).collect()
    }

    /// The report, given the send start and the last delivery acknowledgement.
    fn report(&self, run_id: &str, input_topic: &str, started: Instant, sends_done: Instant) -> LoadgenReport {
        let count = |f: &dyn Fn(&Slot) -> bool| self.slots.iter().filter(|s| f(s)).count() as u64;
        let send_failed = count(&|s| s.state == State::Failed);
        let sent = self.slots.len() as u64 - send_failed;
        let accounted = count(&|s| s.state == State::Received);
        let send_seconds = sends_done.saturating_duration_since(started).as_secs_f64();
        let end_to_end_seconds = self.last_receipt.map_or(0.0, |t| t.saturating_duration_since(started).as_secs_f64());
        let per_second = |n: u64, secs: f64| if secs > 0.0 { n as f64 / secs } else { 0.0 };
        LoadgenReport {
            run_id: run_id.to_string(),
            input_topic: input_topic.to_string(),
            sent,
            poison: count(&|s| s.poison && s.state != State::Failed),
            send_failed,
            received: self.received.clone(),
            accounted,
            missing: self.outstanding,
            missing_ids: self.missing_ids(MISSING_SAMPLE),
            duplicates: self.duplicates,
            misrouted: self.misrouted,
            foreign: self.foreign,
            send_seconds,
            send_rate: per_second(sent, send_seconds),
            end_to_end_seconds,
            throughput: per_second(accounted, end_to_end_seconds),
            latency: LatencySummary::from_micros(self.latencies_us.clone()),
        }
    }
}

/// The id of an output: the Kafka key of a dead letter (its value is the
/// original bytes, possibly not JSON); otherwise the `id` field of the JSON
/// value, or the key when it has none.
pub fn output_id<'a>(dead_letter: bool, key: Option<&'a [u8]>, payload: Option<&'a [u8]>) -> Option<Cow<'a, str>> {
    #[derive(Deserialize)]
    struct IdOnly<'a> {
        #[serde(borrow)]
        id: Option<Cow<'a, str>>,
    }
    let from_key = || key.and_then(|k| std::str::from_utf8(k).ok()).map(Cow::Borrowed);
    if dead_letter {
        return from_key();
    }
    payload.and_then(|p| serde_json::from_slice::<IdOnly>(p).ok()).and_then(|v| v.id).or_else(from_key)
}

/// When message `seq` is due, counted from the start of sending; `None` at
/// rate 0 (as fast as possible).
pub fn send_offset(seq: u64, rate: f64) -> Option<Duration> {
    (rate > 0.0).then(|| Duration::from_secs_f64(seq as f64 / rate))
}

/// The kinds of poison message, used in turn.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum PoisonKind {
    /// A JSON object cut short.
    InvalidJson,
    /// A JSON object without `text`.
    MissingText,
    /// Bytes that are not UTF-8 inside the text.
    InvalidUtf8,
}

/// Whether message `seq` is poison at `percent`, and which kind. Spread
/// evenly: exactly ⌊n·percent/100⌋ of the first n messages are poison
/// (percent to two decimals).
pub fn poison_kind(seq: u64, percent: f64) -> Option<PoisonKind> {
    let bp = (percent * 100.0).round().clamp(0.0, 10_000.0) as u128;
    let before = seq as u128 * bp / 10_000;
    let after = (seq as u128 + 1) * bp / 10_000;
    (after > before).then_some(match before % 3 {
        0 => PoisonKind::InvalidJson,
        1 => PoisonKind::MissingText,
        _ => PoisonKind::InvalidUtf8,
    })
}

/// The value of message `id`: `{"id": ..., "text": ...}`, or a poison variant.
pub fn payload(id: &str, text: &str, poison: Option<PoisonKind>) -> Vec<u8> {
    let valid = serde_json::json!({"id": id, "text": text}).to_string();
    match poison {
        None => valid.into_bytes(),
        Some(PoisonKind::InvalidJson) => valid.as_bytes()[..valid.len() - 1].to_vec(),
        Some(PoisonKind::MissingText) => serde_json::json!({"id": id, "mensagem": text}).to_string().into_bytes(),
        Some(PoisonKind::InvalidUtf8) => {
            let mut bytes = serde_json::json!({"id": id}).to_string().into_bytes();
            bytes.pop();
            bytes.extend_from_slice(b",\"text\":\"");
            bytes.extend_from_slice(text.as_bytes());
            bytes.extend_from_slice(&[0xC3, 0x28, 0xFF]);
            bytes.extend_from_slice(b"\"}");
            bytes
        }
    }
}

/// The texts of a JSONL file: the `prompt` field of each line (`text` when
/// there is no `prompt`).
pub fn read_texts(path: &Path) -> Result<Vec<String>, LoadgenError> {
    let err = |reason: String| LoadgenError::Data { path: path.into(), reason };
    let content = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    let mut texts = Vec::new();
    for (i, line) in content.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value =
            serde_json::from_str(line).map_err(|e| err(format!("line {}: not JSON: {e}", i + 1)))?;
        let text = v.get("prompt").or_else(|| v.get("text")).and_then(|t| t.as_str());
        let text = text.ok_or_else(|| err(format!("line {}: no string field \"prompt\" or \"text\"", i + 1)))?;
        texts.push(text.to_string());
    }
    if texts.is_empty() {
        return Err(err("no texts in it".into()));
    }
    Ok(texts)
}

/// Parses `500ms`, `60s`, `5m`, `1h` or a number of seconds (`2.5`).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let n: f64 = number.parse().map_err(|_| format!("{s:?} is not a duration like 500ms, 60s, 5m or 1h"))?;
    let seconds = match unit.trim() {
        "ms" => n / 1000.0,
        "" | "s" => n,
        "m" | "min" => n * 60.0,
        "h" => n * 3600.0,
        other => return Err(format!("unknown unit {other:?} in {s:?}: use ms, s, m or h")),
    };
    Duration::try_from_secs_f64(seconds).map_err(|e| format!("{s:?}: {e}"))
}

/// Parses `key=value` (a librdkafka setting).
pub fn parse_key_value(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.to_string())),
        _ => Err(format!("{s:?} is not key=value")),
    }
}

/// A random hexadecimal run id.
fn new_run_id() -> String {
    format!("lg{:08x}", rand::random::<u32>())
}

/// The settings of a client: `defaults`, then the user's `client` settings over them.
fn client_config(opts: &LoadgenOptions, defaults: &[(&str, &str)]) -> ClientConfig {
    let mut cfg = ClientConfig::new();
    cfg.set("bootstrap.servers", &opts.brokers);
    for (k, v) in defaults {
        cfg.set(*k, *v);
    }
    for (k, v) in &opts.client {
        cfg.set(k, v);
    }
    cfg
}

/// A consumer assigned to every partition of `topics` at its high watermark,
/// after checking that `input_topic` exists. Blocking.
fn consumer_at_end(opts: &LoadgenOptions, run_id: &str, topics: &[String]) -> Result<StreamConsumer, LoadgenError> {
    // A short fetch wait: a broker that answers a fetch only when the wait is
    // over, rather than when data arrives, would otherwise add up to 500 ms
    // (the librdkafka default) to every latency measured here.
    let mut cfg = client_config(opts, &[("fetch.wait.max.ms", "10")]);
    cfg.set("group.id", format!("triagem-loadgen-{run_id}"))
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("allow.auto.create.topics", "false");
    let consumer: StreamConsumer = cfg.create().map_err(kafka("creating the consumer"))?;
    let partitions = |topic: &str| -> Result<Vec<i32>, LoadgenError> {
        let md = consumer
            .fetch_metadata(Some(topic), SETUP_TIMEOUT)
            .map_err(kafka(format!("metadata of {topic} from {}", opts.brokers)))?;
        let t = md.topics().iter().find(|t| t.name() == topic);
        match t {
            Some(t) if t.error().is_none() && !t.partitions().is_empty() => {
                Ok(t.partitions().iter().map(|p| p.id()).collect())
            }
            _ => Err(LoadgenError::TopicMissing { topic: topic.into(), brokers: opts.brokers.clone() }),
        }
    };
    partitions(&opts.input_topic)?;
    let mut assignment = TopicPartitionList::new();
    for topic in topics {
        for p in partitions(topic)? {
            let (_, high) = consumer
                .fetch_watermarks(topic, p, SETUP_TIMEOUT)
                .map_err(kafka(format!("high watermark of {topic}/{p}")))?;
            assignment.add_partition_offset(topic, p, Offset::Offset(high)).map_err(kafka("assignment"))?;
        }
    }
    consumer.assign(&assignment).map_err(kafka("assigning the output partitions"))?;
    Ok(consumer)
}

/// Two progress bars: sent and received.
struct Progress {
    /// Messages handed to the producer.
    sent: ProgressBar,
    /// Messages received at least once.
    received: ProgressBar,
}

impl Progress {
    fn new(show: bool, expected: Option<u64>) -> Self {
        let target = if show { ProgressDrawTarget::stderr() } else { ProgressDrawTarget::hidden() };
        let multi = MultiProgress::with_draw_target(target);
        let template = match expected {
            Some(_) => "{prefix:>9} [{bar:40}] {pos}/{len} ({per_sec}) {elapsed_precise}",
            None => "{prefix:>9} {pos} ({per_sec}) {elapsed_precise}",
        };
        let style = ProgressStyle::with_template(template).expect("valid template").progress_chars("=> ");
        let bar = |prefix: &'static str| {
            let b = multi.add(expected.map_or_else(ProgressBar::no_length, ProgressBar::new));
            b.set_style(style.clone());
            b.set_prefix(prefix);
            b
        };
        Self { sent: bar("sent"), received: bar("received") }
    }
}

fn lock(tracker: &Mutex<Tracker>) -> MutexGuard<'_, Tracker> {
    tracker.lock().unwrap_or_else(|e| e.into_inner())
}

/// Reads the outputs into the tracker until `stop` turns true; returns the consumer.
async fn receive(
    consumer: StreamConsumer,
    tracker: Arc<Mutex<Tracker>>,
    dead_letter_topic: String,
    mut stop: watch::Receiver<bool>,
    bar: ProgressBar,
) -> StreamConsumer {
    loop {
        tokio::select! {
            biased;
            changed = stop.changed() => if changed.is_err() || *stop.borrow() { break },
            m = consumer.recv() => match m {
                Ok(m) => {
                    let at = Instant::now();
                    let id = output_id(m.topic() == dead_letter_topic, m.key(), m.payload());
                    if lock(&tracker).receive(m.topic(), id.as_deref(), at) == Receipt::First {
                        bar.inc(1);
                    }
                }
                Err(e) => tracing::warn!(error = %e, "loadgen consumer"),
            },
        }
    }
    consumer
}

/// Awaits delivery reports in send order, marking failures; returns when the
/// sender is done and every report is in.
async fn await_deliveries(mut rx: mpsc::UnboundedReceiver<(u64, DeliveryFuture)>, tracker: Arc<Mutex<Tracker>>) {
    let mut failures = 0u64;
    while let Some((seq, delivery)) = rx.recv().await {
        let error = match delivery.await {
            Ok(Ok(_)) => continue,
            Ok(Err((e, _))) => e.to_string(),
            Err(_) => "the producer dropped the delivery report".to_string(),
        };
        failures += 1;
        if failures <= 5 {
            tracing::warn!(seq, %error, "produce failed");
        }
        lock(&tracker).failed(seq);
    }
}

/// Runs the load test: sends, reads back, waits to settle, reports.
pub async fn run(opts: LoadgenOptions) -> Result<LoadgenReport, LoadgenError> {
    opts.validate()?;
    let texts = read_texts(&opts.data)?;
    let run_id = new_run_id();
    let topics = opts.read_topics();

    let consumer = {
        let (opts, run_id, topics) = (opts.clone(), run_id.clone(), topics.clone());
        tokio::task::spawn_blocking(move || consumer_at_end(&opts, &run_id, &topics))
            .await
            .map_err(|e| LoadgenError::Task(e.to_string()))??
    };
    let producer: FutureProducer = client_config(&opts, &[]).create().map_err(kafka("creating the producer"))?;

    let expected = match opts.limit {
        Limit::Count(n) => Some(n),
        Limit::Duration(d) if opts.rate > 0.0 => Some((d.as_secs_f64() * opts.rate).ceil() as u64),
        Limit::Duration(_) => None,
    };
    let progress = Progress::new(opts.progress, expected);
    let tracker = Arc::new(Mutex::new(Tracker::new(&run_id, &opts.dead_letter_topic, &topics)));
    let (stop_tx, stop_rx) = watch::channel(false);
    let receiver = tokio::spawn(receive(
        consumer,
        tracker.clone(),
        opts.dead_letter_topic.clone(),
        stop_rx,
        progress.received.clone(),
    ));
    let (delivery_tx, delivery_rx) = mpsc::unbounded_channel();
    let deliveries = tokio::spawn(await_deliveries(delivery_rx, tracker.clone()));

    let started = Instant::now();
    let send_result = send(&opts, &texts, &producer, &tracker, &delivery_tx, &progress.sent, started).await;
    drop(delivery_tx);
    deliveries.await.map_err(|e| LoadgenError::Task(e.to_string()))?;
    let sends_done = Instant::now();
    progress.sent.finish();
    if send_result.is_ok() {
        let sent = lock(&tracker).slots.len() as u64;
        progress.received.set_length(sent);
        let deadline = sends_done + opts.settle_timeout;
        while lock(&tracker).outstanding() > 0 && Instant::now() < deadline {
            tokio::time::sleep(SETTLE_POLL).await;
        }
    }
    let _ = stop_tx.send(true);
    let consumer = receiver.await.map_err(|e| LoadgenError::Task(e.to_string()))?;
    progress.received.finish();
    // Close the clients before returning, while the broker is surely still up.
    drop(consumer);
    drop(producer);
    send_result?;

    let report = lock(&tracker).report(&run_id, &opts.input_topic, started, sends_done);
    if report.ok() {
        Ok(report)
    } else {
        Err(LoadgenError::Incomplete { report: Box::new(report), settle_timeout: opts.settle_timeout })
    }
}

/// The send loop: paced, cycling through `texts`, until the limit.
async fn send(
    opts: &LoadgenOptions,
    texts: &[String],
    producer: &FutureProducer,
    tracker: &Mutex<Tracker>,
    deliveries: &mpsc::UnboundedSender<(u64, DeliveryFuture)>,
    bar: &ProgressBar,
    started: Instant,
) -> Result<(), LoadgenError> {
    let end = match opts.limit {
        Limit::Duration(d) => Some(started + d),
        Limit::Count(_) => None,
    };
    let mut seq = 0u64;
    loop {
        if matches!(opts.limit, Limit::Count(n) if seq >= n) || end.is_some_and(|e| Instant::now() >= e) {
            break;
        }
        if let Some(offset) = send_offset(seq, opts.rate) {
            let due = started + offset;
            if end.is_some_and(|e| due >= e) {
                break;
            }
            // Sleep only when ahead by more than a timer tick; behind, send in a burst to catch up.
            if due > Instant::now() + Duration::from_millis(1) {
                tokio::time::sleep_until(due.into()).await;
            }
        } else if seq.is_multiple_of(256) {
            tokio::task::yield_now().await;
        }
        let poison = poison_kind(seq, opts.poison_percent);
        let (id, value) = {
            let mut t = lock(tracker);
            let id = t.next_id();
            let value = payload(&id, &texts[(seq % texts.len() as u64) as usize], poison);
            t.sent(Instant::now(), poison.is_some());
            (id, value)
        };
        loop {
            match producer.send_result(FutureRecord::to(&opts.input_topic).key(&id).payload(&value)) {
                Ok(delivery) => {
                    let _ = deliveries.send((seq, delivery));
                    break;
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                Err((e, _)) => {
                    lock(tracker).failed(seq);
                    return Err(kafka(format!("sending to {}", opts.input_topic))(e));
                }
            }
        }
        bar.inc(1);
        seq += 1;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_nearest_rank() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 50.0), Some(50));
        assert_eq!(percentile(&v, 95.0), Some(95));
        assert_eq!(percentile(&v, 99.0), Some(99));
        assert_eq!(percentile(&v, 100.0), Some(100));
        assert_eq!(percentile(&v, 0.0), Some(1));
        assert_eq!(percentile(&[7], 99.0), Some(7));
        assert_eq!(percentile(&[1, 2, 3, 4], 50.0), Some(2));
        assert_eq!(percentile(&[1, 2, 3, 4], 51.0), Some(3));
        assert_eq!(percentile(&[], 50.0), None);
    }

    #[test]
    fn latency_summary_in_milliseconds() {
        let s = LatencySummary::from_micros(vec![4000, 1000, 3000, 2000]).unwrap();
        assert_eq!((s.p50_ms, s.p95_ms, s.p99_ms, s.max_ms), (2.0, 4.0, 4.0, 4.0));
        assert!((s.mean_ms - 2.5).abs() < 1e-9);
        assert_eq!(LatencySummary::from_micros(vec![]), None);
    }

    fn tracker() -> Tracker {
        let topics = ["a.venda", "a.suporte", "a.dlq"].map(String::from);
        Tracker::new("run1", "a.dlq", &topics)
    }

    #[test]
    fn matching_counts_duplicates_foreign_and_misrouted() {
        let mut t = tracker();
        let t0 = Instant::now();
        for i in 0..4 {
            assert_eq!(t.next_id(), format!("run1-{i}"));
            t.sent(t0, i == 3);
        }
        assert_eq!(t.outstanding(), 4);
        let at = t0 + Duration::from_millis(5);
        assert_eq!(t.receive("a.venda", Some("run1-0"), at), Receipt::First);
        assert_eq!(t.receive("a.venda", Some("run1-0"), at), Receipt::Duplicate);
        assert_eq!(t.receive("a.suporte", Some("run1-1"), at), Receipt::First);
        assert_eq!(t.receive("a.dlq", Some("run1-3"), at), Receipt::First);
        assert_eq!(t.receive("a.venda", Some("run2-2"), at), Receipt::Foreign);
        assert_eq!(t.receive("a.venda", Some("run1-99"), at), Receipt::Foreign);
        assert_eq!(t.receive("a.venda", Some("run1-x"), at), Receipt::Foreign);
        assert_eq!(t.receive("a.venda", None, at), Receipt::Foreign);
        assert_eq!(t.outstanding(), 1);
        assert_eq!(t.missing_ids(10), vec!["run1-2"]);
        let r = t.report("run1", "in", t0, t0 + Duration::from_millis(1));
        assert_eq!((r.sent, r.poison, r.accounted, r.missing, r.duplicates), (4, 1, 3, 1, 1));
        assert_eq!((r.misrouted, r.foreign), (0, 4));
        assert_eq!(r.received["a.venda"], 2);
        assert_eq!(r.received["a.suporte"], 1);
        assert_eq!(r.received["a.dlq"], 1);
        assert_eq!(r.latency.as_ref().unwrap().max_ms, 5.0);
        assert!(!r.ok());

        // A valid message on the dead-letter topic is misrouted.
        assert_eq!(t.receive("a.dlq", Some("run1-2"), at), Receipt::First);
        assert_eq!(t.outstanding(), 0);
        let r = t.report("run1", "in", t0, t0 + Duration::from_millis(1));
        assert_eq!((r.missing, r.misrouted), (0, 1));
        assert!(!r.ok());
    }

    #[test]
    fn failed_sends_are_not_missing() {
        let mut t = tracker();
        let t0 = Instant::now();
        t.sent(t0, false);
        t.sent(t0, false);
        t.failed(1);
        t.failed(1);
        assert_eq!(t.outstanding(), 1);
        t.receive("a.venda", Some("run1-0"), t0);
        let r = t.report("run1", "in", t0, t0 + Duration::from_secs(2));
        assert_eq!((r.sent, r.send_failed, r.missing), (1, 1, 0));
        assert_eq!(r.send_rate, 0.5);
        assert!(r.ok());
    }

    #[test]
    fn ids_come_from_the_payload_or_the_key() {
        let json = br#"{"id":"run1-7","text":"oi","triagem":{"label":"venda"}}"#;
        assert_eq!(output_id(false, Some(b"k"), Some(json)).as_deref(), Some("run1-7"));
        assert_eq!(output_id(false, Some(b"run1-8"), Some(b"{\"text\":1}")).as_deref(), Some("run1-8"));
        assert_eq!(output_id(false, Some(b"run1-9"), Some(b"\xff")).as_deref(), Some("run1-9"));
        // Dead letters: always the key, whatever the bytes say.
        assert_eq!(output_id(true, Some(b"run1-3"), Some(json)).as_deref(), Some("run1-3"));
        assert_eq!(output_id(true, None, Some(json)), None);
        let escaped = br#"{"id":"run\u0031-2"}"#;
        assert_eq!(output_id(false, None, Some(escaped)).as_deref(), Some("run1-2"));
    }

    #[test]
    fn pacing_spreads_sends_over_time() {
        assert_eq!(send_offset(0, 100.0), Some(Duration::ZERO));
        assert_eq!(send_offset(50, 100.0), Some(Duration::from_millis(500)));
        assert_eq!(send_offset(1000, 1000.0), Some(Duration::from_secs(1)));
        assert_eq!(send_offset(3, 0.5), Some(Duration::from_secs(6)));
        assert_eq!(send_offset(10, 0.0), None);
    }

    #[test]
    fn poison_share_is_exact_and_kinds_rotate() {
        let kinds: Vec<_> = (0..1000).filter_map(|i| poison_kind(i, 10.0)).collect();
        assert_eq!(kinds.len(), 100);
        assert_eq!(&kinds[..3], &[PoisonKind::InvalidJson, PoisonKind::MissingText, PoisonKind::InvalidUtf8]);
        assert_eq!((0..1000).filter(|&i| poison_kind(i, 0.0).is_some()).count(), 0);
        assert_eq!((0..1000).filter(|&i| poison_kind(i, 100.0).is_some()).count(), 1000);
        assert_eq!((0..10_000).filter(|&i| poison_kind(i, 0.25).is_some()).count(), 25);
    }

    #[test]
    fn payloads() {
        let ok: serde_json::Value = serde_json::from_slice(&payload("r-1", "oi \"você\"", None)).unwrap();
        assert_eq!(ok, serde_json::json!({"id": "r-1", "text": "oi \"você\""}));
        assert!(
            serde_json::from_slice::<serde_json::Value>(&payload("r-1", "oi", Some(PoisonKind::InvalidJson))).is_err()
        );
        let missing: serde_json::Value =
            serde_json::from_slice(&payload("r-1", "oi", Some(PoisonKind::MissingText))).unwrap();
        assert!(missing.get("text").is_none());
        let bad = payload("r-1", "oi", Some(PoisonKind::InvalidUtf8));
        assert!(std::str::from_utf8(&bad).is_err());
        assert!(bad.starts_with(br#"{"id":"r-1","text":"oi"#));
    }

    #[test]
    fn durations_and_settings() {
        assert_eq!(parse_duration("60s"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("2.5"), Ok(Duration::from_millis(2500)));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("5d").is_err());
        assert_eq!(parse_key_value("sasl.password=a=b"), Ok(("sasl.password".into(), "a=b".into())));
        assert!(parse_key_value("linger.ms").is_err());
        assert!(parse_key_value("=1").is_err());
    }

    #[test]
    fn options_are_checked() {
        let ok = LoadgenOptions::new("localhost:9092");
        assert!(ok.validate().is_ok());
        assert_eq!(
            ok.read_topics(),
            ["atendimento.venda", "atendimento.suporte", "atendimento.revisao", "atendimento.dlq"]
        );
        let bad = |f: &dyn Fn(&mut LoadgenOptions)| {
            let mut o = ok.clone();
            f(&mut o);
            o.validate().is_err()
        };
        assert!(bad(&|o| o.rate = -1.0));
        assert!(bad(&|o| o.poison_percent = 101.0));
        assert!(bad(&|o| o.limit = Limit::Count(0)));
        assert!(bad(&|o| o.output_topics.clear()));
        assert!(bad(&|o| o.review_topic = o.input_topic.clone()));
    }

    #[test]
    fn texts_from_jsonl() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.jsonl");
        std::fs::write(&p, "{\"prompt\": \"a\", \"completion\": \"venda\"}\n\n{\"text\": \"b\"}\n").unwrap();
        assert_eq!(read_texts(&p).unwrap(), ["a", "b"]);
        std::fs::write(&p, "{\"x\": 1}\n").unwrap();
        assert!(read_texts(&p).unwrap_err().to_string().contains("line 1"));
    }
}

//! `triagem loadgen`: the end-to-end benchmark and correctness check.
//!
//! One run, in order:
//! 1. reads the texts (the `prompt` field of each JSONL line, cycled);
//! 2. assigns a consumer to every partition of the output topics (routing,
//!    review, dead letters) **at its high watermark**, so only what this run
//!    causes is read back, and checks that the input topic exists; it reads
//!    `read_uncommitted`, or `read_committed` with `--read-committed` (what a
//!    consumer of an exactly-once worker does: an output counts once its
//!    transaction commits);
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
//! **Latency** is measured from the moment a message is due — its scheduled
//! send time when `rate` is set, so that a producer falling behind counts its
//! own delay (no coordinated omission), else the moment loadgen hands it to
//! its producer — to the moment loadgen's consumer hands the output to this module
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
//!
//! # Files
//!
//! - `mod.rs` (this file): the options, [`run`], the send loop and the receive loop;
//! - `tracker.rs`: matching outputs to sent messages and the report — pure,
//!   and where most of the tests are;
//! - `payload.rs`: the texts read, the messages and poison built from them, the pacing;
//! - `kafka.rs`: the client settings and the consumer that reads the outputs.

mod kafka;
mod payload;
mod tracker;

pub use payload::{payload, poison_kind, read_texts, send_offset, PoisonKind};
pub use tracker::{output_id, LatencySummary, LoadgenReport, Receipt, Record, Tracker};

use kafka::{client_config, consumer_at_end, Role};

use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use rdkafka::consumer::StreamConsumer;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use tokio::sync::{mpsc, watch};

/// Messages sent when neither a count nor a duration is given.
pub const DEFAULT_COUNT: u64 = 1000;
/// How often the settle phase checks whether everything came back.
const SETTLE_POLL: Duration = Duration::from_millis(10);

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
    /// librdkafka settings for the producer only, over `client`.
    pub producer: Vec<(String, String)>,
    /// librdkafka settings for the consumer (the outputs' reader) only, over `client`.
    pub consumer: Vec<(String, String)>,
    /// Draw progress bars on stderr.
    pub progress: bool,
    /// Read the outputs with `isolation.level = read_committed` (an exactly-once worker's outputs
    /// count once their transaction commits); else `read_uncommitted`.
    pub read_committed: bool,
    /// A backlog run: the worker is not reading while the messages are sent (stopped, or not started
    /// yet); this file is created once the broker has acknowledged every message, for the script that
    /// starts or resumes the worker then, and the report counts the outputs that came back before it
    /// (`received_while_sending`). The figure to read is then `drain_throughput`.
    pub backlog: Option<PathBuf>,
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
            producer: Vec::new(),
            consumer: Vec::new(),
            progress: false,
            read_committed: false,
            backlog: None,
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
    #[error(transparent)]
    Data(#[from] crate::data::DataError),
    /// The Kafka error is part of the message, not a `source`: its text would repeat in the chain.
    #[error("{context}: {error}")]
    Kafka { context: String, error: KafkaError },
    #[error("topic {topic:?} does not exist on {brokers} (create it, or name an existing one)")]
    TopicMissing { topic: String, brokers: String },
    #[error("cannot create the backlog file {path:?}: {reason}")]
    Backlog { path: PathBuf, reason: String },
    #[error("a loadgen task failed: {0}")]
    Task(String),
    #[error(
        "{} of {} messages did not come out within {:?} after the last send; {} came out on the wrong topic",
        .report.missing, .report.sent, .settle_timeout, .report.misrouted
    )]
    Incomplete { report: Box<LoadgenReport>, settle_timeout: Duration },
}

fn kafka_error(context: impl Into<String>) -> impl FnOnce(KafkaError) -> LoadgenError {
    let context = context.into();
    move |error| LoadgenError::Kafka { context, error }
}
/// A random hexadecimal run id.
fn new_run_id() -> String {
    format!("lg{:08x}", rand::random::<u32>())
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
                    let record = Record { topic: m.topic(), partition: m.partition(), offset: m.offset() };
                    if lock(&tracker).receive(record, id.as_deref(), at) == Receipt::First {
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
    let producer: FutureProducer =
        client_config(&opts, Role::Producer, &[]).create().map_err(kafka_error("creating the producer"))?;

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
    let mut send_result = send(&opts, &texts, &producer, &tracker, &delivery_tx, &progress.sent, started).await;
    drop(delivery_tx);
    deliveries.await.map_err(|e| LoadgenError::Task(e.to_string()))?;
    let sends_done = Instant::now();
    progress.sent.finish();
    let mut received_while_sending = None;
    if let (Some(path), Ok(())) = (&opts.backlog, &send_result) {
        let (sent, received) = {
            let t = lock(&tracker);
            (t.sent_count(), t.received_count())
        };
        received_while_sending = Some(received);
        if received > 0 {
            tracing::warn!(received, "outputs came back while the backlog was being sent: the worker was reading");
        }
        if let Err(e) = std::fs::write(path, format!("{sent}\n")) {
            send_result = Err(LoadgenError::Backlog { path: path.clone(), reason: e.to_string() });
        }
    }
    if send_result.is_ok() {
        let sent = lock(&tracker).sent_count();
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

    let mut report = lock(&tracker).report(&run_id, &opts.input_topic, started, sends_done);
    report.received_while_sending = received_while_sending;
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
        let due = send_offset(seq, opts.rate).map(|offset| started + offset);
        if let Some(due) = due {
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
            t.sent(due.unwrap_or_else(Instant::now), poison.is_some());
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
                    return Err(kafka_error(format!("sending to {}", opts.input_topic))(e));
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
}

//! The Kafka worker: consume → decode → batch → infer → route → commit.
//!
//! Stages, in the order a message meets them:
//!
//! 1. [`consume`]: the consumer task takes a slot of `kafka.max_in_flight`,
//!    fetches a message, records its offset in the [`offsets::OffsetTracker`];
//! 2. [`message`]: decodes and validates it; poison goes straight to step 5;
//! 3. [`batcher`]: groups decoded messages (`batch.max_messages`,
//!    `batch.max_tokens`, `batch.max_wait`), handing the model what is
//!    waiting as soon as it is idle;
//! 4. [`infer`]: one `std::thread` owns the model and classifies each batch;
//!    a channel of capacity 1 in front of it lets one batch wait while another
//!    computes;
//! 5. [`route`]: produces each output (label topic, review topic or dead-letter
//!    topic) and, once the broker acknowledges it, acknowledges the offset;
//! 6. [`offsets`] knows, per partition, up to where every message has an
//!    acknowledged output; [`commit`] commits exactly that (periodically, on
//!    revoke, on shutdown), and is the only place that commits. With
//!    `kafka.delivery = "exactly_once"` it commits through [`transaction`]:
//!    outputs and offsets in one Kafka transaction per `transaction_interval`.
//!
//! Every hand-off is a bounded channel, so a slow stage pauses consumption.
//! [`Worker::run`] owns shutdown: stop fetching, drain every stage, commit
//! synchronously, all within `shutdown.timeout`.

pub mod batcher;
pub mod commit;
pub mod consume;
pub mod infer;
pub mod message;
pub mod offsets;
pub mod route;
mod shutdown;
pub mod transaction;

use shutdown::wait_for_signal;
pub use shutdown::{Fatal, Shutdown, ShutdownTrigger};

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::Consumer;
use rdkafka::error::KafkaError;
use rdkafka::producer::{FutureProducer, Producer};
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinHandle;

use crate::config::{Config, ConfigError, Delivery};
use crate::metrics::{Metrics, MetricsError};
use crate::model::{Classifier, ModelError};
use consume::{ConsumeStage, GapWatch, IdleWatch, WorkerConsumer, WorkerContext};
use infer::Predict;
use offsets::OffsetTracker;
use route::{Outcome, OutputTopics, Router};

/// Why the worker did not start or did not stop cleanly.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("model.path {path}: {source}")]
    Model { path: String, source: ModelError },
    #[error("routing.topics: no topic for the model's label {label:?} (the model's labels: {labels})")]
    UnroutedLabel { label: String, labels: String },
    #[error("kafka: cannot create the {what}: {source}")]
    Client { what: &'static str, source: KafkaError },
    #[error("kafka.input_topic {topic:?}: cannot subscribe: {source}")]
    Subscribe { topic: String, source: KafkaError },
    #[error(transparent)]
    Metrics(#[from] MetricsError),
    #[error("cannot start {what}: {source}")]
    Start { what: &'static str, source: std::io::Error },
    #[error(
        "shutdown.timeout = {} passed with {pending} messages unfinished; what was done is committed, \
         the rest will be consumed again", humantime::format_duration(*timeout)
    )]
    ShutdownTimeout { timeout: Duration, pending: usize },
    #[error("{0}; what was done is committed, the rest will be consumed again after a restart")]
    Fatal(String),
    #[error(
        "the broker did not answer the final commit within shutdown.timeout = {}; every message was \
         finished, and those since the last commit will be consumed again",
        humantime::format_duration(*timeout)
    )]
    FinalCommit { timeout: Duration },
    #[error("kafka.transactional_id: cannot start transactions as {id:?}: {source}")]
    Transactions { id: String, source: KafkaError },
}

/// `triagem worker`: loads the model, checks it against the routing, and runs
/// until SIGTERM or SIGINT.
pub fn run(cfg: Config) -> Result<(), WorkerError> {
    tracing::info!(config = ?cfg, "starting");
    let model = load_model(&cfg)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("triagem-async")
        .build()
        .map_err(|source| WorkerError::Start { what: "the async runtime", source })?;
    let result = runtime.block_on(async move {
        let (trigger, shutdown) = Shutdown::new();
        let worker = Worker::start(cfg, model, shutdown.clone()).await?;
        tokio::spawn(async move {
            wait_for_signal().await;
            trigger.trigger();
        });
        worker.run(shutdown).await
    });
    // Not the runtime's drop, which waits for blocking tasks without a limit: a commit
    // still waiting for an unreachable broker was abandoned by `Worker::run`.
    runtime.shutdown_timeout(CLOSE_GRACE);
    result
}

/// How long the shutdown waits past `shutdown.timeout` for librdkafka to finish a commit or a close.
const CLOSE_GRACE: Duration = Duration::from_millis(500);

/// Loads `model.path` onto `model.device` and checks every label has a topic.
pub fn load_model(cfg: &Config) -> Result<Classifier, WorkerError> {
    let path = cfg.model.path.display().to_string();
    let err = |source| WorkerError::Model { path: path.clone(), source };
    let device = cfg.model.device.open().map_err(err)?;
    let classifier = Classifier::load(&cfg.model.path, &device).map_err(err)?;
    check_routing(cfg, &classifier.info().labels)?;
    Ok(classifier)
}

/// Every label of the model needs a topic in `routing.topics`.
pub fn check_routing(cfg: &Config, labels: &[String]) -> Result<(), WorkerError> {
    for label in labels {
        if !cfg.routing.topics.contains_key(label) {
            return Err(WorkerError::UnroutedLabel { label: label.clone(), labels: labels.join(", ") });
        }
    }
    Ok(())
}

/// librdkafka settings: ours first, then `[kafka.client]`, then the role's table.
fn client_config(cfg: &Config, defaults: &[(&str, &str)], role: &crate::config::ClientOptions) -> ClientConfig {
    crate::kafka::client_config(&cfg.kafka.brokers, defaults, cfg.kafka.client.0.iter().chain(role.0.iter()))
}

/// Settings of the worker's consumer (auto-commit off: offsets are committed by the tracker).
pub fn consumer_config(cfg: &Config) -> ClientConfig {
    let mut c = client_config(
        cfg,
        &[
            ("auto.offset.reset", "earliest"),
            ("statistics.interval.ms", "5000"),
            ("queued.max.messages.kbytes", "16384"),
        ],
        &cfg.kafka.consumer,
    );
    // Not overridable: at-least-once depends on them.
    c.set("group.id", &cfg.kafka.group_id);
    c.set("enable.auto.commit", "false");
    c.set("enable.auto.offset.store", "false");
    if cfg.kafka.delivery == Delivery::ExactlyOnce {
        // Inputs written by transactional producers: only committed ones.
        c.set("isolation.level", "read_committed");
    }
    c
}

/// Settings of the worker's producer. Output topics are never auto-created
/// (a missing one is reported: `triagem_output_topic_unavailable`, not ready).
/// `linger.ms` is 1, not librdkafka's 5: the router enqueues a whole batcher
/// window's outputs at once, so they leave together anyway, and a longer
/// linger only adds to every message's latency (README, "Benchmarks").
pub fn producer_config(cfg: &Config) -> ClientConfig {
    let mut c = client_config(
        cfg,
        &[("message.timeout.ms", "30000"), ("linger.ms", "1"), ("allow.auto.create.topics", "false")],
        &cfg.kafka.producer,
    );
    // Not overridable (`Config::validate` rejects a weaker value): an output
    // is acknowledged only once every in-sync replica has it, and the
    // producer's own retries keep each partition's order without duplicates.
    c.remove("request.required.acks");
    c.set("acks", "all");
    c.set("enable.idempotence", "true");
    if cfg.kafka.delivery == Delivery::ExactlyOnce {
        c.set("transactional.id", cfg.kafka.transactional_id_for(&crate::config::hostname()));
        c.set("transaction.timeout.ms", (cfg.shutdown.timeout.as_millis().max(1000) * 2).to_string());
    }
    c
}

/// A started worker: every stage running.
pub struct Worker {
    /// The worker's metrics (also served over HTTP).
    pub metrics: Arc<Metrics>,
    /// Where `/metrics`, `/healthz` and `/readyz` are served.
    pub metrics_addr: SocketAddr,
    cfg: Config,
    consumer: Arc<WorkerConsumer>,
    producer: FutureProducer,
    tracker: Arc<OffsetTracker>,
    consume: JoinHandle<()>,
    batcher: JoinHandle<()>,
    router: JoinHandle<()>,
    inference: std::thread::JoinHandle<()>,
    background: Vec<JoinHandle<()>>,
    stop_background: ShutdownTrigger,
    /// The periodic commit loop, stopped before the final commit.
    commits: (JoinHandle<()>, ShutdownTrigger),
    committer: Arc<commit::Committer>,
    fatal: Arc<Fatal>,
}

impl Worker {
    /// Binds the metrics endpoint, connects, subscribes and starts every stage.
    /// Consumption stops when `shutdown` is triggered; then call [`Worker::run`].
    pub async fn start<P: Predict>(cfg: Config, model: P, shutdown: Shutdown) -> Result<Self, WorkerError> {
        cfg.validate()?;
        let info = model.info();
        check_routing(&cfg, &info.labels)?;
        let metrics = Metrics::new()?;
        metrics
            .model_info
            .with_label_values(&[&info.name, &info.version, &info.labels.join(","), cfg.model.device.as_str()])
            .set(1);
        let routes: Vec<(String, String)> = info
            .labels
            .iter()
            .flat_map(|l| {
                let topic = cfg.routing.topics.get(l).cloned().unwrap_or_default();
                [(l.clone(), topic), (l.clone(), cfg.routing.review_topic.clone())]
            })
            .collect();
        metrics.preset(&info.labels, &routes, &cfg.routing.dead_letter_topic, &message::Poison::REASONS);
        let listener = crate::metrics::bind(cfg.metrics_addr()?).await?;
        let metrics_addr =
            listener.local_addr().map_err(|source| WorkerError::Start { what: "the metrics endpoint", source })?;

        let tracker = Arc::new(OffsetTracker::new());
        let fatal = Arc::new(Fatal::default());
        let producer: FutureProducer =
            producer_config(&cfg).create().map_err(|source| WorkerError::Client { what: "producer", source })?;
        let transactions = match cfg.kafka.delivery {
            Delivery::AtLeastOnce => None,
            Delivery::ExactlyOnce => {
                let id = producer_config(&cfg).get("transactional.id").unwrap_or_default().to_string();
                let (p, m, f, t, i) =
                    (producer.clone(), metrics.clone(), fatal.clone(), cfg.shutdown.timeout, id.clone());
                let started = tokio::task::spawn_blocking(move || transaction::Transactions::start(p, i, m, f, t))
                    .await
                    .map_err(|e| WorkerError::Fatal(format!("starting transactions panicked: {e}")))?;
                Some(Arc::new(started.map_err(|source| WorkerError::Transactions { id, source })?))
            }
        };
        let committer = Arc::new(match &transactions {
            None => commit::Committer::new(tracker.clone(), metrics.clone()),
            Some(t) => commit::Committer::transactional(tracker.clone(), metrics.clone(), t.clone()),
        });
        let gaps = Arc::new(GapWatch::default());
        let context = WorkerContext {
            tracker: tracker.clone(),
            committer: committer.clone(),
            metrics: metrics.clone(),
            revoke_timeout: cfg.shutdown.timeout,
            closing: Default::default(),
            gaps: gaps.clone(),
        };
        let consumer: WorkerConsumer = consumer_config(&cfg)
            .create_with_context(context)
            .map_err(|source| WorkerError::Client { what: "consumer", source })?;
        let consumer = Arc::new(consumer);
        consumer
            .subscribe(&[&cfg.kafka.input_topic])
            .map_err(|source| WorkerError::Subscribe { topic: cfg.kafka.input_topic.clone(), source })?;

        let (to_batcher, batcher_rx) = mpsc::channel(cfg.batch.max_messages * 2);
        let (to_inference, inference_rx) = mpsc::channel(1);
        let (to_router, router_rx) = mpsc::channel::<Outcome>(64);

        let tokenize = model.tokenizer();
        let limits = batcher::Limits {
            max_messages: cfg.batch.max_messages,
            max_tokens: cfg.batch.max_tokens,
            max_wait: cfg.batch.max_wait,
        };
        let idle = batcher::ModelIdle::default();
        let batcher = tokio::spawn(batcher::run(
            batcher_rx,
            to_inference,
            limits,
            idle.clone(),
            move |arrived: &mut [message::Pending]| tokenize_on_model_threads(&tokenize, arrived),
            Some(metrics.clone()),
        ));
        let sink_tx = to_router.clone();
        let inference = infer::spawn(model, inference_rx, idle, metrics.clone(), move |done| {
            sink_tx.blocking_send(Outcome::Classified(done)).is_ok()
        })
        .map_err(|source| WorkerError::Start { what: "the inference thread", source })?;
        let output_topics = Arc::new(OutputTopics::default());
        let router = Router {
            producer: producer.clone(),
            routing: cfg.routing.clone(),
            model: info.clone(),
            tracker: tracker.clone(),
            metrics: metrics.clone(),
            retry_backoff: cfg.kafka.produce_retry_backoff,
            topics: output_topics.clone(),
            fatal: fatal.clone(),
            transactions: transactions.clone(),
        };
        let router = tokio::spawn(router.run(router_rx));
        let bytes = consume::ByteBudget::new(cfg.kafka.max_in_flight_bytes.as_u64());
        let consume = tokio::spawn(
            ConsumeStage {
                consumer: consumer.clone(),
                slots: Arc::new(Semaphore::new(cfg.kafka.max_in_flight)),
                bytes: bytes.clone(),
                input: cfg.input.clone(),
                tracker: tracker.clone(),
                metrics: metrics.clone(),
                gaps,
                to_batcher,
                to_router,
                fatal: fatal.clone(),
                rewind: transactions.as_ref().map(|t| t.rewind.clone()),
            }
            .run(shutdown),
        );

        let (stop_background, background_shutdown) = Shutdown::new();
        let mut background = Vec::new();
        {
            let mut stop = background_shutdown.clone();
            let m = metrics.clone();
            background.push(tokio::spawn(async move {
                if let Err(e) = crate::metrics::serve(listener, m, async move { stop.wait().await }).await {
                    tracing::error!(error = %e, "metrics endpoint failed");
                }
            }));
        }
        let (stop_commits, commits_shutdown) = Shutdown::new();
        let commits = tokio::spawn(commit::commit_loop(
            consumer.clone(),
            committer.clone(),
            bytes,
            match cfg.kafka.delivery {
                Delivery::AtLeastOnce => cfg.kafka.commit_interval,
                Delivery::ExactlyOnce => cfg.kafka.transaction_interval,
            },
            commits_shutdown,
        ));
        background.push(tokio::spawn(readiness_loop(
            consumer.clone(),
            cfg.kafka.input_topic.clone(),
            (cfg.output_topics(), output_topics),
            Watch {
                producer: producer.clone(),
                tracker: tracker.clone(),
                stall_timeout: cfg.health.stall_timeout,
                fatal: fatal.clone(),
                transactional_id: producer_config(&cfg).get("transactional.id").map(str::to_string),
            },
            metrics.clone(),
            cfg.kafka.unassigned_timeout,
            background_shutdown,
        )));
        tracing::info!(
            model = %info.name, version = %info.version, labels = ?info.labels,
            input = %cfg.kafka.input_topic, group = %cfg.kafka.group_id, delivery = ?cfg.kafka.delivery,
            "worker started; metrics on http://{metrics_addr}/metrics"
        );
        Ok(Worker {
            metrics,
            metrics_addr,
            cfg,
            consumer,
            producer,
            tracker,
            consume,
            batcher,
            router,
            inference,
            background,
            stop_background,
            commits: (commits, stop_commits),
            committer,
            fatal,
        })
    }

    /// Runs until `shutdown`, then drains every stage, commits synchronously
    /// and closes the consumer, all within `shutdown.timeout`.
    pub async fn run(self, mut shutdown: Shutdown) -> Result<(), WorkerError> {
        let Worker {
            metrics,
            cfg,
            consumer,
            producer,
            tracker,
            mut consume,
            batcher,
            router,
            inference,
            background,
            stop_background,
            commits,
            committer,
            fatal,
            ..
        } = self;
        // The consume stage stops on `shutdown` too: look at the signal first,
        // and never poll a finished task again.
        let mut consume_done = false;
        tokio::select! {
            biased;
            _ = shutdown.wait() => {}
            _ = fatal.wait() => {
                // Stop fetching: dropping the consume stage's senders lets the later stages drain.
                consume.abort();
            }
            done = &mut consume => {
                consume_done = true;
                if let Err(e) = done {
                    if e.is_panic() {
                        fatal.set(format!("the consume stage panicked: {e}"));
                    }
                }
                if fatal.get().is_none() {
                    tracing::error!("the consume stage stopped on its own");
                }
            }
        }
        let timeout = cfg.shutdown.timeout;
        let deadline = tokio::time::Instant::now() + timeout;
        tracing::info!(pending = tracker.pending(None), "stopping: finishing in-flight messages");
        let drained = tokio::time::timeout_at(deadline, async {
            if !consume_done {
                let _ = (&mut consume).await;
            }
            for (stage, done) in [("batcher", batcher.await), ("router", router.await)] {
                if let Err(e) = done {
                    if e.is_panic() {
                        fatal.set(format!("the {stage} stage panicked: {e}"));
                    }
                }
            }
        })
        .await
        .is_ok();
        consume.abort();
        consumer.context().closing.store(true, Ordering::SeqCst);

        // The periodic loop stops (and its commit in progress ends) before the final commit.
        // librdkafka's synchronous commit and its close wait for the group
        // coordinator without a limit: each wait below ends at the deadline
        // (or a short grace after it), so that an unreachable broker cannot
        // hold the shutdown for good. What is left blocked is abandoned: the
        // process exits without waiting for it.
        // Where each wait below ends: the deadline, or CLOSE_GRACE from now once it has passed.
        let wait_until = || deadline.max(tokio::time::Instant::now() + CLOSE_GRACE);
        commits.1.trigger();
        let periodic_stopped = tokio::time::timeout_at(wait_until(), commits.0).await.is_ok();
        let until = wait_until();
        let left = until.saturating_duration_since(tokio::time::Instant::now());
        let c = consumer.clone();
        let final_commit = tokio::task::spawn_blocking(move || {
            let _ = producer.flush(left);
            committer.commit(&*c, None)
        });
        // None: no answer in time; Some(false): the broker refused it (counted and logged where it failed).
        let committed = match periodic_stopped {
            true => tokio::time::timeout_at(until, final_commit).await.ok().map(|done| done.unwrap_or(false)),
            false => None,
        };
        let pending = tracker.pending(None);
        metrics.in_flight.set(pending as i64);
        stop_background.trigger();
        for task in background {
            // The readiness loop may be waiting for the broker's metadata.
            let _ = tokio::time::timeout_at(wait_until(), task).await;
        }
        if drained {
            let _ = tokio::task::spawn_blocking(move || inference.join()).await;
        }
        // Closing the consumer leaves the group; librdkafka blocks while doing it.
        if tokio::time::timeout_at(wait_until(), tokio::task::spawn_blocking(move || drop(consumer))).await.is_err() {
            tracing::warn!("the broker did not answer the group leave in time; the group rebalances once this member's session times out");
        }
        if let Some(reason) = fatal.get() {
            return Err(WorkerError::Fatal(reason));
        }
        if !drained || pending > 0 {
            return Err(WorkerError::ShutdownTimeout { timeout, pending });
        }
        match committed {
            None => return Err(WorkerError::FinalCommit { timeout }),
            Some(false) => tracing::warn!(
                "stopped; the final commit was refused: messages since the last commit will be consumed again"
            ),
            Some(true) => tracing::info!("stopped cleanly"),
        }
        Ok(())
    }
}

/// What the readiness loop also watches for liveness.
struct Watch {
    /// Its fatal error, if librdkafka reports one.
    producer: FutureProducer,
    /// In-flight messages and the last acknowledgement.
    tracker: Arc<OffsetTracker>,
    /// `health.stall_timeout`.
    stall_timeout: Duration,
    /// Where a fatal error is reported.
    fatal: Arc<Fatal>,
    /// Exactly-once: the producer's `transactional.id` (a fenced producer's error names it).
    transactional_id: Option<String>,
}

impl Watch {
    /// `triagem_stalled` (and `/healthz`), and librdkafka's fatal errors of both clients.
    fn check(&self, consumer: &WorkerConsumer, metrics: &Metrics) {
        let stalled = self.tracker.stalled_for().is_some_and(|d| d >= self.stall_timeout);
        if stalled && metrics.stalled.get() == 0 {
            tracing::error!(
                pending = self.tracker.pending(None),
                "stalled: messages in flight and no output acknowledged for health.stall_timeout ({}); /healthz \
                 answers 503",
                humantime::format_duration(self.stall_timeout)
            );
        }
        metrics.stalled.set(stalled as i64);
        for (client, fatal) in
            [("consumer", consumer.client().fatal_error()), ("producer", self.producer.client().fatal_error())]
        {
            if let Some((code, reason)) = fatal {
                match (&self.transactional_id, client) {
                    (Some(id), "producer") => self.fatal.set(transaction::fatal_reason(id, code, &reason)),
                    _ => self.fatal.set(format!("fatal {client} error {code:?}: {reason}")),
                }
            }
        }
    }
}

/// `triagem_ready`: 1 while the broker answers a metadata request (the model is
/// loaded by then), every output topic exists and takes produces, and this
/// worker is not idle while its group's lag stands still ([`IdleWatch`]);
/// `triagem_assigned_partitions`, `triagem_idle_with_lag` and
/// `triagem_output_topic_unavailable` with it.
async fn readiness_loop(
    consumer: Arc<WorkerConsumer>,
    topic: String,
    (outputs, output_topics): (Vec<String>, Arc<OutputTopics>),
    watch: Watch,
    metrics: Arc<Metrics>,
    unassigned_timeout: Duration,
    mut stop: Shutdown,
) {
    let mut idle = IdleWatch::new(unassigned_timeout);
    let period = (unassigned_timeout / 4).clamp(Duration::from_millis(250), Duration::from_secs(5));
    loop {
        let (c, t, o) = (consumer.clone(), topic.clone(), outputs.clone());
        let (probe, missing) = tokio::task::spawn_blocking(move || {
            let probe = consume::probe(&*c, &t, Duration::from_secs(5));
            // An unreachable broker is reported at once, without waiting for a second timeout.
            let missing = if probe.reachable { consume::missing_topics(&*c, &o, Duration::from_secs(5)) } else { None };
            (probe, missing)
        })
        .await
        .unwrap_or_default();
        if let Some(missing) = &missing {
            for t in &outputs {
                let gone = missing.contains(t);
                if gone && !output_topics.unavailable().contains(t) {
                    tracing::error!(topic = %t, "output topic does not exist: not ready until it does");
                }
                output_topics.set_missing(&metrics, t, gone);
            }
        }
        let stuck = idle.update(std::time::Instant::now(), &probe);
        if probe.reachable {
            metrics.assigned_partitions.set(probe.assigned as i64);
        }
        let was_idle = metrics.idle_with_lag.get() == 1;
        metrics.idle_with_lag.set(stuck.is_some() as i64);
        match (was_idle, stuck) {
            (false, Some(lag)) => tracing::warn!(
                topic, lag,
                "no partition of {topic} assigned for {} s while the group has {lag} messages of lag that no member \
                 works off: not ready (a group coordinator that never assigns the partitions; see TriagemIdleWhileGroupLags)",
                unassigned_timeout.as_secs()
            ),
            (true, None) => tracing::info!(topic, "no longer idle while the group lags"),
            _ => {}
        }
        watch.check(&consumer, &metrics);
        let ready = probe.reachable && stuck.is_none() && output_topics.unavailable().is_empty();
        let was = metrics.ready.get();
        metrics.ready.set(ready as i64);
        if was != ready as i64 {
            tracing::info!(ready, reachable = probe.reachable, "readiness changed");
        }
        tokio::select! {
            _ = stop.wait() => break,
            _ = tokio::time::sleep(if ready { period } else { Duration::from_secs(1).min(period) }) => {}
        }
    }
    metrics.ready.set(0);
}

/// Tokenises the messages that reached the batcher since its last look, on the
/// model's threads, and returns their token counts. While those threads compute
/// a batch their cores are busy: tokenising on the runtime's threads beside them
/// would take a core from one of them for a while, leaving the other waiting at
/// the end of its part (a backlog drain lost ~15 % that way on two cores); on
/// the pool, a thread done with its part takes this work up instead. The
/// calling runtime thread waits meanwhile — at most a forward pass and the
/// tokenising — while the runtime's other threads go on; handing its tasks
/// over first (`tokio::task::block_in_place`) was measured slower, with the
/// half-load p99 over its bound (docs/benchmarks-log.md, "Tokenising on the
/// model's threads").
fn tokenize_on_model_threads(tokenize: &infer::Tokenize, arrived: &mut [message::Pending]) -> Vec<usize> {
    crate::model::threads::install(|| {
        use rayon::prelude::*;
        arrived
            .par_iter_mut()
            .map(|p| {
                p.ids = tokenize(&p.decoded.text);
                p.ids.len().max(1)
            })
            .collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_producer_always_acks_all_and_is_idempotent() {
        let mut cfg = Config::default();
        // As if validation were skipped: the settings are forced anyway.
        cfg.kafka.client.0.insert("acks".into(), "1".into());
        cfg.kafka.producer.0.insert("enable.idempotence".into(), "false".into());
        cfg.kafka.producer.0.insert("request.required.acks".into(), "0".into());
        let c = producer_config(&cfg);
        assert_eq!(c.get("acks"), Some("all"));
        assert_eq!(c.get("enable.idempotence"), Some("true"));
        assert_eq!(c.get("request.required.acks"), None);
        assert_eq!(c.get("transactional.id"), None);
        assert!(cfg.validate().is_err());
    }

    #[test]
    fn the_producer_lingers_1_ms_unless_told_otherwise() {
        let mut cfg = Config::default();
        assert_eq!(producer_config(&cfg).get("linger.ms"), Some("1"));
        cfg.kafka.producer.0.insert("linger.ms".into(), "20".into());
        assert_eq!(producer_config(&cfg).get("linger.ms"), Some("20"));
    }

    #[test]
    fn exactly_once_makes_the_producer_transactional_and_the_consumer_read_committed() {
        let mut cfg = Config::default();
        cfg.kafka.delivery = Delivery::ExactlyOnce;
        cfg.kafka.group_id = "g".into();
        let id = producer_config(&cfg).get("transactional.id").unwrap().to_string();
        assert!(id.starts_with("triagem-g-") && !id.contains('{'), "{id}");
        assert_eq!(producer_config(&cfg).get("enable.idempotence"), Some("true"));
        assert_eq!(consumer_config(&cfg).get("isolation.level"), Some("read_committed"));
    }
}

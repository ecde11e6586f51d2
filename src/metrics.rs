//! The worker's Prometheus metrics, exactly the names of `docs/metrics.md`
//! (the contract with the dashboard and the alert rules), one prefix
//! `triagem_`, histogram buckets set here and nowhere else; and the HTTP
//! endpoint serving `/metrics`, `/healthz` and `/readyz`.

use std::net::SocketAddr;
use std::sync::Arc;

use prometheus::core::Collector;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Prefix of every metric name.
pub const NAMESPACE: &str = "triagem";

/// Buckets of `triagem_batch_size` (messages).
const BATCH_SIZE_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];
/// Buckets of `triagem_batch_tokens` (padded tokens).
const BATCH_TOKENS_BUCKETS: &[f64] = &[16.0, 64.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0, 16384.0];
/// Buckets of `triagem_inference_seconds`.
const INFERENCE_BUCKETS: &[f64] = &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0];
/// Buckets of `triagem_end_to_end_latency_seconds`.
const LATENCY_BUCKETS: &[f64] = &[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0];

/// Buckets of `triagem_worker_latency_seconds`: finer, around `batch.max_wait` and a few forward passes.
const WORKER_LATENCY_BUCKETS: &[f64] =
    &[0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0];

/// Buckets of `triagem_prediction_score`: a calibrated top score, finest
/// where review thresholds sit (`routing.min_confidence`, 0.96 by default).
/// A two-label model's top score is at least 0.5; a model with more labels
/// counts lower ones in the first bucket.
const SCORE_BUCKETS: &[f64] = &[0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.92, 0.94, 0.95, 0.96, 0.97, 0.98, 0.99, 0.995, 0.999];

/// Buckets of `triagem_transaction_duration_seconds`.
const TRANSACTION_BUCKETS: &[f64] = &[0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

/// Why metrics could not be set up or served.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("metric registration: {0}")]
    Register(#[from] prometheus::Error),
    #[error("metrics.listen {addr}: cannot listen: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
}

/// Every metric of the worker, registered in one registry.
pub struct Metrics {
    /// The registry `/metrics` renders.
    pub registry: Registry,
    /// `triagem_messages_consumed_total{topic,partition}`
    pub consumed: IntCounterVec,
    /// `triagem_messages_classified_total{label}`
    pub classified: IntCounterVec,
    /// `triagem_prediction_score{label}`: each classified message's calibrated
    /// top score, the one `routing.min_confidence` is compared with.
    pub prediction_score: HistogramVec,
    /// `triagem_messages_routed_total{topic,label}`
    pub routed: IntCounterVec,
    /// `triagem_messages_review_total{label}`
    pub review: IntCounterVec,
    /// `triagem_messages_dead_lettered_total{reason}`
    pub dead_lettered: IntCounterVec,
    /// `triagem_produce_errors_total{topic}`
    pub produce_errors: IntCounterVec,
    /// `triagem_commits_total{result}`
    pub commits: IntCounterVec,
    /// `triagem_transactions_total{result}` (exactly-once: `committed`, `aborted`)
    pub transactions: IntCounterVec,
    /// `triagem_transaction_duration_seconds` (exactly-once: from a transaction's begin to its commit or abort)
    pub transaction_seconds: Histogram,
    /// `triagem_batch_size`
    pub batch_size: Histogram,
    /// `triagem_batch_tokens`
    pub batch_tokens: Histogram,
    /// `triagem_inference_seconds`
    pub inference_seconds: Histogram,
    /// `triagem_end_to_end_latency_seconds`
    pub end_to_end_latency: Histogram,
    /// `triagem_worker_latency_seconds`
    pub worker_latency: Histogram,
    /// `triagem_worker_stage_seconds{stage}`: `worker_latency` cut at the forward pass's start and the router's take.
    pub worker_stage: HistogramVec,
    /// Its three series, in [`STAGES`] order (looked up once, not per message).
    stage_series: [Histogram; 3],
    /// `triagem_queue_depth{queue}`
    pub queue_depth: IntGaugeVec,
    /// `triagem_consumer_lag{topic,partition}`
    pub consumer_lag: IntGaugeVec,
    /// `triagem_in_flight_messages`
    pub in_flight: IntGauge,
    /// `triagem_in_flight_bytes`
    pub in_flight_bytes: IntGauge,
    /// `triagem_model_info{name,version,labels,device}`
    pub model_info: IntGaugeVec,
    /// `triagem_ready`
    pub ready: IntGauge,
    /// `triagem_offset_gaps_total{topic,partition}`
    pub offset_gaps: IntCounterVec,
    /// `triagem_offsets_skipped_total{topic,partition}`
    pub offsets_skipped: IntCounterVec,
    /// `triagem_assigned_partitions`
    pub assigned_partitions: IntGauge,
    /// `triagem_idle_with_lag`
    pub idle_with_lag: IntGauge,
    /// `triagem_consumer_paused`
    pub consumer_paused: IntGauge,
    /// `triagem_stalled`
    pub stalled: IntGauge,
    /// `triagem_oldest_unacked_seconds{topic,partition}`
    pub oldest_unacked: prometheus::GaugeVec,
    /// `triagem_outputs_abandoned_total`
    pub outputs_abandoned: prometheus::IntCounter,
    /// `triagem_output_field_replaced_total`
    pub output_field_replaced: prometheus::IntCounter,
    /// `triagem_outputs_rejected_total{topic}`
    pub outputs_rejected: IntCounterVec,
    /// `triagem_output_topic_unavailable{topic}`
    pub output_topic_unavailable: IntGaugeVec,
}

fn counter(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> Result<IntCounterVec, prometheus::Error> {
    let c = IntCounterVec::new(Opts::new(name, help).namespace(NAMESPACE), labels)?;
    registry.register(Box::new(c.clone()))?;
    Ok(c)
}

fn histogram(registry: &Registry, name: &str, help: &str, buckets: &[f64]) -> Result<Histogram, prometheus::Error> {
    let h = Histogram::with_opts(HistogramOpts::new(name, help).namespace(NAMESPACE).buckets(buckets.to_vec()))?;
    registry.register(Box::new(h.clone()))?;
    Ok(h)
}

fn histogram_vec(
    registry: &Registry,
    name: &str,
    help: &str,
    buckets: &[f64],
    labels: &[&str],
) -> Result<HistogramVec, prometheus::Error> {
    let h = HistogramVec::new(HistogramOpts::new(name, help).namespace(NAMESPACE).buckets(buckets.to_vec()), labels)?;
    registry.register(Box::new(h.clone()))?;
    Ok(h)
}

fn gauge_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> Result<IntGaugeVec, prometheus::Error> {
    let g = IntGaugeVec::new(Opts::new(name, help).namespace(NAMESPACE), labels)?;
    registry.register(Box::new(g.clone()))?;
    Ok(g)
}

fn gauge(registry: &Registry, name: &str, help: &str) -> Result<IntGauge, prometheus::Error> {
    let g = IntGauge::with_opts(Opts::new(name, help).namespace(NAMESPACE))?;
    registry.register(Box::new(g.clone()))?;
    Ok(g)
}

impl Metrics {
    /// A fresh registry with every metric and the process collector.
    pub fn new() -> Result<Arc<Self>, MetricsError> {
        let r = Registry::new();
        #[cfg(target_os = "linux")]
        r.register(Box::new(prometheus::process_collector::ProcessCollector::new(
            std::process::id() as i32,
            NAMESPACE,
        )))?;
        let worker_stage = histogram_vec(
            &r,
            "worker_stage_seconds",
            "The worker's latency by stage: queue (receipt to the start of its batch's forward pass), \
             inference (to the router's take of its window) and delivery (to the broker's acknowledgement).",
            WORKER_LATENCY_BUCKETS,
            &["stage"],
        )?;
        let m = Metrics {
            stage_series: STAGES.map(|stage| worker_stage.with_label_values(&[stage])),
            worker_stage,
            consumed: counter(
                &r,
                "messages_consumed_total",
                "Messages read from the input topic.",
                &["topic", "partition"],
            )?,
            classified: counter(
                &r,
                "messages_classified_total",
                "Messages the model classified, by predicted label.",
                &["label"],
            )?,
            prediction_score: histogram_vec(
                &r,
                "prediction_score",
                "Calibrated score of each classified message's predicted label (the one routing.min_confidence is \
                 compared with), by predicted label.",
                SCORE_BUCKETS,
                &["label"],
            )?,
            routed: counter(
                &r,
                "messages_routed_total",
                "Outputs acknowledged by the broker, by destination topic (label or review topic).",
                &["topic", "label"],
            )?,
            review: counter(
                &r,
                "messages_review_total",
                "Messages sent to the review topic because the score was below routing.min_confidence.",
                &["label"],
            )?,
            dead_lettered: counter(
                &r,
                "messages_dead_lettered_total",
                "Messages sent to the dead-letter topic.",
                &["reason"],
            )?,
            produce_errors: counter(
                &r,
                "produce_errors_total",
                "Produce attempts the broker rejected or that timed out (retried).",
                &["topic"],
            )?,
            commits: counter(&r, "commits_total", "Offset commits.", &["result"])?,
            transactions: counter(
                &r,
                "transactions_total",
                "Exactly-once: transactions ended, by result (committed, aborted).",
                &["result"],
            )?,
            transaction_seconds: histogram(
                &r,
                "transaction_duration_seconds",
                "Exactly-once: from a transaction's begin to the end of its commit or abort.",
                TRANSACTION_BUCKETS,
            )?,
            batch_size: histogram(&r, "batch_size", "Messages per inference batch.", BATCH_SIZE_BUCKETS)?,
            batch_tokens: histogram(&r, "batch_tokens", "Padded tokens per inference batch.", BATCH_TOKENS_BUCKETS)?,
            inference_seconds: histogram(
                &r,
                "inference_seconds",
                "Time of one batch's forward pass.",
                INFERENCE_BUCKETS,
            )?,
            end_to_end_latency: histogram(
                &r,
                "end_to_end_latency_seconds",
                "From the input message's Kafka timestamp to the broker's acknowledgement of its output.",
                LATENCY_BUCKETS,
            )?,
            worker_latency: histogram(
                &r,
                "worker_latency_seconds",
                "From the worker's receipt of the input message to the broker's acknowledgement of its output.",
                WORKER_LATENCY_BUCKETS,
            )?,
            queue_depth: gauge_vec(&r, "queue_depth", "Messages waiting in each internal queue.", &["queue"])?,
            consumer_lag: gauge_vec(
                &r,
                "consumer_lag",
                "High watermark minus committed offset, per assigned partition.",
                &["topic", "partition"],
            )?,
            in_flight: gauge(&r, "in_flight_messages", "Consumed messages whose offset is not yet committable.")?,
            in_flight_bytes: gauge(
                &r,
                "in_flight_bytes",
                "Bytes (value, key and headers) of the messages in flight, against kafka.max_in_flight_bytes.",
            )?,
            model_info: gauge_vec(
                &r,
                "model_info",
                "The model being served (always 1).",
                &["name", "version", "labels", "device"],
            )?,
            ready: gauge(
                &r,
                "ready",
                "1 when the model is loaded, the broker reachable, and not idle while the group's lag stands still.",
            )?,
            offset_gaps: counter(
                &r,
                "offset_gaps_total",
                "Gaps between consecutive consumed offsets of a partition (or between the committed offset and the \
                 first message after an assignment).",
                &["topic", "partition"],
            )?,
            offsets_skipped: counter(
                &r,
                "offsets_skipped_total",
                "Offsets inside those gaps: records the broker never returned.",
                &["topic", "partition"],
            )?,
            assigned_partitions: gauge(&r, "assigned_partitions", "Input partitions assigned to this worker.")?,
            idle_with_lag: gauge(
                &r,
                "idle_with_lag",
                "1 while this worker holds no partition and its group's lag has stood still for \
                 kafka.unassigned_timeout.",
            )?,
            outputs_abandoned: {
                let c = prometheus::IntCounter::with_opts(
                    Opts::new(
                        "outputs_abandoned_total",
                        "Outputs not produced (or not retried) because their input partition was revoked meanwhile; \
                         its new owner routes the message.",
                    )
                    .namespace(NAMESPACE),
                )?;
                r.register(Box::new(c.clone()))?;
                c
            },
            output_field_replaced: {
                let c = prometheus::IntCounter::with_opts(
                    Opts::new(
                        "output_field_replaced_total",
                        "Routed outputs whose input already had a field named routing.output_field: the \
                         classification replaced it.",
                    )
                    .namespace(NAMESPACE),
                )?;
                r.register(Box::new(c.clone()))?;
                c
            },
            oldest_unacked: {
                let g = prometheus::GaugeVec::new(
                    Opts::new(
                        "oldest_unacked_seconds",
                        "Per assigned partition, how long its oldest consumed message has waited for its output's \
                         acknowledgement (0 when none waits); unlike the lag, known before the group's first commit.",
                    )
                    .namespace(NAMESPACE),
                    &["topic", "partition"],
                )?;
                r.register(Box::new(g.clone()))?;
                g
            },
            stalled: gauge(
                &r,
                "stalled",
                "1 while messages are in flight and none has had its output acknowledged for health.stall_timeout; \
                 /healthz then answers 503.",
            )?,
            consumer_paused: gauge(
                &r,
                "consumer_paused",
                "1 while fetching is paused because kafka.max_in_flight messages or kafka.max_in_flight_bytes \
                 bytes are in flight (the consumer is still polled).",
            )?,
            outputs_rejected: counter(
                &r,
                "outputs_rejected_total",
                "Outputs that can never be produced (over message.max.bytes, invalid): dead-lettered instead, or \
                 sent as a stub without payload when the dead letter itself is rejected.",
                &["topic"],
            )?,
            output_topic_unavailable: gauge_vec(
                &r,
                "output_topic_unavailable",
                "1 while an output topic is missing from the broker's metadata or its produces fail as missing or \
                 forbidden; the worker is then not ready.",
                &["topic"],
            )?,
            registry: r,
        };
        for q in [QUEUE_BATCHER, QUEUE_INFERENCE, QUEUE_PRODUCER] {
            m.queue_depth.with_label_values(&[q]).set(0);
        }
        Ok(Arc::new(m))
    }

    /// Creates every labelled counter series the worker can touch at zero, so
    /// that `/metrics` lists them from the start and `rate()` sees the first event.
    /// `routes` are (label, topic) pairs, review topic included.
    pub fn preset(&self, labels: &[String], routes: &[(String, String)], dead_letter_topic: &str, reasons: &[&str]) {
        for label in labels {
            self.classified.with_label_values(&[label.as_str()]);
            self.prediction_score.with_label_values(&[label.as_str()]);
            self.review.with_label_values(&[label.as_str()]);
        }
        for (label, topic) in routes {
            self.routed.with_label_values(&[topic.as_str(), label.as_str()]);
            self.produce_errors.with_label_values(&[topic.as_str()]);
            self.outputs_rejected.with_label_values(&[topic.as_str()]);
            self.output_topic_unavailable.with_label_values(&[topic.as_str()]);
        }
        self.produce_errors.with_label_values(&[dead_letter_topic]);
        self.outputs_rejected.with_label_values(&[dead_letter_topic]);
        self.output_topic_unavailable.with_label_values(&[dead_letter_topic]);
        for reason in reasons {
            self.dead_lettered.with_label_values(&[reason]);
        }
        for result in ["ok", "error"] {
            self.commits.with_label_values(&[result]);
        }
    }

    /// The registry in Prometheus text format.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        // Encoding into a Vec cannot fail for well-formed metric families.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    }

    /// The gauge of one internal queue.
    pub fn queue(&self, name: &str) -> IntGauge {
        self.queue_depth.with_label_values(&[name])
    }
}

/// The series a prediction is recorded in — `triagem_messages_classified_total`
/// and `triagem_prediction_score` of its label —, looked up once per label by
/// the inference thread that owns it rather than once per message.
#[derive(Default)]
pub struct ClassifiedSeries(Vec<(String, prometheus::IntCounter, Histogram)>);

impl ClassifiedSeries {
    /// Counts one message classified as `label` and observes its calibrated `score`.
    pub fn observe(&mut self, metrics: &Metrics, label: &str, score: f32) {
        let i = match self.0.iter().position(|(l, ..)| l == label) {
            Some(i) => i,
            None => {
                let counter = metrics.classified.with_label_values(&[label]);
                let histogram = metrics.prediction_score.with_label_values(&[label]);
                self.0.push((label.to_string(), counter, histogram));
                self.0.len() - 1
            }
        };
        let (_, counter, histogram) = &self.0[i];
        counter.inc();
        histogram.observe(f64::from(score));
    }
}

/// `triagem_queue_depth{queue="batcher"}`: decoded messages waiting for a batch to close.
pub const QUEUE_BATCHER: &str = "batcher";
/// `triagem_queue_depth{queue="inference"}`: messages in closed batches waiting for the model.
pub const QUEUE_INFERENCE: &str = "inference";
/// `triagem_queue_depth{queue="producer"}`: outputs handed to the producer and not yet acknowledged.
pub const QUEUE_PRODUCER: &str = "producer";

/// `triagem_worker_stage_seconds{stage="queue"}`: from the worker's receipt
/// of a message to the start of its batch's forward pass (decoding,
/// tokenising, the batcher's window, the batch in front of the model).
pub const STAGE_QUEUE: &str = "queue";
/// `triagem_worker_stage_seconds{stage="inference"}`: from there to the
/// router's take of its window (its batch's forward pass, the window's later
/// batches, the hand-over).
pub const STAGE_INFERENCE: &str = "inference";
/// `triagem_worker_stage_seconds{stage="delivery"}`: from there to the
/// broker's acknowledgement of its output (rendering, the producer's queue,
/// `linger.ms`, the broker's round trip, retries).
pub const STAGE_DELIVERY: &str = "delivery";
/// The stages of `triagem_worker_stage_seconds`, in the order a message passes them.
pub const STAGES: [&str; 3] = [STAGE_QUEUE, STAGE_INFERENCE, STAGE_DELIVERY];

impl Metrics {
    /// A delivered output's worker latency and its stages: `received` (out of
    /// the consumer), `forwarded` (its batch's forward pass began) and `routed`
    /// (the router took its window), up to `now`. The stages are observed only
    /// when all three instants are known (a dead letter of an undecodable
    /// message never reaches the model), so they add up to the latency of the
    /// same messages.
    pub fn observe_worker_latency(
        &self,
        received: std::time::Instant,
        forwarded: Option<std::time::Instant>,
        routed: Option<std::time::Instant>,
        now: std::time::Instant,
    ) {
        self.worker_latency.observe(now.saturating_duration_since(received).as_secs_f64());
        if let (Some(forwarded), Some(routed)) = (forwarded, routed) {
            for (series, (from, to)) in
                self.stage_series.iter().zip([(received, forwarded), (forwarded, routed), (routed, now)])
            {
                series.observe(to.saturating_duration_since(from).as_secs_f64());
            }
        }
    }
}

/// Serves `/metrics`, `/healthz` (200 unless `triagem_stalled`: the worker
/// cannot make progress, and should be restarted) and `/readyz` (200 when
/// `triagem_ready` is 1, else 503 with the reason) on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use axum::http::{header, StatusCode};
    use axum::routing::get;

    let m = metrics.clone();
    let r = metrics.clone();
    let h = metrics.clone();
    let app = axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let m = m.clone();
                async move { ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], m.render()) }
            }),
        )
        .route(
            "/healthz",
            get(move || {
                let h = h.clone();
                async move {
                    if h.stalled.get() == 1 {
                        let why = "stalled: messages in flight and no output acknowledged for health.stall_timeout \
                                   (triagem_stalled)\n";
                        (StatusCode::SERVICE_UNAVAILABLE, why)
                    } else {
                        (StatusCode::OK, "ok\n")
                    }
                }
            }),
        )
        .route(
            "/readyz",
            get(move || {
                let r = r.clone();
                async move {
                    let unavailable: Vec<String> = r
                        .output_topic_unavailable
                        .collect()
                        .iter()
                        .flat_map(|f| f.get_metric().iter())
                        .filter(|m| m.get_gauge().as_ref().is_some_and(|g| g.value() > 0.0))
                        .flat_map(|m| m.get_label().iter().map(|l| l.value().to_string()))
                        .collect();
                    if r.ready.get() == 1 {
                        (StatusCode::OK, "ready\n".to_string())
                    } else if !unavailable.is_empty() {
                        let why = format!(
                            "not ready: output topic(s) missing or forbidden: {} (triagem_output_topic_unavailable)\n",
                            unavailable.join(", ")
                        );
                        (StatusCode::SERVICE_UNAVAILABLE, why)
                    } else if r.idle_with_lag.get() == 1 {
                        let why = "not ready: no input partition assigned while the group's lag stands still \
                                   (triagem_idle_with_lag)\n";
                        (StatusCode::SERVICE_UNAVAILABLE, why.to_string())
                    } else {
                        let why = "not ready: the model is loading, the broker does not answer, or the worker stops\n";
                        (StatusCode::SERVICE_UNAVAILABLE, why.to_string())
                    }
                }
            }),
        );
    axum::serve(listener, app).with_graceful_shutdown(shutdown).await
}

/// Binds `addr` for [`serve`], with an error naming the setting.
pub async fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener, MetricsError> {
    tokio::net::TcpListener::bind(addr).await.map_err(|source| MetricsError::Bind { addr, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_documented_metric_is_exported() {
        let m = Metrics::new().unwrap();
        // Labelled families only appear once a child exists.
        m.consumed.with_label_values(&["t", "0"]).inc();
        m.classified.with_label_values(&["venda"]).inc();
        m.prediction_score.with_label_values(&["venda"]).observe(0.97);
        m.routed.with_label_values(&["t", "venda"]).inc();
        m.review.with_label_values(&["venda"]).inc();
        m.dead_lettered.with_label_values(&["oversize"]).inc();
        m.produce_errors.with_label_values(&["t"]).inc();
        m.commits.with_label_values(&["ok"]).inc();
        m.consumer_lag.with_label_values(&["t", "0"]).set(3);
        m.model_info.with_label_values(&["n", "v", "a,b", "cpu"]).set(1);
        m.offset_gaps.with_label_values(&["t", "0"]).inc();
        m.offsets_skipped.with_label_values(&["t", "0"]).inc();
        m.outputs_rejected.with_label_values(&["t"]).inc();
        m.oldest_unacked.with_label_values(&["t", "0"]).set(1.5);
        m.output_topic_unavailable.with_label_values(&["t"]).set(0);
        m.transactions.with_label_values(&["committed"]).inc();
        let text = m.render();
        let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/metrics.md")).unwrap();
        let mut names = Vec::new();
        for line in doc.lines().filter(|l| l.starts_with("| `triagem_")) {
            let first_cell = line.split('|').nth(1).unwrap();
            for part in first_cell.split('`').filter(|p| p.starts_with("triagem_")) {
                names.push(part.to_string());
            }
        }
        assert!(names.len() >= 20, "{names:?}");
        for name in names {
            assert!(text.contains(&format!("\n{name}")) || text.contains(&format!("# TYPE {name} ")), "{name} missing");
        }
    }

    #[test]
    fn a_prediction_is_counted_and_its_score_observed_under_its_label() {
        let m = Metrics::new().unwrap();
        let mut series = ClassifiedSeries::default();
        for (label, score) in [("venda", 0.97), ("suporte", 0.6), ("venda", 0.99)] {
            series.observe(&m, label, score);
        }
        let (venda, suporte) =
            (m.prediction_score.with_label_values(&["venda"]), m.prediction_score.with_label_values(&["suporte"]));
        assert_eq!((venda.get_sample_count(), suporte.get_sample_count()), (2, 1));
        assert!((venda.get_sample_sum() - 1.96).abs() < 1e-6 && (suporte.get_sample_sum() - 0.6).abs() < 1e-6);
        assert_eq!(m.classified.with_label_values(&["venda"]).get(), 2);
        assert_eq!(m.classified.with_label_values(&["suporte"]).get(), 1);
    }

    #[test]
    fn the_stages_cut_the_worker_latency_at_the_forward_pass_and_the_router() {
        use std::time::{Duration, Instant};
        let m = Metrics::new().unwrap();
        let received = Instant::now();
        let ms = |n: u64| received + Duration::from_millis(n);
        m.observe_worker_latency(received, Some(ms(12)), Some(ms(15)), ms(19));
        // An undecodable message's dead letter: latency only.
        m.observe_worker_latency(received, None, None, ms(2));
        let stage = |s: &str| m.worker_stage.with_label_values(&[s]);
        assert_eq!(m.worker_latency.get_sample_count(), 2);
        let mut sum = 0.0;
        for (s, want) in [(STAGE_QUEUE, 0.012), (STAGE_INFERENCE, 0.003), (STAGE_DELIVERY, 0.004)] {
            assert_eq!(stage(s).get_sample_count(), 1, "{s}");
            assert!((stage(s).get_sample_sum() - want).abs() < 1e-9, "{s}: {}", stage(s).get_sample_sum());
            sum += stage(s).get_sample_sum();
        }
        assert!((sum - 0.019).abs() < 1e-9, "the stages add up to the first message's latency");
        let text = m.render();
        for s in STAGES {
            assert!(text.contains(&format!("triagem_worker_stage_seconds_count{{stage=\"{s}\"}} 1")), "{s}");
        }
    }
}

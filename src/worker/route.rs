//! Routing and producing. Each classified message goes to its label's topic
//! (or the review topic when its score is below `routing.min_confidence`);
//! each poison message goes to the dead-letter topic, bytes unchanged. An
//! offset is acknowledged to the [`OffsetTracker`] only when the broker has
//! acknowledged the output.
//!
//! A failed produce is classified ([`ProduceFailure`]): a transient error is
//! retried; a topic that is missing or forbidden is retried too, and reported
//! (`triagem_output_topic_unavailable`, not ready) until it works; a record
//! that can never be produced (over `message.max.bytes`, rejected by the
//! broker as invalid) is dead-lettered instead, and a dead letter that
//! cannot be produced becomes a stub — the reason and source headers, no
//! payload — so that the partition's offset moves on.
//!
//! Exactly-once (`kafka.delivery = "exactly_once"`): each output is
//! enqueued inside the open transaction and its offset acknowledged at once
//! (see `transaction`); a failed delivery fails the transaction, which is
//! aborted and redone, instead of being retried here.
//!
//! The output value is the input JSON object plus a `triagem` object (for
//! text input, `{"text": ..., "triagem": ...}`); its headers are the input's
//! plus the ones named below.

use std::sync::Arc;
use std::time::Duration;

use chrono::{SecondsFormat, Utc};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use super::infer::Classified;
use serde_json::{json, Map, Value};

use super::message::{Body, Decoded, Envelope, Poison, Slot};
use super::offsets::OffsetTracker;
use crate::config::RoutingConfig;
use crate::metrics::{Metrics, QUEUE_PRODUCER};
use crate::model::{ModelInfo, Prediction};

/// Header carrying the predicted label on a routed message.
pub const HEADER_LABEL: &str = "triagem-label";
/// Header carrying the label's probability on a routed message.
pub const HEADER_SCORE: &str = "triagem-score";
/// Header carrying the dead-letter reason.
pub const HEADER_ERROR: &str = "triagem-error";
/// Header carrying the input topic of an output (routed or dead letter).
pub const HEADER_SOURCE_TOPIC: &str = "triagem-source-topic";
/// Header carrying the input partition of an output.
pub const HEADER_SOURCE_PARTITION: &str = "triagem-source-partition";
/// Header carrying the input offset of an output.
pub const HEADER_SOURCE_OFFSET: &str = "triagem-source-offset";
/// Header of a dead-letter stub: the payload's size and why it was left out.
pub const HEADER_PAYLOAD_DROPPED: &str = "triagem-payload-dropped";

/// What a failed produce means for its record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProduceFailure {
    /// May succeed later (a broker down, a timeout, a leader change): retry.
    Transient,
    /// The topic does not exist or this worker may not write it: retry, and
    /// report the topic unavailable until a produce to it succeeds.
    TopicUnavailable,
    /// This record can never be produced (too large, invalid): dead-letter it.
    RecordRejected,
}

/// Classifies a produce error (from the enqueue or from the delivery report).
pub fn classify(error: &KafkaError) -> ProduceFailure {
    use RDKafkaErrorCode as C;
    let code = match error {
        KafkaError::MessageProduction(code) => *code,
        _ => return ProduceFailure::Transient,
    };
    match code {
        C::MessageSizeTooLarge
        | C::MessageBatchTooLarge
        | C::InvalidMessageSize
        | C::InvalidRecord
        | C::PolicyViolation => ProduceFailure::RecordRejected,
        C::UnknownTopicOrPartition
        | C::UnknownTopic
        | C::UnknownPartition
        | C::UnknownTopicId
        | C::InvalidTopic
        | C::TopicAuthorizationFailed
        | C::ClusterAuthorizationFailed => ProduceFailure::TopicUnavailable,
        _ => ProduceFailure::Transient,
    }
}

/// Output topics that are missing (seen in the broker's metadata) or that a
/// produce found missing or forbidden; kept in `triagem_output_topic_unavailable`.
#[derive(Debug, Default)]
pub struct OutputTopics {
    /// Per topic: (missing from the metadata, last produce failed on the topic).
    state: std::sync::Mutex<std::collections::BTreeMap<String, (bool, bool)>>,
}

impl OutputTopics {
    fn update(&self, metrics: &Metrics, topic: &str, f: impl FnOnce(&mut (bool, bool))) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let entry = state.entry(topic.to_string()).or_default();
        f(entry);
        metrics.output_topic_unavailable.with_label_values(&[topic]).set((entry.0 || entry.1) as i64);
    }

    /// What the metadata says: `missing` topics do not exist.
    pub fn set_missing(&self, metrics: &Metrics, topic: &str, missing: bool) {
        self.update(metrics, topic, |e| e.0 = missing);
    }

    /// What the last produce to `topic` said.
    pub fn set_failing(&self, metrics: &Metrics, topic: &str, failing: bool) {
        self.update(metrics, topic, |e| e.1 = failing);
    }

    /// The topics unavailable now.
    pub fn unavailable(&self) -> Vec<String> {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.iter().filter(|(_, (m, f))| *m || *f).map(|(t, _)| t.clone()).collect()
    }
}

/// What reaches the router.
pub enum Outcome {
    /// A batch back from the inference thread.
    Classified(Vec<Classified>),
    /// A message that could not be decoded (boxed: rare, and larger than a batch's vector).
    Poison { envelope: Box<Envelope>, poison: Poison, slot: Slot },
}

/// Why an output is produced: decides which counters its acknowledgement moves.
#[derive(Debug, Clone, PartialEq)]
pub enum Destination {
    /// The label's topic.
    Label(String),
    /// The review topic (score below `routing.min_confidence`).
    Review(String),
    /// The dead-letter topic, with the reason.
    DeadLetter(&'static str),
}

/// One record to produce, and what to acknowledge once it is delivered.
pub struct Output {
    /// Destination topic.
    pub topic: String,
    /// Why it goes there.
    pub destination: Destination,
    /// Value bytes.
    pub payload: Vec<u8>,
    /// Headers, in order.
    pub headers: Vec<(String, Option<Vec<u8>>)>,
    /// The input message (key, source coordinates, timestamp).
    pub envelope: Envelope,
    /// Released on acknowledgement.
    pub slot: Slot,
    /// A dead letter already cut down to a stub (nothing left to drop).
    pub stub: bool,
    /// When the router took the message's window from the inference thread
    /// (the end of its `inference` stage); None for an undecodable message.
    pub routed: Option<std::time::Instant>,
}

/// Turns outcomes into outputs and produces them.
#[derive(Clone)]
pub struct Router {
    /// Shared producer (librdkafka batches and retries internally).
    pub producer: FutureProducer,
    /// Topics and the review threshold.
    pub routing: RoutingConfig,
    /// Stamped into every routed message.
    pub model: ModelInfo,
    /// Told about every acknowledged output.
    pub tracker: Arc<OffsetTracker>,
    /// Counters and the producer queue gauge.
    pub metrics: Arc<Metrics>,
    /// Wait before retrying a failed produce.
    pub retry_backoff: Duration,
    /// Output topics found missing or forbidden.
    pub topics: Arc<OutputTopics>,
    /// Told when a delivery task panics (its offset could never be acknowledged).
    pub fatal: Arc<super::Fatal>,
    /// Exactly-once: the open transaction every output goes into.
    pub transactions: Option<Arc<super::transaction::Transactions>>,
}

impl Router {
    /// The outputs of one outcome.
    pub fn outputs(&self, outcome: Outcome) -> Vec<Output> {
        match outcome {
            Outcome::Poison { envelope, poison, slot } => vec![self.dead_letter(*envelope, poison, slot)],
            Outcome::Classified(batch) => {
                let taken = std::time::Instant::now();
                let now = Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true);
                batch
                    .into_iter()
                    .map(|c| {
                        let Classified { pending, result } = c;
                        match result {
                            Err(e) => Output {
                                routed: Some(taken),
                                ..self.dead_letter(pending.envelope, Poison::Inference(e.to_string()), pending.slot)
                            },
                            Ok(prediction) => {
                                let (topic, destination) = self.destination(&prediction.label, prediction.score);
                                let (payload, replaced) = render_output(
                                    &pending.decoded,
                                    &prediction,
                                    &self.model,
                                    &self.routing.output_field,
                                    &now,
                                );
                                if replaced {
                                    self.metrics.output_field_replaced.inc();
                                }
                                Output {
                                    topic,
                                    destination,
                                    payload,
                                    headers: output_headers(&pending.envelope, &prediction),
                                    envelope: pending.envelope,
                                    slot: pending.slot,
                                    stub: false,
                                    routed: Some(taken),
                                }
                            }
                        }
                    })
                    .collect()
            }
        }
    }

    /// The topic for a prediction: the review topic below the threshold, else the label's.
    pub fn destination(&self, label: &str, score: f32) -> (String, Destination) {
        if score < self.routing.min_confidence {
            return (self.routing.review_topic.clone(), Destination::Review(label.to_string()));
        }
        match self.routing.topics.get(label) {
            Some(topic) => (topic.clone(), Destination::Label(label.to_string())),
            // Checked at start-up; kept safe: an unroutable label goes to review.
            None => (self.routing.review_topic.clone(), Destination::Review(label.to_string())),
        }
    }

    fn dead_letter(&self, envelope: Envelope, poison: Poison, slot: Slot) -> Output {
        tracing::debug!(
            topic = %envelope.topic, partition = envelope.partition, offset = envelope.offset,
            error = %poison, "dead letter"
        );
        let output = Output {
            topic: self.routing.dead_letter_topic.clone(),
            destination: Destination::DeadLetter(poison.reason()),
            payload: Vec::new(),
            headers: dead_letter_headers(&envelope, &poison),
            envelope,
            slot,
            stub: false,
            routed: None,
        };
        let size = output.envelope.payload.as_ref().map_or(0, Vec::len);
        if size > self.routing.dead_letter_max_bytes {
            let why = format!("over routing.dead_letter_max_bytes = {}", self.routing.dead_letter_max_bytes);
            return stub(output, &why);
        }
        let payload = output.envelope.payload.clone().unwrap_or_default();
        Output { payload, ..output }
    }

    /// Hands `output` to the producer now (waiting while its queue is full),
    /// so that outputs are enqueued in the order this is called.
    async fn enqueue(&self, output: &Output) -> Result<DeliveryFuture, KafkaError> {
        loop {
            match self.send_now(output) {
                Err(KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull)) => {
                    tokio::time::sleep(Duration::from_millis(5)).await
                }
                r => return r,
            }
        }
    }

    /// One attempt to hand `output` to the producer.
    fn send_now(&self, output: &Output) -> Result<DeliveryFuture, KafkaError> {
        let mut headers = OwnedHeaders::new_with_capacity(output.headers.len());
        for (key, value) in &output.headers {
            headers = headers.insert(Header { key, value: value.as_deref() });
        }
        let mut record = FutureRecord::<[u8], [u8]>::to(&output.topic).payload(&output.payload).headers(headers);
        if let Some(key) = &output.envelope.key {
            record = record.key(key);
        }
        self.producer.send_result(record).map_err(|(e, _)| e)
    }

    /// Exactly-once: enqueues `output` inside the open transaction and
    /// acknowledges its offset under the same hold (so the commit that takes
    /// the offset takes the output too); a record the producer rejects for good
    /// is dead-lettered instead, in the same transaction. Returns the delivery
    /// to await, or None when the output was abandoned (its partition revoked
    /// or rewound meanwhile) or rejected.
    async fn enqueue_in_transaction(
        &self,
        transactions: &super::transaction::Transactions,
        mut output: Output,
    ) -> Option<(Output, DeliveryFuture)> {
        let mut attempt = 0u32;
        loop {
            if !self.current(&output) {
                return None;
            }
            let sent = match transactions.try_enter() {
                None => None,
                Some(_open) => {
                    let sent = self.send_now(&output);
                    if sent.is_ok() {
                        let e = &output.envelope;
                        self.tracker.ack(&e.topic, e.partition, e.offset);
                        transactions.produced();
                    }
                    Some(sent)
                }
            };
            match sent {
                // A commit is running: the next transaction opens in a moment.
                None => tokio::time::sleep(Duration::from_millis(1)).await,
                Some(Ok(delivery)) => return Some((output, delivery)),
                Some(Err(KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull))) => {
                    tokio::time::sleep(Duration::from_millis(5)).await
                }
                Some(Err(e)) if classify(&e) == ProduceFailure::RecordRejected => {
                    self.metrics.produce_errors.with_label_values(&[output.topic.as_str()]).inc();
                    output = self.rejected(output, &e)?;
                }
                Some(Err(e)) => {
                    // E.g. the transaction failed and waits for its abort: the rewind abandons this output.
                    attempt += 1;
                    self.metrics.produce_errors.with_label_values(&[output.topic.as_str()]).inc();
                    tracing::debug!(topic = %output.topic, error = %e, attempt, "produce in transaction failed; retrying");
                    tokio::time::sleep(self.retry_backoff.min(Duration::from_millis(10) * attempt)).await;
                }
            }
        }
    }

    /// Exactly-once: waits for an output's delivery, for the counters; a
    /// failure fails its transaction's commit, which is aborted and redone.
    async fn settle_in_transaction(self, output: Output, delivery: DeliveryFuture) {
        let gauge = self.metrics.queue(QUEUE_PRODUCER);
        gauge.inc();
        match delivery.await {
            Ok(Ok(_)) => {
                self.topics.set_failing(&self.metrics, &output.topic, false);
                self.count(&output);
            }
            Ok(Err((e, _))) => {
                self.metrics.produce_errors.with_label_values(&[output.topic.as_str()]).inc();
                if classify(&e) == ProduceFailure::TopicUnavailable {
                    self.topics.set_failing(&self.metrics, &output.topic, true);
                }
                tracing::warn!(topic = %output.topic, error = %e, "output failed inside its transaction; the transaction will be aborted and redone");
            }
            Err(_) => {}
        }
        gauge.dec();
    }

    /// Waits for the broker's acknowledgement of an enqueued output, handles
    /// failures by their [`ProduceFailure`], then acknowledges the input offset.
    pub async fn settle(self, mut output: Output, mut enqueued: Result<DeliveryFuture, KafkaError>) {
        let gauge = self.metrics.queue(QUEUE_PRODUCER);
        gauge.inc();
        let mut attempt = 0u32;
        loop {
            let result = match enqueued {
                Ok(delivery) => match delivery.await {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err((e, _))) => Err(e),
                    Err(_) => Err(KafkaError::Canceled),
                },
                Err(e) => Err(e),
            };
            let Err(e) = result else { break };
            attempt += 1;
            self.metrics.produce_errors.with_label_values(&[output.topic.as_str()]).inc();
            match classify(&e) {
                ProduceFailure::RecordRejected => match self.rejected(output, &e) {
                    Some(next) => {
                        output = next;
                        attempt = 0;
                    }
                    None => {
                        gauge.dec();
                        return;
                    }
                },
                ProduceFailure::TopicUnavailable => {
                    if attempt == 1 {
                        tracing::error!(
                            topic = %output.topic, error = %e,
                            "output topic missing or forbidden; retrying (triagem_output_topic_unavailable)"
                        );
                    }
                    self.topics.set_failing(&self.metrics, &output.topic, true);
                    tokio::time::sleep(self.retry_backoff).await;
                }
                ProduceFailure::Transient => {
                    tracing::warn!(topic = %output.topic, error = %e, attempt, "produce failed; retrying");
                    tokio::time::sleep(self.retry_backoff.min(Duration::from_millis(100) * attempt)).await;
                }
            }
            if !self.current(&output) {
                gauge.dec();
                return;
            }
            enqueued = self.enqueue(&output).await;
        }
        gauge.dec();
        self.topics.set_failing(&self.metrics, &output.topic, false);
        self.acknowledged(&output);
    }

    /// A record the producer or broker rejects for good: what to produce
    /// instead (a dead letter; for a dead letter, a stub without payload), or
    /// None when even a stub was rejected (logged, counted, acknowledged).
    fn rejected(&self, output: Output, error: &KafkaError) -> Option<Output> {
        self.metrics.outputs_rejected.with_label_values(&[output.topic.as_str()]).inc();
        let e = &output.envelope;
        match output.destination {
            Destination::Label(_) | Destination::Review(_) => {
                tracing::warn!(
                    topic = %output.topic, partition = e.partition, offset = e.offset, error = %error,
                    "output rejected for good; dead-lettering its input"
                );
                let poison = Poison::OutputRejected(format!("{} rejected the output: {error}", output.topic));
                Some(Output { routed: output.routed, ..self.dead_letter(output.envelope, poison, output.slot) })
            }
            Destination::DeadLetter(_) if !output.stub => {
                tracing::warn!(
                    topic = %output.topic, partition = e.partition, offset = e.offset, error = %error,
                    bytes = output.payload.len(),
                    "dead letter rejected for good; producing a stub (reason and source, no payload)"
                );
                Some(stub(output, &error.to_string()))
            }
            Destination::DeadLetter(_) => {
                tracing::error!(
                    topic = %output.topic, partition = e.partition, offset = e.offset, error = %error,
                    "even the dead-letter stub was rejected: this input has no output (see triagem_outputs_rejected_total)"
                );
                let e = &output.envelope;
                self.tracker.ack(&e.topic, e.partition, e.offset);
                None
            }
        }
    }

    fn acknowledged(&self, output: &Output) {
        self.count(output);
        let e = &output.envelope;
        self.tracker.ack(&e.topic, e.partition, e.offset);
    }

    /// The counters and the latency of a delivered output.
    fn count(&self, output: &Output) {
        let m = &self.metrics;
        match &output.destination {
            Destination::Label(label) => m.routed.with_label_values(&[output.topic.as_str(), label]).inc(),
            Destination::Review(label) => {
                m.routed.with_label_values(&[output.topic.as_str(), label]).inc();
                m.review.with_label_values(&[label.as_str()]).inc();
            }
            Destination::DeadLetter(reason) => m.dead_lettered.with_label_values(&[reason]).inc(),
        }
        if let Some(ts) = output.envelope.timestamp_ms {
            let latency = (Utc::now().timestamp_millis() - ts).max(0) as f64 / 1000.0;
            m.end_to_end_latency.observe(latency);
        }
        let e = &output.envelope;
        if let Some(received) = e.received {
            m.observe_worker_latency(received, e.forwarded, output.routed, std::time::Instant::now());
        }
    }

    /// Runs until `rx` is closed, then waits for every delivery to finish.
    /// Outputs are enqueued one after the other in the order they arrive
    /// (inside an outcome — a whole batcher window, see `infer::spawn` — by
    /// input partition and offset), so that the outputs of one input
    /// partition reach each topic in input order (the producer is
    /// idempotent: its own retries keep that order); their acknowledgements
    /// are awaited concurrently.
    pub async fn run(self, mut rx: mpsc::Receiver<Outcome>) {
        let mut deliveries = JoinSet::new();
        while let Some(outcome) = rx.recv().await {
            let mut outputs = self.outputs(outcome);
            outputs.sort_by(|a, b| {
                (&a.envelope.topic, a.envelope.partition, a.envelope.offset).cmp(&(
                    &b.envelope.topic,
                    b.envelope.partition,
                    b.envelope.offset,
                ))
            });
            for output in outputs {
                if let Some(transactions) = &self.transactions {
                    if let Some((output, delivery)) = self.enqueue_in_transaction(transactions, output).await {
                        deliveries.spawn(self.clone().settle_in_transaction(output, delivery));
                    }
                    continue;
                }
                if !self.current(&output) {
                    continue;
                }
                let enqueued = self.enqueue(&output).await;
                deliveries.spawn(self.clone().settle(output, enqueued));
            }
            while let Some(done) = deliveries.try_join_next() {
                self.check(done);
            }
        }
        while let Some(done) = deliveries.join_next().await {
            self.check(done);
        }
    }

    /// Whether the output's input partition is still this worker's; when it
    /// is not (revoked, its revoke timed out) the output is abandoned — its
    /// slot freed, nothing more written — since the partition's new owner
    /// consumes the message again from the committed offset.
    fn current(&self, output: &Output) -> bool {
        let e = &output.envelope;
        let current = self.tracker.is_current(&e.topic, e.partition, e.generation);
        if !current {
            self.metrics.outputs_abandoned.inc();
            tracing::debug!(
                topic = %e.topic, partition = e.partition, offset = e.offset,
                "partition revoked: output abandoned, its new owner routes the message"
            );
        }
        current
    }

    /// A delivery task that panicked leaves its offset unacknowledged for good: fatal.
    fn check(&self, done: Result<(), tokio::task::JoinError>) {
        if let Err(e) = done {
            if e.is_panic() {
                self.fatal.set(format!("a delivery task panicked: {e}"));
            }
        }
    }
}

/// The stub of a dead letter that cannot be produced: no payload, no key or
/// input headers (either may be what is too large), the reason and source
/// headers, and `triagem-payload-dropped`.
fn stub(output: Output, error: &str) -> Output {
    let e = &output.envelope;
    let mut headers: Vec<(String, Option<Vec<u8>>)> =
        output.headers.iter().filter(|(k, _)| k.starts_with("triagem-")).cloned().collect();
    headers.push((
        HEADER_PAYLOAD_DROPPED.into(),
        Some(format!("{} bytes: {error}", e.payload.as_ref().map_or(0, Vec::len)).into_bytes()),
    ));
    let mut envelope = output.envelope;
    envelope.key = envelope.key.filter(|k| k.len() <= 256);
    Output { payload: Vec::new(), headers, envelope, stub: true, ..output }
}

/// The output value: the body plus `field` (`routing.output_field`, `"triagem"` by default) =
/// `{label, score, scores, model, model_version, classified_at}`, and whether the input's own
/// `field` was replaced by it.
pub fn render_output(
    decoded: &Decoded,
    prediction: &Prediction,
    model: &ModelInfo,
    field: &str,
    classified_at: &str,
) -> (Vec<u8>, bool) {
    let scores: Map<String, Value> = prediction.scores.iter().map(|(l, s)| (l.clone(), json!(s))).collect();
    let triagem = json!({
        "label": prediction.label,
        "score": prediction.score,
        "scores": scores,
        "model": model.name,
        "model_version": model.version,
        "classified_at": classified_at,
    });
    let mut object = match &decoded.body {
        Body::Json(map) => map.clone(),
        Body::Text => {
            let mut m = Map::new();
            m.insert(crate::config::TEXT_INPUT_OUTPUT_FIELD.into(), Value::String(decoded.text.clone()));
            m
        }
    };
    let replaced = object.insert(field.to_string(), triagem).is_some();
    (serde_json::to_vec(&Value::Object(object)).expect("a JSON map always serializes"), replaced)
}

/// Headers of a routed output: the input's, then `triagem-label`,
/// `triagem-score` and the source coordinates (`triagem-source-topic`,
/// `-partition`, `-offset`: what a downstream consumer de-duplicates on, since
/// at-least-once may deliver an output twice and keys are not unique).
pub fn output_headers(envelope: &Envelope, prediction: &Prediction) -> Vec<(String, Option<Vec<u8>>)> {
    let mut headers = envelope.headers.clone();
    headers.push((HEADER_LABEL.into(), Some(prediction.label.clone().into_bytes())));
    headers.push((HEADER_SCORE.into(), Some(format!("{:.6}", prediction.score).into_bytes())));
    headers.extend(source_headers(envelope));
    headers
}

/// `triagem-source-topic`, `triagem-source-partition`, `triagem-source-offset`.
fn source_headers(envelope: &Envelope) -> [(String, Option<Vec<u8>>); 3] {
    [
        (HEADER_SOURCE_TOPIC.into(), Some(envelope.topic.clone().into_bytes())),
        (HEADER_SOURCE_PARTITION.into(), Some(envelope.partition.to_string().into_bytes())),
        (HEADER_SOURCE_OFFSET.into(), Some(envelope.offset.to_string().into_bytes())),
    ]
}

/// Headers of a dead letter: the input's, then the reason and the source coordinates.
pub fn dead_letter_headers(envelope: &Envelope, poison: &Poison) -> Vec<(String, Option<Vec<u8>>)> {
    let mut headers = envelope.headers.clone();
    headers.push((HEADER_ERROR.into(), Some(poison.header().into_bytes())));
    headers.extend(source_headers(envelope));
    headers
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{InputConfig, InputFormat};
    use crate::worker::message::decode;

    fn json_cfg() -> InputConfig {
        InputConfig { format: InputFormat::Json, text_field: "text".into(), max_bytes: 100 }
    }

    #[test]
    fn a_dead_letter_copies_the_payload_only_up_to_the_cap() {
        let routing = RoutingConfig { dead_letter_max_bytes: 10, ..Default::default() };
        let router = Router {
            producer: rdkafka::config::ClientConfig::new().create().unwrap(),
            routing,
            model: ModelInfo {
                name: "m".into(),
                version: "v".into(),
                labels: vec![],
                path: Default::default(),
                max_len: 8,
            },
            tracker: Arc::new(OffsetTracker::new()),
            metrics: Metrics::new().unwrap(),
            retry_backoff: Duration::from_millis(1),
            topics: Default::default(),
            fatal: Default::default(),
            transactions: None,
        };
        let env = |n: usize| Envelope { payload: Some(vec![b'x'; n]), key: Some(b"k".to_vec()), ..Default::default() };
        let small = router.dead_letter(env(10), Poison::EmptyText, Slot::default());
        assert_eq!(small.payload.len(), 10);
        let big = router.dead_letter(env(11), Poison::Oversize { size: 11, max: 5 }, Slot::default());
        assert!(big.payload.is_empty() && big.stub);
        let dropped = big.headers.iter().find(|(k, _)| k == HEADER_PAYLOAD_DROPPED).unwrap();
        assert_eq!(dropped.1.as_deref(), Some(&b"11 bytes: over routing.dead_letter_max_bytes = 10"[..]));
        assert!(big.headers.iter().any(|(k, v)| k == HEADER_ERROR && v.as_deref().unwrap().starts_with(b"oversize")));
    }

    #[test]
    fn produce_errors_are_classified() {
        use RDKafkaErrorCode as C;
        let c = |code| classify(&KafkaError::MessageProduction(code));
        assert_eq!(c(C::MessageSizeTooLarge), ProduceFailure::RecordRejected);
        assert_eq!(c(C::InvalidRecord), ProduceFailure::RecordRejected);
        assert_eq!(c(C::UnknownTopicOrPartition), ProduceFailure::TopicUnavailable);
        assert_eq!(c(C::UnknownTopic), ProduceFailure::TopicUnavailable);
        assert_eq!(c(C::TopicAuthorizationFailed), ProduceFailure::TopicUnavailable);
        assert_eq!(c(C::MessageTimedOut), ProduceFailure::Transient);
        assert_eq!(c(C::NotEnoughReplicas), ProduceFailure::Transient);
        assert_eq!(classify(&KafkaError::Canceled), ProduceFailure::Transient);
    }

    #[test]
    fn output_adds_triagem_object() {
        let info = ModelInfo {
            name: "m".into(),
            version: "abc".into(),
            labels: vec!["venda".into(), "suporte".into()],
            path: Default::default(),
            max_len: 8,
        };
        let p = Prediction {
            label: "venda".into(),
            score: 0.9,
            scores: vec![("venda".into(), 0.9), ("suporte".into(), 0.1)],
        };
        let render = |d: &Decoded, field: &str| {
            let (bytes, replaced) = render_output(d, &p, &info, field, "2026-01-01T00:00:00Z");
            (serde_json::from_slice::<Value>(&bytes).unwrap(), replaced)
        };
        let d = decode(Some(br#"{"text":"oi","id":1}"#), &json_cfg()).unwrap();
        let (out, replaced) = render(&d, "triagem");
        assert_eq!(out["id"], 1);
        assert_eq!(out["text"], "oi");
        assert_eq!(out["triagem"]["label"], "venda");
        assert_eq!(out["triagem"]["model_version"], "abc");
        assert!(out["triagem"]["scores"]["suporte"].is_number());
        assert!(!replaced);
        let t = Decoded { text: "oi".into(), body: Body::Text };
        let (out, _) = render(&t, "triagem");
        assert_eq!(out["text"], "oi");
        assert_eq!(out["triagem"]["model"], "m");
        // An input that already has the field: replaced, and said so; another name leaves it alone.
        let d = decode(Some(br#"{"text":"oi","triagem":"mine","x":{"y":1}}"#), &json_cfg()).unwrap();
        let (out, replaced) = render(&d, "triagem");
        assert!(replaced && out["triagem"]["label"] == "venda" && out["x"]["y"] == 1);
        let (out, replaced) = render(&d, "classificacao");
        assert!(!replaced && out["triagem"] == "mine" && out["classificacao"]["label"] == "venda");

        let env = Envelope {
            topic: "in".into(),
            partition: 2,
            offset: 9,
            headers: vec![("trace".into(), Some(b"x".to_vec()))],
            ..Default::default()
        };
        let h = output_headers(&env, &p);
        assert_eq!(h[0].0, "trace");
        assert_eq!(h[1], (HEADER_LABEL.to_string(), Some(b"venda".to_vec())));
        assert_eq!(h[3], (HEADER_SOURCE_TOPIC.to_string(), Some(b"in".to_vec())));
        assert_eq!(h[4], (HEADER_SOURCE_PARTITION.to_string(), Some(b"2".to_vec())));
        assert_eq!(h[5], (HEADER_SOURCE_OFFSET.to_string(), Some(b"9".to_vec())));
        let h = dead_letter_headers(&env, &Poison::EmptyText);
        assert_eq!(h[1].1.as_deref(), Some(&b"empty_text: text is empty"[..]));
        assert_eq!(h[3].1.as_deref(), Some(&b"2"[..]));
        assert_eq!(h[4].1.as_deref(), Some(&b"9"[..]));
    }
}

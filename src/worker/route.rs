//! Routing and producing. Each classified message goes to its label's topic
//! (or the review topic when its score is below `routing.min_confidence`);
//! each poison message goes to the dead-letter topic, bytes unchanged. An
//! offset is acknowledged to the [`OffsetTracker`] only when the broker has
//! acknowledged the output; a rejected or timed-out produce is counted and
//! retried, never dropped.

use std::sync::Arc;
use std::time::Duration;

use chrono::{SecondsFormat, Utc};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use tokio::sync::{mpsc, OwnedSemaphorePermit};
use tokio::task::JoinSet;

use super::infer::Classified;
use super::message::{self, Envelope, Poison};
use super::offsets::OffsetTracker;
use crate::config::RoutingConfig;
use crate::metrics::{Metrics, QUEUE_PRODUCER};
use crate::model::ModelInfo;

/// What reaches the router.
pub enum Outcome {
    /// A batch back from the inference thread.
    Classified(Vec<Classified>),
    /// A message that could not be decoded.
    Poison { envelope: Envelope, poison: Poison, permit: Option<OwnedSemaphorePermit> },
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
    pub permit: Option<OwnedSemaphorePermit>,
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
}

impl Router {
    /// The outputs of one outcome.
    pub fn outputs(&self, outcome: Outcome) -> Vec<Output> {
        match outcome {
            Outcome::Poison { envelope, poison, permit } => vec![self.dead_letter(envelope, poison, permit)],
            Outcome::Classified(batch) => {
                let now = Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true);
                batch
                    .into_iter()
                    .map(|c| {
                        let Classified { pending, result } = c;
                        match result {
                            Err(e) => {
                                self.dead_letter(pending.envelope, Poison::Inference(e.to_string()), pending.permit)
                            }
                            Ok(prediction) => {
                                let (topic, destination) = self.destination(&prediction.label, prediction.score);
                                Output {
                                    topic,
                                    destination,
                                    payload: message::render_output(&pending.decoded, &prediction, &self.model, &now),
                                    headers: message::output_headers(&pending.envelope, &prediction),
                                    envelope: pending.envelope,
                                    permit: pending.permit,
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

    fn dead_letter(&self, envelope: Envelope, poison: Poison, permit: Option<OwnedSemaphorePermit>) -> Output {
        tracing::debug!(
            topic = %envelope.topic, partition = envelope.partition, offset = envelope.offset,
            error = %poison, "dead letter"
        );
        Output {
            topic: self.routing.dead_letter_topic.clone(),
            destination: Destination::DeadLetter(poison.reason()),
            payload: envelope.payload.clone().unwrap_or_default(),
            headers: message::dead_letter_headers(&envelope, &poison),
            envelope,
            permit,
        }
    }

    /// Produces until the broker acknowledges, then acknowledges the input offset.
    pub async fn deliver(self, output: Output) {
        let gauge = self.metrics.queue(QUEUE_PRODUCER);
        gauge.inc();
        let mut attempt = 0u32;
        loop {
            let mut headers = OwnedHeaders::new_with_capacity(output.headers.len());
            for (key, value) in &output.headers {
                headers = headers.insert(Header { key, value: value.as_deref() });
            }
            let mut record = FutureRecord::<[u8], [u8]>::to(&output.topic).payload(&output.payload).headers(headers);
            if let Some(key) = &output.envelope.key {
                record = record.key(key);
            }
            match self.producer.send(record, Timeout::Never).await {
                Ok(_) => break,
                Err((e, _)) => {
                    attempt += 1;
                    self.metrics.produce_errors.with_label_values(&[output.topic.as_str()]).inc();
                    tracing::warn!(topic = %output.topic, error = %e, attempt, "produce failed; retrying");
                    tokio::time::sleep(self.retry_backoff.min(Duration::from_millis(100) * attempt)).await;
                }
            }
        }
        gauge.dec();
        self.acknowledged(&output);
    }

    fn acknowledged(&self, output: &Output) {
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
        self.tracker.ack(&e.topic, e.partition, e.offset);
    }

    /// Runs until `rx` is closed, then waits for every delivery to finish.
    pub async fn run(self, mut rx: mpsc::Receiver<Outcome>) {
        let mut deliveries = JoinSet::new();
        while let Some(outcome) = rx.recv().await {
            for output in self.outputs(outcome) {
                deliveries.spawn(self.clone().deliver(output));
            }
            while deliveries.try_join_next().is_some() {}
        }
        while deliveries.join_next().await.is_some() {}
    }
}

//! loadgen's Kafka clients: the settings shared by its producer and consumer,
//! and the consumer that reads the outputs from their current end.

use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::{Offset, TopicPartitionList};

use super::{kafka_error, LoadgenError, LoadgenOptions};

/// Time allowed for each metadata and watermark request at start-up.
const SETUP_TIMEOUT: Duration = Duration::from_secs(10);

/// Which of loadgen's two clients a configuration is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Role {
    /// The producer that sends the messages.
    Producer,
    /// The consumer that reads the outputs.
    Consumer,
}

/// The settings of a client: `defaults`, then the user's `client` settings over them, then those for
/// its role alone (`producer` or `consumer`), as the worker layers `kafka.client` and `kafka.producer`.
pub(super) fn client_config(opts: &LoadgenOptions, role: Role, defaults: &[(&str, &str)]) -> ClientConfig {
    let own = match role {
        Role::Producer => &opts.producer,
        Role::Consumer => &opts.consumer,
    };
    crate::kafka::client_config(&opts.brokers, defaults, opts.client.iter().chain(own).map(|(k, v)| (k, v)))
}

/// A consumer assigned to every partition of `topics` at its high watermark,
/// after checking that `input_topic` exists. Blocking.
pub(super) fn consumer_at_end(
    opts: &LoadgenOptions,
    run_id: &str,
    topics: &[String],
) -> Result<StreamConsumer, LoadgenError> {
    // A short fetch wait: a broker that answers a fetch only when the wait is
    // over, rather than when data arrives, would otherwise add up to 500 ms
    // (the librdkafka default) to every latency measured here.
    let isolation = if opts.read_committed { "read_committed" } else { "read_uncommitted" };
    let mut cfg = client_config(opts, Role::Consumer, &[("fetch.wait.max.ms", "10"), ("isolation.level", isolation)]);
    cfg.set("group.id", format!("triagem-loadgen-{run_id}"))
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("allow.auto.create.topics", "false");
    let consumer: StreamConsumer = cfg.create().map_err(kafka_error("creating the consumer"))?;
    let partitions = |topic: &str| -> Result<Vec<i32>, LoadgenError> {
        let md = consumer
            .fetch_metadata(Some(topic), SETUP_TIMEOUT)
            .map_err(kafka_error(format!("metadata of {topic} from {}", opts.brokers)))?;
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
                .map_err(kafka_error(format!("high watermark of {topic}/{p}")))?;
            assignment.add_partition_offset(topic, p, Offset::Offset(high)).map_err(kafka_error("assignment"))?;
        }
    }
    consumer.assign(&assignment).map_err(kafka_error("assigning the output partitions"))?;
    Ok(consumer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_client_gets_the_shared_settings_and_its_own_only() {
        let mut opts = LoadgenOptions::new("k:9092");
        opts.client = vec![("client.id".into(), "lg".into()), ("linger.ms".into(), "5".into())];
        opts.producer = vec![("linger.ms".into(), "20".into())];
        opts.consumer = vec![("fetch.wait.max.ms".into(), "1".into())];
        let producer = client_config(&opts, Role::Producer, &[]);
        assert_eq!((producer.get("client.id"), producer.get("linger.ms")), (Some("lg"), Some("20")));
        assert_eq!(producer.get("fetch.wait.max.ms"), None);
        let consumer = client_config(&opts, Role::Consumer, &[("fetch.wait.max.ms", "10")]);
        assert_eq!((consumer.get("client.id"), consumer.get("fetch.wait.max.ms")), (Some("lg"), Some("1")));
        assert_eq!(consumer.get("linger.ms"), Some("5"), "--client reaches both");
    }
}

//! Fault injection with librdkafka's in-process mock cluster: the worker runs
//! in this process (a keyword "model" stands in for BERT) while the broker
//! rejects its produce requests. Failed outputs are retried, never dropped,
//! and no offset is committed before its output is acknowledged.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use rdkafka::util::Timeout;
use rdkafka::{Offset, TopicPartitionList};
use triagem::config::Config;
use triagem::metrics::Metrics;
use triagem::model::{ModelInfo, Prediction};
use triagem::worker::infer::{Predict, Tokenize};
use triagem::worker::{Shutdown, Worker};

/// "venda" when the text asks about buying or prices, else "suporte".
struct Keywords;

impl Predict for Keywords {
    fn info(&self) -> ModelInfo {
        ModelInfo {
            name: "keywords".into(),
            version: "test".into(),
            labels: vec!["venda".into(), "suporte".into()],
            path: PathBuf::new(),
            max_len: 64,
        }
    }

    fn tokenizer(&self) -> Tokenize {
        // One id per word, between two special ones.
        Arc::new(|t: &str| std::iter::once(1).chain(t.split_whitespace().map(|_| 5)).chain([2]).collect())
    }

    fn predict(&self, texts: &[&str], _ids: &[&[u32]]) -> Result<Vec<Prediction>, String> {
        Ok(texts
            .iter()
            .map(|t| {
                let venda = t.contains("comprar") || t.contains("preço");
                let (label, score) = if venda { ("venda", 0.9) } else { ("suporte", 0.8) };
                Prediction {
                    label: label.into(),
                    score,
                    scores: vec![
                        ("venda".into(), if venda { 0.9 } else { 0.2 }),
                        ("suporte".into(), if venda { 0.1 } else { 0.8 }),
                    ],
                }
            })
            .collect())
    }
}

struct Setup {
    mock: MockCluster<'static, rdkafka::producer::DefaultProducerContext>,
    cfg: Config,
}

fn setup(name: &str) -> Setup {
    let mock = MockCluster::new(1).unwrap();
    let mut cfg = Config::default();
    cfg.kafka.brokers = mock.bootstrap_servers();
    cfg.kafka.group_id = format!("g-{name}");
    cfg.kafka.input_topic = format!("{name}.in");
    cfg.kafka.commit_interval = Duration::from_millis(50);
    cfg.kafka.produce_retry_backoff = Duration::from_millis(100);
    // As the process tests' harness does: librdkafka's first join sometimes rejoins at once ("Metadata for
    // subscribed topic(s) has changed"), and the mock cluster answers that rejoin only after the session
    // timeout less a second — 44 s at librdkafka's default, 5 s here (one run in eight took 48 s before).
    cfg.kafka.consumer.0.insert("session.timeout.ms".into(), "6000".into());
    cfg.routing.topics.insert("venda".into(), format!("{name}.venda"));
    cfg.routing.topics.insert("suporte".into(), format!("{name}.suporte"));
    cfg.routing.review_topic = format!("{name}.revisao");
    cfg.routing.dead_letter_topic = format!("{name}.dlq");
    cfg.metrics.listen = "127.0.0.1:0".into();
    cfg.batch.max_wait = Duration::from_millis(5);
    cfg.shutdown.timeout = Duration::from_secs(10);
    mock.create_topic(&cfg.kafka.input_topic, 1, 1).unwrap();
    for t in cfg.output_topics() {
        mock.create_topic(&t, 1, 1).unwrap();
    }
    Setup { mock, cfg }
}

async fn produce_inputs(brokers: &str, topic: &str, n: usize) {
    let p: FutureProducer = ClientConfig::new().set("bootstrap.servers", brokers).create().unwrap();
    for i in 0..n {
        let text = if i % 2 == 0 { "quero comprar uma tv" } else { "minha tv quebrou" };
        let v = serde_json::json!({"text": text, "id": i}).to_string();
        let k = format!("k-{i}");
        p.send(FutureRecord::to(topic).key(&k).payload(&v), Timeout::Never).await.map_err(|(e, _)| e).unwrap();
    }
    // One poison message: dead letters take the same acknowledged path.
    p.send(FutureRecord::to(topic).key("poison").payload("{oops"), Timeout::Never).await.map_err(|(e, _)| e).unwrap();
}

/// The group's committed offset on partition 0 (None: nothing committed).
async fn committed(brokers: String, group: String, topic: String) -> Option<i64> {
    tokio::task::spawn_blocking(move || {
        let c: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .set("group.id", &group)
            .set("enable.auto.commit", "false")
            .create()
            .unwrap();
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(&topic, 0);
        let got = c.committed_offsets(tpl, Duration::from_secs(5)).ok()?;
        match got.find_partition(&topic, 0)?.offset() {
            Offset::Offset(o) => Some(o),
            _ => None,
        }
    })
    .await
    .unwrap()
}

/// The input offsets whose output is on the broker, read from every output
/// topic (one partition each): a routed output's `id` is its input's offset
/// (the inputs are produced in order to one partition), the dead letter's key
/// `poison` is the last input, at offset `n`.
async fn offsets_with_output(brokers: String, topics: Vec<String>, n: i64) -> BTreeSet<i64> {
    tokio::task::spawn_blocking(move || {
        let c: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .set("group.id", "offsets-with-output")
            .set("enable.auto.commit", "false")
            .create()
            .unwrap();
        let mut tpl = TopicPartitionList::new();
        let mut remaining = 0;
        for topic in &topics {
            let (low, high) = c.fetch_watermarks(topic, 0, Duration::from_secs(5)).unwrap();
            remaining += high - low;
            tpl.add_partition_offset(topic, 0, Offset::Beginning).unwrap();
        }
        c.assign(&tpl).unwrap();
        let mut offsets = BTreeSet::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while remaining > 0 {
            assert!(std::time::Instant::now() < deadline, "could not read the outputs back");
            let Some(m) = c.poll(Duration::from_millis(100)) else { continue };
            let m = m.unwrap();
            remaining -= 1;
            if m.key() == Some(b"poison".as_slice()) {
                offsets.insert(n);
            } else {
                let v: serde_json::Value = serde_json::from_slice(m.payload().unwrap()).unwrap();
                offsets.insert(v["id"].as_i64().unwrap());
            }
        }
        offsets
    })
    .await
    .unwrap()
}

/// Outputs acknowledged by the broker so far (routed + dead-lettered).
fn acknowledged(m: &Metrics, cfg: &Config) -> u64 {
    routed(m, cfg, "venda") + routed(m, cfg, "suporte") + m.dead_lettered.with_label_values(&["invalid_json"]).get()
}

fn routed(m: &Metrics, cfg: &Config, label: &str) -> u64 {
    m.routed.with_label_values(&[cfg.routing.topics[label].as_str(), label]).get()
}

fn produce_errors(m: &Metrics, cfg: &Config) -> u64 {
    cfg.output_topics().iter().map(|t| m.produce_errors.with_label_values(&[t.as_str()]).get()).sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_produces_are_retried_and_nothing_is_committed_early() {
    let s = setup("faults");
    let n = 20;
    produce_inputs(&s.cfg.kafka.brokers, &s.cfg.kafka.input_topic, n).await;
    // From now on the broker rejects the next produce requests with a non-retriable error.
    s.mock.request_errors(RDKafkaApiKey::Produce, &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED; 12]);

    let (trigger, shutdown) = Shutdown::new();
    let worker = Worker::start(s.cfg.clone(), Keywords, shutdown.clone()).await.unwrap();
    let metrics = worker.metrics.clone();
    let running = tokio::spawn(worker.run(shutdown));

    let (b, g, t) = (s.cfg.kafka.brokers.clone(), s.cfg.kafka.group_id.clone(), s.cfg.kafka.input_topic.clone());
    let total = n as i64 + 1;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut saw_errors_uncommitted = false;
    loop {
        // Read acknowledgements before the commit: the commit can only lag them.
        let acked = acknowledged(&metrics, &s.cfg) as i64;
        let errors = produce_errors(&metrics, &s.cfg);
        let c = committed(b.clone(), g.clone(), t.clone()).await;
        let c_val = c.unwrap_or(0);
        // Outputs read after the commit: every input below the committed
        // offset must already have its output on the broker, i.e. the commit
        // never passes the first message without an acknowledged output.
        let with_output = offsets_with_output(b.clone(), s.cfg.output_topics(), n as i64).await;
        let first_without = (0..=n as i64).find(|o| !with_output.contains(o)).unwrap_or(total);
        assert!(
            c_val <= first_without,
            "committed offset {c_val} passes offset {first_without}, whose output is not on the broker"
        );
        if errors > 0 && c_val < total {
            saw_errors_uncommitted = true;
        }
        if c == Some(total) && acked == total {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "stuck: committed {c:?}, acked {acked}, errors {errors}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(produce_errors(&metrics, &s.cfg) > 0, "the injected errors never hit the worker");
    assert!(saw_errors_uncommitted);
    trigger.trigger();
    running.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_commits_everything_routed() {
    let mut s = setup("graceful");
    // No periodic commit before the shutdown: what is committed is the shutdown's doing.
    s.cfg.kafka.commit_interval = Duration::from_secs(3600);
    let n = 30;
    produce_inputs(&s.cfg.kafka.brokers, &s.cfg.kafka.input_topic, n).await;
    let (trigger, shutdown) = Shutdown::new();
    let worker = Worker::start(s.cfg.clone(), Keywords, shutdown.clone()).await.unwrap();
    let metrics = worker.metrics.clone();
    let running = tokio::spawn(worker.run(shutdown));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while acknowledged(&metrics, &s.cfg) < n as u64 + 1 {
        assert!(tokio::time::Instant::now() < deadline, "only {} acknowledged", acknowledged(&metrics, &s.cfg));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(routed(&metrics, &s.cfg, "venda"), n as u64 / 2);
    assert_eq!(routed(&metrics, &s.cfg, "suporte"), n as u64 / 2);
    trigger.trigger();
    running.await.unwrap().expect("clean shutdown");
    let c = committed(s.cfg.kafka.brokers.clone(), s.cfg.kafka.group_id.clone(), s.cfg.kafka.input_topic.clone()).await;
    assert_eq!(c, Some(n as i64 + 1));
    drop(s.mock);
}

/// Outputs of one input partition reach each output topic in input order,
/// while the broker rejects produce requests with retriable errors (the
/// producer retries them itself) — many records in flight at once — and
/// while the batcher sorts each window by length (texts of four lengths per
/// label, so a window is cut into batches that do not follow input order).
///
/// One produce request in flight per connection here (the worker's default
/// is librdkafka's 5). The mock cluster checks producer sequence numbers only
/// for transactional producers (`rd_kafka_mock_validate_records` returns
/// early without a `transactional.id`), so it appends a request sent after
/// one it failed; librdkafka's idempotent producer reads that success as
/// proof that the failed request was persisted too (a real broker would
/// have refused the later one with OUT_OF_ORDER_SEQUENCE_NUMBER) and reports
/// the failed request's records delivered (`rd_kafka_dr_implicit_ack`). Those
/// records were never written: 2 or 4 of the 3,000 went missing in about one
/// run in twelve with the default. With one request in flight nothing
/// follows a failed request until its retry succeeds, so every
/// acknowledgement is a write; the records in flight in the worker (up to
/// 3,000) and the length-sorted windows are unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outputs_keep_input_order_across_retries() {
    let s = setup("order");
    let n = 3000;
    let p: FutureProducer =
        ClientConfig::new().set("bootstrap.servers", &s.cfg.kafka.brokers).set("linger.ms", "20").create().unwrap();
    let deliveries: Vec<_> = (0..n)
        .map(|i| {
            let longer = " por favor".repeat(3 - i % 4);
            let text =
                if i % 3 == 0 { format!("quero comprar uma tv{longer}") } else { format!("minha tv quebrou{longer}") };
            let v = serde_json::json!({"text": text, "id": i}).to_string();
            p.send_result(FutureRecord::to(&s.cfg.kafka.input_topic).key(&format!("k-{i}")).payload(&v).partition(0))
                .map_err(|(e, _)| e)
                .unwrap()
        })
        .collect();
    for d in deliveries {
        d.await.unwrap().map_err(|(e, _)| e).unwrap();
    }
    let mut cfg = s.cfg.clone();
    cfg.batch.max_messages = 64;
    cfg.kafka.max_in_flight = 3000;
    cfg.kafka.producer.0.insert("max.in.flight.requests.per.connection".into(), "1".into());
    let (trigger, shutdown) = Shutdown::new();
    let worker = Worker::start(cfg.clone(), Keywords, shutdown.clone()).await.unwrap();
    let metrics = worker.metrics.clone();
    let running = tokio::spawn(worker.run(shutdown));
    // Every few produce requests fails with an error the producer retries.
    let mut errors = Vec::new();
    for i in 0..200 {
        errors.push(if i % 3 == 0 {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS
        } else {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR
        });
    }
    s.mock.request_errors(RDKafkaApiKey::Produce, &errors);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    while routed(&metrics, &cfg, "venda") + routed(&metrics, &cfg, "suporte") < n as u64 {
        assert!(tokio::time::Instant::now() < deadline, "only {} routed", acknowledged(&metrics, &cfg));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    trigger.trigger();
    running.await.unwrap().unwrap();
    let (b, topics) =
        (cfg.kafka.brokers.clone(), [cfg.routing.topics["venda"].clone(), cfg.routing.topics["suporte"].clone()]);
    let (reordered, total, duplicates, missing) = tokio::task::spawn_blocking(move || {
        let c: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &b)
            .set("group.id", "order-reader")
            .set("enable.auto.commit", "false")
            .create()
            .unwrap();
        let (mut reordered, mut total, mut duplicates) = (0, 0, 0);
        let mut seen = BTreeSet::new();
        for topic in &topics {
            let (low, high) = c.fetch_watermarks(topic, 0, Duration::from_secs(5)).unwrap();
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition_offset(topic, 0, Offset::Beginning).unwrap();
            c.assign(&tpl).unwrap();
            let mut ids = Vec::new();
            while (ids.len() as i64) < high - low {
                let Some(m) = c.poll(Duration::from_millis(200)) else { continue };
                let v: serde_json::Value = serde_json::from_slice(m.unwrap().payload().unwrap()).unwrap();
                ids.push(v["id"].as_i64().unwrap());
            }
            reordered += ids.windows(2).filter(|w| w[1] < w[0]).count();
            seen.extend(ids.iter().copied());
            duplicates += ids.len() - ids.iter().collect::<BTreeSet<_>>().len();
            total += ids.len();
        }
        let missing: Vec<i64> = (0..n as i64).filter(|i| !seen.contains(i)).collect();
        (reordered, total, duplicates, missing)
    })
    .await
    .unwrap();
    let errors = produce_errors(&metrics, &cfg);
    println!(
        "order: {total} outputs of {n} inputs, {reordered} out of order, {duplicates} duplicates, {errors} produce errors seen by the worker; missing ids {missing:?}"
    );
    assert_eq!(reordered, 0, "outputs out of input order");
    assert_eq!(duplicates, 0);
    assert_eq!(total, n);
}

//! `triagem loadgen` against librdkafka's in-process mock cluster, with a tiny
//! "echo router" in place of the worker: it reads the input topic and writes
//! each message, key and value unchanged, to `atendimento.venda` (or, when the
//! value is not a JSON object with a string `text`, to `atendimento.dlq`), so
//! these tests do not depend on the model or the worker.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::watch;
use triagem::loadgen::{self, Limit, LoadgenError, LoadgenOptions};

const INPUT: &str = "atendimento.mensagens";
const VENDA: &str = "atendimento.venda";
const DLQ: &str = "atendimento.dlq";
const INPUT_PARTITIONS: i32 = 3;

fn cluster() -> MockCluster<'static, rdkafka::producer::DefaultProducerContext> {
    let mock = MockCluster::new(1).unwrap();
    mock.create_topic(INPUT, INPUT_PARTITIONS, 1).unwrap();
    for topic in [VENDA, "atendimento.suporte", "atendimento.revisao", DLQ] {
        mock.create_topic(topic, 2, 1).unwrap();
    }
    mock
}

fn data_file() -> tempfile::NamedTempFile {
    let file = tempfile::NamedTempFile::new().unwrap();
    let lines = [
        r#"{"prompt": "quanto custa a geladeira frost free?", "completion": "venda"}"#,
        r#"{"prompt": "meu forno ta dando erro F3", "completion": "suporte"}"#,
        r#"{"prompt": "tem ar de janela 7500 110v?", "completion": "venda"}"#,
    ];
    std::fs::write(file.path(), lines.join("\n")).unwrap();
    file
}

fn is_valid(value: Option<&[u8]>) -> bool {
    let parsed = value.and_then(|v| serde_json::from_slice::<serde_json::Value>(v).ok());
    parsed.is_some_and(|v| v.get("text").is_some_and(|t| t.is_string()))
}

/// What the echo router does wrong, on purpose: to the `n`th (1-based) valid message.
#[derive(Clone, Copy)]
enum Fault {
    None,
    Drop(usize),
    Twice(usize),
}

/// Copies every input message to VENDA (valid) or DLQ (poison), with `fault`;
/// runs until `stop` turns true; returns the records it produced.
async fn echo_router(brokers: String, fault: Fault, mut stop: watch::Receiver<bool>) -> usize {
    let consumer: StreamConsumer =
        ClientConfig::new().set("bootstrap.servers", &brokers).set("group.id", "echo-router").create().unwrap();
    // Assigned, not subscribed: reads from the start at once, without waiting for a group to form.
    let mut partitions = TopicPartitionList::new();
    for p in 0..INPUT_PARTITIONS {
        partitions.add_partition_offset(INPUT, p, Offset::Beginning).unwrap();
    }
    consumer.assign(&partitions).unwrap();
    let producer: FutureProducer = ClientConfig::new().set("bootstrap.servers", &brokers).create().unwrap();
    let valid_seen = AtomicUsize::new(0);
    let mut forwarded = 0;
    let mut deliveries = Vec::new();
    loop {
        let m = tokio::select! {
            _ = stop.changed() => break,
            m = consumer.recv() => m.unwrap(),
        };
        let valid = is_valid(m.payload());
        let nth = if valid { valid_seen.fetch_add(1, Ordering::SeqCst) + 1 } else { 0 };
        let copies = match fault {
            Fault::Drop(n) if n == nth => 0,
            Fault::Twice(n) if n == nth => 2,
            _ => 1,
        };
        let topic = if valid { VENDA } else { DLQ };
        for _ in 0..copies {
            let mut record = FutureRecord::<[u8], [u8]>::to(topic).payload(m.payload().unwrap_or_default());
            if let Some(key) = m.key() {
                record = record.key(key);
            }
            // Not awaited one by one: the router must not be what the latency measures.
            deliveries.push(producer.send_result(record).map_err(|(e, _)| e).unwrap());
            forwarded += 1;
        }
    }
    for delivery in deliveries {
        delivery.await.unwrap().map_err(|(e, _)| e).unwrap();
    }
    forwarded
}

fn options(brokers: String, data: &tempfile::NamedTempFile) -> LoadgenOptions {
    let mut opts = LoadgenOptions::new(brokers);
    opts.data = data.path().to_path_buf();
    opts.settle_timeout = Duration::from_secs(20);
    opts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn everything_comes_back_with_poison_on_the_dead_letter_topic() {
    let mock = cluster();
    let data = data_file();
    let (stop, stopped) = watch::channel(false);
    let router = tokio::spawn(echo_router(mock.bootstrap_servers(), Fault::None, stopped));

    let mut opts = options(mock.bootstrap_servers(), &data);
    opts.limit = Limit::Count(300);
    opts.poison_percent = 10.0;
    let report = loadgen::run(opts).await.expect("nothing missing");

    stop.send(true).unwrap();
    assert_eq!(router.await.unwrap(), 300);
    assert_eq!((report.sent, report.poison, report.send_failed), (300, 30, 0));
    assert_eq!((report.accounted, report.missing, report.duplicates, report.misrouted), (300, 0, 0, 0));
    assert_eq!(report.received[VENDA], 270);
    assert_eq!(report.received[DLQ], 30);
    assert_eq!(report.received["atendimento.suporte"], 0);
    assert_eq!(report.received["atendimento.revisao"], 0);
    let latency = report.latency.as_ref().expect("latencies");
    assert!(latency.p50_ms <= latency.p95_ms && latency.p95_ms <= latency.p99_ms && latency.p99_ms <= latency.max_ms);
    assert!(report.send_rate > 0.0 && report.throughput > 0.0);
    let json = serde_json::to_value(&report).unwrap();
    assert_eq!(json["missing"], 0);
    let table = report.render();
    println!("{table}");
    assert!(table.contains("atendimento.dlq") && table.contains("p99"), "{table}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_message_is_reported_missing() {
    let mock = cluster();
    let data = data_file();
    let (stop, stopped) = watch::channel(false);
    let router = tokio::spawn(echo_router(mock.bootstrap_servers(), Fault::Drop(17), stopped));

    let mut opts = options(mock.bootstrap_servers(), &data);
    opts.limit = Limit::Count(50);
    opts.rate = 500.0;
    opts.settle_timeout = Duration::from_secs(2);
    let err = loadgen::run(opts).await.expect_err("one message is missing");

    stop.send(true).unwrap();
    assert_eq!(router.await.unwrap(), 49);
    let LoadgenError::Incomplete { report, .. } = &err else { panic!("unexpected error: {err}") };
    assert_eq!((report.sent, report.accounted, report.missing), (50, 49, 1));
    assert_eq!(report.missing_ids.len(), 1);
    assert_eq!(report.received[VENDA], 49);
    assert!(err.to_string().starts_with("1 of 50 messages did not come out"), "{err}");
    // Paced at 500 msg/s: 50 messages take about 0.1 s.
    assert!(report.send_seconds >= 0.09, "sent too fast: {}", report.send_seconds);
}

/// A message routed twice is one duplicate — two records with its id — and
/// not a record read twice (a broker returning the same offset again, which
/// this one never does): the two are told apart by topic, partition and offset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_routed_twice_is_a_duplicate_not_a_record_read_twice() {
    let mock = cluster();
    let data = data_file();
    let (stop, stopped) = watch::channel(false);
    let router = tokio::spawn(echo_router(mock.bootstrap_servers(), Fault::Twice(5), stopped));

    let mut opts = options(mock.bootstrap_servers(), &data);
    opts.limit = Limit::Count(40);
    opts.settle_timeout = Duration::from_secs(2);
    let report = loadgen::run(opts).await.expect("nothing missing");

    stop.send(true).unwrap();
    assert_eq!(router.await.unwrap(), 41);
    assert_eq!((report.sent, report.accounted, report.missing), (40, 40, 0));
    assert_eq!((report.duplicates, report.rereads), (1, 0));
    assert_eq!(report.received[VENDA], 41, "both records are received");
    assert!(report.ok(), "a duplicate is at-least-once, not an error");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn earlier_traffic_is_not_counted_and_a_missing_topic_is_an_error() {
    let mock = cluster();
    let data = data_file();
    // Left on the output topic by an earlier run: loadgen starts reading after it.
    let producer: FutureProducer =
        ClientConfig::new().set("bootstrap.servers", mock.bootstrap_servers()).create().unwrap();
    for _ in 0..5 {
        producer.send(FutureRecord::to(VENDA).key("old").payload("{}"), Timeout::Never).await.unwrap();
    }
    let (stop, stopped) = watch::channel(false);
    let router = tokio::spawn(echo_router(mock.bootstrap_servers(), Fault::None, stopped));

    let mut opts = options(mock.bootstrap_servers(), &data);
    opts.limit = Limit::Duration(Duration::from_millis(300));
    opts.rate = 100.0;
    let report = loadgen::run(opts.clone()).await.expect("nothing missing");
    assert!((20..=31).contains(&report.sent), "sent {}", report.sent);
    assert_eq!((report.missing, report.foreign), (0, 0));
    assert_eq!(report.received[VENDA], report.sent);

    opts.review_topic = "no.such.topic".into();
    let err = loadgen::run(opts).await.expect_err("missing topic");
    assert!(matches!(err, LoadgenError::TopicMissing { ref topic, .. } if topic == "no.such.topic"), "{err}");

    stop.send(true).unwrap();
    router.await.unwrap();
    drop(producer);
    drop(mock);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_is_sent_before_the_router_starts_and_its_drain_is_timed() {
    let mock = cluster();
    let data = data_file();
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("backlog.sent");
    let mut opts = options(mock.bootstrap_servers(), &data);
    opts.limit = Limit::Count(400);
    opts.backlog = Some(marker.clone());
    let run = tokio::spawn(loadgen::run(opts));

    // The router starts only once loadgen says every message is acknowledged.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !marker.exists() {
        assert!(std::time::Instant::now() < deadline, "no backlog file after 20 s");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(std::fs::read_to_string(&marker).unwrap(), "400\n");
    let (stop, stopped) = watch::channel(false);
    let router = tokio::spawn(echo_router(mock.bootstrap_servers(), Fault::None, stopped));
    let report = run.await.unwrap().expect("nothing missing");
    stop.send(true).unwrap();
    assert_eq!(router.await.unwrap(), 400);

    assert_eq!((report.accounted, report.missing, report.received_while_sending), (400, 0, Some(0)));
    assert!(report.drain_seconds > 0.0 && report.drain_throughput > 0.0, "{report:?}");
    // The drain starts after the sends: it is shorter than send start → last output.
    assert!(report.drain_seconds < report.end_to_end_seconds - report.send_seconds, "{report:?}");
    assert!(report.render().contains("drain rate"));

    // Without a router reading, a backlog file that cannot be written is one clear error.
    let mut opts = options(mock.bootstrap_servers(), &data);
    opts.limit = Limit::Count(5);
    opts.backlog = Some(dir.path().join("no-such-dir").join("backlog.sent"));
    let err = loadgen::run(opts).await.expect_err("the file cannot be created");
    assert!(err.to_string().starts_with("cannot create the backlog file"), "{err}");
}

//! `kafka.delivery = "exactly_once"` against the test broker in its own
//! process: outputs and input offsets in one transaction per
//! `kafka.transaction_interval`; an injected abort is redone; a fenced worker
//! stops with a clear error and a successor with the same `transactional.id`
//! goes on. Outputs are read with `isolation.level = read_committed`.
//!
//! What librdkafka's mock cluster (the test broker) does not do — see the
//! README, exactly-once mode —: it acknowledges a transaction's offset commit
//! without storing it, writes no commit or abort markers (so a
//! `read_committed` reader also sees an aborted transaction's records), and
//! fences nobody when a second producer registers the same `transactional.id`.
//! The tests below check what it does do, and say where they lean on that.

mod worker_common;

use std::collections::HashMap;
use std::time::Duration;

use worker_common::*;

const LIMIT: Duration = Duration::from_secs(60);

/// Outputs per input id.
fn per_id(outs: &[Out]) -> HashMap<u64, usize> {
    let mut m = HashMap::new();
    for o in outs {
        *m.entry(o.json()["id"].as_u64().expect("id")).or_default() += 1;
    }
    m
}

/// The exactly-once settings of a test (a transactional.id of its own).
fn exactly_once(id: &str) -> String {
    format!("\n[kafka]\ndelivery = \"exactly_once\"\ntransaction_interval = \"100ms\"\ntransactional_id = \"{id}\"\n")
}

fn config(dir: &std::path::Path, broker: &Broker, group: &str, topics: &Topics, id: &str) -> std::path::PathBuf {
    // `write_config` writes `[kafka]` first; the exactly-once keys go into it.
    let path = write_config(dir, &broker.addr, group, topics, "");
    let text = std::fs::read_to_string(&path).unwrap();
    let extra = exactly_once(id);
    let keys = extra.trim_start().strip_prefix("[kafka]\n").unwrap();
    std::fs::write(&path, text.replacen("[kafka]\n", &format!("[kafka]\n{keys}"), 1)).unwrap();
    path
}

/// Waits until the worker's metrics satisfy `f`.
async fn metrics_until(url: &str, f: impl Fn(&str) -> bool + Send + 'static) -> bool {
    let url = url.to_string();
    eventually(LIMIT, move || f(&http_get(&url).1)).await
}

/// A stream through an exactly-once worker: every input once in a
/// `read_committed` read, the transactions counted, and SIGTERM commits the
/// last one and exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_input_once_in_committed_transactions() {
    let broker = Broker::start();
    let topics = Topics::new("eos");
    broker.create_topics(&topics, 3).await;
    let dir = tempfile::tempdir().unwrap();
    let group = unique("g-eos");
    let config = config(dir.path(), &broker, &group, &topics, &unique("tx"));
    let p = producer(&broker.addr);
    let n = 600;
    let mut inputs = chat_inputs(0, n);
    // Poison goes into the same transactions, to the dead-letter topic.
    inputs[7].1 = br#"{"text": "", "id": 7}"#.to_vec();
    produce_all(&p, &topics.input, &inputs[..n / 2]).await;

    let mut worker = WorkerProc::start(&config, &[]);
    let url = worker.metrics_url(Duration::from_secs(30)).await;
    read_outputs(&broker.addr, &topics.outputs(), LIMIT, |o| per_id_len(o) >= n / 2).await;
    produce_all(&p, &topics.input, &inputs[n / 2..]).await;
    let outs = read_outputs(&broker.addr, &topics.outputs(), LIMIT, |o| per_id_len(o) >= n).await;
    let counts = per_id(&outs);
    let lost = (0..n as u64).filter(|i| !counts.contains_key(i)).count();
    let duplicates: usize = counts.values().map(|c| c - 1).sum();
    let page = http_get(&url).1;
    let committed = sample(&page, "triagem_transactions_total{result=\"committed\"}");
    let aborted = sample(&page, "triagem_transactions_total{result=\"aborted\"}");
    println!("exactly-once: {n} inputs, {} outputs, {lost} lost, {duplicates} duplicates; {committed} transactions committed, {aborted} aborted", outs.len());
    assert_eq!(lost, 0, "inputs lost:\n{}", worker.log_text());
    assert_eq!(duplicates, 0);
    assert!(outs.iter().any(|o| o.topic == topics.dlq), "the poison message was not dead-lettered");
    assert!(committed >= 1.0 && aborted == 0.0, "committed {committed}, aborted {aborted}");
    assert!(sample(&page, "triagem_transaction_duration_seconds_count") >= committed);

    worker.terminate();
    let status = worker.wait_exit(Duration::from_secs(25)).expect("no exit after SIGTERM");
    assert_eq!(status.code(), Some(0), "{}", worker.log_text());
}

fn per_id_len(o: &[Out]) -> usize {
    per_id(o).len()
}

/// A transaction whose offsets the broker refuses (injected
/// `ILLEGAL_GENERATION` on TxnOffsetCommit, an abortable error) is aborted,
/// every partition is sought back to its committed offset, and the aborted
/// outputs are produced again in the next transaction: every input ends up
/// routed. The mock cluster keeps an aborted transaction's records readable,
/// so the duplicates seen here are at most that transaction's outputs
/// (Apache Kafka hides them from a `read_committed` reader: 0).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_injected_abort_is_redone() {
    let broker = Broker::start();
    let topics = Topics::new("eos-abort");
    broker.create_topics(&topics, 3).await;
    let dir = tempfile::tempdir().unwrap();
    let group = unique("g-eos-abort");
    let config = config(dir.path(), &broker, &group, &topics, &unique("tx"));
    let p = producer(&broker.addr);
    let n = 1500;
    produce_all(&p, &topics.input, &chat_inputs(0, 500)).await;

    let worker = WorkerProc::start(&config, &[]);
    let url = worker.metrics_url(Duration::from_secs(30)).await;
    read_outputs(&broker.addr, &topics.outputs(), LIMIT, |o| per_id_len(o) >= 500).await;
    assert!(
        metrics_until(&url, |page| sample(page, "triagem_transactions_total{result=\"committed\"}") >= 1.0).await,
        "no transaction committed:\n{}",
        worker.log_text()
    );
    // The next transaction's offsets are refused.
    broker.command("errors TxnOffsetCommit ILLEGAL_GENERATION").unwrap();
    produce_all(&p, &topics.input, &chat_inputs(500, n - 500)).await;
    assert!(
        metrics_until(&url, |page| sample(page, "triagem_transactions_total{result=\"aborted\"}") >= 1.0).await,
        "no transaction aborted:\n{}",
        worker.log_text()
    );
    let outs = read_outputs(&broker.addr, &topics.outputs(), LIMIT, |o| per_id_len(o) >= n).await;
    let counts = per_id(&outs);
    let lost = (0..n as u64).filter(|i| !counts.contains_key(i)).count();
    let duplicates: usize = counts.values().map(|c| c - 1).sum();
    let log = worker.log_text();
    let aborted_outputs: usize = log
        .lines()
        .filter_map(|l| l.split("transaction aborted: its ").nth(1)?.split(' ').next()?.parse::<usize>().ok())
        .sum();
    let page = http_get(&url).1;
    let aborted = sample(&page, "triagem_transactions_total{result=\"aborted\"}");
    println!(
        "injected abort: {n} inputs, {} outputs, {lost} lost, {duplicates} duplicates (the mock keeps the aborted \
         transaction's {aborted_outputs} outputs readable); {aborted} aborted",
        outs.len()
    );
    assert_eq!(lost, 0, "inputs lost after the abort:\n{log}");
    assert_eq!(aborted, 1.0);
    assert!(log.contains("rewound to the committed offset"), "{log}");
    assert!(duplicates <= aborted_outputs, "{duplicates} duplicates, more than the {aborted_outputs} aborted outputs");
}

/// A worker whose producer is fenced (the broker's answer to a newer producer
/// with the same `transactional.id`, injected on EndTxn since the mock cluster
/// does not fence by itself) stops with an error naming the id, exit status 1;
/// a successor with the same id routes every input.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fenced_worker_stops_and_its_successor_goes_on() {
    let broker = Broker::start();
    let topics = Topics::new("eos-fence");
    broker.create_topics(&topics, 3).await;
    let dir = tempfile::tempdir().unwrap();
    let group = unique("g-eos-fence");
    let id = unique("tx");
    let config = config(dir.path(), &broker, &group, &topics, &id);
    let p = producer(&broker.addr);
    let n = 1500;
    produce_all(&p, &topics.input, &chat_inputs(0, 500)).await;

    let mut zombie = WorkerProc::start(&config, &[]);
    let url = zombie.metrics_url(Duration::from_secs(30)).await;
    assert!(
        metrics_until(&url, |page| sample(page, "triagem_transactions_total{result=\"committed\"}") >= 1.0).await,
        "no transaction committed:\n{}",
        zombie.log_text()
    );
    // The next transaction's end is answered as to a fenced producer.
    broker.command("errors EndTxn PRODUCER_FENCED").unwrap();
    produce_all(&p, &topics.input, &chat_inputs(500, n - 500)).await;
    let status = zombie.wait_exit(Duration::from_secs(30)).expect("the fenced worker did not stop");
    let log = zombie.log_text();
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(log.contains("fenced: a newer worker with transactional.id") && log.contains(&id), "{log}");
    let fenced_line = log.lines().find(|l| l.contains("fenced: a newer worker")).unwrap_or_default().to_string();
    println!("fenced worker: exit 1; {fenced_line}");

    let successor = WorkerProc::start(&config, &[]);
    let outs = read_outputs(&broker.addr, &topics.outputs(), LIMIT, |o| per_id_len(o) >= n).await;
    let counts = per_id(&outs);
    let lost = (0..n as u64).filter(|i| !counts.contains_key(i)).count();
    println!("successor with the same transactional.id: {n} inputs, {} outputs, {lost} lost", outs.len());
    assert_eq!(lost, 0, "{}", successor.log_text());
}

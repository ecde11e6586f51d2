//! `kafka.delivery = "exactly_once"` against the test broker in its own
//! process, behind its transaction layer (`triagem-test-broker serve
//! --transactions`: librdkafka's mock cluster alone neither fences by
//! `transactional.id`, nor stores a transaction's offsets, nor hides aborted
//! records from a `read_committed` reader). Outputs are read with
//! `isolation.level = read_committed`, as a downstream consumer must.
//!
//! A stream through one worker; a SIGKILL mid-transaction and a restart; a
//! second worker with the same `transactional.id` fencing the first; an
//! injected abort, redone; the broker answering "fenced" on its own. Each
//! checks every input exactly once: 0 lost, 0 duplicates.

mod worker_common;

use std::time::Duration;

use worker_common::*;

const LIMIT: Duration = Duration::from_secs(60);

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
    eventually(LIMIT, move || f(&http_get_blocking(&url).1)).await
}

/// A stream through an exactly-once worker: every input once in a
/// `read_committed` read, the transactions counted, and SIGTERM commits the
/// last one and exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_input_once_in_committed_transactions() {
    let broker = Broker::transactional().await;
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
    read_ids(&broker.addr, &topics.outputs(), LIMIT, n / 2).await;
    produce_all(&p, &topics.input, &inputs[n / 2..]).await;
    let (outs, _) = read_ids(&broker.addr, &topics.outputs(), LIMIT, n).await;
    let counts = per_id(&outs);
    let lost = (0..n as u64).filter(|i| !counts.contains_key(i)).count();
    let duplicates: usize = counts.values().map(|c| c - 1).sum();
    let page = http_get(&url).await.1;
    let committed = sample(&page, "triagem_transactions_total{result=\"committed\"}");
    let aborted = sample(&page, "triagem_transactions_total{result=\"aborted\"}");
    println!("exactly-once: {n} inputs, {} outputs, {lost} lost, {duplicates} duplicates; {committed} transactions committed, {aborted} aborted", outs.len());
    assert_eq!(lost, 0, "inputs lost:\n{}", worker.log_text());
    assert_eq!(duplicates, 0);
    assert!(outs.iter().any(|o| o.topic == topics.dlq), "the poison message was not dead-lettered");
    assert!(committed >= 1.0 && aborted == 0.0, "committed {committed}, aborted {aborted}");
    assert!(sample(&page, "triagem_transaction_duration_seconds_count") >= committed);

    worker.terminate().await;
    let status = worker.wait_exit(Duration::from_secs(25)).await.expect("no exit after SIGTERM");
    assert_eq!(status.code(), Some(0), "{}", worker.log_text());
}

/// A transaction whose offsets the broker refuses (injected
/// `ILLEGAL_GENERATION` on TxnOffsetCommit, an abortable error) is aborted,
/// every partition is sought back to its committed offset, and the aborted
/// outputs are produced again in the next transaction: every input once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_injected_abort_is_redone() {
    let broker = Broker::transactional().await;
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
    read_ids(&broker.addr, &topics.outputs(), LIMIT, 500).await;
    assert!(
        metrics_until(&url, |page| sample(page, "triagem_transactions_total{result=\"committed\"}") >= 1.0).await,
        "no transaction committed:\n{}",
        worker.log_text()
    );
    // The next transaction's offsets are refused.
    broker.command("errors TxnOffsetCommit ILLEGAL_GENERATION").await.unwrap();
    produce_all(&p, &topics.input, &chat_inputs(500, n - 500)).await;
    assert!(
        metrics_until(&url, |page| sample(page, "triagem_transactions_total{result=\"aborted\"}") >= 1.0).await,
        "no transaction aborted:\n{}",
        worker.log_text()
    );
    let (outs, lost, duplicates) = read_exactly(&broker, &topics, n).await;
    let log = worker.log_text();
    let aborted_outputs: usize = log
        .lines()
        .filter_map(|l| l.split("transaction aborted: its ").nth(1)?.split(' ').next()?.parse::<usize>().ok())
        .sum();
    let page = http_get(&url).await.1;
    let aborted = sample(&page, "triagem_transactions_total{result=\"aborted\"}");
    println!(
        "injected abort: {n} inputs, {} outputs, {lost} lost, {duplicates} duplicates; {aborted} transaction aborted \
         with {aborted_outputs} outputs, redone",
        outs.len()
    );
    assert_eq!(lost, 0, "inputs lost after the abort:\n{log}");
    assert_eq!(aborted, 1.0);
    assert!(aborted_outputs > 0, "the aborted transaction held no output:\n{log}");
    assert!(log.contains("rewound to the committed offset"), "{log}");
    assert_eq!(duplicates, 0, "the aborted outputs were visible to a read_committed reader");
}

/// A worker whose transaction end the broker answers as to a fenced producer
/// (injected `PRODUCER_FENCED` on EndTxn) stops with an error naming its
/// `transactional.id`, exit status 1; a successor with the same id routes
/// every input once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fenced_worker_stops_and_its_successor_goes_on() {
    let broker = Broker::transactional().await;
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
    broker.command("errors EndTxn PRODUCER_FENCED").await.unwrap();
    produce_all(&p, &topics.input, &chat_inputs(500, n - 500)).await;
    let status = zombie.wait_exit(Duration::from_secs(30)).await.expect("the fenced worker did not stop");
    let log = zombie.log_text();
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(log.contains("fenced: a newer worker with transactional.id") && log.contains(&id), "{log}");
    let fenced_line = log.lines().find(|l| l.contains("fenced: a newer worker")).unwrap_or_default().to_string();
    println!("fenced worker: exit 1; {fenced_line}");

    let successor = WorkerProc::start(&config, &[]);
    let (outs, _) = read_ids(&broker.addr, &topics.outputs(), LIMIT, n).await;
    let counts = per_id(&outs);
    let lost = (0..n as u64).filter(|i| !counts.contains_key(i)).count();
    let duplicates: usize = counts.values().map(|c| c - 1).sum();
    println!(
        "successor with the same transactional.id: {n} inputs, {} outputs, {lost} lost, {duplicates} duplicates",
        outs.len()
    );
    assert_eq!(lost, 0, "{}", successor.log_text());
    assert_eq!(duplicates, 0);
}

/// How many records the output topics hold, read with `read_uncommitted`
/// (open and aborted transactions included) until nothing new comes for 1 s.
async fn read_uncommitted(brokers: &str, topics: &[String]) -> usize {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::{ClientConfig, Offset, TopicPartitionList};
    let (brokers, topics) = (brokers.to_string(), topics.to_vec());
    tokio::task::spawn_blocking(move || {
        let reader: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .set("group.id", unique("raw-reader"))
            .set("enable.auto.commit", "false")
            .set("isolation.level", "read_uncommitted")
            .create()
            .unwrap();
        let mut tpl = TopicPartitionList::new();
        for t in &topics {
            tpl.add_partition_offset(t, 0, Offset::Beginning).unwrap();
        }
        reader.assign(&tpl).unwrap();
        let (mut n, mut last) = (0, std::time::Instant::now());
        while last.elapsed() < Duration::from_secs(1) {
            if let Some(Ok(_)) = reader.poll(Duration::from_millis(100)) {
                n += 1;
                last = std::time::Instant::now();
            }
        }
        n
    })
    .await
    .unwrap()
}

/// Reads the outputs until every one of `n` inputs has one, then until
/// nothing new arrives for 2 s (a late duplicate would show); returns
/// (outputs, lost, duplicates).
async fn read_exactly(broker: &Broker, topics: &Topics, n: usize) -> (Vec<Out>, usize, usize) {
    let mut complete: Option<(usize, std::time::Instant)> = None;
    let mut ids = Ids::default();
    let outs = read_outputs(&broker.addr, &topics.outputs(), LIMIT, move |o| {
        if complete.is_none() && ids.update(o) >= n {
            complete = Some((o.len(), std::time::Instant::now()));
        }
        match &mut complete {
            Some((len, since)) if *len != o.len() => {
                *len = o.len();
                *since = std::time::Instant::now();
                false
            }
            Some((_, since)) => since.elapsed() >= Duration::from_secs(2),
            None => false,
        }
    })
    .await;
    let counts = per_id(&outs);
    let lost = (0..n as u64).filter(|i| !counts.contains_key(i)).count();
    let duplicates = counts.values().map(|c| c - 1).sum();
    (outs, lost, duplicates)
}

/// SIGKILL in the middle of a stream, with transactions open, and a restart
/// in the same group with the same `transactional.id`: the restarted worker
/// fences the killed one's producer (its open transaction is aborted),
/// resumes from the offsets committed with the last committed transaction,
/// and a `read_committed` read of the outputs has every input exactly once.
///
/// The kill must land while a transaction holds outputs, which is a race
/// against the transaction interval. The test steers it instead of hoping:
/// the killed workers commit every 3 s; once a transaction has committed
/// every input so far, it produces a wave of [`WAVE`] inputs, waits until
/// the worker has every wave's output acknowledged while the committed
/// offsets still stand before the wave (a fraction of a second, against the
/// 3 s to the next commit), and kills it then. A commit slipping in between
/// only costs another wave.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_transaction_then_restart_routes_each_input_once() {
    const WAVE: usize = 500;
    let broker = Broker::transactional().await;
    let topics = Topics::new("eos-kill");
    broker.create_topics(&topics, 3).await;
    let dir = tempfile::tempdir().unwrap();
    let group = unique("g-eos-kill");
    let config = config(dir.path(), &broker, &group, &topics, &unique("tx"));
    let slow_commits = [("TRIAGEM__KAFKA__TRANSACTION_INTERVAL", "3s")];
    let p = producer(&broker.addr);
    let mut n = 1000;
    produce_all(&p, &topics.input, &chat_inputs(0, n)).await;

    let mut open_at_kill = 0;
    'attempts: for attempt in 1..=3 {
        // Where this worker starts: its counters count from there.
        let start = committed_total(&broker.addr, &group, &topics.input, 3).await;
        let mut worker = WorkerProc::start(&config, &slow_commits);
        let url = worker.metrics_url(Duration::from_secs(30)).await;
        for wave in 1..=5 {
            // Everything so far routed and committed: a commit has just landed.
            let (b, g, t, all) = (broker.addr.clone(), group.clone(), topics.input.clone(), n as i64);
            let caught_up = eventually(LIMIT, move || committed_total_blocking(&b, &g, &t, 3) == all).await;
            assert!(caught_up, "the worker did not commit every input:\n{}", worker.log_text());
            produce_all(&p, &topics.input, &chat_inputs(n, WAVE)).await;
            n += WAVE;
            let (b, g, t, u, all) = (broker.addr.clone(), group.clone(), topics.input.clone(), url.clone(), n as i64);
            let state = off_runtime(move || {
                let mut last = (0, 0);
                let acked = eventually_blocking(LIMIT, || {
                    last = (outputs_acknowledged_blocking(&u) as i64 + start, committed_total_blocking(&b, &g, &t, 3));
                    last.0 >= all
                });
                (acked, last)
            })
            .await;
            let (acked, (delivered, committed_now)) = state;
            assert!(acked, "the wave's outputs were not acknowledged:\n{}", worker.log_text());
            if committed_now < delivered {
                worker.kill().await;
                let committed_inputs = committed_total(&broker.addr, &group, &topics.input, 3).await;
                // Everything the killed worker wrote, its open transaction's outputs included.
                let written = read_uncommitted(&broker.addr, &topics.outputs()).await as i64;
                open_at_kill = written - committed_inputs;
                println!(
                    "SIGKILL {attempt} after wave {wave}: {written} outputs written, {committed_inputs} inputs \
                     committed with their transactions: {open_at_kill} outputs in an open transaction"
                );
                if open_at_kill > 0 {
                    break 'attempts;
                }
                continue 'attempts;
            }
            println!("wave {wave}: committed before the check saw its outputs; another wave");
        }
        worker.kill().await;
    }
    assert!(open_at_kill > 0, "no SIGKILL caught outputs in an open transaction");

    let restarted = WorkerProc::start(&config, &[]);
    let (outs, lost, duplicates) = read_exactly(&broker, &topics, n).await;
    println!(
        "SIGKILL mid-transaction and restart: {n} inputs, {} outputs read with read_committed, {lost} lost, \
         {duplicates} duplicates",
        outs.len()
    );
    assert_eq!(lost, 0, "inputs lost:\n{}", restarted.log_text());
    assert_eq!(duplicates, 0, "duplicates in a read_committed read:\n{}", restarted.log_text());
}

/// Two workers with the same `transactional.id` (a replica started twice):
/// the newer one's registration fences the older, which can no longer write
/// and stops with an error naming the id (exit status 1); the newer one goes
/// on, and every input is routed exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zombie_with_the_same_transactional_id_is_fenced() {
    let broker = Broker::transactional().await;
    let topics = Topics::new("eos-zombie");
    broker.create_topics(&topics, 3).await;
    let dir = tempfile::tempdir().unwrap();
    let group = unique("g-eos-zombie");
    let id = unique("tx");
    let config = config(dir.path(), &broker, &group, &topics, &id);
    let p = producer(&broker.addr);
    let first = 500;
    produce_all(&p, &topics.input, &chat_inputs(0, first)).await;

    let mut older = WorkerProc::start(&config, &[]);
    let url = older.metrics_url(Duration::from_secs(30)).await;
    assert!(
        metrics_until(&url, |page| sample(page, "triagem_transactions_total{result=\"committed\"}") >= 1.0).await,
        "no transaction committed:\n{}",
        older.log_text()
    );
    let newer = WorkerProc::start(&config, &[]);
    newer.metrics_url(Duration::from_secs(30)).await;
    let more = 1000;
    produce_all(&p, &topics.input, &chat_inputs(first, more)).await;
    let status = older.wait_exit(LIMIT).await.expect("the fenced worker did not stop");
    let log = older.log_text();
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(log.contains("fenced: a newer worker with transactional.id") && log.contains(&id), "{log}");
    let line = log.lines().find(|l| l.contains("fenced: a newer worker")).unwrap_or_default().to_string();
    println!("older worker: exit 1; {line}");

    let n = first + more;
    let (outs, lost, duplicates) = read_exactly(&broker, &topics, n).await;
    println!(
        "zombie fenced: {n} inputs, {} outputs read with read_committed, {lost} lost, {duplicates} duplicates",
        outs.len()
    );
    assert_eq!(lost, 0, "inputs lost:\n{}", newer.log_text());
    assert_eq!(duplicates, 0, "duplicates:\n{}", newer.log_text());
}

/// A rebalance mid-stream in exactly-once mode (the at-least-once handover
/// scenario of `worker_delivery`, see the README's known issues): worker A,
/// worker B (its own `transactional.id`) joining while more inputs arrive,
/// then A leaving on SIGTERM while more arrive. Each revoke commits the open
/// transaction before the partitions go, so the next owner starts exactly
/// where the last committed transaction ended: every input once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_joining_then_one_leaving_routes_each_input_once() {
    let broker = Broker::transactional().await;
    let topics = Topics::new("eos-handover");
    broker.create_topics(&topics, 4).await;
    let dir = tempfile::tempdir().unwrap();
    let group = unique("g-eos-handover");
    let config = config(dir.path(), &broker, &group, &topics, &unique("tx-a"));
    let (chunk, n) = (1000, 3000);
    let p = producer(&broker.addr);
    produce_all(&p, &topics.input, &chat_inputs(0, chunk)).await;

    let mut a = WorkerProc::start(&config, &[]);
    let url_a = a.metrics_url(Duration::from_secs(30)).await;
    let u = url_a.clone();
    assert!(
        eventually(LIMIT, move || outputs_acknowledged_blocking(&u) >= 200.0).await,
        "A routed nothing:\n{}",
        a.log_text()
    );
    let id_b = unique("tx-b");
    let b = WorkerProc::start(&config, &[("TRIAGEM__KAFKA__TRANSACTIONAL_ID", &id_b)]);
    produce_all(&p, &topics.input, &chat_inputs(chunk, chunk)).await;
    let log_b = b.log.clone();
    let b_assigned = move || std::fs::read_to_string(&log_b).unwrap_or_default().contains("partitions assigned");
    assert!(eventually(LIMIT, b_assigned).await, "B never got partitions:\n{}", b.log_text());
    a.terminate().await;
    produce_all(&p, &topics.input, &chat_inputs(2 * chunk, chunk)).await;
    let status = a.wait_exit(Duration::from_secs(25)).await.expect("A did not exit within shutdown.timeout");
    assert!(status.success(), "A exited with {status}:\n{}", a.log_text());

    let (outs, lost, duplicates) = read_exactly(&broker, &topics, n).await;
    let committed_b = sample(
        &http_get(&b.metrics_url(Duration::from_secs(5)).await).await.1,
        "triagem_transactions_total{result=\"committed\"}",
    );
    println!(
        "handover, exactly-once: {n} inputs, {} outputs read with read_committed, {lost} lost, {duplicates} \
         duplicates (B committed {committed_b} transactions)",
        outs.len()
    );
    assert_eq!(lost, 0, "inputs lost:\n{}", b.log_text());
    assert_eq!(duplicates, 0, "duplicates:\n{}", b.log_text());
}

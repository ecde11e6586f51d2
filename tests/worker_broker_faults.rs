//! The worker sees broker and group faults for itself (on the test broker,
//! `triagem-test-broker`, in its own process): records that never reach it
//! are a gap — a warning and `triagem_offset_gaps_total` /
//! `triagem_offsets_skipped_total` — and a worker left without partitions
//! while its group's lag stands still reports not ready
//! (`triagem_idle_with_lag`, `/readyz` 503) until it gets them.

mod worker_common;

use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::{Offset, TopicPartitionList};
use serde_json::json;
use worker_common::*;

const LIMIT: Duration = Duration::from_secs(120);

fn metric(url: &str, series: &str) -> f64 {
    sample(&http_get(url).1, series)
}

/// Records deleted before the group read them (the test broker keeps the last
/// 5 MiB of each partition, like retention) are a gap: the worker starts past
/// its group's committed offset and says so, with the exact count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_deleted_before_they_were_read_are_a_gap() {
    let broker = Broker::start();
    let topics = Topics::new("gap");
    broker.create_topics(&topics, 1).await;
    let group = unique("g-gap");
    let p = producer(&broker.addr);
    let small: Vec<(String, Vec<u8>)> =
        (0..10).map(|i| (format!("k-{i}"), json!({"text": TEXTS[i], "id": i}).to_string().into_bytes())).collect();
    produce_all(&p, &topics.input, &small).await;
    // The group has read up to offset 3.
    let (b, g, t) = (broker.addr.clone(), group.clone(), topics.input.clone());
    tokio::task::spawn_blocking(move || {
        let c: BaseConsumer = ClientConfig::new().set("bootstrap.servers", &b).set("group.id", &g).create().unwrap();
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&t, 0, Offset::Offset(3)).unwrap();
        c.commit(&tpl, CommitMode::Sync).expect("commit offset 3");
    })
    .await
    .unwrap();
    // 7 MB more: the oldest records go.
    let big: Vec<(String, Vec<u8>)> = (0..700)
        .map(|i| (format!("big-{i}"), json!({"text": "x".repeat(10_000), "id": 10 + i}).to_string().into_bytes()))
        .collect();
    let ends = produce_all(&p, &topics.input, &big).await;
    let (b, t) = (broker.addr.clone(), topics.input.clone());
    let (low, high) = tokio::task::spawn_blocking(move || {
        let c: BaseConsumer = ClientConfig::new().set("bootstrap.servers", &b).create().unwrap();
        c.fetch_watermarks(&t, 0, Duration::from_secs(10)).unwrap()
    })
    .await
    .unwrap();
    assert_eq!(high, ends[&0]);
    assert!(low > 3, "the broker still has offset 3 (low watermark {low}): this test needs it deleted");

    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &broker.addr, &group, &topics, "");
    let worker = WorkerProc::start(&config, &[]);
    let url = worker.metrics_url(Duration::from_secs(30)).await;
    let u = url.clone();
    let done = tokio::task::spawn_blocking(move || {
        eventually_blocking(LIMIT, || outputs_acknowledged(&u) >= (high - low) as f64)
    })
    .await
    .unwrap();
    assert!(done, "the worker did not route offsets {low}..{high}");
    let labels = format!("{{partition=\"0\",topic=\"{}\"}}", topics.input);
    assert_eq!(metric(&url, &format!("triagem_offset_gaps_total{labels}")), 1.0);
    assert_eq!(metric(&url, &format!("triagem_offsets_skipped_total{labels}")), (low - 3) as f64);
    let log = worker.log_text();
    assert!(log.contains("offset gap: expected offset 3 after the committed offset"), "{log}");
    println!("committed 3, low watermark {low}: the worker counted a gap of {} offsets", low - 3);
}

/// A member that holds the only partition and never consumes, and the worker
/// in the same group: the worker has no partition while the lag stands
/// still, so after `kafka.unassigned_timeout` it is not ready (and says
/// why). Once the holder is gone, the worker gets the partition, routes the
/// backlog and is ready again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_while_the_group_lags_is_not_ready_until_partitions_come() {
    let broker = Broker::start();
    let topics = Topics::new("idle");
    broker.create_topics(&topics, 1).await;
    let group = unique("g-idle");
    let n = 20;
    let inputs: Vec<(String, Vec<u8>)> = (0..n)
        .map(|i| (format!("k-{i}"), json!({"text": TEXTS[i % TEXTS.len()], "id": i}).to_string().into_bytes()))
        .collect();
    produce_all(&producer(&broker.addr), &topics.input, &inputs).await;

    // The holder: static membership sorts members by group.instance.id, so
    // the range assignor gives it the partition.
    let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
    let (held_tx, held_rx) = std::sync::mpsc::channel::<()>();
    let (b, g, t) = (broker.addr.clone(), group.clone(), topics.input.clone());
    let holder = std::thread::spawn(move || {
        let c: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &b)
            .set("group.id", &g)
            .set("group.instance.id", "0-holder")
            .set("session.timeout.ms", "6000")
            .set("enable.auto.commit", "false")
            .create()
            .unwrap();
        c.subscribe(&[&t]).unwrap();
        let mut told = false;
        while stop_rx.try_recv().is_err() {
            // Poll for the group, but hand no message on and commit nothing.
            let _ = c.poll(Duration::from_millis(100));
            if !told && c.assignment().is_ok_and(|a| a.count() == 1) {
                told = held_tx.send(()).is_ok();
            }
        }
        // A static member does not leave on close: the group drops it after its session timeout.
    });
    held_rx.recv_timeout(Duration::from_secs(30)).expect("the holder never got the partition");

    let dir = tempfile::tempdir().unwrap();
    let extra = "[kafka.consumer]\n\"group.instance.id\" = \"1-worker\"\n\"session.timeout.ms\" = \"6000\"\n";
    let config = write_config(dir.path(), &broker.addr, &group, &topics, extra);
    let worker = WorkerProc::start(&config, &[("TRIAGEM__KAFKA__UNASSIGNED_TIMEOUT", "2s")]);
    let url = worker.metrics_url(Duration::from_secs(30)).await;
    let readyz = url.replace("/metrics", "/readyz");
    let (u, r) = (url.clone(), readyz.clone());
    let not_ready = tokio::task::spawn_blocking(move || {
        eventually_blocking(Duration::from_secs(60), || {
            metric(&u, "triagem_idle_with_lag") == 1.0 && http_get(&r).0 == 503
        })
    })
    .await
    .unwrap();
    assert!(not_ready, "the worker stayed ready without partitions:\n{}", worker.log_text());
    let (status, body) = http_get(&readyz);
    assert_eq!(status, 503);
    assert!(body.contains("no input partition assigned"), "{body}");
    assert_eq!(metric(&url, "triagem_assigned_partitions"), 0.0);
    assert_eq!(metric(&url, "triagem_ready"), 0.0);
    assert_eq!(outputs_acknowledged(&url), 0.0);
    assert!(worker.log_text().contains("messages of lag that no member works off"), "{}", worker.log_text());

    stop_tx.send(()).unwrap();
    holder.join().unwrap();
    let u = url.clone();
    let routed =
        tokio::task::spawn_blocking(move || eventually_blocking(LIMIT, || outputs_acknowledged(&u) >= n as f64))
            .await
            .unwrap();
    assert!(routed, "the worker never got the partition back:\n{}", worker.log_text());
    let (u, r) = (url.clone(), readyz.clone());
    let ready = tokio::task::spawn_blocking(move || {
        eventually_blocking(Duration::from_secs(30), || {
            metric(&u, "triagem_idle_with_lag") == 0.0 && http_get(&r).0 == 200
        })
    })
    .await
    .unwrap();
    assert!(ready, "not ready again after getting the partition:\n{}", worker.log_text());
    assert_eq!(metric(&url, "triagem_assigned_partitions"), 1.0);
}

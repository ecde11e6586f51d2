//! The worker sees broker and group faults for itself (on the test broker,
//! `triagem-test-broker`, in its own process): records that never reach it
//! are a gap — a warning and `triagem_offset_gaps_total` /
//! `triagem_offsets_skipped_total` — and a worker left without partitions
//! while its group's lag stands still reports not ready
//! (`triagem_idle_with_lag`, `/readyz` 503) until it gets them.

mod worker_common;

use std::collections::BTreeSet;
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::{Offset, TopicPartitionList};
use serde_json::json;
use worker_common::*;

const LIMIT: Duration = Duration::from_secs(120);

async fn metric(url: &str, series: &str) -> f64 {
    sample(&http_get(url).await.1, series)
}

fn metric_blocking(url: &str, series: &str) -> f64 {
    sample(&http_get_blocking(url).1, series)
}

/// Records deleted before the group read them (the test broker keeps the last
/// 5 MiB of each partition, like retention) are a gap: the worker starts past
/// its group's committed offset and says so, with the exact count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_deleted_before_they_were_read_are_a_gap() {
    let broker = Broker::start().await;
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
    let done = eventually(LIMIT, move || outputs_acknowledged_blocking(&u) >= (high - low) as f64).await;
    assert!(done, "the worker did not route offsets {low}..{high}");
    let labels = format!("{{partition=\"0\",topic=\"{}\"}}", topics.input);
    assert_eq!(metric(&url, &format!("triagem_offset_gaps_total{labels}")).await, 1.0);
    assert_eq!(metric(&url, &format!("triagem_offsets_skipped_total{labels}")).await, (low - 3) as f64);
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
    let broker = Broker::start().await;
    let topics = Topics::new("idle");
    broker.create_topics(&topics, 1).await;
    let group = unique("g-idle");
    let n = 20;
    let inputs = chat_inputs(0, n);
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
    let not_ready = eventually(Duration::from_secs(60), move || {
        metric_blocking(&u, "triagem_idle_with_lag") == 1.0 && http_get_blocking(&r).0 == 503
    })
    .await;
    assert!(not_ready, "the worker stayed ready without partitions:\n{}", worker.log_text());
    let (status, body) = http_get(&readyz).await;
    assert_eq!(status, 503);
    assert!(body.contains("no input partition assigned"), "{body}");
    assert_eq!(metric(&url, "triagem_assigned_partitions").await, 0.0);
    assert_eq!(metric(&url, "triagem_ready").await, 0.0);
    assert_eq!(outputs_acknowledged(&url).await, 0.0);
    assert!(worker.log_text().contains("messages of lag that no member works off"), "{}", worker.log_text());

    stop_tx.send(()).unwrap();
    holder.join().unwrap();
    let u = url.clone();
    let routed = eventually(LIMIT, move || outputs_acknowledged_blocking(&u) >= n as f64).await;
    assert!(routed, "the worker never got the partition back:\n{}", worker.log_text());
    let (u, r) = (url.clone(), readyz.clone());
    let ready = eventually(Duration::from_secs(30), move || {
        metric_blocking(&u, "triagem_idle_with_lag") == 0.0 && http_get_blocking(&r).0 == 200
    })
    .await;
    assert!(ready, "not ready again after getting the partition:\n{}", worker.log_text());
    assert_eq!(metric(&url, "triagem_assigned_partitions").await, 1.0);
}

/// Creates every topic of `topics` but the `suporte` output, which the
/// missing-topic tests create later.
async fn create_all_but_suporte(broker: &Broker, topics: &Topics, input_partitions: i32) {
    broker.create_topic(&topics.input, input_partitions).await;
    for t in [&topics.venda, &topics.review, &topics.dlq] {
        broker.create_topic(t, 1).await;
    }
}

/// Worker config extra: the producer notices a topic created later within 1 s.
const SUPORTE_WITHIN_1S: &str = "[kafka.producer]\n\"topic.metadata.propagation.max.ms\" = \"1000\"\n";

/// Produces `payloads` in order to partition 0 of `topic` with a producer that
/// accepts records up to 2 MB (the broker does: its limit is the topic's).
async fn produce_large(brokers: &str, topic: &str, payloads: &[(String, Vec<u8>)]) {
    let p: rdkafka::producer::FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("message.max.bytes", "2000000")
        .set("linger.ms", "5")
        .create()
        .unwrap();
    for (key, payload) in payloads {
        let record = rdkafka::producer::FutureRecord::to(topic).key(key).payload(payload).partition(0);
        p.send(record, rdkafka::util::Timeout::Never).await.map_err(|(e, _)| e).expect("produce");
    }
}

/// Inputs the worker's producer can never write out (librdkafka's
/// `message.max.bytes`, 1,000,000, rejects them locally on every attempt): an
/// oversize poison message of 1,010,000 bytes, whose dead letter would copy
/// it, and a valid message whose routed output goes just over the limit. Each
/// reaches the dead-letter topic (as a stub without payload when the dead
/// letter is too large too), the messages around them are routed, the
/// offsets are committed to the end and SIGTERM exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outputs_over_the_producers_limit_are_dead_lettered_and_the_rest_flows() {
    let broker = Broker::start().await;
    let topics = Topics::new("toolarge");
    broker.create_topics(&topics, 1).await;
    let group = unique("g-toolarge");
    let good = |i: usize| (format!("k-{i}"), json!({"text": TEXTS[i % TEXTS.len()], "id": i}).to_string().into_bytes());
    let mut inputs: Vec<(String, Vec<u8>)> = (0..10).map(good).collect();
    inputs.push(("huge".into(), vec![b'x'; 1_010_000]));
    inputs.extend((10..20).map(good));
    // Under input.max_bytes (1,005,000 here) and under 1,000,000 bytes, but its output adds the `triagem` object.
    let text = format!("quero comprar {}", "a".repeat(999_800));
    inputs.push(("big-valid".into(), json!({"text": text, "id": 999}).to_string().into_bytes()));
    inputs.extend((20..30).map(good));
    produce_large(&broker.addr, &topics.input, &inputs).await;

    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &broker.addr, &group, &topics, "");
    let mut worker = WorkerProc::start(&config, &[("TRIAGEM__INPUT__MAX_BYTES", "1005000")]);
    let url = worker.metrics_url(Duration::from_secs(30)).await;
    let total = inputs.len() as i64;
    let (b, g, t) = (broker.addr.clone(), group.clone(), topics.input.clone());
    let all_committed =
        eventually(Duration::from_secs(90), move || committed_blocking(&b, &g, &t, 1)[0] == Some(total)).await;
    assert!(all_committed, "the offsets never reached {total}:\n{}", worker.log_text());
    let outs = read_all(&broker.addr, &topics.outputs(), Duration::from_secs(2)).await;
    let routed: BTreeSet<u64> =
        outs.iter().filter(|o| o.topic != topics.dlq).filter_map(|o| o.json()["id"].as_u64()).collect();
    assert_eq!(routed, (0..30).collect::<BTreeSet<u64>>(), "the messages around the large ones were not all routed");
    let dead: Vec<&Out> = outs.iter().filter(|o| o.topic == topics.dlq).collect();
    assert_eq!(dead.len(), 2, "{dead:#?}");
    let huge = dead.iter().find(|o| o.headers["triagem-source-offset"] == "10").expect("the oversize dead letter");
    assert!(huge.headers["triagem-error"].starts_with("oversize:"), "{:?}", huge.headers);
    assert!(huge.payload.is_empty(), "the stub carries no payload");
    assert!(huge.headers["triagem-payload-dropped"].starts_with("1010000 bytes"), "{:?}", huge.headers);
    let big =
        dead.iter().find(|o| o.headers["triagem-source-offset"] == "21").expect("the rejected output's dead letter");
    assert!(big.headers["triagem-error"].starts_with("output_rejected:"), "{:?}", big.headers);
    let rejected = metric_sum(&url, "triagem_outputs_rejected_total").await;
    println!(
        "outputs rejected for good: {rejected}; dead letters: {} (payload bytes: {:?}); routed: {}",
        dead.len(),
        dead.iter().map(|o| o.payload.len()).collect::<Vec<_>>(),
        routed.len()
    );
    assert!(rejected >= 1.0);
    worker.terminate().await;
    let status = worker.wait_exit(Duration::from_secs(25)).await.expect("no exit after SIGTERM");
    assert_eq!(status.code(), Some(0), "{}", worker.log_text());
}

/// An output topic that does not exist: the worker is not ready and says
/// which topic (`/readyz`, `triagem_output_topic_unavailable`), the outputs for
/// the other topics keep flowing, while the group's committed offset stays
/// at the first input held for the missing one (outputs acknowledged out of
/// input order commit nothing past it); once nothing has been acknowledged for
/// `health.stall_timeout` it is not live either (`/healthz` 503,
/// `triagem_stalled`); once the topic is created everything held for it is
/// routed and the worker is ready and live.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_output_topic_is_reported_and_the_rest_flows() {
    let broker = Broker::start().await;
    let topics = Topics::new("missing");
    create_all_but_suporte(&broker, &topics, 1).await;
    let group = unique("g-missing");
    let n = 24;
    let texts: Vec<&str> = (0..n).map(|i| TEXTS[i % TEXTS.len()]).collect();
    let expected = expected_predictions(&texts);
    let inputs = chat_inputs(0, n);
    produce_all(&producer(&broker.addr), &topics.input, &inputs).await;
    let venda = expected.iter().filter(|p| p.label == "venda").count();
    assert!(venda > 0 && venda < n);

    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &broker.addr, &group, &topics, SUPORTE_WITHIN_1S);
    let worker = WorkerProc::start(
        &config,
        &[("TRIAGEM__KAFKA__PRODUCE_RETRY_BACKOFF", "200ms"), ("TRIAGEM__HEALTH__STALL_TIMEOUT", "3s")],
    );
    let url = worker.metrics_url(Duration::from_secs(30)).await;
    let readyz = url.replace("/metrics", "/readyz");
    let healthz = url.replace("/metrics", "/healthz");
    let series = format!("triagem_output_topic_unavailable{{topic=\"{}\"}}", topics.suporte);
    let (u, r, s) = (url.clone(), readyz.clone(), series.clone());
    let reported =
        eventually(Duration::from_secs(30), move || metric_blocking(&u, &s) == 1.0 && http_get_blocking(&r).0 == 503)
            .await;
    assert!(reported, "the missing topic was not reported:\n{}", worker.log_text());
    let (_, body) = http_get(&readyz).await;
    assert!(body.contains(&topics.suporte), "{body}");
    let outs =
        read_outputs(&broker.addr, std::slice::from_ref(&topics.venda), Duration::from_secs(60), |o| o.len() >= venda)
            .await;
    assert_eq!(outs.len(), venda, "the outputs to the existing topic did not flow");
    assert_eq!(metric(&url, "triagem_ready").await, 0.0);
    // Nothing acknowledged for health.stall_timeout (3 s) while outputs wait: not live either.
    let (u, h) = (url.clone(), healthz.clone());
    let unhealthy = eventually(Duration::from_secs(30), move || {
        metric_blocking(&u, "triagem_stalled") == 1.0 && http_get_blocking(&h).0 == 503
    })
    .await;
    assert!(unhealthy, "/healthz stayed 200 while nothing could be acknowledged:\n{}", worker.log_text());
    // No commit covers the held messages: the lag is unknown, their age is not.
    let age =
        metric(&url, &format!("triagem_oldest_unacked_seconds{{partition=\"0\",topic=\"{}\"}}", topics.input)).await;
    println!("oldest unacknowledged message of the stuck partition: {age} s");
    assert!(age >= 1.0, "oldest unacknowledged age {age}");
    // Nor does the group's commit pass the first of them, although outputs of later inputs (to venda) are
    // acknowledged: the committed offset stops at the first input whose output waits for the missing topic.
    let first_held = expected.iter().position(|p| p.label == "suporte").unwrap();
    assert!(expected[first_held..].iter().any(|p| p.label == "venda"), "no acknowledged output after a held one");
    let committed = committed(&broker.addr, &group, &topics.input, 1).await[0].unwrap_or(0);
    assert!(
        committed <= first_held as i64,
        "committed offset {committed} passes offset {first_held}, whose output waits for the missing topic"
    );

    broker.create_topic(&topics.suporte, 1).await;
    let outs = read_outputs(&broker.addr, &topics.outputs(), LIMIT, |o| o.len() >= n).await;
    let ids: BTreeSet<u64> = outs.iter().filter_map(|o| o.json()["id"].as_u64()).collect();
    assert_eq!(ids.len(), n, "inputs lost after the topic was created:\n{}", worker.log_text());
    let (u, r, s) = (url.clone(), readyz.clone(), series.clone());
    let ready =
        eventually(Duration::from_secs(30), move || metric_blocking(&u, &s) == 0.0 && http_get_blocking(&r).0 == 200)
            .await;
    assert!(ready, "not ready after the topic was created:\n{}", worker.log_text());
    assert_eq!(http_get(&healthz).await.0, 200, "still unhealthy after the topic was created");
    println!("missing output topic: {venda} outputs flowed meanwhile, {} after it was created, 0 lost", n - venda);
}

/// Backpressure without leaving the group: every slot of `kafka.max_in_flight`
/// (5 here) held by outputs waiting for a missing topic for longer than
/// `max.poll.interval.ms` (6 s). The worker pauses its partitions and keeps
/// polling (`triagem_consumer_paused` 1), so librdkafka never reports the
/// poll interval exceeded; once the topic exists, everything is routed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_in_flight_window_pauses_fetching_and_keeps_polling() {
    let broker = Broker::start().await;
    let topics = Topics::new("pause");
    create_all_but_suporte(&broker, &topics, 1).await;
    let group = unique("g-pause");
    let n = 40;
    let inputs = chat_inputs(0, n);
    produce_all(&producer(&broker.addr), &topics.input, &inputs).await;

    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &broker.addr, &group, &topics, SUPORTE_WITHIN_1S);
    let worker = WorkerProc::start(
        &config,
        &[
            ("TRIAGEM__KAFKA__MAX_IN_FLIGHT", "5"),
            ("TRIAGEM__KAFKA__PRODUCE_RETRY_BACKOFF", "200ms"),
            ("TRIAGEM__KAFKA__CONSUMER__MAX__POLL__INTERVAL__MS", "6000"),
        ],
    );
    let url = worker.metrics_url(Duration::from_secs(30)).await;
    let u = url.clone();
    let paused =
        eventually(Duration::from_secs(30), move || metric_blocking(&u, "triagem_consumer_paused") == 1.0).await;
    assert!(paused, "fetching never paused:\n{}", worker.log_text());
    // Longer than max.poll.interval.ms with every slot held.
    tokio::time::sleep(Duration::from_secs(9)).await;
    let held = outputs_acknowledged(&url).await;
    broker.create_topic(&topics.suporte, 1).await;
    let (outs, ids) = read_ids(&broker.addr, &topics.outputs(), LIMIT, n).await;
    assert_eq!(ids.len(), n, "inputs lost:\n{}", worker.log_text());
    let log = worker.log_text();
    println!(
        "paused with 5 slots held for 9 s (max.poll.interval.ms 6 s): {held} outputs before the topic came, \
         {} after; poll interval exceeded: {}",
        outs.len() as f64 - held,
        log.to_lowercase().contains("poll interval")
    );
    assert!(!log.to_lowercase().contains("poll interval"), "the worker stopped polling:\n{log}");
    assert_eq!(metric(&url, "triagem_consumer_paused").await, 0.0);
}

/// Backpressure by bytes: 4 KB inputs, `kafka.max_in_flight_bytes` 16 KiB
/// and a `kafka.max_in_flight` (1,000) that never binds, with outputs held by
/// a missing topic. Fetching pauses once the held bytes reach the bound, the
/// bytes in flight stay under the bound plus one message (the one that
/// crosses it; the check allows one more, a message librdkafka had already
/// handed over when the partition was paused) — `triagem_in_flight_bytes` —,
/// and once the topic exists everything is routed. Without the bound, every
/// `suporte` input (about half of 60) would be held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_flight_bytes_pause_fetching_at_their_bound() {
    let broker = Broker::start().await;
    let topics = Topics::new("bytes");
    create_all_but_suporte(&broker, &topics, 1).await;
    let group = unique("g-bytes");
    let n = 60;
    let pad = "x".repeat(4000);
    let inputs: Vec<(String, Vec<u8>)> = chat_inputs(0, n)
        .into_iter()
        .map(|(k, v)| {
            let mut doc: serde_json::Value = serde_json::from_slice(&v).unwrap();
            doc["pad"] = json!(pad);
            (k, doc.to_string().into_bytes())
        })
        .collect();
    let largest = inputs.iter().map(|(k, v)| k.len() + v.len()).max().unwrap() as f64;
    produce_all(&producer(&broker.addr), &topics.input, &inputs).await;

    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &broker.addr, &group, &topics, SUPORTE_WITHIN_1S);
    let worker = WorkerProc::start(
        &config,
        &[
            ("TRIAGEM__KAFKA__MAX_IN_FLIGHT", "1000"),
            ("TRIAGEM__KAFKA__MAX_IN_FLIGHT_BYTES", "16KiB"),
            ("TRIAGEM__INPUT__MAX_BYTES", "10000"),
            ("TRIAGEM__KAFKA__PRODUCE_RETRY_BACKOFF", "200ms"),
        ],
    );
    let url = worker.metrics_url(Duration::from_secs(30)).await;
    let u = url.clone();
    let paused =
        eventually(Duration::from_secs(30), move || metric_blocking(&u, "triagem_consumer_paused") == 1.0).await;
    assert!(paused, "fetching never paused:\n{}", worker.log_text());
    // Several commit intervals (the gauges' period) with the held outputs still waiting.
    let mut peak = 0.0f64;
    for _ in 0..15 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        peak = peak.max(metric(&url, "triagem_in_flight_bytes").await);
    }
    let (held, messages) =
        (metric(&url, "triagem_in_flight_bytes").await, metric(&url, "triagem_in_flight_messages").await);
    let bound = 16.0 * 1024.0;
    println!(
        "max_in_flight_bytes 16 KiB, {largest:.0}-byte inputs, outputs held by a missing topic: paused with {held:.0} \
         bytes in {messages:.0} messages in flight (peak {peak:.0}; bound plus one message {:.0})",
        bound + largest
    );
    assert!(peak <= bound + 2.0 * largest, "{peak} bytes in flight, over the bound plus two messages");
    broker.create_topic(&topics.suporte, 1).await;
    let (_, ids) = read_ids(&broker.addr, &topics.outputs(), LIMIT, n).await;
    assert_eq!(ids.len(), n, "inputs lost:\n{}", worker.log_text());
}

/// A fatal librdkafka error ends the worker with a non-zero exit, so that its
/// supervisor restarts it, instead of a worker that looks alive and routes
/// nothing: the broker answers the idempotent producer's InitProducerId with
/// CLUSTER_AUTHORIZATION_FAILED (31), which librdkafka makes a fatal error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fatal_client_error_exits_non_zero() {
    let broker = Broker::start().await;
    let topics = Topics::new("fatal");
    broker.create_topics(&topics, 1).await;
    broker.command("errors InitProducerId CLUSTER_AUTHORIZATION_FAILED").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &broker.addr, &unique("g-fatal"), &topics, "");
    let started = std::time::Instant::now();
    let mut worker = WorkerProc::start(&config, &[]);
    let status = worker.wait_exit(Duration::from_secs(60)).await;
    let log = worker.log_text();
    let status = status.unwrap_or_else(|| panic!("the worker did not exit within 60 s of a fatal error:\n{log}"));
    let reason = log.lines().find(|l| l.contains("fatal:")).unwrap_or_default().to_string();
    println!("fatal producer error: exit {status} after {:.1} s; {reason}", started.elapsed().as_secs_f64());
    assert!(!status.success(), "exit status {status} after a fatal error:\n{log}");
    assert!(log.contains("ClusterAuthorizationFailed") || log.contains("CLUSTER_AUTHORIZATION"), "{log}");
}

/// SIGTERM after the broker has gone: librdkafka's synchronous commit and
/// its close wait for the group coordinator without a limit of their own
/// (a worker whose periodic commit was in flight when the broker went waited
/// for good; without one in flight, the final commit failed after ~14 s and
/// the worker said "stopped cleanly" and exited 0). It must stop within
/// `shutdown.timeout` (2 s here) plus the close graces, say in one sentence
/// that the broker did not answer the final commit, and exit non-zero, as
/// any shutdown that runs out of time does (its last outputs were
/// acknowledged, their offsets not committed: they will be consumed again,
/// never lost).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_the_broker_gone_stops_within_the_shutdown_timeout() {
    let mut broker = Broker::start().await;
    let topics = Topics::new("gone");
    broker.create_topics(&topics, 1).await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &broker.addr, &unique("g-gone"), &topics, "");
    // No periodic commit before the broker goes: the final commit has offsets to send.
    let env = [("TRIAGEM__SHUTDOWN__TIMEOUT", "2s"), ("TRIAGEM__KAFKA__COMMIT_INTERVAL", "10m")];
    let mut worker = WorkerProc::start(&config, &env);
    let n = 20;
    produce_all(&producer(&broker.addr), &topics.input, &chat_inputs(0, n)).await;
    let outs = read_outputs(&broker.addr, &topics.outputs(), LIMIT, |o| o.len() >= n).await;
    assert_eq!(outs.len(), n, "{}", worker.log_text());

    broker.kill();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let started = std::time::Instant::now();
    worker.terminate().await;
    let status = worker.wait_exit(Duration::from_secs(60)).await;
    let log = worker.log_text();
    let status = status.unwrap_or_else(|| panic!("the worker was still running 60 s after SIGTERM:\n{log}"));
    let took = started.elapsed();
    let reason = log.lines().find(|l| l.contains("did not answer the final commit")).unwrap_or_default().to_string();
    println!("SIGTERM with the broker gone: exit {status} after {:.1} s; {reason}", took.as_secs_f64());
    assert!(!status.success(), "exit {status}: the final commit cannot have succeeded:\n{log}");
    assert!(!reason.is_empty(), "no sentence saying the broker did not answer the final commit:\n{log}");
    // 2 s of shutdown.timeout and a few half-second graces; a hang is minutes.
    assert!(took < Duration::from_secs(30), "took {took:?}:\n{log}");
}

/// A revoke with messages in flight that cannot finish (their outputs wait for
/// a missing topic): after `shutdown.timeout` (2 s here) the revoke gives
/// up on them, and the first worker abandons them — it frees their slots and
/// writes nothing more for partitions the second worker may now own
/// (`triagem_outputs_abandoned_total`). Once the topic exists nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoke_that_times_out_abandons_the_revoked_outputs() {
    let broker = Broker::start().await;
    let topics = Topics::new("revoke");
    create_all_but_suporte(&broker, &topics, 2).await;
    let group = unique("g-revoke");
    let n = 60;
    let inputs = chat_inputs(0, n);
    produce_all(&producer(&broker.addr), &topics.input, &inputs).await;

    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &broker.addr, &group, &topics, SUPORTE_WITHIN_1S);
    let env = [("TRIAGEM__KAFKA__PRODUCE_RETRY_BACKOFF", "200ms"), ("TRIAGEM__SHUTDOWN__TIMEOUT", "2s")];
    let first = WorkerProc::start(&config, &env);
    let url = first.metrics_url(Duration::from_secs(30)).await;
    let u = url.clone();
    let held = eventually(Duration::from_secs(30), move || {
        metric_blocking(&u, "triagem_queue_depth{queue=\"producer\"}") > 0.0
    })
    .await;
    assert!(held, "no output held:\n{}", first.log_text());
    let second = WorkerProc::start(&config, &env);
    let u = url.clone();
    let abandoned =
        eventually(Duration::from_secs(60), move || metric_blocking(&u, "triagem_outputs_abandoned_total") > 0.0).await;
    assert!(abandoned, "the revoked outputs were not abandoned:\n{}", first.log_text());
    let abandoned = metric(&url, "triagem_outputs_abandoned_total").await;
    broker.create_topic(&topics.suporte, 1).await;
    let (_, ids) = read_ids(&broker.addr, &topics.outputs(), LIMIT, n).await;
    assert_eq!(ids.len(), n, "inputs lost:\n{}\n{}", first.log_text(), second.log_text());
    let outs = read_all(&broker.addr, &topics.outputs(), Duration::from_secs(3)).await;
    println!(
        "revoke timed out with outputs held: {abandoned} outputs abandoned by the first worker; {} outputs for {n} inputs, \
         0 lost, {} duplicates",
        outs.len(),
        outs.len() - n
    );
}

/// The broker gone for 10 s mid-stream (the test broker drops every
/// connection and refuses new ones), then back: the worker reports not ready
/// meanwhile (`/readyz` 503) and, once the broker is back, routes everything:
/// nothing lost, duplicates counted. The producer's `message.timeout.ms` is
/// 1 s here, so that the outputs held meanwhile fail in librdkafka
/// (`MessageTimedOut`) several times over and the worker's own retry is what
/// keeps them (with librdkafka's 30 s its internal retries outlast the
/// outage); the consumer's session timeout is 30 s, longer than the outage,
/// so that the group keeps the worker — with 6 s it would drop it, and the
/// partitions consumed again from the committed offsets would redeliver every
/// held input, hiding an output the retry lost. Every slot of
/// `kafka.max_in_flight` is taken meanwhile (fetching paused) while the
/// consumer reports errors: the worker must resume fetching once the outputs
/// are delivered (four runs in thirteen stalled for good, paused with nothing in
/// flight, before the consume stage resumed on room seen by any wait).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_down_for_10_s_mid_stream_loses_nothing() {
    let broker = Broker::start().await;
    let topics = Topics::new("down");
    broker.create_topics(&topics, 2).await;
    let group = unique("g-down");
    let n = 20_000; // enough that the worker is still busy when the broker goes down
    let inputs = chat_inputs(0, n);
    produce_all(&producer(&broker.addr), &topics.input, &inputs).await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &broker.addr, &group, &topics, "");
    let worker = WorkerProc::start(
        &config,
        &[
            ("TRIAGEM__KAFKA__UNASSIGNED_TIMEOUT", "2s"),
            ("TRIAGEM__KAFKA__PRODUCER__MESSAGE__TIMEOUT__MS", "1000"),
            ("TRIAGEM__KAFKA__CONSUMER__SESSION__TIMEOUT__MS", "30000"),
        ],
    );
    let url = worker.metrics_url(Duration::from_secs(30)).await;
    let readyz = url.replace("/metrics", "/readyz");
    let u = url.clone();
    assert!(
        eventually(LIMIT, move || outputs_acknowledged_blocking(&u) >= 500.0).await,
        "nothing routed:\n{}",
        worker.log_text()
    );
    broker.down().await;
    let before = outputs_acknowledged(&url).await;
    let r = readyz.clone();
    let down_at = std::time::Instant::now();
    let not_ready = eventually(Duration::from_secs(10), move || http_get_blocking(&r).0 == 503).await;
    let not_ready_after = down_at.elapsed();
    tokio::time::sleep(Duration::from_secs(10).saturating_sub(down_at.elapsed())).await;
    let during = outputs_acknowledged(&url).await;
    broker.up().await;
    assert!(not_ready, "/readyz stayed 200 with the broker down:\n{}", worker.log_text());
    let (outs, ids) = read_ids(&broker.addr, &topics.outputs(), LIMIT, n).await;
    assert_eq!(
        ids.len(),
        n,
        "inputs lost ({} outputs read; paused {}, in flight {}):\n{}",
        outs.len(),
        metric(&url, "triagem_consumer_paused").await,
        metric(&url, "triagem_in_flight_messages").await,
        worker.log_text()
    );
    let r = readyz.clone();
    let ready = eventually(Duration::from_secs(30), move || http_get_blocking(&r).0 == 200).await;
    assert!(ready, "not ready after the broker came back:\n{}", worker.log_text());
    let outs = read_all(&broker.addr, &topics.outputs(), Duration::from_secs(2)).await;
    // Deliveries that failed and that the worker enqueued again (librdkafka's own retries are not counted).
    let failed = metric_sum(&url, "triagem_produce_errors_total").await;
    assert!(failed >= 1.0, "no delivery failed while the broker was down: the worker's retry went untested");
    println!(
        "broker down 10 s: not ready after {not_ready_after:?}; {before} outputs acknowledged before, {during} when it \
         came back; {failed} failed deliveries retried by the worker; {} outputs for {n} inputs, 0 lost, {} duplicates",
        outs.len(),
        outs.len() - n
    );
}

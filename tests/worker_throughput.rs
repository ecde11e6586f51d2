//! The issue's acceptance run, against a Kafka-protocol broker in its own
//! process (the test broker; `TRIAGEM_TEST_BROKER=tansu` for tansu):
//! 10,000 mixed messages (1% poison) all arrive where they belong, with
//! nothing lost across a SIGKILL and restart; prints the end-to-end
//! throughput. Heavy for CI, so ignored by default:
//!
//! ```sh
//! cargo test --release --test worker_throughput -- --ignored --nocapture
//! # another model: TRIAGEM_TEST_MODEL=models/triagem cargo test --release ...
//! ```

mod worker_common;

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use serde_json::json;
use worker_common::*;

const POISON: &[(&str, &[u8])] = &[
    ("invalid_json", b"{\"text\": \"sem fechar"),
    ("missing_text", b"{\"mensagem\": \"oi\"}"),
    ("empty_text", b"{\"text\": \"\"}"),
    ("non_string_text", b"{\"text\": [1, 2]}"),
    ("invalid_utf8", b"{\"text\": \"\xff\xfe\"}"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "10,000 messages: run with --ignored --nocapture (release build recommended)"]
async fn ten_thousand_mixed_messages_survive_a_sigkill() {
    let n: usize = std::env::var("TRIAGEM_THROUGHPUT_MESSAGES").ok().and_then(|v| v.parse().ok()).unwrap_or(10_000);
    let broker = Broker::start().await;
    let topics = Topics::new("bulk");
    let partitions = 4;
    broker.create_topics(&topics, partitions).await;
    let dir = tempfile::tempdir().unwrap();
    let group = unique("g-bulk");
    let config = write_config(dir.path(), &broker.addr, &group, &topics, "");
    let env = PRODUCTION_SETTINGS;

    let texts =
        triagem::loadgen::read_texts(std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/data/teste.jsonl")))
            .expect("data/teste.jsonl");
    let mut inputs = Vec::with_capacity(n);
    let mut poison_ids = HashMap::new();
    for i in 0..n {
        if i % 100 == 50 {
            let (kind, bytes) = POISON[(i / 100) % POISON.len()];
            poison_ids.insert(i, kind);
            inputs.push((format!("k-{i}"), bytes.to_vec()));
        } else {
            let v = json!({"text": texts[i % texts.len()], "id": i});
            inputs.push((format!("k-{i}"), v.to_string().into_bytes()));
        }
    }
    let p = producer(&broker.addr);
    let t = Instant::now();
    produce_all(&p, &topics.input, &inputs).await;
    println!("produced {n} inputs in {:.1}s", t.elapsed().as_secs_f64());

    // First run: measure the steady rate, then SIGKILL half way.
    let mut worker = WorkerProc::start(&config, &env);
    let url = worker.metrics_url(Duration::from_secs(30)).await;
    let (u, half) = (url.clone(), n as f64 / 2.0);
    let (rate, first_at) = tokio::task::spawn_blocking(move || {
        let start = Instant::now();
        assert!(
            eventually_blocking(Duration::from_secs(120), || outputs_acknowledged_blocking(&u) >= 100.0),
            "no output"
        );
        let (c0, t0) = (outputs_acknowledged_blocking(&u), Instant::now());
        let first_at = start.elapsed();
        assert!(eventually_blocking(Duration::from_secs(600), || outputs_acknowledged_blocking(&u) >= half), "stalled");
        let (c1, t1) = (outputs_acknowledged_blocking(&u), Instant::now());
        ((c1 - c0) / (t1 - t0).as_secs_f64(), first_at)
    })
    .await
    .unwrap();
    worker.kill().await;
    println!(
        "THROUGHPUT: {rate:.0} messages/s end to end (consume → classify → produce acked), \
         first outputs {:.1}s after start; SIGKILL at ~{half} outputs",
        first_at.as_secs_f64()
    );

    let _restarted = WorkerProc::start(&config, &env);
    let outs = read_outputs(&broker.addr, &topics.outputs(), Duration::from_secs(900), |o| {
        o.len() >= n && o.iter().map(|o| o.key.clone()).collect::<HashSet<_>>().len() >= n
    })
    .await;

    let mut per_key: HashMap<String, usize> = HashMap::new();
    for o in &outs {
        *per_key.entry(o.key.clone().unwrap()).or_default() += 1;
    }
    let missing: Vec<usize> = (0..n).filter(|i| !per_key.contains_key(&format!("k-{i}"))).collect();
    assert!(missing.is_empty(), "{} inputs lost, e.g. {:?}", missing.len(), &missing[..missing.len().min(10)]);
    let duplicates: usize = per_key.values().map(|c| c - 1).sum();
    println!("SIGKILL restart: {n} inputs, {} outputs, {duplicates} duplicates (at-least-once)", outs.len());

    // Everything is where it belongs.
    let distinct: Vec<&str> = texts.iter().map(String::as_str).collect();
    let expected = expected_predictions(&distinct);
    let label_of: HashMap<&str, &str> = distinct.iter().zip(&expected).map(|(t, p)| (*t, p.label.as_str())).collect();
    for o in &outs {
        let id: usize = o.key.as_ref().unwrap()[2..].parse().unwrap();
        if let Some(kind) = poison_ids.get(&id) {
            assert_eq!(o.topic, topics.dlq, "poison {id} not in the DLQ");
            assert!(o.headers["triagem-error"].starts_with(kind), "{id}: {:?}", o.headers);
        } else {
            let text = texts[id % texts.len()].as_str();
            assert_eq!(o.topic, topics.for_label(label_of[text]), "id {id}");
        }
    }
}

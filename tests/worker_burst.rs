//! Memory under a burst: the whole backlog is on the broker before the worker
//! starts, and the worker's resident memory must stay under a bound that
//! does not grow with the backlog (the README's delivery section records the
//! figures). Heavy, so ignored by default:
//!
//! ```sh
//! cargo test --release --test worker_burst -- --ignored --nocapture --test-threads 1
//! TRIAGEM_BURST_MESSAGES=50000 cargo test ...   # a smaller burst
//! ```
//!
//! Nothing lost is checked on the committed offsets: the worker commits an
//! offset only once every message before it has an acknowledged output, so
//! committed = produced means every input has its output.

mod worker_common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use worker_common::*;

/// Resident memory of a process now and at its peak (VmRSS, VmHWM), in KiB.
fn rss_kib(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status.lines().find_map(|l| l.strip_prefix(name)).and_then(|v| v.split_whitespace().next()?.parse().ok())
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

/// Produces `inputs` to a fresh 4-partition topic, starts a worker with the
/// production defaults of `config/default.toml` (`input.max_bytes` given), and waits
/// until every input's offset is committed. Returns (peak RSS MiB, seconds).
async fn burst(name: &str, inputs: Vec<(String, Vec<u8>)>, max_bytes: &str) -> (f64, f64) {
    let n = inputs.len() as i64;
    let broker = Broker::start().await;
    let topics = Topics::new(name);
    let partitions = 4;
    broker.create_topics(&topics, partitions).await;
    let dir = tempfile::tempdir().unwrap();
    let group = unique(&format!("g-{name}"));
    let config = write_config(dir.path(), &broker.addr, &group, &topics, "");
    let mut env = PRODUCTION_SETTINGS.to_vec();
    env.push(("TRIAGEM__INPUT__MAX_BYTES", max_bytes));
    let p = producer(&broker.addr);
    let t = Instant::now();
    produce_all(&p, &topics.input, &inputs).await;
    drop(inputs);
    println!("{name}: {n} inputs on the broker in {:.1}s", t.elapsed().as_secs_f64());

    let worker = WorkerProc::start(&config, &env);
    let pid = worker.child.id();
    let (done, peak) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)));
    let sampler = {
        let (done, peak) = (done.clone(), peak.clone());
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                if let Some((_, hwm)) = rss_kib(pid) {
                    peak.fetch_max(hwm, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    let start = Instant::now();
    let (addr, g, input) = (broker.addr.clone(), group.clone(), topics.input.clone());
    let all_committed =
        eventually(Duration::from_secs(1800), move || committed_total_blocking(&addr, &g, &input, partitions) >= n)
            .await;
    let seconds = start.elapsed().as_secs_f64();
    done.store(true, Ordering::Relaxed);
    sampler.join().unwrap();
    let peak_mib = peak.load(Ordering::Relaxed) as f64 / 1024.0;
    let committed_now = committed_total(&broker.addr, &group, &topics.input, partitions).await;
    assert!(all_committed, "{name}: {committed_now} of {n} committed after {seconds:.0}s:\n{}", worker.log_text());
    println!(
        "BURST {name}: {n} messages, all committed in {seconds:.1}s ({:.0} msg/s), worker peak RSS {peak_mib:.0} MiB",
        n as f64 / seconds
    );
    (peak_mib, seconds)
}

/// 200,000 chat messages in one burst: memory is bounded by
/// `kafka.max_in_flight` and librdkafka's prefetch, not by the backlog.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "200,000 messages: run with --ignored --nocapture"]
async fn a_burst_of_200k_messages_stays_under_the_memory_bound() {
    let n: usize = std::env::var("TRIAGEM_BURST_MESSAGES").ok().and_then(|v| v.parse().ok()).unwrap_or(200_000);
    let texts =
        triagem::loadgen::read_texts(std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/data/teste.jsonl")))
            .expect("data/teste.jsonl");
    let inputs = (0..n)
        .map(|i| (format!("k-{i}"), json!({"text": texts[i % texts.len()], "id": i}).to_string().into_bytes()))
        .collect();
    let (peak_mib, _) = burst("burst", inputs, "65536").await;
    assert!(peak_mib < 400.0, "peak RSS {peak_mib:.0} MiB is over the documented 400 MiB");
}

/// A flood of 1 MB messages, valid (`input.max_bytes` raised to 2 MB), so
/// each is decoded, classified and held until its output is acknowledged:
/// in-flight bytes, not only the message count, must bound memory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a flood of 1 MB messages: run with --ignored --nocapture"]
async fn a_flood_of_1mb_messages_stays_under_the_memory_bound() {
    let n: usize = std::env::var("TRIAGEM_FLOOD_MESSAGES").ok().and_then(|v| v.parse().ok()).unwrap_or(1_000);
    let body = "x".repeat(1_000_000 - 64);
    let inputs = (0..n).map(|i| (format!("k-{i}"), json!({"text": body, "id": i}).to_string().into_bytes())).collect();
    let (peak_mib, _) = burst("flood", inputs, "2000000").await;
    assert!(peak_mib < 400.0, "peak RSS {peak_mib:.0} MiB is over the documented 400 MiB");
}

//! The worker against a Kafka-protocol broker in its own process (the test
//! broker, `triagem-test-broker`; see tests/worker_common): where each message
//! lands and what it carries.

#[path = "common/deploy_names.rs"]
mod deploy_names;
mod worker_common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::time::Duration;

use serde_json::json;
use worker_common::*;

const LIMIT: Duration = Duration::from_secs(120);

/// Every message of a mixed batch lands exactly once in its label's topic, with
/// key, headers and fields intact and the label the model gives in-process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_batch_lands_once_in_the_right_topic_intact() {
    let broker = Broker::start().await;
    let topics = Topics::new("mixed");
    broker.create_topics(&topics, 2).await;
    let dir = tempfile::tempdir().unwrap();
    let group = unique("g-mixed");
    let config = write_config(dir.path(), &broker.addr, &group, &topics, "");
    let _worker = WorkerProc::start(&config, &[]);

    let n = 36;
    let texts: Vec<&str> = (0..n).map(|i| TEXTS[i % TEXTS.len()]).collect();
    let expected = expected_predictions(&texts);
    let p = producer(&broker.addr);
    for (i, text) in texts.iter().enumerate() {
        let value = json!({"text": text, "id": i, "canal": "whatsapp", "cliente": {"nome": "Ana"}});
        let headers = [("trace-id", format!("t-{i}")), ("origem", "bot".to_string())];
        let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        produce(&p, &topics.input, &format!("k-{i}"), value.to_string().as_bytes(), &headers).await;
    }

    let outs = read_outputs(&broker.addr, &topics.outputs(), LIMIT, |o| o.len() >= n).await;
    assert_eq!(outs.len(), n, "outputs: {outs:#?}");
    // Exactly once: nothing more arrives.
    let all = read_all(&broker.addr, &topics.outputs(), Duration::from_secs(3)).await;
    assert_eq!(all.len(), n, "an input was routed more than once");

    let mut seen = HashMap::new();
    for out in &outs {
        let v = out.json();
        let id = v["id"].as_u64().expect("id field kept") as usize;
        assert!(seen.insert(id, ()).is_none(), "id {id} routed twice");
        let want = &expected[id];
        assert_eq!(out.topic, topics.for_label(&want.label), "id {id}: {v}");
        assert_eq!(out.key.as_deref(), Some(format!("k-{id}").as_str()));
        assert_eq!(out.headers["trace-id"], format!("t-{id}"));
        assert_eq!(out.headers["origem"], "bot");
        assert_eq!(out.header_order[..2], ["trace-id", "origem"], "input headers first, in order");
        assert_eq!(out.headers["triagem-label"], want.label);
        assert_eq!(out.headers["triagem-source-topic"], topics.input);
        assert!(out.headers["triagem-source-partition"].parse::<i32>().is_ok_and(|p| p < 2), "{:?}", out.headers);
        assert!(out.headers["triagem-source-offset"].parse::<i64>().is_ok(), "{:?}", out.headers);
        let score: f32 = out.headers["triagem-score"].parse().unwrap();
        assert!((score - want.score).abs() < 1e-3, "id {id}: score {score} vs in-process {}", want.score);
        assert_eq!(v["text"], texts[id]);
        assert_eq!(v["canal"], "whatsapp");
        assert_eq!(v["cliente"]["nome"], "Ana");
        let t = &v["triagem"];
        assert_eq!(t["label"], want.label.as_str());
        assert!((t["score"].as_f64().unwrap() as f32 - want.score).abs() < 1e-3);
        assert_eq!(t["scores"].as_object().unwrap().len(), want.scores.len());
        let model_name = tiny_model().canonicalize().unwrap().file_name().unwrap().to_string_lossy().into_owned();
        assert_eq!(t["model"], model_name.as_str());
        assert!(t["model_version"].as_str().is_some_and(|s| s.len() == 12));
        assert!(chrono::DateTime::parse_from_rfc3339(t["classified_at"].as_str().unwrap()).is_ok());
    }
    assert_eq!(seen.len(), n);
}

/// Each poison kind reaches the dead-letter topic, bytes unchanged, with its
/// reason and source coordinates, while the good messages around it are routed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_poison_kind_goes_to_the_dlq_while_good_messages_flow() {
    let broker = Broker::start().await;
    let topics = Topics::new("poison");
    broker.create_topics(&topics, 1).await;
    let dir = tempfile::tempdir().unwrap();
    let group = unique("g-poison");
    let config = write_config(dir.path(), &broker.addr, &group, &topics, "");
    let worker = WorkerProc::start(&config, &[]);

    let oversize = json!({"text": "a".repeat(3000)}).to_string().into_bytes();
    let poison: Vec<(&str, Vec<u8>)> = vec![
        ("invalid_json", b"{\"text\": \"sem fechar".to_vec()),
        ("missing_text", br#"{"mensagem": "oi"}"#.to_vec()),
        ("empty_text", br#"{"text": "   "}"#.to_vec()),
        ("non_string_text", br#"{"text": 42}"#.to_vec()),
        ("invalid_utf8", b"{\"text\": \"caf\xe9\"}".to_vec()),
        ("oversize", oversize),
    ];
    let p = producer(&broker.addr);
    let mut good = 0;
    for (i, (kind, bytes)) in poison.iter().enumerate() {
        for j in 0..3 {
            let v = json!({"text": TEXTS[(i * 3 + j) % TEXTS.len()], "id": good});
            produce(&p, &topics.input, &format!("good-{good}"), v.to_string().as_bytes(), &[]).await;
            good += 1;
        }
        produce(&p, &topics.input, &format!("poison-{kind}"), bytes, &[("trace-id", kind)]).await;
    }

    let n = good + poison.len();
    let outs = read_outputs(&broker.addr, &topics.outputs(), LIMIT, |o| o.len() >= n).await;
    assert_eq!(outs.len(), n);
    let dlq: Vec<&Out> = outs.iter().filter(|o| o.topic == topics.dlq).collect();
    assert_eq!(dlq.len(), poison.len(), "{dlq:#?}");
    for (kind, bytes) in &poison {
        let d = dlq
            .iter()
            .find(|o| o.key.as_deref() == Some(&format!("poison-{kind}")))
            .unwrap_or_else(|| panic!("{kind} not in the DLQ"));
        assert_eq!(&d.payload, bytes, "{kind}: payload must be unchanged");
        assert!(d.headers["triagem-error"].starts_with(&format!("{kind}: ")), "{kind}: {:?}", d.headers);
        assert_eq!(d.headers["trace-id"], *kind);
        assert_eq!(d.headers["triagem-source-topic"], topics.input);
        assert_eq!(d.headers["triagem-source-partition"], "0");
        assert!(d.headers["triagem-source-offset"].parse::<i64>().is_ok());
    }
    let routed: Vec<&Out> = outs.iter().filter(|o| o.topic != topics.dlq).collect();
    let mut ids: Vec<u64> = routed.iter().map(|o| o.json()["id"].as_u64().unwrap()).collect();
    ids.sort();
    assert_eq!(ids, (0..good as u64).collect::<Vec<_>>());

    // Each reason is counted.
    let url = worker.metrics_url(Duration::from_secs(5)).await;
    let (status, page) = http_get(&url).await;
    assert_eq!(status, 200);
    for (kind, _) in &poison {
        let series = format!("triagem_messages_dead_lettered_total{{reason=\"{kind}\"}}");
        assert_eq!(sample(&page, &series), 1.0, "{series} in\n{page}");
    }
    // The worker's latency is counted for every output, its stages for
    // those that went through the model — and they add up to it: the stages'
    // sums plus the dead letters' latencies are the latency's sum.
    let u = url.clone();
    let latency_count = move || sample(&http_get_blocking(&u).1, "triagem_worker_latency_seconds_count");
    assert!(eventually(Duration::from_secs(15), move || latency_count() == n as f64).await, "latency not counted");
    let (_, page) = http_get(&url).await;
    let mut stages_sum = 0.0;
    for stage in ["queue", "inference", "delivery"] {
        let count = sample(&page, &format!("triagem_worker_stage_seconds_count{{stage=\"{stage}\"}}"));
        assert_eq!(count, good as f64, "{stage}: one observation per classified message");
        let sum = sample(&page, &format!("triagem_worker_stage_seconds_sum{{stage=\"{stage}\"}}"));
        assert!(sum > 0.0, "{stage}: no time");
        stages_sum += sum;
    }
    let latency_sum = sample(&page, "triagem_worker_latency_seconds_sum");
    assert!(
        stages_sum <= latency_sum + 1e-6 && stages_sum > 0.5 * latency_sum,
        "the stages' {stages_sum} s against the latency's {latency_sum} s"
    );
    // Each classified message's calibrated score is observed once, under its
    // predicted label: the scores the routed outputs carry, label by label.
    let mut by_label: BTreeMap<String, (f64, f64)> = BTreeMap::new();
    for o in &routed {
        let v = o.json();
        let t = &v["triagem"];
        let e = by_label.entry(t["label"].as_str().unwrap().to_string()).or_default();
        e.0 += 1.0;
        e.1 += t["score"].as_f64().unwrap();
    }
    for (label, (count, sum)) in &by_label {
        let c = sample(&page, &format!("triagem_prediction_score_count{{label=\"{label}\"}}"));
        let s = sample(&page, &format!("triagem_prediction_score_sum{{label=\"{label}\"}}"));
        assert_eq!(c, *count, "{label}: one score per classified message");
        assert!((s - sum).abs() < 1e-4 * count, "{label}: scores observed {s}, routed {sum}");
    }
    let u = url.clone();
    assert!(
        eventually(Duration::from_secs(15), move || sample(
            &http_get_blocking(&u).1,
            "triagem_commits_total{result=\"ok\"}"
        ) > 0.0)
        .await,
        "no commit counted"
    );
    assert_eq!(http_get(&url.replace("/metrics", "/healthz")).await.0, 200);
    let readyz = url.replace("/metrics", "/readyz");
    assert!(eventually(Duration::from_secs(15), move || http_get_blocking(&readyz).0 == 200).await);

    // Every metric the Grafana dashboard and the alert rules query is on this
    // live worker's page (`up` is Prometheus' own). Consumer lag comes with
    // librdkafka's statistics, every 5 s: wait for it.
    let referenced = deploy_names::referenced_metric_names(Path::new(env!("CARGO_MANIFEST_DIR")));
    let missing = move || -> BTreeSet<String> {
        let exposed = deploy_names::exposed_metric_names(&http_get_blocking(&url).1);
        referenced.keys().filter(|n| *n != "up" && !exposed.contains(*n)).cloned().collect()
    };
    let check = missing.clone();
    let all_exposed = eventually(Duration::from_secs(20), move || check().is_empty()).await;
    let left = if all_exposed { BTreeSet::new() } else { off_runtime(missing).await };
    assert!(all_exposed, "not exposed: {left:?}");
}

/// Below `routing.min_confidence` a message goes to the review topic, still
/// carrying its predicted label; at or above, to its label's topic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn low_confidence_goes_to_review() {
    let broker = Broker::start().await;
    let topics = Topics::new("review");
    broker.create_topics(&topics, 1).await;
    let expected = expected_predictions(TEXTS);
    // A threshold between two distinct scores, far from both, so both sides are exercised.
    let mut scores: Vec<f32> = expected.iter().map(|p| p.score).collect();
    scores.sort_by(f32::total_cmp);
    let (gap, at) =
        scores
            .windows(2)
            .enumerate()
            .map(|(i, w)| (w[1] - w[0], i))
            .fold((0.0, 0), |a, b| if b.0 > a.0 { b } else { a });
    assert!(gap > 1e-4, "the test model gives every text the same score: {scores:?}");
    let threshold = (scores[at] + scores[at + 1]) / 2.0;

    let dir = tempfile::tempdir().unwrap();
    let group = unique("g-review");
    let config = write_config(dir.path(), &broker.addr, &group, &topics, "");
    let threshold_env = threshold.to_string();
    let worker = WorkerProc::start(&config, &[("TRIAGEM__ROUTING__MIN_CONFIDENCE", threshold_env.as_str())]);

    let p = producer(&broker.addr);
    for (i, text) in TEXTS.iter().enumerate() {
        produce(&p, &topics.input, &format!("k-{i}"), json!({"text": text, "id": i}).to_string().as_bytes(), &[]).await;
    }
    let outs = read_outputs(&broker.addr, &topics.outputs(), LIMIT, |o| o.len() >= TEXTS.len()).await;
    assert_eq!(outs.len(), TEXTS.len());
    let mut reviewed = 0;
    for out in &outs {
        let id = out.json()["id"].as_u64().unwrap() as usize;
        let want = &expected[id];
        assert_eq!(out.headers["triagem-label"], want.label);
        assert_eq!(out.headers["triagem-source-topic"], topics.input);
        assert!(out.headers["triagem-source-partition"].parse::<i32>().is_ok_and(|p| p < 2), "{:?}", out.headers);
        assert!(out.headers["triagem-source-offset"].parse::<i64>().is_ok(), "{:?}", out.headers);
        if want.score < threshold {
            assert_eq!(out.topic, topics.review, "id {id} score {} < {threshold}", want.score);
            reviewed += 1;
        } else {
            assert_eq!(out.topic, topics.for_label(&want.label), "id {id} score {} >= {threshold}", want.score);
        }
    }
    assert!(reviewed > 0 && reviewed < TEXTS.len());
    let (_, page) = http_get(&worker.metrics_url(Duration::from_secs(5)).await).await;
    let counted: f64 = ["venda", "suporte"]
        .iter()
        .map(|l| sample(&page, &format!("triagem_messages_review_total{{label=\"{l}\"}}")))
        .sum();
    assert_eq!(counted, reviewed as f64);
}

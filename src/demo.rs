//! `triagem demo`: a first look on a machine with no Kafka. Starts librdkafka's
//! mock cluster (an IN-MEMORY Kafka-protocol broker inside this process, for
//! trials only: nothing is persisted), the worker against it, and a producer
//! that sends the test set plus a few poison messages; then prints how many
//! messages each topic received, a few routed messages and the metrics URL.
//! Trains the default model first when there is none.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use serde_json::Value;

use crate::config::Config;
use crate::model;
use crate::train::{self, TrainError, TrainOptions};
use crate::worker::{self, Shutdown, Worker, WorkerError};

/// What `triagem demo` takes.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Model directory; trained with the `triagem train` defaults when missing.
    pub model: PathBuf,
    /// JSONL file whose lines are sent as input messages.
    pub data: PathBuf,
    /// Address of the metrics endpoint.
    pub metrics_listen: String,
    /// How many routed messages to print.
    pub show: usize,
    /// Keep serving (metrics included) until Ctrl-C after the summary.
    pub wait: bool,
}

/// Why the demo stopped.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("{path}: {reason}")]
    Data { path: PathBuf, reason: String },
    #[error("training the default model: {0}")]
    Train(#[from] TrainError),
    #[error("{0}")]
    Model(#[from] model::ModelError),
    #[error(transparent)]
    Worker(#[from] WorkerError),
    #[error("in-memory broker: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("cannot start the async runtime: {0}")]
    Runtime(std::io::Error),
    #[error("only {got} of {sent} messages came out within {secs}s")]
    Incomplete { got: usize, sent: usize, secs: u64 },
}

/// Runs the demo.
pub fn run(opts: DemoOptions) -> Result<(), DemoError> {
    let lines = read_lines(&opts.data)?;
    ensure_model(&opts.model)?;

    println!("triagem demo: starting an IN-MEMORY Kafka-protocol broker (librdkafka's mock cluster).");
    println!("              It lives inside this process, keeps nothing, and is for trials only.");
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().map_err(DemoError::Runtime)?;
    let mock = MockCluster::new(1)?;
    let brokers = mock.bootstrap_servers();
    let mut cfg = Config::default();
    cfg.kafka.brokers = brokers.clone();
    cfg.kafka.group_id = "triagem-demo".into();
    cfg.input.text_field = "prompt".into();
    cfg.metrics.listen = opts.metrics_listen.clone();
    cfg.model.path = opts.model.clone();
    mock.create_topic(&cfg.kafka.input_topic, 3, 1)?;
    for topic in cfg.output_topics() {
        mock.create_topic(&topic, 1, 1)?;
    }
    let classifier = worker::load_model(&cfg)?;

    let result = runtime.block_on(async move {
        let (trigger, shutdown) = Shutdown::new();
        let worker = Worker::start(cfg.clone(), classifier, shutdown.clone()).await?;
        let metrics_url = format!("http://{}/metrics", worker.metrics_addr);

        let producer: FutureProducer = ClientConfig::new().set("bootstrap.servers", &brokers).create()?;
        let mut payloads: Vec<Vec<u8>> = lines.iter().map(|l| l.as_bytes().to_vec()).collect();
        payloads.push(b"{\"prompt\": \"oi, tudo bem?\"".to_vec()); // invalid JSON
        payloads.push(br#"{"mensagem": "campo errado"}"#.to_vec()); // missing text
        payloads.push(br#"{"prompt": ""}"#.to_vec()); // empty text
        let sent = payloads.len();
        println!(
            "sending {sent} messages ({} from {}, 3 poison) to {}",
            lines.len(),
            opts.data.display(),
            cfg.kafka.input_topic
        );
        for (i, p) in payloads.iter().enumerate() {
            let key = format!("demo-{i}");
            producer
                .send(FutureRecord::to(&cfg.kafka.input_topic).key(&key).payload(p), Timeout::Never)
                .await
                .map_err(|(e, _)| e)?;
        }

        let reader: StreamConsumer = ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .set("group.id", "triagem-demo-reader")
            .set("auto.offset.reset", "earliest")
            .create()?;
        let topics = cfg.output_topics();
        reader.subscribe(&topics.iter().map(String::as_str).collect::<Vec<_>>())?;
        let mut counts: BTreeMap<String, usize> = topics.iter().map(|t| (t.clone(), 0)).collect();
        let mut shown = Vec::new();
        let (mut agree, mut labelled) = (0usize, 0usize);
        let limit = Duration::from_secs(180);
        let started = Instant::now();
        let mut got = 0;
        while got < sent {
            let Some(left) = limit.checked_sub(started.elapsed()) else {
                break;
            };
            let Ok(m) = tokio::time::timeout(left, reader.recv()).await else {
                break;
            };
            let m = m?;
            got += 1;
            *counts.entry(m.topic().to_string()).or_default() += 1;
            let Some(v) = m.payload().and_then(|p| serde_json::from_slice::<Value>(p).ok()) else {
                continue;
            };
            if let (Some(label), Some(expected)) = (v["triagem"]["label"].as_str(), v["completion"].as_str()) {
                labelled += 1;
                agree += (label == expected) as usize;
            }
            if shown.len() < opts.show && v.get("triagem").is_some() {
                shown.push(format!(
                    "  {:<22} {:<8} {:.3}  {}",
                    m.topic(),
                    v["triagem"]["label"].as_str().unwrap_or("?"),
                    v["triagem"]["score"].as_f64().unwrap_or(0.0),
                    v["prompt"].as_str().unwrap_or("")
                ));
            }
        }
        println!("\nrouted messages per topic:");
        for (topic, n) in &counts {
            println!("  {topic:<22} {n}");
        }
        println!("\na few routed messages (topic, label, score, text):");
        for line in &shown {
            println!("{line}");
        }
        if labelled > 0 {
            println!("\nthe model agrees with the file's label on {agree} of {labelled} messages");
        }
        println!("\nmetrics: {metrics_url}  (also /healthz and /readyz)");
        let complete = got == sent;
        if opts.wait && complete {
            println!("serving until Ctrl-C; try: curl -s {metrics_url} | grep ^triagem_messages");
            let _ = tokio::signal::ctrl_c().await;
        }
        trigger.trigger();
        worker.run(shutdown).await?;
        // Close the clients while the broker is still up: closing against a gone broker blocks.
        drop(reader);
        drop(producer);
        if complete {
            Ok(())
        } else {
            Err(DemoError::Incomplete { got, sent, secs: limit.as_secs() })
        }
    });
    drop(runtime);
    drop(mock);
    result
}

fn read_lines(path: &Path) -> Result<Vec<String>, DemoError> {
    let text =
        std::fs::read_to_string(path).map_err(|e| DemoError::Data { path: path.into(), reason: e.to_string() })?;
    let lines: Vec<String> = text.lines().filter(|l| !l.trim().is_empty()).map(str::to_string).collect();
    if lines.is_empty() {
        return Err(DemoError::Data { path: path.into(), reason: "no messages in it".into() });
    }
    Ok(lines)
}

/// Whether `dir` holds a model (else the demo trains one there first).
pub fn has_model(dir: &Path) -> bool {
    dir.join(model::CONFIG_FILE).is_file() && dir.join(model::WEIGHTS_FILE).is_file()
}

/// Trains `dir` with the `triagem train` defaults when it holds no model.
fn ensure_model(dir: &Path) -> Result<(), DemoError> {
    if has_model(dir) {
        return Ok(());
    }
    println!(
        "no model in {}: training one with the `triagem train` defaults (about 10 minutes on 2 cores)",
        dir.display()
    );
    let summary = train::train(&TrainOptions { out: dir.to_path_buf(), ..TrainOptions::default() })?;
    match &summary.test {
        Some(t) => println!(
            "trained {} (test accuracy {:.3}, macro-F1 {:.3})",
            summary.model_dir.display(),
            t.accuracy,
            t.macro_f1
        ),
        None => println!("trained {}", summary.model_dir.display()),
    }
    Ok(())
}

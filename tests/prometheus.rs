//! The operating parts run for real: a Prometheus server (Debian's
//! `prometheus`, the package that also brings `promtool`) loads
//! `deploy/prometheus`'s alert rules and scrapes a live worker, which routes
//! a stream with poison in it through the test broker. Then, through
//! Prometheus's HTTP API:
//!
//! - `TriagemDeadLetterRate` goes to firing. The rule is the shipped one,
//!   expression, labels and annotations unchanged; only its `for:` is cut from
//!   10 minutes to 2 seconds so that the test does not wait ten minutes (the
//!   `promtool test rules` unit tests in tests/deploy.rs check the `for:` timing);
//! - every query of the Grafana dashboard returns data, with Grafana's
//!   variables as Grafana would fill them for this job.

mod worker_common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};
use serde_json::{json, Value};
use worker_common::*;

#[path = "common/deploy_names.rs"]
mod deploy_names;

const LIMIT: Duration = Duration::from_secs(90);

/// A `prometheus` server on a free port, killed on drop.
struct Prometheus {
    child: Child,
    url: String,
    log: PathBuf,
}

impl Prometheus {
    /// Starts Prometheus with `config` (a file in `dir`, which also holds its data).
    async fn start(dir: &Path, config: &Path) -> Prometheus {
        let port = free_port();
        let log = dir.join("prometheus.log");
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot run prometheus ({e}): scripts/install-promtool.sh installs Debian's prometheus package")
            });
        let server = Prometheus { child, url: format!("http://127.0.0.1:{port}"), log };
        let ready_url = server.api("/-/ready");
        let ready = eventually(Duration::from_secs(30), move || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() && http_get_blocking(&ready_url).0 == 200
        })
        .await;
        assert!(ready, "prometheus did not become ready:\n{}", server.log_text());
        server
    }

    fn api(&self, path: &str) -> String {
        format!("{}{path}", self.url)
    }

    /// `GET /api/v1/…`, its `data` when the status is success.
    async fn get(&self, path: &str) -> Value {
        let (status, body) = http_get(&self.api(path)).await;
        let v: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body}"));
        assert!(status == 200 && v["status"] == "success", "{path}: {status} {body}");
        v["data"].clone()
    }

    /// The result of an instant query.
    async fn query(&self, promql: &str) -> Vec<Value> {
        let q = utf8_percent_encode(promql, NON_ALPHANUMERIC);
        self.get(&format!("/api/v1/query?query={q}")).await["result"].as_array().cloned().unwrap_or_default()
    }

    /// The state of alert `name` (`pending`, `firing`), if it is active.
    async fn alert_state(&self, name: &str) -> Option<String> {
        let alerts = self.get("/api/v1/alerts").await["alerts"].as_array().cloned().unwrap_or_default();
        alerts.iter().find(|a| a["labels"]["alertname"] == name).map(|a| a["state"].as_str().unwrap().to_string())
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("---- prometheus log ----\n{}", self.log_text());
        }
    }
}

/// The shipped rule file with `alert`'s `for:` set to `for_`.
fn rules_with_short_for(alert: &str, for_: &str) -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(root.join(deploy_names::RULES)).unwrap();
    let mut rules: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
    let mut found = false;
    for group in rules["groups"].as_sequence_mut().unwrap() {
        for rule in group["rules"].as_sequence_mut().unwrap() {
            if rule["alert"].as_str() == Some(alert) {
                rule["for"] = serde_yaml::Value::String(for_.into());
                found = true;
            }
        }
    }
    assert!(found, "{alert} is not in {}", deploy_names::RULES);
    serde_yaml::to_string(&rules).unwrap()
}

/// A dashboard query as Grafana sends it for one job, all instances.
fn grafana_query(expr: &str) -> String {
    expr.replace("$__rate_interval", "1m").replace("$job", "triagem").replace("$instance", ".+")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_fires_the_dead_letter_alert_and_every_dashboard_query_has_data() {
    let broker = Broker::start().await;
    let topics = Topics::new("prom");
    broker.create_topics(&topics, 2).await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &broker.addr, &unique("g-prom"), &topics, "");
    let worker = WorkerProc::start(&config, &[]);
    let metrics_url = worker.metrics_url(LIMIT).await;
    let target = metrics_url.trim_start_matches("http://").trim_end_matches("/metrics").to_string();

    let alert = "TriagemDeadLetterRate";
    std::fs::write(dir.path().join("rules.yml"), rules_with_short_for(alert, "2s")).unwrap();
    let prometheus_yml = json!({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": ["rules.yml"],
        "scrape_configs": [{
            "job_name": "triagem",
            "metrics_path": "/metrics",
            "static_configs": [{"targets": [target]}],
        }],
    });
    let config_path = dir.path().join("prometheus.yml");
    std::fs::write(&config_path, serde_yaml::to_string(&prometheus_yml).unwrap()).unwrap();
    let prometheus = Prometheus::start(dir.path(), &config_path).await;

    // The target must be up before anything flows: rate() needs samples from before the poison.
    let scraped = tokio::task::spawn_blocking({
        let url = prometheus.url.clone();
        move || {
            eventually_blocking(LIMIT, || {
                let (_, body) = http_get_blocking(&format!("{url}/api/v1/query?query=up%3D%3D1"));
                body.contains("\"result\":[{")
            })
        }
    })
    .await
    .unwrap();
    assert!(scraped, "prometheus never scraped the worker at {target}:\n{}", prometheus.log_text());
    assert_eq!(prometheus.alert_state(alert).await, None, "{alert} is active before any poison");

    // 10 % poison, sent in rounds so that rates have samples on both sides.
    let p = producer(&broker.addr);
    let deadline = Instant::now() + LIMIT;
    let mut sent = 0;
    let mut state = None;
    while Instant::now() < deadline {
        for i in 0..20 {
            let n = sent + i;
            let value = if n % 10 == 0 {
                b"{\"text\": \"cut short".to_vec()
            } else {
                json!({"text": TEXTS[n % TEXTS.len()], "id": n}).to_string().into_bytes()
            };
            produce(&p, &topics.input, &format!("k-{n}"), &value, &[]).await;
        }
        sent += 20;
        tokio::time::sleep(Duration::from_millis(500)).await;
        state = prometheus.alert_state(alert).await;
        if state.as_deref() == Some("firing") && sent >= 200 {
            break;
        }
    }
    assert_eq!(state.as_deref(), Some("firing"), "{alert} after {sent} messages, 10 % poison");

    // Every dashboard query returns data (checked after a few more scrapes).
    tokio::time::sleep(Duration::from_secs(3)).await;
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(deploy_names::DASHBOARD)).unwrap(),
    )
    .unwrap();
    let exprs = deploy_names::dashboard_exprs(&dashboard);
    let mut empty: Vec<&String> = Vec::new();
    for e in exprs.iter().filter(|e| !e.trim().is_empty()) {
        if prometheus.query(&grafana_query(e)).await.is_empty() {
            empty.push(e);
        }
    }
    assert!(empty.is_empty(), "{} of {} dashboard queries return no data: {empty:#?}", empty.len(), exprs.len());
    println!("{alert} fired after {sent} messages; all {} dashboard queries returned data", exprs.len());
}

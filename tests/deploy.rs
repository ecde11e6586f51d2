//! The deployment files under `deploy/`, checked offline: the Grafana
//! dashboard against Grafana's schema essentials, every metric name the
//! dashboard and the alert rules use against `docs/metrics.md`, the
//! Kubernetes manifests' fields that matter, the Compose stack's wiring, the
//! Dockerfiles' build steps, and the alert rules with `promtool check rules`
//! and `promtool test rules` (install it with `scripts/install-promtool.sh`).
//!
//! Nothing here needs a container engine, a cluster or a running Grafana.

#[path = "common/deploy_names.rs"]
mod deploy_names;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use deploy_names::{
    dashboard_exprs, documented_base, documented_metrics, promql_metric_names, referenced_metric_names, DASHBOARD,
    METRICS_DOC, PROMETHEUS_SERIES, RULES,
};
use serde_json::Value as Json;
use serde_yaml::Value as Yaml;

const RULES_TEST: &str = "deploy/prometheus/rules/triagem.rules.test.yml";
const PROMETHEUS_CONFIG: &str = "deploy/prometheus/prometheus.yml";
const K8S: &str = "deploy/k8s";
/// Partitions of the input topic: the most consumers a group can keep busy.
const INPUT_PARTITIONS: u64 = 6;
/// The alerts the operators were promised (issue 4).
const ALERTS: &[&str] = &[
    "TriagemConsumerLagGrowing",
    "TriagemStalled",
    "TriagemDeadLetterRate",
    "TriagemHighLatency",
    "TriagemDown",
    "TriagemNotReady",
    "TriagemIdleWhileGroupLags",
    "TriagemOutputTopicUnavailable",
];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("cannot read {rel}: {e}"))
}

fn dashboard() -> Json {
    serde_json::from_str(&read(DASHBOARD)).unwrap_or_else(|e| panic!("{DASHBOARD} is not JSON: {e}"))
}

fn yaml(rel: &str) -> Yaml {
    serde_yaml::from_str(&read(rel)).unwrap_or_else(|e| panic!("{rel} is not YAML: {e}"))
}

/// Every document of a multi-document YAML file.
fn yaml_docs(rel: &str) -> Vec<Yaml> {
    let text = read(rel);
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).unwrap_or_else(|e| panic!("{rel} is not YAML: {e}")))
        .filter(|d: &Yaml| !d.is_null())
        .collect()
}

fn one_doc(rel: &str, kind: &str) -> Yaml {
    let docs: Vec<Yaml> = yaml_docs(rel).into_iter().filter(|d| d["kind"] == kind).collect();
    assert_eq!(docs.len(), 1, "{rel}: expected one {kind}");
    docs.into_iter().next().unwrap()
}

fn s<'a>(v: &'a Yaml, what: &str) -> &'a str {
    v.as_str().unwrap_or_else(|| panic!("{what}: expected a string, found {v:?}"))
}

/// The `section.key = value` pairs of a flat TOML document (tables and
/// quoted keys are enough for the worker's settings). Values keep their TOML
/// spelling, strings unquoted.
fn toml_keys(text: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut section = String::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.trim().to_string();
            continue;
        }
        if let Some((k, v)) = line.split_once('=') {
            let key = k.trim().trim_matches('"');
            let value = v.split(" #").next().unwrap().trim().trim_matches('"');
            out.insert(format!("{section}.{key}"), value.to_string());
        }
    }
    out
}

/// The worker's TOML as deployed on Kubernetes.
fn configmap_toml() -> BTreeMap<String, String> {
    let cm = one_doc(&format!("{K8S}/configmap.yaml"), "ConfigMap");
    toml_keys(s(&cm["data"]["triagem.toml"], "configmap data triagem.toml"))
}

// ------------------------------------------------------------ the metric names

#[test]
fn promql_names_are_read_correctly() {
    let names = |e: &str| promql_metric_names(e).into_iter().collect::<Vec<_>>();
    assert_eq!(
        names(r#"histogram_quantile(0.95, sum by (le) (rate(a_bucket{job="$job", le=~"0.5|1"}[$__rate_interval])))"#),
        ["a_bucket"]
    );
    assert_eq!(
        names("sum by (reason) (rate(dlq_total[10m])) / on () group_left () sum(rate(consumed_total[10m])) > 1e-2"),
        ["consumed_total", "dlq_total"]
    );
    assert_eq!(names("up{job=\"x\"} == 0 or absent(up{job=\"x\"})"), ["up"]);
    assert_eq!(names("(sum(rate(r[5m])) or vector(0)) == 0 and on() lag offset 5m > bool 0"), ["lag", "r"]);
    assert_eq!(names("time() - start_seconds{instance=~\"${instance:regex}\"}"), ["start_seconds"]);
    assert_eq!(names("sum(x) without (instance, pod)"), ["x"]);
    assert_eq!(names("max without (pod) (y) + count by(a)(z) + sum"), ["sum", "y", "z"], "a bare `sum` is a metric");
    assert_eq!(names(r#"{__name__="by_matcher", job="x"}"#), ["by_matcher"]);
    assert!(std::panic::catch_unwind(|| promql_metric_names("sum(rate(x[5m])")).is_err(), "unbalanced: not PromQL");
    let dash = serde_json::json!({
        "panels": [{"targets": [{"expr": "a"}]}, {"type": "row", "panels": [{"targets": [{"expr": "b"}]}]}],
        "templating": {"list": [
            {"type": "query", "query": {"query": "label_values(c{job=\"$job\"}, instance)"}},
            {"type": "query", "query": "label_values(job)"},
            {"type": "datasource", "query": "prometheus"}
        ]}
    });
    let all: BTreeSet<String> = dashboard_exprs(&dash).iter().flat_map(|e| promql_metric_names(e)).collect();
    assert_eq!(all.into_iter().collect::<Vec<_>>(), ["a", "b", "c"]);
    let doc = documented_metrics(
        "| name | type |\n|---|---|\n| `triagem_h` | histogram | x |\n| `triagem_c_total`, `triagem_d` | counter |\n",
    );
    assert_eq!(documented_base("triagem_h_bucket", &doc), Some("triagem_h"));
    assert_eq!(documented_base("triagem_c_total", &doc), Some("triagem_c_total"));
    assert_eq!(documented_base("triagem_d", &doc), Some("triagem_d"));
    assert_eq!(documented_base("triagem_c_total_count", &doc), None, "only histograms have _count series");
    assert_eq!(
        deploy_names::exposed_metric_names("# TYPE a counter\na_total{x=\"1\"} 3\nh_bucket{le=\"+Inf\"} 1\nup 1\n"),
        ["a_total", "h_bucket", "up"].into_iter().map(String::from).collect()
    );
}

#[test]
fn every_metric_in_the_dashboard_and_rules_is_documented() {
    let documented = documented_metrics(&read(METRICS_DOC));
    assert!(documented.len() >= 15, "{METRICS_DOC}: the metrics table was not found ({documented:?})");
    let referenced = referenced_metric_names(&root());
    let mut undocumented = Vec::new();
    for (name, used_in) in &referenced {
        if PROMETHEUS_SERIES.contains(&name.as_str()) {
            continue;
        }
        if documented_base(name, &documented).is_none() {
            undocumented.push(format!("{name} (used in {})", used_in.iter().cloned().collect::<Vec<_>>().join(", ")));
        }
    }
    assert!(undocumented.is_empty(), "metrics not documented in {METRICS_DOC}:\n  {}", undocumented.join("\n  "));
    // The rule unit tests feed series by name too: a renamed metric must not hide there.
    let tests = yaml(RULES_TEST);
    for t in tests["tests"].as_sequence().unwrap() {
        for series in t["input_series"].as_sequence().into_iter().flatten() {
            let name = s(&series["series"], "input series").split('{').next().unwrap().trim();
            assert!(
                PROMETHEUS_SERIES.contains(&name) || documented_base(name, &documented).is_some(),
                "{RULES_TEST}: input series {name} is not documented in {METRICS_DOC}"
            );
        }
    }
}

#[test]
fn dashboard_shows_every_view_operators_need() {
    let referenced = referenced_metric_names(&root());
    let in_dashboard = |name: &str| referenced.get(name).is_some_and(|w| w.contains(DASHBOARD));
    for name in [
        "triagem_messages_classified_total",
        "triagem_messages_routed_total",
        "triagem_messages_consumed_total",
        "triagem_messages_review_total",
        "triagem_prediction_score_bucket",
        "triagem_messages_dead_lettered_total",
        "triagem_end_to_end_latency_seconds_bucket",
        "triagem_worker_latency_seconds_bucket",
        "triagem_worker_stage_seconds_bucket",
        "triagem_inference_seconds_bucket",
        "triagem_batch_size_bucket",
        "triagem_queue_depth",
        "triagem_consumer_lag",
        "triagem_model_info",
        "triagem_process_cpu_seconds_total",
        "triagem_process_resident_memory_bytes",
        "triagem_ready",
        "triagem_oldest_unacked_seconds",
        "triagem_consumer_paused",
        "triagem_stalled",
        "triagem_output_topic_unavailable",
        "triagem_outputs_rejected_total",
        "triagem_outputs_abandoned_total",
        "triagem_in_flight_bytes",
        "up",
    ] {
        assert!(in_dashboard(name), "{DASHBOARD} does not chart {name}");
    }
    let exprs = dashboard_exprs(&dashboard());
    for q in ["0.5", "0.95", "0.99"] {
        let want = format!("histogram_quantile({q}, sum by (le) (rate(triagem_end_to_end_latency_seconds_bucket");
        assert!(exprs.iter().any(|e| e.contains(&want)), "{DASHBOARD}: no end-to-end latency quantile {q}");
    }
    for (label, metric) in [
        ("label", "triagem_messages_classified_total"),
        ("label", "triagem_prediction_score_bucket"),
        ("label", "triagem_messages_review_total"),
        ("topic", "triagem_messages_routed_total"),
        ("reason", "triagem_messages_dead_lettered_total"),
        ("partition", "triagem_consumer_lag"),
    ] {
        assert!(
            exprs.iter().any(|e| e.contains(metric) && e.contains(&format!("by ({label}"))
                || e.contains(metric) && e.contains(&format!(", {label})"))),
            "{DASHBOARD}: {metric} is not broken down by {label}"
        );
    }
}

// ------------------------------------------------------------- the dashboard

#[test]
fn dashboard_follows_grafanas_schema() {
    let d = dashboard();
    let uid = d["uid"].as_str().expect("uid");
    assert!(!uid.is_empty() && uid.len() <= 40, "uid must be 1..=40 characters: {uid:?}");
    assert!(d["title"].as_str().is_some_and(|t| !t.is_empty()), "title");
    let schema = d["schemaVersion"].as_u64().expect("schemaVersion");
    assert!((36..=41).contains(&schema), "schemaVersion {schema}: expected a current one (~39)");
    assert!(d["id"].is_null(), "a provisioned dashboard must not carry a database id");

    let vars = d["templating"]["list"].as_array().expect("templating.list");
    let ds = vars.iter().find(|v| v["name"] == "datasource").expect("a `datasource` variable");
    assert_eq!(ds["type"], "datasource");
    assert_eq!(ds["query"], "prometheus");
    for v in vars.iter().filter(|v| v["type"] == "query") {
        assert_eq!(v["datasource"]["uid"], "${datasource}", "variable {} must query ${{datasource}}", v["name"]);
    }

    let panels = d["panels"].as_array().expect("panels");
    assert!(panels.len() >= 10, "only {} panels", panels.len());
    let mut ids = BTreeSet::new();
    let mut cells: BTreeMap<(u64, u64), String> = BTreeMap::new();
    for p in panels {
        let title = p["title"].as_str().unwrap_or_default();
        assert!(!title.is_empty(), "a panel has no title: {p}");
        assert!(p["type"].is_string(), "{title}: type");
        assert_ne!(p["type"], "row", "{title}: rows carry no query; the dashboard has none");
        assert!(ids.insert(p["id"].as_u64().expect("panel id")), "{title}: duplicate panel id");
        assert_eq!(p["datasource"]["type"], "prometheus", "{title}: datasource type");
        assert_eq!(p["datasource"]["uid"], "${datasource}", "{title}: datasource must be ${{datasource}}");

        let g = &p["gridPos"];
        let (x, y, w, h) = (g["x"].as_u64(), g["y"].as_u64(), g["w"].as_u64(), g["h"].as_u64());
        let (Some(x), Some(y), Some(w), Some(h)) = (x, y, w, h) else {
            panic!("{title}: gridPos needs x, y, w, h: {g}")
        };
        assert!(w >= 1 && h >= 1 && x + w <= 24, "{title}: gridPos {g} does not fit the 24-column grid");
        for cx in x..x + w {
            for cy in y..y + h {
                if let Some(other) = cells.insert((cx, cy), title.to_string()) {
                    panic!("panels {other:?} and {title:?} overlap at x={cx} y={cy}");
                }
            }
        }

        let targets = p["targets"].as_array().unwrap_or_else(|| panic!("{title}: targets"));
        assert!(!targets.is_empty(), "{title}: no targets");
        let mut refs = BTreeSet::new();
        for t in targets {
            let expr = t["expr"].as_str().unwrap_or_default();
            assert!(!expr.trim().is_empty(), "{title}: a target without expr");
            assert!(refs.insert(t["refId"].as_str().expect("refId")), "{title}: duplicate refId");
            assert_eq!(t["datasource"]["uid"], "${datasource}", "{title}: target datasource");
            assert!(!promql_metric_names(expr).is_empty(), "{title}: {expr} queries no metric");
            assert_eq!(
                expr.matches('(').count(),
                expr.matches(')').count(),
                "{title}: unbalanced parentheses in {expr}"
            );
            if expr.contains("triagem_") {
                assert!(expr.contains("job=\"$job\""), "{title}: {expr} ignores the job variable");
            }
        }
    }
}

#[test]
fn grafana_provisioning_points_at_the_dashboard() {
    let ds = yaml("deploy/grafana/provisioning/datasources/prometheus.yaml");
    let prom = &ds["datasources"][0];
    assert_eq!(prom["type"], "prometheus");
    assert_eq!(prom["url"], "http://prometheus:9090", "the compose service name and port");
    let providers = yaml("deploy/grafana/provisioning/dashboards/triagem.yaml");
    let path = s(&providers["providers"][0]["options"]["path"], "provider path");
    let compose = yaml("deploy/compose.yaml");
    let mounts: Vec<&str> =
        compose["services"]["grafana"]["volumes"].as_sequence().unwrap().iter().map(|v| s(v, "volume")).collect();
    assert!(
        mounts.contains(&format!("./grafana/dashboards:{path}:ro").as_str()),
        "Grafana's dashboard provider reads {path}, but compose mounts {mounts:?}"
    );
    assert!(mounts.contains(&"./grafana/provisioning:/etc/grafana/provisioning:ro"));
}

// --------------------------------------------------------------- alert rules

#[test]
fn every_alert_has_severity_summary_description_and_runbook() {
    let rules = yaml(RULES);
    let mut seen = BTreeSet::new();
    for group in rules["groups"].as_sequence().unwrap() {
        for rule in group["rules"].as_sequence().unwrap() {
            let Some(name) = rule["alert"].as_str() else {
                continue;
            };
            seen.insert(name.to_string());
            let severity = s(&rule["labels"]["severity"], &format!("{name}: labels.severity"));
            assert!(["critical", "warning", "info"].contains(&severity), "{name}: severity {severity}");
            for key in ["summary", "description", "runbook"] {
                assert!(
                    rule["annotations"][key].as_str().is_some_and(|a| !a.trim().is_empty()),
                    "{name}: annotation {key} missing"
                );
            }
            assert!(rule["for"].is_string(), "{name}: no `for`: one bad scrape would page");
            let expr = s(&rule["expr"], name);
            for metric in promql_metric_names(expr) {
                assert!(
                    expr.contains(&format!("{metric}{{job=\"triagem\"")),
                    "{name}: {metric} without job=\"triagem\""
                );
            }
        }
    }
    let missing: Vec<_> = ALERTS.iter().filter(|a| !seen.contains(**a)).collect();
    assert!(missing.is_empty(), "{RULES}: alerts missing: {missing:?}");
}

#[test]
fn every_alert_is_unit_tested_firing_and_not_firing() {
    let tests = yaml(RULES_TEST);
    let mut firing = BTreeSet::new();
    let mut quiet = BTreeSet::new();
    for t in tests["tests"].as_sequence().unwrap() {
        for case in t["alert_rule_test"].as_sequence().into_iter().flatten() {
            let name = s(&case["alertname"], "alertname").to_string();
            if case["exp_alerts"].as_sequence().is_some_and(|a| a.is_empty()) {
                quiet.insert(name);
            } else {
                firing.insert(name);
            }
        }
    }
    for alert in ALERTS {
        assert!(firing.contains(*alert), "{RULES_TEST}: no case where {alert} fires");
        assert!(quiet.contains(*alert), "{RULES_TEST}: no case where {alert} stays quiet");
    }
}

/// `promtool`, or a failure that says how to get it.
fn promtool() -> Command {
    let found = Command::new("promtool").arg("--version").output().is_ok_and(|o| o.status.success());
    assert!(
        found,
        "promtool is not installed, so the alert rules cannot be checked. Run scripts/install-promtool.sh \
         (it installs Debian's `prometheus` package, which ships promtool), then rerun `cargo test --test deploy`."
    );
    let mut cmd = Command::new("promtool");
    cmd.current_dir(root());
    cmd
}

fn run_ok(mut cmd: Command, what: &str) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn promtool_checks_the_rules_and_the_scrape_config() {
    let mut check = promtool();
    check.args(["check", "rules", RULES]);
    run_ok(check, &format!("promtool check rules {RULES}"));
    let mut config = promtool();
    config.args(["check", "config", PROMETHEUS_CONFIG]);
    run_ok(config, &format!("promtool check config {PROMETHEUS_CONFIG}"));
}

#[test]
fn promtool_rule_unit_tests_pass() {
    let mut test = promtool();
    test.args(["test", "rules", RULES_TEST]);
    run_ok(test, &format!("promtool test rules {RULES_TEST}"));
}

#[test]
fn prometheus_scrapes_the_worker_as_job_triagem() {
    let p = yaml(PROMETHEUS_CONFIG);
    let jobs = p["scrape_configs"].as_sequence().unwrap();
    let job = jobs.iter().find(|j| j["job_name"] == "triagem").expect("a scrape job named triagem");
    let dns = &job["dns_sd_configs"][0];
    assert_eq!(dns["port"].as_u64(), Some(9095));
    assert_eq!(dns["names"][0], "worker", "the compose service name");
    let rule_files: Vec<&str> = p["rule_files"].as_sequence().unwrap().iter().map(|r| s(r, "rule file")).collect();
    assert_eq!(rule_files, ["rules/triagem.rules.yml"]);
}

// ---------------------------------------------------------------- Kubernetes

fn container(deploy: &Yaml) -> &Yaml {
    let containers = deploy["spec"]["template"]["spec"]["containers"].as_sequence().expect("containers");
    containers.iter().find(|c| c["name"] == "worker").expect("a container named worker")
}

fn env_of(c: &Yaml) -> BTreeMap<String, Yaml> {
    c["env"].as_sequence().into_iter().flatten().map(|e| (s(&e["name"], "env name").to_string(), e.clone())).collect()
}

/// The parts of deployment.yaml and deployment-gpu.yaml that must be right.
fn check_deployment(rel: &str) -> Yaml {
    let d = one_doc(rel, "Deployment");
    assert!(d["metadata"]["namespace"].is_null(), "{rel}: manifests are namespace-agnostic");
    let pod = &d["spec"]["template"]["spec"];
    let labels = &d["spec"]["template"]["metadata"]["labels"];
    for (k, v) in d["spec"]["selector"]["matchLabels"].as_mapping().unwrap() {
        assert_eq!(&labels[k], v, "{rel}: pod labels must match the selector");
    }
    let c = container(&d);

    let port = c["ports"].as_sequence().unwrap().iter().find(|p| p["name"] == "metrics").expect("port metrics");
    assert_eq!(port["containerPort"].as_u64(), Some(9095), "{rel}: metrics port");
    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz"), ("startupProbe", "/healthz")] {
        let get = &c[probe]["httpGet"];
        assert_eq!(get["path"], path, "{rel}: {probe} path");
        assert!(get["port"] == "metrics" || get["port"].as_u64() == Some(9095), "{rel}: {probe} port");
    }

    for kind in ["requests", "limits"] {
        for res in ["cpu", "memory"] {
            assert!(!c["resources"][kind][res].is_null(), "{rel}: resources.{kind}.{res}");
        }
    }

    let sc = &pod["securityContext"];
    assert_eq!(sc["runAsNonRoot"].as_bool(), Some(true), "{rel}: runAsNonRoot");
    assert!(sc["runAsUser"].as_u64().is_some_and(|u| u > 0), "{rel}: runAsUser");
    assert_eq!(c["securityContext"]["allowPrivilegeEscalation"].as_bool(), Some(false), "{rel}");
    assert_eq!(c["securityContext"]["readOnlyRootFilesystem"].as_bool(), Some(true), "{rel}");

    // Config from the ConfigMap, at the path the args name.
    let args: Vec<&str> = c["args"].as_sequence().unwrap().iter().map(|a| s(a, "arg")).collect();
    assert_eq!(args[0], "worker");
    let config_path = args[args.iter().position(|a| *a == "--config").expect("--config") + 1];
    let vol = pod["volumes"].as_sequence().unwrap().iter().find(|v| v["configMap"]["name"] == "triagem-config");
    let vol = vol.unwrap_or_else(|| panic!("{rel}: no volume from ConfigMap triagem-config"));
    let mount =
        c["volumeMounts"].as_sequence().unwrap().iter().find(|m| m["name"] == vol["name"]).expect("config mount");
    let cm = one_doc(&format!("{K8S}/configmap.yaml"), "ConfigMap");
    let key =
        config_path.strip_prefix(&format!("{}/", s(&mount["mountPath"], "mountPath"))).expect("config under mount");
    assert!(!cm["data"][key].is_null(), "{rel}: --config {config_path} is not a key of the ConfigMap");

    // SASL credentials from the Secret.
    let secret = one_doc(&format!("{K8S}/secret.example.yaml"), "Secret");
    let env = env_of(c);
    for (var, key) in
        [("TRIAGEM__KAFKA__CLIENT__SASL__USERNAME", "username"), ("TRIAGEM__KAFKA__CLIENT__SASL__PASSWORD", "password")]
    {
        let r = &env.get(var).unwrap_or_else(|| panic!("{rel}: env {var}"))["valueFrom"]["secretKeyRef"];
        assert_eq!(r["name"], secret["metadata"]["name"], "{rel}: {var} secret name");
        assert_eq!(r["key"], key, "{rel}: {var} secret key");
        assert!(!secret["stringData"][key].is_null(), "secret.example.yaml lacks {key}");
    }
    for (var, e) in &env {
        assert!(e["value"].is_null() || !var.contains("PASSWORD"), "{rel}: {var} in plain text");
    }

    // The pod is given time to shut down cleanly.
    let grace = pod["terminationGracePeriodSeconds"].as_u64().expect("terminationGracePeriodSeconds");
    let timeout = humantime::parse_duration(&configmap_toml()["shutdown.timeout"]).expect("shutdown.timeout");
    assert!(
        Duration::from_secs(grace) >= timeout + Duration::from_secs(10),
        "{rel}: grace {grace}s leaves < 10 s over shutdown.timeout {timeout:?}"
    );
    d
}

#[test]
fn deployment_has_probes_resources_config_secrets_and_a_clean_shutdown() {
    let d = check_deployment(&format!("{K8S}/deployment.yaml"));
    let c = container(&d);
    assert!(c["resources"]["limits"]["nvidia.com/gpu"].is_null(), "the CPU Deployment must not ask for a GPU");
    assert_eq!(env_of(c)["TRIAGEM__MODEL__DEVICE"]["value"], "cpu");
}

#[test]
fn gpu_deployment_requests_a_gpu_and_runs_cuda() {
    let d = check_deployment(&format!("{K8S}/deployment-gpu.yaml"));
    let cpu = one_doc(&format!("{K8S}/deployment.yaml"), "Deployment");
    assert_eq!(d["metadata"]["name"], cpu["metadata"]["name"], "it replaces the CPU Deployment, KEDA's target");
    let c = container(&d);
    for kind in ["requests", "limits"] {
        assert_eq!(c["resources"][kind]["nvidia.com/gpu"].as_u64(), Some(1), "resources.{kind} nvidia.com/gpu");
    }
    assert_eq!(env_of(c)["TRIAGEM__MODEL__DEVICE"]["value"], "cuda");
    assert!(s(&c["image"], "image").contains("cuda"), "the CUDA image");
}

#[test]
fn keda_scales_on_the_groups_lag_up_to_the_partition_count() {
    let rel = format!("{K8S}/keda-scaledobject.yaml");
    let so = one_doc(&rel, "ScaledObject");
    let d = one_doc(&format!("{K8S}/deployment.yaml"), "Deployment");
    assert_eq!(so["spec"]["scaleTargetRef"]["name"], d["metadata"]["name"]);
    assert_eq!(
        so["spec"]["maxReplicaCount"].as_u64(),
        Some(INPUT_PARTITIONS),
        "one replica per input partition at most"
    );
    assert!(so["spec"]["minReplicaCount"].as_u64().is_some_and(|m| m >= 1), "minReplicaCount >= 1 (TriagemDown)");
    let trigger = &so["spec"]["triggers"][0];
    assert_eq!(trigger["type"], "kafka");
    let m = &trigger["metadata"];
    let lag: u64 = s(&m["lagThreshold"], "lagThreshold").parse().expect("lagThreshold is a number");
    assert!(lag > 0);
    assert_eq!(m["allowIdleConsumers"], "false");
    let cfg = configmap_toml();
    assert_eq!(s(&m["consumerGroup"], "consumerGroup"), cfg["kafka.group_id"], "consumerGroup = kafka.group_id");
    assert_eq!(s(&m["topic"], "topic"), cfg["kafka.input_topic"], "topic = kafka.input_topic");
    assert_eq!(s(&m["bootstrapServers"], "bootstrapServers"), cfg["kafka.brokers"], "bootstrapServers = kafka.brokers");
    let auth = one_doc(&rel, "TriggerAuthentication");
    assert_eq!(trigger["authenticationRef"]["name"], auth["metadata"]["name"]);
    let secret = one_doc(&format!("{K8S}/secret.example.yaml"), "Secret");
    for r in auth["spec"]["secretTargetRef"].as_sequence().unwrap() {
        assert_eq!(r["name"], secret["metadata"]["name"]);
        assert!(!secret["stringData"][s(&r["key"], "key")].is_null(), "secret.example.yaml lacks {:?}", r["key"]);
    }
}

#[test]
fn scraping_service_and_rules_match_the_pods() {
    let d = one_doc(&format!("{K8S}/deployment.yaml"), "Deployment");
    let pod_labels = &d["spec"]["template"]["metadata"]["labels"];
    let svc = one_doc(&format!("{K8S}/service.yaml"), "Service");
    for (k, v) in svc["spec"]["selector"].as_mapping().unwrap() {
        assert_eq!(&pod_labels[k], v, "service selector");
    }
    assert_eq!(svc["spec"]["ports"][0]["port"].as_u64(), Some(9095));
    let pm = one_doc(&format!("{K8S}/podmonitor.yaml"), "PodMonitor");
    for (k, v) in pm["spec"]["selector"]["matchLabels"].as_mapping().unwrap() {
        assert_eq!(&pod_labels[k], v, "PodMonitor selector");
    }
    let ep = &pm["spec"]["podMetricsEndpoints"][0];
    assert_eq!(ep["port"], "metrics");
    assert_eq!(ep["path"], "/metrics");
    // job="triagem", as the rules and the dashboard expect.
    let job_label = s(&pm["spec"]["jobLabel"], "jobLabel");
    assert_eq!(pod_labels[job_label], "triagem");
    // The PrometheusRule is the rules file, word for word.
    let pr = one_doc(&format!("{K8S}/prometheusrule.yaml"), "PrometheusRule");
    assert_eq!(pr["spec"]["groups"], yaml(RULES)["groups"], "prometheusrule.yaml has drifted from {RULES}");
}

/// The worker's settings read by the worker's own loader, from `toml` and `env`.
fn load_worker_config(
    toml: &str,
    env: &[(String, String)],
) -> Result<triagem::config::Config, triagem::config::ConfigError> {
    let file = tempfile::Builder::new().suffix(".toml").tempfile().expect("temp file");
    std::fs::write(file.path(), toml).expect("write temp config");
    triagem::config::Config::load_with_env(Some(file.path()), env.to_vec())
}

/// The plain-value `TRIAGEM__…` variables a Deployment sets (secret references get a stand-in value).
fn deployment_env(rel: &str, with_secrets: bool) -> Vec<(String, String)> {
    let d = one_doc(&format!("{K8S}/{rel}"), "Deployment");
    env_of(container(&d))
        .into_iter()
        .filter(|(k, _)| k.starts_with("TRIAGEM__"))
        .filter_map(|(k, e)| match e["value"].as_str() {
            Some(v) => Some((k, v.to_string())),
            None if with_secrets => Some((k.clone(), format!("secret-of-{k}"))),
            None => None,
        })
        .collect()
}

#[test]
fn configmap_and_env_overrides_load_with_the_workers_own_loader() {
    let cm = one_doc(&format!("{K8S}/configmap.yaml"), "ConfigMap");
    let toml = s(&cm["data"]["triagem.toml"], "configmap data");
    for rel in ["deployment.yaml", "deployment-gpu.yaml"] {
        let env = deployment_env(rel, false);
        let cfg = load_worker_config(toml, &env)
            .unwrap_or_else(|e| panic!("configmap.yaml + {rel} env: the worker would not start: {e}"));
        assert_eq!(cfg.metrics.listen, "0.0.0.0:9095");
        assert_eq!(cfg.model.path, Path::new("/models/triagem"), "where deploy/Dockerfile puts the model");
        assert_eq!(cfg.kafka.input_topic, "atendimento.mensagens");
        let want = if rel.contains("gpu") { "cuda" } else { "cpu" };
        assert_eq!(cfg.model.device.as_str(), want, "{rel}");
        if rel.contains("gpu") {
            assert_eq!((cfg.batch.max_messages, cfg.batch.max_tokens), (128, 16384), "{rel}: the GPU's batches");
        }
        assert_eq!(humantime::format_duration(cfg.shutdown.timeout).to_string(), configmap_toml()["shutdown.timeout"]);
    }
    // Compose: the image's config/default.toml plus the worker's environment.
    let compose = yaml("deploy/compose.yaml");
    let env: Vec<(String, String)> = compose["services"]["worker"]["environment"]
        .as_mapping()
        .unwrap()
        .iter()
        .map(|(k, v)| (s(k, "env").to_string(), v.as_str().map(str::to_string).unwrap_or_else(|| format!("{v:?}"))))
        .filter(|(k, _)| k.starts_with("TRIAGEM__"))
        .collect();
    let cfg = load_worker_config(&read("config/default.toml"), &env)
        .unwrap_or_else(|e| panic!("compose worker env: the worker would not start: {e}"));
    assert_eq!(cfg.kafka.brokers, "kafka:9092");
    assert_eq!(cfg.model.path, Path::new("/models/triagem"));
}

#[test]
fn sasl_credentials_from_the_secret_reach_librdkafka() {
    let cm = one_doc(&format!("{K8S}/configmap.yaml"), "ConfigMap");
    let env = deployment_env("deployment.yaml", true);
    let cfg = load_worker_config(s(&cm["data"]["triagem.toml"], "configmap data"), &env)
        .unwrap_or_else(|e| panic!("configmap.yaml + the Secret's env: the worker would not start: {e}"));
    let client = &cfg.kafka.client.0;
    assert_eq!(
        client.get("sasl.username").map(String::as_str),
        Some("secret-of-TRIAGEM__KAFKA__CLIENT__SASL__USERNAME")
    );
    assert_eq!(
        client.get("sasl.password").map(String::as_str),
        Some("secret-of-TRIAGEM__KAFKA__CLIENT__SASL__PASSWORD")
    );
    assert_eq!(client.get("security.protocol").map(String::as_str), Some("SASL_SSL"));
}

#[test]
fn kustomization_lists_existing_files_but_not_the_secret_example_or_the_gpu_variant() {
    let k = yaml(&format!("{K8S}/kustomization.yaml"));
    let resources: Vec<&str> = k["resources"].as_sequence().unwrap().iter().map(|r| s(r, "resource")).collect();
    for r in &resources {
        assert!(root().join(K8S).join(r).is_file(), "kustomization lists missing {r}");
    }
    assert!(!resources.contains(&"secret.example.yaml") && !resources.contains(&"deployment-gpu.yaml"));
    for r in ["configmap.yaml", "deployment.yaml", "service.yaml", "podmonitor.yaml", "keda-scaledobject.yaml"] {
        assert!(resources.contains(&r), "kustomization misses {r}");
    }
}

// ---------------------------------------------------------- Compose and images

#[test]
fn compose_wires_kafka_topics_worker_prometheus_grafana_and_loadgen() {
    let c = yaml("deploy/compose.yaml");
    let svc = &c["services"];
    let kafka = &svc["kafka"];
    assert!(s(&kafka["image"], "kafka image").starts_with("apache/kafka:"), "the official Apache Kafka image");
    assert!(s(&kafka["environment"]["KAFKA_PROCESS_ROLES"], "roles").contains("controller"), "KRaft mode");
    assert!(kafka["environment"]["KAFKA_ZOOKEEPER_CONNECT"].is_null());

    let init = &svc["kafka-init"];
    assert_eq!(init["depends_on"]["kafka"]["condition"], "service_healthy");
    let script = s(&init["command"][0], "kafka-init script");
    assert!(script.contains(&format!("create atendimento.mensagens {INPUT_PARTITIONS}")), "input topic partitions");
    for topic in ["atendimento.venda", "atendimento.suporte", "atendimento.revisao", "atendimento.dlq"] {
        assert!(script.contains(&format!("create {topic} ")), "kafka-init does not create {topic}");
    }

    let worker = &svc["worker"];
    assert_eq!(worker["depends_on"]["kafka-init"]["condition"], "service_completed_successfully");
    assert_eq!(worker["environment"]["TRIAGEM__KAFKA__BROKERS"], "kafka:9092");
    assert_eq!(worker["build"]["dockerfile"], "deploy/Dockerfile");
    assert!(root().join("deploy").join(s(&worker["build"]["context"], "context")).join("Cargo.toml").is_file());
    let model_mount =
        worker["volumes"].as_sequence().unwrap().iter().map(|v| s(v, "volume")).find(|v| v.contains("/models/triagem"));
    assert!(model_mount.is_some(), "the worker mounts the model");

    let prom = &svc["prometheus"];
    assert!(prom["volumes"].as_sequence().unwrap().iter().any(|v| v == "./prometheus:/etc/prometheus:ro"));
    assert!(svc["grafana"]["volumes"].as_sequence().is_some());

    let lg = &svc["loadgen"];
    assert_eq!(lg["profiles"][0], "loadgen", "the load generator is optional");
    let cmd: Vec<&str> = lg["command"].as_sequence().unwrap().iter().map(|a| s(a, "arg")).collect();
    assert_eq!(cmd[0], "loadgen");
    assert_eq!(cmd[cmd.iter().position(|a| *a == "--brokers").unwrap() + 1], "kafka:9092");

    // Every bind mount's source exists (models/ is built, so only its parent is required).
    for (name, s_) in svc.as_mapping().unwrap() {
        for v in s_["volumes"].as_sequence().into_iter().flatten() {
            let src = s(v, "volume").split(':').next().unwrap();
            if !src.starts_with('.') {
                continue;
            }
            let path = root().join("deploy").join(src);
            let path =
                if src.contains("models/") { path.parent().unwrap().parent().unwrap().to_path_buf() } else { path };
            assert!(path.exists(), "compose service {}: {src} does not exist", s(name, "name"));
        }
    }
}

#[test]
fn compose_file_parses_with_docker_compose_when_available() {
    // `docker compose` (v2 plugin) or `docker-compose` (v1); neither needs a running engine for `config`.
    let candidates: [&[&str]; 2] = [&["docker", "compose"], &["docker-compose"]];
    for argv in candidates {
        let probe = Command::new(argv[0]).args(&argv[1..]).arg("version").output();
        if !probe.is_ok_and(|o| o.status.success()) {
            continue;
        }
        let mut cmd = Command::new(argv[0]);
        cmd.args(&argv[1..])
            .args(["-f", "deploy/compose.yaml", "--profile", "loadgen", "config", "-q"])
            .current_dir(root());
        run_ok(cmd, &format!("{} config -q", argv.join(" ")));
        return;
    }
    eprintln!("neither `docker compose` nor `docker-compose` is installed: compose.yaml was only checked as YAML");
}

/// The `COPY` sources of a Dockerfile's own build context (not `--from` stages).
fn copy_sources(dockerfile: &str) -> Vec<String> {
    let mut out = Vec::new();
    for line in dockerfile.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        if words.first() != Some(&"COPY") || words.iter().any(|w| w.starts_with("--from")) {
            continue;
        }
        let args: Vec<&str> = words[1..].iter().copied().filter(|w| !w.starts_with("--")).collect();
        out.extend(args[..args.len() - 1].iter().map(|a| a.trim_end_matches('/').to_string()));
    }
    out
}

#[test]
fn dockerfiles_build_locked_release_binaries_and_run_as_non_root() {
    for (rel, build) in [
        ("deploy/Dockerfile", "cargo build --release --locked --bin triagem"),
        ("deploy/Dockerfile.cuda", "cargo build --release --locked --features cuda --bin triagem"),
    ] {
        let text = read(rel);
        assert!(text.contains(build), "{rel}: must run `{build}`");
        assert!(text.contains("EXPOSE 9095"), "{rel}: EXPOSE 9095");
        let users: Vec<&str> = text.lines().filter_map(|l| l.strip_prefix("USER ")).collect();
        assert!(
            !users.is_empty() && users.iter().all(|u| !u.starts_with('0') && !u.starts_with("root")),
            "{rel}: USER non-root"
        );
        assert!(text.contains("COPY config/default.toml "), "{rel}: ships config/default.toml");
        // Everything copied from the context exists (models/triagem is built by `triagem train`)
        // and is let through by the Dockerfile's own .dockerignore.
        let ignore = read(&format!("{rel}.dockerignore"));
        for src in copy_sources(&text) {
            if !src.starts_with("models/") {
                assert!(root().join(&src).exists(), "{rel}: COPY {src}: no such file in the repository");
            }
            let let_through =
                ignore.lines().filter_map(|l| l.trim().strip_prefix('!')).map(|l| l.trim_end_matches('/'));
            let shown =
                let_through.into_iter().any(|allowed| src == allowed || src.starts_with(&format!("{allowed}/")));
            assert!(shown, "{rel}.dockerignore hides {src}");
        }
    }
    assert!(read("deploy/Dockerfile.cuda").contains("nvidia/cuda:"), "CUDA base image");
    assert!(Path::new(&root().join("scripts/install-promtool.sh")).is_file());
}

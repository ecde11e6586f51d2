//! The worker's settings: one TOML file (`config/default.toml` documents every
//! key), every key overridable from the environment as
//! `TRIAGEM__SECTION__KEY` (double underscores), unknown keys rejected, and
//! pass-through tables for librdkafka (`[kafka.client]`, `[kafka.consumer]`,
//! `[kafka.producer]`).
//!
//! Errors name the key (`batch.max_messages: invalid type: ...`). Secrets in
//! the pass-through tables (any key containing `password` or `secret`) are
//! redacted whenever the settings are printed.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::model::ComputeDevice;

/// Prefix of the environment overrides: `TRIAGEM__KAFKA__BROKERS=...`.
pub const ENV_PREFIX: &str = "TRIAGEM";
/// Separator between the prefix, sections and keys in environment overrides.
pub const ENV_SEPARATOR: &str = "__";

/// Why the settings could not be read. Every variant names the key (or file) at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error("{key}: {reason}")]
    Key { key: String, reason: String },
}

impl ConfigError {
    fn key(key: &str, reason: impl Into<String>) -> Self {
        ConfigError::Key { key: key.to_string(), reason: reason.into() }
    }
}

/// All of the worker's settings.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Where to read from and how to talk to the brokers.
    pub kafka: KafkaConfig,
    /// Where each classified message goes.
    pub routing: RoutingConfig,
    /// How an input message is decoded.
    pub input: InputConfig,
    /// When a micro-batch closes.
    pub batch: BatchConfig,
    /// Which model serves, on which device.
    pub model: ModelConfig,
    /// The HTTP endpoint with `/metrics`, `/healthz` and `/readyz`.
    pub metrics: MetricsConfig,
    /// How long a graceful stop may take.
    pub shutdown: ShutdownConfig,
    /// How the worker's log lines are written.
    pub log: LogConfig,
    /// When the worker reports itself unhealthy.
    pub health: HealthConfig,
}

/// `[health]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthConfig {
    /// Messages in flight and no output acknowledged for this long: `/healthz` 503, `triagem_stalled` 1.
    #[serde(with = "humantime_serde")]
    pub stall_timeout: Duration,
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self { stall_timeout: Duration::from_secs(300) }
    }
}

/// `[kafka]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaConfig {
    /// `bootstrap.servers`: comma-separated host:port list.
    pub brokers: String,
    /// Consumer group; replicas with the same group split the input partitions.
    pub group_id: String,
    /// Topic the chat messages arrive on.
    pub input_topic: String,
    /// Consumed messages whose offset is not yet committable; at this many, consumption pauses.
    pub max_in_flight: usize,
    /// Bytes (value, key and headers) of those messages; at this many, consumption pauses too. A
    /// soft bound: the message that crosses it is kept, so it is exceeded by at most one message.
    pub max_in_flight_bytes: bytesize::ByteSize,
    /// How often committable offsets are committed (asynchronously; synchronously on revoke and shutdown).
    #[serde(with = "humantime_serde")]
    pub commit_interval: Duration,
    /// Longest wait between retries of an output the broker rejected or timed out.
    #[serde(with = "humantime_serde")]
    pub produce_retry_backoff: Duration,
    /// How long this member may hold no input partition while its group's lag stands still before it
    /// reports not ready (`/readyz` 503, `triagem_idle_with_lag` 1).
    #[serde(with = "humantime_serde")]
    pub unassigned_timeout: Duration,
    /// `at_least_once` (offsets committed once outputs are acknowledged) or `exactly_once` (outputs
    /// and input offsets in one Kafka transaction per `transaction_interval`).
    pub delivery: Delivery,
    /// Exactly-once: how long a transaction stays open collecting outputs before it is committed.
    #[serde(with = "humantime_serde")]
    pub transaction_interval: Duration,
    /// Exactly-once: the producer's `transactional.id`, stable per replica; `{group}` and `{hostname}`
    /// are replaced (a StatefulSet pod's hostname is stable). A newer worker with the same id fences this one.
    pub transactional_id: String,
    /// librdkafka settings for both consumer and producer (security.protocol, sasl.*, ssl.*, …).
    pub client: ClientOptions,
    /// librdkafka settings for the consumer only (override `client`).
    pub consumer: ClientOptions,
    /// librdkafka settings for the producer only (override `client`).
    pub producer: ClientOptions,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        Self {
            brokers: "localhost:9092".into(),
            group_id: "triagem".into(),
            input_topic: "atendimento.mensagens".into(),
            max_in_flight: 2000,
            max_in_flight_bytes: bytesize::ByteSize::mib(64),
            commit_interval: Duration::from_secs(1),
            produce_retry_backoff: Duration::from_millis(500),
            unassigned_timeout: Duration::from_secs(60),
            delivery: Delivery::AtLeastOnce,
            transaction_interval: Duration::from_millis(100),
            transactional_id: DEFAULT_TRANSACTIONAL_ID.into(),
            client: ClientOptions::default(),
            consumer: ClientOptions::default(),
            producer: ClientOptions::default(),
        }
    }
}

/// The default `kafka.transactional_id`: one per group and replica.
pub const DEFAULT_TRANSACTIONAL_ID: &str = "triagem-{group}-{hostname}";

/// `kafka.delivery`: what a crash or a rebalance may do to the outputs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Delivery {
    /// Offsets are committed once every output below them is acknowledged: a crash routes the
    /// messages since the last commit again (duplicates, never losses).
    #[default]
    AtLeastOnce,
    /// Outputs and input offsets are committed in one Kafka transaction: a `read_committed`
    /// reader of the outputs sees each input's output once, across crashes and rebalances.
    ExactlyOnce,
}

impl KafkaConfig {
    /// `transactional_id` with `{group}` and `{hostname}` replaced.
    pub fn transactional_id_for(&self, hostname: &str) -> String {
        self.transactional_id.replace("{group}", &self.group_id).replace("{hostname}", hostname)
    }
}

/// This machine's hostname (`HOSTNAME`, else the kernel's), for `kafka.transactional_id`.
pub fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.trim().is_empty())
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// A librdkafka pass-through table. Its `Debug` output redacts secrets.
///
/// Keys may be written dotted (`"sasl.username" = "x"`) or nested
/// (`[kafka.client.sasl] username = "x"`, or the environment variable
/// `TRIAGEM__KAFKA__CLIENT__SASL__USERNAME`); both mean `sasl.username`.
/// Numbers and booleans are passed on as their text.
#[derive(Clone, Default, PartialEq)]
pub struct ClientOptions(pub BTreeMap<String, String>);

impl<'de> Deserialize<'de> for ClientOptions {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        fn flatten(prefix: &str, v: serde_json::Value, out: &mut BTreeMap<String, String>) -> Result<(), String> {
            use serde_json::Value;
            let text = match v {
                Value::String(s) => s,
                Value::Bool(b) => b.to_string(),
                Value::Number(n) => n.to_string(),
                Value::Object(map) => {
                    for (k, v) in map {
                        let key = if prefix.is_empty() { k } else { format!("{prefix}.{k}") };
                        flatten(&key, v, out)?;
                    }
                    return Ok(());
                }
                Value::Null | Value::Array(_) => {
                    return Err(format!("{prefix}: expected a string, number or boolean librdkafka value"))
                }
            };
            out.insert(prefix.to_string(), text);
            Ok(())
        }
        let raw = BTreeMap::<String, serde_json::Value>::deserialize(d)?;
        let mut out = BTreeMap::new();
        for (k, v) in raw {
            flatten(&k, v, &mut out).map_err(serde::de::Error::custom)?;
        }
        Ok(ClientOptions(out))
    }
}

impl ClientOptions {
    /// The settings with every secret value replaced by `***`, for logs.
    pub fn redacted(&self) -> BTreeMap<String, String> {
        self.0.iter().map(|(k, v)| (k.clone(), if is_secret(k) { "***".to_string() } else { v.clone() })).collect()
    }
}

impl fmt::Debug for ClientOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.redacted().fmt(f)
    }
}

/// Whether a librdkafka key holds a secret (`sasl.password`, `ssl.key.password`, `…secret…`).
pub fn is_secret(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    k.contains("password") || k.contains("secret")
}

/// `[routing]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RoutingConfig {
    /// Label → output topic; every label of the model needs one.
    pub topics: BTreeMap<String, String>,
    /// Where messages classified below `min_confidence` go.
    pub review_topic: String,
    /// Below this score a message goes to the review topic (0 = never).
    pub min_confidence: f32,
    /// Where undecodable messages go, bytes unchanged, with a `triagem-error` header.
    pub dead_letter_topic: String,
    /// A dead letter copies the input payload only up to this many bytes; a larger one is sent
    /// as a stub (reason and source headers, `triagem-payload-dropped`, no payload).
    pub dead_letter_max_bytes: usize,
    /// Field of a routed output that carries the classification; an input field of the same
    /// name is replaced (counted in `triagem_output_field_replaced_total`).
    pub output_field: String,
}

impl Default for RoutingConfig {
    fn default() -> Self {
        Self {
            topics: [("venda", "atendimento.venda"), ("suporte", "atendimento.suporte")]
                .into_iter()
                .map(|(l, t)| (l.to_string(), t.to_string()))
                .collect(),
            review_topic: "atendimento.revisao".into(),
            min_confidence: 0.0,
            dead_letter_topic: "atendimento.dlq".into(),
            dead_letter_max_bytes: 900_000,
            output_field: "triagem".into(),
        }
    }
}

/// The output field holding the text of a plain-text input (`input.format = "text"`).
pub const TEXT_INPUT_OUTPUT_FIELD: &str = "text";

/// How input payloads are encoded.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum InputFormat {
    /// A JSON object with the text in `input.text_field`; other fields are kept.
    Json,
    /// The whole payload is the text (UTF-8).
    Text,
}

/// `[input]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct InputConfig {
    /// `json` or `text`.
    pub format: InputFormat,
    /// Field of a JSON input holding the text.
    pub text_field: String,
    /// Larger payloads are dead-lettered as `oversize`.
    pub max_bytes: usize,
}

impl Default for InputConfig {
    fn default() -> Self {
        Self { format: InputFormat::Json, text_field: "text".into(), max_bytes: 64 * 1024 }
    }
}

/// `[batch]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BatchConfig {
    /// A batch closes at this many messages…
    pub max_messages: usize,
    /// …or when it would exceed this many padded tokens (messages × longest)…
    pub max_tokens: usize,
    /// …or this long after its first message arrived, whichever comes first
    /// (a window also closes as soon as the model is idle: see `worker::batcher`).
    #[serde(with = "humantime_serde")]
    pub max_wait: Duration,
}

impl Default for BatchConfig {
    fn default() -> Self {
        Self { max_messages: 32, max_tokens: 4096, max_wait: Duration::from_millis(20) }
    }
}

/// `[model]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// Hugging Face model directory written by `triagem train`.
    pub path: PathBuf,
    /// `cpu`, `cuda` (needs the `cuda` build) or `auto`.
    pub device: ComputeDevice,
    /// CPU threads of the model; 0 = automatic (`RAYON_NUM_THREADS`, else the CPUs the process may use,
    /// container CPU quota included). See `model::threads`.
    pub threads: usize,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self { path: "models/triagem".into(), device: ComputeDevice::Cpu, threads: 0 }
    }
}

/// `[metrics]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Address of the HTTP endpoint.
    pub listen: String,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self { listen: "0.0.0.0:9095".into() }
    }
}

/// `[shutdown]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShutdownConfig {
    /// After SIGTERM/SIGINT (or a partition revoke), in-flight work must finish within this.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        Self { timeout: Duration::from_secs(30) }
    }
}

/// `[log]`
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `text` (one readable line per event) or `json` (one JSON object per line, for log pipelines).
    /// The `--log-format` flag and `TRIAGEM_LOG_FORMAT` take precedence; `RUST_LOG` sets the levels.
    pub format: LogFormat,
}

/// How log lines are written. Colour codes are used only when stderr is a terminal.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One human-readable line per event.
    #[default]
    Text,
    /// One JSON object per event, with its span fields.
    Json,
}

impl Config {
    /// Reads `file` (when given), then the `TRIAGEM__…` environment, then checks the values.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        Self::load_with_env(file, std::env::vars())
    }

    /// [`Config::load`] with the environment given explicitly (for tests).
    pub fn load_with_env(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let mut builder = config::Config::builder();
        if let Some(path) = file {
            if !path.is_file() {
                return Err(ConfigError::File { path: path.to_path_buf(), reason: "no such file".into() });
            }
            builder = builder.add_source(config::File::from(path).format(config::FileFormat::Toml));
        }
        let env: config::Map<String, String> = env.into_iter().collect();
        builder = builder.add_source(
            config::Environment::with_prefix(ENV_PREFIX)
                .prefix_separator(ENV_SEPARATOR)
                .separator(ENV_SEPARATOR)
                .source(Some(env)),
        );
        let raw = builder.build().map_err(|e| match file {
            Some(path) => ConfigError::File { path: path.to_path_buf(), reason: e.to_string() },
            None => ConfigError::key("environment", e.to_string()),
        })?;
        reject_millisecond_keys(&raw)?;
        let cfg: Config = serde_path_to_error::deserialize(raw).map_err(keyed)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks what types alone cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let nonempty = |key: &str, v: &str| {
            if v.trim().is_empty() {
                Err(ConfigError::key(key, "must not be empty"))
            } else {
                Ok(())
            }
        };
        nonempty("kafka.brokers", &self.kafka.brokers)?;
        nonempty("kafka.group_id", &self.kafka.group_id)?;
        nonempty("kafka.input_topic", &self.kafka.input_topic)?;
        nonempty("routing.review_topic", &self.routing.review_topic)?;
        nonempty("routing.dead_letter_topic", &self.routing.dead_letter_topic)?;
        nonempty("routing.output_field", &self.routing.output_field)?;
        let text_field = match self.input.format {
            InputFormat::Json => self.input.text_field.as_str(),
            InputFormat::Text => TEXT_INPUT_OUTPUT_FIELD,
        };
        if self.routing.output_field == text_field {
            return Err(ConfigError::key(
                "routing.output_field",
                format!("must differ from the field holding the text ({text_field:?}): the output would lose it"),
            ));
        }
        nonempty("input.text_field", &self.input.text_field)?;
        if self.routing.topics.is_empty() {
            return Err(ConfigError::key("routing.topics", "needs one topic per model label"));
        }
        for (label, topic) in &self.routing.topics {
            nonempty(&format!("routing.topics.{label}"), topic)?;
            if *topic == self.kafka.input_topic {
                return Err(ConfigError::key(&format!("routing.topics.{label}"), "must differ from kafka.input_topic"));
            }
        }
        if !(0.0..=1.0).contains(&self.routing.min_confidence) {
            return Err(ConfigError::key("routing.min_confidence", "must be between 0 and 1"));
        }
        let positive = |key: &str, v: u64| {
            if v == 0 {
                Err(ConfigError::key(key, "must be at least 1"))
            } else {
                Ok(())
            }
        };
        self.check_producer_durability()?;
        positive("kafka.max_in_flight", self.kafka.max_in_flight as u64)?;
        positive("kafka.max_in_flight_bytes", self.kafka.max_in_flight_bytes.as_u64())?;
        positive("input.max_bytes", self.input.max_bytes as u64)?;
        positive("batch.max_messages", self.batch.max_messages as u64)?;
        positive("batch.max_tokens", self.batch.max_tokens as u64)?;
        let nonzero = |key: &str, v: Duration| {
            if v.is_zero() {
                Err(ConfigError::key(key, "must be longer than 0 (a duration with its unit: 500ms, 2s, 1m)"))
            } else {
                Ok(())
            }
        };
        nonzero("kafka.commit_interval", self.kafka.commit_interval)?;
        nonzero("kafka.produce_retry_backoff", self.kafka.produce_retry_backoff)?;
        nonzero("kafka.unassigned_timeout", self.kafka.unassigned_timeout)?;
        nonzero("kafka.transaction_interval", self.kafka.transaction_interval)?;
        if self.kafka.delivery == Delivery::ExactlyOnce {
            nonempty("kafka.transactional_id", &self.kafka.transactional_id)?;
        }
        for table in ["kafka.client", "kafka.producer"] {
            let options = if table == "kafka.client" { &self.kafka.client } else { &self.kafka.producer };
            if options.0.contains_key("transactional.id") {
                return Err(ConfigError::key(
                    &format!("{table}.transactional.id"),
                    "set kafka.transactional_id instead (used only with kafka.delivery = \"exactly_once\")",
                ));
            }
        }
        nonzero("shutdown.timeout", self.shutdown.timeout)?;
        if self.health.stall_timeout.is_zero() {
            return Err(ConfigError::key(
                "health.stall_timeout",
                "must be longer than 0 (a duration with its unit: 500ms, 2s, 1m)",
            ));
        }
        self.metrics_addr()?;
        Ok(())
    }

    /// The producer always runs with `acks = all` and `enable.idempotence =
    /// true` (at-least-once and input order depend on them): a
    /// `[kafka.client]` or `[kafka.producer]` setting that weakens them is an
    /// error, one that repeats them is allowed.
    fn check_producer_durability(&self) -> Result<(), ConfigError> {
        for (table, options) in [("kafka.client", &self.kafka.client), ("kafka.producer", &self.kafka.producer)] {
            for (key, value) in &options.0 {
                let v = value.trim().to_ascii_lowercase();
                let (ok, want) = match key.as_str() {
                    "acks" | "request.required.acks" => (v == "all" || v == "-1", "\"all\""),
                    "enable.idempotence" => (v == "true", "true"),
                    _ => continue,
                };
                if !ok {
                    return Err(ConfigError::key(
                        &format!("{table}.{key}"),
                        format!(
                            "{value:?} would let the broker lose or reorder acknowledged outputs; the worker always \
                             sets {key} = {want} (remove the key)"
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    /// `metrics.listen` parsed.
    pub fn metrics_addr(&self) -> Result<SocketAddr, ConfigError> {
        self.metrics.listen.parse().map_err(|e| {
            ConfigError::key("metrics.listen", format!("{:?}: {e} (expected host:port)", self.metrics.listen))
        })
    }

    /// Every output topic (labels, review, dead letters), for creating or checking them.
    pub fn output_topics(&self) -> Vec<String> {
        let mut topics: Vec<String> = self.routing.topics.values().cloned().collect();
        topics.push(self.routing.review_topic.clone());
        topics.push(self.routing.dead_letter_topic.clone());
        topics.sort();
        topics.dedup();
        topics
    }
}

/// Keys that took a number of milliseconds before durations were written with
/// their unit, and the key that replaced each.
const MILLISECOND_KEYS: [(&str, &str); 6] = [
    ("kafka.transaction_interval_ms", "kafka.transaction_interval"),
    ("kafka.commit_interval_ms", "kafka.commit_interval"),
    ("kafka.produce_retry_backoff_ms", "kafka.produce_retry_backoff"),
    ("kafka.unassigned_timeout_ms", "kafka.unassigned_timeout"),
    ("batch.max_wait_ms", "batch.max_wait"),
    ("shutdown.timeout_ms", "shutdown.timeout"),
];

/// An old `…_ms` key is an error that names its replacement with the same
/// value, rather than the generic "unknown key".
fn reject_millisecond_keys(raw: &config::Config) -> Result<(), ConfigError> {
    for (old, new) in MILLISECOND_KEYS {
        if let Ok(value) = raw.get_string(old) {
            let millis = value.trim();
            let suggestion = if millis.parse::<u64>().is_ok() { format!("\"{millis}ms\"") } else { "\"500ms\"".into() };
            return Err(ConfigError::key(
                old,
                format!("renamed: write {new} = {suggestion} (a duration with its unit: 500ms, 2s, 1m)"),
            ));
        }
    }
    Ok(())
}

/// The deserialisation error as `key: problem`, the key being the path
/// `serde_path_to_error` tracked to the failing value (an unknown key included).
fn keyed(e: serde_path_to_error::Error<config::ConfigError>) -> ConfigError {
    let key = match e.path().to_string() {
        root if root == "." => "(root)".to_string(),
        path => path,
    };
    let reason = match e.into_inner() {
        config::ConfigError::Type { unexpected, expected, .. } => {
            format!("invalid type: {unexpected}, expected {expected}")
        }
        config::ConfigError::At { error, .. } => error.to_string(),
        other => other.to_string(),
    };
    // serde's own wording, "unknown field `x`, expected one of …", names a key here.
    let reason = match reason.strip_prefix("unknown field `").and_then(|rest| rest.split_once('`')) {
        Some((_, expected)) => format!("unknown key ({})", expected.trim_start_matches(',').trim()),
        None => reason,
    };
    // The config crate's wording for an unknown enum value: say which values the key takes.
    let reason = match reason.split_once("does not have variant constructor ") {
        Some((_, value)) => {
            let values = match key.as_str() {
                "kafka.delivery" => " (expected \"at_least_once\" or \"exactly_once\")",
                "input.format" => " (expected \"json\" or \"text\")",
                "log.format" => " (expected \"text\" or \"json\")",
                _ => "",
            };
            format!("unknown value {value:?}{values}")
        }
        None => reason,
    };
    // humantime-serde's wording; a bare number here is usually an old milliseconds value.
    let reason = match reason.strip_suffix("expected a duration") {
        Some(head) => format!("{head}expected a duration with its unit, e.g. \"500ms\", \"2s\", \"1m\""),
        None => reason,
    };
    // bytesize's wording.
    let reason = match reason.strip_suffix("expected parsable string") {
        Some(head) => format!("{head}expected a size with its unit, e.g. \"64MiB\", \"500KB\", or a number of bytes"),
        None => reason,
    };
    ConfigError::Key { key, reason }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn toml(text: &str) -> tempfile::NamedTempFile {
        let f = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
        std::fs::write(f.path(), text).unwrap();
        f
    }

    #[test]
    fn defaults_match_the_issue() {
        let cfg = Config::load_with_env(None, env(&[])).unwrap();
        assert_eq!(cfg.kafka.input_topic, "atendimento.mensagens");
        assert_eq!(cfg.routing.topics["venda"], "atendimento.venda");
        assert_eq!(cfg.routing.topics["suporte"], "atendimento.suporte");
        assert_eq!(cfg.routing.review_topic, "atendimento.revisao");
        assert_eq!(cfg.routing.dead_letter_topic, "atendimento.dlq");
        assert_eq!(cfg.routing.min_confidence, 0.0);
        assert_eq!(cfg.input.text_field, "text");
        assert_eq!(cfg.metrics.listen, "0.0.0.0:9095");
    }

    #[test]
    fn default_toml_parses_and_equals_builtin_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/default.toml");
        let cfg = Config::load_with_env(Some(&path), env(&[])).unwrap();
        let builtin = Config::default();
        assert_eq!(cfg.kafka.brokers, builtin.kafka.brokers);
        assert_eq!(cfg.kafka.max_in_flight, builtin.kafka.max_in_flight);
        assert_eq!(cfg.batch.max_messages, builtin.batch.max_messages);
        assert_eq!(cfg.routing.topics, builtin.routing.topics);
        assert_eq!(cfg.shutdown.timeout, builtin.shutdown.timeout);
        assert_eq!(cfg.kafka.commit_interval, builtin.kafka.commit_interval);
        assert_eq!(cfg.kafka.produce_retry_backoff, builtin.kafka.produce_retry_backoff);
        assert_eq!(cfg.kafka.unassigned_timeout, builtin.kafka.unassigned_timeout);
        assert_eq!(cfg.batch.max_wait, builtin.batch.max_wait);
        assert_eq!(cfg.log.format, builtin.log.format);
        assert_eq!(cfg.kafka.delivery, builtin.kafka.delivery);
        assert_eq!(cfg.kafka.transaction_interval, builtin.kafka.transaction_interval);
        assert_eq!(cfg.kafka.transactional_id, builtin.kafka.transactional_id);
        assert_eq!(cfg.routing.output_field, builtin.routing.output_field);
    }

    #[test]
    fn the_output_field_is_settable_and_may_not_be_the_texts() {
        let cfg = Config::load_with_env(None, env(&[("TRIAGEM__ROUTING__OUTPUT_FIELD", "classificacao")])).unwrap();
        assert_eq!(cfg.routing.output_field, "classificacao");
        let e = Config::load_with_env(None, env(&[("TRIAGEM__ROUTING__OUTPUT_FIELD", "text")])).unwrap_err();
        assert!(e.to_string().contains("routing.output_field") && e.to_string().contains("\"text\""), "{e}");
        let e = Config::load_with_env(
            None,
            env(&[("TRIAGEM__INPUT__TEXT_FIELD", "mensagem"), ("TRIAGEM__ROUTING__OUTPUT_FIELD", "mensagem")]),
        )
        .unwrap_err();
        assert!(e.to_string().contains("\"mensagem\""), "{e}");
        let e = Config::load_with_env(None, env(&[("TRIAGEM__ROUTING__OUTPUT_FIELD", "")])).unwrap_err();
        assert!(e.to_string().contains("routing.output_field"), "{e}");
    }

    #[test]
    fn exactly_once_keys() {
        let cfg = Config::load_with_env(None, env(&[])).unwrap();
        assert_eq!(cfg.kafka.delivery, Delivery::AtLeastOnce);
        assert_eq!(cfg.kafka.transaction_interval, Duration::from_millis(100));
        let f = toml("[kafka]\ngroup_id = \"g1\"\ndelivery = \"exactly_once\"\ntransaction_interval = \"250ms\"\n");
        let cfg = Config::load_with_env(Some(f.path()), env(&[])).unwrap();
        assert_eq!(cfg.kafka.delivery, Delivery::ExactlyOnce);
        assert_eq!(cfg.kafka.transaction_interval, Duration::from_millis(250));
        assert_eq!(cfg.kafka.transactional_id_for("triagem-2"), "triagem-g1-triagem-2");
        let cfg = Config::load_with_env(
            None,
            env(&[("TRIAGEM__KAFKA__DELIVERY", "exactly_once"), ("TRIAGEM__KAFKA__TRANSACTIONAL_ID", "eu-{hostname}")]),
        )
        .unwrap();
        assert_eq!(cfg.kafka.transactional_id_for("h"), "eu-h");
        for (text, start) in [
            (
                "[kafka]\ndelivery = \"exactly-once\"\n",
                "kafka.delivery: unknown value \"exactly-once\" (expected \"at_least_once\" or \"exactly_once\")",
            ),
            ("[kafka]\ntransaction_interval = \"0s\"\n", "kafka.transaction_interval: must be longer than 0"),
            ("[kafka]\ntransaction_interval = 100\n", "kafka.transaction_interval: "),
            (
                "[kafka]\ndelivery = \"exactly_once\"\ntransactional_id = \" \"\n",
                "kafka.transactional_id: must not be empty",
            ),
            (
                "[kafka.producer]\n\"transactional.id\" = \"x\"\n",
                "kafka.producer.transactional.id: set kafka.transactional_id",
            ),
        ] {
            let f = toml(text);
            let err = Config::load_with_env(Some(f.path()), env(&[])).unwrap_err().to_string();
            assert!(err.starts_with(start), "{text:?} gave {err}");
        }
    }

    #[test]
    fn environment_overrides_file() {
        let f = toml("[kafka]\nbrokers = \"a:1\"\n[batch]\nmax_messages = 8\n");
        let cfg = Config::load_with_env(
            Some(f.path()),
            env(&[
                ("TRIAGEM__KAFKA__BROKERS", "b:2"),
                ("TRIAGEM__BATCH__MAX_WAIT", "7ms"),
                ("TRIAGEM__ROUTING__MIN_CONFIDENCE", "0.6"),
                ("TRIAGEM__ROUTING__TOPICS__VENDA", "out.venda"),
                ("TRIAGEM_MODEL", "ignored: single underscore belongs to the CLI"),
            ]),
        )
        .unwrap();
        assert_eq!(cfg.kafka.brokers, "b:2");
        assert_eq!(cfg.batch.max_messages, 8);
        assert_eq!(cfg.batch.max_wait, Duration::from_millis(7));
        assert!((cfg.routing.min_confidence - 0.6).abs() < 1e-6);
        assert_eq!(cfg.routing.topics["venda"], "out.venda");
    }

    #[test]
    fn wrong_type_names_the_key() {
        let f = toml("[batch]\nmax_messages = \"many\"\n");
        let err = Config::load_with_env(Some(f.path()), env(&[])).unwrap_err().to_string();
        assert!(err.starts_with("batch.max_messages: invalid"), "{err}");
        let err = Config::load_with_env(None, env(&[("TRIAGEM__BATCH__MAX_TOKENS", "lots")])).unwrap_err().to_string();
        assert!(err.starts_with("batch.max_tokens: "), "{err}");
    }

    #[test]
    fn unknown_keys_are_rejected_by_name() {
        let f = toml("[batch]\nmax_mesages = 3\n");
        let err = Config::load_with_env(Some(f.path()), env(&[])).unwrap_err().to_string();
        assert!(err.starts_with("batch.max_mesages: unknown key"), "{err}");
        let f = toml("[kafak]\nbrokers = \"x\"\n");
        let err = Config::load_with_env(Some(f.path()), env(&[])).unwrap_err().to_string();
        assert!(err.starts_with("kafak: unknown key"), "{err}");
        let err = Config::load_with_env(None, env(&[("TRIAGEM__MODEL__PATHH", "x")])).unwrap_err().to_string();
        assert!(err.starts_with("model.pathh: unknown key"), "{err}");
    }

    #[test]
    fn invalid_values_name_the_key() {
        let cases = [
            ("[routing]\nmin_confidence = 1.5\n", "routing.min_confidence"),
            ("[model]\ndevice = \"tpu\"\n", "model.device"),
            ("[batch]\nmax_messages = 0\n", "batch.max_messages"),
            ("[metrics]\nlisten = \"nowhere\"\n", "metrics.listen"),
            ("[input]\nformat = \"xml\"\n", "input.format"),
            ("[kafka]\ncommit_interval = \"soon\"\n", "kafka.commit_interval"),
            ("[kafka]\ncommit_interval = 1000\n", "kafka.commit_interval"),
            ("[shutdown]\ntimeout = \"0s\"\n", "shutdown.timeout"),
        ];
        for (text, key) in cases {
            let f = toml(text);
            let err = Config::load_with_env(Some(f.path()), env(&[])).unwrap_err().to_string();
            assert!(err.starts_with(&format!("{key}: ")), "{text:?} gave {err}");
        }
    }

    #[test]
    fn durations_take_units() {
        let f = toml("[kafka]\ncommit_interval = \"1m 30s\"\n[batch]\nmax_wait = \"250us\"\n");
        let cfg = Config::load_with_env(Some(f.path()), env(&[("TRIAGEM__SHUTDOWN__TIMEOUT", "2s")])).unwrap();
        assert_eq!(cfg.kafka.commit_interval, Duration::from_secs(90));
        assert_eq!(cfg.batch.max_wait, Duration::from_micros(250));
        assert_eq!(cfg.shutdown.timeout, Duration::from_secs(2));
    }

    #[test]
    fn sizes_take_units_or_bytes() {
        let f = toml("[kafka]\nmax_in_flight_bytes = \"16MiB\"\n");
        let cfg = Config::load_with_env(Some(f.path()), env(&[])).unwrap();
        assert_eq!(cfg.kafka.max_in_flight_bytes.as_u64(), 16 << 20);
        let f = toml("[kafka]\nmax_in_flight_bytes = 1000000\n");
        assert_eq!(
            Config::load_with_env(Some(f.path()), env(&[])).unwrap().kafka.max_in_flight_bytes.as_u64(),
            1_000_000
        );
        let cfg = Config::load_with_env(None, env(&[("TRIAGEM__KAFKA__MAX_IN_FLIGHT_BYTES", "16384")])).unwrap();
        assert_eq!(cfg.kafka.max_in_flight_bytes.as_u64(), 16384);
        let err = Config::load_with_env(None, env(&[("TRIAGEM__KAFKA__MAX_IN_FLIGHT_BYTES", "lots")])).unwrap_err();
        assert_eq!(
            err.to_string(),
            "kafka.max_in_flight_bytes: invalid value: string \"lots\", expected a size with its unit, e.g. \"64MiB\", \
             \"500KB\", or a number of bytes"
        );
        let f = toml("[kafka]\nmax_in_flight_bytes = 0\n");
        let err = Config::load_with_env(Some(f.path()), env(&[])).unwrap_err().to_string();
        assert!(err.contains("kafka.max_in_flight_bytes"), "{err}");
        println!("{err}");
    }

    #[test]
    fn millisecond_keys_name_their_replacement() {
        for (old, new) in MILLISECOND_KEYS {
            let (section, key) = old.split_once('.').unwrap();
            let f = toml(&format!("[{section}]\n{key} = 1500\n"));
            let err = Config::load_with_env(Some(f.path()), env(&[])).unwrap_err().to_string();
            assert_eq!(
                err,
                format!("{old}: renamed: write {new} = \"1500ms\" (a duration with its unit: 500ms, 2s, 1m)")
            );
        }
        let var = "TRIAGEM__KAFKA__UNASSIGNED_TIMEOUT_MS";
        let err = Config::load_with_env(None, env(&[(var, "2000")])).unwrap_err().to_string();
        assert!(
            err.starts_with("kafka.unassigned_timeout_ms: renamed: write kafka.unassigned_timeout = \"2000ms\""),
            "{err}"
        );
    }

    #[test]
    fn producer_durability_cannot_be_weakened() {
        for (table, key, value) in [
            ("producer", "acks", "1"),
            ("client", "acks", "0"),
            ("producer", "request.required.acks", "1"),
            ("producer", "enable.idempotence", "false"),
            ("client", "enable.idempotence", "false"),
        ] {
            let f = toml(&format!("[kafka.{table}]\n\"{key}\" = \"{value}\"\n"));
            let err = Config::load_with_env(Some(f.path()), env(&[])).unwrap_err().to_string();
            assert!(err.starts_with(&format!("kafka.{table}.{key}: ")), "{err}");
            assert!(err.contains("remove the key"), "{err}");
        }
        let f = toml("[kafka.producer]\nacks = \"all\"\n\"enable.idempotence\" = true\n");
        assert!(Config::load_with_env(Some(f.path()), env(&[])).is_ok());
        let err = Config::load_with_env(None, env(&[("TRIAGEM__KAFKA__PRODUCER__ACKS", "1")])).unwrap_err();
        assert!(err.to_string().starts_with("kafka.producer.acks: "), "{err}");
    }

    #[test]
    fn missing_file_is_an_error() {
        let err = Config::load_with_env(Some(Path::new("/nonexistent/triagem.toml")), env(&[])).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/triagem.toml"), "{err}");
    }

    #[test]
    fn client_passthrough_keeps_dotted_keys_and_redacts_secrets() {
        let f = toml(
            "[kafka.client]\n\"security.protocol\" = \"SASL_SSL\"\n\"sasl.password\" = \"hunter2\"\n\
             \"ssl.key.password\" = \"k\"\n\"sasl.oauthbearer.client.secret\" = \"s\"\n",
        );
        let cfg = Config::load_with_env(Some(f.path()), env(&[])).unwrap();
        assert_eq!(cfg.kafka.client.0["security.protocol"], "SASL_SSL");
        assert_eq!(cfg.kafka.client.0["sasl.password"], "hunter2");
        let shown = format!("{cfg:?}");
        assert!(shown.contains("SASL_SSL"), "{shown}");
        for secret in ["hunter2", "\"k\"", "\"s\""] {
            assert!(!shown.contains(secret), "{secret} leaked: {shown}");
        }
        assert!(is_secret("sasl.password") && is_secret("ssl.key.password") && is_secret("x.client.SECRET"));
        assert!(!is_secret("sasl.username"));
    }

    #[test]
    fn client_options_from_nested_tables_and_environment() {
        let f = toml("[kafka.client.sasl]\nmechanisms = \"PLAIN\"\n[kafka.producer]\n\"enable.idempotence\" = true\n\"batch.num.messages\" = 500\n");
        let cfg = Config::load_with_env(
            Some(f.path()),
            env(&[("TRIAGEM__KAFKA__CLIENT__SASL__USERNAME", "ana"), ("TRIAGEM__KAFKA__CLIENT__SASL__PASSWORD", "pw")]),
        )
        .unwrap();
        assert_eq!(cfg.kafka.client.0["sasl.mechanisms"], "PLAIN");
        assert_eq!(cfg.kafka.client.0["sasl.username"], "ana");
        assert_eq!(cfg.kafka.client.0["sasl.password"], "pw");
        assert_eq!(cfg.kafka.producer.0["enable.idempotence"], "true");
        assert_eq!(cfg.kafka.producer.0["batch.num.messages"], "500");
        assert!(!format!("{cfg:?}").contains("\"pw\""));
    }
}

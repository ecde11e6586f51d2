//! Decoding and validating one consumed message.
//!
//! A message is either [`Decoded`] (a text to classify plus the body to echo
//! back) or [`Poison`] (why it cannot be classified: the dead-letter reason).

use serde_json::{Map, Value};

pub use super::consume::Slot;
use crate::config::{InputConfig, InputFormat};

/// A consumed message, detached from librdkafka, carried through the pipeline
/// until its output is acknowledged.
#[derive(Debug, Clone, Default)]
pub struct Envelope {
    /// Input topic.
    pub topic: String,
    /// Input partition.
    pub partition: i32,
    /// Input offset: what the offset tracker acknowledges.
    pub offset: i64,
    /// Kafka key, copied to the output unchanged.
    pub key: Option<Vec<u8>>,
    /// Kafka headers, copied to the output unchanged (in order).
    pub headers: Vec<(String, Option<Vec<u8>>)>,
    /// Kafka timestamp (ms since the epoch), start of the end-to-end latency.
    pub timestamp_ms: Option<i64>,
    /// When the worker took it from the consumer, start of the worker's own latency.
    pub received: Option<std::time::Instant>,
    /// When its batch's forward pass began (end of its `queue` stage).
    pub forwarded: Option<std::time::Instant>,
    /// The raw value.
    pub payload: Option<Vec<u8>>,
    /// The partition's generation in the offset tracker when it was consumed.
    pub generation: u64,
}

/// A decoded message travelling to the model, holding its [`Slot`] of
/// `kafka.max_in_flight` and `kafka.max_in_flight_bytes` until its output is
/// acknowledged.
#[derive(Debug)]
pub struct Pending {
    /// Where it came from, key and headers.
    pub envelope: Envelope,
    /// Its text and body.
    pub decoded: Decoded,
    /// Its text's token ids: filled by the batcher, which tokenises each text once.
    pub ids: Vec<u32>,
    /// Released (dropped) when the output is acknowledged: the consume stage pauses when none is left.
    pub slot: Slot,
}

/// Why a message goes to the dead-letter topic. [`Poison::reason`] is the
/// `reason` label of `triagem_messages_dead_lettered_total`.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Poison {
    #[error("payload is {size} bytes, over input.max_bytes = {max}")]
    Oversize { size: usize, max: usize },
    #[error("payload is not valid UTF-8: {0}")]
    InvalidUtf8(String),
    #[error("payload is not a JSON object: {0}")]
    InvalidJson(String),
    #[error("JSON object has no field {0:?}")]
    MissingText(String),
    #[error("text is empty")]
    EmptyText,
    #[error("field {field:?} is a {kind}, not a string")]
    NonStringText { field: String, kind: &'static str },
    #[error("inference failed: {0}")]
    Inference(String),
    #[error("{0}")]
    OutputRejected(String),
}

impl Poison {
    /// Every value [`Poison::reason`] can return.
    pub const REASONS: [&'static str; 8] = [
        "oversize",
        "invalid_utf8",
        "invalid_json",
        "missing_text",
        "empty_text",
        "non_string_text",
        "inference_error",
        "output_rejected",
    ];

    /// The metric label and the start of the `triagem-error` header.
    pub fn reason(&self) -> &'static str {
        match self {
            Poison::Oversize { .. } => "oversize",
            Poison::InvalidUtf8(_) => "invalid_utf8",
            Poison::InvalidJson(_) => "invalid_json",
            Poison::MissingText(_) => "missing_text",
            Poison::EmptyText => "empty_text",
            Poison::NonStringText { .. } => "non_string_text",
            Poison::Inference(_) => "inference_error",
            Poison::OutputRejected(_) => "output_rejected",
        }
    }

    /// Value of the `triagem-error` header: `reason: explanation`.
    pub fn header(&self) -> String {
        format!("{}: {self}", self.reason())
    }
}

/// What is echoed back around the classification.
#[derive(Debug, Clone, PartialEq)]
pub enum Body {
    /// The input object, every field kept.
    Json(Map<String, Value>),
    /// Plain-text input.
    Text,
}

/// A message ready to classify.
#[derive(Debug, Clone)]
pub struct Decoded {
    /// The text the model reads.
    pub text: String,
    /// What the output is built from.
    pub body: Body,
}

/// Decodes and validates a payload: size, UTF-8, JSON object, text field.
pub fn decode(payload: Option<&[u8]>, cfg: &InputConfig) -> Result<Decoded, Poison> {
    let bytes = payload.unwrap_or_default();
    if bytes.len() > cfg.max_bytes {
        return Err(Poison::Oversize { size: bytes.len(), max: cfg.max_bytes });
    }
    let text = std::str::from_utf8(bytes).map_err(|e| Poison::InvalidUtf8(e.to_string()))?;
    match cfg.format {
        InputFormat::Text => {
            if text.trim().is_empty() {
                return Err(Poison::EmptyText);
            }
            Ok(Decoded { text: text.to_string(), body: Body::Text })
        }
        InputFormat::Json => {
            let value: Value = serde_json::from_str(text).map_err(|e| Poison::InvalidJson(e.to_string()))?;
            let Value::Object(object) = value else {
                return Err(Poison::InvalidJson(format!("found {}", kind(&value))));
            };
            let text = match object.get(&cfg.text_field) {
                None => return Err(Poison::MissingText(cfg.text_field.clone())),
                Some(Value::String(s)) if s.trim().is_empty() => return Err(Poison::EmptyText),
                Some(Value::String(s)) => s.clone(),
                Some(other) => return Err(Poison::NonStringText { field: cfg.text_field.clone(), kind: kind(other) }),
            };
            Ok(Decoded { text, body: Body::Json(object) })
        }
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_reason_is_listed_for_the_metrics() {
        let all = [
            Poison::Oversize { size: 2, max: 1 },
            Poison::InvalidUtf8(String::new()),
            Poison::InvalidJson(String::new()),
            Poison::MissingText(String::new()),
            Poison::EmptyText,
            Poison::NonStringText { field: String::new(), kind: "number" },
            Poison::Inference(String::new()),
            Poison::OutputRejected(String::new()),
        ];
        let reasons: Vec<&str> = all.iter().map(Poison::reason).collect();
        assert_eq!(reasons, Poison::REASONS);
    }

    use super::*;

    fn json_cfg() -> InputConfig {
        InputConfig { format: InputFormat::Json, text_field: "text".into(), max_bytes: 100 }
    }

    fn reason(payload: &[u8], cfg: &InputConfig) -> &'static str {
        decode(Some(payload), cfg).unwrap_err().reason()
    }

    #[test]
    fn valid_json_keeps_every_field() {
        let d = decode(Some(br#"{"text":"quero comprar","id":7,"canal":"whatsapp"}"#), &json_cfg()).unwrap();
        assert_eq!(d.text, "quero comprar");
        let Body::Json(map) = &d.body else { panic!("json body expected") };
        assert_eq!(map["id"], 7);
        assert_eq!(map["canal"], "whatsapp");
    }

    #[test]
    fn each_poison_kind_has_its_reason() {
        let cfg = json_cfg();
        assert_eq!(reason(b"{not json", &cfg), "invalid_json");
        assert_eq!(reason(b"[1,2]", &cfg), "invalid_json");
        assert_eq!(reason(b"\"just a string\"", &cfg), "invalid_json");
        assert_eq!(reason(br#"{"mensagem":"oi"}"#, &cfg), "missing_text");
        assert_eq!(reason(br#"{"text":""}"#, &cfg), "empty_text");
        assert_eq!(reason(br#"{"text":"   "}"#, &cfg), "empty_text");
        assert_eq!(reason(br#"{"text":42}"#, &cfg), "non_string_text");
        assert_eq!(reason(br#"{"text":null}"#, &cfg), "non_string_text");
        assert_eq!(reason(b"{\"text\":\"\xff\xfe\"}", &cfg), "invalid_utf8");
        assert_eq!(reason(&[b'a'; 101], &cfg), "oversize");
        assert_eq!(decode(None, &cfg).unwrap_err().reason(), "invalid_json");
        assert_eq!(Poison::Inference("x".into()).reason(), "inference_error");
    }

    #[test]
    fn oversize_is_checked_before_anything_else() {
        let mut payload = vec![0xffu8; 200];
        payload[0] = b'{';
        assert_eq!(reason(&payload, &json_cfg()), "oversize");
    }

    #[test]
    fn text_format() {
        let cfg = InputConfig { format: InputFormat::Text, ..json_cfg() };
        let d = decode(Some("meu pedido não chegou".as_bytes()), &cfg).unwrap();
        assert_eq!(d.text, "meu pedido não chegou");
        assert_eq!(d.body, Body::Text);
        assert_eq!(reason(b"  \n", &cfg), "empty_text");
        assert_eq!(reason(b"\xc3\x28", &cfg), "invalid_utf8");
        assert_eq!(decode(None, &cfg).unwrap_err().reason(), "empty_text");
    }
}

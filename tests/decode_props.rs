//! Property test of the worker's message path up to the output: any record a
//! broker could hand over (arbitrary bytes or JSON of any shape, any size
//! against `input.max_bytes`, any key, any set of headers) is detached from
//! librdkafka, decoded, and turned into exactly one of the two outputs —
//! routed (its body and headers kept, the classification added) or
//! dead-lettered with a reason from the metric's list — without a panic.
//!
//! The prediction is an arbitrary label and score drawn by the test: what is
//! checked here is the decoding and the rendering around any prediction, not
//! the model.

use proptest::prelude::*;
use rdkafka::message::{Header, OwnedHeaders, OwnedMessage, Timestamp};
use serde_json::{json, Map, Value};

use triagem::config::{InputConfig, InputFormat};
use triagem::model::{ModelInfo, Prediction};
use triagem::worker::consume::envelope;
use triagem::worker::message::{decode, Body, Poison};
use triagem::worker::route::{dead_letter_headers, output_headers, render_output, HEADER_ERROR};

/// A payload: raw bytes, a JSON value of any shape (an object with or without
/// the text field, which may be of any type), or UTF-8 text.
fn payload() -> impl Strategy<Value = Option<Vec<u8>>> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        ".{0,40}".prop_map(Value::String),
        "[ \t\n\r]{0,3}".prop_map(Value::String),
    ];
    let value = leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map("[a-z]{1,6}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect::<Map<_, _>>())),
        ]
    });
    let text = prop_oneof![value.clone(), "\\PC{1,40}".prop_map(Value::String), "\\s{0,3}".prop_map(Value::String)];
    let object_with_text =
        (prop::collection::btree_map("[a-z]{1,6}", value.clone(), 0..4), text).prop_map(|(fields, text)| {
            let mut m: Map<String, Value> = fields.into_iter().collect();
            m.insert("text".into(), text);
            serde_json::to_vec(&Value::Object(m)).unwrap()
        });
    prop_oneof![
        Just(None),
        prop::collection::vec(any::<u8>(), 0..600).prop_map(Some),
        value.prop_map(|v| Some(serde_json::to_vec(&v).unwrap())),
        object_with_text.prop_map(Some),
        "\\PC{0,200}".prop_map(|s| Some(s.into_bytes())),
        "\\s{0,4}".prop_map(|s| Some(s.into_bytes())),
    ]
}

/// Headers as librdkafka carries them: any name without NUL (its names are C
/// strings), repeats included, with a value or none.
fn headers() -> impl Strategy<Value = Vec<(String, Option<Vec<u8>>)>> {
    prop::collection::vec(("[^\\x00]{0,12}", prop::option::of(prop::collection::vec(any::<u8>(), 0..40))), 0..8)
}

fn config() -> impl Strategy<Value = InputConfig> {
    (prop_oneof![Just(InputFormat::Json), Just(InputFormat::Text)], 1usize..700)
        .prop_map(|(format, max_bytes)| InputConfig { format, text_field: "text".into(), max_bytes })
}

/// What the decoder must say about `payload`, written independently of it.
fn expected_reason(payload: Option<&[u8]>, cfg: &InputConfig) -> Option<&'static str> {
    let bytes = payload.unwrap_or_default();
    if bytes.len() > cfg.max_bytes {
        return Some("oversize");
    }
    let Ok(text) = std::str::from_utf8(bytes) else { return Some("invalid_utf8") };
    if cfg.format == InputFormat::Text {
        return text.trim().is_empty().then_some("empty_text");
    }
    match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(m)) => match m.get("text") {
            None => Some("missing_text"),
            Some(Value::String(s)) if s.trim().is_empty() => Some("empty_text"),
            Some(Value::String(_)) => None,
            Some(_) => Some("non_string_text"),
        },
        _ => Some("invalid_json"),
    }
}

fn model() -> ModelInfo {
    ModelInfo {
        name: "triagem".into(),
        version: "0123456789ab".into(),
        labels: vec!["suporte".into(), "venda".into()],
        path: "models/triagem".into(),
        max_len: 128,
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn every_record_is_routed_or_dead_lettered_with_a_reason(
        payload in payload(),
        key in prop::option::of(prop::collection::vec(any::<u8>(), 0..20)),
        headers in headers(),
        cfg in config(),
        partition in 0i32..64,
        offset in 0i64..i64::MAX,
        venda in any::<bool>(),
        score in 0.5f32..=1.0,
    ) {
        let mut kafka_headers = OwnedHeaders::new();
        for (name, value) in &headers {
            kafka_headers = kafka_headers.insert(Header { key: name.as_str(), value: value.as_deref() });
        }
        let message = OwnedMessage::new(
            payload.clone(),
            key.clone(),
            "atendimento.mensagens".into(),
            Timestamp::CreateTime(1_764_000_000_000),
            partition,
            offset,
            Some(kafka_headers),
        );

        // Detached from librdkafka with everything the output needs.
        let env = envelope(&message);
        prop_assert_eq!(&env.payload, &payload);
        prop_assert_eq!(&env.key, &key);
        prop_assert_eq!(&env.headers, &headers);
        prop_assert_eq!((env.partition, env.offset), (partition, offset));

        match decode(env.payload.as_deref(), &cfg) {
            Ok(decoded) => {
                prop_assert_eq!(expected_reason(payload.as_deref(), &cfg), None);
                prop_assert!(!decoded.text.trim().is_empty());
                let (label, other) = if venda { ("venda", "suporte") } else { ("suporte", "venda") };
                let prediction = Prediction {
                    label: label.into(),
                    score,
                    scores: vec![(label.into(), score), (other.into(), 1.0 - score)],
                };
                let (body, replaced) =
                    render_output(&decoded, &prediction, &model(), "triagem", "2026-11-29T00:00:00.000Z");
                let had_field = matches!(&decoded.body, Body::Json(input) if input.contains_key("triagem"));
                prop_assert_eq!(replaced, had_field, "an input's own field replaced without saying so");
                let Ok(Value::Object(out)) = serde_json::from_slice::<Value>(&body) else {
                    return Err(TestCaseError::fail("the output is not a JSON object"));
                };
                prop_assert_eq!(&out["triagem"]["label"], &json!(label));
                prop_assert_eq!(&out["text"], &json!(decoded.text));
                if let Body::Json(input) = &decoded.body {
                    for (field, value) in input.iter().filter(|(f, _)| f.as_str() != "triagem") {
                        prop_assert_eq!(&out[field], value, "input field {} changed", field);
                    }
                }
                let out_headers = output_headers(&env, &prediction);
                prop_assert_eq!(&out_headers[..headers.len()], &headers[..]);
                prop_assert!(out_headers.len() > headers.len());
            }
            Err(poison) => {
                prop_assert_eq!(Some(poison.reason()), expected_reason(payload.as_deref(), &cfg), "{}", poison);
                prop_assert!(Poison::REASONS.contains(&poison.reason()));
                let dl_headers = dead_letter_headers(&env, &poison);
                prop_assert_eq!(&dl_headers[..headers.len()], &headers[..]);
                let error = dl_headers[headers.len()..].iter().find(|(name, _)| name.as_str() == HEADER_ERROR);
                let error = error.and_then(|(_, v)| v.as_deref()).map(String::from_utf8_lossy).unwrap_or_default();
                prop_assert!(error.starts_with(&format!("{}: ", poison.reason())), "triagem-error header {:?}", error);
            }
        }
    }
}

//! What loadgen sends: the texts it reads, the JSON value of each message,
//! the poison mixed in, and the pacing of the sends.

use std::path::Path;
use std::time::Duration;

use super::LoadgenError;

/// When message `seq` is due, counted from the start of sending; `None` at
/// rate 0 (as fast as possible).
pub fn send_offset(seq: u64, rate: f64) -> Option<Duration> {
    (rate > 0.0).then(|| Duration::from_secs_f64(seq as f64 / rate))
}

/// The kinds of poison message, used in turn.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum PoisonKind {
    /// A JSON object cut short.
    InvalidJson,
    /// A JSON object without `text`.
    MissingText,
    /// Bytes that are not UTF-8 inside the text.
    InvalidUtf8,
}

/// Whether message `seq` is poison at `percent`, and which kind. Spread
/// evenly: exactly ⌊n·percent/100⌋ of the first n messages are poison
/// (percent to two decimals).
pub fn poison_kind(seq: u64, percent: f64) -> Option<PoisonKind> {
    let bp = (percent * 100.0).round().clamp(0.0, 10_000.0) as u128;
    let before = seq as u128 * bp / 10_000;
    let after = (seq as u128 + 1) * bp / 10_000;
    (after > before).then_some(match before % 3 {
        0 => PoisonKind::InvalidJson,
        1 => PoisonKind::MissingText,
        _ => PoisonKind::InvalidUtf8,
    })
}

/// The value of message `id`: `{"id": ..., "text": ...}`, or a poison variant.
pub fn payload(id: &str, text: &str, poison: Option<PoisonKind>) -> Vec<u8> {
    let valid = serde_json::json!({"id": id, "text": text}).to_string();
    match poison {
        None => valid.into_bytes(),
        Some(PoisonKind::InvalidJson) => valid.as_bytes()[..valid.len() - 1].to_vec(),
        Some(PoisonKind::MissingText) => serde_json::json!({"id": id, "mensagem": text}).to_string().into_bytes(),
        Some(PoisonKind::InvalidUtf8) => {
            let mut bytes = serde_json::json!({"id": id}).to_string().into_bytes();
            bytes.pop();
            bytes.extend_from_slice(b",\"text\":\"");
            bytes.extend_from_slice(text.as_bytes());
            bytes.extend_from_slice(&[0xC3, 0x28, 0xFF]);
            bytes.extend_from_slice(b"\"}");
            bytes
        }
    }
}

/// The texts of a JSONL file: the `prompt` field of each line (`text` when
/// there is no `prompt`).
pub fn read_texts(path: &Path) -> Result<Vec<String>, LoadgenError> {
    let rows = crate::data::read_jsonl::<crate::data::Row>(path).map_err(LoadgenError::Data)?;
    Ok(rows.into_iter().map(|(_, row)| row.prompt).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pacing_spreads_sends_over_time() {
        assert_eq!(send_offset(0, 100.0), Some(Duration::ZERO));
        assert_eq!(send_offset(50, 100.0), Some(Duration::from_millis(500)));
        assert_eq!(send_offset(1000, 1000.0), Some(Duration::from_secs(1)));
        assert_eq!(send_offset(3, 0.5), Some(Duration::from_secs(6)));
        assert_eq!(send_offset(10, 0.0), None);
    }

    #[test]
    fn poison_share_is_exact_and_kinds_rotate() {
        let kinds: Vec<_> = (0..1000).filter_map(|i| poison_kind(i, 10.0)).collect();
        assert_eq!(kinds.len(), 100);
        assert_eq!(&kinds[..3], &[PoisonKind::InvalidJson, PoisonKind::MissingText, PoisonKind::InvalidUtf8]);
        assert_eq!((0..1000).filter(|&i| poison_kind(i, 0.0).is_some()).count(), 0);
        assert_eq!((0..1000).filter(|&i| poison_kind(i, 100.0).is_some()).count(), 1000);
        assert_eq!((0..10_000).filter(|&i| poison_kind(i, 0.25).is_some()).count(), 25);
    }

    #[test]
    fn payloads() {
        let ok: serde_json::Value = serde_json::from_slice(&payload("r-1", "oi \"você\"", None)).unwrap();
        assert_eq!(ok, serde_json::json!({"id": "r-1", "text": "oi \"você\""}));
        assert!(
            serde_json::from_slice::<serde_json::Value>(&payload("r-1", "oi", Some(PoisonKind::InvalidJson))).is_err()
        );
        let missing: serde_json::Value =
            serde_json::from_slice(&payload("r-1", "oi", Some(PoisonKind::MissingText))).unwrap();
        assert!(missing.get("text").is_none());
        let bad = payload("r-1", "oi", Some(PoisonKind::InvalidUtf8));
        assert!(std::str::from_utf8(&bad).is_err());
        assert!(bad.starts_with(br#"{"id":"r-1","text":"oi"#));
    }

    #[test]
    fn texts_from_jsonl() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.jsonl");
        std::fs::write(&p, "{\"prompt\": \"a\", \"completion\": \"venda\"}\n\n{\"text\": \"b\"}\n").unwrap();
        assert_eq!(read_texts(&p).unwrap(), ["a", "b"]);
        std::fs::write(&p, "{\"x\": 1}\n").unwrap();
        let err = read_texts(&p).unwrap_err().to_string();
        assert!(err.starts_with(&format!("{}:1: ", p.display())) && err.contains("missing field `prompt`"), "{err}");
    }
}

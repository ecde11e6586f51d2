//! Labelled data sets in JSONL: one `{"prompt": "...", "completion": "label"}` per line.
//!
//! Every line is a [`Row`] (`#[derive(Deserialize)]`), read by [`read_jsonl`],
//! the one JSONL reader of the project (training, evaluation and loadgen's
//! texts). Empty lines are skipped. Anything else that is not such an object
//! is an error naming the file, the line and the field, never a silently
//! dropped example.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Deserialize;
use sha2::{Digest, Sha256};

/// One line of a JSONL data file, as read by every reader of the project's
/// data files (training, evaluation, loadgen's texts).
#[derive(Debug, Clone, Deserialize)]
#[serde(expecting = "a JSON object with \"prompt\" and \"completion\"")]
pub struct Row {
    /// The customer's message (`text` is accepted too, as in the worker's input).
    #[serde(alias = "text")]
    pub prompt: String,
    /// Its label; absent in a file of texts only (loadgen's input).
    #[serde(default)]
    pub completion: Option<String>,
}

/// One labelled message.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    /// The customer's message.
    pub text: String,
    /// Its label, as written in the file (trimmed).
    pub label: String,
}

/// Why a data file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}:{line}: {reason}")]
    Line { path: PathBuf, line: usize, reason: String },
    #[error("{path}: no examples (the file is empty)")]
    Empty { path: PathBuf },
    #[error("{path}: only one label ({label:?}); a classifier needs at least two")]
    OneLabel { path: PathBuf, label: String },
}

/// A data file's examples and where they came from.
#[derive(Debug, Clone)]
pub struct Dataset {
    /// The file it was read from.
    pub path: PathBuf,
    /// Examples in file order.
    pub examples: Vec<Example>,
    /// SHA-256 of the file's bytes, recorded in `metrics.json`.
    pub sha256: String,
}

impl Dataset {
    /// Reads `path`. With `known_labels`, a label outside it is an error naming the line.
    pub fn load(path: &Path, known_labels: Option<&[String]>) -> Result<Self, DataError> {
        let bytes = std::fs::read(path).map_err(|source| DataError::Read { path: path.into(), source })?;
        let sha256 = Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect();
        let text = utf8(path, bytes)?;
        let mut examples = Vec::new();
        for (line, row) in parse_jsonl::<Row>(path, &text)? {
            let example =
                example(row, known_labels).map_err(|reason| DataError::Line { path: path.into(), line, reason })?;
            examples.push(example);
        }
        Ok(Self { path: path.into(), examples, sha256 })
    }

    /// Distinct labels, sorted: the class order of a model trained on this set.
    pub fn labels(&self) -> Vec<String> {
        self.examples.iter().map(|e| e.label.clone()).collect::<BTreeSet<_>>().into_iter().collect()
    }

    /// Like [`Dataset::labels`], but an error when there are fewer than two.
    pub fn training_labels(&self) -> Result<Vec<String>, DataError> {
        let labels = self.labels();
        if labels.len() < 2 {
            return Err(DataError::OneLabel { path: self.path.clone(), label: labels.concat() });
        }
        Ok(labels)
    }
}

/// Reads a JSONL file: every line that is not blank parsed as one `T`, with its line number.
pub fn read_jsonl<T: DeserializeOwned>(path: &Path) -> Result<Vec<(usize, T)>, DataError> {
    let bytes = std::fs::read(path).map_err(|source| DataError::Read { path: path.into(), source })?;
    let text = utf8(path, bytes)?;
    parse_jsonl(path, &text)
}

/// The file's text, or an error naming the line of the first byte that is not UTF-8.
fn utf8(path: &Path, bytes: Vec<u8>) -> Result<String, DataError> {
    String::from_utf8(bytes).map_err(|e| {
        let line = 1 + e.as_bytes()[..e.utf8_error().valid_up_to()].iter().filter(|&&b| b == b'\n').count();
        DataError::Line { path: path.into(), line, reason: "invalid UTF-8".into() }
    })
}

/// [`read_jsonl`] on text already read. An error names the file, the line
/// and, for a value of the wrong type, the field (`serde_path_to_error`).
fn parse_jsonl<T: DeserializeOwned>(path: &Path, text: &str) -> Result<Vec<(usize, T)>, DataError> {
    let mut rows = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        if raw.trim().is_empty() {
            continue;
        }
        let line_error = |reason: String| DataError::Line { path: path.into(), line: i + 1, reason };
        let value: serde_json::Value =
            serde_json::from_str(raw).map_err(|e| line_error(format!("not valid JSON ({e})")))?;
        if !value.is_object() {
            // serde would read an array as the struct's fields in order. Named by its kind, not by
            // `T`'s fields: this reader serves data files and `--teacher-scores` alike.
            let kind = match value {
                serde_json::Value::Array(_) => "an array",
                serde_json::Value::String(_) => "a string",
                serde_json::Value::Number(_) => "a number",
                serde_json::Value::Bool(_) => "a boolean",
                _ => "null",
            };
            return Err(line_error(format!("expected a JSON object, not {kind}")));
        }
        let row = serde_path_to_error::deserialize(value).map_err(|e| {
            let field = e.path().to_string();
            line_error(if field == "." { e.inner().to_string() } else { format!("{field}: {}", e.inner()) })
        })?;
        rows.push((i + 1, row));
    }
    if rows.is_empty() {
        return Err(DataError::Empty { path: path.into() });
    }
    Ok(rows)
}

/// A labelled example from a row: text and label trimmed and not empty, the label one of `known_labels`.
fn example(row: Row, known_labels: Option<&[String]>) -> Result<Example, String> {
    let text = row.prompt.trim().to_string();
    let label = row.completion.ok_or("missing field `completion` (the label)")?.trim().to_string();
    if text.is_empty() {
        return Err("empty \"prompt\"".into());
    }
    if label.is_empty() {
        return Err("empty \"completion\" (the label)".into());
    }
    if let Some(known) = known_labels {
        if !known.contains(&label) {
            return Err(format!("unknown label {label:?} (the model knows {})", known.join(", ")));
        }
    }
    Ok(Example { text, label })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn file(content: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(content.as_bytes()).unwrap();
        f
    }

    #[test]
    fn reads_examples_and_skips_blank_lines() {
        let f = file("{\"prompt\": \" oi, quero comprar \", \"completion\": \"venda\"}\n\n{\"prompt\": \"quebrou\", \"completion\": \" suporte\"}\n");
        let ds = Dataset::load(f.path(), None).unwrap();
        assert_eq!(ds.examples.len(), 2);
        assert_eq!(ds.examples[0], Example { text: "oi, quero comprar".into(), label: "venda".into() });
        assert_eq!(ds.labels(), vec!["suporte".to_string(), "venda".to_string()]);
    }

    #[test]
    fn a_third_label_needs_no_code() {
        let f = file("{\"prompt\": \"a\", \"completion\": \"venda\"}\n{\"prompt\": \"b\", \"completion\": \"suporte\"}\n{\"prompt\": \"c\", \"completion\": \"financeiro\"}\n");
        assert_eq!(Dataset::load(f.path(), None).unwrap().labels().len(), 3);
    }

    #[test]
    fn each_bad_line_names_file_line_and_reason() {
        let cases = [
            ("{\"prompt\": \"x\", \"completion\": \"venda\"}\nnot json\n", 2, "not valid JSON"),
            ("{\"completion\": \"venda\"}\n", 1, "missing field `prompt`"),
            ("{\"prompt\": \"x\"}\n", 1, "missing field `completion`"),
            ("{\"prompt\": 3, \"completion\": \"venda\"}\n", 1, "prompt: invalid type: integer `3`, expected a string"),
            ("{\"prompt\": \"  \", \"completion\": \"venda\"}\n", 1, "empty \"prompt\""),
            ("\n\n{\"prompt\": \"x\", \"completion\": \"reclamacao\"}\n", 3, "unknown label \"reclamacao\""),
            ("[1, 2]\n", 1, "expected a JSON object, not an array"),
        ];
        let known = vec!["suporte".to_string(), "venda".to_string()];
        for (content, line, reason) in cases {
            let f = file(content);
            let err = Dataset::load(f.path(), Some(&known)).unwrap_err().to_string();
            let path = f.path().display().to_string();
            assert!(err.starts_with(&format!("{path}:{line}: ")), "{err}");
            assert!(err.contains(reason), "{err}");
        }
    }

    #[test]
    fn empty_and_missing_files_are_errors() {
        let f = file("\n\n");
        assert!(matches!(Dataset::load(f.path(), None), Err(DataError::Empty { .. })));
        assert!(matches!(Dataset::load(Path::new("/nonexistent/x.jsonl"), None), Err(DataError::Read { .. })));
    }
}

//! Saving a checkpoint: the Hugging Face files of a model directory (a
//! classifier, or the encoder `triagem pretrain` writes), each written whole
//! and renamed into place.

use std::path::Path;

use tokenizers::Tokenizer;

use super::base::Trainable;
use super::{write_error, TrainError};
use crate::model;

/// Writes `config.json`, `model.safetensors`, `tokenizer.json` and `tokenizer_config.json` to `out`.
pub(super) fn save(t: &Trainable, labels: &[String], out: &Path) -> Result<(), TrainError> {
    let mut config = t.config.clone();
    config.set_labels(labels);
    config.extra.insert("torch_dtype".into(), "float32".into());
    let json = serde_json::to_string_pretty(&config).expect("config serialises") + "\n";
    replace_file(&out.join(model::CONFIG_FILE), |p| std::fs::write(p, json).map_err(|e| e.to_string()))?;
    replace_file(&out.join(model::WEIGHTS_FILE), |p| t.varmap.save(p).map_err(|e| e.to_string()))?;
    save_tokenizer(t.encoder.tokenizer(), t.encoder.max_len(), out)
}

/// Writes `tokenizer.json` (without padding) and a `tokenizer_config.json` that lets
/// `AutoTokenizer.from_pretrained` load it as it is.
pub(super) fn save_tokenizer(tokenizer: &Tokenizer, max_len: usize, out: &Path) -> Result<(), TrainError> {
    let tokenizer = tokenizer.clone().with_padding(None).clone();
    replace_file(&out.join(model::TOKENIZER_FILE), |p| tokenizer.save(p, false).map_err(|e| e.to_string()))?;
    let tok_config = serde_json::json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": max_len,
        "cls_token": "[CLS]", "sep_token": "[SEP]", "pad_token": "[PAD]",
        "unk_token": "[UNK]", "mask_token": "[MASK]",
    });
    let json = serde_json::to_string_pretty(&tok_config).expect("json") + "\n";
    replace_file(&out.join("tokenizer_config.json"), |p| std::fs::write(p, json).map_err(|e| e.to_string()))
}

/// Writes `path` through a uniquely named temporary file in the same
/// directory, syncs it to disk and renames it into place
/// (`tempfile::NamedTempFile::persist`), so that a worker (re)starting during
/// a retrain into the directory it serves never reads a half-written file,
/// and two runs writing into one directory never share a temporary file.
pub(super) fn replace_file(path: &Path, write: impl FnOnce(&Path) -> Result<(), String>) -> Result<(), TrainError> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let mut builder = tempfile::Builder::new();
    builder.prefix(".triagem-").suffix(".tmp");
    let tmp = builder.tempfile_in(dir).map_err(|e| write_error(path, e))?;
    write(tmp.path()).map_err(|e| write_error(tmp.path(), e))?;
    // Readable by a worker running as another user, like a file written in place: set after the write,
    // since tempfile creates 0600 and a writer that replaces the file (the safetensors writer does) has its own.
    #[cfg(unix)]
    std::fs::set_permissions(tmp.path(), std::os::unix::fs::PermissionsExt::from_mode(0o644))
        .map_err(|e| write_error(tmp.path(), e))?;
    let file = std::fs::File::open(tmp.path()).map_err(|e| write_error(tmp.path(), e))?;
    file.sync_all().map_err(|e| write_error(tmp.path(), e))?;
    tmp.persist(path).map_err(|e| write_error(path, e.error))?;
    Ok(())
}

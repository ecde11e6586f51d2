//! Distillation: what a model learns from beside the labels — the teachers of
//! `--ensemble N` (N models trained first on the same split, each with its own
//! seed, `--jobs` at a time) and another model's scores of every training text
//! (`--teacher-scores`); their mean probabilities at `--distill-temperature`
//! are the soft targets of [`super::fit`]'s loss.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use rand::{rngs::StdRng, SeedableRng};

use super::{beside, fit, jobs, one_of, side_by_side, write_error, Run, TrainError, TrainOptions};
use crate::data::{DataError, Example};
use crate::model::{softmax, Classifier};

/// Where the teachers of an ensemble are written while the model trains.
pub(super) fn teachers_dir(out: &Path) -> PathBuf {
    beside(out, ".teachers")
}

/// Trains `opts.ensemble` teachers on the same split, each with its own seed (`opts.jobs` at a
/// time), and loads them.
pub(super) fn train_teachers(
    opts: &TrainOptions,
    labels: &[String],
    train: &[Example],
    dev: &[Example],
) -> Result<Vec<Classifier>, TrainError> {
    let dirs = jobs::each(opts.jobs, opts.ensemble, |k| {
        let seed = opts.seed.wrapping_add(k as u64 + 1);
        let out = teachers_dir(&opts.out).join(format!("seed-{seed}"));
        std::fs::create_dir_all(&out).map_err(|e| write_error(&out, e))?;
        let teacher_opts = TrainOptions { seed, out: out.clone(), ensemble: 0, teacher_scores: None, ..one_of(opts) };
        eprintln!("teacher {}/{} (seed {seed})", k + 1, opts.ensemble);
        let run =
            Run { name: side_by_side(opts).then(|| format!("teacher {}/{}", k + 1, opts.ensemble)), ..Run::default() };
        let mut rng = StdRng::seed_from_u64(seed);
        fit(&teacher_opts, labels, train, dev, &Teachers::default(), run, &mut rng)?;
        Ok(out)
    })?;
    dirs.iter().map(|dir| Ok(Classifier::load_tensor_path(dir, &opts.device)?)).collect()
}

/// What the model learns soft targets from, beside the labels.
#[derive(Default)]
pub(super) struct Teachers {
    /// Models trained first (`--ensemble`), which score each (augmented) text.
    pub(super) models: Vec<Classifier>,
    /// Another model's probabilities of each training text (`--teacher-scores`), in label order.
    pub(super) scores: Option<HashMap<String, Vec<f32>>>,
}

impl Teachers {
    /// The teachers' mean probabilities at `temperature`, row after row, for
    /// the augmented `texts` of the training texts `originals`; `None` without teachers.
    pub(super) fn soft_targets(
        &self,
        texts: &[String],
        originals: &[&str],
        temperature: f64,
    ) -> Result<Option<Vec<f32>>, TrainError> {
        let count = self.models.len() + usize::from(self.scores.is_some());
        if count == 0 {
            return Ok(None);
        }
        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        let mut mean: Vec<f32> = Vec::new();
        let mut add = |flat: Vec<f32>| {
            if mean.is_empty() {
                mean = vec![0.0; flat.len()];
            }
            for (m, p) in mean.iter_mut().zip(flat) {
                *m += p / count as f32;
            }
        };
        for teacher in &self.models {
            let logits = teacher.logits(&refs)?;
            add(logits.iter().flat_map(|row| softmax(row, temperature)).collect());
        }
        if let Some(scores) = &self.scores {
            // Read as logits (log-probabilities), so that the temperature applies as to a model's.
            add(originals
                .iter()
                .flat_map(|t| {
                    let logits: Vec<f32> = scores[*t].iter().map(|p| p.max(1e-7).ln()).collect();
                    softmax(&logits, temperature)
                })
                .collect());
        }
        Ok(Some(mean))
    }
}

/// `--teacher-scores`: one JSON object a line, `{"prompt": text, "scores":
/// {label: probability, …}}`, with every label and every training text (read
/// by [`crate::data::read_jsonl`]; texts trimmed, as the training file's are).
pub(super) fn read_teacher_scores(
    path: &Path,
    labels: &[String],
    train: &[Example],
) -> Result<HashMap<String, Vec<f32>>, TrainError> {
    #[derive(serde::Deserialize)]
    struct Line {
        prompt: String,
        scores: HashMap<String, f64>,
    }
    let bad = |reason: String| TrainError::TeacherScores { path: path.to_path_buf(), reason };
    let lines = crate::data::read_jsonl::<Line>(path).map_err(|e| match e {
        DataError::Line { line, reason, .. } => bad(format!("line {line}: {reason}")),
        DataError::Read { source, .. } => bad(source.to_string()),
        DataError::Empty { .. } => bad("the file is empty".into()),
        other => bad(other.to_string()),
    })?;
    let mut scores = HashMap::new();
    for (n, line) in lines {
        let at = |reason: String| bad(format!("line {n}: {reason}"));
        let row = labels
            .iter()
            .map(|l| match line.scores.get(l) {
                Some(&p) if (0.0..=1.0).contains(&p) => Ok(p as f32),
                Some(p) => Err(at(format!("the score of {l:?} is {p}; it must be in [0, 1]"))),
                None => Err(at(format!("no score for the label {l:?}"))),
            })
            .collect::<Result<Vec<f32>, _>>()?;
        scores.insert(line.prompt.trim().to_string(), row);
    }
    if let Some(missing) = train.iter().find(|e| !scores.contains_key(&e.text)) {
        return Err(bad(format!("no scores for the training text {:?}", missing.text)));
    }
    Ok(scores)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::tests::examples;

    #[test]
    fn teacher_scores_are_read_by_label_and_cover_every_training_text() {
        let dir = tempfile::tempdir().unwrap();
        let labels = vec!["suporte".to_string(), "venda".to_string()];
        let write = |lines: &[&str]| {
            let path = dir.path().join("scores.jsonl");
            std::fs::write(&path, lines.join("\n")).unwrap();
            path
        };
        let line = |text: &str, venda: f64| {
            format!(r#"{{"prompt": "{text}", "scores": {{"venda": {venda}, "suporte": {}}}}}"#, 1.0 - venda)
        };
        // The training file's texts are trimmed when read; a scores file's are too.
        let all: Vec<String> = examples().iter().map(|e| line(&format!(" {} ", e.text), 0.75)).collect();
        let refs: Vec<&str> = all.iter().map(String::as_str).collect();
        let scores = read_teacher_scores(&write(&refs), &labels, &examples()).unwrap();
        assert_eq!(scores["quero comprar uma geladeira"], [0.25, 0.75], "in label order");

        let err = |lines: &[&str]| read_teacher_scores(&write(lines), &labels, &examples()).unwrap_err().to_string();
        assert!(err(&refs[..3]).contains("no scores for the training text \"o fogão veio com defeito\""));
        let out_of_range = r#"{"prompt": "x", "scores": {"venda": 1.5, "suporte": 0.5}}"#;
        assert!(err(&[out_of_range]).contains("line 1: the score of \"venda\" is 1.5"), "{}", err(&[out_of_range]));
        assert!(err(&[r#"{"prompt": "x", "scores": {"venda": 1.0}}"#])
            .contains("line 1: no score for the label \"suporte\""));
        assert!(err(&["not json"]).starts_with("--teacher-scores "));

        // As one more teacher: its probabilities at temperature 1, flatter at 2, averaged with the others.
        let teachers = Teachers { models: Vec::new(), scores: Some(scores) };
        let texts = vec!["qero comprar uma geladera".to_string()]; // augmented: scored by its original
        let soft = |t: f64| teachers.soft_targets(&texts, &["quero comprar uma geladeira"], t).unwrap().unwrap();
        assert!((soft(1.0)[1] - 0.75).abs() < 1e-6);
        let flat = soft(2.0)[1];
        assert!(flat > 0.5 && flat < 0.75 && (flat - 3f32.sqrt() / (1.0 + 3f32.sqrt())).abs() < 1e-6, "{flat}");
        assert!(Teachers::default().soft_targets(&texts, &["x"], 1.0).unwrap().is_none());
    }
}

//! Scores a classifier on a labelled data set: accuracy, per-label
//! precision/recall/F1/support, macro-F1, the confusion matrix and the
//! mistakes the model was most sure of.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use crate::data::Example;
use crate::model::{Classifier, ModelError, Prediction};

/// Precision, recall and F1 of one label.
#[derive(Debug, Clone, Serialize)]
pub struct LabelStats {
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
    /// Examples whose true label this is.
    pub support: usize,
}

/// A wrong prediction, for the "worst mistakes" list.
#[derive(Debug, Clone, Serialize)]
pub struct Mistake {
    pub text: String,
    pub label: String,
    pub predicted: String,
    pub score: f32,
}

/// Rows are true labels, columns predicted labels, both in `labels` order.
#[derive(Debug, Clone, Serialize)]
pub struct Confusion {
    pub labels: Vec<String>,
    pub matrix: Vec<Vec<usize>>,
}

/// Everything `triagem eval` reports.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub examples: usize,
    pub accuracy: f64,
    pub macro_f1: f64,
    pub per_label: BTreeMap<String, LabelStats>,
    pub confusion: Confusion,
    /// Wrong predictions, most confident first (at most 10).
    pub mistakes: Vec<Mistake>,
}

/// Predicts `examples` in batches of `batch_size` (shortest texts together, to pad less).
pub fn predict_all(
    classifier: &Classifier,
    texts: &[&str],
    batch_size: usize,
    mut on_batch: impl FnMut(usize),
) -> Result<Vec<Prediction>, ModelError> {
    let mut order: Vec<usize> = (0..texts.len()).collect();
    order.sort_by_key(|&i| texts[i].len());
    let mut out: Vec<Option<Prediction>> = vec![None; texts.len()];
    for chunk in order.chunks(batch_size.max(1)) {
        let batch: Vec<&str> = chunk.iter().map(|&i| texts[i]).collect();
        for (&i, p) in chunk.iter().zip(classifier.predict(&batch)?) {
            out[i] = Some(p);
        }
        on_batch(chunk.len());
    }
    Ok(out.into_iter().map(|p| p.expect("every index is predicted once")).collect())
}

/// Runs the classifier over `examples` and scores it.
pub fn evaluate(classifier: &Classifier, examples: &[Example], batch_size: usize) -> Result<Report, ModelError> {
    let texts: Vec<&str> = examples.iter().map(|e| e.text.as_str()).collect();
    let predictions = predict_all(classifier, &texts, batch_size, |_| {})?;
    Ok(Report::new(classifier.labels(), examples, &predictions))
}

impl Report {
    /// Scores `predictions` against the labels of `examples`.
    pub fn new(labels: &[String], examples: &[Example], predictions: &[Prediction]) -> Self {
        let index = |l: &str| labels.iter().position(|x| x == l);
        let n = labels.len();
        let mut matrix = vec![vec![0usize; n]; n];
        let mut mistakes = Vec::new();
        for (ex, p) in examples.iter().zip(predictions) {
            if let (Some(t), Some(q)) = (index(&ex.label), index(&p.label)) {
                matrix[t][q] += 1;
            }
            if ex.label != p.label {
                mistakes.push(Mistake {
                    text: ex.text.clone(),
                    label: ex.label.clone(),
                    predicted: p.label.clone(),
                    score: p.score,
                });
            }
        }
        mistakes.sort_by(|a, b| b.score.total_cmp(&a.score));
        mistakes.truncate(10);
        let ratio = |a: usize, b: usize| if b == 0 { 0.0 } else { a as f64 / b as f64 };
        let per_label: BTreeMap<String, LabelStats> = labels
            .iter()
            .enumerate()
            .map(|(i, l)| {
                let tp = matrix[i][i];
                let support: usize = matrix[i].iter().sum();
                let predicted: usize = matrix.iter().map(|row| row[i]).sum();
                let (precision, recall) = (ratio(tp, predicted), ratio(tp, support));
                let f1 = if precision + recall == 0.0 { 0.0 } else { 2.0 * precision * recall / (precision + recall) };
                (l.clone(), LabelStats { precision, recall, f1, support })
            })
            .collect();
        let correct: usize = (0..n).map(|i| matrix[i][i]).sum();
        Report {
            examples: examples.len(),
            accuracy: ratio(correct, examples.len()),
            macro_f1: per_label.values().map(|s| s.f1).sum::<f64>() / n.max(1) as f64,
            per_label,
            confusion: Confusion { labels: labels.to_vec(), matrix },
            mistakes,
        }
    }

    /// The human-readable report printed by `triagem eval`.
    pub fn render(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "examples  {}\naccuracy  {:.4}\nmacro-F1  {:.4}\n",
            self.examples, self.accuracy, self.macro_f1
        );
        let _ = writeln!(s, "{:<14} {:>9} {:>9} {:>9} {:>9}", "label", "precision", "recall", "f1", "support");
        for (label, st) in &self.per_label {
            let _ =
                writeln!(s, "{label:<14} {:>9.4} {:>9.4} {:>9.4} {:>9}", st.precision, st.recall, st.f1, st.support);
        }
        let _ = writeln!(s, "\nconfusion (rows: true, columns: predicted)");
        let _ = write!(s, "{:<14}", "");
        for l in &self.confusion.labels {
            let _ = write!(s, " {l:>9}");
        }
        for (l, row) in self.confusion.labels.iter().zip(&self.confusion.matrix) {
            let _ = write!(s, "\n{l:<14}");
            for c in row {
                let _ = write!(s, " {c:>9}");
            }
        }
        if !self.mistakes.is_empty() {
            let _ = writeln!(s, "\n\nworst mistakes (most confident first)");
            for m in &self.mistakes {
                let _ = writeln!(s, "  {:.3} {} → {}  {}", m.score, m.label, m.predicted, m.text);
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pred(label: &str, score: f32) -> Prediction {
        Prediction { label: label.into(), score, scores: vec![] }
    }

    #[test]
    fn scores_a_known_confusion() {
        let labels = vec!["suporte".to_string(), "venda".to_string()];
        let ex = |t: &str, l: &str| Example { text: t.into(), label: l.into() };
        let examples = [ex("a", "venda"), ex("b", "venda"), ex("c", "suporte"), ex("d", "suporte")];
        let preds = [pred("venda", 0.9), pred("suporte", 0.8), pred("suporte", 0.7), pred("suporte", 0.6)];
        let r = Report::new(&labels, &examples, &preds);
        assert_eq!(r.confusion.matrix, vec![vec![2, 0], vec![1, 1]]);
        assert!((r.accuracy - 0.75).abs() < 1e-9);
        let s = &r.per_label["suporte"];
        assert!((s.precision - 2.0 / 3.0).abs() < 1e-9 && (s.recall - 1.0).abs() < 1e-9);
        let v = &r.per_label["venda"];
        assert!((v.precision - 1.0).abs() < 1e-9 && (v.recall - 0.5).abs() < 1e-9);
        assert!((r.macro_f1 - (0.8 + 2.0 / 3.0) / 2.0).abs() < 1e-9);
        assert_eq!(r.mistakes.len(), 1);
        assert_eq!(r.mistakes[0].text, "b");
    }
}

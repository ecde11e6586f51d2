//! Scores a classifier on a labelled data set: accuracy, per-label
//! precision/recall/F1/support, macro-F1, the confusion matrix, the
//! mistakes the model was most sure of, and how far its scores can be
//! trusted: expected calibration error (with the reliability table it sums),
//! how well the score tells the errors from the rest (the area under its ROC
//! curve as an error detector) and, per review threshold, the share of
//! messages a `routing.min_confidence` sends to review and the share of the
//! errors among them.

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

/// Equal-width confidence bins of the expected calibration error.
pub const ECE_BINS: usize = 10;

/// The `routing.min_confidence` values the review curve is reported for.
pub const REVIEW_THRESHOLDS: [f32; 12] = [0.6, 0.7, 0.8, 0.85, 0.9, 0.92, 0.94, 0.95, 0.96, 0.97, 0.98, 0.99];

/// What one review threshold does on a data set.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ReviewPoint {
    /// The threshold: messages scored below it go to review.
    pub min_confidence: f32,
    /// Share of all messages sent to review.
    pub sent_to_review: f64,
    /// Share of the wrong predictions that are among them (0 when there are no errors).
    pub errors_caught: f64,
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
    /// Expected calibration error of the top score over [`ECE_BINS`] equal-width bins.
    pub ece: f64,
    /// The bins behind it: per non-empty bin, the mean top score against the accuracy.
    pub reliability: Vec<ReliabilityBin>,
    /// How well the top score tells the errors from the right predictions, whatever the threshold
    /// ([`error_detection_auroc`]); `None` (null) unless there are both.
    pub error_auroc: Option<f64>,
    /// Review share and errors caught for each of [`REVIEW_THRESHOLDS`].
    pub review: Vec<ReviewPoint>,
}

/// One equal-width confidence bin of the reliability table.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ReliabilityBin {
    /// The bin holds the top scores in (`lower`, `upper`] (the first bin also 0).
    pub lower: f32,
    pub upper: f32,
    /// Examples whose top score falls in it.
    pub examples: usize,
    /// Their mean top score: what the model claims.
    pub mean_confidence: f64,
    /// The share of them predicted right: what it gets.
    pub accuracy: f64,
}

/// The reliability table: the examples put in `bins` equal-width bins of
/// their top score over (0, 1], and for each non-empty bin the mean score
/// against the accuracy (a calibrated model has the two equal in every bin).
pub fn reliability(confidences: &[f32], correct: &[bool], bins: usize) -> Vec<ReliabilityBin> {
    let mut count = vec![0usize; bins];
    let mut hits = vec![0usize; bins];
    let mut conf_sum = vec![0f64; bins];
    for (&c, &ok) in confidences.iter().zip(correct) {
        // Bin b holds (b/bins, (b+1)/bins]; 0 goes to the first bin.
        let b = ((c * bins as f32).ceil() as usize).clamp(1, bins) - 1;
        count[b] += 1;
        hits[b] += ok as usize;
        conf_sum[b] += c as f64;
    }
    (0..bins)
        .filter(|&b| count[b] > 0)
        .map(|b| ReliabilityBin {
            lower: b as f32 / bins as f32,
            upper: (b + 1) as f32 / bins as f32,
            examples: count[b],
            mean_confidence: conf_sum[b] / count[b] as f64,
            accuracy: hits[b] as f64 / count[b] as f64,
        })
        .collect()
}

/// Expected calibration error over a [`reliability`] table: the sum over
/// its bins of the bin's share of the examples times |its accuracy − its
/// mean confidence|.
pub fn calibration_error(table: &[ReliabilityBin]) -> f64 {
    let n: usize = table.iter().map(|b| b.examples).sum();
    if n == 0 {
        return 0.0;
    }
    table.iter().map(|b| (b.examples as f64 / n as f64) * (b.accuracy - b.mean_confidence).abs()).sum()
}

/// Expected calibration error of `confidences` over `bins` equal-width bins
/// (see [`reliability`] and [`calibration_error`]).
pub fn expected_calibration_error(confidences: &[f32], correct: &[bool], bins: usize) -> f64 {
    calibration_error(&reliability(confidences, correct, bins))
}

/// For each threshold: the share of examples scored below it, and the share of the wrong ones among those.
pub fn review_curve(confidences: &[f32], correct: &[bool], thresholds: &[f32]) -> Vec<ReviewPoint> {
    let n = confidences.len();
    let errors = correct.iter().filter(|&&ok| !ok).count();
    let ratio = |a: usize, b: usize| if b == 0 { 0.0 } else { a as f64 / b as f64 };
    thresholds
        .iter()
        .map(|&t| {
            let sent = confidences.iter().filter(|&&c| c < t).count();
            let caught = confidences.iter().zip(correct).filter(|&(&c, &ok)| c < t && !ok).count();
            ReviewPoint { min_confidence: t, sent_to_review: ratio(sent, n), errors_caught: ratio(caught, errors) }
        })
        .collect()
}

/// The area under the ROC curve of the top score as a detector of errors: the probability that a
/// wrong prediction drawn at random scores below a right one drawn at random, ties counting half
/// (the Mann–Whitney statistic). 1: every error scores below every right prediction, so one
/// threshold sends the errors to review and nothing else; 0.5: the score says nothing of which are
/// wrong. `None` unless there are both errors and right predictions.
pub fn error_detection_auroc(confidences: &[f32], correct: &[bool]) -> Option<f64> {
    let errors = correct.iter().filter(|&&ok| !ok).count();
    let rights = correct.len() - errors;
    if errors == 0 || rights == 0 {
        return None;
    }
    let mut order: Vec<usize> = (0..confidences.len()).collect();
    order.sort_by(|&a, &b| confidences[a].total_cmp(&confidences[b]));
    // Ascending, a run of equal scores at a time: each right prediction counts the errors below it
    // and half of those tied with it.
    let (mut below, mut pairs) = (0usize, 0f64);
    for run in order.chunk_by(|&a, &b| confidences[a] == confidences[b]) {
        let wrong = run.iter().filter(|&&i| !correct[i]).count();
        pairs += (run.len() - wrong) as f64 * (below as f64 + wrong as f64 / 2.0);
        below += wrong;
    }
    Some(pairs / (errors as f64 * rights as f64))
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
        let confidences: Vec<f32> = predictions.iter().map(|p| p.score).collect();
        let right: Vec<bool> = examples.iter().zip(predictions).map(|(e, p)| e.label == p.label).collect();
        let reliability = reliability(&confidences, &right, ECE_BINS);
        Report {
            examples: examples.len(),
            accuracy: ratio(correct, examples.len()),
            macro_f1: per_label.values().map(|s| s.f1).sum::<f64>() / n.max(1) as f64,
            per_label,
            confusion: Confusion { labels: labels.to_vec(), matrix },
            mistakes,
            ece: calibration_error(&reliability),
            reliability,
            error_auroc: error_detection_auroc(&confidences, &right),
            review: review_curve(&confidences, &right, &REVIEW_THRESHOLDS),
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
        let errors =
            self.examples - (0..self.confusion.labels.len()).map(|i| self.confusion.matrix[i][i]).sum::<usize>();
        let _ = writeln!(s, "\n\nexpected calibration error ({ECE_BINS} bins)  {:.4}", self.ece);
        let _ = writeln!(s, "reliability (top score bin: examples, mean score, accuracy)");
        for b in &self.reliability {
            let _ = writeln!(
                s,
                "  ({:.1}, {:.1}]  {:>6}  {:.4}  {:.4}",
                b.lower, b.upper, b.examples, b.mean_confidence, b.accuracy
            );
        }
        let auroc =
            self.error_auroc.map_or("n/a (needs errors and right predictions)".to_string(), |a| format!("{a:.4}"));
        let _ = writeln!(s, "error detection AUROC (an error scored below a right prediction)  {auroc}");
        let _ = writeln!(
            s,
            "review threshold (routing.min_confidence): share sent to review, share of the {errors} errors caught"
        );
        for p in &self.review {
            let _ = writeln!(
                s,
                "  < {:.2}  {:>6.1} %  {:>6.1} %",
                p.min_confidence,
                100.0 * p.sent_to_review,
                100.0 * p.errors_caught
            );
        }
        if !self.mistakes.is_empty() {
            let _ = writeln!(s, "\nworst mistakes (most confident first)");
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

    /// The report of examples all labelled `venda`, predicted right (`venda`) or wrong (`suporte`) at
    /// the given scores.
    fn report_of(conf: &[f32], right: &[bool]) -> Report {
        let labels = vec!["suporte".to_string(), "venda".to_string()];
        let examples: Vec<Example> =
            right.iter().map(|_| Example { text: "t".into(), label: "venda".into() }).collect();
        let preds: Vec<Prediction> =
            conf.iter().zip(right).map(|(&c, &ok)| pred(if ok { "venda" } else { "suporte" }, c)).collect();
        Report::new(&labels, &examples, &preds)
    }

    #[test]
    fn scores_a_known_confusion() {
        let labels = vec!["suporte".to_string(), "venda".to_string()];
        let ex = |t: &str, l: &str| Example { text: t.into(), label: l.into() };
        let examples = [ex("a", "venda"), ex("b", "venda"), ex("c", "suporte"), ex("d", "suporte")];
        let preds = [pred("venda", 0.92), pred("suporte", 0.84), pred("suporte", 0.72), pred("suporte", 0.61)];
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
        // One example in each of four bins: |1-0.92| + |0-0.84| + |1-0.72| + |1-0.61|, over 4.
        assert!((r.ece - (0.08 + 0.84 + 0.28 + 0.39) / 4.0).abs() < 1e-6, "{}", r.ece);
        let at = |t: f32| r.review.iter().find(|p| p.min_confidence == t).unwrap().clone();
        assert_eq!((at(0.7).sent_to_review, at(0.7).errors_caught), (0.25, 0.0));
        assert_eq!((at(0.85).sent_to_review, at(0.85).errors_caught), (0.75, 1.0));
    }

    #[test]
    fn the_reliability_table_is_what_the_calibration_error_sums() {
        // Five examples in (0.9, 1.0], four right; two in (0.6, 0.7], one right; none elsewhere.
        let conf = [0.95, 0.99, 0.91, 1.0, 0.95, 0.65, 0.7];
        let right = [true, true, false, true, true, true, false];
        let table = reliability(&conf, &right, 10);
        assert_eq!(table.len(), 2, "{table:?}");
        let (low, high) = (&table[0], &table[1]);
        assert_eq!((low.lower, low.upper, low.examples), (0.6, 0.7, 2));
        assert_eq!((high.lower, high.upper, high.examples), (0.9, 1.0, 5));
        assert!((low.mean_confidence - 0.675).abs() < 1e-6 && (low.accuracy - 0.5).abs() < 1e-12);
        assert!((high.mean_confidence - 0.96).abs() < 1e-6 && (high.accuracy - 0.8).abs() < 1e-12);
        let want = (2.0 / 7.0) * (0.675 - 0.5) + (5.0 / 7.0) * (0.96 - 0.8);
        assert!((calibration_error(&table) - want).abs() < 1e-6);
        assert!((expected_calibration_error(&conf, &right, 10) - want).abs() < 1e-6);
        // The report carries the same table, and prints a line per bin.
        let r = report_of(&conf, &right);
        assert_eq!(r.reliability, table);
        assert!((r.ece - want).abs() < 1e-6);
        let text = r.render();
        assert!(text.contains("  (0.9, 1.0]       5  0.9600  0.8000"), "{text}");
        assert!(text.contains("  (0.6, 0.7]       2  0.6750  0.5000"), "{text}");
    }

    #[test]
    fn ece_is_zero_when_confidence_matches_accuracy() {
        // Ten at 0.8 with eight right, ten at 1.0 all right.
        let mut conf = vec![0.8f32; 10];
        conf.extend([1.0f32; 10]);
        let mut right = vec![true; 8];
        right.extend([false; 2]);
        right.extend([true; 10]);
        assert!(expected_calibration_error(&conf, &right, 10) < 1e-6);
        // Over-confident: all at 0.99, half right: |0.5 - 0.99|.
        let ece = expected_calibration_error(&[0.99; 4], &[true, false, true, false], 10);
        assert!((ece - 0.49).abs() < 1e-6, "{ece}");
        // Boundaries: 0.6 belongs to (0.5, 0.6], 0 to the first bin; nothing is lost.
        let ece = expected_calibration_error(&[0.6, 0.0], &[true, true], 10);
        assert!((ece - (0.5 * 0.4 + 0.5 * 1.0)).abs() < 1e-6, "{ece}");
        assert_eq!(expected_calibration_error(&[], &[], 10), 0.0);
    }

    #[test]
    fn error_auroc_is_the_share_of_error_right_pairs_in_order() {
        // Errors at 0.5, 0.7, 0.99; right at 0.7, 0.9. Right 0.7: 0.5 below, 0.7 tied (half) = 1.5;
        // right 0.9: 0.5 and 0.7 below = 2. Of 3 × 2 pairs.
        let conf = [0.9f32, 0.5, 0.7, 0.99, 0.7];
        let right = [true, false, true, false, false];
        assert!((error_detection_auroc(&conf, &right).unwrap() - 3.5 / 6.0).abs() < 1e-12);
        assert_eq!(error_detection_auroc(&[0.1, 0.2, 0.8, 0.9], &[false, false, true, true]), Some(1.0));
        assert_eq!(error_detection_auroc(&[0.9, 0.8, 0.2], &[false, true, true]), Some(0.0));
        assert_eq!(error_detection_auroc(&[0.7, 0.7], &[false, true]), Some(0.5));
        assert_eq!(error_detection_auroc(&[0.7, 0.9], &[true, true]), None);
        assert_eq!(error_detection_auroc(&[0.7], &[false]), None);
        // In the report, and printed.
        let r = report_of(&conf, &right);
        assert_eq!(r.error_auroc, error_detection_auroc(&conf, &right));
        assert!(r.render().contains("error detection AUROC (an error scored below a right prediction)  0.5833"));
    }

    #[test]
    fn review_curve_counts_strictly_below_the_threshold() {
        let conf = [0.5f32, 0.7, 0.7, 0.9, 0.99];
        let right = [false, true, false, true, false];
        let curve = review_curve(&conf, &right, &[0.5, 0.7, 0.71, 1.0]);
        let got: Vec<(f64, f64)> = curve.iter().map(|p| (p.sent_to_review, p.errors_caught)).collect();
        assert_eq!(got, vec![(0.0, 0.0), (0.2, 1.0 / 3.0), (0.6, 2.0 / 3.0), (1.0, 1.0)]);
        // No errors: nothing to catch, reported as 0, never NaN.
        let curve = review_curve(&[0.6], &[true], &[0.9]);
        assert_eq!((curve[0].sent_to_review, curve[0].errors_caught), (1.0, 0.0));
    }
}

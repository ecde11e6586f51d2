//! `--confidence-ranking`: the Correctness Ranking Loss of Moon, Kim, Shin
//! and Hwang (2020, "Confidence-Aware Learning for Deep Neural Networks").
//! While a model trains, each training example keeps the number of epochs in
//! which the model got it right when it saw it; in each batch every example is
//! paired with the next one (the last with the first), and the loss asks that
//! of the two the one got right more often have the higher top probability, by
//! at least the difference of their normalised counts:
//! max(0, −sign(c₁ − c₂) · (κ₁ − κ₂) + |c₁ − c₂|), averaged over the batch.
//! The examples the model keeps getting wrong while it learns are pushed to
//! lower confidence than those it always gets right, which is what a review
//! threshold needs of the scores.
//!
//! One departure from the paper's code, which counts within the running
//! epoch: here the counts are those of the finished epochs, so the first
//! epoch has no ranking term and an example not yet seen this epoch is not
//! ranked below one that was.

use candle_core::{Tensor, D};

use super::TrainError;

/// How often each training example was got right, over the finished epochs.
pub(super) struct Correctness {
    /// Times right in the finished epochs.
    right: Vec<u32>,
    /// Right in the running epoch (its last sighting, should one be seen twice).
    running: Vec<bool>,
    /// Finished epochs.
    epochs: u32,
}

/// A batch's pairs (row i with row i+1, the last with the first): the sign of c_i − c_{i+1} and
/// |c_i − c_{i+1}|, c the normalised counts.
pub(super) struct Pairs {
    sign: Vec<f32>,
    margin: Vec<f32>,
}

impl Correctness {
    pub(super) fn new(examples: usize) -> Self {
        Self { right: vec![0; examples], running: vec![false; examples], epochs: 0 }
    }

    /// Records which of the batch's rows (`logits`, of the examples `indices`) the model got right.
    pub(super) fn record(&mut self, indices: &[usize], logits: &Tensor, targets: &[u32]) -> Result<(), TrainError> {
        let predicted: Vec<u32> = logits.argmax(D::Minus1)?.to_vec1()?;
        for ((&i, p), &y) in indices.iter().zip(predicted).zip(targets) {
            self.running[i] = p == y;
        }
        Ok(())
    }

    /// Adds the running epoch to the counts.
    pub(super) fn end_epoch(&mut self) {
        for (count, right) in self.right.iter_mut().zip(&mut self.running) {
            *count += u32::from(std::mem::take(right));
        }
        self.epochs += 1;
    }

    /// The pairs of the batch `indices`, the counts normalised as (count − fewest) / (epochs − fewest),
    /// the fewest over every training example; `None` before an epoch has finished, or when every
    /// example was got right equally often (nothing to rank).
    pub(super) fn pairs(&self, indices: &[usize]) -> Option<Pairs> {
        let fewest = *self.right.iter().min()?;
        if self.epochs <= fewest || indices.len() < 2 {
            return None;
        }
        let span = (self.epochs - fewest) as f32;
        let c: Vec<f32> = indices.iter().map(|&i| (self.right[i] - fewest) as f32 / span).collect();
        let next = c.iter().cycle().skip(1);
        let (sign, margin) =
            c.iter().zip(next).map(|(a, b)| ((a - b).signum() * f32::from(a != b), (a - b).abs())).unzip();
        Some(Pairs { sign, margin })
    }
}

/// The ranking term of `logits` (one row per example of the pairs, in their order):
/// mean over rows of max(0, −sign · (κ_i − κ_{i+1}) + margin), κ the top softmax probability.
pub(super) fn ranking_loss(logits: &Tensor, pairs: &Pairs) -> Result<Tensor, TrainError> {
    let rows = pairs.sign.len();
    let device = logits.device();
    // The composed softmax: candle's fused `softmax_last_dim` has no backward pass.
    let confidence = candle_nn::ops::softmax(logits, D::Minus1)?.max(D::Minus1)?;
    let next = Tensor::cat(&[confidence.narrow(0, 1, rows - 1)?, confidence.narrow(0, 0, 1)?], 0)?;
    let sign = Tensor::new(pairs.sign.as_slice(), device)?;
    let margin = Tensor::new(pairs.margin.as_slice(), device)?;
    let hinge = ((confidence - next)? * sign)?.neg()?.add(&margin)?.relu()?;
    Ok(hinge.mean(0)?)
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    fn logits(rows: &[[f32; 2]]) -> Tensor {
        Tensor::from_vec(rows.concat(), (rows.len(), 2), &Device::Cpu).unwrap()
    }

    /// The counts are those of finished epochs; the pairs wrap round; equal counts give no term.
    #[test]
    fn pairs_compare_each_row_with_the_next_on_the_finished_epochs() {
        let mut c = Correctness::new(4);
        assert!(c.pairs(&[0, 1, 2]).is_none(), "no finished epoch");
        // Epoch 1: examples 0 and 1 right, 2 wrong, 3 right (predicted 1, 1, 0, 0 against 1, 1, 1, 0).
        c.record(&[0, 1, 2, 3], &logits(&[[0.0, 1.0], [0.0, 2.0], [3.0, 0.0], [1.0, 0.0]]), &[1, 1, 1, 0]).unwrap();
        assert!(c.pairs(&[0, 1]).is_none(), "the running epoch is not counted");
        c.end_epoch();
        // Epoch 2: 2 right now, 3 wrong; 0 and 1 right.
        c.record(&[2, 3, 0, 1], &logits(&[[0.0, 1.0], [0.0, 1.0], [0.0, 1.0], [0.0, 1.0]]), &[1, 0, 1, 1]).unwrap();
        c.end_epoch();
        // Counts 2, 2, 1, 1 over 2 epochs, the fewest 1: normalised 1, 1, 0, 0.
        let p = c.pairs(&[0, 2, 1, 3]).unwrap();
        assert_eq!(p.sign, [1.0, -1.0, 1.0, -1.0]);
        assert_eq!(p.margin, [1.0, 1.0, 1.0, 1.0]);
        let p = c.pairs(&[0, 1]).unwrap();
        assert_eq!((p.sign, p.margin), (vec![0.0, 0.0], vec![0.0, 0.0]));

        let mut all_right = Correctness::new(2);
        all_right.record(&[0, 1], &logits(&[[0.0, 1.0], [1.0, 0.0]]), &[1, 0]).unwrap();
        all_right.end_epoch();
        assert!(all_right.pairs(&[0, 1]).is_none(), "nothing to rank");
    }

    /// Zero when the ranking holds by the margin; otherwise the shortfall, and its gradient raises the
    /// confidence of the example got right more often and lowers the other's.
    #[test]
    fn the_loss_is_the_shortfall_of_the_ranking() {
        let pairs = |sign: [f32; 2], margin: [f32; 2]| Pairs { sign: sign.to_vec(), margin: margin.to_vec() };
        let value = |t: Tensor| t.to_scalar::<f32>().unwrap();
        let sigmoid = |x: f32| 1.0 / (1.0 + (-x).exp());
        // κ ≈ 0.731 (row 0) and ≈ 0.982 (row 1).
        let rows = logits(&[[0.0, 1.0], [0.0, 4.0]]);
        let (k0, k1) = (sigmoid(1.0), sigmoid(4.0));
        // Row 1 got right more often and is the surer by more than the margin: nothing to pay.
        assert!(value(ranking_loss(&rows, &pairs([-1.0, 1.0], [0.1, 0.1])).unwrap()).abs() < 1e-6);
        // Row 0 got right more often but is the less sure: both pairs (0, 1) and (1, 0) pay κ1 − κ0 + m.
        let wrong_way = value(ranking_loss(&rows, &pairs([1.0, -1.0], [0.5, 0.5])).unwrap());
        assert!((wrong_way - (k1 - k0 + 0.5)).abs() < 1e-5, "{wrong_way} against {}", k1 - k0 + 0.5);
        assert_eq!(value(ranking_loss(&rows, &pairs([0.0, 0.0], [0.0, 0.0])).unwrap()), 0.0);

        let var = candle_core::Var::from_tensor(&rows).unwrap();
        let grads = ranking_loss(var.as_tensor(), &pairs([1.0, -1.0], [0.5, 0.5])).unwrap().backward().unwrap();
        let g: Vec<Vec<f32>> = grads.get(var.as_tensor()).unwrap().to_vec2().unwrap();
        // A step down the gradient raises row 0's winning logit and lowers row 1's.
        assert!(g[0][1] < 0.0 && g[1][1] > 0.0, "{g:?}");
    }
}

#[cfg(test)]
mod fit_tests {
    use super::super::tests::{fitted_weights, tiny_options};
    use super::super::{check_options, TrainOptions};

    /// Wired into the fit: with the option the weights end elsewhere than without (the first epoch
    /// has no term, so three); bad values are refused with one sentence.
    #[test]
    fn the_fit_trains_on_the_ranking_and_bad_values_are_refused() {
        let tuned =
            |confidence_ranking: f64| fitted_weights(TrainOptions { confidence_ranking, epochs: 3, ..tiny_options() });
        assert_ne!(tuned(0.0), tuned(1.0));

        for bad in [-1.0, f64::NAN, f64::INFINITY] {
            let err =
                check_options(&TrainOptions { confidence_ranking: bad, ..tiny_options() }).unwrap_err().to_string();
            assert!(err.contains("--confidence-ranking must be a number at least 0"), "{bad}: {err}");
        }
    }
}

//! `--adversarial`: adversarial training on the word embeddings, the fast
//! gradient method of Miyato, Dai and Goodfellow (2017). After a batch's
//! backward pass the word-embedding table is moved a step of norm ε along its
//! own loss gradient, the same batch's loss is differentiated there, the table
//! is put back, and the two passes' gradients are summed before the clipping
//! and the optimiser's step: the fit must hold in a neighbourhood of each row
//! the batch touches, not only at the row.

use candle_core::{backprop::GradStore, Tensor, Var};

use super::base::Trainable;
use super::optim::word_embeddings;
use super::{TrainError, TrainOptions};

/// The table `--adversarial` perturbs, and the step's norm.
pub(super) struct Adversarial {
    table: Var,
    eps: f64,
}

impl Adversarial {
    /// `None` when `opts.adversarial` is 0 (off); a model without a word-embedding table is refused.
    pub(super) fn for_fine_tuning(t: &Trainable, opts: &TrainOptions) -> Result<Option<Self>, TrainError> {
        if opts.adversarial == 0.0 {
            return Ok(None);
        }
        Ok(Some(Self { table: word_embeddings(t, "--adversarial")?, eps: opts.adversarial }))
    }

    /// Adds to `grads` (the batch's gradients, of `vars`) those of `loss` computed with the table
    /// moved by ε g / ‖g‖, g its gradient in `grads`; the table is then put back to the bit. A table
    /// without a gradient, or with one of norm 0 or not finite, is left alone and nothing is added.
    pub(super) fn add_gradients(
        &self,
        grads: &mut GradStore,
        vars: &[Var],
        loss: impl FnOnce() -> Result<Tensor, TrainError>,
    ) -> Result<(), TrainError> {
        let Some(g) = grads.get(self.table.as_tensor()) else { return Ok(()) };
        let norm = g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
        if norm == 0.0 || !norm.is_finite() {
            return Ok(());
        }
        let step = (g * (self.eps / norm.sqrt()))?;
        let original = self.table.as_tensor().copy()?;
        self.table.set(&(&original + step)?)?;
        let perturbed = loss().and_then(|l| Ok(l.backward()?));
        self.table.set(&original)?;
        let perturbed = perturbed?;
        for v in vars {
            if let Some(g2) = perturbed.get(v.as_tensor()) {
                let sum = match grads.remove(v.as_tensor()) {
                    Some(g1) => (g1 + g2)?,
                    None => g2.clone(),
                };
                grads.insert(v.as_tensor(), sum);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use rand::rngs::StdRng;
    use rand::SeedableRng;

    use super::super::base::build;
    use super::super::check_options;
    use super::super::loss::loss;
    use super::super::optim::WORD_EMBEDDINGS;
    use super::super::tests::{examples, fitted_weights, tiny_options};
    use super::*;

    fn values(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    /// Without dropout, the second pass at a vanishing step is the first pass again (the sum is twice
    /// the plain gradient); at a real step it is along the gradient, so the loss there is higher;
    /// either way the table ends as it began, to the bit.
    #[test]
    fn the_second_pass_is_uphill_and_the_table_is_put_back() {
        let labels = vec!["suporte".to_string(), "venda".to_string()];
        let texts: Vec<String> = examples().into_iter().map(|e| e.text).collect();
        let targets = [1, 0, 1, 0];
        let opts = TrainOptions { dropout: Some(0.0), ..tiny_options() };
        let mut rng = StdRng::seed_from_u64(1);
        let t = build(&opts, &labels, &examples(), &mut rng).unwrap();
        let before: Vec<Vec<f32>> = t.vars.iter().map(|v| values(v.as_tensor())).collect();
        let plain = loss(&t, &texts, &targets, None, None, &opts, &mut rng).unwrap().loss;
        let plain_value = plain.to_scalar::<f32>().unwrap();
        let plain_grads = plain.backward().unwrap();

        let summed = |eps: f64| {
            let adversarial =
                Adversarial::for_fine_tuning(&t, &TrainOptions { adversarial: eps, ..opts.clone() }).unwrap().unwrap();
            let mut grads = plain.backward().unwrap();
            let seen = Cell::new(f32::NAN);
            let mut rng = StdRng::seed_from_u64(2);
            adversarial
                .add_gradients(&mut grads, &t.vars, || {
                    let l = loss(&t, &texts, &targets, None, None, &opts, &mut rng)?.loss;
                    seen.set(l.to_scalar::<f32>()?);
                    Ok(l)
                })
                .unwrap();
            let after: Vec<Vec<f32>> = t.vars.iter().map(|v| values(v.as_tensor())).collect();
            assert_eq!(after, before, "the variables after a step of {eps}");
            (grads, seen.get())
        };

        let (grads, second) = summed(1e-9);
        assert!((second - plain_value).abs() < 1e-5, "{second} against {plain_value}");
        let mut largest = 0.0f32;
        for v in &t.vars {
            let (one, two) =
                (values(plain_grads.get(v.as_tensor()).unwrap()), values(grads.get(v.as_tensor()).unwrap()));
            let gap = one.iter().zip(&two).map(|(a, b)| (2.0 * a - b).abs()).fold(0.0f32, f32::max);
            assert!(gap < 1e-4, "{gap}");
            largest = one.iter().fold(largest, |m, a| m.max(a.abs()));
        }
        assert!(largest > 1e-2, "the plain gradient is too small to compare: {largest}");
        let (_, uphill) = summed(1.0);
        assert!(uphill > plain_value + 1e-3, "{uphill} against {plain_value}");
    }

    /// Wired into the fit: with the option the weights end elsewhere than without; bad values and a
    /// model without a word-embedding table are refused with one sentence.
    #[test]
    fn the_fit_trains_on_both_passes_and_bad_values_are_refused() {
        let labels = vec!["suporte".to_string(), "venda".to_string()];
        let tuned = |adversarial: f64| fitted_weights(TrainOptions { adversarial, epochs: 2, ..tiny_options() });
        assert_ne!(tuned(0.0), tuned(0.5));

        for bad in [-0.5, f64::NAN, f64::INFINITY] {
            let err = check_options(&TrainOptions { adversarial: bad, ..tiny_options() }).unwrap_err().to_string();
            assert!(err.contains("--adversarial must be a number at least 0"), "{bad}: {err}");
        }
        let mut rng = StdRng::seed_from_u64(1);
        let trainable = build(&tiny_options(), &labels, &examples(), &mut rng).unwrap();
        trainable.varmap.data().lock().unwrap().remove(WORD_EMBEDDINGS);
        let opts = TrainOptions { adversarial: 0.5, ..tiny_options() };
        let err = Adversarial::for_fine_tuning(&trainable, &opts).err().unwrap().to_string();
        assert_eq!(err, format!("invalid option: --adversarial: the model has no {WORD_EMBEDDINGS}"));
    }
}

//! Which of a model's variables train, and at which rate: AdamW with weight
//! decay for the weight matrices and without for biases and layer norms, the
//! word-embedding table left out (`--freeze-embeddings`) or on an optimiser of
//! its own (`--embedding-lr-scale`); and the gradient clipping over what trains.

use candle_core::{backprop::GradStore, Var};
use candle_nn::ParamsAdamW;

use super::adamw::AdamW;
use super::base::{sorted_vars, Trainable};
use super::{TrainError, TrainOptions};

/// Fine-tuning's optimisers, stepped together.
pub(super) struct Optimisers {
    decay: AdamW,
    no_decay: AdamW,
    /// The word-embedding table's own, and the multiple of the schedule's rate it runs at.
    embedding: Option<(AdamW, f64)>,
    /// The variables whose gradients the clipping measures and scales.
    clipped: Vec<Var>,
}

impl Optimisers {
    /// The optimisers of `t` under `opts`' learning rate, weight decay and embedding options: with
    /// `--freeze-embeddings` the word-embedding table is neither stepped nor clipped, with
    /// `--embedding-lr-scale` it is stepped by an optimiser of its own; the clipping measures the
    /// rest in name order.
    pub(super) fn for_fine_tuning(t: &Trainable, opts: &TrainOptions) -> Result<Self, TrainError> {
        let named = sorted_vars(&t.varmap);
        let apart = if opts.freeze_embeddings {
            Some("--freeze-embeddings")
        } else if opts.embedding_lr_scale != 1.0 {
            Some("--embedding-lr-scale")
        } else {
            None
        };
        if let Some(option) = apart {
            word_embeddings(t, option)?;
        }
        let clipped = named
            .iter()
            .filter(|(n, _)| !(opts.freeze_embeddings && n == WORD_EMBEDDINGS))
            .map(|(_, v)| v.clone())
            .collect();
        let (table, fitted): (NamedVars, NamedVars) =
            named.into_iter().partition(|(n, _)| apart.is_some() && n == WORD_EMBEDDINGS);
        let embedding = match table.into_iter().next() {
            Some((_, table)) if !opts.freeze_embeddings => {
                let params = ParamsAdamW { lr: opts.lr, weight_decay: opts.weight_decay, ..Default::default() };
                Some((AdamW::new(vec![table], params)?, opts.embedding_lr_scale))
            }
            _ => None,
        };
        let (decay, no_decay) = optimizers(fitted, opts.lr, opts.weight_decay)?;
        Ok(Self { decay, no_decay, embedding, clipped })
    }

    /// One step at learning rate `lr` (the embedding table's times its scale), after clipping the
    /// gradients to a global norm of 1.
    pub(super) fn step(&mut self, grads: &mut GradStore, lr: f64) -> Result<(), TrainError> {
        self.decay.set_learning_rate(lr);
        self.no_decay.set_learning_rate(lr);
        clip_gradients(grads, &self.clipped, 1.0)?;
        self.decay.step(grads)?;
        self.no_decay.step(grads)?;
        if let Some((embedding, scale)) = &mut self.embedding {
            embedding.set_learning_rate(lr * *scale);
            embedding.step(grads)?;
        }
        Ok(())
    }
}

/// Variables with their names in the variable map, in name order.
type NamedVars = Vec<(String, Var)>;

/// The word-embedding table's name in the variable map (and in `model.safetensors`).
pub(super) const WORD_EMBEDDINGS: &str = "bert.embeddings.word_embeddings.weight";

/// The word-embedding table of `t`, or the refusal naming `option`, which needs it.
pub(super) fn word_embeddings(t: &Trainable, option: &str) -> Result<Var, TrainError> {
    let table = t.varmap.data().lock().expect("varmap lock").get(WORD_EMBEDDINGS).cloned();
    table.ok_or_else(|| TrainError::Options(format!("{option}: the model has no {WORD_EMBEDDINGS}")))
}

/// AdamW with `weight_decay` for the weight matrices among `vars`, and one without for biases and layer norms.
pub(super) fn optimizers(vars: NamedVars, lr: f64, weight_decay: f64) -> Result<(AdamW, AdamW), TrainError> {
    let (decay, no_decay): (Vec<_>, Vec<_>) =
        vars.into_iter().partition(|(n, _)| !n.ends_with("bias") && !n.contains("LayerNorm"));
    let vars = |vs: Vec<(String, Var)>| -> Vec<Var> { vs.into_iter().map(|(_, v)| v).collect() };
    let params = |weight_decay| ParamsAdamW { lr, weight_decay, ..Default::default() };
    Ok((AdamW::new(vars(decay), params(weight_decay))?, AdamW::new(vars(no_decay), params(0.0))?))
}

/// Scales all gradients down so that their global L2 norm is at most `max_norm`.
pub(super) fn clip_gradients(grads: &mut GradStore, vars: &[Var], max_norm: f64) -> Result<(), TrainError> {
    let mut total = 0.0f64;
    for v in vars {
        if let Some(g) = grads.get(v.as_tensor()) {
            total += g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
        }
    }
    let norm = total.sqrt();
    if norm > max_norm {
        let scale = max_norm / (norm + 1e-6);
        for v in vars {
            if let Some(g) = grads.remove(v.as_tensor()) {
                grads.insert(v.as_tensor(), (g * scale)?);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use rand::rngs::StdRng;
    use rand::SeedableRng;

    use super::super::base::{build, Base};
    use super::super::check_options;
    use super::super::tests::{examples, fitted_weights, saved_weights, tiny_options};
    use super::*;

    /// `--freeze-embeddings`: fine-tuned from a base, the word-embedding table is the base's to the
    /// bit while the layers above it move; without the option the table moves too.
    /// `--embedding-lr-scale`: the table alone moves at its own rate (at 1e-9 of the rest's, not
    /// measurably), the layers above it as before. A model without such a table, or a scale that is
    /// not a positive number, is refused with one sentence.
    #[test]
    fn the_word_embeddings_train_at_their_own_rate_or_not_at_all() {
        let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-model");
        let labels = vec!["suporte".to_string(), "venda".to_string()];
        let tuned = |freeze_embeddings: bool, embedding_lr_scale: f64| {
            fitted_weights(TrainOptions {
                base: Base::Dir(base.clone()),
                freeze_embeddings,
                embedding_lr_scale,
                epochs: 2,
                lr: 1e-2,
                ..tiny_options()
            })
        };
        let tensor = |w: &[(String, Vec<f32>)], name: &str| w.iter().find(|(n, _)| n == name).unwrap().1.clone();
        let (start, free) = (saved_weights(&base), tuned(false, 1.0));
        let (frozen, slow) = (tuned(true, 1.0), tuned(false, 1e-9));
        assert_eq!(tensor(&frozen, WORD_EMBEDDINGS), tensor(&start, WORD_EMBEDDINGS));
        assert_ne!(tensor(&free, WORD_EMBEDDINGS), tensor(&start, WORD_EMBEDDINGS));
        let gap = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
        let table_gap = |w: &[(String, Vec<f32>)]| gap(&tensor(w, WORD_EMBEDDINGS), &tensor(&start, WORD_EMBEDDINGS));
        assert!(table_gap(&slow) < 1e-7, "{}", table_gap(&slow));
        assert!(table_gap(&free) > 1e-4, "{}", table_gap(&free));
        let fast = tuned(false, 2.0);
        assert!(table_gap(&fast) > 1e-4, "{}", table_gap(&fast));
        for name in ["bert.encoder.layer.1.output.dense.weight", "bert.embeddings.position_embeddings.weight"] {
            assert_ne!(tensor(&frozen, name), tensor(&start, name), "{name}");
            assert!(gap(&tensor(&slow, name), &tensor(&start, name)) > 1e-4, "{name}");
        }
        for p in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            let err = check_options(&TrainOptions { embedding_lr_scale: p, ..tiny_options() }).unwrap_err().to_string();
            assert!(err.contains("--embedding-lr-scale must be a positive number"), "{p}: {err}");
        }

        let mut rng = StdRng::seed_from_u64(1);
        let trainable = build(&tiny_options(), &labels, &examples(), &mut rng).unwrap();
        trainable.varmap.data().lock().unwrap().remove(WORD_EMBEDDINGS);
        let refused = |opts: TrainOptions| Optimisers::for_fine_tuning(&trainable, &opts).err().unwrap().to_string();
        let err = refused(TrainOptions { freeze_embeddings: true, ..tiny_options() });
        assert_eq!(err, format!("invalid option: --freeze-embeddings: the model has no {WORD_EMBEDDINGS}"));
        let err = refused(TrainOptions { embedding_lr_scale: 3.0, ..tiny_options() });
        assert_eq!(err, format!("invalid option: --embedding-lr-scale: the model has no {WORD_EMBEDDINGS}"));
    }
}

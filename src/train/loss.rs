//! The loss a fine-tuning batch is trained on: cross-entropy against the
//! labels (smoothed or not), the teachers' soft targets of `--ensemble` and
//! `--teacher-scores`, `--rdrop`'s consistency between two dropout passes and
//! `--confidence-ranking`'s ranking of the scores.

use candle_core::Tensor;
use rand::rngs::StdRng;

use super::base::Trainable;
use super::ranking::{ranking_loss, Pairs};
use super::{TrainError, TrainOptions};
use crate::model::{bert, Mode};

/// The training loss of a batch, in training mode: cross-entropy against
/// the labels smoothed by `label_smoothing`, and, with soft targets (the
/// teachers' mean probabilities at `distill_temperature`, row after row),
/// `distill_weight` of the cross-entropy against those at the same
/// temperature, scaled by its square. With `rdrop` the batch is stacked on
/// itself and run once, so that each copy gets its own dropout masks: the
/// loss above is the mean over both copies, plus `rdrop` times their
/// [`consistency`]. With `pairs` (`--confidence-ranking`), plus
/// `confidence_ranking` times their [`ranking_loss`] (the mean over the copies).
pub(super) fn loss(
    t: &Trainable,
    texts: &[String],
    targets: &[u32],
    soft: Option<&[f32]>,
    pairs: Option<&Pairs>,
    opts: &TrainOptions,
    rng: &mut StdRng,
) -> Result<BatchLoss, TrainError> {
    let device = &opts.device;
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let encoded = t.encoder.encode(&refs)?;
    let (mut ids, mut masks) = bert::batch_tensors(&encoded.ids, &encoded.masks, device)?;
    let copies = if opts.rdrop > 0.0 { 2 } else { 1 };
    if copies == 2 {
        ids = Tensor::cat(&[&ids, &ids], 0)?;
        masks = Tensor::cat(&[&masks, &masks], 0)?;
    }
    let logits = t.model.forward(&ids, &masks, &mut Mode::Train(rng))?;
    let (rows, classes) = logits.dims2()?;
    let targets = targets.repeat(copies);
    let hard = if opts.label_smoothing == 0.0 {
        candle_nn::loss::cross_entropy(&logits, &Tensor::new(targets.as_slice(), device)?)?
    } else {
        let eps = opts.label_smoothing as f32;
        let mut dist = vec![eps / classes as f32; rows * classes];
        for (i, &y) in targets.iter().enumerate() {
            dist[i * classes + y as usize] += 1.0 - eps;
        }
        let dist = Tensor::from_vec(dist, (rows, classes), device)?;
        soft_cross_entropy(&logits, &dist)?
    };
    let fitted = match soft {
        None => hard,
        Some(soft) => {
            let temp = opts.distill_temperature;
            let soft = Tensor::from_vec(soft.repeat(copies), (rows, classes), device)?;
            let distill = (soft_cross_entropy(&(&logits / temp)?, &soft)? * (temp * temp))?;
            ((hard * (1.0 - opts.distill_weight))? + (distill * opts.distill_weight)?)?
        }
    };
    let n = rows / copies;
    let mut loss = fitted;
    if copies == 2 {
        let consistency = consistency(&logits.narrow(0, 0, n)?, &logits.narrow(0, n, n)?)?;
        loss = (loss + (consistency * opts.rdrop)?)?;
    }
    if let Some(pairs) = pairs {
        let mut ranking = ranking_loss(&logits.narrow(0, 0, n)?, pairs)?;
        if copies == 2 {
            ranking = ((ranking + ranking_loss(&logits.narrow(0, n, n)?, pairs)?)? * 0.5)?;
        }
        loss = (loss + (ranking * opts.confidence_ranking)?)?;
    }
    Ok(BatchLoss { loss, logits: logits.narrow(0, 0, n)? })
}

/// A batch's loss, and the logits of its rows it came from (the first copy's with `--rdrop`).
pub(super) struct BatchLoss {
    pub(super) loss: Tensor,
    pub(super) logits: Tensor,
}

/// R-Drop's consistency term: the mean over rows of the symmetric KL
/// divergence between two predictions of the same examples,
/// ½ (KL(p‖q) + KL(q‖p)) = ½ Σ (p − q)(log p − log q).
fn consistency(a: &Tensor, b: &Tensor) -> Result<Tensor, candle_core::Error> {
    let (log_p, log_q) = (
        candle_nn::ops::log_softmax(a, candle_core::D::Minus1)?,
        candle_nn::ops::log_softmax(b, candle_core::D::Minus1)?,
    );
    let gap = (log_p.exp()? - log_q.exp()?)?;
    (gap * (log_p - log_q)?)?.sum(1)?.mean(0)? * 0.5
}

/// Mean over rows of −Σ target · log softmax(logits).
fn soft_cross_entropy(logits: &Tensor, target: &Tensor) -> Result<Tensor, candle_core::Error> {
    let log_probs = candle_nn::ops::log_softmax(logits, candle_core::D::Minus1)?;
    (log_probs * target)?.sum(1)?.mean(0)?.neg()
}

#[cfg(test)]
mod tests {
    use candle_core::Device;
    use rand::SeedableRng;

    use super::super::base::build;
    use super::super::check_options;
    use super::super::tests::{examples, tiny_options};
    use super::*;

    /// The reason `triagem train` has its own BERT: every tensor must receive a gradient.
    #[test]
    fn every_parameter_gets_a_gradient() {
        let labels = vec!["suporte".to_string(), "venda".to_string()];
        let mut rng = StdRng::seed_from_u64(1);
        let t = build(&tiny_options(), &labels, &examples(), &mut rng).unwrap();
        let texts: Vec<String> = examples().into_iter().map(|e| e.text).collect();
        let loss = loss(&t, &texts, &[1, 0, 1, 0], None, None, &tiny_options(), &mut rng).unwrap().loss;
        let grads = loss.backward().unwrap();
        let data = t.varmap.data().lock().unwrap();
        let mut missing = Vec::new();
        for (name, var) in data.iter() {
            let norm = grads
                .get(var.as_tensor())
                .map(|g| g.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap())
                .unwrap_or(0.0);
            if norm <= 0.0 {
                missing.push(name.clone());
            }
        }
        // 5 embedding tensors + 16 per layer × 2 layers + pooler 2 + head 2.
        assert_eq!(data.len(), 5 + 16 * 2 + 2 + 2);
        assert!(missing.is_empty(), "no gradient for {missing:?}");
    }

    #[test]
    fn rdrop_adds_only_the_gap_between_two_dropout_passes() {
        let labels = vec!["suporte".to_string(), "venda".to_string()];
        let texts: Vec<String> = examples().into_iter().map(|e| e.text).collect();
        let batch_loss = |opts: &TrainOptions| {
            let mut rng = StdRng::seed_from_u64(1);
            let t = build(opts, &labels, &examples(), &mut rng).unwrap();
            loss(&t, &texts, &[1, 0, 1, 0], None, None, opts, &mut rng).unwrap().loss.to_scalar::<f32>().unwrap()
        };
        // Without dropout both passes agree: the stacked batch's loss is the plain one.
        let still = TrainOptions { dropout: Some(0.0), ..tiny_options() };
        let (plain, doubled) = (batch_loss(&still), batch_loss(&TrainOptions { rdrop: 5.0, ..still.clone() }));
        assert!((plain - doubled).abs() < 1e-6, "{plain} against {doubled}");
        // With it they differ, and the weight scales the gap.
        let noisy = TrainOptions { dropout: Some(0.5), ..tiny_options() };
        let (small, large) = (
            batch_loss(&TrainOptions { rdrop: 1.0, ..noisy.clone() }),
            batch_loss(&TrainOptions { rdrop: 1e4, ..noisy }),
        );
        assert!(large > small + 1e-3, "{small} against {large}");
        for bad in [-0.5, f64::NAN, f64::INFINITY] {
            let err = check_options(&TrainOptions { rdrop: bad, ..tiny_options() }).unwrap_err().to_string();
            assert!(err.contains("--rdrop"), "{err}");
        }
    }

    #[test]
    fn consistency_is_the_symmetric_kl_divergence() {
        let t = |v: &[f32]| Tensor::from_slice(v, (1, 2), &Device::Cpu).unwrap();
        let value = |a: &[f32], b: &[f32]| consistency(&t(a), &t(b)).unwrap().to_scalar::<f32>().unwrap();
        assert!(value(&[0.3, -1.2], &[0.3, -1.2]).abs() < 1e-7);
        // softmax([0, ln 3]) = (1/4, 3/4), softmax([0, 0]) = (1/2, 1/2).
        let (p, q) = ([0.25f64, 0.75], [0.5f64, 0.5]);
        let kl = |p: &[f64; 2], q: &[f64; 2]| p.iter().zip(q).map(|(p, q)| p * (p / q).ln()).sum::<f64>();
        let expected = 0.5 * (kl(&p, &q) + kl(&q, &p));
        let got = value(&[0.0, 3f32.ln()], &[0.0, 0.0]) as f64;
        assert!((got - expected).abs() < 1e-6, "{got} against {expected}");
        assert_eq!(value(&[0.0, 3f32.ln()], &[0.0, 0.0]), value(&[0.0, 0.0], &[0.0, 3f32.ln()]));
    }
}

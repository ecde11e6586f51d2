//! `--soup N`: a uniform model soup (Wortsman et al., 2022). N models are
//! fine-tuned from the same initial weights on the same split, each with its
//! own order of examples, dropout and augmentation, each keeping its best dev
//! epoch; the model saved is the element-wise mean of their weights — one
//! `BertForSequenceClassification` of the same size and speed, where an
//! ensemble would be N of them and distillation a second training.
//!
//! Here: [`cook_soup`] trains the models `--jobs` at a time and, with
//! `--refit`, queues each model's refit on every example as soon as its best
//! epoch is known (the longest of those ready first); [`refit_soup`]
//! averages the refitted models; [`mean_weights`] is the average itself.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use rand::rngs::StdRng;

use super::checkpoint::replace_file;
use super::distill::Teachers;
use super::{
    beside, fit, jobs, one_of, side_by_side, write_error, Fitted, Ingredient, Run, SoupLog, TrainError, TrainOptions,
};
use crate::data::Example;
use crate::eval;
use crate::model::{self, Classifier, ModelError};

/// Writes to `out/model.safetensors` the element-wise mean of the weights in the
/// `model.safetensors` of each of `ingredients` (model directories of one architecture:
/// the same tensor names and shapes, or an error naming the file and the tensor).
pub(super) fn mean_weights(ingredients: &[PathBuf], out: &Path) -> Result<(), TrainError> {
    let Some((first, rest)) = ingredients.split_first() else { return Ok(()) };
    let bad = |path: &Path, reason: String| ModelError::BadWeights { path: path.to_path_buf(), reason };
    let load = |dir: &Path| {
        let path = dir.join(model::WEIGHTS_FILE);
        candle_core::safetensors::load(&path, &Device::Cpu)
            .map(|tensors| (tensors, path.clone()))
            .map_err(|e| bad(&path, format!("cannot read an ingredient of the soup: {e}")))
    };
    let mut sums: HashMap<String, Tensor> =
        load(first)?.0.into_iter().map(|(n, t)| Ok((n, t.to_dtype(DType::F32)?))).collect::<Result<_, TrainError>>()?;
    for dir in rest {
        let (tensors, path) = load(dir)?;
        if tensors.len() != sums.len() {
            return Err(
                bad(&path, format!("{} tensors where the first ingredient has {}", tensors.len(), sums.len())).into()
            );
        }
        for (name, tensor) in tensors {
            let Some(sum) = sums.get_mut(&name) else {
                return Err(bad(&path, format!("tensor {name:?} is not in the first ingredient")).into());
            };
            if sum.dims() != tensor.dims() {
                let reason = format!("tensor {name:?} is {:?}, the first ingredient's {:?}", tensor.dims(), sum.dims());
                return Err(bad(&path, reason).into());
            }
            *sum = (&*sum + tensor.to_dtype(DType::F32)?)?;
        }
    }
    let scale = 1.0 / ingredients.len() as f64;
    let mean = sums.into_iter().map(|(n, t)| Ok((n, (t * scale)?))).collect::<Result<HashMap<_, _>, TrainError>>()?;
    replace_file(&out.join(model::WEIGHTS_FILE), |p| {
        candle_core::safetensors::save(&mean, p).map_err(|e| e.to_string())
    })
}

/// `--soup N`: fine-tunes N models on the same split (`opts.jobs` at a time) from the generator
/// `init` as it stands before a model is built — so from the same initial weights —, the first
/// (into `opts.out`) drawing on from it as a run without a soup does, the others each with its own
/// seed for the rest; then writes the mean of the N models' weights over the first's. Returns the
/// first model's run and the soup's log.
///
/// With `refit_on` (`--refit`: every training example), each model is also trained again on those
/// for its own best epoch, from the same initial weights and with the same seed, as soon as it is
/// done — in the same queue, so that no core waits for the last model of the soup before the refits
/// start; the refitted models are returned for [`refit_soup`] to average once the soup is calibrated.
pub(super) fn cook_soup(
    opts: &TrainOptions,
    labels: &[String],
    train: &[Example],
    dev: &[Example],
    teachers: &Teachers,
    init: &StdRng,
    refit_on: Option<&[Example]>,
) -> Result<(Fitted, SoupLog, Option<Refitted>), TrainError> {
    let started = Instant::now();
    let (root, refit_root) = (beside(&opts.out, ".soup"), beside(&opts.out, ".refit"));
    let n = opts.soup;
    let seed_of = |k: usize| opts.seed.wrapping_add(k as u64);
    // Model `k` (or its refit) into `out`: from `init`, the first drawing on from it as a run
    // without a soup does, the others reseeded with their own seed once built.
    let member = |k: usize, out: PathBuf, name: String, examples: &[Example], dev: &[Example], stop_after| {
        std::fs::create_dir_all(&out).map_err(|e| write_error(&out, e))?;
        let run = Run { stop_after, reseed: (k > 0).then_some(seed_of(k)), name: side_by_side(opts).then_some(name) };
        let options = TrainOptions { out: out.clone(), ..one_of(opts) };
        Ok((fit(&options, labels, examples, dev, teachers, run, &mut init.clone())?, out))
    };
    let best_epochs = BestEpochs::new(n);
    let refit_names: Vec<PathBuf> = (0..n).map(|k| refit_root.join(format!("seed-{}", seed_of(k)))).collect();
    let refits_started = std::sync::OnceLock::new();
    let done = jobs::each(opts.jobs, if refit_on.is_some() { 2 * n } else { n }, |t| {
        if t < n {
            let k = t;
            let publish = best_epochs.publisher(k);
            let out = if k == 0 { opts.out.clone() } else { root.join(format!("seed-{}", seed_of(k))) };
            if k > 0 {
                eprintln!(
                    "soup: model {}/{n} (initial weights as the first's; seed {} for the rest)",
                    k + 1,
                    seed_of(k)
                );
            }
            let (fitted, out) = member(k, out, format!("soup model {}/{n}", k + 1), train, dev, None)?;
            publish.best_epoch(fitted.best.map_or(0, |(e, _)| e));
            return Ok((fitted, out));
        }
        let examples = refit_on.unwrap_or_default();
        let (k, best_epoch) = best_epochs.claim_longest();
        let Some(best_epoch) = best_epoch else {
            return Err(TrainError::Options(format!("--soup --refit: soup model {} failed; not refitted", k + 1)));
        };
        refits_started.get_or_init(Instant::now);
        eprintln!("soup refit: model {}/{n}, {best_epoch} epochs on all {} examples", k + 1, examples.len());
        let out = refit_names[k].clone();
        member(k, out, format!("soup refit {}/{n}", k + 1), examples, &[], Some(best_epoch))
    })?;
    let mut done = done.into_iter();
    let models: Vec<_> = done.by_ref().take(n).collect();
    let refitted = refit_on.map(|_| {
        // In soup order: the refits ran in the order they were claimed.
        let mut models: Vec<_> = done.collect();
        models.sort_by_key(|(_, out)| refit_names.iter().position(|name| name == out));
        Refitted { models, started: refits_started.get().copied().unwrap_or_else(Instant::now) }
    });

    let dirs: Vec<PathBuf> = models.iter().map(|(_, out)| out.clone()).collect();
    one_vocabulary(&dirs)?;
    let ingredients: Vec<Ingredient> = models
        .iter()
        .enumerate()
        .map(|(k, (fitted, _))| {
            let (best_epoch, dev_macro_f1) = fitted.best.unwrap_or((0, 0.0));
            Ingredient { seed: seed_of(k), best_epoch, dev_macro_f1 }
        })
        .collect();
    let first = models.into_iter().next().map(|(fitted, _)| fitted);
    let first = first.ok_or_else(|| TrainError::Options("--soup: a soup without models".into()))?;
    mean_weights(&dirs, &opts.out)?;
    let _ = std::fs::remove_dir_all(&root);
    let (dev_accuracy, dev_macro_f1) = if dev.is_empty() {
        (None, None)
    } else {
        let report = eval::evaluate(&Classifier::load_tensor_path(&opts.out, &opts.device)?, dev, 64)?;
        eprintln!(
            "soup of {n}: dev accuracy {:.4}  dev macro-F1 {:.4} (the models alone: {})",
            report.accuracy,
            report.macro_f1,
            ingredients.iter().map(|i| format!("{:.4}", i.dev_macro_f1)).collect::<Vec<_>>().join(", ")
        );
        (Some(report.accuracy), Some(report.macro_f1))
    };
    let log = SoupLog { ingredients, dev_accuracy, dev_macro_f1, seconds: started.elapsed().as_secs_f64() };
    Ok((first, log, refitted))
}

/// A soup's models trained again on every example (`--soup N --refit`), in soup order, in their
/// directories, and when the first of them started.
pub(super) struct Refitted {
    models: Vec<(Fitted, PathBuf)>,
    pub(super) started: Instant,
}

/// The best epoch of each of a soup's models, for their refits to wait on: `None` while the model
/// trains, `Some(None)` when it failed.
struct BestEpochs {
    slots: std::sync::Mutex<Slots>,
    ready: std::sync::Condvar,
}

/// Each model's outcome so far, and whether its refit has been claimed.
struct Slots {
    best: Vec<Option<Option<usize>>>,
    claimed: Vec<bool>,
}

impl BestEpochs {
    fn new(n: usize) -> Self {
        let slots = Slots { best: vec![None; n], claimed: vec![false; n] };
        Self { slots: std::sync::Mutex::new(slots), ready: std::sync::Condvar::new() }
    }

    /// Model `k`'s handle: it publishes the best epoch, or on drop without one (an error, a panic)
    /// the failure — a refit never waits for a model that will not finish.
    fn publisher(&self, k: usize) -> Publisher<'_> {
        Publisher { epochs: self, k }
    }

    fn set(&self, k: usize, value: Option<usize>) {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        slots.best[k].get_or_insert(value);
        self.ready.notify_all();
    }

    /// The refit to train next: of the models done and not yet claimed, a failed one first (its
    /// error ends the run), else the one with the most epochs (the lowest-numbered of a tie),
    /// waiting while none is done. Longest first, so that the last refits to start are the short
    /// ones and the cores finish together: the order changes no model, each has its own seed.
    /// Called once per model.
    fn claim_longest(&self) -> (usize, Option<usize>) {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let ready =
                (0..slots.best.len()).filter(|&k| !slots.claimed[k]).filter_map(|k| slots.best[k].map(|b| (k, b)));
            // `None` (failed) sorts below every epoch count; the key makes the lowest `k` win a tie.
            if let Some((k, best)) = ready.min_by_key(|&(k, best)| (best.is_some(), std::cmp::Reverse(best), k)) {
                slots.claimed[k] = true;
                return (k, best);
            }
            slots = self.ready.wait(slots).unwrap_or_else(|e| e.into_inner());
        }
    }
}

struct Publisher<'a> {
    epochs: &'a BestEpochs,
    k: usize,
}

impl Publisher<'_> {
    fn best_epoch(self, epoch: usize) {
        self.epochs.set(self.k, Some(epoch));
    }
}

impl Drop for Publisher<'_> {
    fn drop(&mut self) {
        self.epochs.set(self.k, None); // a no-op after `best_epoch`
    }
}

/// The bytes of `dir`'s `tokenizer.json`.
fn tokenizer_bytes(dir: &Path) -> Result<Vec<u8>, TrainError> {
    let path = dir.join(model::TOKENIZER_FILE);
    std::fs::read(&path).map_err(|e| ModelError::BadTokenizer { path, reason: e.to_string() }.into())
}

/// Weights line up only over one vocabulary (`--base none` trains a tokenizer for each model):
/// every soup model in `dirs` must have the first's tokenizer.
pub(super) fn one_vocabulary(dirs: &[PathBuf]) -> Result<(), TrainError> {
    let Some((first, rest)) = dirs.split_first() else { return Ok(()) };
    let first = tokenizer_bytes(first)?;
    for (k, dir) in rest.iter().enumerate().map(|(i, d)| (i + 2, d)) {
        if tokenizer_bytes(dir)? != first {
            return Err(TrainError::Tokenizer(format!(
                "--soup: model {k} has another tokenizer than the first ({}); their weights cannot be averaged",
                dir.join(model::TOKENIZER_FILE).display()
            )));
        }
    }
    Ok(())
}

/// `--soup N --refit`: `opts.out` gets the mean of the weights of the soup's models trained again
/// on every example ([`cook_soup`]), with the first refitted model's tokenizer and config. Returns
/// the first refitted model's run.
pub(super) fn refit_soup(opts: &TrainOptions, refitted: Refitted) -> Result<Fitted, TrainError> {
    let dirs: Vec<PathBuf> = refitted.models.iter().map(|(_, out)| out.clone()).collect();
    one_vocabulary(&dirs)?;
    let Some((first, model_dir)) = refitted.models.into_iter().next() else {
        return Err(TrainError::Options("--soup --refit: a soup without models".into()));
    };
    // The first refitted model's directory with the mean weights becomes the model: with `--base none`
    // its tokenizer (trained on every example) is not the dev-split soup's.
    mean_weights(&dirs, &model_dir)?;
    for entry in std::fs::read_dir(&model_dir).map_err(|e| write_error(&model_dir, e))? {
        let from = entry.map_err(|e| write_error(&model_dir, e))?.path();
        let to = opts.out.join(from.file_name().unwrap_or_default());
        std::fs::copy(&from, &to).map_err(|e| write_error(&to, e))?;
    }
    let _ = std::fs::remove_dir_all(beside(&opts.out, ".refit"));
    Ok(first)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Refits are claimed failed first, then longest first (the lowest-numbered of a tie), each
    /// once, and only among the models that are done.
    #[test]
    fn refits_are_claimed_longest_first_among_the_models_done() {
        let epochs = BestEpochs::new(4);
        for (k, best) in [(0, Some(6)), (1, Some(8)), (3, Some(8))] {
            epochs.set(k, best);
        }
        assert_eq!(epochs.claim_longest(), (1, Some(8)));
        assert_eq!(epochs.claim_longest(), (3, Some(8)));
        epochs.set(2, None);
        assert_eq!(epochs.claim_longest(), (2, None), "a failed model first");
        assert_eq!(epochs.claim_longest(), (0, Some(6)));
        let later = BestEpochs::new(2);
        later.set(1, Some(3));
        assert_eq!(later.claim_longest(), (1, Some(3)), "model 0 still training");
    }

    /// A soup's weights are averaged only over one vocabulary: a model whose tokenizer differs from
    /// the first's is named, with its file.
    #[test]
    fn soup_models_with_another_tokenizer_are_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let dirs: Vec<PathBuf> = ["a", "b", "c"].iter().map(|d| dir.path().join(d)).collect();
        for (d, bytes) in dirs.iter().zip(["{}", "{}", "{\"other\": 1}"]) {
            std::fs::create_dir_all(d).unwrap();
            std::fs::write(d.join(model::TOKENIZER_FILE), bytes).unwrap();
        }
        assert!(one_vocabulary(&dirs[..2]).is_ok());
        let err = one_vocabulary(&dirs).unwrap_err().to_string();
        let file = dirs[2].join(model::TOKENIZER_FILE);
        assert!(err.contains(&format!("model 3 has another tokenizer than the first ({})", file.display())), "{err}");
        assert!(one_vocabulary(&[]).is_ok());
    }

    fn write(dir: &Path, tensors: &[(&str, Vec<f32>, &[usize])]) {
        std::fs::create_dir_all(dir).unwrap();
        let map: HashMap<String, Tensor> = tensors
            .iter()
            .map(|(n, v, shape)| (n.to_string(), Tensor::from_vec(v.clone(), *shape, &Device::Cpu).unwrap()))
            .collect();
        candle_core::safetensors::save(&map, dir.join(model::WEIGHTS_FILE)).unwrap();
    }

    fn read(dir: &Path) -> HashMap<String, Vec<f32>> {
        crate::train::tests::saved_weights(dir).into_iter().collect()
    }

    #[test]
    fn the_soup_is_the_element_wise_mean_and_mismatched_ingredients_are_named() {
        let root = tempfile::tempdir().unwrap();
        let (a, b, c) = (root.path().join("a"), root.path().join("b"), root.path().join("c"));
        write(&a, &[("w", vec![1.0, 2.0, 3.0, 4.0], &[2, 2]), ("b", vec![0.0], &[1])]);
        write(&b, &[("w", vec![3.0, 2.0, 1.0, 0.0], &[2, 2]), ("b", vec![1.0], &[1])]);
        write(&c, &[("w", vec![2.0, 2.0, 2.0, 8.0], &[2, 2]), ("b", vec![2.0], &[1])]);
        // Written over the first ingredient, as `train` does.
        mean_weights(&[a.clone(), b.clone(), c.clone()], &a).unwrap();
        let soup = read(&a);
        assert_eq!(soup["w"], [2.0, 2.0, 2.0, 4.0]);
        assert_eq!(soup["b"], [1.0]);

        let other_shape = root.path().join("d");
        write(&other_shape, &[("w", vec![1.0, 2.0, 3.0, 4.0], &[4]), ("b", vec![0.0], &[1])]);
        let err = mean_weights(&[b.clone(), other_shape.clone()], &b).unwrap_err().to_string();
        assert!(
            err.contains("d/model.safetensors") && err.contains("tensor \"w\" is [4], the first ingredient's [2, 2]"),
            "{err}"
        );
        let other_name = root.path().join("e");
        write(&other_name, &[("w", vec![1.0, 2.0, 3.0, 4.0], &[2, 2]), ("x", vec![0.0], &[1])]);
        let err = mean_weights(&[b.clone(), other_name], &b).unwrap_err().to_string();
        assert!(err.contains("tensor \"x\" is not in the first ingredient"), "{err}");
        let missing = mean_weights(&[b.clone(), root.path().join("none")], &b).unwrap_err().to_string();
        assert!(
            missing.contains("none/model.safetensors") && missing.contains("cannot read an ingredient"),
            "{missing}"
        );
        assert_eq!(read(&b)["w"], [3.0, 2.0, 1.0, 0.0], "a failed soup leaves the first ingredient as it was");
    }
}

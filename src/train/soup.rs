//! `--soup N`: a uniform model soup (Wortsman et al., 2022). N models are
//! fine-tuned from the same initial weights on the same split, each with its
//! own order of examples, dropout and augmentation, each keeping its best dev
//! epoch; the model saved is the element-wise mean of their weights — one
//! `BertForSequenceClassification` of the same size and speed, where an
//! ensemble would be N of them and distillation a second training.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use super::checkpoint::replace_file;
use super::TrainError;
use crate::model::{self, ModelError};

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

#[cfg(test)]
mod tests {
    use super::*;

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

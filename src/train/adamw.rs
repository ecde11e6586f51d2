//! AdamW as `candle_nn::AdamW` computes it, one pass per parameter on the CPU.
//!
//! candle's step is a chain of fifteen tensor ops per parameter (`optim.rs`),
//! each a pass over the tensor and an allocation; over the model's 1.45 M
//! parameters it was a tenth of a training step. [`AdamW::step`] does the same
//! arithmetic element by element, operation for operation and in the same
//! order — each `tensor * f64` an `x * (f64 as f32) + 0.0` in f32, as candle's
//! `affine` — so a seed's model stays the same to the bit (tested below).
//! Tensors that are not f32 on the CPU take candle's ops.

use candle_core::{backprop::GradStore, Result, Tensor, Var};
use candle_nn::ParamsAdamW;

use crate::model::bert::{affine, cpu_f32_slice};

/// One parameter and its two moments.
struct Slot {
    var: Var,
    first_moment: Var,
    second_moment: Var,
}

/// AdamW with decoupled weight decay, `candle_nn::AdamW`'s arithmetic.
pub struct AdamW {
    slots: Vec<Slot>,
    params: ParamsAdamW,
    step_t: usize,
}

/// The step's scalars, as candle derives them in f64.
#[derive(Clone, Copy)]
struct Scalars {
    lr: f64,
    lr_lambda: f64,
    beta1: f64,
    beta2: f64,
    scale_m: f64,
    scale_v: f64,
    eps: f64,
}

impl AdamW {
    pub fn new(vars: Vec<Var>, params: ParamsAdamW) -> Result<Self> {
        let slots = vars
            .into_iter()
            .filter(|var| var.dtype().is_float())
            .map(|var| {
                let first_moment = Var::zeros(var.shape(), var.dtype(), var.device())?;
                let second_moment = Var::zeros(var.shape(), var.dtype(), var.device())?;
                Ok(Slot { var, first_moment, second_moment })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { slots, params, step_t: 0 })
    }

    pub fn set_learning_rate(&mut self, lr: f64) {
        self.params.lr = lr
    }

    /// One update of every parameter that has a gradient in `grads`.
    pub fn step(&mut self, grads: &GradStore) -> Result<()> {
        self.step_t += 1;
        let p = &self.params;
        let s = Scalars {
            lr: p.lr,
            lr_lambda: p.lr * p.weight_decay,
            beta1: p.beta1,
            beta2: p.beta2,
            scale_m: 1f64 / (1f64 - p.beta1.powi(self.step_t as i32)),
            scale_v: 1f64 / (1f64 - p.beta2.powi(self.step_t as i32)),
            eps: p.eps,
        };
        for slot in &self.slots {
            if let Some(g) = grads.get(slot.var.as_tensor()) {
                match fused(slot, g, s)? {
                    Some([m, v, theta]) => {
                        let (shape, device) = (slot.var.shape(), slot.var.device());
                        slot.first_moment.set(&Tensor::from_vec(m, shape, device)?)?;
                        slot.second_moment.set(&Tensor::from_vec(v, shape, device)?)?;
                        slot.var.set(&Tensor::from_vec(theta, shape, device)?)?;
                    }
                    None => with_ops(slot, g, s)?,
                }
            }
        }
        Ok(())
    }
}

/// The step of one parameter in one pass: the new first moment, second moment
/// and value; `None` unless all four tensors are contiguous f32 on the CPU.
fn fused(slot: &Slot, g: &Tensor, s: Scalars) -> Result<Option<[Vec<f32>; 3]>> {
    let g = g.contiguous()?;
    let (gs, gl) = g.storage_and_layout();
    let (ts, tl) = slot.var.storage_and_layout();
    let (ms, ml) = slot.first_moment.storage_and_layout();
    let (vs, vl) = slot.second_moment.storage_and_layout();
    let (Some(g), Some(theta), Some(m), Some(v)) =
        (cpu_f32_slice(&gs, gl), cpu_f32_slice(&ts, tl), cpu_f32_slice(&ms, ml), cpu_f32_slice(&vs, vl))
    else {
        return Ok(None);
    };
    let n = g.len();
    let (mut next_m, mut next_v, mut next_theta) = (vec![0f32; n], vec![0f32; n], vec![0f32; n]);
    let inputs = g.iter().zip(theta).zip(m.iter().zip(v));
    let outputs = next_m.iter_mut().zip(next_v.iter_mut()).zip(next_theta.iter_mut());
    for (((&g, &theta), (&m, &v)), ((nm, nv), nt)) in inputs.zip(outputs) {
        // next_m = m * beta1 + g * (1 - beta1); next_v = v * beta2 + g² * (1 - beta2)
        *nm = affine(m, s.beta1, 0.) + affine(g, 1.0 - s.beta1, 0.);
        *nv = affine(v, s.beta2, 0.) + affine(g * g, 1.0 - s.beta2, 0.);
        let m_hat = affine(*nm, s.scale_m, 0.);
        let v_hat = affine(*nv, s.scale_v, 0.);
        // theta * (1 - lr·λ) - lr · m̂ / (√v̂ + eps)
        let adjusted = m_hat / affine(v_hat.sqrt(), 1., s.eps);
        *nt = affine(theta, 1f64 - s.lr_lambda, 0.) - affine(adjusted, s.lr, 0.);
    }
    Ok(Some([next_m, next_v, next_theta]))
}

/// candle's own step, tensor op by tensor op, for anything [`fused`] does not take.
fn with_ops(slot: &Slot, g: &Tensor, s: Scalars) -> Result<()> {
    let (theta, m, v) = (&slot.var, &slot.first_moment, &slot.second_moment);
    let next_m = ((m.as_tensor() * s.beta1)? + (g * (1.0 - s.beta1))?)?;
    let next_v = ((v.as_tensor() * s.beta2)? + (g.sqr()? * (1.0 - s.beta2))?)?;
    let m_hat = (&next_m * s.scale_m)?;
    let v_hat = (&next_v * s.scale_v)?;
    let next_theta = (theta.as_tensor() * (1f64 - s.lr_lambda))?;
    let adjusted_grad = (m_hat / (v_hat.sqrt()? + s.eps)?)?;
    let next_theta = (next_theta - (adjusted_grad * s.lr)?)?;
    m.set(&next_m)?;
    v.set(&next_v)?;
    theta.set(&next_theta)
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor, Var};
    use candle_nn::{Optimizer, ParamsAdamW};

    use super::AdamW;

    /// Five steps with weight decay and a changing learning rate give
    /// `candle_nn::AdamW`'s parameters to the bit, zero gradients included
    /// (the tensor's second half is not in the loss).
    #[test]
    fn same_bits_as_candles_adamw() {
        let init: Vec<f32> = (0..200).map(|i| ((i * 7919) % 997) as f32 / 997.0 - 0.5).collect();
        let target =
            Tensor::from_vec((0..100).map(|i| (i as f32).sin()).collect::<Vec<_>>(), 100, &Device::Cpu).unwrap();
        let params = ParamsAdamW { lr: 1e-3, weight_decay: 0.01, ..Default::default() };
        let (ours, theirs) =
            (Var::from_vec(init.clone(), 200, &Device::Cpu).unwrap(), Var::from_vec(init, 200, &Device::Cpu).unwrap());
        let mut ours_opt = AdamW::new(vec![ours.clone()], params.clone()).unwrap();
        let mut theirs_opt = candle_nn::AdamW::new(vec![theirs.clone()], params).unwrap();
        let grads = |var: &Var| {
            let loss = (var.narrow(0, 0, 100).unwrap() - &target).unwrap().sqr().unwrap().sum_all().unwrap();
            loss.backward().unwrap()
        };
        for step in 1..=5 {
            ours_opt.set_learning_rate(1e-3 * step as f64);
            theirs_opt.set_learning_rate(1e-3 * step as f64);
            ours_opt.step(&grads(&ours)).unwrap();
            theirs_opt.step(&grads(&theirs)).unwrap();
            let bits = |v: &Var| v.to_vec1::<f32>().unwrap().iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&ours), bits(&theirs), "step {step}");
        }
    }
}

//! `--ema DECAY`: an exponential moving average of the weights over the
//! optimiser's steps (Polyak averaging). The epochs are judged on the dev
//! split, and saved, with the averaged weights; training itself goes on with
//! the trained ones.

use candle_core::{Tensor, Var};

use super::TrainError;

/// The averaged copy of every trainable variable.
pub(super) struct Ema {
    decay: f64,
    updates: usize,
    /// One tensor a variable, in the variables' order; detached, so that no graph grows across steps.
    shadow: Vec<Tensor>,
}

impl Ema {
    /// Starts the average at the variables' current values.
    pub(super) fn new(decay: f64, vars: &[Var]) -> Result<Self, TrainError> {
        let shadow = vars.iter().map(|v| v.as_tensor().detach().copy()).collect::<Result<_, _>>()?;
        Ok(Self { decay, updates: 0, shadow })
    }

    /// The decay of the `n`-th update (from 1): `min(decay, (1 + n) / (10 + n))`, so that the
    /// starting weights do not linger in the average of a short run.
    fn decay_at(&self, n: usize) -> f64 {
        self.decay.min((1 + n) as f64 / (10 + n) as f64)
    }

    /// Moves the average towards the variables' values after an optimiser step.
    pub(super) fn update(&mut self, vars: &[Var]) -> Result<(), TrainError> {
        self.updates += 1;
        let d = self.decay_at(self.updates);
        for (shadow, var) in self.shadow.iter_mut().zip(vars) {
            *shadow = ((&*shadow * d)? + (var.as_tensor().detach() * (1.0 - d))?)?;
        }
        Ok(())
    }

    /// Runs `f` with the averaged weights in the variables, then puts the trained ones back
    /// (whether `f` succeeded or not).
    pub(super) fn with_average<T>(
        &self,
        vars: &[Var],
        f: impl FnOnce() -> Result<T, TrainError>,
    ) -> Result<T, TrainError> {
        let trained = vars.iter().map(|v| v.as_tensor().detach().copy()).collect::<Result<Vec<_>, _>>()?;
        for (var, shadow) in vars.iter().zip(&self.shadow) {
            var.set(shadow)?;
        }
        let result = f();
        for (var, value) in vars.iter().zip(&trained) {
            var.set(value)?;
        }
        result
    }
}

/// Runs `f` with the averaged weights when there is an average, with the trained ones otherwise.
pub(super) fn judged<T>(
    ema: Option<&Ema>,
    vars: &[Var],
    f: impl FnOnce() -> Result<T, TrainError>,
) -> Result<T, TrainError> {
    match ema {
        Some(ema) => ema.with_average(vars, f),
        None => f(),
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    /// The average follows the documented recursion; `with_average` shows it and restores the
    /// trained values afterwards, also when the closure fails.
    #[test]
    fn the_average_follows_its_recursion_and_the_trained_weights_come_back() {
        let var = Var::from_slice(&[0.0f32, 10.0], 2, &Device::Cpu).unwrap();
        let mut ema = Ema::new(0.9, std::slice::from_ref(&var)).unwrap();
        let mut expected = [0.0f64, 10.0];
        for step in 1..=30usize {
            let value = [step as f64, 10.0 - step as f64];
            var.set(&Tensor::new(&[value[0] as f32, value[1] as f32], &Device::Cpu).unwrap()).unwrap();
            ema.update(std::slice::from_ref(&var)).unwrap();
            let d = 0.9f64.min((1 + step) as f64 / (10 + step) as f64);
            for (e, v) in expected.iter_mut().zip(value) {
                *e = d * *e + (1.0 - d) * v;
            }
        }
        let seen = ema.with_average(std::slice::from_ref(&var), || Ok(var.as_tensor().to_vec1::<f32>()?)).unwrap();
        for (s, e) in seen.iter().zip(expected) {
            assert!((*s as f64 - e).abs() < 1e-4, "{seen:?} against {expected:?}");
        }
        assert_eq!(var.as_tensor().to_vec1::<f32>().unwrap(), vec![30.0, -20.0]);
        let failed: Result<(), TrainError> =
            ema.with_average(std::slice::from_ref(&var), || Err(TrainError::Options("x".into())));
        assert!(failed.is_err());
        assert_eq!(var.as_tensor().to_vec1::<f32>().unwrap(), vec![30.0, -20.0]);
    }
}

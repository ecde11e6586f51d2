//! `--ema DECAY`: an exponential moving average of the weights over the
//! optimiser's steps (Polyak averaging), bias-corrected as Adam's moments are,
//! so that it averages the trained weights only, not the base's. The epochs are judged on the dev
//! split, and saved, with the averaged weights; training itself goes on with
//! the trained ones.

use candle_core::{Tensor, Var};

use super::TrainError;

/// The averaged copy of every trainable variable.
pub(super) struct Ema {
    decay: f64,
    updates: i32,
    /// `decay`-weighted sums of the values after each step, started at zero (divided by
    /// `1 − decay^updates` to give the average, as Adam corrects its moments): one tensor a
    /// variable, in the variables' order; detached, so that no graph grows across steps.
    sums: Vec<Tensor>,
}

impl Ema {
    /// An empty average: until the first step it is the variables' current values.
    pub(super) fn new(decay: f64, vars: &[Var]) -> Result<Self, TrainError> {
        let sums = vars.iter().map(|v| v.as_tensor().zeros_like()).collect::<Result<_, _>>()?;
        Ok(Self { decay, updates: 0, sums })
    }

    /// Adds the variables' values after an optimiser step.
    pub(super) fn update(&mut self, vars: &[Var]) -> Result<(), TrainError> {
        self.updates += 1;
        for (sum, var) in self.sums.iter_mut().zip(vars) {
            *sum = ((&*sum * self.decay)? + (var.as_tensor().detach() * (1.0 - self.decay))?)?;
        }
        Ok(())
    }

    /// The average of the values after each step so far, step `k` of `n` weighted by
    /// `decay^(n − k)`; `None` before the first step.
    fn average(&self) -> Result<Option<Vec<Tensor>>, TrainError> {
        if self.updates == 0 {
            return Ok(None);
        }
        let scale = 1.0 / (1.0 - self.decay.powi(self.updates));
        Ok(Some(self.sums.iter().map(|s| s * scale).collect::<Result<_, _>>()?))
    }

    /// Runs `f` with the averaged weights in the variables, then puts the trained ones back
    /// (whether `f` succeeded or not).
    pub(super) fn with_average<T>(
        &self,
        vars: &[Var],
        f: impl FnOnce() -> Result<T, TrainError>,
    ) -> Result<T, TrainError> {
        let Some(average) = self.average()? else { return f() };
        let trained = vars.iter().map(|v| v.as_tensor().detach().copy()).collect::<Result<Vec<_>, _>>()?;
        for (var, value) in vars.iter().zip(&average) {
            var.set(value)?;
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

    /// The average is the decay-weighted mean of the values after each step (the starting values
    /// not among them); `with_average` shows it and restores the trained values afterwards, also
    /// when the closure fails.
    #[test]
    fn the_average_weighs_each_step_by_its_age_and_the_trained_weights_come_back() {
        let var = Var::from_slice(&[0.0f32, 10.0], 2, &Device::Cpu).unwrap();
        let mut ema = Ema::new(0.9, std::slice::from_ref(&var)).unwrap();
        assert_eq!(ema_values(&ema, &var), vec![0.0, 10.0], "before any step: the values as they are");
        let steps = 30usize;
        for step in 1..=steps {
            let value = [step as f32, 10.0 - step as f32];
            var.set(&Tensor::new(&value, &Device::Cpu).unwrap()).unwrap();
            ema.update(std::slice::from_ref(&var)).unwrap();
        }
        let weights: Vec<f64> = (1..=steps).map(|k| 0.9f64.powi((steps - k) as i32)).collect();
        let total: f64 = weights.iter().sum();
        let expected: Vec<f64> = [|k: f64| k, |k: f64| 10.0 - k]
            .iter()
            .map(|value| (1..=steps).zip(&weights).map(|(k, w)| w * value(k as f64)).sum::<f64>() / total)
            .collect();
        let seen = ema_values(&ema, &var);
        for (s, e) in seen.iter().zip(&expected) {
            assert!((*s as f64 - e).abs() < 1e-4, "{seen:?} against {expected:?}");
        }
        assert_eq!(var.as_tensor().to_vec1::<f32>().unwrap(), vec![30.0, -20.0]);
        let failed: Result<(), TrainError> =
            ema.with_average(std::slice::from_ref(&var), || Err(TrainError::Options("x".into())));
        assert!(failed.is_err());
        assert_eq!(var.as_tensor().to_vec1::<f32>().unwrap(), vec![30.0, -20.0]);
    }

    fn ema_values(ema: &Ema, var: &Var) -> Vec<f32> {
        ema.with_average(std::slice::from_ref(var), || Ok(var.as_tensor().to_vec1::<f32>()?)).unwrap()
    }
}

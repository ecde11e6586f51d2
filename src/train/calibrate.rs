//! Temperature scaling: the one-parameter calibration fitted on the dev
//! split after training. Scores become softmax(logits / T); T > 1 softens
//! over-confident scores, T < 1 sharpens timid ones, and no prediction
//! changes label.

/// Mean negative log-likelihood of the true classes under softmax(logits / t).
pub fn nll(logits: &[Vec<f32>], targets: &[usize], t: f64) -> f64 {
    if logits.is_empty() {
        return 0.0;
    }
    let total: f64 = logits
        .iter()
        .zip(targets)
        .map(|(row, &y)| {
            let scaled: Vec<f64> = row.iter().map(|&z| z as f64 / t).collect();
            let max = scaled.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let log_sum = max + scaled.iter().map(|z| (z - max).exp()).sum::<f64>().ln();
            log_sum - scaled[y]
        })
        .sum();
    total / logits.len() as f64
}

/// The temperature in [0.05, 20] that minimises the dev split's negative
/// log-likelihood (golden-section search on log T: the NLL is unimodal in
/// it). Deterministic; 1 when there is nothing to fit on.
pub fn fit_temperature(logits: &[Vec<f32>], targets: &[usize]) -> f64 {
    if logits.is_empty() {
        return 1.0;
    }
    let f = |log_t: f64| nll(logits, targets, log_t.exp());
    let (mut a, mut b) = (0.05f64.ln(), 20f64.ln());
    let ratio = (5f64.sqrt() - 1.0) / 2.0;
    let mut c = b - ratio * (b - a);
    let mut d = a + ratio * (b - a);
    let (mut fc, mut fd) = (f(c), f(d));
    for _ in 0..80 {
        if fc < fd {
            b = d;
            d = c;
            fd = fc;
            c = b - ratio * (b - a);
            fc = f(c);
        } else {
            a = c;
            c = d;
            fc = fd;
            d = a + ratio * (b - a);
            fd = f(d);
        }
    }
    ((a + b) / 2.0).exp()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn softens_an_over_confident_model() {
        // Logit gap 8 (score 0.9997) but right 3 times out of 4: the best
        // temperature makes the score about 0.75, i.e. a gap of ln 3.
        let logits = vec![vec![8.0, 0.0]; 4];
        let t = fit_temperature(&logits, &[0, 0, 0, 1]);
        assert!((8.0 / t - 3f64.ln()).abs() < 1e-3, "T = {t}");
        assert!(nll(&logits, &[0, 0, 0, 1], t) < nll(&logits, &[0, 0, 0, 1], 1.0));
    }

    #[test]
    fn sharpens_a_timid_model() {
        // Always right with a small gap: the lowest temperature allowed wins.
        let logits = vec![vec![0.0, 0.5], vec![0.4, 0.0]];
        let t = fit_temperature(&logits, &[1, 0]);
        assert!(t < 0.06, "T = {t}");
        assert_eq!(fit_temperature(&[], &[]), 1.0);
    }

    #[test]
    fn nll_of_uniform_scores_is_log_k() {
        let logits = vec![vec![1.0, 1.0, 1.0]];
        assert!((nll(&logits, &[2], 1.0) - 3f64.ln()).abs() < 1e-12);
    }
}

//! triagem and Hugging Face `transformers` agree on the same checkpoint.
//!
//! The reference values come from `tests/reference/make_reference.py`
//! (committed with its outputs): one tiny model created and saved by
//! `transformers`, served here; one trained and saved by `triagem train`,
//! loaded there. Token ids must match exactly; the encoder's last hidden
//! states and the logits within 1e-4. Each fixture's logits must also differ
//! between texts by far more than that tolerance, and its predictions must
//! not all be one label, so that a model ignoring its input could not pass.
//! Both ways of computing are checked: the CPU serving path (what
//! `Classifier::load` serves with) and candle's tensor path
//! (`Classifier::load_tensor_path`: training, the GPU, hidden states).

use std::path::Path;

use candle_core::Device;
use serde::Deserialize;
use triagem::model::Classifier;

#[derive(Deserialize)]
struct Reference {
    texts: Vec<String>,
    input_ids: Vec<Vec<u32>>,
    logits: Vec<Vec<f32>>,
    predictions: Vec<String>,
    last_hidden_state: Vec<Vec<Vec<f32>>>,
}

/// The largest absolute difference between two equally shaped lists of numbers.
fn max_difference<'a>(ours: impl Iterator<Item = &'a f32>, theirs: impl Iterator<Item = &'a f32>) -> f32 {
    ours.zip(theirs).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max)
}

fn check(fixture: &str) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(fixture);
    let reference: Reference =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap()).unwrap();
    let classifier = Classifier::load(&dir, &Device::Cpu).unwrap();
    let texts: Vec<&str> = reference.texts.iter().map(String::as_str).collect();

    let encoded = classifier.encoder().encode(&texts).unwrap();
    assert_eq!(encoded.ids, reference.input_ids, "{fixture}: token ids differ from transformers'");

    // The fixture itself: texts must get visibly different logits and more than one label.
    let spread = (0..reference.logits[0].len())
        .map(|j| {
            let column = reference.logits.iter().map(|row| row[j]);
            column.clone().fold(f32::MIN, f32::max) - column.fold(f32::MAX, f32::min)
        })
        .fold(0.0, f32::max);
    assert!(spread > 0.1, "{fixture}: logits barely depend on the text (spread {spread}); regenerate the fixture");
    let mut labels = reference.predictions.clone();
    labels.dedup();
    assert!(labels.len() > 1, "{fixture}: every text gets {labels:?}; regenerate the fixture");

    let tensor_path = Classifier::load_tensor_path(&dir, &Device::Cpu).unwrap();
    assert!(classifier.serves_on_cpu_path() && !tensor_path.serves_on_cpu_path());
    let hidden = tensor_path.hidden_states(&texts).unwrap();
    assert_eq!(hidden.len(), reference.last_hidden_state.len());
    for (ours, theirs) in hidden.iter().zip(&reference.last_hidden_state) {
        assert_eq!((ours.len(), ours[0].len()), (theirs.len(), theirs[0].len()), "{fixture}: hidden state shape");
    }
    let flat = |h: &Vec<Vec<Vec<f32>>>| h.iter().flatten().flatten().copied().collect::<Vec<f32>>();
    let (ours, theirs) = (flat(&hidden), flat(&reference.last_hidden_state));
    let worst_hidden = max_difference(ours.iter(), theirs.iter());
    println!("{fixture}: max |last hidden state difference| = {worst_hidden:e}");
    assert!(worst_hidden < 1e-4, "{fixture}: hidden states differ from transformers' by {worst_hidden}");

    for (path, c) in [("serving", &classifier), ("tensor", &tensor_path)] {
        let logits = c.logits(&texts).unwrap();
        assert_eq!(logits.len(), reference.logits.len());
        let worst = max_difference(logits.iter().flatten(), reference.logits.iter().flatten());
        println!("{fixture}, {path} path: max |logit difference| = {worst:e}");
        assert!(worst < 1e-4, "{fixture}, {path} path: logits differ from transformers' by {worst}");

        let predicted: Vec<String> = c.predict(&texts).unwrap().into_iter().map(|p| p.label).collect();
        assert_eq!(predicted, reference.predictions, "{fixture}, {path} path");
    }
    // The serving path has no hidden states to give: one sentence, not a panic.
    let refused = classifier.hidden_states(&texts).unwrap_err().to_string();
    assert!(refused.contains("hidden states: only the tensor path"), "{refused}");
}

#[test]
fn serves_a_checkpoint_saved_by_transformers() {
    check("hf-tiny-bert");
}

#[test]
fn transformers_reads_a_checkpoint_saved_by_triagem() {
    check("tiny-model");
}

#[test]
fn a_third_label_from_config_is_served() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf-tiny-bert");
    let classifier = Classifier::load(&dir, &Device::Cpu).unwrap();
    assert_eq!(classifier.labels(), ["financeiro", "suporte", "venda"]);
    let p = &classifier.predict(&["oi"]).unwrap()[0];
    assert_eq!(p.scores.len(), 3);
    assert!((p.scores.iter().map(|(_, s)| s).sum::<f32>() - 1.0).abs() < 1e-5);
}

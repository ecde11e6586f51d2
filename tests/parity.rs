//! triagem and Hugging Face `transformers` agree on the same checkpoint.
//!
//! The reference values come from `tests/reference/make_reference.py`
//! (committed with its outputs): one tiny model created and saved by
//! `transformers`, served here; one trained and saved by `triagem train`,
//! loaded there. Token ids must match exactly, logits within 1e-4.

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
}

fn check(fixture: &str) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(fixture);
    let reference: Reference =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap()).unwrap();
    let classifier = Classifier::load(&dir, &Device::Cpu).unwrap();
    let texts: Vec<&str> = reference.texts.iter().map(String::as_str).collect();

    let encoded = classifier.encoder().encode(&texts).unwrap();
    assert_eq!(encoded.ids, reference.input_ids, "{fixture}: token ids differ from transformers'");

    let logits = classifier.logits(&texts).unwrap();
    let mut worst = 0f32;
    for (ours, theirs) in logits.iter().zip(&reference.logits) {
        assert_eq!(ours.len(), theirs.len());
        for (a, b) in ours.iter().zip(theirs) {
            worst = worst.max((a - b).abs());
        }
    }
    println!("{fixture}: max |logit difference| = {worst:e}");
    assert!(worst < 1e-4, "{fixture}: logits differ from transformers' by {worst}");

    let predicted: Vec<String> = classifier.predict(&texts).unwrap().into_iter().map(|p| p.label).collect();
    assert_eq!(predicted, reference.predictions);
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

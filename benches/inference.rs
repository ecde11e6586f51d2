//! Inference speed and memory of the classifier, side by side with a baseline,
//! in one run: `cargo bench --bench inference [-- MODEL_DIR]`.
//!
//! For batch sizes 1, 8 and 32 over the messages of `data/teste.jsonl`
//! (tokenised once, outside the timing), it times one forward pass of:
//! - **triagem**: `model::BertClassifier` in evaluation mode (fused layer norm
//!   and softmax), encoder + pooler + head;
//! - **baseline**: `candle_transformers::models::bert::BertModel` on the same
//!   weights and inputs, encoder only (the stock candle BERT).
//!
//! Prints a table and one JSON object (last line). Memory is the process's
//! resident set before and after loading the model. Figures are for this
//! machine and this moment: compare rows of the same run, not across runs.

use std::path::PathBuf;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use serde_json::json;
use triagem::model::{self, bert, BertClassifier, Classifier, Mode};

const BATCHES: [usize; 3] = [1, 8, 32];
/// Messages timed per (model, batch size).
const MESSAGES: usize = 256;

fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

fn main() -> anyhow::Result<()> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let dir = std::env::args().skip(1).find(|a| !a.starts_with('-')).map(PathBuf::from).unwrap_or_else(|| {
        let default = root.join("models/triagem");
        if default.join("model.safetensors").is_file() {
            default
        } else {
            root.join("tests/fixtures/tiny-model")
        }
    });
    let device = Device::Cpu;
    let rss_before = rss_bytes();
    let classifier = Classifier::load(&dir, &device)?;
    let rss_loaded = rss_bytes();

    let data = triagem::data::Dataset::load(&root.join("data/teste.jsonl"), None)?;
    let texts: Vec<&str> = data.examples.iter().map(|e| e.text.as_str()).cycle().take(MESSAGES).collect();

    let cfg = model::read_config(&dir)?;
    let weights = dir.join(model::WEIGHTS_FILE);
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[&weights], DType::F32, &device)? };
    let ours = BertClassifier::load(&cfg, cfg.id2label.len(), vb.clone())?;
    let baseline_cfg: candle_transformers::models::bert::Config =
        serde_json::from_str(&std::fs::read_to_string(dir.join(model::CONFIG_FILE))?)?;
    let baseline = candle_transformers::models::bert::BertModel::load(vb, &baseline_cfg)?;

    println!(
        "model {} ({}), {} messages per row, CPU threads {}",
        dir.display(),
        classifier.info().version,
        MESSAGES,
        candle_core::utils::get_num_threads()
    );
    println!("{:<10} {:>6} {:>12} {:>16}", "impl", "batch", "msg/s", "ms/batch (mean)");
    let mut rows = Vec::new();
    for &batch in &BATCHES {
        let batches: Vec<(Tensor, Tensor, Tensor)> = texts
            .chunks(batch)
            .map(|chunk| {
                let enc = classifier.encoder().encode(chunk).unwrap();
                let (ids, mask) = bert::batch_tensors(&enc.ids, &enc.masks, &device).unwrap();
                let types = ids.zeros_like().unwrap();
                (ids, mask, types)
            })
            .collect();
        for name in ["triagem", "baseline"] {
            // One warm-up batch, then the timed pass over all messages.
            let run = |(ids, mask, types): &(Tensor, Tensor, Tensor)| -> candle_core::Result<()> {
                match name {
                    "triagem" => ours.forward(ids, mask, &mut Mode::Eval)?.to_vec2::<f32>().map(drop),
                    _ => baseline.forward(ids, types, Some(mask))?.sum_all()?.to_scalar::<f32>().map(drop),
                }
            };
            run(&batches[0])?;
            let start = Instant::now();
            for b in &batches {
                run(b)?;
            }
            let secs = start.elapsed().as_secs_f64();
            let msg_s = MESSAGES as f64 / secs;
            let ms_batch = secs * 1000.0 / batches.len() as f64;
            println!("{name:<10} {batch:>6} {msg_s:>12.1} {ms_batch:>16.2}");
            rows.push(json!({"impl": name, "batch": batch, "messages_per_second": msg_s, "ms_per_batch": ms_batch}));
        }
    }
    println!(
        "resident memory: {:.1} MiB before loading, {:.1} MiB with the model",
        rss_before as f64 / 1048576.0,
        rss_loaded as f64 / 1048576.0
    );
    println!(
        "{}",
        json!({
            "model": dir, "model_version": classifier.info().version, "messages": MESSAGES,
            "rss_bytes_before_load": rss_before, "rss_bytes_loaded": rss_loaded, "results": rows,
        })
    );
    Ok(())
}

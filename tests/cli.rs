//! The `train`, `eval` and `classify` commands as a user runs them: bad
//! inputs give one clear error line and a non-zero exit; the same seed and
//! data give the same model and metrics.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn triagem(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_triagem"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("RUST_LOG", "warn")
        .output()
        .expect("run triagem")
}

fn fixture() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-model").display().to_string()
}

/// Asserts a failed run whose stderr has exactly one line, starting with "error:", containing `needle`.
fn assert_one_error(out: &Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "expected failure, got success; stderr: {stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one error line, got: {stderr}");
    assert!(lines[0].starts_with("error: ") && lines[0].contains(needle), "{}", lines[0]);
}

fn write(dir: &Path, name: &str, content: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, content).unwrap();
    path.display().to_string()
}

/// The first `n` lines of the project's training file, as a small training set.
fn head_of_training_data(dir: &Path, n: usize) -> String {
    let all = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("data/treino.jsonl")).unwrap();
    write(dir, "small.jsonl", &all.lines().take(n).collect::<Vec<_>>().join("\n"))
}

#[test]
fn bad_data_line_names_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let data = write(
        dir.path(),
        "bad.jsonl",
        "{\"prompt\": \"quero uma tv\", \"completion\": \"venda\"}\n{\"prompt\": \"quebrou\", \"completion\": \"reclamação\"}\n",
    );
    let out = triagem(&["eval", "--model", &fixture(), "--data", &data]);
    assert_one_error(&out, &format!("{data}:2: unknown label \"reclamação\""));

    let train = write(dir.path(), "train.jsonl", "{\"prompt\": \"a\", \"completion\": \"venda\"}\n{\"prompt\": 5}\n");
    let out = triagem(&["train", "--base", "none", "--train", &train, "--test", &train, "--out", "/tmp/x"]);
    assert_one_error(&out, &format!("{train}:2: prompt: invalid type: integer `5`, expected a string"));
}

#[test]
fn an_error_prints_its_cause_once() {
    let out = triagem(&["eval", "--model", &fixture(), "--data", "/nonexistent/data.jsonl"]);
    assert_one_error(&out, "cannot read /nonexistent/data.jsonl: ");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.matches("os error 2").count(), 1, "the cause is repeated: {stderr}");
}

#[test]
fn log_lines_are_plain_text_or_json_off_a_terminal() {
    // A worker with a missing model fails after logging has started; its
    // log line (the config summary) goes to stderr, which is a pipe here.
    let run = |format: &str| {
        Command::new(env!("CARGO_BIN_EXE_triagem"))
            .args(["--log-format", format, "worker"])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .env("RUST_LOG", "info")
            .env("TRIAGEM__MODEL__PATH", "/nonexistent/model")
            .env("TRIAGEM__METRICS__LISTEN", "127.0.0.1:0")
            .output()
            .expect("run triagem")
    };
    let text = run("text");
    let stderr = String::from_utf8_lossy(&text.stderr);
    assert!(!text.status.success(), "{stderr}");
    assert!(stderr.lines().any(|l| l.contains("INFO")), "no log line: {stderr}");
    assert!(!stderr.contains('\x1b'), "colour codes off a terminal: {stderr:?}");

    let json = run("json");
    let stderr = String::from_utf8_lossy(&json.stderr);
    let logs: Vec<serde_json::Value> = stderr
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).expect("a JSON log line"))
        .collect();
    assert!(!logs.is_empty(), "no JSON log line: {stderr}");
    assert!(logs.iter().all(|v| v["level"].is_string() && v["fields"].is_object()), "{logs:?}");
    assert!(stderr.lines().last().unwrap().starts_with("error: "), "{stderr}");
}

#[test]
fn missing_and_corrupt_model_directories_are_one_error_each() {
    let out = triagem(&["classify", "--model", "/nonexistent/model", "oi"]);
    assert_one_error(&out, "model directory /nonexistent/model has no config.json");

    let dir = tempfile::tempdir().unwrap();
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(Path::new(&fixture()).join(f), dir.path().join(f)).unwrap();
    }
    let model = dir.path().display().to_string();
    let out = triagem(&["classify", "--model", &model, "oi"]);
    assert_one_error(&out, "has no model.safetensors");

    std::fs::write(dir.path().join("model.safetensors"), b"this is not a safetensors file").unwrap();
    let out = triagem(&["classify", "--model", &model, "oi"]);
    assert_one_error(&out, "model.safetensors: cannot load weights");

    std::fs::write(dir.path().join("config.json"), b"{\"model_type\": \"bert\"").unwrap();
    let out = triagem(&["classify", "--model", &model, "oi"]);
    assert_one_error(&out, "config.json: not a BERT config.json");
}

#[test]
fn unknown_base_is_one_error() {
    let out = triagem(&["train", "--base", "./no-such-base", "--out", "/tmp/never"]);
    assert_one_error(&out, "--base \"./no-such-base\" is neither `none` nor an existing model directory");
}

/// The default base is a relative path: run elsewhere, the error says where it comes from and what to do.
#[test]
fn a_missing_default_base_says_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_triagem"))
        .args(["train", "--out", "never"])
        .current_dir(dir.path())
        .env("RUST_LOG", "warn")
        .env_remove("TRIAGEM_BASE")
        .output()
        .unwrap();
    assert_one_error(&out, "--base \"models/base/triagem-ptbr\" is missing: it ships with the repository");
}

#[test]
fn classify_reads_arguments_and_stdin() {
    let out =
        triagem(&["classify", "--model", &fixture(), "--json", "quero comprar uma geladeira", "minha tv quebrou"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<serde_json::Value> =
        String::from_utf8(out.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 2);
    for l in &lines {
        let score = l["score"].as_f64().unwrap();
        assert_eq!(l["scores"][l["label"].as_str().unwrap()].as_f64().unwrap(), score);
    }

    let mut child = Command::new(env!("CARGO_BIN_EXE_triagem"))
        .args(["classify", "--model", &fixture()])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all("oi\n\ncomprei e não chegou\n".as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(text.lines().count(), 2, "{text}");
    assert!(text.lines().all(|l| l.split('\t').count() == 3));
}

#[test]
fn eval_json_has_the_documented_fields() {
    let out = triagem(&["eval", "--model", &fixture(), "--data", "data/teste.jsonl", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for key in ["accuracy", "macro_f1", "per_label", "confusion"] {
        assert!(report.get(key).is_some(), "missing {key}");
    }
    let matrix = report["confusion"]["matrix"].as_array().unwrap();
    let total: u64 = matrix.iter().flat_map(|r| r.as_array().unwrap()).map(|c| c.as_u64().unwrap()).sum();
    assert_eq!(total, report["examples"].as_u64().unwrap());
    assert!(report["per_label"]["venda"]["support"].as_u64().unwrap() > 0);
}

#[test]
fn same_seed_same_model_and_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let train = head_of_training_data(dir.path(), 600);
    let run = |out: &PathBuf| {
        let out_s = out.display().to_string();
        let o = triagem(&[
            "train",
            "--base",
            "none",
            "--train",
            &train,
            "--test",
            "data/teste.jsonl",
            "--out",
            &out_s,
            "--epochs",
            "3",
            "--scratch-hidden",
            "32",
            "--scratch-layers",
            "1",
            "--vocab-size",
            "500",
            "--lr",
            "2e-3",
            "--seed",
            "7",
            "--ensemble",
            "1",
            "--quiet",
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let metrics: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("metrics.json")).unwrap()).unwrap();
        (metrics["model_version"].clone(), metrics["test"].clone(), metrics["epochs"][1]["train_loss"].clone())
    };
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    let first = run(&a);
    assert_eq!(first, run(&b), "two runs with the same seed and data differ");
    // And the model it wrote is served by eval with the figures train reported.
    let out = triagem(&["eval", "--model", &a.display().to_string(), "--data", "data/teste.jsonl", "--json"]);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["accuracy"], first.1["accuracy"]);
}

/// `--test none` leaves the test file out of the run: no test report, no test entry under `data`,
/// and the same model as with a test file (the test file never shapes training).
#[test]
fn train_without_a_test_file_reports_none_and_trains_the_same_model() {
    let dir = tempfile::tempdir().unwrap();
    let train = head_of_training_data(dir.path(), 200);
    let run = |test: &str, out: &Path| -> (Output, serde_json::Value) {
        let out_s = out.display().to_string();
        let mut args = vec!["train", "--base", "none", "--train", &train, "--test", test, "--out", &out_s];
        args.extend("--scratch-hidden 16 --scratch-layers 1 --vocab-size 300 --epochs 1".split(' '));
        args.extend("--ensemble 0 --soup 0 --refit false --quiet".split(' '));
        let o = triagem(&args);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let metrics = serde_json::from_str(&std::fs::read_to_string(out.join("metrics.json")).unwrap()).unwrap();
        (o, metrics)
    };
    let (with, with_metrics) = run("data/teste.jsonl", &dir.path().join("with"));
    let (without, metrics) = run("none", &dir.path().join("without"));
    assert!(with_metrics["test"]["accuracy"].is_number() && with_metrics["data"]["test"].is_object());
    assert!(metrics["test"].is_null(), "{}", metrics["test"]);
    assert!(metrics["data"].get("test").is_none(), "{}", metrics["data"]);
    assert_eq!(metrics["model_version"], with_metrics["model_version"]);
    let stdout = String::from_utf8_lossy(&without.stdout);
    assert!(stdout.contains("no test file") && !stdout.contains("accuracy"), "{stdout}");
    assert!(String::from_utf8_lossy(&with.stdout).contains("test accuracy"));
}

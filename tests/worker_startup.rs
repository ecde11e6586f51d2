//! `triagem worker` refuses to start, with a message naming the problem, on a
//! bad config or a missing model. No broker is needed: these fail before
//! connecting.

mod worker_common;

use std::process::Command;
use std::time::{Duration, Instant};

use worker_common::*;

/// Runs `triagem worker` and returns (exit code, stderr); fails if it keeps running.
fn run_worker(config: Option<&str>, env: &[(&str, &str)]) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_triagem"));
    cmd.arg("worker");
    if let Some(text) = config {
        let path = dir.path().join("triagem.toml");
        std::fs::write(&path, text).unwrap();
        cmd.arg("--config").arg(path);
    }
    // Nothing listens here: a worker that got past its checks would hang, not fail.
    cmd.env("TRIAGEM__KAFKA__BROKERS", "127.0.0.1:1").env("TRIAGEM__METRICS__LISTEN", "127.0.0.1:0");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.stderr(std::process::Stdio::piped()).stdout(std::process::Stdio::null()).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the worker started instead of failing");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
}

fn model_line() -> String {
    format!("[model]\npath = \"{}\"\n", tiny_model().display())
}

#[test]
fn wrong_type_names_the_key() {
    let (code, err) = run_worker(Some(&format!("{}[batch]\nmax_messages = \"many\"\n", model_line())), &[]);
    assert_eq!(code, Some(1));
    assert!(err.contains("error: batch.max_messages: invalid type"), "{err}");
}

#[test]
fn unknown_key_is_rejected_by_name() {
    let (code, err) = run_worker(Some("[kafka]\nbrokerz = \"x\"\n"), &[]);
    assert_eq!(code, Some(1));
    assert!(err.contains("error: kafka.brokerz: unknown key"), "{err}");
}

#[test]
fn bad_environment_override_names_the_key() {
    let (code, err) = run_worker(Some(&model_line()), &[("TRIAGEM__BATCH__MAX_TOKENS", "lots")]);
    assert_eq!(code, Some(1));
    assert!(err.contains("error: batch.max_tokens: "), "{err}");
}

#[test]
fn invalid_value_names_the_key() {
    let (code, err) = run_worker(Some(&format!("{}[routing]\nmin_confidence = 2.0\n", model_line())), &[]);
    assert_eq!(code, Some(1));
    assert!(err.contains("error: routing.min_confidence: must be between 0 and 1"), "{err}");
}

#[test]
fn missing_config_file_is_named() {
    let (code, err) = run_worker(None, &[("TRIAGEM_CONFIG", "/nonexistent/triagem.toml")]);
    assert_eq!(code, Some(1));
    assert!(err.contains("/nonexistent/triagem.toml"), "{err}");
}

#[test]
fn missing_model_fails_at_start() {
    let (code, err) = run_worker(Some("[model]\npath = \"/nonexistent/model\"\n"), &[]);
    assert_eq!(code, Some(1));
    assert!(err.contains("error: model.path /nonexistent/model: "), "{err}");
    assert!(err.contains("config.json"), "{err}");
}

#[test]
fn a_label_without_topic_fails_at_start() {
    let cfg = format!("{}[routing.topics]\nvenda = \"so-venda\"\n", model_line());
    let (code, err) = run_worker(Some(&cfg), &[]);
    assert_eq!(code, Some(1));
    assert!(err.contains("error: routing.topics: no topic for the model's label"), "{err}");
}

#[test]
fn secrets_are_not_logged() {
    // Fails on the model, after logging its settings.
    let cfg = "[model]\npath = \"/nonexistent/model\"\n[kafka.client]\n\"sasl.password\" = \"hunter2\"\n\"sasl.username\" = \"ana\"\n";
    let (code, err) = run_worker(Some(cfg), &[("RUST_LOG", "info")]);
    assert_eq!(code, Some(1));
    assert!(err.contains("sasl.username"), "settings not logged: {err}");
    assert!(!err.contains("hunter2"), "secret leaked: {err}");
}

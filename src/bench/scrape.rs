//! What `triagem bench` reads from the worker's own `/metrics`, scraped before
//! and after a run (`--worker-metrics`, `--drain-metrics`): the Prometheus text
//! format's samples, a histogram's buckets as `histogram_quantile` reads them,
//! and from those the worker's latency over the run and its model's share of a
//! backlog's drain.

use std::collections::HashMap;
use std::time::Duration;

use serde::Serialize;
use serde_json::Value;

/// The model's share of a backlog drain: the growth of the worker's `triagem_inference_seconds_sum`
/// over the backlog run (scraped before and after; the worker read nothing else meanwhile) against
/// the time from the last send's acknowledgement (the worker is resumed then) to the last output
/// read back (loadgen's `end_to_end_seconds - send_seconds`). Not the first-to-last output span of
/// the drain rate: the first output leaves only once the forward passes of its window are done.
/// Near 1, the pipeline kept the model fed and the worker's rate is its model's on the cores it
/// shares with the rest.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Drain {
    pub messages: f64,
    pub forward_seconds: f64,
    pub span_seconds: f64,
    pub model_busy: f64,
}

/// The worker's latency over a run, from the difference of two scrapes of
/// its `/metrics`: `triagem_worker_latency_seconds` (receipt → output
/// acknowledged) as Prometheus' `histogram_quantile` reads it, and the bound
/// `batch.max_wait` + 3 × the run's mean forward pass (`triagem_inference_seconds`).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct WorkerLatency {
    pub messages: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub batches: f64,
    pub mean_batch: f64,
    pub mean_forward_ms: f64,
    pub max_wait_ms: f64,
    pub bound_ms: f64,
    /// The same messages' latency by stage (`triagem_worker_stage_seconds`), in the order they pass them.
    pub stages: Vec<StageLatency>,
}

/// One stage of the worker's latency over a run: where its p99 comes from.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct StageLatency {
    pub stage: String,
    pub mean_ms: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

/// Whether a `loadgen --json` report is of a backlog run (`--backlog`: only those carry
/// `received_while_sending`).
pub(super) fn is_backlog(report: &Value) -> bool {
    report.get("received_while_sending").is_some()
}

/// The model's share of the backlog run among `end_to_end`, from the worker's `/metrics` before and after it.
pub fn drain(before: &str, after: &str, end_to_end: &[Value]) -> Result<Drain, String> {
    let backlog = end_to_end
        .iter()
        .find(|e| is_backlog(e))
        .ok_or("--drain-metrics needs a backlog run among --end-to-end (`triagem loadgen --backlog`)")?;
    let get = |k: &str| backlog.get(k).and_then(Value::as_f64).unwrap_or(0.0);
    let forward = |text: &str| {
        samples(text)
            .get("triagem_inference_seconds_sum")
            .copied()
            .ok_or("no triagem_inference_seconds_sum in it: not a triagem worker's /metrics")
    };
    let forward_seconds = forward(after)? - forward(before)?;
    let span_seconds = get("end_to_end_seconds") - get("send_seconds");
    if span_seconds <= 0.0 {
        return Err("the backlog run has no time between its last send and its last output".into());
    }
    Ok(Drain { messages: get("accounted"), forward_seconds, span_seconds, model_busy: forward_seconds / span_seconds })
}

/// Samples of a Prometheus text exposition: `name{labels}` → value (no timestamps, no comments).
fn samples(text: &str) -> HashMap<&str, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (key, value) = l.rsplit_once(' ')?;
            Some((key, value.parse().ok()?))
        })
        .collect()
}

/// The cumulative buckets `(le, count)` of histogram `name`, sorted by `le`
/// (+Inf last); `labels` selects a series of a labelled one (`stage="queue",`
/// as the text format writes them, before `le`), "" for an unlabelled one.
fn buckets(samples: &HashMap<&str, f64>, name: &str, labels: &str) -> Vec<(f64, f64)> {
    let prefix = format!("{name}_bucket{{{labels}le=\"");
    let mut b: Vec<(f64, f64)> = samples
        .iter()
        .filter_map(|(k, v)| {
            let le = k.strip_prefix(prefix.as_str())?.strip_suffix("\"}")?;
            let le = if le == "+Inf" { f64::INFINITY } else { le.parse().ok()? };
            Some((le, *v))
        })
        .collect();
    b.sort_by(|x, y| x.0.total_cmp(&y.0));
    b
}

/// Prometheus' `histogram_quantile`: linear inside the bucket holding the
/// rank (the first bucket starts at 0); the highest finite bound when the
/// rank falls in +Inf.
fn histogram_quantile(q: f64, buckets: &[(f64, f64)]) -> f64 {
    let Some(&(_, total)) = buckets.last() else { return f64::NAN };
    if total <= 0.0 {
        return f64::NAN;
    }
    let rank = q * total;
    let (mut lower, mut below) = (0.0, 0.0);
    for &(le, count) in buckets {
        if count >= rank {
            if le.is_infinite() {
                return lower;
            }
            return if count > below { lower + (le - lower) * (rank - below) / (count - below) } else { le };
        }
        (lower, below) = (le, count);
    }
    lower
}

/// The worker's latency between two scrapes of its `/metrics` (see [`WorkerLatency`]).
pub fn worker_latency(before: &str, after: &str, max_wait: Duration) -> Result<WorkerLatency, String> {
    let (b, a) = (samples(before), samples(after));
    let diff = |name: &str, labels: &str| -> Result<Vec<(f64, f64)>, String> {
        let (old, new) = (buckets(&b, name, labels), buckets(&a, name, labels));
        if new.is_empty() || old.len() != new.len() {
            return Err(format!("no {name} histogram in both scrapes (a triagem worker's /metrics?)"));
        }
        Ok(new.iter().zip(&old).map(|(n, o)| (n.0, n.1 - o.1)).collect())
    };
    let delta = |name: &str| a.get(name).copied().unwrap_or(0.0) - b.get(name).copied().unwrap_or(0.0);
    let latency = diff("triagem_worker_latency_seconds", "")?;
    let messages = latency.last().map_or(0.0, |l| l.1);
    if messages <= 0.0 {
        return Err("the worker acknowledged no output between the two scrapes".into());
    }
    let batches = delta("triagem_inference_seconds_count");
    let mean_forward_ms = 1000.0 * delta("triagem_inference_seconds_sum") / batches.max(1.0);
    let max_wait_ms = max_wait.as_secs_f64() * 1000.0;
    // A worker from before the stages were measured has none: the figures then go without them.
    let stages = crate::metrics::STAGES
        .iter()
        .filter_map(|&stage| {
            let h = diff("triagem_worker_stage_seconds", &format!("stage=\"{stage}\","));
            let h = h.ok().filter(|h| h.last().is_some_and(|l| l.1 > 0.0))?;
            let mean_ms =
                1000.0 * delta(&format!("triagem_worker_stage_seconds_sum{{stage=\"{stage}\"}}")) / h.last()?.1;
            Some(StageLatency {
                stage: stage.to_string(),
                mean_ms,
                p50_ms: 1000.0 * histogram_quantile(0.5, &h),
                p99_ms: 1000.0 * histogram_quantile(0.99, &h),
            })
        })
        .collect();
    Ok(WorkerLatency {
        messages,
        p50_ms: 1000.0 * histogram_quantile(0.5, &latency),
        p99_ms: 1000.0 * histogram_quantile(0.99, &latency),
        batches,
        mean_batch: delta("triagem_batch_size_sum") / batches.max(1.0),
        mean_forward_ms,
        max_wait_ms,
        bound_ms: max_wait_ms + 3.0 * mean_forward_ms,
        stages,
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn the_drain_share_is_forward_time_over_the_backlog_runs_drain_time() {
        let scrape =
            |sum: f64| format!("# TYPE triagem_inference_seconds histogram\ntriagem_inference_seconds_sum {sum}\n");
        let (before, after) = (scrape(0.5), scrape(2.0));
        let max_run = json!({"accounted": 100.0, "end_to_end_seconds": 9.0, "send_seconds": 1.0});
        let backlog = json!({"accounted": 1000.0, "end_to_end_seconds": 2.5, "send_seconds": 0.5, "drain_seconds": 1.8, "received_while_sending": 0});
        let d = drain(&before, &after, &[max_run.clone(), backlog.clone()]).unwrap();
        assert_eq!(d, Drain { messages: 1000.0, forward_seconds: 1.5, span_seconds: 2.0, model_busy: 0.75 });
        let err = drain(&before, &after, &[max_run]).unwrap_err();
        assert!(err.contains("--backlog"), "{err}");
        let empty =
            json!({"accounted": 0.0, "end_to_end_seconds": 0.0, "send_seconds": 0.5, "received_while_sending": 0});
        assert!(drain(&before, &after, &[empty]).unwrap_err().contains("no time between"));
        assert!(drain("up 1\n", &after, &[backlog]).unwrap_err().contains("not a triagem worker"));
    }

    #[test]
    fn histogram_quantile_reads_buckets_as_prometheus_does() {
        let b = [(0.01, 10.0), (0.02, 30.0), (f64::INFINITY, 40.0)];
        assert!((histogram_quantile(0.5, &b) - 0.015).abs() < 1e-12);
        assert!((histogram_quantile(0.1, &b) - 0.004).abs() < 1e-12, "the first bucket starts at 0");
        assert_eq!(histogram_quantile(0.99, &b), 0.02, "a rank in +Inf: the highest finite bound");
        assert!(histogram_quantile(0.5, &[(0.01, 0.0), (f64::INFINITY, 0.0)]).is_nan());
    }

    #[test]
    fn worker_latency_is_the_difference_of_two_scrapes() {
        let scrape = |le5: u32, le10: u32, inf: u32, fwd: f64, batches: u32, msgs: u32| {
            format!(
                "# HELP triagem_worker_latency_seconds x\n# TYPE triagem_worker_latency_seconds histogram\n\
                 triagem_worker_latency_seconds_bucket{{le=\"0.005\"}} {le5}\n\
                 triagem_worker_latency_seconds_bucket{{le=\"0.01\"}} {le10}\n\
                 triagem_worker_latency_seconds_bucket{{le=\"+Inf\"}} {inf}\n\
                 triagem_worker_latency_seconds_sum 1\ntriagem_worker_latency_seconds_count {inf}\n\
                 triagem_inference_seconds_sum {fwd}\ntriagem_inference_seconds_count {batches}\n\
                 triagem_batch_size_sum {msgs}\ntriagem_batch_size_count {batches}\n"
            )
        };
        // Before: 100 messages all under 5 ms (a warm-up); the run adds 100, 50 of them in (5, 10] ms.
        let before = scrape(100, 100, 100, 0.5, 10, 100);
        let after = scrape(150, 200, 200, 0.8, 20, 200);
        let w = worker_latency(&before, &after, Duration::from_millis(20)).unwrap();
        assert_eq!((w.messages, w.batches, w.mean_batch), (100.0, 10.0, 10.0));
        assert!((w.p50_ms - 5.0).abs() < 1e-9, "{w:?}");
        assert!((w.p99_ms - 9.9).abs() < 1e-9, "{w:?}");
        assert!((w.mean_forward_ms - 30.0).abs() < 1e-9 && (w.bound_ms - 110.0).abs() < 1e-9, "{w:?}");
        assert!(w.stages.is_empty(), "a worker without triagem_worker_stage_seconds: no stages");
        // With the stages (the text format puts `le` last): the queue stage, 100 messages of the run, 20 in (5, 10] ms.
        let stage = |le5: u32, inf: u32, sum: f64| {
            format!(
                "triagem_worker_stage_seconds_bucket{{stage=\"queue\",le=\"0.005\"}} {le5}\n\
                 triagem_worker_stage_seconds_bucket{{stage=\"queue\",le=\"0.01\"}} {inf}\n\
                 triagem_worker_stage_seconds_bucket{{stage=\"queue\",le=\"+Inf\"}} {inf}\n\
                 triagem_worker_stage_seconds_sum{{stage=\"queue\"}} {sum}\n\
                 triagem_worker_stage_seconds_count{{stage=\"queue\"}} {inf}\n\
                 triagem_worker_stage_seconds_bucket{{stage=\"delivery\",le=\"+Inf\"}} 0\n"
            )
        };
        let w = worker_latency(
            &(before.clone() + &stage(100, 100, 0.1)),
            &(after.clone() + &stage(180, 200, 0.5)),
            Duration::ZERO,
        )
        .unwrap();
        assert_eq!(w.stages.len(), 1, "the delivery stage saw no message: left out; {w:?}");
        let q = &w.stages[0];
        assert_eq!(q.stage, "queue");
        assert!((q.mean_ms - 4.0).abs() < 1e-9 && (q.p50_ms - 3.125).abs() < 1e-9, "{q:?}");
        assert!((q.p99_ms - 9.75).abs() < 1e-9, "{q:?}");
        assert!(worker_latency(&before, &before, Duration::ZERO).unwrap_err().contains("no output"));
        assert!(worker_latency("", &after, Duration::ZERO).unwrap_err().contains("triagem_worker_latency_seconds"));
    }
}

//! `--jobs N`: models that do not depend on each other — a soup's models,
//! their refits, an ensemble's teachers — trained N at a time. A fine-tuning
//! of the small BERT gains nothing from a second thread (its products are too
//! small to split), so on N cores N models at once, one thread each, is what
//! uses the cores.
//!
//! Each model trains on a thread of its own, inside a rayon pool of one
//! thread: the parallel sections of candle and the tokenizer run inline
//! there instead of meeting another model's in a shared pool. Each model has
//! its own generator and directory, so it comes out the same bits however
//! many run beside it (tested).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

use super::TrainError;

/// Runs `model(0)` … `model(n − 1)`, up to `jobs` at a time ([`resolve`]; one after another on the
/// calling thread when that is 1), and returns their results in order. After a failure no further
/// model starts, the running ones finish, and the error of the lowest-numbered failed model is
/// returned.
pub(super) fn each<T: Send>(
    jobs: usize,
    n: usize,
    model: impl Fn(usize) -> Result<T, TrainError> + Sync,
) -> Result<Vec<T>, TrainError> {
    let jobs = resolve(jobs);
    if jobs <= 1 || n <= 1 {
        return (0..n).map(&model).collect();
    }
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let results: Vec<Mutex<Option<Result<T, TrainError>>>> = (0..n).map(|_| Mutex::new(None)).collect();
    std::thread::scope(|scope| {
        for worker in 0..jobs.min(n) {
            let (next, failed, results, model) = (&next, &failed, &results, &model);
            std::thread::Builder::new()
                .name(format!("triagem-train-{worker}"))
                .spawn_scoped(scope, move || {
                    let pool = rayon::ThreadPoolBuilder::new()
                        .num_threads(1)
                        .thread_name(move |_| format!("triagem-train-{worker}-pool"))
                        .build()
                        .map_err(|e| tracing::warn!("cannot start a training pool ({e}); training on its thread"))
                        .ok();
                    while !failed.load(Ordering::Acquire) {
                        let k = next.fetch_add(1, Ordering::AcqRel);
                        if k >= n {
                            break;
                        }
                        let result = match &pool {
                            Some(pool) => pool.install(|| model(k)),
                            None => model(k),
                        };
                        if result.is_err() {
                            failed.store(true, Ordering::Release);
                        }
                        *results[k].lock().unwrap_or_else(|e| e.into_inner()) = Some(result);
                    }
                })
                .map_err(|e| TrainError::Options(format!("--jobs: cannot start a training thread: {e}")))?;
        }
        Ok::<_, TrainError>(())
    })?;
    let mut done = Vec::with_capacity(n);
    for slot in results {
        match slot.into_inner().unwrap_or_else(|e| e.into_inner()) {
            Some(Ok(value)) => done.push(value),
            Some(Err(e)) => return Err(e),
            // Not started because an earlier-claimed model failed: that error comes later in order.
            None => continue,
        }
    }
    if done.len() < n {
        return Err(TrainError::Options("--jobs: a model stopped without a result".into()));
    }
    Ok(done)
}

/// The models `jobs` stands for at once: itself when positive; for 0, the CPUs this process may use
/// (`std::thread::available_parallelism`: the affinity mask and a container's CPU quota).
pub(super) fn resolve(jobs: usize) -> usize {
    match jobs {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_come_back_in_order_whatever_the_jobs() {
        for jobs in [0, 1, 2, 3, 8] {
            let squares = each(jobs, 7, |k| Ok(k * k)).unwrap();
            assert_eq!(squares, vec![0, 1, 4, 9, 16, 25, 36], "jobs {jobs}");
        }
        assert!(each(2, 0, Ok).unwrap().is_empty());
    }

    #[test]
    fn two_jobs_run_at_once_on_threads_of_their_own() {
        // Each model waits until both have started: with one at a time this would never end.
        let started = AtomicUsize::new(0);
        let names = each(2, 2, |_| {
            started.fetch_add(1, Ordering::AcqRel);
            while started.load(Ordering::Acquire) < 2 {
                std::thread::yield_now();
            }
            Ok((std::thread::current().name().map(str::to_owned), rayon::current_num_threads()))
        })
        .unwrap();
        for (name, threads) in names {
            assert!(name.is_some_and(|n| n.starts_with("triagem-train-")), "on a training thread");
            assert_eq!(threads, 1, "inside a one-thread pool");
        }
    }

    #[test]
    fn a_job_stays_on_its_own_thread_when_it_asks_for_the_models_pool() {
        // `train` runs inside the model's pool; a job that handed work back to that pool would wait
        // on threads that are waiting for it (with one thread, for ever).
        let threads = crate::model::threads::install(|| {
            each(2, 2, |_| Ok(crate::model::threads::install(|| std::thread::current().name().map(str::to_owned))))
        })
        .unwrap();
        for name in threads {
            assert!(name.is_some_and(|n| n.starts_with("triagem-train-")), "ran on the job's thread");
        }
    }

    #[test]
    fn the_first_failure_in_order_is_returned_and_no_model_starts_after_it() {
        let ran = AtomicUsize::new(0);
        let err = each(2, 50, |k| {
            ran.fetch_add(1, Ordering::AcqRel);
            if k == 3 || k == 4 {
                Err(TrainError::Options(format!("model {k} failed")))
            } else {
                Ok(k)
            }
        })
        .unwrap_err();
        assert_eq!(err.to_string(), TrainError::Options("model 3 failed".into()).to_string());
        assert!(ran.load(Ordering::Acquire) < 50, "the models after the failure did not run");
    }
}

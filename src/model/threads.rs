//! The CPU threads the model computes with: how many (`model.threads`,
//! `--threads`; 0 = automatic), and the one rayon pool every prediction runs
//! inside.
//!
//! Why a pool of its own, entered once per prediction: candle's CPU kernels
//! (layer norm, softmax, the `gemm` crate's matrix products) and the
//! tokenizer's `encode_batch` each start a rayon parallel section. Called from
//! a thread outside any pool, every one of those sections is handed to
//! rayon's global pool and the caller sleeps until it is done: about twenty
//! futex sleeps and wake-ups per message at batch 1, which on two cores cost
//! more than the arithmetic (measured: 42,000 voluntary context switches and
//! 1.3 s of system time for 2,048 messages at batch 1, against 5,000 and
//! 0.07 s inside the pool). Run inside [`install`], a section starts on the
//! calling pool thread and the other pool threads only steal what is worth
//! stealing; a pool of one thread runs everything inline.
//!
//! candle reads its thread counts from the environment: `RAYON_NUM_THREADS`
//! at each matrix product (more than 1: the `gemm` crate splits large products
//! over the current rayon pool, ours), and `CANDLE_NUM_THREADS` once, for the
//! size of its own pool of element-wise workers (large GELU, additions), which
//! spin for a while after each operation. Beside our pool those spinning
//! workers take the cores the matrix products need: on two cores they halved
//! the throughput at batch 32. So [`init`] sets `RAYON_NUM_THREADS` to the
//! model's count and, unless the user set it, `CANDLE_NUM_THREADS` to 1 (no
//! element-wise workers: those operations run on the calling thread). Call
//! it at the start of the process, before any other thread exists.

use std::sync::OnceLock;

/// The pool, or None when its threads could not be started (then predictions run on the calling thread).
static POOL: OnceLock<Option<rayon::ThreadPool>> = OnceLock::new();

/// The thread count `requested` stands for: itself when positive; for 0,
/// `RAYON_NUM_THREADS` when set, else the CPUs this process may use
/// (`std::thread::available_parallelism`: the affinity mask and, on Linux,
/// the cgroup v1/v2 CPU quota of a container, rounded down, at least 1).
pub fn resolve(requested: usize) -> usize {
    if requested > 0 {
        return requested;
    }
    std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// Sets the model's thread count for this process and returns it. The first
/// call decides (later calls, and [`install`] before any call, keep the pool
/// they find). Sets `RAYON_NUM_THREADS` and `CANDLE_NUM_THREADS` for candle
/// (see the module docs): call it before other threads start.
pub fn init(requested: usize) -> usize {
    let n = resolve(requested);
    if POOL.get().is_none() {
        // Edition 2021: set_var is safe to call; it is done before the process starts its threads.
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
        if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
            std::env::set_var("CANDLE_NUM_THREADS", "1");
        }
    }
    pool_with(n).map_or(1, |p| p.current_num_threads())
}

/// Threads of the model's pool (starting it with the automatic count if [`init`] was not called).
pub fn count() -> usize {
    pool_with(resolve(0)).map_or(1, |p| p.current_num_threads())
}

/// Runs `f` on the model's pool, so that the parallel sections inside it start
/// on a pool thread instead of waking rayon's global pool each time.
pub fn install<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    match pool_with(resolve(0)) {
        Some(pool) if pool.current_thread_index().is_none() => pool.install(f),
        _ => f(),
    }
}

fn pool_with(n: usize) -> Option<&'static rayon::ThreadPool> {
    POOL.get_or_init(|| {
        let built =
            rayon::ThreadPoolBuilder::new().num_threads(n).thread_name(|i| format!("triagem-model-{i}")).build();
        built
            .map_err(|e| tracing::warn!("cannot start the model's {n} threads ({e}); predicting on the calling thread"))
            .ok()
    })
    .as_ref()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_explicit_count_wins_and_zero_is_at_least_one() {
        assert_eq!(resolve(3), 3);
        assert!(resolve(0) >= 1);
    }

    #[test]
    fn install_runs_on_a_pool_thread_and_nests() {
        let (outer, inner) = install(|| {
            let outer = rayon::current_thread_index();
            (outer, install(rayon::current_thread_index))
        });
        assert!(outer.is_some());
        assert_eq!(outer, inner);
    }
}

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
/// on a pool thread instead of waking rayon's global pool each time. Called on a
/// thread of any rayon pool (the model's, or a training job's own), `f` runs
/// where it is: a job must not hand work to the model's pool, whose threads may
/// all be waiting for the jobs (a deadlock).
pub fn install<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    match pool_with(resolve(0)) {
        Some(pool) if rayon::current_thread_index().is_none() => pool.install(f),
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

/// The model's threads working on one text together: the products of a
/// single text are cut into column bands, one a thread, at every layer —
/// about 25 meetings per message for MiniLM-L6. A rayon parallel section
/// per product costs a wake-up of the other thread each time (it sleeps
/// after a few microseconds without work, and the layer norms, attention and
/// activations between two products take longer); a team keeps its helpers
/// waiting on an atomic counter for the length of one forward pass instead,
/// so that a band is handed over in well under a microsecond.
///
/// A band is computed by whoever claims it first, the caller included: when
/// the pool's other threads are busy elsewhere, the caller computes every
/// band itself and nothing waits for a helper that never came. A band that
/// panics still counts as done, and the panic reaches the caller of
/// [`with_team`] as a rayon section's would (tested), never a wait for ever.
pub struct Team<'a> {
    size: usize,
    shared: Option<&'a Shared>,
}

/// What a team's members share: the current job and who has done what.
#[derive(Default)]
struct Shared {
    /// The current job's generation (high 32 bits) and the next band to claim (low 32).
    ticket: std::sync::atomic::AtomicU64,
    /// The current job, written before its generation is published in `ticket`.
    job: std::sync::Mutex<Option<Job>>,
    /// Bands of the current job computed (or withdrawn).
    done: std::sync::atomic::AtomicUsize,
    exit: std::sync::atomic::AtomicBool,
}

/// A job: its generation, how many bands, and a band's work with its lifetime erased.
#[derive(Clone, Copy)]
struct Job {
    generation: u64,
    bands: u64,
    work: *const (dyn Fn(usize) + Sync),
}

// SAFETY: `work` is `Sync`, and `Team::run` keeps it alive until every band of its generation
// has been claimed and computed; a member calls it only for a band it claimed in that generation,
// with the band count of that same generation (both come from one `Job`).
unsafe impl Send for Job {}

impl Team<'_> {
    /// A team of one: `run` computes every band on the calling thread.
    pub fn solo() -> Team<'static> {
        Team { size: 1, shared: None }
    }

    /// How many threads the team has.
    pub fn size(&self) -> usize {
        self.size
    }

    /// Calls `band(i)` once for every `i` in `0..bands`, on the team's threads; returns when all
    /// are done.
    pub fn run(&self, bands: usize, band: &(dyn Fn(usize) + Sync)) {
        use std::sync::atomic::Ordering::{Acquire, Release};
        let Some(shared) = self.shared.filter(|_| bands > 1) else {
            (0..bands).for_each(band);
            return;
        };
        // SAFETY of the erased lifetime: this function does not return before `done` reaches
        // `bands`, and no member calls the job once its bands are all claimed.
        let work: &'static (dyn Fn(usize) + Sync) = unsafe { std::mem::transmute(band) };
        let generation = (shared.ticket.load(Acquire) >> 32) + 1;
        *shared.job.lock().unwrap_or_else(|e| e.into_inner()) = Some(Job { generation, bands: bands as u64, work });
        shared.done.store(0, Release);
        shared.ticket.store(generation << 32, Release);
        // A band that panics here must not leave `band` to the helpers while this frame unwinds:
        // the bands nobody has claimed are withdrawn, and the claimed ones waited for, first.
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| shared.work(generation)));
        if outcome.is_err() {
            shared.withdraw(generation, bands as u64);
        }
        let mut spins = 0u32;
        while shared.done.load(Acquire) < bands {
            pause(&mut spins);
        }
        if let Err(panic) = outcome {
            std::panic::resume_unwind(panic);
        }
    }
}

/// Counts a claimed band as done when dropped, after its work or while a panic in it unwinds,
/// so that the caller of [`Team::run`] never waits for a band that will not finish.
struct Done<'a>(&'a std::sync::atomic::AtomicUsize);

impl Drop for Done<'_> {
    fn drop(&mut self) {
        self.0.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    }
}

impl Shared {
    /// Claims and computes bands of job `generation` until none is left.
    fn work(&self, generation: u64) {
        use std::sync::atomic::Ordering::{AcqRel, Acquire};
        let job = match *self.job.lock().unwrap_or_else(|e| e.into_inner()) {
            Some(job) if job.generation == generation => job,
            _ => return,
        };
        let mut ticket = self.ticket.load(Acquire);
        loop {
            if ticket >> 32 != generation || ticket & 0xffff_ffff >= job.bands {
                return;
            }
            match self.ticket.compare_exchange_weak(ticket, ticket + 1, AcqRel, Acquire) {
                Ok(_) => {
                    let _done = Done(&self.done);
                    // SAFETY: a band of this generation was claimed, so its job is still alive (see `run`).
                    unsafe { (*job.work)((ticket & 0xffff_ffff) as usize) };
                    drop(_done);
                    ticket = self.ticket.load(Acquire);
                }
                Err(now) => ticket = now,
            }
        }
    }

    /// Claims every band of job `generation` nobody has claimed yet and counts it as done
    /// without computing it.
    fn withdraw(&self, generation: u64, bands: u64) {
        use std::sync::atomic::Ordering::{AcqRel, Acquire};
        let mut ticket = self.ticket.load(Acquire);
        while ticket >> 32 == generation && ticket & 0xffff_ffff < bands {
            match self.ticket.compare_exchange_weak(ticket, (generation << 32) | bands, AcqRel, Acquire) {
                Ok(_) => {
                    self.done.fetch_add((bands - (ticket & 0xffff_ffff)) as usize, AcqRel);
                    return;
                }
                Err(now) => ticket = now,
            }
        }
    }

    /// A helper's life: waits for each new job, works on it, until the team breaks up.
    fn help(&self) {
        use std::sync::atomic::Ordering::Acquire;
        let mut seen = 0;
        let mut spins = 0u32;
        loop {
            if self.exit.load(Acquire) {
                return;
            }
            let generation = self.ticket.load(Acquire) >> 32;
            if generation != seen {
                seen = generation;
                self.work(generation);
                spins = 0;
            } else {
                pause(&mut spins);
            }
        }
    }
}

/// A short wait: a spin hint, and after a while a yield, so that a waiting member leaves its
/// core to whatever else is runnable there (the worker's async threads).
fn pause(spins: &mut u32) {
    *spins += 1;
    if *spins < 2_000 {
        std::hint::spin_loop();
    } else {
        std::thread::yield_now();
    }
}

/// Runs `body` with a team of the current rayon pool's threads (up to `threads`): the caller
/// and `threads - 1` helpers, which wait for jobs until `body` returns.
pub fn with_team<R: Send>(threads: usize, body: impl FnOnce(&Team) -> R + Send) -> R {
    if threads <= 1 {
        return body(&Team::solo());
    }
    let shared = Shared::default();
    rayon::scope(|scope| {
        for _ in 1..threads {
            scope.spawn(|_| shared.help());
        }
        // The helpers are told to leave when `body` returns or panics: the scope waits for them.
        struct Exit<'a>(&'a std::sync::atomic::AtomicBool);
        impl Drop for Exit<'_> {
            fn drop(&mut self) {
                self.0.store(true, std::sync::atomic::Ordering::Release);
            }
        }
        let _exit = Exit(&shared.exit);
        body(&Team { size: threads, shared: Some(&shared) })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_explicit_count_wins_and_zero_is_at_least_one() {
        assert_eq!(resolve(3), 3);
        assert!(resolve(0) >= 1);
    }

    /// Jobs of 1 to 7 bands one after another, on teams of 1 to 3 threads: every band of every
    /// job is computed exactly once, and before `run` returns.
    #[test]
    fn a_team_computes_every_band_of_every_job_once() {
        use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
        for threads in 1..=3 {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            pool.install(|| {
                with_team(threads, |team| {
                    assert_eq!(team.size(), threads);
                    for job in 0..2_000 {
                        let bands = job % 7 + 1;
                        let counts: Vec<AtomicUsize> = (0..bands).map(|_| AtomicUsize::new(0)).collect();
                        team.run(bands, &|band| {
                            counts[band].fetch_add(1, Relaxed);
                        });
                        let counts: Vec<usize> = counts.iter().map(|c| c.load(Relaxed)).collect();
                        assert_eq!(counts, vec![1; bands], "{threads} threads, job {job}");
                    }
                })
            });
        }
    }

    /// A team larger than its pool (helpers that never get a thread while the job runs): the
    /// caller computes every band itself, and the team breaks up without waiting for them.
    #[test]
    fn a_team_whose_helpers_never_start_still_finishes() {
        use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
        let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
        let done = AtomicUsize::new(0);
        pool.install(|| {
            with_team(3, |team| {
                for _ in 0..10 {
                    team.run(4, &|_| {
                        done.fetch_add(1, Relaxed);
                    });
                }
            })
        });
        assert_eq!(done.load(Relaxed), 40);
    }

    /// A band that panics, on whichever member: the panic reaches the team's caller, and nothing
    /// waits for ever.
    #[test]
    fn a_band_that_panics_is_a_panic_of_the_caller_not_a_hang() {
        // On a thread of its own, so that a hang fails the test instead of stalling the suite.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
            for failing in 0..4 {
                let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    pool.install(|| {
                        with_team(2, |team| {
                            for _ in 0..50 {
                                team.run(4, &|band| assert_ne!(band, failing, "band {failing} fails"));
                            }
                        })
                    })
                }));
                tx.send((failing, outcome.is_err())).unwrap();
            }
        });
        for failing in 0..4 {
            let (band, panicked) = rx
                .recv_timeout(std::time::Duration::from_secs(60))
                .unwrap_or_else(|_| panic!("a team with a panicking band {failing} hung"));
            assert_eq!(band, failing);
            assert!(panicked, "band {failing}: the panic did not reach the caller");
        }
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

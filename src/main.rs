//! The binary edge: parses the command line, sets up logging, runs one
//! subcommand and turns its error into one line on stderr and exit code 1.

use std::io::{BufRead, IsTerminal, Write};

use anyhow::{Context, Result};
use clap::Parser;
use serde_json::json;
use triagem::cli::{
    BenchArgs, ClassifyArgs, Cli, Command, DemoArgs, EvalArgs, LoadgenArgs, PretrainArgs, TrainArgs, WorkerArgs,
};
use triagem::config::{Config, LogFormat};
use triagem::data::Dataset;
use triagem::{bench, demo, eval, loadgen, train, worker};

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Train(args) => logged(cli.log_format, || training(args.threads, || run_train(args))),
        Command::Pretrain(args) => logged(cli.log_format, || training(args.threads, || run_pretrain(args))),
        Command::Eval(args) => logged(cli.log_format, || run_eval(args)),
        Command::Classify(args) => logged(cli.log_format, || run_classify(args)),
        Command::Worker(args) => run_worker(args, cli.log_format),
        Command::Demo(args) => logged(cli.log_format, || {
            // The demo trains the default model first when there is none: with the training commands'
            // allocator settings; and its threads are set up as the worker's (automatic count, candle's
            // spinning element-wise pool off, which would also stall the soup's models training at once).
            if !demo::has_model(&args.model) {
                keep_freed_memory();
            }
            triagem::model::threads::init(0);
            run_demo(args)
        }),
        Command::Loadgen(args) => logged(cli.log_format, || run_loadgen(args)),
        Command::Bench(args) => logged(cli.log_format, || run_bench(args)),
    };
    if let Err(e) = result {
        eprintln!("error: {}", error_chain(&e));
        std::process::exit(1);
    }
}

/// Runs a training command on the model's threads (`threads`; 0 = automatic, see
/// [`triagem::model::threads`]), with glibc's allocator told to keep freed memory.
///
/// Threads: the steps run inside the model's own pool, so that a parallel
/// section (a large model's matrix products, the tokenizer) starts on one of
/// its threads, and candle's element-wise pool is off (`CANDLE_NUM_THREADS=1`,
/// as for serving). That pool's caller spins until its helpers are done:
/// alone on the cores it saved about 7 % of an epoch, but beside another busy
/// process a helper that lost its core kept the caller spinning — two
/// trainings at once on two cores took 55–58 s an epoch each with it, 13–14 s
/// without.
///
/// Memory: every training step allocates and frees tensors of a few MiB
/// (activations, gradients, optimiser updates); by default glibc serves each
/// from a fresh `mmap` and unmaps it when freed, so the next step faults the
/// same pages in again, zeroed by the kernel: a quarter of a fine-tuning
/// epoch's time on this project's machine (22 s → 16 s, the same weights).
/// Serving is unaffected: its buffers are reused, and it keeps the default
/// (memory goes back).
fn training(threads: usize, job: impl FnOnce() -> Result<()> + Send) -> Result<()> {
    keep_freed_memory();
    triagem::model::threads::init(threads);
    triagem::model::threads::install(job)
}

/// Tells glibc's allocator to keep freed memory for the next training step (see [`training`]).
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt sets three of the allocator's parameters under its own lock; no memory is touched.
    unsafe {
        // glibc's largest mmap threshold (half of a 64 MiB heap): larger blocks still come from mmap.
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
        // One arena for every thread: a thread's own arena grows in heaps of at most 64 MiB, which
        // glibc unmaps as soon as they are empty whatever the trim threshold, so models trained at
        // once (`--jobs`) faulted their pages in again at every step (two at once, one epoch: 1.1 M
        // page faults and 6 s of system time with their own arenas, 44,000 and 0.4 s with one).
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// Sets up logging in `format` (text when none is given), then runs `job`.
fn logged(format: Option<LogFormat>, job: impl FnOnce() -> Result<()>) -> Result<()> {
    init_logging(format.unwrap_or_default());
    job()
}

/// Log lines on stderr, at the levels of `RUST_LOG` (default `info`); colour
/// codes only when stderr is a terminal, so files and container logs stay plain.
fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info,ort=warn".into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().with_current_span(true).with_span_list(false).init(),
    }
}

/// The error and its causes, `: `-separated, each cause once: a cause whose
/// text the message already contains (an error that prints its source) is
/// not repeated.
fn error_chain(e: &anyhow::Error) -> String {
    let mut line = e.to_string();
    for cause in e.chain().skip(1) {
        let cause = cause.to_string();
        if !line.contains(&cause) {
            line.push_str(": ");
            line.push_str(&cause);
        }
    }
    line
}

fn run_train(a: TrainArgs) -> Result<()> {
    let opts = a.options()?;
    let summary = train::train(&opts)?;
    let head = format!(
        "model {} (version {}) — best epoch {}",
        summary.model_dir.display(),
        summary.model_version,
        summary.best_epoch
    );
    let seconds = summary.training_seconds;
    match &summary.test {
        Some(t) => {
            println!("{head}, test accuracy {:.4}, macro-F1 {:.4}, {seconds:.0}s", t.accuracy, t.macro_f1);
            println!("{}", t.render());
        }
        None => println!("{head}, {seconds:.0}s; no test file (--test none)"),
    }
    Ok(())
}

fn run_pretrain(a: PretrainArgs) -> Result<()> {
    let summary = train::pretrain::pretrain(&a.options()?)?;
    println!(
        "base model {} — {} steps, held-out masked-token loss {:.3} → {:.3}, accuracy {:.4}, {:.0}s",
        summary.out.display(),
        summary.steps,
        summary.held_out_loss_before,
        summary.held_out_loss,
        summary.held_out_accuracy,
        summary.seconds
    );
    Ok(())
}

fn run_eval(a: EvalArgs) -> Result<()> {
    let classifier = a.model.load()?;
    let data = Dataset::load(&a.data, Some(classifier.labels()))?;
    let report = eval::evaluate(&classifier, &data.examples, a.model.batch_size)?;
    if a.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!("model {} ({})\ndata  {}\n", classifier.info().name, classifier.info().version, a.data.display());
        println!("{}", report.render());
    }
    Ok(())
}

fn run_classify(a: ClassifyArgs) -> Result<()> {
    let classifier = a.model.load()?;
    let texts: Vec<String> = if a.texts.is_empty() {
        std::io::stdin()
            .lock()
            .lines()
            .collect::<Result<Vec<_>, _>>()
            .context("reading texts from stdin")?
            .into_iter()
            .filter(|l| !l.trim().is_empty())
            .collect()
    } else {
        a.texts
    };
    let mut out = std::io::stdout().lock();
    for chunk in texts.chunks(a.model.batch_size.max(1)) {
        let refs: Vec<&str> = chunk.iter().map(String::as_str).collect();
        for (text, p) in chunk.iter().zip(classifier.predict(&refs)?) {
            if a.json {
                let scores: serde_json::Map<String, serde_json::Value> =
                    p.scores.iter().map(|(l, s)| (l.clone(), json!(s))).collect();
                writeln!(out, "{}", json!({"text": text, "label": p.label, "score": p.score, "scores": scores}))?;
            } else {
                writeln!(out, "{}\t{:.4}\t{}", p.label, p.score, text)?;
            }
        }
    }
    Ok(())
}

/// The worker's log format comes from its config file unless the flag gives one,
/// so the config is read before logging starts (its errors go to stderr as any error).
fn run_worker(a: WorkerArgs, log_format: Option<LogFormat>) -> Result<()> {
    let cfg = Config::load(a.config.as_deref())?;
    // Before any other thread starts (logging, tokio): candle reads the count from the environment.
    triagem::model::threads::init(cfg.model.threads);
    init_logging(log_format.unwrap_or(cfg.log.format));
    worker::run(cfg)?;
    Ok(())
}

fn run_demo(a: DemoArgs) -> Result<()> {
    demo::run(demo::DemoOptions {
        model: a.model,
        data: a.data,
        metrics_listen: a.metrics_listen,
        show: a.show,
        wait: !a.no_wait,
    })?;
    Ok(())
}

fn run_loadgen(a: LoadgenArgs) -> Result<()> {
    let limit = match (a.count, a.duration) {
        (_, Some(d)) => loadgen::Limit::Duration(d),
        (Some(n), None) => loadgen::Limit::Count(n),
        (None, None) => loadgen::Limit::Count(loadgen::DEFAULT_COUNT),
    };
    let opts = loadgen::LoadgenOptions {
        brokers: a.brokers,
        input_topic: a.input_topic,
        output_topics: a.output_topics,
        review_topic: a.review_topic,
        dead_letter_topic: a.dead_letter_topic,
        data: a.data,
        rate: a.rate,
        limit,
        poison_percent: a.poison_percent,
        settle_timeout: a.settle_timeout,
        client: a.client,
        producer: a.producer,
        consumer: a.consumer,
        progress: !a.quiet,
        read_committed: a.read_committed,
        backlog: a.backlog,
    };
    let runtime =
        tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the async runtime")?;
    let result = runtime.block_on(loadgen::run(opts));
    let report = match &result {
        Ok(report) => Some(report),
        Err(loadgen::LoadgenError::Incomplete { report, .. }) => Some(report.as_ref()),
        Err(_) => None,
    };
    if let Some(report) = report {
        if a.json {
            println!("{}", serde_json::to_string(report)?);
        } else {
            println!("{}", report.render());
        }
    }
    result?;
    Ok(())
}

fn run_bench(a: BenchArgs) -> Result<()> {
    // Before logging's and any other thread: candle reads the count from the environment.
    triagem::model::threads::init(a.model.threads);
    let report = bench::run(&bench::BenchOptions {
        model: a.model.model,
        device: a.model.device,
        data: a.data,
        messages: a.messages,
        batch_sizes: a.batch_sizes,
        repeats: a.repeats as usize,
        limits: triagem::worker::batcher::Limits {
            max_messages: a.max_messages,
            max_tokens: a.max_tokens,
            max_wait: std::time::Duration::ZERO,
        },
        peers: a.peers,
        end_to_end: a.end_to_end,
        peak_gflops: a.peak_gflops,
        worker_metrics: a.worker_metrics,
        max_wait: a.max_wait,
        drain_metrics: a.drain_metrics,
        cpu_shares: a.cpu_shares,
        drain_cpu_shares: a.drain_cpu_shares,
    })?;
    if !a.json {
        println!("{}", report.render());
    }
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

//! `mimco`: train (MimCo, MoCo v3, SimMIM), evaluate, export, plot, and a self-contained demo.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use mimco::Config;
use mimco::train::{Outcome, RunOptions, TeacherSource};
use pipeline::{StoreOptions, Topology};

/// The tiny CPU config, compiled in for the demo.
const TINY_CONFIG: &str = include_str!("../configs/tiny_cpu.toml");

#[derive(Parser)]
#[command(
    name = "mimco",
    version,
    about = "MimCo pre-training of vision transformers"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Pre-train the config's `method`: MimCo (stage 2, a student against a frozen
    /// teacher), MoCo v3 (stage 1, the teacher) or SimMIM.
    Train {
        /// Training config (TOML); see configs/.
        #[arg(long)]
        config: PathBuf,
        /// Shards of the training split: a folder, s3://bucket/prefix (AWS_* variables),
        /// gs://bucket/prefix (GOOGLE_*), az://container/prefix (AZURE_*) or http(s):// URL.
        #[arg(long)]
        data: String,
        /// MimCo's teacher: safetensors (a `mimco export` or a MoCo v3 run's checkpoint),
        /// or a PyTorch .pth/.pth.tar (MoCo v3 release, timm).
        #[arg(long)]
        teacher: Option<PathBuf>,
        /// Use a random teacher instead (smoke tests and benchmarks: it teaches nothing).
        #[arg(long, conflicts_with = "teacher")]
        random_teacher: bool,
        /// Output folder: last.safetensors, metrics.jsonl, config.toml.
        #[arg(long, default_value = "runs/mimco")]
        out: PathBuf,
        /// Continue from OUT/last.safetensors.
        #[arg(long)]
        resume: bool,
        /// No progress bar.
        #[arg(long)]
        quiet: bool,
        /// Labelled shards for the k-NN check every `train.knn_every` steps (neighbours).
        #[arg(long, requires = "knn_val")]
        knn_train: Option<String>,
        /// Labelled shards the k-NN check classifies.
        #[arg(long, requires = "knn_train")]
        knn_val: Option<String>,
        /// cpu, cuda, cuda:N, or auto (a GPU if this build has CUDA and one answers, else the
        /// CPU); cuda and auto take GPU LOCAL_RANK when torchrun sets it.
        #[arg(long, default_value = "auto")]
        device: String,
        /// CUDA fast paths to turn off (as `mimco bench train --without`), should one fail
        /// its `mimco bench kernels` check on your GPU.
        #[arg(long, value_enum, value_delimiter = ',')]
        without: Vec<FastPathArg>,
    },
    /// Measure training speed (images/s, step time, TFLOP/s, MFU, peak memory, data wait),
    /// or check the fused CUDA kernels against the composed ops.
    Bench {
        #[command(subcommand)]
        kind: BenchKind,
    },
    /// Evaluate an encoder on frozen features of labelled shards: k-NN or a linear probe.
    Eval {
        #[command(subcommand)]
        kind: EvalKind,
    },
    /// Write the pre-trained encoder of a checkpoint alone, with timm's parameter names.
    Export {
        /// A checkpoint (e.g. runs/mimco/last.safetensors).
        checkpoint: PathBuf,
        /// Output safetensors file.
        out: PathBuf,
    },
    /// Draw loss and throughput curves from a metrics.jsonl to a PNG.
    Plot {
        /// metrics.jsonl of a run.
        metrics: PathBuf,
        /// Output PNG. By default, beside the metrics file.
        #[arg(long)]
        out: Option<PathBuf>,
        /// TrueType font for the labels (by default, a system DejaVu Sans or Arial).
        #[arg(long)]
        font: Option<PathBuf>,
    },
    /// Make a small ImageNet-shaped dataset from embedded photos, pack it, and train the
    /// tiny config on it for a few minutes on CPU (random teacher), showing the losses fall.
    Demo {
        /// Folder for the demo: created, or replaced if an earlier demo made it.
        #[arg(default_value = "mimco-demo")]
        dir: PathBuf,
        /// Optimiser steps to train.
        #[arg(long, default_value_t = 300)]
        steps: u64,
    },
}

#[derive(Subcommand)]
enum BenchKind {
    /// Timed optimiser steps of a config on synthetic uint8 batches (or real shards with
    /// --data), with a random teacher. Prints one Markdown table row.
    Train {
        /// Training config (TOML); see configs/.
        #[arg(long)]
        config: PathBuf,
        /// Images per step (overrides data.batch_size and optim.batch_size).
        #[arg(long)]
        batch: Option<usize>,
        /// Overrides [train] precision: f32, tf32 or bf16.
        #[arg(long)]
        precision: Option<String>,
        /// Timed steps.
        #[arg(long, default_value_t = 30)]
        steps: usize,
        /// Untimed steps first.
        #[arg(long, default_value_t = 5)]
        warmup: usize,
        /// Shards to stream batches from instead of synthetic ones (folder or URL).
        #[arg(long)]
        data: Option<String>,
        /// `fused`: mimco's CUDA kernels; `stock`: Candle's composed ops only (to compare).
        #[arg(long, value_enum, default_value = "fused")]
        kernels: KernelsArg,
        /// With `fused`, turn off these fast paths to measure what each buys:
        /// `flash` (attention on tensor cores), `blocks-node` (the student's blocks as one
        /// graph node), `stem` (mask blend, CLS token and positions as one node),
        /// `residual` (the residual joins inside the bias and LayerNorm-backward passes),
        /// `epilogue` (the bias, residual join and bias gradient in cuBLASLt's epilogue),
        /// `copy-stream` (batches uploaded on a stream of their own).
        #[arg(long, value_enum, value_delimiter = ',')]
        without: Vec<FastPathArg>,
        /// cpu, cuda, cuda:N, or auto.
        #[arg(long, default_value = "auto")]
        device: String,
        /// Peak dense TFLOP/s of the device for MFU (989 = H100/H200 SXM bf16).
        #[arg(long, default_value_t = 989.0)]
        peak_tflops: f64,
        /// Print the table header before the row.
        #[arg(long)]
        header: bool,
    },
    /// Batches from shards uploaded to the device (and decoded there with `[data]
    /// device_decode`) with no training step: the rate the data path fills a GPU at.
    /// Prints one line.
    Feed {
        /// Training config (TOML); its [data] section is read.
        #[arg(long)]
        config: PathBuf,
        /// Shards to stream batches from (folder or URL).
        #[arg(long)]
        data: String,
        /// Images per batch (overrides data.batch_size).
        #[arg(long)]
        batch: Option<usize>,
        /// Timed batches.
        #[arg(long, default_value_t = 100)]
        batches: usize,
        /// Untimed batches first.
        #[arg(long, default_value_t = 5)]
        warmup: usize,
        /// cpu, cuda, cuda:N, or auto.
        #[arg(long, default_value = "auto")]
        device: String,
    },
    /// Check every fused CUDA kernel (forward and backward) against the composed ops in
    /// f64 on random inputs of several shapes; prints a table, fails on any miss.
    Kernels {
        /// cuda or cuda:N.
        #[arg(long, default_value = "cuda")]
        device: String,
        /// Seed of the random inputs.
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum KernelsArg {
    Fused,
    Stock,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum FastPathArg {
    Flash,
    BlocksNode,
    Stem,
    Residual,
    Epilogue,
    CopyStream,
}

impl FastPathArg {
    fn path(self) -> mimco::functional::FastPath {
        use mimco::functional::FastPath;
        match self {
            FastPathArg::Flash => FastPath::Flash,
            FastPathArg::BlocksNode => FastPath::BlocksNode,
            FastPathArg::Stem => FastPath::Stem,
            FastPathArg::Residual => FastPath::Residual,
            FastPathArg::Epilogue => FastPath::Epilogue,
            FastPathArg::CopyStream => FastPath::CopyStream,
        }
    }

    fn name(self) -> &'static str {
        match self {
            FastPathArg::Flash => "flash",
            FastPathArg::BlocksNode => "blocks-node",
            FastPathArg::Stem => "stem",
            FastPathArg::Residual => "residual",
            FastPathArg::Epilogue => "epilogue",
            FastPathArg::CopyStream => "copy-stream",
        }
    }
}

#[derive(Subcommand)]
enum EvalKind {
    /// Weighted k-NN (DINO): cosine similarity, k nearest vote with exp(sim / T).
    Knn {
        #[command(flatten)]
        common: EvalArgs,
        /// Neighbours.
        #[arg(long, default_value_t = 20)]
        k: usize,
        /// Temperature of the votes.
        #[arg(long, default_value_t = 0.07)]
        temperature: f64,
    },
    /// Linear probe: SGD (momentum 0.9, cosine) on standardised frozen features.
    Linear {
        #[command(flatten)]
        common: EvalArgs,
        /// Passes over the training features.
        #[arg(long, default_value_t = 50)]
        epochs: usize,
        /// Samples per step.
        #[arg(long, default_value_t = 256)]
        batch: usize,
        /// Peak learning rate.
        #[arg(long, default_value_t = 0.1)]
        lr: f64,
    },
}

#[derive(clap::Args)]
struct EvalArgs {
    /// Shards of the labelled training split (folder or URL).
    #[arg(long)]
    train: String,
    /// Shards of the labelled validation split.
    #[arg(long)]
    val: String,
    /// Weights: a mimco checkpoint (brings its config), an export, a MoCo v3 release or a
    /// timm state dict. Without it, a randomly initialised encoder (needs --config).
    #[arg(long)]
    weights: Option<PathBuf>,
    /// Config whose [student] is the architecture and [data] the image size; taken from
    /// the checkpoint when omitted.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Image feature: the CLS token or the mean patch token after the final norm.
    #[arg(long, value_enum, default_value = "cls")]
    feature: FeatureArg,
    /// Name of the run in the results file (by default, the weights' file name).
    #[arg(long)]
    label: Option<String>,
    /// JSON-lines file the result is appended to.
    #[arg(long, default_value = "eval-results.jsonl")]
    results: PathBuf,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum FeatureArg {
    Cls,
    Mean,
}

fn main() -> ExitCode {
    tracing_subscriber_init();
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Warnings of the libraries (a sample that failed to decode, a shard given up) go to stderr.
fn tracing_subscriber_init() {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_max_level(tracing::Level::WARN)
        .init();
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Train {
            config,
            data,
            teacher,
            random_teacher,
            out,
            resume,
            quiet,
            knn_train,
            knn_val,
            device,
            without,
        } => {
            for w in &without {
                mimco::functional::disable(w.path());
            }
            let config = read_config(&config)?;
            let teacher = match (teacher, random_teacher) {
                (Some(path), _) => Some(TeacherSource::File(path)),
                (None, true) => Some(TeacherSource::Random),
                (None, false) => None,
            };
            let job = Job {
                data,
                teacher,
                out,
                resume,
                progress: !quiet,
                knn: knn_train.zip(knn_val),
                device: mimco::device::parse(&device)?,
            };
            train(&config, job)
        }
        Command::Bench { kind } => bench(kind),
        Command::Eval { kind } => evaluate(kind),
        Command::Export { checkpoint, out } => {
            let n = mimco::export::export(&checkpoint, &out)?;
            println!(
                "wrote {n} tensors to {} (timm names; load with num_classes=0)",
                out.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Plot { metrics, out, font } => {
            let out = out.unwrap_or_else(|| metrics.with_extension("png"));
            mimco::metrics::plot(&metrics, &out, font.as_deref())?;
            println!("wrote {}", out.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Demo { dir, steps } => demo(&dir, steps),
    }
}

/// What `mimco train` (or the demo) asks for; [`train`] adds the process's settings.
struct Job {
    data: String,
    teacher: Option<TeacherSource>,
    out: PathBuf,
    resume: bool,
    progress: bool,
    /// Labelled train and val shards of the k-NN check.
    knn: Option<(String, String)>,
    device: candle_core::Device,
}

fn train(config: &Config, job: Job) -> Result<ExitCode> {
    if matches!(job.teacher, Some(TeacherSource::Random)) {
        eprintln!(
            "warning: random teacher: the student learns to match random features. Use it for smoke tests and benchmarks only."
        );
    }
    let topology = Topology::from_vars(std::env::vars())?;
    if topology.world_size > 1 {
        bail!(
            "WORLD_SIZE={}: multi-process training needs the NCCL gradient all-reduce, which this build does not have yet. Run one process (unset WORLD_SIZE)",
            topology.world_size
        );
    }
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    ctrlc::set_handler(move || {
        if flag.swap(true, Ordering::Relaxed) {
            eprintln!("\nsecond Ctrl-C: exiting without a checkpoint");
            std::process::exit(130);
        }
        eprintln!("\nCtrl-C: writing a checkpoint after this step (Ctrl-C again to quit at once)");
    })
    .context("installing the Ctrl-C handler")?;
    let store = StoreOptions::from_vars(std::env::vars());
    let knn = job.knn.map(|(train, val)| mimco::eval::KnnMonitor {
        train,
        val,
        samples: config.train.knn_samples,
        store: store.clone(),
    });
    let opts = RunOptions {
        data: job.data,
        store,
        topology,
        out: job.out,
        resume: job.resume,
        teacher: job.teacher,
        progress: job.progress,
        stop,
        knn,
        device: job.device,
    };
    let summary = mimco::train::run(config, &opts)?;
    let first = summary.reports.first().map(|r| r.loss);
    let last = summary.reports.last().map(|r| r.loss);
    println!(
        "{} after {} steps; loss {} -> {}; checkpoint {}",
        summary.outcome,
        summary.steps,
        first.map_or("-".into(), |l| format!("{l:.4}")),
        last.map_or("-".into(), |l| format!("{l:.4}")),
        summary.checkpoint.display()
    );
    if summary.unused_batches > 0 {
        println!(
            "note: the last {} micro-batches made no full step and were not used",
            summary.unused_batches
        );
    }
    Ok(match summary.outcome {
        Outcome::Interrupted => ExitCode::from(130),
        _ => ExitCode::SUCCESS,
    })
}

fn demo(dir: &Path, steps: u64) -> Result<ExitCode> {
    use shardtool::pack::{PackOptions, pack_split};
    use shardtool::scan::find_splits;
    use shardtool::synth::{SynthSpec, write_imagenet_like};
    shardtool::synth::claim_demo_dir(dir, "mimco")?;
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    let input = dir.join("imagenet");
    println!(
        "== 1. an ImageNet-shaped folder from the photos compiled into mimco: {}",
        input.display()
    );
    let spec = SynthSpec {
        classes: 10,
        train_per_class: 40,
        val_per_class: 0,
        flat_val: false,
        quirks: false,
        bad_files: false,
        short_side: (80, 160),
        quality: (80, 95),
        seed: 0,
    };
    write_imagenet_like(&input, &spec, workers)?;
    let shards = dir.join("shards");
    println!("== 2. packed into shards: {}", shards.display());
    let opts = PackOptions {
        out: shards.clone(),
        settings: pipeline::format::PackSettings {
            seed: 0,
            target_shard_bytes: 512 << 10,
            compression: pipeline::format::Compression::Zstd,
            zstd_level: 1,
            check: pipeline::format::ImageCheck::Header,
            reencode: None,
            write_json: true,
        },
        workers,
        strict: false,
        resume: false,
        progress: false,
    };
    for split in find_splits(&input, None)? {
        pack_split(&split, &opts)?;
    }
    let mut config =
        Config::from_toml(TINY_CONFIG).context("the embedded configs/tiny_cpu.toml")?;
    config.train.max_steps = steps;
    let out = dir.join("run");
    println!(
        "== 3. mimco train --config configs/tiny_cpu.toml --data {} --random-teacher --out {} (max_steps = {steps})\n   \
         RANDOM TEACHER: no teacher checkpoint is downloaded; the student learns to match a random ViT",
        shards.join("train").display(),
        out.display()
    );
    let job = Job {
        data: shards.join("train").display().to_string(),
        teacher: Some(TeacherSource::Random),
        out: out.clone(),
        resume: false,
        progress: true,
        knn: None,
        device: candle_core::Device::Cpu,
    };
    let code = train(&config, job)?;
    let metrics = out.join("metrics.jsonl");
    let records = mimco::metrics::read(&metrics)?;
    println!("== 4. losses (from {}):", metrics.display());
    println!(
        "   {:>5} {:>8} {:>8} {:>8} {:>9}",
        "step", "loss", "patch", "image", "img/s"
    );
    let every = (records.len() / 8).max(1);
    for r in records
        .iter()
        .enumerate()
        .filter(|(i, _)| i % every == 0 || *i + 1 == records.len())
        .map(|(_, r)| r)
    {
        let f = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.4}"));
        println!(
            "   {:>5} {:>8.4} {:>8} {:>8} {:>9.1}",
            r.report.step,
            r.report.loss,
            f(r.report.part("patch")),
            f(r.report.part("image")),
            r.images_per_s
        );
    }
    let png = out.join("metrics.png");
    match mimco::metrics::plot(&metrics, &png, None) {
        Ok(()) => println!("== 5. curves: {}", png.display()),
        Err(e) => println!("== 5. no plot: {e:#}"),
    }
    Ok(code)
}

fn bench(kind: BenchKind) -> Result<ExitCode> {
    match kind {
        BenchKind::Train {
            config: path,
            batch,
            precision,
            steps,
            warmup,
            data,
            kernels,
            without,
            device,
            peak_tflops,
            header,
        } => {
            let mut config = bench_config(&path, batch)?;
            if let Some(p) = precision {
                config.train.precision = toml::Value::String(p.clone())
                    .try_into()
                    .map_err(|_| anyhow::anyhow!("--precision {p}: expected f32, tf32 or bf16"))?;
            }
            mimco::functional::set_fused_kernels(kernels == KernelsArg::Fused);
            for w in &without {
                mimco::functional::disable(w.path());
            }
            let device = mimco::device::parse(&device)?;
            let opts = mimco::bench::BenchOptions {
                device: device.clone(),
                steps,
                warmup,
                data: data.clone(),
                store: StoreOptions::from_vars(std::env::vars()),
                peak_tflops,
            };
            let r = mimco::bench::train(&config, &opts)?;
            if header {
                println!(
                    "| config | device | precision | kernels | data | batch | images/s | step ms (median) | TFLOP/s | MFU | peak memory GiB | data wait |"
                );
                println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
            }
            println!(
                "| {} | {} | {} | {} | {} | {} | {:.0} | {:.1} | {:.1} | {:.1}% | {} | {:.1}% |",
                path.file_stem().map_or("-".into(), |s| s.to_string_lossy()),
                mimco::device::describe(&device),
                config.train.precision,
                match kernels {
                    KernelsArg::Fused => std::iter::once("fused".to_string())
                        .chain(without.iter().map(|w| format!("without {}", w.name())))
                        .collect::<Vec<_>>()
                        .join(", "),
                    KernelsArg::Stock => "stock".into(),
                },
                data.as_deref().map_or("synthetic", |_| "shards"),
                r.batch,
                r.images_per_s,
                r.step_ms,
                r.tflops,
                100.0 * r.mfu,
                r.peak_memory_gib.map_or("-".into(), |g| format!("{g:.1}")),
                r.data_wait_pct,
            );
            let phases: Vec<String> = r
                .phase_ms
                .iter()
                .map(|(k, v)| format!("{k} {v:.1} ms"))
                .collect();
            eprintln!(
                "phases per step (profiled, synchronised): {}",
                phases.join(", ")
            );
            Ok(ExitCode::SUCCESS)
        }
        BenchKind::Feed {
            config: path,
            data,
            batch,
            batches,
            warmup,
            device,
        } => {
            let config = bench_config(&path, batch)?;
            let device = mimco::device::parse(&device)?;
            let opts = mimco::bench::BenchOptions {
                device: device.clone(),
                steps: batches,
                warmup,
                data: Some(data),
                store: StoreOptions::from_vars(std::env::vars()),
                peak_tflops: 0.0,
            };
            let r = mimco::bench::feed(&config, &opts)?;
            let (fallbacks, black) = r.gpu_decode_faults;
            println!(
                "feed: {} images in batches of {} to {} at {:.0} images/s with {} decode threads, \
                 device_decode {} ({fallbacks} JPEGs left to the GPU decoded on the CPU \
                 instead, {black} black)",
                r.images,
                config.data.batch_size,
                mimco::device::describe(&device),
                r.images_per_s,
                config.data.worker_count(),
                config.data.device_decode,
            );
            Ok(ExitCode::SUCCESS)
        }
        BenchKind::Kernels { device, seed } => kernels(&device, seed),
    }
}

/// The config at `path`.
fn read_config(path: &Path) -> Result<Config> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    Config::from_toml(&text).with_context(|| format!("config {}", path.display()))
}

/// The config at `path`, with `batch` images per step if given.
fn bench_config(path: &Path, batch: Option<usize>) -> Result<Config> {
    let mut config = read_config(path)?;
    if let Some(b) = batch {
        config.data.batch_size = b;
        config.optim.batch_size = b;
    }
    Ok(config)
}

#[cfg(feature = "cuda")]
fn kernels(device: &str, seed: u64) -> Result<ExitCode> {
    let device = mimco::device::parse(device)?;
    if !device.is_cuda() {
        bail!("the kernel checks need a CUDA device: pass --device cuda");
    }
    let rows = mimco::cuda::check::run(&device, seed)?;
    println!("| check | shape | dtype | relative error | tolerance | |");
    println!("|---|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {} | {} | {:.2e} | {:.0e} | {} |",
            r.what,
            r.shape,
            r.dtype,
            r.error,
            r.tolerance,
            if r.passed() { "ok" } else { "FAIL" }
        );
    }
    let failed = rows.iter().filter(|r| !r.passed()).count();
    println!(
        "kernel checks: {} passed, {failed} failed",
        rows.len() - failed
    );
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

#[cfg(not(feature = "cuda"))]
fn kernels(_device: &str, _seed: u64) -> Result<ExitCode> {
    bail!(
        "this mimco was built without CUDA: the kernel checks need `cargo build --release --features cuda` and a GPU"
    )
}

fn evaluate(kind: EvalKind) -> Result<ExitCode> {
    use mimco::eval::{self, EvalResult, Feature};
    let common = match &kind {
        EvalKind::Knn { common, .. } | EvalKind::Linear { common, .. } => common,
    };
    let config = match &common.config {
        Some(path) => Some(read_config(path)?),
        None => None,
    };
    let subject = eval::load_subject(common.weights.as_deref(), config)?;
    let feature = match common.feature {
        FeatureArg::Cls => Feature::Cls,
        FeatureArg::Mean => Feature::Mean,
    };
    let store = StoreOptions::from_vars(std::env::vars());
    let normalise = matches!(kind, EvalKind::Knn { .. });
    let (encoder, data) = (subject.encoder.as_ref(), &subject.config.data);
    let train = eval::extract(
        encoder,
        data,
        &common.train,
        &store,
        feature,
        normalise,
        None,
    )?;
    let val = eval::extract(encoder, data, &common.val, &store, feature, normalise, None)?;
    eval::same_classes(&train, &val)?;
    let (name, accuracy, settings) = match kind {
        EvalKind::Knn { k, temperature, .. } => {
            let a = eval::knn::knn(&train, &val, k, temperature)?;
            ("knn", a, format!("k={k}, T={temperature}"))
        }
        EvalKind::Linear {
            epochs, batch, lr, ..
        } => {
            let settings = eval::linear::ProbeSettings {
                epochs,
                batch,
                lr,
                seed: 0,
            };
            let a = eval::linear::linear_probe(&train, &val, settings)?;
            (
                "linear",
                a,
                format!("{epochs} epochs, batch {batch}, lr {lr}"),
            )
        }
    };
    let weights = common
        .weights
        .as_ref()
        .map_or("random-init".to_string(), |w| w.display().to_string());
    let result = EvalResult {
        eval: name.into(),
        label: common.label.clone().unwrap_or_else(|| weights.clone()),
        weights,
        feature,
        top1: accuracy.top1,
        top5: accuracy.top5,
        train_samples: train.labels.len(),
        val_samples: val.labels.len(),
        settings,
    };
    println!("{}", result.line());
    result.append_to(&common.results)?;
    Ok(ExitCode::SUCCESS)
}

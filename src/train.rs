//! The training loop: pipeline batches in, optimiser steps, metrics lines, checkpoints
//! every N steps and on Ctrl-C, and exact resumption.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use candle_core::Device;
use indicatif::{ProgressBar, ProgressStyle};
use pipeline::{Loader, LoaderState, StoreOptions, Topology};

use crate::checkpoint;
use crate::config::{Config, MethodKind};
use crate::eval::KnnMonitor;
use crate::method;
use crate::metrics::{DataFaults, MetricsLog, Record};
use crate::teacher;
use crate::trainer::{StepReport, Trainer};

/// Where the teacher comes from.
#[derive(Clone, Debug)]
pub enum TeacherSource {
    /// A safetensors or PyTorch checkpoint.
    File(PathBuf),
    /// Random weights (smoke tests and benchmarks only).
    Random,
}

/// Everything about a run that is not in the config.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// Shards: a folder or an `s3://` / `http(s)://` URL.
    pub data: String,
    /// Object-store credentials and endpoint.
    pub store: StoreOptions,
    /// This process's rank and the world size.
    pub topology: Topology,
    /// Output folder: `last.safetensors`, `metrics.jsonl`.
    pub out: PathBuf,
    /// Continue from `out/last.safetensors`.
    pub resume: bool,
    /// MimCo's frozen teacher (other methods take none).
    pub teacher: Option<TeacherSource>,
    /// Draw a progress bar on stderr.
    pub progress: bool,
    /// Set (by Ctrl-C) to checkpoint and stop after the current step.
    pub stop: Arc<AtomicBool>,
    /// A k-NN check every `train.knn_every` steps, when given.
    pub knn: Option<KnnMonitor>,
    /// Where the model trains (see [`crate::device::parse`]).
    pub device: Device,
}

/// How a run ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The schedule ran to its end.
    Finished,
    /// `train.max_steps` was reached.
    MaxSteps,
    /// Stopped on request (Ctrl-C) after a checkpoint.
    Interrupted,
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Outcome::Finished => "finished the schedule",
            Outcome::MaxSteps => "reached train.max_steps",
            Outcome::Interrupted => "interrupted",
        })
    }
}

/// What a run did.
#[derive(Clone, Debug)]
pub struct Summary {
    /// How it ended.
    pub outcome: Outcome,
    /// Optimiser steps taken, in all (including those before a resume).
    pub steps: u64,
    /// Every step's report in this process, in order.
    pub reports: Vec<StepReport>,
    /// The last checkpoint written.
    pub checkpoint: PathBuf,
    /// Micro-batches left over at the end that made no full step.
    pub unused_batches: usize,
}

/// The checkpoint a run writes and resumes from.
pub fn last_checkpoint(out: &Path) -> PathBuf {
    out.join("last.safetensors")
}

/// Trains `config` on `opts.data` until the schedule, `max_steps` or a stop request ends it.
pub fn run(config: &Config, opts: &RunOptions) -> anyhow::Result<Summary> {
    let device = opts.device.clone();
    config.train.precision.apply_to_matmuls();
    match (&opts.knn, config.train.knn_every) {
        (Some(_), 0) => {
            bail!("--knn-train/--knn-val given: set [train] knn_every to the steps between checks")
        }
        (None, n) if n > 0 => {
            bail!("[train] knn_every = {n}: pass --knn-train and --knn-val (labelled shards)")
        }
        _ => {}
    }
    match (config.method, &opts.teacher) {
        (MethodKind::Mimco, None) => bail!(
            "MimCo needs its teacher: pass --teacher FILE (or --random-teacher for a smoke test)"
        ),
        (MethodKind::Mimco, Some(_)) | (_, None) => {}
        (method, Some(_)) => {
            bail!("method {method:?} trains without a teacher: drop --teacher/--random-teacher")
        }
    }
    crate::device::check_device_decode(&device, &config.data)?;
    let ckpt_path = last_checkpoint(&opts.out);
    if !opts.resume && ckpt_path.exists() {
        bail!(
            "{} holds a checkpoint: pass --resume to continue it, or choose another --out",
            opts.out.display()
        );
    }
    let metrics_path = opts.out.join("metrics.jsonl");
    if !opts.resume && metrics_path.exists() {
        bail!(
            "{} holds the metrics of an earlier run that wrote no checkpoint: choose another --out, or delete them",
            opts.out.display()
        );
    }
    if opts.resume && !ckpt_path.exists() {
        bail!(
            "--resume: there is no {} to resume from",
            ckpt_path.display()
        );
    }
    let loader = Loader::open(
        &opts.data,
        &opts.store,
        opts.topology,
        config.data.clone(),
        crate::device::batch_allocator(&device),
    )
    .with_context(|| format!("opening the data at {}", opts.data))?;
    let accumulation = config.accumulation(opts.topology.world_size)?;
    let batches_per_epoch = loader.plan(0)?.batches;
    let total_batches = batches_per_epoch as u64 * config.optim.epochs;
    let total_steps = total_batches / accumulation as u64;
    if total_steps == 0 {
        bail!(
            "{} gives {batches_per_epoch} batches of {} per epoch on this rank: fewer than one step of {accumulation} micro-batches in {} epochs. Lower optim.batch_size or data.batch_size",
            opts.data,
            config.data.batch_size,
            config.optim.epochs
        );
    }
    let size = config.data.transform.size as usize;
    let teacher = match &opts.teacher {
        Some(TeacherSource::File(path)) => {
            Some(teacher::load(path, config.teacher()?, size, &device)?)
        }
        Some(TeacherSource::Random) => Some(teacher::random(
            config.teacher()?,
            size,
            config.train.seed,
            &device,
        )?),
        None => None,
    };
    let model = method::build(config, teacher, &device)?;
    let steps_per_epoch = batches_per_epoch as f64 / accumulation as f64;
    let mut trainer = Trainer::new(model, total_steps, steps_per_epoch, accumulation, &device)?;
    let mut state = LoaderState::default();
    let fingerprint = loader.manifest().fingerprint();
    if opts.resume {
        let (tensors, meta) = checkpoint::load(&ckpt_path, &device)?;
        if meta
            .data
            .as_ref()
            .is_some_and(|saved| *saved != fingerprint)
        {
            bail!(
                "--resume: {} was trained on other data than the split at {} (its shards \
                 differ): resume with the data it was trained on, or start a new --out",
                ckpt_path.display(),
                opts.data
            );
        }
        state = trainer.restore(&tensors, &meta)?;
    }
    let save = |trainer: &Trainer, state: LoaderState| -> anyhow::Result<()> {
        let (tensors, mut meta) = trainer.checkpoint(state)?;
        meta.data = Some(fingerprint.clone());
        checkpoint::save(&ckpt_path, &tensors, &meta)
    };
    std::fs::create_dir_all(&opts.out)
        .with_context(|| format!("creating {}", opts.out.display()))?;
    std::fs::write(opts.out.join("config.toml"), toml::to_string(config)?)?;
    let mut log = MetricsLog::open(&metrics_path, trainer.step())?;
    let max_steps = match config.train.max_steps {
        0 => total_steps,
        n => n.min(total_steps),
    };
    let bar = progress_bar(opts.progress, max_steps, trainer.step());
    let (started, mut window) = (Instant::now(), Window::new());
    let mut reports = Vec::new();
    let mut outcome = Outcome::Finished;
    let mut micro_since_step = 0;
    'epochs: while state.epoch < config.optim.epochs && trainer.step() < max_steps {
        let mut batches = loader.epoch(state)?;
        // Each batch's upload starts before the one before it is fed, so that its copy to
        // the GPU overlaps that step; the batch stays alive until its own step returns.
        let epoch = state.epoch;
        let mut fetch = |trainer: &Trainer, window: &mut Window| -> anyhow::Result<_> {
            let waited = Instant::now();
            let Some(batch) = batches.next() else {
                return Ok(None);
            };
            window.wait += waited.elapsed();
            let batch = batch.with_context(|| format!("reading epoch {epoch} of {}", opts.data))?;
            let staged = trainer.upload_batch(&batch)?;
            Ok(Some((staged, batch))) // in this order, an unused upload drops first
        };
        let mut next = fetch(&trainer, &mut window)?;
        while let Some((staged, batch)) = next.take() {
            next = fetch(&trainer, &mut window)?;
            state = batch.state_after;
            window.images += batch.len();
            micro_since_step += 1;
            let Some(report) = trainer.feed_staged(staged)? else {
                continue;
            };
            drop(batch); // its step has read its loss back: the copy is done
            micro_since_step = 0;
            let step = report.step;
            let mut knn_top1 = None;
            if let Some(monitor) = opts
                .knn
                .as_ref()
                .filter(|_| step % config.train.knn_every == 0)
            {
                let checked = Instant::now();
                knn_top1 = Some(monitor.top1(trainer.model.encoder(), &config.data)?);
                window.start += checked.elapsed(); // not training time
            }
            if step % config.train.log_every.max(1) == 0 || step == max_steps || knn_top1.is_some()
            {
                let mut record = window.record(&report, state.epoch, started.elapsed());
                record.knn_top1 = knn_top1;
                record.data_faults = DataFaults::from(&loader.metrics());
                (
                    record.data_faults.gpu_decode_fallbacks,
                    record.data_faults.black_samples,
                ) = trainer.gpu_decode_faults();
                let parts: String = report
                    .parts
                    .iter()
                    .map(|(name, v)| format!(" {name} {v:.3}"))
                    .collect();
                let knn = knn_top1.map_or(String::new(), |a| format!(" k-NN {a:.1}%"));
                bar.set_message(format!(
                    "loss {:.4}{parts}{knn} lr {:.2e} {:.0} img/s data wait {:.0}%",
                    report.loss,
                    report.lr,
                    record.images_per_s,
                    100.0 * record.data_wait
                ));
                log.write(&record)?;
                window = Window::new();
            }
            bar.set_position(step);
            reports.push(report);
            let every = config.train.checkpoint_every;
            if (every > 0 && step % every == 0) || step == max_steps {
                save(&trainer, state)?;
            }
            if opts.stop.load(Ordering::Relaxed) {
                save(&trainer, state)?;
                outcome = Outcome::Interrupted;
                break 'epochs;
            }
            if step == max_steps {
                if max_steps < total_steps {
                    outcome = Outcome::MaxSteps;
                }
                break 'epochs;
            }
        }
        // The epoch's stream ended (the loader yields every planned batch or an error).
        state = LoaderState {
            epoch: state.epoch + 1,
            ..Default::default()
        };
    }
    bar.finish();
    if outcome == Outcome::Finished && trainer.step() > 0 {
        save(&trainer, state)?;
    }
    Ok(Summary {
        outcome,
        steps: trainer.step(),
        reports,
        checkpoint: ckpt_path,
        unused_batches: if outcome == Outcome::Finished {
            micro_since_step
        } else {
            0
        },
    })
}

/// Throughput and data wait since the last metrics line.
struct Window {
    start: Instant,
    images: usize,
    wait: Duration,
}

impl Window {
    fn new() -> Window {
        Window {
            start: Instant::now(),
            images: 0,
            wait: Duration::ZERO,
        }
    }

    fn record(&self, r: &StepReport, epoch: u64, elapsed: Duration) -> Record {
        let secs = self.start.elapsed().as_secs_f64().max(1e-9);
        Record {
            report: r.clone(),
            epoch,
            images_per_s: self.images as f64 / secs,
            data_wait: self.wait.as_secs_f64() / secs,
            elapsed_s: elapsed.as_secs_f64(),
            knn_top1: None,
            data_faults: DataFaults::default(),
        }
    }
}

fn progress_bar(visible: bool, total: u64, at: u64) -> ProgressBar {
    if !visible {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(total).with_position(at);
    let style = ProgressStyle::with_template("step {pos}/{len} {wide_bar} {elapsed}<{eta} {msg}")
        .unwrap_or_else(|_| ProgressStyle::default_bar());
    bar.set_style(style);
    bar
}

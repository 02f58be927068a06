//! `mimco bench train`: optimiser steps of a config at full speed, on synthetic uint8
//! batches or on the pipeline's real batches, timed and counted. `mimco bench feed`: the
//! pipeline's batches uploaded (and decoded on the GPU with `[data] device_decode`) with
//! no step, the most a step can be fed.
//!
//! Every step is the trainer's own (`Trainer::upload` of the next synthetic batch, or
//! `Trainer::upload_batch` of the loader's, then
//! `Trainer::feed_staged`: normalise, teacher forward, student forward and backward,
//! heads, losses, clipping, AdamW, EMA), as `mimco train` runs them; each ends with the
//! loss read back, so the host clock measures finished GPU work. FLOPs count the
//! encoders' matmuls only (teacher forward once, student forward and backward as 3x its
//! forward; heads and element-wise work excluded), so MFU is a lower bound.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use candle_core::Device;
use pipeline::{Loader, LoaderState, StoreOptions, Topology};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::config::{Config, MethodKind};
use crate::method;
use crate::models::vit::VitConfig;
use crate::teacher;
use crate::trainer::{Staged, Trainer};

/// What to run.
#[derive(Clone, Debug)]
pub struct BenchOptions {
    /// Where the steps run.
    pub device: Device,
    /// Timed steps.
    pub steps: usize,
    /// Untimed steps first (kernel compilation, allocator warm-up).
    pub warmup: usize,
    /// Shards to read batches from; `None`: synthetic batches (random pixels, random masks
    /// at the config's ratio), made once and uploaded every step.
    pub data: Option<String>,
    /// Object-store settings for `data`.
    pub store: StoreOptions,
    /// The device's peak dense bf16 (or f32) rate, TFLOP/s, for MFU.
    pub peak_tflops: f64,
}

/// What a benchmark measured.
#[derive(Clone, Debug)]
pub struct BenchReport {
    /// Images per optimiser step.
    pub batch: usize,
    /// Timed steps.
    pub steps: usize,
    /// Images per second over the timed steps.
    pub images_per_s: f64,
    /// Median step time, milliseconds.
    pub step_ms: f64,
    /// Encoder matmul FLOPs per image (see the module docs).
    pub flops_per_image: f64,
    /// Achieved TFLOP/s from those FLOPs.
    pub tflops: f64,
    /// `tflops / peak_tflops`.
    pub mfu: f64,
    /// Most device memory in use during the timed steps (the whole device, all
    /// processes), GiB; `None` on the CPU.
    pub peak_memory_gib: Option<f64>,
    /// Share of the timed wall time spent waiting for the next batch, percent.
    pub data_wait_pct: f64,
    /// Milliseconds per step in each phase (forward, backward, update), from a few
    /// extra steps with a synchronisation after the update.
    pub phase_ms: Vec<(&'static str, f64)>,
}

/// Matmul FLOPs of one forward of a ViT on `image_size` inputs.
pub fn vit_forward_flops(c: &VitConfig, image_size: usize) -> f64 {
    let grid = image_size / c.patch_size;
    let patches = (grid * grid) as f64;
    let (t, d) = (patches + 1.0, c.dim as f64);
    let hidden = d * c.mlp_ratio;
    let embed = 2.0 * patches * (3 * c.patch_size * c.patch_size) as f64 * d;
    // qkv 3d, proj d, fc1 + fc2 2 * hidden; scores and weighted sum 2 * t * d.
    let block = 2.0 * t * d * (3.0 * d + d + 2.0 * hidden) + 4.0 * t * t * d;
    embed + c.depth as f64 * block
}

/// FLOPs per image of one training step of `config` (see the module docs).
pub fn step_flops_per_image(config: &Config) -> anyhow::Result<f64> {
    let size = config.data.transform.size as usize;
    let student = vit_forward_flops(&config.student, size);
    Ok(match config.method {
        MethodKind::Mimco => vit_forward_flops(config.teacher()?, size) + 3.0 * student,
        MethodKind::Mocov3 => {
            // Two views through the encoder (forward and backward) and the momentum encoder.
            let views = 2.0;
            views * (3.0 * student + student)
        }
        MethodKind::Simmim => 3.0 * student,
    })
}

/// `config` with one micro-batch per optimiser step, and its trainer (random teacher) on
/// `opts.device`, scheduled for the steps `opts` asks for.
fn setup(config: &Config, opts: &BenchOptions) -> anyhow::Result<(Config, Trainer)> {
    if opts.steps == 0 {
        bail!("--steps must be at least 1");
    }
    let mut config = config.clone();
    config.optim.batch_size = config.data.batch_size;
    let size = config.data.transform.size as usize;
    let device = &opts.device;
    config.train.precision.apply_to_matmuls();
    let teacher = match config.method {
        MethodKind::Mimco => Some(teacher::random(
            config.teacher()?,
            size,
            config.train.seed,
            device,
        )?),
        _ => None,
    };
    let model = method::build(&config, teacher, device)?;
    let total = (opts.warmup + 2 * opts.steps + 5) as u64;
    let trainer = Trainer::new(model, total.max(2), total as f64, 1, device)?;
    Ok((config, trainer))
}

/// Runs `opts.warmup + opts.steps` optimiser steps of `config` (one micro-batch each, of
/// `config.data.batch_size` images) and reports the timed ones.
pub fn train(config: &Config, opts: &BenchOptions) -> anyhow::Result<BenchReport> {
    let (config, mut trainer) = setup(config, opts)?;
    let device = &opts.device;
    let batch = config.data.batch_size;
    let mut source = Source::new(&config, opts)?;
    let grid = config.data.transform.size as usize / config.student.patch_size;
    let mut times = Vec::with_capacity(opts.steps);
    let (mut waited, mut min_free) = (Duration::ZERO, usize::MAX);
    let mut timed_from = Instant::now();
    // As `mimco train` does: each batch's upload starts before the one before it is fed.
    let mut staged = source.upload_next(&trainer, grid)?;
    for step in 0..opts.warmup + opts.steps {
        if step == opts.warmup {
            timed_from = Instant::now();
            waited = Duration::ZERO;
        }
        let started = Instant::now();
        let next = source.upload_next(&trainer, grid)?;
        waited += started.elapsed();
        let report = trainer.feed_staged(std::mem::replace(&mut staged, next))?;
        if report.is_none() {
            bail!("step {step} made no optimiser step");
        }
        if step >= opts.warmup {
            times.push(started.elapsed());
            if let Some((free, _)) = crate::device::memory(device) {
                min_free = min_free.min(free);
            }
        }
    }
    let wall = timed_from.elapsed().as_secs_f64();
    let peak_memory_gib = crate::device::memory(device)
        .map(|(_, total)| (total - min_free.min(total)) as f64 / (1u64 << 30) as f64);
    // Phases: a few more steps, profiled (the synchronisation they add is not in the
    // figures above). The last one is the range a CUDA profiler records, if one is
    // attached (benches/gpu.sh runs Nsight Compute on it).
    trainer.profile_phases();
    let profiled = opts.steps.clamp(1, 5);
    for i in 0..profiled {
        let next = source.upload_next(&trainer, grid)?;
        let last = i + 1 == profiled;
        if last {
            crate::device::profiler_range(device, true)?;
        }
        trainer.feed_staged(std::mem::replace(&mut staged, next))?;
        if last {
            crate::device::profiler_range(device, false)?;
        }
    }
    let phase_ms = trainer
        .phase_times()
        .map(|p| {
            p.iter()
                .map(|(k, v)| (*k, v.as_secs_f64() * 1e3 / profiled as f64))
                .collect()
        })
        .unwrap_or_default();
    if config.data.device_decode && opts.data.is_some() {
        let (fallbacks, black) = trainer.gpu_decode_faults();
        eprintln!(
            "device decode: {fallbacks} JPEGs left to the GPU were decoded on the CPU instead, \
             {black} nowhere (black)"
        );
    }
    times.sort();
    let images_per_s = (opts.steps * batch) as f64 / wall;
    let flops_per_image = step_flops_per_image(&config)?;
    let tflops = flops_per_image * images_per_s / 1e12;
    Ok(BenchReport {
        batch,
        steps: opts.steps,
        images_per_s,
        step_ms: times[times.len() / 2].as_secs_f64() * 1e3,
        flops_per_image,
        tflops,
        mfu: tflops / opts.peak_tflops,
        peak_memory_gib,
        data_wait_pct: 100.0 * waited.as_secs_f64() / wall,
        phase_ms,
    })
}

/// What `mimco bench feed` measured.
#[derive(Clone, Debug)]
pub struct FeedReport {
    /// Images in the timed batches.
    pub images: usize,
    /// Images per second over the timed batches, each on the device when counted.
    pub images_per_s: f64,
    /// JPEGs left encoded for the GPU that it did not decode: decoded on the CPU instead,
    /// and delivered black (`Trainer::gpu_decode_faults`).
    pub gpu_decode_faults: (u64, u64),
}

/// `opts.warmup + opts.steps` batches of `opts.data` uploaded to `opts.device` (and decoded
/// there where `[data] device_decode` left JPEGs encoded), with no training step: the rate
/// at which the data path fills the GPU, the most a step can be fed. As in training, the
/// next batch's upload is started before the one before it is waited for.
pub fn feed(config: &Config, opts: &BenchOptions) -> anyhow::Result<FeedReport> {
    if opts.data.is_none() {
        bail!("mimco bench feed reads shards: pass --data with a folder or URL");
    }
    let (config, trainer) = setup(config, opts)?;
    let mut source = Source::new(&config, opts)?;
    let grid = config.data.transform.size as usize / config.student.patch_size;
    let mut staged = source.upload_next(&trainer, grid)?;
    let mut timed_from = Instant::now();
    for batch in 0..opts.warmup + opts.steps {
        if batch == opts.warmup {
            timed_from = Instant::now();
        }
        let next = source.upload_next(&trainer, grid)?;
        // Dropped unused, an upload waits on the host until its copy (and decode) is done.
        drop(std::mem::replace(&mut staged, next));
    }
    drop(staged);
    let wall = timed_from.elapsed().as_secs_f64();
    // The last batch counted is the one in flight at the end, waited for just above.
    let images = opts.steps * config.data.batch_size;
    Ok(FeedReport {
        images,
        images_per_s: images as f64 / wall,
        gpu_decode_faults: trainer.gpu_decode_faults(),
    })
}

/// Batches for the benchmark: the loader's, or two synthetic ones in turn.
enum Source {
    Synthetic {
        sets: Vec<(Box<dyn pipeline::HostBuffer>, Vec<u8>)>,
        next: usize,
    },
    Loader(Box<Streamed>),
}

/// The loader's epochs, one after another, and the last two batches: the one being fed
/// and the one being uploaded, whose bytes must outlive their copies.
struct Streamed {
    loader: Loader,
    epoch: Option<pipeline::Epoch>,
    state: LoaderState,
    held: std::collections::VecDeque<pipeline::Batch>,
}

impl Source {
    fn new(config: &Config, opts: &BenchOptions) -> anyhow::Result<Source> {
        let Some(data) = &opts.data else {
            let t = &config.data.transform;
            let size = t.size as usize;
            let views = match config.method {
                MethodKind::Mocov3 => 2,
                _ => 1,
            };
            let grid = size / config.student.patch_size;
            let mut rng = ChaCha8Rng::seed_from_u64(config.train.seed);
            // Pinned on CUDA, as the loader's batches are.
            let allocate = crate::device::batch_allocator(&opts.device)
                .unwrap_or_else(pipeline::vec_allocator);
            let sets = (0..2)
                .map(|_| {
                    let mut pixels = allocate(config.data.batch_size * views * 3 * size * size);
                    rng.fill(&mut pixels[..]);
                    let masked = match t.masking {
                        true => (t.mask_ratio * (grid * grid) as f64).round() as usize,
                        false => 0,
                    };
                    let mut masks = Vec::with_capacity(config.data.batch_size * grid * grid);
                    for _ in 0..config.data.batch_size {
                        let mut m: Vec<u8> =
                            (0..grid * grid).map(|i| u8::from(i < masked)).collect();
                        m.shuffle(&mut rng);
                        masks.extend(m);
                    }
                    (pixels, masks)
                })
                .collect();
            return Ok(Source::Synthetic { sets, next: 0 });
        };
        crate::device::check_device_decode(&opts.device, &config.data)?;
        let loader = Loader::open(
            data,
            &opts.store,
            Topology::default(),
            config.data.clone(),
            crate::device::batch_allocator(&opts.device),
        )
        .with_context(|| format!("opening the data at {data}"))?;
        Ok(Source::Loader(Box::new(Streamed {
            loader,
            epoch: None,
            state: LoaderState::default(),
            held: Default::default(),
        })))
    }

    /// The next batch, its upload to the trainer's device started (as `mimco train` does:
    /// JPEGs left encoded are decoded there).
    fn upload_next(&mut self, trainer: &Trainer, grid: usize) -> anyhow::Result<Staged> {
        match self {
            Source::Synthetic { sets, next } => {
                let (pixels, masks) = &sets[*next % sets.len()];
                *next += 1;
                let batch = masks.len() / (grid * grid);
                let size = grid * trainer.model.config().student.patch_size;
                let views = pixels.len() / (batch * 3 * size * size);
                trainer.upload(pixels, (batch, views, 3, size, size), masks.clone())
            }
            Source::Loader(streamed) => trainer.upload_batch(streamed.next()?),
        }
    }
}

impl Streamed {
    /// The loader's next batch, the next epoch's first at an epoch's end. It stays held
    /// until two more have been taken: its step has returned by then.
    fn next(&mut self) -> anyhow::Result<&pipeline::Batch> {
        for _ in 0..2 {
            if self.epoch.is_none() {
                self.epoch = Some(self.loader.epoch(self.state)?);
            }
            match self.epoch.as_mut().and_then(|e| e.next()) {
                Some(batch) => {
                    let batch = batch?;
                    self.state = batch.state_after;
                    if self.held.len() == 2 {
                        self.held.pop_front(); // fed: its step has returned
                    }
                    self.held.push_back(batch);
                    return Ok(self.held.back().expect("just pushed"));
                }
                None => {
                    self.epoch = None;
                    self.state = LoaderState {
                        epoch: self.state.epoch + 1,
                        ..LoaderState::default()
                    };
                }
            }
        }
        bail!("the data gave no batch in two epochs: too few images for one batch?")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// DeiT's table gives ViT-S/16 4.6 and ViT-B/16 17.6 "GFLOPs" at 224 px, counting
    /// multiply-adds once; we count them twice.
    #[test]
    fn vit_small_forward_flops_match_the_published_count() {
        let flops = vit_forward_flops(&VitConfig::vit_small(), 224);
        assert!((flops / 1e9 - 9.2).abs() < 0.1, "{}", flops / 1e9);
        let base = vit_forward_flops(&VitConfig::vit_base(), 224);
        assert!((base / 1e9 - 35.1).abs() < 0.3, "{}", base / 1e9);
    }
}

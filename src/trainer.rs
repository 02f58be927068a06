//! One optimiser step at a time for any [`Method`]: forward, backward, gradient
//! accumulation, clipping, AdamW, the momentum update, and the state that checkpoints carry.

use std::collections::{BTreeMap, HashMap};

use anyhow::{Context, bail};
use candle_core::{Device, IndexOp, Tensor};
use pipeline::{Batch, LoaderState};
use serde::{Deserialize, Serialize};

use crate::checkpoint::{FORMAT, Meta};
use crate::config::{Config, MethodKind};
use crate::method::Method;
use crate::optim::{AdamW, AdamWParams, GradAccumulator};
use crate::schedule;

/// ImageNet's channel mean and standard deviation (the trainer normalises uint8 batches).
pub const MEAN: [f32; 3] = [0.485, 0.456, 0.406];
/// See [`MEAN`].
pub const STD: [f32; 3] = [0.229, 0.224, 0.225];

/// uint8 images `(..., 3, H, W)` -> f32 `(x / 255 - MEAN) / STD`, on the tensor's device
/// (the trainer's batches and the evaluation's alike).
pub fn normalize(images: &Tensor) -> candle_core::Result<Tensor> {
    let dev = images.device();
    let scale: [f32; 3] = std::array::from_fn(|c| 1.0 / (255.0 * STD[c]));
    let shift: [f32; 3] = std::array::from_fn(|c| -MEAN[c] / STD[c]);
    #[cfg(feature = "cuda")]
    if crate::functional::fused(images, 0) {
        return crate::cuda::normalize_u8(images, scale, shift);
    }
    let per_channel = |v: [f32; 3]| Tensor::from_slice(&v, (3, 1, 1), dev);
    images
        .to_dtype(candle_core::DType::F32)?
        .broadcast_mul(&per_channel(scale)?)?
        .broadcast_add(&per_channel(shift)?)
}

/// What one optimiser step did (losses are means over its micro-batches).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepReport {
    /// Steps taken, this one included.
    pub step: u64,
    /// Total loss.
    pub loss: f64,
    /// The method's named terms (MimCo: `patch`, `image`).
    #[serde(flatten)]
    pub parts: BTreeMap<String, f64>,
    /// Learning rate used.
    pub lr: f64,
    /// Momentum of the EMA used (1 for methods without one).
    pub momentum: f64,
    /// Gradient norm before clipping.
    pub grad_norm: f64,
}

impl StepReport {
    /// The term called `name`, if the method has it.
    pub fn part(&self, name: &str) -> Option<f64> {
        self.parts.get(name).copied()
    }
}

/// A batch on its way to the trainer's device ([`Trainer::upload`]): its uint8 images
/// (on CUDA, still being copied on a stream of their own) and its token mask.
pub struct Staged {
    /// The copy to wait for before the images are read. Declared before them: fields drop
    /// in order, and an unused copy must finish before their buffer is freed.
    #[cfg(feature = "cuda")]
    copy: Option<crate::cuda::Upload>,
    images: Tensor,
    mask: Vec<u8>,
}

/// The method with its optimiser and schedule.
pub struct Trainer {
    /// The method.
    pub model: Box<dyn Method>,
    opt: AdamW,
    acc: GradAccumulator,
    step: u64,
    accumulation: usize,
    total_steps: u64,
    warmup_steps: u64,
    peak_lr: f64,
    sums: BTreeMap<String, f64>,
    device: Device,
    /// The copy stream for batches, on CUDA.
    #[cfg(feature = "cuda")]
    uploader: Option<crate::cuda::Uploader>,
    /// Wall time per phase of the step, when profiling.
    phases: Option<Vec<(&'static str, std::time::Duration)>>,
}

impl Trainer {
    /// A fresh run of `total_steps` optimiser steps, each `accumulation` micro-batches,
    /// with `steps_per_epoch` to place the warm-up.
    pub fn new(
        model: Box<dyn Method>,
        total_steps: u64,
        steps_per_epoch: f64,
        accumulation: usize,
        device: &Device,
    ) -> anyhow::Result<Trainer> {
        let o = &model.config().optim;
        let params = AdamWParams {
            betas: (o.betas[0], o.betas[1]),
            eps: o.eps,
            weight_decay: o.weight_decay,
        };
        let vars: Vec<_> = model
            .trainable()
            .vars()
            .into_iter()
            .filter(|(name, _)| !model.frozen(name))
            .collect();
        let n = vars.len();
        let (warmup_steps, peak_lr) = (
            (o.warmup_epochs * steps_per_epoch).round() as u64,
            schedule::scaled_lr(o.base_lr, o.batch_size, o.lr_batch),
        );
        Ok(Trainer {
            opt: AdamW::new(vars, params)?,
            model,
            acc: GradAccumulator::new(n),
            step: 0,
            accumulation,
            total_steps,
            warmup_steps,
            peak_lr,
            sums: BTreeMap::new(),
            device: device.clone(),
            #[cfg(feature = "cuda")]
            uploader: match device {
                Device::Cuda(dev) => Some(crate::cuda::Uploader::new(dev)?),
                _ => None,
            },
            phases: None,
        })
    }

    /// Starts (or restarts) timing the phases of each step, in order: `forward` (the host
    /// queueing the forward's work), `loss wait` (waiting for the loss to be read back),
    /// `backward` (queueing it), `norm wait` (the gradient norm queued and read back),
    /// `update` (AdamW and EMA queued) and `update wait` (a device synchronisation added
    /// at the end). Long waits mean the GPU is the bottleneck; short ones, the host.
    pub fn profile_phases(&mut self) {
        self.phases = Some(Vec::new());
    }

    /// Wall time per phase since [`Trainer::profile_phases`], in step order.
    pub fn phase_times(&self) -> Option<&[(&'static str, std::time::Duration)]> {
        self.phases.as_deref()
    }

    fn lap(&mut self, phase: &'static str, since: &mut std::time::Instant) {
        if let Some(p) = &mut self.phases {
            match p.iter_mut().find(|(name, _)| *name == phase) {
                Some((_, total)) => *total += since.elapsed(),
                None => p.push((phase, since.elapsed())),
            }
        }
        *since = std::time::Instant::now();
    }

    /// Optimiser steps taken.
    pub fn step(&self) -> u64 {
        self.step
    }

    /// The optimiser (for its parameter groups).
    pub fn optimizer(&self) -> &AdamW {
        &self.opt
    }

    /// Feeds one batch from the pipeline; see [`Trainer::micro_batch`].
    pub fn feed(&mut self, batch: &Batch) -> anyhow::Result<Option<StepReport>> {
        let staged = self.upload_batch(batch)?;
        self.feed_staged(staged)
    }

    /// Of the JPEGs batches left for the GPU so far: how many it did not decode (decoded
    /// on the CPU instead), and how many decoded nowhere (delivered black).
    pub fn gpu_decode_faults(&self) -> (u64, u64) {
        #[cfg(feature = "cuda")]
        if let Some(uploader) = &self.uploader {
            let d = uploader.decoded();
            return ((d.on_cpu + d.failed) as u64, d.failed as u64);
        }
        (0, 0)
    }

    /// [`Trainer::upload`] of one batch from the pipeline.
    pub fn upload_batch(&self, batch: &Batch) -> anyhow::Result<Staged> {
        let (size, views) = (batch.size as usize, batch.views);
        let grid = size / self.model.config().student.patch_size;
        let shape = (batch.len(), views, 3, size, size);
        let mask = batch.token_masks(grid);
        if batch.encoded.is_empty() {
            return self.upload(batch.images(), shape, mask);
        }
        // JPEGs left encoded ([data] device_decode) are decoded after the copy, on the
        // copy stream, into their slots.
        #[cfg(feature = "cuda")]
        if let Some(uploader) = &self.uploader {
            let decoded = batch.decoded_ranges();
            let decode = crate::cuda::ToDecode {
                decoded: &decoded,
                encoded: &batch.encoded,
                keys: &batch.keys,
                size: batch.size,
            };
            let (images, copy) = uploader.start(batch.images(), shape, Some(decode))?;
            return Ok(Staged {
                copy: Some(copy),
                images,
                mask,
            });
        }
        anyhow::bail!(
            "{} images of this batch are left encoded for the GPU ([data] device_decode = \
             true), which only the CUDA trainer decodes: set device_decode = false",
            batch.encoded.len()
        )
    }

    /// Starts copying `(B, views, 3, H, W)` uint8 `images` to the trainer's device, with
    /// the token `mask` (`B x N` bytes): on CUDA on a stream of its own, so that uploading
    /// the next batch before feeding this one overlaps the copy with this one's step. The
    /// bytes must stay as they are until the step that feeds them has returned.
    pub fn upload(
        &self,
        images: &[u8],
        shape: (usize, usize, usize, usize, usize),
        mask: Vec<u8>,
    ) -> anyhow::Result<Staged> {
        #[cfg(feature = "cuda")]
        if let Some(uploader) = &self.uploader
            && crate::functional::enabled(crate::functional::FastPath::CopyStream)
        {
            let (images, copy) = uploader.start(images, shape, None)?;
            return Ok(Staged {
                copy: Some(copy),
                images,
                mask,
            });
        }
        Ok(Staged {
            #[cfg(feature = "cuda")]
            copy: None,
            images: Tensor::from_slice(images, shape, &self.device)?,
            mask,
        })
    }

    /// Feeds a batch [`Trainer::upload`] started; see [`Trainer::micro_batch`].
    pub fn feed_staged(&mut self, staged: Staged) -> anyhow::Result<Option<StepReport>> {
        #[cfg(feature = "cuda")]
        if let Some(copy) = staged.copy {
            copy.ready()?;
        }
        self.feed_uint8(&staged.images, &staged.mask)
    }

    /// Feeds `(B, views, 3, H, W)` uint8 `images` already on the trainer's device, with the
    /// token `mask` (`B x N` bytes): they are normalised there (the host sends 1 byte per
    /// value, not 4).
    pub fn feed_uint8(
        &mut self,
        images: &Tensor,
        mask: &[u8],
    ) -> anyhow::Result<Option<StepReport>> {
        let views = images.dim(1)?;
        let all = normalize(images)?;
        let views = (0..views)
            .map(|v| all.i((.., v))?.contiguous())
            .collect::<candle_core::Result<Vec<_>>>()?;
        self.micro_batch(&views, mask)
    }

    /// Forward and backward of one micro-batch; after `accumulation` of them, one AdamW
    /// step and one momentum update, reported. A loss or gradient that is not finite is
    /// an error, raised before anything is updated.
    pub fn micro_batch(
        &mut self,
        views: &[Tensor],
        mask: &[u8],
    ) -> anyhow::Result<Option<StepReport>> {
        let mut clock = std::time::Instant::now();
        let losses = self.model.losses(views, mask)?;
        self.lap("forward", &mut clock);
        let loss = f64::from(losses.total.to_scalar::<f32>()?);
        let mut parts = BTreeMap::new();
        for (name, t) in &losses.parts {
            parts.insert(name.to_string(), f64::from(t.to_scalar::<f32>()?));
        }
        self.lap("loss wait", &mut clock);
        if !loss.is_finite() {
            bail!(
                "the loss is {loss} ({parts:?}) at step {}: training stopped before applying it; the last checkpoint is intact. Lower optim.base_lr or raise optim.warmup_epochs",
                self.step + 1
            );
        }
        let grads = losses.total.backward()?;
        self.acc.add(self.opt.vars(), &grads)?;
        self.lap("backward", &mut clock);
        *self.sums.entry(String::new()).or_default() += loss;
        for (name, v) in parts {
            *self.sums.entry(name).or_default() += v;
        }
        let report = match self.acc.micro_batches() < self.accumulation {
            true => None,
            false => Some(self.apply(&mut clock)?),
        };
        // Last: the batch's keys are not their own negatives, and a step that failed
        // leaves the queues as they were.
        self.model.after_loss(&losses)?;
        if self.phases.is_some() {
            self.lap("update", &mut clock);
            self.device.synchronize()?;
            self.lap("update wait", &mut clock);
        }
        Ok(report)
    }

    /// Clipping, AdamW and the momentum update with the accumulated gradients.
    fn apply(&mut self, clock: &mut std::time::Instant) -> anyhow::Result<StepReport> {
        let clip = self.model.config().optim.clip_grad;
        let grads = self.acc.take(self.opt.vars(), clip)?;
        self.lap("norm wait", clock);
        let config = self.model.config();
        let o = &config.optim;
        let grad_norm = grads.norm;
        if !grad_norm.is_finite() {
            bail!(
                "the gradient norm is {grad_norm} at step {}: training stopped; the last checkpoint is intact",
                self.step + 1
            );
        }
        let lr = schedule::learning_rate(
            self.step,
            self.warmup_steps,
            self.total_steps,
            self.peak_lr,
            o.min_lr,
        );
        let base_momentum = match config.method {
            MethodKind::Mimco => config.objective.momentum,
            MethodKind::Mocov3 => config.mocov3.momentum,
            MethodKind::Simmim => 1.0,
        };
        let momentum = schedule::momentum(self.step, self.total_steps, base_momentum);
        self.opt.step(&grads, lr)?;
        self.model.update_momentum(momentum)?;
        self.step += 1;
        let k = self.accumulation as f64;
        let mut sums = std::mem::take(&mut self.sums);
        let loss = sums.remove("").unwrap_or(0.0) / k;
        Ok(StepReport {
            step: self.step,
            loss,
            parts: sums.into_iter().map(|(n, v)| (n, v / k)).collect(),
            lr,
            momentum,
            grad_norm,
        })
    }

    /// Every tensor and the metadata of a checkpoint taken now, with the data at `loader`.
    /// Only valid between optimiser steps.
    pub fn checkpoint(
        &self,
        loader: LoaderState,
    ) -> anyhow::Result<(BTreeMap<String, Tensor>, Meta)> {
        if self.acc.micro_batches() != 0 {
            bail!("a checkpoint can only be taken between optimiser steps");
        }
        let mut tensors = self.model.trainable().tensors();
        let (buffers, counters) = self.model.buffers();
        tensors.extend(buffers);
        let (moments, adam_steps) = self.opt.state();
        debug_assert_eq!(adam_steps, self.step);
        tensors.extend(moments);
        let meta = Meta {
            format: FORMAT,
            step: self.step,
            loader,
            counters,
            config: toml::to_string(self.model.config())?,
            data: None,
        };
        Ok((tensors, meta))
    }

    /// Restores a checkpoint written by this config; returns where the data stood.
    pub fn restore(
        &mut self,
        tensors: &HashMap<String, Tensor>,
        meta: &Meta,
    ) -> anyhow::Result<LoaderState> {
        let saved: Config = toml::from_str(&meta.config).context("the checkpoint's config")?;
        if saved.run_identity() != self.model.config().run_identity() {
            bail!(
                "the checkpoint was written with a different config (only [train] max_steps, checkpoint_every, log_every and the loader's threads and I/O sizes may change): resume with its config, saved as config.toml beside it, or start a new --out"
            );
        }
        self.model
            .trainable()
            .load(tensors, "")
            .context("checkpoint weights")?;
        self.model
            .load_buffers(tensors, &meta.counters)
            .context("checkpoint buffers")?;
        self.opt.load_state(tensors, meta.step)?;
        self.step = meta.step;
        Ok(meta.loader)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One formula for every rank: `(x / 255 - MEAN) / STD` per channel.
    #[test]
    fn normalize_follows_the_definition_for_batches_and_views() {
        let dev = Device::Cpu;
        let bytes: Vec<u8> = (0..2 * 3 * 2 * 2).map(|i| (i * 37 % 256) as u8).collect();
        for shape in [vec![2, 3, 2, 2], vec![1, 2, 3, 2, 2]] {
            let x = Tensor::from_slice(&bytes, shape.as_slice(), &dev).unwrap();
            let got: Vec<f32> = normalize(&x)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            for (i, (g, b)) in got.iter().zip(&bytes).enumerate() {
                let c = (i / 4) % 3;
                let want = (f32::from(*b) / 255.0 - MEAN[c]) / STD[c];
                assert!((g - want).abs() < 1e-5, "{shape:?} {i}: {g} vs {want}");
            }
        }
    }
}

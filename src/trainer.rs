//! One optimiser step at a time: the method's forward, backward, gradient accumulation,
//! clipping, AdamW, the p3 EMA, and the state that checkpoints carry.

use std::collections::{BTreeMap, HashMap};

use anyhow::{Context, bail};
use candle_core::{Device, Tensor};
use pipeline::{Batch, LoaderState};

use crate::checkpoint::{FORMAT, Meta};
use crate::config::Config;
use crate::mimco::MimCo;
use crate::models::Encoder;
use crate::optim::{AdamW, AdamWParams, GradAccumulator};
use crate::queue::KeyQueue;
use crate::schedule;

/// ImageNet's channel mean and standard deviation (the trainer normalises uint8 batches).
pub const MEAN: [f32; 3] = [0.485, 0.456, 0.406];
/// See [`MEAN`].
pub const STD: [f32; 3] = [0.229, 0.224, 0.225];

/// What one optimiser step did (losses are means over its micro-batches).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StepReport {
    /// Steps taken, this one included.
    pub step: u64,
    /// Total loss.
    pub loss: f64,
    /// L_patch, when on.
    pub patch: Option<f64>,
    /// L_image, when on.
    pub image: Option<f64>,
    /// Learning rate used.
    pub lr: f64,
    /// EMA momentum used for p3.
    pub momentum: f64,
    /// Gradient norm before clipping.
    pub grad_norm: f64,
}

/// The model with its optimiser and schedule.
pub struct Trainer {
    /// The method.
    pub model: MimCo,
    opt: AdamW,
    acc: GradAccumulator,
    step: u64,
    accumulation: usize,
    total_steps: u64,
    warmup_steps: u64,
    peak_lr: f64,
    sums: [f64; 3],
    device: Device,
}

impl Trainer {
    /// A fresh run of `total_steps` optimiser steps, each `accumulation` micro-batches,
    /// with `steps_per_epoch` to place the warm-up.
    pub fn new(
        config: &Config,
        teacher: Box<dyn Encoder>,
        total_steps: u64,
        steps_per_epoch: f64,
        accumulation: usize,
        device: &Device,
    ) -> anyhow::Result<Trainer> {
        let model = MimCo::new(config, teacher, device)?;
        let o = &config.optim;
        let params = AdamWParams {
            betas: (o.betas[0], o.betas[1]),
            eps: o.eps,
            weight_decay: o.weight_decay,
        };
        let opt = AdamW::new(model.trainable.vars(), params)?;
        let n = model.trainable.vars().len();
        Ok(Trainer {
            model,
            opt,
            acc: GradAccumulator::new(n),
            step: 0,
            accumulation,
            total_steps,
            warmup_steps: (o.warmup_epochs * steps_per_epoch).round() as u64,
            peak_lr: schedule::scaled_lr(o.base_lr, o.batch_size),
            sums: [0.0; 3],
            device: device.clone(),
        })
    }

    /// Optimiser steps taken.
    pub fn step(&self) -> u64 {
        self.step
    }

    /// Steps the schedule spans.
    pub fn total_steps(&self) -> u64 {
        self.total_steps
    }

    /// The optimiser (for its parameter groups).
    pub fn optimizer(&self) -> &AdamW {
        &self.opt
    }

    /// Feeds one batch from the pipeline; see [`Trainer::micro_batch`].
    pub fn feed(&mut self, batch: &Batch) -> anyhow::Result<Option<StepReport>> {
        let size = batch.size as usize;
        let images = Tensor::from_vec(
            batch.to_f32_normalized(MEAN, STD),
            (batch.len(), 3, size, size),
            &self.device,
        )?;
        let grid = size / self.model.config().student.patch_size;
        self.micro_batch(&images, &batch.token_masks(grid))
    }

    /// Forward and backward of one micro-batch; after `accumulation` of them, one AdamW
    /// step and one EMA update, reported. A loss that is not finite is an error, raised
    /// before anything is updated.
    pub fn micro_batch(
        &mut self,
        images: &Tensor,
        mask: &[u8],
    ) -> anyhow::Result<Option<StepReport>> {
        let losses = self.model.forward(images, mask)?;
        let scalar = |t: &Option<Tensor>| -> anyhow::Result<Option<f64>> {
            Ok(match t {
                Some(t) => Some(t.to_scalar::<f32>()? as f64),
                None => None,
            })
        };
        let loss = losses.total.to_scalar::<f32>()? as f64;
        let (patch, image) = (scalar(&losses.patch)?, scalar(&losses.image)?);
        if !loss.is_finite() {
            bail!(
                "the loss is {loss} (patch {patch:?}, image {image:?}) at step {}: training stopped before applying it; the last checkpoint is intact. Lower optim.base_lr or raise optim.warmup_epochs",
                self.step + 1
            );
        }
        let grads = losses.total.backward()?;
        self.acc.add(self.opt.vars(), &grads)?;
        self.sums[0] += loss;
        self.sums[1] += patch.unwrap_or(0.0);
        self.sums[2] += image.unwrap_or(0.0);
        let report = match self.acc.micro_batches() < self.accumulation {
            true => None,
            false => Some(self.apply(patch.is_some(), image.is_some())?),
        };
        // Enqueue last: the batch's keys are not their own negatives, and a step that
        // failed leaves the queues as they were.
        self.model.enqueue(&losses)?;
        Ok(report)
    }

    /// Clipping, AdamW and the EMA with the accumulated gradients.
    fn apply(&mut self, has_patch: bool, has_image: bool) -> anyhow::Result<StepReport> {
        let o = &self.model.config().optim;
        let (grads, grad_norm) = self.acc.take(self.opt.vars(), o.clip_grad)?;
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
        let momentum = schedule::momentum(
            self.step,
            self.total_steps,
            self.model.config().objective.momentum,
        );
        self.opt.step(&grads, lr)?;
        self.model.update_momentum(momentum)?;
        self.step += 1;
        let k = self.accumulation as f64;
        let [l, p, i] = std::mem::take(&mut self.sums).map(|s| s / k);
        Ok(StepReport {
            step: self.step,
            loss: l,
            patch: has_patch.then_some(p),
            image: has_image.then_some(i),
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
        let m = &self.model;
        let mut tensors = m.trainable.tensors();
        tensors.extend(m.momentum.tensors());
        tensors.insert("queue.patch".into(), m.patch_queue.keys().clone());
        tensors.insert("queue.image".into(), m.image_queue.keys().clone());
        let (moments, adam_steps) = self.opt.state();
        debug_assert_eq!(adam_steps, self.step);
        tensors.extend(moments);
        let meta = Meta {
            format: FORMAT,
            step: self.step,
            loader,
            queue_ptr: [m.patch_queue.ptr(), m.image_queue.ptr()],
            config: toml::to_string(m.config())?,
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
        let m = &mut self.model;
        m.trainable
            .load(tensors, "")
            .context("checkpoint weights")?;
        m.momentum
            .load(tensors, "")
            .context("checkpoint p3 weights")?;
        let queue = |name: &str, ptr| -> anyhow::Result<KeyQueue> {
            let keys = tensors
                .get(name)
                .with_context(|| format!("checkpoint has no {name}"))?;
            Ok(KeyQueue::from_parts(keys.to_device(&self.device)?, ptr)?)
        };
        m.patch_queue = queue("queue.patch", meta.queue_ptr[0])?;
        m.image_queue = queue("queue.image", meta.queue_ptr[1])?;
        self.opt.load_state(tensors, meta.step)?;
        self.step = meta.step;
        Ok(meta.loader)
    }
}

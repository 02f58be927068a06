//! MimCo stage 2 (Zhou et al., "MimCo: Masked Image Modeling Pre-training with
//! Contrastive Teacher", <https://arxiv.org/abs/2203.03186>, Algorithm 1): a student
//! encoder f sees the masked image, the frozen teacher f' the whole one, and two
//! contrastive reconstruction losses tie them at patch level (Eq. 1) and image level (Eq. 3).

use candle_core::{D, Device, Module, Result, Tensor};
use candle_nn::Linear;

use crate::config::{Config, PatchLoss};
use crate::functional::l2_normalize;
use crate::loss::{info_nce, l1_regression};
use crate::models::Encoder;
use crate::models::mlp::{Mlp2, linear};
use crate::models::vit::Vit;
use crate::params::ParamStore;
use crate::queue::KeyQueue;

/// One loss head set: p1 projector, p2 predictor, p3 momentum projector.
pub struct Heads {
    /// p1: projector on student features.
    pub p1: Mlp2,
    /// p2: predictor on p1's output.
    pub p2: Mlp2,
    /// p3: momentum projector, EMA of p1, applied to teacher features.
    pub p3: Mlp2,
}

impl Heads {
    fn new(
        trainable: &ParamStore,
        momentum: &ParamStore,
        name: &str,
        dim: usize,
        hidden: usize,
        out: usize,
        device: &Device,
    ) -> Result<Heads> {
        let vb = trainable.var_builder(device).pp(name);
        let p3 = Mlp2::new(
            momentum.var_builder(device).pp(name).pp("p3"),
            dim,
            hidden,
            out,
        )?;
        Ok(Heads {
            p1: Mlp2::new(vb.pp("p1"), dim, hidden, out)?,
            p2: Mlp2::new(vb.pp("p2"), out, hidden, out)?,
            p3,
        })
    }

    /// `q = p2(p1(z))` and the detached, unit-length `k = p3(z_k)`.
    fn qk(&self, z: &Tensor, zk: &Tensor) -> Result<(Tensor, Tensor)> {
        let q = self.p2.forward(&self.p1.forward(z)?)?;
        let k = l2_normalize(&self.p3.forward(zk)?.detach())?;
        Ok((q, k))
    }
}

/// What one forward pass computed.
pub struct Losses {
    /// `w_p * L_patch + w_I * L_image`.
    pub total: Tensor,
    /// L_patch (Eq. 1, or the l1 ablation), when on.
    pub patch: Option<Tensor>,
    /// L_image (Eq. 3), when on.
    pub image: Option<Tensor>,
    patch_keys: Option<Tensor>,
    image_keys: Option<Tensor>,
}

/// The method: student, frozen teacher, heads and queues.
pub struct MimCo {
    config: Config,
    /// f: the learnable encoder (parameters `student.*`).
    pub student: Box<dyn Encoder>,
    teacher: Box<dyn Encoder>,
    patch: Option<Heads>,
    /// `patch.regressor`: the l1 ablation's linear head (student width -> teacher width).
    regressor: Option<Linear>,
    image: Option<Heads>,
    /// Negatives of Eq. 1: per image, the mean of its teacher patch keys.
    pub patch_queue: KeyQueue,
    /// Negatives of Eq. 3.
    pub image_queue: KeyQueue,
    /// Student, p1, p2 (and the regressor): what the optimiser updates.
    pub trainable: ParamStore,
    /// The p3 heads: moved by EMA only.
    pub momentum: ParamStore,
}

impl MimCo {
    /// Builds the student and heads from `config.train.seed` around a loaded `teacher`;
    /// p3 starts as a copy of p1.
    pub fn new(config: &Config, teacher: Box<dyn Encoder>, device: &Device) -> Result<MimCo> {
        let (o, seed) = (&config.objective, config.train.seed);
        let trainable = ParamStore::new(seed);
        let momentum = ParamStore::new(seed);
        let size = config.data.transform.size as usize;
        let student = Box::new(Vit::new(
            trainable.var_builder(device).pp("student"),
            &config.student,
            size,
            true,
        )?);
        let dim = config.student.dim;
        let heads = |name| {
            Heads::new(
                &trainable, &momentum, name, dim, o.hidden, o.out_dim, device,
            )
        };
        let patch = match o.patch_loss {
            PatchLoss::Contrastive => Some(heads("patch")?),
            _ => None,
        };
        let regressor = match o.patch_loss {
            PatchLoss::L1 => Some(linear(
                trainable.var_builder(device).pp("patch.regressor"),
                dim,
                config.teacher.dim,
            )?),
            _ => None,
        };
        let image = if o.image_loss {
            Some(heads("image")?)
        } else {
            None
        };
        let mimco = MimCo {
            patch_queue: KeyQueue::random(o.queue_len, o.out_dim, seed, "patch", device)?,
            image_queue: KeyQueue::random(o.queue_len, o.out_dim, seed, "image", device)?,
            config: config.clone(),
            student,
            teacher,
            patch,
            regressor,
            image,
            trainable,
            momentum,
        };
        mimco.update_momentum(0.0)?;
        Ok(mimco)
    }

    /// The config the model was built from.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Algorithm 1 for one batch. `images`: `(B, 3, H, W)` normalised; `mask`: one byte per
    /// token, `B x N`, 1 = masked (all zero for the no-masking ablation, where the patch
    /// loss then covers every token).
    pub fn forward(&self, images: &Tensor, mask: &[u8]) -> Result<Losses> {
        let o = &self.config.objective;
        let (b, n) = (images.dim(0)?, mask.len() / images.dim(0)?.max(1));
        let mask_t = Tensor::from_iter(mask.iter().map(|&m| f32::from(m)), images.device())?
            .reshape((b, n))?;
        let z = self.student.forward(images, Some(&mask_t))?.patches;
        let zk = self.teacher.forward(images, None)?.patches.detach();
        // The masked tokens, flattened over the batch (all tokens if nothing is masked).
        let mut picked: Vec<u32> = (0..mask.len() as u32)
            .filter(|&i| mask[i as usize] == 1)
            .collect();
        if picked.is_empty() {
            picked = (0..mask.len() as u32).collect();
        }
        let picked = Tensor::new(picked.as_slice(), images.device())?;
        let take = |t: &Tensor| {
            t.reshape((b * n, t.dim(D::Minus1)?))?
                .index_select(&picked, 0)
        };

        let (mut patch, mut patch_keys) = (None, None);
        if let Some(h) = &self.patch {
            let (q, k) = h.qk(&take(&z)?, &zk)?;
            patch = Some(info_nce(&q, &take(&k)?, self.patch_queue.keys(), o.tau)?);
            patch_keys = Some(l2_normalize(&k.mean(1)?)?);
        } else if let Some(r) = &self.regressor {
            patch = Some(l1_regression(&r.forward(&take(&z)?)?, &take(&zk)?)?);
        }
        let (mut image, mut image_keys) = (None, None);
        if let Some(h) = &self.image {
            let (q, k) = h.qk(&z.mean(1)?, &zk.mean(1)?)?;
            image = Some(info_nce(&q, &k, self.image_queue.keys(), o.tau)?);
            image_keys = Some(k);
        }
        let total = match (&patch, &image) {
            (Some(p), Some(i)) => ((p * o.patch_weight)? + (i * o.image_weight)?)?,
            (Some(p), None) => (p * o.patch_weight)?,
            (None, Some(i)) => (i * o.image_weight)?,
            (None, None) => candle_core::bail!("no loss is on"),
        };
        Ok(Losses {
            total,
            patch,
            image,
            patch_keys,
            image_keys,
        })
    }

    /// Puts the batch's teacher keys into the queues; call after the loss (the current
    /// keys are never their own negatives).
    pub fn enqueue(&mut self, losses: &Losses) -> Result<()> {
        if let Some(k) = &losses.patch_keys {
            self.patch_queue.enqueue(k)?;
        }
        if let Some(k) = &losses.image_keys {
            self.image_queue.enqueue(k)?;
        }
        Ok(())
    }

    /// p3 <- m * p3 + (1 - m) * p1 for both head sets (m = 0 copies p1).
    pub fn update_momentum(&self, m: f64) -> Result<()> {
        let p1: std::collections::BTreeMap<_, _> = self.trainable.vars().into_iter().collect();
        for (name, p3) in self.momentum.vars() {
            let source = name.replacen(".p3.", ".p1.", 1);
            let Some(p1) = p1.get(&source) else {
                candle_core::bail!("momentum parameter {name} has no projector {source}");
            };
            let next = ((p3.as_tensor() * m)? + (p1.as_tensor().detach() * (1.0 - m))?)?;
            p3.set(&next)?;
        }
        Ok(())
    }
}

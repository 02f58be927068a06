//! MimCo stage 2 (Zhou et al., "MimCo: Masked Image Modeling Pre-training with
//! Contrastive Teacher", <https://arxiv.org/abs/2203.03186>, Algorithm 1): a student
//! encoder f sees the masked image, the frozen teacher f' the whole one, and two
//! contrastive reconstruction losses tie them at patch level (Eq. 1) and image level (Eq. 3).

use std::collections::{BTreeMap, HashMap};

use candle_core::{D, DType, Device, Module, Result, Tensor};

use crate::config::{Config, PatchLoss};
use crate::functional::{gather_rows, l2_normalize};
use crate::loss::{info_nce, l1_regression};
use crate::method::{Losses, Method, ema};
use crate::models::Encoder;
use crate::models::mlp::{Dense, Mlp2, linear};
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

    /// `q = p2(p1(z))` and the detached, unit-length `k = p3(z_k)`, computed in
    /// `compute` and returned in f32 for the losses.
    fn qk(&self, z: &Tensor, zk: &Tensor, compute: DType) -> Result<(Tensor, Tensor)> {
        let q = self.p2.forward(&self.p1.forward(&z.to_dtype(compute)?)?)?;
        let k = self.p3.forward(&zk.to_dtype(compute)?)?.detach();
        Ok((
            q.to_dtype(DType::F32)?,
            l2_normalize(&k.to_dtype(DType::F32)?)?,
        ))
    }
}

/// The method: student, frozen teacher, heads and queues.
pub struct MimCo {
    config: Config,
    /// f: the learnable encoder (parameters `student.*`).
    pub student: Box<dyn Encoder>,
    teacher: Box<dyn Encoder>,
    patch: Option<Heads>,
    /// `patch.regressor`: the l1 ablation's linear head (student width -> teacher width).
    regressor: Option<Dense>,
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
    pub fn new(config: &Config, mut teacher: Box<dyn Encoder>, device: &Device) -> Result<MimCo> {
        let (o, seed) = (&config.objective, config.train.seed);
        let trainable = ParamStore::new(seed);
        let momentum = ParamStore::new(seed);
        let size = config.data.transform.size as usize;
        let mut student = Box::new(Vit::new(
            trainable.var_builder(device).pp("student"),
            &config.student,
            size,
            true,
        )?);
        let compute = config.train.precision.compute_dtype();
        student.set_compute(compute);
        teacher.freeze_in(compute)?;
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
                config.teacher.as_ref().map_or(dim, |t| t.dim),
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

    /// Algorithm 1 for one batch. `images`: `(B, 3, H, W)` normalised; `mask`: one byte per
    /// token, `B x N`, 1 = masked (all zero for the no-masking ablation, where the patch
    /// loss then covers every token).
    pub fn forward(&self, images: &Tensor, mask: &[u8]) -> Result<Losses> {
        let o = &self.config.objective;
        let compute = self.config.train.precision.compute_dtype();
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
        let take = |t: &Tensor| gather_rows(&t.reshape((b * n, t.dim(D::Minus1)?))?, &picked);

        let (mut parts, mut keys) = (Vec::new(), Vec::new());
        let mut total: Option<Tensor> = None;
        let mut add = |name, loss: Tensor, weight: f64| -> Result<()> {
            let weighted = (&loss * weight)?;
            total = Some(match total.take() {
                Some(t) => (t + weighted)?,
                None => weighted,
            });
            parts.push((name, loss));
            Ok(())
        };
        if let Some(h) = &self.patch {
            let (q, k) = h.qk(&take(&z)?, &zk, compute)?;
            add(
                "patch",
                info_nce(&q, &take(&k)?, self.patch_queue.keys(), o.tau, compute)?,
                o.patch_weight,
            )?;
            keys.push(("patch", l2_normalize(&k.mean(1)?)?));
        } else if let Some(r) = &self.regressor {
            add(
                "patch",
                l1_regression(&r.forward(&take(&z)?)?, &take(&zk)?)?,
                o.patch_weight,
            )?;
        }
        if let Some(h) = &self.image {
            let (q, k) = h.qk(&z.mean(1)?, &zk.mean(1)?, compute)?;
            add(
                "image",
                info_nce(&q, &k, self.image_queue.keys(), o.tau, compute)?,
                o.image_weight,
            )?;
            keys.push(("image", k));
        }
        let Some(total) = total else {
            candle_core::bail!("no loss is on");
        };
        Ok(Losses { total, parts, keys })
    }
}

impl Method for MimCo {
    fn config(&self) -> &Config {
        &self.config
    }

    fn losses(&self, views: &[Tensor], mask: &[u8]) -> Result<Losses> {
        self.forward(&views[0], mask)
    }

    /// Puts the batch's teacher keys into the queues, after the loss (the current keys are
    /// never their own negatives).
    fn after_loss(&mut self, losses: &Losses) -> Result<()> {
        for (name, k) in &losses.keys {
            match *name {
                "patch" => self.patch_queue.enqueue(k)?,
                _ => self.image_queue.enqueue(k)?,
            }
        }
        Ok(())
    }

    /// p3 <- m * p3 + (1 - m) * p1 for both head sets (m = 0 copies p1).
    fn update_momentum(&self, m: f64) -> Result<()> {
        ema(&self.momentum, &self.trainable, m, |name| {
            name.replacen(".p3.", ".p1.", 1)
        })
    }

    fn encoder(&self) -> &dyn Encoder {
        self.student.as_ref()
    }

    fn trainable(&self) -> &ParamStore {
        &self.trainable
    }

    fn buffers(&self) -> (BTreeMap<String, Tensor>, BTreeMap<String, usize>) {
        let mut tensors = self.momentum.tensors();
        tensors.insert("queue.patch".into(), self.patch_queue.keys().clone());
        tensors.insert("queue.image".into(), self.image_queue.keys().clone());
        let counters = BTreeMap::from([
            ("queue.patch".to_string(), self.patch_queue.ptr()),
            ("queue.image".to_string(), self.image_queue.ptr()),
        ]);
        (tensors, counters)
    }

    fn load_buffers(
        &mut self,
        tensors: &HashMap<String, Tensor>,
        counters: &BTreeMap<String, usize>,
    ) -> Result<()> {
        self.momentum.load(tensors, "")?;
        for (name, queue) in [
            ("queue.patch", &mut self.patch_queue),
            ("queue.image", &mut self.image_queue),
        ] {
            let (Some(keys), Some(&ptr)) = (tensors.get(name), counters.get(name)) else {
                candle_core::bail!("the checkpoint has no {name}");
            };
            *queue = KeyQueue::from_parts(keys.to_device(queue.keys().device())?, ptr)?;
        }
        Ok(())
    }
}

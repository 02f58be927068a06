//! MoCo v3 for ViT (Chen, Xie and He, "An Empirical Study of Training Self-Supervised
//! Vision Transformers", <https://arxiv.org/abs/2104.02057>): stage 1, which trains the
//! contrastive teacher MimCo learns from. Two views, a base encoder with projector and
//! predictor, a momentum encoder with projector, symmetric InfoNCE over the batch.

use std::collections::{BTreeMap, HashMap};

use candle_core::{Device, Module, Result, Tensor};

use crate::config::Config;
use crate::loss::moco_v3;
use crate::method::{Losses, Method, ema};
use crate::models::Encoder;
use crate::models::mlp::MocoMlp;
use crate::models::vit::Vit;
use crate::params::ParamStore;

/// An encoder with its projection head: the CLS token after the final norm, projected.
struct Branch {
    encoder: Vit,
    head: MocoMlp,
}

impl Branch {
    fn new(store: &ParamStore, prefix: &str, config: &Config, device: &Device) -> Result<Branch> {
        let vb = store.var_builder(device).pp(prefix);
        let m = &config.mocov3;
        let size = config.data.transform.size as usize;
        let mut encoder = Vit::new(vb.clone(), &config.student, size, false)?;
        encoder.set_compute(config.train.precision.compute_dtype());
        let head = MocoMlp::new(vb.pp("head"), 3, config.student.dim, m.mlp_dim, m.dim, true)?;
        Ok(Branch { encoder, head })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let features = self.encoder.forward(x, None)?;
        let Some(cls) = features.cls else {
            candle_core::bail!("MoCo v3 needs an encoder with a CLS token");
        };
        self.head.forward(&cls)
    }
}

/// The method: `base_encoder` (+ `head`) and `predictor` are trained; `momentum_encoder`
/// (+ `head`) follows the base by EMA.
pub struct MocoV3 {
    config: Config,
    base: Branch,
    predictor: MocoMlp,
    momentum: Branch,
    /// `base_encoder.*` and `predictor.*`.
    pub trainable: ParamStore,
    /// `momentum_encoder.*`.
    pub momentum_store: ParamStore,
}

impl MocoV3 {
    /// Builds both branches from `config.train.seed`; the momentum branch starts as a copy.
    pub fn new(config: &Config, device: &Device) -> Result<MocoV3> {
        let seed = config.train.seed;
        let (trainable, momentum_store) = (ParamStore::new(seed), ParamStore::new(seed));
        let m = &config.mocov3;
        let base = Branch::new(&trainable, "base_encoder", config, device)?;
        let vb = trainable.var_builder(device).pp("predictor");
        let predictor = MocoMlp::new(vb, 2, m.dim, m.mlp_dim, m.dim, false)?;
        let momentum = Branch::new(&momentum_store, "momentum_encoder", config, device)?;
        let moco = MocoV3 {
            config: config.clone(),
            base,
            predictor,
            momentum,
            trainable,
            momentum_store,
        };
        moco.update_momentum(0.0)?;
        Ok(moco)
    }
}

impl Method for MocoV3 {
    fn config(&self) -> &Config {
        &self.config
    }

    /// `loss = ctr(q1, k2) + ctr(q2, k1)` with `q = predictor(base(x))`, `k = momentum(x)`.
    fn losses(&self, views: &[Tensor], _mask: &[u8]) -> Result<Losses> {
        let [x1, x2] = views else {
            candle_core::bail!("MoCo v3 needs two views per sample, got {}", views.len());
        };
        let tau = self.config.mocov3.tau;
        let q1 = self.predictor.forward(&self.base.forward(x1)?)?;
        let q2 = self.predictor.forward(&self.base.forward(x2)?)?;
        let k1 = self.momentum.forward(x1)?.detach();
        let k2 = self.momentum.forward(x2)?.detach();
        let total = (moco_v3(&q1, &k2, tau)? + moco_v3(&q2, &k1, tau)?)?;
        Ok(Losses {
            parts: vec![("contrastive", total.clone())],
            total,
            keys: Vec::new(),
        })
    }

    /// momentum <- m * momentum + (1 - m) * base, encoder and projector.
    fn update_momentum(&self, m: f64) -> Result<()> {
        ema(&self.momentum_store, &self.trainable, m, |name| {
            name.replacen("momentum_encoder.", "base_encoder.", 1)
        })
    }

    fn encoder(&self) -> &dyn Encoder {
        &self.base.encoder
    }

    fn trainable(&self) -> &ParamStore {
        &self.trainable
    }

    /// The random patch projection stays fixed (MoCo v3, section 4.2) when configured.
    fn frozen(&self, name: &str) -> bool {
        self.config.mocov3.freeze_patch_embed && name.starts_with("base_encoder.patch_embed.")
    }

    fn buffers(&self) -> (BTreeMap<String, Tensor>, BTreeMap<String, usize>) {
        (self.momentum_store.tensors(), BTreeMap::new())
    }

    fn load_buffers(
        &mut self,
        tensors: &HashMap<String, Tensor>,
        _: &BTreeMap<String, usize>,
    ) -> Result<()> {
        self.momentum_store.load(tensors, "")
    }
}

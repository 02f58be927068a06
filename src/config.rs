//! The training config: TOML sections `[student]`, `[teacher]`, `[objective]`, `[optim]`,
//! `[train]` and the pipeline's `[data]`, each field documented where it is declared.
//! `configs/` holds the reference runs.

use serde::{Deserialize, Serialize};

use pipeline::config::TransformSet;

use crate::models::vit::VitConfig;

/// The pre-training objective.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MethodKind {
    /// MimCo stage 2: masked student against a frozen contrastive teacher.
    Mimco,
    /// MoCo v3 (stage 1): trains a contrastive teacher from two views.
    Mocov3,
    /// SimMIM: masked pixel regression, the paper's main MIM baseline.
    Simmim,
}

impl MethodKind {
    /// Name prefix, in checkpoints, of the encoder the method pre-trains: what `mimco
    /// export` and evaluation read.
    pub fn encoder_prefix(self) -> &'static str {
        match self {
            MethodKind::Mimco | MethodKind::Simmim => "student.",
            MethodKind::Mocov3 => "base_encoder.",
        }
    }
}

/// How the patch-level loss is computed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PatchLoss {
    /// InfoNCE against the patch key queue (Eq. 1).
    Contrastive,
    /// l1 regression of the teacher's patch features (MaskFeat; Table 7's ablation).
    L1,
    /// No patch loss (Table 8's ablation).
    None,
}

/// `[objective]`: the losses and their heads.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ObjectiveConfig {
    /// `"contrastive"`, `"l1"` or `"none"`. By default, "contrastive".
    pub patch_loss: PatchLoss,
    /// Whether the image-level loss (Eq. 3) is on. By default, true.
    pub image_loss: bool,
    /// Weight of the patch loss. By default, 1.0.
    pub patch_weight: f64,
    /// Weight of the image loss. By default, 1.0.
    pub image_weight: f64,
    /// InfoNCE temperature tau. By default, 0.2.
    pub tau: f64,
    /// Keys in each queue (K). By default, 4096.
    pub queue_len: usize,
    /// Hidden width of p1, p2, p3. By default, 4096.
    pub hidden: usize,
    /// Output width C of p1, p2, p3. By default, 256.
    pub out_dim: usize,
    /// Base momentum of the EMA that moves p3 towards p1, raised to 1 by a cosine
    /// schedule. By default, 0.99.
    pub momentum: f64,
}

impl Default for ObjectiveConfig {
    fn default() -> Self {
        ObjectiveConfig {
            patch_loss: PatchLoss::Contrastive,
            image_loss: true,
            patch_weight: 1.0,
            image_weight: 1.0,
            tau: 0.2,
            queue_len: 4096,
            hidden: 4096,
            out_dim: 256,
            momentum: 0.99,
        }
    }
}

/// `[mocov3]`: MoCo v3's heads and loss (Chen et al. 2021), used when `method = "mocov3"`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Mocov3Config {
    /// Output width of the projector and predictor. By default, 256.
    pub dim: usize,
    /// Hidden width of the projector (3 layers) and predictor (2 layers). By default, 4096.
    pub mlp_dim: usize,
    /// Temperature. By default, 0.2.
    pub tau: f64,
    /// Base momentum of the momentum encoder, raised to 1 by a cosine. By default, 0.99.
    pub momentum: f64,
    /// Keep the random patch projection fixed (MoCo v3's stability trick). By default, true.
    pub freeze_patch_embed: bool,
}

impl Default for Mocov3Config {
    fn default() -> Self {
        Mocov3Config {
            dim: 256,
            mlp_dim: 4096,
            tau: 0.2,
            momentum: 0.99,
            freeze_patch_embed: true,
        }
    }
}

/// `[optim]`: AdamW and its schedule.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OptimConfig {
    /// Global batch per optimiser step, across ranks; reached by gradient accumulation
    /// when `data.batch_size` x ranks is smaller. By default, 2048.
    pub batch_size: usize,
    /// Base rate; the peak is `base_lr * batch_size / lr_batch`. By default, 1e-3.
    pub base_lr: f64,
    /// The batch at which `base_lr` applies unscaled (MimCo: 512, MoCo v3: 256). By
    /// default, 512.
    pub lr_batch: usize,
    /// Final rate of the cosine. By default, 0.
    pub min_lr: f64,
    /// Decoupled weight decay (none on biases, norms, positions, CLS and mask tokens).
    /// By default, 0.05.
    pub weight_decay: f64,
    /// AdamW betas. By default, [0.9, 0.999].
    pub betas: [f64; 2],
    /// AdamW epsilon. By default, 1e-8.
    pub eps: f64,
    /// Epochs of linear warm-up. By default, 10.
    pub warmup_epochs: f64,
    /// Training epochs. By default, 100.
    pub epochs: u64,
    /// Global gradient-norm clip; 0 turns it off. By default, 5.0.
    pub clip_grad: f64,
}

impl Default for OptimConfig {
    fn default() -> Self {
        OptimConfig {
            batch_size: 2048,
            base_lr: 1e-3,
            lr_batch: 512,
            min_lr: 0.0,
            weight_decay: 0.05,
            betas: [0.9, 0.999],
            eps: 1e-8,
            warmup_epochs: 10.0,
            epochs: 100,
            clip_grad: 5.0,
        }
    }
}

/// `[train]`: the run around the optimisation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// Seed of the initial weights and queues (the data's seed is `data.seed`). By default, 0.
    pub seed: u64,
    /// Optimiser steps between checkpoints; 0 writes one only at the end and on Ctrl-C.
    /// By default, 1000.
    pub checkpoint_every: u64,
    /// Optimiser steps between metrics lines. By default, 10.
    pub log_every: u64,
    /// Stop after this many optimiser steps (0: run the schedule to its end). The
    /// schedule still spans all epochs. By default, 0.
    pub max_steps: u64,
    /// Optimiser steps between k-NN checks of the encoder on `--knn-train`/`--knn-val`
    /// (0: none). By default, 0.
    pub knn_every: u64,
    /// Samples of each split the k-NN check uses. By default, 1000.
    pub knn_samples: usize,
    /// `"f32"`, `"tf32"` (f32 with TensorFloat-32 matmuls, CUDA) or `"bf16"` (mixed
    /// precision: bf16 matmuls and attention with f32 accumulation, the InfoNCE logits'
    /// product included (f32 logits); f32 weights, optimiser state, residual stream, norms'
    /// statistics and losses). By default, "f32".
    pub precision: Precision,
}

/// Arithmetic of the encoders and heads (`[train] precision`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// f32 throughout.
    #[default]
    F32,
    /// f32 tensors, TensorFloat-32 matmuls on CUDA (as `torch.backends.cuda.matmul.allow_tf32`).
    Tf32,
    /// bf16 matmuls and attention, f32 elsewhere (as `torch.autocast(dtype=torch.bfloat16)`).
    Bf16,
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Precision::F32 => "f32",
            Precision::Tf32 => "tf32",
            Precision::Bf16 => "bf16",
        })
    }
}

impl Precision {
    /// The dtype matmuls run in.
    pub fn compute_dtype(self) -> candle_core::DType {
        match self {
            Precision::F32 | Precision::Tf32 => candle_core::DType::F32,
            Precision::Bf16 => candle_core::DType::BF16,
        }
    }

    /// Sets Candle's process-wide TF32 switch for this precision.
    pub fn apply_to_matmuls(self) {
        candle_core::cuda::set_gemm_reduced_precision_f32(self == Precision::Tf32);
    }
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            seed: 0,
            checkpoint_every: 1000,
            log_every: 10,
            max_steps: 0,
            knn_every: 0,
            knn_samples: 1000,
            precision: Precision::F32,
        }
    }
}

/// A whole training config file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `"mimco"`, `"mocov3"` or `"simmim"`. By default, "mimco".
    #[serde(default = "default_method")]
    pub method: MethodKind,
    /// The encoder this run trains (MimCo's student f).
    pub student: VitConfig,
    /// MimCo's frozen contrastive teacher f' (same token grid and width as the student);
    /// required for `method = "mimco"` only.
    #[serde(default)]
    pub teacher: Option<VitConfig>,
    /// MimCo's losses and heads.
    #[serde(default)]
    pub objective: ObjectiveConfig,
    /// MoCo v3's heads and loss.
    #[serde(default)]
    pub mocov3: Mocov3Config,
    /// Optimiser and schedule.
    #[serde(default)]
    pub optim: OptimConfig,
    /// Checkpoints, logging, seeds.
    #[serde(default)]
    pub train: TrainConfig,
    /// The loader (`pipeline::LoaderConfig`): per-rank micro-batch, crops, masks.
    #[serde(default)]
    pub data: pipeline::LoaderConfig,
}

fn default_method() -> MethodKind {
    MethodKind::Mimco
}

impl Config {
    /// Parses and checks a config; errors name the field and what to do.
    pub fn from_toml(text: &str) -> anyhow::Result<Config> {
        let config: Config = toml::from_str(text)?;
        config.check()?;
        Ok(config)
    }

    /// Checks that the sections agree with each other.
    pub fn check(&self) -> anyhow::Result<()> {
        use anyhow::bail;
        let size = self.data.transform.size as usize;
        self.data.check()?;
        self.student
            .check(size)
            .map_err(|e| anyhow::anyhow!("[student] {e}"))?;
        let t = &self.data.transform;
        let set = t.set;
        let masks = set == TransformSet::Stage2 && t.masking;
        if masks && !(t.mask_unit as usize).is_multiple_of(self.student.patch_size) {
            bail!(
                "data.transform.mask_unit {} must be a multiple of [student] patch_size {}",
                t.mask_unit,
                self.student.patch_size
            );
        }
        match self.method {
            MethodKind::Mimco => self.check_mimco()?,
            MethodKind::Mocov3 => {
                if set != TransformSet::Mocov3 {
                    bail!(
                        "method = \"mocov3\" needs two views: set data.transform.set = \"mocov3\""
                    );
                }
                let m = &self.mocov3;
                if m.tau.is_nan() || m.tau <= 0.0 || m.dim == 0 || m.mlp_dim == 0 {
                    bail!("[mocov3] tau, dim and mlp_dim must be positive");
                }
                if !(0.0..=1.0).contains(&m.momentum) {
                    bail!("[mocov3] momentum must be within [0, 1]");
                }
            }
            MethodKind::Simmim => {
                if !masks {
                    bail!(
                        "method = \"simmim\" reconstructs masked patches: set data.transform.set = \"stage2\" with masking = true"
                    );
                }
            }
        }
        let p = &self.optim;
        if p.epochs == 0
            || p.batch_size == 0
            || p.lr_batch == 0
            || p.base_lr.is_nan()
            || p.base_lr <= 0.0
        {
            bail!("[optim] epochs, batch_size, lr_batch and base_lr must be positive");
        }
        Ok(())
    }

    /// `[teacher]`, which MimCo needs.
    pub fn teacher(&self) -> anyhow::Result<&VitConfig> {
        self.teacher.as_ref().ok_or_else(|| {
            anyhow::anyhow!(
                "method = \"mimco\" needs a [teacher] section: the shape of the teacher checkpoint"
            )
        })
    }

    fn check_mimco(&self) -> anyhow::Result<()> {
        use anyhow::bail;
        let size = self.data.transform.size as usize;
        let teacher = self.teacher()?;
        teacher
            .check(size)
            .map_err(|e| anyhow::anyhow!("[teacher] {e}"))?;
        if self.data.transform.set != TransformSet::Stage2 {
            bail!(
                "method = \"mimco\" uses the stage-2 augmentation: set data.transform.set = \"stage2\""
            );
        }
        if size / self.student.patch_size != size / teacher.patch_size {
            bail!("[student] and [teacher] must have the same token grid (patch_size)");
        }
        let p3_reads_teacher =
            self.objective.patch_loss == PatchLoss::Contrastive || self.objective.image_loss;
        if p3_reads_teacher && self.student.dim != teacher.dim {
            bail!(
                "[student] dim {} and [teacher] dim {} differ: p3 (the EMA of p1) reads the teacher's features, so they must match",
                self.student.dim,
                teacher.dim
            );
        }
        let o = &self.objective;
        if o.patch_loss == PatchLoss::None && !o.image_loss {
            bail!("[objective] turns both losses off: set patch_loss or image_loss");
        }
        if o.tau.is_nan() || o.tau <= 0.0 || o.queue_len == 0 || o.hidden == 0 || o.out_dim == 0 {
            bail!("[objective] tau, queue_len, hidden and out_dim must be positive");
        }
        if !(0.0..=1.0).contains(&o.momentum) {
            bail!("[objective] momentum must be within [0, 1]");
        }
        Ok(())
    }

    /// The config with the fields a resumed run may change set to their defaults: how
    /// long to run, how often to log, check and checkpoint, and the loader's threads and
    /// I/O sizes (none of them changes a batch or a step).
    pub fn run_identity(&self) -> Config {
        let (train, data) = (TrainConfig::default(), pipeline::LoaderConfig::default());
        let mut c = self.clone();
        c.train.max_steps = train.max_steps;
        c.train.checkpoint_every = train.checkpoint_every;
        c.train.log_every = train.log_every;
        c.train.knn_every = train.knn_every;
        c.train.knn_samples = train.knn_samples;
        c.data.workers = data.workers;
        c.data.readers = data.readers;
        c.data.chunk_bytes = data.chunk_bytes;
        c.data.prefetch_batches = data.prefetch_batches;
        c.data.io_retry_seconds = data.io_retry_seconds;
        c.data.cache_dir = data.cache_dir;
        c
    }

    /// Micro-batches per optimiser step for `world` ranks: `optim.batch_size` divided by
    /// `data.batch_size * world`, which must divide it.
    pub fn accumulation(&self, world: usize) -> anyhow::Result<usize> {
        let per_pass = self.data.batch_size * world;
        if !self.optim.batch_size.is_multiple_of(per_pass) {
            anyhow::bail!(
                "optim.batch_size {} is not a multiple of data.batch_size {} x {} ranks: change one of them",
                self.optim.batch_size,
                self.data.batch_size,
                world
            );
        }
        Ok(self.optim.batch_size / per_pass)
    }
}

//! mimco: MimCo pre-training of vision transformers (Zhou et al., "MimCo: Masked Image
//! Modeling Pre-training with Contrastive Teacher", ACM MM 2022,
//! <https://arxiv.org/abs/2203.03186>), on Candle.
//!
//! The training data flow, one optimiser step:
//! 1. `pipeline::Loader` streams uint8 batches with crops, flips and SimMIM masks.
//! 2. [`trainer::Trainer::feed`] normalises them and expands the mask to the token grid.
//! 3. [`mimco::MimCo::forward`]: the frozen teacher f' encodes the whole image, the
//!    student f the masked one ([`models::vit::Vit`]); the patch loss (Eq. 1) compares the
//!    masked tokens, the image loss (Eq. 3) the pooled features, each by InfoNCE against
//!    its key queue ([`loss`], [`queue`]).
//! 4. Gradients are accumulated over micro-batches, clipped, and applied by
//!    [`optim::AdamW`] with the rate of [`schedule::learning_rate`]; p3 follows p1 by EMA.
//! 5. [`train::run`] logs, checkpoints ([`checkpoint`]) and resumes.
//!
//! The same loop trains the other objectives behind [`method::Method`]: MoCo v3
//! ([`mocov3`], stage 1: the teacher, from the pipeline's two-view batches) and SimMIM
//! ([`simmim`], the MIM baseline). [`eval`] measures an encoder by k-NN and a linear probe
//! on frozen features; [`export`] writes it with timm's names.
//!
//! Differentiable LayerNorm and softmax live in [`functional`]: Candle's fused ones have no
//! backward. See `configs/` for the reference runs and `mimco --help` for the CLI.

#![deny(missing_docs)]

pub mod backward;
pub mod bench;
pub mod checkpoint;
pub mod config;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod device;
pub mod eval;
pub mod export;
pub mod functional;
pub mod loss;
pub mod method;
pub mod metrics;
pub mod mimco;
pub mod mocov3;
pub mod models;
pub mod optim;
pub mod params;
pub mod queue;
pub mod schedule;
pub mod simmim;
pub mod teacher;
pub mod train;
pub mod trainer;

pub use config::Config;

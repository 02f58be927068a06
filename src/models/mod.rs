//! Encoders and heads. An encoder maps normalised images (and, for the student, a token
//! mask) to patch tokens; the method and its losses only see the [`Encoder`] trait, so a
//! Swin encoder can be added beside the ViT without touching them.

pub mod blocks;
pub mod mlp;
pub mod vit;

use candle_core::{DType, Device, Result, Tensor};

/// What an encoder returns: all patch tokens after the final norm, and the CLS token
/// where the architecture has one.
#[derive(Debug)]
pub struct Features {
    /// `(B, N, D)` patch tokens in row-major grid order.
    pub patches: Tensor,
    /// `(B, D)` CLS token (ViT), or `None`.
    pub cls: Option<Tensor>,
}

/// A vision backbone as the method uses it.
pub trait Encoder: std::fmt::Debug + Send {
    /// Width of the output tokens.
    fn dim(&self) -> usize;
    /// Side of the output token grid for a square input of `image_size` pixels.
    fn grid(&self, image_size: usize) -> usize;
    /// Runs the matmuls and attention in `dtype` (bf16 for mixed precision); parameters,
    /// the residual stream and the output stay f32. F32 by default.
    fn set_compute(&mut self, dtype: DType);
    /// For an encoder that is never trained (the frozen teacher): runs in `dtype` as
    /// [`Encoder::set_compute`] does, and keeps its matmul weights in `dtype`, cast once
    /// here rather than in every forward. Norms, biases and tokens stay f32.
    fn freeze_in(&mut self, dtype: DType) -> Result<()>;
    /// The device its parameters live on (inputs must be there too).
    fn device(&self) -> &Device;
    /// `images`: `(B, 3, H, W)` normalised f32. `mask`: `(B, N)` with 1 where a patch is
    /// masked (its embedding replaced by the mask token), or `None`.
    fn forward(&self, images: &Tensor, mask: Option<&Tensor>) -> Result<Features>;
}

//! Per-sample augmentation, each transform in its own file: a `sample()` that draws the
//! parameters from the sample's own RNG, kept apart from applying them.
//!
//! Stage 2 of MimCo uses [`Stage2`]: RandomResizedCrop, horizontal flip and a SimMIM mask,
//! drawn in that order. A stronger set (two views, colour jitter, greyscale, blur,
//! solarize: MoCo v3's teacher augmentation) is another implementation of [`Augment`].

pub mod crop;
pub mod flip;
pub mod mask;

pub use crop::{CropParams, RandomResizedCrop};
pub use flip::RandomHorizontalFlip;
pub use mask::{MaskGenerator, MaskParams};

/// Everything drawn for one view of one sample.
#[derive(Clone, Debug, PartialEq)]
pub struct ViewParams {
    /// The crop, in source pixels.
    pub crop: CropParams,
    /// Whether to mirror the output.
    pub flip: bool,
    /// The mask, if the set masks.
    pub mask: Option<MaskParams>,
}

/// An augmentation set: how many views it makes of a sample, and their parameters.
pub trait Augment: Send + Sync {
    /// Views per sample (1 for MimCo stage 2, 2 for a contrastive teacher).
    fn views(&self) -> usize;
    /// Output side of the square views, in pixels.
    fn size(&self) -> u32;
    /// Draws the parameters of view `view` of a `width` x `height` source image. The
    /// draws happen in a fixed order (crop, flip, mask), so a seed fixes them all.
    fn sample(&self, view: usize, dims: (u32, u32), rng: &mut dyn rand::RngCore) -> ViewParams;
}

/// MimCo stage 2: one view, RandomResizedCrop + flip + SimMIM mask.
#[derive(Clone, Debug)]
pub struct Stage2 {
    /// The crop.
    pub crop: RandomResizedCrop,
    /// The flip.
    pub flip: RandomHorizontalFlip,
    /// The mask generator, or `None` for no masking (the paper's distillation ablation).
    pub mask: Option<MaskGenerator>,
}

impl Augment for Stage2 {
    fn views(&self) -> usize {
        1
    }

    fn size(&self) -> u32 {
        self.crop.size
    }

    fn sample(
        &self,
        _view: usize,
        dims: (u32, u32),
        mut rng: &mut dyn rand::RngCore,
    ) -> ViewParams {
        let crop = self.crop.sample(dims, &mut rng);
        let flip = self.flip.sample(&mut rng);
        let mask = self.mask.map(|m| m.sample(&mut rng));
        ViewParams { crop, flip, mask }
    }
}

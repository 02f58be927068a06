//! Per-sample augmentation, each transform in its own file: a `sample()` that draws the
//! parameters from the sample's own RNG, kept apart from applying them.
//!
//! Three sets implement [`Augment`]: [`Stage2`] (MimCo stage 2 and SimMIM:
//! RandomResizedCrop, horizontal flip and a SimMIM mask), [`TwoViews`] (MoCo v3's teacher
//! training: two differently augmented views with colour jitter, greyscale, blur and
//! solarize) and [`CenterCrop`] (evaluation: one deterministic view).

pub mod color;
pub mod crop;
pub mod flip;
pub mod mask;

pub use color::{ColorJitter, JitterParams, PixelParams};
pub use crop::{CropParams, RandomResizedCrop};
pub use flip::RandomHorizontalFlip;
pub use mask::{MaskGenerator, MaskParams};

use rand::Rng;

/// Everything drawn for one view of one sample.
#[derive(Clone, Debug, PartialEq)]
pub struct ViewParams {
    /// The crop, in source pixels.
    pub crop: CropParams,
    /// Whether to mirror the output.
    pub flip: bool,
    /// The mask, if the set masks.
    pub mask: Option<MaskParams>,
    /// Colour and filter transforms, applied after the crop.
    pub pixels: PixelParams,
}

/// An augmentation set: how many views it makes of a sample, and their parameters.
pub trait Augment: Send + Sync {
    /// Views per sample (1 for MimCo stage 2, 2 for a contrastive teacher).
    fn views(&self) -> usize;
    /// Output side of the square views, in pixels.
    fn size(&self) -> u32;
    /// Side of the mask-unit grid, 0 when the set does not mask.
    fn mask_grid(&self) -> usize {
        0
    }
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

    fn mask_grid(&self) -> usize {
        self.mask.map_or(0, |m| m.grid())
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
        ViewParams {
            crop,
            flip,
            mask,
            pixels: PixelParams::default(),
        }
    }
}

/// MoCo v3's pair of views (`augmentation1`, `augmentation2` in its `main_moco.py`): each
/// a RandomResizedCrop, colour jitter, greyscale, Gaussian blur, solarize and flip, with
/// blur and solarize probabilities that differ between the views.
#[derive(Clone, Debug)]
pub struct TwoViews {
    /// The crop (MoCo v3: scale 0.08-1).
    pub crop: RandomResizedCrop,
    /// The colour jitter.
    pub jitter: ColorJitter,
    /// Probability of greyscale. MoCo v3: 0.2.
    pub grayscale: f64,
    /// Probability of blur for view 0 and view 1. MoCo v3: 1.0, 0.1.
    pub blur: [f64; 2],
    /// Range of the blur's sigma, in output pixels. MoCo v3: 0.1-2.0 (at 224 px).
    pub blur_sigma: (f64, f64),
    /// Probability of solarize for view 0 and view 1. MoCo v3: 0.0, 0.2.
    pub solarize: [f64; 2],
    /// The flip.
    pub flip: RandomHorizontalFlip,
}

impl Augment for TwoViews {
    fn views(&self) -> usize {
        2
    }

    fn size(&self) -> u32 {
        self.crop.size
    }

    fn sample(&self, view: usize, dims: (u32, u32), mut rng: &mut dyn rand::RngCore) -> ViewParams {
        let v = view.min(1);
        let crop = self.crop.sample(dims, &mut rng);
        let jitter = self.jitter.sample(&mut rng);
        let grayscale = rng.random::<f64>() < self.grayscale;
        let blur = rng.random::<f64>() < self.blur[v];
        let sigma =
            self.blur_sigma.0 + (self.blur_sigma.1 - self.blur_sigma.0) * rng.random::<f64>();
        let solarize = rng.random::<f64>() < self.solarize[v];
        let flip = self.flip.sample(&mut rng);
        ViewParams {
            crop,
            flip,
            mask: None,
            pixels: PixelParams {
                jitter,
                grayscale,
                blur_sigma: blur.then_some(sigma as f32),
                solarize,
            },
        }
    }
}

/// Evaluation's single deterministic view: the centre square of `fraction` of the shorter
/// side, resized to `size` (torchvision's `Resize(size / fraction)` + `CenterCrop(size)`,
/// resampled once instead of twice).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CenterCrop {
    /// Output side in pixels.
    pub size: u32,
    /// Share of the shorter side kept (224/256 = 0.875 for ImageNet).
    pub fraction: f64,
}

impl Augment for CenterCrop {
    fn views(&self) -> usize {
        1
    }

    fn size(&self) -> u32 {
        self.size
    }

    fn sample(
        &self,
        _view: usize,
        (width, height): (u32, u32),
        _rng: &mut dyn rand::RngCore,
    ) -> ViewParams {
        let side = ((f64::from(width.min(height)) * self.fraction).round() as u32)
            .clamp(1, width.min(height));
        // torchvision: int(round((h - side) / 2.0)).
        let offset = |full: u32| (f64::from(full - side) / 2.0).round_ties_even() as u32;
        ViewParams {
            crop: CropParams {
                top: offset(height),
                left: offset(width),
                height: side,
                width: side,
            },
            flip: false,
            mask: None,
            pixels: PixelParams::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn two_views() -> TwoViews {
        TwoViews {
            crop: RandomResizedCrop {
                size: 32,
                scale: (0.08, 1.0),
                ratio: (0.75, 4.0 / 3.0),
            },
            jitter: ColorJitter {
                p: 0.8,
                brightness: 0.4,
                contrast: 0.4,
                saturation: 0.2,
                hue: 0.1,
            },
            grayscale: 0.2,
            blur: [1.0, 0.1],
            blur_sigma: (0.1, 2.0),
            solarize: [0.0, 0.2],
            flip: RandomHorizontalFlip { p: 0.5 },
        }
    }

    #[test]
    fn two_views_follow_the_per_view_probabilities_and_the_seed() {
        let set = two_views();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let (mut blur, mut sol) = ([0; 2], [0; 2]);
        for _ in 0..1000 {
            for v in 0..2 {
                let p = set.sample(v, (100, 80), &mut rng);
                blur[v] += usize::from(p.pixels.blur_sigma.is_some());
                sol[v] += usize::from(p.pixels.solarize);
                if let Some(s) = p.pixels.blur_sigma {
                    assert!((0.1..=2.0).contains(&s));
                }
                let area = f64::from(p.crop.width * p.crop.height) / 8000.0;
                assert!(
                    area <= 1.0
                        && p.crop.left + p.crop.width <= 100
                        && p.crop.top + p.crop.height <= 80
                );
                assert!(p.mask.is_none());
            }
        }
        assert_eq!((blur[0], sol[0]), (1000, 0));
        assert!(
            (50..150).contains(&blur[1]) && (150..250).contains(&sol[1]),
            "{blur:?} {sol:?}"
        );
        let draw = |seed| {
            set.sample(
                1,
                (64, 64),
                &mut rand_chacha::ChaCha8Rng::seed_from_u64(seed),
            )
        };
        assert_eq!(draw(5), draw(5));
        assert_ne!(draw(5), draw(6));
    }

    #[test]
    fn center_crop_is_centred_and_deterministic() {
        let c = CenterCrop {
            size: 224,
            fraction: 0.875,
        };
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
        let p = c.sample(0, (500, 375), &mut rng);
        // side = round(375 * 0.875) = 328; top = round(47 / 2) = 24 (ties to even), left = 86.
        assert_eq!(
            p.crop,
            CropParams {
                top: 24,
                left: 86,
                height: 328,
                width: 328
            }
        );
        assert!(!p.flip && p.mask.is_none() && p.pixels == PixelParams::default());
    }
}

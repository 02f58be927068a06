//! RandomResizedCrop with torchvision's sampling rule
//! (`torchvision.transforms.RandomResizedCrop.get_params`): up to 10 tries of a scale drawn
//! uniformly and an aspect ratio drawn log-uniformly, then a centre-crop fallback.

use rand::Rng;

/// A crop rectangle in source pixels (torchvision's `i, j, h, w`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CropParams {
    /// Top row.
    pub top: u32,
    /// Left column.
    pub left: u32,
    /// Height in pixels.
    pub height: u32,
    /// Width in pixels.
    pub width: u32,
}

/// The crop sampler.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RandomResizedCrop {
    /// Output side in pixels (square output). By default, 224.
    pub size: u32,
    /// Range of the crop's area as a fraction of the image's. By default, [0.67, 1].
    pub scale: (f64, f64),
    /// Range of the crop's aspect ratio (width / height). By default, [3/4, 4/3].
    pub ratio: (f64, f64),
}

impl RandomResizedCrop {
    /// Draws a crop of an image of `width` x `height` pixels.
    pub fn sample(&self, (width, height): (u32, u32), rng: &mut impl Rng) -> CropParams {
        let area = f64::from(width) * f64::from(height);
        let (log_lo, log_hi) = (self.ratio.0.ln(), self.ratio.1.ln());
        for _ in 0..10 {
            let target_area = area * uniform(rng, self.scale.0, self.scale.1);
            let aspect = uniform(rng, log_lo, log_hi).exp();
            // Python's round() rounds half to even.
            let w = (target_area * aspect).sqrt().round_ties_even() as i64;
            let h = (target_area / aspect).sqrt().round_ties_even() as i64;
            if 0 < w && w <= i64::from(width) && 0 < h && h <= i64::from(height) {
                let (w, h) = (w as u32, h as u32);
                let top = rng.random_range(0..=height - h);
                let left = rng.random_range(0..=width - w);
                return CropParams {
                    top,
                    left,
                    height: h,
                    width: w,
                };
            }
        }
        // Fallback: the largest centre crop within the ratio range.
        let in_ratio = f64::from(width) / f64::from(height);
        let (min_r, max_r) = (
            self.ratio.0.min(self.ratio.1),
            self.ratio.0.max(self.ratio.1),
        );
        let (w, h) = if in_ratio < min_r {
            (
                width,
                ((f64::from(width) / min_r).round_ties_even() as u32).max(1),
            )
        } else if in_ratio > max_r {
            (
                ((f64::from(height) * max_r).round_ties_even() as u32).max(1),
                height,
            )
        } else {
            (width, height)
        };
        CropParams {
            top: (height - h) / 2,
            left: (width - w) / 2,
            height: h,
            width: w,
        }
    }
}

fn uniform(rng: &mut impl Rng, lo: f64, hi: f64) -> f64 {
    if hi > lo {
        rng.random_range(lo..hi)
    } else {
        lo
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn rrc() -> RandomResizedCrop {
        RandomResizedCrop {
            size: 224,
            scale: (0.67, 1.0),
            ratio: (3.0 / 4.0, 4.0 / 3.0),
        }
    }

    #[test]
    fn crops_stay_inside_and_within_scale_and_ratio() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        for &(w, h) in &[
            (500u32, 375u32),
            (224, 224),
            (1000, 300),
            (300, 1000),
            (64, 48),
        ] {
            let area = f64::from(w * h);
            for _ in 0..500 {
                let c = rrc().sample((w, h), &mut rng);
                assert!(
                    c.left + c.width <= w && c.top + c.height <= h,
                    "{c:?} outside {w}x{h}"
                );
                assert!(c.width > 0 && c.height > 0);
                let frac = f64::from(c.width * c.height) / area;
                let ratio = f64::from(c.width) / f64::from(c.height);
                // Rounding to whole pixels moves scale and ratio slightly past the bounds.
                let slack = 2.0 / f64::from(c.width.min(c.height));
                let sampled = frac >= 0.67 - 2.0 * slack
                    && frac <= 1.0 + 1e-9
                    && ratio >= 0.75 - slack
                    && ratio <= 4.0 / 3.0 + slack;
                let centre = c.left == (w - c.width) / 2 && c.top == (h - c.height) / 2;
                assert!(
                    sampled || centre,
                    "{c:?} of {w}x{h}: area {frac:.3}, ratio {ratio:.3}"
                );
            }
        }
    }

    #[test]
    fn extreme_aspect_falls_back_to_a_centre_crop_at_the_ratio_bound() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(2);
        // A 10:1 strip: no sampled crop with area >= 0.67 fits, so the fallback decides.
        let c = rrc().sample((1000, 100), &mut rng);
        assert_eq!(
            c,
            CropParams {
                top: 0,
                left: 433,
                height: 100,
                width: 133
            }
        );
        let c = rrc().sample((100, 1000), &mut rng);
        assert_eq!(
            c,
            CropParams {
                top: 433,
                left: 0,
                height: 133,
                width: 100
            }
        );
    }

    #[test]
    fn same_seed_same_crop() {
        let a = rrc().sample((640, 480), &mut rand_chacha::ChaCha8Rng::seed_from_u64(9));
        let b = rrc().sample((640, 480), &mut rand_chacha::ChaCha8Rng::seed_from_u64(9));
        assert_eq!(a, b);
    }
}

//! Pixel transforms of MoCo v3's augmentation (Chen et al., "An Empirical Study of Training
//! Self-Supervised Vision Transformers", <https://arxiv.org/abs/2104.02057>, after BYOL):
//! colour jitter, random greyscale, Gaussian blur and solarize, on interleaved RGB bytes,
//! with torchvision's parameter sampling and PIL's arithmetic (each op rounds to bytes).

use rand::Rng;
use rand::seq::SliceRandom;

/// torchvision's `RandomApply(ColorJitter(brightness, contrast, saturation, hue), p)`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ColorJitter {
    /// Probability of applying it. MoCo v3: 0.8.
    pub p: f64,
    /// Brightness factor range `1 +- brightness`. MoCo v3: 0.4.
    pub brightness: f64,
    /// Contrast factor range `1 +- contrast`. MoCo v3: 0.4.
    pub contrast: f64,
    /// Saturation factor range `1 +- saturation`. MoCo v3: 0.2.
    pub saturation: f64,
    /// Hue shift range `+- hue` (fraction of a turn, at most 0.5). MoCo v3: 0.1.
    pub hue: f64,
}

/// One drawn colour jitter: the four factors and their order.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct JitterParams {
    /// Order of the ops: 0 brightness, 1 contrast, 2 saturation, 3 hue.
    pub order: [u8; 4],
    /// Brightness factor.
    pub brightness: f32,
    /// Contrast factor.
    pub contrast: f32,
    /// Saturation factor.
    pub saturation: f32,
    /// Hue shift.
    pub hue: f32,
}

/// The pixel transforms drawn for one view, applied in MoCo v3's order: jitter,
/// greyscale, blur, solarize.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PixelParams {
    /// Colour jitter, if applied.
    pub jitter: Option<JitterParams>,
    /// Whether the view becomes grey.
    pub grayscale: bool,
    /// Gaussian blur sigma in output pixels, if blurred.
    pub blur_sigma: Option<f32>,
    /// Whether bytes >= 128 are inverted.
    pub solarize: bool,
}

fn uniform(rng: &mut impl Rng, lo: f64, hi: f64) -> f64 {
    lo + (hi - lo) * rng.random::<f64>()
}

impl ColorJitter {
    /// Draws whether and how to jitter.
    pub fn sample(&self, rng: &mut impl Rng) -> Option<JitterParams> {
        if rng.random::<f64>() >= self.p {
            return None;
        }
        let mut order = [0u8, 1, 2, 3];
        order.shuffle(rng);
        let factor = |rng: &mut _, r: f64| uniform(rng, (1.0 - r).max(0.0), 1.0 + r) as f32;
        Some(JitterParams {
            order,
            brightness: factor(rng, self.brightness),
            contrast: factor(rng, self.contrast),
            saturation: factor(rng, self.saturation),
            hue: uniform(rng, -self.hue, self.hue) as f32,
        })
    }
}

/// PIL's luminance: `(299 R + 587 G + 114 B) / 1000`.
fn luma(p: &[u8]) -> f32 {
    (299.0 * f32::from(p[0]) + 587.0 * f32::from(p[1]) + 114.0 * f32::from(p[2])) / 1000.0
}

/// Rounds half away from zero and clamps to a byte (as `f32::round`, without the libm call
/// that a baseline x86-64 build makes for it: this runs per pixel and channel).
fn to_byte(v: f32) -> u8 {
    (v.clamp(0.0, 255.0) + 0.5) as u8
}

/// Blends every pixel with `towards(pixel)` by `factor` (PIL's ImageEnhance).
fn blend(hwc: &mut [u8], factor: f32, towards: impl Fn(&[u8]) -> f32) {
    for p in hwc.chunks_exact_mut(3) {
        let base = towards(p);
        for v in p.iter_mut() {
            *v = to_byte(base + factor * (f32::from(*v) - base));
        }
    }
}

/// [`blend`] towards one value for every pixel: a byte-to-byte table, same arithmetic.
fn blend_towards(hwc: &mut [u8], factor: f32, base: f32) {
    let table: [u8; 256] = std::array::from_fn(|v| to_byte(base + factor * (v as f32 - base)));
    for v in hwc.iter_mut() {
        *v = table[usize::from(*v)];
    }
}

/// Rotates every pixel's hue by `shift` turns through HSV. Written without `floor` and
/// `rem_euclid` (library calls per pixel on baseline x86-64): the values are in known
/// ranges, where the branches below give the same results.
fn shift_hue(hwc: &mut [u8], shift: f32) {
    for p in hwc.chunks_exact_mut(3) {
        let [r, g, b] = [p[0], p[1], p[2]].map(|v| f32::from(v) / 255.0);
        let (max, min) = (r.max(g).max(b), r.min(g).min(b));
        let delta = max - min;
        if delta == 0.0 {
            continue; // grey: no hue
        }
        let h = if max == r {
            // In [-1, 1]: rem_euclid(6) adds 6 to the negative ones.
            let x = (g - b) / delta;
            if x < 0.0 { x + 6.0 } else { x }
        } else if max == g {
            (b - r) / delta + 2.0
        } else {
            (r - g) / delta + 4.0
        } / 6.0;
        let (s, v) = (delta / max, max);
        // h + shift is in [-0.5, 1.5) (|shift| <= 0.5): rem_euclid(1) is one step.
        let t = h + shift;
        let t = if t < 0.0 {
            t + 1.0
        } else if t >= 1.0 {
            t - 1.0
        } else {
            t
        };
        let h = t * 6.0;
        let sector = h as u32; // h >= 0: truncation is floor
        let f = h - sector as f32;
        let (x, y, z) = (v * (1.0 - s), v * (1.0 - s * f), v * (1.0 - s * (1.0 - f)));
        let rgb = match sector % 6 {
            0 => [v, z, x],
            1 => [y, v, x],
            2 => [x, v, z],
            3 => [x, y, v],
            4 => [z, x, v],
            _ => [v, x, y],
        };
        for (dst, c) in p.iter_mut().zip(rgb) {
            *dst = to_byte(c * 255.0);
        }
    }
}

/// Separable Gaussian blur of an interleaved `size` x `size` RGB image, kernel radius
/// `ceil(3 sigma)`, edges extended. Both passes add whole rows at once (weight times a
/// shifted row), which vectorises; each output value still sums its taps in kernel order.
fn gaussian_blur(hwc: &mut [u8], size: usize, sigma: f32) {
    let radius = (3.0 * sigma).ceil() as usize;
    let mut kernel: Vec<f32> = (0..=2 * radius)
        .map(|i| {
            let d = i as f32 - radius as f32;
            (-(d * d) / (2.0 * sigma * sigma)).exp()
        })
        .collect();
    let total: f32 = kernel.iter().sum();
    kernel.iter_mut().for_each(|k| *k /= total);
    let width = 3 * size;
    let source: Vec<f32> = hwc.iter().map(|&v| f32::from(v)).collect();
    // Rows: each padded with its edge pixels.
    let mut rows = vec![0f32; source.len()];
    let mut padded = vec![0f32; 3 * (size + 2 * radius)];
    for y in 0..size {
        let row = &source[y * width..(y + 1) * width];
        for i in 0..size + 2 * radius {
            let x = i.saturating_sub(radius).min(size - 1);
            padded[3 * i..3 * i + 3].copy_from_slice(&row[3 * x..3 * x + 3]);
        }
        let out = &mut rows[y * width..(y + 1) * width];
        for (k, w) in kernel.iter().enumerate() {
            for (o, p) in out.iter_mut().zip(&padded[3 * k..3 * k + width]) {
                *o += w * p;
            }
        }
    }
    // Columns: output row y adds the rows y - radius ..= y + radius, edges repeated.
    let mut acc = vec![0f32; width];
    for y in 0..size {
        acc.fill(0.0);
        for (k, w) in kernel.iter().enumerate() {
            let from = (y + k).saturating_sub(radius).min(size - 1);
            for (a, p) in acc.iter_mut().zip(&rows[from * width..(from + 1) * width]) {
                *a += w * p;
            }
        }
        for (dst, a) in hwc[y * width..(y + 1) * width].iter_mut().zip(&acc) {
            *dst = to_byte(*a);
        }
    }
}

impl PixelParams {
    /// Applies the drawn transforms to an interleaved `size` x `size` RGB image.
    pub fn apply(&self, hwc: &mut [u8], size: usize) {
        if let Some(j) = self.jitter {
            for op in j.order {
                match op {
                    0 => blend_towards(hwc, j.brightness, 0.0),
                    1 => {
                        let n = (hwc.len() / 3).max(1) as f32;
                        let mean = (hwc.chunks_exact(3).map(luma).sum::<f32>() / n).round();
                        blend_towards(hwc, j.contrast, mean)
                    }
                    2 => blend(hwc, j.saturation, luma),
                    _ => shift_hue(hwc, j.hue),
                }
            }
        }
        if self.grayscale {
            for p in hwc.chunks_exact_mut(3) {
                let l = to_byte(luma(p));
                p.fill(l);
            }
        }
        if let Some(sigma) = self.blur_sigma {
            gaussian_blur(hwc, size, sigma);
        }
        if self.solarize {
            for v in hwc.iter_mut() {
                if *v >= 128 {
                    *v = 255 - *v;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    const JITTER: ColorJitter = ColorJitter {
        p: 0.8,
        brightness: 0.4,
        contrast: 0.4,
        saturation: 0.2,
        hue: 0.1,
    };

    /// The separable blur equals a direct 2D convolution with the same kernel and edges.
    #[test]
    fn blur_matches_a_direct_convolution() {
        let (size, sigma) = (9usize, 1.3f32);
        let img: Vec<u8> = (0..3 * size * size)
            .map(|i| ((i * 37) % 251) as u8)
            .collect();
        let mut fast = img.clone();
        gaussian_blur(&mut fast, size, sigma);
        let r = (3.0 * sigma).ceil() as isize;
        let w = |d: isize| (-((d * d) as f32) / (2.0 * sigma * sigma)).exp();
        let total: f32 = (-r..=r).map(w).sum();
        let at = |i: isize| i.clamp(0, size as isize - 1) as usize;
        for y in 0..size as isize {
            for x in 0..size as isize {
                for c in 0..3 {
                    let mut v = 0f32;
                    for dy in -r..=r {
                        for dx in -r..=r {
                            let p = img[3 * (at(y + dy) * size + at(x + dx)) + c];
                            v += w(dy) * w(dx) / (total * total) * f32::from(p);
                        }
                    }
                    let got = fast[3 * (y as usize * size + x as usize) + c];
                    assert!(
                        (f32::from(got) - v).abs() <= 0.51,
                        "({x}, {y}, {c}): {got} vs {v}"
                    );
                }
            }
        }
    }

    #[test]
    fn jitter_parameters_stay_in_range_and_follow_the_seed() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let mut applied = 0;
        for _ in 0..2000 {
            if let Some(j) = JITTER.sample(&mut rng) {
                applied += 1;
                assert!((0.6..=1.4).contains(&j.brightness) && (0.6..=1.4).contains(&j.contrast));
                assert!((0.8..=1.2).contains(&j.saturation) && (-0.1..=0.1).contains(&j.hue));
                let mut o = j.order;
                o.sort();
                assert_eq!(o, [0, 1, 2, 3]);
            }
        }
        assert!(
            (1500..1700).contains(&applied),
            "p = 0.8: {applied} of 2000"
        );
        let draw = |s| JITTER.sample(&mut rand_chacha::ChaCha8Rng::seed_from_u64(s));
        assert_eq!(draw(7), draw(7));
    }

    #[test]
    fn ops_do_what_they_say() {
        let px = vec![200u8, 100, 50, 10, 20, 30, 128, 128, 128, 255, 0, 0];
        let apply = |p: PixelParams| {
            let mut v = px.clone();
            p.apply(&mut v, 2);
            v
        };
        assert_eq!(apply(PixelParams::default()), px);
        let grey = apply(PixelParams {
            grayscale: true,
            ..Default::default()
        });
        assert_eq!(&grey[..3], &[124, 124, 124]); // 0.299*200 + 0.587*100 + 0.114*50 = 124.2
        let sol = apply(PixelParams {
            solarize: true,
            ..Default::default()
        });
        assert_eq!(&sol[..3], &[55, 100, 50]);
        assert_eq!(&sol[6..9], &[127, 127, 127]);
        let jitter = |order, b, c, s, h| PixelParams {
            jitter: Some(JitterParams {
                order,
                brightness: b,
                contrast: c,
                saturation: s,
                hue: h,
            }),
            ..Default::default()
        };
        // Brightness 0.5 halves every byte (PIL rounds).
        assert_eq!(
            &apply(jitter([0, 1, 2, 3], 0.5, 1.0, 1.0, 0.0))[..3],
            &[100, 50, 25]
        );
        // Saturation 0 is greyscale; hue +1/3 turns pure red into pure green.
        assert_eq!(
            &apply(jitter([2, 0, 1, 3], 1.0, 1.0, 0.0, 0.0))[..3],
            &grey[..3]
        );
        assert_eq!(
            &apply(jitter([3, 0, 1, 2], 1.0, 1.0, 1.0, 1.0 / 3.0))[9..],
            &[0, 255, 0]
        );
        // A blur keeps a flat image flat and averages a step.
        let mut flat = vec![90u8; 3 * 16];
        gaussian_blur(&mut flat, 4, 1.5);
        assert!(flat.iter().all(|&v| v == 90));
        let blurred = apply(PixelParams {
            blur_sigma: Some(1.0),
            ..Default::default()
        });
        assert!(blurred[0] < 200 && blurred[0] > 100, "{blurred:?}");
    }
}

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

/// Rounds half away from zero and clamps to a byte (NaN to 0), as `f32::round` and a
/// saturating cast would, but without the libm call and the per-value checks that keep a
/// baseline x86-64 build from vectorising it: this runs per pixel and channel.
#[inline(always)]
fn to_byte(v: f32) -> u8 {
    let v = if v > 0.0 { v } else { 0.0 };
    let v = if v < 255.0 { v } else { 255.0 };
    // SAFETY: v + 0.5 is in [0.5, 255.5], where truncation to i32 is defined.
    unsafe { (v + 0.5).to_int_unchecked::<i32>() as u8 }
}

/// Pixels per block in [`map_pixels`].
const LANES: usize = 64;

/// Replaces every pixel by `f(pixel)`, in fixed-size blocks of [`LANES`] pixels, so that the
/// compiler vectorises an `f` whose branches are selects (no early returns). Each block is
/// split into its three channels first and joined after, so that `f` runs over
/// contiguous lanes rather than 3-byte strides.
#[inline(always)]
fn map_pixels(hwc: &mut [u8], f: impl Fn([u8; 3]) -> [u8; 3]) {
    let mut blocks = hwc.chunks_exact_mut(3 * LANES);
    for block in &mut blocks {
        let mut planes = [[0u8; LANES]; 3];
        for (i, p) in block.chunks_exact(3).enumerate() {
            for c in 0..3 {
                planes[c][i] = p[c];
            }
        }
        let mut out = [[0u8; LANES]; 3];
        for i in 0..LANES {
            let q = f([planes[0][i], planes[1][i], planes[2][i]]);
            for c in 0..3 {
                out[c][i] = q[c];
            }
        }
        for (i, p) in block.chunks_exact_mut(3).enumerate() {
            for c in 0..3 {
                p[c] = out[c][i];
            }
        }
    }
    for p in blocks.into_remainder().chunks_exact_mut(3) {
        let q = f([p[0], p[1], p[2]]);
        p.copy_from_slice(&q);
    }
}

/// Blends every pixel with `towards(pixel)` by `factor` (PIL's ImageEnhance).
#[inline(always)]
fn blend(hwc: &mut [u8], factor: f32, towards: impl Fn(&[u8]) -> f32) {
    map_pixels(hwc, |p| {
        let base = towards(&p);
        p.map(|v| to_byte(base + factor * (f32::from(v) - base)))
    });
}

/// [`blend`] towards one value for every pixel: a byte-to-byte table, same arithmetic.
#[inline(always)]
fn blend_towards(hwc: &mut [u8], factor: f32, base: f32) {
    let table: [u8; 256] = std::array::from_fn(|v| to_byte(base + factor * (v as f32 - base)));
    for v in hwc.iter_mut() {
        *v = table[usize::from(*v)];
    }
}

/// Rotates every pixel's hue by `shift` turns through HSV. Every branch is computed and
/// selected, so that [`map_pixels`] vectorises it, and written without `floor` and
/// `rem_euclid` (library calls on baseline x86-64): the values are in known ranges, where
/// the selects below give the same results (a test compares them with the per-pixel
/// branches).
#[inline(always)]
fn shift_hue(hwc: &mut [u8], shift: f32) {
    map_pixels(hwc, |p| {
        let [r, g, b] = p.map(|v| f32::from(v) / 255.0);
        // `f32::max` and `min` handle NaN, which costs a vector select each; none here.
        let larger = |a: f32, b: f32| if a > b { a } else { b };
        let smaller = |a: f32, b: f32| if a < b { a } else { b };
        let (max, min) = (larger(larger(r, g), b), smaller(smaller(r, g), b));
        let delta = max - min;
        let grey = delta == 0.0; // no hue: left as it is
        let d = if grey { 1.0 } else { delta };
        // One division: the numerator and the offset of the channel that is largest.
        let (top, offset) = if max == r {
            (g - b, 0.0)
        } else if max == g {
            (b - r, 2.0)
        } else {
            (r - g, 4.0)
        };
        let x = top / d;
        // Max red: x in [-1, 1], and rem_euclid(6) adds 6 to the negative ones.
        let h = if max == r {
            if x < 0.0 { x + 6.0 } else { x }
        } else {
            x + offset
        } / 6.0;
        let (s, v) = (delta / if grey { 1.0 } else { max }, max);
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
        let sector = (h as i32) as f32; // h >= 0: truncation is floor
        let f = h - sector;
        let sector = if sector >= 6.0 { sector - 6.0 } else { sector };
        let (x, y, z) = (v * (1.0 - s), v * (1.0 - s * f), v * (1.0 - s * (1.0 - f)));
        // Sectors 0-5: [v, z, x], [y, v, x], [x, v, z], [x, y, v], [z, x, v], [v, x, y].
        let pick = |a: [f32; 6]| {
            let mut c = a[0];
            for (k, &value) in a.iter().enumerate().skip(1) {
                c = if sector == k as f32 { value } else { c };
            }
            c
        };
        let rgb = [
            pick([v, y, x, x, z, v]),
            pick([z, v, v, y, x, x]),
            pick([x, x, z, v, v, y]),
        ];
        if grey {
            p
        } else {
            rgb.map(|c| to_byte(c * 255.0))
        }
    });
}

/// Separable Gaussian blur of an interleaved `size` x `size` RGB image, kernel radius
/// `ceil(3 sigma)`, edges extended. Both passes work on [`RUN`] values of a row at once,
/// adding every tap into accumulators that stay in registers, which vectorises; each output
/// value still sums its taps in kernel order, from zero.
#[inline(always)]
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
    // Rows: each padded with its edge pixels, then convolved along x.
    let mut rows = vec![0f32; width * size];
    let mut padded = vec![0f32; 3 * (size + 2 * radius)];
    for (y, out) in rows.chunks_exact_mut(width).enumerate() {
        let row = &hwc[y * width..(y + 1) * width];
        for (p, &v) in padded[3 * radius..3 * radius + width].iter_mut().zip(row) {
            *p = f32::from(v);
        }
        for i in 0..radius {
            let (first, last) = (3 * radius, 3 * (radius + size - 1));
            padded.copy_within(first..first + 3, 3 * i);
            padded.copy_within(last..last + 3, 3 * (radius + size + i));
        }
        convolve(out, &kernel, |k| &padded[3 * k..3 * k + width]);
    }
    // Columns: output row y adds the rows y - radius ..= y + radius, edges repeated.
    let mut acc = vec![0f32; width];
    for (y, dst) in hwc.chunks_exact_mut(width).enumerate() {
        convolve(&mut acc, &kernel, |k| {
            let from = (y + k).saturating_sub(radius).min(size - 1);
            &rows[from * width..(from + 1) * width]
        });
        for (d, a) in dst.iter_mut().zip(&acc) {
            *d = to_byte(*a);
        }
    }
}

/// Values per run of [`convolve`]: two AVX2 registers of f32.
const RUN: usize = 16;

/// `out[x] = sum over taps k, in order, of kernel[k] * tap(k)[x]` (each `tap(k)` as long as
/// `out`), [`RUN`] outputs at a time so that the sums stay in registers.
#[inline(always)]
fn convolve<'a>(out: &mut [f32], kernel: &[f32], tap: impl Fn(usize) -> &'a [f32]) {
    let taps: Vec<&[f32]> = (0..kernel.len()).map(&tap).collect();
    let mut runs = out.chunks_exact_mut(RUN);
    let mut x0 = 0;
    for run in &mut runs {
        let mut sum = [0f32; RUN];
        for (w, t) in kernel.iter().zip(&taps) {
            let src: &[f32; RUN] = t[x0..x0 + RUN].try_into().expect("a whole run");
            for (s, v) in sum.iter_mut().zip(src) {
                *s += w * v;
            }
        }
        run.copy_from_slice(&sum);
        x0 += RUN;
    }
    for (l, o) in runs.into_remainder().iter_mut().enumerate() {
        *o = kernel
            .iter()
            .zip(&taps)
            .fold(0.0, |s, (w, t)| s + w * t[x0 + l]);
    }
}

impl PixelParams {
    /// Applies the drawn transforms to an interleaved `size` x `size` RGB image.
    pub fn apply(&self, hwc: &mut [u8], size: usize) {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2, checked above.
            return unsafe { self.apply_avx2(hwc, size) };
        }
        self.apply_here(hwc, size);
    }

    /// [`PixelParams::apply`] compiled for AVX2: the same operations in the same order
    /// (no fused multiply-adds), so the same bytes, on twice as many lanes.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn apply_avx2(&self, hwc: &mut [u8], size: usize) {
        self.apply_here(hwc, size);
    }

    #[inline(always)]
    fn apply_here(&self, hwc: &mut [u8], size: usize) {
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

    /// The AVX2 build of the ops writes the bytes the portable build writes.
    #[test]
    fn every_build_of_the_ops_gives_the_same_bytes() {
        let size = 37;
        let img: Vec<u8> = (0..3 * size * size)
            .map(|i| ((i * 7919) % 251) as u8)
            .collect();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        for _ in 0..40 {
            let p = PixelParams {
                jitter: JITTER.sample(&mut rng),
                grayscale: rng.random::<f64>() < 0.2,
                blur_sigma: (rng.random::<f64>() < 0.5).then(|| rng.random_range(0.1..2.0)),
                solarize: rng.random::<f64>() < 0.2,
            };
            let (mut here, mut dispatched) = (img.clone(), img.clone());
            p.apply_here(&mut here, size);
            p.apply(&mut dispatched, size);
            assert!(here == dispatched, "{p:?}");
        }
    }

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

    /// [`to_byte`] as it was written before it was made to vectorise.
    fn saturating_to_byte(v: f32) -> u8 {
        (v.clamp(0.0, 255.0) + 0.5) as u8
    }

    #[test]
    fn to_byte_rounds_half_up_and_saturates() {
        for (v, b) in [
            (-1.0, 0),
            (0.49, 0),
            (0.5, 1),
            (2.5, 3),
            (254.6, 255),
            (300.0, 255),
        ] {
            assert_eq!(to_byte(v), b, "{v}");
        }
        assert_eq!(to_byte(f32::NAN), 0);
        assert_eq!(to_byte(f32::INFINITY), 255);
        assert_eq!(to_byte(f32::NEG_INFINITY), 0);
        // Every float from -2 to 258 that is a multiple of 2^-16, and the neighbours of
        // every rounding boundary.
        let near_halves = (0..=256).flat_map(|k| {
            let half = k as f32 - 0.5;
            [half.next_down(), half, half.next_up()]
        });
        for v in (-(2 << 16)..=(258 << 16))
            .map(|i| i as f32 / 65536.0)
            .chain(near_halves)
        {
            assert_eq!(to_byte(v), saturating_to_byte(v), "{v}");
        }
    }

    /// Random pixels, plus greys and every pure and mixed extreme.
    fn test_pixels() -> Vec<u8> {
        use rand::Rng;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let mut img: Vec<u8> = (0..3 * 1000).map(|_| rng.random()).collect();
        for v in [0u8, 1, 127, 128, 254, 255] {
            for p in [[v, v, v], [v, 0, 255], [255, v, 0], [0, 255, v], [v, v, 0]] {
                img.extend(p);
            }
        }
        img
    }

    #[test]
    fn hue_in_blocks_is_the_per_pixel_hue() {
        let img = test_pixels();
        for shift in [-0.5, -0.31, -0.01, 0.0, 0.01, 1.0 / 3.0, 0.49, 0.5] {
            let (mut fast, mut reference) = (img.clone(), img.clone());
            shift_hue(&mut fast, shift);
            shift_hue_reference(&mut reference, shift);
            assert!(fast == reference, "shift {shift}");
        }
    }

    #[test]
    fn saturation_in_blocks_is_the_per_pixel_blend() {
        let img = test_pixels();
        for factor in [0.0, 0.6, 1.0, 1.4] {
            let mut fast = img.clone();
            blend(&mut fast, factor, luma);
            for (p, q) in img.chunks_exact(3).zip(fast.chunks_exact(3)) {
                let base = luma(p);
                let expected =
                    [0, 1, 2].map(|c| saturating_to_byte(base + factor * (f32::from(p[c]) - base)));
                assert_eq!(q, expected, "{p:?} at {factor}");
            }
        }
    }

    /// The hue rotation of commit 014e8f2, pixel by pixel with branches, which
    /// [`shift_hue`] must match.
    fn shift_hue_reference(hwc: &mut [u8], shift: f32) {
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
                *dst = saturating_to_byte(c * 255.0);
            }
        }
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

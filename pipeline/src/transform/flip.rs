//! Horizontal flip with probability p.

use rand::Rng;

/// The flip sampler.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RandomHorizontalFlip {
    /// Probability of flipping. By default, 0.5.
    pub p: f64,
}

impl RandomHorizontalFlip {
    /// Draws whether to flip.
    pub fn sample(&self, rng: &mut impl Rng) -> bool {
        rng.random::<f64>() < self.p
    }

    /// Mirrors an interleaved image of `width` pixels of `channels` bytes, row by row.
    pub fn apply(pixels: &mut [u8], width: usize, channels: usize) {
        for row in pixels.chunks_exact_mut(width * channels) {
            for x in 0..width / 2 {
                let (a, b) = (x * channels, (width - 1 - x) * channels);
                for c in 0..channels {
                    row.swap(a + c, b + c);
                }
            }
        }
    }
}

/// Interleaved HWC to planar CHW in `chw` (3 x size x size bytes), mirrored horizontally
/// when `flip`.
pub(crate) fn to_chw(hwc: &[u8], size: usize, flip: bool, chw: &mut [u8]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2, checked above.
        return unsafe { to_chw_avx2(hwc, size, flip, chw) };
    }
    to_chw_rows(hwc, size, flip, chw);
}

/// [`to_chw`] compiled for AVX2, where the compiler vectorises the shuffle (the baseline
/// x86-64 build does not: its loop was 5% of a decoder thread's time).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn to_chw_avx2(hwc: &[u8], size: usize, flip: bool, chw: &mut [u8]) {
    to_chw_rows(hwc, size, flip, chw);
}

#[inline(always)]
fn to_chw_rows(hwc: &[u8], size: usize, flip: bool, chw: &mut [u8]) {
    let (r, gb) = chw.split_at_mut(size * size);
    let (g, b) = gb.split_at_mut(size * size);
    let rows = hwc.chunks_exact(3 * size);
    let planes = r
        .chunks_exact_mut(size)
        .zip(g.chunks_exact_mut(size))
        .zip(b.chunks_exact_mut(size));
    for (row, ((r, g), b)) in rows.zip(planes) {
        let out = r.iter_mut().zip(g.iter_mut()).zip(b.iter_mut());
        if flip {
            for (((r, g), b), p) in out.zip(row.chunks_exact(3).rev()) {
                (*r, *g, *b) = (p[0], p[1], p[2]);
            }
        } else {
            for (((r, g), b), p) in out.zip(row.chunks_exact(3)) {
                (*r, *g, *b) = (p[0], p[1], p[2]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flip_mirrors_each_row() {
        let mut px = vec![1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]; // 2 rows x 2 px x 3 ch
        RandomHorizontalFlip::apply(&mut px, 2, 3);
        assert_eq!(px, vec![4, 5, 6, 1, 2, 3, 10, 11, 12, 7, 8, 9]);
    }

    /// The vectorised shuffle (and the portable one) puts pixel (x, y)'s channel c at
    /// c * size * size + y * size + x, or at x's mirror when flipped.
    #[test]
    fn to_chw_moves_every_byte_to_its_plane() {
        for size in [1, 5, 32, 37] {
            let hwc: Vec<u8> = (0..3 * size * size).map(|i| (i * 7 % 251) as u8).collect();
            for flip in [false, true] {
                let mut want = vec![0u8; hwc.len()];
                for y in 0..size {
                    for x in 0..size {
                        let from = if flip { size - 1 - x } else { x };
                        for c in 0..3 {
                            want[c * size * size + y * size + x] = hwc[3 * (y * size + from) + c];
                        }
                    }
                }
                let (mut fast, mut portable) = (vec![0u8; hwc.len()], vec![0u8; hwc.len()]);
                to_chw(&hwc, size, flip, &mut fast);
                to_chw_rows(&hwc, size, flip, &mut portable);
                assert_eq!(fast, want, "size {size}, flip {flip}");
                assert_eq!(portable, want, "size {size}, flip {flip}");
            }
        }
    }
}

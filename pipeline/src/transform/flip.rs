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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flip_mirrors_each_row() {
        let mut px = vec![1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]; // 2 rows x 2 px x 3 ch
        RandomHorizontalFlip::apply(&mut px, 2, 3);
        assert_eq!(px, vec![4, 5, 6, 1, 2, 3, 10, 11, 12, 7, 8, 9]);
    }
}

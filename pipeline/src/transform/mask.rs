//! SimMIM's random mask generator (Xie et al., 2022, <https://arxiv.org/abs/2111.09886>):
//! the image is cut into square mask units and exactly `ceil(units * ratio)` of them are
//! masked, uniformly at random.

use rand::Rng;
use rand::seq::index::sample;

/// The mask sampler.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MaskGenerator {
    /// Side of the (square) input image in pixels. By default, 224.
    pub input_size: u32,
    /// Side of a mask unit in pixels. By default, 32 (a 7x7 grid at 224).
    pub unit: u32,
    /// Fraction of units masked. By default, 0.6 (30 of 49).
    pub ratio: f64,
}

/// A sampled mask on the unit grid: `units[r * grid + c]` is 1 where masked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MaskParams {
    /// Units per side.
    pub grid: usize,
    /// Row-major, 1 = masked.
    pub units: Vec<u8>,
}

impl MaskGenerator {
    /// Units per side of the grid.
    pub fn grid(&self) -> usize {
        (self.input_size / self.unit) as usize
    }

    /// How many units each mask has.
    pub fn count(&self) -> usize {
        let n = self.grid() * self.grid();
        ((n as f64 * self.ratio).ceil() as usize).min(n)
    }

    /// Draws a mask.
    pub fn sample(&self, rng: &mut impl Rng) -> MaskParams {
        let grid = self.grid();
        let mut units = vec![0u8; grid * grid];
        for i in sample(rng, grid * grid, self.count()) {
            units[i] = 1;
        }
        MaskParams { grid, units }
    }
}

impl MaskParams {
    /// The mask upsampled to a token grid of `tokens` per side (`tokens` must be a
    /// multiple of the unit grid: 14 for ViT/16 at 224, 56 for Swin/4).
    pub fn expand(&self, tokens: usize) -> Vec<u8> {
        expand_units(&self.units, self.grid, tokens)
    }
}

/// Upsamples a row-major `grid` x `grid` unit mask to `tokens` x `tokens` by repetition.
pub fn expand_units(units: &[u8], grid: usize, tokens: usize) -> Vec<u8> {
    assert!(
        grid > 0 && tokens.is_multiple_of(grid),
        "token grid {tokens} is not a multiple of mask grid {grid}"
    );
    let s = tokens / grid;
    let mut out = vec![0u8; tokens * tokens];
    for (i, v) in out.iter_mut().enumerate() {
        let (r, c) = (i / tokens / s, i % tokens / s);
        *v = units[r * grid + c];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn exact_count_every_time() {
        let g = MaskGenerator {
            input_size: 224,
            unit: 32,
            ratio: 0.6,
        };
        assert_eq!((g.grid(), g.count()), (7, 30));
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
        for _ in 0..200 {
            let m = g.sample(&mut rng);
            assert_eq!(m.units.iter().map(|&u| u as usize).sum::<usize>(), 30);
            let tokens = m.expand(14);
            assert_eq!(tokens.iter().map(|&u| u as usize).sum::<usize>(), 30 * 4);
        }
        let g = MaskGenerator {
            input_size: 32,
            unit: 8,
            ratio: 0.5,
        };
        assert_eq!(
            g.sample(&mut rng).units.iter().filter(|&&u| u == 1).count(),
            8
        );
    }

    #[test]
    fn expansion_repeats_each_unit() {
        let units = vec![1, 0, 0, 1];
        assert_eq!(
            expand_units(&units, 2, 4),
            vec![1, 1, 0, 0, 1, 1, 0, 0, 0, 0, 1, 1, 0, 0, 1, 1]
        );
    }
}

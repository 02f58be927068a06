//! The loader's settings: the `[data]` section of a training config, field by field.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::transform::{MaskGenerator, RandomHorizontalFlip, RandomResizedCrop, Stage2};

/// Settings of the streaming loader (`[data]` in a config file).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoaderConfig {
    /// Samples per batch on this rank. By default, 256.
    pub batch_size: usize,
    /// Decode and augment threads; 0 means one per core. By default, 0.
    pub workers: usize,
    /// Shards streamed at the same time. By default, 4.
    pub readers: usize,
    /// Size of each ranged read from the store, in bytes. By default, 8 MiB.
    pub chunk_bytes: u64,
    /// Shuffle buffer, in samples (memory: this many encoded images). By default, 2048.
    pub shuffle_buffer: usize,
    /// Seed of every random choice (shard order, shuffle, crops, flips, masks). By default, 0.
    pub seed: u64,
    /// Drop the last partial batch of each epoch. By default, true.
    pub drop_last: bool,
    /// Batches prepared ahead of the consumer. By default, 2.
    pub prefetch_batches: usize,
    /// How long a failing read is retried (with backoff) before the shard is given up,
    /// in seconds. By default, 120.
    pub io_retry_seconds: u64,
    /// A local folder that keeps a checked copy of every shard streamed from object
    /// storage, read instead of the store from then on (local sources are never cached).
    /// By default, none.
    pub cache_dir: Option<std::path::PathBuf>,
    /// Stage-2 augmentation.
    pub transform: TransformConfig,
}

impl Default for LoaderConfig {
    fn default() -> Self {
        LoaderConfig {
            batch_size: 256,
            workers: 0,
            readers: 4,
            chunk_bytes: 8 << 20,
            shuffle_buffer: 2048,
            seed: 0,
            drop_last: true,
            prefetch_batches: 2,
            io_retry_seconds: 120,
            cache_dir: None,
            transform: TransformConfig::default(),
        }
    }
}

/// MimCo stage-2 augmentation (METHOD.md): RandomResizedCrop, flip, SimMIM mask.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TransformConfig {
    /// Output side in pixels. By default, 224.
    pub size: u32,
    /// RandomResizedCrop area range. By default, [0.67, 1.0].
    pub scale: [f64; 2],
    /// RandomResizedCrop aspect-ratio range. By default, [0.75, 1.3333333333333333].
    pub ratio: [f64; 2],
    /// Horizontal flip probability. By default, 0.5.
    pub flip: f64,
    /// Whether to make masks (false: the paper's no-masking ablation). By default, true.
    pub masking: bool,
    /// Mask unit side in pixels. By default, 32.
    pub mask_unit: u32,
    /// Fraction of mask units masked. By default, 0.6.
    pub mask_ratio: f64,
}

impl Default for TransformConfig {
    fn default() -> Self {
        TransformConfig {
            size: 224,
            scale: [0.67, 1.0],
            ratio: [3.0 / 4.0, 4.0 / 3.0],
            flip: 0.5,
            masking: true,
            mask_unit: 32,
            mask_ratio: 0.6,
        }
    }
}

impl TransformConfig {
    /// Checks the values and builds the augmentation.
    pub fn build(&self) -> Result<Stage2> {
        let bad = |message: String| Err(Error::Config { message });
        if self.size == 0 {
            return bad("transform.size must be at least 1".into());
        }
        if !(0.0 < self.scale[0] && self.scale[0] <= self.scale[1] && self.scale[1] <= 1.0) {
            return bad(format!(
                "transform.scale {:?} must satisfy 0 < lo <= hi <= 1",
                self.scale
            ));
        }
        if !(0.0 < self.ratio[0] && self.ratio[0] <= self.ratio[1]) {
            return bad(format!(
                "transform.ratio {:?} must satisfy 0 < lo <= hi",
                self.ratio
            ));
        }
        if !(0.0..=1.0).contains(&self.flip) || !(0.0..=1.0).contains(&self.mask_ratio) {
            return bad("transform.flip and transform.mask_ratio must be within [0, 1]".into());
        }
        if self.masking && (self.mask_unit == 0 || !self.size.is_multiple_of(self.mask_unit)) {
            return bad(format!(
                "transform.size {} is not a multiple of transform.mask_unit {}",
                self.size, self.mask_unit
            ));
        }
        Ok(Stage2 {
            crop: RandomResizedCrop {
                size: self.size,
                scale: (self.scale[0], self.scale[1]),
                ratio: (self.ratio[0], self.ratio[1]),
            },
            flip: RandomHorizontalFlip { p: self.flip },
            mask: self.masking.then_some(MaskGenerator {
                input_size: self.size,
                unit: self.mask_unit,
                ratio: self.mask_ratio,
            }),
        })
    }
}

impl LoaderConfig {
    /// Parses a `[data]` table from TOML text.
    pub fn from_toml(text: &str) -> Result<LoaderConfig> {
        toml::from_str(text).map_err(|e| Error::Config {
            message: e.to_string(),
        })
    }

    /// Checks the values that do not belong to the transform.
    pub fn check(&self) -> Result<()> {
        let bad = |message: &str| {
            Err(Error::Config {
                message: message.into(),
            })
        };
        if self.batch_size == 0 {
            return bad("batch_size must be at least 1");
        }
        if self.readers == 0 || self.chunk_bytes == 0 {
            return bad("readers and chunk_bytes must be at least 1");
        }
        self.transform.build().map(|_| ())
    }

    /// Decode threads to use: `workers`, or one per core.
    pub fn worker_count(&self) -> usize {
        if self.workers > 0 {
            self.workers
        } else {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The `[data]` block in the crate README lists exactly the defaults.
    #[test]
    fn readme_block_is_the_defaults() {
        let readme = include_str!("../README.md");
        let block = readme
            .split("```toml\n")
            .nth(1)
            .unwrap()
            .split("```")
            .next()
            .unwrap();
        #[derive(Deserialize)]
        struct File {
            data: LoaderConfig,
        }
        let parsed: File = toml::from_str(block).unwrap();
        assert_eq!(parsed.data, LoaderConfig::default());
    }

    #[test]
    fn toml_defaults_and_overrides() {
        let c = LoaderConfig::from_toml("batch_size = 8\n[transform]\nmask_ratio = 0.5\n").unwrap();
        assert_eq!(c.batch_size, 8);
        assert_eq!(c.transform.mask_ratio, 0.5);
        assert_eq!(c.transform.size, 224);
        assert!(
            LoaderConfig::from_toml("batch = 8")
                .unwrap_err()
                .to_string()
                .contains("unknown field")
        );
        let mut bad = LoaderConfig::default();
        bad.transform.mask_unit = 30;
        assert!(bad.check().is_err());
    }
}

//! The loader's settings: the `[data]` section of a training config, field by field.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use std::sync::Arc;

use crate::transform::{
    Augment, CenterCrop, ColorJitter, MaskGenerator, RandomHorizontalFlip, RandomResizedCrop,
    Stage2, TwoViews,
};

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
    /// Leave the JPEGs nvJPEG's hardware decoder takes (8-bit baseline, YCbCr or grey:
    /// nearly all of ImageNet) encoded in the batch, with their crop and flip, for the
    /// CUDA trainer to decode, crop and resize on the GPU; other images are decoded here.
    /// Only with `set = "stage2"` or `"center"` (no colour ops). By default, false.
    pub device_decode: bool,
    /// The augmentation.
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
            device_decode: false,
            transform: TransformConfig::default(),
        }
    }
}

/// Which augmentation set the loader applies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TransformSet {
    /// MimCo stage 2 and SimMIM: RandomResizedCrop, flip, SimMIM mask; one view.
    Stage2,
    /// MoCo v3's teacher training: two views with crop, colour jitter, greyscale, blur,
    /// solarize and flip.
    Mocov3,
    /// Evaluation: one centre crop, nothing random.
    Center,
}

/// The augmentation (`[data.transform]`). METHOD.md gives stage 2's values, which are the
/// defaults; MoCo v3's (`set = "mocov3"`) differ in `scale` (0.08-1) and use the colour
/// fields; `set = "center"` uses `size` and `center_fraction` only.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TransformConfig {
    /// `"stage2"`, `"mocov3"` or `"center"`. By default, "stage2".
    pub set: TransformSet,
    /// Output side in pixels. By default, 224.
    pub size: u32,
    /// RandomResizedCrop area range. By default, [0.67, 1.0].
    pub scale: [f64; 2],
    /// RandomResizedCrop aspect-ratio range. By default, [0.75, 1.3333333333333333].
    pub ratio: [f64; 2],
    /// Horizontal flip probability. By default, 0.5.
    pub flip: f64,
    /// Whether to make masks (stage2; false: the paper's no-masking ablation). By default, true.
    pub masking: bool,
    /// Mask unit side in pixels. By default, 32.
    pub mask_unit: u32,
    /// Fraction of mask units masked. By default, 0.6.
    pub mask_ratio: f64,
    /// Colour jitter (mocov3): brightness, contrast, saturation, hue. By default,
    /// [0.4, 0.4, 0.2, 0.1].
    pub jitter: [f64; 4],
    /// Probability of the colour jitter (mocov3). By default, 0.8.
    pub jitter_p: f64,
    /// Probability of greyscale (mocov3). By default, 0.2.
    pub grayscale_p: f64,
    /// Probability of Gaussian blur for the first and second view (mocov3). By default,
    /// [1.0, 0.1].
    pub blur_p: [f64; 2],
    /// Range of the blur's sigma in output pixels (mocov3). By default, [0.1, 2.0].
    pub blur_sigma: [f64; 2],
    /// Probability of solarize for the first and second view (mocov3). By default, [0.0, 0.2].
    pub solarize_p: [f64; 2],
    /// Share of the shorter side kept by the centre crop (center). By default, 0.875.
    pub center_fraction: f64,
}

impl Default for TransformConfig {
    fn default() -> Self {
        TransformConfig {
            set: TransformSet::Stage2,
            size: 224,
            scale: [0.67, 1.0],
            ratio: [3.0 / 4.0, 4.0 / 3.0],
            flip: 0.5,
            masking: true,
            mask_unit: 32,
            mask_ratio: 0.6,
            jitter: [0.4, 0.4, 0.2, 0.1],
            jitter_p: 0.8,
            grayscale_p: 0.2,
            blur_p: [1.0, 0.1],
            blur_sigma: [0.1, 2.0],
            solarize_p: [0.0, 0.2],
            center_fraction: 0.875,
        }
    }
}

impl TransformConfig {
    /// Checks the values and builds the augmentation set.
    pub fn build(&self) -> Result<Arc<dyn Augment>> {
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
        let probabilities = [
            self.flip,
            self.mask_ratio,
            self.jitter_p,
            self.grayscale_p,
            self.blur_p[0],
            self.blur_p[1],
            self.solarize_p[0],
            self.solarize_p[1],
        ];
        if probabilities.iter().any(|p| !(0.0..=1.0).contains(p)) {
            return bad("transform probabilities and mask_ratio must be within [0, 1]".into());
        }
        let crop = RandomResizedCrop {
            size: self.size,
            scale: (self.scale[0], self.scale[1]),
            ratio: (self.ratio[0], self.ratio[1]),
        };
        let flip = RandomHorizontalFlip { p: self.flip };
        match self.set {
            TransformSet::Stage2 => {
                if self.masking
                    && (self.mask_unit == 0 || !self.size.is_multiple_of(self.mask_unit))
                {
                    return bad(format!(
                        "transform.size {} is not a multiple of transform.mask_unit {}",
                        self.size, self.mask_unit
                    ));
                }
                Ok(Arc::new(Stage2 {
                    crop,
                    flip,
                    mask: self.masking.then_some(MaskGenerator {
                        input_size: self.size,
                        unit: self.mask_unit,
                        ratio: self.mask_ratio,
                    }),
                }))
            }
            TransformSet::Mocov3 => {
                let [brightness, contrast, saturation, hue] = self.jitter;
                if self.jitter.iter().any(|j| *j < 0.0) || hue > 0.5 {
                    return bad("transform.jitter must be >= 0, with hue <= 0.5".into());
                }
                if !(0.0 < self.blur_sigma[0] && self.blur_sigma[0] <= self.blur_sigma[1]) {
                    return bad("transform.blur_sigma must satisfy 0 < lo <= hi".into());
                }
                Ok(Arc::new(TwoViews {
                    crop,
                    jitter: ColorJitter {
                        p: self.jitter_p,
                        brightness,
                        contrast,
                        saturation,
                        hue,
                    },
                    grayscale: self.grayscale_p,
                    blur: self.blur_p,
                    blur_sigma: (self.blur_sigma[0], self.blur_sigma[1]),
                    solarize: self.solarize_p,
                    flip,
                }))
            }
            TransformSet::Center => {
                if !(0.0 < self.center_fraction && self.center_fraction <= 1.0) {
                    return bad("transform.center_fraction must be within (0, 1]".into());
                }
                Ok(Arc::new(CenterCrop {
                    size: self.size,
                    fraction: self.center_fraction,
                }))
            }
        }
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
        if self.device_decode && self.transform.set == TransformSet::Mocov3 {
            return bad(
                "device_decode needs set = \"stage2\" or \"center\": the colour ops of \
                 \"mocov3\" run on decoded pixels here; set device_decode = false",
            );
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

//! Evaluation of a pre-trained encoder on frozen features from labelled shards: k-NN
//! ([`knn`]) and a linear probe ([`linear`]). Features are the CLS token or the mean patch
//! token after the final norm, from one centre crop per image.

pub mod knn;
pub mod linear;

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use candle_core::{Device, Tensor};
use pipeline::config::TransformSet;
use pipeline::{Loader, LoaderConfig, LoaderState, StoreOptions, Topology};
use serde::{Deserialize, Serialize};

use crate::checkpoint;
use crate::config::Config;
use crate::functional::l2_normalize;
use crate::models::Encoder;
use crate::models::vit::Vit;
use crate::params::ParamStore;
use crate::trainer::normalize;

/// Which token stands for an image.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Feature {
    /// The CLS token after the final norm.
    Cls,
    /// The mean of the patch tokens after the final norm.
    Mean,
}

/// The encoder to evaluate and the config that shapes it.
pub struct Subject {
    /// The encoder, frozen.
    pub encoder: Box<dyn Encoder>,
    /// Its config: `[student]` is the architecture, `[data]` the image size and loader.
    pub config: Config,
}

/// Loads the encoder to evaluate: from a mimco checkpoint (its config comes along), from
/// weights shaped by `config`'s `[student]` (an export, a MoCo v3 release, a timm state
/// dict), or, with no weights, initialised at random from `config.train.seed` (the
/// baseline). A file that does not fit the architecture is an error listing every name.
pub fn load_subject(weights: Option<&Path>, config: Option<Config>) -> anyhow::Result<Subject> {
    let device = Device::Cpu;
    let from_checkpoint = weights.and_then(|w| checkpoint::load(w, &device).ok());
    let config = match (from_checkpoint, config) {
        (_, Some(c)) => c,
        (Some((_, meta)), None) => {
            toml::from_str(&meta.config).context("the checkpoint's config")?
        }
        (None, None) => {
            bail!("pass --config: the weights carry no config to take the architecture from")
        }
    };
    let size = config.data.transform.size as usize;
    let encoder: Box<dyn Encoder> = match weights {
        Some(w) => crate::teacher::load(w, &config.student, size, &device)?,
        None => {
            let store = ParamStore::new(config.train.seed);
            Box::new(Vit::new(
                store.var_builder(&device),
                &config.student,
                size,
                false,
            )?)
        }
    };
    Ok(Subject { encoder, config })
}

/// Top-1 and top-5 accuracy, in percent.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Accuracy {
    /// Share of samples whose best class is right.
    pub top1: f64,
    /// Share of samples whose right class is among the best five.
    pub top5: f64,
}

/// Counts top-1 and top-5 hits from per-class scores.
pub struct Tally {
    top1: usize,
    top5: usize,
    samples: usize,
}

impl Accuracy {
    /// An empty count.
    pub fn tally() -> Tally {
        Tally {
            top1: 0,
            top5: 0,
            samples: 0,
        }
    }
}

impl Tally {
    /// One sample: its score for every class and its true class (ties count as hits).
    pub fn add(&mut self, scores: &[f64], label: u32) {
        let better = scores
            .iter()
            .filter(|&&v| v > scores[label as usize])
            .count();
        self.top1 += usize::from(better == 0);
        self.top5 += usize::from(better < 5);
        self.samples += 1;
    }

    /// The accuracies, in percent.
    pub fn finish(&self) -> Accuracy {
        let n = self.samples.max(1) as f64;
        Accuracy {
            top1: 100.0 * self.top1 as f64 / n,
            top5: 100.0 * self.top5 as f64 / n,
        }
    }
}

/// Features of one split.
pub struct Features {
    /// Row-major, `dim` wide.
    pub values: Vec<f32>,
    /// One class per row.
    pub labels: Vec<u32>,
    /// Width of a row.
    pub dim: usize,
    /// The split's class names.
    pub classes: Vec<String>,
}

/// Encodes every sample of the split at `location` once, or the first `limit` of this
/// loader's (seeded) order, from a centre crop of `data.transform.size` with
/// `data.transform.center_fraction`; L2-normalised when `normalise`.
pub fn extract(
    encoder: &dyn Encoder,
    data: &LoaderConfig,
    location: &str,
    store: &StoreOptions,
    feature: Feature,
    normalise: bool,
    limit: Option<usize>,
) -> anyhow::Result<Features> {
    let mut data = data.clone();
    data.transform.set = TransformSet::Center;
    data.drop_last = false;
    let loader = Loader::open(location, store, Topology::default(), data, None)
        .with_context(|| format!("opening {location}"))?;
    let classes = loader.manifest().classes.clone();
    let (mut values, mut labels, mut dim) = (Vec::new(), Vec::new(), 0);
    for batch in loader.epoch(LoaderState::default())? {
        let batch = batch.with_context(|| format!("reading {location}"))?;
        let s = batch.size as usize;
        let x = normalize(&Tensor::from_slice(
            batch.images(),
            (batch.len(), 3, s, s),
            encoder.device(),
        )?)?;
        let out = encoder.forward(&x, None)?;
        let mut f = match (feature, out.cls) {
            (Feature::Cls, Some(cls)) => cls,
            (Feature::Cls, None) => bail!("this encoder has no CLS token: use --feature mean"),
            (Feature::Mean, _) => out.patches.mean(1)?,
        };
        if normalise {
            f = l2_normalize(&f)?;
        }
        dim = f.dim(1)?;
        values.extend(f.flatten_all()?.to_vec1::<f32>()?);
        labels.extend_from_slice(&batch.labels);
        if let Some(limit) = limit.filter(|&l| labels.len() >= l) {
            labels.truncate(limit);
            values.truncate(limit * dim);
            break;
        }
    }
    if labels.is_empty() {
        bail!("{location} gave no samples");
    }
    Ok(Features {
        values,
        labels,
        dim,
        classes,
    })
}

/// One evaluation's result: a line of the results file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EvalResult {
    /// `"knn"` or `"linear"`.
    pub eval: String,
    /// A name for the run being evaluated (`--label`).
    pub label: String,
    /// The weights evaluated, or `random-init`.
    pub weights: String,
    /// CLS or mean patch token.
    pub feature: Feature,
    /// Top-1 accuracy, percent.
    pub top1: f64,
    /// Top-5 accuracy, percent.
    pub top5: f64,
    /// Training samples.
    pub train_samples: usize,
    /// Validation samples.
    pub val_samples: usize,
    /// The settings (k and T for k-NN; epochs, batch, lr for the probe).
    pub settings: String,
}

impl EvalResult {
    /// The one-line summary printed after an evaluation.
    pub fn line(&self) -> String {
        format!(
            "{} {}: top-1 {:.2}% top-5 {:.2}% ({} features, {}; {} train / {} val; {})",
            self.eval,
            self.label,
            self.top1,
            self.top5,
            match self.feature {
                Feature::Cls => "CLS",
                Feature::Mean => "mean-patch",
            },
            self.settings,
            self.train_samples,
            self.val_samples,
            self.weights
        )
    }

    /// Appends this result to `path` as a JSON line.
    pub fn append_to(&self, path: &PathBuf) -> anyhow::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        writeln!(f, "{}", serde_json::to_string(self)?)?;
        Ok(())
    }
}

/// Checks that two splits share their class list.
pub fn same_classes(train: &Features, val: &Features) -> anyhow::Result<()> {
    if train.classes != val.classes {
        bail!(
            "the train and val splits have different class lists ({} and {} classes): pack val with train's classes",
            train.classes.len(),
            val.classes.len()
        );
    }
    Ok(())
}

/// A k-NN check of the encoder being trained, every few steps, on labelled subsets.
#[derive(Clone, Debug)]
pub struct KnnMonitor {
    /// Labelled shards the neighbours come from.
    pub train: String,
    /// Labelled shards that are classified.
    pub val: String,
    /// Samples taken from each split.
    pub samples: usize,
    /// Object-store settings for both.
    pub store: StoreOptions,
}

impl KnnMonitor {
    /// k-NN top-1 (k = 20, T = 0.07, mean patch token) of `encoder` on the subsets.
    pub fn top1(&self, encoder: &dyn Encoder, data: &LoaderConfig) -> anyhow::Result<f64> {
        let get = |location: &str| {
            extract(
                encoder,
                data,
                location,
                &self.store,
                Feature::Mean,
                true,
                Some(self.samples),
            )
        };
        let (train, val) = (get(&self.train)?, get(&self.val)?);
        same_classes(&train, &val)?;
        let a = knn::knn(&train, &val, 20, 0.07)?;
        Ok(a.top1)
    }
}

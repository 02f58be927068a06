//! Checkpoints: one safetensors file holding every tensor of the run (weights, p3, queues,
//! AdamW moments) with the rest (step, pipeline state, queue pointers, config) as JSON in
//! its metadata. Written to a temporary file, synced, then renamed: a checkpoint on disk
//! is always complete.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File};
use std::io::Write;
use std::path::Path;

use anyhow::{Context, bail};
use candle_core::{Device, Tensor};
use pipeline::LoaderState;
use serde::{Deserialize, Serialize};

/// Bumped when the layout changes.
pub const FORMAT: u32 = 1;
const META_KEY: &str = "mimco";

/// Everything in a checkpoint that is not a tensor.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Meta {
    /// [`FORMAT`] of the writer.
    pub format: u32,
    /// Optimiser steps taken.
    pub step: u64,
    /// Where the data stream stands (after the last batch of `step`).
    pub loader: LoaderState,
    /// The method's counters (MimCo: next write position of each queue).
    pub counters: BTreeMap<String, usize>,
    /// The config the run was started with, as TOML.
    pub config: String,
    /// The training data's [`pipeline::format::Manifest::fingerprint`], which `mimco
    /// train --resume` checks (absent in checkpoints written without it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<String>,
}

/// Writes `tensors` and `meta` to `path` atomically (temporary file, fsync, rename).
pub fn save(path: &Path, tensors: &BTreeMap<String, Tensor>, meta: &Meta) -> anyhow::Result<()> {
    let info = HashMap::from([(META_KEY.to_string(), serde_json::to_string(meta)?)]);
    let bytes = safetensors::serialize(tensors.iter().map(|(k, v)| (k.as_str(), v)), Some(info))
        .context("serialising the checkpoint")?;
    write_atomically(path, &bytes)
}

/// Writes `bytes` to `path` through `path.partial`, synced, then renamed over `path`.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let partial = path.with_extension("partial");
    let result = (|| -> std::io::Result<()> {
        let mut f = File::create(&partial)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&partial, path)?;
        File::open(dir)?.sync_all()
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(&partial);
        return Err(e).with_context(|| {
            format!(
                "writing {} (the previous file, if any, is intact)",
                path.display()
            )
        });
    }
    Ok(())
}

/// Reads a checkpoint written by [`save`].
pub fn load(path: &Path, device: &Device) -> anyhow::Result<(HashMap<String, Tensor>, Meta)> {
    let bytes = fs::read(path).with_context(|| format!("reading checkpoint {}", path.display()))?;
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
        .with_context(|| format!("{} is not a safetensors file", path.display()))?;
    let Some(json) = header.metadata().as_ref().and_then(|m| m.get(META_KEY)) else {
        bail!(
            "{} is a safetensors file but not a mimco checkpoint (no training state)",
            path.display()
        );
    };
    let meta: Meta = serde_json::from_str(json)
        .with_context(|| format!("{}: bad training state", path.display()))?;
    if meta.format != FORMAT {
        bail!(
            "{} has checkpoint format {}, this mimco reads {FORMAT}",
            path.display(),
            meta.format
        );
    }
    let tensors = candle_core::safetensors::load_buffer(&bytes, device)?;
    Ok((tensors, meta))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_is_bit_exact_and_atomic() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ck/last.safetensors");
        let dev = Device::Cpu;
        let t = Tensor::new(&[1.5f32, -0.0, f32::MIN_POSITIVE, 3.25e-9], &dev).unwrap();
        let tensors = BTreeMap::from([("a".to_string(), t.clone())]);
        let meta = Meta {
            format: FORMAT,
            step: 7,
            loader: LoaderState {
                epoch: 2,
                batches: 3,
                plan_cursor: 12,
            },
            counters: BTreeMap::from([("queue.patch".to_string(), 4)]),
            config: "x = 1".into(),
            data: Some("0f".repeat(32)),
        };
        save(&path, &tensors, &meta).unwrap();
        assert!(!path.with_extension("partial").exists());
        let (back, meta_back) = load(&path, &dev).unwrap();
        assert_eq!(meta_back, meta);
        let bits = |t: &Tensor| {
            t.to_vec1::<f32>()
                .unwrap()
                .iter()
                .map(|v| v.to_bits())
                .collect::<Vec<_>>()
        };
        assert_eq!(bits(&back["a"]), bits(&t));
        // A plain safetensors file is refused with a clear message.
        let plain = dir.path().join("plain.safetensors");
        candle_core::safetensors::save(&HashMap::from([("a", t)]), &plain).unwrap();
        let err = load(&plain, &dev).unwrap_err().to_string();
        assert!(err.contains("not a mimco checkpoint"), "{err}");
    }
}

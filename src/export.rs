//! `mimco export`: the student encoder alone, under timm's names, for
//! `timm.create_model("vit_small_patch16_224", num_classes=0).load_state_dict(...)`.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use anyhow::Context;
use candle_core::{Device, Tensor};

use crate::checkpoint;
use crate::config::Config;
use crate::models::vit::{PosEmbed, sincos_position_embedding};

/// The student's weights from checkpoint tensors, renamed for timm: `student.` dropped,
/// the mask token left out, and the sin-cos position table written out as `pos_embed`
/// (timm keeps it as a parameter).
pub fn student_weights(
    tensors: &HashMap<String, Tensor>,
    config: &Config,
) -> anyhow::Result<BTreeMap<String, Tensor>> {
    let mut out: BTreeMap<String, Tensor> = tensors
        .iter()
        .filter_map(|(k, v)| {
            k.strip_prefix("student.")
                .map(|k| (k.to_string(), v.clone()))
        })
        .filter(|(k, _)| k != "mask_token")
        .collect();
    if out.is_empty() {
        anyhow::bail!("the checkpoint holds no student weights");
    }
    if config.student.pos_embed == PosEmbed::Sincos {
        let grid = config.data.transform.size as usize / config.student.patch_size;
        out.insert(
            "pos_embed".into(),
            sincos_position_embedding(grid, config.student.dim, &Device::Cpu)?,
        );
    }
    Ok(out)
}

/// Reads the checkpoint at `from` and writes the student to `to` (safetensors).
pub fn export(from: &Path, to: &Path) -> anyhow::Result<usize> {
    let (tensors, meta) = checkpoint::load(from, &Device::Cpu)?;
    let config: Config = toml::from_str(&meta.config).context("the checkpoint's config")?;
    let weights = student_weights(&tensors, &config)?;
    let bytes = safetensors::serialize(weights.iter().map(|(k, v)| (k.as_str(), v)), None)?;
    checkpoint::write_atomically(to, &bytes)?;
    Ok(weights.len())
}

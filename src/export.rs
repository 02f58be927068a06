//! `mimco export`: the pre-trained encoder alone (MimCo's or SimMIM's student, MoCo v3's
//! base encoder), under timm's names, for
//! `timm.create_model("vit_small_patch16_224", num_classes=0).load_state_dict(...)`.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use anyhow::Context;
use candle_core::{Device, Tensor};

use crate::checkpoint;
use crate::config::Config;
use crate::models::vit::{PosEmbed, sincos_position_embedding};

/// The pre-trained encoder's weights from checkpoint tensors, renamed for timm: its prefix
/// (`student.`, `base_encoder.`) dropped, the mask token and MoCo v3's projector (`head.`)
/// left out, and the sin-cos position table written out as `pos_embed` (timm keeps it as a
/// parameter).
pub fn encoder_weights(
    tensors: &HashMap<String, Tensor>,
    config: &Config,
) -> anyhow::Result<BTreeMap<String, Tensor>> {
    let prefix = config.method.encoder_prefix();
    let mut out: BTreeMap<String, Tensor> = tensors
        .iter()
        .filter_map(|(k, v)| k.strip_prefix(prefix).map(|k| (k.to_string(), v.clone())))
        .filter(|(k, _)| k != "mask_token" && !k.starts_with("head."))
        .collect();
    if out.is_empty() {
        anyhow::bail!("the checkpoint holds no {prefix}* weights");
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

/// Reads the checkpoint at `from` and writes its pre-trained encoder to `to` (safetensors).
pub fn export(from: &Path, to: &Path) -> anyhow::Result<usize> {
    let (tensors, meta) = checkpoint::load(from, &Device::Cpu)?;
    let config: Config = toml::from_str(&meta.config).context("the checkpoint's config")?;
    let weights = encoder_weights(&tensors, &config)?;
    let bytes = safetensors::serialize(weights.iter().map(|(k, v)| (k.as_str(), v)), None)?;
    checkpoint::write_atomically(to, &bytes)?;
    Ok(weights.len())
}

//! The frozen teacher f': loaded from safetensors or a PyTorch checkpoint (MoCo v3's
//! `.pth.tar` with `module.base_encoder.*` keys, a timm state dict, or a MimCo export),
//! or random for smoke tests behind an explicit flag.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, bail};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use crate::models::Encoder;
use crate::models::vit::{PosEmbed, Vit, VitConfig};
use crate::params::ParamStore;

/// Key prefixes stripped from checkpoint names, first match wins: MoCo v3's base encoder
/// in a release (its momentum encoder and predictor are ignored), DDP's `module.`, the
/// base encoder of a `mimco` MoCo v3 run, the student of a MimCo or SimMIM run.
const PREFIXES: [&str; 4] = [
    "module.base_encoder.",
    "module.",
    "base_encoder.",
    "student.",
];

/// Reads every tensor of a safetensors file or a PyTorch zip checkpoint (looking inside
/// `state_dict` or `model` when the file holds a dict around the weights).
pub fn read_tensors(path: &Path) -> anyhow::Result<HashMap<String, Tensor>> {
    let is_safetensors = path.extension().is_some_and(|e| e == "safetensors");
    if is_safetensors {
        return candle_core::safetensors::load(path, &Device::Cpu)
            .with_context(|| format!("reading {} as safetensors", path.display()));
    }
    for key in [Some("state_dict"), Some("model"), None] {
        match candle_core::pickle::read_all_with_key(path, key) {
            Ok(tensors) if !tensors.is_empty() => return Ok(tensors.into_iter().collect()),
            Ok(_) => continue,
            Err(e) if key.is_some() => {
                tracing::debug!("{}: no {key:?} dict: {e}", path.display());
                continue;
            }
            Err(e) => {
                return Err(anyhow::Error::new(e).context(format!(
                    "reading {} as a PyTorch checkpoint (a zip .pth/.pth.tar; name safetensors files *.safetensors)",
                    path.display()
                )));
            }
        }
    }
    bail!("{} holds no tensors", path.display())
}

/// Loads a ViT teacher of shape `config` for `image_size` inputs. Every expected weight
/// must be there with its shape; anything else but a classifier or projection `head.*`
/// is an error too. The error lists every name that does not match.
pub fn load(
    path: &Path,
    config: &VitConfig,
    image_size: usize,
    device: &Device,
) -> anyhow::Result<Box<dyn Encoder>> {
    let raw = read_tensors(path)?;
    let prefix = PREFIXES
        .iter()
        .find(|p| raw.keys().any(|k| k.starts_with(*p)))
        .copied()
        .unwrap_or("");
    let tensors: HashMap<String, Tensor> = raw
        .into_iter()
        .filter_map(|(k, v)| k.strip_prefix(prefix).map(|k| (k.to_string(), v)))
        .filter(|(k, _)| !k.starts_with("head.") && k != "mask_token")
        .collect();
    // The names and shapes a fresh model of this config has.
    let reference = ParamStore::new(0);
    Vit::new(
        reference.var_builder(&Device::Cpu),
        config,
        image_size,
        false,
    )?;
    let expected = reference.tensors();
    let mut problems = Vec::new();
    for (name, t) in &expected {
        match tensors.get(name) {
            None => problems.push(format!("missing {name} {:?}", t.dims())),
            Some(got) if got.dims() != t.dims() => problems.push(format!(
                "{name}: shape {:?} in the file, {:?} expected",
                got.dims(),
                t.dims()
            )),
            Some(_) => {}
        }
    }
    let grid = image_size / config.patch_size;
    let pos_shape = [1, 1 + grid * grid, config.dim];
    for (name, t) in &tensors {
        if expected.contains_key(name) {
            continue;
        }
        match name.as_str() {
            "pos_embed" if config.pos_embed == PosEmbed::Sincos && t.dims() == pos_shape => {}
            "pos_embed" => problems.push(format!(
                "pos_embed: shape {:?} in the file, {pos_shape:?} expected",
                t.dims()
            )),
            _ => problems.push(format!("unexpected {name} {:?}", t.dims())),
        }
    }
    if !problems.is_empty() {
        problems.sort();
        bail!(
            "{} does not fit [teacher] (patch {}, dim {}, depth {}, heads {}, {:?} positions) at {image_size} px{}:\n  {}\nFix [teacher] in the config, or pass the matching checkpoint.",
            path.display(),
            config.patch_size,
            config.dim,
            config.depth,
            config.heads,
            config.pos_embed,
            if prefix.is_empty() {
                String::new()
            } else {
                format!(" (keys under {prefix})")
            },
            problems.join("\n  ")
        );
    }
    let vb = VarBuilder::from_tensors(tensors, DType::F32, device);
    Ok(Box::new(Vit::new(vb, config, image_size, false)?))
}

/// A teacher with random weights drawn from `seed`, detached from any optimiser. Only
/// for smoke tests and benchmarks: it teaches nothing.
pub fn random(
    config: &VitConfig,
    image_size: usize,
    seed: u64,
    device: &Device,
) -> anyhow::Result<Box<dyn Encoder>> {
    let store = ParamStore::new(seed ^ 0x7eac4e5);
    Vit::new(store.var_builder(device), config, image_size, false)?;
    let tensors = store
        .tensors()
        .into_iter()
        .map(|(k, v)| (k, v.detach()))
        .collect();
    let vb = VarBuilder::from_tensors(tensors, DType::F32, device);
    Ok(Box::new(Vit::new(vb, config, image_size, false)?))
}

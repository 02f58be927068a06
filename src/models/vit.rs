//! Vision Transformer (Dosovitskiy et al., "An Image is Worth 16x16 Words",
//! <https://arxiv.org/abs/2010.11929>) as MoCo v3 and timm build it, with SimMIM's mask
//! token for the student.
//!
//! Parameter names are timm's (`patch_embed.proj`, `blocks.{i}.attn.qkv`, `norm`, ...),
//! so MoCo v3 and timm checkpoints load without a rename table and exported students load
//! into `timm.create_model(...)`.

use candle_core::{DType, Device, IndexOp, Result, Tensor};
use candle_nn::{Init, VarBuilder};
use serde::{Deserialize, Serialize};

use super::blocks::{self, Block, Norm};
use super::{Encoder, Features};
use crate::functional::{self, Act};

/// Position embedding of a ViT.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PosEmbed {
    /// Fixed 2D sin-cos (MoCo v3), not trained.
    Sincos,
    /// Learned (timm's default), initialised N(0, 0.02).
    Learned,
}

/// Shape of a ViT (`[student]` / `[teacher]` in a config file).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VitConfig {
    /// Patch side in pixels. ViT-S/16 and ViT-B/16: 16.
    pub patch_size: usize,
    /// Token width. ViT-S: 384, ViT-B: 768.
    pub dim: usize,
    /// Number of blocks. ViT-S/B: 12.
    pub depth: usize,
    /// Attention heads. ViT-S: 6 (MoCo v3's own ViT-S: 12), ViT-B: 12.
    pub heads: usize,
    /// MLP hidden width as a multiple of `dim`. 4.
    pub mlp_ratio: f64,
    /// `"sincos"` (MoCo v3) or `"learned"` (timm).
    pub pos_embed: PosEmbed,
    /// LayerNorm epsilon. 1e-6.
    pub ln_eps: f64,
}

impl VitConfig {
    /// ViT-S/16 (width 384, 12 blocks, 6 heads), sin-cos positions.
    pub fn vit_small() -> VitConfig {
        VitConfig {
            patch_size: 16,
            dim: 384,
            depth: 12,
            heads: 6,
            mlp_ratio: 4.0,
            pos_embed: PosEmbed::Sincos,
            ln_eps: 1e-6,
        }
    }

    /// ViT-B/16 (width 768, 12 blocks, 12 heads), sin-cos positions.
    pub fn vit_base() -> VitConfig {
        VitConfig {
            dim: 768,
            heads: 12,
            ..VitConfig::vit_small()
        }
    }

    /// A tiny ViT for tests and CPU demos (width 64, 2 blocks, 2 heads).
    pub fn vit_tiny_test() -> VitConfig {
        VitConfig {
            dim: 64,
            depth: 2,
            heads: 2,
            ..VitConfig::vit_small()
        }
    }

    /// Checks the shape; `image_size` must be a multiple of the patch size.
    pub fn check(&self, image_size: usize) -> std::result::Result<(), String> {
        if self.patch_size == 0 || self.dim == 0 || self.depth == 0 || self.heads == 0 {
            return Err("patch_size, dim, depth and heads must be at least 1".into());
        }
        if !self.dim.is_multiple_of(self.heads) {
            return Err(format!(
                "dim {} is not a multiple of heads {}",
                self.dim, self.heads
            ));
        }
        if self.pos_embed == PosEmbed::Sincos && !self.dim.is_multiple_of(4) {
            return Err(format!(
                "sin-cos positions need dim divisible by 4, got {}",
                self.dim
            ));
        }
        if !image_size.is_multiple_of(self.patch_size) {
            return Err(format!(
                "image size {image_size} is not a multiple of patch_size {}",
                self.patch_size
            ));
        }
        if self.mlp_ratio <= 0.0 || self.ln_eps <= 0.0 {
            return Err("mlp_ratio and ln_eps must be positive".into());
        }
        Ok(())
    }
}

/// MoCo v3's fixed 2D sin-cos table, `(1, 1 + g*g, dim)`, with a zero row for CLS.
/// Token `p` (row-major) uses its row `p / g` in the first half of the channels and its
/// column `p % g` in the second, as `build_2d_sincos_position_embedding` does.
pub fn sincos_position_embedding(grid: usize, dim: usize, device: &Device) -> Result<Tensor> {
    let quarter = dim / 4;
    let mut table = vec![0f32; (1 + grid * grid) * dim];
    for p in 0..grid * grid {
        let row = &mut table[(1 + p) * dim..(2 + p) * dim];
        for (half, coord) in [(p / grid) as f64, (p % grid) as f64]
            .into_iter()
            .enumerate()
        {
            for d in 0..quarter {
                let omega = 1.0 / 10000f64.powf(d as f64 / quarter as f64);
                row[half * 2 * quarter + d] = (coord * omega).sin() as f32;
                row[half * 2 * quarter + quarter + d] = (coord * omega).cos() as f32;
            }
        }
    }
    Tensor::from_vec(table, (1, 1 + grid * grid, dim), device)
}

/// A ViT encoder; the student also has a `mask_token`.
#[derive(Clone, Debug)]
pub struct Vit {
    config: VitConfig,
    grid: usize,
    /// `patch_embed.proj` as a `(dim, 3*p*p)` matrix: the stride-p convolution as a matmul.
    patch_weight: Tensor,
    patch_bias: Tensor,
    cls_token: Tensor,
    pos_embed: Tensor,
    mask_token: Option<Tensor>,
    blocks: Vec<Block>,
    norm: Norm,
    /// Dtype of the matmuls and attention (the residual stream and the output are f32).
    compute: DType,
}

impl Vit {
    /// Builds a ViT for `image_size` inputs under `vb`; `with_mask_token` for the student.
    /// A sin-cos position table is taken from `vb` when it holds one (checkpoints carry it)
    /// and computed otherwise.
    pub fn new(
        vb: VarBuilder,
        config: &VitConfig,
        image_size: usize,
        with_mask_token: bool,
    ) -> Result<Vit> {
        config.check(image_size).map_err(candle_core::Error::msg)?;
        let (p, dim) = (config.patch_size, config.dim);
        let grid = image_size / p;
        let small = Init::Randn {
            mean: 0.0,
            stdev: 0.02,
        };
        let pe = vb.pp("patch_embed.proj");
        let patch_weight = pe.get_with_hints((dim, 3, p, p), "weight", small)?;
        let pos_shape = (1, 1 + grid * grid, dim);
        let pos_embed = match config.pos_embed {
            PosEmbed::Learned => vb.get_with_hints(pos_shape, "pos_embed", small)?,
            PosEmbed::Sincos if vb.contains_tensor("pos_embed") => {
                vb.get(pos_shape, "pos_embed")?
            }
            PosEmbed::Sincos => sincos_position_embedding(grid, dim, vb.device())?,
        };
        let mask_token = match with_mask_token {
            true => Some(vb.get_with_hints((1, 1, dim), "mask_token", small)?),
            false => None,
        };
        let tiny = Init::Randn {
            mean: 0.0,
            stdev: 1e-6,
        };
        Ok(Vit {
            config: config.clone(),
            grid,
            patch_weight: patch_weight.reshape((dim, 3 * p * p))?,
            patch_bias: pe.get_with_hints(dim, "bias", Init::Const(0.0))?,
            cls_token: vb.get_with_hints((1, 1, dim), "cls_token", tiny)?,
            pos_embed,
            mask_token,
            blocks: (0..config.depth)
                .map(|i| Block::new(vb.pp(format!("blocks.{i}")), config))
                .collect::<Result<_>>()?,
            norm: Norm::new(vb.pp("norm"), dim, config.ln_eps)?,
            compute: DType::F32,
        })
    }

    /// The position table in use, `(1, 1 + N, dim)` (exported with the weights).
    pub fn pos_embed(&self) -> &Tensor {
        &self.pos_embed
    }
}

/// `(B, 3, H, W)` -> `(B, N, 3*p*p)`: each row one `p` x `p` patch in (channel, row, column)
/// order, the layout of the stride-p convolution's weight (and of SimMIM's PixelShuffle).
pub fn patchify(images: &Tensor, p: usize) -> Result<Tensor> {
    let (b, c, h, w) = images.dims4()?;
    let (gh, gw) = (h / p, w / p);
    images
        .reshape((b, c, gh, p, gw, p))?
        .permute((0, 2, 4, 1, 3, 5))?
        .reshape((b, gh * gw, c * p * p))
}

impl Encoder for Vit {
    fn dim(&self) -> usize {
        self.config.dim
    }

    fn grid(&self, image_size: usize) -> usize {
        image_size / self.config.patch_size
    }

    fn set_compute(&mut self, dtype: DType) {
        self.compute = dtype;
    }

    fn freeze_in(&mut self, dtype: DType) -> Result<()> {
        self.compute = dtype;
        self.patch_weight = self.patch_weight.detach().to_dtype(dtype)?;
        self.blocks = self
            .blocks
            .iter()
            .map(|b| b.detach_in(dtype))
            .collect::<Result<_>>()?;
        Ok(())
    }

    fn device(&self) -> &Device {
        self.cls_token.device()
    }

    fn forward(&self, images: &Tensor, mask: Option<&Tensor>) -> Result<Features> {
        let (b, _, h, w) = images.dims4()?;
        let expected = self.grid * self.config.patch_size;
        if h != expected || w != expected {
            candle_core::bail!("images are {h}x{w}, this ViT was built for {expected}x{expected}");
        }
        let c = self.compute;
        let patches = functional::patch_rows(images, self.config.patch_size, c)?;
        let n = self.grid * self.grid;
        let x = functional::linear(
            &patches,
            &self.patch_weight,
            &self.patch_bias,
            Act::Identity,
            DType::F32,
        )?
        .reshape((b, n, self.config.dim))?;
        // SimMIM's mask token where masked; the CLS token; positions.
        let masked = match (mask, &self.mask_token) {
            (Some(mask), Some(token)) => Some((mask, token)),
            _ => None,
        };
        let x = functional::tokens(&x, masked, &self.cls_token, &self.pos_embed)?;
        let (tokens, dim) = (x.dim(1)?, self.config.dim);
        let x = x.reshape((b * tokens, dim))?;
        let x = blocks::forward(&self.blocks, &x, tokens, c)?;
        let x = self
            .norm
            .forward_to(&x, DType::F32)?
            .reshape((b, tokens, dim))?;
        Ok(Features {
            patches: x.narrow(1, 1, self.grid * self.grid)?,
            cls: Some(x.i((.., 0))?),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A frozen encoder (the teacher) keeps its matmul weights in the compute dtype and
    /// gives the same features, bit for bit, as one that casts them in every forward.
    #[test]
    fn a_frozen_encoder_holds_cast_weights_and_gives_the_same_features() {
        let config = VitConfig::vit_tiny_test();
        let dev = Device::Cpu;
        let images = Tensor::randn(0f32, 1.0, (2, 3, 32, 32), &dev).unwrap();
        for dtype in [DType::F32, DType::BF16] {
            // Two encoders with the same weights, drawn from one seed.
            let build = || {
                let store = crate::params::ParamStore::new(7);
                Vit::new(store.var_builder(&dev), &config, 32, false).unwrap()
            };
            let mut casting = build();
            casting.set_compute(dtype);
            let mut frozen = build();
            frozen.freeze_in(dtype).unwrap();
            assert_eq!(frozen.patch_weight.dtype(), dtype);
            assert!(
                frozen
                    .blocks
                    .iter()
                    .all(|b| b.weights_dtype() == Some(dtype))
            );
            let a = casting.forward(&images, None).unwrap().patches;
            let b = frozen.forward(&images, None).unwrap().patches;
            assert_eq!(
                a.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                b.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                "{dtype:?}"
            );
        }
    }
}

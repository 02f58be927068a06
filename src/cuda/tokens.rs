//! The ViT's stem after the patch embedding as one node: SimMIM's mask blend, the CLS
//! token's concatenation and the position add in one pass forward; in the backward one
//! pass for the patches' gradient and two column sums (the mask token's, the position
//! table's). Composed, they were broadcast multiplies, sums and additions of `(B, N, D)`
//! tensors in both directions (`bmul_f32` and `fast_sum_f32` together 3.1 ms of a ViT-S/16
//! step on an H200, `benches/results/2026-11-27-h200-fused/final`).

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaStorageSlice, WrapErr};
use candle_core::{
    CpuStorage, CudaStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor, bail,
};

use super::bias::ColumnSum;
use super::*;

/// `cat(cls, x (1 - mask) + token mask, dim 1) + pos`, `(B, 1 + N, D)`, for f32 patch
/// embeddings `x` `(B, N, D)`, an f32 `mask` `(B, N)` of 0 and 1 (1: masked), `token` and
/// `cls` of `D` elements and `pos` of `(1 + N) D`.
pub fn tokens(
    x: &Tensor,
    mask: &Tensor,
    token: &Tensor,
    cls: &Tensor,
    pos: &Tensor,
) -> Result<Tensor> {
    let (b, n, d) = x.dims3()?;
    let all_f32 = [x, mask, token, cls, pos]
        .iter()
        .all(|t| t.dtype() == DType::F32);
    if !all_f32
        || mask.dims() != [b, n]
        || token.elem_count() != d
        || cls.elem_count() != d
        || pos.elem_count() != (1 + n) * d
    {
        bail!(
            "tokens: f32 x (B, N, D), mask (B, N), token and cls (D), pos (1 + N, D); got {x:?}, {mask:?}, {token:?}, {cls:?}, {pos:?}"
        );
    }
    // The node's third input: the three parameters joined, so that the gradient the
    // backward returns for it reaches each of them through Candle's graph.
    let params = Tensor::cat(
        &[token.flatten_all()?, cls.flatten_all()?, pos.flatten_all()?],
        0,
    )?;
    x.contiguous()?
        .apply_op3(&mask.contiguous()?, &params, Tokens { n, d })
}

/// Threads per block for rows of `d` elements.
fn row_threads(d: usize) -> u32 {
    (d.div_ceil(32) * 32).clamp(32, 256) as u32
}

struct Tokens {
    n: usize,
    d: usize,
}

impl CustomOp3 for Tokens {
    fn name(&self) -> &'static str {
        "mimco-tokens"
    }

    cuda_only!(3);

    fn cuda_fwd(
        &self,
        xs: &CudaStorage,
        xl: &Layout,
        ms: &CudaStorage,
        ml: &Layout,
        ps: &CudaStorage,
        pl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let dev = xs.device();
        let (x, m, p) = (
            contiguous::<f32>(xs, xl, "x")?,
            contiguous::<f32>(ms, ml, "mask")?,
            contiguous::<f32>(ps, pl, "params")?,
        );
        let b = xl.dims()[0];
        let rows = b * (self.n + 1);
        let out = unsafe { dev.alloc::<f32>(rows * self.d)? };
        let f = func(dev, "tokens_fwd_f32")?;
        let (n_i, d_i) = (self.n as i32, self.d as i32);
        let stream = dev.cuda_stream();
        let mut l = stream.launch_builder(&f);
        l.arg(&x).arg(&m).arg(&p).arg(&out).arg(&n_i).arg(&d_i);
        let cfg = LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (row_threads(self.d), 1, 1),
            shared_mem_bytes: 0,
        };
        unsafe { l.launch(cfg) }.w()?;
        Ok((
            wrap(CudaStorageSlice::F32(out), dev),
            Shape::from((b, self.n + 1, self.d)),
        ))
    }

    fn bwd(
        &self,
        x: &Tensor,
        mask: &Tensor,
        _params: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = grad.to_dtype(DType::F32)?.contiguous()?;
        let b = x.dim(0)?;
        let (n, d) = (self.n, self.d);
        let masked = |of| grad.apply_op2_no_bwd(mask, &TokensGrad { of, n, d });
        let (dx, dtoken) = (masked(Masked::Patches)?, masked(Masked::Token)?);
        // pos is added to every image: its gradient sums over the batch; the CLS token's
        // is the first row of that.
        let dpos = grad
            .reshape((b, (self.n + 1) * self.d))?
            .apply_op1_no_bwd(&ColumnSum)?;
        let dcls = dpos.narrow(0, 0, self.d)?;
        Ok((
            Some(dx),
            None,
            Some(Tensor::cat(&[&dtoken, &dcls, &dpos], 0)?),
        ))
    }
}

/// The gradients of [`Tokens`] that need the mask, from `(dy, mask)`.
#[derive(Clone, Copy)]
enum Masked {
    /// The patches' `(B, N, D)`.
    Patches,
    /// The mask token's `(D)`.
    Token,
}

struct TokensGrad {
    of: Masked,
    n: usize,
    d: usize,
}

impl CustomOp2 for TokensGrad {
    fn name(&self) -> &'static str {
        match self.of {
            Masked::Patches => "mimco-tokens-dx",
            Masked::Token => "mimco-tokens-dtoken",
        }
    }

    cuda_only!(2);

    fn cuda_fwd(
        &self,
        gs: &CudaStorage,
        gl: &Layout,
        ms: &CudaStorage,
        ml: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let dev = gs.device();
        let (g, m) = (
            contiguous::<f32>(gs, gl, "gradient")?,
            contiguous::<f32>(ms, ml, "mask")?,
        );
        let b = gl.dims()[0];
        let patches = b * self.n;
        let (patches_i, n_i, d_i) = (patches as i32, self.n as i32, self.d as i32);
        let stream = dev.cuda_stream();
        match self.of {
            Masked::Patches => {
                let dx = unsafe { dev.alloc::<f32>(patches * self.d)? };
                let f = func(dev, "tokens_bwd_f32")?;
                let mut l = stream.launch_builder(&f);
                l.arg(&g).arg(&m).arg(&dx).arg(&n_i).arg(&d_i);
                let cfg = LaunchConfig {
                    grid_dim: (patches as u32, 1, 1),
                    block_dim: (row_threads(self.d), 1, 1),
                    shared_mem_bytes: 0,
                };
                unsafe { l.launch(cfg) }.w()?;
                Ok((
                    wrap(CudaStorageSlice::F32(dx), dev),
                    Shape::from((b, self.n, self.d)),
                ))
            }
            Masked::Token => {
                let mut out = dev.alloc_zeros::<f32>(self.d)?;
                let f = func(dev, "tokens_token_grad_f32")?;
                let mut l = stream.launch_builder(&f);
                l.arg(&g)
                    .arg(&m)
                    .arg(&mut out)
                    .arg(&patches_i)
                    .arg(&n_i)
                    .arg(&d_i);
                let cfg = LaunchConfig {
                    grid_dim: (
                        (self.d as u32).div_ceil(128),
                        (patches as u32).div_ceil(64).clamp(1, 256),
                        1,
                    ),
                    block_dim: (128, 1, 1),
                    shared_mem_bytes: 0,
                };
                unsafe { l.launch(cfg) }.w()?;
                Ok((wrap(CudaStorageSlice::F32(out), dev), Shape::from(self.d)))
            }
        }
    }
}

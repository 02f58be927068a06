//! AdamW: one launch per parameter; the gradients' squared norm for clipping, one launch
//! per gradient into one accumulator read back once.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaStorageSlice, WrapErr};
use candle_core::{
    CpuStorage, CudaStorage, CustomOp3, DType, InplaceOp2, Layout, Result, Shape, Tensor, bail,
};

use super::*;

/// One AdamW update of parameter `p` (f32) from gradient `g` (times `grad_scale`) and the
/// moments `state` = `(m, v)` stacked, `(2, *p.shape)`. Returns `(p', m', v')` stacked,
/// `(3, *p.shape)`.
#[allow(clippy::too_many_arguments)]
pub fn adamw(p: &Tensor, g: &Tensor, state: &Tensor, step: AdamWStep) -> Result<Tensor> {
    p.contiguous()?
        .apply_op3_no_bwd(&g.contiguous()?, &state.contiguous()?, &step)
}

/// The scalars of one AdamW update (see `kernels.cu`, `adamw_f32`).
#[derive(Clone, Copy, Debug)]
pub struct AdamWStep {
    /// Learning rate.
    pub lr: f32,
    /// `(beta1, beta2)`.
    pub betas: (f32, f32),
    /// Added to the root of the second moment.
    pub eps: f32,
    /// `1 - lr * weight_decay` for decayed parameters, 1 otherwise.
    pub decay: f32,
    /// Bias corrections `(1 - beta1^t, 1 - beta2^t)`.
    pub corrections: (f32, f32),
    /// Multiplies the gradient (1 / micro-batches, times the clipping coefficient).
    pub grad_scale: f32,
}

impl CustomOp3 for AdamWStep {
    fn name(&self) -> &'static str {
        "mimco-adamw"
    }

    cuda_only!(3);

    fn cuda_fwd(
        &self,
        ps: &CudaStorage,
        pl: &Layout,
        gs: &CudaStorage,
        gl: &Layout,
        ss: &CudaStorage,
        sl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let dev = ps.device();
        let n = pl.shape().elem_count();
        if gl.shape().elem_count() != n || sl.shape().elem_count() != 2 * n {
            bail!("adamw: gradient and state do not match the parameter's {n} elements");
        }
        let (p, g, s) = (
            contiguous::<f32>(ps, pl, "parameter")?,
            contiguous::<f32>(gs, gl, "gradient")?,
            contiguous::<f32>(ss, sl, "state")?,
        );
        let out = unsafe { dev.alloc::<f32>(3 * n)? };
        let f = func(dev, "adamw_f32")?;
        let n_i = n as i64;
        let stream = dev.cuda_stream();
        let mut l = stream.launch_builder(&f);
        l.arg(&p).arg(&g).arg(&s).arg(&out).arg(&n_i);
        l.arg(&self.lr)
            .arg(&self.betas.0)
            .arg(&self.betas.1)
            .arg(&self.eps);
        l.arg(&self.decay)
            .arg(&self.corrections.0)
            .arg(&self.corrections.1);
        l.arg(&self.grad_scale);
        let cfg = LaunchConfig {
            grid_dim: ((n as u32).div_ceil(256).clamp(1, 4096), 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        unsafe { l.launch(cfg) }.w()?;
        let mut dims = vec![3];
        dims.extend_from_slice(pl.dims());
        Ok((wrap(CudaStorageSlice::F32(out), dev), Shape::from(dims)))
    }
}

/// The sum of the squares of every element of `grads` (f32 CUDA tensors), in f64: one
/// launch per gradient (Candle's square, sum, cast and stack took four, and 3 ms of a
/// ViT-S/16 step on an H200).
pub fn sum_squares(grads: &[Tensor]) -> Result<f64> {
    let Some(first) = grads.first() else {
        return Ok(0.0);
    };
    let total = Tensor::zeros(1, DType::F64, first.device())?;
    for g in grads {
        if g.dtype() != DType::F32 {
            bail!("sum_squares: f32 gradients, got {:?}", g.dtype());
        }
        total.inplace_op2(&g.contiguous()?, &SumSquares)?;
    }
    total.squeeze(0)?.to_scalar::<f64>()
}

/// `total += sum(g^2)`.
struct SumSquares;

impl InplaceOp2 for SumSquares {
    fn name(&self) -> &'static str {
        "mimco-sum-squares"
    }

    fn cpu_fwd(&self, _: &mut CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<()> {
        bail!("sum_squares is a CUDA kernel")
    }

    fn cuda_fwd(
        &self,
        ts: &mut CudaStorage,
        _tl: &Layout,
        gs: &CudaStorage,
        gl: &Layout,
    ) -> Result<()> {
        let dev = gs.device().clone();
        let g = contiguous::<f32>(gs, gl, "gradient")?;
        let n = gl.shape().elem_count();
        let f = func(&dev, "sum_squares_f32")?;
        let CudaStorageSlice::F64(total) = &mut ts.slice else {
            bail!("sum_squares: an f64 accumulator");
        };
        let n_i = n as i64;
        let stream = dev.cuda_stream();
        let mut l = stream.launch_builder(&f);
        l.arg(&g).arg(&n_i).arg(total);
        let cfg = LaunchConfig {
            grid_dim: ((n as u32).div_ceil(256).clamp(1, 1024), 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        unsafe { l.launch(cfg) }.w()?;
        Ok(())
    }
}

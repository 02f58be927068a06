//! LayerNorm: forward in one pass, backward in one pass with dweight/dbias summed per warp.

use std::sync::OnceLock;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::sys::CUdeviceptr;
use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDType, CudaStorageSlice, WrapErr};
use candle_core::op::BackpropOp;
use candle_core::{
    CpuStorage, CudaDevice, CudaStorage, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor,
    bail,
};
use half::bf16;

use super::attention::{address, alloc};
use super::*;

/// LayerNorm over the last dimension of an f32 `x` with f32 `weight`, `bias`, written in
/// `out` (f32 or bf16). `x` is made contiguous first.
pub fn layer_norm(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
    out: DType,
) -> Result<Tensor> {
    x.contiguous()?.apply_op3(
        weight,
        bias,
        LayerNorm {
            eps: eps as f32,
            out,
        },
    )
}

struct LayerNorm {
    eps: f32,
    out: DType,
}

impl CustomOp3 for LayerNorm {
    fn name(&self) -> &'static str {
        "mimco-layer-norm"
    }

    cuda_only!(3);

    fn cuda_fwd(
        &self,
        xs: &CudaStorage,
        xl: &Layout,
        ws: &CudaStorage,
        wl: &Layout,
        bs: &CudaStorage,
        bl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let dev = xs.device();
        let d = xl.dims().last().copied().unwrap_or(1);
        let rows = xl.shape().elem_count() / d.max(1);
        if wl.shape().elem_count() != d || bl.shape().elem_count() != d {
            bail!("layer_norm: weight and bias must have {d} elements");
        }
        let (x, w, b) = (
            contiguous::<f32>(xs, xl, "x")?,
            contiguous::<f32>(ws, wl, "weight")?,
            contiguous::<f32>(bs, bl, "bias")?,
        );
        let name = format!("layer_norm_fwd_f32_{}_{}", dtype_name(self.out)?, width(d)?);
        let f = func(dev, &name)?;
        /// Launches the forward writing a new output of dtype `T`.
        fn forward<T: CudaDType + DeviceRepr>(
            dev: &CudaDevice,
            f: &CudaFunction,
            inputs: [&CudaView<f32>; 3],
            (rows, d, eps): (usize, usize, f32),
        ) -> Result<CudaSlice<T>> {
            let y = unsafe { dev.alloc::<T>(rows * d)? };
            let (rows_i, d_i) = (rows as i32, d as i32);
            let stream = dev.cuda_stream();
            let mut l = stream.launch_builder(f);
            l.arg(inputs[0]).arg(inputs[1]).arg(inputs[2]).arg(&y);
            l.arg(&rows_i).arg(&d_i).arg(&eps);
            unsafe { l.launch(row_grid(rows)) }.w()?;
            Ok(y)
        }
        let args = (rows, d, self.eps);
        let slice = match self.out {
            DType::F32 => CudaStorageSlice::F32(forward(dev, &f, [&x, &w, &b], args)?),
            _ => CudaStorageSlice::BF16(forward(dev, &f, [&x, &w, &b], args)?),
        };
        Ok((wrap(slice, dev), xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _bias: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, _, dw, db) = layer_norm_bwd(x, weight, self.eps as f64, grad, None, false)?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

/// The gradients `(dx, dx in bf16, dweight, dbias)` of [`layer_norm`] at the f32 `x` and
/// `weight` for the output gradient `dy` (f32 or bf16): one launch. `dx`, `dweight` and
/// `dbias` are f32; with `dx_bf16` the pass also writes `dx` rounded to bf16 (what the
/// bf16 layer before the norm reads, without a cast pass), else that is `None`. `skip`, an
/// f32 tensor of the shape of `x`, is added to `dx` in the same pass (the gradient that
/// reaches `x` past the norm by a residual connection).
pub fn layer_norm_bwd(
    x: &Tensor,
    weight: &Tensor,
    eps: f64,
    dy: &Tensor,
    skip: Option<&Tensor>,
    dx_bf16: bool,
) -> Result<(Tensor, Option<Tensor>, Tensor, Tensor)> {
    let d = x.dim(candle_core::D::Minus1)?;
    let n = x.elem_count();
    if let Some(s) = skip
        && (s.dtype() != DType::F32 || s.shape() != x.shape())
    {
        bail!("layer_norm_bwd: an f32 skip gradient of the shape of x {x:?}, not {s:?}");
    }
    let op = LayerNormBwd {
        eps: eps as f32,
        skip: skip.map(Tensor::contiguous).transpose()?,
        dx_bf16: dx_bf16.then(OnceLock::new),
    };
    let packed = x
        .contiguous()?
        .apply_op3_no_bwd(weight, &dy.contiguous()?, &op)?;
    let dx_bf16 = op
        .dx_bf16
        .and_then(OnceLock::into_inner)
        .map(|s| Tensor::from_storage(Storage::Cuda(s), x.shape(), BackpropOp::none(), false));
    Ok((
        packed.narrow(0, 0, n)?.reshape(x.shape())?,
        dx_bf16,
        packed.narrow(0, n, d)?.reshape(weight.shape())?,
        packed.narrow(0, n + d, d)?.reshape(weight.shape())?,
    ))
}

/// `(x, weight, dy)` -> `dx ++ dweight ++ dbias`, flat f32, `skip` added to `dx`; where
/// `dx_bf16` is asked for, also `dx` in bf16, left in the cell.
struct LayerNormBwd {
    eps: f32,
    skip: Option<Tensor>,
    dx_bf16: Option<OnceLock<CudaStorage>>,
}

impl CustomOp3 for LayerNormBwd {
    fn name(&self) -> &'static str {
        "mimco-layer-norm-bwd"
    }

    cuda_only!(3);

    fn cuda_fwd(
        &self,
        xs: &CudaStorage,
        xl: &Layout,
        ws: &CudaStorage,
        wl: &Layout,
        gs: &CudaStorage,
        gl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let dev = xs.device();
        let d = xl.dims().last().copied().unwrap_or(1);
        let n = xl.shape().elem_count();
        let rows = n / d.max(1);
        let (x, w) = (
            contiguous::<f32>(xs, xl, "x")?,
            contiguous::<f32>(ws, wl, "weight")?,
        );
        let mut out: CudaSlice<f32> = unsafe { dev.alloc::<f32>(n + 2 * d)? };
        dev.cuda_stream()
            .memset_zeros(&mut out.slice_mut(n..))
            .w()?;
        let name = format!(
            "layer_norm_bwd_f32_{}_{}",
            dtype_name(gs.dtype())?,
            width(d)?
        );
        let f = func(dev, &name)?;
        // Enough warps to fill the GPU; each adds its partial dw/db once.
        let cfg = LaunchConfig {
            grid_dim: ((rows as u32).div_ceil(WARPS * 8).clamp(1, 1024), 1, 1),
            block_dim: (32 * WARPS, 1, 1),
            shared_mem_bytes: 0,
        };
        /// Launches the backward with `dy` of dtype `G`.
        fn backward<G: CudaDType + DeviceRepr>(
            dev: &CudaDevice,
            f: &CudaFunction,
            (x, w): (&CudaView<f32>, &CudaView<f32>),
            (gs, gl): (&CudaStorage, &Layout),
            (skip, dx_bf16): (CUdeviceptr, CUdeviceptr),
            out: &CudaSlice<f32>,
            (rows, d, eps, cfg): (usize, usize, f32, LaunchConfig),
        ) -> Result<()> {
            let g = contiguous::<G>(gs, gl, "dy")?;
            let (rows_i, d_i) = (rows as i32, d as i32);
            let stream = dev.cuda_stream();
            let mut l = stream.launch_builder(f);
            l.arg(x).arg(w).arg(&g).arg(&skip).arg(out).arg(&dx_bf16);
            l.arg(&rows_i).arg(&d_i).arg(&eps);
            unsafe { l.launch(cfg) }.w()?;
            Ok(())
        }
        let args = (rows, d, self.eps, cfg);
        // The skip gradient's address, or null; its storage stays borrowed until the
        // launch is queued.
        let skip = self.skip.as_ref().map(Tensor::storage_and_layout);
        let skip_at = match &skip {
            Some((s, l)) => match &**s {
                candle_core::Storage::Cuda(s) if l.is_contiguous() => address(s, l.start_offset())?,
                _ => bail!("layer_norm_bwd: the skip gradient is not a contiguous GPU tensor"),
            },
            None => 0,
        };
        let dx_bf16 = match &self.dx_bf16 {
            Some(_) => Some(alloc(dev, DType::BF16, n)?),
            None => None,
        };
        let extra = (
            skip_at,
            match &dx_bf16 {
                Some(s) => address(s, 0)?,
                None => 0,
            },
        );
        match gs.dtype() {
            DType::F32 => backward::<f32>(dev, &f, (&x, &w), (gs, gl), extra, &out, args)?,
            _ => backward::<bf16>(dev, &f, (&x, &w), (gs, gl), extra, &out, args)?,
        }
        drop(skip);
        if let (Some(cell), Some(s)) = (&self.dx_bf16, dx_bf16) {
            let _ = cell.set(s);
        }
        Ok((
            wrap(CudaStorageSlice::F32(out), dev),
            Shape::from(n + 2 * d),
        ))
    }
}

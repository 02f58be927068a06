//! Softmax of the attention scores and its backward.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, PushKernelArg};
use candle_core::cuda_backend::{CudaStorageSlice, WrapErr};
use candle_core::{
    CpuStorage, CudaStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor,
};
use half::bf16;

use super::*;

/// `softmax(scale * x)` over the last dimension of an f32 or bf16 `x` (made contiguous).
pub fn softmax(x: &Tensor, scale: f64) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Softmax {
        scale: scale as f32,
    })
}

struct Softmax {
    scale: f32,
}

/// Launches a row kernel `name` over `(input..., output)` of one dtype.
fn launch_rows<
    T: candle_core::cuda_backend::CudaDType + candle_core::cuda_backend::cudarc::driver::DeviceRepr,
>(
    dev: &CudaDevice,
    name: &str,
    inputs: &[(&CudaStorage, &Layout)],
    rows: usize,
    cols: usize,
    scale: f32,
) -> Result<CudaSlice<T>> {
    let f = func(dev, name)?;
    let views = inputs
        .iter()
        .map(|(s, l)| contiguous::<T>(s, l, "input"))
        .collect::<Result<Vec<_>>>()?;
    let out = unsafe { dev.alloc::<T>(rows * cols)? };
    let (rows_i, cols_i) = (rows as i32, cols as i32);
    let stream = dev.cuda_stream();
    let mut l = stream.launch_builder(&f);
    for v in &views {
        l.arg(v);
    }
    // Rows are packed: `ld` = `cols`.
    l.arg(&out)
        .arg(&rows_i)
        .arg(&cols_i)
        .arg(&cols_i)
        .arg(&scale);
    unsafe { l.launch(row_grid(rows)) }.w()?;
    Ok(out)
}

fn softmax_launch(
    stage: &str,
    inputs: &[(&CudaStorage, &Layout)],
    scale: f32,
) -> Result<(CudaStorage, Shape)> {
    let (s0, l0) = inputs[0];
    let dev = s0.device();
    let cols = l0.dims().last().copied().unwrap_or(1);
    let rows = l0.shape().elem_count() / cols.max(1);
    let dt = dtype_name(s0.dtype())?;
    let name = format!("softmax_{stage}_{dt}_{dt}_{}", width(cols)?);
    let slice = match s0.dtype() {
        DType::F32 => {
            CudaStorageSlice::F32(launch_rows::<f32>(dev, &name, inputs, rows, cols, scale)?)
        }
        _ => CudaStorageSlice::BF16(launch_rows::<bf16>(dev, &name, inputs, rows, cols, scale)?),
    };
    Ok((wrap(slice, dev), l0.shape().clone()))
}

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "mimco-softmax"
    }

    cuda_only!(1);

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        softmax_launch("fwd", &[(s, l)], self.scale)
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let grad = grad.to_dtype(y.dtype())?.contiguous()?;
        Ok(Some(y.apply_op2_no_bwd(
            &grad,
            &SoftmaxBwd { scale: self.scale },
        )?))
    }
}

/// `(y, dy)` -> `dx` of [`Softmax`] (and of the attention's softmax).
struct SoftmaxBwd {
    scale: f32,
}

impl CustomOp2 for SoftmaxBwd {
    fn name(&self) -> &'static str {
        "mimco-softmax-bwd"
    }

    cuda_only!(2);

    fn cuda_fwd(
        &self,
        ys: &CudaStorage,
        yl: &Layout,
        gs: &CudaStorage,
        gl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        softmax_launch("bwd", &[(ys, yl), (gs, gl)], self.scale)
    }
}

//! For [`super::linear()`]'s backward: the activation's derivative (GELU or ReLU) at the
//! recomputed pre-activation, and the bias gradient as column sums.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaStorageSlice, WrapErr};
use candle_core::{
    CpuStorage, CudaStorage, CustomOp1, CustomOp3, DType, Layout, Result, Shape, bail,
};
use half::bf16;

use super::*;

/// Launches `bias_act_<stage>_<dtype>` over `inputs` (x, then dy for the backward) with
/// the f32 `bias`.
fn bias_act_launch(
    stage: &str,
    inputs: &[(&CudaStorage, &Layout)],
    bias: (&CudaStorage, &Layout),
    act: i32,
) -> Result<(CudaStorage, Shape)> {
    let (xs, xl) = inputs[0];
    let dev = xs.device();
    let n = xl.shape().elem_count();
    let cols = xl.dims().last().copied().unwrap_or(1);
    if bias.1.shape().elem_count() != cols {
        bail!("bias_act: the bias must have {cols} elements");
    }
    let b = contiguous::<f32>(bias.0, bias.1, "bias")?;
    let f = func(
        dev,
        &format!("bias_act_{stage}_{}", dtype_name(xs.dtype())?),
    )?;
    let (n_i, cols_i) = (n as i64, cols as i32);
    fn go<T: CudaDType + DeviceRepr>(
        dev: &CudaDevice,
        f: &CudaFunction,
        inputs: &[(&CudaStorage, &Layout)],
        b: &candle_core::cuda_backend::cudarc::driver::CudaView<f32>,
        args: (i64, i32, i32),
    ) -> Result<CudaSlice<T>> {
        let n = args.0 as usize;
        let views = inputs
            .iter()
            .map(|(s, l)| contiguous::<T>(s, l, "input"))
            .collect::<Result<Vec<_>>>()?;
        let out = unsafe { dev.alloc::<T>(n)? };
        let stream = dev.cuda_stream();
        let mut l = stream.launch_builder(f);
        l.arg(&views[0]).arg(b);
        for v in &views[1..] {
            l.arg(v);
        }
        l.arg(&out).arg(&args.0).arg(&args.1).arg(&args.2);
        unsafe { l.launch(elementwise_grid(n)) }.w()?;
        Ok(out)
    }
    let args = (n_i, cols_i, act);
    let slice = match xs.dtype() {
        DType::F32 => CudaStorageSlice::F32(go::<f32>(dev, &f, inputs, &b, args)?),
        _ => CudaStorageSlice::BF16(go::<bf16>(dev, &f, inputs, &b, args)?),
    };
    Ok((wrap(slice, dev), xl.shape().clone()))
}

/// `(x, bias, dy)` -> `dy * act'(x + bias)` for the kernels' activation code (1: GELU,
/// 2: ReLU).
pub(super) struct BiasActBwd(pub(super) i32);

impl CustomOp3 for BiasActBwd {
    fn name(&self) -> &'static str {
        "mimco-bias-gelu-bwd"
    }

    cuda_only!(3);

    fn cuda_fwd(
        &self,
        xs: &CudaStorage,
        xl: &Layout,
        bs: &CudaStorage,
        bl: &Layout,
        gs: &CudaStorage,
        gl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        bias_act_launch("bwd", &[(xs, xl), (gs, gl)], (bs, bl), self.0)
    }
}

/// `(rows, cols)` f32 or bf16 -> `(cols)` f32 sums over the rows.
pub(super) struct ColumnSum;

impl CustomOp1 for ColumnSum {
    fn name(&self) -> &'static str {
        "mimco-column-sum"
    }

    cuda_only!(1);

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        let dev = s.device();
        let cols = l.dims().last().copied().unwrap_or(1);
        let rows = l.shape().elem_count() / cols.max(1);
        let mut out = dev.alloc_zeros::<f32>(cols)?;
        let f = func(dev, &format!("column_sum_{}", dtype_name(s.dtype())?))?;
        let cfg = LaunchConfig {
            grid_dim: (
                (cols as u32).div_ceil(128),
                (rows as u32).div_ceil(64).clamp(1, 256),
                1,
            ),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        let (rows_i, cols_i) = (rows as i32, cols as i32);
        /// Launches the sums over `x` of dtype `T`.
        fn sum<T: CudaDType + DeviceRepr>(
            dev: &CudaDevice,
            f: &CudaFunction,
            (s, l): (&CudaStorage, &Layout),
            out: &mut CudaSlice<f32>,
            (rows, cols, cfg): (i32, i32, LaunchConfig),
        ) -> Result<()> {
            let x = contiguous::<T>(s, l, "x")?;
            let stream = dev.cuda_stream();
            let mut b = stream.launch_builder(f);
            b.arg(&x).arg(out).arg(&rows).arg(&cols);
            unsafe { b.launch(cfg) }.w()?;
            Ok(())
        }
        let args = (rows_i, cols_i, cfg);
        match s.dtype() {
            DType::F32 => sum::<f32>(dev, &f, (s, l), &mut out, args)?,
            _ => sum::<bf16>(dev, &f, (s, l), &mut out, args)?,
        }
        Ok((wrap(CudaStorageSlice::F32(out), dev), Shape::from(cols)))
    }
}

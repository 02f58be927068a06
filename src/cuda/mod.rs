//! Fused CUDA kernels as Candle custom ops, each with its backward (`kernels.cu`, compiled
//! for the GPU in use by NVRTC on first use, so a build needs no GPU).
//!
//! - [`layer_norm`]: f32 input and affine, f32 or bf16 output; one pass forward, one pass
//!   backward for dx with dw/db summed per warp.
//! - [`softmax`]: `softmax(scale * x)` over the last dimension (the attention scores), f32
//!   or bf16, with its backward from the output.
//! - [`adamw`]: one AdamW update of one parameter in one launch, the gradient's averaging
//!   and clipping folded in.
//! - [`pinned`]: page-locked batch buffers for the pipeline.
//!
//! [`crate::functional`] sends CUDA tensors here and everything else to the composed ops,
//! which stay the reference: [`check`] compares the two on the GPU.

pub mod check;
pub mod pinned;

use std::sync::OnceLock;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, CudaSlice, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::cudarc::nvrtc::{CompileOptions, compile_ptx_with_opts};
use candle_core::cuda_backend::{CudaStorageSlice, WrapErr};
use candle_core::{
    CpuStorage, CudaDevice, CudaStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result,
    Shape, Tensor, bail,
};
use half::bf16;

const SOURCE: &str = include_str!("kernels.cu");
/// Row widths (elements per lane) the kernels are instantiated for: rows up to 32x that.
const WIDTHS: [usize; 8] = [1, 2, 4, 8, 12, 16, 24, 32];
/// The longest row the row kernels take; longer rows go to the composed ops.
pub const MAX_ROW: usize = 32 * 32;
/// Warps (rows) per block of the row kernels.
const WARPS: u32 = 4;

/// PTX of `kernels.cu` for this device's architecture, compiled once per process.
fn ptx(dev: &CudaDevice) -> Result<&'static str> {
    static PTX: OnceLock<std::result::Result<String, String>> = OnceLock::new();
    PTX.get_or_init(|| {
        let (major, minor) = dev
            .cuda_stream()
            .context()
            .compute_capability()
            .map_err(|e| format!("reading the GPU's compute capability: {e}"))?;
        let opts = CompileOptions {
            options: vec![format!("--gpu-architecture=sm_{major}{minor}")],
            name: Some("mimco_kernels.cu".into()),
            ..Default::default()
        };
        compile_ptx_with_opts(SOURCE, opts)
            .map(|p| p.to_src())
            .map_err(|e| format!("NVRTC could not compile mimco's kernels (is libnvrtc from the same CUDA as the driver?): {e}"))
    })
    .as_ref()
    .map(|s| s.as_str())
    .map_err(|e| candle_core::Error::Msg(e.clone()))
}

fn func(dev: &CudaDevice, name: &str) -> Result<CudaFunction> {
    Ok(dev
        .get_or_load_custom_func(name, "mimco_kernels", ptx(dev)?)?
        .into_cuda_function())
}

/// The kernel instance for rows of `d` elements: the smallest width that holds them.
fn width(d: usize) -> Result<usize> {
    match WIDTHS.iter().find(|&&e| 32 * e >= d) {
        Some(&e) => Ok(e),
        None => bail!("rows of {d} elements: the fused kernels take at most {MAX_ROW}"),
    }
}

fn dtype_name(dtype: DType) -> Result<&'static str> {
    match dtype {
        DType::F32 => Ok("f32"),
        DType::BF16 => Ok("bf16"),
        other => bail!("the fused kernels take f32 or bf16, not {other:?}"),
    }
}

fn row_grid(rows: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: ((rows as u32).div_ceil(WARPS), 1, 1),
        block_dim: (32 * WARPS, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn contiguous<'a, T: candle_core::cuda_backend::CudaDType>(
    s: &'a CudaStorage,
    l: &Layout,
    what: &str,
) -> Result<candle_core::cuda_backend::cudarc::driver::CudaView<'a, T>> {
    if !l.is_contiguous() {
        bail!("{what} must be contiguous for the fused kernel");
    }
    Ok(s.as_cuda_slice::<T>()?
        .slice(l.start_offset()..l.start_offset() + l.shape().elem_count()))
}

fn wrap(slice: CudaStorageSlice, dev: &CudaDevice) -> CudaStorage {
    CudaStorage {
        slice,
        device: dev.clone(),
    }
}

fn no_cpu(name: &str) -> Result<(CpuStorage, Shape)> {
    bail!("{name} is a CUDA kernel: the CPU takes the composed ops in mimco::functional")
}

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

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        no_cpu(self.name())
    }

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
        let (rows_i, d_i) = (rows as i32, d as i32);
        let slice = match self.out {
            DType::F32 => {
                let y = unsafe { dev.alloc::<f32>(rows * d)? };
                let stream = dev.cuda_stream();
                let mut l = stream.launch_builder(&f);
                l.arg(&x)
                    .arg(&w)
                    .arg(&b)
                    .arg(&y)
                    .arg(&rows_i)
                    .arg(&d_i)
                    .arg(&self.eps);
                unsafe { l.launch(row_grid(rows)) }.w()?;
                CudaStorageSlice::F32(y)
            }
            _ => {
                let y = unsafe { dev.alloc::<bf16>(rows * d)? };
                let stream = dev.cuda_stream();
                let mut l = stream.launch_builder(&f);
                l.arg(&x)
                    .arg(&w)
                    .arg(&b)
                    .arg(&y)
                    .arg(&rows_i)
                    .arg(&d_i)
                    .arg(&self.eps);
                unsafe { l.launch(row_grid(rows)) }.w()?;
                CudaStorageSlice::BF16(y)
            }
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
        let d = x.dim(candle_core::D::Minus1)?;
        let n = x.elem_count();
        let packed =
            x.apply_op3_no_bwd(weight, &grad.contiguous()?, &LayerNormBwd { eps: self.eps })?;
        Ok((
            Some(packed.narrow(0, 0, n)?.reshape(x.shape())?),
            Some(packed.narrow(0, n, d)?.reshape(weight.shape())?),
            Some(packed.narrow(0, n + d, d)?.reshape(weight.shape())?),
        ))
    }
}

/// `(x, weight, dy)` -> `dx ++ dweight ++ dbias`, flat f32.
struct LayerNormBwd {
    eps: f32,
}

impl CustomOp3 for LayerNormBwd {
    fn name(&self) -> &'static str {
        "mimco-layer-norm-bwd"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        no_cpu(self.name())
    }

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
        let (rows_i, d_i) = (rows as i32, d as i32);
        // Enough warps to fill the GPU; each adds its partial dw/db once.
        let cfg = LaunchConfig {
            grid_dim: ((rows as u32).div_ceil(WARPS * 8).clamp(1, 1024), 1, 1),
            block_dim: (32 * WARPS, 1, 1),
            shared_mem_bytes: 0,
        };
        match gs.dtype() {
            DType::F32 => {
                let g = contiguous::<f32>(gs, gl, "dy")?;
                let stream = dev.cuda_stream();
                let mut l = stream.launch_builder(&f);
                l.arg(&x)
                    .arg(&w)
                    .arg(&g)
                    .arg(&out)
                    .arg(&rows_i)
                    .arg(&d_i)
                    .arg(&self.eps);
                unsafe { l.launch(cfg) }.w()?;
            }
            _ => {
                let g = contiguous::<bf16>(gs, gl, "dy")?;
                let stream = dev.cuda_stream();
                let mut l = stream.launch_builder(&f);
                l.arg(&x)
                    .arg(&w)
                    .arg(&g)
                    .arg(&out)
                    .arg(&rows_i)
                    .arg(&d_i)
                    .arg(&self.eps);
                unsafe { l.launch(cfg) }.w()?;
            }
        }
        Ok((
            wrap(CudaStorageSlice::F32(out), dev),
            Shape::from(n + 2 * d),
        ))
    }
}

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
    l.arg(&out).arg(&rows_i).arg(&cols_i).arg(&scale);
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

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        no_cpu(self.name())
    }

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

/// `(y, dy)` -> `dx` of [`Softmax`].
struct SoftmaxBwd {
    scale: f32,
}

impl CustomOp2 for SoftmaxBwd {
    fn name(&self) -> &'static str {
        "mimco-softmax-bwd"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        no_cpu(self.name())
    }

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

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        no_cpu(self.name())
    }

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

/// `act(x + bias)` over the last dimension: `x` f32 or bf16 (made contiguous), `bias` f32;
/// `gelu` picks GELU (erf), else the identity. The bias gradient is summed in f32.
pub fn bias_act(x: &Tensor, bias: &Tensor, gelu: bool) -> Result<Tensor> {
    x.contiguous()?.apply_op2(bias, BiasAct { gelu })
}

struct BiasAct {
    gelu: bool,
}

fn elementwise_grid(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: ((n as u32).div_ceil(256).clamp(1, 16384), 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Launches `bias_act_<stage>_<dtype>` over `inputs` (x, then dy for the backward) with
/// the f32 `bias`.
fn bias_act_launch(
    stage: &str,
    inputs: &[(&CudaStorage, &Layout)],
    bias: (&CudaStorage, &Layout),
    gelu: bool,
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
    let (n_i, cols_i, act) = (n as i64, cols as i32, i32::from(gelu));
    fn go<
        T: candle_core::cuda_backend::CudaDType
            + candle_core::cuda_backend::cudarc::driver::DeviceRepr,
    >(
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

impl CustomOp2 for BiasAct {
    fn name(&self) -> &'static str {
        "mimco-bias-act"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        no_cpu(self.name())
    }

    fn cuda_fwd(
        &self,
        xs: &CudaStorage,
        xl: &Layout,
        bs: &CudaStorage,
        bl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        bias_act_launch("fwd", &[(xs, xl)], (bs, bl), self.gelu)
    }

    fn bwd(
        &self,
        x: &Tensor,
        bias: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.to_dtype(x.dtype())?.contiguous()?;
        let dz = match self.gelu {
            true => x.apply_op3_no_bwd(bias, &grad, &BiasActBwd)?,
            false => grad,
        };
        let db = dz.apply_op1_no_bwd(&ColumnSum)?.reshape(bias.shape())?;
        Ok((Some(dz), Some(db)))
    }
}

/// `(x, bias, dy)` -> `dy * gelu'(x + bias)`.
struct BiasActBwd;

impl CustomOp3 for BiasActBwd {
    fn name(&self) -> &'static str {
        "mimco-bias-gelu-bwd"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        no_cpu(self.name())
    }

    fn cuda_fwd(
        &self,
        xs: &CudaStorage,
        xl: &Layout,
        bs: &CudaStorage,
        bl: &Layout,
        gs: &CudaStorage,
        gl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        bias_act_launch("bwd", &[(xs, xl), (gs, gl)], (bs, bl), true)
    }
}

/// `(rows, cols)` f32 or bf16 -> `(cols)` f32 sums over the rows.
struct ColumnSum;

impl CustomOp1 for ColumnSum {
    fn name(&self) -> &'static str {
        "mimco-column-sum"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        no_cpu(self.name())
    }

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
        match s.dtype() {
            DType::F32 => {
                let x = contiguous::<f32>(s, l, "x")?;
                let stream = dev.cuda_stream();
                let mut b = stream.launch_builder(&f);
                b.arg(&x).arg(&mut out).arg(&rows_i).arg(&cols_i);
                unsafe { b.launch(cfg) }.w()?;
            }
            _ => {
                let x = contiguous::<bf16>(s, l, "x")?;
                let stream = dev.cuda_stream();
                let mut b = stream.launch_builder(&f);
                b.arg(&x).arg(&mut out).arg(&rows_i).arg(&cols_i);
                unsafe { b.launch(cfg) }.w()?;
            }
        }
        Ok((wrap(CudaStorageSlice::F32(out), dev), Shape::from(cols)))
    }
}

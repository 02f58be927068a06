//! Softmax of the attention scores and its backward.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, PushKernelArg};
use candle_core::cuda_backend::{CudaStorageSlice, WrapErr};
use candle_core::{
    CpuStorage, CudaStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor,
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

/// `(y, dy)` -> `dx` of [`Softmax`].
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

/// Attention `softmax(scale * q k^T) v` for `(B, H, N, d)` f32 or bf16 `q`, `k`, `v`
/// (made contiguous), rows of at most [`super::MAX_ROW`] keys. Forward: cuBLAS for both
/// products (Candle's own batched matmul), the fused softmax in place between them. The
/// `(B, H, N, N)` scores and probabilities are not kept for the backward: it recomputes the
/// probabilities from `q` and `k`, which the graph holds anyway, trading one more `q k^T`
/// for `2 * B * H * N^2` stored elements per layer.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    let scale = scale as f32;
    q.contiguous()?
        .apply_op3(&k.contiguous()?, &v.contiguous()?, Attention { scale })
}

struct Attention {
    scale: f32,
}

/// `softmax(scale * q k^T)` as a new contiguous storage `(B*H, N, M)`.
fn probabilities(
    qs: &CudaStorage,
    ql: &Layout,
    ks: &CudaStorage,
    kl: &Layout,
    scale: f32,
) -> Result<(CudaStorage, Vec<usize>)> {
    let (q, k) = (ql.dims(), kl.dims());
    if q.len() != 4 || k.len() != 4 || q[..2] != k[..2] || q[3] != k[3] {
        candle_core::bail!("attention: q {q:?} and k {k:?} must be (B, H, N, d) alike");
    }
    let (batch, n, m, d) = (q[0] * q[1], q[2], k[2], q[3]);
    let mut scores = qs.matmul(ks, (batch, n, m, d), ql, &kl.transpose(2, 3)?)?;
    let dev = qs.device().clone();
    let dt = dtype_name(qs.dtype())?;
    let f = func(&dev, &format!("softmax_fwd_{dt}_{dt}_{}", width(m)?))?;
    let (rows, cols) = ((batch * n) as i32, m as i32);
    let stream = dev.cuda_stream();
    // In place: each warp reads its whole row before writing it.
    match &mut scores.slice {
        CudaStorageSlice::F32(s) => {
            let mut l = stream.launch_builder(&f);
            l.arg(&*s).arg(&*s).arg(&rows).arg(&cols).arg(&scale);
            unsafe { l.launch(row_grid(batch * n)) }.w()?;
        }
        CudaStorageSlice::BF16(s) => {
            let mut l = stream.launch_builder(&f);
            l.arg(&*s).arg(&*s).arg(&rows).arg(&cols).arg(&scale);
            unsafe { l.launch(row_grid(batch * n)) }.w()?;
        }
        _ => candle_core::bail!("attention: f32 or bf16 only"),
    }
    Ok((scores, vec![q[0], q[1], n, m]))
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "mimco-attention"
    }

    cuda_only!(3);

    fn cuda_fwd(
        &self,
        qs: &CudaStorage,
        ql: &Layout,
        ks: &CudaStorage,
        kl: &Layout,
        vs: &CudaStorage,
        vl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (p, dims) = probabilities(qs, ql, ks, kl, self.scale)?;
        let v = vl.dims();
        if v.len() != 4 || v[..3] != [dims[0], dims[1], dims[3]] {
            candle_core::bail!("attention: v {v:?} does not match the keys {dims:?}");
        }
        let (batch, n, m, dv) = (dims[0] * dims[1], dims[2], dims[3], v[3]);
        let out = p.matmul(
            vs,
            (batch, n, dv, m),
            &Layout::contiguous(dims.as_slice()),
            vl,
        )?;
        Ok((out, Shape::from((dims[0], dims[1], n, dv))))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let p = q.apply_op2_no_bwd(k, &Probabilities { scale: self.scale })?;
        let grad = grad.to_dtype(v.dtype())?.contiguous()?;
        let dv = p.t()?.matmul(&grad)?;
        let dp = grad.matmul(&v.t()?)?;
        let ds = p.apply_op2_no_bwd(&dp, &SoftmaxBwd { scale: self.scale })?;
        Ok((Some(ds.matmul(k)?), Some(ds.t()?.matmul(q)?), Some(dv)))
    }
}

/// `(q, k)` -> `softmax(scale * q k^T)`, for [`Attention`]'s backward.
struct Probabilities {
    scale: f32,
}

impl CustomOp2 for Probabilities {
    fn name(&self) -> &'static str {
        "mimco-attention-probabilities"
    }

    cuda_only!(2);

    fn cuda_fwd(
        &self,
        qs: &CudaStorage,
        ql: &Layout,
        ks: &CudaStorage,
        kl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (p, dims) = probabilities(qs, ql, ks, kl, self.scale)?;
        Ok((p, Shape::from(dims)))
    }
}

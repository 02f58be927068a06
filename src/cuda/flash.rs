//! Attention on tensor cores (`flash.cu`): bf16 heads of 32 or 64 elements on sm_80 and
//! newer, read from the packed `qkv` and written to the packed output, so no copy splits or
//! merges the heads, and the scores are never stored. The forward is one kernel, which can
//! keep each query's logsumexp; the backward two: one for `dq`, which also keeps the row
//! sums of `dout` times `out` (and computes the logsumexp first where the forward's was not
//! kept), then one for `dk` and `dv` from those. [`super::attention_qkv`] sends its other
//! cases (f32, other head widths, older GPUs) through cuBLAS.
//!
//! The kernels' arithmetic is tested on the CPU (`tests/kernels_on_cpu.sh`, with the
//! tensor-core tile emulated); `mimco bench kernels` checks these launches on a GPU.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::WrapErr;
use candle_core::cuda_backend::cudarc::driver::sys::CUdeviceptr;
use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::{CudaStorage, DType, Layout, Result, bail};

use super::attention::{Heads, address, alloc};
use super::func;

/// Whether attention with heads `h` on `tensors` (`qkv` first, then the output and its
/// gradient in the backward) takes the tensor-core kernels: bf16 heads of 32 or 64 on
/// sm_80 or newer, every tensor contiguous from a 16-byte aligned address (the kernels
/// copy 16 bytes at a time). Others go through cuBLAS.
pub(super) fn applies(h: &Heads, tensors: &[(&CudaStorage, &Layout)]) -> bool {
    let Some((first, _)) = tensors.first() else {
        return false;
    };
    let ampere = first
        .device()
        .cuda_stream()
        .context()
        .compute_capability()
        .is_ok_and(|(major, _)| major >= 8);
    let aligned = tensors
        .iter()
        .all(|(s, l)| s.dtype() == DType::BF16 && start(s, l, "").is_ok());
    matches!(h.dim, 32 | 64)
        && aligned
        && ampere
        && crate::functional::enabled(crate::functional::FastPath::Flash)
}

/// The address of the contiguous `s` at its layout's start, checked 16-byte aligned.
fn start(s: &CudaStorage, l: &Layout, what: &str) -> Result<CUdeviceptr> {
    if !l.is_contiguous() {
        bail!("attention: {what} must be contiguous");
    }
    let at = address(s, l.start_offset())?;
    if at % 16 != 0 {
        bail!("attention: {what} is not 16-byte aligned");
    }
    Ok(at)
}

fn launch_config(h: &Heads) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (h.tokens.div_ceil(64) as u32, (h.batch * h.heads) as u32, 1),
        block_dim: (128, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// `softmax(scale q k^T) v` per head from the packed `qkv` (rows x 3 H E) into a new
/// (rows x H E) storage, and with `keep_lse` each query's logsumexp into a new `B H N` f32
/// storage (for [`backward`]).
pub(super) fn forward(
    s: &CudaStorage,
    l: &Layout,
    h: Heads,
    scale: f32,
    keep_lse: bool,
) -> Result<(CudaStorage, Option<CudaStorage>)> {
    let dev = s.device();
    let qkv = start(s, l, "qkv")?;
    let out = alloc(dev, DType::BF16, h.elements() / 3)?;
    let out_at = address(&out, 0)?;
    let lse = match keep_lse {
        true => Some(alloc(dev, DType::F32, h.batch * h.heads * h.tokens)?),
        false => None,
    };
    let lse_at: CUdeviceptr = match &lse {
        Some(lse) => address(lse, 0)?,
        None => 0,
    };
    let (n, heads) = (h.tokens as i32, h.heads as i32);
    let f = func(dev, &format!("flash_fwd_bf16_{}", h.dim))?;
    let stream = dev.cuda_stream();
    let mut b = stream.launch_builder(&f);
    b.arg(&qkv).arg(&out_at).arg(&lse_at);
    b.arg(&n).arg(&heads).arg(&scale);
    unsafe { b.launch(launch_config(&h)) }.w()?;
    Ok((out, lse))
}

/// `dqkv` from the packed `qkv`, the forward's `out` and its gradient `dout` (all
/// contiguous bf16), into a new (rows x 3 H E) storage; `lse` is the forward's logsumexp
/// per query ([`forward`] with `keep_lse`; the caller checks its size), recomputed here
/// without it.
pub(super) fn backward(
    qkv: (&CudaStorage, &Layout),
    out: (&CudaStorage, &Layout),
    dout: (&CudaStorage, &Layout),
    lse: Option<&CudaStorage>,
    h: Heads,
    scale: f32,
) -> Result<CudaStorage> {
    let dev = qkv.0.device();
    let (qkv, out, dout) = (
        start(qkv.0, qkv.1, "qkv")?,
        start(out.0, out.1, "the output")?,
        start(dout.0, dout.1, "the output's gradient")?,
    );
    let dqkv = alloc(dev, DType::BF16, h.elements())?;
    let dqkv_at = address(&dqkv, 0)?;
    let rows = h.batch * h.heads * h.tokens;
    // Per query: the logsumexp of its scores (the forward's, or computed by the first
    // kernel), then D = rowsum(dout * out).
    let computed = match lse {
        Some(_) => None,
        None => Some(alloc(dev, DType::F32, rows)?),
    };
    let lse_at = address(lse.or(computed.as_ref()).expect("one of the two"), 0)?;
    let dot = alloc(dev, DType::F32, rows)?;
    let dot_at = address(&dot, 0)?;
    let lse_known = i32::from(lse.is_some());
    let (n, heads) = (h.tokens as i32, h.heads as i32);
    let stream = dev.cuda_stream();
    let f = func(dev, &format!("flash_bwd_dq_bf16_{}", h.dim))?;
    let mut b = stream.launch_builder(&f);
    b.arg(&qkv).arg(&out).arg(&dout).arg(&dqkv_at);
    b.arg(&lse_at).arg(&dot_at).arg(&lse_known);
    b.arg(&n).arg(&heads).arg(&scale);
    unsafe { b.launch(launch_config(&h)) }.w()?;
    let f = func(dev, &format!("flash_bwd_dkv_bf16_{}", h.dim))?;
    let mut b = stream.launch_builder(&f);
    b.arg(&qkv)
        .arg(&dout)
        .arg(&lse_at)
        .arg(&dot_at)
        .arg(&dqkv_at);
    b.arg(&n).arg(&heads).arg(&scale);
    unsafe { b.launch(launch_config(&h)) }.w()?;
    // Freed in stream order (cudarc frees on the stream, or synchronises first), after
    // the kernels that read them.
    drop((computed, dot));
    Ok(dqkv)
}

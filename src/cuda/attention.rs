//! Multi-head self-attention on the packed `q|k|v` projection, forward and backward, as
//! one node of Candle's graph.
//!
//! Written with Candle's ops, attention is a dozen graph nodes per block (reshape,
//! permute, three narrows, three copies, transpose, reshape), and Candle's backward gives
//! each node a zero-filled gradient plus an addition, all the size of `qkv`: on one H200
//! that was a third of a ViT-S/16 MimCo step (Nsight Compute, benches/results/). Here bf16
//! heads of 32 or 64 on sm_80 and newer take the tensor-core kernels of [`super::flash`].
//! Every other case: one kernel splits the heads, cuBLAS computes `q k^T` and `p v` with
//! the score rows padded to 16 bytes (see [`super::gemm`]: it did not make cuBLAS faster;
//! cuBLAS picked a generic kernel for these products, 24 ms of a ViT-S/16 step on an
//! H200), the fused softmax runs in place between them, and one kernel merges the heads.
//! Either way the `(B, H, N, N)` probabilities are not kept: the backward recomputes them
//! from `q` and `k`, trading one more `q k^T` for `B * H * N^2` stored elements per layer.

use std::sync::OnceLock;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::sys::CUdeviceptr;
use candle_core::cuda_backend::cudarc::driver::{DevicePtr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaStorageSlice, WrapErr};
use candle_core::op::BackpropOp;
use candle_core::{
    CpuStorage, CudaStorage, CustomOp1, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor,
    bail,
};
use half::bf16;

use super::flash;
use super::gemm::{Operand, gemm};
use super::*;

/// `softmax(scale * q k^T) v` per head for `qkv` of `(B * tokens, 3 * D)` (each row a
/// token's `q|k|v`, heads side by side in each, as timm's `attn.qkv` writes them), f32 or
/// bf16 (made contiguous); returns `(B * tokens, D)`, heads side by side.
pub fn attention_qkv(qkv: &Tensor, tokens: usize, heads: usize, scale: f64) -> Result<Tensor> {
    let (rows, cols) = qkv.dims2()?;
    Heads::new(rows, cols, tokens, 3, heads)?;
    qkv.contiguous()?
        .apply_op1(AttentionQkv::new(tokens, heads, scale, false))
}

/// [`attention_qkv`] outside the graph (no backward recorded: the caller runs
/// [`attention_qkv_bwd`] itself), also returning each query's logsumexp `(B * heads *
/// tokens)` f32 where the tensor-core kernels ran, for the backward to reuse.
pub fn attention_qkv_lse(
    qkv: &Tensor,
    tokens: usize,
    heads: usize,
    scale: f64,
) -> Result<(Tensor, Option<Tensor>)> {
    let (rows, cols) = qkv.dims2()?;
    Heads::new(rows, cols, tokens, 3, heads)?;
    let op = AttentionQkv::new(tokens, heads, scale, true);
    let out = qkv.contiguous()?.apply_op1_no_bwd(&op)?;
    let lse = op.lse.and_then(OnceLock::into_inner).map(|s| {
        let n = rows * heads; // flash::forward's B H N
        Tensor::from_storage(Storage::Cuda(s), n, BackpropOp::none(), false)
    });
    Ok((out, lse))
}

/// The shape of a heads layout change: `(B, N, S, H, E)` token-major, `(S, B, H, N, E)`
/// head-major.
#[derive(Clone, Copy, Debug)]
pub(super) struct Heads {
    pub(super) batch: usize,
    pub(super) tokens: usize,
    pub(super) parts: usize,
    pub(super) heads: usize,
    pub(super) dim: usize,
}

impl Heads {
    /// The layout of a `(rows, cols)` token-major matrix of `parts` parts of `heads` heads.
    fn new(rows: usize, cols: usize, tokens: usize, parts: usize, heads: usize) -> Result<Heads> {
        if tokens == 0 || heads == 0 || !rows.is_multiple_of(tokens) {
            bail!("attention: {rows} rows are not whole images of {tokens} tokens");
        }
        if !cols.is_multiple_of(parts * heads) {
            bail!("attention: {cols} columns do not split into {parts} x {heads} heads");
        }
        Ok(Heads {
            batch: rows / tokens,
            tokens,
            parts,
            heads,
            dim: cols / (parts * heads),
        })
    }

    pub(super) fn elements(&self) -> usize {
        self.batch * self.tokens * self.parts * self.heads * self.dim
    }

    /// One part's head-major shape `(B, H, N, E)`.
    fn part_dims(&self) -> [usize; 4] {
        [self.batch, self.heads, self.tokens, self.dim]
    }

    /// The kernels' arguments `B, N, S, H, V` for chunks of `units` copy units.
    fn args(&self, units: usize) -> [i32; 5] {
        [self.batch, self.tokens, self.parts, self.heads, units].map(|v| v as i32)
    }

    /// The copy unit of `split_heads_u*`/`merge_heads_u*` for elements of `size` bytes
    /// at `addresses` (16, 8, 4, 2 or 1 bytes: the widest that divides a chunk of `E`
    /// elements and every address), and the chunk's length in units.
    fn unit(&self, size: usize, addresses: &[CUdeviceptr]) -> (usize, usize) {
        let bytes = self.dim * size;
        let unit = [16, 8, 4, 2, 1]
            .into_iter()
            .find(|&u| bytes.is_multiple_of(u) && addresses.iter().all(|a| a % u as u64 == 0))
            .unwrap_or(1);
        (unit, bytes / unit)
    }

    /// Runs `split_heads_u*` (`split`) or `merge_heads_u*` from the token-major or
    /// head-major `sources` (one, or one per part) into `out`, all of `dtype`.
    fn copy(
        &self,
        split: bool,
        dtype: DType,
        sources: &[CUdeviceptr],
        out: &CudaStorage,
    ) -> Result<()> {
        let dev = out.device();
        let size = dtype.size_in_bytes();
        let dst = address(out, 0)?;
        let mut addresses = sources.to_vec();
        addresses.push(dst);
        let (unit, units) = self.unit(size, &addresses);
        let kind = if split { "split" } else { "merge" };
        let f = func(dev, &format!("{kind}_heads_u{unit}"))?;
        let stream = dev.cuda_stream();
        let mut b = stream.launch_builder(&f);
        // merge takes three part pointers; unused ones repeat the last (the kernel reads
        // parts < S only).
        let count = if split { 1 } else { 3 };
        for i in 0..count {
            b.arg(&sources[i.min(sources.len() - 1)]);
        }
        b.arg(&dst);
        let args = self.args(units);
        for v in &args {
            b.arg(v);
        }
        let total = (self.elements() * size / unit) as u32;
        let cfg = LaunchConfig {
            grid_dim: (total.div_ceil(256).clamp(1, 1 << 20), 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        unsafe { b.launch(cfg) }.w()?;
        Ok(())
    }
}

/// `x` token-major -> a new head-major storage, by `split_heads_u*`.
fn split(s: &CudaStorage, l: &Layout, h: Heads) -> Result<CudaStorage> {
    if !l.is_contiguous() || l.shape().elem_count() != h.elements() {
        bail!(
            "split_heads: a contiguous input of {} elements",
            h.elements()
        );
    }
    let y = alloc(s.device(), s.dtype(), h.elements())?;
    h.copy(true, s.dtype(), &[address(s, l.start_offset())?], &y)?;
    Ok(y)
}

/// Head-major parts (one per `h.parts`, each `(B, H, N, E)`) -> a new token-major
/// storage, by `merge_heads_u*`.
fn merge(parts: &[(&CudaStorage, &Layout)], h: Heads) -> Result<CudaStorage> {
    if parts.len() != h.parts || !(1..=3).contains(&parts.len()) {
        bail!(
            "merge_heads: {} parts for a layout of {}",
            parts.len(),
            h.parts
        );
    }
    let dtype = parts[0].0.dtype();
    let mut sources = Vec::with_capacity(parts.len());
    for (s, l) in parts {
        if !l.is_contiguous()
            || l.shape().elem_count() * h.parts != h.elements()
            || s.dtype() != dtype
        {
            bail!(
                "merge_heads: contiguous {dtype:?} parts of {} elements",
                h.elements() / h.parts
            );
        }
        sources.push(address(s, l.start_offset())?);
    }
    let y = alloc(parts[0].0.device(), dtype, h.elements())?;
    h.copy(false, dtype, &sources, &y)?;
    Ok(y)
}

/// A new uninitialised storage of `n` elements of `dtype` (f32 or bf16) on `dev`.
pub(super) fn alloc(dev: &CudaDevice, dtype: DType, n: usize) -> Result<CudaStorage> {
    let slice = match dtype {
        DType::F32 => CudaStorageSlice::F32(unsafe { dev.alloc::<f32>(n)? }),
        DType::BF16 => CudaStorageSlice::BF16(unsafe { dev.alloc::<bf16>(n)? }),
        other => bail!("attention: f32 or bf16, not {other:?}"),
    };
    Ok(wrap(slice, dev))
}

/// The device address of element `offset` of `s`.
pub(super) fn address(s: &CudaStorage, offset: usize) -> Result<CUdeviceptr> {
    let stream = s.device().cuda_stream();
    Ok(match &s.slice {
        CudaStorageSlice::F32(x) => x.device_ptr(&stream).0 + 4 * offset as u64,
        CudaStorageSlice::BF16(x) => x.device_ptr(&stream).0 + 2 * offset as u64,
        _ => bail!("attention: f32 or bf16 only"),
    })
}

/// The attention's buffers for one head-major `(3, B, H, N, E)` storage of q, k, v:
/// their sizes, and the score rows padded to `np` (a multiple of 8 elements, 16 bytes in
/// bf16) for cuBLAS.
struct Plan<'a> {
    parts: &'a CudaStorage,
    dtype: DType,
    /// `B * H` products.
    batch: usize,
    n: usize,
    np: usize,
    e: usize,
}

impl Plan<'_> {
    fn new(parts: &CudaStorage, h: Heads) -> Plan<'_> {
        Plan {
            parts,
            dtype: parts.dtype(),
            batch: h.batch * h.heads,
            n: h.tokens,
            np: h.tokens.next_multiple_of(8),
            e: h.dim,
        }
    }

    fn part_len(&self) -> usize {
        self.batch * self.n * self.e
    }

    /// Part `i` (0: q, 1: k, 2: v), `(N, E)` per head, read transposed or not.
    fn part(&self, i: usize, transposed: bool) -> Result<Operand> {
        Ok(Operand {
            ptr: address(self.parts, i * self.part_len())?,
            ld: self.e,
            stride: self.n * self.e,
            transposed,
        })
    }

    /// A `(B*H, N, E)` storage of this plan.
    fn heads_like(&self) -> Result<CudaStorage> {
        alloc(self.parts.device(), self.dtype, self.part_len())
    }

    fn as_heads(&self, s: &CudaStorage, transposed: bool) -> Result<Operand> {
        Ok(Operand {
            ptr: address(s, 0)?,
            ld: self.e,
            stride: self.n * self.e,
            transposed,
        })
    }

    /// A padded `(B*H, N, np)` score storage of this plan.
    fn scores_like(&self) -> Result<CudaStorage> {
        alloc(
            self.parts.device(),
            self.dtype,
            self.batch * self.n * self.np,
        )
    }

    fn as_scores(&self, s: &CudaStorage, transposed: bool) -> Result<Operand> {
        Ok(Operand {
            ptr: address(s, 0)?,
            ld: self.np,
            stride: self.n * self.np,
            transposed,
        })
    }

    /// `c = a b` per head: `a` is `m x k`, `b` `k x n` (as read), `c` `m x n`.
    fn product(
        &self,
        (m, n, k): (usize, usize, usize),
        a: Operand,
        b: Operand,
        c: Operand,
    ) -> Result<()> {
        gemm(
            self.parts.device(),
            (self.dtype, self.dtype),
            self.batch,
            (m, n, k),
            a,
            b,
            c,
        )
    }

    /// `softmax(scale * q k^T)` per head, in padded rows.
    fn probabilities(&self, scale: f32) -> Result<CudaStorage> {
        let p = self.scores_like()?;
        let (n, e) = (self.n, self.e);
        self.product(
            (n, n, e),
            self.part(0, false)?,
            self.part(1, true)?,
            self.as_scores(&p, false)?,
        )?;
        self.softmax("fwd", &p, &p, &p, scale)?;
        Ok(p)
    }

    /// `softmax_<stage>` over the padded score rows: `fwd` reads `x`, `bwd` reads `y` = `x`
    /// and `dy` = `dy`; both write `out` (in place is fine).
    fn softmax(
        &self,
        stage: &str,
        x: &CudaStorage,
        dy: &CudaStorage,
        out: &CudaStorage,
        scale: f32,
    ) -> Result<()> {
        let dev = self.parts.device();
        let dt = dtype_name(self.dtype)?;
        let f = func(
            dev,
            &format!("softmax_{stage}_{dt}_{dt}_{}", width(self.n)?),
        )?;
        let rows = self.batch * self.n;
        let (rows_i, cols_i, ld_i) = (rows as i32, self.n as i32, self.np as i32);
        let (x, dy, out) = (address(x, 0)?, address(dy, 0)?, address(out, 0)?);
        let stream = dev.cuda_stream();
        let mut l = stream.launch_builder(&f);
        l.arg(&x);
        if stage == "bwd" {
            l.arg(&dy);
        }
        l.arg(&out).arg(&rows_i).arg(&cols_i).arg(&ld_i).arg(&scale);
        unsafe { l.launch(row_grid(rows)) }.w()?;
        Ok(())
    }
}

struct AttentionQkv {
    tokens: usize,
    heads: usize,
    scale: f32,
    /// Where the logsumexp per query is asked for: the tensor-core forward's.
    lse: Option<OnceLock<CudaStorage>>,
}

impl AttentionQkv {
    fn new(tokens: usize, heads: usize, scale: f64, keep_lse: bool) -> AttentionQkv {
        AttentionQkv {
            tokens,
            heads,
            scale: scale as f32,
            lse: keep_lse.then(OnceLock::new),
        }
    }
}

impl CustomOp1 for AttentionQkv {
    fn name(&self) -> &'static str {
        "mimco-attention"
    }

    cuda_only!(1);

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        let (rows, cols) = l.shape().dims2()?;
        let h = Heads::new(rows, cols, self.tokens, 3, self.heads)?;
        if flash::applies(&h, &[(s, l)]) {
            let (out, lse) = flash::forward(s, l, h, self.scale, self.lse.is_some())?;
            if let (Some(cell), Some(lse)) = (&self.lse, lse) {
                let _ = cell.set(lse);
            }
            return Ok((out, Shape::from((rows, cols / 3))));
        }
        let parts = split(s, l, h)?;
        let plan = Plan::new(&parts, h);
        let p = plan.probabilities(self.scale)?;
        let out = plan.heads_like()?;
        let (n, e) = (plan.n, plan.e);
        plan.product(
            (n, e, n),
            plan.as_scores(&p, false)?,
            plan.part(2, false)?,
            plan.as_heads(&out, false)?,
        )?;
        let one = Heads { parts: 1, ..h };
        let merged = merge(
            &[(&out, &Layout::contiguous(h.part_dims().as_slice()))],
            one,
        )?;
        Ok((merged, Shape::from((rows, cols / 3))))
    }

    fn bwd(&self, qkv: &Tensor, out: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let scale = self.scale as f64;
        attention_qkv_bwd(qkv, out, None, self.tokens, self.heads, scale, grad).map(Some)
    }
}

/// The gradient of [`attention_qkv`] at `qkv` (whose output was `out`, and `lse` the
/// logsumexp [`attention_qkv_lse`] gave, if any) for the output gradient `dy`, in the
/// dtype of `qkv`, recomputing the probabilities.
pub fn attention_qkv_bwd(
    qkv: &Tensor,
    out: &Tensor,
    lse: Option<&Tensor>,
    tokens: usize,
    heads: usize,
    scale: f64,
    dy: &Tensor,
) -> Result<Tensor> {
    if let Some(lse) = lse {
        let (rows, _) = qkv.dims2()?;
        if lse.dims() != [rows * heads] || lse.dtype() != DType::F32 || !lse.is_contiguous() {
            bail!(
                "attention backward: the logsumexp {lse:?} is not {} f32 values",
                rows * heads
            );
        }
    }
    let dy = dy.to_dtype(qkv.dtype())?.contiguous()?;
    qkv.contiguous()?.apply_op3_no_bwd(
        &out.contiguous()?,
        &dy,
        &AttentionQkvBwd {
            tokens,
            heads,
            scale: scale as f32,
            lse: lse.cloned(),
        },
    )
}

/// `(qkv, out, d out)` -> `d qkv` of [`AttentionQkv`], recomputing the probabilities
/// (`out` and `lse` are read by the tensor-core kernels only).
struct AttentionQkvBwd {
    tokens: usize,
    heads: usize,
    scale: f32,
    lse: Option<Tensor>,
}

impl CustomOp3 for AttentionQkvBwd {
    fn name(&self) -> &'static str {
        "mimco-attention-bwd"
    }

    cuda_only!(3);

    fn cuda_fwd(
        &self,
        s: &CudaStorage,
        l: &Layout,
        os: &CudaStorage,
        ol: &Layout,
        gs: &CudaStorage,
        gl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (rows, cols) = l.shape().dims2()?;
        let h = Heads::new(rows, cols, self.tokens, 3, self.heads)?;
        for (what, (ts, tl)) in [("gradient", (gs, gl)), ("output", (os, ol))] {
            if tl.shape().dims2()? != (rows, cols / 3) || ts.dtype() != s.dtype() {
                bail!(
                    "attention backward: {what} {:?} for qkv {:?}",
                    tl.dims(),
                    l.dims()
                );
            }
        }
        if flash::applies(&h, &[(s, l), (os, ol), (gs, gl)]) {
            let lse = self.lse.as_ref().map(Tensor::storage_and_layout);
            let lse = match &lse {
                Some((storage, layout)) => match &**storage {
                    Storage::Cuda(s) if layout.start_offset() == 0 => Some(s),
                    _ => bail!("attention backward: the logsumexp is not a whole CUDA tensor"),
                },
                None => None,
            };
            let dqkv = flash::backward((s, l), (os, ol), (gs, gl), lse, h, self.scale)?;
            return Ok((dqkv, Shape::from((rows, cols))));
        }
        let parts = split(s, l, h)?;
        let d_out = split(gs, gl, Heads { parts: 1, ..h })?;
        let plan = Plan::new(&parts, h);
        let (n, e) = (plan.n, plan.e);
        let p = plan.probabilities(self.scale)?;
        // dv = p^T d_out; dp = d_out v^T; ds = softmax'(p) dp (in place); dq = ds k;
        // dk = ds^T q.
        let dv = plan.heads_like()?;
        let d_o = plan.as_heads(&d_out, false)?;
        plan.product(
            (n, e, n),
            plan.as_scores(&p, true)?,
            d_o,
            plan.as_heads(&dv, false)?,
        )?;
        let ds = plan.scores_like()?;
        plan.product(
            (n, n, e),
            d_o,
            plan.part(2, true)?,
            plan.as_scores(&ds, false)?,
        )?;
        plan.softmax("bwd", &p, &ds, &ds, self.scale)?;
        let dq = plan.heads_like()?;
        plan.product(
            (n, e, n),
            plan.as_scores(&ds, false)?,
            plan.part(1, false)?,
            plan.as_heads(&dq, false)?,
        )?;
        let dk = plan.heads_like()?;
        plan.product(
            (n, e, n),
            plan.as_scores(&ds, true)?,
            plan.part(0, false)?,
            plan.as_heads(&dk, false)?,
        )?;
        let at = Layout::contiguous(h.part_dims().as_slice());
        let dqkv = merge(&[(&dq, &at), (&dk, &at), (&dv, &at)], h)?;
        Ok((dqkv, Shape::from((rows, cols))))
    }
}

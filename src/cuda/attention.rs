//! Multi-head self-attention on the packed `q|k|v` projection, forward and backward, as
//! one node of Candle's graph.
//!
//! Written with Candle's ops, attention is a dozen graph nodes per block (reshape,
//! permute, three narrows, three copies, transpose, reshape), and Candle's backward gives
//! each node a zero-filled gradient plus an addition, all the size of `qkv`: on one H200
//! that was a third of a ViT-S/16 MimCo step (Nsight Compute, benches/results/). Here one
//! kernel splits the heads, cuBLAS computes `q k^T` and `p v` (Candle's batched matmul),
//! the fused softmax runs in place between them, and one kernel merges the heads. The
//! `(B, H, N, N)` probabilities are not kept: the backward recomputes them from `q` and
//! `k`, trading one more `q k^T` for `B * H * N^2` stored elements per layer.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaStorageSlice, WrapErr};
use candle_core::{
    CpuStorage, CudaStorage, CustomOp1, CustomOp2, CustomOp3, DType, IndexOp, Layout, Result,
    Shape, Tensor, bail,
};
use half::bf16;

use super::softmax::SoftmaxBwd;
use super::*;

/// `softmax(scale * q k^T) v` per head for `qkv` of `(B * tokens, 3 * D)` (each row a
/// token's `q|k|v`, heads side by side in each, as timm's `attn.qkv` writes them), f32 or
/// bf16 (made contiguous); returns `(B * tokens, D)`, heads side by side.
pub fn attention_qkv(qkv: &Tensor, tokens: usize, heads: usize, scale: f64) -> Result<Tensor> {
    let (rows, cols) = qkv.dims2()?;
    Heads::new(rows, cols, tokens, 3, heads)?;
    qkv.contiguous()?.apply_op1(AttentionQkv {
        tokens,
        heads,
        scale: scale as f32,
    })
}

/// The shape of a heads layout change: `(B, N, S, H, E)` token-major, `(S, B, H, N, E)`
/// head-major.
#[derive(Clone, Copy, Debug)]
struct Heads {
    batch: usize,
    tokens: usize,
    parts: usize,
    heads: usize,
    dim: usize,
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

    fn elements(&self) -> usize {
        self.batch * self.tokens * self.parts * self.heads * self.dim
    }

    /// One part's head-major shape `(B, H, N, E)`.
    fn part_dims(&self) -> [usize; 4] {
        [self.batch, self.heads, self.tokens, self.dim]
    }

    fn args(&self) -> [i32; 5] {
        [self.batch, self.tokens, self.parts, self.heads, self.dim].map(|v| v as i32)
    }

    /// The launch of `split_heads`/`merge_heads`: a warp per chunk of `E` elements, 8
    /// warps per block.
    fn grid(&self) -> LaunchConfig {
        let chunks = (self.elements() / self.dim.max(1)) as u32;
        LaunchConfig {
            grid_dim: (chunks.div_ceil(8).clamp(1, 1 << 20), 1, 1),
            block_dim: (32, 8, 1),
            shared_mem_bytes: 0,
        }
    }
}

/// `x` token-major -> a new head-major storage, by `split_heads_<dtype>`.
fn split(s: &CudaStorage, l: &Layout, h: Heads) -> Result<CudaStorage> {
    fn go<T: CudaDType + DeviceRepr>(
        dev: &CudaDevice,
        f: &CudaFunction,
        x: CudaView<T>,
        h: Heads,
    ) -> Result<CudaSlice<T>> {
        let y = unsafe { dev.alloc::<T>(h.elements())? };
        let a = h.args();
        let stream = dev.cuda_stream();
        let mut b = stream.launch_builder(f);
        b.arg(&x).arg(&y);
        for v in &a {
            b.arg(v);
        }
        unsafe { b.launch(h.grid()) }.w()?;
        Ok(y)
    }
    let dev = s.device();
    let f = func(dev, &format!("split_heads_{}", dtype_name(s.dtype())?))?;
    let slice = match s.dtype() {
        DType::F32 => CudaStorageSlice::F32(go(dev, &f, contiguous::<f32>(s, l, "x")?, h)?),
        _ => CudaStorageSlice::BF16(go(dev, &f, contiguous::<bf16>(s, l, "x")?, h)?),
    };
    Ok(wrap(slice, dev))
}

/// Head-major parts (one per `h.parts`, each `(B, H, N, E)`) -> a new token-major
/// storage, by `merge_heads_<dtype>`.
fn merge(parts: &[(&CudaStorage, &Layout)], h: Heads) -> Result<CudaStorage> {
    fn go<T: CudaDType + DeviceRepr>(
        dev: &CudaDevice,
        f: &CudaFunction,
        parts: &[(&CudaStorage, &Layout)],
        h: Heads,
    ) -> Result<CudaSlice<T>> {
        let views = parts
            .iter()
            .map(|(s, l)| contiguous::<T>(s, l, "part"))
            .collect::<Result<Vec<_>>>()?;
        let y = unsafe { dev.alloc::<T>(h.elements())? };
        let a = h.args();
        let stream = dev.cuda_stream();
        let mut b = stream.launch_builder(f);
        // Unused part pointers repeat the last part (the kernel reads parts < S only).
        for i in 0..3 {
            b.arg(&views[i.min(views.len() - 1)]);
        }
        b.arg(&y);
        for v in &a {
            b.arg(v);
        }
        unsafe { b.launch(h.grid()) }.w()?;
        Ok(y)
    }
    if parts.len() != h.parts || !(1..=3).contains(&parts.len()) {
        bail!(
            "merge_heads: {} parts for a layout of {}",
            parts.len(),
            h.parts
        );
    }
    let dev = parts[0].0.device();
    let dt = parts[0].0.dtype();
    let f = func(dev, &format!("merge_heads_{}", dtype_name(dt)?))?;
    let slice = match dt {
        DType::F32 => CudaStorageSlice::F32(go::<f32>(dev, &f, parts, h)?),
        _ => CudaStorageSlice::BF16(go::<bf16>(dev, &f, parts, h)?),
    };
    Ok(wrap(slice, dev))
}

/// `softmax(scale * q k^T)` as a new contiguous storage `(B*H, N, M)`, for `q`, `k`
/// `(B, H, N, d)` alike (any layout Candle's batched matmul takes).
fn probabilities(
    qs: &CudaStorage,
    ql: &Layout,
    ks: &CudaStorage,
    kl: &Layout,
    scale: f32,
) -> Result<(CudaStorage, Vec<usize>)> {
    let (q, k) = (ql.dims(), kl.dims());
    if q.len() != 4 || k.len() != 4 || q[..2] != k[..2] || q[3] != k[3] {
        bail!("attention: q {q:?} and k {k:?} must be (B, H, N, d) alike");
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
        _ => bail!("attention: f32 or bf16 only"),
    }
    Ok((scores, vec![q[0], q[1], n, m]))
}

struct AttentionQkv {
    tokens: usize,
    heads: usize,
    scale: f32,
}

impl CustomOp1 for AttentionQkv {
    fn name(&self) -> &'static str {
        "mimco-attention"
    }

    cuda_only!(1);

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        let (rows, cols) = l.shape().dims2()?;
        let h = Heads::new(rows, cols, self.tokens, 3, self.heads)?;
        let qkv = split(s, l, h)?;
        let part = h.part_dims();
        let size: usize = part.iter().product();
        let at = |i: usize| Layout::contiguous_with_offset(part.as_slice(), i * size);
        let (p, dims) = probabilities(&qkv, &at(0), &qkv, &at(1), self.scale)?;
        let (batch, n, e) = (part[0] * part[1], part[2], part[3]);
        let out = p.matmul(
            &qkv,
            (batch, n, e, dims[3]),
            &Layout::contiguous(dims),
            &at(2),
        )?;
        let one = Heads { parts: 1, ..h };
        let merged = merge(&[(&out, &Layout::contiguous(part.as_slice()))], one)?;
        Ok((merged, Shape::from((rows, cols / 3))))
    }

    fn bwd(&self, qkv: &Tensor, _out: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let split = |t: &Tensor, parts: usize| {
            t.contiguous()?.apply_op1_no_bwd(&SplitHeads {
                tokens: self.tokens,
                heads: self.heads,
                parts,
            })
        };
        let heads = split(qkv, 3)?;
        let (q, k, v) = (heads.i(0)?, heads.i(1)?, heads.i(2)?);
        let grad = split(&grad.to_dtype(qkv.dtype())?, 1)?.i(0)?;
        let p = q.apply_op2_no_bwd(&k, &Probabilities { scale: self.scale })?;
        let dv = p.t()?.matmul(&grad)?;
        let dp = grad.matmul(&v.t()?)?;
        let ds = p.apply_op2_no_bwd(&dp, &SoftmaxBwd { scale: self.scale })?;
        let (dq, dk) = (ds.matmul(&k)?, ds.t()?.matmul(&q)?);
        let dqkv = dq.apply_op3_no_bwd(
            &dk,
            &dv,
            &MergeHeads {
                tokens: self.tokens,
            },
        )?;
        Ok(Some(dqkv))
    }
}

/// `(B * tokens, S * H * E)` token-major -> `(S, B, H, tokens, E)` head-major.
struct SplitHeads {
    tokens: usize,
    heads: usize,
    parts: usize,
}

impl CustomOp1 for SplitHeads {
    fn name(&self) -> &'static str {
        "mimco-split-heads"
    }

    cuda_only!(1);

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        let (rows, cols) = l.shape().dims2()?;
        let h = Heads::new(rows, cols, self.tokens, self.parts, self.heads)?;
        let [b, hh, n, e] = h.part_dims();
        Ok((split(s, l, h)?, Shape::from(vec![h.parts, b, hh, n, e])))
    }
}

/// Three `(B, H, tokens, E)` head-major parts -> `(B * tokens, 3 * H * E)` token-major.
struct MergeHeads {
    tokens: usize,
}

impl CustomOp3 for MergeHeads {
    fn name(&self) -> &'static str {
        "mimco-merge-heads"
    }

    cuda_only!(3);

    fn cuda_fwd(
        &self,
        s0: &CudaStorage,
        l0: &Layout,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let d = l0.dims();
        if d.len() != 4 || d[2] != self.tokens || l1.dims() != d || l2.dims() != d {
            bail!("merge_heads: parts {d:?}, {:?}, {:?}", l1.dims(), l2.dims());
        }
        let h = Heads {
            batch: d[0],
            tokens: d[2],
            parts: 3,
            heads: d[1],
            dim: d[3],
        };
        let merged = merge(&[(s0, l0), (s1, l1), (s2, l2)], h)?;
        Ok((merged, Shape::from((d[0] * d[2], 3 * d[1] * d[3]))))
    }
}

/// `(q, k)` -> `softmax(scale * q k^T)`, for the backward.
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

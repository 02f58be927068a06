//! InfoNCE against a queue of negatives (MimCo's Eq. 1 and 3) per row, forward and
//! backward, as one node of Candle's graph.
//!
//! Composed, the `(M, 1 + K)` logits (31k x 4097 in f32 for ViT-S/16 at batch 256) pass
//! through a dozen elementwise nodes, each of which Candle's backward zero-fills and adds
//! at that size: 13 ms of a 163 ms step on an H200. Here cuBLAS computes `q queue^T`, one
//! warp per row takes the logsumexp, and the backward recomputes the product. Under bf16
//! precision the products take bf16 inputs, as `torch.autocast` runs a matmul, but write
//! f32 (autocast writes bf16 logits): in f32 the patch loss's three products were 4.2 ms of
//! a 130 ms ViT-S/16 step on an H200 (Nsight Compute, `benches/results/`).

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
use candle_core::cuda_backend::{CudaStorageSlice, WrapErr};
use candle_core::{
    CpuStorage, CudaStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor, bail,
};

use super::attention::{address, alloc};
use super::gemm::{Operand, gemm};
use super::*;

/// `logsumexp([q_i.k_i, q_i queue^T] / tau) - q_i.k_i / tau` for each row `i` of `q` and
/// `k` `(M, C)` against `queue` `(K, C)`, all f32 and unit-length rows; `(M)` losses.
/// `q queue^T` takes its inputs in `product` (bf16 or f32; f32 accumulation and logits).
/// Gradients flow into `q` only.
pub fn info_nce(
    q: &Tensor,
    k: &Tensor,
    queue: &Tensor,
    tau: f64,
    product: DType,
) -> Result<Tensor> {
    let (m, c) = q.dims2()?;
    if k.dims2()? != (m, c) || queue.dim(1)? != c {
        bail!(
            "info_nce: q {:?}, k {:?}, queue {:?}",
            q.dims(),
            k.dims(),
            queue.dims()
        );
    }
    if [q, k, queue].iter().any(|t| t.dtype() != DType::F32) {
        bail!("info_nce: f32 q, k and queue");
    }
    q.contiguous()?.apply_op3(
        &k.detach().contiguous()?,
        &queue.detach().contiguous()?,
        InfoNce {
            inv_tau: (1.0 / tau) as f32,
            product,
        },
    )
}

/// `a op(b)` in f32 for a row-major `a` `(m, k)` and `b`, `(n, k)` read transposed or
/// `(k, n)`, both taken in `dtype` (cast when they are not), f32 accumulation.
fn product_f32(
    (a, al): (&CudaStorage, &Layout),
    (b, bl): (&CudaStorage, &Layout),
    transpose_b: bool,
    dtype: DType,
) -> Result<(CudaStorage, Shape)> {
    let (m, k) = al.shape().dims2()?;
    let (b0, b1) = bl.shape().dims2()?;
    let (kb, n) = if transpose_b { (b1, b0) } else { (b0, b1) };
    if kb != k {
        bail!("info_nce: a product of {:?} and {:?}", al.dims(), bl.dims());
    }
    let dev = a.device();
    // Each input in `dtype`, contiguous: the casts live until the product is queued.
    let mut casts = Vec::new();
    let mut start = |s: &CudaStorage, l: &Layout| -> Result<_> {
        if s.dtype() == dtype && l.is_contiguous() {
            return address(s, l.start_offset());
        }
        let cast = s.to_dtype(l, dtype)?;
        let at = address(&cast, 0)?;
        casts.push(cast);
        Ok(at)
    };
    let (a_at, b_at) = (start(a, al)?, start(b, bl)?);
    let out = alloc(dev, DType::F32, m * n)?;
    let operand = |ptr, ld, len, transposed| Operand {
        ptr,
        ld,
        stride: len,
        transposed,
    };
    gemm(
        dev,
        (dtype, DType::F32),
        1,
        (m, n, k),
        operand(a_at, k, m * k, false),
        operand(b_at, b1, k * n, transpose_b),
        operand(address(&out, 0)?, n, m * n, false),
    )?;
    drop(casts);
    Ok((out, Shape::from((m, n))))
}

/// `(a, b)` -> `a op(b)` in f32 through [`product_f32`].
struct Product {
    dtype: DType,
    transpose_b: bool,
}

impl CustomOp2 for Product {
    fn name(&self) -> &'static str {
        "mimco-info-nce-product"
    }

    cuda_only!(2);

    fn cuda_fwd(
        &self,
        a: &CudaStorage,
        al: &Layout,
        b: &CudaStorage,
        bl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        product_f32((a, al), (b, bl), self.transpose_b, self.dtype)
    }
}

struct InfoNce {
    inv_tau: f32,
    product: DType,
}

impl CustomOp3 for InfoNce {
    fn name(&self) -> &'static str {
        "mimco-info-nce"
    }

    cuda_only!(3);

    fn cuda_fwd(
        &self,
        qs: &CudaStorage,
        ql: &Layout,
        ks: &CudaStorage,
        kl: &Layout,
        ns: &CudaStorage,
        nl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (m, c) = ql.shape().dims2()?;
        let kk = nl.dims()[0];
        let (neg, _) = product_f32((qs, ql), (ns, nl), true, self.product)?;
        let dev = qs.device();
        let neg_l = Layout::contiguous((m, kk));
        let (q, k, n) = (
            contiguous::<f32>(qs, ql, "q")?,
            contiguous::<f32>(ks, kl, "k")?,
            contiguous::<f32>(&neg, &neg_l, "negatives")?,
        );
        let loss = unsafe { dev.alloc::<f32>(m)? };
        let f = func(dev, "info_nce_fwd_f32")?;
        let (m_i, k_i, c_i) = (m as i32, kk as i32, c as i32);
        let stream = dev.cuda_stream();
        let mut b = stream.launch_builder(&f);
        b.arg(&q).arg(&k).arg(&n).arg(&loss);
        b.arg(&m_i).arg(&k_i).arg(&c_i).arg(&self.inv_tau);
        unsafe { b.launch(row_grid(m)) }.w()?;
        Ok((wrap(CudaStorageSlice::F32(loss), dev), Shape::from(m)))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        queue: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let product = |transpose_b| Product {
            dtype: self.product,
            transpose_b,
        };
        let neg = q.apply_op2_no_bwd(queue, &product(true))?;
        let pos = (q * k)?.sum(1)?;
        let grad = grad.to_dtype(DType::F32)?.contiguous()?;
        let dneg = neg.apply_op3_no_bwd(
            &pos,
            &grad,
            &InfoNceBwd {
                inv_tau: self.inv_tau,
            },
        )?;
        let dpos = dneg.sum_keepdim(1)?.neg()?;
        let dq = (dneg.apply_op2_no_bwd(queue, &product(false))? + k.broadcast_mul(&dpos)?)?;
        Ok((Some(dq), None, None))
    }
}

/// `(neg, pos, g)` -> the gradient of the `g`-weighted losses with respect to `neg`.
struct InfoNceBwd {
    inv_tau: f32,
}

impl CustomOp3 for InfoNceBwd {
    fn name(&self) -> &'static str {
        "mimco-info-nce-bwd"
    }

    cuda_only!(3);

    fn cuda_fwd(
        &self,
        ns: &CudaStorage,
        nl: &Layout,
        ps: &CudaStorage,
        pl: &Layout,
        gs: &CudaStorage,
        gl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (m, kk) = nl.shape().dims2()?;
        if pl.shape().elem_count() != m || gl.shape().elem_count() != m {
            bail!(
                "info_nce backward: {m} rows, pos {:?}, grad {:?}",
                pl.dims(),
                gl.dims()
            );
        }
        let dev = ns.device();
        let (n, p, g) = (
            contiguous::<f32>(ns, nl, "negatives")?,
            contiguous::<f32>(ps, pl, "pos")?,
            contiguous::<f32>(gs, gl, "grad")?,
        );
        let dneg = unsafe { dev.alloc::<f32>(m * kk)? };
        let f = func(dev, "info_nce_bwd_f32")?;
        let (m_i, k_i) = (m as i32, kk as i32);
        let stream = dev.cuda_stream();
        let mut b = stream.launch_builder(&f);
        b.arg(&n).arg(&p).arg(&g).arg(&dneg);
        b.arg(&m_i).arg(&k_i).arg(&self.inv_tau);
        unsafe { b.launch(row_grid(m)) }.w()?;
        Ok((wrap(CudaStorageSlice::F32(dneg), dev), Shape::from((m, kk))))
    }
}

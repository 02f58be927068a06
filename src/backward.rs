//! The backward of the ops in a ViT block, called directly by a hand-written backward
//! ([`crate::models::blocks`]) rather than by Candle's autograd.
//!
//! Each function returns the gradients of one op of [`crate::functional`] at its inputs
//! for a given output gradient. Where the forward took a fused CUDA kernel, so does its
//! backward (the kernel's own backward, checked on the GPU by `mimco bench kernels`);
//! everywhere else Candle's autograd differentiates the composed forward on a copy of the
//! inputs, which makes these functions exact by construction on the CPU, the reference
//! the hand-written backward is tested against.

use candle_core::{DType, Result, Tensor, Var};

use crate::functional::{self, Act};

/// `(dx + skip, the same in bf16, dweight, dbias)` of [`functional::layer_norm_to`] at `x`,
/// `weight`, `bias` for the gradient `dy` of its output (written in `out`), where `skip` is
/// the gradient that reaches `x` past the norm (a residual connection): f32, as the
/// inputs. On CUDA the addition is part of the norm's backward pass, and where `out` is
/// bf16 that pass also writes the sum in bf16, for the bf16 layer whose output joined `x`
/// (`None` elsewhere: the caller casts).
pub fn layer_norm(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
    out: DType,
    dy: &Tensor,
    skip: &Tensor,
) -> Result<(Tensor, Option<Tensor>, Tensor, Tensor)> {
    #[cfg(feature = "cuda")]
    if functional::fused_layer_norm(x, weight) {
        let fold =
            skip.dtype() == DType::F32 && functional::enabled(functional::FastPath::Residual);
        let bf16 = fold && out == DType::BF16;
        let (dx, dx_bf16, dw, db) =
            crate::cuda::layer_norm_bwd(x, weight, eps, dy, fold.then_some(skip), bf16)?;
        return Ok((if fold { dx } else { (dx + skip)? }, dx_bf16, dw, db));
    }
    let [dx, dw, db] = autograd([x, weight, bias], dy, |[x, w, b]| {
        functional::layer_norm_to(x, w, b, eps, out)
    })?;
    Ok(((dx + skip)?, None, dw, db))
}

/// `(dx, dweight, dbias)` of [`functional::linear`] at `x`, `weight`, `bias` for the
/// gradient `dy` of its output (written in `out`): `dx` in the dtype of `x`, the others
/// f32 (whatever the dtype of `weight`: an f32 master weight or its cast).
pub fn linear(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    act: Act,
    out: DType,
    dy: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    #[cfg(feature = "cuda")]
    if functional::fused_linear(x) {
        return crate::cuda::linear_bwd(x, weight, bias, act, dy);
    }
    let [dx, dw, db] = autograd([x, weight, bias], dy, |[x, w, b]| {
        functional::linear(x, w, b, act, out)
    })?;
    Ok((dx, dw.to_dtype(DType::F32)?, db))
}

/// `dqkv` of [`functional::attention_qkv`] at `qkv` (whose output was `out`, and `lse`
/// what [`functional::attention_qkv_lse`] kept) for the gradient `dy` of its output, in
/// the dtype of `qkv`.
pub fn attention_qkv(
    qkv: &Tensor,
    out: &Tensor,
    lse: Option<&Tensor>,
    tokens: usize,
    heads: usize,
    scale: f64,
    dy: &Tensor,
) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if functional::fused(qkv, tokens) {
        return crate::cuda::attention_qkv_bwd(qkv, out, lse, tokens, heads, scale, dy);
    }
    let _ = (out, lse); // the composed backward recomputes everything from qkv
    let [dqkv] = autograd([qkv], dy, |[qkv]| {
        functional::attention_qkv(qkv, tokens, heads, scale)
    })?;
    Ok(dqkv)
}

/// The gradients of `sum(f(inputs) * dy)` with respect to `inputs`, by Candle's autograd
/// on copies of the inputs (so nothing outside sees the graph). An input that the output
/// does not depend on gets zeros.
fn autograd<const N: usize>(
    inputs: [&Tensor; N],
    dy: &Tensor,
    f: impl FnOnce(&[Tensor; N]) -> Result<Tensor>,
) -> Result<[Tensor; N]> {
    let mut vars = Vec::with_capacity(N);
    for x in inputs {
        vars.push(Var::from_tensor(&x.detach())?.as_tensor().clone());
    }
    let vars: [Tensor; N] = vars.try_into().expect("N inputs");
    let y = f(&vars)?;
    let grads = (&y * dy.detach().to_dtype(y.dtype())?)?
        .sum_all()?
        .backward()?;
    let mut out = Vec::with_capacity(N);
    for v in &vars {
        out.push(match grads.get(v) {
            Some(g) => g.clone(),
            None => v.zeros_like()?,
        });
    }
    Ok(out.try_into().expect("N gradients"))
}

//! The ViT's pre-norm transformer blocks, and the stack of them as one node of Candle's
//! graph with a hand-written backward.
//!
//! Candle's backward gives the inputs of every graph node a zero-filled gradient and then
//! adds the node's contribution to it. With the fused per-op kernels, those fills and
//! additions were still 29 ms of the 130 ms of kernels in a ViT-S/16 MimCo step on an H200
//! (`badd` in `benches/results/2026-11-27-h200-fused/final`), most of them for the blocks'
//! nine nodes each. So while gradients are recorded and the fused kernels are in use,
//! `forward` runs the blocks outside the graph, keeps what their backward needs, and
//! joins the graph as one node whose backward calls each op's backward
//! ([`crate::backward`]) in reverse, adding gradients only where two paths meet (the two
//! residual joins per block). Everywhere else (CPU, `--kernels stock`, no gradients) the
//! blocks are ordinary graph nodes. `compare_stack` measures the two against each other;
//! a CPU test and `mimco bench kernels` on the GPU run it.
//!
//! The stack keeps per block its input, `qkv`, the attention output (and on the
//! tensor-core path its logsumexp per query, so that the backward does not recompute it),
//! the residual stream after attention and the GELU output; the two LayerNorms are
//! recomputed in the backward (one cheap pass each) rather than kept, and the f32 outputs
//! of `attn.proj` and `mlp.fc2` are not kept at all (the graph kept both). On CUDA in bf16
//! the LayerNorm backward also hands the residual stream's gradient to the layers before
//! it in bf16, so that they need no cast.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use candle_nn::{Init, VarBuilder};

use super::mlp::{Dense, linear};
use super::vit::VitConfig;
use crate::backward;
use crate::functional::{self, Act};

/// LayerNorm with parameters `weight`, `bias`, through the differentiable [`functional::layer_norm`].
#[derive(Clone, Debug)]
pub struct Norm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl Norm {
    /// Builds a LayerNorm of width `dim` under `vb`.
    pub fn new(vb: VarBuilder, dim: usize, eps: f64) -> Result<Norm> {
        Ok(Norm {
            weight: vb.get_with_hints(dim, "weight", Init::Const(1.0))?,
            bias: vb.get_with_hints(dim, "bias", Init::Const(0.0))?,
            eps,
        })
    }

    /// The normalised f32 `x`, in `out` (the dtype of the layer that reads it).
    pub fn forward_to(&self, x: &Tensor, out: DType) -> Result<Tensor> {
        functional::layer_norm_to(x, &self.weight, &self.bias, self.eps, out)
    }

    /// `(dx + skip, the same in bf16 where the kernel wrote it, dweight, dbias)` at `x` for
    /// the gradient `dy` of [`Norm::forward_to`]`(x, out)`, where `skip` is the gradient that
    /// reaches `x` by the residual connection past the norm ([`backward::layer_norm`]).
    fn backward(
        &self,
        x: &Tensor,
        out: DType,
        dy: &Tensor,
        skip: &Tensor,
    ) -> Result<(Tensor, Option<Tensor>, Tensor, Tensor)> {
        backward::layer_norm(x, &self.weight, &self.bias, self.eps, out, dy, skip)
    }

    fn detach(&self) -> Norm {
        Norm {
            weight: self.weight.detach(),
            bias: self.bias.detach(),
            eps: self.eps,
        }
    }
}

/// Pre-norm transformer block: `norm1`, multi-head self-attention (`attn.qkv`,
/// `attn.proj`), `norm2`, `mlp.fc1`, GELU (erf), `mlp.fc2`.
#[derive(Clone, Debug)]
pub(crate) struct Block {
    norm1: Norm,
    qkv: Dense,
    proj: Dense,
    heads: usize,
    norm2: Norm,
    fc1: Dense,
    fc2: Dense,
}

/// What a block's backward needs from its forward.
struct Saved {
    x: Tensor,
    qkv: Tensor,
    attention: Tensor,
    /// The attention's logsumexp per query, where its kernels keep one.
    lse: Option<Tensor>,
    x1: Tensor,
    hidden: Tensor,
}

/// Parameters per block, in the order of [`Block::params`].
const PARAMS: usize = 12;

impl Block {
    pub(crate) fn new(vb: VarBuilder, c: &VitConfig) -> Result<Block> {
        let hidden = (c.dim as f64 * c.mlp_ratio) as usize;
        Ok(Block {
            norm1: Norm::new(vb.pp("norm1"), c.dim, c.ln_eps)?,
            qkv: linear(vb.pp("attn.qkv"), c.dim, 3 * c.dim)?,
            proj: linear(vb.pp("attn.proj"), c.dim, c.dim)?,
            heads: c.heads,
            norm2: Norm::new(vb.pp("norm2"), c.dim, c.ln_eps)?,
            fc1: linear(vb.pp("mlp.fc1"), c.dim, hidden)?,
            fc2: linear(vb.pp("mlp.fc2"), hidden, c.dim)?,
        })
    }

    /// The attention's `1 / sqrt(head dim)`.
    fn scale(&self) -> Result<f64> {
        Ok((self.proj.params()[0].dim(0)? as f64 / self.heads as f64).powf(-0.5))
    }

    /// The block on `x`, `(B * N, D)` (2D, so that no reshape adds nodes to the graph),
    /// and what its backward needs. The residual stream `x` stays f32; each branch
    /// computes in `compute`. With `keep`, the caller runs [`Block::backward`] and the
    /// attention keeps what that can reuse (outside the graph); without it, the graph
    /// records the attention's backward.
    fn forward(
        &self,
        x: &Tensor,
        tokens: usize,
        compute: DType,
        keep: bool,
    ) -> Result<(Tensor, Saved)> {
        let qkv = self
            .qkv
            .forward_act(&self.norm1.forward_to(x, compute)?, Act::Identity)?;
        let (attention, lse) = match keep {
            true => functional::attention_qkv_lse(&qkv, tokens, self.heads, self.scale()?)?,
            false => {
                let attention = functional::attention_qkv(&qkv, tokens, self.heads, self.scale()?)?;
                (attention, None)
            }
        };
        let x1 = self.proj.forward_residual(&attention, x)?;
        let hidden = self
            .fc1
            .forward_act(&self.norm2.forward_to(&x1, compute)?, Act::Gelu)?;
        let y = self.fc2.forward_residual(&hidden, &x1)?;
        let saved = Saved {
            x: x.clone(),
            qkv,
            attention,
            lse,
            x1,
            hidden,
        };
        Ok((y, saved))
    }

    /// The gradients of the block's input (f32, and in bf16 where the norm's kernel wrote
    /// that too) and of its parameters (in the order of [`Block::params`]) for the gradient
    /// `dy` of its output (f32, and `dy_bf16` the same rounded, if at hand).
    fn backward(
        &self,
        s: &Saved,
        (dy, dy_bf16): (&Tensor, Option<&Tensor>),
        tokens: usize,
        compute: DType,
    ) -> Result<(Tensor, Option<Tensor>, [Tensor; PARAMS])> {
        let f32 = DType::F32;
        let [w, b] = self.fc2.params();
        let (d_hidden, d_fc2_w, d_fc2_b) =
            backward::linear(&s.hidden, w, b, Act::Identity, f32, dy_bf16.unwrap_or(dy))?;
        let normed2 = self.norm2.forward_to(&s.x1, compute)?;
        let [w, b] = self.fc1.params();
        let (d_normed2, d_fc1_w, d_fc1_b) =
            backward::linear(&normed2, w, b, Act::Gelu, compute, &d_hidden)?;
        let (d_x1, d_x1_bf16, d_norm2_w, d_norm2_b) =
            self.norm2.backward(&s.x1, compute, &d_normed2, dy)?;
        let [w, b] = self.proj.params();
        let (d_attention, d_proj_w, d_proj_b) = backward::linear(
            &s.attention,
            w,
            b,
            Act::Identity,
            f32,
            d_x1_bf16.as_ref().unwrap_or(&d_x1),
        )?;
        let d_qkv = backward::attention_qkv(
            &s.qkv,
            &s.attention,
            s.lse.as_ref(),
            tokens,
            self.heads,
            self.scale()?,
            &d_attention,
        )?;
        let normed1 = self.norm1.forward_to(&s.x, compute)?;
        let [w, b] = self.qkv.params();
        let (d_normed1, d_qkv_w, d_qkv_b) =
            backward::linear(&normed1, w, b, Act::Identity, compute, &d_qkv)?;
        let (d_x, d_x_bf16, d_norm1_w, d_norm1_b) =
            self.norm1.backward(&s.x, compute, &d_normed1, &d_x1)?;
        let grads = [
            d_norm1_w, d_norm1_b, d_qkv_w, d_qkv_b, d_proj_w, d_proj_b, d_norm2_w, d_norm2_b,
            d_fc1_w, d_fc1_b, d_fc2_w, d_fc2_b,
        ];
        Ok((d_x, d_x_bf16, grads))
    }

    /// The dtype of the linear layers' weights, if they share one.
    #[cfg(test)]
    pub(crate) fn weights_dtype(&self) -> Option<DType> {
        let dtypes = [&self.qkv, &self.proj, &self.fc1, &self.fc2].map(|d| d.params()[0].dtype());
        dtypes.iter().all(|d| *d == dtypes[0]).then_some(dtypes[0])
    }

    fn params(&self) -> [&Tensor; PARAMS] {
        let [qkv_w, qkv_b] = self.qkv.params();
        let [proj_w, proj_b] = self.proj.params();
        let [fc1_w, fc1_b] = self.fc1.params();
        let [fc2_w, fc2_b] = self.fc2.params();
        [
            &self.norm1.weight,
            &self.norm1.bias,
            qkv_w,
            qkv_b,
            proj_w,
            proj_b,
            &self.norm2.weight,
            &self.norm2.bias,
            fc1_w,
            fc1_b,
            fc2_w,
            fc2_b,
        ]
    }

    /// The same block outside Candle's graph, its linear layers' weights in `compute`
    /// (cast once, for the forward and the backward; the norms stay f32).
    pub(crate) fn detach_in(&self, compute: DType) -> Result<Block> {
        Ok(Block {
            norm1: self.norm1.detach(),
            qkv: self.qkv.detach_in(compute)?,
            proj: self.proj.detach_in(compute)?,
            heads: self.heads,
            norm2: self.norm2.detach(),
            fc1: self.fc1.detach_in(compute)?,
            fc2: self.fc2.detach_in(compute)?,
        })
    }
}

/// The blocks on the f32 token stream `x`, `(B * tokens, D)`: one graph node with a
/// hand-written backward while gradients are recorded on the fused kernels, ordinary
/// graph nodes otherwise (see the module's documentation).
pub(crate) fn forward(
    blocks: &[Block],
    x: &Tensor,
    tokens: usize,
    compute: DType,
) -> Result<Tensor> {
    let recorded = x.track_op() || blocks.iter().flat_map(Block::params).any(Tensor::track_op);
    match recorded && one_node(x) {
        true => stack(blocks, x, tokens, compute),
        false => nodes(blocks, x, tokens, compute),
    }
}

/// The blocks on `x` as ordinary graph nodes.
fn nodes(blocks: &[Block], x: &Tensor, tokens: usize, compute: DType) -> Result<Tensor> {
    let mut y = x.clone();
    for block in blocks {
        y = block.forward(&y, tokens, compute, false)?.0;
    }
    Ok(y)
}

/// Whether the blocks on `x` become one node: where the fused kernels run.
fn one_node(x: &Tensor) -> bool {
    #[cfg(feature = "cuda")]
    return functional::fused(x, 0) && functional::enabled(functional::FastPath::BlocksNode);
    #[cfg(not(feature = "cuda"))]
    {
        let _ = x;
        false
    }
}

/// The blocks on `x` as one graph node, whatever the device.
fn stack(blocks: &[Block], x: &Tensor, tokens: usize, compute: DType) -> Result<Tensor> {
    // The node's third input: every parameter, flattened and joined, so that the
    // gradients the backward returns for it reach each parameter through Candle's graph.
    let params = blocks
        .iter()
        .flat_map(Block::params)
        .map(Tensor::flatten_all)
        .collect::<Result<Vec<_>>>()?;
    let params = Tensor::cat(&params, 0)?;
    let blocks = blocks
        .iter()
        .map(|b| b.detach_in(compute))
        .collect::<Result<Vec<_>>>()?;
    let mut y = x.detach();
    let mut saved = Vec::with_capacity(blocks.len());
    for block in &blocks {
        let (next, s) = block.forward(&y, tokens, compute, true)?;
        saved.push(s);
        y = next;
    }
    x.apply_op3(
        &y.contiguous()?,
        &params,
        Stack {
            blocks,
            saved,
            tokens,
            compute,
        },
    )
}

/// The node: its inputs are the blocks' input, their output computed outside the graph
/// (which it passes on) and the joined parameters.
struct Stack {
    blocks: Vec<Block>,
    saved: Vec<Saved>,
    tokens: usize,
    compute: DType,
}

/// A copy of the contiguous `s` for the node's output.
fn output<S: BackendStorage>(s: &S, l: &Layout) -> Result<(S, Shape)> {
    if !l.is_contiguous() || l.start_offset() != 0 {
        candle_core::bail!("vit blocks: the output must be a whole contiguous tensor");
    }
    Ok((s.try_clone(l)?, l.shape().clone()))
}

impl CustomOp3 for Stack {
    fn name(&self) -> &'static str {
        "mimco-vit-blocks"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        y: &CpuStorage,
        yl: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        output(y, yl)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        y: &candle_core::CudaStorage,
        yl: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        output(y, yl)
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _y: &Tensor,
        _params: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (mut dy, mut dy_bf16) = (grad.clone(), None);
        let mut grads = Vec::with_capacity(self.blocks.len());
        for (block, saved) in self.blocks.iter().zip(&self.saved).rev() {
            let (dx, dx_bf16, d_params) =
                block.backward(saved, (&dy, dy_bf16.as_ref()), self.tokens, self.compute)?;
            grads.push(d_params);
            (dy, dy_bf16) = (dx, dx_bf16);
        }
        let flat = grads
            .iter()
            .rev()
            .flatten()
            .map(Tensor::flatten_all)
            .collect::<Result<Vec<_>>>()?;
        Ok((Some(dy), None, Some(Tensor::cat(&flat, 0)?)))
    }
}

/// The stack as one node against the blocks as graph nodes on `dev`, in `compute`: two
/// blocks of width 64 (2 heads) on 3 images of 5 tokens, every parameter random. Returns
/// for the output, the input's gradient and each parameter's gradient (by name) the
/// relative L2 error `|one node - graph| / |graph|`.
#[cfg(any(test, feature = "cuda"))]
pub(crate) fn compare_stack(
    dev: &candle_core::Device,
    compute: DType,
) -> Result<Vec<(String, f64)>> {
    let config = VitConfig::vit_tiny_test();
    let (tokens, rows) = (5, 15);
    let vars = candle_nn::VarMap::new();
    let vb = VarBuilder::from_varmap(&vars, DType::F32, dev);
    let blocks = (0..2)
        .map(|i| Block::new(vb.pp(format!("blocks.{i}")), &config))
        .collect::<Result<Vec<_>>>()?;
    // Values spread over [-1, 1] without an RNG; LayerNorm weights around 1.
    let wave = |n: usize, phase: f32| -> Vec<f32> {
        (0..n).map(|i| (i as f32 * 0.618 + phase).sin()).collect()
    };
    let mut named = vars
        .data()
        .lock()
        .expect("vars")
        .clone()
        .into_iter()
        .collect::<Vec<_>>();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    for (k, (name, var)) in named.iter().enumerate() {
        let v = wave(var.elem_count(), k as f32);
        let t = Tensor::from_vec(v, var.shape(), dev)?;
        let t = match name.contains("norm") && name.ends_with("weight") {
            true => ((t * 0.3)? + 1.0)?,
            false => (t * 0.2)?,
        };
        var.set(&t)?;
    }
    let x =
        candle_core::Var::from_tensor(&Tensor::from_vec(wave(rows * 64, 0.5), (rows, 64), dev)?)?;
    let probe = Tensor::from_vec(wave(rows * 64, 2.0), (rows, 64), dev)?;
    let run = |y: Tensor| -> Result<(Tensor, candle_core::backprop::GradStore)> {
        let grads = (&y * &probe)?.sum_all()?.backward()?;
        Ok((y, grads))
    };
    let (y_graph, g_graph) = run(nodes(&blocks, &x, tokens, compute)?)?;
    let (y_node, g_node) = run(stack(&blocks, &x, tokens, compute)?)?;
    let error = |got: &Tensor, want: &Tensor| -> Result<f64> {
        let (got, want) = (got.to_dtype(DType::F64)?, want.to_dtype(DType::F64)?);
        let diff = (&got - &want)?.sqr()?.sum_all()?.to_scalar::<f64>()?.sqrt();
        let norm = want.sqr()?.sum_all()?.to_scalar::<f64>()?.sqrt();
        Ok(
            match got
                .ne(&got)?
                .to_dtype(DType::F64)?
                .sum_all()?
                .to_scalar::<f64>()?
                > 0.0
            {
                true => f64::NAN,
                false => diff / norm.max(1e-300),
            },
        )
    };
    let mut out = vec![("y".to_string(), error(&y_node, &y_graph)?)];
    let mut tensors = vec![("dx".to_string(), x.as_tensor().clone())];
    tensors.extend(
        named
            .iter()
            .map(|(n, v)| (format!("d{n}"), v.as_tensor().clone())),
    );
    for (name, t) in tensors {
        let (Some(got), Some(want)) = (g_node.get(&t), g_graph.get(&t)) else {
            candle_core::bail!("vit blocks: no gradient for {name}");
        };
        out.push((name, error(got, want)?));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_node_gives_the_graphs_output_and_every_gradient() {
        for (compute, tolerance) in [(DType::F32, 1e-5), (DType::BF16, 1e-2)] {
            let rows = compare_stack(&candle_core::Device::Cpu, compute).unwrap();
            // y, dx and the 2 x 12 parameters
            assert_eq!(rows.len(), 2 + 2 * PARAMS, "{rows:?}");
            for (name, error) in &rows {
                assert!(
                    error.is_finite() && *error <= tolerance,
                    "{compute:?} {name}: relative error {error}"
                );
            }
        }
    }
}

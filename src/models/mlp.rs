//! The two-layer heads of MimCo (p1 projector, p2 predictor, p3 momentum projector).
//!
//! Patch-level heads are 1x1 convolutions over the token grid, which are the same
//! per-token `Linear -> ReLU -> Linear`, applied to `(B, N, D)`; image-level heads apply
//! to `(B, D)`. No BatchNorm (DenseCL's dense head; METHOD.md, chosen).

use candle_core::{D, DType, Module, Result, Tensor};
use candle_nn::{Init, VarBuilder};

use crate::functional::{self, Act, batch_norm};

/// `Linear(in, hidden) -> ReLU -> Linear(hidden, out)`, named `fc1`, `fc2`.
#[derive(Clone, Debug)]
pub struct Mlp2 {
    fc1: Dense,
    fc2: Dense,
}

/// `x W^T + b` over the last dimension, computed in the dtype of `x`: the f32 weights are
/// cast to it, so a bf16 input runs the matmul in bf16 (f32 accumulation) while the
/// optimiser keeps f32 master weights.
#[derive(Clone, Debug)]
pub struct Dense {
    weight: Tensor,
    bias: Tensor,
}

impl Dense {
    /// `act(x W^T + b)` over the last dimension of `x`, in its dtype. A 2D `x` adds no
    /// reshape to the graph (each reshape costs Candle's backward a zero-filled gradient
    /// and an addition).
    pub fn forward_act(&self, x: &Tensor, act: Act) -> Result<Tensor> {
        if x.rank() == 2 {
            return functional::linear(x, &self.weight, &self.bias, act, x.dtype());
        }
        let mut dims = x.dims().to_vec();
        let inputs = x.dim(D::Minus1)?;
        let rows = x.elem_count() / inputs.max(1);
        let y = functional::linear(
            &x.reshape((rows, inputs))?,
            &self.weight,
            &self.bias,
            act,
            x.dtype(),
        )?;
        *dims.last_mut().expect("x has a last dimension") = self.weight.dim(0)?;
        y.reshape(dims)
    }

    /// `residual + x W^T + b` in f32 for a 2D `x` (a residual join after the layer).
    pub fn forward_residual(&self, x: &Tensor, residual: &Tensor) -> Result<Tensor> {
        functional::linear_residual(x, &self.weight, &self.bias, residual)
    }

    /// `[weight, bias]`.
    pub(crate) fn params(&self) -> [&Tensor; 2] {
        [&self.weight, &self.bias]
    }

    /// The same layer outside Candle's graph (its parameters detached), its weight in
    /// `dtype` (the compute dtype: cast once for every product that uses it).
    pub(crate) fn detach_in(&self, dtype: DType) -> Result<Dense> {
        Ok(Dense {
            weight: self.weight.detach().to_dtype(dtype)?,
            bias: self.bias.detach(),
        })
    }
}

impl Module for Dense {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_act(x, Act::Identity)
    }
}

/// A [`Dense`] with timm's initialisation (weights N(0, 0.02), zero bias).
pub fn linear(vb: VarBuilder, inputs: usize, outputs: usize) -> Result<Dense> {
    let init = Init::Randn {
        mean: 0.0,
        stdev: 0.02,
    };
    Ok(Dense {
        weight: vb.get_with_hints((outputs, inputs), "weight", init)?,
        bias: vb.get_with_hints(outputs, "bias", Init::Const(0.0))?,
    })
}

impl Mlp2 {
    /// Builds the head under `vb` (`fc1.weight`, ... ).
    pub fn new(vb: VarBuilder, inputs: usize, hidden: usize, outputs: usize) -> Result<Mlp2> {
        Ok(Mlp2 {
            fc1: linear(vb.pp("fc1"), inputs, hidden)?,
            fc2: linear(vb.pp("fc2"), hidden, outputs)?,
        })
    }
}

impl Module for Mlp2 {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.fc2.forward(&self.fc1.forward_act(x, Act::Relu)?)
    }
}

/// MoCo v3's MLP (`_build_mlp` in its `builder.py`): `num_layers` bias-free Linears, each
/// but the last followed by BatchNorm and ReLU, the last by an affine-free BatchNorm when
/// `last_bn`. Names follow the `nn.Sequential` indices (`0` Linear, `1` BN, `3` Linear, ...).
#[derive(Clone, Debug)]
pub struct MocoMlp {
    layers: Vec<(Tensor, Option<(Tensor, Tensor)>)>,
    last_bn: bool,
}

impl MocoMlp {
    /// Builds the MLP under `vb`: `input -> mlp_dim -> ... -> output`.
    pub fn new(
        vb: VarBuilder,
        num_layers: usize,
        input: usize,
        mlp_dim: usize,
        output: usize,
        last_bn: bool,
    ) -> Result<MocoMlp> {
        let init = Init::Randn {
            mean: 0.0,
            stdev: 0.02,
        };
        let mut layers = Vec::with_capacity(num_layers);
        for l in 0..num_layers {
            let (d1, d2) = (
                if l == 0 { input } else { mlp_dim },
                if l + 1 == num_layers { output } else { mlp_dim },
            );
            let w = vb.get_with_hints((d2, d1), &format!("{}.weight", 3 * l), init)?;
            let bn = if l + 1 < num_layers {
                let bn = vb.pp((3 * l + 1).to_string());
                Some((
                    bn.get_with_hints(d2, "weight", Init::Const(1.0))?,
                    bn.get_with_hints(d2, "bias", Init::Const(0.0))?,
                ))
            } else {
                None
            };
            layers.push((w, bn));
        }
        Ok(MocoMlp { layers, last_bn })
    }
}

impl Module for MocoMlp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut x = x.clone();
        let last = self.layers.len() - 1;
        for (l, (w, bn)) in self.layers.iter().enumerate() {
            x = x.matmul(&w.t()?)?;
            if let Some((g, b)) = bn {
                x = batch_norm(&x, Some((g, b)), 1e-5)?.relu()?;
            } else if l == last && self.last_bn {
                x = batch_norm(&x, None, 1e-5)?;
            }
        }
        Ok(x)
    }
}

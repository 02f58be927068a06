//! The two-layer heads of MimCo (p1 projector, p2 predictor, p3 momentum projector).
//!
//! Patch-level heads are 1x1 convolutions over the token grid, which are the same
//! per-token `Linear -> ReLU -> Linear`, applied to `(B, N, D)`; image-level heads apply
//! to `(B, D)`. No BatchNorm (DenseCL's dense head; METHOD.md, chosen).

use candle_core::{Module, Result, Tensor};
use candle_nn::{Init, Linear, VarBuilder};

/// `Linear(in, hidden) -> ReLU -> Linear(hidden, out)`, named `fc1`, `fc2`.
#[derive(Clone, Debug)]
pub struct Mlp2 {
    fc1: Linear,
    fc2: Linear,
}

/// A `Linear` with timm's initialisation (weights N(0, 0.02), zero bias).
pub fn linear(vb: VarBuilder, inputs: usize, outputs: usize) -> Result<Linear> {
    let init = Init::Randn {
        mean: 0.0,
        stdev: 0.02,
    };
    let w = vb.get_with_hints((outputs, inputs), "weight", init)?;
    let b = vb.get_with_hints(outputs, "bias", Init::Const(0.0))?;
    Ok(Linear::new(w, Some(b)))
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
        self.fc2.forward(&self.fc1.forward(x)?.relu()?)
    }
}

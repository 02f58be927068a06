//! AdamW (Loshchilov & Hutter, <https://arxiv.org/abs/1711.05101>) with weight-decay
//! groups, global-norm gradient clipping and gradient accumulation, with a state that
//! checkpoints can save and restore (Candle's `AdamW` has neither groups nor public state).

use std::collections::{BTreeMap, HashMap};

use candle_core::backprop::GradStore;
use candle_core::{DType, IndexOp, Result, Tensor, Var};

/// Whether a parameter is decayed: not biases and norm weights (rank 1), nor the position
/// embedding and the CLS and mask tokens (timm's `no_weight_decay`).
pub fn decays(name: &str, rank: usize) -> bool {
    let leaf = name.rsplit('.').next().unwrap_or(name);
    rank > 1 && !matches!(leaf, "pos_embed" | "cls_token" | "mask_token")
}

/// AdamW hyper-parameters other than the rate.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWParams {
    /// `(beta1, beta2)`.
    pub betas: (f64, f64),
    /// Added to the root of the second moment.
    pub eps: f64,
    /// Decoupled weight decay of the decayed group.
    pub weight_decay: f64,
}

struct Slot {
    name: String,
    var: Var,
    decay: bool,
    /// The moments `m` and `v`, stacked: `(2, *var.shape)`.
    state: Tensor,
}

/// AdamW over named variables, in PyTorch's formulation:
/// `p -= lr * wd * p; m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g^2;`
/// `p -= lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)`.
pub struct AdamW {
    slots: Vec<Slot>,
    params: AdamWParams,
    /// Steps taken (`t`).
    steps: u64,
}

impl AdamW {
    /// An optimiser over `vars` (name, variable) with zero moments.
    pub fn new(vars: Vec<(String, Var)>, params: AdamWParams) -> Result<AdamW> {
        let slots = vars
            .into_iter()
            .map(|(name, var)| {
                let zeros = var.zeros_like()?;
                Ok(Slot {
                    decay: decays(&name, var.rank()),
                    state: Tensor::stack(&[&zeros, &zeros], 0)?,
                    name,
                    var,
                })
            })
            .collect::<Result<_>>()?;
        Ok(AdamW {
            slots,
            params,
            steps: 0,
        })
    }

    /// Names of the parameters in the decayed and the undecayed group.
    pub fn groups(&self) -> (Vec<&str>, Vec<&str>) {
        let names = |decay: bool| {
            self.slots
                .iter()
                .filter(|s| s.decay == decay)
                .map(|s| s.name.as_str())
                .collect()
        };
        (names(true), names(false))
    }

    /// Steps taken so far.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// One update with rate `lr` from `grads`, given in the order of the variables. On CUDA
    /// every parameter is updated in one fused launch (`mimco::cuda::adamw`).
    pub fn step(&mut self, grads: &Gradients, lr: f64) -> Result<()> {
        let AdamWParams {
            betas: (b1, b2),
            eps,
            weight_decay,
        } = self.params;
        self.steps += 1;
        let t = self.steps as i32;
        let (c1, c2) = (1.0 - b1.powi(t), 1.0 - b2.powi(t));
        let decay_of = |slot: &Slot| match slot.decay {
            true => 1.0 - lr * weight_decay,
            false => 1.0,
        };
        #[cfg(feature = "cuda")]
        if grads
            .sums
            .iter()
            .all(|g| g.device().is_cuda() && g.dtype() == DType::F32)
            && !grads.sums.is_empty()
        {
            let slots: Vec<_> = self
                .slots
                .iter()
                .zip(&grads.sums)
                .map(|(slot, g)| crate::cuda::AdamWSlot {
                    param: slot.var.as_tensor(),
                    grad: g,
                    moments: &slot.state,
                    decay: decay_of(slot) as f32,
                })
                .collect();
            let step = crate::cuda::AdamWStep {
                lr: lr as f32,
                betas: (b1 as f32, b2 as f32),
                eps: eps as f32,
                corrections: (c1 as f32, c2 as f32),
                grad_scale: grads.scale as f32,
            };
            return crate::cuda::adamw(&slots, step);
        }
        for (slot, g) in self.slots.iter_mut().zip(&grads.sums) {
            let decay = decay_of(slot);
            let g = if grads.scale == 1.0 {
                g.clone()
            } else {
                (g * grads.scale)?
            };
            let m = ((slot.state.i(0)? * b1)? + (&g * (1.0 - b1))?)?;
            let v = ((slot.state.i(1)? * b2)? + (g.sqr()? * (1.0 - b2))?)?;
            let p = (slot.var.as_tensor().detach() * decay)?;
            let update = ((&m / c1)? / ((&v / c2)?.sqrt()? + eps)?)?;
            slot.var.set(&(p - (update * lr)?)?)?;
            slot.state = Tensor::stack(&[&m, &v], 0)?;
        }
        Ok(())
    }

    /// The moments and the step count, for a checkpoint (`optim.m.<name>`, `optim.v.<name>`).
    pub fn state(&self) -> (BTreeMap<String, Tensor>, u64) {
        let mut out = BTreeMap::new();
        for s in &self.slots {
            for (i, kind) in ["m", "v"].into_iter().enumerate() {
                let moment = s.state.i(i).expect("the state holds two moments");
                out.insert(format!("optim.{kind}.{}", s.name), moment);
            }
        }
        (out, self.steps)
    }

    /// Restores what [`AdamW::state`] saved.
    pub fn load_state(&mut self, tensors: &HashMap<String, Tensor>, steps: u64) -> Result<()> {
        for s in &mut self.slots {
            let mut moments = Vec::with_capacity(2);
            for kind in ["m", "v"] {
                let key = format!("optim.{kind}.{}", s.name);
                match tensors.get(&key) {
                    Some(t) if t.dims() == s.var.dims() => {
                        moments.push(t.to_device(s.var.device())?.to_dtype(s.var.dtype())?)
                    }
                    _ => candle_core::bail!(
                        "checkpoint has no optimiser state {key} of shape {:?}",
                        s.var.dims()
                    ),
                }
            }
            s.state = Tensor::stack(&moments, 0)?;
        }
        self.steps = steps;
        Ok(())
    }

    /// The variables, in the order [`AdamW::step`] expects their gradients.
    pub fn vars(&self) -> impl Iterator<Item = &Var> {
        self.slots.iter().map(|s| &s.var)
    }
}

/// Sums the gradients of several micro-batches, then averages and clips them.
pub struct GradAccumulator {
    sums: Vec<Option<Tensor>>,
    micro: usize,
}

/// The sum of the squares of every element of `grads`, in f64 (one fused launch per
/// gradient on CUDA).
fn sum_squares(grads: &[Tensor]) -> Result<f64> {
    #[cfg(feature = "cuda")]
    if grads
        .first()
        .is_some_and(|g| crate::functional::fused(g, 0))
        && grads.iter().all(|g| g.dtype() == DType::F32)
    {
        return crate::cuda::sum_squares(grads);
    }
    if grads.is_empty() {
        return Ok(0.0);
    }
    let squares = grads
        .iter()
        .map(|g| g.sqr()?.sum_all()?.to_dtype(DType::F64))
        .collect::<Result<Vec<_>>>()?;
    Tensor::stack(&squares, 0)?.sum_all()?.to_scalar::<f64>()
}

impl GradAccumulator {
    /// An empty accumulator for `n` variables.
    pub fn new(n: usize) -> GradAccumulator {
        GradAccumulator {
            sums: vec![None; n],
            micro: 0,
        }
    }

    /// Micro-batches added since the last [`GradAccumulator::take`].
    pub fn micro_batches(&self) -> usize {
        self.micro
    }

    /// Adds one micro-batch's gradients for `vars`.
    pub fn add<'a>(
        &mut self,
        vars: impl Iterator<Item = &'a Var>,
        grads: &GradStore,
    ) -> Result<()> {
        for (sum, var) in self.sums.iter_mut().zip(vars) {
            if let Some(g) = grads.get(var.as_tensor()) {
                *sum = Some(match sum.take() {
                    Some(s) => (s + g)?,
                    None => g.clone(),
                });
            }
        }
        self.micro += 1;
        Ok(())
    }

    /// The accumulated gradients, to be averaged and clipped to a global L2 norm of
    /// `max_norm` as `torch.nn.utils.clip_grad_norm_` does: both are folded into
    /// [`Gradients::scale`] (the optimiser applies it). Zeros where no gradient arrived.
    /// Reads the norm back from the device once. Resets the accumulator.
    pub fn take<'a>(
        &mut self,
        vars: impl Iterator<Item = &'a Var>,
        max_norm: f64,
    ) -> Result<Gradients> {
        let mean = 1.0 / self.micro.max(1) as f64;
        let sums = self
            .sums
            .iter_mut()
            .zip(vars)
            .map(|(sum, var)| match sum.take() {
                Some(s) => Ok(s),
                None => var.zeros_like(),
            })
            .collect::<Result<Vec<_>>>()?;
        self.micro = 0;
        let total = sum_squares(&sums)?;
        let norm = total.sqrt() * mean;
        let coef = max_norm / (norm + 1e-6);
        let clip = match max_norm > 0.0 && coef < 1.0 {
            true => coef,
            false => 1.0,
        };
        Ok(Gradients {
            sums,
            scale: mean * clip,
            norm,
        })
    }
}

/// One optimiser step's gradients: variable `i`'s is `sums[i] * scale`.
pub struct Gradients {
    /// Sums over the micro-batches, in the order of the variables.
    pub sums: Vec<Tensor>,
    /// `1 / micro-batches`, times the clipping coefficient where clipping applies.
    pub scale: f64,
    /// Global L2 norm of the mean gradient, before clipping.
    pub norm: f64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn groups_follow_timm_rules() {
        assert!(decays("student.blocks.0.attn.qkv.weight", 2));
        assert!(!decays("student.blocks.0.attn.qkv.bias", 1));
        assert!(!decays("student.norm.weight", 1));
        assert!(!decays("student.pos_embed", 3));
        assert!(!decays("student.cls_token", 3));
        assert!(!decays("student.mask_token", 3));
        assert!(decays("student.patch_embed.proj.weight", 4));
    }

    /// Two steps against values worked out from PyTorch's AdamW formula in f64:
    /// ```python
    /// p = torch.tensor([1.0, -2.0], dtype=torch.float64, requires_grad=True)
    /// opt = torch.optim.AdamW([p], lr=0.1, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.5)
    /// for g in ([0.5, -1.0], [0.25, 0.0]): p.grad = torch.tensor(g, dtype=torch.float64); opt.step()
    /// ```
    #[test]
    fn adamw_matches_the_formula_and_skips_decay_for_the_plain_group() {
        let dev = Device::Cpu;
        let w = Var::from_tensor(&Tensor::new(&[[1.0f64, -2.0]], &dev).unwrap()).unwrap();
        let b = Var::from_tensor(&Tensor::new(&[1.0f64, -2.0], &dev).unwrap()).unwrap();
        let params = AdamWParams {
            betas: (0.9, 0.999),
            eps: 1e-8,
            weight_decay: 0.5,
        };
        let mut opt = AdamW::new(
            vec![("x.weight".into(), w.clone()), ("x.bias".into(), b.clone())],
            params,
        )
        .unwrap();
        assert_eq!(opt.groups(), (vec!["x.weight"], vec!["x.bias"]));
        let gs = [[0.5, -1.0], [0.25, 0.0]];
        for g in gs {
            let gw = Tensor::new(&[g], &dev).unwrap();
            let gb = Tensor::new(&g, &dev).unwrap();
            let grads = Gradients {
                sums: vec![gw, gb],
                scale: 1.0,
                norm: 0.0,
            };
            opt.step(&grads, 0.1).unwrap();
        }
        // The same two steps by hand.
        let reference = |decay: f64| {
            let (mut p, mut m, mut v) = ([1.0f64, -2.0], [0.0; 2], [0.0; 2]);
            for (t, g) in gs.iter().enumerate() {
                let t = t as i32 + 1;
                for i in 0..2 {
                    p[i] *= 1.0 - 0.1 * decay;
                    m[i] = 0.9 * m[i] + 0.1 * g[i];
                    v[i] = 0.999 * v[i] + 0.001 * g[i] * g[i];
                    let mh = m[i] / (1.0 - 0.9f64.powi(t));
                    let vh = v[i] / (1.0 - 0.999f64.powi(t));
                    p[i] -= 0.1 * mh / (vh.sqrt() + 1e-8);
                }
            }
            p
        };
        let got_w: Vec<f64> = w.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        let got_b: Vec<f64> = b.as_tensor().to_vec1().unwrap();
        for (got, want) in [(got_w, reference(0.5)), (got_b, reference(0.0))] {
            for (g, r) in got.iter().zip(want) {
                assert!((g - r).abs() < 1e-12, "{got:?} vs {r}");
            }
        }
        // Step 1 alone, by hand: p = 1 * 0.95 - 0.1 * 1 = 0.85 for the decayed weight.
        assert!((reference(0.5)[0] - 0.85).abs() > 0.0);
    }

    #[test]
    fn accumulation_averages_and_clipping_scales_to_max_norm() {
        let dev = Device::Cpu;
        let a = Var::from_tensor(&Tensor::new(&[1.0f64, 1.0], &dev).unwrap()).unwrap();
        let mut acc = GradAccumulator::new(1);
        for scale in [2.0, 4.0] {
            let loss = (a.as_tensor() * scale).unwrap().sum_all().unwrap();
            acc.add([&a].into_iter(), &loss.backward().unwrap())
                .unwrap();
        }
        assert_eq!(acc.micro_batches(), 2);
        // Mean gradient (3, 3): norm 4.2426 > 1, clipped to norm 1.
        let grads = acc.take([&a].into_iter(), 1.0).unwrap();
        assert!((grads.norm - 18f64.sqrt()).abs() < 1e-12);
        let g: Vec<f64> = (&grads.sums[0] * grads.scale).unwrap().to_vec1().unwrap();
        let expected = 3.0 / (18f64.sqrt() + 1e-6);
        assert!(g.iter().all(|v| (v - expected).abs() < 1e-12), "{g:?}");
        assert_eq!(acc.micro_batches(), 0);
    }
}

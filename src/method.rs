//! What the trainer needs of a pre-training method, so that one loop, optimiser and
//! checkpoint format serve MimCo (stage 2), MoCo v3 (stage 1, the teacher) and SimMIM.

use std::collections::{BTreeMap, HashMap};

use candle_core::{Result, Tensor};

use crate::config::Config;
use crate::params::ParamStore;

/// What one forward pass computed.
pub struct Losses {
    /// The loss to minimise.
    pub total: Tensor,
    /// Its named terms (MimCo: `patch`, `image`; MoCo v3: `contrastive`; SimMIM: `l1`).
    pub parts: Vec<(&'static str, Tensor)>,
    /// Keys for the method's queues, handed back to [`Method::after_loss`].
    pub keys: Vec<(&'static str, Tensor)>,
}

impl Losses {
    /// The term called `name`, if the method computed it.
    pub fn part(&self, name: &str) -> Option<&Tensor> {
        self.parts.iter().find(|(n, _)| *n == name).map(|(_, t)| t)
    }
}

/// A self-supervised objective over an encoder.
pub trait Method {
    /// The config it was built from.
    fn config(&self) -> &Config;
    /// The losses of one batch: `views` are `(B, 3, H, W)` normalised images (one or two
    /// per sample, as the augmentation set makes them), `mask` one byte per token and
    /// sample, 1 = masked (all zero without masking).
    fn losses(&self, views: &[Tensor], mask: &[u8]) -> Result<Losses>;
    /// Called once a loss is accepted: queues take their keys here.
    fn after_loss(&mut self, _losses: &Losses) -> Result<()> {
        Ok(())
    }
    /// Moves momentum parameters towards their sources with momentum `m`.
    fn update_momentum(&self, _m: f64) -> Result<()> {
        Ok(())
    }
    /// The encoder being pre-trained (for the k-NN monitor).
    fn encoder(&self) -> &dyn crate::models::Encoder;
    /// The parameters that receive gradients, created by the method's builders.
    fn trainable(&self) -> &ParamStore;
    /// Whether a trainable-store parameter is kept fixed (not given to the optimiser).
    fn frozen(&self, _name: &str) -> bool {
        false
    }
    /// Everything else a checkpoint must carry: momentum parameters, queues (tensors),
    /// and counters such as queue positions.
    fn buffers(&self) -> (BTreeMap<String, Tensor>, BTreeMap<String, usize>);
    /// Restores what [`Method::buffers`] saved.
    fn load_buffers(
        &mut self,
        tensors: &HashMap<String, Tensor>,
        counters: &BTreeMap<String, usize>,
    ) -> Result<()>;
}

/// p3 <- m * p3 + (1 - m) * source for every parameter of `momentum`; `source` maps a
/// momentum parameter's name to its source's name in `trainable`.
pub fn ema(
    momentum: &ParamStore,
    trainable: &ParamStore,
    m: f64,
    source: impl Fn(&str) -> String,
) -> Result<()> {
    let sources: BTreeMap<_, _> = trainable.vars().into_iter().collect();
    for (name, var) in momentum.vars() {
        let from = source(&name);
        let Some(src) = sources.get(&from) else {
            candle_core::bail!("momentum parameter {name} has no source {from}");
        };
        let next = ((var.as_tensor() * m)? + (src.as_tensor().detach() * (1.0 - m))?)?;
        var.set(&next)?;
    }
    Ok(())
}

/// Builds the method `config.method` names; MimCo needs its frozen `teacher`.
pub fn build(
    config: &Config,
    teacher: Option<Box<dyn crate::models::Encoder>>,
    device: &candle_core::Device,
) -> anyhow::Result<Box<dyn Method>> {
    use crate::config::MethodKind;
    Ok(match (config.method, teacher) {
        (MethodKind::Mimco, Some(teacher)) => {
            Box::new(crate::mimco::MimCo::new(config, teacher, device)?)
        }
        (MethodKind::Mimco, None) => anyhow::bail!("MimCo needs a teacher"),
        (MethodKind::Mocov3, _) => Box::new(crate::mocov3::MocoV3::new(config, device)?),
        (MethodKind::Simmim, _) => Box::new(crate::simmim::SimMim::new(config, device)?),
    })
}

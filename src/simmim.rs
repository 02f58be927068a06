//! SimMIM (Xie et al., "SimMIM: A Simple Framework for Masked Image Modeling",
//! <https://arxiv.org/abs/2111.09886>): the masked student predicts the raw (normalised)
//! pixels of its masked patches with one linear layer; l1 loss on masked pixels only.
//! MimCo's main MIM baseline.

use std::collections::{BTreeMap, HashMap};

use candle_core::{Device, Module, Result, Tensor};

use crate::config::Config;
use crate::loss::l1_regression;
use crate::method::{Losses, Method};
use crate::models::Encoder;
use crate::models::mlp::linear;
use crate::models::vit::{Vit, patchify};
use crate::params::ParamStore;

/// The method: `student.*` (with its mask token) and the linear `decoder`.
pub struct SimMim {
    config: Config,
    /// The encoder.
    pub student: Vit,
    decoder: crate::models::mlp::Dense,
    /// Every parameter.
    pub trainable: ParamStore,
}

impl SimMim {
    /// Builds the student and decoder from `config.train.seed`.
    pub fn new(config: &Config, device: &Device) -> Result<SimMim> {
        let trainable = ParamStore::new(config.train.seed);
        let vb = trainable.var_builder(device);
        let size = config.data.transform.size as usize;
        let s = &config.student;
        let mut student = Vit::new(vb.pp("student"), s, size, true)?;
        student.set_compute(config.train.precision.compute_dtype());
        Ok(SimMim {
            student,
            decoder: linear(vb.pp("decoder"), s.dim, 3 * s.patch_size * s.patch_size)?,
            config: config.clone(),
            trainable,
        })
    }
}

/// SimMIM's loss: mean absolute error over the pixels of masked patches only.
/// `prediction`, `target`: `(B, N, 3*p*p)`; `mask`: `B*N` bytes, 1 = masked.
pub fn masked_l1(prediction: &Tensor, target: &Tensor, mask: &[u8]) -> Result<Tensor> {
    let (b, n, d) = prediction.dims3()?;
    let picked: Vec<u32> = (0..(b * n) as u32)
        .filter(|&i| mask[i as usize] == 1)
        .collect();
    if picked.is_empty() {
        candle_core::bail!("SimMIM needs masked patches: this batch has none");
    }
    let picked = Tensor::new(picked.as_slice(), prediction.device())?;
    let take = |t: &Tensor| t.reshape((b * n, d))?.index_select(&picked, 0);
    l1_regression(&take(prediction)?, &take(target)?)
}

impl Method for SimMim {
    fn config(&self) -> &Config {
        &self.config
    }

    fn losses(&self, views: &[Tensor], mask: &[u8]) -> Result<Losses> {
        let x = &views[0];
        let (b, n) = (x.dim(0)?, mask.len() / x.dim(0)?.max(1));
        let mask_t =
            Tensor::from_iter(mask.iter().map(|&m| f32::from(m)), x.device())?.reshape((b, n))?;
        let z = self.student.forward(x, Some(&mask_t))?.patches;
        let prediction = self.decoder.forward(&z)?;
        let target = patchify(x, self.config.student.patch_size)?;
        let total = masked_l1(&prediction, &target, mask)?;
        Ok(Losses {
            parts: vec![("l1", total.clone())],
            total,
            keys: Vec::new(),
        })
    }

    fn encoder(&self) -> &dyn Encoder {
        &self.student
    }

    fn trainable(&self) -> &ParamStore {
        &self.trainable
    }

    fn buffers(&self) -> (BTreeMap<String, Tensor>, BTreeMap<String, usize>) {
        (BTreeMap::new(), BTreeMap::new())
    }

    fn load_buffers(
        &mut self,
        _: &HashMap<String, Tensor>,
        _: &BTreeMap<String, usize>,
    ) -> Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Changing the target anywhere outside the masked patches leaves the loss as it is;
    /// changing it inside a masked patch does not.
    #[test]
    fn the_loss_only_sees_masked_pixels() {
        let dev = Device::Cpu;
        let pred = Tensor::zeros((1, 4, 12), candle_core::DType::F32, &dev).unwrap();
        let target: Vec<f32> = (0..48).map(|i| i as f32 / 10.0).collect();
        let mask = [0u8, 1, 0, 1];
        let loss = |t: &[f32]| {
            let t = Tensor::from_vec(t.to_vec(), (1, 4, 12), &dev).unwrap();
            masked_l1(&pred, &t, &mask)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        let base = loss(&target);
        let expected: f32 = (12..24).chain(36..48).map(|i| i as f32 / 10.0).sum::<f32>() / 24.0;
        assert!((base - expected).abs() < 1e-5);
        let mut unmasked = target.clone();
        unmasked[0] += 100.0;
        unmasked[30] -= 7.0;
        assert_eq!(loss(&unmasked), base);
        let mut masked = target.clone();
        masked[13] += 1.0;
        assert!(loss(&masked) > base);
        assert!(
            masked_l1(
                &pred,
                &Tensor::from_vec(target, (1, 4, 12), &dev).unwrap(),
                &[0; 4]
            )
            .is_err()
        );
    }

    #[test]
    fn patches_follow_the_pixel_shuffle_order() {
        let dev = Device::Cpu;
        // A 3-channel 4x4 image in patches of 2: token 1 is rows 0-1, columns 2-3.
        let img: Vec<f32> = (0..48).map(|i| i as f32).collect();
        let p = patchify(&Tensor::from_vec(img, (1, 3, 4, 4), &dev).unwrap(), 2).unwrap();
        let row: Vec<f32> = p.get(0).unwrap().get(1).unwrap().to_vec1().unwrap();
        assert_eq!(
            row,
            vec![2., 3., 6., 7., 18., 19., 22., 23., 34., 35., 38., 39.]
        );
    }
}

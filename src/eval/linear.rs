//! Linear probe on frozen features (MoCo v3's protocol, on features computed once): a
//! linear classifier trained with SGD, momentum 0.9, no weight decay, cosine schedule, on
//! features standardised with the training set's mean and deviation.

use candle_core::{DType, Device, Tensor, Var};
use rand::SeedableRng;
use rand::seq::SliceRandom;

use super::{Accuracy, Features};
use crate::functional::logsumexp;

/// How the probe trains.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ProbeSettings {
    /// Passes over the training features.
    pub epochs: usize,
    /// Samples per step.
    pub batch: usize,
    /// Peak learning rate (cosine to 0 over all steps).
    pub lr: f64,
    /// Seed of the initial weights and the order of samples.
    pub seed: u64,
}

/// Trains a linear classifier on `train` and reports its accuracy on `val`.
pub fn linear_probe(
    train: &Features,
    val: &Features,
    s: ProbeSettings,
) -> candle_core::Result<Accuracy> {
    let dev = Device::Cpu;
    let (n, dim, classes) = (train.labels.len(), train.dim, train.classes.len());
    if n == 0 || val.labels.is_empty() || s.batch == 0 || s.epochs == 0 {
        candle_core::bail!("the probe needs samples, a batch of at least 1 and one epoch");
    }
    let x = Tensor::from_slice(&train.values, (n, dim), &dev)?;
    let mean = x.mean_keepdim(0)?;
    let std = (x.broadcast_sub(&mean)?.sqr()?.mean_keepdim(0)? + 1e-6)?.sqrt()?;
    let standardise = |t: &Tensor| t.broadcast_sub(&mean)?.broadcast_div(&std);
    let x = standardise(&x)?;
    let y = Tensor::from_slice(&train.labels, n, &dev)?;
    let w = Var::zeros((dim, classes), DType::F32, &dev)?;
    let b = Var::zeros(classes, DType::F32, &dev)?;
    let (mut vw, mut vb) = (w.zeros_like()?, b.zeros_like()?);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(s.seed);
    let mut order: Vec<u32> = (0..n as u32).collect();
    let steps_per_epoch = n.div_ceil(s.batch);
    let total = (steps_per_epoch * s.epochs) as f64;
    let mut step = 0usize;
    for _ in 0..s.epochs {
        order.shuffle(&mut rng);
        for idx in order.chunks(s.batch) {
            let idx = Tensor::from_slice(idx, idx.len(), &dev)?;
            let (xb, yb) = (x.index_select(&idx, 0)?, y.index_select(&idx, 0)?);
            let logits = xb.matmul(w.as_tensor())?.broadcast_add(b.as_tensor())?;
            let picked = logits.gather(&yb.unsqueeze(1)?, 1)?;
            let loss = (logsumexp(&logits)? - picked)?.mean_all()?;
            let grads = loss.backward()?;
            let lr = s.lr * 0.5 * (1.0 + (std::f64::consts::PI * step as f64 / total).cos());
            for (var, velocity) in [(&w, &mut vw), (&b, &mut vb)] {
                let Some(g) = grads.get(var.as_tensor()) else {
                    candle_core::bail!("the probe's weights got no gradient");
                };
                *velocity = ((&*velocity * 0.9)? + g)?;
                var.set(&(var.as_tensor() - (&*velocity * lr)?)?)?;
            }
            step += 1;
        }
    }
    let v = standardise(&Tensor::from_slice(
        &val.values,
        (val.labels.len(), dim),
        &dev,
    )?)?;
    let scores: Vec<f32> = v
        .matmul(w.as_tensor())?
        .broadcast_add(b.as_tensor())?
        .flatten_all()?
        .to_vec1()?;
    let mut accuracy = Accuracy::tally();
    for (row, &label) in scores.chunks_exact(classes).zip(&val.labels) {
        let row: Vec<f64> = row.iter().map(|&v| f64::from(v)).collect();
        accuracy.add(&row, label);
    }
    Ok(accuracy.finish())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::Rng;

    /// Three classes separated along different axes (with noise in the other axes): the
    /// probe gets them all right.
    #[test]
    fn separates_a_linearly_separable_set() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let mut make = |count: usize| {
            let (mut f, mut l) = (Vec::new(), Vec::new());
            for i in 0..count {
                let class = (i % 3) as u32;
                for d in 0..5 {
                    let centre = if d == class as usize { 3.0 } else { 0.0 };
                    f.push(centre + rng.random_range(-1.0f32..1.0));
                }
                l.push(class);
            }
            (f, l)
        };
        let features = |(values, labels): (Vec<f32>, Vec<u32>)| Features {
            values,
            labels,
            dim: 5,
            classes: vec!["a".into(), "b".into(), "c".into()],
        };
        let (train, val) = (features(make(300)), features(make(150)));
        let settings = ProbeSettings {
            epochs: 20,
            batch: 32,
            lr: 0.1,
            seed: 0,
        };
        let acc = linear_probe(&train, &val, settings).unwrap();
        assert!(acc.top1 > 99.0, "{acc:?}");
        assert_eq!(acc.top5, 100.0);
    }
}

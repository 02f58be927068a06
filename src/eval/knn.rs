//! Weighted k-NN classification on frozen features, as DINO evaluates (Caron et al.,
//! <https://arxiv.org/abs/2104.14294>, `knn_classifier`): cosine similarity, the k nearest
//! training features vote for their class with weight `exp(sim / T)`.

use candle_core::{Device, Tensor};

use super::{Accuracy, Features};

/// Classifies every row of `val` by its `k` nearest rows of `train` under cosine
/// similarity (both unit-length), votes weighted by `exp(sim / temperature)`.
pub fn knn(
    train: &Features,
    val: &Features,
    k: usize,
    temperature: f64,
) -> candle_core::Result<Accuracy> {
    let (n, dim, classes) = (train.labels.len(), train.dim, train.classes.len());
    if n == 0 || val.labels.is_empty() || k == 0 {
        candle_core::bail!("k-NN needs training samples, validation samples and k >= 1");
    }
    let k = k.min(n);
    let train_t = Tensor::from_slice(&train.values, (n, dim), &Device::Cpu)?;
    let mut accuracy = Accuracy::tally();
    for (chunk, labels) in val.values.chunks(256 * dim).zip(val.labels.chunks(256)) {
        let rows = labels.len();
        let sims: Vec<f32> = Tensor::from_slice(chunk, (rows, dim), &Device::Cpu)?
            .matmul(&train_t.t()?)?
            .flatten_all()?
            .to_vec1()?;
        let mut order: Vec<usize> = (0..n).collect();
        for (row, &label) in sims.chunks_exact(n).zip(labels) {
            order.iter_mut().enumerate().for_each(|(i, o)| *o = i);
            order.select_nth_unstable_by(k - 1, |&a, &b| row[b].total_cmp(&row[a]));
            let mut votes = vec![0f64; classes];
            for &i in &order[..k] {
                votes[train.labels[i] as usize] += (f64::from(row[i]) / temperature).exp();
            }
            accuracy.add(&votes, label);
        }
    }
    Ok(accuracy.finish())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn unit(v: &mut [f32]) {
        let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.iter_mut().for_each(|x| *x /= n);
    }

    /// Against a brute-force reference: every similarity, a full sort, the votes.
    #[test]
    fn matches_brute_force() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
        let (dim, classes, n, m, k) = (6, 7, 300, 90, 20);
        let mut feats = |count: usize| {
            let mut f: Vec<f32> = (0..count * dim)
                .map(|_| rng.random_range(-1.0..1.0))
                .collect();
            f.chunks_exact_mut(dim).for_each(unit);
            f
        };
        let (train, val) = (feats(n), feats(m));
        let train_labels: Vec<u32> = (0..n as u32)
            .map(|i| (i * 7 + i / 13) % classes as u32)
            .collect();
        let val_labels: Vec<u32> = (0..m as u32).map(|i| (i * 3) % classes as u32).collect();
        let features = |values: &[f32], labels: &[u32]| Features {
            values: values.to_vec(),
            labels: labels.to_vec(),
            dim,
            classes: (0..classes).map(|c| c.to_string()).collect(),
        };
        let got = knn(
            &features(&train, &train_labels),
            &features(&val, &val_labels),
            k,
            0.07,
        )
        .unwrap();
        let (mut top1, mut top5) = (0, 0);
        for (v, &label) in val.chunks_exact(dim).zip(&val_labels) {
            let mut sims: Vec<(f32, u32)> = train
                .chunks_exact(dim)
                .zip(&train_labels)
                .map(|(t, &l)| (t.iter().zip(v).map(|(a, b)| a * b).sum::<f32>(), l))
                .collect();
            sims.sort_by(|a, b| b.0.total_cmp(&a.0));
            let mut votes = vec![0f64; classes];
            for (s, l) in &sims[..k] {
                votes[*l as usize] += (f64::from(*s) / 0.07).exp();
            }
            let mut ranked: Vec<usize> = (0..classes).collect();
            ranked.sort_by(|&a, &b| votes[b].total_cmp(&votes[a]));
            top1 += usize::from(ranked[0] == label as usize);
            top5 += usize::from(ranked[..5].contains(&(label as usize)));
        }
        assert!(
            (got.top1 - 100.0 * top1 as f64 / m as f64).abs() < 1e-9,
            "{got:?} vs {top1}"
        );
        assert!(
            (got.top5 - 100.0 * top5 as f64 / m as f64).abs() < 1e-9,
            "{got:?} vs {top5}"
        );
        assert!(got.top5 >= got.top1);
    }
}

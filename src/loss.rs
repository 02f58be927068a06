//! MimCo's reconstruction losses (Zhou et al., "MimCo: Masked Image Modeling Pre-training
//! with Contrastive Teacher", <https://arxiv.org/abs/2203.03186>): InfoNCE against a key
//! queue, used at patch level (Eq. 1) and image level (Eq. 3), and the l1 feature
//! regression of MaskFeat that Table 7 compares with.

use candle_core::{D, DType, Result, Tensor};

use crate::functional::{l2_normalize, logsumexp};

/// InfoNCE with a queue of negatives, Eq. 1 and Eq. 3:
/// `mean_i -log( exp(q_i.k_i/tau) / (exp(q_i.k_i/tau) + sum_j exp(q_i.n_j/tau)) )`.
///
/// `q`: `(M, C)` predictions, `k`: `(M, C)` positive keys (no gradient flows into them),
/// `queue`: `(K, C)` negative keys, already unit length. `q` and `k` are L2-normalised here.
/// The product `q queue^T` takes its inputs in `product`, the training's compute dtype
/// (bf16 inputs, as `torch.autocast` runs a matmul; f32 accumulation and logits either
/// way); everything else is f32.
pub fn info_nce(
    q: &Tensor,
    k: &Tensor,
    queue: &Tensor,
    tau: f64,
    product: DType,
) -> Result<Tensor> {
    let q = l2_normalize(q)?;
    let k = l2_normalize(&k.detach())?;
    #[cfg(feature = "cuda")]
    if crate::functional::fused(&q, 0) && q.dtype() == DType::F32 {
        return crate::cuda::info_nce(&q, &k, queue, tau, product)?.mean_all();
    }
    let positive = (&q * &k)?.sum_keepdim(D::Minus1)?;
    // Inputs rounded to `product`, then an f32 product: what a bf16 x bf16 -> f32 GEMM
    // computes (the products of two bf16 are exact in f32).
    let rounded = |t: &Tensor| t.to_dtype(product)?.to_dtype(q.dtype());
    let negative = rounded(&q)?.matmul(&rounded(&queue.detach())?.t()?)?;
    let logits = (Tensor::cat(&[&positive, &negative], 1)? / tau)?;
    (logsumexp(&logits)? - &logits.narrow(1, 0, 1)?)?.mean_all()
}

/// Mean absolute difference between `prediction` and the (detached) `target`: the l1
/// feature regression ablation (Table 7).
pub fn l1_regression(prediction: &Tensor, target: &Tensor) -> Result<Tensor> {
    (prediction - target.detach())?.abs()?.mean_all()
}

/// MoCo v3's loss (Chen et al., <https://arxiv.org/abs/2104.02057>, Algorithm 1):
/// cross-entropy of `q_i` against all `k_j` of the batch, the positive being `k_i`, with
/// logits `q.k / tau`, times `2 tau`. `q`, `k`: `(B, C)`, normalised here; `k` detached.
pub fn moco_v3(q: &Tensor, k: &Tensor, tau: f64) -> Result<Tensor> {
    let q = l2_normalize(q)?;
    let k = l2_normalize(&k.detach())?;
    let logits = (q.matmul(&k.t()?)? / tau)?;
    let positive = ((&q * &k)?.sum_keepdim(D::Minus1)? / tau)?;
    (logsumexp(&logits)? - positive)?.mean_all()? * (2.0 * tau)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn t(rows: &[&[f64]]) -> Tensor {
        let data: Vec<f64> = rows.iter().flat_map(|r| r.iter().copied()).collect();
        Tensor::from_vec(data, (rows.len(), rows[0].len()), &Device::Cpu).unwrap()
    }

    /// Reference computed by hand. In PyTorch:
    /// ```python
    /// q = F.normalize(torch.tensor([[3., 4.], [1., 0.]], dtype=torch.float64), dim=1)
    /// k = F.normalize(torch.tensor([[0., 2.], [1., 1.]], dtype=torch.float64), dim=1)
    /// queue = torch.tensor([[1., 0.], [0., -1.], [0.6, 0.8]], dtype=torch.float64)
    /// logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue.T], 1) / 0.2
    /// F.cross_entropy(logits, torch.zeros(2, dtype=torch.long))
    /// ```
    #[test]
    fn info_nce_matches_hand_computed_value() {
        let q = t(&[&[3.0, 4.0], &[1.0, 0.0]]);
        let k = t(&[&[0.0, 2.0], &[1.0, 1.0]]);
        let queue = t(&[&[1.0, 0.0], &[0.0, -1.0], &[0.6, 0.8]]);
        // Row 1: q = (0.6, 0.8), k = (0, 1): positive 0.8; negatives 0.6, -0.8, 1.0.
        // Row 2: q = (1, 0), k = (1, 1)/sqrt(2): positive 0.70710678; negatives 1, 0, 0.6.
        let row = |pos: f64, neg: [f64; 3]| {
            let z: f64 = (pos / 0.2).exp() + neg.iter().map(|n| (n / 0.2).exp()).sum::<f64>();
            z.ln() - pos / 0.2
        };
        let expected = (row(0.8, [0.6, -0.8, 1.0]) + row(0.5f64.sqrt(), [1.0, 0.0, 0.6])) / 2.0;
        let got = info_nce(&q, &k, &queue, 0.2, DType::F64)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert!((got - expected).abs() < 1e-12, "{got} vs {expected}");
        // By hand: row 1 = ln(e^4 + e^3 + e^-4 + e^5) - 4 = 1.40769,
        // row 2 = ln(e^3.53553 + e^5 + e^0 + e^3) - 3.53553 = 1.78166.
        assert!((expected - 1.594_676).abs() < 1e-6, "{expected}");
    }

    /// Under bf16 the negatives' product takes `q` (normalised) and the queue rounded to
    /// bf16, in f32: the same loss as the f64 formula on the rounded values.
    #[test]
    fn info_nce_takes_the_product_inputs_in_bf16() {
        let dev = Device::Cpu;
        let wave = |n: usize, phase: f32| -> Vec<f32> {
            (0..n).map(|i| (i as f32 * 0.731 + phase).sin()).collect()
        };
        let f32s = |v: Vec<f32>, rows: usize| Tensor::from_vec(v, (rows, 8), &dev).unwrap();
        let q = f32s(wave(24, 0.0), 3);
        let k = f32s(wave(24, 1.0), 3);
        let queue = l2_normalize(&f32s(wave(40, 2.0), 5)).unwrap();
        let loss = |product| {
            info_nce(&q, &k, &queue, 0.2, product)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap() as f64
        };
        let f64s = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
        let bf16 = |t: &Tensor| f64s(&t.to_dtype(DType::BF16).unwrap());
        let (qn, kn) = (l2_normalize(&q).unwrap(), l2_normalize(&k).unwrap());
        let positive = (f64s(&qn) * f64s(&kn)).unwrap().sum_keepdim(1).unwrap();
        let negative = bf16(&qn).matmul(&bf16(&queue).t().unwrap()).unwrap();
        let logits = (Tensor::cat(&[&positive, &negative], 1).unwrap() / 0.2).unwrap();
        let want = (logsumexp(&logits).unwrap() - logits.narrow(1, 0, 1).unwrap())
            .unwrap()
            .mean_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        let (in_bf16, in_f32) = (loss(DType::BF16), loss(DType::F32));
        assert!((in_bf16 - want).abs() < 1e-5, "{in_bf16} vs {want}");
        // The rounding is there: f32 inputs give another loss.
        assert!((in_f32 - want).abs() > 1e-5, "{in_f32} vs {want}");
    }

    /// ```python
    /// q = torch.tensor([[1., 0.], [0., 2.]], dtype=torch.float64)
    /// k = torch.tensor([[1., 1.], [0., 1.]], dtype=torch.float64)
    /// logits = F.normalize(q, dim=1) @ F.normalize(k, dim=1).T / 0.2
    /// F.cross_entropy(logits, torch.arange(2)) * 2 * 0.2
    /// ```
    #[test]
    fn moco_v3_matches_hand_computed_value() {
        let q = t(&[&[1.0, 0.0], &[0.0, 2.0]]);
        let k = t(&[&[1.0, 1.0], &[0.0, 1.0]]);
        // Unit q: (1, 0), (0, 1); unit k: (0.7071, 0.7071), (0, 1).
        // Row 1 logits: 3.5355, 0; positive 3.5355. Row 2: 3.5355, 5; positive 5.
        let s = 0.5f64.sqrt() / 0.2;
        let row1 = (s.exp() + 1.0).ln() - s;
        let row2 = (s.exp() + 5f64.exp()).ln() - 5.0;
        let expected = (row1 + row2) / 2.0 * 0.4;
        let got = moco_v3(&q, &k, 0.2).unwrap().to_scalar::<f64>().unwrap();
        assert!((got - expected).abs() < 1e-12, "{got} vs {expected}");
        assert!((expected - 0.047_343).abs() < 1e-6, "{expected}");
    }

    #[test]
    fn l1_is_mean_absolute_difference() {
        let a = t(&[&[1.0, -2.0], &[0.5, 0.0]]);
        let b = t(&[&[0.0, 0.0], &[0.5, 3.0]]);
        let got = l1_regression(&a, &b).unwrap().to_scalar::<f64>().unwrap();
        assert!((got - 6.0 / 4.0).abs() < 1e-12);
    }
}

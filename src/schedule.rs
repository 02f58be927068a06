//! Learning-rate and momentum schedules, as pure functions of the optimiser step.

use std::f64::consts::PI;

/// Linear warm-up then cosine decay, per optimiser step (MoCo v3's `adjust_learning_rate`,
/// stepped per iteration). Step `s` (counting from 0) of `warmup` warm-up steps gets
/// `peak * (s + 1) / warmup`; after that the rate follows a half cosine from `peak` at the
/// end of warm-up to `min` at `total`.
pub fn learning_rate(step: u64, warmup: u64, total: u64, peak: f64, min: f64) -> f64 {
    if step < warmup {
        return peak * (step + 1) as f64 / warmup as f64;
    }
    let span = total.saturating_sub(warmup).max(1) as f64;
    let progress = ((step - warmup) as f64 / span).min(1.0);
    min + (peak - min) * 0.5 * (1.0 + (PI * progress).cos())
}

/// The momentum of the EMA (p3 following p1): MoBY's cosine schedule from `base` at step 0
/// to 1 at `total`: `1 - (1 - base) * (cos(pi * step / total) + 1) / 2`.
pub fn momentum(step: u64, total: u64, base: f64) -> f64 {
    let progress = (step as f64 / total.max(1) as f64).min(1.0);
    1.0 - (1.0 - base) * ((PI * progress).cos() + 1.0) / 2.0
}

/// The linear scaling rule for the peak rate: `base_lr * batch / lr_batch` (MimCo: 512,
/// MoCo v3: 256).
pub fn scaled_lr(base_lr: f64, global_batch: usize, lr_batch: usize) -> f64 {
    base_lr * global_batch as f64 / lr_batch as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_cosine() {
        let lr = |s| learning_rate(s, 10, 110, 1.0, 0.0);
        assert!((lr(0) - 0.1).abs() < 1e-12);
        assert!((lr(4) - 0.5).abs() < 1e-12);
        assert!((lr(9) - 1.0).abs() < 1e-12);
        assert!((lr(10) - 1.0).abs() < 1e-12, "peak right after warm-up");
        assert!((lr(60) - 0.5).abs() < 1e-12, "half-way through the cosine");
        assert!(lr(110).abs() < 1e-12 && lr(500).abs() < 1e-12);
        assert!((learning_rate(60, 10, 110, 1.0, 0.2) - 0.6).abs() < 1e-12);
        for s in 10..110 {
            assert!(lr(s + 1) <= lr(s), "non-increasing after warm-up");
        }
        assert!((scaled_lr(1e-3, 2048, 512) - 4e-3).abs() < 1e-15);
    }

    #[test]
    fn momentum_rises_from_base_to_one() {
        assert!((momentum(0, 100, 0.99) - 0.99).abs() < 1e-12);
        assert!((momentum(50, 100, 0.99) - 0.995).abs() < 1e-12);
        assert!((momentum(100, 100, 0.99) - 1.0).abs() < 1e-12);
        for s in 0..100 {
            assert!(momentum(s + 1, 100, 0.99) >= momentum(s, 100, 0.99));
        }
    }
}

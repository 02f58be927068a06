//! The key queues of MoCo (He et al., <https://arxiv.org/abs/1911.05722>): a FIFO of the
//! most recent teacher keys, used as negatives. MimCo keeps one per loss.

use candle_core::{Device, Result, Tensor};
use rand_distr::{Distribution, StandardNormal};

use crate::functional::l2_normalize;

/// A fixed-length FIFO of unit-length keys, `(len, dim)`.
#[derive(Clone, Debug)]
pub struct KeyQueue {
    keys: Tensor,
    /// Row the next key is written to.
    ptr: usize,
}

impl KeyQueue {
    /// `len` random unit vectors of width `dim`, drawn from `(seed, name)`.
    pub fn random(
        len: usize,
        dim: usize,
        seed: u64,
        name: &str,
        device: &Device,
    ) -> Result<KeyQueue> {
        let mut rng =
            pipeline::order::seeded_rng(&[b"queue", &seed.to_le_bytes(), name.as_bytes()]);
        let values: Vec<f32> = (0..len * dim)
            .map(|_| StandardNormal.sample(&mut rng))
            .collect();
        let keys = l2_normalize(&Tensor::from_vec(values, (len, dim), device)?)?;
        Ok(KeyQueue { keys, ptr: 0 })
    }

    /// A queue restored from a checkpoint.
    pub fn from_parts(keys: Tensor, ptr: usize) -> Result<KeyQueue> {
        if ptr >= keys.dim(0)? {
            candle_core::bail!(
                "queue pointer {ptr} is outside a queue of {} keys",
                keys.dim(0)?
            );
        }
        Ok(KeyQueue { keys, ptr })
    }

    /// The keys, `(len, dim)`.
    pub fn keys(&self) -> &Tensor {
        &self.keys
    }

    /// Where the next key goes.
    pub fn ptr(&self) -> usize {
        self.ptr
    }

    /// Replaces the oldest keys with `new` (`(B, dim)`, detached), wrapping around; when
    /// `B` exceeds the length only the last `len` keys are kept.
    pub fn enqueue(&mut self, new: &Tensor) -> Result<()> {
        let len = self.keys.dim(0)?;
        let mut new = new.detach();
        let b = new.dim(0)?;
        if b > len {
            new = new.narrow(0, b - len, len)?;
        }
        let b = new.dim(0)?;
        let first = b.min(len - self.ptr);
        let mut keys = self.keys.slice_assign(
            &[self.ptr..self.ptr + first, 0..self.keys.dim(1)?],
            &new.narrow(0, 0, first)?,
        )?;
        if first < b {
            keys = keys.slice_assign(
                &[0..b - first, 0..keys.dim(1)?],
                &new.narrow(0, first, b - first)?,
            )?;
        }
        self.keys = keys;
        self.ptr = (self.ptr + b) % len;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(q: &KeyQueue) -> Vec<f32> {
        q.keys()
            .narrow(1, 0, 1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    #[test]
    fn fifo_wraps_and_keeps_the_newest() {
        let dev = Device::Cpu;
        let mut q = KeyQueue::random(4, 2, 0, "t", &dev).unwrap();
        let norms: Vec<f32> = q.keys().sqr().unwrap().sum(1).unwrap().to_vec1().unwrap();
        assert!(
            norms.iter().all(|n| (n - 1.0).abs() < 1e-5),
            "unit keys: {norms:?}"
        );
        let batch = |vals: &[f32]| {
            let data: Vec<f32> = vals.iter().flat_map(|&v| [v, 0.0]).collect();
            Tensor::from_vec(data, (vals.len(), 2), &dev).unwrap()
        };
        q.enqueue(&batch(&[1.0, 2.0, 3.0])).unwrap();
        assert_eq!(q.ptr(), 3);
        assert_eq!(&rows(&q)[..3], &[1.0, 2.0, 3.0]);
        q.enqueue(&batch(&[4.0, 5.0])).unwrap();
        assert_eq!((rows(&q), q.ptr()), (vec![5.0, 2.0, 3.0, 4.0], 1));
        q.enqueue(&batch(&[6.0, 7.0, 8.0, 9.0, 10.0, 11.0]))
            .unwrap();
        assert_eq!((rows(&q), q.ptr()), (vec![11.0, 8.0, 9.0, 10.0], 1));
        let same = KeyQueue::random(4, 2, 0, "t", &dev).unwrap();
        let other = KeyQueue::random(4, 2, 0, "u", &dev).unwrap();
        assert_eq!(
            rows(&same),
            rows(&KeyQueue::random(4, 2, 0, "t", &dev).unwrap())
        );
        assert_ne!(rows(&same), rows(&other));
    }
}

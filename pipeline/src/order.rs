//! Which samples a rank reads in an epoch, and in which order.
//!
//! Everything here is a pure function of the manifest, the seed, the epoch and the
//! topology, never of thread counts or timing:
//! 1. the epoch's shards are permuted with a seeded RNG and dealt to ranks round-robin;
//! 2. each rank streams its shards in that order, and a seeded shuffle buffer (WebDataset's
//!    rule: fill to N, then emit a random slot and put the new sample there) fixes the
//!    order of its samples;
//! 3. every rank delivers the same number of samples, the smallest rank's count, so every
//!    rank takes the same number of steps.
//!
//! The shuffle buffer is simulated over sample positions, so the whole order is known
//! before a byte is read; the loader reorders what it reads to this plan.

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::format::Manifest;

/// This process's place among the training processes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Topology {
    /// Global rank, from 0.
    pub rank: usize,
    /// Number of ranks.
    pub world_size: usize,
}

impl Default for Topology {
    fn default() -> Self {
        Topology {
            rank: 0,
            world_size: 1,
        }
    }
}

impl Topology {
    /// Reads torchrun's `RANK` and `WORLD_SIZE` from the given variables (pass
    /// `std::env::vars()`); both absent means a single process.
    pub fn from_vars(vars: impl IntoIterator<Item = (String, String)>) -> Result<Topology> {
        let (mut rank, mut world) = (None, None);
        for (k, v) in vars {
            match k.as_str() {
                "RANK" => rank = Some(v),
                "WORLD_SIZE" => world = Some(v),
                _ => {}
            }
        }
        let parse = |name: &str, v: Option<String>, default: usize| -> Result<usize> {
            v.map_or(Ok(default), |v| {
                v.trim()
                    .parse()
                    .map_err(|_| config_error(format!("{name}={v:?} is not a number")))
            })
        };
        let topo = Topology {
            rank: parse("RANK", rank, 0)?,
            world_size: parse("WORLD_SIZE", world, 1)?,
        };
        topo.check()?;
        Ok(topo)
    }

    fn check(&self) -> Result<()> {
        if self.world_size == 0 || self.rank >= self.world_size {
            return Err(config_error(format!(
                "rank {} is not below world size {}",
                self.rank, self.world_size
            )));
        }
        Ok(())
    }
}

fn config_error(message: String) -> Error {
    Error::Config { message }
}

/// A ChaCha8 RNG seeded from SHA-256 of the given parts: independent streams for every
/// (purpose, seed, epoch, key, ...) without a global RNG.
pub fn seeded_rng(parts: &[&[u8]]) -> ChaCha8Rng {
    let mut h = Sha256::new();
    for part in parts {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part);
    }
    ChaCha8Rng::from_seed(h.finalize().into())
}

/// One rank's plan for one epoch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EpochPlan {
    /// The epoch.
    pub epoch: u64,
    /// The shards this rank reads, in reading order (indices into the manifest's shards).
    pub shards: Vec<usize>,
    /// This rank's samples in delivery order: (position in `shards`, index in the shard).
    pub order: Vec<(u32, u32)>,
    /// How many samples every rank delivers this epoch.
    pub samples: usize,
    /// How many batches every rank delivers this epoch.
    pub batches: usize,
}

/// What to plan.
#[derive(Clone, Copy, Debug)]
pub struct PlanSpec {
    /// The run's seed.
    pub seed: u64,
    /// The epoch, from 0.
    pub epoch: u64,
    /// Samples per batch on this rank.
    pub batch_size: usize,
    /// Shuffle buffer size in samples (0 or 1: no buffer shuffle).
    pub shuffle_buffer: usize,
    /// Drop the last partial batch, so every batch is full.
    pub drop_last: bool,
}

/// Plans `topo.rank`'s epoch.
pub fn plan_epoch(manifest: &Manifest, topo: Topology, spec: PlanSpec) -> Result<EpochPlan> {
    topo.check()?;
    if spec.batch_size == 0 {
        return Err(config_error("batch size must be at least 1".into()));
    }
    let n = manifest.shards.len();
    if n < topo.world_size {
        return Err(config_error(format!(
            "split {} has {n} shards for {} ranks: every rank needs at least one; re-pack with a smaller --shard-size",
            manifest.split, topo.world_size
        )));
    }
    let (seed, epoch) = (spec.seed.to_le_bytes(), spec.epoch.to_le_bytes());
    let mut shards: Vec<usize> = (0..n).collect();
    shards.shuffle(&mut seeded_rng(&[b"shards", &seed, &epoch]));
    let rank_samples = |r: usize| -> usize {
        shards
            .iter()
            .skip(r)
            .step_by(topo.world_size)
            .map(|&s| manifest.shards[s].samples as usize)
            .sum()
    };
    let balanced = (0..topo.world_size).map(rank_samples).min().unwrap_or(0);
    let (samples, batches) = if spec.drop_last {
        let b = balanced / spec.batch_size;
        (b * spec.batch_size, b)
    } else {
        (balanced, balanced.div_ceil(spec.batch_size))
    };
    let mine: Vec<usize> = shards
        .into_iter()
        .skip(topo.rank)
        .step_by(topo.world_size)
        .collect();
    let stream = mine
        .iter()
        .enumerate()
        .flat_map(|(p, &s)| (0..manifest.shards[s].samples as u32).map(move |i| (p as u32, i)));
    let rank = (topo.rank as u64).to_le_bytes();
    let order = shuffle_buffer(
        stream,
        spec.shuffle_buffer,
        &mut seeded_rng(&[b"buffer", &seed, &epoch, &rank]),
    );
    Ok(EpochPlan {
        epoch: spec.epoch,
        shards: mine,
        order,
        samples,
        batches,
    })
}

/// WebDataset's shuffle buffer over `stream`.
fn shuffle_buffer<T>(stream: impl Iterator<Item = T>, size: usize, rng: &mut impl Rng) -> Vec<T> {
    let mut out = Vec::new();
    let mut buffer = Vec::with_capacity(size.max(1));
    for item in stream {
        if buffer.len() < size.max(1) {
            buffer.push(item);
        } else {
            let j = rng.random_range(0..buffer.len());
            out.push(std::mem::replace(&mut buffer[j], item));
        }
    }
    buffer.shuffle(rng);
    out.extend(buffer);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::{
        Compression, FORMAT_NAME, FORMAT_VERSION, ImageCheck, PackParams, PackSettings, ShardInfo,
    };
    use std::collections::HashSet;

    pub(crate) fn manifest(counts: &[u64]) -> Manifest {
        Manifest {
            format: FORMAT_NAME.into(),
            format_version: FORMAT_VERSION,
            split: "train".into(),
            num_samples: counts.iter().sum(),
            num_rejects: 0,
            classes: vec!["a".into()],
            shards: counts
                .iter()
                .enumerate()
                .map(|(i, &c)| ShardInfo {
                    name: format!("train-{i:06}.tar.zst"),
                    samples: c,
                    bytes: 0,
                    sha256: String::new(),
                })
                .collect(),
            pack: PackParams {
                settings: PackSettings {
                    seed: 0,
                    target_shard_bytes: 0,
                    compression: Compression::Zstd,
                    zstd_level: 1,
                    check: ImageCheck::Header,
                    reencode: None,
                    write_json: false,
                },
                input_fingerprint: String::new(),
                tool: String::new(),
            },
        }
    }

    fn spec(epoch: u64) -> PlanSpec {
        PlanSpec {
            seed: 3,
            epoch,
            batch_size: 4,
            shuffle_buffer: 16,
            drop_last: true,
        }
    }

    #[test]
    fn ranks_partition_the_shards_and_agree_on_batches() {
        let m = manifest(&[10, 7, 12, 9, 11, 8, 10]);
        for world_size in 1..=3 {
            let plans: Vec<EpochPlan> = (0..world_size)
                .map(|rank| plan_epoch(&m, Topology { rank, world_size }, spec(0)).unwrap())
                .collect();
            let mut seen = HashSet::new();
            for p in &plans {
                assert_eq!((p.batches, p.samples), (plans[0].batches, plans[0].samples));
                assert!(p.samples <= p.order.len() && p.samples == p.batches * 4);
                for &(pos, i) in &p.order {
                    assert!(
                        seen.insert((p.shards[pos as usize], i)),
                        "sample planned twice"
                    );
                }
            }
            assert_eq!(
                seen.len() as u64,
                m.num_samples,
                "every sample is in some rank's order"
            );
        }
    }

    #[test]
    fn epochs_differ_and_plans_repeat() {
        let m = manifest(&[10, 7, 12, 9]);
        let topo = Topology::default();
        assert_eq!(
            plan_epoch(&m, topo, spec(0)).unwrap(),
            plan_epoch(&m, topo, spec(0)).unwrap()
        );
        assert_ne!(
            plan_epoch(&m, topo, spec(0)).unwrap().order,
            plan_epoch(&m, topo, spec(1)).unwrap().order
        );
    }

    #[test]
    fn too_few_shards_or_bad_rank_is_an_error() {
        let m = manifest(&[10]);
        let e = plan_epoch(
            &m,
            Topology {
                rank: 0,
                world_size: 2,
            },
            spec(0),
        )
        .unwrap_err();
        assert!(e.to_string().contains("--shard-size"), "{e}");
        let vars = [
            ("RANK".to_string(), "3".to_string()),
            ("WORLD_SIZE".to_string(), "2".to_string()),
        ];
        assert!(Topology::from_vars(vars).is_err());
        let ok = Topology::from_vars([
            ("WORLD_SIZE".to_string(), "4".to_string()),
            ("RANK".into(), "1".into()),
        ])
        .unwrap();
        assert_eq!(
            ok,
            Topology {
                rank: 1,
                world_size: 4
            }
        );
    }
}

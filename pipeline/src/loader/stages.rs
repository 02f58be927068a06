//! The four kinds of thread of an epoch: readers, the sequencer, decoders, the assembler.

use std::collections::{BTreeMap, HashMap};
use std::io::{BufReader, Read};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};

use crate::batch::{Batch, BatchPool, Encoded};
use crate::cache::{ShardCache, Tee};
use crate::decode::{CropDecoder, DecodeError};
use crate::error::{Error, Result};
use crate::format::{Compression, Sample};
use crate::order::{EpochPlan, seeded_rng};
use crate::shard::ShardReader;
use crate::source::RangeReader;
use crate::transform::flip::to_chw;

use super::{Ctx, LoaderState, panic_message};

/// A ticket is a linear shard number: pass * shards + position in the plan's shards.
pub(super) enum Arrival {
    Sample {
        ticket: u64,
        index: u32,
        sample: Sample,
    },
    End {
        ticket: u64,
        count: u32,
    },
}

pub(super) struct Job {
    pub(super) plan_index: u64,
    pub(super) sample: Option<Sample>,
}

/// A sample's pixels: its views decoded and augmented, or its JPEG left for the GPU.
pub(super) enum Pixels {
    Chw(Vec<u8>),
    Encoded(Encoded),
}

/// A sample's pixels, its first view's mask and libjpeg's warning about it.
type Augmented = (Pixels, Option<Vec<u8>>, Option<String>);

pub(super) enum Outcome {
    Ready {
        pixels: Pixels,
        label: u32,
        key: String,
        mask: Option<Vec<u8>>,
        /// libjpeg's warning about the image, which decoded despite it.
        warning: Option<String>,
    },
    Failed,
    Missing,
}

pub(super) struct ReaderCtx {
    pub(super) loader: Ctx,
    pub(super) plan: Arc<EpochPlan>,
    pub(super) stop: Arc<AtomicBool>,
    pub(super) cache: Option<ShardCache>,
}

impl ReaderCtx {
    pub(super) fn run(self, tickets: Receiver<u64>, arrivals: Sender<Arrival>) {
        let c = &self.loader;
        for ticket in tickets {
            let shard = &c.manifest.shards
                [self.plan.shards[(ticket % self.plan.shards.len() as u64) as usize]];
            let compression =
                Compression::from_shard_name(&shard.name).unwrap_or(Compression::Zstd);
            let retry = Duration::from_secs(c.config.io_retry_seconds);
            let cached = self.cache.as_ref().and_then(|cache| cache.open(shard));
            let from_cache = cached.is_some();
            let input: Tee<Box<dyn Read + Send>> = match (cached, &self.cache) {
                (Some(file), _) => {
                    c.metrics.cache_hits.fetch_add(1, Ordering::Relaxed);
                    Tee::plain(Box::new(BufReader::with_capacity(1 << 20, file)))
                }
                (None, cache) => {
                    let remote: Box<dyn Read + Send> = Box::new(RangeReader::new(
                        c.source.clone(),
                        c.runtime.clone(),
                        &shard.name,
                        shard.bytes,
                        c.config.chunk_bytes,
                        retry,
                        self.stop.clone(),
                        c.metrics.io.clone(),
                    ));
                    match cache {
                        Some(cache) => cache.fill(shard, remote),
                        None => Tee::plain(remote),
                    }
                }
            };
            let mut count = 0u32;
            let result =
                ShardReader::new(shard.name.clone(), input, compression).and_then(|mut reader| {
                    for sample in reader.samples()? {
                        let sample = Arrival::Sample {
                            ticket,
                            index: count,
                            sample: sample?,
                        };
                        if arrivals.send(sample).is_err() {
                            return Ok(false); // the epoch was dropped
                        }
                        count += 1;
                    }
                    // The whole shard parsed: keep the cached copy if it checks out.
                    let shard_io = |source| Error::ShardIo {
                        shard: shard.name.clone(),
                        source,
                    };
                    reader.into_inner().commit().map_err(shard_io)?;
                    Ok(true)
                });
            let failure = match result {
                Ok(false) => return,
                // The shard reader's errors name the shard.
                Err(e) => Some(format!("{e}; skipped the rest of it after {count} samples")),
                Ok(true) if u64::from(count) != shard.samples => Some(format!(
                    "shard {} holds {count} samples, its manifest entry {}",
                    shard.name, shard.samples
                )),
                Ok(true) => None,
            };
            if let Some(mut message) = failure {
                c.metrics.failed_shards.fetch_add(1, Ordering::Relaxed);
                // A cached copy that went bad (the disk, or a hand) would fail every epoch.
                if let Some(cache) = self.cache.as_ref().filter(|_| from_cache) {
                    cache.evict(shard);
                    message += "; removed its cached copy: the next read fetches it again";
                }
                c.metrics.note(message);
            }
            if arrivals.send(Arrival::End { ticket, count }).is_err()
                || self.stop.load(Ordering::Relaxed)
            {
                return;
            }
        }
    }
}

pub(super) struct Sequencer {
    pub(super) plan: Arc<EpochPlan>,
    pub(super) readers: u64,
    pub(super) stop: Arc<AtomicBool>,
}

impl Sequencer {
    /// Hands samples to the decoders in plan order, from `cursor` on, cycling through the
    /// plan again if the assembler still needs samples at its end.
    pub(super) fn run(
        self,
        cursor: u64,
        tickets: Sender<u64>,
        arrivals: Receiver<Arrival>,
        jobs: Sender<Job>,
        more: Receiver<()>,
    ) {
        let (order, shards) = (&self.plan.order, self.plan.shards.len() as u64);
        let len = order.len() as u64;
        if len == 0 {
            return;
        }
        // furthest[j]: the furthest shard reached by order[..=j]; lowest[j]: the lowest
        // shard still needed by order[j..].
        let furthest: Vec<u32> = order
            .iter()
            .scan(0, |m, &(p, _)| {
                *m = (*m).max(p);
                Some(*m)
            })
            .collect();
        let mut lowest: Vec<u32> = vec![0; order.len()];
        let mut m = u32::MAX;
        for j in (0..order.len()).rev() {
            m = m.min(order[j].0);
            lowest[j] = m;
        }
        let mut next_ticket = (cursor / len) * shards + u64::from(lowest[(cursor % len) as usize]);
        let mut arrived: HashMap<(u64, u32), Sample> = HashMap::new();
        let mut ended: HashMap<u64, u32> = HashMap::new();
        let mut allowed_pass = cursor / len;
        for k in cursor.. {
            if self.stop.load(Ordering::Relaxed) {
                return;
            }
            let (pass, j) = (k / len, (k % len) as usize);
            if pass > allowed_pass {
                if more.recv().is_err() {
                    return;
                }
                allowed_pass = pass;
            }
            let (pos, index) = order[j];
            let ticket = pass * shards + u64::from(pos);
            // Read ahead `readers` shards, but not into the next pass before it starts.
            let window = (pass * shards + u64::from(furthest[j]) + self.readers)
                .min((pass + 1) * shards - 1);
            while next_ticket <= window {
                if tickets.send(next_ticket).is_err() {
                    return;
                }
                next_ticket += 1;
            }
            let sample = loop {
                if let Some(s) = arrived.remove(&(ticket, index)) {
                    break Some(s);
                }
                if ended.get(&ticket).is_some_and(|&n| index >= n) {
                    break None;
                }
                match arrivals.recv() {
                    Ok(Arrival::Sample {
                        ticket,
                        index,
                        sample,
                    }) => {
                        arrived.insert((ticket, index), sample);
                    }
                    Ok(Arrival::End { ticket, count }) => {
                        ended.insert(ticket, count);
                    }
                    Err(_) => return,
                }
            };
            if jobs
                .send(Job {
                    plan_index: k,
                    sample,
                })
                .is_err()
            {
                return;
            }
            // Forget shards the rest of this pass no longer needs.
            let still = if j + 1 < order.len() {
                pass * shards + u64::from(lowest[j + 1])
            } else {
                (pass + 1) * shards
            };
            if still > pass * shards + u64::from(lowest[j]) {
                arrived.retain(|&(t, _), _| t >= still);
                ended.retain(|&t, _| t >= still);
            }
        }
    }
}

pub(super) struct DecoderCtx {
    pub(super) loader: Ctx,
    pub(super) epoch: u64,
    pub(super) spare: Receiver<Vec<u8>>,
}

impl DecoderCtx {
    pub(super) fn run(self, jobs: Receiver<Job>, done: Sender<(u64, Outcome)>) {
        let c = &self.loader;
        let view_bytes = 3 * (c.augment.size() as usize).pow(2);
        let mut decoder = CropDecoder::default();
        let mut hwc = vec![0u8; view_bytes];
        for job in jobs {
            let outcome = match job.sample {
                None => Outcome::Missing,
                Some(mut sample) => {
                    let started = Instant::now();
                    let result = catch_unwind(AssertUnwindSafe(|| {
                        self.augment(&mut decoder, &mut sample, &mut hwc)
                            .map_err(|e| e.to_string())
                    }))
                    .unwrap_or_else(|payload| {
                        decoder = CropDecoder::default(); // its state is unknown
                        Err(format!("panicked ({})", panic_message(&*payload)))
                    });
                    c.metrics
                        .decode_ns
                        .fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
                    match result {
                        Ok((pixels, mask, warning)) => Outcome::Ready {
                            pixels,
                            label: sample.cls,
                            key: sample.key,
                            mask,
                            warning,
                        },
                        Err(e) => {
                            let message = format!("sample {}: {e}; skipped", sample.key);
                            c.metrics.note(message); // counted when the assembler skips it
                            Outcome::Failed
                        }
                    }
                }
            };
            if done.send((job.plan_index, outcome)).is_err() {
                return;
            }
        }
    }

    /// Decodes `sample` once for all its views and returns them, augmented (views x 3 x
    /// size x size bytes), or, with `device_decode`, its JPEG with the crop and flip
    /// drawn for it where the GPU can decode it (its image bytes move out of `sample`);
    /// with the first view's mask, if it has one, and libjpeg's warning, if it gave one.
    fn augment(
        &self,
        decoder: &mut CropDecoder,
        sample: &mut Sample,
        hwc: &mut [u8],
    ) -> Result<Augmented, DecodeError> {
        let c = &self.loader;
        let size = c.augment.size();
        let (seed, epoch) = (c.config.seed.to_le_bytes(), self.epoch.to_le_bytes());
        let header = decoder.inspect(&sample.image)?;
        let dims = header.dims;
        let params: Vec<_> = (0..c.augment.views())
            .map(|view| {
                let mut rng = seeded_rng(&[
                    b"sample",
                    &seed,
                    &epoch,
                    sample.key.as_bytes(),
                    &(view as u64).to_le_bytes(),
                ]);
                c.augment.sample(view, dims, &mut rng)
            })
            .collect();
        if c.config.device_decode && header.hardware_decodable && params.len() == 1 {
            let p = params.into_iter().next().expect("one view");
            let encoded = Encoded {
                slot: 0, // set by the batch
                jpeg: std::mem::take(&mut sample.image),
                dims,
                crop: p.crop,
                flip: p.flip,
            };
            c.metrics.left_encoded.fetch_add(1, Ordering::Relaxed);
            return Ok((Pixels::Encoded(encoded), p.mask.map(|m| m.units), None));
        }
        let mut chw = self.spare.try_recv().unwrap_or_default();
        chw.resize(params.len() * hwc.len(), 0);
        let crops: Vec<_> = params.iter().map(|p| p.crop).collect();
        let info = decoder.decode(&sample.image, dims, &crops, size)?;
        let scale = info.scale.trailing_zeros().min(3) as usize;
        c.metrics.downscaled[scale].fetch_add(1, Ordering::Relaxed);
        let ppm = (info.decoded_fraction() * 1e6).round() as u64;
        c.metrics.decoded_ppm.fetch_add(ppm, Ordering::Relaxed);
        for (p, out) in params.iter().zip(chw.chunks_exact_mut(hwc.len())) {
            decoder.crop_resize(&info, &p.crop, size, hwc)?;
            p.pixels.apply(hwc, size as usize);
            to_chw(hwc, size as usize, p.flip, out);
        }
        let mask = params.into_iter().next().and_then(|p| p.mask);
        Ok((Pixels::Chw(chw), mask.map(|m| m.units), info.warning))
    }
}

pub(super) struct Assembler {
    pub(super) loader: Ctx,
    pub(super) pool: Arc<BatchPool>,
    pub(super) plan: Arc<EpochPlan>,
    pub(super) state: LoaderState,
    pub(super) spare: Sender<Vec<u8>>,
}

impl Assembler {
    pub(super) fn run(
        self,
        done: Receiver<(u64, Outcome)>,
        batches: Sender<Result<Batch>>,
        more: Sender<()>,
    ) {
        let c = &self.loader;
        let plan = &self.plan;
        let (len, batch_size) = (plan.order.len() as u64, c.config.batch_size);
        let mask_grid = c.augment.mask_grid();
        let mut pending: BTreeMap<u64, Outcome> = BTreeMap::new();
        let mut cursor = self.state.plan_cursor;
        let mut delivered = self.state.batches * batch_size;
        let mut ready_this_pass = 0u64;
        // Which samples of the plan were delivered; those before a resumed cursor are
        // taken as delivered.
        let mut delivered_once: Vec<bool> = (0..len).map(|i| i < cursor).collect();
        let mut requested_pass = cursor / len.max(1);
        for index in self.state.batches..plan.batches {
            let want = batch_size.min(plan.samples - delivered);
            let mut batch = Batch::new(
                &self.pool,
                plan.epoch,
                index,
                c.augment.size(),
                c.augment.views(),
                mask_grid,
                want,
            );
            while batch.len() < want {
                if cursor / len > requested_pass {
                    requested_pass = cursor / len;
                    let _ = more.send(());
                }
                let outcome = match pending.remove(&cursor) {
                    Some(o) => o,
                    None => match done.recv() {
                        Ok((k, o)) => {
                            pending.insert(k, o);
                            continue;
                        }
                        Err(_) => return,
                    },
                };
                let at = (cursor % len) as usize;
                cursor += 1;
                match outcome {
                    Outcome::Ready {
                        pixels,
                        label,
                        key,
                        mask,
                        warning,
                    } => {
                        if let Some(warning) = warning {
                            c.metrics.warned_samples.fetch_add(1, Ordering::Relaxed);
                            tracing::warn!(
                                "sample {key}: decoded despite libjpeg's warning: {warning}"
                            );
                        }
                        match pixels {
                            Pixels::Chw(chw) => {
                                batch.push(&chw, label, key, mask.as_deref());
                                let _ = self.spare.try_send(chw); // full: let it go
                            }
                            Pixels::Encoded(e) => {
                                batch.push_encoded(e, label, key, mask.as_deref());
                            }
                        }
                        ready_this_pass += 1;
                        if std::mem::replace(&mut delivered_once[at], true) {
                            c.metrics.repeated.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Outcome::Failed => {
                        c.metrics.failed_samples.fetch_add(1, Ordering::Relaxed);
                    }
                    Outcome::Missing => {
                        c.metrics.missing_samples.fetch_add(1, Ordering::Relaxed);
                    }
                }
                if cursor.is_multiple_of(len) {
                    if ready_this_pass == 0 {
                        let message = format!(
                            "no sample of this rank's {} shards could be read in epoch {}",
                            plan.shards.len(),
                            plan.epoch
                        );
                        let _ = batches.send(Err(Error::Source {
                            location: c.source.location().to_string(),
                            message,
                        }));
                        return;
                    }
                    ready_this_pass = 0;
                }
            }
            delivered += batch.len();
            c.metrics
                .delivered
                .fetch_add(batch.len() as u64, Ordering::Relaxed);
            batch.state_after = LoaderState {
                epoch: plan.epoch,
                batches: index + 1,
                plan_cursor: cursor,
            };
            if batches.send(Ok(batch)).is_err() {
                return;
            }
        }
    }
}

//! The wiring: the only module with a runtime, threads and channels.
//!
//! ```text
//! readers (N threads)        sequencer (1)              decoders (one per core)   assembler (1)
//! ranged GETs -> tar+zstd -> reorder to the EpochPlan -> decode, crop, flip,    -> plan order,
//! samples, in any order      (bounded arrivals)          mask (bounded jobs)       pooled batches
//! ```
//!
//! Readers stream the shards the sequencer tickets (a window of `readers` shards past the
//! furthest one the plan has reached). The sequencer hands samples to the decoders in plan
//! order; the assembler puts results back into plan order, skips the failed ones and fills
//! batches, which wait in a channel of `prefetch_batches`. A sample's crop, flip and mask
//! come from its own RNG, seeded by (seed, epoch, key), so the batches do not depend on
//! thread counts or timing. Every channel is bounded, except the ticket channel, which
//! never holds more than the window.

use std::collections::{BTreeMap, HashMap};
use std::io::{BufReader, Read};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, bounded, unbounded};
use serde::{Deserialize, Serialize};

use crate::batch::{Allocator, Batch, BatchPool, vec_allocator};
use crate::cache::{ShardCache, Tee};
use crate::config::LoaderConfig;
use crate::decode::{CropDecoder, dimensions};
use crate::error::{Error, Result};
use crate::format::{Compression, Manifest, Sample};
use crate::order::{EpochPlan, PlanSpec, Topology, plan_epoch, seeded_rng};
use crate::shard::ShardReader;
use crate::source::{IoCounters, RangeReader, ShardSource, StoreOptions};
use crate::transform::{Augment, Stage2};

/// Where a rank is in its data: store it in checkpoints, give it back to resume.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoaderState {
    /// The epoch.
    pub epoch: u64,
    /// Batches of that epoch already delivered.
    pub batches: usize,
    /// Entries of the epoch's plan already consumed (delivered or skipped as unreadable).
    pub plan_cursor: u64,
}

/// Counters since the loader was opened.
#[derive(Debug, Default)]
struct Metrics {
    delivered: AtomicU64,
    failed_samples: AtomicU64,
    missing_samples: AtomicU64,
    failed_shards: AtomicU64,
    repeated: AtomicU64,
    decode_ns: AtomicU64,
    consumer_wait_ns: AtomicU64,
    downscaled: [AtomicU64; 4],
    cache_hits: AtomicU64,
    io: Arc<IoCounters>,
    last_error: std::sync::Mutex<Option<String>>,
}

impl Metrics {
    /// Logs a failure and keeps it as the last one.
    fn note(&self, message: String) {
        tracing::error!("{message}");
        // A poisoned lock only means another thread panicked while recording; keep going.
        if let Ok(mut last) = self.last_error.lock() {
            *last = Some(message);
        }
    }
}

/// A snapshot of the loader's counters.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct MetricsSnapshot {
    /// Samples delivered in batches.
    pub samples: u64,
    /// Samples skipped because they did not decode.
    pub failed_samples: u64,
    /// Samples the manifest promised that a damaged shard did not yield.
    pub missing_samples: u64,
    /// Shard reads given up (corrupt, truncated, or unreadable after retries); a shard
    /// read again to replace lost samples counts again.
    pub failed_shards: u64,
    /// Samples delivered a second time in an epoch to replace unreadable ones.
    pub repeated_samples: u64,
    /// Bytes fetched from the store.
    pub bytes_read: u64,
    /// Store requests retried.
    pub io_retries: u64,
    /// Seconds decoders spent decoding and augmenting, summed over threads.
    pub decode_seconds: f64,
    /// Seconds readers waited for bytes, summed over threads.
    pub read_wait_seconds: f64,
    /// Seconds the consumer waited for a batch.
    pub consumer_wait_seconds: f64,
    /// JPEG decodes at full size, 1/2, 1/4 and 1/8 scale.
    pub decodes_by_scale: [u64; 4],
    /// Shards read from the local cache instead of the store.
    pub cache_hits: u64,
    /// The last shard or sample failure, with its shard or key.
    pub last_error: Option<String>,
}

/// The streaming loader of one rank.
pub struct Loader {
    runtime: tokio::runtime::Runtime,
    source: Arc<ShardSource>,
    manifest: Arc<Manifest>,
    topology: Topology,
    config: LoaderConfig,
    augment: Arc<Stage2>,
    pool: Arc<BatchPool>,
    metrics: Arc<Metrics>,
}

impl Loader {
    /// Opens the split at `location` (a folder or `s3://bucket/prefix`) and reads its
    /// manifest. `allocator` makes the batch buffers (pinned memory for CUDA); `None`
    /// uses plain vectors.
    pub fn open(
        location: &str,
        store: &StoreOptions,
        topology: Topology,
        config: LoaderConfig,
        allocator: Option<Allocator>,
    ) -> Result<Loader> {
        config.check()?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("pipeline-io")
            .enable_all()
            .build()
            .map_err(|e| Error::Config {
                message: format!("cannot start the I/O runtime: {e}"),
            })?;
        let source = Arc::new(ShardSource::open(location, store)?);
        let manifest = runtime.block_on(source.manifest())?;
        let augment = Arc::new(config.transform.build()?);
        let image_bytes = 3 * (config.transform.size as usize).pow(2);
        let pool = BatchPool::new(
            config.prefetch_batches + 2,
            config.batch_size * image_bytes,
            &allocator.unwrap_or_else(vec_allocator),
        );
        Ok(Loader {
            runtime,
            source,
            manifest: Arc::new(manifest),
            topology,
            config,
            augment,
            pool: Arc::new(pool),
            metrics: Arc::new(Metrics::default()),
        })
    }

    /// The split's manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// This rank's plan for `epoch`.
    pub fn plan(&self, epoch: u64) -> Result<EpochPlan> {
        let c = &self.config;
        plan_epoch(
            &self.manifest,
            self.topology,
            PlanSpec {
                seed: c.seed,
                epoch,
                batch_size: c.batch_size,
                shuffle_buffer: c.shuffle_buffer,
                drop_last: c.drop_last,
            },
        )
    }

    /// Streams the batches of `state.epoch` from `state` on: `LoaderState { epoch, ..Default::default() }`
    /// for a whole epoch, or a batch's [`Batch::state_after`] to resume after it.
    pub fn epoch(&self, state: LoaderState) -> Result<Epoch> {
        let plan = Arc::new(self.plan(state.epoch)?);
        if state.batches > plan.batches {
            return Err(Error::Config {
                message: format!(
                    "resume state {state:?} is past the end of the epoch ({} batches)",
                    plan.batches
                ),
            });
        }
        let stop = Arc::new(AtomicBool::new(false));
        let workers = self.config.worker_count();
        let cache = match &self.config.cache_dir {
            Some(dir) if !self.source.is_local() => {
                let cache =
                    ShardCache::new(dir, self.source.location()).map_err(|source| Error::Io {
                        path: dir.clone(),
                        source,
                    })?;
                Some(cache)
            }
            _ => None,
        };
        let (ticket_tx, ticket_rx) = unbounded::<u64>();
        let (arrival_tx, arrival_rx) = bounded::<Arrival>(256);
        let (job_tx, job_rx) = bounded::<Job>(workers * 2);
        let (done_tx, done_rx) = bounded::<(u64, Outcome)>(workers * 4);
        let (batch_tx, batch_rx) = bounded::<Result<Batch>>(self.config.prefetch_batches.max(1));
        // The assembler asks for another pass over the plan only when lost samples leave
        // it short; the sequencer never reads into a pass nobody needs.
        let (more_tx, more_rx) = unbounded::<()>();
        let mut threads = Vec::new();
        let spawn = |name: &str, f: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new()
                .name(name.to_string())
                .spawn(f)
                .map_err(|e| Error::Config {
                    message: format!("cannot start a thread: {e}"),
                })
        };
        for _ in 0..self.config.readers {
            let reader = ReaderCtx {
                loader: self.ctx(),
                plan: plan.clone(),
                stop: stop.clone(),
                cache: cache.clone(),
            };
            let (tickets, arrivals) = (ticket_rx.clone(), arrival_tx.clone());
            threads.push(spawn(
                "pipeline-read",
                Box::new(move || reader.run(tickets, arrivals)),
            )?);
        }
        drop((ticket_rx, arrival_tx));
        let sequencer = Sequencer {
            plan: plan.clone(),
            readers: self.config.readers as u64,
            stop: stop.clone(),
        };
        threads.push(spawn(
            "pipeline-seq",
            Box::new(move || {
                sequencer.run(state.plan_cursor, ticket_tx, arrival_rx, job_tx, more_rx)
            }),
        )?);
        // CHW image buffers go back from the assembler to the decoders for reuse.
        let (spare_tx, spare_rx) = bounded::<Vec<u8>>(workers * 8);
        for _ in 0..workers {
            let decoder = DecoderCtx {
                loader: self.ctx(),
                epoch: state.epoch,
                spare: spare_rx.clone(),
            };
            let (jobs, done) = (job_rx.clone(), done_tx.clone());
            threads.push(spawn(
                "pipeline-decode",
                Box::new(move || decoder.run(jobs, done)),
            )?);
        }
        drop((job_rx, done_tx));
        let assembler = Assembler {
            loader: self.ctx(),
            pool: self.pool.clone(),
            plan,
            state,
            spare: spare_tx,
        };
        threads.push(spawn(
            "pipeline-batch",
            Box::new(move || assembler.run(done_rx, batch_tx, more_tx)),
        )?);
        Ok(Epoch {
            batches: Some(batch_rx),
            threads,
            stop,
            metrics: self.metrics.clone(),
        })
    }

    fn ctx(&self) -> Ctx {
        Ctx {
            runtime: self.runtime.handle().clone(),
            source: self.source.clone(),
            manifest: self.manifest.clone(),
            config: self.config.clone(),
            augment: self.augment.clone(),
            metrics: self.metrics.clone(),
        }
    }

    /// The counters since the loader was opened.
    pub fn metrics(&self) -> MetricsSnapshot {
        let m = &self.metrics;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let secs = |a: &AtomicU64| get(a) as f64 / 1e9;
        MetricsSnapshot {
            samples: get(&m.delivered),
            failed_samples: get(&m.failed_samples),
            missing_samples: get(&m.missing_samples),
            failed_shards: get(&m.failed_shards),
            repeated_samples: get(&m.repeated),
            bytes_read: get(&m.io.bytes),
            io_retries: get(&m.io.retries),
            decode_seconds: secs(&m.decode_ns),
            read_wait_seconds: secs(&m.io.wait_ns),
            consumer_wait_seconds: secs(&m.consumer_wait_ns),
            decodes_by_scale: std::array::from_fn(|i| get(&m.downscaled[i])),
            cache_hits: get(&m.cache_hits),
            last_error: m.last_error.lock().ok().and_then(|e| e.clone()),
        }
    }
}

/// The batches of one epoch, in order. Dropping it stops and joins its threads.
pub struct Epoch {
    batches: Option<Receiver<Result<Batch>>>,
    threads: Vec<JoinHandle<()>>,
    stop: Arc<AtomicBool>,
    metrics: Arc<Metrics>,
}

impl Iterator for Epoch {
    type Item = Result<Batch>;

    fn next(&mut self) -> Option<Result<Batch>> {
        let waited = Instant::now();
        let next = self.batches.as_ref()?.recv().ok();
        self.metrics
            .consumer_wait_ns
            .fetch_add(waited.elapsed().as_nanos() as u64, Ordering::Relaxed);
        next
    }
}

impl Drop for Epoch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        drop(self.batches.take());
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// What every thread shares.
#[derive(Clone)]
struct Ctx {
    runtime: tokio::runtime::Handle,
    source: Arc<ShardSource>,
    manifest: Arc<Manifest>,
    config: LoaderConfig,
    augment: Arc<Stage2>,
    metrics: Arc<Metrics>,
}

/// A ticket is a linear shard number: pass * shards + position in the plan's shards.
enum Arrival {
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

struct Job {
    plan_index: u64,
    sample: Option<Sample>,
}

enum Outcome {
    Ready {
        chw: Vec<u8>,
        label: u32,
        key: String,
        mask: Option<Vec<u8>>,
    },
    Failed,
    Missing,
}

struct ReaderCtx {
    loader: Ctx,
    plan: Arc<EpochPlan>,
    stop: Arc<AtomicBool>,
    cache: Option<ShardCache>,
}

impl ReaderCtx {
    fn run(self, tickets: Receiver<u64>, arrivals: Sender<Arrival>) {
        let c = &self.loader;
        for ticket in tickets {
            let shard = &c.manifest.shards
                [self.plan.shards[(ticket % self.plan.shards.len() as u64) as usize]];
            let compression =
                Compression::from_shard_name(&shard.name).unwrap_or(Compression::Zstd);
            let retry = Duration::from_secs(c.config.io_retry_seconds);
            let cached = self.cache.as_ref().and_then(|cache| cache.open(shard));
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
                Err(e) => Some(format!(
                    "shard {}: {e}; skipped the rest of it after {count} samples",
                    shard.name
                )),
                Ok(true) if u64::from(count) != shard.samples => Some(format!(
                    "shard {} holds {count} samples, its manifest entry {}",
                    shard.name, shard.samples
                )),
                Ok(true) => None,
            };
            if let Some(message) = failure {
                c.metrics.failed_shards.fetch_add(1, Ordering::Relaxed);
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

struct Sequencer {
    plan: Arc<EpochPlan>,
    readers: u64,
    stop: Arc<AtomicBool>,
}

impl Sequencer {
    /// Hands samples to the decoders in plan order, from `cursor` on, cycling through the
    /// plan again if the assembler still needs samples at its end.
    fn run(
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

struct DecoderCtx {
    loader: Ctx,
    epoch: u64,
    spare: Receiver<Vec<u8>>,
}

impl DecoderCtx {
    fn run(self, jobs: Receiver<Job>, done: Sender<(u64, Outcome)>) {
        let c = &self.loader;
        let size = c.augment.crop.size;
        let mut decoder = CropDecoder::default();
        let mut hwc = vec![0u8; 3 * size as usize * size as usize];
        let (seed, epoch) = (c.config.seed.to_le_bytes(), self.epoch.to_le_bytes());
        for job in jobs {
            let outcome = match job.sample {
                None => Outcome::Missing,
                Some(sample) => {
                    let started = Instant::now();
                    let result = dimensions(&sample.image).and_then(|dims| {
                        let mut rng = seeded_rng(&[
                            b"sample",
                            &seed,
                            &epoch,
                            sample.key.as_bytes(),
                            &0u64.to_le_bytes(),
                        ]);
                        let params = c.augment.sample(0, dims, &mut rng);
                        let info = decoder.decode_crop(
                            &sample.image,
                            dims,
                            &params.crop,
                            size,
                            &mut hwc,
                        )?;
                        Ok((params, info))
                    });
                    c.metrics
                        .decode_ns
                        .fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
                    match result {
                        Ok((params, info)) => {
                            let scale = info.scale.trailing_zeros().min(3) as usize;
                            c.metrics.downscaled[scale].fetch_add(1, Ordering::Relaxed);
                            Outcome::Ready {
                                chw: {
                                    let mut chw = self.spare.try_recv().unwrap_or_default();
                                    to_chw(&hwc, size as usize, params.flip, &mut chw);
                                    chw
                                },
                                label: sample.cls,
                                key: sample.key,
                                mask: params.mask.map(|m| m.units),
                            }
                        }
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
}

/// Interleaved HWC to planar CHW in `chw`, mirrored horizontally when `flip`.
fn to_chw(hwc: &[u8], size: usize, flip: bool, chw: &mut Vec<u8>) {
    let plane = size * size;
    chw.resize(3 * plane, 0);
    for y in 0..size {
        for x in 0..size {
            let src = 3 * (y * size + if flip { size - 1 - x } else { x });
            for c in 0..3 {
                chw[c * plane + y * size + x] = hwc[src + c];
            }
        }
    }
}

struct Assembler {
    loader: Ctx,
    pool: Arc<BatchPool>,
    plan: Arc<EpochPlan>,
    state: LoaderState,
    spare: Sender<Vec<u8>>,
}

impl Assembler {
    fn run(self, done: Receiver<(u64, Outcome)>, batches: Sender<Result<Batch>>, more: Sender<()>) {
        let c = &self.loader;
        let plan = &self.plan;
        let (len, batch_size) = (plan.order.len() as u64, c.config.batch_size);
        let mask_grid = c.augment.mask.map_or(0, |m| m.grid());
        let mut pending: BTreeMap<u64, Outcome> = BTreeMap::new();
        let mut cursor = self.state.plan_cursor;
        let mut delivered = self.state.batches * batch_size;
        let mut ready_this_pass = 0u64;
        let mut requested_pass = cursor / len.max(1);
        for index in self.state.batches..plan.batches {
            let want = batch_size.min(plan.samples - delivered);
            let mut batch = Batch::new(
                &self.pool,
                plan.epoch,
                index,
                c.augment.crop.size,
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
                if cursor >= len {
                    c.metrics.repeated.fetch_add(1, Ordering::Relaxed);
                }
                cursor += 1;
                match outcome {
                    Outcome::Ready {
                        chw,
                        label,
                        key,
                        mask,
                    } => {
                        batch.push(&chw, label, key, mask.as_deref());
                        let _ = self.spare.try_send(chw); // full: let it go
                        ready_this_pass += 1;
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

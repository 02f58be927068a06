//! The wiring: the only module with a runtime, threads and channels (the threads
//! themselves are in `stages.rs`, the counters in `metrics.rs`).
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
//!
//! A panic is a bug, but it must not hang the trainer: a decoder that panics on a sample
//! counts it as failed and goes on; any other thread that panics ends the epoch with
//! [`Error::Internal`] (see `Crew`).

mod metrics;
mod stages;

use std::any::Any;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, bounded, unbounded};
use serde::{Deserialize, Serialize};

use crate::batch::{Allocator, Batch, BatchPool, vec_allocator};
use crate::cache::ShardCache;
use crate::config::LoaderConfig;
use crate::error::{Error, Result};
use crate::format::Manifest;
use crate::order::{EpochPlan, PlanSpec, Topology, plan_epoch};
use crate::source::{ShardSource, StoreOptions};
use crate::transform::Augment;

use metrics::Metrics;
pub use metrics::MetricsSnapshot;
use stages::{Arrival, Assembler, DecoderCtx, Job, Outcome, ReaderCtx, Sequencer};

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

/// The streaming loader of one rank.
pub struct Loader {
    runtime: tokio::runtime::Runtime,
    source: Arc<ShardSource>,
    manifest: Arc<Manifest>,
    topology: Topology,
    config: LoaderConfig,
    augment: Arc<dyn Augment>,
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
        let augment = config.transform.build()?;
        let image_bytes = augment.views() * 3 * (augment.size() as usize).pow(2);
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
        let mut crew = Crew::new(stop.clone());
        for _ in 0..self.config.readers {
            let reader = ReaderCtx {
                loader: self.ctx(),
                plan: plan.clone(),
                stop: stop.clone(),
                cache: cache.clone(),
            };
            let (tickets, arrivals) = (ticket_rx.clone(), arrival_tx.clone());
            crew.spawn("pipeline-read", move || reader.run(tickets, arrivals))?;
        }
        drop((ticket_rx, arrival_tx));
        let sequencer = Sequencer {
            plan: plan.clone(),
            readers: self.config.readers as u64,
            stop: stop.clone(),
        };
        crew.spawn("pipeline-seq", move || {
            sequencer.run(state.plan_cursor, ticket_tx, arrival_rx, job_tx, more_rx)
        })?;
        // CHW image buffers go back from the assembler to the decoders for reuse.
        let (spare_tx, spare_rx) = bounded::<Vec<u8>>(workers * 8);
        for _ in 0..workers {
            let decoder = DecoderCtx {
                loader: self.ctx(),
                epoch: state.epoch,
                spare: spare_rx.clone(),
            };
            let (jobs, done) = (job_rx.clone(), done_tx.clone());
            crew.spawn("pipeline-decode", move || decoder.run(jobs, done))?;
        }
        drop((job_rx, done_tx));
        let assembler = Assembler {
            loader: self.ctx(),
            pool: self.pool.clone(),
            plan,
            state,
            spare: spare_tx,
        };
        crew.spawn("pipeline-batch", move || {
            assembler.run(done_rx, batch_tx, more_tx)
        })?;
        Ok(Epoch {
            batches: Some(batch_rx),
            crew,
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
        self.metrics.snapshot()
    }
}

/// The batches of one epoch, in order. Dropping it stops and joins its threads.
pub struct Epoch {
    batches: Option<Receiver<Result<Batch>>>,
    crew: Crew,
    metrics: Arc<Metrics>,
}

impl Iterator for Epoch {
    type Item = Result<Batch>;

    /// The next batch; `None` at the end of the epoch, after an error, or after a thread
    /// panicked (reported once as [`Error::Internal`]).
    fn next(&mut self) -> Option<Result<Batch>> {
        let batches = self.batches.as_ref()?;
        let waited = Instant::now();
        // Batches already made come first; a panic is noticed within one timeout.
        let next = loop {
            match batches.recv_timeout(Duration::from_millis(100)) {
                Ok(batch) => break Some(batch),
                Err(RecvTimeoutError::Timeout) if self.crew.panic().is_none() => {}
                Err(_) => {
                    // The channel closes while a panicking sender unwinds, before its
                    // message is recorded: wait for the crew to settle, so that a panic
                    // is never taken for the epoch's end.
                    self.batches = None;
                    break self
                        .crew
                        .settle()
                        .map(|message| Err(Error::Internal { message }));
                }
            }
        };
        self.metrics
            .consumer_wait_ns
            .fetch_add(waited.elapsed().as_nanos() as u64, Ordering::Relaxed);
        next
    }
}

impl Drop for Epoch {
    fn drop(&mut self) {
        drop(self.batches.take());
        self.crew.stop();
    }
}

/// The threads of an epoch, and the first panic among them. Without a panic every thread
/// ends once the epoch's channels close. A thread that panicked may leave others waiting
/// on it for ever; those are left behind (detached) rather than joined.
struct Crew {
    threads: Vec<JoinHandle<()>>,
    stop: Arc<AtomicBool>,
    panic: Arc<Mutex<Option<String>>>,
}

impl Crew {
    fn new(stop: Arc<AtomicBool>) -> Crew {
        Crew {
            threads: Vec::new(),
            stop,
            panic: Arc::default(),
        }
    }

    fn spawn(&mut self, name: &'static str, f: impl FnOnce() + Send + 'static) -> Result<()> {
        let (stop, panic) = (self.stop.clone(), self.panic.clone());
        let body = move || {
            if let Err(payload) = catch_unwind(AssertUnwindSafe(f)) {
                // Recorded before the others are told to stop, so that whoever sees them
                // stop can find out why.
                let message = format!("thread {name} panicked: {}", panic_message(&*payload));
                panic
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get_or_insert(message);
                stop.store(true, Ordering::Relaxed);
            }
        };
        let thread = std::thread::Builder::new()
            .name(name.to_string())
            .spawn(body)
            .map_err(|e| Error::Config {
                message: format!("cannot start a thread: {e}"),
            })?;
        self.threads.push(thread);
        Ok(())
    }

    /// What the first thread to panic said.
    fn panic(&self) -> Option<String> {
        self.panic.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Waits until a thread has panicked (its message) or every thread has ended (`None`).
    fn settle(&self) -> Option<String> {
        loop {
            if let Some(message) = self.panic() {
                return Some(message);
            }
            if self.threads.iter().all(|t| t.is_finished()) {
                // A thread records its panic before it ends.
                return self.panic();
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Tells the threads to stop and joins them, until one has panicked.
    fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        while !self.threads.is_empty() && self.panic().is_none() {
            let (done, running) = self.threads.drain(..).partition(|t| t.is_finished());
            self.threads = running;
            for t in done {
                let _ = t.join();
            }
            if !self.threads.is_empty() {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }
}

/// The text of a panic's payload (`panic!` with a message gives a `&str` or a `String`).
pub(super) fn panic_message(payload: &(dyn Any + Send)) -> &str {
    payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)")
}

/// What every thread shares.
#[derive(Clone)]
pub(super) struct Ctx {
    runtime: tokio::runtime::Handle,
    source: Arc<ShardSource>,
    manifest: Arc<Manifest>,
    config: LoaderConfig,
    augment: Arc<dyn Augment>,
    metrics: Arc<Metrics>,
}

#[cfg(test)]
mod tests;

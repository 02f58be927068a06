//! The loader's counters.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

use crate::source::IoCounters;

/// Counters since the loader was opened.
#[derive(Debug, Default)]
pub(super) struct Metrics {
    pub(super) delivered: AtomicU64,
    pub(super) failed_samples: AtomicU64,
    pub(super) warned_samples: AtomicU64,
    pub(super) missing_samples: AtomicU64,
    pub(super) failed_shards: AtomicU64,
    pub(super) repeated: AtomicU64,
    pub(super) decode_ns: AtomicU64,
    pub(super) consumer_wait_ns: AtomicU64,
    pub(super) downscaled: [AtomicU64; 4],
    /// Decoded pixels over the images' pixels (at the decode's scale), in millionths.
    pub(super) decoded_ppm: AtomicU64,
    pub(super) cache_hits: AtomicU64,
    pub(super) left_encoded: AtomicU64,
    pub(super) io: Arc<IoCounters>,
    pub(super) last_error: std::sync::Mutex<Option<String>>,
}

impl Metrics {
    /// The counters as plain numbers.
    pub(super) fn snapshot(&self) -> MetricsSnapshot {
        let m = self;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let secs = |a: &AtomicU64| get(a) as f64 / 1e9;
        MetricsSnapshot {
            samples: get(&m.delivered),
            failed_samples: get(&m.failed_samples),
            warned_samples: get(&m.warned_samples),
            missing_samples: get(&m.missing_samples),
            failed_shards: get(&m.failed_shards),
            repeated_samples: get(&m.repeated),
            bytes_read: get(&m.io.bytes),
            io_retries: get(&m.io.retries),
            decode_seconds: secs(&m.decode_ns),
            read_wait_seconds: secs(&m.io.wait_ns),
            consumer_wait_seconds: secs(&m.consumer_wait_ns),
            decodes_by_scale: std::array::from_fn(|i| get(&m.downscaled[i])),
            decoded_fraction: {
                let decodes: u64 = m.downscaled.iter().map(get).sum();
                get(&m.decoded_ppm) as f64 / 1e6 / decodes.max(1) as f64
            },
            cache_hits: get(&m.cache_hits),
            left_encoded: get(&m.left_encoded),
            last_error: m.last_error.lock().ok().and_then(|e| e.clone()),
        }
    }

    /// Logs a failure and keeps it as the last one.
    pub(super) fn note(&self, message: String) {
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
    /// Samples delivered although libjpeg warned about them: stray bytes between segments
    /// (the pixels are whole) or corrupt image data (the rest filled in), both of which
    /// Pillow decodes without a word. The log names each one.
    pub warned_samples: u64,
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
    /// The mean fraction of an image's pixels decoded (only the crops' rectangle is).
    pub decoded_fraction: f64,
    /// Shards read from the local cache instead of the store.
    pub cache_hits: u64,
    /// Images the decoders left encoded for the GPU (`device_decode`).
    pub left_encoded: u64,
    /// The last shard or sample failure, with its shard or key.
    pub last_error: Option<String>,
}

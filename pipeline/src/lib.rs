//! The mimco data pipeline: packed shards, from a local folder or an S3 bucket, to pooled
//! uint8 batches with labels and masks.
//!
//! Reading order, one stage per module:
//! [`source`] (ranged, retried reads through `object_store`) → [`shard`] (tar + zstd to
//! [`Sample`]s) → [`decode`] (DCT-scaled JPEG decode, crop and resize in one pass) →
//! [`transform`] (RandomResizedCrop, flip, SimMIM mask, or MoCo v3's two views with colour
//! jitter, greyscale, blur and solarize, or an evaluation centre crop: parameters drawn
//! apart from applying them) → [`batch`] (pooled buffers). [`order`] plans each epoch (shard order,
//! rank split, shuffle buffer) before a byte is read, and [`loader`] is the only module
//! with threads and channels. The shard format itself is [`format`](mod@format), shared
//! with `shardtool`.
//!
//! ```no_run
//! use pipeline::{Loader, LoaderConfig, LoaderState, StoreOptions, Topology};
//!
//! let store = StoreOptions::from_vars(std::env::vars()); // AWS_* for s3:// URLs
//! let topology = Topology::from_vars(std::env::vars())?; // torchrun's RANK, WORLD_SIZE
//! let loader = Loader::open("shards/train", &store, topology, LoaderConfig::default(), None)?;
//! for epoch in 0..2 {
//!     for batch in loader.epoch(LoaderState { epoch, ..Default::default() })? {
//!         let batch = batch?;
//!         // batch.images(): uint8 (N, views, 3, H, W); batch.labels, batch.masks, batch.keys;
//!         // batch.state_after goes into the checkpoint to resume exactly here.
//!     }
//! }
//! # Ok::<(), pipeline::Error>(())
//! ```
//!
//! Writing and reading shards directly:
//!
//! ```
//! use pipeline::{Compression, Sample, ShardReader, ShardWriter};
//!
//! let sample = Sample { key: "n01440764_18".into(), image: vec![0xFF, 0xD8], cls: 0, json: None };
//! let mut writer = ShardWriter::new(Vec::new(), Compression::Zstd, 3)?;
//! writer.write_sample(&sample)?;
//! let bytes = writer.finish()?;
//!
//! let mut reader = ShardReader::new("example", bytes.as_slice(), Compression::Zstd)?;
//! let samples: Vec<Sample> = reader.samples()?.collect::<Result<_, _>>()?;
//! assert_eq!(samples, vec![sample]);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! `examples/throughput.rs` measures the loader.
#![deny(missing_docs)]

pub mod batch;
pub mod cache;
pub mod config;
pub mod decode;
pub mod error;
pub mod format;
pub mod loader;
pub mod order;
pub mod shard;
pub mod source;
pub mod transform;

pub use batch::{Allocator, Batch, Encoded, HostBuffer, vec_allocator};
pub use config::{LoaderConfig, TransformConfig};
pub use error::{Error, Result};
pub use format::{
    Compression, HashingReader, Manifest, Sample, SampleMeta, ShardInfo, ShardWriter,
};
pub use loader::{Epoch, Loader, LoaderState, MetricsSnapshot};
pub use order::{EpochPlan, Topology};
pub use shard::ShardReader;
pub use source::{Progress, ShardSource, StoreOptions, UploadReport};

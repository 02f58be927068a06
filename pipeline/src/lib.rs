//! The mimco data pipeline.
//!
//! Today this crate holds the **shard format** that `shardtool` writes and the loader
//! reads, defined once:
//!
//! - [`format`](mod@format): shard names, the sample layout (`<key>.jpg`, `<key>.cls`, `<key>.json`),
//!   the [`Manifest`] and the [`ShardWriter`].
//! - [`shard`]: the streaming [`ShardReader`], which turns a shard's byte stream back
//!   into [`Sample`]s without seeking.
//!
//! The streaming loader (sources, decode, RandomResizedCrop, flip, masks, batches) is
//! built on these types.
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
#![deny(missing_docs)]

pub mod batch;
pub mod config;
pub mod decode;
pub mod error;
pub mod format;
pub mod loader;
pub mod order;
pub mod shard;
pub mod source;
pub mod transform;

pub use batch::{Allocator, Batch, HostBuffer};
pub use config::{LoaderConfig, TransformConfig};
pub use error::{Error, Result};
pub use format::{
    Compression, HashingReader, Manifest, Sample, SampleMeta, ShardInfo, ShardWriter,
};
pub use loader::{Epoch, Loader, LoaderState, MetricsSnapshot};
pub use order::{EpochPlan, Topology};
pub use shard::ShardReader;
pub use source::{ShardSource, StoreOptions};

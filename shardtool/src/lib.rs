//! `shardtool`: packs an ImageNet-shaped folder into zstd-compressed WebDataset tar
//! shards with a manifest, and reads them back.
//!
//! The flow of `shardtool pack` is [`scan::find_splits`] (list classes, files and obvious
//! rejects) → [`pack::plan_shards`] (seeded shuffle, cut into shards) →
//! [`pack::pack_split`] (parallel shard writing with [`check::check_image`] on every
//! file, resumable) → manifest. [`verify`] reads a pack back, [`upload`] copies it into object storage; [`synth`] makes
//! ImageNet-shaped folders from embedded photos for demos, tests and benchmarks.
//!
//! The format itself lives in the `pipeline` crate (`pipeline::format`), which the
//! loader reads with the same types.
#![deny(missing_docs)]

pub mod check;
pub mod pack;
pub mod scan;
pub mod synth;
pub mod upload;
pub mod verify;
pub mod work;

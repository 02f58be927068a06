//! Fixtures shared by the end-to-end tests: generated ImageNet-shaped folders, packed.
#![allow(dead_code)]

pub mod server;
pub mod train;

use std::path::{Path, PathBuf};

use pipeline::LoaderConfig;
use pipeline::format::{Compression, ImageCheck, PackSettings};
use shardtool::pack::{PackOptions, pack_split};
use shardtool::scan::find_splits;
use shardtool::synth::{SynthSpec, write_imagenet_like};

/// Generates `classes` x `per_class` small images (plus ImageNet's three oddities when
/// `quirks`) under `root/imagenet` and packs them into shards of about 40 KB; returns
/// the train split's folder.
pub fn packed(root: &Path, classes: usize, per_class: usize, quirks: bool, seed: u64) -> PathBuf {
    let input = root.join("imagenet");
    let spec = SynthSpec {
        classes,
        train_per_class: per_class,
        val_per_class: 0,
        flat_val: false,
        quirks,
        bad_files: false,
        short_side: (40, 90),
        quality: (75, 95),
        seed,
    };
    write_imagenet_like(&input, &spec, 2).unwrap();
    let settings = PackSettings {
        seed: 0,
        target_shard_bytes: 40_000,
        compression: Compression::Zstd,
        zstd_level: 1,
        check: ImageCheck::Header,
        reencode: None,
        write_json: true,
    };
    let opts = PackOptions {
        out: root.join("shards"),
        settings,
        workers: 2,
        strict: false,
        resume: false,
        progress: false,
    };
    for split in find_splits(&input, None).unwrap() {
        pack_split(&split, &opts).unwrap();
    }
    root.join("shards/train")
}

/// A loader config for 32-px crops with 8-px mask units (a 4x4 grid), batches of 4.
pub fn small_config(workers: usize, readers: usize, seed: u64) -> LoaderConfig {
    let mut c = LoaderConfig {
        batch_size: 4,
        workers,
        readers,
        shuffle_buffer: 16,
        seed,
        ..Default::default()
    };
    c.transform.size = 32;
    c.transform.mask_unit = 8;
    c.chunk_bytes = 4096; // many ranged reads per shard
    c
}

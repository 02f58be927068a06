//! Shared fixtures: small ImageNet-shaped folders generated from the repo's photos.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use pipeline::format::{Compression, ImageCheck, MANIFEST_FILE, Manifest, PackSettings};
use pipeline::{Sample, ShardReader};
use shardtool::pack::{PackOptions, SplitReport, pack_split};
use shardtool::scan::find_splits;
use shardtool::synth::{SynthReport, SynthSpec, write_imagenet_like};

/// A small spec: 4 classes x 6 train images, 2 val per class, small images.
pub fn small_spec() -> SynthSpec {
    SynthSpec {
        classes: 4,
        train_per_class: 6,
        val_per_class: 2,
        flat_val: false,
        quirks: true,
        bad_files: true,
        short_side: (48, 96),
        quality: (75, 95),
        seed: 7,
    }
}

pub fn make_dataset(root: &Path, spec: &SynthSpec) -> SynthReport {
    write_imagenet_like(root, spec, 2).expect("fixture generation")
}

pub fn options(out: &Path) -> PackOptions {
    PackOptions {
        out: out.to_path_buf(),
        settings: PackSettings {
            seed: 0,
            target_shard_bytes: 60_000,
            compression: Compression::Zstd,
            zstd_level: 3,
            check: ImageCheck::Header,
            reencode: None,
            write_json: true,
        },
        workers: 2,
        strict: false,
        resume: false,
        progress: false,
    }
}

pub fn pack_all(input: &Path, opts: &PackOptions) -> anyhow::Result<Vec<SplitReport>> {
    find_splits(input, None)?
        .iter()
        .map(|s| pack_split(s, opts))
        .collect()
}

/// Every sample of the split in `dir`, in manifest order.
pub fn read_split(dir: &Path) -> (Manifest, Vec<Sample>) {
    let manifest = Manifest::read(&dir.join(MANIFEST_FILE)).unwrap();
    let mut samples = Vec::new();
    for shard in &manifest.shards {
        let compression = Compression::from_shard_name(&shard.name).unwrap();
        let file = File::open(dir.join(&shard.name)).unwrap();
        let mut reader = ShardReader::new(shard.name.clone(), file, compression).unwrap();
        samples.extend(reader.samples().unwrap().map(Result::unwrap));
    }
    (manifest, samples)
}

/// All files under `dir` (relative path -> bytes).
pub fn tree(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    walkdir::WalkDir::new(dir)
        .into_iter()
        .map(Result::unwrap)
        .filter(|e| e.file_type().is_file())
        .map(|e| {
            (
                e.path().strip_prefix(dir).unwrap().to_path_buf(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect()
}

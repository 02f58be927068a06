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
    pack(&input, &root.join("shards"), ImageCheck::Header)
}

/// Packs the ImageNet-shaped folder `input` into shards of about 40 KB under `out`,
/// checking images at `check`; returns the train split's folder.
pub fn pack(input: &Path, out: &Path, check: ImageCheck) -> PathBuf {
    let settings = PackSettings {
        seed: 0,
        target_shard_bytes: 40_000,
        compression: Compression::Zstd,
        zstd_level: 1,
        check,
        reencode: None,
        write_json: true,
    };
    let opts = PackOptions {
        out: out.to_path_buf(),
        settings,
        workers: 2,
        strict: false,
        resume: false,
        progress: false,
    };
    for split in find_splits(input, None).unwrap() {
        pack_split(&split, &opts).unwrap();
    }
    out.join("train")
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

/// `jpeg` with two stray bytes before its first Huffman table, which libjpeg warns about
/// (and decodes), as Pillow does without a word.
pub fn with_stray_bytes(jpeg: &[u8]) -> Vec<u8> {
    let dht = jpeg.windows(2).position(|w| w == [0xFF, 0xC4]).unwrap();
    [&jpeg[..dht], b"\x00\x00", &jpeg[dht..]].concat()
}

/// Rewrites the first shard of the split in `dir`: its first sample's image becomes bytes
/// that are no image, its second gets [`with_stray_bytes`]; the manifest follows the
/// shard's new size.
pub fn damage_first_shard(dir: &Path) {
    use pipeline::format::{MANIFEST_FILE, Manifest};
    let mut manifest = Manifest::read(&dir.join(MANIFEST_FILE)).unwrap();
    let shard = &mut manifest.shards[0];
    let path = dir.join(&shard.name);
    let compression = Compression::from_shard_name(&shard.name).unwrap();
    let file = std::io::BufReader::new(std::fs::File::open(&path).unwrap());
    let mut reader = pipeline::ShardReader::new(shard.name.clone(), file, compression).unwrap();
    let mut samples: Vec<_> = reader.samples().unwrap().map(|s| s.unwrap()).collect();
    assert!(samples.len() >= 2, "the first shard holds two samples");
    samples[0].image = b"not an image".to_vec();
    samples[1].image = with_stray_bytes(&samples[1].image);
    let mut writer = pipeline::ShardWriter::new(Vec::new(), compression, 1).unwrap();
    for sample in &samples {
        writer.write_sample(sample).unwrap();
    }
    let bytes = writer.finish().unwrap();
    std::fs::write(&path, &bytes).unwrap();
    shard.bytes = bytes.len() as u64;
    shard.sha256 = String::new();
    std::fs::write(dir.join(MANIFEST_FILE), manifest.to_json()).unwrap();
}

//! Loader throughput on a packed split: images/s in total and per decode thread, the
//! per-stage time, and single-thread decode-only rates of the JPEG decoders on the same
//! files. A benchmark, not a test: `benches/data.sh` runs it next to the Python baseline.
//!
//! ```text
//! cargo run --release -p pipeline --example throughput -- SPLIT [--workers N] [--epochs E] [--two-views] [--device-decode] [--decoders] [--upload-from DIR]
//! ```
//! SPLIT is a split folder or `s3://bucket/prefix` (with the AWS_* variables set);
//! `--upload-from DIR` first copies the split in local folder DIR there. `--device-decode`
//! leaves the JPEGs a GPU's nvJPEG takes encoded (`[data] device_decode`): it measures
//! what is left to the CPU when the GPU decodes.

use std::sync::Arc;
use std::time::Instant;

use pipeline::decode::CropDecoder;
use pipeline::order::seeded_rng;
use pipeline::{Loader, LoaderConfig, LoaderState, ShardReader, StoreOptions, Topology};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let split = args
        .first()
        .ok_or("usage: throughput SPLIT [--workers N] [--epochs E] [--two-views] [--device-decode] [--decoders]")?;
    let flag = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .map(|v| v.parse::<usize>())
    };
    let workers = flag("--workers").transpose()?.unwrap_or(0);
    let epochs = flag("--epochs").transpose()?.unwrap_or(1);
    let mut config = LoaderConfig {
        workers,
        batch_size: 128,
        ..LoaderConfig::default()
    };
    // `--two-views`: MoCo v3's set (two views per sample, crop 0.08-1) instead of stage 2.
    if args.iter().any(|a| a == "--two-views") {
        config.transform.set = pipeline::config::TransformSet::Mocov3;
        config.transform.scale = [0.08, 1.0];
    }
    config.device_decode = args.iter().any(|a| a == "--device-decode");
    let threads = config.worker_count();
    let store = StoreOptions::from_vars(std::env::vars());
    if let Some(i) = args.iter().position(|a| a == "--upload-from") {
        let dir = args.get(i + 1).ok_or("--upload-from needs a folder")?;
        let source = pipeline::ShardSource::open(split, &store)?;
        let started = Instant::now();
        let report = tokio::runtime::Runtime::new()?
            .block_on(source.upload_split(std::path::Path::new(dir), Arc::new(|_| {})))?;
        let seconds = started.elapsed().as_secs_f64();
        println!(
            "upload: {} shards sent, {} kept, {:.1} MB in {seconds:.2} s, {:.0} MB/s",
            report.sent,
            report.kept,
            report.bytes_sent as f64 / 1e6,
            report.bytes_sent as f64 / 1e6 / seconds
        );
    }
    let loader = Loader::open(split, &store, Topology::default(), config.clone(), None)?;

    let started = Instant::now();
    let mut images = 0usize;
    for epoch in 0..epochs as u64 {
        for batch in loader.epoch(LoaderState {
            epoch,
            ..Default::default()
        })? {
            images += batch?.len();
        }
    }
    let secs = started.elapsed().as_secs_f64();
    let m = loader.metrics();
    println!(
        "loader: {images} images in {secs:.2} s = {:.0} images/s with {threads} decode threads ({:.0} per thread)",
        images as f64 / secs,
        images as f64 / secs / threads as f64
    );
    println!(
        "stages (summed over threads): decode+augment {:.2} s ({:.2} ms/image), read wait {:.2} s, consumer wait {:.2} s, {:.1} MB read; decodes at 1/1,1/2,1/4,1/8: {:?}, {:.0}% of their pixels; left encoded {}; failed {}, warned {}",
        m.decode_seconds,
        m.decode_seconds * 1e3 / images.max(1) as f64,
        m.read_wait_seconds,
        m.consumer_wait_seconds,
        m.bytes_read as f64 / 1e6,
        m.decodes_by_scale,
        100.0 * m.decoded_fraction,
        m.left_encoded,
        m.failed_samples,
        m.warned_samples
    );
    if args.iter().any(|a| a == "--decoders") {
        decoders(split, &loader, &config)?;
    }
    Ok(())
}

/// Single-thread decode-only rates on the split's first shards (local folders only).
fn decoders(
    split: &str,
    loader: &Loader,
    config: &LoaderConfig,
) -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::path::Path::new(split);
    let mut images = Vec::new();
    for shard in loader.manifest().shards.iter().take(4) {
        let file = std::fs::File::open(dir.join(&shard.name))?;
        let compression =
            pipeline::Compression::from_shard_name(&shard.name).ok_or("bad shard name")?;
        let mut reader = ShardReader::new(
            shard.name.clone(),
            std::io::BufReader::new(file),
            compression,
        )?;
        for s in reader.samples()? {
            images.push(s?);
        }
    }
    let n = images.len() as f64;
    let time = |f: &mut dyn FnMut(&[u8])| {
        let t = Instant::now();
        for s in &images {
            f(&s.image);
        }
        n / t.elapsed().as_secs_f64()
    };
    let zune = time(&mut |b| {
        image::load_from_memory(b).map(|i| i.to_rgb8()).ok();
    });
    // The reference decodes into a buffer it reuses, as the pipeline does.
    let mut decompressor = turbojpeg::Decompressor::new()?;
    let mut rgb = Vec::new();
    let turbo = time(&mut |b| {
        let Ok(header) = decompressor.read_header(b) else {
            return;
        };
        let len = header.width * header.height * 3;
        if rgb.len() < len {
            rgb.resize(len, 0);
        }
        let image = turbojpeg::Image {
            pixels: &mut rgb[..len],
            width: header.width,
            pitch: header.width * 3,
            height: header.height,
            format: turbojpeg::PixelFormat::RGB,
        };
        decompressor.decompress(b, image).ok();
    });
    let augment = config.transform.build()?;
    let mut crop_decoder = CropDecoder::default();
    let mut out = vec![0u8; 3 * (augment.size() as usize).pow(2)];
    let pipeline_path = time(&mut |b| {
        let dims = crop_decoder.dimensions(b).unwrap_or((1, 1));
        let params = augment.sample(0, dims, &mut seeded_rng(&[b]));
        crop_decoder
            .decode_crop(b, dims, &params.crop, augment.size(), &mut out)
            .ok();
    });
    println!("decode-only, 1 thread, {} images:", images.len());
    println!("  libjpeg-turbo, full size                {turbo:>7.0} images/s");
    println!("  image crate (zune-jpeg), full size      {zune:>7.0} images/s");
    println!("  ours: partial decode + crop + resize    {pipeline_path:>7.0} images/s");
    Ok(())
}

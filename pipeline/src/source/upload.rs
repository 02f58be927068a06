//! Copying a packed split into a store: what `shardtool upload` runs.
//!
//! Each shard is streamed from disk in parts, its SHA-256 computed on the way and checked
//! against the manifest before the object is completed, then recorded in the object's
//! metadata (`sha256`; `x-amz-meta-sha256` on S3). A rerun keeps the shards already stored
//! with the manifest's size and SHA-256, so an interrupted upload continues where it
//! stopped, and a changed or damaged local shard is never stored as if it were sound.

use std::future::Future;
use std::path::Path;
use std::sync::Arc;

use object_store::buffered::BufWriter;
use object_store::path::Path as StorePath;
use object_store::{Attribute, Attributes, GetOptions, ObjectStore, ObjectStoreExt};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::ShardSource;
use crate::error::{Error, Result};
use crate::format::{MANIFEST_FILE, Manifest, ShardInfo};

/// Shards [`ShardSource::upload_split`] uploads at once.
pub const UPLOADS: usize = 4;

/// The part size of a multipart upload; a smaller file is one PUT.
const UPLOAD_PART_BYTES: usize = 16 << 20;

/// Parts of one file in flight at once: with [`UPLOADS`] files, at most
/// `UPLOADS * (UPLOAD_PARTS + 1)` parts are in memory.
const UPLOAD_PARTS: usize = 2;

/// The metadata key under which an uploaded shard's SHA-256 is recorded.
pub const SHA256_METADATA: &str = "sha256";

/// Called with the number of bytes of each piece of the split that is sent or found
/// already stored (a progress bar's `inc`).
pub type Progress = Arc<dyn Fn(u64) + Send + Sync>;

/// What [`ShardSource::upload_split`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UploadReport {
    /// Shards sent.
    pub sent: usize,
    /// Shards found stored with the manifest's size and SHA-256, and left as they were.
    pub kept: usize,
    /// Bytes sent, the manifest included.
    pub bytes_sent: u64,
}

/// What happened to one shard.
enum Outcome {
    Sent(u64),
    Kept,
}

impl ShardSource {
    /// Copies the split in local folder `dir` (manifest and shards) into this location,
    /// the manifest last, so readers never see a manifest before its shards. Shards go
    /// up [`UPLOADS`] at a time, each streamed from disk in parts (a multipart upload
    /// above one part), so memory stays bounded whatever the shard size; a shard appears
    /// only once all of it is stored, and only if its bytes match the manifest. Shards
    /// that an earlier run stored (same size, SHA-256 recorded) are kept, not sent again.
    /// After a failure the uploads under way finish or are aborted, then the first error
    /// is returned and the manifest is not written. A manifest of another pack found
    /// there is deleted first, so that it never names the new shards' bytes.
    pub async fn upload_split(&self, dir: &Path, progress: Progress) -> Result<UploadReport> {
        let manifest = Manifest::read(&dir.join(MANIFEST_FILE))?;
        self.take_down_other_manifest(&dir.join(MANIFEST_FILE))
            .await?;
        type JoinResult = std::result::Result<Result<Outcome>, tokio::task::JoinError>;
        let mut report = UploadReport::default();
        let mut first_error = None;
        let mut record = |first: &mut Option<Error>, joined: JoinResult| {
            let result = joined.unwrap_or_else(|e| {
                Err(Error::Internal {
                    message: format!("an upload task failed: {e}"),
                })
            });
            match result {
                Ok(Outcome::Sent(bytes)) => {
                    report.sent += 1;
                    report.bytes_sent += bytes;
                }
                Ok(Outcome::Kept) => report.kept += 1,
                Err(e) => {
                    first.get_or_insert(e);
                }
            }
        };
        let mut running = tokio::task::JoinSet::new();
        for shard in &manifest.shards {
            if running.len() >= UPLOADS
                && let Some(joined) = running.join_next().await
            {
                record(&mut first_error, joined);
            }
            if first_error.is_some() {
                break;
            }
            running.spawn(self.upload_shard(dir, shard.clone(), progress.clone()));
        }
        while let Some(joined) = running.join_next().await {
            record(&mut first_error, joined);
        }
        if let Some(e) = first_error {
            return Err(e);
        }
        report.bytes_sent += self.upload_file(dir, MANIFEST_FILE, None, progress).await?;
        Ok(report)
    }

    /// Deletes the manifest stored here if it is not the same file as `local`: another
    /// pack's, whose shards this upload is about to replace.
    async fn take_down_other_manifest(&self, local: &Path) -> Result<()> {
        let path = self.path(MANIFEST_FILE);
        let location = self.object_location(MANIFEST_FILE);
        let failed = |e: object_store::Error| Error::Source {
            location: location.clone(),
            message: format!("{e}; check {}", self.settings),
        };
        let stored = match self.store.get(&path).await {
            Ok(found) => found.bytes().await.map_err(failed)?,
            Err(object_store::Error::NotFound { .. }) => return Ok(()),
            Err(e) => return Err(failed(e)),
        };
        let ours = std::fs::read(local).map_err(|source| Error::Io {
            path: local.to_path_buf(),
            source,
        })?;
        if stored != ours {
            self.store.delete(&path).await.map_err(failed)?;
        }
        Ok(())
    }

    /// Keeps `shard` if it is already stored here, else uploads it.
    fn upload_shard(
        &self,
        dir: &Path,
        shard: ShardInfo,
        progress: Progress,
    ) -> impl Future<Output = Result<Outcome>> + Send + use<> {
        let (store, path) = (self.store.clone(), self.path(&shard.name));
        let location = self.object_location(&shard.name);
        let settings = self.settings;
        let upload = self.upload_file(dir, &shard.name, Some(&shard), progress.clone());
        async move {
            let stored = is_stored(&*store, &path, &shard)
                .await
                .map_err(|e| Error::Source {
                    location,
                    message: format!("{e}; check {settings}"),
                })?;
            if stored {
                progress(shard.bytes);
                return Ok(Outcome::Kept);
            }
            upload.await.map(Outcome::Sent)
        }
    }

    /// Streams `dir/name` to `name` under this location and returns the bytes sent. With
    /// `expect`, the object is completed only if the file's size and SHA-256 are the
    /// manifest's, and the SHA-256 is recorded in its metadata (where the store keeps
    /// metadata: not in a local folder).
    fn upload_file(
        &self,
        dir: &Path,
        name: &str,
        expect: Option<&ShardInfo>,
        progress: Progress,
    ) -> impl Future<Output = Result<u64>> + Send + use<> {
        let file = dir.join(name);
        let location = self.object_location(name);
        let mut writer =
            BufWriter::with_capacity(self.store.clone(), self.path(name), UPLOAD_PART_BYTES)
                .with_max_concurrency(UPLOAD_PARTS);
        if let Some(shard) = expect
            && !self.local
        {
            let sha = Attributes::from_iter([(
                Attribute::Metadata(SHA256_METADATA.into()),
                shard.sha256.clone(),
            )]);
            writer = writer.with_attributes(sha);
        }
        let expect = expect.map(|s| (s.bytes, s.sha256.clone()));
        async move {
            let mut input = tokio::fs::File::open(&file)
                .await
                .map_err(|source| Error::Io {
                    path: file.clone(),
                    source,
                })?;
            let mut hash = Sha256::new();
            let mut sent = 0u64;
            let mut chunk = vec![0u8; 1 << 20];
            let copied: std::io::Result<()> = async {
                loop {
                    let n = input.read(&mut chunk).await?;
                    if n == 0 {
                        return Ok(());
                    }
                    hash.update(&chunk[..n]);
                    writer.write_all(&chunk[..n]).await?;
                    sent += n as u64;
                    progress(n as u64);
                }
            }
            .await;
            let failed = |message: String| Error::Source {
                location: location.clone(),
                message,
            };
            if let Err(e) = copied {
                // Abort a multipart upload, so that no parts are left behind. (In
                // `shutdown`, object_store's `WriteMultipart::finish` aborts when a part
                // or the completion fails; parts stay only if the abort fails too, left
                // to the bucket's lifecycle rules.)
                let _ = writer.abort().await;
                return Err(failed(format!("upload of {} failed: {e}", file.display())));
            }
            if let Some((bytes, sha256)) = expect {
                let got = format!("{:x}", hash.finalize());
                if (sent, got.as_str()) != (bytes, sha256.as_str()) {
                    let _ = writer.abort().await;
                    return Err(failed(format!(
                        "not uploaded: {} is {sent} bytes with SHA-256 {got}, but the manifest says {bytes} bytes with {sha256}; the file changed after it was packed: check the split with `shardtool verify`, and pack it again if that finds it damaged",
                        file.display()
                    )));
                }
            }
            writer
                .shutdown()
                .await
                .map_err(|e| failed(format!("upload of {} failed: {e}", file.display())))?;
            Ok(sent)
        }
    }

    /// The URL of `name` under this location, for messages.
    fn object_location(&self, name: &str) -> String {
        format!("{}/{name}", self.location.trim_end_matches('/'))
    }
}

/// Whether `path` holds `shard` already: its size, and the SHA-256 an earlier upload
/// recorded in its metadata.
async fn is_stored(
    store: &dyn ObjectStore,
    path: &StorePath,
    shard: &ShardInfo,
) -> object_store::Result<bool> {
    let head = GetOptions {
        head: true,
        ..GetOptions::default()
    };
    match store.get_opts(path, head).await {
        Ok(found) => Ok(found.meta.size == shard.bytes
            && found
                .attributes
                .get(&Attribute::Metadata(SHA256_METADATA.into()))
                .is_some_and(|sha| **sha == *shard.sha256)),
        Err(object_store::Error::NotFound { .. }) => Ok(false),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};

    use object_store::ObjectStoreExt;
    use object_store::memory::InMemory;

    use super::*;
    use crate::format::test_manifest;

    /// A split folder whose manifest names `files` (name, length, whether the file is
    /// there); the files that are there hold `length` pseudo-random bytes.
    fn split(dir: &Path, files: &[(&str, usize, bool)]) {
        let mut shards = Vec::new();
        for &(name, len, exists) in files {
            let bytes: Vec<u8> = (0..len).map(|i| (i * 7919 % 251) as u8).collect();
            if exists {
                std::fs::write(dir.join(name), &bytes).unwrap();
            }
            shards.push(ShardInfo {
                name: name.into(),
                samples: 1,
                bytes: len as u64,
                sha256: format!("{:x}", Sha256::digest(&bytes)),
            });
        }
        std::fs::write(dir.join(MANIFEST_FILE), test_manifest(shards).to_json()).unwrap();
    }

    fn stored(store: &InMemory, path: &str) -> Option<Vec<u8>> {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let got = runtime.block_on(store.get(&StorePath::from(path)));
        got.ok()
            .map(|r| runtime.block_on(r.bytes()).unwrap().to_vec())
    }

    fn upload(store: &Arc<InMemory>, dir: &Path) -> (Result<UploadReport>, u64) {
        let source = ShardSource::new(store.clone(), "imagenet/train", "mem://imagenet/train");
        let counted = Arc::new(AtomicU64::new(0));
        let count = counted.clone();
        let progress: Progress = Arc::new(move |n| {
            count.fetch_add(n, Ordering::Relaxed);
        });
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let report = runtime.block_on(source.upload_split(dir, progress));
        (report, counted.load(Ordering::Relaxed))
    }

    /// Files larger than a part go up in parts and arrive whole, as do small ones and the
    /// manifest; a rerun keeps what is stored and sends only what is missing or differs.
    #[test]
    fn upload_streams_every_file_and_a_rerun_sends_only_what_is_missing() {
        let tmp = tempfile::tempdir().unwrap();
        let big = 2 * UPLOAD_PART_BYTES + 12_345;
        split(
            tmp.path(),
            &[
                ("big.tar", big, true),
                ("small.tar", 1000, true),
                ("other.tar", 2000, true),
            ],
        );
        let manifest_bytes = std::fs::metadata(tmp.path().join(MANIFEST_FILE))
            .unwrap()
            .len();
        let shard_bytes = (big + 3000) as u64;
        let store = Arc::new(InMemory::new());
        let (report, progress) = upload(&store, tmp.path());
        let report = report.unwrap();
        assert_eq!(
            report,
            UploadReport {
                sent: 3,
                kept: 0,
                bytes_sent: shard_bytes + manifest_bytes
            }
        );
        assert_eq!(progress, shard_bytes + manifest_bytes);
        for name in ["big.tar", "small.tar", "other.tar", MANIFEST_FILE] {
            let want = std::fs::read(tmp.path().join(name)).unwrap();
            let got = stored(&store, &format!("imagenet/train/{name}"));
            assert!(got == Some(want), "{name} arrived whole");
        }

        // One shard deleted, one overwritten with other bytes of the same size, one left:
        // the rerun sends the first two and keeps the big one.
        let runtime = tokio::runtime::Runtime::new().unwrap();
        runtime
            .block_on(store.delete(&StorePath::from("imagenet/train/small.tar")))
            .unwrap();
        runtime
            .block_on(store.put(
                &StorePath::from("imagenet/train/other.tar"),
                vec![0u8; 2000].into(),
            ))
            .unwrap();
        let (report, progress) = upload(&store, tmp.path());
        assert_eq!(
            report.unwrap(),
            UploadReport {
                sent: 2,
                kept: 1,
                bytes_sent: 3000 + manifest_bytes
            }
        );
        assert_eq!(
            progress,
            shard_bytes + manifest_bytes,
            "kept bytes count too"
        );
        for name in ["small.tar", "other.tar"] {
            let want = std::fs::read(tmp.path().join(name)).unwrap();
            let got = stored(&store, &format!("imagenet/train/{name}"));
            assert!(got == Some(want), "{name} sent again");
        }
    }

    /// A shard that cannot be read, or whose bytes are not the manifest's, fails the
    /// upload: that shard is not stored, and neither is the manifest.
    #[test]
    fn a_missing_or_changed_shard_fails_the_upload_and_the_manifest_stays_out() {
        let tmp = tempfile::tempdir().unwrap();
        let files: Vec<(String, usize, bool)> = (0..2 * UPLOADS)
            .map(|i| (format!("s{i}.tar"), 100 + i, i != 3))
            .collect();
        let files: Vec<_> = files.iter().map(|(n, l, e)| (n.as_str(), *l, *e)).collect();
        split(tmp.path(), &files);
        // Another pack's manifest was there: it is taken down before any shard is
        // replaced, so it is gone after the failure rather than naming the new bytes.
        let store = Arc::new(InMemory::new());
        let manifest = StorePath::from(format!("imagenet/train/{MANIFEST_FILE}"));
        tokio::runtime::Runtime::new()
            .unwrap()
            .block_on(store.put(&manifest, b"another pack's manifest".to_vec().into()))
            .unwrap();
        let err = upload(&store, tmp.path()).0.unwrap_err();
        assert!(err.to_string().contains("s3.tar"), "{err}");
        assert_eq!(
            stored(&store, &format!("imagenet/train/{MANIFEST_FILE}")),
            None
        );

        // The same size, another byte: caught by the SHA-256, for a small and a big file.
        for len in [1000, UPLOAD_PART_BYTES + 1] {
            let tmp = tempfile::tempdir().unwrap();
            split(tmp.path(), &[("a.tar", len, true)]);
            let mut bytes = std::fs::read(tmp.path().join("a.tar")).unwrap();
            bytes[len / 2] ^= 1;
            std::fs::write(tmp.path().join("a.tar"), bytes).unwrap();
            let store = Arc::new(InMemory::new());
            let err = upload(&store, tmp.path()).0.unwrap_err().to_string();
            assert!(
                err.contains("a.tar") && err.contains("changed after it was packed"),
                "{err}"
            );
            for name in ["a.tar", MANIFEST_FILE] {
                assert_eq!(stored(&store, &format!("imagenet/train/{name}")), None);
            }
        }
    }
}

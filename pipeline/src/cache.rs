//! An optional local copy of remote shards (`cache_dir`): a shard streamed from the store
//! is written to the cache on the way through, and kept only if it is complete and its
//! SHA-256 matches the manifest; later epochs read the cached copy.

use std::fs::File;
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::format::{HashingWriter, ShardInfo};

/// The cache folder of one source.
#[derive(Clone, Debug)]
pub struct ShardCache {
    dir: PathBuf,
}

impl ShardCache {
    /// The cache for `location` under `root` (one subfolder per location).
    pub fn new(root: &Path, location: &str) -> io::Result<ShardCache> {
        let name: String = location
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let dir = root.join(name);
        std::fs::create_dir_all(&dir)?;
        remove_stale_partials(&dir);
        Ok(ShardCache { dir })
    }

    /// The cached copy of `shard`, if a complete one is there.
    pub fn open(&self, shard: &ShardInfo) -> Option<File> {
        let path = self.dir.join(&shard.name);
        let complete = std::fs::metadata(&path).is_ok_and(|m| m.len() == shard.bytes);
        complete.then(|| File::open(path).ok()).flatten()
    }

    /// Removes the cached copy of `shard` (one that turned out damaged), so that the next
    /// read fetches it from the store again.
    pub fn evict(&self, shard: &ShardInfo) {
        let _ = std::fs::remove_file(self.dir.join(&shard.name));
    }

    /// Wraps `inner` (the shard streamed from the store) so that what is read is also
    /// written to the cache.
    pub fn fill<R: Read>(&self, shard: &ShardInfo, inner: R) -> Tee<R> {
        let dest = self.dir.join(&shard.name);
        // Unique to this process and thread: the ranks of a node may share a cache folder,
        // and thread ids repeat across processes.
        let tmp = self.dir.join(format!(
            "{}{PARTIAL}{}-{:?}",
            shard.name,
            std::process::id(),
            std::thread::current().id()
        ));
        let file = File::create(&tmp)
            .ok()
            .map(|f| BufWriter::with_capacity(1 << 20, f));
        Tee {
            inner,
            target: file.map(|file| Target {
                file: HashingWriter::new(file),
                tmp,
                dest,
                expect: (shard.bytes, shard.sha256.clone()),
            }),
        }
    }
}

/// What follows a shard's name in the name of its copy being filled.
const PARTIAL: &str = ".partial-";

/// How long a copy being filled may go unwritten before it counts as left behind.
const STALE_AFTER: Duration = Duration::from_secs(3600);

/// Removes the copies being filled that a run killed mid-shard left behind (untouched for
/// [`STALE_AFTER`]): each holds up to a shard's bytes, and preempted runs leave one per
/// reader thread. A fill still running writes far more often; one removed anyway only
/// fails to keep its copy.
fn remove_stale_partials(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        if !entry.file_name().to_string_lossy().contains(PARTIAL) {
            continue; // complete copies: no metadata read for them
        }
        let stale = entry
            .metadata()
            .and_then(|m| m.modified())
            .is_ok_and(|t| t.elapsed().is_ok_and(|age| age > STALE_AFTER));
        if stale {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

struct Target {
    /// The cache file, counting and hashing what it is given.
    file: HashingWriter<BufWriter<File>>,
    tmp: PathBuf,
    dest: PathBuf,
    expect: (u64, String),
}

/// A reader that copies what it reads into a cache file; see [`ShardCache::fill`].
/// Without a target it only passes bytes through.
pub struct Tee<R> {
    inner: R,
    target: Option<Target>,
}

impl<R: Read> Tee<R> {
    /// A pass-through reader that caches nothing.
    pub fn plain(inner: R) -> Tee<R> {
        Tee {
            inner,
            target: None,
        }
    }

    /// Reads the rest of the stream into the cache file and keeps the file if it is the
    /// whole shard with the manifest's SHA-256. Returns whether a copy was kept.
    pub fn commit(mut self) -> io::Result<bool> {
        if self.target.is_none() {
            return Ok(false);
        }
        io::copy(&mut self, &mut io::sink())?;
        let Some(t) = self.target.take() else {
            return Ok(false);
        };
        let (file, bytes, sha) = t.file.finish();
        let whole = bytes == t.expect.0 && sha == t.expect.1;
        let kept = whole && file.into_inner().is_ok() && std::fs::rename(&t.tmp, &t.dest).is_ok();
        if !kept {
            let _ = std::fs::remove_file(&t.tmp);
        }
        Ok(kept)
    }
}

impl<R: Read> Read for Tee<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if let Some(t) = &mut self.target
            && t.file.write_all(&buf[..n]).is_err()
        {
            // A full or failing cache disk only loses the cached copy.
            let _ = std::fs::remove_file(&t.tmp);
            self.target = None;
        }
        Ok(n)
    }
}

impl<R> Drop for Tee<R> {
    fn drop(&mut self) {
        if let Some(t) = self.target.take() {
            let _ = std::fs::remove_file(&t.tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::{Digest, Sha256};

    fn info(data: &[u8]) -> ShardInfo {
        ShardInfo {
            name: "s-000000.tar".into(),
            samples: 1,
            bytes: data.len() as u64,
            sha256: format!("{:x}", Sha256::digest(data)),
        }
    }

    /// A copy being filled that was left untouched for over an hour (a killed run's) is
    /// removed when a cache is opened; a recent one, and complete copies, stay.
    #[test]
    fn copies_left_behind_by_killed_runs_are_removed() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = ShardCache::new(tmp.path(), "s3://b/p").unwrap().dir;
        let old = std::time::SystemTime::now() - 2 * STALE_AFTER;
        for name in ["s-000000.tar.partial-1-ThreadId(2)", "s-000001.tar"] {
            let file = File::create(dir.join(name)).unwrap();
            file.set_modified(old).unwrap();
        }
        File::create(dir.join("s-000002.tar.partial-1-ThreadId(3)")).unwrap();
        ShardCache::new(tmp.path(), "s3://b/p").unwrap();
        let mut left: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["s-000001.tar", "s-000002.tar.partial-1-ThreadId(3)"]);
    }

    #[test]
    fn keeps_only_complete_matching_copies() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = ShardCache::new(tmp.path(), "s3://bucket/prefix").unwrap();
        let data = vec![7u8; 100_000];
        let shard = info(&data);
        assert!(cache.open(&shard).is_none());

        // Read half, then commit: the rest is drained into the cache.
        let mut tee = cache.fill(&shard, data.as_slice());
        let mut half = vec![0u8; 50_000];
        tee.read_exact(&mut half).unwrap();
        assert!(tee.commit().unwrap());
        let mut cached = Vec::new();
        cache
            .open(&shard)
            .unwrap()
            .read_to_end(&mut cached)
            .unwrap();
        assert_eq!(cached, data);

        // Wrong bytes (a checksum mismatch) are not kept, and leave no partial file.
        let mut other = shard.clone();
        other.name = "s-000001.tar".into();
        assert!(!cache.fill(&other, &[8u8; 100_000][..]).commit().unwrap());
        assert!(cache.open(&other).is_none());
        let leftovers = std::fs::read_dir(&cache.dir).unwrap().count();
        assert_eq!(leftovers, 1, "only the good copy remains");
    }
}

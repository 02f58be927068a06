//! `shardtool upload`: copying a pack into object storage, resumable.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use pipeline::format::{MANIFEST_FILE, Manifest};
use pipeline::{ShardSource, StoreOptions, UploadReport};

use crate::pack::progress_bar;
use crate::verify::find_packed_splits;

/// Copies the pack (or split) in `dir` to `url` (`s3://bucket/prefix`), each split to
/// `url/<split>`, every manifest after its shards; shards an earlier run stored are kept
/// (see [`ShardSource::upload_split`]). Returns each split's URL and what was done.
/// `progress` draws a bar over each split's bytes on stderr.
pub fn upload(
    dir: &Path,
    url: &str,
    options: &StoreOptions,
    progress: bool,
) -> Result<Vec<(String, UploadReport)>> {
    let runtime = tokio::runtime::Runtime::new().context("starting the I/O runtime")?;
    let mut done = Vec::new();
    for split in find_packed_splits(dir)? {
        let name = split
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let target = format!("{}/{name}", url.trim_end_matches('/'));
        let source = ShardSource::open(&target, options)?;
        let bar = progress_bar(
            progress,
            split_bytes(&split)?,
            &name,
            "{bytes}/{total_bytes}  {bytes_per_sec}",
        );
        let inc = bar.clone();
        let report = runtime.block_on(source.upload_split(&split, Arc::new(move |n| inc.inc(n))));
        bar.finish_and_clear();
        done.push((target, report?));
    }
    Ok(done)
}

/// The bytes of a split's shards and manifest: the progress bar's length.
fn split_bytes(split: &Path) -> Result<u64> {
    let manifest = split.join(MANIFEST_FILE);
    let shards: u64 = Manifest::read(&manifest)?
        .shards
        .iter()
        .map(|s| s.bytes)
        .sum();
    Ok(shards + std::fs::metadata(&manifest)?.len())
}

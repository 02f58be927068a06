//! Packing one split: shuffle, plan shards, write them in parallel, resume, manifest.
//!
//! Crash safety: each shard is written as `<name>.partial`, synced, renamed to `<name>`,
//! and then recorded in `.shardtool/<name>.json`. A shard counts as done only when both
//! exist and the sizes agree, so `--resume` never trusts a half-written shard. The
//! manifest is written last, after every shard, and its presence marks a complete pack.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use indicatif::{ProgressBar, ProgressStyle};
use pipeline::format::{
    FORMAT_NAME, FORMAT_VERSION, HashingWriter, MANIFEST_FILE, Manifest, PackParams, PackSettings,
    REJECTS_FILE, Sample, SampleMeta, ShardInfo, ShardWriter, shard_name,
};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};

use crate::check::{Rejection, check_image, reencode};
use crate::scan::{Reject, SplitInput};
use crate::work::{Progress, run_jobs};

/// Folder (inside a split's output folder) holding the state of an unfinished pack.
pub const STATE_DIR: &str = ".shardtool";

/// How to pack. See `shardtool pack --help` for what each setting means to a user.
#[derive(Clone, Debug)]
pub struct PackOptions {
    /// Output folder; each split goes to `<out>/<split>/`.
    pub out: PathBuf,
    /// The settings that decide the shards' bytes (recorded in the manifest).
    pub settings: PackSettings,
    /// Worker threads.
    pub workers: usize,
    /// Fail on the first reject instead of listing it.
    pub strict: bool,
    /// Continue an interrupted pack in the output folder.
    pub resume: bool,
    /// Draw a progress bar (only where stderr is a terminal).
    pub progress: bool,
}

/// What packing a split did.
#[derive(Debug)]
pub struct SplitReport {
    /// The split's name.
    pub split: String,
    /// Its output folder.
    pub dir: PathBuf,
    /// The manifest that is now in `dir`.
    pub manifest: Manifest,
    /// Shards written by this run (the rest were already done).
    pub shards_written: usize,
    /// Input files read by this run (packed or rejected).
    pub files_read: u64,
    /// Input bytes read by this run.
    pub bytes_read: u64,
    /// Wall time of this run.
    pub elapsed: Duration,
}

/// The record of a finished shard, kept until the manifest is written.
#[derive(Serialize, Deserialize)]
struct ShardRecord {
    info: ShardInfo,
    /// (path, reason) of the files of this shard that were rejected.
    rejects: Vec<(String, String)>,
}

/// Packs `split` into `<opts.out>/<split.name>/`.
pub fn pack_split(split: &SplitInput, opts: &PackOptions) -> Result<SplitReport> {
    let start = Instant::now();
    let dir = opts.out.join(&split.name);
    if opts.strict && !split.rejects.is_empty() {
        bail!(
            "--strict: {} input(s) of {} cannot be packed:\n{}",
            split.rejects.len(),
            split.name,
            list(&split.rejects)
        );
    }
    let params = PackParams {
        settings: opts.settings.clone(),
        input_fingerprint: split.fingerprint(),
        tool: format!("shardtool {}", env!("CARGO_PKG_VERSION")),
    };
    let report = |manifest, shards_written, files_read, bytes_read| SplitReport {
        split: split.name.clone(),
        dir: dir.clone(),
        manifest,
        shards_written,
        files_read,
        bytes_read,
        elapsed: start.elapsed(),
    };
    if let Some(manifest) = prepare_output(&dir, &params, opts.resume)? {
        return Ok(report(manifest, 0, 0, 0));
    }
    let settings = &opts.settings;
    let plan = plan_shards(split, settings.seed, settings.target_shard_bytes);
    let names: Vec<String> = (0..plan.len())
        .map(|i| shard_name(&split.name, i, settings.compression))
        .collect();
    let mut records: Vec<Option<ShardRecord>> =
        names.iter().map(|n| finished_shard(&dir, n)).collect();
    let todo: Vec<usize> = (0..plan.len()).filter(|&i| records[i].is_none()).collect();

    let total: u64 = todo.iter().map(|&i| plan[i].len() as u64).sum();
    let bar = progress_bar(
        opts.progress,
        total,
        &split.name,
        "{pos}/{len} images  {msg}",
    );
    let (mut written, mut images, mut bytes) = (0, 0, 0);
    run_jobs(
        todo.len(),
        opts.workers,
        |j, progress| {
            let i = todo[j];
            write_shard(split, &plan[i], &dir, &names[i], opts, progress)
        },
        |p| {
            images = p.items.load(std::sync::atomic::Ordering::Relaxed);
            bytes = p.bytes.load(std::sync::atomic::Ordering::Relaxed);
            bar.set_position(images);
            let secs = bar.elapsed().as_secs_f64().max(1e-3);
            bar.set_message(format!(
                "{:.0} images/s  {:.0} MB/s",
                images as f64 / secs,
                bytes as f64 / 1e6 / secs
            ));
        },
        |j, record| {
            if let Some(record) = record {
                records[todo[j]] = Some(record);
                written += 1;
            }
        },
    )?;
    bar.finish_and_clear();

    let records: Vec<ShardRecord> = records
        .into_iter()
        .collect::<Option<_>>()
        .context("internal error: a shard finished without a record")?;
    let manifest = write_manifest(&dir, split, params, records)?;
    Ok(report(manifest, written, images, bytes))
}

/// Checks what the output folder holds. Returns the existing manifest when it is this
/// very pack (nothing to do), creates the folder and its plan record for a fresh pack,
/// and refuses anything else with a message that says what to do.
fn prepare_output(dir: &Path, params: &PackParams, resume: bool) -> Result<Option<Manifest>> {
    let manifest_path = dir.join(MANIFEST_FILE);
    let state = dir.join(STATE_DIR);
    let plan_path = state.join("plan.json");
    if manifest_path.exists() {
        let manifest = Manifest::read(&manifest_path)?;
        if manifest.pack == *params {
            return Ok(Some(manifest));
        }
        bail!(
            "{} already holds a different pack ({} differ): choose another --out, or delete that folder to re-pack",
            dir.display(),
            differing_fields(&manifest.pack, params)
        );
    }
    if plan_path.exists() {
        if !resume {
            bail!(
                "{} holds an interrupted pack: rerun with --resume to finish it, or delete the folder to start over",
                dir.display()
            );
        }
        let saved: PackParams =
            serde_json::from_slice(&std::fs::read(&plan_path)?).with_context(|| {
                format!(
                    "{} is damaged: delete {} and pack again",
                    plan_path.display(),
                    dir.display()
                )
            })?;
        if saved != *params {
            bail!(
                "the interrupted pack in {} was made with other settings or input ({} differ): rerun with the same flags, or delete the folder",
                dir.display(),
                differing_fields(&saved, params)
            );
        }
        return Ok(None);
    }
    if dir.exists() && std::fs::read_dir(dir)?.next().is_some() {
        bail!(
            "{} is not empty and holds no shardtool pack: choose an empty or new --out folder",
            dir.display()
        );
    }
    std::fs::create_dir_all(&state).with_context(|| {
        format!(
            "cannot create output folder {}: check the path and its permissions",
            dir.display()
        )
    })?;
    write_atomic(&plan_path, &serde_json::to_vec_pretty(params)?)
        .with_context(|| format!("writing {}", plan_path.display()))?;
    Ok(None)
}

fn differing_fields(a: &PackParams, b: &PackParams) -> String {
    let (a, b) = (
        serde_json::to_value(a).unwrap_or_default(),
        serde_json::to_value(b).unwrap_or_default(),
    );
    let keys = a
        .as_object()
        .map(|o| o.keys().cloned().collect::<Vec<_>>())
        .unwrap_or_default();
    keys.into_iter()
        .filter(|k| a.get(k) != b.get(k))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The shuffled assignment of input files to shards: a seeded permutation of all files,
/// cut into runs of about `target` bytes of tar data. It depends only on the listing,
/// the seed and the target, so a resumed pack makes the same plan.
pub fn plan_shards(split: &SplitInput, seed: u64, target: u64) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..split.files.len()).collect();
    order.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(seed));
    let mut shards = Vec::new();
    let (mut current, mut bytes) = (Vec::new(), 0u64);
    for i in order {
        current.push(i);
        // header + padded image data, plus the small .cls and .json members
        bytes += 512 + split.files[i].size.div_ceil(512) * 512 + 2048;
        if bytes >= target {
            shards.push(std::mem::take(&mut current));
            bytes = 0;
        }
    }
    if !current.is_empty() {
        shards.push(current);
    }
    shards
}

/// The record of shard `name` if a previous run finished it.
fn finished_shard(dir: &Path, name: &str) -> Option<ShardRecord> {
    let record: ShardRecord =
        serde_json::from_slice(&std::fs::read(record_path(dir, name)).ok()?).ok()?;
    let size = std::fs::metadata(dir.join(name)).ok()?.len();
    (size == record.info.bytes).then_some(record)
}

fn record_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(STATE_DIR).join(format!("{name}.json"))
}

/// Writes one shard; returns `None` when the pack was aborted by another worker.
fn write_shard(
    split: &SplitInput,
    files: &[usize],
    dir: &Path,
    name: &str,
    opts: &PackOptions,
    progress: &Progress,
) -> Result<Option<ShardRecord>> {
    let tmp = dir.join(format!("{name}.partial"));
    let result = write_shard_file(split, files, &tmp, opts, progress);
    let (info, rejects) = match result {
        Ok(Some(done)) => done,
        other => {
            let _ = std::fs::remove_file(&tmp);
            return other.map(|_| None);
        }
    };
    let final_path = dir.join(name);
    std::fs::rename(&tmp, &final_path).map_err(|e| write_error(&final_path, e))?;
    let record = ShardRecord {
        info: ShardInfo {
            name: name.to_string(),
            ..info
        },
        rejects,
    };
    let path = record_path(dir, name);
    write_atomic(&path, &serde_json::to_vec(&record)?).map_err(|e| write_error(&path, e))?;
    Ok(Some(record))
}

type ShardRejects = Vec<(String, String)>;

fn write_shard_file(
    split: &SplitInput,
    files: &[usize],
    tmp: &Path,
    opts: &PackOptions,
    progress: &Progress,
) -> Result<Option<(ShardInfo, ShardRejects)>> {
    let io_context = |e| write_error(tmp, e);
    let settings = &opts.settings;
    let file = File::create(tmp).map_err(io_context)?;
    let sink = HashingWriter::new(BufWriter::with_capacity(1 << 20, file));
    let mut writer =
        ShardWriter::new(sink, settings.compression, settings.zstd_level).map_err(io_context)?;
    let mut rejects = Vec::new();
    let mut samples = 0;
    for &i in files {
        if progress.aborted() {
            return Ok(None);
        }
        let f = &split.files[i];
        let packed = std::fs::read(&f.path)
            .map_err(Rejection::Read)
            .and_then(|bytes| {
                let info = check_image(&bytes, settings.check)?;
                match settings.reencode {
                    Some(params) => reencode(&bytes, params),
                    None => Ok((bytes, info)),
                }
            });
        let (image, info) = match packed {
            Ok(packed) => packed,
            Err(why) if opts.strict => bail!("--strict: {} cannot be packed: {why}", f.rel),
            Err(why) => {
                rejects.push((f.rel.clone(), why.to_string()));
                progress.add(f.size);
                continue;
            }
        };
        let json = settings.write_json.then(|| {
            let meta = SampleMeta {
                wnid: split.classes[f.class as usize].clone(),
                path: f.rel.clone(),
                width: info.width,
                height: info.height,
                format: info.format.to_string(),
            };
            // A struct of strings and integers always serialises.
            serde_json::to_vec(&meta).expect("sample metadata serialises")
        });
        let sample = Sample {
            key: f.key.clone(),
            image,
            cls: f.class,
            json,
        };
        writer.write_sample(&sample).map_err(io_context)?;
        samples += 1;
        progress.add(f.size);
    }
    let (buffered, bytes, sha256) = writer.finish().map_err(io_context)?.finish();
    let file = buffered
        .into_inner()
        .map_err(|e| io_context(e.into_error()))?;
    file.sync_all().map_err(io_context)?;
    let info = ShardInfo {
        name: String::new(),
        samples,
        bytes,
        sha256,
    };
    Ok(Some((info, rejects)))
}

/// Writes `rejects.tsv`, then the manifest (last), then removes the pack state.
fn write_manifest(
    dir: &Path,
    split: &SplitInput,
    pack: PackParams,
    records: Vec<ShardRecord>,
) -> Result<Manifest> {
    let mut rejects: Vec<(String, String)> = split
        .rejects
        .iter()
        .map(|r| (r.path.clone(), r.reason.clone()))
        .collect();
    let mut shards = Vec::with_capacity(records.len());
    for record in records {
        rejects.extend(record.rejects);
        shards.push(record.info);
    }
    rejects.sort();
    let mut tsv = String::from("path\treason\n");
    for (path, reason) in &rejects {
        let clean = |s: &str| s.replace(['\t', '\n', '\r'], " ");
        tsv.push_str(&format!("{}\t{}\n", clean(path), clean(reason)));
    }
    let rejects_path = dir.join(REJECTS_FILE);
    write_atomic(&rejects_path, tsv.as_bytes()).map_err(|e| write_error(&rejects_path, e))?;
    let manifest = Manifest {
        format: FORMAT_NAME.to_string(),
        format_version: FORMAT_VERSION,
        split: split.name.clone(),
        num_samples: shards.iter().map(|s| s.samples).sum(),
        num_rejects: rejects.len() as u64,
        classes: split.classes.clone(),
        shards,
        pack,
    };
    let manifest_path = dir.join(MANIFEST_FILE);
    write_atomic(&manifest_path, &manifest.to_json())
        .map_err(|e| write_error(&manifest_path, e))?;
    std::fs::remove_dir_all(dir.join(STATE_DIR))
        .with_context(|| format!("removing {}", dir.join(STATE_DIR).display()))?;
    Ok(manifest)
}

/// Writes `bytes` to `path` through a synced temporary file and a rename, so `path`
/// is either absent, the old content, or the whole new content.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let result = (|| {
        let mut file = File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// A failed write of `path` once the pack has begun, with what to do: every such write
/// (a shard, its record, the rejects list, the manifest) can fill the disk, and `--resume`
/// carries on from the shards already finished.
fn write_error(path: &Path, e: std::io::Error) -> anyhow::Error {
    let hint = if e.kind() == std::io::ErrorKind::StorageFull {
        "the disk is full: free some space (or choose another --out), then rerun with --resume"
    } else {
        "fix the cause, then rerun with --resume"
    };
    anyhow::Error::new(e).context(format!(
        "writing {}: {hint}; finished shards are kept",
        path.display()
    ))
}

/// A progress bar over `total` for `split` on stderr (hidden unless `enabled`), counting
/// `counts` after the bar: `{pos}/{len} images`, `{bytes}/{total_bytes}`, ...
pub(crate) fn progress_bar(
    enabled: bool,
    total: u64,
    split: &str,
    counts: &'static str,
) -> ProgressBar {
    if !enabled {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(total).with_prefix(split.to_string());
    // The template is made of literals known to parse.
    let style = ProgressStyle::with_template(&format!(
        "{{prefix:>5}} [{{elapsed_precise}}] {{wide_bar}} {counts}  ETA {{eta}}"
    ))
    .expect("progress template parses");
    bar.set_style(style);
    bar
}

fn list(rejects: &[Reject]) -> String {
    let mut text: Vec<String> = rejects
        .iter()
        .take(20)
        .map(|r| format!("  {}: {}", r.path, r.reason))
        .collect();
    if rejects.len() > 20 {
        text.push(format!("  ... and {} more", rejects.len() - 20));
    }
    text.join("\n")
}

//! `shardtool verify` and `shardtool inspect`: reading a pack back against its manifest.

use std::collections::HashSet;
use std::fmt::Write as _;
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use pipeline::ShardReader;
use pipeline::format::{
    Compression, HashingReader, ImageCheck, MANIFEST_FILE, Manifest, ShardInfo,
};

use crate::check::check_image;
use crate::pack::STATE_DIR;
use crate::work::run_jobs;

/// The split folders under `dir`: `dir` itself if it holds a manifest, else its
/// subfolders that do.
pub fn find_packed_splits(dir: &Path) -> Result<Vec<PathBuf>> {
    if dir.join(MANIFEST_FILE).is_file() {
        return Ok(vec![dir.to_path_buf()]);
    }
    let entries =
        std::fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))?;
    let mut splits: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join(MANIFEST_FILE).is_file())
        .collect();
    splits.sort();
    if splits.is_empty() {
        let hint = if dir.join(STATE_DIR).exists()
            || dir
                .read_dir()
                .into_iter()
                .flatten()
                .flatten()
                .any(|e| e.path().join(STATE_DIR).exists())
        {
            "the pack was interrupted: finish it with `shardtool pack ... --resume`"
        } else {
            "pass a folder written by `shardtool pack` (the pack root or one split)"
        };
        bail!(
            "no {MANIFEST_FILE} in {} or its subfolders: {hint}",
            dir.display()
        );
    }
    Ok(splits)
}

/// What verifying one split found.
#[derive(Debug, Default)]
pub struct VerifyReport {
    /// Shards checked.
    pub shards: usize,
    /// Samples read.
    pub samples: u64,
    /// Bytes read.
    pub bytes: u64,
    /// Everything that does not match the manifest; empty means the split is sound.
    pub problems: Vec<String>,
}

struct ShardCheck {
    samples: u64,
    bytes: u64,
    keys: Vec<String>,
    problems: Vec<String>,
}

/// Checks every shard of the split in `dir` against the manifest: size, SHA-256, sample
/// count, labels within the class list, unique keys; with `decode`, decodes every image.
pub fn verify_split(dir: &Path, decode: bool, workers: usize) -> Result<VerifyReport> {
    let manifest = Manifest::read(&dir.join(MANIFEST_FILE))?;
    let mut report = VerifyReport {
        shards: manifest.shards.len(),
        ..Default::default()
    };
    let mut keys = HashSet::new();
    let mut checks = Vec::new();
    run_jobs(
        manifest.shards.len(),
        workers,
        |i, _| {
            Ok::<_, anyhow::Error>(check_shard(
                dir,
                &manifest.shards[i],
                manifest.classes.len(),
                decode,
            ))
        },
        |_| {},
        |i, check| checks.push((i, check)),
    )?;
    checks.sort_by_key(|(i, _)| *i);
    for (_, check) in checks {
        report.samples += check.samples;
        report.bytes += check.bytes;
        report.problems.extend(check.problems);
        for key in check.keys {
            if !keys.insert(key.clone()) {
                report
                    .problems
                    .push(format!("key {key} appears in more than one sample"));
            }
        }
    }
    let listed: HashSet<&str> = manifest.shards.iter().map(|s| s.name.as_str()).collect();
    for entry in std::fs::read_dir(dir)?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if Compression::from_shard_name(&name).is_some() && !listed.contains(name.as_str()) {
            report.problems.push(format!(
                "{name} is not in the manifest (left over from another pack?)"
            ));
        }
    }
    Ok(report)
}

fn check_shard(dir: &Path, info: &ShardInfo, classes: usize, decode: bool) -> ShardCheck {
    let mut check = ShardCheck {
        samples: 0,
        bytes: 0,
        keys: Vec::new(),
        problems: Vec::new(),
    };
    let name = &info.name;
    let file = match File::open(dir.join(name)) {
        Ok(f) => f,
        Err(e) => {
            check.problems.push(format!(
                "{name}: cannot open ({e}): re-pack, or copy the shard again"
            ));
            return check;
        }
    };
    let mut hashing = HashingReader::new(BufReader::with_capacity(1 << 20, file));
    let compression = Compression::from_shard_name(name).unwrap_or(Compression::Zstd);
    let read = ShardReader::new(name.clone(), &mut hashing, compression).and_then(|mut reader| {
        for sample in reader.samples()? {
            let sample = sample?;
            if sample.cls as usize >= classes {
                check.problems.push(format!(
                    "{name}: {} has class {} but there are {classes} classes",
                    sample.key, sample.cls
                ));
            }
            if decode && let Err(why) = check_image(&sample.image, ImageCheck::Decode) {
                check
                    .problems
                    .push(format!("{name}: {}: {why}", sample.key));
            }
            check.keys.push(sample.key);
            check.samples += 1;
        }
        Ok(())
    });
    if let Err(e) = read {
        check.problems.push(format!(
            "{e}: the shard is damaged; re-pack, or copy it again"
        ));
    }
    match hashing.finish() {
        Ok((bytes, sha)) => {
            check.bytes = bytes;
            if bytes != info.bytes {
                check.problems.push(format!(
                    "{name}: {bytes} bytes, the manifest says {}",
                    info.bytes
                ));
            } else if sha != info.sha256 {
                check.problems.push(format!("{name}: SHA-256 differs from the manifest: the file is corrupt; copy it again or re-pack"));
            }
        }
        Err(e) => check.problems.push(format!("{name}: read error: {e}")),
    }
    if check.samples != info.samples {
        check.problems.push(format!(
            "{name}: {} samples, the manifest says {}",
            check.samples, info.samples
        ));
    }
    check
}

/// A human-readable summary of the split in `dir` and its first `show` samples.
pub fn inspect_split(dir: &Path, show: usize) -> Result<String> {
    let m = Manifest::read(&dir.join(MANIFEST_FILE))?;
    let mut out = String::new();
    let sizes: Vec<u64> = m.shards.iter().map(|s| s.bytes).collect();
    let counts: Vec<u64> = m.shards.iter().map(|s| s.samples).collect();
    let total: u64 = sizes.iter().sum();
    let classes = match m.classes.len() {
        0..=6 => m.classes.join(", "),
        n => format!(
            "{}, ... {}",
            m.classes[..3].join(", "),
            m.classes[n - 3..].join(", ")
        ),
    };
    let (p, tool) = (&m.pack.settings, &m.pack.tool);
    writeln!(
        out,
        "split      {} ({}, format v{})",
        m.split,
        dir.display(),
        m.format_version
    )?;
    writeln!(
        out,
        "samples    {}   rejects {} (see rejects.tsv)",
        m.num_samples, m.num_rejects
    )?;
    writeln!(out, "classes    {}: {classes}", m.classes.len())?;
    writeln!(
        out,
        "shards     {}   {:.1} MB total   size min/max {:.1}/{:.1} MB   samples min/max {}/{}",
        m.shards.len(),
        total as f64 / 1e6,
        *sizes.iter().min().unwrap_or(&0) as f64 / 1e6,
        *sizes.iter().max().unwrap_or(&0) as f64 / 1e6,
        counts.iter().min().unwrap_or(&0),
        counts.iter().max().unwrap_or(&0),
    )?;
    writeln!(
        out,
        "packed by  {}: seed {}, {:?} level {}, target {:.0} MB/shard, check {:?}, re-encode {}",
        tool,
        p.seed,
        p.compression,
        p.zstd_level,
        p.target_shard_bytes as f64 / 1e6,
        p.check,
        p.reencode.map_or("off".to_string(), |r| format!(
            "max side {} quality {}",
            r.max_side, r.quality
        )),
    )?;
    if let Some(first) = m.shards.first().filter(|_| show > 0) {
        writeln!(out, "first samples of {}:", first.name)?;
        let file =
            File::open(dir.join(&first.name)).with_context(|| format!("opening {}", first.name))?;
        let compression = Compression::from_shard_name(&first.name).unwrap_or(Compression::Zstd);
        let mut reader = ShardReader::new(first.name.clone(), BufReader::new(file), compression)?;
        for sample in reader.samples()?.take(show) {
            let s = sample?;
            let wnid = m.classes.get(s.cls as usize).map_or("?", String::as_str);
            let json = s
                .json
                .as_deref()
                .map(String::from_utf8_lossy)
                .unwrap_or_default();
            writeln!(
                out,
                "  {:<28} cls {:>4} {wnid}  {:>8} bytes  {json}",
                s.key,
                s.cls,
                s.image.len()
            )?;
        }
    }
    Ok(out)
}

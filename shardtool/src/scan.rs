//! Finding the splits of an ImageNet-shaped folder and listing their files and labels.
//!
//! Class folders follow torchvision's ImageFolder convention: the class list is the
//! sorted folder names, and a class's index is its position in that list. Files are
//! walked recursively in sorted order, so the listing does not depend on the file system.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use pipeline::format::key_from_file_name;
use sha2::{Digest, Sha256};

/// One input file to pack.
#[derive(Clone, Debug)]
pub struct InputFile {
    /// Where to read it.
    pub path: PathBuf,
    /// Its path relative to the dataset folder, with `/` separators (as in `rejects.tsv`).
    pub rel: String,
    /// Its size in bytes when it was listed.
    pub size: u64,
    /// Its class index.
    pub class: u32,
    /// Its sample key, unique within the split.
    pub key: String,
}

/// An input that will not be packed, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reject {
    /// Path relative to the dataset folder.
    pub path: String,
    /// The reason, for people.
    pub reason: String,
}

/// One split of the input: its classes, files and the rejects found while listing.
#[derive(Debug)]
pub struct SplitInput {
    /// `train`, `val`, or the folder's name when a single split folder is packed.
    pub name: String,
    /// The class names in index order.
    pub classes: Vec<String>,
    /// The files to pack, in sorted path order.
    pub files: Vec<InputFile>,
    /// Files and folders already known not to pack (empty files, empty class folders...).
    pub rejects: Vec<Reject>,
}

impl SplitInput {
    /// SHA-256 over the listing (paths, sizes, labels, rejects): two packs of an
    /// unchanged folder have the same fingerprint.
    pub fn fingerprint(&self) -> String {
        let mut h = Sha256::new();
        for c in &self.classes {
            h.update(format!("class\t{c}\n"));
        }
        for f in &self.files {
            h.update(format!("file\t{}\t{}\t{}\n", f.rel, f.size, f.class));
        }
        for r in &self.rejects {
            h.update(format!("reject\t{}\n", r.path));
        }
        format!("{:x}", h.finalize())
    }
}

/// Finds the splits to pack under `input`: its `train/` and `val/` folders if it has
/// them, otherwise `input` itself as one split named after the folder.
///
/// `val_labels` is a `LOC_val_solution.csv`-style file for a `val/` folder that holds
/// images directly instead of class folders.
pub fn find_splits(input: &Path, val_labels: Option<&Path>) -> Result<Vec<SplitInput>> {
    let meta = std::fs::metadata(input).with_context(|| {
        format!(
            "cannot read input folder {}: check the path and its permissions",
            input.display()
        )
    })?;
    if !meta.is_dir() {
        bail!(
            "{} is not a folder: pass the ImageNet folder (holding train/ and val/) or one split folder",
            input.display()
        );
    }
    // Relative paths in rejects.tsv and the sample metadata start below this root.
    let input = &input
        .canonicalize()
        .with_context(|| format!("cannot resolve {}", input.display()))?;
    let (train, val) = (input.join("train"), input.join("val"));
    let mut splits = Vec::new();
    if train.is_dir() || val.is_dir() {
        let mut train_classes = None;
        if train.is_dir() {
            let split = scan_class_folders("train", input, &train, None)?;
            train_classes = Some(split.classes.clone());
            splits.push(split);
        }
        if val.is_dir() {
            splits.push(scan_val(input, &val, val_labels, train_classes.as_deref())?);
        }
    } else {
        let name = input
            .canonicalize()
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_else(|| "data".to_string());
        let name = key_from_file_name(&name);
        let root = input.parent().unwrap_or(input);
        if val_labels.is_some() {
            splits.push(scan_val(root, input, val_labels, None)?);
        } else {
            splits.push(scan_class_folders(&name, root, input, None)?);
        }
    }
    if splits.iter().all(|s| s.files.is_empty()) {
        bail!(
            "no files found under {}: expected train/<class>/<image> (and val/)",
            input.display()
        );
    }
    Ok(splits)
}

fn scan_val(
    root: &Path,
    val: &Path,
    labels: Option<&Path>,
    train_classes: Option<&[String]>,
) -> Result<SplitInput> {
    let has_class_folders = sorted_entries(val)?.iter().any(|p| p.is_dir());
    match labels {
        Some(labels) => scan_flat_val(root, val, labels, train_classes),
        None if has_class_folders => scan_class_folders("val", root, val, train_classes),
        None => bail!(
            "{} holds images but no class folders: pass --val-labels LOC_val_solution.csv \
             (or sort the images into class folders)",
            val.display()
        ),
    }
}

/// Class-folder split. With `classes` given (val next to train), folder names must be
/// among them and keep train's indices.
fn scan_class_folders(
    name: &str,
    root: &Path,
    dir: &Path,
    classes: Option<&[String]>,
) -> Result<SplitInput> {
    let mut rejects = Vec::new();
    let mut loose = Vec::new();
    let mut folders = Vec::new();
    for path in sorted_entries(dir)? {
        if path.is_dir() {
            folders.push(path);
        } else {
            loose.push(path);
        }
    }
    for path in loose {
        rejects.push(Reject {
            path: rel_path(root, &path),
            reason: "file outside any class folder".into(),
        });
    }
    let folder_names: Vec<String> = folders.iter().map(|p| file_name(p)).collect();
    let classes: Vec<String> = match classes {
        Some(c) => {
            let known: HashSet<&String> = c.iter().collect();
            if let Some(extra) = folder_names.iter().find(|n| !known.contains(n)) {
                bail!(
                    "{}/{extra} is a class that train/ does not have; class indices come from train/, so every val class must exist there",
                    dir.display()
                );
            }
            c.to_vec()
        }
        None => folder_names.clone(),
    };
    let index = class_index(&classes);
    let mut files = Vec::new();
    for (folder, class_name) in folders.iter().zip(&folder_names) {
        let class = index[class_name.as_str()];
        let before = files.len() + rejects.len();
        walk_files(
            root,
            folder,
            &mut |path, rel, size| {
                files.push(InputFile {
                    path,
                    rel,
                    size,
                    class,
                    key: String::new(),
                });
            },
            &mut rejects,
        )?;
        if files.len() + rejects.len() == before {
            rejects.push(Reject {
                path: rel_path(root, folder),
                reason: format!(
                    "empty class folder (class {class} keeps its index, with no samples)"
                ),
            });
        }
    }
    Ok(finish_split(name, classes, files, rejects))
}

/// Flat val folder plus `ImageId,PredictionString` labels (the first token of the
/// prediction string is the wnid).
fn scan_flat_val(
    root: &Path,
    val: &Path,
    labels: &Path,
    train_classes: Option<&[String]>,
) -> Result<SplitInput> {
    let text = std::fs::read_to_string(labels)
        .with_context(|| format!("cannot read --val-labels {}", labels.display()))?;
    let mut label_of: BTreeMap<String, String> = BTreeMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || (n == 0 && line.starts_with("ImageId")) {
            continue;
        }
        let (id, pred) = line.split_once(',').with_context(|| {
            format!(
                "{}:{}: expected `ImageId,PredictionString`",
                labels.display(),
                n + 1
            )
        })?;
        let wnid = pred.split_whitespace().next().with_context(|| {
            format!(
                "{}:{}: no class in the prediction string",
                labels.display(),
                n + 1
            )
        })?;
        label_of.insert(id.trim().to_string(), wnid.to_string());
    }
    let classes: Vec<String> = match train_classes {
        Some(c) => c.to_vec(),
        None => label_of
            .values()
            .cloned()
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect(),
    };
    let index = class_index(&classes);
    let mut rejects = Vec::new();
    let mut listed = Vec::new();
    walk_files(
        root,
        val,
        &mut |path, rel, size| listed.push((path, rel, size)),
        &mut rejects,
    )?;
    let mut seen = HashSet::new();
    let mut files = Vec::new();
    for (path, rel, size) in listed {
        let id = file_name(&path)
            .split('.')
            .next()
            .unwrap_or_default()
            .to_string();
        match label_of.get(&id) {
            Some(wnid) => {
                let Some(&class) = index.get(wnid.as_str()) else {
                    bail!(
                        "{}: class {wnid} of {id} is not a train class",
                        labels.display()
                    );
                };
                seen.insert(id);
                files.push(InputFile {
                    path,
                    rel,
                    size,
                    class,
                    key: String::new(),
                });
            }
            None => rejects.push(Reject {
                path: rel,
                reason: format!("no label in {}", labels.display()),
            }),
        }
    }
    for id in label_of.keys().filter(|id| !seen.contains(*id)) {
        rejects.push(Reject {
            path: format!("{}/{id}", rel_path(root, val)),
            reason: format!("listed in {} but no such image", labels.display()),
        });
    }
    Ok(finish_split("val", classes, files, rejects))
}

/// Lists the regular files under `dir` (recursively, sorted). Zero-byte and unreadable
/// entries become rejects.
fn walk_files(
    root: &Path,
    dir: &Path,
    found: &mut dyn FnMut(PathBuf, String, u64),
    rejects: &mut Vec<Reject>,
) -> Result<()> {
    for entry in walkdir::WalkDir::new(dir)
        .follow_links(true)
        .sort_by_file_name()
        .min_depth(1)
    {
        let entry = match entry {
            Ok(e) => e,
            Err(e) => {
                let path = e
                    .path()
                    .map(|p| rel_path(root, p))
                    .unwrap_or_else(|| rel_path(root, dir));
                rejects.push(Reject {
                    path,
                    reason: format!("cannot read: {e}"),
                });
                continue;
            }
        };
        if entry.file_type().is_dir() {
            continue;
        }
        let rel = rel_path(root, entry.path());
        match entry.metadata() {
            Ok(m) if m.len() == 0 => rejects.push(Reject {
                path: rel,
                reason: "empty file (0 bytes)".into(),
            }),
            Ok(m) => found(entry.into_path(), rel, m.len()),
            Err(e) => rejects.push(Reject {
                path: rel,
                reason: format!("cannot read: {e}"),
            }),
        }
    }
    Ok(())
}

/// Sorts files by path and gives each a unique key: its file name before the first dot,
/// with `-1`, `-2`, ... appended to later files whose key is already taken.
fn finish_split(
    name: &str,
    classes: Vec<String>,
    mut files: Vec<InputFile>,
    mut rejects: Vec<Reject>,
) -> SplitInput {
    files.sort_by(|a, b| a.rel.cmp(&b.rel));
    rejects.sort_by(|a, b| a.path.cmp(&b.path));
    let mut taken = HashSet::new();
    for f in &mut files {
        let base = key_from_file_name(&file_name(&f.path));
        let mut key = base.clone();
        let mut n = 0;
        while !taken.insert(key.clone()) {
            n += 1;
            key = format!("{base}-{n}");
        }
        f.key = key;
    }
    SplitInput {
        name: name.to_string(),
        classes,
        files,
        rejects,
    }
}

/// Class name -> index (its position in the list).
fn class_index(classes: &[String]) -> HashMap<&str, u32> {
    classes
        .iter()
        .enumerate()
        .map(|(i, c)| (c.as_str(), i as u32))
        .collect()
}

fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>> {
    let read = std::fs::read_dir(dir).with_context(|| {
        format!(
            "cannot read folder {}: check its permissions",
            dir.display()
        )
    })?;
    let mut paths = Vec::new();
    for entry in read {
        let entry = entry.with_context(|| format!("cannot list folder {}", dir.display()))?;
        paths.push(entry.path());
    }
    paths.sort();
    Ok(paths)
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn rel_path(root: &Path, path: &Path) -> String {
    let rel = path.strip_prefix(root).unwrap_or(path);
    rel.components()
        .map(|c| c.as_os_str().to_string_lossy())
        .collect::<Vec<_>>()
        .join("/")
}

//! The shard format, version 1: shard names, sample layout, manifest and checksums.
//!
//! This module is the one definition that `shardtool` writes and the loader reads;
//! `FORMAT.md` at the workspace root describes the same thing for people and for other
//! tools. A dataset split is a folder:
//!
//! ```text
//! train/
//!   train-000000.tar.zst   WebDataset tar, zstd-compressed as a whole
//!   train-000001.tar.zst
//!   ...
//!   manifest.json          written last; without it the pack is incomplete
//!   rejects.tsv            input files that were not packed, with the reason
//! ```

use std::io::{self, Write};
use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// The `format` field of every manifest.
pub const FORMAT_NAME: &str = "mimco-shards";
/// The version of the format this crate writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// File name of a split's manifest.
pub const MANIFEST_FILE: &str = "manifest.json";
/// File name of a split's rejects list (tab-separated `path`, `reason`).
pub const REJECTS_FILE: &str = "rejects.tsv";

/// Extension of the member holding the image's original bytes (JPEG, or PNG: sniff them).
pub const IMAGE_EXT: &str = "jpg";
/// Extension of the member holding the class index as ASCII decimal.
pub const CLASS_EXT: &str = "cls";
/// Extension of the optional member holding [`SampleMeta`] as JSON.
pub const META_EXT: &str = "json";

/// How a shard's tar stream is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// The whole tar stream is one zstd stream (`.tar.zst`).
    Zstd,
    /// A plain tar file (`.tar`), readable by any tar tool and by Python's `webdataset`.
    None,
}

impl Compression {
    /// The file extension of a shard stored this way, without the leading dot.
    pub fn extension(self) -> &'static str {
        match self {
            Compression::Zstd => "tar.zst",
            Compression::None => "tar",
        }
    }

    /// The compression a shard's file name implies, or `None` if it is not a shard name.
    pub fn from_shard_name(name: &str) -> Option<Compression> {
        if name.ends_with(".tar.zst") {
            Some(Compression::Zstd)
        } else if name.ends_with(".tar") {
            Some(Compression::None)
        } else {
            None
        }
    }
}

/// The name of shard `index` of `split`: `train-000042.tar.zst`.
pub fn shard_name(split: &str, index: usize, compression: Compression) -> String {
    format!("{split}-{index:06}.{}", compression.extension())
}

/// Whether `key` is a valid sample key: non-empty ASCII letters, digits, `_` and `-`.
///
/// Keys never contain dots, because WebDataset splits a member name at its first dot.
pub fn is_valid_key(key: &str) -> bool {
    !key.is_empty()
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Turns a file name into a key: everything before the first dot, with any byte that
/// [`is_valid_key`] does not allow replaced by `_`.
pub fn key_from_file_name(file_name: &str) -> String {
    let stem = file_name.split('.').next().unwrap_or_default();
    let key: String = stem
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if key.is_empty() { "_".to_string() } else { key }
}

/// Per-sample metadata stored as `<key>.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SampleMeta {
    /// The class name (an ImageNet wnid such as `n01440764`).
    pub wnid: String,
    /// The source file, relative to the packed folder, with `/` separators.
    pub path: String,
    /// Width of the stored image in pixels.
    pub width: u32,
    /// Height of the stored image in pixels.
    pub height: u32,
    /// What the stored bytes are: `jpeg` or `png`.
    pub format: String,
}

/// One sample as it is stored in a shard.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sample {
    /// The sample's key, unique within its split ([`is_valid_key`]).
    pub key: String,
    /// The encoded image, byte for byte as packed.
    pub image: Vec<u8>,
    /// The class index (ImageFolder convention: position in the sorted class list).
    pub cls: u32,
    /// The raw `<key>.json` member, if the shard has one.
    pub json: Option<Vec<u8>>,
}

/// Parameters of FFCV-style re-encoding at pack time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Reencode {
    /// Images whose longer side exceeds this are shrunk to it; smaller ones keep their size.
    pub max_side: u32,
    /// JPEG quality of the re-encoded image, 1-100.
    pub quality: u8,
}

/// How thoroughly `shardtool pack` checked each image before packing it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageCheck {
    /// Type sniffed from the bytes, headers parsed, and the file must not end early
    /// (JPEG: an end-of-image marker after the scan; PNG: an `IEND` chunk).
    Header,
    /// Every image fully decoded.
    Decode,
}

/// The settings that decide a pack's bytes, chosen by the user (`shardtool pack` flags).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PackSettings {
    /// Seed of the pack-time shuffle.
    pub seed: u64,
    /// Shards are closed once they hold about this many bytes of input.
    pub target_shard_bytes: u64,
    /// Shard compression.
    pub compression: Compression,
    /// zstd level (ignored for [`Compression::None`]).
    pub zstd_level: i32,
    /// The image check that was applied.
    pub check: ImageCheck,
    /// Re-encoding, if any.
    pub reencode: Option<Reencode>,
    /// Whether each sample has a `<key>.json` member.
    pub write_json: bool,
}

/// How a split was packed; two packs with equal parameters are byte-identical.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackParams {
    /// The user's settings (stored flat, next to the fields below).
    #[serde(flatten)]
    pub settings: PackSettings,
    /// SHA-256 over the sorted list of input paths, sizes and labels.
    pub input_fingerprint: String,
    /// The tool and version that wrote the pack.
    pub tool: String,
}

/// One shard's entry in the manifest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardInfo {
    /// File name, relative to the manifest's folder.
    pub name: String,
    /// Number of samples in the shard.
    pub samples: u64,
    /// Size of the shard file in bytes (compressed, as stored).
    pub bytes: u64,
    /// SHA-256 of the shard file, lowercase hex (what `sha256sum` prints).
    pub sha256: String,
}

/// A split's manifest: the list of complete shards and how they were made.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Always [`FORMAT_NAME`].
    pub format: String,
    /// The format version, [`FORMAT_VERSION`] for this crate.
    pub format_version: u32,
    /// The split's name (`train`, `val`).
    pub split: String,
    /// Total samples over all shards.
    pub num_samples: u64,
    /// Input files that were not packed (listed in [`REJECTS_FILE`]).
    pub num_rejects: u64,
    /// Class names in index order: `classes[i]` is the class of `cls == i`.
    pub classes: Vec<String>,
    /// The shards in order.
    pub shards: Vec<ShardInfo>,
    /// How the split was packed.
    pub pack: PackParams,
}

impl Manifest {
    /// Parses and checks a manifest. `origin` names it in errors (a path or URL).
    pub fn from_json(bytes: &[u8], origin: &str) -> Result<Manifest> {
        let err = |message: String| Error::Manifest {
            path: origin.to_string(),
            message,
        };
        let value: serde_json::Value = serde_json::from_slice(bytes)
            .map_err(|e| err(format!("not valid JSON ({e}); re-run `shardtool pack`")))?;
        let format = value.get("format").and_then(|v| v.as_str());
        let version = value.get("format_version").and_then(|v| v.as_u64());
        if format != Some(FORMAT_NAME) {
            return Err(err(format!(
                "format is {format:?}, expected {FORMAT_NAME:?}: this is not a shardtool manifest"
            )));
        }
        if version != Some(u64::from(FORMAT_VERSION)) {
            return Err(err(format!(
                "format version {version:?}; this build reads version {FORMAT_VERSION}: \
                 use the shardtool that wrote it, or re-pack"
            )));
        }
        let manifest: Manifest = serde_json::from_value(value).map_err(|e| err(e.to_string()))?;
        manifest.check().map_err(err)?;
        Ok(manifest)
    }

    /// Reads and checks the manifest at `path`.
    pub fn read(path: &Path) -> Result<Manifest> {
        let bytes = std::fs::read(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Manifest::from_json(&bytes, &path.display().to_string())
    }

    /// Serialises the manifest as pretty JSON with a trailing newline.
    pub fn to_json(&self) -> Vec<u8> {
        // Serialising plain structs of strings and integers cannot fail.
        let mut bytes = serde_json::to_vec_pretty(self).expect("manifest serialises");
        bytes.push(b'\n');
        bytes
    }

    /// A SHA-256 (hex) of what the split holds: its name, classes and shards (names,
    /// sample counts, sizes, SHA-256s); the same for a copy of the split anywhere.
    pub fn fingerprint(&self) -> String {
        let what = (&self.split, &self.classes, &self.shards);
        let bytes = serde_json::to_vec(&what).expect("manifest parts serialise");
        format!("{:x}", Sha256::digest(&bytes))
    }

    /// Internal consistency: counts add up, names are unique shard names, classes unique.
    fn check(&self) -> std::result::Result<(), String> {
        let total: u64 = self.shards.iter().map(|s| s.samples).sum();
        if total != self.num_samples {
            return Err(format!(
                "num_samples is {} but the shards hold {total}",
                self.num_samples
            ));
        }
        let mut names = std::collections::HashSet::new();
        for shard in &self.shards {
            if Compression::from_shard_name(&shard.name).is_none()
                || shard.name.contains('/')
                || !names.insert(shard.name.as_str())
            {
                return Err(format!("bad or repeated shard name {:?}", shard.name));
            }
        }
        let mut classes = std::collections::HashSet::new();
        if let Some(c) = self.classes.iter().find(|c| !classes.insert(c.as_str())) {
            return Err(format!("class {c:?} is listed twice"));
        }
        Ok(())
    }
}

/// A writer that passes bytes through and keeps their SHA-256 and count.
pub struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    bytes: u64,
}

impl<W: Write> HashingWriter<W> {
    /// Wraps `inner`.
    pub fn new(inner: W) -> Self {
        HashingWriter {
            inner,
            hasher: Sha256::new(),
            bytes: 0,
        }
    }

    /// Returns the inner writer, the byte count and the lowercase hex SHA-256.
    pub fn finish(self) -> (W, u64, String) {
        (
            self.inner,
            self.bytes,
            format!("{:x}", self.hasher.finalize()),
        )
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// A reader that passes bytes through and keeps their SHA-256 and count, so a shard can
/// be checked against its manifest entry while it is being parsed.
pub struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
    bytes: u64,
}

impl<R: io::Read> HashingReader<R> {
    /// Wraps `inner`.
    pub fn new(inner: R) -> Self {
        HashingReader {
            inner,
            hasher: Sha256::new(),
            bytes: 0,
        }
    }

    /// Reads `inner` to its end and returns the total byte count and lowercase hex SHA-256.
    pub fn finish(mut self) -> io::Result<(u64, String)> {
        io::copy(&mut self, &mut io::sink())?;
        Ok((self.bytes, format!("{:x}", self.hasher.finalize())))
    }
}

impl<R: io::Read> io::Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
}

enum Encoder<W: Write> {
    Plain(W),
    Zstd(Frames<W>),
}

/// A zstd stream of one frame per sample, each with zstd's content checksum: a reader
/// crosses into the next frame, and so checks this one, when it reads the next sample's
/// first header, before it hands this sample on (`ShardReader` looks ahead that far).
/// The bytes written since the last [`Frames::end_frame`] are held until it.
struct Frames<W: Write> {
    inner: W,
    compressor: zstd::bulk::Compressor<'static>,
    frame: Vec<u8>,
    compressed: Vec<u8>,
}

impl<W: Write> Frames<W> {
    fn new(inner: W, level: i32) -> io::Result<Self> {
        let mut compressor = zstd::bulk::Compressor::new(level)?;
        compressor.set_parameter(zstd::zstd_safe::CParameter::ChecksumFlag(true))?;
        Ok(Frames {
            inner,
            compressor,
            frame: Vec::new(),
            compressed: Vec::new(),
        })
    }

    /// Writes the bytes since the last call as one frame (none if there are none).
    fn end_frame(&mut self) -> io::Result<()> {
        if self.frame.is_empty() {
            return Ok(());
        }
        self.compressed.clear();
        self.compressed
            .reserve(zstd::zstd_safe::compress_bound(self.frame.len()));
        self.compressor
            .compress_to_buffer(&self.frame, &mut self.compressed)?;
        self.frame.clear();
        self.inner.write_all(&self.compressed)
    }
}

impl<W: Write> Write for Encoder<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Encoder::Plain(w) => w.write(buf),
            Encoder::Zstd(z) => {
                z.frame.extend_from_slice(buf);
                Ok(buf.len())
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Encoder::Plain(w) => w.flush(),
            Encoder::Zstd(z) => z.inner.flush(), // a frame is written whole, at its end
        }
    }
}

/// Writes samples into one shard: a deterministic tar stream (mtime 0, uid/gid 0, mode
/// 0644, ustar headers), compressed when asked in one checksummed zstd frame per sample.
pub struct ShardWriter<W: Write> {
    tar: tar::Builder<Encoder<W>>,
}

impl<W: Write> ShardWriter<W> {
    /// Starts a shard on `inner` with the given compression (`level` is zstd's).
    pub fn new(inner: W, compression: Compression, level: i32) -> io::Result<Self> {
        let encoder = match compression {
            Compression::None => Encoder::Plain(inner),
            Compression::Zstd => Encoder::Zstd(Frames::new(inner, level)?),
        };
        let mut tar = tar::Builder::new(encoder);
        tar.mode(tar::HeaderMode::Deterministic);
        Ok(ShardWriter { tar })
    }

    /// Appends one sample as consecutive members `<key>.jpg`, `<key>.cls`, `<key>.json`.
    pub fn write_sample(&mut self, sample: &Sample) -> io::Result<()> {
        if !is_valid_key(&sample.key) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("invalid sample key {:?}", sample.key),
            ));
        }
        self.append(&sample.key, IMAGE_EXT, &sample.image)?;
        self.append(&sample.key, CLASS_EXT, sample.cls.to_string().as_bytes())?;
        if let Some(json) = &sample.json {
            self.append(&sample.key, META_EXT, json)?;
        }
        match self.tar.get_mut() {
            Encoder::Zstd(z) => z.end_frame(),
            Encoder::Plain(_) => Ok(()),
        }
    }

    fn append(&mut self, key: &str, ext: &str, data: &[u8]) -> io::Result<()> {
        let mut header = tar::Header::new_ustar();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_mtime(0);
        header.set_entry_type(tar::EntryType::Regular);
        self.tar
            .append_data(&mut header, format!("{key}.{ext}"), data)
    }

    /// Ends the tar stream (its end blocks in a last frame); returns the inner writer.
    pub fn finish(self) -> io::Result<W> {
        match self.tar.into_inner()? {
            Encoder::Plain(w) => Ok(w),
            Encoder::Zstd(mut z) => {
                z.end_frame()?;
                Ok(z.inner)
            }
        }
    }
}

/// The manifest of a split of hand-written `shards` in tests: two classes, zstd.
#[cfg(test)]
pub(crate) fn test_manifest(shards: Vec<ShardInfo>) -> Manifest {
    Manifest {
        format: FORMAT_NAME.into(),
        format_version: FORMAT_VERSION,
        split: "train".into(),
        num_samples: shards.iter().map(|s| s.samples).sum(),
        num_rejects: 0,
        classes: vec!["a".into(), "b".into()],
        shards,
        pack: PackParams {
            settings: PackSettings {
                seed: 0,
                target_shard_bytes: 1,
                compression: Compression::Zstd,
                zstd_level: 3,
                check: ImageCheck::Header,
                reencode: None,
                write_json: true,
            },
            input_fingerprint: String::new(),
            tool: "test".into(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_names_and_keys() {
        assert_eq!(
            shard_name("train", 7, Compression::Zstd),
            "train-000007.tar.zst"
        );
        assert_eq!(
            Compression::from_shard_name("val-000000.tar"),
            Some(Compression::None)
        );
        assert_eq!(
            key_from_file_name("n01440764_10026.JPEG"),
            "n01440764_10026"
        );
        assert_eq!(key_from_file_name("a b.c.jpg"), "a_b");
        assert_eq!(key_from_file_name(".hidden"), "_");
        assert!(is_valid_key("ILSVRC2012_val_00000001"));
        assert!(!is_valid_key("a.b"));
        assert!(!is_valid_key(""));
    }

    fn manifest() -> Manifest {
        test_manifest(vec![ShardInfo {
            name: "train-000000.tar.zst".into(),
            samples: 3,
            bytes: 10,
            sha256: "00".into(),
        }])
    }

    #[test]
    fn manifest_round_trip_and_checks() {
        let m = manifest();
        assert_eq!(Manifest::from_json(&m.to_json(), "m").unwrap(), m);

        let mut bad = manifest();
        bad.num_samples = 4;
        let e = Manifest::from_json(&bad.to_json(), "m").unwrap_err();
        assert!(e.to_string().contains("num_samples"), "{e}");

        let mut v: serde_json::Value = serde_json::from_slice(&m.to_json()).unwrap();
        v["format_version"] = 2.into();
        let e = Manifest::from_json(v.to_string().as_bytes(), "m").unwrap_err();
        assert!(e.to_string().contains("version"), "{e}");
    }
}

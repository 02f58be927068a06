//! Streaming shard reader: a tar (or zstd-compressed tar) byte stream in, [`Sample`]s out.
//!
//! The reader never seeks, so the same code reads a local file, an HTTP body or an
//! object-store range. Members are grouped into samples by key, in stream order.

use std::io::{self, BufReader, Read};

use crate::error::{Error, Result};
use crate::format::{CLASS_EXT, Compression, IMAGE_EXT, META_EXT, Sample, is_valid_key};

enum Decoder<R: Read> {
    Plain(R),
    Zstd(zstd::Decoder<'static, BufReader<R>>),
}

impl<R: Read> Read for Decoder<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Decoder::Plain(r) => r.read(buf),
            Decoder::Zstd(r) => r.read(buf),
        }
    }
}

/// Reads one shard's samples from a byte stream.
pub struct ShardReader<R: Read> {
    name: String,
    archive: tar::Archive<Decoder<R>>,
}

impl<R: Read> ShardReader<R> {
    /// Reads the shard called `name` (used in errors) from `reader`.
    pub fn new(name: impl Into<String>, reader: R, compression: Compression) -> Result<Self> {
        let name = name.into();
        let decoder = match compression {
            Compression::None => Decoder::Plain(reader),
            Compression::Zstd => {
                Decoder::Zstd(zstd::Decoder::new(reader).map_err(|source| Error::ShardIo {
                    shard: name.clone(),
                    source,
                })?)
            }
        };
        Ok(ShardReader {
            name,
            archive: tar::Archive::new(decoder),
        })
    }

    /// Gives back the underlying reader, positioned wherever parsing stopped (after the
    /// tar end blocks; trailing bytes, if any, are still unread).
    pub fn into_inner(self) -> R {
        match self.archive.into_inner() {
            Decoder::Plain(r) => r,
            Decoder::Zstd(d) => d.finish().into_inner(),
        }
    }

    /// The samples in stream order. The iterator ends after the first error.
    pub fn samples(&mut self) -> Result<Samples<'_, R>> {
        let entries = self.archive.entries().map_err(|source| Error::ShardIo {
            shard: self.name.clone(),
            source,
        })?;
        Ok(Samples {
            shard: &self.name,
            entries,
            pending: None,
            done: false,
        })
    }
}

/// Iterator over a shard's samples; see [`ShardReader::samples`].
pub struct Samples<'a, R: Read> {
    shard: &'a str,
    entries: tar::Entries<'a, Decoder<R>>,
    /// A member already read that belongs to the next sample: (key, ext, data).
    pending: Option<(String, String, Vec<u8>)>,
    done: bool,
}

impl<R: Read> Samples<'_, R> {
    fn layout(&self, message: String) -> Error {
        Error::Layout {
            shard: self.shard.to_string(),
            message,
        }
    }

    fn io(&self, source: io::Error) -> Error {
        Error::ShardIo {
            shard: self.shard.to_string(),
            source,
        }
    }

    /// The next member as (key, extension, data), or `None` at the end of the archive.
    fn next_member(&mut self) -> Result<Option<(String, String, Vec<u8>)>> {
        let Some(entry) = self.entries.next() else {
            return Ok(None);
        };
        let mut entry = entry.map_err(|e| self.io(e))?;
        let path = entry.path().map_err(|e| self.io(e))?;
        let name = path.to_string_lossy().into_owned();
        let Some((key, ext)) = name.split_once('.') else {
            return Err(self.layout(format!("member {name:?} has no extension")));
        };
        if !is_valid_key(key) {
            return Err(self.layout(format!("member {name:?} has an invalid key")));
        }
        let (key, ext) = (key.to_string(), ext.to_string());
        let mut data = Vec::with_capacity(entry.size() as usize);
        entry.read_to_end(&mut data).map_err(|e| self.io(e))?;
        Ok(Some((key, ext, data)))
    }

    fn next_sample(&mut self) -> Result<Option<Sample>> {
        let first = match self.pending.take() {
            Some(member) => Some(member),
            None => self.next_member()?,
        };
        let Some((key, ext, data)) = first else {
            return Ok(None);
        };
        let (mut image, mut cls, mut json) = (None, None, None);
        let mut member = Some((ext, data));
        while let Some((ext, data)) = member.take() {
            let slot = match ext.as_str() {
                IMAGE_EXT => &mut image,
                CLASS_EXT => &mut cls,
                META_EXT => &mut json,
                _ => return Err(self.layout(format!("unexpected member {key}.{ext}"))),
            };
            if slot.replace(data).is_some() {
                return Err(self.layout(format!("member {key}.{ext} appears twice")));
            }
            match self.next_member()? {
                Some((k, e, d)) if k == key => member = Some((e, d)),
                other => self.pending = other,
            }
        }
        let image =
            image.ok_or_else(|| self.layout(format!("sample {key} has no .{IMAGE_EXT}")))?;
        let cls = cls.ok_or_else(|| self.layout(format!("sample {key} has no .{CLASS_EXT}")))?;
        let cls = std::str::from_utf8(&cls)
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok())
            .ok_or_else(|| self.layout(format!("sample {key}: .{CLASS_EXT} is not a number")))?;
        Ok(Some(Sample {
            key,
            image,
            cls,
            json,
        }))
    }
}

impl<R: Read> Iterator for Samples<'_, R> {
    type Item = Result<Sample>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let next = self.next_sample();
        if !matches!(next, Ok(Some(_))) {
            self.done = true;
        }
        next.transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::ShardWriter;

    fn sample(key: &str, cls: u32, json: bool) -> Sample {
        Sample {
            key: key.into(),
            image: key.as_bytes().repeat(700),
            cls,
            json: json.then(|| b"{}".to_vec()),
        }
    }

    fn round_trip(compression: Compression) {
        let samples = vec![
            sample("a", 0, true),
            sample("b-2", 17, false),
            sample("c_3", 999, true),
        ];
        let mut writer = ShardWriter::new(Vec::new(), compression, 3).unwrap();
        for s in &samples {
            writer.write_sample(s).unwrap();
        }
        let bytes = writer.finish().unwrap();
        let mut reader = ShardReader::new("t", bytes.as_slice(), compression).unwrap();
        let read: Vec<Sample> = reader.samples().unwrap().map(Result::unwrap).collect();
        assert_eq!(read, samples);
    }

    #[test]
    fn round_trip_plain_and_zstd() {
        round_trip(Compression::None);
        round_trip(Compression::Zstd);
    }

    /// Shards written before the per-sample frames (the whole tar one zstd frame, no
    /// checksum) read the same samples.
    #[test]
    fn a_single_frame_shard_reads_the_same() {
        let samples = vec![sample("a", 0, true), sample("b", 1, false)];
        let mut writer = ShardWriter::new(Vec::new(), Compression::None, 0).unwrap();
        for s in &samples {
            writer.write_sample(s).unwrap();
        }
        let tar = writer.finish().unwrap();
        let one_frame = zstd::encode_all(tar.as_slice(), 1).unwrap();
        let mut reader = ShardReader::new("old", one_frame.as_slice(), Compression::Zstd).unwrap();
        let read: Vec<Sample> = reader.samples().unwrap().map(Result::unwrap).collect();
        assert_eq!(read, samples);
    }

    #[test]
    fn writer_output_is_deterministic() {
        let write = || {
            let mut w = ShardWriter::new(Vec::new(), Compression::Zstd, 3).unwrap();
            w.write_sample(&sample("k", 1, true)).unwrap();
            w.finish().unwrap()
        };
        assert_eq!(write(), write());
    }

    #[test]
    fn truncated_shard_is_an_error_not_a_short_read() {
        let mut writer = ShardWriter::new(Vec::new(), Compression::Zstd, 3).unwrap();
        for i in 0..4 {
            writer
                .write_sample(&sample(&format!("k{i}"), i, false))
                .unwrap();
        }
        let bytes = writer.finish().unwrap();
        let cut = &bytes[..bytes.len() / 2];
        let mut reader = ShardReader::new("cut", cut, Compression::Zstd).unwrap();
        let results: Vec<_> = reader.samples().unwrap().collect();
        let err = results.last().unwrap().as_ref().unwrap_err();
        assert!(err.to_string().starts_with("shard cut:"), "{err}");
    }

    /// zstd stores incompressible bytes (JPEG data) as they are, so a flipped bit there
    /// decodes without error; each sample's frame checksum catches it before the damaged
    /// sample is handed on.
    #[test]
    fn a_damaged_sample_is_caught_by_its_frame_checksum_before_it_is_handed_on() {
        use rand::{RngCore, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let samples: Vec<Sample> = (0..4)
            .map(|i| {
                let mut image = vec![0u8; 5000];
                rng.fill_bytes(&mut image);
                Sample {
                    key: format!("k{i}"),
                    image,
                    cls: i,
                    json: None,
                }
            })
            .collect();
        let mut writer = ShardWriter::new(Vec::new(), Compression::Zstd, 3).unwrap();
        for s in &samples {
            writer.write_sample(s).unwrap();
        }
        let mut bytes = writer.finish().unwrap();
        let read = |bytes: &[u8]| {
            let mut reader = ShardReader::new("d", bytes, Compression::Zstd).unwrap();
            reader.samples().unwrap().collect::<Vec<_>>()
        };
        assert_eq!(read(&bytes).len(), 4);
        // Sample 2's image bytes stand in the compressed stream as they are.
        let window = &samples[2].image[2000..2032];
        let at = bytes.windows(32).position(|w| w == window).unwrap() + 16;
        bytes[at] ^= 0x10;
        let results = read(&bytes);
        let delivered: Vec<&str> = results
            .iter()
            .filter_map(|r| r.as_ref().ok().map(|s| s.key.as_str()))
            .collect();
        assert_eq!(delivered, ["k0", "k1"]);
        let err = results.last().unwrap().as_ref().unwrap_err().to_string();
        assert!(
            err.starts_with("shard d:") && err.contains("checksum"),
            "{err}"
        );
    }

    #[test]
    fn sample_without_class_is_rejected() {
        let mut tar = tar::Builder::new(Vec::new());
        let mut header = tar::Header::new_ustar();
        header.set_size(3);
        tar.append_data(&mut header, "x.jpg", &b"abc"[..]).unwrap();
        let bytes = tar.into_inner().unwrap();
        let mut reader = ShardReader::new("s", bytes.as_slice(), Compression::None).unwrap();
        let err = reader.samples().unwrap().next().unwrap().unwrap_err();
        assert!(err.to_string().contains("has no .cls"), "{err}");
    }
}

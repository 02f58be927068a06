//! Image bytes to an RGB8 view of the crop, resized to the output size.
//!
//! JPEGs are decoded by libjpeg-turbo (built from source with its SIMD code): on the
//! generated ImageNet-like files it decodes ~25% faster than zune-jpeg and ~50% faster
//! than jpeg-decoder (`benches/jpeg_decoders.sh`). The crops are known before decoding, so
//! only what they need is decoded: at 1/2, 1/4 or 1/8 scale in the DCT domain whenever
//! every crop keeps at least the output's resolution at that scale, and only the rectangle
//! around the crops (libjpeg-turbo's partial decoding: nothing below it, no inverse DCT or
//! colour conversion beside or above it). The rectangle has a margin for the resize
//! filter, so the output is the one a full decode gives. PNG and CMYK JPEGs go through
//! the `image` crate. The crop and the resize are one pass of `fast_image_resize`
//! (bilinear with antialiasing, like torchvision's default).

mod turbo;

use std::io::Cursor;

use fast_image_resize as fr;

use crate::transform::CropParams;
use turbo::{Jpeg, Region, scaled};

/// Why an image could not be decoded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The bytes are not an image this crate decodes, or are corrupt.
    #[error("undecodable image: {0}")]
    Corrupt(String),
}

fn is_jpeg(bytes: &[u8]) -> bool {
    bytes.starts_with(&[0xFF, 0xD8, 0xFF])
}

fn corrupt(e: impl std::fmt::Display) -> DecodeError {
    DecodeError::Corrupt(e.to_string())
}

/// A decoder and resizer with reusable buffers; one per worker thread.
pub struct CropDecoder {
    resizer: fr::Resizer,
    /// libjpeg-turbo's decompressor, made on first use.
    turbo: Option<Jpeg>,
    /// RGB8 pixels of the last decoded rectangle (grown, never shrunk).
    rgb: Vec<u8>,
}

impl Default for CropDecoder {
    fn default() -> Self {
        CropDecoder {
            resizer: fr::Resizer::new(),
            turbo: None,
            rgb: Vec::new(),
        }
    }
}

/// What [`CropDecoder::decode`] did: the scale, the decoded rectangle and any warning.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DecodeInfo {
    /// The DCT scale denominator used (1 = full size, 2, 4 or 8).
    pub scale: u32,
    /// The decoded rectangle, in pixels at that scale.
    region: Region,
    /// The whole image's width and height at that scale.
    scaled: (u32, u32),
    /// libjpeg's warning, where it decoded the image despite one: stray bytes between
    /// segments (the pixels are whole) or corrupt image data (filled in, as Pillow does).
    pub warning: Option<String>,
}

/// What [`CropDecoder::inspect`] read from an image's header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Inspected {
    /// Width and height in pixels.
    pub dims: (u32, u32),
    /// An 8-bit sequential (baseline) JPEG, YCbCr in 4:4:4, 4:2:2, 4:2:0 or 4:4:0, or
    /// greyscale: an image nvJPEG's hardware decoder takes.
    pub hardware_decodable: bool,
}

impl DecodeInfo {
    /// The fraction of the (scaled) image's pixels that were decoded.
    pub fn decoded_fraction(&self) -> f64 {
        let decoded = f64::from(self.region.width) * f64::from(self.region.height);
        decoded / (f64::from(self.scaled.0) * f64::from(self.scaled.1))
    }
}

/// Extra pixels (at the decode's scale) on each side of a crop: the reach of the bilinear
/// filter, which is 1 pixel widened by the downscaling factor, plus one for rounding.
fn filter_margin(crop: &CropParams, denom: u32, size: u32) -> u32 {
    let longest = crop.width.max(crop.height);
    scaled(longest, denom).div_ceil(size).max(1) + 1
}

/// The rectangle at 1/`denom` scale that holds every crop with its filter margin, its
/// left edge moved left to a multiple of `align` (the scaled iMCU width); the whole image
/// without `align`.
fn covering_region(
    crops: &[CropParams],
    denom: u32,
    size: u32,
    (width, height): (u32, u32),
    align: Option<u32>,
) -> Region {
    let whole = Region {
        left: 0,
        top: 0,
        width,
        height,
    };
    let Some(align) = align else {
        return whole;
    };
    let (mut left, mut top, mut right, mut bottom) = (width, height, 0, 0);
    for c in crops {
        let margin = filter_margin(c, denom, size);
        left = left.min((c.left / denom).saturating_sub(margin));
        top = top.min((c.top / denom).saturating_sub(margin));
        right = right.max(scaled(c.left + c.width, denom) + margin);
        bottom = bottom.max(scaled(c.top + c.height, denom) + margin);
    }
    let (right, bottom) = (right.min(width), bottom.min(height));
    let left = left / align * align;
    if crops.is_empty() || left >= right || top >= bottom {
        return whole;
    }
    Region {
        left,
        top,
        width: right - left,
        height: bottom - top,
    }
}

impl CropDecoder {
    /// Reads the image's width and height from its header.
    pub fn dimensions(&mut self, bytes: &[u8]) -> Result<(u32, u32), DecodeError> {
        Ok(self.inspect(bytes)?.dims)
    }

    /// Reads the image's header: its width and height, and whether nvJPEG's hardware
    /// decoder takes it.
    pub fn inspect(&mut self, bytes: &[u8]) -> Result<Inspected, DecodeError> {
        if is_jpeg(bytes) {
            let header = self.turbo()?.header(bytes);
            let header = self.unless_failed(header)?;
            return Ok(Inspected {
                dims: (header.width, header.height),
                hardware_decodable: header.hardware_decodable,
            });
        }
        let dims = image::ImageReader::new(Cursor::new(bytes))
            .with_guessed_format()
            .map_err(corrupt)?
            .into_dimensions()
            .map_err(corrupt)?;
        Ok(Inspected {
            dims,
            hardware_decodable: false,
        })
    }

    fn turbo(&mut self) -> Result<&mut Jpeg, DecodeError> {
        if self.turbo.is_none() {
            self.turbo = Some(Jpeg::new().map_err(corrupt)?);
        }
        Ok(self.turbo.as_mut().expect("just made"))
    }

    /// `result` of a libjpeg-turbo call; where it failed, the decompressor is dropped (a
    /// new one is made for the next image). libjpeg-turbo 3.1's `tj3DecompressHeader`
    /// returns from an error without aborting the decompression, and the handle then
    /// fails every later image with that same error: one corrupt JPEG would fail all the
    /// rest of a decode thread's images.
    fn unless_failed<T>(&mut self, result: Result<T, String>) -> Result<T, DecodeError> {
        if result.is_err() {
            self.turbo = None;
        }
        result.map_err(corrupt)
    }

    /// Decodes `bytes` (source image `dims`), cuts `crop` out and resizes it to
    /// `size` x `size`, writing interleaved RGB8 into `out` (`size * size * 3` bytes).
    pub fn decode_crop(
        &mut self,
        bytes: &[u8],
        dims: (u32, u32),
        crop: &CropParams,
        size: u32,
        out: &mut [u8],
    ) -> Result<DecodeInfo, DecodeError> {
        let info = self.decode(bytes, dims, std::slice::from_ref(crop), size)?;
        self.crop_resize(&info, crop, size, out)?;
        Ok(info)
    }

    /// Decodes `bytes` (source image `dims`) once for all of `crops` (the views of one
    /// sample): at the coarsest DCT scale that keeps every crop at `size` or more, and
    /// for JPEGs only the rectangle the crops and the resize filter reach.
    pub fn decode(
        &mut self,
        bytes: &[u8],
        dims: (u32, u32),
        crops: &[CropParams],
        size: u32,
    ) -> Result<DecodeInfo, DecodeError> {
        let denom = [8u32, 4, 2]
            .into_iter()
            .find(|d| {
                crops
                    .iter()
                    .all(|c| c.width / d >= size && c.height / d >= size)
            })
            .unwrap_or(1);
        if is_jpeg(bytes)
            && let Some(decoded) = self.decode_jpeg(bytes, dims, crops, size, denom)?
        {
            return Ok(decoded);
        }
        let (width, height) = self.decode_full(bytes)?;
        Ok(DecodeInfo {
            scale: 1,
            region: Region {
                left: 0,
                top: 0,
                width,
                height,
            },
            scaled: (width, height),
            warning: None,
        })
    }

    /// Cuts `crop` (in source pixels) out of the rectangle [`CropDecoder::decode`] decoded
    /// last and resizes it to `size` x `size` into `out` (interleaved RGB8).
    pub fn crop_resize(
        &mut self,
        decoded: &DecodeInfo,
        crop: &CropParams,
        size: u32,
        out: &mut [u8],
    ) -> Result<(), DecodeError> {
        let Region {
            left: x0,
            top: y0,
            width: w,
            height: h,
        } = decoded.region;
        let pixels = &self.rgb[..3 * w as usize * h as usize];
        // Decoded pixel i covers source pixels [i * scale, (i + 1) * scale), and the scaled
        // size rounds up, so the scaled crop stays inside the rectangle; the clamps only
        // guard against rounding.
        let s = f64::from(decoded.scale);
        let left = (f64::from(crop.left) / s - f64::from(x0)).clamp(0.0, f64::from(w));
        let top = (f64::from(crop.top) / s - f64::from(y0)).clamp(0.0, f64::from(h));
        let width = (f64::from(crop.width) / s).min(f64::from(w) - left);
        let height = (f64::from(crop.height) / s).min(f64::from(h) - top);
        let src = fr::images::ImageRef::new(w, h, pixels, fr::PixelType::U8x3).map_err(corrupt)?;
        let mut dst = fr::images::Image::from_slice_u8(size, size, out, fr::PixelType::U8x3)
            .map_err(corrupt)?;
        let options = fr::ResizeOptions::new()
            .resize_alg(fr::ResizeAlg::Convolution(fr::FilterType::Bilinear))
            .crop(left, top, width, height);
        self.resizer
            .resize(&src, &mut dst, &options)
            .map_err(corrupt)
    }

    /// libjpeg-turbo's decode at 1/`denom` scale of the rectangle around `crops` into
    /// `self.rgb` (greyscale comes out as RGB); `None` for the colour spaces it does not
    /// turn into RGB (CMYK, YCCK).
    fn decode_jpeg(
        &mut self,
        bytes: &[u8],
        dims: (u32, u32),
        crops: &[CropParams],
        size: u32,
        denom: u32,
    ) -> Result<Option<DecodeInfo>, DecodeError> {
        let header = self.turbo()?.header(bytes);
        let header = self.unless_failed(header)?;
        if header.cmyk {
            return Ok(None);
        }
        if (header.width, header.height) != dims {
            let msg = format!(
                "the header says {}x{}, expected {dims:?}",
                header.width, header.height
            );
            return Err(DecodeError::Corrupt(msg));
        }
        let whole = (scaled(dims.0, denom), scaled(dims.1, denom));
        let align = header.mcu_width.map(|w| scaled(w, denom));
        let region = covering_region(crops, denom, size, whole, align);
        let len = 3 * region.width as usize * region.height as usize;
        if self.rgb.len() < len {
            self.rgb.resize(len, 0);
        }
        let turbo = self.turbo.as_mut().expect("made above");
        let warning = turbo.decode_rgb(bytes, &header, denom, region, &mut self.rgb[..len]);
        let warning = self.unless_failed(warning)?;
        Ok(Some(DecodeInfo {
            scale: denom,
            region,
            scaled: whole,
            warning,
        }))
    }

    /// The image crate's decode (PNG, CMYK JPEGs), full size.
    fn decode_full(&mut self, bytes: &[u8]) -> Result<(u32, u32), DecodeError> {
        let img = image::load_from_memory(bytes).map_err(corrupt)?.into_rgb8();
        let dims = img.dimensions();
        self.rgb = img.into_raw();
        Ok(dims)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jpeg(w: u32, h: u32) -> Vec<u8> {
        let img = image::RgbImage::from_fn(w, h, |x, y| {
            image::Rgb([(x % 256) as u8, (y % 256) as u8, 128])
        });
        let mut out = Vec::new();
        image::DynamicImage::ImageRgb8(img)
            .write_with_encoder(image::codecs::jpeg::JpegEncoder::new_with_quality(
                &mut out, 95,
            ))
            .unwrap();
        out
    }

    /// A baseline YCbCr JPEG is one nvJPEG's hardware takes; cut short it is not (the
    /// CPU's decode refuses it), nor is a PNG.
    #[test]
    fn inspect_says_which_images_the_hardware_decoder_takes() {
        let bytes = jpeg(64, 48);
        let mut d = CropDecoder::default();
        let whole = d.inspect(&bytes).unwrap();
        assert_eq!((whole.dims, whole.hardware_decodable), ((64, 48), true));
        let cut = d.inspect(&bytes[..bytes.len() - 100]).unwrap();
        assert_eq!((cut.dims, cut.hardware_decodable), ((64, 48), false));
        let mut png = Vec::new();
        image::RgbImage::new(5, 4)
            .write_to(&mut Cursor::new(&mut png), image::ImageFormat::Png)
            .unwrap();
        assert!(!d.inspect(&png).unwrap().hardware_decodable);
    }

    /// A JPEG whose Huffman table libjpeg-turbo refuses, then good ones, through one
    /// decoder: the good ones decode (libjpeg-turbo leaves a decompressor that failed on a
    /// header failing every later image).
    #[test]
    fn one_refused_jpeg_does_not_fail_the_next() {
        let good = jpeg(64, 48);
        let mut bad = good.clone();
        let dht = bad.windows(2).position(|w| w == [0xFF, 0xC4]).unwrap();
        bad[dht + 5..dht + 21].fill(0xFF); // 16 code counts of 255: "Bogus Huffman table"
        let crop = CropParams {
            top: 0,
            left: 0,
            height: 48,
            width: 64,
        };
        let mut d = CropDecoder::default();
        let mut out = vec![0u8; 32 * 32 * 3];
        let refused = d.inspect(&bad).unwrap_err().to_string();
        assert!(refused.contains("Huffman"), "{refused}");
        assert_eq!(d.inspect(&good).unwrap().dims, (64, 48));
        assert!(d.decode_crop(&bad, (64, 48), &crop, 32, &mut out).is_err());
        d.decode_crop(&good, (64, 48), &crop, 32, &mut out).unwrap();
    }

    #[test]
    fn large_crops_decode_downscaled_and_match_full_decode() {
        let bytes = jpeg(1024, 768);
        assert_eq!(
            CropDecoder::default().dimensions(&bytes).unwrap(),
            (1024, 768)
        );
        let crop = CropParams {
            top: 0,
            left: 0,
            height: 768,
            width: 1024,
        };
        let mut d = CropDecoder::default();
        let mut scaled = vec![0u8; 64 * 64 * 3];
        assert_eq!(
            d.decode_crop(&bytes, (1024, 768), &crop, 64, &mut scaled)
                .unwrap()
                .scale,
            8
        );
        let small = CropParams {
            top: 100,
            left: 100,
            height: 100,
            width: 100,
        };
        assert_eq!(
            d.decode_crop(&bytes, (1024, 768), &small, 64, &mut scaled.clone())
                .unwrap()
                .scale,
            1
        );
        // Downscaled decoding changes pixels only slightly.
        let mut full = vec![0u8; 64 * 64 * 3];
        d.decode_full(&bytes).unwrap();
        let src = fr::images::ImageRef::new(1024, 768, &d.rgb, fr::PixelType::U8x3).unwrap();
        let mut dst =
            fr::images::Image::from_slice_u8(64, 64, &mut full, fr::PixelType::U8x3).unwrap();
        d.resizer
            .resize(
                &src,
                &mut dst,
                &fr::ResizeOptions::new()
                    .resize_alg(fr::ResizeAlg::Convolution(fr::FilterType::Bilinear)),
            )
            .unwrap();
        let mean_diff = scaled
            .iter()
            .zip(&full)
            .map(|(a, b)| (*a as f64 - *b as f64).abs())
            .sum::<f64>()
            / full.len() as f64;
        assert!(mean_diff < 4.0, "mean abs difference {mean_diff}");
    }

    /// libjpeg-turbo's pixels are the image crate's (zune-jpeg) up to the two decoders'
    /// rounding, for colour and greyscale (which comes out as RGB), and a smaller image
    /// after a larger one reuses the buffer correctly.
    #[test]
    fn libjpeg_turbo_decodes_like_the_image_crate() {
        let grey = {
            let img = image::GrayImage::from_fn(37, 21, |x, y| image::Luma([(x * 7 + y) as u8]));
            let mut out = Vec::new();
            image::DynamicImage::ImageLuma8(img)
                .write_with_encoder(image::codecs::jpeg::JpegEncoder::new_with_quality(
                    &mut out, 90,
                ))
                .unwrap();
            out
        };
        let mut d = CropDecoder::default();
        for bytes in [jpeg(300, 200), jpeg(64, 48), grey] {
            let dims = d.dimensions(&bytes).unwrap();
            let whole = CropParams {
                top: 0,
                left: 0,
                height: dims.1,
                width: dims.0,
            };
            let info = d
                .decode(&bytes, dims, &[whole], dims.0.min(dims.1))
                .unwrap();
            assert_eq!(info.scale, 1);
            assert_eq!(info.decoded_fraction(), 1.0);
            let (w, h) = dims;
            let ours = &d.rgb[..(w * h * 3) as usize];
            let theirs = image::load_from_memory(&bytes)
                .unwrap()
                .into_rgb8()
                .into_raw();
            let diffs: Vec<u8> = ours
                .iter()
                .zip(&theirs)
                .map(|(a, b)| a.abs_diff(*b))
                .collect();
            let mean = diffs.iter().map(|&v| f64::from(v)).sum::<f64>() / diffs.len() as f64;
            let worst = diffs.iter().max().copied().unwrap_or(0);
            assert!(
                mean < 1.0 && worst <= 8,
                "{w}x{h}: mean {mean}, worst {worst}"
            );
        }
    }

    /// Two crops decoded once: the scale is the one the smaller crop allows, and each
    /// crop comes out as when decoded alone at that scale.
    #[test]
    fn one_decode_serves_several_crops() {
        let bytes = jpeg(1024, 768);
        let big = CropParams {
            top: 0,
            left: 0,
            height: 768,
            width: 1024,
        };
        let mid = CropParams {
            top: 10,
            left: 20,
            height: 300,
            width: 300,
        };
        let mut d = CropDecoder::default();
        let info = d.decode(&bytes, (1024, 768), &[big, mid], 64).unwrap();
        assert_eq!(info.scale, 4, "300 / 4 >= 64 but 300 / 8 < 64");
        let (mut a, mut b) = (vec![0u8; 64 * 64 * 3], vec![0u8; 64 * 64 * 3]);
        d.crop_resize(&info, &mid, 64, &mut a).unwrap();
        d.decode_crop(&bytes, (1024, 768), &mid, 64, &mut b)
            .unwrap();
        assert_eq!(a, b, "the mid crop alone also decodes at 1/4");
    }

    /// The rocket photo re-encoded by libjpeg-turbo with `subsampling`, baseline or
    /// progressive.
    fn reencoded(subsampling: turbojpeg::Subsamp, progressive: bool) -> Vec<u8> {
        let photo = include_bytes!("../../../tests/fixtures/photos/rocket.jpg");
        let rgb = image::load_from_memory(photo).unwrap().into_rgb8();
        let (width, height) = (rgb.width() as usize, rgb.height() as usize);
        let mut compressor = turbojpeg::Compressor::new().unwrap();
        compressor.set_quality(90).unwrap();
        compressor.set_subsamp(subsampling).unwrap();
        compressor.set_progressive(progressive).unwrap();
        let image = turbojpeg::Image {
            pixels: rgb.as_raw().as_slice(),
            width,
            pitch: 3 * width,
            height,
            format: turbojpeg::PixelFormat::RGB,
        };
        compressor.compress_to_vec(image).unwrap()
    }

    /// Decoding only the rectangle around a crop gives the output a whole decode gives:
    /// on real photos with every chroma subsampling (iMCUs 8 to 32 pixels wide) and
    /// greyscale, baseline and progressive, at every DCT scale, for crops anywhere.
    #[test]
    fn partial_decode_gives_the_whole_decodes_output() {
        use rand::SeedableRng;
        use turbojpeg::Subsamp;
        let mut photos: Vec<(String, Vec<u8>)> = vec![
            (
                "rocket.jpg (4:4:4)".into(),
                include_bytes!("../../../tests/fixtures/photos/rocket.jpg").to_vec(),
            ),
            (
                "retina.jpg (4:2:0)".into(),
                include_bytes!("../../../tests/fixtures/photos/retina.jpg").to_vec(),
            ),
        ];
        for subsampling in [
            Subsamp::Sub2x1,
            Subsamp::Sub2x2,
            Subsamp::Sub1x2,
            Subsamp::Sub4x1,
            Subsamp::Gray,
        ] {
            for progressive in [false, true] {
                let name = format!("rocket {subsampling:?}, progressive {progressive}");
                photos.push((name, reencoded(subsampling, progressive)));
            }
        }
        let sampler = crate::transform::RandomResizedCrop {
            size: 64,
            scale: (0.05, 1.0),
            ratio: (0.75, 4.0 / 3.0),
        };
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let mut d = CropDecoder::default();
        let (mut partial, mut whole) = (vec![0u8; 64 * 64 * 3], vec![0u8; 64 * 64 * 3]);
        let (mut scales, mut fractions) = (std::collections::BTreeSet::new(), Vec::new());
        for (name, bytes) in &photos {
            let dims = d.dimensions(bytes).unwrap();
            let everything = CropParams {
                top: 0,
                left: 0,
                height: dims.1,
                width: dims.0,
            };
            for _ in 0..24 {
                let crop = sampler.sample(dims, &mut rng);
                let info = d.decode_crop(bytes, dims, &crop, 64, &mut partial).unwrap();
                let full = d
                    .decode_jpeg(bytes, dims, &[everything, crop], 64, info.scale)
                    .unwrap()
                    .unwrap();
                assert_eq!(full.decoded_fraction(), 1.0);
                d.crop_resize(&full, &crop, 64, &mut whole).unwrap();
                assert!(partial == whole, "{name}: {crop:?} at 1/{}", info.scale);
                scales.insert(info.scale);
                fractions.push(info.decoded_fraction());
            }
        }
        assert_eq!(scales.len(), 4, "every scale was tried: {scales:?}");
        let mean = fractions.iter().sum::<f64>() / fractions.len() as f64;
        assert!(mean < 0.8, "partial decodes decode less: {mean}");
    }

    #[test]
    fn garbage_is_an_error() {
        // The top left corner, which a file cut short still holds.
        let crop = CropParams {
            top: 0,
            left: 0,
            height: 8,
            width: 8,
        };
        let good = jpeg(64, 48);
        // Everything before the first scan: frame header and tables, no image data.
        let sos = good.windows(2).position(|w| w == [0xFF, 0xDA]).unwrap();
        let tables_only = [&good[..sos], &[0xFF, 0xD9][..]].concat();
        let no_frame: [&[u8]; 5] = [
            b"\xFF\xD8\xFFnot really",
            b"\xFF\xD8\xFF\xE0 broken",
            b"\xFF\xD8\xFF\xDB\x00\x43",
            &tables_only,
            &good[..sos], // cut between the frame header and the scan
        ];
        let cut_short = &good[..(sos + good.len()) / 2];
        for (i, bytes) in no_frame.iter().chain([&cut_short]).enumerate() {
            // The same decoder first reads a good image: libjpeg-turbo keeps its header
            // for datastreams without a frame, which must not leak into the next one.
            let mut d = CropDecoder::default();
            assert_eq!(d.dimensions(&good).unwrap(), (64, 48));
            let dims = d.dimensions(bytes);
            assert_eq!(dims.is_err(), i < no_frame.len(), "input {i}: {dims:?}");
            let dims = dims.unwrap_or((64, 48));
            let result = d.decode_crop(bytes, dims, &crop, 8, &mut [0; 192]);
            assert!(result.is_err(), "bad input {i} decoded: {result:?}");
        }
        assert!(CropDecoder::default().dimensions(b"hello").is_err());
    }

    /// Bytes between the last scan and the EOI marker: libjpeg warns, Pillow decodes.
    #[test]
    fn extraneous_bytes_before_a_marker_decode_like_the_clean_file() {
        let good = jpeg(64, 48);
        let (data, eoi) = good.split_at(good.len() - 2);
        assert_eq!(eoi, [0xFF, 0xD9]);
        let padded = [data, b"\x00\x00junk", eoi].concat();
        let crop = CropParams {
            top: 5,
            left: 7,
            height: 40,
            width: 50,
        };
        let mut d = CropDecoder::default();
        let [mut want, mut got] = [[0u8; 32 * 32 * 3]; 2];
        let clean = d
            .decode_crop(&good, (64, 48), &crop, 32, &mut want)
            .unwrap();
        assert_eq!(clean.warning, None);
        assert_eq!(d.dimensions(&padded).unwrap(), (64, 48));
        let warned = d
            .decode_crop(&padded, (64, 48), &crop, 32, &mut got)
            .unwrap();
        assert_eq!(got, want);
        let warning = warned.warning.expect("the warning is passed on");
        assert!(warning.contains("extraneous bytes"), "{warning}");
        // Stray bytes between the header's segments warn too.
        let dht = good.windows(2).position(|w| w == [0xFF, 0xC4]).unwrap();
        let stray = [&good[..dht], b"\x00\x00", &good[dht..]].concat();
        let info = d
            .decode_crop(&stray, (64, 48), &crop, 32, &mut got)
            .unwrap();
        assert_eq!(got, want);
        assert!(info.warning.is_some_and(|w| w.contains("extraneous bytes")));
        // A warning (bytes before the first DHT) and then a fatal error (a scan of a
        // component the frame lacks) is an error, though TurboJPEG calls it a warning.
        let mut fatal = stray;
        let sos = fatal.windows(2).position(|w| w == [0xFF, 0xDA]).unwrap();
        fatal[sos + 5] = 9; // the first component selector
        let result = d.decode_crop(&fatal, (64, 48), &crop, 32, &mut got);
        let message = format!("{:?}", result.unwrap_err());
        assert!(message.contains("component"), "{message}");
    }
}

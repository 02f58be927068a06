//! Image bytes to an RGB8 view of the crop, resized to the output size.
//!
//! The crop is known before decoding, so a JPEG is decoded at 1/2, 1/4 or 1/8 scale in the
//! DCT domain (`jpeg-decoder`'s reduced IDCT) whenever the crop still has at least the
//! output's resolution at that scale. Full-size JPEGs are decoded by zune-jpeg straight
//! from the shard's bytes into a reused buffer; PNG and CMYK JPEGs go through the `image`
//! crate. The crop and the resize are one pass of `fast_image_resize` (bilinear with
//! antialiasing, like torchvision's default).

use std::io::Cursor;

use fast_image_resize as fr;

use crate::transform::CropParams;

/// Why an image could not be decoded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The bytes are not an image this crate decodes, or are corrupt.
    #[error("undecodable image: {0}")]
    Corrupt(String),
}

/// Reads the image's width and height from its header.
pub fn dimensions(bytes: &[u8]) -> Result<(u32, u32), DecodeError> {
    if is_jpeg(bytes) {
        let mut decoder = jpeg_decoder::Decoder::new(Cursor::new(bytes));
        decoder.read_info().map_err(corrupt)?;
        // read_info succeeded, so info is present.
        let info = decoder.info().expect("info after read_info");
        return Ok((u32::from(info.width), u32::from(info.height)));
    }
    image::ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(corrupt)?
        .into_dimensions()
        .map_err(corrupt)
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
    /// Full or DCT-scaled RGB8 pixels of the last decoded image.
    rgb: Vec<u8>,
}

impl Default for CropDecoder {
    fn default() -> Self {
        CropDecoder {
            resizer: fr::Resizer::new(),
            rgb: Vec::new(),
        }
    }
}

/// What [`CropDecoder::decode`] did, for statistics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecodeInfo {
    /// The DCT scale denominator used (1 = full size, 2, 4 or 8).
    pub scale: u32,
    /// Decoded width in pixels.
    width: u32,
    /// Decoded height in pixels.
    height: u32,
}

impl CropDecoder {
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
    /// sample): at the coarsest DCT scale that keeps every crop at `size` or more.
    pub fn decode(
        &mut self,
        bytes: &[u8],
        dims: (u32, u32),
        crops: &[CropParams],
        size: u32,
    ) -> Result<DecodeInfo, DecodeError> {
        let (width, height, scale) = self.decode_scaled(bytes, dims, crops, size)?;
        Ok(DecodeInfo {
            scale,
            width,
            height,
        })
    }

    /// Cuts `crop` (in source pixels) out of the image [`CropDecoder::decode`] decoded last
    /// and resizes it to `size` x `size` into `out` (interleaved RGB8).
    pub fn crop_resize(
        &mut self,
        decoded: &DecodeInfo,
        crop: &CropParams,
        size: u32,
        out: &mut [u8],
    ) -> Result<(), DecodeError> {
        let (w, h, scale) = (decoded.width, decoded.height, decoded.scale);
        let pixels = &self.rgb[..(w * h * 3) as usize];
        // Decoded pixel i covers source pixels [i * scale, (i + 1) * scale), and the decoded
        // size is ceil(source / scale), so the scaled crop stays inside; the clamp only
        // guards against rounding.
        let s = f64::from(scale);
        let left = (f64::from(crop.left) / s).min(f64::from(w));
        let top = (f64::from(crop.top) / s).min(f64::from(h));
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

    /// Decodes into `self.rgb`; returns the decoded width, height and scale denominator.
    fn decode_scaled(
        &mut self,
        bytes: &[u8],
        dims: (u32, u32),
        crops: &[CropParams],
        size: u32,
    ) -> Result<(u32, u32, u32), DecodeError> {
        let denom = [8u32, 4, 2].into_iter().find(|d| {
            crops
                .iter()
                .all(|c| c.width / d >= size && c.height / d >= size)
        });
        // At full size the image crate's decoder (zune-jpeg) is about 1.5x faster than
        // jpeg-decoder (examples/throughput.rs --decoders); jpeg-decoder is used only for
        // its reduced-size IDCT.
        if let (true, Some(denom)) = (is_jpeg(bytes), denom) {
            let mut decoder = jpeg_decoder::Decoder::new(Cursor::new(bytes));
            decoder.read_info().map_err(corrupt)?;
            let (sw, sh) = (dims.0.div_ceil(denom), dims.1.div_ceil(denom));
            let (w, h) = decoder.scale(sw as u16, sh as u16).map_err(corrupt)?;
            let pixels = decoder.decode().map_err(corrupt)?;
            // decode() succeeded, so info is present.
            let format = decoder.info().expect("info after decode").pixel_format;
            let (w, h) = (u32::from(w), u32::from(h));
            match format {
                jpeg_decoder::PixelFormat::RGB24 => self.rgb = pixels,
                jpeg_decoder::PixelFormat::L8 => {
                    self.rgb.clear();
                    self.rgb.extend(pixels.iter().flat_map(|&v| [v, v, v]));
                }
                // CMYK and 16-bit greyscale are rare: the image crate converts them.
                _ => return self.decode_full(bytes).map(|(w, h)| (w, h, 1)),
            }
            if (w, h) != (sw, sh) {
                let msg = format!("decoded {w}x{h} at 1/{denom}, expected {sw}x{sh}");
                return Err(DecodeError::Corrupt(msg));
            }
            return Ok((w, h, denom));
        }
        if is_jpeg(bytes) {
            return self.decode_jpeg(bytes).map(|(w, h)| (w, h, 1));
        }
        self.decode_full(bytes).map(|(w, h)| (w, h, 1))
    }

    /// A full-size JPEG decode by zune-jpeg from `bytes` into `self.rgb` (grown, never
    /// shrunk, so steady state allocates nothing); CMYK and other rare colour spaces go to
    /// [`CropDecoder::decode_full`].
    fn decode_jpeg(&mut self, bytes: &[u8]) -> Result<(u32, u32), DecodeError> {
        use zune_core::colorspace::ColorSpace;
        let options = zune_core::options::DecoderOptions::default()
            .set_strict_mode(false)
            .set_max_width(usize::MAX)
            .set_max_height(usize::MAX);
        let mut decoder = zune_jpeg::JpegDecoder::new_with_options(
            zune_core::bytestream::ZCursor::new(bytes),
            options,
        );
        decoder.decode_headers().map_err(corrupt)?;
        let out = match decoder.input_colorspace() {
            Some(ColorSpace::YCbCr | ColorSpace::RGB) => ColorSpace::RGB,
            Some(ColorSpace::Luma) => ColorSpace::Luma,
            _ => return self.decode_full(bytes),
        };
        decoder.set_options(options.jpeg_set_out_colorspace(out));
        let (w, h) = decoder
            .dimensions()
            .expect("dimensions after decode_headers");
        let (w, h, n) = (w as u32, h as u32, w * h);
        if self.rgb.len() < 3 * n {
            self.rgb.resize(3 * n, 0);
        }
        if out == ColorSpace::RGB {
            decoder
                .decode_into(&mut self.rgb[..3 * n])
                .map_err(corrupt)?;
        } else {
            // Greyscale: decode into the last third, then spread each value over RGB from
            // the front (writes never overtake the reads).
            decoder
                .decode_into(&mut self.rgb[2 * n..3 * n])
                .map_err(corrupt)?;
            for i in 0..n {
                let v = self.rgb[2 * n + i];
                self.rgb[3 * i..3 * i + 3].fill(v);
            }
        }
        Ok((w, h))
    }

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

    #[test]
    fn large_crops_decode_downscaled_and_match_full_decode() {
        let bytes = jpeg(1024, 768);
        assert_eq!(dimensions(&bytes).unwrap(), (1024, 768));
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

    /// The direct zune-jpeg path gives the image crate's pixels exactly, for colour and
    /// greyscale, and a smaller image after a larger one reuses the buffer correctly.
    #[test]
    fn direct_jpeg_decode_matches_the_image_crate() {
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
            let (w, h) = d.decode_jpeg(&bytes).unwrap();
            let ours = d.rgb[..(w * h * 3) as usize].to_vec();
            let theirs = image::load_from_memory(&bytes).unwrap().into_rgb8();
            assert_eq!((w, h), theirs.dimensions());
            assert!(ours == theirs.into_raw(), "{w}x{h} differs");
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

    #[test]
    fn garbage_is_an_error() {
        let mut d = CropDecoder::default();
        let crop = CropParams {
            top: 0,
            left: 0,
            height: 8,
            width: 8,
        };
        assert!(
            d.decode_crop(b"\xFF\xD8\xFFnot really", (8, 8), &crop, 8, &mut [0; 192])
                .is_err()
        );
        assert!(dimensions(b"hello").is_err());
    }
}

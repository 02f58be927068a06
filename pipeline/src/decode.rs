//! Image bytes to an RGB8 view of the crop, resized to the output size.
//!
//! JPEGs are decoded by libjpeg-turbo (the `turbojpeg` crate, built from source with its
//! SIMD code): on the generated ImageNet-like files it decodes ~15% faster than zune-jpeg
//! and ~70% faster than jpeg-decoder (`benches/jpeg_decoders.sh`). The crop is known before
//! decoding, so a JPEG is decoded at 1/2, 1/4 or 1/8 scale in the DCT domain whenever
//! every crop still has at least the output's resolution at that scale. PNG and CMYK
//! JPEGs go through the `image` crate. The crop and the resize are one pass of
//! `fast_image_resize` (bilinear with antialiasing, like torchvision's default).

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
    turbo: Option<turbojpeg::Decompressor>,
    /// Full or DCT-scaled RGB8 pixels of the last decoded image (grown, never shrunk).
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
    /// Reads the image's width and height from its header.
    pub fn dimensions(&mut self, bytes: &[u8]) -> Result<(u32, u32), DecodeError> {
        if is_jpeg(bytes) {
            let header = self.turbo()?.read_header(bytes).map_err(corrupt)?;
            return Ok((header.width as u32, header.height as u32));
        }
        image::ImageReader::new(Cursor::new(bytes))
            .with_guessed_format()
            .map_err(corrupt)?
            .into_dimensions()
            .map_err(corrupt)
    }

    fn turbo(&mut self) -> Result<&mut turbojpeg::Decompressor, DecodeError> {
        if self.turbo.is_none() {
            self.turbo = Some(turbojpeg::Decompressor::new().map_err(corrupt)?);
        }
        Ok(self.turbo.as_mut().expect("just made"))
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
        let denom = [8u32, 4, 2]
            .into_iter()
            .find(|d| {
                crops
                    .iter()
                    .all(|c| c.width / d >= size && c.height / d >= size)
            })
            .unwrap_or(1);
        if is_jpeg(bytes)
            && let Some(decoded) = self.decode_jpeg(bytes, dims, denom)?
        {
            return Ok(decoded);
        }
        self.decode_full(bytes).map(|(w, h)| (w, h, 1))
    }

    /// libjpeg-turbo's decode at 1/`denom` scale into `self.rgb` (greyscale comes out as
    /// RGB); `None` for the colour spaces it does not turn into RGB (CMYK, YCCK).
    fn decode_jpeg(
        &mut self,
        bytes: &[u8],
        dims: (u32, u32),
        denom: u32,
    ) -> Result<Option<(u32, u32, u32)>, DecodeError> {
        let turbo = self.turbo()?;
        let header = turbo.read_header(bytes).map_err(corrupt)?;
        if matches!(
            header.colorspace,
            turbojpeg::Colorspace::CMYK | turbojpeg::Colorspace::YCCK
        ) {
            return Ok(None);
        }
        let factor = turbojpeg::ScalingFactor::new(1, denom as usize);
        turbo.set_scaling_factor(factor).map_err(corrupt)?;
        let (w, h) = (factor.scale(header.width), factor.scale(header.height));
        let expected = (dims.0.div_ceil(denom), dims.1.div_ceil(denom));
        if (w as u32, h as u32) != expected {
            let msg = format!("decodes to {w}x{h} at 1/{denom}, expected {expected:?}");
            return Err(DecodeError::Corrupt(msg));
        }
        if self.rgb.len() < 3 * w * h {
            self.rgb.resize(3 * w * h, 0);
        }
        let image = turbojpeg::Image {
            pixels: &mut self.rgb[..3 * w * h],
            width: w,
            pitch: 3 * w,
            height: h,
            format: turbojpeg::PixelFormat::RGB,
        };
        self.turbo
            .as_mut()
            .expect("made above")
            .decompress(bytes, image)
            .map_err(corrupt)?;
        Ok(Some((w as u32, h as u32, denom)))
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
            let (w, h, denom) = d.decode_jpeg(&bytes, dims, 1).unwrap().unwrap();
            assert_eq!(((w, h), denom), (dims, 1));
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
        assert!(CropDecoder::default().dimensions(b"hello").is_err());
    }
}

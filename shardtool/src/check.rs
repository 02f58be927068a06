//! Deciding whether an input file is an image the pipeline can decode, and optional
//! FFCV-style re-encoding.
//!
//! The type comes from the bytes, never from the file name: ImageNet's train set holds a
//! PNG named `.JPEG`, and CMYK and greyscale JPEGs, all of which pack.

use std::cell::RefCell;

use fast_image_resize as fr;
use image::{DynamicImage, ImageFormat};
use pipeline::decode::{CropDecoder, DecodeError};
use pipeline::format::{ImageCheck, Reencode};
use pipeline::transform::CropParams;

/// Why a file was not packed. The text goes into `rejects.tsv`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Rejection {
    /// Zero bytes.
    #[error("empty file (0 bytes)")]
    Empty,
    /// Not an image at all.
    #[error("not an image (unrecognised content)")]
    NotAnImage,
    /// An image of a type the pipeline does not decode.
    #[error("unsupported image type {0:?}: convert it to JPEG")]
    Unsupported(ImageFormat),
    /// The headers do not parse.
    #[error("unreadable image header: {0}")]
    Header(String),
    /// The file ends before the image data does.
    #[error("truncated {0}: the file ends before the image data does")]
    Truncated(&'static str),
    /// Full decoding failed.
    #[error("undecodable image: {0}")]
    Decode(String),
    /// The file could not be read.
    #[error("cannot read: {0}")]
    Read(std::io::Error),
}

/// What the check found out about an accepted image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ImageInfo {
    /// `"jpeg"` or `"png"`.
    pub format: &'static str,
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
}

/// Checks `bytes` at the given level and returns the image's type and size.
pub fn check_image(bytes: &[u8], level: ImageCheck) -> Result<ImageInfo, Rejection> {
    if bytes.is_empty() {
        return Err(Rejection::Empty);
    }
    let format = image::guess_format(bytes).map_err(|_| Rejection::NotAnImage)?;
    let name = match format {
        ImageFormat::Jpeg if !jpeg_is_complete(bytes) => return Err(Rejection::Truncated("JPEG")),
        ImageFormat::Png if !png_is_complete(bytes) => return Err(Rejection::Truncated("PNG")),
        ImageFormat::Jpeg => "jpeg",
        ImageFormat::Png => "png",
        other => return Err(Rejection::Unsupported(other)),
    };
    let (width, height) = read_like_the_loader(bytes, level)?;
    if width == 0 || height == 0 {
        return Err(Rejection::Header(format!("image is {width}x{height}")));
    }
    Ok(ImageInfo {
        format: name,
        width,
        height,
    })
}

/// The image's size from the loader's own decoder (libjpeg-turbo for JPEGs, the `image`
/// crate for PNGs and CMYK JPEGs): its header read, and with [`ImageCheck::Decode`] the
/// whole image decoded. libjpeg-turbo refuses some files the `image` crate reads (a
/// Huffman table with too many codes, an unknown marker in a scan); such a file packed
/// would be skipped by the loader in every epoch.
fn read_like_the_loader(bytes: &[u8], level: ImageCheck) -> Result<(u32, u32), Rejection> {
    thread_local! {
        static DECODER: RefCell<CropDecoder> = RefCell::default();
    }
    // The decoder's message, without its "undecodable image: ", which a rejection adds.
    let text = |e: DecodeError| match e {
        DecodeError::Corrupt(message) => message,
        other => other.to_string(),
    };
    DECODER.with_borrow_mut(|decoder| {
        let dims = decoder
            .dimensions(bytes)
            .map_err(|e| Rejection::Header(text(e)))?;
        if level == ImageCheck::Decode && dims.0 > 0 && dims.1 > 0 {
            let whole = CropParams {
                left: 0,
                top: 0,
                width: dims.0,
                height: dims.1,
            };
            // At full scale: an output as large as the image's shorter side.
            decoder
                .decode(bytes, dims, &[whole], dims.0.min(dims.1))
                .map_err(|e| Rejection::Decode(text(e)))?;
        }
        Ok(dims)
    })
}

/// A JPEG is complete when an end-of-image marker (FF D9) follows its first scan.
///
/// Inside entropy-coded data every FF byte is followed by 00 or a restart marker, so an
/// FF D9 after the first start-of-scan can only be the end of the image; an FF D9 earlier
/// may belong to an embedded EXIF thumbnail and does not count.
fn jpeg_is_complete(bytes: &[u8]) -> bool {
    let Some(scan) = first_scan_offset(bytes) else {
        return false;
    };
    bytes[scan..].windows(2).rev().any(|w| w == [0xFF, 0xD9])
}

/// Offset of the first start-of-scan (FF DA) marker, walking the marker segments.
fn first_scan_offset(bytes: &[u8]) -> Option<usize> {
    if !bytes.starts_with(&[0xFF, 0xD8]) {
        return None;
    }
    let mut i = 2;
    loop {
        while bytes.get(i) == Some(&0xFF) && bytes.get(i + 1) == Some(&0xFF) {
            i += 1; // fill bytes
        }
        if *bytes.get(i)? != 0xFF {
            return None;
        }
        match *bytes.get(i + 1)? {
            0xDA => return Some(i),
            0x01 | 0xD0..=0xD8 => i += 2, // markers without a length
            _ => {
                let len = u16::from_be_bytes([*bytes.get(i + 2)?, *bytes.get(i + 3)?]) as usize;
                i += 2 + len;
            }
        }
    }
}

/// A PNG is complete when it has an `IEND` chunk.
fn png_is_complete(bytes: &[u8]) -> bool {
    bytes.windows(4).rev().take(64).any(|w| w == b"IEND")
}

/// Decodes `bytes`, shrinks the image so its longer side is at most `max_side` (never
/// enlarges), and encodes it as an RGB JPEG at the given quality.
pub fn reencode(bytes: &[u8], params: Reencode) -> Result<(Vec<u8>, ImageInfo), Rejection> {
    let image = image::load_from_memory(bytes).map_err(|e| Rejection::Decode(e.to_string()))?;
    let rgb = DynamicImage::ImageRgb8(image.to_rgb8());
    let (w, h) = (rgb.width(), rgb.height());
    let longer = w.max(h);
    let rgb = if longer > params.max_side {
        let scale = f64::from(params.max_side) / f64::from(longer);
        let nw = ((f64::from(w) * scale).round() as u32).max(1);
        let nh = ((f64::from(h) * scale).round() as u32).max(1);
        let mut dst = DynamicImage::new_rgb8(nw, nh);
        let options = fr::ResizeOptions::new()
            .resize_alg(fr::ResizeAlg::Convolution(fr::FilterType::Lanczos3));
        fr::Resizer::new()
            .resize(&rgb, &mut dst, &options)
            .map_err(|e| Rejection::Decode(format!("resize failed: {e}")))?;
        dst
    } else {
        rgb
    };
    let out = encode_jpeg(&rgb, params.quality)
        .map_err(|e| Rejection::Decode(format!("JPEG encoding failed: {e}")))?;
    let info = ImageInfo {
        format: "jpeg",
        width: rgb.width(),
        height: rgb.height(),
    };
    Ok((out, info))
}

/// Encodes `img` as libjpeg does by default, which is how ImageNet's photos and Pillow's
/// JPEGs are written: 4:2:0 chroma subsampling by box average (greyscale stays one
/// channel), the standard quantisation and Huffman tables scaled to `quality`. Other
/// colour types are converted to RGB first.
pub fn encode_jpeg(img: &DynamicImage, quality: u8) -> Result<Vec<u8>, String> {
    let (width, height) = (img.width(), img.height());
    let (Ok(w), Ok(h)) = (u16::try_from(width), u16::try_from(height)) else {
        return Err(format!(
            "{width}x{height} is larger than a JPEG can hold (65,535 px a side)"
        ));
    };
    let mut out = Vec::new();
    let mut encoder = jpeg_encoder::Encoder::new(&mut out, quality);
    encoder.set_sampling_factor(jpeg_encoder::SamplingFactor::F_2_2);
    encoder.set_chroma_subsampling_method(jpeg_encoder::ChromaSubsamplingMethod::Average);
    let encoded = match img {
        DynamicImage::ImageLuma8(grey) => {
            encoder.encode(grey.as_raw(), w, h, jpeg_encoder::ColorType::Luma)
        }
        DynamicImage::ImageRgb8(rgb) => {
            encoder.encode(rgb.as_raw(), w, h, jpeg_encoder::ColorType::Rgb)
        }
        other => encoder.encode(other.to_rgb8().as_raw(), w, h, jpeg_encoder::ColorType::Rgb),
    };
    encoded.map_err(|e| e.to_string())?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jpeg(w: u32, h: u32) -> Vec<u8> {
        let img = DynamicImage::new_rgb8(w, h);
        let mut out = Vec::new();
        img.write_with_encoder(image::codecs::jpeg::JpegEncoder::new_with_quality(
            &mut out, 90,
        ))
        .unwrap();
        out
    }

    #[test]
    fn accepts_jpeg_and_finds_its_size() {
        for level in [ImageCheck::Header, ImageCheck::Decode] {
            let info = check_image(&jpeg(40, 30), level).unwrap();
            assert_eq!((info.format, info.width, info.height), ("jpeg", 40, 30));
        }
    }

    #[test]
    fn rejects_truncated_empty_and_non_images() {
        let full = jpeg(64, 64);
        let cut = &full[..full.len() - 40];
        assert!(matches!(
            check_image(cut, ImageCheck::Header),
            Err(Rejection::Truncated(_))
        ));
        assert!(matches!(
            check_image(&[], ImageCheck::Header),
            Err(Rejection::Empty)
        ));
        assert!(matches!(
            check_image(b"hello, world", ImageCheck::Header),
            Err(Rejection::NotAnImage)
        ));
    }

    /// Images the `image` crate reads but the loader's decoder (libjpeg-turbo) refuses are
    /// rejected: a Huffman table with too many codes (at the header level) and a byte pair
    /// in the scan that libjpeg takes for an unknown marker (when decoding).
    #[test]
    fn rejects_what_the_loaders_decoder_refuses() {
        let good = jpeg(64, 64);
        let mut bogus_table = good.clone();
        let dht = good.windows(2).position(|w| w == [0xFF, 0xC4]).unwrap();
        bogus_table[dht + 5..dht + 21].fill(0xFF);
        for level in [ImageCheck::Header, ImageCheck::Decode] {
            let e = check_image(&bogus_table, level).unwrap_err().to_string();
            assert!(e.contains("Huffman"), "{level:?}: {e}");
        }
        let mut stray_marker = good.clone();
        let sos = good.windows(2).position(|w| w == [0xFF, 0xDA]).unwrap();
        let data = sos + 2 + usize::from(u16::from_be_bytes([good[sos + 2], good[sos + 3]]));
        stray_marker[data + 40..data + 42].copy_from_slice(&[0xFF, 0x5B]);
        check_image(&stray_marker, ImageCheck::Header).unwrap();
        let e = check_image(&stray_marker, ImageCheck::Decode)
            .unwrap_err()
            .to_string();
        assert!(e.contains("marker"), "{e}");
    }

    /// The (H, V) sampling factors of each component, from the baseline frame header.
    fn sampling(jpeg: &[u8]) -> Vec<u8> {
        let sof = jpeg.windows(2).position(|w| w == [0xFF, 0xC0]).unwrap();
        let count = usize::from(jpeg[sof + 9]);
        (0..count).map(|c| jpeg[sof + 11 + 3 * c]).collect()
    }

    #[test]
    fn encodes_colour_at_4_2_0_and_grey_as_one_channel() {
        let rgb = DynamicImage::ImageRgb8(image::RgbImage::from_fn(33, 17, |x, y| {
            image::Rgb([x as u8 * 7, y as u8 * 13, 200])
        }));
        let colour = encode_jpeg(&rgb, 95).unwrap();
        assert_eq!(sampling(&colour), [0x22, 0x11, 0x11]);
        let grey = encode_jpeg(&DynamicImage::ImageLuma8(rgb.to_luma8()), 95).unwrap();
        assert_eq!(sampling(&grey), [0x11]);
        for bytes in [colour, grey] {
            let info = check_image(&bytes, ImageCheck::Decode).unwrap();
            assert_eq!((info.width, info.height), (33, 17));
        }
        let huge = DynamicImage::new_luma8(70_000, 1);
        assert!(encode_jpeg(&huge, 90).unwrap_err().contains("65,535"));
    }

    #[test]
    fn reencode_shrinks_the_longer_side_only() {
        let params = Reencode {
            max_side: 32,
            quality: 80,
        };
        let (bytes, info) = reencode(&jpeg(64, 40), params).unwrap();
        assert_eq!((info.width, info.height), (32, 20));
        assert_eq!(check_image(&bytes, ImageCheck::Decode).unwrap(), info);
        let (_, small) = reencode(&jpeg(20, 10), params).unwrap();
        assert_eq!((small.width, small.height), (20, 10));
    }
}

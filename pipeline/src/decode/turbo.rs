//! libjpeg-turbo's TurboJPEG 3 API: the few calls the decoder makes, behind a safe type.
//!
//! The `turbojpeg` crate wraps the same library but not partial decoding
//! (`tj3SetCroppingRegion`), which skips the inverse DCT and colour conversion outside the
//! crop and all work below it; so this wraps `turbojpeg-sys` directly.

use std::ffi::CStr;

use turbojpeg_sys as tj;

/// What a JPEG's header says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Header {
    pub width: u32,
    pub height: u32,
    /// Width in pixels of an iMCU, the unit a partial decode's left edge is aligned to;
    /// `None` where libjpeg-turbo decodes only whole images (lossless JPEGs, unusual
    /// chroma subsampling).
    pub mcu_width: Option<u32>,
    /// CMYK and YCCK images, which libjpeg-turbo does not turn into RGB.
    pub cmyk: bool,
    /// An 8-bit sequential, Huffman-coded YCbCr (4:4:4, 4:2:2, 4:2:0 or 4:4:0) or greyscale
    /// image: what nvJPEG's hardware decoder takes (no progressive, arithmetic-coded,
    /// lossless, CMYK, RGB, 4:1:1 or 4:4:1 images).
    pub hardware_decodable: bool,
}

/// A rectangle of the image at the decode's scale, in pixels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Region {
    pub left: u32,
    pub top: u32,
    pub width: u32,
    pub height: u32,
}

/// Whether a frame header (an SOFn marker) and then a scan (SOS) follow the SOI marker
/// before the end of the image or of `bytes`. Walks the marker segments by their lengths,
/// stepping over fill bytes and bytes between segments as libjpeg does (with a warning).
fn reaches_a_scan(bytes: &[u8]) -> bool {
    let mut frame = false;
    let mut at = 2; // past SOI
    while let Some(&[byte, marker, hi, lo]) = bytes.get(at..at + 4) {
        match (byte, marker) {
            (0xFF, 0xDA) => return frame,                      // SOS
            (0xFF, 0xD9) => return false,                      // EOI
            (0xFF, 0x01 | 0xD0..=0xD7) => at += 2,             // TEM, RSTn: no length
            (0xFF, 0x00 | 0xFF) | (0x00..=0xFE, _) => at += 1, // not a marker
            (0xFF, _) => {
                // SOF0..SOF15, less DHT (C4), JPG (C8) and DAC (CC).
                frame |= (0xC0..=0xCF).contains(&marker) && !matches!(marker, 0xC4 | 0xC8 | 0xCC);
                at += 2 + usize::from(u16::from_be_bytes([hi, lo]));
            }
        }
    }
    false
}

/// Whether an EOI marker follows the last SOS marker. Entropy-coded data holds neither
/// (a 0xFF there is followed by 0x00 or a restart marker), so a file cut short in its
/// scans has no EOI after its last SOS. Most files end with their EOI, which is checked
/// first; others have bytes after it.
fn ends_its_last_scan(bytes: &[u8]) -> bool {
    let last = |marker: u8| bytes.windows(2).rposition(|w| w == [0xFF, marker]);
    bytes.ends_with(&[0xFF, 0xD9])
        || matches!((last(0xD9), last(0xDA)), (Some(eoi), Some(sos)) if eoi > sos)
}

/// libjpeg's warnings (jerror.h's `JWRN_` messages, up to their first parameter); no
/// fatal error's message starts like one.
const WARNINGS: [&str; 7] = [
    "Corrupt JPEG data:",
    "Premature end of JPEG file",
    "Invalid SOS parameters for sequential JPEG",
    "Inconsistent progression sequence",
    "Unknown Adobe color transform code",
    "Warning: unknown JFIF revision",
    "Application transferred too many scanlines",
];

/// One TurboJPEG decompressor (not shared between threads, may move between them).
pub(crate) struct Jpeg {
    handle: tj::tjhandle,
}

// SAFETY: a TurboJPEG handle is used by one thread at a time (`&mut self`), and
// libjpeg-turbo keeps no thread-local state for it.
unsafe impl Send for Jpeg {}

impl Drop for Jpeg {
    fn drop(&mut self) {
        // SAFETY: the handle came from tj3Init and is destroyed once.
        unsafe { tj::tj3Destroy(self.handle) }
    }
}

/// `ceil(pixels / denom)`: a dimension at 1/`denom` scale (libjpeg-turbo's TJSCALED).
pub(crate) fn scaled(pixels: u32, denom: u32) -> u32 {
    pixels.div_ceil(denom)
}

impl Jpeg {
    pub fn new() -> Result<Jpeg, String> {
        // SAFETY: plain constructor; null means failure.
        let handle = unsafe { tj::tj3Init(tj::TJINIT_TJINIT_DECOMPRESS as i32) };
        if handle.is_null() {
            return Err("libjpeg-turbo could not make a decompressor".into());
        }
        Ok(Jpeg { handle })
    }

    fn error(&self) -> String {
        // SAFETY: tj3GetErrorStr returns a NUL-terminated string owned by the handle.
        unsafe { CStr::from_ptr(tj::tj3GetErrorStr(self.handle)) }
            .to_string_lossy()
            .into_owned()
    }

    /// A call's status as a result: libjpeg's warning, if it gave one, or its error.
    /// Warnings (extraneous bytes before a marker, and the like, which real photo
    /// collections hold and Pillow ignores) are no error; files cut short, which libjpeg
    /// also only warns about, never get this far.
    fn check(&self, status: i32) -> Result<Option<String>, String> {
        if status == 0 {
            return Ok(None);
        }
        // TurboJPEG says "warning" after a warning even when a fatal error followed it;
        // the message tells, as libjpeg writes the first warning's and every fatal one's.
        // SAFETY: reading the error state of a live handle.
        let code = unsafe { tj::tj3GetErrorCode(self.handle) };
        let message = self.error();
        if code == tj::TJERR_TJERR_WARNING as i32 && WARNINGS.iter().any(|w| message.starts_with(w))
        {
            Ok(Some(message))
        } else {
            Err(message)
        }
    }

    /// Reads the header of `bytes`.
    pub fn header(&mut self, bytes: &[u8]) -> Result<Header, String> {
        // libjpeg-turbo reads a datastream that ends before its first scan (tables only,
        // or cut short) as a success and leaves the previous image's header in the
        // handle, so that case is caught here.
        if !reaches_a_scan(bytes) {
            return Err("no frame header and scan: the JPEG holds no image or is cut short".into());
        }
        // SAFETY: the pointer and length describe `bytes`, which outlives the call.
        let status =
            unsafe { tj::tj3DecompressHeader(self.handle, bytes.as_ptr(), bytes.len() as _) };
        // A warning here comes again from the decode, which reads the header again.
        self.check(status)?;
        // SAFETY: reading parameters of a live handle.
        let get = |param| unsafe { tj::tj3Get(self.handle, param as i32) };
        // turbojpeg.h's tjMCUWidth (a static table, not an exported symbol), indexed by
        // TJSAMP: 4:4:4, 4:2:2, 4:2:0, grey, 4:4:0, 4:1:1, 4:4:1.
        const MCU_WIDTH: [u32; 7] = [8, 16, 16, 8, 8, 32, 8];
        let lossless = get(tj::TJPARAM_TJPARAM_LOSSLESS) != 0;
        let mcu_width = usize::try_from(get(tj::TJPARAM_TJPARAM_SUBSAMP))
            .ok()
            .and_then(|s| MCU_WIDTH.get(s).copied())
            .filter(|_| !lossless);
        let colorspace = get(tj::TJPARAM_TJPARAM_COLORSPACE);
        let (width, height) = (
            get(tj::TJPARAM_TJPARAM_JPEGWIDTH),
            get(tj::TJPARAM_TJPARAM_JPEGHEIGHT),
        );
        if width < 1 || height < 1 {
            return Err(format!("the header says {width}x{height}"));
        }
        let subsampling = get(tj::TJPARAM_TJPARAM_SUBSAMP);
        // A file cut short takes the CPU's decode too, which refuses it (the sample is
        // skipped), as it is without `device_decode`.
        let hardware_decodable = !lossless
            && ends_its_last_scan(bytes)
            && get(tj::TJPARAM_TJPARAM_PRECISION) == 8
            && get(tj::TJPARAM_TJPARAM_PROGRESSIVE) == 0
            && get(tj::TJPARAM_TJPARAM_ARITHMETIC) == 0
            && match colorspace {
                c if c == tj::TJCS_TJCS_GRAY as i32 => true,
                c if c == tj::TJCS_TJCS_YCbCr as i32 => [
                    tj::TJSAMP_TJSAMP_444,
                    tj::TJSAMP_TJSAMP_422,
                    tj::TJSAMP_TJSAMP_420,
                    tj::TJSAMP_TJSAMP_440,
                ]
                .contains(&subsampling),
                _ => false,
            };
        Ok(Header {
            width: width as u32,
            height: height as u32,
            mcu_width,
            cmyk: colorspace == tj::TJCS_TJCS_CMYK as i32
                || colorspace == tj::TJCS_TJCS_YCCK as i32,
            hardware_decodable,
        })
    }

    /// Decodes `region` of `bytes` at 1/`denom` scale (1, 2, 4 or 8) into `out` as
    /// interleaved RGB8, `region.width * 3` bytes per row. The region is in scaled
    /// pixels; unless it is the whole image, its left edge must be a multiple of the
    /// scaled iMCU width (`scaled(header.mcu_width, denom)`). `header` is what this
    /// decompressor's last [`Jpeg::header`] call read, of these `bytes`: libjpeg-turbo
    /// wants the header read before it takes a cropping region. Returns libjpeg's
    /// warning, if it gave one (about the header, which it reads again, or the data).
    pub fn decode_rgb(
        &mut self,
        bytes: &[u8],
        header: &Header,
        denom: u32,
        region: Region,
        out: &mut [u8],
    ) -> Result<Option<String>, String> {
        // A partial decode of a file cut short succeeds where the region is all there;
        // refused every time instead, as Pillow does, a sample is in every epoch or none.
        if !ends_its_last_scan(bytes) {
            return Err("the JPEG is cut short: no end-of-image marker after its last scan".into());
        }
        let (width, height) = (scaled(header.width, denom), scaled(header.height, denom));
        let Region {
            left,
            top,
            width: w,
            height: h,
        } = region;
        if w == 0 || h == 0 || left + w > width || top + h > height {
            return Err(format!(
                "region {region:?} is not inside the {width}x{height} image at 1/{denom}"
            ));
        }
        let pitch = 3 * w as usize;
        if out.len() < pitch * h as usize {
            return Err(format!(
                "{} bytes cannot hold a {w}x{h} RGB image",
                out.len()
            ));
        }
        let factor = tj::tjscalingfactor {
            num: 1,
            denom: denom as i32,
        };
        // The full image is decoded without a cropping region, which is also the only
        // region libjpeg-turbo accepts for some images (lossless, for one).
        let crop = if (left, top, w, h) == (0, 0, width, height) {
            tj::tjregion {
                x: 0,
                y: 0,
                w: 0,
                h: 0,
            }
        } else {
            tj::tjregion {
                x: left as i32,
                y: top as i32,
                w: w as i32,
                h: h as i32,
            }
        };
        // SAFETY: the handle has read this image's header (the caller's `header`, required
        // before a cropping region); `out` holds `pitch * h` bytes, checked above.
        let status = unsafe {
            let status = tj::tj3SetScalingFactor(self.handle, factor);
            if status != 0 {
                status
            } else if tj::tj3SetCroppingRegion(self.handle, crop) != 0 {
                -1
            } else {
                tj::tj3Decompress8(
                    self.handle,
                    bytes.as_ptr(),
                    bytes.len() as _,
                    out.as_mut_ptr(),
                    pitch as i32,
                    tj::TJPF_TJPF_RGB,
                )
            }
        };
        self.check(status)
    }
}

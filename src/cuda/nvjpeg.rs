//! JPEG decoding on the GPU for batches the loader left encoded (`[data] device_decode`):
//! nvJPEG's hardware backend (the JPEG engines of A100, H100 and H200) decodes the batch's
//! JPEGs at full size into planar RGB, and `crop_resize_u8` (kernels.cu) cuts each crop out,
//! resizes it and mirrors it into its slot of the uint8 batch, all on the stream the
//! batch is copied on. Images nvJPEG's hardware does not take, or a batch it fails, are
//! decoded on the CPU by the loader's own decoder instead, with a warning.
//!
//! nvJPEG is loaded at run time (`libnvjpeg.so.13`, from the CUDA toolkit or PyPI's
//! `nvidia-nvjpeg`), only by runs that ask for it; the build needs none of it.

use std::ffi::c_void;
use std::sync::Arc;

use candle_core::cuda_backend::WrapErr;
use candle_core::cuda_backend::cudarc::driver::sys::CUdeviceptr;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaStream, DevicePtrMut, LaunchConfig, PushKernelArg, result,
};
use candle_core::{CudaDevice, Result, bail};
use pipeline::Encoded;
use pipeline::decode::CropDecoder;

use super::func;

type Handle = *mut c_void;
type State = *mut c_void;
type JpegStream = *mut c_void;

/// nvjpeg.h's `nvjpegImage_t`: up to 4 planes with their pitches.
#[repr(C)]
struct Image {
    channel: [*mut u8; 4],
    pitch: [usize; 4],
}

/// kernels.cu's `CropJob`.
#[repr(C)]
#[derive(Clone, Copy)]
struct CropJob {
    src: u64,
    width: i32,
    height: i32,
    left: i32,
    top: i32,
    crop_width: i32,
    crop_height: i32,
    flip: i32,
    slot: i32,
}

const BACKEND_HARDWARE: i32 = 3;
const OUTPUT_RGB: i32 = 3;
const LIBRARIES: [&str; 2] = ["libnvjpeg.so.13", "libnvjpeg.so"];

/// The calls made, resolved from the library.
struct Api {
    create_ex: unsafe extern "C" fn(i32, *mut c_void, *mut c_void, u32, *mut Handle) -> i32,
    destroy: unsafe extern "C" fn(Handle) -> i32,
    state_create: unsafe extern "C" fn(Handle, *mut State) -> i32,
    state_destroy: unsafe extern "C" fn(State) -> i32,
    stream_create: unsafe extern "C" fn(Handle, *mut JpegStream) -> i32,
    stream_destroy: unsafe extern "C" fn(JpegStream) -> i32,
    parse_header: unsafe extern "C" fn(Handle, *const u8, usize, JpegStream) -> i32,
    batched_supported: unsafe extern "C" fn(Handle, JpegStream, *mut i32) -> i32,
    batched_initialize: unsafe extern "C" fn(Handle, State, i32, i32, i32) -> i32,
    decode_batched: unsafe extern "C" fn(
        Handle,
        State,
        *const *const u8,
        *const usize,
        *mut Image,
        *mut c_void,
    ) -> i32,
    /// Kept loaded while the pointers above are used.
    _library: libloading::Library,
}

impl Api {
    fn load() -> Result<Api> {
        let library = LIBRARIES
            .iter()
            // SAFETY: loading nvJPEG runs no initialisation code with preconditions.
            .find_map(|&name| unsafe { libloading::Library::new(name) }.ok())
            .ok_or_else(|| {
                candle_core::Error::Msg(
                    "nvJPEG (libnvjpeg.so.13) is not on the library path: install \
                     the CUDA toolkit's nvJPEG or `pip install nvidia-nvjpeg==13.0.*` and add its \
                     nvidia/cu13/lib folder to LD_LIBRARY_PATH"
                        .into(),
                )
            })?;
        // SAFETY: each symbol is declared above with nvjpeg.h's signature of that name.
        unsafe {
            macro_rules! sym {
                ($name:literal) => {
                    *library
                        .get($name)
                        .map_err(|e| candle_core::Error::Msg(format!("nvJPEG: {e}")))?
                };
            }
            Ok(Api {
                create_ex: sym!(b"nvjpegCreateEx"),
                destroy: sym!(b"nvjpegDestroy"),
                state_create: sym!(b"nvjpegJpegStateCreate"),
                state_destroy: sym!(b"nvjpegJpegStateDestroy"),
                stream_create: sym!(b"nvjpegJpegStreamCreate"),
                stream_destroy: sym!(b"nvjpegJpegStreamDestroy"),
                parse_header: sym!(b"nvjpegJpegStreamParseHeader"),
                batched_supported: sym!(b"nvjpegDecodeBatchedSupported"),
                batched_initialize: sym!(b"nvjpegDecodeBatchedInitialize"),
                decode_batched: sym!(b"nvjpegDecodeBatched"),
                _library: library,
            })
        }
    }
}

fn check(call: &str, status: i32) -> Result<()> {
    // nvjpeg.h's nvjpegStatus_t, from 0.
    const NAMES: [&str; 11] = [
        "success",
        "not initialized",
        "invalid parameter",
        "bad JPEG",
        "JPEG not supported",
        "allocator failure",
        "execution failed",
        "architecture mismatch",
        "internal error",
        "implementation not supported",
        "incomplete bitstream",
    ];
    if status == 0 {
        return Ok(());
    }
    let name = usize::try_from(status).ok().and_then(|s| NAMES.get(s));
    bail!(
        "nvJPEG: {call} failed: {} ({status})",
        name.unwrap_or(&"unknown")
    )
}

/// What one batch's decode did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Decoded {
    /// Images nvJPEG's hardware decoded.
    pub on_gpu: usize,
    /// Images decoded on the CPU instead (not taken by the hardware, or a failed batch).
    pub on_cpu: usize,
    /// Images that decoded nowhere: their slots are black (logged with their keys).
    pub failed: usize,
}

/// An nvJPEG hardware decoder with its buffers; one per device, used from one thread.
pub struct DeviceDecoder {
    api: Api,
    handle: Handle,
    state: State,
    stream: JpegStream,
    /// The batch size nvJPEG was last initialised for.
    batch: Option<usize>,
    /// The decoded images' planes, grown to the largest batch.
    planes: Option<CudaSlice<u8>>,
    /// The last batched call's arrays (bitstream pointers, lengths, destinations), kept
    /// until the next one in case nvJPEG reads them after the call returns.
    arrays: (Vec<*const u8>, Vec<usize>, Vec<Image>),
    dev: CudaDevice,
    cpu: CropDecoder,
}

// SAFETY: nvJPEG's handle, state and stream are used by one thread at a time (`&mut self`).
unsafe impl Send for DeviceDecoder {}

impl Drop for DeviceDecoder {
    fn drop(&mut self) {
        // SAFETY: each was made once, by `new`, and is destroyed once.
        unsafe {
            (self.api.stream_destroy)(self.stream);
            (self.api.state_destroy)(self.state);
            (self.api.destroy)(self.handle);
        }
    }
}

impl DeviceDecoder {
    /// Loads nvJPEG and makes a hardware decoder; an error says why there is none (no
    /// library, or a GPU without JPEG engines).
    pub fn new(dev: &CudaDevice) -> Result<DeviceDecoder> {
        let api = Api::load()?;
        let (mut handle, mut state, mut stream) = (
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
        );
        // SAFETY: out-pointers to locals; null allocators select nvJPEG's own.
        unsafe {
            let null = std::ptr::null_mut();
            check(
                "nvjpegCreateEx (hardware backend: this GPU may have no JPEG engine)",
                (api.create_ex)(BACKEND_HARDWARE, null, null, 0, &mut handle),
            )?;
            let made = check(
                "nvjpegJpegStateCreate",
                (api.state_create)(handle, &mut state),
            )
            .and_then(|()| {
                check(
                    "nvjpegJpegStreamCreate",
                    (api.stream_create)(handle, &mut stream),
                )
            });
            if let Err(e) = made {
                if !state.is_null() {
                    (api.state_destroy)(state);
                }
                (api.destroy)(handle);
                return Err(e);
            }
        }
        Ok(DeviceDecoder {
            api,
            handle,
            state,
            stream,
            batch: None,
            planes: None,
            arrays: (Vec::new(), Vec::new(), Vec::new()),
            dev: dev.clone(),
            cpu: CropDecoder::default(),
        })
    }

    /// Whether nvJPEG's batched hardware decode takes `jpeg`.
    fn takes(&mut self, jpeg: &[u8]) -> bool {
        let mut supported = 1;
        // SAFETY: `jpeg` outlives the calls; the stream handle is ours.
        let parsed = unsafe {
            (self.api.parse_header)(self.handle, jpeg.as_ptr(), jpeg.len(), self.stream) == 0
                && (self.api.batched_supported)(self.handle, self.stream, &mut supported) == 0
        };
        parsed && supported == 0 // 0 means supported
    }

    /// Decodes `encoded` into their slots of `out`, the address of the uint8 `(B, 3, size,
    /// size)` batch on the device, in `stream`'s order. `keys` names the batch's samples
    /// for the log. The JPEG bytes must stay as they are, and `out` allocated, until
    /// `stream` has passed this point.
    pub fn decode(
        &mut self,
        stream: &Arc<CudaStream>,
        encoded: &[Encoded],
        keys: &[String],
        size: u32,
        out: CUdeviceptr,
    ) -> Result<Decoded> {
        let (gpu, cpu): (Vec<&Encoded>, Vec<&Encoded>) =
            encoded.iter().partition(|e| self.takes(&e.jpeg));
        let mut done = Decoded::default();
        let mut fallback = cpu;
        if !gpu.is_empty() {
            match self.decode_on_gpu(stream, &gpu, size, out) {
                Ok(()) => done.on_gpu = gpu.len(),
                Err(e) => {
                    tracing::warn!("{e}: the batch's {} JPEGs decode on the CPU", gpu.len());
                    self.batch = None; // initialise again
                    fallback.extend(gpu);
                }
            }
        }
        let n = 3 * (size as usize).pow(2);
        let (mut hwc, mut chw) = (vec![0u8; n], vec![0u8; n]);
        for e in fallback {
            if let Err(err) = e.decode(&mut self.cpu, size, &mut hwc, &mut chw) {
                tracing::error!("sample {}: {err}; left black", keys[e.slot]);
                chw.fill(0);
                done.failed += 1;
            } else {
                done.on_cpu += 1;
            }
            // From pageable memory: `chw` may be reused once the call returns.
            // SAFETY: the slot lies inside the batch at `out` (the caller's promise).
            unsafe {
                result::memcpy_htod_async(out + (e.slot * n) as u64, &chw, stream.cu_stream())
            }
            .w()?;
        }
        Ok(done)
    }

    fn decode_on_gpu(
        &mut self,
        stream: &Arc<CudaStream>,
        jpegs: &[&Encoded],
        size: u32,
        out: CUdeviceptr,
    ) -> Result<()> {
        let plane_bytes: Vec<usize> = jpegs
            .iter()
            .map(|e| e.dims.0 as usize * e.dims.1 as usize)
            .collect();
        let total: usize = plane_bytes.iter().map(|p| 3 * p).sum();
        if self.planes.as_ref().is_none_or(|p| p.len() < total) {
            // Freed (the old buffer) and made in `stream`'s order.
            self.planes = None;
            self.planes = Some(unsafe { stream.alloc::<u8>(total) }.w()?);
        }
        let planes = self.planes.as_mut().expect("made above");
        let (base, _guard) = planes.device_ptr_mut(stream);
        let mut images = Vec::with_capacity(jpegs.len());
        let mut jobs = Vec::with_capacity(jpegs.len());
        let mut at = base;
        for (e, &plane) in jpegs.iter().zip(&plane_bytes) {
            let channel = |c: u64| (at + c * plane as u64) as *mut u8;
            images.push(Image {
                channel: [channel(0), channel(1), channel(2), std::ptr::null_mut()],
                pitch: [e.dims.0 as usize, e.dims.0 as usize, e.dims.0 as usize, 0],
            });
            jobs.push(CropJob {
                src: at,
                width: e.dims.0 as i32,
                height: e.dims.1 as i32,
                left: e.crop.left as i32,
                top: e.crop.top as i32,
                crop_width: e.crop.width as i32,
                crop_height: e.crop.height as i32,
                flip: i32::from(e.flip),
                slot: e.slot as i32,
            });
            at += 3 * plane as u64;
        }
        let data: Vec<*const u8> = jpegs.iter().map(|e| e.jpeg.as_ptr()).collect();
        let lengths: Vec<usize> = jpegs.iter().map(|e| e.jpeg.len()).collect();
        self.arrays = (data, lengths, images);
        let (data, lengths, images) = &mut self.arrays;
        // SAFETY: the arrays hold one entry per image and outlive the calls; every plane
        // lies inside `planes` (sized above); the JPEG bytes outlive the stream's use of
        // them (the caller's promise); the stream belongs to this context.
        unsafe {
            if self.batch != Some(jpegs.len()) {
                check(
                    "nvjpegDecodeBatchedInitialize",
                    (self.api.batched_initialize)(
                        self.handle,
                        self.state,
                        jpegs.len() as i32,
                        1,
                        OUTPUT_RGB,
                    ),
                )?;
                self.batch = Some(jpegs.len());
            }
            check(
                "nvjpegDecodeBatched",
                (self.api.decode_batched)(
                    self.handle,
                    self.state,
                    data.as_ptr(),
                    lengths.as_ptr(),
                    images.as_mut_ptr(),
                    stream.cu_stream() as *mut c_void,
                ),
            )?;
        }
        let bytes: &[u8] = unsafe {
            // SAFETY: CropJob is plain old data (repr(C), no padding: 8 + 8 x 4 bytes).
            std::slice::from_raw_parts(
                jobs.as_ptr().cast::<u8>(),
                jobs.len() * size_of::<CropJob>(),
            )
        };
        let table = stream.clone_htod(bytes).w()?;
        let f = func(&self.dev, "crop_resize_u8")?;
        let size_i = size as i32;
        let mut b = stream.launch_builder(&f);
        b.arg(&table).arg(&out).arg(&size_i);
        let cfg = LaunchConfig {
            grid_dim: ((size * size).div_ceil(256).min(64), jobs.len() as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        unsafe { b.launch(cfg) }.w()?;
        Ok(())
    }
}

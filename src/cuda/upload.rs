//! Batches copied to the GPU on a stream of their own, so that the copy of the next batch
//! runs while the current step computes (from pinned host memory the copy is a DMA that
//! needs no SM). On the compute stream the copy took its whole time at the start of every
//! step: 38.5 MB of uint8 pixels for ViT-S/16 at batch 256.
//!
//! The order, with cudarc's per-buffer event tracking off (`crate::device`):
//! 1. the device buffer is allocated on the compute stream, and the copy stream waits for
//!    that point of the compute stream (stream-ordered allocation may hand out memory that
//!    work queued earlier there still uses);
//! 2. the copy runs on the copy stream and records an event;
//! 3. [`Upload::ready`] makes the compute stream wait for that event, at the point where
//!    the step that reads the images is queued, not before, so earlier work is not held up.
//!
//! JPEGs left encoded (`[data] device_decode`) are decoded after the copy, on the copy
//! stream, by a thread of their own: nvJPEG's calls for a batch of 256 held the trainer's
//! thread 15.6 ms per step on an H200 (a step fed that way ran at 3,205 images/s against
//! 3,837 from the CPU's decode, benches/results/2026-11-28-h200-b/2-885a007), time in which
//! it queues the step instead (3,643 images/s, 3-bd349e7 there). [`Upload::ready`] joins
//! that thread first.
//!
//! The buffer belongs to the compute stream, so it is freed in that stream's order, after
//! the step that read it. The host bytes must not change until that step has finished; the
//! trainer reads each step's loss back before the pipeline may reuse a batch buffer.

use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use candle_core::cuda_backend::WrapErr;
use candle_core::cuda_backend::cudarc::driver::sys::{CUdeviceptr, CUevent_flags};
use candle_core::cuda_backend::cudarc::driver::{CudaEvent, CudaStream, DevicePtr};
use candle_core::op::BackpropOp;
use candle_core::{CudaDevice, CudaStorage, Result, Shape, Storage, Tensor};
use pipeline::Encoded;

use super::nvjpeg::{Decoded, DeviceDecoder};

/// Events that only order work (cheaper than timed ones).
const NO_TIMING: Option<CUevent_flags> = Some(CUevent_flags::CU_EVENT_DISABLE_TIMING);

/// The copy stream of one device, and its JPEG decoder for batches left encoded.
pub struct Uploader {
    dev: CudaDevice,
    copy: Arc<CudaStream>,
    /// Made by the first batch with JPEGs to decode, with the counts so far.
    decoder: Arc<Mutex<(Option<DeviceDecoder>, Decoded)>>,
}

/// JPEGs of a batch to decode on the GPU after its copy: the batch's images left encoded,
/// the byte ranges of the others (the only ones copied), its keys (for the log) and its
/// output side.
pub struct ToDecode<'a> {
    /// The byte ranges of the images that are not left encoded.
    pub decoded: &'a [Range<usize>],
    /// The images left encoded.
    pub encoded: &'a [Encoded],
    /// The batch's sample keys.
    pub keys: &'a [String],
    /// The output side in pixels.
    pub size: u32,
}

/// A copy on its way: the images [`Uploader::start`] returned are not to be read before
/// [`Upload::ready`]. Dropped unused (a run that stops with the next batch uploaded), it
/// waits for the copy (and decode) to finish, so that neither the images' device buffer
/// (freed in the compute stream's order) nor the host bytes are reused while they run:
/// drop it before both.
pub struct Upload {
    copied: Copied,
    copy: Arc<CudaStream>,
    compute: Arc<CudaStream>,
    waited: bool,
}

/// The point of the copy stream after a batch's copy: recorded, or to be recorded by the
/// thread decoding its JPEGs.
enum Copied {
    Recorded(CudaEvent),
    Decoding(JoinHandle<Result<CudaEvent>>),
    /// Taken by `ready`, or the decoding thread failed.
    Gone,
}

/// What the decoding thread borrows from the batch: its JPEGs and keys, which the caller
/// keeps until the [`Upload`] is ready or dropped (both join the thread).
struct Borrowed {
    encoded: *const Encoded,
    encoded_len: usize,
    keys: *const String,
    keys_len: usize,
}

// SAFETY: read-only views of the batch, which outlives the thread (see `Borrowed`).
unsafe impl Send for Borrowed {}

impl Uploader {
    /// A copy stream on `dev`'s context.
    pub fn new(dev: &CudaDevice) -> Result<Uploader> {
        let copy = dev.cuda_stream().context().new_stream().w()?;
        Ok(Uploader {
            dev: dev.clone(),
            copy,
            decoder: Arc::new(Mutex::new((None, Decoded::default()))),
        })
    }

    /// Starts copying `bytes` into a new uint8 tensor of `shape` on the device (with
    /// `decode`, only its `decoded` ranges), then decoding the JPEGs of `decode` into
    /// their slots (`nvjpeg.rs`, from a thread of its own), on the copy stream. `bytes` and
    /// `decode`'s JPEGs and keys are read after this returns: keep them until the
    /// returned [`Upload`] is ready or dropped.
    pub fn start(
        &self,
        bytes: &[u8],
        shape: impl Into<Shape>,
        decode: Option<ToDecode>,
    ) -> Result<(Tensor, Upload)> {
        let shape = shape.into();
        if shape.elem_count() != bytes.len() {
            candle_core::bail!("upload: {} bytes for {shape:?}", bytes.len());
        }
        let decode = decode.filter(|d| !d.encoded.is_empty());
        {
            let mut decoder = self.decoder.lock().expect("decoder lock");
            if decode.is_some() && decoder.0.is_none() {
                // Made before anything is queued: without nvJPEG nothing is copied.
                decoder.0 = Some(DeviceDecoder::new(&self.dev)?);
            }
        }
        let compute = self.dev.cuda_stream();
        let mut dst = unsafe { self.dev.alloc::<u8>(bytes.len()) }?;
        self.copy.wait(&compute.record_event(NO_TIMING).w()?).w()?;
        let all = 0..bytes.len();
        let ranges = decode
            .as_ref()
            .map_or(std::slice::from_ref(&all), |d| d.decoded);
        for r in ranges {
            let mut part = dst.slice_mut(r.clone());
            self.copy.memcpy_htod(&bytes[r.clone()], &mut part).w()?;
        }
        let copied = match decode {
            None => Copied::Recorded(self.copy.record_event(NO_TIMING).w()?),
            Some(d) => {
                let (out, _) = dst.device_ptr(&self.copy);
                self.decode_on_thread(d, out)?
            }
        };
        let storage = CudaStorage::wrap_cuda_slice(dst, self.dev.clone());
        let images = Tensor::from_storage(Storage::Cuda(storage), shape, BackpropOp::none(), false);
        let copy = Upload {
            copied,
            copy: self.copy.clone(),
            compute,
            waited: false,
        };
        Ok((images, copy))
    }

    /// Starts a thread that decodes `d`'s JPEGs into the batch at `out` on the copy stream
    /// and records the copy stream's point after them.
    fn decode_on_thread(&self, d: ToDecode, out: CUdeviceptr) -> Result<Copied> {
        let borrowed = Borrowed {
            encoded: d.encoded.as_ptr(),
            encoded_len: d.encoded.len(),
            keys: d.keys.as_ptr(),
            keys_len: d.keys.len(),
        };
        let (copy, decoder, size) = (self.copy.clone(), self.decoder.clone(), d.size);
        let thread = std::thread::Builder::new()
            .name("gpu-jpeg".into())
            .spawn(move || {
                let borrowed = borrowed;
                // SAFETY: see `Borrowed`.
                let (encoded, keys) = unsafe {
                    (
                        std::slice::from_raw_parts(borrowed.encoded, borrowed.encoded_len),
                        std::slice::from_raw_parts(borrowed.keys, borrowed.keys_len),
                    )
                };
                copy.context().bind_to_thread().w()?;
                let mut decoder = decoder.lock().expect("decoder lock");
                let (jpeg, totals) = &mut *decoder;
                let jpeg = jpeg.as_mut().expect("made by start");
                let done = jpeg.decode(&copy, encoded, keys, size, out)?;
                totals.on_gpu += done.on_gpu;
                totals.on_cpu += done.on_cpu;
                totals.failed += done.failed;
                copy.record_event(NO_TIMING).w()
            })
            .map_err(|e| {
                candle_core::Error::Msg(format!("starting the JPEG decode thread: {e}"))
            })?;
        Ok(Copied::Decoding(thread))
    }

    /// How the JPEGs left encoded were decoded so far.
    pub fn decoded(&self) -> Decoded {
        self.decoder.lock().expect("decoder lock").1
    }
}

impl Upload {
    /// Makes the compute stream wait for the copy (and decode): work queued from now on
    /// sees the images. A decode that failed is the error.
    pub fn ready(mut self) -> Result<()> {
        // On an error the drop still waits for whatever the copy stream was given.
        let copied = self.copied()?;
        self.waited = true;
        self.compute.wait(&copied).w()
    }

    /// The copy's event, once the decoding thread (if any) has queued its work.
    fn copied(&mut self) -> Result<CudaEvent> {
        match std::mem::replace(&mut self.copied, Copied::Gone) {
            Copied::Recorded(event) => Ok(event),
            Copied::Decoding(thread) => thread
                .join()
                .unwrap_or_else(|_| candle_core::bail!("the JPEG decode thread panicked")),
            Copied::Gone => candle_core::bail!("upload: already waited for"),
        }
    }
}

impl Drop for Upload {
    fn drop(&mut self) {
        if !self.waited {
            match self.copied() {
                Ok(event) => drop(event.synchronize()),
                // Whatever the failed decode queued: wait for the whole copy stream.
                Err(_) => drop(self.copy.synchronize()),
            }
        }
    }
}

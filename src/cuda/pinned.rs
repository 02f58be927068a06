//! Page-locked (pinned) host memory for the pipeline's batch pool: the upload of a batch
//! from pinned memory is a DMA that does not stage through a bounce buffer, and
//! `Tensor::from_slice` returns without waiting for it.
//!
//! Safety of the asynchronous copy: a batch's buffer goes back to the pool when the
//! `Batch` is dropped, after `Trainer::feed` returns; every step reads its loss back
//! before that, which waits for the stream, so the copy has finished before the loader can
//! write into the buffer again.

use std::ops::{Deref, DerefMut};
use std::sync::Arc;

use candle_core::CudaDevice;
use candle_core::cuda_backend::cudarc::driver::PinnedHostSlice;
use pipeline::{Allocator, HostBuffer};

struct Pinned(PinnedHostSlice<u8>);

impl Deref for Pinned {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        self.0
            .as_slice()
            .expect("waiting on a pinned buffer's copy event")
    }
}

impl DerefMut for Pinned {
    fn deref_mut(&mut self) -> &mut [u8] {
        self.0
            .as_mut_slice()
            .expect("waiting on a pinned buffer's copy event")
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        // Freeing pinned memory needs the context current on this thread (a loader
        // thread may drop the pool).
        let _ = self.0.context().bind_to_thread();
    }
}

impl HostBuffer for Pinned {}

/// An allocator of zeroed pinned buffers on `dev`'s context; a buffer the driver refuses
/// (pinned memory is limited) falls back to a plain `Vec<u8>`, with a warning.
pub fn allocator(dev: &CudaDevice) -> Allocator {
    let ctx = dev.cuda_stream().context().clone();
    Arc::new(move |len| {
        // Plain pinned memory (flags 0), not write-combined: the host also reads batches.
        match unsafe { ctx.alloc_pinned_with_flags::<u8>(len, 0) } {
            Ok(slice) => {
                let mut buffer = Pinned(slice);
                buffer.fill(0);
                Box::new(buffer)
            }
            Err(e) => {
                tracing::warn!("pinned host memory refused ({e}): this batch buffer is pageable");
                Box::new(vec![0u8; len])
            }
        }
    })
}

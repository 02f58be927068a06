//! Batches: pooled uint8 NCHW images with labels, masks and keys.
//!
//! Image buffers come from a [`BatchPool`] and go back to it when a [`Batch`] is dropped,
//! so the steady state allocates nothing per batch. The pool's [`Allocator`] is a hook:
//! the CUDA trainer hands it page-locked (pinned) host memory so batches copy to the GPU
//! asynchronously.

use std::ops::DerefMut;
use std::sync::Arc;

use crossbeam_channel::{Receiver, Sender};

use crate::decode::{CropDecoder, DecodeError};
use crate::loader::LoaderState;
use crate::transform::CropParams;
use crate::transform::flip::to_chw;
use crate::transform::mask::expand_units;

/// A host buffer a batch's images live in (plain `Vec<u8>`, or pinned memory).
pub trait HostBuffer: Send + DerefMut<Target = [u8]> {}

impl HostBuffer for Vec<u8> {}

/// Makes host buffers of a given length in bytes.
pub type Allocator = Arc<dyn Fn(usize) -> Box<dyn HostBuffer> + Send + Sync>;

/// The default allocator: zeroed `Vec<u8>`.
pub fn vec_allocator() -> Allocator {
    Arc::new(|len| Box::new(vec![0u8; len]))
}

/// A set of image buffers that batches borrow and return. When a consumer holds more
/// batches than the pool has buffers, new ones are allocated, and the extra ones are freed
/// when they come back.
pub struct BatchPool {
    take: Receiver<Box<dyn HostBuffer>>,
    give: Sender<Box<dyn HostBuffer>>,
    allocator: Allocator,
    len: usize,
}

impl BatchPool {
    /// `count` buffers of `len` bytes each from `allocator`.
    pub fn new(count: usize, len: usize, allocator: &Allocator) -> BatchPool {
        let (give, take) = crossbeam_channel::bounded(count);
        for _ in 0..count {
            // The channel holds exactly `count`.
            give.send(allocator(len)).expect("pool channel has room");
        }
        BatchPool {
            take,
            give,
            allocator: allocator.clone(),
            len,
        }
    }

    /// A free buffer, or a new one if all are in use.
    pub fn get(&self) -> Box<dyn HostBuffer> {
        self.take
            .try_recv()
            .unwrap_or_else(|_| (self.allocator)(self.len))
    }

    fn returner(&self) -> Sender<Box<dyn HostBuffer>> {
        self.give.clone()
    }
}

/// An image left encoded for the GPU (`device_decode`), with the crop and flip drawn
/// for it: decoded, cropped, resized to the batch's size and mirrored when `flip`, it is
/// the image the loader would have put in its slot.
#[derive(Clone, Debug, PartialEq)]
pub struct Encoded {
    /// The sample's position in the batch.
    pub slot: usize,
    /// The JPEG's bytes, as in the shard.
    pub jpeg: Vec<u8>,
    /// The image's width and height, from its header.
    pub dims: (u32, u32),
    /// The crop, in source pixels.
    pub crop: CropParams,
    /// Whether to mirror the output.
    pub flip: bool,
}

impl Encoded {
    /// Decodes, crops, resizes and flips the image on the CPU into `chw` (3 x `size` x
    /// `size` bytes), through `hwc` (as many); the loader's decode without
    /// `device_decode`, and the fallback for images a GPU does not decode. libjpeg's
    /// warnings about the image are not reported.
    pub fn decode(
        &self,
        decoder: &mut CropDecoder,
        size: u32,
        hwc: &mut [u8],
        chw: &mut [u8],
    ) -> Result<(), DecodeError> {
        decoder.decode_crop(&self.jpeg, self.dims, &self.crop, size, hwc)?;
        to_chw(hwc, size as usize, self.flip, chw);
        Ok(())
    }
}

/// One batch, in delivery order.
pub struct Batch {
    /// The epoch it belongs to.
    pub epoch: u64,
    /// Its index within the epoch, from 0.
    pub index: usize,
    /// Output side in pixels.
    pub size: u32,
    /// Views per sample (1, or 2 for a contrastive teacher's pair).
    pub views: usize,
    /// Class indices, one per sample.
    pub labels: Vec<u32>,
    /// Sample keys, one per sample.
    pub keys: Vec<String>,
    /// Mask units per side (0 when the set does not mask).
    pub mask_grid: usize,
    /// Row-major unit masks, `mask_grid * mask_grid` bytes per sample, 1 = masked.
    pub masks: Vec<u8>,
    /// The loader state to store in a checkpoint taken after this batch: resuming from it
    /// yields exactly the batches that come after this one.
    pub state_after: LoaderState,
    /// The images left encoded for the GPU (`device_decode`), in slot order; their slots
    /// in [`Batch::images`] hold no pixels until they are decoded there, or here by
    /// [`Batch::decode_encoded`].
    pub encoded: Vec<Encoded>,
    images: Option<Box<dyn HostBuffer>>,
    home: Sender<Box<dyn HostBuffer>>,
}

impl Batch {
    pub(crate) fn new(
        pool: &BatchPool,
        epoch: u64,
        index: usize,
        size: u32,
        views: usize,
        mask_grid: usize,
        capacity: usize,
    ) -> Batch {
        Batch {
            epoch,
            index,
            size,
            views,
            labels: Vec::with_capacity(capacity),
            keys: Vec::with_capacity(capacity),
            mask_grid,
            masks: Vec::with_capacity(capacity * mask_grid * mask_grid),
            state_after: LoaderState::default(),
            encoded: Vec::new(),
            images: Some(pool.get()),
            home: pool.returner(),
        }
    }

    /// Number of samples.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether the batch has no samples.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Bytes per image (one view): 3 x size x size.
    pub fn image_bytes(&self) -> usize {
        3 * self.size as usize * self.size as usize
    }

    /// The images as uint8 `(N, views, 3, size, size)`: each sample's views side by side
    /// (`len() * views * image_bytes()` bytes).
    pub fn images(&self) -> &[u8] {
        let n = self.len() * self.views * self.image_bytes();
        // `images` is only None during drop.
        &self.images.as_ref().expect("images present")[..n]
    }

    /// Adds a sample: `chw` holds its views, one after the other.
    pub(crate) fn push(&mut self, chw: &[u8], label: u32, key: String, mask: Option<&[u8]>) {
        let n = self.views * self.image_bytes();
        let start = self.len() * n;
        // `images` is only None during drop.
        let images = self.images.as_mut().expect("images present");
        images[start..start + n].copy_from_slice(chw);
        self.push_labels(label, key, mask);
    }

    /// Adds a sample left encoded: its slot's pixels come from decoding `encoded` (whose
    /// `slot` is set here).
    pub(crate) fn push_encoded(
        &mut self,
        mut encoded: Encoded,
        label: u32,
        key: String,
        mask: Option<&[u8]>,
    ) {
        encoded.slot = self.len();
        self.encoded.push(encoded);
        self.push_labels(label, key, mask);
    }

    /// A sample's label, key and mask, after its pixels.
    fn push_labels(&mut self, label: u32, key: String, mask: Option<&[u8]>) {
        self.labels.push(label);
        self.keys.push(key);
        if let Some(mask) = mask {
            self.masks.extend_from_slice(mask);
        }
    }

    /// The byte ranges of [`Batch::images`] that hold pixels: all but the slots of the
    /// images left encoded, neighbouring slots in one range.
    pub fn decoded_ranges(&self) -> Vec<std::ops::Range<usize>> {
        let per = self.views * self.image_bytes();
        let mut ranges = Vec::new();
        let mut start = 0;
        for slot in self.encoded.iter().map(|e| e.slot) {
            if slot > start {
                ranges.push(start * per..slot * per);
            }
            start = slot + 1;
        }
        if start < self.len() {
            ranges.push(start * per..self.len() * per);
        }
        ranges
    }

    /// Decodes the images left encoded on the CPU, into their slots, exactly as the
    /// loader does without `device_decode`; `encoded` is empty afterwards. An image that
    /// does not decode (the loader only read its header) leaves its slot black; its key
    /// and the error are returned, for the caller to log and count.
    pub fn decode_encoded(&mut self, decoder: &mut CropDecoder) -> Vec<(String, DecodeError)> {
        let (size, n) = (self.size, self.image_bytes());
        let mut hwc = vec![0u8; n];
        let mut failed = Vec::new();
        for e in std::mem::take(&mut self.encoded) {
            // `images` is only None during drop; slots are views * n bytes, views is 1 here.
            let images = self.images.as_mut().expect("images present");
            let chw = &mut images[e.slot * n..(e.slot + 1) * n];
            if let Err(err) = e.decode(decoder, size, &mut hwc, chw) {
                chw.fill(0);
                failed.push((self.keys[e.slot].clone(), err));
            }
        }
        failed
    }

    /// The masks upsampled to `tokens` x `tokens` per sample (14 for ViT/16 at 224).
    pub fn token_masks(&self, tokens: usize) -> Vec<u8> {
        let per = self.mask_grid * self.mask_grid;
        if per == 0 {
            return vec![0; self.len() * tokens * tokens];
        }
        self.masks
            .chunks_exact(per)
            .flat_map(|m| expand_units(m, self.mask_grid, tokens))
            .collect()
    }

    /// The images as f32 NCHW, scaled to [0, 1] and normalised per channel (the CPU
    /// trainer's input; the CUDA trainer normalises on the GPU).
    pub fn to_f32_normalized(&self, mean: [f32; 3], std: [f32; 3]) -> Vec<f32> {
        let plane = self.size as usize * self.size as usize;
        self.images()
            .iter()
            .enumerate()
            .map(|(i, &v)| {
                let c = (i / plane) % 3;
                (f32::from(v) / 255.0 - mean[c]) / std[c]
            })
            .collect()
    }
}

impl Drop for Batch {
    fn drop(&mut self) {
        if let Some(images) = self.images.take() {
            // The pool may be gone (loader dropped first); then the buffer is freed.
            let _ = self.home.try_send(images);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_return_to_the_pool() {
        let pool = BatchPool::new(1, 3 * 2 * 2, &vec_allocator());
        let mut b = Batch::new(&pool, 0, 0, 2, 1, 1, 1);
        b.push(&[1; 12], 7, "k".into(), Some(&[1]));
        assert_eq!(
            (b.len(), b.images(), b.token_masks(2)),
            (1, &[1u8; 12][..], vec![1, 1, 1, 1])
        );
        assert_eq!(b.decoded_ranges(), vec![0..12]);
        let norm = b.to_f32_normalized([0.0; 3], [1.0; 3]);
        assert!((norm[0] - 1.0 / 255.0).abs() < 1e-6);
        drop(b);
        assert_eq!(pool.take.len(), 1, "the buffer came back");
        let (a, b) = (
            Batch::new(&pool, 0, 1, 2, 1, 1, 1),
            Batch::new(&pool, 0, 2, 2, 1, 1, 1),
        );
        assert_eq!(pool.take.len(), 0);
        drop((a, b));
        assert_eq!(pool.take.len(), 1, "the extra buffer is freed, not kept");
    }
}

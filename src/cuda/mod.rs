//! Fused CUDA kernels as Candle custom ops, each with its backward (`kernels.cu`, compiled
//! for the GPU in use by NVRTC on first use, so a build needs no GPU).
//!
//! - [`layer_norm`]: f32 input and affine, f32 or bf16 output; one pass forward, one pass
//!   backward for dx with dw/db summed per warp.
//! - [`attention_qkv`]: multi-head self-attention from the packed `q|k|v` projection to
//!   the heads' concatenated outputs, one graph node with its backward: on tensor cores
//!   (`flash.cu`) for bf16 heads of 32 or 64 on sm_80 and newer, through cuBLAS otherwise.
//! - [`linear()`]: `act(x W^T + b)` from f32 master weights, written in the next layer's
//!   dtype; the bias, the residual join and the bias gradient in cuBLASLt's epilogue
//!   where it takes them (`epilogue.rs`).
//! - [`info_nce()`]: MimCo's InfoNCE against a queue, per row, with its backward.
//! - [`normalize_u8`], [`patchify`]: the images' way in, one pass each, no backward.
//! - [`gather_rows`]: rows picked by index, the backward scattering them back.
//! - [`tokens()`]: the stem's mask blend, CLS token and position add, one pass each way.
//! - [`adamw()`]: one AdamW update of every parameter in one launch, in place, the
//!   gradients' averaging and clipping folded in; [`sum_squares`]: the gradient norm, one
//!   launch per gradient.
//! - [`pinned`]: page-locked batch buffers for the pipeline; [`Uploader`]: their copy to
//!   the GPU on a stream of its own, overlapping the step before, and the decode of the
//!   JPEGs the loader left encoded (nvJPEG's hardware decoder, then a crop-and-resize
//!   kernel: `nvjpeg.rs`).
//!
//! [`crate::functional`] sends CUDA tensors here and everything else to the composed ops,
//! which stay the reference: [`check`] compares the two on the GPU. Without a GPU,
//! `tests/kernels_on_cpu.sh` runs `kernels.cu` itself on the CPU against plain loops.

mod adamw;
mod attention;
mod bias;
pub mod check;
mod epilogue;
mod flash;
mod gather;
mod gemm;
mod images;
mod info_nce;
mod linear;
mod norm;
mod nvjpeg;
pub mod pinned;
mod tokens;
mod upload;

pub use adamw::{AdamWSlot, AdamWStep, adamw, sum_squares};
pub use attention::{attention_qkv, attention_qkv_bwd, attention_qkv_lse};
pub use gather::gather_rows;
pub use images::{normalize_u8, patchify};
pub use info_nce::info_nce;
pub use linear::{linear, linear_bwd, linear_residual};
pub use norm::{layer_norm, layer_norm_bwd};
pub use nvjpeg::{Decoded, DeviceDecoder};
pub use tokens::tokens;
pub use upload::{ToDecode, Upload, Uploader};

use std::sync::OnceLock;

use candle_core::cuda_backend::cudarc::driver::{CudaFunction, CudaView, LaunchConfig};
use candle_core::cuda_backend::cudarc::nvrtc::{CompileOptions, compile_ptx_with_opts};
use candle_core::cuda_backend::{CudaDType, CudaStorageSlice};
use candle_core::{CpuStorage, CudaDevice, CudaStorage, DType, Layout, Result, Shape, bail};

const SOURCE: &str = concat!(include_str!("kernels.cu"), include_str!("flash.cu"));
/// Row widths (elements per lane) the kernels are instantiated for: rows up to 32x that.
const WIDTHS: [usize; 8] = [1, 2, 4, 8, 12, 16, 24, 32];
/// The longest row the row kernels take; longer rows go to the composed ops.
pub const MAX_ROW: usize = 32 * 32;
/// Warps (rows) per block of the row kernels.
const WARPS: u32 = 4;

/// PTX of `kernels.cu` for this device's architecture, compiled once per process.
fn ptx(dev: &CudaDevice) -> Result<&'static str> {
    static PTX: OnceLock<std::result::Result<String, String>> = OnceLock::new();
    PTX.get_or_init(|| {
        let (major, minor) = dev
            .cuda_stream()
            .context()
            .compute_capability()
            .map_err(|e| format!("reading the GPU's compute capability: {e}"))?;
        let opts = CompileOptions {
            options: vec![format!("--gpu-architecture=sm_{major}{minor}")],
            name: Some("mimco_kernels.cu".into()),
            ..Default::default()
        };
        compile_ptx_with_opts(SOURCE, opts)
            .map(|p| p.to_src())
            .map_err(|e| format!("NVRTC could not compile mimco's kernels (is libnvrtc from the same CUDA as the driver?): {e}"))
    })
    .as_ref()
    .map(|s| s.as_str())
    .map_err(|e| candle_core::Error::Msg(e.clone()))
}

fn func(dev: &CudaDevice, name: &str) -> Result<CudaFunction> {
    Ok(dev
        .get_or_load_custom_func(name, "mimco_kernels", ptx(dev)?)?
        .into_cuda_function())
}

/// The kernel instance for rows of `d` elements: the smallest width that holds them.
fn width(d: usize) -> Result<usize> {
    match WIDTHS.iter().find(|&&e| 32 * e >= d) {
        Some(&e) => Ok(e),
        None => bail!("rows of {d} elements: the fused kernels take at most {MAX_ROW}"),
    }
}

fn dtype_name(dtype: DType) -> Result<&'static str> {
    match dtype {
        DType::F32 => Ok("f32"),
        DType::BF16 => Ok("bf16"),
        other => bail!("the fused kernels take f32 or bf16, not {other:?}"),
    }
}

fn row_grid(rows: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: ((rows as u32).div_ceil(WARPS), 1, 1),
        block_dim: (32 * WARPS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// A grid-stride launch over `n` elements.
fn elementwise_grid(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: ((n as u32).div_ceil(256).clamp(1, 16384), 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn contiguous<'a, T: CudaDType>(
    s: &'a CudaStorage,
    l: &Layout,
    what: &str,
) -> Result<CudaView<'a, T>> {
    if !l.is_contiguous() {
        bail!("{what} must be contiguous for the fused kernel");
    }
    Ok(s.as_cuda_slice::<T>()?
        .slice(l.start_offset()..l.start_offset() + l.shape().elem_count()))
}

fn wrap(slice: CudaStorageSlice, dev: &CudaDevice) -> CudaStorage {
    CudaStorage {
        slice,
        device: dev.clone(),
    }
}

fn no_cpu(name: &str) -> Result<(CpuStorage, Shape)> {
    bail!("{name} is a CUDA kernel: the CPU takes the composed ops in mimco::functional")
}

/// The `cpu_fwd` of a CUDA-only custom op with 1, 2 or 3 inputs: an error (the dispatch in
/// `mimco::functional` never sends CPU tensors here).
macro_rules! cuda_only {
    (1) => {
        fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
            super::no_cpu(self.name())
        }
    };
    (2) => {
        fn cpu_fwd(
            &self,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
        ) -> Result<(CpuStorage, Shape)> {
            super::no_cpu(self.name())
        }
    };
    (3) => {
        fn cpu_fwd(
            &self,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
        ) -> Result<(CpuStorage, Shape)> {
            super::no_cpu(self.name())
        }
    };
}
use cuda_only;

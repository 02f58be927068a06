//! Batched matrix products through cuBLAS with leading dimensions and an output dtype of
//! our choosing: the cuBLAS path of attention (f32, other head widths, older GPUs) and
//! InfoNCE's bf16 x bf16 -> f32 products against the queue.
//!
//! Candle's matmul takes only packed rows, and writes the inputs' dtype. The attention
//! scores `(N, N)` of a ViT (N = 197) then have rows of 394 bytes in bf16, and cuBLAS ran
//! the attention's products with a generic kernel at about 36 TFLOP/s on an H200. Rows
//! padded to a multiple of 8 elements (16 bytes) were meant to let it choose its Hopper
//! kernels; measured, it did not: the same kernel and the same 24 ms per ViT-S/16 step
//! (benches/results/). bf16 attention has since moved to the tensor-core kernels of
//! `flash.cu`.

use candle_core::cuda_backend::cudarc::cublas::{result, sys};
use candle_core::cuda_backend::cudarc::driver::sys::CUdeviceptr;
use candle_core::{CudaDevice, DType, Result, bail};

/// One operand of a batched row-major product: the device address of its first matrix,
/// its row stride (leading dimension) and matrix stride in elements, and whether the
/// product reads it transposed.
#[derive(Clone, Copy, Debug)]
pub(super) struct Operand {
    pub ptr: CUdeviceptr,
    pub ld: usize,
    pub stride: usize,
    pub transposed: bool,
}

/// `C[i] = op(A[i]) op(B[i])` for `i` in `0..batch`, all row-major, `A` and `B` in
/// `dtype` (f32 or bf16, f32 accumulation) and `C` in `out` (`dtype` or f32): `op(A)` is
/// `m x k`, `op(B)` `k x n`, `C` `m x n` with the row stride and matrix stride of `c`.
#[allow(clippy::too_many_arguments)]
pub(super) fn gemm(
    dev: &CudaDevice,
    (dtype, out): (DType, DType),
    batch: usize,
    (m, n, k): (usize, usize, usize),
    a: Operand,
    b: Operand,
    c: Operand,
) -> Result<()> {
    use sys::cublasOperation_t::{CUBLAS_OP_N, CUBLAS_OP_T};
    let op = |o: &Operand| {
        if o.transposed {
            CUBLAS_OP_T
        } else {
            CUBLAS_OP_N
        }
    };
    let (data, compute) = match dtype {
        DType::BF16 => (
            sys::cudaDataType_t::CUDA_R_16BF,
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
        ),
        DType::F32 => (
            sys::cudaDataType_t::CUDA_R_32F,
            match candle_core::cuda_backend::gemm_reduced_precision_f32() {
                true => sys::cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_TF32,
                false => sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            },
        ),
        other => bail!("gemm: f32 or bf16, not {other:?}"),
    };
    let c_type = match out {
        DType::F32 => sys::cudaDataType_t::CUDA_R_32F,
        o if o == dtype => data,
        other => bail!("gemm: a {dtype:?} product is written in {dtype:?} or f32, not {other:?}"),
    };
    let (alpha, beta) = (1f32, 0f32);
    let blas = dev.cublas_handle();
    // Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T: cuBLAS gets B first.
    unsafe {
        result::gemm_strided_batched_ex(
            *blas.handle(),
            op(&b),
            op(&a),
            n as i32,
            m as i32,
            k as i32,
            (&alpha) as *const f32 as *const _,
            b.ptr as *const _,
            data,
            b.ld as i32,
            b.stride as i64,
            a.ptr as *const _,
            data,
            a.ld as i32,
            a.stride as i64,
            (&beta) as *const f32 as *const _,
            c.ptr as *mut _,
            c_type,
            c.ld as i32,
            c.stride as i64,
            batch as i32,
            compute,
            sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT_TENSOR_OP,
        )
    }
    .map_err(|e| candle_core::Error::Msg(format!("cuBLAS: {e:?}")))
}

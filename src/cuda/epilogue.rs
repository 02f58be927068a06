//! The linear layer's products through cuBLASLt, with what follows them folded into the
//! product's epilogue: in the forward the bias (and the residual join, as `C` with beta 1),
//! written in the output's dtype; in the backward the weight gradient written in f32 with
//! the bias gradient (the column sums of `dy`) from the same pass (`BGRADB`).
//!
//! Without it, each linear layer is the product, then one pass over its output for the
//! bias (and the residual), and in the backward a pass for the column sums and a cast of
//! the weight gradient: in the 79.6 ms ViT-S/16 step profiled on an H200
//! (benches/results/2026-11-28-h200/4-92f1832), `bias_add_*` took 3.8 ms, `column_sum_*`
//! 2.6 and `cast_bf16_f32` 0.9, not all of the last two the linear layers'.
//!
//! cuBLASLt reads the bias in the output's dtype (an f32 bias with a bf16 output is
//! refused, CUBLAS_STATUS_INVALID_VALUE on an H200): a bf16 output takes a bf16 copy of
//! the f32 bias, as PyTorch's autocast does for its linear layers.
//!
//! cuBLASLt does not take every combination of types and epilogues on every GPU: a problem
//! it finds no algorithm for is remembered and answered `false`, and the caller takes the
//! separate passes. `--without epilogue` turns this off.

use std::collections::HashMap;
use std::ffi::c_void;
use std::mem::size_of;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use candle_core::cuda_backend::WrapErr;
use candle_core::cuda_backend::cudarc::cublaslt::{result, sys};
use candle_core::cuda_backend::cudarc::driver::sys::CUdeviceptr;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, DevicePtr};
use candle_core::{CudaDevice, DType, Result, bail};

use crate::functional::{FastPath, enabled};

/// Products launched through here so far (for `mimco bench kernels`, which checks that
/// the linear layer takes this path rather than its fallback).
static LAUNCHED: AtomicU64 = AtomicU64::new(0);

/// [`LAUNCHED`]'s count.
pub(super) fn launched() -> u64 {
    LAUNCHED.load(Ordering::Relaxed)
}

/// Whether the linear layers use the epilogues (`--without epilogue` says not to); the
/// callers ask before allocating the outputs.
pub(super) fn on() -> bool {
    enabled(FastPath::Epilogue)
}

/// The shape of one product, in cuBLASLt's column-major terms, and its types: the key of
/// the algorithm found for it.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
struct Problem {
    /// bf16 or f32 `A` and `B`.
    inputs: DType,
    /// f32 or the inputs' dtype: `C`, `D` and the bias (or bias gradient).
    out: DType,
    m: u64,
    n: u64,
    k: u64,
    transa: bool,
    transb: bool,
    epilogue: u32,
    /// `C` is read (beta 1).
    accumulate: bool,
}

/// One device's cuBLASLt handle, workspace and algorithms per problem and TF32 setting
/// (`None`: not supported).
struct Lt {
    handle: sys::cublasLtHandle_t,
    workspace: CudaSlice<u8>,
    algos: Mutex<HashMap<(Problem, bool), Option<sys::cublasLtMatmulAlgo_t>>>,
}

// SAFETY: a cuBLASLt handle keeps no per-call state (stream and workspace are arguments of
// each call) and may be used from several host threads; the algorithm map has its lock.
unsafe impl Send for Lt {}
unsafe impl Sync for Lt {}

static LTS: Mutex<Vec<(candle_core::cuda_backend::DeviceId, Arc<Lt>)>> = Mutex::new(Vec::new());

/// The cuBLASLt of `dev`, made on first use (32 MiB of workspace, NVIDIA's advice for
/// Hopper).
fn lt(dev: &CudaDevice) -> Result<Arc<Lt>> {
    let mut lts = LTS.lock().expect("cuBLASLt handles");
    if let Some((_, lt)) = lts.iter().find(|(id, _)| *id == dev.id()) {
        return Ok(lt.clone());
    }
    let handle = result::create_handle().map_err(lt_error)?;
    let workspace = dev.cuda_stream().alloc_zeros::<u8>(WORKSPACE).w()?;
    let lt = Arc::new(Lt {
        handle,
        workspace,
        algos: Mutex::new(HashMap::new()),
    });
    lts.push((dev.id(), lt.clone()));
    Ok(lt)
}

const WORKSPACE: usize = 32 << 20;

fn lt_error(e: impl std::fmt::Debug) -> candle_core::Error {
    candle_core::Error::Msg(format!("cuBLASLt: {e:?}"))
}

fn data_type(dtype: DType) -> Result<sys::cudaDataType> {
    Ok(match dtype {
        DType::F32 => sys::cudaDataType::CUDA_R_32F,
        DType::BF16 => sys::cudaDataType::CUDA_R_16BF,
        other => bail!("cuBLASLt: f32 or bf16, not {other:?}"),
    })
}

/// Descriptors destroyed on drop.
struct Desc(sys::cublasLtMatmulDesc_t);
struct Layouts(Vec<sys::cublasLtMatrixLayout_t>);

impl Drop for Desc {
    fn drop(&mut self) {
        let _ = unsafe { result::destroy_matmul_desc(self.0) };
    }
}

impl Drop for Layouts {
    fn drop(&mut self) {
        for l in &self.0 {
            let _ = unsafe { result::destroy_matrix_layout(*l) };
        }
    }
}

/// Sets attribute `attr` of `desc` to `value`.
fn set<T>(desc: &Desc, attr: sys::cublasLtMatmulDescAttributes_t, value: &T) -> Result<()> {
    unsafe {
        result::set_matmul_desc_attribute(
            desc.0,
            attr,
            value as *const T as *const c_void,
            size_of::<T>(),
        )
    }
    .map_err(lt_error)
}

/// The device pointers of one product: `A`, `B`, `C` (read with beta 1 when the problem
/// accumulates), `D` and the bias (or bias gradient) vector.
struct Operands {
    a: CUdeviceptr,
    b: CUdeviceptr,
    c: Option<CUdeviceptr>,
    d: CUdeviceptr,
    bias: CUdeviceptr,
}

/// Runs `p` on `dev`'s stream; `false` (nothing launched) where cuBLASLt has no algorithm
/// for it.
fn run(dev: &CudaDevice, p: Problem, ops: Operands) -> Result<bool> {
    // cuBLASLt's fast kernels want 16-byte aligned matrices; the algorithm found for a
    // problem assumes it (fresh allocations are 256-byte aligned, views may not be).
    let pointers = [ops.a, ops.b, ops.c.unwrap_or(ops.d), ops.d, ops.bias];
    if pointers.iter().any(|p| p % 16 != 0) {
        return Ok(false);
    }
    let lt = lt(dev)?;
    // f32 products on tensor cores (TF32) where the precision setting asks for it; part
    // of the key, since an algorithm is found for one compute type.
    let tf32 = p.inputs == DType::F32 && candle_core::cuda_backend::gemm_reduced_precision_f32();
    let compute = match tf32 {
        true => sys::cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_TF32,
        false => sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
    };
    let desc =
        Desc(result::create_matmul_desc(compute, sys::cudaDataType::CUDA_R_32F).map_err(lt_error)?);
    use sys::cublasLtMatmulDescAttributes_t as Attr;
    set(
        &desc,
        Attr::CUBLASLT_MATMUL_DESC_TRANSA,
        &i32::from(p.transa),
    )?;
    set(
        &desc,
        Attr::CUBLASLT_MATMUL_DESC_TRANSB,
        &i32::from(p.transb),
    )?;
    set(&desc, Attr::CUBLASLT_MATMUL_DESC_EPILOGUE, &p.epilogue)?;
    set(&desc, Attr::CUBLASLT_MATMUL_DESC_BIAS_POINTER, &ops.bias)?;
    set(
        &desc,
        Attr::CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE,
        &data_type(p.out)?,
    )?;
    let (a_rows, a_cols) = if p.transa { (p.k, p.m) } else { (p.m, p.k) };
    let (b_rows, b_cols) = if p.transb { (p.n, p.k) } else { (p.k, p.n) };
    let layout = |dtype, rows: u64, cols: u64| {
        result::create_matrix_layout(data_type(dtype)?, rows, cols, rows as i64).map_err(lt_error)
    };
    // A, B, then C and D (one layout: same type, shape and leading dimension).
    let layouts = Layouts(vec![
        layout(p.inputs, a_rows, a_cols)?,
        layout(p.inputs, b_rows, b_cols)?,
        layout(p.out, p.m, p.n)?,
    ]);
    let mut algos = lt.algos.lock().expect("cuBLASLt algorithms");
    let algo = match algos.get(&(p, tf32)) {
        Some(found) => *found,
        None => {
            let found = heuristic(&lt, &desc, &layouts);
            if let Err(e) = &found {
                tracing::warn!("{e} for {p:?}: the linear layer takes separate passes there");
            }
            *algos.entry((p, tf32)).or_insert(found.ok())
        }
    };
    let Some(algo) = algo else {
        return Ok(false);
    };
    let stream = dev.cuda_stream();
    let (workspace, _guard) = lt.workspace.device_ptr(&stream);
    let (alpha, beta) = (1f32, if p.accumulate { 1f32 } else { 0f32 });
    let c = ops.c.unwrap_or(ops.d);
    let [la, lb, lcd] = [layouts.0[0], layouts.0[1], layouts.0[2]];
    let launched = unsafe {
        result::matmul(
            lt.handle,
            desc.0,
            &alpha as *const f32 as *const c_void,
            &beta as *const f32 as *const c_void,
            ops.a as *const c_void,
            la,
            ops.b as *const c_void,
            lb,
            c as *const c_void,
            lcd,
            ops.d as *mut c_void,
            lcd,
            &algo,
            workspace as *mut c_void,
            WORKSPACE,
            stream.cu_stream() as *mut _,
        )
    };
    if let Err(e) = launched {
        // Refused before anything ran: this problem takes the separate passes from now on.
        tracing::warn!("cuBLASLt: {e:?} for {p:?}: the linear layer takes separate passes there");
        algos.insert((p, tf32), None);
        return Ok(false);
    }
    LAUNCHED.fetch_add(1, Ordering::Relaxed);
    Ok(true)
}

/// cuBLASLt's first choice of algorithm for the problem the descriptors describe.
fn heuristic(lt: &Lt, desc: &Desc, layouts: &Layouts) -> Result<sys::cublasLtMatmulAlgo_t> {
    let pref = result::create_matmul_pref().map_err(lt_error)?;
    let found = unsafe {
        let size = WORKSPACE;
        result::set_matmul_pref_attribute(
            pref,
            sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
            &size as *const usize as *const c_void,
            size_of::<usize>(),
        )
        .and_then(|()| {
            result::get_matmul_algo_heuristic(
                lt.handle,
                desc.0,
                layouts.0[0],
                layouts.0[1],
                layouts.0[2],
                layouts.0[2],
                pref,
            )
        })
    };
    let _ = unsafe { result::destroy_matmul_pref(pref) };
    Ok(found.map_err(lt_error)?.algo)
}

/// `y = x W^T + bias (+ residual)` for row-major `x` `(rows, inputs)` and `w` `(outputs,
/// inputs)` in `inputs` dtype, and `bias`, `y` (and the residual) `(rows, outputs)` in
/// `out` (f32 or the inputs' dtype; the residual only with f32). `false`, with nothing
/// launched, where cuBLASLt cannot.
#[allow(clippy::too_many_arguments)]
pub(super) fn linear_forward(
    dev: &CudaDevice,
    (inputs, out): (DType, DType),
    (rows, ins, outs): (usize, usize, usize),
    x: CUdeviceptr,
    w: CUdeviceptr,
    bias: CUdeviceptr,
    residual: Option<CUdeviceptr>,
    y: CUdeviceptr,
) -> Result<bool> {
    if residual.is_some() && out != DType::F32 {
        return Ok(false);
    }
    // Column-major: y^T (outs x rows) = W (outs x ins, stored as ins x outs, transposed)
    // times x^T (ins x rows, as stored).
    let p = Problem {
        inputs,
        out,
        m: outs as u64,
        n: rows as u64,
        k: ins as u64,
        transa: true,
        transb: false,
        epilogue: sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS as u32,
        accumulate: residual.is_some(),
    };
    let ops = Operands {
        a: w,
        b: x,
        c: residual,
        d: y,
        bias,
    };
    run(dev, p, ops)
}

/// `dw = dy^T x` in f32 `(outputs, inputs)` and `db` in f32 `(outputs)`, the column sums
/// of `dy`, in one product, for row-major `x` `(rows, inputs)` and `dy` `(rows, outputs)`
/// in `inputs` dtype. `false` as for [`linear_forward`].
pub(super) fn linear_weight_grad(
    dev: &CudaDevice,
    inputs: DType,
    (rows, ins, outs): (usize, usize, usize),
    x: CUdeviceptr,
    dy: CUdeviceptr,
    dw: CUdeviceptr,
    db: CUdeviceptr,
) -> Result<bool> {
    // Column-major: dw^T (ins x outs) = x^T (ins x rows, as stored) times dy (rows x outs,
    // stored as outs x rows, transposed); the bias gradient sums B over k (the rows).
    let p = Problem {
        inputs,
        out: DType::F32,
        m: ins as u64,
        n: outs as u64,
        k: rows as u64,
        transa: false,
        transb: true,
        epilogue: sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BGRADB as u32,
        accumulate: false,
    };
    let ops = Operands {
        a: x,
        b: dy,
        c: None,
        d: dw,
        bias: db,
    };
    run(dev, p, ops)
}

//! Picking rows by index, with a backward that scatters each row's gradient back in one
//! launch. Candle's own backward of `index_select` (`index_add`) gives each column one
//! thread that walks every index: one such launch took 16 ms of a 280 ms ViT-S/16 step on
//! an H200 (the masked tokens of the patch-level loss, benches/results/).

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
use candle_core::cuda_backend::{CudaStorageSlice, WrapErr};
use candle_core::{CpuStorage, CudaStorage, CustomOp2, DType, Layout, Result, Shape, Tensor, bail};

use super::*;

/// Rows `ids` (u32) of the f32 matrix `x` `(rows, cols)`: `(ids.len(), cols)`.
pub fn gather_rows(x: &Tensor, ids: &Tensor) -> Result<Tensor> {
    if x.rank() != 2 || x.dtype() != DType::F32 || ids.dtype() != DType::U32 || ids.rank() != 1 {
        bail!("gather_rows: an f32 matrix and u32 indices, got {x:?} and {ids:?}");
    }
    x.contiguous()?.apply_op2(&ids.contiguous()?, GatherRows)
}

struct GatherRows;

impl CustomOp2 for GatherRows {
    fn name(&self) -> &'static str {
        "mimco-gather-rows"
    }

    cuda_only!(2);

    fn cuda_fwd(
        &self,
        xs: &CudaStorage,
        xl: &Layout,
        is: &CudaStorage,
        il: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let out = xs.index_select(is, xl, il, 0)?;
        Ok((out, Shape::from((il.dims()[0], xl.dims()[1]))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        ids: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.to_dtype(DType::F32)?.contiguous()?;
        let rows = x.dim(0)?;
        Ok((
            Some(grad.apply_op2_no_bwd(ids, &ScatterAddRows { rows })?),
            None,
        ))
    }
}

/// `(g, ids)` -> a `(rows, cols)` zero matrix with row `g[r]` added at row `ids[r]`.
struct ScatterAddRows {
    rows: usize,
}

impl CustomOp2 for ScatterAddRows {
    fn name(&self) -> &'static str {
        "mimco-scatter-add-rows"
    }

    cuda_only!(2);

    fn cuda_fwd(
        &self,
        gs: &CudaStorage,
        gl: &Layout,
        is: &CudaStorage,
        il: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (n, cols) = gl.shape().dims2()?;
        let dev = gs.device();
        let g = contiguous::<f32>(gs, gl, "gradient")?;
        let ids = contiguous::<u32>(is, il, "indices")?;
        let mut out = dev.alloc_zeros::<f32>(self.rows * cols)?;
        let f = func(dev, "scatter_add_rows_f32")?;
        let (n_i, cols_i) = (n as i32, cols as i32);
        let stream = dev.cuda_stream();
        let mut b = stream.launch_builder(&f);
        b.arg(&g).arg(&ids).arg(&mut out).arg(&n_i).arg(&cols_i);
        unsafe { b.launch(elementwise_grid(n * cols)) }.w()?;
        Ok((
            wrap(CudaStorageSlice::F32(out), dev),
            Shape::from((self.rows, cols)),
        ))
    }
}

//! A linear layer `act(x W^T + b)` as one node of Candle's graph: the f32 master weight
//! cast to the input's dtype, the cuBLAS product, and the bias (and GELU or ReLU) applied
//! while the result is written in the dtype the next layer reads (f32 for the residual
//! stream). With an activation the backward recomputes the product rather than keep it:
//! one more matmul costs less than a graph node.
//!
//! Composed, the same layer is three nodes (weight cast, matmul, bias) and a fourth to
//! cast the output, and Candle's backward gives each node a zero-filled gradient plus an
//! addition: most of the additions that took a third of a ViT-S/16 step on an H200.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, DeviceRepr, PushKernelArg};
use candle_core::cuda_backend::{CudaStorageSlice, WrapErr};
use candle_core::op::BackpropOp;
use candle_core::{
    CpuStorage, CudaStorage, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor, bail,
};
use half::bf16;

use super::attention::{address, alloc};
use super::bias::{BiasActBwd, ColumnSum};
use super::epilogue;
use super::*;
use crate::functional::Act;

/// `act(x W^T + b)` for `x` `(rows, in)` f32 or bf16 (made contiguous), `weight` `(out,
/// in)` in f32 (a master weight, cast here) or already in the dtype of `x`, and f32 `bias`
/// `(out)`; the product runs in the dtype of `x` (f32 accumulation)
/// and is written in `out` (the dtype of `x`, or f32 without an activation). Gradients:
/// `dx` in the dtype of `x`, `dweight` and `dbias` in f32.
pub fn linear(x: &Tensor, weight: &Tensor, bias: &Tensor, act: Act, out: DType) -> Result<Tensor> {
    let act = act_code(act);
    check_inputs(x, weight, bias)?;
    if out != x.dtype() && (out != DType::F32 || act != 0) {
        bail!(
            "linear: the output is {:?} (or f32 without an activation), not {out:?}",
            x.dtype()
        );
    }
    x.contiguous()?.apply_op3(
        weight,
        bias,
        Linear {
            out,
            act,
            residual: None,
        },
    )
}

/// `x W^T + b + residual` in f32 for [`linear()`]'s `x`, `weight` and `bias` and an f32
/// `residual` `(rows, out)`: the bias, the cast and the residual join in one pass after the
/// product. No backward: for forwards that record no gradient (the frozen teacher, the
/// blocks node's own forward); [`crate::functional::linear_residual`] decides.
pub fn linear_residual(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    residual: &Tensor,
) -> Result<Tensor> {
    check_inputs(x, weight, bias)?;
    let (rows, outputs) = (x.dim(0)?, weight.dim(0)?);
    if residual.dtype() != DType::F32 || residual.dims() != [rows, outputs] {
        bail!("linear: an f32 residual of ({rows}, {outputs}), not {residual:?}");
    }
    x.contiguous()?.apply_op3_no_bwd(
        weight,
        bias,
        &Linear {
            out: DType::F32,
            act: 0,
            residual: Some(residual.contiguous()?),
        },
    )
}

/// A 2D `x`, a weight in f32 or the dtype of `x`, an f32 bias.
fn check_inputs(x: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<()> {
    let weight_ok = weight.dtype() == DType::F32 || weight.dtype() == x.dtype();
    if x.rank() != 2 || !weight_ok || bias.dtype() != DType::F32 {
        bail!(
            "linear: a 2D input, a weight in f32 or the input's dtype and an f32 bias, not {:?} {:?} {:?}",
            x.dtype(),
            weight.dtype(),
            bias.dtype()
        );
    }
    Ok(())
}

/// The kernels' activation code of `act`.
fn act_code(act: Act) -> i32 {
    match act {
        Act::Identity => 0,
        Act::Gelu => 1,
        Act::Relu => 2,
    }
}

/// `act`: the kernels' activation code (0: none, 1: GELU, 2: ReLU); `residual`: an f32
/// matrix of the output's shape added after the bias (then `out` is f32 and `act` 0).
struct Linear {
    out: DType,
    act: i32,
    residual: Option<Tensor>,
}

impl CustomOp3 for Linear {
    fn name(&self) -> &'static str {
        "mimco-linear"
    }

    cuda_only!(3);

    fn cuda_fwd(
        &self,
        xs: &CudaStorage,
        xl: &Layout,
        ws: &CudaStorage,
        wl: &Layout,
        bs: &CudaStorage,
        bl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (rows, inputs) = xl.shape().dims2()?;
        let (outputs, w_in) = wl.shape().dims2()?;
        if w_in != inputs || bl.shape().elem_count() != outputs || !wl.is_contiguous() {
            bail!(
                "linear: x {:?}, weight {:?}, bias {:?}",
                xl.dims(),
                wl.dims(),
                bl.dims()
            );
        }
        // The weight in the input's dtype: an f32 master weight is cast here, a weight
        // already cast (the frozen teacher's, the blocks node's) is used as it is.
        let w = match xs.dtype() {
            dt if dt == ws.dtype() => None,
            dt => Some(ws.to_dtype(wl, dt)?),
        };
        let (w, w_at) = match &w {
            Some(w) => (w, Layout::contiguous((outputs, inputs))),
            None => (ws, wl.clone()),
        };
        let dev = xs.device();
        // The residual's storage stays borrowed until the launch is queued.
        let residual = self.residual.as_ref().map(Tensor::storage_and_layout);
        let residual = match &residual {
            Some((s, l)) => match &**s {
                candle_core::Storage::Cuda(s) if l.is_contiguous() => Some((s, l)),
                _ => bail!("linear: the residual is not a contiguous GPU tensor"),
            },
            None => None,
        };
        if self.act == 0 && bl.is_contiguous() && epilogue::on() {
            // The product with the bias (and the residual) in its epilogue.
            let y = alloc(dev, self.out, rows * outputs)?;
            let res = match residual {
                Some((s, l)) => Some(address(s, l.start_offset())?),
                None => None,
            };
            // cuBLASLt reads the bias in the output's dtype: a copy of it for bf16.
            let bias = match self.out {
                DType::F32 => None,
                dt => Some(bs.to_dtype(bl, dt)?),
            };
            let bias = match &bias {
                Some(b) => address(b, 0)?,
                None => address(bs, bl.start_offset())?,
            };
            let ran = epilogue::linear_forward(
                dev,
                (xs.dtype(), self.out),
                (rows, inputs, outputs),
                address(xs, xl.start_offset())?,
                address(w, w_at.start_offset())?,
                bias,
                res,
                address(&y, 0)?,
            )?;
            if ran {
                return Ok((y, Shape::from((rows, outputs))));
            }
        }
        let y = xs.matmul(w, (1, rows, outputs, inputs), xl, &w_at.transpose(0, 1)?)?;
        let b = contiguous::<f32>(bs, bl, "bias")?;
        let in_dt = dtype_name(xs.dtype())?;
        let n = rows * outputs;
        let y_at = Layout::contiguous((rows, outputs));
        let res = match residual {
            Some((s, l)) => Some(contiguous::<f32>(s, l, "residual")?),
            None => None,
        };
        // bias_act_fwd_<dt>(x, bias, y, n, cols, act), bias_add_<in>_<out>(x, bias, y, n,
        // cols) or bias_add_res_<in>_f32(x, bias, res, y, n, cols).
        let f = match (&res, self.act) {
            (Some(_), _) => func(dev, &format!("bias_add_res_{in_dt}_f32"))?,
            (None, 0) => func(dev, &format!("bias_add_{in_dt}_{}", dtype_name(self.out)?))?,
            _ => func(dev, &format!("bias_act_fwd_{in_dt}"))?,
        };
        fn go<I: CudaDType + DeviceRepr, O: CudaDType + DeviceRepr>(
            dev: &CudaDevice,
            f: &CudaFunction,
            y: CudaView<I>,
            (b, res): (&CudaView<f32>, Option<&CudaView<f32>>),
            (n, cols, act): (usize, usize, i32),
        ) -> Result<CudaSlice<O>> {
            let out = unsafe { dev.alloc::<O>(n)? };
            let (n_i, cols_i) = (n as i64, cols as i32);
            let stream = dev.cuda_stream();
            let mut l = stream.launch_builder(f);
            l.arg(&y).arg(b);
            if let Some(res) = res {
                l.arg(res);
            }
            l.arg(&out).arg(&n_i).arg(&cols_i);
            if act != 0 {
                l.arg(&act);
            }
            unsafe { l.launch(elementwise_grid(n)) }.w()?;
            Ok(out)
        }
        let (inputs, shape) = ((&b, res.as_ref()), (n, outputs, self.act));
        let slice = match (xs.dtype(), self.out) {
            (DType::F32, _) => CudaStorageSlice::F32(go::<f32, f32>(
                dev,
                &f,
                contiguous(&y, &y_at, "y")?,
                inputs,
                shape,
            )?),
            (_, DType::F32) => CudaStorageSlice::F32(go::<bf16, f32>(
                dev,
                &f,
                contiguous(&y, &y_at, "y")?,
                inputs,
                shape,
            )?),
            _ => CudaStorageSlice::BF16(go::<bf16, bf16>(
                dev,
                &f,
                contiguous(&y, &y_at, "y")?,
                inputs,
                shape,
            )?),
        };
        Ok((wrap(slice, dev), Shape::from((rows, outputs))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        bias: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, db) = linear_code_bwd(x, weight, bias, self.act, grad)?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

/// The gradients `(dx, dweight, dbias)` of [`linear()`] at `x`, `weight`, `bias` for the
/// output gradient `dy`: `dx` in the dtype of `x`, the others f32. With an activation the
/// product is recomputed.
pub fn linear_bwd(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    act: Act,
    dy: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    linear_code_bwd(&x.contiguous()?, weight, bias, act_code(act), dy)
}

fn linear_code_bwd(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    act: i32,
    grad: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    let w = weight.to_dtype(x.dtype())?;
    let g = match act {
        0 => grad.contiguous()?,
        act => {
            let g = grad.to_dtype(x.dtype())?.contiguous()?;
            x.matmul(&w.t()?)?
                .apply_op3_no_bwd(bias, &g, &BiasActBwd(act))?
        }
    };
    let g_in = g.to_dtype(x.dtype())?;
    let dx = g_in.matmul(&w)?;
    let (dw, db) = match weight_grad(x, &g_in)? {
        Some(both) => both,
        None => (
            g_in.t()?.matmul(x)?.to_dtype(DType::F32)?,
            g.apply_op1_no_bwd(&ColumnSum)?,
        ),
    };
    Ok((dx, dw, db))
}

/// `(dw, db)` in f32 for the input `x` `(rows, in)` and the output gradient `g` `(rows,
/// out)` in the dtype of `x`, by one cuBLASLt product; `None` where it does not take them.
fn weight_grad(x: &Tensor, g: &Tensor) -> Result<Option<(Tensor, Tensor)>> {
    let candle_core::Device::Cuda(dev) = x.device() else {
        return Ok(None);
    };
    if !epilogue::on() {
        return Ok(None);
    }
    let ((rows, ins), outs) = (x.dims2()?, g.dim(1)?);
    let (x, g) = (x.contiguous()?, g.contiguous()?);
    let dw = alloc(dev, DType::F32, outs * ins)?;
    let db = alloc(dev, DType::F32, outs)?;
    let ran = {
        let ((xs, xl), (gs, gl)) = (x.storage_and_layout(), g.storage_and_layout());
        let (Storage::Cuda(xs), Storage::Cuda(gs)) = (&*xs, &*gs) else {
            return Ok(None);
        };
        epilogue::linear_weight_grad(
            dev,
            x.dtype(),
            (rows, ins, outs),
            address(xs, xl.start_offset())?,
            address(gs, gl.start_offset())?,
            address(&dw, 0)?,
            address(&db, 0)?,
        )?
    };
    let tensor =
        |s, shape: Shape| Tensor::from_storage(Storage::Cuda(s), shape, BackpropOp::none(), false);
    Ok(ran.then(|| {
        (
            tensor(dw, Shape::from((outs, ins))),
            tensor(db, Shape::from(outs)),
        )
    }))
}

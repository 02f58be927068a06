//! The fused kernels against the composed ops (`mimco bench kernels`), on fresh random
//! inputs of several shapes: forward outputs and every gradient, by relative L2 error
//! `|fused - reference| / |reference|` against the composed ops in f64 on the same GPU.
//! Before each fused launch the allocator's free memory is filled with NaN, so an output
//! element the kernel never wrote shows up as NaN, which fails the check.

use candle_core::{DType, Device, IndexOp, Result, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::functional::{self, Act};
use crate::optim::{AdamW, AdamWParams, Gradients};

/// One checked case.
#[derive(Clone, Debug)]
pub struct CheckRow {
    /// What was checked (`layer_norm y`, `attention dqkv`, ...).
    pub what: String,
    /// Input shape.
    pub shape: String,
    /// Dtype of the fused op's output.
    pub dtype: &'static str,
    /// Relative L2 error; NaN if any element was NaN.
    pub error: f64,
    /// Largest error that passes.
    pub tolerance: f64,
}

impl CheckRow {
    /// Finite and within tolerance.
    pub fn passed(&self) -> bool {
        self.error.is_finite() && self.error <= self.tolerance
    }
}

struct Checker {
    dev: Device,
    rng: ChaCha8Rng,
    rows: Vec<CheckRow>,
}

impl Checker {
    /// Runs the check `what`; an error (a kernel that refused its inputs, a failed
    /// launch) becomes a failing row that names it and the error, and the other checks
    /// still run.
    fn check(&mut self, what: &str, f: impl FnOnce(&mut Checker) -> Result<()>) {
        if let Err(e) = f(self) {
            let message = e.to_string();
            let first = message.lines().next().unwrap_or_default();
            self.rows.push(CheckRow {
                what: format!("{what}: error: {first}"),
                shape: String::new(),
                dtype: "-",
                error: f64::NAN,
                tolerance: 0.0,
            });
        }
    }

    fn random(&mut self, shape: &[usize], scale: f32, shift: f32) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|_| self.rng.random_range(-1.0f32..1.0) * scale + shift)
            .collect();
        Tensor::from_vec(v, shape, &self.dev)
    }

    /// Hands the allocator `bytes` of NaN and frees them, so that the next allocations
    /// start out as NaN.
    fn poison(&self, elements: usize) -> Result<()> {
        drop(Tensor::full(f32::NAN, elements, &self.dev)?);
        Ok(())
    }

    fn record(
        &mut self,
        what: &str,
        shape: &[usize],
        dtype: DType,
        got: &Tensor,
        want: &Tensor,
        tolerance: f64,
    ) -> Result<()> {
        let got = got.to_dtype(DType::F64)?;
        let diff = (&got - want)?.sqr()?.sum_all()?.to_scalar::<f64>()?.sqrt();
        let norm = want.sqr()?.sum_all()?.to_scalar::<f64>()?.sqrt();
        let nans = got
            .ne(&got)?
            .to_dtype(DType::F64)?
            .sum_all()?
            .to_scalar::<f64>()?;
        let error = match nans > 0.0 {
            true => f64::NAN,
            false => diff / norm.max(1e-300),
        };
        self.rows.push(CheckRow {
            what: what.into(),
            shape: format!("{shape:?}"),
            dtype: label(dtype),
            error,
            tolerance,
        });
        Ok(())
    }
}

/// Runs every check on `dev` (a CUDA device) from `seed`.
pub fn run(dev: &Device, seed: u64) -> Result<Vec<CheckRow>> {
    let mut c = Checker {
        dev: dev.clone(),
        rng: ChaCha8Rng::seed_from_u64(seed),
        rows: Vec::new(),
    };
    for shape in [[3, 64], [788, 384], [50, 768], [7, 1000]] {
        for dtype in [DType::F32, DType::BF16] {
            let what = format!("layer_norm {shape:?} {dtype:?}");
            c.check(&what, |c| layer_norm(c, &shape, dtype));
        }
    }
    for shape in [
        [2, 6, 197, 64],
        [1, 3, 50, 32],
        [3, 2, 17, 64],
        [1, 2, 1000, 16],
        // Heads of 20, 12 and 10 bytes: the heads' copies in 4-, 8- and 2-byte units.
        [2, 3, 9, 5],
        [1, 2, 7, 6],
    ] {
        for dtype in [DType::F32, DType::BF16] {
            let what = format!("attention {shape:?} {dtype:?}");
            c.check(&what, |c| attention(c, &shape, dtype));
        }
    }
    for (shape, outputs) in [([788, 384], 1152), ([50, 768], 384), ([3, 1000], 7)] {
        let mut cases = vec![(Act::Identity, (DType::BF16, DType::F32))];
        for act in [Act::Identity, Act::Gelu, Act::Relu] {
            cases.push((act, (DType::F32, DType::F32)));
            cases.push((act, (DType::BF16, DType::BF16)));
        }
        for (act, dtypes) in cases {
            let what = format!("linear {shape:?} -> {outputs} {act:?} {dtypes:?}");
            c.check(&what, |c| linear(c, &shape, outputs, act, dtypes));
        }
    }
    c.check("linear epilogues", linear_epilogues);
    for (shape, p) in [([4, 3, 224, 224], 16), ([2, 3, 40, 24], 8)] {
        for dtype in [DType::F32, DType::BF16] {
            let what = format!("images {shape:?} {dtype:?}");
            c.check(&what, |c| images(c, &shape, p, dtype));
        }
    }
    for sizes in [(3000, 256, 4096), (7, 16, 33)] {
        for product in [DType::F32, DType::BF16] {
            let what = format!("info_nce {sizes:?} {product:?}");
            c.check(&what, |c| info_nce(c, sizes, product));
        }
    }
    for shape in [[6000, 384], [5, 3]] {
        c.check(&format!("gather_rows {shape:?}"), |c| {
            gather_rows(c, &shape)
        });
    }
    for shape in [(8, 196, 384), (3, 5, 300)] {
        c.check(&format!("tokens {shape:?}"), |c| tokens(c, shape));
    }
    c.check("adamw", |c| adamw(c, &[[384, 1536], [7, 3]]));
    c.check("upload", upload);
    c.check("device decode", device_decode);
    c.check("sum_squares", sum_squares);
    for dtype in [DType::F32, DType::BF16] {
        c.check(&format!("vit blocks {dtype:?}"), |c| vit_blocks(c, dtype));
    }
    Ok(c.rows)
}

/// A batch-sized copy from pinned memory on the trainer's copy stream, read back on the
/// compute stream once it waited: every byte arrives (without the wait the read back
/// would race the copy).
fn upload(c: &mut Checker) -> Result<()> {
    let Device::Cuda(dev) = c.dev.clone() else {
        candle_core::bail!("upload: not a CUDA device");
    };
    let shape = [256, 1, 3, 224, 224];
    let n: usize = shape.iter().product();
    let mut pinned = (crate::device::batch_allocator(&c.dev).expect("CUDA"))(n);
    c.rng.fill(&mut pinned[..]);
    // A busy compute stream, as in training, so that a missing wait would show.
    let busy = c.random(&[4096, 4096], 1.0, 0.0)?;
    let _ = busy.matmul(&busy)?;
    let (images, copy) = super::Uploader::new(&dev)?.start(&pinned, shape.as_slice(), None)?;
    copy.ready()?;
    let got = images.flatten_all()?.to_vec1::<u8>()?;
    let wrong = got
        .iter()
        .zip(pinned.iter())
        .filter(|(a, b)| a != b)
        .count();
    c.rows.push(CheckRow {
        what: "upload on the copy stream (bytes wrong)".into(),
        shape: format!("{shape:?}"),
        dtype: "u8",
        error: wrong as f64 / n as f64,
        tolerance: 0.0,
    });
    Ok(())
}

/// JPEGs decoded on the GPU for a batch left encoded (nvJPEG's hardware decoder, then
/// `crop_resize_u8`) against the loader's CPU decode of the same crops (libjpeg-turbo and
/// `fast_image_resize`): real-photo JPEGs from shardtool's generator, 180-500 px, its
/// greyscale JPEG among them (its CMYK JPEG and PNG, which the loader decodes itself, left
/// out as the loader leaves them), random crops and flips; every third image comes decoded
/// (copied into its slot, not decoded).
/// The decoders' IDCT and upsampling differ by a level or two; a crop, a flip or a slot
/// out of place is far off. A second row fails unless the hardware took every image left
/// to it (none fell back to the CPU).
fn device_decode(c: &mut Checker) -> Result<()> {
    let Device::Cuda(dev) = c.dev.clone() else {
        candle_core::bail!("device decode: not a CUDA device");
    };
    let msg = |e: &dyn std::fmt::Display| candle_core::Error::Msg(e.to_string());
    let root = std::env::temp_dir().join(format!("mimco-decode-check-{}", std::process::id()));
    let spec = shardtool::synth::SynthSpec {
        classes: 1,
        train_per_class: 12,
        val_per_class: 0,
        flat_val: false,
        quirks: true,
        bad_files: false,
        short_side: (180, 500),
        quality: (85, 98),
        seed: 7,
    };
    let written = shardtool::synth::write_imagenet_like(&root, &spec, 2);
    let folder = root.join("train").join(shardtool::synth::wnid(0));
    let mut files: Vec<_> = std::fs::read_dir(&folder)
        .map_err(|e| msg(&e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    files.sort();
    let jpegs: Vec<Vec<u8>> = files.iter().filter_map(|f| std::fs::read(f).ok()).collect();
    let _ = std::fs::remove_dir_all(&root);
    written.map_err(|e| msg(&e))?;
    let size = 224u32;
    let augment = pipeline::TransformConfig::default()
        .build()
        .map_err(|e| msg(&e))?;
    let mut cpu = pipeline::decode::CropDecoder::default();
    let mut encoded = Vec::new();
    for jpeg in jpegs {
        let inspected = cpu.inspect(&jpeg).map_err(|e| msg(&e))?;
        if !inspected.hardware_decodable {
            continue; // the CMYK JPEG and the PNG
        }
        let (slot, dims) = (encoded.len(), inspected.dims);
        let p = augment.sample(0, dims, &mut c.rng);
        encoded.push(pipeline::Encoded {
            slot,
            jpeg,
            dims,
            crop: p.crop,
            flip: p.flip,
        });
    }
    let (b, n) = (encoded.len(), 3 * (size as usize).pow(2));
    let (mut want, mut hwc) = (vec![0u8; b * n], vec![0u8; n]);
    for e in &encoded {
        let chw = &mut want[e.slot * n..(e.slot + 1) * n];
        e.decode(&mut cpu, size, &mut hwc, chw)
            .map_err(|e| msg(&e))?;
    }
    // Every third image comes decoded, as the loader's PNGs do: copied, not decoded.
    let (copied, encoded): (Vec<_>, Vec<_>) = encoded.into_iter().partition(|e| e.slot % 3 == 2);
    let mut host = vec![0u8; b * n];
    let decoded: Vec<_> = copied
        .iter()
        .map(|e| e.slot * n..(e.slot + 1) * n)
        .collect();
    for r in &decoded {
        host[r.clone()].copy_from_slice(&want[r.clone()]);
    }
    let keys: Vec<String> = (0..b).map(|i| format!("check-{i}")).collect();
    let uploader = super::Uploader::new(&dev)?;
    let decode = super::ToDecode {
        decoded: &decoded,
        encoded: &encoded,
        keys: &keys,
        size,
    };
    let shape = [b, 1, 3, size as usize, size as usize];
    let (images, copy) = uploader.start(&host, shape.as_slice(), Some(decode))?;
    copy.ready()?;
    let got = images.flatten_all()?.to_vec1::<u8>()?;
    let (mut diff, mut norm) = (0f64, 0f64);
    for (g, w) in got.iter().zip(&want) {
        diff += (f64::from(*g) - f64::from(*w)).powi(2);
        norm += f64::from(*w).powi(2);
    }
    c.rows.push(CheckRow {
        what: "JPEGs decoded on the GPU vs the loader's CPU decode".into(),
        shape: format!("{shape:?}"),
        dtype: "u8",
        error: (diff / norm.max(1.0)).sqrt(),
        tolerance: 0.03,
    });
    let done = uploader.decoded();
    let (left, took) = (encoded.len(), done.on_gpu);
    c.rows.push(CheckRow {
        what: format!("JPEGs nvJPEG's hardware took ({took} of {left})"),
        shape: format!("{shape:?}"),
        dtype: "u8",
        error: (left - took) as f64 / left as f64,
        tolerance: 0.0,
    });
    Ok(())
}

/// The ViT blocks as one graph node with their hand-written backward against the same
/// fused ops as graph nodes under Candle's autograd: output and every gradient.
fn vit_blocks(c: &mut Checker, dtype: DType) -> Result<()> {
    let (_, tolerance) = tolerances(dtype);
    for (name, error) in crate::models::blocks::compare_stack(&c.dev, dtype)? {
        c.rows.push(CheckRow {
            what: format!("vit blocks as one node: {name}"),
            shape: "[15, 64], 2 blocks".into(),
            dtype: label(dtype),
            error,
            tolerance,
        });
    }
    Ok(())
}

fn label(dtype: DType) -> &'static str {
    match dtype {
        DType::BF16 => "bf16",
        _ => "f32",
    }
}

fn tolerances(dtype: DType) -> (f64, f64) {
    match dtype {
        DType::BF16 => (1e-2, 1.5e-2),
        _ => (1e-5, 1e-4),
    }
}

fn layer_norm(c: &mut Checker, shape: &[usize], dtype: DType) -> Result<()> {
    let d = shape[shape.len() - 1];
    let x = Var::from_tensor(&c.random(shape, 2.0, 0.5)?)?;
    let w = Var::from_tensor(&c.random(&[d], 1.0, 1.0)?)?;
    let b = Var::from_tensor(&c.random(&[d], 0.5, 0.0)?)?;
    let probe = c.random(shape, 1.0, 0.0)?;
    c.poison(4 * x.elem_count())?;
    let y = super::layer_norm(&x, &w, &b, 1e-6, dtype)?;
    c.poison(4 * x.elem_count())?;
    let grads = y.to_dtype(DType::F32)?.mul(&probe)?.sum_all()?.backward()?;
    let f64s = |t: &Tensor| t.to_dtype(DType::F64).and_then(|t| Var::from_tensor(&t));
    let (x64, w64, b64) = (f64s(&x)?, f64s(&w)?, f64s(&b)?);
    let y64 = functional::layer_norm(&x64, &w64, &b64, 1e-6)?;
    let g64 = y64
        .mul(&probe.to_dtype(DType::F64)?)?
        .sum_all()?
        .backward()?;
    let (fwd, bwd) = tolerances(dtype);
    c.record("layer_norm y", shape, dtype, &y, &y64, fwd)?;
    for (name, v, v64) in [("dx", &x, &x64), ("dweight", &w, &w64), ("dbias", &b, &b64)] {
        let (Some(got), Some(want)) = (grads.get(v), g64.get(v64)) else {
            candle_core::bail!("layer_norm: no gradient for {name}");
        };
        c.record(&format!("layer_norm {name}"), shape, dtype, got, want, bwd)?;
    }
    Ok(())
}

/// Attention on a packed `qkv` of `(B * N, 3 * H * E)` for `shape` `[B, H, N, E]`.
fn attention(c: &mut Checker, shape: &[usize], dtype: DType) -> Result<()> {
    let [b, h, n, e] = [shape[0], shape[1], shape[2], shape[3]];
    let scale = (e as f64).powf(-0.5);
    let qkv = Var::from_tensor(&c.random(&[b * n, 3 * h * e], 2.0, 0.0)?.to_dtype(dtype)?)?;
    let probe = c.random(&[b * n, h * e], 1.0, 0.0)?;
    c.poison(4 * 4 * qkv.elem_count())?;
    let y = super::attention_qkv(&qkv, n, h, scale)?;
    c.poison(4 * 4 * qkv.elem_count())?;
    let grads = y.to_dtype(DType::F32)?.mul(&probe)?.sum_all()?.backward()?;
    let x64 = Var::from_tensor(&qkv.to_dtype(DType::F64)?)?;
    let heads = x64.reshape((b, n, 3, h, e))?.permute((2, 0, 3, 1, 4))?;
    let part = |i: usize| heads.i(i)?.contiguous();
    let (q, k, v) = (part(0)?, part(1)?, part(2)?);
    let y64 = functional::softmax(&(q.matmul(&k.t()?)? * scale)?)?
        .matmul(&v)?
        .transpose(1, 2)?
        .reshape((b * n, h * e))?;
    let g64 = y64
        .mul(&probe.to_dtype(DType::F64)?)?
        .sum_all()?
        .backward()?;
    // Gradients pass through two more bf16 products than the output (see
    // functional::precision_tests for the same error without any kernel).
    let (fwd, bwd) = match dtype {
        DType::BF16 => (1e-2, 3e-2),
        _ => tolerances(dtype),
    };
    c.record("attention y", shape, dtype, &y, &y64, fwd)?;
    let (Some(got), Some(want)) = (grads.get(&qkv), g64.get(&x64)) else {
        candle_core::bail!("attention: no gradient for qkv");
    };
    c.record("attention dqkv", shape, dtype, got, want, bwd)?;
    // As the blocks node runs it: outside the graph, the backward reusing the forward's
    // logsumexp where the tensor-core kernels kept one.
    let x = qkv.as_tensor().detach();
    let (y, lse) = super::attention_qkv_lse(&x, n, h, scale)?;
    let what = match lse {
        Some(_) => "attention dqkv, kept logsumexp",
        None => "attention dqkv, outside the graph",
    };
    let got = super::attention_qkv_bwd(&x, &y, lse.as_ref(), n, h, scale, &probe)?;
    c.record(what, shape, dtype, &got, want, bwd)
}

/// A linear layer from `shape[1]` to `outputs` features on `shape[0]` rows, computed in
/// `dtype` and written in `out`.
fn linear(
    c: &mut Checker,
    shape: &[usize],
    outputs: usize,
    act: Act,
    (dtype, out): (DType, DType),
) -> Result<()> {
    let x = Var::from_tensor(&c.random(shape, 2.0, 0.0)?.to_dtype(dtype)?)?;
    let w = Var::from_tensor(&c.random(&[outputs, shape[1]], 0.1, 0.0)?)?;
    let b = Var::from_tensor(&c.random(&[outputs], 1.0, 0.0)?)?;
    let probe = c.random(&[shape[0], outputs], 1.0, 0.0)?;
    c.poison(4 * shape[0] * outputs)?;
    let y = super::linear(&x, &w, &b, act, out)?;
    c.poison(4 * shape[0] * outputs)?;
    let grads = y.to_dtype(DType::F32)?.mul(&probe)?.sum_all()?.backward()?;
    let f64s = |t: &Tensor| t.to_dtype(DType::F64).and_then(|t| Var::from_tensor(&t));
    let (x64, w64, b64) = (f64s(&x)?, f64s(&w)?, f64s(&b)?);
    let z64 = x64.matmul(&w64.t()?)?.broadcast_add(&b64)?;
    // ReLU's kink: where the rounded product crosses zero the bf16 layer and the f64
    // reference take different branches (about 0.1% of the elements here, 3e-2 of the
    // gradient's norm). The reference takes the branches the kernel took.
    let y64 = match act {
        Act::Relu => z64.mul(&y.gt(0.0)?.to_dtype(DType::F64)?)?,
        _ => act.apply(&z64)?,
    };
    let g64 = y64
        .mul(&probe.to_dtype(DType::F64)?)?
        .sum_all()?
        .backward()?;
    let (fwd, bwd) = tolerances(dtype);
    let what = |name: &str| format!("linear {act:?} {name} (to {})", out.as_str());
    c.record(&what("y"), shape, dtype, &y, &y64, fwd)?;
    for (name, v, v64) in [("dx", &x, &x64), ("dweight", &w, &w64), ("dbias", &b, &b64)] {
        let (Some(got), Some(want)) = (grads.get(v), g64.get(v64)) else {
            candle_core::bail!("linear: no gradient for {name}");
        };
        c.record(&what(name), shape, dtype, got, want, bwd)?;
    }
    if act == Act::Identity && out == DType::F32 {
        // With the residual join (the teacher's and the blocks node's forward).
        let residual = c.random(&[shape[0], outputs], 1.0, 0.0)?;
        let y = super::linear_residual(&x, &w, &b, &residual)?;
        let y64 = (&z64 + residual.to_dtype(DType::F64)?)?;
        c.record(&what("y + residual"), shape, dtype, &y, &y64, fwd)?;
    }
    Ok(())
}

/// That a ViT-S block's linear layer (bf16, 788 x 384 -> 1152) takes cuBLASLt's
/// epilogues, not the separate passes (which the other linear rows would pass as well):
/// the forward with the residual join, the forward without, and the weight gradient.
fn linear_epilogues(c: &mut Checker) -> Result<()> {
    let x = Var::from_tensor(&c.random(&[788, 384], 2.0, 0.0)?.to_dtype(DType::BF16)?)?;
    let w = c.random(&[1152, 384], 0.1, 0.0)?;
    let b = c.random(&[1152], 1.0, 0.0)?;
    let residual = c.random(&[788, 1152], 1.0, 0.0)?;
    let before = super::epilogue::launched();
    super::linear_residual(&x, &w, &b, &residual)?;
    let y = super::linear(&x, &w, &b, Act::Identity, DType::BF16)?;
    y.to_dtype(DType::F32)?.sum_all()?.backward()?;
    let missing = 3u64.saturating_sub(super::epilogue::launched() - before);
    c.rows.push(CheckRow {
        what: "linear in cuBLASLt's epilogues (of 3 products, not)".into(),
        shape: "[788, 384] -> 1152".into(),
        dtype: "bf16",
        error: missing as f64,
        tolerance: 0.0,
    });
    Ok(())
}

/// InfoNCE of `m` unit rows of width `c` against a queue of `k` keys, tau 0.2.
/// InfoNCE with the product `q queue^T` taking its inputs in `product`; the reference
/// rounds them the same way, then computes in f64.
fn info_nce(c: &mut Checker, (m, width, k): (usize, usize, usize), product: DType) -> Result<()> {
    let tau = 0.2;
    let unit = |c: &mut Checker, rows: usize| -> Result<Tensor> {
        functional::l2_normalize(&c.random(&[rows, width], 1.0, 0.0)?)
    };
    let q = Var::from_tensor(&unit(c, m)?)?;
    let (keys, queue) = (unit(c, m)?, unit(c, k)?);
    let probe = c.random(&[m], 1.0, 0.0)?;
    c.poison(4 * m * k)?;
    let losses = super::info_nce(&q, &keys, &queue, tau, product)?;
    let grads = losses.mul(&probe)?.sum_all()?.backward()?;
    let f64s = |t: &Tensor| t.to_dtype(DType::F64);
    let q64 = Var::from_tensor(&f64s(&q)?)?;
    let (k64, n64) = (f64s(&keys)?, f64s(&queue.to_dtype(product)?)?);
    let positive = q64.mul(&k64)?.sum_keepdim(1)?;
    // The product's q rounded as the op takes it; the gradient still flows to q64.
    let q_product = (q64.as_tensor() + (f64s(&q.to_dtype(product)?)? - f64s(&q)?)?)?;
    let logits = (Tensor::cat(&[&positive, &q_product.matmul(&n64.t()?)?], 1)? / tau)?;
    let want = (functional::logsumexp(&logits)? - logits.narrow(1, 0, 1)?)?.squeeze(1)?;
    let g64 = want.mul(&f64s(&probe)?)?.sum_all()?.backward()?;
    let shape = [m, width, k];
    // The loss is f32 either way; the gradient's product takes bf16 inputs under bf16.
    let (fwd, _) = tolerances(DType::F32);
    let (_, bwd) = tolerances(product);
    c.record("info_nce loss", &shape, product, &losses, &want, fwd)?;
    let (Some(got), Some(want)) = (grads.get(&q), g64.get(&q64)) else {
        candle_core::bail!("info_nce: no gradient for q");
    };
    c.record("info_nce dq", &shape, product, got, want, bwd)
}

/// The images' way in: uint8 to normalised f32, then to patch rows in `dtype`.
fn images(c: &mut Checker, shape: &[usize], p: usize, dtype: DType) -> Result<()> {
    let n: usize = shape.iter().product();
    let pixels: Vec<u8> = (0..n).map(|_| c.rng.random()).collect();
    let x = Tensor::from_vec(pixels, shape, &c.dev)?;
    let (scale, shift) = ([0.5f32, 0.25, 2.0], [-1.0f32, 0.5, 0.0]);
    c.poison(4 * n)?;
    let normed = super::normalize_u8(&x, scale, shift)?;
    let f64s = |v: [f32; 3], dev: &Device| Tensor::from_slice(&v.map(f64::from), (3, 1, 1), dev);
    let want = x
        .to_dtype(DType::F64)?
        .broadcast_mul(&f64s(scale, &c.dev)?)?
        .broadcast_add(&f64s(shift, &c.dev)?)?;
    c.record("normalize", shape, DType::F32, &normed, &want, 1e-6)?;
    c.poison(4 * n)?;
    let rows = super::patchify(&normed, p, dtype)?;
    let want = crate::models::vit::patchify(&want, p)?;
    let (b, tokens, k) = want.dims3()?;
    let tolerance = tolerances(dtype).0;
    c.record(
        "patchify",
        shape,
        dtype,
        &rows,
        &want.reshape((b * tokens, k))?,
        tolerance,
    )
}

/// The squared norm of a few gradients of different sizes, against f64.
fn sum_squares(c: &mut Checker) -> Result<()> {
    let grads = [vec![384, 1536], vec![7], vec![1, 197, 384]]
        .iter()
        .map(|s| c.random(s, 3.0, 0.5))
        .collect::<Result<Vec<_>>>()?;
    let got = super::sum_squares(&grads)?;
    let mut want = 0.0;
    for g in &grads {
        want += g
            .to_dtype(DType::F64)?
            .sqr()?
            .sum_all()?
            .to_scalar::<f64>()?;
    }
    let scalar = |v: f64| Tensor::new(&[v], &c.dev);
    c.record(
        "sum_squares",
        &[grads.len()],
        DType::F32,
        &scalar(got)?,
        &scalar(want)?,
        1e-6,
    )
}

/// Rows of a `shape` matrix picked by index, some twice, some never.
fn gather_rows(c: &mut Checker, shape: &[usize]) -> Result<()> {
    let rows = shape[0];
    let x = Var::from_tensor(&c.random(shape, 2.0, 0.0)?)?;
    let ids: Vec<u32> = (0..rows + rows / 2)
        .map(|_| c.rng.random_range(0..rows as u32))
        .collect();
    let ids = Tensor::new(ids.as_slice(), &c.dev)?;
    let probe = c.random(&[ids.dim(0)?, shape[1]], 1.0, 0.0)?;
    c.poison(4 * x.elem_count())?;
    let y = super::gather_rows(&x, &ids)?;
    let grads = y.mul(&probe)?.sum_all()?.backward()?;
    let x64 = Var::from_tensor(&x.to_dtype(DType::F64)?)?;
    let y64 = x64.index_select(&ids, 0)?;
    let g64 = y64
        .mul(&probe.to_dtype(DType::F64)?)?
        .sum_all()?
        .backward()?;
    let (fwd, bwd) = tolerances(DType::F32);
    c.record("gather_rows y", shape, DType::F32, &y, &y64, fwd)?;
    let (Some(got), Some(want)) = (grads.get(&x), g64.get(&x64)) else {
        candle_core::bail!("gather_rows: no gradient for x");
    };
    c.record("gather_rows dx", shape, DType::F32, got, want, bwd)
}

/// The stem's token stream (mask token where masked, CLS token, positions) against the
/// composed ops in f64: the output and the gradients of the patches, the mask token, the
/// CLS token and the position table.
fn tokens(c: &mut Checker, (b, n, d): (usize, usize, usize)) -> Result<()> {
    let shape = [b, n, d];
    let x = Var::from_tensor(&c.random(&shape, 2.0, 0.0)?)?;
    let token = Var::from_tensor(&c.random(&[1, 1, d], 1.0, 0.0)?)?;
    let cls = Var::from_tensor(&c.random(&[1, 1, d], 1.0, 0.0)?)?;
    let pos = Var::from_tensor(&c.random(&[1, 1 + n, d], 1.0, 0.0)?)?;
    let mask: Vec<f32> = (0..b * n)
        .map(|_| f32::from(c.rng.random_range(0..10u8) < 6))
        .collect();
    let mask = Tensor::from_vec(mask, (b, n), &c.dev)?;
    let probe = c.random(&[b, 1 + n, d], 1.0, 0.0)?;
    c.poison(4 * b * (1 + n) * d)?;
    let y = super::tokens(&x, &mask, &token, &cls, &pos)?;
    c.poison(4 * b * (1 + n) * d)?;
    let grads = y.mul(&probe)?.sum_all()?.backward()?;
    let f64s = |t: &Tensor| t.to_dtype(DType::F64).and_then(|t| Var::from_tensor(&t));
    let (x64, token64, cls64, pos64) = (f64s(&x)?, f64s(&token)?, f64s(&cls)?, f64s(&pos)?);
    let y64 = functional::tokens(&x64, Some((&mask, &token64)), &cls64, &pos64)?;
    let g64 = y64
        .mul(&probe.to_dtype(DType::F64)?)?
        .sum_all()?
        .backward()?;
    let (fwd, bwd) = tolerances(DType::F32);
    c.record("tokens y", &shape, DType::F32, &y, &y64, fwd)?;
    for (name, v, v64) in [
        ("dx", &x, &x64),
        ("dtoken", &token, &token64),
        ("dcls", &cls, &cls64),
        ("dpos", &pos, &pos64),
    ] {
        let (Some(got), Some(want)) = (grads.get(v), g64.get(v64)) else {
            candle_core::bail!("tokens: no gradient for {name}");
        };
        c.record(
            &format!("tokens {name}"),
            &shape,
            DType::F32,
            got,
            want,
            bwd,
        )?;
    }
    Ok(())
}

/// Three steps of the fused AdamW against the composed one on the CPU, both in f32, with
/// one decayed and one undecayed parameter and a gradient scale (averaging, clipping).
fn adamw(c: &mut Checker, shapes: &[[usize; 2]]) -> Result<()> {
    let params = AdamWParams {
        betas: (0.9, 0.95),
        eps: 1e-8,
        weight_decay: 0.05,
    };
    let names = ["a.weight", "a.bias"];
    let init: Vec<Tensor> = shapes
        .iter()
        .map(|s| c.random(s, 1.0, 0.0))
        .collect::<Result<_>>()?;
    let build = |dev: &Device| -> Result<(AdamW, Vec<Var>)> {
        let vars = init
            .iter()
            .map(|t| Var::from_tensor(&t.to_device(dev)?))
            .collect::<Result<Vec<_>>>()?;
        let named = names
            .iter()
            .map(|n| n.to_string())
            .zip(vars.clone())
            .collect();
        Ok((AdamW::new(named, params)?, vars))
    };
    let (mut fused, fused_vars) = build(&c.dev)?;
    let (mut cpu, cpu_vars) = build(&Device::Cpu)?;
    for step in 0..3 {
        let sums: Vec<Tensor> = shapes
            .iter()
            .map(|s| c.random(s, 0.5, 0.1))
            .collect::<Result<_>>()?;
        let scale = 0.37 + 0.1 * step as f64;
        c.poison(3 * init.iter().map(|t| t.elem_count()).sum::<usize>())?;
        let on = |dev: &Device| -> Result<Gradients> {
            Ok(Gradients {
                sums: sums
                    .iter()
                    .map(|t| t.to_device(dev))
                    .collect::<Result<_>>()?,
                scale,
                norm: 0.0,
            })
        };
        fused.step(&on(&c.dev)?, 1e-3)?;
        cpu.step(&on(&Device::Cpu)?, 1e-3)?;
    }
    for (i, shape) in shapes.iter().enumerate() {
        let want = cpu_vars[i]
            .as_tensor()
            .to_dtype(DType::F64)?
            .to_device(&c.dev)?;
        let what = format!("adamw p ({})", names[i]);
        c.record(
            &what,
            shape,
            DType::F32,
            fused_vars[i].as_tensor(),
            &want,
            1e-6,
        )?;
    }
    let (fs, _) = fused.state();
    let (cs, _) = cpu.state();
    for (key, want) in cs {
        let want = want.to_dtype(DType::F64)?.to_device(&c.dev)?;
        let shape = want.dims().to_vec();
        c.record(
            &format!("adamw {key}"),
            &shape,
            DType::F32,
            &fs[&key],
            &want,
            1e-6,
        )?;
    }
    Ok(())
}

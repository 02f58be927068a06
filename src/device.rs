//! The compute device a command runs on (`--device`).

use anyhow::{Context, bail};
use candle_core::Device;

/// `cpu`, `cuda`, `cuda:N`, or `auto`: a GPU when this build has CUDA and one answers,
/// else the CPU. `cuda` and `auto` take GPU `LOCAL_RANK` (set by torchrun, one process
/// per GPU), or GPU 0.
pub fn parse(name: &str) -> anyhow::Result<Device> {
    let local_rank = || -> anyhow::Result<usize> {
        match std::env::var("LOCAL_RANK") {
            Ok(v) => v
                .parse()
                .with_context(|| format!("LOCAL_RANK={v} is not a GPU number")),
            Err(_) => Ok(0),
        }
    };
    let gpu = |ordinal: usize| -> anyhow::Result<Device> {
        if !cfg!(feature = "cuda") {
            bail!(
                "--device {name}: this mimco was built without CUDA. Rebuild with `cargo build --release --features cuda` (needs a CUDA toolkit), or pass --device cpu"
            );
        }
        Device::new_cuda(ordinal)
            .with_context(|| format!("opening CUDA device {ordinal} (is a GPU visible?)"))
    };
    match name {
        "cpu" => Ok(Device::Cpu),
        "cuda" => gpu(local_rank()?),
        "auto" if cfg!(feature = "cuda") => {
            Ok(Device::new_cuda(local_rank()?).unwrap_or(Device::Cpu))
        }
        "auto" => Ok(Device::Cpu),
        other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(n)) => gpu(n),
            _ => bail!("--device {other}: expected cpu, cuda, cuda:N or auto"),
        },
    }
}

/// Bytes of device memory `(free, total)` on the current CUDA context; `None` on the CPU.
pub fn memory(device: &Device) -> Option<(usize, usize)> {
    #[cfg(feature = "cuda")]
    if device.is_cuda() {
        return candle_core::cuda_backend::cudarc::driver::result::mem_get_info().ok();
    }
    let _ = device;
    None
}

/// The pipeline's batch-buffer allocator for training on `device`: pinned host memory on
/// CUDA (uploads without a bounce buffer), `None` (plain vectors) on the CPU.
pub fn batch_allocator(device: &Device) -> Option<pipeline::Allocator> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(dev) = device {
        return Some(crate::cuda::pinned::allocator(dev));
    }
    let _ = device;
    None
}

/// A short name: `cpu` or `cuda:N`.
pub fn describe(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        other => format!("{other:?}"),
    }
}

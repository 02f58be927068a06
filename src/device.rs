//! The compute device a command runs on (`--device`).

use anyhow::{Context, bail};
use candle_core::Device;

/// `cpu`, `cuda` (GPU 0), `cuda:N`, or `auto`: the first GPU when this build has CUDA and
/// a GPU answers, else the CPU.
pub fn parse(name: &str) -> anyhow::Result<Device> {
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
        "cuda" => gpu(0),
        "auto" if cfg!(feature = "cuda") => Ok(Device::new_cuda(0).unwrap_or(Device::Cpu)),
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

/// A short name: `cpu` or `cuda:N`.
pub fn describe(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        other => format!("{other:?}"),
    }
}

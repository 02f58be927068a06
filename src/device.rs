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
        cuda(ordinal).with_context(|| format!("opening CUDA device {ordinal} (is a GPU visible?)"))
    };
    match name {
        "cpu" => Ok(Device::Cpu),
        "cuda" => gpu(local_rank()?),
        "auto" if cfg!(feature = "cuda") => Ok(cuda(local_rank()?).unwrap_or(Device::Cpu)),
        "auto" => Ok(Device::Cpu),
        other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(n)) => gpu(n),
            _ => bail!("--device {other}: expected cpu, cuda, cuda:N or auto"),
        },
    }
}

/// CUDA device `ordinal` with cudarc's per-buffer event tracking off. The tracking only
/// orders work across streams, and everything of a step runs on the device's one stream;
/// left on, it creates and destroys two CUDA events for every tensor allocated, thousands
/// per step.
fn cuda(ordinal: usize) -> candle_core::Result<Device> {
    let device = Device::new_cuda(ordinal)?;
    #[cfg(feature = "cuda")]
    if let Device::Cuda(dev) = &device {
        // SAFETY: called before this device allocates anything; every kernel and copy of
        // mimco runs on `dev`'s stream (pinned host buffers keep their own events).
        unsafe { dev.disable_event_tracking() };
    }
    Ok(device)
}

/// Refuses `[data] device_decode` where no CUDA trainer would decode the JPEGs it leaves
/// encoded: on the CPU, and on a GPU where nvJPEG's hardware decoder cannot be made (no
/// nvJPEG library, or no JPEG engine); one error at start, not at the first batch.
pub fn check_device_decode(device: &Device, data: &pipeline::LoaderConfig) -> anyhow::Result<()> {
    if !data.device_decode {
        return Ok(());
    }
    if !device.is_cuda() {
        bail!(
            "[data] device_decode = true needs the CUDA trainer (--device cuda): set it to false"
        );
    }
    #[cfg(feature = "cuda")]
    if let Device::Cuda(dev) = device {
        // Made and dropped: the uploader makes its own at the first batch.
        crate::cuda::DeviceDecoder::new(dev).map_err(|e| {
            anyhow::anyhow!(
                "[data] device_decode = true, but there is no GPU JPEG decoder: {e}. Set \
                 device_decode = false to decode on the CPU"
            )
        })?;
    }
    Ok(())
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

/// Opens (`start`) or closes the range that a CUDA profiler started with
/// `--profile-from-start off` (Nsight Compute) or `--capture-range=cudaProfilerApi`
/// (Nsight Systems) records. Without a profiler attached, and on the CPU, it does nothing.
pub fn profiler_range(device: &Device, start: bool) -> anyhow::Result<()> {
    #[cfg(feature = "cuda")]
    if device.is_cuda() {
        use candle_core::cuda_backend::cudarc::driver::{profiler_start, profiler_stop};
        device.synchronize()?;
        match start {
            true => profiler_start(),
            false => profiler_stop(),
        }
        .context("the CUDA profiler API")?;
    }
    let _ = (device, start);
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_decode_is_refused_on_the_cpu() {
        let mut data = pipeline::LoaderConfig::default();
        assert!(check_device_decode(&Device::Cpu, &data).is_ok());
        data.device_decode = true;
        let message = check_device_decode(&Device::Cpu, &data)
            .unwrap_err()
            .to_string();
        assert!(message.contains("device_decode"), "{message}");
    }
}

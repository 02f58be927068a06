//! A tiny MimCo config that trains in seconds on the shards of `common::packed`, and the
//! other pieces the trainer tests share.
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use candle_core::{Device, Tensor};
use mimco::Config;
use mimco::train::{RunOptions, TeacherSource};
use pipeline::{StoreOptions, Topology};

/// `b` deterministic pseudo-random normalised images, `size` x `size`.
pub fn test_images(b: usize, size: usize, seed: u32) -> Tensor {
    let n = b * 3 * size * size;
    let v: Vec<f32> = (0..n as u32)
        .map(|i| {
            ((i.wrapping_mul(2_654_435_761).wrapping_add(seed * 97)) % 1000) as f32 / 500.0 - 1.0
        })
        .collect();
    Tensor::from_vec(v, (b, 3, size, size), &Device::Cpu).unwrap()
}

/// Options of a quiet single-process run of the shards at `data` into `out`.
pub fn run_options(
    data: &Path,
    out: &Path,
    resume: bool,
    teacher: Option<TeacherSource>,
) -> RunOptions {
    RunOptions {
        data: data.display().to_string(),
        store: StoreOptions::default(),
        topology: Topology::default(),
        out: out.to_path_buf(),
        resume,
        teacher,
        progress: false,
        stop: Arc::new(AtomicBool::new(false)),
        knn: None,
        device: candle_core::Device::Cpu,
    }
}

/// 32-px crops, 8-px patches (4x4 tokens), 8-px mask units, width 32, 2 blocks.
pub fn tiny_config(batch: usize, accumulation: usize) -> Config {
    let vit = r#"patch_size = 8
dim = 32
depth = 2
heads = 2
mlp_ratio = 2.0
pos_embed = "sincos"
ln_eps = 1e-6
"#;
    let text = format!(
        r#"[student]
{vit}
[teacher]
{vit}
[objective]
queue_len = 64
hidden = 64
out_dim = 32

[optim]
batch_size = {global}
warmup_epochs = 0.5
epochs = 4
base_lr = 2e-3

[train]
checkpoint_every = 0
log_every = 1

[data]
batch_size = {batch}
workers = 2
readers = 2
shuffle_buffer = 16
chunk_bytes = 4096

[data.transform]
size = 32
mask_unit = 8
"#,
        global = batch * accumulation
    );
    Config::from_toml(&text).unwrap()
}

/// [`tiny_config`] for MoCo v3 (two views, small heads) or SimMIM, without a teacher.
pub fn tiny_stage1_config(method: &str, batch: usize) -> Config {
    let mut c = tiny_config(batch, 1);
    c.method = toml::from_str::<std::collections::HashMap<String, mimco::config::MethodKind>>(
        &format!("m = \"{method}\""),
    )
    .unwrap()["m"];
    c.teacher = None;
    c.mocov3.dim = 32;
    c.mocov3.mlp_dim = 64;
    if method == "mocov3" {
        c.data.transform.set = pipeline::config::TransformSet::Mocov3;
        c.data.transform.scale = [0.08, 1.0];
        c.data.transform.blur_sigma = [0.1, 0.3];
    }
    c.check().unwrap();
    c
}

//! A tiny MimCo config that trains in seconds on the shards of `common::packed`.
use mimco::Config;

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

//! The trainer on CPU: gradients, masking, EMA, groups, checkpoints, resume, training.

mod common;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, IndexOp, Tensor};
use common::train::tiny_config;
use mimco::Config;
use mimco::method::Method;
use mimco::mimco::MimCo;
use mimco::models::Encoder;
use mimco::train::{Outcome, RunOptions, TeacherSource, run};
use mimco::trainer::Trainer;

fn random_images(b: usize, size: usize, seed: u32) -> Tensor {
    common::train::test_images(b, size, seed)
}

/// A MimCo trainer around a random teacher drawn from `teacher_seed`.
fn mimco_trainer(
    config: &Config,
    teacher_seed: u64,
    total: u64,
    per_epoch: f64,
    accumulation: usize,
) -> Trainer {
    let teacher =
        mimco::teacher::random(config.teacher().unwrap(), 32, teacher_seed, &Device::Cpu).unwrap();
    let method = Box::new(MimCo::new(config, teacher, &Device::Cpu).unwrap());
    Trainer::new(method, total, per_epoch, accumulation, &Device::Cpu).unwrap()
}

fn model(config: &Config) -> MimCo {
    let teacher = mimco::teacher::random(config.teacher().unwrap(), 32, 1, &Device::Cpu).unwrap();
    MimCo::new(config, teacher, &Device::Cpu).unwrap()
}

/// 4 images, 16 tokens each, 10 masked per image.
fn masks(b: usize) -> Vec<u8> {
    (0..b * 16)
        .map(|i| u8::from((i * 7 + i / 16) % 16 < 10))
        .collect()
}

#[test]
fn every_trainable_parameter_gets_a_finite_nonzero_gradient() {
    use mimco::config::{PatchLoss, Precision};
    use mimco::models::vit::PosEmbed;
    // The paper's set-up, in f32 and in mixed precision, and the l1 ablation with a
    // learned position embedding.
    for (patch_loss, pos_embed, precision) in [
        (PatchLoss::Contrastive, PosEmbed::Sincos, Precision::F32),
        (PatchLoss::Contrastive, PosEmbed::Sincos, Precision::Bf16),
        (PatchLoss::L1, PosEmbed::Learned, Precision::F32),
    ] {
        let mut config = tiny_config(4, 1);
        config.objective.patch_loss = patch_loss;
        config.student.pos_embed = pos_embed;
        config.train.precision = precision;
        let m = model(&config);
        let has_pos = m
            .trainable
            .vars()
            .iter()
            .any(|(n, _)| n == "student.pos_embed");
        assert_eq!(has_pos, pos_embed == PosEmbed::Learned);
        let losses = m.forward(&random_images(4, 32, 0), &masks(4)).unwrap();
        let grads = losses.total.backward().unwrap();
        let vars = m.trainable.vars();
        assert!(vars.len() > 30, "{} parameters", vars.len());
        for (name, var) in vars {
            let g = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{patch_loss:?}: {name} has no gradient"));
            let g: Vec<f32> = g.flatten_all().unwrap().to_vec1().unwrap();
            assert!(
                g.iter().all(|v| v.is_finite()),
                "{name}: non-finite gradient"
            );
            assert!(
                g.iter().any(|v| *v != 0.0),
                "{patch_loss:?}: {name}: all-zero gradient"
            );
        }
        // The teacher and p3 receive none: nothing of theirs is a variable of the optimiser.
        for (name, var) in m.momentum.vars() {
            assert!(
                grads.get(var.as_tensor()).is_none(),
                "{name} (p3) got a gradient"
            );
        }
    }
}

/// bf16 matmuls and attention (f32 weights, residual stream, norms' statistics and
/// losses) give the f32 losses to within bf16 rounding, and gradients that point the
/// same way.
#[test]
fn mixed_precision_agrees_with_f32() {
    use mimco::config::Precision;
    let images = random_images(4, 32, 5);
    let run = |precision| {
        let mut config = tiny_config(4, 1);
        config.train.precision = precision;
        let m = model(&config);
        let losses = m.forward(&images, &masks(4)).unwrap();
        let loss = losses.total.to_scalar::<f32>().unwrap();
        let grads = losses.total.backward().unwrap();
        let flat: Vec<f32> = m
            .trainable
            .vars()
            .iter()
            .flat_map(|(_, v)| {
                let g = grads.get(v.as_tensor()).unwrap();
                assert_eq!(
                    g.dtype(),
                    DType::F32,
                    "gradients reach the f32 master weights"
                );
                g.flatten_all().unwrap().to_vec1::<f32>().unwrap()
            })
            .collect();
        (loss, flat)
    };
    let (l32, g32) = run(Precision::F32);
    let (l16, g16) = run(Precision::Bf16);
    assert!(
        (l32 - l16).abs() <= 1e-2 * l32.abs(),
        "f32 {l32}, bf16 {l16}"
    );
    let dot: f64 = g32.iter().zip(&g16).map(|(a, b)| f64::from(a * b)).sum();
    let n32: f64 = g32.iter().map(|a| f64::from(a * a)).sum::<f64>().sqrt();
    let n16: f64 = g16.iter().map(|a| f64::from(a * a)).sum::<f64>().sqrt();
    let cosine = dot / (n32 * n16);
    assert!(cosine > 0.99, "gradient cosine {cosine}");
}

#[test]
fn masked_patches_are_replaced_by_the_mask_token() {
    let config = tiny_config(4, 1);
    let m = model(&config);
    let images = random_images(1, 32, 3);
    // Token 5 is (row 1, col 1): pixels 8..16 x 8..16. Mask only it.
    let mut mask = vec![0f32; 16];
    mask[5] = 1.0;
    let mask = Tensor::from_vec(mask, (1, 16), &Device::Cpu).unwrap();
    let out = |images: &Tensor| -> Vec<f32> {
        m.student
            .forward(images, Some(&mask))
            .unwrap()
            .patches
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    let poke = |y: usize, x: usize| {
        let mut v: Vec<f32> = images.flatten_all().unwrap().to_vec1().unwrap();
        v[y * 32 + x] += 5.0; // channel 0
        Tensor::from_vec(v, (1, 3, 32, 32), &Device::Cpu).unwrap()
    };
    let base = out(&images);
    assert_eq!(
        out(&poke(12, 12)),
        base,
        "a masked patch's pixels must not matter"
    );
    assert_ne!(
        out(&poke(2, 2)),
        base,
        "a visible patch's pixels must matter"
    );
    let unmasked = m
        .student
        .forward(&poke(12, 12), None)
        .unwrap()
        .patches
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert_ne!(
        unmasked, base,
        "without the mask the pixels of token 5 count"
    );
}

#[test]
fn p3_starts_as_p1_and_follows_it_by_ema() {
    let config = tiny_config(4, 1);
    let m = model(&config);
    let get = |store: &mimco::params::ParamStore, name: &str| -> Vec<f32> {
        store.tensors()[name]
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    let p1 = get(&m.trainable, "image.p1.fc1.weight");
    assert_eq!(get(&m.momentum, "image.p3.fc1.weight"), p1);
    // Move p1, then one EMA step with m = 0.9.
    let var = m
        .trainable
        .vars()
        .into_iter()
        .find(|(n, _)| n == "image.p1.fc1.weight")
        .unwrap()
        .1;
    var.set(&(var.as_tensor() + 1.0).unwrap()).unwrap();
    m.update_momentum(0.9).unwrap();
    let p3 = get(&m.momentum, "image.p3.fc1.weight");
    for (a, b) in p3.iter().zip(&p1) {
        assert!((a - (0.9 * b + 0.1 * (b + 1.0))).abs() < 1e-6);
    }
}

#[test]
fn weight_decay_groups_of_the_real_model() {
    let config = tiny_config(4, 1);
    let t = mimco_trainer(&config, 1, 10, 5.0, 1);
    let (decayed, plain) = t.optimizer().groups();
    for name in &plain {
        assert!(
            name.ends_with(".bias")
                || name.contains("norm")
                || name.ends_with("cls_token")
                || name.ends_with("mask_token"),
            "{name} should be decayed"
        );
    }
    for name in [
        "student.mask_token",
        "student.cls_token",
        "student.norm.weight",
        "student.blocks.0.attn.qkv.bias",
    ] {
        assert!(plain.contains(&name), "{name} must not be decayed");
    }
    for name in [
        "student.blocks.1.mlp.fc2.weight",
        "student.patch_embed.proj.weight",
        "patch.p2.fc1.weight",
    ] {
        assert!(decayed.contains(&name), "{name} must be decayed");
    }
}

#[test]
fn nan_stops_training_before_any_update() {
    let config = tiny_config(4, 1);
    let mut t = mimco_trainer(&config, 1, 10, 5.0, 1);
    let before = t.checkpoint(Default::default()).unwrap().0;
    let nan = (random_images(4, 32, 0) * f64::NAN).unwrap();
    let err = t.micro_batch(&[nan], &masks(4)).unwrap_err().to_string();
    // ReLU in the heads turns NaN features into finite losses; the gradient norm
    // still catches them.
    assert!(
        err.contains("training stopped") && err.contains("checkpoint is intact"),
        "{err}"
    );
    assert_eq!(t.step(), 0);
    let after = t.checkpoint(Default::default()).unwrap().0;
    for (k, v) in &before {
        let same = v
            .flatten_all()
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            == after[k]
                .flatten_all()
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
        assert!(same, "{k} changed");
    }
}

fn options(data: &Path, out: &Path, resume: bool) -> RunOptions {
    common::train::run_options(data, out, resume, Some(TeacherSource::Random))
}

fn bits(tensors: &HashMap<String, Tensor>) -> Vec<(String, Vec<u32>)> {
    let mut v: Vec<_> = tensors
        .iter()
        .map(|(k, t)| {
            let f: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
            (k.clone(), f.iter().map(|x| x.to_bits()).collect())
        })
        .collect();
    v.sort();
    v
}

#[test]
fn resume_continues_exactly_and_checkpoints_round_trip_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    let data = common::packed(dir.path(), 4, 12, false, 0);
    // 48 images, batches of 4 -> 12 micro-batches an epoch, 2 per step -> 6 steps an epoch.
    let mut config = tiny_config(4, 2);
    config.train.max_steps = 9;
    let straight = run(&config, &options(&data, &dir.path().join("a"), false)).unwrap();
    assert_eq!((straight.outcome, straight.steps), (Outcome::MaxSteps, 9));

    config.train.max_steps = 4;
    let first = run(&config, &options(&data, &dir.path().join("b"), false)).unwrap();
    let (t1, meta1) = mimco::checkpoint::load(&first.checkpoint, &Device::Cpu).unwrap();
    assert_eq!(
        (meta1.step, meta1.loader.epoch, meta1.loader.batches),
        (4, 0, 8)
    );
    config.train.max_steps = 9;
    let second = run(&config, &options(&data, &dir.path().join("b"), true)).unwrap();
    let resumed: Vec<f64> = first
        .reports
        .iter()
        .chain(&second.reports)
        .map(|r| r.loss)
        .collect();
    let reference: Vec<f64> = straight.reports.iter().map(|r| r.loss).collect();
    assert_eq!(resumed, reference, "K steps + resume = N steps straight");
    let a = mimco::checkpoint::load(&straight.checkpoint, &Device::Cpu).unwrap();
    let b = mimco::checkpoint::load(&second.checkpoint, &Device::Cpu).unwrap();
    assert_eq!(a.1, b.1, "same step, loader state and queue pointers");
    assert!(
        bits(&a.0) == bits(&b.0),
        "same weights, moments and queues, bit for bit"
    );
    // The metrics file shows each step once, in order.
    let records = mimco::metrics::read(&dir.path().join("b/metrics.jsonl")).unwrap();
    assert_eq!(
        records.iter().map(|r| r.report.step).collect::<Vec<_>>(),
        (1..=9).collect::<Vec<_>>()
    );

    // Round trip: restore the step-4 checkpoint into a fresh trainer and take it again.
    config.train.max_steps = 4;
    let mut fresh = mimco_trainer(&config, 0, 24, 6.0, 2);
    let state = fresh.restore(&t1, &meta1).unwrap();
    let (again, meta_again) = fresh.checkpoint(state).unwrap();
    let again: HashMap<String, Tensor> = again.into_iter().collect();
    // The data's fingerprint is the run's (`mimco train`), not the trainer's.
    assert_eq!(meta1.data, Some(common_manifest(&data).fingerprint()));
    assert_eq!(
        meta_again,
        mimco::checkpoint::Meta {
            data: None,
            ..meta1
        }
    );
    assert!(bits(&again) == bits(&t1));

    // Resuming on other data (another pack) is refused, and the checkpoint is kept.
    let other = common::packed(&dir.path().join("other"), 4, 12, false, 1);
    let err = run(&config, &options(&other, &dir.path().join("b"), true))
        .expect_err("other data refused");
    let err = format!("{err:#}");
    assert!(
        err.contains("other data") && err.contains("new --out"),
        "{err}"
    );
    let (_, kept) = mimco::checkpoint::load(&second.checkpoint, &Device::Cpu).unwrap();
    assert_eq!(kept.step, 9);
}

fn common_manifest(split: &Path) -> pipeline::format::Manifest {
    pipeline::format::Manifest::read(&split.join(pipeline::format::MANIFEST_FILE)).unwrap()
}

#[test]
fn the_loss_falls_and_ctrl_c_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let data = common::packed(dir.path(), 4, 16, false, 1);
    let config = tiny_config(8, 1);
    let summary = run(&config, &options(&data, &dir.path().join("run"), false)).unwrap();
    assert_eq!(summary.outcome, Outcome::Finished);
    let losses: Vec<f64> = summary.reports.iter().map(|r| r.loss).collect();
    assert_eq!(losses.len(), 32, "8 steps an epoch, 4 epochs");
    let mean = |s: &[f64]| s.iter().sum::<f64>() / s.len() as f64;
    let (head, tail) = (mean(&losses[..4]), mean(&losses[losses.len() - 4..]));
    assert!(
        tail < head - 0.1,
        "loss did not fall: {head:.4} -> {tail:.4} ({losses:?})"
    );

    // A stop request (Ctrl-C) checkpoints after the current step and says so.
    let opts = options(&data, &dir.path().join("stopped"), false);
    opts.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let stopped = run(&config, &opts).unwrap();
    assert_eq!((stopped.outcome, stopped.steps), (Outcome::Interrupted, 1));
    let (_, meta) = mimco::checkpoint::load(&stopped.checkpoint, &Device::Cpu).unwrap();
    assert_eq!(meta.step, 1);
    // Starting again over it without --resume is refused, and nothing is overwritten.
    let err = run(&config, &options(&data, &dir.path().join("stopped"), false)).unwrap_err();
    assert!(format!("{err:#}").contains("pass --resume"), "{err:#}");
}

/// A sample that does not decode is skipped and one libjpeg warns about is delivered;
/// the metrics lines count both, and the run goes on.
#[test]
fn the_metrics_lines_count_the_loaders_faults() {
    let dir = tempfile::tempdir().unwrap();
    let data = common::packed(dir.path(), 4, 8, false, 2);
    common::damage_first_shard(&data);
    let mut config = tiny_config(4, 1);
    config.optim.epochs = 1;
    let summary = run(&config, &options(&data, &dir.path().join("run"), false)).unwrap();
    assert_eq!(summary.outcome, Outcome::Finished);
    let records = mimco::metrics::read(&dir.path().join("run/metrics.jsonl")).unwrap();
    let last = &records.last().unwrap().data_faults;
    assert_eq!(last.skipped_samples, 1, "{last:?}");
    assert_eq!(
        last.repeated_samples, 1,
        "the skipped sample's place is filled"
    );
    // Twice if the repeat that fills the gap happens to be the warned sample.
    assert!((1..=2).contains(&last.warned_samples), "{last:?}");
    assert!(records.windows(2).all(|w| {
        let (a, b) = (&w[0].data_faults, &w[1].data_faults);
        a.skipped_samples <= b.skipped_samples && a.warned_samples <= b.warned_samples
    }));
}

#[test]
fn export_loads_back_as_a_teacher_with_timm_names() {
    let dir = tempfile::tempdir().unwrap();
    let data = common::packed(dir.path(), 2, 8, false, 2);
    let mut config = tiny_config(4, 1);
    config.train.max_steps = 1;
    let s = run(&config, &options(&data, &dir.path().join("run"), false)).unwrap();
    let out = dir.path().join("student.safetensors");
    mimco::export::export(&s.checkpoint, &out).unwrap();
    let exported = candle_core::safetensors::load(&out, &Device::Cpu).unwrap();
    let mut names: Vec<&str> = exported.keys().map(|k| k.as_str()).collect();
    names.sort();
    let mut expected = vec![
        "cls_token",
        "pos_embed",
        "patch_embed.proj.weight",
        "patch_embed.proj.bias",
        "norm.weight",
        "norm.bias",
    ];
    let per_block = [
        "norm1.weight",
        "norm1.bias",
        "attn.qkv.weight",
        "attn.qkv.bias",
        "attn.proj.weight",
        "attn.proj.bias",
        "norm2.weight",
        "norm2.bias",
        "mlp.fc1.weight",
        "mlp.fc1.bias",
        "mlp.fc2.weight",
        "mlp.fc2.bias",
    ];
    let blocks: Vec<String> = (0..2)
        .flat_map(|i| per_block.iter().map(move |p| format!("blocks.{i}.{p}")))
        .collect();
    expected.extend(blocks.iter().map(|s| s.as_str()));
    expected.sort();
    assert_eq!(names, expected);
    assert_eq!(exported["pos_embed"].dims(), &[1, 17, 32]);
    assert_eq!(exported["patch_embed.proj.weight"].dims(), &[32, 3, 8, 8]);
    // The export is a valid teacher, and it computes what the student computed.
    let teacher = mimco::teacher::load(&out, &config.student, 32, &Device::Cpu).unwrap();
    let (tensors, _) = mimco::checkpoint::load(&s.checkpoint, &Device::Cpu).unwrap();
    let store = mimco::params::ParamStore::new(9);
    let student = mimco::models::vit::Vit::new(
        store.var_builder(&Device::Cpu).pp("student"),
        &config.student,
        32,
        true,
    )
    .unwrap();
    store.load(&tensors, "").unwrap();
    let x = random_images(2, 32, 5);
    let a = teacher.forward(&x, None).unwrap().cls.unwrap();
    let b = student.forward(&x, None).unwrap().cls.unwrap();
    let diff = (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(diff < 1e-6, "{diff}");
    let _ = exported["cls_token"].i(0).unwrap();
}

#[test]
fn bad_configs_and_teachers_get_clear_errors() {
    let config = tiny_config(4, 1);
    let text = toml::to_string(&config).unwrap();
    let err = Config::from_toml(&text.replace("queue_len", "queue_length")).unwrap_err();
    assert!(format!("{err:#}").contains("queue_length"), "{err:#}");
    let err = Config::from_toml(&text.replace("mask_unit = 8", "mask_unit = 12")).unwrap_err();
    assert!(format!("{err:#}").contains("mask_unit"), "{err:#}");
    let mut wrong = config.clone();
    wrong.teacher.as_mut().unwrap().dim = 48;
    let err = wrong.check().unwrap_err().to_string();
    assert!(err.contains("dim 32") && err.contains("dim 48"), "{err}");

    let dir = tempfile::tempdir().unwrap();
    let garbage = dir.path().join("teacher.pth");
    std::fs::write(&garbage, b"not a zip").unwrap();
    let err =
        mimco::teacher::load(&garbage, config.teacher().unwrap(), 32, &Device::Cpu).unwrap_err();
    assert!(format!("{err:#}").contains("PyTorch checkpoint"), "{err:#}");
    assert!(
        mimco::teacher::load(
            &dir.path().join("missing.safetensors"),
            config.teacher().unwrap(),
            32,
            &Device::Cpu
        )
        .is_err()
    );

    // A MoCo v3-style file (module.base_encoder.*) of the wrong depth and width: every
    // mismatch is listed.
    let store = mimco::params::ParamStore::new(0);
    let mut other = config.teacher().unwrap().clone();
    other.dim = 48;
    other.depth = 3;
    mimco::models::vit::Vit::new(store.var_builder(&Device::Cpu), &other, 32, false).unwrap();
    let mut tensors: HashMap<String, Tensor> = store
        .tensors()
        .into_iter()
        .map(|(k, v)| (format!("module.base_encoder.{k}"), v))
        .collect();
    tensors.insert(
        "module.momentum_encoder.norm.weight".into(),
        Tensor::zeros(48, DType::F32, &Device::Cpu).unwrap(),
    );
    let file = dir.path().join("mocov3.safetensors");
    candle_core::safetensors::save(&tensors, &file).unwrap();
    let err = format!(
        "{:#}",
        mimco::teacher::load(&file, config.teacher().unwrap(), 32, &Device::Cpu).unwrap_err()
    );
    assert!(err.contains("module.base_encoder."), "{err}");
    assert!(
        err.contains("norm.weight: shape [48] in the file, [32] expected"),
        "{err}"
    );
    assert!(err.contains("unexpected blocks.2.attn.qkv.weight"), "{err}");
    assert!(!err.contains("momentum_encoder"), "{err}");
}

/// A MoCo v3-shaped PyTorch checkpoint (`state_dict` of `module.base_encoder.*` and
/// `module.momentum_encoder.*`), written by tests/fixtures/safetensors_to_pth.py without
/// torch, loads as the same teacher as its safetensors source.
#[test]
fn a_mocov3_pth_checkpoint_loads_as_teacher() {
    let dir = tempfile::tempdir().unwrap();
    let config = tiny_config(4, 1);
    let store = mimco::params::ParamStore::new(4);
    mimco::models::vit::Vit::new(
        store.var_builder(&Device::Cpu),
        config.teacher().unwrap(),
        32,
        false,
    )
    .unwrap();
    let st = dir.path().join("teacher.safetensors");
    candle_core::safetensors::save(&store.tensors().into_iter().collect(), &st).unwrap();
    let pth = dir.path().join("vit-s-300ep.pth.tar");
    let python = std::env::var("MIMCO_PYTHON").unwrap_or_else(|_| "python3".into());
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/safetensors_to_pth.py");
    let ran = std::process::Command::new(&python)
        .arg(&script)
        .arg(&st)
        .arg(&pth)
        .status();
    if !matches!(ran, Ok(s) if s.success()) {
        let why = format!(
            "SKIPPED .pth teacher test: {python} could not run {}",
            script.display()
        );
        eprintln!("{why}");
        let tmp = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/tmp");
        let _ = std::fs::create_dir_all(&tmp);
        let _ = std::fs::write(tmp.join("SKIPPED-pth.txt"), format!("{why}\n"));
        return;
    }
    let from_pth = mimco::teacher::load(&pth, config.teacher().unwrap(), 32, &Device::Cpu).unwrap();
    let from_st = mimco::teacher::load(&st, config.teacher().unwrap(), 32, &Device::Cpu).unwrap();
    let x = random_images(2, 32, 8);
    let a = from_pth.forward(&x, None).unwrap().patches;
    let b = from_st.forward(&x, None).unwrap().patches;
    let diff = (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert_eq!(diff, 0.0);
}

/// Both losses of one forward pass against a reference written out in f64 from the
/// equations (heads applied by hand, masked tokens picked by hand, InfoNCE over the
/// queue by hand), given the same encoder features, head weights and queues.
#[test]
fn forward_losses_match_an_f64_reference() {
    let config = tiny_config(2, 1);
    let m = model(&config);
    let images = random_images(2, 32, 11);
    let mask = masks(2);
    let losses = m.forward(&images, &mask).unwrap();
    let got_patch = losses.part("patch").unwrap().to_scalar::<f32>().unwrap() as f64;
    let got_image = losses.part("image").unwrap().to_scalar::<f32>().unwrap() as f64;

    let rows = |t: &Tensor| -> Vec<Vec<f64>> {
        let t = t.to_dtype(DType::F64).unwrap();
        let d = t.dims().last().copied().unwrap();
        let flat: Vec<f64> = t.flatten_all().unwrap().to_vec1().unwrap();
        flat.chunks(d).map(|c| c.to_vec()).collect()
    };
    let mask_t = Tensor::from_iter(mask.iter().map(|&v| f32::from(v)), &Device::Cpu)
        .unwrap()
        .reshape((2, 16))
        .unwrap();
    let z = rows(&m.student.forward(&images, Some(&mask_t)).unwrap().patches); // 32 rows
    let teacher = mimco::teacher::random(config.teacher().unwrap(), 32, 1, &Device::Cpu).unwrap();
    let zk = rows(&teacher.forward(&images, None).unwrap().patches);
    let weights: HashMap<String, Tensor> = m
        .trainable
        .tensors()
        .into_iter()
        .chain(m.momentum.tensors())
        .collect();
    let linear = |name: &str, x: &[f64]| -> Vec<f64> {
        let w = rows(&weights[&format!("{name}.weight")]);
        let b: Vec<f64> = weights[&format!("{name}.bias")]
            .to_dtype(DType::F64)
            .unwrap()
            .to_vec1()
            .unwrap();
        w.iter()
            .zip(&b)
            .map(|(row, bias)| row.iter().zip(x).map(|(a, b)| a * b).sum::<f64>() + bias)
            .collect()
    };
    let mlp = |name: &str, x: &[f64]| -> Vec<f64> {
        let h: Vec<f64> = linear(&format!("{name}.fc1"), x)
            .into_iter()
            .map(|v| v.max(0.0))
            .collect();
        linear(&format!("{name}.fc2"), &h)
    };
    let unit = |v: Vec<f64>| -> Vec<f64> {
        let n = v.iter().map(|x| x * x).sum::<f64>().sqrt();
        v.into_iter().map(|x| x / n).collect()
    };
    let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
    let nce = |q: &[f64], k: &[f64], queue: &[Vec<f64>]| -> f64 {
        let (q, k) = (unit(q.to_vec()), unit(k.to_vec()));
        let pos = dot(&q, &k) / 0.2;
        let z: f64 = pos.exp() + queue.iter().map(|n| (dot(&q, n) / 0.2).exp()).sum::<f64>();
        z.ln() - pos
    };
    let patch_queue = rows(m.patch_queue.keys());
    let image_queue = rows(m.image_queue.keys());
    let masked: Vec<usize> = (0..32).filter(|&i| mask[i] == 1).collect();
    assert_eq!(masked.len(), 20);
    let patch: f64 = masked
        .iter()
        .map(|&i| {
            nce(
                &mlp("patch.p2", &mlp("patch.p1", &z[i])),
                &mlp("patch.p3", &zk[i]),
                &patch_queue,
            )
        })
        .sum::<f64>()
        / masked.len() as f64;
    let mean = |v: &[Vec<f64>]| -> Vec<f64> {
        (0..v[0].len())
            .map(|j| v.iter().map(|r| r[j]).sum::<f64>() / v.len() as f64)
            .collect()
    };
    let image: f64 = (0..2)
        .map(|b| {
            let q = mlp("image.p2", &mlp("image.p1", &mean(&z[b * 16..b * 16 + 16])));
            nce(
                &q,
                &mlp("image.p3", &mean(&zk[b * 16..b * 16 + 16])),
                &image_queue,
            )
        })
        .sum::<f64>()
        / 2.0;
    assert!(
        (got_patch - patch).abs() < 1e-4 * patch,
        "patch: {got_patch} vs {patch}"
    );
    assert!(
        (got_image - image).abs() < 1e-4 * image,
        "image: {got_image} vs {image}"
    );
    let total = losses.total.to_scalar::<f32>().unwrap() as f64;
    assert!((total - patch - image).abs() < 1e-4 * total);

    // After the loss, each image's mean unit patch key (renormalised) joins the patch
    // queue, and its image key the image queue, at the front of the FIFO.
    let mut m = m;
    m.after_loss(&losses).unwrap();
    let (pq, iq) = (rows(m.patch_queue.keys()), rows(m.image_queue.keys()));
    for b in 0..2 {
        let keys: Vec<Vec<f64>> = (b * 16..b * 16 + 16)
            .map(|i| unit(mlp("patch.p3", &zk[i])))
            .collect();
        let want_patch = unit(mean(&keys));
        let want_image = unit(mlp("image.p3", &mean(&zk[b * 16..b * 16 + 16])));
        for (got, want) in [(&pq[b], want_patch), (&iq[b], want_image)] {
            assert!(
                got.iter().zip(&want).all(|(g, w)| (g - w).abs() < 1e-5),
                "{got:?} vs {want:?}"
            );
        }
    }
    assert_eq!((m.patch_queue.ptr(), m.image_queue.ptr()), (2, 2));
}

/// The ablations of Tables 8 and 11 train through the whole loop: one loss off, or no
/// masking (the patch loss then covers every token).
#[test]
fn ablations_train() {
    let dir = tempfile::tempdir().unwrap();
    let data = common::packed(dir.path(), 2, 8, false, 5);
    let mut variants = Vec::new();
    let mut c = tiny_config(4, 1);
    c.objective.image_loss = false;
    variants.push(("patch only", c, (true, false)));
    let mut c = tiny_config(4, 1);
    c.objective.patch_loss = mimco::config::PatchLoss::None;
    variants.push(("image only", c, (false, true)));
    let mut c = tiny_config(4, 1);
    c.data.transform.masking = false;
    variants.push(("no masking", c, (true, true)));
    for (i, (name, mut config, (patch, image))) in variants.into_iter().enumerate() {
        config.train.max_steps = 3;
        let s = run(
            &config,
            &options(&data, &dir.path().join(format!("run{i}")), false),
        )
        .unwrap();
        assert_eq!(s.steps, 3, "{name}");
        for r in &s.reports {
            assert_eq!(
                (r.part("patch").is_some(), r.part("image").is_some()),
                (patch, image),
                "{name}"
            );
            assert!(r.loss.is_finite() && r.loss > 0.0, "{name}: {r:?}");
        }
    }
}

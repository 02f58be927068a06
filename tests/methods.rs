//! Stage 1 (MoCo v3) and the SimMIM baseline through the same trainer, and a MoCo v3 run
//! serving as MimCo's teacher.

mod common;

use candle_core::{DType, Device, Tensor};
use common::train::{tiny_config, tiny_stage1_config};
use mimco::Config;
use mimco::method::{self, Method};
use mimco::train::{TeacherSource, run};
use pipeline::StoreOptions;

fn images(b: usize, seed: u32) -> Tensor {
    common::train::test_images(b, 32, seed)
}

/// Every parameter the optimiser updates gets a finite, non-zero gradient; MoCo v3's
/// frozen patch projection and its momentum encoder get none.
fn check_gradients(m: &dyn Method, views: &[Tensor], mask: &[u8]) {
    let losses = m.losses(views, mask).unwrap();
    let grads = losses.total.backward().unwrap();
    let mut checked = 0;
    for (name, var) in m.trainable().vars() {
        let g = grads.get(var.as_tensor());
        if m.frozen(&name) {
            assert!(name.contains("patch_embed"), "{name} frozen");
            continue;
        }
        let g: Vec<f32> = g
            .unwrap_or_else(|| panic!("{name} has no gradient"))
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert!(
            g.iter().all(|v| v.is_finite()),
            "{name}: non-finite gradient"
        );
        assert!(g.iter().any(|v| *v != 0.0), "{name}: all-zero gradient");
        checked += 1;
    }
    assert!(checked > 20, "{checked} parameters");
}

#[test]
fn mocov3_and_simmim_train_every_parameter() {
    let dev = Device::Cpu;
    let moco = tiny_stage1_config("mocov3", 8);
    let m = method::build(&moco, None, &dev).unwrap();
    check_gradients(m.as_ref(), &[images(8, 1), images(8, 2)], &[]);
    assert!(m.frozen("base_encoder.patch_embed.proj.weight"));
    assert!(
        m.losses(&[images(8, 1)], &[]).is_err(),
        "one view is refused"
    );

    let simmim = tiny_stage1_config("simmim", 4);
    let s = method::build(&simmim, None, &dev).unwrap();
    let mask: Vec<u8> = (0..4 * 16).map(|i| u8::from(i % 3 == 0)).collect();
    check_gradients(s.as_ref(), &[images(4, 3)], &mask);
}

/// MoCo v3 trains and resumes exactly; its checkpoint is a MimCo teacher; the student
/// MimCo trains from it; SimMIM trains. Each exports an encoder that loads back.
#[test]
fn stage1_teacher_then_mimco_and_the_simmim_baseline() {
    let dir = tempfile::tempdir().unwrap();
    let data = common::packed(dir.path(), 4, 12, false, 7);
    let mut moco = tiny_stage1_config("mocov3", 8);
    moco.train.max_steps = 5;
    let straight = run(
        &moco,
        &common::train::run_options(&data, &dir.path().join("moco-a"), false, None),
    )
    .unwrap();
    moco.train.max_steps = 2;
    let first = run(
        &moco,
        &common::train::run_options(&data, &dir.path().join("moco-b"), false, None),
    )
    .unwrap();
    moco.train.max_steps = 5;
    let rest = run(
        &moco,
        &common::train::run_options(&data, &dir.path().join("moco-b"), true, None),
    )
    .unwrap();
    let resumed: Vec<f64> = first
        .reports
        .iter()
        .chain(&rest.reports)
        .map(|r| r.loss)
        .collect();
    let reference: Vec<f64> = straight.reports.iter().map(|r| r.loss).collect();
    assert_eq!(resumed, reference, "MoCo v3: K steps + resume = N steps");
    assert!(
        straight
            .reports
            .iter()
            .all(|r| r.part("contrastive").is_some())
    );

    // The MoCo v3 checkpoint as MimCo's teacher ([teacher] = the MoCo run's [student]).
    let mut mimco = tiny_config(4, 1);
    mimco.teacher = Some(moco.student.clone());
    mimco.train.max_steps = 3;
    let teacher = Some(TeacherSource::File(straight.checkpoint.clone()));
    let s = run(
        &mimco,
        &common::train::run_options(&data, &dir.path().join("mimco"), false, teacher),
    )
    .unwrap();
    assert_eq!(s.steps, 3);
    // A teacher given to a method that takes none is refused.
    let teacher = Some(TeacherSource::File(straight.checkpoint.clone()));
    let err = run(
        &moco,
        &common::train::run_options(&data, &dir.path().join("moco-c"), false, teacher),
    )
    .unwrap_err();
    assert!(format!("{err:#}").contains("without a teacher"), "{err:#}");

    let mut simmim = tiny_stage1_config("simmim", 4);
    simmim.train.max_steps = 3;
    let sim = run(
        &simmim,
        &common::train::run_options(&data, &dir.path().join("simmim"), false, None),
    )
    .unwrap();
    assert!(
        sim.reports
            .iter()
            .all(|r| r.part("l1").is_some() && r.loss > 0.0)
    );

    for (checkpoint, config) in [(&straight.checkpoint, &moco), (&sim.checkpoint, &simmim)] {
        let out = checkpoint.with_extension("export.safetensors");
        mimco::export::export(checkpoint, &out).unwrap();
        let names = candle_core::safetensors::load(&out, &Device::Cpu).unwrap();
        assert!(
            names
                .keys()
                .all(|k| !k.starts_with("head.") && k != "mask_token" && !k.contains("decoder"))
        );
        let encoder = mimco::teacher::load(&out, &config.student, 32, &Device::Cpu).unwrap();
        let f = encoder.forward(&images(2, 4), None).unwrap().patches;
        assert_eq!(f.dims(), &[2, 16, 32]);
        assert_eq!(f.dtype(), DType::F32);
    }
}

#[test]
fn method_and_augmentation_must_agree() {
    let mut c: Config = tiny_stage1_config("mocov3", 8);
    c.data.transform.set = pipeline::config::TransformSet::Stage2;
    assert!(format!("{:#}", c.check().unwrap_err()).contains("two views"));
    let mut c = tiny_stage1_config("simmim", 4);
    c.data.transform.masking = false;
    assert!(format!("{:#}", c.check().unwrap_err()).contains("masking = true"));
    let mut c = tiny_config(4, 1);
    c.teacher = None;
    assert!(format!("{:#}", c.check().unwrap_err()).contains("[teacher]"));
}

/// The k-NN monitor runs every `knn_every` steps and its result lands in the metrics;
/// asking for it half-way is an error that says what is missing.
#[test]
fn knn_monitor_during_pretraining() {
    let dir = tempfile::tempdir().unwrap();
    let data = common::packed(dir.path(), 3, 8, false, 8);
    let mut config = tiny_stage1_config("simmim", 4);
    config.train.max_steps = 4;
    config.train.log_every = 3;
    config.train.knn_every = 2;
    config.train.knn_samples = 12;
    let monitor = mimco::eval::KnnMonitor {
        train: data.display().to_string(),
        val: data.display().to_string(),
        samples: 12,
        store: StoreOptions::default(),
    };
    let mut opts = common::train::run_options(&data, &dir.path().join("run"), false, None);
    opts.knn = Some(monitor.clone());
    run(&config, &opts).unwrap();
    let records = mimco::metrics::read(&dir.path().join("run/metrics.jsonl")).unwrap();
    let steps: Vec<(u64, bool)> = records
        .iter()
        .map(|r| (r.report.step, r.knn_top1.is_some()))
        .collect();
    assert_eq!(steps, vec![(2, true), (3, false), (4, true)]);
    assert!(
        records
            .iter()
            .filter_map(|r| r.knn_top1)
            .all(|a| (0.0..=100.0).contains(&a))
    );

    config.train.knn_every = 0;
    let err = run(&config, &opts).unwrap_err();
    assert!(format!("{err:#}").contains("knn_every"), "{err:#}");
    config.train.knn_every = 2;
    opts.knn = None;
    let err = run(&config, &opts).unwrap_err();
    assert!(format!("{err:#}").contains("--knn-train"), "{err:#}");
}

//! The `mimco` binary end to end: train (with a warning for the random teacher), resume,
//! export, plot, and the errors a user meets first.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::train::tiny_config;

fn mimco(args: &[&str], cwd: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mimco"))
        .args(args)
        .current_dir(cwd)
        .env_remove("WORLD_SIZE")
        .env_remove("RANK")
        .output()
        .unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn train_resume_export_plot() {
    let dir = tempfile::tempdir().unwrap();
    let data = common::packed(dir.path(), 2, 8, false, 3);
    let mut config = tiny_config(4, 1);
    config.train.max_steps = 2;
    std::fs::write(
        dir.path().join("tiny.toml"),
        toml::to_string(&config).unwrap(),
    )
    .unwrap();
    let data = data.display().to_string();
    let train = |extra: &[&str]| {
        let mut args = vec![
            "train",
            "--config",
            "tiny.toml",
            "--data",
            &data,
            "--random-teacher",
            "--out",
            "run",
            "--quiet",
        ];
        args.extend_from_slice(extra);
        mimco(&args, dir.path())
    };
    let o = train(&[]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("warning: random teacher"), "{}", text(&o));
    assert!(
        text(&o).contains("reached train.max_steps after 2 steps"),
        "{}",
        text(&o)
    );

    // Again without --resume: refused, the checkpoint untouched.
    let before = std::fs::read(dir.path().join("run/last.safetensors")).unwrap();
    let o = train(&[]);
    assert!(
        !o.status.success() && text(&o).contains("pass --resume"),
        "{}",
        text(&o)
    );
    assert_eq!(
        std::fs::read(dir.path().join("run/last.safetensors")).unwrap(),
        before
    );

    // Resume to the end of the schedule (4 epochs of 4 steps).
    config.train.max_steps = 0;
    std::fs::write(
        dir.path().join("tiny.toml"),
        toml::to_string(&config).unwrap(),
    )
    .unwrap();
    let o = train(&["--resume"]);
    assert!(
        o.status.success() && text(&o).contains("finished the schedule after 16 steps"),
        "{}",
        text(&o)
    );

    let o = mimco(
        &["export", "run/last.safetensors", "student.safetensors"],
        dir.path(),
    );
    assert!(o.status.success(), "{}", text(&o));
    let o = mimco(&["plot", "run/metrics.jsonl"], dir.path());
    assert!(o.status.success(), "{}", text(&o));
    let png = std::fs::read(dir.path().join("run/metrics.png")).unwrap();
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 5_000,
        "{} bytes",
        png.len()
    );
}

#[test]
fn first_mistakes_get_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let o = mimco(
        &[
            "train",
            "--config",
            "nope.toml",
            "--data",
            ".",
            "--random-teacher",
        ],
        dir.path(),
    );
    assert!(
        !o.status.success() && text(&o).contains("reading nope.toml"),
        "{}",
        text(&o)
    );

    std::fs::write(dir.path().join("bad.toml"), "[student]\npatch_size = 16\n").unwrap();
    let o = mimco(
        &[
            "train",
            "--config",
            "bad.toml",
            "--data",
            ".",
            "--random-teacher",
        ],
        dir.path(),
    );
    assert!(
        !o.status.success() && text(&o).contains("missing field"),
        "{}",
        text(&o)
    );

    let mut config = tiny_config(4, 1);
    config.train.max_steps = 1;
    std::fs::write(
        dir.path().join("tiny.toml"),
        toml::to_string(&config).unwrap(),
    )
    .unwrap();
    let o = mimco(
        &["train", "--config", "tiny.toml", "--data", "no-such-folder"],
        dir.path(),
    );
    assert!(
        !o.status.success() && text(&o).contains("--teacher"),
        "no teacher given: {}",
        text(&o)
    );
    let o = mimco(
        &[
            "train",
            "--config",
            "tiny.toml",
            "--data",
            "no-such-folder",
            "--random-teacher",
            "--quiet",
        ],
        dir.path(),
    );
    assert!(
        !o.status.success() && text(&o).contains("no-such-folder"),
        "{}",
        text(&o)
    );
    let o = Command::new(env!("CARGO_BIN_EXE_mimco"))
        .args([
            "train",
            "--config",
            "tiny.toml",
            "--data",
            ".",
            "--random-teacher",
        ])
        .current_dir(dir.path())
        .env("WORLD_SIZE", "2")
        .env("RANK", "0")
        .output()
        .unwrap();
    assert!(
        !o.status.success() && text(&o).contains("NCCL"),
        "{}",
        text(&o)
    );
}

/// Every config in configs/ parses and passes its checks.
#[test]
fn shipped_configs_are_valid() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let text = std::fs::read_to_string(&path).unwrap();
            mimco::Config::from_toml(&text).unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
            n += 1;
        }
    }
    assert!(n >= 3);
}

/// `mimco eval knn|linear` on a checkpoint, an export and a random init append one line
/// each to the results file; weights that do not fit the config's architecture are refused
/// with the names listed.
#[test]
fn eval_knn_and_linear() {
    let dir = tempfile::tempdir().unwrap();
    let data = common::packed(dir.path(), 3, 8, false, 4)
        .display()
        .to_string();
    let mut config = tiny_config(4, 1);
    config.train.max_steps = 2;
    std::fs::write(
        dir.path().join("tiny.toml"),
        toml::to_string(&config).unwrap(),
    )
    .unwrap();
    let args = [
        "train",
        "--config",
        "tiny.toml",
        "--data",
        &data,
        "--random-teacher",
        "--out",
        "run",
        "--quiet",
    ];
    let o = mimco(&args, dir.path());
    assert!(o.status.success(), "{}", text(&o));
    let o = mimco(
        &["export", "run/last.safetensors", "student.safetensors"],
        dir.path(),
    );
    assert!(o.status.success(), "{}", text(&o));
    let split = [
        "--train",
        &data,
        "--val",
        &data,
        "--results",
        "results.jsonl",
    ];
    let runs: [&[&str]; 4] = [
        &[
            "eval",
            "knn",
            "--weights",
            "run/last.safetensors",
            "--label",
            "ckpt",
        ],
        &[
            "eval",
            "linear",
            "--weights",
            "student.safetensors",
            "--config",
            "tiny.toml",
            "--epochs",
            "3",
            "--feature",
            "mean",
        ],
        &["eval", "knn", "--config", "tiny.toml", "--label", "random"],
        &["eval", "linear", "--config", "tiny.toml", "--epochs", "2"],
    ];
    for args in runs {
        let all: Vec<&str> = args.iter().chain(split.iter()).copied().collect();
        let o = mimco(&all, dir.path());
        assert!(o.status.success(), "{args:?}: {}", text(&o));
        assert!(
            text(&o).contains("top-1") && text(&o).contains("24 train / 24 val"),
            "{}",
            text(&o)
        );
    }
    let lines = std::fs::read_to_string(dir.path().join("results.jsonl")).unwrap();
    let records: Vec<mimco::eval::EvalResult> = lines
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(records.len(), 4);
    assert_eq!(
        (records[0].eval.as_str(), records[0].label.as_str()),
        ("knn", "ckpt")
    );
    assert_eq!(records[3].weights, "random-init");
    assert!(
        records
            .iter()
            .all(|r| (0.0..=100.0).contains(&r.top1) && r.top5 >= r.top1)
    );

    let mut wider = config.clone();
    wider.student.dim = 48;
    wider.teacher = Some(wider.student.clone());
    std::fs::write(
        dir.path().join("wide.toml"),
        toml::to_string(&wider).unwrap(),
    )
    .unwrap();
    let args = [
        "eval",
        "knn",
        "--weights",
        "student.safetensors",
        "--config",
        "wide.toml",
    ];
    let all: Vec<&str> = args.iter().chain(split.iter()).copied().collect();
    let o = mimco(&all, dir.path());
    assert!(!o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("cls_token: shape [1, 1, 32] in the file, [1, 1, 48] expected"),
        "{}",
        text(&o)
    );
}

/// `mimco bench feed` uploads the timed batches of shards and counts their images; it needs
/// shards, and `device_decode` needs the CUDA trainer.
#[test]
fn bench_feed_counts_the_images_it_uploads() {
    let dir = tempfile::tempdir().unwrap();
    let data = common::packed(dir.path(), 2, 8, false, 3);
    let data = data.display().to_string();
    let mut config = tiny_config(4, 1);
    std::fs::write(
        dir.path().join("tiny.toml"),
        toml::to_string(&config).unwrap(),
    )
    .unwrap();
    config.data.device_decode = true;
    std::fs::write(
        dir.path().join("gpu.toml"),
        toml::to_string(&config).unwrap(),
    )
    .unwrap();
    let feed = |config: &str, extra: &[&str]| {
        let args = [
            "bench", "feed", "--config", config, "--device", "cpu", "--warmup", "1",
        ];
        mimco(&[&args[..], extra].concat(), dir.path())
    };
    let o = feed(
        "tiny.toml",
        &["--data", &data, "--batch", "3", "--batches", "7"],
    );
    assert!(o.status.success(), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    // 7 timed batches of 3 from 16 images: across epoch ends.
    assert!(
        out.starts_with("feed: 21 images in batches of 3 to cpu at "),
        "{out}"
    );
    let o = feed("gpu.toml", &["--data", &data]);
    assert!(!o.status.success());
    assert!(
        text(&o).contains("device_decode = true needs the CUDA trainer"),
        "{}",
        text(&o)
    );
    let o = feed("tiny.toml", &[]);
    assert!(!o.status.success());
    assert!(text(&o).contains("--data"), "{}", text(&o));
}

/// `mimco bench train` runs the trainer's own steps on synthetic batches and on shards and
/// prints one table row; what needs the `cuda` feature says so.
#[test]
fn bench_train_prints_a_row_and_cuda_requests_are_explained() {
    let dir = tempfile::tempdir().unwrap();
    let data = common::packed(dir.path(), 2, 8, false, 3);
    std::fs::write(
        dir.path().join("tiny.toml"),
        toml::to_string(&tiny_config(4, 1)).unwrap(),
    )
    .unwrap();
    let data = data.display().to_string();
    let base = [
        "bench",
        "train",
        "--config",
        "tiny.toml",
        "--steps",
        "2",
        "--warmup",
        "1",
    ];
    for extra in [
        &["--device", "cpu", "--header", "--precision", "bf16"][..],
        &["--device", "cpu", "--data", data.as_str(), "--batch", "3"][..],
    ] {
        let o = mimco(&[&base[..], extra].concat(), dir.path());
        assert!(o.status.success(), "{}", text(&o));
        let out = String::from_utf8_lossy(&o.stdout).to_string();
        let row = out.lines().last().unwrap();
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        // | config | device | precision | kernels | data | batch | images/s | ...
        assert_eq!(cells.len(), 14, "{row}");
        assert_eq!(cells[1], "tiny");
        assert_eq!(cells[2], "cpu");
        let images_per_s: f64 = cells[7].parse().unwrap();
        assert!(images_per_s > 0.0, "{row}");
        assert!(text(&o).contains("phases per step"), "{}", text(&o));
        if extra.contains(&"--header") {
            assert!(out.starts_with("| config |"), "{out}");
            assert_eq!(cells[3], "bf16");
        } else {
            assert_eq!((cells[5], cells[6]), ("shards", "3"), "{row}");
        }
    }
    if !cfg!(feature = "cuda") {
        let o = mimco(&["bench", "kernels"], dir.path());
        assert!(!o.status.success());
        assert!(text(&o).contains("--features cuda"), "{}", text(&o));
        let o = mimco(&[&base[..], &["--device", "cuda"][..]].concat(), dir.path());
        assert!(!o.status.success());
        assert!(text(&o).contains("built without CUDA"), "{}", text(&o));
    }
    let o = mimco(
        &[&base[..], &["--precision", "f16"][..]].concat(),
        dir.path(),
    );
    assert!(!o.status.success());
    assert!(
        text(&o).contains("expected f32, tf32 or bf16"),
        "{}",
        text(&o)
    );
}

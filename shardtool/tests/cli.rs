//! The `shardtool` binary: help texts, exit codes and the messages users see on bad input.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::*;

fn shardtool(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_shardtool"))
        .args(args)
        .output()
        .expect("shardtool runs")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

#[test]
fn every_command_explains_its_flags() {
    let expect: [(&str, &[&str]); 6] = [
        (
            "pack",
            &[
                "--out",
                "--val-labels",
                "--seed",
                "--shard-size",
                "--compression",
                "--zstd-level",
                "--check",
                "--max-side",
                "--quality",
                "--no-json",
                "--workers",
                "--strict",
                "--resume",
                "--quiet",
            ],
        ),
        ("inspect", &["--samples"]),
        ("verify", &["--decode", "--workers"]),
        (
            "synth",
            &["--classes", "--per-class", "--flat-val", "--seed"],
        ),
        ("demo", &[]),
        ("upload", &[]),
    ];
    for (command, flags) in expect {
        let out = shardtool(&[command, "--help"]);
        assert!(out.status.success(), "{command} --help failed");
        let help = text(&out);
        for flag in flags {
            let line = help
                .lines()
                .find(|l| l.trim_start().starts_with(flag) || l.contains(&format!(" {flag}")));
            assert!(
                line.is_some(),
                "{command} --help does not mention {flag}:\n{help}"
            );
        }
    }
}

#[test]
fn missing_input_folder_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let out = shardtool(&[
        "pack",
        p(&tmp.path().join("nope")),
        "--out",
        p(&tmp.path().join("o")),
    ]);
    assert!(!out.status.success());
    let msg = text(&out);
    assert!(
        msg.contains("cannot read input folder") && msg.contains("nope"),
        "{msg}"
    );
}

#[test]
fn strict_turns_rejects_into_an_error_and_writes_no_manifest() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("imagenet");
    let synth = make_dataset(&input, &small_spec());
    let dest = tmp.path().join("out");
    let out = shardtool(&["pack", p(&input), "--out", p(&dest), "--strict", "-q"]);
    assert!(!out.status.success());
    let msg = text(&out);
    for bad in synth.bad.iter().filter(|b| b.contains("empty")) {
        assert!(msg.contains(bad.as_str()), "{bad} not named in:\n{msg}");
    }
    assert!(!dest.join("train/manifest.json").exists());
}

#[test]
fn output_folder_with_other_content_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("imagenet");
    make_dataset(&input, &small_spec());
    let dest = tmp.path().join("out");
    std::fs::create_dir_all(dest.join("train")).unwrap();
    std::fs::write(dest.join("train/precious.txt"), "keep me").unwrap();
    let out = shardtool(&["pack", p(&input), "--out", p(&dest), "-q"]);
    assert!(!out.status.success());
    assert!(text(&out).contains("not empty"), "{}", text(&out));
    assert_eq!(
        std::fs::read_to_string(dest.join("train/precious.txt")).unwrap(),
        "keep me"
    );
}

#[test]
fn verify_finds_corrupt_and_missing_shards() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("imagenet");
    make_dataset(&input, &small_spec());
    let dest = tmp.path().join("out");
    let out = shardtool(&[
        "pack",
        p(&input),
        "--out",
        p(&dest),
        "--shard-size",
        "60KB",
        "-q",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let ok = shardtool(&["verify", p(&dest), "--decode"]);
    assert!(ok.status.success(), "{}", text(&ok));
    assert!(text(&ok).contains("OK"));

    let inspect = text(&shardtool(&["inspect", p(&dest)]));
    assert!(
        inspect.contains("samples    27") && inspect.contains("rejects 4"),
        "{inspect}"
    );

    let shard = dest.join("train/train-000001.tar.zst");
    let mut bytes = std::fs::read(&shard).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(&shard, &bytes).unwrap();
    std::fs::remove_file(dest.join("train/train-000002.tar.zst")).unwrap();
    let bad = shardtool(&["verify", p(&dest)]);
    assert!(!bad.status.success());
    let msg = text(&bad);
    assert!(
        msg.contains("train-000001.tar.zst") && msg.contains("re-pack"),
        "{msg}"
    );
    assert!(msg.contains("train-000002.tar.zst: cannot open"), "{msg}");
}

#[test]
fn incomplete_pack_is_not_mistaken_for_a_pack() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(tmp.path().join("train/.shardtool")).unwrap();
    let out = shardtool(&["verify", p(tmp.path())]);
    assert!(!out.status.success());
    assert!(text(&out).contains("--resume"), "{}", text(&out));
}

/// A full disk stops the pack with advice, leaves no partial shard and no manifest, and
/// `--resume` finishes it once there is room. Needs permission to mount a small tmpfs.
#[test]
fn full_disk_fails_cleanly_and_resume_finishes() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("imagenet");
    let mut spec = small_spec();
    spec.short_side = (200, 300);
    spec.bad_files = false;
    spec.val_per_class = 0;
    make_dataset(&input, &spec);
    let disk = tmp.path().join("disk");
    std::fs::create_dir_all(&disk).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=300k", "tmpfs", p(&disk)])
        .output();
    if !mounted.is_ok_and(|m| m.status.success()) {
        eprintln!(
            "SKIPPED full_disk_fails_cleanly_and_resume_finishes: cannot mount a tmpfs here (needs root)"
        );
        return;
    }
    let dest = disk.join("out");
    let out = shardtool(&[
        "pack",
        p(&input),
        "--out",
        p(&dest),
        "--shard-size",
        "100KB",
        "-q",
    ]);
    let copy = tmp.path().join("rescued");
    let listing: Vec<String> = std::fs::read_dir(dest.join("train"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    // Move what was written to a roomier place and finish there.
    std::fs::create_dir_all(&copy).unwrap();
    let status = Command::new("cp")
        .args(["-a", p(&dest), p(&copy)])
        .status()
        .unwrap();
    let _ = Command::new("umount").arg(p(&disk)).status();
    assert!(status.success());

    assert!(!out.status.success(), "the pack should not fit in 300 KB");
    let msg = text(&out);
    assert!(
        msg.contains("disk is full") && msg.contains("--resume"),
        "{msg}"
    );
    assert!(
        !listing
            .iter()
            .any(|n| n.ends_with(".partial") || n == "manifest.json"),
        "{listing:?}"
    );

    let resumed = shardtool(&[
        "pack",
        p(&input),
        "--out",
        p(&copy.join("out")),
        "--shard-size",
        "100KB",
        "--resume",
        "-q",
    ]);
    assert!(resumed.status.success(), "{}", text(&resumed));
    let verified = shardtool(&["verify", p(&copy.join("out"))]);
    assert!(verified.status.success(), "{}", text(&verified));
    assert!(text(&verified).contains(&format!(
        "{} samples",
        spec.classes * spec.train_per_class + 3
    )));
}

/// The README's main job: `shardtool demo` generates, packs, verifies and inspects, and
/// can be run again in the same folder.
#[test]
fn demo_runs_end_to_end_and_reruns() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("demo");
    for _ in 0..2 {
        let out = shardtool(&["demo", p(&dir)]);
        let msg = text(&out);
        assert!(out.status.success(), "{msg}");
        assert!(msg.contains("train: OK"), "{msg}");
        assert!(
            msg.contains("203 samples") && msg.contains("4 input(s) not packed"),
            "{msg}"
        );
        assert!(
            msg.contains("6 batches, 192 images") && msg.contains("0 samples failed"),
            "{msg}"
        );
    }
}

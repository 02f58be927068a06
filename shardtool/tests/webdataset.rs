//! Python's `webdataset` package reads our shards and sees the same samples.
//!
//! `tests/run.sh` provides a Python with the package (`MIMCO_PYTHON`); otherwise it is
//! installed with pip into a virtual environment under the target folder.
//! Where pip cannot reach its registry the test is skipped with a message on stderr and
//! a marker file, `target/tmp/SKIPPED-webdataset.txt`, that `tests/run.sh` prints.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use pipeline::format::Compression;
use sha2::Digest;

const READER: &str = r#"
import hashlib, json, sys
import webdataset as wds
for s in wds.WebDataset(sys.argv[1:], shardshuffle=False):
    meta = json.loads(s["json"])
    print(s["__key__"], int(s["cls"]), hashlib.sha256(s["jpg"]).hexdigest(), meta["path"])
"#;

/// A Python with `webdataset` importable, or `None` (after saying why) when pip cannot
/// install it.
fn python_with_webdataset() -> Option<PathBuf> {
    let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let venv = tmp.join("wds-venv");
    let python = venv.join("bin/python");
    let importable = |py: &Path| {
        Command::new(py)
            .args(["-c", "import webdataset"])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    // tests/run.sh provides one; a plain `cargo test` makes its own.
    let provided = std::env::var_os("MIMCO_PYTHON").map(PathBuf::from);
    if let Some(py) = provided.filter(|p| importable(p)) {
        return Some(py);
    }
    if importable(&python) {
        return Some(python);
    }
    let made = Command::new("python3")
        .args(["-m", "venv", venv.to_str()?])
        .output();
    let installed = made.is_ok_and(|o| o.status.success())
        && Command::new(&python)
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "webdataset",
            ])
            .output()
            .is_ok_and(|o| o.status.success());
    if installed && importable(&python) {
        return Some(python);
    }
    let why =
        "SKIPPED webdataset interop test: `pip install webdataset` failed (no registry reachable?)";
    eprintln!("{why}");
    let _ = std::fs::write(tmp.join("SKIPPED-webdataset.txt"), format!("{why}\n"));
    None
}

fn read_with_python(python: &Path, urls: &[String]) -> Vec<String> {
    let out = Command::new(python)
        .arg("-c")
        .arg(READER)
        .args(urls)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "python failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

#[test]
fn python_webdataset_reads_the_same_keys_labels_and_bytes() {
    let Some(python) = python_with_webdataset() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("imagenet");
    make_dataset(&input, &small_spec());
    for compression in [Compression::None, Compression::Zstd] {
        let mut opts = options(&tmp.path().join(format!("{compression:?}")));
        opts.settings.compression = compression;
        pack_all(&input, &opts).unwrap();
        let dir = opts.out.join("train");
        let (manifest, samples) = read_split(&dir);
        let expected: Vec<String> = samples
            .iter()
            .map(|s| {
                let meta: pipeline::SampleMeta =
                    serde_json::from_slice(s.json.as_ref().unwrap()).unwrap();
                let sha = format!("{:x}", sha2::Sha256::digest(&s.image));
                format!("{} {} {sha} {}", s.key, s.cls, meta.path)
            })
            .collect();
        let urls: Vec<String> = manifest
            .shards
            .iter()
            .map(|s| {
                let path = dir.join(&s.name).display().to_string();
                match compression {
                    Compression::None => path,
                    // The documented way to read .tar.zst shards from Python.
                    Compression::Zstd => format!("pipe:zstd -dc {path}"),
                }
            })
            .collect();
        if compression == Compression::Zstd
            && Command::new("zstd").arg("--version").output().is_err()
        {
            eprintln!("zstd CLI not installed: skipping the pipe:zstd case");
            continue;
        }
        assert_eq!(
            read_with_python(&python, &urls),
            expected,
            "{compression:?}"
        );
    }
}

//! End-to-end behaviour of `shardtool pack` through the library: round trip, labels,
//! rejects, determinism, resume.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::os::unix::fs::MetadataExt;

use common::*;
use pipeline::format::{MANIFEST_FILE, REJECTS_FILE, SampleMeta};
use shardtool::pack::{STATE_DIR, pack_split, plan_shards};
use shardtool::scan::find_splits;
use shardtool::synth::wnid;
use shardtool::verify::verify_split;

#[test]
fn round_trip_gives_back_every_accepted_image_with_its_label() {
    let tmp = tempfile::tempdir().unwrap();
    let (input, out) = (tmp.path().join("imagenet"), tmp.path().join("shards"));
    let spec = small_spec();
    let synth = make_dataset(&input, &spec);
    pack_all(&input, &options(&out)).unwrap();

    for split in ["train", "val"] {
        let (manifest, samples) = read_split(&out.join(split));
        // ImageFolder convention: sorted wnids, from 0. The planted empty class folder
        // keeps its index (the last one) in both splits.
        let expected_classes: Vec<String> = (0..=spec.classes).map(wnid).collect();
        assert_eq!(manifest.classes, expected_classes);

        let mut by_path = BTreeMap::new();
        for s in &samples {
            let meta: SampleMeta = serde_json::from_slice(s.json.as_ref().unwrap()).unwrap();
            assert_eq!(manifest.classes[s.cls as usize], meta.wnid);
            by_path.insert(meta.path.clone(), (s.cls, s.image.clone(), meta));
        }
        assert_eq!(by_path.len(), samples.len(), "one sample per source file");
        assert_eq!(manifest.num_samples as usize, samples.len());

        // Every valid file under the split folder comes back byte-identical, under the
        // class of its folder; nothing else does.
        let bad: HashSet<&String> = synth.bad.iter().collect();
        let mut valid = 0;
        for (rel, bytes) in tree(&input.join(split)) {
            let rel = format!("{split}/{}", rel.display());
            if bad.contains(&rel) {
                assert!(
                    !by_path.contains_key(&rel),
                    "{rel} is bad and must not be packed"
                );
                continue;
            }
            valid += 1;
            let (cls, image, _) = by_path.get(&rel).unwrap_or_else(|| panic!("{rel} missing"));
            assert_eq!(image, &bytes, "{rel} bytes changed");
            let folder = rel.split('/').nth(1).unwrap();
            assert_eq!(&manifest.classes[*cls as usize], folder);
        }
        assert_eq!(valid, samples.len());
    }
    let expected = synth.images.0 + synth.images.1;
    let (train, val) = (
        read_split(&out.join("train")).1,
        read_split(&out.join("val")).1,
    );
    assert_eq!(train.len() + val.len(), expected);

    // Greyscale, CMYK and a PNG named .JPEG are valid images and pack; the type comes
    // from the bytes.
    let formats: BTreeMap<String, String> = train
        .iter()
        .map(|s| serde_json::from_slice::<SampleMeta>(s.json.as_ref().unwrap()).unwrap())
        .map(|m| (m.path, m.format))
        .collect();
    assert_eq!(synth.quirks.len(), 3);
    for quirk in &synth.quirks {
        let expected = if quirk.contains("png") { "png" } else { "jpeg" };
        assert_eq!(
            formats.get(quirk).map(String::as_str),
            Some(expected),
            "{quirk}"
        );
    }

    // The rejects file lists exactly the planted bad inputs, each with a reason.
    let rejects = std::fs::read_to_string(out.join("train").join(REJECTS_FILE)).unwrap();
    let listed: Vec<&str> = rejects
        .lines()
        .skip(1)
        .map(|l| l.split('\t').next().unwrap())
        .collect();
    assert_eq!(
        listed,
        synth.bad.iter().map(String::as_str).collect::<Vec<_>>()
    );
    assert!(
        rejects
            .lines()
            .skip(1)
            .all(|l| l.split('\t').nth(1).is_some_and(|r| !r.is_empty()))
    );
    assert!(
        rejects.contains("truncated JPEG")
            && rejects.contains("empty file")
            && rejects.contains("not an image")
    );
    assert!(rejects.contains("empty class folder"));
    let manifest = read_split(&out.join("train")).0;
    assert_eq!(manifest.num_rejects as usize, synth.bad.len());

    // Shards are shuffled across classes, not class-sorted.
    let first_classes: HashSet<u32> = train.iter().take(8).map(|s| s.cls).collect();
    assert!(first_classes.len() > 1, "first shard is class-sorted");

    // verify --decode agrees.
    for split in ["train", "val"] {
        let report = verify_split(&out.join(split), true, 2).unwrap();
        assert!(report.problems.is_empty(), "{:?}", report.problems);
    }
}

#[test]
fn same_input_and_seed_give_byte_identical_packs() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("imagenet");
    make_dataset(&input, &small_spec());
    let (a, b, c) = (
        tmp.path().join("a"),
        tmp.path().join("b"),
        tmp.path().join("c"),
    );
    pack_all(&input, &options(&a)).unwrap();
    let mut one_worker = options(&b);
    one_worker.workers = 1;
    pack_all(&input, &one_worker).unwrap();
    let tree_a = tree(&a);
    assert!(
        tree_a.len() >= 5,
        "expected several shards: {:?}",
        tree_a.keys()
    );
    assert_eq!(tree_a, tree(&b), "packs differ between runs");

    let mut other_seed = options(&c);
    other_seed.settings.seed = 1;
    pack_all(&input, &other_seed).unwrap();
    let order = |dir: &std::path::Path| -> Vec<String> {
        read_split(&dir.join("train"))
            .1
            .into_iter()
            .map(|s| s.key)
            .collect()
    };
    let (order_a, order_c) = (order(&a), order(&c));
    assert_ne!(order_a, order_c, "the seed must change the shuffle");
    assert_eq!(
        order_a.iter().collect::<HashSet<_>>(),
        order_c.iter().collect::<HashSet<_>>()
    );
}

#[test]
fn interrupted_pack_resumes_without_redoing_finished_shards() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("data").join("train");
    let mut spec = small_spec();
    spec.val_per_class = 0;
    spec.bad_files = false;
    make_dataset(input.parent().unwrap(), &spec);
    // A truncated JPEG is only found while packing: with --strict it interrupts the pack.
    let cls0 = input.join(wnid(0));
    let good = std::fs::read(cls0.join(format!("{}_1.JPEG", wnid(0)))).unwrap();
    std::fs::write(cls0.join("zz_truncated.JPEG"), &good[..good.len() / 2]).unwrap();

    let split = &find_splits(&input, None).unwrap()[0];
    assert_eq!(split.name, "train");
    let mut opts = options(&tmp.path().join("out"));
    opts.settings.target_shard_bytes = 1; // one image per shard
    opts.workers = 1;
    let seed = (0..100)
        .find(|&seed| {
            let plan = plan_shards(split, seed, 1);
            let bad = plan
                .iter()
                .position(|s| split.files[s[0]].rel.contains("zz_truncated"))
                .unwrap();
            (3..plan.len() - 3).contains(&bad)
        })
        .unwrap();
    opts.settings.seed = seed;

    opts.strict = true;
    let err = pack_split(split, &opts).unwrap_err();
    assert!(format!("{err:#}").contains("zz_truncated"), "{err:#}");
    let dir = opts.out.join("train");
    assert!(
        !dir.join(MANIFEST_FILE).exists(),
        "an interrupted pack must not have a manifest"
    );
    let leftovers = std::fs::read_dir(&dir).unwrap().flatten();
    let names: Vec<String> = leftovers
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        !names.iter().any(|n| n.ends_with(".partial")),
        "partial shard left: {names:?}"
    );
    let finished: Vec<&String> = names.iter().filter(|n| n.ends_with(".tar.zst")).collect();
    assert!(finished.len() >= 3, "{names:?}");

    // Without --resume the interrupted pack is refused with advice.
    opts.strict = false;
    let err = pack_split(split, &opts).unwrap_err();
    assert!(format!("{err:#}").contains("--resume"), "{err:#}");

    // Simulate a crash between a shard's rename and its record: that shard is redone.
    let redo = finished[0].clone();
    std::fs::remove_file(dir.join(STATE_DIR).join(format!("{redo}.json"))).unwrap();
    let inode = |name: &str| std::fs::metadata(dir.join(name)).unwrap().ino();
    let kept: Vec<(String, u64)> = finished
        .iter()
        .filter(|n| ***n != redo)
        .map(|n| (n.to_string(), inode(n)))
        .collect();

    opts.resume = true;
    let report = pack_split(split, &opts).unwrap();
    assert_eq!(
        report.shards_written,
        report.manifest.shards.len() - kept.len()
    );
    for (name, ino) in &kept {
        assert_eq!(inode(name), *ino, "{name} was rewritten on resume");
    }
    assert!(!dir.join(STATE_DIR).exists());

    // The resumed pack equals an uninterrupted one.
    let mut fresh = options(&tmp.path().join("fresh"));
    fresh.settings.target_shard_bytes = 1;
    fresh.settings.seed = seed;
    pack_split(split, &fresh).unwrap();
    assert_eq!(tree(&dir), tree(&fresh.out.join("train")));
}

#[test]
fn repacking_the_same_input_is_a_no_op_and_a_different_pack_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("imagenet");
    make_dataset(&input, &small_spec());
    let out = tmp.path().join("out");
    pack_all(&input, &options(&out)).unwrap();
    let before = tree(&out);
    let again = pack_all(&input, &options(&out)).unwrap();
    assert!(again.iter().all(|r| r.shards_written == 0));
    assert_eq!(before, tree(&out));

    let mut other = options(&out);
    other.settings.seed = 9;
    let err = format!("{:#}", pack_all(&input, &other).unwrap_err());
    assert!(
        err.contains("different pack") && err.contains("seed"),
        "{err}"
    );
    assert_eq!(
        before,
        tree(&out),
        "a refused pack must not touch the output"
    );
}

#[test]
fn flat_val_with_label_file_gets_train_class_indices() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("imagenet");
    let mut spec = small_spec();
    spec.flat_val = true;
    spec.bad_files = false;
    make_dataset(&input, &spec);
    let labels = input.join("LOC_val_solution.csv");
    // One listed image is missing, one image has no label: both are reported.
    std::fs::remove_file(input.join("val/ILSVRC2012_val_00000001.JPEG")).unwrap();
    std::fs::copy(
        input.join("val/ILSVRC2012_val_00000002.JPEG"),
        input.join("val/unlabelled.JPEG"),
    )
    .unwrap();

    let splits = find_splits(&input, None);
    assert!(format!("{:#}", splits.unwrap_err()).contains("--val-labels"));
    let splits = find_splits(&input, Some(&labels)).unwrap();
    let opts = options(&tmp.path().join("out"));
    for split in &splits {
        pack_split(split, &opts).unwrap();
    }
    let (manifest, samples) = read_split(&opts.out.join("val"));
    let csv = std::fs::read_to_string(&labels).unwrap();
    let truth: BTreeMap<&str, &str> = csv
        .lines()
        .skip(1)
        .map(|l| l.split_once(',').unwrap())
        .map(|(id, pred)| (id, pred.split(' ').next().unwrap()))
        .collect();
    assert_eq!(samples.len(), truth.len() - 1);
    for s in &samples {
        assert_eq!(
            manifest.classes[s.cls as usize],
            truth[s.key.as_str()],
            "{}",
            s.key
        );
    }
    let rejects = std::fs::read_to_string(opts.out.join("val").join(REJECTS_FILE)).unwrap();
    assert!(
        rejects.contains("val/unlabelled.JPEG\tno label"),
        "{rejects}"
    );
    assert!(
        rejects.contains("val/ILSVRC2012_val_00000001\tlisted in"),
        "{rejects}"
    );
}

#[test]
fn reencode_bounds_the_longer_side() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("imagenet");
    let mut spec = small_spec();
    spec.short_side = (80, 120);
    spec.val_per_class = 0;
    make_dataset(&input, &spec);
    let mut opts = options(&tmp.path().join("out"));
    opts.settings.reencode = Some(pipeline::format::Reencode {
        max_side: 64,
        quality: 80,
    });
    pack_all(&input, &opts).unwrap();
    let (manifest, samples) = read_split(&opts.out.join("train"));
    assert_eq!(manifest.pack.settings.reencode.unwrap().max_side, 64);
    for s in &samples {
        let meta: SampleMeta = serde_json::from_slice(s.json.as_ref().unwrap()).unwrap();
        let img = image::load_from_memory(&s.image).unwrap();
        assert_eq!((img.width(), img.height()), (meta.width, meta.height));
        assert!(
            meta.width.max(meta.height) <= 64 && meta.format == "jpeg",
            "{meta:?}"
        );
    }
}

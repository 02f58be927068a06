//! ImageNet-shaped folders made from the real photos embedded in this binary, for the
//! demo, the tests and the pack benchmark. Nothing is downloaded.
//!
//! Each image is a random crop of one of the photos (CC0 / public domain, see
//! `tests/fixtures/photos/LICENSES.md`), rescaled to ImageNet-like sizes, colour-jittered
//! and re-encoded at quality 75-95 with 4:2:0 chroma subsampling, as libjpeg writes by
//! default and as ImageNet's photos are, so the JPEG statistics are those of real photos.

use std::path::Path;

use anyhow::{Context, Result};
use fast_image_resize as fr;
use image::{DynamicImage, RgbImage};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::work::run_jobs;

const PHOTOS: [&[u8]; 5] = [
    include_bytes!("../../tests/fixtures/photos/rocket.jpg"),
    include_bytes!("../../tests/fixtures/photos/hubble_deep_field.jpg"),
    include_bytes!("../../tests/fixtures/photos/retina.jpg"),
    include_bytes!("../../tests/fixtures/photos/chelsea.png"),
    include_bytes!("../../tests/fixtures/photos/coffee.png"),
];

/// What to generate.
#[derive(Clone, Debug)]
pub struct SynthSpec {
    /// Number of classes (wnid-like folder names `n01440764`, `n01441764`, ...).
    pub classes: usize,
    /// Train images per class.
    pub train_per_class: usize,
    /// Val images per class (0: no val split).
    pub val_per_class: usize,
    /// Val as flat `ILSVRC2012_val_*.JPEG` files plus `LOC_val_solution.csv`, as
    /// ImageNet ships it, instead of class folders.
    pub flat_val: bool,
    /// Plant ImageNet's valid oddities in train: a greyscale JPEG, a CMYK JPEG and a PNG
    /// named `.JPEG`.
    pub quirks: bool,
    /// Plant bad inputs in train: a truncated JPEG, a zero-byte file, a text file named
    /// `.JPEG` and an empty class folder.
    pub bad_files: bool,
    /// Shorter side of the generated images is drawn from this range.
    pub short_side: (u32, u32),
    /// JPEG quality of the generated images is drawn from this range.
    pub quality: (u8, u8),
    /// Seed of everything random.
    pub seed: u64,
}

impl Default for SynthSpec {
    fn default() -> Self {
        SynthSpec {
            classes: 10,
            train_per_class: 20,
            val_per_class: 5,
            flat_val: false,
            quirks: true,
            bad_files: true,
            short_side: (300, 500),
            quality: (75, 95),
            seed: 0,
        }
    }
}

/// What was generated.
#[derive(Debug, Default)]
pub struct SynthReport {
    /// Valid images written (quirks included), per split: (train, val).
    pub images: (usize, usize),
    /// Bytes of valid images written.
    pub bytes: u64,
    /// The planted bad inputs, as paths relative to the root (as `rejects.tsv` lists them).
    pub bad: Vec<String>,
    /// The planted valid oddities, relative to the root.
    pub quirks: Vec<String>,
}

/// Makes `dir` a demo's folder: created if absent, emptied if an earlier run of the same
/// demo made it (it holds the `.{tool}-demo` marker), refused if it holds anything else.
pub fn claim_demo_dir(dir: &Path, tool: &str) -> Result<()> {
    let marker = dir.join(format!(".{tool}-demo"));
    if marker.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("emptying {}", dir.display()))?;
    } else if dir.exists() && std::fs::read_dir(dir)?.next().is_some() {
        anyhow::bail!(
            "{} is not empty and not an earlier demo: choose another folder",
            dir.display()
        );
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::write(
        &marker,
        format!("written by `{tool} demo`; the demo replaces this folder\n"),
    )?;
    Ok(())
}

/// The wnid-like folder name of class `c`; sorted order equals class order.
pub fn wnid(c: usize) -> String {
    format!("n{:08}", 1_440_764 + 1000 * c)
}

/// Writes an ImageNet-shaped folder under `root` (which must not exist or be empty).
pub fn write_imagenet_like(root: &Path, spec: &SynthSpec, workers: usize) -> Result<SynthReport> {
    let photos: Vec<RgbImage> = PHOTOS
        .iter()
        .map(|bytes| image::load_from_memory(bytes).map(|i| i.to_rgb8()))
        .collect::<Result<_, _>>()
        .context("decoding an embedded photo")?;
    // (relative path, class, seed) of every image to generate.
    let mut jobs = Vec::new();
    let mut csv = String::from("ImageId,PredictionString\n");
    for c in 0..spec.classes {
        for k in 0..spec.train_per_class {
            jobs.push((format!("train/{}/{}_{}.JPEG", wnid(c), wnid(c), k + 1), c));
        }
    }
    let train_images = jobs.len();
    for n in 0..spec.classes * spec.val_per_class {
        let (c, id) = (n % spec.classes, format!("ILSVRC2012_val_{:08}", n + 1));
        if spec.flat_val {
            jobs.push((format!("val/{id}.JPEG"), c));
            csv.push_str(&format!("{id},{} 0 0 10 10\n", wnid(c)));
        } else {
            jobs.push((format!("val/{}/{id}.JPEG", wnid(c)), c));
        }
    }
    let mut report = SynthReport {
        images: (train_images, jobs.len() - train_images),
        ..SynthReport::default()
    };
    run_jobs(
        jobs.len(),
        workers,
        |i, _| -> Result<u64> {
            let (rel, c) = &jobs[i];
            let mut rng = ChaCha8Rng::seed_from_u64(
                spec.seed ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
            );
            let img = random_view(
                &photos[(c + rng.random_range(0..2)) % photos.len()],
                spec.short_side,
                &mut rng,
            )?;
            let bytes = encode_jpeg(
                &DynamicImage::ImageRgb8(img),
                rng.random_range(spec.quality.0..=spec.quality.1),
            )?;
            write(root, rel, &bytes)?;
            Ok(bytes.len() as u64)
        },
        |_| {},
        |_, n| report.bytes += n,
    )?;
    if spec.flat_val && spec.val_per_class > 0 {
        write(root, "LOC_val_solution.csv", csv.as_bytes())?;
    }
    let mut rng = ChaCha8Rng::seed_from_u64(spec.seed.wrapping_add(1));
    if spec.quirks {
        let img = random_view(&photos[0], (200, 300), &mut rng)?;
        let dir = format!("train/{}", wnid(0));
        let grey = encode_jpeg(
            &DynamicImage::ImageLuma8(image::imageops::grayscale(&img)),
            90,
        )?;
        let png = {
            let mut out = std::io::Cursor::new(Vec::new());
            img.write_to(&mut out, image::ImageFormat::Png)?;
            out.into_inner()
        };
        for (name, bytes) in [
            ("grey", grey),
            ("cmyk", encode_cmyk_jpeg(&img)?),
            ("png", png),
        ] {
            let rel = format!("{dir}/{}_quirk_{name}.JPEG", wnid(0));
            write(root, &rel, &bytes)?;
            report.bytes += bytes.len() as u64;
            report.quirks.push(rel);
        }
        report.images.0 += 3;
    }
    if spec.bad_files {
        let img = random_view(&photos[1], (200, 300), &mut rng)?;
        let jpeg = encode_jpeg(&DynamicImage::ImageRgb8(img), 90)?;
        let dir = format!("train/{}", wnid(1 % spec.classes.max(1)));
        let bad: [(String, &[u8]); 3] = [
            (format!("{dir}/bad_truncated.JPEG"), &jpeg[..jpeg.len() / 2]),
            (format!("{dir}/bad_empty.JPEG"), b""),
            (
                format!("{dir}/bad_not_an_image.JPEG"),
                b"this is a text file, not an image\n",
            ),
        ];
        for (rel, bytes) in bad {
            write(root, &rel, bytes)?;
            report.bad.push(rel);
        }
        let empty = format!("train/{}", wnid(spec.classes));
        std::fs::create_dir_all(root.join(&empty))?;
        report.bad.push(empty);
    }
    report.bad.sort();
    Ok(report)
}

/// A random crop (25-100% of the area, aspect 3/4-4/3) resized so its shorter side is
/// drawn from `short_side`, with a random per-channel brightness shift.
fn random_view(photo: &RgbImage, short_side: (u32, u32), rng: &mut impl Rng) -> Result<RgbImage> {
    let (pw, ph) = (photo.width() as f64, photo.height() as f64);
    let area = pw * ph * rng.random_range(0.25..=1.0);
    let aspect: f64 = rng.random_range(0.75..=1.333);
    let w = ((area * aspect).sqrt().min(pw) as u32).max(8);
    let h = ((area / aspect).sqrt().min(ph) as u32).max(8);
    let x = rng.random_range(0..=photo.width() - w);
    let y = rng.random_range(0..=photo.height() - h);
    let crop = image::imageops::crop_imm(photo, x, y, w, h).to_image();
    let short = rng.random_range(short_side.0..=short_side.1) as f64;
    let scale = short / w.min(h) as f64;
    let (ow, oh) = (
        (w as f64 * scale).round() as u32,
        (h as f64 * scale).round() as u32,
    );
    let src = DynamicImage::ImageRgb8(crop);
    let mut dst = DynamicImage::new_rgb8(ow.max(1), oh.max(1));
    fr::Resizer::new()
        .resize(&src, &mut dst, None)
        .context("resizing a synthetic image")?;
    let mut out = dst.to_rgb8();
    let shift: [i16; 3] = std::array::from_fn(|_| rng.random_range(-20..=20));
    for px in out.pixels_mut() {
        for (v, s) in px.0.iter_mut().zip(shift) {
            *v = (*v as i16 + s).clamp(0, 255) as u8;
        }
    }
    Ok(out)
}

fn encode_jpeg(img: &DynamicImage, quality: u8) -> Result<Vec<u8>> {
    crate::check::encode_jpeg(img, quality).map_err(anyhow::Error::msg)
}

/// A 4-channel CMYK JPEG, as some of ImageNet's train images are.
fn encode_cmyk_jpeg(img: &RgbImage) -> Result<Vec<u8>> {
    let cmyk: Vec<u8> = img
        .pixels()
        .flat_map(|p| {
            let [r, g, b] = p.0;
            let k = 255 - r.max(g).max(b);
            let ink = |v: u8| {
                if k == 255 {
                    0
                } else {
                    ((255 - v - k) as u32 * 255 / (255 - k) as u32) as u8
                }
            };
            [ink(r), ink(g), ink(b), k]
        })
        .collect();
    let mut out = Vec::new();
    let encoder = jpeg_encoder::Encoder::new(&mut out, 90);
    encoder.encode(
        &cmyk,
        img.width() as u16,
        img.height() as u16,
        jpeg_encoder::ColorType::Cmyk,
    )?;
    Ok(out)
}

fn write(root: &Path, rel: &str, bytes: &[u8]) -> Result<()> {
    let path = root.join(rel);
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&path, bytes).with_context(|| format!("writing {}", path.display()))
}

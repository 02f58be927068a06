//! The `shardtool` command line.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Result, bail};
use bytesize::ByteSize;
use clap::{Parser, Subcommand, ValueEnum};
use pipeline::format::{Compression, ImageCheck, PackSettings, Reencode};
use shardtool::pack::{PackOptions, SplitReport, pack_split};
use shardtool::scan::find_splits;
use shardtool::synth::{SynthSpec, write_imagenet_like};
use shardtool::upload::upload;
use shardtool::verify::{find_packed_splits, inspect_split, verify_split};

/// Pack ImageNet-shaped image folders into zstd-compressed WebDataset tar shards, and
/// check them.
#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Pack a dataset folder into shards.
    ///
    /// INPUT is either an ImageNet folder holding train/ and/or val/, or one split folder
    /// of class folders. Each split goes to OUT/<split>/ as <split>-NNNNNN.tar.zst shards,
    /// a manifest.json (written last: without it the pack is incomplete) and a
    /// rejects.tsv listing every input that was not packed and why.
    Pack(PackArgs),
    /// Print a pack's counts, classes, shard sizes, settings and first samples.
    Inspect {
        /// A pack folder (OUT of `pack`) or one split folder in it.
        dir: PathBuf,
        /// How many samples of the first shard to show.
        #[arg(long, default_value_t = 5)]
        samples: usize,
    },
    /// Check every shard against the manifest: size, SHA-256, sample count, labels, keys.
    ///
    /// Exits non-zero if anything does not match.
    Verify {
        /// A pack folder (OUT of `pack`) or one split folder in it.
        dir: PathBuf,
        /// Also decode every image (slow: this is most of a data loader's work).
        #[arg(long)]
        decode: bool,
        /// Worker threads. By default, one per core.
        #[arg(long)]
        workers: Option<usize>,
    },
    /// Copy a pack to object storage, each split's manifest after its shards.
    ///
    /// Four shards go up at once, each streamed from disk in 16 MB parts (a multipart
    /// upload), so memory stays bounded; a shard is visible only once it is complete and
    /// its SHA-256 matches the manifest, and a failed upload writes no manifest. Each
    /// shard's SHA-256 is recorded in its metadata: rerun the same command after a failure
    /// and the shards already stored are kept, not sent again. S3 is configured as AWS tools are:
    /// AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION; gs:// and
    /// az:// with object_store's GOOGLE_* and AZURE_* variables (see pipeline/README.md).
    Upload {
        /// A pack folder (OUT of `pack`) or one split folder in it.
        dir: PathBuf,
        /// Destination, `s3://bucket/prefix`, `gs://bucket/prefix` or
        /// `az://container/prefix`; each split goes to `<URL>/<split>`.
        url: String,
        /// No progress bar.
        #[arg(long, short)]
        quiet: bool,
    },
    /// Write an ImageNet-shaped folder generated from the photos embedded in shardtool.
    ///
    /// Images are random crops of real CC0/public-domain photos, rescaled and re-encoded
    /// like ImageNet's. Nothing is downloaded.
    Synth(SynthArgs),
    /// Run the whole flow on generated data: synth, pack, verify, inspect, and stream one
    /// epoch through the pipeline loader.
    Demo {
        /// Folder for the demo: created, or replaced if an earlier demo made it.
        #[arg(default_value = "demo")]
        dir: PathBuf,
    },
}

#[derive(clap::Args)]
struct PackArgs {
    /// The dataset folder: train/ and/or val/ inside, or a single split of class folders.
    input: PathBuf,
    /// Output folder; each split is written to OUT/<split>/.
    #[arg(long, short, default_value = "shards")]
    out: PathBuf,
    /// Labels for a val/ folder that holds images directly (ImageNet's
    /// LOC_val_solution.csv: `ImageId,PredictionString`, the first word of the
    /// prediction string is the wnid). Class indices still come from train/.
    #[arg(long, value_name = "CSV")]
    val_labels: Option<PathBuf>,
    /// Seed of the shuffle across shards. Same input and seed give byte-identical shards.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Close a shard once it holds this much input (e.g. 128MB, 1GiB).
    #[arg(long, default_value = "128MB")]
    shard_size: ByteSize,
    /// Shard compression: zstd (.tar.zst) or none (plain .tar, readable by any tar tool).
    #[arg(long, value_enum, default_value_t = CompressionArg::Zstd)]
    compression: CompressionArg,
    /// zstd compression level (1-19). JPEG bytes barely compress: on ImageNet-like JPEGs
    /// level 1 is about 1.5x faster than level 3 for 0.3% more bytes (see FORMAT.md).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(i32).range(1..=19))]
    zstd_level: i32,
    /// How to check each image before packing it: `header` parses the headers and checks
    /// that the file is not truncated; `decode` decodes every image (slower).
    #[arg(long, value_enum, default_value_t = CheckArg::Header)]
    check: CheckArg,
    /// Re-encode every image as JPEG, shrunk so its longer side is at most N pixels
    /// (FFCV-style; smaller files, faster decoding). Off by default: the original bytes
    /// are stored.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(16..))]
    max_side: Option<u32>,
    /// JPEG quality of re-encoded images (with --max-side).
    #[arg(long, value_name = "Q", requires = "max_side", value_parser = clap::value_parser!(u8).range(1..=100))]
    quality: Option<u8>,
    /// Do not write the <key>.json member (wnid, source path, width, height).
    #[arg(long)]
    no_json: bool,
    /// Worker threads. By default, one per core.
    #[arg(long)]
    workers: Option<usize>,
    /// Treat any rejected input as an error (exit non-zero, no manifest).
    #[arg(long)]
    strict: bool,
    /// Finish an interrupted pack in OUT, keeping the shards it completed. The input and
    /// flags must be the same as the first time.
    #[arg(long)]
    resume: bool,
    /// No progress bar.
    #[arg(long, short)]
    quiet: bool,
}

#[derive(Clone, Copy, ValueEnum)]
enum CompressionArg {
    Zstd,
    None,
}

#[derive(Clone, Copy, ValueEnum)]
enum CheckArg {
    Header,
    Decode,
}

#[derive(clap::Args)]
struct SynthArgs {
    /// Folder to create.
    out: PathBuf,
    /// Number of classes.
    #[arg(long, default_value_t = 10)]
    classes: usize,
    /// Train images per class.
    #[arg(long, default_value_t = 20)]
    per_class: usize,
    /// Val images per class (0: no val/).
    #[arg(long, default_value_t = 5)]
    val_per_class: usize,
    /// Write val/ flat with a LOC_val_solution.csv, as ImageNet ships it.
    #[arg(long)]
    flat_val: bool,
    /// Leave out the greyscale, CMYK and PNG-named-.JPEG images.
    #[arg(long)]
    no_quirks: bool,
    /// Leave out the planted bad files (truncated, empty, not an image, empty class).
    #[arg(long)]
    no_bad_files: bool,
    /// Smallest shorter side of the images, in pixels.
    #[arg(long, default_value_t = 300)]
    min_side: u32,
    /// Largest shorter side of the images, in pixels.
    #[arg(long, default_value_t = 500)]
    max_side: u32,
    /// Lowest JPEG quality of the images.
    #[arg(long, default_value_t = 75, value_parser = clap::value_parser!(u8).range(1..=100))]
    min_quality: u8,
    /// Highest JPEG quality of the images.
    #[arg(long, default_value_t = 95, value_parser = clap::value_parser!(u8).range(1..=100))]
    max_quality: u8,
    /// Seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Worker threads. By default, one per core.
    #[arg(long)]
    workers: Option<usize>,
}

fn main() -> ExitCode {
    // Die quietly when stdout is closed early (`shardtool inspect ... | head`), as Unix
    // tools do, instead of panicking on the failed print.
    // SAFETY: called before any other thread exists; SIG_DFL is a valid disposition.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Pack(args) => {
            pack(&args)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Inspect { dir, samples } => {
            for split in find_packed_splits(&dir)? {
                println!("{}", inspect_split(&split, samples)?);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Verify {
            dir,
            decode,
            workers,
        } => verify(&dir, decode, workers.unwrap_or_else(cores)),
        Command::Synth(args) => {
            synth(&args)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Demo { dir } => demo(&dir),
        Command::Upload { dir, url, quiet } => {
            let options = pipeline::StoreOptions::from_vars(std::env::vars());
            for (target, r) in upload(&dir, &url, &options, !quiet)? {
                println!(
                    "uploaded {target}: sent {} shards and the manifest ({}), kept {} shards already stored",
                    r.sent,
                    ByteSize(r.bytes_sent),
                    r.kept
                );
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn pack(args: &PackArgs) -> Result<Vec<SplitReport>> {
    let splits = find_splits(&args.input, args.val_labels.as_deref())?;
    let opts = PackOptions {
        out: args.out.clone(),
        settings: PackSettings {
            seed: args.seed,
            target_shard_bytes: args.shard_size.as_u64().max(1),
            compression: match args.compression {
                CompressionArg::Zstd => Compression::Zstd,
                CompressionArg::None => Compression::None,
            },
            zstd_level: args.zstd_level,
            check: match args.check {
                CheckArg::Header => ImageCheck::Header,
                CheckArg::Decode => ImageCheck::Decode,
            },
            reencode: args.max_side.map(|max_side| Reencode {
                max_side,
                quality: args.quality.unwrap_or(90),
            }),
            write_json: !args.no_json,
        },
        workers: args.workers.unwrap_or_else(cores),
        strict: args.strict,
        resume: args.resume,
        progress: !args.quiet,
    };
    let mut reports = Vec::new();
    for split in &splits {
        let report = pack_split(split, &opts)?;
        print_pack_report(&report);
        reports.push(report);
    }
    Ok(reports)
}

fn print_pack_report(r: &SplitReport) {
    let m = &r.manifest;
    let bytes: u64 = m.shards.iter().map(|s| s.bytes).sum();
    println!(
        "{}: {} samples, {} classes, {} shard(s), {:.1} MB in {}",
        r.split,
        m.num_samples,
        m.classes.len(),
        m.shards.len(),
        bytes as f64 / 1e6,
        r.dir.display()
    );
    if m.num_rejects > 0 {
        println!(
            "  {} input(s) not packed, listed with the reason in {}",
            m.num_rejects,
            r.dir.join("rejects.tsv").display()
        );
    }
    if r.shards_written == 0 {
        println!("  already packed with these settings: nothing to do");
    } else {
        let secs = r.elapsed.as_secs_f64().max(1e-9);
        println!(
            "  this run: {} shard(s), {} files, {:.1} MB read in {:.2} s ({:.0} files/s, {:.1} MB/s)",
            r.shards_written,
            r.files_read,
            r.bytes_read as f64 / 1e6,
            secs,
            r.files_read as f64 / secs,
            r.bytes_read as f64 / 1e6 / secs
        );
    }
}

fn verify(dir: &Path, decode: bool, workers: usize) -> Result<ExitCode> {
    let mut bad = 0;
    for split in find_packed_splits(dir)? {
        let r = verify_split(&split, decode, workers)?;
        let what = if decode {
            "checksums, samples and decoding"
        } else {
            "checksums and samples"
        };
        if r.problems.is_empty() {
            println!(
                "{}: OK ({what}): {} shards, {} samples, {:.1} MB",
                split.display(),
                r.shards,
                r.samples,
                r.bytes as f64 / 1e6
            );
        } else {
            println!("{}: {} problem(s):", split.display(), r.problems.len());
            for p in &r.problems {
                println!("  {p}");
            }
            bad += r.problems.len();
        }
    }
    Ok(if bad == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn synth(args: &SynthArgs) -> Result<()> {
    if args.min_side == 0 || args.min_side > args.max_side {
        bail!("--min-side must be at least 1 and at most --max-side");
    }
    if args.min_quality > args.max_quality {
        bail!("--min-quality must be at most --max-quality");
    }
    if args.out.exists() && std::fs::read_dir(&args.out)?.next().is_some() {
        bail!("{} is not empty: choose a new folder", args.out.display());
    }
    let spec = SynthSpec {
        classes: args.classes,
        train_per_class: args.per_class,
        val_per_class: args.val_per_class,
        flat_val: args.flat_val,
        quirks: !args.no_quirks,
        bad_files: !args.no_bad_files,
        short_side: (args.min_side, args.max_side),
        quality: (args.min_quality, args.max_quality),
        seed: args.seed,
    };
    let r = write_imagenet_like(&args.out, &spec, args.workers.unwrap_or_else(cores))?;
    let n = r.images.0 + r.images.1;
    println!(
        "{}: {} train + {} val images, {:.1} MB ({:.0} KB per image), {} planted bad input(s)",
        args.out.display(),
        r.images.0,
        r.images.1,
        r.bytes as f64 / 1e6,
        r.bytes as f64 / 1e3 / n.max(1) as f64,
        r.bad.len()
    );
    Ok(())
}

fn demo(dir: &Path) -> Result<ExitCode> {
    // A folder marked as ours by an earlier demo is replaced; anything else is left alone.
    shardtool::synth::claim_demo_dir(dir, "shardtool")?;
    let (input, out) = (dir.join("imagenet"), dir.join("shards"));
    println!(
        "== 1. an ImageNet-shaped folder from the embedded photos: {}",
        input.display()
    );
    synth(&SynthArgs {
        out: input.clone(),
        classes: 10,
        per_class: 20,
        val_per_class: 5,
        flat_val: true,
        no_quirks: false,
        no_bad_files: false,
        min_side: 300,
        max_side: 500,
        min_quality: 75,
        max_quality: 95,
        seed: 0,
        workers: None,
    })?;
    println!(
        "\n== 2. shardtool pack {} --out {} --val-labels ...",
        input.display(),
        out.display()
    );
    pack(&PackArgs {
        input: input.clone(),
        out: out.clone(),
        val_labels: Some(input.join("LOC_val_solution.csv")),
        seed: 0,
        shard_size: ByteSize::mb(8),
        compression: CompressionArg::Zstd,
        zstd_level: 1,
        check: CheckArg::Header,
        max_side: None,
        quality: None,
        no_json: false,
        workers: None,
        strict: false,
        resume: false,
        quiet: false,
    })?;
    println!("\n== 3. shardtool verify --decode {}", out.display());
    let code = verify(&out, true, cores())?;
    println!("\n== 4. shardtool inspect {}", out.display());
    for split in find_packed_splits(&out)? {
        println!("{}", inspect_split(&split, 3)?);
    }
    let train = out.join("train");
    println!(
        "== 5. one epoch of {} through the streaming loader",
        train.display()
    );
    stream_epoch(&train)?;
    Ok(code)
}

/// Streams one epoch of the split in `dir` with the default stage-2 transform and prints
/// what came out.
fn stream_epoch(dir: &Path) -> Result<()> {
    use pipeline::{Loader, LoaderConfig, LoaderState, StoreOptions, Topology};
    let config = LoaderConfig {
        batch_size: 32,
        ..LoaderConfig::default()
    };
    let loader = Loader::open(
        &dir.display().to_string(),
        &StoreOptions::default(),
        Topology::default(),
        config,
        None,
    )?;
    let started = std::time::Instant::now();
    let (mut batches, mut images, mut masked) = (0, 0, 0);
    for batch in loader.epoch(LoaderState::default())? {
        let batch = batch?;
        batches += 1;
        images += batch.len();
        masked += batch.masks.iter().map(|&m| usize::from(m)).sum::<usize>();
        if batches == 1 {
            println!(
                "  first batch: {} images of 3x{s}x{s} uint8, labels {:?}..., {} of {} mask units set in the first image",
                batch.len(),
                &batch.labels[..4.min(batch.len())],
                batch.masks[..batch.mask_grid.pow(2)]
                    .iter()
                    .filter(|&&m| m == 1)
                    .count(),
                batch.mask_grid.pow(2),
                s = batch.size
            );
        }
    }
    let secs = started.elapsed().as_secs_f64();
    let m = loader.metrics();
    println!(
        "  {batches} batches, {images} images in {secs:.2} s ({:.0} images/s), {masked} mask units set, {} samples failed",
        images as f64 / secs,
        m.failed_samples
    );
    Ok(())
}

//! Training metrics: one JSON object per line in `metrics.jsonl`, and `mimco plot`, which
//! draws the loss and throughput curves from that file to a PNG.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use plotters::prelude::*;
use serde::{Deserialize, Serialize};

use crate::trainer::StepReport;

/// One line of `metrics.jsonl`: the step's report and the throughput around it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// Losses, rate, momentum and gradient norm of the step.
    #[serde(flatten)]
    pub report: StepReport,
    /// Epoch of the last batch.
    pub epoch: u64,
    /// Images per second since the previous line.
    pub images_per_s: f64,
    /// Share of the time since the previous line spent waiting for data.
    pub data_wait: f64,
    /// Seconds since the run (or its resumption) started.
    pub elapsed_s: f64,
    /// k-NN top-1 (%) of the encoder on the monitor's subsets, at the steps it runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub knn_top1: Option<f64>,
    /// What the data loader skipped or repaired since the run (or its resumption)
    /// started; the log names each sample and shard.
    #[serde(default)]
    pub data_faults: DataFaults,
}

/// The data loader's fault counters (see `pipeline::MetricsSnapshot`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DataFaults {
    /// Samples skipped: undecodable, or lost with a damaged shard.
    pub skipped_samples: u64,
    /// Samples delivered a second time in an epoch in place of skipped ones.
    pub repeated_samples: u64,
    /// Samples delivered although libjpeg warned about them.
    pub warned_samples: u64,
    /// Shard reads given up (corrupt, truncated, or unreadable after retries).
    pub failed_shards: u64,
    /// Store requests retried.
    pub io_retries: u64,
    /// JPEGs left for the GPU (`[data] device_decode`) that it did not decode: decoded on
    /// the CPU by the trainer instead, or, `black_samples` of them, nowhere.
    #[serde(default)]
    pub gpu_decode_fallbacks: u64,
    /// JPEGs left for the GPU that decoded nowhere: delivered black (the log names them).
    #[serde(default)]
    pub black_samples: u64,
}

impl From<&pipeline::MetricsSnapshot> for DataFaults {
    fn from(m: &pipeline::MetricsSnapshot) -> DataFaults {
        DataFaults {
            skipped_samples: m.failed_samples + m.missing_samples,
            repeated_samples: m.repeated_samples,
            warned_samples: m.warned_samples,
            failed_shards: m.failed_shards,
            io_retries: m.io_retries,
            gpu_decode_fallbacks: 0,
            black_samples: 0,
        }
    }
}

/// Appends records to `metrics.jsonl`.
pub struct MetricsLog {
    file: File,
}

impl MetricsLog {
    /// Opens `path` for appending. Lines past `keep_through` (written after the checkpoint
    /// a run resumes from) are dropped first, so the file never shows a step twice.
    pub fn open(path: &Path, keep_through: u64) -> anyhow::Result<MetricsLog> {
        if path.exists() {
            let kept: Vec<String> = read(path)?
                .into_iter()
                .filter(|r| r.report.step <= keep_through)
                .map(|r| serde_json::to_string(&r))
                .collect::<Result<_, _>>()?;
            let text: String = kept.iter().map(|l| format!("{l}\n")).collect();
            crate::checkpoint::write_atomically(path, text.as_bytes())?;
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        Ok(MetricsLog { file })
    }

    /// Appends one line.
    pub fn write(&mut self, record: &Record) -> anyhow::Result<()> {
        writeln!(self.file, "{}", serde_json::to_string(record)?)?;
        Ok(())
    }
}

/// Reads every record of a metrics file. A last line that lacks its newline and does not
/// parse was cut short (the run was killed while writing it): it is left out, with a
/// warning, so that a killed run still resumes. Any other line that does not parse is an
/// error.
pub fn read(path: &Path) -> anyhow::Result<Vec<Record>> {
    let text = fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let lines: Vec<&str> = text.lines().collect();
    let torn = !text.ends_with('\n');
    let mut records = Vec::with_capacity(lines.len());
    for (i, line) in lines.iter().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str(line) {
            Ok(record) => records.push(record),
            Err(_) if torn && i + 1 == lines.len() => tracing::warn!(
                "{} line {}: a record cut short (the run stopped while writing it); left out",
                path.display(),
                i + 1
            ),
            Err(e) => {
                return Err(anyhow::Error::new(e).context(format!(
                    "{} line {}: not a metrics record",
                    path.display(),
                    i + 1
                )));
            }
        }
    }
    Ok(records)
}

/// Fonts tried, in order, when `--font` is not given.
const FONTS: [&str; 5] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/System/Library/Fonts/Supplemental/Arial.ttf",
    "C:\\Windows\\Fonts\\arial.ttf",
];

fn register_font(font: Option<&Path>) -> anyhow::Result<()> {
    let candidates: Vec<PathBuf> = match font {
        Some(f) => vec![f.to_path_buf()],
        None => FONTS.iter().map(PathBuf::from).collect(),
    };
    let Some((path, bytes)) = candidates
        .iter()
        .find_map(|p| fs::read(p).ok().map(|b| (p, b)))
    else {
        bail!(
            "no TrueType font found for the plot's labels (tried {candidates:?}): install one (Debian: apt-get install fonts-dejavu-core) or pass --font FILE.ttf"
        );
    };
    // plotters keeps fonts for the life of the process.
    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
        .map_err(|_| anyhow::anyhow!("{} is not a TrueType font", path.display()))
}

/// Draws loss curves (total, patch, image) and throughput against the step to `png`.
pub fn plot(metrics: &Path, png: &Path, font: Option<&Path>) -> anyhow::Result<()> {
    let records = read(metrics)?;
    if records.is_empty() {
        bail!(
            "{} has no records yet: plot after the first log line",
            metrics.display()
        );
    }
    register_font(font)?;
    let root = BitMapBackend::new(png, (1200, 500)).into_drawing_area();
    root.fill(&WHITE)?;
    let (left, right) = root.split_horizontally(600);
    let steps = records.first().map_or(0, |r| r.report.step)
        ..records.last().map_or(1, |r| r.report.step).max(1);
    let series = |f: &dyn Fn(&Record) -> Option<f64>| -> Vec<(u64, f64)> {
        records
            .iter()
            .filter_map(|r| f(r).map(|v| (r.report.step, v)))
            .collect()
    };
    let mut losses = vec![("loss".to_string(), series(&|r| Some(r.report.loss)), BLACK)];
    let names: std::collections::BTreeSet<&String> =
        records.iter().flat_map(|r| r.report.parts.keys()).collect();
    // The total alone when the method has a single term of the same value.
    if names.len() > 1 {
        for (name, color) in names
            .into_iter()
            .zip([BLUE, RED, GREEN, MAGENTA, CYAN].into_iter().cycle())
        {
            losses.push((name.clone(), series(&|r| r.report.part(name)), color));
        }
    }
    let top = losses
        .iter()
        .flat_map(|(_, s, _)| s.iter().map(|p| p.1))
        .fold(0.0, f64::max)
        * 1.05;
    let mut chart = ChartBuilder::on(&left)
        .caption("loss", ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(52)
        .build_cartesian_2d(steps.clone(), 0.0..top.max(1e-3))?;
    chart.configure_mesh().x_desc("step").draw()?;
    for (name, points, color) in losses {
        if !points.is_empty() {
            chart
                .draw_series(LineSeries::new(points, color.stroke_width(2)))?
                .label(name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color));
        }
    }
    chart
        .configure_series_labels()
        .background_style(WHITE)
        .border_style(BLACK)
        .draw()?;
    let speed = series(&|r| Some(r.images_per_s));
    let fastest = speed.iter().map(|p| p.1).fold(0.0, f64::max) * 1.1;
    let mut chart = ChartBuilder::on(&right)
        .caption("images/s", ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(52)
        .build_cartesian_2d(steps, 0.0..fastest.max(1.0))?;
    chart.configure_mesh().x_desc("step").draw()?;
    chart.draw_series(LineSeries::new(speed, GREEN.stroke_width(2)))?;
    root.present()
        .with_context(|| format!("writing {}", png.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(step: u64) -> Record {
        Record {
            report: StepReport {
                step,
                loss: 1.5,
                parts: Default::default(),
                lr: 1e-3,
                momentum: 0.99,
                grad_norm: 2.0,
            },
            epoch: 0,
            images_per_s: 10.0,
            data_wait: 0.0,
            elapsed_s: 1.0,
            knn_top1: None,
            data_faults: Default::default(),
        }
    }

    /// A run killed mid-line leaves a last line cut short: reading leaves it out and
    /// reopening for a resume drops it; a damaged line before the last is an error.
    #[test]
    fn a_last_record_cut_short_is_left_out_and_others_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.jsonl");
        let mut log = MetricsLog::open(&path, 0).unwrap();
        for step in 1..=3 {
            log.write(&record(step)).unwrap();
        }
        drop(log);
        let whole = fs::read_to_string(&path).unwrap();
        let cut = &whole[..whole.len() - 20];
        fs::write(&path, cut).unwrap();
        let steps = |path: &Path| -> Vec<u64> {
            read(path).unwrap().iter().map(|r| r.report.step).collect()
        };
        assert_eq!(steps(&path), [1, 2]);
        let mut log = MetricsLog::open(&path, 2).unwrap();
        log.write(&record(3)).unwrap();
        drop(log);
        assert_eq!(steps(&path), [1, 2, 3]);

        let first_newline = whole.find('\n').unwrap();
        let damaged = format!(
            "{}\n{}",
            &whole[..first_newline - 20],
            &whole[first_newline + 1..]
        );
        fs::write(&path, damaged).unwrap();
        let e = format!("{:#}", read(&path).unwrap_err());
        assert!(e.contains("line 1: not a metrics record"), "{e}");
    }
}

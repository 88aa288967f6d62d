//! `blink bench NIGHT`: detection, speed and latency measured on a night folder with a truth
//! table. Frames mode runs `detect` and scores the catalogue against truth; alerts mode replays
//! the night's alerts through the `serve` pipeline. Definitions: `docs/bench.md`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use clap::{Args, ValueEnum};

use crate::bench::alerts::{self, AlertsOptions};
use crate::bench::matching::{self, MATCH_RADIUS_PX};
use crate::bench::plots::{self, GalleryPick, GalleryRow};
use crate::bench::report::{BenchReport, FramesReport, Speed, StageTime};
use crate::bench::stats;
use crate::bench::stacks::{EpochPsfs, Moffat};
use crate::detect::{Detection, Detector, FrameImages, FrameResult, Night};
use crate::sim::night::truth::{self, TruthRecord};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// Detect on the FITS frames and score the catalogue against truth.
    Frames,
    /// Replay the night's Avro alerts through the serve pipeline (embedded Kafka by default).
    Alerts,
    /// Both (alerts only when the night has an alerts folder).
    Both,
}

#[derive(Debug, Args, Clone)]
pub struct BenchArgs {
    /// Night folder with a truth table (`blink simulate --out DIR` writes one).
    pub night: PathBuf,
    /// What to measure.
    #[arg(long, value_enum, default_value_t = Mode::Both)]
    pub mode: Mode,
    /// Write every figure as JSON to this file (keys in docs/bench.md).
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Write PNG plots into this folder: completeness.png, completeness_mag.png,
    /// false_positives.png and gallery.png (science, template, difference stamps of the best
    /// detections, the missed transients and the false positives).
    #[arg(long)]
    pub plots: Option<PathBuf>,
    /// Stamps per gallery section.
    #[arg(long, default_value_t = 8)]
    pub gallery: usize,
    /// Write the frames-mode detection catalogue here as well (CSV, docs/detections.md).
    #[arg(long)]
    pub catalog: Option<PathBuf>,
    #[command(flatten)]
    pub detect: super::detect::DetectOptionsArgs,
    #[command(flatten)]
    pub engine: super::EngineArgs,
    /// Alerts mode: "embedded" (librdkafka's in-process cluster) or a bootstrap list host:port.
    #[arg(long, default_value = "embedded")]
    pub kafka: String,
    /// Alerts mode: topic to publish to and consume from.
    #[arg(long, default_value = "blink-bench-alerts")]
    pub topic: String,
    /// Alerts mode: replay the ZTF-shaped packets (alerts/*.ztf.avro) instead of blink's own.
    #[arg(long)]
    pub ztf: bool,
    /// Alerts mode: give up after this many seconds.
    #[arg(long, default_value_t = 600)]
    pub timeout: u64,
    /// No per-frame progress lines on stderr.
    #[arg(long, short)]
    pub quiet: bool,
}

/// Half-size of gallery stamps, pixels (stamps are 2·R+1 wide).
const GALLERY_HALF: usize = 15;

/// Per-epoch optimal SNR range of the slow transients issue 5's stacking targets are set on.
const SLOW_SNR: (f64, f64) = (2.0, 3.0);

/// A stamp triplet around (x, y); pixels outside the frame are NaN.
fn cut(img: &FrameImages, x: f64, y: f64) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let r = GALLERY_HALF as i64;
    let (cx, cy) = (x.round() as i64, y.round() as i64);
    let mut out = (Vec::new(), Vec::new(), Vec::new());
    for yy in cy - r..=cy + r {
        for xx in cx - r..=cx + r {
            let inside = xx >= 0 && yy >= 0 && (xx as usize) < img.width && (yy as usize) < img.height;
            let q = if inside { yy as usize * img.width + xx as usize } else { 0 };
            let masked = !inside || img.masked[q];
            out.0.push(if inside { img.science[q] } else { f32::NAN });
            out.1.push(if inside { img.template[q] } else { f32::NAN });
            out.2.push(if masked { f32::NAN } else { img.difference[q] });
        }
    }
    out
}

/// Gallery candidates of one frame, cut while its images are in memory.
#[derive(Default)]
struct GalleryCache {
    rows: HashMap<(String, i64, i64), GalleryRow>,
}

impl GalleryCache {
    fn key(frame: &str, x: f64, y: f64) -> (String, i64, i64) {
        (frame.to_string(), (x * 10.0).round() as i64, (y * 10.0).round() as i64)
    }

    fn add(&mut self, img: &FrameImages, p: &GalleryPick) {
        let (science, template, difference) = cut(img, p.x, p.y);
        let row = GalleryRow { label: p.label.clone(), size: 2 * GALLERY_HALF + 1, science, template, difference };
        self.rows.insert(Self::key(&p.frame, p.x, p.y), row);
    }

    fn take(&self, picks: &[GalleryPick]) -> Vec<GalleryRow> {
        picks.iter().filter_map(|p| self.rows.get(&Self::key(&p.frame, p.x, p.y)).cloned()).collect()
    }
}

/// Frames mode: detect on every frame, match, summarise, and keep gallery stamps.
/// Gallery sections: a title and its stamp rows.
type Gallery = Vec<(String, Vec<GalleryRow>)>;

fn run_frames(args: &BenchArgs, night: &Night, truth_rows: &[TruthRecord]) -> anyhow::Result<(FramesReport, Vec<Detection>, Gallery)> {
    let opts = args.detect.options()?;
    let engine = crate::engine::select_engine(super::engine_preference(&args.engine)?)?;
    let mut det = Detector::new(engine, opts.clone());
    det.keep_images = true;
    let mut by_frame: HashMap<&str, Vec<&TruthRecord>> = HashMap::new();
    for t in truth_rows {
        by_frame.entry(t.frame.as_str()).or_default().push(t);
    }
    let n_gallery = args.gallery;
    let mut gallery = GalleryCache::default();
    let mut sky_sigmas = Vec::new();
    let quiet = args.quiet;
    let run = det.detect_night(night, args.detect.frames, |i, n, r: &mut FrameResult| {
        let rows: Vec<&TruthRecord> = by_frame.get(r.frame.as_str()).cloned().unwrap_or_default();
        let img = r.images.take().expect("the detector keeps images for bench");
        if let Some(s) = crate::bench::sky::empty_sky_sigma(&img, &rows, r.fwhm_science) {
            sky_sigmas.push(s as f32);
        }
        if n_gallery > 0 {
            let owned: Vec<TruthRecord> = rows.iter().map(|t| (*t).clone()).collect();
            let m = matching::match_night(&r.detections, &owned, std::slice::from_ref(&r.frame), MATCH_RADIUS_PX);
            let picks = plots::gallery_picks(&m, &r.detections, n_gallery);
            for p in picks.best.iter().chain(&picks.missed).chain(&picks.false_positives) {
                gallery.add(&img, p);
            }
        }
        if !quiet {
            eprintln!("{}", super::detect::progress_line(i, n, r));
        }
    })?;
    let mut frames: Vec<String> = run.frames.iter().map(|f| f.frame.clone()).collect();
    let dets: Vec<Detection> = run.detections().cloned().collect();
    // Stacks are scored against the combined truth of their frames (`bench::stacks`).
    let mut truth_all = truth_rows.to_vec();
    if !run.stacks.is_empty() {
        let epochs = epoch_psfs(night);
        let epoch = |f: &str| epochs.get(f).copied().unwrap_or(EpochPsfs::depth(1.0));
        truth_all.extend(crate::bench::stacks::stack_truth(truth_rows, &run.stacks, &epoch));
        frames.extend(run.stacks.iter().map(|s| s.key.clone()));
        if !quiet {
            for s in &run.stacks {
                eprintln!("{}", super::detect::stack_line(s));
            }
        }
    }
    let epoch_truth = truth_rows;
    let truth_rows = &truth_all[..];
    let m = matching::match_night(&dets, truth_rows, &frames, MATCH_RADIUS_PX);
    if m.targets.is_empty() {
        tracing::warn!("the truth table lists no transients or variable stars on these frames: completeness is undefined");
    }
    let summary = stats::summarize(&m, &dets, opts.threshold);
    let stages = run.times().named().iter().map(|(n, s)| StageTime { name: n.to_string(), seconds: *s }).collect();
    let adapter = match opts.method {
        crate::detect::frame::Method::AlardLupton => format!("cpu (Alard-Lupton kernel; engine {} only for frames without stars)", run.adapter),
        crate::detect::frame::Method::Gaussian => run.adapter.clone(),
    };
    let speed = Speed::new(adapter, run.frames.len(), run.megapixels(), run.wall.as_secs_f64(), stages);
    let sky = crate::detect::image::median(sky_sigmas).map(|v| v as f64).unwrap_or(f64::NAN);
    let picks = plots::gallery_picks(&m, &dets, n_gallery);
    let sections = vec![
        ("best detections".to_string(), gallery.take(&picks.best)),
        ("missed transients".to_string(), gallery.take(&picks.missed)),
        ("false positives".to_string(), gallery.take(&picks.false_positives)),
    ];
    let stacks = crate::bench::stacks::window_summaries(&m, &dets, opts.threshold, &run.stacks, epoch_truth, truth_rows, SLOW_SNR);
    Ok((FramesReport { summary, speed, score_sigma_empty_sky: sky, threshold: opts.threshold, stacks }, dets, sections))
}

/// Each frame's template depth (`NCOMBINE`, the number of exposures averaged) and, where the
/// headers have `SEEING` and `PSFBETA` (as `blink simulate` writes them), the frame's PSF and
/// its template's, by frame file: what the ideal stack SNR needs (`bench::stacks`).
fn epoch_psfs(night: &Night) -> HashMap<String, EpochPsfs> {
    let keys = |file: &str| crate::detect::image::read_keys(&night.path(file), &["NCOMBINE", "SEEING", "PSFBETA"]).unwrap_or_else(|_| vec![None; 3]);
    let psf = |k: &[Option<f64>]| match (k[1], k[2]) {
        (Some(fwhm), Some(beta)) if fwhm > 0.0 && beta > 1.0 => Some(Moffat { fwhm, beta }),
        _ => None,
    };
    let mut by_template: HashMap<String, (f64, Option<Moffat>)> = HashMap::new();
    let mut out = HashMap::new();
    for e in &night.manifest.frames {
        let (depth, template) = *by_template.entry(e.template.clone()).or_insert_with(|| {
            let k = keys(&e.template);
            (k[0].unwrap_or(1.0), psf(&k))
        });
        out.insert(e.file.clone(), EpochPsfs { depth, science: psf(&keys(&e.file)), template });
    }
    out
}

fn read_truth(night: &Night) -> anyhow::Result<Vec<TruthRecord>> {
    let path = night.truth_path().with_context(|| {
        format!(
            "{}: the manifest names no truth table (truth = \"truth.csv\"): bench needs to know what was injected; \
             to detect without truth use `blink detect`",
            night.dir.join("manifest.toml").display()
        )
    })?;
    if !path.is_file() {
        anyhow::bail!("{}: the truth table the manifest names does not exist", path.display());
    }
    Ok(truth::read(&path)?)
}

pub async fn run(args: &BenchArgs) -> anyhow::Result<()> {
    let night = Night::open(&args.night)?;
    let truth_rows = read_truth(&night)?;
    let mut report = BenchReport::new(args.night.display().to_string(), night.manifest.generator.clone());
    let mut gallery = Vec::new();
    if matches!(args.mode, Mode::Frames | Mode::Both) {
        let (a, n, t) = (args.clone(), night.clone(), truth_rows.clone());
        let (frames, dets, sections) = tokio::task::spawn_blocking(move || run_frames(&a, &n, &t))
            .await
            .context("the detection thread failed")??;
        if let Some(path) = &args.catalog {
            let f = std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
            crate::detect::catalog::write_csv(std::io::BufWriter::new(f), &dets).with_context(|| format!("writing {}", path.display()))?;
        }
        report.frames = Some(frames);
        gallery = sections;
    }
    let want_alerts = match args.mode {
        Mode::Alerts => true,
        Mode::Both => night.manifest.alerts.is_some(),
        Mode::Frames => false,
    };
    if want_alerts {
        let opts = AlertsOptions {
            kafka: args.kafka.clone(),
            topic: args.topic.clone(),
            threshold: args.detect.threshold,
            timeout: Duration::from_secs(args.timeout),
            engine: super::engine_preference(&args.engine)?,
            ztf: args.ztf,
            ..AlertsOptions::default()
        };
        report.alerts = Some(alerts::run(&night.dir, &opts).await?);
    } else if args.mode == Mode::Both {
        eprintln!("(the night has no alerts folder: alerts mode skipped)");
    }
    println!("{}", report.table());
    if let Some(path) = &args.json {
        report.write_json(path).with_context(|| format!("writing {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    if let Some(dir) = &args.plots {
        write_plots(dir, &report, &gallery)?;
    }
    Ok(())
}

fn write_plots(dir: &Path, report: &BenchReport, gallery: &[(String, Vec<GalleryRow>)]) -> anyhow::Result<()> {
    let Some(frames) = &report.frames else {
        eprintln!("(plots need frames mode: none written)");
        return Ok(());
    };
    let mut files = plots::write_plots(dir, &frames.summary).map_err(|e| anyhow::anyhow!("writing plots into {}: {e}", dir.display()))?;
    let g = dir.join("gallery.png");
    let sections: Vec<(&str, Vec<GalleryRow>)> = gallery.iter().map(|(n, r)| (n.as_str(), r.clone())).collect();
    plots::write_gallery(&g, &sections).map_err(|e| anyhow::anyhow!("writing {}: {e}", g.display()))?;
    files.push(g);
    eprintln!("wrote {}", files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>().join(", "));
    Ok(())
}

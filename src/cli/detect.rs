//! `blink detect NIGHT`: subtract every frame of a night folder from its template, detect, and
//! write the detection catalogue (`docs/detections.md`).

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

use crate::detect::{catalog, Detector, FrameOptions, Night};

#[derive(Debug, Args, Clone)]
pub struct DetectArgs {
    /// Night folder (a manifest.toml with its frames and templates; docs/night-format.md).
    pub night: PathBuf,
    /// Catalogue to write (CSV, one row per detection; docs/detections.md).
    #[arg(long, default_value = "detections.csv")]
    pub out: PathBuf,
    #[command(flatten)]
    pub detect: DetectOptionsArgs,
    #[command(flatten)]
    pub engine: super::EngineArgs,
    /// No per-frame progress lines on stderr.
    #[arg(long, short)]
    pub quiet: bool,
}

/// Options shared by `detect` and `bench`.
#[derive(Debug, Args, Clone)]
pub struct DetectOptionsArgs {
    /// Detection threshold: |score| in sigma of the matched-filter score image.
    #[arg(long, default_value_t = 5.0)]
    pub threshold: f64,
    /// Tile size in pixels: frames go to the engine as a batch of tiles of this size (plus a
    /// halo for the matching kernel); the background (and the flux scale, when neither zero
    /// points nor stars give it) is fitted per tile.
    #[arg(long, default_value_t = 256)]
    pub tile: usize,
    /// Process only the first N frames of the manifest.
    #[arg(long)]
    pub frames: Option<usize>,
    /// Matching kernel: `al` (Alard–Lupton fitted on stars, varying across the frame; the fit
    /// on the CPU, everything else on a real GPU when there is one; falls back to `gaussian` on
    /// frames with too few stars) or `gaussian` (one Gaussian from the two seeings, on the GPU
    /// or CPU engine).
    #[arg(long, value_parser = ["al", "gaussian"], default_value = "al")]
    pub method: String,
    /// Stack each field's and band's differences over these windows of nights and detect on
    /// the stacks too (faint, slow transients); `none` turns stacking off. Stack detections
    /// have the frame `stack:<window>:<last frame>` in the catalogue (docs/stacking.md).
    #[arg(long, default_value = "1,3,10,30")]
    pub stack_windows: String,
    /// Relative ridge on the Alard–Lupton kernel's coefficients (as `blink subtract`'s). The
    /// default 1e-2 suits nights of faint stars; 1e-4 takes away the residuals at the cores of
    /// stars of 10⁶ e⁻ and more, but on the default simulated night it adds false positives
    /// (docs/detections.md).
    #[arg(long, default_value_t = crate::subtract::FitOptions::default().regularization, value_parser = super::kernel_regularization)]
    pub kernel_regularization: f64,
    /// Keep cosmic rays and hot pixels as they are. By default both images' pixels far sharper
    /// than their PSF allows are found and interpolated over before the subtraction, so the
    /// kernel does not spread them into star-shaped blobs; detections beside one are flagged
    /// `sharp` (docs/detections.md).
    #[arg(long)]
    pub no_repair: bool,
}

impl DetectOptionsArgs {
    pub fn options(&self) -> anyhow::Result<FrameOptions> {
        if !(self.threshold.is_finite() && self.threshold > 0.0) {
            anyhow::bail!("--threshold {}: expected a positive number of sigma", self.threshold);
        }
        if !(16..=4096).contains(&self.tile) {
            anyhow::bail!("--tile {}: expected 16 to 4096 pixels", self.tile);
        }
        let method = self.method.parse().map_err(|e: String| anyhow::anyhow!(e))?;
        let stack_windows = crate::detect::stacking::parse_windows(&self.stack_windows).map_err(|e| anyhow::anyhow!("--stack-windows: {e}"))?;
        Ok(FrameOptions { threshold: self.threshold, tile: self.tile, method, stack_windows, kernel_regularization: self.kernel_regularization, repair: !self.no_repair, ..FrameOptions::default() })
    }
}

/// One progress line per frame.
pub fn progress_line(i: usize, n: usize, r: &crate::detect::FrameResult) -> String {
    format!(
        "[{}/{n}] {}: {} detections, FWHM {:.2} px (template {:.2}), aperture corr. {}, score sigma {:.3}, {:.2} s",
        i + 1,
        r.frame,
        r.detections.len(),
        r.fwhm_science,
        r.fwhm_template,
        r.aperture_correction.map(|c| format!("{c:.3}")).unwrap_or_else(|| "none".into()),
        r.score_sigma,
        r.times.total().as_secs_f64()
    )
}

/// One line per stack.
pub fn stack_line(s: &crate::detect::stacking::StackResult) -> String {
    format!(
        "stack {} {} {} ({} frames to {}): {} detections, score sigma {:.3}",
        s.window,
        s.field,
        s.band,
        s.frames.len(),
        s.frames.last().map(String::as_str).unwrap_or(""),
        s.detections.len(),
        s.score_sigma
    )
}

pub async fn run(args: &DetectArgs) -> anyhow::Result<()> {
    let opts = args.detect.options()?;
    let night = Night::open(&args.night)?;
    let pref = super::engine_preference(&args.engine)?;
    let (a, quiet) = (args.clone(), args.quiet);
    let run = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        let engine = crate::engine::select_engine(pref)?;
        let mut det = Detector::new(engine, opts);
        let run = det.detect_night(&night, a.detect.frames, |i, n, r| {
            if !quiet {
                eprintln!("{}", progress_line(i, n, r));
            }
        })?;
        Ok(run)
    })
    .await
    .context("the detection thread failed")??;
    if !args.quiet {
        for s in &run.stacks {
            eprintln!("{}", stack_line(s));
        }
    }
    let dets: Vec<_> = run.detections().cloned().collect();
    let file = std::fs::File::create(&args.out).with_context(|| format!("creating {}", args.out.display()))?;
    catalog::write_csv(std::io::BufWriter::new(file), &dets).with_context(|| format!("writing {}", args.out.display()))?;
    let secs = run.wall.as_secs_f64().max(1e-9);
    eprintln!(
        "{} detections in {} frames written to {} ({:.2} frames/s, {:.1} Mpix/s, {} kernel, engine {})",
        dets.len(),
        run.frames.len(),
        args.out.display(),
        run.frames.len() as f64 / secs,
        run.megapixels() / secs,
        args.detect.method,
        run.adapter
    );
    Ok(())
}

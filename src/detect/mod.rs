//! Detection on full frames: `blink detect NIGHT`. Each frame of a night folder
//! (`docs/night-format.md`) is subtracted from its template by the engine (tiles of the frame
//! as a batch of stamps), a matched-filter score image is built, and its local extrema above
//! threshold become [`catalog::Detection`]s (`docs/detections.md`).
//!
//! # Layout
//! - [`image`]: FITS frames and templates with their header keys, read liberally; variance,
//!   gain and seeing estimates.
//! - [`frame`]: subtraction on tiles, the score image, peaks, measurements and flags.
//! - [`catalog`]: the detection catalogue (CSV) and its flags.
//! - This file: opening a night, [`Detector`] (one engine, a template cache, per-stage times).

pub mod al;
pub mod catalog;
pub mod frame;
pub mod image;
pub mod psf;
pub mod repair;
pub mod shape;
pub mod sources;
pub mod stacking;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::engine::Engine;
use crate::sim::night::manifest::{FrameEntry, Manifest};

pub use catalog::Detection;
pub use frame::FrameOptions;
pub use image::Image;

/// What can stop detection; every variant names the file at fault.
#[derive(Debug, thiserror::Error)]
pub enum DetectError {
    #[error("{path}: not a night folder: {message}")]
    NotANight { path: PathBuf, message: String },
    #[error("{path}: {message}")]
    Fits { path: PathBuf, message: String },
    #[error("{path}: header key {key}: {message}")]
    Header { path: PathBuf, key: String, message: String },
    #[error("{path}: {message}")]
    Shape { path: PathBuf, message: String },
    #[error("{path}: registration: {message}")]
    Registration { path: PathBuf, message: String },
    #[error("{path}: engine: {message}")]
    Engine { path: PathBuf, message: String },
}

/// Largest offset between a frame's pixel grid and its template's that blink accepts, pixels.
pub const MAX_REGISTRATION_OFFSET_PX: f64 = 0.5;

/// A night folder: its directory and manifest.
#[derive(Debug, Clone)]
pub struct Night {
    pub dir: PathBuf,
    pub manifest: Manifest,
}

impl Night {
    /// Open `dir` (or its `manifest.toml`) and check the manifest.
    pub fn open(dir: &Path) -> Result<Night, DetectError> {
        let (dir, file) = if dir.is_file() {
            (dir.parent().unwrap_or(Path::new(".")).to_path_buf(), dir.to_path_buf())
        } else {
            (dir.to_path_buf(), dir.join("manifest.toml"))
        };
        if !dir.is_dir() {
            return Err(DetectError::NotANight { path: dir, message: "no such directory".into() });
        }
        if !file.is_file() {
            return Err(DetectError::NotANight {
                path: dir,
                message: "no manifest.toml (`blink simulate --out DIR` writes one; the format is docs/night-format.md)".into(),
            });
        }
        let manifest = Manifest::read(&file).map_err(|e| DetectError::NotANight { path: file.clone(), message: e.to_string() })?;
        if manifest.frames.is_empty() {
            return Err(DetectError::NotANight { path: file, message: "the manifest lists no [[frames]]".into() });
        }
        Ok(Night { dir, manifest })
    }

    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }

    /// The truth table's path, when the manifest names one.
    pub fn truth_path(&self) -> Option<PathBuf> {
        self.manifest.truth.as_deref().map(|t| self.path(t))
    }
}

/// Seconds spent per stage over one frame.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StageTimes {
    /// FITS reading (templates are read once and cached).
    pub read: Duration,
    /// Variance, masks and the tile batch.
    pub prepare: Duration,
    /// The engine: convolve, fit, difference (upload and read-back included).
    pub engine: Duration,
    /// Background of the difference and the matched-filter score image.
    pub score: Duration,
    /// Peaks, measurements, flags.
    pub detect: Duration,
    /// Stacking (`detect::stacking`): the frame into its night, and the stacks of every night
    /// it ended (coadds, scores, peaks).
    pub stack: Duration,
}

impl StageTimes {
    pub fn add(&mut self, o: &StageTimes) {
        self.read += o.read;
        self.prepare += o.prepare;
        self.engine += o.engine;
        self.score += o.score;
        self.detect += o.detect;
        self.stack += o.stack;
    }

    /// (name, seconds) in pipeline order.
    pub fn named(&self) -> [(&'static str, f64); 6] {
        [
            ("read", self.read.as_secs_f64()),
            ("prepare", self.prepare.as_secs_f64()),
            ("engine", self.engine.as_secs_f64()),
            ("score", self.score.as_secs_f64()),
            ("detect", self.detect.as_secs_f64()),
            ("stack", self.stack.as_secs_f64()),
        ]
    }

    pub fn total(&self) -> Duration {
        self.read + self.prepare + self.engine + self.score + self.detect + self.stack
    }
}

/// Images of one frame kept for inspection (bench's gallery), all `width`×`height`.
#[derive(Debug, Clone)]
pub struct FrameImages {
    pub width: usize,
    pub height: usize,
    pub science: Vec<f32>,
    pub template: Vec<f32>,
    pub difference: Vec<f32>,
    pub score: Vec<f32>,
    /// True where the difference has no data (masked).
    pub masked: Vec<bool>,
}

/// What detection produced on one frame.
#[derive(Debug, Clone)]
pub struct FrameResult {
    pub frame: String,
    pub width: usize,
    pub height: usize,
    pub detections: Vec<Detection>,
    pub times: StageTimes,
    /// PSF FWHM of science, template and difference, pixels.
    pub fwhm_science: f64,
    pub fwhm_template: f64,
    pub kernel_sigma: f64,
    pub scale: f64,
    /// Filter flux / total flux of the difference's PSF; `None` when too few bright isolated
    /// stars to measure it (fluxes are then the Gaussian filter's, low by 10–30% on real PSFs).
    pub aperture_correction: Option<f64>,
    /// Robust σ (1.4826 MAD) of the score image over unmasked pixels: 1 for white noise.
    pub score_sigma: f64,
    pub images: Option<FrameImages>,
}

/// Runs detection frame after frame with one engine; the last template read is cached.
pub struct Detector {
    engine: Box<dyn Engine>,
    pub options: FrameOptions,
    /// Keep the frame's images in [`FrameResult::images`].
    pub keep_images: bool,
    /// The last template read, with what subtraction needs of it (computed once per template),
    /// and its prepared planes where they were made on a GPU (kept there for every frame of it).
    template: Option<(Image, frame::Prepared)>,
    /// The cached template's repaired pixels ([`repair`]).
    template_repaired: repair::Repaired,
    template_resident: Option<al::ResidentPrepared>,
    /// The cached template's point sources (the `residual` flag).
    template_sources: sources::PointSources,
    /// Stacks of the night being detected (`detect_night`), and the stacks its frames ended.
    stacker: Option<stacking::FrameStacker>,
    stacks: Vec<stacking::StackResult>,
}

impl Detector {
    pub fn new(engine: Box<dyn Engine>, options: FrameOptions) -> Detector {
        Detector {
            engine,
            options,
            keep_images: false,
            template: None,
            template_repaired: repair::Repaired::default(),
            template_resident: None,
            template_sources: sources::PointSources::default(),
            stacker: None,
            stacks: Vec::new(),
        }
    }

    pub fn adapter(&self) -> String {
        self.engine.adapter()
    }

    /// Detect on one frame of `night`.
    pub fn detect_frame(&mut self, night: &Night, entry: &FrameEntry) -> Result<FrameResult, DetectError> {
        let t0 = Instant::now();
        let mut science = image::read_image(&night.path(&entry.file))?;
        let mjd = science.header.mjd_mid().ok_or_else(|| DetectError::Header {
            path: science.path.clone(),
            key: "MJD-OBS".into(),
            message: "no time key (MJD-OBS, MJD or DATE-OBS)".into(),
        })?;
        let tpath = night.path(&entry.template);
        let mut template_prepare = Duration::ZERO;
        if self.template.as_ref().map(|(t, _)| t.path != tpath).unwrap_or(true) {
            let mut t = image::read_image(&tpath)?;
            for w in &t.warnings {
                tracing::warn!(file = %tpath.display(), "{w}");
            }
            let tp = Instant::now();
            self.template_repaired = if self.options.repair { t.repair_sharp() } else { repair::Repaired::default() };
            if let (Some(old), Some(g)) = (self.template_resident.take(), self.engine.frame_gpu()) {
                old.release(g);
            }
            let (prepared, resident) = al::prepare_on_resident(self.engine.frame_gpu(), &t, &self.options)?;
            self.template_sources = sources::point_sources(&t, prepared.fwhm / frame::FWHM_PER_SIGMA);
            template_prepare = tp.elapsed();
            self.template = Some((t, prepared));
            self.template_resident = resident;
        }
        for w in &science.warnings {
            tracing::warn!(file = %science.path.display(), "{w}");
        }
        let (template, tprep) = self.template.as_ref().expect("template cached above");
        let read = t0.elapsed() - template_prepare;
        check_registration(&science, template)?;
        let tp = Instant::now();
        let repaired = if self.options.repair { science.repair_sharp().union(&self.template_repaired) } else { repair::Repaired::default() };
        // On a real GPU the prepared planes stay there through the subtraction and the score
        // (`al::subtract_al_resident`, whose fit takes its stars from there): only the science
        // frame goes up, and its prepared planes come back only for the Gaussian kernel (and
        // the model-error term, which needs the model on the host).
        let on_device = self.options.method == frame::Method::AlardLupton && !self.options.model_error;
        let prepare = if on_device { al::prepare_on_device } else { al::prepare_on_resident };
        let (mut sprep, sres) = prepare(self.engine.frame_gpu(), &science, &self.options)?;
        let science_prepare = tp.elapsed();
        let mut resident = None;
        let al = match self.options.method {
            frame::Method::AlardLupton => {
                let done = match (self.engine.frame_gpu(), &sres, &self.template_resident) {
                    (Some(g), Some(rs), Some(rt)) => al::subtract_al_resident(&science, &sprep, rs, template, tprep, rt, &self.options, g).map(|(d, planes)| {
                        resident = planes;
                        d
                    }),
                    (g, _, _) => al::subtract_al(&science, &sprep, template, tprep, &self.options, g),
                };
                match done {
                    Ok(d) => Some(d),
                    Err(e) => {
                        tracing::warn!("{e}; falling back to a Gaussian kernel");
                        None
                    }
                }
            }
            frame::Method::Gaussian => None,
        };
        if let (Some(r), Some(g)) = (sres, self.engine.frame_gpu()) {
            let filled = if al.is_none() { r.fill_host(g, &mut sprep) } else { Ok(()) };
            r.release(g);
            filled.map_err(|e| DetectError::Engine { path: science.path.clone(), message: format!("reading the prepared planes back from the GPU: {e}") })?;
        }
        let mut diff = match al {
            Some(d) => d,
            None => frame::subtract_prepared(self.engine.as_mut(), &science, &sprep, template, tprep, &self.options)?,
        };
        diff.prepare += template_prepare + science_prepare;
        let t1 = Instant::now();
        // The difference's PSF is the broader one: the science frame's when the template was
        // convolved, else the template's. Measured on its stars where it has enough.
        let psf_image = if diff.convolved_template { &science } else { template };
        let psf = psf::difference_psf(psf_image, diff.sigma_difference);
        // On a real GPU the score's correlations run there (the same routes).
        let on_gpu = self.engine.frame_gpu().map(|g| match &resident {
            Some(r) => frame::score_image_gpu_resident(&diff, psf.as_ref(), g, r),
            None => frame::score_image_gpu(&diff, psf.as_ref(), g),
        });
        if let (Some(r), Some(g)) = (resident.take(), self.engine.frame_gpu()) {
            r.release(g);
        }
        let sc = match on_gpu {
            Some(Ok(sc)) => sc,
            Some(Err(e)) => {
                tracing::warn!("the score image on the GPU failed ({e}); on the CPU");
                frame::score_image(&diff, psf.as_ref())
            }
            None => frame::score_image(&diff, psf.as_ref()),
        };
        let score = t1.elapsed();
        let t2 = Instant::now();
        let aperture_correction = match &psf {
            Some(p) => image::aperture_correction_profile(psf_image, &p.pixels, p.side, diff.sigma_difference),
            None => image::aperture_correction(psf_image, diff.sigma_difference),
        }
        .filter(|c| (0.5..=1.2).contains(c));
        if aperture_correction.is_none() {
            tracing::debug!(file = %psf_image.path.display(), "too few bright isolated stars for an aperture correction: fluxes are the matched filter's");
        }
        let meta = frame::FrameMeta {
            frame: &entry.file,
            mjd,
            band: &entry.band,
            zero_point: science.header.zero_point,
            wcs: template.header.wcs.or(science.header.wcs),
            aperture_correction: aperture_correction.unwrap_or(1.0),
            convolved_science: (!diff.convolved_template).then(|| frame::ConvolvedScience { data: &science.data, gain: science.gain_or_estimate(), sigma: diff.sigma_science }),
            repaired: Some(&repaired),
            point_sources: Some((&self.template_sources, diff.scale)),
        };
        let mut detections = frame::find_peaks(&diff, &sc, &meta, self.options.threshold);
        // On a star of the template, a profile much narrower than the PSF is the star's core
        // left by a kernel that did not match it (`detect::shape`): on the decorrelated
        // difference, whose noise is white, with the PSF through the decorrelation filter.
        // Only with a measured PSF: a Gaussian stand-in is no yardstick for a core's width.
        let decorrelated_psf = stacking::decorrelated_frame_psf(&diff, psf.as_ref());
        if let (Some(dc), Some(q), true) = (diff.decorrelated.as_ref(), decorrelated_psf.as_ref(), psf.is_some()) {
            for d in detections.iter_mut().filter(|d| d.flags & catalog::ARTIFACT_FLAGS == 0) {
                if self.template_sources.within(d.x, d.y, sources::CENTRED_PX).next().is_some() && shape::is_narrow_core(shape::Plane { data: &dc.difference, var: &dc.variance, width: diff.width, height: diff.height }, q, d.x, d.y) {
                    d.flags |= catalog::flags::RESIDUAL;
                }
            }
        }
        let sample: Vec<f32> =
            sc.score.iter().zip(&diff.variance).step_by(3).filter(|(_, v)| **v > 0.0).map(|(s, _)| *s).collect();
        let score_sigma = image::robust_stats(&sample).map(|(_, s)| s as f64).unwrap_or(f64::NAN);
        let detect = t2.elapsed();
        let t3 = Instant::now();
        if let Some(st) = self.stacker.as_mut() {
            let info = stacking::FrameInfo {
                frame: &entry.file,
                field: &entry.field,
                band: &entry.band,
                mjd,
                zero_point: meta.zero_point,
                wcs: meta.wcs,
                aperture_correction: meta.aperture_correction,
                point_sources: meta.point_sources,
                template_model: Some((&tprep.sky_subtracted, diff.scale)),
            };
            self.stacks.extend(st.add(&info, &diff, decorrelated_psf.as_ref(), &detections));
        }
        let stack = t3.elapsed();
        let images = self.keep_images.then(|| FrameImages {
            width: diff.width,
            height: diff.height,
            science: science.data.clone(),
            template: template.data.clone(),
            masked: diff.variance.iter().map(|v| !(*v > 0.0)).collect(),
            difference: diff.difference.clone(),
            score: sc.score.clone(),
        });
        Ok(FrameResult {
            frame: entry.file.clone(),
            width: diff.width,
            height: diff.height,
            detections,
            times: StageTimes { read, prepare: diff.prepare, engine: diff.engine, score, detect, stack },
            fwhm_science: diff.sigma_science * frame::FWHM_PER_SIGMA,
            fwhm_template: diff.sigma_template * frame::FWHM_PER_SIGMA,
            kernel_sigma: diff.kernel_sigma,
            scale: diff.scale,
            aperture_correction,
            score_sigma,
            images,
        })
    }
}

/// Frames must sit on their template's pixel grid (`docs/night-format.md`, "Registration"):
/// the frame's centre and corners, mapped through both WCSs, may move at most
/// [`MAX_REGISTRATION_OFFSET_PX`]. Without a WCS in either file, frames are taken as registered.
pub fn check_registration(science: &Image, template: &Image) -> Result<f64, DetectError> {
    let (Some(fw), Some(tw)) = (science.header.wcs, template.header.wcs) else { return Ok(0.0) };
    let (w, h) = (science.width as f64 - 1.0, science.height as f64 - 1.0);
    let mut worst = 0.0f64;
    for (x, y) in [(w / 2.0, h / 2.0), (0.0, 0.0), (w, 0.0), (0.0, h), (w, h)] {
        let (ra, dec) = fw.pixel_to_sky(x, y);
        let Some((tx, ty)) = tw.sky_to_pixel(ra, dec) else {
            return Err(DetectError::Registration {
                path: science.path.clone(),
                message: format!("pixel ({x}, {y}) is not on the template's sky ({})", template.path.display()),
            });
        };
        worst = worst.max(((tx - x).powi(2) + (ty - y).powi(2)).sqrt());
    }
    if worst > MAX_REGISTRATION_OFFSET_PX {
        return Err(DetectError::Registration {
            path: science.path.clone(),
            message: format!(
                "the frame is offset from its template {} by up to {worst:.2} px (more than {MAX_REGISTRATION_OFFSET_PX}); \
                 blink does not resample: register the frame to the template's grid first (e.g. SWarp, reproject)",
                template.path.display()
            ),
        });
    }
    if worst > 0.01 {
        tracing::info!(file = %science.path.display(), offset_px = worst, "frame offset from its template; the matching kernel absorbs it");
    }
    Ok(worst)
}

/// Every frame's result, in manifest order, the stacks' (`detect::stacking`) and the wall time.
#[derive(Debug)]
pub struct NightRun {
    pub adapter: String,
    pub frames: Vec<FrameResult>,
    /// In the order the nights ended; per night, windows from the shortest.
    pub stacks: Vec<stacking::StackResult>,
    pub wall: Duration,
}

impl NightRun {
    /// The frames' detections, then the stacks'.
    pub fn detections(&self) -> impl Iterator<Item = &Detection> {
        self.frames.iter().flat_map(|f| f.detections.iter()).chain(self.stacks.iter().flat_map(|s| s.detections.iter()))
    }

    pub fn times(&self) -> StageTimes {
        let mut t = StageTimes::default();
        for f in &self.frames {
            t.add(&f.times);
        }
        t
    }

    pub fn megapixels(&self) -> f64 {
        self.frames.iter().map(|f| (f.width * f.height) as f64 / 1e6).sum()
    }
}

impl Detector {
    /// Detect on the first `limit` frames of `night` (all when `None`), in manifest order;
    /// `each` sees every frame's result as it is done (progress, per-frame work) and may take its
    /// images. Stops at the first error.
    pub fn detect_night(
        &mut self,
        night: &Night,
        limit: Option<usize>,
        mut each: impl FnMut(usize, usize, &mut FrameResult),
    ) -> Result<NightRun, DetectError> {
        let t0 = Instant::now();
        let n = limit.unwrap_or(usize::MAX).min(night.manifest.frames.len());
        self.stacker = (!self.options.stack_windows.is_empty()).then(|| {
            let mut st = stacking::FrameStacker::new(&self.options.stack_windows, self.options.threshold);
            st.keep_scores = self.keep_images;
            st
        });
        self.stacks.clear();
        let mut frames = Vec::with_capacity(n);
        // Stacks need each field's frames in time order: the manifest's order within a field
        // and band is kept, sorted by MJD where the manifest gives it.
        let mut order: Vec<usize> = (0..n).collect();
        if self.stacker.is_some() {
            let e = &night.manifest.frames;
            order.sort_by(|&a, &b| (&e[a].field, &e[a].band, e[a].mjd.unwrap_or(f64::NAN)).partial_cmp(&(&e[b].field, &e[b].band, e[b].mjd.unwrap_or(f64::NAN))).unwrap_or(std::cmp::Ordering::Equal).then(a.cmp(&b)));
        }
        for (i, &k) in order.iter().enumerate() {
            let mut r = self.detect_frame(night, &night.manifest.frames[k])?;
            each(i, n, &mut r);
            r.images = None;
            frames.push((k, r));
        }
        frames.sort_by_key(|(k, _)| *k);
        if let Some(mut st) = self.stacker.take() {
            let t = Instant::now();
            self.stacks.extend(st.finish());
            if let Some((_, last)) = frames.last_mut() {
                last.times.stack += t.elapsed();
            }
        }
        let stacks = std::mem::take(&mut self.stacks);
        Ok(NightRun { adapter: self.adapter(), frames: frames.into_iter().map(|(_, r)| r).collect(), stacks, wall: t0.elapsed() })
    }
}

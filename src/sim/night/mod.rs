//! Simulated observing nights: `blink simulate`. One field, one band, N nights of K epochs each,
//! written as a night folder (`docs/night-format.md`): one FITS file per epoch, a deep template,
//! `manifest.toml` and `truth.csv`. Every parameter, its unit and default is in
//! `docs/simulation.md`.
//!
//! # Layout
//! - [`field`]: the static sky: stars (dN/dm ∝ 10^(0.3 m)), Sérsic galaxies, the detector's hot
//!   pixels and bad column.
//! - [`psf`]: elliptical Moffat PSFs whose FWHM varies smoothly across the frame; rendering a
//!   point source or a galaxy into a small stamp around it.
//! - [`transients`]: light curves (fast, supernova-like, slow-and-faint, variable stars).
//! - [`epoch`]: one science frame: sky, sources, Poisson and read noise, saturation, cosmic rays.
//! - [`template`]: the reference, the exact mean of M epochs taken with its own PSF.
//! - [`manifest`]: the night folder's manifest (read and written).
//! - [`truth`]: reading `truth.csv`.
//! - [`alerts`]: the night's alerts (blink-native Avro) where a survey would raise them.
//! - [`ztf`]: the same alerts as ZTF-shaped packets (ZTF's schema, gzipped FITS cutouts).
//! - [`write`]: FITS frames with their headers, the manifest and the truth table on disk.
//! - [`wcs`]: the TAN projection the frames carry.
//!
//! Units: images are in ADU; `gain` converts to electrons; `read_noise` is in electrons. Pixel
//! coordinates are 0-based with the centre of the first pixel at (0, 0) (FITS pixel = x + 1).
//!
//! Determinism: every random draw comes from a generator seeded from `seed` and the thing it is
//! for (field, epoch, row band), so the output does not depend on the number of threads.

pub mod alerts;
pub mod epoch;
pub mod field;
pub mod manifest;
pub mod psf;
pub mod template;
pub mod transients;
pub mod truth;
pub mod wcs;
pub mod write;
pub mod ztf;

use std::path::{Path, PathBuf};

use rand::SeedableRng;
use serde::{Deserialize, Serialize};

/// What can go wrong while simulating a night.
#[derive(Debug, thiserror::Error)]
pub enum NightError {
    #[error("invalid simulation config: {0}")]
    Config(String),
    #[error("cannot read config {path}: {error}")]
    ConfigRead { path: PathBuf, error: std::io::Error },
    #[error("cannot parse config {path}: {error}")]
    ConfigParse { path: PathBuf, error: toml::de::Error },
    #[error("{path}: {error}")]
    Io { path: PathBuf, error: std::io::Error },
    #[error("{path}: FITS: {error}")]
    Fits { path: PathBuf, error: fitsio::errors::Error },
    #[error("{path}: alerts: {message}")]
    Alerts { path: PathBuf, message: String },
    #[error("{path}: {message}")]
    Manifest { path: PathBuf, message: String },
    #[error("{path}: {message}")]
    Truth { path: PathBuf, message: String },
}

/// The whole simulation, as read from `--config sim.toml` (every section and key optional).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SimConfig {
    /// Seed of every random draw.
    pub seed: u64,
    /// Frame width in pixels.
    pub width: usize,
    /// Frame height in pixels.
    pub height: usize,
    /// Number of nights.
    pub nights: usize,
    /// Science epochs per night.
    pub epochs_per_night: usize,
    pub field: FieldConfig,
    pub camera: CameraConfig,
    pub observing: ObservingConfig,
    pub stars: StarConfig,
    pub galaxies: GalaxyConfig,
    pub transients: TransientConfig,
    pub variables: VariableConfig,
    pub artifacts: ArtifactConfig,
    pub template: TemplateConfig,
    pub alerts: alerts::AlertConfig,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            seed: 1,
            width: 2048,
            height: 2048,
            nights: 10,
            epochs_per_night: 3,
            field: FieldConfig::default(),
            camera: CameraConfig::default(),
            observing: ObservingConfig::default(),
            stars: StarConfig::default(),
            galaxies: GalaxyConfig::default(),
            transients: TransientConfig::default(),
            variables: VariableConfig::default(),
            artifacts: ArtifactConfig::default(),
            template: TemplateConfig::default(),
            alerts: alerts::AlertConfig::default(),
        }
    }
}

/// Where the field is and what it is called.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FieldConfig {
    /// Field name, used in file names and the manifest.
    pub name: String,
    /// Band (FITS `FILTER`).
    pub band: String,
    /// Right ascension of the frame centre, degrees.
    pub ra: f64,
    /// Declination of the frame centre, degrees.
    pub dec: f64,
    /// Pixel scale, arcseconds per pixel.
    pub pixel_scale: f64,
}

impl Default for FieldConfig {
    fn default() -> Self {
        FieldConfig { name: "F0001".into(), band: "r".into(), ra: 150.0, dec: 2.2, pixel_scale: 1.0 }
    }
}

/// The detector.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CameraConfig {
    /// Electrons per ADU.
    pub gain: f64,
    /// Read noise, electrons RMS.
    pub read_noise: f64,
    /// Saturation level, ADU: no pixel exceeds it.
    pub saturate: f64,
    /// Exposure time, seconds (`EXPTIME`; zero points are per exposure).
    pub exptime: f64,
}

impl Default for CameraConfig {
    fn default() -> Self {
        CameraConfig { gain: 1.5, read_noise: 5.0, saturate: 50_000.0, exptime: 30.0 }
    }
}

/// Conditions and cadence.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ObservingConfig {
    /// MJD of the first epoch.
    pub mjd_start: f64,
    /// Days between nights.
    pub cadence_days: f64,
    /// Minutes between the epochs of one night.
    pub epoch_spacing_min: f64,
    /// Median seeing FWHM, pixels.
    pub seeing_median_px: f64,
    /// Seeing is log-normal: the standard deviation of log10(FWHM).
    pub seeing_sigma_dex: f64,
    /// Moffat β is drawn uniformly in this range per epoch.
    pub beta_range: [f64; 2],
    /// Largest fractional change of the FWHM across the frame (corner vs centre).
    pub fwhm_variation: f64,
    /// PSF ellipticity (1 − b/a) drawn uniformly in [0, this] per epoch.
    pub ellipticity_max: f64,
    /// Sky level at the frame centre, ADU per pixel, drawn uniformly in this range per epoch.
    pub sky_range: [f64; 2],
    /// Largest fractional change of the sky across the frame (a plane, random direction).
    pub sky_gradient: f64,
    /// Photometric zero point of a clear exposure, magnitudes (flux in ADU = 10^(−0.4 (m − zp))).
    pub zero_point: f64,
    /// Extinction drawn uniformly in [0, this] magnitudes per epoch, subtracted from the zero point.
    pub extinction_max: f64,
    /// Sub-pixel registration jitter: each frame is offset by up to this many pixels in x and y
    /// from the template grid (0 = registered, the default).
    pub jitter_px: f64,
}

impl Default for ObservingConfig {
    fn default() -> Self {
        ObservingConfig {
            mjd_start: 61000.1,
            cadence_days: 1.0,
            epoch_spacing_min: 30.0,
            seeing_median_px: 3.0,
            seeing_sigma_dex: 0.08,
            beta_range: [2.5, 4.5],
            fwhm_variation: 0.05,
            ellipticity_max: 0.08,
            sky_range: [300.0, 800.0],
            sky_gradient: 0.05,
            zero_point: 28.5,
            extinction_max: 0.1,
            jitter_px: 0.0,
        }
    }
}

/// Stars: random positions, magnitudes with dN/dm ∝ 10^(slope · m).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StarConfig {
    /// Stars per megapixel (the count scales with the frame's area).
    pub per_mpix: f64,
    /// Brightest magnitude.
    pub mag_bright: f64,
    /// Faintest magnitude.
    pub mag_faint: f64,
    /// Slope of the number counts (0.3 for a uniform disc population).
    pub slope: f64,
}

impl Default for StarConfig {
    fn default() -> Self {
        StarConfig { per_mpix: 700.0, mag_bright: 12.0, mag_faint: 23.0, slope: 0.3 }
    }
}

/// Galaxies: Sérsic profiles convolved with each epoch's PSF.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GalaxyConfig {
    /// Galaxies per megapixel.
    pub per_mpix: f64,
    /// Total magnitude range (uniform).
    pub mag_range: [f64; 2],
    /// Half-light radius range, pixels (uniform).
    pub r_eff_range: [f64; 2],
    /// Sérsic index range (uniform).
    pub sersic_n_range: [f64; 2],
    /// Smallest axis ratio b/a.
    pub axis_ratio_min: f64,
}

impl Default for GalaxyConfig {
    fn default() -> Self {
        GalaxyConfig {
            per_mpix: 70.0,
            mag_range: [16.0, 22.0],
            r_eff_range: [1.5, 8.0],
            sersic_n_range: [0.5, 4.0],
            axis_ratio_min: 0.3,
        }
    }
}

/// Transients (absent from the template).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TransientConfig {
    /// Fast: a flare within one night (rise of minutes, exponential decay).
    pub fast: usize,
    /// Supernova-like: rise of about two weeks, decline over months.
    pub sn: usize,
    /// Slow and faint: steady for weeks at a per-epoch optimal SNR in `slow_snr`.
    pub slow: usize,
    /// Share of transients placed on a galaxy host.
    pub host_fraction: f64,
    /// Peak magnitude range of fast transients.
    pub fast_mag: [f64; 2],
    /// e-folding decay time of fast transients, hours.
    pub fast_tau_hours: [f64; 2],
    /// Peak magnitude range of supernovae.
    pub sn_peak_mag: [f64; 2],
    /// Rise time of supernovae (explosion to peak), days.
    pub sn_rise_days: [f64; 2],
    /// Decline after peak, magnitudes per day.
    pub sn_decline_mag_per_day: [f64; 2],
    /// Target optimal SNR per epoch of slow transients at median seeing and sky.
    pub slow_snr: [f64; 2],
}

impl Default for TransientConfig {
    fn default() -> Self {
        TransientConfig {
            fast: 20,
            sn: 60,
            slow: 20,
            host_fraction: 0.5,
            fast_mag: [18.0, 21.5],
            fast_tau_hours: [0.2, 2.0],
            sn_peak_mag: [18.0, 22.5],
            sn_rise_days: [10.0, 20.0],
            sn_decline_mag_per_day: [0.01, 0.03],
            slow_snr: [1.5, 3.0],
        }
    }
}

/// Variable stars (contaminants): sinusoidal in flux about a mean that the template holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VariableConfig {
    /// Number of variable stars in the field.
    pub count: usize,
    /// Mean magnitude range.
    pub mag_range: [f64; 2],
    /// Fractional amplitude of the flux.
    pub amplitude: [f64; 2],
    /// Period range, days (log-uniform).
    pub period_days: [f64; 2],
}

impl Default for VariableConfig {
    fn default() -> Self {
        VariableConfig { count: 30, mag_range: [15.0, 21.0], amplitude: [0.1, 0.6], period_days: [0.05, 10.0] }
    }
}

/// Detector and sky artifacts (science frames only; the template's stack rejects them).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ArtifactConfig {
    /// Mean number of cosmic rays per megapixel per exposure (Poisson).
    pub cosmic_rays_per_mpix: f64,
    /// Share of pixels that are hot (the same pixels in every frame).
    pub hot_pixel_fraction: f64,
    /// Excess of a hot pixel, ADU (uniform).
    pub hot_pixel_adu: [f64; 2],
    /// One bad column at the saturation level in every frame.
    pub bad_column: bool,
}

impl Default for ArtifactConfig {
    fn default() -> Self {
        ArtifactConfig {
            cosmic_rays_per_mpix: 20.0,
            hot_pixel_fraction: 1e-4,
            hot_pixel_adu: [2000.0, 40_000.0],
            bad_column: true,
        }
    }
}

/// The reference template.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TemplateConfig {
    /// Number of epochs stacked (M): its noise is that of one epoch / sqrt(M).
    pub depth: usize,
    /// Template FWHM as a multiple of the median seeing (a stack of the better epochs).
    pub fwhm_scale: f64,
    /// Moffat β of the template PSF.
    pub beta: f64,
    /// Days between the template's mean epoch and the first science epoch.
    pub days_before: f64,
}

impl Default for TemplateConfig {
    fn default() -> Self {
        TemplateConfig { depth: 100, fwhm_scale: 0.8, beta: 3.5, days_before: 60.0 }
    }
}

fn range_ok(name: &str, r: [f64; 2], lo: f64) -> Result<(), NightError> {
    if !(r[0].is_finite() && r[1].is_finite() && r[0] >= lo && r[0] <= r[1]) {
        return Err(NightError::Config(format!("{name} = {r:?}: need {lo} <= min <= max")));
    }
    Ok(())
}

impl SimConfig {
    /// Read a TOML file; absent keys take their defaults.
    pub fn from_file(path: &Path) -> Result<SimConfig, NightError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| NightError::ConfigRead { path: path.to_path_buf(), error: source })?;
        toml::from_str(&text).map_err(|source| NightError::ConfigParse { path: path.to_path_buf(), error: source })
    }

    /// Check every value once, before any work.
    pub fn validate(&self) -> Result<(), NightError> {
        let bad = |m: String| Err(NightError::Config(m));
        if self.width < 64 || self.height < 64 || self.width > 16384 || self.height > 16384 {
            return bad(format!("size {}x{}: each side must be in 64..=16384", self.width, self.height));
        }
        if self.nights == 0 || self.epochs_per_night == 0 || self.nights * self.epochs_per_night > 10_000 {
            return bad(format!(
                "{} nights x {} epochs: need at least one epoch and at most 10000",
                self.nights, self.epochs_per_night
            ));
        }
        let c = &self.camera;
        if !(c.gain > 0.0 && c.read_noise >= 0.0 && c.saturate > 0.0 && c.exptime > 0.0) {
            return bad(format!("camera {c:?}: gain, saturate, exptime > 0 and read_noise >= 0"));
        }
        let o = &self.observing;
        if !(o.seeing_median_px >= 1.0 && o.seeing_median_px <= 20.0) {
            return bad(format!("observing.seeing_median_px = {}: need 1..=20", o.seeing_median_px));
        }
        range_ok("observing.beta_range", o.beta_range, 1.5)?;
        range_ok("observing.sky_range", o.sky_range, 0.0)?;
        if !(o.fwhm_variation.abs() < 0.5 && o.sky_gradient.abs() < 0.9 && (0.0..0.5).contains(&o.ellipticity_max)) {
            return bad("observing: fwhm_variation < 0.5, sky_gradient < 0.9, ellipticity_max in [0, 0.5)".into());
        }
        if !(0.0..=5.0).contains(&o.jitter_px) {
            return bad(format!("observing.jitter_px = {}: need 0..=5", o.jitter_px));
        }
        if !(self.stars.per_mpix >= 0.0 && self.stars.per_mpix <= 1e5 && self.galaxies.per_mpix >= 0.0 && self.galaxies.per_mpix <= 1e4) {
            return bad("stars.per_mpix in 0..=1e5 and galaxies.per_mpix in 0..=1e4".into());
        }
        if self.stars.mag_bright.is_nan() || self.stars.mag_faint.is_nan() || self.stars.mag_bright > self.stars.mag_faint {
            return bad("stars: mag_bright must not be fainter than mag_faint".into());
        }
        let g = &self.galaxies;
        range_ok("galaxies.mag_range", g.mag_range, -10.0)?;
        range_ok("galaxies.r_eff_range", g.r_eff_range, 0.1)?;
        range_ok("galaxies.sersic_n_range", g.sersic_n_range, 0.2)?;
        let t = &self.transients;
        range_ok("transients.fast_mag", t.fast_mag, -10.0)?;
        range_ok("transients.fast_tau_hours", t.fast_tau_hours, 0.001)?;
        range_ok("transients.sn_peak_mag", t.sn_peak_mag, -10.0)?;
        range_ok("transients.sn_rise_days", t.sn_rise_days, 0.1)?;
        range_ok("transients.sn_decline_mag_per_day", t.sn_decline_mag_per_day, 0.0)?;
        range_ok("transients.slow_snr", t.slow_snr, 0.0)?;
        if !(0.0..=1.0).contains(&t.host_fraction) {
            return bad(format!("transients.host_fraction = {}: need 0..=1", t.host_fraction));
        }
        let v = &self.variables;
        range_ok("variables.amplitude", v.amplitude, 0.0)?;
        range_ok("variables.period_days", v.period_days, 1e-4)?;
        if v.amplitude[1] >= 1.0 {
            return bad("variables.amplitude: the fractional amplitude must stay below 1".into());
        }
        let a = &self.artifacts;
        range_ok("artifacts.hot_pixel_adu", a.hot_pixel_adu, 0.0)?;
        if !(a.cosmic_rays_per_mpix >= 0.0 && (0.0..0.1).contains(&a.hot_pixel_fraction)) {
            return bad("artifacts: cosmic_rays_per_mpix >= 0, hot_pixel_fraction in [0, 0.1)".into());
        }
        if self.template.depth == 0 || self.template.fwhm_scale <= 0.0 || self.template.beta < 1.5 {
            return bad("template: depth >= 1, fwhm_scale > 0, beta >= 1.5".into());
        }
        if !(self.alerts.min_snr.is_finite() && (7..=255).contains(&self.alerts.cutout)) {
            return bad(format!("alerts: min_snr finite and cutout in 7..=255 (got {}, {})", self.alerts.min_snr, self.alerts.cutout));
        }
        if self.field.name.is_empty() || !self.field.name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
            return bad(format!("field.name {:?}: letters, digits, '-' and '_' only", self.field.name));
        }
        if self.field.band.is_empty() || !self.field.band.chars().all(|c| c.is_ascii_alphanumeric()) {
            return bad(format!("field.band {:?}: letters and digits only", self.field.band));
        }
        Ok(())
    }

    /// MJD of epoch `i`.
    pub fn epoch_mjd(&self, i: usize) -> f64 {
        let night = i / self.epochs_per_night;
        let k = i % self.epochs_per_night;
        self.observing.mjd_start
            + night as f64 * self.observing.cadence_days
            + k as f64 * self.observing.epoch_spacing_min / 1440.0
    }

    /// Frame area in megapixels.
    pub fn mpix(&self) -> f64 {
        (self.width * self.height) as f64 / 1e6
    }

    pub fn n_epochs(&self) -> usize {
        self.nights * self.epochs_per_night
    }
}

/// A generator for one purpose, independent of every other (splitmix64 of the seed and tags).
pub fn rng_for(seed: u64, tag: u64, index: u64) -> rand::rngs::StdRng {
    let mut z = seed ^ tag.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ index.wrapping_mul(0xD1B5_4A32_D192_ED69);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    rand::rngs::StdRng::seed_from_u64(z ^ (z >> 31))
}

/// What a finished run reports.
#[derive(Debug, Clone)]
pub struct NightSummary {
    pub frames: usize,
    pub stars: usize,
    pub saturated_stars: usize,
    pub galaxies: usize,
    pub transients: usize,
    pub variables: usize,
    pub alerts: usize,
}

/// Simulate the night described by `cfg` into the folder `out` (created if needed).
/// `progress` is called once per written file with a short line.
pub fn simulate(cfg: &SimConfig, out: &Path, progress: &mut dyn FnMut(&str)) -> Result<NightSummary, NightError> {
    cfg.validate()?;
    let field = field::Field::generate(cfg);
    let sources = transients::Population::generate(cfg, &field);
    let mut writer = write::NightWriter::create(out, cfg)?;

    let tmpl = template::render(cfg, &field, &sources);
    writer.write_template(&tmpl)?;
    progress(&format!(
        "template {} (M = {}, FWHM {:.2} px)",
        writer.template_file(),
        cfg.template.depth,
        tmpl.psf.fwhm
    ));

    let n = cfg.n_epochs();
    let mut alerts_total = 0;
    for i in 0..n {
        let frame = epoch::render(cfg, &field, &sources, &tmpl, i);
        let name = writer.write_frame(&frame)?;
        let n_alerts = if cfg.alerts.enabled { writer.write_alerts(cfg, &frame, &tmpl)? } else { 0 };
        alerts_total += n_alerts;
        progress(&format!(
            "epoch {}/{n} {name}  MJD {:.4}  seeing {:.2} px  sky {:.0} ADU  {n_alerts} alerts",
            i + 1,
            frame.mjd,
            frame.psf.fwhm,
            frame.sky
        ));
    }
    writer.finish()?;
    Ok(NightSummary {
        frames: n,
        stars: field.stars.len(),
        saturated_stars: field.saturated_stars(cfg),
        galaxies: field.galaxies.len(),
        transients: sources.transients.len(),
        variables: sources.variables.len(),
        alerts: alerts_total,
    })
}

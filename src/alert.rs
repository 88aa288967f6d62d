//! The survey-neutral alert model.
//!
//! Every decoder (`decode::ztf`, `decode::rubin`, `decode::native`) maps its survey's packet onto
//! [`Alert`]; everything downstream (batching, the engine, sinks) sees only this type.

use serde::Serialize;

/// Which survey produced an alert.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Survey {
    Ztf,
    Rubin,
    /// blink's own packets (the simulator's).
    Native,
}

impl Survey {
    pub fn as_str(&self) -> &'static str {
        match self {
            Survey::Ztf => "ztf",
            Survey::Rubin => "rubin",
            Survey::Native => "native",
        }
    }

    /// A survey from its name, case-insensitive; "lsst" is Rubin.
    ///
    /// ```
    /// use blink::alert::Survey;
    /// assert_eq!(Survey::parse("LSST"), Some(Survey::Rubin));
    /// assert_eq!(Survey::parse("ztf").map(|s| s.as_str()), Some("ztf"));
    /// assert_eq!(Survey::parse("hst"), None);
    /// ```
    pub fn parse(s: &str) -> Option<Survey> {
        match s.to_ascii_lowercase().as_str() {
            "ztf" => Some(Survey::Ztf),
            "rubin" | "lsst" => Some(Survey::Rubin),
            "native" | "blink" | "sim" => Some(Survey::Native),
            _ => None,
        }
    }
}

impl std::fmt::Display for Survey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A small 2-D image, row-major (`data[y * width + x]`), f32.
///
/// Pixels that were NaN (or otherwise unusable) on the wire are set to 0.0 in `data` and flagged
/// in `mask`, so kernels never see a NaN.
#[derive(Debug, Clone, PartialEq)]
pub struct Image {
    pub width: usize,
    pub height: usize,
    pub data: Vec<f32>,
}

impl Image {
    pub fn new(width: usize, height: usize, data: Vec<f32>) -> Image {
        debug_assert_eq!(data.len(), width * height);
        Image { width, height, data }
    }

    pub fn zeros(width: usize, height: usize) -> Image {
        Image { width, height, data: vec![0.0; width * height] }
    }

    pub fn shape(&self) -> (usize, usize) {
        (self.width, self.height)
    }
}

/// One cutout: pixels, the mask of bad pixels, and where the survey gives them, the per-pixel
/// variance and an image of the PSF at the stamp's centre.
#[derive(Debug, Clone, PartialEq)]
pub struct Stamp {
    pub image: Image,
    /// `true` where the pixel is unusable (NaN on the wire, or flagged bad).
    pub mask: Vec<bool>,
    /// Per-pixel variance, same shape as `image` (Rubin's UNCERT HDU).
    pub variance: Option<Image>,
    /// PSF image, its own shape, centred on its central pixel (Rubin's PSFIMAGE HDU).
    pub psf: Option<Image>,
}

impl Stamp {
    pub fn width(&self) -> usize {
        self.image.width
    }
    pub fn height(&self) -> usize {
        self.image.height
    }
    pub fn nan_count(&self) -> usize {
        self.mask.iter().filter(|m| **m).count()
    }
}

/// Science, reference template and (when the survey sends one) the survey's own difference.
#[derive(Debug, Clone, PartialEq)]
pub struct Triplet {
    pub science: Stamp,
    pub template: Stamp,
    pub difference: Option<Stamp>,
}

/// What the survey measured for the triggering detection.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Candidate {
    /// Position of the candidate in stamp pixel coordinates (0-based, x = column, y = row).
    pub stamp_x: f64,
    pub stamp_y: f64,
    /// Seeing of the science exposure, FWHM in pixels (ZTF `candidate.fwhm`), if known.
    pub fwhm_px: Option<f64>,
    /// Seeing of the reference template, FWHM in pixels, where the packet implies it
    /// (ZTF: `fwhm / seeratio`). The engine prefers a measurement on the stamp.
    pub template_fwhm_px: Option<f64>,
    /// The survey's own signal-to-noise of the detection on its difference image
    /// (ZTF: 1.0857 / `sigmapsf`; Rubin: `diaSource.snr`).
    pub survey_snr: Option<f64>,
    /// `false` when the survey says the difference is negative (ZTF `isdiffpos` = 'f',
    /// Rubin `isNegative`).
    pub positive: bool,
    /// Photometric zero point of the science exposure (magnitudes), if given.
    pub zero_point: Option<f64>,
    /// Detector gain in electrons per data unit, if given.
    pub gain: Option<f64>,
}

/// A survey-neutral alert.
#[derive(Debug, Clone, PartialEq)]
pub struct Alert {
    pub survey: Survey,
    /// The survey's alert id (ZTF `candid`, Rubin `diaSourceId`), as text.
    pub alert_id: String,
    /// The survey's object id (ZTF `objectId`, Rubin `diaObjectId`), as text; empty if none.
    pub object_id: String,
    /// Degrees (ICRS).
    pub ra: f64,
    pub dec: f64,
    /// Epoch of the observation, MJD (TAI). ZTF's `jd` (exposure start) is converted, see
    /// `decode::ztf`.
    pub mjd_tai: f64,
    /// Filter band: ZTF g, r, i; Rubin u, g, r, i, z, y.
    pub band: String,
    /// Exposure time in seconds, if known.
    pub exposure_s: Option<f64>,
    pub candidate: Candidate,
    pub triplet: Triplet,
}

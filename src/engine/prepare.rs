//! Batch preparation on the CPU: an [`Alert`] becomes a [`PreparedStamp`] (variance planes, PSF
//! widths, the Gaussian matching kernel, masks, fit exclusion and the matched-filter profile),
//! and same-shape stamps become a [`StampBatch`].
//!
//! Noise: the stamp's own variance planes where present (Rubin); otherwise (ZTF) per image
//! `sky_var + max(pixel − sky, 0) / gain`, with the sky level the median and the sky variance
//! `(1.4826·MAD)²` of the usable pixels.
//!
//! PSF widths (Gaussian-equivalent sigma): second moments of the PSF image where the stamp has
//! one; else the packet's seeing for the science image, and adaptive second moments of the
//! brightest unsaturated compact source on the template (falling back to the packet, then to the
//! science value). The template is convolved only when the science PSF is broader.

use super::{EngineError, StampBatch, StampParams};
use crate::alert::{Alert, Image, Stamp};

/// FWHM / sigma of a Gaussian.
pub const FWHM_PER_SIGMA: f64 = 2.354_820_045;
/// MAD → sigma for Gaussian noise.
const MAD_TO_SIGMA: f64 = 1.4826;

/// Settings of [`prepare_stamp`].
#[derive(Debug, Clone, PartialEq)]
pub struct PrepareConfig {
    /// Detector gain (e-/DN) when the packet has none; ZTF's is 6.2.
    pub default_gain: f64,
    /// Pixels within this many science FWHM of the candidate stay out of the fit.
    pub fit_exclusion_fwhm: f64,
    /// ... but the exclusion radius never exceeds this fraction of the stamp's smaller side.
    pub max_fit_radius_frac: f64,
    /// Reject stamps with fewer usable pixels than this fraction.
    pub min_usable_fraction: f64,
    /// Plausible PSF sigma range in pixels; measurements outside it are ignored.
    pub sigma_range: (f64, f64),
    /// Template pixels at or above this value are saturated (None: rely on the mask).
    pub template_saturation: Option<f64>,
    /// A template source must peak this many sky sigmas above the sky to be measured.
    pub template_min_peak_snr: f64,
}

impl Default for PrepareConfig {
    fn default() -> Self {
        PrepareConfig {
            default_gain: 6.2,
            fit_exclusion_fwhm: 2.0,
            max_fit_radius_frac: 0.4,
            min_usable_fraction: 0.25,
            sigma_range: (0.4, 10.0),
            template_saturation: None,
            template_min_peak_snr: 10.0,
        }
    }
}

/// Where a PSF width came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SigmaSource {
    PsfImage,
    Packet,
    Measured,
    /// The template fell back to the science value.
    Science,
}

/// One alert, ready to batch.
#[derive(Debug, Clone, PartialEq)]
pub struct PreparedStamp {
    pub alert_id: String,
    pub width: usize,
    pub height: usize,
    pub science: Vec<f32>,
    pub template: Vec<f32>,
    pub science_var: Vec<f32>,
    pub template_var: Vec<f32>,
    /// 1 where both images are usable, else 0.
    pub weight: Vec<f32>,
    /// Unit-sum matched-filter profile centred on the candidate.
    pub profile: Vec<f32>,
    pub params: StampParams,
    pub science_sigma_source: SigmaSource,
    pub template_sigma_source: SigmaSource,
}

impl PreparedStamp {
    /// Batches hold stamps of one shape: group by this.
    pub fn shape(&self) -> (usize, usize) {
        (self.width, self.height)
    }
}

fn bad(alert: &Alert, why: impl std::fmt::Display) -> EngineError {
    EngineError::BadStamp(format!("alert {}: {why}", alert.alert_id))
}

/// Median and (1.4826·MAD)² of the values at usable positions.
pub fn sky_stats(data: &[f32], usable: &[bool]) -> Option<(f64, f64)> {
    let mut v: Vec<f64> = data.iter().zip(usable).filter(|(_, u)| **u).map(|(x, _)| *x as f64).collect();
    if v.is_empty() {
        return None;
    }
    let median = median_in_place(&mut v);
    let mut dev: Vec<f64> = v.iter().map(|x| (x - median).abs()).collect();
    let mad = median_in_place(&mut dev);
    let mut sky_var = (MAD_TO_SIGMA * mad).powi(2);
    if !(sky_var > 0.0) {
        // Quantised or flat data: fall back to the plain variance.
        let mean = v.iter().sum::<f64>() / v.len() as f64;
        sky_var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / v.len() as f64;
    }
    Some((median, sky_var))
}

fn median_in_place(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        0.5 * (v[n / 2 - 1] + v[n / 2])
    }
}

/// Gaussian-equivalent sigma from the second moments of a PSF image (positive pixels).
pub fn psf_sigma(psf: &Image) -> Option<f64> {
    let (mut s, mut sx, mut sy) = (0.0f64, 0.0f64, 0.0f64);
    for (i, v) in psf.data.iter().enumerate() {
        let v = *v as f64;
        if v > 0.0 && v.is_finite() {
            s += v;
            sx += v * (i % psf.width) as f64;
            sy += v * (i / psf.width) as f64;
        }
    }
    if !(s > 0.0) {
        return None;
    }
    let (cx, cy) = (sx / s, sy / s);
    let mut m2 = 0.0;
    for (i, v) in psf.data.iter().enumerate() {
        let v = *v as f64;
        if v > 0.0 && v.is_finite() {
            let (dx, dy) = ((i % psf.width) as f64 - cx, (i / psf.width) as f64 - cy);
            m2 += v * (dx * dx + dy * dy);
        }
    }
    let sigma = (m2 / s / 2.0).sqrt();
    (sigma.is_finite() && sigma > 0.0).then_some(sigma)
}

/// Adaptive (Gaussian-weighted, iterated) second moments of the source peaking at `(px, py)`.
fn adaptive_sigma(img: &Image, usable: &[bool], sky: f64, px: usize, py: usize, guess: f64) -> Option<f64> {
    let half = (4.0 * guess).ceil().max(3.0) as i64;
    let (w, h) = (img.width as i64, img.height as i64);
    let (x0, y0) = (px as i64, py as i64);
    if x0 - half < 0 || y0 - half < 0 || x0 + half >= w || y0 + half >= h {
        return None;
    }
    // A masked pixel near the peak is likely saturation or a chip edge: skip the source.
    for y in y0 - half..=y0 + half {
        for x in x0 - half..=x0 + half {
            if !usable[(y * w + x) as usize] {
                return None;
            }
        }
    }
    let (mut cx, mut cy, mut sw2) = (x0 as f64, y0 as f64, guess * guess);
    for _ in 0..30 {
        let (mut m0, mut mx, mut my, mut mr) = (0.0, 0.0, 0.0, 0.0);
        for y in y0 - half..=y0 + half {
            for x in x0 - half..=x0 + half {
                let v = img.data[(y * w + x) as usize] as f64 - sky;
                let (dx, dy) = (x as f64 - cx, y as f64 - cy);
                let r2 = dx * dx + dy * dy;
                let wv = (-r2 / (2.0 * sw2)).exp() * v;
                m0 += wv;
                mx += wv * dx;
                my += wv * dy;
                mr += wv * r2;
            }
        }
        if !(m0 > 0.0) {
            return None;
        }
        let s2 = mr / m0 / 2.0;
        cx += mx / m0;
        cy += my / m0;
        if (cx - x0 as f64).abs() > 2.0 || (cy - y0 as f64).abs() > 2.0 || !(s2 > 0.0) || s2 >= sw2 {
            return None;
        }
        let sigma2 = s2 * sw2 / (sw2 - s2);
        let done = ((sigma2 - sw2) / sw2).abs() < 1e-5;
        sw2 = sigma2.clamp(0.04, 400.0);
        if done {
            break;
        }
    }
    let sigma = sw2.sqrt();
    sigma.is_finite().then_some(sigma)
}

/// Sigma of the brightest unsaturated compact source on a stamp, within the sanity range and a
/// factor of three of `guess`.
pub fn measure_sigma(img: &Image, usable: &[bool], guess: f64, cfg: &PrepareConfig) -> Option<f64> {
    let (sky, sky_var) = sky_stats(&img.data, usable)?;
    let thresh = sky + cfg.template_min_peak_snr * sky_var.sqrt();
    let (w, h) = (img.width, img.height);
    let mut peaks = Vec::new();
    for y in 1..h.saturating_sub(1) {
        for x in 1..w.saturating_sub(1) {
            let i = y * w + x;
            let v = img.data[i];
            if !usable[i] || (v as f64) < thresh || cfg.template_saturation.is_some_and(|s| v as f64 >= s) {
                continue;
            }
            let is_max = (y - 1..=y + 1).all(|yy| (x - 1..=x + 1).all(|xx| img.data[yy * w + xx] <= v));
            if is_max {
                peaks.push((v, x, y));
            }
        }
    }
    peaks.sort_by(|a, b| b.0.total_cmp(&a.0));
    let (lo, hi) = cfg.sigma_range;
    peaks.iter().take(8).find_map(|&(_, x, y)| {
        let s = adaptive_sigma(img, usable, sky, x, y, guess)?;
        (s >= lo && s <= hi && s >= guess / 3.0 && s <= guess * 3.0).then_some(s)
    })
}

/// Bilinear sample of `img` at (x, y), 0 outside.
fn bilinear(img: &Image, x: f64, y: f64) -> f64 {
    let (x0, y0) = (x.floor(), y.floor());
    let (fx, fy) = (x - x0, y - y0);
    let at = |xi: f64, yi: f64| -> f64 {
        if xi < 0.0 || yi < 0.0 || xi >= img.width as f64 || yi >= img.height as f64 {
            0.0
        } else {
            img.data[yi as usize * img.width + xi as usize] as f64
        }
    };
    at(x0, y0) * (1.0 - fx) * (1.0 - fy)
        + at(x0 + 1.0, y0) * fx * (1.0 - fy)
        + at(x0, y0 + 1.0) * (1.0 - fx) * fy
        + at(x0 + 1.0, y0 + 1.0) * fx * fy
}

/// The matched-filter profile: the PSF image shifted to (cx, cy) by bilinear interpolation, or a
/// Gaussian of `sigma`; cropped to the stamp and normalised to unit sum.
pub fn profile(width: usize, height: usize, cx: f64, cy: f64, psf: Option<&Image>, sigma: f64) -> Option<Vec<f32>> {
    let mut p = vec![0.0f64; width * height];
    for y in 0..height {
        for x in 0..width {
            let (dx, dy) = (x as f64 - cx, y as f64 - cy);
            p[y * width + x] = match psf {
                Some(img) => {
                    let (pcx, pcy) = ((img.width as f64 - 1.0) / 2.0, (img.height as f64 - 1.0) / 2.0);
                    bilinear(img, pcx + dx, pcy + dy).max(0.0)
                }
                None => (-(dx * dx + dy * dy) / (2.0 * sigma * sigma)).exp(),
            };
        }
    }
    let sum: f64 = p.iter().sum();
    (sum > 0.0 && sum.is_finite()).then(|| p.iter().map(|v| (v / sum) as f32).collect())
}

fn check_shape(alert: &Alert, what: &str, img: &Image, w: usize, h: usize) -> Result<(), EngineError> {
    if img.shape() != (w, h) || img.data.len() != w * h {
        return Err(bad(alert, format!("{what} is {}x{} ({} values), science is {w}x{h}", img.width, img.height, img.data.len())));
    }
    Ok(())
}

/// Variance plane of one stamp and the positions where it is usable.
fn variance(alert: &Alert, stamp: &Stamp, usable: &mut [bool], gain: f64, what: &str) -> Result<Vec<f32>, EngineError> {
    if let Some(var) = &stamp.variance {
        return Ok(var
            .data
            .iter()
            .zip(usable.iter_mut())
            .map(|(v, u)| {
                if !(v.is_finite() && *v > 0.0) {
                    *u = false;
                    0.0
                } else {
                    *v
                }
            })
            .collect());
    }
    let (sky, sky_var) =
        sky_stats(&stamp.image.data, usable).ok_or_else(|| bad(alert, format!("{what}: no usable pixel")))?;
    if !(sky_var > 0.0 && sky_var.is_finite()) {
        return Err(bad(alert, format!("{what}: sky variance {sky_var} (flat image)")));
    }
    Ok(stamp.image.data.iter().map(|p| (sky_var + (*p as f64 - sky).max(0.0) / gain) as f32).collect())
}

/// Prepare one alert for the engine, or say why it cannot be.
pub fn prepare_stamp(alert: &Alert, cfg: &PrepareConfig) -> Result<PreparedStamp, EngineError> {
    let sci = &alert.triplet.science;
    let tmpl = &alert.triplet.template;
    let (w, h) = sci.image.shape();
    let npix = w * h;
    if npix == 0 {
        return Err(bad(alert, "empty science stamp"));
    }
    check_shape(alert, "science data", &sci.image, w, h)?;
    check_shape(alert, "template", &tmpl.image, w, h)?;
    for (what, stamp) in [("science", sci), ("template", tmpl)] {
        if stamp.mask.len() != npix {
            return Err(bad(alert, format!("{what} mask has {} values for {w}x{h}", stamp.mask.len())));
        }
        if let Some(v) = &stamp.variance {
            check_shape(alert, &format!("{what} variance"), v, w, h)?;
        }
    }
    let finite = |s: &Stamp, i: usize| !s.mask[i] && s.image.data[i].is_finite();
    let mut sci_ok: Vec<bool> = (0..npix).map(|i| finite(sci, i)).collect();
    let mut tmpl_ok: Vec<bool> = (0..npix).map(|i| finite(tmpl, i)).collect();

    let gain = alert.candidate.gain.filter(|g| g.is_finite() && *g > 0.0).unwrap_or(cfg.default_gain);
    if !(gain > 0.0 && gain.is_finite()) {
        return Err(bad(alert, format!("gain {gain}")));
    }
    let science_var = variance(alert, sci, &mut sci_ok, gain, "science")?;
    let template_var = variance(alert, tmpl, &mut tmpl_ok, gain, "template")?;
    let weight: Vec<f32> = sci_ok.iter().zip(&tmpl_ok).map(|(a, b)| if *a && *b { 1.0 } else { 0.0 }).collect();
    let usable = weight.iter().filter(|v| **v > 0.0).count();
    if (usable as f64) < cfg.min_usable_fraction * npix as f64 {
        return Err(bad(alert, format!("only {usable} of {npix} pixels usable")));
    }

    let (lo, hi) = cfg.sigma_range;
    let in_range = |s: f64| s.is_finite() && s >= lo && s <= hi;
    let from_fwhm = |f: Option<f64>| f.map(|f| f / FWHM_PER_SIGMA).filter(|s| in_range(*s));
    let sci_psf = sci.psf.as_ref().filter(|p| p.width > 0 && p.height > 0 && p.data.len() == p.width * p.height);
    let (science_sigma, science_src) = match sci_psf.and_then(psf_sigma).filter(|s| in_range(*s)) {
        Some(s) => (s, SigmaSource::PsfImage),
        None => match from_fwhm(alert.candidate.fwhm_px) {
            Some(s) => (s, SigmaSource::Packet),
            None => {
                let guess = from_fwhm(alert.candidate.template_fwhm_px).unwrap_or(1.5);
                let s = measure_sigma(&sci.image, &sci_ok, guess, cfg)
                    .ok_or_else(|| bad(alert, "no science PSF: no PSF image, no seeing in the packet, no star to measure"))?;
                (s, SigmaSource::Measured)
            }
        },
    };
    let tmpl_psf = tmpl.psf.as_ref().filter(|p| p.width > 0 && p.height > 0 && p.data.len() == p.width * p.height);
    let (template_sigma, template_src) = match tmpl_psf.and_then(psf_sigma).filter(|s| in_range(*s)) {
        Some(s) => (s, SigmaSource::PsfImage),
        None => {
            let guess = from_fwhm(alert.candidate.template_fwhm_px).unwrap_or(science_sigma);
            match measure_sigma(&tmpl.image, &tmpl_ok, guess, cfg) {
                Some(s) => (s, SigmaSource::Measured),
                None => match from_fwhm(alert.candidate.template_fwhm_px) {
                    Some(s) => (s, SigmaSource::Packet),
                    None => (science_sigma, SigmaSource::Science),
                },
            }
        }
    };
    let kernel_sigma = (science_sigma * science_sigma - template_sigma * template_sigma).max(0.0).sqrt();

    let (cx, cy) = (alert.candidate.stamp_x, alert.candidate.stamp_y);
    if !(cx.is_finite() && cy.is_finite()) || cx < -0.5 || cy < -0.5 || cx > w as f64 - 0.5 || cy > h as f64 - 0.5 {
        return Err(bad(alert, format!("candidate at ({cx}, {cy}) is outside the {w}x{h} stamp")));
    }
    let fit_radius = (cfg.fit_exclusion_fwhm * FWHM_PER_SIGMA * science_sigma).min(cfg.max_fit_radius_frac * w.min(h) as f64);
    let profile = profile(w, h, cx, cy, sci_psf, science_sigma)
        .ok_or_else(|| bad(alert, "matched-filter profile is empty on the stamp"))?;

    let params = StampParams {
        kernel_sigma: kernel_sigma as f32,
        cand_x: cx as f32,
        cand_y: cy as f32,
        fit_radius: fit_radius as f32,
        fixed_scale: 0.0,
        science_sigma: science_sigma as f32,
        template_sigma: template_sigma as f32,
    };
    if ![params.kernel_sigma, params.fit_radius, params.science_sigma, params.template_sigma].iter().all(|v| v.is_finite()) {
        return Err(bad(alert, format!("non-finite parameters {params:?}")));
    }
    let clean = |s: &Stamp, ok: &[bool]| -> Vec<f32> {
        s.image.data.iter().zip(ok).map(|(v, u)| if *u { *v } else { 0.0 }).collect()
    };
    Ok(PreparedStamp {
        alert_id: alert.alert_id.clone(),
        width: w,
        height: h,
        science: clean(sci, &sci_ok),
        template: clean(tmpl, &tmpl_ok),
        science_var,
        template_var,
        weight,
        profile,
        params,
        science_sigma_source: science_src,
        template_sigma_source: template_src,
    })
}

/// Concatenate same-shape stamps into a batch. The shape is the first stamp's; a stamp of
/// another shape is left out with a warning (group by [`PreparedStamp::shape`] first, or use
/// [`prepare_batch`]).
pub fn assemble(stamps: &[PreparedStamp]) -> StampBatch {
    let (width, height) = stamps.first().map(PreparedStamp::shape).unwrap_or((0, 0));
    let mut b = StampBatch::empty(width, height);
    for s in stamps {
        if s.shape() != (width, height) {
            tracing::warn!(alert_id = %s.alert_id, shape = ?s.shape(), batch = ?(width, height), "stamp of another shape left out of the batch");
            continue;
        }
        b.science.extend_from_slice(&s.science);
        b.template.extend_from_slice(&s.template);
        b.science_var.extend_from_slice(&s.science_var);
        b.template_var.extend_from_slice(&s.template_var);
        b.weight.extend_from_slice(&s.weight);
        b.profile.extend_from_slice(&s.profile);
        b.params.push(s.params.clone());
        b.n += 1;
    }
    b
}

/// One shape's batch and, for each of its stamps, the index of its alert in the input.
#[derive(Debug, Clone, PartialEq)]
pub struct PreparedBatch {
    pub alerts: Vec<usize>,
    pub batch: StampBatch,
}

/// Prepare many alerts: one batch per stamp shape (in order of first appearance), and the
/// rejected alerts by index with the reason.
pub fn prepare_batch(alerts: &[Alert], cfg: &PrepareConfig) -> (Vec<PreparedBatch>, Vec<(usize, EngineError)>) {
    let mut groups: Vec<((usize, usize), Vec<usize>, Vec<PreparedStamp>)> = Vec::new();
    let mut rejected = Vec::new();
    for (i, alert) in alerts.iter().enumerate() {
        match prepare_stamp(alert, cfg) {
            Ok(p) => match groups.iter_mut().find(|g| g.0 == p.shape()) {
                Some(g) => {
                    g.1.push(i);
                    g.2.push(p);
                }
                None => groups.push((p.shape(), vec![i], vec![p])),
            },
            Err(e) => rejected.push((i, e)),
        }
    }
    let batches = groups.into_iter().map(|(_, idx, stamps)| PreparedBatch { alerts: idx, batch: assemble(&stamps) }).collect();
    (batches, rejected)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::alert::{Candidate, Survey, Triplet};

    fn gaussian(w: usize, h: usize, cx: f64, cy: f64, sigma: f64, amp: f64) -> Vec<f32> {
        (0..w * h)
            .map(|i| {
                let (dx, dy) = ((i % w) as f64 - cx, (i / w) as f64 - cy);
                (amp * (-(dx * dx + dy * dy) / (2.0 * sigma * sigma)).exp()) as f32
            })
            .collect()
    }

    fn stamp(data: Vec<f32>, w: usize, h: usize, psf: Option<Image>, var: Option<Image>) -> Stamp {
        Stamp { image: Image::new(w, h, data), mask: vec![false; w * h], variance: var, psf }
    }

    fn alert(sci: Stamp, tmpl: Stamp, cand: Candidate) -> Alert {
        Alert {
            survey: Survey::Rubin,
            alert_id: "t".into(),
            object_id: String::new(),
            ra: 0.0,
            dec: 0.0,
            mjd_tai: 60000.0,
            band: "r".into(),
            exposure_s: None,
            candidate: cand,
            triplet: Triplet { science: sci, template: tmpl, difference: None },
        }
    }

    /// Deterministic pseudo-noise in [-0.5, 0.5).
    fn noise(i: usize) -> f32 {
        let x = (i as u64).wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((x >> 40) as f32 / (1u64 << 24) as f32) - 0.5
    }

    #[test]
    fn sigma_from_gaussian_psf_image() {
        let (w, h) = (31, 31);
        let psf_s = Image::new(25, 25, gaussian(25, 25, 12.0, 12.0, 2.2, 1.0));
        let psf_t = Image::new(25, 25, gaussian(25, 25, 12.0, 12.0, 1.5, 1.0));
        assert!((psf_sigma(&psf_s).unwrap() - 2.2).abs() < 0.01, "{:?}", psf_sigma(&psf_s));
        let var = Image::new(w, h, vec![4.0; w * h]);
        let sci = stamp((0..w * h).map(|i| 100.0 + 2.0 * noise(i)).collect(), w, h, Some(psf_s), Some(var.clone()));
        let tmpl = stamp((0..w * h).map(|i| 100.0 + 2.0 * noise(i + 7)).collect(), w, h, Some(psf_t), Some(var));
        let cand = Candidate { stamp_x: 15.3, stamp_y: 14.6, positive: true, ..Default::default() };
        let p = prepare_stamp(&alert(sci, tmpl, cand), &PrepareConfig::default()).unwrap();
        assert_eq!(p.science_sigma_source, SigmaSource::PsfImage);
        assert!((p.params.science_sigma - 2.2).abs() < 0.01);
        assert!((p.params.template_sigma - 1.5).abs() < 0.01);
        let k = (2.2f32 * 2.2 - 1.5 * 1.5).sqrt();
        assert!((p.params.kernel_sigma - k).abs() < 0.02, "{} vs {k}", p.params.kernel_sigma);
        let sum: f32 = p.profile.iter().sum();
        assert!((sum - 1.0).abs() < 1e-4);
        // Profile centroid on the candidate.
        let cx: f32 = p.profile.iter().enumerate().map(|(i, v)| v * (i % w) as f32).sum();
        let cy: f32 = p.profile.iter().enumerate().map(|(i, v)| v * (i / w) as f32).sum();
        assert!((cx - 15.3).abs() < 0.05 && (cy - 14.6).abs() < 0.05, "{cx} {cy}");
        assert!((p.params.fit_radius - (2.0 * 2.3548 * 2.2f32).min(0.4 * 31.0)).abs() < 0.01);
    }

    #[test]
    fn ztf_like_stamp_measures_template_and_derives_variance() {
        let (w, h) = (63, 63);
        let mut t = gaussian(w, h, 20.0, 40.0, 1.6, 5000.0);
        let mut s = gaussian(w, h, 20.0, 40.0, 2.4, 5000.0);
        for i in 0..w * h {
            t[i] += 300.0 + 10.0 * noise(i);
            s[i] += 300.0 + 10.0 * noise(i + 99);
        }
        let mut sci = stamp(s, w, h, None, None);
        sci.mask[5] = true;
        let tmpl = stamp(t, w, h, None, None);
        let cand = Candidate {
            stamp_x: 31.0,
            stamp_y: 31.0,
            fwhm_px: Some(2.4 * FWHM_PER_SIGMA),
            template_fwhm_px: Some(2.5),
            positive: true,
            ..Default::default()
        };
        let p = prepare_stamp(&alert(sci, tmpl, cand), &PrepareConfig::default()).unwrap();
        assert_eq!(p.template_sigma_source, SigmaSource::Measured);
        assert!((p.params.template_sigma - 1.6).abs() < 0.1, "{}", p.params.template_sigma);
        assert!((p.params.science_sigma - 2.4).abs() < 1e-4);
        assert_eq!(p.weight[5], 0.0);
        // Uniform noise of width 10 has sigma 10/sqrt(12); MAD estimate is rougher: loose.
        let sky_var = p.science_var[0] as f64;
        assert!(sky_var > 3.0 && sky_var < 20.0, "{sky_var}");
        // A bright pixel gets Poisson variance on top.
        assert!(p.science_var[40 * w + 20] > p.science_var[0] + 100.0);
    }

    #[test]
    fn rejects_bad_stamps() {
        let (w, h) = (20, 20);
        let var = Image::new(w, h, vec![1.0; w * h]);
        let psf = Image::new(15, 15, gaussian(15, 15, 7.0, 7.0, 1.5, 1.0));
        let mk = |ww| stamp(vec![1.0; ww * h], ww, h, Some(psf.clone()), Some(Image::new(ww, h, vec![1.0; ww * h])));
        let cand = Candidate { stamp_x: 10.0, stamp_y: 10.0, ..Default::default() };
        let e = prepare_stamp(&alert(mk(20), mk(19), cand.clone()), &PrepareConfig::default()).unwrap_err();
        assert!(e.to_string().contains("template"), "{e}");
        let mut masked = stamp(vec![1.0; w * h], w, h, Some(psf.clone()), Some(var.clone()));
        masked.mask.iter_mut().take(350).for_each(|m| *m = true);
        let e = prepare_stamp(&alert(masked, mk(20), cand.clone()), &PrepareConfig::default()).unwrap_err();
        assert!(e.to_string().contains("usable"), "{e}");
        let far = Candidate { stamp_x: f64::NAN, ..cand };
        assert!(prepare_stamp(&alert(mk(20), mk(20), far), &PrepareConfig::default()).is_err());
    }
}

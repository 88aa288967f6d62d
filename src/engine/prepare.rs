//! Batch preparation on the CPU: an [`Alert`] becomes a [`PreparedStamp`] (variance planes, PSF
//! widths, PSF matching, masks, fit exclusion, flux scale and the matched-filter profile), and
//! same-shape stamps become a [`StampBatch`]. Method and figures: `docs/engine.md`.
//!
//! Noise: the stamp's own variance planes where present (Rubin); otherwise (ZTF) per image
//! `sky_var + max(pixel − sky, 0) / gain`, with the sky level the median and the sky variance
//! `(1.4826·MAD)²` of the usable pixels (the template's gain scaled by the ratio of sky variances).
//!
//! PSF widths (Gaussian-equivalent sigma): second moments of the PSF image where the stamp has
//! one; else the sources both stamps show ([`paired_widths`]), then each stamp's brightest
//! compact source, then the packet's seeing.
//!
//! PSF matching: the sharper image is convolved onto the broader PSF — the template by the
//! engine's Gaussian `convolve` kernel; the science, or either image with a free-form kernel
//! fitted to the two PSF images when a Gaussian does not match them ([`matching_kernel`]), here.
//! The convolved image's variance is scaled for its correlated noise
//! ([`correlated_noise_factor`]). Survey stamps on one flux scale (Rubin, ZTF) fix the scale at 1.

use super::{EngineError, StampBatch, StampParams};
use crate::alert::{Alert, Image, Stamp, Survey};

/// FWHM / sigma of a Gaussian.
pub const FWHM_PER_SIGMA: f64 = 2.354_820_045;
/// Starting PSF sigma (pixels) for measuring stamps that come without PSF or seeing.
const PSF_SIGMA_GUESS: f64 = 1.0;
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
    /// Take the flux scale from the survey instead of fitting it on the stamp, for surveys that
    /// deliver the template on the science image's photometric scale (Rubin: both in nJy; ZTF:
    /// the reference cutout is flux-matched to the science exposure). Only the background is then
    /// fitted. Other stamps (blink native) fit both.
    pub survey_scale: bool,
    /// Where both stamps carry a PSF image and the Gaussian kernel of their second moments
    /// leaves more than this fraction of the broader PSF's power unmatched
    /// (`‖G⊗P_sharp − P_broad‖² / ‖P_broad‖²`), a free-form kernel is fitted to the PSF images
    /// and applied here on the CPU instead.
    pub max_gaussian_mismatch: f64,
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
            survey_scale: true,
            max_gaussian_mismatch: 1e-3,
        }
    }
}

/// Where a PSF width came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SigmaSource {
    PsfImage,
    Packet,
    Measured,
    /// Both widths from the sources the two stamps share ([`paired_widths`]).
    Paired,
    /// The template fell back to the science value.
    Science,
    /// The science fell back to the template value.
    Template,
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
    /// Where the PSF matching happened.
    pub matching: Matching,
    /// Factor applied to the convolved image's variance for its correlated noise.
    pub noise_factor: f64,
}

/// Which image was convolved onto the other's PSF, and where.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Matching {
    /// Same PSF width: nothing convolved.
    None,
    /// The engine's `convolve` kernel: template ⊗ Gaussian of `kernel_sigma`.
    Engine,
    /// Template convolved in preparation (a free-form kernel fitted to the PSF images).
    TemplateHere,
    /// Science convolved in preparation (it is the sharper image).
    ScienceHere,
}

impl PreparedStamp {
    /// Batches hold stamps of one shape: group by this.
    pub fn shape(&self) -> (usize, usize) {
        (self.width, self.height)
    }
}

/// Pixel values of this magnitude or more are fill values: unusable, like NaN.
pub const ABSURD_PIXEL: f32 = 1e20;

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

/// Median of `v` (the mean of the middle two for an even count); `v` is reordered. NaN-free
/// input expected; `bench::agreement::median` drops NaNs first.
///
/// Selection, not a sort: the same values as sorting (the same total order picks the same
/// elements) in linear time. `sky_stats` takes two medians of every stamp several times while
/// an alert is prepared; sorting was half of `prepare_stamp`'s time on ZTF alerts.
pub(crate) fn median_in_place(v: &mut [f64]) -> f64 {
    let n = v.len();
    if n == 0 {
        return f64::NAN;
    }
    let (lower, upper, _) = v.select_nth_unstable_by(n / 2, |a, b| a.total_cmp(b));
    let upper = *upper;
    if n % 2 == 1 {
        upper
    } else {
        // The lower middle is the largest of the elements ranked below n/2.
        let below = lower.iter().copied().max_by(|a, b| a.total_cmp(b)).unwrap_or(upper);
        0.5 * (below + upper)
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

/// Adaptive (Gaussian-weighted, iterated) second moments of the source peaking at `(px, py)`:
/// its Gaussian-equivalent sigma and centroid.
fn adaptive_moments(img: &Image, usable: &[bool], sky: f64, px: usize, py: usize, guess: f64) -> Option<Source> {
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
    sigma.is_finite().then_some(Source { sigma, x: cx, y: cy })
}

/// A compact source measured on a stamp: adaptive-moment sigma (pixels) and centroid.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Source {
    pub sigma: f64,
    pub x: f64,
    pub y: f64,
}

/// The brightest local maxima ≥ `template_min_peak_snr` sky sigmas (at most `max`), unsaturated,
/// with their adaptive moments (sigma within the sanity range and a factor of three of `guess`).
pub fn sources(img: &Image, usable: &[bool], guess: f64, max: usize, cfg: &PrepareConfig) -> Vec<Source> {
    let Some((sky, sky_var)) = sky_stats(&img.data, usable) else { return Vec::new() };
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
    peaks
        .iter()
        .take(max)
        .filter_map(|&(_, x, y)| {
            // The window is 4 guessed sigmas wide each way: measure a broader source again with
            // a window that fits it.
            let s = adaptive_moments(img, usable, sky, x, y, guess)?;
            if s.sigma > 1.25 * guess {
                adaptive_moments(img, usable, sky, x, y, s.sigma).or(Some(s))
            } else {
                Some(s)
            }
        })
        .filter(|s| s.sigma >= lo && s.sigma <= hi && s.sigma >= guess / 3.0 && s.sigma <= guess * 3.0)
        .collect()
}

/// Sigma of the brightest unsaturated compact source on a stamp, within the sanity range and a
/// factor of three of `guess`.
pub fn measure_sigma(img: &Image, usable: &[bool], guess: f64, cfg: &PrepareConfig) -> Option<f64> {
    sources(img, usable, guess, 8, cfg).first().map(|s| s.sigma)
}

/// PSF widths from the sources both stamps show (centroids within 1.5 px): the median of
/// `σ_sci² − σ_tmpl²` over the pairs (a galaxy's own size cancels in the difference), and the
/// template's PSF sigma (the pairs' median, but no more than 1.3 × the sharpest template source,
/// so that galaxies do not pass for the PSF). `None` without a pair.
pub fn paired_widths(sci: &Image, sci_ok: &[bool], tmpl: &Image, tmpl_ok: &[bool], guess: f64, cfg: &PrepareConfig) -> Option<(f64, f64, usize)> {
    let ss = sources(sci, sci_ok, guess, 10, cfg);
    let ts = sources(tmpl, tmpl_ok, guess, 10, cfg);
    let tmin = ts.iter().map(|s| s.sigma).fold(f64::INFINITY, f64::min);
    let mut d = Vec::new();
    let mut st = Vec::new();
    for s in &ss {
        if let Some(t) = ts.iter().find(|t| (t.x - s.x).powi(2) + (t.y - s.y).powi(2) <= 2.25) {
            d.push(s.sigma * s.sigma - t.sigma * t.sigma);
            st.push(t.sigma);
        }
    }
    if d.is_empty() {
        return None;
    }
    let n = d.len();
    let t = median_in_place(&mut st).min(1.3 * tmin);
    Some((median_in_place(&mut d), t, n))
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

/// A small square convolution kernel, side `2·half + 1`, row-major, centred on its middle pixel.
#[derive(Debug, Clone, PartialEq)]
pub struct Kernel {
    pub half: usize,
    pub data: Vec<f64>,
}

impl Kernel {
    pub fn side(&self) -> usize {
        2 * self.half + 1
    }

    /// The unit-sum Gaussian the engine's `convolve` kernel applies for `sigma`: taps
    /// `exp(−k²/2σ²)` out to `cpu::convolve::radius(sigma)`, the outer product of the 1-D taps.
    pub fn engine_gaussian(sigma: f64) -> Kernel {
        let r = crate::cpu::convolve::radius(sigma as f32).max(0) as usize;
        let g: Vec<f64> = (0..=2 * r)
            .map(|k| {
                let t = (k as f64 - r as f64) / sigma;
                if k == r { 1.0 } else { (-0.5 * t * t).exp() }
            })
            .collect();
        let sum: f64 = g.iter().sum();
        let data = g.iter().flat_map(|a| g.iter().map(move |b| a * b / (sum * sum))).collect();
        Kernel { half: r, data }
    }

    /// Σ K², the per-pixel variance of unit white noise after convolution.
    pub fn sum_sq(&self) -> f64 {
        self.data.iter().map(|v| v * v).sum()
    }
}

/// A PSF image normalised to unit sum and zero-padded onto a `(2r+1)²` grid, its central pixel
/// in the middle.
fn centred(psf: &Image, r: usize) -> Vec<f64> {
    let n = 2 * r + 1;
    let mut out = vec![0.0; n * n];
    let (pcx, pcy) = (psf.width / 2, psf.height / 2);
    for y in 0..psf.height {
        for x in 0..psf.width {
            let (gx, gy) = (x as i64 - pcx as i64 + r as i64, y as i64 - pcy as i64 + r as i64);
            if gx >= 0 && gy >= 0 && (gx as usize) < n && (gy as usize) < n {
                let v = psf.data[y * psf.width + x] as f64;
                out[gy as usize * n + gx as usize] = if v.is_finite() { v } else { 0.0 };
            }
        }
    }
    let sum: f64 = out.iter().sum();
    if sum > 0.0 && sum.is_finite() {
        out.iter_mut().for_each(|v| *v /= sum);
    }
    out
}

/// The normal equations of `K ⊗ p ≈ q` for a kernel of half-width `half`, on a common grid:
/// `AᵀA` (from the autocorrelation of `p`), `Aᵀq` and `qᵀq`.
struct KernelSystem {
    half: usize,
    ata: Vec<f64>,
    atb: Vec<f64>,
}

impl KernelSystem {
    fn new(sharp: &Image, broad: &Image, half: usize) -> KernelSystem {
        let r = sharp.width.max(sharp.height).max(broad.width).max(broad.height) / 2 + 2 * half + 1;
        let n = 2 * r + 1;
        let p = centred(sharp, r);
        let q = centred(broad, r);
        let corr = |a: &[f64], b: &[f64], dx: i64, dy: i64| -> f64 {
            // Σ_y a(y) b(y + d), over the rows and columns where both are on the grid (in
            // ascending order, skipping zeros of `a`, as the plain double loop with bounds tests).
            let ni = n as i64;
            let (y0, y1) = (0.max(-dy), ni.min(ni - dy));
            let (x0, x1) = (0.max(-dx) as usize, ni.min(ni - dx).max(0) as usize);
            let mut s = 0.0;
            for y in y0..y1 {
                let ar = &a[y as usize * n..(y as usize + 1) * n];
                let br = &b[(y + dy) as usize * n..(y + dy + 1) as usize * n];
                if x0 >= x1 {
                    continue;
                }
                let bs = &br[(x0 as i64 + dx) as usize..(x1 as i64 + dx) as usize];
                for (av, bv) in ar[x0..x1].iter().zip(bs) {
                    if *av != 0.0 {
                        s += av * bv;
                    }
                }
            }
            s
        };
        let h = half as i64;
        let side = 2 * half + 1;
        let m = side * side;
        let l = 2 * h;
        let lside = (2 * l + 1) as usize;
        let mut auto = vec![0.0; lside * lside];
        for dy in -l..=l {
            for dx in -l..=l {
                auto[((dy + l) as usize) * lside + (dx + l) as usize] = corr(&p, &p, dx, dy);
            }
        }
        let mut ata = vec![0.0; m * m];
        let mut atb = vec![0.0; m];
        for i in 0..m {
            let (ix, iy) = ((i % side) as i64 - h, (i / side) as i64 - h);
            // column i is p shifted by d_i: Σ_x p(x − d_i) q(x) = Σ_y p(y) q(y + d_i)
            atb[i] = corr(&p, &q, ix, iy);
            for j in 0..m {
                let (jx, jy) = ((j % side) as i64 - h, (j / side) as i64 - h);
                // Σ_x p(x − d_i) p(x − d_j) = auto(d_i − d_j)
                let (dx, dy) = (ix - jx, iy - jy);
                ata[i * m + j] = auto[((dy + l) as usize) * lside + (dx + l) as usize];
            }
        }
        KernelSystem { half, ata, atb }
    }

    /// Least squares with `Σ K = 1` (a Lagrange multiplier) and a small ridge.
    fn solve(&self) -> Option<Kernel> {
        let side = 2 * self.half + 1;
        let m = side * side;
        let n = m + 1;
        let trace: f64 = (0..m).map(|i| self.ata[i * m + i]).sum();
        let ridge = 1e-7 * trace / m as f64;
        let mut a = vec![0.0; n * (n + 1)];
        for i in 0..m {
            for j in 0..m {
                a[i * (n + 1) + j] = self.ata[i * m + j] + if i == j { ridge } else { 0.0 };
            }
            a[i * (n + 1) + m] = 1.0;
            a[m * (n + 1) + i] = 1.0;
            a[i * (n + 1) + n] = self.atb[i];
        }
        a[m * (n + 1) + n] = 1.0;
        let x = solve_dense(&mut a, n)?;
        let data = x[..m].to_vec();
        data.iter().all(|v| v.is_finite()).then_some(Kernel { half: self.half, data })
    }
}

/// Gaussian elimination with partial pivoting on an `n × (n+1)` augmented matrix.
fn solve_dense(a: &mut [f64], n: usize) -> Option<Vec<f64>> {
    let w = n + 1;
    for c in 0..n {
        let piv = (c..n).max_by(|&i, &j| a[i * w + c].abs().total_cmp(&a[j * w + c].abs()))?;
        if !(a[piv * w + c].abs() > 0.0) {
            return None;
        }
        if piv != c {
            for k in 0..w {
                a.swap(piv * w + k, c * w + k);
            }
        }
        let d = a[c * w + c];
        let (top, rest) = a.split_at_mut((c + 1) * w);
        let pivot = &top[c * w + c..(c + 1) * w];
        for row in rest.chunks_exact_mut(w).take(n - c - 1) {
            let f = row[c] / d;
            if f != 0.0 {
                for (x, p) in row[c..].iter_mut().zip(pivot) {
                    *x -= f * p;
                }
            }
        }
    }
    let mut x = vec![0.0; n];
    for r in (0..n).rev() {
        let s: f64 = (r + 1..n).map(|k| a[r * w + k] * x[k]).sum();
        x[r] = (a[r * w + n] - s) / a[r * w + r];
    }
    x.iter().all(|v| v.is_finite()).then_some(x)
}

/// `‖K ⊗ P_sharp − P_broad‖² / ‖P_broad‖²`, the PSF images aligned on their central pixels.
pub fn kernel_residual(k: &Kernel, sharp: &Image, broad: &Image) -> f64 {
    let r = sharp.width.max(sharp.height).max(broad.width).max(broad.height) / 2 + k.half;
    let n = 2 * r + 1;
    let p = centred(sharp, r);
    let q = centred(broad, r);
    let (ks, hk) = (k.side(), k.half as i64);
    let mut res = 0.0;
    for y in 0..n as i64 {
        for x in 0..n as i64 {
            let mut c = 0.0;
            for ky in -hk..=hk {
                let yy = y - ky;
                if yy < 0 || yy >= n as i64 {
                    continue;
                }
                for kx in -hk..=hk {
                    let xx = x - kx;
                    if xx >= 0 && xx < n as i64 {
                        c += k.data[(ky + hk) as usize * ks + (kx + hk) as usize] * p[yy as usize * n + xx as usize];
                    }
                }
            }
            res += (c - q[y as usize * n + x as usize]).powi(2);
        }
    }
    let qq: f64 = q.iter().map(|v| v * v).sum();
    if qq > 0.0 {
        res / qq
    } else {
        f64::INFINITY
    }
}

/// How well the engine's Gaussian of `sigma_k` maps the sharper PSF image onto the broader one,
/// and the free-form kernel that does it best (half-width from `sigma_k`, at most 8), with its
/// residual; both as [`kernel_residual`].
pub fn matching_kernel(sharp: &Image, broad: &Image, sigma_k: f64) -> (f64, Option<(Kernel, f64)>) {
    (gaussian_residual(sharp, broad, sigma_k), free_kernel(sharp, broad, sigma_k))
}

/// The first half of [`matching_kernel`]: the residual the engine's Gaussian of `sigma_k` leaves.
pub fn gaussian_residual(sharp: &Image, broad: &Image, sigma_k: f64) -> f64 {
    kernel_residual(&Kernel::engine_gaussian(sigma_k.max(1e-3)), sharp, broad)
}

/// The second half of [`matching_kernel`]: the least-squares free-form kernel and its residual.
/// Most of the cost of preparing an alert with PSF images, so [`prepare_stamp`] fits it only
/// when the Gaussian is not good enough.
pub fn free_kernel(sharp: &Image, broad: &Image, sigma_k: f64) -> Option<(Kernel, f64)> {
    let half = ((2.5 * sigma_k).ceil() as usize + 1).clamp(2, 8);
    KernelSystem::new(sharp, broad, half).solve().map(|k| {
        let r = kernel_residual(&k, sharp, broad);
        (k, r)
    })
}

/// `img ⊗ K` and `var ⊗ K²`, renormalised over usable pixels (`Σ K w`) as the engine's
/// `convolve` does; a pixel whose usable kernel weight is below 0.5 becomes unusable.
fn convolve_masked(img: &[f32], var: &[f32], usable: &mut [bool], w: usize, h: usize, k: &Kernel) -> (Vec<f32>, Vec<f32>) {
    let side = k.side();
    let hk = k.half as i64;
    let mut out = vec![0.0f32; w * h];
    let mut out_v = vec![0.0f32; w * h];
    let mut ok = vec![false; w * h];
    for y in 0..h as i64 {
        for x in 0..w as i64 {
            let (mut st, mut sw, mut sv) = (0.0f64, 0.0f64, 0.0f64);
            for ky in -hk..=hk {
                let yy = y - ky;
                if yy < 0 || yy >= h as i64 {
                    continue;
                }
                for kx in -hk..=hk {
                    let xx = x - kx;
                    if xx < 0 || xx >= w as i64 {
                        continue;
                    }
                    let q = yy as usize * w + xx as usize;
                    if !usable[q] {
                        continue;
                    }
                    let kv = k.data[(ky + hk) as usize * side + (kx + hk) as usize];
                    st += kv * img[q] as f64;
                    sw += kv;
                    sv += kv * kv * var[q] as f64;
                }
            }
            let i = y as usize * w + x as usize;
            if sw >= 0.5 {
                out[i] = (st / sw) as f32;
                out_v[i] = (sv / (sw * sw)) as f32;
                ok[i] = true;
            }
        }
    }
    for (u, o) in usable.iter_mut().zip(&ok) {
        *u = *u && *o;
    }
    (out, out_v)
}

/// The factor by which convolving white noise with `k` and then treating the pixels as
/// independent underestimates the matched filter's variance with the compact profile `p`
/// (side `2·ph + 1`, any normalisation): `Σ (K ⊗ P)² / (Σ P² · Σ K²)`. 1 for a delta kernel.
pub fn correlated_noise_factor(k: &Kernel, p: &[f64], ph: usize) -> f64 {
    let (ks, ps) = (k.side() as i64, (2 * ph + 1) as i64);
    let n = ks + ps - 1;
    let mut conv = vec![0.0f64; (n * n) as usize];
    for py in 0..ps {
        for px in 0..ps {
            let pv = p[(py * ps + px) as usize];
            if pv == 0.0 {
                continue;
            }
            for ky in 0..ks {
                for kx in 0..ks {
                    conv[((py + ky) * n + px + kx) as usize] += pv * k.data[(ky * ks + kx) as usize];
                }
            }
        }
    }
    let num: f64 = conv.iter().map(|v| v * v).sum();
    let den = p.iter().map(|v| v * v).sum::<f64>() * k.sum_sq();
    if den > 0.0 && num.is_finite() {
        (num / den).max(1.0)
    } else {
        1.0
    }
}

/// A Gaussian profile of `sigma` on a `(2·ph + 1)²` grid, `ph = ceil(4σ)`.
fn gaussian_compact(sigma: f64) -> (Vec<f64>, usize) {
    let ph = (4.0 * sigma).ceil().clamp(1.0, 40.0) as usize;
    let n = 2 * ph + 1;
    let p = (0..n * n)
        .map(|i| {
            let (dx, dy) = ((i % n) as f64 - ph as f64, (i / n) as f64 - ph as f64);
            (-(dx * dx + dy * dy) / (2.0 * sigma * sigma)).exp()
        })
        .collect();
    (p, ph)
}

/// A PSF image as a compact profile (odd square around its central pixel).
fn psf_compact(psf: &Image) -> (Vec<f64>, usize) {
    let ph = psf.width.min(psf.height).saturating_sub(1) / 2;
    (centred(psf, ph), ph)
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
    // Values beyond ±ABSURD_PIXEL are fill values, not light (ZTF reference cutouts mark
    // pixels without data with −3.4e38, the most negative f32).
    let finite = |s: &Stamp, i: usize| !s.mask[i] && s.image.data[i].is_finite() && s.image.data[i].abs() < ABSURD_PIXEL;
    let mut sci_ok: Vec<bool> = (0..npix).map(|i| finite(sci, i)).collect();
    let mut tmpl_ok: Vec<bool> = (0..npix).map(|i| finite(tmpl, i)).collect();

    let gain = alert.candidate.gain.filter(|g| g.is_finite() && *g > 0.0).unwrap_or(cfg.default_gain);
    if !(gain > 0.0 && gain.is_finite()) {
        return Err(bad(alert, format!("gain {gain}")));
    }
    // A template without a variance plane is a coadd on the science's flux scale: its sources'
    // shot noise shrinks with its sky noise, so its effective gain is the science gain times
    // the ratio of the two sky variances.
    let sky_var_of = |st: &Stamp, ok: &[bool]| st.variance.is_none().then(|| sky_stats(&st.image.data, ok).map(|s| s.1)).flatten();
    let template_gain = match (sky_var_of(sci, &sci_ok), sky_var_of(tmpl, &tmpl_ok)) {
        (Some(vs), Some(vt)) if vs > 0.0 && vt > 0.0 && (vs / vt).is_finite() => gain * (vs / vt).clamp(1e-3, 1e3),
        _ => gain,
    };
    let science_var = variance(alert, sci, &mut sci_ok, gain, "science")?;
    let template_var = variance(alert, tmpl, &mut tmpl_ok, template_gain, "template")?;
    let usable = sci_ok.iter().zip(&tmpl_ok).filter(|(a, b)| **a && **b).count();
    if (usable as f64) < cfg.min_usable_fraction * npix as f64 {
        return Err(bad(alert, format!("only {usable} of {npix} pixels usable")));
    }

    let (lo, hi) = cfg.sigma_range;
    let in_range = |s: f64| s.is_finite() && s >= lo && s <= hi;
    let from_fwhm = |f: Option<f64>| f.map(|f| f / FWHM_PER_SIGMA).filter(|s| in_range(*s));
    let valid = |p: &&Image| p.width > 0 && p.height > 0 && p.data.len() == p.width * p.height;
    let sci_psf = sci.psf.as_ref().filter(valid);
    let tmpl_psf = tmpl.psf.as_ref().filter(valid);
    let sci_psf_sigma = sci_psf.and_then(psf_sigma).filter(|s| in_range(*s));
    let tmpl_psf_sigma = tmpl_psf.and_then(psf_sigma).filter(|s| in_range(*s));
    let paired = match (sci_psf_sigma, tmpl_psf_sigma) {
        (None, None) => paired_widths(&sci.image, &sci_ok, &tmpl.image, &tmpl_ok, PSF_SIGMA_GUESS, cfg),
        _ => None,
    };
    let (science_sigma, science_src, template_sigma, template_src) = if let Some((d, t, _)) = paired {
        ((t * t + d).max(lo * lo).sqrt(), SigmaSource::Paired, t, SigmaSource::Paired)
    } else {
        let t = match tmpl_psf_sigma {
            Some(t) => Some((t, SigmaSource::PsfImage)),
            None => measure_sigma(&tmpl.image, &tmpl_ok, sci_psf_sigma.unwrap_or(PSF_SIGMA_GUESS), cfg)
                .map(|t| (t, SigmaSource::Measured))
                .or_else(|| from_fwhm(alert.candidate.template_fwhm_px).map(|t| (t, SigmaSource::Packet))),
        };
        let guess = t.map(|t| t.0).unwrap_or(PSF_SIGMA_GUESS);
        let s = match sci_psf_sigma {
            Some(s) => Some((s, SigmaSource::PsfImage)),
            None => measure_sigma(&sci.image, &sci_ok, guess, cfg).map(|s| (s, SigmaSource::Measured)).or_else(|| {
                // The packet's seeing (ZTF: the candidate's own SExtractor FWHM) is noisy: keep it
                // within reason of the template's.
                from_fwhm(alert.candidate.fwhm_px).map(|s| (s.clamp(0.8 * guess, hi.max(0.8 * guess)), SigmaSource::Packet))
            }),
        };
        match (s, t) {
            (Some(s), Some(t)) => (s.0, s.1, t.0, t.1),
            (Some(s), None) => (s.0, s.1, s.0, SigmaSource::Science),
            (None, Some(t)) => (t.0, SigmaSource::Template, t.0, t.1),
            (None, None) => {
                return Err(bad(alert, "no PSF: no PSF image, no seeing in the packet, no star to measure"));
            }
        }
    };

    let (cx, cy) = (alert.candidate.stamp_x, alert.candidate.stamp_y);
    if !(cx.is_finite() && cy.is_finite()) || cx < -0.5 || cy < -0.5 || cx > w as f64 - 0.5 || cy > h as f64 - 0.5 {
        return Err(bad(alert, format!("candidate at ({cx}, {cy}) is outside the {w}x{h} stamp")));
    }

    // PSF matching: the sharper image is convolved onto the broader PSF. The engine convolves
    // the template with a Gaussian; anything else (the science is the sharper one, or the PSF
    // images are not matched well by a Gaussian) is convolved here with the kernel it needs.
    let science_broader = science_sigma >= template_sigma;
    let (sigma_broad, sigma_sharp) =
        if science_broader { (science_sigma, template_sigma) } else { (template_sigma, science_sigma) };
    let (broad_psf, sharp_psf) = if science_broader { (sci_psf, tmpl_psf) } else { (tmpl_psf, sci_psf) };
    let sigma_k = (sigma_broad * sigma_broad - sigma_sharp * sigma_sharp).max(0.0).sqrt();
    let mut engine_sigma = 0.0;
    let mut cpu_kernel: Option<Kernel> = None;
    if sigma_k >= crate::cpu::convolve::SIGMA_MIN as f64 {
        let free = match (broad_psf, sharp_psf) {
            // The free-form kernel is only fitted when the Gaussian leaves too much unmatched.
            (Some(bp), Some(sp)) => match gaussian_residual(sp, bp, sigma_k) {
                g_res if g_res > cfg.max_gaussian_mismatch => match free_kernel(sp, bp, sigma_k) {
                    Some((k, r)) if r < g_res => Some(k),
                    _ => None,
                },
                _ => None,
            },
            _ => None,
        };
        match free {
            Some(k) => cpu_kernel = Some(k),
            None if science_broader => engine_sigma = sigma_k,
            None => cpu_kernel = Some(Kernel::engine_gaussian(sigma_k)),
        }
    }
    // Convolution correlates the noise; the engine treats pixels as independent, so the
    // convolved image's variance is scaled to give the matched filter its true variance.
    let (compact, ph) = match broad_psf {
        Some(p) => psf_compact(p),
        None => gaussian_compact(sigma_broad),
    };
    let applied = cpu_kernel.clone().or_else(|| (engine_sigma > 0.0).then(|| Kernel::engine_gaussian(engine_sigma)));
    let noise_factor = applied.as_ref().map(|k| correlated_noise_factor(k, &compact, ph)).unwrap_or(1.0);

    let clean = |s: &Stamp, ok: &[bool]| -> Vec<f32> {
        s.image.data.iter().zip(ok).map(|(v, u)| if *u { *v } else { 0.0 }).collect()
    };
    let mut science = clean(sci, &sci_ok);
    let mut template = clean(tmpl, &tmpl_ok);
    let (mut science_var, mut template_var) = (science_var, template_var);
    match &cpu_kernel {
        Some(k) if science_broader => {
            let (t, v) = convolve_masked(&template, &template_var, &mut tmpl_ok, w, h, k);
            template = t;
            template_var = v.iter().map(|x| x * noise_factor as f32).collect();
        }
        Some(k) => {
            let (s, v) = convolve_masked(&science, &science_var, &mut sci_ok, w, h, k);
            science = s;
            science_var = v.iter().map(|x| x * noise_factor as f32).collect();
        }
        None => template_var.iter_mut().for_each(|x| *x *= noise_factor as f32),
    }
    let weight: Vec<f32> = sci_ok.iter().zip(&tmpl_ok).map(|(a, b)| if *a && *b { 1.0 } else { 0.0 }).collect();
    for (v, wt) in science.iter_mut().zip(&weight) {
        if *wt == 0.0 {
            *v = 0.0;
        }
    }
    for (v, wt) in template.iter_mut().zip(&weight) {
        if *wt == 0.0 {
            *v = 0.0;
        }
    }

    let fit_radius = (cfg.fit_exclusion_fwhm * FWHM_PER_SIGMA * sigma_broad).min(cfg.max_fit_radius_frac * w.min(h) as f64);
    let profile = profile(w, h, cx, cy, broad_psf, sigma_broad)
        .ok_or_else(|| bad(alert, "matched-filter profile is empty on the stamp"))?;
    let fixed_scale = if cfg.survey_scale && matches!(alert.survey, Survey::Rubin | Survey::Ztf) { 1.0 } else { 0.0 };

    let params = StampParams {
        kernel_sigma: engine_sigma as f32,
        cand_x: cx as f32,
        cand_y: cy as f32,
        fit_radius: fit_radius as f32,
        fixed_scale,
        science_sigma: science_sigma as f32,
        template_sigma: template_sigma as f32,
    };
    if ![params.kernel_sigma, params.fit_radius, params.science_sigma, params.template_sigma].iter().all(|v| v.is_finite()) {
        return Err(bad(alert, format!("non-finite parameters {params:?}")));
    }
    Ok(PreparedStamp {
        alert_id: alert.alert_id.clone(),
        width: w,
        height: h,
        science,
        template,
        science_var,
        template_var,
        weight,
        profile,
        params,
        science_sigma_source: science_src,
        template_sigma_source: template_src,
        matching: match (&cpu_kernel, science_broader) {
            (Some(_), true) => Matching::TemplateHere,
            (Some(_), false) => Matching::ScienceHere,
            (None, _) if engine_sigma > 0.0 => Matching::Engine,
            _ => Matching::None,
        },
        noise_factor,
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
    /// Stamps of one shape: (width, height), alert indices, prepared stamps.
    type Group = ((usize, usize), Vec<usize>, Vec<PreparedStamp>);
    let mut groups: Vec<Group> = Vec::new();
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
    fn median_by_selection_equals_median_of_the_sorted_values() {
        let sorted_median = |v: &[f64]| {
            let mut s = v.to_vec();
            s.sort_by(|a, b| a.total_cmp(b));
            let n = s.len();
            if n % 2 == 1 { s[n / 2] } else { 0.5 * (s[n / 2 - 1] + s[n / 2]) }
        };
        for n in [1usize, 2, 3, 4, 7, 64, 3969, 3970] {
            // Quantised values (many ties), both signs of zero.
            let v: Vec<f64> = (0..n).map(|i| ((noise(i * 7 + n) * 20.0).round() as f64) * if i % 5 == 0 { -0.0 } else { 1.0 }).collect();
            let want = sorted_median(&v);
            let got = median_in_place(&mut v.clone());
            assert_eq!(got.to_bits(), want.to_bits(), "n = {n}");
        }
        assert!(median_in_place(&mut []).is_nan());
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
        // The one source both stamps show gives both widths; the packet's seeing is not needed.
        assert_eq!((p.science_sigma_source, p.template_sigma_source), (SigmaSource::Paired, SigmaSource::Paired));
        assert!((p.params.template_sigma - 1.6).abs() < 0.1, "{}", p.params.template_sigma);
        assert!((p.params.science_sigma - 2.4).abs() < 0.1, "{}", p.params.science_sigma);
        let k = (2.4f32 * 2.4 - 1.6 * 1.6).sqrt();
        assert!((p.params.kernel_sigma - k).abs() < 0.15, "{} vs {k}", p.params.kernel_sigma);
        assert_eq!(p.matching, Matching::Engine);
        // Rubin's (and ZTF's) template is on the science's flux scale: only the background is fitted.
        assert_eq!(p.params.fixed_scale, 1.0);
        let native = prepare_stamp(&Alert { survey: Survey::Native, ..alert(stamp(vec![1.0; 4], 2, 2, None, None), stamp(vec![1.0; 4], 2, 2, None, None), Candidate::default()) }, &PrepareConfig::default());
        assert!(native.is_err(), "a flat 2x2 stamp has no PSF to measure");
        assert_eq!(p.weight[5], 0.0);
        // Uniform noise of width 10 has sigma 10/sqrt(12); MAD estimate is rougher: loose.
        let sky_var = p.science_var[0] as f64;
        assert!(sky_var > 3.0 && sky_var < 20.0, "{sky_var}");
        // A bright pixel gets Poisson variance on top.
        assert!(p.science_var[40 * w + 20] > p.science_var[0] + 100.0);
    }

    #[test]
    fn fill_values_are_masked_like_nan() {
        // ZTF reference cutouts mark pixels without data with −3.4e38: they must count as
        // unusable, exactly as NaN would, not as light.
        let (w, h) = (63, 63);
        let mut t = gaussian(w, h, 31.0, 31.0, 1.6, 5000.0);
        let mut s = gaussian(w, h, 31.0, 31.0, 2.4, 5000.0);
        for i in 0..w * h {
            t[i] += 300.0 + 10.0 * noise(i);
            s[i] += 300.0 + 10.0 * noise(i + 7);
        }
        let corner: Vec<usize> = (0..8).flat_map(|y| (0..8).map(move |x| y * w + x)).collect();
        let with = |fill: f32| {
            let mut t = t.clone();
            corner.iter().for_each(|&i| t[i] = fill);
            let cand = Candidate { stamp_x: 31.0, stamp_y: 31.0, positive: true, ..Default::default() };
            prepare_stamp(&alert(stamp(s.clone(), w, h, None, None), stamp(t, w, h, None, None), cand), &PrepareConfig::default()).unwrap()
        };
        let (fill, nan) = (with(-f32::MAX), with(f32::NAN));
        assert!(corner.iter().all(|&i| fill.weight[i] == 0.0));
        assert_eq!(fill, nan);
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

    #[test]
    fn sharper_science_is_convolved_here() {
        let (w, h) = (41, 41);
        let psf_s = Image::new(25, 25, gaussian(25, 25, 12.0, 12.0, 1.2, 1.0));
        let psf_t = Image::new(25, 25, gaussian(25, 25, 12.0, 12.0, 2.0, 1.0));
        let var = Image::new(w, h, vec![4.0; w * h]);
        let sci = stamp((0..w * h).map(|i| 100.0 + 2.0 * noise(i)).collect(), w, h, Some(psf_s), Some(var.clone()));
        let tmpl = stamp((0..w * h).map(|i| 100.0 + 2.0 * noise(i + 7)).collect(), w, h, Some(psf_t), Some(var));
        let cand = Candidate { stamp_x: 20.0, stamp_y: 20.0, positive: true, ..Default::default() };
        let p = prepare_stamp(&alert(sci, tmpl, cand), &PrepareConfig::default()).unwrap();
        assert_eq!(p.matching, Matching::ScienceHere);
        assert_eq!(p.params.kernel_sigma, 0.0);
        // Smoothing white noise of variance 4 with a Gaussian of sigma 1.6 leaves ~4/(4π·1.6²) per
        // pixel, scaled back up by the correlated-noise factor for a profile of sigma 2.
        let k = Kernel::engine_gaussian(1.6);
        let expect = 4.0 * k.sum_sq() * p.noise_factor;
        assert!((p.science_var[20 * w + 20] as f64 - expect).abs() < 1e-3 * expect, "{} vs {expect}", p.science_var[20 * w + 20]);
        // Continuous limit for Gaussians: 4π σ_k² σ_p² / (σ_k² + σ_p²), σ_k² = 2.56, σ_p = 2.
        let analytic = 4.0 * std::f64::consts::PI * 2.56 * 4.0 / (2.56 + 4.0);
        assert!((p.noise_factor / analytic - 1.0).abs() < 0.1, "{} vs {analytic}", p.noise_factor);
        // The science's noise is smoothed, so its pixel scatter drops.
        let sd = |v: &[f32]| {
            let m = v.iter().map(|x| *x as f64).sum::<f64>() / v.len() as f64;
            (v.iter().map(|x| (*x as f64 - m).powi(2)).sum::<f64>() / v.len() as f64).sqrt()
        };
        assert!(sd(&p.science[10 * w..30 * w]) < 0.5 * sd(&p.template[10 * w..30 * w]));
    }

    #[test]
    fn non_gaussian_psfs_get_a_fitted_kernel() {
        // A PSF with wings (two Gaussians) against a plain Gaussian: no single Gaussian matches.
        let wings = |s: f64| -> Vec<f32> {
            let a = gaussian(31, 31, 15.0, 15.0, s, 1.0);
            let b = gaussian(31, 31, 15.0, 15.0, 2.5 * s, 0.08);
            a.iter().zip(&b).map(|(x, y)| x + y).collect()
        };
        let sharp = Image::new(31, 31, gaussian(31, 31, 15.0, 15.0, 1.4, 1.0));
        let broad = Image::new(31, 31, wings(2.0));
        let sk = (psf_sigma(&broad).unwrap().powi(2) - psf_sigma(&sharp).unwrap().powi(2)).sqrt();
        let (g_res, free) = matching_kernel(&sharp, &broad, sk);
        let (k, f_res) = free.unwrap();
        assert!(g_res > 1e-3, "{g_res}");
        assert!(f_res < 0.1 * g_res, "{f_res} vs {g_res}");
        assert!((k.data.iter().sum::<f64>() - 1.0).abs() < 1e-9);
        // Exact Gaussians: the engine's Gaussian is already right.
        let g2 = Image::new(31, 31, gaussian(31, 31, 15.0, 15.0, 2.0, 1.0));
        let (g_res, _) = matching_kernel(&sharp, &g2, (4.0f64 - 1.96).sqrt());
        assert!(g_res < 1e-6, "{g_res}");
    }

    #[test]
    fn correlated_noise_factor_limits() {
        let (p, ph) = gaussian_compact(1.5);
        assert!((correlated_noise_factor(&Kernel { half: 0, data: vec![1.0] }, &p, ph) - 1.0).abs() < 1e-12);
        // Continuous limit: 4π σk² σp² / (σp² + σk²) ... for σk = σp = 2: 4π·4·4/8 = 8π.
        let (p, ph) = gaussian_compact(2.0);
        let f = correlated_noise_factor(&Kernel::engine_gaussian(2.0), &p, ph);
        assert!((f / (8.0 * std::f64::consts::PI) - 1.0).abs() < 0.03, "{f}");
    }
}

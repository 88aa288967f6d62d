//! Frames mode of stacking (issue 5): `blink detect` on a night folder stacks the difference
//! frames of each field and band over windows of nights (1, 3, 10, 30 by default) and detects on
//! every stack, as on a frame.
//!
//! Each frame's decorrelated difference (white noise) enters with its variance, the template's
//! part of that variance and its PSF (the measured PSF through the decorrelation filter, as
//! the frame's score uses it). Frames of one field and band sit on their template's grid, so no
//! resampling is needed (`docs/night-format.md`, "Registration").
//!
//! The epochs of a night (frames less than [`NIGHT_GAP_DAYS`] after the night's first) are
//! stacked when the night ends; each window's stack is then the stack of the night stacks it
//! holds ([`crate::stack::Stack::as_epoch`]): memory grows with nights, not with frames. A window
//! is stacked at the end of every night once it holds more nights than the next shorter window
//! (a 30-night window on a 10-night run is the 10-night one, and is not stacked twice).
//!
//! Detections on a stack carry the frame key `stack:<window>:<last frame>` (window `1n`, `3n`,
//! `10n`, `30n`), the MJD of the night's last frame and the usual flags. `blink bench` matches
//! them against the truth of the frames the stack holds (`bench::stacks`).

use std::collections::BTreeMap;

use super::catalog::{flags, Detection};
use super::frame::{self, Difference, FrameMeta, ScoreImage};
use super::psf;
use super::shape;
use crate::stack::{coadd, plan_windows, Stack, StackEpoch};
use crate::subtract::decorr::{decorrelated_psf, PsfImage};

/// Frames of a field and band later than this after the night's first frame start a new night.
pub const NIGHT_GAP_DAYS: f64 = 0.5;

/// The windows' label: `1n`, `3n`, `10n`, `30n`, `2.5n`.
pub fn window_label(nights: f64) -> String {
    if nights.fract() == 0.0 {
        format!("{}n", nights as i64)
    } else {
        format!("{nights}n")
    }
}

/// Parse `1,3,10,30` (nights); `none` or an empty list turns stacking off.
pub fn parse_windows(text: &str) -> Result<Vec<f64>, String> {
    let t = text.trim();
    if t.is_empty() || t.eq_ignore_ascii_case("none") {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    for part in t.split(',') {
        let v: f64 = part.trim().trim_end_matches('n').parse().map_err(|_| format!("window {part:?}: a number of nights, e.g. 1,3,10,30"))?;
        if !(v.is_finite() && (1.0..=3650.0).contains(&v)) {
            return Err(format!("window {v}: between 1 and 3650 nights"));
        }
        out.push(v);
    }
    out.sort_by(f64::total_cmp);
    out.dedup();
    Ok(out)
}

/// What one window's stack at the end of one night produced.
#[derive(Debug, Clone)]
pub struct StackResult {
    /// `stack:<window>:<last frame>`, the detections' `frame`.
    pub key: String,
    pub field: String,
    pub band: String,
    /// Size of the stack, pixels (its frames').
    pub width: usize,
    pub height: usize,
    /// Window length, nights, and its label.
    pub nights: f64,
    pub window: String,
    /// The frames stacked (manifest `file`s), in time order.
    pub frames: Vec<String>,
    /// MJD of the last frame.
    pub mjd: f64,
    pub detections: Vec<Detection>,
    /// Robust σ of the stack's score over usable pixels (1 for an honest variance).
    pub score_sigma: f64,
    /// The score image and its mask (true: no data), when the stacker keeps them
    /// ([`FrameStacker::keep_scores`]; `blink bench` measures the scatter on empty sky).
    pub score_image: Option<(Vec<f32>, Vec<bool>)>,
}

/// What the stacker needs of one frame besides its difference.
#[derive(Debug, Clone)]
pub struct FrameInfo<'a> {
    pub frame: &'a str,
    pub field: &'a str,
    pub band: &'a str,
    pub mjd: f64,
    pub zero_point: Option<f64>,
    pub wcs: Option<crate::sim::night::wcs::TanWcs>,
    pub aperture_correction: f64,
    /// The template's point sources and the factor to this frame's flux units (the
    /// `residual` flag on the stacks, which are in the field's first frame's units).
    pub point_sources: Option<(&'a super::sources::PointSources, f64)>,
    /// The template's sky-subtracted pixels and the factor to this frame's flux units: the
    /// template light beside a stack's detection, for the `broad` flag ([`shape`]).
    pub template_model: Option<(&'a [f32], f64)>,
}

/// The path of the template's noise into one frame's decorrelated difference, as a kernel
/// image: `f·σ_T·(φ ⊗ κ)` when the template was the convolved image, `f·σ_T·φ` when it was not
/// (`f` the frame's zero-point scaling, `σ_T` the template's sky noise), with the frame's
/// weight in its night (`1 / median variance`, as the coadd weighs it).
#[derive(Debug, Clone)]
struct TemplatePath {
    side: usize,
    kernel: Vec<f64>,
    weight: f64,
    /// The decorrelated difference's white noise level in the kernel's units (the filter's
    /// `σ_u² + κ̂(0)²σ_c²`, times `f²`): `Σ kernel²` over it is the template's share of the
    /// difference's per-pixel variance.
    white: f64,
    /// The frame's median per-pixel variance, in the stack's units (`f²` included): what
    /// `white` is there.
    var: f64,
}

/// One night of one field and band, and the frames in it.
struct Night {
    /// The frames' template paths, weights normalised to sum 1 within the night.
    paths: Vec<TemplatePath>,
    frames: Vec<String>,
    /// MJD of the night's first frame.
    start: f64,
    stack: StackEpoch,
}

/// One field and band.
struct Group {
    field: String,
    band: String,
    /// Frames of the night being observed, not yet stacked.
    open: Vec<(String, StackEpoch, Option<TemplatePath>)>,
    open_start: f64,
    nights: Vec<Night>,
    /// Saturated pixels of any frame (the stacks' `saturated` flag), and the last frame's
    /// meta data for the catalogue.
    saturated: Vec<bool>,
    sigma_difference: f64,
    /// The first frame's zero point: every epoch is scaled to it, and stack fluxes are in it.
    zero_point: Option<f64>,
    wcs: Option<crate::sim::night::wcs::TanWcs>,
    aperture_correction: f64,
    /// The first frame's [`FrameInfo::point_sources`].
    point_sources: Option<(super::sources::PointSources, f64)>,
    /// The first frame's [`FrameInfo::template_model`], in its flux units.
    model: Option<Vec<f32>>,
    /// Per point source of `point_sources`, each frame's PSF flux at its centre (MJD, flux,
    /// variance; in the field's first frame's units), for [`flag_steady_residuals`]; kept as
    /// long as the nights.
    star_fluxes: Vec<Vec<(f64, f64, f64)>>,
}

/// Stacks frames as they come (in time order within each field and band).
pub struct FrameStacker {
    /// Keep each stack's score image in [`StackResult::score_image`].
    pub keep_scores: bool,
    windows: Vec<f64>,
    threshold: f64,
    groups: BTreeMap<(String, String), Group>,
    longest: f64,
}

impl FrameStacker {
    pub fn new(windows: &[f64], threshold: f64) -> FrameStacker {
        let longest = windows.iter().cloned().fold(0.0, f64::max);
        FrameStacker { keep_scores: false, windows: windows.to_vec(), threshold, groups: BTreeMap::new(), longest }
    }

    /// Add one frame's difference (`q`: its PSF through the decorrelation filter,
    /// [`decorrelated_frame_psf`]). Returns the stacks of every night that this frame's arrival
    /// ended. A frame without a decorrelated difference or `q` is left out, with a warning.
    /// `detections` are the frame's own: around those flagged sharp or streak (a cosmic ray,
    /// a hot pixel, a satellite) the frame is masked before it enters the stacks, so an
    /// artifact of one epoch, or one that sits on the same pixel in every epoch, does not add up.
    pub fn add(&mut self, info: &FrameInfo<'_>, diff: &Difference, q: Option<&PsfImage>, detections: &[Detection]) -> Vec<StackResult> {
        let Some((mut epoch, mut path)) = q.and_then(|q| epoch_of(diff, q, info.mjd, info.band)) else {
            tracing::warn!(frame = info.frame, "no decorrelated difference: the frame is left out of the stacks");
            return Vec::new();
        };
        mask_artifacts(&mut epoch, detections, diff.sigma_difference * frame::FWHM_PER_SIGMA);
        let key = (info.field.to_string(), info.band.to_string());
        let mut out = Vec::new();
        let g = self.groups.entry(key).or_insert_with(|| Group {
            field: info.field.to_string(),
            band: info.band.to_string(),
            open: Vec::new(),
            open_start: info.mjd,
            nights: Vec::new(),
            saturated: vec![false; diff.width * diff.height],
            sigma_difference: diff.sigma_difference,
            zero_point: info.zero_point,
            wcs: info.wcs,
            aperture_correction: info.aperture_correction,
            point_sources: info.point_sources.map(|(s, f)| (s.clone(), f)),
            star_fluxes: Vec::new(),
            model: info.template_model.filter(|(m, f)| m.len() == diff.width * diff.height && f.is_finite()).map(|(m, f)| m.iter().map(|v| (*v as f64 * f) as f32).collect()),
        });
        if g.saturated.len() != diff.width * diff.height {
            tracing::warn!(frame = info.frame, "the frame's size differs from its field's earlier frames: left out of the stacks");
            return out;
        }
        // Every epoch on the field's first zero point: a steady source has one flux in the stack.
        if let (Some(zp), Some(zp0)) = (info.zero_point, g.zero_point) {
            let f = 10f64.powf(-0.4 * (zp - zp0));
            if f.is_finite() && f > 0.0 && f != 1.0 {
                let (f, f2) = (f as f32, (f * f) as f32);
                epoch.diff.iter_mut().for_each(|v| *v *= f);
                epoch.var.iter_mut().for_each(|v| *v *= f2);
                epoch.var_template.iter_mut().for_each(|v| *v *= f2);
                if let Some(p) = path.as_mut() {
                    p.kernel.iter_mut().for_each(|v| *v *= f as f64);
                    p.weight /= (f * f) as f64;
                    p.white *= (f * f) as f64;
                    p.var *= (f * f) as f64;
                }
            }
        }
        if !g.open.is_empty() && info.mjd - g.open_start > NIGHT_GAP_DAYS {
            out.extend(close_night(g, &self.windows, self.longest, self.threshold, self.keep_scores));
        }
        if g.open.is_empty() {
            g.open_start = info.mjd;
        }
        g.saturated.iter_mut().zip(&diff.saturated).for_each(|(a, b)| *a |= *b);
        g.sigma_difference = diff.sigma_difference;
        g.zero_point = g.zero_point.or(info.zero_point);
        g.wcs = info.wcs.or(g.wcs);
        g.aperture_correction = info.aperture_correction;
        if let Some((sources, _)) = &g.point_sources {
            g.star_fluxes.resize(sources.all().len(), Vec::new());
            for (s, rec) in sources.all().iter().zip(g.star_fluxes.iter_mut()) {
                if let Some((f, v)) = psf_flux(&epoch, s.x, s.y) {
                    rec.push((info.mjd, f, v));
                }
            }
        }
        g.open.push((info.frame.to_string(), epoch, path));
        out
    }

    /// Close every open night (the end of the run) and return their stacks.
    pub fn finish(&mut self) -> Vec<StackResult> {
        let mut out = Vec::new();
        for g in self.groups.values_mut() {
            if !g.open.is_empty() {
                out.extend(close_night(g, &self.windows, self.longest, self.threshold, self.keep_scores));
            }
        }
        out
    }
}

/// The StackEpoch of a frame: the decorrelated difference (NaN where masked), its variance,
/// the template's share of it and the PSF through the decorrelation filter.
fn epoch_of(diff: &Difference, q: &PsfImage, mjd: f64, band: &str) -> Option<(StackEpoch, Option<TemplatePath>)> {
    let dc = diff.decorrelated.as_ref()?;
    let share = template_share(diff, &dc.kernel, q);
    tracing::debug!(share, "template share of the difference's matched-filter variance");
    let ok = |v: f32| v > 0.0 && v.is_finite();
    let d = dc.difference.iter().zip(&dc.variance).map(|(d, v)| if ok(*v) { *d } else { f32::NAN }).collect();
    let v: Vec<f32> = dc.variance.iter().map(|v| if ok(*v) { *v } else { f32::NAN }).collect();
    let vt = v.iter().map(|v| (*v as f64 * share) as f32).collect();
    let path = template_path(diff, &dc.kernel, median_finite(&v));
    Some((StackEpoch { width: diff.width, height: diff.height, diff: d, var: v, var_template: vt, psf: q.clone(), mjd, band: band.to_string(), dx: 0.0, dy: 0.0 }, path))
}

/// A frame's difference PSF through its decorrelation filter (what its decorrelated difference
/// shows a point source as), trimmed where it falls below 1e-4 of its peak: from the measured
/// PSF `psf`, or a Gaussian of the difference's width without one. `None` without a
/// decorrelated difference.
pub fn decorrelated_frame_psf(diff: &Difference, psf: Option<&PsfImage>) -> Option<PsfImage> {
    let dc = diff.decorrelated.as_ref()?;
    let p = match psf {
        Some(p) => p.clone(),
        None => gaussian_psf(diff.sigma_difference),
    };
    Some(psf::trimmed(&decorrelated_psf(&dc.kernel, &p.pixels, p.side).ok()?, 1e-4))
}

/// Median of the finite values (NaN when none).
fn median_finite(v: &[f32]) -> f64 {
    let mut f: Vec<f32> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if f.is_empty() {
        return f64::NAN;
    }
    let mid = f.len() / 2;
    *f.select_nth_unstable_by(mid, |a, b| a.total_cmp(b)).1 as f64
}

/// The template's noise path into a frame's decorrelated difference ([`TemplatePath`]), its
/// weight `1 / median_var`.
fn template_path(diff: &Difference, dk: &crate::subtract::decorr::DecorrelationKernel, median_var: f64) -> Option<TemplatePath> {
    use crate::subtract::decorr::convolve_full;
    let nm = &diff.noise;
    let (kernel, side, var) = if diff.convolved_template {
        (convolve_full(&dk.kernel, dk.side(), &nm.kernel, nm.kernel_side), dk.side() + nm.kernel_side - 1, dk.var_convolved)
    } else {
        (dk.kernel.clone(), dk.side(), dk.var_unconvolved)
    };
    let sigma = var.max(0.0).sqrt();
    let weight = 1.0 / median_var;
    let white = dk.output_variance();
    (sigma > 0.0 && weight.is_finite() && weight > 0.0 && white.is_finite() && white > 0.0)
        .then(|| TemplatePath { side, kernel: kernel.iter().map(|k| k * sigma).collect(), weight, white, var: median_var })
}

/// How much of the template term a stack's coadd counts is really there, for the filter `q`.
/// The coadd takes every epoch's template noise as one and the same (fully correlated): with
/// the epochs' filtered template paths `h_i = q ⋆ p_i` and their weights `c_i` it counts
/// `(Σ c_i ‖h_i‖)²`. The true variance is `‖Σ c_i h_i‖²`, smaller when the epochs' kernels
/// differ (different seeing spreads the same template noise differently). Returns the ratio,
/// in (0, 1], or 1 when the paths are unknown.
fn template_correlation(paths: &[(f64, &TemplatePath)], q: &PsfImage) -> f64 {
    use crate::subtract::decorr::convolve_full;
    let Some(side) = paths.iter().map(|(_, p)| p.side).max() else { return 1.0 };
    let qf: Vec<f64> = q.pixels.iter().rev().copied().collect();
    let out = side + q.side - 1;
    let mut sum = vec![0.0; out * out];
    let mut assumed = 0.0;
    for (c, p) in paths {
        let h = convolve_full(&qf, q.side, &p.kernel, p.side);
        // Centred on the common grid (sides are odd, so the offset is whole).
        let (hs, off) = (q.side + p.side - 1, (side - p.side) / 2);
        let norm: f64 = h.iter().map(|v| v * v).sum::<f64>().sqrt();
        assumed += c * norm;
        for y in 0..hs {
            for x in 0..hs {
                sum[(y + off) * out + x + off] += c * h[y * hs + x];
            }
        }
    }
    let exact: f64 = sum.iter().map(|v| v * v).sum();
    let r = exact / (assumed * assumed);
    if r.is_finite() && r > 0.0 {
        r.min(1.0)
    } else {
        1.0
    }
}

/// A stack's whitening filter ([`whitening`]).
#[derive(Debug, Clone)]
struct Whitening {
    /// The filter `w` (`ŵ(k) = sqrt(N(0) / N(k))`), on a centred odd box, unit sum.
    kernel: PsfImage,
    /// `N(0)`: the whitened stack's per-pixel variance (white), where the epochs have their
    /// median variance.
    level: f64,
    /// `max ŵ / min ŵ`: 1 for a stack whose noise is white already.
    range: f64,
    /// The point-source SNR the whitened stack's matched filter gains over the plain one's,
    /// for the stack's PSF `Q`: `sqrt(Σ|Q̂|²/N · Σ|Q̂|²N) / Σ|Q̂|²` (≥ 1; Cauchy–Schwarz).
    gain: f64,
}

/// Stacks are whitened only where that gains at least this factor in SNR: where the epochs'
/// paths are alike (the template sharper than the frames, so each frame's kernel convolves
/// it), the noise is white to a few percent, whitening gains well under 1%, and its variance
/// model would only replace the one it matches ([`template_correlation`]).
pub const WHITEN_MIN_GAIN: f64 = 1.01;

/// The noise spectrum of a stack of decorrelated differences, and the filter that makes it
/// white. Each epoch's difference is white on its own (its decorrelation filter saw to it), at
/// its median variance `V_i`; of that, its template path `T_i` (`σ_T φ_i`, or `σ_T φ_i ⊗ κ_i`
/// where the template was convolved) carries the template's noise, `|T̂_i(k)|²`, the rest
/// being the epoch's own science noise. The science noise averages down in the stack; the
/// template's is one and the same in every epoch and adds coherently, through each epoch's
/// path. With the coadd's weights `c_i` (`Σ c_i = 1`):
///
/// ```text
/// N(k) = Σ c_i² (V_i − |T̂_i(k)|²) + |Σ c_i T̂_i(k)|²
/// ```
///
/// When the science frames were the convolved images, `φ_i` lifts the high frequencies, where
/// only the template's noise is left: a stack of many such epochs is dominated there by noise
/// that does not average down, which a matched filter that takes the stack as white leans on.
/// Filtering the stack by `ŵ = sqrt(N(0)/N(k))` (as each frame's decorrelation does for its
/// own difference) makes its noise white at `N(0)` per pixel, so the stack's matched filter,
/// with its PSF through `w` as well, is the optimal one for that spectrum (`bench::stacks`
/// computes the ideal SNR the same way). One epoch, or epochs whose paths are alike, give a
/// flat `N` and `w = δ`. `None` when a path or weight is unusable.
fn whitening(paths: &[(f64, &TemplatePath)], q: &PsfImage) -> Option<Whitening> {
    use crate::subtract::decorr::Fft2;
    use rustfft::num_complex::Complex;
    let side = paths.iter().map(|(_, p)| p.side).max()?;
    let n = (2 * side).max(q.side).max(64).next_power_of_two();
    let fft = Fft2::<f64>::new(n, n);
    let zero = Complex::new(0.0, 0.0);
    let mut coherent = vec![zero; n * n];
    let mut science = vec![0.0f64; n * n];
    let wrap = |i: i64| i.rem_euclid(n as i64) as usize;
    // The transform of a centred odd-sided kernel image, its centre at the grid's origin.
    let spectrum = |pixels: &[f64], side: usize| -> Vec<Complex<f64>> {
        let h = (side / 2) as i64;
        let mut g = vec![zero; n * n];
        for v in -h..=h {
            for u in -h..=h {
                g[wrap(v) * n + wrap(u)].re = pixels[((v + h) * side as i64 + u + h) as usize];
            }
        }
        fft.forward(&mut g);
        g
    };
    for (c, p) in paths {
        if !(c.is_finite() && *c >= 0.0 && p.var.is_finite() && p.var > 0.0 && p.white > 0.0 && p.kernel.len() == p.side * p.side) {
            return None;
        }
        let g = spectrum(&p.kernel, p.side);
        // The path in the stack's units: the epoch's white level is `white` in the kernel's.
        let s = (p.var / p.white).sqrt();
        for ((t, sci), coh) in g.iter().zip(science.iter_mut()).zip(coherent.iter_mut()) {
            let tau = (t.norm_sqr() / p.white).min(1.0);
            *sci += c * c * p.var * (1.0 - tau);
            *coh += t * (c * s);
        }
    }
    let power: Vec<f64> = science.iter().zip(&coherent).map(|(s, c)| s + c.norm_sqr()).collect();
    let level = power[0];
    if !(level.is_finite() && level > 0.0) {
        return None;
    }
    let power: Vec<f64> = power.iter().map(|p| p.max(1e-12 * level)).collect();
    let qg = spectrum(&q.pixels, q.side);
    let (mut q2, mut q2_over, mut q2_times) = (0.0, 0.0, 0.0);
    for (c, p) in qg.iter().zip(&power) {
        let a = c.norm_sqr();
        q2 += a;
        q2_over += a / p;
        q2_times += a * p;
    }
    let gain = (q2_over * q2_times).sqrt() / q2;
    let mut g: Vec<Complex<f64>> = power.iter().map(|p| Complex::new((level / p).sqrt(), 0.0)).collect();
    let (lo, hi) = g.iter().fold((f64::INFINITY, 0.0f64), |(lo, hi), c| (lo.min(c.re), hi.max(c.re)));
    fft.inverse(&mut g);
    let half = (2 * side).min(n / 2 - 1) as i64;
    let box_side = 2 * half as usize + 1;
    let mut pixels = vec![0.0; box_side * box_side];
    for v in -half..=half {
        for u in -half..=half {
            pixels[((v + half) * box_side as i64 + u + half) as usize] = g[wrap(v) * n + wrap(u)].re;
        }
    }
    Some(Whitening { kernel: psf::trimmed(&PsfImage { side: box_side, pixels }, 1e-6), level, range: hi / lo, gain })
}

/// Whiten `stack` by `wh` ([`whitening`]) and set its variance to the white level, scaled by
/// each pixel's variance over the stack's median (a star's, a masked neighbour's). Masked
/// pixels enter the filter as 0 (a difference's mean) and stay masked.
fn whiten(stack: &mut Stack, wh: &Whitening) {
    let m = median_finite(&stack.var);
    if !(m.is_finite() && m > 0.0) {
        return;
    }
    if wh.range > 1.0 + 1e-3 {
        let (w, h) = (stack.width, stack.height);
        let k = &wh.kernel;
        let a: Vec<f64> = stack.image.iter().map(|v| if v.is_finite() { *v as f64 } else { 0.0 }).collect();
        // `correlate_pair` correlates; the kernel flipped, it convolves.
        let flipped: Vec<f64> = k.pixels.iter().rev().copied().collect();
        let (out, _) = psf::correlate_pair(&a, &vec![0.0; w * h], w, h, &flipped, &vec![0.0; k.pixels.len()], k.side);
        for (d, o) in stack.image.iter_mut().zip(out) {
            if d.is_finite() {
                *d = o as f32;
            }
        }
        let q = crate::subtract::decorr::convolve_full(&stack.psf.pixels, stack.psf.side, &k.pixels, k.side);
        stack.psf = psf::trimmed(&PsfImage { side: stack.psf.side + k.side - 1, pixels: q }, 1e-4);
    }
    let f = (wh.level / m) as f32;
    stack.var.iter_mut().for_each(|v| *v *= f);
    stack.var_template.iter_mut().for_each(|v| *v *= f);
}

/// The template term of `stack` scaled by `r` ([`template_correlation`]).
fn scale_template_term(stack: &mut Stack, r: f64) {
    if r >= 1.0 {
        return;
    }
    let r = r as f32;
    for (v, vt) in stack.var.iter_mut().zip(stack.var_template.iter_mut()) {
        if v.is_finite() && vt.is_finite() {
            *v -= (1.0 - r) * *vt;
            *vt *= r;
        }
    }
}

/// The template's share of the matched filter's variance on the decorrelated difference. The
/// template's noise reaches the difference through the decorrelation filter φ, and through the
/// matching kernel κ too when the template is the convolved image; the science's the same way.
/// For a filter `q` (the difference's PSF through φ), an image of white noise `σ²` that goes
/// through `f` adds `σ² Σ (q ⋆ f)²` to the filter's variance. Per pixel, the template's share of
/// the variance is far smaller (κ spreads its noise), but it is correlated over the PSF: what
/// stacks need is its share of what a point-source filter sees.
fn template_share(diff: &Difference, dk: &crate::subtract::decorr::DecorrelationKernel, q: &PsfImage) -> f64 {
    use crate::subtract::decorr::convolve_full;
    let nm = &diff.noise;
    let phi_side = dk.side();
    // q ⋆ f = q ⊗ f(−·); Σ (q ⋆ f)² = Σ (q_flipped ⊗ f)², flipping q instead of f.
    let qf: Vec<f64> = q.pixels.iter().rev().copied().collect();
    let power = |f: &[f64], side: usize| -> f64 { convolve_full(&qf, q.side, f, side).iter().map(|v| v * v).sum() };
    let through_phi = power(&dk.kernel, phi_side);
    let phi_kappa = convolve_full(&dk.kernel, phi_side, &nm.kernel, nm.kernel_side);
    let through_both = power(&phi_kappa, phi_side + nm.kernel_side - 1);
    let (vu, vc) = (dk.var_unconvolved.max(0.0) * through_phi, dk.var_convolved.max(0.0) * through_both);
    let (vt, vs) = if diff.convolved_template { (vc, vu) } else { (vu, vc) };
    if vt + vs > 0.0 && (vt + vs).is_finite() {
        vt / (vt + vs)
    } else {
        0.0
    }
}

/// A night's pixel more than this many σ above the mean of the night's other epochs is an
/// outlier (a cosmic ray the frame's flags missed) and is masked in its epoch.
pub const CLIP_SIGMA: f64 = 6.0;
/// Pixels around an outlier masked with it: the decorrelation filter spreads it a little.
pub const CLIP_GROW: usize = 2;
/// Where the night's other exposures show a source (their mean at ≥ this many σ, within
/// [`CLIP_GROW`] pixels) nothing is clipped: a source's core in an exposure of sharper seeing,
/// or its wings in one of broader seeing, stand far above the others' mean without being
/// cosmic rays. Without this, every bright transient's core or wings were clipped in some
/// exposure, and the stacks measured it low: on a default simulated night (seed 2) the
/// 1-night stacks' |score| / ideal SNR was 0.77 for targets of SNR 50–100. A cosmic ray on a
/// source is left to the frame's own flags (`sharp`, `streak`), which mask it. A source is a
/// pixel and one of its four neighbours both at ≥ 4σ of the same sign: pure noise puts a single
/// pixel there at 6·10⁻⁵ of pixels, which with the growth left about 0.2% of a frame's area
/// unclipped for nothing (and a cosmic ray beside such a pixel in the unit test, 1 run in
/// 300); a pair of neighbours, 10⁻⁸. Any source whose core a sharper exposure can lift 6σ
/// above the others' mean peaks at ~9σ there, its neighbours well above 4σ.
pub const CLIP_SOURCE_SIGMA: f64 = 4.0;

/// Per pixel, with at least three usable epochs: an epoch whose value lies more than `k` σ
/// above the inverse-variance mean of the others (σ from both variances) is masked there, the
/// mask grown by `grow` pixels in that epoch, except where the others show a source
/// ([`CLIP_SOURCE_SIGMA`]). Only upward: what a single exposure adds that its
/// night's other exposures lack is a cosmic ray or a flash, which the frame itself reports; a
/// transient seen in every exposure is never clipped. Returns the pixels masked.
// One pixel index runs over every epoch's planes and the hit masks at once.
#[allow(clippy::needless_range_loop)]
pub fn clip_outliers(epochs: &mut [StackEpoch], k: f64, grow: usize) -> usize {
    let n = epochs.len();
    if n < 3 {
        return 0;
    }
    let (w, h) = (epochs[0].width, epochs[0].height);
    if epochs.iter().any(|e| e.width != w || e.height != h) {
        return 0;
    }
    // Per pixel, the inverse-variance sums over the usable epochs and their count.
    let mut sums = vec![(0.0f64, 0.0f64, 0usize); w * h];
    for e in epochs.iter() {
        for (i, s) in sums.iter_mut().enumerate() {
            let (d, v) = (e.diff[i], e.var[i]);
            if d.is_finite() && v > 0.0 {
                s.0 += 1.0 / v as f64;
                s.1 += d as f64 / v as f64;
                s.2 += 1;
            }
        }
    }
    let mut hits: Vec<Vec<bool>> = vec![vec![false; w * h]; n];
    let mut any = false;
    for (e, hit) in epochs.iter().zip(hits.iter_mut()) {
        // The others' mean and its σ at every pixel, and where it shows a source.
        let mut others = vec![(0.0f64, 0.0f64); w * h];
        let mut signif = vec![0.0f64; w * h];
        for i in 0..w * h {
            let (sw, swd, cnt) = sums[i];
            let (d, v) = (e.diff[i], e.var[i]);
            let usable = d.is_finite() && v > 0.0;
            let (ow, owd) = if usable { (sw - 1.0 / v as f64, swd - d as f64 / v as f64) } else { (sw, swd) };
            if cnt < 3 || ow <= 0.0 {
                continue;
            }
            let mean = owd / ow;
            others[i] = (mean, ow);
            signif[i] = mean * ow.sqrt();
        }
        let strong = |i: usize, sign: f64| signif[i] * sign >= CLIP_SOURCE_SIGMA;
        let source: Vec<bool> = (0..w * h)
            .map(|i| {
                let (x, y) = (i % w, i / w);
                let sign = signif[i].signum();
                strong(i, sign) && ((x > 0 && strong(i - 1, sign)) || (x + 1 < w && strong(i + 1, sign)) || (y > 0 && strong(i - w, sign)) || (y + 1 < h && strong(i + w, sign)))
            })
            .collect();
        let near_source = crate::cpu::frame::grow(&source, w, h, grow);
        for i in 0..w * h {
            let (d, v) = (e.diff[i], e.var[i]);
            let (mean, ow) = others[i];
            if !(d.is_finite() && v > 0.0) || ow <= 0.0 || near_source[i] {
                continue;
            }
            if (d as f64 - mean) > k * (v as f64 + 1.0 / ow).sqrt() {
                hit[i] = true;
                any = true;
            }
        }
    }
    if !any {
        return 0;
    }
    let mut masked = 0;
    for (e, hit) in epochs.iter_mut().zip(&hits) {
        let grown = crate::cpu::frame::grow(hit, w, h, grow);
        for (i, g) in grown.iter().enumerate() {
            if *g && e.diff[i].is_finite() {
                e.diff[i] = f32::NAN;
                e.var[i] = f32::NAN;
                e.var_template[i] = f32::NAN;
                masked += 1;
            }
        }
    }
    masked
}

/// Mask (NaN) a box around every detection flagged [`flags::SHARP`] or [`flags::STREAK`]:
/// `1.5 FWHM` (at least 3 px) for a sharp one, 5 px more for a streak (up to 10 px long).
fn mask_artifacts(e: &mut StackEpoch, detections: &[Detection], fwhm: f64) {
    let (w, h) = (e.width as i64, e.height as i64);
    for d in detections.iter().filter(|d| d.flags & (flags::SHARP | flags::STREAK) != 0) {
        let r = (1.5 * fwhm).ceil().max(3.0) as i64 + if d.flags & flags::STREAK != 0 { 5 } else { 0 };
        let (cx, cy) = (d.x.round() as i64, d.y.round() as i64);
        for y in (cy - r).max(0)..=(cy + r).min(h - 1) {
            for x in (cx - r).max(0)..=(cx + r).min(w - 1) {
                let i = (y * w + x) as usize;
                e.diff[i] = f32::NAN;
                e.var[i] = f32::NAN;
                e.var_template[i] = f32::NAN;
            }
        }
    }
}

/// A unit-sum Gaussian PSF image of `sigma` (±4σ).
fn gaussian_psf(sigma: f64) -> PsfImage {
    let s = sigma.max(0.3);
    PsfImage::gaussian(2 * (4.0 * s).ceil() as usize + 1, s, 0.0, 0.0)
}

/// Stack the group's open night, keep it, and detect on every window that ends with it.
fn close_night(g: &mut Group, windows: &[f64], longest: f64, threshold: f64, keep: bool) -> Vec<StackResult> {
    let open = std::mem::take(&mut g.open);
    let frames: Vec<String> = open.iter().map(|(f, _, _)| f.clone()).collect();
    // Every frame's template path, or none for the night (one unknown path and the
    // correction is left out).
    let mut paths: Vec<TemplatePath> = open.iter().filter_map(|(_, _, p)| p.clone()).collect();
    if paths.len() != open.len() {
        paths.clear();
    }
    let total: f64 = paths.iter().map(|p| p.weight).sum();
    paths.iter_mut().for_each(|p| p.weight /= total);
    let mut epochs: Vec<StackEpoch> = open.into_iter().map(|(_, e, _)| e).collect();
    clip_outliers(&mut epochs, CLIP_SIGMA, CLIP_GROW);
    let now = epochs.iter().map(|e| e.mjd).fold(f64::NEG_INFINITY, f64::max);
    let night = match coadd(&epochs) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(field = %g.field, band = %g.band, "stacking a night failed ({e}); its frames are left out of the stacks");
            return Vec::new();
        }
    };
    drop(epochs);
    g.nights.push(Night { paths, frames, start: g.open_start, stack: night.as_epoch(now, &g.band) });
    // Nights beyond the longest window are no longer needed.
    let start = g.open_start;
    g.nights.retain(|n| start - n.start < longest);
    let oldest = g.nights.first().map_or(start, |n| n.start);
    g.star_fluxes.iter_mut().for_each(|r| r.retain(|(mjd, _, _)| *mjd >= oldest));
    // A window of W nights holds the nights that began less than W − ½ days before this one
    // (nights about a day apart: this one and the W − 1 before it). `plan_windows` adds its
    // tolerance to every window, so it is taken off here.
    let at_start: Vec<StackEpoch> = g.nights.iter().map(|n| StackEpoch { mjd: n.start, ..n.stack.clone() }).collect();
    let shifted: Vec<(f64, f64)> = windows.iter().map(|w| (w - 0.5 - crate::stack::WINDOW_TOLERANCE, *w)).collect();
    let plans = plan_windows(&at_start, start, &shifted.iter().map(|s| s.0).collect::<Vec<_>>());
    let mut out = Vec::new();
    for plan in &plans {
        if plan.same_as.is_some() {
            continue;
        }
        let Some(&(_, nights)) = shifted.iter().find(|s| s.0 == plan.nights) else { continue };
        let members: Vec<&Night> = plan.epochs.iter().map(|&i| &g.nights[i]).collect();
        // A window of this night alone is the night stack itself.
        let mut stack: Stack = if members.len() == 1 {
            night.clone()
        } else {
            let eps: Vec<StackEpoch> = members.iter().map(|n| n.stack.clone()).collect();
            match coadd(&eps) {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!("stacking {} nights failed: {e}", members.len());
                    continue;
                }
            }
        };
        // The template term as the frames' kernels really correlate it: each frame weighs its
        // night's weight (1 / median variance of the night stack) times its weight in the night.
        if members.iter().all(|n| !n.paths.is_empty()) {
            let nw: Vec<f64> = members.iter().map(|n| 1.0 / median_finite(&n.stack.var)).collect();
            let tot: f64 = nw.iter().sum();
            let weighted: Vec<(f64, &TemplatePath)> = members.iter().zip(&nw).flat_map(|(n, w)| n.paths.iter().map(move |p| (w / tot * p.weight, p))).collect();
            if tot.is_finite() && tot > 0.0 {
                match whitening(&weighted, &stack.psf) {
                    Some(wh) if wh.gain >= WHITEN_MIN_GAIN => {
                        tracing::debug!(window = nights, level = wh.level, range = wh.range, gain = wh.gain, side = wh.kernel.side, "stack whitened against its noise spectrum");
                        whiten(&mut stack, &wh);
                    }
                    wh => {
                        tracing::debug!(window = nights, gain = wh.map(|w| w.gain), "stack noise white enough: not whitened");
                        let r = template_correlation(&weighted, &stack.psf);
                        tracing::debug!(window = nights, r, "template term: measured correlation of the frames' template noise");
                        scale_template_term(&mut stack, r);
                    }
                }
            }
        }
        let stack = &stack;
        let mut frames: Vec<String> = members.iter().flat_map(|n| n.frames.iter().cloned()).collect();
        frames.sort();
        let label = window_label(nights);
        let last = g.nights.last().and_then(|n| n.frames.last()).cloned().unwrap_or_default();
        let key = format!("stack:{label}:{last}");
        let (mut detections, score_sigma, score) = detect_on(stack, g, &key, now, threshold);
        if let Some((sources, scale)) = &g.point_sources {
            let first = members.iter().map(|n| n.start).fold(f64::INFINITY, f64::min);
            flag_steady_residuals(&mut detections, members.len(), sources, *scale, &g.star_fluxes, first);
        }
        let score_image = keep.then(|| (score, stack.var.iter().map(|v| !(*v > 0.0 && v.is_finite())).collect()));
        out.push(StackResult { key, field: g.field.clone(), band: g.band.clone(), width: stack.width, height: stack.height, nights, window: label, frames, mjd: now, detections, score_sigma, score_image });
    }
    out
}

/// A detection on a star's centre is what the subtraction left of the star when the star's
/// PSF flux in the difference frames scatters by less than this fraction of the star's flux
/// (robust σ, beyond the noise) and the detection's own flux is under
/// [`STEADY_MAX_FRACTION`] of the star's. Measured on simulated nights (robust
/// σ over the frames, stars whose noise is under 2% of their flux): static stars 0–2.4%
/// (default nights, seed 1) and 0–3.6% (30 nights of 1024²); variable stars, whose amplitudes
/// are 10–60%, 7.2% (a saturated one) and 13.6% and up.
pub const STEADY_FRACTION: f64 = 0.05;
/// The steadiness test needs a window of this many nights (within one night a slow variable
/// looks steady).
pub const STEADY_MIN_NIGHTS: usize = 3;
/// The steadiness test takes detections up to this fraction of the star's flux (as
/// `detect::sources` estimates it, `peak · 2πσ²`, which gives a Moffat star of β 3.5 about two
/// thirds of its light: the 30-night run's steady residuals reached 2.0–2.3% of that).
pub const STEADY_MAX_FRACTION: f64 = 0.04;
/// A star whose median flux over the last third of the window's frames differs from the first
/// third's by more than this many σ (and by 2% of the star) is brightening or fading: a
/// transient on the star (a microlensing event's rise), not steady.
pub const TREND_SIGMA: f64 = 4.0;

/// Flag `residual` the detections of a stack of `nights` nights that sit on a template star
/// (within [`super::sources::CENTRED_PX`]), are fainter than [`STEADY_MAX_FRACTION`] of it and
/// whose star does not change from frame to frame (`star_fluxes`: every frame kept) by more
/// than [`STEADY_FRACTION`] of it beyond the noise, nor drifts over the window's frames (from
/// MJD `since` on; [`TREND_SIGMA`]): a star's
/// residual, which the stack's depth lifts to 5σ, not a variable star (whose frames scatter by
/// its amplitude, even where a short period averages out over a night) or a transient on the
/// star.
fn flag_steady_residuals(dets: &mut [Detection], nights: usize, sources: &super::sources::PointSources, scale: f64, star_fluxes: &[Vec<(f64, f64, f64)>], since: f64) {
    if nights < STEADY_MIN_NIGHTS || !(scale.is_finite() && scale > 0.0) {
        return;
    }
    for d in dets.iter_mut().filter(|d| d.flags & super::catalog::ARTIFACT_FLAGS == 0) {
        // The brightest star under the detection.
        let Some((k, star)) = sources.within_indexed(d.x, d.y, super::sources::CENTRED_PX).map(|(k, s)| (k, s.flux * scale)).max_by(|a, b| a.1.total_cmp(&b.1)) else { continue };
        if !(d.flux.abs() < STEADY_MAX_FRACTION * star) {
            continue;
        }
        // The scatter over every frame kept (up to the longest window), not the window's alone:
        // a variable star of a long period sits at its maximum for a few nights.
        let all: &[(f64, f64, f64)] = star_fluxes.get(k).map_or(&[], |v| v.as_slice());
        let frames: Vec<(f64, f64)> = all.iter().filter(|r| r.0 >= since).map(|r| (r.1, r.2)).collect();
        if frames.len() < STEADY_MIN_NIGHTS {
            continue;
        }
        // Robust: a frame or two whose kernel failed at the star (the worst seeing) would
        // make a steady star look variable.
        let (Some(scatter), Some(noise)) = (robust_sigma(all.iter().map(|f| f.1)), median_of(all.iter().map(|f| f.2))) else { continue };
        let scatter = scatter * scatter;
        tracing::debug!(x = d.x, y = d.y, flux = d.flux, star, frames = frames.len(), scatter = scatter.sqrt() / star, noise = noise.sqrt() / star, "a stack detection on a star: the star's frame-to-frame scatter");
        let third = frames.len() / 3;
        let (Some(first), Some(last)) = (median_of(frames[..third].iter().map(|f| f.0)), median_of(frames[frames.len() - third..].iter().map(|f| f.0))) else { continue };
        // The frames' σ about a slow change, from successive differences of every frame kept
        // (a short window's few give a noisy σ); that of a median of `third` values is
        // 1.2533 σ / √third.
        let Some(sd) = robust_sigma(all.windows(2).map(|w| w[1].1 - w[0].1)) else { continue };
        let trend = (last - first).abs() > (TREND_SIGMA * 1.2533 * sd / std::f64::consts::SQRT_2 * (2.0 / third as f64).sqrt()).max(0.02 * star);
        if scatter - noise < (STEADY_FRACTION * star).powi(2) && !trend {
            d.flags |= flags::RESIDUAL;
        }
    }
}

fn median_of(v: impl Iterator<Item = f64>) -> Option<f64> {
    let mut v: Vec<f64> = v.filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    let mid = v.len() / 2;
    Some(*v.select_nth_unstable_by(mid, |a, b| a.total_cmp(b)).1)
}

/// 1.4826 × the median absolute deviation.
fn robust_sigma(v: impl Iterator<Item = f64> + Clone) -> Option<f64> {
    let m = median_of(v.clone())?;
    Some(1.4826 * median_of(v.map(|x| (x - m).abs()))?)
}

/// PSF-weighted flux of an epoch at the pixel nearest `(x, y)` (a least-squares fit of the PSF
/// to the pixels it covers that are on the frame and unmasked), and its variance; None when
/// those hold less than [`PSF_COVER_MIN`] of the PSF.
fn psf_flux(e: &StackEpoch, x: f64, y: f64) -> Option<(f64, f64)> {
    let (cx, cy) = (x.round() as i64, y.round() as i64);
    let r = (e.psf.side / 2) as i64;
    let (mut num, mut den, mut cover) = (0.0f64, 0.0f64, 0.0f64);
    for v in -r..=r {
        for u in -r..=r {
            let p = e.psf.pixels[((v + r) * e.psf.side as i64 + u + r) as usize];
            let (px, py) = (cx + u, cy + v);
            if p == 0.0 || px < 0 || py < 0 || px >= e.width as i64 || py >= e.height as i64 {
                continue;
            }
            let i = py as usize * e.width + px as usize;
            let (dv, vv) = (e.diff[i] as f64, e.var[i] as f64);
            if dv.is_finite() && vv > 0.0 && vv.is_finite() {
                num += p * dv / vv;
                den += p * p / vv;
                cover += p;
            }
        }
    }
    (den > 0.0 && cover >= PSF_COVER_MIN).then(|| (num / den, 1.0 / den))
}

/// The least part of the PSF's sum that [`psf_flux`] fits on.
const PSF_COVER_MIN: f64 = 0.75;

/// The most a stack's noise is scaled by its measured scatter (either way), as a factor on σ.
pub const VARIANCE_RESCALE_MAX: f64 = 1.15;

/// Score, peaks and flags on a stack, as on a frame; the noise scaled to the stack's measured
/// score scatter (see `VARIANCE_RESCALE_MAX`). The σ returned is the scatter before scaling.
fn detect_on(stack: &Stack, g: &Group, key: &str, mjd: f64, threshold: f64) -> (Vec<Detection>, f64, Vec<f32>) {
    let (w, h) = (stack.width, stack.height);
    let mut sc: ScoreImage = {
        let mut sc = psf::matched_filter(&stack.image, &stack.var, w, h, &stack.psf, 1.0);
        sc.psf_peak = stack.psf.pixels[stack.psf.pixels.len() / 2];
        sc
    };
    // The stack's variance rests on a model of how the template's noise correlates across
    // epochs; its measured scatter says how well. As LSST's coadds do (`ScaleVarianceTask`),
    // the noise is scaled to what the stack shows: the score's robust σ over its usable
    // pixels (a median absolute deviation, which sources barely move), within ±15%.
    let ok_var = |v: f32| v > 0.0 && v.is_finite();
    let raw: Vec<f32> = sc.score.iter().zip(&stack.var).step_by(3).filter(|(_, v)| ok_var(**v)).map(|(s, _)| *s).collect();
    let raw_sigma = super::image::robust_stats(&raw).map(|(_, s)| s as f64).unwrap_or(f64::NAN);
    if raw_sigma.is_finite() && raw_sigma > 0.0 {
        let f = raw_sigma.clamp(1.0 / VARIANCE_RESCALE_MAX, VARIANCE_RESCALE_MAX) as f32;
        tracing::debug!(key, raw_sigma, "stack score rescaled by its measured scatter");
        sc.score.iter_mut().for_each(|v| *v /= f);
        sc.flux_err.iter_mut().for_each(|v| *v *= f);
    }
    // `find_peaks` reads the difference, its variance, saturation and PSF width of a frame.
    let ok = |v: f32| v > 0.0 && v.is_finite();
    let diff = Difference::for_stack(
        w,
        h,
        stack.image.iter().zip(&stack.var).map(|(d, v)| if ok(*v) { *d } else { 0.0 }).collect(),
        stack.var.iter().map(|v| if ok(*v) { *v } else { 0.0 }).collect(),
        g.saturated.clone(),
        g.sigma_difference,
    );
    let meta = FrameMeta {
        frame: key,
        mjd,
        band: &g.band,
        zero_point: g.zero_point,
        wcs: g.wcs,
        aperture_correction: g.aperture_correction,
        convolved_science: None,
        repaired: None,
        point_sources: g.point_sources.as_ref().map(|(s, f)| (s, *f)),
    };
    let mut dets = frame::find_peaks(&diff, &sc, &meta, threshold);
    // Broader than the PSF beside the template's light: what the subtraction left of an
    // extended source, which a deep stack adds up night after night (`detect::shape`). Not on
    // a star of the template: a variable star's stack profile is broader than the PSF when its
    // changes follow the seeing, and a change of a star is no residual of a galaxy.
    if let Some(model) = &g.model {
        for d in dets.iter_mut() {
            let on_star = g.point_sources.as_ref().is_some_and(|(s, _)| s.within(d.x, d.y, super::sources::CENTRED_PX).next().is_some());
            if !on_star && shape::is_broad_residual(shape::Plane { data: &stack.image, var: &stack.var, width: w, height: h }, model, &stack.psf, d.x, d.y) {
                d.flags |= flags::BROAD;
            }
        }
    }
    (dets, raw_sigma, sc.score)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::Rng;

    fn epoch(rng: &mut impl rand::Rng, w: usize, source: f32) -> StackEpoch {
        use rand_distr::{Distribution, Normal};
        let n = Normal::new(0.0f32, 1.0).unwrap();
        let mut diff: Vec<f32> = (0..w * w).map(|_| n.sample(rng)).collect();
        diff[w * w / 2 + w / 2] += source;
        StackEpoch {
            width: w,
            height: w,
            diff,
            var: vec![1.0; w * w],
            var_template: vec![0.01; w * w],
            psf: gaussian_psf(1.0),
            mjd: 0.0,
            band: "r".into(),
            dx: 0.0,
            dy: 0.0,
        }
    }

    #[test]
    fn clipping_removes_a_one_exposure_spike_and_keeps_a_steady_source() {
        let mut rng = crate::testing::rng();
        let w = 32;
        let c = w * w / 2 + w / 2;
        // A spike of 50 σ in one of three exposures: masked there, and only there (with its
        // neighbours), the others untouched.
        let mut night = vec![epoch(&mut rng, w, 0.0), epoch(&mut rng, w, 50.0), epoch(&mut rng, w, 0.0)];
        let before: Vec<Vec<f32>> = night.iter().map(|e| e.diff.clone()).collect();
        let masked = clip_outliers(&mut night, CLIP_SIGMA, CLIP_GROW);
        assert!(night[1].diff[c].is_nan() && night[1].diff[c + 2].is_nan() && !night[1].diff[c + 3].is_nan());
        assert_eq!(night[0].diff, before[0]);
        assert_eq!(night[2].diff, before[2]);
        assert!((25..=40).contains(&masked), "{masked} pixels masked");
        // The same source in every exposure: nothing clipped (pure noise clips ~1e-9 of pixels).
        let mut steady: Vec<StackEpoch> = (0..3).map(|_| epoch(&mut rng, w, 50.0)).collect();
        assert_eq!(clip_outliers(&mut steady, CLIP_SIGMA, CLIP_GROW), 0);
        // Two exposures cannot tell which one is odd.
        let mut two = vec![epoch(&mut rng, w, 0.0), epoch(&mut rng, w, 50.0)];
        assert_eq!(clip_outliers(&mut two, CLIP_SIGMA, CLIP_GROW), 0);
        // A bright source (5000 σ·px) in three exposures of different seeing (σ 1.0, 1.2 and
        // 1.4 px: the sharpest core 1.65× the others' mean, the broadest wings several times
        // theirs): not clipped. A cosmic ray of 50 σ beside it, 8 px out, is.
        let seeing = |rng: &mut rand::rngs::StdRng, s: f64| {
            let mut e = epoch(rng, w, 0.0);
            let p = PsfImage::gaussian(15, s, 0.0, 0.0);
            for (k, v) in p.pixels.iter().enumerate() {
                let (x, y) = (w / 2 + k % 15 - 7, w / 2 + k / 15 - 7);
                e.diff[y * w + x] += (5000.0 * v) as f32;
            }
            e
        };
        let mut bright = vec![seeing(&mut rng, 1.0), seeing(&mut rng, 1.2), seeing(&mut rng, 1.4)];
        assert_eq!(clip_outliers(&mut bright, CLIP_SIGMA, CLIP_GROW), 0, "a sharper exposure's core is not an outlier");
        bright[1].diff[c + 8] += 50.0;
        clip_outliers(&mut bright, CLIP_SIGMA, CLIP_GROW);
        assert!(bright[1].diff[c + 8].is_nan() && !bright[1].diff[c].is_nan() && !bright[0].diff[c + 8].is_nan() && !bright[2].diff[c + 8].is_nan());
    }

    #[test]
    fn the_template_term_shrinks_only_as_far_as_the_paths_differ() {
        let q = PsfImage::gaussian(15, 1.5, 0.0, 0.0);
        let path = |sigma: f64, amp: f64| {
            let g = PsfImage::gaussian(13, sigma, 0.0, 0.0);
            TemplatePath { side: 13, kernel: g.pixels.iter().map(|v| v * amp).collect(), weight: 1.0, white: 1.0, var: 1.0 }
        };
        let (a, b) = (path(0.8, 2.0), path(2.5, 2.0));
        // The same path twice: fully correlated, nothing to take off.
        let same = template_correlation(&[(0.5, &a), (0.5, &a)], &q);
        assert!((same - 1.0).abs() < 1e-12, "{same}");
        // Different seeing: less than fully correlated, but far from independent.
        let r = template_correlation(&[(0.5, &a), (0.5, &b)], &q);
        assert!(r > 0.5 && r < 0.99, "{r}");
        // Only the paths' shapes and their weighted amplitudes count.
        let b2 = path(2.5, 4.0);
        let r2 = template_correlation(&[(0.5, &a), (0.25, &b2)], &q);
        assert!((r2 - r).abs() < 1e-12, "{r2} vs {r}");
        // The stack's template term shrinks by r, and the rest of the variance stays.
        let mut st = Stack::masked(2, 1);
        st.var = vec![4.0, 1.0];
        st.var_template = vec![2.0, f32::NAN];
        scale_template_term(&mut st, 0.75);
        assert_eq!((st.var[0], st.var_template[0]), (3.5, 1.5));
        assert_eq!(st.var[1], 1.0);
    }

    /// `image ⊗ kernel` (odd side, centred), zero outside the image.
    fn convolve(image: &[f64], w: usize, kernel: &[f64], side: usize) -> Vec<f64> {
        let flipped: Vec<f64> = kernel.iter().rev().copied().collect();
        psf::correlate_pair(image, &vec![0.0; image.len()], w, image.len() / w, &flipped, &vec![0.0; kernel.len()], side).0
    }

    /// What a matched filter `q` sees of the noise `img` (over the centre, away from the edges)
    /// against what it would see of white noise of the same per-pixel variance: 1 for white.
    fn filtered_over_white(img: &[f64], w: usize, margin: usize, q: &PsfImage) -> f64 {
        let f = convolve(img, w, &q.pixels, q.side);
        let inner = |v: &[f64]| -> f64 {
            let c: Vec<f64> = (margin..w - margin).flat_map(|y| (margin..w - margin).map(move |x| (x, y))).map(|(x, y)| v[y * w + x]).collect();
            c.iter().map(|x| x * x).sum::<f64>() / c.len() as f64
        };
        inner(&f) / (inner(img) * q.pixels.iter().map(|p| p * p).sum::<f64>())
    }

    #[test]
    fn a_stack_of_convolved_science_epochs_is_whitened_against_its_common_template_noise() {
        use crate::subtract::decorr::decorrelation_kernel;
        use rand_distr::{Distribution, Normal};
        let mut rng = crate::testing::rng();
        let normal = Normal::new(0.0, 1.0).unwrap();
        let w = 320;
        let margin = 40;
        // The template, unconvolved, 20 times as deep as each science frame; the science frames,
        // sharper, convolved by Gaussians of σ 1.0–1.6 px. Each epoch's decorrelated difference
        // `φ_i ⊗ (n_T − κ_i ⊗ n_S,i)` is white on its own, at σ_T² + σ_S².
        let (var_t, var_s) = (0.05, 1.0);
        let template: Vec<f64> = (0..w * w).map(|_| normal.sample(&mut rng) * f64::sqrt(var_t)).collect();
        let n = 12;
        let mut stack = vec![0.0; w * w];
        let mut paths = Vec::new();
        let mut single = Vec::new();
        for i in 0..n {
            let sigma = rng.gen_range(1.0..1.6);
            let kappa = PsfImage::gaussian(15, sigma, 0.0, 0.0);
            let dk = decorrelation_kernel(&kappa.pixels, 15, var_t, var_s, 14).unwrap();
            let science: Vec<f64> = (0..w * w).map(|_| normal.sample(&mut rng) * f64::sqrt(var_s)).collect();
            let ks = convolve(&science, w, &kappa.pixels, 15);
            let raw: Vec<f64> = template.iter().zip(&ks).map(|(t, k)| t - k).collect();
            let d = convolve(&raw, w, &dk.kernel, dk.side());
            let white = dk.output_variance();
            if i == 0 {
                single = d.clone();
            }
            stack.iter_mut().zip(&d).for_each(|(s, v)| *s += v / n as f64);
            paths.push(TemplatePath { side: dk.side(), kernel: dk.kernel.iter().map(|k| k * var_t.sqrt()).collect(), weight: 1.0 / white, white, var: white });
        }
        // One epoch is white already: the filter is a δ, and a point-source filter sees the
        // noise as white.
        let q = PsfImage::gaussian(15, 1.8, 0.0, 0.0);
        let one = whitening(&[(1.0, &paths[0])], &q).unwrap();
        assert!(one.range < 1.0 + 1e-3 && one.gain < 1.0 + 1e-6, "{} {}", one.range, one.gain);
        let r1 = filtered_over_white(&single, w, margin, &q);
        // (Its scatter over seeds is 0.04: about 1,400 independent patches.)
        assert!((r1 - 1.0).abs() < 0.15, "one epoch: {r1}");
        // The stack is not: the template's noise, lifted at high frequencies by every φ_i
        // alike, is common, so a point-source filter sees less noise than white noise of the
        // stack's per-pixel variance would give it.
        let weighted: Vec<(f64, &TemplatePath)> = paths.iter().map(|p| (1.0 / n as f64, p)).collect();
        let wh = whitening(&weighted, &q).unwrap();
        let before = filtered_over_white(&stack, w, margin, &q);
        assert!(before < 0.8, "the stack's noise should not look white: {before}");
        assert!(wh.range > 1.5 && wh.gain > WHITEN_MIN_GAIN, "{} {}", wh.range, wh.gain);
        // Whitened: white again, at the per-pixel variance the model predicts.
        let after = convolve(&stack, w, &wh.kernel.pixels, wh.kernel.side);
        let r = filtered_over_white(&after, w, margin, &q);
        assert!((r - 1.0).abs() < 0.15, "whitened stack: {r} (before {before})");
        let inner: Vec<f64> = (margin..w - margin).flat_map(|y| (margin..w - margin).map(move |x| (x, y))).map(|(x, y)| after[y * w + x]).collect();
        let var = inner.iter().map(|v| v * v).sum::<f64>() / inner.len() as f64;
        assert!((var / wh.level - 1.0).abs() < 0.05, "variance {var} against the model's {}", wh.level);
        assert!((wh.kernel.pixels.iter().sum::<f64>() - 1.0).abs() < 1e-9);
    }

    #[test]
    fn psf_flux_fits_a_source_and_needs_most_of_its_psf() {
        let mut rng = crate::testing::rng();
        let w = 40;
        for _ in 0..20 {
            let mut e = epoch(&mut rng, w, 0.0);
            let flux = rng.gen_range(50.0..500.0);
            let (x0, y0) = (rng.gen_range(0..w), rng.gen_range(0..w));
            let p = PsfImage::gaussian(15, 1.0, 0.0, 0.0);
            for (k, v) in p.pixels.iter().enumerate() {
                let (x, y) = ((x0 + k % 15) as i64 - 7, (y0 + k / 15) as i64 - 7);
                if x >= 0 && y >= 0 && (x as usize) < w && (y as usize) < w {
                    e.diff[y as usize * w + x as usize] += (flux * v) as f32;
                }
            }
            // The epoch's PSF is `gaussian_psf(1.0)`, unit noise: σ of the flux = 1/√ΣP².
            let got = psf_flux(&e, x0 as f64, y0 as f64);
            let edge = x0.min(y0).min(w - 1 - x0).min(w - 1 - y0);
            match got {
                Some((f, v)) => {
                    assert!(edge >= 1, "a source on the outermost pixel has under 3/4 of its PSF on the frame");
                    assert!((f - flux).abs() < 5.0 * v.sqrt(), "flux {f:.1} ± {:.1} for {flux:.1} at ({x0}, {y0})", v.sqrt());
                }
                None => assert!(edge == 0, "({x0}, {y0}) is {edge} px inside and was not measured"),
            }
        }
    }

    #[test]
    fn a_steady_star_leaves_a_residual_and_a_variable_star_does_not() {
        use crate::detect::sources::{PointSource, PointSources};
        use rand_distr::{Distribution, Normal};
        let mut rng = crate::testing::rng();
        let star = rng.gen_range(1e4..1e5);
        let sources = PointSources::new(vec![PointSource { x: 20.0, y: 20.0, flux: star }], 40, 40);
        let noise = Normal::new(0.0, 0.01 * star).unwrap();
        // 30 frames from MJD 0; the star's residual moves by 1.5% of it from frame to frame (the
        // simulated nights' static stars: up to 3.6%), a variable star's by its amplitude.
        let frames = |rng: &mut rand::rngs::StdRng, amplitude: f64, kernel: f64| -> Vec<Vec<(f64, f64, f64)>> {
            let k = Normal::new(0.0, kernel * star).unwrap();
            let phase = rng.gen_range(0.0..std::f64::consts::TAU);
            vec![(0..30).map(|i| (i as f64 / 3.0, 0.01 * star + amplitude * star * (phase + 0.7 * i as f64).sin() + k.sample(rng) + noise.sample(rng), (0.01 * star).powi(2))).collect()]
        };
        let det = |x: f64, flux: f64| Detection { frame: "stack:10n:f".into(), mjd: 10.0, band: "r".into(), x, y: 20.3, ra: None, dec: None, score: 6.0, flux, flux_err: flux / 6.0, mag: None, flags: 0 };
        let run = |recs: &[Vec<(f64, f64, f64)>], d: Detection, nights: usize| {
            let mut v = vec![d];
            flag_steady_residuals(&mut v, nights, &sources, 1.0, recs, 0.0);
            v[0].flags & flags::RESIDUAL != 0
        };
        // A steady star is flagged nearly always, not always: the drift test's σ comes from the
        // frames themselves, and a low draw of it now and then calls noise a drift (about 1 in
        // 400 draws of a 3-night window). So the steady cases count over 20 fresh draws each.
        let mostly = |rng: &mut rand::rngs::StdRng, what: &str, case: &dyn Fn(&mut rand::rngs::StdRng) -> bool| {
            let n = (0..20).filter(|_| case(rng)).count();
            assert!(n >= 18, "{what}: flagged in {n} of 20 draws");
        };
        mostly(&mut rng, "a steady star's 1.2% residual", &|rng| run(&frames(rng, 0.0, 0.015), det(20.4, 0.012 * star), 10));
        // Three frames in 30 whose kernel failed at the star do not make it variable.
        let bad_frames = |rng: &mut rand::rngs::StdRng| {
            let mut steady = frames(rng, 0.0, 0.015);
            for i in [4, 11, 23] {
                steady[0][i].1 += 0.4 * star;
            }
            steady
        };
        mostly(&mut rng, "three bad frames", &|rng| run(&bad_frames(rng), det(20.4, 0.012 * star), 10));
        mostly(&mut rng, "negative, or a 3-night window", &|rng| run(&bad_frames(rng), det(19.6, -0.012 * star), 3));
        mostly(&mut rng, "3% of the star's estimated flux", &|rng| run(&bad_frames(rng), det(20.4, 0.03 * star), 10));
        let steady = bad_frames(&mut rng);
        assert!(!run(&steady, det(20.4, 0.012 * star), 2), "two nights are too few to tell");
        assert!(!run(&steady, det(20.4, 0.05 * star), 10), "5% of the star is more than a residual");
        // A star that brightens by 12% of itself over the window (a microlensing event's rise)
        // is no steady star, though its frames scatter by under 5% (robust σ 4.5%).
        let mut rising = frames(&mut rng, 0.0, 0.01);
        rising[0].iter_mut().enumerate().for_each(|(i, r)| r.1 += 0.12 * star * i as f64 / 29.0);
        assert!(!run(&rising, det(20.4, 0.03 * star), 10), "a rising star");
        assert!(!run(&steady, det(22.0, 0.012 * star), 10), "beside the star: the other residual test's case");
        for amplitude in [0.15, 0.3, 0.6] {
            let var = frames(&mut rng, amplitude, 0.03);
            assert!(!run(&var, det(20.4, 0.012 * star), 10), "a variable star of amplitude {amplitude}");
        }
        // The scatter counts every frame kept, the window's (the last 3 nights here, from MJD 7)
        // and those before it: a variable star of a long period that sits at its maximum
        // through the window is no steady star. The drift is the window's.
        let window = |recs: &[Vec<(f64, f64, f64)>]| {
            let mut v = vec![det(20.4, 0.012 * star)];
            flag_steady_residuals(&mut v, 3, &sources, 1.0, recs, 7.0);
            v[0].flags & flags::RESIDUAL != 0
        };
        let mut flat_late = frames(&mut rng, 0.3, 0.01);
        flat_late[0].iter_mut().filter(|r| r.0 >= 7.0).for_each(|r| r.1 = 0.31 * star + noise.sample(&mut rng));
        assert!(!window(&flat_late), "flat through the window, variable before");
        let mut steady_then_rising = frames(&mut rng, 0.0, 0.01);
        steady_then_rising[0].iter_mut().filter(|r| r.0 >= 7.0).for_each(|r| r.1 += 0.25 * star * (r.0 - 7.0) / 2.7);
        assert!(!window(&steady_then_rising), "rising by 25% within the window");
        mostly(&mut rng, "steady all along", &|rng| window(&frames(rng, 0.0, 0.015)));
    }

    #[test]
    fn windows_parse_and_label() {
        assert_eq!(parse_windows("1,3,10,30").unwrap(), vec![1.0, 3.0, 10.0, 30.0]);
        assert_eq!(parse_windows("10n, 3n").unwrap(), vec![3.0, 10.0]);
        assert!(parse_windows("none").unwrap().is_empty());
        assert!(parse_windows("0").is_err());
        assert!(parse_windows("x").is_err());
        assert_eq!(window_label(10.0), "10n");
        assert_eq!(window_label(2.5), "2.5n");
    }
}

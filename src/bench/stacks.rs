//! Truth for the stacks of `blink detect` (`detect::stacking`), so that `blink bench` scores
//! stack detections as it scores frames: per stack key `stack:<window>:<last frame>`, the truth
//! rows of the frames the stack holds, combined.
//!
//! - **Targets** (transients, variable stars): one row per object, at its mean position, with
//!   the inverse-variance weighted mean of its difference flux and the **ideal stack SNR** for
//!   the template depth. Epoch `i` has difference flux `ΔF_i` and optimal SNR `s_i` (against
//!   science and template noise), so `σ_i = |ΔF_i| / s_i`; an epoch where the object is absent
//!   (`ΔF_i = 0`) gets the median `σ` of its other epochs. The template, a mean of `M` exposures
//!   (`NCOMBINE`), holds `σ_T² = σ_i² / (M + 1)` of it, common to every epoch. With `w_i = 1/σ_i²`
//!   and `W = Σ w_i`: `F = Σ w_i ΔF_i / W`, `Var = (Σ w_i² (σ_i² − σ_T,i²) + (Σ w_i σ_T,i)²) / W²`,
//!   ideal SNR `F / √Var`. Without the template term the SNR of N equal epochs would be
//!   `s √N`; with a template of depth 100 and 30 epochs it is `s √N / 1.14`.
//!
//!   That holds where every epoch's PSF is the template's. Where the headers give each
//!   frame's PSF and the template's (`SEEING` and `PSFBETA`, which `blink simulate` writes), the
//!   ideal is taken frequency by frequency instead ([`EpochPsfs`]): the best a stack of
//!   differences against one template can do. To take the static sky out of epoch `i` at
//!   spatial frequency `k`, the template is matched to its PSF, which carries the template's
//!   noise in as `P̂_i(k)/P̂_T(k)`: where the template is broader than the epoch (the science
//!   frames convolved), that lifts the template's noise at high frequencies, where it is common
//!   to every epoch and does not average down. With the epochs' per-pixel science and template
//!   variances `V_S,i = σ_i² ΣP_i² M/(M+1)` and `V_T,i = σ_i² ΣP_i² /(M+1)` and the same weights,
//!   `SNR² = Σ_k |Σ w_i ΔF_i P̂_i|² / (Σ w_i² V_S,i + |Σ w_i √V_T,i P̂_i/P̂_T|²) / n²`, the
//!   matched filter for that noise spectrum. With every `P̂_i = P̂_T` it is the formula above.
//!   The PSFs are round Moffat profiles of the frame centre's FWHM and β.
//! - **Everything else** (stars, galaxies, cosmic rays, hot pixels, the bad column) is copied
//!   from every frame of the stack to the stack key, so a false positive is classed against
//!   whatever any of its epochs held.

use std::collections::BTreeMap;

use serde::Serialize;

use super::matching::NightMatch;
use super::stats::{FpCounts, FpRates};
use crate::detect::catalog::{Detection, ARTIFACT_FLAGS};
use crate::detect::stacking::StackResult;
use crate::sim::night::truth::TruthRecord;

/// A round Moffat PSF: FWHM (pixels) and β.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Moffat {
    pub fwhm: f64,
    pub beta: f64,
}

/// What the ideal stack SNR needs of one frame: its template's depth (`NCOMBINE`; absent: 1)
/// and, where known, the frame's PSF and its template's (module docs).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EpochPsfs {
    pub depth: f64,
    pub science: Option<Moffat>,
    pub template: Option<Moffat>,
}

impl EpochPsfs {
    /// A template of `depth` exposures, the PSFs unknown (the equal-PSF ideal).
    pub fn depth(depth: f64) -> EpochPsfs {
        EpochPsfs { depth, science: None, template: None }
    }
}

/// Side of the grid the PSFs are transformed on: a Moffat of FWHM 4 px and β 2.5 keeps ~1e-3
/// of its light beyond 32 px.
const SPECTRUM_GRID: usize = 64;

/// Round PSFs' transforms on [`SPECTRUM_GRID`], averaged over rings of whole frequency
/// steps (every profile is round, so a ring's points are alike), cached by profile.
struct Spectra {
    /// Grid points per ring.
    counts: Vec<f64>,
    ring: Vec<usize>,
    cache: std::collections::HashMap<(u64, u64), std::rc::Rc<Vec<f64>>>,
}

impl Spectra {
    fn new() -> Spectra {
        let n = SPECTRUM_GRID as i64;
        let signed = |i: i64| if i > n / 2 { i - n } else { i };
        let ring: Vec<usize> = (0..n * n).map(|i| (signed(i / n) as f64).hypot(signed(i % n) as f64).round() as usize).collect();
        let mut counts = vec![0.0; ring.iter().max().map_or(1, |m| m + 1)];
        ring.iter().for_each(|&r| counts[r] += 1.0);
        Spectra { counts, ring, cache: Default::default() }
    }

    /// The ring means of `P̂` for a unit-sum Moffat sampled at pixel centres.
    fn of(&mut self, p: Moffat) -> std::rc::Rc<Vec<f64>> {
        let key = (p.fwhm.to_bits(), p.beta.to_bits());
        if let Some(v) = self.cache.get(&key) {
            return v.clone();
        }
        use crate::subtract::decorr::Fft2;
        use rustfft::num_complex::Complex;
        let n = SPECTRUM_GRID;
        let alpha = crate::sim::night::psf::moffat_alpha(p.fwhm, p.beta);
        let signed = |i: usize| if i > n / 2 { i as f64 - n as f64 } else { i as f64 };
        let mut g: Vec<Complex<f64>> = (0..n * n)
            .map(|i| {
                let (x, y) = (signed(i % n), signed(i / n));
                Complex::new((1.0 + (x * x + y * y) / (alpha * alpha)).powf(-p.beta), 0.0)
            })
            .collect();
        let sum: f64 = g.iter().map(|c| c.re).sum();
        g.iter_mut().for_each(|c| c.re /= sum);
        Fft2::<f64>::new(n, n).forward(&mut g);
        let mut rings = vec![0.0; self.counts.len()];
        for (c, &r) in g.iter().zip(&self.ring) {
            rings[r] += c.re;
        }
        rings.iter_mut().zip(&self.counts).for_each(|(v, c)| *v /= c);
        let v = std::rc::Rc::new(rings);
        self.cache.insert(key, v.clone());
        v
    }
}

/// The truth rows of every stack (see the module docs), with each frame's [`EpochPsfs`].
pub fn stack_truth(truth: &[TruthRecord], stacks: &[StackResult], epoch: &dyn Fn(&str) -> EpochPsfs) -> Vec<TruthRecord> {
    let mut spectra = Spectra::new();
    let mut by_frame: BTreeMap<&str, Vec<&TruthRecord>> = BTreeMap::new();
    for t in truth {
        by_frame.entry(t.frame.as_str()).or_default().push(t);
    }
    let mut out = Vec::new();
    for s in stacks {
        let mut objects: BTreeMap<u64, Vec<(&TruthRecord, EpochPsfs)>> = BTreeMap::new();
        let mut seen_static: std::collections::HashSet<u64> = Default::default();
        for f in &s.frames {
            let m = epoch(f);
            for t in by_frame.get(f.as_str()).into_iter().flatten() {
                if t.is_variable() {
                    objects.entry(t.id).or_default().push((t, m));
                } else if t.is_artifact() || seen_static.insert(t.id) {
                    out.push(TruthRecord { frame: s.key.clone(), mjd: s.mjd, ..(*t).clone() });
                }
            }
        }
        for rows in objects.values() {
            if let Some(r) = combine(rows, &mut spectra) {
                out.push(TruthRecord { frame: s.key.clone(), mjd: s.mjd, ..r });
            }
        }
    }
    out
}

/// One object's rows in one stack (each with its frame's [`EpochPsfs`]) as one row (module
/// docs); `None` when no epoch has a difference flux with an SNR.
fn combine(rows: &[(&TruthRecord, EpochPsfs)], spectra: &mut Spectra) -> Option<TruthRecord> {
    let sigma_of = |t: &TruthRecord| -> Option<f64> {
        let d = t.flux - t.ref_flux;
        match t.snr {
            Some(s) if s > 0.0 && d != 0.0 && d.is_finite() => Some(d.abs() / s),
            _ => None,
        }
    };
    let mut known: Vec<f64> = rows.iter().filter_map(|(t, _)| sigma_of(t)).collect();
    if known.is_empty() {
        return None;
    }
    known.sort_by(f64::total_cmp);
    let median = known[known.len() / 2];
    let (mut w_sum, mut wf, mut w2s, mut wt) = (0.0, 0.0, 0.0, 0.0);
    let (mut x, mut y, mut ra, mut dec) = (0.0, 0.0, 0.0, 0.0);
    // Per epoch, for the frequency-domain ideal: w ΔF, w √V_T, w² V_S and the two PSFs.
    let mut terms = Vec::with_capacity(rows.len());
    for (t, e) in rows {
        let m = e.depth.max(1.0);
        let s = sigma_of(t).unwrap_or(median);
        let st = s / (m + 1.0).sqrt();
        if let (Some(ps), Some(pt)) = (e.science, e.template) {
            let (ps, pt) = (spectra.of(ps), spectra.of(pt));
            let n2 = (SPECTRUM_GRID * SPECTRUM_GRID) as f64;
            let sum_p2: f64 = ps.iter().zip(&spectra.counts).map(|(p, c)| c * p * p).sum::<f64>() / n2;
            let (v, w) = (s * s * sum_p2, 1.0 / (s * s));
            terms.push((w * (t.flux - t.ref_flux), w * (v / (m + 1.0)).sqrt(), w * w * v * m / (m + 1.0), ps, pt));
        }
        let w = 1.0 / (s * s);
        w_sum += w;
        wf += w * (t.flux - t.ref_flux);
        w2s += w * w * (s * s - st * st);
        wt += w * st;
        x += t.x;
        y += t.y;
        ra += t.ra;
        dec += t.dec;
    }
    let n = rows.len() as f64;
    let flux = wf / w_sum;
    let var = (w2s + wt * wt) / (w_sum * w_sum);
    let snr = if terms.len() == rows.len() {
        let white: f64 = terms.iter().map(|t| t.2).sum();
        let mut snr2 = 0.0;
        for (r, c) in spectra.counts.iter().enumerate() {
            let (mut signal, mut common) = (0.0, 0.0);
            for (wf, wt, _, ps, pt) in &terms {
                signal += wf * ps[r];
                // Where the template passes (almost) nothing, no difference sees the epoch.
                if pt[r].abs() < 1e-12 {
                    common = f64::INFINITY;
                    break;
                }
                common += wt * ps[r] / pt[r];
            }
            if common.is_finite() {
                snr2 += c * signal * signal / (white + common * common);
            }
        }
        (snr2 / (SPECTRUM_GRID * SPECTRUM_GRID) as f64).sqrt()
    } else {
        flux.abs() / var.sqrt()
    };
    let first = rows[0].0;
    Some(TruthRecord {
        x: x / n,
        y: y / n,
        ra: ra / n,
        dec: dec / n,
        mag: None,
        flux,
        ref_flux: 0.0,
        snr: Some(snr),
        ..first.clone()
    })
}

/// What `blink bench` reports per stacking window (issue 5's targets).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WindowSummary {
    /// `1n`, `3n`, …
    pub window: String,
    /// Stacks of this window (one per field and band and night that ended it).
    pub stacks: usize,
    /// Slow transients whose per-epoch optimal SNR (median over the stack's frames) lies in
    /// `slow_snr`: targets, detected, fraction.
    pub slow_snr: (f64, f64),
    pub slow_targets: usize,
    pub slow_detected: usize,
    pub slow_fraction: Option<f64>,
    /// Slow transients of that SNR left out of `slow_targets` because they are blended
    /// ([`blended`]): no peak of their own in the noiseless score. Of those, detected anyway.
    pub slow_blended: usize,
    pub slow_blended_detected: usize,
    /// Median of detected |score| / ideal stack SNR (all kinds, ideal |SNR| ≥ 5).
    pub score_over_ideal_median: Option<f64>,
    /// Unflagged false positives per stack, by class (to set against a frame's).
    pub unflagged_fp_per_stack: Option<FpRates>,
    /// Median over the stacks of the score's robust σ over usable pixels.
    pub score_sigma_median: Option<f64>,
    /// Median over the stacks of the score's robust σ on empty sky (away from every source
    /// and artifact of the stack's frames), when the score images were kept.
    pub score_sigma_empty_sky: Option<f64>,
}

/// Per-window figures from a night's match (`m` over frames and stacks, `dets` the catalogue),
/// the stacks themselves and the frames' own truth (for the slow transients' per-epoch SNR).
pub fn window_summaries(m: &NightMatch, dets: &[Detection], threshold: f64, stacks: &[StackResult], epoch_truth: &[TruthRecord], stack_truth: &[TruthRecord], slow_snr: (f64, f64)) -> Vec<WindowSummary> {
    let by_key: BTreeMap<&str, &StackResult> = stacks.iter().map(|s| (s.key.as_str(), s)).collect();
    let mut stack_rows: BTreeMap<&str, Vec<&TruthRecord>> = BTreeMap::new();
    for t in stack_truth {
        stack_rows.entry(t.frame.as_str()).or_default().push(t);
    }
    // Per-epoch SNR of every slow transient, by (id, frame).
    let mut slow_epoch: std::collections::HashMap<(u64, &str), f64> = Default::default();
    for t in epoch_truth.iter().filter(|t| t.kind == "slow") {
        if let Some(s) = t.snr.filter(|s| *s > 0.0) {
            slow_epoch.insert((t.id, t.frame.as_str()), s);
        }
    }
    let passes = |i: usize| dets.get(i).is_some_and(|d| d.score.abs() >= threshold);
    let mut windows: Vec<String> = stacks.iter().map(|s| s.window.clone()).collect();
    windows.sort_by(|a, b| window_nights(a).total_cmp(&window_nights(b)));
    windows.dedup();
    windows
        .into_iter()
        .map(|w| {
            let mine: Vec<&StackResult> = stacks.iter().filter(|s| s.window == w).collect();
            let (mut n, mut found, mut nb, mut found_b) = (0, 0, 0, 0);
            let mut ratios = Vec::new();
            for t in m.targets.iter().filter(|t| by_key.get(t.truth.frame.as_str()).is_some_and(|s| s.window == w)) {
                let det = t.detection.filter(|&i| passes(i)).and_then(|i| dets.get(i));
                let snr = t.truth.snr.unwrap_or(0.0).abs();
                if let (Some(d), true) = (det, snr >= 5.0) {
                    ratios.push(d.score.abs() / snr);
                }
                if t.truth.kind != "slow" {
                    continue;
                }
                let s = by_key[t.truth.frame.as_str()];
                let mut per: Vec<f64> = s.frames.iter().filter_map(|f| slow_epoch.get(&(t.truth.id, f.as_str())).copied()).collect();
                if per.is_empty() {
                    continue;
                }
                per.sort_by(f64::total_cmp);
                let med = per[per.len() / 2];
                if med >= slow_snr.0 && med <= slow_snr.1 {
                    let rows = stack_rows.get(t.truth.frame.as_str()).map(Vec::as_slice).unwrap_or_default();
                    if blended(&t.truth, rows, super::matching::NOMINAL_FWHM_PX, super::matching::MATCH_RADIUS_PX) {
                        nb += 1;
                        found_b += usize::from(det.is_some());
                    } else {
                        n += 1;
                        found += usize::from(det.is_some());
                    }
                }
            }
            let mut fp = FpCounts::default();
            for f in &m.false_positives {
                let Some(d) = dets.get(f.detection).filter(|_| passes(f.detection)) else { continue };
                if d.flags & ARTIFACT_FLAGS == 0 && by_key.get(d.frame.as_str()).is_some_and(|s| s.window == w) {
                    fp.add(f.class);
                }
            }
            ratios.sort_by(f64::total_cmp);
            let mut sig: Vec<f64> = mine.iter().map(|s| s.score_sigma).filter(|v| v.is_finite()).collect();
            sig.sort_by(f64::total_cmp);
            let mut sky: Vec<f64> = mine
                .iter()
                .filter_map(|s| {
                    let (score, masked) = s.score_image.as_ref()?;
                    let rows: Vec<&TruthRecord> = stack_rows.get(s.key.as_str()).cloned().unwrap_or_default();
                    super::sky::empty_sky_sigma_of(s.width, s.height, score, masked, &rows, super::matching::NOMINAL_FWHM_PX)
                })
                .collect();
            sky.sort_by(f64::total_cmp);
            WindowSummary {
                window: w,
                stacks: mine.len(),
                slow_snr,
                slow_targets: n,
                slow_detected: found,
                slow_fraction: (n > 0).then(|| found as f64 / n as f64),
                slow_blended: nb,
                slow_blended_detected: found_b,
                score_over_ideal_median: (!ratios.is_empty()).then(|| ratios[ratios.len() / 2]),
                unflagged_fp_per_stack: fp.per_frame(mine.len()),
                score_sigma_median: (!sig.is_empty()).then(|| sig[sig.len() / 2]),
                score_sigma_empty_sky: (!sky.is_empty()).then(|| sky[sky.len() / 2]),
            }
        })
        .collect()
}

/// Whether `target` is blended with the other variable sources of its stack (`rows`, the
/// stack's truth): it has no peak of its own in the noiseless score. The noiseless score of a
/// point source of optimal SNR `s` at distance `d`, for a Gaussian PSF of `fwhm` (σ), is
/// `s·exp(−d²/4σ²)` (the PSF correlated with itself). Along the line to each brighter
/// neighbour of the same sign the summed score is followed from the target: if it climbs past
/// the highest value it reached within `radius` of the target without first dipping 1σ below
/// it, the target's light only makes a shoulder (or a bump of less than 1σ) on the neighbour,
/// which no peak finder separates from noise (a PSF-fitting deblender could). On the 30-night
/// runs this is, for example, a slow transient of stack SNR ~10 at 6.2 px from a supernova of
/// SNR 130 on the same host galaxy.
pub fn blended(target: &TruthRecord, rows: &[&TruthRecord], fwhm: f64, radius: f64) -> bool {
    let s2 = 4.0 * (fwhm / 2.354_820_045).powi(2);
    let signed = |r: &TruthRecord| r.snr.map(|s| s.abs() * if r.flux - r.ref_flux < 0.0 { -1.0 } else { 1.0 });
    let Some(own) = signed(target) else { return false };
    let reach = 6.0 * s2.sqrt() + radius;
    let sources: Vec<(f64, f64, f64)> = rows
        .iter()
        .filter(|r| r.is_variable() && (r.x - target.x).hypot(r.y - target.y) < reach)
        .filter_map(|r| Some((r.x, r.y, signed(r)? * own.signum())))
        .collect();
    let score = |x: f64, y: f64| -> f64 { sources.iter().map(|&(sx, sy, s)| s * (-((x - sx).powi(2) + (y - sy).powi(2)) / s2).exp()).sum() };
    for &(nx, ny, s) in &sources {
        let d = (nx - target.x).hypot(ny - target.y);
        if s <= own.abs() || d < 1e-9 {
            continue;
        }
        let (ux, uy) = ((nx - target.x) / d, (ny - target.y) / d);
        let mut peak = score(target.x, target.y);
        let steps = (d / 0.05).ceil() as usize;
        for k in 1..=steps {
            let t = d * k as f64 / steps as f64;
            let v = score(target.x + t * ux, target.y + t * uy);
            if t <= radius {
                peak = peak.max(v);
            }
            if peak - v >= 1.0 {
                break;
            }
            if t > radius && v > peak {
                return true;
            }
        }
    }
    false
}

/// Nights of a window label (`10n` → 10).
fn window_nights(label: &str) -> f64 {
    label.trim_end_matches('n').parse().unwrap_or(f64::INFINITY)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: u64, kind: &str, frame: &str, flux: f64, snr: f64) -> TruthRecord {
        TruthRecord {
            id,
            kind: kind.into(),
            host: None,
            frame: frame.into(),
            mjd: 0.0,
            x: 10.0,
            y: 20.0,
            ra: 1.0,
            dec: 2.0,
            mag: None,
            flux,
            ref_flux: 0.0,
            snr: Some(snr),
        }
    }

    fn stack(frames: &[&str]) -> StackResult {
        StackResult {
            key: "stack:10n:f9".into(),
            field: "F".into(),
            band: "r".into(),
            width: 0,
            height: 0,
            nights: 10.0,
            window: "10n".into(),
            frames: frames.iter().map(|f| f.to_string()).collect(),
            mjd: 9.0,
            detections: Vec::new(),
            score_sigma: 1.0,
            score_image: None,
        }
    }

    #[test]
    fn a_faint_source_on_a_bright_ones_shoulder_is_blended_and_a_separate_one_is_not() {
        let mut faint = row(7, "slow", "s", 100.0, 10.0);
        (faint.x, faint.y) = (20.0, 20.0);
        let near = |d: f64, snr: f64| {
            let mut r = row(8, "sn", "s", 1000.0, snr);
            (r.x, r.y) = (20.0 + d, 20.0);
            r
        };
        let fwhm = 3.0;
        // SNR 10 at 6.25 px from SNR 134 (a 30-night run's case): a shoulder, no peak.
        let bright = near(6.25, 134.0);
        assert!(blended(&faint, &[&faint, &bright], fwhm, 1.5));
        // The same neighbour 10 px away, or as faint as the target at 6.25 px: a peak of its own.
        let far = near(10.0, 134.0);
        assert!(!blended(&faint, &[&faint, &far], fwhm, 1.5));
        let equal = near(6.25, 10.0);
        assert!(!blended(&faint, &[&faint, &equal], fwhm, 1.5));
        // Alone, or next to a star (not a variable source): never blended.
        assert!(!blended(&faint, &[&faint], fwhm, 1.5));
        let mut star = near(3.0, 500.0);
        star.kind = "star".into();
        assert!(!blended(&faint, &[&faint, &star], fwhm, 1.5));
        // A dimming neighbour pulls the other way: it does not merge with a brightening.
        let mut fading = near(4.0, 134.0);
        fading.ref_flux = 2000.0;
        assert!(!blended(&faint, &[&faint, &fading], fwhm, 1.5));
    }

    #[test]
    fn equal_epochs_give_the_template_limited_snr() {
        let frames: Vec<String> = (0..30).map(|i| format!("f{i}")).collect();
        let refs: Vec<&str> = frames.iter().map(String::as_str).collect();
        let truth: Vec<TruthRecord> = frames.iter().map(|f| row(7, "slow", f, 200.0, 2.0)).chain([row(1, "star", "f0", 5e4, 0.0), row(1, "star", "f1", 5e4, 0.0)]).collect();
        let out = stack_truth(&truth, &[stack(&refs)], &|_| EpochPsfs::depth(100.0));
        let t = out.iter().find(|t| t.id == 7).expect("the slow transient");
        // σ_T² = σ²/101 common: Var = σ² (100/101)/30 + σ²/101.
        let ideal = 2.0 / ((100.0 / 101.0) / 30.0 + 1.0 / 101.0f64).sqrt();
        assert!((t.snr.unwrap() - ideal).abs() < 1e-9, "{:?} vs {ideal}", t.snr);
        assert!(t.snr.unwrap() < 2.0 * 30f64.sqrt() / 1.13);
        assert!((t.flux - 200.0).abs() < 1e-9);
        assert_eq!(t.frame, "stack:10n:f9");
        // The star is copied once, not once per frame.
        assert_eq!(out.iter().filter(|t| t.kind == "star").count(), 1);
    }

    #[test]
    fn a_template_broader_than_the_epochs_lowers_the_ideal_by_its_noise_spectrum() {
        let moffat = |fwhm, beta| Some(Moffat { fwhm, beta });
        let psfs = |science, template| EpochPsfs { depth: 100.0, science, template };
        let ideal = |n: usize, e: EpochPsfs| -> f64 {
            let frames: Vec<String> = (0..n).map(|i| format!("f{i}")).collect();
            let refs: Vec<&str> = frames.iter().map(String::as_str).collect();
            let truth: Vec<TruthRecord> = frames.iter().map(|f| row(7, "slow", f, 200.0, 2.0)).collect();
            stack_truth(&truth, &[stack(&refs)], &|_| e)[0].snr.unwrap()
        };
        for n in [1, 18] {
            let equal = ideal(n, EpochPsfs::depth(100.0));
            // The template's own PSF in every epoch: the equal-PSF formula, exactly.
            let same = ideal(n, psfs(moffat(3.6, 3.5), moffat(3.6, 3.5)));
            assert!((same / equal - 1.0).abs() < 1e-9, "{n} epochs: {same} vs {equal}");
            // Epochs of FWHM 2.2 px (β 3) against a template of 3.6 px (β 3.5). The ratios were
            // computed independently (numpy, the whole 2-D spectrum on grids of 64² and 128²,
            // which agree to 1e-6): 0.96998 for one epoch, 0.83965 for 18, whose template noise
            // at high frequencies does not average down.
            let sharp = ideal(n, psfs(moffat(2.2, 3.0), moffat(3.6, 3.5)));
            let expected = if n == 1 { 0.96998 } else { 0.83965 };
            assert!((sharp / equal - expected).abs() < 2e-3, "{n} epochs: {} against {expected}", sharp / equal);
            // A template sharper than the epochs costs nothing.
            let broad = ideal(n, psfs(moffat(3.6, 3.0), moffat(2.2, 3.5)));
            assert!(broad >= equal * (1.0 - 1e-9), "{n} epochs: {broad} vs {equal}");
        }
        // Unknown PSFs for one epoch: the equal-PSF formula for the whole stack.
        let frames = ["a", "b"];
        let truth: Vec<TruthRecord> = frames.iter().map(|f| row(7, "slow", f, 200.0, 2.0)).collect();
        let mixed = stack_truth(&truth, &[stack(&frames)], &|f| if f == "a" { psfs(moffat(2.2, 3.0), moffat(3.6, 3.5)) } else { EpochPsfs::depth(100.0) });
        let plain = stack_truth(&truth, &[stack(&frames)], &|_| EpochPsfs::depth(100.0));
        assert_eq!(mixed[0].snr, plain[0].snr);
    }

    #[test]
    fn absent_epochs_dilute_a_fast_transient() {
        let truth = vec![row(5, "fast", "a", 300.0, 6.0), row(5, "fast", "b", 0.0, 0.0), row(5, "fast", "c", 0.0, 0.0)];
        let out = stack_truth(&truth, &[stack(&["a", "b", "c"])], &|_| EpochPsfs::depth(1e9));
        let t = &out[0];
        // Three equal epochs, one with the source: flux / 3, σ / √3: SNR 6 / √3.
        assert!((t.snr.unwrap() - 6.0 / 3f64.sqrt()).abs() < 1e-6, "{:?}", t.snr);
        assert!(stack_truth(&[row(5, "fast", "b", 0.0, 0.0)], &[stack(&["b"])], &|_| EpochPsfs::depth(1.0)).is_empty());
    }
}

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

/// The truth rows of every stack (see the module docs). `depth` is the template's `NCOMBINE`
/// per frame (absent: 1).
pub fn stack_truth(truth: &[TruthRecord], stacks: &[StackResult], depth: &dyn Fn(&str) -> f64) -> Vec<TruthRecord> {
    let mut by_frame: BTreeMap<&str, Vec<&TruthRecord>> = BTreeMap::new();
    for t in truth {
        by_frame.entry(t.frame.as_str()).or_default().push(t);
    }
    let mut out = Vec::new();
    for s in stacks {
        let mut objects: BTreeMap<u64, Vec<(&TruthRecord, f64)>> = BTreeMap::new();
        let mut seen_static: std::collections::HashSet<u64> = Default::default();
        for f in &s.frames {
            let m = depth(f).max(1.0);
            for t in by_frame.get(f.as_str()).into_iter().flatten() {
                if t.is_variable() {
                    objects.entry(t.id).or_default().push((t, m));
                } else if t.is_artifact() || seen_static.insert(t.id) {
                    out.push(TruthRecord { frame: s.key.clone(), mjd: s.mjd, ..(*t).clone() });
                }
            }
        }
        for rows in objects.values() {
            if let Some(r) = combine(rows) {
                out.push(TruthRecord { frame: s.key.clone(), mjd: s.mjd, ..r });
            }
        }
    }
    out
}

/// One object's rows in one stack (each with its template depth) as one row (module docs);
/// `None` when no epoch has a difference flux with an SNR.
fn combine(rows: &[(&TruthRecord, f64)]) -> Option<TruthRecord> {
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
    for (t, m) in rows {
        let s = sigma_of(t).unwrap_or(median);
        let st = s / (m + 1.0).sqrt();
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
    let first = rows[0].0;
    Some(TruthRecord {
        x: x / n,
        y: y / n,
        ra: ra / n,
        dec: dec / n,
        mag: None,
        flux,
        ref_flux: 0.0,
        snr: Some(flux.abs() / var.sqrt()),
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
            let (mut n, mut found) = (0, 0);
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
                    n += 1;
                    found += usize::from(det.is_some());
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
                score_over_ideal_median: (!ratios.is_empty()).then(|| ratios[ratios.len() / 2]),
                unflagged_fp_per_stack: fp.per_frame(mine.len()),
                score_sigma_median: (!sig.is_empty()).then(|| sig[sig.len() / 2]),
                score_sigma_empty_sky: (!sky.is_empty()).then(|| sky[sky.len() / 2]),
            }
        })
        .collect()
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
    fn equal_epochs_give_the_template_limited_snr() {
        let frames: Vec<String> = (0..30).map(|i| format!("f{i}")).collect();
        let refs: Vec<&str> = frames.iter().map(String::as_str).collect();
        let truth: Vec<TruthRecord> = frames.iter().map(|f| row(7, "slow", f, 200.0, 2.0)).chain([row(1, "star", "f0", 5e4, 0.0), row(1, "star", "f1", 5e4, 0.0)]).collect();
        let out = stack_truth(&truth, &[stack(&refs)], &|_| 100.0);
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
    fn absent_epochs_dilute_a_fast_transient() {
        let truth = vec![row(5, "fast", "a", 300.0, 6.0), row(5, "fast", "b", 0.0, 0.0), row(5, "fast", "c", 0.0, 0.0)];
        let out = stack_truth(&truth, &[stack(&["a", "b", "c"])], &|_| 1e9);
        let t = &out[0];
        // Three equal epochs, one with the source: flux / 3, σ / √3: SNR 6 / √3.
        assert!((t.snr.unwrap() - 6.0 / 3f64.sqrt()).abs() < 1e-6, "{:?}", t.snr);
        assert!(stack_truth(&[row(5, "fast", "b", 0.0, 0.0)], &[stack(&["b"])], &|_| 1.0).is_empty());
    }
}

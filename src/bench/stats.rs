//! Frames-mode statistics of `blink bench` from a [`NightMatch`] (`docs/bench.md`).
//!
//! - A target is **detected** when a detection matched it and that detection's |score| is at or
//!   above the threshold. Detections below the threshold are ignored everywhere (not detected,
//!   not false positives, not duplicates), so a looser catalogue can be summarised at a stricter
//!   threshold (matching was done on the looser one, which can only help a target).
//! - **Completeness** is detected / targets, in bins of |optimal SNR| ([`SNR_EDGES`]) and of
//!   injected magnitude ([`MAG_BIN`] wide, the same edges for every kind of a timescale), per
//!   timescale (`epoch`, later `stack:<window>`) and per kind (`fast`, `sn`, `slow`,
//!   `variable`, and `all`). A bin with no targets has `fraction` = null.
//! - **50 % point** (`snr_50`, `mag_50`): bins with targets are taken from the weak end (low SNR,
//!   faint magnitude) to the strong end, each at its centre (the open top SNR bin at its lower
//!   edge). At the first bin with completeness ≥ 0.5, the value is interpolated linearly between
//!   it and the bin before. None when the weakest bin is already at 50 % or no bin reaches it.
//! - **Score over optimal SNR**: |score| / |snr| of detected targets; the headline median uses
//!   targets with |snr| ≥ [`RATIO_MIN_SNR`] (below, the threshold selects upward fluctuations).
//! - **False positives per frame**: counts per listed frame and class, and their mean over
//!   frames (all frames, and per timescale). Frames without any detection count as zero.
//!
//! Nothing here panics on empty input: zero frames or targets give empty bins and `None`s.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use super::matching::{timescale_of, FpClass, NightMatch, EPOCH};
use crate::detect::catalog::{Detection, ARTIFACT_FLAGS};

/// Edges of the |optimal SNR| bins; the last bin is open-ended.
pub const SNR_EDGES: [f64; 16] = [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 10.0, 15.0, 20.0, 30.0, 50.0, 100.0, f64::INFINITY];

/// Width of the magnitude bins.
pub const MAG_BIN: f64 = 0.5;

/// At most this many magnitude bins; fainter magnitudes fall into the last one.
pub const MAX_MAG_BINS: usize = 80;

/// Only targets at or above this |SNR| enter the median of score over optimal SNR.
pub const RATIO_MIN_SNR: f64 = 5.0;

/// The target kinds, in the order reports list them.
pub const KINDS: [&str; 4] = ["fast", "sn", "slow", "variable"];

/// Key of the curve over every kind.
pub const ALL: &str = "all";

/// One bin of a completeness curve: targets with lo ≤ value < hi.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Bin {
    pub lo: f64,
    /// None: open-ended.
    pub hi: Option<f64>,
    pub n: usize,
    pub detected: usize,
    /// detected / n; None when n = 0.
    pub fraction: Option<f64>,
}

impl Bin {
    /// Where the bin sits on its axis: its centre, or its lower edge when open-ended.
    pub fn centre(&self) -> f64 {
        self.hi.map_or(self.lo, |hi| 0.5 * (self.lo + hi))
    }
}

/// Completeness against |optimal SNR| for one kind.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SnrCurve {
    pub n: usize,
    pub detected: usize,
    pub fraction: Option<f64>,
    /// |SNR| at which completeness crosses 50 % (see the module docs).
    pub snr_50: Option<f64>,
    /// Targets with |SNR| ≥ 10, and the detected share of them.
    pub n_snr_ge_10: usize,
    pub completeness_snr_ge_10: Option<f64>,
    pub bins: Vec<Bin>,
}

/// Completeness against injected magnitude for one kind.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MagCurve {
    pub n: usize,
    pub detected: usize,
    /// Targets without a magnitude (no zero point or no flux), not in any bin.
    pub no_mag: usize,
    /// Magnitude at which completeness falls through 50 % going faint.
    pub mag_50: Option<f64>,
    pub bins: Vec<Bin>,
}

/// Distribution of |score| / |snr| in one bin of |SNR|.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RatioBin {
    pub lo: f64,
    pub hi: Option<f64>,
    pub n: usize,
    pub median: Option<f64>,
}

/// Median of |score| / |snr| for one kind (|snr| ≥ [`RATIO_MIN_SNR`]).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RatioSummary {
    pub n: usize,
    pub median: Option<f64>,
}

/// Measured score against optimal SNR: 1 is a perfect matched filter on a perfect difference.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ScoreOverSnr {
    pub min_snr: f64,
    pub n: usize,
    pub median: Option<f64>,
    /// 16th and 84th percentiles.
    pub p16: Option<f64>,
    pub p84: Option<f64>,
    /// Every detected target, by |SNR| bin (no minimum SNR).
    pub by_snr: Vec<RatioBin>,
    pub by_kind: BTreeMap<String, RatioSummary>,
}

/// Everything measured on one timescale.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TimescaleStats {
    pub frames: usize,
    pub targets: usize,
    pub detected: usize,
    /// Per kind and `all`.
    pub completeness_vs_snr: BTreeMap<String, SnrCurve>,
    pub completeness_vs_mag: BTreeMap<String, MagCurve>,
    pub score_over_snr: ScoreOverSnr,
}

/// False positives by class.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct FpCounts {
    pub on_star: usize,
    pub on_sky: usize,
    pub artifact: usize,
    pub total: usize,
}

impl FpCounts {
    pub fn add(&mut self, class: FpClass) {
        match class {
            FpClass::OnStar => self.on_star += 1,
            FpClass::OnSky => self.on_sky += 1,
            FpClass::Artifact => self.artifact += 1,
        }
        self.total += 1;
    }

    /// The count of one class.
    pub fn get(&self, class: FpClass) -> usize {
        match class {
            FpClass::OnStar => self.on_star,
            FpClass::OnSky => self.on_sky,
            FpClass::Artifact => self.artifact,
        }
    }

    /// Divided by a number of frames; None for zero frames.
    pub fn per_frame(&self, frames: usize) -> Option<FpRates> {
        (frames > 0).then(|| {
            let f = frames as f64;
            FpRates { on_star: self.on_star as f64 / f, on_sky: self.on_sky as f64 / f, artifact: self.artifact as f64 / f, total: self.total as f64 / f }
        })
    }
}

/// Mean false positives per frame, by class.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct FpRates {
    pub on_star: f64,
    pub on_sky: f64,
    pub artifact: f64,
    pub total: f64,
}

/// False positives on one frame.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FrameFp {
    pub frame: String,
    #[serde(flatten)]
    pub counts: FpCounts,
}

/// False positives of the frames of one timescale.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TimescaleFp {
    pub frames: usize,
    pub total: FpCounts,
    pub per_frame_mean: Option<FpRates>,
    /// Those of `total` that carry an artifact flag.
    pub flagged: FpCounts,
}

/// False positives over the night.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FalsePositiveStats {
    pub total: FpCounts,
    /// Mean over every listed frame; None without frames.
    pub per_frame_mean: Option<FpRates>,
    /// Those of `total` that carry an artifact flag (sharp, streak, dipole, saturated, masked, residual): what a
    /// flag cut would remove.
    pub flagged: FpCounts,
    pub by_timescale: BTreeMap<String, TimescaleFp>,
    /// In the order of the frames list.
    pub per_frame: Vec<FrameFp>,
}

/// The frames-mode summary of a night.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FramesSummary {
    pub frames: usize,
    /// Detections on listed frames with |score| ≥ threshold.
    pub detections: usize,
    pub threshold: f64,
    pub match_radius_px: f64,
    pub targets: usize,
    pub detected: usize,
    /// Detected targets whose detection carries an artifact flag.
    pub detected_flagged: usize,
    pub duplicates: usize,
    /// Detections on frames that were not listed (left out of everything).
    pub unlisted_detections: usize,
    /// Headline figures: timescale `epoch`, all kinds.
    pub completeness_snr_ge_10: Option<f64>,
    pub snr_50: Option<f64>,
    pub score_over_snr_median: Option<f64>,
    pub fp_per_frame: Option<FpRates>,
    /// `epoch` and every `stack:<window>`.
    pub timescales: BTreeMap<String, TimescaleStats>,
    pub false_positives: FalsePositiveStats,
}

/// Quantile `q` in [0, 1] of sorted values, linear between order statistics.
fn quantile(sorted: &[f64], q: f64) -> Option<f64> {
    let last = sorted.len().checked_sub(1)?;
    let pos = q.clamp(0.0, 1.0) * last as f64;
    let i = pos.floor() as usize;
    let j = (i + 1).min(last);
    let frac = pos - i as f64;
    Some(sorted[i] + frac * (sorted[j] - sorted[i]))
}

fn sorted_finite(mut v: Vec<f64>) -> Vec<f64> {
    v.retain(|x| x.is_finite());
    v.sort_by(f64::total_cmp);
    v
}

fn fraction(detected: usize, n: usize) -> Option<f64> {
    (n > 0).then(|| detected as f64 / n as f64)
}

/// Where completeness first reaches 50 %, coming from the weak end. `points` are (position,
/// completeness) of non-empty bins ordered from the weakest to the strongest signal.
pub fn crossing_50(points: &[(f64, f64)]) -> Option<f64> {
    let i = points.iter().position(|&(_, f)| f >= 0.5)?;
    let (x1, f1) = points[i];
    let (x0, f0) = *points.get(i.checked_sub(1)?)?;
    // f0 < 0.5 ≤ f1, so the denominator is positive.
    Some(x0 + (0.5 - f0) / (f1 - f0) * (x1 - x0))
}

fn points(bins: &[Bin]) -> Vec<(f64, f64)> {
    bins.iter().filter_map(|b| b.fraction.map(|f| (b.centre(), f))).collect()
}

/// One sample for the curves: a target and whether it was detected.
struct Sample<'a> {
    kind: &'a str,
    snr: f64,
    mag: Option<f64>,
    detected: bool,
    ratio: Option<f64>,
}

fn snr_bin(snr: f64) -> usize {
    // The last edge is infinite, so every finite |snr| ≥ 0 finds a bin.
    SNR_EDGES.windows(2).position(|w| snr >= w[0] && snr < w[1]).unwrap_or(SNR_EDGES.len() - 2)
}

fn hi_of(edge: f64) -> Option<f64> {
    edge.is_finite().then_some(edge)
}

fn snr_curve(samples: &[&Sample]) -> SnrCurve {
    let mut bins: Vec<Bin> = SNR_EDGES.windows(2).map(|w| Bin { lo: w[0], hi: hi_of(w[1]), n: 0, detected: 0, fraction: None }).collect();
    let (mut n10, mut d10) = (0, 0);
    for s in samples {
        let b = &mut bins[snr_bin(s.snr)];
        b.n += 1;
        b.detected += usize::from(s.detected);
        if s.snr >= 10.0 {
            n10 += 1;
            d10 += usize::from(s.detected);
        }
    }
    for b in &mut bins {
        b.fraction = fraction(b.detected, b.n);
    }
    let detected = samples.iter().filter(|s| s.detected).count();
    SnrCurve {
        n: samples.len(),
        detected,
        fraction: fraction(detected, samples.len()),
        snr_50: crossing_50(&points(&bins)),
        n_snr_ge_10: n10,
        completeness_snr_ge_10: fraction(d10, n10),
        bins,
    }
}

/// Magnitude bin edges shared by every kind of a timescale: (first edge, number of bins).
fn mag_edges(samples: &[Sample]) -> (f64, usize) {
    let mags = sorted_finite(samples.iter().filter_map(|s| s.mag).collect());
    match (mags.first(), mags.last()) {
        (Some(&lo), Some(&hi)) => {
            let start = (lo / MAG_BIN).floor() * MAG_BIN;
            let count = (((hi - start) / MAG_BIN).floor() as usize + 1).min(MAX_MAG_BINS);
            (start, count)
        }
        _ => (0.0, 0),
    }
}

fn mag_curve(samples: &[&Sample], (start, count): (f64, usize)) -> MagCurve {
    let mut bins: Vec<Bin> = (0..count)
        .map(|i| {
            let lo = start + i as f64 * MAG_BIN;
            Bin { lo, hi: Some(lo + MAG_BIN), n: 0, detected: 0, fraction: None }
        })
        .collect();
    let mut no_mag = 0;
    for s in samples {
        match s.mag.filter(|m| m.is_finite()) {
            Some(m) if count > 0 => {
                let i = (((m - start) / MAG_BIN).floor().max(0.0) as usize).min(count - 1);
                bins[i].n += 1;
                bins[i].detected += usize::from(s.detected);
            }
            _ => no_mag += 1,
        }
    }
    for b in &mut bins {
        b.fraction = fraction(b.detected, b.n);
    }
    // Weak end first: faint to bright.
    let mut pts = points(&bins);
    pts.reverse();
    let detected = samples.iter().filter(|s| s.detected).count();
    MagCurve { n: samples.len(), detected, no_mag, mag_50: crossing_50(&pts), bins }
}

fn score_over_snr(samples: &[Sample]) -> ScoreOverSnr {
    let strong = |s: &&Sample| s.snr >= RATIO_MIN_SNR;
    let ratios = sorted_finite(samples.iter().filter(strong).filter_map(|s| s.ratio).collect());
    let by_snr = SNR_EDGES
        .windows(2)
        .map(|w| {
            let v = sorted_finite(samples.iter().filter(|s| s.snr >= w[0] && s.snr < w[1]).filter_map(|s| s.ratio).collect());
            RatioBin { lo: w[0], hi: hi_of(w[1]), n: v.len(), median: quantile(&v, 0.5) }
        })
        .collect();
    let kinds: BTreeSet<&str> = samples.iter().map(|s| s.kind).collect();
    let by_kind = kinds
        .into_iter()
        .map(|k| {
            let v = sorted_finite(samples.iter().filter(strong).filter(|s| s.kind == k).filter_map(|s| s.ratio).collect());
            (k.to_string(), RatioSummary { n: v.len(), median: quantile(&v, 0.5) })
        })
        .collect();
    ScoreOverSnr {
        min_snr: RATIO_MIN_SNR,
        n: ratios.len(),
        median: quantile(&ratios, 0.5),
        p16: quantile(&ratios, 0.16),
        p84: quantile(&ratios, 0.84),
        by_snr,
        by_kind,
    }
}

fn timescale_stats(samples: &[Sample], frames: usize) -> TimescaleStats {
    let kinds: BTreeSet<&str> = samples.iter().map(|s| s.kind).collect();
    let all: Vec<&Sample> = samples.iter().collect();
    let edges = mag_edges(samples);
    let mut completeness_vs_snr = BTreeMap::new();
    let mut completeness_vs_mag = BTreeMap::new();
    completeness_vs_snr.insert(ALL.to_string(), snr_curve(&all));
    completeness_vs_mag.insert(ALL.to_string(), mag_curve(&all, edges));
    for k in kinds {
        let of_kind: Vec<&Sample> = samples.iter().filter(|s| s.kind == k).collect();
        completeness_vs_snr.insert(k.to_string(), snr_curve(&of_kind));
        completeness_vs_mag.insert(k.to_string(), mag_curve(&of_kind, edges));
    }
    TimescaleStats {
        frames,
        targets: samples.len(),
        detected: samples.iter().filter(|s| s.detected).count(),
        completeness_vs_snr,
        completeness_vs_mag,
        score_over_snr: score_over_snr(samples),
    }
}

/// Summarise a night's match at a detection threshold on |score|.
pub fn summarize(m: &NightMatch, dets: &[Detection], threshold: f64) -> FramesSummary {
    let threshold = if threshold.is_finite() { threshold.max(0.0) } else { 0.0 };
    let passes = |i: usize| dets.get(i).is_some_and(|d| d.score.abs() >= threshold);

    // Targets as samples, per timescale.
    let mut by_ts: BTreeMap<String, Vec<Sample>> = BTreeMap::new();
    let mut detected_flagged = 0;
    for t in &m.targets {
        let det = t.detection.filter(|&i| passes(i)).and_then(|i| dets.get(i));
        let snr = t.truth.snr.map_or(0.0, f64::abs);
        detected_flagged += usize::from(det.is_some_and(|d| d.flags & ARTIFACT_FLAGS != 0));
        by_ts.entry(t.timescale.clone()).or_default().push(Sample {
            kind: t.truth.kind.as_str(),
            snr,
            mag: t.truth.mag,
            detected: det.is_some(),
            ratio: det.and_then(|d| (snr > 0.0).then(|| d.score.abs() / snr)),
        });
    }

    // Frames per timescale; every listed frame's timescale appears even without targets.
    let mut frames_per_ts: BTreeMap<String, usize> = BTreeMap::new();
    for f in &m.frames {
        *frames_per_ts.entry(timescale_of(f)).or_default() += 1;
    }
    for ts in frames_per_ts.keys() {
        by_ts.entry(ts.clone()).or_default();
    }
    let timescales: BTreeMap<String, TimescaleStats> =
        by_ts.iter().map(|(ts, s)| (ts.clone(), timescale_stats(s, frames_per_ts.get(ts).copied().unwrap_or(0)))).collect();

    // False positives per frame.
    let mut per_frame: Vec<FrameFp> = m.frames.iter().map(|f| FrameFp { frame: f.clone(), counts: FpCounts::default() }).collect();
    let frame_index: std::collections::HashMap<&str, usize> = m.frames.iter().enumerate().map(|(i, f)| (f.as_str(), i)).collect();
    let (mut total, mut flagged) = (FpCounts::default(), FpCounts::default());
    let mut ts_flagged: BTreeMap<String, FpCounts> = BTreeMap::new();
    for fp in &m.false_positives {
        if !passes(fp.detection) {
            continue;
        }
        let Some(d) = dets.get(fp.detection) else { continue };
        total.add(fp.class);
        if d.flags & ARTIFACT_FLAGS != 0 {
            flagged.add(fp.class);
            ts_flagged.entry(timescale_of(&d.frame)).or_default().add(fp.class);
        }
        if let Some(&i) = frame_index.get(d.frame.as_str()) {
            per_frame[i].counts.add(fp.class);
        }
    }
    let mut ts_fp: BTreeMap<String, FpCounts> = BTreeMap::new();
    for f in &per_frame {
        let c = ts_fp.entry(timescale_of(&f.frame)).or_default();
        c.on_star += f.counts.on_star;
        c.on_sky += f.counts.on_sky;
        c.artifact += f.counts.artifact;
        c.total += f.counts.total;
    }
    let by_timescale = ts_fp
        .into_iter()
        .map(|(ts, c)| {
            let frames = frames_per_ts.get(&ts).copied().unwrap_or(0);
            let flagged = ts_flagged.get(&ts).copied().unwrap_or_default();
            (ts, TimescaleFp { frames, total: c, per_frame_mean: c.per_frame(frames), flagged })
        })
        .collect::<BTreeMap<_, _>>();

    let epoch = timescales.get(EPOCH);
    let epoch_all = epoch.and_then(|e| e.completeness_vs_snr.get(ALL));
    let listed_dets = dets
        .iter()
        .enumerate()
        .filter(|&(i, d)| passes(i) && frame_index.contains_key(d.frame.as_str()))
        .count();
    FramesSummary {
        frames: m.frames.len(),
        detections: listed_dets,
        threshold,
        match_radius_px: m.radius,
        targets: m.targets.len(),
        detected: timescales.values().map(|t| t.detected).sum(),
        detected_flagged,
        duplicates: m.duplicates.iter().filter(|&&i| passes(i)).count(),
        unlisted_detections: m.unlisted_detections,
        completeness_snr_ge_10: epoch_all.and_then(|c| c.completeness_snr_ge_10),
        snr_50: epoch_all.and_then(|c| c.snr_50),
        score_over_snr_median: epoch.and_then(|e| e.score_over_snr.median),
        fp_per_frame: by_timescale.get(EPOCH).and_then(|t: &TimescaleFp| t.per_frame_mean),
        false_positives: FalsePositiveStats { total, per_frame_mean: total.per_frame(m.frames.len()), flagged, by_timescale, per_frame },
        timescales,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::matching::tests::night;
    use crate::bench::matching::{match_night, MATCH_RADIUS_PX};

    fn close(a: Option<f64>, b: f64) -> bool {
        a.is_some_and(|a| (a - b).abs() < 1e-9)
    }

    #[test]
    fn counts_fractions_and_crossings_of_the_test_night() {
        let (d, t, frames) = night();
        let m = match_night(&d, &t, &frames, MATCH_RADIUS_PX);
        let s = summarize(&m, &d, 5.0);
        assert_eq!((s.frames, s.detections, s.targets, s.detected, s.duplicates, s.unlisted_detections), (2, 13, 11, 5, 1, 1));
        assert_eq!(s.timescales.keys().collect::<Vec<_>>(), vec!["epoch"]);
        let e = &s.timescales["epoch"];
        let all = &e.completeness_vs_snr["all"];
        let got: Vec<(usize, usize)> = all.bins.iter().map(|b| (b.n, b.detected)).collect();
        let want = [(0, 0), (1, 0), (1, 0), (1, 1), (1, 0), (1, 0), (1, 1), (1, 1), (2, 1), (1, 1), (0, 0), (1, 0), (0, 0), (0, 0), (0, 0)];
        assert_eq!(got, want);
        assert_eq!(all.bins[0].fraction, None);
        assert_eq!(all.bins[8].fraction, Some(0.5));
        assert_eq!(all.bins[14].hi, None);
        // Weak end: 0 at 2.5, 1 at 3.5 → 3.0.
        assert!(close(all.snr_50, 3.0), "{:?}", all.snr_50);
        assert!(close(s.snr_50, 3.0));
        assert!(close(s.completeness_snr_ge_10, 0.5));
        assert_eq!(all.n_snr_ge_10, 2);
        let sn = &e.completeness_vs_snr["sn"];
        assert_eq!((sn.n, sn.detected), (5, 3));
        assert!(close(sn.snr_50, 2.5));
        let var = &e.completeness_vs_snr["variable"];
        assert_eq!((var.n, var.detected), (5, 2));
        assert!(close(var.snr_50, 5.5));
        let fast = &e.completeness_vs_snr["fast"];
        assert_eq!((fast.n, fast.detected, fast.snr_50), (1, 0, None));
        assert!(!e.completeness_vs_snr.contains_key("slow"));

        // Magnitudes: 0.5 mag bins from 20.0 to 24.5.
        let mag = &e.completeness_vs_mag["all"];
        let got: Vec<(f64, usize, usize)> = mag.bins.iter().map(|b| (b.lo, b.n, b.detected)).collect();
        let want = [(20.0, 1, 0), (20.5, 5, 2), (21.0, 0, 0), (21.5, 1, 1), (22.0, 1, 1), (22.5, 1, 0), (23.0, 1, 1), (23.5, 0, 0), (24.0, 1, 0)];
        assert_eq!(got, want);
        assert!(close(mag.mag_50, 23.75), "{:?}", mag.mag_50);
        assert_eq!(e.completeness_vs_mag["sn"].bins.len(), 9);

        // Score over SNR: T6 5.2/6, T7 6.5/7, T9 8/9, T10 9/10 → median of the middle two.
        let r = &e.score_over_snr;
        assert_eq!(r.n, 4);
        assert!(close(r.median, 0.5 * (8.0 / 9.0 + 0.9)));
        assert!(close(s.score_over_snr_median, 0.5 * (8.0 / 9.0 + 0.9)));
        assert_eq!((r.by_snr[3].n, r.by_snr[3].median), (1, Some(5.1 / 3.0)));
        assert_eq!(r.by_kind["sn"].n, 2);

        // False positives: A has 2 on star, 2 on sky, 2 artifacts; B 1 on sky.
        let fp = &s.false_positives;
        assert_eq!(fp.total, FpCounts { on_star: 2, on_sky: 3, artifact: 2, total: 7 });
        assert_eq!(fp.per_frame[0].counts, FpCounts { on_star: 2, on_sky: 2, artifact: 2, total: 6 });
        assert_eq!(fp.per_frame[1].counts, FpCounts { on_star: 0, on_sky: 1, artifact: 0, total: 1 });
        assert_eq!(s.fp_per_frame, Some(FpRates { on_star: 1.0, on_sky: 1.5, artifact: 1.0, total: 3.5 }));
        assert_eq!(fp.flagged.total, 0);
    }

    #[test]
    fn a_stricter_threshold_drops_detections() {
        let (d, t, frames) = night();
        let m = match_night(&d, &t, &frames, MATCH_RADIUS_PX);
        // At 6: T3 (5.1) and T6 (5.2) are lost; FPs at 5.05, 5.3, 5.4, 5.6 and the duplicate
        // (5.5) go.
        let s = summarize(&m, &d, 6.0);
        assert_eq!((s.detected, s.duplicates, s.detections), (3, 0, 6));
        assert_eq!(s.false_positives.total, FpCounts { on_star: 2, on_sky: 0, artifact: 1, total: 3 });
    }

    #[test]
    fn crossing_interpolates_between_bins() {
        assert!(close(crossing_50(&[(0.5, 0.0), (1.5, 0.2), (2.5, 0.4), (3.5, 0.8), (4.5, 1.0)]), 2.75));
        // Exactly 0.5 in a bin: that bin's position.
        assert!(close(crossing_50(&[(1.0, 0.0), (2.0, 0.5)]), 2.0));
        // A dip after the first crossing does not move it.
        assert!(close(crossing_50(&[(1.0, 0.0), (2.0, 1.0), (3.0, 0.0)]), 1.5));
        assert_eq!(crossing_50(&[(1.0, 0.6), (2.0, 1.0)]), None);
        assert_eq!(crossing_50(&[(1.0, 0.1), (2.0, 0.2)]), None);
        assert_eq!(crossing_50(&[]), None);
    }

    #[test]
    fn empty_night_gives_nones_not_nans() {
        let m = match_night(&[], &[], &[], MATCH_RADIUS_PX);
        let s = summarize(&m, &[], 5.0);
        assert_eq!((s.frames, s.targets, s.detected), (0, 0, 0));
        assert_eq!((s.snr_50, s.completeness_snr_ge_10, s.fp_per_frame, s.score_over_snr_median), (None, None, None, None));
        assert!(s.timescales.is_empty());
        let json = serde_json::to_string(&s).unwrap();
        assert!(!json.contains("NaN"), "{json}");

        // Frames but no detections or targets: zero false positives per frame, empty curves.
        let frames = vec!["a".to_string(), "b".to_string()];
        let m = match_night(&[], &[], &frames, MATCH_RADIUS_PX);
        let s = summarize(&m, &[], 5.0);
        assert_eq!(s.fp_per_frame.map(|r| r.total), Some(0.0));
        let all = &s.timescales["epoch"].completeness_vs_snr["all"];
        assert_eq!((all.n, all.fraction, all.snr_50), (0, None, None));
        assert!(s.timescales["epoch"].completeness_vs_mag["all"].bins.is_empty());
    }

    #[test]
    fn stack_detections_form_their_own_timescale() {
        use crate::bench::matching::tests::{det, truth};
        let (e, st) = ("frames/A.fits", "stack:3:frames/A.fits");
        let t = vec![truth(2_000_001, "slow", e, 10.0, 10.0, 100.0, 0.0, Some(2.0)), truth(2_000_001, "slow", st, 10.0, 10.0, 100.0, 0.0, Some(3.5))];
        let d = vec![det(st, 10.2, 10.0, 5.5)];
        let m = match_night(&d, &t, &[e.to_string(), st.to_string()], MATCH_RADIUS_PX);
        let s = summarize(&m, &d, 5.0);
        assert_eq!(s.timescales["epoch"].detected, 0);
        assert_eq!(s.timescales["stack:3"].detected, 1);
        assert_eq!(s.false_positives.by_timescale["stack:3"].frames, 1);
        assert_eq!(s.completeness_snr_ge_10, None);
        assert!(close(s.timescales["stack:3"].completeness_vs_snr["slow"].fraction, 1.0));
    }
}

//! Matching a night's detection catalogue to its truth table (`docs/bench.md`).
//!
//! Everything happens **per frame**: a detection and a truth row can only match when their
//! `frame` strings are equal (the manifest's `file`; later stacks use `stack:<window>:<frame>`).
//!
//! - **Targets** are the truth rows a detector should find: transients and variable stars
//!   ([`TruthRecord::is_variable`]) with a non-zero difference flux (`flux != ref_flux`) and an
//!   optimal SNR.
//! - **Matching** is one-to-one and greedy by distance: every (detection, target) pair within the
//!   radius ([`MATCH_RADIUS_PX`] = 1.5 px by default) is taken nearest first, skipping pairs whose
//!   detection or target is already taken. The score's sign is ignored (a fading variable is
//!   found by a negative score).
//! - A detection left over that lies within the radius of a target already matched is a
//!   **duplicate** (a split peak), counted on its own and not as a false positive.
//! - Every other detection is a **false positive**, classed against all truth rows of its frame
//!   ([`FpClass`]): `artifact` within the radius of a cosmic ray or hot pixel, or within the
//!   radius of the bad column in x (any y); else `on_star` within [`source_radius`] of a star,
//!   galaxy or other source; else `on_sky`. Artifact wins over star.
//!
//! Truth rows and detections on frames not in the `frames` list are left out; the count of such
//! detections is kept ([`NightMatch::unlisted_detections`]) so that a mismatch between the
//! catalogue and the manifest shows.

use std::collections::{HashMap, HashSet};

use serde::Serialize;

use crate::detect::catalog::Detection;
use crate::sim::night::truth::TruthRecord;

/// The matching radius of `blink bench`, in pixels.
pub const MATCH_RADIUS_PX: f64 = 1.5;

/// The seeing FWHM the false-positive classes assume, in pixels (the simulator's median).
pub const NOMINAL_FWHM_PX: f64 = 3.0;

/// The largest radius around a source in which a false positive counts as `on_star`, pixels.
pub const MAX_SOURCE_RADIUS_PX: f64 = 20.0;

/// Cosmic rays are streaks whose truth position is their middle: a detection anywhere along one
/// is on the artifact, so their reach is the radius plus this half-length (the simulator's
/// longest streak is 10 px).
pub const COSMIC_HALF_LENGTH_PX: f64 = 5.0;

/// Timescale key of frames that are single exposures.
pub const EPOCH: &str = "epoch";

/// Where a false positive lies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FpClass {
    /// On a star, galaxy or other astrophysical source: a subtraction residual.
    OnStar,
    /// On empty sky: noise above threshold.
    OnSky,
    /// On a cosmic ray, hot pixel or the bad column.
    Artifact,
}

impl FpClass {
    /// All classes, in the order reports list them.
    pub const ALL: [FpClass; 3] = [FpClass::OnStar, FpClass::OnSky, FpClass::Artifact];

    /// The JSON name (`on_star`, `on_sky`, `artifact`).
    pub fn name(self) -> &'static str {
        match self {
            FpClass::OnStar => "on_star",
            FpClass::OnSky => "on_sky",
            FpClass::Artifact => "artifact",
        }
    }
}

/// One target (a truth row a detector should find) and what found it.
#[derive(Debug, Clone, PartialEq)]
pub struct TargetMatch {
    pub truth: TruthRecord,
    /// [`timescale_of`] the frame: `epoch`, or `stack:<window>`.
    pub timescale: String,
    /// Index into the detections of the detection matched to it.
    pub detection: Option<usize>,
    /// Distance to that detection, pixels.
    pub distance: Option<f64>,
}

/// A detection that matched no target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FalsePositive {
    /// Index into the detections.
    pub detection: usize,
    pub class: FpClass,
}

/// What became of one detection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Matched the target with this index in [`NightMatch::targets`].
    Matched(usize),
    /// Within the radius of a target another detection matched.
    Duplicate(usize),
    FalsePositive(FpClass),
    /// On a frame not in the `frames` list.
    Unlisted,
}

/// What a night's detections matched.
#[derive(Debug, Clone, PartialEq)]
pub struct NightMatch {
    pub radius: f64,
    /// The frames the detector ran on, in the order given.
    pub frames: Vec<String>,
    /// Every target on a listed frame, in truth-table order.
    pub targets: Vec<TargetMatch>,
    /// In detection order.
    pub false_positives: Vec<FalsePositive>,
    /// Indices of duplicate detections, in detection order.
    pub duplicates: Vec<usize>,
    /// One per detection, parallel to the detections.
    pub outcomes: Vec<Outcome>,
    /// Detections on frames not in `frames`.
    pub unlisted_detections: usize,
}

/// The timescale a frame key belongs to: `stack:<window>` for `stack:<window>:<frame>`, else
/// `epoch`.
pub fn timescale_of(frame: &str) -> String {
    match frame.strip_prefix("stack:") {
        Some(rest) => format!("stack:{}", rest.split(':').next().unwrap_or("")),
        None => EPOCH.to_string(),
    }
}

/// Whether a truth row is a target: a transient or variable star with a difference to find.
pub fn is_target(t: &TruthRecord) -> bool {
    t.is_variable() && t.flux != t.ref_flux && t.snr.is_some_and(f64::is_finite)
}

/// Radius around a source (star, galaxy, variable or transient) within which a false positive
/// counts as `on_star`: one nominal FWHM per decade of flux above 100 ADU, at least the matching
/// radius and at most [`MAX_SOURCE_RADIUS_PX`]. `flux` is the larger of the row's `flux` and
/// `ref_flux`, ADU. At `MAGZP` 28.5: mag 21 → 3 px, 18.5 → 6 px, 16 → 9 px, 13.5 → 12 px.
pub fn source_radius(flux: f64, match_radius: f64) -> f64 {
    let decades = if flux > 100.0 { (flux / 100.0).log10() } else { 0.0 };
    (NOMINAL_FWHM_PX * decades).clamp(match_radius, MAX_SOURCE_RADIUS_PX.max(match_radius))
}

/// A coarse grid over points of one frame, for neighbour queries within a radius.
struct Grid {
    cell: f64,
    cells: HashMap<(i64, i64), Vec<usize>>,
}

impl Grid {
    fn new(cell: f64, points: impl Iterator<Item = (usize, f64, f64)>) -> Grid {
        let mut cells: HashMap<(i64, i64), Vec<usize>> = HashMap::new();
        for (i, x, y) in points {
            cells.entry(Self::key(cell, x, y)).or_default().push(i);
        }
        Grid { cell, cells }
    }

    fn key(cell: f64, x: f64, y: f64) -> (i64, i64) {
        ((x / cell).floor() as i64, (y / cell).floor() as i64)
    }

    /// Candidates within `r` of (x, y) (a superset; the caller checks the distance).
    fn near(&self, x: f64, y: f64, r: f64) -> impl Iterator<Item = usize> + '_ {
        let (x0, y0) = Self::key(self.cell, x - r, y - r);
        let (x1, y1) = Self::key(self.cell, x + r, y + r);
        (x0..=x1).flat_map(move |cx| (y0..=y1).map(move |cy| (cx, cy))).flat_map(|k| self.cells.get(&k).into_iter().flatten().copied())
    }
}

fn dist(ax: f64, ay: f64, bx: f64, by: f64) -> f64 {
    (ax - bx).hypot(ay - by)
}

/// Match a night's detections to its truth table, frame by frame (see the module docs).
pub fn match_night(dets: &[Detection], truth: &[TruthRecord], frames: &[String], radius: f64) -> NightMatch {
    let radius = if radius.is_finite() && radius >= 0.0 { radius } else { MATCH_RADIUS_PX };
    let listed: HashSet<&str> = frames.iter().map(String::as_str).collect();

    // Truth rows and detections per listed frame, by index.
    let mut truth_by_frame: HashMap<&str, Vec<usize>> = HashMap::new();
    for (i, t) in truth.iter().enumerate() {
        if listed.contains(t.frame.as_str()) {
            truth_by_frame.entry(t.frame.as_str()).or_default().push(i);
        }
    }
    let mut dets_by_frame: HashMap<&str, Vec<usize>> = HashMap::new();
    let mut outcomes = vec![Outcome::Unlisted; dets.len()];
    let mut unlisted_detections = 0;
    for (i, d) in dets.iter().enumerate() {
        if listed.contains(d.frame.as_str()) {
            dets_by_frame.entry(d.frame.as_str()).or_default().push(i);
        } else {
            unlisted_detections += 1;
        }
    }

    // Targets in truth-table order; index of each truth row's target.
    let mut targets = Vec::new();
    let mut target_of_truth: HashMap<usize, usize> = HashMap::new();
    for (i, t) in truth.iter().enumerate() {
        if listed.contains(t.frame.as_str()) && is_target(t) {
            target_of_truth.insert(i, targets.len());
            targets.push(TargetMatch { truth: t.clone(), timescale: timescale_of(&t.frame), detection: None, distance: None });
        }
    }

    // Frames in a fixed order so that results do not depend on hashing.
    let mut frame_keys: Vec<&str> = dets_by_frame.keys().copied().collect();
    frame_keys.sort_unstable();
    let empty = Vec::new();
    for frame in frame_keys {
        let det_ix = &dets_by_frame[frame];
        let rows = truth_by_frame.get(frame).unwrap_or(&empty);
        let frame_targets: Vec<usize> = rows.iter().filter_map(|r| target_of_truth.get(r).copied()).collect();
        let cell = radius.max(1.0);
        let tgrid = Grid::new(cell, frame_targets.iter().map(|&k| (k, targets[k].truth.x, targets[k].truth.y)));

        // Every pair within the radius, nearest first; ties by detection then target index.
        let mut pairs: Vec<(f64, usize, usize)> = Vec::new();
        for &di in det_ix {
            let d = &dets[di];
            for k in tgrid.near(d.x, d.y, radius) {
                let t = &targets[k].truth;
                let r = dist(d.x, d.y, t.x, t.y);
                if r <= radius {
                    pairs.push((r, di, k));
                }
            }
        }
        pairs.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
        let mut det_taken: HashSet<usize> = HashSet::new();
        for &(r, di, k) in &pairs {
            if targets[k].detection.is_none() && !det_taken.contains(&di) {
                targets[k].detection = Some(di);
                targets[k].distance = Some(r);
                det_taken.insert(di);
                outcomes[di] = Outcome::Matched(k);
            }
        }
        // Left-over detections within the radius of a target: duplicates (nearest target).
        for &(_, di, k) in &pairs {
            if !det_taken.contains(&di) {
                det_taken.insert(di);
                outcomes[di] = Outcome::Duplicate(k);
            }
        }

        // The rest are false positives, classed against every truth row of the frame.
        let mut artifacts = Vec::new();
        let mut columns = Vec::new();
        let mut sources = Vec::new();
        for &r in rows {
            let t = &truth[r];
            match t.kind.as_str() {
                "bad_column" => columns.push(t.x),
                "cosmic" | "hot_pixel" => artifacts.push(r),
                _ => sources.push(r),
            }
        }
        let areach = radius + COSMIC_HALF_LENGTH_PX;
        let agrid = Grid::new(cell.max(areach), artifacts.iter().map(|&r| (r, truth[r].x, truth[r].y)));
        let sgrid = Grid::new(MAX_SOURCE_RADIUS_PX.max(cell), sources.iter().map(|&r| (r, truth[r].x, truth[r].y)));
        let search = MAX_SOURCE_RADIUS_PX.max(radius);
        for &di in det_ix {
            if det_taken.contains(&di) {
                continue;
            }
            let d = &dets[di];
            let on_artifact = columns.iter().any(|&c| (d.x - c).abs() <= radius)
                || agrid.near(d.x, d.y, areach).any(|r| {
                    let t = &truth[r];
                    let reach = if t.kind == "cosmic" { areach } else { radius };
                    dist(d.x, d.y, t.x, t.y) <= reach
                });
            let class = if on_artifact {
                FpClass::Artifact
            } else if sgrid.near(d.x, d.y, search).any(|r| {
                let t = &truth[r];
                dist(d.x, d.y, t.x, t.y) <= source_radius(t.flux.max(t.ref_flux), radius)
            }) {
                FpClass::OnStar
            } else {
                FpClass::OnSky
            };
            outcomes[di] = Outcome::FalsePositive(class);
        }
    }

    let false_positives = outcomes
        .iter()
        .enumerate()
        .filter_map(|(i, o)| match o {
            Outcome::FalsePositive(class) => Some(FalsePositive { detection: i, class: *class }),
            _ => None,
        })
        .collect();
    let duplicates = outcomes.iter().enumerate().filter(|(_, o)| matches!(o, Outcome::Duplicate(_))).map(|(i, _)| i).collect();
    NightMatch { radius, frames: frames.to_vec(), targets, false_positives, duplicates, outcomes, unlisted_detections }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn truth(id: u64, kind: &str, frame: &str, x: f64, y: f64, flux: f64, ref_flux: f64, snr: Option<f64>) -> TruthRecord {
        let mag = (flux > 0.0).then(|| 28.5 - 2.5 * flux.log10());
        TruthRecord { id, kind: kind.into(), host: None, frame: frame.into(), mjd: 61000.0, x, y, ra: 0.0, dec: 0.0, mag, flux, ref_flux, snr }
    }

    pub(crate) fn det(frame: &str, x: f64, y: f64, score: f64) -> Detection {
        Detection { frame: frame.into(), mjd: 61000.0, band: "r".into(), x, y, ra: None, dec: None, score, flux: 100.0 * score, flux_err: 100.0, mag: None, flags: 0 }
    }

    /// The night of the statistics tests: two frames, 10 targets on frame A at SNR 1…10, plus
    /// static sources and artifacts.
    ///
    /// Frame A: targets T1…T10 at (100·k, 100), snr = k, kind `sn` for odd k, `variable` for
    /// even k (variables have ref_flux 1000, flux 1000 + 50·k; sn have flux 50·k).
    /// Detections on A:
    ///  0. T10 at 0.5 px       → matched
    ///  1. T9 at 1.0 px        → matched
    ///  2. T8 at 1.6 px        → not matched: FP, on_star (T8, flux 1400, reaches 3.4 px)
    ///  3. T7 at 0.3 px (negative score) → matched
    ///  4. T7 at 1.2 px        → duplicate
    ///  5. T6 at 1.5 px exactly → matched (the radius is inclusive)
    ///  6. T3 at 0.0 px        → matched
    ///  7. star (flux 1e5, radius 9 px) at 5 px → FP on_star
    ///  8. cosmic ray (a streak: reach 1.5 + 5 px) at 1.4 px, also 5 px from that star → FP
    ///     artifact (artifact wins); detection 7 is 7.2 px from it, beyond its reach
    ///  9. 1 px from the bad column at x = 700, y far from anything → FP artifact
    /// 10. empty sky            → FP on_sky
    /// 11. faint star (flux 200, radius 1.5 px) at 2 px → FP on_sky
    ///
    /// Frame B: a target T11 (fast, snr 20) not detected; detection 12 on empty sky → on_sky.
    /// Detection 13 on frame C (not listed) → unlisted.
    pub(crate) fn night() -> (Vec<Detection>, Vec<TruthRecord>, Vec<String>) {
        let (a, b) = ("frames/A.fits", "frames/B.fits");
        let mut t = Vec::new();
        for k in 1..=10u64 {
            let x = 100.0 * k as f64;
            if k % 2 == 1 {
                t.push(truth(2_000_000 + k, "sn", a, x, 100.0, 50.0 * k as f64, 0.0, Some(k as f64)));
            } else {
                t.push(truth(3_000_000 + k, "variable", a, x, 100.0, 1000.0 + 50.0 * k as f64, 1000.0, Some(k as f64)));
            }
        }
        // Not targets: a static star, a variable with no difference, a transient with no snr.
        t.push(truth(1, "star", a, 500.0, 500.0, 1e5, 1e5, Some(0.0)));
        t.push(truth(2, "star", a, 900.0, 900.0, 200.0, 200.0, Some(0.0)));
        t.push(truth(3_000_100, "variable", a, 300.0, 300.0, 500.0, 500.0, Some(0.0)));
        t.push(truth(2_000_100, "fast", a, 600.0, 600.0, 0.0, 0.0, None));
        t.push(truth(4_000_000, "cosmic", a, 504.0, 499.0, 3000.0, 0.0, None));
        t.push(truth(6_000_000, "bad_column", a, 700.0, 1024.0, 0.0, 0.0, None));
        t.push(truth(2_000_011, "fast", b, 50.0, 50.0, 2000.0, 0.0, Some(20.0)));
        let d = vec![
            det(a, 1000.5, 100.0, 9.0),
            det(a, 900.0, 101.0, 8.0),
            det(a, 801.6, 100.0, 7.0),
            det(a, 700.0, 100.3, -6.5),
            det(a, 701.2, 100.0, 5.5),
            det(a, 600.0, 101.5, 5.2),
            det(a, 300.0, 100.0, 5.1),
            det(a, 500.0, 505.0, 6.0),
            det(a, 505.0, 500.0, 12.0),
            det(a, 701.0, 1500.0, 5.3),
            det(a, 1500.0, 1500.0, 5.05),
            det(a, 902.0, 900.0, 5.4),
            det(b, 400.0, 400.0, 5.6),
            det("frames/C.fits", 1.0, 1.0, 30.0),
        ];
        (d, t, vec![a.to_string(), b.to_string()])
    }

    #[test]
    fn one_to_one_within_radius_and_fp_classes() {
        let (d, t, frames) = night();
        let m = match_night(&d, &t, &frames, MATCH_RADIUS_PX);
        assert_eq!(m.targets.len(), 11);
        let found: Vec<(u64, Option<usize>)> = m.targets.iter().map(|t| (t.truth.id, t.detection)).collect();
        let expect = [
            (2_000_001, None),
            (3_000_002, None),
            (2_000_003, Some(6)),
            (3_000_004, None),
            (2_000_005, None),
            (3_000_006, Some(5)),
            (2_000_007, Some(3)),
            (3_000_008, None),
            (2_000_009, Some(1)),
            (3_000_010, Some(0)),
            (2_000_011, None),
        ];
        assert_eq!(found, expect);
        assert!((m.targets[6].distance.unwrap() - 0.3).abs() < 1e-9);
        assert_eq!(m.duplicates, vec![4]);
        let fps: Vec<(usize, FpClass)> = m.false_positives.iter().map(|f| (f.detection, f.class)).collect();
        assert_eq!(
            fps,
            vec![
                (2, FpClass::OnStar),
                (7, FpClass::OnStar),
                (8, FpClass::Artifact),
                (9, FpClass::Artifact),
                (10, FpClass::OnSky),
                (11, FpClass::OnSky),
                (12, FpClass::OnSky),
            ]
        );
        assert_eq!(m.unlisted_detections, 1);
        assert_eq!(m.outcomes[13], Outcome::Unlisted);
        assert_eq!(m.outcomes[4], Outcome::Duplicate(6));
        assert_eq!(m.outcomes[0], Outcome::Matched(9));
    }

    #[test]
    fn nearest_pair_wins_when_two_detections_compete() {
        let f = "f";
        let t = vec![truth(2_000_001, "sn", f, 10.0, 10.0, 100.0, 0.0, Some(5.0)), truth(2_000_002, "sn", f, 12.0, 10.0, 100.0, 0.0, Some(5.0))];
        // Detection 0 sits 0.9 px from target 0 and 1.1 px from target 1; detection 1 0.2 px
        // from target 1: greedy gives 0→T0, 1→T1.
        let d = vec![det(f, 10.9, 10.0, 6.0), det(f, 12.2, 10.0, 6.0)];
        let m = match_night(&d, &t, &["f".to_string()], 1.5);
        assert_eq!((m.targets[0].detection, m.targets[1].detection), (Some(0), Some(1)));
        assert!(m.false_positives.is_empty() && m.duplicates.is_empty());
    }

    #[test]
    fn empty_inputs_and_helpers() {
        let m = match_night(&[], &[], &[], MATCH_RADIUS_PX);
        assert!(m.targets.is_empty() && m.false_positives.is_empty() && m.frames.is_empty());
        assert_eq!(timescale_of("frames/F0001-r-0000.fits"), "epoch");
        assert_eq!(timescale_of("stack:3:frames/F0001-r-0002.fits"), "stack:3");
        assert_eq!(source_radius(10.0, 1.5), 1.5);
        assert!((source_radius(1e5, 1.5) - 9.0).abs() < 1e-9);
        assert_eq!(source_radius(1e12, 1.5), MAX_SOURCE_RADIUS_PX);
        assert_eq!(serde_json::to_string(&FpClass::OnStar).unwrap(), "\"on_star\"");
    }
}

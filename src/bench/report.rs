//! The report of `blink bench`: a short plain-text table for the terminal and the full figures
//! as JSON (`docs/bench.md` lists the keys).
//!
//! The table puts the figures a researcher compares first (completeness at |SNR| ≥ 10, the
//! 50 % SNR, false positives per frame by class, score over optimal SNR, the score's scatter on
//! empty sky, speed and stage times), then completeness against |optimal SNR| per kind. Values
//! that could not be measured print as `—` and are null in the JSON (never NaN).

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::Path;

use serde::Serialize;

use super::alerts::AlertsSummary;
use super::matching::FpClass;
use super::stats::{FramesSummary, SnrCurve, TimescaleStats, ALL, KINDS};

/// Wall time of one stage of the frames run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StageTime {
    pub name: String,
    pub seconds: f64,
}

/// How fast the frames run went.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Speed {
    /// Engine adapter, e.g. "Vulkan | NVIDIA H100 | DiscreteGpu" or "cpu".
    pub adapter: String,
    pub frames: usize,
    /// Science pixels processed, 10⁶.
    pub megapixels: f64,
    pub wall_s: f64,
    /// Non-finite (null in JSON) when `wall_s` is not positive.
    pub frames_per_s: f64,
    pub mpix_per_s: f64,
    pub stages: Vec<StageTime>,
}

impl Speed {
    /// Rates from counts and wall time.
    pub fn new(adapter: impl Into<String>, frames: usize, megapixels: f64, wall_s: f64, stages: Vec<StageTime>) -> Speed {
        let rate = |x: f64| if wall_s > 0.0 { x / wall_s } else { f64::NAN };
        Speed { adapter: adapter.into(), frames, megapixels, wall_s, frames_per_s: rate(frames as f64), mpix_per_s: rate(megapixels), stages }
    }
}

/// Frames mode: the statistics, the speed, and the two numbers the caller measured.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FramesReport {
    pub summary: FramesSummary,
    pub speed: Speed,
    /// Robust σ of the score image on empty sky (1 for a perfectly normalised score).
    pub score_sigma_empty_sky: f64,
    pub threshold: f64,
    /// Per stacking window (`detect::stacking`, `bench::stacks`); empty without stacks.
    pub stacks: Vec<super::stacks::WindowSummary>,
}

/// Everything `blink bench` measured on a night.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BenchReport {
    /// The night folder.
    pub night: String,
    /// The manifest's `generator`.
    pub generator: Option<String>,
    pub blink_version: String,
    pub frames: Option<FramesReport>,
    pub alerts: Option<AlertsSummary>,
}

/// A number with `prec` decimals, or `—` when not finite.
fn num(v: f64, prec: usize) -> String {
    if v.is_finite() {
        format!("{v:.prec$}")
    } else {
        "—".into()
    }
}

fn opt(v: Option<f64>, prec: usize) -> String {
    v.map_or_else(|| "—".into(), |v| num(v, prec))
}

/// `fraction (detected/n)` of one completeness cell.
fn cell(detected: usize, n: usize, fraction: Option<f64>) -> String {
    match fraction {
        Some(f) => format!("{f:.2} {detected}/{n}"),
        None => "—".into(),
    }
}

/// Columns of the completeness table: `all`, then the standard kinds present, then any other.
fn kind_columns(ts: &TimescaleStats) -> Vec<&str> {
    let mut cols = vec![ALL];
    cols.extend(KINDS.iter().copied().filter(|k| ts.completeness_vs_snr.contains_key(*k)));
    cols.extend(ts.completeness_vs_snr.keys().map(String::as_str).filter(|k| *k != ALL && !KINDS.contains(k)));
    cols
}

fn snr_range(lo: f64, hi: Option<f64>) -> String {
    match hi {
        Some(hi) => format!("{lo}–{hi}"),
        None => format!("≥ {lo}"),
    }
}

/// Pad to a width in characters (not bytes: the table holds `—`, `≥`, `σ`).
fn pad(s: &str, width: usize) -> String {
    let n = s.chars().count();
    format!("{s}{}", " ".repeat(width.saturating_sub(n)))
}

fn lpad(s: &str, width: usize) -> String {
    let n = s.chars().count();
    format!("{}{s}", " ".repeat(width.saturating_sub(n)))
}

/// Completeness against |SNR| for one timescale, one column per kind.
fn completeness_table(name: &str, ts: &TimescaleStats) -> String {
    let cols = kind_columns(ts);
    let curves: Vec<&SnrCurve> = cols.iter().filter_map(|k| ts.completeness_vs_snr.get(*k)).collect();
    let w = 16;
    let mut out = String::new();
    let _ = writeln!(out, "Completeness vs |optimal SNR| ({name}, {} frames): fraction detected/targets", ts.frames);
    let _ = writeln!(out, "  {}{}", pad("|SNR|", 10), cols.iter().map(|c| lpad(c, w)).collect::<String>());
    let nbins = curves.first().map_or(0, |c| c.bins.len());
    for b in 0..nbins {
        if curves.iter().all(|c| c.bins.get(b).is_none_or(|x| x.n == 0)) {
            continue;
        }
        let range = curves.first().and_then(|c| c.bins.get(b)).map_or_else(String::new, |x| snr_range(x.lo, x.hi));
        let cells: String = curves.iter().map(|c| lpad(&c.bins.get(b).map_or_else(|| "—".into(), |x| cell(x.detected, x.n, x.fraction)), w)).collect();
        let _ = writeln!(out, "  {}{cells}", pad(&range, 10));
    }
    let row = |label: &str, f: &dyn Fn(&SnrCurve) -> String| format!("  {}{}\n", pad(label, 10), curves.iter().map(|c| lpad(&f(c), w)).collect::<String>());
    out.push_str(&row("total", &|c| cell(c.detected, c.n, c.fraction)));
    out.push_str(&row("≥ 10", &|c| match c.completeness_snr_ge_10 {
        Some(f) => format!("{f:.2} n={}", c.n_snr_ge_10),
        None => "—".into(),
    }));
    out.push_str(&row("50% at", &|c| opt(c.snr_50, 2)));
    out
}

impl FramesReport {
    /// The frames part of the table.
    pub fn table(&self) -> String {
        let s = &self.summary;
        let sp = &self.speed;
        let mut out = String::new();
        let mut line = |k: &str, v: String| {
            let _ = writeln!(out, "  {} {v}", pad(k, 26));
        };
        let at10 = s.timescales.get(super::matching::EPOCH).and_then(|e| e.completeness_vs_snr.get(ALL));
        line(
            "completeness, |SNR| ≥ 10",
            match at10 {
                Some(c) if c.n_snr_ge_10 > 0 => format!("{} ({} targets)", opt(c.completeness_snr_ge_10, 3), c.n_snr_ge_10),
                _ => "—".into(),
            },
        );
        line("50% completeness at |SNR|", opt(s.snr_50, 2));
        line(
            "false positives / frame",
            match s.fp_per_frame {
                Some(r) => format!("{}  (on star {}, on sky {}, artifact {})", num(r.total, 2), num(r.on_star, 2), num(r.on_sky, 2), num(r.artifact, 2)),
                None => "—".into(),
            },
        );
        let epoch_fp = s.false_positives.by_timescale.get(super::matching::EPOCH);
        if let Some(e) = epoch_fp.filter(|e| e.flagged.total > 0) {
            let (f, t, frames) = (&e.flagged, &e.total, e.frames);
            let by = FpClass::ALL.iter().map(|c| format!("{} {}", c.name(), f.get(*c))).collect::<Vec<_>>().join(", ");
            line("  of which flagged", format!("{} of {} ({by})", f.total, t.total));
            if frames > 0 {
                let per = |c: FpClass| (t.get(c) - f.get(c)) as f64 / frames as f64;
                line(
                    "  unflagged / frame",
                    format!(
                        "{}  (on star {}, on sky {}, artifact {})",
                        num((t.total - f.total) as f64 / frames as f64, 2),
                        num(per(FpClass::OnStar), 2),
                        num(per(FpClass::OnSky), 2),
                        num(per(FpClass::Artifact), 2)
                    ),
                );
            }
        }
        let ratio = s.timescales.get(super::matching::EPOCH).map(|e| &e.score_over_snr);
        line(
            "score / optimal SNR",
            match ratio {
                Some(r) if r.n > 0 => format!("{} median, 16–84%: {}–{} ({} targets, |SNR| ≥ {})", opt(r.median, 3), opt(r.p16, 3), opt(r.p84, 3), r.n, r.min_snr),
                _ => "—".into(),
            },
        );
        line("score σ on empty sky", num(self.score_sigma_empty_sky, 3));
        line("speed", format!("{} frames/s, {} Mpix/s  ({} frames, {} Mpix in {} s)", num(sp.frames_per_s, 2), num(sp.mpix_per_s, 1), sp.frames, num(sp.megapixels, 1), num(sp.wall_s, 2)));
        line("adapter", sp.adapter.clone());
        if !sp.stages.is_empty() {
            let total: f64 = sp.stages.iter().map(|t| t.seconds).filter(|x| x.is_finite()).sum();
            let width = sp.stages.iter().map(|t| t.name.chars().count()).max().unwrap_or(0);
            for (i, t) in sp.stages.iter().enumerate() {
                let share = if total > 0.0 { format!("  {:>5.1}%", 100.0 * t.seconds / total) } else { String::new() };
                line(if i == 0 { "stages (s)" } else { "" }, format!("{} {:>9}{share}", pad(&t.name, width), num(t.seconds, 3)));
            }
        }
        line(
            "detections",
            format!(
                "{} at |score| ≥ {}: {} targets found of {}, {} duplicates, {} false positives{}",
                s.detections,
                num(self.threshold, 1),
                s.detected,
                s.targets,
                s.duplicates,
                s.false_positives.total.total,
                if s.unlisted_detections > 0 { format!(", {} on frames not in the manifest (ignored)", s.unlisted_detections) } else { String::new() }
            ),
        );
        let epochs = epoch_fp.map(|e| e.frames).unwrap_or(s.frames);
        line("frames", format!("{epochs} (match radius {} px)", s.match_radius_px));
        if !self.stacks.is_empty() {
            let _ = writeln!(out, "\nStacks (docs/stacking.md): per window, slow transients of per-epoch SNR {}–{} found (blended ones, without a peak of their own in the noiseless score, apart: found/blended), detected |score| / ideal stack SNR, unflagged false positives per stack (a frame: above)", num(self.stacks[0].slow_snr.0, 1), num(self.stacks[0].slow_snr.1, 1));
            let _ = writeln!(out, "  {:<6} {:>6}  {:>16}  {:>7}  {:>11}  {:>34}  {:>7}  {:>9}", "window", "stacks", "slow found", "blended", "score/ideal", "unflagged FP (star, sky, artifact)", "score σ", "σ on sky");
            for w in &self.stacks {
                let fp = w.unflagged_fp_per_stack.map(|r| format!("{} ({}, {}, {})", num(r.total, 2), num(r.on_star, 2), num(r.on_sky, 2), num(r.artifact, 2))).unwrap_or_else(|| "—".into());
                let _ = writeln!(
                    out,
                    "  {:<6} {:>6}  {:>16}  {:>7}  {:>11}  {:>34}  {:>7}  {:>9}",
                    w.window,
                    w.stacks,
                    format!("{} {}/{}", opt(w.slow_fraction, 3), w.slow_detected, w.slow_targets),
                    format!("{}/{}", w.slow_blended_detected, w.slow_blended),
                    opt(w.score_over_ideal_median, 3),
                    fp,
                    opt(w.score_sigma_median, 3),
                    opt(w.score_sigma_empty_sky, 3)
                );
            }
        }
        for (name, ts) in &s.timescales {
            out.push('\n');
            out.push_str(&completeness_table(name, ts));
        }
        out
    }
}

/// The alerts part of the table, from the fields of [`AlertsSummary`].
// Formatted here rather than by a method of `AlertsSummary` so that this file does not depend on
// alerts mode's own table; switch to that once it is part of the committed API.
fn alerts_table(a: &AlertsSummary) -> String {
    let mut out = String::new();
    let mut line = |k: &str, v: String| {
        let _ = writeln!(out, "  {} {v}", pad(k, 26));
    };
    let dead: u64 = a.dead_letters.values().sum();
    let reasons: Vec<String> = a.dead_letters.iter().map(|(k, v)| format!("{k} {v}")).collect();
    line("adapter", a.adapter.clone());
    line(
        "alerts",
        format!(
            "{} published, {} results, {} dead letters{}",
            a.alerts_published,
            a.results_received,
            dead,
            if reasons.is_empty() { String::new() } else { format!(" ({})", reasons.join(", ")) }
        ),
    );
    line("throughput", format!("{} alerts/s ({} s)", num(a.alerts_per_s, 1), num(a.wall_s, 3)));
    line(
        "latency ms",
        format!("p50 {}  p95 {}  p99 {}  max {}", num(a.latency_ms_p50, 1), num(a.latency_ms_p95, 1), num(a.latency_ms_p99, 1), num(a.latency_ms_max, 1)),
    );
    line("detection", format!("|score| ≥ {}: completeness {}, purity {}", num(a.threshold, 1), num(a.completeness, 3), num(a.purity, 3)));
    let width = a.by_kind.keys().map(|k| k.chars().count()).max().unwrap_or(0);
    for (i, (kind, c)) in a.by_kind.iter().enumerate() {
        let f = if c.alerts > 0 { format!("{:.2}", c.detected as f64 / c.alerts as f64) } else { "—".into() };
        line(if i == 0 { "by kind (detected/alerts)" } else { "" }, format!("{} {:>6}/{:<6} {f}", pad(kind, width), c.detected, c.alerts));
    }
    out
}

impl BenchReport {
    /// A report with this build's version and nothing measured yet.
    pub fn new(night: impl Into<String>, generator: Option<String>) -> BenchReport {
        BenchReport { night: night.into(), generator, blink_version: env!("CARGO_PKG_VERSION").to_string(), frames: None, alerts: None }
    }

    /// The plain-text table for the terminal.
    pub fn table(&self) -> String {
        let mut out = format!("blink bench {}  (blink {})\n", self.night, self.blink_version);
        if let Some(g) = &self.generator {
            let _ = writeln!(out, "generator: {g}");
        }
        if let Some(f) = &self.frames {
            out.push_str("\nFrames\n");
            out.push_str(&f.table());
        }
        if let Some(a) = &self.alerts {
            out.push_str("\nAlerts\n");
            out.push_str(&alerts_table(a));
        }
        if self.frames.is_none() && self.alerts.is_none() {
            out.push_str("nothing measured\n");
        }
        out
    }

    /// Write the report as pretty JSON (non-finite numbers become null).
    pub fn write_json(&self, path: &Path) -> std::io::Result<()> {
        let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
        serde_json::to_writer_pretty(&mut f, self).map_err(std::io::Error::other)?;
        f.write_all(b"\n")?;
        f.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::matching::tests::night;
    use crate::bench::matching::{match_night, MATCH_RADIUS_PX};
    use crate::bench::stats::summarize;

    fn report() -> BenchReport {
        let (d, t, frames) = night();
        let m = match_night(&d, &t, &frames, MATCH_RADIUS_PX);
        let summary = summarize(&m, &d, 5.0);
        let stages = vec![StageTime { name: "load".into(), seconds: 1.0 }, StageTime { name: "subtract".into(), seconds: 3.0 }];
        let speed = Speed::new("cpu", 2, 8.4, 2.0, stages);
        let mut r = BenchReport::new("night1", Some("blink simulate 0.1.0 (seed 1)".into()));
        r.frames = Some(FramesReport { summary, speed, score_sigma_empty_sky: 1.04, threshold: 5.0, stacks: Vec::new() });
        r
    }

    #[test]
    fn json_has_the_documented_keys_and_no_nan() {
        let r = report();
        let dir = std::env::temp_dir().join(format!("blink-bench-report-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("bench.json");
        r.write_json(&path).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::remove_dir_all(&dir).ok();
        assert!(!text.contains("NaN"));
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["night"], "night1");
        assert_eq!(v["blink_version"], env!("CARGO_PKG_VERSION"));
        assert!(v["alerts"].is_null());
        let f = &v["frames"];
        assert_eq!(f["threshold"], 5.0);
        assert_eq!(f["score_sigma_empty_sky"], 1.04);
        assert_eq!(f["speed"]["frames_per_s"], 1.0);
        assert_eq!(f["speed"]["mpix_per_s"], 4.2);
        assert_eq!(f["speed"]["stages"][1]["name"], "subtract");
        let s = &f["summary"];
        for key in ["frames", "detections", "targets", "detected", "duplicates", "completeness_snr_ge_10", "snr_50", "score_over_snr_median", "fp_per_frame", "timescales", "false_positives"] {
            assert!(s.get(key).is_some(), "summary.{key} missing");
        }
        assert_eq!(s["targets"], 11);
        assert_eq!(s["snr_50"], 3.0);
        assert_eq!(s["fp_per_frame"]["on_sky"], 1.5);
        let all = &s["timescales"]["epoch"]["completeness_vs_snr"]["all"];
        assert_eq!(all["bins"][0], serde_json::json!({"lo": 0.0, "hi": 1.0, "n": 0, "detected": 0, "fraction": null}));
        assert_eq!(all["bins"][8]["fraction"], 0.5);
        assert!(all["bins"][14]["hi"].is_null());
        assert_eq!(s["timescales"]["epoch"]["completeness_vs_mag"]["sn"]["bins"][3]["lo"], 21.5);
        assert_eq!(s["false_positives"]["per_frame"][0], serde_json::json!({"frame": "frames/A.fits", "on_star": 2, "on_sky": 2, "artifact": 2, "total": 6}));
        assert_eq!(s["false_positives"]["by_timescale"]["epoch"]["frames"], 2);
    }

    #[test]
    fn table_leads_with_the_key_figures() {
        let t = report().table();
        let pos = |s: &str| t.find(s).unwrap_or_else(|| panic!("{s:?} not in\n{t}"));
        assert!(pos("completeness, |SNR| ≥ 10") < pos("Completeness vs |optimal SNR|"));
        assert!(t.contains("0.500 (2 targets)"), "{t}");
        assert!(t.contains("3.5  (on star 1.00, on sky 1.50, artifact 1.00)") || t.contains("3.50  (on star 1.00, on sky 1.50, artifact 1.00)"), "{t}");
        assert!(t.contains("1.00 frames/s, 4.2 Mpix/s"), "{t}");
        assert!(t.contains("subtract     3.000   75.0%"), "{t}");
        // The SNR row 8–10 holds 1 of 2 for `all`.
        let row = t.lines().find(|l| l.trim_start().starts_with("8–10")).expect("8–10 row");
        assert!(row.contains("0.50 1/2"), "{row}");
        // Speed with no wall time: dashes, and null in JSON.
        let s = Speed::new("cpu", 0, 0.0, 0.0, vec![]);
        assert!(serde_json::to_value(&s).unwrap()["frames_per_s"].is_null());
        let empty = BenchReport::new("n", None).table();
        assert!(empty.contains("nothing measured"));
    }
}

//! Cutout agreement: blink's score at the candidate against the survey's own signal-to-noise, on
//! real alert packets (issue 4).
//!
//! Each file is decoded with the ordinary [`Decoder`], every alert goes through
//! [`prepare_batch`] and an [`Engine`] exactly as in the pipeline, and each alert's
//! [`SubtractionResult::score`] is set next to the survey's SNR (`Candidate::survey_snr`: ZTF
//! `1.0857 / sigmapsf`, Rubin `diaSource.snr`).
//!
//! # Signs
//! blink subtracts template from science, so a source that faded scores negative. The surveys'
//! SNRs are magnitudes of a detection (ZTF's is always positive; Rubin flags a fading source with
//! `isNegative`), so the score compared here is blink's score *in the direction the survey
//! reports*: `score` for a positive alert, `−score` for a negative one
//! ([`AgreementRow::signed_score`]). A blink score of the wrong sign therefore counts against it.
//!
//! # Statistics
//! - ZTF: Spearman rank correlation (average ranks for ties) of the signed score with the survey
//!   SNR, and of the alerts the survey has at ≥ 5σ, the share blink also scores ≥ 5.
//! - Rubin: the median of `signed_score / |snr|`, and each ratio.
//!
//! Alerts that occur in several files (the same `candid`) are counted once, the first time.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::alert::{Alert, Survey};
use crate::decode::{DecodeError, Decoder, DecoderConfig};
use crate::engine::{prepare_batch, Engine, EngineError, PrepareConfig, StampParams, SubtractionResult};

/// One alert's comparison.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct AgreementRow {
    pub file: String,
    pub alert_id: String,
    pub survey: Survey,
    /// The survey's SNR as the packet gives it.
    pub survey_snr: f64,
    /// Whether the survey says the difference is positive.
    pub positive: bool,
    /// blink's score at the candidate, signed as the engine returns it (science − template).
    pub score: f64,
    /// `score` in the survey's direction: `score` for a positive alert, `−score` for a negative.
    pub signed_score: f64,
    /// Diagnostics: the engine's fit and flux, and the prepared PSF widths (pixels).
    pub flux_scale: f64,
    pub background: f64,
    pub flux: f64,
    pub flux_err: f64,
    pub science_sigma: f64,
    pub template_sigma: f64,
    pub kernel_sigma: f64,
    pub cand_x: f64,
    pub cand_y: f64,
    /// Diagnostic: blink's difference matched-filtered with the same profile, its noise taken
    /// from the filtered map itself away from the candidate (robust scatter), survey's direction.
    pub empirical_score: f64,
    /// Diagnostic: the same on the survey's own difference stamp (NaN when the packet has none).
    pub survey_diff_score: f64,
}

impl AgreementRow {
    fn new(file: &str, alert: &Alert, snr: f64, p: &StampParams, r: &SubtractionResult) -> AgreementRow {
        let score = r.score as f64;
        let positive = alert.candidate.positive;
        AgreementRow {
            file: file.to_string(),
            alert_id: alert.alert_id.clone(),
            survey: alert.survey,
            survey_snr: snr,
            positive,
            score,
            signed_score: if positive { score } else { -score },
            flux_scale: r.flux_scale as f64,
            background: r.background as f64,
            flux: r.flux as f64,
            flux_err: r.flux_err as f64,
            science_sigma: p.science_sigma as f64,
            template_sigma: p.template_sigma as f64,
            kernel_sigma: p.kernel_sigma as f64,
            cand_x: p.cand_x as f64,
            cand_y: p.cand_y as f64,
            empirical_score: f64::NAN,
            survey_diff_score: f64::NAN,
        }
    }
}

/// Per-survey summary figures.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct AgreementSummary {
    /// ZTF alerts compared.
    pub ztf_n: usize,
    /// Spearman rank correlation of the ZTF signed scores with the survey SNR (NaN below 2 alerts).
    pub ztf_spearman: f64,
    /// ZTF alerts the survey has at ≥ 5σ, and how many of them blink scores ≥ 5.
    pub ztf_survey_ge5: usize,
    pub ztf_blink_ge5: usize,
    /// `ztf_blink_ge5 / ztf_survey_ge5` (NaN when the survey has none).
    pub ztf_ge5_fraction: f64,
    /// The same with blink's detection criterion, `|score| ≥ 5` (the pipeline's threshold is on
    /// |score|), which also counts a detection of the wrong sign.
    pub ztf_blink_abs_ge5: usize,
    pub ztf_abs_ge5_fraction: f64,
    /// Median of the ZTF ratios signed score / survey SNR.
    pub ztf_median_ratio: f64,
    /// Rubin alerts compared, their ratios signed score / |snr| (in row order) and the median.
    pub rubin_n: usize,
    pub rubin_ratios: Vec<f64>,
    pub rubin_median_ratio: f64,
}

/// Everything one run measured.
#[derive(Debug, Clone, Serialize)]
pub struct Agreement {
    pub adapter: String,
    pub rows: Vec<AgreementRow>,
    /// Alerts that decoded but that `prepare_batch` or the engine refused, or that carry no
    /// survey SNR: (file, alert id, reason).
    pub rejected: Vec<(String, String, String)>,
    /// Records or files that did not decode: (file, reason).
    pub undecodable: Vec<(String, String)>,
    /// Alerts seen again in a later file and skipped.
    pub duplicates: usize,
    pub summary: AgreementSummary,
}

/// Why a run could not be made at all (per-alert failures are listed, not errors).
#[derive(Debug, thiserror::Error)]
pub enum AgreementError {
    #[error("decoder: {0}")]
    Decoder(#[from] DecodeError),
    #[error("engine on {file}: {source}")]
    Engine {
        file: String,
        #[source]
        source: EngineError,
    },
}

/// Decode `files`, run every alert through [`prepare_batch`] and `engine`, and compare.
pub fn measure(files: &[PathBuf], engine: &mut dyn Engine, cfg: &PrepareConfig) -> Result<Agreement, AgreementError> {
    let decoder = Decoder::new(DecoderConfig::default())?;
    let mut rows = Vec::new();
    let mut rejected = Vec::new();
    let mut undecodable = Vec::new();
    let mut seen = HashSet::new();
    let mut duplicates = 0;
    for path in files {
        let name = display_name(path);
        let decoded = match decoder.decode_file(path) {
            Ok(d) => d,
            Err(e) => {
                undecodable.push((name, e.to_string()));
                continue;
            }
        };
        let mut alerts = Vec::new();
        for a in decoded {
            match a {
                Ok(a) => {
                    if !seen.insert((a.survey, a.alert_id.clone())) {
                        duplicates += 1;
                    } else if a.candidate.survey_snr.is_some_and(f64::is_finite) {
                        alerts.push(a);
                    } else {
                        rejected.push((name.clone(), a.alert_id.clone(), "no survey SNR".into()));
                    }
                }
                Err(e) => undecodable.push((name.clone(), e.to_string())),
            }
        }
        let (batches, refused) = prepare_batch(&alerts, cfg);
        for (i, e) in refused {
            rejected.push((name.clone(), alerts[i].alert_id.clone(), e.to_string()));
        }
        let mut file_rows: Vec<(usize, AgreementRow)> = Vec::new();
        for pb in &batches {
            let images =
                engine.subtract_images(&pb.batch).map_err(|source| AgreementError::Engine { file: name.clone(), source })?;
            let b = &pb.batch;
            let npix = b.npix();
            for (k, ((&i, p), r)) in pb.alerts.iter().zip(&b.params).zip(&images.results).enumerate() {
                let a = &alerts[i];
                let snr = a.candidate.survey_snr.unwrap_or(f64::NAN);
                let mut row = AgreementRow::new(&name, a, snr, p, r);
                let sign = if a.candidate.positive { 1.0 } else { -1.0 };
                let (wgt, prof) = (&b.weight[k * npix..(k + 1) * npix], &b.profile[k * npix..(k + 1) * npix]);
                let excl = 2.0 * crate::engine::prepare::FWHM_PER_SIGMA * p.science_sigma as f64;
                row.empirical_score =
                    sign * filtered_score(&images.difference[k * npix..(k + 1) * npix], wgt, prof, b.width, b.height, excl);
                if let Some(d) = &a.triplet.difference {
                    let dw: Vec<f32> = d.mask.iter().zip(wgt).map(|(m, w)| if *m { 0.0 } else { *w }).collect();
                    // ZTF's difference always shows the candidate positive; Rubin's is science − template.
                    let s = if a.survey == Survey::Ztf { 1.0 } else { sign };
                    row.survey_diff_score = s * filtered_score(&d.image.data, &dw, prof, b.width, b.height, excl);
                }
                file_rows.push((i, row));
            }
        }
        file_rows.sort_by_key(|(i, _)| *i);
        rows.extend(file_rows.into_iter().map(|(_, r)| r));
    }
    let summary = summarise(&rows);
    Ok(Agreement { adapter: engine.adapter(), rows, rejected, undecodable, duplicates, summary })
}

/// Matched-filter score of `diff` at the profile's position, with the noise measured on the
/// filtered map: the profile is slid over every integer offset that keeps ≥ 90 % of it on usable
/// pixels, and the robust scatter (1.4826·MAD) of the flux estimates farther than `exclude` pixels
/// from the candidate is the 1σ error. Correlated noise and subtraction residuals are in it, so
/// this is the score an empirical detector would give. NaN with fewer than 20 such offsets.
pub fn filtered_score(diff: &[f32], weight: &[f32], profile: &[f32], w: usize, h: usize, exclude: f64) -> f64 {
    let pmax = profile.iter().cloned().fold(0.0f32, f32::max);
    let support: Vec<(i64, i64, f64)> = profile
        .iter()
        .enumerate()
        .filter(|(_, v)| **v > 1e-3 * pmax)
        .map(|(i, v)| ((i % w) as i64, (i / w) as i64, *v as f64))
        .collect();
    let total: f64 = support.iter().map(|s| s.2).sum();
    let at = |dx: i64, dy: i64| -> Option<f64> {
        let (mut num, mut den, mut mass) = (0.0, 0.0, 0.0);
        for &(x, y, p) in &support {
            let (xx, yy) = (x + dx, y + dy);
            if xx < 0 || yy < 0 || xx >= w as i64 || yy >= h as i64 {
                continue;
            }
            let q = yy as usize * w + xx as usize;
            if weight[q] > 0.0 && diff[q].is_finite() {
                num += p * diff[q] as f64;
                den += p * p;
                mass += p;
            }
        }
        (mass >= 0.9 * total && den > 0.0).then(|| num / den)
    };
    let Some(f0) = at(0, 0) else { return f64::NAN };
    let mut far = Vec::new();
    for dy in -(h as i64)..h as i64 {
        for dx in -(w as i64)..w as i64 {
            if ((dx * dx + dy * dy) as f64).sqrt() < exclude {
                continue;
            }
            if let Some(f) = at(dx, dy) {
                far.push(f);
            }
        }
    }
    if far.len() < 20 {
        return f64::NAN;
    }
    let m = median(&mut far.clone());
    let mut dev: Vec<f64> = far.iter().map(|f| (f - m).abs()).collect();
    let sigma = 1.4826 * median(&mut dev);
    if sigma > 0.0 {
        (f0 - m) / sigma
    } else {
        f64::NAN
    }
}

/// The summary figures of a set of rows.
pub fn summarise(rows: &[AgreementRow]) -> AgreementSummary {
    let ztf: Vec<&AgreementRow> = rows.iter().filter(|r| r.survey == Survey::Ztf).collect();
    let xs: Vec<f64> = ztf.iter().map(|r| r.survey_snr).collect();
    let ys: Vec<f64> = ztf.iter().map(|r| r.signed_score).collect();
    let ge5: Vec<&&AgreementRow> = ztf.iter().filter(|r| r.survey_snr >= 5.0).collect();
    let blink5 = ge5.iter().filter(|r| r.signed_score >= 5.0).count();
    let blink_abs5 = ge5.iter().filter(|r| r.signed_score.abs() >= 5.0).count();
    let mut zr: Vec<f64> = ztf.iter().map(|r| r.signed_score / r.survey_snr).collect();
    let rubin_ratios: Vec<f64> =
        rows.iter().filter(|r| r.survey == Survey::Rubin).map(|r| r.signed_score / r.survey_snr.abs()).collect();
    let mut rr = rubin_ratios.clone();
    AgreementSummary {
        ztf_n: ztf.len(),
        ztf_spearman: spearman(&xs, &ys),
        ztf_survey_ge5: ge5.len(),
        ztf_blink_ge5: blink5,
        ztf_ge5_fraction: if ge5.is_empty() { f64::NAN } else { blink5 as f64 / ge5.len() as f64 },
        ztf_blink_abs_ge5: blink_abs5,
        ztf_abs_ge5_fraction: if ge5.is_empty() { f64::NAN } else { blink_abs5 as f64 / ge5.len() as f64 },
        ztf_median_ratio: median(&mut zr),
        rubin_n: rubin_ratios.len(),
        rubin_ratios,
        rubin_median_ratio: median(&mut rr),
    }
}

/// Median of the finite values (NaN when none).
pub fn median(v: &mut Vec<f64>) -> f64 {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return f64::NAN;
    }
    crate::engine::prepare::median_in_place(v)
}

/// Ranks 1..n, ties sharing the average of the ranks they span.
pub fn average_ranks(v: &[f64]) -> Vec<f64> {
    let mut idx: Vec<usize> = (0..v.len()).collect();
    idx.sort_by(|&a, &b| v[a].total_cmp(&v[b]));
    let mut ranks = vec![0.0; v.len()];
    let mut i = 0;
    while i < idx.len() {
        let mut j = i;
        while j + 1 < idx.len() && v[idx[j + 1]] == v[idx[i]] {
            j += 1;
        }
        let r = (i + j) as f64 / 2.0 + 1.0;
        for &k in &idx[i..=j] {
            ranks[k] = r;
        }
        i = j + 1;
    }
    ranks
}

/// Spearman's rank correlation: Pearson's correlation of the average ranks (exact with ties).
/// NaN for fewer than two pairs, unequal lengths, non-finite values or a constant series.
pub fn spearman(x: &[f64], y: &[f64]) -> f64 {
    if x.len() != y.len() || x.len() < 2 || !x.iter().chain(y).all(|v| v.is_finite()) {
        return f64::NAN;
    }
    pearson(&average_ranks(x), &average_ranks(y))
}

fn pearson(x: &[f64], y: &[f64]) -> f64 {
    let n = x.len() as f64;
    let (mx, my) = (x.iter().sum::<f64>() / n, y.iter().sum::<f64>() / n);
    let (mut sxy, mut sxx, mut syy) = (0.0, 0.0, 0.0);
    for (a, b) in x.iter().zip(y) {
        sxy += (a - mx) * (b - my);
        sxx += (a - mx) * (a - mx);
        syy += (b - my) * (b - my);
    }
    if sxx > 0.0 && syy > 0.0 {
        sxy / (sxx * syy).sqrt()
    } else {
        f64::NAN
    }
}

/// The real alert fixtures under a `testdata/` folder laid out as `testdata/README.md` says:
/// every ZTF file (ztf-avro-alert, fink-client and its snappy samples) and the Rubin transfer.
pub fn fixture_files(testdata: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for dir in ["ztf/ztf-avro-alert", "ztf/fink-client", "ztf/fink-client/sample_snappy", "lsst/fink-transfer-2026-03-18"] {
        let mut files: Vec<PathBuf> = std::fs::read_dir(testdata.join(dir))
            .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.extension().is_some_and(|e| e == "avro")).collect())
            .unwrap_or_default();
        files.sort();
        out.extend(files);
    }
    out
}

fn display_name(p: &Path) -> String {
    let parent = p.parent().and_then(|d| d.file_name()).map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let name = p.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    if parent.is_empty() {
        name
    } else {
        format!("{parent}/{name}")
    }
}

impl Agreement {
    /// The per-alert table and the summary as plain text.
    pub fn table(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let _ = writeln!(s, "engine: {}", self.adapter);
        let _ = writeln!(
            s,
            "{:<6} {:<20} {:>4} {:>8} {:>8} {:>6} {:>7} {:>7} {:>6} {:>5} {:>5} {:>5} {:>7} {:>9} {:>6} {:>6}  file",
            "survey", "alert", "sign", "snr", "blink", "ratio", "emp", "sdiff", "scale", "s_sci", "s_tpl", "s_k", "bkg", "flux_err", "cx", "cy"
        );
        for r in &self.rows {
            let _ = writeln!(
                s,
                "{:<6} {:<20} {:>4} {:>8.2} {:>8.2} {:>6.2} {:>7.2} {:>7.2} {:>6.3} {:>5.2} {:>5.2} {:>5.2} {:>7.1} {:>9.3} {:>6.1} {:>6.1}  {}",
                r.survey.as_str(),
                r.alert_id,
                if r.positive { "+" } else { "-" },
                r.survey_snr,
                r.signed_score,
                r.signed_score / r.survey_snr.abs(),
                r.empirical_score,
                r.survey_diff_score,
                r.flux_scale,
                r.science_sigma,
                r.template_sigma,
                r.kernel_sigma,
                r.background,
                r.flux_err,
                r.cand_x,
                r.cand_y,
                r.file
            );
        }
        for (f, id, why) in &self.rejected {
            let _ = writeln!(s, "rejected {id} ({f}): {why}");
        }
        for (f, why) in &self.undecodable {
            let _ = writeln!(s, "undecodable ({f}): {why}");
        }
        let m = &self.summary;
        let _ = writeln!(s, "duplicates skipped: {}", self.duplicates);
        let _ = writeln!(
            s,
            "ZTF: {} alerts, Spearman {:.3}, survey >= 5: {} of which blink >= 5: {} ({:.1} %; |score| >= 5: {}, {:.1} %), median blink/survey {:.2}",
            m.ztf_n,
            m.ztf_spearman,
            m.ztf_survey_ge5,
            m.ztf_blink_ge5,
            100.0 * m.ztf_ge5_fraction,
            m.ztf_blink_abs_ge5,
            100.0 * m.ztf_abs_ge5_fraction,
            m.ztf_median_ratio
        );
        let ratios: Vec<String> = m.rubin_ratios.iter().map(|r| format!("{r:.3}")).collect();
        let _ = writeln!(s, "Rubin: {} alerts, median blink/|snr| {:.3}, ratios [{}]", m.rubin_n, m.rubin_median_ratio, ratios.join(", "));
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranks_average_ties() {
        assert_eq!(average_ranks(&[10.0, 20.0, 20.0, 5.0]), vec![2.0, 3.5, 3.5, 1.0]);
        assert_eq!(average_ranks(&[1.0, 1.0, 1.0]), vec![2.0, 2.0, 2.0]);
    }

    #[test]
    fn spearman_known_values() {
        let x = [1.0, 2.0, 3.0, 4.0, 5.0];
        assert!((spearman(&x, &[2.0, 4.0, 6.0, 8.0, 100.0]) - 1.0).abs() < 1e-12);
        assert!((spearman(&x, &[5.0, 4.0, 3.0, 2.0, 1.0]) + 1.0).abs() < 1e-12);
        // With ties (scipy.stats.spearmanr([1,2,3,4,5],[1,2,2,4,5]) = 0.9746794344808963).
        assert!((spearman(&x, &[1.0, 2.0, 2.0, 4.0, 5.0]) - 0.974_679_434_480_896_3).abs() < 1e-12);
        assert!(spearman(&x, &[1.0; 5]).is_nan());
        assert!(spearman(&x[..1], &x[..1]).is_nan());
    }

    #[test]
    fn medians() {
        assert_eq!(median(&mut vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&mut vec![4.0, 1.0, 2.0, 3.0, f64::NAN]), 2.5);
        assert!(median(&mut vec![]).is_nan());
    }
}

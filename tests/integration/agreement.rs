//! Issue 4: on the real fixture alerts, blink's cutout score agrees with the surveys' own SNR.
//!
//! Every real alert under `testdata/` (ZTF: ztf-avro-alert, fink-client with its snappy samples
//! and multi-alert containers, 134 alerts; Rubin: the Fink transfer, 7 alerts; provenance in
//! `testdata/README.md`) goes through `prepare_batch` and the CPU engine, as in the pipeline, and
//! is compared with the survey (`blink::bench::agreement`):
//! - Rubin: median of blink's score / |`diaSource.snr`| within 0.9–1.1 (blink's score taken in
//!   the survey's direction: the negative source's score is negated).
//! - ZTF: Spearman rank correlation with 1.0857/`sigmapsf` ≥ 0.85, and of the alerts the survey
//!   has at ≥ 5σ, at least 95 % with |score| ≥ 5 (blink's detection criterion; the share with the
//!   survey's sign, which also counts a wrong-sign residual as a miss, is held at ≥ 93 %).
//!
//! Figures measured when this test was written (CPU engine): ZTF Spearman 0.891, 126 of 134
//! signed ≥ 5 (94.0 %), 128 of 134 with |score| ≥ 5 (95.5 %); Rubin median 0.981, ratios
//! 0.94 0.90 0.20 0.98 1.00 1.08 1.00 (the 0.20 is the off-centre alert, where ZTF-style
//! matched filtering of Rubin's own difference gives 0.19 too). Where a GPU adapter exists
//! (llvmpipe counts) the GPU engine must give the same scores on these stamps.

use std::path::PathBuf;

use blink::alert::Survey;
use blink::bench::agreement::{fixture_files, measure, Agreement};
use blink::engine::{CpuEngine, GpuEngine, PrepareConfig};

fn testdata() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("testdata")
}

fn run_cpu() -> Agreement {
    let files = fixture_files(&testdata());
    assert!(files.len() >= 10, "fixture files missing under testdata/: {files:?}");
    measure(&files, &mut CpuEngine::new(), &PrepareConfig::default()).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn issue_4_cutout_scores_agree_with_the_surveys() {
    let a = run_cpu();
    eprintln!("{}", a.table());
    // Every fixture alert is compared: none undecodable, refused or counted twice.
    assert!(a.undecodable.is_empty(), "{:?}", a.undecodable);
    assert!(a.rejected.is_empty(), "{:?}", a.rejected);
    let m = &a.summary;
    assert_eq!((m.ztf_n, m.rubin_n), (134, 7), "alerts per survey (testdata/README.md)");
    assert!(a.rows.iter().all(|r| r.score.is_finite() && r.flux_err > 0.0), "non-finite score");

    assert!((0.9..=1.1).contains(&m.rubin_median_ratio), "Rubin median ratio {:.3} ({:?})", m.rubin_median_ratio, m.rubin_ratios);
    // The negative Rubin source scores negative, as the survey says.
    let neg: Vec<_> = a.rows.iter().filter(|r| r.survey == Survey::Rubin && !r.positive).collect();
    assert_eq!(neg.len(), 1);
    assert!(neg[0].score < -5.0, "{:?}", neg[0]);

    assert!(m.ztf_spearman >= 0.85, "ZTF Spearman {:.3}", m.ztf_spearman);
    assert_eq!(m.ztf_survey_ge5, 134);
    assert!(m.ztf_abs_ge5_fraction >= 0.95, "ZTF: {} of {} at |score| >= 5", m.ztf_blink_abs_ge5, m.ztf_survey_ge5);
    assert!(m.ztf_ge5_fraction >= 0.93, "ZTF: {} of {} at score >= 5 with the survey's sign", m.ztf_blink_ge5, m.ztf_survey_ge5);
}

#[test]
fn gpu_engine_gives_the_cpu_scores_on_real_cutouts() {
    let mut gpu = match GpuEngine::new() {
        Ok(g) => g,
        Err(e) => {
            eprintln!("!!!!!!!! no GPU adapter ({e}): GPU agreement on real cutouts not checked !!!!!!!!");
            return;
        }
    };
    let files = fixture_files(&testdata());
    let g = measure(&files, &mut gpu, &PrepareConfig::default()).unwrap_or_else(|e| panic!("{e}"));
    let c = run_cpu();
    eprintln!("GPU adapter {}: ZTF Spearman {:.3}, Rubin median {:.3}", g.adapter, g.summary.ztf_spearman, g.summary.rubin_median_ratio);
    assert_eq!(g.rows.len(), c.rows.len());
    for (x, y) in g.rows.iter().zip(&c.rows) {
        assert_eq!(x.alert_id, y.alert_id);
        // Whole-engine tolerance of docs/engine.md: 2 × 2e-3 · (1 + |score|).
        assert!((x.score - y.score).abs() <= 4e-3 * (1.0 + y.score.abs()), "{}: GPU {} vs CPU {}", x.alert_id, x.score, y.score);
    }
}

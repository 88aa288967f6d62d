//! `blink bench` alerts mode on a tiny simulated night: every alert published comes back over
//! gRPC (or as a dead letter), latencies are real and ordered, the simulated transients are
//! found, and the per-kind counts are those the truth table says the night raised.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use blink::bench::alerts::{run, AlertsOptions};
use blink::engine::EnginePreference;
use blink::sim::night::{simulate, truth, SimConfig};

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("blink-bench-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alerts_mode_delivers_every_alert_and_scores_the_night() {
    let out = tmp("alerts");
    let mut cfg = SimConfig { width: 256, height: 256, nights: 1, epochs_per_night: 2, seed: 11, ..Default::default() };
    cfg.alerts.ztf = false;
    simulate(&cfg, &out, &mut |_| {}).expect("simulate");

    let opts = AlertsOptions {
        topic: "bench-alerts-test".into(),
        timeout: Duration::from_secs(120),
        engine: EnginePreference::Cpu,
        ..Default::default()
    };
    let s = run(&out, &opts).await.expect("alerts mode runs");
    eprintln!("{}", s.table());

    let dead: u64 = s.dead_letters.values().sum();
    assert!(s.alerts_published > 0);
    assert_eq!(s.results_received as u64, s.alerts_published as u64 - dead, "{:?}", s.dead_letters);
    assert_eq!((s.duplicates, s.unexpected), (0, 0));
    let lat = [s.latency_ms_p50, s.latency_ms_p95, s.latency_ms_p99, s.latency_ms_max];
    assert!(lat.iter().all(|v| v.is_finite() && *v > 0.0), "{lat:?}");
    assert!(lat.windows(2).all(|w| w[0] <= w[1]), "{lat:?}");
    assert!(s.wall_s > 0.0 && s.alerts_per_s > 0.0);

    // What the truth table says the night raised: transients and variables at an optimal SNR
    // of at least alerts.min_snr, and every cosmic ray.
    let rows = truth::read(&out.join("truth.csv")).expect("truth");
    let mut expected: BTreeMap<String, usize> = BTreeMap::new();
    for r in &rows {
        if r.kind == "cosmic" || (r.is_variable() && r.snr.unwrap_or(0.0) >= cfg.alerts.min_snr) {
            *expected.entry(r.kind.clone()).or_default() += 1;
        }
    }
    let got: BTreeMap<String, usize> = s.by_kind.iter().map(|(k, c)| (k.clone(), c.alerts)).collect();
    assert_eq!(got, expected, "alerts per kind vs truth");
    assert_eq!(got.values().sum::<usize>(), s.alerts_published);

    // An ideal matched filter scores an alert of optimal SNR ν at ν ± 1, so it reaches the
    // threshold with probability Φ(ν − threshold).
    let phi = |x: f64| 1.0 / (1.0 + (-1.702 * x).exp());
    let real: Vec<f64> = rows
        .iter()
        .filter(|r| r.is_variable())
        .filter_map(|r| r.snr)
        .filter(|&v| v >= cfg.alerts.min_snr)
        .collect();
    let ideal = real.iter().map(|&v| phi(v - opts.threshold)).sum::<f64>() / real.len() as f64;
    let near = real.iter().filter(|&&v| v < 7.0).count();
    eprintln!("ideal completeness {ideal:.3}; {near} of {} real alerts at SNR < 7", real.len());
    // This night: ideal 0.96 (23 of 134 real alerts at SNR < 7), blink 0.93; the margin of 0.1
    // is for the template's noise and the PSF-matching loss the ideal filter does not have.
    assert!(s.completeness >= 0.8 && s.completeness >= ideal - 0.1, "completeness {} (ideal {ideal:.3})", s.completeness);
    assert!(s.purity.is_nan() || (0.0..=1.0).contains(&s.purity));
    let _ = std::fs::remove_dir_all(&out);
}


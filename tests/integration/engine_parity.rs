//! Engine tests: each WGSL kernel and the whole GPU engine against the CPU twins on fresh random
//! inputs (the seed comes from the clock and is printed: rerun one with `BLINK_SEED=<seed>`),
//! and CPU truth tests on synthetic stamps of known scale, background and flux.
//!
//! The parity tests FAIL when no adapter exists, unless `BLINK_ALLOW_NO_GPU=1` (then they say
//! loudly that they were skipped).
//!
//! Tolerances (f32 on the GPU against f64 on the CPU):
//! - convolve: |Δ| ≤ 2e-5 · (|cpu| + max |plane| of the stamp)
//! - fit: |Δscale| ≤ 1e-3 · max(1, |scale|); |Δbackground| ≤ 1e-3 · (|b| + |scale·mean T'| + σ_sky)
//! - difference_score: |Δflux| ≤ 2e-3 · flux_err + 1e-4 · |flux|, |Δflux_err| ≤ 1e-4 · flux_err,
//!   |Δscore| ≤ 2e-3 · (1 + |score|); images |Δ| ≤ 1e-4 · (|d| + sqrt(v)).
//! - whole engine: the same, with the background and flux tolerances doubled (errors compound).

use blink::alert::{Alert, Candidate, Image, Stamp, Survey, Triplet};
use blink::cpu::{self, CpuEngine};
use blink::engine::{
    prepare_stamp, assemble, Engine, EnginePreference, Fit, FitStatus, PrepareConfig, StampBatch,
    StampParams, SubtractionResult,
};
use crate::common::{gpu, seeded};
use rand::rngs::StdRng;
use rand::Rng;
use rand_distr::{Distribution, Normal};

fn gaussian_add(img: &mut [f32], w: usize, cx: f64, cy: f64, sigma: f64, flux: f64) {
    let h = img.len() / w;
    let mut g = vec![0.0f64; img.len()];
    for y in 0..h {
        for x in 0..w {
            let (dx, dy) = (x as f64 - cx, y as f64 - cy);
            g[y * w + x] = (-(dx * dx + dy * dy) / (2.0 * sigma * sigma)).exp();
        }
    }
    let norm = 2.0 * std::f64::consts::PI * sigma * sigma;
    for (p, v) in img.iter_mut().zip(g) {
        *p += (flux * v / norm) as f32;
    }
}

/// A random batch: sky, stars, a source at the candidate, noise, masks, random kernel sigmas.
fn random_batch(rng: &mut StdRng, w: usize, h: usize, n: usize) -> StampBatch {
    let npix = w * h;
    let mut b = StampBatch { n, ..StampBatch::empty(w, h) };
    let unit = Normal::new(0.0f64, 1.0).unwrap_or_else(|e| panic!("{e}"));
    for k in 0..n {
        let sky_t = rng.gen_range(10.0..500.0);
        let sky_s = rng.gen_range(10.0..500.0);
        let nt = rng.gen_range(0.5..5.0);
        let ns = rng.gen_range(1.0..20.0);
        let mut t = vec![sky_t as f32; npix];
        let mut s = vec![sky_s as f32; npix];
        for _ in 0..rng.gen_range(0..6) {
            let (x, y) = (rng.gen_range(0.0..w as f64), rng.gen_range(0.0..h as f64));
            let f = rng.gen_range(100.0..50000.0);
            gaussian_add(&mut t, w, x, y, 1.5, f);
            gaussian_add(&mut s, w, x, y, 2.0, f * 1.2);
        }
        let (cx, cy) = (rng.gen_range(0.0..(w - 1) as f64), rng.gen_range(0.0..(h - 1) as f64));
        let psf_sigma = rng.gen_range(0.8..3.0);
        gaussian_add(&mut s, w, cx, cy, psf_sigma, rng.gen_range(-2000.0..5000.0));
        let mut weight = vec![1.0f32; npix];
        let mask_frac = if k % 3 == 0 { 0.0 } else { rng.gen_range(0.0..0.1) };
        for (i, wt) in weight.iter_mut().enumerate() {
            if rng.gen_bool(mask_frac) {
                *wt = 0.0;
                t[i] = 0.0;
                s[i] = 0.0;
            }
        }
        if k % 4 == 1 {
            let col = rng.gen_range(0..w);
            for y in 0..h {
                weight[y * w + col] = 0.0;
            }
        }
        let mut tv = vec![(nt * nt) as f32; npix];
        let mut sv = vec![(ns * ns) as f32; npix];
        for i in 0..npix {
            tv[i] += ((t[i] as f64 - sky_t).max(0.0) / 50.0) as f32;
            sv[i] += ((s[i] as f64 - sky_s).max(0.0) / 6.2) as f32;
            t[i] += (nt * unit.sample(rng)) as f32 * weight[i];
            s[i] += (ns * unit.sample(rng)) as f32 * weight[i];
        }
        // Every 7th stamp: a flat template (singular fit); stamp 5: nothing usable.
        if k % 7 == 6 {
            t.iter_mut().zip(&weight).for_each(|(v, wt)| *v = sky_t as f32 * wt);
            tv.iter_mut().for_each(|v| *v = (nt * nt) as f32);
        }
        if k == 5 {
            weight.iter_mut().for_each(|v| *v = 0.0);
        }
        let mut prof = vec![0.0f32; npix];
        gaussian_add(&mut prof, w, cx, cy, psf_sigma, 1.0);
        let sum: f32 = prof.iter().sum();
        prof.iter_mut().for_each(|v| *v /= sum);
        let kernel_sigma = if k % 5 == 0 { 0.0 } else { rng.gen_range(0.2..3.0) };
        b.params.push(StampParams {
            kernel_sigma,
            cand_x: cx as f32,
            cand_y: cy as f32,
            fit_radius: rng.gen_range(0.0..10.0),
            // Every third stamp takes its scale from outside (zero points), as full frames do.
            fixed_scale: if k % 3 == 1 { rng.gen_range(0.5..2.0) } else { 0.0 },
            science_sigma: psf_sigma as f32,
            template_sigma: 1.5,
        });
        b.science.extend(s);
        b.template.extend(t);
        b.science_var.extend(sv);
        b.template_var.extend(tv);
        b.weight.extend(weight);
        b.profile.extend(prof);
    }
    b
}

const SHAPES: [(usize, usize, usize); 4] = [(63, 63, 9), (58, 63, 8), (30, 30, 13), (17, 41, 3)];

fn max_abs(v: &[f32]) -> f32 {
    v.iter().fold(0.0f32, |m, x| m.max(x.abs()))
}

fn check_convolve(g: &[f32], c: &[f32], npix: usize, what: &str) -> f32 {
    let mut worst = 0.0f32;
    for (s, (gs, cs)) in g.chunks(npix).zip(c.chunks(npix)).enumerate() {
        let scale = max_abs(cs);
        for (i, (a, b)) in gs.iter().zip(cs).enumerate() {
            let tol = 2e-5 * (b.abs() + scale) + 1e-30;
            worst = worst.max((a - b).abs() / tol);
            assert!((a - b).abs() <= tol, "{what}: stamp {s} pixel {i}: gpu {a} cpu {b} (tol {tol})");
        }
    }
    worst
}

#[test]
fn convolve_matches_cpu() {
    let mut rng = seeded("convolve_matches_cpu");
    let Some(mut g) = gpu("convolve_matches_cpu") else { return };
    for (w, h, n) in SHAPES {
        let b = random_batch(&mut rng, w, h, n);
        let gc = g.convolve(&b).unwrap();
        let cc = cpu::convolve::convolve(&b);
        let w1 = check_convolve(&gc.template, &cc.template, b.npix(), "T'");
        let w2 = check_convolve(&gc.template_var, &cc.template_var, b.npix(), "T'var");
        eprintln!("convolve {w}x{h} x{n}: worst error / tolerance {w1:.3} {w2:.3}");
    }
}

fn check_fits(g: &[Fit], c: &[Fit], b: &StampBatch, conv_t: &[f32], slack: f32) {
    let npix = b.npix();
    for (s, (gf, cf)) in g.iter().zip(c).enumerate() {
        assert_eq!(gf.status, cf.status, "stamp {s}: gpu {gf:?} cpu {cf:?}");
        let mean_t = conv_t[s * npix..(s + 1) * npix].iter().map(|v| v.abs()).sum::<f32>() / npix as f32;
        let sky = b.science_var[s * npix..(s + 1) * npix].iter().cloned().fold(f32::MAX, f32::min).sqrt();
        let ta = slack * 1e-3 * cf.scale.abs().max(1.0);
        let tb = slack * 1e-3 * (cf.background.abs() + (cf.scale * mean_t).abs() + sky);
        assert!((gf.scale - cf.scale).abs() <= ta, "stamp {s}: scale gpu {} cpu {} (tol {ta})", gf.scale, cf.scale);
        assert!(
            (gf.background - cf.background).abs() <= tb,
            "stamp {s}: background gpu {} cpu {} (tol {tb}, {:?})",
            gf.background,
            cf.background,
            cf.status
        );
    }
}

#[test]
fn fit_matches_cpu() {
    let mut rng = seeded("fit_matches_cpu");
    let Some(mut g) = gpu("fit_matches_cpu") else { return };
    for (w, h, n) in SHAPES {
        let b = random_batch(&mut rng, w, h, n);
        let conv = cpu::convolve::convolve(&b);
        let gf = g.fit(&b, &conv.template, &conv.template_var).unwrap();
        let cf = cpu::fit::fit(&b, &conv.template, &conv.template_var);
        check_fits(&gf, &cf, &b, &conv.template, 1.0);
        if n > 6 {
            assert_eq!(cf[5].status, FitStatus::Empty);
            assert_eq!(cf[6].status, FitStatus::Singular);
        }
    }
}

fn check_images(g: &blink::engine::SubtractionImages, c: &blink::engine::SubtractionImages, slack: f32) {
    for (s, (gr, cr)) in g.results.iter().zip(&c.results).enumerate() {
        let e = cr.flux_err;
        assert!((gr.flux_err - e).abs() <= slack * 1e-4 * e, "stamp {s}: flux_err gpu {gr:?} cpu {cr:?}");
        let tf = slack * (2e-3 * e + 1e-4 * cr.flux.abs());
        assert!((gr.flux - cr.flux).abs() <= tf, "stamp {s}: flux gpu {gr:?} cpu {cr:?} (tol {tf})");
        let ts = slack * 2e-3 * (1.0 + cr.score.abs());
        assert!((gr.score - cr.score).abs() <= ts, "stamp {s}: score gpu {gr:?} cpu {cr:?} (tol {ts})");
    }
    for (i, ((gd, cd), (gv, cv))) in
        g.difference.iter().zip(&c.difference).zip(g.variance.iter().zip(&c.variance)).enumerate()
    {
        let tol = slack * 1e-4 * (cd.abs() + cv.max(0.0).sqrt()) + 1e-30;
        assert!((gd - cd).abs() <= tol, "pixel {i}: difference gpu {gd} cpu {cd}");
        assert!((gv - cv).abs() <= slack * 1e-4 * cv.abs() + 1e-30, "pixel {i}: variance gpu {gv} cpu {cv}");
    }
}

#[test]
fn difference_score_matches_cpu() {
    let mut rng = seeded("difference_score_matches_cpu");
    let Some(mut g) = gpu("difference_score_matches_cpu") else { return };
    for (w, h, n) in SHAPES {
        let b = random_batch(&mut rng, w, h, n);
        let conv = cpu::convolve::convolve(&b);
        let fits = cpu::fit::fit(&b, &conv.template, &conv.template_var);
        let gi = g.difference_score(&b, &conv.template, &conv.template_var, &fits).unwrap();
        let ci = cpu::difference_score::difference_score(&b, &conv.template, &conv.template_var, &fits);
        assert_eq!(gi.difference.len(), b.n * b.npix());
        check_images(&gi, &ci, 1.0);
    }
}

/// Whole-engine tolerances: the kernels' own, with the background and flux ones doubled.
fn check_results(g: &[SubtractionResult], c: &[SubtractionResult]) {
    assert_eq!(g.len(), c.len());
    for (s, (gr, cr)) in g.iter().zip(c).enumerate() {
        let ta = 2e-3 * cr.flux_scale.abs().max(1.0);
        assert!((gr.flux_scale - cr.flux_scale).abs() <= ta, "stamp {s}: gpu {gr:?} cpu {cr:?}");
        let ts = 4e-3 * (1.0 + cr.score.abs());
        assert!((gr.score - cr.score).abs() <= ts, "stamp {s}: score gpu {gr:?} cpu {cr:?}");
        // The score's tolerance in flux units (flux = score · flux_err): the fitted scale and
        // background differ a little between f32 and f64 and move both alike; a stricter flux
        // tolerance failed about one random batch in ten (stamp flux 99.7 against 100.1 at
        // flux_err 44, scale 1.857, background −461).
        let tf = ts * cr.flux_err + 2e-4 * cr.flux.abs();
        assert!((gr.flux - cr.flux).abs() <= tf, "stamp {s}: flux gpu {gr:?} cpu {cr:?}");
    }
}

#[test]
fn whole_engine_matches_cpu() {
    let mut rng = seeded("whole_engine_matches_cpu");
    let Some(mut g) = gpu("whole_engine_matches_cpu") else { return };
    let mut c = CpuEngine::new();
    for (w, h, n) in SHAPES {
        let b = random_batch(&mut rng, w, h, n);
        let gi = g.subtract_images(&b).unwrap();
        let ci = c.subtract_images(&b).unwrap();
        // Results via the trait agree with the image path.
        assert_eq!(g.subtract(&b).unwrap(), gi.results);
        check_results(&gi.results, &ci.results);
        eprintln!("engine {w}x{h} x{n}: ok, e.g. gpu {:?} cpu {:?}", gi.results[0], ci.results[0]);
    }
    // Buffers are pooled and reused: a second batch of the same shape allocates nothing new.
    let b = random_batch(&mut rng, 63, 63, 4);
    g.subtract(&b).unwrap();
    let pooled = g.pooled_buffers();
    g.subtract(&b).unwrap();
    assert_eq!(g.pooled_buffers(), pooled);
}

/// Issue 4: batches of hundreds of stamps, as the stream sends. The per-stamp parameter buffer
/// once held 16 bytes a stamp for 20-byte structs: rounded up to a power of two it sometimes
/// fitted, but a batch of 205..=256 stamps (or 8192, the GPU benchmark's) failed validation.
/// Stamps are independent, so a batch gives exactly what its stamps give in small batches; and
/// the many random stamps probe the tails of the GPU's f32 precision against the CPU.
#[test]
fn large_batch_matches_cpu() {
    let mut rng = seeded("large_batch_matches_cpu");
    let Some(mut g) = gpu("large_batch_matches_cpu") else { return };
    let b = random_batch(&mut rng, 21, 19, 256);
    let gr = g.subtract(&b).unwrap();
    check_results(&gr, &CpuEngine::new().subtract(&b).unwrap());
    let npix = b.npix();
    let part = |r: std::ops::Range<usize>| StampBatch {
        n: r.len(),
        science: b.science[r.start * npix..r.end * npix].to_vec(),
        template: b.template[r.start * npix..r.end * npix].to_vec(),
        science_var: b.science_var[r.start * npix..r.end * npix].to_vec(),
        template_var: b.template_var[r.start * npix..r.end * npix].to_vec(),
        weight: b.weight[r.start * npix..r.end * npix].to_vec(),
        profile: b.profile[r.start * npix..r.end * npix].to_vec(),
        params: b.params[r].to_vec(),
        ..StampBatch::empty(b.width, b.height)
    };
    let pieces: Vec<_> = [0..7, 7..100, 100..256].into_iter().flat_map(|r| g.subtract(&part(r)).unwrap()).collect();
    assert_eq!(pieces, gr, "a batch and its pieces disagree");
    // Cut into chunks of 50 stamps, two in flight at a time (the path of batches of thousands
    // of 63x63 stamps): the same results, and the same images.
    g.set_chunk_stamps(Some(50));
    assert_eq!(g.subtract(&b).unwrap(), gr, "chunked batch");
    let chunked = g.subtract_images(&b).unwrap();
    g.set_chunk_stamps(None);
    assert_eq!(chunked, g.subtract_images(&b).unwrap(), "chunked images");
    let phases = g.profile(&b).unwrap();
    eprintln!("large_batch_matches_cpu: {phases:?}");
    assert!(phases.compute > std::time::Duration::ZERO && phases.readback > std::time::Duration::ZERO);
}

#[test]
fn gpu_preference_errors_only_without_adapter() {
    let got = blink::engine::select_engine(EnginePreference::Gpu);
    match (got, std::env::var("BLINK_ALLOW_NO_GPU").as_deref() == Ok("1")) {
        (Ok(e), _) => eprintln!("select_engine(Gpu): {}", e.adapter()),
        (Err(e), true) => eprintln!("!!!!!!!! select_engine(Gpu) failed ({e}); BLINK_ALLOW_NO_GPU=1 !!!!!!!!"),
        (Err(e), false) => panic!("select_engine(Gpu): {e}"),
    }
    assert_eq!(blink::engine::select_engine(EnginePreference::Cpu).unwrap().adapter(), "cpu");
    assert!(blink::engine::select_engine(EnginePreference::Auto).is_ok());
    assert_eq!("GPU".parse::<EnginePreference>().unwrap(), EnginePreference::Gpu);
    assert!("tpu".parse::<EnginePreference>().is_err());
}

// ---- CPU truth tests ----

const SCALE: f64 = 1.3;
const BACKGROUND: f64 = 50.0;
const SIGMA_T: f64 = 1.5;
const SIGMA_S: f64 = 2.2;
const NOISE_S: f64 = 5.0;
const NOISE_T: f64 = 1.0;

fn gaussian_image(n: usize, sigma: f64) -> Image {
    let mut d = vec![0.0f32; n * n];
    let c = (n - 1) as f64 / 2.0;
    gaussian_add(&mut d, n, c, c, sigma, 1.0);
    Image::new(n, n, d)
}

/// A Rubin-like alert: science = SCALE·(template ⊗ K) + BACKGROUND + source + noise.
fn synthetic_alert(rng: &mut StdRng, flux: f64, cx: f64, cy: f64) -> Alert {
    let (w, h) = (63usize, 63usize);
    let unit = Normal::new(0.0f64, 1.0).unwrap_or_else(|e| panic!("{e}"));
    let mut t = vec![200.0f32; w * h];
    let mut s = vec![(SCALE * 200.0 + BACKGROUND) as f32; w * h];
    let mut stars = 0;
    while stars < 4 {
        let (x, y) = (rng.gen_range(5.0..58.0), rng.gen_range(5.0..58.0));
        if (x - cx).hypot(y - cy) < 12.0 {
            continue;
        }
        stars += 1;
        let f = rng.gen_range(2000.0..20000.0);
        gaussian_add(&mut t, w, x, y, SIGMA_T, f);
        gaussian_add(&mut s, w, x, y, SIGMA_S, SCALE * f);
    }
    gaussian_add(&mut s, w, cx, cy, SIGMA_S, flux);
    for v in t.iter_mut() {
        *v += (NOISE_T * unit.sample(rng)) as f32;
    }
    for v in s.iter_mut() {
        *v += (NOISE_S * unit.sample(rng)) as f32;
    }
    let stamp = |d: Vec<f32>, var: f64, sigma: f64| Stamp {
        image: Image::new(w, h, d),
        mask: vec![false; w * h],
        variance: Some(Image::new(w, h, vec![var as f32; w * h])),
        psf: Some(gaussian_image(25, sigma)),
    };
    Alert {
        survey: Survey::Native,
        alert_id: "synthetic".into(),
        object_id: String::new(),
        ra: 0.0,
        dec: 0.0,
        mjd_tai: 60000.0,
        band: "r".into(),
        exposure_s: None,
        candidate: Candidate { stamp_x: cx, stamp_y: cy, positive: true, ..Default::default() },
        triplet: Triplet {
            science: stamp(s, NOISE_S * NOISE_S, SIGMA_S),
            template: stamp(t, NOISE_T * NOISE_T, SIGMA_T),
            difference: None,
        },
    }
}

#[test]
fn cpu_recovers_scale_background_and_flux() {
    let mut rng = seeded("cpu_recovers_scale_background_and_flux");
    let cfg = PrepareConfig::default();
    let flux = 3000.0;
    let stamps: Vec<_> = (0..20)
        .map(|_| {
            let a = synthetic_alert(&mut rng, flux, 31.0, 30.0);
            prepare_stamp(&a, &cfg).unwrap_or_else(|e| panic!("{e}"))
        })
        .collect();
    let p = &stamps[0].params;
    let k = (SIGMA_S * SIGMA_S - SIGMA_T * SIGMA_T).sqrt() as f32;
    assert!((p.kernel_sigma - k).abs() < 0.03, "kernel sigma {} vs {k}", p.kernel_sigma);
    let batch = assemble(&stamps);
    let res = CpuEngine::new().subtract(&batch).unwrap();
    let mut pulls = Vec::new();
    for r in &res {
        // The scale rests on a few stars (~1 % each); the sky level a·200 + b on every pixel.
        assert!((r.flux_scale as f64 - SCALE).abs() < 0.04, "{r:?}");
        assert!((r.background as f64 - BACKGROUND).abs() < 10.0, "{r:?}");
        let sky = r.flux_scale as f64 * 200.0 + r.background as f64;
        assert!((sky - (SCALE * 200.0 + BACKGROUND)).abs() < 1.0, "sky level {sky}: {r:?}");
        assert!((r.score - r.flux / r.flux_err).abs() < 1e-3 * r.score.abs(), "{r:?}");
        let pull = (r.flux as f64 - flux) / r.flux_err as f64;
        pulls.push(pull);
    }
    let bad = pulls.iter().filter(|p| p.abs() >= 3.0).count();
    // 20 unit-normal pulls: two beyond 3 sigma happen 0.1 % of the time, three essentially never.
    assert!(bad <= 2, "{bad} of 20 flux pulls beyond 3 sigma: {pulls:?}");
    let mean = pulls.iter().sum::<f64>() / pulls.len() as f64;
    assert!(mean.abs() < 0.9, "mean flux pull {mean} (bias): {pulls:?}");
    eprintln!("scale/background/flux recovered; pulls {pulls:.2?}; e.g. {:?}", res[0]);
}

#[test]
fn cpu_pure_noise_scores_are_unit_normal() {
    let mut rng = seeded("cpu_pure_noise_scores_are_unit_normal");
    let cfg = PrepareConfig::default();
    let stamps: Vec<_> = (0..150)
        .map(|_| {
            let (cx, cy) = (rng.gen_range(20.0..43.0), rng.gen_range(20.0..43.0));
            prepare_stamp(&synthetic_alert(&mut rng, 0.0, cx, cy), &cfg).unwrap_or_else(|e| panic!("{e}"))
        })
        .collect();
    let res = CpuEngine::new().subtract(&assemble(&stamps)).unwrap();
    let scores: Vec<f64> = res.iter().map(|r| r.score as f64).collect();
    let mean = scores.iter().sum::<f64>() / scores.len() as f64;
    let std = (scores.iter().map(|s| (s - mean).powi(2)).sum::<f64>() / (scores.len() - 1) as f64).sqrt();
    eprintln!("pure noise: score mean {mean:.3} std {std:.3} over {}", scores.len());
    assert!(mean.abs() < 0.3, "mean {mean}");
    assert!(std > 0.8 && std < 1.25, "std {std}");
}

/// Issue 5: the planes the history store keeps (difference, variance, template share) come back
/// from the GPU's work planes as the CPU makes them. NaN marks the same masked pixels on both.
/// The whole engine's fits differ a little (`check_results`), so each pixel's tolerance
/// carries the fit's difference: |Δd| ≤ |Δa|·|T'| + |Δb| + 1e-4·(|d| + √v), and the variances
/// (2|Δa|/|a| + 1e-4) of the template term plus 1e-4 of the whole.
#[test]
fn subtract_planes_match_cpu() {
    let mut rng = seeded("subtract_planes_match_cpu");
    let Some(mut g) = gpu("subtract_planes_match_cpu") else { return };
    let mut c = CpuEngine::new();
    for (w, h, n) in SHAPES {
        let b = random_batch(&mut rng, w, h, n);
        let gp = g.subtract_planes(&b).unwrap();
        let cp = c.subtract_planes(&b).unwrap();
        // The CPU planes are the image path's, with the template share from `convolve`.
        let ci = c.subtract_images(&b).unwrap();
        let conv = cpu::convolve::convolve(&b);
        assert_eq!(cp.results, ci.results);
        check_results(&gp.results, &cp.results);
        let npix = b.npix();
        for s in 0..b.n {
            let (gr, cr) = (gp.results[s], cp.results[s]);
            let (da, db) = ((gr.flux_scale - cr.flux_scale).abs(), (gr.background - cr.background).abs());
            let rel_a = 2.0 * da / cr.flux_scale.abs().max(1e-6) + 1e-4;
            for i in s * npix..(s + 1) * npix {
                let (gd, cd) = (gp.difference[i], cp.difference[i]);
                let (gv, cv) = (gp.variance[i], cp.variance[i]);
                let (gt, ct) = (gp.template_variance[i], cp.template_variance[i]);
                if b.weight[i] == 0.0 {
                    assert!(gd.is_nan() && gv.is_nan() && gt.is_nan() && cd.is_nan() && cv.is_nan() && ct.is_nan(), "pixel {i}: masked, not NaN");
                    continue;
                }
                assert_eq!(cd, ci.difference[i], "pixel {i}");
                let want_t = (f64::from(cr.flux_scale).powi(2) * f64::from(conv.template_var[i])) as f32;
                assert!((ct - want_t).abs() <= 1e-6 * want_t.abs(), "pixel {i}: cpu template share {ct}, a²·T'var {want_t}");
                assert!(ct <= cv * (1.0 + 1e-6), "pixel {i}: template share {ct} over the variance {cv}");
                let td = da * conv.template[i].abs() + db + 1e-4 * (cd.abs() + cv.max(0.0).sqrt()) + 1e-30;
                assert!((gd - cd).abs() <= td, "stamp {s} pixel {i}: difference gpu {gd} cpu {cd} (tol {td})");
                let tt = rel_a * ct.abs() + 1e-30;
                assert!((gt - ct).abs() <= tt, "stamp {s} pixel {i}: template share gpu {gt} cpu {ct} (tol {tt})");
                let tv = rel_a * ct.abs() + 1e-4 * cv.abs() + 1e-30;
                assert!((gv - cv).abs() <= tv, "stamp {s} pixel {i}: variance gpu {gv} cpu {cv} (tol {tv})");
            }
        }
        eprintln!("planes {w}x{h} x{n}: ok");
    }
}

/// `shaders/squares.wgsl` against its twin: the history's squares cut on the device equal the
/// squares cut on the host from the same engine's whole planes (`StampSquares::from_planes`):
/// the difference and variance bit for bit (NaN where masked or off the stamp), the template
/// share a²·ConvV to f32 rounding (the kernel multiplies in f32, the host in f64). Candidates
/// anywhere on the stamp, so squares leave it on every side; stamps smaller than the square
/// take the host path; one batch in chunks of 4 stamps.
#[test]
fn subtract_squares_match_their_twin() {
    let mut rng = seeded("subtract_squares_match_their_twin");
    let Some(mut g) = gpu("subtract_squares_match_their_twin") else { return };
    let half = blink::engine::STORED_HALF;
    let side = 2 * half + 1;
    let mut off_stamp = 0;
    for (k, (w, h, n)) in SHAPES.into_iter().chain([(63, 63, 11)]).enumerate() {
        let b = random_batch(&mut rng, w, h, n);
        g.set_chunk_stamps((k == SHAPES.len()).then_some(4));
        let got = g.subtract_squares(&b, half).unwrap();
        let planes = g.subtract_planes(&b).unwrap();
        let want = blink::engine::StampSquares::from_planes(&b, &planes, half);
        assert_eq!(got.results, want.results, "{w}x{h}: results");
        assert_eq!((got.side, &got.origins), (side, &want.origins), "{w}x{h}");
        assert_eq!(got.difference.len(), n * side * side, "{w}x{h}");
        for i in 0..n * side * side {
            let (s, p) = (i / (side * side), i % (side * side));
            let at = format!("{w}x{h} stamp {s} square pixel ({}, {})", p % side, p / side);
            assert_eq!(got.difference[i].to_bits(), want.difference[i].to_bits(), "{at}: difference");
            assert_eq!(got.variance[i].to_bits(), want.variance[i].to_bits(), "{at}: variance");
            let (gt, wt) = (got.template_variance[i], want.template_variance[i]);
            assert_eq!(gt.is_nan(), wt.is_nan(), "{at}: template share {gt} against {wt}");
            assert!(gt.is_nan() || (gt - wt).abs() <= 4e-7 * wt.abs(), "{at}: template share {gt} against {wt}");
            off_stamp += usize::from(gt.is_nan());
        }
        eprintln!("squares {w}x{h} x{n}: ok");
    }
    g.set_chunk_stamps(None);
    assert!(off_stamp > 0, "no square left its stamp");
}

//! Stacking's invariants and statistics: order independence and linearity (proptest), the
//! stack variance with the template covariance against simulation, the score's σ after a shift
//! and on a pure-noise stack, a faint source's stack SNR against the ideal, windows.
//!
//! The statistical tests use fixed seeds (their figures are in `docs/stacking.md`) and print
//! what they measure (`cargo test --lib stack -- --nocapture`).

use super::*;
use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Normal};

/// A unit-sum Gaussian PSF of σ `s` on a `side²` image, centred at `(c + ox, c + oy)`.
fn gaussian_psf(side: usize, s: f64, ox: f64, oy: f64) -> PsfImage {
    PsfImage::gaussian(side, s, ox, oy)
}

fn epoch(w: usize, h: usize, mjd: f64, band: &str, dx: f64, dy: f64) -> StackEpoch {
    StackEpoch {
        width: w,
        height: h,
        diff: vec![0.0; w * h],
        var: vec![1.0; w * h],
        var_template: vec![0.0; w * h],
        psf: gaussian_psf(9, 1.3, 0.0, 0.0),
        mjd,
        band: band.to_string(),
        dx,
        dy,
    }
}

/// Random epochs for the property tests: noise, a few NaNs, tied MJDs, sub-pixel offsets.
fn random_epochs(seed: u64, n: usize) -> Vec<StackEpoch> {
    let mut rng = StdRng::seed_from_u64(seed);
    let (w, h) = (9, 8);
    (0..n)
        .map(|_| {
            let mut e = epoch(w, h, 60000.0 + rng.gen_range(0..3) as f64, "r", rng.gen_range(-1.5..1.5), rng.gen_range(-1.5..1.5));
            if rng.gen_bool(0.3) {
                (e.dx, e.dy) = (0.0, 0.0);
            }
            for i in 0..w * h {
                e.var[i] = rng.gen_range(0.5f32..4.0);
                e.var_template[i] = e.var[i] * rng.gen_range(0.0f32..0.5);
                e.diff[i] = if rng.gen_bool(0.05) { f32::NAN } else { rng.gen_range(-5.0f32..5.0) };
            }
            e.psf = gaussian_psf(7, rng.gen_range(0.8..2.0), rng.gen_range(-0.5..0.5), rng.gen_range(-0.5..0.5));
            e
        })
        .collect()
}

fn bits(s: &Stack) -> Vec<u64> {
    let planes = s.image.iter().chain(&s.var).chain(&s.var_template).map(|x| x.to_bits() as u64);
    planes.chain(s.count.iter().map(|&c| c as u64)).chain(s.psf.pixels.iter().map(|x| x.to_bits())).collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Any order of the same epochs gives the same stack, bit for bit.
    #[test]
    fn a_stack_does_not_depend_on_the_order_of_its_epochs(seed in any::<u64>(), n in 1usize..7, perm in any::<u64>()) {
        let epochs = random_epochs(seed, n);
        let mut shuffled = epochs.clone();
        let mut rng = StdRng::seed_from_u64(perm);
        for i in (1..n).rev() {
            shuffled.swap(i, rng.gen_range(0..=i));
        }
        let (a, b) = (coadd(&epochs).unwrap(), coadd(&shuffled).unwrap());
        prop_assert_eq!(bits(&a), bits(&b));
    }

    /// The stack is linear in the differences: scaled by k, S scales by k and the variances
    /// do not move (beyond rounding: the scaled pixels can break MJD ties the other way).
    #[test]
    fn a_stack_is_linear_in_the_differences(seed in any::<u64>(), n in 1usize..6, k in -8.0f32..8.0) {
        let epochs = random_epochs(seed, n);
        let scaled: Vec<StackEpoch> = epochs.iter().cloned().map(|mut e| { e.diff.iter_mut().for_each(|d| *d *= k); e }).collect();
        let (a, b) = (coadd(&epochs).unwrap(), coadd(&scaled).unwrap());
        prop_assert_eq!(&a.count, &b.count);
        for (x, y) in a.var.iter().zip(&b.var) {
            prop_assert!(x.is_nan() && y.is_nan() || (x / y - 1.0).abs() < 1e-6, "var {} vs {}", x, y);
        }
        for (x, y) in a.image.iter().zip(&b.image) {
            prop_assert!(x.is_nan() == y.is_nan());
            if x.is_finite() {
                prop_assert!((x * k - y).abs() <= 1e-5 * (1.0 + (x * k).abs()), "{} · {} vs {}", x, k, y);
            }
        }
    }
}

#[test]
fn one_unshifted_epoch_is_its_own_stack() {
    let mut e = random_epochs(7, 1).pop().unwrap();
    (e.dx, e.dy) = (0.0, 0.0);
    let s = coadd(std::slice::from_ref(&e)).unwrap();
    for i in 0..e.npix() {
        if e.diff[i].is_nan() {
            assert!(s.image[i].is_nan() && s.var[i].is_nan() && s.count[i] == 0);
        } else {
            assert_eq!((s.image[i], s.count[i]), (e.diff[i], 1));
            assert!((s.var[i] / e.var[i] - 1.0).abs() < 1e-6, "{i}: {} {}", s.var[i], e.var[i]);
            assert!((s.var_template[i] - e.var_template[i]).abs() <= 1e-6 * e.var[i], "{i}: {} {}", s.var_template[i], e.var_template[i]);
        }
    }
    assert!(s.psf.pixels.iter().zip(&e.psf.pixels).all(|(a, b)| (a - b).abs() < 1e-12));
}

#[test]
fn masked_and_edge_pixels_drop_out_of_one_epoch_only() {
    let (w, h) = (12, 10);
    let mut a = epoch(w, h, 1.0, "g", 0.0, 0.0);
    let mut b = epoch(w, h, 2.0, "g", 0.5, 0.0);
    a.diff.iter_mut().for_each(|d| *d = 1.0);
    b.diff.iter_mut().for_each(|d| *d = 3.0);
    a.diff[5 * w + 6] = f32::NAN;
    let s = coadd(&[a, b]).unwrap();
    // Epoch b shifted by half a pixel: its last 3 and first 2 columns lose their support.
    assert_eq!(s.count[5 * w + 6], 1);
    assert_eq!(s.count[4 * w + 11], 1);
    assert_eq!(s.count[4 * w + 1], 1);
    assert_eq!(s.count[4 * w + 6], 2);
    assert_eq!(s.image[4 * w + 11], 1.0);
    assert!((s.image[5 * w + 6] - 3.0).abs() < 1e-6);
    assert!(s.image.iter().all(|x| x.is_finite()));
}

#[test]
fn align_shifts_the_psf_with_the_pixels_and_copies_integer_shifts() {
    let (w, h) = (21, 19);
    // A source at common (10, 9) with offset (0.4, −0.3) lies at (10.4, 8.7) on the stamp.
    let (dx, dy) = (0.4, -0.3);
    let mut e = epoch(w, h, 0.0, "r", dx, dy);
    for y in 0..h {
        for x in 0..w {
            let (u, v) = (x as f64 - 10.4, y as f64 - 8.7);
            e.diff[y * w + x] = (100.0 * (-(u * u + v * v) / (2.0 * 1.6 * 1.6)).exp()) as f32;
        }
    }
    e.psf = gaussian_psf(15, 1.6, dx, dy);
    let a = align(&e).unwrap();
    let centroid = |img: &[f64], side_w: usize| {
        let (mut sx, mut sy, mut s) = (0.0, 0.0, 0.0);
        for (i, v) in img.iter().enumerate() {
            if v.is_finite() {
                sx += v * (i % side_w) as f64;
                sy += v * (i / side_w) as f64;
                s += v;
            }
        }
        (sx / s, sy / s)
    };
    let (cx, cy) = centroid(&a.diff.iter().map(|&v| v as f64).collect::<Vec<_>>(), w);
    assert!((cx - 10.0).abs() < 0.02 && (cy - 9.0).abs() < 0.02, "aligned source at ({cx}, {cy})");
    let (px, py) = centroid(&a.psf.pixels, 15);
    assert!((px - 7.0).abs() < 0.02 && (py - 7.0).abs() < 0.02, "aligned PSF at ({px}, {py})");
    assert!((a.psf.pixels.iter().sum::<f64>() - 1.0).abs() < 1e-12);
    // Variance: Σ L² V with V = 1 is the correlation factor.
    let (kx, ky) = a.corr;
    assert!((a.var[9 * w + 10] as f64 - kx * ky).abs() < 1e-6);
    // Integer offsets: exact copies, and the PSF moved by whole pixels.
    e.dx = 2.0;
    e.dy = -1.0;
    let a = align(&e).unwrap();
    assert_eq!(a.corr, (1.0, 1.0));
    assert_eq!(a.diff[5 * w + 5], e.diff[4 * w + 7]);
    assert!(a.diff[..w].iter().all(|v| v.is_nan()) && a.diff[(h - 1) * w + w - 1].is_nan() && a.diff[(h - 1) * w + w - 3].is_finite());
}

/// Standard deviation of the finite values.
fn sd(v: &[f64]) -> f64 {
    let n = v.len() as f64;
    let m = v.iter().sum::<f64>() / n;
    (v.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / (n - 1.0)).sqrt()
}

/// White noise shifted by a sub-pixel offset: its per-pixel variance drops to cx·cy, and the
/// matched-filter score with the shifted variance is too wide by 1/sqrt(cx·cy) unless divided
/// by `Aligned::score_inflate`, after which σ = 1 within 3%.
#[test]
fn score_of_shifted_white_noise_has_unit_sigma_with_the_correlation_factor() {
    let (w, h) = (96, 96);
    let normal = Normal::new(0.0, 1.0).unwrap();
    let mut rng = StdRng::seed_from_u64(0x5eed_0001);
    for (dx, dy) in [(0.5, 0.5), (0.3, -0.2), (0.25, 0.75), (0.0, 0.5)] {
        let (mut corrected, mut raw, mut pixvar) = (Vec::new(), Vec::new(), Vec::new());
        let mut inflate = 1.0;
        for _ in 0..16 {
            let mut e = epoch(w, h, 0.0, "r", dx, dy);
            e.diff.iter_mut().for_each(|d| *d = normal.sample(&mut rng) as f32);
            e.psf = gaussian_psf(15, 1.5, dx, dy);
            let a = align(&e).unwrap();
            inflate = a.score_inflate();
            let p = Profile::Full { side: a.psf.side, pixels: a.psf.pixels.clone() };
            let sc = crate::cpu::frame::score(&a.diff, &a.var, w, h, &p, inflate);
            let r = 12;
            for y in r..h - r {
                for x in r..w - r {
                    let i = y * w + x;
                    corrected.push(sc.score[i] as f64);
                    raw.push(sc.score[i] as f64 * inflate);
                    pixvar.push(a.diff[i] as f64);
                }
            }
        }
        let (s, s_raw, s_pix) = (sd(&corrected), sd(&raw), sd(&pixvar));
        eprintln!("shift ({dx}, {dy}): pixel σ {s_pix:.4} (predicted {:.4}), score σ uncorrected {s_raw:.4}, corrected by {inflate:.4}: {s:.4}", 1.0 / inflate);
        assert!((s - 1.0).abs() < 0.03, "shift ({dx}, {dy}): score σ {s}");
        assert!((s_pix * inflate - 1.0).abs() < 0.02, "pixel σ {s_pix}");
    }
}
use crate::cpu::frame::Profile;

/// One template realisation common to N epochs, independent science noise per epoch:
/// `D_i = S_i − g_i T` (each epoch's template part scaled by its own PSF matching, g_i ≈ 1).
/// The empirical variance of the stack over many pixels and trials is the predicted `Var(S)`
/// with the template term; without it (epochs taken as independent) it is far off.
#[test]
fn stack_variance_includes_the_template_covariance() {
    let (w, h, n, trials) = (48, 48, 8, 40);
    let normal = Normal::new(0.0, 1.0).unwrap();
    let mut rng = StdRng::seed_from_u64(0x5eed_0002);
    let (mut z, mut z_naive, mut z_t) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..trials {
        let vt = 0.6f64;
        let t: Vec<f64> = (0..w * h).map(|_| normal.sample(&mut rng) * vt.sqrt()).collect();
        let mut epochs = Vec::new();
        for i in 0..n {
            let g: f64 = rng.gen_range(0.8..1.2);
            let vs: f64 = rng.gen_range(1.0..4.0);
            let mut e = epoch(w, h, i as f64, "r", 0.0, 0.0);
            for (p, tp) in t.iter().enumerate() {
                // A smooth variance map across the stamp, the template's share within it.
                let vs_p = vs * (1.0 + 0.5 * (p % w) as f64 / w as f64);
                e.diff[p] = (normal.sample(&mut rng) * vs_p.sqrt() - g * tp) as f32;
                e.var[p] = (vs_p + g * g * vt) as f32;
                e.var_template[p] = (g * g * vt) as f32;
                if rng.gen_bool(0.03) {
                    e.diff[p] = f32::NAN;
                }
            }
            epochs.push(e);
        }
        let s = coadd(&epochs).unwrap();
        for p in 0..w * h {
            if s.count[p] == 0 {
                continue;
            }
            // Epochs taken as independent: Σ w² V / W².
            let (mut ws, mut w2v) = (0.0f64, 0.0f64);
            for e in &epochs {
                if e.diff[p].is_finite() {
                    let wt = 1.0 / e.var[p] as f64;
                    ws += wt;
                    w2v += wt * wt * e.var[p] as f64;
                }
            }
            let naive = w2v / ws / ws;
            let x = s.image[p] as f64;
            z.push(x / (s.var[p] as f64).sqrt());
            z_naive.push(x / naive.sqrt());
            z_t.push(s.var_template[p] as f64 / s.var[p] as f64);
        }
    }
    let (sz, sn) = (sd(&z), sd(&z_naive));
    let share = z_t.iter().sum::<f64>() / z_t.len() as f64;
    eprintln!(
        "stack of {n} epochs, {} samples: var(S)/predicted = {:.4}; without the template term {:.3}; template share of Var(S) {share:.3}",
        z.len(),
        sz * sz,
        sn * sn
    );
    assert!((sz * sz - 1.0).abs() < 0.03, "variance ratio {}", sz * sz);
    assert!(sn * sn > 1.5, "leaving the template term out is only {} off", sn * sn);
}

/// `n` pure-noise epochs with sub-pixel offsets and a common template noise, plus `flux` at
/// the common grid's `(x0, y0)`; PSF Gaussian σ 1.5 at each epoch's phase.
#[allow(clippy::too_many_arguments)]
fn noisy_epochs(rng: &mut StdRng, w: usize, h: usize, n: usize, v: f64, vt: f64, flux: f64, x0: f64, y0: f64) -> Vec<StackEpoch> {
    let normal = Normal::new(0.0, 1.0).unwrap();
    let t: Vec<f64> = (0..w * h).map(|_| normal.sample(rng) * vt.sqrt()).collect();
    let sig = 1.5;
    (0..n)
        .map(|i| {
            let (dx, dy) = (rng.gen_range(-0.5..0.5), rng.gen_range(-0.5..0.5));
            let mut e = epoch(w, h, i as f64 * 0.3, "r", dx, dy);
            for (p, tp) in t.iter().enumerate() {
                let (x, y) = ((p % w) as f64 - x0 - dx, (p / w) as f64 - y0 - dy);
                let src = flux * (-(x * x + y * y) / (2.0 * sig * sig)).exp() / (2.0 * std::f64::consts::PI * sig * sig);
                e.diff[p] = (src + normal.sample(rng) * (v - vt).sqrt() - tp) as f32;
                e.var[p] = v as f32;
                e.var_template[p] = vt as f32;
            }
            e.psf = gaussian_psf(15, sig, dx, dy);
            e
        })
        .collect()
}

/// The score of a stack of pure noise (sub-pixel offsets, template term) has σ 1 ± 0.05.
#[test]
fn score_of_a_pure_noise_stack_has_unit_sigma() {
    let (w, h) = (64, 64);
    let mut rng = StdRng::seed_from_u64(0x5eed_0003);
    let mut scores = Vec::new();
    for _ in 0..12 {
        let epochs = noisy_epochs(&mut rng, w, h, 10, 1.0, 0.15, 0.0, 32.0, 32.0);
        let s = coadd(&epochs).unwrap();
        let sc = score(&s);
        let r = 12;
        for y in r..h - r {
            for x in r..w - r {
                scores.push(sc.score[y * w + x] as f64);
            }
        }
    }
    let s = sd(&scores);
    eprintln!("pure-noise stack of 10 shifted epochs: score σ {s:.4} over {} pixels", scores.len());
    assert!((s - 1.0).abs() < 0.05, "score σ {s}");
}

/// A source of per-epoch SNR 2.5 over 10 epochs reaches the ideal stack SNR within 10%.
/// With equal epochs (per-pixel V, template share VT) the stack's variance is
/// `(V − VT)/N + VT` per pixel, so the ideal is `SNR_1 · sqrt(V / ((V − VT)/N + VT))`
/// (`SNR_1 · √N` only without template noise); in general
/// `F·sqrt(ΣP²) / sqrt(Σ aᵢ²(Vᵢ − VTᵢ) + (Σ aᵢ √VTᵢ)²)` with `aᵢ = wᵢ / Σw`.
#[test]
fn a_faint_source_reaches_the_ideal_stack_snr() {
    let (w, h, n) = (33, 33, 10);
    let (v, vt) = (1.0, 0.1);
    let sig: f64 = 1.5;
    let sum_p2 = gaussian_psf(15, sig, 0.0, 0.0).pixels.iter().map(|p| p * p).sum::<f64>();
    let flux = 2.5 / (sum_p2 / v).sqrt();
    let ideal = 2.5 * (v / ((v - vt) / n as f64 + vt)).sqrt();
    let mut rng = StdRng::seed_from_u64(0x5eed_0004);
    let (mut stacked, mut single, mut fluxes) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..150 {
        let epochs = noisy_epochs(&mut rng, w, h, n, v, vt, flux, 16.0, 16.0);
        let s = coadd(&epochs).unwrap();
        let m = measure(&s, 16.0, 16.0).expect("centre measured");
        stacked.push(m.score);
        fluxes.push(m.flux);
        let a = align(&epochs[0]).unwrap();
        let one = Stack { width: w, height: h, image: a.diff.clone(), var: a.var.iter().map(|x| (*x as f64 / (a.corr.0 * a.corr.1)) as f32).collect(), var_template: a.var_template, count: vec![1; w * h], psf: a.psf, epochs: 1 };
        single.push(measure(&one, 16.0, 16.0).expect("centre").score);
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let (snr, snr1, f) = (mean(&stacked), mean(&single), mean(&fluxes));
    eprintln!(
        "faint source: per-epoch SNR {snr1:.3} (2.5 injected), stack SNR {snr:.3}, ideal with the template term {ideal:.3} (√N without: {:.3}); flux {f:.2} of {flux:.2}; stack score σ {:.3}",
        2.5 * (n as f64).sqrt(),
        sd(&stacked)
    );
    assert!((snr1 / 2.5 - 1.0).abs() < 0.1, "per-epoch SNR {snr1}");
    assert!((snr / ideal - 1.0).abs() < 0.1, "stack SNR {snr} against {ideal}");
    assert!((f / flux - 1.0).abs() < 0.05, "flux {f} of {flux}");
}

#[test]
fn measure_at_a_pixel_is_the_score_image() {
    let mut rng = StdRng::seed_from_u64(9);
    let s = coadd(&noisy_epochs(&mut rng, 30, 28, 4, 2.0, 0.3, 40.0, 14.0, 13.0)).unwrap();
    let sc = score(&s);
    for (x, y) in [(14usize, 13usize), (5, 20), (0, 0), (29, 27)] {
        let i = y * 30 + x;
        match measure(&s, x as f64, y as f64) {
            Some(m) => {
                assert!((m.score - sc.score[i] as f64).abs() < 1e-4 * (1.0 + m.score.abs()), "({x}, {y}): {} {}", m.score, sc.score[i]);
                assert!((m.flux_err / sc.flux_err[i] as f64 - 1.0).abs() < 1e-5);
            }
            None => assert!(!sc.flux_err[i].is_finite(), "({x}, {y})"),
        }
    }
    // A sub-pixel position between pixels scores the source less than its centre does.
    let c = measure(&s, 14.0, 13.0).unwrap();
    let off = measure(&s, 14.4, 13.0).unwrap();
    assert_eq!((off.x, off.y), (14, 13));
    assert!(off.score < c.score);
    assert!(measure(&s, -3.0, 4.0).is_none());
}

/// Two stacks of equal epochs sharing the template, stacked again, give the stack of all.
#[test]
fn stacks_stack_again_with_their_template_term() {
    let mut rng = StdRng::seed_from_u64(11);
    let mut epochs = noisy_epochs(&mut rng, 20, 20, 6, 1.0, 0.2, 0.0, 10.0, 10.0);
    epochs.iter_mut().for_each(|e| (e.dx, e.dy) = (0.0, 0.0));
    let all = coadd(&epochs).unwrap();
    let a = coadd(&epochs[..3]).unwrap().as_epoch(1.0, "r");
    let b = coadd(&epochs[3..]).unwrap().as_epoch(2.0, "r");
    let again = coadd(&[a, b]).unwrap();
    for i in 0..400 {
        assert!((again.var[i] / all.var[i] - 1.0).abs() < 1e-5, "{i}: {} {}", again.var[i], all.var[i]);
        assert!((again.var_template[i] / all.var_template[i] - 1.0).abs() < 1e-5);
        assert!((again.image[i] - all.image[i]).abs() < 1e-5);
    }
}

#[test]
fn windows_per_band_with_duplicates_marked() {
    let now = 60100.0;
    let mut e = Vec::new();
    // r: three exposures tonight (the first 1.05 nights before the last: the tolerance),
    // one 2 nights ago, one 20 nights ago, one in the future (ignored).
    for (dt, band) in [(0.0, "r"), (0.2, "r"), (1.05, "r"), (2.0, "r"), (20.0, "r"), (-1.0, "r"), (0.1, "g"), (0.15, "g"), (40.0, "g")] {
        e.push(epoch(11, 11, now - dt, band, 0.0, 0.0));
    }
    let ws = windows(&e, now, &DEFAULT_WINDOWS).unwrap();
    let got: Vec<(&str, f64, usize, Option<f64>)> = ws.iter().map(|w| (w.band.as_str(), w.nights, w.epochs.len(), w.same_as)).collect();
    assert_eq!(
        got,
        [("g", 1.0, 2, None), ("g", 3.0, 2, Some(1.0)), ("g", 10.0, 2, Some(1.0)), ("g", 30.0, 2, Some(1.0)), ("r", 1.0, 3, None), ("r", 3.0, 4, None), ("r", 10.0, 4, Some(3.0)), ("r", 30.0, 5, None)]
    );
    // Latest first; a duplicate carries the shorter window's stack.
    assert_eq!(ws[4].epochs, [0, 1, 2]);
    assert_eq!(ws[1].stack, ws[0].stack);
    assert_eq!(ws[7].stack.epochs, 5);
    // The same as stacking each window's epochs directly.
    for w in &ws {
        let direct = coadd(&w.epochs.iter().map(|&i| e[i].clone()).collect::<Vec<_>>()).unwrap();
        assert_eq!(bits(&direct), bits(&w.stack), "{} {}", w.band, w.nights);
    }
    assert!(windows(&e, now - 100.0, &DEFAULT_WINDOWS).unwrap().is_empty());
    assert!(windows(&[], now, &DEFAULT_WINDOWS).unwrap().is_empty());
}

#[test]
fn bad_epochs_are_errors() {
    let mut e = epoch(5, 5, 1.0, "r", 0.0, 0.0);
    e.var.pop();
    assert!(matches!(coadd(&[e]), Err(StackError::BadEpoch { .. })));
    let mut e = epoch(5, 5, 1.0, "r", f64::NAN, 0.0);
    assert!(align(&e).is_err());
    e.dx = 0.0;
    e.psf.side = 4;
    assert!(coadd(&[e]).is_err());
    assert!(matches!(coadd(&[]), Err(StackError::Empty)));
    let (a, b) = (epoch(5, 5, 1.0, "r", 0.0, 0.0), epoch(6, 5, 1.0, "r", 0.0, 0.0));
    assert!(coadd(&[a, b]).is_err());
}

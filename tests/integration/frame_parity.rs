//! The whole-frame GPU kernels (`shaders/frame/`) against their CPU twins (`cpu::frame`) on
//! fresh random frames with NaN bands, masked and saturated pixels: the seed comes from the
//! clock and is printed; rerun one with `BLINK_SEED=<seed>`.
//!
//! Like `al_parity`, these FAIL when no adapter exists unless `BLINK_ALLOW_NO_GPU=1`.
//!
//! Tolerances (f32 on the GPU against f64 on the CPU):
//! - score, flux: |Δ| ≤ 1e-4 · max(1, |cpu|); error: relative 1e-4; kept pixels (finite error)
//!   exactly the same.
//! - mesh background: cell medians exact, so |Δ| ≤ 1e-5 · max |background| after the f32
//!   interpolation; the same for the sky-subtracted image and the residual taken off in place.
//! - variance: relative 1e-6, NaN on the same pixels; saturation, grown, bad and packed masks:
//!   identical.

#[path = "../../benches/common/star_field.rs"]
mod star_field;
use blink::cpu::frame::{self as twin, Profile};

use crate::common::{gpu, seeded};
use rand::rngs::StdRng;
use rand::Rng;

const W: usize = 96;
const H: usize = 80;

/// A sky with a gradient, noise, a few stars, a NaN band (rows 10–12) and a NaN column.
fn frame(rng: &mut StdRng) -> Vec<f32> {
    let mut img: Vec<f32> = (0..W * H)
        .map(|i| {
            let (x, y) = ((i % W) as f32, (i / W) as f32);
            100.0 + 0.3 * x - 0.2 * y + rng.gen_range(-10.0f32..10.0)
        })
        .collect();
    for _ in 0..6 {
        let (cx, cy, f) = (rng.gen_range(0.0..W as f32), rng.gen_range(0.0..H as f32), rng.gen_range(200.0f32..5000.0));
        for (i, v) in img.iter_mut().enumerate() {
            let (dx, dy) = ((i % W) as f32 - cx, (i / W) as f32 - cy);
            *v += f * (-(dx * dx + dy * dy) / 4.5).exp();
        }
    }
    for y in 10..13 {
        img[y * W..(y + 1) * W].fill(f32::NAN);
    }
    let col = rng.gen_range(0..W);
    for y in 0..H {
        img[y * W + col] = f32::NAN;
    }
    img
}

/// A random difference and variance: masked (variance 0) pixels, a NaN band in both.
fn difference(rng: &mut StdRng) -> (Vec<f32>, Vec<f32>) {
    let mut d: Vec<f32> = (0..W * H).map(|_| rng.gen_range(-30.0f32..30.0)).collect();
    let mut v: Vec<f32> = (0..W * H).map(|_| if rng.gen_bool(0.05) { 0.0 } else { rng.gen_range(50.0f32..400.0) }).collect();
    // A transient and a masked block.
    for (i, x) in d.iter_mut().enumerate() {
        let (dx, dy) = ((i % W) as f32 - 40.0, (i / W) as f32 - 30.0);
        *x += 400.0 * (-(dx * dx + dy * dy) / 8.0).exp();
    }
    for y in 50..58 {
        for x in 5..20 {
            v[y * W + x] = 0.0;
        }
    }
    for y in 70..72 {
        d[y * W..(y + 1) * W].fill(f32::NAN);
        v[y * W..(y + 1) * W].fill(f32::NAN);
    }
    (d, v)
}

fn compare_score(what: &str, gpu: &blink::detect::frame::ScoreImage, cpu: &blink::detect::frame::ScoreImage) {
    assert_eq!(gpu.radius, cpu.radius, "{what}: radius");
    let mut worst = 0.0f32;
    for i in 0..W * H {
        assert_eq!(gpu.flux_err[i].is_finite(), cpu.flux_err[i].is_finite(), "{what}: kept pixel {i}: gpu err {} cpu {}", gpu.flux_err[i], cpu.flux_err[i]);
        let tol = |c: f32| 1e-4 * c.abs().max(1.0);
        let ds = (gpu.score[i] - cpu.score[i]).abs();
        worst = worst.max(ds / tol(cpu.score[i]));
        assert!(ds <= tol(cpu.score[i]), "{what}: score at {i}: gpu {} cpu {}", gpu.score[i], cpu.score[i]);
        // The flux's tolerance is the score's in flux units (flux = score · flux_err): f32 sums
        // round on the noise's scale too, and a flux of 2.9 at flux_err 3 missed a tolerance
        // relative to the flux alone by 4% (seed 1795772037418909104).
        let flux_tol = if cpu.flux_err[i].is_finite() { tol(cpu.score[i]) * cpu.flux_err[i] } else { tol(cpu.flux[i]) };
        assert!((gpu.flux[i] - cpu.flux[i]).abs() <= flux_tol, "{what}: flux at {i}: gpu {} cpu {} (err {})", gpu.flux[i], cpu.flux[i], cpu.flux_err[i]);
        if cpu.flux_err[i].is_finite() {
            assert!((gpu.flux_err[i] / cpu.flux_err[i] - 1.0).abs() <= 1e-4, "{what}: err at {i}: gpu {} cpu {}", gpu.flux_err[i], cpu.flux_err[i]);
        }
    }
    eprintln!("{what}: worst score error {worst:.3} of the tolerance");
}

#[test]
fn frame_score_matches_the_twin() {
    let test = "frame_score_matches_the_twin";
    let Some(mut g) = gpu(test) else { return };
    let mut rng = seeded(test);
    let (d, v) = difference(&mut rng);
    let sigma = rng.gen_range(0.8..3.0);
    let inflate = rng.gen_range(1.0..1.3);
    // The separable Gaussian of detect::frame::score_image.
    let p = Profile::gaussian(sigma);
    let got = g.frame_score_image(&d, &v, W, H, &p, inflate).unwrap_or_else(|e| panic!("{test}: {e}"));
    compare_score("separable", &got, &twin::score(&d, &v, W, H, &p, inflate));
    // Any odd profile: an elongated, off-centre one with a negative lobe.
    let side = 2 * rng.gen_range(2..7) + 1;
    let c = (side / 2) as f64;
    let pixels: Vec<f64> = (0..side * side)
        .map(|i| {
            let (x, y) = ((i % side) as f64 - c - 0.3, (i / side) as f64 - c + 0.2);
            (-(x * x / 3.0 + y * y / 1.5) / 2.0).exp() - 0.02
        })
        .collect();
    let p = Profile::Full { side, pixels: pixels.clone() };
    let got = g.frame_score_image(&d, &v, W, H, &p, inflate).unwrap_or_else(|e| panic!("{test}: {e}"));
    compare_score("full", &got, &twin::score(&d, &v, W, H, &p, inflate));
    // The route stands for detect::psf::matched_filter (an FFT): the same score where both
    // keep a pixel, and the same pixels kept but for a few at the floor.
    let fft = blink::detect::psf::matched_filter(&d, &v, W, H, &blink::subtract::decorr::PsfImage { side, pixels }, inflate);
    let mut differ = 0;
    for i in 0..W * H {
        if got.flux_err[i].is_finite() != fft.flux_err[i].is_finite() {
            differ += 1;
        } else if fft.flux_err[i].is_finite() {
            assert!((got.score[i] - fft.score[i]).abs() <= 1e-3 * fft.score[i].abs().max(1.0), "{test}: score at {i}: gpu {} fft {}", got.score[i], fft.score[i]);
        }
    }
    assert!(differ <= W * H / 100, "{test}: {differ} pixels kept by one and not the other");
    // A bad profile is an error, not a panic.
    assert!(g.frame_score_image(&d, &v, W, H, &Profile::Full { side: 4, pixels: vec![0.0; 16] }, 1.0).is_err());
}

#[test]
fn frame_mesh_matches_the_twin() {
    let test = "frame_mesh_matches_the_twin";
    let Some(mut g) = gpu(test) else { return };
    let mut rng = seeded(test);
    let img = frame(&mut rng);
    // Saturated: bright pixels, plus one whole cell (its median comes from the fill).
    let mut sat = twin::saturation(&img, Some(rng.gen_range(300.0f32..1500.0)));
    for y in 0..24 {
        for x in 72..96 {
            sat[y * W + x] = true;
        }
    }
    for mesh in [8usize, 24, 64] {
        let want = twin::mesh_background(&img, |i| !sat[i], W, H, mesh);
        let pi = g.frame_upload(&img, W, H).unwrap_or_else(|e| panic!("{e}"));
        let ps = g.frame_upload_mask(&sat, W, H).unwrap_or_else(|e| panic!("{e}"));
        let bg = g.frame_mesh_background(&pi, &ps, mesh).unwrap_or_else(|e| panic!("{test}: {e}"));
        let got = g.frame_read(&bg).unwrap_or_else(|e| panic!("{e}"));
        let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        for i in 0..W * H {
            assert!((got[i] - want[i]).abs() <= 1e-5 * scale, "{test}: mesh {mesh}, pixel {i}: gpu {} cpu {}", got[i], want[i]);
        }
        // The image less its sky (NaN stays NaN).
        let sub = g.frame_sky_subtract(&pi, &ps, mesh).unwrap_or_else(|e| panic!("{test}: {e}"));
        let got = g.frame_read(&sub).unwrap_or_else(|e| panic!("{e}"));
        for i in 0..W * H {
            let w = img[i] - want[i];
            assert!(got[i].is_nan() == w.is_nan() && (w.is_nan() || (got[i] - w).abs() <= 1e-5 * scale), "{test}: sky-subtracted {i}: gpu {} cpu {w}", got[i]);
        }
        for p in [pi, ps, bg, sub] {
            g.frame_release(p);
        }
    }
    // A difference's residual background, valid where the variance is > 0, taken off in place.
    let (mut d, v) = difference(&mut rng);
    for (i, x) in d.iter_mut().enumerate() {
        *x += 5.0 + 0.05 * (i % W) as f32;
    }
    let pd = g.frame_upload(&d, W, H).unwrap_or_else(|e| panic!("{e}"));
    let pv = g.frame_upload(&v, W, H).unwrap_or_else(|e| panic!("{e}"));
    g.frame_subtract_residual_background(&pd, &pv, 16).unwrap_or_else(|e| panic!("{test}: {e}"));
    let got = g.frame_read(&pd).unwrap_or_else(|e| panic!("{e}"));
    blink::detect::frame::subtract_residual_background(&mut d, &v, W, H, 16);
    for i in 0..W * H {
        assert!(got[i].is_nan() == d[i].is_nan() && (d[i].is_nan() || (got[i] - d[i]).abs() <= 1e-4), "{test}: residual {i}: gpu {} cpu {}", got[i], d[i]);
    }
}

#[test]
fn frame_prepare_and_grow_match_the_twins() {
    let test = "frame_prepare_and_grow_match_the_twins";
    let Some(mut g) = gpu(test) else { return };
    let mut rng = seeded(test);
    let img = frame(&mut rng);
    let (gain, rn2) = (rng.gen_range(0.5..4.0), rng.gen_range(0.0..30.0));
    let level = rng.gen_range(300.0f32..1500.0);
    let pi = g.frame_upload(&img, W, H).unwrap_or_else(|e| panic!("{e}"));
    let (pv, ps) = g.frame_prepare(&pi, gain, rn2, Some(level)).unwrap_or_else(|e| panic!("{test}: {e}"));
    let var = g.frame_read(&pv).unwrap_or_else(|e| panic!("{e}"));
    let sat = g.frame_read_mask(&ps).unwrap_or_else(|e| panic!("{e}"));
    let want = twin::variance_smoothed(&img, W, H, gain, rn2);
    for i in 0..W * H {
        assert!(var[i].is_nan() == want[i].is_nan() && (want[i].is_nan() || (var[i] / want[i] - 1.0).abs() <= 1e-6), "{test}: variance {i}: gpu {} cpu {}", var[i], want[i]);
    }
    assert_eq!(sat, twin::saturation(&img, Some(level)), "{test}: saturation");
    let (_, none) = g.frame_prepare(&pi, gain, rn2, None).unwrap_or_else(|e| panic!("{test}: {e}"));
    assert!(g.frame_read_mask(&none).unwrap_or_else(|e| panic!("{e}")).iter().all(|s| !s));
    // Grow a sparse random mask.
    let mask: Vec<bool> = (0..W * H).map(|_| rng.gen_bool(0.01)).collect();
    let pm = g.frame_upload_mask(&mask, W, H).unwrap_or_else(|e| panic!("{e}"));
    for r in [0usize, 1, 3, rng.gen_range(4..40), 200] {
        let grown = g.frame_grow(&pm, r).unwrap_or_else(|e| panic!("{test}: {e}"));
        assert_eq!(g.frame_read_mask(&grown).unwrap_or_else(|e| panic!("{e}")), twin::grow(&mask, W, H, r), "{test}: grow by {r}");
        g.frame_release(grown);
    }
}

#[test]
fn prepare_gpu_matches_prepared_new() {
    use blink::detect::frame::{FrameOptions, Prepared};
    use blink::detect::image::{Image, ImageHeader};
    let test = "prepare_gpu_matches_prepared_new";
    let Some(mut g) = gpu(test) else { return };
    let mut rng = seeded(test);
    let header = ImageHeader {
        mjd_start: Some(61000.0),
        exptime: 30.0,
        band: Some("r".into()),
        gain: if rng.gen_bool(0.5) { Some(rng.gen_range(0.5..4.0)) } else { None },
        read_noise: rng.gen_range(0.0..8.0),
        saturate: Some(rng.gen_range(400.0..1500.0)),
        zero_point: None,
        seeing: Some(3.0),
        wcs: None,
        ncombine: None,
    };
    let img = Image { path: "parity.fits".into(), width: W, height: H, data: frame(&mut rng), header, warnings: Vec::new() };
    let opts = FrameOptions { background_mesh: 24, ..FrameOptions::default() };
    let want = Prepared::new(&img, &opts).unwrap_or_else(|e| panic!("{test}: {e}"));
    let got = blink::detect::al::prepare_gpu(&mut g, &img, &opts).unwrap_or_else(|e| panic!("{test}: {e}"));
    assert_eq!(got.fwhm, want.fwhm);
    assert_eq!(got.saturated, want.saturated, "{test}: saturation");
    let scale = img.data.iter().filter(|v| v.is_finite()).fold(0.0f32, |m, v| m.max(v.abs()));
    for i in 0..W * H {
        let (a, b) = (got.sky_subtracted[i], want.sky_subtracted[i]);
        assert!(a.is_nan() == b.is_nan() && (b.is_nan() || (a - b).abs() <= 1e-5 * scale), "{test}: sky-subtracted {i}: gpu {a} cpu {b}");
        let (a, b) = (got.variance[i], want.variance[i]);
        assert!(a.is_nan() == b.is_nan() && (b.is_nan() || (a / b - 1.0).abs() <= 1e-6), "{test}: variance {i}: gpu {a} cpu {b}");
    }
}

#[test]
fn frame_al_kernels_match_the_twins() {
    let test = "frame_al_kernels_match_the_twins";
    let Some(mut g) = gpu(test) else { return };
    let mut rng = seeded(test);
    // The frame convolution on a resident plane against cpu::al::convolve_terms.
    let img: Vec<f32> = frame(&mut rng).into_iter().map(|v| if v.is_finite() { v } else { 0.0 }).collect();
    let (half, order) = (rng.gen_range(2..10), 1);
    let side = 2 * half + 1;
    let kernels: Vec<Vec<f64>> = (0..3).map(|_| (0..side * side).map(|_| rng.gen_range(-0.01..0.05)).collect()).collect();
    let pi = g.frame_upload(&img, W, H).unwrap_or_else(|e| panic!("{e}"));
    let conv = g.frame_al_convolve(&kernels, half, order, &pi).unwrap_or_else(|e| panic!("{test}: {e}"));
    let got = g.frame_read(&conv).unwrap_or_else(|e| panic!("{e}"));
    // Read into a buffer the caller keeps: the same words; a buffer of the wrong size is refused.
    let mut into = vec![f32::NAN; W * H];
    g.frame_read_into(&conv, &mut into).unwrap_or_else(|e| panic!("{test}: read into: {e}"));
    assert!(into.iter().zip(&got).all(|(a, b)| a.to_bits() == b.to_bits()), "{test}: frame_read_into differs from frame_read");
    assert!(g.frame_read_into(&conv, &mut into[1..]).is_err(), "{test}: a short buffer was accepted");
    let want = blink::cpu::al::convolve_terms(&kernels, half, order, &img, W, H);
    let scale = img.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    for i in 0..W * H {
        assert!((got[i] - want[i]).abs() <= 1e-5 * scale, "{test}: convolution {i}: gpu {} cpu {}", got[i], want[i]);
    }
    // Difference and variance assembly.
    let model: Vec<f32> = (0..W * H).map(|_| rng.gen_range(-50.0f32..500.0)).collect();
    let kv: Vec<f32> = (0..W * H).map(|_| rng.gen_range(10.0f32..300.0)).collect();
    let guard: Vec<f32> = (0..W * H).map(|_| if rng.gen_bool(0.1) { 0.0 } else { rng.gen_range(10.0f32..300.0) }).collect();
    let bg = [(rng.gen_range(-5.0..5.0), 0, 0), (rng.gen_range(-2.0..2.0), 1, 0), (rng.gen_range(-2.0..2.0), 0, 1), (0.5, 2, 0), (-0.3, 1, 1), (0.2, 0, 2)];
    let (m, m2, eps2) = (rng.gen_range(-1.5..1.5), rng.gen_range(0.5..2.0), rng.gen_range(0.0..0.01));
    let (pm, pk, pg) = (g.frame_upload(&model, W, H).unwrap_or_else(|e| panic!("{e}")), g.frame_upload(&kv, W, H).unwrap_or_else(|e| panic!("{e}")), g.frame_upload(&guard, W, H).unwrap_or_else(|e| panic!("{e}")));
    let d = g.frame_al_difference(&pi, &pm, &pg, &bg, m).unwrap_or_else(|e| panic!("{test}: {e}"));
    let v = g.frame_al_variance(&pg, &pk, &pm, 0.9, 1.1, eps2, m2).unwrap_or_else(|e| panic!("{test}: {e}"));
    let (gd, gv) = (g.frame_read(&d).unwrap_or_else(|e| panic!("{e}")), g.frame_read(&v).unwrap_or_else(|e| panic!("{e}")));
    let (wd, wv) = (twin::al_difference(&img, &model, &guard, &bg, m, W, H), twin::al_variance(&guard, &kv, &model, 0.9, 1.1, eps2, m2));
    for i in 0..W * H {
        assert!((gd[i] - wd[i]).abs() <= 1e-5 * scale, "{test}: difference {i}: gpu {} cpu {}", gd[i], wd[i]);
        assert!((gv[i] - wv[i]).abs() <= 1e-5 * wv[i].abs().max(1.0), "{test}: variance {i}: gpu {} cpu {}", gv[i], wv[i]);
    }
}

/// A star field as `benches/frames.rs` makes it (same stars in both images, seeing `fwhm`).
fn star_image(side: usize, fwhm: f64, rng: &mut StdRng, stars: &[(f64, f64, f64)]) -> blink::detect::image::Image {
    star_field::render(side, fwhm, stars, || rng.gen_range(0.0..1.0))
}

/// A science frame (FWHM 3) and its template (FWHM 2.4) of `side`² with the same 64 stars, for
/// the Alard–Lupton fit; with `nans`, a NaN band in the science frame (row 100) and a NaN column
/// in the template (column 70).
fn star_pair(rng: &mut StdRng, side: usize, nans: bool) -> (blink::detect::image::Image, blink::detect::image::Image) {
    // On a jittered 8 × 8 grid, 30 px apart: uniform positions left fewer than three isolated
    // stars for the kernel fit in about one run in twenty (seed 1795772376468205136). Fluxes
    // 3 000–30 000 (S/N 30–300): with 300 / U(0.01, 1) only ~6 of the 64 stars were bright
    // enough for a stamp, and too few were left in about one run in forty (seed
    // 1795776977207589195, on the H200).
    let stars: Vec<(f64, f64, f64)> = (0..64)
        .map(|k| (16.0 + 30.0 * (k % 8) as f64 + rng.gen_range(-3.0..3.0), 16.0 + 30.0 * (k / 8) as f64 + rng.gen_range(-3.0..3.0), 3000.0 / rng.gen_range(0.1..1.0)))
        .collect();
    let mut science = star_image(side, 3.0, rng, &stars);
    let mut template = star_image(side, 2.4, rng, &stars);
    if nans {
        for x in 0..side {
            science.data[100 * side + x] = f32::NAN;
        }
        for y in 0..side {
            template.data[y * side + 70] = f32::NAN;
        }
    }
    (science, template)
}

#[test]
fn subtract_al_on_the_gpu_matches_the_cpu() {
    use blink::detect::al::subtract_al_with;
    use blink::detect::frame::{FrameOptions, Prepared};
    let test = "subtract_al_on_the_gpu_matches_the_cpu";
    let Some(mut g) = gpu(test) else { return };
    let mut rng = seeded(test);
    let side = 256;
    let (science, template) = star_pair(&mut rng, side, true);
    let opts = FrameOptions { background_mesh: 64, ..FrameOptions::default() };
    let (ps, pt) = (Prepared::new(&science, &opts).unwrap_or_else(|e| panic!("{e}")), Prepared::new(&template, &opts).unwrap_or_else(|e| panic!("{e}")));
    let a = subtract_al_with(&science, &ps, &template, &pt, &opts, Some(&mut g), true).unwrap_or_else(|e| panic!("{test}: resident: {e}"));
    let b = subtract_al_with(&science, &ps, &template, &pt, &opts, Some(&mut g), false).unwrap_or_else(|e| panic!("{test}: host: {e}"));
    let close = |what: &str, x: &[f32], y: &[f32]| {
        let scale = y.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        for i in 0..x.len() {
            assert_eq!(x[i] == 0.0, y[i] == 0.0, "{test}: {what}: masked pixel {i}: resident {} host {}", x[i], y[i]);
            assert!((x[i] - y[i]).abs() <= 1e-4 * scale, "{test}: {what} at {i}: resident {} host {} (scale {scale})", x[i], y[i]);
        }
    };
    close("variance", &a.variance, &b.variance);
    close("difference", &a.difference, &b.difference);
    let (Some(da), Some(db)) = (&a.decorrelated, &b.decorrelated) else { panic!("{test}: no decorrelated difference") };
    close("decorrelated variance", &da.variance, &db.variance);
    close("decorrelated difference", &da.difference, &db.difference);
}

#[test]
fn score_image_gpu_matches_score_image() {
    use blink::detect::al::subtract_al;
    use blink::detect::frame::{score_image, score_image_gpu, FrameOptions, Prepared};
    let test = "score_image_gpu_matches_score_image";
    let Some(mut g) = gpu(test) else { return };
    let mut rng = seeded(test);
    let side = 256;
    let (science, template) = star_pair(&mut rng, side, false);
    let opts = FrameOptions { background_mesh: 64, ..FrameOptions::default() };
    let (ps, pt) = (Prepared::new(&science, &opts).unwrap_or_else(|e| panic!("{e}")), Prepared::new(&template, &opts).unwrap_or_else(|e| panic!("{e}")));
    let mut diff = subtract_al(&science, &ps, &template, &pt, &opts, None).unwrap_or_else(|e| panic!("{test}: {e}"));
    // A measured-looking PSF: an elliptical Gaussian, unit sum.
    let (n, c) = (15usize, 7.0);
    let mut pix: Vec<f64> = (0..n * n).map(|i| (-((i % n) as f64 - c).powi(2) / 3.6 - ((i / n) as f64 - c).powi(2) / 3.0).exp()).collect();
    let sum: f64 = pix.iter().sum();
    pix.iter_mut().for_each(|p| *p /= sum);
    let psf = blink::subtract::decorr::PsfImage { side: n, pixels: pix };
    for (what, p) in [("gaussian", None), ("psf, decorrelated", Some(&psf))] {
        let want = score_image(&diff, p);
        let got = score_image_gpu(&diff, p, &mut g).unwrap_or_else(|e| panic!("{test}: {what}: {e}"));
        assert_eq!(got.psf_peak, want.psf_peak, "{test}: {what}");
        let mut differ = 0;
        for i in 0..side * side {
            if got.flux_err[i].is_finite() != want.flux_err[i].is_finite() {
                differ += 1;
            } else if want.flux_err[i].is_finite() {
                assert!((got.score[i] - want.score[i]).abs() <= 1e-3 * want.score[i].abs().max(1.0), "{test}: {what}: score at {i}: gpu {} cpu {}", got.score[i], want.score[i]);
            }
        }
        assert!(differ <= side * side / 1000, "{test}: {what}: {differ} pixels kept by one and not the other");
    }
    diff.decorrelated = None;
    let want = score_image(&diff, Some(&psf));
    let got = score_image_gpu(&diff, Some(&psf), &mut g).unwrap_or_else(|e| panic!("{test}: psf: {e}"));
    for i in 0..side * side {
        if want.flux_err[i].is_finite() && got.flux_err[i].is_finite() {
            assert!((got.score[i] - want.score[i]).abs() <= 1e-3 * want.score[i].abs().max(1.0), "{test}: psf: score at {i}: gpu {} cpu {}", got.score[i], want.score[i]);
        }
    }
}

#[test]
fn bad_mask_matches_the_twin() {
    let test = "bad_mask_matches_the_twin";
    let Some(mut g) = gpu(test) else { return };
    let mut rng = seeded(test);
    // An image with NaN bands and ±∞; variances positive, zero, negative, NaN or ∞; saturated
    // pixels, each alone and together.
    let img: Vec<f32> = frame(&mut rng).into_iter().map(|v| if rng.gen_bool(0.02) { f32::INFINITY } else if rng.gen_bool(0.01) { f32::NEG_INFINITY } else { v }).collect();
    let var: Vec<f32> = (0..W * H)
        .map(|_| match rng.gen_range(0..20) {
            0 => 0.0,
            1 => -rng.gen_range(0.1f32..10.0),
            2 => f32::NAN,
            3 => f32::INFINITY,
            _ => rng.gen_range(1e-3f32..400.0),
        })
        .collect();
    let sat: Vec<bool> = (0..W * H).map(|_| rng.gen_bool(0.05)).collect();
    let want = twin::bad_mask(&img, &var, &sat);
    let (pi, pv, ps) = (g.frame_upload(&img, W, H).unwrap_or_else(|e| panic!("{e}")), g.frame_upload(&var, W, H).unwrap_or_else(|e| panic!("{e}")), g.frame_upload_mask(&sat, W, H).unwrap_or_else(|e| panic!("{e}")));
    let m = g.frame_bad_mask(&pi, &pv, &ps).unwrap_or_else(|e| panic!("{test}: {e}"));
    let got = g.frame_read_mask(&m).unwrap_or_else(|e| panic!("{e}"));
    let set = want.iter().filter(|b| **b).count();
    assert!(set > W * H / 10 && set < W * H / 2, "{test}: {set} of {} pixels bad: the input does not test the mask", W * H);
    for i in 0..W * H {
        assert_eq!(got[i], want[i], "{test}: pixel {i}: image {} variance {} saturated {}: gpu {} cpu {}", img[i], var[i], sat[i], got[i], want[i]);
    }
}

/// The resident chain (`prepare_gpu_resident`, `subtract_al_resident`,
/// `score_image_gpu_resident`) gives what the chain through host planes gives, bit for bit, and
/// uploads only the two images: the masks and cleaned planes are made on the device. So does
/// `blink subtract`'s (`subtract_al_on_device`, `products_gpu_resident`), which reads back only
/// the two products: its prepared planes stay on the device (`prepare_gpu_device`) and the fit
/// takes its stars from there.
#[test]
fn resident_subtraction_moves_fewer_planes() {
    use blink::detect::al::{prepare_gpu, prepare_gpu_device, prepare_gpu_resident, subtract_al, subtract_al_on_device, subtract_al_resident};
    use blink::detect::frame::{products_gpu_resident, score_image_gpu, score_image_gpu_resident, FrameOptions};
    let test = "resident_subtraction_moves_fewer_planes";
    let Some(mut g) = gpu(test) else { return };
    let mut rng = seeded(test);
    let side = 256;
    let (science, mut template) = star_pair(&mut rng, side, true);
    // The template's brightest stars saturate: peaks reach 500 + flux / 6.5 ADU (up to ~5 100),
    // so one star in seven is above 2 500 (none of 64: 1 run in 15 000).
    template.header.saturate = Some(2500.0);
    let opts = FrameOptions { background_mesh: 64, ..FrameOptions::default() };
    let (n, c) = (15usize, 7.0);
    let mut pix: Vec<f64> = (0..n * n).map(|i| (-((i % n) as f64 - c).powi(2) / 3.6 - ((i / n) as f64 - c).powi(2) / 3.0).exp()).collect();
    let sum: f64 = pix.iter().sum();
    pix.iter_mut().for_each(|p| *p /= sum);
    let psf = blink::subtract::decorr::PsfImage { side: n, pixels: pix };
    let plane = (side * side * 4) as u64;
    for (what, p) in [("psf, decorrelated", Some(&psf)), ("gaussian", None)] {
        let t0 = g.frame_traffic();
        let (ps, pt) = (prepare_gpu(&mut g, &science, &opts).unwrap_or_else(|e| panic!("{e}")), prepare_gpu(&mut g, &template, &opts).unwrap_or_else(|e| panic!("{e}")));
        assert!(pt.saturated.iter().any(|s| *s), "{test}: no saturated template pixel");
        let want = subtract_al(&science, &ps, &template, &pt, &opts, Some(&mut g)).unwrap_or_else(|e| panic!("{test}: host planes: {e}"));
        let want_sc = score_image_gpu(&want, p, &mut g).unwrap_or_else(|e| panic!("{test}: {what}: {e}"));
        let t1 = g.frame_traffic();
        let (ps2, rs) = prepare_gpu_resident(&mut g, &science, &opts).unwrap_or_else(|e| panic!("{e}"));
        let (pt2, rt) = prepare_gpu_resident(&mut g, &template, &opts).unwrap_or_else(|e| panic!("{e}"));
        let (got, planes) = subtract_al_resident(&science, &ps2, &rs, &template, &pt2, &rt, &opts, &mut g).unwrap_or_else(|e| panic!("{test}: resident: {e}"));
        let planes = planes.unwrap_or_else(|| panic!("{test}: the resident subtraction fell back on the CPU"));
        let got_sc = score_image_gpu_resident(&got, p, &mut g, &planes).unwrap_or_else(|e| panic!("{test}: {what}: {e}"));
        let t2 = g.frame_traffic();
        planes.release(&mut g);
        rs.release(&mut g);
        rt.release(&mut g);
        let same = |name: &str, a: &[f32], b: &[f32]| {
            let d = a.iter().zip(b).position(|(x, y)| x.to_bits() != y.to_bits());
            assert!(a.len() == b.len() && d.is_none(), "{test}: {what}: {name} differs at {d:?}");
        };
        same("sky-subtracted science", &ps2.sky_subtracted, &ps.sky_subtracted);
        same("template variance", &pt2.variance, &pt.variance);
        assert!(ps2.saturated == ps.saturated && pt2.saturated == pt.saturated, "{test}: saturation masks differ");
        same("difference", &got.difference, &want.difference);
        same("variance", &got.variance, &want.variance);
        let (Some(gd), Some(wd)) = (&got.decorrelated, &want.decorrelated) else { panic!("{test}: no decorrelated difference") };
        same("decorrelated difference", &gd.difference, &wd.difference);
        same("decorrelated variance", &gd.variance, &wd.variance);
        same("score", &got_sc.score, &want_sc.score);
        same("flux error", &got_sc.flux_err, &want_sc.flux_err);
        assert_eq!(got_sc.psf_peak, want_sc.psf_peak, "{test}: {what}");
        // Uploads: the two images only, against ten planes through the host; read-backs: the
        // same (the prepared images' four planes and two saturation masks packed 32 pixels a word, the
        // four of the difference, the score's three).
        // `blink subtract`'s path: the difference stays on the device and only its two products
        // come back, the same pixels as made on the host from the planes read back.
        let t3 = g.frame_traffic();
        let (ps3, rs3) = prepare_gpu_device(&mut g, &science, &opts).unwrap_or_else(|e| panic!("{e}"));
        let (pt3, rt3) = prepare_gpu_device(&mut g, &template, &opts).unwrap_or_else(|e| panic!("{e}"));
        assert!(ps3.sky_subtracted.is_empty() && pt3.variance.is_empty(), "{test}: prepared planes read back");
        let (lean, planes3) = subtract_al_on_device(&science, &ps3, &rs3, &template, &pt3, &rt3, &opts, &mut g).unwrap_or_else(|e| panic!("{test}: on the device: {e}"));
        let planes3 = planes3.unwrap_or_else(|| panic!("{test}: the subtraction on the device fell back on the CPU"));
        assert!(lean.difference.is_empty() && lean.variance.is_empty(), "{test}: planes read back");
        let (d_dev, z_dev) = products_gpu_resident(&lean, p, &mut g, &planes3).unwrap_or_else(|e| panic!("{test}: {what}: products: {e}")).unwrap_or_else(|| panic!("{test}: {what}: no GPU route"));
        let t4 = g.frame_traffic();
        for r in [rs3, rt3] {
            r.release(&mut g);
        }
        planes3.release(&mut g);
        let wd = want.decorrelated.as_ref().unwrap_or_else(|| panic!("{test}: no decorrelated difference"));
        let d_host: Vec<f32> = (0..side * side).map(|i| if wd.variance[i] > 0.0 { wd.difference[i] } else { f32::NAN }).collect();
        let z_host: Vec<f32> = (0..side * side).map(|i| if want.variance[i] > 0.0 && want_sc.flux_err[i].is_finite() { want_sc.score[i] } else { f32::NAN }).collect();
        same("product D", &d_dev, &d_host);
        same("product Z", &z_dev, &z_host);
        let packed = (side * side).div_ceil(32) as u64 * 4;
        assert_eq!(t4.uploaded - t3.uploaded, 2 * plane, "{test}: {what}: products: uploads");
        assert_eq!(t4.read_back - t3.read_back, 2 * plane + 2 * packed, "{test}: {what}: products: {} planes read back", (t4.read_back - t3.read_back) as f64 / plane as f64);
        let (host_up, host_read) = (t1.uploaded - t0.uploaded, t1.read_back - t0.read_back);
        let (res_up, res_read) = (t2.uploaded - t1.uploaded, t2.read_back - t1.read_back);
        assert_eq!(res_up, 2 * plane, "{test}: {what}: the resident chain uploaded {} planes", res_up as f64 / plane as f64);
        assert_eq!(res_read, 11 * plane + 2 * packed, "{test}: {what}: the resident chain read {} planes back", res_read as f64 / plane as f64);
        assert!(host_up == 10 * plane && host_read == res_read, "{test}: {what}: through the host {} planes up, {} back", host_up as f64 / plane as f64, host_read as f64 / plane as f64);
        // The fit through the host planes reads nothing from the device; on resident planes it
        // reads its stars' lists, samples and squares (`DeviceStamps`) and not the planes.
        assert_eq!(t1.fit_read, t0.fit_read, "{test}: {what}: the host fit read from the device");
        assert!(t2.fit_read > t1.fit_read && t4.fit_read > t3.fit_read, "{test}: {what}: the resident fits read no stars from the device");
    }
}

#[test]
fn packed_masks_come_back_whole() {
    let test = "packed_masks_come_back_whole";
    let Some(mut g) = gpu(test) else { return };
    let mut rng = seeded(test);
    // A side that is no multiple of 32, so the last word is partial; a density that varies.
    let (w, h): (usize, usize) = (rng.gen_range(33..140), rng.gen_range(20..90));
    let p = rng.gen_range(0.01..0.6);
    let mask: Vec<bool> = (0..w * h).map(|_| rng.gen_bool(p)).collect();
    let words = twin::pack_mask(&mask);
    assert_eq!(words.len(), (w * h).div_ceil(32));
    assert_eq!(twin::unpack_mask(&words, w * h), mask, "{test}: the twin's round trip");
    let up = g.frame_upload_mask(&mask, w, h).unwrap_or_else(|e| panic!("{e}"));
    let t0 = g.frame_traffic().read_back;
    let got = g.frame_read_mask_packed(&up).unwrap_or_else(|e| panic!("{test}: {e}"));
    assert_eq!(g.frame_traffic().read_back - t0, words.len() as u64 * 4, "{test}: bytes read back");
    let bad = (0..w * h).find(|&i| got[i] != mask[i]);
    assert!(got.len() == w * h && bad.is_none(), "{test}: {w}x{h}: pixel {bad:?} differs");
}

#[test]
fn nan_unless_matches_the_twin() {
    use blink::cpu::frame::Keep;
    let test = "nan_unless_matches_the_twin";
    let Some(mut g) = gpu(test) else { return };
    let mut rng = seeded(test);
    let values: Vec<f32> = (0..W * H).map(|_| rng.gen_range(-50.0f32..50.0)).collect();
    let guard: Vec<f32> = (0..W * H)
        .map(|_| match rng.gen_range(0..12) {
            0 => 0.0,
            1 => -rng.gen_range(0.1f32..10.0),
            2 => f32::NAN,
            3 => f32::INFINITY,
            4 => f32::NEG_INFINITY,
            _ => rng.gen_range(1e-3f32..400.0),
        })
        .collect();
    let pg = g.frame_upload(&guard, W, H).unwrap_or_else(|e| panic!("{e}"));
    for keep in [Keep::Positive, Keep::Finite] {
        let mut want = values.clone();
        twin::nan_unless(&mut want, &guard, keep);
        let pv = g.frame_upload(&values, W, H).unwrap_or_else(|e| panic!("{e}"));
        g.frame_nan_unless(&pv, &pg, keep).unwrap_or_else(|e| panic!("{test}: {e}"));
        let got = g.frame_read(&pv).unwrap_or_else(|e| panic!("{e}"));
        let nans = want.iter().filter(|v| v.is_nan()).count();
        assert!(nans > W * H / 20 && nans < W * H / 2, "{test}: {keep:?}: {nans} NaN: the guard does not test the kernel");
        for i in 0..W * H {
            assert!(got[i].to_bits() == want[i].to_bits() || (got[i].is_nan() && want[i].is_nan()), "{test}: {keep:?}: pixel {i}: guard {} gpu {} cpu {}", guard[i], got[i], want[i]);
        }
    }
}

/// `stamp_peaks` + `stamp_usable` (`frame_stamps.wgsl`) against `stamp_candidates`, the
/// `stamp_squares` kernel against `Squares::from_pair`, `stamp_sample` against `step_by` and
/// `sample_hist`'s median against `median_variance`: equal, bit for bit. The planes are a star pair's with ±∞, NaN, saturated cores, zero and
/// negative variances sprinkled in; the scan is run once as the fit runs it and once with the
/// floor at the sky on a noisy frame, where the candidates overflow the kernel's first list.
#[test]
fn stamp_kernels_match_their_twins() {
    use blink::subtract::stamps::{scan_step, stamp_candidates, StampScan};
    use blink::subtract::{Pair, Squares, StampOptions};
    let test = "stamp_kernels_match_their_twins";
    let Some(mut g) = gpu(test) else { return };
    let mut rng = seeded(test);
    let side = 256;
    let (science, template) = star_pair(&mut rng, side, true);
    let mut sprinkle = |v: f32, p: f64| if rng.gen_bool(p) { [f32::INFINITY, f32::NEG_INFINITY, f32::NAN, 0.0][rng.gen_range(0..4)] } else { v };
    let mut t: Vec<f32> = template.data.iter().map(|v| sprinkle(v - 500.0, 2e-4)).collect();
    // Between the stars, features that test the rules at their edges: a pixel whose four
    // neighbours are 0.23 of it (a hot pixel by the quarter rule), and two equal peaks side by
    // side (the first in raster order is the peak).
    for (k, (i, j)) in (0..7).flat_map(|i| (0..3).map(move |j| (i, j))).enumerate() {
        let c = (31 + 30 * j) * side + 31 + 30 * i;
        if k % 2 == 0 {
            t[c] = 2000.0;
            for n in [c - 1, c + 1, c - side, c + side] {
                t[n] = 460.0;
            }
        } else {
            for n in [c - side - 1, c - side, c - side + 1, c - side + 2, c - 1, c + 2, c + side - 1, c + side, c + side + 1, c + side + 2] {
                t[n] = 600.0;
            }
            t[c] = 1500.0;
            t[c + 1] = 1500.0;
        }
    }
    let s: Vec<f32> = science.data.iter().map(|v| sprinkle(v - 500.0, 2e-4)).collect();
    let sv: Vec<f32> = science.data.iter().map(|v| sprinkle((v / 6.5).max(0.0) + 20.0, 3e-4)).collect();
    let mut tv: Vec<f32> = template.data.iter().map(|v| sprinkle((v / 6.5).max(0.0) + 20.0, 3e-4)).collect();
    for v in tv.iter_mut() {
        if rng.gen_bool(5e-4) {
            *v = -1.0;
        }
    }
    let up = |g: &mut blink::gpu::GpuEngine, p: &[f32]| g.frame_upload(p, side, side).unwrap_or_else(|e| panic!("{e}"));
    let (gs, gt, gsv, gtv) = (up(&mut g, &s), up(&mut g, &t), up(&mut g, &sv), up(&mut g, &tv));
    let pair = Pair { width: side, height: side, science: &s, template: &t, science_variance: &sv, template_variance: Some(&tv) };
    let same = |what: &str, a: &[(usize, f32)], b: &[(usize, f32)]| {
        let d = a.iter().zip(b).position(|(x, y)| x.0 != y.0 || x.1.to_bits() != y.1.to_bits());
        assert!(a.len() == b.len() && d.is_none(), "{test}: {what}: {} candidates on the GPU, {} on the CPU; first difference {d:?}", a.len(), b.len());
    };
    // As the fit scans: the stars, half of them saturated, some with an unusable pixel in
    // reach, with and without the template's variance.
    let kh = 8;
    let step = scan_step(side, side, kh, &StampOptions::default()).unwrap_or_else(|| panic!("{test}: no scan"));
    let sample = g.frame_sample(&gt, step, None).unwrap_or_else(|e| panic!("{test}: {e}"));
    let want_sample: Vec<f32> = t.iter().step_by(step).copied().collect();
    assert!(sample.iter().zip(&want_sample).all(|(a, b)| a.to_bits() == b.to_bits()) && sample.len() == want_sample.len(), "{test}: sample");
    let loose = StampScan::new(kh, &StampOptions::default(), sample).unwrap_or_else(|| panic!("{test}: no sky"));
    let usable = stamp_candidates(&pair, &loose);
    let mut peaks: Vec<f32> = usable.iter().map(|c| c.1).collect();
    peaks.sort_by(f32::total_cmp);
    // A saturation level that leaves some stars in and puts some out: the median of the
    // template's peaks, or the next one up where that leaves fewer than 3 (a star's science
    // peak or a brighter neighbour in its footprint can saturate it below its own peak).
    let (scan, want) = (peaks.len() / 2..peaks.len())
        .map(|k| {
            let level = peaks[k];
            let scan = StampScan { saturate_template: level, saturate_science: level, ..loose };
            let want = stamp_candidates(&pair, &scan);
            (scan, want)
        })
        .find(|(_, want)| want.len() >= 3 && want.len() < usable.len())
        .unwrap_or_else(|| panic!("{test}: no saturation level leaves 3 of {} stars unsaturated", usable.len()));
    let got = g.frame_stamp_candidates(&gt, &gs, &gsv, Some(&gtv), &scan).unwrap_or_else(|e| panic!("{test}: {e}"));
    same("stars", &got, &want);
    let no_tv = Pair { template_variance: None, ..pair };
    let all = stamp_candidates(&no_tv, &loose);
    assert!(want.len() >= 3 && want.len() < usable.len() && usable.len() < all.len(), "{test}: {} stars, {} unsaturated, {} without the template variance: the input does not test the checks", want.len(), usable.len(), all.len());
    same("stars, no template variance", &g.frame_stamp_candidates(&gt, &gs, &gsv, None, &loose).unwrap_or_else(|e| panic!("{test}: {e}")), &all);
    // Every positive local maximum over 3×3 of a noisy 500² (the sky far below, so no peak is
    // a hot pixel): more than the first list holds.
    let (nw, nh) = (500usize, 500usize);
    let noise: Vec<f32> = (0..nw * nh).map(|_| rng.gen_range(-10.0f32..10.0)).collect();
    let ones = vec![1.0f32; nw * nh];
    let flat = Pair { width: nw, height: nh, science: &noise, template: &noise, science_variance: &ones, template_variance: None };
    let crowd = StampScan { r: 1, reach: 2, sky: -1e6, floor: 0.0, saturate_template: f32::INFINITY, saturate_science: f32::INFINITY };
    let want = stamp_candidates(&flat, &crowd);
    assert!(want.len() > 16_384, "{test}: {} noise peaks: the list does not overflow", want.len());
    let (gn, go) = (g.frame_upload(&noise, nw, nh).unwrap_or_else(|e| panic!("{e}")), g.frame_upload(&ones, nw, nh).unwrap_or_else(|e| panic!("{e}")));
    same("noise peaks", &g.frame_stamp_candidates(&gn, &gn, &go, None, &crowd).unwrap_or_else(|e| panic!("{test}: {e}")), &want);
    // Squares round the stars and at every edge and corner, whole planes' pixels or NaN.
    let mut centres: Vec<(usize, usize)> = stamp_candidates(&pair, &scan).iter().map(|c| (c.0 % side, c.0 / side)).collect();
    centres.extend([(0, 0), (side - 1, 0), (0, side - 1), (side - 1, side - 1), (3, 128), (128, side - 2)]);
    centres.extend((0..10).map(|_| (rng.gen_range(0..side), rng.gen_range(0..side))));
    let halves: [usize; 4] = std::array::from_fn(|_| rng.gen_range(5..25));
    let want = Squares::from_pair(&pair, &centres, halves);
    let got = g.frame_squares(&[(&gs, halves[0]), (&gt, halves[1]), (&gsv, halves[2]), (&gtv, halves[3])], &centres).unwrap_or_else(|e| panic!("{test}: {e}"));
    for (k, (a, b)) in got.iter().zip(&want.data).enumerate() {
        let d = a.iter().zip(b).position(|(x, y)| x.to_bits() != y.to_bits());
        assert!(a.len() == b.len() && d.is_none(), "{test}: squares of plane {k} (halves {halves:?}): first difference at {d:?}");
    }
    // The sample with a mask: zero where it is set.
    let mask: Vec<bool> = (0..side * side).map(|_| rng.gen_bool(0.3)).collect();
    let gm = g.frame_upload_mask(&mask, side, side).unwrap_or_else(|e| panic!("{e}"));
    let got = g.frame_sample(&gsv, 7, Some(&gm)).unwrap_or_else(|e| panic!("{test}: {e}"));
    let want: Vec<f32> = sv.iter().zip(&mask).step_by(7).map(|(v, m)| if *m { 0.0 } else { *v }).collect();
    assert!(got.len() == want.len() && got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()), "{test}: masked sample");
    // The median of the sample's positive finite values, found on the device by its bits: the
    // variances (NaN, ±∞, zero and negative sprinkled in), masked or not, every 7th pixel or
    // every one; a plane of five values (ties everywhere); none positive gives 0.
    use blink::detect::frame::median_variance;
    let masked: Vec<f32> = sv.iter().zip(&mask).map(|(v, m)| if *m { 0.0 } else { *v }).collect();
    let lower_median = |v: &[f32]| {
        let mut p: Vec<f32> = v.iter().copied().filter(|x| *x > 0.0 && x.is_finite()).collect();
        p.sort_by(f32::total_cmp);
        p.get(p.len().saturating_sub(1) / 2).map_or(0.0, |m| *m as f64)
    };
    let gz = g.frame_upload(&vec![-1.0f32; side * side], side, side).unwrap_or_else(|e| panic!("{e}"));
    let five: Vec<f32> = (0..side * side).map(|_| [0.5f32, 1.0, 2.0, 2.0, 3.0, f32::NAN][rng.gen_range(0..6)]).collect();
    let g5 = g.frame_upload(&five, side, side).unwrap_or_else(|e| panic!("{e}"));
    for (what, plane, m, step, want) in [
        ("every 7th", &gsv, None, 7, median_variance(&sv)),
        ("every 7th, masked", &gsv, Some(&gm), 7, median_variance(&masked)),
        ("every one", &gsv, None, 1, lower_median(&sv)),
        ("ties", &g5, None, 1, lower_median(&five)),
        ("none positive", &gz, None, 7, 0.0),
    ] {
        let got = g.frame_sample_median(plane, step, m).unwrap_or_else(|e| panic!("{test}: {what}: {e}"));
        assert_eq!(got.to_bits(), want.to_bits(), "{test}: median, {what}: GPU {got}, CPU {want}");
    }
}

/// Planes left on the device (`prepare_gpu_device`): a pair without stars fails the fit as the
/// CPU does (too few stamps, for the caller's Gaussian kernel), not as a GPU failure; the host
/// planes `fill_host` then reads are those `prepare_gpu_resident` reads, bit for bit.
#[test]
fn planes_left_on_the_device_come_back_when_asked() {
    use blink::detect::al::{prepare_gpu_device, prepare_gpu_resident, subtract_al_on_device};
    use blink::detect::frame::FrameOptions;
    let test = "planes_left_on_the_device_come_back_when_asked";
    let Some(mut g) = gpu(test) else { return };
    let mut rng = seeded(test);
    let side = 128;
    let (mut science, mut template) = star_pair(&mut rng, side, false);
    for img in [&mut science, &mut template] {
        img.data.iter_mut().for_each(|v| *v = 500.0 + rng.gen_range(-20.0f32..20.0));
    }
    let opts = FrameOptions { background_mesh: 64, ..FrameOptions::default() };
    let (mut ps, rs) = prepare_gpu_device(&mut g, &science, &opts).unwrap_or_else(|e| panic!("{e}"));
    let (pt, rt) = prepare_gpu_device(&mut g, &template, &opts).unwrap_or_else(|e| panic!("{e}"));
    let err = subtract_al_on_device(&science, &ps, &rs, &template, &pt, &rt, &opts, &mut g).err().unwrap_or_else(|| panic!("{test}: a fit without stars"));
    assert!(err.to_string().contains("too few stamps"), "{test}: {err}");
    assert!(ps.sky_subtracted.is_empty() && ps.variance.is_empty());
    let t0 = g.frame_traffic();
    rs.fill_host(&mut g, &mut ps).unwrap_or_else(|e| panic!("{test}: {e}"));
    assert_eq!(g.frame_traffic().read_back - t0.read_back, 2 * (side * side * 4) as u64, "{test}: bytes read back");
    let (want, rw) = prepare_gpu_resident(&mut g, &science, &opts).unwrap_or_else(|e| panic!("{e}"));
    let same = |a: &[f32], b: &[f32]| a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
    assert!(same(&ps.sky_subtracted, &want.sky_subtracted) && same(&ps.variance, &want.variance) && ps.saturated == want.saturated, "{test}: planes differ");
    // Filled already: nothing more is read.
    let t1 = g.frame_traffic();
    rs.fill_host(&mut g, &mut ps).unwrap_or_else(|e| panic!("{test}: {e}"));
    assert_eq!(g.frame_traffic().read_back, t1.read_back, "{test}: read twice");
    for r in [rs, rt, rw] {
        r.release(&mut g);
    }
}

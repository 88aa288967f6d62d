//! The Alard–Lupton GPU kernels (`shaders/al/`) against their CPU twins (`cpu::al`) and the
//! CPU subtraction (`subtract`), on fresh random inputs: the seed comes from the clock and is
//! printed; rerun one with `BLINK_SEED=<seed>`.
//!
//! Like `engine_parity`, these FAIL when no adapter exists unless `BLINK_ALLOW_NO_GPU=1` (then
//! they say loudly that they were skipped).
//!
//! Tolerances (f32 on the GPU against f64 / the CPU path):
//! - frame convolution: |Δ| ≤ 1e-5 · max |image| against `cpu::al::convolve` and
//!   `KernelSolution::convolve`; NaN on exactly the same pixels.
//! - exact convolved variance: |Δ| ≤ 1e-5 · max(cpu).
//! - stamp Gram sums: |ΔG_ab| ≤ 1e-5 · √(G_aa G_bb) against the fit's own CPU sums
//!   (`CpuGrams`) and the twin; convolved cutouts |ΔC_k| ≤ 1e-5 · Σ|B_k| · max |cutout| (the
//!   size of the terms summed).
//! - whole fit through `fit_with(…, &mut gpu)`: the kernel at the centre within 1e-3 of its
//!   peak, the flux scale within 1e-4.

use blink::cpu::al as twin;

use blink::subtract::{
    fit, fit_with, monomials, normalised, select_stamps, spatial_terms, Basis, BasisOptions, CpuGrams, FitOptions, GramInput, KernelSolution,
    Pair, StampGram, StampGrams, StampOptions,
};
use crate::common::gpu;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Normal};

/// Gaussian stars on a sky with Gaussian noise.
fn star_field(rng: &mut StdRng, w: usize, h: usize, stars: usize, sigma: f64, sky: f64, noise: f64) -> Vec<f32> {
    let unit = Normal::new(0.0f64, 1.0).unwrap_or_else(|e| panic!("{e}"));
    let mut img: Vec<f64> = (0..w * h).map(|_| sky + noise * unit.sample(rng)).collect();
    for _ in 0..stars {
        let (cx, cy) = (rng.gen_range(0.0..w as f64), rng.gen_range(0.0..h as f64));
        let flux = rng.gen_range(1e3..1e5);
        add_star(&mut img, w, cx, cy, sigma, flux);
    }
    img.into_iter().map(|v| v as f32).collect()
}

fn add_star(img: &mut [f64], w: usize, cx: f64, cy: f64, sigma: f64, flux: f64) {
    let h = img.len() / w;
    let r = (5.0 * sigma).ceil() as i64;
    let norm = flux / (2.0 * std::f64::consts::PI * sigma * sigma);
    for y in (cy as i64 - r).max(0)..(cy as i64 + r + 1).min(h as i64) {
        for x in (cx as i64 - r).max(0)..(cx as i64 + r + 1).min(w as i64) {
            let d2 = (x as f64 - cx).powi(2) + (y as f64 - cy).powi(2);
            img[y as usize * w + x as usize] += norm * (-0.5 * d2 / (sigma * sigma)).exp();
        }
    }
}

/// A solution of spatial order 2 on a real basis with random coefficients (constant scale).
fn random_solution(rng: &mut StdRng, w: usize, h: usize, sharp: f64, broad: f64) -> KernelSolution {
    let basis = Basis::from_seeing(sharp, broad, &BasisOptions::default()).unwrap_or_else(|e| panic!("{e}"));
    let nsp = spatial_terms(2).len();
    let kernel = (0..basis.len())
        .map(|k| if k == 0 { vec![rng.gen_range(0.5..2.0)] } else { (0..nsp).map(|_| rng.gen_range(-0.05..0.05)).collect() })
        .collect();
    KernelSolution {
        basis,
        width: w,
        height: h,
        spatial_order: 2,
        background_order: 1,
        kernel,
        background: vec![0.0; 3],
        stamps: Vec::new(),
        iterations: 1,
        chi2: 1.0,
        ridge: 0.0,
        regularization: blink::subtract::FitOptions::default().regularization,
    }
}

/// max |a − b| over pixels finite in both, and whether the NaNs sit on the same pixels.
fn compare(a: &[f32], b: &[f32]) -> (f64, bool) {
    let mut worst = 0.0f64;
    let mut same_nan = a.len() == b.len();
    for (x, y) in a.iter().zip(b) {
        if x.is_nan() != y.is_nan() {
            same_nan = false;
        } else if x.is_finite() && y.is_finite() {
            worst = worst.max((*x as f64 - *y as f64).abs());
        }
    }
    (worst, same_nan)
}

#[test]
fn al_convolve_matches_cpu() {
    let test = "al_convolve_matches_cpu";
    let Some(mut g) = gpu(test) else { return };
    let seed = crate::common::seed(test);
    let mut rng = StdRng::seed_from_u64(seed);
    // 97 × 83: neither side a multiple of the tile (64 × 8). The widest kernel (h = 15), then a
    // random narrower one.
    let (w, h) = (97usize, 83usize);
    for (sharp, broad) in [(1.0, 3.0), (rng.gen_range(0.8..1.5), rng.gen_range(1.6..2.2))] {
        let sol = random_solution(&mut rng, w, h, sharp, broad);
        let mut img = star_field(&mut rng, w, h, 12, 1.2, 200.0, 5.0);
        let scale = img.iter().fold(0.0f32, |m, v| m.max(v.abs())) as f64;
        let t0 = std::time::Instant::now();
        let gpu_out = g.al_convolve(&sol, &img, w, h).unwrap_or_else(|e| panic!("seed {seed}: {e}"));
        let dt = t0.elapsed();
        let twin_out = twin::convolve(&sol, &img, w, h).unwrap_or_else(|e| panic!("{e}"));
        let cpu_out = sol.convolve(&img, w, h).unwrap_or_else(|e| panic!("{e}"));
        let (e_twin, _) = compare(&gpu_out, &twin_out);
        let (e_cpu, _) = compare(&gpu_out, &cpu_out);
        eprintln!(
            "{test}: h {} ({} terms): GPU {dt:.2?}; |Δ| / max|image| vs twin {:.2e}, vs KernelSolution::convolve {:.2e}",
            sol.half(),
            spatial_terms(2).len(),
            e_twin / scale,
            e_cpu / scale
        );
        assert!(e_twin <= 1e-5 * scale && e_cpu <= 1e-5 * scale, "seed {seed}: h {}: {e_twin} / {e_cpu} vs scale {scale}", sol.half());

        // A NaN pixel (near an edge, so the extended edge carries it too) spreads over the same
        // pixels as on the CPU; the rest is unchanged.
        let (nx, ny) = (rng.gen_range(0..w), rng.gen_range(0..6));
        img[ny * w + nx] = f32::NAN;
        let gpu_nan = g.al_convolve(&sol, &img, w, h).unwrap_or_else(|e| panic!("{e}"));
        let cpu_nan = sol.convolve(&img, w, h).unwrap_or_else(|e| panic!("{e}"));
        let (e, same) = compare(&gpu_nan, &cpu_nan);
        let nans = gpu_nan.iter().filter(|v| v.is_nan()).count();
        assert!(same && nans > 0, "seed {seed}: NaN at ({nx},{ny}): {nans} NaN on the GPU, {} on the CPU", cpu_nan.iter().filter(|v| v.is_nan()).count());
        assert!(e <= 1e-5 * scale, "seed {seed}: with a NaN, {e}");

        // Forced bands of 16 rows give the same answer as one band.
        g.al_limit_band_rows(Some(16)).unwrap_or_else(|e| panic!("{e}"));
        let banded = g.al_convolve(&sol, &img, w, h).unwrap_or_else(|e| panic!("{e}"));
        g.al_limit_band_rows(None).unwrap_or_else(|e| panic!("{e}"));
        let (e, same) = compare(&banded, &gpu_nan);
        assert!(same && e == 0.0, "seed {seed}: banded differs by {e} (NaN sets equal: {same})");
    }
    // A frame of another size than the solution's is an error, not a panic.
    let sol = random_solution(&mut rng, w, h, 1.0, 1.5);
    assert!(g.al_convolve(&sol, &vec![0.0; 10 * 10], 10, 10).is_err());
}

#[test]
fn al_convolve_variance_matches_cpu() {
    let test = "al_convolve_variance_matches_cpu";
    let Some(mut g) = gpu(test) else { return };
    let seed = crate::common::seed(test);
    let mut rng = StdRng::seed_from_u64(seed);
    let (w, h) = (71usize, 45usize);
    let (sharp, broad) = (rng.gen_range(0.8..1.2), rng.gen_range(1.5..2.5));
    let sol = random_solution(&mut rng, w, h, sharp, broad);
    let var: Vec<f32> = star_field(&mut rng, w, h, 6, 1.2, 200.0, 3.0).iter().map(|v| v.max(1.0)).collect();
    let gpu_out = g.al_convolve_variance(&sol, &var, w, h).unwrap_or_else(|e| panic!("seed {seed}: {e}"));
    let cpu_out = twin::convolve_variance(&sol, &var, w, h).unwrap_or_else(|e| panic!("{e}"));
    let top = cpu_out.iter().fold(0.0f32, |m, v| m.max(*v)) as f64;
    let (e, same) = compare(&gpu_out, &cpu_out);
    eprintln!("{test}: h {}: |Δ| / max {:.2e}", sol.half(), e / top);
    assert!(same && e <= 1e-5 * top, "seed {seed}: {e} of {top}");
    // On a flat variance, exactly ΣK² · v.
    let x = w / 3;
    let s2: f64 = sol.kernel_at(x as f64, 20.0).iter().map(|v| v * v).sum();
    let flat = g.al_convolve_variance(&sol, &vec![4.0; w * h], w, h).unwrap_or_else(|e| panic!("{e}"));
    assert!((flat[20 * w + x] as f64 / (4.0 * s2) - 1.0).abs() < 1e-4, "seed {seed}: {} vs {}", flat[20 * w + x], 4.0 * s2);
}

/// Owned buffers of a [`GramInput`].
struct StampBufs {
    side: usize,
    cutout: Vec<f32>,
    science: Vec<f64>,
    weight: Vec<f64>,
    background: Vec<f64>,
}

impl StampBufs {
    fn input(&self) -> GramInput<'_> {
        GramInput { side: self.side, cutout: &self.cutout, science: &self.science, weight: &self.weight, background: &self.background, conv: None }
    }
}

fn random_stamps(rng: &mut StdRng, basis: &Basis, n: usize, bg_order: usize) -> Vec<StampBufs> {
    let r = basis.half + 4;
    let side = 2 * r + 1;
    let cs = side + 2 * basis.half;
    let nbg = spatial_terms(bg_order).len();
    (0..n)
        .map(|_| {
            let c = cs as f64 / 2.0 + rng.gen_range(-0.5..0.5);
            let mut cut: Vec<f64> = star_field(rng, cs, cs, 2, 1.2, 100.0, 4.0).iter().map(|&v| v as f64).collect();
            add_star(&mut cut, cs, c, c, 1.2, rng.gen_range(1e4..1e5));
            let mut sci: Vec<f64> = star_field(rng, side, side, 1, 1.8, 300.0, 8.0).iter().map(|&v| v as f64).collect();
            add_star(&mut sci, side, r as f64, r as f64, 1.8, rng.gen_range(1e4..1e5));
            let weight: Vec<f64> = sci.iter().map(|v| 1.0 / (v.max(1.0) + 20.0)).collect();
            let (x0, y0) = (rng.gen_range(0..900), rng.gen_range(0..900));
            let mut background = vec![0.0; nbg * side * side];
            let mut m = Vec::new();
            for i in 0..side * side {
                monomials(bg_order, normalised((x0 + i % side) as f64, 1000), normalised((y0 + i / side) as f64, 1000), &mut m);
                for (b, v) in m.iter().enumerate() {
                    background[b * side * side + i] = *v;
                }
            }
            StampBufs { side, cutout: cut.into_iter().map(|v| v as f32).collect(), science: sci, weight, background }
        })
        .collect()
}

/// Worst |ΔG_ab| / √(G_aa G_bb), and worst |ΔC_k| / (Σ|B_k| · max |cutout|) (the size of the
/// terms an f32 convolution adds), between two sets of stamp Grams.
fn gram_error(a: &[StampGram], b: &[StampGram], ncols: usize, basis: &Basis, cut_max: f64) -> (f64, f64) {
    let npix = a.first().map_or(0, |g| g.conv.len() / basis.len().max(1));
    let (mut eg, mut ec) = (0.0f64, 0.0f64);
    for (x, y) in a.iter().zip(b) {
        for i in 0..ncols {
            for j in i..ncols {
                let d = |s: &StampGram, p: usize, q: usize| s.sums[StampGram::index(ncols, p, q)];
                let norm = (d(y, i, i) * d(y, j, j)).sqrt().max(f64::MIN_POSITIVE);
                eg = eg.max((d(x, i, j) - d(y, i, j)).abs() / norm);
            }
        }
        for k in 0..basis.len() {
            let terms = basis.function(k).iter().map(|v| v.abs()).sum::<f64>() * cut_max;
            let r = k * npix..(k + 1) * npix;
            ec = x.conv[r.clone()].iter().zip(&y.conv[r]).fold(ec, |m, (p, q)| m.max((*p as f64 - *q as f64).abs() / terms));
        }
    }
    (eg, ec)
}

#[test]
fn al_stamp_grams_match_cpu() {
    let test = "al_stamp_grams_match_cpu";
    let Some(mut g) = gpu(test) else { return };
    let seed = crate::common::seed(test);
    let mut rng = StdRng::seed_from_u64(seed);
    // The default basis (h = 24 here: two kernel-row chunks in the shader) on two stamps, then
    // a random narrower one (h ≤ 12, one chunk) on four; llvmpipe is slow.
    let narrow = BasisOptions { max_half: 12, ..Default::default() };
    for (sharp, broad, opts, n) in [(1.0, 1.3, BasisOptions::default(), 2), (rng.gen_range(0.9..1.2), rng.gen_range(1.5..2.5), narrow, 4)] {
        let basis = Basis::from_seeing(sharp, broad, &opts).unwrap_or_else(|e| panic!("{e}"));
        let bg_order = 1;
        let nbg = spatial_terms(bg_order).len();
        let ncols = StampGram::columns(basis.len(), nbg);
        let stamps = random_stamps(&mut rng, &basis, n, bg_order);
        let inputs: Vec<GramInput> = stamps.iter().map(StampBufs::input).collect();
        let t0 = std::time::Instant::now();
        let gpu_g = g.al_stamp_grams(&basis, nbg, &inputs).unwrap_or_else(|e| panic!("seed {seed}: {e}"));
        let dt = t0.elapsed();
        let cpu_g = CpuGrams.grams(&basis, nbg, &inputs).unwrap_or_else(|e| panic!("{e}"));
        let twin_g = twin::stamp_grams(&basis, nbg, &inputs).unwrap_or_else(|e| panic!("{e}"));
        let scale = stamps.iter().flat_map(|s| s.cutout.iter()).fold(0.0f32, |m, v| m.max(v.abs())) as f64;
        let (eg_cpu, ec_cpu) = gram_error(&gpu_g, &cpu_g, ncols, &basis, scale);
        let (eg_twin, ec_twin) = gram_error(&gpu_g, &twin_g, ncols, &basis, scale);
        eprintln!(
            "{test}: h {}, {} functions, {n} stamps of side {}: GPU {dt:.2?}; Gram |Δ|/√(GaaGbb) vs CpuGrams {eg_cpu:.2e}, vs twin {eg_twin:.2e}; C_k |Δ|/(Σ|B_k|·max) {ec_cpu:.2e} / {ec_twin:.2e}",
            basis.half,
            basis.len(),
            stamps[0].side,
        );
        assert_eq!(gpu_g.len(), stamps.len());
        assert!(eg_cpu <= 1e-5 && eg_twin <= 1e-5, "seed {seed}: Gram sums {eg_cpu} / {eg_twin}");
        assert!(ec_cpu <= 1e-5 && ec_twin <= 1e-5, "seed {seed}: C_k {ec_cpu} / {ec_twin}");
    }
}

#[test]
fn fit_with_gpu_grams_matches_cpu_fit() {
    let test = "fit_with_gpu_grams_matches_cpu_fit";
    let Some(mut g) = gpu(test) else { return };
    let seed = crate::common::seed(test);
    let mut rng = StdRng::seed_from_u64(seed);
    let (w, h) = (256usize, 256usize);
    let (st, ss) = (1.0, 1.3);
    let unit = Normal::new(0.0f64, 1.0).unwrap_or_else(|e| panic!("{e}"));
    let (mut t, mut s) = (vec![50.0f64; w * h], vec![120.0f64; w * h]);
    for _ in 0..150 {
        let (x, y) = (rng.gen_range(0.0..w as f64), rng.gen_range(0.0..h as f64));
        let f = 10f64.powf(rng.gen_range(3.5..5.0));
        add_star(&mut t, w, x, y, st, f);
        add_star(&mut s, w, x, y, ss, 0.8 * f);
    }
    let template: Vec<f32> = t.iter().map(|v| (v + 2.0 * unit.sample(&mut rng)) as f32).collect();
    let science: Vec<f32> = s.iter().map(|v| (v + v.sqrt() * unit.sample(&mut rng)) as f32).collect();
    let science_variance: Vec<f32> = s.iter().map(|v| *v as f32).collect();
    let pair = Pair { width: w, height: h, science: &science, template: &template, science_variance: &science_variance, template_variance: None };
    // A narrower basis than the default (h 11 instead of 24) keeps llvmpipe's time in seconds.
    let narrow = BasisOptions { sigma_factors: vec![0.7, 1.5, 3.5], degrees: vec![6, 4, 2], max_half: 12, ..Default::default() };
    let basis = Basis::from_seeing(st, ss, &narrow).unwrap_or_else(|e| panic!("{e}"));
    let stamps = select_stamps(&pair, basis.half, &StampOptions { grid: 6, ..Default::default() });
    let opts = FitOptions::default();
    let cpu = fit(&pair, &basis, &stamps, &opts).unwrap_or_else(|e| panic!("seed {seed}: CPU fit: {e}"));
    let t0 = std::time::Instant::now();
    let gpu = fit_with(&pair, &basis, &stamps, &opts, &mut g).unwrap_or_else(|e| panic!("seed {seed}: GPU fit: {e}"));
    let dt = t0.elapsed();
    let (kc, kg) = (cpu.kernel_at(128.0, 128.0), gpu.kernel_at(128.0, 128.0));
    let peak = kc.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    let dk = kc.iter().zip(&kg).fold(0.0f64, |m, (a, b)| m.max((a - b).abs())) / peak;
    let ds = (gpu.scale_at(128.0, 128.0) / cpu.scale_at(128.0, 128.0) - 1.0).abs();
    let kept = |s: &KernelSolution| s.stamps.iter().filter(|f| f.rejected_after.is_none()).count();
    eprintln!(
        "{test}: h {}, {} stamps ({} / {} kept), {} / {} fits, GPU fit {dt:.2?}: kernel |Δ|/peak {dk:.2e}, scale {ds:.2e}, χ² {:.4} / {:.4}",
        basis.half,
        stamps.len(),
        kept(&cpu),
        kept(&gpu),
        cpu.iterations,
        gpu.iterations,
        cpu.chi2,
        gpu.chi2
    );
    assert!(dk <= 1e-3 && ds <= 1e-4, "seed {seed}: kernel {dk}, scale {ds}");
}

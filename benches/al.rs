//! Alard–Lupton benchmark: a frame convolved with a fitted, spatially varying kernel (spatial
//! order 2, six monomials, a real `Basis::from_seeing` basis of half-width 15, random
//! coefficients) on the CPU (`KernelSolution::convolve`, 1024²) and on the GPU
//! (`GpuEngine::al_convolve`, 1024² and 4096², upload and read-back included), the GPU's
//! device-only time (the convolution re-run on the resident frame), and the fit's per-stamp
//! convolutions and Gram sums (`CpuGrams` against `GpuEngine` as a `StampGrams`) on 100 stamps.
//! Inputs are built outside the timed loops. Prints the adapter, so a number from llvmpipe
//! cannot pass for a GPU figure.
//!
//! `BLINK_BENCH_AL_HALF=24` sets the kernel half-width (default 15). On a software adapter
//! (llvmpipe) the 4096² GPU case runs only with `BLINK_BENCH_AL_FULL=1` (minutes per frame).

use blink::engine::{Engine, GpuEngine};
use blink::subtract::{monomials, normalised, spatial_terms, Basis, BasisOptions, CpuGrams, GramInput, KernelSolution, StampGram, StampGrams};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn half() -> usize {
    std::env::var("BLINK_BENCH_AL_HALF").ok().and_then(|v| v.parse().ok()).unwrap_or(15)
}

fn basis() -> Basis {
    let h = half();
    // Seeings wide enough that the half-width reaches the cap.
    Basis::from_seeing(1.0, 3.0, &BasisOptions { max_half: h, min_half: h, ..Default::default() }).expect("basis")
}

fn solution(rng: &mut StdRng, side: usize) -> KernelSolution {
    let basis = basis();
    let nsp = spatial_terms(2).len();
    let kernel = (0..basis.len()).map(|k| if k == 0 { vec![1.2] } else { (0..nsp).map(|_| rng.gen_range(-0.05..0.05)).collect() }).collect();
    KernelSolution {
        basis,
        width: side,
        height: side,
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

fn frame(rng: &mut StdRng, side: usize) -> Vec<f32> {
    let mut img: Vec<f32> = (0..side * side).map(|_| 500.0 + rng.gen_range(-20.0..20.0)).collect();
    for _ in 0..side * side / 1500 {
        let (cx, cy) = (rng.gen_range(4..side - 4), rng.gen_range(4..side - 4));
        let f = rng.gen_range(100.0..20000.0);
        for dy in 0..7 {
            for dx in 0..7 {
                let d2 = ((dx as f32 - 3.0).powi(2) + (dy as f32 - 3.0).powi(2)) / 2.0;
                img[(cy + dy - 3) * side + cx + dx - 3] += f * (-d2).exp() / 6.3;
            }
        }
    }
    img
}

struct StampBufs {
    side: usize,
    cutout: Vec<f32>,
    science: Vec<f64>,
    weight: Vec<f64>,
    background: Vec<f64>,
}

fn stamps(rng: &mut StdRng, basis: &Basis, n: usize) -> Vec<StampBufs> {
    let side = 2 * (basis.half + 4) + 1;
    let cs = side + 2 * basis.half;
    let nbg = spatial_terms(1).len();
    (0..n)
        .map(|_| {
            let cutout = frame(rng, cs);
            let science: Vec<f64> = frame(rng, side).iter().map(|&v| v as f64).collect();
            let weight = science.iter().map(|v| 1.0 / v.max(1.0)).collect();
            let mut background = vec![0.0; nbg * side * side];
            let mut m = Vec::new();
            for i in 0..side * side {
                monomials(1, normalised((i % side) as f64, 4096), normalised((i / side) as f64, 4096), &mut m);
                for (b, v) in m.iter().enumerate() {
                    background[b * side * side + i] = *v;
                }
            }
            StampBufs { side, cutout, science, weight, background }
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let mut rng = StdRng::seed_from_u64(42);
    let mut gpu = match GpuEngine::new() {
        Ok(g) => {
            println!("adapter: {}", g.adapter());
            Some(g)
        }
        Err(e) => {
            println!("no GPU adapter ({e}): CPU cases only");
            None
        }
    };
    let software = gpu.as_ref().is_some_and(|g| g.context().adapter_info.device_type == wgpu::DeviceType::Cpu);
    let full = std::env::var("BLINK_BENCH_AL_FULL").as_deref() == Ok("1");
    let nsp = spatial_terms(2).len();

    let mut group = c.benchmark_group("al");
    group.sample_size(10);
    let sol1 = solution(&mut rng, 1024);
    let img1 = frame(&mut rng, 1024);
    let h = sol1.half();
    println!("kernel half-width {h}, {} basis functions, {nsp} spatial monomials", sol1.basis.len());
    group.throughput(Throughput::Elements((1024 * 1024) as u64));
    group.bench_function(format!("AL convolve 1024² h={h} (CPU KernelSolution::convolve)"), |b| b.iter(|| sol1.convolve(&img1, 1024, 1024).expect("convolve")));
    if let Some(g) = gpu.as_mut() {
        let adapter = g.adapter();
        group.bench_function(format!("AL convolve 1024² h={h} (GPU, {adapter})"), |b| b.iter(|| g.al_convolve(&sol1, &img1, 1024, 1024).expect("al_convolve")));
        let sizes: &[usize] = if software && !full { &[1024] } else { &[1024, 4096] };
        if software && !full {
            println!("software adapter: the 4096² GPU case is skipped (BLINK_BENCH_AL_FULL=1 runs it)");
        }
        for &side in sizes {
            let sol = solution(&mut rng, side);
            let img = frame(&mut rng, side);
            let repeats = if software { 2 } else { 20 };
            let (_, t) = g.al_convolve_timed(&sol, &img, side, side, repeats).expect("al_convolve_timed");
            let side_taps = 2 * h + 1;
            let fma = (side * side) as f64 * (side_taps * side_taps.div_ceil(4) * 4 * nsp) as f64;
            println!(
                "AL convolve {side}² h={h} device-only ({adapter}): {:.3} ms per frame, {:.1} G multiply-adds/s",
                t.as_secs_f64() * 1e3,
                fma / t.as_secs_f64() / 1e9
            );
            if side == 4096 {
                group.throughput(Throughput::Elements((side * side) as u64));
                group.bench_function(format!("AL convolve 4096² h={h} (GPU, {adapter})"), |b| b.iter(|| g.al_convolve(&sol, &img, side, side).expect("al_convolve")));
            }
        }
    }

    // The fit's per-stamp work on 100 stamps.
    let basis = basis();
    let nbg = spatial_terms(1).len();
    let st = stamps(&mut rng, &basis, 100);
    let inputs: Vec<GramInput> = st
        .iter()
        .map(|s| GramInput { side: s.side, cutout: &s.cutout, science: &s.science, weight: &s.weight, background: &s.background, conv: None })
        .collect();
    group.throughput(Throughput::Elements(inputs.len() as u64));
    let mut cpu = CpuGrams;
    group.bench_function(format!("AL stamp grams 100 stamps h={h} (CPU CpuGrams)"), |b| b.iter(|| cpu.grams(&basis, nbg, &inputs).expect("grams")));
    if let Some(g) = gpu.as_mut() {
        let adapter = g.adapter();
        let run: Vec<StampGram> = g.al_stamp_grams(&basis, nbg, &inputs).expect("al_stamp_grams");
        assert_eq!(run.len(), inputs.len());
        if !software || full {
            group.bench_function(format!("AL stamp grams 100 stamps h={h} (GPU, {adapter})"), |b| b.iter(|| g.al_stamp_grams(&basis, nbg, &inputs).expect("al_stamp_grams")));
        } else {
            let t0 = std::time::Instant::now();
            g.al_stamp_grams(&basis, nbg, &inputs).expect("al_stamp_grams");
            println!("AL stamp grams 100 stamps h={h} ({adapter}): {:.2?} (one run)", t0.elapsed());
        }
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);

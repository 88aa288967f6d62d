//! Frame subtraction benchmark: one science/template pair (a field of Gaussian stars on sky with
//! Poisson-like noise, built outside the timed loop) through the whole frame path — sky,
//! subtraction, score image, peaks — with the Gaussian kernel on the CPU engine and on the GPU
//! engine when one exists, and with the Alard–Lupton kernel (CPU).
//! Prints the adapter, so a number from llvmpipe cannot pass for a GPU figure.
//!
//! `BLINK_BENCH_FRAME=2048` sets the frame side (default 1024).

use blink::detect::al::subtract_al;
use blink::detect::frame::{find_peaks, score_image, subtract, FrameMeta, Prepared};
use blink::detect::FrameOptions;
use blink::engine::{CpuEngine, Engine, GpuEngine};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

#[path = "common/star_field.rs"]
mod star_field;
use star_field::image;

fn bench(c: &mut Criterion) {
    let side: usize = std::env::var("BLINK_BENCH_FRAME").ok().and_then(|s| s.parse().ok()).unwrap_or(1024);
    let science = image(side, 3.0, 1, 1.0);
    let template = image(side, 2.4, 2, 1.0);
    let opts = FrameOptions::default();
    let meta = FrameMeta { frame: "bench", mjd: 61000.0, band: "r", zero_point: Some(28.5), wcs: None, aperture_correction: 1.0, convolved_science: None, repaired: None, point_sources: None };
    let run = |engine: &mut dyn Engine| {
        let d = subtract(engine, &science, &template, &opts).expect("subtract");
        let s = score_image(&d, None);
        find_peaks(&d, &s, &meta, opts.threshold).len()
    };
    let mut group = c.benchmark_group(format!("frame_{side}x{side}"));
    group.throughput(Throughput::Elements((side * side) as u64));
    group.sample_size(10);
    let mut cpu = CpuEngine::new();
    group.bench_function("gaussian-cpu", |b| b.iter(|| run(&mut cpu)));
    group.bench_function("alard-lupton-cpu", |b| {
        b.iter(|| {
            let (ps, pt) = (Prepared::new(&science, &opts).expect("prepare"), Prepared::new(&template, &opts).expect("prepare"));
            let d = subtract_al(&science, &ps, &template, &pt, &opts, None).expect("enough stars");
            let psf = blink::detect::psf::difference_psf(&science, d.sigma_difference);
            find_peaks(&d, &score_image(&d, psf.as_ref()), &meta, opts.threshold).len()
        })
    });
    match GpuEngine::new() {
        Ok(mut gpu) => {
            let name = gpu.adapter();
            eprintln!("GPU engine adapter: {name}");
            group.bench_function(format!("gaussian-gpu [{name}]"), |b| b.iter(|| run(&mut gpu)));
        }
        Err(e) => eprintln!("GPU engine not benchmarked: {e}"),
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);

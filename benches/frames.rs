//! Frame subtraction benchmark: one science/template pair (a field of Gaussian stars on sky with
//! Poisson-like noise, built outside the timed loop) through the whole frame path — sky,
//! subtraction, score image, peaks — with the Gaussian kernel on the CPU engine and on the GPU
//! engine when one exists, and with the Alard–Lupton kernel (CPU).
//! Prints the adapter, so a number from llvmpipe cannot pass for a GPU figure.
//!
//! `BLINK_BENCH_FRAME=2048` sets the frame side (default 1024).

use std::path::PathBuf;

use blink::detect::al::subtract_al;
use blink::detect::frame::{find_peaks, score_image, subtract, FrameMeta, Prepared};
use blink::detect::image::{Image, ImageHeader};
use blink::detect::FrameOptions;
use blink::engine::{CpuEngine, Engine, GpuEngine};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

fn image(side: usize, fwhm: f64, seed: u64, scale: f32) -> Image {
    let mut state = seed.wrapping_mul(0x9e3779b97f4a7c15) | 1;
    let mut uniform = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 11) as f64 / (1u64 << 53) as f64
    };
    let sky = 500.0f32;
    let mut data = vec![sky; side * side];
    // The same stars in both images (positions from a fixed stream), fluxes scaled.
    let mut pos = {
        let mut s = 0x2545f4914f6cdd1du64;
        move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 11) as f64 / (1u64 << 53) as f64
        }
    };
    let sigma = fwhm / 2.3548;
    let n_stars = side * side / 1500;
    for _ in 0..n_stars {
        let (x0, y0) = (pos() * side as f64, pos() * side as f64);
        let flux = 200.0 * (1.0 / (pos() + 0.01)) as f32 * scale;
        let r = (4.0 * sigma).ceil() as i64;
        for y in (y0 as i64 - r).max(0)..(y0 as i64 + r + 1).min(side as i64) {
            for x in (x0 as i64 - r).max(0)..(x0 as i64 + r + 1).min(side as i64) {
                let d2 = (x as f64 - x0).powi(2) + (y as f64 - y0).powi(2);
                data[y as usize * side + x as usize] += flux * ((-0.5 * d2 / (sigma * sigma)).exp() / (2.0 * std::f64::consts::PI * sigma * sigma)) as f32;
            }
        }
    }
    for v in &mut data {
        // Approximately Gaussian noise with the Poisson variance (gain 1.5).
        let g = (0..4).map(|_| uniform()).sum::<f64>() - 2.0;
        *v += (g * (3.0f64).sqrt() * ((*v as f64 / 1.5).max(1.0)).sqrt() / 1.5) as f32;
    }
    Image {
        path: PathBuf::from(format!("bench-{seed}.fits")),
        width: side,
        height: side,
        data,
        header: ImageHeader {
            mjd_start: Some(61000.0),
            exptime: 30.0,
            band: Some("r".into()),
            gain: Some(1.5),
            read_noise: 5.0,
            saturate: Some(60000.0),
            zero_point: Some(28.5),
            seeing: Some(fwhm),
            wcs: None,
            ncombine: None,
        },
        warnings: Vec::new(),
    }
}

fn bench(c: &mut Criterion) {
    let side: usize = std::env::var("BLINK_BENCH_FRAME").ok().and_then(|s| s.parse().ok()).unwrap_or(1024);
    let science = image(side, 3.0, 1, 1.0);
    let template = image(side, 2.4, 2, 1.0);
    let opts = FrameOptions::default();
    let meta = FrameMeta { frame: "bench", mjd: 61000.0, band: "r", zero_point: Some(28.5), wcs: None, aperture_correction: 1.0 };
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

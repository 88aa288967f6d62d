//! Engine benchmark: the CPU and GPU engines on one batch of 256 63x63 stamps (built outside the
//! timed loop; `BLINK_BENCH_BATCH=N` for N stamps: a GPU needs thousands in flight). Prints the
//! adapter, so a number from llvmpipe cannot pass for a GPU figure.

use blink::engine::{CpuEngine, Engine, GpuEngine, StampBatch, StampParams};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

fn batch(n: usize, w: usize, h: usize) -> StampBatch {
    let npix = w * h;
    // Cheap deterministic pseudo-noise; the values only need to be realistic in size.
    let mut state = 0x9e3779b97f4a7c15u64;
    let mut noise = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    };
    let mut b = StampBatch {
        width: w,
        height: h,
        n,
        science: Vec::with_capacity(n * npix),
        template: Vec::with_capacity(n * npix),
        science_var: vec![25.0; n * npix],
        template_var: vec![1.0; n * npix],
        weight: vec![1.0; n * npix],
        profile: Vec::with_capacity(n * npix),
        params: Vec::with_capacity(n),
    };
    let (cx, cy) = (w as f32 / 2.0, h as f32 / 2.0);
    for _ in 0..n {
        for i in 0..npix {
            let (dx, dy) = ((i % w) as f32 - cx, (i / w) as f32 - cy);
            let g = (-(dx * dx + dy * dy) / (2.0 * 2.2 * 2.2)).exp();
            b.template.push(200.0 + 2.0 * noise());
            b.science.push(310.0 + 500.0 * g + 10.0 * noise());
            b.profile.push(g / (2.0 * std::f32::consts::PI * 2.2 * 2.2));
        }
        b.params.push(StampParams { fit_radius: 10.0, ..StampParams::new(1.6, cx, cy) });
    }
    b
}

fn bench(c: &mut Criterion) {
    let n = std::env::var("BLINK_BENCH_BATCH").ok().and_then(|v| v.parse().ok()).unwrap_or(256usize);
    let b = batch(n, 63, 63);
    let mut group = c.benchmark_group(format!("engine_{n}x63x63"));
    group.throughput(Throughput::Elements(b.n as u64));
    group.sample_size(10);
    let mut cpu = CpuEngine::new();
    group.bench_function("cpu", |bench| bench.iter(|| cpu.subtract(&b)));
    match GpuEngine::new() {
        Ok(mut gpu) => {
            let name = gpu.adapter();
            eprintln!("GPU engine adapter: {name}");
            group.bench_function(format!("gpu [{name}]"), |bench| bench.iter(|| gpu.subtract(&b)));
        }
        Err(e) => eprintln!("GPU engine not benchmarked: {e}"),
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);

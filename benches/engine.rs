//! Engine benchmark (issue 4): pairs per second through `Engine::subtract` on a batch of 256
//! 63x63 stamps (`BLINK_BENCH_BATCH=N` for N: a GPU needs thousands in flight), and what the
//! CPU-side preparation costs per alert. Batches and alerts are built outside the timed loops;
//! every engine's output is checked once before it is timed, so an error cannot pass for speed.
//!
//! Groups (filter with `cargo bench --bench engine -- <name>`):
//! - `engine_<N>x63x63`: `gpu [<adapter>]` — the adapter is in the name, so a number from
//!   llvmpipe cannot pass for a GPU figure — then `cpu` (every core) and, for N ≤ 1024,
//!   `cpu_1thread`. After the GPU timing, `GPU phases` lines split one batch into host staging
//!   (copy into the mapped upload buffer), upload (staging → device), compute (the four
//!   dispatches) and readback (results mapped and read), each waited for on its own
//!   (`GpuEngine::profile`), with the pairs/s each phase alone would allow.
//! - `prepare`: `prepare_stamp` per alert on the real ZTF and Rubin fixtures and on simulated
//!   blink-native alerts (decoded outside the loop), and `assemble` of 256 prepared stamps.

use blink::decode::Decoder;
use blink::engine::{assemble, prepare_stamp, CpuEngine, Engine, GpuEngine, PrepareConfig, StampBatch, StampParams};
use blink::sim::{simulate_alerts, AlertSimConfig};
use blink::source::replay::{fixture_messages, FINK_RUBIN};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, SamplingMode, Throughput};

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

fn engines(c: &mut Criterion) {
    let n = std::env::var("BLINK_BENCH_BATCH").ok().and_then(|v| v.parse().ok()).unwrap_or(256usize);
    let b = batch(n, 63, 63);
    let mut group = c.benchmark_group(format!("engine_{n}x63x63"));
    group.throughput(Throughput::Elements(b.n as u64));
    group.sample_size(10);
    if n > 1024 {
        // Batches of seconds on a CPU: 10 runs, not criterion's 55 of linear sampling.
        group.sampling_mode(SamplingMode::Flat);
    }
    let mut cpu = CpuEngine::new();
    let want = cpu.subtract(&b).expect("CPU engine");
    // The GPU first: the device script gives this bench a fixed time.
    match GpuEngine::new() {
        Ok(mut gpu) => {
            let name = gpu.adapter();
            eprintln!("GPU engine adapter: {name}");
            let got = gpu.subtract(&b).expect("GPU engine");
            let worst = got.iter().zip(&want).map(|(g, c)| (g.score - c.score).abs() / (1.0 + c.score.abs())).fold(0.0f32, f32::max);
            assert!(worst < 4e-3, "GPU and CPU scores differ by {worst} (relative)");
            group.bench_function(format!("gpu [{name}]"), |bench| bench.iter(|| gpu.subtract(&b).expect("GPU engine")));
            phases(&mut gpu, &b, &name);
        }
        Err(e) => eprintln!("GPU engine not benchmarked: {e}"),
    }
    eprintln!("CPU engine: {} threads", cpu.threads());
    group.bench_function("cpu", |bench| bench.iter(|| cpu.subtract(&b).expect("CPU engine")));
    if n <= 1024 {
        let mut cpu1 = CpuEngine::with_threads(1);
        group.bench_function("cpu_1thread", |bench| bench.iter(|| cpu1.subtract(&b).expect("CPU engine")));
    }
    group.finish();
}

/// Print where one batch's time goes on the device: the median of 7 profiled runs per phase.
fn phases(gpu: &mut GpuEngine, b: &StampBatch, name: &str) {
    let runs: Vec<_> = (0..7).map(|_| gpu.profile(b).expect("GPU profile")).collect();
    let median = |f: &dyn Fn(&blink::gpu::Phases) -> std::time::Duration| {
        let mut v: Vec<f64> = runs.iter().map(|p| f(p).as_secs_f64()).collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let parts = [
        ("stage (host copy into upload buffer)", median(&|p| p.stage)),
        ("upload (upload buffer -> device)", median(&|p| p.upload)),
        ("compute (convolve, fit, difference_score)", median(&|p| p.compute)),
        ("readback (results copied, mapped, read)", median(&|p| p.readback)),
    ];
    let total: f64 = parts.iter().map(|p| p.1).sum();
    eprintln!("GPU phases [{name}], {} stamps {}x{}, each phase waited for on its own:", b.n, b.width, b.height);
    for (what, s) in parts {
        eprintln!("  {what:<44} {:>9.3} ms  {:>5.1} %  {:>10.0} pairs/s", 1e3 * s, 100.0 * s / total, b.n as f64 / s);
    }
    eprintln!("  {:<44} {:>9.3} ms           {:>10.0} pairs/s (serialised)", "sum", 1e3 * total, b.n as f64 / total);
}

/// Decoded fixture alerts by set: the real ZTF and Rubin alerts, and simulated native ones.
fn alert_sets() -> Vec<(&'static str, Vec<blink::alert::Alert>)> {
    let decoder = Decoder::new(Default::default()).expect("decoder");
    let fixtures = fixture_messages(&decoder).expect("fixture messages");
    let decode = |pick: &dyn Fn(&str) -> bool| -> Vec<blink::alert::Alert> {
        fixtures
            .iter()
            .filter(|m| pick(&m.origin))
            .flat_map(|m| decoder.decode_message(&m.payload))
            .filter_map(Result::ok)
            .collect()
    };
    let ztf = decode(&|o| o.starts_with("ztf/"));
    let rubin = decode(&|o| o == FINK_RUBIN.0);
    let native = simulate_alerts(64, 7, &AlertSimConfig::default());
    vec![("ztf", ztf), ("rubin", rubin), ("native", native)]
}

fn prepare(c: &mut Criterion) {
    let cfg = PrepareConfig::default();
    let mut group = c.benchmark_group("prepare");
    group.sample_size(10);
    let mut stamps = Vec::new();
    for (name, alerts) in alert_sets() {
        let ok = alerts.iter().filter_map(|a| prepare_stamp(a, &cfg).ok()).collect::<Vec<_>>();
        eprintln!("prepare {name}: {} alerts, {} prepared", alerts.len(), ok.len());
        if name == "native" {
            stamps = ok;
        }
        group.throughput(Throughput::Elements(alerts.len() as u64));
        group.bench_function(BenchmarkId::new("prepare_stamp", name), |bench| {
            bench.iter(|| alerts.iter().filter(|a| prepare_stamp(a, &cfg).is_ok()).count())
        });
    }
    if !stamps.is_empty() {
        let many: Vec<_> = stamps.iter().cycle().take(256).cloned().collect();
        group.throughput(Throughput::Elements(many.len() as u64));
        group.bench_function("assemble_256", |bench| bench.iter(|| assemble(&many).n));
    }
    group.finish();
}

criterion_group!(benches, engines, prepare);
criterion_main!(benches);

//! Whole-frame GPU benchmark (issue 4's speed target): a simulated science/template pair of
//! 1024² and 4096² (Gaussian stars on sky with Poisson-like noise, built in-process outside the
//! timed loops) through the frame kernels of `gpu::kernels::frame`.
//!
//! - `resident/*`: the planes already on the device, only the kernels timed (submit to
//!   completion): each image's variance, saturation and sky mesh (`prepare+sky x2`), the
//!   difference's residual background, a mask grown by 24 px, the score image with the
//!   separable Gaussian, with a full 2-D Gaussian and with the profile `blink subtract` scores
//!   with (the measured PSF through the decorrelation filter, `score-psf`), and `all` of them
//!   back to back — the honest "GPU time" of the per-pixel stages.
//! - `e2e/*`: from host images to host results, transfers included: both images prepared on
//!   the GPU (`detect::al::prepare_gpu`), and the whole Alard–Lupton subtraction
//!   (`prepare_gpu` ×2, `subtract_al` with the GPU, `score_image_gpu` with the measured PSF,
//!   read back; the PSF measurement itself is outside the loop), `blink subtract`'s chain with
//!   the planes kept on the device (`on device`: the two images up, the fit's stars and their
//!   squares and the two products back); at 1024² also the CPU path.
//! - `transfer/*`: one plane up, one plane back into a new `Vec` and into one reused (bytes
//!   per second; the two read-backs differ by the host's page faults).
//!
//! Prints the adapter (and says so when it is a software rasteriser: llvmpipe numbers are not
//! GPU figures; frames above 1024² are skipped there unless `BLINK_BENCH_FORCE=1`).
//! `BLINK_BENCH_FRAME_SIZES=1024,4096` sets the sides.

use blink::cpu::frame::Profile;
use blink::detect::al::{prepare_gpu, prepare_gpu_device, subtract_al, subtract_al_on_device};
use blink::detect::frame::{products_gpu_resident, score_image, score_image_gpu, FrameOptions, Prepared};
use blink::engine::{Engine, GpuEngine};
use criterion::{criterion_group, criterion_main, Criterion, SamplingMode, Throughput};

#[path = "common/star_field.rs"]
mod star_field;
use star_field::image;

fn bench(c: &mut Criterion) {
    let sizes: Vec<usize> = std::env::var("BLINK_BENCH_FRAME_SIZES")
        .unwrap_or_else(|_| "1024,4096".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let mut gpu = match GpuEngine::new() {
        Ok(g) => g,
        Err(e) => {
            eprintln!("frame_gpu: no GPU adapter ({e}); nothing measured");
            return;
        }
    };
    let name = gpu.adapter();
    let software = gpu.context().is_software();
    eprintln!("frame_gpu adapter: {name}{}", if software { " -- a SOFTWARE rasteriser: these are not GPU figures" } else { "" });
    let force = std::env::var("BLINK_BENCH_FORCE").is_ok_and(|v| v == "1");
    for side in sizes {
        if software && side > 1024 && !force {
            eprintln!("frame_gpu: {side}² skipped on a software rasteriser (BLINK_BENCH_FORCE=1 runs it)");
            continue;
        }
        let science = image(side, 3.0, 1, 1.0);
        let template = image(side, 2.4, 2, 1.0);
        let opts = FrameOptions::default();
        // A real difference to score: the subtraction itself, outside the timed loops.
        let ps = prepare_gpu(&mut gpu, &science, &opts).expect("prepare science");
        let pt = prepare_gpu(&mut gpu, &template, &opts).expect("prepare template");
        let diff = subtract_al(&science, &ps, &template, &pt, &opts, Some(&mut gpu)).expect("enough stars for the kernel");
        let gauss = Profile::gaussian(diff.sigma_difference);
        let full = match &gauss {
            Profile::Separable(g) => Profile::Full { side: g.len(), pixels: g.iter().flat_map(|a| g.iter().map(move |b| a * b)).collect() },
            p => p.clone(),
        };
        // The profile the score uses: the measured PSF through the decorrelation filter.
        let psf = blink::detect::psf::difference_psf(&science, diff.sigma_difference);
        let measured = match (&psf, &diff.decorrelated) {
            (Some(p), Some(dc)) => blink::subtract::decorr::decorrelated_psf(&dc.kernel, &p.pixels, p.side).ok().map(|q| blink::detect::psf::trimmed(&q, 1e-4)),
            (Some(p), None) => Some(p.clone()),
            _ => None,
        };
        let measured = measured.map(|q| Profile::Full { side: q.side, pixels: q.pixels });
        eprintln!("frame_gpu {side}²: PSF measured: {}; score profile side {}", psf.is_some(), measured.as_ref().map_or(0, |p| 2 * p.radius() + 1));
        let bad: Vec<bool> = diff.variance.iter().map(|v| v.is_nan() || *v <= 0.0).collect();
        let up = |g: &mut GpuEngine, v: &[f32]| g.frame_upload(v, side, side).expect("upload");
        let (sci, tpl, d, v) = (up(&mut gpu, &science.data), up(&mut gpu, &template.data), up(&mut gpu, &diff.difference), up(&mut gpu, &diff.variance));
        let mask = gpu.frame_upload_mask(&bad, side, side).expect("upload mask");
        let sat_level = science.header.saturate.map(|s| s as f32 * 0.999);
        let mesh = opts.background_mesh;

        let mut group = c.benchmark_group(format!("frame_gpu_{side}x{side}"));
        group.throughput(Throughput::Elements((side * side) as u64));
        group.sample_size(10);
        group.sampling_mode(SamplingMode::Flat);
        let tag = if software { " [software]" } else { "" };
        let prepare_sky = |g: &mut GpuEngine| {
            for img in [&sci, &tpl] {
                let (var, sat) = g.frame_prepare(img, 1.5, (5.0f64 / 1.5).powi(2), sat_level).expect("prepare");
                let sky = g.frame_sky_subtract(img, &sat, mesh).expect("sky");
                for p in [var, sat, sky] {
                    g.frame_release(p);
                }
            }
        };
        group.bench_function(format!("resident/prepare+sky x2{tag}"), |b| {
            b.iter(|| {
                prepare_sky(&mut gpu);
                gpu.frame_wait().expect("wait")
            })
        });
        group.bench_function(format!("resident/residual-background{tag}"), |b| {
            b.iter(|| {
                gpu.frame_subtract_residual_background(&d, &v, mesh).expect("residual");
                gpu.frame_wait().expect("wait")
            })
        });
        group.bench_function(format!("resident/grow-24{tag}"), |b| {
            b.iter(|| {
                let gm = gpu.frame_grow(&mask, 24).expect("grow");
                gpu.frame_release(gm);
                gpu.frame_wait().expect("wait")
            })
        });
        let mut profiles = vec![("gaussian", &gauss), ("full-2d", &full)];
        if let Some(m) = &measured {
            profiles.push(("psf", m));
        }
        for (label, p) in profiles {
            group.bench_function(format!("resident/score-{label}{tag}"), |b| {
                b.iter(|| {
                    let s = gpu.frame_score(&d, &v, p, 1.0).expect("score");
                    gpu.frame_release_score(s);
                    gpu.frame_wait().expect("wait")
                })
            });
        }
        group.bench_function(format!("resident/all{tag}"), |b| {
            b.iter(|| {
                prepare_sky(&mut gpu);
                gpu.frame_subtract_residual_background(&d, &v, mesh).expect("residual");
                for r in [18, 24] {
                    let gm = gpu.frame_grow(&mask, r).expect("grow");
                    gpu.frame_release(gm);
                }
                let s = gpu.frame_score(&d, &v, measured.as_ref().unwrap_or(&gauss), 1.0).expect("score");
                gpu.frame_release_score(s);
                gpu.frame_wait().expect("wait")
            })
        });
        group.bench_function(format!("e2e/prepare x2{tag}"), |b| {
            b.iter(|| {
                let a = prepare_gpu(&mut gpu, &science, &opts).expect("prepare");
                let t = prepare_gpu(&mut gpu, &template, &opts).expect("prepare");
                a.variance.len() + t.variance.len()
            })
        });
        group.bench_function(format!("e2e/subtract+score{tag}"), |b| {
            b.iter(|| {
                let a = prepare_gpu(&mut gpu, &science, &opts).expect("prepare");
                let t = prepare_gpu(&mut gpu, &template, &opts).expect("prepare");
                let dd = subtract_al(&science, &a, &template, &t, &opts, Some(&mut gpu)).expect("subtract");
                let s = score_image_gpu(&dd, psf.as_ref(), &mut gpu).expect("score");
                s.score.len()
            })
        });
        // `blink subtract`'s chain: the prepared planes and the difference kept on the device,
        // the two images up, the fit's stars and squares and the two products (D, Z) back.
        group.bench_function(format!("e2e/subtract+score on device{tag}"), |b| {
            b.iter(|| {
                let (a, ra) = prepare_gpu_device(&mut gpu, &science, &opts).expect("prepare");
                let (t, rt) = prepare_gpu_device(&mut gpu, &template, &opts).expect("prepare");
                let (dd, planes) = subtract_al_on_device(&science, &a, &ra, &template, &t, &rt, &opts, &mut gpu).expect("subtract");
                let planes = planes.expect("the subtraction stayed on the GPU");
                let (d, z) = products_gpu_resident(&dd, psf.as_ref(), &mut gpu, &planes).expect("products").expect("a GPU route");
                for r in [ra, rt] {
                    r.release(&mut gpu);
                }
                planes.release(&mut gpu);
                d.len() + z.len()
            })
        });
        // One plane each way: what every whole-plane transfer above costs.
        let plane_bytes = (side * side * 4) as u64;
        group.throughput(Throughput::Bytes(plane_bytes));
        group.bench_function(format!("transfer/upload{tag}"), |b| {
            b.iter(|| {
                let p = gpu.frame_upload(&science.data, side, side).expect("upload");
                gpu.frame_wait().expect("wait");
                gpu.frame_release(p);
            })
        });
        group.bench_function(format!("transfer/read-back{tag}"), |b| b.iter(|| gpu.frame_read(&d).expect("read").len()));
        // The same into host memory already touched: the difference is the page faults of a
        // new plane.
        let mut host = vec![0.0f32; side * side];
        group.bench_function(format!("transfer/read-back-reused{tag}"), |b| b.iter(|| gpu.frame_read_into(&d, &mut host).expect("read")));
        group.throughput(Throughput::Elements((side * side) as u64));
        if side <= 1024 {
            group.bench_function("e2e/subtract+score cpu", |b| {
                b.iter(|| {
                    let a = Prepared::new(&science, &opts).expect("prepare");
                    let t = Prepared::new(&template, &opts).expect("prepare");
                    let dd = subtract_al(&science, &a, &template, &t, &opts, None).expect("subtract");
                    score_image(&dd, psf.as_ref()).score.len()
                })
            });
        }
        group.finish();
        for p in [sci, tpl, d, v, mask] {
            gpu.frame_release(p);
        }
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);

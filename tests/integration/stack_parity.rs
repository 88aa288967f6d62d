//! The stacking kernels (`shaders/stack/`) against their CPU twins (`cpu::stack`) on fresh
//! random batches: noise, NaNs, zero and NaN variances, integer, sub-pixel and multi-pixel
//! offsets, stacks of 1 to 17 epochs as nested windows of several objects; one batch in one
//! chunk and in many. The seed comes from the clock and is printed; rerun one with
//! `BLINK_SEED=<seed>`.
//!
//! Like `frame_parity`, these FAIL when no adapter exists unless `BLINK_ALLOW_NO_GPU=1`.
//!
//! Tolerances (f32 on the GPU against f64 on the CPU): masked pixels (NaN) and counts exactly
//! the same; shifted and stacked images |Δ| ≤ 1e-5 · the largest |D| of the batch; variances
//! and template terms relative 1e-5; effective PSFs identical (the same host code).

use blink::cpu::stack as twin;
use blink::gpu::kernels::stack::GpuStack;
use blink::stack::{windows_batch, Stack, StackBatch, StackEpoch, DEFAULT_WINDOWS};
use blink::subtract::decorr::PsfImage;

use crate::common::{gpu, seeded};
use rand::rngs::StdRng;
use rand::Rng;

const W: usize = 27;
const H: usize = 23;
/// Largest |D| the epochs hold.
const DMAX: f32 = 40.0;

fn psf(rng: &mut StdRng) -> PsfImage {
    let side = 2 * rng.gen_range(2..6) + 1;
    let (s, ox, oy) = (rng.gen_range(0.8..2.5), rng.gen_range(-0.5..0.5), rng.gen_range(-0.5..0.5));
    PsfImage::gaussian(side, s, ox, oy)
}

/// A random epoch: noise and a source, a few NaN pixels, masked variances (0 or NaN), a NaN
/// row now and then; offsets sub-pixel, whole, or several pixels.
fn epoch(rng: &mut StdRng, mjd: f64, band: &str) -> StackEpoch {
    let (dx, dy) = match rng.gen_range(0..4) {
        0 => (0.0, 0.0),
        1 => (rng.gen_range(-2..3) as f64, rng.gen_range(-2..3) as f64),
        2 => (rng.gen_range(-0.5..0.5), rng.gen_range(-0.5..0.5)),
        _ => (rng.gen_range(-3.5..3.5), rng.gen_range(-3.5..3.5)),
    };
    let n = W * H;
    let mut e = StackEpoch { width: W, height: H, diff: vec![0.0; n], var: vec![0.0; n], var_template: vec![0.0; n], psf: psf(rng), mjd, band: band.to_string(), dx, dy };
    for i in 0..n {
        let (x, y) = ((i % W) as f32 - 13.0, (i / W) as f32 - 11.0);
        e.diff[i] = rng.gen_range(-10.0f32..10.0) + 30.0 * (-(x * x + y * y) / 6.0).exp();
        e.var[i] = rng.gen_range(0.5f32..50.0);
        e.var_template[i] = e.var[i] * rng.gen_range(0.0f32..0.6);
        match rng.gen_range(0..100) {
            0..=2 => e.diff[i] = f32::NAN,
            3 => e.var[i] = 0.0,
            4 => e.var_template[i] = f32::NAN,
            _ => {}
        }
    }
    if rng.gen_bool(0.2) {
        let y = rng.gen_range(0..H);
        e.diff[y * W..(y + 1) * W].fill(f32::NAN);
        e.var[y * W..(y + 1) * W].fill(f32::NAN);
    }
    e
}

/// Several objects' epochs in one batch, each object's stacks nested ranges of its run (as
/// `stack::windows_batch` lays them out), of 1 to 17 epochs.
fn batch(rng: &mut StdRng) -> StackBatch {
    let mut b = StackBatch::new(W, H);
    for &n in &[1usize, 2, 5, 17, 3] {
        let start = b.epochs();
        for k in 0..n {
            let e = epoch(rng, 60000.0 - k as f64, "r");
            b.push_epoch(&e, k).unwrap_or_else(|e| panic!("{e}"));
        }
        let mut cuts: Vec<usize> = (0..rng.gen_range(1..4)).map(|_| rng.gen_range(1..=n)).collect();
        cuts.push(n);
        cuts.sort_unstable();
        cuts.dedup();
        for c in cuts {
            b.push_stack(start..start + c).unwrap_or_else(|e| panic!("{e}"));
        }
    }
    b
}

fn close(what: &str, i: usize, gpu: f32, cpu: f32, tol: f32) {
    assert_eq!(gpu.is_nan(), cpu.is_nan(), "{what} at {i}: gpu {gpu} cpu {cpu}");
    assert!(cpu.is_nan() || (gpu - cpu).abs() <= tol, "{what} at {i}: gpu {gpu} cpu {cpu} (tolerance {tol})");
}

fn compare_stacks(what: &str, gpu: &[Stack], cpu: &[Stack]) {
    assert_eq!(gpu.len(), cpu.len(), "{what}: stacks");
    let mut worst = 0.0f32;
    for (k, (g, c)) in gpu.iter().zip(cpu).enumerate() {
        let what = format!("{what}, stack {k} of {} epochs", c.epochs);
        assert_eq!(g.count, c.count, "{what}: counts");
        assert_eq!((g.epochs, &g.psf), (c.epochs, &c.psf), "{what}: PSF");
        for i in 0..W * H {
            let tol = 1e-5 * DMAX;
            close(&format!("{what}: image"), i, g.image[i], c.image[i], tol);
            if c.image[i].is_finite() {
                worst = worst.max((g.image[i] - c.image[i]).abs() / tol);
            }
            close(&format!("{what}: var"), i, g.var[i], c.var[i], 1e-5 * c.var[i].abs());
            close(&format!("{what}: var_template"), i, g.var_template[i], c.var_template[i], 1e-5 * c.var[i].abs());
        }
    }
    eprintln!("{what}: {} stacks, worst image error {worst:.3} of the tolerance", cpu.len());
}

#[test]
fn stack_shift_matches_the_twin() {
    let test = "stack_shift_matches_the_twin";
    let Some(mut g) = gpu(test) else { return };
    let gs = GpuStack::new(&g).unwrap_or_else(|e| panic!("{test}: {e}"));
    let mut rng = seeded(test);
    let b = batch(&mut rng);
    let got = gs.shift(&mut g, &b).unwrap_or_else(|e| panic!("{test}: {e}"));
    let want = twin::shift(&b);
    let masked = want.diff.iter().filter(|v| v.is_nan()).count();
    assert!(masked > 0 && masked < want.diff.len() * 9 / 10, "{test}: {masked} masked of {}", want.diff.len());
    for i in 0..want.diff.len() {
        close("shifted diff", i, got.diff[i], want.diff[i], 1e-5 * DMAX);
        close("shifted var", i, got.var[i], want.var[i], 1e-5 * want.var[i].abs());
        close("shifted var_template", i, got.var_template[i], want.var_template[i], 1e-5 * want.var[i].abs().max(1e-30));
    }
    eprintln!("{test}: {} epochs, {masked} pixels masked", b.epochs());
}

#[test]
fn stack_coadd_matches_the_twin() {
    let test = "stack_coadd_matches_the_twin";
    let Some(mut g) = gpu(test) else { return };
    let mut gs = GpuStack::new(&g).unwrap_or_else(|e| panic!("{test}: {e}"));
    let mut rng = seeded(test);
    let b = batch(&mut rng);
    let want = twin::coadd(&b);
    let got = gs.coadd(&mut g, &b).unwrap_or_else(|e| panic!("{test}: {e}"));
    compare_stacks("one chunk", &got, &want);
    // The same batch in chunks: 128 KiB hold 17 epochs (3 planes of 621 pixels), and the
    // batch's objects span 28.
    gs.set_chunk_bytes(128 << 10);
    let got = gs.coadd(&mut g, &b).unwrap_or_else(|e| panic!("{test}: {e}"));
    compare_stacks("chunked", &got, &want);
    let got = gs.shift(&mut g, &b).unwrap_or_else(|e| panic!("{test}: {e}"));
    assert_eq!(got.diff.iter().filter(|v| v.is_nan()).count(), twin::shift(&b).diff.iter().filter(|v| v.is_nan()).count(), "{test}: chunked shift");
    // A stack of more epochs than one chunk holds is an error, not a panic.
    gs.set_chunk_bytes(4096);
    let mut big = StackBatch::new(W, H);
    for k in 0..3 {
        big.push_epoch(&epoch(&mut rng, 1.0, "g"), k).unwrap_or_else(|e| panic!("{e}"));
    }
    big.push_stack(0..3).unwrap_or_else(|e| panic!("{e}"));
    assert!(gs.coadd(&mut g, &big).is_err());
}

/// `stack::windows_batch` with the GPU's coadd gives the CPU's windows.
#[test]
fn stack_windows_on_the_gpu_match_the_cpu() {
    let test = "stack_windows_on_the_gpu_match_the_cpu";
    let Some(mut g) = gpu(test) else { return };
    let gs = GpuStack::new(&g).unwrap_or_else(|e| panic!("{test}: {e}"));
    let mut rng = seeded(test);
    let now = 60100.0;
    let mut objects: Vec<Vec<StackEpoch>> = Vec::new();
    for _ in 0..4 {
        let n = rng.gen_range(1..12);
        let mut o = Vec::new();
        for _ in 0..n {
            let (mjd, band) = (now - rng.gen_range(0.0..35.0), ["g", "r"][rng.gen_range(0..2)]);
            o.push(epoch(&mut rng, mjd, band));
        }
        objects.push(o);
    }
    let refs: Vec<(&[StackEpoch], f64)> = objects.iter().map(|o| (o.as_slice(), now)).collect();
    let cpu = windows_batch(&refs, &DEFAULT_WINDOWS, |b| Ok(twin::coadd(b))).unwrap_or_else(|e| panic!("{test}: {e}"));
    let got = windows_batch(&refs, &DEFAULT_WINDOWS, |b| Ok(gs.coadd(&mut g, b)?)).unwrap_or_else(|e| panic!("{test}: {e}"));
    assert_eq!(cpu.len(), got.len());
    for (o, (c, w)) in cpu.iter().zip(&got).enumerate() {
        let key = |v: &[blink::stack::WindowStack]| v.iter().map(|w| (w.band.clone(), w.nights.to_bits(), w.epochs.clone(), w.same_as.map(f64::to_bits))).collect::<Vec<_>>();
        assert_eq!(key(c), key(w), "{test}: object {o}");
        let (cs, gs): (Vec<Stack>, Vec<Stack>) = c.iter().zip(w).map(|(a, b)| (a.stack.clone(), b.stack.clone())).unzip();
        compare_stacks(&format!("object {o}"), &gs, &cs);
    }
}

/// The resident stacks (`shaders/ring/ring.wgsl`) against their twin (`cpu::ring::measure`):
/// random squares in random cells (noise, a source, NaN pixels, zero and NaN variances, a
/// masked row now and then), jobs of 1 to 20 epochs with sub-pixel, whole and larger offsets,
/// PSF widths 0.6–3.2 px, 1 to 4 nested windows, candidates near the centre and off it, many
/// objects in one dispatch. Sums relative 2e-4 of the window's scale; centre flags the same.
#[test]
fn resident_stacks_match_their_twin() {
    use blink::cpu::ring::{self as twin_ring, RingEntry, RingJob, CELL, NPIX, SIDE};
    use blink::gpu::kernels::ring::GpuRing;
    let mut rng = seeded("resident_stacks_match_their_twin");
    let Some(engine) = gpu("resident_stacks_match_their_twin") else { return };
    let capacity = 300;
    let mut ring = GpuRing::new(&engine, capacity).expect("ring");
    assert_eq!(ring.capacity(), capacity);
    let mut cells = vec![0.0f32; capacity * CELL];
    for c in 0..capacity {
        let sq = &mut cells[c * CELL..(c + 1) * CELL];
        let (d, rest) = sq.split_at_mut(NPIX);
        let (v, vt) = rest.split_at_mut(NPIX);
        let (sx, sy) = (15.0 + rng.gen_range(-1.5f32..1.5), 15.0 + rng.gen_range(-1.5f32..1.5));
        for i in 0..NPIX {
            let (x, y) = ((i % SIDE) as f32 - sx, (i / SIDE) as f32 - sy);
            d[i] = rng.gen_range(-3.0f32..3.0) + 6.0 * (-(x * x + y * y) / 5.0).exp();
            v[i] = rng.gen_range(0.5f32..4.0);
            vt[i] = v[i] * rng.gen_range(0.0f32..0.5);
            match rng.gen_range(0..100) {
                0 => d[i] = f32::NAN,
                1 => v[i] = 0.0,
                2 => vt[i] = f32::NAN,
                _ => {}
            }
        }
        if rng.gen_bool(0.15) {
            let y = rng.gen_range(0..SIDE);
            d[y * SIDE..(y + 1) * SIDE].fill(f32::NAN);
        }
        ring.write(c as u32, sq);
    }
    let jobs: Vec<RingJob> = (0..150)
        .map(|k| {
            let n = rng.gen_range(1..=20);
            let entries = (0..n)
                .map(|_| {
                    let (dx, dy) = match rng.gen_range(0..4) {
                        0 => (0.0, 0.0),
                        1 => (rng.gen_range(-1..2) as f64, rng.gen_range(-1..2) as f64),
                        2 => (rng.gen_range(-1.0..1.0), rng.gen_range(-1.0..1.0)),
                        _ => (rng.gen_range(-3.5..3.5), rng.gen_range(-3.5..3.5)),
                    };
                    let sigma: f64 = rng.gen_range(0.6..3.2);
                    RingEntry { cell: rng.gen_range(0..capacity as u32), dx, dy, sigma, half: (4.0 * sigma).ceil() as u32 }
                })
                .collect();
            let mut counts: Vec<usize> = (1..=n).filter(|_| rng.gen_bool(0.3)).collect();
            counts.truncate(3);
            counts.push(n);
            counts.dedup();
            let (x, y) = if k % 10 == 9 { (rng.gen_range(1.0..29.0), rng.gen_range(1.0..29.0)) } else { (15.0 + rng.gen_range(-0.5..0.5), 15.0 + rng.gen_range(-0.5..0.5)) };
            RingJob { entries, counts, x, y }
        })
        .collect();
    let got = ring.measure(&jobs).expect("measure");
    // The scratch buffers kept from the first call: a smaller batch, then a larger one.
    assert_eq!(ring.measure(&jobs[..7]).expect("measure"), got[..7]);
    let twice: Vec<RingJob> = jobs.iter().chain(&jobs).cloned().collect();
    assert_eq!(ring.measure(&twice).expect("measure")[jobs.len()..], got[..]);
    let (mut compared, mut centres_masked) = (0, 0);
    for (k, (job, g)) in jobs.iter().zip(&got).enumerate() {
        let want = twin_ring::measure(&cells, job);
        assert_eq!(g.len(), want.len(), "job {k}");
        for (w, (a, b)) in g.iter().zip(&want).enumerate() {
            let ctx = format!("job {k}, window {w} ({} epochs): gpu {a:?}, cpu {b:?}", job.counts[w]);
            assert_eq!(a.centre, b.centre, "{ctx}");
            assert!((a.den - b.den).abs() <= 2e-4 * b.den.abs(), "{ctx}");
            let scale = (b.num.abs()).max(b.den.sqrt() * 1.0);
            assert!((a.num - b.num).abs() <= 2e-4 * scale, "{ctx}");
            compared += 1;
            centres_masked += usize::from(!b.centre);
        }
    }
    eprintln!("resident stacks: {compared} windows of {} jobs compared, {centres_masked} with the centre masked", jobs.len());
    assert!(compared > 150 && centres_masked < compared / 2);
}

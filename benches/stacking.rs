//! Stacking benchmark (issue 5): per-alert time of the engine's subtraction alone against
//! subtraction plus the streaming stacking path, on a batch of 63x63 stamps (64 by default,
//! `BLINK_BENCH_BATCH=N`) whose objects have 10 epochs of history each.
//!
//! - `subtract`: `Engine::subtract` (what the pipeline runs without a history store).
//! - `subtract+stacking`: `Engine::subtract_squares` (each stamp's planes cut to the square the
//!   history keeps; on the GPU on the device), the epochs' squares and PSFs, `put_many`
//!   into a `MemoryHistory` holding the 10 earlier epochs per object, the new squares into the
//!   resident ring that holds those epochs too (both rebuilt outside the timed part), then
//!   `pipeline::stacking::evaluate`: every object's window stacks made and measured from its
//!   resident squares in one dispatch (`gpu::kernels::ring`; with the CPU engine the twin,
//!   `cpu::ring`, over the cores), and the announcement rule. A second plain timing splits it:
//!   subtraction with squares, storing, squares into the ring, stacks.
//!
//! The engine is `select_engine(auto)`: the GPU where there is one (its adapter is printed and
//! in the group name), else (no adapter, or llvmpipe) the CPU engine. The issue's target is that stacking adds at most
//! 10% to the GPU time per alert; the printed ratio says which engine it was measured on.

use std::time::Instant;

use blink::alert::Survey;
use blink::engine::{select_engine, Engine, EnginePreference, StampBatch, StampParams};
use blink::history::{Epoch, HistoryConfig, HistoryStore, Measurement, MemoryHistory};
use blink::pipeline::ring::{self, SquareRing};
use blink::pipeline::stacking::{self, Touched};
use std::cell::RefCell;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};

const SIDE: usize = 63;
const HISTORY: usize = 10;

/// A batch of `n` stamps: sky, a faint source at a sub-pixel candidate, pseudo-noise; `seed`
/// changes the noise so that history epochs differ.
fn batch(n: usize, seed: u64) -> StampBatch {
    let (w, h) = (SIDE, SIDE);
    let npix = w * h;
    let mut state = 0x9e3779b97f4a7c15u64 ^ seed.wrapping_mul(0x2545f4914f6cdd1d);
    let mut noise = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    };
    let mut b = StampBatch { n, ..StampBatch::empty(w, h) };
    b.science_var = vec![25.0; n * npix];
    b.template_var = vec![1.0; n * npix];
    b.weight = vec![1.0; n * npix];
    for k in 0..n {
        let (cx, cy) = (31.0 + (k % 5) as f32 * 0.1 - 0.2, 31.0 - (k % 3) as f32 * 0.15);
        for i in 0..npix {
            let (dx, dy) = ((i % w) as f32 - cx, (i / w) as f32 - cy);
            let g = (-(dx * dx + dy * dy) / (2.0 * 2.2 * 2.2)).exp();
            b.template.push(200.0 + 2.0 * noise());
            b.science.push(210.0 + 60.0 * g + 17.0 * noise());
            b.profile.push(g / (2.0 * std::f32::consts::PI * 2.2 * 2.2));
        }
        b.params.push(StampParams { fit_radius: 10.0, science_sigma: 2.2, template_sigma: 1.5, ..StampParams::new(1.6, cx, cy) });
    }
    b
}

/// The epochs of one batch at `mjd`, alert ids `a<tag>-<k>`, objects `obj-<k>`.
fn epochs(engine: &mut dyn Engine, b: &StampBatch, mjd: f64, tag: &str) -> Vec<Epoch> {
    let squares = engine.subtract_squares(b, stacking::STORED_HALF).expect("squares");
    epochs_of(&squares, b, mjd, tag)
}

/// [`epochs`] from the engine's squares: each stamp's stored square and its PSF.
fn epochs_of(squares: &blink::engine::StampSquares, b: &StampBatch, mjd: f64, tag: &str) -> Vec<Epoch> {
    (0..b.n)
        .map(|k| {
            let p = &b.params[k];
            let stored = stacking::epoch_stamps(squares, k, p).expect("stamp");
            Epoch {
                survey: Survey::Native,
                alert_id: format!("a{tag}-{k}"),
                object_id: format!("obj-{k}"),
                band: "r".into(),
                mjd,
                ra: 150.0 + k as f64 * 0.01,
                dec: 2.0,
                stamp_x: stored.x,
                stamp_y: stored.y,
                stamps: stored.stamps,
                measurement: Measurement::from(&squares.results[k]),
            }
        })
        .collect()
}

/// The stacking path on one batch, as the pipeline's sink runs it.
fn subtract_and_stack(engine: &mut dyn Engine, b: &StampBatch, store: &MemoryHistory, ring: &mut SquareRing) -> usize {
    let now = 61000.0 + HISTORY as f64;
    let new = epochs(engine, b, now, "now");
    let outcomes = store.put_many(&new).expect("put");
    add_to_ring(ring, &new, &outcomes);
    let touched = touched_of(&new, outcomes);
    let (hits, _) = stacking::evaluate(store, ring, &touched, 5.0).expect("evaluate");
    hits.len()
}

/// The added epochs' squares into the ring, as the pipeline's sink puts them.
fn add_to_ring(ring: &mut SquareRing, new: &[Epoch], outcomes: &[blink::history::PutOutcome]) {
    for (e, o) in new.iter().zip(outcomes) {
        if let blink::history::PutOutcome::Added { object, new_object } = o {
            let sq = ring::NewSquare::of(e, ring::psf_sigma(&e.stamps.psf).expect("a Gaussian PSF"));
            ring.add(object, &e.band, &sq, *new_object);
        }
    }
}

/// The stored alerts of `new` as the sink hands them to `evaluate`.
fn touched_of(new: &[Epoch], outcomes: Vec<blink::history::PutOutcome>) -> Vec<Touched> {
    outcomes
        .into_iter()
        .enumerate()
        .filter_map(|(k, o)| match o {
            blink::history::PutOutcome::Added { object, .. } | blink::history::PutOutcome::Duplicate { object } => Some(Touched {
                index: k,
                object,
                band: new[k].band.clone(),
                mjd: new[k].mjd,
                x: new[k].stamp_x,
                y: new[k].stamp_y,
                width: new[k].stamps.difference.width,
                height: new[k].stamps.difference.height,
            }),
            _ => None,
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let n = std::env::var("BLINK_BENCH_BATCH").ok().and_then(|v| v.parse().ok()).unwrap_or(64usize);
    let mut engine = select_engine(EnginePreference::Auto).expect("an engine");
    // llvmpipe is no GPU figure: there the CPU engine is the one the pipeline would want.
    if engine.gpu().is_some_and(|g| g.context().is_software()) {
        eprintln!("stacking bench: {} is a software rasteriser; timing the CPU engine", engine.adapter());
        engine = Box::new(blink::engine::CpuEngine::new());
    }
    let adapter = engine.adapter();
    eprintln!("stacking bench: engine {adapter}, {n} stamps of {SIDE}x{SIDE}, {HISTORY} epochs of history each");
    let b = batch(n, 0);
    // The history: 10 earlier nights per object, made by the same engine (outside the timing).
    let past: Vec<Epoch> = (0..HISTORY)
        .flat_map(|d| {
            let bd = batch(n, d as u64 + 1);
            epochs(engine.as_mut(), &bd, 61000.0 + d as f64, &d.to_string())
        })
        .collect();
    // The resident squares, next to the engine, as the pipeline makes them.
    let ring = RefCell::new(SquareRing::new(ring::Backend::for_engine(engine.as_mut(), HistoryConfig::default().resident_mb << 20)));
    eprintln!("stacking bench: resident squares {} ({} cells)", if matches!(ring.borrow().backend(), ring::Backend::Gpu(_)) { "on the device" } else { "on the host" }, ring.borrow().backend().capacity());
    let now = 61000.0 + HISTORY as f64;
    // A store holding the history, and the ring holding it too (as after a night of running).
    let fresh = || {
        let s = MemoryHistory::new(&HistoryConfig::default()).expect("store");
        let outcomes = s.put_many(&past).expect("history");
        let mut by: std::collections::BTreeMap<String, Vec<Epoch>> = Default::default();
        for (e, o) in past.iter().zip(outcomes) {
            if let blink::history::PutOutcome::Added { object, .. } = o {
                by.entry(object).or_default().push(e.clone());
            }
        }
        let mut r = ring.borrow_mut();
        r.clear();
        for (object, es) in &by {
            assert!(r.fill(object, "r", es, now), "the history fits in the ring");
        }
        s
    };
    // Checked once before timing: every object gets its stacks measured.
    let hits = subtract_and_stack(engine.as_mut(), &b, &fresh(), &mut ring.borrow_mut());
    eprintln!("stacking bench: {hits} stack detections in one batch (a faint source in every stamp)");

    // The ratio, by plain timing (criterion's figures below are the detailed ones).
    let reps = 5;
    let t = Instant::now();
    for _ in 0..reps {
        engine.subtract(&b).expect("subtract");
    }
    let sub = t.elapsed().as_secs_f64() / (reps * n) as f64;
    let mut total = 0.0;
    for _ in 0..reps {
        let store = fresh();
        let mut r = ring.borrow_mut();
        let t = Instant::now();
        subtract_and_stack(engine.as_mut(), &b, &store, &mut r);
        total += t.elapsed().as_secs_f64();
    }
    let both = total / (reps * n) as f64;
    // Where the stacking path's time goes, per alert.
    let (mut t_planes, mut t_engine, mut t_put, mut t_add, mut t_eval, mut t_dispatch) = (0.0, 0.0, 0.0, 0.0, 0.0, 0.0);
    for _ in 0..reps {
        let store = fresh();
        let mut r = ring.borrow_mut();
        let t = Instant::now();
        let squares = engine.subtract_squares(&b, stacking::STORED_HALF).expect("squares");
        t_engine += t.elapsed().as_secs_f64();
        let new = epochs_of(&squares, &b, 61000.0 + HISTORY as f64, "now");
        t_planes += t.elapsed().as_secs_f64();
        let t = Instant::now();
        let outcomes = store.put_many(&new).expect("put");
        t_put += t.elapsed().as_secs_f64();
        let t = Instant::now();
        add_to_ring(&mut r, &new, &outcomes);
        t_add += t.elapsed().as_secs_f64();
        let touched = touched_of(&new, outcomes);
        let t = Instant::now();
        stacking::evaluate(&store, &mut r, &touched, 5.0).expect("evaluate");
        t_eval += t.elapsed().as_secs_f64();
        assert_eq!(r.stats().fills as usize, n, "every object served from the ring");
        // The stacks' own work (on the GPU: the dispatch, its upload of the jobs and the
        // read-back of the sums), without the host's planning and announcement rule.
        let jobs: Vec<_> = touched.iter().filter_map(|t| r.job(&t.object, &t.band, t.mjd, t.x, t.y).map(|(j, _)| j)).collect();
        assert_eq!(jobs.len(), n);
        let t = Instant::now();
        r.measure(&jobs).expect("measure");
        t_dispatch += t.elapsed().as_secs_f64();
    }
    let per = |s: f64| s / (reps * n) as f64 * 1e6;
    eprintln!(
        "stacking bench [{adapter}]: per alert, subtract with squares {:.1} us (the engine's call {:.1}, the epochs' stamps {:.1}), store {:.1} us, squares into the ring {:.1} us, stacks and measure {:.1} us",
        per(t_planes),
        per(t_engine),
        per(t_planes - t_engine),
        per(t_put),
        per(t_add),
        per(t_eval)
    );
    eprintln!(
        "stacking bench [{adapter}]: subtract {:.1} us/alert, subtract+stacking {:.1} us/alert: ratio {:.2} (stacking adds {:.0}%)",
        sub * 1e6,
        both * 1e6,
        both / sub,
        (both / sub - 1.0) * 100.0
    );
    // The pipeline runs the engine (subtraction with squares) on its own thread while the sink
    // stores and stacks the batch before: per alert its throughput is set by the slower stage.
    eprintln!(
        "stacking bench [{adapter}]: the stacks' own work {:.2} us/alert, the squares into the ring {:.2} us/alert: {:.1}% of the subtraction alone ({} resident squares)",
        per(t_dispatch),
        per(t_add),
        (per(t_dispatch) + per(t_add)) / (sub * 1e6) * 100.0,
        if matches!(ring.borrow().backend(), ring::Backend::Gpu(_)) { "device" } else { "host" }
    );
    let sink = per(t_put) + per(t_add) + per(t_eval);
    let stage = per(t_planes).max(sink);
    eprintln!(
        "stacking bench [{adapter}]: pipelined, slower stage {:.1} us/alert (engine {:.1}, sink {:.1}): ratio {:.2}",
        stage,
        per(t_planes),
        sink,
        stage / (sub * 1e6)
    );

    let mut g = c.benchmark_group(format!("stacking_{n}x{SIDE}x{SIDE} [{adapter}]"));
    g.sample_size(10);
    g.throughput(Throughput::Elements(n as u64));
    g.bench_function("subtract", |bch| bch.iter(|| engine.subtract(&b).expect("subtract")));
    g.bench_function("subtract+stacking", |bch| {
        bch.iter_batched(fresh, |store| subtract_and_stack(engine.as_mut(), &b, &store, &mut ring.borrow_mut()), BatchSize::PerIteration)
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);

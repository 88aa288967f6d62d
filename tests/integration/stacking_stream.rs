//! Issue 5, the streaming path of stacking: alerts through the pipeline (decode → engine →
//! history → stacks → hub) with a history store. A faint constant source, below threshold in
//! every epoch, is announced from its stack once; a redelivered alert changes nothing and
//! announces nothing, also after a restart on the same file; a failing store dead-letters its
//! batch and the stream goes on.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use blink::alert::Alert;
use blink::config::Config;
use blink::decode::native::encode_native;
use blink::decode::Decoder;
use blink::engine::CpuEngine;
use blink::history::{
    Announcement, Epoch, HistoryConfig, HistoryError, HistoryStats, HistoryStore, MemoryHistory, ObjectHistory,
    PutOutcome, RedbHistory,
};
use blink::metrics::Metrics;
use blink::pipeline::stacking::ANNOUNCE_GROWTH;
use blink::pipeline::{AckToken, Envelope, Pipeline};
use blink::proto::Detection;
use blink::sim::{simulate_alerts, AlertSimConfig};
use blink::sink::grpc::Hub;
use tokio::sync::broadcast;

const THRESHOLD: f64 = 5.0;

/// `n` epochs, one a night, of one object with a constant source of optimal SNR 2.5 per epoch
/// at a sub-pixel position that changes from epoch to epoch (so stacking must align them).
fn faint_object(n: usize, seed: u64) -> Vec<Alert> {
    let cfg = AlertSimConfig { snr_range: (2.5, 2.5001), quiet_fraction: 0.0, template_depth: 100.0, ..Default::default() };
    simulate_alerts(n, seed, &cfg)
        .into_iter()
        .enumerate()
        .map(|(i, mut a)| {
            a.object_id = format!("faint-{seed}");
            a.alert_id = format!("faint-{seed}-{i}");
            a.mjd_tai = 61000.0 + i as f64;
            a.ra = 150.0;
            a.dec = 2.0;
            a.band = "r".into();
            a
        })
        .collect()
}

/// A pipeline on the CPU engine with `history`, and a receiver of everything it publishes.
struct Run {
    pipeline: Pipeline,
    rx: broadcast::Receiver<Arc<Detection>>,
    metrics: Arc<Metrics>,
    offset: i64,
}

impl Run {
    fn start(history: Arc<dyn HistoryStore>) -> Run {
        Run::start_with(history, Box::new(CpuEngine::new()))
    }

    /// [`Run::start`] on `engine`.
    fn start_with(history: Arc<dyn HistoryStore>, engine: Box<dyn blink::engine::Engine>) -> Run {
        let mut cfg = Config::default();
        cfg.batch.max_wait_ms = 5;
        cfg.detect.threshold = THRESHOLD;
        let hub = Hub::new(4096);
        let rx = hub.subscribe();
        let metrics = Arc::new(Metrics::default());
        let decoder = Arc::new(Decoder::new(Default::default()).unwrap());
        let pipeline = Pipeline::start_with_history(
            &cfg,
            decoder,
            engine,
            hub,
            metrics.clone(),
            Some(history),
        )
        .unwrap();
        Run { pipeline, rx, metrics, offset: 0 }
    }

    /// Send one alert as one message, wait until it is done (acked), return what it published.
    async fn send(&mut self, alert: &Alert) -> Vec<Detection> {
        let before = Metrics::get(&self.metrics.messages_done);
        let bytes = encode_native(std::slice::from_ref(alert)).unwrap();
        let token = AckToken { topic: "stack-stream".into(), partition: 0, offset: self.offset };
        self.offset += 1;
        self.pipeline.input.send(Envelope { bytes, token }).await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        while Metrics::get(&self.metrics.messages_done) <= before {
            assert!(Instant::now() < deadline, "alert {} not done in time", alert.alert_id);
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // Everything is published before the ack.
        let mut out = Vec::new();
        while let Ok(d) = self.rx.try_recv() {
            out.push(d.as_ref().clone());
        }
        out
    }
}

struct TempDir(std::path::PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
        let p = std::env::temp_dir().join(format!("blink-stacking-stream-{tag}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faint_source_is_announced_once_from_its_stack_and_redelivery_changes_nothing() {
    let alerts = faint_object(14, 11);
    let dir = TempDir::new("faint");
    let hcfg = HistoryConfig::at(dir.0.join("h.redb"));
    let store: Arc<dyn HistoryStore> = Arc::new(RedbHistory::open(&hcfg).unwrap());
    let mut run = Run::start(store.clone());

    let mut stacks: Vec<(usize, Detection)> = Vec::new();
    for (i, a) in alerts.iter().enumerate() {
        let got = run.send(a).await;
        let epoch: Vec<&Detection> = got.iter().filter(|d| d.timescale == "epoch").collect();
        assert_eq!(epoch.len(), 1, "epoch {i}: one result per alert");
        eprintln!("epoch {i}: score {:.2}", epoch[0].score);
        assert!(epoch[0].score.abs() < THRESHOLD, "epoch {i} alone is detected: {:?}", epoch[0]);
        for d in got.iter().filter(|d| d.timescale != "epoch") {
            eprintln!("epoch {i}: {} score {:.2} flux {:.1} ± {:.1}", d.timescale, d.score, d.flux, d.flux_err);
            assert!(d.timescale.starts_with("stack:") && d.timescale.ends_with('n'), "{}", d.timescale);
            assert_eq!(d.id, format!("native:{}:{}", a.alert_id, d.timescale));
            assert!(d.detected && d.score.abs() >= THRESHOLD && d.alert_id == a.alert_id);
            stacks.push((i, d.clone()));
        }
    }
    assert!(!stacks.is_empty(), "the faint source never rose in a stack");
    // Announced once per window, again only after growing 1.5x: never on two consecutive
    // epochs with a score that did not grow so.
    let mut windows: Vec<&str> = stacks.iter().map(|(_, d)| d.timescale.as_str()).collect();
    windows.sort_unstable();
    windows.dedup();
    for w in windows {
        let mine: Vec<&(usize, Detection)> = stacks.iter().filter(|(_, d)| d.timescale == w).collect();
        for pair in mine.windows(2) {
            assert!(
                pair[1].1.score.abs() >= ANNOUNCE_GROWTH * pair[0].1.score.abs(),
                "{w} announced again at epoch {} ({:.2}) without growing 1.5x from epoch {} ({:.2})",
                pair[1].0,
                pair[1].1.score,
                pair[0].0,
                pair[0].1.score
            );
        }
    }
    let m = &run.metrics;
    assert_eq!(Metrics::get(&m.epochs_stored), alerts.len() as u64);
    assert_eq!(Metrics::get(&m.stack_detections), stacks.len() as u64);
    assert_eq!(Metrics::get(&m.history_errors), 0);

    // The same alert again: its result again (same id), no stack detection, the same history.
    let key = store.find(alerts[0].survey, &alerts[0].object_id, 150.0, 2.0).unwrap().expect("object stored");
    let before = store.object(&key).unwrap();
    let last = alerts.last().unwrap();
    let again = run.send(last).await;
    assert_eq!(again.len(), 1, "a redelivered alert published {again:?}");
    assert_eq!(again[0].id, format!("native:{}", last.alert_id));
    assert_eq!(Metrics::get(&run.metrics.history_duplicates), 1);
    assert_eq!(store.object(&key).unwrap(), before, "a duplicate changed the stored history");
    run.pipeline.finish().await;
    drop(store);

    // A restart on the same file: the announcements are still there, nothing is announced again.
    let store: Arc<dyn HistoryStore> = Arc::new(RedbHistory::open(&hcfg).unwrap());
    assert!(!store.announcements(&key).unwrap().is_empty());
    let mut run = Run::start(store.clone());
    for a in alerts.iter().rev().take(2) {
        let again = run.send(a).await;
        assert!(again.iter().all(|d| d.timescale == "epoch"), "announced again after a restart: {again:?}");
    }
    run.pipeline.finish().await;
}

/// With the GPU engine the squares stay on the device and the stacks are made there
/// (`shaders/ring/ring.wgsl`); with the CPU engine in host memory by the twin. The same faint
/// source gives the same stack detections both ways: the same windows announced at the same
/// epochs, scores within 0.01σ. FAILS without an adapter unless BLINK_ALLOW_NO_GPU=1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gpu_engine_stacks_on_the_device_what_the_cpu_engine_stacks_on_the_host() {
    let Some(gpu) = crate::common::gpu("the_gpu_engine_stacks_on_the_device_what_the_cpu_engine_stacks_on_the_host") else { return };
    let alerts = faint_object(14, 11);
    let mut runs: Vec<Vec<(usize, String, f64)>> = Vec::new();
    let engines: [Box<dyn blink::engine::Engine>; 2] = [Box::new(CpuEngine::new()), Box::new(gpu)];
    for engine in engines {
        let mut run = Run::start_with(Arc::new(MemoryHistory::new(&HistoryConfig::default()).unwrap()), engine);
        let mut stacks = Vec::new();
        for (i, a) in alerts.iter().enumerate() {
            stacks.extend(run.send(a).await.into_iter().filter(|d| d.timescale != "epoch").map(|d| (i, d.timescale, d.score)));
        }
        assert_eq!(Metrics::get(&run.metrics.stacks_from_store), 0, "every object's squares were resident");
        run.pipeline.finish().await;
        runs.push(stacks);
    }
    let (cpu, gpu) = (&runs[0], &runs[1]);
    eprintln!("stack detections, CPU engine: {cpu:?}");
    eprintln!("stack detections, GPU engine: {gpu:?}");
    assert!(cpu.len() >= 3, "the faint source rose in too few stacks: {cpu:?}");
    assert_eq!(cpu.iter().map(|(i, t, _)| (i, t)).collect::<Vec<_>>(), gpu.iter().map(|(i, t, _)| (i, t)).collect::<Vec<_>>());
    for ((_, t, a), (_, _, b)) in cpu.iter().zip(gpu) {
        assert!((a - b).abs() <= 0.01, "{t}: {a} on the host, {b} on the device");
    }
}

/// A store whose next `put_many` fails when armed.
struct Flaky {
    inner: MemoryHistory,
    fail: AtomicBool,
}

impl HistoryStore for Flaky {
    fn put_many(&self, epochs: &[Epoch]) -> Result<Vec<PutOutcome>, HistoryError> {
        if self.fail.swap(false, Ordering::SeqCst) {
            return Err(HistoryError::Internal("injected failure".into()));
        }
        self.inner.put_many(epochs)
    }
    fn find(&self, s: blink::alert::Survey, id: &str, ra: f64, dec: f64) -> Result<Option<String>, HistoryError> {
        self.inner.find(s, id, ra, dec)
    }
    fn object(&self, key: &str) -> Result<Option<ObjectHistory>, HistoryError> {
        self.inner.object(key)
    }
    fn stats(&self) -> Result<HistoryStats, HistoryError> {
        self.inner.stats()
    }
    fn announcements(&self, object: &str) -> Result<Vec<Announcement>, HistoryError> {
        self.inner.announcements(object)
    }
    fn record_announcements(&self, list: &[(String, Announcement)]) -> Result<(), HistoryError> {
        self.inner.record_announcements(list)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_error_dead_letters_the_batch_and_the_stream_goes_on() {
    let alerts = faint_object(3, 12);
    let flaky = Arc::new(Flaky { inner: MemoryHistory::new(&HistoryConfig::default()).unwrap(), fail: AtomicBool::new(true) });
    let mut run = Run::start(flaky.clone());
    let got = run.send(&alerts[0]).await;
    assert!(got.is_empty(), "a batch whose history put failed published {got:?}");
    assert_eq!(run.metrics.dead_letters().get("history"), Some(&1));
    assert_eq!(Metrics::get(&run.metrics.history_errors), 1);
    assert_eq!(flaky.stats().unwrap().epochs, 0);
    for a in &alerts[1..] {
        let got = run.send(a).await;
        assert_eq!(got.iter().filter(|d| d.timescale == "epoch").count(), 1, "the stream stopped");
    }
    assert_eq!(Metrics::get(&run.metrics.epochs_stored), 2);
    assert_eq!(flaky.stats().unwrap().epochs, 2);
    assert_eq!(run.metrics.dead_letter_total(), 1);
    run.pipeline.finish().await;
}

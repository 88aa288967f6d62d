//! The streaming pipeline: envelope → decode → prepare → batch → engine → sinks, each stage a task
//! joined to the next by a bounded channel (backpressure is structural).
//!
//! ```text
//!  source ──Envelope──► decode+prepare ──Item──► batcher ──Batch──► engine thread ──► sink
//!    ▲                      │ (dead letters)                                          │
//!    └──── commits ◄──── AckTracker ◄────────────── done(token) ◄─────────────────────┘
//! ```
//! Every unit derived from a message (one result per alert, or one dead letter) is counted by the
//! [`ack::AckTracker`]; the source commits an offset only when all earlier units are delivered.
//!
//! With a history store ([`Pipeline::start_with_history`]) the engine also returns each
//! stamp's planes cut to the square the history keeps (`Engine::subtract_squares`), and the
//! sink stores the batch's epochs in one durable commit before it acks
//! them, then measures the touched objects' window stacks ([`stacking`]).

pub mod ack;
pub mod deadletter;
pub mod ring;
pub mod stacking;

use std::collections::HashMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, Notify};
use tokio::task::JoinHandle;

use crate::alert::{Alert, Survey};
use crate::config::Config;
use crate::decode::{DecodeError, Decoder};
use crate::engine::{self, Engine, PrepareConfig, PreparedStamp, SubtractionResult};
use crate::history::{Epoch, HistoryStore, Measurement, PutOutcome};
use crate::metrics::Metrics;
use crate::sink::grpc::Hub;
use crate::sink::Output;
pub use ack::{AckToken, AckTracker};
use deadletter::DeadLetterSink;

/// One input message and where it came from.
#[derive(Debug, Clone)]
pub struct Envelope {
    pub bytes: Vec<u8>,
    pub token: AckToken,
}

/// What a result needs to know of its alert once the stamps are gone.
#[derive(Debug, Clone)]
pub struct AlertMeta {
    pub survey: Survey,
    pub alert_id: String,
    pub object_id: String,
    pub ra: f64,
    pub dec: f64,
    pub mjd_tai: f64,
    pub band: String,
    pub survey_snr: Option<f64>,
    /// The candidate's sub-pixel position in the stamps (0-based, x = column).
    pub stamp_x: f64,
    pub stamp_y: f64,
}

impl AlertMeta {
    fn of(a: &Alert) -> AlertMeta {
        AlertMeta {
            survey: a.survey,
            alert_id: a.alert_id.clone(),
            object_id: a.object_id.clone(),
            ra: a.ra,
            dec: a.dec,
            mjd_tai: a.mjd_tai,
            band: a.band.clone(),
            survey_snr: a.candidate.survey_snr,
            stamp_x: a.candidate.stamp_x,
            stamp_y: a.candidate.stamp_y,
        }
    }
}

/// A decoded, prepared alert on its way to a batch.
struct Item {
    token: AckToken,
    meta: AlertMeta,
    stamp: PreparedStamp,
    arrived: Instant,
}

/// A result leaving the engine.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub token: AckToken,
    pub meta: AlertMeta,
    pub result: SubtractionResult,
    pub detected: bool,
    /// This alert's epoch created its object in the history store (false without a store).
    pub new_object: bool,
}

/// Commit points waiting for the source, coalesced per partition (bounded by the partition count).
#[derive(Debug, Default)]
pub struct CommitQueue {
    points: Mutex<HashMap<(String, i32), i64>>,
    pub notify: Notify,
}

impl CommitQueue {
    pub(crate) fn push(&self, topic: &str, partition: i32, offset: i64) {
        let mut map = self.points.lock().unwrap_or_else(|p| p.into_inner());
        let e = map.entry((topic.to_owned(), partition)).or_insert(offset);
        *e = (*e).max(offset);
        drop(map);
        self.notify.notify_one();
    }

    /// Everything to commit now: (topic, partition, next offset to read).
    pub fn take(&self) -> Vec<(String, i32, i64)> {
        let mut map = self.points.lock().unwrap_or_else(|p| p.into_inner());
        map.drain().map(|((t, p), o)| (t, p, o)).collect()
    }
}

/// Shared by the stages that finish units.
struct Acks {
    tracker: Mutex<AckTracker>,
    commits: Arc<CommitQueue>,
    metrics: Arc<Metrics>,
}

impl Acks {
    fn register(&self, token: &AckToken, units: usize) {
        let advanced = self.tracker.lock().unwrap_or_else(|p| p.into_inner()).register(token, units);
        if let Some(offset) = advanced {
            Metrics::inc(&self.metrics.messages_done);
            self.commits.push(&token.topic, token.partition, offset);
        } else if units == 0 {
            Metrics::inc(&self.metrics.messages_done);
        }
    }

    fn done(&self, token: &AckToken) {
        let (advanced, complete) =
            self.tracker.lock().unwrap_or_else(|p| p.into_inner()).done(token);
        if complete {
            Metrics::inc(&self.metrics.messages_done);
        }
        if let Some(offset) = advanced {
            self.commits.push(&token.topic, token.partition, offset);
        }
    }
}

/// A running pipeline: feed it envelopes, read commit points, await it after dropping `input`.
pub struct Pipeline {
    pub input: mpsc::Sender<Envelope>,
    pub commits: Arc<CommitQueue>,
    tasks: Vec<JoinHandle<()>>,
    engine_thread: std::thread::JoinHandle<()>,
}

impl Pipeline {
    /// Start every stage. `engine` moves to a dedicated thread (GPU submission blocks).
    /// No history store: single-epoch results only.
    pub fn start(
        cfg: &Config,
        decoder: Arc<Decoder>,
        engine: Box<dyn Engine>,
        hub: Hub,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<Pipeline> {
        Pipeline::start_with_history(cfg, decoder, engine, hub, metrics, None)
    }

    /// [`Pipeline::start`], with `history` (when given) keeping every processed alert's epoch
    /// and the stack detections published from it.
    pub fn start_with_history(
        cfg: &Config,
        decoder: Arc<Decoder>,
        engine: Box<dyn Engine>,
        hub: Hub,
        metrics: Arc<Metrics>,
        history: Option<Arc<dyn HistoryStore>>,
    ) -> std::io::Result<Pipeline> {
        Pipeline::start_with_outputs(cfg, decoder, engine, hub, metrics, history, Vec::new())
    }

    /// [`Pipeline::start_with_history`], every batch's detections also handed to `outputs`
    /// (in order, each durable) before the batch is acknowledged.
    pub fn start_with_outputs(
        cfg: &Config,
        decoder: Arc<Decoder>,
        mut engine: Box<dyn Engine>,
        hub: Hub,
        metrics: Arc<Metrics>,
        history: Option<Arc<dyn HistoryStore>>,
        outputs: Vec<Arc<dyn Output>>,
    ) -> std::io::Result<Pipeline> {
        // The squares the stacks are made from, next to the engine (`pipeline::ring`).
        let ring = history.as_ref().map(|_| {
            let backend = ring::Backend::for_engine(engine.as_mut(), cfg.history.resident_mb << 20);
            tracing::info!(cells = backend.capacity(), gpu = matches!(backend, ring::Backend::Gpu(_)), "resident squares for the stacks");
            Arc::new(Mutex::new(ring::SquareRing::new(backend)))
        });
        let cap = cfg.batch.channel_capacity;
        let (input, envelopes) = mpsc::channel::<Envelope>(cap);
        let (items_tx, items_rx) = mpsc::channel::<Item>(cap);
        let (batches_tx, batches_rx) = mpsc::channel::<Vec<Item>>(4);
        let (outcomes_tx, outcomes_rx) = mpsc::channel::<Outcomes>(4);
        let commits = Arc::new(CommitQueue::default());
        let acks = Arc::new(Acks {
            tracker: Mutex::new(AckTracker::default()),
            commits: commits.clone(),
            metrics: metrics.clone(),
        });
        let dead = Arc::new(DeadLetterSink::open(cfg.dead_letter.file.as_deref(), metrics.clone())?);

        let decode = tokio::spawn(decode_stage(
            envelopes,
            items_tx,
            decoder,
            acks.clone(),
            dead.clone(),
            metrics.clone(),
        ));
        let batcher = tokio::spawn(batch_stage(
            items_rx,
            batches_tx,
            cfg.batch.max_alerts,
            Duration::from_millis(cfg.batch.max_wait_ms),
        ));
        let engine_thread = std::thread::Builder::new()
            .name("blink-engine".into())
            .spawn({
                let planes = history.is_some();
                move || engine_stage(engine, batches_rx, outcomes_tx, planes)
            })?;
        let sink = tokio::spawn(sink_stage(
            outcomes_rx,
            hub,
            acks,
            dead,
            metrics,
            cfg.detect.threshold,
            history.zip(ring),
            outputs,
        ));
        Ok(Pipeline { input, commits, tasks: vec![decode, batcher, sink], engine_thread })
    }

    /// Drain: close the input, let every stage finish what it holds.
    pub async fn finish(self) {
        drop(self.input);
        for t in self.tasks {
            let _ = t.await;
        }
        let _ = tokio::task::spawn_blocking(move || self.engine_thread.join()).await;
    }
}

async fn decode_stage(
    mut envelopes: mpsc::Receiver<Envelope>,
    items: mpsc::Sender<Item>,
    decoder: Arc<Decoder>,
    acks: Arc<Acks>,
    dead: Arc<DeadLetterSink>,
    metrics: Arc<Metrics>,
) {
    let prep = Arc::new(PrepareConfig::default());
    while let Some(env) = envelopes.recv().await {
        Metrics::inc(&metrics.messages_in);
        let decoder = decoder.clone();
        let prep = prep.clone();
        let bytes = env.bytes;
        // Decoding and stamp preparation are CPU work: keep them off the async workers.
        let decoded = tokio::task::spawn_blocking(move || {
            decoder
                .decode_message(&bytes)
                .into_iter()
                .map(|r| {
                    let alert = r.map_err(Rejected::Decode)?;
                    let meta = AlertMeta::of(&alert);
                    engine::prepare_stamp(&alert, &prep)
                        .map(|stamp| (meta.clone(), stamp))
                        .map_err(|e| Rejected::Stamp(meta, e.to_string()))
                })
                .collect::<Vec<_>>()
        })
        .await;
        let decoded = match decoded {
            Ok(d) => d,
            Err(join) => vec![Err(Rejected::Panic(join.to_string()))],
        };
        metrics.alerts_in.fetch_add(decoded.len() as u64, Relaxed);
        acks.register(&env.token, decoded.len());
        for unit in decoded {
            match unit {
                Ok((meta, stamp)) => {
                    let item = Item { token: env.token.clone(), meta, stamp, arrived: Instant::now() };
                    if items.send(item).await.is_err() {
                        return;
                    }
                }
                Err(rejected) => {
                    dead.deliver(&env.token, rejected.reason(), &rejected.to_string());
                    acks.done(&env.token);
                }
            }
        }
    }
}

/// Why an alert did not reach the engine.
#[derive(Debug)]
enum Rejected {
    Decode(DecodeError),
    Stamp(AlertMeta, String),
    Panic(String),
}

impl Rejected {
    fn reason(&self) -> &str {
        match self {
            Rejected::Decode(e) => e.reason(),
            Rejected::Stamp(..) => "stamp",
            Rejected::Panic(_) => "internal",
        }
    }
}

impl std::fmt::Display for Rejected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Rejected::Decode(e) => write!(f, "{e}"),
            Rejected::Stamp(m, e) => write!(f, "{} alert {}: {e}", m.survey, m.alert_id),
            Rejected::Panic(e) => write!(f, "decoder panicked: {e}"),
        }
    }
}

/// Group items by stamp shape; flush a group at `max_alerts` or when its oldest item waited
/// `max_wait`; flush everything when the input closes.
async fn batch_stage(
    mut items: mpsc::Receiver<Item>,
    batches: mpsc::Sender<Vec<Item>>,
    max_alerts: usize,
    max_wait: Duration,
) {
    let mut groups: HashMap<(usize, usize), Vec<Item>> = HashMap::new();
    let tick = (max_wait / 2).max(Duration::from_millis(1));
    loop {
        let next = tokio::time::timeout(tick, items.recv()).await;
        match next {
            Ok(Some(item)) => {
                let shape = item.stamp.shape();
                let group = groups.entry(shape).or_default();
                group.push(item);
                if group.len() >= max_alerts {
                    let full = std::mem::take(group);
                    if batches.send(full).await.is_err() {
                        return;
                    }
                }
            }
            Ok(None) => {
                for (_, group) in groups.drain() {
                    if !group.is_empty() && batches.send(group).await.is_err() {
                        return;
                    }
                }
                return;
            }
            Err(_elapsed) => {}
        }
        let now = Instant::now();
        let due: Vec<_> = groups
            .iter()
            .filter(|(_, g)| g.first().is_some_and(|i| now.duration_since(i.arrived) >= max_wait))
            .map(|(k, _)| *k)
            .collect();
        for key in due {
            if let Some(group) = groups.remove(&key) {
                if batches.send(group).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// The resident squares, shared by the sink's store and stacking steps.
type SharedRing = Arc<Mutex<ring::SquareRing>>;

/// One alert's engine output: the result and, when a history store is on, its stored square.
type Processed = Result<(SubtractionResult, Option<stacking::StoredStamps>), String>;
type Outcomes = Vec<((AckToken, AlertMeta), Processed)>;

/// Runs on its own thread: assemble each batch, run the engine, pass results on. With
/// `planes`, the engine also returns each stamp's square for the history store.
fn engine_stage(
    mut engine: Box<dyn Engine>,
    mut batches: mpsc::Receiver<Vec<Item>>,
    outcomes: mpsc::Sender<Outcomes>,
    planes: bool,
) {
    while let Some(items) = batches.blocking_recv() {
        let (items, stamps): (Vec<(AckToken, AlertMeta)>, Vec<PreparedStamp>) =
            items.into_iter().map(|i| ((i.token, i.meta), i.stamp)).unzip();
        let batch = engine::assemble(&stamps);
        let run = if planes {
            engine.subtract_squares(&batch, stacking::STORED_HALF).map(|sq| {
                let stamps = (0..batch.n)
                    .map(|s| {
                        let params = batch.params.get(s)?;
                        stacking::epoch_stamps(&sq, s, params)
                    })
                    .collect::<Vec<_>>();
                sq.results.iter().copied().zip(stamps).collect::<Vec<_>>()
            })
        } else {
            engine.subtract(&batch).map(|r| r.into_iter().map(|r| (r, None)).collect())
        };
        let results: Vec<Processed> = match run {
            Ok(r) if r.len() == items.len() => r.into_iter().map(Ok).collect(),
            Ok(r) => {
                let msg = format!("engine returned {} results for {} stamps", r.len(), items.len());
                items.iter().map(|_| Err(msg.clone())).collect()
            }
            Err(e) => {
                tracing::error!(error = %e, stamps = items.len(), "engine failed on a batch");
                items.iter().map(|_| Err(e.to_string())).collect()
            }
        };
        if outcomes.blocking_send(items.into_iter().zip(results).collect()).is_err() {
            return;
        }
    }
}

/// Publish each batch's results and ack them. With a history store, the batch's epochs are
/// stored first in one durable commit (so a crash repeats at most unacknowledged alerts); if
/// that fails the batch's alerts become dead letters (`history`) and the stream goes on. Then
/// the touched objects' stacks are measured and announced, and only then is the batch acked.
async fn sink_stage(
    mut outcomes: mpsc::Receiver<Outcomes>,
    hub: Hub,
    acks: Arc<Acks>,
    dead: Arc<DeadLetterSink>,
    metrics: Arc<Metrics>,
    threshold: f64,
    history: Option<(Arc<dyn HistoryStore>, SharedRing)>,
    outputs: Vec<Arc<dyn Output>>,
) {
    while let Some(batch) = outcomes.recv().await {
        Metrics::inc(&metrics.batches);
        let mut good: Vec<(Outcome, Option<stacking::StoredStamps>)> = Vec::with_capacity(batch.len());
        for ((token, meta), result) in batch {
            match result {
                Ok((result, stamps)) if result.score.is_finite() => {
                    let detected = f64::from(result.score).abs() >= threshold;
                    good.push((Outcome { token, meta, result, detected, new_object: false }, stamps));
                }
                Ok((result, _)) => {
                    let msg = format!(
                        "{} alert {}: non-finite score {}",
                        meta.survey, meta.alert_id, result.score
                    );
                    dead.deliver(&token, "engine", &msg);
                    acks.done(&token);
                }
                Err(e) => {
                    dead.deliver(&token, "engine", &e);
                    acks.done(&token);
                }
            }
        }
        let mut touched = Vec::new();
        if let Some((h, r)) = history.as_ref().filter(|_| !good.is_empty()) {
            match store(h.clone(), r, &good, &metrics).await {
                Ok((t, created)) => {
                    touched = t;
                    for i in created {
                        if let Some((o, _)) = good.get_mut(i) {
                            o.new_object = true;
                        }
                    }
                }
                Err(e) => {
                    Metrics::inc(&metrics.history_errors);
                    tracing::error!(error = %e, alerts = good.len(), "history store failed; the batch goes to dead letters");
                    for (o, _) in &good {
                        let msg = format!("{} alert {}: {e}", o.meta.survey, o.meta.alert_id);
                        dead.deliver(&o.token, "history", &msg);
                        acks.done(&o.token);
                    }
                    continue;
                }
            }
        }
        let mut published = Vec::with_capacity(good.len());
        for (o, _) in &good {
            published.push(hub.publish(o));
            Metrics::inc(&metrics.results_out);
            if o.detected {
                Metrics::inc(&metrics.detected);
            }
        }
        if let Some((h, r)) = history.as_ref().filter(|_| !touched.is_empty()) {
            published.extend(announce_stacks(h.clone(), r.clone(), touched, &good, &hub, &metrics, threshold).await);
        }
        let mut delivered = true;
        for out in &outputs {
            delivered &= deliver(out.as_ref(), &published, &metrics).await;
        }
        if !delivered {
            // Not acknowledged: the commit point stays before these messages, so a restart
            // reads them again (consumers drop the repeats by id).
            continue;
        }
        for (o, _) in &good {
            acks.done(&o.token);
        }
    }
}

/// Attempts at handing one batch to an output, with doubling waits from
/// [`OUTPUT_FIRST_WAIT`] between them.
const OUTPUT_ATTEMPTS: u32 = 6;
const OUTPUT_FIRST_WAIT: Duration = Duration::from_millis(200);

/// Hand `published` to `out`, trying again after a failure; false when every attempt failed.
async fn deliver(out: &dyn Output, published: &[Arc<crate::proto::Detection>], metrics: &Metrics) -> bool {
    if published.is_empty() {
        return true;
    }
    let mut wait = OUTPUT_FIRST_WAIT;
    for attempt in 1..=OUTPUT_ATTEMPTS {
        match out.deliver(published).await {
            Ok(()) => return true,
            Err(e) => {
                Metrics::inc(&metrics.output_errors);
                let last = attempt == OUTPUT_ATTEMPTS;
                tracing::error!(output = out.name(), attempt, error = %e, gave_up = last, "output failed");
                if !last {
                    tokio::time::sleep(wait).await;
                    wait *= 2;
                }
            }
        }
    }
    tracing::error!(
        output = out.name(),
        detections = published.len(),
        "output still failing: the batch stays unacknowledged (its messages are read again after a restart)"
    );
    false
}

/// Store the epochs of `good` in one commit and put the added ones' squares into the ring; the
/// objects they went to (added, or already there) are returned for stacking, with the indices
/// in `good` of the alerts that created their object.
async fn store(
    h: Arc<dyn HistoryStore>,
    ring: &Mutex<ring::SquareRing>,
    good: &[(Outcome, Option<stacking::StoredStamps>)],
    metrics: &Metrics,
) -> Result<(Vec<stacking::Touched>, Vec<usize>), String> {
    let mut epochs = Vec::with_capacity(good.len());
    let mut index = Vec::with_capacity(good.len());
    for (i, (o, stored)) in good.iter().enumerate() {
        let Some(stored) = stored else { continue };
        let m = &o.meta;
        epochs.push(Epoch {
            survey: m.survey,
            alert_id: m.alert_id.clone(),
            object_id: m.object_id.clone(),
            band: m.band.clone(),
            mjd: m.mjd_tai,
            ra: m.ra,
            dec: m.dec,
            // On the stored square, not the alert's stamp.
            stamp_x: stored.x,
            stamp_y: stored.y,
            stamps: stored.stamps.clone(),
            measurement: Measurement::from(&o.result),
        });
        index.push(i);
    }
    let shapes: Vec<(usize, usize, f64, f64)> =
        epochs.iter().map(|e| (e.stamps.difference.width, e.stamps.difference.height, e.stamp_x, e.stamp_y)).collect();
    // redb commits with an fsync: off the async workers.
    let outcomes = tokio::task::spawn_blocking(move || h.put_many(&epochs))
        .await
        .map_err(|e| format!("history task failed: {e}"))?
        .map_err(|e| e.to_string())?;
    let mut touched = Vec::new();
    let mut created = Vec::new();
    let mut ring = ring.lock().unwrap_or_else(|p| p.into_inner());
    for ((i, out), (width, height, x, y)) in index.into_iter().zip(outcomes).zip(shapes) {
        let Some((o, stored)) = good.get(i) else { continue };
        let object = match out {
            PutOutcome::Added { object, new_object } => {
                Metrics::inc(&metrics.epochs_stored);
                if new_object {
                    created.push(i);
                }
                if let Some(st) = stored {
                    let s = &st.stamps;
                    let sq = ring::NewSquare {
                        alert_id: &o.meta.alert_id,
                        mjd: o.meta.mjd_tai,
                        x,
                        y,
                        sigma: st.sigma,
                        half: (s.psf.width / 2) as u32,
                        planes: [&s.difference.data, &s.variance.data, &s.template_variance.data],
                    };
                    ring.add(&object, &o.meta.band, &sq, new_object);
                }
                object
            }
            // Evaluated again: if the first delivery stored the epoch but died before its
            // announcements were recorded, this one makes them; otherwise the recorded
            // announcements keep it from publishing twice.
            PutOutcome::Duplicate { object } => {
                Metrics::inc(&metrics.history_duplicates);
                object
            }
            PutOutcome::Expired => continue,
            PutOutcome::Rejected(reason) => {
                tracing::warn!(alert_id = %o.meta.alert_id, %reason, "epoch not stored in the history");
                continue;
            }
        };
        touched.push(stacking::Touched {
            index: i,
            object,
            band: o.meta.band.clone(),
            mjd: o.meta.mjd_tai,
            x,
            y,
            width,
            height,
        });
    }
    Ok((touched, created))
}

/// Measure the touched objects' stacks, publish what is to be announced, record it; the
/// detections published.
async fn announce_stacks(
    h: Arc<dyn HistoryStore>,
    ring: Arc<Mutex<ring::SquareRing>>,
    touched: Vec<stacking::Touched>,
    good: &[(Outcome, Option<stacking::StoredStamps>)],
    hub: &Hub,
    metrics: &Metrics,
    threshold: f64,
) -> Vec<Arc<crate::proto::Detection>> {
    let store = h.clone();
    let run = tokio::task::spawn_blocking(move || {
        let mut ring = ring.lock().unwrap_or_else(|p| p.into_inner());
        let r = stacking::evaluate(&*store, &mut ring, &touched, threshold);
        (r, ring.stats())
    })
    .await
    .map(|(r, stats)| {
        use std::sync::atomic::Ordering::Relaxed;
        metrics.stacks_from_store.store(stats.fills, Relaxed);
        metrics.resident_evictions.store(stats.evictions, Relaxed);
        r
    });
    let (hits, record) = match run {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            Metrics::inc(&metrics.history_errors);
            tracing::error!(error = %e, "stacking: history read failed");
            return Vec::new();
        }
        Err(e) => {
            tracing::error!(error = %e, "stacking task failed");
            return Vec::new();
        }
    };
    let mut published = Vec::with_capacity(hits.len());
    for hit in &hits {
        let Some((o, _)) = good.get(hit.index) else { continue };
        let m = &hit.measurement;
        published.push(hub.publish_stack(o, &stacking::timescale(hit.nights), m.score, m.flux, m.flux_err));
        Metrics::inc(&metrics.stack_detections);
        tracing::debug!(object = %hit.object, band = %hit.band, nights = hit.nights, epochs = hit.epochs, score = m.score, "stack detection");
    }
    if record.is_empty() {
        return published;
    }
    // Recorded after publishing: a crash in between announces again on replay (at least once).
    match tokio::task::spawn_blocking(move || h.record_announcements(&record)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            Metrics::inc(&metrics.history_errors);
            tracing::error!(error = %e, "stacking: announcements not recorded");
        }
        Err(e) => tracing::error!(error = %e, "announcement task failed"),
    }
    published
}

//! Alerts mode of `blink bench`: the night's Avro alerts replayed through the same pipeline as
//! `serve` (embedded Kafka by default), timed from publish to gRPC delivery, and scored against
//! the truth table.
//!
//! # What is measured
//! - **Latency** of one alert: from the instant its message is handed to the Kafka producer
//!   (`FutureProducer::send_result` accepting it into librdkafka's queue) to the instant the gRPC
//!   subscriber on loopback has decoded its `Detection` (matched by `alert_id`, which is unique in
//!   a night). It includes the producer's linger (5 ms), the broker round trip, the consumer's
//!   fetch, decoding, batching (up to `batch.max_wait_ms`), the engine, the hub and gRPC.
//! - Every alert is published **as fast as the producer takes them** (a burst, the way a survey
//!   dumps a frame's alerts at once), so the latency is mostly queueing: the last alert waits
//!   for all those ahead of it, and p50 ≈ half the wall time when the engine is the bottleneck.
//!   That is the honest worst case for a night arriving at once, not the latency of one alert
//!   on an idle service (p50 of a small night approaches that).
//! - **Throughput**: alerts published / wall time, the wall time running from the first publish
//!   to the last result delivered (or the last message accounted for, when a dead letter came
//!   last).
//! - **Warm-up**: the consumer group's join takes about 3 s on the embedded cluster (longer with
//!   the many partitions a large night needs there: 20 s for 160). The consumer
//!   starts at the end of the topic (`auto.offset.reset = latest`), and the night's first
//!   decodable alert is published every 250 ms until a result for it comes back; the bench waits
//!   for every copy of it that the consumer will see and for the pipeline to be idle, then takes
//!   a snapshot of the counters. Only what comes after is measured, so the join and the first
//!   engine dispatch are left out (`join_s` reports the former).
//! - **Embedded Kafka**: librdkafka's mock broker keeps only 5 MiB per partition and answers an
//!   empty fetch only after the consumer's whole `fetch.wait.max.ms`; the bench gives the topic
//!   enough partitions to hold the night and sets that wait to 5 ms (`embedded_settings`), so
//!   the figures are blink's, not the mock's. A real cluster is used as configured.
//! - **Scores**: each alert's `objectId` is the truth `id` of what raised it
//!   (`docs/night-format.md`), so its kind comes from `truth.csv`. Completeness: share of the
//!   alerts raised on transients and variable stars whose |score| reached the threshold (a dead
//!   letter counts as missed). Purity: of the alerts at or above the threshold, the share raised
//!   on transients and variable stars.
//!
//! [`run`] is async and needs tokio's multi-thread runtime (the Service, the gRPC client and the
//! publisher run side by side).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use rdkafka::error::{KafkaError as RdKafkaError, RDKafkaErrorCode};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use serde::Serialize;
use tokio::sync::mpsc;

use crate::config::Config;
use crate::decode::Decoder;
use crate::engine::EnginePreference;
use crate::metrics::Metrics;
use crate::proto::blink_client::BlinkClient;
use crate::proto::{Detection, SubscribeRequest};
use crate::service::{self, Service};
use crate::sim::night::manifest::Manifest;
use crate::sim::night::truth;
use crate::source::kafka::{self, EmbeddedKafka};
use crate::source::replay::split_container;

/// Alerts of one truth kind and how many blink scored at or above the threshold.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct KindCount {
    pub alerts: usize,
    pub detected: usize,
}

/// What alerts mode measured.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct AlertsSummary {
    /// Engine adapter, e.g. "Vulkan | NVIDIA H200 | DiscreteGpu" or "cpu".
    pub adapter: String,
    pub alerts_published: usize,
    /// Published alerts whose result reached the gRPC subscriber (each counted once).
    pub results_received: usize,
    /// Dead letters by reason.
    pub dead_letters: BTreeMap<String, u64>,
    /// From the first alert handed to the producer (the pipeline already consuming) to the last
    /// result delivered, seconds.
    pub wall_s: f64,
    pub alerts_per_s: f64,
    /// Publish → gRPC delivery, milliseconds (NaN when nothing was delivered).
    pub latency_ms_p50: f64,
    pub latency_ms_p95: f64,
    pub latency_ms_p99: f64,
    pub latency_ms_max: f64,
    /// |score| at or above this counts as detected.
    pub threshold: f64,
    /// Detected share of the alerts raised on transients and variable stars (NaN when none).
    pub completeness: f64,
    /// Share of detected alerts that are transients or variable stars (NaN when none detected).
    pub purity: f64,
    /// Per truth kind (fast, sn, slow, variable, cosmic, hot_pixel, …).
    pub by_kind: BTreeMap<String, KindCount>,
    /// Seconds the producer took to accept every alert (the burst).
    pub publish_s: f64,
    /// Seconds from starting the service to the first warm-up result (group join included).
    pub join_s: f64,
    /// Results that arrived again for an alert already delivered (at-least-once).
    pub duplicates: usize,
    /// Results for alert ids this run did not publish (e.g. other traffic on a shared topic).
    pub unexpected: usize,
    /// "native" (`alerts/<stem>.avro`) or "ztf" (`alerts/<stem>.ztf.avro`).
    pub packets: String,
}

/// How to run alerts mode.
#[derive(Debug, Clone)]
pub struct AlertsOptions {
    /// "embedded" (librdkafka's in-process cluster) or a bootstrap list `host:port[,host:port]`.
    /// On a real cluster the topic must exist or be auto-created.
    pub kafka: String,
    /// Topic published to and consumed from.
    pub topic: String,
    /// |score| at or above this counts as detected (also the service's `detect.threshold`).
    pub threshold: f64,
    /// Give up (with an error saying how far it got) after this long, warm-up included.
    pub timeout: Duration,
    /// Engine for the service.
    pub engine: EnginePreference,
    /// Publish the ZTF-shaped packets (`<stem>.ztf.avro`) instead of blink's own.
    pub ztf: bool,
    /// Everything else the service reads (batching, decode limits, …). `kafka.topics`,
    /// `kafka.group_id`, `kafka.auto_offset_reset`, `grpc.listen`, `engine.prefer` and
    /// `detect.threshold` are set by the bench; `grpc.subscriber_buffer` is raised to hold the
    /// whole night, so a slow moment of the subscriber cannot cut the measurement short.
    pub config: Config,
}

impl Default for AlertsOptions {
    fn default() -> Self {
        AlertsOptions {
            kafka: "embedded".into(),
            topic: "blink-bench-alerts".into(),
            threshold: 5.0,
            timeout: Duration::from_secs(600),
            engine: EnginePreference::Auto,
            ztf: false,
            config: Config::default(),
        }
    }
}

/// One alert to publish, with what it is.
struct Planned {
    key: String,
    payload: Vec<u8>,
    /// `None` when the message does not decode (it will end as a dead letter).
    alert_id: Option<String>,
    kind: String,
}

/// Transients and variable stars: what a detector should find.
fn is_real(kind: &str) -> bool {
    matches!(kind, "fast" | "sn" | "slow" | "variable")
}

/// The kind the id ranges of `docs/night-format.md` imply, for ids absent from the truth table.
fn kind_from_id(id: u64) -> &'static str {
    match id {
        1..=999_999 => "star",
        1_000_000..=1_999_999 => "galaxy",
        2_000_000..=2_999_999 => "transient",
        3_000_000..=3_999_999 => "variable",
        4_000_000..=4_999_999 => "cosmic",
        5_000_000..=5_999_999 => "hot_pixel",
        6_000_000..=6_999_999 => "bad_column",
        _ => "unknown",
    }
}

fn engine_name(e: EnginePreference) -> &'static str {
    match e {
        EnginePreference::Auto => "auto",
        EnginePreference::Gpu => "gpu",
        EnginePreference::Cpu => "cpu",
    }
}

/// Read the manifest, the truth table and every frame's alert container; split the containers
/// into one message per alert and find each alert's id and truth kind.
fn load_night(night: &Path, ztf: bool, decoder: &Decoder) -> anyhow::Result<Vec<Planned>> {
    let (dir, manifest_path): (PathBuf, PathBuf) = if night.is_file() {
        (night.parent().unwrap_or(Path::new(".")).to_path_buf(), night.to_path_buf())
    } else {
        (night.to_path_buf(), night.join("manifest.toml"))
    };
    if !manifest_path.exists() {
        anyhow::bail!("{}: no such file: not a night folder (docs/night-format.md)", manifest_path.display());
    }
    let manifest = Manifest::read(&manifest_path).map_err(|e| anyhow::anyhow!("{e}"))?;
    let alerts = manifest.alerts.as_deref().ok_or_else(|| {
        anyhow::anyhow!(
            "{}: no `alerts` key: this night has no alert files to replay (blink simulate writes them unless --no-alerts)",
            manifest_path.display()
        )
    })?;
    let truth_file = manifest.truth.as_deref().ok_or_else(|| {
        anyhow::anyhow!(
            "{}: no `truth` key: alerts mode needs a truth table (truth.csv) to score the alerts",
            manifest_path.display()
        )
    })?;
    let truth_path = dir.join(truth_file);
    let rows = truth::read(&truth_path).map_err(|e| anyhow::anyhow!("{e}"))?;
    // Looked up by (frame, id) first: ids are not unique across kinds on long nights (blink
    // simulate's per-epoch cosmic-ray ids run into the hot-pixel and bad-column ranges after
    // epoch 10 and 20). Where one id has several kinds, the one that raises alerts
    // (docs/night-format.md: transients, variables, cosmic rays) wins.
    let keep = |slot: &mut String, kind: &str| {
        let raises = |k: &str| is_real(k) || k == "cosmic";
        if !raises(slot) && raises(kind) {
            *slot = kind.to_string();
        }
    };
    let mut by_frame: HashMap<(String, u64), String> = HashMap::new();
    let mut by_id: HashMap<u64, String> = HashMap::new();
    for r in rows {
        keep(by_id.entry(r.id).or_insert_with(|| r.kind.clone()), &r.kind);
        keep(by_frame.entry((r.frame.clone(), r.id)).or_insert_with(|| r.kind.clone()), &r.kind);
    }
    let kind_of = |frame: &str, object_id: &str| -> String {
        let id = object_id.strip_prefix("ZTFsim").unwrap_or(object_id).parse::<u64>().ok();
        match id {
            Some(id) => by_frame
                .get(&(frame.to_string(), id))
                .or_else(|| by_id.get(&id))
                .cloned()
                .unwrap_or_else(|| kind_from_id(id).to_string()),
            None => "unknown".into(),
        }
    };

    let alerts_dir = dir.join(alerts);
    let mut out = Vec::new();
    for f in &manifest.frames {
        let stem = Path::new(&f.file).file_stem().and_then(|s| s.to_str()).unwrap_or_default();
        let path = alerts_dir.join(if ztf { format!("{stem}.ztf.avro") } else { format!("{stem}.avro") });
        let bytes = std::fs::read(&path).with_context(|| format!("{}: cannot read the frame's alerts", path.display()))?;
        let what = path.display().to_string();
        for (i, payload) in split_container(&bytes, &what)?.into_iter().enumerate() {
            let first = decoder.decode_message(&payload).into_iter().next();
            let (alert_id, kind) = match first {
                Some(Ok(a)) => (Some(a.alert_id.clone()), kind_of(&f.file, &a.object_id)),
                _ => (None, "undecodable".to_string()),
            };
            out.push(Planned { key: format!("{stem}#{i}"), payload, alert_id, kind });
        }
    }
    Ok(out)
}

/// librdkafka's mock broker keeps at most this much per partition and drops the oldest
/// message sets beyond it (`rdkafka_mock.c`, not configurable).
const MOCK_PARTITION_BYTES: usize = 5 << 20;
/// Most partitions the bench gives the embedded topic.
const MAX_EMBEDDED_PARTITIONS: usize = 1024;

/// Two settings that make the embedded cluster behave as a real one would under a burst.
/// - Enough partitions that the whole night fits in the mock's retention (at most 2 MiB per
///   partition on average, under half of it, for uneven key hashing): a burst larger than 5 MiB
///   per partition would otherwise be truncated under the consumer, which then resets to the
///   end and never sees the rest.
/// - `fetch.wait.max.ms = 5` (unless the config sets it): the mock answers a fetch that finds
///   no data only after the whole wait (500 ms by default) even if data arrives meanwhile,
///   where a real broker answers as soon as data is there. Left alone, that adds up to 0.5 s to
///   the latency of the first alerts after every idle moment.
fn embedded_settings(cfg: &mut Config, total_bytes: usize) -> anyhow::Result<()> {
    let need = total_bytes.div_ceil(MOCK_PARTITION_BYTES * 2 / 5);
    if need > MAX_EMBEDDED_PARTITIONS {
        anyhow::bail!(
            "the night's alerts are {} MB, more than the embedded cluster can hold at once \
             ({MAX_EMBEDDED_PARTITIONS} partitions of 5 MiB): use a real Kafka (a bootstrap list instead of \"embedded\")",
            total_bytes / 1_000_000
        );
    }
    let want = i32::try_from(need).unwrap_or(i32::MAX);
    cfg.kafka.embedded_partitions = cfg.kafka.embedded_partitions.max(want);
    cfg.kafka.properties.entry("fetch.wait.max.ms".into()).or_insert_with(|| "5".into());
    Ok(())
}

/// Hand one message to the producer, waiting while its queue is full. Returns the instant the
/// producer accepted it and the future of the broker's acknowledgement.
async fn enqueue(producer: &FutureProducer, topic: &str, key: &str, payload: &[u8]) -> anyhow::Result<(Instant, DeliveryFuture)> {
    loop {
        let t = Instant::now();
        match producer.send_result(FutureRecord::to(topic).key(key).payload(payload)) {
            Ok(f) => return Ok((t, f)),
            Err((RdKafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            Err((e, _)) => anyhow::bail!("publishing {key} to {topic}: {e}"),
        }
    }
}

/// The broker's acknowledgement of one message: (partition, offset).
async fn acked(f: DeliveryFuture, topic: &str) -> anyhow::Result<(i32, i64)> {
    match f.await {
        Ok(Ok(d)) => Ok((d.partition, d.offset)),
        Ok(Err((e, _))) => anyhow::bail!("publishing to {topic}: {e}"),
        Err(_) => anyhow::bail!("publishing to {topic}: the producer went away"),
    }
}

/// Nearest-rank percentile of sorted values (NaN when empty).
fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

type Delivered = Result<(Detection, Instant), tonic::Status>;

/// Replay the night folder's alerts through the `serve` pipeline and measure. See the module
/// documentation for what each figure means.
pub async fn run(night: &Path, opts: &AlertsOptions) -> anyhow::Result<AlertsSummary> {
    let started = Instant::now();
    let deadline = started + opts.timeout;
    let mut cfg = opts.config.clone();
    cfg.grpc.listen = "127.0.0.1:0".into();
    cfg.kafka.topics = vec![opts.topic.clone()];
    let nonce = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    cfg.kafka.group_id = format!("blink-bench-{}-{nonce}", std::process::id());
    cfg.kafka.auto_offset_reset = "latest".into();
    cfg.engine.prefer = engine_name(opts.engine).into();
    cfg.detect.threshold = opts.threshold;
    cfg.validate()?;

    let decoder = service::decoder(&cfg)?;
    let night_owned = night.to_path_buf();
    let ztf = opts.ztf;
    let planned = tokio::task::spawn_blocking(move || load_night(&night_owned, ztf, &decoder))
        .await
        .map_err(|e| anyhow::anyhow!("reading the night's alerts was interrupted: {e}"))??;
    let warm = planned
        .iter()
        .find(|p| p.alert_id.is_some())
        .ok_or_else(|| anyhow::anyhow!("{}: no alert in the night's alert files decodes", night.display()))?;
    cfg.grpc.subscriber_buffer = cfg.grpc.subscriber_buffer.max(planned.len() + 1024);
    if opts.kafka == "embedded" {
        embedded_settings(&mut cfg, planned.iter().map(|p| p.payload.len()).sum())?;
    }

    let embedded = if opts.kafka == "embedded" {
        Some(EmbeddedKafka::start(&cfg.kafka.topics, cfg.kafka.embedded_partitions)?)
    } else {
        None
    };
    let brokers = embedded.as_ref().map(|e| e.bootstrap_servers()).unwrap_or(opts.kafka.clone());
    // An offline replay keeps no history file behind.
    let service = Service::start_with(&cfg, &brokers, crate::service::HistoryBackend::Memory).await?;

    let addr = format!("http://{}", service.grpc_addr);
    let subscribed = async {
        let mut client = BlinkClient::connect(addr.clone()).await.with_context(|| format!("connecting to {addr}"))?;
        let stream = client
            .subscribe(SubscribeRequest::default())
            .await
            .with_context(|| format!("subscribing at {addr}"))?
            .into_inner();
        anyhow::Ok(stream)
    }
    .await;
    let mut stream = match subscribed {
        Ok(s) => s,
        Err(e) => {
            service.stop().await;
            return Err(e);
        }
    };
    // The delivery instant is taken here, as soon as the client has the message.
    let (tx, mut rx) = mpsc::unbounded_channel::<Delivered>();
    let collector = tokio::spawn(async move {
        loop {
            let item = match stream.message().await {
                Ok(Some(d)) => Ok((d, Instant::now())),
                Ok(None) => break,
                Err(status) => Err(status),
            };
            let end = item.is_err();
            if tx.send(item).is_err() || end {
                break;
            }
        }
    });

    let result = async {
        let producer = kafka::producer(&brokers)?;
        let r = measure(&service, &producer, &mut rx, &planned, warm, opts, started, deadline).await;
        drop(producer);
        r
    }
    .await;
    service.stop().await;
    collector.abort();
    // Clients before the cluster they talk to.
    drop(embedded);
    let mut summary = result?;
    summary.packets = if opts.ztf { "ztf" } else { "native" }.into();
    Ok(summary)
}

/// Warm up, publish the burst, collect until every alert is accounted for.
#[allow(clippy::too_many_arguments)]
async fn measure(
    service: &Service,
    producer: &FutureProducer,
    rx: &mut mpsc::UnboundedReceiver<Delivered>,
    planned: &[Planned],
    warm: &Planned,
    opts: &AlertsOptions,
    started: Instant,
    deadline: Instant,
) -> anyhow::Result<AlertsSummary> {
    let m = &service.metrics;
    let topic = opts.topic.as_str();
    let warm_id = warm.alert_id.clone().unwrap_or_default();
    let timed_out = |what: &str| {
        anyhow::anyhow!(
            "alerts bench timed out after {:.0} s {what}: {} messages in, {} done, {} results out",
            opts.timeout.as_secs_f64(),
            Metrics::get(&m.messages_in),
            Metrics::get(&m.messages_done),
            Metrics::get(&m.results_out)
        )
    };

    // Warm-up: the consumer starts at the end of the topic, so copies published before it joined
    // are never seen; keep publishing until one comes back.
    let mut warm_acks = Vec::new();
    let mut warm_offsets: Vec<(i32, i64)> = Vec::new();
    let mut next = Instant::now();
    let mut join_s = None;
    while join_s.is_none() {
        if Instant::now() >= next {
            let (_, f) = enqueue(producer, topic, "warm-up", &warm.payload).await?;
            warm_acks.push(f);
            next += Duration::from_millis(250);
        }
        if Instant::now() > deadline {
            return Err(timed_out("waiting for the consumer to join its group"));
        }
        match tokio::time::timeout(Duration::from_millis(20), rx.recv()).await {
            Ok(Some(Ok((d, t)))) if d.alert_id == warm_id => {
                join_s = Some(t.duration_since(started).as_secs_f64());
                warm_offsets.push((d.partition, d.offset));
            }
            Ok(Some(Ok(_))) => {}
            Ok(Some(Err(s))) => anyhow::bail!("the gRPC subscription ended: {s}"),
            Ok(None) => anyhow::bail!("the gRPC subscription ended during the warm-up"),
            Err(_) => {}
        }
    }
    // Every copy at or after the first one seen will come through: wait for them all, and for
    // the pipeline to be idle, so none is taken for a measured alert.
    let mut acked_offsets = Vec::new();
    for f in warm_acks {
        acked_offsets.push(acked(f, topic).await?);
    }
    loop {
        let first_seen = warm_offsets.iter().min().copied().unwrap_or((0, 0));
        let pending = acked_offsets
            .iter()
            .filter(|o| o.0 == first_seen.0 && o.1 >= first_seen.1 && !warm_offsets.contains(o))
            .count();
        let idle = Metrics::get(&m.messages_done) == Metrics::get(&m.messages_in);
        if pending == 0 && idle {
            break;
        }
        if Instant::now() > deadline {
            return Err(timed_out("waiting for the warm-up copies"));
        }
        match tokio::time::timeout(Duration::from_millis(20), rx.recv()).await {
            Ok(Some(Ok((d, _)))) if d.alert_id == warm_id => warm_offsets.push((d.partition, d.offset)),
            Ok(Some(Ok(_))) => {}
            Ok(Some(Err(s))) => anyhow::bail!("the gRPC subscription ended: {s}"),
            Ok(None) => anyhow::bail!("the gRPC subscription ended during the warm-up"),
            Err(_) => {}
        }
    }
    let (done0, results0) = (Metrics::get(&m.messages_done), Metrics::get(&m.results_out));
    let dead0 = m.dead_letters();

    // The burst.
    let index: HashMap<&str, usize> =
        planned.iter().enumerate().filter_map(|(i, p)| p.alert_id.as_deref().map(|a| (a, i))).collect();
    let mut sent_at = Vec::with_capacity(planned.len());
    let mut acks = Vec::with_capacity(planned.len());
    for (i, p) in planned.iter().enumerate() {
        let (t, f) = enqueue(producer, topic, &p.key, &p.payload).await?;
        sent_at.push(t);
        acks.push(f);
        if i % 256 == 255 {
            tokio::task::yield_now().await;
        }
    }
    let first_sent = sent_at.first().copied().unwrap_or_else(Instant::now);
    let publish_s = sent_at.last().map(|t| t.duration_since(first_sent).as_secs_f64()).unwrap_or(0.0);
    let mut acks = tokio::spawn({
        let topic = topic.to_owned();
        async move {
            for f in acks {
                acked(f, &topic).await?;
            }
            anyhow::Ok(())
        }
    });

    // Collect until every published message is a delivered result or a dead letter.
    let n = planned.len();
    let mut score: Vec<Option<f64>> = vec![None; n];
    let mut latency_ms = Vec::with_capacity(n);
    let (mut received_total, mut duplicates, mut unexpected) = (0u64, 0usize, 0usize);
    let mut last = first_sent;
    loop {
        match tokio::time::timeout(Duration::from_millis(5), rx.recv()).await {
            // Stack detections (`stack:<N>n`) are not the per-alert results scored here.
            Ok(Some(Ok((d, _)))) if d.timescale != "epoch" => {}
            Ok(Some(Ok((d, t)))) => {
                received_total += 1;
                match index.get(d.alert_id.as_str()) {
                    Some(&i) if score[i].is_none() => {
                        score[i] = Some(d.score);
                        latency_ms.push(t.duration_since(sent_at[i]).as_secs_f64() * 1e3);
                        last = last.max(t);
                    }
                    Some(_) => duplicates += 1,
                    None => unexpected += 1,
                }
            }
            Ok(Some(Err(s))) => anyhow::bail!("the gRPC subscription ended: {s}"),
            Ok(None) => anyhow::bail!("the gRPC subscription ended before every result arrived"),
            Err(_) => {}
        }
        let delivered = latency_ms.len() as u64;
        let dead = m.dead_letter_total().saturating_sub(dead0.values().sum());
        let done = Metrics::get(&m.messages_done).saturating_sub(done0);
        let results = Metrics::get(&m.results_out).saturating_sub(results0);
        if delivered + dead >= n as u64 && done >= n as u64 && received_total >= results {
            if dead > 0 {
                last = last.max(Instant::now());
            }
            break;
        }
        if acks.is_finished() {
            // Surface a failed publish now rather than as a timeout.
            (&mut acks).await.map_err(|e| anyhow::anyhow!("publishing was interrupted: {e}"))??;
            acks = tokio::spawn(async { anyhow::Ok(()) });
        }
        if Instant::now() > deadline {
            let what = format!("waiting for results ({delivered} of {n} alerts delivered, {dead} dead letters)");
            return Err(timed_out(&what));
        }
    }
    acks.await.map_err(|e| anyhow::anyhow!("publishing was interrupted: {e}"))??;

    let mut dead_letters = m.dead_letters();
    for (reason, n0) in &dead0 {
        if let Some(v) = dead_letters.get_mut(reason) {
            *v = v.saturating_sub(*n0);
        }
    }
    dead_letters.retain(|_, v| *v > 0);

    let threshold = opts.threshold;
    let mut by_kind: BTreeMap<String, KindCount> = BTreeMap::new();
    let (mut real, mut real_found, mut found) = (0usize, 0usize, 0usize);
    for (p, s) in planned.iter().zip(&score) {
        let hit = s.is_some_and(|s| s.abs() >= threshold);
        let k = by_kind.entry(p.kind.clone()).or_default();
        k.alerts += 1;
        k.detected += usize::from(hit);
        real += usize::from(is_real(&p.kind));
        real_found += usize::from(is_real(&p.kind) && hit);
        found += usize::from(hit);
    }
    let ratio = |a: usize, b: usize| if b == 0 { f64::NAN } else { a as f64 / b as f64 };
    latency_ms.sort_by(f64::total_cmp);
    let wall_s = last.duration_since(first_sent).as_secs_f64();
    Ok(AlertsSummary {
        adapter: service.adapter.clone(),
        alerts_published: n,
        results_received: latency_ms.len(),
        dead_letters,
        wall_s,
        alerts_per_s: n as f64 / wall_s.max(1e-9),
        latency_ms_p50: percentile(&latency_ms, 0.50),
        latency_ms_p95: percentile(&latency_ms, 0.95),
        latency_ms_p99: percentile(&latency_ms, 0.99),
        latency_ms_max: latency_ms.last().copied().unwrap_or(f64::NAN),
        threshold,
        completeness: ratio(real_found, real),
        purity: ratio(real_found, found),
        by_kind,
        publish_s,
        join_s: join_s.unwrap_or(f64::NAN),
        duplicates,
        unexpected,
        packets: String::new(),
    })
}

fn num(v: f64, prec: usize) -> String {
    if v.is_finite() {
        format!("{v:.prec$}")
    } else {
        "-".into()
    }
}

impl AlertsSummary {
    /// A short aligned plain-text block.
    pub fn table(&self) -> String {
        let dead: u64 = self.dead_letters.values().sum();
        let reasons: Vec<String> = self.dead_letters.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let mut s = String::new();
        let mut line = |k: &str, v: String| s.push_str(&format!("{k:<16} {v}\n"));
        line("adapter", self.adapter.clone());
        line(
            "alerts",
            format!(
                "{} published ({}), {} results received, {} dead letters{}",
                self.alerts_published,
                self.packets,
                self.results_received,
                dead,
                if reasons.is_empty() { String::new() } else { format!(" ({})", reasons.join(", ")) }
            ),
        );
        if self.duplicates + self.unexpected > 0 {
            line("extra results", format!("{} duplicates, {} unexpected", self.duplicates, self.unexpected));
        }
        line(
            "throughput",
            format!(
                "{} alerts/s ({} s from first publish to last result; burst published in {} s; group join {} s, not counted)",
                num(self.alerts_per_s, 1),
                num(self.wall_s, 3),
                num(self.publish_s, 3),
                num(self.join_s, 1)
            ),
        );
        line(
            "latency ms",
            format!(
                "p50 {}  p95 {}  p99 {}  max {}  (publish -> gRPC delivery, burst: queueing included)",
                num(self.latency_ms_p50, 1),
                num(self.latency_ms_p95, 1),
                num(self.latency_ms_p99, 1),
                num(self.latency_ms_max, 1)
            ),
        );
        line(
            "detection",
            format!(
                "|score| >= {}: completeness {}  purity {}",
                num(self.threshold, 1),
                num(self.completeness, 3),
                num(self.purity, 3)
            ),
        );
        s.push_str(&format!("  {:<12} {:>8} {:>9}\n", "kind", "alerts", "detected"));
        for (k, c) in &self.by_kind {
            s.push_str(&format!("  {:<12} {:>8} {:>9}\n", k, c.alerts, c.detected));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!((percentile(&v, 0.5), percentile(&v, 0.95), percentile(&v, 0.99)), (50.0, 95.0, 99.0));
        assert_eq!(percentile(&[3.0], 0.99), 3.0);
        assert!(percentile(&[], 0.5).is_nan());
    }

    #[test]
    fn embedded_topic_holds_the_night() {
        let mut cfg = Config::default();
        embedded_settings(&mut cfg, 336_000_000).expect("fits");
        assert_eq!(cfg.kafka.embedded_partitions, 161);
        assert_eq!(cfg.kafka.properties.get("fetch.wait.max.ms").map(String::as_str), Some("5"));
        let mut small = Config::default();
        embedded_settings(&mut small, 1000).expect("fits");
        assert_eq!(small.kafka.embedded_partitions, Config::default().kafka.embedded_partitions);
        let e = embedded_settings(&mut Config::default(), 3_000_000_000).expect_err("too large");
        assert!(e.to_string().contains("real Kafka"), "{e}");
    }

    #[test]
    fn kinds_from_id_ranges() {
        assert_eq!(kind_from_id(2_000_007), "transient");
        assert_eq!(kind_from_id(4_000_000), "cosmic");
        assert_eq!(kind_from_id(12), "star");
    }

    #[test]
    fn missing_night_files_name_the_file() {
        let dir = std::env::temp_dir().join(format!("blink-bench-alerts-err-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("tempdir");
        let decoder = Decoder::new(Default::default()).expect("decoder");
        let e = load_night(&dir, false, &decoder).err().expect("no manifest");
        assert!(e.to_string().contains("manifest.toml"), "{e}");
        let m = Manifest::new("test");
        std::fs::write(dir.join("manifest.toml"), m.to_toml()).expect("write");
        let e = load_night(&dir, false, &decoder).err().expect("no alerts key");
        assert!(e.to_string().contains("manifest.toml") && e.to_string().contains("alerts"), "{e}");
        let m = Manifest { alerts: Some("alerts".into()), ..m };
        std::fs::write(dir.join("manifest.toml"), m.to_toml()).expect("write");
        let e = load_night(&dir, false, &decoder).err().expect("no truth key");
        assert!(e.to_string().contains("truth"), "{e}");
        let m = Manifest { truth: Some("truth.csv".into()), ..m };
        std::fs::write(dir.join("manifest.toml"), m.to_toml()).expect("write");
        let e = load_night(&dir, false, &decoder).err().expect("no truth file");
        assert!(e.to_string().contains("truth.csv"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}

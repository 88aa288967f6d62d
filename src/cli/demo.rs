//! `blink demo`: the whole chain on embedded defaults. Starts librdkafka's in-process cluster,
//! publishes every real fixture alert (ZTF and Rubin), simulated alerts and a few deliberately
//! broken messages, runs the pipeline, subscribes over gRPC on loopback, prints what came out.

use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;

use crate::config::Config;
use crate::metrics::Metrics;
use crate::proto::blink_client::BlinkClient;
use crate::proto::{Detection, SubscribeRequest};
use crate::service::{self, HistoryBackend, Service};
use crate::sim::{simulate_alerts, AlertSimConfig};
use crate::source::kafka::{self, EmbeddedKafka};
use crate::source::replay::{fixture_messages, Message};

#[derive(Debug, Args, Clone)]
pub struct DemoArgs {
    /// Kafka to use: "embedded" (librdkafka's in-process cluster, nothing to install) or a
    /// bootstrap list host:port of a real cluster (the topic must exist or be auto-created).
    #[arg(long, alias = "brokers", default_value = "embedded")]
    pub kafka: String,
    /// Topic the demo publishes to and consumes from.
    #[arg(long, default_value = "blink-demo-alerts")]
    pub topic: String,
    /// How many simulated alerts (blink native format) to add to the real fixtures.
    #[arg(long, default_value_t = 48)]
    pub simulated: usize,
    /// Seed of the simulated alerts.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Give up waiting for results after this many seconds.
    #[arg(long, default_value_t = 120)]
    pub timeout: u64,
    /// Print only the last lines (counts, throughput), not the table.
    #[arg(long)]
    pub quiet: bool,
    #[command(flatten)]
    pub engine: super::EngineArgs,
}

/// What a demo run produced.
#[derive(Debug)]
pub struct DemoReport {
    pub messages_published: usize,
    pub alerts_in: u64,
    pub results_out: u64,
    pub detected: u64,
    pub dead_letters: std::collections::BTreeMap<String, u64>,
    pub adapter: String,
    /// Results as the gRPC subscriber received them.
    pub received: Vec<Detection>,
    /// From the first publish to the last result delivered (includes the consumer joining its
    /// group, about 3 s on the embedded cluster).
    pub pipeline_wall: Duration,
    /// From the first message reaching the pipeline to the last result delivered (to within the
    /// 20 ms the demo polls at).
    pub processing_wall: Duration,
}

impl DemoReport {
    pub fn dead_letter_total(&self) -> u64 {
        self.dead_letters.values().sum()
    }
}

/// Deliberately broken inputs, so the demo shows the dead-letter path.
fn bad_messages(good: &[Message]) -> Vec<Message> {
    let mut bad = vec![
        Message { key: "bad-empty".into(), payload: Vec::new(), origin: "0-byte message".into() },
        Message {
            key: "bad-magic".into(),
            payload: b"this is not an alert".to_vec(),
            origin: "wrong magic byte".into(),
        },
    ];
    if let Some(first) = good.first() {
        bad.push(Message {
            key: "bad-truncated".into(),
            payload: first.payload[..first.payload.len() / 2].to_vec(),
            origin: "truncated Avro".into(),
        });
    }
    bad
}

pub async fn run_demo(args: &DemoArgs) -> anyhow::Result<DemoReport> {
    let mut cfg = Config::default();
    cfg.grpc.listen = "127.0.0.1:0".into();
    cfg.kafka.topics = vec![args.topic.clone()];
    cfg.kafka.group_id = format!("blink-demo-{}", std::process::id());
    if let Some(e) = &args.engine.engine {
        cfg.engine.prefer = e.clone();
    }
    cfg.validate()?;

    let embedded = if args.kafka == "embedded" {
        Some(EmbeddedKafka::start(&cfg.kafka.topics, cfg.kafka.embedded_partitions)?)
    } else {
        None
    };
    let brokers = embedded.as_ref().map(|e| e.bootstrap_servers()).unwrap_or(args.kafka.clone());

    // What to publish: real fixtures, simulated alerts, and a few broken messages.
    let decoder = service::decoder(&cfg)?;
    let mut messages = fixture_messages(&decoder).context("preparing the fixture alerts")?;
    let sims = simulate_alerts(args.simulated, args.seed, &AlertSimConfig::default());
    for a in &sims {
        let payload = crate::decode::native::encode_native(std::slice::from_ref(a))
            .with_context(|| format!("encoding simulated alert {}", a.alert_id))?;
        messages.push(Message { key: a.object_id.clone(), payload, origin: "simulated".into() });
    }
    messages.extend(bad_messages(&messages));

    // The demo's history lives in memory: nothing left behind on disk.
    let service = Service::start_with(&cfg, &brokers, HistoryBackend::Memory).await?;
    let metrics = service.metrics.clone();
    let adapter = service.adapter.clone();

    // Subscribe before anything is published, so every result reaches us.
    let addr = format!("http://{}", service.grpc_addr);
    let mut client = BlinkClient::connect(addr.clone()).await.with_context(|| format!("connecting to {addr}"))?;
    let mut stream = client
        .subscribe(SubscribeRequest::default())
        .await?
        .into_inner();
    let (rx_tx, mut rx_rx) = tokio::sync::mpsc::unbounded_channel::<Detection>();
    let collector = tokio::spawn(async move {
        while let Ok(Some(d)) = stream.message().await {
            if rx_tx.send(d).is_err() {
                break;
            }
        }
    });

    let producer = kafka::producer(&brokers)?;
    let started = Instant::now();
    let sends = messages.iter().map(|m| kafka::publish(&producer, &args.topic, &m.key, &m.payload));
    for r in futures::future::join_all(sends).await {
        r.context("publishing to the demo topic")?;
    }
    let published = messages.len();
    tracing::info!(published, "demo messages published");

    // Wait until every published message is fully accounted for, and the subscriber has it all.
    let deadline = started + Duration::from_secs(args.timeout);
    let mut received = Vec::new();
    // Stack detections (`stack:<N>n`) come besides the one result per alert; counted apart.
    let mut stacks = 0usize;
    let mut first_in: Option<Instant> = None;
    loop {
        if first_in.is_none() && Metrics::get(&metrics.messages_in) > 0 {
            first_in = Some(Instant::now());
        }
        while let Ok(d) = rx_rx.try_recv() {
            if d.timescale == "epoch" {
                received.push(d);
            } else {
                stacks += 1;
            }
        }
        let done = Metrics::get(&metrics.messages_done) as usize >= published;
        if done && received.len() as u64 >= Metrics::get(&metrics.results_out) {
            break;
        }
        if Instant::now() > deadline {
            anyhow::bail!(
                "demo timed out after {} s: {} of {} messages done, {} results received",
                args.timeout,
                Metrics::get(&metrics.messages_done),
                published,
                received.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let pipeline_wall = started.elapsed();
    tracing::info!(stacks, "stack detections received");
    let processing_wall = first_in.map(|t| t.elapsed()).unwrap_or(pipeline_wall);
    service.stop().await;
    collector.abort();
    // Clients before the cluster they talk to.
    drop(producer);
    drop(embedded);

    Ok(DemoReport {
        messages_published: published,
        alerts_in: Metrics::get(&metrics.alerts_in),
        results_out: Metrics::get(&metrics.results_out),
        detected: Metrics::get(&metrics.detected),
        dead_letters: metrics.dead_letters(),
        adapter,
        received,
        pipeline_wall,
        processing_wall,
    })
}

fn fmt_opt(v: f64) -> String {
    if v.is_finite() {
        format!("{v:8.1}")
    } else {
        format!("{:>8}", "-")
    }
}

pub async fn run(args: &DemoArgs) -> anyhow::Result<()> {
    let report = run_demo(args).await?;
    let mut rows = report.received.clone();
    rows.sort_by(|a, b| (&a.survey, &a.alert_id).cmp(&(&b.survey, &b.alert_id)));
    if !args.quiet {
        println!("{:<26} {:<7} {:<4} {:>8} {:>8}", "alert", "survey", "band", "blink", "survey");
        println!("{:<26} {:<7} {:<4} {:>8} {:>8}", "", "", "", "score", "snr");
        for d in &rows {
            println!(
                "{:<26} {:<7} {:<4} {:>8.1} {}  {}",
                d.alert_id,
                d.survey,
                d.band,
                d.score,
                fmt_opt(d.survey_snr),
                if d.detected { "*" } else { "" }
            );
        }
        println!("(* = |score| >= threshold; survey snr: ZTF 1.0857/sigmapsf, Rubin diaSource.snr, simulated: the injected optimal SNR)");
    }
    if !report.dead_letters.is_empty() {
        let reasons: Vec<String> = report.dead_letters.iter().map(|(k, v)| format!("{k}={v}")).collect();
        println!("dead letters by reason: {}", reasons.join(", "));
    }
    let secs = report.processing_wall.as_secs_f64();
    println!(
        "throughput: {} alerts ({} messages) in {:.2} s from the first message in to the last result = {:.1} alerts/s \
         ({:.2} s from first publish, group join included); {} above threshold",
        report.alerts_in,
        report.messages_published,
        secs,
        report.alerts_in as f64 / secs.max(1e-9),
        report.pipeline_wall.as_secs_f64(),
        report.detected
    );
    println!(
        "demo: {} alerts in, {} detections out, {} dead letters, adapter={}",
        report.alerts_in,
        report.results_out,
        report.dead_letter_total(),
        report.adapter
    );
    if report.results_out + report.dead_letter_total() != report.alerts_in {
        anyhow::bail!("accounting mismatch: results + dead letters != alerts in");
    }
    if report.received.len() as u64 != report.results_out {
        anyhow::bail!(
            "the gRPC subscriber received {} of {} results",
            report.received.len(),
            report.results_out
        );
    }
    Ok(())
}

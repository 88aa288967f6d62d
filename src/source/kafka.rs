//! Kafka in: an rdkafka `StreamConsumer` in a consumer group, feeding the pipeline, and the
//! embedded cluster (librdkafka's in-process mock) used by `blink demo` and the tests.
//!
//! Offsets are never auto-committed: the pipeline's ack tracker says when every result derived
//! from a message was delivered, and only then is the offset committed (at-least-once).

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::client::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{CommitMode, Consumer, ConsumerContext, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{DefaultProducerContext, FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::{mpsc, watch};

use crate::config::KafkaConfig;
use crate::metrics::Metrics;
use crate::pipeline::{AckToken, CommitQueue, Envelope};

#[derive(Debug, thiserror::Error)]
pub enum KafkaError {
    #[error("kafka: {context}: {source}")]
    Client { context: String, source: rdkafka::error::KafkaError },
}

fn ctx(context: impl Into<String>) -> impl FnOnce(rdkafka::error::KafkaError) -> KafkaError {
    let context = context.into();
    move |source| KafkaError::Client { context, source }
}

/// librdkafka's in-process Kafka cluster. Keep it alive while clients use it.
pub struct EmbeddedKafka {
    cluster: MockCluster<'static, DefaultProducerContext>,
}

impl EmbeddedKafka {
    /// Start a one-broker cluster and create `topics` with `partitions` partitions each.
    pub fn start(topics: &[String], partitions: i32) -> Result<EmbeddedKafka, KafkaError> {
        let cluster = MockCluster::new(1).map_err(ctx("starting the embedded cluster"))?;
        for t in topics {
            cluster
                .create_topic(t, partitions, 1)
                .map_err(ctx(format!("creating topic {t} in the embedded cluster")))?;
        }
        Ok(EmbeddedKafka { cluster })
    }

    pub fn bootstrap_servers(&self) -> String {
        self.cluster.bootstrap_servers()
    }
}

/// A producer for publishing alerts (demo, tests, `simulate --publish`).
pub fn producer(brokers: &str) -> Result<FutureProducer, KafkaError> {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("message.max.bytes", "16777216")
        .set("linger.ms", "5")
        .create()
        .map_err(ctx(format!("creating a producer for {brokers}")))
}

/// Publish one message and wait for the broker's acknowledgement.
pub async fn publish(
    producer: &FutureProducer,
    topic: &str,
    key: &str,
    payload: &[u8],
) -> Result<(i32, i64), KafkaError> {
    let record = FutureRecord::to(topic).key(key).payload(payload);
    producer
        .send(record, Duration::from_secs(30))
        .await
        .map(|d| (d.partition, d.offset))
        .map_err(|(e, _)| KafkaError::Client { context: format!("publishing to {topic}"), source: e })
}

/// Build the group consumer and subscribe it.
/// The consumer's context: librdkafka's statistics, every [`LAG_INTERVAL_MS`], give each
/// assigned partition's lag (high watermark − position), kept in [`Metrics`] for `Status`.
pub struct LagContext {
    metrics: Arc<Metrics>,
}

/// How often librdkafka reports statistics (and so the lag), milliseconds.
pub const LAG_INTERVAL_MS: u32 = 5000;

impl ClientContext for LagContext {
    fn stats(&self, stats: rdkafka::Statistics) {
        let mut lag = Vec::new();
        for (name, t) in &stats.topics {
            for (id, p) in &t.partitions {
                // -1 is librdkafka's "unknown" (not assigned, or no position yet); its internal
                // partition -1 is not a real one.
                if *id >= 0 && p.consumer_lag >= 0 {
                    lag.push((format!("{name}/{id}"), p.consumer_lag));
                }
            }
        }
        self.metrics.set_lag(lag);
    }
}

impl ConsumerContext for LagContext {}

/// The consumer [`consumer`] makes.
pub type Source = StreamConsumer<LagContext>;

pub fn consumer(cfg: &KafkaConfig, brokers: &str, metrics: Arc<Metrics>) -> Result<Source, KafkaError> {
    let mut cc = ClientConfig::new();
    cc.set("bootstrap.servers", brokers)
        .set("statistics.interval.ms", LAG_INTERVAL_MS.to_string())
        .set("group.id", &cfg.group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", &cfg.auto_offset_reset)
        .set("enable.partition.eof", "false")
        .set("fetch.message.max.bytes", "16777216");
    for (k, v) in &cfg.properties {
        cc.set(k, v);
    }
    let consumer: Source =
        cc.create_with_context(LagContext { metrics }).map_err(ctx(format!("creating a consumer for {brokers}")))?;
    let topics: Vec<&str> = cfg.topics.iter().map(String::as_str).collect();
    consumer.subscribe(&topics).map_err(ctx(format!("subscribing to {topics:?}")))?;
    Ok(consumer)
}

/// Consume until `shutdown` turns true: each message becomes an [`Envelope`] for the pipeline;
/// commit points from the pipeline's ack tracker are committed as they come. Returns the
/// consumer so the caller can commit the last points after draining the pipeline.
pub async fn run(
    consumer: Source,
    input: mpsc::Sender<Envelope>,
    commits: Arc<CommitQueue>,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<Source, KafkaError> {
    loop {
        tokio::select! {
            // Commits first: acknowledged work is recorded before more is taken in (as in
            // Vector's kafka source, whose ack arm comes first in a biased select).
            biased;
            _ = commits.notify.notified() => commit(&consumer, &commits, &metrics, CommitMode::Async),
            changed = shutdown.changed() => {
                if changed.is_err() || *shutdown.borrow() {
                    break;
                }
            }
            msg = consumer.recv() => {
                let msg = match msg {
                    Ok(m) => m,
                    Err(e) => {
                        tracing::warn!(error = %e, "kafka receive error (retrying)");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        continue;
                    }
                };
                let env = Envelope {
                    bytes: msg.payload().map(<[u8]>::to_vec).unwrap_or_default(),
                    token: AckToken {
                        topic: msg.topic().to_owned(),
                        partition: msg.partition(),
                        offset: msg.offset(),
                    },
                };
                drop(msg);
                if input.send(env).await.is_err() {
                    break;
                }
            }
        }
    }
    Ok(consumer)
}

/// Commit everything the ack tracker released. `Sync` mode at shutdown.
pub fn commit(consumer: &Source, commits: &CommitQueue, metrics: &Metrics, mode: CommitMode) {
    let points = commits.take();
    if points.is_empty() {
        return;
    }
    let mut tpl = TopicPartitionList::new();
    for (topic, partition, offset) in &points {
        if let Err(e) = tpl.add_partition_offset(topic, *partition, Offset::Offset(*offset)) {
            tracing::error!(error = %e, topic, partition, offset, "bad commit point");
        }
    }
    match consumer.commit(&tpl, mode) {
        Ok(()) => {
            metrics.offsets_committed.fetch_add(points.len() as u64, Relaxed);
            tracing::debug!(?points, "offsets committed");
        }
        Err(e) => {
            tracing::warn!(error = %e, ?points, "offset commit failed (kept for the next try)");
            for (topic, partition, offset) in points {
                commits.push(&topic, partition, offset);
            }
        }
    }
}

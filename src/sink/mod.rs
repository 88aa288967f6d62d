//! Where results go. `grpc`: the hub every `Subscribe` stream reads from, and the server.
//! `kafka_out`: the Kafka output topic (Avro, Confluent framing). `object`: `GetObject`'s
//! reply from the history store, with PNG thumbnails. `replay`: the hub's replay ring kept in
//! the history store, for resuming across restarts.
//! [`Output`]: what else a batch's detections must reach, durably, before the batch is
//! acknowledged (the Kafka output topic, the notifiers' outbox).
pub mod grpc;
pub mod kafka_out;
pub mod object;
pub mod replay;

use std::sync::Arc;

use crate::proto::Detection;

/// A destination a batch's detections are handed to before its alerts are acknowledged: once
/// `deliver` returns `Ok`, the detections must survive a crash (written to Kafka and
/// acknowledged by the brokers, committed to the outbox file). On `Err` the pipeline waits and
/// tries the same batch again (the stream slows rather than losing anything; a restart
/// re-reads what was not acknowledged).
#[tonic::async_trait]
pub trait Output: Send + Sync {
    /// Short name for logs and metrics (`kafka`, `notify`).
    fn name(&self) -> &str;
    /// Hand over `detections` (every result of a batch and its stack detections, in sequence
    /// order); `Ok` once they are durable.
    async fn deliver(&self, detections: &[Arc<Detection>]) -> Result<(), String>;
}

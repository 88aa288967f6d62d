//! Alerts mode of `blink bench`: the night's Avro alerts replayed through the same pipeline as
//! `serve` (embedded Kafka by default), timed from publish to gRPC delivery, and scored against
//! the truth table. (Being written.)

use std::collections::BTreeMap;

use serde::Serialize;

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
    pub results_received: usize,
    /// Dead letters by reason.
    pub dead_letters: BTreeMap<String, u64>,
    /// From the first message reaching the pipeline to the last result delivered, seconds.
    pub wall_s: f64,
    pub alerts_per_s: f64,
    /// Publish → gRPC delivery, milliseconds.
    pub latency_ms_p50: f64,
    pub latency_ms_p95: f64,
    pub latency_ms_p99: f64,
    pub latency_ms_max: f64,
    /// |score| at or above this counts as detected.
    pub threshold: f64,
    /// Detected share of the alerts raised on transients and variable stars.
    pub completeness: f64,
    /// Share of detected alerts that are transients or variable stars (not artifacts).
    pub purity: f64,
    /// Per truth kind (fast, sn, slow, variable, cosmic, hot_pixel, …).
    pub by_kind: BTreeMap<String, KindCount>,
}

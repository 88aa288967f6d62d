//! `blink bench`: detection, speed and latency measured on a night folder with a truth table.
//!
//! # Layout
//! - [`matching`]: detections ↔ truth within a radius, per frame.
//! - [`stats`]: completeness, false positives, score vs optimal SNR, summaries.
//! - [`report`]: the plain-text table and the JSON file.
//! - [`plots`]: PNG plots and the stamp gallery.
//! - [`sky`]: the score image's scatter on empty sky.
//! - [`stacks`]: the truth of a stack, from its frames (ideal stack SNR with the template term).
//! - [`alerts`]: alerts mode, the night's Avro alerts replayed through the `serve` pipeline.
//! - [`agreement`]: blink's cutout score against the surveys' own SNR on real alert packets.

pub mod agreement;
pub mod alerts;
pub mod matching;
pub mod plots;
pub mod report;
pub mod sky;
pub mod stacks;
pub mod stats;

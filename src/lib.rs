//! # blink — GPU transient detection on astronomical alert streams
//!
//! Alerts (ZTF, Rubin) arrive on Kafka; blink decodes them, batches same-shape stamps, redoes
//! the subtraction of each alert's cutouts on the GPU and scores the candidate; results stream
//! out over gRPC. `ARCHITECTURE.md` has the picture.
//!
//! # Layout
//! - [`alert`]: the survey-neutral alert model every stage shares.
//! - [`decode`]: ZTF, Rubin and blink-native packets → [`alert::Alert`]; FITS stamps; `inspect`.
//! - [`source`]: Kafka in (consumer group, embedded cluster) and fixture replay.
//! - [`pipeline`]: the stages and channels, batching, acks and dead letters.
//! - [`engine`]: the `Engine` trait, stamp preparation, engine selection.
//! - [`gpu`]: wgpu context, buffer pool and one dispatcher per WGSL kernel (`shaders/<k>.wgsl`).
//! - [`cpu`]: the CPU twin of every kernel (same names), the oracle in tests.
//! - [`sink`]: gRPC hub and server.
//! - [`history`]: the object history store (past epochs per object; redb file or in memory).
//! - [`notify`]: notification rules, Slack and webhook notifiers, the durable outbox.
//! - [`service`]: everything wired together for `serve` and `demo`.
//! - [`sim`]: simulated alerts, and simulated FITS nights (`sim::night`, `blink simulate`).
//! - [`detect`]: full-frame subtraction and detection on night folders (`blink detect`), the
//!   detection catalogue.
//! - [`subtract`]: Alard–Lupton PSF matching: kernel basis, fitting stamps, the spatially varying fit.
//! - [`stack`]: sub-pixel alignment and inverse-variance stacks of difference stamps over time windows.
//! - [`bench`]: `blink bench`, detection, speed and latency against a night's truth.
//! - [`config`], [`metrics`], [`cli`], [`columns`] (CSV tables read by column name).

pub mod alert;
pub mod bench;
pub mod cli;
pub mod columns;
pub mod config;
pub mod cpu;
pub mod decode;
pub mod detect;
pub mod engine;
pub mod gpu;
pub mod history;
pub mod metrics;
pub mod notify;
pub mod pipeline;
pub mod service;
pub mod sim;
pub mod sink;
pub mod source;
pub mod stack;
pub mod subtract;

/// Code generated from `proto/blink/v1/blink.proto`.
pub mod proto {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("blink.v1");
}

/// Seeds for the unit tests' random inputs.
#[cfg(test)]
pub(crate) mod testing {
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    /// `BLINK_SEED`, else a fresh random one; printed (the harness shows it when the test
    /// fails), so a failure can be rerun with the same inputs: `BLINK_SEED=<seed> cargo test <name>`.
    pub fn seed() -> u64 {
        let seed = std::env::var("BLINK_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random);
        let test = std::thread::current().name().unwrap_or("test").to_string();
        eprintln!("{test}: seed {seed} (rerun with BLINK_SEED={seed})");
        seed
    }

    /// An RNG from [`seed`].
    pub fn rng() -> StdRng {
        StdRng::seed_from_u64(seed())
    }
}

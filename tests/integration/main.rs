//! blink's integration tests, one binary (module index below).
//!
//! - `al_parity`: the Alard–Lupton GPU kernels against their CPU twins and the CPU fit.
//! - `agreement`: issue 4, blink's cutout score against the surveys' SNR on the real fixture alerts.
//! - `common`: the parity tests' seeded RNG and GPU engine.
//! - `bench_alerts`: `blink bench` alerts mode on a tiny simulated night through embedded Kafka.
//! - `delivery`: issue 6 end to end: Kafka → serve → filtered subscribers, resume, Slack with
//!   retries, notifications pending across a restart.
//! - `detect`: `blink detect` and `blink bench` on simulated nights against truth; bad folders.
//! - `decode`: every fixture file decodes with the counts of `testdata/README.md`; bad input.
//! - `engine_parity`: each WGSL kernel against its CPU twin on fresh random inputs.
//! - `get_object`: issue 6, `GetObject` and `blink object` from a running server's history store.
//! - `grpc_security`: issue 6, bearer tokens and TLS on the gRPC server, with the CLI's client.
//! - `history`: issue 5, the object history store: kill -9 while writing, a corrupt file, simulated alerts.
//! - `frame_parity`: the whole-frame GPU kernels (score, sky mesh, variance, masks) against `cpu::frame`.
//! - `e2e`: embedded Kafka → pipeline → gRPC subscribers; dead letters; committed offsets.
//! - `outputs`: issue 6, the Kafka output topic (Avro, Confluent framing, registry) and the
//!   pipeline's retry-then-hold rule for outputs.
//! - `notify`: issue 6, notifiers over HTTP on 127.0.0.1: retries, HMAC signatures, restart with a queued outbox, dedup.
//! - `python_example`: issue 6, `examples/python/subscribe.py` (grpcio) against a live server.
//! - `stacking_stream`: issue 5, stacking in the pipeline: a faint source announced once from its
//!   stack, redelivery and restart announce nothing, a history error dead-letters its batch.
//! - `stack_parity`: the stacking kernels (shift, coadd) against `cpu::stack`; windows on the GPU.
//! - `simulate`: `blink simulate` against its own claims (noise, flux, template depth, headers,
//!   manifest and truth, determinism).

mod al_parity;
mod common;
mod agreement;
mod bench_alerts;
mod decode;
mod delivery;
mod detect;
mod e2e;
mod engine_parity;
mod frame_parity;
mod get_object;
mod grpc_security;
mod history;
mod notify;
mod outputs;
mod python_example;
mod simulate;
mod stack_parity;
mod stacking_stream;

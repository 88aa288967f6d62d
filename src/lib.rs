//! # blink — GPU transient detection on astronomical alert streams
//!
//! # Layout
//! - [`alert`]: the survey-neutral alert model every stage shares.
//! - [`decode`]: ZTF, Rubin and blink-native packets → [`alert::Alert`]; FITS stamps; `inspect`.
//! - [`engine`]: the `Engine` trait, batch preparation, engine selection.
//! - [`gpu`]: wgpu context, buffer pool and one dispatcher per WGSL kernel (`shaders/<k>.wgsl`).
//! - [`cpu`]: the CPU twin of every kernel (same names), the oracle in tests.

pub mod alert;
pub mod cpu;
pub mod decode;
pub mod engine;
pub mod gpu;

//! blink's integration tests, one binary (module index below).
//!
//! - `decode`: every fixture file decodes with the counts of `testdata/README.md`; bad input.
//! - `engine_parity`: each WGSL kernel against its CPU twin on fresh random inputs.

mod decode;
mod engine_parity;

//! Where alerts come from: `kafka` (a consumer group, embedded or real brokers) and `replay`
//! (files and fixtures turned into messages, for `demo`, tests and benchmarks).
pub mod kafka;
pub mod replay;

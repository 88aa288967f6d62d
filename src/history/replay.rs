//! The gRPC hub's replay log (`sink::grpc`), kept in the history store so that a subscriber
//! can resume by sequence number across a restart: the last detections published (encoded by
//! the caller), and the sequence numbers reserved so far, so that a restarted server never
//! gives out a number twice.
//!
//! Tables (through `core`'s [`Kv`]):
//! - `detections`: sequence (u64 BE) → the caller's bytes (an encoded detection).
//! - `meta` `replay` → reserved-up-to, detections kept (u64 LE each).

use super::core::{Kv, KvRead, T};
use super::HistoryError;

const META_KEY: &[u8] = b"replay";

/// The replay log of a history store ([`super::HistoryStore::replay_log`]).
pub trait ReplayLog: Send + Sync {
    /// Append `(sequence, bytes)` (ascending sequences, above every one stored) and keep only
    /// the last `keep`; durable when it returns.
    fn append_detections(&self, items: &[(u64, Vec<u8>)], keep: usize) -> Result<(), HistoryError>;
    /// The last `n` stored, oldest first.
    fn recent_detections(&self, n: usize) -> Result<Vec<(u64, Vec<u8>)>, HistoryError>;
    /// Sequence numbers reserved so far: every number given out is at most this (0: none).
    fn reserved_sequence(&self) -> Result<u64, HistoryError>;
    /// Reserve up to `upto` (never lowers it); durable when it returns.
    fn reserve_sequence(&self, upto: u64) -> Result<(), HistoryError>;
}

fn meta(kv: &impl KvRead) -> Result<(u64, u64), HistoryError> {
    let Some(b) = kv.get(T::Meta, META_KEY)? else { return Ok((0, 0)) };
    let word = |i: usize| b.get(i * 8..i * 8 + 8).and_then(|s| s.try_into().ok()).map(u64::from_le_bytes);
    match (word(0), word(1)) {
        (Some(r), Some(n)) => Ok((r, n)),
        _ => Err(HistoryError::BadRecord { key: "meta/replay".into(), reason: "short entry".into() }),
    }
}

fn set_meta(kv: &mut impl Kv, reserved: u64, kept: u64) -> Result<(), HistoryError> {
    let mut b = reserved.to_le_bytes().to_vec();
    b.extend_from_slice(&kept.to_le_bytes());
    kv.put(T::Meta, META_KEY, &b)
}

pub(crate) fn append(kv: &mut impl Kv, items: &[(u64, Vec<u8>)], keep: usize) -> Result<(), HistoryError> {
    let (reserved, mut kept) = meta(kv)?;
    for (seq, bytes) in items {
        kv.put(T::Detections, &seq.to_be_bytes(), bytes)?;
        kept += 1;
    }
    while kept > keep as u64 {
        let Some(k) = kv.first_key(T::Detections)? else { break };
        kv.del(T::Detections, &k)?;
        kept -= 1;
    }
    set_meta(kv, reserved, kept)
}

pub(crate) fn recent(kv: &impl KvRead, n: usize) -> Result<Vec<(u64, Vec<u8>)>, HistoryError> {
    let keys = kv.keys(T::Detections, &[0u8; 8], &[0xffu8; 9])?;
    let mut out = Vec::with_capacity(n.min(keys.len()));
    for k in &keys[keys.len().saturating_sub(n)..] {
        let seq = k.as_slice().try_into().map(u64::from_be_bytes).map_err(|_| HistoryError::BadRecord {
            key: "detections".into(),
            reason: "a key that is not a sequence number".into(),
        })?;
        if let Some(v) = kv.get(T::Detections, k)? {
            out.push((seq, v));
        }
    }
    Ok(out)
}

pub(crate) fn reserved(kv: &impl KvRead) -> Result<u64, HistoryError> {
    Ok(meta(kv)?.0)
}

pub(crate) fn reserve(kv: &mut impl Kv, upto: u64) -> Result<(), HistoryError> {
    let (reserved, kept) = meta(kv)?;
    set_meta(kv, reserved.max(upto), kept)
}

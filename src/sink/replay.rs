//! The hub's replay ring kept in the history store ([`crate::history::ReplayLog`]), so that a
//! subscriber resumes by sequence number across a restart of the server: each batch's
//! detections are appended (the last `grpc.replay` kept) before the batch is acked, and
//! sequence numbers are reserved in blocks ahead of use, so a restarted server continues above
//! every number its predecessor could have given out.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use prost::Message;

use super::grpc::Hub;
use super::Output;
use crate::history::{HistoryError, ReplayLog};
use crate::proto::Detection;

/// Sequence numbers reserved at a time. A new block is reserved once fewer than half remain,
/// at the end of a batch; no batch publishes anywhere near half a block.
pub const SEQUENCE_BLOCK: u64 = 1 << 20;

/// Restore the hub from `log`: its recent detections (those that do not decode are skipped,
/// logged) and numbering after everything reserved before; a new block is reserved first.
/// Returns the hub and the output that keeps the log up to date.
pub fn restore(log: Arc<dyn ReplayLog>, buffer: usize, replay: usize) -> Result<(Hub, ReplayOutput), HistoryError> {
    let reserved = log.reserved_sequence()?;
    let mut recent = Vec::new();
    for (seq, bytes) in log.recent_detections(replay)? {
        match Detection::decode(bytes.as_slice()) {
            Ok(d) if d.sequence == seq => recent.push(d),
            Ok(_) | Err(_) => tracing::warn!(sequence = seq, "replay log: an entry that does not decode; skipped"),
        }
    }
    let last = reserved.max(recent.last().map_or(0, |d| d.sequence));
    log.reserve_sequence(last + SEQUENCE_BLOCK)?;
    if !recent.is_empty() || last > 0 {
        tracing::info!(restored = recent.len(), continues_after = last, "gRPC replay ring restored from the history store");
    }
    let hub = Hub::restore(buffer, replay, recent, last);
    let out = ReplayOutput { log, hub: hub.clone(), keep: replay, reserved: AtomicU64::new(last + SEQUENCE_BLOCK) };
    Ok((hub, out))
}

/// Appends each batch's detections to the log and reserves more sequence numbers as needed.
pub struct ReplayOutput {
    log: Arc<dyn ReplayLog>,
    hub: Hub,
    keep: usize,
    reserved: AtomicU64,
}

#[tonic::async_trait]
impl Output for ReplayOutput {
    fn name(&self) -> &str {
        "replay"
    }

    async fn deliver(&self, detections: &[Arc<Detection>]) -> Result<(), String> {
        let items: Vec<(u64, Vec<u8>)> = detections.iter().map(|d| (d.sequence, d.encode_to_vec())).collect();
        let latest = self.hub.latest();
        let reserved = self.reserved.load(Ordering::SeqCst);
        let more = (latest + SEQUENCE_BLOCK / 2 > reserved).then_some(latest + SEQUENCE_BLOCK);
        let (log, keep) = (self.log.clone(), self.keep);
        tokio::task::spawn_blocking(move || {
            if let Some(upto) = more {
                log.reserve_sequence(upto)?;
            }
            log.append_detections(&items, keep)
        })
        .await
        .map_err(|e| format!("replay log task: {e}"))?
        .map_err(|e| e.to_string())?;
        if let Some(upto) = more {
            self.reserved.store(upto, Ordering::SeqCst);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::{HistoryConfig, HistoryStore, MemoryHistory};

    fn outcome(i: usize) -> crate::pipeline::Outcome {
        crate::sink::grpc::tests::outcome(i, crate::alert::Survey::Native, 6.0)
    }

    #[tokio::test]
    async fn a_restored_hub_replays_the_last_run_and_numbers_above_it() {
        let store: Arc<dyn HistoryStore> = Arc::new(MemoryHistory::new(&HistoryConfig::default()).unwrap());
        let log = store.clone().replay_log().unwrap();
        // First run: 7 detections, the ring keeps 5.
        let (hub, out) = restore(log.clone(), 16, 5).unwrap();
        let first: Vec<Arc<Detection>> = (0..7).map(|i| hub.publish(&outcome(i))).collect();
        out.deliver(&first[..3]).await.unwrap();
        out.deliver(&first[3..]).await.unwrap();
        assert_eq!(first.iter().map(|d| d.sequence).collect::<Vec<_>>(), (1..=7).collect::<Vec<_>>());
        // Second run: the last 5 come back; numbering goes on above the first run's block.
        let (hub2, _) = restore(log.clone(), 16, 5).unwrap();
        let (back, _) = hub2.resume(Some(2)).expect("retained");
        assert_eq!(back.iter().map(|d| d.sequence).collect::<Vec<_>>(), vec![3, 4, 5, 6, 7]);
        assert_eq!(back[0].alert_id, "a2");
        assert!(hub2.resume(Some(1)).is_err(), "1 and 2 are no longer kept");
        let next = hub2.publish(&outcome(7));
        assert!(next.sequence > SEQUENCE_BLOCK, "{}", next.sequence);
        // A client that saw numbers the first run gave out but did not keep resumes cleanly.
        let (after_gap, _) = hub2.resume(Some(7)).unwrap();
        assert_eq!(after_gap.iter().map(|d| d.sequence).collect::<Vec<_>>(), vec![next.sequence]);
    }
}

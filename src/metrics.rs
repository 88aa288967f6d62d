//! Counters shared by every stage, read by `Status` and by `blink demo`'s last line.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;

#[derive(Debug, Default)]
pub struct Metrics {
    /// Kafka messages (or replayed files) taken in.
    pub messages_in: AtomicU64,
    /// Messages whose every derived result was delivered (and so may be committed).
    pub messages_done: AtomicU64,
    /// Alerts decoded, plus messages that failed to decode as a whole: each is one unit that
    /// ends as exactly one result or one dead letter.
    pub alerts_in: AtomicU64,
    /// Results delivered to the sinks (one per processed alert).
    pub results_out: AtomicU64,
    /// Of those, results with |score| >= threshold.
    pub detected: AtomicU64,
    pub batches: AtomicU64,
    pub offsets_committed: AtomicU64,
    pub subscribers: AtomicU64,
    /// Epochs added to the object history store.
    pub epochs_stored: AtomicU64,
    /// Epochs the store already had (at-least-once redelivery): nothing added.
    pub history_duplicates: AtomicU64,
    /// Stack detections published (`timescale = "stack:<N>n"`).
    pub stack_detections: AtomicU64,
    /// History store failures: a failed put (its batch went to dead letters, reason `history`),
    /// or a failed read or announcement record while stacking.
    pub history_errors: AtomicU64,
    /// Failed deliveries to an output (`sink::Output`: the Kafka topic, the notifiers'
    /// outbox); a batch still failing after its retries stays unacknowledged.
    pub output_errors: AtomicU64,
    /// Objects whose stacks needed their epochs read from the store (not resident), and
    /// resident slots given up for room (`pipeline::ring`).
    pub stacks_from_store: AtomicU64,
    pub resident_evictions: AtomicU64,
    /// Consumer lag per assigned partition (`topic/partition` → messages behind the high
    /// watermark), from librdkafka's statistics.
    lag: Mutex<BTreeMap<String, i64>>,
    /// The notifier, when there is one (its own counters, for `Status`).
    notifier: std::sync::OnceLock<std::sync::Arc<crate::notify::Notifier>>,
    dead_letters: Mutex<BTreeMap<String, u64>>,
}

impl Metrics {
    /// Replace the lag table (the partitions assigned now, from the latest statistics).
    pub fn set_lag(&self, lag: impl IntoIterator<Item = (String, i64)>) {
        let mut map = self.lag.lock().unwrap_or_else(|p| p.into_inner());
        *map = lag.into_iter().collect();
    }

    /// Report `n`'s counters in `Status` (the first notifier set stays).
    pub fn set_notifier(&self, n: std::sync::Arc<crate::notify::Notifier>) {
        let _ = self.notifier.set(n);
    }

    /// The notifier's counters, when there is a notifier.
    pub fn notify_stats(&self) -> Option<crate::notify::NotifyStats> {
        self.notifier.get().map(|n| n.stats())
    }

    /// Consumer lag per `topic/partition`.
    pub fn lag(&self) -> BTreeMap<String, i64> {
        self.lag.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn add_dead_letter(&self, reason: &str) -> u64 {
        let mut map = self.dead_letters.lock().unwrap_or_else(|p| p.into_inner());
        let n = map.entry(reason.to_owned()).or_insert(0);
        *n += 1;
        *n
    }

    pub fn dead_letters(&self) -> BTreeMap<String, u64> {
        self.dead_letters.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn dead_letter_total(&self) -> u64 {
        self.dead_letters().values().sum()
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Relaxed)
    }

    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Relaxed);
    }
}

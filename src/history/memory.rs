//! [`MemoryHistory`]: the same tables and rules as the redb store, in `BTreeMap`s, for tests and
//! `blink demo`. Nothing survives the process.

use std::collections::BTreeMap;
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::alert::Survey;

use super::core::{self, Kv, KvRead, Rules, T};
use super::outbox::{self, NewNotification, Outbox, OutboxStats, PendingNotification, Queued, Settle};
use super::{Announcement, Epoch, HistoryConfig, HistoryError, HistoryStats, HistoryStore, ObjectHistory, PutOutcome};

/// The history store in memory. `config.path` and `rebuild_corrupt` are ignored.
pub struct MemoryHistory {
    rules: Rules,
    // Readers (the stacks of a batch's objects, spread over threads) share it; writers wait.
    tables: RwLock<Tables>,
}

#[derive(Default)]
struct Tables([BTreeMap<Vec<u8>, Vec<u8>>; T::ALL.len()]);

impl Tables {
    fn t(&self, t: T) -> &BTreeMap<Vec<u8>, Vec<u8>> {
        &self.0[t as usize]
    }
}

impl KvRead for Tables {
    fn get(&self, t: T, key: &[u8]) -> Result<Option<Vec<u8>>, HistoryError> {
        Ok(self.t(t).get(key).cloned())
    }
    fn keys(&self, t: T, lo: &[u8], hi: &[u8]) -> Result<Vec<Vec<u8>>, HistoryError> {
        if lo >= hi {
            return Ok(Vec::new());
        }
        Ok(self.t(t).range(lo.to_vec()..hi.to_vec()).map(|(k, _)| k.clone()).collect())
    }
    fn first_key(&self, t: T) -> Result<Option<Vec<u8>>, HistoryError> {
        Ok(self.t(t).keys().next().cloned())
    }
}

impl Kv for Tables {
    fn put(&mut self, t: T, key: &[u8], value: &[u8]) -> Result<(), HistoryError> {
        self.0[t as usize].insert(key.to_vec(), value.to_vec());
        Ok(())
    }
    fn del(&mut self, t: T, key: &[u8]) -> Result<(), HistoryError> {
        self.0[t as usize].remove(key);
        Ok(())
    }
}

impl MemoryHistory {
    pub fn new(config: &HistoryConfig) -> Result<MemoryHistory, HistoryError> {
        Ok(MemoryHistory { rules: Rules::new(config)?, tables: RwLock::new(Tables::default()) })
    }

    // Only a bug panics under the lock; the tables are still the best there is.
    fn read(&self) -> RwLockReadGuard<'_, Tables> {
        self.tables.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, Tables> {
        self.tables.write().unwrap_or_else(|p| p.into_inner())
    }
}

impl Outbox for MemoryHistory {
    fn queue_notifications(&self, items: &[NewNotification]) -> Result<Vec<Queued>, HistoryError> {
        // As `put_many`: only a bad rule name stops a call half-way, and the notifier checks
        // names at start-up.
        outbox::queue(&mut *self.write(), items)
    }

    fn due_notifications(&self, now_ms: u64, limit: usize) -> Result<Vec<PendingNotification>, HistoryError> {
        outbox::due(&*self.read(), now_ms, limit)
    }

    fn next_due_after(&self, after_ms: u64) -> Result<Option<u64>, HistoryError> {
        outbox::next_due_after(&*self.read(), after_ms)
    }

    fn settle_notifications(&self, list: &[(PendingNotification, Settle)]) -> Result<(), HistoryError> {
        outbox::settle(&mut *self.write(), list)
    }

    fn outbox_stats(&self) -> Result<OutboxStats, HistoryError> {
        outbox::stats(&*self.read())
    }

    fn forget_notified_before(&self, before_ms: u64, limit: usize) -> Result<u64, HistoryError> {
        outbox::forget_before(&mut *self.write(), before_ms, limit)
    }
}

impl super::ReplayLog for MemoryHistory {
    fn append_detections(&self, items: &[(u64, Vec<u8>)], keep: usize) -> Result<(), HistoryError> {
        super::replay::append(&mut *self.write(), items, keep)
    }

    fn recent_detections(&self, n: usize) -> Result<Vec<(u64, Vec<u8>)>, HistoryError> {
        super::replay::recent(&*self.read(), n)
    }

    fn reserved_sequence(&self) -> Result<u64, HistoryError> {
        super::replay::reserved(&*self.read())
    }

    fn reserve_sequence(&self, upto: u64) -> Result<(), HistoryError> {
        super::replay::reserve(&mut *self.write(), upto)
    }
}

impl HistoryStore for MemoryHistory {
    fn outbox(self: std::sync::Arc<Self>) -> Option<std::sync::Arc<dyn Outbox>> {
        Some(self)
    }

    fn replay_log(self: std::sync::Arc<Self>) -> Option<std::sync::Arc<dyn super::ReplayLog>> {
        Some(self)
    }

    fn put_many(&self, epochs: &[Epoch]) -> Result<Vec<PutOutcome>, HistoryError> {
        // The maps never fail and hold only records this process wrote, so a batch cannot stop
        // half-way (no copy-on-write needed for atomicity).
        core::put_batch(&mut *self.write(), &self.rules, epochs)
    }

    fn find(&self, survey: Survey, object_id: &str, ra: f64, dec: f64) -> Result<Option<String>, HistoryError> {
        core::find(&*self.read(), &self.rules, survey, object_id, ra, dec)
    }

    fn object(&self, key: &str) -> Result<Option<ObjectHistory>, HistoryError> {
        core::object(&*self.read(), key)
    }

    fn stats(&self) -> Result<HistoryStats, HistoryError> {
        core::stats(&*self.read())
    }

    fn announcements(&self, object: &str) -> Result<Vec<Announcement>, HistoryError> {
        core::announcements(&*self.read(), object)
    }

    fn record_announcements(&self, list: &[(String, Announcement)]) -> Result<(), HistoryError> {
        core::record_announcements(&mut *self.write(), list)
    }
}

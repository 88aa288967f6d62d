//! The notifiers' outbox (`src/notify`), kept in the history store so that redb's single file
//! holds it: notifications waiting to be sent, with their attempt count and next-attempt time,
//! and the deduplication keys of everything ever queued (until `forget_notified_before`).
//!
//! Tables (byte keys, as the rest of the store; written through `core`'s [`Kv`]):
//! - `outbox`: next attempt (unix ms, u64 BE), id (u64 BE) → record, so the first keys are the
//!   first due. Record, little-endian: `u8 version = 1`, `u32 attempts`, `u64 queued unix ms`,
//!   `u16 len + rule name`, `u32 len + payload` (the notifier's bytes: an encoded detection).
//! - `notified`: `<rule>\0<dedup key>` → queued unix ms (u64 LE): queued once, never again.
//! - `notified_by_time`: queued unix ms (u64 BE), notified key → (): oldest first, for forgetting.
//! - `meta` `outbox` → next id, pending, dedup keys kept (u64 LE each).

use super::core::{Kv, KvRead, T};
use super::HistoryError;

/// A notification to queue ([`Outbox::queue_notifications`]).
#[derive(Debug, Clone, PartialEq)]
pub struct NewNotification {
    /// The rule that asked for it (no NUL).
    pub rule: String,
    /// What makes it the same notification as an earlier one of the same rule (the notifier
    /// uses object id and timescale). Empty: never deduplicated.
    pub dedup_key: String,
    /// What to send, opaque to the store.
    pub payload: Vec<u8>,
    /// Queued at (unix ms); the first attempt is due then.
    pub now_ms: u64,
}

/// What became of one [`NewNotification`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Queued {
    /// In the outbox under this id.
    Queued { id: u64 },
    /// Its rule and dedup key were queued before: nothing written.
    Duplicate,
}

/// A notification in the outbox.
#[derive(Debug, Clone, PartialEq)]
pub struct PendingNotification {
    pub id: u64,
    pub rule: String,
    /// Attempts made so far (0 before the first).
    pub attempts: u32,
    /// When it was queued (unix ms).
    pub queued_ms: u64,
    /// When the next attempt is due (unix ms).
    pub next_attempt_ms: u64,
    pub payload: Vec<u8>,
}

/// How an attempt ended ([`Outbox::settle_notifications`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settle {
    /// Delivered or given up on: removed from the outbox (its dedup key stays).
    Remove,
    /// Try again at this time (unix ms); the attempt count goes up by one.
    Retry { next_attempt_ms: u64 },
    /// Not attempted (held back by a rate limit): due again at this time, same attempt count.
    Postpone { next_attempt_ms: u64 },
}

/// Outbox counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct OutboxStats {
    /// Notifications waiting in the outbox.
    pub pending: u64,
    /// Deduplication keys kept.
    pub dedup_keys: u64,
}

/// The notifiers' durable outbox. Every write is one commit, durable when it returns.
pub trait Outbox: Send + Sync {
    /// Queues notifications and records their dedup keys in one durable commit, one outcome per
    /// item in order. A key queued earlier, or earlier in the same call, is a
    /// [`Queued::Duplicate`].
    fn queue_notifications(&self, items: &[NewNotification]) -> Result<Vec<Queued>, HistoryError>;

    /// Up to `limit` notifications due at `now_ms`, first due first.
    fn due_notifications(&self, now_ms: u64, limit: usize) -> Result<Vec<PendingNotification>, HistoryError>;

    /// When the first notification due strictly after `after_ms` is due, if any.
    fn next_due_after(&self, after_ms: u64) -> Result<Option<u64>, HistoryError>;

    /// Applies attempt outcomes in one durable commit. One no longer in the outbox is skipped.
    fn settle_notifications(&self, list: &[(PendingNotification, Settle)]) -> Result<(), HistoryError>;

    /// Counts.
    fn outbox_stats(&self) -> Result<OutboxStats, HistoryError>;

    /// Drops up to `limit` dedup keys queued before `before_ms` (oldest first) and returns how
    /// many went: after that, the same rule and key may notify again.
    fn forget_notified_before(&self, before_ms: u64, limit: usize) -> Result<u64, HistoryError>;
}

const OUTBOX_KEY: &[u8] = b"outbox";
const RECORD_VERSION: u8 = 1;

#[derive(Debug, Clone, Copy, Default)]
struct Counters {
    next_id: u64,
    pending: u64,
    dedup_keys: u64,
}

fn bad(key: &[u8], reason: impl Into<String>) -> HistoryError {
    HistoryError::BadRecord { key: String::from_utf8_lossy(key).into_owned(), reason: reason.into() }
}

fn u64_at(b: &[u8], at: usize, le: bool) -> Option<u64> {
    let a: [u8; 8] = b.get(at..at.checked_add(8)?)?.try_into().ok()?;
    Some(if le { u64::from_le_bytes(a) } else { u64::from_be_bytes(a) })
}

fn load(kv: &impl KvRead) -> Result<Counters, HistoryError> {
    match kv.get(T::Meta, OUTBOX_KEY)? {
        None => Ok(Counters::default()),
        Some(b) if b.len() == 24 => Ok(Counters {
            next_id: u64_at(&b, 0, true).unwrap_or(0),
            pending: u64_at(&b, 8, true).unwrap_or(0),
            dedup_keys: u64_at(&b, 16, true).unwrap_or(0),
        }),
        Some(b) => Err(bad(OUTBOX_KEY, format!("outbox counters of {} bytes, want 24", b.len()))),
    }
}

fn store(kv: &mut impl Kv, c: &Counters) -> Result<(), HistoryError> {
    let mut b = c.next_id.to_le_bytes().to_vec();
    b.extend_from_slice(&c.pending.to_le_bytes());
    b.extend_from_slice(&c.dedup_keys.to_le_bytes());
    kv.put(T::Meta, OUTBOX_KEY, &b)
}

fn outbox_key(next_ms: u64, id: u64) -> Vec<u8> {
    let mut k = next_ms.to_be_bytes().to_vec();
    k.extend_from_slice(&id.to_be_bytes());
    k
}

fn encode(attempts: u32, queued_ms: u64, rule: &str, payload: &[u8]) -> Result<Vec<u8>, HistoryError> {
    let rule_len =
        u16::try_from(rule.len()).map_err(|_| HistoryError::Internal(format!("rule name of {} bytes", rule.len())))?;
    let payload_len = u32::try_from(payload.len())
        .map_err(|_| HistoryError::Internal(format!("payload of {} bytes", payload.len())))?;
    let mut r = Vec::with_capacity(19 + rule.len() + payload.len());
    r.push(RECORD_VERSION);
    r.extend_from_slice(&attempts.to_le_bytes());
    r.extend_from_slice(&queued_ms.to_le_bytes());
    r.extend_from_slice(&rule_len.to_le_bytes());
    r.extend_from_slice(rule.as_bytes());
    r.extend_from_slice(&payload_len.to_le_bytes());
    r.extend_from_slice(payload);
    Ok(r)
}

fn decode(key: &[u8], rec: &[u8]) -> Result<PendingNotification, HistoryError> {
    let (Some(next_attempt_ms), Some(id), 16) = (u64_at(key, 0, false), u64_at(key, 8, false), key.len()) else {
        return Err(bad(key, "outbox key, want 16 bytes"));
    };
    let short = || bad(key, "short outbox record");
    match rec.first() {
        Some(&RECORD_VERSION) => {}
        Some(v) => return Err(bad(key, format!("outbox record version {v}, this blink reads {RECORD_VERSION}"))),
        None => return Err(short()),
    }
    let attempts = u32::from_le_bytes(rec.get(1..5).ok_or_else(short)?.try_into().map_err(|_| short())?);
    let queued_ms = u64_at(rec, 5, true).ok_or_else(short)?;
    let rule_len = u16::from_le_bytes(rec.get(13..15).ok_or_else(short)?.try_into().map_err(|_| short())?) as usize;
    let rule_end = 15 + rule_len;
    let rule = std::str::from_utf8(rec.get(15..rule_end).ok_or_else(short)?)
        .map_err(|_| bad(key, "rule name not UTF-8"))?
        .to_owned();
    let plen = u32::from_le_bytes(rec.get(rule_end..rule_end + 4).ok_or_else(short)?.try_into().map_err(|_| short())?)
        as usize;
    let payload = rec.get(rule_end + 4..rule_end + 4 + plen).ok_or_else(short)?.to_vec();
    if rec.len() != rule_end + 4 + plen {
        return Err(bad(key, "trailing bytes after the outbox record"));
    }
    Ok(PendingNotification { id, rule, attempts, queued_ms, next_attempt_ms, payload })
}

fn notified_key(rule: &str, dedup: &str) -> Vec<u8> {
    let mut k = rule.as_bytes().to_vec();
    k.push(0);
    k.extend_from_slice(dedup.as_bytes());
    k
}

pub(crate) fn queue(kv: &mut impl Kv, items: &[NewNotification]) -> Result<Vec<Queued>, HistoryError> {
    // Checked before anything is written, so the in-memory store stays all or nothing too.
    if let Some(n) = items.iter().find(|n| n.rule.is_empty() || n.rule.as_bytes().contains(&0)) {
        return Err(HistoryError::Internal(format!("notification rule {:?}: empty or with a NUL", n.rule)));
    }
    let mut c = load(kv)?;
    let mut out = Vec::with_capacity(items.len());
    for n in items {
        if !n.dedup_key.is_empty() {
            let nk = notified_key(&n.rule, &n.dedup_key);
            if kv.get(T::Notified, &nk)?.is_some() {
                out.push(Queued::Duplicate);
                continue;
            }
            kv.put(T::Notified, &nk, &n.now_ms.to_le_bytes())?;
            let mut tk = n.now_ms.to_be_bytes().to_vec();
            tk.extend_from_slice(&nk);
            kv.put(T::NotifiedByTime, &tk, &[])?;
            c.dedup_keys += 1;
        }
        let id = c.next_id;
        c.next_id += 1;
        kv.put(T::Outbox, &outbox_key(n.now_ms, id), &encode(0, n.now_ms, &n.rule, &n.payload)?)?;
        c.pending += 1;
        out.push(Queued::Queued { id });
    }
    store(kv, &c)?;
    Ok(out)
}

pub(crate) fn due(kv: &impl KvRead, now_ms: u64, limit: usize) -> Result<Vec<PendingNotification>, HistoryError> {
    let hi = outbox_key(now_ms, u64::MAX);
    let mut out = Vec::new();
    // `keys` has no limit; read the due range and stop decoding at `limit`.
    for k in kv.keys(T::Outbox, &[], &hi)?.into_iter().take(limit) {
        let rec = kv.get(T::Outbox, &k)?.ok_or_else(|| bad(&k, "outbox key vanished"))?;
        out.push(decode(&k, &rec)?);
    }
    // The bound excludes (now_ms, u64::MAX) itself; an id that large never happens.
    Ok(out)
}

pub(crate) fn next_due_after(kv: &impl KvRead, after_ms: u64) -> Result<Option<u64>, HistoryError> {
    let Some(from) = after_ms.checked_add(1) else { return Ok(None) };
    let lo = outbox_key(from, 0);
    let hi = [0xFFu8; 17];
    // Only the first key is needed, but the Kv interface reads a range; the outbox is small
    // compared with the epochs, and this runs once per delivery loop turn.
    Ok(kv.keys(T::Outbox, &lo, &hi)?.first().and_then(|k| u64_at(k, 0, false)))
}

pub(crate) fn settle(kv: &mut impl Kv, list: &[(PendingNotification, Settle)]) -> Result<(), HistoryError> {
    let mut c = load(kv)?;
    for (p, s) in list {
        let key = outbox_key(p.next_attempt_ms, p.id);
        let Some(rec) = kv.get(T::Outbox, &key)? else { continue };
        let cur = decode(&key, &rec)?;
        kv.del(T::Outbox, &key)?;
        match *s {
            Settle::Remove => c.pending = c.pending.saturating_sub(1),
            Settle::Retry { next_attempt_ms } | Settle::Postpone { next_attempt_ms } => {
                let attempts =
                    if matches!(s, Settle::Retry { .. }) { cur.attempts.saturating_add(1) } else { cur.attempts };
                let rec = encode(attempts, cur.queued_ms, &cur.rule, &cur.payload)?;
                kv.put(T::Outbox, &outbox_key(next_attempt_ms, cur.id), &rec)?;
            }
        }
    }
    store(kv, &c)
}

pub(crate) fn stats(kv: &impl KvRead) -> Result<OutboxStats, HistoryError> {
    let c = load(kv)?;
    Ok(OutboxStats { pending: c.pending, dedup_keys: c.dedup_keys })
}

pub(crate) fn forget_before(kv: &mut impl Kv, before_ms: u64, limit: usize) -> Result<u64, HistoryError> {
    let mut c = load(kv)?;
    let mut n = 0;
    for tk in kv.keys(T::NotifiedByTime, &[], &before_ms.to_be_bytes())?.into_iter().take(limit) {
        let nk = tk.get(8..).ok_or_else(|| bad(&tk, "short notified time key"))?;
        kv.del(T::Notified, nk)?;
        kv.del(T::NotifiedByTime, &tk)?;
        c.dedup_keys = c.dedup_keys.saturating_sub(1);
        n += 1;
    }
    store(kv, &c)?;
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::{HistoryConfig, MemoryHistory, RedbHistory};
    use rand::Rng;

    fn n(rule: &str, key: &str, now_ms: u64, payload: &[u8]) -> NewNotification {
        NewNotification { rule: rule.into(), dedup_key: key.into(), payload: payload.to_vec(), now_ms }
    }

    fn exercise(o: &dyn Outbox) {
        let mut rng = crate::testing::rng();
        let payload: Vec<u8> = (0..rng.gen_range(0..300)).map(|_| rng.gen()).collect();
        let t0: u64 = rng.gen_range(1_600_000_000_000..1_900_000_000_000);
        let q = o
            .queue_notifications(&[
                n("a", "X\0epoch", t0, &payload),
                n("a", "X\0epoch", t0, b"2"),
                n("b", "X\0epoch", t0 + 5, b"3"),
            ])
            .unwrap();
        assert!(
            matches!(q[0], Queued::Queued { .. }) && q[1] == Queued::Duplicate && matches!(q[2], Queued::Queued { .. })
        );
        assert_eq!(o.queue_notifications(&[n("a", "X\0epoch", t0 + 9, b"")]).unwrap(), vec![Queued::Duplicate]);
        assert_eq!(o.outbox_stats().unwrap(), OutboxStats { pending: 2, dedup_keys: 2 });
        assert!(o.due_notifications(t0 - 1, 10).unwrap().is_empty());
        let due = o.due_notifications(t0 + 5, 10).unwrap();
        assert_eq!(due.len(), 2);
        assert_eq!((due[0].rule.as_str(), due[0].attempts, &due[0].payload), ("a", 0, &payload));
        assert_eq!(o.due_notifications(t0 + 5, 1).unwrap().len(), 1);
        assert_eq!(o.next_due_after(t0).unwrap(), Some(t0 + 5));
        assert_eq!(o.next_due_after(t0 + 5).unwrap(), None);
        o.settle_notifications(&[
            (due[0].clone(), Settle::Retry { next_attempt_ms: t0 + 100 }),
            (due[1].clone(), Settle::Remove),
        ])
        .unwrap();
        // Settling again what is gone changes nothing.
        o.settle_notifications(&[(due[1].clone(), Settle::Remove)]).unwrap();
        assert_eq!(o.outbox_stats().unwrap().pending, 1);
        assert!(o.due_notifications(t0 + 99, 10).unwrap().is_empty());
        let again = o.due_notifications(t0 + 100, 10).unwrap();
        assert_eq!((again[0].attempts, again[0].queued_ms, again[0].id), (1, t0, due[0].id));
        o.settle_notifications(&[(again[0].clone(), Settle::Postpone { next_attempt_ms: t0 + 200 })]).unwrap();
        let later = o.due_notifications(t0 + 200, 10).unwrap();
        assert_eq!(later[0].attempts, 1);
        // Forgetting keys lets the same notification be queued again.
        assert_eq!(o.forget_notified_before(t0 + 1, 100).unwrap(), 1);
        assert_eq!(o.outbox_stats().unwrap().dedup_keys, 1);
        assert!(matches!(o.queue_notifications(&[n("a", "X\0epoch", t0 + 9, b"")]).unwrap()[0], Queued::Queued { .. }));
        assert_eq!(o.queue_notifications(&[n("b", "X\0epoch", t0, b"")]).unwrap(), vec![Queued::Duplicate]);
        // An empty key never deduplicates.
        let q = o.queue_notifications(&[n("c", "", t0, b""), n("c", "", t0, b"")]).unwrap();
        assert!(q.iter().all(|q| matches!(q, Queued::Queued { .. })));
        assert!(o.queue_notifications(&[n("bad\0rule", "k", t0, b"")]).is_err());
    }

    #[test]
    fn memory_outbox_queues_dedups_and_settles() {
        exercise(&MemoryHistory::new(&HistoryConfig::default()).unwrap());
    }

    #[test]
    fn redb_outbox_survives_reopen() {
        let dir = tempdir();
        let cfg = HistoryConfig::at(dir.join("h.redb"));
        {
            let h = RedbHistory::open(&cfg).unwrap();
            exercise(&h);
        }
        let h = RedbHistory::open(&cfg).unwrap();
        let s = h.outbox_stats().unwrap();
        assert_eq!(s.pending, 4);
        assert_eq!(h.due_notifications(u64::MAX - 1, 10).unwrap().len(), 4);
        let _ = std::fs::remove_dir_all(dir);
    }

    fn tempdir() -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("blink-outbox-{}-{}", std::process::id(), rand::random::<u64>()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}

//! The logic both stores share: matching, deduplication, retention and queries, written once
//! against six ordered byte tables ([`KvRead`], [`Kv`]). [`super::RedbHistory`] runs it inside
//! one redb write transaction per batch, [`super::MemoryHistory`] on `BTreeMap`s under a mutex.
//!
//! Tables (layouts in `record`):
//! - `Objects`: object key → object entry (survey, object id, position, epoch count).
//! - `Epochs`: alert key (survey, alert id) → epoch record. Its presence is the duplicate test.
//! - `ByObject`: object key, band, MJD, alert key → (): an object's epochs in band, MJD order.
//! - `ByTime`: MJD, alert key → (): all epochs, oldest first, for eviction.
//! - `Sky`: survey and depth-14 HEALPix cell, object key → (): the positional index.
//! - `Meta`: `format` and `counters`, and the stack announcements:
//!   `announced\0<object key>\0<band>\0<nights, f64 BE bits>` → score f64, MJD f64 (LE);
//!   and `outbox` (the notification outbox's counters, `outbox.rs`).
//! - `Outbox`, `Notified`, `NotifiedByTime`: the notifiers' pending notifications and
//!   deduplication keys (`outbox.rs`).
//! - `Detections`: the gRPC hub's recent detections and reserved sequence numbers, so a
//!   subscriber can resume across a restart (`replay.rs`).

use crate::alert::Survey;

use super::record::{self, Counters, ObjectMeta};
use super::sky::{self, INDEX_DEPTH, KEY_DEPTH};
use super::{Announcement, Epoch, HistoryConfig, HistoryError, HistoryStats, ObjectHistory, PutOutcome};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum T {
    Objects,
    Epochs,
    ByObject,
    ByTime,
    Sky,
    Meta,
    Outbox,
    Notified,
    NotifiedByTime,
    Detections,
}

impl T {
    pub const ALL: [T; 10] = [
        T::Objects,
        T::Epochs,
        T::ByObject,
        T::ByTime,
        T::Sky,
        T::Meta,
        T::Outbox,
        T::Notified,
        T::NotifiedByTime,
        T::Detections,
    ];

    pub fn name(self) -> &'static str {
        match self {
            T::Objects => "objects",
            T::Epochs => "epochs",
            T::ByObject => "by_object",
            T::ByTime => "by_time",
            T::Sky => "sky",
            T::Meta => "meta",
            T::Outbox => "outbox",
            T::Notified => "notified",
            T::NotifiedByTime => "notified_by_time",
            T::Detections => "detections",
        }
    }
}

/// Reads of the six tables.
pub(crate) trait KvRead {
    fn get(&self, t: T, key: &[u8]) -> Result<Option<Vec<u8>>, HistoryError>;
    /// Keys in `[lo, hi)`, ascending.
    fn keys(&self, t: T, lo: &[u8], hi: &[u8]) -> Result<Vec<Vec<u8>>, HistoryError>;
    fn first_key(&self, t: T) -> Result<Option<Vec<u8>>, HistoryError>;
}

/// Writes, inside whatever makes a batch atomic.
pub(crate) trait Kv: KvRead {
    fn put(&mut self, t: T, key: &[u8], value: &[u8]) -> Result<(), HistoryError>;
    fn del(&mut self, t: T, key: &[u8]) -> Result<(), HistoryError>;
}

/// The meta table's `format` entry: layout version and index depth. A file with another is
/// refused rather than misread.
pub(crate) const FORMAT_KEY: &[u8] = b"format";
pub(crate) const FORMAT: [u8; 2] = [1, INDEX_DEPTH];
const COUNTERS_KEY: &[u8] = b"counters";
const ANNOUNCED: &[u8] = b"announced\0";

fn announced_prefix(object: &str) -> Vec<u8> {
    let mut k = ANNOUNCED.to_vec();
    k.extend_from_slice(object.as_bytes());
    k.push(0);
    k
}

/// An object's stack announcements, by band and window.
pub(crate) fn announcements(kv: &impl KvRead, object: &str) -> Result<Vec<Announcement>, HistoryError> {
    let lo = announced_prefix(object);
    let mut hi = lo.clone();
    if let Some(last) = hi.last_mut() {
        *last = 1;
    }
    let mut out = Vec::new();
    for key in kv.keys(T::Meta, &lo, &hi)? {
        let rest = key.get(lo.len()..).unwrap_or_default();
        let parsed = rest.iter().position(|b| *b == 0).and_then(|nul| {
            let band = std::str::from_utf8(rest.get(..nul)?).ok()?;
            let nights = f64::from_bits(u64::from_be_bytes(rest.get(nul + 1..)?.try_into().ok()?));
            Some((band.to_owned(), nights))
        });
        let value = kv.get(T::Meta, &key)?.unwrap_or_default();
        let fields = value.get(..16).and_then(|v| {
            let score = f64::from_le_bytes(v.get(..8)?.try_into().ok()?);
            let mjd = f64::from_le_bytes(v.get(8..16)?.try_into().ok()?);
            Some((score, mjd))
        });
        match (parsed, fields, value.len()) {
            (Some((band, nights)), Some((score, mjd)), 16) => out.push(Announcement { band, nights, score, mjd }),
            _ => return Err(bad(&key, "announcement entry")),
        }
    }
    Ok(out)
}

/// Upsert announcements, one per (object, band, window).
pub(crate) fn record_announcements(kv: &mut impl Kv, list: &[(String, Announcement)]) -> Result<(), HistoryError> {
    for (object, a) in list {
        if a.band.as_bytes().contains(&0) || object.as_bytes().contains(&0) {
            return Err(HistoryError::Internal(format!("announcement of {object:?} band {:?}: NUL in a name", a.band)));
        }
        let mut key = announced_prefix(object);
        key.extend_from_slice(a.band.as_bytes());
        key.push(0);
        key.extend_from_slice(&a.nights.to_bits().to_be_bytes());
        let mut value = a.score.to_le_bytes().to_vec();
        value.extend_from_slice(&a.mjd.to_le_bytes());
        kv.put(T::Meta, &key, &value)?;
    }
    Ok(())
}

/// Forget an object's announcements (its last epoch went).
fn drop_announcements(kv: &mut impl Kv, object: &str) -> Result<(), HistoryError> {
    let lo = announced_prefix(object);
    let mut hi = lo.clone();
    if let Some(last) = hi.last_mut() {
        *last = 1;
    }
    for key in kv.keys(T::Meta, &lo, &hi)? {
        kv.del(T::Meta, &key)?;
    }
    Ok(())
}

/// The configured rules, validated.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Rules {
    pub retention_days: f64,
    pub max_bytes: u64,
    pub radius_rad: f64,
}

impl Rules {
    pub fn new(cfg: &HistoryConfig) -> Result<Rules, HistoryError> {
        cfg.validate()?;
        Ok(Rules {
            retention_days: cfg.retention_days,
            max_bytes: cfg.max_bytes,
            radius_rad: (cfg.match_radius_arcsec / 3600.0).to_radians(),
        })
    }

    fn cutoff(&self, c: &Counters) -> Option<f64> {
        c.newest_mjd.map(|n| n - self.retention_days)
    }
}

fn bad(key: &[u8], reason: impl Into<String>) -> HistoryError {
    HistoryError::BadRecord { key: String::from_utf8_lossy(key).into_owned(), reason: reason.into() }
}

/// As [`bad`], naming an alert key as `<survey>:<alert id>`.
fn bad_alert(akey: &[u8], reason: impl Into<String>) -> HistoryError {
    HistoryError::BadRecord { key: record::describe_alert_key(akey), reason: reason.into() }
}

pub(crate) fn load_counters(kv: &impl KvRead) -> Result<Counters, HistoryError> {
    match kv.get(T::Meta, COUNTERS_KEY)? {
        Some(b) => Counters::decode(&b).map_err(|r| bad(COUNTERS_KEY, r)),
        None => Ok(Counters::default()),
    }
}

pub(crate) fn stats(kv: &impl KvRead) -> Result<HistoryStats, HistoryError> {
    load_counters(kv)
}

/// Applies a batch in order and updates the counters once. The caller commits (or drops) `kv`.
pub(crate) fn put_batch(kv: &mut impl Kv, rules: &Rules, epochs: &[Epoch]) -> Result<Vec<PutOutcome>, HistoryError> {
    let mut c = load_counters(kv)?;
    let mut out = Vec::with_capacity(epochs.len());
    for e in epochs {
        out.push(match record::validate(e) {
            Err(why) => PutOutcome::Rejected(format!("alert {} {}: {why}", e.survey, e.alert_id)),
            Ok(()) => put_one(kv, rules, &mut c, e)?,
        });
    }
    kv.put(T::Meta, COUNTERS_KEY, &c.encode())?;
    Ok(out)
}

fn put_one(kv: &mut impl Kv, rules: &Rules, c: &mut Counters, e: &Epoch) -> Result<PutOutcome, HistoryError> {
    let akey = record::alert_key(e.survey, &e.alert_id);
    if let Some(rec) = kv.get(T::Epochs, &akey)? {
        let (object, _) = record::decode_epoch(&rec).map_err(|r| bad_alert(&akey, r))?;
        c.duplicates += 1;
        return Ok(PutOutcome::Duplicate { object });
    }
    if rules.cutoff(c).is_some_and(|cut| e.mjd < cut) {
        c.expired_on_arrival += 1;
        return Ok(PutOutcome::Expired);
    }
    let (okey, mut meta, new_object) = match matching(kv, rules, e.survey, &e.object_id, e.ra, e.dec)? {
        Some((okey, meta)) => (okey, meta, false),
        None => {
            let meta =
                ObjectMeta { survey: e.survey, object_id: e.object_id.clone(), ra: e.ra, dec: e.dec, n_epochs: 0 };
            (new_object_key(kv, e)?, meta, true)
        }
    };
    let rec = record::encode_epoch(&okey, e);
    kv.put(T::Epochs, &akey, &rec)?;
    kv.put(T::ByObject, &record::object_epoch_key(&okey, &e.band, e.mjd, &akey), &[])?;
    kv.put(T::ByTime, &record::time_key(e.mjd, &akey), &[])?;
    meta.n_epochs += 1;
    kv.put(T::Objects, okey.as_bytes(), &meta.encode())?;
    if new_object {
        kv.put(T::Sky, &record::sky_key(e.survey, sky::cell(INDEX_DEPTH, meta.ra, meta.dec), &okey), &[])?;
        c.objects += 1;
    }
    c.epochs += 1;
    c.bytes += rec.len() as u64;
    c.newest_mjd = Some(c.newest_mjd.map_or(e.mjd, |n| n.max(e.mjd)));
    evict(kv, rules, c)?;
    Ok(PutOutcome::Added { object: okey, new_object })
}

/// The object an alert joins, if it exists: by survey object id when there is one, else the
/// nearest object of the same survey within the match radius.
fn matching(
    kv: &impl KvRead,
    rules: &Rules,
    survey: Survey,
    object_id: &str,
    ra: f64,
    dec: f64,
) -> Result<Option<(String, ObjectMeta)>, HistoryError> {
    if !object_id.is_empty() {
        let key = id_key(survey, object_id);
        return Ok(object_meta(kv, &key)?.map(|m| (key, m)));
    }
    let mut best: Option<(f64, String, ObjectMeta)> = None;
    for (lo, hi) in sky::cone_ranges(ra, dec, rules.radius_rad) {
        for k in kv.keys(T::Sky, &record::sky_prefix(survey, lo), &record::sky_prefix(survey, hi))? {
            let okey = record::object_key_of_sky(&k).ok_or_else(|| bad(&k, "sky index key without an object key"))?;
            let meta = object_meta(kv, okey)?.ok_or_else(|| bad(&k, "sky index names a missing object"))?;
            let d = sky::distance_rad(ra, dec, meta.ra, meta.dec);
            // Nearest wins; a tie goes to the smaller key, so the choice never depends on order.
            let better = best.as_ref().is_none_or(|(bd, bk, _)| d < *bd || (d == *bd && okey < bk.as_str()));
            if d <= rules.radius_rad && better {
                best = Some((d, okey.to_owned(), meta));
            }
        }
    }
    Ok(best.map(|(_, k, m)| (k, m)))
}

fn id_key(survey: Survey, object_id: &str) -> String {
    format!("{survey}:id:{object_id}")
}

/// Key of a new object: from its survey id, or from the fine HEALPix cell of its first epoch
/// (with the alert id added in the unlikely case that cell already names an object).
fn new_object_key(kv: &impl KvRead, e: &Epoch) -> Result<String, HistoryError> {
    if !e.object_id.is_empty() {
        return Ok(id_key(e.survey, &e.object_id));
    }
    let key = format!("{}:hpx{KEY_DEPTH}:{}", e.survey, sky::cell(KEY_DEPTH, e.ra, e.dec));
    if kv.get(T::Objects, key.as_bytes())?.is_none() {
        Ok(key)
    } else {
        Ok(format!("{key}~{}", e.alert_id))
    }
}

fn object_meta(kv: &impl KvRead, key: &str) -> Result<Option<ObjectMeta>, HistoryError> {
    kv.get(T::Objects, key.as_bytes())?.map(|b| ObjectMeta::decode(&b).map_err(|r| bad(key.as_bytes(), r))).transpose()
}

enum Why {
    Age,
    Size,
}

/// Drops the oldest epochs while any is past the retention window or the records exceed the size
/// bound.
fn evict(kv: &mut impl Kv, rules: &Rules, c: &mut Counters) -> Result<(), HistoryError> {
    while let Some(k) = kv.first_key(T::ByTime)? {
        let (mjd, akey) = record::split_time_key(&k).ok_or_else(|| bad(&k, "short age index key"))?;
        let why = if rules.cutoff(c).is_some_and(|cut| mjd < cut) {
            Why::Age
        } else if c.bytes > rules.max_bytes {
            Why::Size
        } else {
            break;
        };
        remove_epoch(kv, c, akey)?;
        match why {
            Why::Age => c.evicted_by_age += 1,
            Why::Size => c.evicted_by_size += 1,
        }
    }
    Ok(())
}

fn remove_epoch(kv: &mut impl Kv, c: &mut Counters, akey: &[u8]) -> Result<(), HistoryError> {
    let rec = kv.get(T::Epochs, akey)?.ok_or_else(|| bad_alert(akey, "age index names a missing epoch"))?;
    let (okey, e) = record::decode_epoch(&rec).map_err(|r| bad_alert(akey, r))?;
    kv.del(T::Epochs, akey)?;
    kv.del(T::ByObject, &record::object_epoch_key(&okey, &e.band, e.mjd, akey))?;
    kv.del(T::ByTime, &record::time_key(e.mjd, akey))?;
    let mut meta = object_meta(kv, &okey)?.ok_or_else(|| bad_alert(akey, format!("epoch of missing object {okey}")))?;
    meta.n_epochs = meta.n_epochs.saturating_sub(1);
    if meta.n_epochs == 0 {
        kv.del(T::Objects, okey.as_bytes())?;
        drop_announcements(kv, &okey)?;
        kv.del(T::Sky, &record::sky_key(meta.survey, sky::cell(INDEX_DEPTH, meta.ra, meta.dec), &okey))?;
        c.objects = c.objects.saturating_sub(1);
    } else {
        kv.put(T::Objects, okey.as_bytes(), &meta.encode())?;
    }
    c.epochs = c.epochs.saturating_sub(1);
    c.bytes = c.bytes.saturating_sub(rec.len() as u64);
    Ok(())
}

pub(crate) fn find(
    kv: &impl KvRead,
    rules: &Rules,
    survey: Survey,
    object_id: &str,
    ra: f64,
    dec: f64,
) -> Result<Option<String>, HistoryError> {
    if !ra.is_finite() || !dec.is_finite() {
        return Ok(None);
    }
    Ok(matching(kv, rules, survey, object_id, ra, dec)?.map(|(k, _)| k))
}

pub(crate) fn object(kv: &impl KvRead, key: &str) -> Result<Option<ObjectHistory>, HistoryError> {
    let Some(meta) = object_meta(kv, key)? else { return Ok(None) };
    let (lo, hi) = record::object_range(key);
    let mut h = ObjectHistory {
        key: key.to_owned(),
        survey: meta.survey,
        object_id: meta.object_id,
        ra: meta.ra,
        dec: meta.dec,
        bands: Default::default(),
    };
    for k in kv.keys(T::ByObject, &lo, &hi)? {
        let akey = record::alert_key_of_object_epoch(&k).ok_or_else(|| bad(&k, "short object index key"))?;
        let rec =
            kv.get(T::Epochs, akey)?.ok_or_else(|| bad_alert(akey, format!("object {key} lists a missing epoch")))?;
        let (_, e) = record::decode_epoch(&rec).map_err(|r| bad_alert(akey, r))?;
        // Keys come in band, then MJD order.
        h.bands.entry(e.band.clone()).or_default().push(e);
    }
    Ok(Some(h))
}

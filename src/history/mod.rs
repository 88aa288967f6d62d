//! The object history store: past difference stamps and measurements per object, for stacking
//! and for `GetObject`.
//!
//! Everything goes through the [`HistoryStore`] trait. [`RedbHistory`] is the embedded default,
//! one crash-safe file on local disk (redb); [`MemoryHistory`] keeps the same tables in memory for
//! tests and `blink demo`. Both run the same matching, deduplication and retention code
//! (`core`), so they answer alike. `docs/history.md` has the whole story.
//!
//! # Layout
//! - [`config`]: [`HistoryConfig`], the `[history]` section.
//! - `record`: byte layouts (the versioned epoch record, object entries, counters, index keys).
//! - `sky`: HEALPix cells (NESTED) and the cone search behind positional matching.
//! - `core`: the tables as a small key-value interface, and put/evict/query on top of it.
//! - `disk`: [`RedbHistory`]. `memory`: [`MemoryHistory`].
//! - [`outbox`]: the notifiers' outbox ([`Outbox`]) in the same store: pending notifications
//!   and deduplication keys (`src/notify`).

pub mod config;
mod core;
mod disk;
mod memory;
pub mod outbox;
mod record;
pub mod replay;
pub(crate) mod sky;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::path::PathBuf;

use crate::alert::{Alert, Image, Survey};

pub use config::HistoryConfig;
pub use disk::RedbHistory;
pub use memory::MemoryHistory;
pub use outbox::Outbox;
pub use replay::ReplayLog;
pub use record::{MAX_PSF_SIDE, MAX_STAMP_SIDE, RECORD_VERSION};
pub use sky::INDEX_DEPTH;

/// Where past epochs are kept. Object-safe: the pipeline holds an `Arc<dyn HistoryStore>`.
pub trait HistoryStore: Send + Sync {
    /// Adds a batch of epochs in one transaction and returns one outcome per epoch, in order.
    /// When this returns `Ok` the whole batch is durable (the pipeline acks alerts only then);
    /// on `Err` none of it is stored. A bad epoch is a [`PutOutcome::Rejected`], not an error.
    fn put_many(&self, epochs: &[Epoch]) -> Result<Vec<PutOutcome>, HistoryError>;

    /// Adds one epoch, committed durably before it returns.
    fn put(&self, epoch: &Epoch) -> Result<PutOutcome, HistoryError> {
        self.put_many(std::slice::from_ref(epoch))?
            .pop()
            .ok_or_else(|| HistoryError::Internal("put_many returned no outcome".into()))
    }

    /// The key of the object an alert with this survey object id (empty for none) and position
    /// would join, if that object exists. Nothing is written.
    fn find(&self, survey: Survey, object_id: &str, ra: f64, dec: f64) -> Result<Option<String>, HistoryError>;

    /// One object and all its stored epochs, by band, each band sorted by MJD.
    fn object(&self, key: &str) -> Result<Option<ObjectHistory>, HistoryError>;

    /// Counts and sizes.
    fn stats(&self) -> Result<HistoryStats, HistoryError>;

    /// The stack detections announced for an object, one per band and window (the latest).
    fn announcements(&self, object: &str) -> Result<Vec<Announcement>, HistoryError>;

    /// Records announcements (object key, announcement), replacing the object's earlier one for
    /// the same band and window, in one durable commit. They go when the object's last epoch
    /// goes.
    fn record_announcements(&self, list: &[(String, Announcement)]) -> Result<(), HistoryError>;

    /// The notifiers' [`Outbox`] kept in the same store (the same redb file), if this store has
    /// one. `RedbHistory` and `MemoryHistory` do.
    fn outbox(self: std::sync::Arc<Self>) -> Option<std::sync::Arc<dyn Outbox>> {
        None
    }

    /// The gRPC hub's [`ReplayLog`] kept in the same store, if this store has one.
    /// `RedbHistory` and `MemoryHistory` do.
    fn replay_log(self: std::sync::Arc<Self>) -> Option<std::sync::Arc<dyn ReplayLog>> {
        None
    }
}

/// The last stack detection published for one object, band and window: the pipeline
/// announces again only when the score has grown enough since (`docs/stacking.md`,
/// "Streaming"). Kept in the store so a restart does not announce again.
#[derive(Debug, Clone, PartialEq)]
pub struct Announcement {
    pub band: String,
    /// The window, nights.
    pub nights: f64,
    /// The stack's score when announced, sigma (signed).
    pub score: f64,
    /// The epoch (MJD) the stack was made at.
    pub mjd: f64,
}

/// One epoch of one object: what stacking needs from a processed alert.
#[derive(Debug, Clone, PartialEq)]
pub struct Epoch {
    pub survey: Survey,
    /// The survey's alert id ([`Alert::alert_id`]); with `survey`, the deduplication key.
    pub alert_id: String,
    /// The survey's object id ([`Alert::object_id`]), empty when the survey gave none.
    pub object_id: String,
    pub band: String,
    /// Epoch of the observation, MJD (TAI), as [`Alert::mjd_tai`].
    pub mjd: f64,
    /// Candidate position, degrees (ICRS).
    pub ra: f64,
    pub dec: f64,
    /// Sub-pixel candidate position in the stamps (0-based, x = column, y = row).
    pub stamp_x: f64,
    pub stamp_y: f64,
    pub stamps: EpochStamps,
    pub measurement: Measurement,
}

/// The planes of one epoch. Pixels are kept bit for bit (NaN included).
#[derive(Debug, Clone, PartialEq)]
pub struct EpochStamps {
    /// blink's difference stamp.
    pub difference: Image,
    /// Its per-pixel variance, same shape.
    pub variance: Image,
    /// The part of `variance` that comes from the (convolved) template, same shape. The template
    /// is common to every epoch, so a stack must not average this part down as independent noise.
    pub template_variance: Image,
    /// PSF of the difference at the candidate, odd width and height, centred on its middle pixel.
    pub psf: Image,
}

/// What the engine measured on the epoch ([`crate::engine::SubtractionResult`]).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Measurement {
    pub flux: f32,
    pub flux_err: f32,
    /// Detection score in sigma (signed).
    pub score: f32,
}

impl From<&crate::engine::SubtractionResult> for Measurement {
    fn from(r: &crate::engine::SubtractionResult) -> Measurement {
        Measurement { flux: r.flux, flux_err: r.flux_err, score: r.score }
    }
}

impl Epoch {
    /// The epoch of a processed alert: ids, band, time and position from the alert, the planes
    /// and the measurement from the engine.
    pub fn from_alert(alert: &Alert, stamps: EpochStamps, measurement: Measurement) -> Epoch {
        Epoch {
            survey: alert.survey,
            alert_id: alert.alert_id.clone(),
            object_id: alert.object_id.clone(),
            band: alert.band.clone(),
            mjd: alert.mjd_tai,
            ra: alert.ra,
            dec: alert.dec,
            stamp_x: alert.candidate.stamp_x,
            stamp_y: alert.candidate.stamp_y,
            stamps,
            measurement,
        }
    }
}

/// What became of one epoch handed to [`HistoryStore::put_many`].
#[derive(Debug, Clone, PartialEq)]
pub enum PutOutcome {
    /// Stored under `object`; `new_object` when this epoch created it.
    Added { object: String, new_object: bool },
    /// An epoch with this survey and alert id is already stored (at-least-once delivery):
    /// nothing changed.
    Duplicate { object: String },
    /// Older than the retention window before the newest epoch seen: not stored.
    Expired,
    /// Unusable (shapes, ids, non-finite position...): not stored; the reason says why.
    Rejected(String),
}

/// One object and its epochs.
#[derive(Debug, Clone, PartialEq)]
pub struct ObjectHistory {
    /// `<survey>:id:<object id>`, or for an object matched by position only,
    /// `<survey>:hpx29:<NESTED depth-29 cell of its first epoch>`.
    pub key: String,
    pub survey: Survey,
    /// The survey's object id, empty for an object matched by position.
    pub object_id: String,
    /// Where the object is, degrees: the position of the first epoch stored for it.
    pub ra: f64,
    pub dec: f64,
    /// Epochs by band, each sorted by MJD (then alert id).
    pub bands: BTreeMap<String, Vec<Epoch>>,
}

impl ObjectHistory {
    /// Every epoch, all bands, sorted by MJD (then band, then alert id).
    pub fn epochs(&self) -> Vec<&Epoch> {
        let mut all: Vec<&Epoch> = self.bands.values().flatten().collect();
        all.sort_by(|a, b| {
            a.mjd.total_cmp(&b.mjd).then_with(|| a.band.cmp(&b.band)).then_with(|| a.alert_id.cmp(&b.alert_id))
        });
        all
    }

    /// Number of epochs, all bands.
    pub fn len(&self) -> usize {
        self.bands.values().map(Vec::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Counts kept by the store, committed with the epochs they count.
#[derive(Debug, Clone, Copy, PartialEq, Default, serde::Serialize)]
pub struct HistoryStats {
    pub objects: u64,
    pub epochs: u64,
    /// Sum of the stored epoch records' sizes (pixels and fields, `docs/history.md`); `max_bytes`
    /// applies to this. The file is larger by the B-tree pages and free space (`docs/history.md`).
    pub bytes: u64,
    /// Epochs dropped for being older than the retention window.
    pub evicted_by_age: u64,
    /// Epochs dropped, oldest first, to bring `bytes` under `max_bytes`.
    pub evicted_by_size: u64,
    /// Epochs that arrived already older than the retention window ([`PutOutcome::Expired`]).
    pub expired_on_arrival: u64,
    /// Redeliveries answered with [`PutOutcome::Duplicate`].
    pub duplicates: u64,
    /// The newest epoch MJD seen (retention is measured back from it); `None` before the first.
    pub newest_mjd: Option<f64>,
}

/// Errors of the history store. A bad epoch is not one: see [`PutOutcome::Rejected`].
#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    #[error("history config: {0}")]
    Config(String),
    #[error(
        "history file {path} is not a readable blink history store ({reason}); move it aside, \
         or open with rebuild (history.rebuild_corrupt = true) to keep it as {path}.corrupt-<unix time> and start empty"
    )]
    Corrupt { path: PathBuf, reason: String },
    #[error("history file {path} is already open (another blink process, or another handle in this one)")]
    Locked { path: PathBuf },
    #[error("history file {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("history file {path}: {source}")]
    Storage { path: PathBuf, source: Box<redb::Error> },
    #[error("history record {key}: {reason}")]
    BadRecord { key: String, reason: String },
    #[error("history store: {0}")]
    Internal(String),
}

#[cfg(test)]
pub(crate) mod test_support {
    use super::*;
    use rand::Rng;

    fn plane(rng: &mut impl Rng, w: usize, h: usize) -> Image {
        Image::new(w, h, (0..w * h).map(|_| rng.gen_range(-1e4f32..1e4)).collect())
    }

    /// A valid epoch with random ids, position, shapes and pixels.
    pub(crate) fn random_epoch(rng: &mut impl Rng) -> Epoch {
        let (w, h) = (rng.gen_range(1..40), rng.gen_range(1..40));
        let p = 2 * rng.gen_range(0..8) + 1;
        Epoch {
            survey: [Survey::Ztf, Survey::Rubin, Survey::Native][rng.gen_range(0..3)],
            alert_id: rng.gen::<u64>().to_string(),
            object_id: if rng.gen() { format!("ZTF{}", rng.gen::<u32>()) } else { String::new() },
            band: ["g", "r", "i"][rng.gen_range(0..3)].to_string(),
            mjd: rng.gen_range(58000.0..62000.0),
            ra: rng.gen_range(0.0..360.0),
            dec: rng.gen_range(-90.0..=90.0),
            stamp_x: rng.gen_range(0.0..w as f64),
            stamp_y: rng.gen_range(0.0..h as f64),
            stamps: EpochStamps {
                difference: plane(rng, w, h),
                variance: plane(rng, w, h),
                template_variance: plane(rng, w, h),
                psf: plane(rng, p, p),
            },
            measurement: Measurement { flux: rng.gen(), flux_err: rng.gen(), score: rng.gen_range(-50.0..50.0) },
        }
    }
}

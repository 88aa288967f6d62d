//! The streaming path of multi-timescale stacking: after a batch's epochs are stored, each
//! touched object's window stacks at the epoch's MJD are measured at the candidate, and a
//! window whose score reaches the threshold is announced once (again only when it grows by
//! [`ANNOUNCE_GROWTH`]). `docs/stacking.md`, "Streaming", says what and why.
//!
//! The stacks are made on the CPU (`stack::windows`) in the sink stage, off the engine thread.

use std::collections::BTreeMap;

use crate::alert::Image;
use crate::engine::{StampParams, StampPlanes};
use crate::history::{Announcement, EpochStamps, HistoryError, HistoryStore};
use crate::stack::{self, StackEpoch, StackMeasurement, DEFAULT_WINDOWS};
use crate::subtract::decorr::PsfImage;

/// A window already announced is announced again when its |score| reaches this many times the
/// last announced one.
pub const ANNOUNCE_GROWTH: f64 = 1.5;

/// PSF sigma (pixels) stored when the stamp gives none (a typical seeing of ~1 arcsec at 0.2–1
/// arcsec per pixel sits between 1 and 2 px).
const FALLBACK_SIGMA: f64 = 1.5;

/// The timescale string of a window: `stack:<N>n` (`stack:3n`).
pub fn timescale(nights: f64) -> String {
    format!("stack:{nights}n")
}

/// Stamp `s` of a batch as the history store keeps it: the engine's planes and, as the PSF, a
/// unit-sum Gaussian of the broader of the two images' widths (the difference's PSF when the
/// sharper image is matched to the broader), on an odd square of `2·ceil(4σ) + 1` pixels.
pub fn epoch_stamps(planes: &StampPlanes, s: usize, width: usize, height: usize, params: &StampParams) -> Option<EpochStamps> {
    let (d, v, t) = planes.stamp(s, width * height)?;
    let sigma = f64::from(params.science_sigma.max(params.template_sigma));
    let sigma = if sigma.is_finite() && sigma > 0.0 { sigma } else { FALLBACK_SIGMA };
    let half = (4.0 * sigma).ceil().clamp(1.0, 127.0) as usize;
    let side = 2 * half + 1;
    Some(EpochStamps {
        difference: Image::new(width, height, d.to_vec()),
        variance: Image::new(width, height, v.to_vec()),
        template_variance: Image::new(width, height, t.to_vec()),
        psf: crate::sim::gaussian_image(side, side, half as f64, half as f64, sigma),
    })
}

/// One stored (or already stored) alert whose object's stacks are to be measured.
#[derive(Debug, Clone)]
pub struct Touched {
    /// Index of the alert in the caller's list.
    pub index: usize,
    pub object: String,
    pub band: String,
    pub mjd: f64,
    /// The candidate's sub-pixel position on the alert's stamp: the common grid of the stacks.
    pub x: f64,
    pub y: f64,
    pub width: usize,
    pub height: usize,
}

/// A window stack to publish.
#[derive(Debug, Clone)]
pub struct StackHit {
    /// The [`Touched::index`] of the alert it is published with.
    pub index: usize,
    pub object: String,
    pub band: String,
    pub nights: f64,
    /// Epochs in the stack.
    pub epochs: usize,
    pub measurement: StackMeasurement,
}

/// What [`evaluate`] found: the stack detections to publish, and the announcements to record
/// (object key, announcement) once they are published.
pub type Evaluation = (Vec<StackHit>, Vec<(String, Announcement)>);

/// Measure the touched objects' window stacks and decide what to announce. Per object and band
/// only the latest alert of the list counts (the others' windows end earlier). Windows with
/// `same_as` set (a shorter window has the same epochs) and windows of one epoch (the epoch
/// itself, published as `epoch`) are skipped. Returns the hits and the announcements to record.
pub fn evaluate(
    history: &dyn HistoryStore,
    touched: &[Touched],
    threshold: f64,
) -> Result<Evaluation, HistoryError> {
    let mut latest: BTreeMap<(&str, &str), &Touched> = BTreeMap::new();
    for t in touched {
        let e = latest.entry((t.object.as_str(), t.band.as_str())).or_insert(t);
        if t.mjd > e.mjd {
            *e = t;
        }
    }
    let mut hits = Vec::new();
    let mut record = Vec::new();
    for t in latest.into_values() {
        let Some(object) = history.object(&t.object)? else { continue };
        let Some(band) = object.bands.get(&t.band) else { continue };
        let epochs: Vec<StackEpoch> = band
            .iter()
            .filter(|e| e.stamps.difference.shape() == (t.width, t.height))
            .filter_map(|e| stack_epoch(e, t))
            .collect();
        if epochs.len() < 2 {
            continue;
        }
        let windows = match stack::windows(&epochs, t.mjd, &DEFAULT_WINDOWS) {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!(error = %e, object = %t.object, "stack windows failed");
                continue;
            }
        };
        let announced = history.announcements(&t.object)?;
        for w in windows {
            if w.same_as.is_some() || w.epochs.len() < 2 {
                continue;
            }
            let Some(m) = stack::measure(&w.stack, t.x, t.y) else { continue };
            if !(m.score.is_finite() && m.score.abs() >= threshold) {
                continue;
            }
            let prev = announced.iter().find(|a| a.band == w.band && a.nights == w.nights);
            if prev.is_some_and(|p| m.score.abs() < ANNOUNCE_GROWTH * p.score.abs()) {
                continue;
            }
            record.push((
                t.object.clone(),
                Announcement { band: w.band.clone(), nights: w.nights, score: m.score, mjd: t.mjd },
            ));
            hits.push(StackHit {
                index: t.index,
                object: t.object.clone(),
                band: w.band,
                nights: w.nights,
                epochs: w.epochs.len(),
                measurement: m,
            });
        }
    }
    Ok((hits, record))
}

/// A stored epoch on the common grid of `t`: the offset is the difference of the candidates'
/// stamp positions, and the stored (centred) PSF is moved by it first, so that after
/// alignment it is centred again on the common grid (`stack::measure` moves it to the
/// candidate's phase). `None` for an epoch that cannot be stacked (logged).
fn stack_epoch(e: &crate::history::Epoch, t: &Touched) -> Option<StackEpoch> {
    let (dx, dy) = (e.stamp_x - t.x, e.stamp_y - t.y);
    let p = &e.stamps.psf;
    if p.width != p.height || p.width.is_multiple_of(2) {
        return None;
    }
    let centred = PsfImage { side: p.width, pixels: p.data.iter().map(|v| f64::from(*v)).collect() };
    let psf = crate::cpu::stack::shift_psf(&centred, &crate::cpu::stack::ShiftTaps::new(-dx, -dy));
    let se = StackEpoch {
        width: t.width,
        height: t.height,
        diff: e.stamps.difference.data.clone(),
        var: e.stamps.variance.data.clone(),
        var_template: e.stamps.template_variance.data.clone(),
        psf,
        mjd: e.mjd,
        band: e.band.clone(),
        dx,
        dy,
    };
    match se.validate(0) {
        Ok(()) => Some(se),
        Err(err) => {
            tracing::warn!(error = %err, alert_id = %e.alert_id, "stored epoch cannot be stacked");
            None
        }
    }
}

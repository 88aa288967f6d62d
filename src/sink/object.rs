//! `GetObject`: an object's history from the store as the gRPC reply, with PNG thumbnails of
//! its stamps (asinh stretch, drawn north up for FITS-ordered rows).

use std::io::Cursor;

use crate::alert::{Image, Survey};
use crate::history::{HistoryError, HistoryStore, ObjectHistory};
use crate::proto::{ObjectEpoch, ObjectReply, StackAnnouncement, Stamp};

/// Epochs sent when the request asks for 0.
pub const DEFAULT_MAX_EPOCHS: usize = 100;

/// Why an object cannot be returned.
#[derive(Debug, thiserror::Error)]
pub enum ObjectError {
    #[error("no object {0:?} in the history store")]
    NotFound(String),
    #[error("object id {id:?} is known to several surveys ({surveys}): give the survey")]
    Ambiguous { id: String, surveys: String },
    #[error("unknown survey {0:?}: use ztf, rubin or native")]
    BadSurvey(String),
    #[error(transparent)]
    History(#[from] HistoryError),
}

/// Find the object: `id` is a store key (`<survey>:id:…`, `<survey>:hpx29:…`) or a survey's
/// object id, looked up in `survey` or, when empty, in every survey.
pub fn find(store: &dyn HistoryStore, id: &str, survey: &str) -> Result<ObjectHistory, ObjectError> {
    if id.contains(":id:") || id.contains(":hpx29:") {
        return store.object(id)?.ok_or_else(|| ObjectError::NotFound(id.into()));
    }
    let surveys: Vec<Survey> = if survey.is_empty() {
        vec![Survey::Ztf, Survey::Rubin, Survey::Native]
    } else {
        vec![Survey::parse(survey).ok_or_else(|| ObjectError::BadSurvey(survey.into()))?]
    };
    let mut found = Vec::new();
    for s in surveys {
        if let Some(h) = store.object(&format!("{s}:id:{id}"))? {
            found.push(h);
        }
    }
    match found.len() {
        0 => Err(ObjectError::NotFound(id.into())),
        1 => Ok(found.remove(0)),
        _ => Err(ObjectError::Ambiguous { id: id.into(), surveys: found.iter().map(|h| h.survey.to_string()).collect::<Vec<_>>().join(", ") }),
    }
}

/// The reply for `h`: its latest `max_epochs` epochs (0: [`DEFAULT_MAX_EPOCHS`]), with raw
/// pixels when `pixels`, and its announcements.
pub fn reply(store: &dyn HistoryStore, h: &ObjectHistory, pixels: bool, max_epochs: usize) -> Result<ObjectReply, ObjectError> {
    let max = if max_epochs == 0 { DEFAULT_MAX_EPOCHS } else { max_epochs };
    let all = h.epochs();
    let total = all.len();
    let epochs = all[total.saturating_sub(max)..]
        .iter()
        .map(|e| ObjectEpoch {
            alert_id: e.alert_id.clone(),
            band: e.band.clone(),
            mjd_tai: e.mjd,
            stamp_x: e.stamp_x,
            stamp_y: e.stamp_y,
            score: f64::from(e.measurement.score),
            flux: f64::from(e.measurement.flux),
            flux_err: f64::from(e.measurement.flux_err),
            difference: Some(stamp(&e.stamps.difference, pixels)),
            variance: Some(stamp(&e.stamps.variance, pixels)),
            psf: Some(stamp(&e.stamps.psf, pixels)),
        })
        .collect();
    let announcements = store
        .announcements(&h.key)?
        .into_iter()
        .map(|a| StackAnnouncement { band: a.band, nights: a.nights, score: a.score, mjd_tai: a.mjd })
        .collect();
    Ok(ObjectReply {
        key: h.key.clone(),
        survey: h.survey.to_string(),
        object_id: h.object_id.clone(),
        ra: h.ra,
        dec: h.dec,
        epochs,
        epochs_total: u32::try_from(total).unwrap_or(u32::MAX),
        announcements,
    })
}

fn stamp(img: &Image, pixels: bool) -> Stamp {
    Stamp {
        width: img.width as u32,
        height: img.height as u32,
        pixels: if pixels { img.data.clone() } else { Vec::new() },
        png: png(img),
    }
}

/// The asinh stretch of one stamp to 8-bit grey, row for row as stored (NaN → 0): `x` in units
/// of the robust scatter (1.4826 MAD) about the median, `asinh(x)` mapped linearly from
/// `asinh(-3)` (black) to `asinh` of the largest `x` but at least `asinh(10)` (white), so faint
/// wings and a bright core both show.
pub fn stretch(img: &Image) -> Vec<u8> {
    let mut v: Vec<f32> = img.data.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return vec![0; img.data.len()];
    }
    v.sort_by(f32::total_cmp);
    let med = f64::from(v[v.len() / 2]);
    let mut dev: Vec<f64> = v.iter().map(|x| (f64::from(*x) - med).abs()).collect();
    dev.sort_by(f64::total_cmp);
    let mad = 1.4826 * dev[dev.len() / 2];
    let hi = (f64::from(v[v.len() - 1]) - med).max(0.0);
    // A flat stamp (MAD 0) is scaled by its range instead, or shown mid-grey.
    let scale = if mad > 0.0 { mad } else if hi > 0.0 { hi / 10.0 } else { 1.0 };
    let (lo_a, hi_a) = ((-3.0f64).asinh(), (hi / scale).max(10.0).asinh());
    img.data
        .iter()
        .map(|x| {
            if !x.is_finite() {
                return 0;
            }
            let a = ((f64::from(*x) - med) / scale).asinh();
            (((a - lo_a) / (hi_a - lo_a)).clamp(0.0, 1.0) * 255.0).round() as u8
        })
        .collect()
}

/// `img` as an 8-bit grey PNG, its last row at the top (FITS rows run upwards).
pub fn png(img: &Image) -> Vec<u8> {
    let (w, h) = (img.width, img.height);
    if w == 0 || h == 0 || img.data.len() != w * h {
        return Vec::new();
    }
    let grey = stretch(img);
    let mut flipped = Vec::with_capacity(grey.len());
    for row in grey.chunks_exact(w).rev() {
        flipped.extend_from_slice(row);
    }
    let Some(buf) = image::GrayImage::from_raw(w as u32, h as u32, flipped) else { return Vec::new() };
    let mut out = Cursor::new(Vec::new());
    // Encoding an in-memory 8-bit image cannot fail short of allocation.
    match buf.write_to(&mut out, image::ImageFormat::Png) {
        Ok(()) => out.into_inner(),
        Err(e) => {
            tracing::warn!(error = %e, "PNG thumbnail not encoded");
            Vec::new()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    #[test]
    fn thumbnails_are_stretched_flipped_and_decode_to_the_stamp_size() {
        let seed = crate::testing::seed();
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let (w, h) = (rng.gen_range(5..70), rng.gen_range(5..70));
        let mut data: Vec<f32> = (0..w * h).map(|_| 100.0 + rng.gen_range(-5.0..5.0)).collect();
        data[0] = 5000.0; // first row, first column: a bright pixel
        data[w * h - 1] = f32::NAN; // last row, last column: masked
        let img = Image::new(w, h, data.clone());
        let bytes = png(&img);
        let back = image::load_from_memory(&bytes).expect("a PNG").to_luma8();
        assert_eq!((back.width() as usize, back.height() as usize), (w, h), "seed {seed}");
        // The first stored row is drawn last (bottom), the last first (top).
        assert_eq!(back.get_pixel(0, h as u32 - 1).0[0], 255, "seed {seed}: the bright pixel is white, at the bottom");
        assert_eq!(back.get_pixel(w as u32 - 1, 0).0[0], 0, "seed {seed}: NaN is black, at the top");
        // Monotonic: brighter pixels are never darker.
        let g = stretch(&img);
        let mut order: Vec<usize> = (0..w * h).filter(|&i| data[i].is_finite()).collect();
        order.sort_by(|&a, &b| data[a].total_cmp(&data[b]));
        assert!(order.windows(2).all(|p| g[p[0]] <= g[p[1]]), "seed {seed}");
        // Noise around the median spreads over grey levels instead of saturating.
        let noise: Vec<u8> = (1..w * h - 1).map(|i| g[i]).collect();
        let (lo, hi) = (noise.iter().min().unwrap(), noise.iter().max().unwrap());
        assert!(*lo > 0 && *hi < 255 && hi - lo > 10, "seed {seed}: noise spans {lo}..{hi}");
        // Degenerate stamps do not panic.
        assert!(!png(&Image::new(3, 3, vec![f32::NAN; 9])).is_empty());
        assert!(!png(&Image::new(3, 3, vec![1.0; 9])).is_empty());
        assert!(png(&Image::new(0, 0, vec![])).is_empty());
    }
}

//! ZTF alerts (schema `ztf.alert` 3.x and 4.x, and Fink's enriched ZTF records) → [`Alert`].
//!
//! Each ZTF Kafka message is a whole Avro object container (the writer's schema inside); the
//! container is read in `decode::avro_util` and each record is mapped here by field name.
//!
//! Mapping (ZTF field → blink):
//! - `candid` → `alert_id`, `objectId` → `object_id`, `candidate.ra/dec`, `candidate.fid` → band
//!   (1 g, 2 r, 3 i).
//! - Epoch: `candidate.jd` is the **start** of the exposure in UTC. blink wants MJD (TAI) at
//!   **mid-exposure**: `mjd_tai = jd − 2400000.5 + 37 s + exptime/2`. TAI − UTC has been 37 s
//!   since 2017-01-01, before ZTF's first light (2018), so the offset is constant for ZTF data.
//! - `exptime` → `exposure_s`, `fwhm` → `fwhm_px`, `fwhm / seeratio` → `template_fwhm_px` (when
//!   both are positive and finite), `1.0857 / sigmapsf` → `survey_snr`, `isdiffpos` in
//!   (`t`, `1`) → `positive`, `magzpsci` → `zero_point`. ZTF gives no gain per alert.
//! - Cutouts: `cutout*.stampData` is a gzipped FITS file, 63x63 f32 centred on the candidate's
//!   pixel, truncated at the readout-quadrant edges (3072 x 3080 px; `xpos`/`ypos` are 1-based).
//!   The stamp's first pixel is at `max(0, round(pos − 1) − 31)` on each axis (truncation on the far
//!   side does not move it), so the candidate sits at `pos − 1 − start` in stamp pixels.

use apache_avro::types::Value;

use super::avro_util::{field, get_bytes, get_f64, get_i64, get_str, id_text, require};
use super::{check_shapes, fits, inflate, stamp_from_image, DecodeError, Limits};
use crate::alert::{Alert, Candidate, Image, Stamp, Survey, Triplet};

/// ZTF's nominal stamp half-size (63x63 stamps).
const HALF: f64 = 31.0;
/// TAI − UTC since 2017-01-01, in days.
const TAI_MINUS_UTC_DAYS: f64 = 37.0 / 86400.0;

/// One ZTF alert record (any 3.x/4.x schema, Fink-enriched or not) → [`Alert`].
pub fn map_alert(rec: &Value, limits: &Limits) -> Result<Alert, DecodeError> {
    let alert_id = field(rec, "candid")
        .and_then(id_text)
        .or_else(|| field(rec, "candidate").and_then(|c| field(c, "candid")).and_then(id_text))
        .ok_or_else(|| DecodeError::MissingField("ztf.candid".into()))?;
    map_inner(rec, limits, &alert_id).map_err(|e| e.in_alert(&alert_id))
}

fn map_inner(rec: &Value, limits: &Limits, alert_id: &str) -> Result<Alert, DecodeError> {
    let c = require(field(rec, "candidate"), "ztf", "candidate")?;
    let object_id = get_str(rec, "objectId").unwrap_or("").to_string();
    let ra = require(get_f64(c, "ra"), "candidate", "ra")?;
    let dec = require(get_f64(c, "dec"), "candidate", "dec")?;
    let jd = require(get_f64(c, "jd"), "candidate", "jd")?;
    let fid = require(get_i64(c, "fid"), "candidate", "fid")?;
    let band = match fid {
        1 => "g",
        2 => "r",
        3 => "i",
        other => return Err(DecodeError::Unsupported(format!("candidate.fid = {other}"))),
    }
    .to_string();
    let exptime = get_f64(c, "exptime").filter(|x| *x > 0.0);
    let mjd_tai = jd - 2_400_000.5 + TAI_MINUS_UTC_DAYS + exptime.unwrap_or(0.0) / 2.0 / 86400.0;

    let fwhm = get_f64(c, "fwhm").filter(|x| *x > 0.0);
    let template_fwhm_px = match (fwhm, get_f64(c, "seeratio")) {
        (Some(f), Some(r)) if r > 0.0 && (f / r).is_finite() && f / r < 100.0 => Some(f / r),
        _ => None,
    };
    let survey_snr = get_f64(c, "sigmapsf").filter(|s| *s > 0.0).map(|s| 1.0857 / s);
    let positive = matches!(get_str(c, "isdiffpos"), Some("t") | Some("1") | None);
    let zero_point = get_f64(c, "magzpsci");

    let science = cutout(rec, "cutoutScience", limits)?;
    let template = cutout(rec, "cutoutTemplate", limits)?;
    let difference = match field(rec, "cutoutDifference") {
        Some(_) => Some(cutout(rec, "cutoutDifference", limits)?),
        None => None,
    };
    let triplet = Triplet { science, template, difference };
    check_shapes(&triplet)?;

    let (w, h) = triplet.science.image.shape();
    let stamp_x = stamp_pos(get_f64(c, "xpos"), w);
    let stamp_y = stamp_pos(get_f64(c, "ypos"), h);

    Ok(Alert {
        survey: Survey::Ztf,
        alert_id: alert_id.to_string(),
        object_id,
        ra,
        dec,
        mjd_tai,
        band,
        exposure_s: exptime,
        candidate: Candidate {
            stamp_x,
            stamp_y,
            fwhm_px: fwhm,
            template_fwhm_px,
            survey_snr,
            positive,
            zero_point,
            gain: None,
        },
        triplet,
    })
}

/// Candidate position in stamp pixels (0-based) from its 1-based position on the quadrant.
/// Without a position, or if the result falls off the stamp, the stamp's centre.
pub fn stamp_pos(pos_1based: Option<f64>, size: usize) -> f64 {
    let centre = (size as f64 - 1.0) / 2.0;
    let Some(p) = pos_1based else { return centre };
    let p0 = p - 1.0;
    let start = (p0.round() - HALF).max(0.0);
    let s = p0 - start;
    if s >= -0.5 && s <= size as f64 - 0.5 {
        s
    } else {
        centre
    }
}

/// One `cutout*` record → stamp: gunzip (bounded), FITS, first image HDU.
fn cutout(rec: &Value, name: &str, limits: &Limits) -> Result<Stamp, DecodeError> {
    let c = require(field(rec, name), "ztf", name)?;
    let data = get_bytes(c, "stampData")
        .or_else(|| super::avro_util::as_bytes(c))
        .ok_or_else(|| DecodeError::MissingField(format!("{name}.stampData")))?;
    let img = stamp_image(data, name, limits)?;
    stamp_from_image(name, img, None, None)
}

/// Gzipped (or plain) FITS bytes → the first image HDU.
pub fn stamp_image(data: &[u8], name: &str, limits: &Limits) -> Result<Image, DecodeError> {
    let fits_bytes;
    let bytes = if data.starts_with(&[0x1f, 0x8b]) {
        fits_bytes = inflate(data, limits.max_inflated_bytes, name)?;
        &fits_bytes[..]
    } else {
        data
    };
    let hdus = fits::read_hdus(bytes, limits)?;
    hdus.into_iter()
        .next()
        .map(|h| h.image)
        .ok_or_else(|| DecodeError::Fits(format!("{name}: no image HDU")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamp_positions() {
        // Centre of a full stamp.
        assert!((stamp_pos(Some(1001.0), 63) - 31.0).abs() < 1e-9);
        assert!((stamp_pos(Some(1001.3), 63) - 31.3).abs() < 1e-9);
        // Near the low edge: pos−1 = 10 → start 0, candidate at 10.
        assert!((stamp_pos(Some(11.0), 42) - 10.0).abs() < 1e-9);
        // Near the high edge (3072 wide): start unaffected by the truncation.
        assert!((stamp_pos(Some(3070.0), 34) - 31.0).abs() < 1e-9);
        assert_eq!(stamp_pos(None, 63), 31.0);
    }
}

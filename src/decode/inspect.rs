//! `blink inspect FILE...`: decode alert files and print one JSON line per alert — a quick way
//! to see what blink makes of a packet (ids, position, epoch, band, stamp shapes and NaNs).

use std::io::Write;
use std::path::PathBuf;

use serde_json::{json, Value};

use super::Decoder;
use crate::alert::{Alert, Stamp};

fn stamp_json(s: &Stamp) -> Value {
    json!({
        "width": s.width(),
        "height": s.height(),
        "nan_count": s.nan_count(),
        "has_variance": s.variance.is_some(),
        "has_psf": s.psf.is_some(),
    })
}

/// One alert as a JSON object.
pub fn alert_json(a: &Alert) -> Value {
    json!({
        "survey": a.survey.as_str(),
        "alert_id": a.alert_id,
        "object_id": a.object_id,
        "ra": a.ra,
        "dec": a.dec,
        "mjd_tai": a.mjd_tai,
        "band": a.band,
        "stamp_x": a.candidate.stamp_x,
        "stamp_y": a.candidate.stamp_y,
        "survey_snr": a.candidate.survey_snr,
        "science": stamp_json(&a.triplet.science),
        "template": stamp_json(&a.triplet.template),
        "difference": a.triplet.difference.as_ref().map(stamp_json),
    })
}

/// Print one JSON line per alert to `out`; each file or record that cannot be read gives a line
/// naming the file on `err`. Returns the exit code: 0 if everything decoded, 1 otherwise (after
/// printing every alert it could read).
pub fn run(decoder: &Decoder, paths: &[PathBuf], out: &mut dyn Write, err: &mut dyn Write) -> i32 {
    let mut failed = false;
    for path in paths {
        let results = match decoder.decode_file(path) {
            Ok(r) => r,
            Err(e) => {
                failed = true;
                let _ = writeln!(err, "{}: {e} [{}]", path.display(), e.reason());
                continue;
            }
        };
        for (i, r) in results.into_iter().enumerate() {
            match r {
                Ok(a) => {
                    if writeln!(out, "{}", alert_json(&a)).is_err() {
                        // The reader went away (e.g. `| head`): stop quietly.
                        return i32::from(failed);
                    }
                }
                Err(e) => {
                    failed = true;
                    let _ = writeln!(err, "{}: record {i}: {e} [{}]", path.display(), e.reason());
                }
            }
        }
    }
    i32::from(failed)
}

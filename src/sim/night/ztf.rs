//! ZTF-shaped alert packets for the night (`alerts/<frame>.ztf.avro`): the same alerts as the
//! native ones, written with ZTF's own alert schema (3.x, taken from the committed fixture
//! `testdata/ztf/ztf-avro-alert/472263571115115000.avro`) so that ZTF consumers and blink's ZTF
//! decoder read them as they read the real stream. Every record starts as a copy of the fixture's
//! record (so every field of the schema is present and typed) and the fields a consumer uses are
//! replaced: ids, `jd` (UTC, exposure start), `fid`, position, `magpsf`/`sigmapsf`, `isdiffpos`,
//! `xpos`/`ypos`, `fwhm`, `seeratio`, `magzpsci`, `exptime`, and the three gzipped FITS cutouts.
//! `prv_candidates` is emptied. The difference cutout is the ideal one: both images' noise plus
//! the alerting source (as a perfect PSF-matched subtraction would leave it, artifacts included).

use std::io::Write;

use apache_avro::types::Value;
use apache_avro::{Codec, DeflateSettings, Reader, Schema, Writer};

use crate::alert::Alert;

const FIXTURE: &[u8] = include_bytes!("../../../testdata/ztf/ztf-avro-alert/472263571115115000.avro");
/// TAI − UTC since 2017.
const TAI_MINUS_UTC_S: f64 = 37.0;

/// The fixture's schema and first record.
pub fn template_record() -> Result<(Schema, Value), String> {
    let mut reader = Reader::new(FIXTURE).map_err(|e| format!("ZTF fixture: {e}"))?;
    let schema = reader.writer_schema().clone();
    let rec = reader.next().ok_or("ZTF fixture: no record")?.map_err(|e| format!("ZTF fixture: {e}"))?;
    Ok((schema, rec))
}

fn field_mut<'a>(rec: &'a mut Value, name: &str) -> Option<&'a mut Value> {
    match rec {
        Value::Record(fields) => fields.iter_mut().find(|(k, _)| k == name).map(|(_, v)| v),
        Value::Union(_, inner) => field_mut(inner, name),
        _ => None,
    }
}

/// Replace the value of `name` keeping its type (and union branch); false if absent or typed
/// differently in the fixture.
fn set(rec: &mut Value, name: &str, v: Value) -> bool {
    let Some(slot) = field_mut(rec, name) else { return false };
    let target = match slot {
        Value::Union(_, inner) => inner.as_mut(),
        other => other,
    };
    let ok = matches!(
        (&*target, &v),
        (Value::Double(_), Value::Double(_))
            | (Value::Float(_), Value::Float(_))
            | (Value::Long(_), Value::Long(_))
            | (Value::Int(_), Value::Int(_))
            | (Value::String(_), Value::String(_))
            | (Value::Bytes(_), Value::Bytes(_))
    );
    let v = match (&*target, v) {
        (Value::Float(_), Value::Double(d)) => Value::Float(d as f32),
        (Value::Int(_), Value::Long(l)) => Value::Int(l as i32),
        (Value::Double(_), v @ Value::Double(_)) | (Value::Long(_), v @ Value::Long(_)) => v,
        (_, v) if ok => v,
        _ => return false,
    };
    *target = v;
    true
}

/// ZTF truncates cutouts at the edge of the readout quadrant rather than padding them: keep the
/// bounding box of the pixels inside the frame (the mask marks those outside, a rectangle).
fn gz_fits(img: &crate::alert::Image, mask: &[bool]) -> Vec<u8> {
    use crate::alert::Image;
    let (w, h) = img.shape();
    let inside = |x: usize, y: usize| !mask.get(y * w + x).copied().unwrap_or(true);
    let xs: Vec<usize> = (0..w).filter(|&x| (0..h).any(|y| inside(x, y))).collect();
    let ys: Vec<usize> = (0..h).filter(|&y| (0..w).any(|x| inside(x, y))).collect();
    let img = match (xs.first(), xs.last(), ys.first(), ys.last()) {
        (Some(&x0), Some(&x1), Some(&y0), Some(&y1)) => {
            let data = (y0..=y1).flat_map(|y| (x0..=x1).map(move |x| (x, y))).map(|(x, y)| img.data[y * w + x]).collect();
            Image::new(x1 - x0 + 1, y1 - y0 + 1, data)
        }
        _ => img.clone(),
    };
    let fits = crate::decode::fits::write_hdus(&[("", &img)]);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    // Writing to a Vec cannot fail.
    let _ = gz.write_all(&fits);
    gz.finish().unwrap_or_default()
}

/// One ZTF record per alert. `difference[i]` is the difference cutout of `alerts[i]`; `candid`
/// must be unique per alert; `xy[i]` the 0-based frame position.
pub fn encode(
    alerts: &[Alert],
    difference: &[crate::alert::Image],
    candid: &[i64],
    xy: &[(f64, f64)],
) -> Result<Vec<u8>, String> {
    let (schema, base) = template_record()?;
    let mut w = Writer::with_codec(&schema, Vec::new(), Codec::Deflate(DeflateSettings::default()));
    for (i, a) in alerts.iter().enumerate() {
        let c = &a.candidate;
        let mut rec = base.clone();
        let snr = c.survey_snr.unwrap_or(5.0).max(1e-3);
        let diff_flux = difference.get(i).map(|d| d.data.iter().map(|&v| v as f64).sum::<f64>()).unwrap_or(0.0);
        let zp = c.zero_point.unwrap_or(28.0);
        let mag = zp - 2.5 * diff_flux.abs().max(1e-3).log10();
        let fid = match a.band.as_str() {
            "g" => 1,
            "i" => 3,
            _ => 2,
        };
        let jd_start = a.mjd_tai - a.exposure_s.unwrap_or(0.0) / 2.0 / 86400.0 - TAI_MINUS_UTC_S / 86400.0 + 2_400_000.5;
        let id = candid.get(i).copied().unwrap_or(i as i64);
        let (x, y) = xy.get(i).copied().unwrap_or((0.0, 0.0));
        let mut ok = set(&mut rec, "objectId", Value::String(format!("ZTFsim{}", a.object_id)));
        ok &= set(&mut rec, "candid", Value::Long(id));
        let cand = field_mut(&mut rec, "candidate").ok_or("ZTF fixture: no candidate")?;
        ok &= set(cand, "candid", Value::Long(id));
        ok &= set(cand, "jd", Value::Double(jd_start));
        ok &= set(cand, "fid", Value::Long(fid));
        ok &= set(cand, "ra", Value::Double(a.ra));
        ok &= set(cand, "dec", Value::Double(a.dec));
        ok &= set(cand, "magpsf", Value::Double(mag));
        ok &= set(cand, "sigmapsf", Value::Double(1.0857 / snr));
        ok &= set(cand, "isdiffpos", Value::String(if c.positive { "t" } else { "f" }.into()));
        ok &= set(cand, "xpos", Value::Double(x + 1.0));
        ok &= set(cand, "ypos", Value::Double(y + 1.0));
        if let (Some(f), Some(t)) = (c.fwhm_px, c.template_fwhm_px) {
            ok &= set(cand, "fwhm", Value::Double(f));
            ok &= set(cand, "seeratio", Value::Double(f / t));
        }
        ok &= set(cand, "magzpsci", Value::Double(zp));
        if let Some(e) = a.exposure_s {
            ok &= set(cand, "exptime", Value::Double(e));
        }
        if !ok {
            return Err("the ZTF fixture's schema lacks a field this writer fills".into());
        }
        if let Some(Value::Union(_, inner)) = field_mut(&mut rec, "prv_candidates") {
            if let Value::Array(v) = inner.as_mut() {
                v.clear();
            }
        }
        let t = &a.triplet;
        let cutouts = [
            ("cutoutScience", gz_fits(&t.science.image, &t.science.mask)),
            ("cutoutTemplate", gz_fits(&t.template.image, &t.template.mask)),
            ("cutoutDifference", gz_fits(difference.get(i).unwrap_or(&t.science.image), &t.science.mask)),
        ];
        for (name, bytes) in cutouts {
            let cut = field_mut(&mut rec, name).ok_or_else(|| format!("ZTF fixture: no {name}"))?;
            set(cut, "fileName", Value::String(format!("{}_{name}.fits.gz", a.alert_id)));
            if !set(cut, "stampData", Value::Bytes(bytes)) {
                return Err(format!("ZTF fixture: {name}.stampData is not bytes"));
            }
        }
        w.append(rec).map_err(|e| format!("ZTF record {}: {e}", a.alert_id))?;
    }
    w.into_inner().map_err(|e| format!("ZTF container: {e}"))
}

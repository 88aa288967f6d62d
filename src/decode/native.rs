//! blink's own alert packets (`schemas/blink/blink.alert.avsc`, record `blink.alert`): what the
//! simulator writes and what `blink` can replay. An Avro object container (deflate) of records;
//! cutouts are plain FITS made by [`fits::write_hdus`] with HDUs `IMAGE`, optional `VARIANCE`,
//! optional `PSF`, masked pixels written as NaN.

use apache_avro::schema::Schema;
use apache_avro::types::Value;
use apache_avro::{Codec, DeflateSettings, Writer};

use super::avro_util::{field, get_bool, get_bytes, get_f64, get_str, require};
use super::{check_shapes, fits, stamp_from_image, DecodeError, Limits};
use crate::alert::{Alert, Candidate, Image, Stamp, Survey, Triplet};

/// The native schema's JSON.
pub const SCHEMA_JSON: &str = include_str!("../../schemas/blink/blink.alert.avsc");

/// The parsed native schema.
pub fn schema() -> Result<Schema, DecodeError> {
    Schema::parse_str(SCHEMA_JSON).map_err(|e| DecodeError::Avro(format!("native schema: {e}")))
}

fn opt(x: Option<f64>) -> Value {
    match x {
        Some(v) => Value::Union(1, Box::new(Value::Double(v))),
        None => Value::Union(0, Box::new(Value::Null)),
    }
}

fn stamp_fits(s: &Stamp) -> Vec<u8> {
    let mut img = s.image.clone();
    for (p, m) in img.data.iter_mut().zip(&s.mask) {
        if *m {
            *p = f32::NAN;
        }
    }
    let mut hdus: Vec<(&str, &Image)> = vec![("IMAGE", &img)];
    if let Some(v) = &s.variance {
        hdus.push(("VARIANCE", v));
    }
    if let Some(p) = &s.psf {
        hdus.push(("PSF", p));
    }
    fits::write_hdus(&hdus)
}

/// Alerts → one Avro object container (deflate) of `blink.alert` records.
pub fn encode_native(alerts: &[Alert]) -> Result<Vec<u8>, DecodeError> {
    let schema = schema()?;
    let mut w = Writer::with_codec(&schema, Vec::new(), Codec::Deflate(DeflateSettings::default()));
    for a in alerts {
        let c = &a.candidate;
        let t = &a.triplet;
        let rec = Value::Record(vec![
            ("alertId".into(), Value::String(a.alert_id.clone())),
            ("objectId".into(), Value::String(a.object_id.clone())),
            ("ra".into(), Value::Double(a.ra)),
            ("dec".into(), Value::Double(a.dec)),
            ("mjdTai".into(), Value::Double(a.mjd_tai)),
            ("band".into(), Value::String(a.band.clone())),
            ("exposure".into(), opt(a.exposure_s)),
            ("zeroPoint".into(), opt(c.zero_point)),
            ("gain".into(), opt(c.gain)),
            ("fwhmPx".into(), opt(c.fwhm_px)),
            ("templateFwhmPx".into(), opt(c.template_fwhm_px)),
            ("surveySnr".into(), opt(c.survey_snr)),
            ("positive".into(), Value::Boolean(c.positive)),
            ("candX".into(), Value::Double(c.stamp_x)),
            ("candY".into(), Value::Double(c.stamp_y)),
            ("cutoutScience".into(), Value::Bytes(stamp_fits(&t.science))),
            ("cutoutTemplate".into(), Value::Bytes(stamp_fits(&t.template))),
            (
                "cutoutDifference".into(),
                match &t.difference {
                    Some(d) => Value::Union(1, Box::new(Value::Bytes(stamp_fits(d)))),
                    None => Value::Union(0, Box::new(Value::Null)),
                },
            ),
        ]);
        w.append(rec)?;
    }
    Ok(w.into_inner()?)
}

fn stamp(rec: &Value, name: &str, limits: &Limits) -> Result<Stamp, DecodeError> {
    let bytes = get_bytes(rec, name).ok_or_else(|| DecodeError::MissingField(name.to_string()))?;
    let mut image = None;
    let mut variance = None;
    let mut psf = None;
    for h in fits::read_hdus(bytes, limits)? {
        match h.name.as_str() {
            "VARIANCE" => variance = Some(h.image),
            "PSF" => psf = Some(h.image),
            _ if image.is_none() => image = Some(h.image),
            _ => {}
        }
    }
    let img = image.ok_or_else(|| DecodeError::Fits(format!("{name}: no IMAGE HDU")))?;
    stamp_from_image(name, img, variance, psf)
}

/// One `blink.alert` record → [`Alert`].
pub fn map_alert(rec: &Value, limits: &Limits) -> Result<Alert, DecodeError> {
    let alert_id = require(get_str(rec, "alertId"), "blink", "alertId")?.to_string();
    let inner = || -> Result<Alert, DecodeError> {
        let science = stamp(rec, "cutoutScience", limits)?;
        let template = stamp(rec, "cutoutTemplate", limits)?;
        let difference = match field(rec, "cutoutDifference") {
            Some(_) => Some(stamp(rec, "cutoutDifference", limits)?),
            None => None,
        };
        let triplet = Triplet { science, template, difference };
        check_shapes(&triplet)?;
        Ok(Alert {
            survey: Survey::Native,
            alert_id: alert_id.clone(),
            object_id: get_str(rec, "objectId").unwrap_or("").to_string(),
            ra: require(get_f64(rec, "ra"), "blink", "ra")?,
            dec: require(get_f64(rec, "dec"), "blink", "dec")?,
            mjd_tai: require(get_f64(rec, "mjdTai"), "blink", "mjdTai")?,
            band: get_str(rec, "band").unwrap_or("").to_string(),
            exposure_s: get_f64(rec, "exposure"),
            candidate: Candidate {
                stamp_x: require(get_f64(rec, "candX"), "blink", "candX")?,
                stamp_y: require(get_f64(rec, "candY"), "blink", "candY")?,
                fwhm_px: get_f64(rec, "fwhmPx"),
                template_fwhm_px: get_f64(rec, "templateFwhmPx"),
                survey_snr: get_f64(rec, "surveySnr"),
                positive: get_bool(rec, "positive").unwrap_or(true),
                zero_point: get_f64(rec, "zeroPoint"),
                gain: get_f64(rec, "gain"),
            },
            triplet,
        })
    };
    inner().map_err(|e| e.in_alert(&alert_id))
}

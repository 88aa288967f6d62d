//! Rubin (LSST) alerts → [`Alert`].
//!
//! On Kafka a Rubin alert is Confluent-framed: byte `0x00`, a 4-byte big-endian schema id
//! (`major*100 + minor`: 1100 = lsst.v11_0, 1101 = v11_1; lsst.v10_0 is 1001, and 1000 is accepted), then one Avro datum.
//! The writer's schema comes from the local folder (by default the copies under
//! `schemas/lsst/`, built in) or, for an id not found there, from a Confluent schema registry.
//! Fink's transfer files carry the same records inside an Avro container (top-level record
//! `topLevelRecord.value`); both are mapped here by field name.
//!
//! Mapping: `diaSourceId` → `alert_id`; `diaSource.diaObjectId` (or `diaObject.diaObjectId`,
//! else `ssObjectId`) → `object_id`; `diaSource.ra/dec/midpointMjdTai/band`; `diaSource.snr`
//! (else `psfFlux/psfFluxErr`) → `survey_snr`; `!isNegative` → `positive`. Stamps are plain FITS:
//! the image (nJy) in the primary HDU, the variance in `UNCERT` (its `UTYPE` says
//! `VarianceUncertainty`; a `StdDevUncertainty` one is squared), the PSF in `PSFIMAGE`. The
//! images are in nJy, so the zero point is 31.4 (AB) when `BUNIT` says so. The candidate's stamp
//! position comes from the science cutout's TAN WCS applied to the diaSource position (on the
//! real fixtures it matches the difference image's centroid to ~0.2 px, and equals
//! `diaSource.x − CUTMINX − 1`), else from `LTV1/2` or `CUTMINX/Y` with `diaSource.x/y`, else the
//! stamp's centre.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use apache_avro::schema::Schema;
use apache_avro::types::Value;

use super::avro_util::{self, field, get_bool, get_bytes, get_f64, get_str, id_text, require};
use super::fits::{self, Header};
use super::{check_shapes, stamp_from_image, DecodeError, Decoder, Limits};
use crate::alert::{Alert, Candidate, Stamp, Survey, Triplet};

/// The schema id of lsst.v10_0 (the Fink transfer's payload).
pub const V10_0: u32 = 1001;

/// A Rubin alert schema with the named types it refers to.
#[derive(Debug)]
pub struct RubinSchema {
    pub id: u32,
    /// All parsed schemas; `alert` indexes the top-level one.
    pub schemata: Vec<Schema>,
    alert: usize,
}

impl RubinSchema {
    pub fn alert(&self) -> Option<&Schema> {
        self.schemata.get(self.alert)
    }

    fn from_jsons(id: u32, jsons: &[String]) -> Result<RubinSchema, DecodeError> {
        let mut schemata = Schema::parse_list(jsons.iter()).map_err(|e| DecodeError::SchemaId { id, detail: format!("schema does not parse: {e}") })?;
        // apache-avro resolves named references in list order: the alert, which refers to the
        // others, goes last.
        schemata.sort_by_key(|s| matches!(s, Schema::Record(r) if r.name.name == "alert"));
        let alert = schemata
            .iter()
            .position(|s| matches!(s, Schema::Record(r) if r.name.name == "alert"))
            .ok_or_else(|| DecodeError::SchemaId { id, detail: "no record named `alert` among the schemas".into() })?;
        Ok(RubinSchema { id, schemata, alert })
    }
}

macro_rules! embedded {
    ($v:literal) => {
        [
            include_str!(concat!("../../schemas/lsst/", $v, "/lsst.", $v, ".alert.avsc")),
            include_str!(concat!("../../schemas/lsst/", $v, "/lsst.", $v, ".diaForcedSource.avsc")),
            include_str!(concat!("../../schemas/lsst/", $v, "/lsst.", $v, ".diaObject.avsc")),
            include_str!(concat!("../../schemas/lsst/", $v, "/lsst.", $v, ".diaSource.avsc")),
            include_str!(concat!("../../schemas/lsst/", $v, "/lsst.", $v, ".mpc_orbits.avsc")),
            include_str!(concat!("../../schemas/lsst/", $v, "/lsst.", $v, ".ssObject.avsc")),
            include_str!(concat!("../../schemas/lsst/", $v, "/lsst.", $v, ".ssSource.avsc")),
        ]
    };
}

/// Local schemas by id, plus registry answers (cached).
pub(crate) struct RubinSchemas {
    local: HashMap<u32, Arc<RubinSchema>>,
    registry_url: Option<String>,
    cache: Mutex<HashMap<u32, Arc<RubinSchema>>>,
}

/// `vMM_m` → `MM*100 + m`.
fn id_of_dir(name: &str) -> Option<u32> {
    let (maj, min) = name.strip_prefix('v')?.split_once('_')?;
    Some(maj.parse::<u32>().ok()? * 100 + min.parse::<u32>().ok()?)
}

impl RubinSchemas {
    pub(crate) fn new(dir: Option<&Path>, registry_url: Option<String>) -> Result<RubinSchemas, DecodeError> {
        let mut local = HashMap::new();
        match dir {
            None => {
                for (v, files) in [("v10_0", embedded!("v10_0")), ("v11_0", embedded!("v11_0")), ("v11_1", embedded!("v11_1"))] {
                    let id = id_of_dir(v).unwrap_or(0);
                    let jsons: Vec<String> = files.iter().map(|s| s.to_string()).collect();
                    local.insert(id, Arc::new(RubinSchema::from_jsons(id, &jsons)?));
                }
            }
            Some(dir) => {
                let io = |e: std::io::Error| DecodeError::Io { path: dir.display().to_string(), detail: e.to_string() };
                for entry in std::fs::read_dir(dir).map_err(io)? {
                    let entry = entry.map_err(io)?;
                    let name = entry.file_name().to_string_lossy().into_owned();
                    let Some(id) = id_of_dir(&name) else { continue };
                    let mut jsons = Vec::new();
                    for f in std::fs::read_dir(entry.path()).map_err(io)? {
                        let p = f.map_err(io)?.path();
                        if p.extension().is_some_and(|e| e == "avsc") {
                            jsons.push(std::fs::read_to_string(&p).map_err(|e| DecodeError::Io { path: p.display().to_string(), detail: e.to_string() })?);
                        }
                    }
                    local.insert(id, Arc::new(RubinSchema::from_jsons(id, &jsons)?));
                }
            }
        }
        // Rubin registered lsst.v10_0 as id 1001 (the id its Kafka messages carry), not the
        // 1000 that major*100+minor gives; accept both unless a v10_1 folder claims 1001.
        if let Some(s) = local.get(&1000).cloned() {
            local.entry(V10_0).or_insert(s);
        }
        Ok(RubinSchemas { local, registry_url, cache: Mutex::new(HashMap::new()) })
    }

    /// The schema for an id: local first, then the cache, then the registry.
    pub(crate) fn get(&self, id: u32) -> Result<Arc<RubinSchema>, DecodeError> {
        if let Some(s) = self.local.get(&id) {
            return Ok(s.clone());
        }
        let Some(url) = &self.registry_url else {
            return Err(DecodeError::SchemaId { id, detail: "not in the local schema folder and no registry configured".into() });
        };
        if let Some(s) = self.cache.lock().ok().and_then(|c| c.get(&id).cloned()) {
            return Ok(s);
        }
        let s = Arc::new(fetch_registry(url, id)?);
        if let Ok(mut c) = self.cache.lock() {
            c.insert(id, s.clone());
        }
        Ok(s)
    }

    pub(crate) fn decode_confluent(&self, bytes: &[u8]) -> Result<Value, DecodeError> {
        let id = bytes
            .get(1..5)
            .and_then(|b| <[u8; 4]>::try_from(b).ok())
            .map(u32::from_be_bytes)
            .ok_or_else(|| DecodeError::Avro(format!("Confluent header truncated: {} bytes", bytes.len())))?;
        let schema = self.get(id)?;
        let alert = schema.alert().ok_or_else(|| DecodeError::SchemaId { id, detail: "no alert schema".into() })?;
        let mut body = bytes.get(5..).unwrap_or(&[]);
        let v = apache_avro::from_avro_datum_schemata(alert, schema.schemata.iter().collect(), &mut body, None)
            .map_err(|e| DecodeError::Avro(format!("schema id {id}: {e}")))?;
        Ok(v)
    }
}

/// `GET {url}/schemas/ids/{id}` → `{"schema": "<json>"}` (Confluent's API).
fn fetch_registry(url: &str, id: u32) -> Result<RubinSchema, DecodeError> {
    let full = format!("{}/schemas/ids/{id}", url.trim_end_matches('/'));
    let err = |detail: String| DecodeError::SchemaId { id, detail };
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(std::time::Duration::from_secs(10)))
        .build()
        .into();
    let mut resp = agent.get(&full).call().map_err(|e| err(format!("registry {full}: {e}")))?;
    let body = resp
        .body_mut()
        .with_config()
        .limit(16 << 20)
        .read_to_string()
        .map_err(|e| err(format!("registry {full}: {e}")))?;
    let json: serde_json::Value = serde_json::from_str(&body).map_err(|e| err(format!("registry {full}: bad JSON: {e}")))?;
    let schema = json
        .get("schema")
        .and_then(|s| s.as_str())
        .ok_or_else(|| err(format!("registry {full}: no \"schema\" string in the answer")))?;
    RubinSchema::from_jsons(id, &[schema.to_string()])
}

/// One Rubin alert record (Confluent datum or Fink-wrapped) → [`Alert`].
pub fn map_alert(rec: &Value, limits: &Limits) -> Result<Alert, DecodeError> {
    let src = require(field(rec, "diaSource"), "rubin", "diaSource")?;
    let alert_id = field(rec, "diaSourceId")
        .and_then(id_text)
        .or_else(|| field(src, "diaSourceId").and_then(id_text))
        .ok_or_else(|| DecodeError::MissingField("rubin.diaSourceId".into()))?;
    map_inner(rec, src, limits).map_err(|e| e.in_alert(&alert_id)).map(|mut a| {
        a.alert_id = alert_id;
        a
    })
}

fn map_inner(rec: &Value, src: &Value, limits: &Limits) -> Result<Alert, DecodeError> {
    // Id 0 means "none" in Rubin's schema (e.g. a solar-system source has ssObjectId instead).
    let nonzero = |v: &Value| id_text(v).filter(|s| s != "0");
    let object_id = field(src, "diaObjectId")
        .and_then(nonzero)
        .or_else(|| field(rec, "diaObject").and_then(|o| field(o, "diaObjectId")).and_then(nonzero))
        .or_else(|| field(src, "ssObjectId").and_then(nonzero))
        .unwrap_or_default();
    let ra = require(get_f64(src, "ra"), "diaSource", "ra")?;
    // `decl` in older schemas (and ELAsTiCC's).
    let dec = require(get_f64(src, "dec").or_else(|| get_f64(src, "decl")), "diaSource", "dec")?;
    let mjd_tai = require(get_f64(src, "midpointMjdTai"), "diaSource", "midpointMjdTai")?;
    let band = get_str(src, "band").or_else(|| get_str(src, "filterName")).unwrap_or("").to_string();
    let survey_snr = get_f64(src, "snr").or_else(|| {
        let (f, e) = (get_f64(src, "psfFlux")?, get_f64(src, "psfFluxErr")?);
        (e > 0.0).then(|| f / e)
    });
    let positive = !get_bool(src, "isNegative").unwrap_or(false);

    let (science, sci_hdr) = cutout(rec, "cutoutScience", limits)?;
    let (template, _) = cutout(rec, "cutoutTemplate", limits)?;
    let difference = match get_bytes(rec, "cutoutDifference") {
        Some(_) => Some(cutout(rec, "cutoutDifference", limits)?.0),
        None => None,
    };
    let triplet = Triplet { science, template, difference };
    check_shapes(&triplet)?;

    let (w, h) = triplet.science.image.shape();
    let (stamp_x, stamp_y) = stamp_position(&sci_hdr, ra, dec, get_f64(src, "x"), get_f64(src, "y"), w, h);
    let zero_point = sci_hdr.get_str("BUNIT").filter(|u| u.eq_ignore_ascii_case("nJy")).map(|_| 31.4);

    Ok(Alert {
        survey: Survey::Rubin,
        alert_id: String::new(),
        object_id,
        ra,
        dec,
        mjd_tai,
        band,
        exposure_s: None,
        candidate: Candidate {
            stamp_x,
            stamp_y,
            fwhm_px: None,
            template_fwhm_px: None,
            survey_snr,
            positive,
            zero_point,
            gain: None,
        },
        triplet,
    })
}

/// One cutout field → stamp (image, UNCERT variance, PSFIMAGE) and the image HDU's header.
fn cutout(rec: &Value, name: &str, limits: &Limits) -> Result<(Stamp, Header), DecodeError> {
    let bytes = get_bytes(rec, name).ok_or_else(|| DecodeError::MissingField(format!("{name} (null)")))?;
    let hdus = fits::read_hdus(bytes, limits).map_err(|e| match e {
        DecodeError::Fits(m) => DecodeError::Fits(format!("{name}: {m}")),
        e => e,
    })?;
    let mut image = None;
    let mut variance = None;
    let mut psf = None;
    for h in hdus {
        match h.name.to_ascii_uppercase().as_str() {
            "UNCERT" | "VARIANCE" => {
                let mut img = h.image;
                if h.header.get_str("UTYPE").is_some_and(|u| u.contains("StdDev")) {
                    for p in img.data.iter_mut() {
                        *p *= *p;
                    }
                }
                variance = Some(img);
            }
            "PSFIMAGE" | "PSF" => psf = Some(h.image),
            _ if image.is_none() => image = Some((h.image, h.header)),
            _ => {}
        }
    }
    let (img, hdr) = image.ok_or_else(|| DecodeError::Fits(format!("{name}: no image HDU")))?;
    Ok((stamp_from_image(name, img, variance, psf)?, hdr))
}

/// Where (ra, dec) falls on the stamp, 0-based pixels.
pub fn stamp_position(hdr: &Header, ra: f64, dec: f64, x: Option<f64>, y: Option<f64>, w: usize, h: usize) -> (f64, f64) {
    let on = |(sx, sy): (f64, f64)| sx.is_finite() && sy.is_finite() && sx >= -0.5 && sy >= -0.5 && sx <= w as f64 - 0.5 && sy <= h as f64 - 0.5;
    if let Some(p) = wcs_tan_pixel(hdr, ra, dec).filter(|p| on(*p)) {
        return p;
    }
    if let (Some(x), Some(y)) = (x, y) {
        if let (Some(l1), Some(l2)) = (hdr.get_f64("LTV1"), hdr.get_f64("LTV2")) {
            let p = (x + l1, y + l2);
            if on(p) {
                return p;
            }
        }
        // On the real v10_0 cutouts, `x − CUTMINX − 1` is what agrees with the WCS and with
        // the difference image's centroid (to ~0.2 px); `x − CUTMINX` is one pixel off.
        if let (Some(c1), Some(c2)) = (hdr.get_f64("CUTMINX"), hdr.get_f64("CUTMINY")) {
            let p = (x - c1 - 1.0, y - c2 - 1.0);
            if on(p) {
                return p;
            }
        }
    }
    ((w as f64 - 1.0) / 2.0, (h as f64 - 1.0) / 2.0)
}

/// Gnomonic (TAN) world → pixel (0-based) with CRVAL, CRPIX and CD (or PC × CDELT).
pub fn wcs_tan_pixel(hdr: &Header, ra: f64, dec: f64) -> Option<(f64, f64)> {
    if let Some(t) = hdr.get_str("CTYPE1") {
        if !t.ends_with("TAN") {
            return None;
        }
    }
    let (a0, d0) = (hdr.get_f64("CRVAL1")?, hdr.get_f64("CRVAL2")?);
    let (p1, p2) = (hdr.get_f64("CRPIX1")?, hdr.get_f64("CRPIX2")?);
    let cd = if let (Some(a), Some(b), Some(c), Some(d)) =
        (hdr.get_f64("CD1_1"), hdr.get_f64("CD1_2"), hdr.get_f64("CD2_1"), hdr.get_f64("CD2_2"))
    {
        [a, b, c, d]
    } else {
        let (s1, s2) = (hdr.get_f64("CDELT1")?, hdr.get_f64("CDELT2")?);
        let pc = |k: &str, def: f64| hdr.get_f64(k).unwrap_or(def);
        [s1 * pc("PC1_1", 1.0), s1 * pc("PC1_2", 0.0), s2 * pc("PC2_1", 0.0), s2 * pc("PC2_2", 1.0)]
    };
    let (a, d, a0r, d0r) = (ra.to_radians(), dec.to_radians(), a0.to_radians(), d0.to_radians());
    let cosc = d0r.sin() * d.sin() + d0r.cos() * d.cos() * (a - a0r).cos();
    if cosc <= 0.0 {
        return None;
    }
    let xi = (d.cos() * (a - a0r).sin() / cosc).to_degrees();
    let eta = ((d0r.cos() * d.sin() - d0r.sin() * d.cos() * (a - a0r).cos()) / cosc).to_degrees();
    let det = cd[0] * cd[3] - cd[1] * cd[2];
    if det == 0.0 || !det.is_finite() {
        return None;
    }
    let dx = (cd[3] * xi - cd[1] * eta) / det;
    let dy = (-cd[2] * xi + cd[0] * eta) / det;
    Some((p1 + dx - 1.0, p2 + dy - 1.0))
}

/// The Fink-wrapped Rubin alerts of a transfer container → one Confluent-framed lsst.v10_0 message
/// each (`0x00`, schema id 1001 big-endian, the datum under the official schema). Fields absent
/// from Fink's record take the official defaults; Fink's own additions are dropped.
pub fn fink_to_confluent(decoder: &Decoder, container: &[u8]) -> Result<Vec<Vec<u8>>, DecodeError> {
    let schema = decoder.rubin.get(V10_0)?;
    let alert = schema.alert().ok_or_else(|| DecodeError::SchemaId { id: V10_0, detail: "no alert schema".into() })?;
    let refs: Vec<&Schema> = schema.schemata.iter().collect();
    let names = avro_util::named_types(&refs);
    let mut out = Vec::new();
    for rec in avro_util::read_container(container)? {
        let rec = rec?;
        let v = avro_util::conform(&rec, alert, &names, false, "alert")?;
        let datum = apache_avro::to_avro_datum_schemata(alert, refs.clone(), v)?;
        let mut msg = Vec::with_capacity(datum.len() + 5);
        msg.push(0u8);
        msg.extend_from_slice(&V10_0.to_be_bytes());
        msg.extend_from_slice(&datum);
        out.push(msg);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dir_ids() {
        assert_eq!(id_of_dir("v10_0"), Some(1000));
        assert_eq!(id_of_dir("v11_1"), Some(1101));
        assert_eq!(id_of_dir("x"), None);
    }

    #[test]
    fn embedded_schemas_parse() {
        let s = RubinSchemas::new(None, None);
        assert!(s.is_ok(), "{:?}", s.err());
        if let Ok(s) = s {
            for id in [1000, 1001, 1100, 1101] {
                assert!(s.get(id).is_ok(), "{id}");
            }
            assert_eq!(s.get(9999).map_err(|e| e.reason()).err(), Some("schema_id"));
        }
    }
}

//! Decoders against real fixtures (`testdata/README.md` has their provenance), bad input built by
//! modifying real alerts, the schema registry, and property tests.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use apache_avro::schema::Schema;
use apache_avro::types::Value;
use blink::alert::{Alert, Image, Survey};
use blink::decode::{self, avro_util, fink_to_confluent, inspect, read_hdus, write_hdus, Decoder, DecoderConfig, Limits};
use proptest::prelude::*;

fn td(p: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("testdata").join(p)
}

fn read(p: &str) -> Vec<u8> {
    std::fs::read(td(p)).unwrap_or_else(|e| panic!("fixture {p} missing: {e}"))
}

fn decoder() -> Decoder {
    Decoder::new(DecoderConfig::default()).expect("decoder")
}

const ZTF_33: &str = "ztf/ztf-avro-alert/472263571115115000.avro";
const RUBIN: &str = "lsst/fink-transfer-2026-03-18/part-2-918301.avro";
const SNAPPY1: &str = "ztf/fink-client/sample_snappy/part-00001-0f70696a-f8dd-40ab-89e7-e7f64c104e25-c000.avro";
const SNAPPY2: &str = "ztf/fink-client/sample_snappy/part-00002-0f70696a-f8dd-40ab-89e7-e7f64c104e25-c000.avro";

fn ok_alerts(d: &Decoder, p: &str) -> Vec<Alert> {
    let rs = d.decode_file(&td(p)).unwrap_or_else(|e| panic!("{p}: {e}"));
    rs.into_iter().map(|r| r.unwrap_or_else(|e| panic!("{p}: {e}"))).collect()
}

fn one_err(rs: Vec<Result<Alert, decode::DecodeError>>) -> decode::DecodeError {
    assert_eq!(rs.len(), 1, "expected one result");
    match rs.into_iter().next() {
        Some(Err(e)) => e,
        Some(Ok(a)) => panic!("expected an error, decoded alert {}", a.alert_id),
        None => unreachable!(),
    }
}

// ---------------------------------------------------------------- fixtures and counts

#[test]
fn every_fixture_decodes_with_the_provenance_counts() {
    let d = decoder();
    let table: &[(&str, usize, Survey)] = &[
        ("ztf/ztf-avro-alert/2019_01_10_739260766315010006.avro", 1, Survey::Ztf),
        (ZTF_33, 1, Survey::Ztf),
        ("ztf/fink-client/ZTF19acihgng.avro", 1, Survey::Ztf),
        ("ztf/fink-client/ZTF19acxxwrs.avro", 1, Survey::Ztf),
        ("ztf/fink-client/ZTF19acyfkzd.avro", 1, Survey::Ztf),
        ("ztf/fink-client/ZTF19acyjzeo.avro", 1, Survey::Ztf),
        ("ztf/fink-client/avro_multi_alerts_other.avro", 3, Survey::Ztf),
        ("ztf/fink-client/avro_multi_alerts.avro", 11, Survey::Ztf),
        ("ztf/fink-client/fink-broker-sample-alert-1.avro", 1, Survey::Ztf),
        ("ztf/fink-client/fink-broker-sample-alert-2.avro", 1, Survey::Ztf),
        ("ztf/fink-client/fink-broker-sample-alert-3.avro", 1, Survey::Ztf),
        ("ztf/fink-client/fink-broker-sample-alert-4.avro", 1, Survey::Ztf),
        (SNAPPY1, 54, Survey::Ztf),
        (SNAPPY2, 56, Survey::Ztf),
        (RUBIN, 7, Survey::Rubin),
    ];
    let mut total = 0;
    for (p, n, survey) in table {
        let alerts = ok_alerts(&d, p);
        assert_eq!(alerts.len(), *n, "{p}");
        for a in &alerts {
            assert_eq!(a.survey, *survey, "{p}");
            assert!(a.ra.is_finite() && a.dec.abs() <= 90.0, "{p}");
            assert!(a.mjd_tai > 58000.0 && a.mjd_tai < 70000.0, "{p}: {}", a.mjd_tai);
            assert!(!a.alert_id.is_empty());
            if *survey == Survey::Ztf {
                assert_eq!(a.triplet.science.image.shape(), (63, 63), "{p} {}", a.alert_id);
                assert!(a.triplet.difference.is_some());
            }
        }
        total += alerts.len();
    }
    assert_eq!(total, 10 + 3 + 11 + 110 + 7);
}

#[test]
fn ztf_real_values() {
    let d = decoder();
    let a = ok_alerts(&d, ZTF_33).remove(0);
    assert_eq!(a.alert_id, "472263571115115000");
    assert!(a.object_id.starts_with("ZTF"), "{}", a.object_id);
    assert!(["g", "r", "i"].contains(&a.band.as_str()));
    assert_eq!(a.exposure_s, Some(30.0));
    let c = &a.candidate;
    assert!(c.survey_snr.is_some_and(|s| s > 3.0));
    assert!(c.fwhm_px.is_some_and(|f| f > 0.5 && f < 20.0));
    assert!(c.zero_point.is_some_and(|z| z > 20.0 && z < 30.0));
    // Candidate near the centre of a full stamp; the difference peaks there.
    assert!((c.stamp_x - 31.0).abs() < 1.0 && (c.stamp_y - 31.0).abs() < 1.0, "{c:?}");
    let diff = a.triplet.difference.as_ref().expect("difference");
    let (px, py) = peak(&diff.image, 20..43, 20..43);
    assert!((px as f64 - c.stamp_x).abs() <= 1.5 && (py as f64 - c.stamp_y).abs() <= 1.5);

    // The same stamps as the extracted cutout files.
    let lim = Limits::default();
    let sci = decode::ztf::stamp_image(&read("cutouts/ztf/472263571115115000_cutoutScience.fits.gz"), "sci", &lim).expect("stamp");
    assert_eq!(sci, a.triplet.science.image);

    // One known alert among the snappy ones.
    let snappy = ok_alerts(&d, SNAPPY1);
    let b = snappy.iter().find(|a| a.alert_id == "1786151884115010012").expect("known candid");
    assert_eq!(b.object_id, "ZTF18aaxypzn");
    assert!((b.ra - 299.1751129).abs() < 1e-6);
    assert_eq!(b.band, "r");
    assert!(b.triplet.science.nan_count() > 0);
    // jd (exposure start, UTC) → MJD TAI at mid-exposure.
    let jd_mjd = b.mjd_tai - 37.0 / 86400.0 - b.exposure_s.unwrap_or(0.0) / 2.0 / 86400.0;
    assert!((jd_mjd - 59540.1520).abs() < 0.001, "{jd_mjd}");
}

/// Flux-weighted centroid of the (sign-corrected) positive pixels in a 7x7 box.
fn centroid(img: &Image, x0: f64, y0: f64, positive: bool) -> (f64, f64) {
    let sgn = if positive { 1.0 } else { -1.0 };
    let (cx, cy) = (x0.round() as i64, y0.round() as i64);
    let (mut sx, mut sy, mut sw) = (0.0, 0.0, 0.0);
    for y in cy - 3..=cy + 3 {
        for x in cx - 3..=cx + 3 {
            if x < 0 || y < 0 || x as usize >= img.width || y as usize >= img.height {
                continue;
            }
            let v = sgn * f64::from(img.data[y as usize * img.width + x as usize]);
            if v > 0.0 {
                sx += v * x as f64;
                sy += v * y as f64;
                sw += v;
            }
        }
    }
    (sx / sw, sy / sw)
}

/// Position of the maximum inside a window.
fn peak(img: &Image, xs: std::ops::Range<usize>, ys: std::ops::Range<usize>) -> (usize, usize) {
    let mut best = (0, 0, f32::MIN);
    for y in ys.clone() {
        for x in xs.clone() {
            if let Some(v) = img.data.get(y * img.width + x) {
                if *v > best.2 {
                    best = (x, y, *v);
                }
            }
        }
    }
    (best.0, best.1)
}

#[test]
fn rubin_real_alerts() {
    let d = decoder();
    let alerts = ok_alerts(&d, RUBIN);
    assert_eq!(alerts.len(), 7);
    for a in &alerts {
        assert_eq!(a.band, "i");
        for s in [&a.triplet.science, &a.triplet.template] {
            assert!(s.variance.is_some() && s.psf.is_some(), "{}", a.alert_id);
            let v = s.variance.as_ref().map(|v| v.data.iter().all(|x| *x >= 0.0));
            assert_eq!(v, Some(true), "variance must be non-negative");
        }
        assert!(a.triplet.difference.as_ref().is_some_and(|s| s.variance.is_some() && s.psf.is_some()));
        assert_eq!(a.candidate.zero_point, Some(31.4));
    }
    let a = alerts.iter().find(|a| a.alert_id == "170094456272322680").expect("known diaSourceId");
    assert_eq!(a.object_id, "170028485706776685");
    assert!((a.ra - 63.349628499442).abs() < 1e-9);
    assert!((a.mjd_tai - 61105.0936).abs() < 1e-3);
    assert_eq!(a.triplet.science.image.shape(), (30, 30));
    // Variance in UNCERT: the median of variance/pixel-scatter² is of order 1, not of order 1/σ.
    let lim = Limits::default();
    let hdus = read_hdus(&read("cutouts/lsst/170094456272322680_cutoutScience.fits"), &lim).expect("fits");
    assert_eq!(hdus.iter().map(|h| h.name.as_str()).collect::<Vec<_>>(), ["PRIMARY", "UNCERT", "PSFIMAGE"]);
    assert_eq!(hdus[1].header.get_str("UTYPE"), Some("VarianceUncertainty"));
    assert_eq!(hdus[0].image, a.triplet.science.image);

    // The stamp position (from the WCS) sits on the difference image's centroid: within 0.5 px
    // for the alerts with SNR > 10 (but 170094456523456557, a source off the cutout's centre).
    for a in alerts.iter().filter(|a| a.candidate.survey_snr.unwrap_or(0.0) > 10.0 && a.alert_id != "170094456523456557") {
        let (cx, cy) = centroid(&a.triplet.difference.as_ref().expect("diff").image, a.candidate.stamp_x, a.candidate.stamp_y, a.candidate.positive);
        assert!((cx - a.candidate.stamp_x).abs() < 0.5 && (cy - a.candidate.stamp_y).abs() < 0.5, "{}: centroid ({cx},{cy}) vs {:?}", a.alert_id, a.candidate);
    }
    // The stamp position from the WCS agrees with diaSource.x/y − CUTMINX/CUTMINY − 1.
    let records = avro_util::read_container(&read(RUBIN)).expect("container");
    for (rec, a) in records.iter().zip(&alerts) {
        let rec = rec.as_ref().expect("record");
        let src = avro_util::field(rec, "diaSource").expect("diaSource");
        let (x, y) = (avro_util::get_f64(src, "x").expect("x"), avro_util::get_f64(src, "y").expect("y"));
        let sci = avro_util::get_bytes(rec, "cutoutScience").expect("cutout");
        let h = &read_hdus(sci, &lim).expect("fits")[0].header;
        let (cx, cy) = (h.get_f64("CUTMINX").expect("CUTMINX"), h.get_f64("CUTMINY").expect("CUTMINY"));
        assert!((x - cx - 1.0 - a.candidate.stamp_x).abs() < 0.05, "{} x: {} vs {}", a.alert_id, x - cx - 1.0, a.candidate.stamp_x);
        assert!((y - cy - 1.0 - a.candidate.stamp_y).abs() < 0.05, "{} y: {} vs {}", a.alert_id, y - cy - 1.0, a.candidate.stamp_y);
        // The fallback without WCS gives the same.
        let mut no_wcs = h.clone();
        no_wcs.cards.retain(|(k, _)| !k.starts_with("CRVAL"));
        let (sx, sy) = decode::rubin::stamp_position(&no_wcs, a.ra, a.dec, Some(x), Some(y), 30, 30);
        assert!((sx - a.candidate.stamp_x).abs() < 0.05 && (sy - a.candidate.stamp_y).abs() < 0.05);
    }
}

#[test]
fn rubin_fake_alerts_have_null_cutouts() {
    let d = decoder();
    for v in ["v10_0", "v11_0", "v11_1"] {
        let rs = d.decode_file(&td(&format!("lsst/fake/fakeAlert_{v}.avro"))).expect("file");
        let e = one_err(rs);
        assert_eq!(e.reason(), "missing_field", "{v}: {e}");
        assert!(e.to_string().contains("cutout"), "{e}");
    }
}

#[test]
fn elasticc_is_a_clear_error() {
    let d = decoder();
    let rs = d.decode_file(&td("elasticc/alert_mjd60674.0512_obj747_src1494043.avro.gz")).expect("file");
    let e = one_err(rs);
    assert_eq!(e.reason(), "missing_field", "{e}");
    assert!(e.to_string().contains("1494043"), "{e}");
}

#[test]
fn ztf_edge_stamp_position() {
    // The edge triplet (63 wide, 58 tall, NaNs) placed into a real alert: the candidate is on row
    // 26 (the quadrant's first 58 rows were cut: start 0), so ypos = 27.2 (1-based).
    let edge = |k: &str| read(&format!("cutouts/ztf/edge_3367504081715010000_cutout{k}.fits.gz"));
    let msg = reencode(ZTF_33, |rec| {
        for k in ["Science", "Template", "Difference"] {
            set(rec, &[&format!("cutout{k}"), "stampData"], Value::Bytes(edge(k)));
        }
        set(rec, &["candidate", "xpos"], Value::Float(1500.3));
        set(rec, &["candidate", "ypos"], Value::Float(27.2));
    });
    let a = decoder().decode_message(&msg).remove(0).expect("edge alert");
    let s = &a.triplet.science;
    assert_eq!((s.width(), s.height()), (63, 58));
    assert!(s.nan_count() > 0 && a.triplet.difference.as_ref().is_some_and(|d| d.nan_count() > 0));
    assert!(s.image.data.iter().all(|p| p.is_finite()));
    assert!((a.candidate.stamp_x - 31.3).abs() < 1e-4 && (a.candidate.stamp_y - 26.2).abs() < 1e-4, "{:?}", a.candidate);
    let diff = &a.triplet.difference.as_ref().expect("diff").image;
    let (px, py) = peak(diff, 15..48, 15..48);
    assert!((px as f64 - a.candidate.stamp_x).abs() <= 1.5 && (py as f64 - a.candidate.stamp_y).abs() <= 1.5, "peak ({px},{py}) vs {:?}", a.candidate);
    // Reading the edge files directly: NaN count.
    let img = decode::ztf::stamp_image(&edge("Difference"), "d", &Limits::default()).expect("stamp");
    assert!(img.data.iter().any(|p| p.is_nan()));
}

// ---------------------------------------------------------------- helpers to rewrite real alerts

/// A real container, each record changed by `f`, re-encoded under its own writer schema.
fn reencode(p: &str, f: impl Fn(&mut Value)) -> Vec<u8> {
    let bytes = read(p);
    let reader = apache_avro::Reader::new(&bytes[..]).expect("reader");
    let schema = reader.writer_schema().clone();
    let mut recs: Vec<Value> = reader.map(|r| r.expect("record")).collect();
    for r in recs.iter_mut() {
        f(r);
    }
    let mut w = apache_avro::Writer::new(&schema, Vec::new());
    for r in recs {
        w.append(r).expect("append");
    }
    w.into_inner().expect("container")
}

/// Set a nested field (unions looked through); the new value is wrapped in the union branch of the
/// old one when the old was a non-null union value.
fn set(v: &mut Value, path: &[&str], new: Value) {
    let mut cur = v;
    for (i, key) in path.iter().enumerate() {
        while let Value::Union(_, inner) = cur {
            cur = inner;
        }
        let Value::Record(fields) = cur else { panic!("not a record at {key}") };
        let slot = &mut fields.iter_mut().find(|(n, _)| n == key).unwrap_or_else(|| panic!("no field {key}")).1;
        if i + 1 == path.len() {
            match slot {
                Value::Union(_, inner) => **inner = new,
                other => *other = new,
            }
            return;
        }
        cur = slot;
    }
}

fn get_stamp(p: &str, field: &str) -> Vec<u8> {
    let recs = avro_util::read_container(&read(p)).expect("container");
    let rec = recs.into_iter().next().expect("one").expect("record");
    avro_util::field(&rec, field).and_then(|c| avro_util::get_bytes(c, "stampData")).expect("stamp").to_vec()
}

fn gunzip(b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(b).read_to_end(&mut out).expect("gunzip");
    out
}

fn gzip(b: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(b).expect("gzip");
    e.finish().expect("gzip")
}

/// Replace a header card (by keyword) in FITS bytes, keeping the 80-byte slot.
fn set_card(fits: &mut [u8], key: &str, card: &str) {
    for c in fits.chunks_exact_mut(80).take(36) {
        if c.starts_with(format!("{key:<8}").as_bytes()) {
            c.copy_from_slice(format!("{card:<80}").as_bytes());
            return;
        }
    }
    panic!("no card {key}");
}

/// The 3.3 fixture with its science stamp replaced.
fn with_science(stamp: Vec<u8>) -> Vec<u8> {
    reencode(ZTF_33, |rec| set(rec, &["cutoutScience", "stampData"], Value::Bytes(stamp.clone())))
}

fn reason_of(msg: &[u8]) -> (String, String) {
    let e = one_err(decoder().decode_message(msg));
    (e.reason().to_string(), e.to_string())
}

// ---------------------------------------------------------------- bad input

#[test]
fn bad_messages_have_specific_reasons() {
    let d = decoder();
    let real = read(ZTF_33);
    assert_eq!(one_err(d.decode_message(&[])).reason(), "empty");
    // Truncated container.
    let (r, m) = reason_of(&real[..real.len() / 2]);
    assert_eq!(r, "avro", "{m}");
    // Wrong magic.
    let mut bad = real.clone();
    bad[0] = b'X';
    let (r, m) = reason_of(&bad);
    assert_eq!(r, "magic");
    assert!(m.contains("0x58"), "{m}");
    // Unknown Rubin schema id.
    let (r, m) = reason_of(&[0, 0, 0, 0x27, 0x0f, 1, 2, 3]);
    assert_eq!(r, "schema_id");
    assert!(m.contains("9999"), "{m}");
    // Too large.
    let small = Decoder::new(DecoderConfig { limits: Limits { max_message_bytes: 1000, ..Limits::default() }, ..Default::default() }).expect("decoder");
    assert_eq!(one_err(small.decode_message(&real)).reason(), "too_large");
    // A gzipped message is inflated and decoded; a corrupt one is "gzip".
    assert!(d.decode_message(&gzip(&real))[0].is_ok());
    let gz = gzip(&real);
    assert_eq!(one_err(d.decode_message(&gz[..gz.len() / 2])).reason(), "gzip");
}

#[test]
fn bad_stamps_have_specific_reasons() {
    let sci = get_stamp(ZTF_33, "cutoutScience");
    let fits = gunzip(&sci);

    // Corrupt gzip: cut in half.
    let (r, m) = reason_of(&with_science(sci[..sci.len() / 2].to_vec()));
    assert_eq!(r, "gzip", "{m}");
    assert!(m.contains("472263571115115000"), "the alert id is named: {m}");
    // Gzip bomb: 64 MiB of zeros.
    let bomb = gzip(&vec![0u8; 64 << 20]);
    assert!(bomb.len() < 1 << 20);
    let (r, m) = reason_of(&with_science(bomb));
    assert_eq!(r, "gzip_bomb", "{m}");
    // NAXIS = 3.
    let mut f = fits.clone();
    set_card(&mut f, "NAXIS", "NAXIS   =                    3");
    set_card(&mut f, "BUNIT", "NAXIS3  =                    1");
    let (r, m) = reason_of(&with_science(gzip(&f)));
    assert_eq!(r, "fits");
    assert!(m.contains("NAXIS = 3"), "{m}");
    // BITPIX = 24.
    let mut f = fits.clone();
    set_card(&mut f, "BITPIX", "BITPIX  =                   24");
    let (r, m) = reason_of(&with_science(gzip(&f)));
    assert_eq!(r, "fits");
    assert!(m.contains("24"), "{m}");
    // NAXIS1 = 10^9: refused from the header, nothing allocated.
    let mut f = fits.clone();
    set_card(&mut f, "NAXIS1", "NAXIS1  =           1000000000");
    let (r, m) = reason_of(&with_science(gzip(&f)));
    assert_eq!(r, "fits");
    assert!(m.contains("1000000000"), "{m}");
    // Data shorter than the header says.
    let (r, _) = reason_of(&with_science(gzip(&fits[..2880 + 100])));
    assert_eq!(r, "fits");
    // All-NaN stamp.
    let nan = Image::new(63, 63, vec![f32::NAN; 63 * 63]);
    let (r, _) = reason_of(&with_science(gzip(&write_hdus(&[("PRIMARY", &nan)]))));
    assert_eq!(r, "all_nan");
    // Science and template of different shapes.
    let small = Image::new(40, 63, vec![1.0; 40 * 63]);
    let (r, m) = reason_of(&with_science(gzip(&write_hdus(&[("PRIMARY", &small)]))));
    assert_eq!(r, "shape", "{m}");
    // Not FITS at all.
    let (r, _) = reason_of(&with_science(gzip(b"hello")));
    assert_eq!(r, "fits");
}

#[test]
fn a_bad_record_does_not_spoil_the_others() {
    let bytes = read("ztf/fink-client/avro_multi_alerts_other.avro");
    let reader = apache_avro::Reader::new(&bytes[..]).expect("reader");
    let schema = reader.writer_schema().clone();
    let mut recs: Vec<Value> = reader.map(|r| r.expect("record")).collect();
    set(&mut recs[1], &["cutoutScience", "stampData"], Value::Bytes(b"\x1f\x8bjunk".to_vec()));
    let mut w = apache_avro::Writer::new(&schema, Vec::new());
    for r in recs {
        w.append(r).expect("append");
    }
    let rs = decoder().decode_message(&w.into_inner().expect("container"));
    assert_eq!(rs.len(), 3);
    assert!(rs[0].is_ok() && rs[2].is_ok());
    assert_eq!(rs[1].as_ref().map_err(|e| e.reason()).err(), Some("gzip"));
}

// ---------------------------------------------------------------- schema evolution

/// A schema split over files (named references), inlined into one JSON document.
fn inline_schema(root: &str, defs: &HashMap<String, serde_json::Value>) -> String {
    fn walk(v: &mut serde_json::Value, defs: &HashMap<String, serde_json::Value>, seen: &mut Vec<String>) {
        match v {
            serde_json::Value::String(s) if defs.contains_key(s.as_str()) && !seen.contains(s) => {
                seen.push(s.clone());
                let mut d = defs[s.as_str()].clone();
                walk(&mut d, defs, seen);
                *v = d;
            }
            serde_json::Value::Array(a) => a.iter_mut().for_each(|x| walk(x, defs, seen)),
            serde_json::Value::Object(o) => {
                for (k, x) in o.iter_mut() {
                    if k == "type" || k == "items" || k == "values" || k == "fields" {
                        walk(x, defs, seen);
                    }
                }
            }
            _ => {}
        }
    }
    let mut v: serde_json::Value = serde_json::from_str(root).expect("json");
    let mut seen = Vec::new();
    walk(&mut v, defs, &mut seen);
    v.to_string()
}

fn load_defs(dir: &Path) -> (HashMap<String, serde_json::Value>, Vec<String>) {
    let mut defs = HashMap::new();
    let mut texts = Vec::new();
    for e in std::fs::read_dir(dir).expect("dir") {
        let text = std::fs::read_to_string(e.expect("entry").path()).expect("read");
        let v: serde_json::Value = serde_json::from_str(&text).expect("json");
        let name = format!("{}.{}", v["namespace"].as_str().unwrap_or(""), v["name"].as_str().unwrap_or(""));
        defs.insert(name, v);
        texts.push(text);
    }
    (defs, texts)
}

#[test]
fn ztf_4_02_decodes() {
    let (defs, _) = load_defs(&td("ztf/schema4"));
    let root = defs["ztf.alert"].to_string();
    let json = inline_schema(&root, &defs);
    let schema = Schema::parse_str(&json).expect("4.02 schema");
    let names = avro_util::named_types(&[&schema]);
    let recs = avro_util::read_container(&read(ZTF_33)).expect("3.3");
    let old = recs.into_iter().next().expect("one").expect("record");
    let new = avro_util::conform(&old, &schema, &names, true, "alert").expect("conform to 4.02");
    let mut w = apache_avro::Writer::new(&schema, Vec::new());
    w.append(new).expect("append");
    let msg = w.into_inner().expect("container");
    let d = decoder();
    let a = d.decode_message(&msg).remove(0).expect("4.02 alert decodes");
    let b = ok_alerts(&d, ZTF_33).remove(0);
    assert_eq!(a, b);
}

// ---------------------------------------------------------------- Rubin on the wire

#[test]
fn fink_rubin_to_confluent_roundtrip() {
    let d = decoder();
    let direct = ok_alerts(&d, RUBIN);
    let msgs = fink_to_confluent(&d, &read(RUBIN)).expect("convert");
    assert_eq!(msgs.len(), 7);
    for (m, a) in msgs.iter().zip(&direct) {
        assert_eq!(&m[..5], &[0, 0, 0, 0x03, 0xe9]);
        let b = d.decode_message(m).remove(0).expect("confluent decode");
        assert_eq!(b.alert_id, a.alert_id);
        assert_eq!(b.object_id, a.object_id);
        assert_eq!((b.ra, b.dec, b.mjd_tai), (a.ra, a.dec, a.mjd_tai));
        assert_eq!(b.triplet, a.triplet);
        assert_eq!(b, *a);
        // Truncated datum.
        assert_eq!(one_err(d.decode_message(&m[..m.len() / 2])).reason(), "avro");
    }
}

#[test]
fn schema_registry_lookup_is_cached() {
    use std::net::TcpListener;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    let (defs, _) = load_defs(&td("../schemas/lsst/v10_0"));
    let full = inline_schema(&defs["lsst.v10_0.alert"].to_string(), &defs);
    let body = serde_json::json!({ "schema": full }).to_string();

    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let hits = Arc::new(AtomicUsize::new(0));
    let paths = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    {
        let (hits, paths) = (hits.clone(), paths.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut s) = stream else { continue };
                let mut buf = [0u8; 4096];
                let n = s.read(&mut buf).unwrap_or(0);
                let req = String::from_utf8_lossy(&buf[..n]).to_string();
                let path = req.split_whitespace().nth(1).unwrap_or("").to_string();
                hits.fetch_add(1, Ordering::SeqCst);
                paths.lock().map(|mut p| p.push(path.clone())).ok();
                let (status, b) = if path == "/schemas/ids/4242" { ("200 OK", body.as_str()) } else { ("404 Not Found", "{\"error_code\":40403}") };
                let _ = write!(s, "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{b}", b.len());
            }
        });
    }
    let d = Decoder::new(DecoderConfig { schema_registry_url: Some(format!("http://{addr}")), ..Default::default() }).expect("decoder");
    let msgs = fink_to_confluent(&d, &read(RUBIN)).expect("convert");
    let direct = ok_alerts(&d, RUBIN);
    for (m, a) in msgs.iter().zip(&direct) {
        let mut m = m.clone();
        m[1..5].copy_from_slice(&4242u32.to_be_bytes());
        let b = d.decode_message(&m).remove(0).expect("decoded with the registry's schema");
        assert_eq!(b, *a);
    }
    assert_eq!(hits.load(Ordering::SeqCst), 1, "answers are cached");
    // An id the registry does not know.
    let mut m = msgs[0].clone();
    m[1..5].copy_from_slice(&7777u32.to_be_bytes());
    assert_eq!(one_err(d.decode_message(&m)).reason(), "schema_id");
    assert!(paths.lock().map(|p| p.contains(&"/schemas/ids/7777".to_string())).unwrap_or(false));
}

#[test]
fn rubin_schema_dir_config() {
    let d = Decoder::new(DecoderConfig { rubin_schema_dir: Some(td("../schemas/lsst")), ..Default::default() }).expect("decoder");
    let msgs = fink_to_confluent(&d, &read(RUBIN)).expect("convert");
    assert!(d.decode_message(&msgs[0])[0].is_ok());
}

// ---------------------------------------------------------------- FITS reader vs cfitsio

#[test]
fn fits_reader_matches_cfitsio() {
    let dir = std::env::temp_dir().join(format!("blink-fits-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("tmp");
    let lim = Limits::default();
    let mut n = 0;
    for e in std::fs::read_dir(td("cutouts/ztf")).expect("dir").chain(std::fs::read_dir(td("cutouts/lsst")).expect("dir")) {
        let p = e.expect("entry").path();
        let mut bytes = std::fs::read(&p).expect("read");
        if p.extension().is_some_and(|x| x == "gz") {
            bytes = gunzip(&bytes);
        }
        let tmp = dir.join(format!("{n}.fits"));
        std::fs::write(&tmp, &bytes).expect("write");
        let ours = read_hdus(&bytes, &lim).expect("ours");
        let mut f = fitsio::FitsFile::open(&tmp).expect("cfitsio open");
        for (i, h) in ours.iter().enumerate() {
            let hdu = f.hdu(i).expect("hdu");
            let theirs: Vec<f32> = hdu.read_image(&mut f).expect("cfitsio read");
            assert_eq!(theirs.len(), h.image.data.len(), "{} hdu {i}", p.display());
            for (a, b) in theirs.iter().zip(&h.image.data) {
                assert!(a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()), "{} hdu {i}: {a} vs {b}", p.display());
            }
        }
        assert!(f.hdu(ours.len()).is_err(), "{}: cfitsio sees more HDUs", p.display());
        n += 1;
    }
    assert_eq!(n, 9);
    // And our writer's output reads back in cfitsio.
    let img = Image::new(7, 5, (0..35).map(|i| i as f32 * 0.5 - 3.0).collect());
    let tmp = dir.join("written.fits");
    std::fs::write(&tmp, write_hdus(&[("IMAGE", &img), ("PSF", &img)])).expect("write");
    let mut f = fitsio::FitsFile::open(&tmp).expect("open");
    let hdu = f.hdu("PSF").expect("PSF hdu");
    let data: Vec<f32> = hdu.read_image(&mut f).expect("read");
    assert_eq!(data, img.data);
    let _ = std::fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------- inspect

#[test]
fn inspect_prints_every_alert_and_names_bad_files() {
    let d = decoder();
    let paths = vec![td("ztf/fink-client/avro_multi_alerts_other.avro"), td("does/not/exist.avro"), td("lsst/fake/fakeAlert_v11_1.avro"), td(RUBIN)];
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let code = inspect::run(&d, &paths, &mut out, &mut err);
    assert_eq!(code, 1);
    let out = String::from_utf8(out).expect("utf8");
    let lines: Vec<serde_json::Value> = out.lines().map(|l| serde_json::from_str(l).expect("json line")).collect();
    assert_eq!(lines.len(), 3 + 7);
    assert_eq!(lines[0]["survey"], "ztf");
    assert_eq!(lines[0]["science"]["width"], 63);
    assert_eq!(lines[3]["survey"], "rubin");
    assert_eq!(lines[3]["science"]["has_variance"], true);
    assert!(lines[3]["survey_snr"].is_number());
    let err = String::from_utf8(err).expect("utf8");
    assert!(err.contains("exist.avro") && err.contains("fakeAlert_v11_1.avro"), "{err}");
    let (mut out, mut err) = (Vec::new(), Vec::new());
    assert_eq!(inspect::run(&d, &[td(ZTF_33)], &mut out, &mut err), 0);
    assert!(err.is_empty());
}

// ---------------------------------------------------------------- property tests

fn arb_image(w: usize, h: usize) -> impl Strategy<Value = Image> {
    prop::collection::vec(-1e6f32..1e6f32, w * h).prop_map(move |d| Image::new(w, h, d))
}

fn arb_stamp(w: usize, h: usize) -> impl Strategy<Value = blink::alert::Stamp> {
    (arb_image(w, h), prop::collection::vec(prop::bool::weighted(0.1), w * h), prop::option::of(arb_image(w, h)), prop::option::of(arb_image(5, 5)))
        .prop_map(|(mut image, mut mask, variance, psf)| {
            mask[0] = false;
            for (p, m) in image.data.iter_mut().zip(&mask) {
                if *m {
                    *p = 0.0;
                }
            }
            blink::alert::Stamp { image, mask, variance, psf }
        })
}

fn arb_alert() -> impl Strategy<Value = Alert> {
    (1usize..12, 1usize..12).prop_flat_map(|(w, h)| {
        (
            ("[a-z0-9]{1,12}", "[A-Za-z0-9]{0,12}", -360.0..360.0f64, -90.0..90.0f64, 50000.0..70000.0f64, "[ugrizy]"),
            (prop::option::of(0.1..1000.0f64), prop::option::of(20.0..35.0f64), prop::option::of(0.5..5.0f64), prop::option::of(0.5..10.0f64), prop::option::of(0.5..10.0f64), prop::option::of(-100.0..1e4f64)),
            (any::<bool>(), 0.0..12.0f64, 0.0..12.0f64),
            (arb_stamp(w, h), arb_stamp(w, h), prop::option::of(arb_stamp(w, h))),
        )
            .prop_map(|((id, obj, ra, dec, mjd, band), (exp, zp, gain, fwhm, tfwhm, snr), (pos, x, y), (s, t, d))| Alert {
                survey: Survey::Native,
                alert_id: id,
                object_id: obj,
                ra,
                dec,
                mjd_tai: mjd,
                band,
                exposure_s: exp,
                candidate: blink::alert::Candidate { stamp_x: x, stamp_y: y, fwhm_px: fwhm, template_fwhm_px: tfwhm, survey_snr: snr, positive: pos, zero_point: zp, gain },
                triplet: blink::alert::Triplet { science: s, template: t, difference: d },
            })
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn native_roundtrip(alerts in prop::collection::vec(arb_alert(), 1..4)) {
        let bytes = decode::encode_native(&alerts).expect("encode");
        let back: Vec<Alert> = decoder().decode_message(&bytes).into_iter().map(|r| r.expect("decode")).collect();
        prop_assert_eq!(back, alerts);
    }

    #[test]
    fn arbitrary_bytes_never_panic(prefix in prop::sample::select(vec![&b""[..], &b"Obj\x01"[..], &[0u8, 0, 0, 3, 0xe9][..], &[0x1f, 0x8b][..]]),
                                   body in prop::collection::vec(any::<u8>(), 0..2048)) {
        let mut m = prefix.to_vec();
        m.extend_from_slice(&body);
        let _ = decoder().decode_message(&m);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn mutated_real_messages_never_panic(which in 0usize..3, edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8), cut in any::<prop::sample::Index>(), truncate in any::<bool>()) {
        thread_local! {
            static MSGS: Vec<Vec<u8>> = {
                let d = decoder();
                let rubin = fink_to_confluent(&d, &read(RUBIN)).expect("convert").remove(0);
                let native = decode::encode_native(&[ok_alerts(&d, RUBIN).remove(0)].map(|mut a| { a.survey = Survey::Native; a })).expect("native");
                vec![read(ZTF_33), rubin, native]
            };
        }
        let mut m = MSGS.with(|m| m[which].clone());
        for (i, b) in edits {
            let i = i.index(m.len());
            m[i] = b;
        }
        if truncate {
            m.truncate(cut.index(m.len()));
        }
        let _ = decoder().decode_message(&m);
    }
}

//! Byte layouts of the history tables: the epoch record (versioned, little-endian), object
//! entries, the counters, and the order-preserving keys of the index tables.
//!
//! Epoch record, version 1:
//! ```text
//! u8 version (= 1)   u8 survey (1 ztf, 2 rubin, 3 native)
//! u16 len + object key   u16 len + alert id   u16 len + object id   u8 len + band   (UTF-8)
//! f64 mjd, ra, dec, stamp_x, stamp_y      f32 flux, flux_err, score
//! 4 planes: difference, variance, template_variance, psf; each u16 width, u16 height, w*h f32
//! ```
//! Readers reject any other version, short input and trailing bytes; nothing is indexed or
//! allocated from a length before the bytes are known to be there.

use crate::alert::{Image, Survey};

use super::{Epoch, EpochStamps, Measurement};

/// Version byte leading every epoch record this build writes (and the only one it reads).
pub const RECORD_VERSION: u8 = 1;
/// Largest stamp side (pixels) the store accepts.
pub const MAX_STAMP_SIDE: usize = 1024;
/// Largest PSF side (pixels) the store accepts.
pub const MAX_PSF_SIDE: usize = 255;
const MAX_ID_BYTES: usize = 256;
const MAX_BAND_BYTES: usize = 16;
const OBJECT_VERSION: u8 = 1;
const COUNTERS_VERSION: u8 = 1;

pub(crate) fn survey_code(s: Survey) -> u8 {
    match s {
        Survey::Ztf => 1,
        Survey::Rubin => 2,
        Survey::Native => 3,
    }
}

fn survey_from(code: u8) -> Result<Survey, String> {
    match code {
        1 => Ok(Survey::Ztf),
        2 => Ok(Survey::Rubin),
        3 => Ok(Survey::Native),
        c => Err(format!("unknown survey code {c}")),
    }
}

/// Why an epoch cannot be stored, or `Ok`.
pub(crate) fn validate(e: &Epoch) -> Result<(), String> {
    let text = |what: &str, s: &str, min: usize, max: usize| {
        if s.len() < min || s.len() > max || s.contains('\0') {
            Err(format!("{what} {s:?}: wants {min}..={max} bytes and no NUL"))
        } else {
            Ok(())
        }
    };
    text("alert id", &e.alert_id, 1, MAX_ID_BYTES)?;
    text("object id", &e.object_id, 0, MAX_ID_BYTES)?;
    text("band", &e.band, 1, MAX_BAND_BYTES)?;
    for (what, v) in [("mjd", e.mjd), ("ra", e.ra), ("dec", e.dec), ("stamp_x", e.stamp_x), ("stamp_y", e.stamp_y)] {
        if !v.is_finite() {
            return Err(format!("{what} is {v}"));
        }
    }
    if !(-90.0..=90.0).contains(&e.dec) {
        return Err(format!("dec {} outside [-90, 90]", e.dec));
    }
    let s = &e.stamps;
    let shape_ok = |im: &Image, max: usize| {
        (1..=max).contains(&im.width) && (1..=max).contains(&im.height) && im.data.len() == im.width * im.height
    };
    if !shape_ok(&s.difference, MAX_STAMP_SIDE) {
        return Err(format!(
            "difference {}x{} with {} pixels (sides 1..={MAX_STAMP_SIDE})",
            s.difference.width,
            s.difference.height,
            s.difference.data.len()
        ));
    }
    for (what, im) in [("variance", &s.variance), ("template_variance", &s.template_variance)] {
        if im.shape() != s.difference.shape() || im.data.len() != im.width * im.height {
            return Err(format!(
                "{what} {}x{} with {} pixels, difference is {}x{}",
                im.width,
                im.height,
                im.data.len(),
                s.difference.width,
                s.difference.height
            ));
        }
    }
    if !shape_ok(&s.psf, MAX_PSF_SIDE) || s.psf.width.is_multiple_of(2) || s.psf.height.is_multiple_of(2) {
        return Err(format!(
            "psf {}x{} with {} pixels (odd sides 1..={MAX_PSF_SIDE})",
            s.psf.width,
            s.psf.height,
            s.psf.data.len()
        ));
    }
    Ok(())
}

/// Exact size of [`encode_epoch`]'s output.
pub(crate) fn encoded_len(object_key: &str, e: &Epoch) -> usize {
    let s = &e.stamps;
    let planes: usize =
        [&s.difference, &s.variance, &s.template_variance, &s.psf].iter().map(|p| 4 + 4 * p.data.len()).sum();
    2 + (2 + object_key.len())
        + (2 + e.alert_id.len())
        + (2 + e.object_id.len())
        + (1 + e.band.len())
        + 5 * 8
        + 3 * 4
        + planes
}

/// The stored record of an epoch under an object key. `e` must have passed [`validate`].
pub(crate) fn encode_epoch(object_key: &str, e: &Epoch) -> Vec<u8> {
    let mut b = Vec::with_capacity(encoded_len(object_key, e));
    b.push(RECORD_VERSION);
    b.push(survey_code(e.survey));
    put_str16(&mut b, object_key);
    put_str16(&mut b, &e.alert_id);
    put_str16(&mut b, &e.object_id);
    b.push(e.band.len() as u8);
    b.extend_from_slice(e.band.as_bytes());
    for v in [e.mjd, e.ra, e.dec, e.stamp_x, e.stamp_y] {
        b.extend_from_slice(&v.to_le_bytes());
    }
    let m = &e.measurement;
    for v in [m.flux, m.flux_err, m.score] {
        b.extend_from_slice(&v.to_le_bytes());
    }
    let s = &e.stamps;
    for p in [&s.difference, &s.variance, &s.template_variance, &s.psf] {
        b.extend_from_slice(&(p.width as u16).to_le_bytes());
        b.extend_from_slice(&(p.height as u16).to_le_bytes());
        for v in &p.data {
            b.extend_from_slice(&v.to_le_bytes());
        }
    }
    b
}

/// The object key and epoch of a stored record.
pub(crate) fn decode_epoch(bytes: &[u8]) -> Result<(String, Epoch), String> {
    let mut r = Reader::new(bytes);
    let version = r.u8()?;
    if version != RECORD_VERSION {
        return Err(format!("record version {version}, this blink reads version {RECORD_VERSION}"));
    }
    let survey = survey_from(r.u8()?)?;
    let object_key = r.str16()?;
    let alert_id = r.str16()?;
    let object_id = r.str16()?;
    let band_len = usize::from(r.u8()?);
    let band = r.string(band_len)?;
    let (mjd, ra, dec, stamp_x, stamp_y) = (r.f64()?, r.f64()?, r.f64()?, r.f64()?, r.f64()?);
    let measurement = Measurement { flux: r.f32()?, flux_err: r.f32()?, score: r.f32()? };
    let stamps =
        EpochStamps { difference: r.plane()?, variance: r.plane()?, template_variance: r.plane()?, psf: r.plane()? };
    r.end()?;
    let e = Epoch { survey, alert_id, object_id, band, mjd, ra, dec, stamp_x, stamp_y, stamps, measurement };
    validate(&e).map_err(|why| format!("decoded epoch is invalid: {why}"))?;
    Ok((object_key, e))
}

/// An object's entry: survey, survey object id, reference position, epoch count.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ObjectMeta {
    pub survey: Survey,
    pub object_id: String,
    pub ra: f64,
    pub dec: f64,
    pub n_epochs: u64,
}

impl ObjectMeta {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![OBJECT_VERSION, survey_code(self.survey)];
        for v in [self.ra, self.dec] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        b.extend_from_slice(&self.n_epochs.to_le_bytes());
        put_str16(&mut b, &self.object_id);
        b
    }

    pub fn decode(bytes: &[u8]) -> Result<ObjectMeta, String> {
        let mut r = Reader::new(bytes);
        let version = r.u8()?;
        if version != OBJECT_VERSION {
            return Err(format!("object entry version {version}, this blink reads version {OBJECT_VERSION}"));
        }
        let survey = survey_from(r.u8()?)?;
        let (ra, dec, n_epochs) = (r.f64()?, r.f64()?, r.u64()?);
        let object_id = r.str16()?;
        r.end()?;
        Ok(ObjectMeta { survey, object_id, ra, dec, n_epochs })
    }
}

/// The store's counters ([`HistoryStats`]), kept in the meta table and committed with the epochs.
pub(crate) type Counters = super::HistoryStats;

impl Counters {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![COUNTERS_VERSION];
        for v in [
            self.objects,
            self.epochs,
            self.bytes,
            self.evicted_by_age,
            self.evicted_by_size,
            self.expired_on_arrival,
            self.duplicates,
        ] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        b.push(u8::from(self.newest_mjd.is_some()));
        b.extend_from_slice(&self.newest_mjd.unwrap_or(0.0).to_le_bytes());
        b
    }

    pub fn decode(bytes: &[u8]) -> Result<Counters, String> {
        let mut r = Reader::new(bytes);
        let version = r.u8()?;
        if version != COUNTERS_VERSION {
            return Err(format!("counters version {version}, this blink reads version {COUNTERS_VERSION}"));
        }
        let mut c = Counters {
            objects: r.u64()?,
            epochs: r.u64()?,
            bytes: r.u64()?,
            evicted_by_age: r.u64()?,
            evicted_by_size: r.u64()?,
            expired_on_arrival: r.u64()?,
            duplicates: r.u64()?,
            newest_mjd: None,
        };
        let has_newest = r.u8()? != 0;
        let newest = r.f64()?;
        r.end()?;
        c.newest_mjd = has_newest.then_some(newest);
        Ok(c)
    }
}

// ---- keys -------------------------------------------------------------------------------------

/// Epochs table key, the deduplication key: survey code, then the alert id.
pub(crate) fn alert_key(survey: Survey, alert_id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + alert_id.len());
    k.push(survey_code(survey));
    k.extend_from_slice(alert_id.as_bytes());
    k
}

/// An alert key as `<survey>:<alert id>`, for messages.
pub(crate) fn describe_alert_key(k: &[u8]) -> String {
    match k.split_first() {
        Some((code, id)) => {
            let survey = survey_from(*code).map(|s| s.as_str()).unwrap_or("?");
            format!("{survey}:{}", String::from_utf8_lossy(id))
        }
        None => "(empty alert key)".into(),
    }
}

/// An f64 as a u64 whose unsigned order is the float's order (finite values).
fn ordered_bits(v: f64) -> u64 {
    let b = v.to_bits();
    if b >> 63 == 1 {
        !b
    } else {
        b | (1 << 63)
    }
}

fn from_ordered_bits(b: u64) -> f64 {
    f64::from_bits(if b >> 63 == 1 { b & !(1 << 63) } else { !b })
}

/// Age table key: MJD (ordered, big-endian) then the alert key, so the first key is the oldest.
pub(crate) fn time_key(mjd: f64, alert_key: &[u8]) -> Vec<u8> {
    let mut k = ordered_bits(mjd).to_be_bytes().to_vec();
    k.extend_from_slice(alert_key);
    k
}

/// MJD and alert key of an age table key.
pub(crate) fn split_time_key(k: &[u8]) -> Option<(f64, &[u8])> {
    let (head, rest) = k.split_at_checked(8)?;
    Some((from_ordered_bits(u64::from_be_bytes(head.try_into().ok()?)), rest))
}

/// Per-object index key: object key, NUL, band, NUL, MJD (ordered), alert key. A range over
/// [`object_range`] lists an object's epochs by band, then MJD.
pub(crate) fn object_epoch_key(object_key: &str, band: &str, mjd: f64, alert_key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(object_key.len() + band.len() + 10 + alert_key.len());
    k.extend_from_slice(object_key.as_bytes());
    k.push(0);
    k.extend_from_slice(band.as_bytes());
    k.push(0);
    k.extend_from_slice(&ordered_bits(mjd).to_be_bytes());
    k.extend_from_slice(alert_key);
    k
}

/// The alert key at the end of a per-object index key.
pub(crate) fn alert_key_of_object_epoch(k: &[u8]) -> Option<&[u8]> {
    let first = k.iter().position(|b| *b == 0)?;
    let second = first + 1 + k.get(first + 1..)?.iter().position(|b| *b == 0)?;
    k.get(second + 1 + 8..)
}

/// `[lo, hi)` covering every per-object index key of one object (keys hold no NUL).
pub(crate) fn object_range(object_key: &str) -> (Vec<u8>, Vec<u8>) {
    let mut lo = object_key.as_bytes().to_vec();
    let mut hi = lo.clone();
    lo.push(0);
    hi.push(1);
    (lo, hi)
}

/// Sky index key: survey code in the top byte over the depth-`INDEX_DEPTH` cell, big-endian,
/// then the object key.
pub(crate) fn sky_key(survey: Survey, cell: u64, object_key: &str) -> Vec<u8> {
    let mut k = sky_prefix(survey, cell).to_vec();
    k.extend_from_slice(object_key.as_bytes());
    k
}

pub(crate) fn sky_prefix(survey: Survey, cell: u64) -> [u8; 8] {
    ((u64::from(survey_code(survey)) << 56) | cell).to_be_bytes()
}

/// The object key of a sky index key.
pub(crate) fn object_key_of_sky(k: &[u8]) -> Option<&str> {
    std::str::from_utf8(k.get(8..)?).ok()
}

fn put_str16(b: &mut Vec<u8>, s: &str) {
    b.extend_from_slice(&(s.len() as u16).to_le_bytes());
    b.extend_from_slice(s.as_bytes());
}

/// Bounds-checked little-endian reads.
struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(b: &'a [u8]) -> Reader<'a> {
        Reader { b, pos: 0 }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let out = self
            .pos
            .checked_add(n)
            .and_then(|end| self.b.get(self.pos..end))
            .ok_or_else(|| format!("truncated: {n} bytes wanted at byte {} of {}", self.pos, self.b.len()))?;
        self.pos += n;
        Ok(out)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], String> {
        let s = self.take(N)?;
        s.try_into().map_err(|_| "short read".to_string())
    }

    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.array::<1>()?[0])
    }
    fn u16(&mut self) -> Result<u16, String> {
        Ok(u16::from_le_bytes(self.array()?))
    }
    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.array()?))
    }
    fn f32(&mut self) -> Result<f32, String> {
        Ok(f32::from_le_bytes(self.array()?))
    }
    fn f64(&mut self) -> Result<f64, String> {
        Ok(f64::from_le_bytes(self.array()?))
    }

    fn string(&mut self, n: usize) -> Result<String, String> {
        let at = self.pos;
        std::str::from_utf8(self.take(n)?).map(str::to_owned).map_err(|e| format!("text at byte {at}: {e}"))
    }

    fn str16(&mut self) -> Result<String, String> {
        let n = usize::from(self.u16()?);
        self.string(n)
    }

    fn plane(&mut self) -> Result<Image, String> {
        let (w, h) = (usize::from(self.u16()?), usize::from(self.u16()?));
        let n = w.checked_mul(h).and_then(|n| n.checked_mul(4)).ok_or("plane size overflows")?;
        let bytes = self.take(n)?;
        let data = bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        Ok(Image { width: w, height: h, data })
    }

    fn end(&self) -> Result<(), String> {
        if self.pos == self.b.len() {
            Ok(())
        } else {
            Err(format!("{} trailing bytes after byte {}", self.b.len() - self.pos, self.pos))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::test_support::random_epoch;
    use rand::Rng;

    #[test]
    fn epoch_round_trips_bit_for_bit() {
        let mut rng = crate::testing::rng();
        for _ in 0..50 {
            let e = random_epoch(&mut rng);
            let b = encode_epoch("ztf:id:x", &e);
            assert_eq!(b.len(), encoded_len("ztf:id:x", &e));
            let (k, back) = decode_epoch(&b).expect("decodes");
            assert_eq!((k.as_str(), &back), ("ztf:id:x", &e));
        }
    }

    #[test]
    fn unknown_version_short_and_trailing_bytes_are_rejected() {
        let mut rng = crate::testing::rng();
        let e = random_epoch(&mut rng);
        let mut b = encode_epoch("k", &e);
        let cut = rng.gen_range(0..b.len());
        assert!(decode_epoch(&b[..cut]).unwrap_err().contains("truncated"));
        b.push(7);
        assert!(decode_epoch(&b).unwrap_err().contains("trailing"));
        b.pop();
        b[0] = 2;
        let err = decode_epoch(&b).unwrap_err();
        assert!(err.contains("record version 2") && err.contains("reads version 1"), "{err}");
    }

    #[test]
    fn validate_rejects_bad_shapes_and_positions() {
        let mut rng = crate::testing::rng();
        let good = random_epoch(&mut rng);
        assert_eq!(validate(&good), Ok(()));
        let mut e = good.clone();
        e.stamps.psf = Image::zeros(4, 5);
        assert!(validate(&e).unwrap_err().contains("psf"));
        let mut e = good.clone();
        e.stamps.template_variance = Image::zeros(good.stamps.difference.width + 1, 1);
        assert!(validate(&e).unwrap_err().contains("template_variance"));
        let mut e = good.clone();
        e.dec = 91.0;
        assert!(validate(&e).is_err());
        let mut e = good.clone();
        e.mjd = f64::NAN;
        assert!(validate(&e).is_err());
        let mut e = good;
        e.alert_id = "a\0b".into();
        assert!(validate(&e).is_err());
    }

    #[test]
    fn key_orders_follow_mjd() {
        let mut rng = crate::testing::rng();
        let mut v: Vec<f64> = (0..200).map(|_| rng.gen_range(-1e5..1e5)).collect();
        let mut keys: Vec<Vec<u8>> = v.iter().map(|m| time_key(*m, b"x")).collect();
        keys.sort();
        v.sort_by(f64::total_cmp);
        let back: Vec<f64> = keys.iter().map(|k| split_time_key(k).unwrap().0).collect();
        assert_eq!(back, v);
        let k = object_epoch_key("ztf:id:a", "g", 60000.5, b"\x01123");
        assert_eq!(alert_key_of_object_epoch(&k), Some(&b"\x01123"[..]));
    }

    #[test]
    fn counters_and_objects_round_trip() {
        let c = Counters {
            objects: 3,
            epochs: 9,
            bytes: 12345,
            evicted_by_age: 1,
            evicted_by_size: 2,
            expired_on_arrival: 4,
            duplicates: 5,
            newest_mjd: Some(60001.25),
        };
        assert_eq!(Counters::decode(&c.encode()), Ok(c));
        let m = ObjectMeta { survey: Survey::Rubin, object_id: "123".into(), ra: 10.5, dec: -3.25, n_epochs: 7 };
        assert_eq!(ObjectMeta::decode(&m.encode()), Ok(m));
    }
}

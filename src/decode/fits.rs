//! A small in-memory FITS reader and writer for 2-D image HDUs (alert stamps).
//!
//! Why hand-written rather than cfitsio (which blink links through `fitsio` for files on disk):
//! stamps arrive as bytes inside Avro packets, and cfitsio through `fitsio` wants a file path or
//! the unsafe memory-file FFI; we need hard size limits checked *before* any allocation (NAXISn
//! from the header against [`Limits`]) and a specific error for each malformed header; and a
//! reader for 2-D image HDUs is about 200 lines. The integration tests cross-check it against
//! cfitsio on the fixture cutouts, pixel for pixel.

use crate::alert::Image;

use super::{DecodeError, Limits};

const BLOCK: usize = 2880;
const CARD: usize = 80;

/// A header card's value.
#[derive(Debug, Clone, PartialEq)]
pub enum CardValue {
    Str(String),
    Bool(bool),
    Int(i64),
    Float(f64),
    /// Anything else (complex numbers, malformed values): kept as text.
    Other(String),
}

/// An HDU's header: cards in order (COMMENT, HISTORY and blank cards dropped).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Header {
    pub cards: Vec<(String, CardValue)>,
}

impl Header {
    pub fn get(&self, key: &str) -> Option<&CardValue> {
        self.cards.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }
    pub fn get_f64(&self, key: &str) -> Option<f64> {
        match self.get(key)? {
            CardValue::Int(i) => Some(*i as f64),
            CardValue::Float(f) => Some(*f),
            _ => None,
        }
    }
    pub fn get_i64(&self, key: &str) -> Option<i64> {
        match self.get(key)? {
            CardValue::Int(i) => Some(*i),
            CardValue::Float(f) if f.fract() == 0.0 && f.abs() < 9e15 => Some(*f as i64),
            _ => None,
        }
    }
    pub fn get_str(&self, key: &str) -> Option<&str> {
        match self.get(key)? {
            CardValue::Str(s) => Some(s),
            _ => None,
        }
    }
}

/// One image HDU: its name (EXTNAME, or "PRIMARY"), pixels as f32 (NaN kept), header.
#[derive(Debug, Clone, PartialEq)]
pub struct FitsImage {
    pub name: String,
    pub image: Image,
    pub header: Header,
}

fn parse_value(raw: &str) -> CardValue {
    let s = raw.trim_start();
    if let Some(rest) = s.strip_prefix('\'') {
        // Quoted string: '' is an escaped quote; the string ends at the first lone quote.
        let mut out = String::new();
        let mut chars = rest.chars().peekable();
        while let Some(c) = chars.next() {
            if c == '\'' {
                if chars.peek() == Some(&'\'') {
                    chars.next();
                    out.push('\'');
                } else {
                    break;
                }
            } else {
                out.push(c);
            }
        }
        return CardValue::Str(out.trim_end().to_string());
    }
    let v = s.split('/').next().unwrap_or("").trim();
    match v {
        "T" => return CardValue::Bool(true),
        "F" => return CardValue::Bool(false),
        _ => {}
    }
    if let Ok(i) = v.parse::<i64>() {
        return CardValue::Int(i);
    }
    if let Ok(f) = v.replace(['D', 'd'], "E").parse::<f64>() {
        return CardValue::Float(f);
    }
    CardValue::Other(v.to_string())
}

/// Read one header starting at `pos`; returns the header and the offset of the data.
fn read_header(bytes: &[u8], pos: usize) -> Result<(Header, usize), DecodeError> {
    let mut hdr = Header::default();
    let mut p = pos;
    loop {
        let block = bytes
            .get(p..p.checked_add(BLOCK).ok_or_else(|| DecodeError::Fits("offset overflow".into()))?)
            .ok_or_else(|| DecodeError::Fits(format!("header at byte {pos} truncated: {} bytes, needs a 2880-byte block at {p}", bytes.len())))?;
        p += BLOCK;
        for card in block.chunks_exact(CARD) {
            let key = std::str::from_utf8(card.get(..8).unwrap_or(&[]))
                .map_err(|_| DecodeError::Fits(format!("non-ASCII keyword in header at byte {pos}")))?
                .trim_end()
                .to_string();
            if key == "END" {
                return Ok((hdr, p));
            }
            if key.is_empty() || key == "COMMENT" || key == "HISTORY" {
                continue;
            }
            if card.get(8..10) == Some(b"= ") {
                let raw = String::from_utf8_lossy(card.get(10..).unwrap_or(&[]));
                hdr.cards.push((key, parse_value(&raw)));
            }
        }
    }
}

fn int_key(h: &Header, key: &str, hdu: &str) -> Result<i64, DecodeError> {
    h.get_i64(key).ok_or_else(|| match h.get(key) {
        None => DecodeError::Fits(format!("HDU {hdu}: missing {key}")),
        Some(v) => DecodeError::Fits(format!("HDU {hdu}: {key} = {v:?} is not an integer")),
    })
}

/// Every image HDU of a FITS file held in memory. Tables and empty HDUs are skipped; an image HDU
/// with NAXIS other than 2, an unsupported BITPIX, a side over `limits.max_stamp_pixels` or data
/// past the end of the bytes is an error (checked before anything is allocated).
pub fn read_hdus(bytes: &[u8], limits: &Limits) -> Result<Vec<FitsImage>, DecodeError> {
    if !bytes.starts_with(b"SIMPLE  =") {
        let head = String::from_utf8_lossy(bytes.get(..bytes.len().min(16)).unwrap_or(&[])).into_owned();
        return Err(DecodeError::Fits(format!("not a FITS file: starts with {head:?}")));
    }
    let mut out = Vec::new();
    let mut pos = 0usize;
    let mut index = 0usize;
    while pos < bytes.len() {
        // Trailing zero padding or junk after the last HDU is tolerated (as cfitsio does).
        if index > 0 && !bytes.get(pos..).is_some_and(|b| b.starts_with(b"XTENSION=")) {
            break;
        }
        let (hdr, data_start) = read_header(bytes, pos)?;
        let primary = index == 0;
        let name = match hdr.get_str("EXTNAME") {
            Some(n) => n.to_string(),
            None if primary => "PRIMARY".to_string(),
            None => format!("HDU{index}"),
        };
        let xtension = if primary { "IMAGE".to_string() } else { hdr.get_str("XTENSION").unwrap_or("").trim().to_string() };
        let bitpix = int_key(&hdr, "BITPIX", &name)?;
        let naxis = int_key(&hdr, "NAXIS", &name)?;
        if !(0..=999).contains(&naxis) {
            return Err(DecodeError::Fits(format!("HDU {name}: NAXIS = {naxis}")));
        }
        let mut dims = Vec::new();
        for i in 1..=naxis {
            let n = int_key(&hdr, &format!("NAXIS{i}"), &name)?;
            if n < 0 {
                return Err(DecodeError::Fits(format!("HDU {name}: NAXIS{i} = {n}")));
            }
            dims.push(n as u64);
        }
        let pcount = if primary { 0 } else { hdr.get_i64("PCOUNT").unwrap_or(0).max(0) as u64 };
        let gcount = if primary { 1 } else { hdr.get_i64("GCOUNT").unwrap_or(1).max(0) as u64 };
        let elem = (bitpix.unsigned_abs()) / 8;
        let is_image = xtension == "IMAGE";
        if is_image && naxis > 0 {
            if naxis != 2 {
                return Err(DecodeError::Fits(format!("HDU {name}: NAXIS = {naxis}, only 2-D images are supported")));
            }
            if ![8, 16, 32, -32, -64].contains(&bitpix) {
                return Err(DecodeError::Fits(format!("HDU {name}: BITPIX = {bitpix} is not supported (8, 16, 32, -32, -64)")));
            }
            let max = limits.max_stamp_pixels as u64;
            for (i, d) in dims.iter().enumerate() {
                if *d > max {
                    return Err(DecodeError::Fits(format!("HDU {name}: NAXIS{} = {d} is over the limit of {max} pixels", i + 1)));
                }
            }
        }
        // Data size: |BITPIX|/8 * GCOUNT * (PCOUNT + prod NAXISn), checked.
        let prod = if naxis == 0 { 0 } else { dims.iter().try_fold(1u64, |a, d| a.checked_mul(*d)) .ok_or_else(|| DecodeError::Fits(format!("HDU {name}: data size overflows")))? };
        let size = elem
            .checked_mul(gcount)
            .and_then(|x| x.checked_mul(pcount.checked_add(prod)?))
            .ok_or_else(|| DecodeError::Fits(format!("HDU {name}: data size overflows")))?;
        let data_end = (data_start as u64).checked_add(size).ok_or_else(|| DecodeError::Fits(format!("HDU {name}: data size overflows")))?;
        if data_end > bytes.len() as u64 {
            return Err(DecodeError::Fits(format!(
                "HDU {name}: data needs {size} bytes at offset {data_start}, file has {}",
                bytes.len()
            )));
        }
        let data_end = data_end as usize;
        if is_image && naxis == 2 {
            let (w, h) = (dims.first().copied().unwrap_or(0) as usize, dims.get(1).copied().unwrap_or(0) as usize);
            if w == 0 || h == 0 {
                return Err(DecodeError::Fits(format!("HDU {name}: empty image {w}x{h}")));
            }
            let raw = bytes.get(data_start..data_start + w * h * elem as usize).ok_or_else(|| DecodeError::Fits(format!("HDU {name}: data truncated")))?;
            let data = convert(raw, bitpix, &hdr);
            out.push(FitsImage { name, image: Image { width: w, height: h, data }, header: hdr });
        }
        let padded = data_end.div_ceil(BLOCK).saturating_mul(BLOCK);
        pos = padded.max(data_start);
        if size == 0 {
            pos = data_start;
        }
        index += 1;
    }
    Ok(out)
}

/// A chunk from `chunks_exact(N)` as an array (always N long; zeros otherwise, never a panic).
fn arr<const N: usize>(c: &[u8]) -> [u8; N] {
    c.try_into().unwrap_or([0; N])
}

/// Big-endian samples → f32, with BSCALE/BZERO, and BLANK (integer images) → NaN.
fn convert(raw: &[u8], bitpix: i64, hdr: &Header) -> Vec<f32> {
    let bscale = hdr.get_f64("BSCALE").unwrap_or(1.0);
    let bzero = hdr.get_f64("BZERO").unwrap_or(0.0);
    let blank = hdr.get_i64("BLANK");
    let scaled = bscale != 1.0 || bzero != 0.0;
    let int = |x: i64| -> f32 {
        if Some(x) == blank {
            f32::NAN
        } else {
            (x as f64 * bscale + bzero) as f32
        }
    };
    let float = |x: f64| -> f32 { if scaled { (x * bscale + bzero) as f32 } else { x as f32 } };
    match bitpix {
        8 => raw.iter().map(|b| int(i64::from(*b))).collect(),
        16 => raw.chunks_exact(2).map(|c| int(i64::from(i16::from_be_bytes(arr(c))))).collect(),
        32 => raw.chunks_exact(4).map(|c| int(i64::from(i32::from_be_bytes(arr(c))))).collect(),
        -32 => raw
            .chunks_exact(4)
            .map(|c| {
                let x = f32::from_be_bytes(arr(c));
                if scaled { float(f64::from(x)) } else { x }
            })
            .collect(),
        -64 => raw
            .chunks_exact(8)
            .map(|c| float(f64::from_be_bytes(arr(c))))
            .collect(),
        _ => Vec::new(),
    }
}

fn card(out: &mut Vec<u8>, key: &str, value: &str) {
    let mut c = format!("{key:<8}= {value:>20}");
    c.truncate(CARD);
    out.extend_from_slice(format!("{c:<80}").as_bytes());
}

fn pad(out: &mut Vec<u8>, fill: u8) {
    let rem = out.len() % BLOCK;
    if rem != 0 {
        out.resize(out.len() + BLOCK - rem, fill);
    }
}

/// Plain FITS, BITPIX -32: the first image in the primary HDU, the rest as IMAGE extensions; each
/// named by EXTNAME (except a first one named "PRIMARY").
pub fn write_hdus(hdus: &[(&str, &Image)]) -> Vec<u8> {
    let mut out = Vec::new();
    if hdus.is_empty() {
        card(&mut out, "SIMPLE", "T");
        card(&mut out, "BITPIX", "8");
        card(&mut out, "NAXIS", "0");
        out.extend_from_slice(format!("{:<80}", "END").as_bytes());
        pad(&mut out, b' ');
        return out;
    }
    for (i, (name, img)) in hdus.iter().enumerate() {
        if i == 0 {
            card(&mut out, "SIMPLE", "T");
        } else {
            card(&mut out, "XTENSION", "'IMAGE   '");
        }
        card(&mut out, "BITPIX", "-32");
        card(&mut out, "NAXIS", "2");
        card(&mut out, "NAXIS1", &img.width.to_string());
        card(&mut out, "NAXIS2", &img.height.to_string());
        if i == 0 {
            card(&mut out, "EXTEND", "T");
        } else {
            card(&mut out, "PCOUNT", "0");
            card(&mut out, "GCOUNT", "1");
        }
        if !(i == 0 && *name == "PRIMARY") {
            let clean: String = name.chars().filter(|c| c.is_ascii_graphic() && *c != '\'').take(60).collect();
            card(&mut out, "EXTNAME", &format!("'{clean:<8}'"));
        }
        out.extend_from_slice(format!("{:<80}", "END").as_bytes());
        pad(&mut out, b' ');
        for p in &img.data {
            out.extend_from_slice(&p.to_be_bytes());
        }
        pad(&mut out, 0);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_names() {
        let a = Image::new(3, 2, vec![1.0, 2.0, f32::NAN, 4.0, 5.0, -6.5]);
        let b = Image::new(5, 5, (0..25).map(|i| i as f32).collect());
        let bytes = write_hdus(&[("IMAGE", &a), ("PSF", &b)]);
        assert_eq!(bytes.len() % BLOCK, 0);
        let hdus = read_hdus(&bytes, &Limits::default()).unwrap_or_default();
        assert_eq!(hdus.len(), 2);
        assert_eq!(hdus[0].name, "IMAGE");
        assert_eq!(hdus[1].name, "PSF");
        assert_eq!(hdus[0].image.shape(), (3, 2));
        assert!(hdus[0].image.data[2].is_nan());
        assert_eq!(hdus[0].image.data[5], -6.5);
        assert_eq!(hdus[1].image, b);
    }

    #[test]
    fn header_values() {
        assert_eq!(parse_value(" 'nJy     '           / unit"), CardValue::Str("nJy".into()));
        assert_eq!(parse_value("'it''s'"), CardValue::Str("it's".into()));
        assert_eq!(parse_value("                   T / x"), CardValue::Bool(true));
        assert_eq!(parse_value("   -32 / type"), CardValue::Int(-32));
        assert_eq!(parse_value(" 1.5D2"), CardValue::Float(150.0));
    }

    #[test]
    fn integer_bitpix_with_scaling() {
        // BITPIX 16, BZERO 32768 (unsigned 16-bit convention), BLANK.
        let mut out = Vec::new();
        card(&mut out, "SIMPLE", "T");
        card(&mut out, "BITPIX", "16");
        card(&mut out, "NAXIS", "2");
        card(&mut out, "NAXIS1", "2");
        card(&mut out, "NAXIS2", "1");
        card(&mut out, "BZERO", "32768");
        card(&mut out, "BLANK", "-1");
        out.extend_from_slice(format!("{:<80}", "END").as_bytes());
        pad(&mut out, b' ');
        out.extend_from_slice(&(-32768i16).to_be_bytes());
        out.extend_from_slice(&(-1i16).to_be_bytes());
        pad(&mut out, 0);
        let h = read_hdus(&out, &Limits::default()).unwrap_or_default();
        assert_eq!(h.len(), 1);
        assert_eq!(h[0].image.data[0], 0.0);
        assert!(h[0].image.data[1].is_nan());
    }

    #[test]
    fn short_input_never_panics() {
        let bytes = write_hdus(&[("IMAGE", &Image::zeros(4, 4))]);
        for n in 0..bytes.len() {
            let _ = read_hdus(&bytes[..n], &Limits::default());
        }
    }
}

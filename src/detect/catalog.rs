//! The detection catalogue `blink detect` writes (`docs/detections.md`): one row per detection,
//! CSV with a header line. This is the format other tools read; columns are found by name, so
//! readers tolerate added columns.

use std::io::Write;
use std::path::Path;

/// Bit flags on a detection. Written as names joined by `|` (empty when none).
pub mod flags {
    /// Within the matched filter's reach of the frame's edge.
    pub const EDGE: u32 = 1;
    /// A masked pixel (NaN, bad column, zero weight) within 2 PSF widths.
    pub const MASKED: u32 = 2;
    /// A saturated pixel in the science frame or the template within 2 PSF widths.
    pub const SATURATED: u32 = 4;
    /// The difference is negative (the source faded, or the template holds more flux).
    pub const NEGATIVE: u32 = 8;
    /// Narrower than the PSF: a cosmic ray or hot pixel rather than a point source.
    pub const SHARP: u32 = 16;
    /// A positive and a negative lobe side by side: a misregistered or mismatched star.
    pub const DIPOLE: u32 = 32;
    /// Elongated far beyond the PSF: a cosmic-ray track or a satellite trail.
    pub const STREAK: u32 = 64;
    /// Beside a bright star of the template and a small fraction of its flux: what the
    /// subtraction left of the star (`detect::sources`).
    pub const RESIDUAL: u32 = 128;
    /// On a stack: broader than the PSF, and a small part of the template's light around it:
    /// what the subtraction left of a galaxy, added up night after night (`detect::shape`).
    pub const BROAD: u32 = 256;

    /// Every flag with its name, in the order they are written.
    pub const NAMES: [(u32, &str); 9] = [
        (EDGE, "edge"),
        (MASKED, "masked"),
        (SATURATED, "saturated"),
        (NEGATIVE, "negative"),
        (SHARP, "sharp"),
        (DIPOLE, "dipole"),
        (STREAK, "streak"),
        (RESIDUAL, "residual"),
        (BROAD, "broad"),
    ];

    /// `edge|sharp`-style text for a set of flags.
    pub fn to_names(bits: u32) -> String {
        NAMES.iter().filter(|(b, _)| bits & b != 0).map(|(_, n)| *n).collect::<Vec<_>>().join("|")
    }

    /// Parse `edge|sharp`; unknown names are an error naming them.
    pub fn from_names(text: &str) -> Result<u32, String> {
        let mut bits = 0;
        for name in text.split('|').map(str::trim).filter(|s| !s.is_empty()) {
            let (b, _) = NAMES.iter().find(|(_, n)| *n == name).ok_or_else(|| format!("unknown flag {name:?}"))?;
            bits |= b;
        }
        Ok(bits)
    }
}

/// Flags that mark a detection as probably not astrophysical (artifact tests).
pub const ARTIFACT_FLAGS: u32 = flags::SHARP | flags::STREAK | flags::DIPOLE | flags::SATURATED | flags::MASKED | flags::RESIDUAL | flags::BROAD;

/// One detection: a local extremum of the score image above threshold.
#[derive(Debug, Clone, PartialEq)]
pub struct Detection {
    /// The frame's `file` as in the manifest (for stacks, later: `stack:<window>:<last frame>`).
    pub frame: String,
    /// Mid-exposure MJD of the frame.
    pub mjd: f64,
    pub band: String,
    /// 0-based pixel position on the template's grid (centre of the first pixel = 0, 0).
    pub x: f64,
    pub y: f64,
    /// Sky position from the template's WCS; `None` without a celestial WCS.
    pub ra: Option<f64>,
    pub dec: Option<f64>,
    /// Matched-filter signal to noise in sigma, signed (negative: the source faded).
    pub score: f64,
    /// PSF flux of the difference in ADU at the frame's zero point, and its 1-sigma error.
    pub flux: f64,
    pub flux_err: f64,
    /// `MAGZP − 2.5 log10(flux)` for positive flux with a zero point, else `None`.
    pub mag: Option<f64>,
    /// [`flags`] bits.
    pub flags: u32,
}

/// The header line of the catalogue.
pub const HEADER: &str = "frame,mjd,band,x,y,ra,dec,score,flux,flux_err,mag,flags";

fn opt(v: Option<f64>, prec: usize) -> String {
    v.map(|v| format!("{v:.prec$}")).unwrap_or_default()
}

impl Detection {
    /// One CSV row (no newline). The manifest reader refuses frame names and bands with commas,
    /// quotes or line breaks, so no quoting is needed.
    pub fn to_csv_row(&self) -> String {
        format!(
            "{},{:.6},{},{:.3},{:.3},{},{},{:.3},{:.3},{:.3},{},{}",
            self.frame,
            self.mjd,
            self.band,
            self.x,
            self.y,
            opt(self.ra, 7),
            opt(self.dec, 7),
            self.score,
            self.flux,
            self.flux_err,
            opt(self.mag, 4),
            flags::to_names(self.flags)
        )
    }
}

/// Write a catalogue to any writer.
pub fn write_csv<W: Write>(mut w: W, dets: &[Detection]) -> std::io::Result<()> {
    writeln!(w, "{HEADER}")?;
    for d in dets {
        writeln!(w, "{}", d.to_csv_row())?;
    }
    w.flush()
}

/// Parse a catalogue's text; `path` names it in errors, which give the line and column.
pub fn parse_csv(text: &str, path: &Path) -> Result<Vec<Detection>, String> {
    let required = ["frame", "mjd", "x", "y", "score", "flux", "flux_err"];
    crate::columns::parse(text, "catalogue", &required, |r| {
        Ok(Detection {
            frame: r.get("frame").to_string(),
            mjd: r.parse("mjd")?,
            band: r.get("band").to_string(),
            x: r.parse("x")?,
            y: r.parse("y")?,
            ra: r.opt("ra")?,
            dec: r.opt("dec")?,
            score: r.parse("score")?,
            flux: r.parse("flux")?,
            flux_err: r.parse("flux_err")?,
            mag: r.opt("mag")?,
            flags: flags::from_names(r.get("flags")).map_err(|e| r.err(e))?,
        })
    })
    .map_err(|e| format!("{}: line {}: {}", path.display(), e.line, e.message))
}

/// Read a catalogue from disk.
pub fn read_csv(path: &Path) -> Result<Vec<Detection>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    parse_csv(&text, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_errors() {
        let d = Detection {
            frame: "frames/F0001-r-0003.fits".into(),
            mjd: 61000.123456,
            band: "r".into(),
            x: 10.25,
            y: 2047.5,
            ra: Some(150.0001234),
            dec: None,
            score: -7.25,
            flux: -1234.5,
            flux_err: 170.25,
            mag: None,
            flags: flags::NEGATIVE | flags::EDGE,
        };
        let mut buf = Vec::new();
        write_csv(&mut buf, std::slice::from_ref(&d)).unwrap();
        let text = String::from_utf8(buf).unwrap();
        assert!(text.lines().nth(1).unwrap().ends_with(",edge|negative"), "{text}");
        let back = parse_csv(&text, Path::new("d.csv")).unwrap();
        assert_eq!(back, vec![d]);
        let e = parse_csv(&format!("{HEADER}\nf,1,r,x,2,,,5,1,1,,\n"), Path::new("d.csv")).unwrap_err();
        assert!(e.contains("line 2") && e.contains("column x"), "{e}");
        let e = parse_csv(&format!("{HEADER}\nf,1,r,1,2,,,5,1,1,,wobbly\n"), Path::new("d.csv")).unwrap_err();
        assert!(e.contains("wobbly"), "{e}");
    }
}

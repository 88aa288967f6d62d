//! Reading `truth.csv` (`docs/night-format.md`): one record per source or artifact per frame.
//! Columns are found by name in the header line, in any order; unknown columns are ignored, so a
//! simulator may add its own. A bad row is an error naming the file, line and column.

use std::path::Path;

use super::NightError;

/// One row of the truth table.
#[derive(Debug, Clone, PartialEq)]
pub struct TruthRecord {
    pub id: u64,
    pub kind: String,
    pub host: Option<u64>,
    pub frame: String,
    /// Mid-exposure MJD of the frame.
    pub mjd: f64,
    /// 0-based position on the template's grid.
    pub x: f64,
    pub y: f64,
    pub ra: f64,
    pub dec: f64,
    pub mag: Option<f64>,
    /// ADU at the frame's zero point.
    pub flux: f64,
    pub ref_flux: f64,
    pub snr: Option<f64>,
}

impl TruthRecord {
    /// Transients and variable stars (what a detector should find), not static sources or
    /// artifacts.
    pub fn is_variable(&self) -> bool {
        matches!(self.kind.as_str(), "fast" | "sn" | "slow" | "variable")
    }

    pub fn is_artifact(&self) -> bool {
        matches!(self.kind.as_str(), "cosmic" | "hot_pixel" | "bad_column")
    }
}

/// Parse the text of a truth table; `path` names it in errors.
pub fn parse(text: &str, path: &Path) -> Result<Vec<TruthRecord>, NightError> {
    let required = ["id", "kind", "frame", "mjd", "x", "y", "ra", "dec", "flux"];
    crate::columns::parse(text, "truth table", &required, |r| {
        Ok(TruthRecord {
            id: r.parse("id")?,
            kind: r.get("kind").to_string(),
            host: r.opt("host")?,
            frame: r.get("frame").to_string(),
            mjd: r.parse("mjd")?,
            x: r.parse("x")?,
            y: r.parse("y")?,
            ra: r.parse("ra")?,
            dec: r.parse("dec")?,
            mag: r.opt("mag")?,
            flux: r.parse("flux")?,
            ref_flux: r.opt("ref_flux")?.unwrap_or(0.0),
            snr: r.opt("snr")?,
        })
    })
    .map_err(|e| NightError::Truth { path: path.to_path_buf(), message: format!("line {}: {}", e.line, e.message) })
}

/// Read a truth table from disk.
pub fn read(path: &Path) -> Result<Vec<TruthRecord>, NightError> {
    let text = std::fs::read_to_string(path).map_err(|source| NightError::Io { path: path.to_path_buf(), error: source })?;
    parse(&text, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_by_name_and_bad_rows() {
        let p = Path::new("truth.csv");
        let t = "kind,id,frame,mjd,x,y,ra,dec,flux,extra,snr\nsn,7,f.fits,1.5,2,3,4,5,6,zz,\n";
        let r = parse(t, p).expect("parses");
        assert_eq!((r[0].id, r[0].kind.as_str(), r[0].snr, r[0].host), (7, "sn", None, None));
        assert!(r[0].is_variable());
        let bad = parse("id,kind,frame,mjd,x,y,ra,dec,flux\n1,star,f,1,2,x,4,5,6\n", p).expect_err("bad y");
        assert!(bad.to_string().contains("line 2") && bad.to_string().contains("column y"), "{bad}");
        assert!(parse("id,kind\n", p).is_err());
    }
}

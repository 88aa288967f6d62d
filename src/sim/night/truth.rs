//! Reading `truth.csv` (`docs/night-format.md`): one record per source or artifact per frame.
//! Columns are found by name in the header line, in any order; unknown columns are ignored, so a
//! simulator may add its own. A bad row is an error naming the file, line and column.

use std::collections::HashMap;
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
    let err = |line: usize, message: String| NightError::Truth { path: path.to_path_buf(), message: format!("line {line}: {message}") };
    let mut lines = text.lines().enumerate();
    let header = lines.next().map(|(_, l)| l).ok_or_else(|| err(1, "empty truth table".into()))?;
    let cols: HashMap<&str, usize> = header.split(',').map(str::trim).enumerate().map(|(i, c)| (c, i)).collect();
    let required = ["id", "kind", "frame", "mjd", "x", "y", "ra", "dec", "flux"];
    for c in required {
        if !cols.contains_key(c) {
            return Err(err(1, format!("no column {c:?} (header: {header})")));
        }
    }
    let mut out = Vec::new();
    for (n, line) in lines {
        let ln = n + 1;
        if line.trim().is_empty() {
            continue;
        }
        let v: Vec<&str> = line.split(',').map(str::trim).collect();
        let get = |c: &str| cols.get(c).and_then(|&i| v.get(i)).copied().unwrap_or("");
        let num = |c: &str| get(c).parse::<f64>().map_err(|e| err(ln, format!("column {c} = {:?}: {e}", get(c))));
        let opt = |c: &str| match get(c) {
            "" => Ok(None),
            s => s.parse::<f64>().map(Some).map_err(|e| err(ln, format!("column {c} = {s:?}: {e}"))),
        };
        out.push(TruthRecord {
            id: get("id").parse().map_err(|e| err(ln, format!("column id = {:?}: {e}", get("id"))))?,
            kind: get("kind").to_string(),
            host: match get("host") {
                "" => None,
                s => Some(s.parse().map_err(|e| err(ln, format!("column host = {s:?}: {e}")))?),
            },
            frame: get("frame").to_string(),
            mjd: num("mjd")?,
            x: num("x")?,
            y: num("y")?,
            ra: num("ra")?,
            dec: num("dec")?,
            mag: opt("mag")?,
            flux: num("flux")?,
            ref_flux: opt("ref_flux")?.unwrap_or(0.0),
            snr: opt("snr")?,
        });
    }
    Ok(out)
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

//! `manifest.toml`, the index of a night folder (`docs/night-format.md`): which frames belong to
//! which field, band and template, and where the truth table is. Read liberally (unknown keys are
//! ignored, so a newer writer does not break an older reader), checked strictly for what blink
//! needs: a known format, relative paths inside the folder, every frame's template listed.

use std::path::{Component, Path};

use serde::{Deserialize, Serialize};

use super::NightError;

pub const FORMAT: &str = "blink-night";
pub const VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Always "blink-night".
    pub format: String,
    /// Format version (1).
    pub version: u32,
    /// What wrote the folder (free text).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generator: Option<String>,
    /// Truth table, relative to the folder (absent for real data).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub truth: Option<String>,
    /// Folder of alert files (Avro containers, one per frame), relative to the folder.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alerts: Option<String>,
    #[serde(default)]
    pub templates: Vec<TemplateEntry>,
    #[serde(default)]
    pub frames: Vec<FrameEntry>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TemplateEntry {
    pub file: String,
    pub field: String,
    pub band: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FrameEntry {
    pub file: String,
    pub field: String,
    pub band: String,
    /// The template's `file`, exactly as listed under `templates`.
    pub template: String,
    /// A copy of the header's MJD for sorting without opening files; the header wins.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mjd: Option<f64>,
}

fn relative_inside(p: &str) -> bool {
    let path = Path::new(p);
    !p.is_empty() && path.components().all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
}

impl Manifest {
    pub fn new(generator: &str) -> Manifest {
        Manifest {
            format: FORMAT.into(),
            version: VERSION,
            generator: Some(generator.into()),
            truth: None,
            alerts: None,
            templates: Vec::new(),
            frames: Vec::new(),
        }
    }

    /// Parse and check a manifest's text; `path` names it in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Manifest, NightError> {
        let err = |message: String| NightError::Manifest { path: path.to_path_buf(), message };
        let m: Manifest = toml::from_str(text).map_err(|e| err(format!("not a night manifest: {e}")))?;
        if m.format != FORMAT {
            return Err(err(format!("format = {:?}, expected {FORMAT:?}", m.format)));
        }
        if m.version != VERSION {
            return Err(err(format!("version = {}, this blink reads version {VERSION}", m.version)));
        }
        for f in m.templates.iter().map(|t| &t.file).chain(m.frames.iter().map(|f| &f.file)).chain(m.truth.iter()).chain(m.alerts.iter()) {
            if !relative_inside(f) {
                return Err(err(format!("file {f:?} is not a relative path inside the folder")));
            }
        }
        // Frame names and bands go into CSV files (truth, catalogues) unquoted.
        for v in m.frames.iter().flat_map(|f| [&f.file, &f.band, &f.field]) {
            if v.contains([',', '\n', '\r', '"']) {
                return Err(err(format!("{v:?}: names and bands may not contain commas, quotes or line breaks")));
            }
        }
        for f in &m.frames {
            match m.templates.iter().find(|t| t.file == f.template) {
                None => return Err(err(format!("frame {:?}: template {:?} is not listed under [[templates]]", f.file, f.template))),
                Some(t) if t.field != f.field || t.band != f.band => {
                    return Err(err(format!(
                        "frame {:?} ({}, {}) names template {:?} of ({}, {})",
                        f.file, f.field, f.band, t.file, t.field, t.band
                    )))
                }
                Some(_) => {}
            }
        }
        Ok(m)
    }

    /// Read `DIR/manifest.toml` (or the file itself when `path` is a file).
    pub fn read(path: &Path) -> Result<Manifest, NightError> {
        let file = if path.is_dir() { path.join("manifest.toml") } else { path.to_path_buf() };
        let text = std::fs::read_to_string(&file).map_err(|source| NightError::Io { path: file.clone(), error: source })?;
        Manifest::parse(&text, &file)
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_checks() {
        let mut m = Manifest::new("test");
        m.templates.push(TemplateEntry { file: "templates/a-r.fits".into(), field: "a".into(), band: "r".into() });
        m.frames.push(FrameEntry {
            file: "frames/a-r-0.fits".into(),
            field: "a".into(),
            band: "r".into(),
            template: "templates/a-r.fits".into(),
            mjd: Some(61000.5),
        });
        let p = Path::new("m.toml");
        assert_eq!(Manifest::parse(&m.to_toml(), p).expect("parses"), m);
        let bad = m.to_toml().replace("template = \"templates/a-r.fits\"", "template = \"templates/b.fits\"");
        assert!(Manifest::parse(&bad, p).is_err());
        let escape = m.to_toml().replace("frames/a-r-0.fits", "../x.fits");
        assert!(Manifest::parse(&escape, p).is_err());
        let comma = m.to_toml().replace("frames/a-r-0.fits", "frames/a,r.fits");
        let e = Manifest::parse(&comma, p).expect_err("a comma would break the CSV files");
        assert!(e.to_string().contains("commas"), "{e}");
        let extra = format!("future_key = 3\n{}", m.to_toml());
        assert!(Manifest::parse(&extra, p).is_ok(), "unknown keys are ignored");
    }
}

//! `[history]`: where the object history lives and how long it is kept.

use std::path::PathBuf;

use serde::Deserialize;

use super::HistoryError;

/// The object history store (`docs/history.md`).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct HistoryConfig {
    /// The history file (one redb file; created with its folder if missing).
    pub path: PathBuf,
    /// Epochs more than this many days older than the newest epoch seen are dropped. The default,
    /// 45, is longer than the longest stacking window (30 nights).
    pub retention_days: f64,
    /// Bound on the stored epoch records, bytes; past it the oldest epochs are dropped first.
    /// The file itself is somewhat larger (B-tree pages, free space).
    pub max_bytes: u64,
    /// An alert without a survey object id joins the nearest object of its survey within this
    /// many arcsec, else starts a new one. At most 3600.
    pub match_radius_arcsec: f64,
    /// When the file at start-up is not a readable history store: `false` fails with an error
    /// naming it; `true` moves it aside as `<path>.corrupt-<unix time>` and starts empty.
    pub rebuild_corrupt: bool,
    /// Memory for the squares of recent epochs kept where the stacks are made, MiB: on the GPU
    /// with the GPU engine (capped by the adapter's largest storage binding), in host memory
    /// with the CPU engine. One epoch takes 11.3 KiB, so the default 256 holds ~23,000 epochs
    /// (~2,000 objects with 11 epochs each in 30 nights). Objects beyond it are read from this
    /// store when their stacks are made, which is slower but gives the same detections.
    pub resident_mb: u64,
}

impl Default for HistoryConfig {
    fn default() -> Self {
        HistoryConfig {
            path: PathBuf::from("blink-history.redb"),
            retention_days: 45.0,
            max_bytes: 2 << 30,
            match_radius_arcsec: 1.0,
            rebuild_corrupt: false,
            resident_mb: 256,
        }
    }
}

impl HistoryConfig {
    /// A config for `path` with every other field at its default.
    pub fn at(path: impl Into<PathBuf>) -> HistoryConfig {
        HistoryConfig { path: path.into(), ..Default::default() }
    }

    pub fn validate(&self) -> Result<(), HistoryError> {
        let bad = |m: String| Err(HistoryError::Config(m));
        if self.path.as_os_str().is_empty() {
            return bad("history.path is empty".into());
        }
        if !(self.retention_days.is_finite() && self.retention_days > 0.0) {
            return bad(format!("history.retention_days = {}: wants a positive number of days", self.retention_days));
        }
        if self.max_bytes == 0 {
            return bad("history.max_bytes = 0: wants a positive size in bytes".into());
        }
        if !(self.match_radius_arcsec > 0.0 && self.match_radius_arcsec <= 3600.0) {
            return bad(format!("history.match_radius_arcsec = {}: wants (0, 3600]", self.match_radius_arcsec));
        }
        if self.resident_mb > 1 << 20 {
            return bad(format!("history.resident_mb = {}: wants at most 1048576 (1 TiB)", self.resident_mb));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_parse_and_bad_values_are_refused() {
        let c: HistoryConfig = toml::from_str("path = \"h.redb\"\nretention_days = 30").unwrap();
        assert_eq!(c, HistoryConfig { path: "h.redb".into(), retention_days: 30.0, ..Default::default() });
        assert!(c.validate().is_ok() && HistoryConfig::default().validate().is_ok());
        assert!(toml::from_str::<HistoryConfig>("radius = 2").is_err());
        for bad in [
            HistoryConfig { retention_days: 0.0, ..Default::default() },
            HistoryConfig { retention_days: f64::NAN, ..Default::default() },
            HistoryConfig { max_bytes: 0, ..Default::default() },
            HistoryConfig { match_radius_arcsec: 0.0, ..Default::default() },
            HistoryConfig { match_radius_arcsec: 4000.0, ..Default::default() },
            HistoryConfig::at(""),
        ] {
            assert!(matches!(bad.validate(), Err(HistoryError::Config(_))), "{bad:?}");
        }
    }
}

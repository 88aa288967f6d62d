//! Alert packets → [`Alert`]s.
//!
//! One [`Decoder`] reads every wire format blink meets, detected from the bytes themselves:
//!
//! | first bytes | format | handled in |
//! |---|---|---|
//! | `Obj\x01` | Avro object container: ZTF 3.x/4.x, Fink-enriched ZTF, Fink-wrapped Rubin, blink native | [`ztf`], [`rubin`], [`native`] by field presence |
//! | `0x00` | Confluent framing (Rubin): schema id, then one Avro datum | [`rubin`] |
//! | `1f 8b` | gzip: inflated (with a limit), then detected again | here |
//!
//! Every packet is read with its *writer's* schema and then mapped field by field by name
//! ([`avro_util`]), so a new optional field in a survey's schema never breaks decoding.
//! Stamps are FITS read by the small in-memory reader in [`fits`].
//!
//! Nothing here panics on wire bytes: every failure is a [`DecodeError`] whose
//! [`reason`](DecodeError::reason) is the dead-letter code.

pub mod avro_util;
pub mod fits;
pub mod inspect;
pub mod native;
pub mod rubin;
pub mod ztf;

use std::io::Read;
use std::path::{Path, PathBuf};

use crate::alert::{Alert, Image, Stamp};

pub use fits::{read_hdus, write_hdus, FitsImage};
pub use native::encode_native;
pub use rubin::fink_to_confluent;

/// Hard limits on what one message may make us allocate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Largest message (or file, or inflated gzip message) accepted, in bytes. Default 16 MiB.
    pub max_message_bytes: usize,
    /// Largest inflated size of one gzipped stamp, in bytes. Default 4 MiB.
    pub max_inflated_bytes: usize,
    /// Largest stamp side (NAXIS1, NAXIS2), in pixels. Default 4096.
    pub max_stamp_pixels: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_message_bytes: 16 << 20,
            max_inflated_bytes: 4 << 20,
            max_stamp_pixels: 4096,
        }
    }
}

/// How to build a [`Decoder`].
#[derive(Debug, Clone, Default)]
pub struct DecoderConfig {
    /// Folder of Rubin schemas laid out as `vMM_m/lsst.vMM_m.*.avsc` (as in lsst/alert_packet).
    /// `None`: the copies of v10_0, v11_0 and v11_1 built into blink.
    pub rubin_schema_dir: Option<PathBuf>,
    /// Confluent schema registry, asked (`GET {url}/schemas/ids/{id}`) for a schema id not
    /// found locally. Answers are cached for the decoder's lifetime.
    pub schema_registry_url: Option<String>,
    pub limits: Limits,
}

/// Why a message, record or stamp could not be decoded.
#[derive(thiserror::Error, Debug)]
pub enum DecodeError {
    #[error("empty message (0 bytes)")]
    Empty,
    #[error("{what} is {size} bytes, over the limit of {limit}")]
    TooLarge { what: String, size: usize, limit: usize },
    #[error("avro: {0}")]
    Avro(String),
    #[error("unknown message format: first byte 0x{first:02x} (length {len})")]
    Magic { first: u8, len: usize },
    #[error("unknown schema id {id}: {detail}")]
    SchemaId { id: u32, detail: String },
    #[error("corrupt gzip in {what}: {detail}")]
    Gzip { what: String, detail: String },
    #[error("gzip {what} inflates past the limit of {limit} bytes")]
    GzipBomb { what: String, limit: usize },
    #[error("FITS: {0}")]
    Fits(String),
    #[error("stamp {0} has only NaN pixels")]
    AllNan(String),
    #[error("stamp shapes differ: {0}")]
    Shape(String),
    #[error("missing field {0}")]
    MissingField(String),
    #[error("unsupported packet: {0}")]
    Unsupported(String),
    #[error("reading {path}: {detail}")]
    Io { path: String, detail: String },
    /// A record-level error, with the alert it came from.
    #[error("alert {alert_id}: {source}")]
    InAlert {
        alert_id: String,
        #[source]
        source: Box<DecodeError>,
    },
}

impl DecodeError {
    /// Short, stable dead-letter code.
    pub fn reason(&self) -> &'static str {
        match self {
            DecodeError::Empty => "empty",
            DecodeError::TooLarge { .. } => "too_large",
            DecodeError::Avro(_) => "avro",
            DecodeError::Magic { .. } => "magic",
            DecodeError::SchemaId { .. } => "schema_id",
            DecodeError::Gzip { .. } => "gzip",
            DecodeError::GzipBomb { .. } => "gzip_bomb",
            DecodeError::Fits(_) => "fits",
            DecodeError::AllNan(_) => "all_nan",
            DecodeError::Shape(_) => "shape",
            DecodeError::MissingField(_) => "missing_field",
            DecodeError::Unsupported(_) => "unsupported",
            DecodeError::Io { .. } => "io",
            DecodeError::InAlert { source, .. } => source.reason(),
        }
    }

    /// Attach the alert id, for messages that name where a failure came from.
    pub(crate) fn in_alert(self, alert_id: &str) -> DecodeError {
        match self {
            e @ DecodeError::InAlert { .. } => e,
            e => DecodeError::InAlert { alert_id: alert_id.to_string(), source: Box::new(e) },
        }
    }
}

impl From<apache_avro::Error> for DecodeError {
    fn from(e: apache_avro::Error) -> Self {
        DecodeError::Avro(e.to_string())
    }
}

/// The alert decoder. Cheap to share: `Send + Sync`, used behind an `Arc` by decode workers.
pub struct Decoder {
    limits: Limits,
    rubin: rubin::RubinSchemas,
}

impl std::fmt::Debug for Decoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Decoder").field("limits", &self.limits).finish_non_exhaustive()
    }
}

/// Avro container magic.
const AVRO_MAGIC: &[u8; 4] = b"Obj\x01";

impl Decoder {
    pub fn new(cfg: DecoderConfig) -> Result<Decoder, DecodeError> {
        // apache-avro allocates a `bytes`/`string`/block length straight from the wire, up to a
        // process-wide cap (512 MiB by default). Lower it so a forged length fails fast; the
        // first call in the process wins, later calls are no-ops.
        apache_avro::util::max_allocation_bytes(cfg.limits.max_message_bytes.saturating_mul(4).max(64 << 20));
        native::schema()?;
        Ok(Decoder {
            rubin: rubin::RubinSchemas::new(cfg.rubin_schema_dir.as_deref(), cfg.schema_registry_url.clone())?,
            limits: cfg.limits,
        })
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// One Kafka message or one file's bytes → its alerts. A message-level failure is a single
    /// `Err`; a container with several records gives one entry per record (a bad record does not
    /// spoil the others).
    pub fn decode_message(&self, bytes: &[u8]) -> Vec<Result<Alert, DecodeError>> {
        self.decode_depth(bytes, 0)
    }

    fn decode_depth(&self, bytes: &[u8], depth: u32) -> Vec<Result<Alert, DecodeError>> {
        if bytes.is_empty() {
            return vec![Err(DecodeError::Empty)];
        }
        if bytes.len() > self.limits.max_message_bytes {
            return vec![Err(DecodeError::TooLarge {
                what: "message".into(),
                size: bytes.len(),
                limit: self.limits.max_message_bytes,
            })];
        }
        if bytes.starts_with(AVRO_MAGIC) {
            return match avro_util::read_container(bytes) {
                Ok(records) => records
                    .into_iter()
                    .map(|r| r.and_then(|v| self.map_record(&v)))
                    .collect(),
                Err(e) => vec![Err(e)],
            };
        }
        match bytes.first() {
            Some(0x00) => vec![self.rubin.decode_confluent(bytes).and_then(|v| self.map_record(&v))],
            Some(0x1f) if bytes.get(1) == Some(&0x8b) && depth == 0 => {
                match inflate(bytes, self.limits.max_message_bytes, "message") {
                    Ok(inner) => self.decode_depth(&inner, depth + 1),
                    Err(e) => vec![Err(e)],
                }
            }
            Some(&first) => vec![Err(DecodeError::Magic { first, len: bytes.len() })],
            None => vec![Err(DecodeError::Empty)],
        }
    }

    /// Map one decoded record to an alert, choosing the survey by which fields it has.
    fn map_record(&self, v: &apache_avro::types::Value) -> Result<Alert, DecodeError> {
        if avro_util::field(v, "candidate").is_some() && avro_util::field(v, "objectId").is_some() {
            ztf::map_alert(v, &self.limits)
        } else if avro_util::field(v, "diaSource").is_some() {
            rubin::map_alert(v, &self.limits)
        } else if avro_util::field(v, "cutoutScience").is_some() && avro_util::field(v, "candX").is_some() {
            native::map_alert(v, &self.limits)
        } else {
            let names: Vec<&str> = match v {
                apache_avro::types::Value::Record(fields) => fields.iter().map(|(n, _)| n.as_str()).take(8).collect(),
                _ => vec![],
            };
            Err(DecodeError::Unsupported(format!(
                "record with fields [{}] is neither ZTF (candidate), Rubin (diaSource) nor blink native",
                names.join(", ")
            )))
        }
    }

    /// A file's bytes → its alerts; `.gz` files are inflated first (by their magic, whatever the
    /// name).
    pub fn decode_file(&self, path: &Path) -> Result<Vec<Result<Alert, DecodeError>>, DecodeError> {
        let io = |e: std::io::Error| DecodeError::Io { path: path.display().to_string(), detail: e.to_string() };
        let meta = std::fs::metadata(path).map_err(io)?;
        let limit = self.limits.max_message_bytes;
        if meta.len() > limit as u64 {
            return Err(DecodeError::TooLarge {
                what: format!("file {}", path.display()),
                size: usize::try_from(meta.len()).unwrap_or(usize::MAX),
                limit,
            });
        }
        let bytes = std::fs::read(path).map_err(io)?;
        Ok(self.decode_message(&bytes))
    }
}

/// Inflate gzip through `Read::take(limit + 1)`: never more than `limit + 1` bytes in memory.
pub(crate) fn inflate(bytes: &[u8], limit: usize, what: &str) -> Result<Vec<u8>, DecodeError> {
    let mut out = Vec::new();
    let dec = flate2::read::MultiGzDecoder::new(bytes);
    dec.take(limit as u64 + 1).read_to_end(&mut out).map_err(|e| DecodeError::Gzip {
        what: what.to_string(),
        detail: e.to_string(),
    })?;
    if out.len() > limit {
        return Err(DecodeError::GzipBomb { what: what.to_string(), limit });
    }
    Ok(out)
}

/// Wire image (NaNs allowed) → stamp image with NaNs zeroed and flagged in the mask.
pub(crate) fn stamp_from_image(name: &str, img: Image, variance: Option<Image>, psf: Option<Image>) -> Result<Stamp, DecodeError> {
    let mut img = img;
    let mut mask = vec![false; img.data.len()];
    let mut bad = 0usize;
    for (p, m) in img.data.iter_mut().zip(mask.iter_mut()) {
        if !p.is_finite() {
            *p = 0.0;
            *m = true;
            bad += 1;
        }
    }
    if bad == img.data.len() {
        return Err(DecodeError::AllNan(format!("{name} ({}x{})", img.width, img.height)));
    }
    let clean = |i: Option<Image>| {
        i.map(|mut i| {
            for p in i.data.iter_mut() {
                if !p.is_finite() {
                    *p = 0.0;
                }
            }
            i
        })
    };
    Ok(Stamp { image: img, mask, variance: clean(variance), psf: clean(psf) })
}

/// Science and template must be pixel-aligned twins; the difference, when given, too.
pub(crate) fn check_shapes(t: &crate::alert::Triplet) -> Result<(), DecodeError> {
    let s = t.science.image.shape();
    let tp = t.template.image.shape();
    if s != tp {
        return Err(DecodeError::Shape(format!("science {}x{} vs template {}x{}", s.0, s.1, tp.0, tp.1)));
    }
    if let Some(d) = &t.difference {
        let d = d.image.shape();
        if d != s {
            return Err(DecodeError::Shape(format!("science {}x{} vs difference {}x{}", s.0, s.1, d.0, d.1)));
        }
    }
    for (name, st) in [("science", &t.science), ("template", &t.template)] {
        if let Some(v) = &st.variance {
            if v.shape() != st.image.shape() {
                return Err(DecodeError::Shape(format!(
                    "{name} variance {}x{} vs image {}x{}",
                    v.width, v.height, st.image.width, st.image.height
                )));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decoder_is_send_sync() {
        fn check<T: Send + Sync>() {}
        check::<Decoder>();
    }

    #[test]
    fn inflate_limits() {
        use std::io::Write;
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        enc.write_all(&vec![0u8; 10_000]).ok();
        let gz = enc.finish().unwrap_or_default();
        assert_eq!(inflate(&gz, 10_000, "t").map(|v| v.len()).ok(), Some(10_000));
        assert_eq!(inflate(&gz, 9_999, "t").map_err(|e| e.reason()).err(), Some("gzip_bomb"));
        assert_eq!(inflate(&gz[..gz.len() / 2], 10_000, "t").map_err(|e| e.reason()).err(), Some("gzip"));
    }
}

//! Files and fixtures as Kafka-shaped messages: what `blink demo` publishes and tests replay.
//!
//! On Kafka each ZTF alert is one whole Avro container file; fixture files that hold several
//! alerts are split into one single-alert container each, with the writer's schema kept.

use std::path::Path;

use apache_avro::{Codec, DeflateSettings, Reader, Writer};

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("{what}: not an Avro container: {source}")]
    Avro { what: String, source: Box<apache_avro::Error> },
    #[error("{what}: {reason}")]
    Decode { what: String, reason: String },
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
}

/// Split an Avro object container into one container per record (same schema, deflate codec).
pub fn split_container(bytes: &[u8], what: &str) -> Result<Vec<Vec<u8>>, ReplayError> {
    let err = |source: apache_avro::Error| ReplayError::Avro { what: what.to_owned(), source: Box::new(source) };
    let reader = Reader::new(bytes).map_err(err)?;
    let schema = reader.writer_schema().clone();
    let mut out = Vec::new();
    for value in reader {
        let value = value.map_err(err)?;
        let mut w = Writer::with_codec(&schema, Vec::new(), Codec::Deflate(DeflateSettings::default()));
        w.append_value_ref(&value).map_err(err)?;
        out.push(w.into_inner().map_err(err)?);
    }
    Ok(out)
}

/// A message to publish: a key (for partitioning) and its payload, plus where it came from.
#[derive(Debug, Clone)]
pub struct Message {
    pub key: String,
    pub payload: Vec<u8>,
    pub origin: String,
}

/// The real alert fixtures, embedded in the binary so `blink demo` runs from any folder.
/// Provenance: `testdata/README.md`.
pub const FIXTURE_CONTAINERS: &[(&str, &[u8])] = &[
    ("ztf/ztf-avro-alert/472263571115115000.avro", include_bytes!("../../testdata/ztf/ztf-avro-alert/472263571115115000.avro")),
    ("ztf/ztf-avro-alert/2019_01_10_739260766315010006.avro", include_bytes!("../../testdata/ztf/ztf-avro-alert/2019_01_10_739260766315010006.avro")),
    ("ztf/fink-client/ZTF19acihgng.avro", include_bytes!("../../testdata/ztf/fink-client/ZTF19acihgng.avro")),
    ("ztf/fink-client/ZTF19acxxwrs.avro", include_bytes!("../../testdata/ztf/fink-client/ZTF19acxxwrs.avro")),
    ("ztf/fink-client/ZTF19acyfkzd.avro", include_bytes!("../../testdata/ztf/fink-client/ZTF19acyfkzd.avro")),
    ("ztf/fink-client/ZTF19acyjzeo.avro", include_bytes!("../../testdata/ztf/fink-client/ZTF19acyjzeo.avro")),
    ("ztf/fink-client/avro_multi_alerts.avro", include_bytes!("../../testdata/ztf/fink-client/avro_multi_alerts.avro")),
    ("ztf/fink-client/avro_multi_alerts_other.avro", include_bytes!("../../testdata/ztf/fink-client/avro_multi_alerts_other.avro")),
    ("ztf/fink-client/fink-broker-sample-alert-1.avro", include_bytes!("../../testdata/ztf/fink-client/fink-broker-sample-alert-1.avro")),
    ("ztf/fink-client/fink-broker-sample-alert-2.avro", include_bytes!("../../testdata/ztf/fink-client/fink-broker-sample-alert-2.avro")),
    ("ztf/fink-client/fink-broker-sample-alert-3.avro", include_bytes!("../../testdata/ztf/fink-client/fink-broker-sample-alert-3.avro")),
    ("ztf/fink-client/fink-broker-sample-alert-4.avro", include_bytes!("../../testdata/ztf/fink-client/fink-broker-sample-alert-4.avro")),
    ("ztf/fink-client/sample_snappy/part-00001", include_bytes!("../../testdata/ztf/fink-client/sample_snappy/part-00001-0f70696a-f8dd-40ab-89e7-e7f64c104e25-c000.avro")),
    ("ztf/fink-client/sample_snappy/part-00002", include_bytes!("../../testdata/ztf/fink-client/sample_snappy/part-00002-0f70696a-f8dd-40ab-89e7-e7f64c104e25-c000.avro")),
    ("lsst/fake/fakeAlert_v10_0.avro", include_bytes!("../../testdata/lsst/fake/fakeAlert_v10_0.avro")),
    ("lsst/fake/fakeAlert_v11_0.avro", include_bytes!("../../testdata/lsst/fake/fakeAlert_v11_0.avro")),
    ("lsst/fake/fakeAlert_v11_1.avro", include_bytes!("../../testdata/lsst/fake/fakeAlert_v11_1.avro")),
];

/// The 7 real Rubin alerts, wrapped by Fink; published Confluent-framed as Rubin does.
pub const FINK_RUBIN: (&str, &[u8]) = (
    "lsst/fink-transfer-2026-03-18/part-2-918301.avro",
    include_bytes!("../../testdata/lsst/fink-transfer-2026-03-18/part-2-918301.avro"),
);

/// Every real fixture alert as Kafka would carry it: one ZTF container per alert, Rubin alerts
/// Confluent-framed (schema id 1001). The official fake Rubin alerts are carried as the
/// containers they are (their cutouts are null: they end as dead letters, by design).
pub fn fixture_messages(decoder: &crate::decode::Decoder) -> Result<Vec<Message>, ReplayError> {
    let mut out = Vec::new();
    for (name, bytes) in FIXTURE_CONTAINERS {
        for (i, payload) in split_container(bytes, name)?.into_iter().enumerate() {
            out.push(Message { key: format!("{name}#{i}"), payload, origin: (*name).to_owned() });
        }
    }
    let (name, bytes) = FINK_RUBIN;
    let framed = crate::decode::rubin::fink_to_confluent(decoder, bytes)
        .map_err(|e| ReplayError::Decode { what: name.to_owned(), reason: e.to_string() })?;
    for (i, payload) in framed.into_iter().enumerate() {
        out.push(Message { key: format!("{name}#{i}"), payload, origin: name.to_owned() });
    }
    Ok(out)
}

/// Read a file from disk as one message (used by tests and `blink replay`-style tools).
pub fn file_message(path: &Path) -> Result<Message, ReplayError> {
    let payload = std::fs::read(path)
        .map_err(|source| ReplayError::Io { path: path.display().to_string(), source })?;
    Ok(Message { key: path.display().to_string(), payload, origin: path.display().to_string() })
}

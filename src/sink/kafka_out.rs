//! The Kafka output topic (`[output]`): every result, or only detections, as an Avro datum of
//! `schemas/blink/blink.detection.avsc` in Confluent framing (0x00, the 4-byte big-endian
//! schema id, the datum), keyed by object id so that one object's detections stay in order on
//! one partition. A batch counts as delivered once the brokers have acknowledged every message
//! of it (`acks=all`, idempotent producer); only then are its alerts acked upstream.

use std::sync::Arc;
use std::time::Duration;

use apache_avro::types::Value;
use apache_avro::Schema;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;

use crate::config::OutputConfig;
use crate::proto::Detection;

/// The detection schema, as shipped.
pub const SCHEMA_JSON: &str = include_str!("../../schemas/blink/blink.detection.avsc");

/// How long one message may wait for the brokers before the batch counts as failed.
const SEND_TIMEOUT: Duration = Duration::from_secs(30);

/// What can stop the output topic at start-up.
#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    #[error("output: {0}")]
    Setup(String),
}

/// The parsed detection schema.
pub fn schema() -> Schema {
    // Shipped in the repository and checked by a test: parsing cannot fail at run time.
    Schema::parse_str(SCHEMA_JSON).expect("schemas/blink/blink.detection.avsc parses")
}

/// `d` as a detection record of `schema`.
pub fn to_value(d: &Detection) -> Value {
    let survey_snr = if d.survey_snr.is_finite() {
        Value::Union(1, Box::new(Value::Double(d.survey_snr)))
    } else {
        Value::Union(0, Box::new(Value::Null))
    };
    Value::Record(vec![
        ("id".into(), Value::String(d.id.clone())),
        ("sequence".into(), Value::Long(d.sequence as i64)),
        ("survey".into(), Value::String(d.survey.clone())),
        ("alert_id".into(), Value::String(d.alert_id.clone())),
        ("object_id".into(), Value::String(d.object_id.clone())),
        ("ra".into(), Value::Double(d.ra)),
        ("dec".into(), Value::Double(d.dec)),
        ("mjd_tai".into(), Value::Double(d.mjd_tai)),
        ("band".into(), Value::String(d.band.clone())),
        ("timescale".into(), Value::String(d.timescale.clone())),
        ("score".into(), Value::Double(d.score)),
        ("flux".into(), Value::Double(d.flux)),
        ("flux_err".into(), Value::Double(d.flux_err)),
        ("survey_snr".into(), survey_snr),
        ("detected".into(), Value::Boolean(d.detected)),
        ("new_object".into(), Value::Boolean(d.new_object)),
        ("flux_scale".into(), Value::Double(d.flux_scale)),
        ("background".into(), Value::Double(d.background)),
        ("source_topic".into(), Value::String(d.topic.clone())),
        ("source_partition".into(), Value::Int(d.partition)),
        ("source_offset".into(), Value::Long(d.offset)),
    ])
}

/// `d` framed the Confluent way with `schema_id`.
pub fn encode(schema: &Schema, schema_id: u32, d: &Detection) -> Result<Vec<u8>, String> {
    let datum = apache_avro::to_avro_datum(schema, to_value(d)).map_err(|e| format!("detection {}: {e}", d.id))?;
    let mut out = Vec::with_capacity(5 + datum.len());
    out.push(0);
    out.extend_from_slice(&schema_id.to_be_bytes());
    out.extend(datum);
    Ok(out)
}

/// A framed message back into its schema id and detection (what a consumer does).
pub fn decode(schema: &Schema, bytes: &[u8]) -> Result<(u32, Detection), String> {
    let [0, a, b, c, d, datum @ ..] = bytes else {
        return Err("not Confluent-framed: expected 0x00 and a 4-byte schema id".into());
    };
    let id = u32::from_be_bytes([*a, *b, *c, *d]);
    let v = apache_avro::from_avro_datum(schema, &mut &datum[..], None).map_err(|e| e.to_string())?;
    let Value::Record(fields) = v else { return Err("not a record".into()) };
    let get = |name: &str| fields.iter().find(|(k, _)| k == name).map(|(_, v)| v);
    let s = |name: &str| match get(name) {
        Some(Value::String(s)) => s.clone(),
        _ => String::new(),
    };
    let f = |name: &str| match get(name) {
        Some(Value::Double(x)) => *x,
        Some(Value::Union(_, x)) => match x.as_ref() {
            Value::Double(x) => *x,
            _ => f64::NAN,
        },
        _ => f64::NAN,
    };
    let l = |name: &str| match get(name) {
        Some(Value::Long(x)) => *x,
        Some(Value::Int(x)) => i64::from(*x),
        _ => 0,
    };
    let b = |name: &str| matches!(get(name), Some(Value::Boolean(true)));
    Ok((
        id,
        Detection {
            id: s("id"),
            survey: s("survey"),
            alert_id: s("alert_id"),
            object_id: s("object_id"),
            ra: f("ra"),
            dec: f("dec"),
            mjd_tai: f("mjd_tai"),
            band: s("band"),
            score: f("score"),
            flux: f("flux"),
            flux_err: f("flux_err"),
            survey_snr: f("survey_snr"),
            flux_scale: f("flux_scale"),
            background: f("background"),
            detected: b("detected"),
            timescale: s("timescale"),
            sequence: l("sequence") as u64,
            topic: s("source_topic"),
            partition: l("source_partition") as i32,
            offset: l("source_offset"),
            new_object: b("new_object"),
        },
    ))
}

/// Register the schema under `subject` with a Confluent-compatible registry; its id.
/// (`POST {url}/subjects/{subject}/versions`: the registry answers with the existing id when
/// the schema is already there.)
pub fn register(url: &str, subject: &str) -> Result<u32, String> {
    let full = format!("{}/subjects/{subject}/versions", url.trim_end_matches('/'));
    let agent: ureq::Agent = ureq::Agent::config_builder().timeout_global(Some(Duration::from_secs(10))).build().into();
    let body = serde_json::json!({ "schema": SCHEMA_JSON }).to_string();
    let mut resp = agent
        .post(&full)
        .header("Content-Type", "application/vnd.schemaregistry.v1+json")
        .send(body.as_bytes())
        .map_err(|e| format!("registering the detection schema at {full}: {e}"))?;
    let text = resp.body_mut().with_config().limit(1 << 20).read_to_string().map_err(|e| format!("{full}: {e}"))?;
    let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| format!("{full}: bad JSON: {e}"))?;
    json.get("id")
        .and_then(|v| v.as_u64())
        .and_then(|v| u32::try_from(v).ok())
        .ok_or_else(|| format!("{full}: no schema \"id\" in the answer {text:?}"))
}

/// The output topic's producer and framing.
pub struct KafkaOutput {
    producer: FutureProducer,
    topic: String,
    schema: Schema,
    schema_id: u32,
    only_detected: bool,
}

impl KafkaOutput {
    /// The output of `cfg` (its `kafka_topic` set), on `cfg.kafka_brokers` or else
    /// `input_brokers`; with a registry, the schema is registered under `<topic>-value` first.
    pub async fn start(cfg: &OutputConfig, input_brokers: &str) -> Result<KafkaOutput, OutputError> {
        let brokers = if cfg.kafka_brokers.is_empty() { input_brokers } else { cfg.kafka_brokers.as_str() };
        let schema_id = match &cfg.schema_registry_url {
            Some(url) => {
                let (url, subject) = (url.clone(), format!("{}-value", cfg.kafka_topic));
                tokio::task::spawn_blocking(move || register(&url, &subject))
                    .await
                    .map_err(|e| OutputError::Setup(e.to_string()))?
                    .map_err(OutputError::Setup)?
            }
            None => cfg.schema_id,
        };
        let mut cc = ClientConfig::new();
        cc.set("bootstrap.servers", brokers)
            .set("acks", "all")
            .set("enable.idempotence", "true")
            .set("linger.ms", "5")
            .set("message.timeout.ms", "30000");
        for (k, v) in &cfg.properties {
            cc.set(k, v);
        }
        let producer: FutureProducer =
            cc.create().map_err(|e| OutputError::Setup(format!("producer for {brokers}: {e}")))?;
        tracing::info!(topic = %cfg.kafka_topic, brokers, schema_id, only_detected = cfg.only_detected, "kafka output ready");
        Ok(KafkaOutput { producer, topic: cfg.kafka_topic.clone(), schema: schema(), schema_id, only_detected: cfg.only_detected })
    }
}

#[tonic::async_trait]
impl super::Output for KafkaOutput {
    fn name(&self) -> &str {
        "kafka"
    }

    async fn deliver(&self, detections: &[Arc<Detection>]) -> Result<(), String> {
        let mut sends = Vec::new();
        for d in detections.iter().filter(|d| d.detected || !self.only_detected) {
            let payload = encode(&self.schema, self.schema_id, d)?;
            let key = if d.object_id.is_empty() { d.id.clone() } else { d.object_id.clone() };
            let producer = &self.producer;
            let topic = &self.topic;
            sends.push(async move {
                producer
                    .send(FutureRecord::to(topic).key(&key).payload(&payload), SEND_TIMEOUT)
                    .await
                    .map(|_| ())
                    .map_err(|(e, _)| format!("{topic}: {e}"))
            });
        }
        // Sent together (the idempotent producer keeps each key's order), acknowledged all.
        let failed: Vec<String> = futures::future::join_all(sends).await.into_iter().filter_map(Result::err).collect();
        match failed.first() {
            None => Ok(()),
            Some(e) => Err(format!("{} of the batch's messages not acknowledged: {e}", failed.len())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    #[test]
    fn a_detection_survives_the_round_trip_through_avro() {
        let seed = crate::testing::seed();
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let s = schema();
        for k in 0..50 {
            let d = Detection {
                id: format!("ztf:{k}"),
                survey: "ztf".into(),
                alert_id: format!("{}", rng.gen::<u64>()),
                object_id: if k % 7 == 0 { String::new() } else { format!("ZTF{k:08}") },
                ra: rng.gen_range(0.0..360.0),
                dec: rng.gen_range(-90.0..90.0),
                mjd_tai: rng.gen_range(58000.0..62000.0),
                band: "g".into(),
                score: rng.gen_range(-50.0..50.0),
                flux: rng.gen(),
                flux_err: rng.gen(),
                survey_snr: if k % 3 == 0 { f64::NAN } else { rng.gen_range(0.0..100.0) },
                flux_scale: rng.gen(),
                background: rng.gen(),
                detected: rng.gen(),
                timescale: if k % 2 == 0 { "epoch".into() } else { "stack:3n".into() },
                sequence: rng.gen_range(1..u64::MAX / 2),
                topic: "alerts".into(),
                partition: rng.gen_range(0..64),
                offset: rng.gen_range(0..i64::MAX),
                new_object: rng.gen(),
            };
            let id = rng.gen::<u32>();
            let bytes = encode(&s, id, &d).unwrap();
            assert_eq!(&bytes[..5], &[&[0u8][..], &id.to_be_bytes()[..]].concat()[..], "seed {seed}");
            let (id2, back) = decode(&s, &bytes).unwrap();
            assert_eq!(id2, id);
            let same = |a: f64, b: f64| a == b || (a.is_nan() && b.is_nan());
            assert!(same(back.survey_snr, d.survey_snr), "seed {seed}");
            assert_eq!(Detection { survey_snr: 0.0, ..back }, Detection { survey_snr: 0.0, ..d }, "seed {seed}");
        }
        assert!(decode(&s, b"\x01\0\0\0\x01abc").is_err());
        assert!(decode(&s, b"\0\0").is_err());
    }
}

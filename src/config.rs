//! Configuration: one TOML file (`blink.example.toml` documents every key), environment overrides
//! `BLINK__SECTION__KEY=value`, then CLI flags. Validated once at start-up; workers get values.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config file {path}: {source}")]
    Parse { path: PathBuf, source: toml::de::Error },
    #[error("environment override {var}={value}: {reason}")]
    Env { var: String, value: String, reason: String },
    #[error("invalid config: {0}")]
    Invalid(String),
}

/// The whole configuration of `blink serve` (and `blink demo`, which starts from the defaults).
#[derive(Debug, Clone, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub kafka: KafkaConfig,
    pub batch: BatchConfig,
    pub engine: EngineConfig,
    pub detect: DetectConfig,
    pub grpc: GrpcConfig,
    pub decode: DecodeConfig,
    pub dead_letter: DeadLetterConfig,
    /// The object history store (`docs/history.md`): `blink serve` keeps it in this file,
    /// `blink demo` in memory.
    pub history: crate::history::HistoryConfig,
    /// Outputs besides gRPC: the Kafka output topic.
    pub output: OutputConfig,
    /// Notifications (Slack, webhooks) by rule, through an outbox in the history store
    /// (`docs/notifications.md`).
    pub notify: crate::notify::NotifyConfig,
}

/// Where alerts come from.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaConfig {
    /// Bootstrap servers, `host:port[,host:port]`, or `embedded` for librdkafka's in-process
    /// mock cluster (nothing to install; for demos and tests).
    pub brokers: String,
    /// Topics to consume. ZTF and Rubin packets may share a topic: the decoder tells them apart.
    pub topics: Vec<String>,
    /// Consumer group. Every blink node of one deployment uses the same group, so Kafka spreads
    /// the partitions across nodes.
    pub group_id: String,
    /// Where a new group starts: `earliest` or `latest`.
    pub auto_offset_reset: String,
    /// Partitions of each topic created in the embedded cluster.
    pub embedded_partitions: i32,
    /// Extra librdkafka properties passed through as they are (e.g. `security.protocol`).
    pub properties: BTreeMap<String, String>,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        KafkaConfig {
            brokers: "embedded".into(),
            topics: vec!["alerts".into()],
            group_id: "blink".into(),
            auto_offset_reset: "earliest".into(),
            embedded_partitions: 4,
            properties: BTreeMap::new(),
        }
    }
}

/// How decoded alerts are grouped for the engine.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct BatchConfig {
    /// Flush a same-shape batch when it holds this many alerts.
    pub max_alerts: usize,
    /// ... or when its oldest alert has waited this long (milliseconds).
    pub max_wait_ms: u64,
    /// Capacity of each bounded channel between stages (backpressure).
    pub channel_capacity: usize,
}

impl Default for BatchConfig {
    fn default() -> Self {
        BatchConfig { max_alerts: 64, max_wait_ms: 50, channel_capacity: 256 }
    }
}

/// Which engine runs the kernels.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct EngineConfig {
    /// `auto` (the GPU when wgpu finds an adapter, else the CPU engine with a warning), `gpu`
    /// (fail without an adapter) or `cpu`.
    pub prefer: String,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig { prefer: "auto".into() }
    }
}

/// Detection threshold.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DetectConfig {
    /// |score| at or above this (sigma) marks a result `detected`.
    pub threshold: f64,
}

impl Default for DetectConfig {
    fn default() -> Self {
        DetectConfig { threshold: 5.0 }
    }
}

/// The gRPC server.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct GrpcConfig {
    /// Address to listen on; port 0 picks a free one (logged).
    pub listen: String,
    /// Detections buffered per subscriber; a subscriber that falls further behind is
    /// disconnected with RESOURCE_EXHAUSTED instead of growing memory or stalling others.
    pub subscriber_buffer: usize,
    /// The last this many detections are kept in memory for subscribers that reconnect with
    /// `after_sequence` (`blink subscribe --after N`); 0 keeps none (resuming is then refused).
    pub replay: usize,
    /// Bearer tokens accepted on every call (`authorization: Bearer <token>`); with none here
    /// and no `tokens_file`, calls need no token. Never logged.
    pub tokens: Vec<Secret>,
    /// A file of tokens, one per line (blank lines and `#` comments ignored), read at start-up
    /// and added to `tokens`.
    pub tokens_file: Option<PathBuf>,
    /// TLS: the server's certificate chain and private key, PEM files; both or neither.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
}

/// Outputs besides gRPC (`[output]`): the Kafka output topic.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct OutputConfig {
    /// Kafka topic each result is written to (Avro of `schemas/blink/blink.detection.avsc`,
    /// Confluent framing, keyed by object id); empty: no output topic.
    pub kafka_topic: String,
    /// Brokers of the output topic; empty: the input's (`kafka.brokers`, the embedded cluster
    /// included).
    pub kafka_brokers: String,
    /// Only results with `detected` (|score| >= `detect.threshold`) and stack detections;
    /// false writes every result.
    pub only_detected: bool,
    /// The schema id written in the framing when there is no registry.
    pub schema_id: u32,
    /// A Confluent-compatible schema registry: the detection schema is registered there under
    /// `<kafka_topic>-value` at start-up and the id it gives is used.
    pub schema_registry_url: Option<String>,
    /// Extra librdkafka producer properties, as they are (e.g. `security.protocol`).
    pub properties: BTreeMap<String, String>,
}

impl Default for OutputConfig {
    fn default() -> Self {
        OutputConfig {
            kafka_topic: String::new(),
            kafka_brokers: String::new(),
            only_detected: true,
            schema_id: 1,
            schema_registry_url: None,
            properties: BTreeMap::new(),
        }
    }
}

/// A value that must not appear in logs: `Debug` prints `***`.
#[derive(Clone, Deserialize, PartialEq, Eq, Default)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Secret {
        Secret(s.into())
    }

    /// The secret itself, for the one place that uses it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

impl Default for GrpcConfig {
    fn default() -> Self {
        GrpcConfig {
            listen: "127.0.0.1:50051".into(),
            subscriber_buffer: 4096,
            replay: crate::sink::grpc::DEFAULT_REPLAY,
            tokens: Vec::new(),
            tokens_file: None,
            tls_cert: None,
            tls_key: None,
        }
    }
}

/// Packet decoding.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DecodeConfig {
    /// Folder of Rubin schemas (`v10_0/lsst.v10_0.alert.avsc`, ...). Unset: the copies built in.
    pub rubin_schema_dir: Option<PathBuf>,
    /// Confluent-compatible schema registry, asked for schema ids not found locally.
    pub schema_registry_url: Option<String>,
    /// Largest Kafka message accepted (bytes).
    pub max_message_bytes: usize,
    /// Largest size one gzipped stamp may inflate to (bytes): a bigger one is a gzip bomb.
    pub max_inflated_bytes: usize,
    /// Largest stamp side (pixels) accepted from a FITS header.
    pub max_stamp_pixels: usize,
}

impl Default for DecodeConfig {
    fn default() -> Self {
        DecodeConfig {
            rubin_schema_dir: None,
            schema_registry_url: None,
            max_message_bytes: 16 << 20,
            max_inflated_bytes: 4 << 20,
            max_stamp_pixels: 4096,
        }
    }
}

/// Where input that cannot be processed goes (it is always counted and logged).
#[derive(Debug, Clone, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct DeadLetterConfig {
    /// Append one JSON line per dead letter (reason, topic, partition, offset, error) here.
    pub file: Option<PathBuf>,
}

impl Config {
    /// Defaults, then the TOML file (if any), then `BLINK__SECTION__KEY` variables from `env`.
    pub fn load(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let mut table = match path {
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .map_err(|source| ConfigError::Read { path: p.to_owned(), source })?;
                text.parse::<toml::Table>()
                    .map_err(|source| ConfigError::Parse { path: p.to_owned(), source })?
            }
            None => toml::Table::new(),
        };
        for (var, value) in env {
            let Some(rest) = var.strip_prefix("BLINK__") else { continue };
            let parts: Vec<String> = rest.split("__").map(|s| s.to_ascii_lowercase()).collect();
            let [section, key] = parts.as_slice() else {
                return Err(ConfigError::Env {
                    var: var.clone(),
                    value,
                    reason: "expected BLINK__SECTION__KEY".into(),
                });
            };
            let section_table = table
                .entry(section.clone())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            let Some(section_table) = section_table.as_table_mut() else {
                return Err(ConfigError::Env {
                    var,
                    value,
                    reason: format!("[{section}] is not a table"),
                });
            };
            section_table.insert(key.clone(), env_value(&value));
        }
        let origin = path.map(Path::to_owned).unwrap_or_else(|| PathBuf::from("<defaults>"));
        let config: Config = toml::Value::Table(table)
            .try_into()
            .map_err(|source| ConfigError::Parse { path: origin, source })?;
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if self.kafka.topics.is_empty() {
            return bad("kafka.topics is empty: name at least one topic".into());
        }
        if self.kafka.brokers.trim().is_empty() {
            return bad("kafka.brokers is empty: give host:port or \"embedded\"".into());
        }
        if !matches!(self.kafka.auto_offset_reset.as_str(), "earliest" | "latest") {
            return bad(format!(
                "kafka.auto_offset_reset = {:?}: use \"earliest\" or \"latest\"",
                self.kafka.auto_offset_reset
            ));
        }
        if self.kafka.embedded_partitions < 1 {
            return bad("kafka.embedded_partitions must be at least 1".into());
        }
        if self.batch.max_alerts == 0 || self.batch.max_alerts > 65536 {
            return bad(format!("batch.max_alerts = {}: use 1..=65536", self.batch.max_alerts));
        }
        if self.batch.channel_capacity == 0 {
            return bad("batch.channel_capacity must be at least 1".into());
        }
        if !matches!(self.engine.prefer.as_str(), "auto" | "gpu" | "cpu") {
            return bad(format!(
                "engine.prefer = {:?}: use \"auto\", \"gpu\" or \"cpu\"",
                self.engine.prefer
            ));
        }
        if !self.detect.threshold.is_finite() || self.detect.threshold < 0.0 {
            return bad(format!("detect.threshold = {}: must be >= 0", self.detect.threshold));
        }
        if self.grpc.subscriber_buffer == 0 {
            return bad("grpc.subscriber_buffer must be at least 1".into());
        }
        if let Some(i) = self.grpc.tokens.iter().position(|t| t.expose().is_empty() || t.expose().chars().any(char::is_whitespace)) {
            return bad(format!("grpc.tokens[{i}] is empty or holds whitespace"));
        }
        if self.grpc.tls_cert.is_some() != self.grpc.tls_key.is_some() {
            return bad("grpc.tls_cert and grpc.tls_key go together: set both (PEM files) or neither".into());
        }
        if self.grpc.listen.parse::<std::net::SocketAddr>().is_err() {
            return bad(format!("grpc.listen = {:?}: expected ip:port", self.grpc.listen));
        }
        if self.output.kafka_topic.chars().any(|c| !(c.is_ascii_alphanumeric() || "._-".contains(c))) || self.output.kafka_topic.len() > 249 {
            return bad(format!("output.kafka_topic = {:?}: Kafka topic names use letters, digits, '.', '_' and '-' (at most 249)", self.output.kafka_topic));
        }
        if self.output.kafka_topic.is_empty() && (self.output.schema_registry_url.is_some() || !self.output.kafka_brokers.is_empty()) {
            return bad("output.kafka_brokers or output.schema_registry_url is set but output.kafka_topic is empty: name the topic".into());
        }
        if let Err(e) = self.notify.validate() {
            return bad(e.to_string());
        }
        if let Err(e) = self.history.validate() {
            return bad(e.to_string());
        }
        Ok(())
    }
}

/// An environment value as TOML: numbers and booleans as such, `[a, b]` as an array, else a string.
fn env_value(raw: &str) -> toml::Value {
    if let Ok(v) = format!("v = {raw}").parse::<toml::Table>() {
        if let Some(v) = v.get("v") {
            return v.clone();
        }
    }
    toml::Value::String(raw.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_file_parses_and_matches_defaults_where_it_says_so() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("blink.example.toml");
        let cfg = Config::load(Some(&path), []).expect("blink.example.toml must load");
        assert_eq!(cfg.batch, BatchConfig::default());
        assert_eq!(cfg.detect, DetectConfig::default());
        assert_eq!(cfg.history, crate::history::HistoryConfig::default());
        assert_eq!(cfg.kafka.brokers, "localhost:9092");
    }

    #[test]
    fn env_overrides_and_unknown_keys() {
        let env = vec![
            ("BLINK__BATCH__MAX_ALERTS".to_string(), "8".to_string()),
            ("BLINK__KAFKA__TOPICS".to_string(), "[\"ztf\", \"rubin\"]".to_string()),
            ("BLINK__GRPC__LISTEN".to_string(), "127.0.0.1:0".to_string()),
            ("PATH".to_string(), "/bin".to_string()),
        ];
        let cfg = Config::load(None, env).unwrap();
        assert_eq!(cfg.batch.max_alerts, 8);
        assert_eq!(cfg.kafka.topics, vec!["ztf", "rubin"]);
        assert_eq!(cfg.grpc.listen, "127.0.0.1:0");

        let err = Config::load(None, [("BLINK__BATCH__NOPE".into(), "1".into())]).unwrap_err();
        assert!(err.to_string().contains("nope"), "{err}");
        let err = Config::load(None, [("BLINK__ENGINE__PREFER".into(), "tpu".into())]).unwrap_err();
        assert!(err.to_string().contains("tpu"), "{err}");
    }
}

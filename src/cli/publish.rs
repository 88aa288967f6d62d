//! `blink publish`: put alert files on a Kafka topic, one alert per message (ZTF-style Avro
//! containers are split per record; anything else — e.g. a Confluent-framed Rubin message — is
//! sent as it is).

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

use crate::source::kafka;
use crate::source::replay::{file_message, split_container};

#[derive(Debug, Args)]
pub struct PublishArgs {
    /// Kafka bootstrap servers, host:port[,host:port].
    #[arg(long, default_value = "localhost:9092")]
    pub brokers: String,
    /// Topic to publish to.
    #[arg(long, default_value = "alerts")]
    pub topic: String,
    /// Alert files.
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
}

pub async fn run(args: &PublishArgs) -> anyhow::Result<()> {
    let producer = kafka::producer(&args.brokers)?;
    let mut n = 0usize;
    for path in &args.files {
        let m = file_message(path)?;
        let payloads = if m.payload.starts_with(b"Obj\x01") {
            split_container(&m.payload, &m.origin)?
        } else {
            vec![m.payload]
        };
        for (i, p) in payloads.iter().enumerate() {
            kafka::publish(&producer, &args.topic, &format!("{}#{i}", m.key), p)
                .await
                .with_context(|| format!("{}: record {i}", path.display()))?;
            n += 1;
        }
    }
    eprintln!("published {n} messages to {} on {}", args.topic, args.brokers);
    Ok(())
}

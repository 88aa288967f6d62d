//! `blink serve --config FILE`: the pipeline against real brokers until Ctrl-C / SIGTERM.

use std::path::PathBuf;

use clap::Args;

use crate::config::Config;
use crate::service::Service;
use crate::source::kafka::EmbeddedKafka;

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// TOML configuration (every key is documented in blink.example.toml). Environment variables
    /// BLINK__SECTION__KEY override it; the flags below override both.
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// Kafka bootstrap servers (host:port,...), or "embedded" for the in-process cluster.
    #[arg(long, alias = "kafka")]
    pub brokers: Option<String>,
    /// gRPC listen address, e.g. 0.0.0.0:50051.
    #[arg(long)]
    pub listen: Option<String>,
    #[command(flatten)]
    pub engine: super::EngineArgs,
}

pub fn load_config(args: &ServeArgs) -> anyhow::Result<Config> {
    let mut cfg = Config::load(args.config.as_deref(), std::env::vars())?;
    if let Some(b) = &args.brokers {
        cfg.kafka.brokers = b.clone();
    }
    if let Some(l) = &args.listen {
        cfg.grpc.listen = l.clone();
    }
    if let Some(e) = &args.engine.engine {
        cfg.engine.prefer = e.clone();
    }
    cfg.validate()?;
    Ok(cfg)
}

pub async fn run(args: &ServeArgs) -> anyhow::Result<()> {
    let cfg = load_config(args)?;
    // The embedded cluster must outlive the service.
    let embedded = if cfg.kafka.brokers == "embedded" {
        Some(EmbeddedKafka::start(&cfg.kafka.topics, cfg.kafka.embedded_partitions)?)
    } else {
        None
    };
    let brokers = embedded.as_ref().map(|e| e.bootstrap_servers()).unwrap_or(cfg.kafka.brokers.clone());
    let service = Service::start(&cfg, &brokers).await?;
    eprintln!(
        "blink serving: gRPC on {} (adapter: {}), consuming {:?} from {}",
        service.grpc_addr, service.adapter, cfg.kafka.topics, brokers
    );
    shutdown_signal().await;
    eprintln!("blink: shutting down (draining the pipeline, committing offsets)");
    service.stop().await;
    drop(embedded);
    Ok(())
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

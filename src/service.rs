//! The whole service wired together — Kafka source, pipeline, gRPC server — as `blink serve` and
//! `blink demo` run it. Start with [`Service::start`], stop with [`Service::stop`], which drains
//! the pipeline and commits the final offsets before returning.

use std::net::SocketAddr;
use std::sync::Arc;

use rdkafka::consumer::CommitMode;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::Config;
use crate::decode::{Decoder, DecoderConfig, Limits};
use crate::engine::{select_engine, EnginePreference};
use crate::history::{HistoryError, HistoryStore, MemoryHistory, RedbHistory};
use crate::metrics::Metrics;
use crate::pipeline::Pipeline;
use crate::sink::grpc::{self, Hub};
use crate::sink::kafka_out::KafkaOutput;
use crate::sink::Output;
use crate::source::kafka;

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("decoder: {0}")]
    Decoder(#[from] crate::decode::DecodeError),
    #[error("engine: {0}")]
    Engine(#[from] crate::engine::EngineError),
    #[error(transparent)]
    Kafka(#[from] kafka::KafkaError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("engine selection was interrupted: {0}")]
    Join(String),
    #[error(transparent)]
    History(#[from] HistoryError),
    #[error(transparent)]
    Security(#[from] grpc::SecurityError),
    #[error(transparent)]
    Output(#[from] crate::sink::kafka_out::OutputError),
    #[error(transparent)]
    Notify(#[from] crate::notify::NotifyError),
}

/// Where the object history lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HistoryBackend {
    /// The redb file of `history.path` (`blink serve`).
    File,
    /// In memory, gone at exit (`blink demo`, offline benches).
    Memory,
}

/// Open the history store `cfg.history` describes on `backend`. Opening the file reads and
/// checks every page: off the async workers.
pub async fn open_history(cfg: &Config, backend: HistoryBackend) -> Result<Arc<dyn HistoryStore>, ServiceError> {
    let hc = cfg.history.clone();
    let store: Arc<dyn HistoryStore> = match backend {
        HistoryBackend::Memory => Arc::new(MemoryHistory::new(&hc)?),
        HistoryBackend::File => {
            let opened = tokio::task::spawn_blocking(move || {
                if hc.rebuild_corrupt {
                    RedbHistory::open_or_rebuild(&hc)
                } else {
                    RedbHistory::open(&hc)
                }
            })
            .await
            .map_err(|e| ServiceError::Join(e.to_string()))??;
            tracing::info!(path = %cfg.history.path.display(), "history store open");
            Arc::new(opened)
        }
    };
    Ok(store)
}

/// Build the decoder the config describes.
pub fn decoder(cfg: &Config) -> Result<Decoder, ServiceError> {
    let d = &cfg.decode;
    Ok(Decoder::new(DecoderConfig {
        rubin_schema_dir: d.rubin_schema_dir.clone(),
        schema_registry_url: d.schema_registry_url.clone(),
        limits: Limits {
            max_message_bytes: d.max_message_bytes,
            max_inflated_bytes: d.max_inflated_bytes,
            max_stamp_pixels: d.max_stamp_pixels,
        },
    })?)
}

pub struct Service {
    pub grpc_addr: SocketAddr,
    pub metrics: Arc<Metrics>,
    pub adapter: String,
    shutdown: watch::Sender<bool>,
    source: JoinHandle<Result<kafka::Source, kafka::KafkaError>>,
    grpc: JoinHandle<Result<(), tonic::transport::Error>>,
    pipeline: Pipeline,
    hub: Hub,
    /// The notifications' delivery loop (stops at shutdown; what is pending stays in the outbox).
    notify: Option<JoinHandle<()>>,
}

impl Service {
    /// Start everything against `brokers` (a bootstrap list; the embedded cluster's too), with
    /// the history in the file `cfg.history.path`.
    pub async fn start(cfg: &Config, brokers: &str) -> Result<Service, ServiceError> {
        Service::start_with(cfg, brokers, HistoryBackend::File).await
    }

    /// [`Service::start`] with the history on `backend`.
    pub async fn start_with(cfg: &Config, brokers: &str, backend: HistoryBackend) -> Result<Service, ServiceError> {
        // Token files and TLS material first: a bad one stops start-up at once, naming it.
        let security = grpc::Security::from_config(&cfg.grpc)?;
        let history = open_history(cfg, backend).await?;
        let decoder = Arc::new(decoder(cfg)?);
        let pref: EnginePreference = cfg.engine.prefer.parse().map_err(ServiceError::Engine)?;
        // Adapter discovery blocks (and may take a second on llvmpipe): off the async workers.
        let engine = tokio::task::spawn_blocking(move || select_engine(pref))
            .await
            .map_err(|e| ServiceError::Join(e.to_string()))??;
        let adapter = engine.adapter();
        tracing::info!(%adapter, "engine ready");

        let metrics = Arc::new(Metrics::default());
        // The replay ring and sequence numbers go on from the previous run's (history store).
        let mut outputs: Vec<Arc<dyn Output>> = Vec::new();
        let hub = match history.clone().replay_log().filter(|_| cfg.grpc.replay > 0) {
            Some(log) => {
                let (hub, out) = crate::sink::replay::restore(log, cfg.grpc.subscriber_buffer, cfg.grpc.replay)?;
                outputs.push(Arc::new(out));
                hub
            }
            None => Hub::with_replay(cfg.grpc.subscriber_buffer, cfg.grpc.replay),
        };
        let (listener, grpc_addr) = grpc::bind(&cfg.grpc.listen).await?;
        tracing::info!(%grpc_addr, tls = security.tls(), token_required = security.requires_token(), "gRPC listening");
        let (shutdown, shutdown_rx) = watch::channel(false);
        let mut grpc_stop = shutdown_rx.clone();
        let grpc = tokio::spawn(grpc::serve(
            listener,
            hub.clone(),
            metrics.clone(),
            adapter.clone(),
            security,
            Some(history.clone()),
            async move {
                let _ = grpc_stop.wait_for(|s| *s).await;
            },
        ));

        if !cfg.output.kafka_topic.is_empty() {
            outputs.push(Arc::new(KafkaOutput::start(&cfg.output, brokers).await?));
        }
        let mut notify_task = None;
        if !cfg.notify.rules.is_empty() {
            let outbox = history.clone().outbox().ok_or_else(|| {
                ServiceError::Notify(crate::notify::NotifyError::Config("the history store has no outbox".into()))
            })?;
            let notifier = Arc::new(crate::notify::Notifier::new(&cfg.notify, outbox)?);
            metrics.set_notifier(notifier.clone());
            notify_task = Some(tokio::spawn(notifier.clone().run(shutdown_rx.clone())));
            outputs.push(notifier);
            tracing::info!(rules = cfg.notify.rules.len(), "notifications on");
        }
        let pipeline = Pipeline::start_with_outputs(
            cfg,
            decoder,
            engine,
            hub.clone(),
            metrics.clone(),
            Some(history),
            outputs,
        )?;
        let consumer = kafka::consumer(&cfg.kafka, brokers, metrics.clone())?;
        tracing::info!(brokers, topics = ?cfg.kafka.topics, group = %cfg.kafka.group_id, "consuming");
        let source = tokio::spawn(kafka::run(
            consumer,
            pipeline.input.clone(),
            pipeline.commits.clone(),
            metrics.clone(),
            shutdown_rx,
        ));
        Ok(Service { grpc_addr, metrics, adapter, shutdown, source, grpc, pipeline, hub, notify: notify_task })
    }

    /// Stop taking input, drain every stage, commit the final offsets, stop the gRPC server.
    pub async fn stop(self) {
        let _ = self.shutdown.send(true);
        let consumer = match self.source.await {
            Ok(Ok(c)) => Some(c),
            Ok(Err(e)) => {
                tracing::error!(error = %e, "kafka source failed");
                None
            }
            Err(e) => {
                tracing::error!(error = %e, "kafka source task failed");
                None
            }
        };
        let commits = self.pipeline.commits.clone();
        self.pipeline.finish().await;
        if let Some(c) = consumer {
            kafka::commit(&c, &commits, &self.metrics, CommitMode::Sync);
        }
        self.hub.close();
        let _ = self.grpc.await;
        if let Some(n) = self.notify {
            let _ = n.await;
        }
    }
}

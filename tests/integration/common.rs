//! Helpers the parity tests share: a seeded RNG that says its seed, and the GPU engine or a
//! loud failure.

use blink::engine::{Engine, GpuEngine};
use rand::rngs::StdRng;
use rand::SeedableRng;

/// `BLINK_SEED`, else the clock; printed, so a failure can be rerun with the same inputs.
pub fn seed(test: &str) -> u64 {
    let seed = std::env::var("BLINK_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1)
    });
    eprintln!("{test}: seed {seed} (rerun with BLINK_SEED={seed})");
    seed
}

/// An RNG from [`seed`].
pub fn seeded(test: &str) -> StdRng {
    StdRng::seed_from_u64(seed(test))
}

/// The GPU engine (its adapter and limits printed), or a failure; `None` (loudly) only with
/// BLINK_ALLOW_NO_GPU=1.
pub fn gpu(test: &str) -> Option<GpuEngine> {
    match GpuEngine::new() {
        Ok(g) => {
            let l = &g.context().limits;
            eprintln!(
                "{test}: adapter {}; workgroup memory {} B, storage buffers/stage {}, storage binding {} B",
                g.adapter(),
                l.max_compute_workgroup_storage_size,
                l.max_storage_buffers_per_shader_stage,
                l.max_storage_buffer_binding_size
            );
            Some(g)
        }
        Err(e) if std::env::var("BLINK_ALLOW_NO_GPU").as_deref() == Ok("1") => {
            eprintln!("!!!!!!!! {test}: SKIPPED, no GPU adapter ({e}); BLINK_ALLOW_NO_GPU=1 !!!!!!!!");
            None
        }
        Err(e) => panic!("{test}: no GPU adapter ({e}); set BLINK_ALLOW_NO_GPU=1 to skip"),
    }
}

/// The configuration the service tests share: consume `topic` in group `<topic>-group`, gRPC on
/// a free loopback port, the CPU engine (llvmpipe is slower than it).
pub fn service_config(topic: &str) -> blink::config::Config {
    let mut cfg = blink::config::Config::default();
    cfg.kafka.topics = vec![topic.to_string()];
    cfg.kafka.group_id = format!("{topic}-group");
    cfg.grpc.listen = "127.0.0.1:0".into();
    cfg.engine.prefer = "cpu".into();
    cfg
}

/// Publish each alert as one blink-native message keyed by its object id, as a survey would.
pub async fn publish_alerts(brokers: &str, topic: &str, alerts: &[blink::alert::Alert]) {
    let producer = blink::source::kafka::producer(brokers).unwrap();
    for a in alerts {
        let payload = blink::decode::native::encode_native(std::slice::from_ref(a)).unwrap();
        blink::source::kafka::publish(&producer, topic, &a.object_id, &payload).await.unwrap();
    }
}

/// Wait (at most two minutes) until `n` messages are done: every result delivered and acked.
pub async fn wait_done(metrics: &blink::metrics::Metrics, n: u64) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while blink::metrics::Metrics::get(&metrics.messages_done) < n {
        assert!(std::time::Instant::now() < deadline, "{} of {n} messages done", blink::metrics::Metrics::get(&metrics.messages_done));
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

//! Issue 6, outputs: the Kafka output topic through `blink serve`'s wiring (embedded cluster,
//! Avro in Confluent framing, keyed by object id, the schema id from a registry), and the
//! pipeline's rule for any `sink::Output`: a batch is acked only once every output took it, a
//! failing output is retried, and one that keeps failing leaves its batch unacknowledged.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use blink::config::Config;
use blink::decode::native::encode_native;
use blink::decode::Decoder;
use blink::engine::CpuEngine;
use blink::metrics::Metrics;
use blink::pipeline::{AckToken, Envelope, Pipeline};
use blink::proto::Detection;
use blink::service::{HistoryBackend, Service};
use blink::sim::{simulate_alerts, AlertSimConfig};
use blink::sink::grpc::Hub;
use blink::sink::kafka_out;
use blink::sink::Output;
use blink::source::kafka::EmbeddedKafka;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Message};

use crate::common::{publish_alerts, service_config, wait_done};

/// A registry that answers every `POST /subjects/<subject>/versions` with id 77 and records the
/// subjects and schemas it was given.
/// What the fake registry was asked: (path, body) per request.
type Requests = Arc<Mutex<Vec<(String, String)>>>;

fn fake_registry() -> (String, Requests) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().take(8) {
            let Ok(mut s) = stream else { continue };
            let mut buf = vec![0u8; 1 << 16];
            let mut n = 0;
            // Headers and the whole body (Content-Length).
            while let Ok(k) = s.read(&mut buf[n..]) {
                n += k;
                let text = String::from_utf8_lossy(&buf[..n]).to_string();
                if let Some(h) = text.find("\r\n\r\n") {
                    let len = text.lines().find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse::<usize>().unwrap_or(0))).unwrap_or(0);
                    if n >= h + 4 + len || k == 0 {
                        let path = text.split_whitespace().nth(1).unwrap_or("").to_string();
                        log.lock().unwrap().push((path, text[h + 4..].to_string()));
                        break;
                    }
                }
                if k == 0 {
                    break;
                }
            }
            let b = "{\"id\":77}";
            let _ = write!(s, "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{b}", b.len());
        }
    });
    (format!("http://{addr}"), seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_reach_the_output_topic_as_framed_avro_keyed_by_object() {
    let (input, output) = ("outputs-in".to_string(), "blink-detections".to_string());
    let embedded = EmbeddedKafka::start(&[input.clone(), output.clone()], 2).unwrap();
    let brokers = embedded.bootstrap_servers();
    let (registry, seen) = fake_registry();
    let mut cfg = service_config(&input);
    cfg.output.kafka_topic = output.clone();
    cfg.output.only_detected = false;
    cfg.output.schema_registry_url = Some(registry);
    let service = Service::start_with(&cfg, &brokers, HistoryBackend::Memory).await.unwrap();
    {
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 1, "registered once");
        assert_eq!(seen[0].0, format!("/subjects/{output}-value/versions"));
        let body: serde_json::Value = serde_json::from_str(&seen[0].1).unwrap();
        assert_eq!(body["schema"].as_str(), Some(kafka_out::SCHEMA_JSON));
    }

    let sims = simulate_alerts(9, 21, &AlertSimConfig::default());
    publish_alerts(&brokers, &input, &sims).await;
    wait_done(&service.metrics, sims.len() as u64).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    // Acked only after the output took them: every one is already on the topic.
    // Partitions assigned by hand: no group to join or leave (leaving waits for the session).
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("group.id", "outputs-reader")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut tpl = rdkafka::TopicPartitionList::new();
    for p in 0..2 {
        tpl.add_partition_offset(&output, p, rdkafka::Offset::Beginning).unwrap();
    }
    consumer.assign(&tpl).unwrap();
    let schema = kafka_out::schema();
    let mut got: Vec<(String, Detection)> = Vec::new();
    while got.len() < sims.len() && Instant::now() < deadline {
        let Some(m) = consumer.poll(Duration::from_millis(200)) else { continue };
        let m = m.unwrap();
        let (id, d) = kafka_out::decode(&schema, m.payload().unwrap()).unwrap();
        assert_eq!(id, 77, "the registry's schema id");
        got.push((String::from_utf8(m.key().unwrap().to_vec()).unwrap(), d));
    }
    let ids: BTreeSet<String> = got.iter().map(|(_, d)| d.id.clone()).collect();
    let want: BTreeSet<String> = sims.iter().map(|a| format!("native:{}", a.alert_id)).collect();
    assert_eq!(ids, want);
    assert_eq!(got.len(), sims.len(), "once each");
    for (key, d) in &got {
        assert_eq!(key, &d.object_id);
        assert!(d.score.is_finite() && d.flux_err > 0.0 && d.timescale == "epoch" && d.topic == input);
    }
    service.stop().await;
    drop(embedded);
}

/// An output that fails its first `fail_first` calls (every call when `usize::MAX`), and keeps
/// what it was given when it succeeds.
struct Flaky {
    fail_first: usize,
    calls: AtomicUsize,
    took: Mutex<Vec<u64>>,
}

#[tonic::async_trait]
impl Output for Flaky {
    fn name(&self) -> &str {
        "flaky"
    }

    async fn deliver(&self, detections: &[Arc<Detection>]) -> Result<(), String> {
        if self.calls.fetch_add(1, Ordering::SeqCst) < self.fail_first {
            return Err("endpoint down".into());
        }
        self.took.lock().unwrap().extend(detections.iter().map(|d| d.sequence));
        Ok(())
    }
}

fn pipeline(output: Arc<Flaky>) -> (Pipeline, Arc<Metrics>) {
    let mut cfg = Config::default();
    cfg.batch.max_wait_ms = 5;
    let metrics = Arc::new(Metrics::default());
    let decoder = Arc::new(Decoder::new(Default::default()).unwrap());
    let p = Pipeline::start_with_outputs(&cfg, decoder, Box::new(CpuEngine::new()), Hub::new(64), metrics.clone(), None, vec![output])
        .unwrap();
    (p, metrics)
}

async fn send(p: &Pipeline, n: usize) {
    for (i, a) in simulate_alerts(n, 5, &AlertSimConfig::default()).iter().enumerate() {
        let token = AckToken { topic: "t".into(), partition: 0, offset: i as i64 };
        p.input.send(Envelope { bytes: encode_native(std::slice::from_ref(a)).unwrap(), token }).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_output_is_retried_and_its_batch_acked_only_once_it_took_it() {
    let out = Arc::new(Flaky { fail_first: 2, calls: AtomicUsize::new(0), took: Mutex::new(Vec::new()) });
    let (p, metrics) = pipeline(out.clone());
    send(&p, 3).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while Metrics::get(&metrics.messages_done) < 3 {
        assert!(Instant::now() < deadline, "not acked after the output recovered");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(Metrics::get(&metrics.output_errors), 2);
    let mut took = out.took.lock().unwrap().clone();
    took.sort_unstable();
    assert_eq!(took, vec![1, 2, 3], "each detection handed over once it succeeded");
    p.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_output_that_keeps_failing_leaves_its_batch_unacknowledged() {
    let out = Arc::new(Flaky { fail_first: usize::MAX, calls: AtomicUsize::new(0), took: Mutex::new(Vec::new()) });
    let (p, metrics) = pipeline(out.clone());
    send(&p, 1).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while Metrics::get(&metrics.output_errors) < 6 {
        assert!(Instant::now() < deadline, "retries not made");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    p.finish().await;
    assert_eq!(Metrics::get(&metrics.results_out), 1, "published to gRPC");
    assert_eq!(Metrics::get(&metrics.messages_done), 0, "but not acknowledged: read again after a restart");
}

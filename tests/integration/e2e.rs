//! End to end through the embedded Kafka cluster, the engine on the running adapter, and a real
//! gRPC client: one result per input alert, dead letters for bad input, offsets committed.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use blink::cli::demo::{run_demo, DemoArgs};
use blink::cli::EngineArgs;
use blink::config::Config;
use blink::decode::Decoder;
use blink::metrics::Metrics;
use blink::proto::blink_client::BlinkClient;
use blink::proto::{StatusRequest, SubscribeRequest};
use blink::service::{HistoryBackend, Service};
use blink::sim::{simulate_alerts, AlertSimConfig};
use blink::source::kafka::{self, EmbeddedKafka};
use blink::source::replay::fixture_messages;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::ClientConfig;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_gives_one_result_per_alert_through_kafka_and_grpc() {
    let args = DemoArgs {
        kafka: "embedded".into(),
        topic: "e2e-demo".into(),
        simulated: 12,
        seed: rand_seed(),
        timeout: 240,
        quiet: true,
        engine: EngineArgs { engine: None },
    };
    let report = run_demo(&args).await.expect("demo runs");

    // What the demo published, decoded directly: the alerts that must come out, once each.
    let decoder = Decoder::new(Default::default()).unwrap();
    let mut expected = BTreeSet::new();
    let mut expected_dead = 0u64;
    for m in fixture_messages(&decoder).unwrap() {
        for r in decoder.decode_message(&m.payload) {
            match r {
                Ok(a) => {
                    expected.insert(format!("{}:{}", a.survey, a.alert_id));
                }
                Err(_) => expected_dead += 1,
            }
        }
    }
    for a in simulate_alerts(args.simulated, args.seed, &AlertSimConfig::default()) {
        expected.insert(format!("native:{}", a.alert_id));
    }
    // 134 real ZTF alerts, 7 real Rubin alerts, the simulated ones.
    let ztf = expected.iter().filter(|id| id.starts_with("ztf:")).count();
    let rubin = expected.iter().filter(|id| id.starts_with("rubin:")).count();
    assert_eq!((ztf, rubin), (134, 7));

    let received: Vec<String> = report.received.iter().map(|d| d.id.clone()).collect();
    let unique: BTreeSet<String> = received.iter().cloned().collect();
    assert_eq!(unique.len(), received.len(), "a result arrived twice");
    // Every alert gives a result or a dead letter; the fixtures' alerts all give results.
    assert_eq!(unique, expected, "results differ from the published alerts");
    assert_eq!(report.results_out as usize, received.len());
    // Dead letters: the 3 official fake Rubin alerts (null cutouts) + 3 deliberately bad messages.
    assert_eq!(report.dead_letter_total(), expected_dead + 3, "{:?}", report.dead_letters);
    assert_eq!(report.dead_letters.get("empty"), Some(&1));
    assert_eq!(report.dead_letters.get("magic"), Some(&1));
    assert_eq!(report.alerts_in, report.results_out + report.dead_letter_total());
    // Scores are real numbers, and bright simulated transients are detected.
    assert!(report.received.iter().all(|d| d.score.is_finite() && d.flux_err > 0.0));
    let bright_sims = report
        .received
        .iter()
        .filter(|d| d.survey == "native" && d.survey_snr >= 15.0)
        .collect::<Vec<_>>();
    assert!(bright_sims.iter().all(|d| d.detected), "bright simulated transient missed");
}

fn rand_seed() -> u64 {
    let s = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64;
    eprintln!("simulated alert seed: {s}");
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offsets_are_committed_after_delivery_and_status_counts_dead_letters() {
    let topic = "e2e-commit".to_string();
    let embedded = EmbeddedKafka::start(std::slice::from_ref(&topic), 2).unwrap();
    let brokers = embedded.bootstrap_servers();
    let mut cfg = Config::default();
    cfg.kafka.topics = vec![topic.clone()];
    cfg.kafka.group_id = "e2e-commit-group".into();
    cfg.grpc.listen = "127.0.0.1:0".into();
    cfg.batch.max_alerts = 4;
    cfg.engine.prefer = "cpu".into();
    let service = Service::start_with(&cfg, &brokers, HistoryBackend::Memory).await.unwrap();
    let mut client = BlinkClient::connect(format!("http://{}", service.grpc_addr)).await.unwrap();
    // A filtered subscriber: only ZTF... of which there are none here, so it gets nothing.
    let mut ztf_only = client
        .subscribe(SubscribeRequest { surveys: vec!["ztf".into()], ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    let mut all = client
        .subscribe(SubscribeRequest::default())
        .await
        .unwrap()
        .into_inner();

    let producer = kafka::producer(&brokers).unwrap();
    let sims = simulate_alerts(10, 5, &AlertSimConfig::default());
    for a in &sims {
        let payload = blink::decode::native::encode_native(std::slice::from_ref(a)).unwrap();
        kafka::publish(&producer, &topic, &a.object_id, &payload).await.unwrap();
    }
    kafka::publish(&producer, &topic, "bad", b"").await.unwrap();
    kafka::publish(&producer, &topic, "bad2", &[0x00, 0, 0, 0x27, 0x0f, 1, 2, 3]).await.unwrap();
    let published = sims.len() + 2;

    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while got.len() < sims.len() {
        let d = tokio::time::timeout_at(deadline.into(), all.message()).await.expect("results in time");
        got.push(d.unwrap().unwrap());
    }
    while (Metrics::get(&service.metrics.messages_done) as usize) < published {
        assert!(Instant::now() < deadline, "messages not all done");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let status = client.status(StatusRequest {}).await.unwrap().into_inner();
    assert_eq!(status.alerts_in, published as u64);
    assert_eq!(status.detections_out, sims.len() as u64);
    assert_eq!(status.dead_letters.get("empty"), Some(&1));
    assert_eq!(status.dead_letters.get("schema_id"), Some(&1));
    assert_eq!(status.subscribers, 2);
    // Sequence numbers increase.
    assert!(got.windows(2).all(|w| w[0].sequence < w[1].sequence));
    // The filtered subscriber received nothing (no ZTF input here).
    assert!(tokio::time::timeout(Duration::from_millis(300), ztf_only.message()).await.is_err());
    // A subscriber whose connection dropped after the fourth result resumes from it, over the
    // wire: the rest, in order, once.
    let mut resumed = client
        .subscribe(SubscribeRequest { after_sequence: Some(got[3].sequence), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    let mut again = Vec::new();
    while again.len() < got.len() - 4 {
        let d = tokio::time::timeout_at(deadline.into(), resumed.message()).await.expect("replayed in time");
        again.push(d.unwrap().unwrap().sequence);
    }
    assert_eq!(again, got[4..].iter().map(|d| d.sequence).collect::<Vec<_>>());
    let gone = client.subscribe(SubscribeRequest { after_sequence: Some(1_000_000), ..Default::default() }).await;
    assert_eq!(gone.err().map(|s| s.code()), Some(tonic::Code::FailedPrecondition));
    // Lag per partition, from librdkafka's statistics (every 5 s): both partitions, nothing
    // left to read once everything is committed.
    let lag_deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let lag = client.status(StatusRequest {}).await.unwrap().into_inner().lag;
        let want = [format!("{topic}/0"), format!("{topic}/1")];
        if want.iter().all(|k| lag.get(k) == Some(&0)) {
            break;
        }
        assert!(Instant::now() < lag_deadline, "lag per partition not reported as caught up: {lag:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    service.stop().await;

    // After a clean stop, the group's committed offsets reach the end of every partition.
    let check: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("group.id", "e2e-commit-group")
        .create()
        .unwrap();
    let mut tpl = rdkafka::TopicPartitionList::new();
    tpl.add_partition(&topic, 0);
    tpl.add_partition(&topic, 1);
    let committed = check.committed_offsets(tpl, Duration::from_secs(10)).unwrap();
    let mut total = 0i64;
    for p in 0..2 {
        let (_low, high) = check.fetch_watermarks(&topic, p, Duration::from_secs(10)).unwrap();
        let c = committed.find_partition(&topic, p).unwrap().offset();
        let c = match c {
            rdkafka::Offset::Offset(o) => o,
            rdkafka::Offset::Invalid if high == 0 => 0,
            other => panic!("partition {p}: committed {other:?}, high watermark {high}"),
        };
        assert_eq!(c, high, "partition {p}");
        total += c;
    }
    assert_eq!(total as usize, published);
    drop(embedded);
}

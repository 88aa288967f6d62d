//! Issue 6, "done when", end to end on loopback: embedded Kafka → `blink serve`'s service (a
//! redb history store in a temporary folder) → two gRPC subscribers with different filters and
//! a Slack stand-in that answers 500 to its first three requests. Every detection reaches each
//! subscriber whose filter matches, in order, once; every notification the rule calls for
//! arrives once after the retries; a subscriber that reconnects with its last sequence number
//! gets what it missed, also across a restart (the ring kept in the history store);
//! notifications pending in the outbox when the service stops are delivered after it starts
//! again.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use blink::alert::Alert;
use blink::proto::blink_client::BlinkClient;
use blink::proto::{Detection, StatusRequest, SubscribeRequest};
use blink::service::{HistoryBackend, Service};
use blink::sim::{simulate_alerts, AlertSimConfig};
use blink::source::kafka::EmbeddedKafka;
use tonic::Streaming;

use crate::common::{publish_alerts, service_config, wait_done};
use crate::notify::{fast, server, slack_rule, temp_dir, wait_for, Answer};

const RULE: &str = "abs_score >= 5 && timescale == \"epoch\"";

/// `n` simulated alerts of wave `wave`, ids unique across waves; bright ones (SNR 8–30) when
/// `bright`, else the default mix.
fn wave(wave: usize, n: usize, bright: bool) -> Vec<Alert> {
    let cfg = if bright { AlertSimConfig { snr_range: (8.0, 30.0), quiet_fraction: 0.0, ..Default::default() } } else { AlertSimConfig::default() };
    simulate_alerts(n, 100 + wave as u64, &cfg)
        .into_iter()
        .enumerate()
        .map(|(i, mut a)| {
            a.alert_id = format!("w{wave}-a{i}");
            a.object_id = format!("w{wave}-o{i}");
            a
        })
        .collect()
}

/// Exactly `n` detections from `s`, then nothing more for a moment.
async fn take(s: &mut Streaming<Detection>, n: usize, what: &str) -> Vec<Detection> {
    let mut out = Vec::new();
    while out.len() < n {
        let d = tokio::time::timeout(Duration::from_secs(30), s.message()).await.unwrap_or_else(|_| panic!("{what}: {} of {n}", out.len()));
        out.push(d.unwrap().unwrap());
    }
    assert!(tokio::time::timeout(Duration::from_millis(300), s.message()).await.is_err(), "{what}: more than {n}");
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn detections_reach_subscribers_and_slack_once_even_across_a_restart() {
    let topic = "delivery".to_string();
    let embedded = EmbeddedKafka::start(std::slice::from_ref(&topic), 2).unwrap();
    let brokers = embedded.bootstrap_servers();
    // Slack stand-in: 500 to the first three requests; 503 while `down`; else 200.
    let (requests, down) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicBool::new(false)));
    let answer: Answer = {
        let (requests, down) = (requests.clone(), down.clone());
        Arc::new(move |_, _| {
            let k = requests.fetch_add(1, Ordering::SeqCst);
            if k < 3 {
                500
            } else if down.load(Ordering::SeqCst) {
                503
            } else {
                200
            }
        })
    };
    let (url, log) = server(answer).await;
    let dir = temp_dir("delivery");
    let mut cfg = service_config(&topic);
    cfg.history.path = dir.join("history.redb");
    cfg.notify = fast(vec![slack_rule(&url, RULE)]);
    let service = Service::start_with(&cfg, &brokers, HistoryBackend::File).await.unwrap();
    let addr = format!("http://{}", service.grpc_addr);
    let mut client = BlinkClient::connect(addr.clone()).await.unwrap();

    // Two subscribers with different filters.
    let bright_req = SubscribeRequest { min_score: 5.0, ..Default::default() };
    let mut bright = client.subscribe(bright_req.clone()).await.unwrap().into_inner();
    let w1 = wave(1, 10, false);
    let some: Vec<String> = w1.iter().step_by(3).map(|a| a.object_id.clone()).collect();
    let mut objects = client.subscribe(SubscribeRequest { object_ids: some.clone(), ..Default::default() }).await.unwrap().into_inner();
    publish_alerts(&brokers, &topic, &w1).await;
    wait_done(&service.metrics, w1.len() as u64).await;

    // What was produced, from the ring; what each filter lets through of it.
    let mut all = client.subscribe(SubscribeRequest { after_sequence: Some(0), ..Default::default() }).await.unwrap().into_inner();
    let produced = take(&mut all, w1.len(), "everything").await;
    let want_bright: Vec<u64> = produced.iter().filter(|d| d.score.abs() >= 5.0).map(|d| d.sequence).collect();
    let want_objects: Vec<u64> = produced.iter().filter(|d| some.contains(&d.object_id)).map(|d| d.sequence).collect();
    assert!(want_bright.len() >= 3, "too few bright detections to test: {}", want_bright.len());
    let seqs = |v: &[Detection]| v.iter().map(|d| d.sequence).collect::<Vec<_>>();
    // The bright subscriber reads part of its stream, then its connection drops.
    let first = take_some(&mut bright, 2).await;
    drop(bright);
    let got_objects = take(&mut objects, want_objects.len(), "object filter").await;
    assert_eq!(seqs(&got_objects), want_objects, "in order, once each");

    // More alerts while it is away; it reconnects after the last sequence it had.
    let w2 = wave(2, 6, true);
    publish_alerts(&brokers, &topic, &w2).await;
    wait_done(&service.metrics, (w1.len() + w2.len()) as u64).await;
    let mut again = client
        .subscribe(SubscribeRequest { after_sequence: Some(first.last().unwrap().sequence), ..bright_req.clone() })
        .await
        .unwrap()
        .into_inner();
    let mut all2 = client.subscribe(SubscribeRequest { after_sequence: Some(produced.last().unwrap().sequence), ..Default::default() }).await.unwrap().into_inner();
    let produced2 = take(&mut all2, w2.len(), "second wave").await;
    let mut want_rest: Vec<u64> = want_bright.iter().copied().filter(|s| *s > first.last().unwrap().sequence).collect();
    want_rest.extend(produced2.iter().filter(|d| d.score.abs() >= 5.0).map(|d| d.sequence));
    let rest = take(&mut again, want_rest.len(), "resumed").await;
    assert_eq!(seqs(&first), want_bright[..2].to_vec());
    assert_eq!(seqs(&rest), want_rest, "what it missed, in order, once, then the live stream");

    // Slack: one message per epoch detection with |score| >= 5, after three 500s.
    let notified: Vec<&Detection> = produced.iter().chain(&produced2).filter(|d| d.score.abs() >= 5.0 && d.timescale == "epoch").collect();
    let ok = |log: &std::sync::Mutex<Vec<crate::notify::Received>>| log.lock().unwrap().iter().filter(|r| r.status == 200).count();
    wait_for(|| ok(&log) >= notified.len(), "slack notifications").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let per_object = |log: &std::sync::Mutex<Vec<crate::notify::Received>>| {
        let mut m: BTreeMap<String, usize> = BTreeMap::new();
        for r in log.lock().unwrap().iter().filter(|r| r.status == 200) {
            let body = String::from_utf8_lossy(&r.body).to_string();
            let obj = body.split(|c: char| !(c.is_ascii_alphanumeric() || c == '-')).find(|w| w.starts_with('w') && w.contains("-o")).unwrap_or("?").to_string();
            *m.entry(obj).or_insert(0) += 1;
        }
        m
    };
    let counts = per_object(&log);
    for d in &notified {
        assert_eq!(counts.get(&d.object_id), Some(&1), "{}: {counts:?}", d.object_id);
    }
    assert_eq!(counts.values().sum::<usize>(), notified.len(), "{counts:?}");
    assert!(log.lock().unwrap().iter().filter(|r| r.status == 500).count() == 3);

    // The endpoint goes down; a third wave queues notifications; the service stops with them
    // pending in the outbox.
    down.store(true, Ordering::SeqCst);
    let w3 = wave(3, 5, true);
    publish_alerts(&brokers, &topic, &w3).await;
    let total = (w1.len() + w2.len() + w3.len()) as u64;
    wait_done(&service.metrics, total).await;
    let mut all3 = client.subscribe(SubscribeRequest { after_sequence: Some(produced2.last().unwrap().sequence), ..Default::default() }).await.unwrap().into_inner();
    let produced3 = take(&mut all3, w3.len(), "third wave").await;
    let mut want3: Vec<String> = produced3.iter().filter(|d| d.score.abs() >= 5.0).map(|d| d.object_id.clone()).collect();
    want3.sort();
    assert!(!want3.is_empty());
    let st = client.status(StatusRequest {}).await.unwrap().into_inner().notify.unwrap();
    assert_eq!(st.queued as usize, notified.len() + want3.len(), "{st:?}");
    service.stop().await;
    let before = ok(&log);
    assert!(per_object(&log).keys().all(|k| !k.starts_with("w3-")), "nothing of the third wave got through while down");
    down.store(false, Ordering::SeqCst);

    // Started again on the same store and group: the pending notifications go out, once.
    let service = Service::start_with(&cfg, &brokers, HistoryBackend::File).await.unwrap();
    let mut client = BlinkClient::connect(format!("http://{}", service.grpc_addr)).await.unwrap();
    wait_for(|| ok(&log) >= before + want3.len(), "notifications after the restart").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let counts = per_object(&log);
    let got3: Vec<String> = counts.keys().filter(|k| k.starts_with("w3-")).cloned().collect();
    assert_eq!(got3, want3);
    assert!(counts.values().all(|c| *c == 1), "each object once: {counts:?}");
    let st = client.status(StatusRequest {}).await.unwrap().into_inner();
    assert_eq!(st.alerts_in, 0, "nothing read again: the first run committed everything");

    // A subscriber resumes across the restart: the ring came back from the history store.
    let mut across = client
        .subscribe(SubscribeRequest { after_sequence: Some(produced[2].sequence), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    let want_across: Vec<u64> = produced[3..].iter().chain(&produced2).chain(&produced3).map(|d| d.sequence).collect();
    let got = take(&mut across, want_across.len(), "resumed across the restart").await;
    assert_eq!(seqs(&got), want_across);
    service.stop().await;
    drop(embedded);
    let _ = std::fs::remove_dir_all(dir);
}

/// The first `n` detections of `s`.
async fn take_some(s: &mut Streaming<Detection>, n: usize) -> Vec<Detection> {
    let mut out = Vec::new();
    while out.len() < n {
        out.push(tokio::time::timeout(Duration::from_secs(30), s.message()).await.unwrap().unwrap().unwrap());
    }
    out
}

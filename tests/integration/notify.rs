//! Issue 6 (part 3): notifiers over real HTTP on 127.0.0.1. A Slack stand-in that fails the
//! first three attempts; a webhook receiver checking the HMAC signature; a restart with
//! notifications queued while the endpoint was down; a redelivered detection.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use blink::config::Secret;
use blink::history::{HistoryConfig, HistoryStore, MemoryHistory, RedbHistory};
use blink::notify::message::signature;
use blink::notify::{Notifier, NotifyConfig, RuleConfig, SlackConfig, WebhookConfig};
use blink::proto::Detection;
use blink::sink::Output;
use rand::Rng;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::watch;

/// One request the stand-in server received and what it answered.
#[derive(Debug, Clone)]
pub(crate) struct Received {
    pub(crate) headers: HashMap<String, String>,
    pub(crate) body: Vec<u8>,
    pub(crate) status: u16,
}

pub(crate) type Answer = Arc<dyn Fn(&HashMap<String, String>, &[u8]) -> u16 + Send + Sync>;

/// A minimal HTTP/1.1 server on 127.0.0.1: one request per connection, `answer` picks the
/// status; every request is logged.
pub(crate) async fn server(answer: Answer) -> (String, Arc<Mutex<Vec<Received>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook/path", listener.local_addr().unwrap());
    let log = Arc::new(Mutex::new(Vec::new()));
    let log2 = log.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else { return };
            let (answer, log) = (answer.clone(), log2.clone());
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                let head_end = loop {
                    if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        break p + 4;
                    }
                    match sock.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                };
                let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
                let headers: HashMap<String, String> = head
                    .lines()
                    .skip(1)
                    .filter_map(|l| l.split_once(':'))
                    .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
                    .collect();
                let len: usize = headers.get("content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
                while buf.len() < head_end + len {
                    match sock.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let body = buf[head_end..head_end + len].to_vec();
                let status = answer(&headers, &body);
                log.lock().unwrap().push(Received { headers, body, status });
                let resp = format!("HTTP/1.1 {status} X\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
                let _ = sock.write_all(resp.as_bytes()).await;
                let _ = sock.shutdown().await;
            });
        }
    });
    (url, log)
}

pub(crate) fn fast(rules: Vec<RuleConfig>) -> NotifyConfig {
    NotifyConfig { rules, first_wait_ms: 20, max_wait_ms: 100, timeout_ms: 5_000, ..Default::default() }
}

pub(crate) fn slack_rule(url: &str, when: &str) -> RuleConfig {
    RuleConfig {
        name: "slack-bright".into(),
        when: when.into(),
        rate_per_minute: 0,
        slack: Some(SlackConfig {
            url: Secret::new(url),
            link_template: Some("https://fink-portal.org/{object_id}".into()),
        }),
        webhook: None,
    }
}

fn webhook_rule(url: &str, key: &str) -> RuleConfig {
    RuleConfig {
        name: "hook".into(),
        when: "abs_score >= 5".into(),
        rate_per_minute: 0,
        slack: None,
        webhook: Some(WebhookConfig {
            url: url.into(),
            secret: Some(Secret::new(key)),
            headers: [("X-Team".to_string(), "transients".to_string())].into(),
            ..Default::default()
        }),
    }
}

fn detections(rng: &mut impl Rng, n: usize) -> Vec<Arc<Detection>> {
    (0..n)
        .map(|i| {
            Arc::new(Detection {
                survey: "ztf".into(),
                alert_id: rng.gen::<u64>().to_string(),
                object_id: format!("ZTF{i}x{}", rng.gen::<u32>()),
                ra: rng.gen_range(0.0..360.0),
                dec: rng.gen_range(-90.0..90.0),
                band: "r".into(),
                score: rng.gen_range(-15.0..15.0),
                timescale: ["epoch", "stack:3n"][rng.gen_range(0..2)].into(),
                survey_snr: f64::NAN,
                ..Default::default()
            })
        })
        .collect()
}

pub(crate) async fn wait_for(mut done: impl FnMut() -> bool, what: &str) {
    for _ in 0..600 {
        if done() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}

pub(crate) fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("blink-notify-it-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Slack stand-in answers 500 three times, then 200: every notification the rule calls for
/// arrives exactly once; a redelivered batch notifies nothing more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slack_notifications_arrive_once_after_server_errors() {
    let mut rng = crate::common::seeded(module_path!());
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let (url, log) = server(Arc::new(move |_, _| if c.fetch_add(1, Ordering::SeqCst) < 3 { 500 } else { 200 })).await;
    let store = Arc::new(MemoryHistory::new(&HistoryConfig::default()).unwrap());
    let n =
        Arc::new(Notifier::new(&fast(vec![slack_rule(&url, "score >= 5")]), store.clone().outbox().unwrap()).unwrap());
    let (stop, rx) = watch::channel(false);
    let run = tokio::spawn(n.clone().run(rx));
    let batch = detections(&mut rng, 30);
    let want: Vec<&str> = batch.iter().filter(|d| d.score >= 5.0).map(|d| d.object_id.as_str()).collect();
    n.deliver(&batch[..15]).await.unwrap();
    n.deliver(&batch[15..]).await.unwrap();
    wait_for(|| n.stats().delivered == want.len() as u64, "deliveries").await;
    // Redelivery of the same alerts: deduplicated, nothing sent.
    n.deliver(&batch).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _ = stop.send(true);
    run.await.unwrap();

    let log = log.lock().unwrap();
    let mut got: BTreeMap<String, usize> = BTreeMap::new();
    for r in log.iter().filter(|r| r.status == 200) {
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        let text = v["text"].as_str().unwrap();
        let object = want.iter().find(|o| text.contains(*o)).unwrap_or_else(|| panic!("unexpected {text}"));
        *got.entry(object.to_string()).or_default() += 1;
        assert!(v["blocks"].to_string().contains(&format!("https://fink-portal.org/{object}")));
        assert_eq!(r.headers.get("content-type").map(String::as_str), Some("application/json"));
    }
    assert_eq!(got.len(), want.len(), "{got:?}");
    assert!(got.values().all(|c| *c == 1), "{got:?}");
    assert_eq!(log.iter().filter(|r| r.status == 500).count(), if want.is_empty() { 0 } else { 3.min(log.len()) });
    let s = n.stats();
    assert_eq!((s.delivered, s.pending, s.failed), (want.len() as u64, 0, 0));
    assert_eq!(s.deduplicated, want.len() as u64);
    assert!(s.retried >= 3.min(want.len() as u64));
}

/// The webhook receiver verifies `X-Blink-Signature` over the body it got; a 4xx is a
/// permanent failure, not retried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_bodies_are_signed_and_a_4xx_is_not_retried() {
    let mut rng = crate::common::seeded(module_path!());
    let key: String = (0..24).map(|_| rng.gen_range('a'..='z')).collect();
    let k = key.clone();
    let (url, log) = server(Arc::new(move |h: &HashMap<String, String>, body: &[u8]| {
        let ok = h.get("x-blink-signature") == Some(&signature(k.as_bytes(), body));
        let v: serde_json::Value = serde_json::from_slice(body).unwrap();
        // One object is refused for good.
        if v["object_id"].as_str().is_some_and(|o| o.starts_with("ZTF0x")) {
            404
        } else if ok {
            204
        } else {
            401
        }
    }))
    .await;
    let store = Arc::new(MemoryHistory::new(&HistoryConfig::default()).unwrap());
    let n = Arc::new(Notifier::new(&fast(vec![webhook_rule(&url, &key)]), store.clone().outbox().unwrap()).unwrap());
    let (stop, rx) = watch::channel(false);
    let run = tokio::spawn(n.clone().run(rx));
    let batch = detections(&mut rng, 40);
    let want = batch.iter().filter(|d| d.score.abs() >= 5.0).count() as u64;
    let refused = batch.iter().filter(|d| d.score.abs() >= 5.0 && d.object_id.starts_with("ZTF0x")).count() as u64;
    n.deliver(&batch).await.unwrap();
    wait_for(|| n.stats().delivered + n.stats().failed == want, "deliveries").await;
    let _ = stop.send(true);
    run.await.unwrap();
    let log = log.lock().unwrap();
    assert_eq!(log.len() as u64, want, "each sent once, the 404 not retried");
    assert!(log.iter().all(|r| r.status != 401), "a bad signature");
    assert!(log.iter().all(|r| r.headers.get("x-team").map(String::as_str) == Some("transients")));
    assert_eq!((n.stats().delivered, n.stats().failed, n.stats().retried), (want - refused, refused, 0));
}

/// Notifications queued while the endpoint is down survive dropping the notifier and the
/// store; after reopening the file they are delivered, and a redelivered detection does not
/// notify again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_delivers_what_was_queued_during_an_outage() {
    let mut rng = crate::common::seeded(module_path!());
    let dir = temp_dir("restart");
    let hc = HistoryConfig::at(dir.join("history.redb"));
    let down = Arc::new(AtomicBool::new(true));
    let d2 = down.clone();
    let (url, log) = server(Arc::new(move |_, _| if d2.load(Ordering::SeqCst) { 503 } else { 200 })).await;
    let cfg = fast(vec![slack_rule(&url, "abs_score >= 3")]);
    let batch = detections(&mut rng, 20);
    let want = batch.iter().filter(|d| d.score.abs() >= 3.0).count() as u64;
    {
        let store: Arc<dyn HistoryStore> = Arc::new(RedbHistory::open(&hc).unwrap());
        let n = Arc::new(Notifier::new(&cfg, store.clone().outbox().unwrap()).unwrap());
        let (stop, rx) = watch::channel(false);
        let run = tokio::spawn(n.clone().run(rx));
        n.deliver(&batch).await.unwrap();
        assert_eq!(n.stats().queued, want);
        if want > 0 {
            wait_for(|| n.stats().retried >= want, "failed attempts").await;
        }
        let _ = stop.send(true);
        run.await.unwrap();
        assert_eq!((n.stats().delivered, n.stats().pending), (0, want));
    }
    // Everything dropped: the file is closed and can be opened again.
    down.store(false, Ordering::SeqCst);
    let store: Arc<dyn HistoryStore> = Arc::new(RedbHistory::open(&hc).unwrap());
    let n = Arc::new(Notifier::new(&cfg, store.clone().outbox().unwrap()).unwrap());
    assert_eq!(n.stats().pending, want);
    let (stop, rx) = watch::channel(false);
    let run = tokio::spawn(n.clone().run(rx));
    wait_for(|| n.stats().delivered == want, "deliveries after the restart").await;
    n.deliver(&batch).await.unwrap();
    assert_eq!(n.stats().deduplicated, want);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _ = stop.send(true);
    run.await.unwrap();
    let ok = log.lock().unwrap().iter().filter(|r| r.status == 200).count() as u64;
    assert_eq!(ok, want);
    assert_eq!(n.stats().pending, 0);
    drop(n);
    drop(store);
    let _ = std::fs::remove_dir_all(dir);
}

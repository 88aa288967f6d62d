//! The notifier on the in-memory outbox: rule errors at start-up, dedup, the request sent.

use std::sync::Arc;

use rand::Rng;

use super::*;
use crate::history::{HistoryConfig, MemoryHistory};

fn outbox() -> Arc<MemoryHistory> {
    Arc::new(MemoryHistory::new(&HistoryConfig::default()).unwrap())
}

fn slack_rule(name: &str, when: &str) -> RuleConfig {
    RuleConfig {
        name: name.into(),
        when: when.into(),
        rate_per_minute: 60,
        slack: Some(SlackConfig {
            url: Secret::new("https://hooks.slack.com/services/T0/B0/XYZ"),
            link_template: None,
        }),
        webhook: None,
    }
}

fn config(rules: Vec<RuleConfig>) -> NotifyConfig {
    NotifyConfig { rules, ..Default::default() }
}

fn detection(rng: &mut impl Rng, object: &str, timescale: &str, score: f64) -> Arc<Detection> {
    Arc::new(Detection {
        survey: "ztf".into(),
        alert_id: rng.gen::<u64>().to_string(),
        object_id: object.into(),
        timescale: timescale.into(),
        score,
        band: "g".into(),
        ra: rng.gen_range(0.0..360.0),
        dec: rng.gen_range(-90.0..90.0),
        survey_snr: f64::NAN,
        ..Default::default()
    })
}

#[test]
fn bad_rules_fail_at_start_naming_the_rule() {
    for (when, want) in [("score >=", "when"), ("scroe > 3", "unknown variable `scroe`"), ("score * 2", "Boolean")] {
        let e = Notifier::new(&config(vec![slack_rule("r-bad", when)]), outbox()).unwrap_err().to_string();
        assert!(e.contains("r-bad") && e.contains(want), "{e}");
        assert!(!e.contains("XYZ"), "secret in {e}");
    }
    let mut r = slack_rule("hook", "true");
    r.slack = None;
    r.webhook = Some(WebhookConfig {
        url: "http://127.0.0.1:1/x".into(),
        body: Some("{\"a\": {object_id}}".into()),
        ..Default::default()
    });
    let e = Notifier::new(&config(vec![r]), outbox()).unwrap_err().to_string();
    assert!(e.contains("hook") && e.contains("not JSON"), "{e}");
    let mut r = slack_rule("link", "true");
    r.slack = Some(SlackConfig { url: Secret::new("https://h/x"), link_template: Some("https://x/{objectid}".into()) });
    assert!(Notifier::new(&config(vec![r]), outbox()).unwrap_err().to_string().contains("link_template"));
}

#[tokio::test]
async fn matches_are_queued_once_per_rule_object_and_timescale() {
    let mut rng = crate::testing::rng();
    let store = outbox();
    let n = Notifier::new(
        &config(vec![slack_rule("bright", "abs_score >= 8"), slack_rule("stacks", "stack && score > 0")]),
        store.clone(),
    )
    .unwrap();
    // Random detections of a few objects and timescales, some repeated.
    let objects = ["ZTF1", "ZTF2", "ZTF3", ""];
    let timescales = ["epoch", "stack:1n", "stack:3n"];
    let mut want = std::collections::BTreeSet::new();
    let mut matches = 0u64;
    for _ in 0..20 {
        let batch: Vec<Arc<Detection>> = (0..rng.gen_range(0..10))
            .map(|_| {
                let o = objects[rng.gen_range(0..objects.len())];
                let (t, score) = (timescales[rng.gen_range(0..3)], rng.gen_range(-20.0..20.0));
                detection(&mut rng, o, t, score)
            })
            .collect();
        for d in &batch {
            for rule in n.matching(d) {
                matches += 1;
                want.insert((rule.to_string(), dedup_key(d)));
            }
        }
        n.deliver(&batch).await.unwrap();
    }
    let s = n.stats();
    assert_eq!(s.queued, want.len() as u64);
    assert_eq!(s.queued + s.deduplicated, matches);
    assert_eq!(s.pending, want.len() as u64);
    let due = store.due_notifications(u64::MAX - 1, 10_000).unwrap();
    let got: std::collections::BTreeSet<(String, String)> =
        due.iter().map(|p| (p.rule.clone(), dedup_key(&Detection::decode(&p.payload[..]).unwrap()))).collect();
    assert_eq!(got, want);
    assert_eq!(due.len(), want.len());
}

#[test]
fn webhook_request_is_signed_over_the_body_sent_and_keeps_secrets_out_of_debug() {
    let mut rng = crate::testing::rng();
    // At least 16 letters: a key of one or two letters is in any Debug text, so the check
    // below failed about one run in twenty for no fault of the code.
    let key: String = (0..rng.gen_range(16..40)).map(|_| rng.gen_range('a'..='z')).collect();
    let mut r = slack_rule("hook", "true");
    r.slack = None;
    r.webhook = Some(WebhookConfig {
        url: "http://127.0.0.1:1/x".into(),
        body: None,
        headers: [("X-Team".to_string(), "t".to_string())].into(),
        secret_headers: [("Authorization".to_string(), Secret::new("Bearer sekrit"))].into(),
        secret: Some(Secret::new(key.clone())),
    });
    let n = Notifier::new(&config(vec![r]), outbox()).unwrap();
    for _ in 0..20 {
        let score = rng.gen_range(-9.0..9.0);
        let d = detection(&mut rng, "ZTF\"x\\", "stack:3n", score);
        let req = n.request_for("hook", &d).unwrap();
        let sig = req.headers.iter().find(|(k, _)| k == "X-Blink-Signature").unwrap().1.clone();
        assert_eq!(sig, message::signature(key.as_bytes(), &req.body));
        let v: serde_json::Value = serde_json::from_slice(&req.body).unwrap();
        assert_eq!(v["object_id"], "ZTF\"x\\");
        assert_eq!(v["rule"], "hook");
        assert!(req.headers.contains(&("Authorization".into(), "Bearer sekrit".into())));
        assert!(req.headers.contains(&("X-Team".into(), "t".into())));
    }
    let dbg = format!("{:?}", n.rules);
    assert!(!dbg.contains("sekrit") && !dbg.contains(&key), "{dbg}");
}

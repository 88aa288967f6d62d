//! `[notify]`: the notification rules, their notifiers, and how delivery retries
//! (`docs/notifications.md` is the reference).

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::config::Secret;

use super::NotifyError;

/// Notifications (`docs/notifications.md`). No rules: nothing is sent.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct NotifyConfig {
    /// The rules, each a condition on a detection and where to send it (`[[notify.rules]]`).
    pub rules: Vec<RuleConfig>,
    /// Wait before the second attempt, ms; each later wait doubles up to `max_wait_ms`, and
    /// the actual wait is drawn uniformly between 0 and that ("full jitter").
    pub first_wait_ms: u64,
    /// Longest wait between two attempts, ms (a `Retry-After` from the receiver may ask for
    /// more, up to one hour).
    pub max_wait_ms: u64,
    /// Give up on a notification after this many failed attempts (0: no limit; `max_age_secs`
    /// still applies).
    pub max_attempts: u32,
    /// Give up on a notification that is still failing this many seconds after it was queued
    /// (0: no limit). Waiting for a rate limit never gives up.
    pub max_age_secs: u64,
    /// Time limit of one HTTP request (connect, send, answer), ms.
    pub timeout_ms: u64,
    /// Requests in flight at once, all rules together.
    pub concurrency: usize,
    /// How long a (rule, object, timescale) key is remembered, days: within it the same object
    /// and timescale notifies once per rule. 0: forever.
    pub dedup_days: f64,
}

impl Default for NotifyConfig {
    fn default() -> Self {
        NotifyConfig {
            rules: Vec::new(),
            first_wait_ms: 1_000,
            max_wait_ms: 300_000,
            max_attempts: 0,
            max_age_secs: 2 * 86_400,
            timeout_ms: 10_000,
            concurrency: 4,
            dedup_days: 365.0,
        }
    }
}

/// One rule: when a detection matches `when`, the notifier gets it, once per object and
/// timescale.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RuleConfig {
    /// Unique name, in logs and metrics and the webhook body (letters, digits, `-`, `_`, `.`).
    pub name: String,
    /// Condition over the detection's fields, e.g. `score >= 8 && timescale == "1n" && new_object`
    /// (`docs/notifications.md` lists the variables and operators).
    pub when: String,
    /// Most notifications per minute for this rule; more wait in the outbox (never dropped).
    /// 0: no limit. Default 60: Slack accepts about one message per second per webhook.
    pub rate_per_minute: u32,
    /// Send to a Slack incoming webhook.
    pub slack: Option<SlackConfig>,
    /// Send to a generic HTTP webhook.
    pub webhook: Option<WebhookConfig>,
}

impl Default for RuleConfig {
    fn default() -> Self {
        RuleConfig { name: String::new(), when: String::new(), rate_per_minute: 60, slack: None, webhook: None }
    }
}

/// A Slack incoming webhook.
#[derive(Debug, Clone, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct SlackConfig {
    /// The webhook URL (`https://hooks.slack.com/services/...`): a secret, never logged.
    pub url: Secret,
    /// Link added to the message, with `{object_id}`, `{alert_id}`, `{survey}` replaced
    /// (percent-encoded), e.g. `https://fink-portal.org/{object_id}`.
    pub link_template: Option<String>,
}

/// A generic webhook: a JSON POST, signed.
#[derive(Debug, Clone, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct WebhookConfig {
    /// Where to POST (`http://` or `https://`).
    pub url: String,
    /// The body: JSON with `{field}` placeholders replaced by JSON-escaped values
    /// (`docs/notifications.md`). Unset: the detection as `blink subscribe` prints it, plus
    /// `rule` and `new_object`.
    pub body: Option<String>,
    /// Extra request headers.
    pub headers: BTreeMap<String, String>,
    /// Extra request headers whose values are secrets (e.g. `Authorization`): never logged.
    pub secret_headers: BTreeMap<String, Secret>,
    /// Key of the `X-Blink-Signature: sha256=<hex>` header (HMAC-SHA256 of the body). Unset:
    /// no signature header.
    pub secret: Option<Secret>,
}

impl NotifyConfig {
    /// Checks everything that can be checked without a detection (the rules' expressions and
    /// templates are checked by [`super::Notifier::new`], which compiles them).
    pub fn validate(&self) -> Result<(), NotifyError> {
        let bad = |m: String| Err(NotifyError::Config(m));
        if self.first_wait_ms == 0 || self.max_wait_ms < self.first_wait_ms {
            return bad(format!(
                "notify.first_wait_ms = {}, max_wait_ms = {}: want 0 < first_wait_ms <= max_wait_ms",
                self.first_wait_ms, self.max_wait_ms
            ));
        }
        if self.timeout_ms == 0 {
            return bad("notify.timeout_ms = 0: wants a positive time in ms".into());
        }
        if self.concurrency == 0 {
            return bad("notify.concurrency = 0: wants at least 1".into());
        }
        if !(self.dedup_days.is_finite() && self.dedup_days >= 0.0) {
            return bad(format!("notify.dedup_days = {}: wants 0 (forever) or a positive number", self.dedup_days));
        }
        let mut seen = std::collections::BTreeSet::new();
        for r in &self.rules {
            let ok_name = !r.name.is_empty()
                && r.name.len() <= 64
                && r.name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
            if !ok_name {
                return bad(format!("notify rule name {:?}: wants 1-64 letters, digits, '-', '_' or '.'", r.name));
            }
            if !seen.insert(r.name.as_str()) {
                return bad(format!("notify rule {}: the name is used twice", r.name));
            }
            if r.when.trim().is_empty() {
                return bad(format!("notify rule {}: `when` is empty", r.name));
            }
            match (&r.slack, &r.webhook) {
                (Some(s), None) => {
                    if let Err(why) = super::http::check_url(s.url.expose()) {
                        // The URL is a secret: say what is wrong, not what it is.
                        return bad(format!("notify rule {}: slack.url: {why}", r.name));
                    }
                }
                (None, Some(w)) => {
                    if let Err(why) = super::http::check_url(&w.url) {
                        return bad(format!("notify rule {}: webhook.url {:?}: {why}", r.name, w.url));
                    }
                    for name in w.headers.keys().chain(w.secret_headers.keys()) {
                        if ureq::http::HeaderName::from_bytes(name.as_bytes()).is_err() {
                            return bad(format!("notify rule {}: header name {name:?} is not valid", r.name));
                        }
                    }
                    for (name, v) in &w.headers {
                        if ureq::http::HeaderValue::from_str(v).is_err() {
                            return bad(format!("notify rule {}: header {name}: value {v:?} is not valid", r.name));
                        }
                    }
                    for (name, v) in &w.secret_headers {
                        if ureq::http::HeaderValue::from_str(v.expose()).is_err() {
                            return bad(format!(
                                "notify rule {}: header {name}: the (secret) value is not valid",
                                r.name
                            ));
                        }
                    }
                    if w.secret.as_ref().is_some_and(|s| s.expose().is_empty()) {
                        return bad(format!("notify rule {}: webhook.secret is empty", r.name));
                    }
                }
                _ => return bad(format!("notify rule {}: wants exactly one of `slack` and `webhook`", r.name)),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documented_example_and_refuses_bad_values() {
        let c: NotifyConfig = toml::from_str(
            r#"
            max_attempts = 5
            [[rules]]
            name = "bright-new"
            when = 'score >= 8 && new_object'
            [rules.slack]
            url = "https://hooks.slack.com/services/T/B/X"
            link_template = "https://fink-portal.org/{object_id}"
            [[rules]]
            name = "stacks"
            when = 'stack'
            rate_per_minute = 0
            [rules.webhook]
            url = "http://127.0.0.1:9/hook"
            secret = "k"
            headers = { "X-Team" = "transients" }
            secret_headers = { "Authorization" = "Bearer t" }
            "#,
        )
        .unwrap();
        assert_eq!(c.max_attempts, 5);
        assert_eq!((c.rules[0].rate_per_minute, c.rules[1].rate_per_minute), (60, 0));
        assert_eq!(c.rules.len(), 2);
        c.validate().unwrap();
        assert!(format!("{c:?}").contains("***") && !format!("{c:?}").contains("hooks.slack.com"));
        assert!(toml::from_str::<NotifyConfig>("rulez = []").is_err());
        let rule = c.rules[0].clone();
        for (cfg, want) in [
            (NotifyConfig { first_wait_ms: 0, ..c.clone() }, "first_wait_ms"),
            (NotifyConfig { max_wait_ms: 1, ..c.clone() }, "first_wait_ms"),
            (NotifyConfig { concurrency: 0, ..c.clone() }, "concurrency"),
            (NotifyConfig { dedup_days: -1.0, ..c.clone() }, "dedup_days"),
            (NotifyConfig { rules: vec![rule.clone(), rule.clone()], ..c.clone() }, "used twice"),
            (NotifyConfig { rules: vec![RuleConfig { name: "a b".into(), ..rule.clone() }], ..c.clone() }, "name"),
            (
                NotifyConfig {
                    rules: vec![RuleConfig { webhook: c.rules[1].webhook.clone(), ..rule.clone() }],
                    ..c.clone()
                },
                "exactly one",
            ),
            (
                NotifyConfig {
                    rules: vec![RuleConfig {
                        slack: Some(SlackConfig { url: Secret::new("ftp://secret-host/x"), link_template: None }),
                        ..rule.clone()
                    }],
                    ..c.clone()
                },
                "slack.url",
            ),
        ] {
            let e = cfg.validate().unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
            assert!(!e.contains("secret-host"), "a secret in {e}");
        }
    }
}

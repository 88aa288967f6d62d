//! Notifications: rules over detections, Slack and generic webhooks, and a durable outbox so
//! that nothing is lost (`docs/notifications.md`).
//!
//! The [`Notifier`] is a pipeline [`Output`]: `deliver` evaluates the rules on a batch's
//! detections and commits the matching notifications (minus those of an object and timescale
//! the rule already notified) to the [`Outbox`] in the history store, returning only once that
//! commit is durable; it makes no HTTP request. [`Notifier::run`] drains the outbox in the
//! background: it sends what is due, retries with backoff and jitter, holds what a rule's rate
//! limit does not allow yet, and at start sends what a previous process left pending.
//!
//! # Layout
//! - [`config`]: [`NotifyConfig`], the `[notify]` section.
//! - [`rules`]: conditions (`evalexpr`) and the variables a detection gives them.
//! - [`message`]: the Slack message, webhook bodies, the HMAC signature.
//! - [`delivery`]: backoff and rate limits. [`http`]: one POST and what its answer means.

pub mod config;
pub mod delivery;
pub mod http;
pub mod message;
pub mod rules;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use prost::Message as _;
use rand::rngs::StdRng;
use rand::SeedableRng;
use tokio::sync::{watch, Notify};
use tokio::task::JoinSet;

use crate::config::Secret;
use crate::history::outbox::{NewNotification, PendingNotification, Queued, Settle};
use crate::history::{HistoryError, Outbox};
use crate::proto::Detection;
use crate::sink::Output;

pub use config::{NotifyConfig, RuleConfig, SlackConfig, WebhookConfig};
use delivery::{backoff, RateLimit};
use http::Outcome;
use message::BodyTemplate;
use rules::{short_timescale, Condition};

/// Errors of the notifiers.
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error("notify config: {0}")]
    Config(String),
    #[error("notify rule {rule}: {message}")]
    Rule { rule: String, message: String },
    #[error("notification outbox: {0}")]
    Store(#[from] HistoryError),
    #[error("notification outbox: {0}")]
    Join(String),
}

/// Most outbox entries read per turn of the delivery loop.
const FETCH: usize = 256;
/// The delivery loop looks at the outbox at least this often.
const IDLE_WAKE: Duration = Duration::from_secs(30);
/// Dedup keys forgotten per commit, and how often that runs.
const FORGET_BATCH: usize = 10_000;
const FORGET_EVERY: Duration = Duration::from_secs(3600);

/// Where one rule sends.
#[derive(Debug)]
enum Target {
    Slack {
        url: Secret,
        link_template: Option<String>,
    },
    Webhook {
        url: String,
        body: Option<BodyTemplate>,
        headers: Vec<(String, String)>,
        secret_headers: Vec<(String, Secret)>,
        secret: Option<Secret>,
    },
}

/// A compiled rule.
#[derive(Debug)]
struct Rule {
    name: String,
    condition: Condition,
    rate_per_minute: u32,
    target: Target,
}

impl Rule {
    /// The host the rule sends to: what logs name.
    fn host(&self) -> String {
        match &self.target {
            Target::Slack { url, .. } => http::host(url.expose()),
            Target::Webhook { url, .. } => http::host(url),
        }
    }

    /// The request for `d`, and the secrets to scrub from error texts.
    fn request(&self, d: &Detection) -> (http::Request, Vec<String>) {
        match &self.target {
            Target::Slack { url, link_template } => {
                let body = message::slack_message(&self.name, d, link_template.as_deref()).to_string().into_bytes();
                let req = http::Request { url: url.expose().to_owned(), headers: Vec::new(), body };
                (req, vec![url.expose().to_owned()])
            }
            Target::Webhook { url, body, headers, secret_headers, secret } => {
                let body = match body {
                    Some(t) => t.render(&self.name, d),
                    None => message::default_body(&self.name, d),
                };
                let mut h = headers.clone();
                let mut secrets = Vec::new();
                for (k, v) in secret_headers {
                    h.push((k.clone(), v.expose().to_owned()));
                    secrets.push(v.expose().to_owned());
                }
                if let Some(s) = secret {
                    h.push(("X-Blink-Signature".into(), message::signature(s.expose().as_bytes(), &body)));
                    secrets.push(s.expose().to_owned());
                }
                (http::Request { url: url.clone(), headers: h, body }, secrets)
            }
        }
    }
}

/// Counts since start (`pending`: now, from the outbox).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct NotifyStats {
    /// Notifications committed to the outbox.
    pub queued: u64,
    /// Delivered (a 2xx answer).
    pub delivered: u64,
    /// Failed attempts that will be tried again.
    pub retried: u64,
    /// Given up: a 4xx other than 408/429, `max_attempts` or `max_age_secs` reached, a rule no
    /// longer configured, an unreadable entry.
    pub failed: u64,
    /// Matches not queued because the rule already notified that object and timescale.
    pub deduplicated: u64,
    /// Waiting in the outbox (the last the delivery loop read; includes those held by a rate
    /// limit).
    pub pending: u64,
    /// Times a due notification was held back by its rule's rate limit.
    pub rate_limited: u64,
    /// Conditions that failed to evaluate on a detection (counted as no match).
    pub rule_errors: u64,
}

#[derive(Default)]
struct Counters {
    queued: AtomicU64,
    delivered: AtomicU64,
    retried: AtomicU64,
    failed: AtomicU64,
    deduplicated: AtomicU64,
    pending: AtomicU64,
    rate_limited: AtomicU64,
    rule_errors: AtomicU64,
}

fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

/// Rules, outbox and delivery (module docs). Share it as an `Arc`: one handle is the pipeline's
/// [`Output`], another runs [`Notifier::run`].
pub struct Notifier {
    config: NotifyConfig,
    rules: Vec<Rule>,
    outbox: Arc<dyn Outbox>,
    agent: ureq::Agent,
    counters: Counters,
    wake: Notify,
}

impl std::fmt::Debug for Notifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Notifier").field("rules", &self.rules.iter().map(|r| &r.name).collect::<Vec<_>>()).finish()
    }
}

fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// What makes two matches the same notification for a rule: survey, object (the alert when
/// the survey gave no object id) and the short timescale.
pub fn dedup_key(d: &Detection) -> String {
    let object = if d.object_id.is_empty() { format!("alert:{}", d.alert_id) } else { d.object_id.clone() };
    format!("{}\0{object}\0{}", d.survey, short_timescale(&d.timescale))
}

impl Notifier {
    /// Validates `config`, compiles every rule (a condition that does not parse, names an
    /// unknown variable or is not a boolean, or a body template that is not JSON, is a
    /// [`NotifyError::Rule`] naming the rule) and reads the outbox's pending count.
    pub fn new(config: &NotifyConfig, outbox: Arc<dyn Outbox>) -> Result<Notifier, NotifyError> {
        config.validate()?;
        let mut rules = Vec::new();
        for r in &config.rules {
            let err = |message: String| NotifyError::Rule { rule: r.name.clone(), message };
            let condition = Condition::compile(&r.when).map_err(|e| err(format!("when = {:?}: {e}", r.when)))?;
            let target = match (&r.slack, &r.webhook) {
                (Some(s), _) => {
                    if let Some(t) = &s.link_template {
                        let stripped =
                            message::LINK_FIELDS.iter().fold(t.clone(), |t, f| t.replace(&format!("{{{f}}}"), ""));
                        if stripped.contains('{') || stripped.contains('}') {
                            return Err(err(format!(
                                "slack.link_template {t:?}: only {{object_id}}, {{alert_id}} and {{survey}} are replaced"
                            )));
                        }
                    }
                    Target::Slack { url: s.url.clone(), link_template: s.link_template.clone() }
                }
                (None, Some(w)) => Target::Webhook {
                    url: w.url.clone(),
                    body: w
                        .body
                        .as_deref()
                        .map(BodyTemplate::parse)
                        .transpose()
                        .map_err(|e| err(format!("webhook.body: {e}")))?,
                    headers: w.headers.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
                    secret_headers: w.secret_headers.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
                    secret: w.secret.clone(),
                },
                (None, None) => return Err(err("no notifier".into())),
            };
            rules.push(Rule { name: r.name.clone(), condition, rate_per_minute: r.rate_per_minute, target });
        }
        let pending = outbox.outbox_stats()?.pending;
        let counters = Counters::default();
        counters.pending.store(pending, Ordering::Relaxed);
        Ok(Notifier {
            config: config.clone(),
            rules,
            outbox,
            agent: http::agent(Duration::from_millis(config.timeout_ms)),
            counters,
            wake: Notify::new(),
        })
    }

    /// The counters (for `Status`).
    pub fn stats(&self) -> NotifyStats {
        let c = &self.counters;
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        NotifyStats {
            queued: g(&c.queued),
            delivered: g(&c.delivered),
            retried: g(&c.retried),
            failed: g(&c.failed),
            deduplicated: g(&c.deduplicated),
            pending: g(&c.pending),
            rate_limited: g(&c.rate_limited),
            rule_errors: g(&c.rule_errors),
        }
    }

    /// The names of the rules `d` matches, in configuration order.
    pub fn matching(&self, d: &Detection) -> Vec<&str> {
        self.rules.iter().filter(|r| self.eval(r, d)).map(|r| r.name.as_str()).collect()
    }

    fn eval(&self, r: &Rule, d: &Detection) -> bool {
        match r.condition.eval(d) {
            Ok(m) => m,
            Err(error) => {
                add(&self.counters.rule_errors, 1);
                tracing::warn!(rule = %r.name, %error, alert_id = %d.alert_id, "notify rule failed to evaluate: no match");
                false
            }
        }
    }

    fn rule(&self, name: &str) -> Option<&Rule> {
        self.rules.iter().find(|r| r.name == name)
    }

    /// The request rule `rule` would send for `d` (`None` for an unknown rule); for tests and
    /// for checking a configuration by hand.
    pub fn request_for(&self, rule: &str, d: &Detection) -> Option<http::Request> {
        self.rule(rule).map(|r| r.request(d).0)
    }

    /// Runs `f` on the outbox on a blocking thread (every write fsyncs).
    async fn store<R: Send + 'static>(
        &self,
        f: impl FnOnce(&dyn Outbox) -> Result<R, HistoryError> + Send + 'static,
    ) -> Result<R, NotifyError> {
        let o = self.outbox.clone();
        tokio::task::spawn_blocking(move || f(&*o))
            .await
            .map_err(|e| NotifyError::Join(e.to_string()))?
            .map_err(NotifyError::from)
    }

    /// Evaluates the rules on `detections` and commits the matches to the outbox (one durable
    /// commit); the outcomes are counted. Returns how many were queued.
    pub async fn queue(&self, detections: &[Arc<Detection>]) -> Result<u64, NotifyError> {
        let now_ms = unix_ms();
        let mut items = Vec::new();
        for d in detections {
            for r in self.rules.iter().filter(|r| self.eval(r, d)) {
                items.push(NewNotification {
                    rule: r.name.clone(),
                    dedup_key: dedup_key(d),
                    payload: d.encode_to_vec(),
                    now_ms,
                });
            }
        }
        if items.is_empty() {
            return Ok(0);
        }
        let outcomes = self.store(move |o| o.queue_notifications(&items)).await?;
        let queued = outcomes.iter().filter(|q| matches!(q, Queued::Queued { .. })).count() as u64;
        add(&self.counters.queued, queued);
        add(&self.counters.pending, queued);
        add(&self.counters.deduplicated, outcomes.len() as u64 - queued);
        if queued > 0 {
            self.wake.notify_one();
        }
        Ok(queued)
    }

    /// The delivery loop: sends what is due until `shutdown` turns true (or its sender goes),
    /// then waits for the requests in flight (each bounded by `timeout_ms`) and returns. What is
    /// left stays in the outbox for the next start.
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut limits: HashMap<String, RateLimit> = HashMap::new();
        let mut in_flight: HashSet<u64> = HashSet::new();
        let mut tasks: JoinSet<(PendingNotification, Outcome)> = JoinSet::new();
        let mut rng = StdRng::from_entropy();
        let mut next_forget = Instant::now();
        tracing::info!(
            rules = self.rules.len(),
            pending = self.counters.pending.load(Ordering::Relaxed),
            "notifier running"
        );
        loop {
            if *shutdown.borrow() {
                break;
            }
            if self.config.dedup_days > 0.0 && Instant::now() >= next_forget {
                next_forget = Instant::now() + FORGET_EVERY;
                let before = unix_ms().saturating_sub((self.config.dedup_days * 86_400_000.0) as u64);
                if let Err(error) = self.store(move |o| o.forget_notified_before(before, FORGET_BATCH)).await {
                    tracing::warn!(%error, "notify: forgetting old dedup keys failed");
                }
            }
            let now_ms = unix_ms();
            let mut wake_in = IDLE_WAKE;
            match self.store(move |o| o.due_notifications(now_ms, FETCH)).await {
                Err(error) => {
                    tracing::warn!(%error, "notify: reading the outbox failed");
                    wake_in = Duration::from_secs(1);
                }
                Ok(due) => {
                    let mut postpone = Vec::new();
                    let mut held: HashMap<String, u32> = HashMap::new();
                    for p in due {
                        if in_flight.contains(&p.id) {
                            continue;
                        }
                        if tasks.len() >= self.config.concurrency {
                            break;
                        }
                        let Some(rule) = self.rule(&p.rule) else {
                            tracing::warn!(rule = %p.rule, "notification for a rule no longer configured: dropped as failed");
                            add(&self.counters.failed, 1);
                            postpone.push((p, Settle::Remove));
                            continue;
                        };
                        let now = Instant::now();
                        let limit = limits
                            .entry(rule.name.clone())
                            .or_insert_with(|| RateLimit::new(rule.rate_per_minute, now));
                        if !limit.try_take(now) {
                            // Held, not dropped: due again when its turn under the limit comes,
                            // spaced so that each is rewritten about once.
                            add(&self.counters.rate_limited, 1);
                            let k = held.entry(rule.name.clone()).or_insert(0);
                            let spacing = 60_000 / u64::from(rule.rate_per_minute.max(1));
                            let at = now_ms + limit.wait(now).as_millis() as u64 + u64::from(*k) * spacing;
                            *k += 1;
                            postpone.push((p, Settle::Postpone { next_attempt_ms: at.max(now_ms + 1) }));
                            continue;
                        }
                        let d = match Detection::decode(&p.payload[..]) {
                            Ok(d) => d,
                            Err(error) => {
                                tracing::warn!(rule = %p.rule, id = p.id, %error, "unreadable outbox entry: dropped as failed");
                                add(&self.counters.failed, 1);
                                postpone.push((p, Settle::Remove));
                                continue;
                            }
                        };
                        let (req, secrets) = rule.request(&d);
                        let agent = self.agent.clone();
                        in_flight.insert(p.id);
                        tasks.spawn(async move {
                            let sent = tokio::task::spawn_blocking(move || {
                                let s: Vec<&str> = secrets.iter().map(String::as_str).collect();
                                http::send(&agent, &req, &s)
                            })
                            .await;
                            let out = sent.unwrap_or_else(|e| Outcome::Retry {
                                why: format!("sender failed: {e}"),
                                retry_after: None,
                            });
                            (p, out)
                        });
                    }
                    if !postpone.is_empty() {
                        if let Err(error) = self.store(move |o| o.settle_notifications(&postpone)).await {
                            tracing::warn!(%error, "notify: updating the outbox failed");
                        }
                    }
                }
            }
            if let Ok(s) = self.store(|o| o.outbox_stats()).await {
                self.counters.pending.store(s.pending, Ordering::Relaxed);
            }
            if let Ok(Some(t)) = self.store(move |o| o.next_due_after(now_ms)).await {
                wake_in = wake_in.min(Duration::from_millis(t.saturating_sub(unix_ms())));
            }
            tokio::select! {
                biased;
                changed = shutdown.changed() => {
                    if changed.is_err() {
                        break;
                    }
                }
                Some(done) = join_next(&mut tasks) => {
                    if let Ok((p, out)) = done {
                        in_flight.remove(&p.id);
                        self.settle(p, out, &mut rng).await;
                    }
                }
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(wake_in) => {}
            }
        }
        while let Some(done) = tasks.join_next().await {
            if let Ok((p, out)) = done {
                self.settle(p, out, &mut rng).await;
            }
        }
        tracing::info!("notifier stopped");
    }

    /// Records how one attempt ended.
    async fn settle(&self, p: PendingNotification, out: Outcome, rng: &mut StdRng) {
        let host = self.rule(&p.rule).map(Rule::host).unwrap_or_default();
        let now_ms = unix_ms();
        let failed_attempts = p.attempts.saturating_add(1);
        let s = match out {
            Outcome::Delivered { status } => {
                add(&self.counters.delivered, 1);
                tracing::debug!(rule = %p.rule, %host, status, attempts = failed_attempts, "notification delivered");
                Settle::Remove
            }
            Outcome::Permanent { why } => {
                add(&self.counters.failed, 1);
                tracing::warn!(rule = %p.rule, %host, %why, "notification refused: dropped as failed");
                Settle::Remove
            }
            Outcome::Retry { why, retry_after } => {
                let c = &self.config;
                let too_many = c.max_attempts > 0 && failed_attempts >= c.max_attempts;
                let too_old = c.max_age_secs > 0 && now_ms.saturating_sub(p.queued_ms) >= c.max_age_secs * 1000;
                if too_many || too_old {
                    add(&self.counters.failed, 1);
                    tracing::warn!(rule = %p.rule, %host, %why, attempts = failed_attempts, "notification failed: giving up");
                    Settle::Remove
                } else {
                    add(&self.counters.retried, 1);
                    let wait = backoff(
                        rng,
                        Duration::from_millis(c.first_wait_ms),
                        Duration::from_millis(c.max_wait_ms),
                        failed_attempts,
                        retry_after,
                    );
                    tracing::info!(rule = %p.rule, %host, %why, attempts = failed_attempts, wait_ms = wait.as_millis() as u64, "notification failed: will retry");
                    Settle::Retry { next_attempt_ms: now_ms + wait.as_millis() as u64 }
                }
            }
        };
        if s == Settle::Remove {
            let _ =
                self.counters.pending.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| Some(v.saturating_sub(1)));
        }
        if let Err(error) = self.store(move |o| o.settle_notifications(&[(p, s)])).await {
            // The entry stays as it was: it is sent again (at least once).
            tracing::warn!(%error, "notify: recording an attempt in the outbox failed");
        }
    }
}

/// `join_next` that waits forever on an empty set (instead of answering `None` at once).
async fn join_next<T: 'static>(set: &mut JoinSet<T>) -> Option<Result<T, tokio::task::JoinError>> {
    if set.is_empty() {
        std::future::pending().await
    } else {
        set.join_next().await
    }
}

#[tonic::async_trait]
impl Output for Notifier {
    fn name(&self) -> &str {
        "notify"
    }

    /// Commits the batch's notifications to the outbox; no HTTP here.
    async fn deliver(&self, detections: &[Arc<Detection>]) -> Result<(), String> {
        self.queue(detections).await.map(|_| ()).map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests;

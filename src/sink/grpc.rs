//! The gRPC sink: a [`Hub`] numbers every result, keeps the last `grpc.replay` of them in a
//! ring and fans them out to every `Subscribe` stream, each through a bounded buffer; the tonic
//! service (`proto/blink/v1/blink.proto`) serves `Subscribe` and `Status`.
//!
//! A subscriber that falls more than `grpc.subscriber_buffer` results behind gets
//! RESOURCE_EXHAUSTED and is disconnected: memory stays bounded and the others never stall.
//! It reconnects with `after_sequence` set to the last sequence it got and receives what it
//! missed from the ring, then the live stream, with nothing lost or repeated between the two
//! (the ring and the fan-out are updated under one lock, and a resuming stream subscribes under
//! it).

use std::net::SocketAddr;
use std::pin::Pin;
use std::collections::VecDeque;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};

use futures::Stream;
use tokio::net::TcpListener;
use tokio::sync::broadcast;
use tonic::{Request, Response, Status};

use crate::metrics::Metrics;
use crate::pipeline::Outcome;
use crate::proto::blink_server::{Blink, BlinkServer};
use crate::proto::{Detection, GetObjectRequest, ObjectReply, StatusReply, StatusRequest, SubscribeRequest};

/// Detections kept for resuming subscribers by default (`grpc.replay`).
pub const DEFAULT_REPLAY: usize = 100_000;

/// Fan-out point between the pipeline and the subscribers. Cheap to clone.
#[derive(Clone)]
pub struct Hub {
    tx: broadcast::Sender<Arc<Detection>>,
    /// The sequence counter and the retained detections; sending happens under this lock too,
    /// so a resuming subscriber sees the ring and the live stream meet exactly.
    ring: Arc<Mutex<Ring>>,
    /// Turns true at shutdown: every stream sends what it still holds, then ends, so the gRPC
    /// server's graceful shutdown does not wait forever on open subscriptions.
    closed: Arc<tokio::sync::watch::Sender<bool>>,
}

/// The last `capacity` detections, oldest first, and the last sequence number given.
struct Ring {
    last: u64,
    capacity: usize,
    items: VecDeque<Arc<Detection>>,
}

/// What [`Hub::resume`] gives: the retained detections to send first, and the receiver of
/// everything published after them.
pub type Resumed = (Vec<Arc<Detection>>, broadcast::Receiver<Arc<Detection>>);

/// Why a subscription cannot resume where it asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResumeError {
    #[error(
        "detections after sequence {after} are no longer all retained: the oldest kept is {oldest} \
         (the server keeps the last {capacity}, grpc.replay); resume from a later sequence or subscribe live"
    )]
    TooOld { after: u64, oldest: u64, capacity: usize },
    #[error(
        "sequence {after} has not been produced yet: the latest is {latest} (a server without a history \
         store numbers from 1 again after a restart); subscribe live or resume from at most {latest}"
    )]
    Ahead { after: u64, latest: u64 },
}

impl Hub {
    /// A hub with `buffer` detections per subscriber and the default replay ring.
    pub fn new(buffer: usize) -> Hub {
        Hub::with_replay(buffer, DEFAULT_REPLAY)
    }

    /// A hub with `buffer` detections per subscriber, keeping the last `replay` detections for
    /// subscribers that resume (0: none kept).
    pub fn with_replay(buffer: usize, replay: usize) -> Hub {
        let (tx, _) = broadcast::channel(buffer.max(1));
        let (closed, _) = tokio::sync::watch::channel(false);
        let ring = Ring { last: 0, capacity: replay, items: VecDeque::with_capacity(replay.min(4096)) };
        Hub { tx, ring: Arc::new(Mutex::new(ring)), closed: Arc::new(closed) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Ring> {
        // A panic while holding the lock leaves the ring consistent (every update is a push
        // and a pop), so a poisoned lock is still usable.
        self.ring.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A hub that goes on from an earlier process: `recent` (its last detections, oldest first)
    /// fill the ring, and numbering continues after `last` (at least the largest of them).
    pub fn restore(buffer: usize, replay: usize, recent: Vec<Detection>, last: u64) -> Hub {
        let hub = Hub::with_replay(buffer, replay);
        {
            let mut ring = hub.lock();
            let skip = recent.len().saturating_sub(replay);
            ring.items.extend(recent.into_iter().skip(skip).map(Arc::new));
            ring.last = ring.items.back().map_or(0, |d| d.sequence).max(last);
        }
        hub
    }

    /// The sequence of the last detection published (0 before the first).
    pub fn latest(&self) -> u64 {
        self.lock().last
    }

    /// Subscribe live, or resume after sequence `after`: the retained detections with a larger
    /// sequence (`Some(0)`: all of them), in order, and a receiver of every detection published
    /// after them.
    pub fn resume(&self, after: Option<u64>) -> Result<Resumed, ResumeError> {
        let ring = self.lock();
        let rx = self.tx.subscribe();
        let Some(after) = after else { return Ok((Vec::new(), rx)) };
        if after > ring.last {
            return Err(ResumeError::Ahead { after, latest: ring.last });
        }
        let oldest = ring.items.front().map_or(ring.last + 1, |d| d.sequence);
        // 0 asks for everything still kept, whatever has been dropped before it.
        if after != 0 && after + 1 < oldest {
            return Err(ResumeError::TooOld { after, oldest, capacity: ring.capacity });
        }
        // Sequences increase along the ring, with gaps after a restart (numbers the previous
        // process reserved but did not use).
        let skip = ring.items.partition_point(|d| d.sequence <= after);
        Ok((ring.items.iter().skip(skip).cloned().collect(), rx))
    }
    /// End every subscription once it has sent what it holds.
    pub fn close(&self) {
        self.closed.send_replace(true);
    }

    /// Hand a result to every current subscriber (none listening is fine: it is still delivered
    /// to the hub, which is what the ack waits for).
    pub fn publish(&self, o: &Outcome) -> Arc<Detection> {
        self.send(o, "epoch", None)
    }

    /// Hand a stack detection to every subscriber: the alert `o` whose epoch made the stack,
    /// with the stack's score, flux and error and `timescale` (`stack:<N>n`). Its id is
    /// `<survey>:<alert id>:<timescale>`, stable like the epoch's.
    pub fn publish_stack(&self, o: &Outcome, timescale: &str, score: f64, flux: f64, flux_err: f64) -> Arc<Detection> {
        self.send(o, timescale, Some((score, flux, flux_err)))
    }

    fn send(&self, o: &Outcome, timescale: &str, stack: Option<(f64, f64, f64)>) -> Arc<Detection> {
        let mut ring = self.lock();
        ring.last += 1;
        let sequence = ring.last;
        let id = match stack {
            None => format!("{}:{}", o.meta.survey, o.meta.alert_id),
            Some(_) => format!("{}:{}:{timescale}", o.meta.survey, o.meta.alert_id),
        };
        let (score, flux, flux_err) = stack.unwrap_or((
            f64::from(o.result.score),
            f64::from(o.result.flux),
            f64::from(o.result.flux_err),
        ));
        let d = Detection {
            id,
            survey: o.meta.survey.to_string(),
            alert_id: o.meta.alert_id.clone(),
            object_id: o.meta.object_id.clone(),
            ra: o.meta.ra,
            dec: o.meta.dec,
            mjd_tai: o.meta.mjd_tai,
            band: o.meta.band.clone(),
            score,
            flux,
            flux_err,
            survey_snr: if stack.is_some() { f64::NAN } else { o.meta.survey_snr.unwrap_or(f64::NAN) },
            flux_scale: f64::from(o.result.flux_scale),
            background: f64::from(o.result.background),
            detected: if stack.is_some() { true } else { o.detected },
            timescale: timescale.into(),
            sequence,
            topic: o.token.topic.clone(),
            partition: o.token.partition,
            offset: o.token.offset,
            new_object: o.new_object && stack.is_none(),
        };
        let d = Arc::new(d);
        if ring.capacity > 0 {
            if ring.items.len() == ring.capacity {
                ring.items.pop_front();
            }
            ring.items.push_back(d.clone());
        }
        let _ = self.tx.send(d.clone());
        d
    }

    /// Every detection published from now on, unfiltered (the gRPC streams and tests read this).
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Detection>> {
        let _ring = self.lock();
        self.tx.subscribe()
    }
}

/// A subscriber's server-side filter.
#[derive(Debug, Clone)]
pub struct Filter {
    min_score: f64,
    surveys: Vec<String>,
    bands: Vec<String>,
    /// Normalised ([`normalise_timescale`]).
    timescales: Vec<String>,
    /// `(ra, dec, radius)`, degrees.
    cone: Option<(f64, f64, f64)>,
    object_ids: Vec<String>,
}

/// A timescale as detections carry it: `epoch`, or `stack:<N>n` with `N` written as Rust
/// writes the f64 (`3n`, `stack:3.0n` → `stack:3n`). `None` for anything else.
pub fn normalise_timescale(t: &str) -> Option<String> {
    let t = t.trim();
    if t.eq_ignore_ascii_case("epoch") {
        return Some("epoch".into());
    }
    let n = t.strip_prefix("stack:").unwrap_or(t).strip_suffix('n')?;
    let n: f64 = n.parse().ok()?;
    (n.is_finite() && n > 0.0).then(|| crate::pipeline::stacking::timescale(n))
}

impl Filter {
    pub fn from_request(r: &SubscribeRequest) -> Result<Filter, Status> {
        if !r.min_score.is_finite() || r.min_score < 0.0 {
            return Err(Status::invalid_argument(format!(
                "min_score = {}: must be a number >= 0",
                r.min_score
            )));
        }
        for s in &r.surveys {
            if crate::alert::Survey::parse(s).is_none() {
                return Err(Status::invalid_argument(format!(
                    "unknown survey {s:?}: use ztf, rubin or native"
                )));
            }
        }
        let timescales = r
            .timescales
            .iter()
            .map(|t| {
                normalise_timescale(t).ok_or_else(|| {
                    Status::invalid_argument(format!(
                        "unknown timescale {t:?}: use epoch, or a stack window such as stack:3n (or 3n)"
                    ))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let cone = match &r.cone {
            None => None,
            Some(c) => {
                if !(c.ra.is_finite() && c.dec.is_finite() && (-90.0..=90.0).contains(&c.dec)) {
                    return Err(Status::invalid_argument(format!(
                        "cone centre ({}, {}): ra and dec in degrees, dec within [-90, 90]",
                        c.ra, c.dec
                    )));
                }
                if !(c.radius > 0.0 && c.radius <= 180.0) {
                    return Err(Status::invalid_argument(format!(
                        "cone radius {}: degrees, more than 0 and at most 180",
                        c.radius
                    )));
                }
                Some((c.ra, c.dec, c.radius))
            }
        };
        Ok(Filter {
            min_score: r.min_score,
            surveys: r.surveys.iter().map(|s| s.to_ascii_lowercase()).collect(),
            bands: r.bands.clone(),
            timescales,
            cone,
            object_ids: r.object_ids.clone(),
        })
    }

    pub fn matches(&self, d: &Detection) -> bool {
        d.score.abs() >= self.min_score
            && (self.surveys.is_empty()
                || self.surveys.iter().any(|s| {
                    crate::alert::Survey::parse(s).map(|s| s.as_str()) == Some(d.survey.as_str())
                }))
            && (self.bands.is_empty() || self.bands.contains(&d.band))
            && (self.timescales.is_empty() || self.timescales.contains(&d.timescale))
            && (self.object_ids.is_empty() || self.object_ids.contains(&d.object_id))
            && self.cone.is_none_or(|(ra, dec, r)| {
                crate::history::sky::distance_rad(ra, dec, d.ra, d.dec).to_degrees() <= r
            })
    }
}

pub struct BlinkService {
    hub: Hub,
    metrics: Arc<Metrics>,
    adapter: String,
    history: Option<Arc<dyn crate::history::HistoryStore>>,
}

/// Decrements the subscriber gauge when a stream ends, however it ends.
struct SubscriberGuard(Arc<Metrics>);

impl Drop for SubscriberGuard {
    fn drop(&mut self) {
        self.0.subscribers.fetch_sub(1, Relaxed);
    }
}

/// One `Subscribe` stream's state: the retained detections still to send, then the live ones.
struct Subscription {
    backlog: VecDeque<Arc<Detection>>,
    rx: broadcast::Receiver<Arc<Detection>>,
    closed: tokio::sync::watch::Receiver<bool>,
    filter: Filter,
    _guard: SubscriberGuard,
    finished: bool,
}

type DetectionStream = Pin<Box<dyn Stream<Item = Result<Detection, Status>> + Send>>;

#[tonic::async_trait]
impl Blink for BlinkService {
    type SubscribeStream = DetectionStream;

    async fn subscribe(
        &self,
        request: Request<SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let filter = Filter::from_request(request.get_ref())?;
        let (backlog, rx) = self.hub.resume(request.get_ref().after_sequence).map_err(|e| match e {
            ResumeError::TooOld { .. } => Status::out_of_range(e.to_string()),
            ResumeError::Ahead { .. } => Status::failed_precondition(e.to_string()),
        })?;
        let closed = self.hub.closed.subscribe();
        self.metrics.subscribers.fetch_add(1, Relaxed);
        let state = Subscription {
            backlog: backlog.into(),
            rx,
            closed,
            filter,
            _guard: SubscriberGuard(self.metrics.clone()),
            finished: false,
        };
        let stream = futures::stream::unfold(state, |mut st| async move {
            if st.finished {
                return None;
            }
            // The retained detections first (the receiver holds everything after them).
            while let Some(d) = st.backlog.pop_front() {
                if st.filter.matches(&d) {
                    return Some((Ok(d.as_ref().clone()), st));
                }
            }
            loop {
                let next = if *st.closed.borrow() {
                    // Shutting down: drain what is buffered, then end the stream.
                    match st.rx.try_recv() {
                        Ok(d) => Ok(d),
                        Err(broadcast::error::TryRecvError::Lagged(n)) => Err(broadcast::error::RecvError::Lagged(n)),
                        Err(_) => return None,
                    }
                } else {
                    tokio::select! {
                        r = st.rx.recv() => r,
                        _ = st.closed.changed() => continue,
                    }
                };
                match next {
                    Ok(d) if st.filter.matches(&d) => return Some((Ok(d.as_ref().clone()), st)),
                    Ok(_) => continue,
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        let status = Status::resource_exhausted(format!(
                            "subscriber too slow: {n} detections dropped from its buffer; reconnect with \
                             after_sequence = the last sequence received (and read faster, or raise \
                             grpc.subscriber_buffer)"
                        ));
                        st.finished = true;
                        return Some((Err(status), st));
                    }
                    Err(broadcast::error::RecvError::Closed) => return None,
                }
            }
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn get_object(&self, request: Request<GetObjectRequest>) -> Result<Response<ObjectReply>, Status> {
        use crate::sink::object::{self, ObjectError};
        let Some(store) = self.history.clone() else {
            return Err(Status::failed_precondition("this server runs without a history store ([history]): it keeps no objects"));
        };
        let r = request.into_inner();
        if r.object_id.is_empty() {
            return Err(Status::invalid_argument("object_id is empty"));
        }
        // The store reads from disk: off the async workers.
        let found = tokio::task::spawn_blocking(move || {
            let h = object::find(store.as_ref(), &r.object_id, &r.survey)?;
            object::reply(store.as_ref(), &h, r.pixels, r.max_epochs as usize)
        })
        .await
        .map_err(|e| Status::internal(format!("GetObject task failed: {e}")))?;
        match found {
            Ok(reply) => Ok(Response::new(reply)),
            Err(e @ ObjectError::NotFound(_)) => Err(Status::not_found(e.to_string())),
            Err(e @ (ObjectError::Ambiguous { .. } | ObjectError::BadSurvey(_))) => Err(Status::invalid_argument(e.to_string())),
            Err(e @ ObjectError::History(_)) => Err(Status::internal(e.to_string())),
        }
    }

    async fn status(&self, _: Request<StatusRequest>) -> Result<Response<StatusReply>, Status> {
        let m = &self.metrics;
        Ok(Response::new(StatusReply {
            health: "ok".into(),
            adapter: self.adapter.clone(),
            alerts_in: Metrics::get(&m.alerts_in),
            detections_out: Metrics::get(&m.results_out),
            detected: Metrics::get(&m.detected),
            dead_letters: m.dead_letters().into_iter().collect(),
            subscribers: Metrics::get(&m.subscribers),
            batches: Metrics::get(&m.batches),
            offsets_committed: Metrics::get(&m.offsets_committed),
            messages_in: Metrics::get(&m.messages_in),
            epochs_stored: Metrics::get(&m.epochs_stored),
            history_duplicates: Metrics::get(&m.history_duplicates),
            stack_detections: Metrics::get(&m.stack_detections),
            history_errors: Metrics::get(&m.history_errors),
            output_errors: Metrics::get(&m.output_errors),
            stacks_from_store: Metrics::get(&m.stacks_from_store),
            resident_evictions: Metrics::get(&m.resident_evictions),
            lag: m.lag().into_iter().collect(),
            notify: m.notify_stats().map(|n| crate::proto::NotifyStatus {
                queued: n.queued,
                delivered: n.delivered,
                retried: n.retried,
                failed: n.failed,
                deduplicated: n.deduplicated,
                pending: n.pending,
                rate_limited: n.rate_limited,
                rule_errors: n.rule_errors,
            }),
        }))
    }
}

/// Who may call and how connections are protected: the bearer tokens of `[grpc]` (none: calls
/// need no token) and TLS (the server's certificate and key). Tokens never reach a log: this
/// type's `Debug` counts them.
#[derive(Clone, Default)]
pub struct Security {
    tokens: Arc<Vec<crate::config::Secret>>,
    tls: Option<tonic::transport::Identity>,
}

impl std::fmt::Debug for Security {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Security").field("tokens", &self.tokens.len()).field("tls", &self.tls.is_some()).finish()
    }
}

/// A `[grpc]` security setting that cannot be used (the path in the message).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct SecurityError(String);

impl Security {
    /// From `[grpc]`: `tokens`, the lines of `tokens_file`, and `tls_cert`/`tls_key` read and
    /// checked now, so a bad file stops start-up with its name rather than the first call.
    pub fn from_config(g: &crate::config::GrpcConfig) -> Result<Security, SecurityError> {
        let mut tokens = g.tokens.clone();
        if let Some(path) = &g.tokens_file {
            let text = std::fs::read_to_string(path)
                .map_err(|e| SecurityError(format!("grpc.tokens_file {}: {e}", path.display())))?;
            let before = tokens.len();
            tokens.extend(text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).map(crate::config::Secret::new));
            if tokens.len() == before {
                return Err(SecurityError(format!("grpc.tokens_file {} holds no token (one per line)", path.display())));
            }
            if let Some(n) = tokens[before..].iter().position(|t| t.expose().chars().any(char::is_whitespace)) {
                return Err(SecurityError(format!("grpc.tokens_file {}: token {} holds whitespace", path.display(), n + 1)));
            }
        }
        let tls = match (&g.tls_cert, &g.tls_key) {
            (Some(cert), Some(key)) => {
                let read = |p: &std::path::Path, what: &str| {
                    std::fs::read(p).map_err(|e| SecurityError(format!("grpc.{what} {}: {e}", p.display())))
                };
                let id = tonic::transport::Identity::from_pem(read(cert, "tls_cert")?, read(key, "tls_key")?);
                // Parsed here (tonic parses when the server is built), so bad PEM fails start-up.
                tonic::transport::Server::builder()
                    .tls_config(tonic::transport::ServerTlsConfig::new().identity(id.clone()))
                    .map_err(|e| {
                        SecurityError(format!(
                            "grpc.tls_cert {} / grpc.tls_key {}: not a usable certificate and key: {e}",
                            cert.display(),
                            key.display()
                        ))
                    })?;
                Some(id)
            }
            (None, None) => None,
            _ => return Err(SecurityError("grpc.tls_cert and grpc.tls_key go together".into())),
        };
        Ok(Security { tokens: Arc::new(tokens), tls })
    }

    /// Whether calls must carry a token.
    pub fn requires_token(&self) -> bool {
        !self.tokens.is_empty()
    }

    /// Whether the server speaks TLS.
    pub fn tls(&self) -> bool {
        self.tls.is_some()
    }

    /// The interceptor's check: with tokens configured, `authorization: Bearer <one of them>`.
    #[allow(clippy::result_large_err)] // tonic's interceptor signature
    fn check(&self, req: Request<()>) -> Result<Request<()>, Status> {
        if self.tokens.is_empty() {
            return Ok(req);
        }
        let Some(value) = req.metadata().get("authorization") else {
            return Err(Status::unauthenticated(
                "this server needs a bearer token: send the header `authorization: Bearer <token>` \
                 (blink subscribe --token, or BLINK_TOKEN)",
            ));
        };
        let given = value.as_bytes().strip_prefix(b"Bearer ").unwrap_or_default();
        if self.tokens.iter().any(|t| same(t.expose().as_bytes(), given)) {
            Ok(req)
        } else {
            Err(Status::unauthenticated("the bearer token is not one this server accepts"))
        }
    }
}

/// Byte equality in a time that does not depend on where the first difference is (`==` would
/// tell an attacker, through timing, how much of a guessed token is right). Eight lines; no
/// crate for it.
fn same(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() || a.is_empty() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Serve `Subscribe`, `Status` and `GetObject` (from `history`, when there is one) on
/// `listener` until `shutdown` resolves, with `security`'s token check on every call and its
/// TLS.
pub async fn serve(
    listener: TcpListener,
    hub: Hub,
    metrics: Arc<Metrics>,
    adapter: String,
    security: Security,
    history: Option<Arc<dyn crate::history::HistoryStore>>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    let service = BlinkService { hub, metrics, adapter, history };
    let mut builder = tonic::transport::Server::builder();
    if let Some(id) = &security.tls {
        builder = builder.tls_config(tonic::transport::ServerTlsConfig::new().identity(id.clone()))?;
    }
    let check = security.clone();
    builder
        .add_service(BlinkServer::with_interceptor(service, move |req| check.check(req)))
        .serve_with_incoming_shutdown(tokio_stream::wrappers::TcpListenerStream::new(listener), shutdown)
        .await
}

/// Bind the gRPC address, with the address in the error.
pub async fn bind(addr: &str) -> std::io::Result<(TcpListener, SocketAddr)> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}")))?;
    let local = listener.local_addr()?;
    Ok((listener, local))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::alert::Survey;
    use crate::engine::SubtractionResult;
    use crate::pipeline::{AckToken, AlertMeta};
    use crate::proto::Cone;
    use futures::StreamExt;

    /// Alert `i`'s result (object `o<i>`, offset `i`) with `score`; the sink tests share it.
    pub(crate) fn outcome(i: usize, survey: Survey, score: f32) -> Outcome {
        Outcome {
            token: AckToken { topic: "t".into(), partition: 0, offset: i as i64 },
            meta: AlertMeta {
                survey,
                alert_id: format!("a{i}"),
                object_id: format!("o{i}"),
                ra: 10.0,
                dec: -5.0,
                mjd_tai: 61000.0,
                band: "r".into(),
                survey_snr: None,
                stamp_x: 20.0,
                stamp_y: 20.0,
            },
            result: SubtractionResult {
                flux_scale: 1.0,
                background: 0.0,
                flux: score,
                flux_err: 1.0,
                score,
            },
            detected: score.abs() >= 5.0,
            new_object: false,
        }
    }

    fn service(buffer: usize) -> BlinkService {
        service_with_replay(buffer, DEFAULT_REPLAY)
    }

    fn service_with_replay(buffer: usize, replay: usize) -> BlinkService {
        BlinkService { hub: Hub::with_replay(buffer, replay), metrics: Arc::new(Metrics::default()), adapter: "test".into(), history: None }
    }

    async fn sequences(s: &mut DetectionStream, n: usize) -> Vec<u64> {
        let mut out = Vec::new();
        for _ in 0..n {
            out.push(s.next().await.expect("a detection").expect("not an error").sequence);
        }
        out
    }

    #[tokio::test]
    async fn a_subscriber_that_resumes_gets_what_it_missed_once_and_in_order() {
        let svc = service(64);
        let mut first = open(&svc, SubscribeRequest::default()).await;
        for i in 0..10 {
            svc.hub.publish(&outcome(i, Survey::Ztf, 6.0));
        }
        assert_eq!(sequences(&mut first, 4).await, vec![1, 2, 3, 4]);
        drop(first);
        for i in 10..15 {
            svc.hub.publish(&outcome(i, Survey::Ztf, 6.0));
        }
        let mut again = open(&svc, SubscribeRequest { after_sequence: Some(4), ..Default::default() }).await;
        assert_eq!(sequences(&mut again, 11).await, (5..=15).collect::<Vec<_>>());
        svc.hub.publish(&outcome(15, Survey::Ztf, 6.0));
        assert_eq!(sequences(&mut again, 1).await, vec![16], "then the live stream, nothing repeated");
        // A filter applies to the replayed part too.
        let mut some = open(&svc, SubscribeRequest { after_sequence: Some(0), min_score: 7.0, ..Default::default() }).await;
        svc.hub.publish(&outcome(16, Survey::Ztf, 8.0));
        assert_eq!(sequences(&mut some, 1).await, vec![17]);
    }

    #[test]
    fn resuming_while_detections_pour_in_misses_and_repeats_nothing() {
        let hub = Hub::with_replay(100_000, 100_000);
        let total = 20_000u64;
        let publisher = {
            let hub = hub.clone();
            std::thread::spawn(move || {
                for i in 0..total as usize {
                    hub.publish(&outcome(i, Survey::Ztf, 6.0));
                }
            })
        };
        let mut resumed = 0;
        // At least once: on a loaded machine the publisher can finish before the first look
        // (then `resumed > 0` failed, 1 run in a few hundred).
        loop {
            let poured = hub.latest() >= total;
            let after = hub.latest() / 2;
            let (backlog, mut rx) = hub.resume(Some(after)).expect("retained");
            let mut seen: Vec<u64> = backlog.iter().map(|d| d.sequence).collect();
            let upto = seen.last().copied().unwrap_or(after);
            // The receiver holds exactly what came after the backlog.
            if let Ok(d) = rx.try_recv() {
                assert_eq!(d.sequence, upto + 1, "the live stream starts right after the backlog");
                seen.push(d.sequence);
            }
            let want: Vec<u64> = (after + 1..=after + seen.len() as u64).collect();
            assert_eq!(seen, want);
            resumed += 1;
            if poured {
                break;
            }
        }
        publisher.join().unwrap();
        assert!(resumed > 0);
        assert_eq!(hub.latest(), total);
    }

    #[tokio::test]
    async fn resuming_from_what_is_gone_or_not_yet_made_is_refused_plainly() {
        let svc = service_with_replay(64, 5);
        for i in 0..10 {
            svc.hub.publish(&outcome(i, Survey::Ztf, 6.0));
        }
        let asked = |after| svc.subscribe(Request::new(SubscribeRequest { after_sequence: Some(after), ..Default::default() }));
        let mut everything = open(&svc, SubscribeRequest { after_sequence: Some(0), ..Default::default() }).await;
        assert_eq!(sequences(&mut everything, 5).await, vec![6, 7, 8, 9, 10], "0: all that is kept");
        let old = asked(2).await.err().expect("refused");
        assert_eq!(old.code(), tonic::Code::OutOfRange);
        assert!(old.message().contains("oldest kept is 6"), "{}", old.message());
        let ahead = asked(11).await.err().expect("refused");
        assert_eq!(ahead.code(), tonic::Code::FailedPrecondition);
        assert!(ahead.message().contains("latest is 10"), "{}", ahead.message());
        let mut ok = open(&svc, SubscribeRequest { after_sequence: Some(5), ..Default::default() }).await;
        assert_eq!(sequences(&mut ok, 5).await, vec![6, 7, 8, 9, 10]);
        let mut at_end = open(&svc, SubscribeRequest { after_sequence: Some(10), ..Default::default() }).await;
        svc.hub.publish(&outcome(10, Survey::Ztf, 6.0));
        assert_eq!(sequences(&mut at_end, 1).await, vec![11]);
    }

    #[tokio::test]
    async fn timescale_cone_and_object_filters() {
        let svc = service(64);
        let mut o = outcome(0, Survey::Ztf, 6.0);
        (o.meta.ra, o.meta.dec, o.meta.object_id) = (150.0, 2.0, "ZTF21abc".into());
        let far = Outcome { meta: AlertMeta { ra: 150.0, dec: 2.2, object_id: "ZTF21xyz".into(), ..o.meta.clone() }, ..o.clone() };
        let req = |f: fn(&mut SubscribeRequest)| {
            let mut r = SubscribeRequest::default();
            f(&mut r);
            r
        };
        let stacks = open(&svc, req(|r| r.timescales = vec!["3n".into()])).await;
        let epochs = open(&svc, req(|r| r.timescales = vec!["EPOCH".into()])).await;
        // 0.1 degree around (150, 2): 360 arcsec, the far one is 720 arcsec away.
        let cone = open(&svc, req(|r| r.cone = Some(Cone { ra: 150.0, dec: 2.0, radius: 0.1 }))).await;
        let object = open(&svc, req(|r| r.object_ids = vec!["ZTF21xyz".into()])).await;
        svc.hub.publish(&o); // 1
        svc.hub.publish_stack(&o, "stack:3n", 7.0, 1.0, 0.1); // 2
        svc.hub.publish_stack(&o, "stack:10n", 8.0, 1.0, 0.1); // 3
        svc.hub.publish(&far); // 4
        svc.hub.publish_stack(&far, "stack:3n", 9.0, 1.0, 0.1); // 5
        svc.hub.close();
        let seqs = |s: DetectionStream| async move { s.map(|d| d.unwrap().sequence).collect::<Vec<_>>().await };
        assert_eq!(seqs(stacks).await, vec![2, 5]);
        assert_eq!(seqs(epochs).await, vec![1, 4]);
        assert_eq!(seqs(cone).await, vec![1, 2, 3]);
        assert_eq!(seqs(object).await, vec![4, 5]);

        for bad in [
            req(|r| r.timescales = vec!["weekly".into()]),
            req(|r| r.cone = Some(Cone { ra: 10.0, dec: 95.0, radius: 1.0 })),
            req(|r| r.cone = Some(Cone { ra: 10.0, dec: 5.0, radius: 0.0 })),
            req(|r| r.cone = Some(Cone { ra: f64::NAN, dec: 5.0, radius: 1.0 })),
        ] {
            let e = svc.subscribe(Request::new(bad.clone())).await.err().expect("refused");
            assert_eq!(e.code(), tonic::Code::InvalidArgument, "{bad:?}: {}", e.message());
        }
    }

    #[test]
    fn timescales_are_written_as_detections_carry_them() {
        assert_eq!(normalise_timescale("epoch").as_deref(), Some("epoch"));
        assert_eq!(normalise_timescale("3n").as_deref(), Some("stack:3n"));
        assert_eq!(normalise_timescale("stack:3.0n").as_deref(), Some("stack:3n"));
        assert_eq!(normalise_timescale("stack:0.5n").as_deref(), Some("stack:0.5n"));
        for bad in ["", "n", "stack:n", "-1n", "3", "stack:3d", "NaNn", "infn"] {
            assert_eq!(normalise_timescale(bad), None, "{bad:?}");
        }
    }

    async fn open(svc: &BlinkService, req: SubscribeRequest) -> DetectionStream {
        svc.subscribe(Request::new(req)).await.expect("subscribe").into_inner()
    }

    #[tokio::test]
    async fn a_slow_subscriber_is_told_and_dropped_while_others_keep_up() {
        let svc = service(4);
        let mut slow = open(&svc, SubscribeRequest::default()).await;
        let mut fast = open(&svc, SubscribeRequest::default()).await;
        for i in 0..4 {
            svc.hub.publish(&outcome(i, Survey::Ztf, 6.0));
            assert_eq!(fast.next().await.unwrap().unwrap().alert_id, format!("a{i}"));
        }
        for i in 4..10 {
            svc.hub.publish(&outcome(i, Survey::Ztf, 6.0));
            assert_eq!(fast.next().await.unwrap().unwrap().alert_id, format!("a{i}"));
        }
        // The slow one never read: its buffer of 4 overflowed.
        let err = slow.next().await.unwrap().unwrap_err();
        assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err}");
        assert!(slow.next().await.is_none(), "disconnected after the status");
        assert_eq!(Metrics::get(&svc.metrics.subscribers), 1);
    }

    #[tokio::test]
    async fn filters_and_close() {
        let svc = service(16);
        let req = SubscribeRequest {
            min_score: 5.0,
            surveys: vec!["LSST".into()],
            bands: vec!["r".into()],
            ..Default::default()
        };
        let mut s = open(&svc, req).await;
        svc.hub.publish(&outcome(0, Survey::Ztf, 9.0)); // wrong survey
        svc.hub.publish(&outcome(1, Survey::Rubin, 2.0)); // below min score
        svc.hub.publish(&outcome(2, Survey::Rubin, -7.0)); // |score| counts
        svc.hub.close();
        let got: Vec<_> = s.by_ref().collect().await;
        assert_eq!(got.len(), 1);
        let d = got[0].as_ref().unwrap();
        assert_eq!((d.alert_id.as_str(), d.sequence, d.id.as_str()), ("a2", 3, "rubin:a2"));

        let bad = svc.subscribe(Request::new(SubscribeRequest { min_score: -1.0, ..Default::default() })).await;
        assert_eq!(bad.err().unwrap().code(), tonic::Code::InvalidArgument);
        let bad = svc
            .subscribe(Request::new(SubscribeRequest { surveys: vec!["hst".into()], ..Default::default() }))
            .await;
        assert_eq!(bad.err().unwrap().code(), tonic::Code::InvalidArgument);
    }
}

//! The gRPC sink: a [`Hub`] fans results out to every `Subscribe` stream, each through a bounded
//! buffer; the tonic service (`proto/blink/v1/blink.proto`) serves `Subscribe` and `Status`.
//!
//! A subscriber that falls more than `grpc.subscriber_buffer` results behind gets
//! RESOURCE_EXHAUSTED and is disconnected: memory stays bounded and the others never stall.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use futures::Stream;
use tokio::net::TcpListener;
use tokio::sync::broadcast;
use tonic::{Request, Response, Status};

use crate::metrics::Metrics;
use crate::pipeline::Outcome;
use crate::proto::blink_server::{Blink, BlinkServer};
use crate::proto::{Detection, StatusReply, StatusRequest, SubscribeRequest};

/// Fan-out point between the pipeline and the subscribers. Cheap to clone.
#[derive(Clone)]
pub struct Hub {
    tx: broadcast::Sender<Arc<Detection>>,
    sequence: Arc<AtomicU64>,
    /// Turns true at shutdown: every stream sends what it still holds, then ends, so the gRPC
    /// server's graceful shutdown does not wait forever on open subscriptions.
    closed: Arc<tokio::sync::watch::Sender<bool>>,
}

impl Hub {
    pub fn new(buffer: usize) -> Hub {
        let (tx, _) = broadcast::channel(buffer.max(1));
        let (closed, _) = tokio::sync::watch::channel(false);
        Hub { tx, sequence: Arc::new(AtomicU64::new(0)), closed: Arc::new(closed) }
    }

    /// End every subscription once it has sent what it holds.
    pub fn close(&self) {
        self.closed.send_replace(true);
    }

    /// Hand a result to every current subscriber (none listening is fine: it is still delivered
    /// to the hub, which is what the ack waits for).
    pub fn publish(&self, o: &Outcome) -> u64 {
        self.send(o, "epoch", None)
    }

    /// Hand a stack detection to every subscriber: the alert `o` whose epoch made the stack,
    /// with the stack's score, flux and error and `timescale` (`stack:<N>n`). Its id is
    /// `<survey>:<alert id>:<timescale>`, stable like the epoch's.
    pub fn publish_stack(&self, o: &Outcome, timescale: &str, score: f64, flux: f64, flux_err: f64) -> u64 {
        self.send(o, timescale, Some((score, flux, flux_err)))
    }

    fn send(&self, o: &Outcome, timescale: &str, stack: Option<(f64, f64, f64)>) -> u64 {
        let sequence = self.sequence.fetch_add(1, Relaxed) + 1;
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
        };
        let _ = self.tx.send(Arc::new(d));
        sequence
    }

    /// Every detection published from now on, unfiltered (the gRPC streams and tests read this).
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Detection>> {
        self.tx.subscribe()
    }
}

/// A subscriber's server-side filter.
#[derive(Debug, Clone)]
pub struct Filter {
    min_score: f64,
    surveys: Vec<String>,
    bands: Vec<String>,
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
        Ok(Filter {
            min_score: r.min_score,
            surveys: r.surveys.iter().map(|s| s.to_ascii_lowercase()).collect(),
            bands: r.bands.clone(),
        })
    }

    pub fn matches(&self, d: &Detection) -> bool {
        d.score.abs() >= self.min_score
            && (self.surveys.is_empty()
                || self.surveys.iter().any(|s| {
                    crate::alert::Survey::parse(s).map(|s| s.as_str()) == Some(d.survey.as_str())
                }))
            && (self.bands.is_empty() || self.bands.contains(&d.band))
    }
}

pub struct BlinkService {
    hub: Hub,
    metrics: Arc<Metrics>,
    adapter: String,
}

/// Decrements the subscriber gauge when a stream ends, however it ends.
struct SubscriberGuard(Arc<Metrics>);

impl Drop for SubscriberGuard {
    fn drop(&mut self) {
        self.0.subscribers.fetch_sub(1, Relaxed);
    }
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
        let rx = self.hub.subscribe();
        let closed = self.hub.closed.subscribe();
        self.metrics.subscribers.fetch_add(1, Relaxed);
        let guard = SubscriberGuard(self.metrics.clone());
        let stream = futures::stream::unfold(
            (rx, closed, filter, guard, false),
            |(mut rx, mut closed, filter, guard, finished)| async move {
                if finished {
                    return None;
                }
                loop {
                    let next = if *closed.borrow() {
                        // Shutting down: drain what is buffered, then end the stream.
                        match rx.try_recv() {
                            Ok(d) => Ok(d),
                            Err(broadcast::error::TryRecvError::Lagged(n)) => {
                                Err(broadcast::error::RecvError::Lagged(n))
                            }
                            Err(_) => return None,
                        }
                    } else {
                        tokio::select! {
                            r = rx.recv() => r,
                            _ = closed.changed() => continue,
                        }
                    };
                    match next {
                        Ok(d) if filter.matches(&d) => {
                            let state = (rx, closed, filter, guard, false);
                            return Some((Ok(d.as_ref().clone()), state));
                        }
                        Ok(_) => continue,
                        Err(broadcast::error::RecvError::Lagged(n)) => {
                            let status = Status::resource_exhausted(format!(
                                "subscriber too slow: {n} detections dropped from its buffer; \
                                 reconnect (and read faster, or raise grpc.subscriber_buffer)"
                            ));
                            return Some((Err(status), (rx, closed, filter, guard, true)));
                        }
                        Err(broadcast::error::RecvError::Closed) => return None,
                    }
                }
            },
        );
        Ok(Response::new(Box::pin(stream)))
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
        }))
    }
}

/// Serve `Subscribe` and `Status` on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    hub: Hub,
    metrics: Arc<Metrics>,
    adapter: String,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    let service = BlinkService { hub, metrics, adapter };
    tonic::transport::Server::builder()
        .add_service(BlinkServer::new(service))
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
mod tests {
    use super::*;
    use crate::alert::Survey;
    use crate::engine::SubtractionResult;
    use crate::pipeline::{AckToken, AlertMeta};
    use futures::StreamExt;

    fn outcome(i: usize, survey: Survey, score: f32) -> Outcome {
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
        }
    }

    fn service(buffer: usize) -> BlinkService {
        BlinkService { hub: Hub::new(buffer), metrics: Arc::new(Metrics::default()), adapter: "test".into() }
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
        let req = SubscribeRequest { min_score: 5.0, surveys: vec!["LSST".into()], bands: vec!["r".into()] };
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

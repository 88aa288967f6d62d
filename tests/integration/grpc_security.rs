//! Issue 6: the gRPC server's bearer tokens and TLS (`[grpc]` tokens, tokens_file, tls_cert,
//! tls_key), through real connections on loopback with `blink subscribe`'s own client code
//! (`cli::subscribe::connect`) and the test certificates of `testdata/tls/`.

use std::path::PathBuf;
use std::sync::Arc;

use blink::cli::subscribe::{connect, ConnectArgs};
use blink::config::{Config, GrpcConfig, Secret};
use blink::metrics::Metrics;
use blink::proto::{StatusRequest, SubscribeRequest};
use blink::service::{HistoryBackend, Service, ServiceError};
use blink::sink::grpc::{bind, serve, Hub, Security};

const TOKEN: &str = "test-token-7f3a9c";

fn tls_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("testdata/tls")
}

/// A server with `g`'s security on a free port; its address and a way to stop it.
async fn server(g: &GrpcConfig) -> (std::net::SocketAddr, Hub, tokio::sync::oneshot::Sender<()>) {
    let security = Security::from_config(g).expect("usable security settings");
    let (listener, addr) = bind("127.0.0.1:0").await.unwrap();
    let hub = Hub::new(64);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(serve(listener, hub.clone(), Arc::new(Metrics::default()), "test".into(), security, None, async move {
        let _ = stopped.await;
    }));
    (addr, hub, stop)
}

fn args(addr: String, token: Option<&str>, ca: bool) -> ConnectArgs {
    ConnectArgs { addr, token: token.map(str::to_string), ca_cert: ca.then(|| tls_dir().join("ca.crt")) }
}

#[tokio::test]
async fn without_the_token_a_call_is_unauthenticated_with_it_it_goes_through() {
    let g = GrpcConfig { tokens: vec![Secret::new(TOKEN)], ..Default::default() };
    let (addr, _hub, _stop) = server(&g).await;
    let url = format!("http://{addr}");
    for (token, what) in [(None, "no token"), (Some("wrong-token"), "a wrong token"), (Some(&TOKEN[..TOKEN.len() - 1]), "a prefix of the token")] {
        let mut c = connect(&args(url.clone(), token, false)).await.unwrap();
        let e = c.status(StatusRequest {}).await.expect_err(what);
        assert_eq!(e.code(), tonic::Code::Unauthenticated, "{what}: {e}");
        assert!(!e.message().contains(TOKEN), "the token is echoed: {}", e.message());
        let e = c.subscribe(SubscribeRequest::default()).await.expect_err(what);
        assert_eq!(e.code(), tonic::Code::Unauthenticated, "{what}: {e}");
    }
    let mut c = connect(&args(url, Some(TOKEN), false)).await.unwrap();
    assert_eq!(c.status(StatusRequest {}).await.unwrap().into_inner().health, "ok");
    assert!(c.subscribe(SubscribeRequest::default()).await.is_ok());
}

#[tokio::test]
async fn tls_with_a_token_serves_only_clients_that_trust_the_ca() {
    let dir = tls_dir();
    let tokens_file = std::env::temp_dir().join(format!("blink-tokens-{}.txt", std::process::id()));
    std::fs::write(&tokens_file, format!("# operators\n\nother-token\n{TOKEN}\n")).unwrap();
    let g = GrpcConfig {
        tokens_file: Some(tokens_file.clone()),
        tls_cert: Some(dir.join("server.crt")),
        tls_key: Some(dir.join("server.key")),
        ..Default::default()
    };
    let (addr, hub, _stop) = server(&g).await;
    let url = format!("https://127.0.0.1:{}", addr.port());
    // A token from the file, over TLS: served, and a detection comes through.
    let mut c = connect(&args(url.clone(), Some(TOKEN), true)).await.unwrap();
    assert_eq!(c.status(StatusRequest {}).await.unwrap().into_inner().health, "ok");
    let mut other = connect(&args(url.clone(), Some("other-token"), true)).await.unwrap();
    assert!(other.status(StatusRequest {}).await.is_ok(), "every token of the file is accepted");
    let mut stream = c.subscribe(SubscribeRequest::default()).await.unwrap().into_inner();
    let sims = blink::sim::simulate_alerts(1, 3, &Default::default());
    let o = outcome(&sims[0]);
    hub.publish(&o);
    assert_eq!(stream.message().await.unwrap().unwrap().alert_id, sims[0].alert_id);
    // Plain text to a TLS server does not get a reply.
    let plain = connect(&args(format!("http://{addr}"), Some(TOKEN), false)).await;
    if let Ok(mut p) = plain {
        assert!(p.status(StatusRequest {}).await.is_err(), "plain text answered by a TLS server");
    }
    // An https address needs the CA.
    let e = connect(&args(url, Some(TOKEN), false)).await.expect_err("refused without --ca-cert");
    assert!(e.to_string().contains("--ca-cert"), "{e}");
    let _ = std::fs::remove_file(tokens_file);
}

fn outcome(a: &blink::alert::Alert) -> blink::pipeline::Outcome {
    blink::pipeline::Outcome {
        token: blink::pipeline::AckToken { topic: "t".into(), partition: 0, offset: 0 },
        meta: blink::pipeline::AlertMeta {
            survey: a.survey,
            alert_id: a.alert_id.clone(),
            object_id: a.object_id.clone(),
            ra: a.ra,
            dec: a.dec,
            mjd_tai: a.mjd_tai,
            band: a.band.clone(),
            survey_snr: None,
            stamp_x: a.candidate.stamp_x,
            stamp_y: a.candidate.stamp_y,
        },
        result: blink::engine::SubtractionResult { flux_scale: 1.0, background: 0.0, flux: 1.0, flux_err: 0.1, score: 10.0 },
        detected: true,
        new_object: false,
    }
}

#[tokio::test]
async fn unusable_security_settings_stop_start_up_naming_the_file() {
    let missing = tls_dir().join("no-such.crt");
    let mut cfg = Config::default();
    cfg.grpc.tls_cert = Some(missing.clone());
    cfg.grpc.tls_key = Some(tls_dir().join("server.key"));
    let e = Service::start_with(&cfg, "unused:9092", HistoryBackend::Memory).await.err().expect("refused");
    assert!(matches!(e, ServiceError::Security(_)) && e.to_string().contains("no-such.crt"), "{e}");

    // A key that is not a key.
    cfg.grpc.tls_cert = Some(tls_dir().join("server.crt"));
    cfg.grpc.tls_key = Some(tls_dir().join("README.md"));
    let e = Service::start_with(&cfg, "unused:9092", HistoryBackend::Memory).await.err().expect("refused");
    assert!(e.to_string().contains("not a usable certificate and key"), "{e}");

    let empty = std::env::temp_dir().join(format!("blink-no-tokens-{}.txt", std::process::id()));
    std::fs::write(&empty, "# nothing here\n\n").unwrap();
    let g = GrpcConfig { tokens_file: Some(empty.clone()), ..Default::default() };
    let e = Security::from_config(&g).expect_err("no token");
    assert!(e.to_string().contains("holds no token"), "{e}");
    let _ = std::fs::remove_file(empty);

    // Only one half of TLS, or a blank token: the config itself is refused.
    let half = Config::load(None, [("BLINK__GRPC__TLS_CERT".to_string(), "a.pem".to_string())]).unwrap_err();
    assert!(half.to_string().contains("tls_key"), "{half}");
    let blank = Config::load(None, [("BLINK__GRPC__TOKENS".to_string(), "[\"a b\"]".to_string())]).unwrap_err();
    assert!(blank.to_string().contains("grpc.tokens[0]"), "{blank}");
}

#[test]
fn tokens_never_reach_a_log() {
    let cfg = Config::load(None, [("BLINK__GRPC__TOKENS".to_string(), format!("[\"{TOKEN}\"]"))]).unwrap();
    assert_eq!(cfg.grpc.tokens[0].expose(), TOKEN);
    let shown = format!("{cfg:?} {:?}", Security::from_config(&cfg.grpc).unwrap());
    assert!(!shown.contains(TOKEN), "{shown}");
}

//! `examples/python/subscribe.py` (grpcio) against a live server with TLS and a bearer token
//! (`testdata/tls/`): alerts through the embedded Kafka cluster and the pipeline, then the Python
//! client resumes from sequence 0 and prints every result, a filtered one prints only what its
//! filter lets through, and one without the token is turned away.
//!
//! The example's requirements are installed into a virtual environment under cargo's target
//! folder (kept between runs; ~10 s the first time, from PyPI). This test needs `python3` with
//! `venv` and the package index; `BLINK_SKIP_PYTHON_EXAMPLE=1` skips it, saying so, on a
//! machine without them.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use blink::service::{HistoryBackend, Service};
use blink::sim::{simulate_alerts, AlertSimConfig};
use blink::source::kafka::EmbeddedKafka;

use crate::common::{publish_alerts, service_config, wait_done};

const TOKEN: &str = "python-example-token";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A Python with the example's requirements, made once per target folder.
fn python() -> PathBuf {
    let venv = Path::new(env!("CARGO_TARGET_TMPDIR")).join("python-example-venv");
    let py = venv.join("bin").join("python");
    let ready = || Command::new(&py).args(["-c", "import grpc, grpc_tools"]).status().is_ok_and(|s| s.success());
    if !ready() {
        let made = Command::new("python3").args(["-m", "venv"]).arg(&venv).status();
        assert!(made.is_ok_and(|s| s.success()), "python3 -m venv {} failed: python3 with venv is needed (BLINK_SKIP_PYTHON_EXAMPLE=1 skips this test)", venv.display());
        let req = repo().join("examples/python/requirements.txt");
        let pip = Command::new(&py).args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check", "-r"]).arg(&req).status();
        assert!(pip.is_ok_and(|s| s.success()), "pip install -r {} failed (BLINK_SKIP_PYTHON_EXAMPLE=1 skips this test)", req.display());
        assert!(ready(), "grpcio installed but not importable");
    }
    py
}

/// Run the example with `args` against `addr`; its JSON lines.
fn run_example(py: &Path, addr: &str, args: &[&str]) -> Vec<serde_json::Value> {
    let out = Command::new(py)
        .arg(repo().join("examples/python/subscribe.py"))
        .args(["--addr", addr, "--timeout", "60", "--ca-cert"])
        .arg(repo().join("testdata/tls/ca.crt"))
        .args(args)
        .env("BLINK_TOKEN", TOKEN)
        .output()
        .expect("run subscribe.py");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "subscribe.py {args:?} failed: {stderr}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l:?}: {e}")))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_example_receives_detections_from_a_live_server() {
    if std::env::var("BLINK_SKIP_PYTHON_EXAMPLE").is_ok_and(|v| v == "1") {
        eprintln!("BLINK_SKIP_PYTHON_EXAMPLE=1: the Python example is not run");
        return;
    }
    let py = tokio::task::spawn_blocking(python).await.unwrap();

    let topic = "python-example".to_string();
    let embedded = EmbeddedKafka::start(std::slice::from_ref(&topic), 1).unwrap();
    let brokers = embedded.bootstrap_servers();
    let mut cfg = service_config(&topic);
    let tls = repo().join("testdata/tls");
    cfg.grpc.tls_cert = Some(tls.join("server.crt"));
    cfg.grpc.tls_key = Some(tls.join("server.key"));
    cfg.grpc.tokens = vec![blink::config::Secret::new(TOKEN)];
    let service = Service::start_with(&cfg, &brokers, HistoryBackend::Memory).await.unwrap();
    let addr = format!("localhost:{}", service.grpc_addr.port());

    let sims = simulate_alerts(8, 11, &AlertSimConfig::default());
    publish_alerts(&brokers, &topic, &sims).await;
    wait_done(&service.metrics, sims.len() as u64).await;

    // Every result, replayed from the server's ring: in order, once each.
    let (p, a) = (py.clone(), addr.clone());
    let n = sims.len().to_string();
    let all = tokio::task::spawn_blocking(move || run_example(&p, &a, &["--after", "0", "--limit", &n])).await.unwrap();
    let seqs: Vec<u64> = all.iter().map(|d| d["sequence"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (1..=sims.len() as u64).collect::<Vec<_>>());
    let ids: BTreeSet<String> = all.iter().map(|d| d["id"].as_str().unwrap().to_string()).collect();
    let want: BTreeSet<String> = sims.iter().map(|s| format!("native:{}", s.alert_id)).collect();
    assert_eq!(ids, want);
    assert!(all.iter().all(|d| d["score"].as_f64().is_some_and(f64::is_finite) && d["timescale"] == "epoch"));

    // A filter: one object only, then the live stream (it ends at --limit).
    let one = sims[3].object_id.clone();
    let (p, a) = (py.clone(), addr.clone());
    let only = tokio::task::spawn_blocking(move || run_example(&p, &a, &["--after", "0", "--object", &one, "--limit", "1"])).await.unwrap();
    assert_eq!(only.len(), 1);
    assert_eq!(only[0]["object_id"].as_str(), Some(sims[3].object_id.as_str()));

    // Its errors are plain: resuming beyond the latest; no token.
    let refused = |extra: &[&str], token: Option<&str>| {
        let mut c = Command::new(&py);
        c.arg(repo().join("examples/python/subscribe.py"))
            .args(["--addr", &addr, "--timeout", "30", "--ca-cert"])
            .arg(repo().join("testdata/tls/ca.crt"))
            .args(extra)
            .env_remove("BLINK_TOKEN");
        if let Some(t) = token {
            c.env("BLINK_TOKEN", t);
        }
        let out = c.output().unwrap();
        assert!(!out.status.success(), "{extra:?} succeeded");
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    let ahead = refused(&["--after", "999999"], Some(TOKEN));
    assert!(ahead.contains("FAILED_PRECONDITION") && ahead.contains("latest is"), "{ahead}");
    let anonymous = refused(&[], None);
    assert!(anonymous.contains("UNAUTHENTICATED"), "{anonymous}");

    service.stop().await;
    drop(embedded);
}

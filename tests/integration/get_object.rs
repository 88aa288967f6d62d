//! Issue 6, `GetObject` and `blink object`: an object's epochs from the history store of a
//! running server (embedded Kafka → pipeline → store), with PNG thumbnails and raw pixels;
//! `Detection.new_object` on the alert that created the object.

use blink::proto::blink_client::BlinkClient;
use blink::proto::{GetObjectRequest, SubscribeRequest};
use blink::service::{HistoryBackend, Service};
use blink::sim::{simulate_alerts, AlertSimConfig};
use blink::source::kafka::EmbeddedKafka;

use crate::common::{publish_alerts, service_config, wait_done};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_objects_epochs_come_back_with_thumbnails_and_pixels() {
    let topic = "get-object".to_string();
    let embedded = EmbeddedKafka::start(std::slice::from_ref(&topic), 1).unwrap();
    let brokers = embedded.bootstrap_servers();
    let cfg = service_config(&topic);
    let service = Service::start_with(&cfg, &brokers, HistoryBackend::Memory).await.unwrap();

    // Three nights of one object, and one alert of another.
    let mut sims = simulate_alerts(4, 8, &AlertSimConfig::default());
    for (i, a) in sims.iter_mut().enumerate().take(3) {
        a.object_id = "obj-repeat".into();
        a.mjd_tai = 61000.0 + i as f64;
    }
    publish_alerts(&brokers, &topic, &sims).await;
    wait_done(&service.metrics, sims.len() as u64).await;
    let addr = format!("http://{}", service.grpc_addr);
    let mut client = BlinkClient::connect(addr.clone()).await.unwrap();

    // new_object: the first alert of each object only.
    let mut s = client.subscribe(SubscribeRequest { after_sequence: Some(0), ..Default::default() }).await.unwrap().into_inner();
    let mut firsts = Vec::new();
    for _ in 0..sims.len() {
        let d = s.message().await.unwrap().unwrap();
        firsts.push((d.alert_id.clone(), d.new_object));
    }
    for (id, new) in &firsts {
        let want = *id == sims[0].alert_id || *id == sims[3].alert_id;
        assert_eq!(*new, want, "new_object of {id}: {firsts:?}");
    }

    let r = client
        .get_object(GetObjectRequest { object_id: "obj-repeat".into(), pixels: true, ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((r.key.as_str(), r.survey.as_str(), r.epochs_total), ("native:id:obj-repeat", "native", 3));
    let ids: Vec<&str> = r.epochs.iter().map(|e| e.alert_id.as_str()).collect();
    assert_eq!(ids, sims[..3].iter().map(|a| a.alert_id.as_str()).collect::<Vec<_>>(), "by MJD");
    for e in &r.epochs {
        let d = e.difference.as_ref().unwrap();
        assert_eq!(d.pixels.len(), (d.width * d.height) as usize);
        assert!(d.pixels.iter().any(|v| v.is_finite() && *v != 0.0));
        let png = image::load_from_memory(&d.png).expect("a PNG").to_luma8();
        assert_eq!((png.width(), png.height()), (d.width, d.height));
        assert!(e.score.is_finite() && e.flux_err > 0.0);
        assert!(!e.psf.as_ref().unwrap().png.is_empty());
    }
    // Latest epochs only, and without pixels.
    let r = client
        .get_object(GetObjectRequest { object_id: "obj-repeat".into(), survey: "native".into(), max_epochs: 2, ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.epochs.len(), 2);
    assert_eq!(r.epochs[1].alert_id, sims[2].alert_id);
    assert!(r.epochs[0].difference.as_ref().unwrap().pixels.is_empty());
    // What is not there.
    let e = client.get_object(GetObjectRequest { object_id: "nobody".into(), ..Default::default() }).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound, "{e}");
    let e = client.get_object(GetObjectRequest { object_id: "obj-repeat".into(), survey: "hst".into(), ..Default::default() }).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");

    // The command line: JSON and PNG files.
    let dir = std::env::temp_dir().join(format!("blink-object-{}", std::process::id()));
    let out = tokio::task::spawn_blocking({
        let (addr, dir) = (addr.clone(), dir.clone());
        move || {
            std::process::Command::new(env!("CARGO_BIN_EXE_blink"))
                .args(["object", "obj-repeat", "--addr", &addr, "--png-dir"])
                .arg(&dir)
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["epochs"].as_array().unwrap().len(), 3);
    for e in v["epochs"].as_array().unwrap() {
        let p = e["png"].as_str().unwrap();
        assert!(image::open(p).is_ok(), "{p}");
    }
    let _ = std::fs::remove_dir_all(&dir);
    service.stop().await;
    drop(embedded);
}

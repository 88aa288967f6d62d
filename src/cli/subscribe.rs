//! `blink subscribe` and `blink status`: small gRPC clients of a running blink.

use clap::Args;

use crate::proto::blink_client::BlinkClient;
use crate::proto::{Detection, StatusRequest, SubscribeRequest};

#[derive(Debug, Args)]
pub struct SubscribeArgs {
    /// Server address.
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    pub addr: String,
    /// Only results with |score| >= this many sigma (0 = every result).
    #[arg(long, default_value_t = 0.0)]
    pub min_score: f64,
    /// Only these surveys (ztf, rubin, native); repeat or comma-separate.
    #[arg(long = "survey", value_delimiter = ',')]
    pub surveys: Vec<String>,
    /// Only these bands (g, r, i, ...); repeat or comma-separate.
    #[arg(long = "band", value_delimiter = ',')]
    pub bands: Vec<String>,
    /// Stop after this many results (default: run until the server closes the stream).
    #[arg(long)]
    pub limit: Option<u64>,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Server address.
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    pub addr: String,
}

/// One result as a JSON object (the shape `blink subscribe` prints).
pub fn detection_json(d: &Detection) -> serde_json::Value {
    serde_json::json!({
        "sequence": d.sequence,
        "id": d.id,
        "survey": d.survey,
        "alert_id": d.alert_id,
        "object_id": d.object_id,
        "ra": d.ra,
        "dec": d.dec,
        "mjd_tai": d.mjd_tai,
        "band": d.band,
        "score": d.score,
        "flux": d.flux,
        "flux_err": d.flux_err,
        "survey_snr": if d.survey_snr.is_finite() { Some(d.survey_snr) } else { None },
        "detected": d.detected,
        "timescale": d.timescale,
        "flux_scale": d.flux_scale,
        "background": d.background,
    })
}

pub async fn subscribe(args: &SubscribeArgs) -> anyhow::Result<()> {
    let mut client = BlinkClient::connect(args.addr.clone())
        .await
        .map_err(|e| anyhow::anyhow!("cannot connect to {}: {e}", args.addr))?;
    let req = SubscribeRequest {
        min_score: args.min_score,
        surveys: args.surveys.clone(),
        bands: args.bands.clone(),
    };
    let mut stream = client.subscribe(req).await?.into_inner();
    let mut n = 0u64;
    while let Some(d) = stream.message().await? {
        println!("{}", detection_json(&d));
        n += 1;
        if args.limit.is_some_and(|l| n >= l) {
            break;
        }
    }
    Ok(())
}

pub async fn status(args: &StatusArgs) -> anyhow::Result<()> {
    let mut client = BlinkClient::connect(args.addr.clone())
        .await
        .map_err(|e| anyhow::anyhow!("cannot connect to {}: {e}", args.addr))?;
    let s = client.status(StatusRequest {}).await?.into_inner();
    let v = serde_json::json!({
        "health": s.health,
        "adapter": s.adapter,
        "messages_in": s.messages_in,
        "alerts_in": s.alerts_in,
        "detections_out": s.detections_out,
        "detected": s.detected,
        "dead_letters": s.dead_letters,
        "subscribers": s.subscribers,
        "batches": s.batches,
        "offsets_committed": s.offsets_committed,
    });
    println!("{v}");
    Ok(())
}

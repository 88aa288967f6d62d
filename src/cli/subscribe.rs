//! `blink subscribe` and `blink status`: small gRPC clients of a running blink.

use clap::Args;

use crate::proto::blink_client::BlinkClient;
use crate::proto::{Cone, Detection, StatusRequest, SubscribeRequest};

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
    /// Only these timescales: `epoch` (single-epoch subtraction) or a stack window
    /// (`stack:3n` or `3n`); repeat or comma-separate.
    #[arg(long = "timescale", value_delimiter = ',')]
    pub timescales: Vec<String>,
    /// Only detections within a cone on the sky: `RA,DEC,RADIUS` in degrees (ICRS).
    #[arg(long, value_name = "RA,DEC,RADIUS", allow_hyphen_values = true)]
    pub cone: Option<String>,
    /// Only these objects (the survey's object id); repeat or comma-separate.
    #[arg(long = "object", value_delimiter = ',')]
    pub object_ids: Vec<String>,
    /// Resume: first the detections the server still holds after this sequence number (the
    /// last one you received; 0 = the oldest kept), then the live stream.
    #[arg(long, value_name = "SEQUENCE")]
    pub after: Option<u64>,
    /// Stop after this many results (default: run until the server closes the stream).
    #[arg(long)]
    pub limit: Option<u64>,
}

/// `RA,DEC,RADIUS` (degrees) as a [`Cone`].
pub fn parse_cone(s: &str) -> anyhow::Result<Cone> {
    let v: Vec<f64> = s
        .split(',')
        .map(|x| x.trim().parse::<f64>())
        .collect::<Result<_, _>>()
        .map_err(|e| anyhow::anyhow!("--cone {s:?}: {e}; expected RA,DEC,RADIUS in degrees"))?;
    match v[..] {
        [ra, dec, radius] => Ok(Cone { ra, dec, radius }),
        _ => anyhow::bail!("--cone {s:?}: expected three numbers, RA,DEC,RADIUS in degrees"),
    }
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
        timescales: args.timescales.clone(),
        cone: args.cone.as_deref().map(parse_cone).transpose()?,
        object_ids: args.object_ids.clone(),
        after_sequence: args.after,
    };
    let mut stream = client.subscribe(req).await.map_err(|s| anyhow::anyhow!("subscribe refused: {}", s.message()))?.into_inner();
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

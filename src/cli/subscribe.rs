//! `blink subscribe` and `blink status`: small gRPC clients of a running blink.

use clap::Args;

use crate::proto::blink_client::BlinkClient;
use crate::proto::{Cone, Detection, StatusRequest, SubscribeRequest};

/// How to reach a blink server: address, token, TLS trust.
#[derive(Debug, Clone, Args)]
pub struct ConnectArgs {
    /// Server address; `https://` for a server with TLS (`grpc.tls_cert`).
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    pub addr: String,
    /// Bearer token, for a server with `grpc.tokens`.
    #[arg(long, env = "BLINK_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// PEM file of the CA that signed the server's certificate; needed for an https://
    /// address (the system's roots are not read).
    #[arg(long, value_name = "PEM")]
    pub ca_cert: Option<std::path::PathBuf>,
}

/// Adds `authorization: Bearer <token>` to every call when there is a token.
#[derive(Clone)]
pub struct BearerToken(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for BearerToken {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

/// A client of the server `c` names.
pub type Client = BlinkClient<tonic::service::interceptor::InterceptedService<tonic::transport::Channel, BearerToken>>;

/// Connect as `c` says, with errors that name the address and the file.
pub async fn connect(c: &ConnectArgs) -> anyhow::Result<Client> {
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};
    let mut ep = Endpoint::from_shared(c.addr.clone()).map_err(|e| anyhow::anyhow!("--addr {:?}: {e}", c.addr))?;
    if let Some(ca) = &c.ca_cert {
        let pem = std::fs::read(ca).map_err(|e| anyhow::anyhow!("--ca-cert {}: {e}", ca.display()))?;
        if !c.addr.starts_with("https://") {
            anyhow::bail!("--ca-cert is for TLS: use an https:// address (got {})", c.addr);
        }
        ep = ep
            .tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem)))
            .map_err(|e| anyhow::anyhow!("--ca-cert {}: {e}", ca.display()))?;
    } else if c.addr.starts_with("https://") {
        anyhow::bail!("{} is a TLS address: give the server's CA with --ca-cert PEM", c.addr);
    }
    let channel = ep.connect().await.map_err(|e| anyhow::anyhow!("cannot connect to {}: {e}", c.addr))?;
    let token = match &c.token {
        Some(t) => Some(
            format!("Bearer {t}")
                .parse()
                .map_err(|_| anyhow::anyhow!("the token holds characters a header cannot carry"))?,
        ),
        None => None,
    };
    Ok(BlinkClient::with_interceptor(channel, BearerToken(token)))
}

#[derive(Debug, Args)]
pub struct SubscribeArgs {
    #[command(flatten)]
    pub connect: ConnectArgs,
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
    /// last one you received; 0 = everything it still holds), then the live stream.
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
    #[command(flatten)]
    pub connect: ConnectArgs,
}

#[derive(Debug, Args)]
pub struct ObjectArgs {
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// The survey's object id, or the store's key of an object matched by position
    /// (`<survey>:hpx29:<cell>`).
    pub object_id: String,
    /// The survey (ztf, rubin, native), when several have this id.
    #[arg(long, default_value = "")]
    pub survey: String,
    /// Only the latest this many epochs (0: the server's default, 100).
    #[arg(long, default_value_t = 0)]
    pub max_epochs: u32,
    /// Write each epoch's difference thumbnail here as `<alert_id>-<band>.png` (created).
    #[arg(long, value_name = "DIR")]
    pub png_dir: Option<std::path::PathBuf>,
}

pub async fn object(args: &ObjectArgs) -> anyhow::Result<()> {
    let mut client = connect(&args.connect).await?;
    let req = crate::proto::GetObjectRequest {
        object_id: args.object_id.clone(),
        survey: args.survey.clone(),
        pixels: false,
        max_epochs: args.max_epochs,
    };
    let r = client.get_object(req).await.map_err(|s| anyhow::anyhow!("GetObject: {}", s.message()))?.into_inner();
    if let Some(dir) = &args.png_dir {
        std::fs::create_dir_all(dir).map_err(|e| anyhow::anyhow!("--png-dir {}: {e}", dir.display()))?;
    }
    let mut epochs = Vec::new();
    for e in &r.epochs {
        let mut png = serde_json::Value::Null;
        if let (Some(dir), Some(d)) = (&args.png_dir, &e.difference) {
            // Alert ids and bands are the surveys' own: keep the file name to safe characters.
            let safe = |s: &str| s.chars().map(|c| if c.is_ascii_alphanumeric() || "-_.".contains(c) { c } else { '_' }).collect::<String>();
            let path = dir.join(format!("{}-{}.png", safe(&e.alert_id), safe(&e.band)));
            std::fs::write(&path, &d.png).map_err(|err| anyhow::anyhow!("{}: {err}", path.display()))?;
            png = serde_json::Value::String(path.display().to_string());
        }
        epochs.push(serde_json::json!({
            "alert_id": e.alert_id,
            "band": e.band,
            "mjd_tai": e.mjd_tai,
            "score": e.score,
            "flux": e.flux,
            "flux_err": e.flux_err,
            "stamp_x": e.stamp_x,
            "stamp_y": e.stamp_y,
            "png": png,
        }));
    }
    let announcements: Vec<serde_json::Value> = r
        .announcements
        .iter()
        .map(|a| serde_json::json!({"band": a.band, "nights": a.nights, "score": a.score, "mjd_tai": a.mjd_tai}))
        .collect();
    let v = serde_json::json!({
        "key": r.key,
        "survey": r.survey,
        "object_id": r.object_id,
        "ra": r.ra,
        "dec": r.dec,
        "epochs_total": r.epochs_total,
        "epochs": epochs,
        "announcements": announcements,
    });
    println!("{}", serde_json::to_string_pretty(&v)?);
    Ok(())
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
    let mut client = connect(&args.connect).await?;
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
    let mut client = connect(&args.connect).await?;
    let s = client.status(StatusRequest {}).await.map_err(|s| anyhow::anyhow!("status refused: {}", s.message()))?.into_inner();
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
        "epochs_stored": s.epochs_stored,
        "history_duplicates": s.history_duplicates,
        "stack_detections": s.stack_detections,
        "history_errors": s.history_errors,
        "output_errors": s.output_errors,
        "stacks_from_store": s.stacks_from_store,
        "resident_evictions": s.resident_evictions,
        "lag": s.lag,
        "notify": s.notify.map(|n| serde_json::json!({
            "queued": n.queued,
            "delivered": n.delivered,
            "retried": n.retried,
            "failed": n.failed,
            "deduplicated": n.deduplicated,
            "pending": n.pending,
            "rate_limited": n.rate_limited,
            "rule_errors": n.rule_errors,
        })),
    });
    println!("{v}");
    Ok(())
}

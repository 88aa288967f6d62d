//! `blink simulate`: write a simulated night folder (`docs/night-format.md`,
//! `docs/simulation.md`), and with `--publish` put its alerts on a Kafka topic. Flags override
//! the config file, which overrides the defaults.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use clap::Args;

use crate::sim::night::{self, SimConfig};

#[derive(Debug, Args)]
pub struct SimulateArgs {
    /// Folder to write the night into (created if needed; files of the same name are replaced).
    #[arg(long)]
    pub out: PathBuf,
    /// Number of nights [default: 10, or the config's].
    #[arg(long)]
    pub nights: Option<usize>,
    /// Science epochs per night [default: 3, or the config's].
    #[arg(long)]
    pub epochs_per_night: Option<usize>,
    /// Frame size WIDTHxHEIGHT in pixels [default: 2048x2048, or the config's].
    #[arg(long, value_parser = parse_size)]
    pub size: Option<(usize, usize)>,
    /// Seed of every random draw: the same seed gives the same files [default: 1].
    #[arg(long)]
    pub seed: Option<u64>,
    /// TOML file of simulation parameters (every key optional; see docs/simulation.md).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Do not write the night's alerts (alerts/*.avro).
    #[arg(long)]
    pub no_alerts: bool,
    /// After writing, publish the night's alerts to Kafka, one alert per message, frame by frame
    /// (as `blink publish` does with the files in alerts/).
    #[arg(long)]
    pub publish: bool,
    /// Kafka bootstrap servers for --publish, host:port[,host:port].
    #[arg(long, default_value = "localhost:9092")]
    pub brokers: String,
    /// Topic for --publish.
    #[arg(long, default_value = "alerts")]
    pub topic: String,
    /// With --publish: send the ZTF-shaped packets (alerts/*.ztf.avro) instead of blink's own.
    #[arg(long)]
    pub publish_ztf: bool,
    /// No progress lines on stderr.
    #[arg(long, short)]
    pub quiet: bool,
}

fn parse_size(s: &str) -> Result<(usize, usize), String> {
    let (w, h) = s
        .split_once(['x', 'X'])
        .ok_or_else(|| format!("size {s:?}: expected WIDTHxHEIGHT, e.g. 2048x2048"))?;
    let p = |v: &str| v.trim().parse::<usize>().map_err(|e| format!("size {s:?}: {v:?}: {e}"));
    Ok((p(w)?, p(h)?))
}

/// Turn the arguments into a validated configuration.
pub fn config(args: &SimulateArgs) -> anyhow::Result<SimConfig> {
    let mut cfg = match &args.config {
        Some(p) => SimConfig::from_file(p)?,
        None => SimConfig::default(),
    };
    if let Some(n) = args.nights {
        cfg.nights = n;
    }
    if let Some(k) = args.epochs_per_night {
        cfg.epochs_per_night = k;
    }
    if let Some((w, h)) = args.size {
        (cfg.width, cfg.height) = (w, h);
    }
    if let Some(s) = args.seed {
        cfg.seed = s;
    }
    if args.publish_ztf && !cfg.alerts.ztf {
        anyhow::bail!("--publish-ztf needs the ZTF-shaped packets that [alerts] ztf = false turns off");
    }
    if args.no_alerts {
        if args.publish {
            anyhow::bail!("--publish needs the alerts that --no-alerts turns off");
        }
        cfg.alerts.enabled = false;
    }
    cfg.validate()?;
    Ok(cfg)
}

pub async fn run(args: &SimulateArgs) -> anyhow::Result<()> {
    let cfg = config(args)?;
    let t0 = Instant::now();
    let quiet = args.quiet;
    let n = cfg.n_epochs();
    let out = args.out.clone();
    // CPU-bound work off the async runtime's threads.
    let summary = tokio::task::spawn_blocking(move || {
        let mut progress = |line: &str| {
            if !quiet {
                eprintln!("[{:6.1}s] {line}", t0.elapsed().as_secs_f64());
            }
        };
        progress(&format!(
            "simulating {} x {} epochs of {}x{} px into {}",
            cfg.nights,
            cfg.epochs_per_night,
            cfg.width,
            cfg.height,
            out.display()
        ));
        night::simulate(&cfg, &out, &mut progress)
    })
    .await
    .context("the simulation thread failed")?
    .with_context(|| format!("simulating into {}", args.out.display()))?;
    eprintln!(
        "wrote {n} frames, 1 template, {} alerts, manifest.toml and truth.csv to {} in {:.1}s: {} stars ({} saturated), {} galaxies, {} transients, {} variables",
        summary.alerts,
        args.out.display(),
        t0.elapsed().as_secs_f64(),
        summary.stars,
        summary.saturated_stars,
        summary.galaxies,
        summary.transients,
        summary.variables
    );
    if args.publish {
        let t1 = Instant::now();
        let n = publish(&args.out, &args.brokers, &args.topic, args.publish_ztf).await?;
        eprintln!("published {n} alerts to {} on {} in {:.1}s", args.topic, args.brokers, t1.elapsed().as_secs_f64());
    }
    Ok(())
}

/// Publish every alert of the night folder `dir` (frames in manifest order), one per message,
/// keyed by its frame's alert file and index; the ZTF-shaped packets when `ztf`. Returns how
/// many. Up to 256 sends are in flight.
pub async fn publish(dir: &std::path::Path, brokers: &str, topic: &str, ztf: bool) -> anyhow::Result<usize> {
    let manifest = night::manifest::Manifest::read(dir)?;
    let alerts_dir = dir.join(manifest.alerts.as_deref().context("the manifest lists no alerts folder")?);
    let producer = crate::source::kafka::producer(brokers)?;
    let mut n = 0;
    for f in &manifest.frames {
        let stem = std::path::Path::new(&f.file).file_stem().and_then(|s| s.to_str()).unwrap_or_default();
        let path = alerts_dir.join(if ztf { format!("{stem}.ztf.avro") } else { format!("{stem}.avro") });
        let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        let payloads = crate::source::replay::split_container(&bytes, &path.display().to_string())?;
        for (c, chunk) in payloads.chunks(256).enumerate() {
            let sends = chunk.iter().enumerate().map(|(i, p)| {
                let key = format!("{stem}#{}", c * 256 + i);
                let producer = &producer;
                async move { crate::source::kafka::publish(producer, topic, &key, p).await }
            });
            futures::future::try_join_all(sends).await.with_context(|| format!("publishing {}", path.display()))?;
            n += chunk.len();
        }
    }
    Ok(n)
}

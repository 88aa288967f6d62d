//! `blink simulate`: write a simulated night folder (`docs/night-format.md`,
//! `docs/simulation.md`). Flags override the config file, which overrides the defaults.

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
    if args.no_alerts {
        cfg.alerts.enabled = false;
    }
    cfg.validate()?;
    Ok(cfg)
}

pub fn run(args: &SimulateArgs) -> anyhow::Result<()> {
    let cfg = config(args)?;
    let t0 = Instant::now();
    let quiet = args.quiet;
    let n = cfg.n_epochs();
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
        args.out.display()
    ));
    let summary = night::simulate(&cfg, &args.out, &mut progress)
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
    Ok(())
}

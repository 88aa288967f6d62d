//! The command line: `blink demo | serve | subscribe | status | publish | inspect | simulate | detect | bench`. Raw arguments are parsed
//! once here (clap) and turned into validated values before any work starts.

pub mod bench;
pub mod demo;
pub mod detect;
pub mod publish;
pub mod serve;
pub mod simulate;
pub mod subscribe;
pub mod subtract;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "blink",
    version,
    about = "GPU transient detection on ZTF and Rubin alert streams",
    long_about = "blink consumes survey alerts (ZTF, Rubin) from Kafka, redoes the image subtraction \
of each alert's cutouts on the GPU (wgpu; the CPU engine where no adapter exists), scores the \
candidate with a matched filter, and streams the results over gRPC.\n\n\
Start with `blink demo`: it needs nothing installed and runs the whole chain on real fixture \
alerts through an in-process Kafka cluster.",
    after_help = "Logs go to stderr; set RUST_LOG=debug (or blink=debug) for more."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the whole chain on embedded defaults: in-process Kafka, real ZTF and Rubin fixture
    /// alerts plus simulated ones, the GPU (or llvmpipe / the CPU engine), a gRPC subscriber on
    /// loopback; print a table of results.
    Demo(demo::DemoArgs),
    /// Run the pipeline against real Kafka brokers, configured by a TOML file
    /// (see blink.example.toml for every key).
    Serve(serve::ServeArgs),
    /// Connect to a running blink and print results as JSON lines.
    Subscribe(subscribe::SubscribeArgs),
    /// Print a running blink's health and counters as JSON.
    Status(subscribe::StatusArgs),
    /// Print one object's history from a running blink's history store as JSON (epochs,
    /// measurements, stack announcements); `--png-dir` writes each epoch's difference stamp as
    /// a PNG thumbnail. Example: `blink object ZTF21abcdefg --png-dir thumbs`.
    Object(subscribe::ObjectArgs),
    /// Publish alert files to a Kafka topic, one alert per message as the surveys do
    /// (multi-alert Avro containers are split); for feeding `blink serve` by hand.
    Publish(publish::PublishArgs),
    /// Decode alert files (ZTF or Rubin Avro, Confluent-framed or containers) and print one JSON
    /// line per alert: ids, position, epoch, band, and each stamp's shape and NaN count.
    Inspect(InspectArgs),
    /// Write a simulated night folder: one FITS frame per epoch (stars, galaxies, transients,
    /// variable stars, cosmic rays, hot pixels; Moffat PSFs that change with the seeing), a deep
    /// template, manifest.toml, truth.csv and the alerts a survey would send (blink-native and
    /// ZTF-shaped Avro; --publish puts them on Kafka). The folder format is docs/night-format.md;
    /// every parameter is in docs/simulation.md. Example: `blink simulate --out night`.
    Simulate(simulate::SimulateArgs),
    /// Subtract every frame of a night folder from its template (PSF-matched, on the GPU or the
    /// CPU engine), detect on the matched-filter score image and write the catalogue (CSV: frame,
    /// mjd, band, x, y, ra, dec, score, flux, flux_err, mag, flags; docs/detections.md).
    /// Example: `blink detect night --out detections.csv`.
    Detect(detect::DetectArgs),
    /// Subtract one template from one science image (same pixel grid), HOTPANTS-style: writes the
    /// difference in science flux units and the score image in sigma as FITS. Example:
    /// `blink subtract --science sci.fits --template ref.fits --out-diff d.fits --out-score z.fits`.
    Subtract(subtract::SubtractArgs),
    /// Measure detection, speed and latency on a night folder with a truth table: runs `detect`
    /// and matches the catalogue to truth within 1.5 px (completeness vs optimal SNR and
    /// magnitude per kind, false positives per frame on stars / sky / artifacts, measured vs
    /// optimal SNR, score scatter on empty sky, frames/s, time per stage), and replays the
    /// night's alerts through the serve pipeline (alerts/s, latency p50/p95/p99, purity,
    /// completeness). Prints a table; --json and --plots write the rest (docs/bench.md).
    /// Example: `blink simulate --out night && blink bench night --plots night/plots`.
    Bench(bench::BenchArgs),
}

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// Alert files: Avro object containers (ZTF, Fink, blink native) or Confluent-framed Rubin
    /// messages; `.gz` files are inflated first.
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
    /// Folder of Rubin schemas (default: the copies built into blink).
    #[arg(long)]
    pub rubin_schema_dir: Option<PathBuf>,
    /// Confluent-compatible schema registry for Rubin schema ids not found locally.
    #[arg(long)]
    pub schema_registry: Option<String>,
}

/// Options shared by the commands that run the pipeline.
#[derive(Debug, Args, Clone)]
pub struct EngineArgs {
    /// Which engine runs the kernels: auto (GPU if wgpu finds an adapter, else CPU with a
    /// warning), gpu (fail without one) or cpu.
    #[arg(long, value_parser = ["auto", "gpu", "cpu"])]
    pub engine: Option<String>,
}

/// The engine asked for with `--engine` (default auto).
/// `--kernel-regularization` of `subtract`, `detect` and `bench`: a number in 0..1.
pub fn kernel_regularization(v: &str) -> Result<f64, String> {
    match v.parse::<f64>() {
        Ok(x) if x.is_finite() && (0.0..=1.0).contains(&x) => Ok(x),
        Ok(x) => Err(format!("{x} is not between 0 and 1")),
        Err(e) => Err(format!("{v:?} is not a number: {e}")),
    }
}

pub fn engine_preference(args: &EngineArgs) -> anyhow::Result<crate::engine::EnginePreference> {
    Ok(args.engine.as_deref().unwrap_or("auto").parse()?)
}

//! blink's score at the candidate against the survey's own SNR, on real alert packets (issue 4).
//!
//! ```sh
//! cargo run --release --example cutout_agreement                 # every fixture in testdata/, CPU engine
//! cargo run --release --example cutout_agreement -- --engine auto some/alerts/*.avro
//! cargo run --release --example cutout_agreement -- --json out.json
//! ```
//!
//! Prints one line per alert (survey SNR, blink's score in the survey's sign, the fit and the PSF
//! widths) and the summary: ZTF Spearman rank correlation and the share of survey ≥ 5σ alerts
//! that blink also scores ≥ 5, the Rubin median ratio. See `blink::bench::agreement`.

use std::path::PathBuf;

use blink::bench::agreement::{fixture_files, measure};
use blink::engine::{select_engine, EnginePreference, PrepareConfig};

fn main() -> anyhow::Result<()> {
    let mut files = Vec::new();
    let mut pref = EnginePreference::Cpu;
    let mut json: Option<PathBuf> = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--engine" => pref = args.next().unwrap_or_default().parse()?,
            "--json" => json = args.next().map(PathBuf::from),
            _ => files.push(PathBuf::from(a)),
        }
    }
    if files.is_empty() {
        files = fixture_files(&PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("testdata"));
    }
    let mut engine = select_engine(pref)?;
    let t0 = std::time::Instant::now();
    let agreement = measure(&files, engine.as_mut(), &PrepareConfig::default())?;
    print!("{}", agreement.table());
    println!("{} alerts in {:.2} s", agreement.rows.len(), t0.elapsed().as_secs_f64());
    if let Some(p) = json {
        std::fs::write(&p, serde_json::to_string_pretty(&agreement)?)?;
    }
    Ok(())
}

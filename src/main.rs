//! The `blink` binary: parse the command line, set up logging, run the command.
//! (`anyhow` lives only here and in `cli`; the library has typed errors.)

use std::process::ExitCode;

use blink::cli::{Cli, Command};
use clap::Parser;

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,blink=info,wgpu_hal::gles::egl=off")),
        )
        .with_writer(std::io::stderr)
        .init();

    if let Command::Inspect(args) = &cli.command {
        return inspect(args);
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("blink: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match &cli.command {
            Command::Demo(a) => blink::cli::demo::run(a).await,
            Command::Serve(a) => blink::cli::serve::run(a).await,
            Command::Subscribe(a) => blink::cli::subscribe::subscribe(a).await,
            Command::Status(a) => blink::cli::subscribe::status(a).await,
            Command::Object(a) => blink::cli::subscribe::object(a).await,
            Command::Publish(a) => blink::cli::publish::run(a).await,
            Command::Simulate(a) => blink::cli::simulate::run(a).await,
            Command::Detect(a) => blink::cli::detect::run(a).await,
            Command::Subtract(a) => blink::cli::subtract::run(a).await,
            Command::Bench(a) => blink::cli::bench::run(a).await,
            Command::Inspect(_) => unreachable!("handled above"),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("blink: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn inspect(args: &blink::cli::InspectArgs) -> ExitCode {
    let cfg = blink::decode::DecoderConfig {
        rubin_schema_dir: args.rubin_schema_dir.clone(),
        schema_registry_url: args.schema_registry.clone(),
        ..Default::default()
    };
    let decoder = match blink::decode::Decoder::new(cfg) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("blink inspect: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = blink::decode::inspect::run(
        &decoder,
        &args.files,
        &mut std::io::stdout().lock(),
        &mut std::io::stderr().lock(),
    );
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}

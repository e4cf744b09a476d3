//! The `kiln` binary: parses the command line, sets up tracing, runs the command, and exits
//! with the command's exit code (documented in `kiln::cli`).

use clap::Parser;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::prelude::*;

fn main() {
    // `kiln ... | head`: end quietly when the output's reader goes away.
    kiln::cli::end_quietly_on_closed_pipe();
    let cli = kiln::cli::Cli::parse();
    let server = matches!(
        cli.command,
        kiln::cli::Command::Serve(_) | kiln::cli::Command::Runner(_)
    );
    let default = if server { "info" } else { "warn" };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("kiln: cannot start the async runtime: {e}");
            std::process::exit(kiln::cli::exit::INTERNAL);
        }
    };
    // The OTLP exporter's channel is made inside the runtime.
    let entered = runtime.enter();
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_filter(
            EnvFilter::try_from_env("KILN_LOG").unwrap_or_else(|_| EnvFilter::new(default)),
        );
    let service = match cli.command {
        kiln::cli::Command::Serve(_) => Some("kiln-dispatcher"),
        kiln::cli::Command::Runner(_) => Some("kiln-runner"),
        _ => None,
    };
    // OpenTelemetry export for the dispatcher and the runner, when an OTLP endpoint is set.
    let (telemetry, otel) = match service.filter(|_| kiln::telemetry::configured()) {
        Some(service) => match kiln::telemetry::init(service) {
            Ok((t, layer)) => (Some(t), Some(layer.with_filter(LevelFilter::INFO))),
            Err(e) => {
                eprintln!("kiln: {e}; spans are not exported");
                (None, None)
            }
        },
        None => (None, None),
    };
    tracing_subscriber::registry().with(fmt).with(otel).init();
    drop(entered);
    // `kiln runner`: keep its token where build steps cannot read it (may start it again).
    if let Err(e) = kiln::cli::secure_start(&cli) {
        eprintln!("kiln: {e}");
        std::process::exit(kiln::cli::exit::USAGE);
    }
    let code = match runtime.block_on(kiln::cli::run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("kiln: {}", e.message);
            e.code
        }
    };
    // Spans still batched go out before the runtime their channel runs on stops.
    drop(telemetry);
    // Do not wait for lingering blocking tasks (a fetch in progress) on the way out.
    runtime.shutdown_timeout(std::time::Duration::from_secs(2));
    std::process::exit(code);
}

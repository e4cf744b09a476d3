//! `kiln bench`: benchmarks whose figures go into BENCHMARKS.md.

use clap::Args;

use crate::cli::CliError;

/// `kiln bench` arguments.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Which benchmark.
    pub which: String,
}

/// Runs a benchmark.
pub async fn run(args: BenchArgs) -> Result<i32, CliError> {
    Err(CliError { code: crate::cli::exit::USAGE, message: format!("unknown benchmark {}", args.which) })
}

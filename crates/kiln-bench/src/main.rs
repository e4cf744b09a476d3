//! `kiln-bench`: the benchmarks whose figures go into BENCHMARKS.md.
//!
//! A binary of its own, so nothing of it ships in `kiln`. It drives kiln only from outside:
//! the `kiln` binary (found beside this one, or at `$KILN_BIN`) and kiln's public client API
//! (the generated gRPC clients in `kiln::proto`).
//!
//! Every benchmark runs real parts: a `kiln serve` child on a loopback port with its data in a
//! temp dir, `kiln runner` children (or raw runner streams, for `runners`), git repositories
//! made with git2, and real followers (`kiln logs -f`, or the generated gRPC client). Each
//! prints its figures with the goal and a baseline measured in the same run, and the ratio.
//! Runs are bounded in size and time and stop by themselves; every child process (and what it
//! started) is killed when the benchmark ends, however it ends.
//!
//! - [`latency`]: live output latency at a `kiln logs -f` follower (p50, p99, max).
//! - [`throughput`]: MB/s of one step's output at a follower, completeness, dispatcher RSS.
//! - [`overhead`]: per-job overhead of a `true` step.
//! - [`runners`]: dispatcher RSS with many attached runners.
//! - [`trigger`]: time from a commit to its build's first output line, by webhook, hook and
//!   polling.
//! - [`failover`]: a killed runner's job running elsewhere; runners back after a dispatcher
//!   restart.
//! - [`idle`]: the dispatcher's CPU with idle runners attached.
//! - [`logs`]: stored output on disk and read speed, plain against sealed (seekable zstd).
//! - [`tail`]: the web page's tail of a small and a large log, with the checkpoint index and
//!   with a whole read.
//! - [`split`]: a synthetic test suite split over real runners: kiln's dynamic queue against
//!   the lower bound and static splits, per-unit overhead, flaky tests, a broken commit, a
//!   killed runner.
//!
//! Goals that are missed are reported, not treated as errors: the exit code is 0 when the
//! benchmarks ran and their output was complete, 1 when output was lost or a build did not
//! pass, 6 when a part could not be reached, and 7 when the benchmark itself could not run.

mod delay;
mod failover;
mod generate;
mod idle;
mod latency;
mod logs;
mod overhead;
mod runners;
mod scale;
mod split;
mod tail;
mod throughput;
mod trigger;
mod util;

use std::future::Future;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use tracing_subscriber::EnvFilter;

/// Exit codes of `kiln-bench`.
pub mod exit {
    /// The benchmarks ran and their output was complete (goals may still be missed).
    pub const OK: i32 = 0;
    /// Output was lost or corrupted, or a build did not pass.
    pub const FAILED: i32 = 1;
    /// A part of the farm could not be reached.
    pub const UNAVAILABLE: i32 = 6;
    /// The benchmark itself could not run.
    pub const INTERNAL: i32 = 7;
}

/// Why a benchmark did not complete, with its exit code.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct BenchError {
    /// Exit code ([`exit`]).
    pub code: i32,
    /// What to print.
    pub message: String,
}

fn main() {
    let args = BenchArgs::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_env("KILN_LOG").unwrap_or_else(|_| EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("kiln-bench: cannot start the async runtime: {e}");
            std::process::exit(exit::INTERNAL);
        }
    };
    let code = match runtime.block_on(run(args)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("kiln-bench: {}", e.message);
            e.code
        }
    };
    runtime.shutdown_timeout(Duration::from_secs(2));
    std::process::exit(code);
}

/// Resolves on the first SIGTERM or Ctrl-C.
async fn signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// `kiln-bench` arguments.
#[derive(Debug, Parser)]
#[command(
    name = "kiln-bench",
    version,
    about = "Kiln's benchmarks (figures in BENCHMARKS.md)"
)]
pub struct BenchArgs {
    /// Which benchmark.
    #[command(subcommand)]
    pub command: BenchCommand,
}

/// The benchmarks.
#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Latency of live output lines at a `kiln logs -f` follower (goal: p50 < 10 ms, p99 < 50 ms).
    Latency(latency::LatencyArgs),
    /// Rate of one step's output at a follower, completeness and dispatcher memory (goals:
    /// >= 100 MB/s, complete, RSS < 100 MB).
    Throughput(throughput::ThroughputArgs),
    /// Per-job overhead of a job whose step is `true` (goal: median < 20 ms).
    Overhead(overhead::OverheadArgs),
    /// Dispatcher memory with many attached runners (goal: < 150 MB with 1000).
    Runners(runners::RunnersArgs),
    /// Time from a commit to its build's first output line at a `kiln logs -f` follower, by
    /// webhook, post-receive hook and polling (goals: medians < 300 ms, polling at 1 s < 1.3 s).
    Trigger(trigger::TriggerArgs),
    /// A killed runner's job running on another runner, and every runner back after a
    /// dispatcher restart (goals: <= 2 s with the default heartbeat and with 500ms x 3, the
    /// reconnect grace being 1 s; 100 runners re-attached < 3 s).
    Failover(failover::FailoverArgs),
    /// The dispatcher's CPU with idle runners attached, against no runner (goal: < 0.025% of a
    /// core with 3, Buildbot's figure).
    Idle(idle::IdleArgs),
    /// Stored output: disk per MB and read speed of a finished job's log, plain against sealed
    /// (seekable zstd) (goals: < 0.25 MB per MB, >= 200 MB/s replay, < 10 ms p50 at an offset).
    Logs(logs::LogsArgs),
    /// Time to render a log's tail on the web page (locate + read of the last 256 KiB), a small
    /// against a large log, with the checkpoint index against a whole read (goal: the large
    /// one's < 2x the small one's).
    Tail(tail::TailArgs),
    /// A synthetic suite of about 1,000 tests split over 1 to 16 real runners: makespan against
    /// the lower bound, against hash, count and timing splits, per-unit overhead, flaky tests,
    /// a broken commit and a killed runner (goals at N = 16: <= 1.05x the bound, >= 1.6x faster
    /// than hash and 1.15x than timing, overhead < 2 ms median, retries <= 5% when 30% broken).
    Split(split::SplitArgs),
    /// How the store's costs per operation (submit, a scheduling decision, reads, a scrape)
    /// grow from 1,000 to 100,000 stored builds (goals: submit p99 < 20 ms, a decision's p50
    /// at most 1.5x the first stage's); with `--sessions 10,100,1000,10000` the whole
    /// dispatcher with that many simulated runners attached (assignments/s, submit, GetBuild and
    /// ListBuilds latency, RSS, CPU per decision).
    Scale(scale::ScaleArgs),
    /// All of the above but `split` and `scale` (each run on its own: minutes), `logs` and
    /// `tail` first.
    All(AllArgs),
    /// The output generators the benchmarks' steps run.
    #[command(hide = true)]
    Gen(generate::GenArgs),
    /// The test runner of `split`'s synthetic suite (run by its split step).
    #[command(hide = true)]
    SplitUnit(split::SplitUnitArgs),
}

/// `kiln-bench all`.
#[derive(Debug, Args)]
pub struct AllArgs {
    /// Tiny sizes (seconds in all), to check that the benchmarks work, not to measure.
    #[arg(long)]
    pub quick: bool,
    /// Runner sessions for `runners` (default 1000, 50 with --quick).
    #[arg(long)]
    pub runners: Option<u32>,
}

/// Runs a benchmark (or `gen`).
async fn run(args: BenchArgs) -> Result<i32, BenchError> {
    let work = async move {
        match args.command {
            BenchCommand::Gen(a) => generate::run(a).await,
            BenchCommand::Latency(a) => {
                let limit = a.delay + a.duration + Duration::from_secs(300);
                bounded("latency", limit, latency::run(&a)).await?;
                Ok(exit::OK)
            }
            BenchCommand::Throughput(a) => {
                bounded("throughput", Duration::from_secs(900), throughput::run(&a)).await?;
                Ok(exit::OK)
            }
            BenchCommand::Overhead(a) => {
                let limit = Duration::from_secs(120 + 10 * u64::from(a.builds));
                bounded("overhead", limit, overhead::run(&a)).await?;
                Ok(exit::OK)
            }
            BenchCommand::Runners(a) => {
                bounded(
                    "runners",
                    a.hold + Duration::from_secs(300),
                    runners::run(&a),
                )
                .await?;
                Ok(exit::OK)
            }
            BenchCommand::Trigger(a) => {
                bounded("trigger", a.limit(), trigger::run(&a)).await?;
                Ok(exit::OK)
            }
            BenchCommand::Failover(a) => {
                bounded("failover", a.limit(), failover::run(&a)).await?;
                Ok(exit::OK)
            }
            BenchCommand::Scale(a) => {
                // The dispatcher stages (`--sessions`) fill, restart and attach thousands of
                // runners per level: longer.
                let limit = if a.sessions.is_empty() { 1800 } else { 7200 };
                bounded("scale", Duration::from_secs(limit), scale::run(&a)).await?;
                Ok(exit::OK)
            }
            BenchCommand::Idle(a) => {
                bounded(
                    "idle",
                    a.duration * 2 + Duration::from_secs(120),
                    idle::run(&a),
                )
                .await?;
                Ok(exit::OK)
            }
            BenchCommand::Logs(a) => {
                bounded("logs", Duration::from_secs(600), logs::run(&a)).await?;
                Ok(exit::OK)
            }
            BenchCommand::Tail(a) => {
                bounded("tail", Duration::from_secs(600), tail::run(&a)).await?;
                Ok(exit::OK)
            }
            BenchCommand::Split(a) => {
                bounded("split", a.limit(), split::run(&a)).await?;
                Ok(exit::OK)
            }
            BenchCommand::SplitUnit(a) => split::harness::run(&a),
            BenchCommand::All(a) => all(&a).await,
        }
    };
    // Ctrl-C or SIGTERM drops the benchmark, and with it every child process.
    tokio::select! {
        r = work => r,
        _ = crate::signal() => Err(BenchError {
            code: exit::INTERNAL,
            message: "bench: interrupted".into(),
        }),
    }
}

/// Runs one benchmark with a time limit (its child processes die with it).
async fn bounded(
    name: &str,
    limit: Duration,
    bench: impl Future<Output = Result<(), BenchError>>,
) -> Result<(), BenchError> {
    match tokio::time::timeout(limit, bench).await {
        Ok(r) => r,
        Err(_) => Err(util::fail(format!(
            "{name} did not finish within {limit:?}"
        ))),
    }
}

async fn all(a: &AllArgs) -> Result<i32, BenchError> {
    let latency = if a.quick {
        latency::LatencyArgs {
            rate: 200,
            line_bytes: 1024,
            duration: Duration::from_secs(1),
            delay: Duration::from_millis(300),
            browser: false,
        }
    } else {
        latency::LatencyArgs {
            rate: 1000,
            line_bytes: 1024,
            duration: Duration::from_secs(10),
            delay: Duration::from_secs(1),
            browser: false,
        }
    };
    let throughput = throughput::ThroughputArgs {
        bytes: if a.quick { 5_000_000 } else { 200_000_000 },
        seed: 42,
    };
    let overhead = overhead::OverheadArgs {
        builds: if a.quick { 5 } else { 50 },
        otel: true,
    };
    let runners = runners::RunnersArgs {
        count: a.runners.unwrap_or(if a.quick { 50 } else { 1000 }),
        hold: Duration::from_secs(if a.quick { 1 } else { 10 }),
        concurrency: 100,
    };
    let trigger = trigger::TriggerArgs {
        commits: if a.quick { 3 } else { 20 },
        interval: Duration::from_secs(1),
        seed: 42,
    };
    let failover = failover::FailoverArgs {
        quick: a.quick,
        kills: None,
        runners: None,
        restarts: 3,
        postgres: false,
        rounds: None,
        stop_rounds: None,
    };
    let logs = logs::LogsArgs {
        mb: if a.quick { 2 } else { 64 },
        seed: 42,
        postgres: false,
    };
    let tail = tail::TailArgs {
        small_mb: 2,
        large_mb: if a.quick { 10 } else { 200 },
        seed: 42,
    };
    let idle = idle::IdleArgs {
        runners: 3,
        duration: Duration::from_secs(if a.quick { 1 } else { 30 }),
    };
    let results = [
        (
            "idle",
            bounded(
                "idle",
                idle.duration * 2 + Duration::from_secs(120),
                idle::run(&idle),
            )
            .await,
        ),
        (
            "logs",
            bounded("logs", Duration::from_secs(600), logs::run(&logs)).await,
        ),
        (
            "tail",
            bounded("tail", Duration::from_secs(600), tail::run(&tail)).await,
        ),
        (
            "latency",
            bounded(
                "latency",
                latency.delay + latency.duration + Duration::from_secs(300),
                latency::run(&latency),
            )
            .await,
        ),
        (
            "throughput",
            bounded(
                "throughput",
                Duration::from_secs(900),
                throughput::run(&throughput),
            )
            .await,
        ),
        (
            "overhead",
            bounded(
                "overhead",
                Duration::from_secs(120 + 10 * u64::from(overhead.builds)),
                overhead::run(&overhead),
            )
            .await,
        ),
        (
            "runners",
            bounded(
                "runners",
                runners.hold + Duration::from_secs(300),
                runners::run(&runners),
            )
            .await,
        ),
        (
            "trigger",
            bounded("trigger", trigger.limit(), trigger::run(&trigger)).await,
        ),
        (
            "failover",
            bounded("failover", failover.limit(), failover::run(&failover)).await,
        ),
    ];
    println!();
    let mut code = exit::OK;
    for (name, r) in results {
        match r {
            Ok(()) => println!("bench {name}: done"),
            Err(e) => {
                println!("bench {name}: FAILED: {}", e.message);
                code = code.max(e.code);
            }
        }
    }
    Ok(code)
}

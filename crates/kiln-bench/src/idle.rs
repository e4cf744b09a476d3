//! `kiln-bench idle`: what an idle farm costs the dispatcher.
//!
//! A `kiln serve` child with `--runners` `kiln runner` children attached and nothing to do. Its
//! CPU time is read from `/proc/PID/task/*/schedstat` (nanoseconds on the CPU, every thread)
//! over `--duration`, after a short settle. The baseline, measured in the same run, is the same
//! dispatcher over the same time before any runner attached, so the ratio is what attached idle
//! runners add (their heartbeats both ways). Peer figure for comparison (from the hardening
//! issue, measured on this kind of machine): Buildbot 4.3's master with 3 workers, 0.025% of a
//! core.

use std::time::Duration;

use clap::Args;

use super::util::{Scratch, Server, fail, figure, header, note};
use crate::BenchError;

/// `kiln-bench idle`.
#[derive(Debug, Clone, Args)]
pub struct IdleArgs {
    /// Runners attached.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(0..=64))]
    pub runners: u32,
    /// How long CPU time is counted, for the baseline and again with the runners.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
}

/// Nanoseconds every thread of `pid` has been on a CPU.
fn cpu_ns(pid: i32) -> Result<u64, BenchError> {
    let dir = format!("/proc/{pid}/task");
    let mut total = 0u64;
    for entry in std::fs::read_dir(&dir).map_err(|e| fail(format!("{dir}: {e}")))? {
        let path = entry.map_err(fail)?.path().join("schedstat");
        // A thread may end between the listing and the read.
        if let Ok(text) = std::fs::read_to_string(&path) {
            total += text
                .split_whitespace()
                .next()
                .and_then(|n| n.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    Ok(total)
}

/// Share of one core that `pid` used over `d`.
async fn share(pid: i32, d: Duration) -> Result<f64, BenchError> {
    let before = cpu_ns(pid)?;
    tokio::time::sleep(d).await;
    let after = cpu_ns(pid)?;
    Ok(after.saturating_sub(before) as f64 / d.as_nanos().max(1) as f64 * 100.0)
}

/// Runs the benchmark.
pub async fn run(a: &IdleArgs) -> Result<(), BenchError> {
    header(
        "idle",
        &format!(
            "dispatcher CPU with {} idle runners attached, {:?} each way",
            a.runners, a.duration
        ),
    );
    let tmp = Scratch::new()?;
    let server = Server::start(tmp.path()).await?;
    let settle = Duration::from_secs(2);
    tokio::time::sleep(settle).await;
    let alone = share(server.pid, a.duration).await?;
    let mut runners = Vec::new();
    for i in 0..a.runners {
        runners.push(
            server
                .start_runner(tmp.path(), &format!("idle-{i}"))
                .await?,
        );
    }
    tokio::time::sleep(settle).await;
    let attached = share(server.pid, a.duration).await?;
    note(format!(
        "default heartbeat (2 s both ways); CPU from /proc/{}/task/*/schedstat",
        server.pid
    ));
    figure(
        "dispatcher CPU, idle runners",
        format!("{attached:.4}% core"),
        "< 0.025%",
        Some(attached < 0.025),
        &format!(
            "no runner {alone:.4}%; ratio {:.1}; Buildbot 0.025%",
            attached / alone.max(1e-6)
        ),
    );
    drop(runners);
    Ok(())
}

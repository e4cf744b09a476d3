//! `kiln-bench runners`: the dispatcher's memory with many attached runners.
//!
//! `--count` runner sessions are opened from this process against one `kiln serve` child:
//! each is a raw `RunnerService.Attach` stream on its own TCP connection (as separate runner
//! processes would have), sends a `Hello`, and then heartbeats at the interval its `Welcome`
//! gives, reading everything the dispatcher sends. Once all are welcomed they are held for
//! `--hold`; the serve child's resident memory is sampled from /proc meanwhile. The baseline
//! is its resident memory with no runner attached.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use clap::Args;
use tokio::sync::{Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use super::util::{
    RssSampler, Scratch, Server, connect, fail, figure, header, mb, ms, note, percentile, rss_kib,
    sorted, wrong,
};
use crate::BenchError;
use kiln::proto::{
    self, dispatcher_message::Kind as In, runner_admin_service_client::RunnerAdminServiceClient,
    runner_message::Kind as Out, runner_service_client::RunnerServiceClient,
};

/// `kiln-bench runners`.
#[derive(Debug, Clone, Args)]
pub struct RunnersArgs {
    /// Runner sessions to open.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=20_000))]
    pub count: u32,
    /// How long to hold them once all are welcomed.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub hold: Duration,
    /// Sessions being opened at once.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub concurrency: u32,
}

/// The soft and hard limits on open files, from /proc.
fn nofile_limits() -> Option<(u64, u64)> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    let mut nums = line
        .trim_start_matches("Max open files")
        .split_whitespace()
        .map(|w| {
            if w == "unlimited" {
                Some(u64::MAX)
            } else {
                w.parse().ok()
            }
        });
    Some((nums.next()??, nums.next()??))
}

/// Makes sure this process (and so the serve child it starts next) may open `need` files:
/// raises the soft limit to the hard one with `prlimit(1)` when it is too low.
async fn ensure_nofile(need: u64) -> Result<(), BenchError> {
    let Some((soft, hard)) = nofile_limits() else {
        return Ok(());
    };
    if soft >= need {
        return Ok(());
    }
    if hard < need {
        return Err(fail(format!(
            "{need} open files are needed but the hard limit is {hard} (raise it: ulimit -Hn)"
        )));
    }
    let status = tokio::process::Command::new("prlimit")
        .arg(format!("--pid={}", std::process::id()))
        .arg(format!("--nofile={hard}:{hard}"))
        .status()
        .await;
    match (status, nofile_limits()) {
        (Ok(s), Some((soft, _))) if s.success() && soft >= need => {
            note(format!("raised the open-file limit to {soft}"));
            Ok(())
        }
        _ => Err(fail(format!(
            "{need} open files are needed and the soft limit is {soft}; run `ulimit -n {hard}` first"
        ))),
    }
}

/// One runner session: connects, says hello, reports the welcome, then heartbeats until
/// `stop`. An error means the session broke before `stop`.
async fn session(
    url: String,
    name: String,
    gate: Arc<Semaphore>,
    welcomed: mpsc::UnboundedSender<Instant>,
    stop: CancellationToken,
) -> Result<(), String> {
    let permit = gate.acquire_owned().await.map_err(|e| e.to_string())?;
    let channel = connect(&url).await.map_err(|e| e.message)?;
    let mut client = RunnerServiceClient::new(channel);
    let (tx, rx) = mpsc::channel(16);
    let hello = proto::Hello {
        name,
        slots: 1,
        version: env!("CARGO_PKG_VERSION").to_string(),
        ..Default::default()
    };
    let _ = tx
        .send(proto::RunnerMessage {
            kind: Some(Out::Hello(hello)),
        })
        .await;
    let mut inbound = client
        .attach(ReceiverStream::new(rx))
        .await
        .map_err(|s| s.message().to_string())?
        .into_inner();
    let welcome = match inbound.message().await {
        Ok(Some(proto::DispatcherMessage {
            kind: Some(In::Welcome(w)),
        })) => w,
        Ok(other) => return Err(format!("expected a welcome, got {other:?}")),
        Err(s) => return Err(s.message().to_string()),
    };
    let _ = welcomed.send(Instant::now());
    drop(permit);
    let every = Duration::from_millis(u64::from(welcome.heartbeat_interval_ms.max(50)));
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            _ = tick.tick() => {
                let hb = proto::Heartbeat {
                    running_attempts: vec![],
                    sent_at_ms: kiln_domain::now_millis(),
                    draining: false,
                    lists_held: true,
                };
                if tx.send(proto::RunnerMessage { kind: Some(Out::Heartbeat(hb)) }).await.is_err() {
                    return Err("the stream closed".into());
                }
            }
            m = inbound.message() => match m {
                Ok(Some(_)) => {}
                Ok(None) => return Err("the dispatcher closed the stream".into()),
                Err(s) => return Err(s.message().to_string()),
            },
        }
    }
}

/// Runs the benchmark.
pub async fn run(args: &RunnersArgs) -> Result<(), BenchError> {
    header(
        "runners",
        &format!(
            "dispatcher memory with {} attached runner sessions (raw Attach streams, one TCP connection each), held {:?}",
            args.count, args.hold
        ),
    );
    let count = args.count as usize;
    ensure_nofile(2 * args.count as u64 + 256).await?;
    let tmp = Scratch::new()?;
    let server = Server::start(tmp.path()).await?;
    // Baseline: idle, after it answered a call.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let idle_kib = rss_kib(server.pid).map_or(0, |(rss, _)| rss);
    let sampler = RssSampler::start(server.pid, Duration::from_millis(20));

    let stop = CancellationToken::new();
    let gate = Arc::new(Semaphore::new(args.concurrency as usize));
    let (welcomed_tx, mut welcomed) = mpsc::unbounded_channel();
    let broken = Arc::new(AtomicUsize::new(0));
    let first_error = Arc::new(std::sync::Mutex::new(None::<String>));
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(count);
    for i in 0..count {
        let (url, gate, tx, stop) = (
            server.url.clone(),
            gate.clone(),
            welcomed_tx.clone(),
            stop.clone(),
        );
        let (broken, first_error) = (broken.clone(), first_error.clone());
        let name = format!("bench-runner-{i:05}");
        tasks.push(tokio::spawn(async move {
            if let Err(e) = session(url, name, gate, tx, stop).await {
                broken.fetch_add(1, Ordering::SeqCst);
                first_error
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get_or_insert(e);
            }
        }));
    }
    drop(welcomed_tx);
    let result = async {
        let mut times = Vec::with_capacity(count);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        while times.len() < count {
            match tokio::time::timeout_at(deadline, welcomed.recv()).await {
                Ok(Some(at)) => times.push(ms(at.duration_since(start))),
                _ => {
                    let why = first_error
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .clone()
                        .unwrap_or_else(|| "timed out after 120 s".into());
                    return Err(fail(format!(
                        "only {} of {count} runners were welcomed: {why}",
                        times.len()
                    )));
                }
            }
        }
        let all = start.elapsed();
        let settled_kib = rss_kib(server.pid).map_or(0, |(rss, _)| rss);
        tokio::time::sleep(args.hold).await;
        let mut admin = RunnerAdminServiceClient::new(server.channel().await?);
        let listed = admin
            .list_runners(proto::ListRunnersRequest {})
            .await
            .map_err(|s| fail(s.message().to_string()))?
            .into_inner()
            .runners;
        let idle = listed
            .iter()
            .filter(|r| r.state == proto::RunnerState::Idle as i32)
            .count();
        Ok((sorted(&times), all, settled_kib, idle))
    }
    .await;
    let peak = sampler.finish().await;
    stop.cancel();
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
    }
    let (times, all, settled_kib, idle) = result?;
    let broken = broken.load(Ordering::SeqCst);

    let peak_mb = mb(peak.sampled_kib.max(peak.hwm_kib));
    figure(
        "dispatcher peak RSS",
        format!("{peak_mb:.1} MB"),
        "goal < 150 MB",
        Some(peak_mb < 150.0),
        &format!(
            "baseline (0 runners) {:.1} MB, ratio {:.2}x",
            mb(idle_kib),
            peak_mb / mb(idle_kib).max(1e-9)
        ),
    );
    figure(
        "per runner",
        format!(
            "{:.1} KB",
            (peak.sampled_kib.max(peak.hwm_kib).saturating_sub(idle_kib)) as f64 * 1.024
                / count as f64
        ),
        "",
        None,
        &format!(
            "RSS once all were welcomed {:.1} MB; sampled VmRSS peak {:.1} MB in {} samples, VmHWM {:.1} MB",
            mb(settled_kib),
            mb(peak.sampled_kib),
            peak.samples,
            mb(peak.hwm_kib)
        ),
    );
    figure(
        "all welcomed after",
        format!("{:.0} ms", ms(all)),
        "",
        None,
        &format!(
            "{} at a time; welcome p50 {:.0} ms, p99 {:.0} ms from the start",
            args.concurrency,
            percentile(&times, 50.0),
            percentile(&times, 99.0)
        ),
    );
    note(format!(
        "after holding: {idle} runners listed idle by the dispatcher, {broken} sessions broke"
    ));
    if broken > 0 || idle != count {
        return Err(wrong(format!(
            "{broken} sessions broke and {idle} of {count} runners are idle after the hold"
        )));
    }
    Ok(())
}

//! `kiln-bench overhead`: what kiln adds around a job that does nothing.
//!
//! `--builds` sequential builds of distinct commits of one repository (each commit made just
//! before it is submitted, as a push would) whose one step is `true`, on one `kiln runner`
//! child. Completion is watched with `WatchBuilds` (one stream opened before the first build;
//! no polling). Per build: overhead = time from calling `SubmitBuild` to receiving the build's
//! final event, minus the step's own duration as the runner reported it (`duration_ms`, whole
//! milliseconds). The first build, which creates the mirrors, is not counted. The baseline is
//! spawning `sh -c true` from this process.

use std::time::{Duration, Instant};

use clap::Args;
use tokio::sync::mpsc;

use super::util::{
    Repo, Scratch, Server, fail, figure, header, is_final, ms, note, percentile, pipeline, sorted,
    submit, wrong,
};
use crate::BenchError;
use kiln::proto::{self, JobState};

/// `kiln-bench overhead`.
#[derive(Debug, Clone, Args)]
pub struct OverheadArgs {
    /// Builds measured (one more, the first, warms the mirrors and is not counted).
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub builds: u32,
    /// Also measure with OpenTelemetry export on (the dispatcher and the runner sending their
    /// spans over OTLP to a receiver in this process), and print it against the same
    /// measurement with export off, in this run.
    #[arg(long)]
    pub otel: bool,
}

/// One measured build, times in ms from the `SubmitBuild` call.
#[derive(Debug, Default, Clone, Copy)]
struct Timing {
    /// `SubmitBuild` returned.
    submitted: f64,
    /// The job's `assigned` event arrived.
    assigned: f64,
    /// The job's `running` event arrived.
    running: f64,
    /// The build's final event arrived.
    done: f64,
    /// The step's own duration.
    step: f64,
}

/// Runs the benchmark.
pub async fn run(args: &OverheadArgs) -> Result<(), BenchError> {
    header(
        "overhead",
        &format!(
            "submit-to-result of a job whose step is `true`, minus the step ({} sequential builds, distinct commits, warm mirrors)",
            args.builds
        ),
    );
    // Baseline: spawning `sh -c true`.
    let mut base = Vec::new();
    for _ in 0..args.builds.max(5) {
        let t = Instant::now();
        let status = tokio::process::Command::new("sh")
            .args(["-c", "true"])
            .status()
            .await
            .map_err(|e| fail(format!("cannot run sh: {e}")))?;
        base.push(ms(t.elapsed()));
        if !status.success() {
            return Err(fail("`sh -c true` failed"));
        }
    }
    let base = sorted(&base);

    let timings = farm(args.builds).await?;
    let over = sorted(&timings.iter().map(|t| t.done - t.step).collect::<Vec<_>>());
    let col = |f: fn(&Timing) -> f64| sorted(&timings.iter().map(f).collect::<Vec<_>>());
    let (b50, b90) = (percentile(&base, 50.0), percentile(&base, 90.0));
    let (o50, o90) = (percentile(&over, 50.0), percentile(&over, 90.0));
    figure(
        "per-job overhead, median",
        format!("{o50:.1} ms"),
        "goal < 20 ms",
        Some(o50 < 20.0),
        &format!("baseline `sh -c true` {b50:.2} ms, ratio {:.1}x", o50 / b50),
    );
    figure(
        "per-job overhead, p90",
        format!("{o90:.1} ms"),
        "",
        None,
        &format!("baseline `sh -c true` {b90:.2} ms, ratio {:.1}x", o90 / b90),
    );
    let line = |p: f64| {
        format!(
            "SubmitBuild returned {:.1} ms, job assigned {:.1}, running {:.1}, build finished {:.1}; step {:.0} ms",
            percentile(&col(|t| t.submitted), p),
            percentile(&col(|t| t.assigned), p),
            percentile(&col(|t| t.running), p),
            percentile(&col(|t| t.done), p),
            percentile(&col(|t| t.step), p),
        )
    };
    note(format!(
        "timeline from the SubmitBuild call, medians: {}",
        line(50.0)
    ));
    note(format!(
        "timeline from the SubmitBuild call, p90:     {}",
        line(90.0)
    ));
    note("completion watched with WatchBuilds (streamed events, no polling)");
    if args.otel {
        otel(args.builds, o50, o90).await?;
    }
    Ok(())
}

/// The same measurement with OpenTelemetry export on, against `off_50` / `off_90` (export
/// off, this run).
async fn otel(builds: u32, off_50: f64, off_90: f64) -> Result<(), BenchError> {
    let (addr, receiver) = kiln_testkit::otlp::start_receiver();
    super::util::set_child_env(vec![
        (
            "OTEL_EXPORTER_OTLP_ENDPOINT".into(),
            format!("http://{addr}"),
        ),
        ("OTEL_BSP_SCHEDULE_DELAY".into(), "100".into()),
    ]);
    let timings = farm(builds).await;
    super::util::set_child_env(Vec::new());
    let timings = timings?;
    let over = sorted(&timings.iter().map(|t| t.done - t.step).collect::<Vec<_>>());
    let (o50, o90) = (percentile(&over, 50.0), percentile(&over, 90.0));
    figure(
        "with OTLP export on, median",
        format!("{o50:.1} ms"),
        "",
        None,
        &format!(
            "export off {off_50:.1} ms (this run), ratio {:.2}x",
            o50 / off_50
        ),
    );
    figure(
        "with OTLP export on, p90",
        format!("{o90:.1} ms"),
        "",
        None,
        &format!(
            "export off {off_90:.1} ms (this run), ratio {:.2}x",
            o90 / off_90
        ),
    );
    let spans = receiver.spans();
    note(format!(
        "{} spans received by the in-process OTLP receiver ({} from the dispatcher, {} from the runner)",
        spans.len(),
        spans
            .iter()
            .filter(|s| s.service == "kiln-dispatcher")
            .count(),
        spans.iter().filter(|s| s.service == "kiln-runner").count(),
    ));
    Ok(())
}

/// Runs `builds` measured builds (plus one warm-up) on a fresh dispatcher and runner.
async fn farm(builds: u32) -> Result<Vec<Timing>, BenchError> {
    let tmp = Scratch::new()?;
    let server = Server::start(tmp.path()).await?;
    let _runner = server.start_runner(tmp.path(), "bench-overhead").await?;
    let repo = Repo::init(&tmp.path().join("repo"))?;
    let yml = pipeline("noop", "true");
    let mut client = server.build_client().await?;

    // One watch stream for the whole run; events are timestamped as they arrive.
    let mut watch = client
        .watch_builds(proto::WatchBuildsRequest { build_id: 0 })
        .await
        .map_err(|s| fail(format!("WatchBuilds: {}", s.message())))?
        .into_inner();
    let (tx, mut events) = mpsc::unbounded_channel::<(Instant, proto::BuildEvent)>();
    let watcher = tokio::spawn(async move {
        while let Ok(Some(ev)) = watch.message().await {
            if tx.send((Instant::now(), ev)).is_err() {
                return;
            }
        }
    });

    let mut timings = Vec::new();
    for i in 0..=builds {
        let commit = repo.commit(
            &[(".kiln.yml", &yml), ("counter.txt", &format!("{i}\n"))],
            &format!("build {i}"),
        )?;
        let t0 = Instant::now();
        let build = submit(&mut client, &repo, &commit).await?;
        let mut t = Timing {
            submitted: ms(t0.elapsed()),
            ..Timing::default()
        };
        let state = loop {
            let next = tokio::time::timeout(Duration::from_secs(60), events.recv()).await;
            let Ok(Some((at, ev))) = next else {
                return Err(fail(format!(
                    "build {} did not finish within 60 s (or the watch stream ended)",
                    build.id
                )));
            };
            if ev.build_id != build.id {
                continue;
            }
            let since = ms(at.duration_since(t0));
            match (ev.job_id, JobState::try_from(ev.state)) {
                (0, _) if is_final(ev.state) => {
                    t.done = since;
                    break ev.state;
                }
                (j, Ok(JobState::Assigned)) if j != 0 => t.assigned = since,
                (j, Ok(JobState::Running)) if j != 0 => t.running = since,
                _ => {}
            }
        };
        if state != JobState::Passed as i32 {
            watcher.abort();
            return Err(wrong(format!(
                "build {} ended {}",
                build.id,
                kiln::convert::state_name(state)
            )));
        }
        let detail = client
            .get_build(proto::GetBuildRequest { build_id: build.id })
            .await
            .map_err(|s| fail(s.message().to_string()))?
            .into_inner();
        t.step = detail
            .jobs
            .first()
            .and_then(|j| j.steps.first())
            .map_or(0.0, |s| s.duration_ms as f64);
        if i > 0 {
            timings.push(t);
        }
    }
    watcher.abort();

    Ok(timings)
}

//! `kiln-bench failover`: how fast work and runners come back after a failure.
//!
//! 1. **Runner death.** A `kiln serve` child and two `kiln runner` children (one slot each). A
//!    build's step marks that it started (a file named after its attempt) and then waits,
//!    bounded, on a flag file, then works for [`STEP_WORK`] (3 s). Once it runs on one runner,
//!    that runner is killed with SIGKILL (with its step, as a machine going away) and the flag
//!    is written; the time is taken from the kill until the job's `running` event of the new
//!    attempt arrives on a `WatchBuilds` stream opened before the build (and the new runner is
//!    checked with `GetBuild`), until the step started on the other runner, and until the
//!    build's final event (passed: the new attempt's whole 3 s step). A fresh runner then
//!    replaces the dead one. Done with kiln's default heartbeat (2 s x 3) and with
//!    `--heartbeat-interval 500ms --missed-heartbeats 3`. Baseline: the lease (interval x
//!    missed), which a closed stream no longer waits for (`--reconnect-grace`, 1 s).
//! 2. **Dispatcher restart.** `--runners` real runners (`kiln::runner::run`, in this process,
//!    each with its own name, work dir and connection) attach to a serve child; it gets SIGTERM
//!    and a new serve child is started on the same address and data dir. Time from the new one's
//!    `listening` line (and from the old one's exit) until `ListRunners` (polled every 20 ms)
//!    shows every runner attached. Baseline: the same number of fresh runners attaching to a
//!    running dispatcher for the first time.

mod postgres;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::Args;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tracing::instrument::WithSubscriber;

use super::util::{
    Proc, Repo, Scratch, child_log_filter, connect, fail, figure, header, is_final, ms, note,
    percentile, pipeline, secs, sh_quote, sorted, spawn_serve, start_runner, submit, tail,
    wait_exit, wrong,
};
use crate::{BenchError, exit};
use kiln::proto::{
    self, JobState, RunnerState, build_service_client::BuildServiceClient,
    runner_admin_service_client::RunnerAdminServiceClient,
};

/// `kiln-bench failover`.
#[derive(Debug, Clone, Args)]
pub struct FailoverArgs {
    /// Small sizes (3 kills per heartbeat setting, 10 runners): checks that the benchmark works.
    #[arg(long)]
    pub quick: bool,
    /// Runner kills per heartbeat setting (default 5, 3 with --quick).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub kills: Option<u32>,
    /// Runners that must re-attach after a dispatcher restart (default 100, 10 with --quick).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=2000))]
    pub runners: Option<u32>,
    /// Dispatcher restarts.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub restarts: u32,
    /// Instead: three dispatchers on one throwaway PostgreSQL, one of them SIGKILLed (and
    /// SIGSTOPped) mid-build; its runners re-attach to another, carrying their attempts
    /// (`--runners` then defaults to 6, 3 with --quick).
    #[arg(long)]
    pub postgres: bool,
    /// With --postgres: SIGKILL rounds, and baseline rounds (default 5, 2 with --quick).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=50))]
    pub rounds: Option<u32>,
    /// With --postgres: SIGSTOP rounds (default 2, 1 with --quick).
    #[arg(long, value_parser = clap::value_parser!(u32).range(0..=20))]
    pub stop_rounds: Option<u32>,
}

impl FailoverArgs {
    fn kills(&self) -> u32 {
        self.kills.unwrap_or(if self.quick { 3 } else { 5 })
    }

    fn runners(&self) -> u32 {
        self.runners.unwrap_or(if self.quick { 10 } else { 100 })
    }

    fn rounds(&self) -> u32 {
        self.rounds.unwrap_or(if self.quick { 2 } else { 5 })
    }

    fn stop_rounds(&self) -> u32 {
        self.stop_rounds.unwrap_or(if self.quick { 1 } else { 2 })
    }

    /// Runners (and jobs per round) of `--postgres`.
    fn pg_runners(&self) -> u32 {
        self.runners.unwrap_or(if self.quick { 3 } else { 6 })
    }

    /// The benchmark's own time limit.
    pub fn limit(&self) -> Duration {
        if self.postgres {
            return Duration::from_secs(180)
                + Duration::from_secs(2 * 120) * self.rounds()
                + Duration::from_secs(400) * self.stop_rounds();
        }
        Duration::from_secs(120)
            + Duration::from_secs(2 * 90) * self.kills()
            + Duration::from_secs(150) * self.restarts
    }
}

/// How long to wait for anything that should take a second or two.
const PATIENCE: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------------------------
// A serve child on a chosen address
// ---------------------------------------------------------------------------------------------

/// A `kiln serve` child.
struct Serve {
    /// `http://ADDR`.
    url: String,
    /// `ADDR`, as it printed it.
    addr: String,
    /// When its `listening` line was read.
    listening_at: Instant,
    /// Times the bind was retried because the address was still taken.
    bind_retries: u32,
    proc: Proc,
}

impl Serve {
    /// Starts `kiln serve --listen LISTEN --data-dir DIR/data EXTRA...` (its log appended to
    /// `DIR/serve.log`) and reads its `listening` line. When it cannot bind (exit 6: the old
    /// one's port not yet free), tries again for up to 30 s.
    async fn start(dir: &Path, listen: &str, extra: &[&str]) -> Result<Serve, BenchError> {
        let log = dir.join("serve.log");
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut bind_retries = 0;
        loop {
            let (mut proc, addr) = spawn_serve(&log, listen, &dir.join("data"), extra).await?;
            let listening_at = Instant::now();
            if let Some(addr) = addr {
                return Ok(Serve {
                    url: format!("http://{addr}"),
                    addr,
                    listening_at,
                    bind_retries,
                    proc,
                });
            }
            let code = wait_exit(&mut proc, Duration::from_secs(5)).await.ok();
            if code == Some(exit::UNAVAILABLE) && Instant::now() < deadline {
                bind_retries += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
            return Err(fail(format!(
                "kiln serve on {listen} did not say where it listens (exit {code:?}); its log:\n{}",
                tail(&log, 20)
            )));
        }
    }

    async fn channel(&self) -> Result<Channel, BenchError> {
        connect(&self.url).await
    }
}

// ---------------------------------------------------------------------------------------------
// 1. Runner death
// ---------------------------------------------------------------------------------------------

/// One heartbeat setting.
struct Setting {
    /// For output.
    label: &'static str,
    /// `kiln serve` flags (none: kiln's defaults).
    flags: &'static [&'static str],
    interval: Duration,
    missed: u32,
    /// Goal for kill -> running elsewhere.
    goal: Duration,
    goal_text: &'static str,
}

impl Setting {
    fn lease(&self) -> Duration {
        self.interval * self.missed
    }
}

const SETTINGS: [Setting; 2] = [
    Setting {
        label: "default",
        flags: &[],
        interval: Duration::from_secs(2),
        missed: 3,
        goal: Duration::from_secs(2),
        goal_text: "goal <= 2 s",
    },
    Setting {
        label: "fast",
        flags: &["--heartbeat-interval", "500ms", "--missed-heartbeats", "3"],
        interval: Duration::from_millis(500),
        missed: 3,
        goal: Duration::from_secs(2),
        goal_text: "goal <= 2 s",
    },
];

/// What the step does once the flag is there: as long as the step of the side-by-side run
/// with Buildbot in issue 10 (its re-run took 3.1 s from running to the result, in both).
const STEP_WORK: Duration = Duration::from_secs(3);

/// One kill, ms from the kill.
#[derive(Debug, Clone, Copy)]
struct Kill {
    /// The new attempt's `running` event arrived.
    running: f64,
    /// Its step's start mark appeared.
    step: f64,
    /// The build's final event arrived (passed).
    result: f64,
}

/// Events of one `WatchBuilds` stream, stamped on arrival.
type Events = mpsc::UnboundedReceiver<(Instant, proto::BuildEvent)>;

async fn watch(client: &mut BuildServiceClient<Channel>) -> Result<Events, BenchError> {
    let mut stream = client
        .watch_builds(proto::WatchBuildsRequest { build_id: 0 })
        .await
        .map_err(|s| fail(format!("WatchBuilds: {}", s.message())))?
        .into_inner();
    let (tx, rx) = mpsc::unbounded_channel();
    // Ends when the stream does (its serve child is killed at the end at the latest).
    tokio::spawn(async move {
        while let Ok(Some(ev)) = stream.message().await {
            if tx.send((Instant::now(), ev)).is_err() {
                return;
            }
        }
    });
    Ok(rx)
}

/// Waits for an event of `build` that `want` accepts; returns its arrival time.
async fn wait_event(
    events: &mut Events,
    build: u64,
    limit: Duration,
    what: &str,
    want: impl Fn(&proto::BuildEvent) -> bool,
) -> Result<(Instant, proto::BuildEvent), BenchError> {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(Some((at, ev))) if ev.build_id == build && want(&ev) => return Ok((at, ev)),
            Ok(Some(_)) => {}
            Ok(None) => return Err(fail(format!("build {build}: the watch stream ended"))),
            Err(_) => {
                return Err(wrong(format!(
                    "build {build}: {what} did not happen within {limit:?}"
                )));
            }
        }
    }
}

/// Waits for `path` to exist (checked every 10 ms).
async fn wait_file(path: &Path, limit: Duration) -> Result<Instant, BenchError> {
    let deadline = Instant::now() + limit;
    loop {
        if path.exists() {
            return Ok(Instant::now());
        }
        if Instant::now() > deadline {
            return Err(wrong(format!(
                "{} did not appear within {limit:?}",
                path.display()
            )));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn get_job(
    client: &mut BuildServiceClient<Channel>,
    build: u64,
) -> Result<proto::Job, BenchError> {
    client
        .get_build(proto::GetBuildRequest { build_id: build })
        .await
        .map_err(|s| fail(format!("GetBuild {build}: {}", s.message())))?
        .into_inner()
        .jobs
        .into_iter()
        .next()
        .ok_or_else(|| fail(format!("build {build} has no job")))
}

/// Runs the kills of one heartbeat setting.
async fn runner_death(tmp: &Path, s: &Setting, kills: u32) -> Result<Vec<Kill>, BenchError> {
    let dir = tmp.join(format!("death-{}", s.label));
    std::fs::create_dir_all(&dir).map_err(fail)?;
    let serve = Serve::start(&dir, "127.0.0.1:0", s.flags).await?;
    let mut client = BuildServiceClient::new(serve.channel().await?);
    let mut events = watch(&mut client).await?;
    let mut next_runner = 0;
    let mut runners: Vec<(String, Proc)> = Vec::new();
    for _ in 0..2 {
        let name = format!("{}-{next_runner}", s.label);
        next_runner += 1;
        let proc = start_runner(&serve.url, &dir, &name).await?;
        runners.push((name, proc));
    }
    let repo = Repo::init(&dir.join("repo"))?;
    let mut out = Vec::new();
    for k in 0..kills {
        let flag = dir.join(format!("go-{k}"));
        let marks = dir.join(format!("marks-{k}"));
        std::fs::create_dir_all(&marks).map_err(fail)?;
        let script = format!(
            "touch {}/started-\"$KILN_ATTEMPT_ID\"; i=0; while [ ! -e {} ]; do i=$((i+1)); \
             if [ $i -gt 1200 ]; then echo 'flag never came'; exit 7; fi; sleep 0.05; done; sleep {}; echo done",
            sh_quote(&marks.to_string_lossy()),
            sh_quote(&flag.to_string_lossy()),
            STEP_WORK.as_secs(),
        );
        let commit = repo.commit(
            &[(".kiln.yml", &pipeline("wait", &script))],
            &format!("kill {k}"),
        )?;
        let build = submit(&mut client, &repo, &commit).await?.id;
        let running =
            |ev: &proto::BuildEvent| ev.job_id != 0 && ev.state == JobState::Running as i32;
        wait_event(&mut events, build, PATIENCE, "running", running).await?;
        let first = get_job(&mut client, build).await?;
        wait_file(
            &marks.join(format!("started-{}", first.attempt_id)),
            PATIENCE,
        )
        .await?;
        // Kill at a spread of moments between two heartbeats: after one full interval (so the
        // runner's last word is a heartbeat, not the step's start), plus a fraction of another
        // (0, .62, .24, .85, .47, ...).
        let phase = (f64::from(k) * 0.618_034).fract();
        tokio::time::sleep(s.interval.mul_f64(1.0 + phase)).await;
        while events.try_recv().is_ok() {}
        let Some(i) = runners.iter().position(|(n, _)| *n == first.runner) else {
            return Err(fail(format!(
                "build {build} runs on {:?}, not one of ours",
                first.runner
            )));
        };
        let (victim, proc) = runners.remove(i);
        let survivor = runners.first().map(|(n, _)| n.clone()).unwrap_or_default();
        // SIGKILL: the runner is frozen first, then it and its step are killed.
        let killed = Instant::now();
        drop(proc);
        // The next attempt does its whole step (the dead one cannot see the flag any more).
        std::fs::write(&flag, b"").map_err(fail)?;
        let (at, _) = wait_event(
            &mut events,
            build,
            s.lease() + PATIENCE,
            "running again after the kill",
            running,
        )
        .await?;
        let again = get_job(&mut client, build).await?;
        if again.runner != survivor || again.attempt_id == first.attempt_id {
            return Err(wrong(format!(
                "build {build}: after killing {victim} the job runs on {:?} (attempt {}), expected {survivor} with a new attempt",
                again.runner, again.attempt_id
            )));
        }
        let step = wait_file(
            &marks.join(format!("started-{}", again.attempt_id)),
            PATIENCE,
        )
        .await?;
        let (end_at, end) = wait_event(&mut events, build, PATIENCE, "the end", |ev| {
            ev.job_id == 0 && is_final(ev.state)
        })
        .await?;
        out.push(Kill {
            running: ms(at.duration_since(killed)),
            step: ms(step.duration_since(killed)),
            result: ms(end_at.duration_since(killed)),
        });
        if end.state != JobState::Passed as i32 {
            return Err(wrong(format!(
                "build {build} ended {} after its runner was killed",
                kiln::convert::state_name(end.state)
            )));
        }
        // A fresh runner replaces the dead one.
        let name = format!("{}-{next_runner}", s.label);
        next_runner += 1;
        let proc = start_runner(&serve.url, &dir, &name).await?;
        runners.push((name, proc));
    }
    Ok(out)
}

fn report_death(s: &Setting, kills: &[Kill]) {
    let lease = ms(s.lease());
    note(format!(
        "heartbeat {:?} x {} ({}; lease {}), {} kills:",
        s.interval,
        s.missed,
        if s.flags.is_empty() {
            "kiln's default".to_string()
        } else {
            s.flags.join(" ")
        },
        secs(lease),
        kills.len()
    ));
    let run = sorted(&kills.iter().map(|k| k.running).collect::<Vec<_>>());
    let step = sorted(&kills.iter().map(|k| k.step).collect::<Vec<_>>());
    let goal = ms(s.goal);
    for (label, v) in [
        ("kill -> running elsewhere, median", percentile(&run, 50.0)),
        ("kill -> running elsewhere, max", percentile(&run, 100.0)),
    ] {
        figure(
            label,
            secs(v),
            s.goal_text,
            Some(v <= goal),
            &format!("baseline lease {}, ratio {:.2}x", secs(lease), v / lease),
        );
    }
    figure(
        "kill -> step started elsewhere, median",
        secs(percentile(&step, 50.0)),
        "",
        None,
        &format!(
            "max {}, ratio to lease {:.2}x",
            secs(percentile(&step, 100.0)),
            percentile(&step, 50.0) / lease
        ),
    );
    let result = sorted(&kills.iter().map(|k| k.result).collect::<Vec<_>>());
    figure(
        &format!(
            "kill -> result ({} s step run again), median",
            STEP_WORK.as_secs()
        ),
        secs(percentile(&result, 50.0)),
        "",
        None,
        &format!(
            "max {}; lease + step {}",
            secs(percentile(&result, 100.0)),
            secs(lease + ms(STEP_WORK))
        ),
    );
    note(format!(
        "each kill -> running / result: {}",
        kills
            .iter()
            .map(|k| format!("{:.2} / {:.2}", k.running / 1000.0, k.result / 1000.0))
            .collect::<Vec<_>>()
            .join(", ")
    ));
}

// ---------------------------------------------------------------------------------------------
// 2. Dispatcher restart
// ---------------------------------------------------------------------------------------------

/// In-process runners (the real runner code), stopped when dropped.
struct Runners {
    names: Vec<String>,
    stop: CancellationToken,
    tasks: JoinSet<()>,
}

impl Runners {
    /// Starts `count` runners named `PREFIX-N`, their work dirs under `dir`, their logs (the
    /// session loop's) to `dir/runners.log`.
    fn start(url: &str, dir: &Path, prefix: &str, count: u32) -> Result<Runners, BenchError> {
        let log = dir.join("runners.log");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .map_err(|e| fail(format!("{}: {e}", log.display())))?;
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(child_log_filter()))
            .with_writer(std::sync::Mutex::new(file))
            .with_ansi(false)
            .finish();
        let dispatch = tracing::Dispatch::new(subscriber);
        let stop = CancellationToken::new();
        let mut tasks = JoinSet::new();
        let mut names = Vec::new();
        for n in 0..count {
            let name = format!("{prefix}-{n}");
            let mut config = kiln::runner::RunnerConfig::new(url, name.clone());
            config.engine.work_dir = dir.join("work").join(&name);
            let (drain, stop) = (stop.clone(), stop.clone());
            tasks.spawn(
                async move {
                    if let Err(e) = kiln::runner::run(config, drain, stop).await {
                        tracing::error!(cause = %e, "runner stopped");
                    }
                }
                .with_subscriber(dispatch.clone()),
            );
            names.push(name);
        }
        Ok(Runners { names, stop, tasks })
    }

    /// Stops them (they detach) and waits, at most 10 s.
    async fn stop(mut self) {
        self.stop.cancel();
        let tasks = &mut self.tasks;
        let _ = tokio::time::timeout(Duration::from_secs(10), async {
            while tasks.join_next().await.is_some() {}
        })
        .await;
    }
}

impl Drop for Runners {
    fn drop(&mut self) {
        // Their helper tasks end with the token; the JoinSet aborts the rest.
        self.stop.cancel();
    }
}

/// Polls `ListRunners` every 20 ms until every one of `names` is attached (not offline);
/// returns when that was seen.
async fn all_attached(url: &str, names: &[String], limit: Duration) -> Result<Instant, BenchError> {
    let deadline = Instant::now() + limit;
    let mut admin: Option<RunnerAdminServiceClient<Channel>> = None;
    let mut seen = 0;
    loop {
        if admin.is_none() {
            admin = connect(url).await.ok().map(RunnerAdminServiceClient::new);
        }
        if let Some(a) = admin.as_mut() {
            match a.list_runners(proto::ListRunnersRequest {}).await {
                Ok(r) => {
                    let listed = r.into_inner().runners;
                    seen = names
                        .iter()
                        .filter(|n| {
                            listed.iter().any(|r| {
                                r.name == **n
                                    && matches!(
                                        RunnerState::try_from(r.state),
                                        Ok(RunnerState::Idle
                                            | RunnerState::Busy
                                            | RunnerState::Draining)
                                    )
                            })
                        })
                        .count();
                    if seen == names.len() {
                        return Ok(Instant::now());
                    }
                }
                Err(_) => admin = None,
            }
        }
        if Instant::now() > deadline {
            return Err(wrong(format!(
                "only {seen} of {} runners attached within {limit:?}",
                names.len()
            )));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One restart, ms.
#[derive(Debug, Clone, Copy)]
struct Restart {
    /// Fresh runners started -> all attached (the baseline).
    first_attach: f64,
    /// SIGTERM -> the old serve exited.
    term_to_exit: f64,
    /// Old serve exited -> the new one printed its listening line.
    exit_to_listen: f64,
    /// New serve's listening line -> all attached.
    from_listen: f64,
    /// Old serve exited -> all attached.
    from_exit: f64,
    bind_retries: u32,
    exit_code: i32,
}

async fn restarts(tmp: &Path, count: u32, restarts: u32) -> Result<Vec<Restart>, BenchError> {
    let dir: PathBuf = tmp.join("restart");
    std::fs::create_dir_all(&dir).map_err(fail)?;
    let mut serve = Serve::start(&dir, "127.0.0.1:0", &[]).await?;
    let mut out = Vec::new();
    for r in 0..restarts {
        // Baseline: fresh runners attach to a running dispatcher.
        let t0 = Instant::now();
        let runners = Runners::start(&serve.url, &dir, &format!("r{r}"), count)?;
        let first_attach = ms(all_attached(&serve.url, &runners.names, PATIENCE)
            .await?
            .duration_since(t0));

        let term = Instant::now();
        kill(Pid::from_raw(serve.proc.pid), Signal::SIGTERM)
            .map_err(|e| fail(format!("cannot signal kiln serve: {e}")))?;
        let exit_code = wait_exit(&mut serve.proc, Duration::from_secs(30)).await?;
        let exited = Instant::now();
        let addr = serve.addr.clone();
        serve = Serve::start(&dir, &addr, &[]).await?;
        let all = all_attached(&serve.url, &runners.names, PATIENCE).await?;
        out.push(Restart {
            first_attach,
            term_to_exit: ms(exited.duration_since(term)),
            exit_to_listen: ms(serve.listening_at.duration_since(exited)),
            from_listen: ms(all.duration_since(serve.listening_at)),
            from_exit: ms(all.duration_since(exited)),
            bind_retries: serve.bind_retries,
            exit_code,
        });
        runners.stop().await;
    }
    Ok(out)
}

fn report_restarts(count: u32, rs: &[Restart]) {
    let col = |f: fn(&Restart) -> f64| sorted(&rs.iter().map(f).collect::<Vec<_>>());
    let base = col(|r| r.first_attach);
    let b50 = percentile(&base, 50.0);
    let listen = col(|r| r.from_listen);
    let exit = col(|r| r.from_exit);
    note(format!(
        "{count} runners (real runner code, in-process, one connection each), {} restarts (SIGTERM, new serve on the same address and data dir):",
        rs.len()
    ));
    for (label, v) in [
        (
            "listening -> all attached, median",
            percentile(&listen, 50.0),
        ),
        ("listening -> all attached, max", percentile(&listen, 100.0)),
        ("old exit -> all attached, median", percentile(&exit, 50.0)),
        ("old exit -> all attached, max", percentile(&exit, 100.0)),
    ] {
        figure(
            label,
            format!("{v:.0} ms"),
            "goal < 3 s",
            Some(v < 3000.0),
            &format!("baseline first attach {b50:.0} ms, ratio {:.1}x", v / b50),
        );
    }
    figure(
        "first attach (baseline), median",
        format!("{b50:.0} ms"),
        "",
        None,
        &format!("max {:.0} ms", percentile(&base, 100.0)),
    );
    note(format!(
        "each restart: SIGTERM -> old exited (exit code) / -> new listening / -> all attached from listening / from exit, first attach: {}",
        rs.iter()
            .map(|r| format!(
                "{:.0} ms ({}) / {:.0} / {:.0} / {:.0}, {:.0} ms{}",
                r.term_to_exit,
                r.exit_code,
                r.exit_to_listen,
                r.from_listen,
                r.from_exit,
                r.first_attach,
                if r.bind_retries > 0 {
                    format!(" ({} bind retries)", r.bind_retries)
                } else {
                    String::new()
                }
            ))
            .collect::<Vec<_>>()
            .join("; ")
    ));
}

/// Runs the benchmark.
pub async fn run(args: &FailoverArgs) -> Result<(), BenchError> {
    if args.postgres {
        return postgres::run(args).await;
    }
    let (kills, count) = (args.kills(), args.runners());
    header(
        "failover",
        &format!(
            "runner SIGKILLed -> its job running on another runner ({kills} kills per heartbeat setting); dispatcher restarted -> all {count} runners re-attached ({} restarts)",
            args.restarts
        ),
    );
    let tmp = Scratch::new()?;
    // The two settings run side by side (their own serve and runner children, idle but for
    // heartbeats); the restarts after them, alone.
    let [default, fast] = &SETTINGS;
    let (d, f) = tokio::join!(
        runner_death(tmp.path(), default, kills),
        runner_death(tmp.path(), fast, kills)
    );
    report_death(default, &d?);
    report_death(fast, &f?);
    let rs = restarts(tmp.path(), count, args.restarts).await?;
    report_restarts(count, &rs);
    note(
        "runner death: from the SIGKILL (1 to 2 heartbeat intervals after the step started) to the new attempt's `running` event on WatchBuilds (set when the runner accepts, before its checkout), and to the build's final event (the new attempt's whole step); step start from a file the step makes; the stream closed, so the reconnect grace (1 s), not the lease, applies; both settings ran at the same time",
    );
    Ok(())
}

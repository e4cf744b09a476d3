//! `kiln up`: the embedded default, the whole farm in one process. A dispatcher (serving the
//! usual gRPC API, so `kiln builds`, `kiln logs -f` and other observers work against it), N
//! runners, and an observer watching the given repositories. It prints where it listens and
//! every build's state changes as they happen, until SIGTERM or Ctrl-C.
//!
//! Everything lives in the data directory: the database, logs and mirrors of the dispatcher,
//! the observer's mirrors (`observer/`), the runners' work directories and their one shared
//! mirror cache (`runners/`). Started again on the same directory it continues where it
//! stopped: builds already made are not made again, commits pushed meanwhile are built, and jobs
//! that were running when it stopped run again.

use std::collections::HashMap;
use std::future::Future;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Args;
use kiln_domain::{BuildId, JobState};
use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;

use super::{CliError, Connection, exit};
use crate::observer::{ObserverConfig, parse_interval};

/// `kiln up` arguments.
#[derive(Debug, Clone, Args)]
pub struct UpArgs {
    /// Repository to watch: a local path (made absolute) or a URL. Repeatable. Default: the
    /// current directory, which must then be a git repository.
    #[arg(long = "repo", value_name = "PATH_OR_URL")]
    pub repos: Vec<String>,
    /// Branches to build, as patterns (repeatable; `*` within a path segment, `**` across
    /// segments; the default `**` is every branch).
    #[arg(long = "branch", value_name = "PATTERN", default_value = "**")]
    pub branches: Vec<String>,
    /// Runners (each runs one job at a time).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub runners: u32,
    /// Where the database, logs, mirrors and work directories live.
    #[arg(long, env = "KILN_DATA_DIR", default_value = "kiln-data")]
    pub data_dir: PathBuf,
    /// Address to listen on (port 0 picks a free port; the chosen address is printed).
    #[arg(long, default_value = "127.0.0.1:7878")]
    pub listen: SocketAddr,
    /// How often the repositories are fetched.
    #[arg(long, default_value = "1s", value_parser = parse_interval)]
    pub interval: Duration,
    /// A branch seen for the first time builds at most this many of its newest commits.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub backfill: u32,
}

fn err(code: i32, message: impl Into<String>) -> CliError {
    CliError {
        code,
        message: message.into(),
    }
}

/// How long runners get, once asked to stop, to hand their jobs back.
const RUNNER_STOP_GRACE: Duration = Duration::from_secs(15);

/// Runs the farm until `shutdown` resolves; returns the exit code.
pub async fn run(
    args: UpArgs,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<i32, CliError> {
    let repos = if args.repos.is_empty() {
        if git2::Repository::open(".").is_err() {
            return Err(err(
                exit::USAGE,
                "the current directory is not a git repository; name one with --repo PATH",
            ));
        }
        vec![".".to_string()]
    } else {
        args.repos.clone()
    };
    // Check the patterns and paths before anything starts.
    crate::observer::branch_globs(&args.branches)?;
    let repos = repos
        .iter()
        .map(|r| crate::observer::normalize_repo(r))
        .collect::<Result<Vec<_>, _>>()?;

    let data_dir = std::path::absolute(&args.data_dir).map_err(|e| {
        err(
            exit::USAGE,
            format!("data dir {}: {e}", args.data_dir.display()),
        )
    })?;
    let dispatcher = kiln_dispatcher::Dispatcher::open(kiln_dispatcher::Config::new(&data_dir))
        .map_err(|e| err(exit::INTERNAL, format!("cannot open data dir: {e}")))?;
    let mut events = dispatcher.subscribe();
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| {
            err(
                exit::UNAVAILABLE,
                format!("cannot listen on {}: {e}", args.listen),
            )
        })?;
    let addr = listener
        .local_addr()
        .map_err(|e| err(exit::INTERNAL, e.to_string()))?;
    let url = format!("http://{addr}");
    println!("kiln up: dispatcher listening on {addr}");
    println!("kiln up: web page at {url}/");
    println!(
        "kiln up: data in {}; {} runner{}; watching {} (branches {}) every {}",
        data_dir.display(),
        args.runners,
        if args.runners == 1 { "" } else { "s" },
        repos.join(", "),
        args.branches.join(" "),
        humantime::format_duration(args.interval)
    );
    println!(
        "kiln up: try `kiln --dispatcher {url} builds`, `kiln --dispatcher {url} logs -f BUILD`"
    );
    let _ = std::io::stdout().flush();

    let stop_server = CancellationToken::new();
    let server = {
        let stop = stop_server.clone();
        tokio::spawn(crate::api::serve(
            listener,
            dispatcher.clone(),
            Default::default(),
            async move { stop.cancelled().await },
        ))
    };

    let drain = CancellationToken::new();
    let stop_runners = CancellationToken::new();
    let mut runners = Vec::new();
    for i in 1..=args.runners {
        let mut rc = crate::runner::RunnerConfig::new(url.clone(), format!("up-runner-{i}"));
        rc.engine.work_dir = data_dir.join("runners").join(format!("runner-{i}"));
        // One mirror per repository for all of them.
        rc.engine.cache_dir = Some(data_dir.join("runners").join("mirrors"));
        runners.push(tokio::spawn(crate::runner::run(
            rc,
            drain.clone(),
            stop_runners.clone(),
        )));
    }

    let stop_observer = CancellationToken::new();
    let observer = tokio::spawn(crate::observer::observe(
        crate::observer::Remote::new(Connection::plain(url.clone())),
        ObserverConfig {
            repos,
            branches: args.branches.clone(),
            interval: args.interval,
            backfill: args.backfill,
            work_dir: crate::observer::work_dir_in(&data_dir),
            print: false,
        },
        false,
        stop_observer.clone(),
    ));

    // Print build state changes until asked to stop.
    let mut printer = Printer {
        open: HashMap::new(),
        logs: if addr.to_string() == "127.0.0.1:7878" {
            "kiln logs".to_string()
        } else {
            format!("kiln --dispatcher {url} logs")
        },
    };
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            ev = events.recv() => match ev {
                Ok(ev) => {
                    if ev.job_id.is_none() {
                        printer.build_event(&dispatcher, ev.build_id, ev.state).await;
                    }
                }
                Err(RecvError::Lagged(n)) => {
                    println!("kiln up: ({n} state changes not shown)");
                }
                Err(RecvError::Closed) => break,
            },
            _ = &mut shutdown => break,
        }
    }

    println!("kiln up: stopping (unfinished jobs run again next time)");
    let _ = std::io::stdout().flush();
    stop_observer.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), observer).await;
    drain.cancel();
    stop_runners.cancel();
    for r in runners {
        let _ = tokio::time::timeout(RUNNER_STOP_GRACE, r).await;
    }
    stop_server.cancel();
    match tokio::time::timeout(Duration::from_secs(10), server).await {
        Ok(Ok(Ok(()))) | Err(_) => {}
        Ok(Ok(Err(e))) => return Err(err(exit::INTERNAL, format!("server failed: {e}"))),
        Ok(Err(e)) => return Err(err(exit::INTERNAL, format!("server task failed: {e}"))),
    }
    Ok(exit::OK)
}

/// Prints build state changes, one line each, with the branch and commit.
struct Printer {
    /// Builds seen and not finished: "branch@commit repo" and when they were first seen.
    open: HashMap<BuildId, (String, Instant)>,
    /// The command that shows a build's output, for the hint after a failure.
    logs: String,
}

impl Printer {
    async fn build_event(
        &mut self,
        dispatcher: &kiln_dispatcher::Dispatcher,
        id: BuildId,
        state: JobState,
    ) {
        let mut extra = String::new();
        if let std::collections::hash_map::Entry::Vacant(slot) = self.open.entry(id) {
            let what = match dispatcher.get_build(id).await {
                Ok(d) => {
                    let b = &d.build;
                    if let Some(e) = &b.error {
                        extra = format!("\n  {e}");
                    }
                    let branch = if b.branch.is_empty() { "-" } else { &b.branch };
                    format!(
                        "{branch}@{} {}",
                        b.commit.get(..12).unwrap_or(&b.commit),
                        b.repo
                    )
                }
                Err(_) => String::new(),
            };
            slot.insert((what, Instant::now()));
        }
        let Some((what, since)) = self.open.get(&id) else {
            return;
        };
        let mut line = format!("build {id} {:<9} {what}", state.as_str());
        if state.is_final() {
            line.push_str(&format!(" ({:.1}s)", since.elapsed().as_secs_f64()));
            if state != JobState::Passed {
                line.push_str(&format!("  ({} {id})", self.logs));
            }
            self.open.remove(&id);
        }
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{line}{extra}");
        let _ = out.flush();
    }
}

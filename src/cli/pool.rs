//! `kiln pool`: a runner manager for one machine. It keeps between `--min` and `--max` local
//! `kiln runner` processes, sized to the work the dispatcher has for them: the jobs running on
//! them plus the jobs ready to run that their labels can take (`GetQueue`), divided by their
//! slots. It grows at once; it shrinks only by draining runners that have been idle for
//! `--idle-timeout` (the dispatcher's drain: no new work, and the runner leaves once its jobs
//! end), so a busy runner is never stopped and no job is lost. SIGTERM or Ctrl-C drains every
//! runner and waits for them.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use clap::Args;
use tokio::process::{Child, Command};

use super::client::Connection;
use super::runner::parse_label;
use super::{CliError, exit, signal};
use crate::proto;

/// `kiln pool`.
#[derive(Debug, Args)]
pub struct PoolArgs {
    /// Fewest runners kept, even with nothing to do.
    #[arg(long, default_value_t = 1)]
    pub min: u32,
    /// Most runners started.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub max: u32,
    /// Label the runners offer, as key=value (repeatable). Jobs whose labels they all offer
    /// count as work for the pool.
    #[arg(long = "label", value_parser = parse_label)]
    pub labels: Vec<(String, String)>,
    /// Slots of each runner.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub slots: u32,
    /// Runner names: PREFIX-1, PREFIX-2, ... (default: `pool-` and the host name).
    #[arg(long)]
    pub prefix: Option<String>,
    /// Where the runners' work directories go (one per runner), and their shared mirror cache
    /// (`mirrors/`). Default: `kiln-pool` under the system temp dir.
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
    /// How often the queue is looked at.
    #[arg(long, default_value = "2s", value_parser = crate::observer::parse_interval)]
    pub interval: Duration,
    /// A runner idle this long, while the pool is above what the work needs, is drained.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub idle_timeout: Duration,
    /// The runners' token, read from this file (given to each runner as its --token-file).
    #[arg(long, value_name = "PATH")]
    pub runner_token_file: Option<PathBuf>,
}

/// The pool's runners: name -> process.
struct Pool {
    exe: PathBuf,
    conn: Connection,
    args: PoolArgs,
    prefix: String,
    work_dir: PathBuf,
    children: BTreeMap<String, Child>,
    /// Per runner: since when the dispatcher has seen it idle (reset when it is not).
    idle_since: HashMap<String, Instant>,
    /// Runners told to drain (they leave on their own once their jobs end).
    draining: Vec<String>,
    next: u32,
}

/// What the dispatcher says about the pool's runners.
#[derive(Debug, Default)]
struct View {
    /// Jobs ready to run that the pool's labels can take.
    ready: u64,
    /// Jobs running on the pool's runners.
    running: u64,
    /// Pool runners the dispatcher lists as idle.
    idle: Vec<String>,
}

pub(super) async fn pool(conn: Connection, args: PoolArgs) -> Result<i32, CliError> {
    if args.min > args.max {
        return Err(CliError::new(
            exit::USAGE,
            format!("--min {} is more than --max {}", args.min, args.max),
        ));
    }
    let exe = std::env::current_exe()
        .map_err(|e| CliError::new(exit::INTERNAL, format!("cannot find the kiln binary: {e}")))?;
    let prefix = match &args.prefix {
        Some(p) => p.clone(),
        None => format!(
            "pool-{}",
            nix::unistd::gethostname()
                .ok()
                .and_then(|h| h.into_string().ok())
                .unwrap_or_else(|| "local".into())
        ),
    };
    let work_dir = args
        .work_dir
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join("kiln-pool"));
    std::fs::create_dir_all(&work_dir).map_err(|e| {
        CliError::new(
            exit::USAGE,
            format!("pool work dir {}: {e}", work_dir.display()),
        )
    })?;
    let mut pool = Pool {
        exe,
        conn,
        args,
        prefix,
        work_dir,
        children: BTreeMap::new(),
        idle_since: HashMap::new(),
        draining: Vec::new(),
        next: 1,
    };
    println!(
        "kiln pool: {} to {} runners ({}) for {}",
        pool.args.min,
        pool.args.max,
        pool.label_text(),
        pool.conn.url
    );
    let stop = signal();
    tokio::pin!(stop);
    let mut last_error: Option<String> = None;
    loop {
        match pool.tick().await {
            Ok(()) => last_error = None,
            Err(e) => {
                let m = e.message.clone();
                if last_error.as_deref() != Some(m.as_str()) {
                    tracing::warn!(error = %m, "pool: cannot read the queue; trying again");
                    last_error = Some(m);
                }
                // Whatever the dispatcher says, the floor holds.
                pool.reap();
                pool.grow_to(pool.args.min as usize)?;
            }
        }
        tokio::select! {
            _ = &mut stop => break,
            _ = tokio::time::sleep(pool.args.interval) => {}
        }
    }
    pool.shutdown().await;
    Ok(exit::OK)
}

impl Pool {
    fn label_text(&self) -> String {
        if self.args.labels.is_empty() {
            return "no labels".into();
        }
        let l: Vec<String> = self
            .args
            .labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        l.join(",")
    }

    /// One look at the queue: reap the runners that left, start or drain to fit the work.
    async fn tick(&mut self) -> Result<(), CliError> {
        self.reap();
        let view = self.view().await?;
        let now = Instant::now();
        self.idle_since.retain(|n, _| view.idle.contains(n));
        for n in &view.idle {
            self.idle_since.entry(n.clone()).or_insert(now);
        }
        let slots = u64::from(self.args.slots);
        let wanted = (view.running + view.ready).div_ceil(slots);
        let wanted = wanted.clamp(u64::from(self.args.min), u64::from(self.args.max)) as usize;
        let active = self.children.len() - self.draining.len();
        if wanted > active {
            self.grow_to(wanted + self.draining.len())?;
        } else if wanted < active {
            // Only runners idle long enough; never one that holds a job.
            let mut idle: Vec<(Instant, String)> = view
                .idle
                .iter()
                .filter(|n| !self.draining.contains(n))
                .filter_map(|n| self.idle_since.get(n).map(|t| (*t, n.clone())))
                .filter(|(t, _)| now.duration_since(*t) >= self.args.idle_timeout)
                .collect();
            idle.sort();
            for (_, name) in idle.into_iter().take(active - wanted) {
                self.drain(&name).await?;
            }
        }
        Ok(())
    }

    /// The queue and the pool's runners, as the dispatcher sees them.
    async fn view(&self) -> Result<View, CliError> {
        let mut admin = self.conn.admin_client().await?;
        let queue = admin
            .get_queue(proto::GetQueueRequest {})
            .await?
            .into_inner();
        let offered: BTreeMap<&str, &str> = self
            .args
            .labels
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let mut view = View::default();
        for set in &queue.sets {
            let fits = set
                .labels
                .iter()
                .all(|(k, v)| offered.get(k.as_str()) == Some(&v.as_str()));
            if fits {
                view.ready += set.ready;
            }
        }
        let runners = admin
            .list_runners(proto::ListRunnersRequest {})
            .await?
            .into_inner();
        for r in runners.runners {
            if !self.children.contains_key(&r.name) {
                continue;
            }
            view.running += r.running_jobs.len() as u64;
            if r.state == proto::RunnerState::Idle as i32 && r.running_jobs.is_empty() {
                view.idle.push(r.name);
            }
        }
        Ok(view)
    }

    /// Starts runners until there are `n` processes.
    fn grow_to(&mut self, n: usize) -> Result<(), CliError> {
        while self.children.len() < n {
            let name = format!("{}-{}", self.prefix, self.next);
            self.next += 1;
            let child = self.spawn(&name)?;
            tracing::info!(runner = %name, pid = child.id().unwrap_or(0), "pool: runner started");
            println!("kiln pool: started {name}");
            self.children.insert(name, child);
        }
        Ok(())
    }

    fn spawn(&self, name: &str) -> Result<Child, CliError> {
        let mut cmd = Command::new(&self.exe);
        cmd.arg("runner")
            .args(["--dispatcher", &self.conn.url])
            .args(["--name", name])
            .args(["--slots", &self.args.slots.to_string()])
            .arg("--work-dir")
            .arg(self.work_dir.join(name))
            .arg("--cache-dir")
            .arg(self.work_dir.join("mirrors"));
        for (k, v) in &self.args.labels {
            cmd.arg("--label").arg(format!("{k}={v}"));
        }
        if let Some(f) = &self.args.runner_token_file {
            cmd.arg("--token-file").arg(f);
        }
        let tls = &self.conn.tls;
        for (flag, path) in [
            ("--tls-ca", &tls.ca),
            ("--tls-cert", &tls.cert),
            ("--tls-key", &tls.key),
        ] {
            if let Some(p) = path {
                cmd.arg(flag).arg(p);
            }
        }
        // The pool's API token is not the runners' business.
        cmd.env_remove("KILN_TOKEN").stdin(Stdio::null());
        cmd.spawn().map_err(|e| {
            CliError::new(
                exit::INTERNAL,
                format!("cannot start runner {name} ({}): {e}", self.exe.display()),
            )
        })
    }

    /// Asks the dispatcher to drain one runner; it leaves once it holds no job.
    async fn drain(&mut self, name: &str) -> Result<(), CliError> {
        let mut admin = self.conn.admin_client().await?;
        admin
            .drain_runner(proto::DrainRunnerRequest {
                name: name.to_string(),
            })
            .await?;
        tracing::info!(runner = %name, "pool: idle runner drained");
        println!("kiln pool: draining {name}");
        self.draining.push(name.to_string());
        Ok(())
    }

    /// Forgets the runners that exited.
    fn reap(&mut self) {
        let mut gone = Vec::new();
        for (name, child) in self.children.iter_mut() {
            if let Ok(Some(status)) = child.try_wait() {
                gone.push((name.clone(), status));
            }
        }
        for (name, status) in gone {
            self.children.remove(&name);
            self.idle_since.remove(&name);
            let drained = self.draining.iter().position(|n| *n == name);
            if let Some(i) = drained {
                self.draining.remove(i);
                println!("kiln pool: {name} left");
            } else {
                tracing::warn!(runner = %name, %status, "pool: runner exited on its own");
                println!("kiln pool: {name} exited ({status})");
            }
        }
    }

    /// Drains every runner (SIGTERM: each finishes its jobs, then leaves) and waits for them;
    /// a second signal passes on (a runner's second SIGTERM cancels its jobs).
    async fn shutdown(&mut self) {
        println!(
            "kiln pool: stopping; draining {} runners",
            self.children.len()
        );
        self.signal_all();
        let pids = self.pids();
        let again = signal();
        tokio::pin!(again);
        let mut passed_on = false;
        for (name, child) in self.children.iter_mut() {
            let status = loop {
                tokio::select! {
                    status = child.wait() => break status,
                    _ = &mut again, if !passed_on => {
                        passed_on = true;
                        println!("kiln pool: second signal; the runners cancel their jobs");
                        for &pid in &pids {
                            signal_pid(pid);
                        }
                    }
                }
            };
            match status {
                Ok(status) => tracing::info!(runner = %name, %status, "pool: runner stopped"),
                Err(e) => {
                    tracing::warn!(runner = %name, error = %e, "pool: cannot wait for runner")
                }
            }
        }
        self.children.clear();
    }

    fn signal_all(&self) {
        for pid in self.pids() {
            signal_pid(pid);
        }
    }

    fn pids(&self) -> Vec<i32> {
        self.children
            .values()
            .filter_map(|c| c.id().and_then(|p| i32::try_from(p).ok()))
            .collect()
    }
}

/// SIGTERM to one of the pool's runners.
fn signal_pid(pid: i32) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGTERM,
    );
}

//! What every benchmark needs: child `kiln` processes that die with the benchmark (with
//! everything they started), a `kiln serve` child on a loopback port, `kiln runner` children,
//! git repositories in temp dirs, resident-memory sampling from `/proc`, and small statistics.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use kiln_testkit::kill_tree;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};

use crate::{BenchError, exit};
use kiln::proto::{
    self, build_service_client::BuildServiceClient,
    runner_admin_service_client::RunnerAdminServiceClient,
};

/// An error of the benchmark machinery (exit code 7).
pub(crate) fn fail(message: impl std::fmt::Display) -> BenchError {
    BenchError {
        code: exit::INTERNAL,
        message: format!("bench: {message}"),
    }
}

/// A wrong result (lost or corrupted output): exit code 1.
pub(crate) fn wrong(message: impl std::fmt::Display) -> BenchError {
    BenchError {
        code: exit::FAILED,
        message: format!("bench: {message}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Processes
// ---------------------------------------------------------------------------------------------

/// A child process that is killed, with everything it started, when this value is dropped
/// (on success, on error, on Ctrl-C and on a benchmark's time limit alike).
pub(crate) struct Proc {
    /// For messages.
    pub name: String,
    /// The child.
    pub child: tokio::process::Child,
    /// Its pid.
    pub pid: i32,
}

impl Proc {
    /// Spawns `cmd` (stdin from /dev/null).
    pub fn spawn(name: &str, mut cmd: tokio::process::Command) -> Result<Proc, BenchError> {
        cmd.stdin(Stdio::null()).kill_on_drop(true);
        let child = cmd
            .spawn()
            .map_err(|e| fail(format!("cannot start {name}: {e}")))?;
        let pid = child
            .id()
            .and_then(|p| i32::try_from(p).ok())
            .ok_or_else(|| fail(format!("{name} has no pid")))?;
        Ok(Proc {
            name: name.to_string(),
            child,
            pid,
        })
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // A child that was already reaped has no pid of ours any more: leave it.
        if let Ok(None) = self.child.try_wait() {
            kill_tree(self.pid);
            let _ = self.child.start_kill();
            let _ = self.child.try_wait();
        }
    }
}

/// The `kiln` binary under test: `$KILN_BIN`, or `kiln` beside this binary (cargo builds both
/// into the same directory).
pub(crate) fn kiln_exe() -> Result<PathBuf, BenchError> {
    if let Some(path) = std::env::var_os("KILN_BIN") {
        return Ok(PathBuf::from(path));
    }
    let path = bench_exe()?.with_file_name("kiln");
    if path.is_file() {
        Ok(path)
    } else {
        Err(fail(format!(
            "no kiln binary at {} (build it with `cargo build -p kiln`, or set KILN_BIN)",
            path.display()
        )))
    }
}

/// This `kiln-bench` binary: the benchmarks' steps run its hidden `gen` and `split-unit`
/// commands.
pub(crate) fn bench_exe() -> Result<PathBuf, BenchError> {
    std::env::current_exe().map_err(|e| fail(format!("cannot find the kiln-bench binary: {e}")))
}

/// A `kiln` command with none of the caller's `KILN_*` settings (tokens, data dir, log
/// filter), so every run measures the same defaults.
pub(crate) fn kiln_command() -> Result<tokio::process::Command, BenchError> {
    let mut cmd = tokio::process::Command::new(kiln_exe()?);
    for (k, _) in std::env::vars_os() {
        let k_text = k.to_string_lossy();
        if k_text.starts_with("KILN_") || k_text.starts_with("OTEL_") {
            cmd.env_remove(k);
        }
    }
    let extra = CHILD_ENV.lock().unwrap_or_else(|p| p.into_inner());
    cmd.envs(extra.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    Ok(cmd)
}

/// Variables the benchmark itself gives the `kiln` children it starts from now on (the
/// caller's `KILN_*` and `OTEL_*` never reach them): see [`set_child_env`].
static CHILD_ENV: std::sync::Mutex<Vec<(String, String)>> = std::sync::Mutex::new(Vec::new());

/// Sets the variables the next `kiln` children get (e.g. an OTLP endpoint).
pub(crate) fn set_child_env(vars: Vec<(String, String)>) {
    *CHILD_ENV.lock().unwrap_or_else(|p| p.into_inner()) = vars;
}

/// The log filter of the `kiln serve` and `kiln runner` children: `KILN_BENCH_LOG`, or `info`
/// (their default).
pub(crate) fn child_log_filter() -> String {
    std::env::var("KILN_BENCH_LOG").unwrap_or_else(|_| "info".into())
}

/// A temp dir for one benchmark: removed at the end, unless `KILN_BENCH_KEEP` is set (then
/// its path is printed, with the children's logs and the dispatcher's data in it).
pub(crate) enum Scratch {
    /// Removed on drop.
    Temp(tempfile::TempDir),
    /// Kept.
    Kept(PathBuf),
}

impl Scratch {
    /// Makes one.
    pub fn new() -> Result<Scratch, BenchError> {
        let dir = tempfile::Builder::new()
            .prefix("kiln-bench-")
            .tempdir()
            .map_err(fail)?;
        if std::env::var_os("KILN_BENCH_KEEP").is_some() {
            let path = dir.keep();
            note(format!("keeping {}", path.display()));
            return Ok(Scratch::Kept(path));
        }
        Ok(Scratch::Temp(dir))
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        match self {
            Scratch::Temp(t) => t.path(),
            Scratch::Kept(p) => p,
        }
    }
}

/// Quotes a string for `sh`.
pub(crate) fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The last lines of a log file, for error messages.
pub(crate) fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Spawns `kiln serve --listen LISTEN --data-dir DATA EXTRA...`, its stderr appended to `log`,
/// and reads the stdout line that names its address (then keeps draining stdout). The address
/// is `None` when the child said nothing of it within 30 s (it may have exited: the caller
/// decides whether to retry, e.g. a port not yet free, or to fail).
pub(crate) async fn spawn_serve(
    log: &Path,
    listen: &str,
    data: &Path,
    extra: &[&str],
) -> Result<(Proc, Option<String>), BenchError> {
    let log_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|e| fail(format!("{}: {e}", log.display())))?;
    let mut cmd = kiln_command()?;
    cmd.arg("serve")
        .args(["--listen", listen, "--data-dir"])
        .arg(data)
        .args(extra)
        .env("KILN_LOG", child_log_filter())
        .stdout(Stdio::piped())
        .stderr(log_file);
    let mut proc = Proc::spawn("kiln serve", cmd)?;
    let stdout = proc
        .child
        .stdout
        .take()
        .ok_or_else(|| fail("kiln serve has no stdout"))?;
    let mut lines = BufReader::new(stdout).lines();
    let first = tokio::time::timeout(Duration::from_secs(30), lines.next_line()).await;
    let addr = match first {
        Ok(Ok(Some(line))) => line
            .strip_prefix("kiln dispatcher listening on ")
            .map(|a| a.trim().to_string()),
        _ => None,
    };
    // Keep reading its stdout so it can never block on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok((proc, addr))
}

/// A `kiln serve` child on a loopback port, its data in a directory of the benchmark's.
pub(crate) struct Server {
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    /// The serve process's pid (for /proc).
    pub pid: i32,
    /// Its stderr (the dispatcher's log).
    pub log: PathBuf,
    _proc: Proc,
}

impl Server {
    /// Starts `kiln serve --listen 127.0.0.1:0 --data-dir DIR/data` and waits for the line that
    /// names its address.
    pub async fn start(dir: &Path) -> Result<Server, BenchError> {
        let data = dir.join("data");
        let log = dir.join("serve.log");
        let (proc, addr) = spawn_serve(&log, "127.0.0.1:0", &data, &[]).await?;
        let Some(addr) = addr else {
            return Err(fail(format!(
                "kiln serve did not say where it listens; its log:\n{}",
                tail(&log, 20)
            )));
        };
        let server = Server {
            url: format!("http://{addr}"),
            pid: proc.pid,
            log,
            _proc: proc,
        };
        ready(&server.url, &server.log).await?;
        Ok(server)
    }

    /// A gRPC channel to it.
    pub async fn channel(&self) -> Result<Channel, BenchError> {
        connect(&self.url).await
    }

    /// A `BuildService` client.
    pub async fn build_client(&self) -> Result<BuildServiceClient<Channel>, BenchError> {
        Ok(BuildServiceClient::new(self.channel().await?))
    }

    /// Starts a `kiln runner` child named `name`, with its work dir under `dir`, and waits until
    /// the dispatcher lists it idle.
    pub async fn start_runner(&self, dir: &Path, name: &str) -> Result<Proc, BenchError> {
        start_runner(&self.url, dir, name).await
    }
}

/// Starts a `kiln runner` child for the dispatcher at `url`, named `name`, with its work dir
/// and log under `dir`, and waits until the dispatcher lists it idle.
pub(crate) async fn start_runner(url: &str, dir: &Path, name: &str) -> Result<Proc, BenchError> {
    let log = dir.join(format!("runner-{name}.log"));
    let proc = spawn_runner(url, name, &dir.join(format!("runner-{name}")), &log, &[])?;
    wait_idle(url, &[name.to_string()], Duration::from_secs(30), &log).await?;
    Ok(proc)
}

/// Spawns a `kiln runner` child for the dispatcher at `url` (work dir `work`, stderr to `log`,
/// `extra` runner arguments) without waiting for it. Its mirror cache is `runner-mirrors` beside
/// `work`, shared with the benchmark's other runners (not the user's cache).
pub(crate) fn spawn_runner(
    url: &str,
    name: &str,
    work: &Path,
    log: &Path,
    extra: &[&str],
) -> Result<Proc, BenchError> {
    let log_file =
        std::fs::File::create(log).map_err(|e| fail(format!("{}: {e}", log.display())))?;
    let mut cmd = kiln_command()?;
    cmd.args(["--dispatcher", url, "runner", "--name", name])
        .args(extra)
        .arg("--work-dir")
        .arg(work)
        .env(
            "KILN_CACHE_DIR",
            work.parent().unwrap_or(work).join("runner-mirrors"),
        )
        .env("KILN_LOG", child_log_filter())
        .stdout(Stdio::null())
        .stderr(log_file);
    Proc::spawn("kiln runner", cmd)
}

/// Waits until the dispatcher at `url` lists every runner of `names` idle; after `within`,
/// fails with the tail of `log` (a runner's log, to say why).
pub(crate) async fn wait_idle(
    url: &str,
    names: &[String],
    within: Duration,
    log: &Path,
) -> Result<(), BenchError> {
    let mut admin = RunnerAdminServiceClient::new(connect(url).await?);
    let deadline = Instant::now() + within;
    loop {
        let idle = admin
            .list_runners(proto::ListRunnersRequest {})
            .await
            .map(|r| {
                r.into_inner()
                    .runners
                    .iter()
                    .filter(|r| {
                        names.contains(&r.name) && r.state == proto::RunnerState::Idle as i32
                    })
                    .count()
            })
            .unwrap_or(0);
        if idle == names.len() {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(fail(format!(
                "only {idle} of {} runners attached within {} s; {}:\n{}",
                names.len(),
                within.as_secs(),
                log.display(),
                tail(log, 20)
            )));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Connects a channel to a loopback dispatcher.
pub(crate) async fn connect(url: &str) -> Result<Channel, BenchError> {
    Endpoint::from_shared(url.to_string())
        .map_err(|e| fail(format!("bad URL {url}: {e}")))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .connect()
        .await
        .map_err(|e| fail(format!("cannot reach {url}: {e}")))
}

// ---------------------------------------------------------------------------------------------
// Repositories
// ---------------------------------------------------------------------------------------------

/// A throwaway git repository on branch `main` (the testkit's).
pub(crate) struct Repo(kiln_testkit::Repo);

impl Repo {
    /// Creates a repository at `dir` on branch `main`.
    pub fn init(dir: &Path) -> Result<Repo, BenchError> {
        kiln_testkit::Repo::try_init(dir, Some("main"))
            .map(Repo)
            .map_err(fail)
    }

    /// Its absolute path (what is submitted).
    pub fn path(&self) -> &str {
        self.0.path_str()
    }

    /// Writes `files` into the work tree and commits them; returns the commit id.
    pub fn commit(&self, files: &[(&str, &str)], message: &str) -> Result<String, BenchError> {
        let files: Vec<(&str, &[u8])> = files.iter().map(|(p, t)| (*p, t.as_bytes())).collect();
        self.0.try_commit(&files, message).map_err(fail)
    }
}

/// A `.kiln.yml` with one step running `run`.
pub(crate) fn pipeline(step: &str, run: &str) -> String {
    // A JSON string is a valid double-quoted YAML string.
    let run = serde_json::Value::String(run.to_string()).to_string();
    format!("steps:\n  - name: {step}\n    run: {run}\n    timeout: 10m\n")
}

/// Submits a commit; returns the build.
pub(crate) async fn submit(
    client: &mut BuildServiceClient<Channel>,
    repo: &Repo,
    commit: &str,
) -> Result<proto::Build, BenchError> {
    Ok(client
        .submit_build(proto::SubmitBuildRequest {
            repo: repo.path().to_string(),
            commit: commit.to_string(),
            branch: "main".into(),
            trigger: "bench".into(),
            env: Default::default(),
        })
        .await
        .map_err(|s| fail(format!("submit failed: {}", s.message())))?
        .into_inner())
}

// ---------------------------------------------------------------------------------------------
// Memory
// ---------------------------------------------------------------------------------------------

/// `VmRSS` and `VmHWM` (peak RSS) of a process, in KiB.
pub(crate) fn rss_kib(pid: i32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

/// Samples a process's `VmRSS` in the background and keeps the largest value.
pub(crate) struct RssSampler {
    stop: CancellationToken,
    task: JoinHandle<(u64, usize)>,
    pid: i32,
}

/// What an [`RssSampler`] saw.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RssPeak {
    /// Largest sampled `VmRSS`, KiB.
    pub sampled_kib: u64,
    /// The kernel's high-water mark `VmHWM` at the end, KiB (covers moments between samples,
    /// and the process's whole life).
    pub hwm_kib: u64,
    /// Samples taken.
    pub samples: usize,
}

impl RssSampler {
    /// Starts sampling `pid` every `every`.
    pub fn start(pid: i32, every: Duration) -> RssSampler {
        let stop = CancellationToken::new();
        let task = {
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut peak = 0;
                let mut samples = 0;
                let mut tick = tokio::time::interval(every);
                loop {
                    tokio::select! {
                        _ = tick.tick() => {}
                        _ = stop.cancelled() => break,
                    }
                    if let Some((rss, _)) = rss_kib(pid) {
                        peak = peak.max(rss);
                        samples += 1;
                    }
                }
                (peak, samples)
            })
        };
        RssSampler { stop, task, pid }
    }

    /// Stops sampling; returns the peak.
    pub async fn finish(self) -> RssPeak {
        self.stop.cancel();
        let (mut sampled_kib, mut samples) = self.task.await.unwrap_or((0, 0));
        let hwm_kib = match rss_kib(self.pid) {
            Some((rss, hwm)) => {
                sampled_kib = sampled_kib.max(rss);
                samples += 1;
                hwm
            }
            None => 0,
        };
        RssPeak {
            sampled_kib,
            hwm_kib,
            samples,
        }
    }
}

/// KiB as decimal megabytes (10^6 bytes).
pub(crate) fn mb(kib: u64) -> f64 {
    kib as f64 * 1024.0 / 1e6
}

// ---------------------------------------------------------------------------------------------
// Statistics and printing
// ---------------------------------------------------------------------------------------------

/// Nearest-rank percentile `p` (0..=100) of sorted values.
pub(crate) fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Sorts a copy of `values`.
pub(crate) fn sorted(values: &[f64]) -> Vec<f64> {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    v
}

/// Milliseconds of a duration.
pub(crate) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Whether a goal was met, as printed.
pub(crate) fn verdict(met: bool) -> &'static str {
    if met { "met" } else { "MISSED" }
}

/// Prints a section header.
pub(crate) fn header(name: &str, what: &str) {
    println!();
    println!("== {name}: {what}");
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load: Vec<&str> = load.split_whitespace().take(3).collect();
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    note(format!(
        "{cpus} CPUs, load average {} at the start",
        load.join(" ")
    ));
}

/// Prints one figure: `label  value  goal  (verdict)  baseline  ratio`.
pub(crate) fn figure(label: &str, value: String, goal: &str, met: Option<bool>, baseline: &str) {
    let v = met.map(|m| format!("({})", verdict(m))).unwrap_or_default();
    println!("  {label:<30} {value:>14}   {goal:<14} {v:<9} {baseline}");
}

/// Prints a line of detail.
pub(crate) fn note(text: impl std::fmt::Display) {
    println!("  {text}");
}

/// The wall clock in nanoseconds since the Unix epoch.
pub(crate) fn now_ns() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

/// Waits for a child to exit, at most `limit`.
pub(crate) async fn wait_exit(proc: &mut Proc, limit: Duration) -> Result<i32, BenchError> {
    match tokio::time::timeout(limit, proc.child.wait()).await {
        Ok(Ok(status)) => Ok(status.code().unwrap_or(-1)),
        Ok(Err(e)) => Err(fail(format!("waiting for {}: {e}", proc.name))),
        Err(_) => Err(fail(format!("{} did not exit within {limit:?}", proc.name))),
    }
}

/// Whether a wire job (or build) state is final.
pub(crate) fn is_final(state: i32) -> bool {
    proto::JobState::try_from(state)
        .ok()
        .and_then(kiln::convert::job_state_from_proto)
        .is_some_and(|s| s.is_final())
}

/// Milliseconds as seconds with two decimals, like `1.25 s`.
pub(crate) fn secs(ms: f64) -> String {
    format!("{:.2} s", ms / 1000.0)
}

/// Waits (at most 30 s) until the dispatcher at `url` answers a read; its client then. On
/// failure, the tail of its `log` says why.
pub(crate) async fn ready(
    url: &str,
    log: &Path,
) -> Result<BuildServiceClient<Channel>, BenchError> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(ch) = connect(url).await {
            let mut c = BuildServiceClient::new(ch);
            if c.list_builds(proto::ListBuildsRequest::default())
                .await
                .is_ok()
            {
                return Ok(c);
            }
        }
        if Instant::now() > deadline {
            return Err(fail(format!(
                "kiln serve at {url} does not answer; its log:\n{}",
                tail(log, 20)
            )));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

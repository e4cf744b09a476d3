//! `kiln-bench scale --sessions 10,100,1000,10000`: how far one dispatcher goes, measured at
//! the dispatcher (issue 14).
//!
//! A real `kiln serve` child on loopback (SQLite in its data dir, or with `--postgres` a
//! database on a durable throwaway cluster) holds `--builds` stored builds (filled directly
//! in the store while the dispatcher is stopped, as the store stage fills it: stop, fill,
//! start). Simulated runners in this process attach to it on real `RunnerService.Attach`
//! streams (up to [`STREAMS_PER_CONNECTION`] streams share one HTTP/2 connection), speak the
//! protocol as `kiln runner` does (hello, welcome, heartbeats listing what they hold, accept,
//! step started and finished, job finished, result acknowledged) and answer each assignment at
//! once with a passing result. Each runner has one slot.
//!
//! At each stage (a number of attached runners; runners are added, never replaced, from one
//! stage to the next):
//!
//! 1. The runners hold back their answers (a gate). `H + --jobs` builds of one job each are
//!    submitted through `SubmitBuild` (`--submitters` at a time), H = min(N, `--jobs`):
//!    distinct builds of one commit of a real git repository, told apart by a build parameter.
//!    Submit latency p50/p99 is taken here. H runners end up holding one assignment each; with
//!    N ≤ `--jobs` the rest of the jobs stay queued.
//! 2. The gate opens: every holding runner answers, is given the next queued job, answers at
//!    once, and so on until every job ended. Assignments/s = assignments made after the gate
//!    opened / time until the last result was acknowledged (with N > `--jobs` every job has a
//!    free runner, and those are the assignments the scheduler had not made yet when the gate
//!    opened); jobs ended/s = all the stage's jobs / that time. The dispatcher's
//!    CPU time over this phase per job ended is the cost of a decision (assignment, accept,
//!    step, result). H is capped because H runners answering in the same instant queue H × 3
//!    store writes at once, and each session's heartbeat waits behind its own messages.
//! 3. `GetBuild` of random stored builds and `ListBuilds` (first page of 50) latency.
//! 4. The dispatcher's `VmRSS` and `VmHWM` (`/proc/PID/status`) and its CPU over the stage
//!    (`/proc/PID/stat` utime + stime).
//!
//! Every figure is printed with its ratio to the first stage of the run, and the cost of a
//! decision also against the same number of runners at the first stored-builds level: the
//! ratio that says whether a decision's cost depends on the builds stored.
//!
//! With `--dispatchers N` (PostgreSQL only) N `kiln serve` children share the one database,
//! as a farm's dispatchers do: runner `i` attaches to dispatcher `i mod N`, submitter `w`
//! submits through dispatcher `w mod N`, `GetBuild` and `ListBuilds` samples go to each in
//! turn. CPU (per job and share of a core) and RSS are the sums over the N processes.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use kiln_domain::JobState;
use kiln_store::{PgStore, SqliteStore, Store};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::{Notify, Semaphore, mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use super::super::util::{
    Proc, Repo, Scratch, connect, fail, figure, header, mb, ms, note, percentile, pipeline, ready,
    rss_kib, sorted, spawn_serve, tail, wait_exit, wrong,
};
use super::{ScaleArgs, fill};
use crate::BenchError;
use kiln::proto::{
    self, build_service_client::BuildServiceClient, dispatcher_message::Kind as In,
    runner_message::Kind as Out, runner_service_client::RunnerServiceClient,
};

/// Runner streams that share one HTTP/2 connection (the server's limit on concurrent streams
/// per connection is higher; runners on one machine behind one proxy look like this).
pub(crate) const STREAMS_PER_CONNECTION: usize = 100;
/// Runner sessions being opened at once.
const OPENING: usize = 200;
/// The longest any one wait of a stage may take (welcomes, submits, assignments, ends).
const WAIT: Duration = Duration::from_secs(600);

/// What every simulated runner counts into.
#[derive(Default)]
struct Shared {
    /// Assignments received.
    assigned: AtomicU64,
    /// Results acknowledged by the dispatcher.
    ended: AtomicU64,
    /// Messages the dispatcher refused, cancels (neither should happen).
    refused: AtomicU64,
    /// Sessions that broke before they were told to stop.
    broken: AtomicU64,
    /// The first thing that went wrong, for the message.
    first_error: std::sync::Mutex<Option<String>>,
    /// Woken at each assignment, result acknowledged and broken session.
    progress: Notify,
}

impl Shared {
    fn error(&self, e: String) {
        self.first_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_or_insert(e);
    }

    fn why(&self) -> String {
        self.first_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .unwrap_or_default()
    }

    /// Waits until `count()` reaches `target`; fails when a session broke or after [`WAIT`].
    async fn wait_for(
        &self,
        what: &str,
        target: u64,
        count: impl Fn(&Shared) -> u64,
    ) -> Result<(), BenchError> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let notified = self.progress.notified();
            if count(self) >= target {
                return Ok(());
            }
            let broken = self.broken.load(Ordering::SeqCst);
            if broken > 0 {
                return Err(wrong(format!(
                    "{broken} runner sessions broke while waiting for {what}: {}",
                    self.why()
                )));
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(fail(format!(
                    "{what}: {} of {target} after {WAIT:?} {}",
                    count(self),
                    self.why()
                )));
            }
        }
    }
}

fn send_msg(kind: Out) -> proto::RunnerMessage {
    proto::RunnerMessage { kind: Some(kind) }
}

/// The messages a runner sends for an assignment whose one step passes at once.
fn answer(attempt_id: u64) -> [proto::RunnerMessage; 4] {
    [
        send_msg(Out::Accepted(proto::Accepted { attempt_id })),
        send_msg(Out::StepStarted(proto::StepStarted {
            attempt_id,
            step_index: 0,
        })),
        send_msg(Out::StepFinished(proto::StepFinished {
            attempt_id,
            step_index: 0,
            outcome: proto::StepOutcome::Passed as i32,
            exit_code: Some(0),
            ..Default::default()
        })),
        send_msg(Out::JobFinished(proto::JobFinished {
            attempt_id,
            state: proto::JobState::Passed as i32,
            message: String::new(),
            last_seq: 0,
        })),
    ]
}

/// One simulated runner (one slot): attaches, reports its welcome, then heartbeats (listing
/// what it holds) and answers assignments once `gate` is open, until `stop`.
async fn runner(
    channel: Channel,
    name: String,
    shared: Arc<Shared>,
    mut gate: watch::Receiver<bool>,
    opening: Arc<Semaphore>,
    welcomed: mpsc::UnboundedSender<()>,
    stop: CancellationToken,
) -> Result<(), String> {
    let permit = opening.acquire_owned().await.map_err(|e| e.to_string())?;
    let mut client = RunnerServiceClient::new(channel);
    let (tx, rx) = mpsc::channel(32);
    let hello = proto::Hello {
        name,
        slots: 1,
        version: env!("CARGO_PKG_VERSION").to_string(),
        ..Default::default()
    };
    tx.send(send_msg(Out::Hello(hello)))
        .await
        .map_err(|e| e.to_string())?;
    let mut inbound = client
        .attach(ReceiverStream::new(rx))
        .await
        .map_err(|s| format!("attach: {}", s.message()))?
        .into_inner();
    let welcome = match inbound.message().await {
        Ok(Some(proto::DispatcherMessage {
            kind: Some(In::Welcome(w)),
        })) => w,
        Ok(other) => return Err(format!("expected a welcome, got {other:?}")),
        Err(s) => return Err(s.message().to_string()),
    };
    drop(permit);
    let _ = welcomed.send(());
    let every = Duration::from_millis(u64::from(welcome.heartbeat_interval_ms.max(50)));
    let mut tick = tokio::time::interval(every);
    // Assigned and not yet acknowledged; of those, not yet answered (the gate was closed).
    let mut held: Vec<u64> = Vec::new();
    let mut pending: Vec<u64> = Vec::new();
    let closed = || "the stream closed".to_string();
    loop {
        // Answers held back are sent as soon as the gate is seen open, whichever branch ran
        // last (the gate may have opened while a heartbeat or a message was being handled).
        let open = *gate.borrow_and_update();
        if open {
            for a in std::mem::take(&mut pending) {
                for m in answer(a) {
                    tx.send(m).await.map_err(|_| closed())?;
                }
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            // Opened: the top of the loop sends what was held back.
            r = gate.changed(), if !open => {
                if r.is_err() {
                    return Ok(());
                }
            }
            _ = tick.tick() => {
                let hb = proto::Heartbeat {
                    running_attempts: held.clone(),
                    sent_at_ms: kiln_domain::now_millis(),
                    draining: false,
                    lists_held: true,
                };
                tx.send(send_msg(Out::Heartbeat(hb))).await.map_err(|_| closed())?;
            }
            m = inbound.message() => match m {
                Ok(Some(proto::DispatcherMessage { kind: Some(k) })) => match k {
                    In::Assign(a) => {
                        held.push(a.attempt_id);
                        shared.assigned.fetch_add(1, Ordering::SeqCst);
                        shared.progress.notify_one();
                        if *gate.borrow() {
                            for m in answer(a.attempt_id) {
                                tx.send(m).await.map_err(|_| closed())?;
                            }
                        } else {
                            pending.push(a.attempt_id);
                        }
                    }
                    In::ResultAck(r) => {
                        if let Some(i) = held.iter().position(|a| *a == r.attempt_id) {
                            held.swap_remove(i);
                            shared.ended.fetch_add(1, Ordering::SeqCst);
                            shared.progress.notify_one();
                        }
                    }
                    In::Refused(r) => {
                        shared.refused.fetch_add(1, Ordering::SeqCst);
                        shared.error(format!("refused: attempt {}: {}", r.attempt_id, r.reason));
                    }
                    In::Cancel(c) => {
                        shared.refused.fetch_add(1, Ordering::SeqCst);
                        shared.error(format!("cancel: attempt {}: {}", c.attempt_id, c.reason));
                    }
                    _ => {}
                },
                Ok(Some(_)) => {}
                Ok(None) => return Err("the dispatcher closed the stream".into()),
                Err(s) => return Err(s.message().to_string()),
            },
        }
    }
}

/// The simulated runners attached so far, on their shared connections.
struct Fleet {
    /// The dispatchers' URLs: runner `i` attaches to `urls[i % urls.len()]`.
    urls: Vec<String>,
    shared: Arc<Shared>,
    gate: watch::Sender<bool>,
    opening: Arc<Semaphore>,
    stop: CancellationToken,
    /// Per dispatcher, its connections (up to [`STREAMS_PER_CONNECTION`] runners each).
    connections: Vec<Vec<Channel>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Fleet {
    fn new(urls: &[String]) -> Fleet {
        Fleet {
            urls: urls.to_vec(),
            shared: Arc::new(Shared::default()),
            gate: watch::channel(false).0,
            opening: Arc::new(Semaphore::new(OPENING)),
            stop: CancellationToken::new(),
            connections: vec![Vec::new(); urls.len()],
            tasks: Vec::new(),
        }
    }

    fn len(&self) -> usize {
        self.tasks.len()
    }

    /// Connections open, over all dispatchers.
    fn connections(&self) -> usize {
        self.connections.iter().map(Vec::len).sum()
    }

    /// Attaches runners until there are `n`; returns how long until all new ones were welcomed.
    async fn grow(&mut self, n: usize) -> Result<Duration, BenchError> {
        let start = Instant::now();
        let (welcomed_tx, mut welcomed) = mpsc::unbounded_channel();
        let adding = n.saturating_sub(self.len());
        for i in self.len()..n {
            // The dispatcher's k-th runner shares its connection with k's neighbours.
            let (d, k) = (i % self.urls.len(), i / self.urls.len());
            if k / STREAMS_PER_CONNECTION >= self.connections[d].len() {
                self.connections[d].push(connect(&self.urls[d]).await?);
            }
            let channel = self.connections[d][k / STREAMS_PER_CONNECTION].clone();
            let (shared, gate, opening, tx, stop) = (
                self.shared.clone(),
                self.gate.subscribe(),
                self.opening.clone(),
                welcomed_tx.clone(),
                self.stop.clone(),
            );
            let name = format!("sim-{i:05}");
            self.tasks.push(tokio::spawn(async move {
                if let Err(e) = runner(channel, name, shared.clone(), gate, opening, tx, stop).await
                {
                    shared.broken.fetch_add(1, Ordering::SeqCst);
                    shared.error(e);
                    shared.progress.notify_one();
                }
            }));
        }
        drop(welcomed_tx);
        let deadline = tokio::time::Instant::now() + WAIT;
        for got in 0..adding {
            match tokio::time::timeout_at(deadline, welcomed.recv()).await {
                Ok(Some(())) => {}
                _ => {
                    return Err(fail(format!(
                        "only {got} of {adding} new runners were welcomed: {}",
                        self.shared.why()
                    )));
                }
            }
        }
        Ok(start.elapsed())
    }

    /// Ends every session.
    async fn stop(self) {
        self.stop.cancel();
        for t in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
        }
    }
}

/// A `kiln serve` child for this benchmark.
struct Serve {
    url: String,
    pid: i32,
    proc: Proc,
}

/// Dispatcher `index`'s log (`serve.log`, then `serve-1.log`, ...) and data dir (`data`,
/// `data-1`, ...) in `dir`.
fn serve_paths(dir: &Path, index: usize) -> (std::path::PathBuf, std::path::PathBuf) {
    let suffix = if index == 0 {
        String::new()
    } else {
        format!("-{index}")
    };
    (
        dir.join(format!("serve{suffix}.log")),
        dir.join(format!("data{suffix}")),
    )
}

async fn start_serve(
    dir: &Path,
    index: usize,
    database: Option<&str>,
) -> Result<Serve, BenchError> {
    let (log, data) = serve_paths(dir, index);
    std::fs::create_dir_all(&data).map_err(fail)?;
    let extra: Vec<&str> = match database {
        Some(url) => vec!["--database", url],
        None => vec![],
    };
    let (proc, addr) = spawn_serve(&log, "127.0.0.1:0", &data, &extra).await?;
    let Some(addr) = addr else {
        return Err(fail(format!(
            "kiln serve did not say where it listens; its log:\n{}",
            tail(&log, 20)
        )));
    };
    let url = format!("http://{addr}");
    ready(&url, &log).await?;
    Ok(Serve {
        url,
        pid: proc.pid,
        proc,
    })
}

impl Serve {
    /// SIGTERM, and waits for it to exit (graceful shutdown), at most 30 s.
    async fn stop(mut self) -> Result<(), BenchError> {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.pid),
            nix::sys::signal::Signal::SIGTERM,
        );
        wait_exit(&mut self.proc, Duration::from_secs(30)).await?;
        Ok(())
    }
}

/// Clock ticks per second (`getconf CLK_TCK`; 100 on Linux when it cannot be asked).
fn clock_ticks() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|t| *t > 0.0)
        .unwrap_or(100.0)
}

/// CPU time the processes used so far (user + system), in ticks, summed.
fn cpu_ticks_all(pids: &[i32]) -> u64 {
    pids.iter().filter_map(|p| cpu_ticks(*p)).sum()
}

/// `VmRSS` and `VmHWM` of the processes, in KiB, summed.
fn rss_kib_all(pids: &[i32]) -> (u64, u64) {
    pids.iter()
        .filter_map(|p| rss_kib(*p))
        .fold((0, 0), |(r, h), (a, b)| (r + a, h + b))
}

/// CPU time a process used so far (user + system), in ticks.
fn cpu_ticks(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces: fields count from after its closing parenthesis.
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 after the name.
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// What one stage measured.
struct StageResult {
    builds_level: u64,
    stored: u64,
    runners: usize,
    connections: usize,
    welcome: Duration,
    jobs: u64,
    assigned_after_open: u64,
    assignments_per_s: f64,
    ended_per_s: f64,
    cpu_ms_per_job: f64,
    cpu_share: f64,
    submit: Vec<f64>,
    get_build: Vec<f64>,
    list_builds: Vec<f64>,
    rss_kib: u64,
    hwm_kib: u64,
}

/// Submits `count` distinct builds of `commit`, `submitters` at a time (submitter `w` through
/// `clients[w % len]`); returns each call's latency in ms and the largest build id.
async fn submit_all(
    submitters: u32,
    clients: &[BuildServiceClient<Channel>],
    repo: &str,
    commit: &str,
    first: u64,
    count: u64,
) -> Result<(Vec<f64>, u64), BenchError> {
    let next = Arc::new(AtomicU64::new(first));
    let end = first + count;
    let mut workers = Vec::new();
    for w in 0..submitters as usize {
        let (mut client, next, repo, commit) = (
            clients[w % clients.len()].clone(),
            next.clone(),
            repo.to_string(),
            commit.to_string(),
        );
        workers.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut max_id = 0;
            loop {
                let n = next.fetch_add(1, Ordering::SeqCst);
                if n >= end {
                    return Ok::<_, BenchError>((lat, max_id));
                }
                let req = proto::SubmitBuildRequest {
                    repo: repo.clone(),
                    commit: commit.clone(),
                    branch: "main".into(),
                    trigger: "bench".into(),
                    env: [("BENCH_BUILD".to_string(), n.to_string())].into(),
                };
                let t = Instant::now();
                let b = client
                    .submit_build(req)
                    .await
                    .map_err(|s| fail(format!("submit failed: {}", s.message())))?
                    .into_inner();
                lat.push(ms(t.elapsed()));
                max_id = max_id.max(b.id);
            }
        }));
    }
    let mut all = Vec::with_capacity(count as usize);
    let mut max_id = 0;
    for w in workers {
        let (lat, id) = tokio::time::timeout(WAIT, w)
            .await
            .map_err(|_| fail(format!("submits did not end within {WAIT:?}")))?
            .map_err(|e| fail(format!("a submitter: {e}")))??;
        all.extend(lat);
        max_id = max_id.max(id);
    }
    Ok((all, max_id))
}

/// `GetBuild` of random builds among `1..=max_id` and `ListBuilds` first pages, `samples` each
/// (sample `k` through `clients[k % len]`).
async fn reads(
    clients: &mut [BuildServiceClient<Channel>],
    max_id: u64,
    samples: u32,
    seed: u64,
) -> Result<(Vec<f64>, Vec<f64>), BenchError> {
    let mut rng = StdRng::seed_from_u64(seed);
    let (mut get, mut list) = (Vec::new(), Vec::new());
    let n = clients.len();
    for k in 0..samples as usize {
        let client = &mut clients[k % n];
        let id = rng.random_range(1..=max_id.max(1));
        let t = Instant::now();
        match client
            .get_build(proto::GetBuildRequest { build_id: id })
            .await
        {
            // An id the store skipped (a PostgreSQL sequence may) is as costly to look up.
            Ok(_) => {}
            Err(s) if s.code() == tonic::Code::NotFound => {}
            Err(s) => return Err(fail(format!("GetBuild {id}: {}", s.message()))),
        }
        get.push(ms(t.elapsed()));
        let t = Instant::now();
        client
            .list_builds(proto::ListBuildsRequest {
                page_size: 50,
                ..Default::default()
            })
            .await
            .map_err(|s| fail(format!("ListBuilds: {}", s.message())))?;
        list.push(ms(t.elapsed()));
    }
    Ok((sorted(&get), sorted(&list)))
}

/// Fills the store to `target` stored builds (from `from`) while no dispatcher runs, and ends
/// the filler history's newest build (left queued: the fill supersedes only older ones), so
/// the dispatcher finds no queued job of its own.
async fn fill_store(
    db_path: std::path::PathBuf,
    pg_url: Option<String>,
    from: u64,
    target: u64,
) -> Result<Duration, BenchError> {
    tokio::task::spawn_blocking(move || -> Result<Duration, BenchError> {
        let (store, pg): (Arc<dyn Store>, Option<Arc<PgStore>>) = match &pg_url {
            Some(url) => {
                let s = Arc::new(
                    PgStore::connect(url).map_err(|e| fail(format!("opening the store: {e}")))?,
                );
                (s.clone(), Some(s))
            }
            None => (
                Arc::new(
                    SqliteStore::open(&db_path)
                        .map_err(|e| fail(format!("opening the store: {e}")))?,
                ),
                None,
            ),
        };
        let t = Instant::now();
        fill(store.as_ref(), from, target)?;
        for job in store
            .queued_jobs(10_000)
            .map_err(|e| fail(format!("store: {e}")))?
        {
            store
                .end_job(job.id, JobState::Cancelled, "kiln-bench: filler history")
                .map_err(|e| fail(format!("store: {e}")))?;
        }
        if let Some(pg) = &pg {
            pg.analyze()
                .map_err(|e| fail(format!("ANALYZE after the fill: {e}")))?;
        }
        Ok(t.elapsed())
    })
    .await
    .map_err(|e| fail(format!("the fill's thread: {e}")))?
}

/// Runs the dispatcher-level stages.
/// The median time of a `SELECT 1` on a new connection to `url`.
async fn round_trip_ms(url: &str) -> Result<f64, BenchError> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .map_err(|e| fail(format!("connecting through the relay: {e}")))?;
    let conn = tokio::spawn(connection);
    let mut samples = Vec::new();
    for _ in 0..21 {
        let t = Instant::now();
        client
            .simple_query("SELECT 1")
            .await
            .map_err(|e| fail(format!("SELECT 1 through the relay: {e}")))?;
        samples.push(ms(t.elapsed()));
    }
    drop(client);
    conn.abort();
    Ok(percentile(&sorted(&samples), 50.0))
}

pub async fn run(args: &ScaleArgs) -> Result<(), BenchError> {
    let mut levels = args.builds.clone();
    levels.sort_unstable();
    levels.dedup();
    let mut sessions: Vec<usize> = args.sessions.iter().map(|n| *n as usize).collect();
    sessions.sort_unstable();
    sessions.dedup();
    if levels.is_empty() || levels[0] == 0 || sessions.is_empty() || sessions[0] == 0 {
        return Err(fail(
            "--builds and --sessions need at least one stage above 0",
        ));
    }
    let dispatchers = args.dispatchers as usize;
    if dispatchers > 1 && !args.postgres {
        return Err(fail(
            "--dispatchers above 1 needs --postgres (dispatchers share a farm through PostgreSQL)",
        ));
    }
    let list = |v: Vec<String>| v.join(" / ");
    header(
        "scale-sessions",
        &format!(
            "{} with {} simulated runners at {} stored builds ({}, {} jobs past those the runners hold per stage)",
            if dispatchers == 1 {
                "one dispatcher".to_string()
            } else {
                format!("{dispatchers} dispatchers on one database (CPU and RSS summed over them)")
            },
            list(sessions.iter().map(usize::to_string).collect()),
            list(levels.iter().map(u64::to_string).collect()),
            if args.pg_socket {
                "PostgreSQL, fsync on, over its Unix-domain socket"
            } else if args.pg_delay_us.is_some() {
                "PostgreSQL, fsync on, over loopback TCP through a delaying relay"
            } else if args.postgres {
                "PostgreSQL, fsync on, over loopback TCP"
            } else {
                "SQLite"
            },
            args.jobs
        ),
    );
    let tmp = Scratch::new()?;
    let dir = tmp.path().to_path_buf();
    std::fs::create_dir_all(dir.join("data")).map_err(fail)?;
    let db_path = dir.join("data").join("kiln.db");
    let cluster = if args.postgres {
        Some(
            tokio::task::spawn_blocking(kiln_pgtest::PgCluster::start_durable)
                .await
                .map_err(|e| fail(format!("starting PostgreSQL: {e}")))?
                .map_err(|e| fail(format!("starting PostgreSQL: {e}")))?,
        )
    } else {
        None
    };
    // With --pg-delay-us, the relay: kept for the whole run (dropping it stops it).
    let (pg_url, _relay) = match &cluster {
        Some(c) => {
            let name = c
                .create_database()
                .map_err(|e| fail(format!("creating the database: {e}")))?;
            match args.pg_delay_us {
                _ if args.pg_socket => (Some(c.socket_url(&name)), None),
                None => (Some(c.url(&name)), None),
                Some(us) => {
                    let target = std::net::SocketAddr::from(([127, 0, 0, 1], c.port()));
                    let r = crate::delay::Relay::start(target, Duration::from_micros(us))
                        .map_err(|e| fail(format!("starting the delaying relay: {e}")))?;
                    let url = format!("postgres://postgres@{}/{name}", r.addr());
                    note(format!(
                        "PostgreSQL reached through a relay delaying each direction {us} µs: a round trip (SELECT 1) p50 {:.2} ms",
                        round_trip_ms(&url).await?
                    ));
                    (Some(url), Some(r))
                }
            }
        }
        None => (None, None),
    };
    let repo = Repo::init(&dir.join("repo"))?;
    let commit = repo.commit(
        &[(".kiln.yml", &pipeline("test", "true"))],
        "one job, one step",
    )?;
    let ticks = clock_ticks();

    let mut results: Vec<StageResult> = Vec::new();
    let (mut filled, mut stored, mut submitted) = (0u64, 0u64, 0u64);
    for (li, &level) in levels.iter().enumerate() {
        // Stop (nothing runs at the first level), fill, start.
        let target = level.max(stored);
        let took = fill_store(
            db_path.clone(),
            pg_url.clone(),
            filled,
            filled + target - stored,
        )
        .await?;
        filled += target - stored;
        stored = target;
        note(format!(
            "-- {level} stored builds: filled to {stored} in {:.1} s",
            took.as_secs_f64()
        ));
        let mut serves = Vec::with_capacity(dispatchers);
        let mut clients = Vec::with_capacity(dispatchers);
        let mut max_id = 0;
        for d in 0..dispatchers {
            let serve = start_serve(&dir, d, pg_url.as_deref()).await?;
            let mut client = BuildServiceClient::new(connect(&serve.url).await?);
            // A first submit warms the dispatcher's mirror and caches; its build (no runner
            // is attached yet) is cancelled, so the stages find nothing queued.
            let warm = client
                .submit_build(proto::SubmitBuildRequest {
                    repo: repo.path().to_string(),
                    commit: commit.clone(),
                    branch: "main".into(),
                    trigger: "bench".into(),
                    env: [("BENCH_WARM_UP".to_string(), format!("{li}-{d}"))].into(),
                })
                .await
                .map_err(|s| fail(format!("submit failed: {}", s.message())))?
                .into_inner();
            client
                .cancel_build(proto::CancelBuildRequest { build_id: warm.id })
                .await
                .map_err(|s| fail(format!("cancel failed: {}", s.message())))?;
            stored += 1;
            max_id = max_id.max(warm.id);
            serves.push(serve);
            clients.push(client);
        }
        let pids: Vec<i32> = serves.iter().map(|s| s.pid).collect();
        let urls: Vec<String> = serves.iter().map(|s| s.url.clone()).collect();
        let mut fleet = Fleet::new(&urls);
        let outcome: Result<(), BenchError> = async {
            for &n in &sessions {
                let welcome = fleet.grow(n).await?;
                let stored_at_start = stored;
                fleet.gate.send_replace(false);
                let (assigned0, ended0) = (
                    fleet.shared.assigned.load(Ordering::SeqCst),
                    fleet.shared.ended.load(Ordering::SeqCst),
                );
                let cpu0 = cpu_ticks_all(&pids);
                let t_stage = Instant::now();
                let hold = (n as u64).min(args.jobs);
                let jobs = hold + args.jobs;
                let (submit, top) =
                    submit_all(args.submitters, &clients, repo.path(), &commit, submitted, jobs)
                        .await?;
                submitted += jobs;
                stored += jobs;
                max_id = max_id.max(top);
                // Every runner holds one assignment, answered once the gate opens.
                fleet
                    .shared
                    .wait_for("runners holding an assignment", assigned0 + hold, |s| {
                        s.assigned.load(Ordering::SeqCst)
                    })
                    .await?;
                let held = fleet.shared.assigned.load(Ordering::SeqCst) - assigned0;
                let cpu1 = cpu_ticks_all(&pids);
                let t0 = Instant::now();
                fleet.gate.send_replace(true);
                fleet
                    .shared
                    .wait_for("every job ended", ended0 + jobs, |s| {
                        s.ended.load(Ordering::SeqCst)
                    })
                    .await?;
                let flow = t0.elapsed();
                let cpu2 = cpu_ticks_all(&pids);
                fleet.gate.send_replace(false);
                let assigned_after_open =
                    fleet.shared.assigned.load(Ordering::SeqCst) - assigned0 - held;
                let (get_build, list_builds) =
                    reads(&mut clients, max_id.max(stored), args.samples, n as u64).await?;
                let cpu3 = cpu_ticks_all(&pids);
                let (rss, hwm) = rss_kib_all(&pids);
                let refused = fleet.shared.refused.load(Ordering::SeqCst);
                if refused > 0 {
                    return Err(wrong(format!(
                        "the dispatcher refused or cancelled {refused} of the runners' attempts: {}",
                        fleet.shared.why()
                    )));
                }
                let r = StageResult {
                    builds_level: level,
                    stored: stored_at_start,
                    runners: n,
                    connections: fleet.connections(),
                    welcome,
                    jobs,
                    assigned_after_open,
                    assignments_per_s: assigned_after_open as f64
                        / flow.as_secs_f64().max(1e-9),
                    ended_per_s: jobs as f64 / flow.as_secs_f64().max(1e-9),
                    cpu_ms_per_job: (cpu2.saturating_sub(cpu1)) as f64 / ticks * 1000.0
                        / jobs as f64,
                    cpu_share: (cpu3.saturating_sub(cpu0)) as f64
                        / ticks
                        / t_stage.elapsed().as_secs_f64().max(1e-9),
                    submit: sorted(&submit),
                    get_build,
                    list_builds,
                    rss_kib: rss,
                    hwm_kib: hwm,
                };
                print_stage(&r, results.first(), results.iter().find(|f| {
                    f.runners == n && f.builds_level == levels[0] && li > 0
                }));
                results.push(r);
            }
            Ok(())
        }
        .await;
        fleet.stop().await;
        // What the dispatchers said goes with a failure (their data dirs are removed after).
        let outcome = outcome.map_err(|e| {
            let logs: Vec<String> = (0..dispatchers)
                .map(|d| {
                    format!(
                        "dispatcher {d}'s last log lines:\n{}",
                        tail(&serve_paths(&dir, d).0, 15)
                    )
                })
                .collect();
            fail(format!("{e}\n{}", logs.join("\n")))
        });
        for serve in serves {
            serve.stop().await?;
        }
        outcome?;
    }
    summary(&results, &levels);
    Ok(())
}

fn ratio(v: f64, base: f64) -> f64 {
    if base > 0.0 { v / base } else { 0.0 }
}

fn print_stage(r: &StageResult, first: Option<&StageResult>, same_runners: Option<&StageResult>) {
    note(format!(
        "-- {} runners on {} connections, {} stored builds at the start (level {}); all welcomed in {:.0} ms; {} jobs, {} assigned after the gate opened",
        r.runners,
        r.connections,
        r.stored,
        r.builds_level,
        ms(r.welcome),
        r.jobs,
        r.assigned_after_open
    ));
    let first = first.unwrap_or(r);
    let vs = |what: &str, v: f64, base: f64| {
        format!(
            "first stage ({} runners, {} builds) {what}, ratio {:.2}x",
            first.runners,
            first.builds_level,
            ratio(v, base)
        )
    };
    let (goal, met) = if r.runners == 1000 {
        ("goal >= 1000/s", Some(r.assignments_per_s >= 1000.0))
    } else {
        ("", None)
    };
    if r.assigned_after_open * 10 < r.jobs {
        // More runners than queued jobs: each job was handed out as it was queued (at the
        // submitters' pace), and the few left for after the gate are no rate of the queue.
        figure(
            "assignments/s",
            "n/a".into(),
            goal,
            None,
            &format!(
                "{} of {} jobs assigned after the gate: the rest went to a free runner as they were queued",
                r.assigned_after_open, r.jobs
            ),
        );
    } else {
        figure(
            "assignments/s",
            format!("{:.0}/s", r.assignments_per_s),
            goal,
            met,
            &vs(
                &format!("{:.0}/s", first.assignments_per_s),
                r.assignments_per_s,
                first.assignments_per_s,
            ),
        );
    }
    figure(
        "jobs ended/s",
        format!("{:.0}/s", r.ended_per_s),
        "",
        None,
        &vs(
            &format!("{:.0}/s", first.ended_per_s),
            r.ended_per_s,
            first.ended_per_s,
        ),
    );
    let (goal, met) = match same_runners {
        Some(base) => (
            "<= 1.5x builds",
            Some(ratio(r.cpu_ms_per_job, base.cpu_ms_per_job) <= 1.5),
        ),
        None => ("", None),
    };
    let flat = same_runners.map_or(String::new(), |b| {
        format!(
            "; against {} runners at {} builds {:.3} ms: {:.2}x",
            b.runners,
            b.builds_level,
            b.cpu_ms_per_job,
            ratio(r.cpu_ms_per_job, b.cpu_ms_per_job)
        )
    });
    figure(
        "dispatcher CPU per job",
        format!("{:.3} ms", r.cpu_ms_per_job),
        goal,
        met,
        &format!(
            "{}{flat}",
            vs(
                &format!("{:.3} ms", first.cpu_ms_per_job),
                r.cpu_ms_per_job,
                first.cpu_ms_per_job
            )
        ),
    );
    let p = |s: &[f64]| (percentile(s, 50.0), percentile(s, 99.0));
    let (s50, s99) = p(&r.submit);
    let (goal, met) = if r.stored >= 100_000 {
        ("goal p99 < 20 ms", Some(s99 < 20.0))
    } else {
        ("", None)
    };
    figure(
        "submit p50 / p99",
        format!("{s50:.2} / {s99:.2} ms"),
        goal,
        met,
        &vs(
            &format!("p99 {:.2} ms", percentile(&first.submit, 99.0)),
            s99,
            percentile(&first.submit, 99.0),
        ),
    );
    for (label, s, base) in [
        ("GetBuild p50 / p99", &r.get_build, &first.get_build),
        ("ListBuilds p50 / p99", &r.list_builds, &first.list_builds),
    ] {
        let (a, b) = p(s);
        figure(
            label,
            format!("{a:.2} / {b:.2} ms"),
            "",
            None,
            &vs(
                &format!("p50 {:.2} ms", percentile(base, 50.0)),
                a,
                percentile(base, 50.0),
            ),
        );
    }
    let (goal, met) = if r.runners >= 10_000 {
        ("goal < 600 MB", Some(mb(r.hwm_kib.max(r.rss_kib)) < 600.0))
    } else {
        ("", None)
    };
    figure(
        "dispatcher RSS / peak",
        format!("{:.0} / {:.0} MB", mb(r.rss_kib), mb(r.hwm_kib)),
        goal,
        met,
        &vs(
            &format!("{:.0} MB", mb(first.rss_kib)),
            mb(r.rss_kib),
            mb(first.rss_kib),
        ),
    );
    figure(
        "dispatcher CPU",
        format!("{:.0}% of a core", r.cpu_share * 100.0),
        "",
        None,
        &vs(
            &format!("{:.0}%", first.cpu_share * 100.0),
            r.cpu_share,
            first.cpu_share,
        ),
    );
}

/// The ratio table: each number of runners, the cost of a decision at each level against the
/// first.
fn summary(results: &[StageResult], levels: &[u64]) {
    if levels.len() < 2 {
        return;
    }
    note("-- cost of a decision (dispatcher CPU per job) against the first stored-builds level");
    let mut by_runners: BTreeMap<usize, HashMap<u64, f64>> = BTreeMap::new();
    for r in results {
        by_runners
            .entry(r.runners)
            .or_default()
            .insert(r.builds_level, r.cpu_ms_per_job);
    }
    for (n, per_level) in by_runners {
        let base = per_level.get(&levels[0]).copied().unwrap_or(0.0);
        let cells: Vec<String> = levels
            .iter()
            .filter_map(|l| per_level.get(l).map(|v| (l, v)))
            .map(|(l, v)| format!("{l}: {v:.3} ms ({:.2}x)", ratio(*v, base)))
            .collect();
        note(format!("decision ratio, {n} runners: {}", cells.join(", ")));
    }
}

//! `kiln-bench failover --postgres`: losing one of several dispatchers on PostgreSQL.
//!
//! A throwaway PostgreSQL cluster (`kiln-pgtest`, durability defaults: fsync on), three
//! `kiln serve --database postgres://...` children on loopback ports, and `--runners` `kiln
//! runner` children (one slot each) given all three URLs (`--dispatcher a,b,c`, each list
//! starting at another dispatcher, so the runners spread). Each round submits one build per
//! runner (a step that writes a timestamped, numbered line every 50 ms until the benchmark
//! writes a flag file), waits until every job runs and its output reaches a follower, and then
//! takes one dispatcher away, a different one each round:
//!
//! - **SIGKILL** (`--rounds`): the dispatcher process dies; its runners' streams break at once.
//!   It is started again on its port after the round.
//! - **SIGSTOP** (`--stop-rounds`, "the dispatcher's host vanishes"): the process is frozen, its
//!   sockets stay open, nothing answers. The runners can only notice by silence (the runner
//!   leaves a stream whose dispatcher sent nothing for the lease its Welcome gave, heartbeat
//!   interval x missed heartbeats; HTTP/2 keepalive, 10 s + 20 s, bounds a connection that
//!   stops answering). SIGCONT at the end of the round.
//!
//! Measured per runner that was attached to the lost dispatcher, from the signal:
//!
//! - **re-attached holding its attempt**: the store says so (polled every 10 ms on the
//!   benchmark's own database connection): the runner's `runners.dispatcher` is a surviving
//!   dispatcher, and its job's current attempt, still running, is owned (`attempts.owner`) by
//!   that same dispatcher, which writes both when the runner's Hello carried the attempt.
//! - **output resumed**: a follower (`StreamLogs`, follow, through a surviving dispatcher)
//!   receives the first line the step wrote after the signal (lines carry the wall clock).
//!
//! After the round every build must have passed; a job whose runner lived must have finished
//! as attempt 1 with no lost attempt; each job's log (read again through a survivor) must hold,
//! per attempt, the step's lines from the first, each once and in order, the last attempt's up
//! to the line written after the flag, and the follower must have seen the same. A SIGKILL
//! round that breaks any of this fails the benchmark (exit 1); in a SIGSTOP round, jobs run
//! again (their attempt declared lost before the runner came back) are counted and reported.
//!
//! Baseline, in the same run: one dispatcher on its own database of the same cluster, the same
//! runners and jobs, SIGKILLed and started again at once on its port (what a single dispatcher
//! offers: its runners wait for the restart).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use super::{FailoverArgs, Serve};
use crate::BenchError;
use crate::util::{
    Proc, Repo, Scratch, bench_exe, connect, fail, figure, header, ms, note, now_ns, percentile,
    pipeline, ready, sh_quote, sorted, spawn_runner, submit, tail, wait_exit, wait_idle, wrong,
};
use kiln::proto::{self, JobState, OutputStream, build_service_client::BuildServiceClient};

/// The goal: a lost dispatcher's runners re-attached elsewhere, and their output flowing again.
const GOAL: Duration = Duration::from_secs(3);

/// Lines per second each job's step writes (low: a handful of runner sessions at low rates).
const RATE: u32 = 20;

/// Bytes per line, newline included.
const LINE_BYTES: usize = 64;

/// How long to wait for re-attachment after a SIGKILL (and for the farm to settle).
const PATIENCE: Duration = Duration::from_secs(60);

/// The steps run on for at least this long after the signal.
const TAIL: Duration = Duration::from_secs(3);

/// How long to wait for re-attachment after a SIGSTOP before giving up on the round.
const STOP_PATIENCE: Duration = Duration::from_secs(120);

/// What was done to the dispatcher.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// SIGKILL, then started again on its port after the round.
    Kill,
    /// SIGSTOP, SIGCONT after the round.
    Stop,
    /// SIGKILL of the only dispatcher, started again at once (the baseline).
    Restart,
}

impl Fault {
    fn patience(self) -> Duration {
        match self {
            Fault::Stop => STOP_PATIENCE,
            Fault::Kill | Fault::Restart => PATIENCE,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The farm
// ---------------------------------------------------------------------------------------------

/// Dispatchers on one database and the runners given all of their URLs.
struct Farm {
    dir: PathBuf,
    /// `--database URL`.
    database: String,
    /// `None` while killed.
    serves: Vec<Option<Serve>>,
    /// Each dispatcher's `ADDR` (it is started again on the same one).
    addrs: Vec<String>,
    runners: Vec<(String, Proc)>,
    /// The benchmark's own connection (reads only).
    db: tokio_postgres::Client,
    repo: Repo,
}

impl Farm {
    async fn start(
        dir: &Path,
        database: &str,
        dispatchers: usize,
        runners: u32,
        prefix: &str,
    ) -> Result<Farm, BenchError> {
        std::fs::create_dir_all(dir).map_err(fail)?;
        let (db, conn) = tokio_postgres::connect(database, tokio_postgres::NoTls)
            .await
            .map_err(|e| fail(format!("connecting to {database}: {e}")))?;
        // Ends when the client is dropped.
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let mut serves = Vec::new();
        let mut addrs = Vec::new();
        for i in 0..dispatchers {
            let d = dir.join(format!("d{i}"));
            std::fs::create_dir_all(&d).map_err(fail)?;
            let serve = Serve::start(&d, "127.0.0.1:0", &["--database", database]).await?;
            ready(&serve.url, &d.join("serve.log")).await?;
            addrs.push(serve.addr.clone());
            serves.push(Some(serve));
        }
        let mut farm = Farm {
            dir: dir.to_path_buf(),
            database: database.to_string(),
            serves,
            addrs,
            runners: Vec::new(),
            db,
            repo: Repo::init(&dir.join("repo"))?,
        };
        for i in 0..runners as usize {
            let name = format!("{prefix}{i}");
            let proc = spawn_runner(
                &farm.urls_from(i),
                &name,
                &dir.join(format!("work-{name}")),
                &farm.runner_log(&name),
                &["--slots", "1"],
            )?;
            farm.runners.push((name, proc));
        }
        let names = farm.names();
        let first = farm.url(0);
        wait_idle(&first, &names, PATIENCE, &farm.runner_log(&names[0])).await?;
        Ok(farm)
    }

    fn runner_log(&self, name: &str) -> PathBuf {
        self.dir.join(format!("runner-{name}.log"))
    }

    fn names(&self) -> Vec<String> {
        self.runners.iter().map(|(n, _)| n.clone()).collect()
    }

    fn url(&self, i: usize) -> String {
        format!("http://{}", self.addrs[i])
    }

    /// Every dispatcher's URL, starting at dispatcher `i mod n`.
    fn urls_from(&self, i: usize) -> String {
        let n = self.addrs.len();
        (0..n)
            .map(|k| self.url((i + k) % n))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The URLs of the dispatchers that are up but `not`, then `not`'s (for followers that
    /// reconnect: the baseline's only dispatcher comes back).
    fn follow_urls(&self, not: usize) -> Vec<String> {
        let mut urls: Vec<String> = (0..self.addrs.len())
            .filter(|&i| i != not)
            .map(|i| self.url(i))
            .collect();
        urls.push(self.url(not));
        urls
    }

    /// A `BuildService` client of a dispatcher that is up, other than `not` when there is one.
    async fn client(&self, not: usize) -> Result<BuildServiceClient<Channel>, BenchError> {
        let i = (0..self.serves.len())
            .find(|&i| i != not && self.serves[i].is_some())
            .unwrap_or(not);
        Ok(BuildServiceClient::new(connect(&self.url(i)).await?))
    }

    /// Dispatcher `i`'s id in the store (its row in `dispatchers` is named `HOST:PID`).
    async fn dispatcher_id(&self, i: usize) -> Result<i64, BenchError> {
        let pid = match &self.serves[i] {
            Some(s) => s.proc.pid,
            None => return Err(fail(format!("dispatcher {i} is down"))),
        };
        let deadline = Instant::now() + PATIENCE;
        loop {
            let rows = self
                .db
                .query(
                    "SELECT id FROM dispatchers WHERE name LIKE '%:' || $1 ORDER BY id DESC",
                    &[&pid.to_string()],
                )
                .await
                .map_err(|e| fail(format!("reading dispatchers: {e}")))?;
            if let Some(r) = rows.first() {
                return Ok(r.get(0));
            }
            if Instant::now() > deadline {
                return Err(fail(format!(
                    "dispatcher {i} (pid {pid}) has no row in dispatchers"
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Which dispatcher (index) holds each runner's stream, by the store; waits until every
    /// runner is held by one that is up.
    async fn placement(&self) -> Result<HashMap<String, usize>, BenchError> {
        let mut ids = HashMap::new();
        for i in 0..self.serves.len() {
            if self.serves[i].is_some() {
                ids.insert(self.dispatcher_id(i).await?, i);
            }
        }
        let names = self.names();
        let deadline = Instant::now() + PATIENCE;
        loop {
            let rows = self
                .db
                .query(
                    "SELECT name, dispatcher FROM runners WHERE name = ANY($1)",
                    &[&names],
                )
                .await
                .map_err(|e| fail(format!("reading runners: {e}")))?;
            let placed: HashMap<String, usize> = rows
                .iter()
                .filter_map(|r| {
                    let d: Option<i64> = r.get(1);
                    Some((r.get(0), *ids.get(&d?)?))
                })
                .collect();
            if placed.len() == names.len() {
                return Ok(placed);
            }
            if Instant::now() > deadline {
                return Err(fail(format!(
                    "only {} of {} runners attached to a live dispatcher within {PATIENCE:?}",
                    placed.len(),
                    names.len()
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Starts dispatcher `i` again on its port.
    async fn restart(&mut self, i: usize) -> Result<(), BenchError> {
        let d = self.dir.join(format!("d{i}"));
        let serve = Serve::start(&d, &self.addrs[i], &["--database", &self.database]).await?;
        ready(&serve.url, &d.join("serve.log")).await?;
        self.serves[i] = Some(serve);
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Followers
// ---------------------------------------------------------------------------------------------

/// A stdout line of a step, as a follower received it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Line {
    attempt: u64,
    /// The wall clock when the step wrote it (ns).
    written_ns: u128,
    seq: u64,
}

/// What a follower saw.
#[derive(Default)]
struct Seen {
    /// Lines with their arrival.
    lines: Vec<(Instant, Line)>,
    /// Lines that did not parse.
    bad: Vec<String>,
    /// The job's final state arrived.
    ended: bool,
    /// Times the follower connected again.
    reconnects: u32,
}

/// Splits complete lines off a stdout buffer.
fn take_lines(attempt: u64, buf: &mut Vec<u8>, out: &mut Vec<Line>, bad: &mut Vec<String>) {
    while let Some(nl) = buf.iter().position(|&b| b == b'\n') {
        let raw: Vec<u8> = buf.drain(..=nl).collect();
        let text = String::from_utf8_lossy(&raw[..raw.len() - 1]).to_string();
        let mut words = text.split(' ');
        let parsed = match (words.next(), words.next()) {
            (Some(t), Some(s)) => t.parse::<u128>().ok().zip(s.parse::<u64>().ok()),
            _ => None,
        };
        match parsed {
            Some((written_ns, seq)) => out.push(Line {
                attempt,
                written_ns,
                seq,
            }),
            None => bad.push(text),
        }
    }
}

/// Follows job `job`'s log through the first of `urls` that answers, again from where it was
/// whenever the stream breaks, until the job ends or `stop`.
async fn follow(urls: Vec<String>, job: u64, seen: Arc<Mutex<Seen>>, stop: CancellationToken) {
    let mut offset = 0;
    let mut partial: HashMap<u64, Vec<u8>> = HashMap::new();
    let mut k = 0;
    let mut first = true;
    loop {
        let url = &urls[k % urls.len()];
        k += 1;
        if !first {
            seen.lock().unwrap_or_else(|p| p.into_inner()).reconnects += 1;
        }
        first = false;
        if let Ok(ch) = connect(url).await {
            let mut client = BuildServiceClient::new(ch);
            let req = proto::StreamLogsRequest {
                job_id: job,
                build_id: 0,
                offset,
                follow: true,
            };
            if let Ok(r) = client.stream_logs(req).await {
                let mut stream = r.into_inner();
                loop {
                    let m = tokio::select! {
                        m = stream.message() => m,
                        _ = stop.cancelled() => return,
                    };
                    let Ok(Some(c)) = m else { break };
                    let at = Instant::now();
                    offset = offset.max(c.next_offset);
                    let mut lines = Vec::new();
                    let mut bad = Vec::new();
                    if c.stream == OutputStream::Stdout as i32 && !c.data.is_empty() {
                        let buf = partial.entry(c.attempt_id).or_default();
                        buf.extend_from_slice(&c.data);
                        take_lines(c.attempt_id, buf, &mut lines, &mut bad);
                    }
                    let mut s = seen.lock().unwrap_or_else(|p| p.into_inner());
                    s.lines.extend(lines.into_iter().map(|l| (at, l)));
                    s.bad.extend(bad);
                    if c.final_state != 0 {
                        s.ended = true;
                        return;
                    }
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(20)) => {}
            _ = stop.cancelled() => return,
        }
    }
}

/// Reads job `job`'s whole stored log (stdout lines by attempt, in order).
async fn stored_lines(
    client: &mut BuildServiceClient<Channel>,
    job: u64,
) -> Result<(Vec<Line>, Vec<String>), BenchError> {
    let mut stream = client
        .stream_logs(proto::StreamLogsRequest {
            job_id: job,
            build_id: 0,
            offset: 0,
            follow: false,
        })
        .await
        .map_err(|s| fail(format!("StreamLogs {job}: {}", s.message())))?
        .into_inner();
    let mut partial: HashMap<u64, Vec<u8>> = HashMap::new();
    let (mut lines, mut bad) = (Vec::new(), Vec::new());
    while let Some(c) = stream
        .message()
        .await
        .map_err(|s| fail(format!("StreamLogs {job}: {}", s.message())))?
    {
        if c.stream == OutputStream::Stdout as i32 && !c.data.is_empty() {
            let buf = partial.entry(c.attempt_id).or_default();
            buf.extend_from_slice(&c.data);
            take_lines(c.attempt_id, buf, &mut lines, &mut bad);
        }
    }
    for (a, rest) in partial {
        if !rest.is_empty() {
            bad.push(format!(
                "attempt {a}: unterminated {:?}",
                String::from_utf8_lossy(&rest)
            ));
        }
    }
    Ok((lines, bad))
}

// ---------------------------------------------------------------------------------------------
// A round
// ---------------------------------------------------------------------------------------------

/// One job of a round.
struct Job {
    build: u64,
    job: u64,
    attempt: u64,
    runner: String,
    /// Its runner was attached to the lost dispatcher.
    affected: bool,
    seen: Arc<Mutex<Seen>>,
}

/// One runner of the lost dispatcher, ms from the signal.
#[derive(Debug, Clone, Copy, Default)]
struct Mover {
    /// Attached to a surviving dispatcher (whatever it held).
    moved: Option<f64>,
    /// ... holding its job's attempt (the store: the runner's dispatcher owns the attempt).
    held: Option<f64>,
    /// Its attempt stopped being current or running before that.
    lost_first: bool,
    /// The first line its step wrote after the signal reached the follower.
    resumed: Option<f64>,
}

/// What a round came to.
struct Round {
    fault: Fault,
    victim: usize,
    movers: Vec<Mover>,
    /// The same for the jobs whose runner was elsewhere (a control: should be immediate).
    others: Vec<f64>,
    jobs: usize,
    passed: usize,
    /// Jobs whose runner survived that finished as attempt 1 with no lost attempt.
    first_attempt: usize,
    /// Attempts declared lost, over all jobs.
    lost_attempts: u64,
    /// Logs with each line once, in order, complete, as the follower saw them too.
    complete: usize,
    problems: Vec<String>,
    /// Follower reconnects (the baseline's follower reconnects to the restarted dispatcher).
    reconnects: u32,
}

/// The current attempt of each of `attempts`: (runner's dispatcher, owner, attempt state,
/// whether it is its job's current attempt).
async fn attempt_rows(
    db: &tokio_postgres::Client,
    attempts: &[i64],
) -> Result<HashMap<i64, (Option<i64>, Option<i64>, String, bool)>, BenchError> {
    let rows = db
        .query(
            "SELECT a.id, r.dispatcher, a.owner, a.state, \
                    (j.current_attempt = a.id AND j.state IN ('assigned', 'running')) \
             FROM attempts a JOIN runners r ON r.id = a.runner_id JOIN jobs j ON j.id = a.job_id \
             WHERE a.id = ANY($1)",
            &[&attempts],
        )
        .await
        .map_err(|e| fail(format!("reading attempts: {e}")))?;
    Ok(rows
        .iter()
        .map(|r| {
            let current: Option<bool> = r.get(4);
            (
                r.get(0),
                (r.get(1), r.get(2), r.get(3), current.unwrap_or(false)),
            )
        })
        .collect())
}

/// Polls the store every 10 ms until each of `movers` (runner attempt ids) is re-attached to a
/// dispatcher other than `victim` holding its attempt, or its attempt is gone, or `limit`.
async fn watch_reattach(
    db: &tokio_postgres::Client,
    victim: i64,
    attempts: &[i64],
    signalled: Instant,
    limit: Duration,
) -> Result<Vec<Mover>, BenchError> {
    let mut out = vec![Mover::default(); attempts.len()];
    let deadline = signalled + limit;
    loop {
        let rows = attempt_rows(db, attempts).await?;
        let at = ms(signalled.elapsed());
        for (k, a) in attempts.iter().enumerate() {
            let m = &mut out[k];
            let Some((dispatcher, owner, state, current)) = rows.get(a) else {
                continue;
            };
            let elsewhere = dispatcher.is_some_and(|d| d != victim);
            if elsewhere && m.moved.is_none() {
                m.moved = Some(at);
            }
            if m.held.is_some() || m.lost_first {
                continue;
            }
            if !current || state != "running" {
                m.lost_first = true;
            } else if elsewhere && owner == dispatcher {
                m.held = Some(at);
            }
        }
        // A runner whose attempt was lost is still watched until it comes back.
        let settled = |m: &Mover| m.moved.is_some() && (m.held.is_some() || m.lost_first);
        if out.iter().all(settled) || Instant::now() > deadline {
            return Ok(out);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// When the first line of `attempt` written after `after_ns` reached the follower, ms after
/// `signalled`; waits for it at most until `deadline`.
async fn resumed(
    seen: &Mutex<Seen>,
    attempt: u64,
    after_ns: u128,
    signalled: Instant,
    deadline: Instant,
) -> Option<f64> {
    loop {
        {
            let s = seen.lock().unwrap_or_else(|p| p.into_inner());
            let after = |l: &Line| l.attempt == attempt && l.written_ns > after_ns;
            if let Some((at, _)) = s.lines.iter().find(|(_, l)| after(l)) {
                return Some(ms(at.saturating_duration_since(signalled)));
            }
            if s.ended {
                return None;
            }
        }
        if Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Runs one round: `fault` to dispatcher `victim`.
async fn round(
    farm: &mut Farm,
    n: u32,
    fault: Fault,
    victim: usize,
    placed: &HashMap<String, usize>,
) -> Result<Round, BenchError> {
    let r = n;
    let flag = farm.dir.join(format!("stop-{r}"));
    let run = [
        sh_quote(&bench_exe()?.to_string_lossy()),
        "gen".into(),
        "lines".into(),
        format!("--rate={RATE}"),
        format!("--line-bytes={LINE_BYTES}"),
        "--duration=600s".into(),
        format!("--until={}", sh_quote(&flag.to_string_lossy())),
    ]
    .join(" ");
    let jobs_wanted = farm.runners.len();
    let mut client = farm.client(victim).await?;
    let mut builds = Vec::new();
    for j in 0..jobs_wanted {
        let commit = farm.repo.commit(
            &[
                (".kiln.yml", &pipeline("lines", &run)),
                ("n.txt", &format!("{r} {j}")),
            ],
            &format!("round {r} job {j}"),
        )?;
        builds.push(submit(&mut client, &farm.repo, &commit).await?.id);
    }
    // Every job running, each on a runner.
    let deadline = Instant::now() + PATIENCE;
    let mut jobs: Vec<Job> = Vec::new();
    while jobs.len() < builds.len() {
        jobs.clear();
        for &b in &builds {
            let build = client
                .get_build(proto::GetBuildRequest { build_id: b })
                .await
                .map_err(|s| fail(format!("GetBuild {b}: {}", s.message())))?
                .into_inner();
            if let Some(j) = build.jobs.first()
                && j.state == JobState::Running as i32
                && j.attempt_id != 0
                && !j.runner.is_empty()
            {
                jobs.push(Job {
                    build: b,
                    job: j.id,
                    attempt: j.attempt_id,
                    runner: j.runner.clone(),
                    affected: placed.get(&j.runner) == Some(&victim),
                    seen: Arc::default(),
                });
            }
        }
        if jobs.len() < builds.len() {
            if Instant::now() > deadline {
                return Err(fail(format!(
                    "round {r}: only {} of {} jobs running within {PATIENCE:?}",
                    jobs.len(),
                    builds.len()
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // Followers through the survivors; output flowing on every job.
    let stop = CancellationToken::new();
    let _stop_guard = stop.clone().drop_guard();
    for j in &jobs {
        tokio::spawn(follow(
            farm.follow_urls(victim),
            j.job,
            j.seen.clone(),
            stop.clone(),
        ));
    }
    let deadline = Instant::now() + PATIENCE;
    loop {
        let flowing = jobs
            .iter()
            .filter(|j| j.seen.lock().unwrap_or_else(|p| p.into_inner()).lines.len() >= 3)
            .count();
        if flowing == jobs.len() {
            break;
        }
        if Instant::now() > deadline {
            return Err(fail(format!(
                "round {r}: output reached the followers of only {flowing} of {} jobs",
                jobs.len()
            )));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let victim_id = farm.dispatcher_id(victim).await?;
    let movers: Vec<&Job> = jobs.iter().filter(|j| j.affected).collect();
    let attempts: Vec<i64> = movers
        .iter()
        .map(|j| i64::try_from(j.attempt).unwrap_or(i64::MAX))
        .collect();
    let pid = match &farm.serves[victim] {
        Some(s) => s.proc.pid,
        None => return Err(fail(format!("dispatcher {victim} is down"))),
    };
    let signal = if fault == Fault::Stop {
        Signal::SIGSTOP
    } else {
        Signal::SIGKILL
    };
    let signalled_ns = now_ns();
    let signalled = Instant::now();
    kill(Pid::from_raw(pid), signal)
        .map_err(|e| fail(format!("cannot signal dispatcher {victim}: {e}")))?;
    if fault != Fault::Stop
        && let Some(mut s) = farm.serves[victim].take()
    {
        wait_exit(&mut s.proc, Duration::from_secs(10)).await?;
    }
    let limit = fault.patience();
    let mut movers_out = if fault == Fault::Restart {
        // The only dispatcher: started again at once, while the store is watched.
        let dir = farm.dir.join(format!("d{victim}"));
        let listen = farm.addrs[victim].clone();
        let database = farm.database.clone();
        let extra = ["--database", database.as_str()];
        let (serve, watched) = tokio::join!(
            Serve::start(&dir, &listen, &extra),
            watch_reattach(&farm.db, victim_id, &attempts, signalled, limit)
        );
        farm.serves[victim] = Some(serve?);
        watched?
    } else {
        watch_reattach(&farm.db, victim_id, &attempts, signalled, limit).await?
    };
    let deadline = signalled + limit;
    for (m, j) in movers_out.iter_mut().zip(&movers) {
        m.resumed = resumed(&j.seen, j.attempt, signalled_ns, signalled, deadline).await;
    }
    let mut others = Vec::new();
    for j in jobs.iter().filter(|j| !j.affected) {
        if let Some(t) = resumed(&j.seen, j.attempt, signalled_ns, signalled, deadline).await {
            others.push(t);
        }
    }
    if fault == Fault::Stop {
        kill(Pid::from_raw(pid), Signal::SIGCONT)
            .map_err(|e| fail(format!("cannot continue dispatcher {victim}: {e}")))?;
    }

    // The end: the flag (no sooner than TAIL after the signal, so every log holds output from
    // both sides of it), every build final, then the checks through a survivor.
    tokio::time::sleep_until((signalled + TAIL).into()).await;
    std::fs::write(&flag, b"").map_err(fail)?;
    let flag_ns = now_ns();
    let mut client = farm.client(victim).await?;
    let deadline = Instant::now() + PATIENCE + limit;
    let mut finals: HashMap<u64, proto::Build> = HashMap::new();
    while finals.len() < jobs.len() {
        for j in &jobs {
            if finals.contains_key(&j.build) {
                continue;
            }
            if let Ok(b) = client
                .get_build(proto::GetBuildRequest { build_id: j.build })
                .await
                && crate::util::is_final(b.get_ref().state)
            {
                finals.insert(j.build, b.into_inner());
            }
        }
        if finals.len() < jobs.len() {
            if Instant::now() > deadline {
                return Err(wrong(format!(
                    "round {r}: only {} of {} builds finished within {:?} of the flag",
                    finals.len(),
                    jobs.len(),
                    PATIENCE + limit
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let mut out = Round {
        fault,
        victim,
        movers: movers_out,
        others,
        jobs: jobs.len(),
        passed: 0,
        first_attempt: 0,
        lost_attempts: 0,
        complete: 0,
        problems: Vec::new(),
        reconnects: 0,
    };
    // The followers end with their jobs; give them the time their last lines take.
    let deadline = Instant::now() + PATIENCE;
    while Instant::now() < deadline
        && !jobs
            .iter()
            .all(|j| j.seen.lock().unwrap_or_else(|p| p.into_inner()).ended)
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for j in &jobs {
        let b = &finals[&j.build];
        let Some(job) = b.jobs.first() else {
            out.problems.push(format!("build {}: no job", j.build));
            continue;
        };
        if b.state == JobState::Passed as i32 && job.state == JobState::Passed as i32 {
            out.passed += 1;
        } else {
            out.problems.push(format!(
                "build {} ended {} ({})",
                j.build,
                kiln::convert::state_name(b.state),
                job.message
            ));
        }
        out.lost_attempts += u64::from(job.lost_attempts);
        let first = job.attempts == 1 && job.lost_attempts == 0 && job.attempt_id == j.attempt;
        if first {
            out.first_attempt += 1;
        } else if fault != Fault::Stop {
            out.problems.push(format!(
                "build {} (runner {}, {}): {} attempts, {} lost, last attempt {} (was {})",
                j.build,
                j.runner,
                if j.affected { "moved" } else { "not moved" },
                job.attempts,
                job.lost_attempts,
                job.attempt_id,
                j.attempt
            ));
        }
        let (stored, bad) = stored_lines(&mut client, j.job).await?;
        let mut problems = Vec::new();
        if !bad.is_empty() {
            problems.push(format!("lines that do not parse: {bad:?}"));
        }
        // Per attempt, in order of appearance: 0, 1, 2, ... with no gap and no repeat.
        let mut order: Vec<u64> = Vec::new();
        let mut per: HashMap<u64, Vec<&Line>> = HashMap::new();
        for l in &stored {
            if !per.contains_key(&l.attempt) {
                order.push(l.attempt);
            }
            per.entry(l.attempt).or_default().push(l);
        }
        for a in &order {
            let ls = &per[a];
            if let Some((i, l)) = ls.iter().enumerate().find(|(i, l)| l.seq != *i as u64) {
                problems.push(format!(
                    "attempt {a}: line {i} of the log is number {} ({} lines)",
                    l.seq,
                    ls.len()
                ));
            }
        }
        match order.last() {
            Some(&a) if a == job.attempt_id => {
                let last = per[&a].last().map_or(0, |l| l.written_ns);
                if last < flag_ns.saturating_sub(1_000_000_000) {
                    problems.push(format!(
                        "attempt {a}: the log ends with a line written before the flag (incomplete)"
                    ));
                }
            }
            other => problems.push(format!(
                "the log's last attempt is {other:?}, the job's {}",
                job.attempt_id
            )),
        }
        let s = j.seen.lock().unwrap_or_else(|p| p.into_inner());
        out.reconnects += s.reconnects;
        let followed: Vec<Line> = s.lines.iter().map(|(_, l)| *l).collect();
        if followed != stored {
            problems.push(format!(
                "the follower saw {} lines, the stored log holds {}{}",
                followed.len(),
                stored.len(),
                if s.bad.is_empty() {
                    String::new()
                } else {
                    format!(" (unparsed: {:?})", s.bad)
                }
            ));
        }
        if problems.is_empty() {
            out.complete += 1;
        } else {
            out.problems.push(format!(
                "build {} job {}: {}",
                j.build,
                j.job,
                problems.join("; ")
            ));
        }
    }
    drop(client);
    if fault == Fault::Kill {
        farm.restart(victim).await?;
    }
    Ok(out)
}

/// The dispatcher to lose next: from `preferred` on, the first that is up, holds at least one
/// runner, and was not lost last time (when another one qualifies).
fn pick_victim(
    farm: &Farm,
    placed: &HashMap<String, usize>,
    preferred: usize,
    last: Option<usize>,
) -> usize {
    let n = farm.serves.len();
    let holds = |i: usize| placed.values().any(|&d| d == i);
    (0..n)
        .map(|k| (preferred + k) % n)
        .find(|&i| farm.serves[i].is_some() && holds(i) && Some(i) != last)
        .or_else(|| (0..n).find(|&i| farm.serves[i].is_some() && holds(i)))
        .unwrap_or(preferred % n)
}

// ---------------------------------------------------------------------------------------------
// Report
// ---------------------------------------------------------------------------------------------

fn opt_secs(v: Option<f64>) -> String {
    v.map_or("never".into(), |v| format!("{:.2}", v / 1000.0))
}

/// Prints the p50, p99 and max of `values` (ms) against the goal and `base` (a p50).
fn figures(label: &str, values: &[f64], missing: usize, base: Option<f64>) {
    let v = sorted(values);
    let goal = ms(GOAL);
    for (p, name) in [(50.0, "p50"), (99.0, "p99"), (100.0, "max")] {
        let x = percentile(&v, p);
        let baseline = match base {
            Some(b) if b > 0.0 => format!("baseline p50 {:.2} s, ratio {:.2}x", b / 1000.0, x / b),
            _ => String::new(),
        };
        let value = if v.is_empty() {
            "none".to_string()
        } else {
            format!("{:.2} s", x / 1000.0)
        };
        figure(
            &format!("{label}, {name}"),
            value,
            "goal <= 3 s",
            Some(!v.is_empty() && missing == 0 && x <= goal),
            &baseline,
        );
    }
    if missing > 0 {
        note(format!(
            "{label}: {missing} of {} did not happen within the round's patience",
            values.len() + missing
        ));
    }
}

/// Times of `f` over every mover of `rounds`, and how many are missing.
fn times(rounds: &[Round], f: impl Fn(&Mover) -> Option<f64>) -> (Vec<f64>, usize) {
    let all: Vec<Option<f64>> = rounds
        .iter()
        .flat_map(|r| r.movers.iter().map(&f))
        .collect();
    let missing = all.iter().filter(|v| v.is_none()).count();
    (all.into_iter().flatten().collect(), missing)
}

/// Jobs, passed, finished as attempt 1, complete logs, and attempts declared lost.
fn verdicts(rounds: &[Round]) -> (usize, usize, usize, usize, u64) {
    let sum = |f: fn(&Round) -> usize| rounds.iter().map(f).sum::<usize>();
    (
        sum(|r| r.jobs),
        sum(|r| r.passed),
        sum(|r| r.first_attempt),
        sum(|r| r.complete),
        rounds.iter().map(|r| r.lost_attempts).sum(),
    )
}

fn report(label: &str, rounds: &[Round], base: Option<(f64, f64)>) {
    if rounds.is_empty() {
        return;
    }
    let moved: usize = rounds.iter().map(|r| r.movers.len()).sum();
    note(format!(
        "{label}: {} rounds, {moved} runners were attached to the lost dispatcher:",
        rounds.len()
    ));
    let (held, held_missing) = times(rounds, |m| m.held);
    let (resumed, resumed_missing) = times(rounds, |m| m.resumed);
    let what = match rounds[0].fault {
        Fault::Stop => "stop",
        _ => "kill",
    };
    if rounds[0].fault == Fault::Stop {
        let (moved, moved_missing) = times(rounds, |m| m.moved);
        figures(
            &format!("{what} -> re-attached (holding or not)"),
            &moved,
            moved_missing,
            base.map(|b| b.0),
        );
    }
    figures(
        &format!("{what} -> re-attached holding attempt"),
        &held,
        held_missing,
        base.map(|b| b.0),
    );
    figures(
        &format!("{what} -> output resumed at follower"),
        &resumed,
        resumed_missing,
        base.map(|b| b.1),
    );
    let others: Vec<f64> = sorted(
        &rounds
            .iter()
            .flat_map(|r| r.others.clone())
            .collect::<Vec<_>>(),
    );
    if !others.is_empty() {
        figure(
            "other jobs' output after it, max",
            format!("{:.2} s", percentile(&others, 100.0) / 1000.0),
            "",
            None,
            &format!(
                "p50 {:.2} s ({} jobs whose runner was elsewhere: a control)",
                percentile(&others, 50.0) / 1000.0,
                others.len()
            ),
        );
    }
    let (jobs, passed, first, complete, lost) = verdicts(rounds);
    let lost_first: usize = rounds
        .iter()
        .map(|r| r.movers.iter().filter(|m| m.lost_first).count())
        .sum();
    figure(
        "jobs passed / attempt 1",
        format!("{passed}/{jobs} / {first}/{jobs}"),
        "all",
        Some(passed == jobs && first == jobs),
        &format!(
            "attempts declared lost: {lost}; attempts gone before their runner came back: {lost_first}"
        ),
    );
    figure(
        "logs complete, once, in order",
        format!("{complete}/{jobs}"),
        "all",
        Some(complete == jobs),
        "stored log through a survivor = what the follower saw",
    );
    for r in rounds {
        note(format!(
            "round: dispatcher {} {}, {} runners moved: moved / holding attempt / output resumed (s): {}{}",
            r.victim,
            match r.fault {
                Fault::Kill => "SIGKILLed (started again after the round)",
                Fault::Stop => "SIGSTOPped (SIGCONT after the round)",
                Fault::Restart => "SIGKILLed and started again at once",
            },
            r.movers.len(),
            r.movers
                .iter()
                .map(|m| format!(
                    "{} / {} / {}{}",
                    opt_secs(m.moved),
                    opt_secs(m.held),
                    opt_secs(m.resumed),
                    if m.lost_first {
                        " (attempt lost first)"
                    } else {
                        ""
                    }
                ))
                .collect::<Vec<_>>()
                .join(", "),
            if r.reconnects > 0 {
                format!("; follower reconnects {}", r.reconnects)
            } else {
                String::new()
            }
        ));
    }
}

fn p50s(rounds: &[Round]) -> Option<(f64, f64)> {
    let (held, _) = times(rounds, |m| m.held);
    let (resumed, _) = times(rounds, |m| m.resumed);
    if held.is_empty() || resumed.is_empty() {
        return None;
    }
    Some((
        percentile(&sorted(&held), 50.0),
        percentile(&sorted(&resumed), 50.0),
    ))
}

// ---------------------------------------------------------------------------------------------
// The benchmark
// ---------------------------------------------------------------------------------------------

/// Runs `kiln-bench failover --postgres`.
pub(super) async fn run(args: &FailoverArgs) -> Result<(), BenchError> {
    let (rounds, stops, runners) = (args.rounds(), args.stop_rounds(), args.pg_runners());
    header(
        "failover --postgres",
        &format!(
            "3 dispatchers on one PostgreSQL (fsync on), {runners} runners (1 slot each) given all three URLs, one job each; a dispatcher SIGKILLed ({rounds} rounds) and SIGSTOPped ({stops} rounds) mid-build; baseline: the only dispatcher SIGKILLed and started again at once ({rounds} rounds)"
        ),
    );
    let tmp = Scratch::new()?;
    let cluster = tokio::task::spawn_blocking(kiln_pgtest::PgCluster::start_durable)
        .await
        .map_err(fail)?
        .map_err(|e| fail(format!("starting PostgreSQL: {e}")))?;
    let database = |c: &kiln_pgtest::PgCluster| {
        c.database()
            .map_err(|e| fail(format!("creating a database: {e}")))
    };

    let mut kills = Vec::new();
    let mut stopped = Vec::new();
    {
        let url = database(&cluster)?;
        let mut farm = Farm::start(&tmp.path().join("three"), &url, 3, runners, "r").await?;
        let mut last = None;
        for n in 0..rounds + stops {
            let fault = if n < rounds { Fault::Kill } else { Fault::Stop };
            let placed = farm.placement().await?;
            let victim = pick_victim(&farm, &placed, n as usize % 3, last);
            last = Some(victim);
            let r = round(&mut farm, n, fault, victim, &placed)
                .await
                .map_err(|e| with_logs(e, &farm))?;
            if fault == Fault::Kill {
                kills.push(r);
            } else {
                stopped.push(r);
            }
        }
        check_serialization(&farm);
    }
    let mut base = Vec::new();
    {
        let url = database(&cluster)?;
        let mut farm = Farm::start(&tmp.path().join("one"), &url, 1, runners, "b").await?;
        for n in 0..rounds {
            let placed = farm.placement().await?;
            let r = round(&mut farm, n, Fault::Restart, 0, &placed)
                .await
                .map_err(|e| with_logs(e, &farm))?;
            base.push(r);
        }
        check_serialization(&farm);
    }
    let b = p50s(&base);
    report("SIGKILL of one of three", &kills, b);
    report(
        "SIGSTOP of one of three (its sockets stay open)",
        &stopped,
        b,
    );
    report(
        "baseline: SIGKILL of the only dispatcher, restarted at once",
        &base,
        None,
    );
    note(
        "re-attached: the store shows the runner held by a surviving dispatcher that owns its job's running attempt (polled every 10 ms); output resumed: a follower through a survivor received the first line the step wrote after the signal (20 lines/s, so up to 50 ms of the figure is the step's own pace)",
    );
    let problems: Vec<&String> = kills
        .iter()
        .chain(&stopped)
        .chain(&base)
        .flat_map(|r| &r.problems)
        .collect();
    if !problems.is_empty() {
        for p in &problems {
            note(format!("WRONG: {p}"));
        }
        // A SIGSTOP round's jobs may run again (reported above); the rest is a failure.
        let fatal = kills.iter().chain(&base).any(|r| !r.problems.is_empty())
            || stopped
                .iter()
                .any(|r| r.passed < r.jobs || r.complete < r.jobs);
        if fatal {
            return Err(wrong(format!(
                "failover --postgres: {} problems (above)",
                problems.len()
            )));
        }
    }
    Ok(())
}

/// PostgreSQL's serialization failures in the dispatchers' logs, if any (reported: a known
/// limit with many runner sessions).
fn check_serialization(farm: &Farm) {
    for i in 0..farm.addrs.len() {
        let log = farm.dir.join(format!("d{i}")).join("serve.log");
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let count = text.matches("could not serialize").count();
        if count > 0 {
            note(format!(
                "dispatcher {i}'s log has {count} lines with \"could not serialize\" ({})",
                log.display()
            ));
        }
    }
}

/// Adds the dispatchers' last log lines to an error.
fn with_logs(mut e: BenchError, farm: &Farm) -> BenchError {
    for i in 0..farm.addrs.len() {
        let log = farm.dir.join(format!("d{i}")).join("serve.log");
        e.message
            .push_str(&format!("\ndispatcher {i}'s log:\n{}", tail(&log, 15)));
    }
    e
}

//! Helpers for the fault-tolerance, security and partition tests (`faults.rs`,
//! `security_e2e.rs`, `partition.rs`), on top of the crate root's helpers: dispatchers on any address
//! (and restarted on the same port), runners with extra global flags, a seeded random source,
//! parsing of a job's log into attempts, read-only access to the dispatcher's SQLite file,
//! processes found by a marker, TLS material made with rcgen, and network namespaces that clean
//! up after themselves.
//!
//! A test uses it with `use kiln_testkit::{*, fault::*};`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng as _, SeedableRng};

use crate::*;

// ---------------------------------------------------------------------------------------------
// Dispatchers
// ---------------------------------------------------------------------------------------------

/// Starts `kiln serve --listen LISTEN --data-dir DIR EXTRA...` and waits for its address line.
/// `Err` with its output when it exits first (e.g. exit 6: the address is taken).
pub fn try_start_dispatcher(
    listen: &str,
    data_dir: &Path,
    extra: &[&str],
    scheme: &str,
) -> Result<Server, Out> {
    let dir = data_dir.to_str().unwrap();
    let mut args = vec!["serve", "--listen", listen, "--data-dir", dir];
    args.extend_from_slice(extra);
    let mut proc = Proc::kiln(format!("kiln serve ({listen})"), &args);
    let printed = wait_for("kiln serve to print its address or exit", LONG, || {
        if contains(&proc.stdout(), b"\n") {
            return Ok(true);
        }
        if proc.try_status().is_some() {
            return Ok(false);
        }
        Err(format!(
            "stdout {:?}, stderr {:?}",
            String::from_utf8_lossy(&proc.stdout()),
            String::from_utf8_lossy(&proc.stderr())
        ))
    });
    if !printed {
        return Err(proc.wait(LONG));
    }
    let text = String::from_utf8(proc.stdout()).unwrap();
    let prefix = "kiln dispatcher listening on ";
    let line = text.lines().next().unwrap();
    let addr = line
        .strip_prefix(prefix)
        .unwrap_or_else(|| panic!("unexpected first stdout line of kiln serve: {line:?}"))
        .trim()
        .to_string();
    assert!(!addr.ends_with(":0"), "{addr:?}");
    Ok(Server {
        proc,
        url: format!("{scheme}://{addr}"),
        addr,
        data_dir: data_dir.to_path_buf(),
    })
}

/// Starts a plaintext dispatcher on `listen` (e.g. `10.200.7.1:0`).
pub fn start_dispatcher(listen: &str, data_dir: &Path, extra: &[&str]) -> Server {
    try_start_dispatcher(listen, data_dir, extra, "http")
        .unwrap_or_else(|out| panic!("kiln serve on {listen} did not start: {out}"))
}

/// Starts a dispatcher on exactly `addr` (the port a previous dispatcher had), retrying while
/// the port is still taken (the old process may take a moment to release it; tokio binds with
/// SO_REUSEADDR, so connections in TIME_WAIT do not block it).
pub fn restart_dispatcher_on(addr: &str, data_dir: &Path, extra: &[&str]) -> Server {
    let start = Instant::now();
    loop {
        match try_start_dispatcher(addr, data_dir, extra, "http") {
            Ok(s) => {
                assert_eq!(s.addr, addr, "the restarted dispatcher moved");
                return s;
            }
            Err(out)
                if out.status.code() == Some(6) && start.elapsed() < Duration::from_secs(20) =>
            {
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(out) => panic!(
                "cannot restart the dispatcher on {addr} (another process took the port?): {out}"
            ),
        }
    }
}

/// Spawns `kiln [GLOBAL...] --dispatcher URL runner --name NAME --work-dir WORK [EXTRA...]`.
pub fn spawn_runner(url: &str, name: &str, work: &Path, global: &[&str], extra: &[&str]) -> Proc {
    let mut args: Vec<&str> = global.to_vec();
    args.extend_from_slice(&[
        "--dispatcher",
        url,
        "runner",
        "--name",
        name,
        "--work-dir",
        work.to_str().unwrap(),
    ]);
    args.extend_from_slice(extra);
    Proc::kiln(format!("kiln runner {name}"), &args)
}

/// Runs `kiln GLOBAL... --dispatcher URL ARGS...` to its end.
pub fn cli_at(url: &str, global: &[&str], args: &[&str]) -> Out {
    let mut all: Vec<&str> = global.to_vec();
    all.extend_from_slice(&["--dispatcher", url]);
    all.extend_from_slice(args);
    kiln(&all)
}

/// `kiln --json runners` (with `global` flags): name -> state.
pub fn runner_states(url: &str, global: &[&str]) -> Result<Vec<(String, String)>, String> {
    let out = cli_at(url, global, &["--json", "runners"]);
    if out.status.code() != Some(0) {
        return Err(out.to_string());
    }
    Ok(out.json()["runners"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["name"].as_str().unwrap().to_string(),
                r["state"].as_str().unwrap().to_string(),
            )
        })
        .collect())
}

/// Whether `name` is attached (idle, busy or draining) according to `kiln runners`.
pub fn is_attached(states: &[(String, String)], name: &str) -> bool {
    states
        .iter()
        .any(|(n, s)| n == name && matches!(s.as_str(), "idle" | "busy" | "draining"))
}

/// Waits for `name` to be attached.
pub fn wait_attached(url: &str, global: &[&str], name: &str) {
    wait_for(&format!("runner {name} to attach"), LONG, || {
        let states = runner_states(url, global)?;
        if is_attached(&states, name) {
            Ok(())
        } else {
            Err(format!("{states:?}"))
        }
    });
}

/// The first job of a build JSON.
pub fn job0(b: &serde_json::Value) -> &serde_json::Value {
    &b["jobs"][0]
}

pub use crate::process::signal_tree;

// ---------------------------------------------------------------------------------------------
// Seeded randomness
// ---------------------------------------------------------------------------------------------

/// The chaos tests' random source: `rand`'s seeded generator behind the few draws they make
/// (victims, moments, orders), so a run is replayed from its seed.
#[derive(Debug, Clone)]
pub struct Rng(StdRng);

impl Rng {
    /// From `KILN_CHAOS_SEED` if set, else from the clock; the seed is printed so a failing
    /// run can be replayed (the faults are the same; the machine's timing is not).
    pub fn from_env_or_clock() -> (Rng, u64) {
        let seed = std::env::var("KILN_CHAOS_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| rand::rng().random());
        (Rng(StdRng::seed_from_u64(seed)), seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0.random()
    }

    /// Uniform in `lo..hi` (`lo` when the range is empty).
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        if hi <= lo {
            lo
        } else {
            self.0.random_range(lo..hi)
        }
    }

    /// A duration uniform in `lo..hi` milliseconds.
    pub fn millis(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(self.range(lo, hi))
    }

    /// Shuffles in place.
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        v.shuffle(&mut self.0);
    }
}

// ---------------------------------------------------------------------------------------------
// Logs
// ---------------------------------------------------------------------------------------------

/// One attempt's part of a job's log: from its `kiln: job J attempt K on R: checking out`
/// line to the next such line.
#[derive(Debug, Clone)]
pub struct Segment {
    /// The job id in the header.
    pub job: u64,
    /// The attempt number (1 for the first try).
    pub attempt: u32,
    /// The runner's name.
    pub runner: String,
    /// The text, header included.
    pub text: String,
}

/// Splits a job's log at each attempt header (wherever it is, even after a partial line).
pub fn attempt_segments(log: &str) -> Vec<Segment> {
    const MARK: &str = "kiln: job ";
    let mut starts: Vec<usize> = Vec::new();
    let mut from = 0;
    while let Some(i) = log[from..].find(MARK) {
        let at = from + i;
        let rest = &log[at..];
        let line = rest.lines().next().unwrap_or_default();
        if line.contains(" attempt ") && line.contains(": checking out ") {
            starts.push(at);
        }
        from = at + MARK.len();
    }
    let mut out = Vec::new();
    for (n, &s) in starts.iter().enumerate() {
        let end = starts.get(n + 1).copied().unwrap_or(log.len());
        let text = &log[s..end];
        let header = text.lines().next().unwrap();
        // "kiln: job J attempt K on R: checking out ..."
        let words: Vec<&str> = header.split_whitespace().collect();
        let job = words[2]
            .parse()
            .unwrap_or_else(|_| panic!("header {header:?}"));
        assert_eq!(words[3], "attempt", "header {header:?}");
        let attempt = words[4]
            .parse()
            .unwrap_or_else(|_| panic!("header {header:?}"));
        assert_eq!(words[5], "on", "header {header:?}");
        let runner = words[6].trim_end_matches(':').to_string();
        out.push(Segment {
            job,
            attempt,
            runner,
            text: text.to_string(),
        });
    }
    out
}

/// The numbers N of the `PREFIX N` lines of a text, in order.
pub fn numbered_lines(text: &str, prefix: &str) -> Vec<u32> {
    text.lines()
        .filter_map(|l| l.strip_prefix(prefix))
        .filter_map(|n| n.trim().parse().ok())
        .collect()
}

// ---------------------------------------------------------------------------------------------
// The dispatcher's database
// ---------------------------------------------------------------------------------------------

/// Opens `DIR/kiln.db` read-only (the dispatcher may be running: WAL lets readers in).
pub fn open_db(data_dir: &Path) -> rusqlite::Connection {
    let path = data_dir.join("kiln.db");
    let c = rusqlite::Connection::open_with_flags(
        &path,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .unwrap_or_else(|e| panic!("cannot open {}: {e}", path.display()));
    c.busy_timeout(Duration::from_secs(10)).unwrap();
    c
}

/// Where a farm's state is: a dispatcher's data dir (its SQLite file, read-only) or the
/// PostgreSQL database several dispatchers share. The chaos checks' queries are written for
/// both.
#[derive(Debug, Clone)]
pub enum Db {
    /// `DIR/kiln.db`.
    Sqlite(PathBuf),
    /// A `postgres://` URL.
    Postgres(String),
}

impl From<&Path> for Db {
    fn from(data_dir: &Path) -> Db {
        Db::Sqlite(data_dir.to_path_buf())
    }
}

impl From<&PathBuf> for Db {
    fn from(data_dir: &PathBuf) -> Db {
        Db::Sqlite(data_dir.clone())
    }
}

impl Db {
    /// Rows of a query with integer columns only.
    pub fn int_rows(&self, sql: &str) -> Vec<Vec<i64>> {
        match self {
            Db::Sqlite(dir) => int_rows(&open_db(dir), sql),
            Db::Postgres(url) => kiln_pgtest::query(url, sql)
                .unwrap_or_else(|e| panic!("{e}"))
                .into_iter()
                .map(|row| {
                    row.iter()
                        .map(|v| {
                            v.parse()
                                .unwrap_or_else(|_| panic!("{v:?} is no integer ({sql})"))
                        })
                        .collect()
                })
                .collect(),
        }
    }
}

/// Rows of a query with integer columns only.
pub fn int_rows(db: &rusqlite::Connection, sql: &str) -> Vec<Vec<i64>> {
    let mut stmt = db.prepare(sql).unwrap();
    let n = stmt.column_count();
    stmt.query_map([], |r| (0..n).map(|i| r.get::<_, i64>(i)).collect())
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap()
}

// ---------------------------------------------------------------------------------------------
// Chaos runs: the farm's state, and the pass rule
// ---------------------------------------------------------------------------------------------

/// The final job states, as an SQL list.
pub const FINAL_STATES: &str = "('passed','failed','cancelled','timed_out','errored','skipped')";

/// A pipeline of one step `NAME` that prints `line 1` .. `line LINES`, one every 50 ms, with
/// `MARKER=1` in its environment (so its processes can be found in /proc).
pub fn counting_pipeline(name: &str, marker: &str, lines: u32) -> String {
    format!(
        "steps:\n  - name: {name}\n    env:\n      {marker}: \"1\"\n    run: |\n      : {marker}\n      \
         for i in $(seq 1 {lines}); do echo \"line $i\"; sleep 0.05; done\n"
    )
}

/// A repository whose `.kiln.yml` is [`counting_pipeline`] (`count`, `LINES` lines) with
/// `builds` commits (each changes `n.txt`): the repository and the commits, oldest first.
pub fn counting_repo(dir: &Path, marker: &str, lines: u32, builds: usize) -> (Repo, Vec<String>) {
    let pipeline = counting_pipeline("count", marker, lines);
    let (repo, first) = Repo::with_pipeline(dir, &pipeline);
    let mut commits = vec![first];
    for i in 1..builds {
        commits.push(repo.commit(&[("n.txt", i.to_string().as_bytes())], &format!("c{i}")));
    }
    (repo, commits)
}

/// Runners are declared lost after about a second of silence.
pub const SHORT_HEARTBEATS: &[&str] =
    &["--heartbeat-interval", "300ms", "--missed-heartbeats", "3"];

/// Whether every job in the database is final.
pub fn all_final(db: impl Into<Db>) -> bool {
    db.into().int_rows(&format!(
        "SELECT COUNT(*) FROM jobs WHERE state NOT IN {FINAL_STATES}"
    ))[0][0]
        == 0
}

/// Jobs that the next fault could push towards the dispatcher's limit (the third lost attempt
/// ends a job `errored`, by design): running jobs already lost once, and unfinished jobs lost
/// twice. A chaos harness injects a fault only when there are none, so no job is lost three
/// times.
pub fn risky_jobs(db: impl Into<Db>) -> i64 {
    db.into().int_rows(&format!(
        "SELECT COUNT(*) FROM jobs WHERE \
             (state IN ('assigned', 'running') AND lost_attempts > 0) \
             OR (state NOT IN {FINAL_STATES} AND lost_attempts > 1)"
    ))[0][0]
}

/// Waits (at most 15 s) until no job is risky (see [`risky_jobs`]); false if some still are.
pub fn wait_calm(db: impl Into<Db>) -> bool {
    let db = db.into();
    let calm = Instant::now();
    while risky_jobs(db.clone()) > 0 && calm.elapsed() < Duration::from_secs(15) {
        std::thread::sleep(POLL);
    }
    risky_jobs(db) == 0
}

/// Running attempts given to `runner` at or after `since` (ms since the epoch: its process's
/// start, so not an attempt of a killed process under the same name) whose job was never lost,
/// as (job, attempt).
pub fn fresh_running_attempts(data: &Path, runner: &str, since: i64) -> Vec<(i64, i64)> {
    let db = open_db(data);
    let mut stmt = db
        .prepare(
            "SELECT j.id, a.id FROM attempts a JOIN jobs j ON j.current_attempt = a.id \
             JOIN runners r ON r.id = a.runner_id \
             WHERE r.name = ?1 AND a.state = 'running' AND j.state = 'running' \
             AND j.lost_attempts = 0 AND a.created_at >= ?2",
        )
        .unwrap();
    stmt.query_map(rusqlite::params![runner, since], |r| {
        Ok((r.get(0)?, r.get(1)?))
    })
    .unwrap()
    .collect::<Result<Vec<_>, _>>()
    .unwrap()
}

/// An attempt's state in the database (`running`, `lost`, `finished`, ...).
pub fn attempt_state(data: &Path, attempt: i64) -> String {
    let db = open_db(data);
    db.query_row("SELECT state FROM attempts WHERE id = ?1", [attempt], |r| {
        r.get(0)
    })
    .unwrap()
}

/// The attempts given to `runner` at or after `since` (ms since the epoch, the store's
/// clock) that the dispatcher declared lost.
pub fn lost_attempts_of(data: &Path, runner: &str, since: i64) -> Vec<i64> {
    let db = open_db(data);
    let mut stmt = db
        .prepare(
            "SELECT a.id FROM attempts a JOIN runners r ON r.id = a.runner_id \
             WHERE r.name = ?1 AND a.state = 'lost' AND a.created_at >= ?2 ORDER BY a.id",
        )
        .unwrap();
    stmt.query_map(rusqlite::params![runner, since], |r| r.get(0))
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap()
}

/// Now, in ms since the epoch (the store's clock).
pub fn epoch_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// `kiln logs --all-attempts ID` (stdout: every attempt's output and kiln's own lines).
pub fn logs_all_attempts(server: &Server, id: u64) -> String {
    server
        .cli(&["logs", "--all-attempts", &id.to_string()])
        .out()
}

/// Waits until `count` builds exist and every one is final (at most `timeout`); returns them.
pub fn wait_builds_final(
    server: &Server,
    count: usize,
    timeout: Duration,
) -> Vec<serde_json::Value> {
    wait_for("every build to finish", timeout, || {
        let out = server.cli(&["--json", "builds", "--limit", "500"]);
        if out.status.code() != Some(0) {
            return Err(out.to_string());
        }
        let list = out.json()["builds"].as_array().unwrap().clone();
        let unfinished: Vec<String> = list
            .iter()
            .filter(|b| matches!(b["state"].as_str(), Some("queued" | "running" | "assigned")))
            .map(|b| format!("{}:{}", b["id"], b["state"]))
            .collect();
        if list.len() == count && unfinished.is_empty() {
            Ok(list)
        } else {
            Err(format!("{} builds, unfinished: {unfinished:?}", list.len()))
        }
    })
}

/// What a chaos run's builds came to.
#[derive(Debug, Default, Clone, Copy)]
pub struct Tally {
    /// Attempts over all jobs.
    pub attempts: u64,
    /// Attempts the dispatcher declared lost.
    pub lost: u64,
    /// Refused results and claims (rows of `refusals`).
    pub refusals: i64,
}

/// The pass rule of a chaos run, part 1 (the dispatcher still up): every build passed; each
/// job's log holds, per attempt in order, a prefix of `line 1..` with no line twice, and the
/// last attempt (the one that gave the result, on the job's runner) the whole `1..=lines`
/// followed by `kiln: step STEP exit 0`. Adds what is wrong to `problems`.
pub fn check_builds(
    server: &Server,
    ids: &[u64],
    step: &str,
    lines: u32,
    tally: &mut Tally,
    problems: &mut Vec<String>,
) {
    for &id in ids {
        let b = server.show(id);
        let job = job0(&b);
        if b["state"] != "passed" || job["state"] != "passed" {
            problems.push(format!("build {id} did not pass: {b}"));
            continue;
        }
        let attempts = job["attempts"].as_u64().unwrap() as u32;
        tally.attempts += u64::from(attempts);
        tally.lost += job["lost_attempts"].as_u64().unwrap();
        let text = logs_all_attempts(server, id);
        let segments = attempt_segments(&text);
        let Some(last) = segments.last() else {
            problems.push(format!("build {id}: no attempt in its log:\n{text}"));
            continue;
        };
        let mut previous = 0;
        for s in &segments {
            if s.attempt <= previous {
                problems.push(format!(
                    "build {id}: attempt {} logged after attempt {previous}:\n{text}",
                    s.attempt
                ));
            }
            previous = s.attempt;
            if s.job != job["id"].as_u64().unwrap() {
                problems.push(format!("build {id}: header of job {} in its log", s.job));
            }
            let numbers = numbered_lines(&s.text, "line ");
            let expected: Vec<u32> = (1..=numbers.len() as u32).collect();
            if numbers != expected {
                problems.push(format!(
                    "build {id}, attempt {} on {}: lines {numbers:?} are not 1..{} once each in order",
                    s.attempt,
                    s.runner,
                    numbers.len()
                ));
            }
        }
        let numbers = numbered_lines(&last.text, "line ");
        if numbers != (1..=lines).collect::<Vec<_>>()
            || last.attempt != attempts
            || job["runner"] != last.runner.as_str()
            || !last.text.contains(&format!("kiln: step {step} exit 0"))
        {
            problems.push(format!(
                "build {id}: the last attempt's log is not the whole passing sequence of attempt \
                 {attempts} on {}:\n{}",
                job["runner"], last.text
            ));
        }
    }
}

/// The pass rule of a chaos run, part 2 (read from the database, best once everything
/// stopped): exactly one finished attempt per job and it is the current one, attempt counts
/// that match the rows, no refusal of a current attempt. Counts the refusals into `tally`.
pub fn check_attempt_rows(db: impl Into<Db>, tally: &mut Tally, problems: &mut Vec<String>) {
    let db = db.into();
    let twice = db.int_rows(
        "SELECT job_id, COUNT(*) FROM attempts WHERE state = 'finished' \
         GROUP BY job_id HAVING COUNT(*) > 1",
    );
    if !twice.is_empty() {
        problems.push(format!(
            "jobs with several finished attempts (job, count): {twice:?}"
        ));
    }
    let unsettled = db.int_rows(
        "SELECT j.id FROM jobs j JOIN attempts a ON a.id = j.current_attempt \
         WHERE a.state <> 'finished'",
    );
    if !unsettled.is_empty() {
        problems.push(format!(
            "jobs whose current attempt is not finished: {unsettled:?}"
        ));
    }
    let miscounted = db.int_rows(
        "SELECT j.id, j.attempts, (SELECT COUNT(*) FROM attempts a WHERE a.job_id = j.id) \
         FROM jobs j WHERE j.attempts <> (SELECT COUNT(*) FROM attempts a WHERE a.job_id = j.id)",
    );
    if !miscounted.is_empty() {
        problems.push(format!(
            "jobs whose attempt count differs from their attempts (job, count, rows): {miscounted:?}"
        ));
    }
    let refused_current = db.int_rows(
        "SELECT r.job_id, r.attempt_id FROM refusals r JOIN jobs j ON j.id = r.job_id \
         WHERE r.attempt_id = j.current_attempt",
    );
    if !refused_current.is_empty() {
        problems.push(format!(
            "results of current attempts were refused (job, attempt): {refused_current:?}"
        ));
    }
    tally.refusals = db.int_rows("SELECT COUNT(*) FROM refusals")[0][0];
}

/// The end of a chaos run: every runner still takes work (a runner that kept the slot of an
/// attempt it dropped would refuse it). Submits one build per runner whose step (with
/// `MARKER=1`) waits for a flag, so each holds a one-slot runner: all of them must be running,
/// one on each runner, before the flag is written; then each must pass. Call it once every
/// earlier build has ended. Adds what is wrong to `problems`.
pub fn every_runner_takes_work(
    server: &Server,
    repo: &Repo,
    runners: &[&str],
    marker: &str,
    problems: &mut Vec<String>,
) {
    let flag = repo.path.with_extension("probe-go");
    let pipeline = format!(
        "steps:\n  - name: probe\n    env:\n      {marker}: \"1\"\n    run: |\n      {}\n",
        wait_flag_sh(&flag)
    );
    let ids: Vec<u64> = runners
        .iter()
        .enumerate()
        .map(|(i, _)| {
            let c = repo.commit(
                &[
                    (".kiln.yml", pipeline.as_bytes()),
                    ("probe.txt", i.to_string().as_bytes()),
                ],
                &format!("probe {i}"),
            );
            id_of(&server.submit(&repo.path, &c))
        })
        .collect();
    let deadline = Instant::now() + LONG;
    let mut on: Vec<String> = Vec::new();
    while Instant::now() < deadline {
        on = ids
            .iter()
            .filter_map(|&id| {
                let b = server.show(id);
                (job0(&b)["state"] == "running")
                    .then(|| job0(&b)["runner"].as_str().unwrap_or("?").to_string())
            })
            .collect();
        on.sort();
        if on.len() == runners.len() {
            break;
        }
        std::thread::sleep(POLL);
    }
    let mut want: Vec<String> = runners.iter().map(|r| r.to_string()).collect();
    want.sort();
    if on != want {
        problems.push(format!(
            "one build per runner should have been running on each of {want:?}; running on: \
             {on:?} (a runner that kept a dropped attempt's slot refuses work)"
        ));
    }
    std::fs::write(&flag, b"").unwrap();
    for id in ids {
        let b = server.wait_final(id, LONG);
        if b["state"] != "passed" {
            problems.push(format!("probe build {id} did not pass: {b}"));
        }
    }
}

/// Waits a little (5 s) for processes carrying `marker` to go; returns those still there.
pub fn wait_for_none(marker: &str) -> Vec<(i32, String)> {
    let start = Instant::now();
    loop {
        let left = processes_with(marker);
        if left.is_empty() || start.elapsed() > Duration::from_secs(5) {
            return left;
        }
        std::thread::sleep(POLL);
    }
}

// ---------------------------------------------------------------------------------------------
// Processes left behind
// ---------------------------------------------------------------------------------------------

/// Live processes (other than this one) whose command line or environment contains `marker`.
pub fn processes_with(marker: &str) -> Vec<(i32, String)> {
    let me = std::process::id() as i32;
    let mut found = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return found;
    };
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        if contains(&cmdline, marker.as_bytes()) || contains(&environ, marker.as_bytes()) {
            // A zombie has an empty cmdline; it is dead already.
            let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let zombie = state
                .rfind(')')
                .and_then(|i| state[i + 1..].split_whitespace().next())
                == Some("Z");
            if !zombie {
                let shown = String::from_utf8_lossy(&cmdline).replace('\0', " ");
                found.push((pid, shown));
            }
        }
    }
    found
}

/// Processes of one attempt's steps still alive (found by the marker and the attempt id in
/// their environment).
pub fn attempt_processes(marker: &str, attempt: u64) -> Vec<(i32, String)> {
    let want = format!("KILN_ATTEMPT_ID={attempt}\0");
    processes_with(marker)
        .into_iter()
        .filter(|(pid, _)| {
            let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
            contains(&env, want.as_bytes())
        })
        .collect()
}

/// Kills, on drop, every process carrying `marker` (steps this test made and kiln left
/// behind), so a failing test does not leak them.
pub struct MarkerReaper(pub String);

impl Drop for MarkerReaper {
    fn drop(&mut self) {
        for (pid, _) in processes_with(&self.0) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// A small disk to fill
// ---------------------------------------------------------------------------------------------

/// A tmpfs of `size` mounted on `dir` until dropped; `None` where mounting is impossible (not
/// root), and the test says it skipped.
pub struct Tmpfs(pub std::path::PathBuf);

impl Tmpfs {
    pub fn mount(dir: &std::path::Path, size: &str) -> Option<Tmpfs> {
        std::fs::create_dir_all(dir).unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| Tmpfs(dir.to_path_buf()))
    }

    /// Fills the file system with `filler` until a write fails for want of space.
    pub fn fill(&self) -> std::path::PathBuf {
        use std::io::Write;
        let path = self.0.join("filler");
        let mut f = std::fs::File::create(&path).unwrap();
        for chunk in [1 << 20, 4096, 64] {
            let buf = vec![b'x'; chunk];
            while f.write_all(&buf).is_ok() {}
        }
        path
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

// ---------------------------------------------------------------------------------------------
// TLS material
// ---------------------------------------------------------------------------------------------

/// A CA, a server certificate for 127.0.0.1 and localhost, and a client certificate, as PEM
/// files in `dir`.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// CA certificate.
    pub ca: PathBuf,
    /// Server certificate and key.
    pub server_cert: PathBuf,
    /// Server key.
    pub server_key: PathBuf,
    /// Client certificate (signed by the CA).
    pub client_cert: PathBuf,
    /// Client key.
    pub client_key: PathBuf,
    /// A client certificate signed by another CA.
    pub rogue_cert: PathBuf,
    /// Its key.
    pub rogue_key: PathBuf,
}

impl TlsFiles {
    /// Generates everything with rcgen.
    pub fn generate(dir: &Path) -> TlsFiles {
        use rcgen::{
            BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
            KeyPair, KeyUsagePurpose,
        };
        std::fs::create_dir_all(dir).unwrap();
        let write = |name: &str, text: String| {
            let p = dir.join(name);
            std::fs::write(&p, text).unwrap();
            p
        };
        let make_ca = |cn: &str| {
            let key = KeyPair::generate().unwrap();
            let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.distinguished_name.push(DnType::CommonName, cn);
            params.key_usages = vec![
                KeyUsagePurpose::KeyCertSign,
                KeyUsagePurpose::CrlSign,
                KeyUsagePurpose::DigitalSignature,
            ];
            let cert = params.self_signed(&key).unwrap();
            (cert.pem(), Issuer::new(params, key))
        };
        let leaf = |issuer: &Issuer<'_, KeyPair>,
                    sans: Vec<String>,
                    cn: &str,
                    usage: ExtendedKeyUsagePurpose| {
            let key = KeyPair::generate().unwrap();
            let mut params = CertificateParams::new(sans).unwrap();
            params.distinguished_name.push(DnType::CommonName, cn);
            params.extended_key_usages = vec![usage];
            params.key_usages = vec![
                KeyUsagePurpose::DigitalSignature,
                KeyUsagePurpose::KeyEncipherment,
            ];
            let cert = params.signed_by(&key, issuer).unwrap();
            (cert.pem(), key.serialize_pem())
        };
        let (ca_pem, issuer) = make_ca("kiln test CA");
        let (srv, srv_key) = leaf(
            &issuer,
            vec!["127.0.0.1".into(), "localhost".into()],
            "kiln dispatcher",
            ExtendedKeyUsagePurpose::ServerAuth,
        );
        // The runner names the tests use with this certificate (mutual TLS binds the name).
        let (cli, cli_key) = leaf(
            &issuer,
            vec!["trusted".into(), "good".into()],
            "kiln runner",
            ExtendedKeyUsagePurpose::ClientAuth,
        );
        let (_, rogue_issuer) = make_ca("rogue CA");
        let (rogue, rogue_key) = leaf(
            &rogue_issuer,
            vec!["runner.kiln.test".into()],
            "rogue runner",
            ExtendedKeyUsagePurpose::ClientAuth,
        );
        TlsFiles {
            ca: write("ca.pem", ca_pem),
            server_cert: write("server.pem", srv),
            server_key: write("server.key", srv_key),
            client_cert: write("client.pem", cli),
            client_key: write("client.key", cli_key),
            rogue_cert: write("rogue.pem", rogue),
            rogue_key: write("rogue.key", rogue_key),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Network namespaces
// ---------------------------------------------------------------------------------------------

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run ip {args:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// A network namespace joined to the host by a veth pair: `host_ip` (/30) on the host side,
/// `ns_ip` inside. Deleted (namespace and veth) on drop, also when the test panics.
#[derive(Debug)]
pub struct Netns {
    /// Namespace name.
    pub name: String,
    /// Host-side interface.
    pub host_if: String,
    /// Namespace-side interface.
    pub ns_if: String,
    /// Host-side address.
    pub host_ip: String,
    /// Namespace-side address.
    pub ns_ip: String,
}

impl Netns {
    /// Creates `kiln-<pid>-<k>` with veth `kvh<pid>x<k>`/`kvn<pid>x<k>` on 10.200.X.4k/30, X
    /// from the pid, k counting the namespaces this process made (tests of one file run at
    /// the same time, each with its own).
    pub fn create() -> Result<Netns, String> {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let k = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % 64;
        let pid = std::process::id();
        let x = pid % 250 + 1;
        // Interface names have at most 15 bytes: "kvh" + 7 digits + "x" + 2 digits.
        let tag = format!("{}x{k}", pid % 10_000_000);
        let ns = Netns {
            name: format!("kiln-{pid}-{k}"),
            host_if: format!("kvh{tag}"),
            ns_if: format!("kvn{tag}"),
            host_ip: format!("10.200.{x}.{}", 4 * k + 1),
            ns_ip: format!("10.200.{x}.{}", 4 * k + 2),
        };
        // Leftovers of an earlier run with the same pid.
        let _ = ip(&["link", "del", &ns.host_if]);
        let _ = ip(&["netns", "del", &ns.name]);
        ip(&["netns", "add", &ns.name])?;
        // From here on, drop cleans up whatever was made.
        let host_cidr = format!("{}/30", ns.host_ip);
        let ns_cidr = format!("{}/30", ns.ns_ip);
        ip(&[
            "link",
            "add",
            &ns.host_if,
            "type",
            "veth",
            "peer",
            "name",
            &ns.ns_if,
        ])?;
        ip(&["link", "set", &ns.ns_if, "netns", &ns.name])?;
        ip(&["addr", "add", &host_cidr, "dev", &ns.host_if])?;
        ip(&["link", "set", &ns.host_if, "up"])?;
        ns.exec_ip(&["addr", "add", &ns_cidr, "dev", &ns.ns_if])?;
        ns.exec_ip(&["link", "set", &ns.ns_if, "up"])?;
        ns.exec_ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    fn exec_ip(&self, args: &[&str]) -> Result<(), String> {
        let mut all = vec!["netns", "exec", &self.name, "ip"];
        all.extend_from_slice(args);
        ip(&all)
    }

    /// Brings the host side of the link up or down (the partition).
    pub fn set_link(&self, up: bool) {
        ip(&["link", "set", &self.host_if, if up { "up" } else { "down" }]).unwrap();
    }

    /// A command run inside the namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting one end of a veth pair deletes both.
        let _ = ip(&["link", "del", &self.host_if]);
        if let Err(e) = ip(&["netns", "del", &self.name]) {
            eprintln!("cleanup: {e}");
        }
    }
}

//! Several dispatchers sharing one farm on PostgreSQL, and losing them: one of three killed
//! mid-build (its runners re-attach to another one, carrying their attempts and buffered
//! output), PostgreSQL itself restarted mid-run, and a chaos run of three dispatchers and six
//! runners with dispatchers and runners killed in turn.
//!
//! Real `kiln serve` processes on loopback ports with `--database` on a throwaway PostgreSQL
//! (`kiln-pgtest`), runners given every dispatcher's URL (`--dispatcher a,b,c`, each runner's
//! list starting at another dispatcher so the runners spread), waiting on conditions with
//! deadlines.

use std::path::Path;
use std::time::{Duration, Instant};

use kiln_testkit::fault::*;
use kiln_testkit::*;
use nix::sys::signal::Signal;

fn marker(test: &str) -> String {
    format!("KILN_FAILOVER_{}_{test}", std::process::id())
}

/// Three (or `n`) dispatchers on one database, each with its own data dir (git mirrors only).
struct Cluster {
    tmp: std::path::PathBuf,
    url: String,
    dispatchers: Vec<Server>,
    addrs: Vec<String>,
    names: Vec<String>,
    /// Which dispatchers are down (killed, not yet started again).
    down: Vec<bool>,
    /// The dispatchers' heartbeat flags.
    heartbeats: &'static [&'static str],
    runners: Vec<Proc>,
}

impl Cluster {
    fn start(tmp: &Path, url: &str, n: usize, runners: usize) -> Cluster {
        Self::start_with(tmp, url, n, runners, SHORT_HEARTBEATS)
    }

    /// With the dispatchers' heartbeat flags `heartbeats`.
    fn start_with(
        tmp: &Path,
        url: &str,
        n: usize,
        runners: usize,
        heartbeats: &'static [&'static str],
    ) -> Cluster {
        let args = [&["--database", url][..], heartbeats].concat();
        let dispatchers: Vec<Server> = (0..n)
            .map(|i| start_dispatcher("127.0.0.1:0", &tmp.join(format!("d{i}")), &args))
            .collect();
        let addrs = dispatchers.iter().map(|d| d.addr.clone()).collect();
        let mut c = Cluster {
            tmp: tmp.to_path_buf(),
            url: url.to_string(),
            dispatchers,
            addrs,
            names: (0..runners).map(|i| format!("r{i}")).collect(),
            down: vec![false; n],
            runners: Vec::new(),
            heartbeats,
        };
        for i in 0..runners {
            let r = c.spawn_runner(i);
            c.runners.push(r);
        }
        let names: Vec<&str> = c.names.iter().map(String::as_str).collect();
        c.dispatchers[0].wait_runners_attached(&names);
        c
    }

    /// Runner `i`'s dispatcher list starts at dispatcher `i mod n`.
    fn urls_for(&self, i: usize) -> String {
        let n = self.addrs.len();
        (0..n)
            .map(|k| format!("http://{}", self.addrs[(i + k) % n]))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn spawn_runner(&self, i: usize) -> Proc {
        spawn_runner(
            &self.urls_for(i),
            &self.names[i],
            &self.tmp.join(format!("work-{}", self.names[i])),
            &[],
            &[
                "--slots",
                "1",
                "--cache-dir",
                self.tmp.join("cache").to_str().unwrap(),
            ],
        )
    }

    /// A dispatcher that is up.
    fn up(&self) -> &Server {
        let i = (0..self.dispatchers.len())
            .find(|&i| !self.down[i])
            .expect("a dispatcher is up");
        &self.dispatchers[i]
    }

    /// SIGKILLs dispatcher `i`.
    fn kill(&mut self, i: usize) {
        self.dispatchers[i].proc.signal(Signal::SIGKILL);
        self.dispatchers[i].proc.wait(LONG);
        self.down[i] = true;
    }

    /// Starts dispatcher `i` again on its port (the runners' lists name it).
    fn restart(&mut self, i: usize) {
        self.dispatchers[i] = restart_dispatcher_on(
            &self.addrs[i],
            &self.tmp.join(format!("d{i}")),
            &[&["--database", self.url.as_str()][..], self.heartbeats].concat(),
        );
        self.down[i] = false;
    }

    fn db(&self) -> Db {
        Db::Postgres(self.url.clone())
    }
}

/// How many times a runner process has logged that it attached.
fn attaches(runner: &Proc) -> usize {
    String::from_utf8_lossy(&runner.stderr())
        .matches("kiln_runner: attached")
        .count()
}

/// The `held=[...]` of a runner's last "attached" line.
fn last_held(runner: &Proc) -> String {
    let err = String::from_utf8_lossy(&runner.stderr()).to_string();
    err.lines()
        .rev()
        .find(|l| l.contains("kiln_runner: attached"))
        .and_then(|l| l.split("held=").nth(1))
        .unwrap_or_default()
        .to_string()
}

/// Kill -9 one of three dispatchers while every runner is in the middle of a job: the runners
/// that were attached to it re-attach to another dispatcher, carrying their running attempts
/// (no attempt is lost, no job runs twice) and the output they had not had acknowledged; every
/// build passes, each log holds each line once in order, read through a surviving dispatcher.
#[test]
fn killing_one_of_three_dispatchers_mid_build_loses_nothing() {
    one_of_three_dispatchers_lost_mid_build(Signal::SIGKILL, "kill1", SHORT_HEARTBEATS);
}

/// The same with a dispatcher frozen (SIGSTOP), as a host that hangs or drops off the network
/// without closing its connections: its runners hear no heartbeat answer, give it up after
/// the missed heartbeats and re-attach elsewhere first, carrying their attempts, before the
/// dispatcher that adopted those attempts stops waiting for them. The frozen dispatcher may
/// hold row locks of an open transaction (a job's log head): PostgreSQL ends its session after
/// 5 s idle in a transaction, so the runners' lease here (6 s, as kiln's default 3 x 2 s) is longer.
#[test]
fn freezing_one_of_three_dispatchers_mid_build_loses_nothing() {
    const HEARTBEATS: &[&str] = &["--heartbeat-interval", "1s", "--missed-heartbeats", "6"];
    one_of_three_dispatchers_lost_mid_build(Signal::SIGSTOP, "stop1", HEARTBEATS);
}

fn one_of_three_dispatchers_lost_mid_build(
    signal: Signal,
    test: &str,
    heartbeats: &'static [&'static str],
) {
    const LINES: u32 = 80;
    let tmp = tempdir();
    let marker = marker(test);
    let _reaper = MarkerReaper(marker.clone());
    let url = kiln_pgtest::database().expect("a throwaway PostgreSQL database");
    let (repo, commits) = counting_repo(&tmp.path().join("repo"), &marker, LINES, 6);
    let mut c = Cluster::start_with(tmp.path(), &url, 3, 6, heartbeats);
    // Submitted through dispatcher 1; each runs wherever a runner is free.
    let ids: Vec<u64> = commits
        .iter()
        .map(|sha| id_of(&c.dispatchers[1].submit(&repo.path, sha)))
        .collect();
    let db = c.db();
    wait_for("every job to run", LONG, || {
        let running = db.int_rows("SELECT COUNT(*) FROM jobs WHERE state = 'running'")[0][0];
        if running == 6 {
            Ok(())
        } else {
            Err(format!("{running} running"))
        }
    });
    // Runners r0 and r3 reached dispatcher 0 first.
    let movers = [0usize, 3];
    let before: Vec<usize> = movers.iter().map(|&i| attaches(&c.runners[i])).collect();
    let killed = Instant::now();
    if signal == Signal::SIGKILL {
        c.kill(0);
    } else {
        c.dispatchers[0].proc.signal(signal);
        c.down[0] = true;
    }
    let mut took = Vec::new();
    for (k, &i) in movers.iter().enumerate() {
        let r = &c.runners[i];
        wait_for(
            &format!("{} to re-attach elsewhere", c.names[i]),
            LONG,
            || {
                if attaches(r) > before[k] {
                    Ok(())
                } else {
                    Err(last_held(r))
                }
            },
        );
        took.push((c.names[i].clone(), killed.elapsed(), last_held(r)));
    }
    eprintln!("re-attached after {signal} (name, time, held): {took:?}");
    for (name, _, held) in &took {
        assert!(
            held.trim() != "[]" && !held.is_empty(),
            "{name} re-attached holding nothing: its attempt was not carried over"
        );
    }

    let server = c.up();
    let builds = wait_builds_final(server, 6, LONG);
    let mut problems = Vec::new();
    let mut tally = Tally::default();
    check_builds(server, &ids, "count", LINES, &mut tally, &mut problems);
    check_attempt_rows(db, &mut tally, &mut problems);
    assert!(
        builds.iter().all(|b| b["state"] == "passed"),
        "builds not passed: {builds:#?}"
    );
    assert!(problems.is_empty(), "{problems:#?}");
    assert_eq!(
        (tally.attempts, tally.lost),
        (6, 0),
        "every job ran once, its attempt carried over to another dispatcher"
    );
}

/// PostgreSQL goes away mid-run (an immediate stop, as a crash) and comes back on its port
/// after a while: the dispatchers and runners wait and carry on, every build submitted before
/// passes, each log holds each line once in order, and no job has two results.
#[test]
fn a_postgres_restart_mid_run_loses_nothing() {
    const LINES: u32 = 60;
    let tmp = tempdir();
    let marker = marker("pgrestart");
    let _reaper = MarkerReaper(marker.clone());
    // Its own durable cluster: every commit must survive the crash.
    let pg = kiln_pgtest::PgCluster::start_durable().expect("a throwaway PostgreSQL");
    let url = pg.database().expect("a database");
    let (repo, commits) = counting_repo(&tmp.path().join("repo"), &marker, LINES, 4);
    let c = Cluster::start(tmp.path(), &url, 2, 2);
    let ids: Vec<u64> = commits
        .iter()
        .map(|sha| id_of(&c.dispatchers[0].submit(&repo.path, sha)))
        .collect();
    let db = c.db();
    wait_for("two jobs to run", LONG, || {
        let running = db.int_rows("SELECT COUNT(*) FROM jobs WHERE state = 'running'")[0][0];
        if running == 2 {
            Ok(())
        } else {
            Err(format!("{running} running"))
        }
    });
    pg.crash().expect("PostgreSQL stops");
    // Down for a while (the fault's duration, not a wait for a condition): the steps print on,
    // their output waits in the runners' outboxes or the dispatchers' retries.
    std::thread::sleep(Duration::from_secs(3));
    pg.restart().expect("PostgreSQL starts again");

    let builds = wait_builds_final(&c.dispatchers[1], 4, Duration::from_secs(120));
    let mut problems = Vec::new();
    let mut tally = Tally::default();
    check_builds(
        &c.dispatchers[1],
        &ids,
        "count",
        LINES,
        &mut tally,
        &mut problems,
    );
    check_attempt_rows(db, &mut tally, &mut problems);
    assert!(
        builds.iter().all(|b| b["state"] == "passed"),
        "builds not passed: {builds:#?}"
    );
    assert!(
        problems.is_empty(),
        "{problems:#?}\nPostgreSQL log:\n{}",
        pg.log()
    );
    eprintln!(
        "PostgreSQL restart: {} attempts, {} lost, {} refusals",
        tally.attempts, tally.lost, tally.refusals
    );
}

/// Three dispatchers, six runners, fifty builds, while a seeded harness kills a dispatcher
/// (SIGKILL, then starts it again on its port; one is always up) or a runner (SIGKILL, then a
/// new process under its name) at random moments. Afterwards: every build passed, each job's
/// log holds per attempt a prefix of its sequence with no line twice and the last attempt's
/// whole, no job has two finished attempts, no result of a current attempt was refused.
///
/// `KILN_CHAOS_SEED=N` replays the same faults.
#[test]
fn chaos_three_dispatchers_six_runners_fifty_builds() {
    const BUILDS: usize = 50;
    const LINES: u32 = 40;
    let started = Instant::now();
    let deadline = started + Duration::from_secs(300);
    let tmp = tempdir();
    let marker = marker("chaos");
    let _reaper = MarkerReaper(marker.clone());
    let (mut rng, seed) = Rng::from_env_or_clock();
    eprintln!("chaos seed {seed} (replay the same faults with KILN_CHAOS_SEED={seed})");
    let url = kiln_pgtest::database().expect("a throwaway PostgreSQL database");
    let (repo, commits) = counting_repo(&tmp.path().join("repo"), &marker, LINES, BUILDS);
    let mut c = Cluster::start(tmp.path(), &url, 3, 6);
    let ids: Vec<u64> = commits
        .iter()
        .enumerate()
        .map(|(i, sha)| id_of(&c.dispatchers[i % 3].submit(&repo.path, sha)))
        .collect();
    let db = c.db();

    // Dispatchers killed in turn, runners at random: six of each, shuffled.
    let mut plan: Vec<bool> = [[true; 6], [false; 6]].concat();
    rng.shuffle(&mut plan);
    let mut done = Vec::new();
    let mut next_dispatcher = 0;
    for kill_dispatcher in plan {
        // A random moment (the fault's timing, not a wait for a condition).
        std::thread::sleep(rng.millis(300, 1500));
        if all_final(db.clone()) {
            done.push("skipped: all builds had finished".to_string());
            continue;
        }
        if kill_dispatcher {
            let i = next_dispatcher;
            next_dispatcher = (next_dispatcher + 1) % 3;
            let at = started.elapsed();
            c.kill(i);
            // Down for a random while; the other two keep the farm.
            std::thread::sleep(rng.millis(200, 2000));
            c.restart(i);
            done.push(format!("SIGKILL dispatcher {i} at {at:?}"));
        } else {
            // Never let one job be lost three times (it would end `errored`, by design).
            if !wait_calm(db.clone()) {
                done.push("skipped: jobs already lost were running".to_string());
                continue;
            }
            let v = rng.range(0, c.runners.len() as u64) as usize;
            c.runners[v].signal(Signal::SIGKILL);
            c.runners[v].wait(LONG);
            let again = c.spawn_runner(v);
            c.runners[v] = again;
            done.push(format!(
                "SIGKILL runner {} at {:?}",
                c.names[v],
                started.elapsed()
            ));
        }
    }
    eprintln!("faults: {done:#?}");
    assert!(
        done.iter().filter(|d| d.starts_with("SIGKILL")).count() >= 6,
        "the chaos did not happen as planned (too little work?): {done:#?}"
    );

    let remaining = deadline.saturating_duration_since(Instant::now());
    let server = c.up();
    let builds = wait_builds_final(server, BUILDS, remaining);
    let not_passed: Vec<String> = builds
        .iter()
        .filter(|b| b["state"] != "passed")
        .map(|b| b.to_string())
        .collect();
    let mut problems = Vec::new();
    let mut tally = Tally::default();
    check_builds(server, &ids, "count", LINES, &mut tally, &mut problems);
    check_attempt_rows(db, &mut tally, &mut problems);
    eprintln!(
        "chaos (3 dispatchers, 6 runners, {BUILDS} builds): {} attempts, {} lost, {} refusals, \
         {:?} in all",
        tally.attempts,
        tally.lost,
        tally.refusals,
        started.elapsed()
    );
    assert!(
        not_passed.is_empty(),
        "seed {seed}: builds not passed: {not_passed:#?}"
    );
    assert!(problems.is_empty(), "seed {seed}: {problems:#?}");
}

//! Fault tolerance, end to end: runners and the dispatcher killed while builds run (a seeded
//! chaos run), a user's cancel with post steps, the dispatcher's own deadline on a wedged
//! runner, a runner's death, a drain, and a runner's hard stop that hands its job back.
//!
//! Every test runs real `kiln` processes on loopback ports against git repositories in temp
//! dirs, and waits on conditions with deadlines.

use std::time::{Duration, Instant};

use kiln_testkit::fault::*;
use kiln_testkit::*;
use nix::sys::signal::Signal;

/// An environment variable name unique to this test process and test, given to every step so
/// that the steps' processes can be found in /proc.
fn marker(test: &str) -> String {
    format!("KILN_CHAOS_{}_{test}", std::process::id())
}

/// `steps: [{name, env: {MARKER: "1"}, run}]` plus extra YAML for the step.
fn one_step(name: &str, marker: &str, run: &str, extra: &str) -> String {
    let mut s =
        format!("steps:\n  - name: {name}\n    env:\n      {marker}: \"1\"\n{extra}    run: |\n");
    for line in run.lines() {
        s.push_str("      ");
        s.push_str(line);
        s.push('\n');
    }
    s
}

/// `kiln logs --all-attempts ID` (stdout: every attempt's output and kiln's own lines).
fn logs(server: &Server, id: u64) -> String {
    logs_all_attempts(server, id)
}

/// Waits until the build's log contains `needle`.
fn wait_log(server: &Server, id: u64, needle: &str) {
    wait_for(
        &format!("build {id}'s log to contain {needle:?}"),
        LONG,
        || {
            let text = logs(server, id);
            if text.contains(needle) {
                Ok(())
            } else {
                Err(text)
            }
        },
    );
}

/// A step that says `attempt N starts`, waits (at most 2 minutes) for the file `flag`, then says
/// `attempt N done`.
fn waiting_step(marker: &str, flag: &std::path::Path) -> String {
    one_step(
        "wait",
        marker,
        &format!(
            "echo \"attempt $KILN_ATTEMPT_ID starts\"\n{}\necho \"attempt $KILN_ATTEMPT_ID done\"",
            wait_flag_sh(flag)
        ),
        "",
    )
}

/// A build of one [`waiting_step`] job running on one of two runners (r1, r2), its first
/// attempt started: the test does something to the runner holding it, and the job moves.
struct MovingJob {
    server: Server,
    runners: [Proc; 2],
    flag: std::path::PathBuf,
    id: u64,
    first: u64,
    /// Which of `runners` holds the first attempt.
    victim: usize,
    survivor: &'static str,
    marker: String,
    _reaper: MarkerReaper,
}

impl MovingJob {
    fn start(tmp: &std::path::Path, test: &str) -> MovingJob {
        let marker = marker(test);
        let reaper = MarkerReaper(marker.clone());
        let flag = tmp.join("go");
        let (repo, sha) = Repo::with_pipeline(&tmp.join("repo"), &waiting_step(&marker, &flag));
        let server = Server::start(&tmp.join("data"), SHORT_HEARTBEATS);
        let runners = [server.runner(tmp, "r1", &[]), server.runner(tmp, "r2", &[])];
        server.wait_runners_attached(&["r1", "r2"]);
        let id = id_of(&server.submit(&repo.path, &sha));
        let b = server.wait_build(id, "running", LONG, |b| b["state"] == "running");
        let first = job0(&b)["attempt_id"].as_u64().unwrap();
        let (victim, survivor) = if job0(&b)["runner"] == "r1" {
            (0, "r2")
        } else {
            (1, "r1")
        };
        wait_log(&server, id, &format!("attempt {first} starts\n"));
        MovingJob {
            server,
            runners,
            flag,
            id,
            first,
            victim,
            survivor,
            marker,
            _reaper: reaper,
        }
    }

    /// Waits for the job's second attempt on the other runner, lets it finish, and checks that
    /// the build passed there with only that attempt's output complete. Returns the build.
    fn passes_on_the_survivor(&self) -> serde_json::Value {
        let (server, id, survivor) = (&self.server, self.id, self.survivor);
        let b = server.wait_build(id, &format!("the job to move to {survivor}"), LONG, |b| {
            job0(b)["runner"] == survivor && job0(b)["attempts"] == 2
        });
        let second = job0(&b)["attempt_id"].as_u64().unwrap();
        wait_log(server, id, &format!("attempt {second} starts\n"));
        std::fs::write(&self.flag, b"").unwrap();
        let b = server.wait_final(id, LONG);
        assert_eq!(b["state"], "passed", "{b}");
        assert_eq!(job0(&b)["attempts"], 2, "{b}");
        assert_eq!(job0(&b)["runner"], survivor, "{b}");
        let text = logs(server, id);
        assert!(text.contains(&format!("attempt {second} done\n")), "{text}");
        let first = self.first;
        assert!(!text.contains(&format!("attempt {first} done\n")), "{text}");
        b
    }
}

fn wait_no_processes(what: &str, timeout: Duration, mut left: impl FnMut() -> Vec<(i32, String)>) {
    wait_for(what, timeout, || {
        let l = left();
        if l.is_empty() {
            Ok(())
        } else {
            Err(format!("{l:?}"))
        }
    });
}

// ---------------------------------------------------------------------------------------------
// Chaos
// ---------------------------------------------------------------------------------------------

/// One fault the chaos harness can inject. Each is a variant here, an arm of
/// [`Farm::inject`], a count in the plan and in the plan's check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// SIGKILL one runner process (its steps become orphans), start a new one with its name.
    KillRunner,
    /// SIGSTOP one busy runner process alone (its step runs on and may end meanwhile) until
    /// the dispatcher has declared its attempt lost, then a random while longer; SIGCONT. The
    /// job runs elsewhere; the runner comes back holding a superseded attempt, which must be
    /// refused, dropped, and its slot freed.
    StopRunnerPastLease,
    /// The same with the runner's steps stopped too (a paused machine): its step is still
    /// running when it comes back, so it must drop the attempt while the step runs, stop the
    /// step and free the slot (issue 10's leaked slot).
    FreezeRunnerPastLease,
    /// SIGSTOP one runner with all its steps (a paused machine) for 50-400 ms, under the
    /// lease; SIGCONT. Usually nothing is lost; when the lease runs out anyway (a slow
    /// machine), the job runs elsewhere as above.
    StopRunnerBriefly,
    /// Fill the dispatcher's disk (its data dir is a small tmpfs) for a random while, then
    /// empty it: submits are refused, output that cannot be stored waits in the runners and
    /// its jobs pause; all of it goes on by itself once the space is back.
    FillDisk,
    /// SIGKILL the dispatcher, start it again on the same port and data dir.
    KillDispatcher,
    /// SIGTERM the dispatcher (graceful), start it again on the same port and data dir.
    StopDispatcher,
}

/// What the harness did (or why it did not), for the log and the plan's check.
#[derive(Debug)]
enum Done {
    Injected { fault: Fault, what: String },
    Skipped { fault: Fault, why: &'static str },
}

impl std::fmt::Display for Done {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Done::Injected { what, .. } => f.write_str(what),
            Done::Skipped { fault, why } => write!(f, "{fault:?} skipped: {why}"),
        }
    }
}

/// The faults done, one a line.
fn listed(done: &[Done]) -> String {
    done.iter().map(|d| format!("\n  {d}")).collect()
}

/// A dispatcher and three one-slot runners (`c1`..`c3`) on loopback, and what is needed to
/// restart each.
struct Farm {
    tmp: std::path::PathBuf,
    data: std::path::PathBuf,
    addr: String,
    server: Server,
    names: [&'static str; 3],
    runners: Vec<Proc>,
    /// When each runner process was started (ms since the epoch): attempts given to it are
    /// those created since.
    born: Vec<i64>,
    started: Instant,
    /// The data dir's own small file system (`None` where a tmpfs cannot be mounted: the disk
    /// fault is then skipped, and says so). Dropped last.
    disk: Option<Tmpfs>,
}

impl Farm {
    fn start(tmp: &std::path::Path) -> Farm {
        let data = tmp.join("data");
        let disk = Tmpfs::mount(&data, "64m");
        let server = Server::start(
            &data,
            &[SHORT_HEARTBEATS, &["--min-free-space", "1MiB"]].concat(),
        );
        let names = ["c1", "c2", "c3"];
        let born = vec![epoch_ms(); names.len()];
        let runners = names
            .iter()
            .map(|n| server.runner(tmp, n, &["--slots", "1"]))
            .collect();
        server.wait_runners_attached(&names);
        Farm {
            tmp: tmp.to_path_buf(),
            data,
            addr: server.addr.clone(),
            server,
            names,
            runners,
            born,
            started: Instant::now(),
            disk,
        }
    }

    /// Injects one fault; the random source picks the victim and the timings.
    fn inject(&mut self, fault: Fault, rng: &mut Rng) -> Done {
        let at = self.started.elapsed();
        let skipped = |why| Done::Skipped { fault, why };
        let what = match fault {
            Fault::KillRunner => {
                let v = rng.range(0, self.names.len() as u64) as usize;
                self.runners[v].signal(Signal::SIGKILL);
                self.runners[v].wait(LONG);
                self.born[v] = epoch_ms();
                self.runners[v] = self
                    .server
                    .runner(&self.tmp, self.names[v], &["--slots", "1"]);
                format!("SIGKILL runner {} at {at:?}", self.names[v])
            }
            Fault::StopRunnerPastLease | Fault::FreezeRunnerPastLease => {
                // A runner process in the middle of a job of its own that was never lost (so
                // this loss is its first): the first one found from a random start, waiting up
                // to 10 s for one (e.g. while runners re-attach after a dispatcher restart).
                let first = rng.range(0, self.names.len() as u64) as usize;
                let find = || {
                    (0..self.names.len())
                        .map(|i| (first + i) % self.names.len())
                        .find_map(|v| {
                            fresh_running_attempts(&self.data, self.names[v], self.born[v])
                                .first()
                                .map(|&(_, a)| (v, a))
                        })
                };
                let looking = Instant::now();
                let mut busy = find();
                while busy.is_none()
                    && looking.elapsed() < Duration::from_secs(10)
                    && !all_final(&self.data)
                {
                    std::thread::sleep(POLL);
                    busy = find();
                }
                let Some((v, attempt)) = busy else {
                    return skipped("no runner was in the middle of a job");
                };
                let name = self.names[v];
                let stopped = Instant::now();
                let alone = fault == Fault::StopRunnerPastLease;
                let pids = if alone {
                    self.runners[v].signal(Signal::SIGSTOP);
                    vec![self.runners[v].pid()]
                } else {
                    signal_tree(self.runners[v].pid(), Signal::SIGSTOP)
                };
                let data = self.data.clone();
                wait_for(
                    &format!("the dispatcher to declare {name}'s attempt {attempt} lost"),
                    LONG,
                    || match attempt_state(&data, attempt).as_str() {
                        "lost" => Ok(()),
                        s => Err(s.to_string()),
                    },
                );
                let lost_after = stopped.elapsed();
                std::thread::sleep(rng.millis(0, 1500));
                cont(&pids);
                format!(
                    "SIGSTOP runner {name} ({}) at {at:?} in attempt {attempt}: lost after \
                     {lost_after:?}, SIGCONT after {:?}",
                    if alone { "alone" } else { "with its steps" },
                    stopped.elapsed()
                )
            }
            Fault::StopRunnerBriefly => {
                let v = rng.range(0, self.names.len() as u64) as usize;
                let name = self.names[v];
                let lost_before = lost_attempts_of(&self.data, name, self.born[v]);
                let pids = signal_tree(self.runners[v].pid(), Signal::SIGSTOP);
                let pause = rng.millis(50, 400);
                std::thread::sleep(pause);
                cont(&pids);
                let lost: Vec<i64> = lost_attempts_of(&self.data, name, self.born[v])
                    .into_iter()
                    .filter(|a| !lost_before.contains(a))
                    .collect();
                format!(
                    "SIGSTOP runner {name} with its steps ({} processes) at {at:?} for \
                     {pause:?}: {}",
                    pids.len(),
                    if lost.is_empty() {
                        "lease kept".to_string()
                    } else {
                        format!("attempts {lost:?} lost meanwhile")
                    }
                )
            }
            Fault::FillDisk => {
                let Some(disk) = &self.disk else {
                    return skipped("no tmpfs could be mounted for the data dir (not root?)");
                };
                let filler = disk.fill();
                let full = rng.millis(300, 2500);
                std::thread::sleep(full);
                std::fs::remove_file(&filler).unwrap();
                format!("filled the dispatcher's disk at {at:?} for {full:?}")
            }
            Fault::KillDispatcher | Fault::StopDispatcher => {
                let t = Instant::now();
                let sig = if fault == Fault::KillDispatcher {
                    Signal::SIGKILL
                } else {
                    Signal::SIGTERM
                };
                self.server.proc.signal(sig);
                let out = self.server.proc.wait(Duration::from_secs(30));
                if sig == Signal::SIGTERM {
                    assert_eq!(
                        out.status.code(),
                        Some(0),
                        "the dispatcher did not stop cleanly on SIGTERM: {out}"
                    );
                }
                // Down for a random while: jobs go on, their output waits in the runners'
                // outboxes, and runners back off (some come back after the lease).
                let down = rng.millis(200, 2500);
                std::thread::sleep(down);
                self.server = restart_dispatcher_on(
                    &self.addr,
                    &self.data,
                    &[SHORT_HEARTBEATS, &["--min-free-space", "1MiB"]].concat(),
                );
                format!(
                    "{sig:?} dispatcher at {at:?} (down {down:?}, back after {:?})",
                    t.elapsed()
                )
            }
        };
        Done::Injected { fault, what }
    }
}

/// Resumes stopped processes.
fn cont(pids: &[i32]) {
    for &p in pids {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(p), Signal::SIGCONT);
    }
}

/// Thirty-six builds on three runners while a seeded harness SIGKILLs runners (restarting each
/// under the same name), SIGSTOPs busy runners (alone, or with their steps) until the
/// dispatcher declares their attempt lost and then SIGCONTs them, pauses runners with their
/// steps for less than the lease, fills the dispatcher's disk (a tmpfs) and empties it, and
/// kills the dispatcher twice (SIGKILL once, SIGTERM once), each time restarting it on the
/// same port and data dir, so that the runners reconnect by themselves and re-send what the
/// dispatcher had not acknowledged. Afterwards: every build passed once; each job's log holds,
/// per attempt, a prefix of its sequence with no line twice, and the last attempt's sequence
/// whole; no job has two finished attempts in the database; no result of a current attempt was
/// refused; each runner then runs one more build at the same time as the others (a runner that
/// kept the slot of an attempt it dropped would refuse it); every runner drains and exits 0; no
/// step process is left. (A network partition of a runner is
/// the chaos test of `tests/partition.rs`, which needs root.)
///
/// `KILN_CHAOS_SEED=N` replays the same faults (victims, moments, durations); the machine's
/// timing is not replayed.
///
/// The dispatcher is restarted on the same port (tokio binds with SO_REUSEADDR, and the port was
/// just released by the dead dispatcher), which keeps the runners' processes and their outboxes
/// alive across the restart: that is the path worth testing. If another process took the port
/// in the moment between, the test fails saying so.
#[test]
fn chaos_run_kills_runners_and_the_dispatcher() {
    const BUILDS: usize = 36;
    const LINES: u32 = 40;
    let started = Instant::now();
    let deadline = started + Duration::from_secs(240);
    let tmp = tempdir();
    let marker = marker("chaos");
    let _reaper = MarkerReaper(marker.clone());
    let (mut rng, seed) = Rng::from_env_or_clock();
    eprintln!("chaos seed {seed} (replay the same faults with KILN_CHAOS_SEED={seed})");

    let (repo, commits) = counting_repo(&tmp.path().join("repo"), &marker, LINES, BUILDS);

    let mut farm = Farm::start(tmp.path());
    let ids: Vec<u64> = commits
        .iter()
        .map(|c| id_of(&farm.server.submit(&repo.path, c)))
        .collect();

    // The plan: the two dispatcher restarts, three runner kills, two stops past the lease (one
    // of the runner alone, one with its steps) and two brief ones among the first nine faults
    // (while there is surely work), then more kills and stops.
    let mut head = vec![
        Fault::KillDispatcher,
        Fault::StopDispatcher,
        Fault::KillRunner,
        Fault::KillRunner,
        Fault::KillRunner,
        Fault::StopRunnerPastLease,
        Fault::FreezeRunnerPastLease,
        Fault::StopRunnerBriefly,
        Fault::StopRunnerBriefly,
        Fault::FillDisk,
    ];
    let mut tail = vec![
        Fault::KillRunner,
        Fault::KillRunner,
        Fault::KillRunner,
        Fault::StopRunnerPastLease,
        Fault::FreezeRunnerPastLease,
        Fault::StopRunnerBriefly,
        Fault::FillDisk,
    ];
    rng.shuffle(&mut head);
    rng.shuffle(&mut tail);
    head.append(&mut tail);
    let mut done: Vec<Done> = Vec::new();
    for fault in head {
        // A random moment (this is the fault's timing, not a wait for a condition).
        std::thread::sleep(rng.millis(300, 1800));
        if all_final(&farm.data) {
            done.push(Done::Skipped {
                fault,
                why: "all builds had finished",
            });
            continue;
        }
        // Never let one job be lost three times (the dispatcher would end it `errored`, by
        // design): wait until no running job has been lost already.
        if !wait_calm(&farm.data) {
            done.push(Done::Skipped {
                fault,
                why: "jobs already lost were running",
            });
            continue;
        }
        done.push(farm.inject(fault, &mut rng));
    }
    eprintln!("faults:{}", listed(&done));
    let count = |f: Fault| {
        done.iter()
            .filter(|d| matches!(d, Done::Injected { fault, .. } if *fault == f))
            .count()
    };
    let (restarts, kills, stops_long, freezes, stops_brief) = (
        count(Fault::KillDispatcher) + count(Fault::StopDispatcher),
        count(Fault::KillRunner),
        count(Fault::StopRunnerPastLease),
        count(Fault::FreezeRunnerPastLease),
        count(Fault::StopRunnerBriefly),
    );
    let (fills, fills_needed) = (count(Fault::FillDisk), usize::from(farm.disk.is_some()));
    assert!(
        restarts == 2
            && kills >= 3
            && stops_long >= 1
            && freezes >= 1
            && stops_brief >= 2
            && fills >= fills_needed,
        "the chaos did not happen as planned (too little work?):{}",
        listed(&done)
    );

    // Everything ends, passed, within the deadline.
    let remaining = deadline.saturating_duration_since(Instant::now());
    let server = &farm.server;
    let builds = wait_builds_final(server, BUILDS, remaining);
    let not_passed: Vec<String> = builds
        .iter()
        .filter(|b| b["state"] != "passed")
        .map(|b| b.to_string())
        .collect();
    let mut problems = Vec::new();
    let mut tally = Tally::default();
    check_builds(server, &ids, "count", LINES, &mut tally, &mut problems);
    every_runner_takes_work(server, &repo, &farm.names, &marker, &mut problems);

    // Stop everything, cleanly: runners drain (nothing is left to run), then the dispatcher.
    for r in &mut farm.runners {
        r.signal(Signal::SIGTERM);
    }
    for r in &mut farm.runners {
        let out = r.wait(Duration::from_secs(30));
        if out.status.code() != Some(0) {
            problems.push(format!(
                "{} did not drain and exit 0: {}",
                r.name, out.status
            ));
        }
    }
    farm.server.proc.signal(Signal::SIGTERM);
    let out = farm.server.proc.wait(Duration::from_secs(30));
    if out.status.code() != Some(0) {
        problems.push(format!("the dispatcher did not exit 0 on SIGTERM: {out}"));
    }
    check_attempt_rows(&farm.data, &mut tally, &mut problems);

    // No step process outlived its runner (orphans of a killed runner die on their next write).
    let left = wait_for_none(&marker);
    if !left.is_empty() {
        problems.push(format!("step processes left behind: {left:?}"));
    }

    eprintln!(
        "chaos: {BUILDS} builds; faults: {kills} runner SIGKILLs, {stops_long} runner SIGSTOPs \
         past the lease (runner alone), {freezes} with its steps, {stops_brief} brief SIGSTOPs \
         with its steps, {fills} disk fills, {restarts} dispatcher restarts; {} attempts, {} lost, \
         {} refusals, {:?} in all",
        tally.attempts,
        tally.lost,
        tally.refusals,
        started.elapsed()
    );
    assert!(not_passed.is_empty(), "builds not passed: {not_passed:#?}");
    assert!(problems.is_empty(), "seed {seed}: {problems:#?}");
}

// ---------------------------------------------------------------------------------------------
// Cancel, deadline, death, drain, hand-back
// ---------------------------------------------------------------------------------------------

/// `kiln cancel` of a step sleeping silently: the build ends `cancelled` within the grace
/// period, its `post: always` step ran and passed, its `post: failure` step was skipped, and
/// the sleeping process is gone.
#[test]
fn cancel_runs_post_always_and_skips_post_failure() {
    let tmp = tempdir();
    let marker = marker("cancel");
    let _reaper = MarkerReaper(marker.clone());
    let pipeline = format!(
        "steps:\n\
         \x20 - name: main\n    env:\n      {marker}: \"1\"\n    run: |\n      echo \"main started\"\n      sleep 300\n\
         \x20 - name: cleanup\n    post: always\n    run: echo \"post-always ran\"\n\
         \x20 - name: on-failure\n    post: failure\n    run: echo \"post-failure ran\"\n"
    );
    let (repo, sha) = Repo::with_pipeline(&tmp.path().join("repo"), &pipeline);
    let server = Server::start(&tmp.path().join("data"), SHORT_HEARTBEATS);
    let _r = server.runner(tmp.path(), "r1", &[]);
    server.wait_runners_attached(&["r1"]);
    let id = id_of(&server.submit(&repo.path, &sha));
    wait_log(&server, id, "main started\n");

    let t = Instant::now();
    server.cli(&["cancel", &id.to_string()]).expect_code(0);
    let b = server.wait_final(id, Duration::from_secs(15));
    let took = t.elapsed();
    assert_eq!(b["state"], "cancelled", "{b}");
    let job = job0(&b);
    assert_eq!(job["state"], "cancelled", "{b}");
    let outcomes: Vec<&str> = job["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["outcome"].as_str().unwrap_or("pending"))
        .collect();
    assert_eq!(outcomes, ["cancelled", "passed", "skipped"], "{b}");
    let text = logs(&server, id);
    assert!(text.contains("post-always ran\n"), "{text}");
    assert!(!text.contains("post-failure ran"), "{text}");
    server.cli(&["show", &id.to_string()]).expect_code(3);
    wait_no_processes(
        "the cancelled step's processes to go",
        Duration::from_secs(10),
        || processes_with(&marker),
    );
    eprintln!("cancel took {took:?}");
}

/// A runner wedged (SIGSTOP, with its steps) in a step with a timeout, while its session stays
/// within its lease: the dispatcher ends the job `timed_out` itself at the step's timeout plus
/// its slack (30 s by default, not configurable from the command line). Once the runner runs
/// again, its late report is refused (recorded in `refusals`) and the job stays `timed_out`.
#[test]
fn dispatcher_ends_a_wedged_runners_job_at_its_deadline() {
    let tmp = tempdir();
    let marker = marker("deadline");
    let _reaper = MarkerReaper(marker.clone());
    let pipeline = one_step(
        "hang",
        &marker,
        "echo \"hang started\"\nsleep 300",
        "    timeout: 3s\n",
    );
    let (repo, sha) = Repo::with_pipeline(&tmp.path().join("repo"), &pipeline);
    // A lease (60 s) longer than the step's deadline (3 s + 30 s): the stopped runner is not
    // declared lost first.
    let server = Server::start(
        &tmp.path().join("data"),
        &["--heartbeat-interval", "20s", "--missed-heartbeats", "3"],
    );
    let runner = server.runner(tmp.path(), "r1", &[]);
    server.wait_runners_attached(&["r1"]);
    let id = id_of(&server.submit(&repo.path, &sha));
    wait_log(&server, id, "hang started\n");
    let stopped = signal_tree(runner.pid(), Signal::SIGSTOP);
    let t = Instant::now();
    let b = server.show(id);
    let attempt = job0(&b)["attempt_id"].as_u64().unwrap();
    assert_eq!(
        b["state"], "running",
        "the runner ended the step before it was stopped: {b}"
    );

    let b = server.wait_final(id, Duration::from_secs(90));
    let waited = t.elapsed();
    signal_tree(runner.pid(), Signal::SIGCONT);
    for p in stopped {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(p), Signal::SIGCONT);
    }
    let job = job0(&b);
    assert_eq!(b["state"], "timed_out", "{b}");
    assert!(
        job["message"].as_str().unwrap().contains("dispatcher"),
        "the job was not ended by the dispatcher: {b}"
    );
    eprintln!("the dispatcher ended the wedged job after {waited:?}");

    let b = server.wait_build(id, "the late report to be refused", LONG, |b| {
        !job0(b)["refusals"].as_array().unwrap().is_empty()
    });
    let job = job0(&b);
    assert_eq!(b["state"], "timed_out", "{b}");
    assert_eq!(job["attempt_id"], attempt, "{b}");
    let refusals = job["refusals"].to_string();
    eprintln!("refusals: {refusals}");
    assert!(refusals.contains(&attempt.to_string()), "{b}");
    // The runner is usable again and its step is gone.
    server.wait_runners_attached(&["r1"]);
    wait_no_processes("the timed-out step's processes to go", LONG, || {
        processes_with(&marker)
    });
    assert_eq!(server.show(id)["state"], "timed_out");
}

/// A runner SIGKILLed in the middle of a job: the dispatcher notices, the job runs again on the
/// other runner and passes, counted as one lost attempt.
#[test]
fn killed_runners_job_passes_elsewhere_with_one_lost_attempt() {
    let tmp = tempdir();
    let mut m = MovingJob::start(tmp.path(), "death");
    m.runners[m.victim].signal(Signal::SIGKILL);
    m.runners[m.victim].wait(LONG);
    let b = m.passes_on_the_survivor();
    assert_eq!(job0(&b)["lost_attempts"], 1, "{b}");
}

/// `kiln runners drain` on a runner (with a free slot) in the middle of a job: no new job goes
/// to it, its job passes, and it exits 0 by itself; the waiting job runs on the next runner.
#[test]
fn drained_runner_finishes_its_job_takes_no_more_and_exits() {
    let tmp = tempdir();
    let marker = marker("drain");
    let _reaper = MarkerReaper(marker.clone());
    let flag = tmp.path().join("go");
    let pipeline = waiting_step(&marker, &flag);
    let (repo, sha) = Repo::with_pipeline(&tmp.path().join("repo"), &pipeline);
    let sha2 = repo.commit(&[("second.txt", b"2")], "second");
    let server = Server::start(&tmp.path().join("data"), SHORT_HEARTBEATS);
    let mut r1 = server.runner(tmp.path(), "r1", &["--slots", "2"]);
    server.wait_runners_attached(&["r1"]);
    let a = id_of(&server.submit(&repo.path, &sha));
    let b = server.wait_build(a, "running on r1", LONG, |b| b["state"] == "running");
    let attempt = job0(&b)["attempt_id"].as_u64().unwrap();
    wait_log(&server, a, &format!("attempt {attempt} starts\n"));

    let out = server.cli(&["runners", "drain", "r1"]);
    out.expect_code(0);
    assert!(out.out().contains("r1 is draining"), "{out}");
    let states = runner_states(&server.url, &[]).unwrap();
    assert!(
        states.contains(&("r1".into(), "draining".into())),
        "{states:?}"
    );

    // r1 has a free slot, but it is draining: the second build waits.
    let second = id_of(&server.submit(&repo.path, &sha2));
    let watch = Instant::now();
    while watch.elapsed() < Duration::from_millis(1500) {
        let b = server.show(second);
        assert_eq!(b["state"], "queued", "a draining runner got work: {b}");
        std::thread::sleep(POLL);
    }
    std::fs::write(&flag, b"").unwrap();
    let out = r1.wait(LONG);
    assert_eq!(
        out.status.code(),
        Some(0),
        "the drained runner did not exit 0: {out}"
    );
    let b = server.show(a);
    assert_eq!(b["state"], "passed", "{b}");
    assert_eq!(job0(&b)["attempts"], 1, "{b}");
    assert_eq!(job0(&b)["runner"], "r1", "{b}");
    let b = server.show(second);
    assert_eq!(b["state"], "queued", "{b}");
    assert_eq!(job0(&b)["attempts"], 0, "{b}");

    let _r2 = server.runner(tmp.path(), "r2", &[]);
    let b = server.wait_final(second, LONG);
    assert_eq!(b["state"], "passed", "{b}");
    assert_eq!(job0(&b)["runner"], "r2", "{b}");
}

/// A runner in a long job gets SIGTERM twice: the first drains, the second kills the job's
/// steps and hands the job back; it runs again on the other runner and passes (two attempts),
/// and the first attempt's processes are gone.
#[test]
fn second_sigterm_hands_the_job_back() {
    let tmp = tempdir();
    let mut m = MovingJob::start(tmp.path(), "handback");
    let (v, first, marker) = (m.victim, m.first, m.marker.clone());
    let runners = &mut m.runners;

    runners[v].signal(Signal::SIGTERM);
    wait_for("the runner to start draining", LONG, || {
        let err = String::from_utf8_lossy(&runners[v].stderr()).into_owned();
        if err.contains("draining") {
            Ok(())
        } else {
            Err(err)
        }
    });
    runners[v].signal(Signal::SIGTERM);
    let out = runners[v].wait(LONG);
    assert_eq!(out.status.code(), Some(0), "{out}");
    wait_no_processes(
        "the handed-back attempt's processes to go",
        Duration::from_secs(10),
        || attempt_processes(&marker, first),
    );
    m.passes_on_the_survivor();
}

//! Fault tolerance, end to end: runners and the dispatcher killed while builds run (a seeded
//! chaos run), a user's cancel with post steps, the dispatcher's own deadline on a wedged
//! runner, a runner's death, a drain, and a runner's hard stop that hands its job back.
//!
//! Every test runs real `kiln` processes on loopback ports against git repositories in temp
//! dirs, and waits on conditions with deadlines.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod fault_support;

use std::time::{Duration, Instant};

use common::*;
use fault_support::*;
use nix::sys::signal::Signal;

/// Runners are declared lost after about a second of silence.
const SHORT_HEARTBEATS: &[&str] = &["--heartbeat-interval", "300ms", "--missed-heartbeats", "3"];

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
    server
        .cli(&["logs", "--all-attempts", &id.to_string()])
        .out()
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

/// Processes of one attempt's steps still alive (found by the marker and the attempt id in
/// their environment).
fn attempt_processes(marker: &str, attempt: u64) -> Vec<(i32, String)> {
    let want = format!("KILN_ATTEMPT_ID={attempt}\0");
    processes_with(marker)
        .into_iter()
        .filter(|(pid, _)| {
            let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
            contains(&env, want.as_bytes())
        })
        .collect()
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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// SIGKILL one runner process (its steps become orphans), start a new one with its name.
    KillRunner,
    /// SIGKILL the dispatcher, start it again on the same port and data dir.
    KillDispatcher,
    /// SIGTERM the dispatcher (graceful), start it again on the same port and data dir.
    StopDispatcher,
}

const FINAL: &str = "('passed','failed','cancelled','timed_out','errored','skipped')";

/// Jobs that the next fault could push towards the dispatcher's limit (the third lost attempt
/// ends a job `errored`, by design): running jobs already lost once, and unfinished jobs lost
/// twice. The harness injects a fault only when there are none, so no job is lost three times.
fn risky_jobs(data: &std::path::Path) -> i64 {
    let db = open_db(data);
    int_rows(
        &db,
        &format!(
            "SELECT COUNT(*) FROM jobs WHERE \
             (state IN ('assigned', 'running') AND lost_attempts > 0) \
             OR (state NOT IN {FINAL} AND lost_attempts > 1)"
        ),
    )[0][0]
}

/// Thirty builds on three runners while a seeded harness SIGKILLs runners (restarting each
/// under the same name) and kills the dispatcher twice (SIGKILL once, SIGTERM once), each time
/// restarting it on the same port and data dir, so that the runners reconnect by themselves and
/// re-send what the dispatcher had not acknowledged. Afterwards: every build passed once; each
/// job's log holds, per attempt, a prefix of its sequence with no line twice, and the last
/// attempt's sequence whole; no job has two finished attempts in the database; no step process
/// is left.
///
/// The dispatcher is restarted on the same port (tokio binds with SO_REUSEADDR, and the port was
/// just released by the dead dispatcher), which keeps the runners' processes and their outboxes
/// alive across the restart: that is the path worth testing. If another process took the port
/// in the moment between, the test fails saying so.
#[test]
fn chaos_run_kills_runners_and_the_dispatcher() {
    const BUILDS: usize = 30;
    const LINES: u32 = 40;
    let started = Instant::now();
    let deadline = started + Duration::from_secs(180);
    let tmp = tempdir();
    let marker = marker("chaos");
    let _reaper = MarkerReaper(marker.clone());
    let (mut rng, seed) = Rng::from_env_or_clock();
    eprintln!("chaos seed {seed} (replay the same faults with KILN_CHAOS_SEED={seed})");

    let pipeline = one_step(
        "count",
        &marker,
        &format!(": {marker}\nfor i in $(seq 1 {LINES}); do echo \"line $i\"; sleep 0.05; done"),
        "",
    );
    let (repo, first) = Repo::with_pipeline(&tmp.path().join("repo"), &pipeline);
    let mut commits = vec![first];
    for i in 1..BUILDS {
        commits.push(repo.commit(&[("n.txt", i.to_string().as_bytes())], &format!("c{i}")));
    }

    let data = tmp.path().join("data");
    let mut server = Server::start(&data, SHORT_HEARTBEATS);
    let addr = server.addr.clone();
    let names = ["c1", "c2", "c3"];
    let mut runners: Vec<Proc> = names
        .iter()
        .map(|n| server.runner(tmp.path(), n, &["--slots", "1"]))
        .collect();
    server.wait_runners_attached(&names);
    let ids: Vec<u64> = commits
        .iter()
        .map(|c| id_of(&server.submit(&repo.path, c)))
        .collect();

    // The plan: seven runner kills and the two dispatcher restarts among the first five faults.
    let mut plan = vec![Fault::KillRunner; 7];
    let mut head = vec![
        Fault::KillDispatcher,
        Fault::StopDispatcher,
        Fault::KillRunner,
        Fault::KillRunner,
        Fault::KillRunner,
    ];
    rng.shuffle(&mut head);
    head.append(&mut plan.split_off(3));
    let plan = head;
    let mut done: Vec<String> = Vec::new();
    let all_final = |data: &std::path::Path| {
        let db = open_db(data);
        int_rows(
            &db,
            &format!("SELECT COUNT(*) FROM jobs WHERE state NOT IN {FINAL}"),
        )[0][0]
            == 0
    };
    for fault in plan {
        // A random moment (this is the fault's timing, not a wait for a condition).
        std::thread::sleep(rng.millis(400, 2200));
        if all_final(&data) {
            done.push(format!("{fault:?} skipped: all builds had finished"));
            continue;
        }
        // Never let one job be lost three times (the dispatcher would end it `errored`, by
        // design): wait until no running job has been lost already.
        let calm = Instant::now();
        while risky_jobs(&data) > 0 && calm.elapsed() < Duration::from_secs(15) {
            std::thread::sleep(POLL);
        }
        if risky_jobs(&data) > 0 {
            done.push(format!("{fault:?} skipped: jobs already lost were running"));
            continue;
        }
        let t = Instant::now();
        match fault {
            Fault::KillRunner => {
                let v = rng.range(0, names.len() as u64) as usize;
                runners[v].signal(Signal::SIGKILL);
                runners[v].wait(LONG);
                runners[v] = server.runner(tmp.path(), names[v], &["--slots", "1"]);
                done.push(format!(
                    "SIGKILL runner {} at {:?}",
                    names[v],
                    started.elapsed()
                ));
            }
            Fault::KillDispatcher | Fault::StopDispatcher => {
                let sig = if fault == Fault::KillDispatcher {
                    Signal::SIGKILL
                } else {
                    Signal::SIGTERM
                };
                server.proc.signal(sig);
                let out = server.proc.wait(Duration::from_secs(30));
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
                server = restart_dispatcher_on(&addr, &data, SHORT_HEARTBEATS);
                done.push(format!(
                    "{sig:?} dispatcher at {:?} (down {down:?}, back after {:?})",
                    started.elapsed(),
                    t.elapsed()
                ));
            }
        }
    }
    eprintln!("faults: {done:#?}");
    let restarts = done.iter().filter(|d| d.contains("dispatcher at")).count();
    let kills = done
        .iter()
        .filter(|d| d.starts_with("SIGKILL runner"))
        .count();
    assert!(
        restarts == 2 && kills >= 3,
        "the chaos did not happen as planned (too little work?): {done:#?}"
    );

    // Everything ends, passed, within the deadline.
    let remaining = deadline.saturating_duration_since(Instant::now());
    let builds = wait_for("every build to finish", remaining, || {
        let out = server.cli(&["--json", "builds", "--limit", "100"]);
        if out.status.code() != Some(0) {
            return Err(out.to_string());
        }
        let v = out.json();
        let list = v["builds"].as_array().unwrap().clone();
        let unfinished: Vec<String> = list
            .iter()
            .filter(|b| matches!(b["state"].as_str(), Some("queued" | "running" | "assigned")))
            .map(|b| format!("{}:{}", b["id"], b["state"]))
            .collect();
        if list.len() == BUILDS && unfinished.is_empty() {
            Ok(list)
        } else {
            Err(format!("{} builds, unfinished: {unfinished:?}", list.len()))
        }
    });
    let not_passed: Vec<String> = builds
        .iter()
        .filter(|b| b["state"] != "passed")
        .map(|b| b.to_string())
        .collect();

    let mut problems = Vec::new();
    let mut total_attempts = 0;
    let mut total_lost = 0;
    for &id in &ids {
        let b = server.show(id);
        let job = job0(&b);
        if b["state"] != "passed" || job["state"] != "passed" {
            problems.push(format!("build {id} did not pass: {b}"));
            continue;
        }
        let attempts = job["attempts"].as_u64().unwrap() as u32;
        total_attempts += attempts;
        total_lost += job["lost_attempts"].as_u64().unwrap();
        let text = logs(&server, id);
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
        if numbers != (1..=LINES).collect::<Vec<_>>()
            || last.attempt != attempts
            || job["runner"] != last.runner.as_str()
            || !last.text.contains("kiln: step count exit 0")
        {
            problems.push(format!(
                "build {id}: the last attempt's log is not the whole passing sequence of attempt \
                 {attempts} on {}:\n{}",
                job["runner"], last.text
            ));
        }
    }

    // Stop everything, cleanly: runners drain (nothing is left to run), then the dispatcher.
    for r in &mut runners {
        r.signal(Signal::SIGTERM);
    }
    for r in &mut runners {
        let out = r.wait(Duration::from_secs(30));
        if out.status.code() != Some(0) {
            problems.push(format!(
                "{} did not drain and exit 0: {}",
                r.name, out.status
            ));
        }
    }
    server.proc.signal(Signal::SIGTERM);
    let out = server.proc.wait(Duration::from_secs(30));
    if out.status.code() != Some(0) {
        problems.push(format!("the dispatcher did not exit 0 on SIGTERM: {out}"));
    }

    // The database: exactly one finished attempt per job, and it is the current one.
    let db = open_db(&data);
    let twice = int_rows(
        &db,
        "SELECT job_id, COUNT(*) FROM attempts WHERE state = 'finished' \
         GROUP BY job_id HAVING COUNT(*) > 1",
    );
    if !twice.is_empty() {
        problems.push(format!(
            "jobs with several finished attempts (job, count): {twice:?}"
        ));
    }
    let unsettled = int_rows(
        &db,
        "SELECT j.id FROM jobs j JOIN attempts a ON a.id = j.current_attempt \
         WHERE a.state <> 'finished'",
    );
    if !unsettled.is_empty() {
        problems.push(format!(
            "jobs whose current attempt is not finished: {unsettled:?}"
        ));
    }
    let miscounted = int_rows(
        &db,
        "SELECT j.id, j.attempts, (SELECT COUNT(*) FROM attempts a WHERE a.job_id = j.id) \
         FROM jobs j WHERE j.attempts <> (SELECT COUNT(*) FROM attempts a WHERE a.job_id = j.id)",
    );
    if !miscounted.is_empty() {
        problems.push(format!(
            "jobs whose attempt count differs from their attempts (job, count, rows): {miscounted:?}"
        ));
    }
    let refused_current = int_rows(
        &db,
        "SELECT r.job_id, r.attempt_id FROM refusals r JOIN jobs j ON j.id = r.job_id \
         WHERE r.attempt_id = j.current_attempt",
    );
    if !refused_current.is_empty() {
        problems.push(format!(
            "results of current attempts were refused (job, attempt): {refused_current:?}"
        ));
    }
    let refusals = int_rows(&db, "SELECT COUNT(*) FROM refusals")[0][0];
    drop(db);

    // No step process outlived its runner (orphans of a killed runner die on their next write).
    let left = wait_for_none(&marker);
    if !left.is_empty() {
        problems.push(format!("step processes left behind: {left:?}"));
    }

    eprintln!(
        "chaos: {BUILDS} builds, {total_attempts} attempts, {total_lost} lost, {refusals} refusals, \
         {:?} in all",
        started.elapsed()
    );
    assert!(not_passed.is_empty(), "builds not passed: {not_passed:#?}");
    assert!(problems.is_empty(), "seed {seed}: {problems:#?}");
}

/// Waits a little for processes carrying `marker` to go; returns those still there.
fn wait_for_none(marker: &str) -> Vec<(i32, String)> {
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
    let marker = marker("death");
    let _reaper = MarkerReaper(marker.clone());
    let flag = tmp.path().join("go");
    let pipeline = one_step(
        "wait",
        &marker,
        &format!(
            "echo \"attempt $KILN_ATTEMPT_ID starts\"\n{}\necho \"attempt $KILN_ATTEMPT_ID done\"",
            wait_flag_sh(&flag)
        ),
        "",
    );
    let (repo, sha) = Repo::with_pipeline(&tmp.path().join("repo"), &pipeline);
    let server = Server::start(&tmp.path().join("data"), SHORT_HEARTBEATS);
    let mut runners = [
        server.runner(tmp.path(), "r1", &[]),
        server.runner(tmp.path(), "r2", &[]),
    ];
    server.wait_runners_attached(&["r1", "r2"]);
    let id = id_of(&server.submit(&repo.path, &sha));
    let b = server.wait_build(id, "running", LONG, |b| b["state"] == "running");
    let first = job0(&b)["attempt_id"].as_u64().unwrap();
    let victim = job0(&b)["runner"].as_str().unwrap().to_string();
    let (v, survivor) = if victim == "r1" { (0, "r2") } else { (1, "r1") };
    wait_log(&server, id, &format!("attempt {first} starts\n"));

    runners[v].signal(Signal::SIGKILL);
    runners[v].wait(LONG);
    let b = server.wait_build(id, &format!("the job to move to {survivor}"), LONG, |b| {
        job0(b)["runner"] == survivor && job0(b)["attempts"] == 2
    });
    let second = job0(&b)["attempt_id"].as_u64().unwrap();
    wait_log(&server, id, &format!("attempt {second} starts\n"));
    std::fs::write(&flag, b"").unwrap();
    let b = server.wait_final(id, LONG);
    let job = job0(&b);
    assert_eq!(b["state"], "passed", "{b}");
    assert_eq!(job["attempts"], 2, "{b}");
    assert_eq!(job["lost_attempts"], 1, "{b}");
    assert_eq!(job["runner"], survivor, "{b}");
    let text = logs(&server, id);
    assert!(text.contains(&format!("attempt {second} done\n")), "{text}");
    assert!(!text.contains(&format!("attempt {first} done\n")), "{text}");
}

/// `kiln runners drain` on a runner (with a free slot) in the middle of a job: no new job goes
/// to it, its job passes, and it exits 0 by itself; the waiting job runs on the next runner.
#[test]
fn drained_runner_finishes_its_job_takes_no_more_and_exits() {
    let tmp = tempdir();
    let marker = marker("drain");
    let _reaper = MarkerReaper(marker.clone());
    let flag = tmp.path().join("go");
    let pipeline = one_step(
        "wait",
        &marker,
        &format!(
            "echo \"attempt $KILN_ATTEMPT_ID starts\"\n{}\necho \"attempt $KILN_ATTEMPT_ID done\"",
            wait_flag_sh(&flag)
        ),
        "",
    );
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
    let marker = marker("handback");
    let _reaper = MarkerReaper(marker.clone());
    let flag = tmp.path().join("go");
    let pipeline = one_step(
        "wait",
        &marker,
        &format!(
            "echo \"attempt $KILN_ATTEMPT_ID starts\"\n{}\necho \"attempt $KILN_ATTEMPT_ID done\"",
            wait_flag_sh(&flag)
        ),
        "",
    );
    let (repo, sha) = Repo::with_pipeline(&tmp.path().join("repo"), &pipeline);
    let server = Server::start(&tmp.path().join("data"), SHORT_HEARTBEATS);
    let mut runners = [
        server.runner(tmp.path(), "r1", &[]),
        server.runner(tmp.path(), "r2", &[]),
    ];
    server.wait_runners_attached(&["r1", "r2"]);
    let id = id_of(&server.submit(&repo.path, &sha));
    let b = server.wait_build(id, "running", LONG, |b| b["state"] == "running");
    let first = job0(&b)["attempt_id"].as_u64().unwrap();
    let victim = job0(&b)["runner"].as_str().unwrap().to_string();
    let (v, survivor) = if victim == "r1" { (0, "r2") } else { (1, "r1") };
    wait_log(&server, id, &format!("attempt {first} starts\n"));

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
    let b = server.wait_build(id, &format!("the job to go to {survivor}"), LONG, |b| {
        job0(b)["runner"] == survivor && job0(b)["attempts"] == 2
    });
    let second = job0(&b)["attempt_id"].as_u64().unwrap();
    wait_log(&server, id, &format!("attempt {second} starts\n"));
    std::fs::write(&flag, b"").unwrap();
    let b = server.wait_final(id, LONG);
    let job = job0(&b);
    assert_eq!(b["state"], "passed", "{b}");
    assert_eq!(job["attempts"], 2, "{b}");
    assert_eq!(job["runner"], survivor, "{b}");
    let text = logs(&server, id);
    assert!(text.contains(&format!("attempt {second} done\n")), "{text}");
    assert!(!text.contains(&format!("attempt {first} done\n")), "{text}");
}

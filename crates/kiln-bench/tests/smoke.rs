//! Keeps `kiln-bench` compiling and working: `kiln-bench all --quick`, `kiln-bench split
//! --quick`, a small `kiln-bench scale` and a small `kiln-bench scale --sessions` (tiny sizes,
//! both backends) must exit 0 and print every section and figure. Their figures are not
//! checked: timing belongs in BENCHMARKS.md, not in tests. A small `kiln-bench failover
//! --postgres` is checked further: every moved runner has a time (within the round's
//! patience, not against the goal), and no job was lost.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Runs `kiln-bench ARGS...` (against the `kiln` binary cargo built beside it) with a time
/// limit; returns its exit code (None: timed out), stdout and
/// stderr.
fn run_bench(args: &[&str], limit: Duration) -> (Option<i32>, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_kiln-bench"))
        .args(args)
        .env_remove("KILN_BENCH_KEEP")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start kiln-bench");
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if Instant::now() > deadline {
            // SIGTERM: the benchmark kills its children on the way out.
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            std::thread::sleep(Duration::from_secs(5));
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let (out, err) = (out.join().unwrap(), err.join().unwrap());
    (status.map(|s| s.code().unwrap_or(-1)), out, err)
}

#[test]
fn bench_all_quick_runs_every_benchmark() {
    // Generous: the debug build on a busy machine. The benchmark bounds itself too.
    let (status, out, err) = run_bench(&["all", "--quick"], Duration::from_secs(180));
    let status = status.unwrap_or_else(|| panic!("kiln-bench all --quick timed out\n{out}\n{err}"));
    assert_eq!(status, 0, "kiln-bench all --quick failed\n{out}\n{err}");
    for section in [
        "idle",
        "logs",
        "tail",
        "latency",
        "throughput",
        "overhead",
        "runners",
        "trigger",
        "failover",
    ] {
        assert!(
            out.contains(&format!("== {section}:")),
            "no {section} section\n{out}"
        );
        assert!(
            out.contains(&format!("bench {section}: done")),
            "{section} not done\n{out}"
        );
    }
    for figure in [
        "dispatcher CPU, idle runners",
        "disk per MB of output",
        "whole read (replay)",
        "tail of 2 MB, indexed",
        "MB / 2 MB tail, indexed",
        "p50",
        "p99",
        "follower rate",
        "complete (sha256)",
        "dispatcher peak RSS",
        "per-job overhead, median",
        "all welcomed after",
        "kill -> running elsewhere, median",
        "listening -> all attached, max",
    ] {
        assert!(out.contains(figure), "no {figure:?} figure\n{out}");
    }
}

#[test]
fn bench_split_quick_runs_every_scenario() {
    // Scale 0.05 (a 4.5 s suite), N = 1 and 4: about half a minute in a debug build.
    let (status, out, err) = run_bench(&["split", "--quick"], Duration::from_secs(240));
    let status =
        status.unwrap_or_else(|| panic!("kiln-bench split --quick timed out\n{out}\n{err}"));
    assert_eq!(status, 0, "kiln-bench split --quick failed\n{out}\n{err}");
    assert!(out.contains("== split:"), "no split section\n{out}");
    for figure in [
        "dynamic N=1: makespan/bound",
        "dynamic N=4: makespan/bound",
        "hash / dynamic, N=4",
        "count / dynamic, N=4",
        "timing / dynamic, N=4",
        "per-unit overhead N=4, median",
        "flaky found / failed once",
        "deterministic labelled flaky",
        "broken: retry / first pass",
        "kill: one final verdict each",
        "kill: makespan",
    ] {
        assert!(out.contains(figure), "no {figure:?} figure\n{out}");
    }
    assert!(!out.contains("WRONG"), "wrong results\n{out}");
}

#[test]
fn bench_scale_small_prints_every_operation_per_stage() {
    for backend in [None, Some("--postgres")] {
        let mut args = vec!["scale", "--builds", "200,400", "--samples", "10"];
        args.extend(backend);
        let (status, out, err) = run_bench(&args, Duration::from_secs(180));
        let status =
            status.unwrap_or_else(|| panic!("kiln-bench {args:?} timed out\n{out}\n{err}"));
        assert_eq!(status, 0, "kiln-bench {args:?} failed\n{out}\n{err}");
        let name = if backend.is_some() {
            "PostgreSQL, fsync on"
        } else {
            "SQLite"
        };
        assert!(
            out.contains("== scale:") && out.contains(name),
            "{args:?}\n{out}"
        );
        for stage in ["-- 200 stored builds", "-- 400 stored builds"] {
            assert!(out.contains(stage), "no {stage:?}\n{out}");
        }
        for figure in [
            "submit (create_build)",
            "observer push (record_commits)",
            "decision (assign..finish)",
            "get_build",
            "list_builds, first 50",
            "list_builds, one repo",
            "list_runners",
            "metrics (a scrape)",
        ] {
            assert_eq!(
                out.matches(figure).count(),
                2,
                "{figure:?} once per stage\n{out}"
            );
        }
    }
}

#[test]
fn bench_scale_sessions_small_prints_every_figure_per_stage() {
    // SQLite, PostgreSQL, and three dispatchers on one PostgreSQL (runners and submits spread
    // over them), each with two submitters at once (concurrent submits and results on
    // PostgreSQL failed one another's serializable transactions before the store's writes
    // ran at READ COMMITTED: BENCHMARKS.md, `kiln-bench scale --sessions`).
    // And PostgreSQL through the relay that delays each direction (a database on another
    // host), which prints the round trip it measured.
    let runs: [(&[&str], &str, [u32; 2]); 4] = [
        (&[], "SQLite", [1, 2]),
        (&["--postgres"], "PostgreSQL, fsync on", [1, 2]),
        (
            &["--postgres", "--pg-delay-us", "250"],
            "a round trip (SELECT 1) p50",
            [1, 2],
        ),
        (
            &["--postgres", "--dispatchers", "3"],
            "3 dispatchers on one database",
            [1, 3],
        ),
    ];
    for (backend, name, stages) in runs {
        let sessions = format!("{},{}", stages[0], stages[1]);
        let mut args = vec![
            "scale",
            "--submitters",
            "2",
            "--sessions",
            &sessions,
            "--builds",
            "20,50",
            "--jobs",
            "5",
            "--samples",
            "10",
        ];
        args.extend(backend);
        let (status, out, err) = run_bench(&args, Duration::from_secs(180));
        let status =
            status.unwrap_or_else(|| panic!("kiln-bench {args:?} timed out\n{out}\n{err}"));
        assert_eq!(status, 0, "kiln-bench {args:?} failed\n{out}\n{err}");
        assert!(
            out.contains("== scale-sessions:") && out.contains(name),
            "{args:?}\n{out}"
        );
        for stage in ["-- 20 stored builds", "-- 50 stored builds"] {
            assert!(out.contains(stage), "no {stage:?}\n{out}");
        }
        for figure in [
            "assignments/s",
            "jobs ended/s",
            // Padded: the summary's heading names it in parentheses.
            "dispatcher CPU per job  ",
            "submit p50 / p99",
            "GetBuild p50 / p99",
            "ListBuilds p50 / p99",
            "dispatcher RSS / peak",
            // Padded: "dispatcher CPU per job" is another figure.
            "dispatcher CPU   ",
        ] {
            assert_eq!(
                out.matches(figure).count(),
                4,
                "{figure:?} once per stage (2 levels x 2 runner counts)\n{out}"
            );
        }
        for runners in stages {
            assert!(
                out.contains(&format!("decision ratio, {runners} runners:")),
                "no decision ratio for {runners} runners\n{out}"
            );
        }
    }
}

/// The value of the figure `label` (`  LABEL   VALUE   goal ...`) in `out`, as printed.
fn figure_value<'a>(out: &'a str, label: &str) -> Option<&'a str> {
    out.lines()
        .find_map(|l| l.trim_start().strip_prefix(label))
        .map(|rest| rest.trim_start())
        .and_then(|rest| rest.split("   ").next())
        .map(str::trim)
}

/// Seconds of a figure printed as `1.23 s`.
fn seconds(out: &str, label: &str) -> f64 {
    let v = figure_value(out, label).unwrap_or_else(|| panic!("no {label:?} figure\n{out}"));
    v.strip_suffix(" s")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{label:?} is {v:?}, not seconds\n{out}"))
}

#[test]
fn bench_failover_postgres_small_moves_every_runner_and_loses_nothing() {
    // Three dispatchers, three runners, two SIGKILL rounds and two baseline rounds; no SIGSTOP
    // round (each takes over half a minute: BENCHMARKS.md).
    let args = [
        "failover",
        "--postgres",
        "--rounds",
        "2",
        "--stop-rounds",
        "0",
        "--runners",
        "3",
    ];
    let (status, out, err) = run_bench(&args, Duration::from_secs(300));
    let status = status.unwrap_or_else(|| panic!("kiln-bench {args:?} timed out\n{out}\n{err}"));
    assert_eq!(status, 0, "kiln-bench {args:?} failed\n{out}\n{err}");
    assert!(out.contains("== failover --postgres:"), "{out}");
    assert!(!out.contains("WRONG"), "wrong results\n{out}");
    // Every runner of a killed dispatcher came back holding its attempt and its output
    // resumed: a time for each (none missing), within the round's patience (60 s).
    assert!(!out.contains("did not happen"), "{out}");
    for what in [
        "kill -> re-attached holding attempt",
        "kill -> output resumed at follower",
    ] {
        for p in ["p50", "p99", "max"] {
            let label = format!("{what}, {p}");
            // Twice: the three dispatchers' rounds, then the baseline's.
            assert_eq!(out.matches(&label).count(), 2, "{label:?}\n{out}");
            let s = seconds(&out, &label);
            assert!(s > 0.0 && s < 60.0, "{label:?} = {s} s\n{out}");
        }
    }
    // No job lost: 2 rounds x 3 jobs, each passed as attempt 1, each log whole, once, in
    // order (the three dispatchers' rounds, then the baseline's).
    assert_eq!(out.matches("jobs passed / attempt 1").count(), 2, "{out}");
    for line in out
        .lines()
        .filter(|l| l.contains("jobs passed / attempt 1"))
    {
        assert!(
            line.contains("6/6 / 6/6") && line.contains("attempts declared lost: 0"),
            "{line}\n{out}"
        );
    }
    for line in out
        .lines()
        .filter(|l| l.contains("logs complete, once, in order"))
    {
        assert!(line.contains(" 6/6 "), "{line}\n{out}");
    }
    // Each round lost a dispatcher that held at least one runner.
    let moved: Vec<&str> = out
        .lines()
        .filter(|l| l.contains("runners moved"))
        .collect();
    assert_eq!(moved.len(), 4, "{out}");
    assert!(
        moved.iter().all(|l| !l.contains(" 0 runners moved")),
        "{out}"
    );
}

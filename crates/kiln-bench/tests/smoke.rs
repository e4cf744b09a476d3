//! Keeps `kiln-bench` compiling and working: `kiln-bench all --quick`, `kiln-bench split
//! --quick`, a small `kiln-bench scale` and a small `kiln-bench scale --sessions` (tiny sizes,
//! both backends) must exit 0 and print every section and figure. Their figures are not
//! checked: timing belongs in BENCHMARKS.md, not in tests.

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
    let runs: [(&[&str], &str, [u32; 2]); 3] = [
        (&[], "SQLite", [1, 2]),
        (&["--postgres"], "PostgreSQL, fsync on", [1, 2]),
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

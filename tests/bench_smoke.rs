//! Keeps `kiln bench` compiling and working: `kiln bench all --quick` (tiny sizes) must exit 0
//! and print every section. Its figures are not checked: timing belongs in BENCHMARKS.md, not
//! in tests.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn bench_all_quick_runs_every_benchmark() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["bench", "all", "--quick"])
        .env_remove("KILN_BENCH_KEEP")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start kiln bench");
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
    // Generous: the debug build on a busy machine. The benchmark bounds itself too.
    let deadline = Instant::now() + Duration::from_secs(180);
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
    let status = status.unwrap_or_else(|| panic!("kiln bench all --quick timed out\n{out}\n{err}"));
    assert_eq!(
        status.code(),
        Some(0),
        "kiln bench all --quick failed\n{out}\n{err}"
    );
    for section in [
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

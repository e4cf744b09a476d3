//! `kiln-bench split-unit FILE...` (hidden): the test runner of the synthetic suite, run by
//! each batch of a split step as `KILN split-unit {units}`.
//!
//! For each test of each file (lines `NAME MS PERMILLE`, see [`super::suite`]) it sleeps the
//! test's duration times the scale, and the test fails when
//! - flakes are on and `hash(seed, test, try) % 1000 < PERMILLE` (the try from `KILN_UNIT_TRY`;
//!   permille 1000 always fails), or
//! - `hash(seed, test) % 1000 <` the broken permille (the broken-commit scenario).
//!
//! It writes a JUnit XML report to `KILN_JUNIT` (one suite per file, each case with a `file`
//! attribute naming its unit), appends one JSON line per process to the trace file (see
//! [`Trace`]), and exits 1 when a test failed (2 when it could not run). Settings come from the
//! step's environment: [`ENV_SEED`], [`ENV_SCALE`], [`ENV_FLAKY`], [`ENV_BROKEN`],
//! [`ENV_TRACE`], [`ENV_START`] (a process start-up cost: it sleeps that long before its first
//! test, outside every test case's time, as an interpreter's start and imports are).

use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Args;
use quick_junit::{NonSuccessKind, Report, TestCase, TestCaseStatus, TestSuite};
use serde::{Deserialize, Serialize};

use super::suite::{self, Test};
use crate::BenchError;
use crate::util::now_ns;

/// The suite's seed (default 42).
pub const ENV_SEED: &str = "KILN_BENCH_SPLIT_SEED";
/// Factor on every sleep (default 1).
pub const ENV_SCALE: &str = "KILN_BENCH_SPLIT_SCALE";
/// `1`: flaky and always-failing tests fail; otherwise every permille is ignored.
pub const ENV_FLAKY: &str = "KILN_BENCH_SPLIT_FLAKY";
/// Permille of tests that are broken (fail every try), by hash (default 0).
pub const ENV_BROKEN: &str = "KILN_BENCH_SPLIT_BROKEN";
/// Milliseconds each process sleeps before its first test (default 0): its start-up cost.
pub const ENV_START: &str = "KILN_BENCH_SPLIT_START_MS";
/// File each process appends its [`Trace`] line to (none: no trace).
pub const ENV_TRACE: &str = "KILN_BENCH_SPLIT_TRACE";

/// `kiln-bench split-unit`.
#[derive(Debug, Args)]
pub struct SplitUnitArgs {
    /// Suite files (units) to run, in order.
    pub files: Vec<PathBuf>,
}

/// What one process did: one line of the trace file. Each process writes two: one when it
/// starts (`end_ns` 0: it tells a batch that was killed before its end) and one at its end.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Trace {
    /// Its pid.
    pub pid: u32,
    /// Wall clock (ns since the epoch) when its `main` got here.
    pub start_ns: u128,
    /// Wall clock just before it exits; 0 in the line written at the start.
    pub end_ns: u128,
    /// `KILN_SHARD` (-1 when unset).
    pub shard: i64,
    /// `KILN_UNIT_TRY`.
    pub try_number: u32,
    /// The units, as given.
    pub units: Vec<String>,
    /// Time spent in the tests' sleeps (measured), ns.
    pub slept_ns: u128,
    /// Tests that failed.
    pub failed: Vec<String>,
    /// Tests run.
    pub tests: usize,
}

/// The harness's settings.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// Seed of the flakes and of the broken tests.
    pub seed: u64,
    /// Factor on every sleep.
    pub scale: f64,
    /// Whether flaky tests flake.
    pub flaky: bool,
    /// Broken tests, permille.
    pub broken_permille: u32,
    /// Which try this is.
    pub try_number: u32,
    /// Start-up cost of the process, ms.
    pub start_ms: u64,
}

impl Settings {
    fn from_env() -> Result<Settings, String> {
        fn get<T: std::str::FromStr>(name: &str, default: T) -> Result<T, String>
        where
            T::Err: std::fmt::Display,
        {
            match std::env::var(name) {
                Ok(v) if !v.trim().is_empty() => {
                    v.trim().parse().map_err(|e| format!("{name}={v:?}: {e}"))
                }
                _ => Ok(default),
            }
        }
        Ok(Settings {
            seed: get(ENV_SEED, 42)?,
            scale: get(ENV_SCALE, 1.0)?,
            flaky: std::env::var(ENV_FLAKY).is_ok_and(|v| v.trim() == "1"),
            broken_permille: get(ENV_BROKEN, 0)?,
            try_number: get("KILN_UNIT_TRY", 1)?,
            start_ms: get(ENV_START, 0)?,
        })
    }

    /// Why a test fails this try, if it does.
    pub fn failure(&self, t: &Test) -> Option<String> {
        if suite::is_broken(self.seed, &t.name, self.broken_permille) {
            return Some("broken (fails every try)".into());
        }
        if self.flaky && suite::flake_fails(self.seed, &t.name, self.try_number, t.flaky_permille) {
            return Some(if t.flaky_permille >= 1000 {
                "always fails".into()
            } else {
                format!(
                    "flaky ({}% per try), failed try {}",
                    f64::from(t.flaky_permille) / 10.0,
                    self.try_number
                )
            });
        }
        None
    }
}

/// The class name of a unit's cases: its path without the extension, `/` as `.`.
fn classname(unit: &str) -> String {
    unit.strip_suffix(".t").unwrap_or(unit).replace('/', ".")
}

/// Runs the files; returns the exit code.
pub fn run(args: &SplitUnitArgs) -> Result<i32, BenchError> {
    let start_ns = now_ns();
    match run_inner(args, start_ns) {
        Ok(code) => Ok(code),
        Err(e) => {
            eprintln!("kiln-bench split-unit: {e}");
            Ok(2)
        }
    }
}

fn run_inner(args: &SplitUnitArgs, start_ns: u128) -> Result<i32, String> {
    let settings = Settings::from_env()?;
    let mut units = Vec::new();
    for f in &args.files {
        let text =
            std::fs::read_to_string(f).map_err(|e| format!("cannot read {}: {e}", f.display()))?;
        let tests = suite::parse(&text).map_err(|e| format!("{}: {e}", f.display()))?;
        units.push((f.to_string_lossy().into_owned(), tests));
    }
    let trace_file = std::env::var(ENV_TRACE).ok().filter(|p| !p.is_empty());
    let mut trace = Trace {
        pid: std::process::id(),
        start_ns,
        end_ns: 0,
        shard: std::env::var("KILN_SHARD")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(-1),
        try_number: settings.try_number,
        units: units.iter().map(|(u, _)| u.clone()).collect(),
        slept_ns: 0,
        failed: Vec::new(),
        tests: 0,
    };
    if let Some(path) = &trace_file {
        append(path, &trace)?;
    }
    if settings.start_ms > 0 {
        std::thread::sleep(Duration::from_millis(settings.start_ms));
    }
    let mut report = Report::new("kiln-bench-split");
    let mut slept = Duration::ZERO;
    let mut failed = Vec::new();
    let mut tests = 0;
    for (unit, cases) in &units {
        let mut ts = TestSuite::new(unit.as_str());
        ts.extra.insert("file".into(), unit.as_str().into());
        let class = classname(unit);
        for t in cases {
            tests += 1;
            let want = Duration::from_secs_f64(t.ms as f64 * settings.scale / 1000.0);
            let t0 = Instant::now();
            if !want.is_zero() {
                std::thread::sleep(want);
            }
            let took = t0.elapsed();
            slept += took;
            let status = match settings.failure(t) {
                None => TestCaseStatus::success(),
                Some(why) => {
                    failed.push(t.name.clone());
                    let mut s = TestCaseStatus::non_success(NonSuccessKind::Failure);
                    s.set_message(why);
                    s
                }
            };
            let mut case = TestCase::new(t.name.as_str(), status);
            case.set_classname(class.as_str()).set_time(took);
            case.extra.insert("file".into(), unit.as_str().into());
            ts.add_test_case(case);
        }
        report.add_test_suite(ts);
    }
    if let Ok(path) = std::env::var("KILN_JUNIT")
        && !path.is_empty()
    {
        let xml = report
            .to_string()
            .map_err(|e| format!("cannot write JUnit XML: {e}"))?;
        std::fs::write(&path, xml).map_err(|e| format!("cannot write {path}: {e}"))?;
    }
    if let Some(path) = &trace_file {
        trace.end_ns = now_ns();
        trace.slept_ns = slept.as_nanos();
        trace.failed = failed.clone();
        trace.tests = tests;
        append(path, &trace)?;
    }
    for name in &failed {
        println!("FAILED {name}");
    }
    println!(
        "{} units, {tests} tests, {} failed (try {})",
        units.len(),
        failed.len(),
        settings.try_number
    );
    Ok(i32::from(!failed.is_empty()))
}

/// Appends one line to the trace file: one write on an O_APPEND file, so the lines of
/// concurrent processes do not interleave.
fn append(path: &str, trace: &Trace) -> Result<(), String> {
    let mut line = serde_json::to_string(trace).map_err(|e| e.to_string())?;
    line.push('\n');
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| format!("cannot open {path}: {e}"))?;
    f.write_all(line.as_bytes())
        .map_err(|e| format!("cannot write {path}: {e}"))
}

/// Reads a trace file (a missing file is an empty trace): the start lines and the end lines.
pub fn read_traces(path: &std::path::Path) -> Result<(Vec<Trace>, Vec<Trace>), String> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Default::default()),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    let all = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).map_err(|e| format!("{}: {e}: {l}", path.display())))
        .collect::<Result<Vec<Trace>, String>>()?;
    Ok(all.into_iter().partition(|t: &Trace| t.end_ns == 0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(name: &str, permille: u32) -> Test {
        Test {
            name: name.into(),
            ms: 1,
            flaky_permille: permille,
        }
    }

    #[test]
    fn failures_follow_the_settings() {
        let mut s = Settings {
            seed: 42,
            scale: 1.0,
            flaky: false,
            broken_permille: 0,
            try_number: 1,
            start_ms: 0,
        };
        assert_eq!(s.failure(&t("a", 1000)), None);
        s.flaky = true;
        assert!(s.failure(&t("a", 1000)).is_some());
        assert_eq!(s.failure(&t("a", 0)), None);
        // A flaky test fails some tries and passes others, the same way every time.
        let tries: Vec<bool> = (1..=40)
            .map(|n| {
                s.try_number = n;
                s.failure(&t("f", 500)).is_some()
            })
            .collect();
        assert!(tries.iter().any(|x| *x) && tries.iter().any(|x| !*x));
        s.flaky = false;
        s.broken_permille = 1000;
        assert!(s.failure(&t("b", 0)).is_some());
    }
}

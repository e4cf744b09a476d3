//! `kiln-bench split`: one synthetic test suite split across real runners, by kiln's dynamic
//! queue and by static splits, with flaky tests, a broken commit and a killed runner.
//!
//! The suite (see [`suite`] for its design: 200 files, about 1,000 tests, heavy-tailed
//! durations, two long files, flaky tests, a timing history with deliberate errors) is made by
//! a seeded generator and committed to a git repository; each test sleeps its duration (times
//! `--scale`), so 16 runners are meaningful on 2 cores. Every run is a fresh `kiln serve` child
//! (its data dir seeded with the history through [`kiln_store::SqliteStore`] before it starts)
//! and N fresh `kiln runner` children with one slot each (their work dirs, and so their git
//! mirrors, are kept from run to run; a first unmeasured warm-up run at the largest N fills
//! them; in every run, a small split build, `warm`, runs first so that the measured build finds
//! the runner processes warm, as a farm's long-lived runners are), and one commit whose
//! `.kiln.yml` has one split step `tests` with `parallel: N`. Its
//! `run` is this binary's hidden `kiln-bench split-unit {units}` ([`harness`]), which sleeps,
//! fails as told, writes JUnit and appends a line per process to a trace file.
//!
//! Measured per run: makespan = the build's `created_at` to `finished_at`; unit durations and
//! verdicts from `GetTestReport`; the lower bound max(total unit time / N, longest unit), both
//! from that run's report (a unit's time is its share of its batch's process time, or the sum
//! of its JUnit case times when that is larger).
//!
//! Scenarios (`--only`):
//! - `dynamic`: the dynamic queue with N = each of `--runners`: makespan / lower bound; per-unit
//!   overhead from the traces of the largest N: for every process after a shard's first,
//!   (gap since the shard's previous process ended + its wall time - its sleeps) / its units.
//! - `static`: hash, count and timing splits at the largest N: their makespan / the dynamic one.
//! - `flaky`: flakes on (8 flaky tests, 2 always failing), `retry: {attempts: 3, max_failures:
//!   10%}`: flaky tests found / flaky tests that failed at least once; always-failing tests
//!   labelled flaky (must be 0).
//! - `broken`: 30% of the tests fail every try, same retry policy: retry time / first-pass time,
//!   from the report's tries.
//! - `startup`: every process starts in `--start-ms` (300 ms) before its first test, as an
//!   interpreter does; the dynamic queue at N = 4 and 16 of `--runners` (else the largest) learns that start cost from
//!   the batches it runs (in a build of the same step at scale 0 before the measured one, as
//!   a farm keeps it from the step's earlier builds; `--cold-start`: during the measured
//!   build): makespan / (lower bound + one start per shard), goal 1.10x.
//! - `kill`: the dynamic run again, one runner SIGKILLed (with its batch) at half the dynamic
//!   run's makespan, the one running the batch with the most test time (the worst case): every
//!   unit must have exactly one final verdict; makespan vs lower bound + lease (heartbeat
//!   interval x missed heartbeats) + longest unit.
//!
//! Missed goals are reported, not errors; a wrong result (a unit without its one final
//! verdict, a verdict the suite contradicts, a build of a clean suite that did not pass) makes
//! the exit code 1, and a run that could not be made 7; the other scenarios still run.

pub mod harness;
pub mod real;
pub mod suite;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use kiln_domain::split::Strategy;
use tonic::transport::Channel;

pub use harness::SplitUnitArgs;
use harness::{ENV_BROKEN, ENV_FLAKY, ENV_SCALE, ENV_SEED, ENV_START, ENV_TRACE, Trace};
use suite::{Kind, Recorded, Suite};

use super::util::{
    Proc, Repo, Scratch, bench_exe, fail, figure, header, is_final, ms, note, percentile, ready,
    secs, sh_quote, sorted, spawn_runner, spawn_serve, submit, tail, wait_idle, wrong,
};
use crate::BenchError;
use kiln::proto::{self, JobState, UnitOutcome, build_service_client::BuildServiceClient};

/// The split step's name in the pipeline.
const STEP: &str = "tests";
/// Permille of tests broken in the broken scenario.
const BROKEN_PERMILLE: u32 = 300;

/// A scenario of `--only`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Scenario {
    /// The dynamic queue at every N of --runners, and per-unit overhead.
    Dynamic,
    /// Hash, count and timing splits at the largest N (with the dynamic run at that N).
    Static,
    /// Flaky and always-failing tests with retries.
    Flaky,
    /// A commit with 30% of its tests broken, with retries.
    Broken,
    /// A runner killed at half time (with the dynamic run at that N).
    Kill,
    /// Processes that take --start-ms to start, at N = 4 and 16 of --runners (else the largest).
    Startup,
}

/// `kiln-bench split`.
#[derive(Debug, Clone, Args)]
pub struct SplitArgs {
    /// Tiny sizes (scale 0.05, runners 1,4): checks that the benchmark works, measures nothing.
    #[arg(long)]
    pub quick: bool,
    /// Seed of the suite, its flakes, its broken tests and its timing history.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Factor on every test's duration (default 1, 0.05 with --quick).
    #[arg(long, value_parser = parse_scale)]
    pub scale: Option<f64>,
    /// Runner counts N of the dynamic runs (default 1,2,4,8,16; 1,4 with --quick); the other
    /// scenarios use the largest.
    #[arg(long, value_delimiter = ',', value_parser = clap::value_parser!(u32).range(1..=64))]
    pub runners: Vec<u32>,
    /// Only these scenarios (default: all).
    #[arg(long, value_delimiter = ',', value_enum)]
    pub only: Vec<Scenario>,
    /// The dispatcher's heartbeat interval in every run.
    #[arg(long, default_value = "500ms", value_parser = humantime::parse_duration)]
    pub heartbeat_interval: Duration,
    /// Seed the dispatcher with the suite's true durations instead of the history with
    /// deliberate errors (to tell the cost of the errors from kiln's own overhead).
    #[arg(long)]
    pub exact_history: bool,
    /// Start-up cost of every process in the startup scenario, ms.
    #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u64).range(0..=60_000))]
    pub start_ms: u64,
    /// In the startup scenario, measure a dispatcher that has not seen the step before: the
    /// start cost is learned during the measured build (by default one build of the step at
    /// scale 0 runs first, as a farm has run the step before).
    #[arg(long)]
    pub cold_start: bool,
    /// Instead of the synthetic suite: a git checkout of a real project whose committed
    /// `.kiln.yml` has a split step; its HEAD is built by kiln on as many local runners as the
    /// step has shards, against the same units in one process (see --direct), interleaved.
    #[arg(long, value_name = "DIR")]
    pub suite: Option<PathBuf>,
    /// With --suite: the single-process command (`sh -c`, in DIR); default: the split step's
    /// `run` with `{units}` replaced by every unit its glob finds and `{junit}` by a scratch
    /// file, with the step's `env`.
    #[arg(long, value_name = "CMD", requires = "suite")]
    pub direct: Option<String>,
    /// With --suite: measured rounds (a direct run and a build each), after one unmeasured.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=50))]
    pub suite_runs: u32,
    /// Missed heartbeats before a runner is lost, in every run.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub missed_heartbeats: u32,
}

fn parse_scale(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|e| format!("{e}"))?;
    if v.is_finite() && v > 0.0 && v <= 100.0 {
        Ok(v)
    } else {
        Err("must be above 0 and at most 100".into())
    }
}

impl SplitArgs {
    fn scale(&self) -> f64 {
        self.scale.unwrap_or(if self.quick { 0.05 } else { 1.0 })
    }

    fn runners(&self) -> Vec<u32> {
        let mut r = if self.runners.is_empty() {
            if self.quick {
                vec![1, 4]
            } else {
                vec![1, 2, 4, 8, 16]
            }
        } else {
            self.runners.clone()
        };
        r.sort_unstable();
        r.dedup();
        r
    }

    fn wants(&self, s: Scenario) -> bool {
        self.only.is_empty() || self.only.contains(&s)
    }

    fn lease(&self) -> Duration {
        self.heartbeat_interval * self.missed_heartbeats
    }

    /// The runs, in order.
    fn plan(&self) -> Vec<Spec> {
        let runners = self.runners();
        let nmax = runners.last().copied().unwrap_or(1);
        let scale = self.scale();
        let spec = |label: String, kind: RunKind, shards: u32, strategy: Strategy| Spec {
            label,
            kind,
            shards,
            strategy,
            scale,
            start_ms: 0,
        };
        let mut plan = vec![Spec {
            scale: 0.0,
            ..spec(
                format!("warm-up-{nmax}"),
                RunKind::WarmUp,
                nmax,
                Strategy::Dynamic,
            )
        }];
        if self.wants(Scenario::Dynamic) {
            for &n in &runners {
                plan.push(spec(
                    format!("dynamic-{n}"),
                    RunKind::Plain,
                    n,
                    Strategy::Dynamic,
                ));
            }
        } else if self.wants(Scenario::Static) || self.wants(Scenario::Kill) {
            plan.push(spec(
                format!("dynamic-{nmax}"),
                RunKind::Plain,
                nmax,
                Strategy::Dynamic,
            ));
        }
        if self.wants(Scenario::Static) {
            for s in [Strategy::Hash, Strategy::Count, Strategy::Timing] {
                plan.push(spec(
                    format!("{}-{nmax}", s.as_str()),
                    RunKind::Plain,
                    nmax,
                    s,
                ));
            }
        }
        if self.wants(Scenario::Flaky) {
            plan.push(spec(
                format!("flaky-{nmax}"),
                RunKind::Flaky,
                nmax,
                Strategy::Dynamic,
            ));
        }
        if self.wants(Scenario::Broken) {
            plan.push(spec(
                format!("broken-{nmax}"),
                RunKind::Broken,
                nmax,
                Strategy::Dynamic,
            ));
        }
        if self.wants(Scenario::Startup) {
            // At N = 4 and 16 of --runners, else at the largest.
            let mut at: Vec<u32> = runners
                .iter()
                .copied()
                .filter(|n| [4, 16].contains(n))
                .collect();
            if at.is_empty() {
                at.push(nmax);
            }
            for n in at {
                plan.push(Spec {
                    start_ms: self.start_ms,
                    ..spec(format!("startup-{n}"), RunKind::Plain, n, Strategy::Dynamic)
                });
            }
        }
        if self.wants(Scenario::Kill) {
            plan.push(spec(
                format!("kill-{nmax}"),
                RunKind::Kill,
                nmax,
                Strategy::Dynamic,
            ));
        }
        plan
    }

    /// The benchmark's own time limit.
    pub fn limit(&self) -> Duration {
        if self.suite.is_some() {
            // Rounds of a suite whose length is not known in advance; each build has its own
            // limit (20x the first direct run, plus 2 minutes).
            return Duration::from_secs(4 * 3600);
        }
        let total = Suite::generate(self.seed).total_ms();
        let per: Duration = self
            .plan()
            .iter()
            .map(|s| s.limit(total, self.lease()))
            .sum();
        per + Duration::from_secs(60)
    }
}

/// What a run is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RunKind {
    /// Fills the runners' mirrors; not measured.
    WarmUp,
    /// A clean suite: must pass.
    Plain,
    /// Flakes on, retries.
    Flaky,
    /// 30% broken, retries.
    Broken,
    /// A runner killed at half time.
    Kill,
}

/// One run.
#[derive(Debug, Clone)]
struct Spec {
    label: String,
    kind: RunKind,
    shards: u32,
    strategy: Strategy,
    scale: f64,
    /// Start-up cost of every process, ms.
    start_ms: u64,
}

impl Spec {
    /// Its time limit: setup, the suite at N with a wide margin, a lease.
    fn limit(&self, total_ms: u64, lease: Duration) -> Duration {
        let expected = total_ms as f64 * self.scale / 1000.0 / f64::from(self.shards.max(1));
        Duration::from_secs(120) + Duration::from_secs_f64(4.0 * expected) + lease * 2
    }

    fn retries(&self) -> bool {
        matches!(self.kind, RunKind::Flaky | RunKind::Broken)
    }
}

/// A runner killed during a run.
#[derive(Debug, Clone)]
struct Killed {
    runner: String,
    /// After the build was submitted, ms.
    after_ms: f64,
}

/// What a run measured.
#[derive(Debug, Clone)]
struct Run {
    spec: Spec,
    build: proto::Build,
    makespan_ms: f64,
    split: proto::SplitReport,
    /// The processes that ended (their end lines).
    traces: Vec<Trace>,
    /// The processes that started (their start lines).
    starts: Vec<Trace>,
    killed: Option<Killed>,
}

fn ts_ms(t: Option<&prost_types::Timestamp>) -> Option<i64> {
    t.map(kiln::convert::millis)
}

impl Run {
    /// Every try's time (its share of its batch's process time), ms.
    fn total_ms(&self) -> f64 {
        self.split
            .units
            .iter()
            .flat_map(|u| &u.tries)
            .map(|t| t.duration_ms as f64)
            .sum()
    }

    /// One try's time: its share of the batch, or the sum of its cases when that is larger.
    fn try_ms(t: &proto::UnitTry) -> f64 {
        let cases: u64 = t.cases.iter().map(|c| c.duration_ms).sum();
        t.duration_ms.max(cases) as f64
    }

    /// The longest try of a unit, ms.
    fn longest_ms(&self) -> f64 {
        self.split
            .units
            .iter()
            .flat_map(|u| &u.tries)
            .map(Run::try_ms)
            .fold(0.0, f64::max)
    }

    /// max(total / N, longest), plus one process start per shard, ms.
    fn bound_ms(&self) -> f64 {
        (self.total_ms() / f64::from(self.spec.shards.max(1))).max(self.longest_ms())
            + self.spec.start_ms as f64
    }

    fn ratio(&self) -> f64 {
        self.makespan_ms / self.bound_ms()
    }

    /// Created-at of the build, ns since the epoch.
    fn created_ns(&self) -> u128 {
        ts_ms(self.build.created_at.as_ref()).unwrap_or(0).max(0) as u128 * 1_000_000
    }

    /// Per-unit dispatch overhead, ms, one value per unit: for every process after a shard's
    /// first, (gap since that shard's previous process ended + its wall time - its sleeps) /
    /// its units.
    fn overheads(&self) -> Vec<f64> {
        let mut by_shard: BTreeMap<i64, Vec<&Trace>> = BTreeMap::new();
        for t in &self.traces {
            by_shard.entry(t.shard).or_default().push(t);
        }
        let mut out = Vec::new();
        for list in by_shard.values_mut() {
            list.sort_by_key(|t| t.start_ns);
            for w in list.windows(2) {
                let (prev, cur) = (w[0], w[1]);
                let gap = cur.start_ns.saturating_sub(prev.end_ns);
                let inproc = cur
                    .end_ns
                    .saturating_sub(cur.start_ns)
                    .saturating_sub(cur.slept_ns);
                let n = cur.units.len().max(1);
                let per = (gap + inproc) as f64 / 1e6 / n as f64;
                out.extend(std::iter::repeat_n(per, n));
            }
        }
        out
    }

    /// Per shard: build created -> its first process started, ms.
    fn first_starts(&self) -> Vec<f64> {
        let created = self.created_ns();
        let mut first: BTreeMap<i64, u128> = BTreeMap::new();
        for t in &self.traces {
            let e = first.entry(t.shard).or_insert(t.start_ns);
            *e = (*e).min(t.start_ns);
        }
        first
            .values()
            .map(|&s| s.saturating_sub(created) as f64 / 1e6)
            .collect()
    }

    /// The last process's end -> the build's end, ms.
    fn tail_ms(&self) -> Option<f64> {
        let end = ts_ms(self.build.finished_at.as_ref())? as f64;
        let last = self.traces.iter().map(|t| t.end_ns).max()? as f64 / 1e6;
        Some(end - last)
    }

    /// Sum of try times of tries `>= from` (or of try 1 when `first`), ms.
    fn tries_ms(&self, first: bool) -> f64 {
        self.split
            .units
            .iter()
            .flat_map(|u| &u.tries)
            .filter(|t| (t.try_number <= 1) == first)
            .map(|t| t.duration_ms as f64)
            .sum::<f64>()
            // An empty float sum is -0.0.
            + 0.0
    }

    fn summary(&self) -> String {
        let verdicts = self
            .split
            .units
            .iter()
            .fold(BTreeMap::<&str, usize>::new(), |mut m, u| {
                *m.entry(u.verdict.as_str()).or_default() += 1;
                m
            });
        format!(
            "{}: build {} {}, makespan {}, bound {} (unit time {} / {} = {}, longest unit {}), ratio {:.3}; {} processes; rounds {}; verdicts {}",
            self.spec.label,
            self.build.id,
            kiln::convert::state_name(self.build.state),
            secs(self.makespan_ms),
            secs(self.bound_ms()),
            secs(self.total_ms()),
            self.spec.shards,
            secs(self.total_ms() / f64::from(self.spec.shards.max(1))),
            secs(self.longest_ms()),
            self.ratio(),
            self.traces.len(),
            self.split.rounds,
            verdicts
                .iter()
                .map(|(k, v)| format!("{v} {k}"))
                .collect::<Vec<_>>()
                .join(", ")
        )
    }
}

/// The benchmark's fixed parts: the suite, its repository, the runners' work dirs.
struct Bench {
    args: SplitArgs,
    suite: Suite,
    tmp: Scratch,
    repo: Repo,
    exe: PathBuf,
    /// Wrong results seen (exit code 1 at the end).
    problems: Vec<String>,
}

impl Bench {
    fn new(args: &SplitArgs) -> Result<Bench, BenchError> {
        let suite = Suite::generate(args.seed);
        let tmp = Scratch::new()?;
        let root = tmp.path().join("repo");
        std::fs::create_dir_all(root.join("suite")).map_err(fail)?;
        let repo = Repo::init(&root)?;
        let texts: Vec<(String, String)> = suite
            .files
            .iter()
            .map(|f| (f.path.clone(), f.text()))
            .collect();
        let files: Vec<(&str, &str)> = texts
            .iter()
            .map(|(p, t)| (p.as_str(), t.as_str()))
            .collect();
        repo.commit(&files, &format!("synthetic suite, seed {}", args.seed))?;
        Ok(Bench {
            args: args.clone(),
            suite,
            tmp,
            repo,
            exe: bench_exe()?,
            problems: Vec::new(),
        })
    }

    fn problem(&mut self, text: String) {
        note(format!("WRONG: {text}"));
        self.problems.push(text);
    }

    /// The `.kiln.yml` of a run.
    fn pipeline(&self, spec: &Spec, trace: &Path) -> String {
        let q = |s: &str| serde_json::Value::String(s.to_string()).to_string();
        let run = format!(
            "{} split-unit {{units}}",
            sh_quote(&self.exe.to_string_lossy())
        );
        let retry = if spec.retries() {
            "    retry:\n      attempts: 3\n      max_failures: \"10%\"\n"
        } else {
            ""
        };
        let flaky = u8::from(spec.kind == RunKind::Flaky);
        let broken = if spec.kind == RunKind::Broken {
            BROKEN_PERMILLE
        } else {
            0
        };
        format!(
            "# kiln bench split: {label}\n\
             steps:\n\
             \x20 - name: {STEP}\n\
             \x20   run: {run}\n\
             \x20   timeout: 30m\n\
             \x20   parallel: {shards}\n\
             \x20   units:\n\
             \x20     glob: \"suite/*.t\"\n\
             \x20     strategy: {strategy}\n\
             {retry}\
             \x20   env:\n\
             \x20     {ENV_SEED}: \"{seed}\"\n\
             \x20     {ENV_SCALE}: \"{scale}\"\n\
             \x20     {ENV_FLAKY}: \"{flaky}\"\n\
             \x20     {ENV_BROKEN}: \"{broken}\"\n\
             \x20     {ENV_START}: \"{start}\"\n\
             \x20     {ENV_TRACE}: {trace}\n",
            label = spec.label,
            run = q(&run),
            shards = spec.shards,
            strategy = spec.strategy.as_str(),
            seed = self.args.seed,
            scale = spec.scale,
            start = spec.start_ms,
            trace = q(&trace.to_string_lossy()),
        )
    }

    /// Starts `n` runners `r00`.. with one slot each (work dirs kept across runs) and waits
    /// until the dispatcher lists them all idle.
    async fn start_runners(
        &self,
        url: &str,
        dir: &Path,
        n: u32,
    ) -> Result<Vec<(String, Proc)>, BenchError> {
        let mut procs = Vec::new();
        for i in 0..n {
            let name = format!("r{i:02}");
            let log = dir.join(format!("runner-{name}.log"));
            let work = self.tmp.path().join("work").join(&name);
            procs.push((
                name.clone(),
                spawn_runner(url, &name, &work, &log, &["--slots", "1"])?,
            ));
        }
        let names: Vec<String> = procs.iter().map(|(n, _)| n.clone()).collect();
        wait_idle(
            url,
            &names,
            Duration::from_secs(60),
            &dir.join("runner-r00.log"),
        )
        .await?;
        Ok(procs)
    }

    /// The runner to kill: the one running the batch with the most test time (the worst
    /// case: its units come back only after the lease and run again from the start), from the
    /// trace's start lines without an end line; else the first busy runner by name.
    fn victim(&self, b: &proto::Build, trace: &Path, shards: u32) -> Option<String> {
        let truth: HashMap<&str, u64> = self
            .suite
            .files
            .iter()
            .map(|f| (f.path.as_str(), f.ms()))
            .collect();
        let running = |name: &str| {
            b.jobs
                .iter()
                .find(|j| j.name.ends_with(name) && j.state == JobState::Running as i32)
                .map(|j| j.runner.clone())
                .filter(|r| !r.is_empty())
        };
        if let Ok((starts, ends)) = harness::read_traces(trace) {
            let ended: HashSet<u32> = ends.iter().map(|t| t.pid).collect();
            let longest = starts
                .iter()
                .filter(|t| !ended.contains(&t.pid) && t.shard >= 0)
                .max_by_key(|t| {
                    t.units
                        .iter()
                        .map(|u| truth.get(u.as_str()).copied().unwrap_or(0))
                        .sum::<u64>()
                });
            if let Some(r) = longest.and_then(|t| running(&format!(" [{}/{shards}]", t.shard + 1)))
            {
                return Some(r);
            }
        }
        let mut busy: Vec<&str> = b
            .jobs
            .iter()
            .filter(|j| j.state == JobState::Running as i32 && !j.runner.is_empty())
            .map(|j| j.runner.as_str())
            .collect();
        busy.sort_unstable();
        busy.first().map(|r| (*r).to_string())
    }

    /// Makes one run: fresh dispatcher with the seeded history, N fresh runners, one build.
    async fn run(&self, spec: &Spec, kill_at: Option<Duration>) -> Result<Run, BenchError> {
        let dir = self.tmp.path().join(format!("run-{}", spec.label));
        let data = dir.join("data");
        std::fs::create_dir_all(&data).map_err(fail)?;
        let trace = dir.join("trace.jsonl");
        let kiln_yml = self.pipeline(spec, &trace);
        let key = split_key(&kiln_yml)?;
        let history = if self.args.exact_history {
            let truth = suite::estimates(&self.suite, spec.scale.max(0.001), true);
            self.suite
                .files
                .iter()
                .zip(truth)
                .map(|(f, ms)| (f.path.clone(), ms.max(1)))
                .collect()
        } else {
            suite::history(&self.suite, spec.scale.max(0.001)).0
        };
        {
            let store = kiln_store::SqliteStore::open(&data.join("kiln.db"))
                .map_err(|e| fail(format!("cannot open the dispatcher's store: {e}")))?;
            store
                .seed_unit_durations(self.repo.path(), &key, &history)
                .map_err(|e| fail(format!("cannot seed the timing history: {e}")))?;
        }
        let log = dir.join("serve.log");
        let (serve, url, mut client) = start_dispatcher(&self.args, &log, &data).await?;
        let mut runners = self.start_runners(&url, &dir, spec.shards).await?;
        // Runners of a farm are long-lived: one small split build first, so that the measured
        // build does not pay the runner processes' cold start (the first git and process work
        // of 16 fresh processes on 2 CPUs). Its split key (`warm`) is not the measured one, so
        // the seeded history is untouched.
        //
        // With a start cost (the startup scenario), the warm-up build is the measured step
        // itself at scale 0 (every process pays its start, no test sleeps): the dispatcher
        // learns the start cost as a farm has from the step's previous builds. The timing
        // history it records is then put back as seeded, so the measured build sees the same
        // deliberate errors as every other run. `--cold-start` skips this.
        let learn = spec.start_ms > 0 && !self.args.cold_start;
        let warm = if learn {
            let warm_spec = Spec {
                label: format!("{}-learn", spec.label),
                scale: 0.0,
                ..spec.clone()
            };
            self.pipeline(&warm_spec, &dir.join("learn-trace.jsonl"))
        } else {
            format!(
                "steps:\n  - name: warm\n    run: \"true {{units}}\"\n    parallel: {}\n    units:\n      glob: \"suite/*.t\"\n",
                spec.shards
            )
        };
        let warm_commit = self.repo.commit(
            &[(".kiln.yml", &warm)],
            &format!("bench split: warm-up of {}", spec.label),
        )?;
        let warm_id = submit(&mut client, &self.repo, &warm_commit).await?.id;
        let warm_deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let b = get_build(&mut client, warm_id).await?;
            if is_final(b.state) && b.finished_at.is_some() {
                if b.state != JobState::Passed as i32 {
                    return Err(wrong(format!(
                        "{}: the warm-up build {warm_id} did not pass",
                        spec.label
                    )));
                }
                break;
            }
            if Instant::now() > warm_deadline {
                return Err(wrong(format!(
                    "{}: the warm-up build {warm_id} did not end within 120 s",
                    spec.label
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if learn {
            let store = kiln_store::SqliteStore::open(&data.join("kiln.db"))
                .map_err(|e| fail(format!("cannot open the dispatcher's store: {e}")))?;
            store
                .seed_unit_durations(self.repo.path(), &key, &history)
                .map_err(|e| fail(format!("cannot seed the timing history again: {e}")))?;
        }
        let commit = self.repo.commit(
            &[(".kiln.yml", &kiln_yml)],
            &format!("bench split: {}", spec.label),
        )?;
        let id = submit(&mut client, &self.repo, &commit).await?.id;
        let t0 = Instant::now();
        let limit = spec.limit(self.suite.total_ms(), self.args.lease());
        let mut killed = None;
        let build = loop {
            let b = get_build(&mut client, id).await?;
            if is_final(b.state) && b.finished_at.is_some() {
                break b;
            }
            if let Some(at) = kill_at
                && killed.is_none()
                && t0.elapsed() >= at
            {
                let victim = self.victim(&b, &trace, spec.shards);
                if let Some(i) = victim
                    .as_deref()
                    .and_then(|name| runners.iter().position(|(n, _)| n == name))
                {
                    let (name, proc) = runners.remove(i);
                    // SIGSTOP then SIGKILL, with its running batch: a machine going away.
                    drop(proc);
                    killed = Some(Killed {
                        runner: name,
                        after_ms: ms(t0.elapsed()),
                    });
                }
            }
            if t0.elapsed() > limit {
                return Err(wrong(format!(
                    "{}: build {id} did not end within {limit:?}; the dispatcher's log:\n{}",
                    spec.label,
                    tail(&log, 20)
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let report = client
            .get_test_report(proto::GetTestReportRequest { build_id: id })
            .await
            .map_err(|s| fail(format!("GetTestReport {id}: {}", s.message())))?
            .into_inner();
        let split = report
            .splits
            .iter()
            .find(|s| s.key == key)
            .or(report.splits.first())
            .cloned()
            .ok_or_else(|| {
                wrong(format!(
                    "{}: build {id} ({}) has no split report; {}",
                    spec.label,
                    kiln::convert::state_name(build.state),
                    build.error
                ))
            })?;
        let (starts, traces) = harness::read_traces(&trace).map_err(fail)?;
        drop(runners);
        drop(serve);
        let makespan_ms = match (
            ts_ms(build.created_at.as_ref()),
            ts_ms(build.finished_at.as_ref()),
        ) {
            (Some(a), Some(b)) => (b - a) as f64,
            _ => return Err(fail(format!("build {id} has no timestamps"))),
        };
        Ok(Run {
            spec: spec.clone(),
            build,
            makespan_ms,
            split,
            traces,
            starts,
            killed,
        })
    }

    /// Checks that every unit of the suite has exactly one final verdict, and that each
    /// verdict is what the suite and the traces say it must be.
    fn check(&mut self, run: &Run) {
        let label = &run.spec.label;
        let mut problems = Vec::new();
        let mut seen: HashMap<&str, usize> = HashMap::new();
        for u in &run.split.units {
            *seen.entry(u.unit.as_str()).or_default() += 1;
        }
        for f in &self.suite.files {
            match seen.get(f.path.as_str()) {
                None => problems.push(format!("{} has no verdict", f.path)),
                Some(1) => {}
                Some(n) => problems.push(format!("{} is listed {n} times", f.path)),
            }
        }
        if seen.len() != self.suite.files.len() {
            problems.push(format!(
                "{} units in the report, {} in the suite",
                seen.len(),
                self.suite.files.len()
            ));
        }
        if !run.split.done {
            problems.push("the split is not done".into());
        }
        let files: HashMap<&str, &suite::File> = self
            .suite
            .files
            .iter()
            .map(|f| (f.path.as_str(), f))
            .collect();
        // Failures seen by the harness, per (unit, try).
        let mut failed_tries: HashMap<(&str, u32), bool> = HashMap::new();
        for t in &run.traces {
            for u in &t.units {
                let Some(f) = files.get(u.as_str()) else {
                    continue;
                };
                let failed = f.tests.iter().any(|x| t.failed.contains(&x.name));
                *failed_tries
                    .entry((f.path.as_str(), t.try_number))
                    .or_default() |= failed;
            }
        }
        for u in &run.split.units {
            let Some(f) = files.get(u.unit.as_str()) else {
                problems.push(format!("unknown unit {}", u.unit));
                continue;
            };
            let can_fail = match run.spec.kind {
                RunKind::Flaky => f.tests.iter().any(|t| t.flaky_permille > 0),
                RunKind::Broken => f
                    .tests
                    .iter()
                    .any(|t| suite::is_broken(self.args.seed, &t.name, BROKEN_PERMILLE)),
                _ => false,
            };
            let always = match run.spec.kind {
                RunKind::Flaky => f.tests.iter().any(|t| t.flaky_permille >= 1000),
                RunKind::Broken => can_fail,
                _ => false,
            };
            let v = u.verdict.as_str();
            let ok = match v {
                "passed" => !always,
                "flaky" => can_fail && !always,
                "failed" => can_fail,
                _ => false,
            };
            if !ok {
                problems.push(format!(
                    "{} is {v} ({} tries){}",
                    u.unit,
                    u.tries.len(),
                    if always {
                        ", but it fails every try"
                    } else if can_fail {
                        ""
                    } else {
                        ", but none of its tests can fail"
                    }
                ));
            }
            // Each reported outcome agrees with what the harness did in that try.
            for t in &u.tries {
                let reported = UnitOutcome::try_from(t.outcome).ok();
                if let Some(&failed) = failed_tries.get(&(f.path.as_str(), t.try_number)) {
                    let agree = match reported {
                        Some(UnitOutcome::Passed) => !failed,
                        Some(UnitOutcome::Failed) => failed,
                        _ => false,
                    };
                    if !agree {
                        problems.push(format!(
                            "{} try {} reported {:?}, the harness {} it",
                            u.unit,
                            t.try_number,
                            reported,
                            if failed { "failed" } else { "passed" }
                        ));
                    }
                }
            }
        }
        let want_pass = matches!(run.spec.kind, RunKind::Plain | RunKind::Kill);
        if want_pass && run.build.state != JobState::Passed as i32 {
            problems.push(format!(
                "build {} ended {} ({})",
                run.build.id,
                kiln::convert::state_name(run.build.state),
                run.build.error
            ));
        }
        let n = problems.len();
        for p in problems.into_iter().take(10) {
            self.problem(format!("{label}: {p}"));
        }
        if n > 10 {
            self.problem(format!("{label}: ... {} more", n - 10));
        }
    }
}

/// The split key of the pipeline's split step, as kiln's planner makes it (the history is
/// recorded under it): in a `steps:` file, the step's name.
fn split_key(kiln_yml: &str) -> Result<String, BenchError> {
    let p = kiln_pipeline::parse(kiln_pipeline::FILE_NAME, kiln_yml)
        .map_err(|e| fail(format!("the benchmark's pipeline does not parse: {e}")))?;
    kiln_pipeline::plan(&p, "main")
        .map_err(|e| fail(format!("the benchmark's pipeline does not plan: {e}")))?
        .into_iter()
        .find_map(|j| j.shard.map(|s| s.key))
        .ok_or_else(|| fail("the benchmark's pipeline has no split step"))
}

/// Waits until a fresh serve child answers a read.
async fn get_build(
    client: &mut BuildServiceClient<Channel>,
    id: u64,
) -> Result<proto::Build, BenchError> {
    Ok(client
        .get_build(proto::GetBuildRequest { build_id: id })
        .await
        .map_err(|s| fail(format!("GetBuild {id}: {}", s.message())))?
        .into_inner())
}

/// Flaky-scenario figures.
#[derive(Debug, Default)]
struct FlakyStats {
    /// Flaky tests that failed at least one try.
    failed_once: usize,
    /// ... whose unit was labelled flaky.
    found: usize,
    /// Flaky tests that failed every try they got (unit labelled failed).
    failed_always: Vec<String>,
    /// Always-failing tests.
    deterministic: usize,
    /// ... whose unit was labelled flaky (or passed).
    deterministic_as_flaky: usize,
}

fn flaky_stats(suite: &Suite, run: &Run) -> FlakyStats {
    let units: HashMap<&str, &proto::UnitReport> = run
        .split
        .units
        .iter()
        .map(|u| (u.unit.as_str(), u))
        .collect();
    let traced: HashSet<&str> = run
        .traces
        .iter()
        .flat_map(|t| t.failed.iter().map(String::as_str))
        .collect();
    let mut s = FlakyStats::default();
    for (f, t) in suite.flaky() {
        let Some(u) = units.get(f.path.as_str()) else {
            continue;
        };
        let in_report = u.tries.iter().any(|tr| {
            tr.cases
                .iter()
                .any(|c| c.name == t.name && c.outcome == UnitOutcome::Failed as i32)
        });
        if in_report || traced.contains(t.name.as_str()) {
            s.failed_once += 1;
            match u.verdict.as_str() {
                "flaky" => s.found += 1,
                "failed" => s.failed_always.push(format!(
                    "{} ({}%/try, {} tries)",
                    t.name,
                    f64::from(t.flaky_permille) / 10.0,
                    u.tries.len()
                )),
                _ => {}
            }
        }
    }
    for (f, _) in suite.always_failing() {
        s.deterministic += 1;
        if let Some(u) = units.get(f.path.as_str())
            && matches!(u.verdict.as_str(), "flaky" | "passed")
        {
            s.deterministic_as_flaky += 1;
        }
    }
    s
}

/// Runs the benchmark.
pub async fn run(args: &SplitArgs) -> Result<(), BenchError> {
    if let Some(dir) = &args.suite {
        return real::run(args, dir).await;
    }
    let runners = args.runners();
    let nmax = runners.last().copied().unwrap_or(1);
    let scale = args.scale();
    header(
        "split",
        &format!(
            "one test suite split over real runners (seed {}, scale {scale}, N = {}), dynamic queue vs static splits, flaky, broken, runner killed",
            args.seed,
            runners
                .iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(",")
        ),
    );
    let mut bench = Bench::new(args)?;
    describe(&bench.suite, scale, nmax, args.exact_history);
    let lease = args.lease();
    note(format!(
        "dispatcher heartbeat {:?} x {} (lease {}); runners with 1 slot each; {}",
        args.heartbeat_interval,
        args.missed_heartbeats,
        secs(ms(lease)),
        bench.exe.display()
    ));
    let mut runs: HashMap<String, Run> = HashMap::new();
    let mut failures: Vec<BenchError> = Vec::new();
    for spec in args.plan() {
        let kill_at = (spec.kind == RunKind::Kill).then(|| {
            let dynamic = runs.get(&format!("dynamic-{}", spec.shards));
            let half = dynamic.map_or(
                bench.suite.total_ms() as f64 * scale / f64::from(spec.shards) / 2.0,
                |r| r.makespan_ms / 2.0,
            );
            Duration::from_secs_f64(half / 1000.0)
        });
        let started = Instant::now();
        match bench.run(&spec, kill_at).await {
            Ok(run) => {
                if spec.kind == RunKind::WarmUp {
                    note(format!(
                        "{}: build {} {} in {} (not measured: fills the runners' mirrors)",
                        spec.label,
                        run.build.id,
                        kiln::convert::state_name(run.build.state),
                        secs(run.makespan_ms)
                    ));
                } else {
                    note(run.summary());
                    bench.check(&run);
                }
                runs.insert(spec.label.clone(), run);
            }
            Err(e) => {
                note(format!(
                    "{}: FAILED after {:.1} s: {}",
                    spec.label,
                    started.elapsed().as_secs_f64(),
                    e.message
                ));
                failures.push(e);
            }
        }
    }
    println!();
    report(&bench, args, &runs, nmax);
    if !bench.problems.is_empty() {
        failures.push(wrong(format!(
            "split: {} wrong result(s), first: {}",
            bench.problems.len(),
            bench.problems[0]
        )));
    }
    // The worst failure decides the exit code: a run that could not be made (7) over a wrong
    // result (1).
    match failures.into_iter().max_by_key(|e| e.code) {
        None => Ok(()),
        Some(e) => Err(e),
    }
}

fn describe(suite: &Suite, scale: f64, nmax: u32, exact: bool) {
    let long: Vec<&suite::File> = suite
        .files
        .iter()
        .filter(|f| f.kind == Kind::Long)
        .collect();
    let heavy: Vec<u64> = suite
        .files
        .iter()
        .flat_map(|f| &f.tests)
        .filter(|t| t.ms >= 1000 && t.ms <= 4000)
        .map(|t| t.ms)
        .collect();
    let (_, how) = suite::history(suite, 1.0);
    let count = |r: Recorded| how.iter().filter(|h| **h == r).count();
    note(format!(
        "suite: {} files, {} tests, {} of sleeps at scale 1 ({} at scale {scale}); long files {} ({} each, {:.3} of total/16); {} tests of 1-4 s ({}); {} flaky tests, {} always failing (flaky scenario only)",
        suite.files.len(),
        suite.tests(),
        secs(suite.total_ms() as f64),
        secs(suite.total_ms() as f64 * scale),
        long.iter()
            .map(|f| f.path.as_str())
            .collect::<Vec<_>>()
            .join(", "),
        secs(long.first().map_or(0, |f| f.ms()) as f64),
        long.first().map_or(0, |f| f.ms()) as f64 / (suite.total_ms() as f64 / 16.0),
        heavy.len(),
        heavy
            .iter()
            .map(|ms| format!("{:.1}", *ms as f64 / 1000.0))
            .collect::<Vec<_>>()
            .join(", "),
        suite.flaky().count(),
        suite.always_failing().count(),
    ));
    if exact {
        note("timing history: every unit's true duration (--exact-history)");
    } else {
        note(format!(
            "timing history: {} units recorded 5x too long, {} 5x too short (among them the longest second-long file), {} missing, the rest within 10%",
            count(Recorded::TooLong),
            count(Recorded::TooShort),
            count(Recorded::Missing)
        ));
    }
    let bound = (suite.total_ms() as f64 / f64::from(nmax)).max(suite.longest_ms() as f64);
    let model = |s: Strategy, perfect: bool| {
        suite::simulate(suite, s, nmax, perfect || exact) as f64 / bound
    };
    note(format!(
        "model at N={nmax} (scale 1, no overhead; makespan / bound): dynamic {:.3} with this history, {:.3} with an exact one; hash {:.2}, count {:.2}, timing {:.2}",
        model(Strategy::Dynamic, false),
        model(Strategy::Dynamic, true),
        model(Strategy::Hash, false),
        model(Strategy::Count, false),
        model(Strategy::Timing, false),
    ));
}

fn report(bench: &Bench, args: &SplitArgs, runs: &HashMap<String, Run>, nmax: u32) {
    note("figures (N = runners = shards; makespan = build created -> finished):");
    let runners = args.runners();
    if args.wants(Scenario::Dynamic) {
        for n in &runners {
            let Some(r) = runs.get(&format!("dynamic-{n}")) else {
                continue;
            };
            let goal = *n == 16;
            figure(
                &format!("dynamic N={n}: makespan/bound"),
                format!("{:.3}x", r.ratio()),
                if goal { "goal <= 1.05x" } else { "" },
                goal.then_some(r.ratio() <= 1.05),
                &format!(
                    "makespan {}, bound {}",
                    secs(r.makespan_ms),
                    secs(r.bound_ms())
                ),
            );
        }
    }
    if args.wants(Scenario::Startup) {
        for n in &runners {
            let Some(r) = runs.get(&format!("startup-{n}")) else {
                continue;
            };
            figure(
                &format!(
                    "startup {} ms, N={n}: makespan/(bound + one start)",
                    r.spec.start_ms
                ),
                format!("{:.3}x", r.ratio()),
                "goal <= 1.10x",
                Some(r.ratio() <= 1.10),
                &format!(
                    "makespan {}, bound {} (unit time {} / {n} = {}, + {} ms), {} processes",
                    secs(r.makespan_ms),
                    secs(r.bound_ms()),
                    secs(r.total_ms()),
                    secs(r.total_ms() / f64::from(*n)),
                    r.spec.start_ms,
                    r.traces.len()
                ),
            );
        }
    }
    let dynamic = runs.get(&format!("dynamic-{nmax}"));
    if args.wants(Scenario::Static)
        && let Some(d) = dynamic
    {
        for (s, goal) in [("hash", Some(1.6)), ("count", None), ("timing", Some(1.15))] {
            let Some(r) = runs.get(&format!("{s}-{nmax}")) else {
                continue;
            };
            let x = r.makespan_ms / d.makespan_ms;
            let goal = goal.filter(|_| nmax == 16);
            figure(
                &format!("{s} / dynamic, N={nmax}"),
                format!("{x:.2}x"),
                &goal.map(|g| format!("goal >= {g}x")).unwrap_or_default(),
                goal.map(|g| x >= g),
                &format!(
                    "{s} {} ({:.2}x its bound), dynamic {}",
                    secs(r.makespan_ms),
                    r.ratio(),
                    secs(d.makespan_ms)
                ),
            );
        }
    }
    if args.wants(Scenario::Dynamic)
        && let Some(d) = dynamic
    {
        let o = sorted(&d.overheads());
        if o.is_empty() {
            note("per-unit overhead: no process after a shard's first (nothing to measure)");
        } else {
            let med = percentile(&o, 50.0);
            figure(
                &format!("per-unit overhead N={nmax}, median"),
                format!("{med:.2} ms"),
                "goal < 2 ms",
                Some(med < 2.0),
                &format!("over {} units after each shard's first batch", o.len()),
            );
            figure(
                &format!("per-unit overhead N={nmax}, p99"),
                format!("{:.2} ms", percentile(&o, 99.0)),
                "",
                None,
                &format!("max {:.2} ms", percentile(&o, 100.0)),
            );
        }
        let first = sorted(&d.first_starts());
        if !first.is_empty() {
            note(format!(
                "dynamic N={nmax}: build created -> each shard's first batch started: median {}, max {}; last batch ended -> build finished: {}",
                secs(percentile(&first, 50.0)),
                secs(percentile(&first, 100.0)),
                d.tail_ms().map_or("?".into(), secs)
            ));
        }
    }
    if let Some(r) = runs.get(&format!("flaky-{nmax}")) {
        let s = flaky_stats(&bench.suite, r);
        figure(
            "flaky found / failed once",
            format!("{}/{}", s.found, s.failed_once),
            "",
            None,
            &format!(
                "{} flaky tests; failed every try: {}",
                bench.suite.flaky().count(),
                if s.failed_always.is_empty() {
                    "none".into()
                } else {
                    s.failed_always.join(", ")
                }
            ),
        );
        figure(
            "deterministic labelled flaky",
            s.deterministic_as_flaky.to_string(),
            "goal 0",
            Some(s.deterministic_as_flaky == 0),
            &format!(
                "of {} always-failing tests; rounds {}; {}",
                s.deterministic,
                r.split.rounds,
                if r.split.retry_note.is_empty() {
                    "no retry note".to_string()
                } else {
                    format!("retry note: {}", r.split.retry_note)
                }
            ),
        );
    }
    if let Some(r) = runs.get(&format!("broken-{nmax}")) {
        let (first, retry) = (r.tries_ms(true), r.tries_ms(false));
        let x = retry / first;
        let failed = r
            .split
            .units
            .iter()
            .filter(|u| u.verdict == "failed")
            .count();
        figure(
            "broken: retry / first pass",
            format!("{:.1}%", 100.0 * x),
            "goal <= 5%",
            Some(x <= 0.05),
            &format!(
                "retries {}, first pass {}; {failed} units failed; rounds {}; note: {}",
                secs(retry),
                secs(first),
                r.split.rounds,
                r.split.retry_note
            ),
        );
    }
    if let Some(r) = runs.get(&format!("kill-{nmax}")) {
        let lease = ms(args.lease());
        let limit = r.bound_ms() + lease + r.longest_ms();
        let once = r.split.units.len() == bench.suite.files.len()
            && r.split
                .units
                .iter()
                .all(|u| matches!(u.verdict.as_str(), "passed" | "flaky" | "failed"))
            && r.split
                .units
                .iter()
                .map(|u| &u.unit)
                .collect::<HashSet<_>>()
                .len()
                == r.split.units.len();
        figure(
            "kill: one final verdict each",
            format!(
                "{}/{}",
                r.split
                    .units
                    .iter()
                    .filter(|u| u.verdict != "not_run")
                    .count(),
                bench.suite.files.len()
            ),
            "goal all",
            Some(once),
            &format!(
                "{} killed {} after the submit",
                r.killed.as_ref().map_or("no runner", |k| k.runner.as_str()),
                r.killed.as_ref().map_or("-".into(), |k| secs(k.after_ms))
            ),
        );
        figure(
            "kill: makespan",
            secs(r.makespan_ms),
            &format!("goal <= {}", secs(limit)),
            Some(r.makespan_ms <= limit),
            &format!(
                "bound {} + lease {} + longest {}",
                secs(r.bound_ms()),
                secs(lease),
                secs(r.longest_ms())
            ),
        );
        let mut ran: HashMap<&str, usize> = HashMap::new();
        for t in &r.starts {
            for u in &t.units {
                *ran.entry(u.as_str()).or_default() += 1;
            }
        }
        let mut twice: Vec<&str> = ran
            .iter()
            .filter(|(_, n)| **n > 1)
            .map(|(u, _)| *u)
            .collect();
        twice.sort_unstable();
        let ended: HashSet<u32> = r.traces.iter().map(|t| t.pid).collect();
        let cut = r.starts.iter().filter(|t| !ended.contains(&t.pid)).count();
        note(format!(
            "kill: {cut} batch(es) killed before their end; units started twice: {}",
            if twice.is_empty() {
                "none".to_string()
            } else {
                twice.join(", ")
            }
        ));
    }
    if nmax != 16 {
        note("goals are for N = 16: none is judged at this N");
    }
}

/// Starts the split benchmark's `kiln serve` (data in `data`, its log in `log`, the
/// benchmark's heartbeat settings) on a free loopback port; returns it, its URL and a
/// connected client once it answers.
pub(super) async fn start_dispatcher(
    args: &SplitArgs,
    log: &Path,
    data: &Path,
) -> Result<(Proc, String, BuildServiceClient<Channel>), BenchError> {
    let hb = humantime::format_duration(args.heartbeat_interval).to_string();
    let missed = args.missed_heartbeats.to_string();
    let (serve, addr) = spawn_serve(
        log,
        "127.0.0.1:0",
        data,
        &["--heartbeat-interval", &hb, "--missed-heartbeats", &missed],
    )
    .await?;
    let Some(addr) = addr else {
        return Err(fail(format!(
            "kiln serve did not say where it listens; its log:\n{}",
            tail(log, 20)
        )));
    };
    let url = format!("http://{addr}");
    let client = ready(&url, log).await?;
    Ok((serve, url, client))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        args: SplitArgs,
    }

    #[test]
    fn suite_flags_parse_and_direct_needs_suite() {
        let a = Cli::parse_from(["x", "--suite", "/p", "--suite-runs", "3"]).args;
        assert_eq!(a.suite.as_deref(), Some(Path::new("/p")));
        assert_eq!(a.suite_runs, 3);
        assert_eq!(a.limit(), Duration::from_secs(4 * 3600));
        assert!(Cli::try_parse_from(["x", "--direct", "pytest"]).is_err());
        assert!(Cli::try_parse_from(["x", "--suite", "/p", "--suite-runs", "0"]).is_err());
        assert_eq!(Cli::parse_from(["x"]).args.suite_runs, 5);
    }

    #[test]
    fn the_plan_follows_the_flags() {
        let all = Cli::parse_from(["x"]).args;
        let labels: Vec<String> = all.plan().into_iter().map(|s| s.label).collect();
        assert_eq!(
            labels,
            [
                "warm-up-16",
                "dynamic-1",
                "dynamic-2",
                "dynamic-4",
                "dynamic-8",
                "dynamic-16",
                "hash-16",
                "count-16",
                "timing-16",
                "flaky-16",
                "broken-16",
                "startup-4",
                "startup-16",
                "kill-16"
            ]
        );
        assert!(all.limit() < Duration::from_secs(3600), "{:?}", all.limit());
        let some = Cli::parse_from(["x", "--only", "kill", "--runners", "4,2"]).args;
        let labels: Vec<String> = some.plan().into_iter().map(|s| s.label).collect();
        assert_eq!(labels, ["warm-up-4", "dynamic-4", "kill-4"]);
        let start = Cli::parse_from(["x", "--only", "startup", "--runners", "4,16"]).args;
        let plan = start.plan();
        let labels: Vec<&str> = plan.iter().map(|s| s.label.as_str()).collect();
        assert_eq!(labels, ["warm-up-16", "startup-4", "startup-16"]);
        assert_eq!(plan[0].start_ms, 0);
        assert!(plan[1..].iter().all(|s| s.start_ms == 300));
        let quick = Cli::parse_from(["x", "--quick"]).args;
        assert_eq!(
            split_key("steps:\n  - name: tests\n    run: x {units}\n    parallel: 2\n    units:\n      glob: '*.t'\n")
                .unwrap(),
            "tests"
        );
        assert_eq!(quick.runners(), [1, 4]);
        assert!((quick.scale() - 0.05).abs() < 1e-9);
    }
}

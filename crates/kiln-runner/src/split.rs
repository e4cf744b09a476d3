//! A split step's shard: discover the units in the checkout, then ask the dispatcher for
//! batches (`NextUnits` → `Units`) until it says the split is over, running the step's command
//! once per batch as its own process group and reporting one result per unit with the next
//! request.
//!
//! - Discovery: files matching the globs (relative paths with `/`, sorted; `.git` skipped), or
//!   the lines a command prints (trimmed, blank lines dropped, order kept). At most
//!   [`MAX_UNITS`] units of at most [`MAX_UNIT_LEN`] bytes; more is an error of the step.
//! - A batch's command is the step's `run` with `{units}` replaced by the units, shell-quoted,
//!   and `{junit}` by the path of a fresh JUnit file; the same in `KILN_UNITS` (one per line)
//!   and `KILN_JUNIT`, with `KILN_UNIT_TRY`, `KILN_SHARD` (0-based) and `KILN_SHARDS`.
//! - Per-unit results: exit 0 passes every unit; a failing batch of one unit fails it; a
//!   failing batch of several is judged from its JUnit file when every unit is accounted for
//!   there (see [`judge`]), else each of its units runs again alone, right away, and those runs
//!   decide.
//! - The step's timeout covers the whole step (discovery, batches, waits); a cancel kills the
//!   running batch.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use globset::{GlobBuilder, GlobSetBuilder};
use kiln_domain::split::{TestCase, UnitOutcome};
use kiln_exec::mask::Masker;
use kiln_exec::{StepCommand, Termination};
use rand::Rng;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::Shared;
use super::job::{Capture, Output, StepEnd, exec};
use kiln_domain::StepOutcome;
use kiln_domain::protocol::{self, MAX_CASES, MAX_UNIT_LEN, MAX_UNITS};
use kiln_domain::split::{Interaction, LeasedUnit, UnitReport, UnitSource, UnitsReply};
use kiln_junit::{ReadCase, cap, read_cases};

/// Pause before asking again after a WAIT (with ±25% jitter).
const WAIT: Duration = Duration::from_millis(100);
/// Most bytes a discovery command may print.
const MAX_DISCOVERY_OUTPUT: usize = 64 << 20;
/// Largest JUnit file read.
const MAX_JUNIT_BYTES: u64 = 256 << 20;
/// Largest NextUnits sent: the dispatcher takes runner messages up to
/// [`protocol::MAX_MESSAGE_BYTES`]; keep a margin for the envelope.
pub(super) const MAX_REQUEST_BYTES: usize = protocol::MAX_MESSAGE_BYTES - (64 << 10);
/// Texts of test cases are cut to these, one after the other, while a request is too big.
const SHORT_TEXTS: [usize; 2] = [4096, 128];
/// Longest command line or `KILN_UNITS` of a batch (Linux takes at most 128 KiB per argument
/// or environment string).
const MAX_ARG_BYTES: usize = 96 << 10;
/// Longest list of units in a batch banner, in bytes.
const BANNER_UNITS: usize = 200;

/// A split step to run, and what it runs with.
pub(super) struct Split<'a> {
    pub(super) shared: &'a Shared,
    pub(super) attempt: kiln_domain::AttemptId,
    pub(super) step: &'a protocol::AssignedStep,
    pub(super) spec: &'a protocol::SplitStep,
    /// The checkout.
    pub(super) dir: &'a Path,
    /// The step's environment (job env, step env, secrets, `KILN_STEP`).
    pub(super) env: Vec<(String, String)>,
    pub(super) token: CancellationToken,
    pub(super) masker: &'a Masker,
}

/// How the split ended for this shard.
#[derive(Debug, PartialEq)]
enum End {
    Passed,
    Failed(String),
    Errored(String),
    TimedOut,
    Cancelled,
}

/// Runs the split step to its end (the caller reports StepStarted/StepFinished).
pub(super) async fn run(s: &Split<'_>, output: &mut Output<'_>, message: &mut String) -> StepEnd {
    let start = Instant::now();
    let deadline = (s.step.timeout_ms > 0)
        .then(|| start.checked_add(Duration::from_millis(s.step.timeout_ms)))
        .flatten();
    let mut shard = Shard {
        s,
        output,
        deadline,
        batches: 0,
        interactions: Vec::new(),
        timing: BatchTiming::default(),
    };
    let end = shard.go().await;
    let index = s.step.index;
    let (outcome, summary) = match end {
        End::Passed => (StepOutcome::Passed, "passed"),
        End::Failed(why) => {
            *message = format!("step {}: {why}", s.step.name);
            (StepOutcome::Failed, "failed")
        }
        End::Errored(why) => {
            shard
                .output
                .system(index, format!("kiln: split {}: {why}\n", s.spec.key))
                .await;
            *message = format!("step {}: {why}", s.step.name);
            (StepOutcome::Errored, "errored")
        }
        End::TimedOut => (StepOutcome::TimedOut, "timed out"),
        End::Cancelled => (StepOutcome::Cancelled, "cancelled"),
    };
    StepEnd {
        outcome,
        exit_code: None,
        signal: None,
        duration: start.elapsed(),
        summary: summary.to_string(),
    }
}

/// How one process of a batch ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ran {
    Passed,
    Failed,
    /// Could not start.
    Errored,
}

/// One process run over some units.
struct Process {
    ran: Ran,
    /// How it ended, for the report (`exit status 2`).
    status: String,
    duration: Duration,
    /// The test cases of its JUnit file, when it wrote a readable one.
    cases: Option<Vec<ReadCase>>,
}

struct Shard<'s, 'a, 'o, 'p> {
    s: &'s Split<'a>,
    output: &'o mut Output<'p>,
    deadline: Option<Instant>,
    /// Batches run so far (sub-batches of one answer count apart).
    batches: u32,
    /// Interaction failures to report with the next request.
    interactions: Vec<Interaction>,
    /// The previous answer's processes, to report with the next request.
    timing: BatchTiming,
}

/// Wall time of the processes that ran one answer's units, for the dispatcher to learn the
/// per-process start cost from (wall time less the units' own times).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct BatchTiming {
    wall_ms: u64,
    processes: u32,
    /// False once a process's units' own times were not all known (no test cases for some
    /// unit, or a failed batch re-run unit by unit): nothing to learn then.
    known: bool,
}

impl BatchTiming {
    fn start() -> Self {
        BatchTiming {
            known: true,
            ..BatchTiming::default()
        }
    }

    /// (batch_ms, batch_processes) for the request.
    fn report(self) -> (u64, u32) {
        if self.known && self.processes > 0 {
            (self.wall_ms, self.processes)
        } else {
            (0, 0)
        }
    }
}

/// Each unit's own time, from its test cases, when every unit has some (the sum of its cases'
/// durations); `None` when a unit has none, so its time cannot be told from the batch's.
fn own_times(judged: &[(UnitOutcome, Vec<TestCase>)]) -> Option<Vec<Duration>> {
    judged
        .iter()
        .map(|(_, cases)| {
            (!cases.is_empty()).then(|| {
                Duration::from_millis(
                    cases
                        .iter()
                        .fold(0u64, |a, c| a.saturating_add(c.duration_ms)),
                )
            })
        })
        .collect()
}

impl Shard<'_, '_, '_, '_> {
    async fn log(&mut self, text: String) {
        self.output.system(self.s.step.index, text).await;
    }

    /// Resolves when the step's time is up (never without a timeout).
    async fn expired(&self) {
        match self.deadline {
            Some(d) => tokio::time::sleep_until(d).await,
            None => std::future::pending().await,
        }
    }

    /// Time left for a process, or the end of the step when there is none.
    fn remaining(&self) -> Result<Option<Duration>, End> {
        match self.deadline {
            None => Ok(None),
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    Err(End::TimedOut)
                } else {
                    Ok(Some(left))
                }
            }
        }
    }

    /// The environment of the split's processes.
    fn env(&self) -> Vec<(String, String)> {
        let mut env = self.s.env.clone();
        env.push(("KILN_SHARD".into(), self.s.spec.shard.to_string()));
        env.push(("KILN_SHARDS".into(), self.s.spec.shards.to_string()));
        env
    }

    async fn go(&mut self) -> End {
        let discovered = match self.discover().await {
            Ok(units) => units,
            Err(end) => return end,
        };
        let key = self.s.spec.key.clone();
        self.log(format!(
            "kiln: split {key}: shard {} of {}: {} unit{} found\n",
            self.s.spec.shard + 1,
            self.s.spec.shards,
            discovered.len(),
            if discovered.len() == 1 { "" } else { "s" }
        ))
        .await;
        let mut discovered = Some(discovered);
        let mut results: Vec<UnitReport> = Vec::new();
        let mut request = 0u32;
        loop {
            request += 1;
            let first = discovered.is_some();
            let (batch_ms, batch_processes) = std::mem::take(&mut self.timing).report();
            let mut req = protocol::NextUnits {
                attempt_id: self.s.attempt,
                step_index: self.s.step.index,
                request,
                discovered: discovered.take().unwrap_or_default(),
                results: std::mem::take(&mut results),
                max_units: 0,
                interactions: std::mem::take(&mut self.interactions),
                batch_ms,
                batch_processes,
            };
            if first && req.size() > MAX_REQUEST_BYTES {
                return End::Errored(format!(
                    "the {} units found take {} bytes, more than one request may carry ({} bytes): \
                     use fewer or shorter unit ids",
                    req.discovered.len(),
                    req.size(),
                    MAX_REQUEST_BYTES
                ));
            }
            let stripped = fit_request(&mut req, MAX_REQUEST_BYTES);
            if stripped > 0 {
                self.log(format!(
                    "kiln: split {key}: the test cases of {stripped} unit(s) are left out of the \
                     report (too many to send)\n"
                ))
                .await;
            }
            let answer = tokio::select! {
                a = self.s.shared.ask_units(req, &self.s.token) => a,
                () = self.expired() => {
                    self.s
                        .shared
                        .unit_waiters
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&(self.s.attempt, request));
                    return End::TimedOut;
                }
            };
            let Some(answer) = answer else {
                return End::Cancelled;
            };
            match answer.reply {
                UnitsReply::Batch(units) if !units.is_empty() => {
                    match self.run_batch(units).await {
                        Ok(r) => results = r,
                        Err(end) => return end,
                    }
                }
                UnitsReply::Batch(_) | UnitsReply::Wait => {
                    if let Err(end) = self.pause().await {
                        return end;
                    }
                }
                UnitsReply::Done { passed, summary } => {
                    self.log(format!("kiln: split {key}: {summary}\n")).await;
                    return if passed {
                        End::Passed
                    } else {
                        End::Failed(format!("split {key}: {summary}"))
                    };
                }
                UnitsReply::Refused(why) => {
                    return End::Errored(format!("the dispatcher refused: {why}"));
                }
            }
        }
    }

    /// Sleeps about [`WAIT`] before asking again.
    async fn pause(&self) -> Result<(), End> {
        let ms = WAIT.as_millis() as u64;
        let wait = Duration::from_millis(rand::rng().random_range(ms * 3 / 4..=ms * 5 / 4));
        tokio::select! {
            () = tokio::time::sleep(wait) => Ok(()),
            () = self.s.token.cancelled() => Err(End::Cancelled),
            () = self.expired() => Err(End::TimedOut),
        }
    }

    /// Finds the units in the checkout.
    async fn discover(&mut self) -> Result<Vec<String>, End> {
        let spec = self.s.spec;
        let command = match &spec.units {
            UnitSource::Glob(_) => "",
            UnitSource::Command(c) => c.as_str(),
        };
        if let UnitSource::Glob(globs) = &spec.units
            && !globs.is_empty()
        {
            let (dir, globs) = (self.s.dir.to_path_buf(), globs.clone());
            let found = tokio::select! {
                r = tokio::task::spawn_blocking(move || glob_units(&dir, &globs)) => r,
                () = self.s.token.cancelled() => return Err(End::Cancelled),
                () = self.expired() => return Err(End::TimedOut),
            };
            return match found {
                Ok(Ok(units)) => Ok(units),
                Ok(Err(e)) => Err(End::Errored(format!("unit discovery: {e}"))),
                Err(e) => Err(End::Errored(format!("unit discovery failed: {e}"))),
            };
        }
        if command.trim().is_empty() {
            return Err(End::Errored(
                "the step names no units (neither a glob nor a command)".into(),
            ));
        }
        let first_line = command.lines().next().unwrap_or_default();
        self.log(format!(
            "kiln: split {}: finding units: $ {first_line}\n",
            spec.key
        ))
        .await;
        let cmd = StepCommand {
            script: command.to_string(),
            cwd: self.s.dir.to_path_buf(),
            env: self.env(),
            timeout: self.remaining()?,
            grace: self.s.shared.config.kill_grace,
        };
        let mut capture = Capture {
            data: Vec::new(),
            limit: MAX_DISCOVERY_OUTPUT,
            overflowed: false,
        };
        let index = self.s.step.index;
        let result = exec(
            self.output,
            index,
            &cmd,
            self.s.token.clone(),
            self.s.masker,
            Some(&mut capture),
        )
        .await;
        let exit = match result {
            Ok(exit) => exit,
            Err(e) => {
                return Err(End::Errored(format!(
                    "cannot run the unit discovery command: {}",
                    kiln_domain::error_chain(&e)
                )));
            }
        };
        match exit.termination {
            Termination::Exited(0) => {}
            Termination::TimedOut => return Err(End::TimedOut),
            Termination::Cancelled => return Err(End::Cancelled),
            other => {
                return Err(End::Errored(format!(
                    "the unit discovery command failed ({other})"
                )));
            }
        }
        if capture.overflowed {
            return Err(End::Errored(format!(
                "the unit discovery command printed more than {MAX_DISCOVERY_OUTPUT} bytes"
            )));
        }
        unit_lines(&capture.data).map_err(|e| End::Errored(format!("unit discovery: {e}")))
    }

    /// Runs the units of one answer: one batch per try number, in the order given.
    async fn run_batch(&mut self, units: Vec<LeasedUnit>) -> Result<Vec<UnitReport>, End> {
        let mut results = Vec::with_capacity(units.len());
        self.timing = BatchTiming::start();
        for (try_number, group) in by_try(units) {
            for chunk in fit_args(group, self.s.step.run.len()) {
                self.batches += 1;
                let k = self.batches;
                let span = tracing::info_span!("batch", batch = k, try_number, units = chunk.len());
                results.extend(
                    self.run_group(k, try_number, chunk)
                        .instrument(span)
                        .await?,
                );
            }
        }
        Ok(results)
    }

    /// Runs a batch of units sharing a try number, and its units one by one if that is needed
    /// to tell which failed.
    async fn run_group(
        &mut self,
        k: u32,
        try_number: u32,
        units: Vec<String>,
    ) -> Result<Vec<UnitReport>, End> {
        self.log(format!(
            "kiln: batch {k}: {} unit{} (try {try_number}): {}\n",
            units.len(),
            if units.len() == 1 { "" } else { "s" },
            banner_list(&units)
        ))
        .await;
        let label = format!("batch {k}");
        let batch = self
            .process(
                &label,
                &units,
                try_number,
                &format!("{}-{k}", self.s.attempt),
            )
            .await?;
        let n = units.len().max(1) as u32;
        let share = batch.duration / n;
        if let Some(judged) = judge(&units, batch.ran, batch.cases.as_deref()) {
            // Each unit's own time when its test cases tell it (so the batch's wall time less
            // theirs is the process's start cost), else its share of the batch's.
            let own = own_times(&judged);
            match &own {
                Some(_) => {
                    self.timing.wall_ms = self
                        .timing
                        .wall_ms
                        .saturating_add(u64::try_from(batch.duration.as_millis()).unwrap_or(0));
                    self.timing.processes += 1;
                }
                None => self.timing.known = false,
            }
            let times = own.unwrap_or_else(|| vec![share; units.len()]);
            return Ok(units
                .into_iter()
                .zip(judged)
                .zip(times)
                .map(|((unit, (outcome, cases)), t)| result(unit, try_number, outcome, t, cases))
                .collect());
        }
        self.timing.known = false;
        self.log(format!(
            "kiln: batch {k} failed; running its units one by one\n"
        ))
        .await;
        let mut results = Vec::with_capacity(units.len());
        let total = units.len();
        for (i, unit) in units.into_iter().enumerate() {
            self.log(format!(
                "kiln: batch {k}, unit {} of {total} alone (try {try_number}): {}\n",
                i + 1,
                shorten(&unit, BANNER_UNITS)
            ))
            .await;
            let one = [unit];
            let label = format!("batch {k}, unit {}", i + 1);
            let name = format!("{}-{k}-{}", self.s.attempt, i + 1);
            let p = self.process(&label, &one, try_number, &name).await?;
            let [unit] = one;
            let (outcome, cases) = judge(std::slice::from_ref(&unit), p.ran, p.cases.as_deref())
                .and_then(|j| j.into_iter().next())
                .unwrap_or((UnitOutcome::Errored, Vec::new()));
            results.push(result(unit, try_number, outcome, p.duration, cases));
        }
        if interacts(batch.ran, &results) {
            self.log(format!(
                "kiln: batch {k} failed ({}) but each of its units passed alone: an interaction \
                 failure between {}\n",
                batch.status,
                banner_list(&units_of(&results))
            ))
            .await;
            self.interactions.push(Interaction {
                units: units_of(&results),
                try_number,
                detail: batch.status,
                runner: None,
            });
        }
        Ok(results)
    }

    /// Runs the step's command once over `units`; `label` names the run in the log, `name` its
    /// JUnit file.
    async fn process(
        &mut self,
        label: &str,
        units: &[String],
        try_number: u32,
        name: &str,
    ) -> Result<Process, End> {
        let junit_dir = self.s.shared.config.work_dir.join("junit");
        let junit = junit_dir.join(format!("{name}.xml"));
        if let Err(e) = tokio::fs::create_dir_all(&junit_dir).await {
            self.log(format!(
                "kiln: cannot create {}: {e}\n",
                junit_dir.display()
            ))
            .await;
        }
        let _ = tokio::fs::remove_file(&junit).await;
        let junit_text = junit.to_string_lossy().into_owned();
        let script = match substitute(&self.s.step.run, units, &junit_text) {
            Ok(script) => script,
            Err(e) => {
                self.log(format!("kiln: {label}: cannot run: {e}\n")).await;
                return Ok(Process {
                    ran: Ran::Errored,
                    status: "could not start".into(),
                    duration: Duration::ZERO,
                    cases: None,
                });
            }
        };
        let mut env = self.env();
        env.push(("KILN_UNITS".into(), units.join("\n")));
        env.push(("KILN_UNIT_TRY".into(), try_number.to_string()));
        env.push(("KILN_JUNIT".into(), junit_text));
        let cmd = StepCommand {
            script,
            cwd: self.s.dir.to_path_buf(),
            env,
            timeout: self.remaining()?,
            grace: self.s.shared.config.kill_grace,
        };
        let index = self.s.step.index;
        let result = exec(
            self.output,
            index,
            &cmd,
            self.s.token.clone(),
            self.s.masker,
            None,
        )
        .await;
        let mut status = String::new();
        let (ran, duration) = match result {
            Ok(exit) => {
                status = exit.termination.to_string();
                let ran = match exit.termination {
                    Termination::Exited(0) => Ran::Passed,
                    Termination::Exited(_) | Termination::Signaled(_) => Ran::Failed,
                    Termination::TimedOut => {
                        let _ = tokio::fs::remove_file(&junit).await;
                        return Err(End::TimedOut);
                    }
                    Termination::Cancelled => {
                        let _ = tokio::fs::remove_file(&junit).await;
                        return Err(End::Cancelled);
                    }
                };
                if ran == Ran::Failed {
                    self.log(format!("kiln: {label}: {}\n", exit.termination))
                        .await;
                }
                (ran, exit.duration)
            }
            Err(e) => {
                self.log(format!(
                    "kiln: {label}: cannot run: {}\n",
                    kiln_domain::error_chain(&e)
                ))
                .await;
                (Ran::Errored, Duration::ZERO)
            }
        };
        let cases = match read_junit(&junit).await {
            Ok(cases) => cases,
            Err(e) => {
                self.log(format!("kiln: {label}: cannot read the JUnit file: {e}\n"))
                    .await;
                None
            }
        };
        let _ = tokio::fs::remove_file(&junit).await;
        Ok(Process {
            ran,
            status,
            duration,
            cases,
        })
    }
}

/// The cases of a JUnit file; `None` when there is no file.
pub(super) async fn read_junit(path: &Path) -> Result<Option<Vec<ReadCase>>, String> {
    let meta = match tokio::fs::metadata(path).await {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.to_string()),
    };
    if !meta.is_file() {
        return Err("not a file".into());
    }
    if meta.len() > MAX_JUNIT_BYTES {
        return Err(format!("{} bytes, more than {MAX_JUNIT_BYTES}", meta.len()));
    }
    let bytes = tokio::fs::read(path).await.map_err(|e| e.to_string())?;
    let cases = tokio::task::spawn_blocking(move || read_cases(&String::from_utf8_lossy(&bytes)))
        .await
        .map_err(|e| e.to_string())??;
    Ok(Some(cases))
}

/// A unit's result for the next request.
fn result(
    unit: String,
    try_number: u32,
    outcome: UnitOutcome,
    duration: Duration,
    mut cases: Vec<TestCase>,
) -> UnitReport {
    cases.truncate(MAX_CASES);
    UnitReport {
        unit,
        try_number,
        outcome,
        duration_ms: u64::try_from(duration.as_millis()).unwrap_or(u64::MAX),
        cases,
    }
}

/// Keeps a request under `max` bytes by cutting the texts of test cases (saying so in each),
/// then leaving out the test cases of the units with the most; returns how many units lost
/// their cases.
fn fit_request(req: &mut protocol::NextUnits, max: usize) -> usize {
    if req.size() <= max {
        return 0;
    }
    for short in SHORT_TEXTS {
        if req.size() <= max {
            return 0;
        }
        for r in &mut req.results {
            for c in &mut r.cases {
                for text in [
                    &mut c.message,
                    &mut c.body,
                    &mut c.system_out,
                    &mut c.system_err,
                ] {
                    if text.len() > short + 64 {
                        *text = cap(std::mem::take(text), short);
                    }
                }
            }
        }
    }
    let mut order: Vec<usize> = (0..req.results.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(req.results[i].cases.len()));
    let mut stripped = 0;
    for i in order {
        if req.size() <= max || req.results[i].cases.is_empty() {
            break;
        }
        req.results[i].cases = Vec::new();
        stripped += 1;
    }
    stripped
}

/// Cuts a batch into batches whose command line (`run` with the units quoted) and
/// `KILN_UNITS` each stay under [`MAX_ARG_BYTES`]: Linux refuses to start a process with a
/// longer argument or environment string.
fn fit_args(units: Vec<String>, run_len: usize) -> Vec<Vec<String>> {
    let mut out: Vec<Vec<String>> = Vec::new();
    let (mut quoted, mut plain) = (0usize, 0usize);
    for u in units {
        // With the space (or newline) that separates it from the next.
        let q = shlex::try_quote(&u).map_or(u.len(), |q| q.len()) + 1;
        let p = u.len() + 1;
        let fits = run_len + quoted + q <= MAX_ARG_BYTES && plain + p <= MAX_ARG_BYTES;
        match out.last_mut() {
            Some(last) if fits => last.push(u),
            _ => {
                (quoted, plain) = (0, 0);
                out.push(vec![u]);
            }
        }
        quoted += q;
        plain += p;
    }
    out
}

/// Whether a batch that ended `ran` and whose units, run alone, gave `alone` failed only
/// together: the batch failed, and every unit passed alone.
fn interacts(ran: Ran, alone: &[UnitReport]) -> bool {
    ran == Ran::Failed && alone.len() > 1 && alone.iter().all(|r| r.outcome == UnitOutcome::Passed)
}

fn units_of(results: &[UnitReport]) -> Vec<String> {
    results.iter().map(|r| r.unit.clone()).collect()
}

/// Units grouped by try number, groups in order of first appearance.
fn by_try(units: Vec<LeasedUnit>) -> Vec<(u32, Vec<String>)> {
    let mut groups: Vec<(u32, Vec<String>)> = Vec::new();
    for u in units {
        match groups.iter_mut().find(|(t, _)| *t == u.try_number) {
            Some((_, g)) => g.push(u.unit),
            None => groups.push((u.try_number, vec![u.unit])),
        }
    }
    groups
}

/// The outcome and test cases of each unit of a process over `units`, or `None` when they
/// cannot be told apart (a failing batch of several units without a JUnit file that accounts
/// for each): then each unit must run alone.
///
/// A failing batch is judged from its JUnit file when at least one failing case belongs to a
/// unit, every failing case belongs to one, and every unit without a failing case has at least
/// one case (so it did run).
fn judge(
    units: &[String],
    ran: Ran,
    cases: Option<&[ReadCase]>,
) -> Option<Vec<(UnitOutcome, Vec<TestCase>)>> {
    let cases = cases.unwrap_or_default();
    if ran == Ran::Errored {
        return Some(vec![(UnitOutcome::Errored, Vec::new()); units.len()]);
    }
    if units.len() == 1 {
        let outcome = match ran {
            Ran::Passed => UnitOutcome::Passed,
            _ => UnitOutcome::Failed,
        };
        return Some(vec![(
            outcome,
            cases.iter().map(ReadCase::to_case).collect(),
        )]);
    }
    let owners = attribute(units, cases);
    let mut per_unit: Vec<Vec<TestCase>> = vec![Vec::new(); units.len()];
    let mut failing = vec![false; units.len()];
    let mut unowned_failure = false;
    for (case, owner) in cases.iter().zip(&owners) {
        match owner {
            Some(u) => {
                failing[*u] |= case.outcome != UnitOutcome::Passed;
                per_unit[*u].push(case.to_case());
            }
            None => unowned_failure |= case.outcome != UnitOutcome::Passed,
        }
    }
    if ran == Ran::Passed {
        return Some(
            per_unit
                .into_iter()
                .map(|c| (UnitOutcome::Passed, c))
                .collect(),
        );
    }
    let accounted = !unowned_failure
        && failing.iter().any(|&f| f)
        && failing
            .iter()
            .zip(&per_unit)
            .all(|(&f, c)| f || !c.is_empty());
    if !accounted {
        return None;
    }
    Some(
        failing
            .into_iter()
            .zip(per_unit)
            .map(|(f, c)| {
                let outcome = if f {
                    UnitOutcome::Failed
                } else {
                    UnitOutcome::Passed
                };
                (outcome, c)
            })
            .collect(),
    )
}

/// The unit (index into `units`) each case belongs to, if any: the unit whose path without
/// extension is the case's `file` without extension, or its class name with dots as slashes
/// (or a leading part of it: pytest writes `tests.test_foo.TestX` for a class in
/// `tests/test_foo.py`); a case without a class name is tried by its name (pytest names a
/// module that failed to import that way). The longest match wins.
fn attribute(units: &[String], cases: &[ReadCase]) -> Vec<Option<usize>> {
    let mut stems: HashMap<String, usize> = HashMap::new();
    for (i, u) in units.iter().enumerate() {
        stems.entry(stem(u)).or_insert(i);
    }
    cases
        .iter()
        .map(|c| {
            if let Some(file) = &c.file {
                let file = stem(file);
                if let Some(&i) = stems.get(&file) {
                    return Some(i);
                }
                // An absolute path: the unit is a trailing part of it.
                let by_suffix = stems
                    .iter()
                    .filter(|(s, _)| {
                        file.len() > s.len()
                            && file.ends_with(s.as_str())
                            && file.as_bytes()[file.len() - s.len() - 1] == b'/'
                    })
                    .max_by_key(|(s, _)| s.len())
                    .map(|(_, &i)| i);
                if by_suffix.is_some() {
                    return by_suffix;
                }
            }
            let dotted = if c.classname.is_empty() {
                &c.name
            } else {
                &c.classname
            };
            let path = dotted.replace('.', "/");
            let mut prefix = path.as_str();
            loop {
                if let Some(&i) = stems.get(prefix) {
                    return Some(i);
                }
                prefix = &prefix[..prefix.rfind('/')?];
            }
        })
        .collect()
}

/// A unit or file path without a leading `./` and without the extension of its last part.
fn stem(path: &str) -> String {
    let path = path.trim_start_matches("./");
    let name_at = path.rfind('/').map_or(0, |i| i + 1);
    match path[name_at..].rfind('.') {
        Some(dot) if dot > 0 => path[..name_at + dot].to_string(),
        _ => path.to_string(),
    }
}

/// The step's `run` with `{units}` replaced by the units, shell-quoted and space-separated, and
/// `{junit}` by the quoted JUnit path, in one pass (a unit containing `{junit}` stays as is).
pub fn substitute(run: &str, units: &[String], junit: &str) -> Result<String, String> {
    let quoted_units = shlex::try_join(units.iter().map(String::as_str))
        .map_err(|e| format!("a unit id cannot be quoted: {e}"))?;
    let quoted_junit =
        shlex::try_quote(junit).map_err(|e| format!("the JUnit path cannot be quoted: {e}"))?;
    let mut out = String::with_capacity(run.len() + quoted_units.len());
    let mut rest = run;
    while let Some(i) = rest.find('{') {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        if let Some(after) = tail.strip_prefix("{units}") {
            out.push_str(&quoted_units);
            rest = after;
        } else if let Some(after) = tail.strip_prefix("{junit}") {
            out.push_str(&quoted_junit);
            rest = after;
        } else {
            out.push('{');
            rest = &tail[1..];
        }
    }
    out.push_str(rest);
    Ok(out)
}

/// Checks one unit id.
fn check_unit(unit: &str) -> Result<(), String> {
    if unit.len() > MAX_UNIT_LEN || unit.contains(['\n', '\0']) {
        return Err(format!(
            "unit id {:?} is longer than {MAX_UNIT_LEN} bytes or holds a newline or NUL",
            shorten(unit, 80)
        ));
    }
    Ok(())
}

/// Too many units.
fn too_many() -> String {
    format!("more than {MAX_UNITS} units")
}

/// Files of `dir` matching any of `globs` (`*` does not cross `/`, `**` does), as relative
/// paths with `/`, sorted; `.git` is skipped.
pub fn glob_units(dir: &Path, globs: &[String]) -> Result<Vec<String>, String> {
    let mut set = GlobSetBuilder::new();
    for g in globs {
        let pattern = g.trim().trim_start_matches("./");
        let glob = GlobBuilder::new(pattern)
            .literal_separator(true)
            .build()
            .map_err(|e| format!("bad glob {g:?}: {e}"))?;
        set.add(glob);
    }
    let set = set.build().map_err(|e| format!("bad globs: {e}"))?;
    let mut units = Vec::new();
    let walk = walkdir::WalkDir::new(dir)
        .min_depth(1)
        .follow_links(false)
        .into_iter()
        .filter_entry(|e| e.file_name() != ".git");
    for entry in walk {
        let entry = entry.map_err(|e| format!("cannot list the checkout: {e}"))?;
        let is_file = entry.file_type().is_file()
            || (entry.file_type().is_symlink() && entry.path().is_file());
        if !is_file {
            continue;
        }
        let rel = relative(dir, entry.path())?;
        if set.is_match(&rel) {
            check_unit(&rel)?;
            units.push(rel);
            if units.len() > MAX_UNITS {
                return Err(too_many());
            }
        }
    }
    units.sort();
    Ok(units)
}

/// `path` relative to `dir`, parts joined with `/`.
fn relative(dir: &Path, path: &Path) -> Result<String, String> {
    let rel: PathBuf = path
        .strip_prefix(dir)
        .map_err(|_| format!("{} is outside the checkout", path.display()))?
        .to_path_buf();
    let mut parts = Vec::new();
    for c in rel.components() {
        match c.as_os_str().to_str() {
            Some(s) => parts.push(s),
            None => return Err(format!("file name {:?} is not UTF-8", rel.display())),
        }
    }
    Ok(parts.join("/"))
}

/// Unit ids from a discovery command's output: lines trimmed, blank ones dropped, repeats
/// dropped, order kept.
fn unit_lines(out: &[u8]) -> Result<Vec<String>, String> {
    let text = std::str::from_utf8(out)
        .map_err(|e| format!("the discovery command printed something not UTF-8: {e}"))?;
    let mut seen = HashSet::new();
    let mut units = Vec::new();
    for line in text.lines() {
        let unit = line.trim();
        if unit.is_empty() {
            continue;
        }
        check_unit(unit)?;
        if seen.insert(unit) {
            units.push(unit.to_string());
            if units.len() > MAX_UNITS {
                return Err(too_many());
            }
        }
    }
    Ok(units)
}

/// `s` cut to at most `max` bytes at a character boundary, with `…` when cut.
fn shorten(s: &str, max: usize) -> Cow<'_, str> {
    if s.len() <= max {
        return Cow::Borrowed(s);
    }
    let mut end = max.saturating_sub('…'.len_utf8());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    Cow::Owned(format!("{}…", &s[..end]))
}

/// The units of a batch for its banner: as many as fit in [`BANNER_UNITS`] bytes, then how
/// many more.
fn banner_list(units: &[String]) -> String {
    let mut out = String::new();
    for (i, u) in units.iter().enumerate() {
        if i == 0 {
            out.push_str(&shorten(u, BANNER_UNITS));
            continue;
        }
        if out.len() + 2 + u.len() > BANNER_UNITS {
            out.push_str(&format!(", … ({} more)", units.len() - i));
            break;
        }
        out.push_str(", ");
        out.push_str(u);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn case(classname: &str, name: &str, file: Option<&str>, failed: bool) -> ReadCase {
        ReadCase {
            name: name.into(),
            classname: classname.into(),
            file: file.map(str::to_string),
            outcome: if failed {
                UnitOutcome::Failed
            } else {
                UnitOutcome::Passed
            },
            skipped: false,
            duration_ms: 3,
            message: if failed { "boom".into() } else { String::new() },
            body: String::new(),
            system_out: String::new(),
            system_err: String::new(),
        }
    }

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    fn write(dir: &Path, rel: &str) {
        let path = dir.join(rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).unwrap_or_default();
        }
        std::fs::write(path, b"x").unwrap_or_default();
    }

    #[test]
    fn globs_find_files_sorted_and_skip_git() {
        let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let dir = tmp.path();
        for f in [
            "tests/test_b.py",
            "tests/test_a.py",
            "tests/helper.py",
            "tests/sub/test_c.py",
            "tests/sub/deeper/test_d.py",
            ".git/tests/test_x.py",
            "sub/.git/test_y.py",
            "other/test_e.py",
        ] {
            write(dir, f);
        }
        let found = glob_units(dir, &strings(&["tests/test_*.py"]));
        assert_eq!(
            found,
            Ok(strings(&["tests/test_a.py", "tests/test_b.py"])),
            "* does not cross /"
        );
        let found = glob_units(dir, &strings(&["./tests/**/test_*.py", "other/*.py"]));
        assert_eq!(
            found,
            Ok(strings(&[
                "other/test_e.py",
                "tests/sub/deeper/test_d.py",
                "tests/sub/test_c.py",
                "tests/test_a.py",
                "tests/test_b.py",
            ]))
        );
        let all = glob_units(dir, &strings(&["**/test_*.py"])).unwrap_or_default();
        assert!(all.iter().all(|u| !u.contains(".git")), "{all:?}");
        assert_eq!(glob_units(dir, &strings(&["nothing/*"])), Ok(vec![]));
        assert!(glob_units(dir, &strings(&["tests/[a"])).is_err());
    }

    #[test]
    fn command_lines_are_trimmed_deduplicated_and_checked() {
        let out = b"  case_2 \n\ncase_1\r\ncase_2\n   \ncase_3";
        assert_eq!(
            unit_lines(out),
            Ok(strings(&["case_2", "case_1", "case_3"]))
        );
        assert_eq!(unit_lines(b""), Ok(vec![]));
        assert!(unit_lines(b"\xff\xfe\n").is_err());
        let long = "x".repeat(MAX_UNIT_LEN + 1);
        assert!(unit_lines(long.as_bytes()).is_err());
        assert!(unit_lines(b"a\0b\n").is_err());
        let ok = "y".repeat(MAX_UNIT_LEN);
        assert_eq!(unit_lines(ok.as_bytes()).map(|v| v.len()), Ok(1));
        let many: String = (0..=MAX_UNITS).map(|i| format!("u{i}\n")).collect();
        assert!(unit_lines(many.as_bytes()).is_err());
    }

    #[test]
    fn units_and_junit_are_substituted_quoted_in_one_pass() {
        let units = strings(&["tests/a b.py", "it's.py", "$(rm -rf x)", "{junit}", "plain"]);
        let s = substitute(
            "pytest --junitxml={junit} {units} {other} {",
            &units,
            "/w/junit/7-1.xml",
        );
        let s = s.unwrap_or_default();
        assert!(s.starts_with("pytest --junitxml=/w/junit/7-1.xml "), "{s}");
        assert!(s.ends_with(" {other} {"), "{s}");
        // The shell gives back exactly the units.
        let words = shlex::split(&s).unwrap_or_default();
        assert_eq!(&words[2..7], units.as_slice(), "{s}");
        assert_eq!(
            substitute("run {units}", &strings(&["a"]), "/tmp/j x.xml"),
            Ok("run a".to_string())
        );
        assert_eq!(
            substitute("r {junit}", &[], "/tmp/j x.xml"),
            Ok("r '/tmp/j x.xml'".to_string())
        );
        assert!(substitute("{units}", &strings(&["a\0"]), "j").is_err());
    }

    #[test]
    fn the_shell_runs_quoted_units_as_given() {
        let units = strings(&["a b", "it's", "$HOME", "*", "\"q\""]);
        let script = substitute("printf '%s\\n' {units}", &units, "j").unwrap_or_default();
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(&script)
            .current_dir(std::env::temp_dir())
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        assert_eq!(out.lines().collect::<Vec<_>>(), units);
    }

    #[test]
    fn stems_drop_the_extension_of_the_last_part_only() {
        assert_eq!(stem("tests/test_a.py"), "tests/test_a");
        assert_eq!(stem("./tests/v1.2/test_a"), "tests/v1.2/test_a");
        assert_eq!(stem("case_0"), "case_0");
        assert_eq!(stem("tests/.hidden"), "tests/.hidden");
    }

    #[test]
    fn cases_are_attributed_by_file_or_classname() {
        let units = strings(&["tests/test_a.py", "tests/test_b.py", "tests/sub/test_c.py"]);
        let cases = vec![
            case("tests.test_a", "test_1", None, false),
            case("tests.test_a.TestX", "test_2", None, true),
            case("whatever", "test_3", Some("tests/test_b.py"), false),
            case("", "tests.sub.test_c", None, true),
            case("x", "t", Some("/tmp/checkout/tests/sub/test_c.py"), false),
            case("tests.test_z", "test_4", None, false),
            case("tests", "test_5", None, false),
        ];
        assert_eq!(
            attribute(&units, &cases),
            vec![Some(0), Some(0), Some(1), Some(2), Some(2), None, None]
        );
    }

    fn outcomes(j: &Option<Vec<(UnitOutcome, Vec<TestCase>)>>) -> Option<Vec<UnitOutcome>> {
        j.as_ref().map(|v| v.iter().map(|(o, _)| *o).collect())
    }

    #[test]
    fn judging_batches() {
        use UnitOutcome::*;
        let two = strings(&["tests/test_a.py", "tests/test_b.py"]);
        let a_fails = vec![
            case("tests.test_a", "t1", None, true),
            case("tests.test_a", "t2", None, false),
            case("tests.test_b", "t1", None, false),
        ];
        // A passing batch passes every unit, cases going to their units.
        let j = judge(&two, Ran::Passed, Some(&a_fails[1..]));
        assert_eq!(outcomes(&j), Some(vec![Passed, Passed]));
        assert_eq!(j.as_ref().map(|v| v[0].1.len()), Some(1));
        assert_eq!(
            outcomes(&judge(&two, Ran::Passed, None)),
            Some(vec![Passed, Passed])
        );
        // A failing batch with a JUnit file accounting for every unit.
        let j = judge(&two, Ran::Failed, Some(&a_fails));
        assert_eq!(outcomes(&j), Some(vec![Failed, Passed]));
        assert_eq!(
            j.as_ref().map(|v| (v[0].1.len(), v[1].1.len())),
            Some((2, 1))
        );
        // Doubts: no file; no failing case; a unit without cases; a failure of no unit.
        assert_eq!(judge(&two, Ran::Failed, None), None);
        assert_eq!(judge(&two, Ran::Failed, Some(&a_fails[1..])), None);
        assert_eq!(judge(&two, Ran::Failed, Some(&a_fails[..2])), None);
        let mut stray = a_fails.clone();
        stray.push(case("conftest", "setup", None, true));
        assert_eq!(judge(&two, Ran::Failed, Some(&stray)), None);
        // One unit: its exit status decides, every case is its own.
        let one = strings(&["case_5"]);
        let j = judge(&one, Ran::Failed, Some(&a_fails));
        assert_eq!(outcomes(&j), Some(vec![Failed]));
        assert_eq!(j.as_ref().map(|v| v[0].1.len()), Some(3));
        assert_eq!(
            outcomes(&judge(&one, Ran::Failed, None)),
            Some(vec![Failed])
        );
        assert_eq!(
            outcomes(&judge(&one, Ran::Passed, None)),
            Some(vec![Passed])
        );
        // A process that could not start errs every unit.
        assert_eq!(
            outcomes(&judge(&two, Ran::Errored, None)),
            Some(vec![Errored, Errored])
        );
    }

    #[test]
    fn units_are_grouped_by_try() {
        let leased = |u: &str, t: u32| LeasedUnit {
            unit: u.into(),
            try_number: t,
        };
        let groups = by_try(vec![
            leased("a", 2),
            leased("b", 1),
            leased("c", 2),
            leased("d", 1),
        ]);
        assert_eq!(
            groups,
            vec![(2, strings(&["a", "c"])), (1, strings(&["b", "d"]))]
        );
    }

    #[test]
    fn long_batches_are_cut_to_fit_a_command_line() {
        let units: Vec<String> = (0..9000).map(|i| format!("tests/unit {i:04}.py")).collect();
        let chunks = fit_args(units.clone(), 100);
        assert!(chunks.len() > 1);
        assert_eq!(chunks.concat(), units, "nothing lost, order kept");
        for c in &chunks {
            let script = substitute(&format!("{}{{units}}", "x".repeat(93)), c, "j");
            assert!(script.map(|s| s.len()).unwrap_or(usize::MAX) <= MAX_ARG_BYTES);
            assert!(c.join("\n").len() <= MAX_ARG_BYTES);
        }
        assert_eq!(
            fit_args(strings(&["a", "b"]), 10),
            vec![strings(&["a", "b"])]
        );
        assert_eq!(fit_args(Vec::new(), 10), Vec::<Vec<String>>::new());
        // A unit longer than the budget still runs, alone.
        let huge = "'".repeat(4096);
        let chunks = fit_args(vec![huge.clone(), "b".into()], MAX_ARG_BYTES);
        assert_eq!(chunks, vec![vec![huge], strings(&["b"])]);
    }

    #[test]
    fn banners_are_short() {
        assert_eq!(banner_list(&strings(&["a", "b", "c"])), "a, b, c");
        let many: Vec<String> = (0..100).map(|i| format!("tests/test_{i:03}.py")).collect();
        let b = banner_list(&many);
        assert!(b.len() < BANNER_UNITS + 30, "{b}");
        assert!(b.ends_with("more)"), "{b}");
        assert!(banner_list(&["é".repeat(500)]).len() <= BANNER_UNITS);
    }

    #[test]
    fn oversized_requests_lose_cases_not_results() {
        let big_case = TestCase {
            name: "t".repeat(1000),
            classname: String::new(),
            outcome: UnitOutcome::Passed,
            skipped: false,
            duration_ms: 0,
            message: "m".repeat(5000),
            body: String::new(),
            system_out: String::new(),
            system_err: String::new(),
        };
        let mut req = protocol::NextUnits {
            request: 2,
            results: (0..4)
                .map(|i| UnitReport {
                    unit: format!("u{i}"),
                    try_number: 1,
                    outcome: UnitOutcome::Passed,
                    duration_ms: 1,
                    cases: vec![big_case.clone(); 10 * (i + 1)],
                })
                .collect(),
            ..Default::default()
        };
        assert_eq!(fit_request(&mut req.clone(), 1 << 20), 0);
        let stripped = fit_request(&mut req, 30_000);
        assert!(req.size() <= 30_000, "{}", req.size());
        assert_eq!(req.results.len(), 4);
        assert!(stripped >= 1);
        assert!(req.results[3].cases.is_empty(), "the biggest go first");
        assert!(!req.results[0].cases.is_empty());
    }

    #[test]
    fn own_times_come_from_the_cases_and_the_rest_is_start_up() {
        let case = |ms| TestCase {
            name: "t".into(),
            classname: String::new(),
            outcome: UnitOutcome::Passed,
            skipped: false,
            duration_ms: ms,
            message: String::new(),
            body: String::new(),
            system_out: String::new(),
            system_err: String::new(),
        };
        let judged = vec![
            (UnitOutcome::Passed, vec![case(10), case(20)]),
            (UnitOutcome::Passed, vec![case(5)]),
        ];
        assert_eq!(
            own_times(&judged),
            Some(vec![Duration::from_millis(30), Duration::from_millis(5)])
        );
        // A unit without cases: its time cannot be told apart from the batch's.
        let partial = vec![judged[0].clone(), (UnitOutcome::Passed, Vec::new())];
        assert_eq!(own_times(&partial), None);
        // Reported only when every process of the answer was timed.
        let mut t = BatchTiming::start();
        t.wall_ms = 400;
        t.processes = 1;
        assert_eq!(t.report(), (400, 1));
        t.known = false;
        assert_eq!(t.report(), (0, 0));
        assert_eq!(BatchTiming::default().report(), (0, 0));
        assert_eq!(BatchTiming::start().report(), (0, 0));
    }

    #[test]
    fn shorten_cuts_at_char_boundaries() {
        assert_eq!(shorten("abc", 10), "abc");
        let long = "é".repeat(10);
        let s = shorten(&long, 8);
        assert!(s.len() <= 8 && s.ends_with('…'), "{s}");
    }
}

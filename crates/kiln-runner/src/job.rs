//! Runs one assignment: check the commit out, run its steps in order as child processes, and
//! report everything through the outbox. Secrets' values are masked in the output before it is
//! queued, so they never leave the machine.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use kiln_exec::mask::Masker;
use kiln_exec::{StepCommand, Stream, Termination};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use kiln_domain::protocol::{self, OutputStream, RunnerMessage as Out};
use kiln_domain::split::TestCase;
use kiln_domain::{AttemptId, JobState, StepOutcome};

use super::{Shared, split};

/// Numbers an attempt's output chunks and queues them.
pub(super) struct Output<'a> {
    shared: &'a Shared,
    attempt: AttemptId,
    seq: u64,
}

impl Output<'_> {
    pub(super) async fn chunk(&mut self, step: u32, stream: OutputStream, data: Bytes) {
        self.seq += 1;
        let bytes = data.len();
        let msg = Out::Output(protocol::OutputChunk {
            attempt_id: self.attempt,
            seq: self.seq,
            step_index: step,
            stream,
            data,
        });
        self.shared
            .outbox
            .push_output(self.attempt, self.seq, msg, bytes)
            .await;
    }

    /// A line of kiln's own (a banner, a summary) in the step's log.
    pub(super) async fn system(&mut self, step: u32, text: String) {
        self.chunk(step, OutputStream::System, Bytes::from(text))
            .await;
    }
}

/// Runs the assignment to its end; the final `JobFinished` is in the outbox when this returns.
pub(super) async fn run(
    shared: &Arc<Shared>,
    a: protocol::Assign,
    cancel: CancellationToken,
    slot: u32,
) {
    let attempt = a.attempt_id;
    let mut output = Output {
        shared,
        attempt,
        seq: 0,
    };
    output
        .system(
            0,
            format!(
                "kiln: job {} attempt {} on {}: checking out {} of {}\n",
                a.job_id, a.attempt_number, shared.config.name, a.commit, a.repo_url
            ),
        )
        .await;
    // One work tree per slot, reused: the next checkout cleans it (cheaper than a new one).
    let dir = shared
        .config
        .work_dir
        .join("checkouts")
        .join(format!("slot-{slot}"));
    let checkout = {
        let shared = shared.clone();
        let (url, commit, dir) = (a.repo_url.clone(), a.commit.clone(), dir.clone());
        tokio::task::spawn_blocking(move || shared.mirrors.checkout(&url, &commit, &dir))
            .instrument(tracing::info_span!("checkout", commit = %a.commit))
            .await
    };
    let checkout_error = match checkout {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(kiln_domain::error_chain(&e)),
        Err(e) => Some(format!("checkout task failed: {e}")),
    };
    if let Some(err) = checkout_error {
        output
            .system(0, format!("kiln: checkout failed: {err}\n"))
            .await;
        finish(
            shared,
            &output,
            JobState::Errored,
            format!("checkout failed: {err}"),
            slot,
        );
        return;
    }

    // The job's secrets, and the runner's own token (a step cannot read it, but should it
    // ever print it, it is masked).
    let mut secrets: Vec<&[u8]> = a.secrets.values().map(|v| v.as_bytes()).collect();
    if !shared.config.token.is_empty() {
        secrets.push(shared.config.token.as_bytes());
    }
    let masker = Masker::new(&secrets);
    let mut state = JobState::Passed;
    let mut message = String::new();
    let (normal, post): (Vec<&protocol::AssignedStep>, Vec<&protocol::AssignedStep>) =
        a.steps.iter().partition(|s| s.post.is_none());
    for step in normal {
        if state == JobState::Passed && cancel.is_cancelled() {
            state = JobState::Cancelled;
        }
        if state != JobState::Passed {
            skip(shared, &output, step);
            continue;
        }
        let outcome = run_step(
            shared,
            &mut output,
            &a,
            step,
            &dir,
            cancel.child_token(),
            &masker,
            &mut message,
        )
        .instrument(tracing::info_span!("step", name = %step.name))
        .await;
        state = job_state(outcome);
    }
    // Post steps run after a cancel too (only a runner shutdown stops them).
    let ended = state;
    for step in post {
        let applies = step.post.is_some_and(|p| p.applies(ended));
        if !applies || shared.stopping.load(std::sync::atomic::Ordering::SeqCst) {
            skip(shared, &output, step);
            continue;
        }
        let outcome = run_step(
            shared,
            &mut output,
            &a,
            step,
            &dir,
            shared.hard_stop.child_token(),
            &masker,
            &mut message,
        )
        .instrument(tracing::info_span!("step", name = %step.name))
        .await;
        if state == JobState::Passed && outcome != StepOutcome::Passed {
            state = job_state(outcome);
        }
    }
    finish(shared, &output, state, message, slot);
}

/// How a step's process (or, for a split step, its batches) ended.
pub(super) struct StepEnd {
    /// The step's outcome.
    pub(super) outcome: StepOutcome,
    /// Exit status of a plain step's process.
    pub(super) exit_code: Option<i32>,
    /// Signal that killed a plain step's process.
    pub(super) signal: Option<i32>,
    /// Wall-clock time of the step.
    pub(super) duration: Duration,
    /// Words for the step's last log line: `exit 1`, `timed out`, ...
    pub(super) summary: String,
}

/// Runs one step to its end and reports it; returns its outcome.
#[allow(clippy::too_many_arguments)]
async fn run_step(
    shared: &Shared,
    output: &mut Output<'_>,
    a: &protocol::Assign,
    step: &protocol::AssignedStep,
    dir: &std::path::Path,
    token: CancellationToken,
    masker: &Masker,
    message: &mut String,
) -> StepOutcome {
    let attempt = a.attempt_id;
    shared.outbox.push(
        attempt,
        Out::StepStarted(protocol::StepStarted {
            attempt_id: attempt,
            step_index: step.index,
        }),
    );
    let first_line = step.run.lines().next().unwrap_or_default();
    output
        .system(
            step.index,
            format!("kiln: step {}: $ {first_line}\n", step.name),
        )
        .await;
    // The step's environment: the allow-listed variables of the runner's (kiln-exec adds
    // them), those passed on by `--pass-env`, then the pipeline's and kiln's own.
    let mut env: Vec<(String, String)> = shared.config.pass_env.clone();
    env.extend(a.env.iter().map(|(k, v)| (k.clone(), v.clone())));
    env.extend(step.env.iter().map(|(k, v)| (k.clone(), v.clone())));
    env.extend(a.secrets.iter().map(|(k, v)| (k.clone(), v.clone())));
    env.push(("KILN_STEP".into(), step.name.clone()));
    let end = match &step.split {
        Some(spec) => {
            let s = split::Split {
                shared,
                attempt,
                step,
                spec,
                dir,
                env,
                token,
                masker,
            };
            split::run(&s, output, message).await
        }
        None => {
            let cmd = StepCommand {
                script: step.run.clone(),
                cwd: dir.to_path_buf(),
                env,
                timeout: (step.timeout_ms > 0).then(|| Duration::from_millis(step.timeout_ms)),
                grace: shared.config.kill_grace,
            };
            plain_step(output, step, &cmd, token, masker, message).await
        }
    };
    if end.outcome == StepOutcome::TimedOut {
        *message = format!("step {} timed out after {} ms", step.name, step.timeout_ms);
    }
    let index = step.index;
    // The step's JUnit files, read whether it passed or not (a failed test run is when they
    // matter most).
    let (cases, report_note) = if step.junit.is_empty() || step.split.is_some() {
        (Vec::new(), String::new())
    } else {
        let (cases, note) = step_report(dir, &step.junit, masker).await;
        output
            .system(
                index,
                format!(
                    "kiln: step {}: {} test case(s) read from its JUnit files{}\n",
                    step.name,
                    cases.len(),
                    if note.is_empty() {
                        String::new()
                    } else {
                        format!(" ({note})")
                    }
                ),
            )
            .await;
        (cases, note)
    };
    output
        .system(
            index,
            format!(
                "kiln: step {} {} in {} ms\n",
                step.name,
                end.summary,
                end.duration.as_millis()
            ),
        )
        .await;
    shared.outbox.push(
        attempt,
        Out::StepFinished(protocol::StepFinished {
            attempt_id: attempt,
            step_index: index,
            outcome: end.outcome,
            exit_code: end.exit_code,
            signal: end.signal,
            duration_ms: end.duration.as_millis() as u64,
            last_seq: output.seq,
            cases,
            report_note,
        }),
    );
    end.outcome
}

/// Most JUnit files one step's `junit` patterns may match.
const MAX_REPORT_FILES: usize = 1000;
/// Texts of a step's test cases are cut to this many bytes once its report grows too big.
const SHORT_TEXT: usize = 4096;

/// The test cases of the JUnit files matching `globs` in the checkout, with secrets masked,
/// in file order, bounded so that the StepFinished carrying them fits in one runner message:
/// at most [`MAX_REPORT_FILES`] files and [`protocol::MAX_CASES`] cases; texts are cut
/// to [`SHORT_TEXT`] once the report passes half the budget, and cases past the budget are left
/// out. The note says what was not read, empty when everything was.
async fn step_report(
    dir: &std::path::Path,
    globs: &[String],
    masker: &Masker,
) -> (Vec<TestCase>, String) {
    let (d, g) = (dir.to_path_buf(), globs.to_vec());
    let files = match tokio::task::spawn_blocking(move || split::glob_units(&d, &g)).await {
        Ok(Ok(files)) => files,
        Ok(Err(e)) => return (Vec::new(), format!("cannot list the JUnit files: {e}")),
        Err(e) => return (Vec::new(), format!("cannot list the JUnit files: {e}")),
    };
    let mut notes = Vec::new();
    if files.is_empty() {
        notes.push(format!("no file matches {}", globs.join(", ")));
    }
    if files.len() > MAX_REPORT_FILES {
        notes.push(format!(
            "{} files match, only the first {MAX_REPORT_FILES} are read",
            files.len()
        ));
    }
    let budget = split::MAX_REQUEST_BYTES;
    let mut cases = Vec::new();
    let mut size = 0usize;
    let mut left_out = 0usize;
    for file in files.iter().take(MAX_REPORT_FILES) {
        let read = match split::read_junit(&dir.join(file)).await {
            Ok(Some(read)) => read,
            Ok(None) => continue,
            Err(e) => {
                notes.push(format!("{file}: {e}"));
                continue;
            }
        };
        for c in read {
            if cases.len() >= protocol::MAX_CASES || size >= budget {
                left_out += 1;
                continue;
            }
            let short = size > budget / 2;
            let text = |t: &str| {
                let t = mask(masker, t);
                if short {
                    kiln_junit::cap(t, SHORT_TEXT)
                } else {
                    t
                }
            };
            let case = TestCase {
                outcome: c.outcome,
                name: text(&c.name),
                classname: text(&c.classname),
                skipped: c.skipped,
                duration_ms: c.duration_ms,
                message: text(&c.message),
                body: text(&c.body),
                system_out: text(&c.system_out),
                system_err: text(&c.system_err),
            };
            let len = protocol::case_size(&case) + 8;
            if size + len > budget {
                left_out += 1;
                size = budget;
                continue;
            }
            size += len;
            cases.push(case);
        }
    }
    if left_out > 0 {
        notes.push(format!(
            "{left_out} test case(s) left out: the report would pass {budget} bytes or \
             {} cases",
            protocol::MAX_CASES
        ));
    }
    let mut note = notes.join("; ");
    if note.len() > protocol::MAX_REPORT_NOTE {
        note = kiln_junit::cap(note, protocol::MAX_REPORT_NOTE - 64);
    }
    (cases, note)
}

/// `text` with the job's secrets masked.
fn mask(masker: &Masker, text: &str) -> String {
    if text.is_empty() {
        return String::new();
    }
    let mut m = masker.clone();
    let mut out = m.push(text.as_bytes());
    out.extend(m.finish());
    String::from_utf8_lossy(&out).into_owned()
}

/// Runs a plain (not split) step's command.
async fn plain_step(
    output: &mut Output<'_>,
    step: &protocol::AssignedStep,
    cmd: &StepCommand,
    token: CancellationToken,
    masker: &Masker,
    message: &mut String,
) -> StepEnd {
    let index = step.index;
    let result = exec(output, index, cmd, token, masker, None).await;
    let (outcome, exit_code, signal, duration) = match result {
        Ok(exit) => {
            let (outcome, code, sig) = match exit.termination {
                Termination::Exited(0) => (StepOutcome::Passed, Some(0), None),
                Termination::Exited(c) => (StepOutcome::Failed, Some(c), None),
                Termination::Signaled(s) => (StepOutcome::Failed, None, Some(s)),
                Termination::TimedOut => (StepOutcome::TimedOut, None, None),
                Termination::Cancelled => (StepOutcome::Cancelled, None, None),
            };
            (outcome, code, sig, exit.duration)
        }
        Err(e) => {
            let err = kiln_domain::error_chain(&e);
            output
                .system(index, format!("kiln: cannot run step: {err}\n"))
                .await;
            *message = format!("step {}: {err}", step.name);
            (StepOutcome::Errored, None, None, Duration::ZERO)
        }
    };
    let summary = match (outcome, exit_code, signal) {
        (StepOutcome::TimedOut, _, _) => "timed out".to_string(),
        (StepOutcome::Cancelled, _, _) => "cancelled".to_string(),
        (_, Some(c), _) => format!("exit {c}"),
        (_, _, Some(s)) => format!("killed by signal {s}"),
        _ => "errored".to_string(),
    };
    StepEnd {
        outcome,
        exit_code,
        signal,
        duration,
        summary,
    }
}

/// A process's standard output kept (masked) instead of logged, up to a limit.
pub(super) struct Capture {
    /// What it printed, up to `limit` bytes.
    pub(super) data: Vec<u8>,
    /// Most bytes kept.
    pub(super) limit: usize,
    /// Whether it printed more than `limit` bytes.
    pub(super) overflowed: bool,
}

impl Capture {
    fn push(&mut self, data: &[u8]) {
        let room = self.limit.saturating_sub(self.data.len());
        if data.len() > room {
            self.overflowed = true;
        }
        self.data.extend_from_slice(&data[..data.len().min(room)]);
    }
}

/// Runs one process of step `index` (its own process group), its output masked into the step's
/// log (stdout into `capture` instead, when given).
pub(super) async fn exec(
    output: &mut Output<'_>,
    index: u32,
    cmd: &StepCommand,
    token: CancellationToken,
    masker: &Masker,
    mut capture: Option<&mut Capture>,
) -> Result<kiln_exec::StepExit, kiln_exec::ExecError> {
    let (tx, mut rx) = mpsc::channel(16);
    let exec = kiln_exec::run(cmd, tx, token);
    let mut maskers = [masker.clone(), masker.clone()];
    let forward = async {
        // Bytes that may begin a secret are held until the next chunk or the end of the step,
        // never released on a timer (that would leak the start of a secret printed slowly).
        while let Some(c) = rx.recv().await {
            let (i, stream) = match c.stream {
                Stream::Stdout => (0, OutputStream::Stdout),
                Stream::Stderr => (1, OutputStream::Stderr),
            };
            let data = maskers[i].push(&c.data);
            if data.is_empty() {
                continue;
            }
            match (&mut capture, stream) {
                (Some(capture), OutputStream::Stdout) => capture.push(&data),
                _ => output.chunk(index, stream, Bytes::from(data)).await,
            }
        }
        let rest = maskers[0].finish();
        match &mut capture {
            Some(capture) => capture.push(&rest),
            None if !rest.is_empty() => {
                output
                    .chunk(index, OutputStream::Stdout, Bytes::from(rest))
                    .await
            }
            None => {}
        }
        let rest = maskers[1].finish();
        if !rest.is_empty() {
            output
                .chunk(index, OutputStream::Stderr, Bytes::from(rest))
                .await;
        }
    };
    let (result, ()) = tokio::join!(exec, forward);
    result
}

/// Reports a step that did not run.
fn skip(shared: &Shared, output: &Output<'_>, step: &protocol::AssignedStep) {
    shared.outbox.push(
        output.attempt,
        Out::StepFinished(protocol::StepFinished {
            attempt_id: output.attempt,
            step_index: step.index,
            outcome: StepOutcome::Skipped,
            exit_code: None,
            signal: None,
            duration_ms: 0,
            last_seq: output.seq,
            cases: Vec::new(),
            report_note: String::new(),
        }),
    );
}

/// The job state a step's outcome leads to.
fn job_state(outcome: StepOutcome) -> JobState {
    match outcome {
        StepOutcome::Passed => JobState::Passed,
        StepOutcome::TimedOut => JobState::TimedOut,
        StepOutcome::Cancelled => JobState::Cancelled,
        StepOutcome::Errored => JobState::Errored,
        _ => JobState::Failed,
    }
}

/// Frees the job's slot, then queues its final message: the slot is free before the
/// dispatcher can hear the result and send the next job.
fn finish(shared: &Shared, output: &Output<'_>, state: JobState, message: String, slot: u32) {
    shared.release(output.attempt, slot);
    if shared.stopping.load(std::sync::atomic::Ordering::SeqCst)
        && matches!(state, JobState::Cancelled | JobState::Errored)
    {
        // The runner is shutting down, not the job failing: give the job back so another
        // runner runs it.
        tracing::info!(attempt = %output.attempt, "handing the job back");
        shared.outbox.push(
            output.attempt,
            Out::Rejected(protocol::Rejected {
                attempt_id: output.attempt,
                reason: "runner shutting down".into(),
            }),
        );
        return;
    }
    tracing::info!(attempt = %output.attempt, state = ?state, "job finished");
    shared.outbox.push(
        output.attempt,
        Out::JobFinished(protocol::JobFinished {
            attempt_id: output.attempt,
            state,
            message,
            last_seq: output.seq,
        }),
    );
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const REPORT: &str = r#"<?xml version="1.0"?><testsuite name="t"><testcase classname="m" name="ok" time="0.001"/><testcase classname="m" name="bad" time="0.002"><failure message="token hunter2secret leaked">line 1
line 2</failure></testcase></testsuite>"#;

    #[tokio::test]
    async fn a_steps_reports_are_read_masked_and_what_is_not_read_is_noted() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("reports/sub")).unwrap();
        std::fs::write(dir.path().join("reports/a.xml"), REPORT).unwrap();
        std::fs::write(dir.path().join("reports/sub/b.xml"), REPORT).unwrap();
        std::fs::write(dir.path().join("reports/broken.xml"), "not xml at all").unwrap();
        let masker = Masker::new(&["hunter2secret"]);
        let (cases, note) = step_report(dir.path(), &["reports/*.xml".into()], &masker).await;
        // `*` does not cross `/`: b.xml is not read.
        assert_eq!(cases.len(), 2, "{cases:?}");
        assert_eq!(cases[1].name, "bad");
        assert_eq!(cases[1].body, "line 1\nline 2");
        assert!(!cases[1].message.contains("hunter2secret"), "{cases:?}");
        assert!(cases[1].message.starts_with("token "), "{cases:?}");
        assert!(note.starts_with("reports/broken.xml: "), "{note}");
        let (cases, _) = step_report(dir.path(), &["reports/**/*.xml".into()], &masker).await;
        assert_eq!(cases.len(), 4);
        let (cases, note) = step_report(dir.path(), &["out/*.xml".into()], &masker).await;
        assert!(cases.is_empty());
        assert_eq!(note, "no file matches out/*.xml");
    }
}

//! The one place where wire types (`proto`) and domain types (`kiln-domain`, `kiln-store`)
//! are converted into each other.

use kiln_domain::{JobId, JobState, Millis, RunnerRecord, StepOutcome, protocol, split};
use kiln_store::BuildDetail;

use crate::proto;

/// Domain job state to wire.
pub fn job_state_to_proto(s: JobState) -> proto::JobState {
    match s {
        JobState::Queued => proto::JobState::Queued,
        JobState::Assigned => proto::JobState::Assigned,
        JobState::Running => proto::JobState::Running,
        JobState::Passed => proto::JobState::Passed,
        JobState::Failed => proto::JobState::Failed,
        JobState::Cancelled => proto::JobState::Cancelled,
        JobState::TimedOut => proto::JobState::TimedOut,
        JobState::Errored => proto::JobState::Errored,
        JobState::Skipped => proto::JobState::Skipped,
    }
}

/// Wire job state to domain; `None` for UNSPECIFIED.
pub fn job_state_from_proto(s: proto::JobState) -> Option<JobState> {
    Some(match s {
        proto::JobState::Unspecified => return None,
        proto::JobState::Queued => JobState::Queued,
        proto::JobState::Assigned => JobState::Assigned,
        proto::JobState::Running => JobState::Running,
        proto::JobState::Passed => JobState::Passed,
        proto::JobState::Failed => JobState::Failed,
        proto::JobState::Cancelled => JobState::Cancelled,
        proto::JobState::TimedOut => JobState::TimedOut,
        proto::JobState::Errored => JobState::Errored,
        proto::JobState::Skipped => JobState::Skipped,
    })
}

/// Domain step outcome to wire.
pub fn step_outcome_to_proto(o: StepOutcome) -> proto::StepOutcome {
    match o {
        StepOutcome::Passed => proto::StepOutcome::Passed,
        StepOutcome::Failed => proto::StepOutcome::Failed,
        StepOutcome::TimedOut => proto::StepOutcome::TimedOut,
        StepOutcome::Cancelled => proto::StepOutcome::Cancelled,
        StepOutcome::Errored => proto::StepOutcome::Errored,
        StepOutcome::Skipped => proto::StepOutcome::Skipped,
    }
}

/// Wire step outcome to domain; `None` for UNSPECIFIED.
pub fn step_outcome_from_proto(o: proto::StepOutcome) -> Option<StepOutcome> {
    Some(match o {
        proto::StepOutcome::Unspecified => return None,
        proto::StepOutcome::Passed => StepOutcome::Passed,
        proto::StepOutcome::Failed => StepOutcome::Failed,
        proto::StepOutcome::TimedOut => StepOutcome::TimedOut,
        proto::StepOutcome::Cancelled => StepOutcome::Cancelled,
        proto::StepOutcome::Errored => StepOutcome::Errored,
        proto::StepOutcome::Skipped => StepOutcome::Skipped,
    })
}

/// A post step's condition to wire (`Unspecified` for a normal step).
pub fn post_to_proto(p: Option<kiln_domain::PostCondition>) -> proto::PostCondition {
    match p {
        None => proto::PostCondition::Unspecified,
        Some(kiln_domain::PostCondition::Always) => proto::PostCondition::Always,
        Some(kiln_domain::PostCondition::Success) => proto::PostCondition::Success,
        Some(kiln_domain::PostCondition::Failure) => proto::PostCondition::Failure,
    }
}

/// Wire to a post step's condition (`None` for a normal step or an unknown value).
pub fn post_from_proto(p: i32) -> Option<kiln_domain::PostCondition> {
    match proto::PostCondition::try_from(p).ok()? {
        proto::PostCondition::Unspecified => None,
        proto::PostCondition::Always => Some(kiln_domain::PostCondition::Always),
        proto::PostCondition::Success => Some(kiln_domain::PostCondition::Success),
        proto::PostCondition::Failure => Some(kiln_domain::PostCondition::Failure),
    }
}

/// Milliseconds since the epoch to a protobuf timestamp.
pub fn timestamp(ms: Millis) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: (ms.rem_euclid(1000) * 1_000_000) as i32,
    }
}

/// A protobuf timestamp to milliseconds since the epoch.
pub fn millis(ts: &prost_types::Timestamp) -> Millis {
    ts.seconds * 1000 + i64::from(ts.nanos) / 1_000_000
}

/// A stored build (with jobs and step results) to wire.
pub fn build_to_proto(d: &BuildDetail) -> proto::Build {
    let b = &d.build;
    proto::Build {
        id: b.id.into(),
        repo: b.repo.clone(),
        commit: b.commit.clone(),
        branch: b.branch.clone(),
        state: job_state_to_proto(b.state) as i32,
        jobs: d
            .jobs
            .iter()
            .map(|j| {
                let results = d.steps.get(&j.id);
                proto::Job {
                    id: j.id.into(),
                    build_id: j.build_id.into(),
                    name: j.name.clone(),
                    state: job_state_to_proto(j.state) as i32,
                    labels: j.labels.clone().into_iter().collect(),
                    runner: j.runner.clone().unwrap_or_default(),
                    attempt_id: j.current_attempt.map_or(0, u64::from),
                    attempts: j.attempts,
                    steps: j
                        .steps
                        .iter()
                        .map(|s| {
                            let r = results.and_then(|rs| rs.iter().find(|r| r.index == s.index));
                            proto::StepResult {
                                index: s.index,
                                name: s.name.clone(),
                                outcome: r
                                    .map(|r| step_outcome_to_proto(r.outcome) as i32)
                                    .unwrap_or(0),
                                exit_code: r.and_then(|r| r.exit_code),
                                duration_ms: r.map(|r| r.duration_ms).unwrap_or(0),
                                run: s.run.clone(),
                            }
                        })
                        .collect(),
                    started_at: j.started_at.map(timestamp),
                    finished_at: j.finished_at.map(timestamp),
                    message: j.message.clone().unwrap_or_default(),
                    refusals: d
                        .refusals
                        .get(&j.id)
                        .map(|rs| {
                            rs.iter()
                                .map(|(a, why)| format!("attempt {a}: {why}"))
                                .collect()
                        })
                        .unwrap_or_default(),
                    lost_attempts: j.lost_attempts,
                    attempt_list: d
                        .attempts
                        .get(&j.id)
                        .map(|list| list.iter().map(attempt_to_proto).collect())
                        .unwrap_or_default(),
                }
            })
            .collect(),
        created_at: Some(timestamp(b.created_at)),
        finished_at: b.finished_at.map(timestamp),
        error: b.error.clone().unwrap_or_default(),
        trigger: b.trigger.clone(),
        retry_of: b.retry_of.map_or(0, u64::from),
        pipeline: b.pipeline.clone(),
        env: b.params.clone().into_iter().collect(),
    }
}

/// A build request from wire (the engine checks it).
pub fn submit_from_proto(r: proto::SubmitBuildRequest) -> kiln_dispatcher::SubmitRequest {
    kiln_dispatcher::SubmitRequest {
        repo: r.repo,
        commit: r.commit,
        branch: r.branch,
        trigger: r.trigger,
        params: r.env.into_iter().collect(),
    }
}

/// One attempt of a job to wire.
pub fn attempt_to_proto(a: &kiln_store::AttemptInfo) -> proto::JobAttempt {
    proto::JobAttempt {
        id: a.id.into(),
        number: a.number,
        runner: a.runner.clone(),
        state: a.state.as_str().to_string(),
        started_at: Some(timestamp(a.created_at)),
        finished_at: a.finished_at.map(timestamp),
        note: a.note.clone().unwrap_or_default(),
    }
}

/// A build without its jobs (for lists) to wire.
pub fn build_summary_to_proto(b: &kiln_domain::Build) -> proto::Build {
    build_to_proto(&BuildDetail {
        build: b.clone(),
        jobs: Vec::new(),
        steps: Default::default(),
        refusals: Default::default(),
        attempts: Default::default(),
    })
}

/// Ids as their wire numbers.
fn ids_to_proto<I: Into<u64>>(ids: Vec<I>) -> Vec<u64> {
    ids.into_iter().map(Into::into).collect()
}

/// Wire numbers as ids (of the kind the field carries).
fn ids_from_proto<I: From<u64>>(ids: Vec<u64>) -> Vec<I> {
    ids.into_iter().map(I::from).collect()
}

/// A runner as the dispatcher sees it, to wire.
pub fn runner_to_proto(
    r: &RunnerRecord,
    state: kiln_dispatcher::RunnerState,
    running_jobs: Vec<JobId>,
    last_heartbeat: Millis,
) -> proto::Runner {
    use kiln_dispatcher::RunnerState;
    let state = match state {
        RunnerState::Idle => proto::RunnerState::Idle,
        RunnerState::Busy => proto::RunnerState::Busy,
        RunnerState::Draining => proto::RunnerState::Draining,
        RunnerState::Offline => proto::RunnerState::Offline,
    };
    proto::Runner {
        id: r.id.into(),
        name: r.name.clone(),
        state: state as i32,
        labels: r.labels.clone().into_iter().collect(),
        slots: r.slots,
        running_jobs: ids_to_proto(running_jobs),
        last_heartbeat: Some(timestamp(last_heartbeat)),
        version: r.version.clone(),
    }
}

/// Domain unit outcome to wire.
pub fn unit_outcome_to_proto(o: split::UnitOutcome) -> proto::UnitOutcome {
    match o {
        split::UnitOutcome::Passed => proto::UnitOutcome::Passed,
        split::UnitOutcome::Failed => proto::UnitOutcome::Failed,
        split::UnitOutcome::Errored => proto::UnitOutcome::Errored,
    }
}

/// Wire unit outcome to domain; `None` for UNSPECIFIED or an unknown value.
pub fn unit_outcome_from_proto(o: i32) -> Option<split::UnitOutcome> {
    match proto::UnitOutcome::try_from(o).ok()? {
        proto::UnitOutcome::Unspecified => None,
        proto::UnitOutcome::Passed => Some(split::UnitOutcome::Passed),
        proto::UnitOutcome::Failed => Some(split::UnitOutcome::Failed),
        proto::UnitOutcome::Errored => Some(split::UnitOutcome::Errored),
    }
}

pub use kiln_domain::protocol::{MAX_CASES, MAX_REPORT_NOTE, MAX_UNIT_LEN, MAX_UNITS};

/// A plain step's report as the API gives it.
pub fn step_report_to_proto(r: &split::StepReport) -> proto::StepReport {
    proto::StepReport {
        key: r.key.clone(),
        cases: r.cases.iter().map(case_to_proto).collect(),
        note: r.note.clone(),
    }
}

fn case_from_proto(c: proto::TestCase) -> Result<split::TestCase, String> {
    Ok(split::TestCase {
        outcome: unit_outcome_from_proto(c.outcome)
            .ok_or_else(|| format!("test case {:?} has no outcome", c.name))?,
        name: c.name,
        classname: c.classname,
        skipped: c.skipped,
        duration_ms: c.duration_ms,
        message: c.message,
        body: c.body,
        system_out: c.system_out,
        system_err: c.system_err,
    })
}

/// The test cases (and note) of a StepFinished, checked: at most [`MAX_CASES`] cases, each
/// with an outcome, and a note of at most [`MAX_REPORT_NOTE`] bytes.
fn step_cases_from_proto(
    cases: Vec<proto::TestCase>,
    note: String,
) -> Result<(Vec<split::TestCase>, String), String> {
    if cases.len() > MAX_CASES {
        return Err(format!(
            "step_finished lists {} test cases, more than {MAX_CASES}",
            cases.len()
        ));
    }
    if note.len() > MAX_REPORT_NOTE {
        return Err(format!(
            "step_finished.report_note has {} bytes, more than {MAX_REPORT_NOTE}",
            note.len()
        ));
    }
    let cases = cases
        .into_iter()
        .map(case_from_proto)
        .collect::<Result<_, _>>()?;
    Ok((cases, note))
}

/// A shard's NextUnits from the wire, checking every field.
fn next_units_from_proto(m: proto::NextUnits) -> Result<protocol::NextUnits, String> {
    // Bounded before anything is converted, so a huge message costs no copies.
    if m.results.iter().any(|r| r.cases.len() > MAX_CASES) || m.results.len() > MAX_UNITS {
        return Err(format!(
            "next_units carries more than {MAX_UNITS} results or {MAX_CASES} test cases in one"
        ));
    }
    let mut results = Vec::with_capacity(m.results.len());
    for r in m.results {
        let outcome = unit_outcome_from_proto(r.outcome)
            .ok_or_else(|| format!("result of unit {:?} has no outcome", r.unit))?;
        let cases = r
            .cases
            .into_iter()
            .map(case_from_proto)
            .collect::<Result<Vec<_>, _>>()?;
        results.push(split::UnitReport {
            unit: r.unit,
            try_number: r.try_number,
            outcome,
            duration_ms: r.duration_ms,
            cases,
        });
    }
    let interactions = m
        .interactions
        .into_iter()
        .map(|i| split::Interaction {
            units: i.units,
            try_number: i.try_number,
            detail: i.detail.chars().take(1000).collect(),
            runner: None,
        })
        .collect();
    let n = protocol::NextUnits {
        attempt_id: m.attempt_id.into(),
        step_index: m.step_index,
        request: m.request,
        discovered: m.discovered,
        results,
        interactions,
        max_units: m.max_units,
        batch_ms: m.batch_ms,
        batch_processes: m.batch_processes,
    };
    n.check()?;
    Ok(n)
}

fn next_units_to_proto(m: protocol::NextUnits) -> proto::NextUnits {
    proto::NextUnits {
        attempt_id: m.attempt_id.into(),
        step_index: m.step_index,
        request: m.request,
        discovered: m.discovered,
        results: m
            .results
            .into_iter()
            .map(|r| proto::UnitResult {
                unit: r.unit,
                try_number: r.try_number,
                outcome: unit_outcome_to_proto(r.outcome) as i32,
                duration_ms: r.duration_ms,
                cases: r.cases.iter().map(case_to_proto).collect(),
            })
            .collect(),
        max_units: m.max_units,
        interactions: m
            .interactions
            .into_iter()
            .map(|i| proto::Interaction {
                units: i.units,
                try_number: i.try_number,
                detail: i.detail,
                runner: i.runner.unwrap_or_default(),
            })
            .collect(),
        batch_ms: m.batch_ms,
        batch_processes: m.batch_processes,
    }
}

fn units_to_proto(u: protocol::Units) -> proto::Units {
    let mut out = proto::Units {
        attempt_id: u.attempt_id.into(),
        step_index: u.step_index,
        request: u.request,
        ..Default::default()
    };
    match u.reply {
        split::UnitsReply::Batch(units) => {
            out.state = proto::UnitsState::Batch as i32;
            out.units = units
                .into_iter()
                .map(|u| proto::LeasedUnit {
                    unit: u.unit,
                    try_number: u.try_number,
                })
                .collect();
        }
        split::UnitsReply::Wait => out.state = proto::UnitsState::Wait as i32,
        split::UnitsReply::Done { passed, summary } => {
            out.state = proto::UnitsState::Done as i32;
            out.passed = passed;
            out.message = summary;
        }
        split::UnitsReply::Refused(why) => {
            out.state = proto::UnitsState::Refused as i32;
            out.message = why;
        }
    }
    out
}

fn units_from_proto(u: proto::Units) -> Result<protocol::Units, String> {
    let reply = match proto::UnitsState::try_from(u.state) {
        Ok(proto::UnitsState::Batch) => split::UnitsReply::Batch(
            u.units
                .into_iter()
                .map(|l| split::LeasedUnit {
                    unit: l.unit,
                    try_number: l.try_number,
                })
                .collect(),
        ),
        Ok(proto::UnitsState::Wait) => split::UnitsReply::Wait,
        Ok(proto::UnitsState::Done) => split::UnitsReply::Done {
            passed: u.passed,
            summary: u.message,
        },
        Ok(proto::UnitsState::Refused) => split::UnitsReply::Refused(u.message),
        Ok(proto::UnitsState::Unspecified) | Err(_) => {
            return Err(format!("units.state {} is not a units state", u.state));
        }
    };
    Ok(protocol::Units {
        attempt_id: u.attempt_id.into(),
        step_index: u.step_index,
        request: u.request,
        reply,
    })
}

fn output_stream_to_proto(s: protocol::OutputStream) -> proto::OutputStream {
    match s {
        protocol::OutputStream::Stdout => proto::OutputStream::Stdout,
        protocol::OutputStream::Stderr => proto::OutputStream::Stderr,
        protocol::OutputStream::System => proto::OutputStream::System,
    }
}

fn output_stream_from_proto(s: i32) -> Option<protocol::OutputStream> {
    match proto::OutputStream::try_from(s).ok()? {
        proto::OutputStream::Stdout => Some(protocol::OutputStream::Stdout),
        proto::OutputStream::Stderr => Some(protocol::OutputStream::Stderr),
        proto::OutputStream::System => Some(protocol::OutputStream::System),
        proto::OutputStream::Unspecified => None,
    }
}

fn split_step_to_proto(s: protocol::SplitStep) -> proto::SplitStep {
    let (glob, command) = match s.units {
        split::UnitSource::Glob(g) => (g, String::new()),
        split::UnitSource::Command(c) => (Vec::new(), c),
    };
    proto::SplitStep {
        key: s.key,
        shards: s.shards,
        shard: s.shard,
        glob,
        command,
    }
}

fn split_step_from_proto(s: proto::SplitStep) -> protocol::SplitStep {
    protocol::SplitStep {
        key: s.key,
        shards: s.shards,
        shard: s.shard,
        units: if s.command.is_empty() {
            split::UnitSource::Glob(s.glob)
        } else {
            split::UnitSource::Command(s.command)
        },
    }
}

fn assign_to_proto(a: protocol::Assign) -> proto::Assign {
    proto::Assign {
        attempt_id: a.attempt_id.into(),
        job_id: a.job_id.into(),
        build_id: a.build_id.into(),
        repo_url: a.repo_url,
        commit: a.commit,
        branch: a.branch,
        steps: a
            .steps
            .into_iter()
            .map(|s| proto::StepSpec {
                index: s.index,
                name: s.name,
                run: s.run,
                env: s.env.into_iter().collect(),
                timeout_ms: s.timeout_ms,
                post: post_to_proto(s.post) as i32,
                split: s.split.map(split_step_to_proto),
                junit: s.junit,
            })
            .collect(),
        env: a.env.into_iter().collect(),
        trace_context: a.trace_context.into_iter().collect(),
        attempt_number: a.attempt_number,
        secrets: a.secrets.into_iter().collect(),
    }
}

fn assign_from_proto(a: proto::Assign) -> Result<protocol::Assign, String> {
    let mut steps = Vec::with_capacity(a.steps.len());
    for s in a.steps {
        let post = match proto::PostCondition::try_from(s.post) {
            Ok(proto::PostCondition::Unspecified) => None,
            Ok(_) => post_from_proto(s.post),
            Err(_) => {
                return Err(format!(
                    "assign.steps[{}].post {} is not a post condition",
                    s.index, s.post
                ));
            }
        };
        steps.push(protocol::AssignedStep {
            index: s.index,
            name: s.name,
            run: s.run,
            env: s.env.into_iter().collect(),
            timeout_ms: s.timeout_ms,
            post,
            split: s.split.map(split_step_from_proto),
            junit: s.junit,
        });
    }
    Ok(protocol::Assign {
        attempt_id: a.attempt_id.into(),
        job_id: a.job_id.into(),
        build_id: a.build_id.into(),
        repo_url: a.repo_url,
        commit: a.commit,
        branch: a.branch,
        steps,
        env: a.env.into_iter().collect(),
        trace_context: a.trace_context.into_iter().collect(),
        attempt_number: a.attempt_number,
        secrets: a.secrets.into_iter().collect(),
    })
}

fn heartbeat_to_proto(h: protocol::Heartbeat) -> proto::Heartbeat {
    proto::Heartbeat {
        running_attempts: ids_to_proto(h.running_attempts),
        sent_at_ms: h.sent_at_ms,
        draining: h.draining,
        lists_held: h.lists_held,
    }
}

fn heartbeat_from_proto(h: proto::Heartbeat) -> protocol::Heartbeat {
    protocol::Heartbeat {
        running_attempts: ids_from_proto(h.running_attempts),
        sent_at_ms: h.sent_at_ms,
        draining: h.draining,
        lists_held: h.lists_held,
    }
}

/// A runner's message from the wire; `Err` says what is not valid (answered INVALID_ARGUMENT).
pub fn runner_message_from_proto(
    m: proto::RunnerMessage,
) -> Result<protocol::RunnerMessage, String> {
    use proto::runner_message::Kind;
    use protocol::RunnerMessage as M;
    Ok(match m.kind {
        None => {
            return Err(
                "runner message has no kind (is the runner newer than the dispatcher?)".into(),
            );
        }
        Some(Kind::Hello(h)) => M::Hello(protocol::Hello {
            name: h.name,
            labels: h.labels.into_iter().collect(),
            slots: h.slots,
            version: h.version,
            held_attempts: ids_from_proto(h.held_attempts),
            token: h.token,
            session_secret: h.session_secret,
        }),
        Some(Kind::Heartbeat(h)) => M::Heartbeat(heartbeat_from_proto(h)),
        Some(Kind::Accepted(a)) => M::Accepted(protocol::Accepted {
            attempt_id: a.attempt_id.into(),
        }),
        Some(Kind::Rejected(r)) => M::Rejected(protocol::Rejected {
            attempt_id: r.attempt_id.into(),
            reason: r.reason,
        }),
        Some(Kind::Output(o)) => M::Output(protocol::OutputChunk {
            attempt_id: o.attempt_id.into(),
            seq: o.seq,
            step_index: o.step_index,
            stream: output_stream_from_proto(o.stream).ok_or_else(|| {
                format!("output.stream {} is not stdout, stderr or system", o.stream)
            })?,
            data: o.data,
        }),
        Some(Kind::StepStarted(s)) => M::StepStarted(protocol::StepStarted {
            attempt_id: s.attempt_id.into(),
            step_index: s.step_index,
        }),
        Some(Kind::StepFinished(f)) => {
            let outcome = proto::StepOutcome::try_from(f.outcome)
                .ok()
                .and_then(step_outcome_from_proto)
                .ok_or_else(|| {
                    format!("step_finished.outcome {} is not a step outcome", f.outcome)
                })?;
            let (cases, report_note) = step_cases_from_proto(f.cases, f.report_note)?;
            M::StepFinished(protocol::StepFinished {
                attempt_id: f.attempt_id.into(),
                step_index: f.step_index,
                outcome,
                exit_code: f.exit_code,
                signal: f.signal,
                duration_ms: f.duration_ms,
                last_seq: f.last_seq,
                cases,
                report_note,
            })
        }
        Some(Kind::JobFinished(f)) => {
            let state = proto::JobState::try_from(f.state)
                .ok()
                .and_then(job_state_from_proto)
                .filter(|s| s.is_final())
                .ok_or_else(|| {
                    format!("job_finished.state {} is not a final job state", f.state)
                })?;
            M::JobFinished(protocol::JobFinished {
                attempt_id: f.attempt_id.into(),
                state,
                message: f.message,
                last_seq: f.last_seq,
            })
        }
        Some(Kind::NextUnits(n)) => M::NextUnits(next_units_from_proto(n)?),
    })
}

/// A runner's message to the wire.
pub fn runner_message_to_proto(m: protocol::RunnerMessage) -> proto::RunnerMessage {
    use proto::runner_message::Kind;
    use protocol::RunnerMessage as M;
    let kind = match m {
        M::Hello(h) => Kind::Hello(proto::Hello {
            name: h.name,
            labels: h.labels.into_iter().collect(),
            slots: h.slots,
            version: h.version,
            held_attempts: ids_to_proto(h.held_attempts),
            token: h.token,
            session_secret: h.session_secret,
        }),
        M::Heartbeat(h) => Kind::Heartbeat(heartbeat_to_proto(h)),
        M::Accepted(a) => Kind::Accepted(proto::Accepted {
            attempt_id: a.attempt_id.into(),
        }),
        M::Rejected(r) => Kind::Rejected(proto::Rejected {
            attempt_id: r.attempt_id.into(),
            reason: r.reason,
        }),
        M::Output(o) => Kind::Output(proto::OutputChunk {
            attempt_id: o.attempt_id.into(),
            seq: o.seq,
            step_index: o.step_index,
            stream: output_stream_to_proto(o.stream) as i32,
            data: o.data,
        }),
        M::StepStarted(s) => Kind::StepStarted(proto::StepStarted {
            attempt_id: s.attempt_id.into(),
            step_index: s.step_index,
        }),
        M::StepFinished(f) => Kind::StepFinished(proto::StepFinished {
            attempt_id: f.attempt_id.into(),
            step_index: f.step_index,
            outcome: step_outcome_to_proto(f.outcome) as i32,
            exit_code: f.exit_code,
            signal: f.signal,
            duration_ms: f.duration_ms,
            last_seq: f.last_seq,
            cases: f.cases.iter().map(case_to_proto).collect(),
            report_note: f.report_note,
        }),
        M::JobFinished(f) => Kind::JobFinished(proto::JobFinished {
            attempt_id: f.attempt_id.into(),
            state: job_state_to_proto(f.state) as i32,
            message: f.message,
            last_seq: f.last_seq,
        }),
        M::NextUnits(n) => Kind::NextUnits(next_units_to_proto(n)),
    };
    proto::RunnerMessage { kind: Some(kind) }
}

/// A dispatcher's message to the wire.
pub fn dispatcher_message_to_proto(m: protocol::DispatcherMessage) -> proto::DispatcherMessage {
    use proto::dispatcher_message::Kind;
    use protocol::DispatcherMessage as M;
    let kind = match m {
        M::Welcome(w) => Kind::Welcome(proto::Welcome {
            runner_id: w.runner_id.into(),
            heartbeat_interval_ms: w.heartbeat_interval_ms,
            missed_heartbeats_allowed: w.missed_heartbeats_allowed,
            stale_attempts: ids_to_proto(w.stale_attempts),
            session_secret: w.session_secret,
        }),
        M::Heartbeat(h) => Kind::Heartbeat(heartbeat_to_proto(h)),
        M::Assign(a) => Kind::Assign(assign_to_proto(a)),
        M::OutputAck(a) => Kind::OutputAck(proto::OutputAck {
            attempt_id: a.attempt_id.into(),
            up_to_seq: a.up_to_seq,
        }),
        M::ResultAck(a) => Kind::ResultAck(proto::ResultAck {
            attempt_id: a.attempt_id.into(),
        }),
        M::Refused(r) => Kind::Refused(proto::Refused {
            attempt_id: r.attempt_id.into(),
            reason: r.reason,
        }),
        M::Cancel(c) => Kind::Cancel(proto::Cancel {
            attempt_id: c.attempt_id.into(),
            grace_ms: c.grace_ms,
            reason: c.reason,
        }),
        M::Drain(d) => Kind::Drain(proto::Drain { reason: d.reason }),
        M::Units(u) => Kind::Units(units_to_proto(u)),
    };
    proto::DispatcherMessage { kind: Some(kind) }
}

/// A dispatcher's message from the wire; `Err` says what is not valid. `Ok(None)` for a
/// message of a kind this runner does not know (a newer dispatcher): it is ignored.
pub fn dispatcher_message_from_proto(
    m: proto::DispatcherMessage,
) -> Result<Option<protocol::DispatcherMessage>, String> {
    use proto::dispatcher_message::Kind;
    use protocol::DispatcherMessage as M;
    Ok(Some(match m.kind {
        None => return Ok(None),
        Some(Kind::Welcome(w)) => M::Welcome(protocol::Welcome {
            runner_id: w.runner_id.into(),
            heartbeat_interval_ms: w.heartbeat_interval_ms,
            missed_heartbeats_allowed: w.missed_heartbeats_allowed,
            stale_attempts: ids_from_proto(w.stale_attempts),
            session_secret: w.session_secret,
        }),
        Some(Kind::Heartbeat(h)) => M::Heartbeat(heartbeat_from_proto(h)),
        Some(Kind::Assign(a)) => M::Assign(assign_from_proto(a)?),
        Some(Kind::OutputAck(a)) => M::OutputAck(protocol::OutputAck {
            attempt_id: a.attempt_id.into(),
            up_to_seq: a.up_to_seq,
        }),
        Some(Kind::ResultAck(a)) => M::ResultAck(protocol::ResultAck {
            attempt_id: a.attempt_id.into(),
        }),
        Some(Kind::Refused(r)) => M::Refused(protocol::Refused {
            attempt_id: r.attempt_id.into(),
            reason: r.reason,
        }),
        Some(Kind::Cancel(c)) => M::Cancel(protocol::Cancel {
            attempt_id: c.attempt_id.into(),
            grace_ms: c.grace_ms,
            reason: c.reason,
        }),
        Some(Kind::Drain(d)) => M::Drain(protocol::Drain { reason: d.reason }),
        Some(Kind::Units(u)) => M::Units(units_from_proto(u)?),
    }))
}

/// A status's message and the errors under it (tonic's `Display` of a `Status` is a debug
/// dump).
pub fn status_chain(s: &tonic::Status) -> String {
    let mut chain = s.message().to_string();
    if let Some(source) = std::error::Error::source(s) {
        chain.push_str(": ");
        chain.push_str(&kiln_domain::error_chain(source));
    }
    chain
}

/// A status on a runner stream, as the engine sees it.
pub fn stream_error_from_status(s: &tonic::Status) -> protocol::StreamError {
    use protocol::StreamError as E;
    let message = s.message().to_string();
    match s.code() {
        tonic::Code::InvalidArgument => E::InvalidArgument { message },
        tonic::Code::Unauthenticated => E::Unauthenticated { message },
        tonic::Code::PermissionDenied => E::PermissionDenied { message },
        tonic::Code::AlreadyExists => E::AlreadyExists { message },
        tonic::Code::DeadlineExceeded => E::DeadlineExceeded { message },
        tonic::Code::DataLoss => E::DataLoss { message },
        tonic::Code::ResourceExhausted => E::ResourceExhausted { message },
        tonic::Code::Unavailable => E::Unavailable {
            message: status_chain(s),
        },
        _ => E::Other {
            message: status_chain(s),
        },
    }
}

fn case_to_proto(c: &split::TestCase) -> proto::TestCase {
    proto::TestCase {
        name: c.name.clone(),
        classname: c.classname.clone(),
        outcome: unit_outcome_to_proto(c.outcome) as i32,
        skipped: c.skipped,
        duration_ms: c.duration_ms,
        message: c.message.clone(),
        body: c.body.clone(),
        system_out: c.system_out.clone(),
        system_err: c.system_err.clone(),
    }
}

/// A split's merged report to wire.
pub fn split_report_to_proto(r: &split::SplitReport) -> proto::SplitReport {
    proto::SplitReport {
        key: r.key.clone(),
        shards: r.shards,
        strategy: r.strategy.as_str().to_string(),
        rounds: r.rounds,
        done: r.done,
        passed: r.passed,
        retry_note: r.retry_note.clone(),
        interactions: r
            .interactions
            .iter()
            .map(|i| proto::Interaction {
                units: i.units.clone(),
                try_number: i.try_number,
                detail: i.detail.clone(),
                runner: i.runner.clone().unwrap_or_default(),
            })
            .collect(),
        interaction_policy: r.interaction_policy.as_str().to_string(),
        units: r
            .units
            .iter()
            .map(|u| proto::UnitReport {
                unit: u.unit.clone(),
                verdict: u.verdict.as_str().to_string(),
                flaky_history: u.flaky_history,
                tries: u
                    .tries
                    .iter()
                    .map(|t| proto::UnitTry {
                        try_number: t.try_number,
                        outcome: t
                            .state
                            .outcome()
                            .map(unit_outcome_to_proto)
                            .unwrap_or(proto::UnitOutcome::Unspecified)
                            as i32,
                        runner: t.runner.clone().unwrap_or_default(),
                        duration_ms: t.duration_ms,
                        cases: t.cases.iter().map(case_to_proto).collect(),
                    })
                    .collect(),
            })
            .collect(),
    }
}

/// The name of a wire job state, as people read it (`passed`, `running`, ...; `unknown` for a
/// value this build does not know).
pub fn state_name(state: i32) -> &'static str {
    proto::JobState::try_from(state)
        .ok()
        .and_then(job_state_from_proto)
        .map_or("unknown", |s| s.as_str())
}

/// The ready jobs per label set, as `GetQueue` answers.
pub fn queue_to_proto(
    sets: Vec<(std::collections::BTreeMap<String, String>, u64)>,
) -> proto::Queue {
    proto::Queue {
        sets: sets
            .into_iter()
            .map(|(labels, ready)| proto::QueuedLabelSet {
                labels: labels.into_iter().collect(),
                ready,
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_domain::{AttemptId, BuildId, RunnerId};

    #[test]
    fn states_round_trip() {
        for s in JobState::ALL {
            assert_eq!(job_state_from_proto(job_state_to_proto(s)), Some(s));
        }
        assert_eq!(job_state_from_proto(proto::JobState::Unspecified), None);
    }

    #[test]
    fn timestamps_round_trip() {
        for ms in [0, 1, 999, 1_700_000_000_123, -1] {
            assert_eq!(millis(&timestamp(ms)), ms);
        }
    }

    fn wire(kind: proto::runner_message::Kind) -> proto::RunnerMessage {
        proto::RunnerMessage { kind: Some(kind) }
    }

    /// Every kind of runner message survives the wire both ways.
    #[test]
    fn runner_messages_round_trip() {
        use protocol::RunnerMessage as M;
        let case = split::TestCase {
            name: "t".into(),
            classname: "c".into(),
            outcome: split::UnitOutcome::Failed,
            skipped: false,
            duration_ms: 3,
            message: "m".into(),
            body: "b".into(),
            system_out: "o".into(),
            system_err: "e".into(),
        };
        let messages = [
            M::Hello(protocol::Hello {
                name: "r1".into(),
                labels: [("os".to_string(), "linux".to_string())].into(),
                slots: 2,
                version: "1".into(),
                held_attempts: vec![AttemptId::new(4), AttemptId::new(5)],
                token: "t".into(),
                session_secret: "s".into(),
            }),
            M::Heartbeat(protocol::Heartbeat {
                running_attempts: vec![AttemptId::new(4)],
                sent_at_ms: 9,
                draining: true,
                lists_held: true,
            }),
            M::Accepted(protocol::Accepted {
                attempt_id: AttemptId::new(4),
            }),
            M::Rejected(protocol::Rejected {
                attempt_id: AttemptId::new(4),
                reason: "no free slot".into(),
            }),
            M::Output(protocol::OutputChunk {
                attempt_id: AttemptId::new(4),
                seq: 1,
                step_index: 0,
                stream: protocol::OutputStream::Stderr,
                data: bytes::Bytes::from_static(b"x"),
            }),
            M::StepStarted(protocol::StepStarted {
                attempt_id: AttemptId::new(4),
                step_index: 1,
            }),
            M::StepFinished(protocol::StepFinished {
                attempt_id: AttemptId::new(4),
                step_index: 1,
                outcome: StepOutcome::Failed,
                exit_code: Some(2),
                signal: None,
                duration_ms: 7,
                last_seq: 1,
                cases: vec![case.clone()],
                report_note: "n".into(),
            }),
            M::JobFinished(protocol::JobFinished {
                attempt_id: AttemptId::new(4),
                state: JobState::Failed,
                message: "why".into(),
                last_seq: 1,
            }),
            M::NextUnits(protocol::NextUnits {
                attempt_id: AttemptId::new(4),
                step_index: 0,
                request: 2,
                discovered: vec!["u1".into()],
                results: vec![split::UnitReport {
                    unit: "u1".into(),
                    try_number: 1,
                    outcome: split::UnitOutcome::Failed,
                    duration_ms: 5,
                    cases: vec![case],
                }],
                max_units: 3,
                interactions: vec![split::Interaction {
                    units: vec!["u1".into(), "u2".into()],
                    try_number: 1,
                    detail: "d".into(),
                    runner: None,
                }],
                batch_ms: 11,
                batch_processes: 1,
            }),
        ];
        for m in messages {
            let back = runner_message_from_proto(runner_message_to_proto(m.clone()));
            assert_eq!(back, Ok(m));
        }
    }

    /// A wire message that does not fit the protocol is an error naming what is wrong, never
    /// a panic.
    #[test]
    fn invalid_runner_messages_are_refused_with_the_reason() {
        use proto::runner_message::Kind;
        let refused = |m: proto::RunnerMessage, word: &str| match runner_message_from_proto(m) {
            Err(why) => assert!(why.contains(word), "{why}"),
            Ok(m) => panic!("accepted {m:?}"),
        };
        refused(proto::RunnerMessage { kind: None }, "no kind");
        refused(
            wire(Kind::Output(proto::OutputChunk {
                stream: 9,
                ..Default::default()
            })),
            "output.stream",
        );
        refused(
            wire(Kind::StepFinished(proto::StepFinished {
                outcome: 0,
                ..Default::default()
            })),
            "step_finished.outcome",
        );
        refused(
            wire(Kind::StepFinished(proto::StepFinished {
                outcome: proto::StepOutcome::Passed as i32,
                report_note: "x".repeat(MAX_REPORT_NOTE + 1),
                ..Default::default()
            })),
            "report_note",
        );
        for state in [0, proto::JobState::Running as i32, 99] {
            refused(
                wire(Kind::JobFinished(proto::JobFinished {
                    state,
                    ..Default::default()
                })),
                "job_finished.state",
            );
        }
        refused(
            wire(Kind::NextUnits(proto::NextUnits {
                request: 0,
                ..Default::default()
            })),
            "request",
        );
        refused(
            wire(Kind::NextUnits(proto::NextUnits {
                request: 1,
                discovered: vec!["a\nb".into()],
                ..Default::default()
            })),
            "newline",
        );
        refused(
            wire(Kind::NextUnits(proto::NextUnits {
                request: 1,
                results: vec![proto::UnitResult {
                    unit: "u".into(),
                    try_number: 1,
                    outcome: 0,
                    ..Default::default()
                }],
                ..Default::default()
            })),
            "outcome",
        );
    }

    /// The dispatcher's messages survive the wire both ways; one of an unknown kind is
    /// skipped, one that does not fit is an error.
    #[test]
    fn dispatcher_messages_round_trip() {
        use protocol::DispatcherMessage as M;
        let messages = [
            M::Welcome(protocol::Welcome {
                runner_id: RunnerId::new(1),
                heartbeat_interval_ms: 2,
                missed_heartbeats_allowed: 3,
                stale_attempts: vec![AttemptId::new(4)],
                session_secret: "s".into(),
            }),
            M::Assign(protocol::Assign {
                attempt_id: AttemptId::new(4),
                job_id: JobId::new(5),
                build_id: BuildId::new(6),
                repo_url: "/r".into(),
                commit: "c".into(),
                branch: "main".into(),
                steps: vec![
                    protocol::AssignedStep {
                        index: 0,
                        name: "s".into(),
                        run: "true".into(),
                        timeout_ms: 10,
                        split: Some(protocol::SplitStep {
                            key: "k".into(),
                            shards: 2,
                            shard: 1,
                            units: split::UnitSource::Command("ls".into()),
                        }),
                        ..Default::default()
                    },
                    protocol::AssignedStep {
                        index: 1,
                        post: Some(kiln_domain::PostCondition::Failure),
                        ..Default::default()
                    },
                ],
                attempt_number: 1,
                ..Default::default()
            }),
            M::OutputAck(protocol::OutputAck {
                attempt_id: AttemptId::new(4),
                up_to_seq: 9,
            }),
            M::ResultAck(protocol::ResultAck {
                attempt_id: AttemptId::new(4),
            }),
            M::Refused(protocol::Refused {
                attempt_id: AttemptId::new(4),
                reason: "r".into(),
            }),
            M::Cancel(protocol::Cancel {
                attempt_id: AttemptId::new(4),
                grace_ms: 5,
                reason: "c".into(),
            }),
            M::Drain(protocol::Drain { reason: "d".into() }),
            M::Units(protocol::Units {
                attempt_id: AttemptId::new(4),
                step_index: 0,
                request: 1,
                reply: split::UnitsReply::Done {
                    passed: true,
                    summary: "ok".into(),
                },
            }),
        ];
        for m in messages {
            let back = dispatcher_message_from_proto(dispatcher_message_to_proto(m.clone()));
            assert_eq!(back, Ok(Some(m)));
        }
        assert_eq!(
            dispatcher_message_from_proto(proto::DispatcherMessage { kind: None }),
            Ok(None)
        );
        let bad = proto::DispatcherMessage {
            kind: Some(proto::dispatcher_message::Kind::Units(proto::Units {
                state: 42,
                ..Default::default()
            })),
        };
        assert!(dispatcher_message_from_proto(bad).is_err());
    }
}

//! The one place where wire types (`proto`) and domain types (`kiln-domain`, `kiln-store`)
//! are converted into each other.

use kiln_domain::{JobState, Millis, RunnerRecord, StepOutcome, split};
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
        id: b.id,
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
                    id: j.id,
                    build_id: j.build_id,
                    name: j.name.clone(),
                    state: job_state_to_proto(j.state) as i32,
                    labels: j.labels.clone().into_iter().collect(),
                    runner: j.runner.clone().unwrap_or_default(),
                    attempt_id: j.current_attempt.unwrap_or(0),
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
        retry_of: b.retry_of.unwrap_or(0),
        pipeline: b.pipeline.clone(),
    }
}

/// One attempt of a job to wire.
pub fn attempt_to_proto(a: &kiln_store::AttemptInfo) -> proto::JobAttempt {
    proto::JobAttempt {
        id: a.id,
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

/// A runner as the dispatcher sees it, to wire.
pub fn runner_to_proto(
    r: &RunnerRecord,
    state: proto::RunnerState,
    running_jobs: Vec<u64>,
    last_heartbeat: Millis,
) -> proto::Runner {
    proto::Runner {
        id: r.id,
        name: r.name.clone(),
        state: state as i32,
        labels: r.labels.clone().into_iter().collect(),
        slots: r.slots,
        running_jobs,
        last_heartbeat: Some(timestamp(last_heartbeat)),
        version: r.version.clone(),
    }
}

/// A split step's spec to wire (what the runner needs of it).
pub fn split_to_proto(s: &split::SplitSpec) -> proto::SplitStep {
    let (glob, command) = match &s.units {
        split::UnitSource::Glob(g) => (g.clone(), String::new()),
        split::UnitSource::Command(c) => (Vec::new(), c.clone()),
    };
    proto::SplitStep {
        key: s.key.clone(),
        shards: s.shards,
        shard: s.shard,
        glob,
        command,
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

/// Most units one NextUnits may list as discovered, and longest unit id.
pub const MAX_UNITS: usize = 100_000;
/// Longest unit id, in bytes.
pub const MAX_UNIT_LEN: usize = 4096;
/// Most test cases reported for one unit.
pub const MAX_CASES: usize = 100_000;

/// Longest note a StepFinished may carry about reports it could not read, in bytes.
pub const MAX_REPORT_NOTE: usize = 4096;

/// The test cases (and note) of a StepFinished, checked: at most [`MAX_CASES`] cases, each
/// with an outcome, and a note of at most [`MAX_REPORT_NOTE`] bytes.
pub fn step_cases_from_proto(
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

fn check_unit(unit: &str) -> Result<(), String> {
    if unit.is_empty() || unit.len() > MAX_UNIT_LEN || unit.contains('\n') {
        return Err(format!(
            "unit id {:?} must be 1 to {MAX_UNIT_LEN} bytes without a newline",
            unit.chars().take(80).collect::<String>()
        ));
    }
    Ok(())
}

/// A shard's NextUnits to the engine's request, checking every field.
pub fn units_request_from_proto(
    runner: u64,
    m: proto::NextUnits,
) -> Result<split::UnitsRequest, String> {
    if m.request == 0 {
        return Err("next_units.request must start at 1".into());
    }
    if m.discovered.len() > MAX_UNITS {
        return Err(format!(
            "next_units.discovered lists {} units, more than {MAX_UNITS}",
            m.discovered.len()
        ));
    }
    for u in &m.discovered {
        check_unit(u)?;
    }
    let mut results = Vec::with_capacity(m.results.len());
    for r in m.results {
        check_unit(&r.unit)?;
        if r.try_number == 0 {
            return Err(format!("result of unit {:?} has try_number 0", r.unit));
        }
        if r.cases.len() > MAX_CASES {
            return Err(format!(
                "result of unit {:?} has too many test cases",
                r.unit
            ));
        }
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
    if m.interactions.len() > MAX_UNITS {
        return Err("next_units.interactions has too many entries".into());
    }
    let mut interactions = Vec::with_capacity(m.interactions.len());
    for i in m.interactions {
        if i.units.is_empty() || i.units.len() > MAX_UNITS {
            return Err(format!(
                "an interaction must list 1 to {MAX_UNITS} units, not {}",
                i.units.len()
            ));
        }
        for u in &i.units {
            check_unit(u)?;
        }
        if i.try_number == 0 {
            return Err("an interaction has try_number 0".into());
        }
        interactions.push(split::Interaction {
            units: i.units,
            try_number: i.try_number,
            detail: i.detail.chars().take(1000).collect(),
            runner: None,
        });
    }
    Ok(split::UnitsRequest {
        attempt: m.attempt_id,
        runner,
        step_index: m.step_index,
        request: m.request,
        discovered: m.discovered,
        results,
        interactions,
        max_units: m.max_units,
        batch_ms: m.batch_ms,
        batch_processes: m.batch_processes,
    })
}

/// The engine's answer to a NextUnits, to wire.
pub fn units_reply_to_proto(req: &proto::NextUnits, reply: split::UnitsReply) -> proto::Units {
    let mut out = proto::Units {
        attempt_id: req.attempt_id,
        step_index: req.step_index,
        request: req.request,
        ..Default::default()
    };
    match reply {
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
                            .outcome
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

#[cfg(test)]
mod tests {
    use super::*;

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
}

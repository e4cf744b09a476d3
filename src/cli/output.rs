//! How the client commands print builds: text for people, `--json` for scripts, and the exit code a build's state gives.

use std::time::Duration;

use super::exit;
use crate::proto;

/// The exit code for a final (or not) state.
pub fn state_exit(state: i32) -> i32 {
    match proto::JobState::try_from(state) {
        Ok(proto::JobState::Passed) => exit::OK,
        Ok(proto::JobState::Failed) => exit::FAILED,
        Ok(
            proto::JobState::Cancelled
            | proto::JobState::TimedOut
            | proto::JobState::Errored
            | proto::JobState::Skipped,
        ) => exit::NOT_PASSED,
        _ => exit::RUNNING,
    }
}

pub(super) fn fmt_time(ts: &prost_types::Timestamp) -> String {
    let t = std::time::UNIX_EPOCH + Duration::from_millis(crate::convert::millis(ts).max(0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

pub(super) fn build_json(b: &proto::Build) -> serde_json::Value {
    serde_json::json!({
        "id": b.id,
        "repo": b.repo,
        "commit": b.commit,
        "branch": b.branch,
        "state": crate::convert::state_name(b.state),
        "trigger": b.trigger,
        "error": (!b.error.is_empty()).then_some(&b.error),
        "pipeline": (!b.pipeline.is_empty()).then_some(&b.pipeline),
        "retry_of": (b.retry_of != 0).then_some(b.retry_of),
        "env": b.env.iter().collect::<std::collections::BTreeMap<_, _>>(),
        "created_at": b.created_at.as_ref().map(crate::convert::millis),
        "finished_at": b.finished_at.as_ref().map(crate::convert::millis),
        "jobs": b.jobs.iter().map(|j| serde_json::json!({
            "id": j.id,
            "name": j.name,
            "state": crate::convert::state_name(j.state),
            "runner": j.runner,
            "attempt_id": j.attempt_id,
            "attempts": j.attempts,
            "message": j.message,
            "lost_attempts": j.lost_attempts,
            "attempt_list": j.attempt_list.iter().map(|a| serde_json::json!({
                "id": a.id,
                "number": a.number,
                "runner": a.runner,
                "state": a.state,
                "started_at": a.started_at.as_ref().map(crate::convert::millis),
                "finished_at": a.finished_at.as_ref().map(crate::convert::millis),
                "note": (!a.note.is_empty()).then_some(&a.note),
            })).collect::<Vec<_>>(),
            "refusals": j.refusals,
            "labels": j.labels,
            "steps": j.steps.iter().map(|s| serde_json::json!({
                "index": s.index,
                "name": s.name,
                "run": s.run,
                "outcome": proto::StepOutcome::try_from(s.outcome).ok()
                    .and_then(crate::convert::step_outcome_from_proto)
                    .map(|o| o.as_str()),
                "exit_code": s.exit_code,
                "duration_ms": s.duration_ms,
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    })
}

pub(super) fn print_build(b: &proto::Build, json: bool) {
    if json {
        println!("{}", build_json(b));
        return;
    }
    println!(
        "build {}  {}  {} {}{}",
        b.id,
        crate::convert::state_name(b.state),
        b.repo,
        b.commit,
        if b.branch.is_empty() {
            String::new()
        } else {
            format!(" ({})", b.branch)
        }
    );
    if !b.pipeline.is_empty() && !b.jobs.is_empty() {
        println!("  pipeline: {}", b.pipeline);
    }
    let mut env: Vec<_> = b.env.iter().collect();
    env.sort();
    for (name, value) in env {
        // Control characters (a newline, an escape sequence) are shown quoted, not obeyed.
        if value.chars().any(char::is_control) {
            println!("  env: {name}={value:?}");
        } else {
            println!("  env: {name}={value}");
        }
    }
    if !b.error.is_empty() {
        println!("  error: {}", b.error);
    }
    for j in &b.jobs {
        println!(
            "  job {} {:<20} {:<10} runner={} attempts={}{}",
            j.id,
            j.name,
            crate::convert::state_name(j.state),
            if j.runner.is_empty() { "-" } else { &j.runner },
            j.attempts,
            if j.message.is_empty() {
                String::new()
            } else {
                format!("  ({})", j.message)
            }
        );
        if let Some(first) = j.attempt_list.first()
            && first.number > 1
        {
            println!("    ({} earlier attempts not listed)", first.number - 1);
        }
        for a in &j.attempt_list {
            let result = if a.id == j.attempt_id {
                "  <- current"
            } else {
                ""
            };
            println!(
                "    attempt {} (id {}) on {:<12} {:<10}{}{result}",
                a.number,
                a.id,
                if a.runner.is_empty() { "-" } else { &a.runner },
                a.state,
                if a.note.is_empty() {
                    String::new()
                } else {
                    format!("  ({})", a.note)
                }
            );
        }
        for r in &j.refusals {
            println!("    refused: {r}");
        }
        for s in &j.steps {
            let outcome = proto::StepOutcome::try_from(s.outcome)
                .ok()
                .and_then(crate::convert::step_outcome_from_proto)
                .map_or("pending", |o| o.as_str());
            let exit = s
                .exit_code
                .map(|c| format!(" exit={c}"))
                .unwrap_or_default();
            println!(
                "    step {} {:<18} {:<10}{exit} {} ms",
                s.index, s.name, outcome, s.duration_ms
            );
        }
    }
}

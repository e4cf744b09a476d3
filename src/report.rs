//! How the CLI shows a build's test report (split steps, and plain steps' `junit` files): counts, failures, flaky tests with
//! their history, the slowest units and why retries stopped; and its JSON form.

use std::fmt::Write as _;

use crate::proto;

/// How many slowest units `kiln show` lists per split.
const SLOWEST: usize = 5;

fn outcome_name(o: i32) -> &'static str {
    match proto::UnitOutcome::try_from(o) {
        Ok(proto::UnitOutcome::Passed) => "passed",
        Ok(proto::UnitOutcome::Failed) => "failed",
        Ok(proto::UnitOutcome::Errored) => "errored",
        _ => "pending",
    }
}

/// Total time of a unit over its tries, milliseconds.
fn unit_ms(u: &proto::UnitReport) -> u64 {
    u.tries.iter().map(|t| t.duration_ms).sum()
}

fn tries_text(u: &proto::UnitReport) -> String {
    u.tries
        .iter()
        .map(|t| {
            format!(
                "try {} {} on {}",
                t.try_number,
                outcome_name(t.outcome),
                if t.runner.is_empty() { "-" } else { &t.runner }
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The test report as `kiln show` prints it (empty when the build has no split step and no
/// step's `junit` files gave test cases).
pub fn text(r: &proto::TestReport) -> String {
    let mut out = String::new();
    for s in &r.splits {
        let count = |v: &str| s.units.iter().filter(|u| u.verdict == v).count();
        let state = match (s.done, s.passed) {
            (false, _) => "running",
            (true, true) => "passed",
            (true, false) => "failed",
        };
        let _ = writeln!(
            out,
            "  split step {}: {state}; {} units on {} shards ({}), {} round{}: {} passed, {} flaky, {} failed, {} not run",
            s.key,
            s.units.len(),
            s.shards,
            s.strategy,
            s.rounds,
            if s.rounds == 1 { "" } else { "s" },
            count("passed"),
            count("flaky"),
            count("failed"),
            count("not_run"),
        );
        for u in s.units.iter().filter(|u| u.verdict == "failed") {
            let _ = writeln!(out, "    failed: {} ({})", u.unit, tries_text(u));
            for t in u.tries.last().into_iter() {
                for c in t.cases.iter().filter(|c| {
                    proto::UnitOutcome::try_from(c.outcome) != Ok(proto::UnitOutcome::Passed)
                }) {
                    let first = [&c.message, &c.body]
                        .into_iter()
                        .flat_map(|t| t.lines())
                        .map(str::trim)
                        .find(|l| !l.is_empty())
                        .unwrap_or_default();
                    let _ = writeln!(out, "      {} {}: {first}", c.classname, c.name);
                }
            }
        }
        for i in &s.interactions {
            let _ = writeln!(
                out,
                "    interaction failure ({}): a batch failed together ({}, try {} on {}), each unit passed alone: {}",
                if s.interaction_policy == "fail" {
                    "fails the split: interaction: fail"
                } else {
                    "a warning: interaction: warn"
                },
                i.detail,
                i.try_number,
                if i.runner.is_empty() { "-" } else { &i.runner },
                i.units.join(", ")
            );
        }
        for u in s.units.iter().filter(|u| u.verdict == "flaky") {
            let _ = writeln!(
                out,
                "    flaky: {} ({}; flaky in {} build{} of this repository)",
                u.unit,
                tries_text(u),
                u.flaky_history,
                if u.flaky_history == 1 { "" } else { "s" }
            );
        }
        let mut slow: Vec<&proto::UnitReport> = s.units.iter().collect();
        slow.sort_by_key(|u| std::cmp::Reverse(unit_ms(u)));
        let list: Vec<String> = slow
            .iter()
            .take(SLOWEST)
            .filter(|u| unit_ms(u) > 0)
            .map(|u| format!("{} {:.1} s", u.unit, unit_ms(u) as f64 / 1000.0))
            .collect();
        if !list.is_empty() {
            let _ = writeln!(out, "    slowest: {}", list.join(", "));
        }
        if !s.retry_note.is_empty() {
            let _ = writeln!(out, "    retries: {}", s.retry_note);
        }
    }
    for s in &r.steps {
        let is = |o: proto::UnitOutcome| {
            move |c: &&proto::TestCase| proto::UnitOutcome::try_from(c.outcome) == Ok(o)
        };
        let skipped = s.cases.iter().filter(|c| c.skipped).count();
        let failed: Vec<&proto::TestCase> = s
            .cases
            .iter()
            .filter(|c| !c.skipped)
            .filter(|c| !is(proto::UnitOutcome::Passed)(c))
            .collect();
        let _ = writeln!(
            out,
            "  step {} (junit): {} test cases: {} passed, {} failed, {} skipped",
            s.key,
            s.cases.len(),
            s.cases.len() - failed.len() - skipped,
            failed.len(),
            skipped,
        );
        for c in failed {
            let first = [&c.message, &c.body]
                .into_iter()
                .flat_map(|t| t.lines())
                .map(str::trim)
                .find(|l| !l.is_empty())
                .unwrap_or_default();
            let _ = writeln!(
                out,
                "    {}: {} {}: {first}",
                outcome_name(c.outcome),
                c.classname,
                c.name
            );
        }
        if !s.note.is_empty() {
            let _ = writeln!(out, "    note: {}", s.note);
        }
    }
    out
}

/// The test report as JSON (the `tests` member of `kiln show --json`).
pub fn json(r: &proto::TestReport) -> serde_json::Value {
    serde_json::Value::Array(
        r.splits
            .iter()
            .map(|s| {
                serde_json::json!({
                    "key": s.key,
                    "kind": "split",
                    "shards": s.shards,
                    "strategy": s.strategy,
                    "rounds": s.rounds,
                    "done": s.done,
                    "passed": s.passed,
                    "retry_note": s.retry_note,
                    "interaction_policy": s.interaction_policy,
                    "interactions": s.interactions.iter().map(|i| serde_json::json!({
                        "units": i.units,
                        "try": i.try_number,
                        "detail": i.detail,
                        "runner": i.runner,
                    })).collect::<Vec<_>>(),
                    "units": s.units.iter().map(|u| serde_json::json!({
                        "unit": u.unit,
                        "verdict": u.verdict,
                        "flaky_history": u.flaky_history,
                        "tries": u.tries.iter().map(|t| serde_json::json!({
                            "try": t.try_number,
                            "outcome": outcome_name(t.outcome),
                            "runner": t.runner,
                            "duration_ms": t.duration_ms,
                            "cases": t.cases.iter().map(case_json).collect::<Vec<_>>(),
                        })).collect::<Vec<_>>(),
                    })).collect::<Vec<_>>(),
                })
            })
            .chain(r.steps.iter().map(|s| {
                serde_json::json!({
                    "key": s.key,
                    "kind": "junit",
                    "note": s.note,
                    "cases": s.cases.iter().map(case_json).collect::<Vec<_>>(),
                })
            }))
            .collect(),
    )
}

fn case_json(c: &proto::TestCase) -> serde_json::Value {
    serde_json::json!({
        "name": c.name,
        "classname": c.classname,
        "outcome": outcome_name(c.outcome),
        "skipped": c.skipped,
        "duration_ms": c.duration_ms,
        "message": c.message,
        "body": c.body,
        "system_out": c.system_out,
        "system_err": c.system_err,
    })
}

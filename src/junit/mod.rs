//! JUnit XML: reading what a split step's command wrote ([`read`]), and writing a build's merged
//! report ([`build_report`]) the way cargo-nextest writes one, with `quick-junit`.
//!
//! In the merged report every split step is one `<testsuite>` named after its key. A unit whose
//! tries reported test cases gives one `<testcase>` per case (identified by class name and name,
//! as its last try reported it); a unit without cases is one `<testcase>` named after the unit.
//! Earlier failed tries of a case that passed in the end are `<flakyFailure>` elements; those of
//! a case that failed every try are `<rerunFailure>` elements.

pub mod read;

use std::time::Duration;

use kiln_domain::Build;
use kiln_domain::split::{SplitReport, TestCase, UnitOutcome, UnitSummary, UnitTry, UnitVerdict};
use quick_junit::{
    FlakyOrRerun, NonSuccessKind, NonSuccessReruns, Report, TestCaseStatus, TestRerun, TestSuite,
};

/// The merged JUnit XML report of a build's split steps.
pub fn build_report(build: &Build, splits: &[SplitReport]) -> String {
    let mut report = Report::new(format!("kiln build {}", build.id));
    for split in splits {
        let mut suite = TestSuite::new(split.key.clone());
        for unit in &split.units {
            suite.add_test_cases(unit_cases(&split.key, unit));
        }
        report.add_test_suite(suite);
    }
    report
        .to_string()
        .unwrap_or_else(|e| format!("<!-- cannot write the report: {e} -->\n"))
}

/// The `<testcase>`s of one unit over its tries.
fn unit_cases(key: &str, unit: &UnitSummary) -> Vec<quick_junit::TestCase> {
    let ended: Vec<&UnitTry> = unit.tries.iter().filter(|t| t.outcome.is_some()).collect();
    let Some(last) = ended.last() else {
        let mut case = quick_junit::TestCase::new(unit.unit.clone(), TestCaseStatus::skipped());
        case.set_classname(key.to_string());
        return vec![case];
    };
    let earlier = &ended[..ended.len() - 1];
    let mut out = Vec::new();
    let last_failed = last.outcome != Some(UnitOutcome::Passed);
    for c in &last.cases {
        let reruns: Vec<TestRerun> = earlier
            .iter()
            .filter_map(|t| {
                t.cases
                    .iter()
                    .find(|e| e.name == c.name && e.classname == c.classname)
                    .filter(|e| e.outcome != UnitOutcome::Passed)
                    .map(|e| rerun(e.outcome, &e.message, e.duration_ms))
            })
            .collect();
        out.push(case(
            &c.name,
            if c.classname.is_empty() {
                &unit.unit
            } else {
                &c.classname
            },
            c,
            reruns,
        ));
    }
    // A unit that failed without a failing case (a crash, an exit status), or without cases.
    let failing_case = last.cases.iter().any(|c| c.outcome != UnitOutcome::Passed);
    if last.cases.is_empty() || (last_failed && !failing_case) {
        let reruns = earlier
            .iter()
            .filter(|t| t.outcome != Some(UnitOutcome::Passed))
            .map(|t| {
                rerun(
                    t.outcome.unwrap_or(UnitOutcome::Errored),
                    &format!("try {} failed", t.try_number),
                    t.duration_ms,
                )
            })
            .collect();
        let whole = TestCase {
            name: unit.unit.clone(),
            classname: key.to_string(),
            outcome: last.outcome.unwrap_or(UnitOutcome::Errored),
            skipped: false,
            duration_ms: last.duration_ms,
            message: if last_failed {
                format!(
                    "unit {} {} on try {} ({})",
                    unit.unit,
                    if unit.verdict == UnitVerdict::Failed {
                        "failed"
                    } else {
                        "did not pass"
                    },
                    last.try_number,
                    last.runner.as_deref().unwrap_or("unknown runner")
                )
            } else {
                String::new()
            },
        };
        out.push(case(&unit.unit, key, &whole, reruns));
    }
    out
}

fn rerun(outcome: UnitOutcome, message: &str, ms: u64) -> TestRerun {
    let kind = match outcome {
        UnitOutcome::Errored => NonSuccessKind::Error,
        _ => NonSuccessKind::Failure,
    };
    let mut r = TestRerun::new(kind);
    r.set_time(Duration::from_millis(ms));
    if !message.is_empty() {
        r.set_message(message.to_string());
    }
    r
}

fn case(
    name: &str,
    classname: &str,
    c: &TestCase,
    reruns: Vec<TestRerun>,
) -> quick_junit::TestCase {
    let status = if c.skipped {
        TestCaseStatus::skipped()
    } else if c.outcome == UnitOutcome::Passed {
        TestCaseStatus::Success { flaky_runs: reruns }
    } else {
        TestCaseStatus::NonSuccess {
            kind: if c.outcome == UnitOutcome::Errored {
                NonSuccessKind::Error
            } else {
                NonSuccessKind::Failure
            },
            message: (!c.message.is_empty()).then(|| c.message.clone().into()),
            ty: None,
            description: None,
            reruns: NonSuccessReruns {
                kind: FlakyOrRerun::Rerun,
                runs: reruns,
            },
        }
    };
    let mut out = quick_junit::TestCase::new(name.to_string(), status);
    out.set_classname(classname.to_string());
    out.set_time(Duration::from_millis(c.duration_ms));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_domain::split::Strategy;

    fn t(n: u32, outcome: UnitOutcome, cases: Vec<TestCase>) -> UnitTry {
        UnitTry {
            try_number: n,
            outcome: Some(outcome),
            runner: Some("r1".into()),
            duration_ms: 10,
            cases,
        }
    }

    fn c(name: &str, outcome: UnitOutcome) -> TestCase {
        TestCase {
            name: name.into(),
            classname: "tests.test_a".into(),
            outcome,
            skipped: false,
            duration_ms: 5,
            message: if outcome == UnitOutcome::Passed {
                String::new()
            } else {
                "boom".into()
            },
        }
    }

    #[test]
    fn flaky_and_failed_cases_are_marked_like_nextest() {
        use UnitOutcome::*;
        let build = Build {
            id: 7,
            repo: "r".into(),
            commit: "c".into(),
            branch: String::new(),
            trigger: "api".into(),
            state: kiln_domain::JobState::Failed,
            error: None,
            retry_of: None,
            created_at: 0,
            finished_at: None,
            pipeline: String::new(),
        };
        let split = SplitReport {
            id: 1,
            build_id: 7,
            key: "tests".into(),
            shards: 2,
            strategy: Strategy::Dynamic,
            rounds: 2,
            done: true,
            passed: false,
            retry_note: String::new(),
            units: vec![
                UnitSummary {
                    unit: "tests/test_a.py".into(),
                    verdict: UnitVerdict::Flaky,
                    tries: vec![
                        t(1, Failed, vec![c("test_x", Failed), c("test_y", Passed)]),
                        t(2, Passed, vec![c("test_x", Passed), c("test_y", Passed)]),
                    ],
                    flaky_history: 1,
                },
                UnitSummary {
                    unit: "tests/test_b.py".into(),
                    verdict: UnitVerdict::Failed,
                    tries: vec![t(1, Failed, vec![]), t(2, Failed, vec![])],
                    flaky_history: 0,
                },
            ],
        };
        let xml = build_report(&build, &[split]);
        assert!(xml.contains("<flakyFailure"), "{xml}");
        assert!(xml.contains("<rerunFailure"), "{xml}");
        assert_eq!(xml.matches("<testcase ").count(), 3, "{xml}");
        assert!(xml.contains("name=\"tests\""), "{xml}");
    }
}

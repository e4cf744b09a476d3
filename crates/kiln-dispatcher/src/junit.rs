//! A build's merged JUnit XML report ([`build_report`], [`crate::TestReport::junit_xml`]),
//! written the way cargo-nextest writes one, with `quick-junit`. (Reading JUnit files is the
//! `kiln-junit` crate's, which the runner uses too.) The engine only gathers the report's
//! facts; the XML is written here, for the API that serves it.
//!
//! In the merged report every split step is one `<testsuite>` named after its key. A unit whose
//! tries reported test cases gives one `<testcase>` per case (identified by class name and name,
//! as its last try reported it); a unit without cases is one `<testcase>` named after the unit.
//! Earlier failed tries of a case that passed in the end are `<flakyFailure>` elements; those of
//! a case that failed every try are `<rerunFailure>` elements.
//!
//! Beside them, every plain step whose `junit` files gave test cases is one `<testsuite>` named
//! after its key (`job/step`), with its cases as the files gave them.

use std::time::Duration;

use kiln_domain::Build;
use kiln_domain::split::{
    Interaction, InteractionPolicy, SplitReport, StepReport, TestCase, UnitOutcome, UnitSummary,
    UnitTry, UnitVerdict,
};
use quick_junit::{
    FlakyOrRerun, NonSuccessKind, NonSuccessReruns, Report, TestCaseStatus, TestRerun, TestSuite,
};

impl crate::TestReport {
    /// The report as one JUnit XML document; `None` when the build has no report at all (a
    /// step whose files gave no case is no report: an empty one would read as a success).
    pub fn junit_xml(&self) -> Option<String> {
        (!self.splits.is_empty() || self.steps.iter().any(|s| !s.cases.is_empty()))
            .then(|| build_report_with(&self.build, &self.splits, &self.steps))
    }
}

/// The merged JUnit XML report of a build's split steps.
pub fn build_report(build: &Build, splits: &[SplitReport]) -> String {
    build_report_with(build, splits, &[])
}

/// The merged JUnit XML report of a build's split steps and of its plain steps' `junit` files
/// (one `<testsuite>` per step, after the splits').
pub fn build_report_with(build: &Build, splits: &[SplitReport], steps: &[StepReport]) -> String {
    let mut report = Report::new(format!("kiln build {}", build.id));
    for split in splits {
        let mut suite = TestSuite::new(split.key.clone());
        for unit in &split.units {
            suite.add_test_cases(unit_cases(&split.key, unit));
        }
        for i in &split.interactions {
            suite.add_test_case(interaction_case(&split.key, split.interaction_policy, i));
        }
        report.add_test_suite(suite);
    }
    for step in steps {
        let mut suite = TestSuite::new(step.key.clone());
        suite.add_test_cases(step.cases.iter().map(|c| {
            case(
                &c.name,
                if c.classname.is_empty() {
                    &step.key
                } else {
                    &c.classname
                },
                c,
                Vec::new(),
            )
        }));
        report.add_test_suite(suite);
    }
    report
        .to_string()
        .map(|xml| keep_line_ends(&xml))
        .unwrap_or_else(|e| format!("<!-- cannot write the report: {e} -->\n"))
}

/// Marks, in a text given to `quick-junit`, a tab or carriage return it would drop
/// (`XmlString` strips control characters): `MARK t`, `MARK r`, and `MARK MARK` for the mark
/// itself (a Unicode noncharacter). [`keep_line_ends`] turns them back into characters.
const MARK: char = '\u{FDD0}';

/// A text with the characters `quick-junit` would drop marked (see [`MARK`]).
fn protect(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for ch in text.chars() {
        match ch {
            '\t' => out.extend([MARK, 't']),
            '\r' => out.extend([MARK, 'r']),
            MARK => out.extend([MARK, MARK]),
            _ => out.push(ch),
        }
    }
    out
}

/// XML as `quick-junit` writes it, with the characters a reader would otherwise change written
/// as character references: a newline inside a tag (in an attribute value: readers turn it
/// into a space), and the tabs and carriage returns [`protect`] marked (readers turn `\r\n`
/// into `\n`, and tabs in attributes into spaces). A newline elsewhere is text or indentation
/// and is kept. `quick-xml` escapes `<` and `>` in attribute values and text, so every `<` and
/// `>` left is markup.
fn keep_line_ends(xml: &str) -> String {
    let mut out = String::with_capacity(xml.len());
    let mut in_tag = false;
    let mut chars = xml.chars();
    while let Some(ch) = chars.next() {
        match ch {
            '<' => in_tag = true,
            '>' => in_tag = false,
            _ => {}
        }
        match ch {
            MARK => match chars.next() {
                Some('t') => out.push_str("&#9;"),
                Some('r') => out.push_str("&#13;"),
                Some(other) => out.push(other),
                None => {}
            },
            '\n' if in_tag => out.push_str("&#10;"),
            _ => out.push(ch),
        }
    }
    out
}

/// The `<testcase>`s of one unit over its tries.
fn unit_cases(key: &str, unit: &UnitSummary) -> Vec<quick_junit::TestCase> {
    let ended: Vec<&UnitTry> = unit
        .tries
        .iter()
        .filter(|t| t.state.outcome().is_some())
        .collect();
    let Some(last) = ended.last() else {
        let mut case = quick_junit::TestCase::new(unit.unit.clone(), TestCaseStatus::skipped());
        case.set_classname(key.to_string());
        return vec![case];
    };
    let earlier = &ended[..ended.len() - 1];
    let mut out = Vec::new();
    let last_failed = last.state.outcome() != Some(UnitOutcome::Passed);
    for c in &last.cases {
        let reruns: Vec<TestRerun> = earlier
            .iter()
            .filter_map(|t| {
                t.cases
                    .iter()
                    .find(|e| e.name == c.name && e.classname == c.classname)
                    .filter(|e| e.outcome != UnitOutcome::Passed)
                    .map(rerun_of)
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
            .filter(|t| t.state.outcome() != Some(UnitOutcome::Passed))
            .map(|t| {
                rerun(
                    t.state.outcome().unwrap_or(UnitOutcome::Errored),
                    &format!("try {} failed", t.try_number),
                    t.duration_ms,
                )
            })
            .collect();
        let whole = TestCase {
            name: unit.unit.clone(),
            classname: key.to_string(),
            outcome: last.state.outcome().unwrap_or(UnitOutcome::Errored),
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
            body: String::new(),
            system_out: String::new(),
            system_err: String::new(),
        };
        out.push(case(&unit.unit, key, &whole, reruns));
    }
    out
}

/// An interaction failure as a `<testcase>` named after its units: a `<failure>` when the
/// step's policy fails the split, else a passing case with a `<flakyFailure>` (it failed
/// together and passed apart).
fn interaction_case(
    key: &str,
    policy: InteractionPolicy,
    i: &Interaction,
) -> quick_junit::TestCase {
    let message = format!(
        "interaction failure: these units failed together ({}, try {} on {}) and each passed \
         alone: {}",
        i.detail,
        i.try_number,
        i.runner.as_deref().unwrap_or("unknown runner"),
        i.units.join(", ")
    );
    let status = match policy {
        InteractionPolicy::Fail => TestCaseStatus::NonSuccess {
            kind: NonSuccessKind::Failure,
            message: Some(protect(&message).into()),
            ty: Some("interaction".into()),
            description: None,
            reruns: NonSuccessReruns::default(),
        },
        InteractionPolicy::Warn => {
            let mut r = TestRerun::new(NonSuccessKind::Failure);
            r.set_message(protect(&message));
            r.set_type("interaction");
            TestCaseStatus::Success {
                flaky_runs: vec![r],
            }
        }
    };
    let mut case =
        quick_junit::TestCase::new(format!("interaction: {}", i.units.join(" + ")), status);
    case.set_classname(key.to_string());
    case
}

/// An earlier failed try of a case, with everything it wrote.
fn rerun_of(c: &TestCase) -> TestRerun {
    let mut r = rerun(c.outcome, &c.message, c.duration_ms);
    if !c.body.is_empty() {
        r.set_description(protect(&c.body));
    }
    if !c.system_out.is_empty() {
        r.set_system_out(protect(&c.system_out));
    }
    if !c.system_err.is_empty() {
        r.set_system_err(protect(&c.system_err));
    }
    r
}

fn rerun(outcome: UnitOutcome, message: &str, ms: u64) -> TestRerun {
    let kind = match outcome {
        UnitOutcome::Errored => NonSuccessKind::Error,
        _ => NonSuccessKind::Failure,
    };
    let mut r = TestRerun::new(kind);
    r.set_time(Duration::from_millis(ms));
    if !message.is_empty() {
        r.set_message(protect(message));
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
            message: (!c.message.is_empty()).then(|| protect(&c.message).into()),
            ty: None,
            description: (!c.body.is_empty()).then(|| protect(&c.body).into()),
            reruns: NonSuccessReruns {
                kind: FlakyOrRerun::Rerun,
                runs: reruns,
            },
        }
    };
    let mut out = quick_junit::TestCase::new(name.to_string(), status);
    out.set_classname(classname.to_string());
    out.set_time(Duration::from_millis(c.duration_ms));
    if !c.system_out.is_empty() {
        out.set_system_out(protect(&c.system_out));
    }
    if !c.system_err.is_empty() {
        out.set_system_err(protect(&c.system_err));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_domain::BuildId;
    use kiln_domain::split::{Strategy, UnitTryState};
    use kiln_junit as read;

    fn t(n: u32, outcome: UnitOutcome, cases: Vec<TestCase>) -> UnitTry {
        UnitTry {
            try_number: n,
            state: UnitTryState::Ended(outcome),
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
            body: String::new(),
            system_out: String::new(),
            system_err: String::new(),
        }
    }

    fn build() -> Build {
        Build {
            id: 7.into(),
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
            params: Default::default(),
        }
    }

    #[test]
    fn flaky_and_failed_cases_are_marked_like_nextest() {
        use UnitOutcome::*;
        let split = SplitReport {
            id: 1.into(),
            build_id: BuildId::new(7),
            key: "tests".into(),
            shards: 2,
            strategy: Strategy::Dynamic,
            rounds: 2,
            done: true,
            passed: false,
            retry_note: String::new(),
            interactions: Vec::new(),
            interaction_policy: InteractionPolicy::Warn,
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
        let xml = build_report(&build(), &[split]);
        assert!(xml.contains("<flakyFailure"), "{xml}");
        assert!(xml.contains("<rerunFailure"), "{xml}");
        assert_eq!(xml.matches("<testcase ").count(), 3, "{xml}");
        assert!(xml.contains("name=\"tests\""), "{xml}");
    }

    /// The failure texts of a real pytest run, read by the runner's reader and written into the
    /// merged report: message, body, system-out and system-err come back byte for byte, in the
    /// last try's `<failure>` and in the earlier try's `<rerunFailure>`.
    #[test]
    fn pytest_failure_texts_survive_reading_and_the_merged_report() {
        let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let dir = tmp.path();
        std::fs::write(
            dir.join("test_t.py"),
            "import sys\n\n\ndef helper(x):\n    y = x * 2\n    assert y == 3, 'doubled value is wrong\\nsecond line\\r\\nthird\\twith a tab <&>'\n\n\ndef test_fails():\n    print('to stdout\\n  indented line 2')\n    print('to stderr', file=sys.stderr)\n    helper(1)\n\n\ndef test_ok():\n    pass\n",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let out = std::process::Command::new("python3")
            .args([
                "-m",
                "pytest",
                "-q",
                "-p",
                "no:cacheprovider",
                "-o",
                "junit_logging=all",
                "--junitxml=out.xml",
                "test_t.py",
            ])
            .current_dir(dir)
            .output()
            .unwrap_or_else(|e| panic!("pytest: {e}"));
        assert_eq!(out.status.code(), Some(1), "{out:?}");
        let written = std::fs::read_to_string(dir.join("out.xml")).unwrap_or_else(|e| {
            panic!("pytest wrote no report ({e}; scripts/test installs pytest): {out:?}")
        });

        // What pytest wrote, read independently of the reader under test.
        let doc = roxmltree::Document::parse(&written).unwrap_or_else(|e| panic!("{e}"));
        let fails = doc
            .descendants()
            .find(|n| n.attribute("name") == Some("test_fails"))
            .unwrap_or_else(|| panic!("{written}"));
        let child = |n: roxmltree::Node<'_, '_>, tag: &str| -> String {
            n.children()
                .find(|c| c.tag_name().name() == tag)
                .map(|c| {
                    c.children()
                        .filter(|t| t.is_text())
                        .filter_map(|t| t.text())
                        .collect()
                })
                .unwrap_or_default()
        };
        let failure = fails
            .children()
            .find(|c| c.tag_name().name() == "failure")
            .unwrap_or_else(|| panic!("{written}"));
        let message = failure.attribute("message").unwrap_or_default().to_string();
        let body = child(fails, "failure");
        let (stdout, stderr) = (child(fails, "system-out"), child(fails, "system-err"));
        assert!(
            message.contains('\n') && message.contains('\t'),
            "{message:?}"
        );
        assert!(body.len() > 300, "a real traceback: {body:?}");
        assert!(stdout.contains("indented line 2") && stderr.contains("to stderr"));

        let cases: Vec<TestCase> = read::read_cases(&written)
            .unwrap_or_else(|e| panic!("{e}"))
            .iter()
            .map(read::ReadCase::to_case)
            .collect();
        let read = cases
            .iter()
            .find(|c| c.name == "test_fails")
            .unwrap_or_else(|| panic!("{cases:?}"));
        assert_eq!(
            (
                &read.message,
                &read.body,
                &read.system_out,
                &read.system_err
            ),
            (&message, &body, &stdout, &stderr),
            "read as written"
        );

        let try_of = |n| UnitTry {
            try_number: n,
            state: UnitTryState::Ended(UnitOutcome::Failed),
            runner: Some("r1".into()),
            duration_ms: 10,
            cases: cases.clone(),
        };
        let split = SplitReport {
            id: 1.into(),
            build_id: BuildId::new(7),
            key: "tests".into(),
            shards: 1,
            strategy: Strategy::Dynamic,
            rounds: 2,
            done: true,
            passed: false,
            retry_note: String::new(),
            interactions: Vec::new(),
            interaction_policy: InteractionPolicy::Warn,
            units: vec![UnitSummary {
                unit: "test_t.py".into(),
                verdict: UnitVerdict::Failed,
                tries: vec![try_of(1), try_of(2)],
                flaky_history: 0,
            }],
        };
        let merged = build_report(&build(), &[split]);
        let doc = roxmltree::Document::parse(&merged).unwrap_or_else(|e| panic!("{e}"));
        let case = doc
            .descendants()
            .find(|n| n.attribute("name") == Some("test_fails"))
            .unwrap_or_else(|| panic!("{merged}"));
        for tag in ["failure", "rerunFailure"] {
            let el = case
                .children()
                .find(|c| c.tag_name().name() == tag)
                .unwrap_or_else(|| panic!("no <{tag}> in {merged}"));
            assert_eq!(el.attribute("message"), Some(message.as_str()), "{merged}");
            // The body is the element's first text; in a rerun, the indentation of the output
            // elements that follow it is added by the writer.
            let text = el.children().find_map(|t| t.text()).unwrap_or_default();
            if tag == "failure" {
                assert_eq!(text, body, "{merged}");
            } else {
                assert_eq!(text.trim_end(), body.trim_end(), "{merged}");
            }
        }
        let rerun = case
            .children()
            .find(|c| c.tag_name().name() == "rerunFailure")
            .unwrap_or_else(|| panic!("{merged}"));
        assert_eq!(child(rerun, "system-out"), stdout, "{merged}");
        assert_eq!(child(rerun, "system-err"), stderr, "{merged}");
        assert_eq!(child(case, "system-out"), stdout, "{merged}");
        assert_eq!(child(case, "system-err"), stderr, "{merged}");
    }

    #[test]
    fn carriage_returns_tabs_and_newlines_in_attributes_are_kept() {
        let mut x = c("test_x", UnitOutcome::Failed);
        x.message = "line 1\r\nline\t2\nline 3\r \u{FDD0}t".into();
        x.body = "body\r\nwith\ttab\n\u{FDD0}\u{FDD0}r".into();
        let split = SplitReport {
            id: 1.into(),
            build_id: BuildId::new(7),
            key: "tests".into(),
            shards: 1,
            strategy: Strategy::Dynamic,
            rounds: 1,
            done: true,
            passed: false,
            retry_note: String::new(),
            interactions: Vec::new(),
            interaction_policy: InteractionPolicy::Warn,
            units: vec![UnitSummary {
                unit: "tests/test_a.py".into(),
                verdict: UnitVerdict::Failed,
                tries: vec![t(1, UnitOutcome::Failed, vec![x.clone()])],
                flaky_history: 0,
            }],
        };
        let merged = build_report(&build(), &[split]);
        let cases = read::read_cases(&merged).unwrap_or_else(|e| panic!("{e}: {merged}"));
        assert_eq!(cases.len(), 1, "{merged}");
        assert_eq!(cases[0].message, x.message, "{merged}");
        assert_eq!(cases[0].body, x.body, "{merged}");
    }
}

//! Reading the JUnit XML a split step's batch wrote: every `<testcase>` with its outcome.
//!
//! Test runners disagree on the details, so this reads what they have in common: a
//! `<testsuites>` root (pytest, nextest, Maven) or a bare `<testsuite>` root
//! (unittest-xml-reporting, Ant), suites possibly nested, `<testcase>` elements with `name`,
//! `classname`, `time` (seconds) and sometimes `file`, and a `<failure>`, `<error>` or
//! `<skipped>` child. It uses `roxmltree` rather than `quick-junit`'s deserializer, which wants a
//! `<testsuites>` root and RFC 3339 timestamps (unittest-xml-reporting writes neither).

use kiln_domain::split::{TestCase, UnitOutcome};

/// Longest failure message kept for one case, in bytes (the whole text stays in the log).
pub const MAX_MESSAGE: usize = 1024;

/// Most nodes read from one file (a guard against a runaway report).
const MAX_NODES: u32 = 20_000_000;

/// One `<testcase>` as read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadCase {
    /// Test name.
    pub name: String,
    /// Class or module name (may be empty).
    pub classname: String,
    /// The `file` attribute of the case (or of its nearest suite), when there is one.
    pub file: Option<String>,
    /// `Failed` when the case has a `<failure>` or `<error>`, else `Passed`.
    pub outcome: UnitOutcome,
    /// Whether the case was skipped (with `Passed`).
    pub skipped: bool,
    /// Duration in milliseconds (0 when absent or unreadable).
    pub duration_ms: u64,
    /// Failure message (or the reason of a skip), at most [`MAX_MESSAGE`] bytes; empty when it
    /// passed.
    pub message: String,
}

impl ReadCase {
    /// The case as the domain reports it.
    pub fn to_case(&self) -> TestCase {
        TestCase {
            name: self.name.clone(),
            classname: self.classname.clone(),
            outcome: self.outcome,
            skipped: self.skipped,
            duration_ms: self.duration_ms,
            message: self.message.clone(),
        }
    }
}

/// Reads every test case of a JUnit XML document, in document order. An error when the text is
/// not XML, or its root is neither `<testsuites>` nor `<testsuite>`.
pub fn read_cases(xml: &str) -> Result<Vec<ReadCase>, String> {
    let options = roxmltree::ParsingOptions {
        allow_dtd: false,
        nodes_limit: MAX_NODES,
        ..Default::default()
    };
    let doc = roxmltree::Document::parse_with_options(xml, options)
        .map_err(|e| format!("not XML: {e}"))?;
    let root = doc.root_element();
    let tag = root.tag_name().name();
    if tag != "testsuites" && tag != "testsuite" {
        return Err(format!(
            "not JUnit XML: the root element is <{tag}>, not <testsuites> or <testsuite>"
        ));
    }
    let cases = root
        .descendants()
        .filter(|n| n.is_element() && n.tag_name().name() == "testcase")
        .map(read_case)
        .collect();
    Ok(cases)
}

fn read_case(node: roxmltree::Node<'_, '_>) -> ReadCase {
    let mut outcome = UnitOutcome::Passed;
    let mut skipped = false;
    let mut failure_message = None;
    let mut skip_message = None;
    for child in node.children().filter(|c| c.is_element()) {
        match child.tag_name().name() {
            "failure" | "error" => {
                outcome = UnitOutcome::Failed;
                if failure_message.is_none() {
                    failure_message = Some(message_of(child));
                }
            }
            "skipped" => {
                skipped = true;
                if skip_message.is_none() {
                    skip_message = Some(message_of(child));
                }
            }
            _ => {}
        }
    }
    // A failed case is not a skipped one, whatever else it says.
    if outcome == UnitOutcome::Failed {
        skipped = false;
    }
    let message = if outcome == UnitOutcome::Failed {
        failure_message.unwrap_or_default()
    } else if skipped {
        skip_message.unwrap_or_default()
    } else {
        String::new()
    };
    let file = node
        .ancestors()
        .filter(|n| n.is_element())
        .find_map(|n| n.attribute("file"))
        .filter(|f| !f.is_empty())
        .map(str::to_string);
    ReadCase {
        name: node.attribute("name").unwrap_or_default().to_string(),
        classname: node.attribute("classname").unwrap_or_default().to_string(),
        file,
        outcome,
        skipped,
        duration_ms: node.attribute("time").map_or(0, seconds_to_ms),
        message,
    }
}

/// The `message` attribute of a failure, error or skipped element, else the first non-blank
/// line of its text; shortened to [`MAX_MESSAGE`] bytes.
fn message_of(node: roxmltree::Node<'_, '_>) -> String {
    let text = match node.attribute("message").map(str::trim) {
        Some(m) if !m.is_empty() => m.to_string(),
        _ => node
            .descendants()
            .filter(|n| n.is_text())
            .filter_map(|n| n.text())
            .flat_map(str::lines)
            .map(str::trim)
            .find(|l| !l.is_empty())
            .unwrap_or_default()
            .to_string(),
    };
    shorten(text, MAX_MESSAGE)
}

/// `s` cut to at most `max` bytes at a character boundary, with `…` when cut.
fn shorten(mut s: String, max: usize) -> String {
    if s.len() <= max {
        return s;
    }
    let mut end = max.saturating_sub('…'.len_utf8());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.truncate(end);
    s.push('…');
    s
}

/// A `time` attribute (seconds, possibly fractional) in milliseconds; 0 when unreadable.
fn seconds_to_ms(s: &str) -> u64 {
    match s.trim().replace(',', "").parse::<f64>() {
        // `as` saturates: huge values become u64::MAX, not a panic.
        Ok(secs) if secs.is_finite() && secs > 0.0 => (secs * 1000.0).round() as u64,
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What pytest 9 writes (`--junitxml`, default xunit2 family), shortened.
    const PYTEST: &str = r#"<?xml version="1.0" encoding="utf-8"?><testsuites name="pytest tests"><testsuite name="pytest" errors="1" failures="2" skipped="1" tests="6" time="0.054" timestamp="2026-11-22T03:40:23.357322+00:00" hostname="vm"><testcase classname="tests.test_a" name="test_ok" time="0.000" /><testcase classname="tests.test_a" name="test_fail" time="0.001"><failure message="AssertionError: arithmetic is broken&#10;assert (1 + 1) == 3">&gt;   def test_fail(): assert 1 + 1 == 3, 'arithmetic is broken'
E   AssertionError: arithmetic is broken

tests/test_a.py:3: AssertionError</failure></testcase><testcase classname="tests.test_a" name="test_skip" time="0.001"><skipped type="pytest.skip" message="not here">/tmp/pyj/tests/test_a.py:4: not here</skipped></testcase><testcase classname="tests.test_a.TestX" name="test_m" time="1.250" /><testcase classname="tests.test_a.TestX" name="test_err" time="0.000"><failure message="ValueError: boom &lt;&amp;&gt;">self = &lt;test_a.TestX object at 0x7f14fb476810&gt;</failure></testcase><testcase classname="tests.test_b" name="test_b" time="0.000"><error message="failed on setup with &quot;RuntimeError: fixture broke&quot;">@pytest.fixture
E   RuntimeError: fixture broke</error></testcase></testsuite></testsuites>"#;

    /// pytest with `-o junit_family=xunit1`: `file` and `line` on each case.
    const PYTEST_XUNIT1: &str = r#"<?xml version="1.0" encoding="utf-8"?><testsuites name="pytest tests"><testsuite name="pytest" errors="0" failures="1" skipped="0" tests="2" time="0.041" timestamp="2026-11-22T03:40:23.714742+00:00" hostname="vm"><testcase classname="tests.test_a" name="test_ok" file="tests/test_a.py" line="1" time="0.000" /><testcase classname="tests.test_a" name="test_fail" file="tests/test_a.py" line="2" time="0.001"><failure message="AssertionError">tests/test_a.py:3: AssertionError</failure></testcase></testsuite></testsuites>"#;

    /// unittest-xml-reporting: a bare `<testsuite>` root, naive timestamps, CDATA.
    const XMLRUNNER: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<testsuite errors="0" failures="1" file="tests/test_foo.py" name="tests.test_foo.Foo-20240101120000" skipped="1" tests="3" time="0.004" timestamp="2024-01-01T12:00:00">
	<testcase classname="tests.test_foo.Foo" name="test_a" time="0.001" timestamp="2024-01-01T12:00:00" file="tests/test_foo.py" line="5"/>
	<testcase classname="tests.test_foo.Foo" name="test_b" time="0.002" timestamp="2024-01-01T12:00:00" file="tests/test_foo.py" line="8">
		<failure type="AssertionError"><![CDATA[Traceback (most recent call last):
  File "tests/test_foo.py", line 9, in test_b
AssertionError: 1 != 2
]]></failure>
	</testcase>
	<testcase classname="tests.test_foo.Foo" name="test_c" time="0.000" timestamp="2024-01-01T12:00:00">
		<skipped type="skip" message="later"/>
	</testcase>
	<system-out><![CDATA[]]></system-out>
</testsuite>
"#;

    #[test]
    fn reads_pytest() {
        let cases = read_cases(PYTEST).unwrap_or_default();
        assert_eq!(cases.len(), 6);
        let names: Vec<&str> = cases.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "test_ok",
                "test_fail",
                "test_skip",
                "test_m",
                "test_err",
                "test_b"
            ]
        );
        assert_eq!(cases[0].outcome, UnitOutcome::Passed);
        assert!(!cases[0].skipped);
        assert!(cases[0].message.is_empty());
        assert_eq!(cases[0].file, None);
        assert_eq!(cases[1].outcome, UnitOutcome::Failed);
        assert_eq!(
            cases[1].message,
            "AssertionError: arithmetic is broken\nassert (1 + 1) == 3"
        );
        assert_eq!(cases[1].duration_ms, 1);
        assert_eq!(cases[2].outcome, UnitOutcome::Passed);
        assert!(cases[2].skipped);
        assert_eq!(cases[2].message, "not here");
        assert_eq!(cases[3].classname, "tests.test_a.TestX");
        assert_eq!(cases[3].duration_ms, 1250);
        assert_eq!(cases[4].message, "ValueError: boom <&>");
        assert_eq!(
            cases[5].outcome,
            UnitOutcome::Failed,
            "an error is a failure"
        );
        let domain = cases[1].to_case();
        assert_eq!(domain.classname, "tests.test_a");
        assert_eq!(domain.outcome, UnitOutcome::Failed);
    }

    #[test]
    fn reads_file_attributes() {
        let cases = read_cases(PYTEST_XUNIT1).unwrap_or_default();
        assert_eq!(cases.len(), 2);
        assert!(
            cases
                .iter()
                .all(|c| c.file.as_deref() == Some("tests/test_a.py"))
        );
    }

    #[test]
    fn reads_a_bare_testsuite() {
        let cases = read_cases(XMLRUNNER).unwrap_or_default();
        assert_eq!(cases.len(), 3);
        assert_eq!(cases[1].outcome, UnitOutcome::Failed);
        assert_eq!(cases[1].message, "Traceback (most recent call last):");
        assert_eq!(cases[1].duration_ms, 2);
        assert!(cases[2].skipped);
        // The suite's file attribute stands for cases without their own.
        assert_eq!(cases[2].file.as_deref(), Some("tests/test_foo.py"));
    }

    #[test]
    fn reads_nested_suites_and_empty_reports() {
        let nested = r#"<testsuites><testsuite name="a"><testsuite name="b"><testcase name="x" classname="k" time="abc"/></testsuite></testsuite></testsuites>"#;
        let cases = read_cases(nested).unwrap_or_default();
        assert_eq!(cases.len(), 1);
        assert_eq!(cases[0].duration_ms, 0, "an unreadable time is 0");
        assert_eq!(read_cases("<testsuites/>"), Ok(vec![]));
        assert_eq!(read_cases(r#"<testsuite name="x" tests="0"/>"#), Ok(vec![]));
    }

    #[test]
    fn garbage_is_an_error_never_a_panic() {
        for bad in [
            "",
            "not xml at all",
            "<testsuites><testcase name=\"x\">",
            "<html><body>oops</body></html>",
            "<?xml version=\"1.0\"?><!DOCTYPE x [<!ENTITY a \"aaaa\">]><testsuites>&a;</testsuites>",
            "\u{0}\u{1}<<>>",
            "<testsuites><testcase name=\"x\" time=\"1e400\"></testsuites>",
        ] {
            assert!(read_cases(bad).is_err(), "{bad:?}");
        }
        let huge = r#"<testsuite><testcase name="x" time="1e300"/><testcase name="y" time="-3"/><testcase name="z" time="NaN"/></testsuite>"#;
        let cases = read_cases(huge).unwrap_or_default();
        assert_eq!(cases[0].duration_ms, u64::MAX);
        assert_eq!(cases[1].duration_ms, 0);
        assert_eq!(cases[2].duration_ms, 0);
    }

    #[test]
    fn long_messages_are_shortened() {
        let long = "é".repeat(2000);
        let xml = format!(
            r#"<testsuite><testcase name="x"><failure message="{long}"/></testcase></testsuite>"#
        );
        let cases = read_cases(&xml).unwrap_or_default();
        assert!(cases[0].message.len() <= MAX_MESSAGE);
        assert!(cases[0].message.ends_with('…'));
    }
}

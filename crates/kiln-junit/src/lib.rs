//! Reading the JUnit XML a split step's batch wrote: every `<testcase>` with its outcome.
//!
//! Test runners disagree on the details, so this reads what they have in common: a
//! `<testsuites>` root (pytest, nextest, Maven) or a bare `<testsuite>` root
//! (unittest-xml-reporting, Ant), suites possibly nested, `<testcase>` elements with `name`,
//! `classname`, `time` (seconds) and sometimes `file`, and a `<failure>`, `<error>` or
//! `<skipped>` child. It uses `roxmltree` rather than `quick-junit`'s deserializer, which wants a
//! `<testsuites>` root and RFC 3339 timestamps (unittest-xml-reporting writes neither).

use kiln_domain::split::{TestCase, UnitOutcome};

/// Most bytes kept of each text of one case (message, body, `system-out`, `system-err`); a
/// longer text is cut and ends with a line saying so.
pub const MAX_TEXT: usize = 64 << 10;

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
    /// The `message` attribute of the failure (or skip) exactly as written; empty when it
    /// passed or had none.
    pub message: String,
    /// The text of the failure (or skip) element exactly as written (the traceback).
    pub body: String,
    /// The case's `<system-out>`.
    pub system_out: String,
    /// The case's `<system-err>`.
    pub system_err: String,
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
            body: self.body.clone(),
            system_out: self.system_out.clone(),
            system_err: self.system_err.clone(),
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
    let mut failure = None;
    let mut skip = None;
    let (mut system_out, mut system_err) = (String::new(), String::new());
    for child in node.children().filter(|c| c.is_element()) {
        match child.tag_name().name() {
            "failure" | "error" => {
                outcome = UnitOutcome::Failed;
                failure.get_or_insert(child);
            }
            "skipped" => {
                skipped = true;
                skip.get_or_insert(child);
            }
            "system-out" => system_out.push_str(&text_of(child)),
            "system-err" => system_err.push_str(&text_of(child)),
            _ => {}
        }
    }
    // A failed case is not a skipped one, whatever else it says.
    if outcome == UnitOutcome::Failed {
        skipped = false;
    }
    let detail = if outcome == UnitOutcome::Failed {
        failure
    } else if skipped {
        skip
    } else {
        None
    };
    let (message, body) = detail.map_or_else(Default::default, |d| {
        (
            d.attribute("message").unwrap_or_default().to_string(),
            text_of(d),
        )
    });
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
        message: cap(message, MAX_TEXT),
        body: cap(body, MAX_TEXT),
        system_out: cap(system_out, MAX_TEXT),
        system_err: cap(system_err, MAX_TEXT),
    }
}

/// The text of an element (CDATA included) exactly as written.
fn text_of(node: roxmltree::Node<'_, '_>) -> String {
    node.children()
        .filter(|n| n.is_text())
        .filter_map(|n| n.text())
        .collect()
}

/// `s` kept whole when it has at most `max` bytes, else cut at a character boundary and ended
/// with a line saying how much was cut (the whole text stays in the job's log when the test
/// runner printed it there).
pub fn cap(mut s: String, max: usize) -> String {
    if s.len() <= max {
        return s;
    }
    let total = s.len();
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.truncate(end);
    s.push_str(&format!("\n[kiln: cut here, {end} of {total} bytes kept]"));
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
        assert_eq!(
            cases[1].body,
            ">   def test_fail(): assert 1 + 1 == 3, 'arithmetic is broken'\nE   AssertionError: arithmetic is broken\n\ntests/test_a.py:3: AssertionError"
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
        assert_eq!(cases[1].message, "", "no message attribute");
        assert_eq!(
            cases[1].body,
            "Traceback (most recent call last):\n  File \"tests/test_foo.py\", line 9, in test_b\nAssertionError: 1 != 2\n",
            "the CDATA body as written"
        );
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
    fn long_texts_are_cut_and_say_so() {
        let long = "é".repeat(MAX_TEXT);
        let xml = format!(
            r#"<testsuite><testcase name="x"><failure message="{long}">{long}</failure><system-out>short</system-out></testcase></testsuite>"#
        );
        let cases = read_cases(&xml).unwrap_or_default();
        for text in [&cases[0].message, &cases[0].body] {
            assert!(text.len() < MAX_TEXT + 100, "{}", text.len());
            assert!(
                text.ends_with(&format!(
                    "[kiln: cut here, {MAX_TEXT} of {} bytes kept]",
                    2 * MAX_TEXT
                )),
                "{}",
                &text[text.len() - 60..]
            );
        }
        assert_eq!(cases[0].system_out, "short");
    }
}

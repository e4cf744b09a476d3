#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::time::Duration;

use super::*;

const FULL: &str = r#"# kiln pipeline
version: 1
env:
  LANG: C.UTF-8
  SHARED: top
labels:
  os: linux
  arch: x86_64
timeout: 30m
steps:
  - name: lint
    run: ruff check .
  - name: test.unit_1
    run:
      - pip install -r requirements.txt
      - python3 -m unittest
    env:
      SHARED: step
      PYTHONPATH: src
    timeout: 1h 30m
    labels:
      arch: arm64
      gpu: "yes"
  - name: build-docs
    run: |
      make docs
      echo done
"#;

fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn paths(list: &[&str]) -> Vec<String> {
    list.iter().map(|p| (*p).to_owned()).collect()
}

/// Parses `text`, expects an error, and returns (line, column, message).
fn error_at(text: &str) -> (usize, usize, String) {
    let err = parse(FILE_NAME, text).expect_err("expected an error");
    let (Some(line), Some(column)) = (err.line(), err.column()) else {
        panic!("error without location: {err}");
    };
    let message = match &err {
        PipelineError::Invalid { message, .. } => message.clone(),
        other => panic!("unexpected error kind: {other:?}"),
    };
    let display = err.to_string();
    assert_eq!(display, format!("{FILE_NAME}:{line}:{column}: {message}"));
    (line, column, message)
}

/// Asserts that `text` fails at `line`:`column` with a message containing `needle`.
#[track_caller]
fn assert_error(text: &str, line: usize, column: usize, needle: &str) {
    let (l, c, message) = error_at(text);
    assert_eq!(
        (l, c),
        (line, column),
        "wrong location for {text:?}: {message}"
    );
    assert!(
        message.contains(needle),
        "message {message:?} lacks {needle:?}"
    );
}

// ---------------------------------------------------------------------------
// Valid files

#[test]
fn full_valid_file() {
    let pipeline = parse(FILE_NAME, FULL).unwrap();
    assert_eq!(pipeline.source, Source::File);
    let expected = vec![
        Step {
            name: "lint".into(),
            run: "ruff check .".into(),
            env: map(&[("LANG", "C.UTF-8"), ("SHARED", "top")]),
            timeout: Some(Duration::from_secs(30 * 60)),
            labels: map(&[("os", "linux"), ("arch", "x86_64")]),
            post: None,
        },
        Step {
            name: "test.unit_1".into(),
            run: "pip install -r requirements.txt\npython3 -m unittest".into(),
            env: map(&[
                ("LANG", "C.UTF-8"),
                ("SHARED", "step"),
                ("PYTHONPATH", "src"),
            ]),
            timeout: Some(Duration::from_secs(90 * 60)),
            labels: map(&[("os", "linux"), ("arch", "arm64"), ("gpu", "yes")]),
            post: None,
        },
        Step {
            name: "build-docs".into(),
            run: "make docs\necho done\n".into(),
            env: map(&[("LANG", "C.UTF-8"), ("SHARED", "top")]),
            timeout: Some(Duration::from_secs(30 * 60)),
            labels: map(&[("os", "linux"), ("arch", "x86_64")]),
            post: None,
        },
    ];
    assert_eq!(pipeline.steps, expected);
}

#[test]
fn minimal_file_has_no_defaults() {
    let pipeline = parse(FILE_NAME, "steps:\n  - name: t\n    run: make\n").unwrap();
    assert_eq!(
        pipeline,
        Pipeline {
            steps: vec![Step {
                name: "t".into(),
                run: "make".into(),
                env: BTreeMap::new(),
                timeout: None,
                labels: BTreeMap::new(),
                post: None,
            }],
            source: Source::File,
        }
    );
}

#[test]
fn flow_style_and_empty_maps_are_accepted() {
    let pipeline = parse(
        FILE_NAME,
        "{version: 1, env: , labels: ~, steps: [{name: a, run: x, env: {}, labels: {}}]}",
    )
    .unwrap();
    assert_eq!(pipeline.steps.len(), 1);
    assert!(pipeline.steps[0].env.is_empty());
    assert!(pipeline.steps[0].labels.is_empty());
}

#[test]
fn version_may_be_quoted() {
    assert!(parse(FILE_NAME, "version: '1'\nsteps: [{name: a, run: x}]\n").is_ok());
}

#[test]
fn step_timeout_overrides_default() {
    let text = "timeout: 10m\nsteps:\n  - {name: a, run: x, timeout: 45s}\n  - {name: b, run: y}\n";
    let pipeline = parse(FILE_NAME, text).unwrap();
    assert_eq!(pipeline.steps[0].timeout, Some(Duration::from_secs(45)));
    assert_eq!(pipeline.steps[1].timeout, Some(Duration::from_secs(600)));
}

#[test]
fn env_values_are_coerced_to_their_text() {
    let text = r#"
steps:
  - name: a
    run: x
    env:
      INT: 1
      NEG: -7
      FLOAT: 3.10
      EXP: 1e3
      HEX: 0x1F
      BOOL: true
      NO: false
      NULL_TILDE: ~
      NULL_WORD: null
      EMPTY:
      QUOTED_NULL: "null"
      QUOTED: '42'
      TEXT: hello world
      _UNDER_1: x
"#;
    let pipeline = parse(FILE_NAME, text).unwrap();
    assert_eq!(
        pipeline.steps[0].env,
        map(&[
            ("INT", "1"),
            ("NEG", "-7"),
            ("FLOAT", "3.10"),
            ("EXP", "1e3"),
            ("HEX", "0x1F"),
            ("BOOL", "true"),
            ("NO", "false"),
            ("NULL_TILDE", ""),
            ("NULL_WORD", ""),
            ("EMPTY", ""),
            ("QUOTED_NULL", "null"),
            ("QUOTED", "42"),
            ("TEXT", "hello world"),
            ("_UNDER_1", "x"),
        ])
    );
}

#[test]
fn label_values_are_coerced_too() {
    let text = "labels: {cores: 8, gpu: true}\nsteps: [{name: a, run: x}]\n";
    let pipeline = parse(FILE_NAME, text).unwrap();
    assert_eq!(
        pipeline.steps[0].labels,
        map(&[("cores", "8"), ("gpu", "true")])
    );
}

#[test]
fn run_as_list() {
    let text = "steps:\n  - name: a\n    run:\n      - echo one\n      - 'true'\n      - 42\n      - true\n";
    let pipeline = parse(FILE_NAME, text).unwrap();
    assert_eq!(pipeline.steps[0].run, "echo one\ntrue\n42\ntrue");

    let flow = parse(FILE_NAME, "steps: [{name: a, run: [make, make test]}]").unwrap();
    assert_eq!(flow.steps[0].run, "make\nmake test");
}

#[test]
fn run_keeps_block_scalar_text() {
    let text = "steps:\n  - name: a\n    run: >-\n      cargo test\n      --all\n";
    let pipeline = parse(FILE_NAME, text).unwrap();
    assert_eq!(pipeline.steps[0].run, "cargo test --all");
}

#[test]
fn name_limits() {
    let ok = "a".repeat(64);
    let text = format!("steps: [{{name: {ok}, run: x}}]");
    assert_eq!(parse(FILE_NAME, &text).unwrap().steps[0].name, ok);
    let text = "steps: [{name: 123, run: x}]";
    assert_eq!(parse(FILE_NAME, text).unwrap().steps[0].name, "123");
}

#[test]
fn pipeline_serde_round_trip() {
    let pipeline = parse(FILE_NAME, FULL).unwrap();
    let text = serde_norway::to_string(&pipeline).unwrap();
    let back: Pipeline = serde_norway::from_str(&text).unwrap();
    assert_eq!(back, pipeline);
}

// ---------------------------------------------------------------------------
// Errors, with their exact location

#[test]
fn unknown_step_key() {
    let text = "steps:\n  - name: test\n    rn: x\n";
    let err = parse(FILE_NAME, text).unwrap_err();
    assert_eq!(err.line(), Some(3));
    assert_eq!(err.column(), Some(5));
    assert_eq!(
        err.to_string(),
        ".kiln.yml:3:5: unknown field `rn`, expected one of `name`, `run`, `env`, `timeout`, `labels`, `post`"
    );
}

#[test]
fn unknown_top_level_key() {
    assert_error(
        "steps: [{name: a, run: x}]\ndepends_on: [a]\n",
        2,
        1,
        "unknown field `depends_on`, expected one of `version`, `env`, `labels`, `timeout`, `steps`",
    );
}

#[test]
fn future_keys_are_rejected_today() {
    for key in ["depends_on", "matrix", "parallel", "units", "retry", "when"] {
        let text = format!("steps:\n  - name: a\n    run: x\n    {key}: 1\n");
        assert_error(&text, 4, 5, &format!("unknown field `{key}`"));
    }
}

#[test]
fn error_uses_the_given_file_name() {
    let err = parse("ci/pipeline.yml", "steps:\n  - name: a\n    rn: x\n").unwrap_err();
    assert!(
        err.to_string()
            .starts_with("ci/pipeline.yml:3:5: unknown field `rn`")
    );
    assert_eq!(err.file(), Some("ci/pipeline.yml"));
}

#[test]
fn duplicate_keys() {
    assert_error(
        "steps: [{name: a, run: x}]\nsteps: [{name: b, run: y}]\n",
        2,
        1,
        "duplicate field `steps`",
    );
    assert_error(
        "steps:\n  - name: a\n    run: x\n    run: y\n",
        4,
        5,
        "duplicate field `run`",
    );
}

#[test]
fn wrong_types() {
    assert_error("steps: 3\n", 1, 8, "invalid type: integer `3`");
    assert_error("steps:\n  - just-a-string\n", 2, 5, "invalid type: string");
    assert_error(
        "steps:\n  - name: a\n    run: true\n",
        3,
        10,
        "invalid type: boolean `true`",
    );
    assert_error(
        "steps:\n  - name: a\n    run: [a, [b]]\n",
        3,
        14,
        "invalid type: sequence",
    );
    assert_error(
        "steps:\n  - name: a\n    run: x\n    env: 5\n",
        4,
        10,
        "invalid type: integer `5`",
    );
    assert_error(
        "steps:\n  - name: a\n    run: x\n    env:\n      A: [1]\n",
        5,
        10,
        "invalid type: sequence, expected a string, number or bool",
    );
    assert_error(
        "labels:\n  os: {a: b}\nsteps: [{name: a, run: x}]\n",
        2,
        7,
        "invalid type: map",
    );
    assert_error(
        "steps:\n  - name: [a]\n    run: x\n",
        2,
        11,
        "invalid type: sequence, expected a step name",
    );
}

#[test]
fn missing_keys() {
    assert_error("env: {A: b}\n", 1, 1, "missing field `steps`");
    assert_error("steps:\n  - name: a\n", 2, 5, "missing field `run`");
    assert_error("steps:\n  - run: x\n", 2, 5, "missing field `name`");
}

#[test]
fn empty_steps() {
    assert_error("steps: []\n", 1, 8, "`steps` is empty");
    assert_error("steps:\n", 1, 7, "`steps` is empty");
    assert_error("env: {}\nsteps: ~\n", 2, 8, "`steps` is empty");
}

#[test]
fn duplicate_step_name_points_at_second_occurrence() {
    let text =
        "steps:\n  - name: a\n    run: x\n  - name: b\n    run: y\n  - run: z\n    name: a\n";
    let (line, column, message) = error_at(text);
    assert_eq!((line, column), (7, 11));
    assert_eq!(message, "duplicate step name `a`, already used by step 1");
}

#[test]
fn bad_step_names() {
    assert_error(
        "steps:\n  - name: a b\n    run: x\n",
        2,
        11,
        "invalid step name `a b`",
    );
    assert_error(
        "steps:\n  - name: ''\n    run: x\n",
        2,
        11,
        "invalid step name ``",
    );
    assert_error(
        "steps:\n  - name:\n    run: x\n",
        2,
        10,
        "invalid step name ``",
    );
    assert_error(
        "steps:\n  - name: héllo\n    run: x\n",
        2,
        11,
        "invalid step name",
    );
    let long = "a".repeat(65);
    assert_error(
        &format!("steps:\n  - name: {long}\n    run: x\n"),
        2,
        11,
        "expected 1 to 64 characters",
    );
}

#[test]
fn bad_env_keys() {
    assert_error(
        "steps:\n  - name: a\n    run: x\n    env:\n      OK: 1\n      1X: 2\n",
        6,
        7,
        "invalid environment variable name `1X`",
    );
    assert_error(
        "env:\n  A-B: 1\nsteps: [{name: a, run: x}]\n",
        2,
        3,
        "invalid environment variable name `A-B`",
    );
    assert_error(
        "env:\n  A: 1\n  A: 2\nsteps: [{name: a, run: x}]\n",
        3,
        3,
        "duplicate environment variable `A`",
    );
    assert_error(
        "labels: {'': x}\nsteps: [{name: a, run: x}]\n",
        1,
        10,
        "empty label name",
    );
    assert_error(
        "labels: {a: x, a: y}\nsteps: [{name: a, run: x}]\n",
        1,
        16,
        "duplicate label `a`",
    );
}

#[test]
fn bad_durations() {
    assert_error(
        "steps:\n  - name: a\n    run: x\n    timeout: 10\n",
        4,
        14,
        "invalid duration `10`",
    );
    assert_error(
        "steps:\n  - name: a\n    run: x\n    timeout: 10 parsecs\n",
        4,
        14,
        "invalid duration `10 parsecs`",
    );
    assert_error(
        "timeout: soon\nsteps: [{name: a, run: x}]\n",
        1,
        10,
        "invalid duration `soon`",
    );
    assert_error(
        "timeout:\nsteps: [{name: a, run: x}]\n",
        1,
        9,
        "`timeout` is empty",
    );
    assert_error(
        "timeout: 99999999999999999999999h\nsteps: [{name: a, run: x}]\n",
        1,
        10,
        "invalid duration",
    );
}

#[test]
fn zero_timeout() {
    assert_error(
        "steps:\n  - name: a\n    run: x\n    timeout: 0s\n",
        4,
        14,
        "must be greater than zero",
    );
    assert_error(
        "timeout: 0\nsteps: [{name: a, run: x}]\n",
        1,
        10,
        "must be greater than zero",
    );
}

#[test]
fn empty_run() {
    assert_error(
        "steps:\n  - name: a\n    run: ''\n",
        3,
        10,
        "`run` is empty",
    );
    assert_error(
        "steps:\n  - name: a\n    run: '  '\n",
        3,
        10,
        "`run` is empty",
    );
    assert_error("steps:\n  - name: a\n    run:\n", 3, 9, "`run` is empty");
    assert_error(
        "steps:\n  - name: a\n    run: []\n",
        3,
        10,
        "`run` is empty",
    );
    assert_error(
        "steps:\n  - name: a\n    run:\n      - ''\n      -\n",
        4,
        7,
        "`run` is empty",
    );
}

#[test]
fn bad_version() {
    assert_error(
        "version: 2\nsteps: [{name: a, run: x}]\n",
        1,
        10,
        "unsupported `version` `2`",
    );
    assert_error(
        "steps: [{name: a, run: x}]\nversion: 1.0\n",
        2,
        10,
        "unsupported `version` `1.0`",
    );
}

#[test]
fn top_level_not_a_mapping() {
    assert_error("- a\n- b\n", 1, 1, "expected a mapping at the top level");
    assert_error("hello\n", 1, 1, "expected a mapping at the top level");
    assert_error("\n\n42\n", 3, 1, "expected a mapping at the top level");
    assert_error("~\n", 1, 1, "the file holds no pipeline");
    assert_error("# only a comment\n", 2, 1, "the file holds no pipeline");
}

#[test]
fn yaml_syntax_errors() {
    assert_error("steps: [\n", 2, 1, "did not find expected node content");
    // The syntax error is reported, not the "missing" `run` it causes.
    assert_error(
        "steps:\n  - name: a\n   run: x\n",
        3,
        4,
        "did not find expected '-' indicator",
    );
    assert_error("steps: *nope\n", 1, 8, "unknown anchor");
}

#[test]
fn empty_file() {
    for text in ["", "   ", "\n\n\t \n"] {
        let err = parse(FILE_NAME, text).unwrap_err();
        assert!(matches!(err, PipelineError::Empty { .. }), "{err:?}");
        assert_eq!(err.line(), None);
        assert!(err.to_string().starts_with(".kiln.yml: the file is empty"));
    }
}

#[test]
fn file_too_large() {
    let mut text = String::from("steps: [{name: a, run: x}]\n");
    text.push_str(&"#".repeat(MAX_FILE_SIZE + 1 - text.len()));
    let err = parse(FILE_NAME, &text).unwrap_err();
    assert!(matches!(err, PipelineError::TooLarge { size, .. } if size == MAX_FILE_SIZE + 1));
    assert!(err.to_string().contains("1 MiB"), "{err}");
    text.pop();
    assert!(parse(FILE_NAME, &text).is_ok());
}

#[test]
fn more_than_one_document() {
    let err = parse(FILE_NAME, "steps: [{name: a, run: x}]\n---\nsteps: []\n").unwrap_err();
    assert!(err.to_string().starts_with(".kiln.yml: "), "{err}");
    assert!(err.to_string().contains("more than one document"), "{err}");
}

#[test]
fn hostile_yaml_does_not_hang_or_panic() {
    // Deeply nested flow collections would take the parser minutes
    // (quadratic time); they are rejected up front, at the point where the
    // nesting gets too expensive.
    for unit in ["[", "[{", "{a: ", "[ \"]\", ", "[ '}', ", "[ !t] "] {
        let text = format!("steps: {}", unit.repeat(MAX_FILE_SIZE / unit.len() - 8));
        let (line, _, message) = error_at(&text);
        assert_eq!(line, 1);
        assert!(message.contains("flow collections"), "{message}");
    }
    // Deep block nesting.
    let deep = format!("steps:\n  {}x\n", "- ".repeat(10_000));
    assert!(parse(FILE_NAME, &deep).is_err());
    // Alias expansion ("billion laughs"): aliases are only followed where
    // the schema allows a list of scalars.
    let mut bomb = String::from("steps:\n  - name: a\n    run: &a [x, x, x, x, x, x, x, x]\n");
    for i in 1..10u8 {
        let prev = (b'a' + i - 1) as char;
        let this = (b'a' + i) as char;
        bomb.push_str(&format!(
            "  - name: {this}\n    run: &{this} [*{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}]\n"
        ));
    }
    let (line, _, message) = error_at(&bomb);
    // An error inside an alias points at the anchored node.
    assert_eq!(line, 3, "{message}");
    assert!(message.contains("invalid type: sequence"), "{message}");
    // A long name is quoted back shortened.
    let long = "x y".repeat(10_000);
    let err = parse(FILE_NAME, &format!("steps: [{{name: '{long}', run: x}}]")).unwrap_err();
    assert!(err.to_string().len() < 400, "{err}");
}

/// Truncations and byte mutations of a valid file never panic, and every
/// error names the file.
#[test]
fn mutated_inputs_never_panic() {
    let base = FULL.as_bytes();
    let mut checked = 0;
    let mut check = |bytes: &[u8]| {
        let Ok(text) = std::str::from_utf8(bytes) else {
            return;
        };
        checked += 1;
        match parse(FILE_NAME, text) {
            Ok(pipeline) => assert!(!pipeline.steps.is_empty()),
            Err(err) => {
                let display = err.to_string();
                assert!(display.starts_with(FILE_NAME), "{display}");
                if let Some(line) = err.line() {
                    assert!(line >= 1 && err.column().is_some_and(|c| c >= 1));
                }
            }
        }
    };

    // Every truncation.
    for end in 0..=base.len() {
        check(&base[..end]);
    }
    // Every suffix starting at a line start.
    for (start, _) in base.iter().enumerate().filter(|(_, b)| **b == b'\n') {
        check(&base[start + 1..]);
    }
    // Pseudo-random byte replacements, deterministic (xorshift).
    const SPECIAL: &[u8] = b":-[]{}\"'&*!#|>%@`, \t\n\r\0x0~";
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for _ in 0..600 {
        let mut bytes = base.to_vec();
        let edits = 1 + next() % 3;
        for _ in 0..edits {
            let at = (next() % bytes.len() as u64) as usize;
            let byte = SPECIAL[(next() % SPECIAL.len() as u64) as usize];
            match next() % 3 {
                0 => bytes[at] = byte,
                1 => bytes.insert(at, byte),
                _ => {
                    bytes.remove(at);
                }
            }
        }
        check(&bytes);
    }
    // Lines swapped and duplicated.
    let lines: Vec<&str> = FULL.lines().collect();
    for i in 0..lines.len() {
        let mut swapped = lines.clone();
        swapped.swap(i, (i + 1) % lines.len());
        check(swapped.join("\n").as_bytes());
        let mut doubled = lines.clone();
        doubled.insert(i, lines[i]);
        check(doubled.join("\n").as_bytes());
    }
    assert!(checked > 1000, "only {checked} inputs checked");
}

// ---------------------------------------------------------------------------
// Detection

#[test]
fn detects_python_unittest() {
    let pipeline = detect(&paths(&["README.md", "src/app.py", "tests/test_app.py"])).unwrap();
    assert_eq!(pipeline.source, Source::DetectedPythonUnittest);
    assert_eq!(pipeline.steps.len(), 1);
    let step = &pipeline.steps[0];
    assert_eq!(step.name, "unittest");
    assert_eq!(step.run, "python3 -m unittest discover -s tests");
    assert!(step.env.is_empty() && step.labels.is_empty() && step.timeout.is_none());
}

#[test]
fn python_wins_over_cargo() {
    let pipeline = detect(&paths(&["Cargo.toml", "tests/test.py"])).unwrap();
    assert_eq!(pipeline.source, Source::DetectedPythonUnittest);
}

#[test]
fn detects_cargo() {
    let pipeline = detect(&paths(&["Cargo.toml", "src/main.rs", "tests/it.rs"])).unwrap();
    assert_eq!(pipeline.source, Source::DetectedCargo);
    assert_eq!(pipeline.steps.len(), 1);
    assert_eq!(pipeline.steps[0].name, "cargo-test");
    assert_eq!(pipeline.steps[0].run, "cargo test");
}

#[test]
fn leading_dot_slash_is_ignored() {
    let pipeline = detect(&paths(&["./Cargo.toml"])).unwrap();
    assert_eq!(pipeline.source, Source::DetectedCargo);
    let pipeline = detect(&paths(&["./tests/test_x.py"])).unwrap();
    assert_eq!(pipeline.source, Source::DetectedPythonUnittest);
}

#[test]
fn near_misses_are_not_detected() {
    let near = paths(&[
        "tests/helper.py",
        "tests/test_x.pyc",
        "tests/sub/test_x.py",
        "test/test_x.py",
        "other/tests/test_x.py",
        "crates/a/Cargo.toml",
        "cargo.toml",
        "tests/test",
    ]);
    let err = detect(&near).unwrap_err();
    assert!(matches!(err, PipelineError::NothingDetected));
    let text = err.to_string();
    assert!(text.contains(".kiln.yml"), "{text}");
    assert!(text.contains("tests/test*.py"), "{text}");
    assert!(text.contains("Cargo.toml"), "{text}");
    assert_eq!(err.line(), None);
    assert!(detect(&[]).is_err());
}

#[test]
fn resolve_prefers_the_file() {
    let tree = paths(&["Cargo.toml"]);
    let pipeline = resolve(Some("steps: [{name: a, run: x}]"), &tree).unwrap();
    assert_eq!(pipeline.source, Source::File);
    assert_eq!(resolve(None, &tree).unwrap().source, Source::DetectedCargo);
    // A broken file is an error, not a reason to fall back to detection.
    let err = resolve(Some("steps: []"), &tree).unwrap_err();
    assert_eq!((err.line(), err.column()), (Some(1), Some(8)));
    assert!(matches!(
        resolve(Some(""), &tree),
        Err(PipelineError::Empty { .. })
    ));
}

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
            split: None,
            junit: Vec::new(),
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
            split: None,
            junit: Vec::new(),
        },
        Step {
            name: "build-docs".into(),
            run: "make docs\necho done\n".into(),
            env: map(&[("LANG", "C.UTF-8"), ("SHARED", "top")]),
            timeout: Some(Duration::from_secs(30 * 60)),
            labels: map(&[("os", "linux"), ("arch", "x86_64")]),
            post: None,
            split: None,
            junit: Vec::new(),
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
                split: None,
                junit: Vec::new(),
            }],
            jobs: Vec::new(),
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
        ".kiln.yml:3:5: unknown field `rn`, expected one of `name`, `run`, `env`, `timeout`, `labels`, `post`, `parallel`, `units`, `retry`, `interaction`, `junit`"
    );
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
    // At the second document.
    assert!(err.to_string().starts_with(".kiln.yml:2:1: "), "{err}");
    assert!(err.to_string().contains("more than one document"), "{err}");
}

#[test]
fn hostile_yaml_does_not_hang_or_panic() {
    // Deeply nested flow collections: serde-saphyr's parser stops at 255
    // levels, its budget at 24 (`[ !t]` is a syntax error before that).
    for unit in ["[", "[{", "{a: ", "[ \"]\", ", "[ '}', ", "[ !t] "] {
        let text = format!("steps: {}", unit.repeat(MAX_FILE_SIZE / unit.len() - 8));
        let (line, _, message) = error_at(&text);
        assert_eq!(line, 1);
        assert!(message.contains("nested") || unit == "[ !t] ", "{message}");
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
    // The expansion stops at 100,000 values read through aliases.
    let (_, _, message) = error_at(&bomb);
    assert!(message.contains("aliases expand to more than"), "{message}");
    // An error inside an alias points at the anchored node.
    let alias = "steps:\n  - name: a\n    run: &a [x, [y]]\n  - name: b\n    run: *a\n";
    assert_error(alias, 3, 17, "invalid type: sequence");
    // A long name is quoted back shortened.
    let long = "x y".repeat(10_000);
    let err = parse(FILE_NAME, &format!("steps: [{{name: '{long}', run: x}}]")).unwrap_err();
    assert!(err.to_string().len() < 400, "{err}");
}

/// Truncations, suffixes and line swaps of a valid file (a `steps:` one and a
/// `jobs:` one) never panic, every error names the file, and every plan
/// lists a job after the jobs it needs.
#[test]
fn mutated_inputs_never_panic() {
    let jobs_sample = jobs_sample();
    assert_eq!(plan_of(&jobs_sample, "main").len(), 5);
    for sample in [FULL, jobs_sample.as_str()] {
        check_mutations(sample);
    }
}

/// Checks the plan of a pipeline for a few branches.
fn check_plans(pipeline: &Pipeline) {
    for branch in ["main", "release/1", ""] {
        match plan(pipeline, branch) {
            Ok(jobs) => {
                let mut seen = std::collections::HashSet::new();
                for job in &jobs {
                    assert!(!job.steps.is_empty());
                    assert!(job.needs.iter().all(|need| seen.contains(need.as_str())));
                    assert!(seen.insert(job.name.as_str()), "{}", job.name);
                }
            }
            Err(err) => assert!(err.to_string().starts_with(FILE_NAME), "{err}"),
        }
    }
}

/// Parses one mutated input (skipped when it is not UTF-8): no panic, every error names the
/// file and has a location, every plan is ordered. Whether it was checked.
fn check_input(bytes: &[u8]) -> bool {
    let Ok(text) = std::str::from_utf8(bytes) else {
        return false;
    };
    match parse(FILE_NAME, text) {
        Ok(pipeline) => {
            assert!(pipeline.steps.is_empty() != pipeline.jobs.is_empty());
            check_plans(&pipeline);
        }
        Err(err) => {
            let display = err.to_string();
            assert!(display.starts_with(FILE_NAME), "{display}");
            if let Some(line) = err.line() {
                assert!(line >= 1 && err.column().is_some_and(|c| c >= 1));
            }
        }
    }
    true
}

/// Bytes YAML gives a meaning to, which the random edits put in.
const SPECIAL: &[u8] = b":-[]{}\"'&*!#|>%@`, \t\n\r\0x0~";

/// One random edit of a file: where, which byte, and whether it replaces, inserts or removes.
fn edit() -> impl proptest::strategy::Strategy<Value = (proptest::sample::Index, usize, u8)> {
    (
        proptest::prelude::any::<proptest::sample::Index>(),
        0..SPECIAL.len(),
        0..3u8,
    )
}

/// `sample` with `edits` applied.
fn edited(sample: &str, edits: &[(proptest::sample::Index, usize, u8)]) -> Vec<u8> {
    let mut bytes = sample.as_bytes().to_vec();
    for (at, byte, kind) in edits {
        if bytes.is_empty() {
            break;
        }
        let at = at.index(bytes.len());
        match kind {
            0 => bytes[at] = SPECIAL[*byte],
            1 => bytes.insert(at, SPECIAL[*byte]),
            _ => {
                bytes.remove(at);
            }
        }
    }
    bytes
}

proptest::proptest! {
    #![proptest_config(proptest::test_runner::Config::with_cases(600))]

    /// Random byte edits (one to three) of every sample never panic and give located errors;
    /// proptest shrinks a failing one to its fewest edits.
    #[test]
    fn randomly_edited_inputs_never_panic(
        edits in proptest::collection::vec(edit(), 1..4),
    ) {
        for sample in mutation_samples() {
            check_input(&edited(&sample, &edits));
        }
    }
}

/// The valid files the mutation tests start from: a `steps:` file, a `jobs:` file, split
/// files.
fn mutation_samples() -> Vec<String> {
    vec![
        FULL.to_string(),
        jobs_sample(),
        format!("version: 1\nenv: {{LANG: C.UTF-8}}\ntimeout: 30m\n{SPLIT}"),
        SPLIT_JOBS.to_string(),
    ]
}

fn jobs_sample() -> String {
    format!(
        "{JOBS}  deploy:\n    depends_on: [test, lint]\n    when: {{branch: '**'}}\n    steps:\n      \
         - name: up\n        run: [./deploy.sh]\n      - {{name: down, run: cleanup, post: always}}\n"
    )
}

fn check_mutations(sample: &str) {
    let base = sample.as_bytes();
    let mut checked = 0;
    let mut check = |bytes: &[u8]| {
        if check_input(bytes) {
            checked += 1;
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
    // Lines swapped and duplicated.
    let lines: Vec<&str> = sample.lines().collect();
    for i in 0..lines.len() {
        let mut swapped = lines.clone();
        swapped.swap(i, (i + 1) % lines.len());
        check(swapped.join("\n").as_bytes());
        let mut doubled = lines.clone();
        doubled.insert(i, lines[i]);
        check(doubled.join("\n").as_bytes());
    }
    // Every truncation of an ASCII file is UTF-8, so each was checked.
    assert!(
        !sample.is_ascii() || checked > base.len(),
        "only {checked} inputs checked"
    );
}

// ---------------------------------------------------------------------------
// Detection

fn no_files() -> BTreeMap<String, String> {
    BTreeMap::new()
}

fn detected(p: &Pipeline) -> (Ecosystem, &str) {
    match &p.source {
        Source::Detected(d) => (d.ecosystem, d.why.as_str()),
        Source::File => panic!("not detected"),
    }
}

fn files(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn runs(p: &Pipeline) -> Vec<(&str, &str)> {
    p.steps
        .iter()
        .map(|s| (s.name.as_str(), s.run.as_str()))
        .collect()
}

#[test]
fn detects_bare_python_unittest() {
    let pipeline = detect(
        &paths(&["README.md", "src/app.py", "tests/test_app.py"]),
        &no_files(),
    )
    .unwrap();
    assert_eq!(detected(&pipeline).0, Ecosystem::PythonUnittest);
    assert_eq!(pipeline.steps.len(), 1);
    let step = &pipeline.steps[0];
    assert_eq!(step.name, "unittest");
    assert_eq!(step.run, "python3 -m unittest discover -s tests");
    assert!(step.env.is_empty() && step.labels.is_empty() && step.timeout.is_none());
}

/// A packaged Python project whose tests import it by name: installed in a venv with its test
/// extras and requirements, then pytest (the false red build of `unittest discover` on a bare
/// interpreter).
#[test]
fn detects_a_packaged_python_project_and_installs_it() {
    let tree = paths(&[
        "pyproject.toml",
        "requirements-dev.txt",
        "src/pkg/__init__.py",
        "tests/test_pkg.py",
    ]);
    let pyproject = "[project]\nname = \"pkg\"\n[project.optional-dependencies]\n\
                     test = [\"pytest>=7\", \"hypothesis\"]\ndocs = [\"sphinx\"]\n";
    assert_eq!(
        detect_wants(&tree),
        vec![
            "pyproject.toml".to_owned(),
            "requirements-dev.txt".to_owned()
        ]
    );
    let p = detect(
        &tree,
        &files(&[
            ("pyproject.toml", pyproject),
            ("requirements-dev.txt", "black\n"),
        ]),
    )
    .unwrap();
    let (eco, why) = detected(&p);
    assert_eq!(eco, Ecosystem::Python);
    assert!(
        why.contains("pyproject.toml") && why.contains("[test]"),
        "{why}"
    );
    assert!(why.contains("pytest among its test dependencies"), "{why}");
    let steps = runs(&p);
    assert_eq!(steps.len(), 2);
    assert_eq!(steps[0].0, "setup");
    assert!(
        steps[0].1.contains("python3 -m venv .kiln-venv"),
        "{}",
        steps[0].1
    );
    assert!(steps[0].1.contains("-e '.[test]'"), "{}", steps[0].1);
    assert!(
        steps[0].1.contains("-r requirements-dev.txt"),
        "{}",
        steps[0].1
    );
    assert!(
        !steps[0]
            .1
            .contains("pip install --disable-pip-version-check pytest")
    );
    assert_eq!(steps[1], ("test", ".kiln-venv/bin/python -m pytest"));
    assert!(
        p.source
            .describe()
            .starts_with("no .kiln.yml: detected a Python project")
    );

    // pytest configured but not a dependency: installed too. No extras: `-e .`.
    let p = detect(
        &paths(&["setup.py", "setup.cfg", "tests/test_a.py"]),
        &files(&[("setup.cfg", "[tool:pytest]\naddopts = -q\n")]),
    )
    .unwrap();
    let steps = runs(&p);
    assert!(
        steps[0]
            .1
            .contains("install --disable-pip-version-check -e .\n"),
        "{}",
        steps[0].1
    );
    assert!(
        steps[0]
            .1
            .ends_with("install --disable-pip-version-check pytest"),
        "{}",
        steps[0].1
    );
    assert_eq!(steps[1].1, ".kiln-venv/bin/python -m pytest");

    // No pytest anywhere: unittest, the package importable from the venv.
    let p = detect(&paths(&["setup.py", "tests/test_a.py"]), &no_files()).unwrap();
    assert_eq!(
        runs(&p)[1].1,
        ".kiln-venv/bin/python -m unittest discover -s tests"
    );
    assert!(detected(&p).1.contains("unittest"));

    // Requirements alone: no `pip install -e .`; `pytest-cov` is not pytest.
    let p = detect(
        &paths(&["requirements.txt", "test_x.py"]),
        &files(&[("requirements.txt", "pytest-cov\nrequests==2\n")]),
    )
    .unwrap();
    let setup = runs(&p)[0].1.to_owned();
    assert!(!setup.contains("-e ."), "{setup}");
    assert!(setup.contains("-r requirements.txt"), "{setup}");
    assert_eq!(runs(&p)[1].1, ".kiln-venv/bin/python -m unittest discover");
    // An unreadable pyproject.toml still installs the project.
    let p = detect(
        &paths(&["pyproject.toml"]),
        &files(&[("pyproject.toml", "not = [toml")]),
    )
    .unwrap();
    assert!(runs(&p)[0].1.contains("-e ."));
}

#[test]
fn detects_node_go_rust_and_make() {
    let p = detect(
        &paths(&["package.json", "package-lock.json"]),
        &files(&[("package.json", r#"{"scripts": {"test": "jest"}}"#)]),
    )
    .unwrap();
    assert_eq!(detected(&p).0, Ecosystem::Node);
    assert_eq!(runs(&p), vec![("install", "npm ci"), ("test", "npm test")]);
    let p = detect(
        &paths(&["package.json"]),
        &files(&[("package.json", r#"{"scripts": {"test": "mocha"}}"#)]),
    )
    .unwrap();
    assert_eq!(runs(&p)[0], ("install", "npm install"));
    // `npm init`'s placeholder is no test suite: the next rule (here, none) applies.
    let placeholder = r#"{"scripts": {"test": "echo \"Error: no test specified\" && exit 1"}}"#;
    let err = detect(
        &paths(&["package.json"]),
        &files(&[("package.json", placeholder)]),
    );
    assert!(matches!(err, Err(PipelineError::NothingDetected)));

    let p = detect(&paths(&["go.mod", "main.go"]), &no_files()).unwrap();
    assert_eq!(runs(&p), vec![("go-test", "go test ./...")]);

    let p = detect(
        &paths(&["Cargo.toml", "src/main.rs", "tests/it.rs"]),
        &no_files(),
    )
    .unwrap();
    assert_eq!(detected(&p).0, Ecosystem::Rust);
    assert_eq!(runs(&p), vec![("cargo-test", "cargo test")]);

    let make = "CC := cc\ntest := no\nall: build\n\ttest: not a rule\ncheck test: all\n\t./t\n";
    let p = detect(&paths(&["Makefile"]), &files(&[("Makefile", make)])).unwrap();
    assert_eq!(runs(&p), vec![("make-test", "make test")]);
    let no_rule = "test := x\nall:\n\ttest: y\n";
    assert!(detect(&paths(&["Makefile"]), &files(&[("Makefile", no_rule)])).is_err());
}

#[test]
fn python_packaging_wins_over_cargo_and_bare_files_lose_to_it() {
    let p = detect(&paths(&["Cargo.toml", "pyproject.toml"]), &no_files()).unwrap();
    assert_eq!(detected(&p).0, Ecosystem::Python);
    let p = detect(&paths(&["Cargo.toml", "tests/test.py"]), &no_files()).unwrap();
    assert_eq!(detected(&p).0, Ecosystem::Rust);
}

#[test]
fn leading_dot_slash_is_ignored() {
    let pipeline = detect(&paths(&["./Cargo.toml"]), &no_files()).unwrap();
    assert_eq!(detected(&pipeline).0, Ecosystem::Rust);
    let pipeline = detect(&paths(&["./tests/test_x.py"]), &no_files()).unwrap();
    assert_eq!(detected(&pipeline).0, Ecosystem::PythonUnittest);
}

#[test]
fn near_misses_are_not_detected_and_the_error_offers_a_start() {
    let near = paths(&[
        "tests/helper.py",
        "tests/test_x.pyc",
        "tests/sub/test_x.py",
        "test/test_x.py",
        "other/tests/test_x.py",
        "crates/a/Cargo.toml",
        "cargo.toml",
        "tests/test",
        "sub/requirements.txt",
    ]);
    let err = detect(&near, &no_files()).unwrap_err();
    assert!(matches!(err, PipelineError::NothingDetected));
    let text = err.to_string();
    assert!(text.contains(".kiln.yml"), "{text}");
    assert!(text.contains("tests/test*.py"), "{text}");
    assert!(text.contains("Cargo.toml"), "{text}");
    assert!(text.contains("pyproject.toml"), "{text}");
    assert!(text.ends_with(STARTER), "{text}");
    // The starter is a valid pipeline.
    parse(FILE_NAME, STARTER).unwrap();
    assert_eq!(err.line(), None);
    assert!(detect(&[], &no_files()).is_err());
}

#[test]
fn resolve_prefers_the_file() {
    let tree = paths(&["Cargo.toml"]);
    let pipeline = resolve(Some("steps: [{name: a, run: x}]"), &tree, &no_files()).unwrap();
    assert_eq!(pipeline.source, Source::File);
    let detected_one = resolve(None, &tree, &no_files()).unwrap();
    assert_eq!(detected(&detected_one).0, Ecosystem::Rust);
    // A broken file is an error, not a reason to fall back to detection.
    let err = resolve(Some("steps: []"), &tree, &no_files()).unwrap_err();
    assert_eq!((err.line(), err.column()), (Some(1), Some(8)));
    assert!(matches!(
        resolve(Some(""), &tree, &no_files()),
        Err(PipelineError::Empty { .. })
    ));
}

// ---------------------------------------------------------------------------
// Jobs

/// The example of the crate documentation.
const JOBS: &str = r#"env: {A: "1"}
jobs:
  build:
    steps:
      - {name: compile, run: make}
  test:
    depends_on: [build]
    matrix:
      python: ["3.11", "3.12"]
      os: [linux]
    env: {B: "2"}
    labels: {os: linux}
    timeout: 10m
    when: {branch: ["main", "release/*"]}
    steps:
      - {name: unit, run: "pytest --python $PYTHON"}
  lint:
    steps: [{name: clippy, run: cargo clippy}]
"#;

fn names(plan: &[JobPlan]) -> Vec<&str> {
    plan.iter().map(|job| job.name.as_str()).collect()
}

fn plan_of(text: &str, branch: &str) -> Vec<JobPlan> {
    plan(&parse(FILE_NAME, text).unwrap(), branch).unwrap()
}

fn step(name: &str, run: &str, env: &[(&str, &str)]) -> Step {
    Step {
        name: name.into(),
        run: run.into(),
        env: map(env),
        timeout: None,
        labels: BTreeMap::new(),
        post: None,
        split: None,
        junit: Vec::new(),
    }
}

#[test]
fn jobs_file_is_parsed_into_job_definitions() {
    let pipeline = parse(FILE_NAME, JOBS).unwrap();
    assert!(pipeline.steps.is_empty());
    assert_eq!(pipeline.source, Source::File);
    let test = Step {
        timeout: Some(Duration::from_secs(600)),
        labels: map(&[("os", "linux")]),
        ..step("unit", "pytest --python $PYTHON", &[("A", "1"), ("B", "2")])
    };
    assert_eq!(
        pipeline.jobs,
        vec![
            JobDef {
                name: "build".into(),
                steps: vec![step("compile", "make", &[("A", "1")])],
                depends_on: vec![],
                matrix: BTreeMap::new(),
                when: None,
            },
            JobDef {
                name: "test".into(),
                steps: vec![test],
                depends_on: vec!["build".into()],
                matrix: [
                    (
                        "python".to_owned(),
                        vec!["3.11".to_owned(), "3.12".to_owned()]
                    ),
                    ("os".to_owned(), vec!["linux".to_owned()]),
                ]
                .into_iter()
                .collect(),
                when: Some(When {
                    branch: vec!["main".into(), "release/*".into()],
                }),
            },
            JobDef {
                name: "lint".into(),
                steps: vec![step("clippy", "cargo clippy", &[("A", "1")])],
                depends_on: vec![],
                matrix: BTreeMap::new(),
                when: None,
            },
        ]
    );
}

#[test]
fn example_planned_for_main() {
    let plan = plan_of(JOBS, "main");
    assert_eq!(
        names(&plan),
        [
            "build",
            "test (os=linux, python=3.11)",
            "test (os=linux, python=3.12)",
            "lint"
        ]
    );
    assert_eq!(
        plan[0],
        JobPlan {
            name: "build".into(),
            steps: vec![step("compile", "make", &[("A", "1")])],
            labels: BTreeMap::new(),
            needs: vec![],
            shard: None,
        }
    );
    for (job, python) in plan[1..3].iter().zip(["3.11", "3.12"]) {
        assert_eq!(job.needs, ["build"]);
        assert_eq!(job.labels, map(&[("os", "linux")]));
        assert_eq!(
            job.steps,
            [Step {
                timeout: Some(Duration::from_secs(600)),
                labels: map(&[("os", "linux")]),
                ..step(
                    "unit",
                    "pytest --python $PYTHON",
                    &[("A", "1"), ("B", "2"), ("OS", "linux"), ("PYTHON", python)]
                )
            }]
        );
    }
    assert_eq!(plan[3].name, "lint");
    assert!(plan[3].needs.is_empty() && plan[3].labels.is_empty());
    // `release/*` matches one path segment only.
    assert_eq!(plan_of(JOBS, "release/2.0").len(), 4);
    assert_eq!(names(&plan_of(JOBS, "release/2.0/rc1")), ["build", "lint"]);
}

#[test]
fn example_planned_for_a_feature_branch() {
    assert_eq!(names(&plan_of(JOBS, "feature/x")), ["build", "lint"]);
    // No branch: jobs with a `when` are left out.
    assert_eq!(names(&plan_of(JOBS, "")), ["build", "lint"]);
}

#[test]
fn when_string_list_and_double_star() {
    let text = "jobs:
  a:
    when: {branch: main}
    steps: [{name: s, run: x}]
  b:
    when:
      branch:
        - 'release/**'
        - '*-hotfix'
    steps: [{name: s, run: x}]
  c:
    when: {branch: '**'}
    steps: [{name: s, run: x}]
";
    let pipeline = parse(FILE_NAME, text).unwrap();
    assert_eq!(
        pipeline.jobs[0].when,
        Some(When {
            branch: vec!["main".into()]
        })
    );
    let planned = |branch| {
        let plan = plan(&pipeline, branch).unwrap();
        names(&plan).join(" ")
    };
    assert_eq!(planned("main"), "a c");
    assert_eq!(planned("main2"), "c");
    assert_eq!(planned("release/1.0/rc1"), "b c");
    assert_eq!(planned("release"), "c");
    assert_eq!(planned("urgent-hotfix"), "b c");
    assert_eq!(planned("team/urgent-hotfix"), "c");
    assert_eq!(planned(""), "");
}

#[test]
fn matrix_names_order_and_env() {
    let text = "env: {PYTHON: file, KEEP: file}
jobs:
  t:
    matrix:
      python: ['3.10', 3.12]
      arch: [x86_64, arm64]
    env: {PYTHON: job}
    steps:
      - {name: a, run: x, env: {PYTHON: step, OWN: step}}
";
    let plan = plan_of(text, "main");
    assert_eq!(
        names(&plan),
        [
            "t (arch=x86_64, python=3.10)",
            "t (arch=x86_64, python=3.12)",
            "t (arch=arm64, python=3.10)",
            "t (arch=arm64, python=3.12)",
        ]
    );
    // The matrix variables win over every `env`.
    assert_eq!(
        plan[2].steps[0].env,
        map(&[
            ("ARCH", "arm64"),
            ("KEEP", "file"),
            ("OWN", "step"),
            ("PYTHON", "3.10")
        ])
    );
}

#[test]
fn job_defaults_sit_between_file_and_step() {
    let text = "env: {A: file, B: file, C: file}
labels: {os: linux, arch: x86_64}
timeout: 1h
jobs:
  j:
    env: {B: job, C: job}
    labels: {arch: arm64}
    timeout: 20m
    steps:
      - {name: a, run: x, env: {C: step}, timeout: 5m}
      - {name: b, run: y}
  k:
    steps: [{name: c, run: z}]
";
    let pipeline = parse(FILE_NAME, text).unwrap();
    let j = &pipeline.jobs[0];
    assert_eq!(
        j.steps[0].env,
        map(&[("A", "file"), ("B", "job"), ("C", "step")])
    );
    assert_eq!(
        j.steps[1].env,
        map(&[("A", "file"), ("B", "job"), ("C", "job")])
    );
    assert_eq!(j.steps[0].timeout, Some(Duration::from_secs(300)));
    assert_eq!(j.steps[1].timeout, Some(Duration::from_secs(1200)));
    assert_eq!(
        j.steps[1].labels,
        map(&[("os", "linux"), ("arch", "arm64")])
    );
    let k = &pipeline.jobs[1];
    assert_eq!(k.steps[0].timeout, Some(Duration::from_secs(3600)));
    assert_eq!(
        k.steps[0].labels,
        map(&[("os", "linux"), ("arch", "x86_64")])
    );
    let plan = plan(&pipeline, "").unwrap();
    assert_eq!(plan[0].labels, map(&[("os", "linux"), ("arch", "arm64")]));
}

#[test]
fn depending_on_a_matrix_job_needs_every_cell() {
    let text = "jobs:
  deploy:
    depends_on: [test, build]
    steps: [{name: d, run: x}]
  test:
    depends_on: build
    matrix: {v: [1, 2, 3]}
    steps: [{name: t, run: x}]
  build:
    steps: [{name: b, run: x}]
";
    let plan = plan_of(text, "main");
    // Topological, the first ready job in file order first.
    assert_eq!(
        names(&plan),
        ["build", "test (v=1)", "test (v=2)", "test (v=3)", "deploy"]
    );
    assert_eq!(plan[1].needs, ["build"]);
    assert_eq!(
        plan[4].needs,
        ["test (v=1)", "test (v=2)", "test (v=3)", "build"]
    );
}

#[test]
fn a_job_whose_dependency_is_left_out_is_left_out() {
    let text = "jobs:
  a:
    when: {branch: main}
    steps: [{name: s, run: x}]
  b:
    depends_on: [a]
    steps: [{name: s, run: x}]
  c:
    depends_on: [b]
    steps: [{name: s, run: x}]
  d:
    steps: [{name: s, run: x}]
";
    assert_eq!(names(&plan_of(text, "main")), ["a", "b", "c", "d"]);
    assert_eq!(names(&plan_of(text, "dev")), ["d"]);
    let text = "jobs:\n  a:\n    when: {branch: main}\n    steps: [{name: s, run: x}]\n";
    assert!(plan_of(text, "dev").is_empty());
}

#[test]
fn plan_of_a_steps_file_is_one_job() {
    let jobs = plan_of(FULL.replace("arm64", "x86_64").as_str(), "main");
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0].name, "pipeline");
    assert_eq!(
        jobs[0].labels,
        map(&[("os", "linux"), ("arch", "x86_64"), ("gpu", "yes")])
    );
    assert!(jobs[0].needs.is_empty());
    // The union of the steps' labels, when they agree.
    let text = "labels: {os: linux}\nsteps:\n  - {name: a, run: x}\n  - {name: b, run: y, labels: {gpu: 'yes'}}\n";
    assert_eq!(
        plan_of(text, "")[0].labels,
        map(&[("os", "linux"), ("gpu", "yes")])
    );
    let single = plan_of("steps: [{name: only, run: x}]", "");
    assert_eq!(single[0].name, "only");
    let detected = plan(
        &detect(&paths(&["Cargo.toml"]), &no_files()).unwrap(),
        "main",
    )
    .unwrap();
    assert_eq!(detected[0].name, "cargo-test");
    assert_eq!(detected[0].steps[0].run, "cargo test");
}

#[test]
fn conflicting_labels_name_both_steps() {
    // FULL: `lint` inherits arch=x86_64, `test.unit_1` asks for arm64.
    let err = plan(&parse(FILE_NAME, FULL).unwrap(), "main").unwrap_err();
    assert_eq!(err.line(), None);
    assert_eq!(
        err.to_string(),
        ".kiln.yml: job `pipeline`: steps `lint` and `test.unit_1` need different values \
         of the runner label `arch`: `x86_64` and `arm64`"
    );
    let text = "jobs:
  j:
    labels: {os: linux}
    matrix: {v: [1]}
    steps:
      - {name: a, run: x}
      - {name: b, run: x, labels: {os: mac}}
";
    let err = plan(&parse(FILE_NAME, text).unwrap(), "").unwrap_err();
    assert!(
        err.to_string()
            .contains("job `j (v=1)`: steps `a` and `b` need different values of the runner label `os`: `linux` and `mac`"),
        "{err}"
    );
}

#[test]
fn jobs_serde_round_trip() {
    let pipeline = parse(FILE_NAME, JOBS).unwrap();
    let text = serde_norway::to_string(&pipeline).unwrap();
    let back: Pipeline = serde_norway::from_str(&text).unwrap();
    assert_eq!(back, pipeline);
    // A `steps:` pipeline serializes as before, without `jobs`.
    let text = serde_norway::to_string(&parse(FILE_NAME, FULL).unwrap()).unwrap();
    assert!(!text.contains("jobs"), "{text}");
    let old = "steps:\n- name: a\n  run: x\n  env: {}\n  timeout: null\n  labels: {}\n  post: null\nsource: File\n";
    let back: Pipeline = serde_norway::from_str(old).unwrap();
    assert!(back.jobs.is_empty());
    assert_eq!(back.steps[0].name, "a");
}

// Errors of `jobs` files, with their exact location.

#[test]
fn unknown_dependency() {
    let text = "jobs:
  build:
    steps: [{name: s, run: x}]
  test:
    depends_on: [build, biuld]
    steps: [{name: s, run: x}]
";
    let (line, column, message) = error_at(text);
    assert_eq!((line, column), (5, 25), "{message}");
    assert_eq!(
        message,
        "unknown job `biuld` in `depends_on`; the jobs of the file are `build`, `test`"
    );
    // A single name, and a dependency defined further down is fine.
    assert!(parse(FILE_NAME, "jobs:\n  a: {depends_on: b, steps: [{name: s, run: x}]}\n  b: {steps: [{name: s, run: x}]}\n").is_ok());
}

#[test]
fn cycle_is_reported_at_the_dependency_closing_it() {
    let text = "jobs:
  a:
    depends_on: [c]
    steps: [{name: s, run: x}]
  b:
    depends_on: [a]
    steps: [{name: s, run: x}]
  c:
    depends_on:
      - d
      - b
    steps: [{name: s, run: x}]
  d:
    steps: [{name: s, run: x}]
";
    let (line, column, message) = error_at(text);
    // The first `depends_on` value in the file on the cycle: `c` in `a`.
    assert_eq!((line, column), (3, 18), "{message}");
    assert_eq!(
        message,
        "dependency cycle: `a` -> `c` -> `b` -> `a` (each job depends on the next)"
    );
}

#[test]
fn cycle_without_outline_is_still_an_error() {
    // A hand-made pipeline with a cycle: `plan` refuses it.
    let mut pipeline = parse(
        FILE_NAME,
        "jobs:\n  a: {steps: [{name: s, run: x}]}\n  b: {depends_on: [a], steps: [{name: s, run: x}]}\n",
    )
    .unwrap();
    pipeline.jobs[0].depends_on = vec!["b".into()];
    let err = plan(&pipeline, "main").unwrap_err();
    assert_eq!(err.line(), None);
    assert_eq!(
        err.to_string(),
        ".kiln.yml: dependency cycle: `a` -> `b` -> `a` (each job depends on the next)"
    );
    pipeline.jobs[0].depends_on = vec!["zz".into()];
    let err = plan(&pipeline, "main").unwrap_err();
    assert!(
        err.to_string().contains("job `a`: unknown job `zz`"),
        "{err}"
    );
    pipeline.steps = parse(FILE_NAME, FULL).unwrap().steps;
    assert!(plan(&pipeline, "main").is_err());
}

#[test]
fn bad_job_names_and_shapes() {
    // Step names may repeat across jobs.
    assert!(
        parse(
            FILE_NAME,
            "jobs:\n  a: {steps: [{name: s, run: x}]}\n  b: {steps: [{name: s, run: x}]}\n"
        )
        .is_ok()
    );
}

#[test]
fn bad_matrix() {
    let job = |matrix: &str| {
        format!("jobs:\n  a:\n    matrix: {matrix}\n    steps: [{{name: s, run: x}}]\n")
    };
    let axes: Vec<String> = (0..=MAX_MATRIX_AXES)
        .map(|i| format!("a{i}: [x]"))
        .collect();
    let (line, _, message) = error_at(&job(&format!("{{{}}}", axes.join(", "))));
    assert_eq!(line, 3);
    assert_eq!(message, "more than 16 matrix axes");
}

#[test]
fn too_many_matrix_cells_is_reported_at_the_key() {
    let values: Vec<String> = (0..17).map(|i| i.to_string()).collect();
    let list = values.join(", ");
    let text = format!(
        "jobs:\n  big:\n    steps: [{{name: s, run: x}}]\n    matrix:\n      a: [{list}]\n      b: [{list}]\n"
    );
    let (line, column, message) = error_at(&text);
    assert_eq!((line, column), (4, 5), "{message}");
    assert_eq!(
        message,
        "the matrix of job `big` has 289 cells (the product of the numbers of values of its \
         axes), more than the limit of 256"
    );
    // 16 × 16 = 256 is fine.
    let list: Vec<String> = (0..16).map(|i| i.to_string()).collect();
    let list = list.join(", ");
    let text = format!(
        "jobs:\n  big:\n    matrix: {{a: [{list}], b: [{list}]}}\n    steps: [{{name: s, run: x}}]\n"
    );
    assert_eq!(plan_of(&text, "").len(), 256);
}

#[test]
fn expansion_limits_are_reported_at_the_job() {
    // Four jobs of 256 cells: the fourth goes over MAX_JOBS.
    let list: Vec<String> = (0..16).map(|i| i.to_string()).collect();
    let list = list.join(", ");
    let mut text = String::from("jobs:\n");
    for name in ["a", "b", "c", "d"] {
        text.push_str(&format!(
            "  {name}:\n    matrix: {{x: [{list}], y: [{list}]}}\n    steps: [{{name: s, run: x}}]\n"
        ));
    }
    let (line, column, message) = error_at(&text);
    assert_eq!((line, column), (11, 3), "{message}");
    assert!(
        message.contains("with job `d`, the file has more than 1000 jobs"),
        "{message}"
    );
    // Two 256-cell jobs, one depending on the other: 65536 dependencies,
    // twice that is over MAX_NEEDS.
    let text = format!(
        "jobs:\n  a:\n    matrix: {{x: [{list}], y: [{list}]}}\n    steps: [{{name: s, run: x}}]\n  \
         b:\n    depends_on: [a]\n    matrix: {{x: [{list}], y: [{list}]}}\n    steps: [{{name: s, run: x}}]\n  \
         c:\n    depends_on: [a]\n    matrix: {{x: [{list}], y: [{list}]}}\n    steps: [{{name: s, run: x}}]\n"
    );
    let (line, column, message) = error_at(&text);
    assert_eq!((line, column), (9, 3), "{message}");
    assert!(
        message.contains("more than 100000 dependencies"),
        "{message}"
    );
    // Many steps in a matrix job.
    let steps: Vec<String> = (0..200)
        .map(|i| format!("      - {{name: s{i}, run: x}}"))
        .collect();
    let text = format!(
        "jobs:\n  a:\n    matrix: {{x: [{list}], y: [{list}]}}\n    steps:\n{}\n",
        steps.join("\n")
    );
    let (line, column, message) = error_at(&text);
    assert_eq!((line, column), (2, 3), "{message}");
    assert!(message.contains("more than 50000 steps"), "{message}");
}

#[test]
fn without_an_outline_graph_errors_are_caught_at_the_end_of_jobs() {
    // A key that is not a scalar, after `jobs`: the outline cannot be read,
    // and the pass reaches that key only after the end of `jobs`.
    let read = |text: &str| {
        let (line, column, message) = error_at(&format!("{text}? [k]\n: v\n"));
        (Some(line), Some(column), message)
    };
    let (line, column, message) =
        read("jobs:\n  a:\n    depends_on: [b]\n    steps: [{name: s, run: x}]\n");
    assert_eq!((line, column), (Some(2), Some(3)), "{message}");
    assert!(
        message.ends_with("job `a`: unknown job `b` in `depends_on`; the jobs of the file are `a`"),
        "{message}"
    );
    let (_, _, message) = read(
        "jobs:\n  a: {depends_on: b, steps: [{name: s, run: x}]}\n  b: {depends_on: a, steps: [{name: s, run: x}]}\n",
    );
    assert!(
        message.contains("dependency cycle: `a` -> `b` -> `a`"),
        "{message}"
    );
}

#[test]
fn hostile_jobs_files_are_refused_quickly() {
    // A long chain closed into a cycle: found in linear time, quoted short.
    let n = 3000;
    let mut text = String::from("jobs:\n");
    for i in 0..n {
        let next = (i + 1) % n;
        text.push_str(&format!(
            "  j{i}: {{depends_on: j{next}, steps: [{{name: s, run: x}}]}}\n"
        ));
    }
    let (line, column, message) = error_at(&text);
    assert_eq!((line, column), (2, 20));
    assert_eq!(
        message,
        "dependency cycle of 3000 jobs: `j0` -> `j1` -> `j2` -> `j3` -> `j4` -> `j5` -> `j6` \
         -> ... -> `j0` (each job depends on the next)"
    );
    // Without the cycle: too many jobs, at the first one over the limit.
    let text = text.replace("depends_on: j0,", "");
    assert_error(
        &text,
        1002,
        3,
        "with job `j1000`, the file has more than 1000 jobs",
    );
    // Huge lists where only a few values are allowed.
    let many: Vec<String> = (0..2_000).map(|i| format!("v{i}")).collect();
    let many = many.join(", ");
    let text =
        format!("jobs:\n  a:\n    steps: [{{name: s, run: x}}]\n    matrix: {{x: [{many}]}}\n");
    // At the `matrix` key, not at the job (whose budget it would also break).
    assert_error(&text, 4, 5, "the matrix of job `a` has 2000 cells");
    // Without an outline (a non-string key further down), at the 257th value.
    let broken = format!("{text}  ? [k]\n  : v\n");
    let (line, _, message) = error_at(&broken);
    assert_eq!(line, 4);
    assert_eq!(
        message,
        "matrix axis `x` has more than 256 values, the most cells a matrix may have"
    );
    let text = format!(
        "jobs:\n  a:\n    steps: [{{name: s, run: x}}]\n    depends_on: [{many}]\n  ? [k]\n  : v\n"
    );
    assert_error(&text, 5, 5, "invalid type: sequence, expected a job name");
}

// ---------------------------------------------------------------------------
// Split steps

/// The example of the README: a setup step, then a split step.
const SPLIT: &str = r#"steps:
  - name: setup
    run: pip install -r requirements.txt
  - name: tests
    run: python3 -m pytest -q --junitxml={junit} {units}
    parallel: 4
    units:
      glob: "tests/**/test_*.py"
    retry:
      attempts: 3
      max_failures: "10%"
      budget: "5%"
  - name: cleanup
    run: rm -rf .cache
    post: always
"#;

fn glob_units(patterns: &[&str]) -> UnitSource {
    UnitSource::Glob(patterns.iter().map(|p| (*p).to_owned()).collect())
}

/// The split of the only split step of a parsed `steps:` file.
fn split_of(text: &str) -> SplitDef {
    let pipeline = parse(FILE_NAME, text).unwrap();
    let mut splits = pipeline.steps.iter().filter_map(|s| s.split.clone());
    let split = splits.next().expect("no split step");
    assert!(splits.next().is_none());
    split
}

/// A `steps:` file with one step `t` with these extra lines (indented by 4).
fn split_step(lines: &str) -> String {
    format!("steps:\n  - name: t\n    run: x\n{lines}")
}

#[test]
fn split_step_is_parsed() {
    let pipeline = parse(FILE_NAME, SPLIT).unwrap();
    assert_eq!(pipeline.steps.len(), 3);
    assert_eq!(pipeline.steps[0].split, None);
    assert_eq!(pipeline.steps[2].split, None);
    assert_eq!(
        pipeline.steps[1].split,
        Some(SplitDef {
            shards: 4,
            units: glob_units(&["tests/**/test_*.py"]),
            strategy: Strategy::Dynamic,
            max_batch: 0,
            retry: RetryPolicy {
                attempts: 3,
                max_failures: Some(Threshold::Permille(100)),
                budget_permille: Some(50),
                budget_floor_ms: kiln_domain::split::DEFAULT_BUDGET_FLOOR_MS,
                shards: 0,
                interaction: Default::default(),
            },
        })
    );
    // The other fields of the step are as usual.
    assert_eq!(
        pipeline.steps[1].run,
        "python3 -m pytest -q --junitxml={junit} {units}"
    );
    let text = serde_norway::to_string(&pipeline).unwrap();
    let back: Pipeline = serde_norway::from_str(&text).unwrap();
    assert_eq!(back, pipeline);
}

#[test]
fn split_steps_file_is_planned_as_shards() {
    let plan = plan_of(SPLIT, "main");
    assert_eq!(
        names(&plan),
        [
            "pipeline [1/4]",
            "pipeline [2/4]",
            "pipeline [3/4]",
            "pipeline [4/4]"
        ]
    );
    let pipeline = parse(FILE_NAME, SPLIT).unwrap();
    for (k, job) in plan.iter().enumerate() {
        assert_eq!(
            job.shard,
            Some(Shard {
                index: k as u32,
                count: 4,
                key: "tests".into(),
            })
        );
        // Every shard runs every step, post steps included.
        assert_eq!(job.steps, pipeline.steps);
        assert!(job.needs.is_empty());
    }
    // A plan without a split step has no shard.
    assert_eq!(plan_of("steps: [{name: a, run: x}]", "")[0].shard, None);
}

#[test]
fn units_without_parallel_is_one_shard() {
    let text =
        "steps:\n  - name: tests\n    run: pytest {units}\n    units:\n      glob: 't/*.py'\n";
    let split = split_of(text);
    assert_eq!(split.shards, 1);
    assert_eq!(split.retry, RetryPolicy::default());
    let plan = plan_of(text, "");
    assert_eq!(names(&plan), ["tests"]);
    assert_eq!(
        plan[0].shard,
        Some(Shard {
            index: 0,
            count: 1,
            key: "tests".into(),
        })
    );
    // `parallel: 1` is the same.
    let one = text.replace("    units:", "    parallel: 1\n    units:");
    assert_eq!(plan_of(&one, ""), plan);
}

#[test]
fn units_forms() {
    // A list of globs, a strategy and a batch size.
    let split = split_of(&split_step(
        "    parallel: 2\n    units:\n      glob:\n        - 'tests/test_*.py'\n        - 'it/**/*_test.py'\n        - 'a/{b,c}/[xy]?.py'\n      strategy: timing\n      max_batch: 10\n",
    ));
    assert_eq!(
        split,
        SplitDef {
            shards: 2,
            units: glob_units(&["tests/test_*.py", "it/**/*_test.py", "a/{b,c}/[xy]?.py"]),
            strategy: Strategy::Timing,
            max_batch: 10,
            retry: RetryPolicy::default(),
        }
    );
    // A command, in flow style.
    let split = split_of(&split_step(
        "    parallel: 3\n    units: {command: \"cargo test -- --list --format terse | sed -n 's/: test$//p'\"}\n",
    ));
    assert_eq!(
        split.units,
        UnitSource::Command("cargo test -- --list --format terse | sed -n 's/: test$//p'".into())
    );
    assert_eq!(split.strategy, Strategy::Dynamic);
    // Every strategy.
    for strategy in [
        Strategy::Dynamic,
        Strategy::Hash,
        Strategy::Count,
        Strategy::Timing,
    ] {
        let split = split_of(&split_step(&format!(
            "    units:\n      command: ./list.sh\n      strategy: {}\n",
            strategy.as_str()
        )));
        assert_eq!(split.strategy, strategy);
    }
}

#[test]
fn retry_forms() {
    let retry = |lines: &str| {
        split_of(&split_step(&format!(
            "    parallel: 8\n    units: {{glob: '*.py'}}\n    retry:\n{lines}"
        )))
        .retry
    };
    assert_eq!(
        retry("      attempts: 1\n"),
        RetryPolicy {
            attempts: 1,
            ..RetryPolicy::default()
        }
    );
    assert_eq!(
        retry("      attempts: 10\n      max_failures: 0\n      budget: 0%\n      shards: 256\n"),
        RetryPolicy {
            attempts: 10,
            max_failures: Some(Threshold::Count(0)),
            budget_permille: Some(0),
            budget_floor_ms: kiln_domain::split::DEFAULT_BUDGET_FLOOR_MS,
            shards: 256,
            interaction: Default::default(),
        }
    );
    assert_eq!(
        retry(
            "      shards: 2\n      budget: '2.5%'\n      max_failures: 20%\n      attempts: 3\n"
        ),
        RetryPolicy {
            attempts: 3,
            max_failures: Some(Threshold::Permille(200)),
            budget_permille: Some(25),
            budget_floor_ms: kiln_domain::split::DEFAULT_BUDGET_FLOOR_MS,
            shards: 2,
            interaction: Default::default(),
        }
    );
    // A floor: the least time retries get, whatever the percentage gives.
    for (text, permille, floor) in [
        ("'5% or 1m'", 50, 60_000),
        ("\"2.5% or 90s\"", 25, 90_000),
        ("'10% or 1h 30m'", 100, 5_400_000),
        ("'0% or 500ms'", 0, 500),
    ] {
        let p = retry(&format!("      attempts: 2\n      budget: {text}\n"));
        assert_eq!(
            (p.budget_permille, p.budget_floor_ms),
            (Some(permille), floor),
            "{text}"
        );
    }
    assert_eq!(
        retry("      attempts: 2\n      max_failures: 100%\n      budget: 100.0%\n").max_failures,
        Some(Threshold::Permille(1000))
    );
    assert_eq!(
        retry("      attempts: 2\n      max_failures: '0.5%'\n").max_failures,
        Some(Threshold::Permille(5))
    );
    assert_eq!(
        retry("      attempts: 2\n      max_failures: 4000000000\n").max_failures,
        Some(Threshold::Count(4_000_000_000))
    );
}

/// A matrix job with a split step, and jobs depending on it.
const SPLIT_JOBS: &str = r#"jobs:
  build:
    steps:
      - {name: compile, run: make}
  test:
    depends_on: build
    matrix:
      python: ["3.11", "3.12"]
    steps:
      - name: setup
        run: pip install .
      - name: unit
        run: pytest {units}
        parallel: 3
        units: {glob: tests/test_*.py, strategy: hash}
  lint:
    steps:
      - name: ruff
        run: ruff {units}
        units: {command: git ls-files '*.py'}
  report:
    depends_on: [test, lint]
    steps: [{name: merge, run: ./merge.sh}]
"#;

#[test]
fn matrix_and_parallel_make_shards_of_every_cell() {
    let plan = plan_of(SPLIT_JOBS, "main");
    let cells = [
        "test (python=3.11) [1/3]",
        "test (python=3.11) [2/3]",
        "test (python=3.11) [3/3]",
        "test (python=3.12) [1/3]",
        "test (python=3.12) [2/3]",
        "test (python=3.12) [3/3]",
    ];
    let mut expected = vec!["build"];
    expected.extend(cells);
    expected.extend(["lint", "report"]);
    assert_eq!(names(&plan), expected);
    assert_eq!(plan[0].shard, None);
    for (job, python) in plan[1..7]
        .iter()
        .zip(["3.11", "3.11", "3.11", "3.12", "3.12", "3.12"])
    {
        assert_eq!(job.needs, ["build"]);
        assert_eq!(job.steps.len(), 2);
        assert_eq!(job.steps[1].env, map(&[("PYTHON", python)]));
        let shard = job.shard.as_ref().unwrap();
        assert_eq!(shard.count, 3);
        assert_eq!(shard.key, format!("test (python={python})/unit"));
        assert_eq!(
            job.steps[1].split.as_ref().unwrap().strategy,
            Strategy::Hash
        );
    }
    let indexes: Vec<u32> = plan[1..7]
        .iter()
        .map(|job| job.shard.as_ref().unwrap().index)
        .collect();
    assert_eq!(indexes, [0, 1, 2, 0, 1, 2]);
    // One shard: the name stays.
    assert_eq!(
        plan[7].shard,
        Some(Shard {
            index: 0,
            count: 1,
            key: "lint/ruff".into()
        })
    );
    // Depending on a split job is depending on every shard of it.
    let mut needs = cells.to_vec();
    needs.push("lint");
    assert_eq!(plan[8].needs, needs);
    assert_eq!(plan[8].shard, None);
    check_plans(&parse(FILE_NAME, SPLIT_JOBS).unwrap());
}

#[test]
fn shards_count_toward_the_expansion_limits() {
    // Four jobs of 256 shards: the fourth goes over MAX_JOBS.
    let mut text = String::from("jobs:\n");
    for name in ["a", "b", "c", "d"] {
        text.push_str(&format!(
            "  {name}:\n    steps:\n      - name: s\n        run: x\n        parallel: 256\n        units: {{glob: '*'}}\n"
        ));
    }
    let (line, column, message) = error_at(&text);
    assert_eq!((line, column), (20, 3), "{message}");
    assert!(
        message.contains("with job `d`, the file has more than 1000 jobs"),
        "{message}"
    );
    // Dependencies on every shard: 250 shards needing 250 shards (62500),
    // one job needing all 500 of them, then 100 shards needing them too.
    let text = "jobs:
  a: {steps: [{name: s, run: x, parallel: 250, units: {glob: '*'}}]}
  b: {depends_on: a, steps: [{name: s, run: x, parallel: 250, units: {glob: '*'}}]}
  c: {depends_on: [a, b], steps: [{name: s, run: x}]}
";
    let plan = plan_of(text, "");
    assert_eq!(plan.len(), 501);
    assert_eq!(plan[500].needs.len(), 500);
    // Steps: 200 steps in 256 shards (a `steps:` file).
    let steps: Vec<String> = (1..200)
        .map(|i| format!("  - {{name: s{i}, run: x}}"))
        .collect();
    let text = format!(
        "steps:\n  - {{name: s0, run: x, parallel: 256, units: {{glob: '*'}}}}\n{}\n",
        steps.join("\n")
    );
    let (_, _, message) = error_at(&text);
    assert!(
        message.contains(
            "with `parallel: 256` (step `s0`), the job's shards have more than 50000 steps"
        ),
        "{message}"
    );
    // The same steps in 250 shards are fine.
    let ok = text.replace("parallel: 256", "parallel: 250");
    assert_eq!(plan_of(&ok, "").len(), 250);
}

#[test]
fn plan_checks_hand_built_splits() {
    let split = SplitDef {
        shards: 2,
        units: glob_units(&["*"]),
        strategy: Strategy::Dynamic,
        max_batch: 0,
        retry: RetryPolicy::default(),
    };
    let with_split = |name: &str, split: &SplitDef| Step {
        split: Some(split.clone()),
        ..step(name, "x", &[])
    };
    let pipeline = |steps: Vec<Step>| Pipeline {
        steps,
        jobs: Vec::new(),
        source: Source::File,
    };
    let ok = pipeline(vec![with_split("a", &split)]);
    assert_eq!(names(&plan(&ok, "").unwrap()), ["a [1/2]", "a [2/2]"]);
    let two = pipeline(vec![with_split("a", &split), with_split("b", &split)]);
    let err = plan(&two, "").unwrap_err().to_string();
    assert!(err.contains("at most one split step"), "{err}");
    let zero = pipeline(vec![with_split(
        "a",
        &SplitDef {
            shards: 0,
            ..split.clone()
        },
    )]);
    let err = plan(&zero, "").unwrap_err().to_string();
    assert!(err.contains("0 shards"), "{err}");
    let post = pipeline(vec![
        step("a", "x", &[]),
        Step {
            post: Some(Post::Always),
            ..with_split("b", &split)
        },
    ]);
    let err = plan(&post, "").unwrap_err().to_string();
    assert!(err.contains("post step and a split step"), "{err}");
}

#[test]
fn interaction_policy() {
    let policy = |lines: &str| {
        split_of(&split_step(&format!("    units: {{glob: '*'}}\n{lines}")))
            .retry
            .interaction
    };
    use kiln_domain::split::InteractionPolicy;
    assert_eq!(policy(""), InteractionPolicy::Warn);
    assert_eq!(policy("    interaction: warn\n"), InteractionPolicy::Warn);
    assert_eq!(policy("    interaction: fail\n"), InteractionPolicy::Fail);
    // With `retry`, before or after it.
    let both = policy("    interaction: fail\n    retry: {attempts: 2}\n");
    assert_eq!(both, InteractionPolicy::Fail);
    assert_eq!(
        split_of(&split_step(
            "    units: {glob: '*'}\n    retry: {attempts: 2}\n    interaction: fail\n"
        ))
        .retry
        .attempts,
        2
    );
}

#[test]
fn one_split_step_per_job() {
    // Split steps in different jobs are fine.
    let text = "jobs:
  j:
    steps: [{name: a, run: x, parallel: 2, units: {command: ls}}]
  k:
    steps: [{name: a, run: x, parallel: 2, units: {command: ls}}]
";
    assert_eq!(
        names(&plan_of(text, "")),
        ["j [1/2]", "j [2/2]", "k [1/2]", "k [2/2]"]
    );
}

/// Mutations of a file with split steps never panic.
#[test]
fn mutated_split_files_never_panic() {
    check_mutations(&format!(
        "version: 1\nenv: {{LANG: C.UTF-8}}\ntimeout: 30m\n{SPLIT}"
    ));
    check_mutations(SPLIT_JOBS);
}

/// A `run` over [`crate::MAX_RUN_BYTES`] (900 KB here, which the kernel would refuse with
/// E2BIG when the step starts) is refused at its value, with the limit in the message (the list
/// form at the list); one at the limit is accepted.
#[test]
fn a_run_longer_than_the_limit_is_refused_where_it_is() {
    let big = "x".repeat(900_000);
    let text = format!("steps:\n  - name: a\n    run: echo ok\n  - name: b\n    run: echo {big}\n");
    assert_error(&text, 5, 10, "at most 65536 bytes");
    let line = "y".repeat(40_000);
    let text = format!(
        "steps:\n  - name: c\n    run:\n      - echo a\n      - echo {line}\n      - echo {line}\n"
    );
    assert_error(&text, 4, 7, "bytes long");
    let exact = "z".repeat(crate::MAX_RUN_BYTES - "echo ".len());
    let text = format!("steps:\n  - name: d\n    run: echo {exact}\n");
    let p = parse(FILE_NAME, &text).unwrap();
    assert_eq!(p.steps[0].run.len(), crate::MAX_RUN_BYTES);
}

#[test]
fn a_step_names_its_junit_reports_as_a_pattern_or_a_list() {
    let p = parse(
        FILE_NAME,
        "steps:\n  - name: test\n    run: pytest --junitxml=reports/a.xml\n    junit: reports/*.xml\n  - name: more\n    run: x\n    junit: [a.xml, 'out/**/*.xml']\n  - name: none\n    run: y\n",
    )
    .expect("valid");
    assert_eq!(p.steps[0].junit, vec!["reports/*.xml".to_owned()]);
    assert_eq!(
        p.steps[1].junit,
        vec!["a.xml".to_owned(), "out/**/*.xml".to_owned()]
    );
    assert!(p.steps[2].junit.is_empty());
}

#[test]
fn bad_junit_keys_are_refused_where_they_are_written() {
    let at = |step: &str, line: usize, column: usize, want: &str| {
        let text = format!("steps:\n  - name: a\n    run: x\n{step}");
        let (l, c, message) = error_at(&text);
        assert!(
            message.contains(want),
            "{text:?}: {message:?} does not contain {want:?}"
        );
        assert_eq!((l, c), (line, column), "{text:?}: {message}");
    };
    at("    junit: ''\n", 4, 12, "empty glob pattern");
    at("    junit: '   '\n", 4, 12, "empty glob pattern");
    at("    junit: []\n", 4, 12, "`junit` is empty");
    at("    junit:\n", 4, 11, "`junit` is empty");
    at(
        "    junit: {a: b}\n",
        4,
        12,
        "invalid type: map, expected a glob pattern of JUnit XML files",
    );
    at("    junit: 3\n", 4, 12, "invalid type: integer `3`");
    at(
        "    junit: [a.xml, {b: c}]\n",
        4,
        20,
        "invalid type: map, expected a glob pattern",
    );
    at(
        "    junit: /tmp/*.xml\n",
        4,
        12,
        "invalid glob pattern `/tmp/*.xml`: it must be relative to the checkout",
    );
    at("    junit: '[a'\n", 4, 12, "invalid glob pattern");
    at(
        "    junit: a.xml\n    parallel: 2\n    units:\n      glob: '*'\n",
        2,
        5,
        "`junit` cannot be used in a split step",
    );
}

//! Detection of a default pipeline for a repository without a `.kiln.yml`: the project is set
//! up and tested the way its ecosystem does it, never with a bare interpreter that cannot
//! import the project (a false red build is worse than none).
//!
//! Detection is pure: it sees the paths of the tree and the content of the few files it asks
//! for ([`detect_wants`]), which the caller reads at the commit.

use std::collections::{BTreeMap, BTreeSet};

use crate::{Detected, Ecosystem, Pipeline, PipelineError, Source, Step};

/// Name of the step of a detected bare Python unittest pipeline.
pub const PYTHON_UNITTEST_STEP: &str = "unittest";
/// Command of the step of a detected bare Python unittest pipeline.
pub const PYTHON_UNITTEST_RUN: &str = "python3 -m unittest discover -s tests";
/// Name of the step of a detected Cargo pipeline.
pub const CARGO_STEP: &str = "cargo-test";
/// Command of the step of a detected Cargo pipeline.
pub const CARGO_RUN: &str = "cargo test";
/// The virtual environment a detected Python pipeline makes in its checkout.
pub const PYTHON_VENV: &str = ".kiln-venv";
/// Largest file detection reads; the caller skips bigger ones.
pub const MAX_DETECT_FILE: usize = 256 * 1024;

/// Root files whose content detection reads when they exist (besides `requirements*.txt`).
const READ_FILES: &[&str] = &[
    "pyproject.toml",
    "setup.cfg",
    "tox.ini",
    "package.json",
    "Makefile",
    "makefile",
    "GNUmakefile",
];

/// Extras of a Python project installed for its tests, when it declares them.
const TEST_EXTRAS: &[&str] = &["test", "tests", "testing"];

/// What `npm init` writes as the test script: not a test suite.
const NPM_PLACEHOLDER: &str = "no test specified";

/// The `.kiln.yml` that the "nothing detected" error offers to start from.
pub const STARTER: &str = "steps:\n  - name: test\n    run: ./run-tests.sh\n";

/// The root files among `paths` whose content [`detect`] reads: the caller passes them (up to
/// [`MAX_DETECT_FILE`] bytes each) in `files`.
pub fn detect_wants(paths: &[String]) -> Vec<String> {
    let root: BTreeSet<&str> = paths.iter().map(|p| normalize(p)).collect();
    root.iter()
        .filter(|p| READ_FILES.contains(p) || is_requirements(p))
        .map(|p| (*p).to_owned())
        .collect()
}

/// Detects a default pipeline from the paths of the repository's tree (`/`-separated, relative
/// to the root, at least the top level and `tests/`; a leading `./` is ignored) and the content
/// of the files [`detect_wants`] names. First match wins:
///
/// 1. a Python project (`pyproject.toml`, `setup.py`, `setup.cfg` or `requirements*.txt`): a
///    `setup` step makes a venv ([`PYTHON_VENV`]) in the checkout and installs the project
///    (`pip install -e .` with its test extras) and its requirements files; a `test` step runs
///    pytest when the project uses it (its configuration, a `conftest.py`, or pytest among its
///    dependencies), else unittest;
/// 2. a `package.json` with a test script: `npm ci` (`npm install` without a lock file), then
///    `npm test`;
/// 3. a `go.mod`: `go test ./...`;
/// 4. a `Cargo.toml`: `cargo test`;
/// 5. a Makefile with a `test` target: `make test`;
/// 6. Python unittest files `tests/test*.py` alone: `python3 -m unittest discover -s tests`;
/// 7. otherwise [`PipelineError::NothingDetected`], whose message shows a `.kiln.yml` to
///    start from.
pub fn detect(
    paths: &[String],
    files: &BTreeMap<String, String>,
) -> Result<Pipeline, PipelineError> {
    let root: BTreeSet<&str> = paths.iter().map(|p| normalize(p)).collect();
    let file = |name: &str| get(files, name);
    if let Some(p) = python(&root, files) {
        return Ok(p);
    }
    if root.contains("package.json")
        && let Some(p) = node(&root, file("package.json"))
    {
        return Ok(p);
    }
    if root.contains("go.mod") {
        return Ok(pipeline(
            vec![step("go-test", "go test ./...")],
            Ecosystem::Go,
            "go.mod at the root".to_owned(),
        ));
    }
    if root.contains("Cargo.toml") {
        return Ok(pipeline(
            vec![step(CARGO_STEP, CARGO_RUN)],
            Ecosystem::Rust,
            "Cargo.toml at the root".to_owned(),
        ));
    }
    for name in ["GNUmakefile", "makefile", "Makefile"] {
        if root.contains(name) && file(name).is_some_and(has_test_target) {
            return Ok(pipeline(
                vec![step("make-test", "make test")],
                Ecosystem::Make,
                format!("{name} with a `test` target"),
            ));
        }
    }
    if root.iter().any(|p| is_python_unittest_file(p)) {
        return Ok(pipeline(
            vec![step(PYTHON_UNITTEST_STEP, PYTHON_UNITTEST_RUN)],
            Ecosystem::PythonUnittest,
            "Python unittest files tests/test*.py and no packaging files".to_owned(),
        ));
    }
    Err(PipelineError::NothingDetected)
}

/// A Python project: a venv in the checkout, the project and its requirements installed, then
/// its test runner.
fn python(root: &BTreeSet<&str>, files: &BTreeMap<String, String>) -> Option<Pipeline> {
    let file = |name: &str| get(files, name);
    let requirements: Vec<&str> = root
        .iter()
        .copied()
        .filter(|p| is_requirements(p))
        .collect();
    let packaged = ["pyproject.toml", "setup.py", "setup.cfg"]
        .into_iter()
        .find(|f| root.contains(f));
    if packaged.is_none() && requirements.is_empty() {
        return None;
    }
    let pyproject = file("pyproject.toml").and_then(|t| toml::from_str::<toml::Table>(t).ok());
    let optional = pyproject
        .as_ref()
        .and_then(|t| t.get("project"))
        .and_then(|p| p.get("optional-dependencies"))
        .and_then(toml::Value::as_table);
    let extras: Vec<&str> = optional
        .map(|o| {
            o.keys()
                .map(String::as_str)
                .filter(|k| TEST_EXTRAS.contains(k))
                .collect()
        })
        .unwrap_or_default();
    let mut why = vec![match packaged {
        Some(f) => f.to_owned(),
        None => requirements.join(", "),
    }];

    // Whether the project uses pytest, and whether what gets installed brings it.
    let requirement_texts: Vec<&str> = requirements.iter().filter_map(|r| file(r)).collect();
    let installed_deps: Vec<&str> = extras
        .iter()
        .filter_map(|e| {
            optional
                .and_then(|o| o.get(*e))
                .and_then(toml::Value::as_array)
        })
        .flatten()
        .filter_map(toml::Value::as_str)
        .chain(requirement_texts.iter().flat_map(|t| t.lines()))
        .collect();
    let pytest_installed = installed_deps.iter().any(|d| names_pytest(d));
    let configured = pyproject
        .as_ref()
        .and_then(|t| t.get("tool"))
        .is_some_and(|t| t.get("pytest").is_some())
        || file("setup.cfg").is_some_and(|t| t.contains("[tool:pytest]"))
        || file("tox.ini").is_some_and(|t| t.contains("[pytest]"))
        || ["pytest.ini", "conftest.py", "tests/conftest.py"]
            .iter()
            .any(|f| root.contains(f));
    let uses_pytest = pytest_installed || configured;

    let pip = "python -m pip install --disable-pip-version-check";
    let mut setup = vec![
        format!("python3 -m venv {PYTHON_VENV}"),
        format!(". {PYTHON_VENV}/bin/activate"),
    ];
    if packaged.is_some() {
        if extras.is_empty() {
            setup.push(format!("{pip} -e ."));
        } else {
            setup.push(format!("{pip} -e '.[{}]'", extras.join(",")));
            why.push(format!("test extras [{}]", extras.join(",")));
        }
    }
    if !requirements.is_empty() {
        let args: Vec<String> = requirements.iter().map(|r| format!("-r {r}")).collect();
        setup.push(format!("{pip} {}", args.join(" ")));
        if packaged.is_some() {
            why.push(requirements.join(", "));
        }
    }
    if uses_pytest && !pytest_installed {
        setup.push(format!("{pip} pytest"));
    }
    let test = if uses_pytest {
        why.push(if pytest_installed {
            "pytest among its test dependencies".to_owned()
        } else {
            "pytest configured".to_owned()
        });
        format!("{PYTHON_VENV}/bin/python -m pytest")
    } else if root.contains("tests") || root.iter().any(|p| p.starts_with("tests/")) {
        why.push("no pytest: unittest".to_owned());
        format!("{PYTHON_VENV}/bin/python -m unittest discover -s tests")
    } else {
        why.push("no pytest: unittest".to_owned());
        format!("{PYTHON_VENV}/bin/python -m unittest discover")
    };
    Some(pipeline(
        vec![
            step("setup", &format!("set -e\n{}", setup.join("\n"))),
            step("test", &test),
        ],
        Ecosystem::Python,
        why.join("; "),
    ))
}

/// The content of `name`, when the caller read it.
fn get<'a>(files: &'a BTreeMap<String, String>, name: &str) -> Option<&'a str> {
    files.get(name).map(String::as_str)
}

/// A Node project with a real test script.
fn node(root: &BTreeSet<&str>, package_json: Option<&str>) -> Option<Pipeline> {
    let manifest: serde_json::Value = serde_json::from_str(package_json?).ok()?;
    let test = manifest.get("scripts")?.get("test")?.as_str()?;
    if test.trim().is_empty() || test.contains(NPM_PLACEHOLDER) {
        return None;
    }
    let (install, lock) = if root.contains("package-lock.json") {
        ("npm ci", "package-lock.json")
    } else if root.contains("npm-shrinkwrap.json") {
        ("npm ci", "npm-shrinkwrap.json")
    } else {
        ("npm install", "no lock file")
    };
    Some(pipeline(
        vec![step("install", install), step("test", "npm test")],
        Ecosystem::Node,
        format!("package.json with a test script; {lock}"),
    ))
}

/// Whether a requirement line (`pytest>=7`, `pytest-cov`, `PyTest ; python_version>"3"`) names
/// pytest itself.
fn names_pytest(requirement: &str) -> bool {
    let name: String = requirement
        .trim()
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        .collect();
    name.eq_ignore_ascii_case("pytest")
}

/// Whether a Makefile has a rule for the target `test` (`test:`, `test check:`, `test::`), not
/// a variable (`test := ...`).
fn has_test_target(makefile: &str) -> bool {
    makefile.lines().any(|line| {
        if line.starts_with(['\t', ' ', '#']) {
            return false;
        }
        let Some((targets, rest)) = line.split_once(':') else {
            return false;
        };
        !rest.starts_with('=') && targets.split_whitespace().any(|t| t == "test")
    })
}

/// `requirements.txt`, `requirements-dev.txt`, `requirements_test.txt` at the root.
fn is_requirements(path: &str) -> bool {
    path.strip_prefix("requirements")
        .and_then(|rest| rest.strip_suffix(".txt"))
        .is_some_and(|mid| !mid.contains('/'))
}

/// Strips a leading `./` (any number of them).
fn normalize(path: &str) -> &str {
    let mut path = path;
    while let Some(rest) = path.strip_prefix("./") {
        path = rest;
    }
    path
}

/// Whether `path` matches `tests/test*.py`, the default pattern of
/// `python3 -m unittest discover`, directly in `tests/`.
fn is_python_unittest_file(path: &str) -> bool {
    path.strip_prefix("tests/").is_some_and(|file| {
        !file.contains('/')
            && file.starts_with("test")
            && file.ends_with(".py")
            && file.len() >= "test.py".len()
    })
}

fn step(name: &str, run: &str) -> Step {
    Step {
        name: name.to_owned(),
        run: run.to_owned(),
        env: BTreeMap::new(),
        timeout: None,
        labels: BTreeMap::new(),
        post: None,
        split: None,
        junit: Vec::new(),
    }
}

fn pipeline(steps: Vec<Step>, ecosystem: Ecosystem, why: String) -> Pipeline {
    Pipeline {
        steps,
        jobs: Vec::new(),
        source: Source::Detected(Detected { ecosystem, why }),
    }
}

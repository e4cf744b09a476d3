//! Detection of a default pipeline for a repository without a `.kiln.yml`.

use std::collections::BTreeMap;

use crate::{Pipeline, PipelineError, Source, Step};

/// Name of the step of a detected Python unittest pipeline.
pub const PYTHON_UNITTEST_STEP: &str = "unittest";
/// Command of the step of a detected Python unittest pipeline.
pub const PYTHON_UNITTEST_RUN: &str = "python3 -m unittest discover -s tests";
/// Name of the step of a detected Cargo pipeline.
pub const CARGO_STEP: &str = "cargo-test";
/// Command of the step of a detected Cargo pipeline.
pub const CARGO_RUN: &str = "cargo test";

/// Detects a default pipeline from the paths of the repository's tree.
///
/// `paths` are `/`-separated and relative to the root of the repository; the
/// caller passes at least the files of the top level and of `tests/`, in any
/// order (a leading `./` is ignored). The rules, first match wins:
///
/// 1. a file `tests/test*.py` → one step [`PYTHON_UNITTEST_STEP`] running
///    [`PYTHON_UNITTEST_RUN`] ([`Source::DetectedPythonUnittest`]);
/// 2. a `Cargo.toml` at the root → one step [`CARGO_STEP`] running
///    [`CARGO_RUN`] ([`Source::DetectedCargo`]);
/// 3. otherwise [`PipelineError::NothingDetected`].
///
/// # Errors
///
/// [`PipelineError::NothingDetected`] when no rule applies.
pub fn detect(paths: &[String]) -> Result<Pipeline, PipelineError> {
    let paths = || paths.iter().map(|path| normalize(path));
    if paths().any(is_python_unittest_file) {
        return Ok(single_step(
            PYTHON_UNITTEST_STEP,
            PYTHON_UNITTEST_RUN,
            Source::DetectedPythonUnittest,
        ));
    }
    if paths().any(|path| path == "Cargo.toml") {
        return Ok(single_step(CARGO_STEP, CARGO_RUN, Source::DetectedCargo));
    }
    Err(PipelineError::NothingDetected)
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

fn single_step(name: &str, run: &str, source: Source) -> Pipeline {
    Pipeline {
        steps: vec![Step {
            name: name.to_owned(),
            run: run.to_owned(),
            env: BTreeMap::new(),
            timeout: None,
            labels: BTreeMap::new(),
            post: None,
            split: None,
        }],
        jobs: Vec::new(),
        source,
    }
}

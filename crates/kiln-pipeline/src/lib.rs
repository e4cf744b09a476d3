//! Pipeline definitions for kiln: parsing of the `.kiln.yml` file at the root
//! of a repository, and detection of a default pipeline for a repository that
//! has none.
//!
//! The crate does no I/O: the caller passes the text of the file
//! ([`parse`]), the paths of the repository's tree ([`detect`]), or both
//! ([`resolve`]), and gets a [`Pipeline`]: a list of [`Step`]s, each a shell
//! command (run with `sh -c`) with its environment, timeout and the runner
//! labels it needs, the file-wide defaults already applied.
//!
//! # The `.kiln.yml` schema
//!
//! ```yaml
//! version: 1            # optional; any other value is an error
//! env: {K: V}           # optional, applied to every step (step env wins)
//! labels: {os: linux}   # optional default runner labels (step labels win per key)
//! timeout: 30m          # optional default step timeout (humantime units: 30s, 10m, 1h 30m)
//! steps:                # required, non-empty
//!   - name: test        # required, unique, 1..=64 chars of [A-Za-z0-9_.-]
//!     run: python3 -m unittest   # required, non-empty; a YAML list of strings is also accepted and joined with "\n"
//!     env: {K: V}       # values may be YAML strings, numbers or bools (converted to their text); keys must match [A-Za-z_][A-Za-z0-9_]*
//!     timeout: 10m
//!     labels: {k: v}
//!   - name: cleanup
//!     run: ./cleanup.sh
//!     post: always      # a post step: runs after the others (always | success | failure)
//! ```
//!
//! Scalars in `env` and `labels` values are taken as written: `3.10` is the
//! text `3.10` (not `3.1`), `true` is `true`, and an empty or null value
//! (`K:`, `K: ~`) is the empty string. Durations use the
//! [`humantime`](https://docs.rs/humantime) syntax and must be greater than
//! zero.
//!
//! Unknown keys are errors, so a typo never goes unnoticed. Later versions of
//! the schema will add keys (`depends_on`, `matrix`, `parallel`, `retry`,
//! `when`, ...); today they are rejected like any unknown key, and every
//! file valid today will stay valid.
//!
//! Every error in the file is reported with its location (line and column,
//! 1-based), like
//!
//! ```text
//! .kiln.yml:3:5: unknown field `rn`, expected one of `name`, `run`, `env`, `timeout`, `labels`
//! ```
//!
//! and this includes the checks beyond YAML types: empty `steps`, a
//! duplicate step name (reported at its second occurrence), an invalid
//! duration, and so on. See [`PipelineError`].
//!
//! Files larger than [`MAX_FILE_SIZE`] are refused, and so are documents
//! whose flow collections (`[...]`, `{...}`) nest so deeply that the YAML
//! parser would take too long (it is quadratic in that depth).
//!
//! # Default pipelines
//!
//! Without a `.kiln.yml`, [`detect`] looks at the tree: Python unittest files
//! (`tests/test*.py`) give a `unittest` step running
//! `python3 -m unittest discover -s tests`; otherwise a `Cargo.toml` at the
//! root gives a `cargo-test` step running `cargo test`.

mod detect;
mod error;
mod guard;
mod schema;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize as _;
use serde::de::DeserializeSeed as _;

pub use crate::detect::{CARGO_RUN, CARGO_STEP, PYTHON_UNITTEST_RUN, PYTHON_UNITTEST_STEP, detect};
pub use crate::error::PipelineError;

/// Name of the pipeline file at the root of a repository.
pub const FILE_NAME: &str = ".kiln.yml";

/// Largest accepted pipeline file, in bytes (1 MiB).
pub const MAX_FILE_SIZE: usize = 1024 * 1024;

/// A pipeline: the steps to run for a commit, in order.
///
/// The serde impls of this and the other types are for passing a resolved
/// pipeline around (to a store, over the wire); they neither read the
/// `.kiln.yml` schema nor check its rules: use [`parse`] for that.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Pipeline {
    /// The steps, in the order of the file; never empty.
    pub steps: Vec<Step>,
    /// Where the pipeline came from.
    pub source: Source,
}

/// Where a [`Pipeline`] came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Source {
    /// Parsed from the repository's [`FILE_NAME`] file.
    File,
    /// Detected: the repository has Python unittest files in `tests/`.
    DetectedPythonUnittest,
    /// Detected: the repository has a `Cargo.toml` at its root.
    DetectedCargo,
}

/// One step of a pipeline, with the file-wide defaults already applied.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Step {
    /// Unique name of the step: 1 to 64 characters of `[A-Za-z0-9_.-]`.
    pub name: String,
    /// Shell command, run with `sh -c`; never blank. A `run` list in the file
    /// is joined with `"\n"`.
    pub run: String,
    /// Environment variables for the command: the file-wide `env` overridden
    /// by the step's `env`.
    pub env: BTreeMap<String, String>,
    /// Time limit of the step: the step's `timeout`, else the file-wide
    /// `timeout`, else none (the caller's default applies). Never zero.
    pub timeout: Option<Duration>,
    /// Runner labels the step needs: the file-wide `labels` overridden per key
    /// by the step's `labels`.
    pub labels: BTreeMap<String, String>,
    /// `None` for a normal step; for a post step, when it runs. Post steps run
    /// after the normal steps (in file order), whatever stopped them.
    pub post: Option<Post>,
}

/// When a post step runs (Jenkins' `post` conditions).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Post {
    /// After the other steps, whatever happened (also after a cancel or a timeout).
    Always,
    /// Only if every other step passed.
    Success,
    /// Only if a step failed, timed out or could not run (not after a cancel).
    Failure,
}

/// Parses `text`, the content of the pipeline file `file_name` (used only in
/// error messages, normally [`FILE_NAME`]).
///
/// Fails on a file larger than [`MAX_FILE_SIZE`], an empty file, invalid
/// YAML, or anything that does not follow the schema described in the crate
/// documentation; the error carries the line and column of the offending
/// text whenever it is known. Never panics.
///
/// # Errors
///
/// [`PipelineError::TooLarge`], [`PipelineError::Empty`] or
/// [`PipelineError::Invalid`], whose `Display` is
/// `file:line:column: message`.
pub fn parse(file_name: &str, text: &str) -> Result<Pipeline, PipelineError> {
    if text.len() > MAX_FILE_SIZE {
        return Err(PipelineError::too_large(file_name, text.len()));
    }
    if text.trim().is_empty() {
        return Err(PipelineError::empty(file_name));
    }
    if let Err(at) = guard::check_flow_nesting(text) {
        return Err(PipelineError::Invalid {
            file: file_name.to_owned(),
            line: Some(at.line),
            column: Some(at.column),
            message: "too many nested or unclosed flow collections (`[`, `{`) up to here, \
                      which the YAML parser would take too long to read; write lists and \
                      mappings in block style (one item per line) instead"
                .to_owned(),
        });
    }
    // Then the YAML syntax alone: serde_norway parses the whole document
    // before deserializing it but reports a syntax error only once the
    // deserializer reaches it, so a schema error in the part before a syntax
    // error (often a consequence of it, like a "missing" key after a badly
    // indented line) would otherwise hide it.
    let yaml_error = |err: serde_norway::Error| PipelineError::from_yaml(file_name, &err);
    serde::de::IgnoredAny::deserialize(serde_norway::Deserializer::from_str(text))
        .map_err(yaml_error)?;
    let raw = schema::DocumentSeed
        .deserialize(serde_norway::Deserializer::from_str(text))
        .map_err(yaml_error)?;
    Ok(apply_defaults(raw))
}

/// Applies the file-wide `env`, `labels` and `timeout` to every step.
fn apply_defaults(raw: schema::RawPipeline) -> Pipeline {
    let steps = raw
        .steps
        .into_iter()
        .map(|step| {
            let mut env = raw.env.clone();
            env.extend(step.env);
            let mut labels = raw.labels.clone();
            labels.extend(step.labels);
            Step {
                name: step.name,
                run: step.run,
                env,
                timeout: step.timeout.or(raw.timeout),
                labels,
                post: step.post,
            }
        })
        .collect();
    Pipeline {
        steps,
        source: Source::File,
    }
}

/// Returns the pipeline of a repository: [`parse`] of `kiln_yml`, the text of
/// its [`FILE_NAME`], when the file exists, else [`detect`] on `paths`.
///
/// # Errors
///
/// Those of [`parse`] when `kiln_yml` is given (a broken file is an error,
/// never a reason to fall back to detection), else those of [`detect`].
pub fn resolve(kiln_yml: Option<&str>, paths: &[String]) -> Result<Pipeline, PipelineError> {
    match kiln_yml {
        Some(text) => parse(FILE_NAME, text),
        None => detect(paths),
    }
}

//! Pipeline definitions for kiln: parsing of the `.kiln.yml` file at the root
//! of a repository, detection of a default pipeline for a repository that
//! has none, and planning of the jobs of a build.
//!
//! The crate does no I/O: the caller passes the text of the file
//! ([`parse`]), the paths of the repository's tree ([`detect`]), or both
//! ([`resolve`]), and gets a [`Pipeline`]: a list of [`Step`]s, each a shell
//! command (run with `sh -c`) with its environment, timeout and the runner
//! labels it needs, the file-wide defaults already applied; or, for a file
//! with `jobs`, a graph of [`JobDef`]s. [`plan`] then turns a pipeline into
//! the [`JobPlan`]s of one build (of one branch): matrices expanded, split
//! steps' shards made jobs, `when` conditions applied, in an order where
//! every job comes after the jobs it needs.
//!
//! # The `.kiln.yml` schema
//!
//! A file is either one job, a list of `steps` run in order on one runner:
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
//! A step can also be a *split step*, running one test suite cut into
//! *units* (test files or test ids) over several runners:
//!
//! ```yaml
//! steps:
//!   - name: tests
//!     run: python3 -m pytest {units} --junitxml={junit}   # the runner fills {units} and {junit} (also $KILN_UNITS)
//!     parallel: 4            # optional, an integer from 1 to 256: the job runs as 4 shard jobs
//!     units:                 # required with `parallel`: how the units are found
//!       glob: "tests/test_*.py"   # a glob pattern or a non-empty list of them: the matching files, OR
//!       # command: "cargo test -- --list --format terse | sed -n 's/: test$//p'"   # one unit id per line
//!       strategy: dynamic    # optional: dynamic (default) | hash | count | timing
//!       max_batch: 10        # optional, an integer >= 1: most units in one batch
//!     retry:                 # optional (only with `units`): failed units run again
//!       attempts: 3          # required, an integer from 1 to 10: tries per unit, the first included
//!       max_failures: 10     # optional: a number of units, or a percentage of them like "20%":
//!                            #   no retries when more units than that failed in the first round
//!       budget: "5%"         # optional: the retry rounds' time limit, as a percentage of the first
//!                            #   round's (at most one decimal, like "2.5%")
//!       shards: 2            # optional, an integer from 1 to 256: most shards in a retry round
//!                            #   (default: half of the step's shards; capped at `parallel`)
//! ```
//!
//! * `units` without `parallel` is `parallel: 1` (one job, whose units are
//!   still handed out in batches and retried); `parallel` without `units`,
//!   and `retry` without `units`, are errors.
//! * `units` takes exactly one of `glob` and `command`. Glob patterns use
//!   the [`globset`](https://docs.rs/globset) syntax, relative to the
//!   checkout: no leading `/`, no `.` or `..` components.
//! * Percentages go from `0%` to `100%`.
//! * A job (a `steps:` file is one job) has at most one split step, and a
//!   post step is never split.
//! * A job with a split step of `parallel: N` is planned as `N` shard jobs,
//!   each running all the steps of the job, named after the job with
//!   ` [k/N]` appended (`k` from 1: `tests [1/4]`, `pipeline [2/4]`,
//!   `test (python=3.11) [3/4]`); with `N = 1` the job keeps its name. See
//!   [`JobPlan::shard`] and [`Shard`].
//!
//! or a graph of `jobs` (`steps` and `jobs` cannot both be given), each job
//! running its own steps on its own runner:
//!
//! ```yaml
//! version: 1            # optional, as above
//! env: {A: "1"}         # optional file-wide defaults, as above: env, labels, timeout
//! jobs:                 # a non-empty mapping of job names to jobs, run in dependency order
//!   build:              # job name: same rules as a step name, unique
//!     steps:            # required, non-empty: the same step schema as above, post steps included;
//!       - {name: compile, run: make}   # step names are unique within the job
//!   test:
//!     depends_on: [build]   # optional: runs only after these jobs passed (a single name is also accepted)
//!     matrix:               # optional: one job per combination of the values of the axes
//!       python: ["3.11", "3.12"]
//!       os: [linux]
//!     env: {B: "2"}         # optional job defaults: env, labels, timeout (file < job < step)
//!     labels: {os: linux}
//!     timeout: 10m          # like the file-wide one: a default for each step, not a limit for the job
//!     when: {branch: ["main", "release/*"]}   # optional: only in builds of matching branches
//!     steps:
//!       - {name: unit, run: "pytest --python $PYTHON"}
//!   lint:
//!     steps: [{name: clippy, run: cargo clippy}]
//! ```
//!
//! * `depends_on` names jobs of the file, in any order; an unknown name, a
//!   name given twice or a cycle (`a` needs `b` needs `a`) is an error. A job
//!   that depends on a matrix job depends on every cell of it, and one that
//!   depends on a job with a split step on every shard of it (of every
//!   cell).
//! * A matrix job with a split step is expanded into cells first, then each
//!   cell into shards: `test (python=3.11) [1/4]`, and so on.
//! * `matrix` maps axis names (`[A-Za-z_][A-Za-z0-9_]*`, at most
//!   [`MAX_MATRIX_AXES`] axes) to non-empty lists of distinct scalar values
//!   (taken as written, without commas). The job is expanded into one job
//!   per combination, at most [`MAX_MATRIX_CELLS`], named after the job and
//!   the values in axis name order, like `test (os=linux, python=3.11)`;
//!   each cell's steps get an environment variable per axis, named after the
//!   axis upper-cased (`OS=linux`, `PYTHON=3.11`), which overrides any `env`
//!   of the same name (file, job or step). There is no templating: use the
//!   variables (`$PYTHON`) in commands.
//! * `when: {branch: ...}` takes a pattern or a non-empty list of patterns,
//!   matched against the whole branch name (`main`, `release/1.2`) with
//!   [`kiln_domain::BranchPattern`], the one meaning kiln gives a branch
//!   pattern everywhere: `*` matches any text within a path segment (no
//!   `/`), `**` any number of segments, `?`, `[0-9]` and `{a,b}` as in
//!   globs. The job is planned only when one pattern matches; in
//!   a build without a branch, a job with `when` is never planned. `branch`
//!   is the only condition today; other keys are errors.
//! * A job whose dependency is not planned (because of its `when`, or of its
//!   own dependencies) is not planned either: it would otherwise run without
//!   what it needs.
//! * The runner labels of a job are the union of its steps' labels; two
//!   steps of one job needing different values of one label is an error of
//!   [`plan`] (as it is for a `steps:` file, which is one job).
//! * All jobs, after matrix expansion and with every shard of a split step
//!   counted as a job, before `when` is applied, count toward the limits
//!   [`MAX_JOBS`], [`MAX_PLANNED_STEPS`] and [`MAX_NEEDS`], so that whether
//!   a file is valid does not depend on the branch.
//!
//! Scalars in `env` and `labels` values are taken as written: `3.10` is the
//! text `3.10` (not `3.1`), `true` is `true`, and an empty or null value
//! (`K:`, `K: ~`) is the empty string. Durations use the
//! [`humantime`](https://docs.rs/humantime) syntax and must be greater than
//! zero.
//!
//! Unknown keys are errors, so a typo never goes unnoticed. Later versions of
//! the schema will add keys (more `when` conditions, ...); today they are
//! rejected like any unknown key, and every file valid today will stay valid
//! (as every file of the first, `steps`-only schema still is, with the same
//! meaning).
//!
//! Every error in the file is reported with its location (line and column,
//! 1-based), like
//!
//! ```text
//! .kiln.yml:3:5: unknown field `rn`, expected one of `name`, `run`, `env`, `timeout`, `labels`
//! ```
//!
//! and this includes the checks beyond YAML types: empty `steps`, a
//! duplicate step or job name (reported at its second occurrence), an
//! invalid duration, `jobs` next to `steps` (at the second of the two keys),
//! an unknown job or a cycle in `depends_on` (at the offending value; a
//! cycle at the first value in the file that closes one), a matrix with too
//! many cells (at its `matrix` key), an invalid branch pattern, an invalid
//! glob pattern or percentage, `glob` next to `command` (at the second), a
//! split key in a post step or in a second split step of a job (at that
//! key), `parallel` or `retry` without `units` (at the step), and so on.
//! See [`PipelineError`].
//!
//! A `run` longer than [`MAX_RUN_BYTES`] is refused (at its value): the
//! kernel would refuse it as a command-line argument when the step starts.
//!
//! Files larger than [`MAX_FILE_SIZE`] are refused, and so are documents
//! whose lists and mappings nest more than 24 levels deep, or whose aliases
//! expand to more than 100,000 values: no pipeline needs that, and reading
//! them would take too long.
//!
//! # Default pipelines
//!
//! Without a `.kiln.yml`, [`detect`] looks at the tree (and at the few files
//! [`detect_wants`] names) and sets the project up the way its ecosystem
//! does: a Python project gets a venv in its checkout, `pip install -e .`
//! with its test extras and requirements, then pytest (or unittest); Node
//! `npm ci` and `npm test`; Go `go test ./...`; Rust `cargo test`; a Makefile
//! with a `test` target `make test`; bare `tests/test*.py` files unittest.
//! The pipeline's [`Source`] says what was detected and why.

mod detect;
mod error;
mod front;
mod graph;
mod planner;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::time::Duration;

pub use crate::detect::{
    CARGO_RUN, CARGO_STEP, MAX_DETECT_FILE, PYTHON_UNITTEST_RUN, PYTHON_UNITTEST_STEP, PYTHON_VENV,
    STARTER, detect, detect_wants,
};
pub use crate::error::PipelineError;
pub use kiln_domain::split::{RetryPolicy, Strategy, Threshold, UnitSource};

/// Name of the pipeline file at the root of a repository.
pub const FILE_NAME: &str = ".kiln.yml";

/// Largest accepted pipeline file, in bytes (1 MiB).
pub const MAX_FILE_SIZE: usize = 1024 * 1024;

/// Longest `run` command of a step, in bytes (64 KiB). A step runs as `sh -c RUN`, and Linux
/// refuses (`E2BIG`) any single argument of 128 KiB or more; a longer script belongs in a file
/// of the repository that `run` calls.
pub const MAX_RUN_BYTES: usize = 64 * 1024;

/// Most cells of the matrix of one job.
pub const MAX_MATRIX_CELLS: usize = 256;

/// Most axes of the matrix of one job.
pub const MAX_MATRIX_AXES: usize = 16;

/// Most jobs of a `jobs:` file once the matrices are expanded (before `when`
/// is applied).
pub const MAX_JOBS: usize = 1000;

/// Most steps of all the jobs of a `jobs:` file once the matrices are
/// expanded: each cell of a matrix job runs all the steps of the job. (About
/// the most steps a `steps:` file of [`MAX_FILE_SIZE`] can have.)
pub const MAX_PLANNED_STEPS: usize = 50_000;

/// Most shards of a split step (`parallel`), and most shards of its retry
/// rounds (`retry.shards`).
pub const MAX_SHARDS: u32 = 256;

/// Most tries of one unit of a split step (`retry.attempts`), the first
/// included.
pub const MAX_ATTEMPTS: u32 = 10;

/// Most dependencies between the jobs of a `jobs:` file once the matrices
/// are expanded: a job of `n` cells depending on a job of `m` cells counts
/// `n × m` (the sum of the lengths of [`JobPlan::needs`] over all cells).
pub const MAX_NEEDS: usize = 100_000;

/// A pipeline: the steps to run for a commit, in order (one job), or the
/// jobs to run, in dependency order. Use [`plan`] to get the jobs of a
/// build in either case.
///
/// The serde impls of this and the other types are for passing a resolved
/// pipeline around (to a store, over the wire); they neither read the
/// `.kiln.yml` schema nor check its rules: use [`parse`] for that.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Pipeline {
    /// The steps of a `steps:` file or of a detected pipeline, in the order
    /// of the file; never empty then. Empty for a `jobs:` file.
    pub steps: Vec<Step>,
    /// The jobs of a `jobs:` file, in the order of the file, before matrix
    /// expansion; never empty then. Empty otherwise (and absent from the
    /// serialized form then).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub jobs: Vec<JobDef>,
    /// Where the pipeline came from.
    pub source: Source,
}

/// A job of a `jobs:` file, as written: before matrix expansion and `when`
/// filtering (see [`plan`]).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct JobDef {
    /// Unique name of the job, with the rules of a step name.
    pub name: String,
    /// The steps, in the order of the file, with the file-wide and then the
    /// job's `env`, `labels` and `timeout` applied (but not the matrix
    /// variables, which [`plan`] adds per cell); never empty.
    pub steps: Vec<Step>,
    /// Names of the jobs this one runs after, in the order of the file,
    /// without repetitions.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub depends_on: Vec<String>,
    /// The matrix: axis names to their values (in the order of the file);
    /// empty for a job without a matrix.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub matrix: BTreeMap<String, Vec<String>>,
    /// The job's conditions; `None` runs it in every build.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub when: Option<When>,
}

/// The conditions of a job (`when:`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct When {
    /// Branch patterns, one of which must match the branch of the build;
    /// never empty. See the crate documentation for the syntax.
    pub branch: Vec<String>,
}

/// One job of a build, after matrix expansion, shard expansion and `when`
/// filtering, as [`plan`] returns them: in a deterministic topological
/// order (a job after every job it needs; among the jobs that are ready,
/// the first in the file, the cells of a matrix job in a row, the shards of
/// a cell in a row).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct JobPlan {
    /// Unique name in the plan: the job's name, followed for a matrix cell
    /// by its values, like `test (os=linux, python=3.11)`, and for a shard
    /// of a split step of `N > 1` shards by ` [k/N]`, like `test [2/4]`.
    pub name: String,
    /// The steps, in order, post steps included, with all the defaults and
    /// the matrix variables applied.
    pub steps: Vec<Step>,
    /// Runner labels the job needs: the union of its steps' labels.
    pub labels: BTreeMap<String, String>,
    /// Names of the jobs of this plan that must pass before this one runs,
    /// in `depends_on` order (every cell and every shard of a matrix or
    /// split job, in plan order).
    pub needs: Vec<String>,
    /// For a job with a split step (see [`Step::split`]), which shard of it
    /// this job is, also when the step has a single shard; `None` for a job
    /// without a split step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shard: Option<Shard>,
}

/// Which shard of its split step a [`JobPlan`] is.
///
/// A job (a matrix cell, for a matrix job) whose steps include a split step
/// of `N` shards is planned as `N` jobs running all its steps, named after
/// the job with ` [k/N]` appended (`k` from 1, like `test [2/4]` or
/// `test (python=3.11) [2/4]`); with `N = 1`, the job keeps its name.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Shard {
    /// This shard, 0-based: `k - 1` for a job named `... [k/N]`.
    pub index: u32,
    /// The number of shards `N`, the split step's [`SplitDef::shards`].
    pub count: u32,
    /// Identity of the split, shared by all the shards of the step (and the
    /// name of its units' recorded durations and flaky counts): in a `jobs:`
    /// file the job's name before sharding (with its matrix values), `/`, the
    /// step's name, like `test (python=3.11)/unit`; in a `steps:` file the
    /// step's name alone, like `tests` (the file's one job is named after its
    /// step or `pipeline` depending on the number of steps).
    pub key: String,
}

/// Where a [`Pipeline`] came from.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Source {
    /// Parsed from the repository's [`FILE_NAME`] file.
    File,
    /// Detected from the repository's tree (no [`FILE_NAME`]).
    Detected(Detected),
}

impl Source {
    /// How the pipeline was found, for people: `.kiln.yml`, or what was detected and why.
    pub fn describe(&self) -> String {
        match self {
            Source::File => FILE_NAME.to_owned(),
            Source::Detected(d) => format!(
                "no {FILE_NAME}: detected a {} project ({})",
                d.ecosystem.name(),
                d.why
            ),
        }
    }
}

/// A detected default pipeline: which ecosystem, and what in the tree said so.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Detected {
    /// The kind of project.
    pub ecosystem: Ecosystem,
    /// The files and facts that decided it (`pyproject.toml; test extras [test]; pytest among
    /// its test dependencies`).
    pub why: String,
}

/// The kinds of project [`detect`] knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Ecosystem {
    /// A Python project with packaging or requirements files.
    Python,
    /// Python unittest files alone (nothing to install).
    PythonUnittest,
    /// A Node project with a test script.
    Node,
    /// A Go module.
    Go,
    /// A Cargo package or workspace.
    Rust,
    /// A Makefile with a `test` target.
    Make,
}

impl Ecosystem {
    /// The name shown to people.
    pub fn name(self) -> &'static str {
        match self {
            Ecosystem::Python => "Python",
            Ecosystem::PythonUnittest => "Python unittest",
            Ecosystem::Node => "Node",
            Ecosystem::Go => "Go",
            Ecosystem::Rust => "Rust",
            Ecosystem::Make => "make",
        }
    }
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
    /// For a split step (`parallel`, `units`, `retry`), how it is split;
    /// `None` for a normal step. A job has at most one split step, never a
    /// post step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub split: Option<SplitDef>,
    /// Glob patterns (relative to the checkout, as `units.glob`) of the JUnit XML files the
    /// step writes; the runner reads them when the step ends, passed or failed, and they join
    /// the build's test report. Empty when the step names none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub junit: Vec<String>,
}

/// How a split step is split: its `parallel`, `units` and `retry`, as
/// written (the same for every shard; [`JobPlan::shard`] says which shard a
/// planned job is). The fields are those of
/// [`kiln_domain::split::SplitSpec`] that come from the file.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SplitDef {
    /// Number of shard jobs (`parallel`): 1 to [`MAX_SHARDS`], 1 for a step
    /// with `units` but no `parallel`.
    pub shards: u32,
    /// Where the units come from (`units.glob` or `units.command`). Glob
    /// patterns are valid for `globset`, relative to the checkout, without
    /// `.` or `..` components; a command is never blank.
    pub units: UnitSource,
    /// How units are handed to shards (`units.strategy`, default dynamic).
    #[serde(default)]
    pub strategy: Strategy,
    /// Most units in one batch (`units.max_batch`); 0 when not given (the
    /// dispatcher decides).
    #[serde(default)]
    pub max_batch: u32,
    /// Retries of failed units (`retry`); one try (`attempts: 1`, the
    /// default) without `retry`. `shards` 0 is "half of the step's shards",
    /// and a value above [`SplitDef::shards`] counts as that.
    #[serde(default)]
    pub retry: RetryPolicy,
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
    let raw = front::parse(text).map_err(|fail| PipelineError::Invalid {
        file: file_name.to_owned(),
        line: fail.at.map(|at| at.0),
        column: fail.at.map(|at| at.1),
        message: fail.message,
    })?;
    Ok(apply_defaults(raw))
}

/// Applies the defaults (`env`, `labels` and `timeout`) of `outer`, then of
/// `job` (when given), to a step.
fn apply_step_defaults(
    outer: &front::RawPipeline,
    job: Option<&front::RawJob>,
    step: front::RawStep,
) -> Step {
    let mut env = outer.env.clone();
    let mut labels = outer.labels.clone();
    let mut timeout = outer.timeout;
    if let Some(job) = job {
        env.extend(job.env.iter().map(|(k, v)| (k.clone(), v.clone())));
        labels.extend(job.labels.iter().map(|(k, v)| (k.clone(), v.clone())));
        timeout = job.timeout.or(timeout);
    }
    env.extend(step.env);
    labels.extend(step.labels);
    Step {
        name: step.name,
        run: step.run,
        env,
        timeout: step.timeout.or(timeout),
        labels,
        post: step.post,
        split: step.split,
        junit: step.junit,
    }
}

/// Applies the file-wide `env`, `labels` and `timeout` to every step, and
/// those of each job to its steps.
fn apply_defaults(mut raw: front::RawPipeline) -> Pipeline {
    let raw_steps = std::mem::take(&mut raw.steps);
    let raw_jobs = std::mem::take(&mut raw.jobs);
    let steps = raw_steps
        .into_iter()
        .map(|step| apply_step_defaults(&raw, None, step))
        .collect();
    let jobs = raw_jobs
        .into_iter()
        .map(|mut job| {
            let job_steps = std::mem::take(&mut job.steps);
            let steps = job_steps
                .into_iter()
                .map(|step| apply_step_defaults(&raw, Some(&job), step))
                .collect();
            JobDef {
                name: job.name,
                steps,
                depends_on: job.depends_on,
                matrix: job.matrix,
                when: job.when.map(|branch| When { branch }),
            }
        })
        .collect();
    Pipeline {
        steps,
        jobs,
        source: Source::File,
    }
}

/// Plans the jobs of a pipeline for a build of `branch` (the branch name,
/// like `main` or `release/1.2`, not `refs/heads/main`; empty when the build
/// has no branch).
///
/// A `steps:` pipeline (a file with `steps`, or a detected one) gives one
/// job running all the steps, named after its step when it has only one,
/// else `pipeline`, needing nothing. A `jobs:` pipeline gives one job per
/// matrix cell of every job whose `when` holds for `branch` and whose
/// dependencies are all planned (a job whose dependency was left out by
/// `when` is left out too), in the order described at [`JobPlan`]; the
/// plan may be empty when `when` leaves every job out. In both cases, a job
/// (or cell) with a split step of `N` shards is planned as `N` jobs (see
/// [`Shard`]), and the jobs that need it need every shard.
///
/// The labels of a job are the union of its steps' labels (each step's
/// labels already include the file's and the job's).
///
/// # Errors
///
/// [`PipelineError::Invalid`], without a location (the file name is
/// [`FILE_NAME`]), when two steps of one job need different values of one
/// runner label (the message names both steps and values), and for a
/// pipeline that [`parse`] would not have returned (built or deserialized
/// by hand): both `steps` and `jobs`, neither, a job without steps, a
/// duplicate job name, an unknown dependency, a cycle, a matrix over the
/// limits, several split steps in one job, a split post step, a number of
/// shards out of range, a plan over the limits.
pub fn plan(p: &Pipeline, branch: &str) -> Result<Vec<JobPlan>, PipelineError> {
    planner::plan(p, branch)
}

/// Returns the pipeline of a repository: [`parse`] of `kiln_yml`, the text of
/// its [`FILE_NAME`], when the file exists, else [`detect`] on `paths`.
///
/// # Errors
///
/// Those of [`parse`] when `kiln_yml` is given (a broken file is an error,
/// never a reason to fall back to detection), else those of [`detect`].
pub fn resolve(
    kiln_yml: Option<&str>,
    paths: &[String],
    files: &BTreeMap<String, String>,
) -> Result<Pipeline, PipelineError> {
    match kiln_yml {
        Some(text) => parse(FILE_NAME, text),
        None => detect(paths, files),
    }
}

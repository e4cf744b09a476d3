//! The `.kiln.yml` front end: the text is read once, by serde-saphyr's YAML
//! parser, into a tree of nodes with their locations ([`yaml`]); the [`Outline`] of the
//! jobs is taken from that tree; then one validation pass walks the tree in
//! document order, builds the [`RawPipeline`] and returns the first error
//! with the location of the offending node: a value's errors at the value,
//! a key's (unknown, given twice, refused next to another key) at the key,
//! a missing key and the checks over a whole mapping or list at its start.
//! Messages use serde's wording where it is about types (`invalid type:
//! integer `3`, expected ...`, `unknown field`, `missing field`).

mod outline;
mod split;
mod yaml;

use std::borrow::Cow;
use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use serde::de::{self, Error as _};

use self::outline::Outline;
use self::yaml::{Kind, N, Node, scalar, unexpected};
use crate::planner::{Budget, Shape, check_graph, cycle_message, shards_of};
use crate::{MAX_MATRIX_AXES, MAX_MATRIX_CELLS, MAX_PLANNED_STEPS, MAX_RUN_BYTES, Post, SplitDef};

/// Keys allowed at the top level of the file.
const TOP_FIELDS: &[&str] = &["version", "env", "labels", "timeout", "steps", "jobs"];
/// Keys allowed in a step.
const STEP_FIELDS: &[&str] = &[
    "name",
    "run",
    "env",
    "timeout",
    "labels",
    "post",
    "parallel",
    "units",
    "retry",
    "interaction",
    "junit",
];
/// The keys of a step that make it a split step.
const SPLIT_FIELDS: &[&str] = &["parallel", "units", "retry", "interaction"];
/// Keys allowed in a job.
const JOB_FIELDS: &[&str] = &[
    "steps",
    "depends_on",
    "matrix",
    "env",
    "labels",
    "timeout",
    "when",
];
/// Longest step (and job) name, in characters.
const MAX_NAME_LEN: usize = 64;
/// Longest matrix axis name and value, in characters.
const MAX_MATRIX_TEXT: usize = 64;
/// Longest piece of user text quoted back in an error message.
const MAX_QUOTE: usize = 80;
/// How many job names an "unknown job" message lists.
const MAX_LISTED: usize = 10;
/// Most patterns in a step's `junit`.
const MAX_JUNIT_GLOBS: usize = 64;

/// The file as written, before the top-level defaults are applied.
#[derive(Debug, Default)]
pub(crate) struct RawPipeline {
    pub(crate) env: BTreeMap<String, String>,
    pub(crate) labels: BTreeMap<String, String>,
    pub(crate) timeout: Option<Duration>,
    pub(crate) steps: Vec<RawStep>,
    pub(crate) jobs: Vec<RawJob>,
}

/// A step as written.
#[derive(Debug, Default)]
pub(crate) struct RawStep {
    pub(crate) name: String,
    pub(crate) run: String,
    pub(crate) env: BTreeMap<String, String>,
    pub(crate) timeout: Option<Duration>,
    pub(crate) labels: BTreeMap<String, String>,
    pub(crate) post: Option<Post>,
    pub(crate) split: Option<SplitDef>,
    pub(crate) junit: Vec<String>,
}

/// A job as written.
#[derive(Debug, Default)]
pub(crate) struct RawJob {
    pub(crate) name: String,
    pub(crate) steps: Vec<RawStep>,
    pub(crate) depends_on: Vec<String>,
    pub(crate) matrix: BTreeMap<String, Vec<String>>,
    pub(crate) when: Option<Vec<String>>,
    pub(crate) env: BTreeMap<String, String>,
    pub(crate) labels: BTreeMap<String, String>,
    pub(crate) timeout: Option<Duration>,
}

/// An error of the file: where, and the message.
#[derive(Debug)]
pub(crate) struct Fail {
    /// Line and column, when known.
    pub(crate) at: Option<(usize, usize)>,
    pub(crate) message: String,
}

type R<T> = Result<T, Fail>;

/// Returns the error `format!(...)` at node `$n`.
macro_rules! bail {
    ($n:expr, $($message:tt)+) => {
        return fail($n, format!($($message)+))
    };
}
pub(crate) use bail;

fn fail<T>(n: &N, message: impl Into<String>) -> R<T> {
    Err(Fail {
        at: Some((n.line, n.column)),
        message: message.into(),
    })
}

/// An error in serde's wording (`invalid type`, `unknown field`, ...).
fn serde_fail<T>(n: &N, error: de::value::Error) -> R<T> {
    fail(n, error.to_string())
}

/// Quotes user text in a message, shortened if it is long.
pub(crate) fn quote(text: &str) -> String {
    if text.chars().count() <= MAX_QUOTE {
        format!("`{text}`")
    } else {
        let short: String = text.chars().take(MAX_QUOTE).collect();
        format!("`{short}...`")
    }
}

/// Reads the pipeline file `text`.
pub(crate) fn parse(text: &str) -> R<RawPipeline> {
    let doc = yaml::read(text).map_err(|(at, message)| Fail { at, message })?;
    let outline = Outline::read(&doc);
    Pass { outline }.document(&doc)
}

/// A node seen through `deserialize_any`.
enum Any<'a> {
    Null,
    Str(Cow<'a, str>),
    Int(i128),
    Seq(&'a [N<'a>]),
    Map(&'a [(N<'a>, N<'a>)]),
    Other,
}

/// The validation pass.
struct Pass {
    outline: Option<Outline>,
}

impl Pass {
    fn any<'a>(&'a self, n: &'a N<'a>) -> Any<'a> {
        match &n.value {
            Node::Seq(items) => Any::Seq(items),
            Node::Map(entries) => Any::Map(entries),
            _ => match scalar(n).map(|s| (s.kind, s.text)) {
                Some((Kind::Null, _)) => Any::Null,
                Some((Kind::Str, text)) => Any::Str(text),
                Some((Kind::Int(i), _)) => Any::Int(i),
                _ => Any::Other,
            },
        }
    }

    fn invalid<T>(&self, n: &N, expected: &str) -> R<T> {
        let s = scalar(n);
        serde_fail(
            n,
            de::value::Error::invalid_type(unexpected(n, s.as_ref()), &expected),
        )
    }

    /// Any scalar's text as written (`deserialize_str`).
    fn str(&self, n: &N, expected: &str) -> R<String> {
        match scalar(n) {
            Some(s) => Ok(s.text.into_owned()),
            None => self.invalid(n, expected),
        }
    }

    /// Any scalar's text as written, a null being empty.
    fn text_or_empty(&self, n: &N, expected: &str) -> R<String> {
        match scalar(n) {
            Some(s) if s.kind == Kind::Null => Ok(String::new()),
            Some(s) => Ok(s.text.into_owned()),
            None => self.invalid(n, expected),
        }
    }

    /// The entries of a struct-like mapping; an empty plain scalar is an
    /// empty mapping.
    fn map_of<'a>(&'a self, n: &'a N<'a>, expected: &str) -> R<&'a [(N<'a>, N<'a>)]> {
        match self.any(n) {
            Any::Map(entries) => Ok(entries),
            Any::Null if scalar(n).is_some_and(|s| s.text.is_empty()) => Ok(&[]),
            _ => self.invalid(n, expected),
        }
    }

    /// The entries of mapping `n`; a null is the error `empty` (no entries
    /// when `empty` is blank).
    fn mapping<'a>(&'a self, n: &'a N<'a>, empty: &str, expected: &str) -> R<&'a [(N<'a>, N<'a>)]> {
        match self.any(n) {
            Any::Map(entries) => Ok(entries),
            Any::Null if empty.is_empty() => Ok(&[]),
            Any::Null => fail(n, empty),
            _ => self.invalid(n, expected),
        }
    }

    /// The items of list `n`; a null is the error `empty`.
    fn list<'a>(&'a self, n: &'a N<'a>, empty: &str, expected: &str) -> R<&'a [N<'a>]> {
        match self.any(n) {
            Any::Seq(items) => Ok(items),
            Any::Null => fail(n, empty),
            _ => self.invalid(n, expected),
        }
    }

    /// Reads a key of a struct-like mapping: refuses unknown keys, keys
    /// given twice, then the keys of `refuse` with their message.
    fn field(
        &self,
        k: &N,
        fields: &'static [&'static str],
        seen: &mut Vec<&'static str>,
        refuse: &dyn Fn(&str) -> Option<String>,
    ) -> R<&'static str> {
        let Some(v) = scalar(k) else {
            return self.invalid(k, "a key name");
        };
        let Some(field) = fields.iter().copied().find(|f| *f == v.text) else {
            return serde_fail(k, de::value::Error::unknown_field(&v.text, fields));
        };
        if seen.contains(&field) {
            return serde_fail(k, de::value::Error::duplicate_field(field));
        }
        if let Some(message) = refuse(field) {
            return fail(k, message);
        }
        seen.push(field);
        Ok(field)
    }

    fn document(&self, n: &N) -> R<RawPipeline> {
        let expected = "a mapping at the top level, with a `steps` list or a `jobs` mapping";
        let entries = self.mapping(
            n,
            "the file holds no pipeline; it must be a mapping with a non-empty `steps` \
                     list or `jobs` mapping",
            expected,
        )?;
        let mut seen = Vec::new();
        let mut raw = RawPipeline::default();
        let (mut steps, mut jobs) = (false, false);
        for (k, v) in entries {
            let refuse = |key: &str| match (key, steps, jobs) {
                ("jobs", true, _) => Some(
                    "`jobs` cannot be used with `steps`: a file has either a `steps` list \
                     (one job) or a `jobs` mapping"
                        .to_owned(),
                ),
                ("steps", _, true) => Some(
                    "`steps` cannot be used with `jobs`: a file has either a `steps` list \
                     (one job) or a `jobs` mapping, whose jobs have their own `steps`"
                        .to_owned(),
                ),
                _ => None,
            };
            match self.field(k, TOP_FIELDS, &mut seen, &refuse)? {
                "version" => {
                    let version = self.str(v, "the pipeline file version `1`")?;
                    if version.trim() != "1" {
                        bail!(
                            v,
                            "unsupported `version` {}, expected `1` (or no `version` key)",
                            quote(&version)
                        );
                    }
                }
                "env" => raw.env = self.string_map(v, true)?,
                "labels" => raw.labels = self.string_map(v, false)?,
                "timeout" => raw.timeout = Some(self.duration(v)?),
                "steps" => (raw.steps, steps) = (self.steps(v)?, true),
                _ => (raw.jobs, jobs) = (self.jobs(v)?, true),
            }
        }
        if !steps && !jobs {
            bail!(n, "missing field `steps` or `jobs`");
        }
        Ok(raw)
    }

    // -----------------------------------------------------------------------
    // Steps

    fn steps(&self, n: &N) -> R<Vec<RawStep>> {
        const EMPTY: &str = "`steps` is empty; at least one step with `name` and `run` is needed";
        let items = self.list(n, EMPTY, "a non-empty list of steps")?;
        let mut names = BTreeMap::new();
        let mut steps: Vec<RawStep> = Vec::new();
        let mut split: Option<(String, u32)> = None;
        for item in items {
            let first = split.as_ref().map(|(name, _)| name.as_str());
            let step = self.step(item, steps.len() + 1, &mut names, first)?;
            if let Some(def) = &step.split {
                split = Some((step.name.clone(), def.shards));
            }
            steps.push(step);
        }
        if steps.is_empty() {
            return fail(n, EMPTY);
        }
        if steps.iter().all(|s| s.post.is_some()) {
            bail!(
                n,
                "every step is a `post` step; at least one step must run before them"
            );
        }
        if let Some((name, shards)) = &split
            && steps.len().saturating_mul(*shards as usize) > MAX_PLANNED_STEPS
        {
            bail!(
                n,
                "with `parallel: {shards}` (step {}), the job's shards have more than \
                     {MAX_PLANNED_STEPS} steps in all (every shard runs all the steps of the job)",
                quote(name)
            );
        }
        Ok(steps)
    }

    /// Why `key` is refused in the rest of a step, given what was read of
    /// it: a post step is never split, and a job has one split step at most.
    fn refusal(key: &str, post: bool, split: bool, first: Option<&str>) -> Option<String> {
        if post && SPLIT_FIELDS.contains(&key) {
            return Some(format!(
                "`{key}` cannot be used in a `post` step: a post step is never split \
                 (put the split in a normal step)"
            ));
        }
        if split && key == "post" {
            return Some(
                "`post` cannot be used in a split step (a step with `parallel`, `units` or \
                 `retry`): a post step is never split"
                    .to_owned(),
            );
        }
        let first = first.filter(|_| matches!(key, "parallel" | "units"))?;
        Some(format!(
            "step {} of this job is already split: a job has at most one split step (with \
             `parallel` or `units`)",
            quote(first)
        ))
    }

    fn step(
        &self,
        n: &N,
        number: usize,
        names: &mut BTreeMap<String, usize>,
        first_split: Option<&str>,
    ) -> R<RawStep> {
        let entries = self.map_of(n, "a step: a mapping with `name` and `run`")?;
        let mut seen = Vec::new();
        let (mut name, mut run) = (None, None);
        let mut step = RawStep::default();
        let (mut parallel, mut units, mut retry, mut interaction) = (None, None, None, None);
        for (k, v) in entries {
            let split =
                parallel.is_some() || units.is_some() || retry.is_some() || interaction.is_some();
            let post = step.post.is_some();
            let refuse = |key: &str| Self::refusal(key, post, split, first_split);
            match self.field(k, STEP_FIELDS, &mut seen, &refuse)? {
                "name" => {
                    let text = self.str(v, "a step name")?;
                    if !is_valid_name(&text) {
                        return fail(v, invalid_name("step", &text));
                    }
                    if let Some(first) = names.get(&text) {
                        bail!(
                            v,
                            "duplicate step name {}, already used by step {first}",
                            quote(&text)
                        );
                    }
                    names.insert(text.clone(), number);
                    name = Some(text);
                }
                "run" => run = Some(self.run(v)?),
                "env" => step.env = self.string_map(v, true)?,
                "timeout" => step.timeout = Some(self.duration(v)?),
                "labels" => step.labels = self.string_map(v, false)?,
                "post" => {
                    let text = self.str(v, "`always`, `success` or `failure`")?;
                    step.post = Some(match text.trim() {
                        "always" => Post::Always,
                        "success" => Post::Success,
                        "failure" => Post::Failure,
                        _ => {
                            bail!(
                                v,
                                "invalid `post` {}, expected `always`, `success` or `failure`",
                                quote(&text)
                            );
                        }
                    });
                }
                "parallel" => parallel = Some(self.int(v, split::PARALLEL)?),
                "units" => units = Some(self.units(v)?),
                "retry" => retry = Some(self.retry(v)?),
                "interaction" => interaction = Some(self.interaction(v)?),
                _ => step.junit = self.junit(v)?,
            }
        }
        if units.is_none() && interaction.is_some() && parallel.is_none() && retry.is_none() {
            bail!(
                n,
                "`interaction` needs `units`: it says what a failure between the units of a \
                 split step's batch does"
            );
        }
        if !step.junit.is_empty() && (parallel.is_some() || units.is_some() || retry.is_some()) {
            bail!(
                n,
                "`junit` cannot be used in a split step (a step with `parallel`, `units` or \
                 `retry`): a split step's report comes from its units' JUnit files"
            );
        }
        step.split = match (parallel, units, retry) {
            (None, None, None) => None,
            (Some(shards), None, _) => {
                bail!(
                    n,
                    "`parallel: {shards}` needs `units`: a mapping with `glob` (patterns of \
                         test files) or `command` (a command printing one unit id per line)"
                );
            }
            (None, None, Some(_)) => {
                bail!(
                    n,
                    "`retry` needs `units`: only the units of a split step run again"
                );
            }
            (shards, Some(units), retry) => Some(SplitDef {
                shards: shards.unwrap_or(1),
                units: units.source,
                strategy: units.strategy,
                max_batch: units.max_batch,
                retry: kiln_domain::split::RetryPolicy {
                    interaction: interaction.unwrap_or_default(),
                    ..retry.unwrap_or_default()
                },
            }),
        };
        let Some(name) = name else {
            return serde_fail(n, de::value::Error::missing_field("name"));
        };
        let Some(run) = run else {
            return serde_fail(n, de::value::Error::missing_field("run"));
        };
        Ok(RawStep { name, run, ..step })
    }

    /// `run`: a non-blank string, or a list of strings joined with newlines.
    fn run(&self, n: &N) -> R<String> {
        const EMPTY: &str = "`run` is empty, expected a shell command";
        let run = match self.any(n) {
            Any::Null => return fail(n, EMPTY),
            Any::Str(text) => text.into_owned(),
            Any::Seq(items) => {
                let mut lines = Vec::new();
                for item in items {
                    lines.push(self.text_or_empty(item, "a command string")?);
                }
                lines.join("\n")
            }
            _ => {
                return self.invalid(
                    n,
                    "a shell command string or a list of command strings \
                     (quote a command that YAML reads as a number or a bool)",
                );
            }
        };
        if run.trim().is_empty() {
            return fail(n, EMPTY);
        }
        if run.len() > MAX_RUN_BYTES {
            bail!(
                n,
                "`run` is {} bytes long; at most {MAX_RUN_BYTES} bytes (64 KiB) are allowed, \
                     since a step runs as `sh -c RUN` and the kernel refuses longer arguments: \
                     put the script in a file of the repository and run that file",
                run.len()
            );
        }
        Ok(run)
    }

    /// `junit`: a glob pattern or a non-empty list of them.
    fn junit(&self, n: &N) -> R<Vec<String>> {
        const EMPTY: &str = "`junit` is empty; expected a glob pattern of the JUnit XML files the \
                             step writes, such as `reports/*.xml`, or a list of them";
        let patterns = self.patterns(
            n,
            "a glob pattern of JUnit XML files or a list of them",
            "a glob pattern",
            EMPTY,
            &|p| split::check_glob(p),
        )?;
        if patterns.len() > MAX_JUNIT_GLOBS {
            bail!(n, "`junit` has more than {MAX_JUNIT_GLOBS} patterns");
        }
        Ok(patterns)
    }

    /// A pattern or a non-empty list of them, each checked by `check`.
    fn patterns(
        &self,
        n: &N,
        expected: &str,
        expected_item: &str,
        empty: &str,
        check: &dyn Fn(&str) -> Result<(), String>,
    ) -> R<Vec<String>> {
        let mut patterns = Vec::new();
        match self.any(n) {
            Any::Null => {}
            Any::Str(text) => {
                check(&text).or_else(|e| fail(n, e))?;
                patterns.push(text.into_owned());
            }
            Any::Seq(items) => {
                for item in items {
                    let text = self.str(item, expected_item)?;
                    check(&text).or_else(|e| fail(item, e))?;
                    patterns.push(text);
                }
            }
            _ => return self.invalid(n, expected),
        }
        if patterns.is_empty() {
            return fail(n, empty);
        }
        Ok(patterns)
    }

    /// A duration in humantime syntax, greater than zero.
    fn duration(&self, n: &N) -> R<Duration> {
        const EXAMPLE: &str = "a duration such as `30s`, `10m` or `1h 30m`";
        let v = self.str(n, EXAMPLE)?;
        let text = v.trim();
        if text.is_empty() {
            bail!(n, "`timeout` is empty, expected {EXAMPLE}");
        }
        match humantime::parse_duration(text) {
            Ok(duration) if duration.is_zero() => fail(
                n,
                format!(
                    "invalid timeout {}, it must be greater than zero",
                    quote(&v)
                ),
            ),
            Ok(duration) => Ok(duration),
            Err(err) => fail(
                n,
                format!("invalid duration {} ({err}), expected {EXAMPLE}", quote(&v)),
            ),
        }
    }

    /// `env` (`env` true) or `labels`: names to scalar texts; nothing is
    /// an empty mapping.
    fn string_map(&self, n: &N, env: bool) -> R<BTreeMap<String, String>> {
        let expected = if env {
            "a mapping of environment variable names to values"
        } else {
            "a mapping of label names to values"
        };
        let entries = self.mapping(n, "", expected)?;
        let mut out = BTreeMap::new();
        for (k, v) in entries {
            let what = if env {
                let key = self.str(k, "an environment variable name")?;
                if !is_valid_env_name(&key) {
                    bail!(
                        k,
                        "invalid environment variable name {}, expected \
                             `[A-Za-z_][A-Za-z0-9_]*`",
                        quote(&key)
                    );
                }
                ("environment variable", key)
            } else {
                let key = self.str(k, "a label name")?;
                if key.trim().is_empty() {
                    bail!(k, "empty label name");
                }
                ("label", key)
            };
            if out.contains_key(&what.1) {
                bail!(k, "duplicate {} {}", what.0, quote(&what.1));
            }
            let value = self.text_or_empty(v, "a string, number or bool")?;
            out.insert(what.1, value);
        }
        Ok(out)
    }

    // -----------------------------------------------------------------------
    // Jobs

    fn jobs(&self, n: &N) -> R<Vec<RawJob>> {
        const EMPTY: &str = "`jobs` is empty; at least one job with `steps` is needed";
        let entries = self.mapping(n, EMPTY, "a mapping of job names to jobs")?;
        let mut names = BTreeMap::new();
        let mut budget = Budget::default();
        let mut jobs = Vec::new();
        for (k, v) in entries {
            let name = self.str(k, "a job name")?;
            if !is_valid_name(&name) {
                return fail(k, invalid_name("job", &name));
            }
            if let Some(first) = names.get(&name) {
                bail!(
                    k,
                    "duplicate job name {}, already used by job {first}",
                    quote(&name)
                );
            }
            if let Some(outline) = &self.outline
                && let Some(i) = outline.job(&name)
                && outline.cells[i] <= MAX_MATRIX_CELLS as u64
            {
                let dep_jobs = outline.deps[i]
                    .iter()
                    .fold(0u64, |sum, &d| sum.saturating_add(outline.planned(d)));
                budget
                    .add(&name, outline.planned(i), outline.steps[i], dep_jobs)
                    .or_else(|e| fail(k, e))?;
            }
            names.insert(name.clone(), jobs.len() + 1);
            jobs.push(self.job(v, name)?);
        }
        if jobs.is_empty() {
            return fail(n, EMPTY);
        }
        // Checked above, value by value, when the outline is known.
        let shapes: Vec<Shape<'_>> = jobs
            .iter()
            .map(|job| Shape {
                name: &job.name,
                deps: &job.depends_on,
                cells: cells_of(&job.matrix),
                shards: shards_of(job.steps.iter().map(|step| step.split.as_ref())),
                steps: job.steps.len(),
            })
            .collect();
        check_graph(&shapes).or_else(|e| fail(n, e))?;
        Ok(jobs)
    }

    fn job(&self, n: &N, name: String) -> R<RawJob> {
        let entries = self.map_of(n, "a job: a mapping with `steps`")?;
        let too_many_cells = self
            .outline
            .as_ref()
            .and_then(|outline| outline.job(&name).map(|i| outline.cells[i]))
            .filter(|&cells| cells > MAX_MATRIX_CELLS as u64);
        let mut seen = Vec::new();
        let mut steps = None;
        let mut job = RawJob {
            name,
            ..RawJob::default()
        };
        for (k, v) in entries {
            let refuse = |key: &str| {
                let cells = too_many_cells.filter(|_| key == "matrix")?;
                Some(too_many_cells_message(&job.name, cells))
            };
            match self.field(k, JOB_FIELDS, &mut seen, &refuse)? {
                "steps" => steps = Some(self.steps(v)?),
                "depends_on" => job.depends_on = self.deps(v, &job.name)?,
                "matrix" => job.matrix = self.matrix(v, &job.name)?,
                "when" => job.when = Some(self.when(v)?),
                "env" => job.env = self.string_map(v, true)?,
                "labels" => job.labels = self.string_map(v, false)?,
                _ => job.timeout = Some(self.duration(v)?),
            }
        }
        let Some(steps) = steps else {
            return serde_fail(n, de::value::Error::missing_field("steps"));
        };
        Ok(RawJob { steps, ..job })
    }

    /// `depends_on`: a list of job names, or one name; nothing is none.
    fn deps(&self, n: &N, job: &str) -> R<Vec<String>> {
        let mut deps = Vec::new();
        let mut seen = HashSet::new();
        match self.any(n) {
            Any::Null => {}
            Any::Str(dep) => {
                self.check_dep(job, &dep, &seen).or_else(|e| fail(n, e))?;
                deps.push(dep.into_owned());
            }
            Any::Seq(items) => {
                for item in items {
                    let dep = self.str(item, "a job name")?;
                    self.check_dep(job, &dep, &seen)
                        .or_else(|e| fail(item, e))?;
                    seen.insert(dep.clone());
                    deps.push(dep);
                }
            }
            _ => {
                return self.invalid(
                    n,
                    "a job name or a list of job names \
                     (quote a name that YAML reads as a number or a bool)",
                );
            }
        }
        Ok(deps)
    }

    /// Checks that `job` may depend on `dep`, given its earlier dependencies.
    fn check_dep(&self, job: &str, dep: &str, seen: &HashSet<String>) -> Result<(), String> {
        if dep == job {
            return Err(cycle_message(&[job, job]));
        }
        if seen.contains(dep) {
            return Err(format!("duplicate dependency {}", quote(dep)));
        }
        let Some(outline) = &self.outline else {
            return Ok(());
        };
        let Some(d) = outline.job(dep) else {
            return Err(unknown_job_message(dep, &outline.names));
        };
        if let Some(i) = outline.job(job)
            && let Some(cycle) = outline.cycle(i, d)
        {
            return Err(cycle_message(&cycle));
        }
        Ok(())
    }

    /// `matrix`: a non-empty mapping of axis names to non-empty lists of
    /// distinct scalars.
    fn matrix(&self, n: &N, job: &str) -> R<BTreeMap<String, Vec<String>>> {
        const EMPTY: &str =
            "`matrix` is empty; expected a mapping of axis names to lists of values";
        let entries = self.mapping(
            n,
            EMPTY,
            "a mapping of matrix axis names to lists of values",
        )?;
        let mut axes: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (k, v) in entries {
            let axis = self.str(k, "a matrix axis name")?;
            self.check_axis(&axis, &axes).or_else(|e| fail(k, e))?;
            let values = self.axis_values(v, &axis)?;
            axes.insert(axis, values);
        }
        if axes.is_empty() {
            return fail(n, EMPTY);
        }
        let cells = cells_of(&axes);
        if cells > MAX_MATRIX_CELLS as u64 {
            return fail(n, too_many_cells_message(job, cells));
        }
        Ok(axes)
    }

    fn check_axis(&self, v: &str, axes: &BTreeMap<String, Vec<String>>) -> Result<(), String> {
        if !is_valid_env_name(v) || v.len() > MAX_MATRIX_TEXT {
            return Err(format!(
                "invalid matrix axis name {}, expected at most {MAX_MATRIX_TEXT} characters \
                 matching `[A-Za-z_][A-Za-z0-9_]*` (the axis is set as the environment \
                 variable of its upper-cased name)",
                quote(v)
            ));
        }
        if axes.contains_key(v) {
            return Err(format!("duplicate matrix axis {}", quote(v)));
        }
        let var = v.to_ascii_uppercase();
        if let Some(other) = axes.keys().find(|a| a.to_ascii_uppercase() == var) {
            return Err(format!(
                "matrix axes {} and {} would both set the variable {}",
                quote(other),
                quote(v),
                quote(&var)
            ));
        }
        if axes.len() >= MAX_MATRIX_AXES {
            return Err(format!("more than {MAX_MATRIX_AXES} matrix axes"));
        }
        Ok(())
    }

    fn axis_values(&self, n: &N, axis: &str) -> R<Vec<String>> {
        let none = format!(
            "matrix axis {} has no values; expected a non-empty list",
            quote(axis)
        );
        let items = self.list(n, &none, "a list of values (strings, numbers or bools)")?;
        let mut values: Vec<String> = Vec::new();
        for item in items {
            let v = self.text_or_empty(item, "a matrix value (a string, number or bool)")?;
            let problem = if values.len() >= MAX_MATRIX_CELLS {
                Some(format!(
                    "matrix axis {} has more than {MAX_MATRIX_CELLS} values, the most cells \
                     a matrix may have",
                    quote(axis)
                ))
            } else if v.trim().is_empty() {
                Some(format!("empty value in matrix axis {}", quote(axis)))
            } else if v.chars().count() > MAX_MATRIX_TEXT
                || v.contains(',')
                || v.chars().any(char::is_control)
            {
                Some(format!(
                    "invalid matrix value {}, expected at most {MAX_MATRIX_TEXT} characters \
                     without commas or control characters",
                    quote(&v)
                ))
            } else if values.contains(&v) {
                Some(format!(
                    "duplicate value {} in matrix axis {}",
                    quote(&v),
                    quote(axis)
                ))
            } else {
                None
            };
            if let Some(problem) = problem {
                return fail(item, problem);
            }
            values.push(v);
        }
        if values.is_empty() {
            return fail(n, none);
        }
        Ok(values)
    }

    /// `when`: only `branch` today.
    fn when(&self, n: &N) -> R<Vec<String>> {
        let entries = self.mapping(
            n,
            "`when` is empty; expected a condition such as `branch: main`",
            "a mapping of conditions, such as `{branch: main}`",
        )?;
        let mut seen = Vec::new();
        let mut branch = None;
        for (k, v) in entries {
            self.field(k, &["branch"], &mut seen, &|_| None)?;
            branch = Some(self.patterns(
                v,
                "a branch pattern or a list of branch patterns \
                 (quote a pattern that YAML reads as a number or a bool)",
                "a branch pattern",
                "`branch` is empty; expected a branch pattern or a list of them",
                &|p| {
                    kiln_domain::BranchPattern::new(p)
                        .map(drop)
                        .map_err(|m| format!("invalid branch pattern {}: {m}", quote(p)))
                },
            )?);
        }
        match branch {
            Some(branch) => Ok(branch),
            None => serde_fail(n, de::value::Error::missing_field("branch")),
        }
    }
}

/// Whether `name` is a valid step or job name.
fn is_valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

fn invalid_name(what: &str, name: &str) -> String {
    format!(
        "invalid {what} name {}, expected 1 to {MAX_NAME_LEN} characters \
         of `A-Z`, `a-z`, `0-9`, `_`, `.` and `-`",
        quote(name)
    )
}

/// Whether `name` is a valid environment variable name.
fn is_valid_env_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    bytes
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// The number of cells of a matrix (1 without a matrix), saturating.
pub(crate) fn cells_of(matrix: &BTreeMap<String, Vec<String>>) -> u64 {
    matrix.values().fold(1u64, |cells, values| {
        cells.saturating_mul(u64::try_from(values.len()).unwrap_or(u64::MAX))
    })
}

fn too_many_cells_message(job: &str, cells: u64) -> String {
    let count = if cells == u64::MAX {
        "too many".to_owned()
    } else {
        cells.to_string()
    };
    format!(
        "the matrix of job {} has {count} cells (the product of the numbers of values \
         of its axes), more than the limit of {MAX_MATRIX_CELLS}",
        quote(job)
    )
}

/// The message for a `depends_on` naming no job.
pub(crate) fn unknown_job_message(dep: &str, names: &[String]) -> String {
    let mut listed: Vec<String> = names.iter().take(MAX_LISTED).map(|n| quote(n)).collect();
    if names.len() > MAX_LISTED {
        listed.push("...".to_owned());
    }
    format!(
        "unknown job {} in `depends_on`; the jobs of the file are {}",
        quote(dep),
        listed.join(", ")
    )
}

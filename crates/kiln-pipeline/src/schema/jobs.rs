//! Deserialization of the `jobs` mapping.
//!
//! Same principles as the parent module: every check runs in the visitor of
//! the offending node. The checks that depend on other jobs use the
//! [`Outline`]: an unknown job in `depends_on` and a dependency that closes a
//! cycle are reported at that `depends_on` value (for a cycle, at the first
//! value in the file that closes one), a matrix with too many cells at its
//! `matrix` key, and a file expanding to too many jobs at the key of the job
//! that goes over the limit. Without an outline (the file has a shape error
//! that the visitors will report), the same checks run at the end of `jobs`,
//! as a safety net.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::time::Duration;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};

use super::{
    DurationSeed, EnvSeed, FieldSeed, LabelsSeed, MAX_NAME_LEN, RawStep, StepsSeed,
    is_valid_env_name, is_valid_step_name, quote,
};
use crate::outline::Outline;
use crate::planner::{Budget, Shape, check_graph, cycle_message, shards_of};
use crate::{MAX_MATRIX_AXES, MAX_MATRIX_CELLS};

/// Keys allowed in a job.
pub(crate) const JOB_FIELDS: &[&str] = &[
    "steps",
    "depends_on",
    "matrix",
    "env",
    "labels",
    "timeout",
    "when",
];
/// Keys allowed in `when`.
pub(crate) const WHEN_FIELDS: &[&str] = &["branch"];
/// Longest matrix axis name and value, in characters.
const MAX_MATRIX_TEXT: usize = 64;
/// How many job names an "unknown job" message lists.
const MAX_LISTED: usize = 10;

/// A job as written.
#[derive(Debug)]
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

/// The number of cells of a matrix (1 without a matrix), saturating.
pub(crate) fn cells_of(matrix: &BTreeMap<String, Vec<String>>) -> u64 {
    matrix.values().fold(1u64, |cells, values| {
        cells.saturating_mul(u64::try_from(values.len()).unwrap_or(u64::MAX))
    })
}

// ---------------------------------------------------------------------------
// jobs

/// `jobs`: a non-empty mapping of job names to jobs.
pub(crate) struct JobsSeed<'a> {
    pub(crate) outline: Option<&'a Outline>,
}

impl<'de> DeserializeSeed<'de> for JobsSeed<'_> {
    type Value = Vec<RawJob>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for JobsSeed<'_> {
    type Value = Vec<RawJob>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a mapping of job names to jobs")
    }

    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        Err(E::custom(
            "`jobs` is empty; at least one job with `steps` is needed",
        ))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        self.visit_none()
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut names = BTreeMap::new();
        let mut budget = Budget::default();
        let mut jobs: Vec<RawJob> = Vec::new();
        while let Some(name) = map.next_key_seed(JobNameSeed {
            number: jobs.len() + 1,
            names: &mut names,
            outline: self.outline,
            budget: &mut budget,
        })? {
            let job = map.next_value_seed(JobSeed {
                name,
                outline: self.outline,
            })?;
            jobs.push(job);
        }
        if jobs.is_empty() {
            return self.visit_none();
        }
        // Normally checked above, value by value; here for a file read
        // without an outline.
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
        check_graph(&shapes).map_err(de::Error::custom)?;
        Ok(jobs)
    }
}

/// A job name (same rules as a step name), unique in the file; with an
/// outline, also checks that the jobs up to this one stay within the
/// expansion limits (matrix cells times shards).
struct JobNameSeed<'a> {
    number: usize,
    names: &'a mut BTreeMap<String, usize>,
    outline: Option<&'a Outline>,
    budget: &'a mut Budget,
}

impl<'de> DeserializeSeed<'de> for JobNameSeed<'_> {
    type Value = String;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl Visitor<'_> for JobNameSeed<'_> {
    type Value = String;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a job name")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        if !is_valid_step_name(v) {
            return Err(E::custom(format!(
                "invalid job name {}, expected 1 to {MAX_NAME_LEN} characters \
                 of `A-Z`, `a-z`, `0-9`, `_`, `.` and `-`",
                quote(v)
            )));
        }
        if let Some(first) = self.names.get(v) {
            return Err(E::custom(format!(
                "duplicate job name {}, already used by job {first}",
                quote(v)
            )));
        }
        // A matrix over its own limit is reported at its `matrix` key.
        if let Some(outline) = self.outline
            && let Some(i) = outline.job(v)
            && outline.cells(i) <= MAX_MATRIX_CELLS as u64
        {
            let dep_jobs = outline
                .deps(i)
                .iter()
                .fold(0u64, |sum, &d| sum.saturating_add(outline.planned(d)));
            self.budget
                .add(v, outline.planned(i), outline.steps(i), dep_jobs)
                .map_err(E::custom)?;
        }
        self.names.insert(v.to_owned(), self.number);
        Ok(v.to_owned())
    }
}

// ---------------------------------------------------------------------------
// A job

/// One job, named `name`.
struct JobSeed<'a> {
    name: String,
    outline: Option<&'a Outline>,
}

impl<'de> DeserializeSeed<'de> for JobSeed<'_> {
    type Value = RawJob;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for JobSeed<'_> {
    type Value = RawJob;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a job: a mapping with `steps`")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let too_many_cells = self
            .outline
            .and_then(|outline| outline.job(&self.name).map(|i| outline.cells(i)))
            .filter(|&cells| cells > MAX_MATRIX_CELLS as u64)
            .map(|cells| ("matrix", too_many_cells_message(&self.name, cells)));
        let mut seen = Vec::new();
        let mut steps = None;
        let mut depends_on = Vec::new();
        let mut matrix = BTreeMap::new();
        let mut when = None;
        let mut env = BTreeMap::new();
        let mut labels = BTreeMap::new();
        let mut timeout = None;
        while let Some(field) = map.next_key_seed(FieldSeed {
            fields: JOB_FIELDS,
            seen: &mut seen,
            refuse: too_many_cells.clone().into_iter().collect(),
        })? {
            match field {
                "steps" => steps = Some(map.next_value_seed(StepsSeed)?),
                "depends_on" => {
                    depends_on = map.next_value_seed(DepsSeed {
                        job: &self.name,
                        outline: self.outline,
                    })?;
                }
                "matrix" => {
                    matrix = map.next_value_seed(MatrixSeed { job: &self.name })?;
                }
                "when" => when = Some(map.next_value_seed(WhenSeed)?),
                "env" => env = map.next_value_seed(EnvSeed)?,
                "labels" => labels = map.next_value_seed(LabelsSeed)?,
                "timeout" => timeout = Some(map.next_value_seed(DurationSeed)?),
                other => return Err(de::Error::unknown_field(other, JOB_FIELDS)),
            }
        }
        Ok(RawJob {
            steps: steps.ok_or_else(|| de::Error::missing_field("steps"))?,
            name: self.name,
            depends_on,
            matrix,
            when,
            env,
            labels,
            timeout,
        })
    }
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

// ---------------------------------------------------------------------------
// depends_on

/// `depends_on`: a list of job names, or one name; nothing is no
/// dependency.
struct DepsSeed<'a> {
    job: &'a str,
    outline: Option<&'a Outline>,
}

impl<'de> DeserializeSeed<'de> for DepsSeed<'_> {
    type Value = Vec<String>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for DepsSeed<'_> {
    type Value = Vec<String>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(
            "a job name or a list of job names \
             (quote a name that YAML reads as a number or a bool)",
        )
    }

    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(Vec::new())
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(Vec::new())
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        check_dep(self.job, v, &HashSet::new(), self.outline).map_err(E::custom)?;
        Ok(vec![v.to_owned()])
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut deps = Vec::new();
        let mut seen = HashSet::new();
        while let Some(dep) = seq.next_element_seed(DepSeed {
            job: self.job,
            seen: &seen,
            outline: self.outline,
        })? {
            seen.insert(dep.clone());
            deps.push(dep);
        }
        Ok(deps)
    }
}

/// One name in a `depends_on` list.
struct DepSeed<'a> {
    job: &'a str,
    seen: &'a HashSet<String>,
    outline: Option<&'a Outline>,
}

impl<'de> DeserializeSeed<'de> for DepSeed<'_> {
    type Value = String;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl Visitor<'_> for DepSeed<'_> {
    type Value = String;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a job name")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        check_dep(self.job, v, self.seen, self.outline).map_err(E::custom)?;
        Ok(v.to_owned())
    }
}

/// Checks that `job` may depend on `dep`, given its earlier dependencies.
fn check_dep(
    job: &str,
    dep: &str,
    seen: &HashSet<String>,
    outline: Option<&Outline>,
) -> Result<(), String> {
    if dep == job {
        return Err(cycle_message(&[job, job]));
    }
    if seen.contains(dep) {
        return Err(format!("duplicate dependency {}", quote(dep)));
    }
    let Some(outline) = outline else {
        return Ok(());
    };
    let Some(d) = outline.job(dep) else {
        return Err(unknown_job_message(dep, outline.names()));
    };
    if let Some(i) = outline.job(job)
        && let Some(cycle) = outline.cycle(i, d)
    {
        return Err(cycle_message(&cycle));
    }
    Ok(())
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

// ---------------------------------------------------------------------------
// matrix

/// `matrix`: a non-empty mapping of axis names to non-empty lists of values.
struct MatrixSeed<'a> {
    job: &'a str,
}

impl<'de> DeserializeSeed<'de> for MatrixSeed<'_> {
    type Value = BTreeMap<String, Vec<String>>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for MatrixSeed<'_> {
    type Value = BTreeMap<String, Vec<String>>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a mapping of matrix axis names to lists of values")
    }

    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        Err(E::custom(
            "`matrix` is empty; expected a mapping of axis names to lists of values",
        ))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        self.visit_none()
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut axes = BTreeMap::new();
        while let Some(axis) = map.next_key_seed(AxisSeed { axes: &axes })? {
            let values = map.next_value_seed(AxisValuesSeed { axis: &axis })?;
            axes.insert(axis, values);
        }
        if axes.is_empty() {
            return self.visit_none();
        }
        let cells = cells_of(&axes);
        if cells > MAX_MATRIX_CELLS as u64 {
            return Err(de::Error::custom(too_many_cells_message(self.job, cells)));
        }
        Ok(axes)
    }
}

/// An axis name: a valid environment variable name, at most 64 characters,
/// unique in the matrix even after upper-casing.
struct AxisSeed<'a> {
    axes: &'a BTreeMap<String, Vec<String>>,
}

impl<'de> DeserializeSeed<'de> for AxisSeed<'_> {
    type Value = String;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl Visitor<'_> for AxisSeed<'_> {
    type Value = String;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a matrix axis name")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        if !is_valid_env_name(v) || v.len() > MAX_MATRIX_TEXT {
            return Err(E::custom(format!(
                "invalid matrix axis name {}, expected at most {MAX_MATRIX_TEXT} characters \
                 matching `[A-Za-z_][A-Za-z0-9_]*` (the axis is set as the environment \
                 variable of its upper-cased name)",
                quote(v)
            )));
        }
        if self.axes.contains_key(v) {
            return Err(E::custom(format!("duplicate matrix axis {}", quote(v))));
        }
        let var = v.to_ascii_uppercase();
        if let Some(other) = self.axes.keys().find(|a| a.to_ascii_uppercase() == var) {
            return Err(E::custom(format!(
                "matrix axes {} and {} would both set the variable {}",
                quote(other),
                quote(v),
                quote(&var)
            )));
        }
        if self.axes.len() >= MAX_MATRIX_AXES {
            return Err(E::custom(format!(
                "more than {MAX_MATRIX_AXES} matrix axes"
            )));
        }
        Ok(v.to_owned())
    }
}

/// The values of an axis: a non-empty list of distinct scalars.
struct AxisValuesSeed<'a> {
    axis: &'a str,
}

impl<'de> DeserializeSeed<'de> for AxisValuesSeed<'_> {
    type Value = Vec<String>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for AxisValuesSeed<'_> {
    type Value = Vec<String>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a list of values (strings, numbers or bools)")
    }

    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        Err(E::custom(format!(
            "matrix axis {} has no values; expected a non-empty list",
            quote(self.axis)
        )))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        self.visit_none()
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut values = Vec::new();
        while let Some(value) = seq.next_element_seed(MatrixValueSeed {
            axis: self.axis,
            seen: &values,
        })? {
            values.push(value);
        }
        if values.is_empty() {
            return self.visit_none();
        }
        Ok(values)
    }
}

/// A value of an axis, taken as written (`3.10` stays `3.10`): not blank,
/// at most 64 characters, without a comma (it would make job names
/// ambiguous) or control characters, and not given twice.
struct MatrixValueSeed<'a> {
    axis: &'a str,
    seen: &'a [String],
}

impl<'de> DeserializeSeed<'de> for MatrixValueSeed<'_> {
    type Value = String;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_option(self)
    }
}

impl<'de> Visitor<'de> for MatrixValueSeed<'_> {
    type Value = String;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a matrix value (a string, number or bool)")
    }

    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        self.visit_str("")
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        self.visit_str("")
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        // serde_norway's `deserialize_str` gives any scalar's text as written.
        deserializer.deserialize_str(self)
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        if self.seen.len() >= MAX_MATRIX_CELLS {
            return Err(E::custom(format!(
                "matrix axis {} has more than {MAX_MATRIX_CELLS} values, the most cells \
                 a matrix may have",
                quote(self.axis)
            )));
        }
        if v.trim().is_empty() {
            return Err(E::custom(format!(
                "empty value in matrix axis {}",
                quote(self.axis)
            )));
        }
        if v.chars().count() > MAX_MATRIX_TEXT || v.contains(',') || v.chars().any(char::is_control)
        {
            return Err(E::custom(format!(
                "invalid matrix value {}, expected at most {MAX_MATRIX_TEXT} characters \
                 without commas or control characters",
                quote(v)
            )));
        }
        if self.seen.iter().any(|s| s == v) {
            return Err(E::custom(format!(
                "duplicate value {} in matrix axis {}",
                quote(v),
                quote(self.axis)
            )));
        }
        Ok(v.to_owned())
    }
}

// ---------------------------------------------------------------------------
// when

/// `when`: the conditions of a job; only `branch` today.
struct WhenSeed;

impl<'de> DeserializeSeed<'de> for WhenSeed {
    type Value = Vec<String>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for WhenSeed {
    type Value = Vec<String>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a mapping of conditions, such as `{branch: main}`")
    }

    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        Err(E::custom(
            "`when` is empty; expected a condition such as `branch: main`",
        ))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        self.visit_none()
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut seen = Vec::new();
        let mut branch = None;
        while let Some(field) = map.next_key_seed(FieldSeed {
            fields: WHEN_FIELDS,
            seen: &mut seen,
            refuse: Vec::new(),
        })? {
            match field {
                "branch" => branch = Some(map.next_value_seed(PatternsSeed)?),
                other => return Err(de::Error::unknown_field(other, WHEN_FIELDS)),
            }
        }
        branch.ok_or_else(|| de::Error::missing_field("branch"))
    }
}

/// `when.branch`: a branch pattern or a non-empty list of them.
struct PatternsSeed;

impl<'de> DeserializeSeed<'de> for PatternsSeed {
    type Value = Vec<String>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for PatternsSeed {
    type Value = Vec<String>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(
            "a branch pattern or a list of branch patterns \
             (quote a pattern that YAML reads as a number or a bool)",
        )
    }

    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        Err(E::custom(
            "`branch` is empty; expected a branch pattern or a list of them",
        ))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        self.visit_none()
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        PatternSeed.visit_str(v).map(|p| vec![p])
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut patterns = Vec::new();
        while let Some(pattern) = seq.next_element_seed(PatternSeed)? {
            patterns.push(pattern);
        }
        if patterns.is_empty() {
            return self.visit_none();
        }
        Ok(patterns)
    }
}

/// One branch pattern (see [`crate::glob`]).
struct PatternSeed;

impl<'de> DeserializeSeed<'de> for PatternSeed {
    type Value = String;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl Visitor<'_> for PatternSeed {
    type Value = String;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a branch pattern")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        kiln_domain::BranchPattern::new(v).map_err(|message| {
            E::custom(format!("invalid branch pattern {}: {message}", quote(v)))
        })?;
        Ok(v.to_owned())
    }
}

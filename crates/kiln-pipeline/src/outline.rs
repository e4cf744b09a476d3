//! A first, lenient reading of the `jobs` of a file: their names, their
//! dependencies, the sizes of their matrices, the numbers of their steps and
//! of the shards of their split steps (`parallel`).
//!
//! The schema visitors read the file in one pass, in document order, but a
//! `depends_on` may name a job defined further down, and whether it closes a
//! cycle depends on the jobs after it. Reading this outline first lets the
//! visitors report an unknown dependency or a cycle at the offending
//! `depends_on` value, and a matrix or a file that expands to too many jobs
//! at its key, with serde_norway's location of that node.
//!
//! The outline reads names as the schema visitors do (`deserialize_str`,
//! which gives any scalar's text as written) and takes anything else of an
//! unexpected type as empty, so it reads whatever the visitors accept, with
//! the same result. It fails only where the visitors fail too (a key or a
//! dependency that is not a scalar, an unexpected YAML tag); the caller then
//! reads the file without an outline, and the cross-job checks run at the
//! end of `jobs` instead, after the visitors reported the shape error. Of a
//! job or a key given twice it keeps the first, which is what the visitors
//! read before they reject the second one.

use std::collections::{HashMap, HashSet};
use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

use crate::{MAX_SHARDS, graph};

/// The jobs of a file, in file order (first definitions only).
#[derive(Debug, Default)]
pub(crate) struct Outline {
    names: Vec<String>,
    index: HashMap<String, usize>,
    /// The known dependencies of every job (unknown names and repetitions
    /// left out).
    deps: Vec<Vec<usize>>,
    /// Number of matrix cells of every job (1 without a matrix), saturating.
    cells: Vec<u64>,
    /// Number of steps of every job.
    steps: Vec<u64>,
    /// Number of shards of every job (its split step's `parallel`, 1
    /// without one).
    shards: Vec<u64>,
    /// Strongly connected component of every job.
    comp: Vec<usize>,
}

impl Outline {
    /// Reads the outline of `text`, or `None` if the file does not have the
    /// expected shape (the schema visitors will say why).
    pub(crate) fn read(text: &str) -> Option<Self> {
        let raw = DocSeed
            .deserialize(serde_norway::Deserializer::from_str(text))
            .ok()?;
        let mut outline = Self::default();
        for job in &raw {
            outline.index.insert(job.name.clone(), outline.names.len());
            outline.names.push(job.name.clone());
        }
        for job in raw {
            let mut seen = HashSet::new();
            let deps = job
                .deps
                .iter()
                .filter_map(|d| outline.index.get(d).copied())
                .filter(|&d| seen.insert(d))
                .collect();
            outline.deps.push(deps);
            outline.cells.push(job.cells);
            outline.steps.push(job.steps);
            outline.shards.push(job.shards);
        }
        outline.comp = graph::components(&outline.deps);
        Some(outline)
    }

    /// The index of the job `name`.
    pub(crate) fn job(&self, name: &str) -> Option<usize> {
        self.index.get(name).copied()
    }

    /// The names of the jobs, in file order.
    pub(crate) fn names(&self) -> &[String] {
        &self.names
    }

    /// Number of matrix cells of job `i` (saturating).
    pub(crate) fn cells(&self, i: usize) -> u64 {
        self.cells[i]
    }

    /// Number of steps of job `i`.
    pub(crate) fn steps(&self, i: usize) -> u64 {
        self.steps[i]
    }

    /// Number of jobs job `i` is planned as: its matrix cells times the
    /// shards of its split step (saturating).
    pub(crate) fn planned(&self, i: usize) -> u64 {
        self.cells[i].saturating_mul(self.shards[i])
    }

    /// The known dependencies of job `i`.
    pub(crate) fn deps(&self, i: usize) -> &[usize] {
        &self.deps[i]
    }

    /// If job `from` depending on job `to` closes a cycle, the cycle as job
    /// names, `[from, to, ..., from]`.
    pub(crate) fn cycle(&self, from: usize, to: usize) -> Option<Vec<&str>> {
        if !graph::on_cycle(&self.comp, from, to) {
            return None;
        }
        let mut cycle = vec![from];
        cycle.extend(graph::path(&self.deps, to, from)?);
        Some(cycle.into_iter().map(|i| self.names[i].as_str()).collect())
    }
}

/// Visitor methods taking values of other types than expected as `$value`
/// (after skipping their content).
macro_rules! tolerate {
    (numbers => $value:expr) => {
        fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
            Ok($value)
        }
        fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
            Ok($value)
        }
        fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
            Ok($value)
        }
        fn visit_i128<E: de::Error>(self, _: i128) -> Result<Self::Value, E> {
            Ok($value)
        }
        fn visit_u128<E: de::Error>(self, _: u128) -> Result<Self::Value, E> {
            Ok($value)
        }
        fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
            Ok($value)
        }
    };
    (str => $value:expr) => {
        fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
            Ok($value)
        }
    };
    (null => $value:expr) => {
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok($value)
        }
        fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok($value)
        }
    };
    (seq => $value:expr) => {
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            while seq.next_element::<IgnoredAny>()?.is_some() {}
            Ok($value)
        }
    };
    (map => $value:expr) => {
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
            Ok($value)
        }
    };
}

/// A job as the outline reads it.
struct RawJob {
    name: String,
    deps: Vec<String>,
    cells: u64,
    steps: u64,
    shards: u64,
}

/// A string (scalar text as written), for keys and names.
struct Text;

impl<'de> DeserializeSeed<'de> for Text {
    type Value = String;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<String, D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl Visitor<'_> for Text {
    type Value = String;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<String, E> {
        Ok(v.to_owned())
    }
}

/// The top level: only `jobs` is read.
struct DocSeed;

impl<'de> DeserializeSeed<'de> for DocSeed {
    type Value = Vec<RawJob>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for DocSeed {
    type Value = Vec<RawJob>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a mapping")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut jobs = None;
        while let Some(key) = map.next_key_seed(Text)? {
            if key == "jobs" && jobs.is_none() {
                jobs = Some(map.next_value_seed(JobsSeed)?);
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(jobs.unwrap_or_default())
    }
}

/// `jobs`.
struct JobsSeed;

impl<'de> DeserializeSeed<'de> for JobsSeed {
    type Value = Vec<RawJob>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for JobsSeed {
    type Value = Vec<RawJob>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a mapping of jobs")
    }

    tolerate!(numbers => Vec::new());
    tolerate!(str => Vec::new());
    tolerate!(seq => Vec::new());

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(Vec::new())
    }

    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(Vec::new())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut jobs: Vec<RawJob> = Vec::new();
        let mut seen = HashSet::new();
        while let Some(name) = map.next_key_seed(Text)? {
            if seen.insert(name.clone()) {
                let mut job = map.next_value_seed(JobSeed)?;
                job.name = name;
                jobs.push(job);
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(jobs)
    }
}

/// One job.
struct JobSeed;

impl<'de> DeserializeSeed<'de> for JobSeed {
    type Value = RawJob;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl RawJob {
    fn empty() -> Self {
        Self {
            name: String::new(),
            deps: Vec::new(),
            cells: 1,
            steps: 0,
            shards: 1,
        }
    }
}

impl<'de> Visitor<'de> for JobSeed {
    type Value = RawJob;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a job")
    }

    tolerate!(numbers => RawJob::empty());
    tolerate!(str => RawJob::empty());
    tolerate!(null => RawJob::empty());
    tolerate!(seq => RawJob::empty());

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut job = RawJob::empty();
        let mut seen = Vec::new();
        while let Some(key) = map.next_key_seed(Text)? {
            if seen.contains(&key) {
                map.next_value::<IgnoredAny>()?;
                continue;
            }
            match key.as_str() {
                "depends_on" => job.deps = map.next_value_seed(DepsSeed)?,
                "matrix" => job.cells = map.next_value_seed(MatrixSeed)?,
                "steps" => (job.steps, job.shards) = map.next_value_seed(StepsSeed)?,
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
            seen.push(key);
        }
        Ok(job)
    }
}

/// `depends_on`: a list of names, one name, or nothing.
struct DepsSeed;

impl<'de> DeserializeSeed<'de> for DepsSeed {
    type Value = Vec<String>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for DepsSeed {
    type Value = Vec<String>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("job names")
    }

    tolerate!(numbers => Vec::new());
    tolerate!(map => Vec::new());

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(Vec::new())
    }

    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(Vec::new())
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(vec![v.to_owned()])
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut out = Vec::new();
        while let Some(name) = seq.next_element_seed(Text)? {
            out.push(name);
        }
        Ok(out)
    }
}

/// `matrix`: the product of the lengths of the axes (first definitions).
struct MatrixSeed;

impl<'de> DeserializeSeed<'de> for MatrixSeed {
    type Value = u64;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<u64, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for MatrixSeed {
    type Value = u64;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a matrix")
    }

    tolerate!(numbers => 1);
    tolerate!(str => 1);
    tolerate!(null => 1);
    tolerate!(seq => 1);

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<u64, A::Error> {
        let mut seen = Vec::new();
        let mut cells: u64 = 1;
        while let Some(axis) = map.next_key_seed(Text)? {
            if seen.contains(&axis) {
                map.next_value::<IgnoredAny>()?;
                continue;
            }
            cells = cells.saturating_mul(map.next_value_seed(CountSeed)?);
            seen.push(axis);
        }
        Ok(cells)
    }
}

/// `steps`: the number of steps and the largest `parallel` among them (a
/// job has at most one split step), 1 without one.
struct StepsSeed;

impl<'de> DeserializeSeed<'de> for StepsSeed {
    type Value = (u64, u64);

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for StepsSeed {
    type Value = (u64, u64);

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a list of steps")
    }

    tolerate!(numbers => (0, 1));
    tolerate!(str => (0, 1));
    tolerate!(null => (0, 1));
    tolerate!(map => (0, 1));

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut count: u64 = 0;
        let mut shards: u64 = 1;
        while let Some(parallel) = seq.next_element_seed(StepSeed)? {
            count += 1;
            shards = shards.max(parallel);
        }
        Ok((count, shards))
    }
}

/// A step: its `parallel` (first definition), 1 without one.
struct StepSeed;

impl<'de> DeserializeSeed<'de> for StepSeed {
    type Value = u64;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<u64, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for StepSeed {
    type Value = u64;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a step")
    }

    tolerate!(numbers => 1);
    tolerate!(str => 1);
    tolerate!(null => 1);
    tolerate!(seq => 1);

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<u64, A::Error> {
        let mut parallel = None;
        while let Some(key) = map.next_key_seed(Text)? {
            if key == "parallel" && parallel.is_none() {
                parallel = Some(map.next_value_seed(ParallelSeed)?);
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(parallel.unwrap_or(1))
    }
}

/// `v` when it is a valid `parallel`, else 1.
fn shards_or_one(v: u64) -> u64 {
    if (1..=u64::from(MAX_SHARDS)).contains(&v) {
        v
    } else {
        1
    }
}

/// `parallel`: its value when the schema accepts it, else 1 (the schema
/// visitors report it at the value).
struct ParallelSeed;

impl<'de> DeserializeSeed<'de> for ParallelSeed {
    type Value = u64;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<u64, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for ParallelSeed {
    type Value = u64;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a number of shards")
    }

    tolerate!(str => 1);
    tolerate!(null => 1);
    tolerate!(seq => 1);
    tolerate!(map => 1);

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<u64, E> {
        Ok(1)
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<u64, E> {
        Ok(u64::try_from(v).map_or(1, shards_or_one))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<u64, E> {
        Ok(shards_or_one(v))
    }

    fn visit_i128<E: de::Error>(self, _: i128) -> Result<u64, E> {
        Ok(1)
    }

    fn visit_u128<E: de::Error>(self, _: u128) -> Result<u64, E> {
        Ok(1)
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<u64, E> {
        Ok(1)
    }
}

/// The length of a list (an axis); nothing counts as empty.
struct CountSeed;

impl<'de> DeserializeSeed<'de> for CountSeed {
    type Value = u64;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<u64, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for CountSeed {
    type Value = u64;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a list")
    }

    tolerate!(numbers => 0);
    tolerate!(str => 0);
    tolerate!(map => 0);

    fn visit_unit<E: de::Error>(self) -> Result<u64, E> {
        Ok(0)
    }

    fn visit_none<E: de::Error>(self) -> Result<u64, E> {
        Ok(0)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<u64, A::Error> {
        let mut count: u64 = 0;
        while seq.next_element::<IgnoredAny>()?.is_some() {
            count += 1;
        }
        Ok(count)
    }
}

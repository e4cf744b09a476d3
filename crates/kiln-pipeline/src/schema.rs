//! Deserialization of the `.kiln.yml` schema.
//!
//! Every check runs inside a `Visitor` method called by serde_norway for the
//! offending node, so serde_norway attaches that node's line and column to
//! the error (it does so for errors returned while it drives a visitor). That
//! is why the structs are read by hand-written visitors with
//! `DeserializeSeed`s rather than by derived impls: a seed carries what a
//! check needs to know about the rest of the file (the keys already seen in a
//! mapping, the step names already used), so even a duplicate is reported at
//! the second occurrence.
//!
//! Unknown keys are rejected with serde's own message (`unknown field `rn`,
//! expected one of ...`), exactly like `#[serde(deny_unknown_fields)]`, and a
//! key given twice is rejected at its second occurrence. Adding a key in a
//! later version of the schema means adding it to the field list and to the
//! match of its visitor; files valid before stay valid.
//!
//! The checks that need the rest of the file (a `depends_on` naming a job
//! defined further down, a cycle, a file expanding to too many jobs) use the
//! [`Outline`] read beforehand; see [`jobs`] for the `jobs` mapping, and
//! [`split`] for the keys of a split step.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};

use crate::outline::Outline;
use crate::{MAX_PLANNED_STEPS, SplitDef};

pub(crate) mod jobs;
pub(crate) mod split;

pub(crate) use self::jobs::{RawJob, cells_of, unknown_job_message};

/// Keys allowed at the top level of the file.
pub(crate) const TOP_FIELDS: &[&str] = &["version", "env", "labels", "timeout", "steps", "jobs"];
/// Keys allowed in a step.
pub(crate) const STEP_FIELDS: &[&str] = &[
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

/// The only `version` this crate understands.
const VERSION: &str = "1";
/// Longest allowed step (and job) name, in characters.
const MAX_NAME_LEN: usize = 64;
/// Longest piece of user text quoted back in an error message.
const MAX_QUOTE: usize = 80;

/// The file as written, before the top-level defaults are applied.
#[derive(Debug)]
pub(crate) struct RawPipeline {
    pub(crate) env: BTreeMap<String, String>,
    pub(crate) labels: BTreeMap<String, String>,
    pub(crate) timeout: Option<Duration>,
    /// The steps of a `steps:` file; empty for a `jobs:` file.
    pub(crate) steps: Vec<RawStep>,
    /// The jobs of a `jobs:` file, in file order; empty for a `steps:` file.
    pub(crate) jobs: Vec<RawJob>,
}

/// A step as written.
#[derive(Debug)]
pub(crate) struct RawStep {
    pub(crate) name: String,
    pub(crate) run: String,
    pub(crate) env: BTreeMap<String, String>,
    pub(crate) timeout: Option<Duration>,
    pub(crate) labels: BTreeMap<String, String>,
    pub(crate) post: Option<crate::Post>,
    pub(crate) split: Option<SplitDef>,
    pub(crate) junit: Vec<String>,
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

// ---------------------------------------------------------------------------
// Mapping keys

/// Reads a key of a struct-like mapping: rejects unknown keys and keys given
/// twice, and returns the key's entry of `fields`.
struct FieldSeed<'a> {
    fields: &'static [&'static str],
    seen: &'a mut Vec<&'static str>,
    /// Keys rejected with a message (checked after the two rules above), so
    /// that an error about a whole entry is reported at its key.
    refuse: Vec<(&'static str, String)>,
}

impl<'de> DeserializeSeed<'de> for FieldSeed<'_> {
    type Value = &'static str;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl Visitor<'_> for FieldSeed<'_> {
    type Value = &'static str;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a key name")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        let Some(field) = self.fields.iter().copied().find(|field| *field == v) else {
            return Err(E::unknown_field(v, self.fields));
        };
        if self.seen.contains(&field) {
            return Err(E::duplicate_field(field));
        }
        if let Some((_, message)) = self.refuse.into_iter().find(|(key, _)| *key == field) {
            return Err(E::custom(message));
        }
        self.seen.push(field);
        Ok(field)
    }
}

// ---------------------------------------------------------------------------
// Top level

/// Reads the whole document, with the [`Outline`] of its jobs when it could
/// be read.
pub(crate) struct DocumentSeed<'a> {
    pub(crate) outline: Option<&'a Outline>,
}

impl<'de> DeserializeSeed<'de> for DocumentSeed<'_> {
    type Value = RawPipeline;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for DocumentSeed<'_> {
    type Value = RawPipeline;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a mapping at the top level, with a `steps` list or a `jobs` mapping")
    }

    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        Err(E::custom(
            "the file holds no pipeline; it must be a mapping with a non-empty `steps` list \
             or `jobs` mapping",
        ))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        self.visit_none()
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut seen = Vec::new();
        let mut env = BTreeMap::new();
        let mut labels = BTreeMap::new();
        let mut timeout = None;
        let mut steps = None;
        let mut jobs = None;
        loop {
            let refuse = match (&steps, &jobs) {
                (Some(_), _) => Some((
                    "jobs",
                    "`jobs` cannot be used with `steps`: a file has either a `steps` list \
                     (one job) or a `jobs` mapping",
                )),
                (_, Some(_)) => Some((
                    "steps",
                    "`steps` cannot be used with `jobs`: a file has either a `steps` list \
                     (one job) or a `jobs` mapping, whose jobs have their own `steps`",
                )),
                _ => None,
            };
            let Some(field) = map.next_key_seed(FieldSeed {
                fields: TOP_FIELDS,
                seen: &mut seen,
                refuse: refuse
                    .map(|(key, message)| (key, message.to_owned()))
                    .into_iter()
                    .collect(),
            })?
            else {
                break;
            };
            match field {
                "version" => map.next_value_seed(VersionSeed)?,
                "env" => env = map.next_value_seed(EnvSeed)?,
                "labels" => labels = map.next_value_seed(LabelsSeed)?,
                "timeout" => timeout = Some(map.next_value_seed(DurationSeed)?),
                "steps" => steps = Some(map.next_value_seed(StepsSeed)?),
                "jobs" => {
                    jobs = Some(map.next_value_seed(jobs::JobsSeed {
                        outline: self.outline,
                    })?);
                }
                other => return Err(de::Error::unknown_field(other, TOP_FIELDS)),
            }
        }
        if steps.is_none() && jobs.is_none() {
            return Err(de::Error::custom("missing field `steps` or `jobs`"));
        }
        Ok(RawPipeline {
            env,
            labels,
            timeout,
            steps: steps.unwrap_or_default(),
            jobs: jobs.unwrap_or_default(),
        })
    }
}

/// `version`: only `1` is accepted.
struct VersionSeed;

impl<'de> DeserializeSeed<'de> for VersionSeed {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        // `deserialize_str` hands over the scalar's text as written.
        deserializer.deserialize_str(self)
    }
}

impl Visitor<'_> for VersionSeed {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the pipeline file version `1`")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<(), E> {
        if v.trim() == VERSION {
            Ok(())
        } else {
            Err(E::custom(format!(
                "unsupported `version` {}, expected `1` (or no `version` key)",
                quote(v)
            )))
        }
    }
}

// ---------------------------------------------------------------------------
// Steps

/// `steps`: a non-empty list of steps with unique names.
struct StepsSeed;

impl<'de> DeserializeSeed<'de> for StepsSeed {
    type Value = Vec<RawStep>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for StepsSeed {
    type Value = Vec<RawStep>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a non-empty list of steps")
    }

    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        Err(E::custom(
            "`steps` is empty; at least one step with `name` and `run` is needed",
        ))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        self.visit_none()
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut names = BTreeMap::new();
        let mut steps: Vec<RawStep> = Vec::new();
        // The split step read so far, if any, and its number of shards.
        let mut split: Option<(String, u32)> = None;
        while let Some(step) = seq.next_element_seed(StepSeed {
            number: steps.len() + 1,
            names: &mut names,
            split_step: split.as_ref().map(|(name, _)| name.as_str()),
        })? {
            if let Some(def) = &step.split {
                split = Some((step.name.clone(), def.shards));
            }
            steps.push(step);
        }
        if steps.is_empty() {
            return self.visit_none();
        }
        if steps.iter().all(|s| s.post.is_some()) {
            return Err(de::Error::custom(
                "every step is a `post` step; at least one step must run before them",
            ));
        }
        // Each shard runs every step of the job. (In a `jobs:` file, the
        // budget of the whole file is normally checked before, at the job.)
        if let Some((name, shards)) = &split
            && steps.len().saturating_mul(*shards as usize) > MAX_PLANNED_STEPS
        {
            return Err(de::Error::custom(format!(
                "with `parallel: {shards}` (step {}), the job's shards have more than \
                 {MAX_PLANNED_STEPS} steps in all (every shard runs all the steps of the job)",
                quote(name)
            )));
        }
        Ok(steps)
    }
}

/// One step; `names` maps the names of the earlier steps to their 1-based
/// position, and `split_step` is the name of the earlier split step of the
/// job, if any.
struct StepSeed<'a> {
    number: usize,
    names: &'a mut BTreeMap<String, usize>,
    split_step: Option<&'a str>,
}

impl StepSeed<'_> {
    /// The keys refused in the rest of a step, given what was read of it:
    /// a post step cannot be split, and a job has at most one split step.
    fn refusals(&self, post: bool, split: bool) -> Vec<(&'static str, String)> {
        let mut refuse = Vec::new();
        if post {
            for &key in SPLIT_FIELDS {
                refuse.push((
                    key,
                    format!(
                        "`{key}` cannot be used in a `post` step: a post step is never split \
                         (put the split in a normal step)"
                    ),
                ));
            }
        }
        if split {
            refuse.push((
                "post",
                "`post` cannot be used in a split step (a step with `parallel`, `units` or \
                 `retry`): a post step is never split"
                    .to_owned(),
            ));
        }
        if let Some(first) = self.split_step {
            for key in ["parallel", "units"] {
                refuse.push((
                    key,
                    format!(
                        "step {} of this job is already split: a job has at most one split \
                         step (with `parallel` or `units`)",
                        quote(first)
                    ),
                ));
            }
        }
        refuse
    }
}

impl<'de> DeserializeSeed<'de> for StepSeed<'_> {
    type Value = RawStep;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for StepSeed<'_> {
    type Value = RawStep;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a step: a mapping with `name` and `run`")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut seen = Vec::new();
        let mut name = None;
        let mut run = None;
        let mut env = BTreeMap::new();
        let mut timeout = None;
        let mut labels = BTreeMap::new();
        let mut post = None;
        let mut parallel = None;
        let mut units = None;
        let mut retry = None;
        let mut interaction = None;
        let mut junit = Vec::new();
        loop {
            let refuse = self.refusals(
                post.is_some(),
                parallel.is_some() || units.is_some() || retry.is_some() || interaction.is_some(),
            );
            let Some(field) = map.next_key_seed(FieldSeed {
                fields: STEP_FIELDS,
                seen: &mut seen,
                refuse,
            })?
            else {
                break;
            };
            match field {
                "name" => {
                    name = Some(map.next_value_seed(NameSeed {
                        number: self.number,
                        names: &mut *self.names,
                    })?);
                }
                "run" => run = Some(map.next_value_seed(RunSeed)?),
                "env" => env = map.next_value_seed(EnvSeed)?,
                "timeout" => timeout = Some(map.next_value_seed(DurationSeed)?),
                "labels" => labels = map.next_value_seed(LabelsSeed)?,
                "post" => post = Some(map.next_value_seed(PostSeed)?),
                "parallel" => parallel = Some(map.next_value_seed(split::IntSeed::PARALLEL)?),
                "units" => units = Some(map.next_value_seed(split::UnitsSeed)?),
                "retry" => retry = Some(map.next_value_seed(split::RetrySeed)?),
                "interaction" => {
                    interaction = Some(map.next_value_seed(split::InteractionSeed)?);
                }
                "junit" => junit = map.next_value_seed(JunitSeed)?,
                other => return Err(de::Error::unknown_field(other, STEP_FIELDS)),
            }
        }
        if units.is_none() && interaction.is_some() && parallel.is_none() && retry.is_none() {
            return Err(de::Error::custom(
                "`interaction` needs `units`: it says what a failure between the units of a \
                 split step's batch does",
            ));
        }
        if !junit.is_empty() && (parallel.is_some() || units.is_some() || retry.is_some()) {
            return Err(de::Error::custom(
                "`junit` cannot be used in a split step (a step with `parallel`, `units` or \
                 `retry`): a split step's report comes from its units' JUnit files",
            ));
        }
        let split = match (parallel, units, retry) {
            (None, None, None) => None,
            (Some(shards), None, _) => {
                return Err(de::Error::custom(format!(
                    "`parallel: {shards}` needs `units`: a mapping with `glob` (patterns of \
                     test files) or `command` (a command printing one unit id per line)"
                )));
            }
            (None, None, Some(_)) => {
                return Err(de::Error::custom(
                    "`retry` needs `units`: only the units of a split step run again",
                ));
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
        Ok(RawStep {
            post,
            split,
            junit,
            name: name.ok_or_else(|| de::Error::missing_field("name"))?,
            run: run.ok_or_else(|| de::Error::missing_field("run"))?,
            env,
            timeout,
            labels,
        })
    }
}

/// `junit`: a glob pattern or a non-empty list of them, naming the JUnit XML files the step
/// writes (relative to the checkout, checked like `units.glob`).
struct JunitSeed;

impl<'de> DeserializeSeed<'de> for JunitSeed {
    type Value = Vec<String>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for JunitSeed {
    type Value = Vec<String>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a glob pattern of JUnit XML files or a list of them")
    }

    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        Err(E::custom(
            "`junit` is empty; expected a glob pattern of the JUnit XML files the step writes, \
             such as `reports/*.xml`, or a list of them",
        ))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        self.visit_none()
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        split::GlobSeed.visit_str(v).map(|p| vec![p])
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut patterns = Vec::new();
        while let Some(pattern) = seq.next_element_seed(split::GlobSeed)? {
            if patterns.len() >= MAX_JUNIT_GLOBS {
                return Err(de::Error::custom(format!(
                    "`junit` has more than {MAX_JUNIT_GLOBS} patterns"
                )));
            }
            patterns.push(pattern);
        }
        if patterns.is_empty() {
            return self.visit_none();
        }
        Ok(patterns)
    }
}

/// Most patterns in a step's `junit`.
pub(crate) const MAX_JUNIT_GLOBS: usize = 64;

/// A step name: 1..=64 characters of `[A-Za-z0-9_.-]`, unique in the file.
struct NameSeed<'a> {
    number: usize,
    names: &'a mut BTreeMap<String, usize>,
}

impl<'de> DeserializeSeed<'de> for NameSeed<'_> {
    type Value = String;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl Visitor<'_> for NameSeed<'_> {
    type Value = String;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a step name")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        if !is_valid_step_name(v) {
            return Err(E::custom(format!(
                "invalid step name {}, expected 1 to {MAX_NAME_LEN} characters \
                 of `A-Z`, `a-z`, `0-9`, `_`, `.` and `-`",
                quote(v)
            )));
        }
        if let Some(first) = self.names.get(v) {
            return Err(E::custom(format!(
                "duplicate step name {}, already used by step {first}",
                quote(v)
            )));
        }
        self.names.insert(v.to_owned(), self.number);
        Ok(v.to_owned())
    }
}

/// Whether `name` is a valid step name.
pub(crate) fn is_valid_step_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// `run`: a non-blank string, or a list of strings joined with newlines.
struct RunSeed;

impl<'de> DeserializeSeed<'de> for RunSeed {
    type Value = String;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for RunSeed {
    type Value = String;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(
            "a shell command string or a list of command strings \
             (quote a command that YAML reads as a number or a bool)",
        )
    }

    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        Err(E::custom("`run` is empty, expected a shell command"))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        self.visit_none()
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        if v.trim().is_empty() {
            return self.visit_none();
        }
        check_run_length(v.len())?;
        Ok(v.to_owned())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut lines = Vec::new();
        let mut bytes = 0;
        while let Some(line) = seq.next_element_seed(ScalarTextSeed {
            expecting: "a command string",
        })? {
            // Checked as the lines come: a huge list is not joined first.
            bytes += line.len() + usize::from(!lines.is_empty());
            check_run_length(bytes)?;
            lines.push(line);
        }
        let run = lines.join("\n");
        if run.trim().is_empty() {
            return self.visit_none();
        }
        Ok(run)
    }
}

/// Refuses a `run` longer than [`crate::MAX_RUN_BYTES`].
fn check_run_length<E: de::Error>(bytes: usize) -> Result<(), E> {
    if bytes > crate::MAX_RUN_BYTES {
        return Err(E::custom(format!(
            "`run` is {bytes} bytes long; at most {} bytes (64 KiB) are allowed, since a step \
             runs as `sh -c RUN` and the kernel refuses longer arguments: put the script in a \
             file of the repository and run that file",
            crate::MAX_RUN_BYTES
        )));
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Scalars

/// A scalar taken as the text written in the file: strings, numbers and
/// bools are accepted (`3.10` stays `3.10`, `0x1F` stays `0x1F`, `true`
/// stays `true`) and a null (`~`, `null`, nothing) is the empty string.
/// Sequences and mappings are rejected.
struct ScalarTextSeed {
    expecting: &'static str,
}

impl<'de> DeserializeSeed<'de> for ScalarTextSeed {
    type Value = String;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_option(self)
    }
}

impl<'de> Visitor<'de> for ScalarTextSeed {
    type Value = String;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.expecting)
    }

    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(String::new())
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(String::new())
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        // serde_norway's `deserialize_str` gives any scalar's text as written.
        deserializer.deserialize_str(self)
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(v.to_owned())
    }
}

/// A duration in humantime syntax (`30s`, `10m`, `1h 30m`), greater than zero.
struct DurationSeed;

impl<'de> DeserializeSeed<'de> for DurationSeed {
    type Value = Duration;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl Visitor<'_> for DurationSeed {
    type Value = Duration;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a duration such as `30s`, `10m` or `1h 30m`")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        let text = v.trim();
        if text.is_empty() {
            return Err(E::custom(
                "`timeout` is empty, expected a duration such as `30s`, `10m` or `1h 30m`",
            ));
        }
        match humantime::parse_duration(text) {
            Ok(duration) if duration.is_zero() => Err(E::custom(format!(
                "invalid timeout {}, it must be greater than zero",
                quote(v)
            ))),
            Ok(duration) => Ok(duration),
            Err(err) => Err(E::custom(format!(
                "invalid duration {} ({err}), expected a duration such as `30s`, `10m` or `1h 30m`",
                quote(v)
            ))),
        }
    }
}

/// `post`: when a post step runs (`always`, `success` or `failure`).
struct PostSeed;

impl<'de> DeserializeSeed<'de> for PostSeed {
    type Value = crate::Post;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl Visitor<'_> for PostSeed {
    type Value = crate::Post;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("`always`, `success` or `failure`")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        match v.trim() {
            "always" => Ok(crate::Post::Always),
            "success" => Ok(crate::Post::Success),
            "failure" => Ok(crate::Post::Failure),
            _ => Err(E::custom(format!(
                "invalid `post` {}, expected `always`, `success` or `failure`",
                quote(v)
            ))),
        }
    }
}

// ---------------------------------------------------------------------------
// env and labels

/// Which kind of string map is being read.
#[derive(Clone, Copy)]
enum MapKind {
    Env,
    Labels,
}

/// `env`: environment variable names to values.
struct EnvSeed;

impl<'de> DeserializeSeed<'de> for EnvSeed {
    type Value = BTreeMap<String, String>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_any(StringMapVisitor(MapKind::Env))
    }
}

/// `labels`: runner label names to values.
struct LabelsSeed;

impl<'de> DeserializeSeed<'de> for LabelsSeed {
    type Value = BTreeMap<String, String>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_any(StringMapVisitor(MapKind::Labels))
    }
}

/// A mapping of names to scalar texts; an empty value (`env:`) is an empty
/// mapping.
struct StringMapVisitor(MapKind);

impl<'de> Visitor<'de> for StringMapVisitor {
    type Value = BTreeMap<String, String>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            MapKind::Env => f.write_str("a mapping of environment variable names to values"),
            MapKind::Labels => f.write_str("a mapping of label names to values"),
        }
    }

    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(BTreeMap::new())
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(BTreeMap::new())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut out = BTreeMap::new();
        while let Some(key) = map.next_key_seed(MapKeySeed {
            kind: self.0,
            seen: &out,
        })? {
            let value = map.next_value_seed(ScalarTextSeed {
                expecting: "a string, number or bool",
            })?;
            out.insert(key, value);
        }
        Ok(out)
    }
}

/// A key of `env` (`[A-Za-z_][A-Za-z0-9_]*`) or `labels` (non-empty), not
/// given twice.
struct MapKeySeed<'a> {
    kind: MapKind,
    seen: &'a BTreeMap<String, String>,
}

impl<'de> DeserializeSeed<'de> for MapKeySeed<'_> {
    type Value = String;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl Visitor<'_> for MapKeySeed<'_> {
    type Value = String;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            MapKind::Env => f.write_str("an environment variable name"),
            MapKind::Labels => f.write_str("a label name"),
        }
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        let what = match self.kind {
            MapKind::Env => {
                if !is_valid_env_name(v) {
                    return Err(E::custom(format!(
                        "invalid environment variable name {}, expected `[A-Za-z_][A-Za-z0-9_]*`",
                        quote(v)
                    )));
                }
                "environment variable"
            }
            MapKind::Labels => {
                if v.trim().is_empty() {
                    return Err(E::custom("empty label name"));
                }
                "label"
            }
        };
        if self.seen.contains_key(v) {
            return Err(E::custom(format!("duplicate {what} {}", quote(v))));
        }
        Ok(v.to_owned())
    }
}

/// Whether `name` is a valid environment variable name.
pub(crate) fn is_valid_env_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    bytes
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

//! Deserialization of the keys of a split step: `parallel`, `units` and
//! `retry`.
//!
//! Same principles as the parent module: every check runs in the visitor of
//! the offending node. The rules between the keys of a step (`parallel` or
//! `retry` without `units`, a split post step, a second split step in a
//! job) are checked by the step's visitor (see `StepSeed`).

use std::fmt;

use kiln_domain::split::{
    DEFAULT_BUDGET_FLOOR_MS, InteractionPolicy, RetryPolicy, Strategy, Threshold, UnitSource,
};
use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};

use super::{FieldSeed, quote};
use crate::{MAX_ATTEMPTS, MAX_SHARDS};

/// Keys allowed in `units`.
pub(crate) const UNITS_FIELDS: &[&str] = &["glob", "command", "strategy", "max_batch"];
/// Keys allowed in `retry`.
pub(crate) const RETRY_FIELDS: &[&str] = &["attempts", "max_failures", "budget", "shards"];

/// What a step's `units` says.
#[derive(Debug)]
pub(crate) struct RawUnits {
    pub(crate) source: UnitSource,
    pub(crate) strategy: Strategy,
    /// 0 when not given.
    pub(crate) max_batch: u32,
}

// ---------------------------------------------------------------------------
// Integers

/// An integer in `min..=max` (`max` at most `u32::MAX`), the value of `key`.
pub(crate) struct IntSeed {
    pub(crate) key: &'static str,
    pub(crate) min: u32,
    pub(crate) max: u32,
}

impl IntSeed {
    /// `parallel`: 1 to [`MAX_SHARDS`].
    pub(crate) const PARALLEL: Self = Self {
        key: "parallel",
        min: 1,
        max: MAX_SHARDS,
    };

    fn wanted(&self) -> String {
        if self.max == u32::MAX {
            format!("an integer of at least {}", self.min)
        } else {
            format!("an integer from {} to {}", self.min, self.max)
        }
    }

    fn out_of_range<E: de::Error>(&self, shown: &str) -> E {
        E::custom(format!(
            "invalid `{}` {shown}, expected {}",
            self.key,
            self.wanted()
        ))
    }
}

impl<'de> DeserializeSeed<'de> for IntSeed {
    type Value = u32;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl Visitor<'_> for IntSeed {
    type Value = u32;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.wanted())
    }

    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        Err(E::custom(format!(
            "`{}` is empty, expected {}",
            self.key,
            self.wanted()
        )))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        self.visit_none()
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
        match u32::try_from(v) {
            Ok(n) if (self.min..=self.max).contains(&n) => Ok(n),
            _ => Err(self.out_of_range(&v.to_string())),
        }
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
        match u64::try_from(v) {
            Ok(n) => self.visit_u64(n),
            Err(_) => Err(self.out_of_range(&v.to_string())),
        }
    }

    fn visit_u128<E: de::Error>(self, v: u128) -> Result<Self::Value, E> {
        match u64::try_from(v) {
            Ok(n) => self.visit_u64(n),
            Err(_) => Err(self.out_of_range(&v.to_string())),
        }
    }

    fn visit_i128<E: de::Error>(self, v: i128) -> Result<Self::Value, E> {
        match u64::try_from(v) {
            Ok(n) => self.visit_u64(n),
            Err(_) => Err(self.out_of_range(&v.to_string())),
        }
    }
}

// ---------------------------------------------------------------------------
// units

/// `units`: a mapping with exactly one of `glob` and `command`, and
/// optionally `strategy` and `max_batch`.
pub(crate) struct UnitsSeed;

impl<'de> DeserializeSeed<'de> for UnitsSeed {
    type Value = RawUnits;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for UnitsSeed {
    type Value = RawUnits;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a mapping with `glob` (patterns of files) or `command`")
    }

    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        Err(E::custom(
            "`units` is empty; expected a mapping with `glob` (patterns of test files) or \
             `command` (a command printing one unit id per line)",
        ))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        self.visit_none()
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut seen = Vec::new();
        let mut source = None;
        let mut strategy = Strategy::default();
        let mut max_batch = 0;
        loop {
            let refuse = match &source {
                Some(UnitSource::Glob(_)) => vec![(
                    "command",
                    "`command` cannot be used with `glob`: the units are either the files \
                     matching `glob` or the lines printed by `command`"
                        .to_owned(),
                )],
                Some(UnitSource::Command(_)) => vec![(
                    "glob",
                    "`glob` cannot be used with `command`: the units are either the files \
                     matching `glob` or the lines printed by `command`"
                        .to_owned(),
                )],
                None => Vec::new(),
            };
            let Some(field) = map.next_key_seed(FieldSeed {
                fields: UNITS_FIELDS,
                seen: &mut seen,
                refuse,
            })?
            else {
                break;
            };
            match field {
                "glob" => source = Some(UnitSource::Glob(map.next_value_seed(GlobsSeed)?)),
                "command" => source = Some(UnitSource::Command(map.next_value_seed(CommandSeed)?)),
                "strategy" => strategy = map.next_value_seed(StrategySeed)?,
                "max_batch" => {
                    max_batch = map.next_value_seed(IntSeed {
                        key: "max_batch",
                        min: 1,
                        max: u32::MAX,
                    })?;
                }
                other => return Err(de::Error::unknown_field(other, UNITS_FIELDS)),
            }
        }
        let Some(source) = source else {
            return Err(de::Error::custom(
                "missing field `glob` or `command` in `units`: the units are the files \
                 matching `glob` or the lines printed by `command`",
            ));
        };
        Ok(RawUnits {
            source,
            strategy,
            max_batch,
        })
    }
}

/// `units.glob`: a pattern or a non-empty list of patterns.
struct GlobsSeed;

impl<'de> DeserializeSeed<'de> for GlobsSeed {
    type Value = Vec<String>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for GlobsSeed {
    type Value = Vec<String>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a glob pattern or a list of glob patterns")
    }

    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        Err(E::custom(
            "`glob` is empty; expected a glob pattern such as `tests/test_*.py`, or a list of them",
        ))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        self.visit_none()
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        GlobSeed.visit_str(v).map(|p| vec![p])
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut patterns = Vec::new();
        while let Some(pattern) = seq.next_element_seed(GlobSeed)? {
            patterns.push(pattern);
        }
        if patterns.is_empty() {
            return self.visit_none();
        }
        Ok(patterns)
    }
}

/// One glob pattern of `units.glob` (or of a step's `junit`).
pub(crate) struct GlobSeed;

impl<'de> DeserializeSeed<'de> for GlobSeed {
    type Value = String;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl Visitor<'_> for GlobSeed {
    type Value = String;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a glob pattern")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        check_glob(v).map_err(E::custom)?;
        Ok(v.to_owned())
    }
}

/// Checks a glob pattern of `units.glob`: not blank, valid for `globset`,
/// relative to the checkout (no leading `/`) and without `.` or `..`
/// components (paths are matched as found in the checkout, like
/// `tests/test_a.py`).
pub(crate) fn check_glob(pattern: &str) -> Result<(), String> {
    if pattern.trim().is_empty() {
        return Err("empty glob pattern, expected a pattern such as `tests/test_*.py`".to_owned());
    }
    if pattern.starts_with('/') {
        return Err(format!(
            "invalid glob pattern {}: it must be relative to the checkout, without a leading `/`",
            quote(pattern)
        ));
    }
    if pattern.split('/').any(|part| part == ".." || part == ".") {
        return Err(format!(
            "invalid glob pattern {}: it must be relative to the checkout, without `.` or `..` \
             components (like `tests/test_*.py`)",
            quote(pattern)
        ));
    }
    if let Err(err) = globset::Glob::new(pattern) {
        return Err(format!(
            "invalid glob pattern {}: {}",
            quote(pattern),
            err.kind()
        ));
    }
    Ok(())
}

/// `units.command`: a non-blank shell command.
struct CommandSeed;

impl<'de> DeserializeSeed<'de> for CommandSeed {
    type Value = String;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl Visitor<'_> for CommandSeed {
    type Value = String;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(
            "a shell command string (quote a command that YAML reads as a number or a bool)",
        )
    }

    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        Err(E::custom(
            "`command` is empty, expected a shell command printing one unit id per line",
        ))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        self.visit_none()
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        if v.trim().is_empty() {
            return self.visit_none();
        }
        Ok(v.to_owned())
    }
}

/// `units.strategy`: `dynamic`, `hash`, `count` or `timing`.
struct StrategySeed;

impl<'de> DeserializeSeed<'de> for StrategySeed {
    type Value = Strategy;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl Visitor<'_> for StrategySeed {
    type Value = Strategy;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("`dynamic`, `hash`, `count` or `timing`")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        [
            Strategy::Dynamic,
            Strategy::Hash,
            Strategy::Count,
            Strategy::Timing,
        ]
        .into_iter()
        .find(|s| s.as_str() == v.trim())
        .ok_or_else(|| {
            E::custom(format!(
                "invalid `strategy` {}, expected `dynamic`, `hash`, `count` or `timing`",
                quote(v)
            ))
        })
    }
}

// ---------------------------------------------------------------------------
// retry

/// `retry`: a mapping with `attempts`, and optionally `max_failures`,
/// `budget` and `shards`.
pub(crate) struct RetrySeed;

impl<'de> DeserializeSeed<'de> for RetrySeed {
    type Value = RetryPolicy;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for RetrySeed {
    type Value = RetryPolicy;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a mapping with `attempts`")
    }

    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        Err(E::custom(
            "`retry` is empty; expected a mapping with `attempts` (tries per unit, the first \
             included)",
        ))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        self.visit_none()
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut seen = Vec::new();
        let mut attempts = None;
        let mut policy = RetryPolicy::default();
        while let Some(field) = map.next_key_seed(FieldSeed {
            fields: RETRY_FIELDS,
            seen: &mut seen,
            refuse: Vec::new(),
        })? {
            match field {
                "attempts" => {
                    attempts = Some(map.next_value_seed(IntSeed {
                        key: "attempts",
                        min: 1,
                        max: MAX_ATTEMPTS,
                    })?);
                }
                "max_failures" => policy.max_failures = Some(map.next_value_seed(ThresholdSeed)?),
                "budget" => {
                    let (permille, floor) = map.next_value_seed(BudgetSeed)?;
                    policy.budget_permille = Some(permille);
                    policy.budget_floor_ms = floor;
                }
                "shards" => {
                    policy.shards = map.next_value_seed(IntSeed {
                        key: "shards",
                        min: 1,
                        max: MAX_SHARDS,
                    })?;
                }
                other => return Err(de::Error::unknown_field(other, RETRY_FIELDS)),
            }
        }
        policy.attempts = attempts.ok_or_else(|| de::Error::missing_field("attempts"))?;
        Ok(policy)
    }
}

/// A percentage: `20%`, `2.5%` (at most one decimal), from 0 to 100, in
/// thousandths (`20%` is 200).
pub(crate) fn parse_percent(text: &str) -> Option<u32> {
    let number = text.trim().strip_suffix('%')?.trim_end();
    let (whole, tenths) = match number.split_once('.') {
        Some((whole, tenths)) => (whole, Some(tenths)),
        None => (number, None),
    };
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(whole) || whole.len() > 3 {
        return None;
    }
    let tenths = match tenths {
        None => 0,
        Some(t) if t.len() == 1 && digits(t) => t.parse::<u32>().ok()?,
        Some(_) => return None,
    };
    let permille = whole.parse::<u32>().ok()? * 10 + tenths;
    (permille <= 1000).then_some(permille)
}

/// The message for a text that is not a valid percentage.
fn bad_percent(key: &str, text: &str) -> String {
    format!(
        "invalid `{key}` {}, expected a percentage from `0%` to `100%` with at most one \
         decimal, such as `5%` or `2.5%`",
        quote(text)
    )
}

/// `retry.max_failures`: a number of units or a percentage of them.
struct ThresholdSeed;

impl<'de> DeserializeSeed<'de> for ThresholdSeed {
    type Value = Threshold;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl ThresholdSeed {
    const COUNT: IntSeed = IntSeed {
        key: "max_failures",
        min: 0,
        max: u32::MAX,
    };
}

impl Visitor<'_> for ThresholdSeed {
    type Value = Threshold;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a number of units or a percentage of them, such as `10` or `20%`")
    }

    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        Err(E::custom(
            "`max_failures` is empty, expected a number of units or a percentage of them, \
             such as `10` or `20%`",
        ))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        self.visit_none()
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
        Self::COUNT.visit_u64(v).map(Threshold::Count)
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
        Self::COUNT.visit_i64(v).map(Threshold::Count)
    }

    fn visit_u128<E: de::Error>(self, v: u128) -> Result<Self::Value, E> {
        Self::COUNT.visit_u128(v).map(Threshold::Count)
    }

    fn visit_i128<E: de::Error>(self, v: i128) -> Result<Self::Value, E> {
        Self::COUNT.visit_i128(v).map(Threshold::Count)
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        if !v.trim_end().ends_with('%') {
            return Err(E::custom(format!(
                "invalid `max_failures` {}, expected a number of units (unquoted) or a \
                 percentage of them, such as `10` or `20%`",
                quote(v)
            )));
        }
        parse_percent(v)
            .map(Threshold::Permille)
            .ok_or_else(|| E::custom(bad_percent("max_failures", v)))
    }
}

/// `retry.budget`: a percentage of the first round's time, with an optional floor: `5%`,
/// `5% or 1m` (the floor defaults to one minute). In thousandths, and the floor in
/// milliseconds.
struct BudgetSeed;

impl<'de> DeserializeSeed<'de> for BudgetSeed {
    type Value = (u32, u64);

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

const BUDGET_EXAMPLE: &str = "such as `5%` or `5% or 1m`";

impl Visitor<'_> for BudgetSeed {
    type Value = (u32, u64);

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "a percentage of the first round's time, with an optional floor, {BUDGET_EXAMPLE}"
        )
    }

    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        Err(E::custom(format!(
            "`budget` is empty, expected a percentage of the first round's time, {BUDGET_EXAMPLE}"
        )))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        self.visit_none()
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        let (percent, floor) = match v.split_once(" or ") {
            Some((p, f)) => (p, Some(f.trim())),
            None => (v, None),
        };
        let permille = parse_percent(percent).ok_or_else(|| {
            E::custom(format!(
                "invalid `budget` {}, expected a percentage from `0%` to `100%` with at most \
                 one decimal and an optional floor, {BUDGET_EXAMPLE}",
                quote(v)
            ))
        })?;
        let floor_ms = match floor {
            None => DEFAULT_BUDGET_FLOOR_MS,
            Some(f) => match humantime::parse_duration(f) {
                Ok(d) if d.is_zero() => {
                    return Err(E::custom(format!(
                        "invalid `budget` {}: the floor must be more than zero, so that each \
                         failed unit can be retried once ({BUDGET_EXAMPLE})",
                        quote(v)
                    )));
                }
                Ok(d) => u64::try_from(d.as_millis()).unwrap_or(u64::MAX),
                Err(e) => {
                    return Err(E::custom(format!(
                        "invalid `budget` {}: the floor {} is not a duration ({e}), {BUDGET_EXAMPLE}",
                        quote(v),
                        quote(f)
                    )));
                }
            },
        };
        Ok((permille, floor_ms))
    }
}

/// `interaction`: what a batch that failed while each of its units passed alone does to the
/// split: `warn` (reported; the default) or `fail`.
pub(crate) struct InteractionSeed;

impl<'de> DeserializeSeed<'de> for InteractionSeed {
    type Value = InteractionPolicy;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl Visitor<'_> for InteractionSeed {
    type Value = InteractionPolicy;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("`warn` or `fail`")
    }

    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        Err(E::custom(
            "`interaction` is empty, expected `warn` or `fail`",
        ))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        self.visit_none()
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        match v {
            "warn" => Ok(InteractionPolicy::Warn),
            "fail" => Ok(InteractionPolicy::Fail),
            _ => Err(E::custom(format!(
                "invalid `interaction` {}, expected `warn` (report it) or `fail` (fail the \
                 split)",
                quote(v)
            ))),
        }
    }
}

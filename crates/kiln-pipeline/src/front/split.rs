//! The keys of a split step: `parallel`, `units`, `retry`, `interaction`.

use kiln_domain::split::{
    DEFAULT_BUDGET_FLOOR_MS, InteractionPolicy, RetryPolicy, Strategy, Threshold, UnitSource,
};

use super::yaml::N;
use super::{Any, Pass, R, bail, fail, quote, serde_fail};
use crate::{MAX_ATTEMPTS, MAX_SHARDS};
use serde::de::Error as _;

/// `units` as written.
pub(super) struct RawUnits {
    pub(super) source: UnitSource,
    pub(super) strategy: Strategy,
    pub(super) max_batch: u32,
}

/// An integer key and its range.
#[derive(Clone, Copy)]
pub(super) struct Int {
    key: &'static str,
    min: u32,
    max: u32,
}

pub(super) const PARALLEL: Int = Int {
    key: "parallel",
    min: 1,
    max: MAX_SHARDS,
};

impl Int {
    fn wanted(self) -> String {
        if self.max == u32::MAX {
            format!("an integer of at least {}", self.min)
        } else {
            format!("an integer from {} to {}", self.min, self.max)
        }
    }

    /// `i` if in range, else the message.
    fn check(self, i: i128) -> Result<u32, String> {
        match u32::try_from(i) {
            Ok(n) if (self.min..=self.max).contains(&n) => Ok(n),
            _ => Err(format!(
                "invalid `{}` {i}, expected {}",
                self.key,
                self.wanted()
            )),
        }
    }
}

const BUDGET_EXAMPLE: &str = "such as `5%` or `5% or 1m`";
const BOTH: &str = "the units are either the files matching `glob` or the lines printed by \
                    `command`";

impl Pass {
    pub(super) fn int(&self, n: &N, int: Int) -> R<u32> {
        match self.any(n) {
            Any::Null => fail(
                n,
                format!("`{}` is empty, expected {}", int.key, int.wanted()),
            ),
            Any::Int(i) => int.check(i).or_else(|e| fail(n, e)),
            _ => self.invalid(n, &int.wanted()),
        }
    }

    pub(super) fn units(&self, n: &N) -> R<RawUnits> {
        let entries = self.mapping(
            n,
            "`units` is empty; expected a mapping with `glob` (patterns of test files) \
                     or `command` (a command printing one unit id per line)",
            "a mapping with `glob` (patterns of files) or `command`",
        )?;
        let mut seen = Vec::new();
        let mut source = None;
        let mut strategy = Strategy::default();
        let mut max_batch = 0;
        for (k, v) in entries {
            let refuse = |key: &str| match (key, &source) {
                ("command", Some(UnitSource::Glob(_))) => {
                    Some(format!("`command` cannot be used with `glob`: {BOTH}"))
                }
                ("glob", Some(UnitSource::Command(_))) => {
                    Some(format!("`glob` cannot be used with `command`: {BOTH}"))
                }
                _ => None,
            };
            let fields = &["glob", "command", "strategy", "max_batch"];
            match self.field(k, fields, &mut seen, &refuse)? {
                "glob" => {
                    source = Some(UnitSource::Glob(self.patterns(
                        v,
                        "a glob pattern or a list of glob patterns",
                        "a glob pattern",
                        "`glob` is empty; expected a glob pattern such as `tests/test_*.py`, or \
                         a list of them",
                        &|p| check_glob(p),
                    )?));
                }
                "command" => {
                    const EMPTY: &str = "`command` is empty, expected a shell command printing one unit id per line";
                    let command = match self.any(v) {
                        Any::Null => return fail(v, EMPTY),
                        Any::Str(text) if text.trim().is_empty() => return fail(v, EMPTY),
                        Any::Str(text) => text,
                        _ => {
                            return self.invalid(
                                v,
                                "a shell command string \
                                 (quote a command that YAML reads as a number or a bool)",
                            );
                        }
                    };
                    source = Some(UnitSource::Command(command.into_owned()));
                }
                "strategy" => {
                    let text = self.str(v, "`dynamic`, `hash`, `count` or `timing`")?;
                    let all = [
                        Strategy::Dynamic,
                        Strategy::Hash,
                        Strategy::Count,
                        Strategy::Timing,
                    ];
                    let Some(found) = all.into_iter().find(|s| s.as_str() == text.trim()) else {
                        bail!(
                            v,
                            "invalid `strategy` {}, expected `dynamic`, `hash`, `count` or \
                                 `timing`",
                            quote(&text)
                        );
                    };
                    strategy = found;
                }
                _ => {
                    let int = Int {
                        key: "max_batch",
                        min: 1,
                        max: u32::MAX,
                    };
                    max_batch = self.int(v, int)?;
                }
            }
        }
        let Some(source) = source else {
            bail!(
                n,
                "missing field `glob` or `command` in `units`: the units are the files \
                 matching `glob` or the lines printed by `command`"
            );
        };
        Ok(RawUnits {
            source,
            strategy,
            max_batch,
        })
    }

    pub(super) fn retry(&self, n: &N) -> R<RetryPolicy> {
        let entries = self.mapping(
            n,
            "`retry` is empty; expected a mapping with `attempts` (tries per unit, the \
                     first included)",
            "a mapping with `attempts`",
        )?;
        let mut seen = Vec::new();
        let mut attempts = None;
        let mut policy = RetryPolicy::default();
        for (k, v) in entries {
            let fields = &["attempts", "max_failures", "budget", "shards"];
            match self.field(k, fields, &mut seen, &|_| None)? {
                "attempts" => {
                    let int = Int {
                        key: "attempts",
                        min: 1,
                        max: MAX_ATTEMPTS,
                    };
                    attempts = Some(self.int(v, int)?);
                }
                "max_failures" => policy.max_failures = Some(self.threshold(v)?),
                "budget" => {
                    let (permille, floor) = self.budget(v)?;
                    policy.budget_permille = Some(permille);
                    policy.budget_floor_ms = floor;
                }
                _ => {
                    let int = Int {
                        key: "shards",
                        ..PARALLEL
                    };
                    policy.shards = self.int(v, int)?;
                }
            }
        }
        let Some(attempts) = attempts else {
            return serde_fail(n, serde::de::value::Error::missing_field("attempts"));
        };
        policy.attempts = attempts;
        Ok(policy)
    }

    /// `max_failures`: a number of units or a percentage of them.
    fn threshold(&self, n: &N) -> R<Threshold> {
        const WANTED: &str = "a number of units or a percentage of them, such as `10` or `20%`";
        match self.any(n) {
            Any::Null => fail(n, format!("`max_failures` is empty, expected {WANTED}")),
            Any::Int(i) => {
                let int = Int {
                    key: "max_failures",
                    min: 0,
                    max: u32::MAX,
                };
                int.check(i).map(Threshold::Count).or_else(|e| fail(n, e))
            }
            Any::Str(v) if !v.trim_end().ends_with('%') => fail(
                n,
                format!(
                    "invalid `max_failures` {}, expected a number of units (unquoted) or a \
                     percentage of them, such as `10` or `20%`",
                    quote(&v)
                ),
            ),
            Any::Str(v) => match parse_percent(&v) {
                Some(permille) => Ok(Threshold::Permille(permille)),
                None => fail(
                    n,
                    format!(
                        "invalid `max_failures` {}, expected a percentage from `0%` to `100%` \
                         with at most one decimal, such as `5%` or `2.5%`",
                        quote(&v)
                    ),
                ),
            },
            _ => self.invalid(n, WANTED),
        }
    }

    /// `budget`: a percentage and an optional floor (`5% or 1m`).
    fn budget(&self, n: &N) -> R<(u32, u64)> {
        let v = match self.any(n) {
            Any::Null => {
                bail!(
                    n,
                    "`budget` is empty, expected a percentage of the first round's time, \
                         {BUDGET_EXAMPLE}"
                );
            }
            Any::Str(v) => v,
            _ => {
                return self.invalid(
                    n,
                    &format!(
                        "a percentage of the first round's time, with an optional floor, \
                         {BUDGET_EXAMPLE}"
                    ),
                );
            }
        };
        let (percent, floor) = match v.split_once(" or ") {
            Some((p, f)) => (p, Some(f.trim())),
            None => (&*v, None),
        };
        let Some(permille) = parse_percent(percent) else {
            bail!(
                n,
                "invalid `budget` {}, expected a percentage from `0%` to `100%` with at most \
                     one decimal and an optional floor, {BUDGET_EXAMPLE}",
                quote(&v)
            );
        };
        let floor_ms = match floor.map(humantime::parse_duration) {
            None => DEFAULT_BUDGET_FLOOR_MS,
            Some(Ok(d)) if d.is_zero() => {
                bail!(
                    n,
                    "invalid `budget` {}: the floor must be more than zero, so that each \
                         failed unit can be retried once ({BUDGET_EXAMPLE})",
                    quote(&v)
                );
            }
            Some(Ok(d)) => u64::try_from(d.as_millis()).unwrap_or(u64::MAX),
            Some(Err(e)) => {
                bail!(
                    n,
                    "invalid `budget` {}: the floor {} is not a duration ({e}), {BUDGET_EXAMPLE}",
                    quote(&v),
                    quote(floor.unwrap_or_default())
                );
            }
        };
        Ok((permille, floor_ms))
    }

    pub(super) fn interaction(&self, n: &N) -> R<InteractionPolicy> {
        match self.any(n) {
            Any::Null => fail(n, "`interaction` is empty, expected `warn` or `fail`"),
            Any::Str(v) if v == "warn" => Ok(InteractionPolicy::Warn),
            Any::Str(v) if v == "fail" => Ok(InteractionPolicy::Fail),
            Any::Str(v) => fail(
                n,
                format!(
                    "invalid `interaction` {}, expected `warn` (report it) or `fail` (fail the \
                     split)",
                    quote(&v)
                ),
            ),
            _ => self.invalid(n, "`warn` or `fail`"),
        }
    }
}

/// Checks a glob pattern of `units.glob` or `junit`.
pub(super) fn check_glob(pattern: &str) -> Result<(), String> {
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

/// A percentage from `0%` to `100%` with at most one decimal, in permille.
fn parse_percent(text: &str) -> Option<u32> {
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

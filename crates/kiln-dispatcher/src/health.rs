//! Runners that fail the units other runners pass: taken out of the pool.
//!
//! Per build (its split steps), the dispatcher counts each runner's unit results. A runner
//! whose last [`STREAK`] units all failed, while the other runners of the build passed at
//! least [`STREAK`] units and failed at most a fifth of theirs, is broken rather than the code
//! (a full disk, a missing tool, a bad machine): the dispatcher drains it and gives its shard
//! to another runner. A broken commit fails on every runner alike and so never trips it.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use kiln_domain::{BuildId, RunnerId};

/// Failed units in a row that make a runner suspect.
pub(super) const STREAK: u32 = 5;
/// Builds whose counts are forgotten after this long without a result.
const FORGET: Duration = Duration::from_secs(3600);

#[derive(Debug, Default, Clone, Copy)]
struct Counts {
    streak: u32,
    passed: u64,
    failed: u64,
}

#[derive(Debug)]
struct Group {
    runners: HashMap<RunnerId, Counts>,
    touched: Instant,
}

/// Unit results per build and runner.
#[derive(Debug, Default)]
pub(super) struct UnitHealth {
    builds: HashMap<BuildId, Group>,
}

impl UnitHealth {
    /// Counts a runner's unit results (true: passed) in a build; returns why the runner must be
    /// taken out of the pool, if it must.
    pub(super) fn record(
        &mut self,
        build: BuildId,
        runner: RunnerId,
        results: impl IntoIterator<Item = bool>,
        now: Instant,
    ) -> Option<String> {
        self.builds
            .retain(|_, g| now.saturating_duration_since(g.touched) < FORGET);
        let group = self.builds.entry(build).or_insert_with(|| Group {
            runners: HashMap::new(),
            touched: now,
        });
        group.touched = now;
        let counts = group.runners.entry(runner).or_default();
        for passed in results {
            if passed {
                counts.passed += 1;
                counts.streak = 0;
            } else {
                counts.failed += 1;
                counts.streak += 1;
            }
        }
        let streak = counts.streak;
        if streak < STREAK {
            return None;
        }
        let (passed, failed) = group
            .runners
            .iter()
            .filter(|(r, _)| **r != runner)
            .fold((0, 0), |(p, f), (_, c)| (p + c.passed, f + c.failed));
        if passed >= u64::from(STREAK) && failed * 5 <= passed + failed {
            if let Some(c) = group.runners.get_mut(&runner) {
                c.streak = 0;
            }
            Some(format!(
                "failed {streak} units in a row while other runners passed {passed} of {}",
                passed + failed
            ))
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_runner_failing_what_others_pass_is_flagged() {
        let mut h = UnitHealth::default();
        let now = Instant::now();
        assert!(
            h.record(BuildId::new(1), RunnerId::new(2), [true; 10], now)
                .is_none()
        );
        assert!(
            h.record(BuildId::new(1), RunnerId::new(1), [false; 4], now)
                .is_none()
        );
        let why = h.record(BuildId::new(1), RunnerId::new(1), [false], now);
        assert!(why.is_some_and(|w| w.contains("5 units in a row")));
    }

    #[test]
    fn a_broken_commit_fails_everywhere_and_flags_nobody() {
        let mut h = UnitHealth::default();
        let now = Instant::now();
        assert!(
            h.record(
                BuildId::new(1),
                RunnerId::new(2),
                [false, true, false, false, true],
                now
            )
            .is_none()
        );
        assert!(
            h.record(BuildId::new(1), RunnerId::new(1), [false; 8], now)
                .is_none()
        );
        // Another build's passes do not count.
        assert!(
            h.record(BuildId::new(2), RunnerId::new(3), [true; 20], now)
                .is_none()
        );
        assert!(
            h.record(BuildId::new(1), RunnerId::new(1), [false], now)
                .is_none()
        );
    }
}

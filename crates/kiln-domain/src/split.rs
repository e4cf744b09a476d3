//! Split steps: one test suite cut into *units* (test files or test ids) that the shards of a
//! step pull from a queue in the dispatcher, longest first, and the rules that decide retry
//! rounds. Pure functions and plain types: the store applies them inside its transactions.
//!
//! - A step with `parallel: N` becomes N shard jobs. Each shard discovers the units (a glob in
//!   its checkout, or a command printing one id per line); the first discovery to reach the
//!   dispatcher creates the split's queue, later ones are ignored.
//! - A shard asks for a batch ([`batch_len`]); it runs the batch as one process and reports one
//!   [`UnitOutcome`] per unit with its next request.
//! - Round 1 runs every unit once. When a round ends with failures, [`next_round`] decides
//!   whether failed units run again (round 2, 3, ...), each round a new entry per unit with its
//!   try number, so "flaky" (failed, then passed) and "failed" (failed every try) are facts.

use serde::{Deserialize, Serialize};

/// Id of a split (one split step of one build), assigned by the store.
pub type SplitId = u64;

/// How a split step's units are found, in the shard's checkout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UnitSource {
    /// Files matching any of these globs (relative to the checkout, `**` allowed), each a unit.
    Glob(Vec<String>),
    /// A shell command printing one unit id per line (blank lines ignored).
    Command(String),
}

/// How units are handed to shards.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// A live queue, longest first: shards pull batches as they go (the default).
    #[default]
    Dynamic,
    /// Fixed in advance: unit to shard by a hash of its id (like `nextest --partition hash`).
    Hash,
    /// Fixed in advance: the i-th unit (by id) to shard `i mod N` (like `--partition count`).
    Count,
    /// Fixed in advance: greedy longest-first packing on the recorded durations.
    Timing,
}

impl Strategy {
    /// The name used in the pipeline file.
    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::Dynamic => "dynamic",
            Strategy::Hash => "hash",
            Strategy::Count => "count",
            Strategy::Timing => "timing",
        }
    }
}

/// A limit given as a count or a fraction of the suite.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Threshold {
    /// At most this many units.
    Count(u32),
    /// At most this many thousandths of the units (`20%` is 200).
    Permille(u32),
}

impl Threshold {
    /// Whether `n` units out of `total` exceed the threshold.
    pub fn exceeded(self, n: u64, total: u64) -> bool {
        match self {
            Threshold::Count(c) => n > u64::from(c),
            Threshold::Permille(p) => n.saturating_mul(1000) > total.saturating_mul(u64::from(p)),
        }
    }
}

/// When failed units run again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetryPolicy {
    /// Most tries of one unit, the first included (1: never retried).
    pub attempts: u32,
    /// No retries at all when more units than this failed in the first round.
    pub max_failures: Option<Threshold>,
    /// Time all retry rounds may take, in thousandths of the first round's total unit time.
    pub budget_permille: Option<u32>,
    /// Most shards taking units in a retry round (0: half of the step's shards, at least 1).
    pub shards: u32,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            attempts: 1,
            max_failures: None,
            budget_permille: None,
            shards: 0,
        }
    }
}

impl RetryPolicy {
    /// Shards allowed to take units in a retry round of a step with `shards` shards.
    pub fn retry_shards(&self, shards: u32) -> u32 {
        let n = if self.shards == 0 {
            shards.div_ceil(2)
        } else {
            self.shards
        };
        n.clamp(1, shards.max(1))
    }
}

/// What a runner is told about a split step (carried in the step's spec).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SplitSpec {
    /// Identity of the split within its build (the job's base name and the step's name): the
    /// shards of one step share it.
    pub key: String,
    /// Number of shards.
    pub shards: u32,
    /// This job's shard, 0-based.
    pub shard: u32,
    /// Where the units come from.
    pub units: UnitSource,
    /// How units are handed out.
    #[serde(default)]
    pub strategy: Strategy,
    /// Retries of failed units.
    #[serde(default)]
    pub retry: RetryPolicy,
    /// Most units in one batch (0: decided by the dispatcher from their durations).
    #[serde(default)]
    pub max_batch: u32,
}

/// How one try of one unit ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UnitOutcome {
    /// Every test in it passed (exit status 0).
    Passed,
    /// A test failed (or the process exited non-zero).
    Failed,
    /// Could not be run (timeout, the process could not start).
    Errored,
}

impl UnitOutcome {
    /// The name used in the store and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            UnitOutcome::Passed => "passed",
            UnitOutcome::Failed => "failed",
            UnitOutcome::Errored => "errored",
        }
    }

    /// Parses [`UnitOutcome::as_str`].
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "passed" => Some(UnitOutcome::Passed),
            "failed" => Some(UnitOutcome::Failed),
            "errored" => Some(UnitOutcome::Errored),
            _ => None,
        }
    }
}

/// One test case inside a unit, from the JUnit XML its command wrote.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TestCase {
    /// Test name.
    pub name: String,
    /// Class (or module) name, may be empty.
    #[serde(default)]
    pub classname: String,
    /// Passed, failed (failure or error) or skipped (`Errored` is not used; skipped is
    /// `skipped = true` with `Passed`).
    pub outcome: UnitOutcome,
    /// Whether the case was skipped.
    #[serde(default)]
    pub skipped: bool,
    /// Duration in milliseconds.
    #[serde(default)]
    pub duration_ms: u64,
    /// The `message` attribute of its failure (or skip) as the batch wrote it, empty when it
    /// passed or had none.
    #[serde(default)]
    pub message: String,
    /// The text of its `<failure>`/`<error>` (or `<skipped>`) element: the traceback.
    #[serde(default)]
    pub body: String,
    /// Its `<system-out>`.
    #[serde(default)]
    pub system_out: String,
    /// Its `<system-err>`.
    #[serde(default)]
    pub system_err: String,
}

/// The result of one try of one unit, as a shard reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnitReport {
    /// The unit id.
    pub unit: String,
    /// Which try (1 for the first round).
    pub try_number: u32,
    /// How it ended.
    pub outcome: UnitOutcome,
    /// Wall-clock time of its process (its share of the batch's when batched), milliseconds.
    pub duration_ms: u64,
    /// Test cases from the JUnit XML, when the command wrote one.
    pub cases: Vec<TestCase>,
}

/// A unit handed to a shard.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeasedUnit {
    /// The unit id.
    pub unit: String,
    /// Which try this is.
    pub try_number: u32,
}

/// What a shard asks for (and reports) in one round trip.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnitsRequest {
    /// The shard's attempt.
    pub attempt: u64,
    /// The runner asking.
    pub runner: u64,
    /// The split step's index in the job.
    pub step_index: u32,
    /// Number of this request within the attempt, from 1; a repeated number is a re-send
    /// (its results are not recorded twice, and it gets the same units again).
    pub request: u32,
    /// The units the shard found, sent with its first request.
    pub discovered: Vec<String>,
    /// Results of the previous batch.
    pub results: Vec<UnitReport>,
    /// Most units the shard wants (0: no limit beyond the dispatcher's).
    pub max_units: u32,
}

/// The dispatcher's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UnitsReply {
    /// Run these units (as one batch).
    Batch(Vec<LeasedUnit>),
    /// Nothing to hand out now, but the split is not over (other shards hold units, or a retry
    /// round may come): ask again shortly.
    Wait,
    /// The split is over: its verdict (true when every unit passed in the end, flaky ones
    /// included) and a summary line.
    Done {
        /// The verdict.
        passed: bool,
        /// A line for the log, like `200 units: 198 passed, 1 flaky, 1 failed`.
        summary: String,
    },
    /// The request cannot be taken (attempt not current, unknown step, no units found).
    Refused(String),
}

/// The verdict of a unit over all its tries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UnitVerdict {
    /// Passed on its first try.
    Passed,
    /// Failed, then passed on a later try.
    Flaky,
    /// Failed every try it got.
    Failed,
    /// Never ran to an end (the split ended without it).
    NotRun,
}

impl UnitVerdict {
    /// The name used in reports.
    pub fn as_str(self) -> &'static str {
        match self {
            UnitVerdict::Passed => "passed",
            UnitVerdict::Flaky => "flaky",
            UnitVerdict::Failed => "failed",
            UnitVerdict::NotRun => "not_run",
        }
    }
}

/// One try of a unit, as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnitTry {
    /// Try number (1-based).
    pub try_number: u32,
    /// Outcome; `None` while queued or running.
    pub outcome: Option<UnitOutcome>,
    /// Runner that ran it.
    pub runner: Option<String>,
    /// Duration in milliseconds.
    pub duration_ms: u64,
    /// Test cases reported.
    pub cases: Vec<TestCase>,
}

/// A unit of a split with all its tries and its verdict.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnitSummary {
    /// Unit id.
    pub unit: String,
    /// Verdict over its tries.
    pub verdict: UnitVerdict,
    /// Its tries, first first.
    pub tries: Vec<UnitTry>,
    /// Builds of this repository in which it was flaky, as recorded now: this build counts
    /// once its split is done (a report of an older build also counts later builds).
    pub flaky_history: u32,
}

/// Everything known about one split of a build: the merged report of its shards.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SplitReport {
    /// Id.
    pub id: SplitId,
    /// The build.
    pub build_id: u64,
    /// The split's key (job and step).
    pub key: String,
    /// Shards.
    pub shards: u32,
    /// How units were handed out.
    pub strategy: Strategy,
    /// Rounds run (1 without retries).
    pub rounds: u32,
    /// Whether the split is over, and its verdict then.
    pub done: bool,
    /// Verdict once done.
    pub passed: bool,
    /// Why retries stopped (or did not start), if they did.
    pub retry_note: String,
    /// Units, in discovery order.
    pub units: Vec<UnitSummary>,
}

/// A queued unit as [`batch_len`] sees it: its estimated duration.
pub type EstimateMs = u64;

/// Smallest useful batch time: units shorter than this are batched so that per-unit overhead
/// (a process start, a round trip) stays small.
pub const BATCH_TARGET_MIN_MS: u64 = 200;

/// How many units of the queue (estimates, in the order they will be handed out) go in the
/// next batch for one of `shards` shards.
///
/// A batch takes units while their estimated total stays under a target: a slice of the time
/// left divided among the shards (an eighth of each shard's share), so batches shrink as the
/// queue drains and the tail stays short, but never under [`BATCH_TARGET_MIN_MS`] worth of
/// tiny units, and never more than `max` (0: no limit). Always at least one unit when the
/// queue is not empty.
pub fn batch_len(queue: &[EstimateMs], shards: u32, max: u32) -> usize {
    if queue.is_empty() {
        return 0;
    }
    let left: u64 = queue.iter().sum();
    let per_shard = left / u64::from(shards.max(1));
    let target = (per_shard / 8).max(BATCH_TARGET_MIN_MS.min(per_shard));
    let cap = if max == 0 { usize::MAX } else { max as usize };
    let mut total = 0u64;
    let mut n = 0usize;
    for &est in queue {
        if n >= cap || (n > 0 && total + est > target) {
            break;
        }
        total += est;
        n += 1;
    }
    n.max(1)
}

/// The median of recorded estimates, for units without history; `None` when none is known.
pub fn median(mut known: Vec<EstimateMs>) -> Option<EstimateMs> {
    if known.is_empty() {
        return None;
    }
    known.sort_unstable();
    Some(known[known.len() / 2])
}

/// A stable 64-bit hash of a unit id (FNV-1a), for the `hash` strategy.
pub fn unit_hash(unit: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in unit.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// The shard of each unit for a static strategy (`None` for every unit with `Dynamic`).
/// `units` are (id, estimate) in discovery order.
pub fn static_shards(
    strategy: Strategy,
    units: &[(String, EstimateMs)],
    shards: u32,
) -> Vec<Option<u32>> {
    let n = shards.max(1);
    match strategy {
        Strategy::Dynamic => vec![None; units.len()],
        Strategy::Hash => units
            .iter()
            .map(|(u, _)| Some((unit_hash(u) % u64::from(n)) as u32))
            .collect(),
        Strategy::Count => {
            let mut order: Vec<usize> = (0..units.len()).collect();
            order.sort_by(|&a, &b| units[a].0.cmp(&units[b].0));
            let mut out = vec![None; units.len()];
            for (i, &u) in order.iter().enumerate() {
                out[u] = Some((i as u64 % u64::from(n)) as u32);
            }
            out
        }
        Strategy::Timing => {
            let mut order: Vec<usize> = (0..units.len()).collect();
            order.sort_by(|&a, &b| units[b].1.cmp(&units[a].1).then(a.cmp(&b)));
            let mut load = vec![0u64; n as usize];
            let mut out = vec![None; units.len()];
            for u in order {
                let (shard, _) = load
                    .iter()
                    .enumerate()
                    .min_by_key(|&(i, &l)| (l, i))
                    .unwrap_or((0, &0));
                load[shard] += units[u].1;
                out[u] = Some(shard as u32);
            }
            out
        }
    }
}

/// What happened in the rounds so far, for [`next_round`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoundStats {
    /// The round that just ended (1 for the first).
    pub round: u32,
    /// Units in the suite.
    pub units: u64,
    /// Units that failed in the first round.
    pub first_failed: u64,
    /// Units that failed in the round that just ended.
    pub failed: u64,
    /// Units of the round that just ended that had failed before and passed in it (0 in round 1).
    pub recovered: u64,
    /// Total unit time of the first round, milliseconds.
    pub first_round_ms: u64,
    /// Total unit time of all retry rounds so far, milliseconds.
    pub retry_ms: u64,
    /// Estimated time of running the units that just failed once more, milliseconds.
    pub next_round_ms: u64,
}

/// Whether another round runs, and if not, why (for the report).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RoundDecision {
    /// Run the failed units again as round `round + 1`.
    Retry,
    /// Stop: the split is over.
    Stop(String),
}

/// Decides, at the end of a round with failures, whether the failed units run again.
pub fn next_round(policy: &RetryPolicy, s: &RoundStats) -> RoundDecision {
    if s.failed == 0 {
        return RoundDecision::Stop(String::new());
    }
    if policy.attempts <= 1 {
        return RoundDecision::Stop("no retries configured".into());
    }
    if let Some(t) = policy.max_failures
        && t.exceeded(s.first_failed, s.units)
    {
        return RoundDecision::Stop(format!(
            "{} of {} units failed, more than the retry threshold: nothing retried",
            s.first_failed, s.units
        ));
    }
    if s.round >= policy.attempts {
        return RoundDecision::Stop(format!(
            "failed units ran {} times (retry.attempts)",
            policy.attempts
        ));
    }
    if s.round >= 2 && s.recovered == 0 {
        return RoundDecision::Stop(format!(
            "round {} turned no failure into a pass: retries stopped",
            s.round
        ));
    }
    if let Some(p) = policy.budget_permille {
        let budget = s.first_round_ms.saturating_mul(u64::from(p)) / 1000;
        if s.retry_ms.saturating_add(s.next_round_ms) > budget {
            return RoundDecision::Stop(format!(
                "retry budget of {budget} ms ({}.{}% of the first round) would be exceeded",
                p / 10,
                p % 10
            ));
        }
    }
    RoundDecision::Retry
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_shrink_as_the_queue_drains() {
        let queue = vec![30u64; 1000];
        let big = batch_len(&queue, 4, 0);
        let small = batch_len(&queue[..40], 4, 0);
        assert!(big > small, "{big} > {small}");
        assert!(small >= 1);
        assert_eq!(batch_len(&[5000, 10, 10], 4, 0), 1);
        assert_eq!(batch_len(&queue, 4, 3), 3);
        assert_eq!(batch_len(&[], 4, 0), 0);
    }

    #[test]
    fn static_strategies_cover_every_unit() {
        let units: Vec<(String, u64)> = (0..50).map(|i| (format!("u{i}"), i * 10)).collect();
        for s in [Strategy::Hash, Strategy::Count, Strategy::Timing] {
            let shards = static_shards(s, &units, 4);
            assert!(shards.iter().all(|x| matches!(x, Some(0..=3))), "{s:?}");
        }
        let timing = static_shards(Strategy::Timing, &units, 4);
        let mut load = [0u64; 4];
        for (i, s) in timing.iter().enumerate() {
            load[s.unwrap_or(0) as usize] += units[i].1;
        }
        let (min, max) = (load.iter().min(), load.iter().max());
        assert!(max.unwrap_or(&0) - min.unwrap_or(&0) <= 490, "{load:?}");
    }

    fn stats(round: u32, failed: u64, recovered: u64) -> RoundStats {
        RoundStats {
            round,
            units: 100,
            first_failed: 5,
            failed,
            recovered,
            first_round_ms: 100_000,
            retry_ms: 0,
            next_round_ms: 1000,
        }
    }

    #[test]
    fn retry_rules() {
        let policy = RetryPolicy {
            attempts: 3,
            max_failures: Some(Threshold::Permille(100)),
            budget_permille: Some(50),
            shards: 0,
        };
        assert_eq!(next_round(&policy, &stats(1, 5, 0)), RoundDecision::Retry);
        assert!(matches!(
            next_round(&policy, &stats(2, 5, 0)),
            RoundDecision::Stop(_)
        ));
        assert_eq!(next_round(&policy, &stats(2, 4, 1)), RoundDecision::Retry);
        assert!(matches!(
            next_round(&policy, &stats(3, 4, 1)),
            RoundDecision::Stop(_)
        ));
        let mut many = stats(1, 30, 0);
        many.first_failed = 30;
        assert!(matches!(next_round(&policy, &many), RoundDecision::Stop(_)));
        let mut costly = stats(1, 5, 0);
        costly.next_round_ms = 6000;
        assert!(matches!(
            next_round(&policy, &costly),
            RoundDecision::Stop(_)
        ));
        assert!(!Threshold::Count(3).exceeded(3, 10));
        assert!(Threshold::Count(3).exceeded(4, 10));
        assert_eq!(policy.retry_shards(16), 8);
        assert_eq!(policy.retry_shards(1), 1);
    }
}

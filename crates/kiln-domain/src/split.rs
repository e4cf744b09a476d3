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

use crate::{AttemptId, BuildId, RunnerId};

crate::id_type!(
    /// Id of a split (one split step of one build), assigned by the store.
    SplitId
);

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
    /// With a budget, the least time it gives retries, milliseconds (`5% or 1m`): a small or
    /// fast suite still retries its failed units once.
    #[serde(default = "default_budget_floor")]
    pub budget_floor_ms: u64,
    /// Most shards taking units in a retry round (0: half of the step's shards, at least 1).
    pub shards: u32,
    /// What an interaction failure does to the split (the step's `interaction` key).
    #[serde(default)]
    pub interaction: InteractionPolicy,
}

/// What an interaction failure (a batch that failed while each of its units passed alone)
/// does to the split's verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum InteractionPolicy {
    /// Reported, the verdict unchanged (the default).
    #[default]
    Warn,
    /// Reported, and the split fails.
    Fail,
}

impl InteractionPolicy {
    /// The name used in the pipeline file.
    pub fn as_str(self) -> &'static str {
        match self {
            InteractionPolicy::Warn => "warn",
            InteractionPolicy::Fail => "fail",
        }
    }
}

/// A batch whose process failed without naming a failed test while each of its units passed
/// when run alone: the units interact (one's side effects break another).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Interaction {
    /// The units of the batch, in the order they ran.
    pub units: Vec<String>,
    /// The try they ran under.
    pub try_number: u32,
    /// How the batch's process ended (`exit status 2`).
    pub detail: String,
    /// The runner that ran it (in reports; ignored in requests).
    #[serde(default)]
    pub runner: Option<String>,
}

/// The floor of a retry budget when the pipeline names none: one minute.
pub const DEFAULT_BUDGET_FLOOR_MS: u64 = 60_000;

fn default_budget_floor() -> u64 {
    DEFAULT_BUDGET_FLOOR_MS
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            attempts: 1,
            max_failures: None,
            budget_permille: None,
            budget_floor_ms: DEFAULT_BUDGET_FLOOR_MS,
            shards: 0,
            interaction: InteractionPolicy::Warn,
        }
    }
}

impl RetryPolicy {
    /// The time all retry rounds may take after a first round of `first_round_ms`, in
    /// milliseconds: the budget's share of it, but at least its floor; `None` without a budget.
    pub fn budget_ms(&self, first_round_ms: u64) -> Option<u64> {
        self.budget_permille
            .map(|p| (first_round_ms.saturating_mul(u64::from(p)) / 1000).max(self.budget_floor_ms))
    }

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
    pub attempt: AttemptId,
    /// The runner asking.
    pub runner: RunnerId,
    /// The split step's index in the job.
    pub step_index: u32,
    /// Number of this request within the attempt, from 1; a repeated number is a re-send
    /// (its results are not recorded twice, and it gets the same units again).
    pub request: u32,
    /// The units the shard found, sent with its first request.
    pub discovered: Vec<String>,
    /// Results of the previous batch.
    pub results: Vec<UnitReport>,
    /// Interaction failures found in the previous batch.
    pub interactions: Vec<Interaction>,
    /// Most units the shard wants (0: no limit beyond the dispatcher's).
    pub max_units: u32,
    /// Wall-clock milliseconds of the processes that ran the previous batch, when each unit's
    /// duration in `results` is the unit's own time (from its test cases): the difference is
    /// what starting the processes cost. 0 with `batch_processes` 0: nothing to learn.
    pub batch_ms: u64,
    /// How many processes `batch_ms` covers (0: the batch's start cost is not known).
    pub batch_processes: u32,
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

/// Where one try of a unit is: waiting in the queue, leased to a shard, or ended with its
/// outcome (only an ended try has one).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum UnitTryState {
    /// Waiting to be handed out.
    Queued,
    /// Handed to a shard (an attempt), not reported yet.
    Leased,
    /// Reported by its shard.
    Ended(UnitOutcome),
}

/// Error for a stored try state that is not one of `queued`, `leased`, `ended`, or that does
/// not agree with its outcome (an ended try has one, a queued or leased try has none).
#[derive(Debug, thiserror::Error)]
#[error("unit try state `{state}` with outcome `{}`", outcome.as_deref().unwrap_or("none"))]
pub struct UnknownUnitTryState {
    /// The stored state.
    pub state: String,
    /// The stored outcome.
    pub outcome: Option<String>,
}

impl UnitTryState {
    /// The name used in the store (`queued`, `leased`, `ended`; the outcome is stored apart).
    pub fn as_str(self) -> &'static str {
        match self {
            UnitTryState::Queued => "queued",
            UnitTryState::Leased => "leased",
            UnitTryState::Ended(_) => "ended",
        }
    }

    /// The outcome, once ended.
    pub fn outcome(self) -> Option<UnitOutcome> {
        match self {
            UnitTryState::Ended(o) => Some(o),
            UnitTryState::Queued | UnitTryState::Leased => None,
        }
    }

    /// Reads a stored state and outcome ([`UnitTryState::as_str`], [`UnitOutcome::as_str`]).
    pub fn from_stored(state: &str, outcome: Option<&str>) -> Result<Self, UnknownUnitTryState> {
        let parsed = match (state, outcome) {
            ("queued", None) => Some(UnitTryState::Queued),
            ("leased", None) => Some(UnitTryState::Leased),
            ("ended", Some(o)) => UnitOutcome::parse(o).map(UnitTryState::Ended),
            _ => None,
        };
        parsed.ok_or_else(|| UnknownUnitTryState {
            state: state.to_string(),
            outcome: outcome.map(str::to_string),
        })
    }
}

/// [`UnitTry::state`] in JSON: the outcome, `null` until the try ended (the shape of the time
/// `UnitTry` had an `outcome` field). Read back, `null` is a queued try.
mod try_state_json {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use super::{UnitOutcome, UnitTryState};

    pub fn serialize<S: Serializer>(state: &UnitTryState, s: S) -> Result<S::Ok, S::Error> {
        state.outcome().serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<UnitTryState, D::Error> {
        Ok(
            Option::<UnitOutcome>::deserialize(d)?
                .map_or(UnitTryState::Queued, UnitTryState::Ended),
        )
    }
}

/// One try of a unit, as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnitTry {
    /// Try number (1-based).
    pub try_number: u32,
    /// Queued, leased or ended (with its outcome). In JSON, `outcome`: the outcome or `null`.
    #[serde(rename = "outcome", with = "try_state_json")]
    pub state: UnitTryState,
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
    pub build_id: BuildId,
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
    /// Interaction failures, in the order they were reported.
    #[serde(default)]
    pub interactions: Vec<Interaction>,
    /// What they do to the verdict.
    #[serde(default)]
    pub interaction_policy: InteractionPolicy,
}

/// A unit's past in its repository: its verdict in the last builds that ran its split, and how
/// often it was flaky or failed in all the builds the history has counted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnitPast {
    /// The unit.
    pub unit: String,
    /// (build, verdict) of the last builds whose split ran the unit, newest first. A split
    /// still running gives `NotRun` unless the unit has passed already.
    pub recent: Vec<(BuildId, UnitVerdict)>,
    /// Finished splits in which the unit was flaky, over the whole history.
    pub flaky_total: u64,
    /// Finished splits in which the unit failed, over the whole history.
    pub failed_total: u64,
}

/// One batch of a split as it ran: the units one shard's attempt got in one round trip, when
/// they were leased and when the last of them ended (the web page's timeline).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchRecord {
    /// The split.
    pub split_id: SplitId,
    /// The split's key (job and step).
    pub split_key: String,
    /// The shard's attempt that ran it.
    pub attempt: AttemptId,
    /// The shard's job name (its row in a timeline).
    pub job: String,
    /// The request number within the attempt that leased it.
    pub request: u32,
    /// The round (try number): 1, then one more per retry round.
    pub round: u32,
    /// The runner it ran on.
    pub runner: String,
    /// When it was leased (ms since the epoch).
    pub leased_at: crate::Millis,
    /// When its last unit ended; `None` while one is still out.
    pub ended_at: Option<crate::Millis>,
    /// Its units, in lease order.
    pub units: Vec<String>,
    /// How many of them did not pass.
    pub failed: u32,
}

/// The test cases a plain step's JUnit XML files gave, for its job's current attempt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepReport {
    /// The build.
    pub build_id: BuildId,
    /// Job name and step name (`job/step`), as a split's key.
    pub key: String,
    /// The cases, in file order.
    pub cases: Vec<TestCase>,
    /// Why some of its reports were not read; empty when all were.
    pub note: String,
}

/// A queued unit as [`batch_len`] sees it: its estimated duration.
pub type EstimateMs = u64;

/// Smallest useful batch time: units shorter than this are batched so that per-unit overhead
/// (a process start, a round trip) stays small.
pub const BATCH_TARGET_MIN_MS: u64 = 200;

/// With a start cost, a shard's batch takes at most this fraction (its inverse) of the
/// shard's fair share of the work left: batches halve as the work drains, so a shard pays
/// about log2(share / (2 * start)) starts and the tail is short.
pub const START_SHARE_DIV: u64 = 2;

/// With a start cost, a batch is estimated to take at least this many times the start cost
/// (start-up at most a third of the smallest batch), unless the shard's fair share is less.
pub const START_MIN_BATCHES: u64 = 2;

/// With a start cost, batches need never be estimated at more than this many times it (start
/// at most 2% of a batch): where the start is cheap, the plain rule's finer batches apply.
pub const START_MAX_BATCHES: u64 = 50;

/// How many units of the queue (estimates, in the order they will be handed out) go in the
/// next batch for one of `shards` shards, when starting a batch's process costs `start_ms` and
/// other shards hold batches estimated at `in_flight_ms` in all.
///
/// Without a start cost (`start_ms == 0`: none learned yet), a batch takes units while their
/// estimated total stays under a slice of the time left divided among the shards (an eighth
/// of each shard's share), so batches shrink as the queue drains and the tail stays short, but
/// never under [`BATCH_TARGET_MIN_MS`] worth of tiny units.
///
/// With a start cost, every batch pays one start, and a shard that gets many small batches
/// pays many; few big ones leave a long tail. The target is then half of the shard's fair
/// share of the work left (queued and in flight on other shards, divided among the shards;
/// [`START_SHARE_DIV`]): as the work drains, each shard's batches halve, so it pays about
/// log2(share / (2 * start)) + 1 starts and its last batch is small. The target is at least
/// [`START_MIN_BATCHES`] times the start cost (so a suite whose share is under that runs in
/// one process per shard), never more than [`START_MAX_BATCHES`] times it nor under the plain
/// rule's target, and never more than the shard's fair share, so no shard takes another's.
///
/// The estimates are the ones to size with: the store passes [`sizing_estimates`], where, with
/// a start cost, a unit whose history is not [`reliable`] counts for at least
/// [`sizing_floor`].
///
/// Never more than `max` units (0: no limit). Always at least one unit when the queue is not
/// empty.
pub fn batch_len(
    queue: &[EstimateMs],
    shards: u32,
    max: u32,
    start_ms: u64,
    in_flight_ms: u64,
) -> usize {
    if queue.is_empty() {
        return 0;
    }
    let shards = u64::from(shards.max(1));
    let left: u64 = queue.iter().fold(0u64, |a, &e| a.saturating_add(e));
    let per_shard = left / shards;
    let plain = (per_shard / 8).max(BATCH_TARGET_MIN_MS.min(per_shard));
    let target = if start_ms == 0 {
        plain
    } else {
        let fair = (left.saturating_add(in_flight_ms) / shards).min(left);
        let halved = (fair / START_SHARE_DIV)
            .max(start_ms.saturating_mul(START_MIN_BATCHES))
            .min(start_ms.saturating_mul(START_MAX_BATCHES));
        halved.max(plain).min(fair.max(plain))
    };
    let cap = if max == 0 { usize::MAX } else { max as usize };
    let mut total = 0u64;
    let mut n = 0usize;
    for &est in queue {
        if n >= cap || (n > 0 && total.saturating_add(est) > target) {
            break;
        }
        total = total.saturating_add(est);
        n += 1;
    }
    n.max(1)
}

/// A unit's recorded durations are trusted as they are for sizing batches when there are at
/// least this many of them ...
pub const RELIABLE_SAMPLES: usize = 3;

/// ... and the longest is at most this many times the shortest.
pub const RELIABLE_SPREAD: u64 = 2;

/// With a start cost, a unit whose history is not [`reliable`] counts for at least this
/// fraction (numerator, denominator) of the split's median estimate when batches are sized.
pub const UNRELIABLE_FLOOR: (u64, u64) = (3, 4);

/// Whether a unit's recorded durations (oldest first) are trusted as they are for sizing
/// batches: at least [`RELIABLE_SAMPLES`] of them, the longest at most [`RELIABLE_SPREAD`]
/// times the shortest. One recorded run, or runs that disagree, may be far off the unit's
/// time today (a unit that got slower, a flaky machine); no history at all is not reliable.
pub fn reliable(history: &[u64]) -> bool {
    let (Some(&min), Some(&max)) = (history.iter().min(), history.iter().max()) else {
        return false;
    };
    history.len() >= RELIABLE_SAMPLES && max <= min.max(1).saturating_mul(RELIABLE_SPREAD)
}

/// The least estimate an unreliable unit counts for when a batch is sized with a start cost of
/// `start_ms`: [`UNRELIABLE_FLOOR`] of the median of the split's estimates (`split_estimates`,
/// every unit's, in any order), never more than the start cost; 0 without a start cost.
///
/// Why: the queue is longest first, so the units recorded far under a typical unit come last,
/// and the last batches, sized to a few starts' worth, take many of them at once. A unit
/// recorded once at a fifth of its time then hides in a batch estimated as small, and that
/// batch ends long after the others. Counting such units as at least most of a typical unit
/// keeps the last batches to fewer of them (and the shards' fair shares honest); capping the
/// floor at the start cost leaves splits whose start is cheap (batches of many short units)
/// as they were.
pub fn sizing_floor(split_estimates: &[EstimateMs], start_ms: u64) -> EstimateMs {
    if start_ms == 0 {
        return 0;
    }
    let (num, den) = UNRELIABLE_FLOOR;
    median(split_estimates.to_vec())
        .map(|m| (m.saturating_mul(num) / den).min(start_ms))
        .unwrap_or(0)
}

/// The estimates [`batch_len`] sizes with, from the queue's (estimate, [`reliable`]) pairs:
/// an unreliable unit's estimate is raised to `floor` (see [`sizing_floor`]); a reliable
/// unit's is kept. The queue's order is not changed.
pub fn sizing_estimates(queue: &[(EstimateMs, bool)], floor: EstimateMs) -> Vec<EstimateMs> {
    queue
        .iter()
        .map(|&(est, ok)| if ok { est } else { est.max(floor) })
        .collect()
}

/// The per-process start cost seen in one batch: its processes' wall time less its units' own
/// times, per process; `None` when the batch tells nothing (no process, or no wall time).
pub fn start_cost(batch_ms: u64, processes: u32, unit_ms: &[u64]) -> Option<u64> {
    if processes == 0 || batch_ms == 0 {
        return None;
    }
    let own: u64 = unit_ms.iter().fold(0u64, |a, &d| a.saturating_add(d));
    Some(batch_ms.saturating_sub(own) / u64::from(processes))
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
}

/// A unit that failed in the round that just ended, for [`next_round`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailedUnit {
    /// The unit id.
    pub unit: String,
    /// Estimated time of running it once more (its last duration), milliseconds.
    pub estimate_ms: u64,
}

/// Whether another round runs, and if not, why (for the report).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RoundDecision {
    /// Run these failed units (indices into the list given to [`next_round`], in its order)
    /// again as round `round + 1`; `note` says which were left out and why (empty when none).
    Retry {
        /// The units to run again.
        units: Vec<usize>,
        /// The units left out and why, for the report.
        note: String,
    },
    /// Stop: the split is over.
    Stop(String),
}

/// Most units named in a note; the rest are counted.
const NOTE_UNITS: usize = 20;

/// `units` for a note: names and estimates, at most [`NOTE_UNITS`] of them.
fn unit_list(failed: &[FailedUnit], which: &[usize]) -> String {
    let mut parts: Vec<String> = which
        .iter()
        .take(NOTE_UNITS)
        .map(|&i| format!("{} (~{} ms)", failed[i].unit, failed[i].estimate_ms))
        .collect();
    if which.len() > NOTE_UNITS {
        parts.push(format!("and {} more", which.len() - NOTE_UNITS));
    }
    parts.join(", ")
}

/// Decides, at the end of a round with failures (`failed`, the units that failed in it),
/// whether failed units run again, and which.
///
/// With a budget, units are taken cheapest first while their estimates fit in what the budget
/// has left (the budget is at least its floor, so each failed unit that fits in the floor gets
/// its retry); the others are not retried, and the decision's note names them.
pub fn next_round(policy: &RetryPolicy, s: &RoundStats, failed: &[FailedUnit]) -> RoundDecision {
    if s.failed == 0 || failed.is_empty() {
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
    let all: Vec<usize> = (0..failed.len()).collect();
    let (Some(budget), Some(p)) = (policy.budget_ms(s.first_round_ms), policy.budget_permille)
    else {
        return RoundDecision::Retry {
            units: all,
            note: String::new(),
        };
    };
    let left = budget.saturating_sub(s.retry_ms);
    let mut order = all;
    order.sort_by_key(|&i| (failed[i].estimate_ms, i));
    let (mut used, mut take, mut out) = (0u64, Vec::new(), Vec::new());
    for i in order {
        let est = failed[i].estimate_ms;
        if used.saturating_add(est) <= left {
            used += est;
            take.push(i);
        } else {
            out.push(i);
        }
    }
    take.sort_unstable();
    out.sort_unstable();
    let why = format!(
        "the retry budget of {budget} ms ({}.{}% of the first round, at least {} ms) has {left} ms \
         left",
        p / 10,
        p % 10,
        policy.budget_floor_ms
    );
    if take.is_empty() {
        return RoundDecision::Stop(format!("not retried: {} ({why})", unit_list(failed, &out)));
    }
    let note = if out.is_empty() {
        String::new()
    } else {
        format!(
            "round {}: not retried: {} ({why})",
            s.round + 1,
            unit_list(failed, &out)
        )
    };
    RoundDecision::Retry { units: take, note }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_shrink_as_the_queue_drains() {
        let queue = vec![30u64; 1000];
        let big = batch_len(&queue, 4, 0, 0, 0);
        let small = batch_len(&queue[..40], 4, 0, 0, 0);
        assert!(big > small, "{big} > {small}");
        assert!(small >= 1);
        assert_eq!(batch_len(&[5000, 10, 10], 4, 0, 0, 0), 1);
        assert_eq!(batch_len(&queue, 4, 3, 0, 0), 3);
        assert_eq!(batch_len(&[], 4, 0, 0, 0), 0);
    }

    #[test]
    fn a_start_cost_makes_batches_big_enough_to_pay_for_it() {
        // 300 ms to start a process, 10 ms units: half of a shard's share in the first batch.
        let queue = vec![10u64; 10_000];
        let before = batch_len(&queue, 4, 0, 0, 0);
        let n = batch_len(&queue, 4, 0, 300, 0);
        assert!(n >= 270, "{n} units, {before} without a start cost");
        // Early in a small queue: bigger than without a start cost, but never more than the
        // shard's fair share.
        let small = vec![10u64; 200];
        let n = batch_len(&small, 4, 0, 300, 0);
        assert!((27..=50).contains(&n), "{n}");
        assert!(n > batch_len(&small, 4, 0, 0, 0), "{n}");
        // The tail still shrinks: a nearly drained queue hands out less.
        assert!(batch_len(&small[..20], 4, 0, 300, 0) < n);
        assert_eq!(batch_len(&small[..20], 4, 0, 300, 0), 5);
        // Other shards' batches in flight count in the fair share: the last of 4 shards to
        // ask at the start takes the rest (not a quarter of it), so no shard pays a second
        // start in the tail.
        assert_eq!(batch_len(&small[..50], 4, 0, 300, 1500), 50);
        assert_eq!(batch_len(&small[..100], 4, 0, 300, 1000), 50);
        // The shard's own limit still holds.
        assert_eq!(batch_len(&queue, 4, 7, 300, 0), 7);
        // Zero start cost keeps the plain rule.
        for len in [1usize, 3, 40, 200, 1000] {
            for shards in [1u32, 4, 16] {
                let q: Vec<u64> = (0..len as u64).map(|i| 5 + i % 40).collect();
                let plain = {
                    let left: u64 = q.iter().sum();
                    let per = left / u64::from(shards);
                    let target = (per / 8).max(BATCH_TARGET_MIN_MS.min(per));
                    let mut t = 0;
                    let mut n = 0;
                    for &e in &q {
                        if n > 0 && t + e > target {
                            break;
                        }
                        t += e;
                        n += 1;
                    }
                    n
                };
                assert_eq!(
                    batch_len(&q, shards, 0, 0, 0),
                    plain,
                    "{len} units, {shards}"
                );
                assert_eq!(
                    batch_len(&q, shards, 0, 0, 9000),
                    plain,
                    "{len} units, {shards}"
                );
            }
        }
    }

    /// A seeded generator for the sizing tests: the same suites on every run.
    struct Rng(rand::rngs::StdRng);

    impl Rng {
        fn seeded(seed: u64) -> Rng {
            Rng(rand::SeedableRng::seed_from_u64(seed))
        }

        fn below(&mut self, n: u64) -> u64 {
            rand::Rng::random_range(&mut self.0, 0..n.max(1))
        }
    }

    /// A suite shaped as `kiln bench split`'s: 200 units, most of tens to hundreds of ms, a
    /// few of seconds, two of about 5 s; true durations in ms.
    fn bench_like_suite(seed: u64) -> Vec<u64> {
        let mut rng = Rng::seeded(seed);
        let mut units: Vec<u64> = (0..198)
            .map(|i| {
                let tests = 2 + rng.below(7);
                let ordinary: u64 = (0..tests)
                    .map(|_| {
                        if rng.below(10) == 0 {
                            100 + rng.below(400)
                        } else {
                            10 + rng.below(80)
                        }
                    })
                    .sum();
                ordinary
                    + if i % 20 == 0 {
                        1000 + rng.below(3000)
                    } else {
                        0
                    }
            })
            .collect();
        let total: u64 = units.iter().sum::<u64>() * 16 / 14;
        units.push(total * 95 / 100 / 16);
        units.push(total * 95 / 100 / 16);
        units
    }

    /// Shards pulling batches sized by `rule` from a queue ordered longest first (estimates
    /// = truth), each batch costing `start_ms` + `overhead_ms` + its units' time: the makespan
    /// and the number of processes.
    fn simulate(
        truth: &[u64],
        shards: u32,
        start_ms: u64,
        overhead_ms: u64,
        rule: impl Fn(&[u64], u32, u64, u64) -> usize,
    ) -> (u64, usize) {
        let mut queue = truth.to_vec();
        queue.sort_unstable_by(|a, b| b.cmp(a));
        // Per shard: (free at, estimate of the batch it holds).
        let mut shard: Vec<(u64, u64)> = vec![(0, 0); shards as usize];
        let (mut at, mut processes, mut end) = (0usize, 0usize, 0u64);
        while at < queue.len() {
            let (i, &(now, _)) = shard
                .iter()
                .enumerate()
                .min_by_key(|&(i, s)| (s.0, i))
                .unwrap_or((0, &(0, 0)));
            shard[i].1 = 0;
            let in_flight: u64 = shard.iter().filter(|s| s.0 > now).map(|s| s.1).sum();
            let k = rule(&queue[at..], shards, start_ms, in_flight).max(1);
            let work: u64 = queue[at..(at + k).min(queue.len())].iter().sum();
            at += k;
            processes += 1;
            shard[i] = (now + start_ms + overhead_ms + work, work);
            end = end.max(shard[i].0);
        }
        (end, processes)
    }

    /// The history `kiln bench split` seeds, made deterministically for `truth` (a
    /// [`bench_like_suite`]): the longest heavy unit recorded 5x too short, another 5x too long,
    /// 18 ordinary units 5x one way or the other, 10 not recorded (estimated at the median of
    /// the recorded ones), the rest exact. Every unit has one recorded run at most, so none is
    /// [`reliable`].
    fn wrong_history(truth: &[u64], seed: u64) -> Vec<u64> {
        let mut rng = Rng::seeded(seed.wrapping_mul(0x2545_f491_4f6c_dd1d));
        let n = truth.len();
        let heavy: Vec<usize> = (0..n - 2).filter(|i| i % 20 == 0).collect();
        let longest = heavy
            .iter()
            .copied()
            .max_by_key(|&i| (truth[i], i))
            .unwrap_or(0);
        let mut est: Vec<Option<u64>> = truth.iter().map(|&t| Some(t)).collect();
        est[longest] = Some(truth[longest] / 5);
        let other =
            heavy[(heavy.iter().position(|&i| i == longest).unwrap_or(0) + 1) % heavy.len()];
        est[other] = Some(truth[other] * 5);
        let mut ordinary: Vec<usize> = (0..n - 2).filter(|i| i % 20 != 0).collect();
        for k in 0..28 {
            let j = k + rng.below((ordinary.len() - k) as u64) as usize;
            ordinary.swap(k, j);
            let i = ordinary[k];
            est[i] = match (k < 18, rng.below(2)) {
                (false, _) => None,
                (true, 0) => Some((truth[i] / 5).max(1)),
                (true, _) => Some(truth[i] * 5),
            };
        }
        let fallback = median(est.iter().flatten().copied().collect()).unwrap_or(1);
        est.into_iter().map(|e| e.unwrap_or(fallback)).collect()
    }

    /// As [`simulate`], with estimates apart from the truth: the queue longest first by
    /// estimate; every unit unreliable, so with `floor` its sizing estimate is raised to
    /// [`sizing_floor`] (without, batches are sized on the estimates as recorded).
    fn simulate_estimated(
        truth: &[u64],
        est: &[u64],
        shards: u32,
        start_ms: u64,
        floor: bool,
    ) -> (u64, usize) {
        let mut order: Vec<usize> = (0..truth.len()).collect();
        order.sort_unstable_by_key(|&i| (std::cmp::Reverse(est[i]), i));
        let low = if floor {
            sizing_floor(est, start_ms)
        } else {
            0
        };
        let mut shard: Vec<(u64, u64)> = vec![(0, 0); shards as usize];
        let (mut at, mut processes, mut end) = (0usize, 0usize, 0u64);
        while at < order.len() {
            let (i, &(now, _)) = shard
                .iter()
                .enumerate()
                .min_by_key(|&(i, s)| (s.0, i))
                .unwrap_or((0, &(0, 0)));
            shard[i].1 = 0;
            let in_flight: u64 = shard.iter().filter(|s| s.0 > now).map(|s| s.1).sum();
            let queue: Vec<(u64, bool)> = order[at..].iter().map(|&u| (est[u], false)).collect();
            let sizing = sizing_estimates(&queue, low);
            let k = batch_len(&sizing, shards, 0, start_ms, in_flight).max(1);
            let taken = &order[at..(at + k).min(order.len())];
            let work: u64 = taken.iter().map(|&u| truth[u]).sum();
            let estimated: u64 = taken.iter().map(|&u| est[u]).sum();
            at += k;
            processes += 1;
            shard[i] = (now + start_ms + 30 + work, estimated);
            end = end.max(shard[i].0);
        }
        (end, processes)
    }

    /// The lower bound that counts one start per shard.
    fn bound(truth: &[u64], shards: u32, start_ms: u64) -> u64 {
        let total: u64 = truth.iter().sum();
        let longest = truth.iter().copied().max().unwrap_or(0);
        (total / u64::from(shards)).max(longest) + start_ms
    }

    #[test]
    fn with_a_start_cost_of_300_ms_4_shards_come_within_a_tenth_of_the_bound() {
        // The sizing rule alone (estimates right, 30 ms per round trip): at N = 4 within
        // 1.10x of max(total / N, longest) + one start, for several suites.
        for seed in [1u64, 42, 7, 1234, 99] {
            let truth = bench_like_suite(seed);
            let b = bound(&truth, 4, 300);
            let (makespan, processes) =
                simulate(&truth, 4, 300, 30, |q, n, s, f| batch_len(q, n, 0, s, f));
            assert!(
                makespan * 100 <= b * 110,
                "seed {seed}: makespan {makespan} ms, bound {b} ms, {processes} processes"
            );
            // Without start cost known the same suite pays far more starts.
            let (plain, plain_processes) =
                simulate(&truth, 4, 300, 30, |q, n, _, f| batch_len(q, n, 0, 0, f));
            assert!(
                processes * 2 < plain_processes,
                "{processes} vs {plain_processes}"
            );
            assert!(makespan < plain, "{makespan} vs {plain}");
        }
    }

    #[test]
    fn with_a_start_cost_a_shard_pays_a_few_starts_whatever_the_suite() {
        // 16 shards: each pays about log2(share / 2 start) + 1 starts, not share / (9 start).
        for seed in [3u64, 5, 8] {
            let truth = bench_like_suite(seed);
            let (makespan, processes) =
                simulate(&truth, 16, 300, 30, |q, n, s, f| batch_len(q, n, 0, s, f));
            let b = bound(&truth, 16, 300);
            assert!(processes <= 16 * 4, "seed {seed}: {processes} processes");
            assert!(
                makespan * 100 <= b * 125,
                "seed {seed}: makespan {makespan} ms, bound {b} ms"
            );
        }
    }

    #[test]
    fn a_history_is_reliable_with_three_runs_that_agree() {
        assert!(!reliable(&[]));
        assert!(!reliable(&[500]));
        assert!(!reliable(&[500, 510]));
        assert!(reliable(&[500, 510, 490]));
        assert!(reliable(&[300, 600, 450, 400, 500]));
        // A run more than twice another: not to be trusted as it is.
        assert!(!reliable(&[300, 601, 450]));
        assert!(!reliable(&[100, 100, 100, 100, 1000]));
        assert!(reliable(&[0, 0, 1]));
    }

    #[test]
    fn the_sizing_floor_is_most_of_a_typical_unit_at_most_one_start() {
        let est = [10, 40, 200, 240, 300, 900, 5000];
        // Median 240: three quarters of it, under the start cost.
        assert_eq!(sizing_floor(&est, 300), 180);
        // Capped at the start cost: a cheap start leaves the units as recorded.
        assert_eq!(sizing_floor(&est, 50), 50);
        assert_eq!(sizing_floor(&est, 1), 1);
        // No start cost, no floor; no estimates, no floor.
        assert_eq!(sizing_floor(&est, 0), 0);
        assert_eq!(sizing_floor(&[], 300), 0);
    }

    #[test]
    fn only_unreliable_units_are_raised_to_the_floor() {
        let queue = [
            (900, false),
            (900, true),
            (100, true),
            (100, false),
            (20, false),
        ];
        assert_eq!(sizing_estimates(&queue, 180), [900, 900, 100, 180, 180]);
        assert_eq!(sizing_estimates(&queue, 0), [900, 900, 100, 100, 20]);
        assert!(sizing_estimates(&[], 180).is_empty());
    }

    #[test]
    fn the_floor_keeps_units_recorded_too_short_from_piling_up_in_the_last_batch() {
        // The end of a queue, longest first: ordinary units of about 240 ms, then eight that
        // one old run recorded at 20-65 ms (each really about 5x that).
        let mut queue: Vec<(u64, bool)> = vec![(240, false); 12];
        queue.extend([65, 56, 53, 43, 32, 24, 18, 17].map(|e| (e, false)));
        let raw = sizing_estimates(&queue, 0);
        let floored = sizing_estimates(&queue, sizing_floor(&raw, 320));
        // A batch is at least two starts' worth (640 ms): as recorded, the eight fit in one
        // (308 ms estimated, about 1.5 s in truth, on one shard at the very end); with the
        // floor, four per batch.
        assert_eq!(batch_len(&raw[12..], 1, 0, 320, 0), 8);
        assert_eq!(batch_len(&floored[12..], 1, 0, 320, 0), 4);
        assert_eq!(floored[12..], [180; 8]);
    }

    #[test]
    fn with_a_start_cost_and_a_wrong_history_the_floor_shortens_the_split() {
        // The bench's design at N = 16 (see `wrong_history`), 300 ms per start, for 8 suites:
        // with every unit unreliable and the floor, the makespan is shorter on average and in
        // the worst case, and no suite is much worse.
        let (mut with, mut without, mut worst_with, mut worst_without) = (0f64, 0f64, 0f64, 0f64);
        for seed in 1u64..=8 {
            let truth = bench_like_suite(seed);
            let est = wrong_history(&truth, seed);
            let b = bound(&truth, 16, 300) as f64;
            let (floored, _) = simulate_estimated(&truth, &est, 16, 300, true);
            let (plain, _) = simulate_estimated(&truth, &est, 16, 300, false);
            let (f, p) = (floored as f64 / b, plain as f64 / b);
            assert!(
                f <= p + 0.05,
                "seed {seed}: {f:.3} with the floor, {p:.3} without"
            );
            with += f / 8.0;
            without += p / 8.0;
            worst_with = worst_with.max(f);
            worst_without = worst_without.max(p);
        }
        assert!(
            with < without && worst_with < worst_without,
            "mean {with:.3} vs {without:.3}, worst {worst_with:.3} vs {worst_without:.3}"
        );
    }

    #[test]
    fn a_suite_whose_share_is_under_two_starts_runs_in_one_process_per_shard() {
        // Files of about 65 ms over 4 shards with a 300 ms start: one batch each when they
        // divide evenly, one more for what is left when they do not.
        let batches = |queue: &[u64]| {
            let (mut at, mut in_flight, mut out) = (0, 0, Vec::new());
            while at < queue.len() {
                let n = batch_len(&queue[at..], 4, 0, 300, in_flight);
                in_flight += queue[at..at + n].iter().sum::<u64>();
                at += n;
                out.push(n);
            }
            out
        };
        assert_eq!(batches(&[65; 28]), [7, 7, 7, 7]);
        assert_eq!(batches(&[65; 30]), [7, 7, 7, 7, 2]);
        // Without a start cost the same suite is cut in batches of 200 ms.
        let mut at = 0;
        let mut plain = 0;
        let queue = [65u64; 28];
        while at < queue.len() {
            at += batch_len(&queue[at..], 4, 0, 0, 0);
            plain += 1;
        }
        assert!(plain >= 9, "{plain}");
    }

    /// A unit's estimate: a few very short, many short, some long, a few very long.
    fn estimate() -> impl proptest::strategy::Strategy<Value = u64> {
        proptest::prop_oneof![0..5u64, 0..100u64, 0..2_000u64, 0..60_000u64]
    }

    proptest::proptest! {
        #![proptest_config(proptest::test_runner::Config::with_cases(2000))]

        #[test]
        fn batch_len_properties_hold_for_random_queues(
            queue in proptest::collection::vec(estimate(), 0..300),
            shards in 1..=32u32,
            max in proptest::prop_oneof![2 => proptest::strategy::Just(0u32), 1 => 0..20u32],
            start in proptest::sample::select(vec![0u64, 1, 50, 300, 2_000]),
            in_flight in 0..100_000u64,
        ) {
            let len = queue.len();
            let n = batch_len(&queue, shards, max, start, in_flight);
            let case = format!("{len} units, {shards} shards, max {max}, start {start}");
            if queue.is_empty() {
                proptest::prop_assert_eq!(n, 0, "{}", case);
                return Ok(());
            }
            // Some unit, no more than the queue and the limit.
            proptest::prop_assert!(n >= 1 && n <= len, "{}: {}", case, n);
            if max > 0 {
                proptest::prop_assert!(n <= (max as usize).max(1), "{}: {}", case, n);
            }
            // A higher start cost never makes a batch smaller.
            let higher = batch_len(&queue, shards, max, start * 2 + 1, in_flight);
            proptest::prop_assert!(higher >= n, "{}: {} < {}", case, higher, n);
            // Beyond its first unit, a batch never holds more than the larger of the shard's
            // fair share (with the work in flight) and the plain target.
            let left: u64 = queue.iter().sum();
            let fair = ((left + in_flight) / u64::from(shards)).min(left);
            let per = left / u64::from(shards);
            let plain = (per / 8).max(BATCH_TARGET_MIN_MS.min(per));
            let took: u64 = queue[..n].iter().sum();
            if n > 1 {
                proptest::prop_assert!(took <= fair.max(plain), "{}: {} > {}, {}", case, took, fair, plain);
            }
        }
    }

    #[test]
    fn the_start_cost_is_what_the_units_own_times_leave() {
        assert_eq!(start_cost(1000, 1, &[100, 200, 400]), Some(300));
        assert_eq!(start_cost(1000, 2, &[100, 200, 100]), Some(300));
        assert_eq!(start_cost(500, 1, &[400, 400]), Some(0));
        assert_eq!(start_cost(1000, 0, &[1]), None);
        assert_eq!(start_cost(0, 1, &[1]), None);
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
        }
    }

    /// `n` failed units of `ms` each.
    fn failed(n: usize, ms: u64) -> Vec<FailedUnit> {
        (0..n)
            .map(|i| FailedUnit {
                unit: format!("u{i}"),
                estimate_ms: ms,
            })
            .collect()
    }

    fn retried(d: &RoundDecision) -> Option<&[usize]> {
        match d {
            RoundDecision::Retry { units, .. } => Some(units),
            RoundDecision::Stop(_) => None,
        }
    }

    #[test]
    fn retry_rules() {
        let policy = RetryPolicy {
            attempts: 3,
            max_failures: Some(Threshold::Permille(100)),
            budget_permille: Some(50),
            budget_floor_ms: 0,
            shards: 0,
            interaction: InteractionPolicy::Warn,
        };
        let all = RoundDecision::Retry {
            units: (0..5).collect(),
            note: String::new(),
        };
        assert_eq!(next_round(&policy, &stats(1, 5, 0), &failed(5, 200)), all);
        assert!(matches!(
            next_round(&policy, &stats(2, 5, 0), &failed(5, 200)),
            RoundDecision::Stop(_)
        ));
        assert_eq!(
            retried(&next_round(&policy, &stats(2, 4, 1), &failed(4, 200))),
            Some(&[0, 1, 2, 3][..])
        );
        assert!(matches!(
            next_round(&policy, &stats(3, 4, 1), &failed(4, 200)),
            RoundDecision::Stop(_)
        ));
        let mut many = stats(1, 30, 0);
        many.first_failed = 30;
        assert!(matches!(
            next_round(&policy, &many, &failed(30, 1)),
            RoundDecision::Stop(_)
        ));
        // 5% of 100 s is 5 s: five units of 1.2 s exceed it, four fit.
        let d = next_round(&policy, &stats(1, 5, 0), &failed(5, 1200));
        assert_eq!(retried(&d), Some(&[0, 1, 2, 3][..]));
        assert!(matches!(&d, RoundDecision::Retry { note, .. } if note.contains("u4 (~1200 ms)")));
        assert!(!Threshold::Count(3).exceeded(3, 10));
        assert!(Threshold::Count(3).exceeded(4, 10));
        assert_eq!(policy.retry_shards(16), 8);
        assert_eq!(policy.retry_shards(1), 1);
    }

    /// The README's `budget: "5%"` on a suite whose first round took 24.6 s: 5% is 1232 ms, and
    /// the flaky unit in the slowest file took 4 s. The floor (one minute by default) leaves
    /// room to retry it.
    #[test]
    fn a_budget_floor_leaves_room_to_retry_each_failed_unit_once() {
        let policy = RetryPolicy {
            attempts: 3,
            max_failures: Some(Threshold::Permille(100)),
            budget_permille: Some(50),
            ..RetryPolicy::default()
        };
        assert_eq!(policy.budget_floor_ms, DEFAULT_BUDGET_FLOOR_MS);
        let mut s = stats(1, 1, 0);
        s.first_round_ms = 24_640;
        s.first_failed = 1;
        let slow = [FailedUnit {
            unit: "tests/test_slowest.py".into(),
            estimate_ms: 4_000,
        }];
        assert_eq!(policy.budget_ms(s.first_round_ms), Some(60_000));
        assert_eq!(
            next_round(&policy, &s, &slow),
            RoundDecision::Retry {
                units: vec![0],
                note: String::new()
            }
        );
        // Without the floor (the old rule), it was not retried.
        let no_floor = RetryPolicy {
            budget_floor_ms: 0,
            ..policy.clone()
        };
        assert_eq!(no_floor.budget_ms(s.first_round_ms), Some(1_232));
        let RoundDecision::Stop(why) = next_round(&no_floor, &s, &slow) else {
            panic!("retried without room");
        };
        assert!(
            why.contains("not retried: tests/test_slowest.py (~4000 ms)")
                && why.contains("1232 ms"),
            "{why}"
        );
        // A large suite: 5% of 40 min is 2 min, more than the floor.
        s.first_round_ms = 2_400_000;
        assert_eq!(policy.budget_ms(s.first_round_ms), Some(120_000));
        // Several failures: the cheapest fit, the others are named with the reason; the time
        // already spent on retries counts.
        let mut s = stats(2, 3, 1);
        s.first_round_ms = 10_000;
        s.retry_ms = 20_000;
        let units = vec![
            FailedUnit {
                unit: "big".into(),
                estimate_ms: 30_000,
            },
            FailedUnit {
                unit: "small".into(),
                estimate_ms: 5_000,
            },
            FailedUnit {
                unit: "medium".into(),
                estimate_ms: 20_000,
            },
        ];
        let d = next_round(&policy, &s, &units);
        let RoundDecision::Retry { units: take, note } = &d else {
            panic!("{d:?}");
        };
        assert_eq!(take, &[1, 2]);
        assert!(
            note.starts_with("round 3: not retried: big (~30000 ms)")
                && note.contains("40000 ms left"),
            "{note}"
        );
        // Under the threshold but over it: the threshold still decides first.
        let mut over = stats(1, 20, 0);
        over.first_failed = 20;
        assert!(matches!(
            next_round(&policy, &over, &failed(20, 1)),
            RoundDecision::Stop(w) if w.contains("threshold")
        ));
    }

    #[test]
    fn unit_try_states_read_back_from_what_the_store_writes() {
        use UnitTryState::*;
        for st in [
            Queued,
            Leased,
            Ended(UnitOutcome::Passed),
            Ended(UnitOutcome::Errored),
        ] {
            let outcome = st.outcome().map(UnitOutcome::as_str);
            assert_eq!(
                UnitTryState::from_stored(st.as_str(), outcome).ok(),
                Some(st)
            );
        }
        for (state, outcome) in [
            ("ended", None),
            ("queued", Some("passed")),
            ("leased", Some("failed")),
            ("ended", Some("bogus")),
            ("running", None),
        ] {
            let e = UnitTryState::from_stored(state, outcome)
                .err()
                .map(|e| e.to_string());
            assert!(e.is_some_and(|e| e.contains(state)), "{state} {outcome:?}");
        }
        // JSON keeps the shape of the old `outcome: Option<UnitOutcome>` field.
        let t = UnitTry {
            try_number: 2,
            state: Ended(UnitOutcome::Failed),
            runner: None,
            duration_ms: 5,
            cases: vec![],
        };
        let json = serde_json::to_value(&t).unwrap_or_default();
        assert_eq!(json["outcome"], "failed");
        assert_eq!(
            serde_json::from_value::<UnitTry>(json).ok(),
            Some(t.clone())
        );
        let leased = UnitTry { state: Leased, ..t };
        let json = serde_json::to_value(&leased).unwrap_or_default();
        assert!(
            json["outcome"].is_null() && json.get("state").is_none(),
            "{json}"
        );
    }

    #[test]
    fn a_policy_without_a_floor_field_gets_the_default() {
        let old = r#"{"attempts":2,"max_failures":null,"budget_permille":50,"shards":0}"#;
        let p: RetryPolicy = serde_json::from_str(old).unwrap_or_default();
        assert_eq!(p.budget_floor_ms, DEFAULT_BUDGET_FLOOR_MS);
        assert_eq!(p.budget_permille, Some(50));
    }
}

//! Kiln's durable state: builds, jobs, attempts, step results and runners in a [`Store`], and
//! job output in append-only logs behind [`JobLogs`].
//!
//! - [`Store`] is the interface the dispatcher talks to. Every state change is one transaction
//!   (with SQLite, one savepoint of a group commit shared with concurrent callers),
//!   and a job's final result is written with a compare-and-set on its current attempt, so a
//!   result from any other attempt changes nothing ("exactly one final result").
//! - [`SqliteStore`] implements it on one SQLite file (WAL, `synchronous=FULL`, group commit,
//!   reads on read-only connections); [`PgStore`]
//!   on PostgreSQL (several dispatchers can share one database), with the same rules as
//!   transactions and row locks.
//! - [`LogStore`] keeps each job's output as a file of frames (attempt, sequence number, step,
//!   stream, bytes), so output is kept byte for byte and a restarted dispatcher can tell which
//!   chunks it already has. [`PgLogStore`] keeps the same frames, the same bytes at the same
//!   offsets, as rows of the PostgreSQL database, for several dispatchers on one database.
//!
//! Everything here is synchronous; the dispatcher calls it from blocking tasks.

mod bus;
#[cfg(test)]
mod cluster_tests;
#[cfg(test)]
mod concurrent_tests;
mod deliveries;
mod group_commit;
#[cfg(test)]
mod group_commit_tests;
mod logs;
mod pg;
mod split;
mod sqlite;
mod tallies;
#[cfg(test)]
mod testing;

use std::collections::BTreeMap;

use kiln_domain::split::{SplitReport, UnitsReply, UnitsRequest};
use kiln_domain::{
    AttemptId, AttemptState, Build, BuildId, DispatcherId, Job, JobId, JobState, Millis, NewBuild,
    RunnerId, RunnerRecord, StepResult,
};

pub use bus::{Bus, BusMessage, BusReceiver, BusSender, Heard, Said};
pub use deliveries::{Delivery, DeliveryKey, DeliveryResult, DeliveryState, Mark, NewDelivery};
pub use logs::{
    AttemptLines, CHECKPOINT_EVERY, Checkpoint, Frame, FrameHeader, JobLogs, Located, LogError,
    LogStore, MAX_FRAME, ReadResult, is_disk_full,
};
pub use pg::{PgConfig, PgLogStore, PgStore};
pub use sqlite::SqliteStore;

/// Errors from the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database failed.
    #[error("database error")]
    Sqlite(#[from] rusqlite::Error),
    /// PostgreSQL failed (see [`PgStore`]).
    #[error("database error")]
    Postgres(#[from] tokio_postgres::Error),
    /// No PostgreSQL connection could be had from the pool.
    #[error("database connection pool: {0}")]
    Pool(String),
    /// A stored value could not be decoded (corruption or a newer schema).
    #[error("corrupt stored value: {0}")]
    Corrupt(String),
    /// The same repository, commit and pipeline was already built (retry it instead).
    #[error("already built as build {build}")]
    Duplicate {
        /// The existing build.
        build: BuildId,
    },
    /// The data directory could not be used.
    #[error("cannot open store at {path}")]
    Open {
        /// The path.
        path: String,
        /// Why.
        #[source]
        cause: std::io::Error,
    },
}

impl StoreError {
    /// Whether the store failed because its disk (or quota) is full: nothing can be written
    /// until space is freed, and a retry then succeeds.
    pub fn is_disk_full(&self) -> bool {
        match self {
            StoreError::Sqlite(rusqlite::Error::SqliteFailure(e, _)) => {
                e.code == rusqlite::ErrorCode::DiskFull
            }
            StoreError::Postgres(e) => {
                e.code() == Some(&tokio_postgres::error::SqlState::DISK_FULL)
            }
            StoreError::Sqlite(_)
            | StoreError::Pool(_)
            | StoreError::Corrupt(_)
            | StoreError::Duplicate { .. } => false,
            StoreError::Open { cause, .. } => logs::is_disk_full(cause),
        }
    }
}

/// Result alias for the store.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// A build with its jobs and their step results.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildDetail {
    /// The build.
    pub build: Build,
    /// Its jobs, in pipeline order.
    pub jobs: Vec<Job>,
    /// Recorded step results per job.
    pub steps: BTreeMap<JobId, Vec<StepResult>>,
    /// Reports refused by fencing, per job: (attempt, reason), oldest first.
    pub refusals: BTreeMap<JobId, Vec<(AttemptId, String)>>,
    /// Attempts per job, oldest first (at most the last [`MAX_LISTED_ATTEMPTS`]).
    pub attempts: BTreeMap<JobId, Vec<AttemptInfo>>,
}

/// Most attempts of one job listed in a [`BuildDetail`] (the latest ones).
pub const MAX_LISTED_ATTEMPTS: usize = 100;

/// One attempt of a job, as a build's detail lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttemptInfo {
    /// Id (what its log frames carry).
    pub id: AttemptId,
    /// 1 for the job's first attempt, then one more per attempt.
    pub number: u32,
    /// The runner's name.
    pub runner: String,
    /// Where it is.
    pub state: AttemptState,
    /// When it was given to the runner.
    pub created_at: Millis,
    /// When it ended.
    pub finished_at: Option<Millis>,
    /// Why it ended, when it says.
    pub note: Option<String>,
}

/// Which builds to list.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BuildFilter {
    /// Only this repository.
    pub repo: Option<String>,
    /// Only this branch.
    pub branch: Option<String>,
    /// Only builds in this state.
    pub state: Option<JobState>,
    /// Only builds with a smaller id (paging, newest first).
    pub before: Option<BuildId>,
    /// At most this many.
    pub limit: u32,
}

/// A stored attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attempt {
    /// Id.
    pub id: AttemptId,
    /// The job.
    pub job_id: JobId,
    /// The job's build.
    pub build_id: BuildId,
    /// The runner it was given to.
    pub runner_id: RunnerId,
    /// Where it is.
    pub state: AttemptState,
}

/// What a state change did, so the caller can publish events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// The build.
    pub build_id: BuildId,
    /// The job.
    pub job_id: JobId,
    /// The job's new state.
    pub job_state: JobState,
    /// The build's state after the change.
    pub build_state: JobState,
    /// Whether the build's state changed.
    pub build_changed: bool,
    /// Jobs of the build skipped because of this change (they needed a job that did not pass).
    pub skipped: Vec<JobId>,
}

/// The store's part of the dispatcher's metrics: counts that must survive a restart.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoreMetrics {
    /// Jobs ready to run (queued, every job they need passed), per label set they need.
    pub queued_by_labels: Vec<(BTreeMap<String, String>, u64)>,
    /// Jobs per state (every job ever created).
    pub jobs_by_state: Vec<(JobState, u64)>,
    /// Attempts whose runner was lost (their jobs went back to the queue, or ended errored).
    pub lost_attempts: u64,
    /// Ended tries of split units: outcome, whether it was a retry (try 2 or later), count.
    pub unit_tries: Vec<(kiln_domain::split::UnitOutcome, bool, u64)>,
    /// Notification deliveries: target kind (`webhook`, `mail`, `status`), state, how many,
    /// and the tries they took.
    pub deliveries: Vec<DeliveryCount>,
}

/// Notification deliveries of one target kind in one state (see [`StoreMetrics`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryCount {
    /// `webhook`, `mail` or `status` (the first word of the target).
    pub kind: String,
    /// The deliveries' state.
    pub state: DeliveryState,
    /// How many.
    pub count: u64,
    /// Tries they took (sent and answered, or failed), all together.
    pub tries: u64,
}

/// What [`Store::record_commits`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recorded {
    /// Builds created, in the order given.
    pub created: Vec<BuildDetail>,
    /// Builds that already existed for commits given (not created again).
    pub duplicates: Vec<BuildId>,
    /// Jobs of older builds of the branch ended as superseded.
    pub superseded: Vec<Change>,
    /// Attempts of those jobs that runners are running: they must be told to stop.
    pub to_cancel: Vec<AttemptId>,
}

/// How long a dispatcher that stopped refreshing its row still counts as alive: after it,
/// the attempts it owned are adopted by the others, and the runners it held count as detached.
pub const DISPATCHER_LEASE_MS: i64 = 3_000;

/// A dispatcher dead for this long is forgotten (its row deleted) by the next adoption.
pub(crate) const FORGET_DISPATCHERS_MS: i64 = 3_600_000;

/// A dispatcher process sharing the store (see [`Store::register_dispatcher`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DispatcherRecord {
    /// Its id (new for every process start).
    pub id: DispatcherId,
    /// What it says it is (host and address), for people reading `dispatchers`.
    pub name: String,
    /// When it registered.
    pub started_at: Millis,
    /// When it last said it was alive.
    pub seen_at: Millis,
}

impl DispatcherRecord {
    /// Whether it counts as alive at `now`.
    pub fn alive(&self, now: Millis) -> bool {
        self.seen_at >= now - DISPATCHER_LEASE_MS
    }
}

/// Who holds an attempt's runner: the dispatcher, and the hash of the session secret a runner
/// must present to take the attempt to another session (or dispatcher).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    /// The dispatcher holding the runner's stream.
    pub dispatcher: DispatcherId,
    /// Hash of the secret of the session the attempt is on.
    pub secret_hash: String,
}

/// An attempt with its owner, as a dispatcher that does not have it in memory reads it (a
/// runner re-attaching elsewhere, a cancel for a job running elsewhere).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnedAttempt {
    /// The attempt.
    pub attempt: Attempt,
    /// Whether it is its job's current attempt and the job is out on a runner (assigned or
    /// running).
    pub current: bool,
    /// Its owner (`None` for attempts given out before owners were recorded, or by a SQLite
    /// store's dispatcher).
    pub owner: Option<DispatcherId>,
    /// Hash of the secret of the session it was last on, when recorded.
    pub secret_hash: Option<String>,
}

/// One assignment of a [`Store::assign_many`] batch: what [`Store::assign_owned`] takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AssignRequest {
    /// The queued job.
    pub job: JobId,
    /// The runner it goes to.
    pub runner: RunnerId,
    /// The runner's name.
    pub runner_name: String,
    /// The attempt's owner (several dispatchers).
    pub owner: Option<Owner>,
}

/// The answer to a final result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finish {
    /// The result was recorded.
    Recorded(Change),
    /// The same attempt's result was already recorded (a re-sent result): nothing changed.
    AlreadyRecorded,
    /// The attempt is not the job's current one, or the job already ended: refused and recorded
    /// as such.
    Refused(String),
}

/// Why a result of `attempt` was refused ([`Finish::Refused`]), from its job's row as read
/// under the job's lock: its `current` attempt and `state`. Both backends answer the same.
pub(crate) fn refusal_reason(
    attempt: AttemptId,
    job: JobId,
    current: Option<AttemptId>,
    state: JobState,
) -> String {
    if current != Some(attempt) {
        format!(
            "attempt {attempt} is not the current attempt of job {job} (current: {})",
            current.map_or("none".to_string(), |c| c.to_string())
        )
    } else if state == JobState::Queued {
        format!("attempt {attempt} was lost; job {job} is queued again")
    } else {
        format!("job {job} already ended as {state}")
    }
}

/// Kiln's durable state. Implementations make every method one transaction.
pub trait Store: Send + Sync + 'static {
    /// Stores a new build with its jobs (queued), or with no job and state `errored` when
    /// `new.error` is set.
    fn create_build(&self, new: &NewBuild) -> Result<BuildDetail>;
    /// Records new commits of a branch in one transaction: their builds (duplicates skipped),
    /// the branch's cursor (`head`), and with `supersede`, the end of every unfinished build of
    /// the branch older than the newest one created.
    fn record_commits(
        &self,
        repo: &str,
        branch: &str,
        builds: &[NewBuild],
        head: &str,
        supersede: bool,
    ) -> Result<Recorded>;
    /// The last commit recorded for a branch.
    fn branch_cursor(&self, repo: &str, branch: &str) -> Result<Option<String>>;
    /// One build with its jobs.
    fn get_build(&self, id: BuildId) -> Result<Option<BuildDetail>>;
    /// One build without its jobs: what an assignment needs of it (repository, commit, branch,
    /// parameters), one row read whatever the build's size.
    fn get_build_record(&self, id: BuildId) -> Result<Option<Build>>;
    /// [`Store::get_build_record`] of several builds, those found, in no particular order
    /// (for a chunk of assignments: one read where the store is across a network).
    fn get_build_records(&self, ids: &[BuildId]) -> Result<Vec<Build>> {
        let mut out = Vec::with_capacity(ids.len());
        for &id in ids {
            out.extend(self.get_build_record(id)?);
        }
        Ok(out)
    }
    /// One job.
    fn get_job(&self, id: JobId) -> Result<Option<Job>>;
    /// Builds, newest first.
    fn list_builds(&self, filter: &BuildFilter) -> Result<Vec<Build>>;
    /// Queued jobs, oldest first.
    fn queued_jobs(&self, limit: u32) -> Result<Vec<Job>>;
    /// What `/metrics` reads from the store, in one read: the kept tallies (see `tallies.rs`),
    /// so its cost does not grow with the stored builds.
    fn metrics(&self) -> Result<StoreMetrics>;
    /// Folds the tallies' deltas into their totals (at each scrape, and every minute, so the
    /// deltas stay few); returns how many were folded.
    fn fold_tallies(&self) -> Result<u64>;
    /// Jobs ready to run (queued, every job they need passed), per label set they need.
    fn ready_by_labels(&self) -> Result<Vec<(BTreeMap<String, String>, u64)>>;
    /// Gives a queued job to a runner as a new attempt. `None` when the job is no longer queued.
    fn assign(
        &self,
        job: JobId,
        runner: RunnerId,
        runner_name: &str,
    ) -> Result<Option<(AttemptId, Change)>> {
        self.assign_owned(job, runner, runner_name, None)
    }
    /// [`Store::assign`], recording the attempt's `owner` (several dispatchers).
    fn assign_owned(
        &self,
        job: JobId,
        runner: RunnerId,
        runner_name: &str,
        owner: Option<&Owner>,
    ) -> Result<Option<(AttemptId, Change)>>;
    /// Several [`Store::assign_owned`] calls at once (a scheduling round), answered in order.
    /// Each is its own transaction in effect: one that fails, or whose job is no longer
    /// queued, changes nothing of the others. Every `Ok` is durable when this returns. A
    /// store may commit them together: [`SqliteStore`] does, with one fsync for the round
    /// (the default makes one call per assignment).
    fn assign_many(&self, batch: &[AssignRequest]) -> Vec<Result<Option<(AttemptId, Change)>>> {
        batch
            .iter()
            .map(|a| self.assign_owned(a.job, a.runner, &a.runner_name, a.owner.as_ref()))
            .collect()
    }
    /// The runner accepted: the job is running. `None` if the attempt is not current.
    fn start_attempt(&self, attempt: AttemptId) -> Result<Option<Change>>;
    /// Records a step's result for the current attempt. False if the attempt is not current.
    fn record_step(&self, attempt: AttemptId, step: &StepResult) -> Result<bool>;
    /// Records the job's final state, with a compare-and-set on the current attempt.
    fn finish_attempt(
        &self,
        attempt: AttemptId,
        state: JobState,
        message: Option<&str>,
    ) -> Result<Finish>;
    /// The attempt's runner is gone (or handed it back): the attempt is `lost` and its job goes
    /// back to the queue. When `counts`, the loss is counted as an infrastructure retry and the
    /// job ends `errored` once it has been lost `max_lost` times (a hand-back by a draining
    /// runner does not count). `None` if the attempt was not current.
    fn requeue_attempt(
        &self,
        attempt: AttemptId,
        reason: &str,
        max_lost: u32,
        counts: bool,
    ) -> Result<Option<Change>> {
        self.requeue_owned(attempt, reason, max_lost, counts, None)
    }
    /// [`Store::requeue_attempt`] fenced by ownership: with `owner`, only while the attempt's
    /// recorded owner is still that dispatcher (`None` when another one took it: the caller
    /// drops it from memory, it is not the caller's to requeue any more).
    fn requeue_owned(
        &self,
        attempt: AttemptId,
        reason: &str,
        max_lost: u32,
        counts: bool,
        owner: Option<DispatcherId>,
    ) -> Result<Option<Change>>;
    /// Ends an unfinished job in a final `state` decided by the dispatcher (a cancel, a
    /// deadline); its current attempt, if any, is superseded, so whatever its runner reports
    /// later is refused. `None` if the job had already ended.
    fn end_job(&self, job: JobId, state: JobState, message: &str) -> Result<Option<Change>>;
    /// One attempt.
    fn get_attempt(&self, attempt: AttemptId) -> Result<Option<Attempt>>;
    /// Current attempts of jobs that are assigned or running (to reconcile after a restart).
    fn unfinished_attempts(&self) -> Result<Vec<Attempt>>;
    /// Registers a runner by name (new or returning) and returns it.
    fn upsert_runner(
        &self,
        name: &str,
        labels: &BTreeMap<String, String>,
        slots: u32,
        version: &str,
    ) -> Result<RunnerRecord>;
    /// Notes that a runner was seen.
    fn touch_runner(&self, runner: RunnerId, at: Millis) -> Result<()>;
    /// Every known runner, by name.
    fn list_runners(&self) -> Result<Vec<RunnerRecord>>;
    /// Forgets runners last seen before `before` that never held an attempt, except those in
    /// `keep` (attached now) and those attached to a dispatcher seen since `before` (another
    /// dispatcher's). Returns how many were forgotten.
    fn forget_idle_runners(&self, before: Millis, keep: &[RunnerId]) -> Result<u64>;
    /// Sets (or with `None`, revokes) the hashed token of a runner name. Returns whether a row
    /// changed.
    fn set_runner_token(&self, name: &str, token_hash: Option<&str>) -> Result<bool>;
    /// The hashed token of a runner name, and whether any runner has a token at all.
    fn runner_token_hash(&self, name: &str) -> Result<(Option<String>, bool)>;
    /// Registers a dispatcher process (a new id each time) as seen at `now`.
    fn register_dispatcher(&self, name: &str, now: Millis) -> Result<DispatcherId>;
    /// A dispatcher says it is alive at `now`. False when its row is gone (forgotten after
    /// being dead for long): it must register again.
    fn dispatcher_seen(&self, id: DispatcherId, now: Millis) -> Result<bool>;
    /// Every registered dispatcher, by id.
    fn dispatchers(&self) -> Result<Vec<DispatcherRecord>>;
    /// Adopts, for dispatcher `me`, the unfinished current attempts whose owner is dead (not
    /// seen since `dead_before`, or gone, or never recorded): a compare-and-set of each
    /// owner, so an attempt is adopted by one dispatcher only. Returns what `me` adopted.
    /// Also forgets dispatchers dead for an hour.
    fn adopt_attempts(&self, me: DispatcherId, dead_before: Millis) -> Result<Vec<Attempt>>;
    /// An attempt with its owner and secret hash.
    fn owned_attempt(&self, attempt: AttemptId) -> Result<Option<OwnedAttempt>>;
    /// Moves an attempt of `runner` from owner `from` to `to` (a runner re-attaching, to the
    /// same dispatcher with a new session or to another one): a compare-and-set on the owner,
    /// only while the attempt is current and its job out on a runner. Returns whether it moved.
    fn claim_attempt(
        &self,
        attempt: AttemptId,
        runner: RunnerId,
        from: Option<DispatcherId>,
        to: &Owner,
    ) -> Result<bool>;
    /// Records which dispatcher holds a runner's stream: `Some(d)` when it attached to `d`;
    /// `None` when it detached from `by` (only if `by` still holds it).
    fn set_runner_dispatcher(
        &self,
        runner: RunnerId,
        to: Option<DispatcherId>,
        by: DispatcherId,
    ) -> Result<()>;
    /// Runners whose stream a dispatcher seen since `alive_since` holds, with that dispatcher.
    fn attached_runners(&self, alive_since: Millis) -> Result<Vec<(RunnerId, DispatcherId)>>;

    /// Records that something from `attempt` (output, a held attempt) was refused.
    fn record_refusal(&self, attempt: AttemptId, reason: &str) -> Result<()>;
    /// Results refused by fencing (attempt, reason), newest first; for inspection and tests.
    fn refusals(&self, job: JobId) -> Result<Vec<(AttemptId, String)>>;

    /// One round trip of a split step's shard, in one transaction: fences the attempt (it must
    /// be its job's current attempt, the job unfinished, the step a split step); creates the
    /// split's queue from `req.discovered` if it does not exist yet (ordered longest first from
    /// the repository's recorded durations, the median for units without history; a static
    /// strategy fixes each unit's shard); records `req.results` (a result counts only for a unit
    /// try leased to this attempt and not yet ended, so a re-sent request records nothing
    /// twice); ends the round when every unit of it has ended and starts the next one when
    /// [`kiln_domain::split::next_round`] says so; then leases the next batch to the attempt
    /// (a re-sent request number gets the units it got before). When the split ends, the unit
    /// durations and flaky counts of the repository's history are updated.
    fn next_units(&self, req: &UnitsRequest) -> Result<UnitsReply>;
    /// The past of `units` of split `key` in `repo`: their verdicts in the last `limit` builds
    /// up to and including `until` whose split ran them (newest first), and their flaky and
    /// failed counts. A unit the history does not know comes back with nothing recorded.
    fn unit_pasts(
        &self,
        repo: &str,
        key: &str,
        units: &[String],
        until: BuildId,
        limit: u32,
    ) -> Result<Vec<kiln_domain::split::UnitPast>>;
    /// The split reports of a build (merged over its shards), in split order.
    fn split_reports(&self, build: BuildId) -> Result<Vec<SplitReport>>;
    /// The batches of a build's split steps as they ran (leased units grouped by attempt and
    /// request), in split order then lease time.
    fn split_batches(&self, build: BuildId) -> Result<Vec<kiln_domain::split::BatchRecord>>;
    /// The test cases plain steps' JUnit files gave (`junit`), for each job's current attempt,
    /// in job and step order.
    fn step_reports(&self, build: BuildId) -> Result<Vec<kiln_domain::split::StepReport>>;
    /// The failures `attempt` reported in the current round of an unfinished split are not
    /// believed (its runner was found broken): those tries go back to the queue, to be run
    /// again by another shard under the same try number. Returns how many.
    fn requeue_failed_units(&self, attempt: AttemptId) -> Result<u64>;

    /// Plans the notifications of one point of a build's life (`mark`), in one transaction:
    /// records the mark, and inserts each delivery unless one for the same (build, event,
    /// target) exists (so planning again after a crash adds nothing). A delivery that
    /// `supersedes` ends the pending deliveries of the same build and target (a newer commit
    /// status replaces an older one not yet sent). Returns how many deliveries were new.
    fn plan_deliveries(
        &self,
        build: BuildId,
        mark: Mark,
        deliveries: &[NewDelivery],
    ) -> Result<u64>;
    /// The marks of a build whose deliveries were planned, in the order a build reaches them.
    fn planned_marks(&self, build: BuildId) -> Result<Vec<Mark>>;
    /// Builds created at or after `since` that reached a mark (queued, a job started,
    /// finished) whose deliveries were never planned, oldest first.
    fn unplanned_builds(&self, since: Millis, limit: u32) -> Result<Vec<BuildId>>;
    /// Pending deliveries due at `now`, oldest first, each leased until `lease_until` (its
    /// `next_at` moves there, so a sender that dies leaves it due again then).
    fn take_due_deliveries(
        &self,
        now: Millis,
        lease_until: Millis,
        limit: u32,
    ) -> Result<Vec<Delivery>>;
    /// When the earliest pending delivery is due.
    fn next_delivery_at(&self) -> Result<Option<Millis>>;
    /// Records one try of a pending delivery (counts it). False if it was not pending.
    fn record_delivery(
        &self,
        id: DeliveryKey,
        result: &DeliveryResult,
        now: Millis,
    ) -> Result<bool>;
    /// A build's deliveries, in the order they were planned.
    fn deliveries(&self, build: BuildId) -> Result<Vec<Delivery>>;
}

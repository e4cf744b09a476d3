//! The words of kiln, as plain Rust types with no I/O: builds, jobs, attempts, steps, runners,
//! their states and the rules that move between states.
//!
//! - A **build** is one commit of one repository; it has **jobs**.
//! - A **job** runs a list of **steps** in order on one runner. Every assignment of a job to a
//!   runner is a new **attempt** with its own id; the job points at its current attempt, and
//!   anything reported by another attempt is refused (fencing).
//! - States only move forward (`queued -> assigned -> running -> final`), except that a lost
//!   runner sends its jobs back to `queued`.
//!
//! Nothing here knows about gRPC, SQLite or sockets: the store and the edge convert.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

pub mod branch;
pub mod params;
pub mod protocol;
pub mod split;

pub use branch::BranchPattern;

/// An error with its causes, on one line (`a: b: c`).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Declares an id: a number with a type of its own, so that one kind of id cannot be passed
/// where another is expected. It prints (`{}` and `{:?}`), parses and serializes as the bare
/// number; the default, 0, is no id the store gives (what the wire sends for "none"); with the
/// `rusqlite` feature it is stored as an SQLite integer, with the `postgres` feature as a
/// PostgreSQL `BIGINT` (the `u64` as an `i64`, bit for bit, in both).
macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(
            Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash,
            ::serde::Serialize, ::serde::Deserialize,
        )]
        #[serde(transparent)]
        pub struct $name(u64);

        impl $name {
            /// The id with this number.
            pub const fn new(n: u64) -> Self {
                $name(n)
            }

            /// Its number.
            pub const fn get(self) -> u64 {
                self.0
            }
        }

        impl From<u64> for $name {
            fn from(n: u64) -> Self {
                $name(n)
            }
        }

        impl From<$name> for u64 {
            fn from(id: $name) -> u64 {
                id.0
            }
        }

        /// The bare number, as `{:?}` of a `u64` (so debug output and logs read as before).
        impl ::std::fmt::Debug for $name {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                ::std::fmt::Debug::fmt(&self.0, f)
            }
        }

        impl ::std::fmt::Display for $name {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                ::std::fmt::Display::fmt(&self.0, f)
            }
        }

        impl ::std::str::FromStr for $name {
            type Err = std::num::ParseIntError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                s.parse().map($name)
            }
        }

        #[cfg(feature = "rusqlite")]
        impl rusqlite::types::ToSql for $name {
            fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
                Ok(rusqlite::types::ToSqlOutput::from(self.0 as i64))
            }
        }

        #[cfg(feature = "rusqlite")]
        impl rusqlite::types::FromSql for $name {
            fn column_result(v: rusqlite::types::ValueRef<'_>) -> rusqlite::types::FromSqlResult<Self> {
                i64::column_result(v).map(|n| $name(n as u64))
            }
        }

        #[cfg(feature = "postgres")]
        impl postgres_types::ToSql for $name {
            fn to_sql(
                &self,
                ty: &postgres_types::Type,
                out: &mut bytes::BytesMut,
            ) -> Result<postgres_types::IsNull, Box<dyn std::error::Error + Sync + Send>> {
                (self.0 as i64).to_sql(ty, out)
            }

            fn accepts(ty: &postgres_types::Type) -> bool {
                <i64 as postgres_types::ToSql>::accepts(ty)
            }

            postgres_types::to_sql_checked!();
        }

        #[cfg(feature = "postgres")]
        impl<'a> postgres_types::FromSql<'a> for $name {
            fn from_sql(
                ty: &postgres_types::Type,
                raw: &'a [u8],
            ) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
                <i64 as postgres_types::FromSql>::from_sql(ty, raw).map(|n| $name(n as u64))
            }

            fn accepts(ty: &postgres_types::Type) -> bool {
                <i64 as postgres_types::FromSql>::accepts(ty)
            }
        }
    };
}
pub(crate) use id_type;

id_type!(
    /// Id of a build, assigned by the store, increasing.
    BuildId
);
id_type!(
    /// Id of a job, assigned by the store, increasing.
    JobId
);
id_type!(
    /// Id of an attempt (one try of one job on one runner), assigned by the store, increasing.
    AttemptId
);
id_type!(
    /// Id of a runner, stable for a runner name.
    RunnerId
);
id_type!(
    /// Id of a dispatcher process sharing a PostgreSQL store (a new one per process start).
    DispatcherId
);

/// Milliseconds since the Unix epoch (the store's clock unit).
pub type Millis = i64;

/// The state of a job; a build's state is a summary of its jobs' states.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Waiting for a runner.
    Queued,
    /// Offered to a runner, not yet accepted.
    Assigned,
    /// Running on a runner.
    Running,
    /// Every step passed.
    Passed,
    /// A step failed.
    Failed,
    /// Cancelled by a user.
    Cancelled,
    /// A step ran past its timeout.
    TimedOut,
    /// Kiln could not run it.
    Errored,
    /// Never ran: a job it depends on did not pass (or its build was superseded first).
    Skipped,
}

impl JobState {
    /// Every state, in declaration order.
    pub const ALL: [JobState; 9] = [
        JobState::Queued,
        JobState::Assigned,
        JobState::Running,
        JobState::Passed,
        JobState::Failed,
        JobState::Cancelled,
        JobState::TimedOut,
        JobState::Errored,
        JobState::Skipped,
    ];

    /// Final states never change again.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            JobState::Passed
                | JobState::Failed
                | JobState::Cancelled
                | JobState::TimedOut
                | JobState::Errored
                | JobState::Skipped
        )
    }

    /// The name used in the store, the CLI and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Assigned => "assigned",
            JobState::Running => "running",
            JobState::Passed => "passed",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
            JobState::TimedOut => "timed_out",
            JobState::Errored => "errored",
            JobState::Skipped => "skipped",
        }
    }

    /// How bad a final state is, to summarise several jobs (higher is worse).
    fn severity(self) -> u8 {
        match self {
            JobState::Passed | JobState::Skipped => 0,
            JobState::Cancelled => 1,
            JobState::Failed => 2,
            JobState::TimedOut => 3,
            JobState::Errored => 4,
            JobState::Queued | JobState::Assigned | JobState::Running => 5,
        }
    }
}

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Error for a state name that is not one of [`JobState::ALL`].
#[derive(Debug, thiserror::Error)]
#[error(
    "unknown job state `{0}` (expected one of queued, assigned, running, passed, failed, cancelled, timed_out, errored)"
)]
pub struct UnknownState(pub String);

/// Error for an attempt state name that is not one of [`AttemptState::ALL`].
#[derive(Debug, thiserror::Error)]
#[error(
    "unknown attempt state `{0}` (expected one of offered, running, finished, lost, superseded)"
)]
pub struct UnknownAttemptState(pub String);

impl FromStr for JobState {
    type Err = UnknownState;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        JobState::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| UnknownState(s.to_string()))
    }
}

/// The state of one attempt (one assignment of a job to a runner).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AttemptState {
    /// Sent to the runner, not yet accepted.
    Offered,
    /// Accepted: the runner is running it.
    Running,
    /// Its result was recorded (it is the job's result).
    Finished,
    /// Its runner was lost (or came back without it); the job went back to the queue.
    Lost,
    /// The job ended or moved on without it (cancelled, timed out, given to another runner).
    Superseded,
}

impl AttemptState {
    /// Every state, in declaration order.
    pub const ALL: [AttemptState; 5] = [
        AttemptState::Offered,
        AttemptState::Running,
        AttemptState::Finished,
        AttemptState::Lost,
        AttemptState::Superseded,
    ];

    /// The name used in the store, the CLI and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            AttemptState::Offered => "offered",
            AttemptState::Running => "running",
            AttemptState::Finished => "finished",
            AttemptState::Lost => "lost",
            AttemptState::Superseded => "superseded",
        }
    }

    /// Whether the attempt may still report (offered or running).
    pub fn is_live(self) -> bool {
        matches!(self, AttemptState::Offered | AttemptState::Running)
    }
}

impl fmt::Display for AttemptState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for AttemptState {
    type Err = UnknownAttemptState;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        AttemptState::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| UnknownAttemptState(s.to_string()))
    }
}

/// The summary state of a build from the states of its jobs: running while any job runs,
/// queued while all unfinished jobs wait, otherwise the worst final state. A build with no jobs
/// is `errored` (its pipeline could not be read).
pub fn build_state(jobs: impl IntoIterator<Item = JobState>) -> JobState {
    let mut any = false;
    let mut unfinished = false;
    let mut started = false;
    let mut worst = JobState::Passed;
    for s in jobs {
        any = true;
        if s.is_final() {
            if s.severity() > worst.severity() {
                worst = s;
            }
        } else {
            unfinished = true;
            if s != JobState::Queued {
                started = true;
            }
        }
    }
    if !any {
        JobState::Errored
    } else if unfinished {
        if started || worst != JobState::Passed {
            JobState::Running
        } else {
            JobState::Queued
        }
    } else {
        worst
    }
}

/// How a step ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepOutcome {
    /// Exited with status 0.
    Passed,
    /// Exited with another status or died from a signal.
    Failed,
    /// Ran past its timeout.
    TimedOut,
    /// Was cancelled.
    Cancelled,
    /// Could not be run.
    Errored,
    /// Not run because an earlier step did not pass.
    Skipped,
}

impl StepOutcome {
    /// The name used in the store, the CLI and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            StepOutcome::Passed => "passed",
            StepOutcome::Failed => "failed",
            StepOutcome::TimedOut => "timed_out",
            StepOutcome::Cancelled => "cancelled",
            StepOutcome::Errored => "errored",
            StepOutcome::Skipped => "skipped",
        }
    }
}

impl FromStr for StepOutcome {
    type Err = UnknownState;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [
            StepOutcome::Passed,
            StepOutcome::Failed,
            StepOutcome::TimedOut,
            StepOutcome::Cancelled,
            StepOutcome::Errored,
            StepOutcome::Skipped,
        ]
        .into_iter()
        .find(|o| o.as_str() == s)
        .ok_or_else(|| UnknownState(s.to_string()))
    }
}

/// What a runner is told to run for one step. `Default` is an empty plain step: name, fill in
/// the rest (`StepSpec { name, run, ..Default::default() }`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepSpec {
    /// Position in the job (0-based).
    pub index: u32,
    /// Name from the pipeline file.
    pub name: String,
    /// Shell command (`sh -c`).
    pub run: String,
    /// Extra environment.
    pub env: BTreeMap<String, String>,
    /// Timeout in milliseconds, 0 for none.
    pub timeout_ms: u64,
    /// For a post step, when it runs; `None` for a normal step.
    #[serde(default)]
    pub post: Option<PostCondition>,
    /// For a split step (`parallel:`), how its units are found and handed out, and which
    /// shard this job is; `None` for a normal step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub split: Option<split::SplitSpec>,
    /// Glob patterns of the JUnit XML files a plain step writes (`junit`); empty for none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub junit: Vec<String>,
}

/// When a post step runs: after the normal steps, depending on how they ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PostCondition {
    /// Whatever happened, cancel and timeout included.
    Always,
    /// Only if every normal step passed.
    Success,
    /// Only if a normal step failed, timed out or errored.
    Failure,
}

impl PostCondition {
    /// Whether a post step with this condition runs after normal steps that ended `state`.
    pub fn applies(self, state: JobState) -> bool {
        match self {
            PostCondition::Always => true,
            PostCondition::Success => state == JobState::Passed,
            PostCondition::Failure => matches!(
                state,
                JobState::Failed | JobState::TimedOut | JobState::Errored
            ),
        }
    }
}

/// A job about to be created, as the pipeline describes it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewJob {
    /// Display name.
    pub name: String,
    /// Runner labels the job needs (every key must match).
    pub labels: BTreeMap<String, String>,
    /// Steps, run in order.
    pub steps: Vec<StepSpec>,
    /// Jobs of the same build (indices into `NewBuild::jobs`) that must pass first.
    pub needs: Vec<usize>,
}

/// A build about to be created. `Default` is a build of nothing: fill in what it is of.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NewBuild {
    /// Repository URL or absolute path, as submitted.
    pub repo: String,
    /// Full commit id.
    pub commit: String,
    /// Branch, empty if unknown.
    pub branch: String,
    /// Who asked.
    pub trigger: String,
    /// The build this retries, if any.
    pub retry_of: Option<BuildId>,
    /// Why the build failed before any job was made (pipeline error); then `jobs` is empty.
    pub error: Option<String>,
    /// Its jobs.
    pub jobs: Vec<NewJob>,
    /// Identity of the pipeline (a hash of its jobs): a second build of the same repository,
    /// commit and pipeline is refused unless it is a retry. Empty: no such check.
    pub pipeline_hash: String,
    /// How the pipeline was found: `.kiln.yml`, or what was detected and why.
    pub pipeline: String,
    /// Build parameters (see [`params`]): environment variables given to every step of every
    /// job, over the pipeline's `env`. Part of what makes two builds of a commit different.
    pub params: BTreeMap<String, String>,
}

/// A stored build.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Build {
    /// Id.
    pub id: BuildId,
    /// Repository as submitted.
    pub repo: String,
    /// Full commit id.
    pub commit: String,
    /// Branch, empty if unknown.
    pub branch: String,
    /// Who asked.
    pub trigger: String,
    /// Summary state.
    pub state: JobState,
    /// Pipeline error, if the build failed before any job.
    pub error: Option<String>,
    /// The build this retries.
    pub retry_of: Option<BuildId>,
    /// When accepted.
    pub created_at: Millis,
    /// When it finished.
    pub finished_at: Option<Millis>,
    /// How the pipeline was found: `.kiln.yml`, or what was detected and why (empty for builds
    /// stored before kiln recorded it).
    pub pipeline: String,
    /// Build parameters (see [`params`]): environment variables given to every step of every
    /// job, over the pipeline's `env`; empty for none.
    pub params: BTreeMap<String, String>,
}

/// A stored job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Job {
    /// Id.
    pub id: JobId,
    /// Its build.
    pub build_id: BuildId,
    /// Display name.
    pub name: String,
    /// State.
    pub state: JobState,
    /// Labels it needs.
    pub labels: BTreeMap<String, String>,
    /// Its steps.
    pub steps: Vec<StepSpec>,
    /// Jobs of the same build that must pass before it runs.
    pub needs: Vec<JobId>,
    /// Current attempt, if it was ever assigned.
    pub current_attempt: Option<AttemptId>,
    /// Attempts made so far.
    pub attempts: u32,
    /// Attempts that ended because a runner was lost (infrastructure retries, counted apart).
    pub lost_attempts: u32,
    /// Runner of the current attempt.
    pub runner: Option<String>,
    /// Detail for errored / cancelled / timed-out jobs.
    pub message: Option<String>,
    /// When it started running.
    pub started_at: Option<Millis>,
    /// When it finished.
    pub finished_at: Option<Millis>,
}

/// The recorded result of one step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StepResult {
    /// Step index.
    pub index: u32,
    /// Outcome.
    pub outcome: StepOutcome,
    /// Exit code, when it exited.
    pub exit_code: Option<i32>,
    /// Wall-clock duration.
    pub duration_ms: u64,
    /// The test cases of the step's JUnit XML files (`junit`), as the runner read them; empty
    /// when it names none (or as listed with a build: the report has them).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub cases: Vec<split::TestCase>,
    /// Why some of the step's reports were not read; empty when all were.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub report_note: String,
}

/// A runner known to the store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RunnerRecord {
    /// Id.
    pub id: RunnerId,
    /// Unique name.
    pub name: String,
    /// Labels it offers.
    pub labels: BTreeMap<String, String>,
    /// Slots.
    pub slots: u32,
    /// Version it reported.
    pub version: String,
    /// Last time it was seen (attach or heartbeat).
    pub last_seen: Millis,
}

/// True when a runner offering `offered` labels may run a job that needs `needed`.
pub fn labels_match(needed: &BTreeMap<String, String>, offered: &BTreeMap<String, String>) -> bool {
    needed.iter().all(|(k, v)| offered.get(k) == Some(v))
}

/// A state change, published to whoever subscribes (CLI watchers, later the web page and
/// notifications).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// The build.
    pub build_id: BuildId,
    /// The job, or `None` for a build-level change.
    pub job_id: Option<JobId>,
    /// The new state.
    pub state: JobState,
    /// When.
    pub at: Millis,
}

/// Now, in milliseconds since the Unix epoch.
pub fn now_millis() -> Millis {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as Millis)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ids of different kinds are different types: `fn f(_: JobId, _: AttemptId)` called as
    /// `f(attempt, job)` does not compile. What is left to check is that each still reads,
    /// prints and serializes as the bare number it was when ids were plain `u64`s.
    #[test]
    fn ids_print_parse_and_serialize_as_bare_numbers() {
        let job = JobId::new(42);
        assert_eq!(job.to_string(), "42");
        assert_eq!(format!("{job:>4}"), "  42");
        assert_eq!(format!("{:?}", Some(job)), "Some(42)");
        assert_eq!("42".parse::<JobId>().ok(), Some(job));
        assert!("x".parse::<AttemptId>().is_err() && "-1".parse::<BuildId>().is_err());
        assert_eq!(serde_json::to_string(&job).ok().as_deref(), Some("42"));
        assert_eq!(
            serde_json::from_str::<RunnerId>("7").ok(),
            Some(RunnerId::from(7))
        );
        assert_eq!(u64::from(AttemptId::new(9)), 9);
        assert!(BuildId::new(1) < BuildId::new(2));
    }

    #[test]
    fn attempt_states_round_trip_through_their_names() {
        for s in AttemptState::ALL {
            assert_eq!(s.as_str().parse::<AttemptState>().ok(), Some(s));
        }
        let e = "done".parse::<AttemptState>().err().map(|e| e.to_string());
        assert!(e.as_deref().is_some_and(|e| e.contains("`done`")), "{e:?}");
        assert!(AttemptState::Running.is_live() && !AttemptState::Lost.is_live());
    }

    #[test]
    fn state_names_round_trip() {
        for s in JobState::ALL {
            assert_eq!(s.as_str().parse::<JobState>().ok(), Some(s));
        }
        assert!("bogus".parse::<JobState>().is_err());
    }

    #[test]
    fn build_state_summarises() {
        use JobState::*;
        assert_eq!(build_state([]), Errored);
        assert_eq!(build_state([Queued, Queued]), Queued);
        assert_eq!(build_state([Queued, Running]), Running);
        assert_eq!(build_state([Passed, Queued]), Queued);
        assert_eq!(build_state([Failed, Queued]), Running);
        assert_eq!(build_state([Passed, Passed]), Passed);
        assert_eq!(build_state([Passed, Failed, Cancelled]), Failed);
        assert_eq!(build_state([TimedOut, Failed]), TimedOut);
        assert_eq!(build_state([Failed, Skipped]), Failed);
        assert_eq!(build_state([Passed, Skipped]), Passed);
    }

    #[test]
    fn labels() {
        let mut need = BTreeMap::new();
        let mut have = BTreeMap::new();
        assert!(labels_match(&need, &have));
        need.insert("os".to_string(), "linux".to_string());
        assert!(!labels_match(&need, &have));
        have.insert("os".to_string(), "linux".to_string());
        have.insert("arch".to_string(), "x86".to_string());
        assert!(labels_match(&need, &have));
    }
}

//! The dispatcher engine: accepts builds, keeps the queue, hands jobs to attached runners over
//! their streams, records output and results, and fans output and state changes out to
//! whoever follows.
//!
//! - [`Dispatcher`] is cheap to clone (an `Arc`); the gRPC services hold one.
//! - `session` runs one runner's stream; `scheduler` assigns queued jobs and notices lost
//!   runners; `hub` tells log followers how far each job's log reached.
//! - All durable state is in the [`Store`] and the [`JobLogs`]; what is in memory (sessions,
//!   which attempt is on which runner, the next output sequence number) is rebuilt after a
//!   restart from the store and from the runners' handshakes.

mod cluster;
mod health;
mod hub;
pub mod junit;
pub mod metrics;
mod open_builds;
mod scheduler;
mod session;
mod space;
pub mod tokens;
mod trace;

pub use space::parse_size;
#[cfg(test)]
mod cluster_tests;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use kiln_domain::{
    AttemptId, BuildId, Event, JobId, JobState, Millis, NewBuild, NewJob, PostCondition, RunnerId,
    StepSpec, now_millis,
};
use kiln_git::{GitError, Mirrors};
use kiln_store::{
    BuildDetail, BuildFilter, Change, JobLogs, LogStore, PgLogStore, PgStore, SqliteStore, Store,
};
use tokio::sync::{Notify, broadcast, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

pub use hub::LogProgress;

use kiln_domain::protocol::{self, DispatcherMessage};

/// How the dispatcher behaves; every field has a sensible default.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where the database, logs and repository mirrors live.
    pub data_dir: PathBuf,
    /// A PostgreSQL database to keep the state in instead of the data directory's SQLite
    /// file (logs and mirrors stay in the data directory). With it, [`Dispatcher::open`]
    /// blocks on the network: call it from a blocking context.
    pub database: Option<kiln_store::PgConfig>,
    /// How often runners heartbeat (told to them in the Welcome).
    pub heartbeat_interval: Duration,
    /// A runner silent for this many intervals is lost and its jobs go to others.
    pub missed_heartbeats: u32,
    /// A job whose runner was lost this many times ends `errored` instead of being queued again.
    pub max_lost_attempts: u32,
    /// Time a cancelled step gets between SIGTERM and SIGKILL.
    pub cancel_grace: Duration,
    /// The shared runner token, if runners must present one (per-runner tokens live in the
    /// store and apply on top).
    pub runner_token: Option<String>,
    /// Longest a job may run when not all of its steps have a timeout; the dispatcher ends it
    /// `timed_out` itself, so a wedged runner cannot hold it forever.
    pub max_job_time: Duration,
    /// Margin the dispatcher gives over a step's or job's own timeout before it steps in (the
    /// runner's kill grace, checkout, clock drift).
    pub deadline_slack: Duration,
    /// Secrets given to every job as environment variables (masked in its output).
    pub secrets: BTreeMap<String, String>,
    /// Branch patterns (globs, `release/*`) that build only their newest commit and cancel
    /// the branch's superseded builds; other branches build every commit.
    pub newest_only: Vec<String>,
    /// A runner whose stream closed (its process died, its socket was reset) has this long to
    /// re-attach before its attempts go back to the queue; a runner that goes silent with its
    /// stream open keeps the whole lease.
    pub reconnect_grace: Duration,
    /// Runners that never held an attempt are forgotten (their name freed, `kiln runners`
    /// no longer lists them) this long after they were last seen.
    pub forget_idle_runners_after: Duration,
    /// Free space the data directory must keep; below it the disk counts as full (new work is
    /// refused, running jobs pause). `None`: 64 MiB, or 5% of the file system if less.
    pub min_free_space: Option<u64>,
    /// Emit one OpenTelemetry trace per build to the global tracer (see `trace`).
    pub trace: bool,
}

impl Config {
    /// Defaults for a data directory: heartbeats every 2 s, lost after 3 missed (6 s).
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            data_dir: data_dir.into(),
            database: None,
            heartbeat_interval: Duration::from_secs(2),
            missed_heartbeats: 3,
            max_lost_attempts: 3,
            cancel_grace: Duration::from_secs(10),
            runner_token: None,
            max_job_time: Duration::from_secs(6 * 3600),
            deadline_slack: Duration::from_secs(30),
            secrets: BTreeMap::new(),
            newest_only: Vec::new(),
            forget_idle_runners_after: Duration::from_secs(3600),
            reconnect_grace: Duration::from_secs(1),
            min_free_space: None,
            trace: false,
        }
    }

    /// How long a runner may stay silent before it is declared lost.
    pub fn lease(&self) -> Duration {
        self.heartbeat_interval * self.missed_heartbeats
    }
}

/// Something a request names that does not exist.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Missing {
    /// No build with this id.
    Build(BuildId),
    /// No job with this id.
    Job(JobId),
    /// No runner of this name.
    Runner(String),
    /// The commit or revision is not in the repository (git's words).
    Revision(String),
}

impl std::fmt::Display for Missing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Missing::Build(id) => write!(f, "build {id} not found"),
            Missing::Job(id) => write!(f, "job {id} not found"),
            Missing::Runner(name) => write!(f, "runner {name} not found"),
            Missing::Revision(why) => f.write_str(why),
        }
    }
}

/// Errors the engine reports to callers, by what went wrong (the root package's `api` maps
/// them to gRPC statuses, the webhook to HTTP statuses; the message is the `Display`).
#[derive(Debug, thiserror::Error)]
pub enum DispatchError {
    /// The request (or a runner's message) is malformed.
    #[error("{message}")]
    InvalidArgument {
        /// The field at fault, as the wire names it (`repo`, `hello.slots`, ...).
        field: &'static str,
        /// What is wrong with it.
        message: String,
    },
    /// Something named in the request does not exist.
    #[error("{0}")]
    NotFound(Missing),
    /// The request does not fit the current state (e.g. retrying an unfinished build).
    #[error("{message}")]
    FailedPrecondition {
        /// Why not now.
        message: String,
    },
    /// This commit was already built with this pipeline.
    #[error("this commit was already built with this pipeline{}; retry that build to build it again",
        .build.map(|b| format!(" as build {b}")).unwrap_or_default())]
    AlreadyBuilt {
        /// The existing build, when known.
        build: Option<BuildId>,
    },
    /// Another live runner uses this name (and this one did not prove to be it).
    #[error("a runner named {name} is attached already; give each runner its own --name")]
    RunnerAttached {
        /// The name.
        name: String,
    },
    /// The data directory's disk is full: nothing new is accepted until space is freed.
    #[error("{reason}")]
    ResourceExhausted {
        /// What filled up, and how much is free.
        reason: String,
    },
    /// Something outside kiln failed and a retry may help (fetching a repository), or a
    /// runner's session ended and the runner should attach again.
    #[error("{message}")]
    Unavailable {
        /// What failed.
        message: String,
    },
    /// A runner did not present a valid token.
    #[error("{}", if *.token_given {
        format!("the token of runner {runner} is not valid")
    } else {
        format!("runner {runner} must present a token (kiln runner --token)")
    })]
    Unauthenticated {
        /// The runner's name.
        runner: String,
        /// Whether it presented a token at all.
        token_given: bool,
    },
    /// A runner's client certificate does not give it the name it asked for.
    #[error(
        "this runner's certificate names it {}; it may attach only under one of those names, not {runner:?}",
        certificate_names.iter().take(8).map(|n| format!("{n:?}")).collect::<Vec<_>>().join(", ")
    )]
    PermissionDenied {
        /// The name it asked for.
        runner: String,
        /// The names its certificate gives it.
        certificate_names: Vec<String>,
    },
    /// A runner did not send its Hello in time.
    #[error("no hello within {}s", .waited.as_secs())]
    HelloTimeout {
        /// How long the dispatcher waited.
        waited: Duration,
    },
    /// A runner's output arrived with a gap (chunks went missing on the way): it reconnects
    /// and sends again what is not acknowledged.
    #[error(
        "output seq {got} of attempt {attempt} out of order: expected {expected}; reconnect and resend"
    )]
    OutputGap {
        /// The attempt.
        attempt: AttemptId,
        /// The seq the dispatcher expected.
        expected: u64,
        /// The seq that came.
        got: u64,
    },
    /// A runner reported a result before all of the attempt's output arrived.
    #[error(
        "attempt {attempt} ended after output seq {last_seq} but only {stored} arrived; reconnect and resend"
    )]
    OutputMissing {
        /// The attempt.
        attempt: AttemptId,
        /// The last seq the result claims.
        last_seq: u64,
        /// The last seq stored.
        stored: u64,
    },
    /// A bug or a broken disk; details are logged, not sent.
    #[error("internal error: {0}")]
    Internal(String),
}

impl DispatchError {
    /// An invalid `field`.
    pub fn invalid(field: &'static str, message: impl Into<String>) -> Self {
        DispatchError::InvalidArgument {
            field,
            message: message.into(),
        }
    }
}

impl From<kiln_store::StoreError> for DispatchError {
    fn from(e: kiln_store::StoreError) -> Self {
        match e {
            kiln_store::StoreError::Duplicate { build } => {
                DispatchError::AlreadyBuilt { build: Some(build) }
            }
            other => DispatchError::Internal(format!("store: {}", error_chain(&other))),
        }
    }
}

impl From<kiln_store::LogError> for DispatchError {
    fn from(e: kiln_store::LogError) -> Self {
        match e {
            kiln_store::LogError::BadOffset { .. } => {
                DispatchError::invalid("offset", e.to_string())
            }
            other => DispatchError::Internal(format!("log store: {}", error_chain(&other))),
        }
    }
}

impl From<tokio::task::JoinError> for DispatchError {
    fn from(e: tokio::task::JoinError) -> Self {
        DispatchError::Internal(format!("background task failed: {e}"))
    }
}

pub use kiln_domain::error_chain;

/// A runner as `kiln runners` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunnerState {
    /// Attached, no job running.
    Idle,
    /// Attached, running jobs.
    Busy,
    /// Attached, taking no new work.
    Draining,
    /// Not attached.
    Offline,
}

/// A request to build a commit, already decoded from the wire.
#[derive(Debug, Clone, Default)]
pub struct SubmitRequest {
    /// Repository URL or absolute path.
    pub repo: String,
    /// Commit id (full or abbreviated).
    pub commit: String,
    /// Branch, may be empty.
    pub branch: String,
    /// Who asked.
    pub trigger: String,
    /// Build parameters: environment variables for every step, over the pipeline's `env`
    /// (checked by `kiln_domain::params`; a name of a secret is refused).
    pub params: BTreeMap<String, String>,
}

/// A runner as [`Dispatcher::list_runners`] reports it.
#[derive(Debug, Clone)]
pub struct RunnerView {
    /// The stored record.
    pub record: kiln_domain::RunnerRecord,
    /// Attached and taking work, busy, draining, or offline.
    pub state: RunnerState,
    /// Jobs it runs now.
    pub running_jobs: Vec<JobId>,
    /// Last heartbeat (or last seen, when offline).
    pub last_heartbeat: Millis,
}

/// A build's test report (see [`Dispatcher::test_report`]; [`TestReport::junit_xml`] writes
/// it as one JUnit XML document).
#[derive(Debug, Clone)]
pub struct TestReport {
    /// The build.
    pub build: kiln_domain::Build,
    /// Its split steps, merged over their shards.
    pub splits: Vec<kiln_domain::split::SplitReport>,
    /// Its plain steps whose `junit` files gave test cases.
    pub steps: Vec<kiln_domain::split::StepReport>,
}

/// The dispatcher engine. Clone it freely.
#[derive(Clone)]
pub struct Dispatcher {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Dispatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dispatcher")
            .field("data_dir", &self.inner.config.data_dir)
            .finish_non_exhaustive()
    }
}

struct Inner {
    /// Settings.
    config: Config,
    /// Durable state.
    store: Arc<dyn Store>,
    /// Job output: files under the data dir, or the PostgreSQL database's rows (so that every
    /// dispatcher on it reads and appends to any job's log).
    logs: Arc<dyn JobLogs>,
    /// Mirrors used to check submitted commits and read their pipelines.
    mirrors: Arc<Mirrors>,
    /// Sessions and attempts in flight.
    state: Mutex<State>,
    /// Wakes the scheduler (a job was queued, a slot freed, a runner attached).
    kick: Notify,
    /// Wakes the scheduler loop to look at its deadlines again (one was set or moved earlier),
    /// without a scheduling round.
    rewake: Notify,
    /// Wakes split shards held waiting for units: results came in, or an attempt ended or was
    /// lost (its units went back to the queue).
    units_changed: Notify,
    /// State changes, for `WatchBuilds` and later notifications.
    events: broadcast::Sender<Event>,
    /// How far each live job's log reached, for followers.
    hub: hub::Hub,
    /// Source of session ids.
    next_session: AtomicU64,
    /// Compiled `Config::newest_only`.
    newest_only: Vec<kiln_domain::BranchPattern>,
    /// The data directory's free space, and whether the disk counts as full.
    space: space::Space,
    /// What `/metrics` counts in memory.
    metrics: metrics::Metrics,
    /// The traces of builds in flight.
    traces: trace::Traces,
    /// With PostgreSQL: this dispatcher among the others on the database (`cluster`).
    cluster: Option<cluster::Cluster>,
}

/// What is in memory about runners and the attempts they hold.
#[derive(Default)]
struct State {
    /// Attached runners.
    sessions: HashMap<RunnerId, Session>,
    /// Attempts that are current and unfinished: on a runner, or orphaned (runner gone or not
    /// yet back after a restart).
    attempts: HashMap<AttemptId, LiveAttempt>,
    /// The attempts on each session (`LiveAttempt::session`), kept up to date wherever an
    /// attempt joins or leaves a session or `attempts` (`insert_attempt`, `remove_attempt`,
    /// `move_attempt`), so a scheduling decision reads a session's held slots, and a heartbeat
    /// looks at its session's attempts, instead of walking every attempt in flight. Sessions
    /// that hold nothing have no entry.
    held: HashMap<u64, HashSet<AttemptId>>,
    /// Round-robin counter so equal runners share the work.
    assign_counter: u64,
    /// Split steps' unit results per build and runner, to take out runners that fail what
    /// others pass.
    unit_health: health::UnitHealth,
    /// When runners that never held work were last forgotten.
    last_forget: Option<Instant>,
    /// The last scheduling round saw queued jobs: the loop schedules again on its next wake
    /// instead of waiting for a kick.
    queue_seen: bool,
}

impl State {
    /// How many attempts session `sid` holds.
    fn held(&self, sid: u64) -> u64 {
        self.held.get(&sid).map_or(0, |h| h.len() as u64)
    }

    /// The attempts on session `sid`.
    fn held_by(&self, sid: u64) -> Vec<AttemptId> {
        self.held
            .get(&sid)
            .map(|h| h.iter().copied().collect())
            .unwrap_or_default()
    }

    /// Whether the held counts agree with the attempts (what tests and debug builds check
    /// before each scheduling decision reads them).
    fn held_counts_agree(&self) -> bool {
        let mut counted: HashMap<u64, HashSet<AttemptId>> = HashMap::new();
        for (id, a) in &self.attempts {
            if let Some(sid) = a.session {
                counted.entry(sid).or_default().insert(*id);
            }
        }
        counted == self.held
    }

    /// Puts an attempt in flight (replacing one of the same id).
    fn insert_attempt(&mut self, id: AttemptId, live: LiveAttempt) {
        let session = live.session;
        if let Some(old) = self.attempts.insert(id, live) {
            hold(&mut self.held, old.session, id, false);
        }
        hold(&mut self.held, session, id, true);
    }

    /// Takes an attempt out of flight.
    fn remove_attempt(&mut self, id: &AttemptId) -> Option<LiveAttempt> {
        let live = self.attempts.remove(id)?;
        hold(&mut self.held, live.session, *id, false);
        Some(live)
    }

    /// Sends a cancel for `attempt` down its runner's stream; false when the runner is not
    /// attached (or its stream is full or gone).
    fn send_cancel(&self, attempt: AttemptId, grace: Duration, reason: &str) -> bool {
        let Some(live) = self.attempts.get(&attempt) else {
            return false;
        };
        let Some(session) = live
            .session
            .and_then(|sid| self.sessions.get(&live.runner_id).filter(|s| s.id == sid))
        else {
            return false;
        };
        session
            .tx
            .try_send(Ok(DispatcherMessage::Cancel(protocol::Cancel {
                attempt_id: attempt,
                grace_ms: grace.as_millis() as u64,
                reason: reason.to_string(),
            })))
            .is_ok()
    }
}

/// Adds `attempt` to session `sid`'s held attempts (`on`) or takes it out; a session left
/// with none loses its entry.
fn hold(
    held: &mut HashMap<u64, HashSet<AttemptId>>,
    sid: Option<u64>,
    attempt: AttemptId,
    on: bool,
) {
    let Some(sid) = sid else { return };
    if on {
        held.entry(sid).or_default().insert(attempt);
    } else if let Some(h) = held.get_mut(&sid) {
        h.remove(&attempt);
        if h.is_empty() {
            held.remove(&sid);
        }
    }
}

/// Moves attempt `id` of `State::attempts` to session `to` (`None`: orphaned), keeping
/// `State::held` (passed apart, so it can be called while iterating the attempts) up to date.
fn move_attempt(
    held: &mut HashMap<u64, HashSet<AttemptId>>,
    id: AttemptId,
    live: &mut LiveAttempt,
    to: Option<u64>,
) {
    if live.session != to {
        hold(held, live.session, id, false);
        hold(held, to, id, true);
        live.session = to;
    }
}

/// One attached runner.
struct Session {
    /// Distinguishes this session from an older or newer one of the same runner.
    id: u64,
    /// Runner name.
    name: String,
    /// Offered labels.
    labels: BTreeMap<String, String>,
    /// Jobs it can run at once.
    slots: u32,
    /// Sends to the runner's stream (bounded).
    tx: mpsc::Sender<Result<DispatcherMessage, DispatchError>>,
    /// Takes no new work.
    draining: bool,
    /// When it last spoke.
    last_heartbeat: Instant,
    /// Same, wall clock, for display.
    last_heartbeat_ms: Millis,
    /// Ends the session's tasks.
    stop: CancellationToken,
    /// When it last got work (round robin).
    last_assigned: u64,
    /// Assignments it refused in a row (reset when it accepts one).
    refusals: u32,
    /// After a refusal it gets no work until then (tokio clock, so tests can pause it).
    backoff_until: Option<tokio::time::Instant>,
    /// Hash of the secret given in its Welcome, which a new session must present to take over.
    secret_hash: String,
}

/// The first wait after a runner refuses an assignment; doubled on each further refusal.
const REFUSAL_BACKOFF: Duration = Duration::from_secs(1);
/// The longest wait between two assignments to a runner that keeps refusing them.
const MAX_REFUSAL_BACKOFF: Duration = Duration::from_secs(60);
/// Refusals in a row after which a runner counts as unhealthy.
pub(crate) const UNHEALTHY_REFUSALS: u32 = 3;
/// With several dispatchers: how long past the cancel's grace period a job cancelled on
/// another dispatcher's runner may take to end before that dispatcher is asked again.
const FOLLOW_UP_CANCEL_AFTER: Duration = Duration::from_secs(5);
/// How many times a cancel is asked again of another dispatcher.
const FOLLOW_UP_CANCELS: u32 = 3;

impl Session {
    /// Whether it may be given work now.
    fn takes_work(&self, now: tokio::time::Instant) -> bool {
        !self.draining && self.backoff_until.is_none_or(|t| t <= now)
    }

    /// Counts a refused assignment and backs off: 1 s, 2 s, 4 s, ... up to a minute, so a
    /// runner that refuses everything costs at most one attempt row a minute.
    fn refused_assignment(&mut self, now: tokio::time::Instant) -> Duration {
        self.refusals = self.refusals.saturating_add(1);
        let wait = REFUSAL_BACKOFF
            .saturating_mul(1 << self.refusals.saturating_sub(1).min(16))
            .min(MAX_REFUSAL_BACKOFF);
        self.backoff_until = Some(now + wait);
        wait
    }

    /// It accepted an assignment: healthy again.
    fn accepted_assignment(&mut self) {
        self.refusals = 0;
        self.backoff_until = None;
    }

    /// Refused enough assignments in a row to be counted unhealthy.
    fn unhealthy(&self) -> bool {
        self.refusals >= UNHEALTHY_REFUSALS
    }
}

/// An attempt in flight.
struct LiveAttempt {
    /// Its job.
    job_id: JobId,
    /// The job's build.
    build_id: BuildId,
    /// The runner that holds it.
    runner_id: RunnerId,
    /// The session it is on, `None` while orphaned.
    session: Option<u64>,
    /// When an orphaned attempt goes back to the queue if its runner is not back.
    orphan_deadline: Option<Instant>,
    /// Next output sequence number expected (loaded from the log on first use).
    next_seq: Option<u64>,
    /// A cancel was sent; when to give up waiting for the runner's answer.
    cancel_deadline: Option<Instant>,
    /// Timeout of each step in milliseconds (0 = none), to enforce step deadlines.
    step_timeouts: Vec<u64>,
    /// When the dispatcher ends the job itself.
    job_deadline: Option<Instant>,
    /// When the dispatcher ends the running step's job itself.
    step_deadline: Option<Instant>,
    /// Hash of the secret of the session that last held it (`None` after a restart): a runner
    /// re-attaching must present that secret (or its own token) to claim it.
    secret_hash: Option<String>,
    /// When it was last put on a session (assigned, or re-attached): until it had time to
    /// arrive, heartbeats that do not list it say nothing.
    on_session_since: Instant,
    /// Full heartbeats in a row (`lists_held`) of its session that did not list it.
    unlisted: u8,
    /// Something the runner sent about it could not be stored (the disk is full): its later
    /// messages are dropped unacknowledged until its session ends once space is back, and the
    /// runner sends them again (see `space`).
    paused: bool,
    /// When it was assigned (wall clock, for its trace span; `None` after a restart).
    assigned_at: Option<std::time::SystemTime>,
}

impl LiveAttempt {
    /// A new attempt of `job` on a runner (session `None` while orphaned).
    fn new(
        job: &kiln_domain::Job,
        runner_id: RunnerId,
        session: Option<u64>,
        config: &Config,
    ) -> Self {
        let step_timeouts: Vec<u64> = job.steps.iter().map(|s| s.timeout_ms).collect();
        let budget = if !step_timeouts.is_empty() && step_timeouts.iter().all(|t| *t > 0) {
            Duration::from_millis(step_timeouts.iter().sum())
                + config.deadline_slack * (step_timeouts.len() as u32 + 1)
        } else {
            config.max_job_time
        };
        Self {
            job_id: job.id,
            build_id: job.build_id,
            runner_id,
            session,
            orphan_deadline: None,
            next_seq: None,
            cancel_deadline: None,
            step_timeouts,
            job_deadline: Some(Instant::now() + budget),
            step_deadline: None,
            secret_hash: None,
            on_session_since: Instant::now(),
            unlisted: 0,
            paused: false,
            assigned_at: None,
        }
    }
}

impl Dispatcher {
    /// Opens the data directory (database, logs, mirrors), or the PostgreSQL database of
    /// `config.database`, and reconciles what was in flight when the dispatcher last stopped:
    /// those attempts wait one lease for their runners. It calls the store directly: not from
    /// an async task with a PostgreSQL database (see [`kiln_store::PgStore`]).
    pub fn open(config: Config) -> Result<Self, DispatchError> {
        let dir = &config.data_dir;
        std::fs::create_dir_all(dir).map_err(|e| {
            DispatchError::Internal(format!("cannot create data dir {}: {e}", dir.display()))
        })?;
        let (store, logs): (Arc<dyn Store>, Arc<dyn JobLogs>) = match &config.database {
            Some(db) => {
                let pg = Arc::new(PgStore::connect_with(db.clone())?);
                (pg.clone(), Arc::new(PgLogStore::new(pg)))
            }
            None => (
                Arc::new(SqliteStore::open(&dir.join("kiln.db"))?),
                Arc::new(LogStore::open(dir.join("logs"))?),
            ),
        };
        // With PostgreSQL, other dispatchers may be running on the database: this one registers
        // and takes only the attempts of dead ones (its own earlier process's, once that is
        // dead; the liveness round adopts the rest later).
        let cluster = match &config.database {
            Some(db) => {
                let me = store.register_dispatcher(&cluster::process_name(), now_millis())?;
                tracing::info!(dispatcher = %me, "registered among the database's dispatchers");
                Some(cluster::Cluster::new(me, db.clone()))
            }
            None => None,
        };
        let mirrors = Mirrors::new(dir.join("mirrors"))
            .map_err(|e| DispatchError::Internal(format!("mirrors: {}", error_chain(&e))))?;
        let mut state = State::default();
        // Runners reconnect with backoff (up to 2 s) and a connect timeout: give them at least
        // 10 s to re-attach what they hold before their jobs run elsewhere.
        let deadline = Instant::now() + config.lease().max(Duration::from_secs(10));
        let in_flight = match &cluster {
            Some(c) => store.adopt_attempts(c.me, cluster::alive_since())?,
            None => store.unfinished_attempts()?,
        };
        for a in in_flight {
            let Some(job) = store.get_job(a.job_id)? else {
                continue;
            };
            // The job's clock starts again: the dispatcher cannot know how long it ran while
            // the dispatcher was away.
            let mut live = LiveAttempt::new(&job, a.runner_id, None, &config);
            live.orphan_deadline = Some(deadline);
            if cluster.is_some() {
                // Recorded with PostgreSQL: the runner proves itself with it, as to the
                // dispatcher that gave it out.
                live.secret_hash = store.owned_attempt(a.id)?.and_then(|o| o.secret_hash);
            }
            state.insert_attempt(a.id, live);
        }
        if !state.attempts.is_empty() {
            tracing::info!(
                attempts = state.attempts.len(),
                "waiting one lease for runners to re-attach attempts in flight"
            );
        }
        let newest_only = kiln_domain::branch::branch_patterns(&config.newest_only)
            .map_err(|m| DispatchError::invalid("newest_only", m))?;
        let (events, _) = broadcast::channel(1024);
        let (dir, min_free) = (config.data_dir.clone(), config.min_free_space);
        let traces = trace::Traces::new(config.trace);
        Ok(Self {
            inner: Arc::new(Inner {
                config,
                store,
                logs,
                mirrors: Arc::new(mirrors),
                state: Mutex::new(state),
                kick: Notify::new(),
                rewake: Notify::new(),
                units_changed: Notify::new(),
                events,
                hub: hub::Hub::default(),
                next_session: AtomicU64::new(1),
                newest_only,
                space: space::Space::new(dir.clone(), min_free),
                metrics: metrics::Metrics::new(),
                traces,
                cluster,
            }),
        })
    }

    /// The settings.
    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs a store call on the blocking pool.
    async fn db<T, F>(&self, f: F) -> Result<T, DispatchError>
    where
        T: Send + 'static,
        F: FnOnce(&dyn Store) -> Result<T, kiln_store::StoreError> + Send + 'static,
    {
        let store = self.inner.store.clone();
        match tokio::task::spawn_blocking(move || f(store.as_ref())).await? {
            Ok(v) => Ok(v),
            Err(e) => Err(self.store_error(e)),
        }
    }

    /// What a store error is to the dispatcher's callers (a full disk marks it full).
    fn store_error(&self, e: kiln_store::StoreError) -> DispatchError {
        if e.is_disk_full() {
            self.disk_full("writing the database")
        } else {
            e.into()
        }
    }

    /// Marks the disk full (a write failed for want of space) and returns the error to report.
    fn disk_full(&self, what: &str) -> DispatchError {
        if self.inner.space.mark_full(what) {
            self.free_space();
        }
        DispatchError::ResourceExhausted {
            reason: self
                .inner
                .space
                .cause()
                .unwrap_or_else(|| "the dispatcher's disk is full".into()),
        }
    }

    /// Refuses new work while the data directory's disk is full.
    fn admit(&self) -> Result<(), DispatchError> {
        let was_full = self.inner.space.is_full();
        let admitted = self.inner.space.admit();
        if !was_full && self.inner.space.is_full() {
            self.free_space();
        }
        admitted.map_err(|reason| DispatchError::ResourceExhausted { reason })
    }

    /// The disk just filled up: drops from running jobs' logs the output of their superseded
    /// attempts (runners lost earlier), which nobody needs to finish the job.
    fn free_space(&self) {
        let live: Vec<(JobId, AttemptId)> = self
            .state()
            .attempts
            .iter()
            .map(|(a, live)| (live.job_id, *a))
            .collect();
        let logs = self.inner.logs.clone();
        tokio::task::spawn_blocking(move || {
            let mut freed = 0;
            for (job, keep) in live {
                match logs.drop_attempts(job, keep) {
                    Ok(n) => freed += n,
                    Err(e) => {
                        tracing::warn!(%job, cause = %error_chain(&e), "cannot drop superseded output")
                    }
                }
            }
            if freed > 0 {
                tracing::warn!(
                    freed,
                    "dropped superseded attempts' output from running jobs' logs to free space"
                );
            }
        });
    }

    /// Sends an event to `WatchBuilds` and counts it in the metrics (and with PostgreSQL, to
    /// the other dispatchers, which re-emit it to theirs).
    fn emit(&self, event: Event) {
        self.inner.metrics.on_event(&event);
        if let Some(c) = &self.inner.cluster {
            c.told(&event);
            c.send(kiln_store::Said::Event {
                event: event.clone(),
            });
        }
        let _ = self.inner.events.send(event);
    }

    /// The owner this dispatcher records for an attempt on session `sid` of `runner` (with
    /// PostgreSQL; `None` with SQLite, whose one dispatcher owns everything).
    fn owner_for(&self, runner: RunnerId, sid: u64) -> Option<kiln_store::Owner> {
        let c = self.inner.cluster.as_ref()?;
        let st = self.state();
        let s = st.sessions.get(&runner).filter(|s| s.id == sid)?;
        Some(kiln_store::Owner {
            dispatcher: c.me,
            secret_hash: s.secret_hash.clone(),
        })
    }

    /// This dispatcher's id among the database's dispatchers (PostgreSQL only).
    fn me(&self) -> Option<kiln_domain::DispatcherId> {
        self.inner.cluster.as_ref().map(|c| c.me)
    }

    /// The text of a `/metrics` scrape (see [`metrics`]).
    pub async fn metrics_text(&self) -> Result<String, DispatchError> {
        self.fold_tallies().await;
        let store = self.db(|s| s.metrics()).await?;
        let runners = {
            let st = self.state();
            let mut c = metrics::RunnerCounts::default();
            for s in st.sessions.values() {
                let held = st.held(s.id);
                c.attached += 1;
                c.busy += u64::from(held > 0);
                c.draining += u64::from(s.draining);
                c.slots += u64::from(s.slots);
                c.slots_used += held;
            }
            c
        };
        Ok(self.inner.metrics.encode(&store, runners))
    }

    /// Folds the store's tally deltas (see [`Store::fold_tallies`]). A failure (a full disk)
    /// only leaves them for the next fold: what the scrape reads is the same either way.
    async fn fold_tallies(&self) {
        if let Err(e) = self.db(|s| s.fold_tallies()).await {
            tracing::warn!(cause = %error_chain(&e), "cannot fold the metrics' tallies");
        }
    }

    /// Publishes what a state change did, and wakes followers of a job that ended.
    fn publish(&self, change: &Change) {
        let at = now_millis();
        self.emit(Event {
            build_id: change.build_id,
            job_id: Some(change.job_id),
            state: change.job_state,
            at,
        });
        if change.build_changed {
            self.emit(Event {
                build_id: change.build_id,
                job_id: None,
                state: change.build_state,
                at,
            });
        }
        if change.build_changed && change.build_state.is_final() {
            self.inner.traces.ended(change.build_id);
        }
        if change.job_state.is_final() {
            self.job_ended(change.job_id, change.job_state);
            self.seal_log(change.job_id);
        }
        for job in &change.skipped {
            self.emit(Event {
                build_id: change.build_id,
                job_id: Some(*job),
                state: JobState::Skipped,
                at,
            });
            self.job_ended(*job, JobState::Skipped);
        }
    }

    /// A job ended (with its runner's result, or ended by the dispatcher: a deadline, an
    /// unanswered cancel, too many lost attempts): its log is final, so it is flushed, closed
    /// and compressed at rest, off the caller's path. A late append unseals it.
    fn seal_log(&self, job: JobId) {
        let logs = self.inner.logs.clone();
        tokio::task::spawn_blocking(move || {
            let sealed = logs.sync(job).and_then(|()| logs.seal(job));
            match sealed {
                Ok(Some((plain, sealed))) => tracing::debug!(%job, plain, sealed, "log sealed"),
                Ok(None) => {}
                Err(e) => tracing::warn!(%job, cause = %error_chain(&e), "cannot seal the log"),
            }
        });
    }

    /// The store, for the dispatcher's companions in the same process (notifications keep
    /// their outbox in it). Its methods block: call them from blocking tasks.
    pub fn store(&self) -> Arc<dyn Store> {
        self.inner.store.clone()
    }

    /// Subscribes to state changes.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.inner.events.subscribe()
    }

    /// Wakes the scheduler.
    /// A deadline the scheduler loop watches was set: it recomputes when to wake.
    fn deadlines_changed(&self) {
        self.inner.rewake.notify_one();
    }

    fn kick(&self) {
        self.inner.kick.notify_one();
        self.inner.units_changed.notify_waiters();
    }

    /// Checks and stores a build request. The commit must exist in the repository; its
    /// pipeline is read at that commit. A pipeline that cannot be read still makes a build,
    /// `errored`, with the reason (file, line, column) and no jobs.
    pub async fn submit(&self, req: SubmitRequest) -> Result<BuildDetail, DispatchError> {
        let req = validate_submit(req, &self.inner.config.secrets)?;
        self.admit()?;
        let (repo, branch) = (req.repo.clone(), req.branch.clone());
        let new = self
            .prepare(req.repo, req.commit, req.branch, req.trigger, req.params)
            .await?;
        if self.newest_only(&branch) {
            // The branch builds only its newest commit: record it through the cursor so that
            // older builds of the branch are superseded.
            let head = new.commit.clone();
            let mut created = self.record(&repo, &branch, vec![new], &head).await?;
            return created
                .pop()
                .ok_or(DispatchError::AlreadyBuilt { build: None });
        }
        self.create(new).await
    }

    /// Checks out what a commit's build needs: the commit exists, its pipeline file (or the
    /// detected default), planned into jobs. A pipeline that cannot be read gives a build with
    /// the error and no jobs. `params` are the build's parameters, already checked.
    async fn prepare(
        &self,
        repo: String,
        commit: String,
        branch: String,
        trigger: String,
        params: BTreeMap<String, String>,
    ) -> Result<NewBuild, DispatchError> {
        let mirrors = self.inner.mirrors.clone();
        let (r, c) = (repo.clone(), commit.clone());
        let (full, named, pipeline) = tokio::task::spawn_blocking(move || {
            // A commit id, or a revision a user typed (`HEAD`, `main`, `v1.2`) resolved in the
            // mirror, which is fetched first for those since refs move.
            let resolved = mirrors.resolve_revision(&r, &c).map_err(git_error)?;
            let full = resolved.commit;
            let text = match mirrors.read_file(
                &r,
                &full,
                kiln_pipeline::FILE_NAME,
                kiln_pipeline::MAX_FILE_SIZE,
            ) {
                Ok(Some(bytes)) => match String::from_utf8(bytes) {
                    Ok(t) => Some(Ok(t)),
                    Err(_) => Some(Err(format!(
                        "{}: the file is not valid UTF-8",
                        kiln_pipeline::FILE_NAME
                    ))),
                },
                Ok(None) => None,
                Err(GitError::FileTooLarge {
                    size, max_bytes, ..
                }) => Some(Err(format!(
                    "{}: the file is {size} bytes, more than the limit of {max_bytes}",
                    kiln_pipeline::FILE_NAME
                ))),
                Err(e) => return Err(git_error(e)),
            };
            let paths = mirrors
                .list_files(&r, &full, 2, 10_000)
                .map_err(git_error)?;
            let pipeline = match text {
                Some(Err(e)) => Err(e),
                Some(Ok(t)) => kiln_pipeline::resolve(Some(&t), &paths, &BTreeMap::new())
                    .map_err(|e| e.to_string()),
                None => {
                    // Detection reads a few root files (pyproject.toml, package.json, ...).
                    let mut files = BTreeMap::new();
                    for name in kiln_pipeline::detect_wants(&paths) {
                        match mirrors.read_file(&r, &full, &name, kiln_pipeline::MAX_DETECT_FILE) {
                            Ok(Some(bytes)) => {
                                if let Ok(text) = String::from_utf8(bytes) {
                                    files.insert(name, text);
                                }
                            }
                            Ok(None) | Err(GitError::FileTooLarge { .. }) => {}
                            Err(e) => return Err(git_error(e)),
                        }
                    }
                    kiln_pipeline::resolve(None, &paths, &files).map_err(|e| e.to_string())
                }
            };
            Ok::<_, DispatchError>((full, resolved.branch, pipeline))
        })
        .await??;
        // A build of a branch name (`--commit main`) is a build of that branch unless the caller
        // said otherwise.
        let branch = match named {
            Some(b) if branch.is_empty() => b,
            _ => branch,
        };
        let source = pipeline
            .as_ref()
            .map(|p| p.source.describe())
            .unwrap_or_default();
        let (jobs, error) = match pipeline.and_then(|p| pipeline_jobs(p, &branch)) {
            Ok(jobs) => (jobs, None),
            Err(e) => (Vec::new(), Some(e)),
        };
        let pipeline_hash = pipeline_hash(&jobs, error.as_deref(), &params);
        Ok(NewBuild {
            repo,
            commit: full,
            branch,
            trigger,
            retry_of: None,
            error,
            jobs,
            pipeline_hash,
            pipeline: source,
            params,
        })
    }

    /// Whether `branch` builds only its newest commit (and cancels superseded builds).
    fn newest_only(&self, branch: &str) -> bool {
        kiln_domain::branch::any_matches(&self.inner.newest_only, branch)
    }

    /// New commits of a branch, oldest first (from an observer, a webhook or a hook): one
    /// build per commit not built before, in order, in one transaction that also moves the
    /// branch's cursor. A branch with the newest-only policy builds only the last commit and
    /// cancels the branch's older unfinished builds.
    pub async fn report_commits(
        &self,
        repo: &str,
        branch: &str,
        commits: &[String],
        trigger: &str,
    ) -> Result<Vec<BuildDetail>, DispatchError> {
        let req = validate_submit(
            SubmitRequest {
                repo: repo.to_string(),
                commit: commits.last().cloned().unwrap_or_default(),
                branch: branch.to_string(),
                trigger: trigger.to_string(),
                params: BTreeMap::new(),
            },
            &self.inner.config.secrets,
        )?;
        if req.branch.is_empty() {
            return Err(DispatchError::invalid("branch", "branch is required"));
        }
        self.admit()?;
        if commits.len() > MAX_REPORTED_COMMITS {
            return Err(DispatchError::invalid(
                "commits",
                format!(
                    "at most {MAX_REPORTED_COMMITS} commits per report, got {}",
                    commits.len()
                ),
            ));
        }
        for c in commits {
            kiln_git::validate_commit_id(c).map_err(git_error)?;
        }
        // A report older than what the branch already recorded (a second observer that read the
        // cursor earlier) changes nothing: the cursor only moves forward.
        if let (Some(cursor), Some(last)) = (
            self.branch_cursor(&req.repo, &req.branch).await?,
            commits.last().cloned(),
        ) {
            let mirrors = self.inner.mirrors.clone();
            let repo = req.repo.clone();
            let (c, l) = (cursor.clone(), last.to_ascii_lowercase());
            let stale = tokio::task::spawn_blocking(move || {
                mirrors
                    .first_parent_since(&repo, &l, Some(&c), MAX_REPORTED_COMMITS)
                    .map(|fp| fp.behind || l == c)
            })
            .await?
            .map_err(git_error)?;
            if stale {
                tracing::debug!(repo = %req.repo, branch = %req.branch, "stale report ignored");
                return Ok(Vec::new());
            }
        }
        let wanted: &[String] = if self.newest_only(&req.branch) {
            &commits[commits.len() - 1..]
        } else {
            commits
        };
        let mut builds = Vec::with_capacity(wanted.len());
        for c in wanted {
            builds.push(
                self.prepare(
                    req.repo.clone(),
                    c.to_ascii_lowercase(),
                    req.branch.clone(),
                    req.trigger.clone(),
                    BTreeMap::new(),
                )
                .await?,
            );
        }
        let head = builds.last().map(|b| b.commit.clone()).unwrap_or_default();
        self.record(&req.repo, &req.branch, builds, &head).await
    }

    async fn record(
        &self,
        repo: &str,
        branch: &str,
        builds: Vec<NewBuild>,
        head: &str,
    ) -> Result<Vec<BuildDetail>, DispatchError> {
        let supersede = self.newest_only(branch);
        let (r, b, h) = (repo.to_string(), branch.to_string(), head.to_string());
        let recorded = self
            .db(move |s| s.record_commits(&r, &b, &builds, &h, supersede))
            .await?;
        for d in &recorded.created {
            self.announce(d);
        }
        for ch in &recorded.superseded {
            self.publish(ch);
        }
        for a in &recorded.to_cancel {
            self.cancel_on_runner(*a, "superseded by a newer build");
        }
        self.kick();
        Ok(recorded.created)
    }

    /// The last commit recorded for a branch, if any.
    pub async fn branch_cursor(
        &self,
        repo: &str,
        branch: &str,
    ) -> Result<Option<String>, DispatchError> {
        let repo = repo.trim();
        let r = if kiln_git::location::is_url(repo) || !repo.starts_with('/') {
            repo.to_string()
        } else {
            kiln_git::location::local_identity(repo)
        };
        let b = branch.to_string();
        self.db(move |s| s.branch_cursor(&r, &b)).await
    }

    /// Tells the runner of an attempt (if attached) to stop it; the attempt is forgotten. With
    /// PostgreSQL, an attempt not held here is another dispatcher's: that one is asked.
    fn cancel_on_runner(&self, attempt: AttemptId, reason: &str) {
        let grace = self.inner.config.cancel_grace;
        let held = {
            let mut st = self.state();
            st.send_cancel(attempt, grace, reason);
            st.remove_attempt(&attempt).is_some()
        };
        if !held && let Some(c) = &self.inner.cluster {
            c.send(kiln_store::Said::Cancel {
                attempt,
                grace_ms: grace.as_millis() as u64,
                reason: reason.to_string(),
            });
        }
    }

    async fn create(&self, new: NewBuild) -> Result<BuildDetail, DispatchError> {
        let detail = self.db(move |s| s.create_build(&new)).await?;
        self.announce(&detail);
        self.kick();
        Ok(detail)
    }

    /// Publishes a new build and its jobs.
    fn announce(&self, detail: &BuildDetail) {
        let at = now_millis();
        self.emit(Event {
            build_id: detail.build.id,
            job_id: None,
            state: detail.build.state,
            at,
        });
        self.inner.traces.accepted(&detail.build);
        for job in &detail.jobs {
            self.emit(Event {
                build_id: detail.build.id,
                job_id: Some(job.id),
                state: job.state,
                at,
            });
        }
        tracing::info!(build = %detail.build.id, repo = %detail.build.repo,
            commit = %detail.build.commit, state = %detail.build.state, "build accepted");
    }

    /// One build.
    pub async fn get_build(&self, id: BuildId) -> Result<BuildDetail, DispatchError> {
        if id.get() == 0 {
            return Err(DispatchError::invalid("build_id", "build_id is required"));
        }
        let mut detail = self
            .db(move |s| s.get_build(id))
            .await?
            .ok_or(DispatchError::NotFound(Missing::Build(id)))?;
        self.show_paused(&mut detail);
        Ok(detail)
    }

    /// Says on each running job whose attempt is paused (the disk is full) why it waits.
    fn show_paused(&self, detail: &mut BuildDetail) {
        let Some(cause) = self.inner.space.cause() else {
            return;
        };
        let st = self.state();
        for job in &mut detail.jobs {
            let paused = job
                .current_attempt
                .and_then(|a| st.attempts.get(&a))
                .is_some_and(|a| a.paused);
            if paused {
                job.message = Some(format!(
                    "paused: {cause}; the runner keeps the job's output until then"
                ));
            }
        }
    }

    /// The test report of a build: its split steps, its plain steps' `junit` files, and the
    /// two merged as JUnit XML (`None` when the build has no split step and no test case).
    pub async fn test_report(&self, id: BuildId) -> Result<TestReport, DispatchError> {
        let detail = self.get_build(id).await?;
        let splits = self.db(move |s| s.split_reports(id)).await?;
        let steps = self.db(move |s| s.step_reports(id)).await?;
        // A step whose files gave no case (none written, none readable) is no report: an
        // empty one would read as a success.
        Ok(TestReport {
            build: detail.build,
            splits,
            steps,
        })
    }

    /// The batches of a build's split steps as they ran (which shard's attempt ran which
    /// units, when, in which round): a timeline's data.
    pub async fn split_batches(
        &self,
        id: BuildId,
    ) -> Result<Vec<kiln_domain::split::BatchRecord>, DispatchError> {
        self.db(move |s| s.split_batches(id)).await
    }

    /// The past of some units of a split of build `id`'s repository: their verdicts in the
    /// last `limit` builds up to `id` and their flaky and failed counts (the tests page's
    /// history of flaky and failed tests).
    pub async fn unit_pasts(
        &self,
        id: BuildId,
        key: String,
        units: Vec<String>,
        limit: u32,
    ) -> Result<Vec<kiln_domain::split::UnitPast>, DispatchError> {
        let repo = self.get_build(id).await?.build.repo;
        self.db(move |s| s.unit_pasts(&repo, &key, &units, id, limit))
            .await
    }

    /// The notifications planned for a build and where each stands (the delivery log).
    pub async fn deliveries(
        &self,
        id: BuildId,
    ) -> Result<Vec<kiln_store::Delivery>, DispatchError> {
        self.db(move |s| s.deliveries(id)).await
    }

    /// One job.
    pub async fn get_job(&self, id: JobId) -> Result<kiln_domain::Job, DispatchError> {
        self.db(move |s| s.get_job(id))
            .await?
            .ok_or(DispatchError::NotFound(Missing::Job(id)))
    }

    /// Builds, newest first.
    pub async fn list_builds(
        &self,
        filter: BuildFilter,
    ) -> Result<Vec<kiln_domain::Build>, DispatchError> {
        self.db(move |s| s.list_builds(&filter)).await
    }

    /// Cancels every unfinished job of a build: queued jobs end at once; running ones get a
    /// cancel down their runner's stream and end when the runner reports (or, if it does not,
    /// when the grace period and a margin have passed).
    pub async fn cancel_build(&self, id: BuildId) -> Result<BuildDetail, DispatchError> {
        let detail = self.get_build(id).await?;
        let grace = self.inner.config.cancel_grace;
        let reason = "cancelled by user";
        for job in detail.jobs.iter().filter(|j| !j.state.is_final()) {
            if let Some(a) = job.current_attempt
                && self.cancel_elsewhere(a, grace, reason).await?
            {
                // The bus does not resend a lost message: ask again until the job ends.
                let d = self.clone();
                let job = job.id;
                tokio::spawn(
                    async move { d.follow_up_cancel(job, a, grace, reason).await }
                        .instrument(tracing::info_span!("cancel", %job, attempt = %a)),
                );
                continue;
            }
            match job.current_attempt {
                Some(a) => self.cancel_attempt(job.id, a, grace, reason).await?,
                None => self.end_cancelled(job.id, None).await?,
            }
        }
        self.get_build(id).await
    }

    /// Cancels a job whose current attempt is `attempt`: down its runner's stream when its
    /// runner is attached here (the job ends when the runner reports, or when the grace period
    /// and a margin have passed), else at once.
    async fn cancel_attempt(
        &self,
        job: JobId,
        attempt: AttemptId,
        grace: Duration,
        reason: &str,
    ) -> Result<(), DispatchError> {
        let sent = {
            let mut st = self.state();
            let sent = st.send_cancel(attempt, grace, reason);
            if sent && let Some(live) = st.attempts.get_mut(&attempt) {
                // Post steps still run after a cancel: give them time before stepping in. A
                // cancel asked again (`follow_up_cancel`) keeps the first deadline.
                live.cancel_deadline.get_or_insert_with(|| {
                    Instant::now() + grace + self.inner.config.deadline_slack * 2
                });
            }
            sent
        };
        if sent {
            self.deadlines_changed();
            return Ok(());
        }
        self.end_cancelled(job, Some(attempt)).await
    }

    /// Ends a job `cancelled` at once (its attempt, if any, leaves memory).
    async fn end_cancelled(
        &self,
        job: JobId,
        attempt: Option<AttemptId>,
    ) -> Result<(), DispatchError> {
        if let Some(ch) = self
            .db(move |s| s.end_job(job, JobState::Cancelled, "cancelled by user"))
            .await?
        {
            if let Some(a) = attempt {
                self.state().remove_attempt(&a);
            }
            self.publish(&ch);
        }
        Ok(())
    }

    /// After asking another dispatcher to cancel `attempt` (`cancel_elsewhere`): a message on
    /// the bus can be lost (its connection broke), so while the job has not ended, it is asked
    /// again every grace period and [`FOLLOW_UP_CANCEL_AFTER`], [`FOLLOW_UP_CANCELS`] times.
    /// When its owner is gone, or once the owner's own deadline for the cancel has passed (the
    /// grace period and twice the deadline slack), the job is ended here: a result its runner
    /// sends later is refused, that attempt being over.
    async fn follow_up_cancel(
        &self,
        job: JobId,
        attempt: AttemptId,
        grace: Duration,
        reason: &'static str,
    ) {
        let asked_at = Instant::now();
        let give_up = grace + self.inner.config.deadline_slack * 2 + FOLLOW_UP_CANCEL_AFTER;
        let mut asks = 0;
        loop {
            let wait = if asks < FOLLOW_UP_CANCELS {
                grace + FOLLOW_UP_CANCEL_AFTER
            } else {
                give_up.saturating_sub(asked_at.elapsed())
            };
            tokio::time::sleep(wait).await;
            let still = match self.db(move |s| s.get_job(job)).await {
                Ok(Some(j)) => !j.state.is_final() && j.current_attempt == Some(attempt),
                Ok(None) => false,
                Err(e) => {
                    tracing::warn!(cause = %error_chain(&e), "cannot read the job being cancelled");
                    true
                }
            };
            if !still {
                return;
            }
            if asks < FOLLOW_UP_CANCELS {
                asks += 1;
                match self.cancel_elsewhere(attempt, grace, reason).await {
                    Ok(true) => {
                        tracing::warn!(
                            asks,
                            "a cancelled job has not ended: asked its dispatcher again"
                        );
                        continue;
                    }
                    Ok(false) => {}
                    Err(e) => {
                        tracing::warn!(cause = %error_chain(&e), "cannot ask for the cancel again");
                        continue;
                    }
                }
            }
            // Its owner is gone (or the attempt is held here now), or it never ended there.
            tracing::warn!("a job cancelled on another dispatcher's runner is ended here");
            if let Err(e) = self.cancel_attempt(job, attempt, grace, reason).await {
                tracing::error!(cause = %error_chain(&e), "cancel failed");
            }
            return;
        }
    }

    /// With PostgreSQL, an attempt not in this dispatcher's memory may be another live
    /// dispatcher's: that one is asked (over the bus) to cancel it on its runner. True when
    /// it was asked.
    async fn cancel_elsewhere(
        &self,
        attempt: AttemptId,
        grace: Duration,
        reason: &str,
    ) -> Result<bool, DispatchError> {
        let Some(me) = self.me() else {
            return Ok(false);
        };
        if self.state().attempts.contains_key(&attempt) {
            return Ok(false);
        }
        let (owned, dispatchers) = self
            .db(move |s| Ok((s.owned_attempt(attempt)?, s.dispatchers()?)))
            .await?;
        let now = now_millis();
        let owner = owned
            .filter(|o| o.current)
            .and_then(|o| o.owner)
            .filter(|o| *o != me && dispatchers.iter().any(|d| d.id == *o && d.alive(now)));
        let Some(owner) = owner else {
            // Nobody alive holds it: ended here (its runner is told when it re-attaches).
            return Ok(false);
        };
        tracing::info!(%attempt, %owner, "asking the attempt's dispatcher to cancel it");
        if let Some(c) = &self.inner.cluster {
            c.send(kiln_store::Said::Cancel {
                attempt,
                grace_ms: grace.as_millis() as u64,
                reason: reason.to_string(),
            });
        }
        Ok(true)
    }

    /// Builds a finished build's commit again, with the same jobs and parameters, as a new
    /// build.
    pub async fn retry_build(&self, id: BuildId) -> Result<BuildDetail, DispatchError> {
        self.admit()?;
        let old = self.get_build(id).await?;
        if !old.build.state.is_final() {
            return Err(DispatchError::FailedPrecondition {
                message: format!(
                    "build {id} is still {}; only a finished build can be retried",
                    old.build.state
                ),
            });
        }
        if old.jobs.is_empty() {
            // Its pipeline could not be read: read it again, it may have been a transient error.
            let mut new = self
                .prepare(
                    old.build.repo.clone(),
                    old.build.commit.clone(),
                    old.build.branch.clone(),
                    format!("retry of {id}"),
                    old.build.params.clone(),
                )
                .await?;
            new.retry_of = Some(id);
            return self.create(new).await;
        }
        let new = NewBuild {
            repo: old.build.repo.clone(),
            commit: old.build.commit.clone(),
            branch: old.build.branch.clone(),
            trigger: format!("retry of {id}"),
            retry_of: Some(id),
            error: None,
            jobs: old
                .jobs
                .iter()
                .map(|j| NewJob {
                    name: j.name.clone(),
                    labels: j.labels.clone(),
                    steps: j.steps.clone(),
                    needs: j
                        .needs
                        .iter()
                        .filter_map(|n| old.jobs.iter().position(|o| o.id == *n))
                        .collect(),
                })
                .collect(),
            pipeline_hash: String::new(),
            pipeline: old.build.pipeline.clone(),
            params: old.build.params.clone(),
        };
        self.create(new).await
    }

    /// Jobs ready to run and waiting for a runner, per label set they need.
    pub async fn queue(&self) -> Result<Vec<(BTreeMap<String, String>, u64)>, DispatchError> {
        self.db(|s| s.ready_by_labels()).await
    }

    /// Every known runner with its live state.
    pub async fn list_runners(&self) -> Result<Vec<RunnerView>, DispatchError> {
        let records = self.db(|s| s.list_runners()).await?;
        // With PostgreSQL: runners attached to other live dispatchers, and what they run.
        let (elsewhere, remote_running) = match self.me() {
            Some(me) => {
                let since = cluster::alive_since();
                self.db(move |s| {
                    let attached: std::collections::HashSet<RunnerId> = s
                        .attached_runners(since)?
                        .into_iter()
                        .filter(|(_, d)| *d != me)
                        .map(|(r, _)| r)
                        .collect();
                    let running = if attached.is_empty() {
                        Vec::new()
                    } else {
                        s.unfinished_attempts()?
                    };
                    Ok((attached, running))
                })
                .await?
            }
            None => Default::default(),
        };
        let st = self.state();
        // One pass over the live attempts, not one per runner.
        let mut running: HashMap<RunnerId, Vec<JobId>> = HashMap::new();
        for a in st.attempts.values().filter(|a| a.session.is_some()) {
            running.entry(a.runner_id).or_default().push(a.job_id);
        }
        for a in remote_running {
            if elsewhere.contains(&a.runner_id) && !st.sessions.contains_key(&a.runner_id) {
                running.entry(a.runner_id).or_default().push(a.job_id);
            }
        }
        Ok(records
            .into_iter()
            .map(|r| {
                let mut running_jobs = running.remove(&r.id).unwrap_or_default();
                running_jobs.sort_unstable();
                let (state, hb) = match st.sessions.get(&r.id) {
                    // Attached to another dispatcher (whether it drains is that one's).
                    None if elsewhere.contains(&r.id) && running_jobs.is_empty() => {
                        (RunnerState::Idle, r.last_seen)
                    }
                    None if elsewhere.contains(&r.id) => (RunnerState::Busy, r.last_seen),
                    None => (RunnerState::Offline, r.last_seen),
                    Some(s) if s.draining => (RunnerState::Draining, s.last_heartbeat_ms),
                    Some(s) if running_jobs.is_empty() => (RunnerState::Idle, s.last_heartbeat_ms),
                    Some(s) => (RunnerState::Busy, s.last_heartbeat_ms),
                };
                RunnerView {
                    record: r,
                    state,
                    running_jobs,
                    last_heartbeat: hb,
                }
            })
            .collect())
    }

    /// Where a follower of `job`'s log stands; subscribe first, then read the store, so that
    /// no end of job can be missed. The log's length is read on a blocking thread (a
    /// PostgreSQL log store waits for the database): for a job's first follower under the
    /// hub's lock, so no growth between the read and the subscription is missed; for a job
    /// already followed too, since with a PostgreSQL log store another dispatcher may have
    /// appended to it (which only its own hub heard of).
    pub async fn follow(
        &self,
        job: JobId,
    ) -> Result<tokio::sync::watch::Receiver<LogProgress>, DispatchError> {
        let inner = self.inner.clone();
        let followed = move || {
            let mut fresh = false;
            let rx = inner.hub.subscribe(job, || {
                fresh = true;
                inner.logs.len(job)
            })?;
            if !fresh {
                inner.hub.advance(job, inner.logs.len(job)?);
            }
            Ok::<_, kiln_store::LogError>(rx)
        };
        Ok(tokio::task::spawn_blocking(followed).await??)
    }

    /// The stored length of `job`'s log.
    pub async fn log_len(&self, job: JobId) -> Result<u64, DispatchError> {
        let logs = self.inner.logs.clone();
        Ok(tokio::task::spawn_blocking(move || logs.len(job)).await??)
    }

    /// Reads stored output of `job` from `offset` up to `limit`.
    pub async fn read_log(
        &self,
        job: JobId,
        offset: u64,
        limit: u64,
        max_bytes: usize,
    ) -> Result<kiln_store::ReadResult, DispatchError> {
        let logs = self.inner.logs.clone();
        Ok(tokio::task::spawn_blocking(move || logs.read(job, offset, limit, max_bytes)).await??)
    }

    /// The first frame boundary of `job`'s log at or after `target` (at most `limit`, a
    /// published length) and the lines of `shown` attempts' output before it, read from the
    /// log's checkpoint index: about a MiB of log whatever its size.
    pub async fn locate_log(
        &self,
        job: JobId,
        target: u64,
        limit: u64,
        shown: impl Fn(AttemptId) -> bool + Send + 'static,
    ) -> Result<kiln_store::Located, DispatchError> {
        let logs = self.inner.logs.clone();
        Ok(tokio::task::spawn_blocking(move || logs.locate(job, target, limit, &shown)).await??)
    }

    /// A job ended (recorded here or, with PostgreSQL, told by another dispatcher): its
    /// followers end at the log's stored length, read now, after the end was committed (see
    /// `settle_follow`); off the caller's path, and only when the job has followers.
    pub(crate) fn job_ended(&self, job: JobId, state: JobState) {
        if !self.inner.hub.is_followed(job) {
            return;
        }
        let d = self.clone();
        tokio::spawn(async move { d.settle_follow(job, state).await });
    }

    /// Marks a job's followers done if the job ended, at the log's stored length read now.
    /// The one place that ends followers (`job_ended`, StreamLogs right after subscribing,
    /// the bus's resync): the end is recorded only after every byte of output before it is
    /// stored (`on_job_finished` checks the attempt's last sequence number against the store
    /// first), so the length read after the end is the whole log; the hub's own length is
    /// not, as growth it heard of may still be on its way (another dispatcher's coalesced
    /// `Log`, or this dispatcher's append on another session of the runner).
    pub async fn settle_follow(&self, job: JobId, state: JobState) {
        if !state.is_final() {
            return;
        }
        self.advance_to_stored(job).await;
        self.inner.hub.finish(job, state);
    }

    /// Tells the followers of `job` its stored length.
    pub(crate) async fn advance_to_stored(&self, job: JobId) {
        match self.log_len(job).await {
            Ok(len) => self.inner.hub.advance(job, len),
            Err(e) => tracing::warn!(%job, cause = %error_chain(&e), "cannot read a log's length"),
        }
    }

    /// Tells one attached runner to drain: it gets no new work from now on, finishes what it
    /// runs and detaches.
    pub async fn drain_runner(&self, name: &str) -> Result<RunnerView, DispatchError> {
        let name = name.trim();
        // A valid name, or an error that quotes only its start (a long name is not echoed).
        session::check_runner_name(name, "name").map_err(|m| DispatchError::invalid("name", m))?;
        let found = self.drain_local(name);
        let runners = self.list_runners().await?;
        let mut view = runners.into_iter().find(|r| r.record.name == name);
        // With PostgreSQL: attached to another live dispatcher, which is asked to drain it.
        let found = match (&self.inner.cluster, &mut view) {
            (Some(c), Some(v)) if !found && v.state != RunnerState::Offline => {
                c.send(kiln_store::Said::Drain {
                    runner: name.to_string(),
                });
                v.state = RunnerState::Draining;
                true
            }
            _ => found,
        };
        match (found, view) {
            (true, Some(v)) => {
                tracing::info!(runner = %name, "draining runner");
                Ok(v)
            }
            (false, Some(_)) => Err(DispatchError::FailedPrecondition {
                message: format!("runner {name} is not attached"),
            }),
            _ => Err(DispatchError::NotFound(Missing::Runner(name.to_string()))),
        }
    }

    /// Flushes every open log to disk (on shutdown).
    pub fn sync_logs(&self) {
        if let Err(e) = self.inner.logs.sync_all() {
            tracing::error!(cause = %error_chain(&e), "cannot flush logs");
        }
    }

    /// Tells every attached runner to drain (used on shutdown).
    pub fn drain_all(&self, reason: &str) {
        let st = self.state();
        for s in st.sessions.values() {
            let _ = s.tx.try_send(Ok(DispatcherMessage::Drain(protocol::Drain {
                reason: reason.to_string(),
            })));
        }
    }

    /// Ends every session (their runners reconnect to the next dispatcher).
    pub fn close_sessions(&self) {
        let st = self.state();
        for s in st.sessions.values() {
            s.stop.cancel();
        }
    }
}

/// Maps git errors to what the submitter should hear.
fn git_error(e: GitError) -> DispatchError {
    match e {
        GitError::InvalidCommitId { .. }
        | GitError::InvalidRevision { .. }
        | GitError::AmbiguousCommit { .. } => DispatchError::invalid("commit", e.to_string()),
        GitError::RepositoryNotFound { .. }
        | GitError::CommitNotFound { .. }
        | GitError::RevisionNotFound { .. } => {
            DispatchError::NotFound(Missing::Revision(e.to_string()))
        }
        other => DispatchError::Unavailable {
            message: error_chain(&other),
        },
    }
}

/// Largest accepted repository URL.
const MAX_REPO_LEN: usize = 4096;
/// Largest accepted branch name.
const MAX_BRANCH_LEN: usize = 255;
/// Largest accepted trigger text.
const MAX_TRIGGER_LEN: usize = 128;

fn validate_submit(
    mut req: SubmitRequest,
    secrets: &BTreeMap<String, String>,
) -> Result<SubmitRequest, DispatchError> {
    let bad = |field: &'static str, m: String| Err(DispatchError::invalid(field, m));
    req.repo = req.repo.trim().to_string();
    req.commit = req.commit.trim().to_string();
    if kiln_git::revision::is_commit_id(&req.commit) {
        req.commit.make_ascii_lowercase();
    }
    if req.repo.is_empty() {
        return bad(
            "repo",
            "repo is required (a URL or an absolute path)".into(),
        );
    }
    if req.repo.len() > MAX_REPO_LEN {
        return bad("repo", format!("repo is longer than {MAX_REPO_LEN} bytes"));
    }
    if req.repo.chars().any(char::is_control) {
        return bad("repo", "repo contains control characters".into());
    }
    let is_url = kiln_git::location::is_url(&req.repo);
    if !is_url && !req.repo.starts_with('/') {
        return bad(
            "repo",
            format!("repo {:?} is neither a URL nor an absolute path", req.repo),
        );
    }
    if !is_url {
        req.repo = kiln_git::location::local_identity(&req.repo);
    }
    if req.commit.is_empty() {
        return bad("commit", "commit is required".into());
    }
    kiln_git::validate_revision(&req.commit).map_err(git_error)?;
    if req.branch.len() > MAX_BRANCH_LEN {
        return bad(
            "branch",
            format!("branch is longer than {MAX_BRANCH_LEN} bytes"),
        );
    }
    if req
        .branch
        .chars()
        .any(|c| c.is_control() || c.is_whitespace() || "~^:?*[\\".contains(c))
        || req.branch.contains("..")
        || req.branch.starts_with('-')
    {
        return bad(
            "branch",
            format!("branch {:?} is not a valid branch name", req.branch),
        );
    }
    if req.trigger.len() > MAX_TRIGGER_LEN || req.trigger.chars().any(char::is_control) {
        return bad(
            "trigger",
            format!("trigger must be at most {MAX_TRIGGER_LEN} printable characters"),
        );
    }
    if req.trigger.is_empty() {
        req.trigger = "api".into();
    }
    if let Some(why) = kiln_domain::params::check_all(&req.params, |n| secrets.contains_key(n)) {
        return bad("env", why);
    }
    Ok(req)
}

/// Plans a pipeline's jobs for a build of `branch` (a `steps:` file is one job; a `jobs:` file
/// a DAG, matrix cells expanded, `when` applied) and turns them into jobs to store.
fn pipeline_jobs(p: kiln_pipeline::Pipeline, branch: &str) -> Result<Vec<NewJob>, String> {
    let plans = kiln_pipeline::plan(&p, branch).map_err(|e| e.to_string())?;
    if plans.is_empty() {
        return Err(format!(
            "{}: no job runs for branch {branch:?} (every job's `when` excludes it)",
            kiln_pipeline::FILE_NAME
        ));
    }
    let position: std::collections::HashMap<String, usize> = plans
        .iter()
        .enumerate()
        .map(|(i, j)| (j.name.clone(), i))
        .collect();
    plans
        .into_iter()
        .enumerate()
        .map(|(i, job)| {
            let needs = job
                .needs
                .iter()
                .map(|n| match position.get(n) {
                    Some(&at) if at < i => Ok(at),
                    _ => Err(format!(
                        "{}: job {:?} needs {n:?}, which is not planned before it",
                        kiln_pipeline::FILE_NAME,
                        job.name
                    )),
                })
                .collect::<Result<Vec<_>, _>>()?;
            let steps = job
                .steps
                .into_iter()
                .enumerate()
                .map(|(i, s)| StepSpec {
                    index: i as u32,
                    name: s.name,
                    run: s.run,
                    env: s.env,
                    timeout_ms: s.timeout.map(|t| t.as_millis() as u64).unwrap_or(0),
                    post: s.post.map(|p| match p {
                        kiln_pipeline::Post::Always => PostCondition::Always,
                        kiln_pipeline::Post::Success => PostCondition::Success,
                        kiln_pipeline::Post::Failure => PostCondition::Failure,
                    }),
                    junit: s.junit,
                    split: s.split.zip(job.shard.as_ref()).map(|(split, shard)| {
                        kiln_domain::split::SplitSpec {
                            key: shard.key.clone(),
                            shards: split.shards,
                            shard: shard.index,
                            units: split.units,
                            strategy: split.strategy,
                            retry: split.retry,
                            max_batch: split.max_batch,
                        }
                    }),
                })
                .collect();
            Ok(NewJob {
                name: job.name,
                labels: job.labels,
                steps,
                needs,
            })
        })
        .collect()
}

/// Most commits one report may carry.
const MAX_REPORTED_COMMITS: usize = 1000;

/// The identity of a build's pipeline: a hash of its planned jobs (or of its error) and of its
/// parameters, so a build with other parameters is another build.
fn pipeline_hash(
    jobs: &[NewJob],
    error: Option<&str>,
    params: &BTreeMap<String, String>,
) -> String {
    use sha2::{Digest, Sha256};
    // Without parameters, the text hashed before builds had them: a commit built then is
    // still a duplicate now.
    let text = if params.is_empty() {
        serde_json::to_string(&(jobs, error))
    } else {
        serde_json::to_string(&(jobs, error, params))
    }
    .unwrap_or_default();
    hex::encode(Sha256::digest(text.as_bytes()))
}

/// Source of ids for sessions.
fn next_session_id(inner: &Inner) -> u64 {
    inner.next_session.fetch_add(1, Ordering::Relaxed)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod validation_tests {
    use super::*;

    #[test]
    fn submit_validation_names_the_field() {
        let ok = SubmitRequest {
            repo: "/tmp/r".into(),
            commit: "a".repeat(40),
            ..Default::default()
        };
        assert!(validate_submit(ok.clone(), &BTreeMap::new()).is_ok());
        let cases = [
            (
                SubmitRequest {
                    repo: String::new(),
                    ..ok.clone()
                },
                "repo",
            ),
            (
                SubmitRequest {
                    repo: "relative/path".into(),
                    ..ok.clone()
                },
                "absolute",
            ),
            (
                SubmitRequest {
                    commit: String::new(),
                    ..ok.clone()
                },
                "commit",
            ),
            (
                SubmitRequest {
                    commit: "x y".into(),
                    ..ok.clone()
                },
                "revision",
            ),
            (
                SubmitRequest {
                    branch: "a b".into(),
                    ..ok.clone()
                },
                "branch",
            ),
        ];
        for (req, word) in cases {
            match validate_submit(req, &BTreeMap::new()) {
                Err(DispatchError::InvalidArgument { message: m, .. }) => {
                    assert!(m.contains(word), "{m}")
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn build_parameters_are_checked_and_each_refusal_names_the_variable() {
        let secrets: BTreeMap<String, String> =
            [("DEPLOY_TOKEN".to_string(), "s3cret".to_string())]
                .into_iter()
                .collect();
        let with = |pairs: &[(&str, &str)]| SubmitRequest {
            repo: "/tmp/r".into(),
            commit: "a".repeat(40),
            params: pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        };
        let ok = validate_submit(with(&[("GREETING", "hi"), ("_X9", "")]), &secrets).unwrap();
        assert_eq!(ok.params.len(), 2);
        let long_name = "N".repeat(129);
        let long_value = "v".repeat(4097);
        let cases: Vec<(SubmitRequest, String)> = vec![
            (with(&[("9LIVES", "x")]), "\"9LIVES\"".into()),
            (with(&[("A-B", "x")]), "\"A-B\"".into()),
            (with(&[("", "x")]), "empty name".into()),
            (with(&[("KILN_BRANCH", "x")]), "\"KILN_BRANCH\"".into()),
            (with(&[("KILN", "x")]), "\"KILN\"".into()),
            (with(&[("NUL", "a\0b")]), "\"NUL\"".into()),
            (with(&[("BIG", &long_value)]), "\"BIG\"".into()),
            (with(&[(&long_name, "x")]), "128 bytes".into()),
            (with(&[("DEPLOY_TOKEN", "x")]), "\"DEPLOY_TOKEN\"".into()),
            (
                SubmitRequest {
                    params: (0..65).map(|i| (format!("V{i}"), String::new())).collect(),
                    ..with(&[])
                },
                "at most 64".into(),
            ),
        ];
        for (req, want) in cases {
            match validate_submit(req, &secrets) {
                Err(DispatchError::InvalidArgument { field, message }) => {
                    assert_eq!(field, "env");
                    assert!(message.contains(&want), "{message:?} lacks {want:?}");
                }
                other => panic!("{want}: {other:?}"),
            }
        }
    }

    #[test]
    fn parameters_are_part_of_a_builds_identity() {
        let none = BTreeMap::new();
        let a: BTreeMap<String, String> = [("A".to_string(), "1".to_string())].into();
        let b: BTreeMap<String, String> = [("A".to_string(), "2".to_string())].into();
        let h = |p: &BTreeMap<String, String>| pipeline_hash(&[], Some("e"), p);
        let same = a.clone();
        assert_eq!(h(&a), h(&same));
        assert_ne!(h(&a), h(&b));
        assert_ne!(h(&a), h(&none));
        // Unchanged for builds without parameters (stored before they existed).
        use sha2::{Digest, Sha256};
        let before = hex::encode(Sha256::digest(
            serde_json::to_string(&(Vec::<NewJob>::new(), Some("e")))
                .unwrap()
                .as_bytes(),
        ));
        assert_eq!(h(&none), before);
    }
}

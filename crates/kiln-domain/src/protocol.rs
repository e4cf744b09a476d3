//! The runner stream's messages (`RunnerService.Attach`) as the engine sees them.
//!
//! These mirror `RunnerMessage` and `DispatcherMessage` of `proto/kiln/v1/kiln.proto`, with
//! the wire's loose parts made types: a message is one enum variant (never "no kind"),
//! outcomes and states are enums (never an unknown number), a split step's units come from a
//! glob *or* a command. The root package's `convert` module is the one place wire messages
//! become these and back; a wire message that does not fit is refused there with
//! `INVALID_ARGUMENT`, so the dispatcher's sessions and the runner only ever see valid ones.

use std::collections::BTreeMap;

use bytes::Bytes;

use crate::split::{Interaction, TestCase, UnitReport, UnitSource, UnitsReply};
use crate::{AttemptId, BuildId, JobId, JobState, Millis, PostCondition, RunnerId, StepOutcome};

/// Largest message either side accepts on a runner stream, in bytes.
pub const MAX_MESSAGE_BYTES: usize = 4 << 20;
/// Most units one NextUnits may list as discovered.
pub const MAX_UNITS: usize = 100_000;
/// Longest unit id, in bytes.
pub const MAX_UNIT_LEN: usize = 4096;
/// Most test cases reported for one unit or one step.
pub const MAX_CASES: usize = 100_000;
/// Longest note a StepFinished may carry about reports it could not read, in bytes.
pub const MAX_REPORT_NOTE: usize = 4096;

/// Every message a runner sends on its stream.
#[derive(Debug, Clone, PartialEq)]
pub enum RunnerMessage {
    /// The handshake; first and only once.
    Hello(Hello),
    /// Liveness, at the interval the Welcome gave.
    Heartbeat(Heartbeat),
    /// The runner took an assignment.
    Accepted(Accepted),
    /// The runner cannot take an assignment.
    Rejected(Rejected),
    /// A piece of a step's live output.
    Output(OutputChunk),
    /// A step started.
    StepStarted(StepStarted),
    /// A step ended.
    StepFinished(StepFinished),
    /// The whole job ended.
    JobFinished(JobFinished),
    /// A split step's shard reports its last batch and asks for the next one.
    NextUnits(NextUnits),
}

impl RunnerMessage {
    /// The attempt the message is about, if any.
    pub fn attempt(&self) -> Option<AttemptId> {
        Some(match self {
            RunnerMessage::Hello(_) | RunnerMessage::Heartbeat(_) => return None,
            RunnerMessage::Accepted(a) => a.attempt_id,
            RunnerMessage::Rejected(r) => r.attempt_id,
            RunnerMessage::Output(o) => o.attempt_id,
            RunnerMessage::StepStarted(s) => s.attempt_id,
            RunnerMessage::StepFinished(f) => f.attempt_id,
            RunnerMessage::JobFinished(f) => f.attempt_id,
            RunnerMessage::NextUnits(n) => n.attempt_id,
        })
    }
}

/// Every message the dispatcher sends on a runner's stream.
#[derive(Debug, Clone, PartialEq)]
pub enum DispatcherMessage {
    /// The answer to Hello: the session is open.
    Welcome(Welcome),
    /// Liveness (answers the runner's).
    Heartbeat(Heartbeat),
    /// A job to run, as a new attempt.
    Assign(Assign),
    /// Output up to a sequence number is stored.
    OutputAck(OutputAck),
    /// The final result of an attempt was recorded.
    ResultAck(ResultAck),
    /// Something the runner sent about an attempt was refused.
    Refused(Refused),
    /// Stop an attempt.
    Cancel(Cancel),
    /// Take no new work; finish, then detach.
    Drain(Drain),
    /// The answer to a NextUnits.
    Units(Units),
}

/// The runner's handshake.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Hello {
    /// Unique name.
    pub name: String,
    /// Labels offered to jobs.
    pub labels: BTreeMap<String, String>,
    /// Jobs it runs at once.
    pub slots: u32,
    /// Its version.
    pub version: String,
    /// Attempts it still holds (running, or results not yet acknowledged).
    pub held_attempts: Vec<AttemptId>,
    /// Its token; empty for none.
    pub token: String,
    /// The secret of its last Welcome; empty for none.
    pub session_secret: String,
}

/// The dispatcher's answer to Hello.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Welcome {
    /// The runner's id.
    pub runner_id: RunnerId,
    /// How often to heartbeat, in milliseconds.
    pub heartbeat_interval_ms: u32,
    /// Heartbeats that may be missed before the runner is lost.
    pub missed_heartbeats_allowed: u32,
    /// Held attempts the runner must drop.
    pub stale_attempts: Vec<AttemptId>,
    /// Presented in the next Hello to prove who the runner is.
    pub session_secret: String,
}

/// Liveness, both ways.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Heartbeat {
    /// Attempts the runner holds (runner to dispatcher).
    pub running_attempts: Vec<AttemptId>,
    /// Wall clock of the sender.
    pub sent_at_ms: Millis,
    /// The runner drains.
    pub draining: bool,
    /// `running_attempts` lists every attempt the runner holds.
    pub lists_held: bool,
}

/// A job to run, as a new attempt.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Assign {
    /// The attempt's id.
    pub attempt_id: AttemptId,
    /// Its job.
    pub job_id: JobId,
    /// Its build.
    pub build_id: BuildId,
    /// Repository URL or path.
    pub repo_url: String,
    /// Full commit id.
    pub commit: String,
    /// Branch, may be empty.
    pub branch: String,
    /// The steps, in order (post steps last).
    pub steps: Vec<AssignedStep>,
    /// Environment for every step.
    pub env: BTreeMap<String, String>,
    /// W3C trace context.
    pub trace_context: BTreeMap<String, String>,
    /// Which attempt of the job this is (1 for the first).
    pub attempt_number: u32,
    /// Secrets given as environment variables and masked in the output.
    pub secrets: BTreeMap<String, String>,
}

/// One step of an assignment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AssignedStep {
    /// Position in the job (0-based).
    pub index: u32,
    /// Name.
    pub name: String,
    /// Shell command.
    pub run: String,
    /// Extra environment.
    pub env: BTreeMap<String, String>,
    /// Timeout in milliseconds, 0 for none.
    pub timeout_ms: u64,
    /// For a post step, when it runs.
    pub post: Option<PostCondition>,
    /// For a split step's shard, what it runs.
    pub split: Option<SplitStep>,
    /// Glob patterns of the JUnit files a plain step writes.
    pub junit: Vec<String>,
}

impl From<&crate::StepSpec> for AssignedStep {
    fn from(s: &crate::StepSpec) -> Self {
        AssignedStep {
            index: s.index,
            name: s.name.clone(),
            run: s.run.clone(),
            env: s.env.clone(),
            timeout_ms: s.timeout_ms,
            post: s.post,
            split: s.split.as_ref().map(|s| SplitStep {
                key: s.key.clone(),
                shards: s.shards,
                shard: s.shard,
                units: s.units.clone(),
            }),
            junit: s.junit.clone(),
        }
    }
}

/// What a shard needs of its split step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SplitStep {
    /// The split's key within its build.
    pub key: String,
    /// Number of shards.
    pub shards: u32,
    /// This shard, 0-based.
    pub shard: u32,
    /// Where the units come from.
    pub units: UnitSource,
}

/// The runner took an assignment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Accepted {
    /// The attempt.
    pub attempt_id: AttemptId,
}

/// The runner cannot take an assignment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rejected {
    /// The attempt.
    pub attempt_id: AttemptId,
    /// Why.
    pub reason: String,
}

/// Which stream a piece of output came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OutputStream {
    /// The step's stdout.
    Stdout,
    /// The step's stderr.
    Stderr,
    /// Kiln's own lines (checkout, notices).
    System,
}

impl OutputStream {
    /// The code stored in log frames and spool files (the wire's numbers).
    pub fn code(self) -> u8 {
        match self {
            OutputStream::Stdout => 1,
            OutputStream::Stderr => 2,
            OutputStream::System => 3,
        }
    }

    /// The stream of a code, `None` for an unknown one.
    pub fn from_code(code: u8) -> Option<Self> {
        match code {
            1 => Some(OutputStream::Stdout),
            2 => Some(OutputStream::Stderr),
            3 => Some(OutputStream::System),
            _ => None,
        }
    }
}

/// A piece of a step's live output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputChunk {
    /// The attempt.
    pub attempt_id: AttemptId,
    /// Its sequence number within the attempt, from 1.
    pub seq: u64,
    /// The step.
    pub step_index: u32,
    /// Which stream.
    pub stream: OutputStream,
    /// The bytes.
    pub data: Bytes,
}

/// A step started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StepStarted {
    /// The attempt.
    pub attempt_id: AttemptId,
    /// The step.
    pub step_index: u32,
}

/// A step ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepFinished {
    /// The attempt.
    pub attempt_id: AttemptId,
    /// The step.
    pub step_index: u32,
    /// How it ended.
    pub outcome: StepOutcome,
    /// Its exit code, if it exited.
    pub exit_code: Option<i32>,
    /// The signal that killed it, if one did.
    pub signal: Option<i32>,
    /// How long it ran.
    pub duration_ms: u64,
    /// The last output seq sent before this message.
    pub last_seq: u64,
    /// Test cases of its `junit` files.
    pub cases: Vec<TestCase>,
    /// What could not be read of those files.
    pub report_note: String,
}

/// The whole job ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobFinished {
    /// The attempt.
    pub attempt_id: AttemptId,
    /// Its final state.
    pub state: JobState,
    /// Why, for a job that did not pass.
    pub message: String,
    /// The last output seq of the attempt.
    pub last_seq: u64,
}

/// A split step's shard reports its last batch and asks for the next one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NextUnits {
    /// The shard's attempt.
    pub attempt_id: AttemptId,
    /// The split step.
    pub step_index: u32,
    /// The request's number (from 1; a re-sent request keeps it).
    pub request: u32,
    /// Units the shard discovered (first request only).
    pub discovered: Vec<String>,
    /// Results of the previous batch.
    pub results: Vec<UnitReport>,
    /// Most units wanted.
    pub max_units: u32,
    /// Units that failed together but passed alone.
    pub interactions: Vec<Interaction>,
    /// The previous batch's wall time.
    pub batch_ms: u64,
    /// Processes the previous batch started.
    pub batch_processes: u32,
}

/// The answer to a NextUnits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Units {
    /// The shard's attempt.
    pub attempt_id: AttemptId,
    /// The split step.
    pub step_index: u32,
    /// The request answered.
    pub request: u32,
    /// The answer.
    pub reply: UnitsReply,
}

/// Output up to a sequence number is stored.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OutputAck {
    /// The attempt.
    pub attempt_id: AttemptId,
    /// Every chunk up to this seq is stored.
    pub up_to_seq: u64,
}

/// The final result of an attempt was recorded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ResultAck {
    /// The attempt.
    pub attempt_id: AttemptId,
}

/// Something the runner sent about an attempt was refused.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Refused {
    /// The attempt.
    pub attempt_id: AttemptId,
    /// Why.
    pub reason: String,
}

/// Stop an attempt.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cancel {
    /// The attempt.
    pub attempt_id: AttemptId,
    /// Time between SIGTERM and SIGKILL.
    pub grace_ms: u64,
    /// Why.
    pub reason: String,
}

/// Take no new work; finish, then detach.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Drain {
    /// Why.
    pub reason: String,
}

/// Why a runner stream ended with an error (either side): what the wire calls a status,
/// reduced to what the engine acts on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StreamError {
    /// A message was not valid (INVALID_ARGUMENT); `message` says which field and why.
    #[error("{message}")]
    InvalidArgument {
        /// What is wrong.
        message: String,
    },
    /// The runner's token is missing or not valid (UNAUTHENTICATED).
    #[error("{message}")]
    Unauthenticated {
        /// What is wrong.
        message: String,
    },
    /// The runner may not do this (PERMISSION_DENIED), e.g. a name its certificate does not give.
    #[error("{message}")]
    PermissionDenied {
        /// Why.
        message: String,
    },
    /// Another live runner uses this name (ALREADY_EXISTS).
    #[error("{message}")]
    AlreadyExists {
        /// Which name.
        message: String,
    },
    /// The other side did not answer in time (DEADLINE_EXCEEDED).
    #[error("{message}")]
    DeadlineExceeded {
        /// What was late.
        message: String,
    },
    /// Messages went missing on the way (DATA_LOSS): reconnect and send again.
    #[error("{message}")]
    DataLoss {
        /// What is missing.
        message: String,
    },
    /// The dispatcher's disk is full (RESOURCE_EXHAUSTED).
    #[error("{message}")]
    ResourceExhausted {
        /// Why.
        message: String,
    },
    /// Try again later (UNAVAILABLE): the session ended, the connection broke.
    #[error("{message}")]
    Unavailable {
        /// Why.
        message: String,
    },
    /// The transport's TLS handshake failed over a certificate: retrying will not help.
    #[error("{message}")]
    Tls {
        /// What the TLS layer said.
        message: String,
    },
    /// Anything else (INTERNAL and the codes the engine does not act on).
    #[error("{message}")]
    Other {
        /// The error's text.
        message: String,
    },
}

impl StreamError {
    /// The error's text.
    pub fn message(&self) -> &str {
        match self {
            StreamError::InvalidArgument { message }
            | StreamError::Unauthenticated { message }
            | StreamError::PermissionDenied { message }
            | StreamError::AlreadyExists { message }
            | StreamError::DeadlineExceeded { message }
            | StreamError::DataLoss { message }
            | StreamError::ResourceExhausted { message }
            | StreamError::Unavailable { message }
            | StreamError::Tls { message }
            | StreamError::Other { message } => message,
        }
    }
}

/// Bytes a string field takes at most on the wire (tag, length, bytes).
fn text_size(s: &str) -> usize {
    s.len() + 6
}

/// Bytes a number field takes at most on the wire.
const NUMBER_SIZE: usize = 11;

/// An upper bound of the bytes a test case takes on the wire.
pub fn case_size(c: &TestCase) -> usize {
    [
        &c.name,
        &c.classname,
        &c.message,
        &c.body,
        &c.system_out,
        &c.system_err,
    ]
    .iter()
    .map(|t| text_size(t))
    .sum::<usize>()
        + 3 * NUMBER_SIZE
}

fn unit_report_size(r: &UnitReport) -> usize {
    text_size(&r.unit) + 3 * NUMBER_SIZE + r.cases.iter().map(|c| case_size(c) + 6).sum::<usize>()
}

fn interaction_size(i: &Interaction) -> usize {
    i.units.iter().map(|u| text_size(u)).sum::<usize>()
        + NUMBER_SIZE
        + text_size(&i.detail)
        + i.runner.as_deref().map_or(0, text_size)
}

/// Checks a unit id: 1 to [`MAX_UNIT_LEN`] bytes without a newline.
pub fn check_unit(unit: &str) -> Result<(), String> {
    if unit.is_empty() || unit.len() > MAX_UNIT_LEN || unit.contains('\n') {
        return Err(format!(
            "unit id {:?} must be 1 to {MAX_UNIT_LEN} bytes without a newline",
            unit.chars().take(80).collect::<String>()
        ));
    }
    Ok(())
}

impl NextUnits {
    /// Checks every field: a request number from 1, unit ids (see [`check_unit`]), at most
    /// [`MAX_UNITS`] units and [`MAX_CASES`] cases per unit, tries from 1, interactions of
    /// 1 to [`MAX_UNITS`] units. The message names what is wrong.
    pub fn check(&self) -> Result<(), String> {
        if self.request == 0 {
            return Err("next_units.request must start at 1".into());
        }
        if self.discovered.len() > MAX_UNITS {
            return Err(format!(
                "next_units.discovered lists {} units, more than {MAX_UNITS}",
                self.discovered.len()
            ));
        }
        for u in &self.discovered {
            check_unit(u)?;
        }
        for r in &self.results {
            check_unit(&r.unit)?;
            if r.try_number == 0 {
                return Err(format!("result of unit {:?} has try_number 0", r.unit));
            }
            if r.cases.len() > MAX_CASES {
                return Err(format!(
                    "result of unit {:?} has too many test cases",
                    r.unit
                ));
            }
        }
        if self.interactions.len() > MAX_UNITS {
            return Err("next_units.interactions has too many entries".into());
        }
        for i in &self.interactions {
            if i.units.is_empty() || i.units.len() > MAX_UNITS {
                return Err(format!(
                    "an interaction must list 1 to {MAX_UNITS} units, not {}",
                    i.units.len()
                ));
            }
            for u in &i.units {
                check_unit(u)?;
            }
            if i.try_number == 0 {
                return Err("an interaction has try_number 0".into());
            }
        }
        Ok(())
    }

    /// An upper bound of the bytes the request takes on the wire (what must stay under
    /// [`MAX_MESSAGE_BYTES`]).
    pub fn size(&self) -> usize {
        6 * NUMBER_SIZE
            + self.discovered.iter().map(|u| text_size(u)).sum::<usize>()
            + self
                .results
                .iter()
                .map(|r| unit_report_size(r) + 6)
                .sum::<usize>()
            + self
                .interactions
                .iter()
                .map(|i| interaction_size(i) + 6)
                .sum::<usize>()
    }
}

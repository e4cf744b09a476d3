//! Runs one step of a CI job as a child process and streams its output live.
//!
//! A step is a shell script executed as `sh -c <script>` in its own process
//! group, with stdin connected to `/dev/null`. Its stdout and stderr are read
//! in the same loop that waits for the process to exit, for the timeout and for
//! cancellation, and every successful `read()` is forwarded immediately as a
//! [`Chunk`] of raw bytes (no line buffering, no UTF-8 decoding) on a bounded
//! channel. On timeout or cancellation the whole process group receives
//! `SIGTERM`, then `SIGKILL` after a grace period. When the main process exits
//! on its own, anything still left in its process group (for example
//! `sleep 100 &`) is killed so that nothing leaks and the pipes reach EOF.
//!
//! The step does not inherit this process's environment: it gets only the
//! variables named by [`is_inherited`] (an allow-list: `PATH`, `HOME`, the
//! locale, ...), then [`StepCommand::env`]. So a runner's own settings and
//! secrets (`KILN_TOKEN`, cloud credentials in its environment) never reach a
//! build step unless the caller passes them on purpose.
//!
//! [`mask::Masker`] replaces the job's secrets by `***` in a stream of output
//! chunks, holding back only a tail that could begin a secret.

pub mod mask;

use std::fmt;
use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use bytes::Bytes;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::AsyncReadExt;
use tokio::process::Command;
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;
use tokio::time::{Instant, Sleep, sleep_until};
use tokio_util::sync::CancellationToken;

/// Largest number of bytes carried by a single [`Chunk`]; also the size of the
/// read buffer used for each output pipe.
pub const MAX_CHUNK: usize = 64 * 1024;

/// How long [`run`] keeps waiting for the output pipes to reach EOF after the
/// main process has exited and its process group has been killed.
///
/// Only a process that escaped the step's process group (for example via
/// `setsid`) can keep the pipes open that long; once this much time has been
/// spent waiting on the pipes, the remaining output is abandoned. Time spent
/// waiting for a slow consumer of the output channel does not count, except
/// after a timeout or cancellation, where the deadline bounds everything.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(1);

/// Environment variable set to `1` in the step's environment (unless the
/// caller sets it) so that Python output is not block-buffered.
const PYTHON_UNBUFFERED: &str = "PYTHONUNBUFFERED";

/// Variables a step inherits from the process that runs it, when set there:
/// what a shell and common tools need to work as on the machine (search path,
/// home, user, shell, terminal, time zone, temp dir, proxies). Plus every
/// `LC_*` locale variable. Nothing else is inherited.
pub const INHERITED_ENV: &[&str] = &[
    "PATH",
    "HOME",
    "USER",
    "LOGNAME",
    "SHELL",
    "LANG",
    "LANGUAGE",
    "TERM",
    "TZ",
    "TMPDIR",
    "HOSTNAME",
    "http_proxy",
    "https_proxy",
    "no_proxy",
    "all_proxy",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
    "ALL_PROXY",
];

/// Whether a step inherits the variable `name` from the process that runs it.
pub fn is_inherited(name: &str) -> bool {
    INHERITED_ENV.contains(&name) || name.starts_with("LC_")
}

/// Description of one step to execute.
#[derive(Debug, Clone)]
pub struct StepCommand {
    /// Shell script, run as `sh -c <script>`.
    pub script: String,
    /// Working directory of the process; must exist.
    pub cwd: PathBuf,
    /// The step's own variables, added to (or overriding) the allow-listed
    /// variables inherited from this process (see [`is_inherited`]).
    pub env: Vec<(String, String)>,
    /// Wall-clock limit for the step; `None` means no limit.
    pub timeout: Option<Duration>,
    /// Time between `SIGTERM` and `SIGKILL` on timeout or cancellation.
    pub grace: Duration,
}

/// Which output pipe a [`Chunk`] was read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// The process's standard output.
    Stdout,
    /// The process's standard error.
    Stderr,
}

/// A piece of output, exactly as returned by one `read()` on a pipe.
#[derive(Debug, Clone)]
pub struct Chunk {
    /// The pipe the bytes came from.
    pub stream: Stream,
    /// The raw bytes; never empty and at most [`MAX_CHUNK`] long.
    pub data: Bytes,
}

/// How a step ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Termination {
    /// The main process exited with this status code.
    Exited(i32),
    /// The main process was killed by this signal number (not by us).
    Signaled(i32),
    /// The step exceeded [`StepCommand::timeout`] and was killed.
    TimedOut,
    /// The cancellation token fired and the step was killed.
    Cancelled,
}

impl fmt::Display for Termination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Termination::Exited(code) => write!(f, "exited with code {code}"),
            Termination::Signaled(signal) => match Signal::try_from(*signal) {
                Ok(sig) => write!(f, "killed by signal {signal} ({sig})"),
                Err(_) => write!(f, "killed by signal {signal}"),
            },
            Termination::TimedOut => f.write_str("timed out"),
            Termination::Cancelled => f.write_str("cancelled"),
        }
    }
}

/// Outcome of a finished step.
#[derive(Debug, Clone)]
pub struct StepExit {
    /// How the step ended.
    pub termination: Termination,
    /// Time from spawning the process until the main process was reaped.
    pub duration: Duration,
}

impl StepExit {
    /// True when the step exited with status code 0.
    pub fn success(&self) -> bool {
        self.termination == Termination::Exited(0)
    }
}

/// Errors that prevent a step from being run or observed.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// The process could not be started (for example the working directory
    /// does not exist, or `sh` is missing).
    #[error("failed to start `sh -c` in working directory {}", cwd.display())]
    Spawn {
        /// The working directory the step was to run in.
        cwd: PathBuf,
        /// The underlying OS error.
        #[source]
        source: io::Error,
    },
    /// Waiting for the process to exit failed; the process group was killed.
    #[error("failed to wait for the step process")]
    Wait(#[source] io::Error),
}

/// Runs the step; sends output chunks as they are produced; returns when the
/// process (group) is gone and all output was sent.
///
/// The channel is bounded and sends are awaited, which applies backpressure to
/// the child (it blocks on a full pipe), but the timeout and `cancel` are
/// honoured even while a send is blocked. If the receiver is dropped, the
/// process still runs to completion and its output is discarded. If the
/// returned future is dropped before completion, the process group is killed.
pub async fn run(
    cmd: &StepCommand,
    output: mpsc::Sender<Chunk>,
    cancel: CancellationToken,
) -> Result<StepExit, ExecError> {
    let mut command = Command::new("sh");
    command
        .arg("-c")
        .arg(&cmd.script)
        .current_dir(&cmd.cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true)
        .env_clear();
    for (key, value) in std::env::vars_os() {
        if key.to_str().is_some_and(is_inherited) {
            command.env(key, value);
        }
    }
    if !cmd.env.iter().any(|(key, _)| key == PYTHON_UNBUFFERED) {
        command.env(PYTHON_UNBUFFERED, "1");
    }
    command.envs(cmd.env.iter().map(|(k, v)| (k, v)));

    let start = Instant::now();
    let spawn_error = |source| ExecError::Spawn {
        cwd: cmd.cwd.clone(),
        source,
    };
    let mut child = command.spawn().map_err(spawn_error)?;
    let pid = child
        .id()
        .and_then(|id| i32::try_from(id).ok())
        .ok_or_else(|| spawn_error(io::Error::other("spawned process has no valid pid")))?;
    let mut group = ProcessGroup {
        pgid: Pid::from_raw(pid),
        armed: true,
    };
    tracing::debug!(pid, cwd = %cmd.cwd.display(), "step process started");

    let mut stdout = Pipe::new(child.stdout.take());
    let mut stderr = Pipe::new(child.stderr.take());
    let mut sink = Sink {
        output: Some(output),
        pending: None,
        pending_since: start,
    };

    // Deadlines: the step timeout; SIGKILL after SIGTERM + grace; and the
    // bound on waiting for EOF after the main process is gone.
    let far_future = start + Duration::from_secs(30 * 365 * 24 * 3600);
    let timeout_at = cmd.timeout.and_then(|t| start.checked_add(t));
    let mut timeout_sleep: Pin<Box<Sleep>> =
        Box::pin(sleep_until(timeout_at.unwrap_or(far_future)));
    let mut kill_sleep: Pin<Box<Sleep>> = Box::pin(sleep_until(far_future));
    let mut drain_sleep: Pin<Box<Sleep>> = Box::pin(sleep_until(far_future));

    let mut reason: Option<Termination> = None;
    let mut kill_pending = false;
    let mut status: Option<(ExitStatus, Instant)> = None;

    loop {
        if status.is_some() && stdout.is_done() && stderr.is_done() && sink.pending.is_none() {
            break;
        }
        let exited = status.is_some();
        let killed = reason.is_some();
        tokio::select! {
            () = cancel.cancelled(), if !exited && !killed => {
                tracing::debug!(pid, "step cancelled, sending SIGTERM to process group");
                reason = Some(Termination::Cancelled);
                group.signal(Signal::SIGTERM);
                kill_sleep.as_mut().reset(Instant::now() + cmd.grace);
                kill_pending = true;
            }
            () = &mut timeout_sleep, if !exited && !killed && timeout_at.is_some() => {
                tracing::debug!(pid, "step timed out, sending SIGTERM to process group");
                reason = Some(Termination::TimedOut);
                group.signal(Signal::SIGTERM);
                kill_sleep.as_mut().reset(Instant::now() + cmd.grace);
                kill_pending = true;
            }
            () = &mut kill_sleep, if !exited && kill_pending => {
                tracing::debug!(pid, "grace period over, sending SIGKILL to process group");
                group.signal(Signal::SIGKILL);
                kill_pending = false;
            }
            result = child.wait(), if !exited => {
                let exit_status = match result {
                    Ok(exit_status) => exit_status,
                    Err(error) => return Err(ExecError::Wait(error)),
                };
                let now = Instant::now();
                tracing::debug!(pid, %exit_status, "step process exited");
                // Kill anything left behind in the group so the pipes close.
                group.signal(Signal::SIGKILL);
                group.armed = false;
                status = Some((exit_status, now));
                drain_sleep.as_mut().reset(now + DRAIN_TIMEOUT);
            }
            () = &mut drain_sleep, if exited && (sink.pending.is_none() || killed) => {
                tracing::warn!(pid, "step output still open after the process group was killed; abandoning it");
                break;
            }
            sent = sink.flush(), if sink.pending.is_some() => {
                // Time spent blocked on the consumer does not eat into the
                // drain budget after a normal exit.
                if let Some((_, exited_at)) = status.filter(|_| sent && !killed) {
                    let blocked = Instant::now().saturating_duration_since(sink.pending_since.max(exited_at));
                    let deadline = drain_sleep.deadline() + blocked;
                    drain_sleep.as_mut().reset(deadline);
                }
            }
            read = stdout.read(), if sink.pending.is_none() && !stdout.is_done() => {
                if let Some(data) = read {
                    sink.offer(Chunk { stream: Stream::Stdout, data });
                }
            }
            read = stderr.read(), if sink.pending.is_none() && !stderr.is_done() => {
                if let Some(data) = read {
                    sink.offer(Chunk { stream: Stream::Stderr, data });
                }
            }
        }
    }

    // The loop only ends after the main process was reaped.
    let Some((exit_status, exited_at)) = status else {
        return Err(ExecError::Wait(io::Error::other(
            "step loop ended before the process exited",
        )));
    };
    let termination = reason.unwrap_or_else(|| termination_of(exit_status));
    Ok(StepExit {
        termination,
        duration: exited_at.saturating_duration_since(start),
    })
}

/// Maps a raw exit status to a [`Termination`].
fn termination_of(status: ExitStatus) -> Termination {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => Termination::Exited(code),
        (None, Some(signal)) => Termination::Signaled(signal),
        // Neither a code nor a signal is impossible for a reaped process.
        (None, None) => Termination::Exited(-1),
    }
}

/// The step's process group; killed on drop unless disarmed.
struct ProcessGroup {
    /// Process group id (equal to the main process's pid).
    pgid: Pid,
    /// Whether dropping this value should SIGKILL the group.
    armed: bool,
}

impl ProcessGroup {
    /// Sends `signal` to every process in the group; a vanished group is fine.
    fn signal(&self, signal: Signal) {
        match killpg(self.pgid, signal) {
            Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
            Err(error) => {
                tracing::warn!(pgid = self.pgid.as_raw(), %signal, %error, "failed to signal step process group");
            }
        }
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        if self.armed {
            self.signal(Signal::SIGKILL);
        }
    }
}

/// One output pipe together with its read buffer.
struct Pipe<R> {
    /// The pipe; `None` once EOF or a read error was seen.
    reader: Option<R>,
    /// Read buffer of [`MAX_CHUNK`] bytes.
    buf: Box<[u8]>,
}

impl<R: tokio::io::AsyncRead + Unpin> Pipe<R> {
    /// Wraps a (possibly absent) pipe.
    fn new(reader: Option<R>) -> Self {
        Pipe {
            reader,
            buf: vec![0; MAX_CHUNK].into_boxed_slice(),
        }
    }

    /// True once the pipe reached EOF (or failed).
    fn is_done(&self) -> bool {
        self.reader.is_none()
    }

    /// Performs one read; `None` means nothing to forward (EOF or error, after
    /// which the pipe is closed). Cancel safe.
    async fn read(&mut self) -> Option<Bytes> {
        let reader = self.reader.as_mut()?;
        match reader.read(&mut self.buf).await {
            Ok(0) => {
                self.reader = None;
                None
            }
            Ok(n) => Some(Bytes::copy_from_slice(&self.buf[..n])),
            Err(error) => {
                // Closing our end makes further writes fail instead of block.
                tracing::warn!(%error, "failed to read step output; closing the pipe");
                self.reader = None;
                None
            }
        }
    }
}

/// The output channel plus at most one chunk waiting for channel capacity.
struct Sink {
    /// The channel; `None` once the receiver was dropped.
    output: Option<mpsc::Sender<Chunk>>,
    /// A chunk that did not fit in the channel yet.
    pending: Option<Chunk>,
    /// When `pending` was set.
    pending_since: Instant,
}

impl Sink {
    /// Sends `chunk` right away if there is room, otherwise keeps it pending.
    fn offer(&mut self, chunk: Chunk) {
        let Some(output) = &self.output else {
            return;
        };
        match output.try_send(chunk) {
            Ok(()) => {}
            Err(TrySendError::Full(chunk)) => {
                self.pending = Some(chunk);
                self.pending_since = Instant::now();
            }
            Err(TrySendError::Closed(_)) => self.output = None,
        }
    }

    /// Waits for capacity and sends the pending chunk. Returns whether it was
    /// delivered (false if the receiver is gone). Cancel safe: the chunk stays
    /// pending if the future is dropped.
    async fn flush(&mut self) -> bool {
        let Some(output) = &self.output else {
            self.pending = None;
            return false;
        };
        let delivered = match output.reserve().await {
            Ok(permit) => {
                if let Some(chunk) = self.pending.take() {
                    permit.send(chunk);
                }
                true
            }
            Err(_) => false,
        };
        if !delivered {
            self.pending = None;
            self.output = None;
        }
        delivered
    }
}

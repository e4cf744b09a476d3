//! The runner engine: one long-lived stream to the dispatcher, reconnecting with backoff and
//! jitter when it breaks, and the jobs it runs. It speaks the domain messages of
//! `kiln_domain::protocol` over a [`Transport`] (gRPC in the `kiln` program, in-memory channels
//! in tests), so nothing here knows the wire.
//!
//! Everything the runner says about an attempt (accepted, output, step and job results) goes
//! through the [`outbox::Outbox`] in order and stays there until the dispatcher acknowledges
//! it, so after a reconnect it is sent again and the dispatcher stores each piece once. Jobs
//! keep running while the stream is down; their output waits in the outbox (bounded: a full
//! outbox pauses the step's output pipe, and so the step).

mod job;
mod outbox;
pub mod split;
pub mod token;
pub mod transport;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use kiln_domain::AttemptId;
use kiln_domain::protocol::{self, DispatcherMessage as In, RunnerMessage as Out, StreamError};
use kiln_git::Mirrors;
use rand::Rng;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use outbox::Outbox;
pub use transport::{ConnectError, Inbound, Transport};

/// Longest wait between two connection attempts (jitter picks a wait up to it), so runners are
/// back within about this long after a dispatcher restart.
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// How a runner behaves.
#[derive(Debug, Clone)]
pub struct RunnerConfig {
    /// Unique name (the dispatcher knows the runner by it across restarts).
    pub name: String,
    /// Jobs run at once.
    pub slots: u32,
    /// Labels offered to jobs.
    pub labels: BTreeMap<String, String>,
    /// Where checkouts and the outbox live (and the mirrors, without `cache_dir`).
    pub work_dir: PathBuf,
    /// Where the repository mirrors live, shared by every runner given the same directory (the
    /// runners of one machine fetch each new commit once); `None`: `mirrors` in `work_dir`.
    pub cache_dir: Option<PathBuf>,
    /// Unacknowledged output kept in memory when the spool disk fails, in bytes.
    pub max_buffered_output: usize,
    /// Unacknowledged output spooled to local disk (while the dispatcher is away), in bytes;
    /// when full, steps wait.
    pub max_spool_bytes: u64,
    /// Time between SIGTERM and SIGKILL when a step times out.
    pub kill_grace: Duration,
    /// The runner's token (its own, or the farm's shared one); empty for none.
    pub token: String,
    /// Variables of the runner's environment given to steps besides the allow-listed ones
    /// (`--pass-env`).
    pub pass_env: Vec<(String, String)>,
}

impl RunnerConfig {
    /// Defaults for a runner name.
    pub fn new(name: impl Into<String>) -> Self {
        let name = name.into();
        Self {
            work_dir: std::env::temp_dir().join(format!("kiln-runner-{name}")),
            cache_dir: None,
            name,
            slots: 1,
            labels: BTreeMap::new(),
            max_buffered_output: 64 << 20,
            max_spool_bytes: 1 << 30,
            kill_grace: Duration::from_secs(5),
            token: String::new(),
            pass_env: Vec::new(),
        }
    }
}

/// The default mirror cache of `kiln runner`, shared by the runners of one user on a machine:
/// `kiln/mirrors` under the user's cache directory (`$XDG_CACHE_HOME`, else `~/.cache`, on
/// Linux). The directories it creates are the user's alone (mode 0700): mirrors hold the
/// repositories' code. `None` when there is no home directory.
pub fn default_cache_dir() -> Option<PathBuf> {
    let kiln = dirs::cache_dir()?.join("kiln");
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    // A failure shows when the cache is opened, with the path.
    let _ = builder.create(&kiln);
    Some(kiln.join("mirrors"))
}

/// Errors that stop a runner.
#[derive(Debug, thiserror::Error)]
pub enum RunnerError {
    /// The configuration cannot work (bad URL, unusable work directory).
    #[error("{0}")]
    Config(String),
    /// The dispatcher refused the runner for good (bad name or labels, token not valid).
    #[error("the dispatcher refused this runner: {0}")]
    Refused(String),
    /// The TLS handshake fails over a certificate (ours refused, or the dispatcher's not
    /// trusted): trying again will not help.
    #[error("cannot connect to the dispatcher over TLS, and retrying will not help: {0}")]
    Tls(String),
}

/// What the session loop and the job tasks share.
pub(crate) struct Shared {
    /// Settings.
    config: RunnerConfig,
    /// Messages about attempts, until acknowledged.
    outbox: Outbox,
    /// Running jobs and how to cancel them.
    jobs: Mutex<HashMap<AttemptId, CancellationToken>>,
    /// Slots not running a job (each slot has its own reusable work tree).
    free_slots: Mutex<Vec<u32>>,
    /// Mirrors and checkouts.
    mirrors: Mirrors,
    /// Take no new work.
    draining: AtomicBool,
    /// Shutting down now: running jobs are killed and handed back to the dispatcher.
    stopping: AtomicBool,
    /// Cancelled on a hard stop; post steps run under it (a user's cancel does not stop them).
    hard_stop: CancellationToken,
    /// The current session's sender, for requests that need a live answer (split steps' units).
    session_tx: Mutex<Option<mpsc::Sender<Out>>>,
    /// Split steps waiting for the answer to a NextUnits, by (attempt, request number).
    unit_waiters: Mutex<HashMap<(AttemptId, u32), oneshot::Sender<protocol::Units>>>,
    /// The secret of the last Welcome, presented in the next Hello to prove who we are.
    session_secret: Mutex<String>,
}

impl Shared {
    fn jobs(&self) -> MutexGuard<'_, HashMap<AttemptId, CancellationToken>> {
        self.jobs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes a free slot for `attempt`, or `None` when all are busy.
    fn claim(&self, attempt: AttemptId, token: CancellationToken) -> Option<u32> {
        let slot = self
            .free_slots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop()?;
        self.jobs().insert(attempt, token);
        Some(slot)
    }

    /// The job of `attempt` is over: its slot is free again (also when the attempt was
    /// dropped as superseded and so is no longer in `jobs`: the job task owns the slot and
    /// releases it exactly once, when it ends).
    fn release(&self, attempt: AttemptId, slot: u32) {
        self.jobs().remove(&attempt);
        let mut free = self.free_slots.lock().unwrap_or_else(|p| p.into_inner());
        if !free.contains(&slot) {
            free.push(slot);
        }
    }

    /// Hands the dispatcher's answer to the split step that asked.
    fn units_answer(&self, u: protocol::Units) {
        let waiter = self
            .unit_waiters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&(u.attempt_id, u.request));
        if let Some(w) = waiter {
            let _ = w.send(u);
        }
    }

    /// Sends a NextUnits and waits for its answer, sending it again (same request number, so
    /// the dispatcher records nothing twice) on every new session until one comes. `None` when
    /// `cancel` fires first.
    async fn ask_units(
        &self,
        req: protocol::NextUnits,
        cancel: &CancellationToken,
    ) -> Option<protocol::Units> {
        let key = (req.attempt_id, req.request);
        loop {
            let (w, answer) = oneshot::channel();
            self.unit_waiters
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(key, w);
            let tx = self
                .session_tx
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            let sent = match tx {
                Some(tx) => tx.send(Out::NextUnits(req.clone())).await.is_ok(),
                None => false,
            };
            let patience = if sent {
                UNITS_ANSWER_TIMEOUT
            } else {
                Duration::from_millis(100)
            };
            tokio::select! {
                a = answer => if let Ok(a) = a { return Some(a) },
                _ = tokio::time::sleep(patience) => {}
                _ = cancel.cancelled() => {
                    self.unit_waiters.lock().unwrap_or_else(|p| p.into_inner()).remove(&key);
                    return None;
                }
            }
        }
    }

    /// Attempts this runner still holds: running, or with results not yet acknowledged.
    fn held(&self) -> Vec<AttemptId> {
        let mut held: Vec<AttemptId> = self.jobs().keys().copied().collect();
        held.extend(self.outbox.attempts());
        held.sort_unstable();
        held.dedup();
        held
    }
}

/// Runs a runner over `transport` until `drain` is cancelled and its jobs are done (or `stop`
/// is cancelled, which cancels the jobs). Opens a new stream whenever one breaks.
pub async fn run<T: Transport>(
    config: RunnerConfig,
    transport: T,
    drain: CancellationToken,
    stop: CancellationToken,
) -> Result<(), RunnerError> {
    std::fs::create_dir_all(&config.work_dir).map_err(|e| {
        RunnerError::Config(format!(
            "cannot create work dir {}: {e}",
            config.work_dir.display()
        ))
    })?;
    let mirror_dir = config
        .cache_dir
        .clone()
        .unwrap_or_else(|| config.work_dir.join("mirrors"));
    let mirrors =
        Mirrors::new(&mirror_dir).map_err(|e| RunnerError::Config(format!("mirror cache: {e}")))?;
    tracing::info!(cache_dir = %mirrors.root().display(), "repository mirrors");
    let shared = Arc::new(Shared {
        free_slots: Mutex::new((0..config.slots).rev().collect()),
        outbox: Outbox::new(
            config.work_dir.join("outbox"),
            config.max_spool_bytes,
            config.max_buffered_output,
        ),
        config,
        jobs: Mutex::new(HashMap::new()),
        mirrors,
        draining: AtomicBool::new(false),
        stopping: AtomicBool::new(false),
        hard_stop: CancellationToken::new(),
        session_tx: Mutex::new(None),
        unit_waiters: Mutex::new(HashMap::new()),
        session_secret: Mutex::new(String::new()),
    });
    {
        let shared = shared.clone();
        let drain = drain.clone();
        tokio::spawn(async move {
            drain.cancelled().await;
            tracing::info!("draining: no new work; finishing running jobs");
            shared.draining.store(true, Ordering::SeqCst);
            shared.outbox.wake();
        });
    }
    {
        let shared = shared.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            stop.cancelled().await;
            shared.stopping.store(true, Ordering::SeqCst);
            shared.hard_stop.cancel();
            shared.draining.store(true, Ordering::SeqCst);
            shared.outbox.wake();
            for token in shared.jobs().values() {
                token.cancel();
            }
        });
    }
    // Cancelled when a draining or stopping runner must go although the dispatcher has not
    // taken everything (it is unreachable): see `leave_when_done`.
    let leave = CancellationToken::new();
    tokio::spawn(leave_when_done(
        shared.clone(),
        drain.clone(),
        stop.clone(),
        leave.clone(),
    ));
    let mut backoff = Duration::from_millis(100);
    let mut name_taken_since: Option<tokio::time::Instant> = None;
    loop {
        if shared.draining.load(Ordering::SeqCst) && shared.held().is_empty() {
            tracing::info!("drained; detaching");
            return Ok(());
        }
        let ended = tokio::select! {
            ended = session(&transport, &shared, &drain) => ended,
            _ = leave.cancelled() => return Ok(()),
        };
        match ended {
            Ok(SessionEnd::Drained) => {
                tracing::info!("drained; detaching");
                return Ok(());
            }
            Ok(SessionEnd::Welcomed) => {
                backoff = Duration::from_millis(100);
                name_taken_since = None;
            }
            Ok(SessionEnd::NotWelcomed) => {}
            Err(SessionError::Fatal(m)) => return Err(RunnerError::Refused(m)),
            Err(SessionError::Tls(m)) => return Err(RunnerError::Tls(m)),
            Err(SessionError::NameTaken(m)) => {
                // Maybe our own previous session, not yet seen gone: retry for a while, then
                // give up (another live runner has this name).
                let since = *name_taken_since.get_or_insert_with(tokio::time::Instant::now);
                if since.elapsed() > NAME_TAKEN_PATIENCE {
                    return Err(RunnerError::Refused(m));
                }
                tracing::warn!(cause = %m, "name taken; retrying");
            }
            Err(SessionError::Retry(m)) => {
                tracing::warn!(cause = %m, "cannot reach the dispatcher");
            }
        }
        // Full jitter: a farm of runners does not reconnect in lockstep.
        let wait = rand::rng().random_range(Duration::ZERO..=backoff);
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.cancelled() => {
                if shared.held().is_empty() { return Ok(()); }
            }
            _ = leave.cancelled() => return Ok(()),
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// How long a draining runner whose jobs are done waits, while the dispatcher is unreachable,
/// for it to come back and take their results, before it leaves without (the dispatcher then
/// runs those jobs again once their lease runs out).
const UNREACHABLE_PATIENCE: Duration = Duration::from_secs(5);
/// How long a stopping runner (second signal) waits for the dispatcher to take what it holds
/// (the jobs it hands back) while connected. Disconnected, it leaves at once.
const STOP_PATIENCE: Duration = Duration::from_secs(5);

/// Once draining or stopping: waits for the running jobs to end (a stop cancels them), then for
/// the dispatcher to take their results; cancels `leave` when there is nothing left to wait
/// for, or when waiting is pointless (the dispatcher unreachable for [`UNREACHABLE_PATIENCE`],
/// or at once when stopping), so a signal is never ignored while the dispatcher is away.
async fn leave_when_done(
    shared: Arc<Shared>,
    drain: CancellationToken,
    stop: CancellationToken,
    leave: CancellationToken,
) {
    /// Wakes the loops below when nothing else does (the outbox wakes them on every change).
    const RECHECK: Duration = Duration::from_millis(200);
    tokio::select! {
        _ = drain.cancelled() => {}
        _ = stop.cancelled() => {}
    }
    while !shared.jobs().is_empty() {
        tokio::select! {
            _ = shared.outbox.changed() => {}
            _ = tokio::time::sleep(RECHECK) => {}
        }
    }
    let mut unreachable_since: Option<tokio::time::Instant> = None;
    let mut stop_since: Option<tokio::time::Instant> = None;
    loop {
        let held = shared.held();
        if held.is_empty() {
            tracing::info!("drained; detaching");
            leave.cancel();
            return;
        }
        let connected = shared
            .session_tx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some();
        let now = tokio::time::Instant::now();
        let unreachable_for = match connected {
            true => {
                unreachable_since = None;
                Duration::ZERO
            }
            false => now - *unreachable_since.get_or_insert(now),
        };
        let give_up = if stop.is_cancelled() {
            let since = *stop_since.get_or_insert(now);
            !connected || now - since >= STOP_PATIENCE
        } else {
            unreachable_for >= UNREACHABLE_PATIENCE
        };
        if give_up {
            tracing::warn!(
                attempts = ?held,
                "leaving without the dispatcher's acknowledgement of these attempts \
                 (unreachable); it runs them again once their lease runs out"
            );
            leave.cancel();
            return;
        }
        tokio::select! {
            _ = shared.outbox.changed() => {}
            _ = tokio::time::sleep(RECHECK) => {}
            _ = stop.cancelled(), if stop_since.is_none() => {}
        }
    }
}

enum SessionEnd {
    /// The session ran (the backoff starts over).
    Welcomed,
    /// The stream ended before the Welcome.
    NotWelcomed,
    /// Draining is complete.
    Drained,
}

enum SessionError {
    Retry(String),
    Fatal(String),
    NameTaken(String),
    /// A TLS failure no retry will mend.
    Tls(String),
}

impl From<ConnectError> for SessionError {
    fn from(e: ConnectError) -> Self {
        match e {
            ConnectError::Unreachable(m) => SessionError::Retry(m),
            ConnectError::Tls(m) => SessionError::Tls(m),
            ConnectError::Refused(
                StreamError::Unauthenticated { message }
                | StreamError::PermissionDenied { message },
            ) => SessionError::Fatal(message),
            ConnectError::Refused(StreamError::Tls { message }) => SessionError::Tls(message),
            ConnectError::Refused(other) => SessionError::Retry(other.message().to_string()),
        }
    }
}

/// How long a split step waits for the answer to a NextUnits before sending it again.
const UNITS_ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a runner keeps trying when the dispatcher says its name is taken.
const NAME_TAKEN_PATIENCE: Duration = Duration::from_secs(15);

/// How long a new stream may take to open and bring its Welcome.
const WELCOME_WITHIN: Duration = Duration::from_secs(10);

async fn session<T: Transport>(
    transport: &T,
    shared: &Arc<Shared>,
    drain: &CancellationToken,
) -> Result<SessionEnd, SessionError> {
    let (tx, rx) = mpsc::channel(128);
    let config = &shared.config;
    let hello = Out::Hello(protocol::Hello {
        name: config.name.clone(),
        labels: config.labels.clone(),
        slots: config.slots,
        version: env!("CARGO_PKG_VERSION").to_string(),
        held_attempts: shared.held(),
        token: config.token.clone(),
        session_secret: shared
            .session_secret
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone(),
    });
    let _ = tx.send(hello).await;
    // A frozen dispatcher host still accepts connections (its kernel does): the stream and
    // its Welcome get the same 10 s, after which the next try goes elsewhere first.
    let welcomed = tokio::time::timeout(WELCOME_WITHIN, async {
        let mut inbound = transport.attach(rx).await?;
        let first = inbound.next().await;
        Ok::<_, ConnectError>((inbound, first))
    });
    let (mut inbound, first) = match welcomed.await {
        Ok(attached) => attached?,
        Err(_) => {
            transport.move_on();
            return Err(SessionError::Retry(format!(
                "no welcome within {} s",
                WELCOME_WITHIN.as_secs()
            )));
        }
    };
    let welcome = match first {
        Some(Ok(In::Welcome(w))) => w,
        Some(Err(
            StreamError::InvalidArgument { message }
            | StreamError::Unauthenticated { message }
            | StreamError::PermissionDenied { message },
        )) => {
            return Err(SessionError::Fatal(message));
        }
        Some(Err(StreamError::AlreadyExists { message })) => {
            return Err(SessionError::NameTaken(message));
        }
        Some(Err(StreamError::Tls { message })) => return Err(SessionError::Tls(message)),
        Some(Err(e)) => return Err(SessionError::Retry(e.message().to_string())),
        Some(Ok(_)) | None => return Ok(SessionEnd::NotWelcomed),
    };
    *shared
        .session_secret
        .lock()
        .unwrap_or_else(|p| p.into_inner()) = welcome.session_secret.clone();
    let interval = Duration::from_millis(u64::from(welcome.heartbeat_interval_ms.max(50)));
    let lease = interval * welcome.missed_heartbeats_allowed.max(2);
    tracing::info!(runner_id = %welcome.runner_id, held = ?shared.held(), "attached");
    for a in &welcome.stale_attempts {
        tracing::warn!(
            attempt = %a,
            "attempt was given to another runner while we were away; dropping it"
        );
        if let Some(token) = shared.jobs().remove(a) {
            token.cancel();
        }
        shared.outbox.drop_attempt(*a);
    }

    // The writer: everything unacknowledged in the outbox, in order, then whatever comes.
    let writer_stop = CancellationToken::new();
    let writer = {
        let shared = shared.clone();
        let tx = tx.clone();
        let stop = writer_stop.clone();
        tokio::spawn(
            async move { shared.outbox.pump(&tx, &stop).await }
                .instrument(tracing::debug_span!("outbox_writer")),
        )
    };

    *shared.session_tx.lock().unwrap_or_else(|p| p.into_inner()) = Some(tx.clone());

    let mut heartbeat = tokio::time::interval(interval);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_heard = tokio::time::Instant::now();
    let mut announced_drain = false;
    let end = loop {
        if shared.draining.load(Ordering::SeqCst) && shared.held().is_empty() {
            break SessionEnd::Drained;
        }
        tokio::select! {
            m = inbound.next() => match m {
                Some(Ok(m)) => {
                    last_heard = tokio::time::Instant::now();
                    handle(shared, &tx, m, drain);
                }
                None => {
                    tracing::info!("the dispatcher closed the stream");
                    break SessionEnd::Welcomed;
                }
                Some(Err(e)) => {
                    tracing::warn!(status = %e, "stream broke");
                    break SessionEnd::Welcomed;
                }
            },
            _ = heartbeat.tick() => {
                if last_heard.elapsed() > lease {
                    tracing::warn!("the dispatcher stopped heartbeating; reconnecting");
                    transport.move_on();
                    break SessionEnd::Welcomed;
                }
                let _ = tx.try_send(Out::Heartbeat(protocol::Heartbeat {
                    running_attempts: shared.held(),
                    sent_at_ms: kiln_domain::now_millis(),
                    draining: shared.draining.load(Ordering::SeqCst),
                    lists_held: true,
                }));
            }
            _ = shared.outbox.changed() => {
                // Tell the dispatcher at once when draining starts, so it sends no more work.
                if shared.draining.load(Ordering::SeqCst) && !announced_drain {
                    announced_drain = true;
                    let _ = tx.try_send(Out::Heartbeat(protocol::Heartbeat {
                        running_attempts: shared.held(),
                        sent_at_ms: kiln_domain::now_millis(),
                        draining: true,
                        lists_held: true,
                    }));
                }
            }
        }
    };
    *shared.session_tx.lock().unwrap_or_else(|p| p.into_inner()) = None;
    writer_stop.cancel();
    let _ = writer.await;
    Ok(end)
}

/// Handles one message from the dispatcher. Never waits: the reader must always keep reading.
fn handle(shared: &Arc<Shared>, tx: &mpsc::Sender<Out>, m: In, drain: &CancellationToken) {
    match m {
        In::Assign(a) => {
            let attempt = a.attempt_id;
            let token = CancellationToken::new();
            let slot = if shared.draining.load(Ordering::SeqCst) {
                Err("draining")
            } else {
                shared.claim(attempt, token.clone()).ok_or("no free slot")
            };
            let slot = match slot {
                Ok(slot) => slot,
                Err(reason) => {
                    let _ = tx.try_send(Out::Rejected(protocol::Rejected {
                        attempt_id: attempt,
                        reason: reason.into(),
                    }));
                    return;
                }
            };
            shared.outbox.push(
                attempt,
                Out::Accepted(protocol::Accepted {
                    attempt_id: attempt,
                }),
            );
            let shared = shared.clone();
            let span = job_span(&a);
            tokio::spawn(
                async move {
                    job::run(&shared, a, token, slot).await;
                    shared.outbox.wake();
                }
                .instrument(span),
            );
        }
        In::OutputAck(a) => shared.outbox.ack_output(a.attempt_id, a.up_to_seq),
        In::ResultAck(a) => shared.outbox.drop_attempt(a.attempt_id),
        In::Refused(r) => {
            tracing::warn!(attempt = %r.attempt_id, reason = %r.reason, "dispatcher refused");
            match shared.jobs().get(&r.attempt_id) {
                // Still running: stop it; its final result will settle the attempt.
                Some(token) => token.cancel(),
                // Finished: the dispatcher will never take this attempt's results.
                None => shared.outbox.drop_attempt(r.attempt_id),
            }
        }
        In::Cancel(c) => {
            tracing::info!(attempt = %c.attempt_id, reason = %c.reason, "cancel");
            if let Some(token) = shared.jobs().get(&c.attempt_id) {
                token.cancel();
            }
        }
        In::Drain(d) => {
            tracing::info!(reason = %d.reason, "the dispatcher asked us to drain");
            drain.cancel();
        }
        In::Units(u) => shared.units_answer(u),
        In::Heartbeat(_) | In::Welcome(_) => {}
    }
}

/// The span a job runs in: a child of the build's span when the dispatcher sent its trace
/// context (`Assign.trace_context`, W3C `traceparent`), so the runner's spans (checkout, steps,
/// split batches) join the build's trace. Without a tracer set up, this is a plain span.
fn job_span(a: &protocol::Assign) -> tracing::Span {
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    let span = tracing::info_span!(
        "job",
        attempt = %a.attempt_id,
        job = %a.job_id,
        build = %a.build_id,
    );
    if !a.trace_context.is_empty() {
        let carrier: HashMap<String, String> = a
            .trace_context
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let parent = opentelemetry::global::get_text_map_propagator(|p| p.extract(&carrier));
        if let Err(e) = span.set_parent(parent) {
            tracing::debug!(error = %e, "cannot join the build's trace");
        }
    }
    span
}

//! One runner session: the handshake, then every message of the runner's stream, in order.
//!
//! The session task reads the runner's messages one at a time, so output of an attempt is
//! appended in sequence order; replies go through a bounded channel that the runner always
//! drains (its reader never waits on its writer), and every wait also watches the session's
//! stop token, so a runner that stops reading only blocks its own session until it is declared
//! lost.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use kiln_domain::{AttemptId, AttemptState, JobId, RunnerId, StepResult, now_millis};
use kiln_store::{Finish, FrameHeader};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use kiln_domain::protocol::{self, DispatcherMessage as Out, RunnerMessage as In, StreamError};

use super::{DispatchError, Dispatcher, Session, error_chain, next_session_id};

/// How long a new stream may take to send its Hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest runner name.
const MAX_NAME: usize = 128;
/// Most slots a runner may claim.
const MAX_SLOTS: u32 = 1024;
/// Most labels a runner may offer.
const MAX_LABELS: usize = 64;

type Tx = mpsc::Sender<Result<Out, DispatchError>>;

/// What `register` returns: attempts to drop, the superseded ones among them, lost ones.
type Reconciled = (Vec<AttemptId>, Vec<AttemptId>, Vec<AttemptId>);

/// What a Hello proves about who sends it.
#[derive(Clone, Copy)]
struct Proof<'a> {
    /// It presented the runner's own per-runner token.
    own_token: bool,
    /// The secret it presented (empty for none).
    secret: &'a str,
}

impl Proof<'_> {
    /// Whether it proves to be the runner of a session (or attempt) with this secret's hash;
    /// `None` (an attempt re-read after a dispatcher restart) asks for no secret.
    fn proves(&self, secret_hash: Option<&str>) -> bool {
        match secret_hash {
            None => true,
            Some(hash) => {
                self.own_token
                    || (!self.secret.is_empty() && crate::tokens::token_matches(self.secret, hash))
            }
        }
    }
}

/// Longest time a shard's NextUnits is held waiting for units before it is answered `Wait`.
const UNITS_HOLD: Duration = Duration::from_secs(2);

fn msg(m: Out) -> Result<Out, DispatchError> {
    Ok(m)
}

/// Sends to the runner unless the session is stopped first. False when the runner is gone.
async fn send(tx: &Tx, stop: &CancellationToken, m: Result<Out, DispatchError>) -> bool {
    tokio::select! {
        r = tx.send(m) => r.is_ok(),
        _ = stop.cancelled() => false,
    }
}

/// Checks a runner name: 1 to [`MAX_NAME`] characters from `A-Z a-z 0-9 . _ - : @`, starting
/// with a letter or digit. An ASCII allow-list, so no name hides invisible characters (U+200B)
/// or look-alike letters behind the name it displays as. `field` names the field in the error.
pub(crate) fn check_runner_name(name: &str, field: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err(format!("{field} is required"));
    }
    let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | ':' | '@');
    if name.len() > MAX_NAME
        || !name.chars().all(ok_char)
        || !name.starts_with(|c: char| c.is_ascii_alphanumeric())
    {
        let shown: String = name
            .chars()
            .take(32)
            .flat_map(char::escape_default)
            .collect();
        let more = if name.chars().count() > 32 { "..." } else { "" };
        return Err(format!(
            "{field} \"{shown}{more}\" is not a valid runner name: at most {MAX_NAME} characters \
             from A-Z a-z 0-9 . _ - : @, starting with a letter or digit"
        ));
    }
    Ok(())
}

fn validate_hello(h: &protocol::Hello) -> Result<(), DispatchError> {
    check_runner_name(h.name.trim(), "hello.name")
        .map_err(|m| DispatchError::invalid("hello.name", m))?;
    if h.slots == 0 || h.slots > MAX_SLOTS {
        return Err(DispatchError::invalid(
            "hello.slots",
            format!(
                "hello.slots must be between 1 and {MAX_SLOTS}, got {}",
                h.slots
            ),
        ));
    }
    if h.labels.len() > MAX_LABELS
        || h.labels
            .iter()
            .any(|(k, v)| k.is_empty() || k.len() > 128 || v.len() > 256)
    {
        return Err(DispatchError::invalid(
            "hello.labels",
            format!(
                "hello.labels: at most {MAX_LABELS} labels, non-empty keys of at most 128 bytes, values of at most 256"
            ),
        ));
    }
    // A runner holds at most its slots running, plus as many finished attempts whose results
    // are not yet acknowledged.
    let max_held = 2 * h.slots as usize;
    if h.held_attempts.len() > max_held {
        return Err(DispatchError::invalid(
            "hello.held_attempts",
            format!(
                "hello.held_attempts lists {} attempts; a runner with {} slots holds at most {max_held}",
                h.held_attempts.len(),
                h.slots
            ),
        ));
    }
    Ok(())
}

impl Dispatcher {
    /// Runs a runner's stream: give it the runner's messages, get back the dispatcher's.
    /// Any stream works, so tests can drive a session without a network.
    pub fn attach<S>(&self, inbound: S) -> ReceiverStream<Result<Out, DispatchError>>
    where
        S: Stream<Item = Result<In, StreamError>> + Send + Unpin + 'static,
    {
        self.attach_named(inbound, None)
    }

    /// Like `attach`, for a runner whose client certificate gives it `names` (mutual TLS): its
    /// Hello must use one of them.
    pub fn attach_named<S>(
        &self,
        inbound: S,
        names: Option<Vec<String>>,
    ) -> ReceiverStream<Result<Out, DispatchError>>
    where
        S: Stream<Item = Result<In, StreamError>> + Send + Unpin + 'static,
    {
        let (tx, rx) = mpsc::channel(64);
        let d = self.clone();
        tokio::spawn(
            async move { d.run_session(inbound, tx, names).await }
                .instrument(tracing::info_span!("runner_session")),
        );
        ReceiverStream::new(rx)
    }

    async fn run_session<S>(self, mut inbound: S, tx: Tx, names: Option<Vec<String>>)
    where
        S: Stream<Item = Result<In, StreamError>> + Send + Unpin + 'static,
    {
        let hello = match tokio::time::timeout(HELLO_TIMEOUT, inbound.next()).await {
            Ok(Some(Ok(In::Hello(h)))) => h,
            Ok(Some(Ok(_))) => {
                let _ = tx
                    .send(Err(DispatchError::invalid(
                        "kind",
                        "the first message on a runner stream must be a hello",
                    )))
                    .await;
                return;
            }
            Ok(Some(Err(StreamError::InvalidArgument { message }))) => {
                let _ = tx
                    .send(Err(DispatchError::invalid("message", message)))
                    .await;
                return;
            }
            Ok(Some(Err(_)) | None) => return,
            Err(_) => {
                let _ = tx
                    .send(Err(DispatchError::HelloTimeout {
                        waited: HELLO_TIMEOUT,
                    }))
                    .await;
                return;
            }
        };
        if let Err(status) = validate_hello(&hello) {
            let _ = tx.send(Err(status)).await;
            return;
        }
        let name = hello.name.trim().to_string();
        if let Some(names) = names.filter(|n| !n.contains(&name)) {
            let status = DispatchError::PermissionDenied {
                runner: name.clone(),
                certificate_names: names,
            };
            tracing::warn!(runner = %name, why = %status, "runner refused");
            let _ = tx.send(Err(status)).await;
            return;
        }
        let own_token = match self.authenticate(&name, &hello.token).await {
            Ok(own) => own,
            Err(status) => {
                tracing::warn!(runner = %name, why = %status, "runner refused");
                let _ = tx.send(Err(status)).await;
                return;
            }
        };
        let labels = hello.labels.clone().into_iter().collect();
        let (n, slots, version) = (name.clone(), hello.slots, hello.version.clone());
        let mut record = self
            .db(move |s| s.upsert_runner(&n, &labels, slots, &version))
            .await;
        if let Err(DispatchError::ResourceExhausted { .. }) = &record {
            // A full disk: a runner known before re-attaches with its stored record (a read),
            // so it keeps its attempts; only a new runner must wait for space.
            let (n, why) = (name.clone(), self.inner.space.cause().unwrap_or_default());
            let known = self
                .db(move |s| s.list_runners())
                .await
                .map(|rs| rs.into_iter().find(|r| r.name == n));
            record = match known {
                Ok(Some(mut r)) => {
                    r.slots = hello.slots;
                    Ok(r)
                }
                Ok(None) | Err(_) => Err(DispatchError::ResourceExhausted { reason: why }),
            };
        }
        let record = match record {
            Ok(r) => r,
            Err(e @ DispatchError::ResourceExhausted { .. }) => {
                let _ = tx.send(Err(e)).await;
                return;
            }
            Err(e) => {
                tracing::error!(cause = %e, "cannot register runner");
                let _ = tx
                    .send(Err(DispatchError::Internal(
                        "cannot register runner".into(),
                    )))
                    .await;
                return;
            }
        };
        let runner = record.id;
        let sid = next_session_id(&self.inner);
        let stop = CancellationToken::new();
        let secret = crate::tokens::new_token();
        let proof = Proof {
            own_token,
            secret: &hello.session_secret,
        };
        let new_secret = crate::tokens::hash_token(&secret);
        if self.me().is_some() {
            self.claim_held(runner, &hello.held_attempts, proof, &new_secret)
                .await;
        }
        let reconciled = self.register(
            &record,
            sid,
            &tx,
            &stop,
            &hello.held_attempts,
            proof,
            new_secret.clone(),
        );
        let (stale, superseded, lost) = match reconciled {
            Ok(r) => r,
            Err(status) => {
                tracing::warn!(runner = %name, "refused: {status}");
                let _ = tx.send(Err(status)).await;
                return;
            }
        };
        for &a in &superseded {
            // Recorded only for an attempt that was once this runner's: a claim on anyone
            // else's attempt (or one that does not exist) is ignored without a row.
            let reason =
                format!("runner {name} came back holding attempt {a}, which was superseded");
            let _ = self
                .db(move |s| match s.get_attempt(a)? {
                    Some(at) if at.runner_id == runner => s.record_refusal(a, &reason),
                    _ => Ok(()),
                })
                .await;
        }
        for a in lost {
            if let Err(e) = self.requeue(a, "runner came back without it").await {
                tracing::error!(cause = %e, "requeue failed");
            }
        }
        if self.me().is_some() {
            self.attached_here(runner, sid, new_secret).await;
        }
        let config = &self.inner.config;
        let welcome = Out::Welcome(protocol::Welcome {
            runner_id: runner,
            heartbeat_interval_ms: config.heartbeat_interval.as_millis() as u32,
            missed_heartbeats_allowed: config.missed_heartbeats,
            stale_attempts: stale,
            session_secret: secret,
        });
        if !send(&tx, &stop, msg(welcome)).await {
            self.end_session(runner, sid, Some(self.inner.config.reconnect_grace));
            return;
        }
        tracing::info!(runner = %name, id = %runner, slots = hello.slots, "runner attached");
        self.inner
            .metrics
            .attached(&name, !hello.held_attempts.is_empty());
        self.kick();
        // Whether the stream closed under us (the runner died or its socket broke), rather than
        // the session being stopped by the dispatcher.
        let mut closed = false;

        loop {
            tokio::select! {
                _ = stop.cancelled() => {
                    // Ended by the dispatcher (declared lost, space back after a full disk, a
                    // drain, shutdown): tell the runner, which re-attaches if it is alive.
                    let _ = tx.try_send(Err(DispatchError::Unavailable { message: "the dispatcher ended this session; attach again".into() }));
                    break;
                }
                m = inbound.next() => match m {
                    Some(Ok(m)) => {
                        self.touch(runner, sid);
                        if let Err(status) = self.handle(runner, sid, &tx, &stop, m).await {
                            tracing::warn!(runner = %name, status = %status, "closing runner stream");
                            let _ = tx.try_send(Err(status));
                            closed = true;
                            break;
                        }
                    }
                    Some(Err(StreamError::InvalidArgument { message })) => {
                        tracing::warn!(runner = %name, status = %message, "closing runner stream");
                        let _ = tx.try_send(Err(DispatchError::invalid("message", message)));
                        closed = true;
                        break;
                    }
                    Some(Err(status)) => {
                        tracing::info!(runner = %name, status = %status, "runner stream broke");
                        closed = true;
                        break;
                    }
                    None => {
                        tracing::info!(runner = %name, "runner detached");
                        closed = true;
                        break;
                    }
                },
            }
        }
        let grace = closed.then_some(config.reconnect_grace);
        self.end_session(runner, sid, grace);
    }

    /// Checks a runner's token: its own token if it has one, else the shared token if one is
    /// configured; with neither (and no runner tokens at all), runners are not authenticated.
    /// `Ok(true)` when the runner proved who it is with its own per-runner token.
    async fn authenticate(&self, name: &str, token: &str) -> Result<bool, DispatchError> {
        let n = name.to_string();
        let (own, any) = self
            .db(move |s| s.runner_token_hash(&n))
            .await
            .map_err(|e| internal(&e))?;
        let shared = self.inner.config.runner_token.as_deref();
        let own_token = own.is_some();
        let ok = match (own, shared) {
            (Some(hash), _) => crate::tokens::token_matches(token, &hash),
            (None, Some(shared)) => {
                crate::tokens::token_matches(token, &crate::tokens::hash_token(shared))
            }
            (None, None) => !any,
        };
        if ok {
            Ok(own_token)
        } else if token.is_empty() {
            Err(DispatchError::Unauthenticated {
                runner: name.to_string(),
                token_given: false,
            })
        } else {
            Err(DispatchError::Unauthenticated {
                runner: name.to_string(),
                token_given: true,
            })
        }
    }

    /// Installs a session and reconciles the attempts the runner says it holds. A live session
    /// of the same runner is replaced only when the new one proves it is that runner (its own
    /// token, or the previous session's secret); so is a held attempt re-attached. Returns the
    /// held attempts the runner must drop, those of them that were superseded (once current,
    /// now not), and the ones the runner should hold but does not (lost).
    #[allow(clippy::too_many_arguments)]
    fn register(
        &self,
        record: &kiln_domain::RunnerRecord,
        sid: u64,
        tx: &Tx,
        stop: &CancellationToken,
        held: &[AttemptId],
        proof: Proof<'_>,
        secret_hash: String,
    ) -> Result<Reconciled, DispatchError> {
        let mut st = self.state();
        // It proves to be the runner by the live session's secret, or by the secret of an
        // attempt of the runner's that waits for it (so a name squatted by an impostor while
        // the runner was away goes back to the runner).
        let proven = |old: &super::Session| {
            proof.proves(Some(&old.secret_hash))
                || st.attempts.values().any(|l| {
                    l.runner_id == record.id
                        && l.secret_hash
                            .as_deref()
                            .is_some_and(|h| proof.proves(Some(h)))
                })
        };
        if let Some(old) = st.sessions.get(&record.id)
            && !proven(old)
        {
            // Another runner already uses this name (or an impostor tries to): refuse, rather
            // than let the two replace each other or let anyone speak for the runner.
            return Err(DispatchError::RunnerAttached {
                name: record.name.clone(),
            });
        }
        if let Some(old) = st.sessions.remove(&record.id) {
            // The runner came back on a new stream; the old one went silent.
            old.stop.cancel();
        }
        let held: HashSet<AttemptId> = held.iter().copied().collect();
        let mut stale = Vec::new();
        let mut superseded = Vec::new();
        let mut unproven = HashSet::new();
        let super::State {
            attempts,
            held: held_slots,
            ..
        } = &mut *st;
        for a in &held {
            match attempts.get_mut(a) {
                Some(live)
                    if live.runner_id == record.id && proof.proves(live.secret_hash.as_deref()) =>
                {
                    super::move_attempt(held_slots, *a, live, Some(sid));
                    live.orphan_deadline = None;
                    live.secret_hash = Some(secret_hash.clone());
                    live.on_session_since = Instant::now();
                    live.unlisted = 0;
                }
                Some(_) => {
                    // Someone else's, or this runner's without proof: left as it is.
                    stale.push(*a);
                    unproven.insert(*a);
                }
                None => {
                    stale.push(*a);
                    superseded.push(*a);
                }
            }
        }
        // Attempts it does not claim are lost, unless they wait for a session it did not prove
        // to be (they stay with their runner until their deadline).
        let lost: Vec<AttemptId> = st
            .attempts
            .iter()
            .filter(|(id, l)| {
                l.runner_id == record.id
                    && l.session != Some(sid)
                    && !held.contains(id)
                    && proof.proves(l.secret_hash.as_deref())
            })
            .map(|(id, _)| *id)
            .collect();
        st.sessions.insert(
            record.id,
            Session {
                id: sid,
                name: record.name.clone(),
                labels: record.labels.clone(),
                slots: record.slots,
                tx: tx.clone(),
                draining: false,
                last_heartbeat: Instant::now(),
                last_heartbeat_ms: now_millis(),
                stop: stop.clone(),
                last_assigned: 0,
                refusals: 0,
                backoff_until: None,
                secret_hash,
            },
        );
        stale.sort_unstable();
        superseded.sort_unstable();
        Ok((stale, superseded, lost))
    }

    /// With PostgreSQL: attempts the runner says it holds that this dispatcher does not have
    /// in memory may be another dispatcher's (the runner re-attached here after that one died,
    /// or moved). Each one that is current, unfinished, this runner's, and whose stored secret
    /// hash the Hello proves (or the runner's own token does) is claimed: its owner moves here
    /// (a compare-and-set, so one dispatcher wins), the old owner is told `Moved`, and it
    /// waits in memory for `register` to put it on the new session.
    async fn claim_held(
        &self,
        runner: RunnerId,
        held: &[AttemptId],
        proof: Proof<'_>,
        new_secret: &str,
    ) {
        let Some(me) = self.me() else {
            return;
        };
        let missing: Vec<AttemptId> = {
            let st = self.state();
            held.iter()
                .filter(|a| !st.attempts.contains_key(a))
                .copied()
                .collect()
        };
        if missing.is_empty() {
            return;
        }
        let stored = match self
            .db(move |s| {
                let mut out = Vec::new();
                for a in missing {
                    if let Some(o) = s.owned_attempt(a)? {
                        out.push(o);
                    }
                }
                Ok(out)
            })
            .await
        {
            Ok(stored) => stored,
            Err(e) => {
                tracing::error!(cause = %e, "cannot read held attempts");
                return;
            }
        };
        let wanted: Vec<kiln_store::OwnedAttempt> = stored
            .into_iter()
            .filter(|o| {
                // Owned here too: adopted, and not yet in memory.
                o.current && o.attempt.runner_id == runner && proof.proves(o.secret_hash.as_deref())
            })
            .collect();
        if wanted.is_empty() {
            return;
        }
        let to = kiln_store::Owner {
            dispatcher: me,
            secret_hash: new_secret.to_string(),
        };
        let claimed = self
            .db(move |s| {
                let mut out = Vec::new();
                for o in wanted {
                    if s.claim_attempt(o.attempt.id, runner, o.owner, &to)?
                        && let Some(job) = s.get_job(o.attempt.job_id)?
                    {
                        out.push((o, job));
                    }
                }
                Ok(out)
            })
            .await;
        let claimed = match claimed {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(cause = %e, "cannot claim held attempts");
                return;
            }
        };
        let deadline = Instant::now() + self.inner.config.lease();
        for (o, job) in claimed {
            let a = o.attempt.id;
            tracing::info!(attempt = %a, from = ?o.owner.map(|d| d.get()), "claimed an attempt its runner re-attached here with");
            {
                let mut st = self.state();
                let mut live = super::LiveAttempt::new(&job, runner, None, &self.inner.config);
                live.orphan_deadline = Some(deadline);
                // What the runner proved: `register` checks it again and moves it to the
                // new session.
                live.secret_hash = o.secret_hash.clone();
                if !st.attempts.contains_key(&a) {
                    st.insert_attempt(a, live);
                }
            }
            if o.owner != Some(me)
                && let Some(c) = &self.inner.cluster
            {
                c.send(kiln_store::Said::Moved { attempt: a, to: me });
            }
        }
        self.deadlines_changed();
    }

    /// With PostgreSQL, after a session was installed: the store says which dispatcher holds
    /// the runner, and its re-attached attempts record the new session's secret hash (so the
    /// runner proves itself with the new secret to whichever dispatcher it reaches next).
    async fn attached_here(&self, runner: RunnerId, sid: u64, secret_hash: String) {
        let Some(me) = self.me() else {
            return;
        };
        let on_session: Vec<AttemptId> = self
            .state()
            .attempts
            .iter()
            .filter(|(_, l)| l.session == Some(sid))
            .map(|(a, _)| *a)
            .collect();
        let to = kiln_store::Owner {
            dispatcher: me,
            secret_hash,
        };
        let done = self
            .db(move |s| {
                s.set_runner_dispatcher(runner, Some(me), me)?;
                let mut gone = Vec::new();
                for a in on_session {
                    if !s.claim_attempt(a, runner, Some(me), &to)? {
                        gone.push(a);
                    }
                }
                Ok(gone)
            })
            .await;
        match done {
            Ok(gone) => {
                for a in gone {
                    // Ended, or taken by another dispatcher meanwhile (its `Moved` follows).
                    tracing::info!(attempt = %a, "attempt no longer owned here");
                }
            }
            Err(e) => tracing::error!(cause = %e, "cannot record the runner's dispatcher"),
        }
    }

    /// With PostgreSQL: the runner's stream is no longer here.
    pub(super) fn detached(&self, runner: RunnerId) {
        let Some(me) = self.me() else {
            return;
        };
        let store = self.inner.store.clone();
        tokio::task::spawn_blocking(move || {
            if let Err(e) = store.set_runner_dispatcher(runner, None, me) {
                tracing::warn!(cause = %error_chain(&e), "cannot record a runner's detach");
            }
        });
    }

    /// Counts an assignment the runner refused and backs off from it.
    fn refused_assignment(&self, runner: RunnerId, sid: u64, reason: &str) {
        let mut st = self.state();
        let Some(s) = st.sessions.get_mut(&runner).filter(|s| s.id == sid) else {
            return;
        };
        let wait = s.refused_assignment(tokio::time::Instant::now());
        if s.unhealthy() {
            tracing::warn!(runner = %s.name, refusals = s.refusals, reason, backoff_ms = wait.as_millis() as u64,
                "runner keeps refusing assignments; unhealthy, offered work only after a backoff");
        } else {
            tracing::info!(runner = %s.name, reason, backoff_ms = wait.as_millis() as u64,
                "runner refused an assignment; backing off");
        }
        drop(st);
        self.deadlines_changed();
    }

    /// The runner drains: no new work goes to it.
    fn set_draining(&self, runner: RunnerId, sid: u64) {
        let mut st = self.state();
        if let Some(s) = st.sessions.get_mut(&runner).filter(|s| s.id == sid) {
            s.draining = true;
        }
    }

    /// Attempts this session should hold that the runner's last two full heartbeats (`listed`)
    /// did not list, once they had time to arrive (two heartbeat intervals on the session): the
    /// runner forgot them (a lost message, a bug), and only their deadline would catch them.
    fn forgotten(&self, runner: RunnerId, sid: u64, listed: &[AttemptId]) -> Vec<AttemptId> {
        let settle = self.inner.config.heartbeat_interval * 2;
        let mut st = self.state();
        let mut out = Vec::new();
        // Only this session's attempts (a heartbeat must not cost a walk over every attempt).
        for id in st.held_by(sid) {
            let Some(a) = st
                .attempts
                .get_mut(&id)
                .filter(|a| a.runner_id == runner && a.session == Some(sid))
            else {
                continue;
            };
            if listed.contains(&id) || a.on_session_since.elapsed() < settle {
                a.unlisted = 0;
                continue;
            }
            a.unlisted = a.unlisted.saturating_add(1);
            if a.unlisted >= 2 {
                out.push(id);
            }
        }
        out
    }

    fn touch(&self, runner: RunnerId, sid: u64) {
        let mut st = self.state();
        if let Some(s) = st.sessions.get_mut(&runner).filter(|s| s.id == sid) {
            s.last_heartbeat = Instant::now();
            s.last_heartbeat_ms = now_millis();
        }
    }

    /// The session ended: if it is still the runner's current one, remove it; its attempts wait
    /// for the runner to come back: one lease from its last heartbeat, or only `grace` from
    /// now when its stream closed (a closed stream is a dead process or a broken socket, not a
    /// silent partition: a runner that is alive re-attaches at once).
    fn end_session(&self, runner: RunnerId, sid: u64, grace: Option<Duration>) {
        let lease = self.inner.config.lease();
        let mut st = self.state();
        let Some(s) = st.sessions.get(&runner).filter(|s| s.id == sid) else {
            return;
        };
        let mut deadline = s.last_heartbeat + lease;
        // Closed while it was still talking: it died (or its socket broke). Closed after a
        // silence (the connection's keepalive gave up on a stopped or cut-off runner, after
        // 30 s at least): it went silent, and keeps its lease.
        let talking = (self.inner.config.heartbeat_interval * 2).min(Duration::from_secs(10));
        if let Some(grace) = grace
            && s.last_heartbeat.elapsed() < talking
        {
            deadline = deadline.min(Instant::now() + grace);
        }
        let last_seen = s.last_heartbeat_ms;
        st.sessions.remove(&runner);
        self.detached(runner);
        let super::State { attempts, held, .. } = &mut *st;
        for (id, a) in attempts.iter_mut() {
            if a.session == Some(sid) {
                super::move_attempt(held, *id, a, None);
                a.orphan_deadline = Some(deadline);
                // Its runner sends again everything unacknowledged on its next session.
                a.paused = false;
            }
        }
        drop(st);
        self.deadlines_changed();
        let store = self.inner.store.clone();
        tokio::task::spawn_blocking(move || store.touch_runner(runner, last_seen));
    }

    /// Whether `attempt` is held by this session; if not, the reason.
    fn check_held(&self, runner: RunnerId, sid: u64, attempt: AttemptId) -> Result<JobId, String> {
        let st = self.state();
        match st.attempts.get(&attempt) {
            Some(a) if a.runner_id == runner && a.session == Some(sid) => Ok(a.job_id),
            Some(_) => Err(format!("attempt {attempt} is not held by this runner")),
            None => Err(format!("attempt {attempt} is not current")),
        }
    }

    /// Handles one message. A message about an attempt that cannot be stored because the disk
    /// is full pauses the attempt instead of ending the session (see `space`).
    async fn handle(
        &self,
        runner: RunnerId,
        sid: u64,
        tx: &Tx,
        stop: &CancellationToken,
        m: In,
    ) -> Result<(), DispatchError> {
        let attempt = m.attempt();
        if let Some(a) = attempt
            && self.state().attempts.get(&a).is_some_and(|a| a.paused)
        {
            // Not acknowledged: the runner sends it again once space is back.
            return Ok(());
        }
        match self.handle_message(runner, sid, tx, stop, m).await {
            Err(status @ DispatchError::ResourceExhausted { .. }) => match attempt {
                Some(a) => {
                    self.pause(a);
                    Ok(())
                }
                None => Err(status),
            },
            other => other,
        }
    }

    /// Space is back: ends the sessions holding paused attempts, so that their runners
    /// re-attach at once (their attempts wait one lease for them, as after any reconnect) and
    /// send again, in order, everything not acknowledged.
    pub(super) fn resume_paused(&self) {
        let st = self.state();
        let sessions: std::collections::HashSet<u64> = st
            .attempts
            .values()
            .filter(|a| a.paused)
            .filter_map(|a| a.session)
            .collect();
        for s in st.sessions.values().filter(|s| sessions.contains(&s.id)) {
            tracing::info!(runner = %s.name, "space is back: the runner re-attaches to send what waited");
            s.stop.cancel();
        }
        drop(st);
        self.kick();
    }

    /// Pauses an attempt whose message could not be stored for want of space.
    fn pause(&self, attempt: AttemptId) {
        if let Some(a) = self.state().attempts.get_mut(&attempt)
            && !a.paused
        {
            tracing::warn!(
                %attempt,
                job = %a.job_id,
                "paused: the disk is full; the runner keeps what it sends until space is back"
            );
            a.paused = true;
        }
    }

    async fn handle_message(
        &self,
        runner: RunnerId,
        sid: u64,
        tx: &Tx,
        stop: &CancellationToken,
        m: In,
    ) -> Result<(), DispatchError> {
        let refused = |attempt: AttemptId, reason: String| {
            tracing::info!(%attempt, reason = %reason, "refused");
            msg(Out::Refused(protocol::Refused {
                attempt_id: attempt,
                reason,
            }))
        };
        match m {
            In::Hello(_) => Err(DispatchError::invalid(
                "kind",
                "hello may only be sent once per stream",
            )),
            In::Heartbeat(hb) => {
                // The dispatcher's heartbeat answers the runner's (one wake-up per runner and
                // interval, not two): the runner hears from the dispatcher at its interval.
                // Never wait on it: if the channel is full, the runner is busy reading anyway.
                let _ = tx.try_send(msg(Out::Heartbeat(protocol::Heartbeat {
                    running_attempts: vec![],
                    sent_at_ms: now_millis(),
                    draining: false,
                    lists_held: false,
                })));
                if hb.draining {
                    self.set_draining(runner, sid);
                }
                if hb.lists_held {
                    for a in self.forgotten(runner, sid, &hb.running_attempts) {
                        tracing::warn!(
                            attempt = %a,
                            %runner,
                            "the runner no longer holds the attempt; it goes back to the queue"
                        );
                        if let Err(e) = self.requeue(a, "the runner no longer holds it").await {
                            tracing::error!(attempt = %a, cause = %error_chain(&e), "requeue failed");
                        }
                    }
                }
                Ok(())
            }
            In::Accepted(a) => {
                if let Err(why) = self.check_held(runner, sid, a.attempt_id) {
                    send(tx, stop, refused(a.attempt_id, why)).await;
                    return Ok(());
                }
                if let Some(s) = self
                    .state()
                    .sessions
                    .get_mut(&runner)
                    .filter(|s| s.id == sid)
                {
                    s.accepted_assignment();
                }
                let attempt = a.attempt_id;
                match self.db(move |s| s.start_attempt(attempt)).await {
                    Ok(Some(ch)) => self.publish(&ch),
                    Ok(None) => {}
                    Err(e) => return Err(internal(&e)),
                }
                Ok(())
            }
            In::Rejected(r) => {
                if self.check_held(runner, sid, r.attempt_id).is_ok() {
                    // A runner that drains or shuts down hands work back: not a loss, and it
                    // gets no more work.
                    let handed_back = r.reason.contains("draining")
                        || r.reason.contains("shutting down")
                        || r.reason.contains("no free slot");
                    if r.reason.contains("draining") || r.reason.contains("shutting down") {
                        self.set_draining(runner, sid);
                    } else {
                        // A refusal is a fact about this runner (a leaked slot, a broken
                        // disk): it gets no work for a while, longer each time, so it is never
                        // offered work in a loop.
                        self.refused_assignment(runner, sid, &r.reason);
                    }
                    let reason = format!("runner handed it back: {}", r.reason);
                    self.requeue_counted(r.attempt_id, &reason, !handed_back)
                        .await
                        .map_err(|e| internal(&e))?;
                }
                // Settles the attempt on the runner (it may forget it).
                send(
                    tx,
                    stop,
                    msg(Out::ResultAck(protocol::ResultAck {
                        attempt_id: r.attempt_id,
                    })),
                )
                .await;
                Ok(())
            }
            In::Output(chunk) => self.on_output(runner, sid, tx, stop, chunk).await,
            In::StepStarted(st) => {
                let mut state = self.state();
                if let Some(a) = state
                    .attempts
                    .get_mut(&st.attempt_id)
                    .filter(|a| a.runner_id == runner && a.session == Some(sid))
                {
                    let timeout = a
                        .step_timeouts
                        .get(st.step_index as usize)
                        .copied()
                        .unwrap_or(0);
                    a.step_deadline = (timeout > 0).then(|| {
                        Instant::now()
                            + Duration::from_millis(timeout)
                            + self.inner.config.deadline_slack
                    });
                    if timeout > 0 {
                        self.deadlines_changed();
                    }
                }
                Ok(())
            }
            In::StepFinished(f) => {
                if let Err(why) = self.check_held(runner, sid, f.attempt_id) {
                    send(tx, stop, refused(f.attempt_id, why)).await;
                    return Ok(());
                }
                let result = StepResult {
                    index: f.step_index,
                    outcome: f.outcome,
                    exit_code: f.exit_code,
                    duration_ms: f.duration_ms,
                    cases: f.cases,
                    report_note: f.report_note,
                };
                let attempt = f.attempt_id;
                if let Some(a) = self.state().attempts.get_mut(&attempt) {
                    a.step_deadline = None;
                }
                let duration_ms = f.duration_ms;
                match self.db(move |s| s.record_step(attempt, &result)).await {
                    Ok(true) => self.inner.metrics.step_finished(duration_ms),
                    Ok(false) => {
                        send(
                            tx,
                            stop,
                            refused(attempt, format!("attempt {attempt} is not current")),
                        )
                        .await;
                    }
                    Err(e) => return Err(internal(&e)),
                }
                Ok(())
            }
            In::JobFinished(f) => self.on_job_finished(runner, sid, tx, stop, f).await,
            In::NextUnits(n) => self.on_next_units(runner, sid, tx, stop, n).await,
        }
    }

    /// A split step's shard reports its last batch and asks for the next one: one store
    /// transaction (fencing, results, rounds, lease), then the answer on the stream. A runner
    /// that keeps failing units other runners pass is taken out of the pool here.
    async fn on_next_units(
        &self,
        runner: RunnerId,
        sid: u64,
        tx: &Tx,
        stop: &CancellationToken,
        n: protocol::NextUnits,
    ) -> Result<(), DispatchError> {
        // What the answer echoes.
        let head = Head {
            attempt_id: n.attempt_id,
            step_index: n.step_index,
            request: n.request,
        };
        let attempt = n.attempt_id;
        let reply = match self.check_held(runner, sid, attempt) {
            Err(why) => kiln_domain::split::UnitsReply::Refused(why),
            Ok(_) => {
                n.check()
                    .map_err(|m| DispatchError::invalid("next_units", m))?;
                let req = kiln_domain::split::UnitsRequest {
                    attempt: n.attempt_id,
                    runner,
                    step_index: n.step_index,
                    request: n.request,
                    discovered: n.discovered,
                    results: n.results,
                    interactions: n.interactions,
                    max_units: n.max_units,
                    batch_ms: n.batch_ms,
                    batch_processes: n.batch_processes,
                };
                let changes = !req.results.is_empty() || !req.discovered.is_empty();
                let outcomes: Vec<bool> = req
                    .results
                    .iter()
                    .map(|r| r.outcome == kiln_domain::split::UnitOutcome::Passed)
                    .collect();
                // The same request without its lists, to ask again while holding a `Wait`.
                let again = kiln_domain::split::UnitsRequest {
                    attempt: req.attempt,
                    runner: req.runner,
                    step_index: req.step_index,
                    request: req.request,
                    discovered: Vec::new(),
                    results: Vec::new(),
                    interactions: Vec::new(),
                    max_units: req.max_units,
                    batch_ms: 0,
                    batch_processes: 0,
                };
                let reply = self
                    .db(move |s| s.next_units(&req))
                    .await
                    .map_err(|e| internal(&e))?;
                if changes {
                    self.inner.units_changed.notify_waiters();
                }
                let suspect = {
                    let mut st = self.state();
                    let build = st.attempts.get(&attempt).map(|a| a.build_id);
                    build.and_then(|b| st.unit_health.record(b, runner, outcomes, Instant::now()))
                };
                match (suspect, reply) {
                    (Some(why), _) => {
                        self.take_out_of_pool(runner, sid, attempt, &why).await?;
                        kiln_domain::split::UnitsReply::Refused(format!(
                            "this runner was taken out of the pool: {why}"
                        ))
                    }
                    (None, kiln_domain::split::UnitsReply::Wait) => {
                        // Hold the answer until something changes rather than have the
                        // shard poll: the reader goes on reading meanwhile.
                        let d = self.clone();
                        let (tx, stop) = (tx.clone(), stop.clone());
                        tokio::spawn(async move { d.hold_units(again, head, tx, stop).await });
                        return Ok(());
                    }
                    (None, reply) => reply,
                }
            }
        };
        send(tx, stop, msg(Out::Units(head.answer(reply)))).await;
        Ok(())
    }

    /// Answers a NextUnits that got `Wait`: asks the store again (same request number, so
    /// nothing is recorded twice) each time units change, for at most [`UNITS_HOLD`], then
    /// answers with whatever it got (a `Wait` then makes the shard ask again).
    async fn hold_units(
        self,
        req: kiln_domain::split::UnitsRequest,
        head: Head,
        tx: Tx,
        stop: CancellationToken,
    ) {
        let deadline = tokio::time::Instant::now() + UNITS_HOLD;
        let reply = loop {
            let changed = self.inner.units_changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let r = req.clone();
            let reply = match self.db(move |s| s.next_units(&r)).await {
                Ok(reply) => reply,
                Err(e) => {
                    tracing::error!(cause = %e, "cannot hand out units");
                    return;
                }
            };
            if !matches!(reply, kiln_domain::split::UnitsReply::Wait) {
                break reply;
            }
            tokio::select! {
                _ = &mut changed => {}
                _ = tokio::time::sleep_until(deadline) => break reply,
                _ = stop.cancelled() => return,
            }
        };
        send(&tx, &stop, msg(Out::Units(head.answer(reply)))).await;
    }

    /// Drains a runner that fails what others pass and gives its shard to another runner: the
    /// units it holds and the failures it reported in the current round go back to the queue
    /// (they are not the tests' fault); the loss is not counted against the job.
    async fn take_out_of_pool(
        &self,
        runner: RunnerId,
        sid: u64,
        attempt: AttemptId,
        why: &str,
    ) -> Result<(), DispatchError> {
        tracing::warn!(%runner, %attempt, reason = %why, "taking the runner out of the pool");
        self.set_draining(runner, sid);
        let reason = format!("runner taken out of the pool: {why}");
        self.state()
            .send_cancel(attempt, self.inner.config.cancel_grace, &reason);
        let requeued = self
            .db(move |s| s.requeue_failed_units(attempt))
            .await
            .map_err(|e| internal(&e))?;
        tracing::info!(
            %attempt,
            requeued,
            "failed units of a broken runner run again elsewhere"
        );
        self.requeue_counted(attempt, &reason, false)
            .await
            .map_err(|e| internal(&e))
    }

    async fn on_output(
        &self,
        runner: RunnerId,
        sid: u64,
        tx: &Tx,
        stop: &CancellationToken,
        chunk: protocol::OutputChunk,
    ) -> Result<(), DispatchError> {
        let attempt = chunk.attempt_id;
        let stream = chunk.stream.code();
        if chunk.data.len() > kiln_store::MAX_FRAME {
            return Err(DispatchError::invalid(
                "output.data",
                format!(
                    "output chunk of {} bytes is larger than {}",
                    chunk.data.len(),
                    kiln_store::MAX_FRAME
                ),
            ));
        }
        let job = match self.check_held(runner, sid, attempt) {
            Ok(job) => job,
            Err(why) => {
                send(
                    tx,
                    stop,
                    msg(Out::Refused(protocol::Refused {
                        attempt_id: attempt,
                        reason: why,
                    })),
                )
                .await;
                return Ok(());
            }
        };
        let expected = self.next_seq(attempt, job).await?;
        if chunk.seq < expected {
            // Already stored (re-sent after a reconnect): acknowledge, do not store twice.
            send(
                tx,
                stop,
                msg(Out::OutputAck(protocol::OutputAck {
                    attempt_id: attempt,
                    up_to_seq: expected - 1,
                })),
            )
            .await;
            return Ok(());
        }
        if chunk.seq > expected {
            // Chunks went missing on the way: end the session. The runner reconnects and sends
            // everything not acknowledged again, in order, so the gap is filled.
            return Err(DispatchError::OutputGap {
                attempt,
                expected,
                got: chunk.seq,
            });
        }
        let header = FrameHeader {
            attempt,
            seq: chunk.seq,
            step: chunk.step_index,
            stream,
        };
        // On a blocking thread (a PostgreSQL log store waits for the database), which also
        // moves the attempt's next sequence number: the two stay together even if this task
        // is dropped while the append runs.
        let (seq, size) = (chunk.seq, chunk.data.len());
        let d = self.clone();
        let appended = move || {
            let len = d.inner.logs.append(job, &header, &chunk.data)?;
            if let Some(a) = d.state().attempts.get_mut(&attempt) {
                a.next_seq = Some(seq + 1);
            }
            Ok::<_, kiln_store::LogError>(len)
        };
        let len = tokio::task::spawn_blocking(appended)
            .await
            .map_err(DispatchError::from)?
            .map_err(|e| {
                if e.is_disk_full() {
                    return self.disk_full("appending output");
                }
                tracing::error!(%job, cause = %error_chain(&e), "cannot store output");
                DispatchError::Unavailable {
                    message: "the dispatcher cannot store output right now".into(),
                }
            })?;
        self.inner.metrics.output(size);
        self.inner.hub.advance(job, len);
        if let Some(c) = &self.inner.cluster {
            c.log(job, len);
        }
        send(
            tx,
            stop,
            msg(Out::OutputAck(protocol::OutputAck {
                attempt_id: attempt,
                up_to_seq: seq,
            })),
        )
        .await;
        Ok(())
    }

    /// The next sequence number expected for an attempt (read from the log after a restart).
    async fn next_seq(&self, attempt: AttemptId, job: JobId) -> Result<u64, DispatchError> {
        if let Some(n) = self.state().attempts.get(&attempt).and_then(|a| a.next_seq) {
            return Ok(n);
        }
        let last = self.stored_last_seq(job, attempt).await?;
        if let Some(a) = self.state().attempts.get_mut(&attempt) {
            a.next_seq = Some(last + 1);
        }
        Ok(last + 1)
    }

    /// The sequence number of `attempt`'s last output chunk in `job`'s stored log (0: none).
    async fn stored_last_seq(&self, job: JobId, attempt: AttemptId) -> Result<u64, DispatchError> {
        let logs = self.inner.logs.clone();
        tokio::task::spawn_blocking(move || logs.last_seq(job, attempt))
            .await
            .map_err(DispatchError::from)?
            .map_err(|e| {
                tracing::error!(cause = %error_chain(&e), "cannot read log");
                DispatchError::Unavailable {
                    message: "cannot read the job's log".into(),
                }
            })
    }

    async fn on_job_finished(
        &self,
        runner: RunnerId,
        sid: u64,
        tx: &Tx,
        stop: &CancellationToken,
        f: protocol::JobFinished,
    ) -> Result<(), DispatchError> {
        let attempt = f.attempt_id;
        let state = f.state;
        if !state.is_final() {
            return Err(DispatchError::invalid(
                "job_finished.state",
                format!("job_finished.state {state} is not a final job state"),
            ));
        }
        // An attempt no longer in memory may be a result re-sent after it was recorded; the
        // store's compare-and-set tells. It must at least belong to this runner.
        let job = match self.check_held(runner, sid, attempt) {
            Ok(job) => Some(job),
            Err(why) if self.state().attempts.contains_key(&attempt) => {
                // Live, but not on this session (another session of the name that did not
                // prove to be the runner, or another runner): never recorded from here.
                self.inner.metrics.result_refused();
                send(tx, stop, refused(attempt, why)).await;
                return Ok(());
            }
            Err(_) => {
                let a = self
                    .db(move |s| s.get_attempt(attempt))
                    .await
                    .map_err(|e| internal(&e))?;
                match a {
                    Some(a)
                        if a.runner_id == runner
                            && !matches!(
                                a.state,
                                AttemptState::Offered | AttemptState::Running
                            ) =>
                    {
                        // Ended (a re-sent result): the store's compare-and-set answers.
                        None
                    }
                    Some(a) if a.runner_id == runner => {
                        // Not held here (it moved, or this dispatcher forgot it): never
                        // recorded before all of its output is stored.
                        let stored = self.stored_last_seq(a.job_id, attempt).await?;
                        if f.last_seq > stored {
                            self.inner.metrics.result_refused();
                            let reason = format!(
                                "attempt {attempt} is not held here and its output is stored only up to {stored} of {}",
                                f.last_seq
                            );
                            send(tx, stop, refused(attempt, reason)).await;
                            return Ok(());
                        }
                        None
                    }
                    _ => {
                        self.inner.metrics.result_refused();
                        send(
                            tx,
                            stop,
                            msg(Out::Refused(protocol::Refused {
                                attempt_id: attempt,
                                reason: format!("attempt {attempt} does not belong to this runner"),
                            })),
                        )
                        .await;
                        return Ok(());
                    }
                }
            }
        };
        if let Some(job) = job {
            // A result is only taken once all of the attempt's output is stored.
            let stored = self.next_seq(attempt, job).await? - 1;
            if f.last_seq > stored {
                return Err(DispatchError::OutputMissing {
                    attempt,
                    last_seq: f.last_seq,
                    stored,
                });
            }
            let logs = self.inner.logs.clone();
            tokio::task::spawn_blocking(move || logs.sync(job))
                .await
                .map_err(DispatchError::from)?
                .map_err(|e| {
                    if e.is_disk_full() {
                        return self.disk_full("flushing a log");
                    }
                    tracing::error!(cause = %error_chain(&e), "cannot flush log");
                    DispatchError::Unavailable {
                        message: "cannot flush the job's log".into(),
                    }
                })?;
        }
        let message = (!f.message.is_empty()).then(|| f.message.clone());
        let finish = self
            .db(move |s| s.finish_attempt(attempt, state, message.as_deref()))
            .await
            .map_err(|e| internal(&e))?;
        let assigned_at = self
            .state()
            .remove_attempt(&attempt)
            .and_then(|a| a.assigned_at);
        let reply = match finish {
            Finish::Recorded(ch) => {
                tracing::info!(%attempt, job = %ch.job_id, state = %state, "job finished");
                self.inner
                    .traces
                    .finished(ch.build_id, attempt, state, assigned_at);
                self.publish(&ch);
                self.kick();
                Out::ResultAck(protocol::ResultAck {
                    attempt_id: attempt,
                })
            }
            Finish::AlreadyRecorded => Out::ResultAck(protocol::ResultAck {
                attempt_id: attempt,
            }),
            Finish::Refused(reason) => {
                tracing::warn!(%attempt, reason = %reason, "result refused");
                self.inner.metrics.result_refused();
                self.kick();
                Out::Refused(protocol::Refused {
                    attempt_id: attempt,
                    reason,
                })
            }
        };
        send(tx, stop, msg(reply)).await;
        Ok(())
    }
}

fn refused(attempt: AttemptId, reason: String) -> Result<Out, DispatchError> {
    msg(Out::Refused(protocol::Refused {
        attempt_id: attempt,
        reason,
    }))
}

/// An engine error to end a session with: a full disk keeps its reason (the attempt pauses);
/// anything else is logged here and sent as a bare internal error.
fn internal(e: &DispatchError) -> DispatchError {
    if let DispatchError::ResourceExhausted { reason } = e {
        return DispatchError::ResourceExhausted {
            reason: reason.clone(),
        };
    }
    tracing::error!(cause = %e, "internal error in runner session");
    DispatchError::Internal("internal error in a runner session".into())
}

/// What the answer to a NextUnits echoes of it.
#[derive(Clone, Copy)]
struct Head {
    attempt_id: AttemptId,
    step_index: u32,
    request: u32,
}

impl Head {
    fn answer(self, reply: kiln_domain::split::UnitsReply) -> protocol::Units {
        protocol::Units {
            attempt_id: self.attempt_id,
            step_index: self.step_index,
            request: self.request,
            reply,
        }
    }
}

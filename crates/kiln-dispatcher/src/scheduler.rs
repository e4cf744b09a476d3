//! The background loop: assigns queued jobs to runners with a free slot and matching labels,
//! notices runners that stopped heartbeating, sends back to the queue the attempts whose runner
//! did not come back within the lease, and ends cancels that a runner never answered.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use kiln_domain::{AttemptId, BuildId, JobId, JobState, RunnerId, labels_match};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::{DispatchError, Dispatcher, LiveAttempt, error_chain, space};
use kiln_domain::protocol::{self, DispatcherMessage};

/// The longest the loop sleeps when nothing is due sooner. Every deadline it watches is set
/// with a kick or a rewake, so this is only a safety net.
const MAX_SLEEP: Duration = Duration::from_secs(30);
/// When the queue looked empty at the last scheduling round, a timer wake looks at the store
/// again only this often (a safety net for a queued job whose change did not kick the loop);
/// kicks schedule at once.
const RESCAN_EVERY: Duration = Duration::from_secs(10);
/// How often runners that never held work are looked for and forgotten.
const FORGET_EVERY: Duration = Duration::from_secs(60);
/// Queued jobs looked at per scheduling round.
const ROUND: u32 = 256;
/// Assignments made per store call (one commit with SQLite) within a round.
const ASSIGN_CHUNK: usize = 64;

/// Slots of session `sid` held by attempts, plus those the current round picked for it.
fn held_or_taken(st: &super::State, taken: &HashMap<u64, u64>, sid: u64) -> u64 {
    st.held(sid) + taken.get(&sid).copied().unwrap_or(0)
}

impl Dispatcher {
    /// Starts the scheduler and liveness loop; it stops when `shutdown` is cancelled.
    pub fn spawn_background(&self, shutdown: CancellationToken) -> JoinHandle<()> {
        // With PostgreSQL: the bus and the dispatchers' liveness round, beside this loop.
        self.spawn_cluster(shutdown.clone());
        let d = self.clone();
        tokio::spawn(
            async move {
                // An idle farm wakes this loop only when something is due (a runner's lease, an
                // orphan's, a cancel's or a job's deadline, a backoff ending); the store is asked for queued jobs only when kicked, when the last
                // round left jobs queued, or every RESCAN_EVERY.
                let mut last_scan = tokio::time::Instant::now();
                loop {
                    if d.inner.space.is_full() {
                        // Nothing can be written: no requeue, no assignment, no deadline
                        // acted on (a failed write must not leave memory and the store
                        // apart). Look at the space again in a while.
                        tokio::select! {
                            _ = shutdown.cancelled() => break,
                            _ = tokio::time::sleep(space::PROBE_EVERY) => {}
                        }
                        if !d.inner.space.recovered() {
                            continue;
                        }
                        d.resume_paused();
                    }
                    let wake = d.next_due(tokio::time::Instant::now() + MAX_SLEEP);
                    let kicked = tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = d.inner.kick.notified() => true,
                        _ = d.inner.rewake.notified() => continue,
                        _ = tokio::time::sleep_until(wake) => {
                            if let Err(e) = d.check_liveness().await {
                                tracing::error!(cause = %e, "liveness check failed");
                                // What failed is still due: try again in a while, not in a loop.
                                tokio::select! {
                                    _ = shutdown.cancelled() => break,
                                    _ = tokio::time::sleep(space::PROBE_EVERY) => {}
                                }
                            }
                            false
                        }
                    };
                    let now = tokio::time::Instant::now();
                    let due = kicked
                        || d.state().queue_seen
                        || now.duration_since(last_scan) >= RESCAN_EVERY;
                    if !due {
                        continue;
                    }
                    last_scan = now;
                    if let Err(e) = d.schedule().await {
                        tracing::error!(cause = %e, "scheduling round failed");
                    }
                }
            }
            .instrument(tracing::info_span!("scheduler")),
        )
    }

    /// The earliest time something in memory falls due (a session's lease, an attempt's orphan,
    /// cancel, job or step deadline, a backoff ending, forgetting idle runners), or `latest`.
    fn next_due(&self, latest: tokio::time::Instant) -> tokio::time::Instant {
        let lease = self.inner.config.lease();
        let st = self.state();
        let std_now = Instant::now();
        let tokio_now = tokio::time::Instant::now();
        // Deadlines kept as std instants, on the tokio clock (which tests may pause).
        let on_tokio = |t: Instant| tokio_now + t.saturating_duration_since(std_now);
        let mut due = latest;
        let mut consider = |t: tokio::time::Instant| due = due.min(t);
        for s in st.sessions.values() {
            consider(on_tokio(s.last_heartbeat + lease));
            if let Some(b) = s.backoff_until {
                consider(b);
            }
        }
        for a in st.attempts.values() {
            for t in [
                a.orphan_deadline,
                a.cancel_deadline,
                a.job_deadline,
                a.step_deadline,
            ]
            .into_iter()
            .flatten()
            {
                consider(on_tokio(t));
            }
        }
        if let Some(t) = st.last_forget {
            consider(on_tokio(t + FORGET_EVERY));
        }
        due
    }

    /// Declares silent runners lost, requeues expired orphans, forces unanswered cancels.
    pub(super) async fn check_liveness(&self) -> Result<(), DispatchError> {
        let now = Instant::now();
        let lease = self.inner.config.lease();
        let (expired, unanswered, overdue) = {
            let mut st = self.state();
            let silent: Vec<RunnerId> = st
                .sessions
                .iter()
                .filter(|(_, s)| now.duration_since(s.last_heartbeat) > lease)
                .map(|(id, _)| *id)
                .collect();
            for id in silent {
                if let Some(s) = st.sessions.remove(&id) {
                    self.detached(id);
                    tracing::warn!(runner = %s.name, "runner missed its heartbeats; declaring it lost");
                    s.stop.cancel();
                    let super::State { attempts, held, .. } = &mut *st;
                    for (id, a) in attempts.iter_mut() {
                        if a.session == Some(s.id) {
                            super::move_attempt(held, *id, a, None);
                            a.orphan_deadline = Some(now);
                        }
                    }
                }
            }
            let expired: Vec<AttemptId> = st
                .attempts
                .iter()
                .filter(|(_, a)| a.orphan_deadline.is_some_and(|d| d <= now))
                .map(|(id, _)| *id)
                .collect();
            let unanswered: Vec<(AttemptId, JobId)> = st
                .attempts
                .iter()
                .filter(|(_, a)| a.cancel_deadline.is_some_and(|d| d <= now))
                .map(|(id, a)| (*id, a.job_id))
                .collect();
            let overdue: Vec<(AttemptId, JobId)> = st
                .attempts
                .iter()
                .filter(|(_, a)| {
                    a.job_deadline.is_some_and(|d| d <= now)
                        || a.step_deadline.is_some_and(|d| d <= now)
                })
                .map(|(id, a)| (*id, a.job_id))
                .collect();
            (expired, unanswered, overdue)
        };
        let forget = {
            let mut st = self.state();
            let due = st
                .last_forget
                .is_none_or(|t| now.duration_since(t) >= FORGET_EVERY);
            if due {
                st.last_forget = Some(now);
            }
            due.then(|| st.sessions.keys().copied().collect::<Vec<_>>())
        };
        if let Some(attached) = forget {
            self.forget_idle_runners(&attached).await?;
            // The same cadence keeps the metrics' tally deltas few between scrapes.
            self.fold_tallies().await;
        }
        for (a, job) in overdue {
            tracing::warn!(
                attempt = %a,
                %job,
                "job ran past its deadline; the dispatcher ends it"
            );
            self.cancel_on_runner(a, "deadline exceeded");
            if let Some(ch) = self
                .db(move |s| {
                    s.end_job(
                        job,
                        JobState::TimedOut,
                        "the dispatcher ended the job: it ran past its deadline",
                    )
                })
                .await?
            {
                self.publish(&ch);
                self.kick();
            }
        }
        for a in expired {
            self.requeue(a, "runner lost").await?;
        }
        for (a, job) in unanswered {
            tracing::warn!(
                attempt = %a,
                %job,
                "runner did not confirm the cancel; ending the job"
            );
            // Out of memory only once the store has it (a failed write leaves both as they were).
            let ended = self
                .db(move |s| {
                    s.end_job(
                        job,
                        JobState::Cancelled,
                        "cancelled by user (runner did not confirm)",
                    )
                })
                .await?;
            self.state().remove_attempt(&a);
            if let Some(ch) = ended {
                self.publish(&ch);
            }
        }
        Ok(())
    }

    /// Forgets runners that never held work and were not seen for
    /// `Config::forget_idle_runners_after` (except `attached` ones).
    pub(super) async fn forget_idle_runners(
        &self,
        attached: &[RunnerId],
    ) -> Result<u64, DispatchError> {
        let after = self.inner.config.forget_idle_runners_after;
        let before = kiln_domain::now_millis().saturating_sub(after.as_millis() as i64);
        let keep = attached.to_vec();
        let n = self
            .db(move |s| s.forget_idle_runners(before, &keep))
            .await?;
        if n > 0 {
            tracing::info!(forgotten = n, "forgot runners that never held work");
        }
        Ok(n)
    }

    /// Sends an attempt's job back to the queue (or ends it errored after too many losses).
    pub(super) async fn requeue(
        &self,
        attempt: AttemptId,
        reason: &str,
    ) -> Result<(), DispatchError> {
        self.requeue_counted(attempt, reason, true).await
    }

    /// Like `requeue`; `counts` says whether this is a loss (runner gone) or a hand-back.
    pub(super) async fn requeue_counted(
        &self,
        attempt: AttemptId,
        reason: &str,
        counts: bool,
    ) -> Result<(), DispatchError> {
        let max = self.inner.config.max_lost_attempts;
        let why = reason.to_string();
        // Out of memory only once the store has it: a failed write (a full disk) leaves the
        // attempt in both, to be requeued when the store can be written again, never current
        // in the store with nothing in memory driving it.
        // With PostgreSQL, only while this dispatcher still owns it: one that lost it to another
        // (its runner re-attached there) just forgets it.
        let me = self.me();
        let requeued = self
            .db(move |s| s.requeue_owned(attempt, &why, max, counts, me))
            .await?;
        self.state().remove_attempt(&attempt);
        if let Some(ch) = requeued {
            tracing::info!(%attempt, job = %ch.job_id, state = %ch.job_state, reason, "attempt lost");
            if ch.job_state == kiln_domain::JobState::Queued {
                self.inner.metrics.requeued();
            }
            self.publish(&ch);
            self.kick();
        }
        Ok(())
    }

    /// One scheduling round: gives queued jobs, oldest first, to runners with free slots.
    ///
    /// The round first picks a runner for each job it can place (counting the slots the
    /// round already took), then makes the assignments in chunks of [`ASSIGN_CHUNK`], one
    /// store call each ([`kiln_store::Store::assign_many`]): with SQLite a chunk is one
    /// commit, one fsync, instead of one per assignment. Each chunk is durable before any of
    /// its assignments is sent.
    pub(super) async fn schedule(&self) -> Result<(), DispatchError> {
        if !self.any_free_slot(&HashMap::new()) {
            return Ok(());
        }
        let jobs = self.db(|s| s.queued_jobs(ROUND)).await?;
        // Jobs left queued (no matching runner, runners backing off) keep the loop looking.
        self.state().queue_seen = !jobs.is_empty();
        // Slots taken by this round's picks, per session, not yet held (not yet assigned).
        let mut taken: HashMap<u64, u64> = HashMap::new();
        let mut planned = Vec::new();
        for job in jobs {
            let Some((runner_id, runner_name, session_id)) = self.pick_runner(&job.labels, &taken)
            else {
                // No slot left anywhere: the rest of the round would look at every session
                // once per job for nothing.
                if !self.any_free_slot(&taken) {
                    break;
                }
                continue;
            };
            let owner = self.owner_for(runner_id, session_id);
            if self.inner.cluster.is_some() && owner.is_none() {
                // The session ended meanwhile: nobody here to own the attempt.
                continue;
            }
            *taken.entry(session_id).or_default() += 1;
            planned.push((job, runner_id, runner_name, session_id, owner));
        }
        let mut builds: HashMap<BuildId, kiln_domain::Build> = HashMap::new();
        while !planned.is_empty() {
            let rest = planned.split_off(planned.len().min(ASSIGN_CHUNK));
            let chunk = std::mem::replace(&mut planned, rest);
            // A chunk that failed ends the round (as one failed assignment did), after the
            // chunk's own assignments that were made have been sent.
            self.assign_chunk(chunk, &mut builds).await?;
        }
        Ok(())
    }

    /// Makes one chunk of a round's assignments (one store call) and sends them.
    async fn assign_chunk(
        &self,
        chunk: Vec<(
            kiln_domain::Job,
            RunnerId,
            String,
            u64,
            Option<kiln_store::Owner>,
        )>,
        builds: &mut HashMap<BuildId, kiln_domain::Build>,
    ) -> Result<(), DispatchError> {
        let requests: Vec<kiln_store::AssignRequest> = chunk
            .iter()
            .map(|(job, runner, name, _, owner)| kiln_store::AssignRequest {
                job: job.id,
                runner: *runner,
                runner_name: name.clone(),
                owner: owner.clone(),
            })
            .collect();
        // The builds' rows only (not their jobs): an assignment names its repository,
        // commit, branch and parameters. Read in the same blocking call, after the
        // assignments, in one read.
        let wanted: Vec<BuildId> = chunk.iter().map(|(job, ..)| job.build_id).collect();
        let known: std::collections::HashSet<BuildId> = builds.keys().copied().collect();
        let (results, fetched) = self
            .db(move |s| {
                let results = s.assign_many(&requests);
                let mut ids: Vec<BuildId> = results
                    .iter()
                    .zip(wanted)
                    .filter(|(r, id)| matches!(r, Ok(Some(_))) && !known.contains(id))
                    .map(|(_, id)| id)
                    .collect();
                ids.sort_unstable();
                ids.dedup();
                // Not `?`: the assignments are made, each must be sent or given back.
                let fetched = match s.get_build_records(&ids) {
                    Ok(builds) => builds,
                    Err(e) => {
                        tracing::error!(builds = ids.len(), cause = %error_chain(&e), "cannot read assigned jobs' builds");
                        Vec::new()
                    }
                };
                Ok((results, fetched))
            })
            .await?;
        builds.extend(fetched.into_iter().map(|b| (b.id, b)));
        let mut first_error = None;
        for ((job, runner_id, runner_name, session_id, _), result) in chunk.into_iter().zip(results)
        {
            let (attempt, change) = match result {
                Ok(Some(made)) => made,
                Ok(None) => continue,
                Err(e) => {
                    first_error.get_or_insert(self.store_error(e));
                    continue;
                }
            };
            let Some(build) = builds.get(&job.build_id).cloned() else {
                // Not expected (a job's build is never deleted, its read failed): give the job
                // back.
                if let Err(e) = self.requeue(attempt, "its build could not be read").await {
                    tracing::error!(cause = %error_chain(&e), "requeue failed");
                }
                first_error
                    .get_or_insert(DispatchError::NotFound(super::Missing::Build(job.build_id)));
                continue;
            };
            self.publish(&change);
            let assign = protocol::Assign {
                attempt_id: attempt,
                job_id: job.id,
                build_id: job.build_id,
                repo_url: build.repo.clone(),
                commit: build.commit.clone(),
                branch: build.branch.clone(),
                // The build's parameters win over the pipeline's `env`, which the plan put in
                // each step's env (the runner applies a step's env after the assignment's).
                steps: job
                    .steps
                    .iter()
                    .map(|s| {
                        let mut step = protocol::AssignedStep::from(s);
                        step.env.extend(build.params.clone());
                        step
                    })
                    .collect(),
                env: [
                    ("CI", "true".to_string()),
                    ("KILN", "true".to_string()),
                    ("KILN_BUILD_ID", job.build_id.to_string()),
                    ("KILN_JOB_ID", job.id.to_string()),
                    ("KILN_ATTEMPT_ID", attempt.to_string()),
                    ("KILN_REPO", build.repo.clone()),
                    ("KILN_COMMIT", build.commit.clone()),
                    ("KILN_BRANCH", build.branch.clone()),
                ]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
                trace_context: self
                    .inner
                    .traces
                    .assigned(&build, &job.name, attempt, &runner_name),
                attempt_number: job.attempts + 1,
                secrets: self
                    .inner
                    .config
                    .secrets
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
            };
            let sent = {
                let mut st = self.state();
                let tx = st
                    .sessions
                    .get(&runner_id)
                    .filter(|s| s.id == session_id)
                    .map(|s| (s.tx.clone(), s.secret_hash.clone()));
                match tx {
                    Some((tx, secret_hash)) => {
                        let mut live =
                            LiveAttempt::new(&job, runner_id, Some(session_id), &self.inner.config);
                        live.next_seq = Some(1);
                        live.assigned_at = Some(std::time::SystemTime::now());
                        live.secret_hash = Some(secret_hash);
                        st.insert_attempt(attempt, live);
                        tx.try_send(Ok(DispatcherMessage::Assign(assign))).is_ok()
                    }
                    None => false,
                }
            };
            if sent {
                tracing::info!(%attempt, job = %job.id, build = %job.build_id, runner = %runner_name, "assigned");
            } else if let Err(e) = self
                .requeue(attempt, "runner went away during assignment")
                .await
            {
                tracing::error!(cause = %error_chain(&e), "requeue failed");
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Whether any session takes work and has a slot free, beyond those `taken` by the
    /// current round's picks.
    fn any_free_slot(&self, taken: &HashMap<u64, u64>) -> bool {
        let st = self.state();
        debug_assert!(
            st.held_counts_agree(),
            "held slots out of step with the attempts"
        );
        let now = tokio::time::Instant::now();
        st.sessions
            .values()
            .any(|s| s.takes_work(now) && held_or_taken(&st, taken, s.id) < u64::from(s.slots))
    }

    /// The least loaded matching runner with a free slot (round robin among equals).
    /// `taken`: slots already picked in this round, per session, not yet held.
    fn pick_runner(
        &self,
        labels: &std::collections::BTreeMap<String, String>,
        taken: &HashMap<u64, u64>,
    ) -> Option<(RunnerId, String, u64)> {
        let mut st = self.state();
        debug_assert!(
            st.held_counts_agree(),
            "held slots out of step with the attempts"
        );
        let mut best: Option<(RunnerId, (u64, u64))> = None;
        let now = tokio::time::Instant::now();
        for (id, s) in &st.sessions {
            if !s.takes_work(now) || !labels_match(labels, &s.labels) {
                continue;
            }
            let used = held_or_taken(&st, taken, s.id);
            if used >= u64::from(s.slots) {
                continue;
            }
            // Fraction of slots used (scaled), then who got work least recently.
            let key = (used * 1000 / u64::from(s.slots.max(1)), s.last_assigned);
            if best.as_ref().is_none_or(|(_, k)| key < *k) {
                best = Some((*id, key));
            }
        }
        let (id, _) = best?;
        st.assign_counter += 1;
        let counter = st.assign_counter;
        let s = st.sessions.get_mut(&id)?;
        s.last_assigned = counter;
        Some((id, s.name.clone(), s.id))
    }
}

//! Several dispatchers on one PostgreSQL database: each one registers a row, refreshes it
//! every [`SEEN_EVERY`], adopts the attempts of dispatchers that stopped refreshing theirs,
//! and talks to the others over the store's [`kiln_store::Bus`] (events, log growth, cancels
//! and drains for runners it does not hold, attempts that moved).
//!
//! With SQLite there is one dispatcher and none of this runs (`Inner::cluster` is `None`).

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use kiln_domain::{AttemptId, BuildId, DispatcherId, Event, JobState, now_millis};
use kiln_store::{
    BuildFilter, BusMessage, BusReceiver, BusSender, DISPATCHER_LEASE_MS, Heard, Said,
};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::open_builds::OpenBuilds;
use super::{DispatchError, Dispatcher, LiveAttempt, error_chain};
use kiln_domain::protocol::{self, DispatcherMessage};

/// How often a dispatcher refreshes its row and looks for dead dispatchers' attempts.
pub(crate) const SEEN_EVERY: Duration = Duration::from_secs(1);

/// This dispatcher's place among the others.
pub(crate) struct Cluster {
    /// Its id (its row in `dispatchers`).
    pub(crate) me: DispatcherId,
    /// The database, for the bus's own connection.
    config: kiln_store::PgConfig,
    /// Sends on the bus, once it started (`spawn_background`).
    bus: OnceLock<BusSender>,
    /// Whether the bus listens (it said so once); for tests, which must not send before.
    listening: tokio::sync::watch::Sender<bool>,
    /// What this dispatcher's watchers were told of the builds that are not final, for the
    /// resync after a bus gap (`resync_watchers`).
    open: std::sync::Mutex<OpenBuilds>,
    /// When this dispatcher's row was last refreshed (`None` before the first round).
    last_seen: std::sync::Mutex<Option<Instant>>,
    /// Tests: how many of the next messages are lost on the way (a broken bus connection).
    #[cfg(test)]
    pub(crate) lose: std::sync::atomic::AtomicUsize,
    /// Tests: every message heard is lost while set.
    #[cfg(test)]
    pub(crate) deaf: std::sync::atomic::AtomicBool,
}

impl Cluster {
    pub(crate) fn new(me: DispatcherId, config: kiln_store::PgConfig) -> Self {
        Self {
            me,
            config,
            bus: OnceLock::new(),
            listening: tokio::sync::watch::Sender::new(false),
            open: std::sync::Mutex::default(),
            last_seen: std::sync::Mutex::new(Some(Instant::now())),
            #[cfg(test)]
            lose: std::sync::atomic::AtomicUsize::new(0),
            #[cfg(test)]
            deaf: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Tells the other dispatchers (dropped before the bus started).
    pub(crate) fn send(&self, said: Said) {
        #[cfg(test)]
        {
            use std::sync::atomic::Ordering;
            let lost = self
                .lose
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
            if lost.is_ok() {
                return;
            }
        }
        if let Some(bus) = self.bus.get() {
            bus.send(said);
        }
    }

    /// An event was told to this dispatcher's watchers.
    pub(crate) fn told(&self, event: &Event) {
        self.open().told(event);
    }

    fn open(&self) -> std::sync::MutexGuard<'_, OpenBuilds> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A job's log grew (coalesced by the bus).
    pub(crate) fn log(&self, job: kiln_domain::JobId, len: u64) {
        if let Some(bus) = self.bus.get() {
            bus.log(job, len);
        }
    }
}

/// The ids of the builds in `state` (any when `None`), newest first, down to (not including)
/// `after` when given; read in pages.
fn listed(
    s: &dyn kiln_store::Store,
    state: Option<JobState>,
    after: Option<BuildId>,
) -> Result<Vec<BuildId>, kiln_store::StoreError> {
    const PAGE: u32 = 1000;
    let mut out = Vec::new();
    let mut before = None;
    loop {
        let page = s.list_builds(&BuildFilter {
            state,
            before,
            limit: PAGE,
            ..BuildFilter::default()
        })?;
        for b in &page {
            if after.is_some_and(|a| b.id <= a) {
                return Ok(out);
            }
            out.push(b.id);
        }
        match page.last() {
            Some(last) if page.len() == PAGE as usize => before = Some(last.id),
            _ => return Ok(out),
        }
    }
}

/// The earliest `seen_at` of a dispatcher that counts as alive now.
pub(crate) fn alive_since() -> kiln_domain::Millis {
    now_millis() - DISPATCHER_LEASE_MS
}

/// A name for this process in `dispatchers`: host and process id.
pub(crate) fn process_name() -> String {
    let host = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "unknown".into());
    format!("{host}:{}", std::process::id())
}

impl Dispatcher {
    /// Waits until the bus listens (tests: a message sent before is not heard).
    #[cfg(test)]
    pub(crate) async fn bus_listening(&self) {
        if let Some(c) = &self.inner.cluster {
            let mut rx = c.listening.subscribe();
            let _ = rx.wait_for(|l| *l).await;
        }
    }

    /// Starts the bus and the liveness round (with PostgreSQL; nothing with SQLite).
    pub(crate) fn spawn_cluster(&self, shutdown: CancellationToken) -> Option<JoinHandle<()>> {
        let cluster = self.inner.cluster.as_ref()?;
        let (sender, receiver) = kiln_store::Bus::start(cluster.config.clone(), cluster.me);
        // Set once: a second `spawn_background` gets a bus that nobody sends on.
        let _ = cluster.bus.set(sender);
        let d = self.clone();
        Some(tokio::spawn(
            async move { d.cluster_loop(receiver, shutdown).await }
                .instrument(tracing::info_span!("cluster")),
        ))
    }

    async fn cluster_loop(self, mut heard: BusReceiver, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(SEEN_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                h = heard.recv() => match h {
                    Some(Heard::Message(m)) => self.on_bus(m).await,
                    Some(Heard::MayHaveMissed) => {
                        if let Some(c) = &self.inner.cluster {
                            c.listening.send_replace(true);
                        }
                        // Queued jobs, ended jobs: the scheduler's round re-reads the store.
                        self.kick();
                        // Log growth and ends of jobs run elsewhere: read from the store.
                        self.resync_followers().await;
                        // State changes made elsewhere: watchers are told what they missed.
                        self.resync_watchers().await;
                    }
                    None => return,
                },
                _ = tick.tick() => {
                    if let Err(e) = self.liveness_round().await {
                        tracing::error!(cause = %error_chain(&e), "cluster liveness round failed");
                    }
                }
            }
        }
    }

    /// Refreshes this dispatcher's row and adopts the attempts of dead dispatchers: they wait
    /// one lease (at least 10 s) for their runners to re-attach here or anywhere.
    pub(crate) async fn liveness_round(&self) -> Result<(), DispatchError> {
        let Some(cluster) = self.inner.cluster.as_ref() else {
            return Ok(());
        };
        let me = cluster.me;
        let now = now_millis();
        let listed = self.db(move |s| s.dispatcher_seen(me, now)).await?;
        if !listed {
            tracing::error!(dispatcher = %me, "this dispatcher's row is gone (it was taken for dead); its attempts went to others");
        }
        let gap = {
            let mut last = cluster.last_seen.lock().unwrap_or_else(|p| p.into_inner());
            let gap = last
                .is_none_or(|t| t.elapsed() >= Duration::from_millis(DISPATCHER_LEASE_MS as u64));
            *last = Some(Instant::now());
            gap
        };
        if gap {
            // Others may have taken this one for dead (it could not reach the database, or
            // was paused) and adopted its attempts.
            self.reconcile_owners().await?;
        }
        self.adopt(now - DISPATCHER_LEASE_MS).await
    }

    /// Adopts the attempts of dispatchers not seen since `dead_before` (see `liveness_round`).
    pub(crate) async fn adopt(
        &self,
        dead_before: kiln_domain::Millis,
    ) -> Result<(), DispatchError> {
        let Some(me) = self.me() else {
            return Ok(());
        };
        let adopted = self
            .db(move |s| {
                let mut out = Vec::new();
                for a in s.adopt_attempts(me, dead_before)? {
                    let hash = s.owned_attempt(a.id)?.and_then(|o| o.secret_hash);
                    if let Some(job) = s.get_job(a.job_id)? {
                        out.push((a, job, hash));
                    }
                }
                Ok(out)
            })
            .await?;
        if adopted.is_empty() {
            return Ok(());
        }
        tracing::info!(
            attempts = adopted.len(),
            "adopted the attempts of a dead dispatcher; waiting for their runners to re-attach"
        );
        let deadline = Instant::now() + self.inner.config.lease().max(Duration::from_secs(10));
        {
            let mut st = self.state();
            for (a, job, hash) in adopted {
                if !st.attempts.contains_key(&a.id) {
                    let mut live = LiveAttempt::new(&job, a.runner_id, None, &self.inner.config);
                    live.orphan_deadline = Some(deadline);
                    live.secret_hash = hash;
                    st.insert_attempt(a.id, live);
                }
            }
        }
        self.deadlines_changed();
        Ok(())
    }

    /// After this dispatcher was away from the database for a lease: each attempt in memory
    /// that another dispatcher adopted meanwhile is claimed back when its runner is still
    /// attached here (the old owner is told `Moved`), and forgotten otherwise.
    async fn reconcile_owners(&self) -> Result<(), DispatchError> {
        let Some(me) = self.me() else {
            return Ok(());
        };
        let held: Vec<(AttemptId, kiln_domain::RunnerId, bool, Option<String>)> = self
            .state()
            .attempts
            .iter()
            .map(|(a, l)| (*a, l.runner_id, l.session.is_some(), l.secret_hash.clone()))
            .collect();
        if held.is_empty() {
            return Ok(());
        }
        let outcome = self
            .db(move |s| {
                let mut out = Vec::new();
                for (a, runner, attached, hash) in held {
                    let Some(o) = s.owned_attempt(a)? else {
                        continue;
                    };
                    if !o.current || o.owner == Some(me) {
                        continue;
                    }
                    let to = kiln_store::Owner {
                        dispatcher: me,
                        secret_hash: hash.or(o.secret_hash).unwrap_or_default(),
                    };
                    let back = attached && s.claim_attempt(a, runner, o.owner, &to)?;
                    out.push((a, back));
                }
                Ok(out)
            })
            .await?;
        for (a, back) in outcome {
            if back {
                tracing::info!(attempt = %a, "claimed back an attempt adopted while this dispatcher was away");
                if let Some(c) = &self.inner.cluster {
                    c.send(Said::Moved { attempt: a, to: me });
                }
            } else {
                tracing::info!(attempt = %a, "another dispatcher adopted this attempt while this one was away");
                self.state().remove_attempt(&a);
            }
        }
        Ok(())
    }

    /// Makes the next liveness round act as after an absence (tests).
    #[cfg(test)]
    pub(crate) fn forget_last_seen(&self) {
        if let Some(c) = &self.inner.cluster {
            *c.last_seen.lock().unwrap_or_else(|p| p.into_inner()) = None;
        }
    }

    /// After the bus may have lost messages: this dispatcher's log followers learn each
    /// followed job's stored length, and whether it ended, from the store.
    pub(crate) async fn resync_followers(&self) {
        for job in self.inner.hub.followed() {
            match self.db(move |s| s.get_job(job)).await {
                Ok(Some(j)) if j.state.is_final() => self.settle_follow(job, j.state).await,
                Ok(_) => self.advance_to_stored(job).await,
                Err(e) => {
                    tracing::warn!(%job, cause = %error_chain(&e), "cannot read a followed job")
                }
            }
        }
    }

    /// After the bus may have lost messages: this dispatcher's watchers (`WatchBuilds`, the
    /// web page's `/events`, the notifier) are told, from the store, every state they missed
    /// of the builds that were open (and of builds created since the newest known): one
    /// event per job whose state is not the one last told, then the build's. At the bus's
    /// first listen (the dispatcher's start) it only notes the open builds and the newest.
    pub(crate) async fn resync_watchers(&self) {
        let Some(c) = &self.inner.cluster else {
            return;
        };
        if !c.open().seeded() {
            let seed = self
                .db(|s| {
                    let newest = s
                        .list_builds(&BuildFilter {
                            limit: 1,
                            ..BuildFilter::default()
                        })?
                        .first()
                        .map_or(BuildId::new(0), |b| b.id);
                    let mut open = Vec::new();
                    for state in [JobState::Queued, JobState::Assigned, JobState::Running] {
                        open.extend(listed(s, Some(state), None)?);
                    }
                    Ok((open, newest))
                })
                .await;
            match seed {
                Ok((open, newest)) => c.open().seed(open, newest),
                Err(e) => tracing::warn!(cause = %error_chain(&e), "cannot list the open builds"),
            }
            return;
        }
        let (open, newest, since) = c.open().to_check();
        let read = self
            .db(move |s| {
                let mut ids = open;
                if newest.is_some() {
                    ids.extend(listed(s, None, newest)?);
                }
                ids.sort_unstable();
                ids.dedup();
                let mut out = Vec::with_capacity(ids.len());
                for id in ids {
                    out.push((id, s.get_build(id)?));
                }
                Ok(out)
            })
            .await;
        let read = match read {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(cause = %error_chain(&e), "cannot re-read the open builds");
                return;
            }
        };
        let missed: Vec<Event> = {
            let mut o = c.open();
            read.iter()
                .flat_map(|(id, d)| o.missed(*id, d.as_ref(), since))
                .collect()
        };
        if !missed.is_empty() {
            tracing::info!(
                events = missed.len(),
                "told watchers the state changes the bus may have lost"
            );
        }
        for e in missed {
            let _ = self.inner.events.send(e);
        }
    }

    /// Another dispatcher's message.
    async fn on_bus(&self, m: BusMessage) {
        #[cfg(test)]
        if self
            .inner
            .cluster
            .as_ref()
            .is_some_and(|c| c.deaf.load(std::sync::atomic::Ordering::SeqCst))
        {
            return;
        }
        match m.said {
            Said::Event { event } => self.on_remote_event(event),
            Said::Log { job, len } => self.inner.hub.advance(job, len),
            Said::Cancel {
                attempt,
                grace_ms,
                reason,
            } => {
                let job = self.state().attempts.get(&attempt).map(|a| a.job_id);
                if let Some(job) = job {
                    let grace = Duration::from_millis(grace_ms);
                    if let Err(e) = self.cancel_attempt(job, attempt, grace, &reason).await {
                        tracing::error!(%attempt, cause = %error_chain(&e), "cancel failed");
                    }
                }
            }
            Said::Drain { runner } => {
                if self.drain_local(&runner) {
                    tracing::info!(runner = %runner, from = %m.from, "draining runner for another dispatcher");
                }
            }
            Said::Moved { attempt, to } => self.moved(attempt, to),
        }
    }

    /// Another dispatcher's state change: for this one's watchers, followers and scheduler.
    fn on_remote_event(&self, event: Event) {
        let (job, state) = (event.job_id, event.state);
        if let Some(c) = &self.inner.cluster {
            c.told(&event);
        }
        let _ = self.inner.events.send(event);
        if let Some(job) = job
            && state.is_final()
        {
            // Its followers here end at the log's stored length (the bus's growth messages
            // are coalesced and may not have told this hub of the job's last output yet).
            self.job_ended(job, state);
        }
        // A job became queued (a new build, a lost runner) or ended (its dependents may be
        // ready): this dispatcher's runners may take it.
        if state == JobState::Queued || state.is_final() {
            self.kick();
        }
    }

    /// `to` took `attempt` (its runner re-attached there): it is no longer this one's.
    pub(crate) fn moved(&self, attempt: AttemptId, to: DispatcherId) {
        if self.inner.cluster.as_ref().is_some_and(|c| c.me == to) {
            return;
        }
        if self.state().remove_attempt(&attempt).is_some() {
            tracing::info!(%attempt, to = %to, "attempt moved to another dispatcher");
        }
    }

    /// Drains the runner of this name if its stream is here. False when it is not.
    pub(crate) fn drain_local(&self, name: &str) -> bool {
        let mut st = self.state();
        match st.sessions.values_mut().find(|s| s.name == name) {
            Some(s) => {
                s.draining = true;
                let _ = s.tx.try_send(Ok(DispatcherMessage::Drain(protocol::Drain {
                    reason: "drained by an administrator".into(),
                })));
                true
            }
            None => false,
        }
    }
}

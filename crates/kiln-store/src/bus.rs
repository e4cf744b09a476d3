//! The dispatchers' bus: PostgreSQL's `LISTEN`/`NOTIFY` on channel `kiln`, so dispatchers
//! sharing one database tell each other what changed without polling and without talking to
//! each other directly.
//!
//! - One dedicated `tokio-postgres` connection per dispatcher (not from the store's pool: a
//!   pooled connection would be handed to others and its `LISTEN` lost) listens on `kiln` and
//!   sends with `pg_notify('kiln', json)`. It reconnects with backoff; after reconnecting it
//!   says [`Heard::MayHaveMissed`] (notifications sent while it was away are gone).
//! - Messages are JSON ([`BusMessage`]); each names the dispatcher that sent it, and a
//!   dispatcher skips its own.
//! - Best effort, at most once: a message is lost when a connection breaks, and a sender does
//!   not wait for anyone. Whoever reads the bus keeps a safety net that re-reads the store.
//! - A job's log growth ([`BusSender::log`]) is coalesced: at most one message per job about
//!   every [`LOG_EVERY`], carrying the latest length.
//!
//! The dispatcher sees only [`BusSender`] and [`BusReceiver`]: no PostgreSQL type.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kiln_domain::{AttemptId, DispatcherId, Event, JobId};
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, mpsc};
use tokio_postgres::{AsyncMessage, NoTls};

use crate::PgConfig;

/// The channel every dispatcher listens on.
pub const CHANNEL: &str = "kiln";
/// A job's log growth is sent at most this often (the latest length).
pub const LOG_EVERY: Duration = Duration::from_millis(50);
/// Messages waiting to be sent, at most (more are dropped: the bus is best effort).
const OUTBOX: usize = 4096;
/// Messages heard and not yet read, at most (more are dropped, and the reader is told it may
/// have missed some).
const INBOX: usize = 4096;
/// The longest wait between two connection tries.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// One message on the bus.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BusMessage {
    /// The dispatcher that sent it.
    pub from: DispatcherId,
    /// What it says.
    #[serde(flatten)]
    pub said: Said,
}

/// What a dispatcher tells the others.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Said {
    /// A state change (re-emitted by each receiver to its own watchers).
    Event {
        /// The change.
        event: Event,
    },
    /// A job's log grew to `len` bytes.
    Log {
        /// The job.
        job: JobId,
        /// Its log's length.
        len: u64,
    },
    /// For the owner of `attempt`: tell its runner to stop it.
    Cancel {
        /// The attempt.
        attempt: AttemptId,
        /// Time between SIGTERM and SIGKILL.
        grace_ms: u64,
        /// Why.
        reason: String,
    },
    /// For the dispatcher holding the stream of the runner named `runner`: drain it.
    Drain {
        /// The runner's name.
        runner: String,
    },
    /// `to` took `attempt` (its runner re-attached there): whoever had it drops it.
    Moved {
        /// The attempt.
        attempt: AttemptId,
        /// Its new owner.
        to: DispatcherId,
    },
}

/// What the bus hands its reader.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Heard {
    /// Another dispatcher's message.
    Message(BusMessage),
    /// The bus (re)started listening (it was away, or had just started), or its reader fell
    /// behind: messages may have been lost, re-read what matters from the store. Said once
    /// the bus listens, so what is sent after it is heard.
    MayHaveMissed,
}

/// Sends on the bus; cheap to clone, never waits.
#[derive(Clone)]
pub struct BusSender {
    out: mpsc::Sender<Said>,
    logs: Arc<Mutex<HashMap<JobId, u64>>>,
    logs_ready: Arc<Notify>,
}

impl std::fmt::Debug for BusSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BusSender").finish_non_exhaustive()
    }
}

impl BusSender {
    /// Sends a message (dropped if too many wait: the bus is best effort).
    pub fn send(&self, said: Said) {
        if let Err(e) = self.out.try_send(said) {
            tracing::debug!(cause = %e, "bus message dropped");
        }
    }

    /// A job's log grew to `len`: sent within [`LOG_EVERY`], coalesced with later growth.
    pub fn log(&self, job: JobId, len: u64) {
        let was_empty = {
            let mut logs = self.logs.lock().unwrap_or_else(|p| p.into_inner());
            let was_empty = logs.is_empty();
            let at = logs.entry(job).or_insert(0);
            *at = (*at).max(len);
            was_empty
        };
        if was_empty {
            self.logs_ready.notify_one();
        }
    }
}

/// Reads the bus.
#[derive(Debug)]
pub struct BusReceiver {
    rx: mpsc::Receiver<Heard>,
}

impl BusReceiver {
    /// The next thing heard; `None` once the bus stopped.
    pub async fn recv(&mut self) -> Option<Heard> {
        self.rx.recv().await
    }
}

/// Starts buses.
#[derive(Debug)]
pub struct Bus;

impl Bus {
    /// Starts the bus of dispatcher `me` on the current tokio runtime: its connection task
    /// runs until the receiver is dropped.
    pub fn start(config: PgConfig, me: DispatcherId) -> (BusSender, BusReceiver) {
        let (out_tx, out_rx) = mpsc::channel(OUTBOX);
        let (in_tx, in_rx) = mpsc::channel(INBOX);
        let logs = Arc::new(Mutex::new(HashMap::new()));
        let logs_ready = Arc::new(Notify::new());
        let sender = BusSender {
            out: out_tx,
            logs: logs.clone(),
            logs_ready: logs_ready.clone(),
        };
        let mut config = config;
        config.application_name(format!("kiln-bus-{me}"));
        // A connection that only listens notices a silent network only through TCP
        // keepalives: find a dead one within about 20 s, not the system's two hours.
        config
            .keepalives(true)
            .keepalives_idle(Duration::from_secs(5))
            .keepalives_interval(Duration::from_secs(5))
            .keepalives_retries(3);
        let task = Task {
            config,
            me,
            out: out_rx,
            logs,
            logs_ready,
            heard: in_tx,
            missed: false,
        };
        tokio::spawn(task.run());
        (sender, BusReceiver { rx: in_rx })
    }
}

/// The bus's connection task.
struct Task {
    config: PgConfig,
    me: DispatcherId,
    out: mpsc::Receiver<Said>,
    logs: Arc<Mutex<HashMap<JobId, u64>>>,
    logs_ready: Arc<Notify>,
    heard: mpsc::Sender<Heard>,
    /// Something was dropped (the reader fell behind): say so when there is room.
    missed: bool,
}

/// Why one connection's loop ended.
enum Ended {
    /// The reader is gone: stop.
    Stop,
    /// The connection broke: connect again.
    Broken,
}

impl Task {
    async fn run(mut self) {
        let mut backoff = Duration::from_millis(100);
        let mut connected_before = false;
        loop {
            let ended = match self.config.connect(NoTls).await {
                Ok((client, connection)) => {
                    backoff = Duration::from_millis(100);
                    let ended = self.connected(client, connection, connected_before).await;
                    connected_before = true;
                    ended
                }
                Err(e) => {
                    tracing::warn!(cause = %crate::pg::chain(&e), "bus: cannot connect");
                    Ended::Broken
                }
            };
            if matches!(ended, Ended::Stop) {
                return;
            }
            tokio::select! {
                _ = self.heard.closed() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// Listens and sends on one connection until it breaks or the reader is gone.
    async fn connected(
        &mut self,
        client: tokio_postgres::Client,
        mut connection: tokio_postgres::Connection<
            tokio_postgres::Socket,
            tokio_postgres::tls::NoTlsStream,
        >,
        reconnected: bool,
    ) -> Ended {
        // The connection is driven by its own task, which forwards notifications.
        let (note_tx, mut notes) = mpsc::channel::<String>(INBOX);
        let driver = tokio::spawn(async move {
            loop {
                match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                    Some(Ok(AsyncMessage::Notification(n))) => {
                        if note_tx.send(n.payload().to_string()).await.is_err() {
                            return;
                        }
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => {
                        tracing::warn!(cause = %crate::pg::chain(&e), "bus: connection broke");
                        return;
                    }
                    None => return,
                }
            }
        });
        let ended = self.serve(&client, &mut notes, reconnected).await;
        driver.abort();
        ended
    }

    async fn serve(
        &mut self,
        client: &tokio_postgres::Client,
        notes: &mut mpsc::Receiver<String>,
        reconnected: bool,
    ) -> Ended {
        if let Err(e) = client.batch_execute(&format!("LISTEN {CHANNEL}")).await {
            tracing::warn!(cause = %crate::pg::chain(&e), "bus: cannot listen");
            return Ended::Broken;
        }
        if reconnected {
            tracing::info!("bus: reconnected; messages sent meanwhile may be lost");
        }
        // Listening from now on: whatever was sent before is not heard.
        self.missed = true;
        self.say_missed();
        let mut flush_at: Option<tokio::time::Instant> = None;
        loop {
            tokio::select! {
                _ = self.heard.closed() => return Ended::Stop,
                note = notes.recv() => match note {
                    Some(payload) => self.heard(&payload),
                    None => return Ended::Broken,
                },
                said = self.out.recv() => match said {
                    Some(said) => {
                        if !self.notify(client, said).await {
                            return Ended::Broken;
                        }
                    }
                    // Every sender is gone: the dispatcher stopped.
                    None => return Ended::Stop,
                },
                _ = self.logs_ready.notified(), if flush_at.is_none() => {
                    flush_at = Some(tokio::time::Instant::now() + LOG_EVERY);
                }
                _ = sleep_until_opt(flush_at), if flush_at.is_some() => {
                    flush_at = None;
                    let pending: Vec<(JobId, u64)> = std::mem::take(
                        &mut *self.logs.lock().unwrap_or_else(|p| p.into_inner()),
                    )
                    .into_iter()
                    .collect();
                    for (job, len) in pending {
                        if !self.notify(client, Said::Log { job, len }).await {
                            return Ended::Broken;
                        }
                    }
                }
            }
        }
    }

    /// Sends one message; false when the connection broke (the message is lost).
    async fn notify(&self, client: &tokio_postgres::Client, said: Said) -> bool {
        let m = BusMessage {
            from: self.me,
            said,
        };
        let json = match serde_json::to_string(&m) {
            Ok(j) => j,
            Err(e) => {
                tracing::error!(cause = %e, "bus: cannot encode a message");
                return true;
            }
        };
        match client
            .execute("SELECT pg_notify($1, $2)", &[&CHANNEL, &json])
            .await
        {
            Ok(_) => true,
            Err(e) => {
                tracing::warn!(cause = %crate::pg::chain(&e), "bus: cannot send");
                false
            }
        }
    }

    /// A notification arrived: hands it to the reader unless it is this dispatcher's own.
    fn heard(&mut self, payload: &str) {
        let m: BusMessage = match serde_json::from_str(payload) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(cause = %e, "bus: a message this kiln cannot read");
                return;
            }
        };
        if m.from == self.me {
            return;
        }
        self.say_missed();
        if self.missed || self.heard.try_send(Heard::Message(m)).is_err() {
            self.missed = true;
        }
    }

    /// Tells the reader it may have missed messages, if it did and there is room.
    fn say_missed(&mut self) {
        if self.missed && self.heard.try_send(Heard::MayHaveMissed).is_ok() {
            self.missed = false;
        }
    }
}

async fn sleep_until_opt(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use kiln_domain::{BuildId, JobState};

    /// Waits for the next thing heard, at most 10 s.
    async fn next(rx: &mut BusReceiver) -> Heard {
        tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("heard within 10 s")
            .expect("the bus runs")
    }

    /// The next message (skipping "may have missed").
    async fn next_message(rx: &mut BusReceiver) -> BusMessage {
        loop {
            if let Heard::Message(m) = next(rx).await {
                return m;
            }
        }
    }

    fn config(url: &str) -> PgConfig {
        url.parse().unwrap()
    }

    fn event(build: u64) -> Said {
        Said::Event {
            event: Event {
                build_id: BuildId::new(build),
                job_id: None,
                state: JobState::Queued,
                at: 1,
            },
        }
    }

    #[tokio::test]
    async fn dispatchers_hear_each_other_but_not_themselves() {
        let url = kiln_pgtest::database().expect("a throwaway PostgreSQL database");
        let (a_id, b_id) = (DispatcherId::new(1), DispatcherId::new(2));
        let (a, mut a_rx) = Bus::start(config(&url), a_id);
        let (b, mut b_rx) = Bus::start(config(&url), b_id);
        // Both listen once they say so.
        assert_eq!(next(&mut a_rx).await, Heard::MayHaveMissed);
        assert_eq!(next(&mut b_rx).await, Heard::MayHaveMissed);
        a.send(event(7));
        let m = next_message(&mut b_rx).await;
        assert_eq!(m.from, a_id);
        assert_eq!(m.said, event(7));
        b.send(Said::Moved {
            attempt: AttemptId::new(3),
            to: b_id,
        });
        // A hears B's message, and never its own (sent before it).
        let m = next_message(&mut a_rx).await;
        assert_eq!(
            m,
            BusMessage {
                from: b_id,
                said: Said::Moved {
                    attempt: AttemptId::new(3),
                    to: b_id
                }
            }
        );
        // Every kind survives the trip as JSON.
        for said in [
            Said::Cancel {
                attempt: AttemptId::new(4),
                grace_ms: 100,
                reason: "cancelled by user".into(),
            },
            Said::Drain {
                runner: "r-1".into(),
            },
        ] {
            a.send(said.clone());
            assert_eq!(next_message(&mut b_rx).await.said, said);
        }
    }

    #[tokio::test]
    async fn log_growth_is_coalesced_per_job() {
        let url = kiln_pgtest::database().expect("a throwaway PostgreSQL database");
        let (a, mut a_rx) = Bus::start(config(&url), DispatcherId::new(1));
        let (_b, mut b_rx) = Bus::start(config(&url), DispatcherId::new(2));
        assert_eq!(next(&mut a_rx).await, Heard::MayHaveMissed);
        assert_eq!(next(&mut b_rx).await, Heard::MayHaveMissed);
        let (j1, j2) = (JobId::new(1), JobId::new(2));
        for len in [10, 20, 30] {
            a.log(j1, len);
        }
        a.log(j2, 5);
        let mut got = vec![next_message(&mut b_rx).await.said];
        got.push(next_message(&mut b_rx).await.said);
        got.sort_by_key(|s| match s {
            Said::Log { job, .. } => *job,
            _ => JobId::new(0),
        });
        assert_eq!(
            got,
            vec![
                Said::Log { job: j1, len: 30 },
                Said::Log { job: j2, len: 5 }
            ]
        );
        // Later growth is sent again.
        a.log(j1, 40);
        assert_eq!(
            next_message(&mut b_rx).await.said,
            Said::Log { job: j1, len: 40 }
        );
    }

    #[tokio::test]
    async fn a_broken_connection_reconnects_and_says_it_may_have_missed_messages() {
        let url = kiln_pgtest::database().expect("a throwaway PostgreSQL database");
        let a_id = DispatcherId::new(1);
        let (_a, mut a_rx) = Bus::start(config(&url), a_id);
        let (b, mut b_rx) = Bus::start(config(&url), DispatcherId::new(2));
        assert_eq!(next(&mut a_rx).await, Heard::MayHaveMissed);
        assert_eq!(next(&mut b_rx).await, Heard::MayHaveMissed);
        // Cut A's connection from the server's side.
        let (client, connection) = config(&url).connect(NoTls).await.unwrap();
        tokio::spawn(connection);
        let cut = client
            .execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                 WHERE application_name = $1 AND datname = current_database()",
                &[&format!("kiln-bus-{a_id}")],
            )
            .await
            .unwrap();
        assert_eq!(cut, 1);
        assert_eq!(next(&mut a_rx).await, Heard::MayHaveMissed);
        b.send(event(9));
        assert_eq!(next_message(&mut a_rx).await.said, event(9));
    }
}

//! Messages about attempts, kept in order until the dispatcher acknowledges them.
//!
//! Output chunks leave when an `OutputAck` covers their sequence number; everything else about
//! an attempt leaves when its final result is acknowledged (or refused). A new session's
//! writer starts from the oldest entry, so nothing unacknowledged is lost across reconnects.

use std::collections::{BTreeSet, VecDeque};
use std::sync::{Mutex, MutexGuard};

use kiln_domain::AttemptId;
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;

use crate::proto;

/// One message waiting for its acknowledgement.
struct Entry {
    /// Position in the outbox (increasing).
    id: u64,
    /// The attempt it is about.
    attempt: AttemptId,
    /// For output chunks, the sequence number an ack must cover.
    seq: Option<u64>,
    /// The message.
    msg: proto::RunnerMessage,
    /// Payload bytes counted against the limit.
    bytes: usize,
}

#[derive(Default)]
struct Inner {
    entries: VecDeque<Entry>,
    next_id: u64,
    bytes: usize,
}

/// The runner's outbox.
pub(crate) struct Outbox {
    inner: Mutex<Inner>,
    /// Wakes the writer.
    to_send: Notify,
    /// Wakes producers waiting for room.
    space: Notify,
    /// Wakes the session loop (something finished or changed).
    wake: Notify,
    /// Most payload bytes kept.
    max_bytes: usize,
}

impl Outbox {
    pub(crate) fn new(max_bytes: usize) -> Self {
        Self {
            inner: Mutex::new(Inner::default()),
            to_send: Notify::new(),
            space: Notify::new(),
            wake: Notify::new(),
            max_bytes,
        }
    }

    fn inner(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn insert(
        inner: &mut Inner,
        attempt: AttemptId,
        seq: Option<u64>,
        msg: proto::RunnerMessage,
        bytes: usize,
    ) {
        inner.next_id += 1;
        let id = inner.next_id;
        inner.bytes += bytes;
        inner.entries.push_back(Entry {
            id,
            attempt,
            seq,
            msg,
            bytes,
        });
    }

    /// Queues a small message (never waits).
    pub(crate) fn push(&self, attempt: AttemptId, msg: proto::RunnerMessage) {
        Self::insert(&mut self.inner(), attempt, None, msg, 0);
        self.to_send.notify_one();
        self.wake.notify_waiters();
    }

    /// Queues an output chunk, waiting while the outbox is full.
    pub(crate) async fn push_output(
        &self,
        attempt: AttemptId,
        seq: u64,
        msg: proto::RunnerMessage,
        bytes: usize,
    ) {
        loop {
            let notified = self.space.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut inner = self.inner();
                if inner.bytes + bytes <= self.max_bytes || inner.bytes == 0 {
                    Self::insert(&mut inner, attempt, Some(seq), msg, bytes);
                    break;
                }
            }
            notified.await;
        }
        self.to_send.notify_one();
    }

    /// Output of `attempt` up to `up_to` is stored by the dispatcher.
    pub(crate) fn ack_output(&self, attempt: AttemptId, up_to: u64) {
        let mut inner = self.inner();
        let mut freed = 0;
        inner.entries.retain(|e| {
            let acked = e.attempt == attempt && e.seq.is_some_and(|s| s <= up_to);
            if acked {
                freed += e.bytes;
            }
            !acked
        });
        inner.bytes -= freed;
        drop(inner);
        if freed > 0 {
            self.space.notify_waiters();
        }
    }

    /// Forgets everything about an attempt (its result was acknowledged or refused).
    pub(crate) fn drop_attempt(&self, attempt: AttemptId) {
        let mut inner = self.inner();
        let mut freed = 0;
        inner.entries.retain(|e| {
            if e.attempt == attempt {
                freed += e.bytes;
            }
            e.attempt != attempt
        });
        inner.bytes -= freed;
        drop(inner);
        self.space.notify_waiters();
        self.wake.notify_waiters();
    }

    /// Attempts with unacknowledged messages.
    pub(crate) fn attempts(&self) -> BTreeSet<AttemptId> {
        self.inner().entries.iter().map(|e| e.attempt).collect()
    }

    /// Wakes the session loop.
    pub(crate) fn wake(&self) {
        self.wake.notify_waiters();
    }

    /// Resolves when something changed.
    pub(crate) async fn changed(&self) {
        self.wake.notified().await;
    }

    /// Sends every entry, oldest first, then new ones as they come, until `stop`.
    pub(crate) async fn pump(
        &self,
        tx: &mpsc::Sender<proto::RunnerMessage>,
        stop: &CancellationToken,
    ) {
        let mut cursor = 0u64;
        loop {
            let batch: Vec<(u64, proto::RunnerMessage)> = {
                let inner = self.inner();
                inner
                    .entries
                    .iter()
                    .filter(|e| e.id > cursor)
                    .take(64)
                    .map(|e| (e.id, e.msg.clone()))
                    .collect()
            };
            if batch.is_empty() {
                tokio::select! {
                    _ = self.to_send.notified() => continue,
                    _ = stop.cancelled() => return,
                }
            }
            for (id, msg) in batch {
                tokio::select! {
                    r = tx.send(msg) => if r.is_err() { return },
                    _ = stop.cancelled() => return,
                }
                cursor = id;
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::proto::runner_message::Kind;

    fn chunk(attempt: u64, seq: u64) -> proto::RunnerMessage {
        proto::RunnerMessage {
            kind: Some(Kind::Output(proto::OutputChunk {
                attempt_id: attempt,
                seq,
                step_index: 0,
                stream: 1,
                data: vec![b'x'; 10].into(),
            })),
        }
    }

    #[tokio::test]
    async fn unacked_output_is_sent_again_by_a_new_writer() {
        let outbox = Outbox::new(1000);
        for seq in 1..=3 {
            outbox.push_output(7, seq, chunk(7, seq), 10).await;
        }
        let (tx, mut rx) = mpsc::channel(16);
        let stop = CancellationToken::new();
        let (_, got) = tokio::join!(outbox.pump(&tx, &stop), async {
            let mut got = Vec::new();
            for _ in 0..3 {
                got.push(rx.recv().await.unwrap());
            }
            stop.cancel();
            got
        });
        assert_eq!(got.len(), 3);
        outbox.ack_output(7, 2);
        // A new session's writer starts over with what is left.
        let stop = CancellationToken::new();
        let (_, next) = tokio::join!(outbox.pump(&tx, &stop), async {
            let m = rx.recv().await.unwrap();
            stop.cancel();
            m
        });
        match next.kind {
            Some(Kind::Output(c)) => assert_eq!(c.seq, 3),
            other => panic!("{other:?}"),
        }
        assert_eq!(outbox.attempts().into_iter().collect::<Vec<_>>(), vec![7]);
        outbox.drop_attempt(7);
        assert!(outbox.attempts().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_outbox_waits_for_acks() {
        let outbox = std::sync::Arc::new(Outbox::new(20));
        outbox.push_output(1, 1, chunk(1, 1), 10).await;
        outbox.push_output(1, 2, chunk(1, 2), 10).await;
        let o = outbox.clone();
        let mut third = tokio::spawn(async move { o.push_output(1, 3, chunk(1, 3), 10).await });
        // The third chunk cannot enter until the first is acknowledged.
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(50), &mut third)
                .await
                .is_err()
        );
        outbox.ack_output(1, 1);
        third.await.unwrap();
    }
}

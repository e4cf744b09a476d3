//! Messages about attempts, kept in order until the dispatcher acknowledges them.
//!
//! Output chunks leave when an `OutputAck` covers their sequence number; everything else about
//! an attempt leaves when its final result is acknowledged (or refused). A new session's
//! writer starts from each attempt's oldest unacknowledged message, so nothing unacknowledged
//! is lost across reconnects, and an attempt's messages are always sent in the order they came.
//!
//! # Where output waits
//!
//! Small messages (accepted, step started/finished, job finished) stay in memory: they are few
//! and tiny. Output payloads stay in memory only while they fit a small *hot window* (4 MiB,
//! at most `max_memory_bytes`): while connected, chunks are acknowledged within milliseconds,
//! so they never touch the disk. Beyond the window, output goes to a *spool* on local disk, so
//! a long dispatcher outage costs disk, not memory:
//!
//! - Each attempt appends its chunks as frames (seq, step, stream, length, payload; 20 bytes of
//!   header) to its own *segment* files, `<pid>-<attempt>-<n>.seg` in the spool directory. A new
//!   segment starts when the current one holds a sixteenth of the bound (at most 4 MiB).
//! - In memory, consecutive chunks of an attempt in one segment are one *run* (first position
//!   and sequence number, count, byte range), so memory does not grow with the chunks spooled.
//!   The writer reads the frames back when it sends them; a frame that cannot be read back is
//!   replaced by a notice on the system stream with the same seq, so the log says what was
//!   lost and the attempt's output has no gap for the dispatcher to refuse.
//! - Writes and reads are plain `pwrite`/`pread` calls on the page cache (as the dispatcher's
//!   log store does), made outside the outbox lock. Nothing is `fsync`ed: the spool does not
//!   need to survive a crash, only an outage.
//!
//! Whatever the mix of memory and disk, an attempt's messages keep their order. The writer
//! takes up to 64 messages of each attempt in turn.
//!
//! # Bounds
//!
//! - Disk: the bytes in segment files not yet deleted (headers included, acknowledged or not,
//!   plus a write in progress) never exceed `max_spool_bytes`, except that one frame larger
//!   than the bound is let into an empty spool. When the next frame does not fit,
//!   `push_output` first deletes current segments whose chunks are all acknowledged, then
//!   waits for acknowledgements (which pauses the step, as before).
//! - Space is reclaimed a segment at a time: a finished segment is deleted as soon as all its
//!   chunks are acknowledged, the segment being appended to when it is full or when room is
//!   needed, and all of an attempt's segments when the attempt is dropped (`ResultAck` /
//!   `Refused`). Acknowledgements cover a prefix of an attempt's output, so at most one
//!   segment per attempt holds acknowledged bytes that still count.
//! - Memory: the hot window, and when the spool cannot be written (no directory, full disk,
//!   I/O error), up to `max_memory_bytes` of payload instead, in its place among the spooled
//!   chunks. A warning is logged once, until the spool works again; the spool is tried again
//!   at most once a second, and whenever that memory is empty or full. Past both bounds,
//!   `push_output` waits. `max_spool_bytes == 0` keeps all output in memory, up to
//!   `max_memory_bytes` (the behaviour before the spool).
//!
//! Attempts do not survive a runner restart, so segments left by a previous process are
//! deleted when the outbox is created.

mod segment;
mod state;

use std::collections::{BTreeSet, HashMap};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use kiln_domain::AttemptId;
use kiln_domain::protocol::{self, OutputStream, RunnerMessage};
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;

use segment::{HEADER_LEN, Head, Segment, create_segment, encode_frame, prepare_spool, read_frame};
use state::{Chunk, Inner, Item, Limits, Reservation, Route, Target};

/// Largest segment size at which a new segment is started.
const MAX_SEGMENT_BYTES: u64 = 4 << 20;
/// Most output payload bytes kept in memory while the spool works.
const HOT_BYTES: usize = 4 << 20;
/// Most messages the writer takes from one attempt at a time (the others get their turn).
const BATCH: u64 = 64;

/// Where a writer is in an attempt.
#[derive(Clone, Copy)]
struct Progress {
    generation: u64,
    /// Position of the next message to send.
    next_pos: u64,
    /// The offset of that message's frame, if it is in this segment.
    hint: Option<(u64, u64)>,
}

/// One step of a writer's batch.
enum Send {
    /// A message ready to go.
    Ready {
        attempt: AttemptId,
        generation: u64,
        pos: u64,
        msg: RunnerMessage,
    },
    /// Frames to read back from a segment.
    Read(ReadBack),
}

/// Read the frames from `from` (frame `first_pos` of a run), skip `skip` of them, send the
/// next `count`.
struct ReadBack {
    attempt: AttemptId,
    generation: u64,
    seg: Arc<Segment>,
    from: u64,
    first_pos: u64,
    first_seq: u64,
    skip: u64,
    count: u64,
    step: u32,
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
    /// Where segments are written.
    spool_dir: PathBuf,
    /// The spool's and memory's bounds.
    limits: Limits,
    /// This process (in segment names).
    pid: u32,
}

impl Outbox {
    /// An outbox spooling output under `spool_dir` (created; segments a previous process left
    /// are deleted), at most `max_spool_bytes` on disk and, when the spool cannot be written,
    /// at most `max_memory_bytes` of output in memory.
    pub(crate) fn new(spool_dir: PathBuf, max_spool_bytes: u64, max_memory_bytes: usize) -> Self {
        let mut inner = Inner::default();
        if max_spool_bytes > 0
            && let Err(cause) = prepare_spool(&spool_dir)
        {
            inner.spool_fail(&spool_dir, &cause);
        }
        Self {
            inner: Mutex::new(inner),
            to_send: Notify::new(),
            space: Notify::new(),
            wake: Notify::new(),
            limits: Limits {
                segment_bytes: (max_spool_bytes / 16).clamp(1, MAX_SEGMENT_BYTES),
                max_spool_bytes,
                max_memory_bytes,
                hot_limit: HOT_BYTES.min(max_memory_bytes),
            },
            spool_dir,
            pid: std::process::id(),
        }
    }

    fn inner(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a small message (never waits).
    pub(crate) fn push(&self, attempt: AttemptId, msg: RunnerMessage) {
        self.inner().insert_message(attempt, None, msg, 0);
        self.to_send.notify_one();
        self.wake.notify_waiters();
    }

    /// Queues an output chunk (`bytes` of payload), waiting while there is no room for it.
    pub(crate) async fn push_output(
        &self,
        attempt: AttemptId,
        seq: u64,
        msg: RunnerMessage,
        bytes: usize,
    ) {
        // Only a well-formed chunk goes to the spool (it is rebuilt from the frame).
        let head = match &msg {
            RunnerMessage::Output(c)
                if self.limits.max_spool_bytes > 0
                    && c.attempt_id == attempt
                    && c.seq == seq
                    && u32::try_from(c.data.len()).is_ok() =>
            {
                Some(Head {
                    seq,
                    step: c.step_index,
                    stream: c.stream,
                    data: c.data.clone(),
                })
            }
            _ => None,
        };
        let frame_len = head
            .as_ref()
            .map_or(0, |h| HEADER_LEN + h.data.len() as u64);
        let mut disk = head.is_some();
        let chunk = Chunk {
            attempt,
            seq,
            msg: &msg,
            bytes,
        };
        loop {
            let notified = self.space.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let mut garbage = Vec::new();
            let route = {
                self.inner()
                    .route(&self.limits, &chunk, disk, frame_len, &mut garbage)
            };
            drop(garbage);
            match (route, &head) {
                (Route::Stored, _) => break,
                (Route::Write(res), Some(head)) => {
                    // Encoded only now: output that stays in memory is never copied.
                    let written = self.write_frame(attempt, &res, &encode_frame(head));
                    let mut garbage = Vec::new();
                    let (stored, notify) = {
                        self.inner().complete(
                            &self.spool_dir,
                            &chunk,
                            head.step,
                            res,
                            written,
                            &mut garbage,
                        )
                    };
                    drop(garbage);
                    if notify {
                        self.space.notify_waiters();
                    }
                    if stored {
                        break;
                    }
                    // The spool failed: memory next, if there is room.
                    disk = false;
                }
                (Route::Write(_), None) | (Route::Wait, _) => {
                    notified.await;
                    disk = head.is_some();
                }
            }
        }
        self.to_send.notify_one();
    }

    /// Writes a frame where it was reserved (outside the lock).
    fn write_frame(
        &self,
        attempt: AttemptId,
        res: &Reservation,
        frame: &[u8],
    ) -> Result<Arc<Segment>, (io::Error, Option<Arc<Segment>>)> {
        match &res.target {
            Target::Append { seg, offset } => match seg.file.write_all_at(frame, *offset) {
                Ok(()) => Ok(seg.clone()),
                Err(e) => Err((e, None)),
            },
            Target::New { id } => {
                let seg = Arc::new(
                    create_segment(&self.spool_dir, self.pid, attempt, *id)
                        .map_err(|e| (e, None))?,
                );
                match seg.file.write_all_at(frame, 0) {
                    Ok(()) => Ok(seg),
                    Err(e) => Err((e, Some(seg))),
                }
            }
        }
    }

    /// Output of `attempt` up to `up_to` is stored by the dispatcher.
    pub(crate) fn ack_output(&self, attempt: AttemptId, up_to: u64) {
        let mut garbage = Vec::new();
        let freed = {
            let mut guard = self.inner();
            let inner = &mut *guard;
            let Some(a) = inner.attempts.get_mut(&attempt) else {
                return;
            };
            // Output is in sequence order, so what is acknowledged is at the front, after
            // (few) small messages.
            let mut freed = false;
            let mut i = 0;
            while let Some(item) = a.items.get_mut(i) {
                match item {
                    Item::Message { seq: None, .. } => i += 1,
                    Item::Message { seq: Some(s), .. } if *s <= up_to => {
                        if let Some(Item::Message { bytes, .. }) = a.items.remove(i) {
                            inner.memory_bytes -= bytes;
                        }
                        freed = true;
                    }
                    Item::Spooled(r) if r.last_seq() <= up_to => {
                        if let Some(Item::Spooled(r)) = a.items.remove(i) {
                            inner.spool_bytes -= a.release(r, &mut garbage);
                        }
                        freed = true;
                    }
                    Item::Spooled(r) if r.first_seq <= up_to => {
                        r.acked = r.acked.max(up_to - r.first_seq + 1);
                        break;
                    }
                    _ => break,
                }
            }
            freed
        };
        drop(garbage);
        if freed {
            self.space.notify_waiters();
        }
    }

    /// Forgets everything about an attempt (its result was acknowledged or refused) and
    /// deletes its segments.
    pub(crate) fn drop_attempt(&self, attempt: AttemptId) {
        let removed = {
            let mut inner = self.inner();
            let removed = inner.attempts.remove(&attempt);
            if let Some(a) = &removed {
                inner.spool_bytes -= a.spool_bytes();
                inner.memory_bytes -= a
                    .items
                    .iter()
                    .map(|i| match i {
                        Item::Message { bytes, .. } => *bytes,
                        Item::Spooled(_) => 0,
                    })
                    .sum::<usize>();
            }
            removed
        };
        // Deletes the files, outside the lock.
        drop(removed);
        self.space.notify_waiters();
        self.wake.notify_waiters();
    }

    /// Attempts with unacknowledged messages.
    pub(crate) fn attempts(&self) -> BTreeSet<AttemptId> {
        self.inner()
            .attempts
            .iter()
            .filter(|(_, a)| !a.items.is_empty())
            .map(|(id, _)| *id)
            .collect()
    }

    /// Wakes the session loop.
    pub(crate) fn wake(&self) {
        self.wake.notify_waiters();
    }

    /// Resolves when something changed.
    pub(crate) async fn changed(&self) {
        self.wake.notified().await;
    }

    /// Sends every attempt's messages, oldest first, then new ones as they come, until `stop`.
    pub(crate) async fn pump(&self, tx: &mpsc::Sender<RunnerMessage>, stop: &CancellationToken) {
        let mut progress = HashMap::new();
        loop {
            let batch = self.plan(&mut progress);
            if batch.is_empty() {
                tokio::select! {
                    _ = self.to_send.notified() => continue,
                    _ = stop.cancelled() => return,
                }
            }
            for send in batch {
                let sent = match send {
                    Send::Ready {
                        attempt,
                        generation,
                        pos,
                        msg,
                    } => {
                        let sent = deliver(tx, stop, msg).await;
                        progress.insert(
                            attempt,
                            Progress {
                                generation,
                                next_pos: pos + 1,
                                hint: None,
                            },
                        );
                        sent
                    }
                    Send::Read(read) => read_back(read, tx, stop, &mut progress).await,
                };
                if !sent {
                    return;
                }
            }
        }
    }

    /// The writer's next batch: up to `BATCH` messages of each attempt after where it is.
    fn plan(&self, progress: &mut HashMap<AttemptId, Progress>) -> Vec<Send> {
        let inner = self.inner();
        progress.retain(|id, p| {
            inner
                .attempts
                .get(id)
                .is_some_and(|a| a.generation == p.generation)
        });
        let mut batch = Vec::new();
        for (&attempt, a) in &inner.attempts {
            let generation = a.generation;
            let Progress {
                mut next_pos,
                mut hint,
                ..
            } = progress.get(&attempt).copied().unwrap_or(Progress {
                generation,
                next_pos: 0,
                hint: None,
            });
            let mut n = 0;
            let first = a.items.partition_point(|i| i.end_pos() <= next_pos);
            for item in a.items.range(first..) {
                if n >= BATCH {
                    break;
                }
                match item {
                    Item::Message { pos, msg, .. } => {
                        batch.push(Send::Ready {
                            attempt,
                            generation,
                            pos: *pos,
                            msg: msg.clone(),
                        });
                        next_pos = pos + 1;
                        hint = None;
                        n += 1;
                    }
                    Item::Spooled(r) => {
                        let idx = next_pos.saturating_sub(r.first_pos).max(r.acked);
                        if idx >= r.count {
                            continue;
                        }
                        let target = r.first_pos + idx;
                        let count = (r.count - idx).min(BATCH - n);
                        // From where this writer stopped in the segment, or from the start
                        // of the run, skipping what was sent or acknowledged.
                        let (from_idx, from) = match hint {
                            Some((seg, offset))
                                if seg == r.seg.id
                                    && next_pos >= r.first_pos
                                    && next_pos <= target =>
                            {
                                (next_pos - r.first_pos, offset)
                            }
                            _ => (0, r.start),
                        };
                        batch.push(Send::Read(ReadBack {
                            attempt,
                            generation,
                            seg: r.seg.clone(),
                            from,
                            first_pos: r.first_pos + from_idx,
                            first_seq: r.first_seq + from_idx,
                            skip: idx - from_idx,
                            count,
                            step: r.step,
                        }));
                        next_pos = target + count;
                        hint = None;
                        n += count;
                    }
                }
            }
        }
        batch
    }
}

fn chunk(
    attempt: AttemptId,
    seq: u64,
    step: u32,
    stream: OutputStream,
    data: Bytes,
) -> RunnerMessage {
    RunnerMessage::Output(protocol::OutputChunk {
        attempt_id: attempt,
        seq,
        step_index: step,
        stream,
        data,
    })
}

/// Sends one message unless `stop` comes first; false if the session is over.
async fn deliver(
    tx: &mpsc::Sender<RunnerMessage>,
    stop: &CancellationToken,
    msg: RunnerMessage,
) -> bool {
    tokio::select! {
        r = tx.send(msg) => r.is_ok(),
        _ = stop.cancelled() => false,
    }
}

/// Reads frames back from a segment and sends them. A frame that cannot be read is replaced
/// by a notice (on the system stream, same seq), so the attempt's output keeps its order and
/// has no gap.
async fn read_back(
    r: ReadBack,
    tx: &mpsc::Sender<RunnerMessage>,
    stop: &CancellationToken,
    progress: &mut HashMap<AttemptId, Progress>,
) -> bool {
    let total = r.skip + r.count;
    let mut offset = r.from;
    for j in 0..total {
        let seq = r.first_seq + j;
        match read_frame(&r.seg.file, offset, seq, j >= r.skip) {
            Ok(frame) => {
                offset = frame.next;
                if j < r.skip {
                    continue;
                }
                let msg = chunk(r.attempt, seq, frame.step, frame.stream, frame.data);
                let sent = deliver(tx, stop, msg).await;
                progress.insert(
                    r.attempt,
                    Progress {
                        generation: r.generation,
                        next_pos: r.first_pos + j + 1,
                        hint: Some((r.seg.id, offset)),
                    },
                );
                if !sent {
                    return false;
                }
            }
            Err(cause) => {
                tracing::error!(
                    attempt = %r.attempt,
                    seq,
                    path = %r.seg.path.display(),
                    %cause,
                    "cannot read output back from the spool; sending a notice in its place"
                );
                let first = j.max(r.skip);
                for k in first..total {
                    let text = if k == first {
                        format!(
                            "kiln: the runner lost output here (from chunk {}): cannot read its output spool: {cause}\n",
                            r.first_seq + k
                        )
                    } else {
                        String::new()
                    };
                    let stream = OutputStream::System;
                    let msg = chunk(r.attempt, r.first_seq + k, r.step, stream, text.into());
                    let sent = deliver(tx, stop, msg).await;
                    progress.insert(
                        r.attempt,
                        Progress {
                            generation: r.generation,
                            next_pos: r.first_pos + k + 1,
                            hint: None,
                        },
                    );
                    if !sent {
                        return false;
                    }
                }
                return true;
            }
        }
    }
    true
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::collections::BTreeMap;
    use std::path::Path;
    use std::time::{Duration, Instant};

    use super::segment::SEGMENT_EXT;
    use super::state::SPOOL_RETRY;
    use super::*;

    impl Outbox {
        /// Sets the hot window (below `max_memory_bytes`).
        fn with_hot_limit(mut self, bytes: usize) -> Self {
            self.limits.hot_limit = bytes;
            self
        }
    }

    fn payload(attempt: u64, seq: u64, len: usize) -> Bytes {
        let pattern = format!("<{attempt}:{seq}>");
        pattern
            .bytes()
            .cycle()
            .take(len)
            .collect::<Vec<u8>>()
            .into()
    }

    fn small(attempt: u64) -> RunnerMessage {
        RunnerMessage::Accepted(protocol::Accepted {
            attempt_id: AttemptId::new(attempt),
        })
    }

    /// Pushes chunk `seq` of `len` bytes.
    async fn push(outbox: &Outbox, attempt: u64, seq: u64, len: usize) {
        let msg = chunk(
            AttemptId::new(attempt),
            seq,
            0,
            OutputStream::Stdout,
            payload(attempt, seq, len),
        );
        outbox
            .push_output(AttemptId::new(attempt), seq, msg, len)
            .await;
    }

    /// Runs a writer until it has sent `n` messages.
    async fn collect(outbox: &Outbox, n: usize) -> Vec<RunnerMessage> {
        let (tx, mut rx) = mpsc::channel(16);
        let stop = CancellationToken::new();
        let (_, got) = tokio::join!(outbox.pump(&tx, &stop), async {
            let mut got = Vec::new();
            while got.len() < n {
                got.push(rx.recv().await.unwrap());
            }
            stop.cancel();
            got
        });
        got
    }

    /// Runs a writer until it is idle; returns everything it sent.
    async fn collect_all(outbox: &Outbox) -> Vec<RunnerMessage> {
        let (tx, mut rx) = mpsc::channel(100_000);
        let stop = CancellationToken::new();
        tokio::join!(outbox.pump(&tx, &stop), async {
            tokio::time::sleep(Duration::from_millis(10)).await;
            stop.cancel();
        });
        let mut got = Vec::new();
        while let Ok(m) = rx.try_recv() {
            got.push(m);
        }
        got
    }

    /// (attempt, seq) of output chunks, (attempt, 0) of other messages; checks payloads.
    fn keys(msgs: &[RunnerMessage], len: impl Fn(u64, u64) -> usize) -> Vec<(u64, u64)> {
        msgs.iter()
            .map(|m| match m {
                RunnerMessage::Output(c) => {
                    let a = c.attempt_id.get();
                    assert_eq!(
                        c.data,
                        payload(a, c.seq, len(a, c.seq)),
                        "payload of {}:{}",
                        a,
                        c.seq
                    );
                    (a, c.seq)
                }
                RunnerMessage::Accepted(a) => (a.attempt_id.get(), 0),
                other => panic!("{other:?}"),
            })
            .collect()
    }

    fn of(keys: &[(u64, u64)], attempt: u64) -> Vec<u64> {
        keys.iter()
            .filter(|(a, _)| *a == attempt)
            .map(|(_, s)| *s)
            .collect()
    }

    fn segments(dir: &Path) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .map(|d| d.map(|e| e.unwrap().path()).collect())
            .unwrap_or_default();
        files.retain(|p| p.extension().is_some_and(|e| e == SEGMENT_EXT));
        files.sort();
        files
    }

    fn on_disk(dir: &Path) -> u64 {
        segments(dir)
            .iter()
            .map(|p| std::fs::metadata(p).unwrap().len())
            .sum()
    }

    fn spool_bytes(outbox: &Outbox) -> u64 {
        outbox.inner().spool_bytes
    }

    fn memory_bytes(outbox: &Outbox) -> usize {
        outbox.inner().memory_bytes
    }

    /// In memory only (no spool), in the spool (no hot window), in the hot window.
    #[tokio::test]
    async fn unacked_output_is_sent_again_by_a_new_writer() {
        for (max_spool, max_memory, files) in
            [(0, 1000, false), (1000, 0, true), (1000, 1000, false)]
        {
            let dir = tempfile::tempdir().unwrap();
            let spool = dir.path().join("spool");
            let outbox = Outbox::new(spool.clone(), max_spool, max_memory);
            for seq in 1..=3 {
                push(&outbox, 7, seq, 10).await;
            }
            assert_eq!(!segments(&spool).is_empty(), files);
            let got = collect(&outbox, 3).await;
            assert_eq!(keys(&got, |_, _| 10), vec![(7, 1), (7, 2), (7, 3)]);
            outbox.ack_output(AttemptId::new(7), 2);
            // A new session's writer starts over with what is left.
            let next = collect(&outbox, 1).await;
            assert_eq!(keys(&next, |_, _| 10), vec![(7, 3)]);
            assert_eq!(
                outbox.attempts().into_iter().collect::<Vec<_>>(),
                vec![AttemptId::new(7)]
            );
            outbox.drop_attempt(AttemptId::new(7));
            assert!(outbox.attempts().is_empty());
            assert!(segments(&spool).is_empty());
            assert_eq!((spool_bytes(&outbox), memory_bytes(&outbox)), (0, 0));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_outbox_waits_for_acks() {
        let dir = tempfile::tempdir().unwrap();
        // No spool: 20 bytes of output in memory.
        let outbox = Arc::new(Outbox::new(dir.path().to_path_buf(), 0, 20));
        push(&outbox, 1, 1, 10).await;
        push(&outbox, 1, 2, 10).await;
        let o = outbox.clone();
        let mut third = tokio::spawn(async move { push(&o, 1, 3, 10).await });
        // The third chunk cannot enter until the first is acknowledged.
        assert!(
            tokio::time::timeout(Duration::from_millis(50), &mut third)
                .await
                .is_err()
        );
        outbox.ack_output(AttemptId::new(1), 1);
        third.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_spool_waits_for_acks() {
        let dir = tempfile::tempdir().unwrap();
        let frame = HEADER_LEN + 10;
        // Room for two frames on disk and a 20-byte hot window; the rest of the memory is
        // only for when the spool fails.
        let outbox = Outbox::new(dir.path().to_path_buf(), 2 * frame, 1 << 20).with_hot_limit(20);
        let outbox = Arc::new(outbox);
        for seq in 1..=4 {
            push(&outbox, 1, seq, 10).await;
        }
        assert_eq!(
            (memory_bytes(&outbox), spool_bytes(&outbox)),
            (20, 2 * frame)
        );
        let o = outbox.clone();
        let mut fifth = tokio::spawn(async move { push(&o, 1, 5, 10).await });
        assert!(
            tokio::time::timeout(Duration::from_millis(50), &mut fifth)
                .await
                .is_err()
        );
        assert_eq!(
            (memory_bytes(&outbox), spool_bytes(&outbox)),
            (20, 2 * frame)
        );
        // Acknowledging the first two empties the hot window; the third goes off disk.
        outbox.ack_output(AttemptId::new(1), 3);
        fifth.await.unwrap();
        assert_eq!((memory_bytes(&outbox), spool_bytes(&outbox)), (10, frame));
        assert_eq!(on_disk(dir.path()), frame);
        let got = collect(&outbox, 2).await;
        assert_eq!(keys(&got, |_, _| 10), vec![(1, 4), (1, 5)]);
    }

    #[tokio::test(start_paused = true)]
    async fn acknowledged_output_never_touches_the_disk_and_an_outage_goes_to_it() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::new(dir.path().to_path_buf(), 1 << 20, 1 << 20).with_hot_limit(1000);
        // Connected: acknowledged as it goes.
        for seq in 1..=100 {
            push(&outbox, 1, seq, 100).await;
            let got = collect(&outbox, 1).await;
            assert_eq!(keys(&got, |_, _| 100), vec![(1, seq)]);
            outbox.ack_output(AttemptId::new(1), seq);
        }
        assert!(segments(dir.path()).is_empty());
        // The dispatcher is away: ten chunks fill the hot window, the rest goes to disk.
        for seq in 101..=200 {
            push(&outbox, 1, seq, 100).await;
        }
        assert_eq!(memory_bytes(&outbox), 1000);
        assert_eq!(on_disk(dir.path()), 90 * (HEADER_LEN + 100));
        let got = keys(&collect_all(&outbox).await, |_, _| 100);
        assert_eq!(of(&got, 1), (101..=200).collect::<Vec<_>>());
    }

    #[tokio::test(start_paused = true)]
    async fn output_waits_in_the_spool_and_a_new_writer_reads_it_back_in_order() {
        // All on disk; some in memory then on disk.
        for hot in [0, 3000] {
            let dir = tempfile::tempdir().unwrap();
            // 8 KiB segments.
            let outbox =
                Outbox::new(dir.path().to_path_buf(), 128 << 10, 1 << 20).with_hot_limit(hot);
            let len = |a: u64, s: u64| ((a * 31 + s * 17) % 300) as usize;
            for attempt in [1, 2] {
                outbox.push(AttemptId::new(attempt), small(attempt));
            }
            for seq in 1..=200 {
                for attempt in [1, 2] {
                    push(&outbox, attempt, seq, len(attempt, seq)).await;
                    if seq == 120 {
                        outbox.push(AttemptId::new(attempt), small(attempt));
                    }
                }
            }
            let expected = |from: u64| {
                let mut v = vec![0];
                for seq in 1..=200 {
                    if seq >= from {
                        v.push(seq);
                    }
                    if seq == 120 {
                        v.push(0);
                    }
                }
                v
            };
            // The output is on disk, in several segments, counted exactly.
            let frames_of = |attempt| {
                (1..=200)
                    .map(|s| HEADER_LEN + len(attempt, s) as u64)
                    .sum::<u64>()
            };
            let frames = frames_of(1) + frames_of(2);
            assert!(segments(dir.path()).len() > 4);
            assert_eq!(on_disk(dir.path()), spool_bytes(&outbox));
            assert!(memory_bytes(&outbox) <= hot);
            if hot == 0 {
                // Empty chunks fit even an empty hot window.
                let empty = (1..=200)
                    .flat_map(|s| [len(1, s), len(2, s)])
                    .filter(|l| *l == 0)
                    .count() as u64;
                assert_eq!(spool_bytes(&outbox), frames - empty * HEADER_LEN);
            }
            // A writer sends part of it, then the session breaks.
            let first = keys(&collect(&outbox, 150).await, len);
            for attempt in [1, 2] {
                let got = of(&first, attempt);
                assert_eq!(got, expected(1)[..got.len()].to_vec());
            }
            // Part is acknowledged, in the middle of a segment.
            outbox.ack_output(AttemptId::new(1), 50);
            // The next writer sends the rest, in order, and nothing more.
            let second = keys(&collect_all(&outbox).await, len);
            assert_eq!(of(&second, 1), expected(51));
            assert_eq!(of(&second, 2), expected(1));
            // Acknowledged segments are deleted (the current one when room is needed).
            outbox.ack_output(AttemptId::new(1), 200);
            assert!(spool_bytes(&outbox) <= frames_of(2) + (8 << 10) + 320);
            outbox.ack_output(AttemptId::new(2), 200);
            outbox.drop_attempt(AttemptId::new(1));
            outbox.drop_attempt(AttemptId::new(2));
            assert_eq!((spool_bytes(&outbox), memory_bytes(&outbox)), (0, 0));
            assert!(segments(dir.path()).is_empty());
        }
    }

    #[tokio::test(start_paused = true)]
    async fn acknowledged_output_makes_room() {
        let dir = tempfile::tempdir().unwrap();
        let bound = 10_000;
        let outbox = Outbox::new(dir.path().to_path_buf(), bound, 0);
        for seq in 1..=2000 {
            tokio::time::timeout(Duration::from_secs(1), push(&outbox, 3, seq, 100))
                .await
                .unwrap();
            if seq % 7 == 0 {
                outbox.ack_output(AttemptId::new(3), seq);
            }
            assert!(spool_bytes(&outbox) <= bound);
        }
        assert_eq!(on_disk(dir.path()), spool_bytes(&outbox));
        outbox.drop_attempt(AttemptId::new(3));
        assert!(segments(dir.path()).is_empty());
    }

    #[tokio::test]
    async fn dropping_an_attempt_deletes_its_files() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::new(dir.path().to_path_buf(), 16 << 10, 0);
        for seq in 1..=50 {
            push(&outbox, 1, seq, 100).await;
            push(&outbox, 2, seq, 100).await;
        }
        let names = |dir: &Path| -> Vec<String> {
            segments(dir)
                .iter()
                .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
                .collect()
        };
        let pid = std::process::id();
        let before = names(dir.path());
        assert!(before.iter().any(|n| n.starts_with(&format!("{pid}-1-"))));
        assert!(before.iter().any(|n| n.starts_with(&format!("{pid}-2-"))));
        outbox.drop_attempt(AttemptId::new(1));
        let after = names(dir.path());
        assert!(!after.is_empty());
        assert!(after.iter().all(|n| n.starts_with(&format!("{pid}-2-"))));
        outbox.drop_attempt(AttemptId::new(2));
        assert!(segments(dir.path()).is_empty());
        assert_eq!(spool_bytes(&outbox), 0);
    }

    #[tokio::test]
    async fn leftover_spool_files_are_deleted_at_start() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("123-4-5.seg"), b"old").unwrap();
        std::fs::write(dir.path().join("notes.txt"), b"keep").unwrap();
        let _outbox = Outbox::new(dir.path().to_path_buf(), 1 << 20, 1 << 20);
        assert!(segments(dir.path()).is_empty());
        assert!(dir.path().join("notes.txt").exists());
    }

    #[tokio::test(start_paused = true)]
    async fn an_unwritable_spool_keeps_output_in_memory() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("file");
        std::fs::write(&file, b"").unwrap();
        // The spool directory would be under a regular file; 25 bytes of memory.
        let outbox = Arc::new(Outbox::new(file.join("spool"), 1 << 20, 25).with_hot_limit(0));
        push(&outbox, 1, 1, 10).await;
        push(&outbox, 1, 2, 10).await;
        let o = outbox.clone();
        let mut third = tokio::spawn(async move { push(&o, 1, 3, 10).await });
        assert!(
            tokio::time::timeout(Duration::from_millis(50), &mut third)
                .await
                .is_err()
        );
        let got = collect(&outbox, 2).await;
        assert_eq!(keys(&got, |_, _| 10), vec![(1, 1), (1, 2)]);
        outbox.ack_output(AttemptId::new(1), 1);
        third.await.unwrap();
        let got = collect_all(&outbox).await;
        assert_eq!(keys(&got, |_, _| 10), vec![(1, 2), (1, 3)]);
        assert_eq!(spool_bytes(&outbox), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_spool_failing_midway_loses_and_reorders_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("spool");
        // 625-byte segments: a new one every five 100-byte chunks.
        let outbox = Outbox::new(dir.clone(), 10_000, 1 << 20).with_hot_limit(0);
        for seq in 1..=10 {
            push(&outbox, 1, seq, 100).await;
        }
        assert!(!segments(&dir).is_empty());
        // The directory goes away and cannot come back (a file is in its place).
        std::fs::remove_dir_all(&dir).unwrap();
        std::fs::write(&dir, b"").unwrap();
        outbox.push(AttemptId::new(1), small(1));
        for seq in 11..=30 {
            push(&outbox, 1, seq, 100).await;
        }
        assert!(outbox.inner().spool_failing);
        assert!(memory_bytes(&outbox) > 0);
        let got = keys(&collect_all(&outbox).await, |_, _| 100);
        let mut expected: Vec<u64> = (1..=10).collect();
        expected.push(0);
        expected.extend(11..=30);
        assert_eq!(of(&got, 1), expected);
        // The disk comes back: the spool is tried again a second later.
        std::fs::remove_file(&dir).unwrap();
        let memory = memory_bytes(&outbox);
        push(&outbox, 1, 31, 100).await;
        assert!(outbox.inner().spool_failing);
        tokio::time::advance(SPOOL_RETRY).await;
        for seq in 32..=40 {
            push(&outbox, 1, seq, 100).await;
        }
        assert!(!outbox.inner().spool_failing);
        assert_eq!(memory_bytes(&outbox), memory + 100);
        assert!(!segments(&dir).is_empty());
        let got = keys(&collect_all(&outbox).await, |_, _| 100);
        expected.extend(31..=40);
        assert_eq!(of(&got, 1), expected);
        // Once acknowledged, memory is empty again.
        outbox.ack_output(AttemptId::new(1), 40);
        assert_eq!(memory_bytes(&outbox), 0);
        let got = keys(&collect_all(&outbox).await, |_, _| 100);
        assert_eq!(of(&got, 1), vec![0]);
    }

    /// Random pushes, acknowledgements, drops, writers cut short and a spool directory that
    /// comes and goes: a new writer always sends exactly each attempt's unacknowledged
    /// messages, in order, and the bounds hold.
    #[tokio::test(start_paused = true)]
    async fn random_histories_keep_every_attempt_whole_and_in_order() {
        #[derive(Default, Clone)]
        struct Model {
            /// Sequence numbers of chunks, 0 for small messages.
            pushed: Vec<u64>,
            next_seq: u64,
            acked: u64,
        }
        impl Model {
            fn expected(&self) -> Vec<u64> {
                self.pushed
                    .iter()
                    .copied()
                    .filter(|s| *s == 0 || *s > self.acked)
                    .collect()
            }
        }
        let mut rng = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = move |n: u64| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % n
        };
        let len = |a: u64, s: u64| ((a * 7919 + s * 104_729) % 250) as usize;
        let bound = 6000;
        for round in 0..12 {
            let tmp = tempfile::tempdir().unwrap();
            let dir = tmp.path().join("spool");
            let hot = [0, 700][round % 2];
            let outbox = Outbox::new(dir.clone(), bound, 3000).with_hot_limit(hot);
            let mut models: BTreeMap<u64, Model> = BTreeMap::new();
            let mut broke = false;
            for _ in 0..400 {
                let a = 1 + next(3);
                match next(20) {
                    0..=1 => {
                        outbox.push(AttemptId::new(a), small(a));
                        models.entry(a).or_default().pushed.push(0);
                    }
                    2..=11 => {
                        let m = models.entry(a).or_default();
                        let seq = m.next_seq + 1;
                        let pushed = tokio::time::timeout(
                            Duration::from_secs(1),
                            push(&outbox, a, seq, len(a, seq)),
                        )
                        .await;
                        if pushed.is_err() {
                            // Full: the dispatcher acknowledges everything, then it goes in.
                            for (&id, m) in models.iter_mut() {
                                outbox.ack_output(AttemptId::new(id), m.next_seq);
                                m.acked = m.next_seq;
                            }
                            tokio::time::timeout(
                                Duration::from_secs(1),
                                push(&outbox, a, seq, len(a, seq)),
                            )
                            .await
                            .unwrap();
                        }
                        let m = models.entry(a).or_default();
                        m.pushed.push(seq);
                        m.next_seq = seq;
                    }
                    12..=14 => {
                        let m = models.entry(a).or_default();
                        let up_to = next(m.next_seq + 1);
                        outbox.ack_output(AttemptId::new(a), up_to);
                        m.acked = m.acked.max(up_to);
                    }
                    15..=16 => {
                        // A session that breaks after a few messages.
                        let total: usize = models.values().map(|m| m.expected().len()).sum();
                        let n = next(total as u64 + 1) as usize;
                        let got = keys(&collect(&outbox, n).await, len);
                        for (id, m) in &models {
                            let got = of(&got, *id);
                            assert_eq!(got, m.expected()[..got.len()].to_vec());
                        }
                    }
                    17 => {
                        outbox.drop_attempt(AttemptId::new(a));
                        models.remove(&a);
                    }
                    _ => {
                        if dir.is_dir() && next(4) == 0 {
                            broke = true;
                            std::fs::remove_dir_all(&dir).unwrap();
                            std::fs::write(&dir, b"").unwrap();
                        } else if dir.is_file() {
                            std::fs::remove_file(&dir).unwrap();
                        }
                    }
                }
                let (spool, memory) = (spool_bytes(&outbox), memory_bytes(&outbox));
                assert!(spool <= bound, "{spool}");
                assert!(memory <= 3000, "{memory}");
                if !broke {
                    assert!(memory <= hot, "{memory}");
                }
                if dir.is_dir() && !outbox.inner().spool_failing {
                    assert!(on_disk(&dir) <= spool);
                }
            }
            let got = keys(&collect_all(&outbox).await, len);
            for (id, m) in &models {
                assert_eq!(of(&got, *id), m.expected(), "round {round}, attempt {id}");
            }
            let held: BTreeSet<AttemptId> = models
                .iter()
                .filter(|(_, m)| !m.expected().is_empty())
                .map(|(id, _)| AttemptId::new(*id))
                .collect();
            assert_eq!(outbox.attempts(), held);
            for id in 1..=3 {
                outbox.drop_attempt(AttemptId::new(id));
            }
            assert_eq!((spool_bytes(&outbox), memory_bytes(&outbox)), (0, 0));
            assert!(segments(&dir).is_empty());
        }
    }

    /// Connected hot path: chunks pushed, sent and acknowledged by a reader at once, with at
    /// most 16 chunks unacknowledged (a dispatcher that keeps up) or as many as the outbox
    /// takes (a producer faster than everything). Run with `cargo test --release -p kiln
    /// --lib outbox::tests::hot_path -- --ignored --nocapture`.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "a measurement"]
    async fn hot_path() {
        for (pace, window) in [("keeps up", 16), ("fire hose", u64::MAX)] {
            for len in [100, 4 << 10, 64 << 10] {
                for (what, max_spool, hot) in [
                    ("memory only", 0, HOT_BYTES),
                    ("spool", 64 << 20, HOT_BYTES),
                    ("spool, no hot window", 64 << 20, 0),
                ] {
                    let dir = tempfile::tempdir().unwrap();
                    let outbox = Outbox::new(dir.path().to_path_buf(), max_spool, 64 << 20);
                    let outbox = Arc::new(outbox.with_hot_limit(hot));
                    let n: u64 = if len > 4096 { 20_000 } else { 100_000 };
                    let (tx, mut rx) = mpsc::channel(128);
                    let (acked_tx, mut acked) = tokio::sync::watch::channel(0u64);
                    let stop = CancellationToken::new();
                    let writer = {
                        let (o, stop) = (outbox.clone(), stop.clone());
                        tokio::spawn(async move { o.pump(&tx, &stop).await })
                    };
                    let acker = {
                        let o = outbox.clone();
                        tokio::spawn(async move {
                            while let Some(m) = rx.recv().await {
                                if let RunnerMessage::Output(c) = m {
                                    o.ack_output(c.attempt_id, c.seq);
                                    let _ = acked_tx.send(c.seq);
                                    if c.seq == n {
                                        return;
                                    }
                                }
                            }
                        })
                    };
                    let data = payload(1, 0, len);
                    let started = Instant::now();
                    for seq in 1..=n {
                        if seq > window {
                            acked.wait_for(|a| *a >= seq - window).await.unwrap();
                        }
                        let msg = chunk(
                            AttemptId::new(1),
                            seq,
                            0,
                            OutputStream::Stdout,
                            data.clone(),
                        );
                        outbox.push_output(AttemptId::new(1), seq, msg, len).await;
                    }
                    acker.await.unwrap();
                    let took = started.elapsed();
                    stop.cancel();
                    writer.await.unwrap();
                    println!(
                        "{pace:>9}, chunk {len:>5} B, {what:>20}: {:>6.2} µs/chunk, {:>6.0} MiB/s, spool files left {}",
                        took.as_secs_f64() * 1e6 / n as f64,
                        (n * len as u64) as f64 / took.as_secs_f64() / (1 << 20) as f64,
                        segments(dir.path()).len(),
                    );
                }
            }
        }
    }
}

//! The outbox's accounting: what each attempt has waiting (in memory or in spooled runs),
//! the spool's and memory's bytes against their bounds, where the next frame goes, and what a
//! write or an acknowledgement frees. No I/O here but the warnings; the segment files are
//! `segment`'s, the writer `super`'s.

use std::collections::{BTreeMap, VecDeque};
use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use kiln_domain::AttemptId;
use kiln_domain::protocol::RunnerMessage;

use super::segment::Segment;

/// How often a failing spool is tried again while memory has room.
pub(super) const SPOOL_RETRY: Duration = Duration::from_secs(1);

/// The bounds the accounting keeps.
#[derive(Debug, Clone, Copy)]
pub(super) struct Limits {
    /// Most bytes in segment files (0: no spool).
    pub(super) max_spool_bytes: u64,
    /// Size at which a new segment is started.
    pub(super) segment_bytes: u64,
    /// Most output payload bytes kept in memory when the spool fails.
    pub(super) max_memory_bytes: usize,
    /// Most output payload bytes kept in memory while the spool works.
    pub(super) hot_limit: usize,
}

/// An output chunk on its way into the outbox.
#[derive(Clone, Copy)]
pub(super) struct Chunk<'a> {
    pub(super) attempt: AttemptId,
    pub(super) seq: u64,
    pub(super) msg: &'a RunnerMessage,
    /// Payload bytes.
    pub(super) bytes: usize,
}

/// How a frame's write went: the segment it is in, or the error (and the segment created for
/// it, if one was).
pub(super) type Written = Result<Arc<Segment>, (io::Error, Option<Arc<Segment>>)>;

/// A segment an attempt has written to.
pub(super) struct SegmentUse {
    pub(super) seg: Arc<Segment>,
    /// Bytes in the file, counted against the bound.
    pub(super) size: u64,
    /// Runs still pointing into it.
    pub(super) runs: usize,
}

/// Consecutive output chunks of one attempt and one step, back to back in one segment.
/// Frame `i` of the run has position `first_pos + i` and sequence number `first_seq + i`.
pub(super) struct Run {
    pub(super) seg: Arc<Segment>,
    /// Offset of the first frame.
    pub(super) start: u64,
    /// Offset just past the last frame.
    pub(super) end: u64,
    pub(super) first_pos: u64,
    pub(super) first_seq: u64,
    /// Frames in the run (at least one).
    pub(super) count: u64,
    /// Frames at the front already acknowledged (never sent again).
    pub(super) acked: u64,
    pub(super) step: u32,
}

impl Run {
    pub(super) fn last_seq(&self) -> u64 {
        self.first_seq + (self.count - 1)
    }
}

/// Something about an attempt waiting for its acknowledgement.
pub(super) enum Item {
    /// A message kept in memory: a small one (`seq` none), or an output chunk the spool did
    /// not take (`bytes` of payload counted against the memory bound).
    Message {
        pos: u64,
        seq: Option<u64>,
        msg: RunnerMessage,
        bytes: usize,
    },
    /// Output chunks in the spool.
    Spooled(Run),
}

impl Item {
    /// The position just past the item.
    pub(super) fn end_pos(&self) -> u64 {
        match self {
            Item::Message { pos, .. } => pos + 1,
            Item::Spooled(r) => r.first_pos + r.count,
        }
    }
}

/// Everything kept about one attempt.
pub(super) struct Attempt {
    /// Tells this attempt from an earlier one with the same id that was dropped.
    pub(super) generation: u64,
    /// Unacknowledged messages in order of position.
    pub(super) items: VecDeque<Item>,
    /// Position of the next message.
    pub(super) next_pos: u64,
    /// The segment chunks are appended to.
    pub(super) current: Option<SegmentUse>,
    /// Earlier segments still holding unacknowledged chunks.
    pub(super) sealed: Vec<SegmentUse>,
    /// Bytes reserved by a write in progress (one at a time per attempt).
    pub(super) writing: Option<u64>,
    /// Another `push_output` waits for that write.
    pub(super) contended: bool,
}

impl Attempt {
    pub(super) fn new(generation: u64) -> Self {
        Self {
            generation,
            items: VecDeque::new(),
            next_pos: 0,
            current: None,
            sealed: Vec::new(),
            writing: None,
            contended: false,
        }
    }

    /// Bytes of its segments, counted against the spool bound.
    pub(super) fn spool_bytes(&self) -> u64 {
        self.current.as_ref().map_or(0, |c| c.size)
            + self.sealed.iter().map(|s| s.size).sum::<u64>()
            + self.writing.unwrap_or(0)
    }

    /// Stops appending to a segment; returns the bytes freed (if no run points into it, it is
    /// deleted).
    pub(super) fn retire(&mut self, used: SegmentUse, garbage: &mut Vec<Arc<Segment>>) -> u64 {
        if used.runs == 0 {
            garbage.push(used.seg);
            used.size
        } else {
            self.sealed.push(used);
            0
        }
    }

    /// A run left; returns the bytes freed (a finished segment with no runs left is deleted;
    /// the current one stays until it is full or room is needed).
    pub(super) fn release(&mut self, run: Run, garbage: &mut Vec<Arc<Segment>>) -> u64 {
        if let Some(c) = self.current.as_mut()
            && c.seg.id == run.seg.id
        {
            c.runs -= 1;
            return 0;
        }
        let Some(i) = self.sealed.iter().position(|s| s.seg.id == run.seg.id) else {
            return 0;
        };
        self.sealed[i].runs -= 1;
        if self.sealed[i].runs > 0 {
            return 0;
        }
        let used = self.sealed.swap_remove(i);
        garbage.push(used.seg);
        used.size
    }
}

#[derive(Default)]
pub(super) struct Inner {
    pub(super) attempts: BTreeMap<AttemptId, Attempt>,
    pub(super) next_generation: u64,
    pub(super) next_segment: u64,
    /// Bytes of all segments not yet deleted, plus writes in progress.
    pub(super) spool_bytes: u64,
    /// Payload bytes of output chunks kept in memory.
    pub(super) memory_bytes: usize,
    /// The last spool write failed.
    pub(super) spool_failing: bool,
    /// When to try the failing spool again even if memory has room.
    pub(super) retry_at: Option<tokio::time::Instant>,
    /// A warning about the spool was logged and it has not worked since.
    pub(super) warned: bool,
}

impl Inner {
    pub(super) fn attempt(&mut self, id: AttemptId) -> &mut Attempt {
        let generation = self.next_generation;
        match self.attempts.entry(id) {
            std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::btree_map::Entry::Vacant(e) => {
                self.next_generation += 1;
                e.insert(Attempt::new(generation))
            }
        }
    }

    pub(super) fn insert_message(
        &mut self,
        attempt: AttemptId,
        seq: Option<u64>,
        msg: RunnerMessage,
        bytes: usize,
    ) {
        self.memory_bytes += bytes;
        let a = self.attempt(attempt);
        let pos = a.next_pos;
        a.next_pos += 1;
        a.items.push_back(Item::Message {
            pos,
            seq,
            msg,
            bytes,
        });
    }

    /// Deletes current segments whose chunks are all acknowledged.
    pub(super) fn reclaim(&mut self, garbage: &mut Vec<Arc<Segment>>) {
        for a in self.attempts.values_mut() {
            if a.writing.is_none()
                && a.current.as_ref().is_some_and(|c| c.runs == 0)
                && let Some(c) = a.current.take()
            {
                self.spool_bytes -= c.size;
                garbage.push(c.seg);
            }
        }
    }

    pub(super) fn spool_fail(&mut self, dir: &Path, cause: &io::Error) {
        self.spool_failing = true;
        self.retry_at = Some(tokio::time::Instant::now() + SPOOL_RETRY);
        if !self.warned {
            self.warned = true;
            tracing::warn!(
                dir = %dir.display(),
                %cause,
                "cannot write the output spool; keeping output in memory until it works again"
            );
        }
    }
}

/// Where a frame goes.
pub(super) enum Target {
    /// At the end of the attempt's current segment.
    Append { seg: Arc<Segment>, offset: u64 },
    /// At the start of a new segment.
    New { id: u64 },
}

/// Room taken in the spool for one frame.
pub(super) struct Reservation {
    pub(super) generation: u64,
    pub(super) target: Target,
    pub(super) len: u64,
}

/// What `push_output` does next.
pub(super) enum Route {
    Stored,
    Write(Reservation),
    Wait,
}

impl Inner {
    /// Decides where a chunk goes; stores it if in memory, reserves room if on disk.
    pub(super) fn route(
        &mut self,
        limits: &Limits,
        chunk: &Chunk<'_>,
        disk: bool,
        frame_len: u64,
        garbage: &mut Vec<Arc<Segment>>,
    ) -> Route {
        let inner = self;
        let Chunk {
            attempt,
            seq,
            msg,
            bytes,
        } = *chunk;
        if let Some(a) = inner.attempts.get_mut(&attempt)
            && a.writing.is_some()
        {
            a.contended = true;
            return Route::Wait;
        }
        // While acknowledgements keep up, output never leaves memory.
        let hot = inner.memory_bytes + bytes <= limits.hot_limit;
        let memory_fits =
            hot || inner.memory_bytes == 0 || inner.memory_bytes + bytes <= limits.max_memory_bytes;
        let retry = inner.memory_bytes == 0
            || !memory_fits
            || inner
                .retry_at
                .is_none_or(|at| tokio::time::Instant::now() >= at);
        if disk && !hot && (!inner.spool_failing || retry) {
            if let Some(res) = inner.reserve(limits, attempt, frame_len, garbage) {
                return Route::Write(res);
            }
            if !inner.spool_failing {
                return Route::Wait;
            }
        }
        if memory_fits {
            inner.insert_message(attempt, Some(seq), msg.clone(), bytes);
            return Route::Stored;
        }
        Route::Wait
    }

    /// Takes room for a frame of `len` bytes, if there is some.
    pub(super) fn reserve(
        &mut self,
        limits: &Limits,
        attempt: AttemptId,
        len: u64,
        garbage: &mut Vec<Arc<Segment>>,
    ) -> Option<Reservation> {
        let inner = self;
        let fits = |inner: &Inner| {
            inner.spool_bytes == 0 || inner.spool_bytes + len <= limits.max_spool_bytes
        };
        if !fits(inner) {
            inner.reclaim(garbage);
            if !fits(inner) {
                return None;
            }
        }
        let id = inner.next_segment;
        let a = inner.attempt(attempt);
        let mut freed = 0;
        let target = match a.current.take() {
            Some(c) if c.size < limits.segment_bytes => {
                let target = Target::Append {
                    seg: c.seg.clone(),
                    offset: c.size,
                };
                a.current = Some(c);
                target
            }
            Some(c) => {
                freed = a.retire(c, garbage);
                Target::New { id }
            }
            None => Target::New { id },
        };
        a.writing = Some(len);
        let generation = a.generation;
        if matches!(target, Target::New { .. }) {
            inner.next_segment += 1;
        }
        inner.spool_bytes = inner.spool_bytes - freed + len;
        Some(Reservation {
            generation,
            target,
            len,
        })
    }

    /// Records a frame written (or keeps the chunk in memory if the attempt was dropped
    /// meanwhile). Returns whether the chunk is stored, and whether to wake waiting producers.
    pub(super) fn complete(
        &mut self,
        spool_dir: &Path,
        chunk: &Chunk<'_>,
        step: u32,
        res: Reservation,
        written: Written,
        garbage: &mut Vec<Arc<Segment>>,
    ) -> (bool, bool) {
        let inner = self;
        let Chunk {
            attempt,
            seq,
            msg,
            bytes,
        } = *chunk;
        let Some(a) = inner
            .attempts
            .get_mut(&attempt)
            .filter(|a| a.generation == res.generation)
        else {
            // Dropped while we wrote (its segments and reservation are gone): like any late
            // message about it, the chunk is kept, in memory.
            match written {
                Ok(seg) | Err((_, Some(seg))) => garbage.push(seg),
                Err((_, None)) => {}
            }
            if let Target::Append { seg, .. } = res.target {
                garbage.push(seg);
            }
            inner.insert_message(attempt, Some(seq), msg.clone(), bytes);
            return (true, false);
        };
        a.writing = None;
        let notify = std::mem::take(&mut a.contended);
        match written {
            Ok(seg) => {
                let offset = match res.target {
                    Target::Append { offset, .. } => {
                        if let Some(c) = a.current.as_mut() {
                            c.size += res.len;
                        }
                        offset
                    }
                    Target::New { .. } => {
                        a.current = Some(SegmentUse {
                            seg: seg.clone(),
                            size: res.len,
                            runs: 0,
                        });
                        0
                    }
                };
                let pos = a.next_pos;
                a.next_pos += 1;
                let extended = match a.items.back_mut() {
                    Some(Item::Spooled(r))
                        if r.seg.id == seg.id
                            && r.end == offset
                            && r.step == step
                            && r.first_seq + r.count == seq
                            && r.first_pos + r.count == pos =>
                    {
                        r.end += res.len;
                        r.count += 1;
                        true
                    }
                    _ => false,
                };
                if !extended {
                    if let Some(c) = a.current.as_mut() {
                        c.runs += 1;
                    }
                    a.items.push_back(Item::Spooled(Run {
                        seg,
                        start: offset,
                        end: offset + res.len,
                        first_pos: pos,
                        first_seq: seq,
                        count: 1,
                        acked: 0,
                        step,
                    }));
                }
                if inner.spool_failing {
                    inner.spool_failing = false;
                    inner.warned = false;
                    tracing::info!(dir = %spool_dir.display(), "the output spool works again");
                }
                (true, notify)
            }
            Err((cause, created)) => {
                let mut freed = res.len;
                match res.target {
                    Target::Append { .. } => {
                        // Part of the frame may be in the file: it counts until the segment
                        // goes, and nothing more is appended to it.
                        if let Some(mut c) = a.current.take() {
                            c.size += res.len;
                            freed = a.retire(c, garbage);
                        }
                    }
                    Target::New { .. } => garbage.extend(created),
                }
                inner.spool_bytes -= freed;
                inner.spool_fail(spool_dir, &cause);
                (false, true)
            }
        }
    }
}

//! The checkpoint index of a log: `<job>.idx` beside `<job>.log` / `<job>.log.zst`.
//!
//! Every [`CHECKPOINT_EVERY`] bytes of log or so (at the first frame boundary past it) a
//! [`Checkpoint`] records the offset and, per attempt, the newlines of that attempt's output
//! before it and how its last output ended. A reader that wants the line number at an offset
//! starts from the checkpoint before it and reads at most about a MiB more, instead of the
//! whole log.
//!
//! What is counted is what [`super::LogStore::read`] returns: a dropped frame counts as the
//! one line saying what was dropped, for the attempt it names.
//!
//! The file is a sequence of self-delimiting records, each `b"KX"`, the number of attempts
//! (u16), the offset (u64), per attempt its id, newlines and the offset just past its last
//! output (u64 each) and whether that output ended a line (u8), then an FNV-1a checksum (u64)
//! of the record's bytes before it, all little-endian. Records are in increasing offset order;
//! the first one that is torn, fails its checksum or does not increase ends the file (a writer
//! cuts it off). The index is a cache: missing or behind, it is rebuilt or extended by
//! scanning the log from its last checkpoint.

use std::io::Read;
use std::path::Path;

use kiln_domain::AttemptId;

use super::{DROPPED, HEADER_LEN, LogError, body_len, decode_header, dropped_note, io_err};

/// Bytes of log between two checkpoints (at least: the next frame boundary after them).
pub const CHECKPOINT_EVERY: u64 = 1 << 20;

const RECORD_MAGIC: [u8; 2] = *b"KX";
/// Bytes per attempt in a record.
const ATTEMPT_LEN: usize = 25;
/// Bytes of a record around its attempts: magic, count, offset, checksum.
const RECORD_FIXED: usize = 2 + 2 + 8 + 8;

/// One attempt's output before a checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttemptLines {
    /// The attempt.
    pub attempt: AttemptId,
    /// Newlines in its output before the checkpoint.
    pub newlines: u64,
    /// Offset just past its last frame with output (0: none yet).
    pub last_end: u64,
    /// Whether that output ended with a newline.
    pub ends_line: bool,
}

/// A frame boundary of a log and what came before it, per attempt.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Checkpoint {
    /// The boundary (0: the log's start, nothing before it).
    pub offset: u64,
    /// Per attempt with output before `offset`, in the order they first wrote.
    pub attempts: Vec<AttemptLines>,
}

impl Checkpoint {
    /// Newlines of the shown attempts' output before the checkpoint, and whether that output
    /// ends a line (or is empty): otherwise the shown text from `offset` continues a line.
    pub fn lines(&self, shown: impl Fn(AttemptId) -> bool) -> (u64, bool) {
        let mut lines = 0;
        let mut last: Option<&AttemptLines> = None;
        for a in self.attempts.iter().filter(|a| shown(a.attempt)) {
            lines += a.newlines;
            if a.last_end > 0 && last.is_none_or(|l| a.last_end > l.last_end) {
                last = Some(a);
            }
        }
        (lines, last.is_none_or(|l| l.ends_line))
    }

    /// Counts one frame (its bytes as a reader gets them) that ends at `end`.
    pub(crate) fn add(&mut self, attempt: AttemptId, data: &[u8], end: u64) {
        self.offset = end;
        let Some(&last) = data.last() else {
            return;
        };
        let newlines = data.iter().filter(|&&b| b == b'\n').count() as u64;
        let a = match self.attempts.iter_mut().position(|a| a.attempt == attempt) {
            Some(i) => &mut self.attempts[i],
            None => {
                self.attempts.push(AttemptLines {
                    attempt,
                    newlines: 0,
                    last_end: 0,
                    ends_line: true,
                });
                let i = self.attempts.len() - 1;
                &mut self.attempts[i]
            }
        };
        a.newlines += newlines;
        a.last_end = end;
        a.ends_line = last == b'\n';
    }

    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&RECORD_MAGIC);
        out.extend_from_slice(&(self.attempts.len() as u16).to_le_bytes());
        out.extend_from_slice(&self.offset.to_le_bytes());
        for a in &self.attempts {
            out.extend_from_slice(&a.attempt.get().to_le_bytes());
            out.extend_from_slice(&a.newlines.to_le_bytes());
            out.extend_from_slice(&a.last_end.to_le_bytes());
            out.push(u8::from(a.ends_line));
        }
        let sum = fnv1a(&out[start..]);
        out.extend_from_slice(&sum.to_le_bytes());
    }
}

/// The checkpoints to write as one buffer.
pub(super) fn encode_all(cps: &[Checkpoint]) -> Vec<u8> {
    let mut out = Vec::new();
    for c in cps {
        c.encode(&mut out);
    }
    out
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn le64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

/// Decodes the valid records of an index file: each checkpoint with the file offset just past
/// its record.
pub(crate) fn decode(bytes: &[u8]) -> Vec<(Checkpoint, u64)> {
    let mut out: Vec<(Checkpoint, u64)> = Vec::new();
    let mut pos = 0usize;
    while let Some(head) = bytes.get(pos..pos + 4) {
        if head[0..2] != RECORD_MAGIC {
            break;
        }
        let n = u16::from_le_bytes([head[2], head[3]]) as usize;
        let len = RECORD_FIXED + n * ATTEMPT_LEN;
        let Some(rec) = bytes.get(pos..pos + len) else {
            break;
        };
        if fnv1a(&rec[..len - 8]) != le64(&rec[len - 8..]) {
            break;
        }
        let offset = le64(&rec[4..12]);
        if out.last().is_some_and(|(c, _)| c.offset >= offset) {
            break;
        }
        let attempts = rec[12..len - 8]
            .chunks_exact(ATTEMPT_LEN)
            .map(|a| AttemptLines {
                attempt: AttemptId::new(le64(&a[0..8])),
                newlines: le64(&a[8..16]),
                last_end: le64(&a[16..24]),
                ends_line: a[24] != 0,
            })
            .collect();
        pos += len;
        out.push((Checkpoint { offset, attempts }, pos as u64));
    }
    out
}

/// Reads an index file's valid records (none when it does not exist).
pub(super) fn load(path: &Path) -> Result<Vec<(Checkpoint, u64)>, LogError> {
    match std::fs::read(path) {
        Ok(bytes) => Ok(decode(&bytes)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(io_err(path)(e)),
    }
}

/// The last checkpoint at or before `target` (the log's start if none).
pub(crate) fn before(cps: &[Checkpoint], target: u64) -> Checkpoint {
    let i = cps.partition_point(|c| c.offset <= target);
    i.checked_sub(1).map(|i| cps[i].clone()).unwrap_or_default()
}

/// Whether a log whose last checkpoint is at `last` gets one at the frame boundary `end`: the
/// first boundary [`CHECKPOINT_EVERY`] or more after it (every writer of either store asks).
pub(crate) fn checkpoint_due(last: u64, end: u64) -> bool {
    end >= last + CHECKPOINT_EVERY
}

/// Walks the whole frames of a log from `start` (a frame boundary; `reader` is positioned
/// there) up to `limit`, counting as it goes. Returns the count at the end of the last whole
/// frame and the checkpoints passed, the first one [`CHECKPOINT_EVERY`] after `last`.
pub(super) fn scan(
    reader: impl Read,
    start: Checkpoint,
    mut last: u64,
    limit: u64,
    path: &Path,
) -> Result<(Checkpoint, Vec<Checkpoint>), LogError> {
    let mut reader = std::io::BufReader::with_capacity(1 << 16, reader);
    let mut tally = start;
    let mut cps = Vec::new();
    let mut header = [0u8; HEADER_LEN];
    let mut data = Vec::new();
    while tally.offset + HEADER_LEN as u64 <= limit {
        match reader.read_exact(&mut header) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(e) => return Err(io_err(path)(e)),
        }
        let Some((h, len)) = decode_header(&header) else {
            break;
        };
        let body = body_len(&h, len);
        let end = tally.offset + HEADER_LEN as u64 + body;
        if end > limit {
            break;
        }
        if h.stream == DROPPED {
            let skipped = std::io::copy(&mut (&mut reader).take(body), &mut std::io::sink())
                .map_err(io_err(path))?;
            if skipped != body {
                break;
            }
            tally.add(h.attempt, &dropped_note(h.attempt, body), end);
        } else {
            data.resize(len, 0);
            match reader.read_exact(&mut data) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
                Err(e) => return Err(io_err(path)(e)),
            }
            tally.add(h.attempt, &data, end);
        }
        if checkpoint_due(last, end) {
            last = end;
            cps.push(tally.clone());
        }
    }
    Ok((tally, cps))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_a_torn_or_corrupt_one_ends_the_file() {
        let a = |id, n, end, nl| AttemptLines {
            attempt: AttemptId::new(id),
            newlines: n,
            last_end: end,
            ends_line: nl,
        };
        let cps = vec![
            Checkpoint {
                offset: 10,
                attempts: vec![a(1, 3, 10, true)],
            },
            Checkpoint {
                offset: 20,
                attempts: vec![a(1, 3, 10, true), a(2, 7, 20, false)],
            },
            Checkpoint {
                offset: 30,
                attempts: vec![],
            },
        ];
        let bytes = encode_all(&cps);
        let back: Vec<Checkpoint> = decode(&bytes).into_iter().map(|(c, _)| c).collect();
        assert_eq!(back, cps);
        assert_eq!(decode(&bytes[..bytes.len() - 1]).len(), 2, "torn");
        let mut bad = bytes.clone();
        let second = decode(&bytes)[0].1 as usize;
        bad[second + 5] ^= 1;
        assert_eq!(decode(&bad).len(), 1, "corrupt");
        assert_eq!(before(&cps, 25).offset, 20);
        assert_eq!(before(&cps, 9), Checkpoint::default());
        let (lines, aligned) = cps[1].lines(|_| true);
        assert_eq!((lines, aligned), (10, false));
        assert_eq!(cps[1].lines(|a| a == AttemptId::new(1)), (3, true));
        assert_eq!(cps[1].lines(|_| false), (0, true));
    }
}

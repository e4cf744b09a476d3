//! [`JobLogs`] in PostgreSQL: job output in the database the builds are in, so that every
//! dispatcher of a farm reads any job's log live, and another dispatcher appends to it after
//! the one that wrote it died.
//!
//! - A frame is a row of `log_frames` holding exactly the bytes a log file holds at its
//!   offset (`start`): the 28-byte header, then the payload. A job's rows are contiguous from 0
//!   to its `log_heads.len`, so offsets, reads ([`crate::logs::read_frames`] over the rows as
//!   a byte stream), [`JobLogs::locate`] and every reader see what they see on files.
//! - An append is one `READ COMMITTED` transaction that first takes the job's `log_heads` row
//!   (created by the first append; `INSERT ... ON CONFLICT DO UPDATE` locks it either way), so
//!   appends to one job from several dispatchers queue on that row and each one sees the
//!   length the previous one committed. `UNIQUE (job_id, attempt, seq)`: a chunk sent again
//!   (a runner re-sending what was not acknowledged, to this or another dispatcher) inserts
//!   nothing and returns the current length.
//! - Line-count checkpoints ([`Checkpoint`], `logs/index.rs`): the head keeps the running
//!   count at `len` (`tally`, an index record), and the append that crosses a checkpoint
//!   boundary ([`index::checkpoint_due`]) writes the checkpoint in the same transaction, so
//!   checkpoints always describe committed output and `locate` reads about a MiB of log
//!   whatever its size, as on files.
//! - Durable at commit: `seal` and `sync` do nothing (TOAST compresses large frames at rest);
//!   `drop_attempts`, a measure for a full local disk, keeps everything.
//! - Same threading invariant as [`PgStore`]: call it only from threads that are not running
//!   async code.

use std::io::Read;
use std::path::PathBuf;
use std::sync::Arc;

use kiln_domain::{AttemptId, JobId};
use tokio_postgres::Row;

use super::{Params, PgStore, big, get_u64};
use crate::logs::{self, HEADER_LEN, encode_header, index};
use crate::sqlite::corrupt;
use crate::{
    Checkpoint, FrameHeader, JobLogs, LogError, MAX_FRAME, ReadResult, Result, StoreError,
};

/// Job output in PostgreSQL (see the module's documentation). Cheap to share: it holds the
/// [`PgStore`] whose connections it uses.
#[derive(Debug, Clone)]
pub struct PgLogStore {
    db: Arc<PgStore>,
}

/// One index record of a checkpoint (the bytes `log_heads.tally` and `log_checkpoints.record`
/// hold).
fn record(c: &Checkpoint) -> Vec<u8> {
    let mut out = Vec::new();
    c.encode(&mut out);
    out
}

/// A stored index record back.
fn checkpoint(bytes: &[u8]) -> Result<Checkpoint> {
    index::decode(bytes)
        .into_iter()
        .next()
        .map(|(c, _)| c)
        .ok_or_else(|| StoreError::Corrupt("log checkpoint record".into()))
}

impl PgStore {
    /// One statement on its own (no explicit transaction): one round trip.
    pub(crate) fn statement(&self, sql: &str, params: Params<'_>) -> Result<Vec<Row>> {
        self.pool.get()?.conn().query(None, sql, params)
    }
}

impl PgLogStore {
    /// Job output in `store`'s database, on its connections.
    pub fn new(store: Arc<PgStore>) -> Self {
        Self { db: store }
    }

    /// Connects to the database at `url` (see [`PgStore::connect`]).
    pub fn connect(url: &str) -> Result<Self> {
        Ok(Self::new(Arc::new(PgStore::connect(url)?)))
    }
}

/// Reads a job's frames as the byte stream a log file would be, from an offset, fetching
/// rows as the reader asks (about as many bytes as its buffer holds).
struct Rows<'a> {
    db: &'a PgStore,
    job: JobId,
    /// Where the next fetch starts (a frame boundary, but for the first one).
    next: u64,
    /// No fetch beyond it (a published length), but for the frame at `next`.
    limit: u64,
    /// Fetched bytes, and how many of them were read.
    buf: Vec<u8>,
    at: usize,
    /// Whether a fetch was made.
    started: bool,
}

impl Rows<'_> {
    fn fetch(&self, from: u64, until: u64) -> Result<Vec<(u64, Vec<u8>)>> {
        self.db
            .statement(
                "SELECT start, frame FROM log_frames WHERE job_id = $1 AND start >= $2 \
                 AND start < $3 ORDER BY start",
                &[&self.job, &big(from), &big(until)],
            )?
            .iter()
            .map(|r| Ok((get_u64(r, 0)?, r.try_get(1)?)))
            .collect()
    }

    /// Fetches the rows from `next` on (at least one, about `want` bytes of them).
    fn fill(&mut self, want: usize) -> Result<()> {
        self.buf.clear();
        self.at = 0;
        let until = self
            .next
            .saturating_add(want as u64)
            .min(self.limit)
            .max(self.next + 1);
        let rows = self.fetch(self.next, until)?;
        let first = !std::mem::replace(&mut self.started, true);
        if first && self.next > 0 && rows.first().is_none_or(|(s, _)| *s != self.next) {
            // The offset is no frame's start: read from the middle of the frame holding it,
            // as from a file (the reader then finds no frame header there).
            let held = self.db.statement(
                "SELECT start, frame FROM log_frames WHERE job_id = $1 AND start < $2 \
                 ORDER BY start DESC LIMIT 1",
                &[&self.job, &big(self.next)],
            )?;
            if let Some(r) = held.first() {
                let start = get_u64(r, 0)?;
                let frame: Vec<u8> = r.try_get(1)?;
                let end = start + frame.len() as u64;
                if end > self.next {
                    self.buf = frame[(self.next - start) as usize..].to_vec();
                    self.next = end;
                }
            }
            return Ok(());
        }
        for (start, frame) in rows {
            if start != self.next {
                break;
            }
            self.next += frame.len() as u64;
            self.buf.extend_from_slice(&frame);
        }
        Ok(())
    }
}

impl Read for Rows<'_> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        if out.is_empty() {
            return Ok(0);
        }
        if self.at == self.buf.len() {
            self.fill(out.len()).map_err(std::io::Error::other)?;
        }
        let n = out.len().min(self.buf.len() - self.at);
        out[..n].copy_from_slice(&self.buf[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

impl JobLogs for PgLogStore {
    fn append(&self, job: JobId, header: &FrameHeader, data: &[u8]) -> Result<u64, LogError> {
        if data.len() > MAX_FRAME {
            return Err(LogError::TooLarge(data.len()));
        }
        let mut frame = Vec::with_capacity(HEADER_LEN + data.len());
        frame.extend_from_slice(&encode_header(header, data.len()));
        frame.extend_from_slice(data);
        let empty = record(&Checkpoint::default());
        let (attempt, seq) = (header.attempt, big(header.seq));
        let len = self.db.write_committed(|db| {
            // The head's lock: appends to this job queue here, each one seeing the last one's
            // commit.
            let head = db.query_one(
                "INSERT INTO log_heads (job_id, len, checkpoint, tally) VALUES ($1, 0, 0, $2) \
                 ON CONFLICT (job_id) DO UPDATE SET job_id = EXCLUDED.job_id \
                 RETURNING len, checkpoint, tally",
                &[&job, &empty],
            )?;
            let (len, last) = (get_u64(&head, 0)?, get_u64(&head, 1)?);
            let mut tally = checkpoint(&head.try_get::<_, Vec<u8>>(2)?)?;
            if tally.offset != len {
                return Err(corrupt(
                    "log head",
                    format!("job {job}'s line count is at {} of {len}", tally.offset),
                ));
            }
            let inserted = db.execute(
                "INSERT INTO log_frames (job_id, start, attempt, seq, frame) \
                 VALUES ($1, $2, $3, $4, $5) ON CONFLICT (job_id, attempt, seq) DO NOTHING",
                &[&job, &big(len), &attempt, &seq, &frame],
            )?;
            if inserted == 0 {
                // Stored already (sent again): nothing changes.
                return Ok(len);
            }
            let end = len + frame.len() as u64;
            tally.add(attempt, data, end);
            let mut checkpoint_at = last;
            if index::checkpoint_due(last, end) {
                db.execute(
                    "INSERT INTO log_checkpoints (job_id, at, record) VALUES ($1, $2, $3)",
                    &[&job, &big(end), &record(&tally)],
                )?;
                checkpoint_at = end;
            }
            db.execute(
                "UPDATE log_heads SET len = $2, checkpoint = $3, tally = $4 WHERE job_id = $1",
                &[&job, &big(end), &big(checkpoint_at), &record(&tally)],
            )?;
            Ok(end)
        })?;
        Ok(len)
    }

    fn len(&self, job: JobId) -> Result<u64, LogError> {
        let rows = self
            .db
            .statement("SELECT len FROM log_heads WHERE job_id = $1", &[&job])?;
        Ok(rows
            .first()
            .map(|r| get_u64(r, 0))
            .transpose()?
            .unwrap_or(0))
    }

    fn last_seq(&self, job: JobId, attempt: AttemptId) -> Result<u64, LogError> {
        let rows = self.db.statement(
            "SELECT MAX(seq) FROM log_frames WHERE job_id = $1 AND attempt = $2",
            &[&job, &attempt],
        )?;
        let last: Option<i64> = match rows.first() {
            Some(r) => r.try_get(0).map_err(StoreError::from)?,
            None => None,
        };
        Ok(last.map_or(Ok(0), |v| {
            u64::try_from(v).map_err(|e| corrupt("stored number", e))
        })?)
    }

    fn read(
        &self,
        job: JobId,
        offset: u64,
        limit: u64,
        max_bytes: usize,
    ) -> Result<ReadResult, LogError> {
        logs::read_frames(job, offset, limit, max_bytes, || {
            let rows = Rows {
                db: &self.db,
                job,
                next: offset,
                limit,
                buf: Vec::new(),
                at: 0,
                started: false,
            };
            Ok((rows, PathBuf::from(format!("log_frames of job {job}"))))
        })
    }

    fn checkpoint_before(&self, job: JobId, target: u64) -> Result<Checkpoint, LogError> {
        let rows = self.db.statement(
            "SELECT record FROM log_checkpoints WHERE job_id = $1 AND at <= $2 \
             ORDER BY at DESC LIMIT 1",
            &[&job, &big(target)],
        )?;
        match rows.first() {
            Some(r) => Ok(checkpoint(
                &r.try_get::<_, Vec<u8>>(0).map_err(StoreError::from)?,
            )?),
            None => Ok(Checkpoint::default()),
        }
    }

    /// Nothing to do: the database compresses large frames itself (TOAST).
    fn seal(&self, _job: JobId) -> Result<Option<(u64, u64)>, LogError> {
        Ok(None)
    }

    /// Nothing to do: every append is durable at its commit.
    fn sync(&self, _job: JobId) -> Result<(), LogError> {
        Ok(())
    }

    /// Nothing to do: every append is durable at its commit.
    fn sync_all(&self) -> Result<(), LogError> {
        Ok(())
    }

    /// Keeps everything: dropping output frees a full local disk, which the database is not.
    fn drop_attempts(&self, _job: JobId, _keep: AttemptId) -> Result<u64, LogError> {
        Ok(0)
    }

    /// The frames' stored sizes (compressed where TOAST compressed them).
    fn disk_usage(&self, job: JobId) -> Result<u64, LogError> {
        let rows = self.db.statement(
            "SELECT COALESCE(SUM(pg_column_size(frame)), 0)::BIGINT FROM log_frames \
             WHERE job_id = $1",
            &[&job],
        )?;
        Ok(rows
            .first()
            .map(|r| get_u64(r, 0))
            .transpose()?
            .unwrap_or(0))
    }
}

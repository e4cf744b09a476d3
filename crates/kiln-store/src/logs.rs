//! The append-only log store: one file per job, a sequence of frames.
//!
//! A frame is a fixed 28-byte header (magic, stream, step, attempt, sequence number, length)
//! followed by the bytes. Offsets handed to readers are frame boundaries; a reader that passes
//! anything else gets [`LogError::BadOffset`]. A frame cut short by a crash is cut off when the
//! file is next opened for writing.
//!
//! A running job's log is a plain file, `<job>.log`. Once the job has ended, [`LogStore::seal`]
//! compresses it at rest into `<job>.log.zst` in the zstd *seekable* format (independent zstd
//! frames of [`SEAL_FRAME`] bytes of log plus a seek table), so a reader at any offset
//! decompresses at most one such frame before its data: offsets, lengths and reads are the same
//! before and after. Any zstd decoder can read a sealed log whole (`zstd -d`). A late append to
//! a sealed log unseals it first.
//!
//! Each frame names its attempt, so the output of attempts that were superseded (their runner
//! was lost and the job runs again) can be dropped from a running job's log when the disk is
//! full ([`LogStore::drop_attempts`]): each run of such frames becomes one *dropped* frame
//! (stream 0, no payload, `seq` = the bytes that follow it) over a hole punched in the file.
//! Offsets stay valid; readers get one system line saying what was dropped in its place.
//!
//! Each log has a checkpoint index, `<job>.idx` (see [`index`]): every [`CHECKPOINT_EVERY`]
//! bytes or so, per attempt, the newlines of its output so far, so a reader finds the line
//! number at any offset ([`LogStore::locate`]) by reading about a MiB from the checkpoint before
//! it. The writer keeps the checkpoints in memory and appends them to the file when the log is
//! synced (after the log itself), so the file never describes output a machine crash could
//! lose. A missing or short index is extended from its last checkpoint by the next writer (when
//! it opens the log) or reader (who saves it). Sealing keeps it (offsets are the same).
//! Dropping frames cuts it back to the first dropped frame and counts again from there: the
//! kept attempt's counts do not change, and a dropped attempt counts as readers see it (one
//! line per dropped run).

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use kiln_domain::{AttemptId, JobId};
use zeekstd::{EncodeOptions, FrameSizePolicy};

pub(crate) mod index;
#[cfg(test)]
mod shared_tests;
pub use index::{AttemptLines, CHECKPOINT_EVERY, Checkpoint};

const MAGIC: [u8; 2] = *b"KL";
/// Bytes of log per independent zstd frame of a sealed log: what a reader at an arbitrary
/// offset decompresses at most before its data.
pub const SEAL_FRAME: u32 = 1 << 20;
/// zstd level of sealed logs (the library's default: fast, and output compresses well).
const SEAL_LEVEL: i32 = 3;
pub(crate) const HEADER_LEN: usize = 28;
/// `stream` of a dropped frame: the `seq` bytes after its header were dropped (a hole).
const DROPPED: u8 = 0;
/// `stream` of kiln's own lines (the wire's `OutputStream::System`).
const SYSTEM: u8 = 3;
/// Largest frame payload accepted.
pub const MAX_FRAME: usize = 1 << 20;

/// Errors from the log store.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// File system trouble (full disk, permissions).
    #[error("log store i/o error on {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        cause: std::io::Error,
    },
    /// The offset is not the start of a frame of this log.
    #[error("offset {offset} is not a frame boundary of job {job}'s log (size {size})")]
    BadOffset {
        /// The job.
        job: JobId,
        /// The offset asked for.
        offset: u64,
        /// The log's size.
        size: u64,
    },
    /// A frame is larger than [`MAX_FRAME`].
    #[error("output chunk of {0} bytes is larger than the limit of {MAX_FRAME}")]
    TooLarge(usize),
    /// The database holding the logs failed ([`crate::PgLogStore`]).
    #[error("log store database error")]
    Database(#[from] crate::StoreError),
}

impl LogError {
    /// Whether the write failed because the disk (or the quota) is full.
    pub fn is_disk_full(&self) -> bool {
        match self {
            LogError::Io { cause, .. } => is_disk_full(cause),
            LogError::Database(e) => e.is_disk_full(),
            LogError::BadOffset { .. } | LogError::TooLarge(_) => false,
        }
    }
}

/// Whether an i/o error means "no space left" (ENOSPC, or EDQUOT: out of quota).
pub fn is_disk_full(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
    )
}

/// What a frame says about its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// Attempt that produced it.
    pub attempt: AttemptId,
    /// The attempt's sequence number for this chunk.
    pub seq: u64,
    /// Step index.
    pub step: u32,
    /// 1 stdout, 2 stderr, 3 system (the wire's `OutputStream` numbers).
    pub stream: u8,
}

/// A frame read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// Its header.
    pub header: FrameHeader,
    /// Its bytes.
    pub data: Vec<u8>,
    /// Offset just past this frame.
    pub next_offset: u64,
}

/// Frames read from an offset.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReadResult {
    /// The frames, in order.
    pub frames: Vec<Frame>,
    /// Where to continue.
    pub next_offset: u64,
}

/// Most payload [`LogStore::locate_from`] reads at once.
const LOCATE_READ: usize = 1 << 20;

/// Where a reader of a log's middle starts: the first frame boundary at or after a target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Located {
    /// The boundary.
    pub offset: u64,
    /// Newlines of shown output before it.
    pub lines: u64,
    /// Whether the shown output before it ends a line (or there is none): otherwise the text
    /// from `offset` starts in the middle of line `lines + 1`.
    pub aligned: bool,
}

/// A log open for appending.
struct Writer {
    file: File,
    /// The log's length.
    len: u64,
    /// What the log holds up to `len`, counted as its index counts.
    tally: Checkpoint,
    /// Every checkpoint of the log so far.
    checkpoints: Vec<Checkpoint>,
    /// How many of them the index file holds (written when the log is synced)...
    persisted: usize,
    /// ...in its first `index_len` bytes.
    index_len: u64,
}

/// One file per job under a directory.
pub struct LogStore {
    /// The directory holding `<job>.log` files.
    dir: PathBuf,
    /// Files open for appending.
    writers: Mutex<HashMap<JobId, Writer>>,
    /// Bumped (under the writers' lock) whenever frames are dropped: a reader that extended an
    /// index meanwhile does not save it.
    epoch: AtomicU64,
}

impl std::fmt::Debug for LogStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogStore").field("dir", &self.dir).finish()
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> LogError + '_ {
    move |cause| LogError::Io {
        path: path.to_path_buf(),
        cause,
    }
}

pub(crate) fn encode_header(h: &FrameHeader, len: usize) -> [u8; HEADER_LEN] {
    let mut b = [0u8; HEADER_LEN];
    b[0..2].copy_from_slice(&MAGIC);
    b[2] = h.stream;
    b[3] = 0;
    b[4..8].copy_from_slice(&h.step.to_le_bytes());
    b[8..16].copy_from_slice(&h.attempt.get().to_le_bytes());
    b[16..24].copy_from_slice(&h.seq.to_le_bytes());
    b[24..28].copy_from_slice(&(len as u32).to_le_bytes());
    b
}

fn decode_header(b: &[u8; HEADER_LEN]) -> Option<(FrameHeader, usize)> {
    if b[0..2] != MAGIC {
        return None;
    }
    let le32 = |r: std::ops::Range<usize>| {
        let mut a = [0u8; 4];
        a.copy_from_slice(&b[r]);
        u32::from_le_bytes(a)
    };
    let le64 = |r: std::ops::Range<usize>| {
        let mut a = [0u8; 8];
        a.copy_from_slice(&b[r]);
        u64::from_le_bytes(a)
    };
    let len = le32(24..28) as usize;
    if len > MAX_FRAME {
        return None;
    }
    Some((
        FrameHeader {
            stream: b[2],
            step: le32(4..8),
            attempt: AttemptId::new(le64(8..16)),
            seq: le64(16..24),
        },
        len,
    ))
}

/// Bytes after a frame's header: its payload, or for a dropped frame the hole it stands for.
fn body_len(h: &FrameHeader, len: usize) -> u64 {
    if h.stream == DROPPED {
        h.seq
    } else {
        len as u64
    }
}

/// What a reader gets in place of a dropped frame of `attempt` over `body` bytes: one line.
fn dropped_note(attempt: AttemptId, body: u64) -> Vec<u8> {
    format!("kiln: {body} bytes of output of attempt {attempt} were dropped to free disk space\n")
        .into_bytes()
}

/// Walks the frames of a file from the start; returns the offset after the last whole frame and
/// the last sequence number seen per attempt.
fn scan(file: &mut File, path: &Path) -> Result<(u64, HashMap<AttemptId, u64>), LogError> {
    let size = file.metadata().map_err(io_err(path))?.len();
    file.seek(SeekFrom::Start(0)).map_err(io_err(path))?;
    scan_reader(&mut *file, size, path)
}

/// [`scan`] over any reader of a log of `size` bytes (a sealed log's decoder).
fn scan_reader(
    reader: impl Read,
    size: u64,
    path: &Path,
) -> Result<(u64, HashMap<AttemptId, u64>), LogError> {
    let mut pos = 0u64;
    let mut last = HashMap::new();
    let mut header = [0u8; HEADER_LEN];
    let mut reader = std::io::BufReader::new(reader);
    while pos + HEADER_LEN as u64 <= size {
        reader.read_exact(&mut header).map_err(io_err(path))?;
        let Some((h, len)) = decode_header(&header) else {
            break;
        };
        let body = body_len(&h, len);
        if pos + HEADER_LEN as u64 + body > size {
            break;
        }
        let skipped = std::io::copy(&mut (&mut reader).take(body), &mut std::io::sink())
            .map_err(io_err(path))?;
        if skipped != body {
            break;
        }
        pos += HEADER_LEN as u64 + body;
        if h.stream != DROPPED {
            last.insert(h.attempt, h.seq);
        }
    }
    Ok((pos, last))
}

/// A zeekstd error as an i/o error (its causes are i/o or corrupt data).
fn zstd_io(e: zeekstd::Error) -> std::io::Error {
    std::io::Error::other(e)
}

/// An open sealed log: its decoder and its uncompressed length.
fn open_sealed(path: &Path) -> Result<Option<(zeekstd::Decoder<'static, File>, u64)>, LogError> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(path)(e)),
    };
    let decoder = zeekstd::Decoder::new(file)
        .map_err(zstd_io)
        .map_err(io_err(path))?;
    let size = decoder.seek_table().size_decomp();
    Ok(Some((decoder, size)))
}

/// Reads whole frames of `job`'s log starting at `offset` and ending at or before `limit`, at
/// most about `max_bytes` of payload (always at least one frame), from the source `open` gives
/// (positioned at `offset`, with the name errors give it): [`JobLogs::read`] of either store,
/// so both return the same frames, offsets and errors for the same bytes.
pub(crate) fn read_frames<R: Read>(
    job: JobId,
    offset: u64,
    limit: u64,
    max_bytes: usize,
    open: impl FnOnce() -> Result<(R, PathBuf), LogError>,
) -> Result<ReadResult, LogError> {
    if offset >= limit {
        if offset > limit {
            return Err(LogError::BadOffset {
                job,
                offset,
                size: limit,
            });
        }
        return Ok(ReadResult {
            frames: Vec::new(),
            next_offset: offset,
        });
    }
    let (source, path) = open()?;
    let path = path.as_path();
    let want = (limit - offset).min((max_bytes.saturating_add(HEADER_LEN) as u64).saturating_mul(2))
        as usize;
    let mut reader = std::io::BufReader::with_capacity(want.clamp(4096, 4 << 20), source);
    let mut frames = Vec::new();
    let mut pos = offset;
    let mut total = 0usize;
    let mut header = [0u8; HEADER_LEN];
    while pos + HEADER_LEN as u64 <= limit && (frames.is_empty() || total < max_bytes) {
        reader.read_exact(&mut header).map_err(io_err(path))?;
        let Some((h, len)) = decode_header(&header) else {
            return Err(LogError::BadOffset {
                job,
                offset,
                size: limit,
            });
        };
        let body = body_len(&h, len);
        if pos + HEADER_LEN as u64 + body > limit {
            break;
        }
        let (header, data) = if h.stream == DROPPED {
            std::io::copy(&mut (&mut reader).take(body), &mut std::io::sink())
                .map_err(io_err(path))?;
            let header = FrameHeader {
                stream: SYSTEM,
                seq: 0,
                ..h
            };
            (header, dropped_note(h.attempt, body))
        } else {
            let mut data = vec![0u8; len];
            reader.read_exact(&mut data).map_err(io_err(path))?;
            (h, data)
        };
        pos += HEADER_LEN as u64 + body;
        total += data.len();
        frames.push(Frame {
            header,
            data,
            next_offset: pos,
        });
    }
    if frames.is_empty() && offset < limit {
        return Err(LogError::BadOffset {
            job,
            offset,
            size: limit,
        });
    }
    Ok(ReadResult {
        frames,
        next_offset: pos,
    })
}

impl LogStore {
    /// Opens (creating) the directory.
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self, LogError> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        Ok(Self {
            dir,
            writers: Mutex::new(HashMap::new()),
            epoch: AtomicU64::new(0),
        })
    }

    fn path(&self, job: JobId) -> PathBuf {
        self.dir.join(format!("{job}.log"))
    }

    fn sealed_path(&self, job: JobId) -> PathBuf {
        self.dir.join(format!("{job}.log.zst"))
    }

    fn index_path(&self, job: JobId) -> PathBuf {
        self.dir.join(format!("{job}.idx"))
    }

    /// Turns a sealed log back into a plain one (a late append to a finished job). Called with
    /// the writers' lock held and no plain file.
    fn unseal(&self, job: JobId) -> Result<(), LogError> {
        let (plain, sealed) = (self.path(job), self.sealed_path(job));
        let Some((mut decoder, _)) = open_sealed(&sealed)? else {
            return Ok(());
        };
        let tmp = self.dir.join(format!("{job}.log.tmp"));
        let mut out = File::create(&tmp).map_err(io_err(&tmp))?;
        std::io::copy(&mut decoder, &mut out).map_err(io_err(&sealed))?;
        out.sync_all().map_err(io_err(&tmp))?;
        std::fs::rename(&tmp, &plain).map_err(io_err(&plain))?;
        std::fs::remove_file(&sealed).map_err(io_err(&sealed))?;
        Ok(())
    }

    /// Compresses a finished job's log at rest (see the module docs); returns the plain and the
    /// sealed size in bytes, or `None` when there is nothing to seal (no output, already sealed,
    /// or the job is still being written). Readers keep working throughout: the sealed file is
    /// complete and on disk before the plain one goes.
    pub fn seal(&self, job: JobId) -> Result<Option<(u64, u64)>, LogError> {
        if self.writers().contains_key(&job) {
            return Ok(None);
        }
        let (plain, sealed) = (self.path(job), self.sealed_path(job));
        let mut input = match File::open(&plain) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err(&plain)(e)),
        };
        let tmp = self.dir.join(format!("{job}.log.zst.tmp"));
        let mut out = File::create(&tmp).map_err(io_err(&tmp))?;
        let written = (|| {
            let opts = EncodeOptions::new()
                .frame_size_policy(FrameSizePolicy::Uncompressed(SEAL_FRAME))
                .compression_level(SEAL_LEVEL);
            let mut encoder = opts.into_encoder(&mut out).map_err(zstd_io)?;
            let copied = std::io::copy(&mut input, &mut encoder)?;
            let written = encoder.finish().map_err(zstd_io)?;
            out.sync_all()?;
            Ok::<_, std::io::Error>((copied, written))
        })();
        let (copied, written) = match written {
            Ok(w) => w,
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(io_err(&tmp)(e));
            }
        };
        // Swap under the writers' lock, unless an append came meanwhile.
        let writers = self.writers();
        let unchanged = std::fs::metadata(&plain).is_ok_and(|m| m.len() == copied);
        if writers.contains_key(&job) || !unchanged {
            let _ = std::fs::remove_file(&tmp);
            return Ok(None);
        }
        std::fs::rename(&tmp, &sealed).map_err(io_err(&sealed))?;
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err(&self.dir))?;
        std::fs::remove_file(&plain).map_err(io_err(&plain))?;
        drop(writers);
        Ok(Some((copied, written)))
    }

    /// Bytes the job's log takes on disk (plain or sealed), for measurements.
    pub fn disk_usage(&self, job: JobId) -> Result<u64, LogError> {
        let mut total = 0;
        for path in [self.path(job), self.sealed_path(job)] {
            match std::fs::metadata(&path) {
                Ok(m) => total += m.len(),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err(&path)(e)),
            }
        }
        Ok(total)
    }

    fn writers(&self) -> MutexGuard<'_, HashMap<JobId, Writer>> {
        self.writers.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends one frame and returns the log's new length (the offset just past it). The bytes
    /// are handed to the kernel before this returns, so readers see them at once; they are
    /// flushed to disk by [`LogStore::sync`].
    pub fn append(&self, job: JobId, header: &FrameHeader, data: &[u8]) -> Result<u64, LogError> {
        if data.len() > MAX_FRAME {
            return Err(LogError::TooLarge(data.len()));
        }
        let path = self.path(job);
        let mut writers = self.writers();
        let w = match writers.entry(job) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => e.insert(self.open_writer(job)?),
        };
        let mut buf = Vec::with_capacity(HEADER_LEN + data.len());
        buf.extend_from_slice(&encode_header(header, data.len()));
        buf.extend_from_slice(data);
        if let Err(cause) = w.file.write_all(&buf) {
            // Leave no half frame behind: cut back to the last whole one.
            let _ = w.file.set_len(w.len);
            let _ = w.file.seek(SeekFrom::Start(w.len));
            return Err(LogError::Io { path, cause });
        }
        w.len += buf.len() as u64;
        w.tally.add(header.attempt, data, w.len);
        if index::checkpoint_due(w.checkpoints.last().map_or(0, |c| c.offset), w.len) {
            w.checkpoints.push(w.tally.clone());
        }
        Ok(w.len)
    }

    /// Opens a job's log for appending (unsealing it if needed): cuts off a frame a crash left
    /// half written, and brings the index up to the log's end, from its last checkpoint that
    /// is still a frame boundary of the log (the index file keeps its valid records only).
    /// Called with the writers' lock held.
    fn open_writer(&self, job: JobId) -> Result<Writer, LogError> {
        use std::os::unix::fs::FileExt;
        let path = self.path(job);
        if !path.exists() {
            self.unseal(job)?;
        }
        let mut file = OpenOptions::new()
            .create(true)
            .read(true)
            .write(true)
            .truncate(false)
            .open(&path)
            .map_err(io_err(&path))?;
        let size = file.metadata().map_err(io_err(&path))?.len();
        let idx = self.index_path(job);
        // An index that cannot be read is rebuilt.
        let mut saved = index::load(&idx).unwrap_or_default();
        saved.truncate(saved.partition_point(|(c, _)| c.offset <= size));
        // The last checkpoint must start a frame (or be the end); else start over.
        if let Some((c, _)) = saved.last()
            && c.offset < size
        {
            let mut header = [0u8; HEADER_LEN];
            let whole = file.read_exact_at(&mut header, c.offset).is_ok();
            if !whole || decode_header(&header).is_none() {
                saved.clear();
            }
        }
        let start = saved.last().map(|(c, _)| c.clone()).unwrap_or_default();
        file.seek(SeekFrom::Start(start.offset))
            .map_err(io_err(&path))?;
        let from = start.offset;
        let (tally, fresh) = index::scan(&mut file, start, from, size, &path)?;
        let end = tally.offset;
        // Cut off a frame a crash left half written.
        file.set_len(end).map_err(io_err(&path))?;
        file.seek(SeekFrom::Start(end)).map_err(io_err(&path))?;
        let index_len = saved.last().map_or(0, |(_, e)| *e);
        if std::fs::metadata(&idx).is_ok_and(|m| m.len() != index_len) {
            // Cut what does not hold; if that fails, the records written later are unreachable
            // behind it (never wrong, only not used).
            let _ = OpenOptions::new()
                .write(true)
                .open(&idx)
                .and_then(|f| f.set_len(index_len));
        }
        let persisted = saved.len();
        let mut checkpoints: Vec<Checkpoint> = saved.into_iter().map(|(c, _)| c).collect();
        checkpoints.extend(fresh);
        Ok(Writer {
            file,
            len: end,
            tally,
            checkpoints,
            persisted,
            index_len,
        })
    }

    /// Writes a writer's new checkpoints to the index file (after its log was synced, so the
    /// index never describes output a machine crash could lose). The index is a cache: if this
    /// fails, the file is cut back to what it held and readers scan from there.
    fn save_index(&self, job: JobId, w: &mut Writer) {
        use std::os::unix::fs::FileExt;
        if w.persisted >= w.checkpoints.len() {
            return;
        }
        let idx = self.index_path(job);
        let buf = index::encode_all(&w.checkpoints[w.persisted..]);
        let Ok(f) = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(false)
            .open(&idx)
        else {
            return;
        };
        let written = f
            .set_len(w.index_len)
            .and_then(|()| f.write_all_at(&buf, w.index_len))
            .and_then(|()| f.sync_data());
        match written {
            Ok(()) => {
                w.index_len += buf.len() as u64;
                w.persisted = w.checkpoints.len();
            }
            Err(_) => {
                let _ = f.set_len(w.index_len);
            }
        }
    }

    /// A reader of a job's log positioned at `offset` (plain or sealed) and the file it reads.
    fn reader_at(&self, job: JobId, offset: u64) -> Result<(Box<dyn Read>, PathBuf), LogError> {
        let path = self.path(job);
        match File::open(&path) {
            Ok(mut file) => {
                file.seek(SeekFrom::Start(offset)).map_err(io_err(&path))?;
                Ok((Box::new(file), path))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let sealed = self.sealed_path(job);
                let Some((mut decoder, size)) = open_sealed(&sealed)? else {
                    return Err(io_err(&path)(e));
                };
                if offset > size {
                    return Err(LogError::BadOffset { job, offset, size });
                }
                decoder
                    .set_offset(offset)
                    .map_err(zstd_io)
                    .map_err(io_err(&sealed))?;
                Ok((Box::new(decoder), sealed))
            }
            Err(e) => Err(io_err(&path)(e)),
        }
    }

    /// The last checkpoint of the log's index at or before `target` (the log's start if there
    /// is none): a frame boundary, with each attempt's newlines before it. An index that is
    /// missing or more than two checkpoints behind `target` (an old log, a crash) is extended
    /// first by scanning the log from its last checkpoint, and saved when the log is not open
    /// for appending (its writer keeps it then).
    pub fn checkpoint_before(&self, job: JobId, target: u64) -> Result<Checkpoint, LogError> {
        if let Some(w) = self.writers().get(&job) {
            return Ok(index::before(&w.checkpoints, target.min(w.len)));
        }
        let epoch = self.epoch.load(Ordering::SeqCst);
        let mut cps: Vec<Checkpoint> = index::load(&self.index_path(job))?
            .into_iter()
            .map(|(c, _)| c)
            .collect();
        let len = self.len(job)?;
        cps.truncate(cps.partition_point(|c| c.offset <= len));
        let target = target.min(len);
        let last = cps.last().cloned().unwrap_or_default();
        if target >= last.offset + 2 * CHECKPOINT_EVERY {
            let from = last.offset;
            let (reader, path) = self.reader_at(job, from)?;
            let (_, fresh) = index::scan(reader, last, from, len, &path)?;
            self.extend_index(job, epoch, &fresh);
            cps.extend(fresh);
        }
        Ok(index::before(&cps, target))
    }

    /// Saves checkpoints a reader found beyond a closed log's index, unless the log was opened
    /// for appending or had frames dropped meanwhile. Best effort: the index is a cache.
    fn extend_index(&self, job: JobId, epoch: u64, fresh: &[Checkpoint]) {
        use std::os::unix::fs::FileExt;
        if fresh.is_empty() {
            return;
        }
        // The log first: the index never describes output a machine crash could lose.
        if let Ok(f) = File::open(self.path(job))
            && f.sync_data().is_err()
        {
            return;
        }
        let writers = self.writers();
        if writers.contains_key(&job) || self.epoch.load(Ordering::SeqCst) != epoch {
            return;
        }
        let idx = self.index_path(job);
        let Ok(saved) = index::load(&idx) else {
            return;
        };
        let (valid, last) = saved
            .last()
            .map_or((0, None), |(c, e)| (*e, Some(c.offset)));
        let new: Vec<Checkpoint> = fresh
            .iter()
            .filter(|c| last.is_none_or(|l| c.offset > l))
            .cloned()
            .collect();
        if new.is_empty() {
            return;
        }
        let buf = index::encode_all(&new);
        let Ok(f) = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(false)
            .open(&idx)
        else {
            return;
        };
        let written = f
            .set_len(valid)
            .and_then(|()| f.write_all_at(&buf, valid))
            .and_then(|()| f.sync_data());
        if written.is_err() {
            let _ = f.set_len(valid);
        }
        drop(writers);
    }

    /// The first frame boundary at or after `target` (or `limit`, a published length) and the
    /// lines of shown output before it, reading from the checkpoint before `target`: at most
    /// about [`CHECKPOINT_EVERY`] plus one frame of log, whatever its size.
    pub fn locate(
        &self,
        job: JobId,
        target: u64,
        limit: u64,
        shown: impl Fn(AttemptId) -> bool,
    ) -> Result<Located, LogError> {
        let start = self.checkpoint_before(job, target.min(limit))?;
        self.locate_from(job, start, target, limit, shown)
    }

    /// [`LogStore::locate`] from a given checkpoint at or before `target`. From
    /// `Checkpoint::default()` it reads the log from its start, as the web page did before logs
    /// had an index (kept as the benchmark's baseline).
    pub fn locate_from(
        &self,
        job: JobId,
        start: Checkpoint,
        target: u64,
        limit: u64,
        shown: impl Fn(AttemptId) -> bool,
    ) -> Result<Located, LogError> {
        locate_from(
            |offset, limit, max| self.read(job, offset, limit, max),
            start,
            target,
            limit,
            &shown,
        )
    }

    /// Flushes a job's log to disk, then its index, and closes its writer (call when the job
    /// ends).
    pub fn sync(&self, job: JobId) -> Result<(), LogError> {
        let path = self.path(job);
        let writer = self.writers().remove(&job);
        if let Some(mut w) = writer {
            w.file.sync_data().map_err(io_err(&path))?;
            self.save_index(job, &mut w);
        }
        Ok(())
    }

    /// Flushes every open log to disk (and its index) and closes the writers (on shutdown).
    pub fn sync_all(&self) -> Result<(), LogError> {
        let writers: Vec<(JobId, Writer)> = self.writers().drain().collect();
        for (job, mut w) in writers {
            let path = self.path(job);
            w.file.sync_data().map_err(io_err(&path))?;
            self.save_index(job, &mut w);
        }
        Ok(())
    }

    /// Drops the output of every attempt but `keep` from a job's plain log (a running job
    /// whose earlier attempts were superseded), to free disk space: each run of their frames
    /// becomes a dropped frame over a hole punched in the file (see the module docs). Returns
    /// the bytes freed (0 for a sealed log, or where the file system cannot punch holes: the
    /// log is still consistent, the bytes just stay).
    pub fn drop_attempts(&self, job: JobId, keep: AttemptId) -> Result<u64, LogError> {
        use nix::fcntl::{FallocateFlags, fallocate};
        use std::os::unix::fs::FileExt;
        let path = self.path(job);
        // No append to this job meanwhile.
        let mut writers = self.writers();
        let mut file = match OpenOptions::new().read(true).write(true).open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(io_err(&path)(e)),
        };
        let size = match writers.get(&job) {
            Some(w) => w.len,
            None => file.metadata().map_err(io_err(&path))?.len(),
        };
        // Runs of consecutive frames of one attempt other than `keep`: (start, end, attempt).
        let mut runs: Vec<(u64, u64, AttemptId)> = Vec::new();
        let mut reader = std::io::BufReader::new(&mut file);
        let (mut pos, mut header) = (0u64, [0u8; HEADER_LEN]);
        while pos + HEADER_LEN as u64 <= size {
            reader.read_exact(&mut header).map_err(io_err(&path))?;
            let Some((h, len)) = decode_header(&header) else {
                break;
            };
            let body = body_len(&h, len);
            let end = pos + HEADER_LEN as u64 + body;
            if end > size {
                break;
            }
            reader.seek_relative(body as i64).map_err(io_err(&path))?;
            if h.attempt != keep && h.stream != DROPPED {
                match runs.last_mut() {
                    Some((_, e, a)) if *e == pos && *a == h.attempt => *e = end,
                    _ => runs.push((pos, end, h.attempt)),
                }
            }
            pos = end;
        }
        drop(reader);
        let Some(&(first, _, _)) = runs.first() else {
            return Ok(0);
        };
        // The index first: its checkpoints past the first run are no longer frame boundaries,
        // or count lines that go. A reader that extended it meanwhile does not save that.
        self.epoch.fetch_add(1, Ordering::SeqCst);
        let idx = self.index_path(job);
        let saved = index::load(&idx).unwrap_or_default();
        let kept = saved.partition_point(|(c, _)| c.offset <= first);
        let kept_len = kept.checked_sub(1).map_or(0, |i| saved[i].1);
        if std::fs::metadata(&idx).is_ok_and(|m| m.len() > kept_len) {
            let cut = OpenOptions::new()
                .write(true)
                .open(&idx)
                .and_then(|f| f.set_len(kept_len))
                .or_else(|_| std::fs::remove_file(&idx));
            cut.map_err(io_err(&idx))?;
        }
        if let Some(w) = writers.get_mut(&job) {
            w.checkpoints
                .truncate(w.checkpoints.partition_point(|c| c.offset <= first));
            w.persisted = kept.min(w.checkpoints.len());
            w.index_len = kept_len;
        }
        let mut freed = 0;
        for (start, end, attempt) in runs {
            let hole = end - start - HEADER_LEN as u64;
            let h = FrameHeader {
                attempt,
                seq: hole,
                step: 0,
                stream: DROPPED,
            };
            // The header first: from then on readers skip the range, whatever it holds.
            file.write_all_at(&encode_header(&h, 0), start)
                .map_err(io_err(&path))?;
            let punched = fallocate(
                &file,
                FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
                (start + HEADER_LEN as u64) as i64,
                hole as i64,
            );
            if punched.is_ok() {
                freed += hole;
            }
        }
        file.sync_data().map_err(io_err(&path))?;
        // Count again from the last checkpoint that holds.
        if let Some(w) = writers.get_mut(&job) {
            let start = w.checkpoints.last().cloned().unwrap_or_default();
            let from = start.offset;
            let counted = (&file)
                .seek(SeekFrom::Start(from))
                .map_err(io_err(&path))
                .and_then(|_| index::scan(&file, start, from, w.len, &path));
            match counted {
                Ok((tally, fresh)) if tally.offset == w.len => {
                    w.tally = tally;
                    w.checkpoints.extend(fresh);
                }
                // The next append opens the log again and counts it from the index.
                _ => {
                    writers.remove(&job);
                }
            }
        }
        drop(writers);
        Ok(freed)
    }

    /// The log's current length (0 if it has no output).
    pub fn len(&self, job: JobId) -> Result<u64, LogError> {
        if let Some(w) = self.writers().get(&job) {
            return Ok(w.len);
        }
        let path = self.path(job);
        match std::fs::metadata(&path) {
            Ok(m) => Ok(m.len()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Ok(open_sealed(&self.sealed_path(job))?.map_or(0, |(_, size)| size))
            }
            Err(e) => Err(io_err(&path)(e)),
        }
    }

    /// The last sequence number stored for `attempt` in `job`'s log (0 if none).
    pub fn last_seq(&self, job: JobId, attempt: AttemptId) -> Result<u64, LogError> {
        let path = self.path(job);
        let (_, last) = match File::open(&path) {
            Ok(mut file) => scan(&mut file, &path)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let sealed = self.sealed_path(job);
                match open_sealed(&sealed)? {
                    Some((decoder, size)) => scan_reader(decoder, size, &sealed)?,
                    None => return Ok(0),
                }
            }
            Err(e) => return Err(io_err(&path)(e)),
        };
        Ok(last.get(&attempt).copied().unwrap_or(0))
    }

    /// Reads whole frames starting at `offset` and ending at or before `limit` (a length the
    /// writer published), at most about `max_bytes` of payload (always at least one frame).
    pub fn read(
        &self,
        job: JobId,
        offset: u64,
        limit: u64,
        max_bytes: usize,
    ) -> Result<ReadResult, LogError> {
        read_frames(job, offset, limit, max_bytes, || {
            self.reader_at(job, offset)
        })
    }
}

/// [`LogStore::locate_from`] over any store's `read(offset, limit, max_bytes)` of one log.
pub(crate) fn locate_from(
    read: impl Fn(u64, u64, usize) -> Result<ReadResult, LogError>,
    start: Checkpoint,
    target: u64,
    limit: u64,
    shown: &dyn Fn(AttemptId) -> bool,
) -> Result<Located, LogError> {
    let (lines, aligned) = start.lines(shown);
    let mut at = Located {
        offset: start.offset,
        lines,
        aligned,
    };
    while at.offset < target && at.offset < limit {
        let read = read(at.offset, limit, LOCATE_READ)?;
        if read.frames.is_empty() {
            break;
        }
        for f in read.frames {
            if at.offset >= target {
                return Ok(at);
            }
            if shown(f.header.attempt) && !f.data.is_empty() {
                at.lines += f.data.iter().filter(|&&b| b == b'\n').count() as u64;
                at.aligned = f.data.ends_with(b"\n");
            }
            at.offset = f.next_offset;
        }
    }
    Ok(at)
}

/// Job output, the way the dispatcher, the web page and the API use it: a log of frames per
/// job, with offsets that are the same bytes whichever store keeps them. Synchronous, like
/// [`crate::Store`]: call it from blocking threads (a [`crate::PgLogStore`] blocks on the
/// network, and panics rather than stall an async worker).
///
/// - [`LogStore`]: files under the dispatcher's data directory (SQLite mode: one dispatcher).
/// - [`crate::PgLogStore`]: rows in the PostgreSQL database the builds are in, so that every
///   dispatcher of the farm reads any log live and another one appends to it after its
///   writer died.
pub trait JobLogs: Send + Sync + std::fmt::Debug {
    /// Appends one frame and returns the log's new length (the offset just past it); readers
    /// see it when this returns. A [`crate::PgLogStore`] stores an (attempt, sequence number)
    /// once: appending it again changes nothing and returns the current length.
    fn append(&self, job: JobId, header: &FrameHeader, data: &[u8]) -> Result<u64, LogError>;

    /// The log's current length (0 if it has no output).
    fn len(&self, job: JobId) -> Result<u64, LogError>;

    /// The last sequence number stored for `attempt` in `job`'s log (0 if none).
    fn last_seq(&self, job: JobId, attempt: AttemptId) -> Result<u64, LogError>;

    /// Reads whole frames starting at `offset` and ending at or before `limit` (a length the
    /// writer published), at most about `max_bytes` of payload (always at least one frame).
    fn read(
        &self,
        job: JobId,
        offset: u64,
        limit: u64,
        max_bytes: usize,
    ) -> Result<ReadResult, LogError>;

    /// The last checkpoint of the log at or before `target` (the log's start if there is
    /// none): a frame boundary, with each attempt's newlines before it.
    fn checkpoint_before(&self, job: JobId, target: u64) -> Result<Checkpoint, LogError>;

    /// The first frame boundary at or after `target` (or `limit`, a published length) and the
    /// lines of shown output before it, reading from the checkpoint before `target`: at most
    /// about [`CHECKPOINT_EVERY`] plus one frame of log, whatever its size.
    fn locate(
        &self,
        job: JobId,
        target: u64,
        limit: u64,
        shown: &dyn Fn(AttemptId) -> bool,
    ) -> Result<Located, LogError> {
        let start = self.checkpoint_before(job, target.min(limit))?;
        locate_from(
            |offset, limit, max| self.read(job, offset, limit, max),
            start,
            target,
            limit,
            shown,
        )
    }

    /// A finished job's log is final: compresses it at rest where the store does that itself
    /// (files); returns the plain and the stored size, or `None` when nothing was done.
    fn seal(&self, job: JobId) -> Result<Option<(u64, u64)>, LogError>;

    /// Makes a job's log durable and closes its writer (call when the job ends).
    fn sync(&self, job: JobId) -> Result<(), LogError>;

    /// Makes every open log durable (on shutdown).
    fn sync_all(&self) -> Result<(), LogError>;

    /// Frees the space of every attempt's output but `keep` in a running job's log, where the
    /// store can (a full local disk); returns the bytes freed. Offsets stay valid.
    fn drop_attempts(&self, job: JobId, keep: AttemptId) -> Result<u64, LogError>;

    /// Bytes the job's log takes at rest, for measurements.
    fn disk_usage(&self, job: JobId) -> Result<u64, LogError>;
}

impl JobLogs for LogStore {
    fn append(&self, job: JobId, header: &FrameHeader, data: &[u8]) -> Result<u64, LogError> {
        LogStore::append(self, job, header, data)
    }

    fn len(&self, job: JobId) -> Result<u64, LogError> {
        LogStore::len(self, job)
    }

    fn last_seq(&self, job: JobId, attempt: AttemptId) -> Result<u64, LogError> {
        LogStore::last_seq(self, job, attempt)
    }

    fn read(
        &self,
        job: JobId,
        offset: u64,
        limit: u64,
        max_bytes: usize,
    ) -> Result<ReadResult, LogError> {
        LogStore::read(self, job, offset, limit, max_bytes)
    }

    fn checkpoint_before(&self, job: JobId, target: u64) -> Result<Checkpoint, LogError> {
        LogStore::checkpoint_before(self, job, target)
    }

    fn seal(&self, job: JobId) -> Result<Option<(u64, u64)>, LogError> {
        LogStore::seal(self, job)
    }

    fn sync(&self, job: JobId) -> Result<(), LogError> {
        LogStore::sync(self, job)
    }

    fn sync_all(&self) -> Result<(), LogError> {
        LogStore::sync_all(self)
    }

    fn drop_attempts(&self, job: JobId, keep: AttemptId) -> Result<u64, LogError> {
        LogStore::drop_attempts(self, job, keep)
    }

    fn disk_usage(&self, job: JobId) -> Result<u64, LogError> {
        LogStore::disk_usage(self, job)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    pub(crate) fn h(attempt: u64, seq: u64) -> FrameHeader {
        FrameHeader {
            attempt: AttemptId::new(attempt),
            seq,
            step: 0,
            stream: 1,
        }
    }

    #[test]
    fn torn_frame_is_cut_on_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let end = {
            let logs = LogStore::open(dir.path()).unwrap();
            let end = logs.append(JobId::new(1), &h(1, 1), b"whole").unwrap();
            logs.sync(JobId::new(1)).unwrap();
            end
        };
        // Simulate a crash in the middle of a frame.
        let path = dir.path().join("1.log");
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&encode_header(&h(1, 2), 100)[..]).unwrap();
        f.write_all(b"partial").unwrap();
        drop(f);
        let logs = LogStore::open(dir.path()).unwrap();
        assert_eq!(logs.last_seq(JobId::new(1), AttemptId::new(1)).unwrap(), 1);
        let next = logs.append(JobId::new(1), &h(1, 2), b"again").unwrap();
        assert_eq!(next, end + (HEADER_LEN + 5) as u64);
        let all = logs.read(JobId::new(1), 0, next, 1 << 20).unwrap();
        assert_eq!(all.frames.len(), 2);
        assert_eq!(all.frames[1].data, b"again");
    }

    /// A full disk: the append fails with an i/o error, leaves no half frame, and everything
    /// appended before is intact. Needs root to mount a small tmpfs; skipped (with a message)
    /// where that is impossible.
    #[test]
    fn full_disk_fails_cleanly() {
        let dir = tempfile::tempdir().unwrap();
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=64k", "tmpfs"])
            .arg(dir.path())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !mounted {
            eprintln!("skipping full_disk_fails_cleanly: cannot mount a tmpfs here (not root?)");
            return;
        }
        struct Unmount<'a>(&'a Path);
        impl Drop for Unmount<'_> {
            fn drop(&mut self) {
                let _ = std::process::Command::new("umount").arg(self.0).status();
            }
        }
        let _guard = Unmount(dir.path());
        let logs = LogStore::open(dir.path()).unwrap();
        let mut end = 0;
        let mut seq = 0;
        let err = loop {
            seq += 1;
            match logs.append(JobId::new(1), &h(1, seq), &[b'x'; 5000]) {
                Ok(len) => end = len,
                Err(e) => break e,
            }
            assert!(seq < 1000, "the tmpfs never filled up");
        };
        assert!(matches!(err, LogError::Io { .. }), "{err}");
        assert_eq!(logs.len(JobId::new(1)).unwrap(), end);
        let all = logs.read(JobId::new(1), 0, end, usize::MAX).unwrap();
        assert_eq!(all.frames.len() as u64, seq - 1);
        assert!(all.frames.iter().all(|f| f.data.len() == 5000));
        // A smaller frame may still fit; either way the log stays whole.
        let _ = logs.append(JobId::new(1), &h(1, seq), b"tail");
        let n = logs.len(JobId::new(1)).unwrap();
        assert!(logs.read(JobId::new(1), 0, n, usize::MAX).is_ok());
    }

    /// A sealed log reads the same at every frame offset (also in the middle of its zstd
    /// frames), keeps its length and sequence numbers, takes less disk, and unseals for a late
    /// append.
    #[test]
    fn sealed_logs_read_the_same_from_any_offset() {
        let dir = tempfile::tempdir().unwrap();
        let logs = LogStore::open(dir.path()).unwrap();
        let mut ends = vec![0u64];
        // ~3.5 MiB of test-like output: several zstd frames of SEAL_FRAME bytes.
        for i in 0..900u64 {
            let line = format!("test_module_{i:04}.py::test_case PASSED [{}%]\n", i % 100);
            let chunk = line.repeat(100);
            ends.push(
                logs.append(JobId::new(3), &h(1 + i % 2, i + 1), chunk.as_bytes())
                    .unwrap(),
            );
        }
        let end = *ends.last().unwrap();
        assert!(
            logs.seal(JobId::new(3)).unwrap().is_none(),
            "a log being written is not sealed"
        );
        logs.sync(JobId::new(3)).unwrap();
        let before: Vec<ReadResult> = ends
            .iter()
            .map(|&o| logs.read(JobId::new(3), o, end, 50_000).unwrap())
            .collect();
        let plain = logs.disk_usage(JobId::new(3)).unwrap();
        let (copied, written) = logs.seal(JobId::new(3)).unwrap().unwrap();
        assert_eq!(copied, end);
        assert!(!dir.path().join("3.log").exists());
        assert_eq!(logs.disk_usage(JobId::new(3)).unwrap(), written);
        assert!(written * 10 < plain, "{written} of {plain}");
        assert_eq!(logs.len(JobId::new(3)).unwrap(), end);
        assert_eq!(
            logs.last_seq(JobId::new(3), AttemptId::new(1)).unwrap(),
            899
        );
        assert_eq!(
            logs.last_seq(JobId::new(3), AttemptId::new(2)).unwrap(),
            900
        );
        for (o, want) in ends.iter().zip(&before) {
            assert_eq!(
                &logs.read(JobId::new(3), *o, end, 50_000).unwrap(),
                want,
                "offset {o}"
            );
        }
        assert!(matches!(
            logs.read(JobId::new(3), 5, end, 100),
            Err(LogError::BadOffset { .. })
        ));
        assert!(
            logs.seal(JobId::new(3)).unwrap().is_none(),
            "sealing twice changes nothing"
        );
        // Any zstd decoder reads it whole.
        let mut whole = Vec::new();
        zeekstd::Decoder::new(File::open(dir.path().join("3.log.zst")).unwrap())
            .unwrap()
            .read_to_end(&mut whole)
            .unwrap();
        assert_eq!(whole.len() as u64, end);

        // A late append unseals, then goes on from the same offset.
        let next = logs.append(JobId::new(3), &h(2, 901), b"late\n").unwrap();
        assert_eq!(next, end + (HEADER_LEN + 5) as u64);
        assert!(dir.path().join("3.log").exists() && !dir.path().join("3.log.zst").exists());
        let tail = logs.read(JobId::new(3), end, next, 100).unwrap();
        assert_eq!(tail.frames[0].data, b"late\n");
        assert_eq!(
            logs.read(JobId::new(3), 0, next, usize::MAX)
                .unwrap()
                .frames
                .len(),
            901
        );
    }

    /// A superseded attempt's output is dropped from a running job's log: the disk blocks are
    /// freed, every offset of the kept attempt reads the same, a reader from the start gets one
    /// line saying what was dropped, and appends, sequence numbers and sealing go on as before.
    #[test]
    fn a_superseded_attempts_output_is_dropped_and_offsets_stay() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let logs = LogStore::open(dir.path()).unwrap();
        let chunk = [b'x'; 64 << 10];
        for seq in 1..=32 {
            logs.append(JobId::new(5), &h(1, seq), &chunk).unwrap();
        }
        let kept_from = logs.len(JobId::new(5)).unwrap();
        let mut ends = vec![kept_from];
        for seq in 1..=4 {
            ends.push(
                logs.append(JobId::new(5), &h(2, seq), b"second attempt\n")
                    .unwrap(),
            );
        }
        let end = *ends.last().unwrap();
        let before: Vec<ReadResult> = ends
            .iter()
            .map(|&o| logs.read(JobId::new(5), o, end, 1 << 20).unwrap())
            .collect();
        let path = dir.path().join("5.log");
        let blocks = || std::fs::metadata(&path).unwrap().blocks() * 512;
        let on_disk = blocks();
        let freed = logs
            .drop_attempts(JobId::new(5), AttemptId::new(2))
            .unwrap();
        assert_eq!(freed, 32 * (64 << 10) + 31 * HEADER_LEN as u64);
        assert!(
            blocks() + (1 << 20) < on_disk,
            "{} of {on_disk} bytes still on disk",
            blocks()
        );
        assert_eq!(logs.len(JobId::new(5)).unwrap(), end);
        for (o, want) in ends.iter().zip(&before) {
            assert_eq!(
                &logs.read(JobId::new(5), *o, end, 1 << 20).unwrap(),
                want,
                "offset {o}"
            );
        }
        let all = logs.read(JobId::new(5), 0, end, usize::MAX).unwrap();
        assert_eq!(all.frames.len(), 5);
        assert_eq!(all.frames[0].header.stream, SYSTEM);
        assert_eq!(all.frames[0].header.attempt, AttemptId::new(1));
        assert_eq!(all.frames[0].next_offset, kept_from);
        let note = String::from_utf8(all.frames[0].data.clone()).unwrap();
        assert!(note.contains("attempt 1 were dropped"), "{note}");
        assert_eq!(logs.last_seq(JobId::new(5), AttemptId::new(2)).unwrap(), 4);
        assert_eq!(
            logs.drop_attempts(JobId::new(5), AttemptId::new(2))
                .unwrap(),
            0,
            "nothing left to drop"
        );
        let next = logs.append(JobId::new(5), &h(2, 5), b"more\n").unwrap();
        logs.sync(JobId::new(5)).unwrap();
        logs.seal(JobId::new(5)).unwrap().unwrap();
        let sealed = logs.read(JobId::new(5), 0, next, usize::MAX).unwrap();
        assert_eq!(sealed.frames[..5], all.frames[..]);
        assert_eq!(sealed.frames[5].data, b"more\n");
    }

    /// A small deterministic generator (xorshift64*), so the random logs repeat.
    pub(crate) struct Rng(pub(crate) u64);
    impl Rng {
        pub(crate) fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        pub(crate) fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    /// Appends `bytes` or so of frames of attempt `attempt`, of random sizes (some empty, some
    /// larger than a checkpoint's span is small), with newlines at random and not always at
    /// the end.
    pub(crate) fn fill(
        logs: &dyn JobLogs,
        job: JobId,
        attempt: u64,
        bytes: u64,
        rng: &mut Rng,
    ) -> u64 {
        let mut end = logs.len(job).unwrap();
        let stop = end + bytes;
        let mut seq = logs.last_seq(job, AttemptId::new(attempt)).unwrap();
        while end < stop {
            let len = match rng.below(10) {
                0 => 0,
                1 => rng.below(MAX_FRAME as u64 + 1) as usize,
                _ => rng.below(40_000) as usize,
            };
            let data: Vec<u8> = (0..len)
                .map(|_| if rng.below(60) == 0 { b'\n' } else { b'a' })
                .collect();
            seq += 1;
            end = logs.append(job, &h(attempt, seq), &data).unwrap();
        }
        end
    }

    /// A frame boundary: its offset, the bytes of dropped output before it, and per filter of
    /// `from` the lines before it and whether they end a line.
    pub(crate) type Boundary = (u64, u64, Vec<(u64, bool)>);

    /// Every frame boundary, counted from a whole read of the log.
    pub(crate) fn boundaries(
        logs: &dyn JobLogs,
        job: JobId,
        froms: &[Option<u64>],
    ) -> Vec<Boundary> {
        let end = logs.len(job).unwrap();
        let all = logs.read(job, 0, end, usize::MAX).unwrap();
        let mut at: Vec<(u64, bool)> = vec![(0, true); froms.len()];
        let (mut prev, mut dropped) = (0, 0);
        let mut out = vec![(0, 0, at.clone())];
        for f in &all.frames {
            // A dropped frame spans more than its note.
            dropped += (f.next_offset - prev).saturating_sub((HEADER_LEN + f.data.len()) as u64);
            prev = f.next_offset;
            for (i, from) in froms.iter().enumerate() {
                let shown = from.is_none_or(|a| f.header.attempt >= AttemptId::new(a));
                if shown && !f.data.is_empty() {
                    at[i].0 += f.data.iter().filter(|&&b| b == b'\n').count() as u64;
                    at[i].1 = f.data.ends_with(b"\n");
                }
            }
            out.push((f.next_offset, dropped, at.clone()));
        }
        out
    }

    /// `locate` from the index finds what a full scan finds, at every checkpoint and at
    /// random targets, for every filter of attempts, and starts from a checkpoint at most
    /// about a MiB (plus one frame, not counting dropped output) before its target.
    pub(crate) fn check_against_scan(logs: &dyn JobLogs, job: JobId, rng: &mut Rng) {
        let froms = [None, Some(1), Some(2), Some(3), Some(9)];
        let bounds = boundaries(logs, job, &froms);
        let end = logs.len(job).unwrap();
        let mut targets: Vec<u64> = (0..40).map(|_| rng.below(end + 1)).collect();
        targets.extend([0, 1, end.saturating_sub(1), end]);
        let mut checked = 0;
        for &t in &targets {
            let cp = logs.checkpoint_before(job, t).unwrap();
            assert!(cp.offset <= t, "checkpoint {} after target {t}", cp.offset);
            // The checkpoint itself is a boundary and counts what a scan counts there.
            let i = bounds.partition_point(|b| b.0 < cp.offset);
            assert_eq!(bounds[i].0, cp.offset, "checkpoint is not a frame boundary");
            if cp.offset > 0 {
                checked += 1;
            }
            // The first boundary at or after the target.
            let j = bounds.partition_point(|b| b.0 < t);
            let skipped = bounds[j].1 - bounds[i].1;
            assert!(
                t - cp.offset - skipped.min(t - cp.offset)
                    <= 2 * CHECKPOINT_EVERY + (HEADER_LEN + MAX_FRAME) as u64,
                "checkpoint {} far before target {t}",
                cp.offset
            );
            for (k, from) in froms.iter().enumerate() {
                let shown = |a: AttemptId| from.is_none_or(|f| a >= AttemptId::new(f));
                assert_eq!(
                    cp.lines(shown),
                    bounds[i].2[k],
                    "checkpoint {} from {from:?}",
                    cp.offset
                );
                let got = logs.locate(job, t, end, &shown).unwrap();
                let want = Located {
                    offset: bounds[j].0,
                    lines: bounds[j].2[k].0,
                    aligned: bounds[j].2[k].1,
                };
                assert_eq!(got, want, "target {t} from {from:?}");
            }
        }
        assert!(
            checked > 0 || end < 2 * CHECKPOINT_EVERY,
            "no checkpoint was used"
        );
    }

    fn idx_len(dir: &Path, job: u64) -> u64 {
        std::fs::metadata(dir.join(format!("{job}.idx"))).map_or(0, |m| m.len())
    }

    /// The index agrees with a full scan while the log is written, after it is synced and
    /// reopened, after a torn index record, after sealing and a late append, and after its
    /// first attempt's output is dropped.
    #[test]
    fn checkpoints_equal_a_full_scan() {
        let dir = tempfile::tempdir().unwrap();
        let job = JobId::new(4);
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        {
            let logs = LogStore::open(dir.path()).unwrap();
            fill(&logs, job, 1, 3 << 20, &mut rng);
            fill(&logs, job, 2, 2 << 20, &mut rng);
            // While written: from the writer's checkpoints, nothing saved yet.
            assert_eq!(idx_len(dir.path(), 4), 0);
            check_against_scan(&logs, job, &mut rng);
            logs.sync(job).unwrap();
            assert!(
                idx_len(dir.path(), 4) > 0,
                "the index is saved with the log"
            );
            check_against_scan(&logs, job, &mut rng);
        }
        // Reopened (a new process): from the file, then appended to.
        let logs = LogStore::open(dir.path()).unwrap();
        check_against_scan(&logs, job, &mut rng);
        fill(&logs, job, 3, 2 << 20, &mut rng);
        check_against_scan(&logs, job, &mut rng);
        logs.sync(job).unwrap();

        // A torn last record (a crash while it was written) is cut off and rebuilt.
        let idx = dir.path().join("4.idx");
        let whole = idx_len(dir.path(), 4);
        OpenOptions::new()
            .write(true)
            .open(&idx)
            .unwrap()
            .set_len(whole - 7)
            .unwrap();
        let logs = LogStore::open(dir.path()).unwrap();
        check_against_scan(&logs, job, &mut rng);
        fill(&logs, job, 3, 1 << 20, &mut rng);
        logs.sync(job).unwrap();
        assert!(idx_len(dir.path(), 4) > whole, "rebuilt and extended");
        check_against_scan(&logs, job, &mut rng);
        // Garbage after the records is no record.
        OpenOptions::new()
            .append(true)
            .open(&idx)
            .unwrap()
            .write_all(b"KX\x01\x00garbage-garbage-garbage-garbage-garbage")
            .unwrap();
        check_against_scan(&logs, job, &mut rng);

        // Sealed: the index stays beside the .zst and reads the same.
        let before = std::fs::read(&idx).unwrap();
        logs.seal(job).unwrap().unwrap();
        assert!(dir.path().join("4.log.zst").exists() && idx.exists());
        check_against_scan(&logs, job, &mut rng);
        // A late append unseals and goes on counting.
        fill(&logs, job, 3, 3 << 19, &mut rng);
        check_against_scan(&logs, job, &mut rng);
        logs.sync(job).unwrap();
        // The garbage was cut off; the records before it stay.
        let valid = index::decode(&before).last().unwrap().1 as usize;
        let after = std::fs::read(&idx).unwrap();
        assert!(after.len() > valid && after.starts_with(&before[..valid]));
    }

    /// Dropping superseded attempts' output (a running job, a full disk) keeps the kept
    /// attempt's counts; the dropped one counts as readers see it (one line per dropped run).
    #[test]
    fn checkpoints_after_dropped_attempts() {
        let dir = tempfile::tempdir().unwrap();
        let mut rng = Rng(7);
        let logs = LogStore::open(dir.path()).unwrap();
        let (a, b) = (JobId::new(1), JobId::new(2));
        for job in [a, b] {
            fill(&logs, job, 1, 3 << 20, &mut rng);
            fill(&logs, job, 2, 3 << 20, &mut rng);
        }
        // One closed with its index saved, one still written.
        logs.sync(b).unwrap();
        let keep = |a: AttemptId| a >= AttemptId::new(2);
        // Targets in the kept attempt's output: located the same before and after.
        let located = |job| {
            let end = logs.len(job).unwrap();
            [end, end - 500_000, end - 2_000_000].map(|t| logs.locate(job, t, end, keep).unwrap())
        };
        let kept = (located(a), located(b));
        assert!(logs.drop_attempts(a, AttemptId::new(2)).unwrap() > 0);
        assert!(logs.drop_attempts(b, AttemptId::new(2)).unwrap() > 0);
        assert_eq!((located(a), located(b)), kept);
        for job in [a, b] {
            check_against_scan(&logs, job, &mut rng);
            fill(&logs, job, 2, 1 << 20, &mut rng);
            check_against_scan(&logs, job, &mut rng);
            logs.sync(job).unwrap();
        }
        let logs = LogStore::open(dir.path()).unwrap();
        for job in [a, b] {
            check_against_scan(&logs, job, &mut rng);
        }
    }

    /// A log written before logs had an index gets one from its first reader, saved beside it.
    #[test]
    fn a_log_without_an_index_gets_one() {
        let dir = tempfile::tempdir().unwrap();
        let mut rng = Rng(99);
        let job = JobId::new(8);
        {
            let logs = LogStore::open(dir.path()).unwrap();
            fill(&logs, job, 1, 5 << 20, &mut rng);
            logs.sync(job).unwrap();
            logs.seal(job).unwrap().unwrap();
        }
        std::fs::remove_file(dir.path().join("8.idx")).unwrap();
        let logs = LogStore::open(dir.path()).unwrap();
        let end = logs.len(job).unwrap();
        let cp = logs.checkpoint_before(job, end).unwrap();
        assert!(
            cp.offset + 2 * CHECKPOINT_EVERY > end,
            "{} of {end}",
            cp.offset
        );
        assert!(idx_len(dir.path(), 8) > 0, "the index was saved");
        check_against_scan(&logs, job, &mut rng);
    }
}

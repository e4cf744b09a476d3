//! The output spool's segment files: frames of output chunks (seq, step, stream, length,
//! payload), written at reserved offsets and read back by the writer. Nothing here knows which
//! chunks are acknowledged; that is the accounting's (`state`).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use kiln_domain::AttemptId;
use kiln_domain::protocol::OutputStream;

/// Bytes of a frame header: seq (u64), step (u32), stream (i32 code), payload length (u32), all
/// little-endian.
pub(super) const HEADER_LEN: u64 = 20;
/// Largest payload length believed when reading a frame back.
pub(super) const MAX_PAYLOAD: u32 = 64 << 20;
/// Extension of segment files.
pub(super) const SEGMENT_EXT: &str = "seg";

/// A spool file. It is deleted when the last reference to it goes (a writer reading it back
/// may hold one a little longer than the outbox).
pub(super) struct Segment {
    /// Unique in this process.
    pub(super) id: u64,
    pub(super) path: PathBuf,
    pub(super) file: File,
}

impl Drop for Segment {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_file(&self.path)
            && !matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
            )
        {
            tracing::warn!(path = %self.path.display(), cause = %e, "cannot delete an output spool file");
        }
    }
}

/// The fields of an output chunk kept next to its frame.
pub(super) struct Head {
    pub(super) seq: u64,
    pub(super) step: u32,
    pub(super) stream: OutputStream,
    pub(super) data: Bytes,
}

/// A frame read back.
pub(super) struct Frame {
    pub(super) step: u32,
    pub(super) stream: OutputStream,
    pub(super) data: Bytes,
    /// Offset of the next frame.
    pub(super) next: u64,
}

/// Creates segment `id` of `attempt` in `dir` (made again if it went away).
pub(super) fn create_segment(
    dir: &Path,
    pid: u32,
    attempt: AttemptId,
    id: u64,
) -> io::Result<Segment> {
    let path = dir.join(format!("{pid}-{attempt}-{id}.{SEGMENT_EXT}"));
    let open = || {
        OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
    };
    let file = match open() {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            // The directory went away (or could never be made): make it again.
            std::fs::create_dir_all(dir)?;
            open()?
        }
        r => r?,
    };
    Ok(Segment { id, path, file })
}

/// Creates the spool directory and deletes segments left by an earlier process.
pub(super) fn prepare_spool(dir: &Path) -> io::Result<()> {
    std::fs::create_dir_all(dir)?;
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == SEGMENT_EXT)
            && let Err(cause) = std::fs::remove_file(&path)
            && cause.kind() != io::ErrorKind::NotFound
        {
            tracing::warn!(path = %path.display(), %cause, "cannot delete a leftover output spool file");
        }
    }
    Ok(())
}

pub(super) fn encode_frame(head: &Head) -> Vec<u8> {
    let mut buf = Vec::with_capacity(HEADER_LEN as usize + head.data.len());
    buf.extend_from_slice(&head.seq.to_le_bytes());
    buf.extend_from_slice(&head.step.to_le_bytes());
    buf.extend_from_slice(&i32::from(head.stream.code()).to_le_bytes());
    // Checked by the caller: fits in u32.
    buf.extend_from_slice(&(head.data.len() as u32).to_le_bytes());
    buf.extend_from_slice(&head.data);
    buf
}

/// Reads the frame at `offset`, which must be chunk `seq` (its payload only if `payload`).
pub(super) fn read_frame(file: &File, offset: u64, seq: u64, payload: bool) -> io::Result<Frame> {
    let mut h = [0u8; HEADER_LEN as usize];
    file.read_exact_at(&mut h, offset)?;
    let field = |at: usize| [h[at], h[at + 1], h[at + 2], h[at + 3]];
    let found = u64::from_le_bytes([h[0], h[1], h[2], h[3], h[4], h[5], h[6], h[7]]);
    let step = u32::from_le_bytes(field(8));
    let code = i32::from_le_bytes(field(12));
    let stream = u8::try_from(code).ok().and_then(OutputStream::from_code);
    let len = u32::from_le_bytes(field(16));
    let Some(stream) = stream.filter(|_| found == seq && len <= MAX_PAYLOAD) else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "bad frame at offset {offset}: seq {found} (expected {seq}), stream {code}, length {len}"
            ),
        ));
    };
    let mut data = Vec::new();
    if payload {
        data = vec![0; len as usize];
        file.read_exact_at(&mut data, offset + HEADER_LEN)?;
    }
    Ok(Frame {
        step,
        stream,
        data: data.into(),
        next: offset + HEADER_LEN + u64::from(len),
    })
}

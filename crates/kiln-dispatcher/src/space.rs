//! Free space in the data directory, and what the dispatcher does while there is none.
//!
//! The disk counts as full when a write failed for want of space (ENOSPC or EDQUOT from the
//! log store, `SQLITE_FULL` from the database) or when the file system has less free than
//! `Config::min_free_space`. While it is full:
//!
//! - new work is refused with RESOURCE_EXHAUSTED (submits, retries, reported commits), with
//!   the free space and the data directory in the message;
//! - a running attempt whose output or report cannot be stored is *paused*: the dispatcher
//!   stops acknowledging it and drops its later messages, so they wait in the runner's outbox
//!   (on the runner's disk, and past its bounds the step waits), and its job shows the cause;
//! - nothing is requeued, ended or assigned (each needs a write, and a failed write must never
//!   leave memory and the database apart); leases do not run out while the runner heartbeats.
//!
//! The space is looked at again every [`PROBE_EVERY`]. Once it is back (free above the
//! minimum, and a probe file can be written and synced), paused attempts' sessions are ended
//! so their runners re-attach at once and send again everything not acknowledged, in order:
//! nothing is lost, nothing is stored twice.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytesize::ByteSize;

/// How often a full disk is looked at again.
pub(super) const PROBE_EVERY: Duration = Duration::from_secs(1);
/// The default minimum free space: this much, or 5% of the file system if that is less.
const DEFAULT_MIN_FREE: u64 = 64 << 20;

/// The data directory's free space as the dispatcher last saw it.
#[derive(Debug)]
pub(super) struct Space {
    dir: PathBuf,
    /// Configured minimum free bytes (`None`: the default rule).
    min_free: Option<u64>,
    full: Mutex<Option<Full>>,
}

#[derive(Debug, Clone)]
struct Full {
    since: Instant,
    cause: String,
}

/// Free and total bytes of the file system holding `dir`.
fn statvfs(dir: &Path) -> std::io::Result<(u64, u64)> {
    let st = nix::sys::statvfs::statvfs(dir).map_err(std::io::Error::from)?;
    let frag = st.fragment_size() as u64;
    Ok((
        (st.blocks_available() as u64).saturating_mul(frag),
        (st.blocks() as u64).saturating_mul(frag),
    ))
}

impl Space {
    pub(super) fn new(dir: PathBuf, min_free: Option<u64>) -> Self {
        Self {
            dir,
            min_free,
            full: Mutex::new(None),
        }
    }

    fn full(&self) -> std::sync::MutexGuard<'_, Option<Full>> {
        self.full.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn min_free(&self, total: u64) -> u64 {
        self.min_free.unwrap_or(DEFAULT_MIN_FREE.min(total / 20))
    }

    /// Whether the disk counts as full right now (no system call).
    pub(super) fn is_full(&self) -> bool {
        self.full().is_some()
    }

    /// Why the disk counts as full, for users: "the dispatcher's disk is full (...)".
    pub(super) fn cause(&self) -> Option<String> {
        self.full().as_ref().map(|f| {
            format!(
                "the dispatcher's disk is full ({}, for {}s); work goes on once space is freed",
                f.cause,
                f.since.elapsed().as_secs()
            )
        })
    }

    /// Describes the free space now, e.g. "2.1 MiB free of 20.0 MiB in /data, 1.0 MiB needed".
    fn describe(&self) -> String {
        match statvfs(&self.dir) {
            Ok((free, total)) => format!(
                "{} free of {} in {}, {} needed",
                ByteSize(free).display().iec(),
                ByteSize(total).display().iec(),
                self.dir.display(),
                ByteSize(self.min_free(total)).display().iec(),
            ),
            Err(e) => format!("cannot read the free space of {}: {e}", self.dir.display()),
        }
    }

    /// Records that a write failed for want of space; `true` when the disk was not full yet.
    pub(super) fn mark_full(&self, what: &str) -> bool {
        let mut full = self.full();
        let newly = full.is_none();
        if newly {
            let cause = format!("{what} failed: {}", self.describe());
            tracing::error!(cause = %cause, "the data directory's disk is full; new work is refused and running jobs pause until space is freed");
            *full = Some(Full {
                since: Instant::now(),
                cause,
            });
        }
        newly
    }

    /// Before accepting new work: an error while the disk is full (or below the minimum).
    pub(super) fn admit(&self) -> Result<(), String> {
        if !self.is_full() {
            match statvfs(&self.dir) {
                Ok((free, total)) if free < self.min_free(total) => {
                    self.mark_full("the free-space check");
                }
                // Unknown free space (an odd file system) is not a full disk: writes tell.
                _ => return Ok(()),
            }
        }
        Err(self
            .cause()
            .unwrap_or_else(|| "the dispatcher's disk is full".into()))
    }

    /// While full: whether the space is back (free above the minimum, and a probe file can be
    /// written and synced). Clears the full state when it is; `false` while not full.
    pub(super) fn recovered(&self) -> bool {
        if !self.is_full() {
            return false;
        }
        let ok = match statvfs(&self.dir) {
            Ok((free, total)) => free >= self.min_free(total) && self.probe_write().is_ok(),
            Err(_) => self.probe_write().is_ok(),
        };
        if ok {
            let mut full = self.full();
            if let Some(f) = full.take() {
                tracing::info!(
                    after_s = f.since.elapsed().as_secs(),
                    free = %self.describe(),
                    "the data directory has space again; paused jobs resume"
                );
            }
        }
        ok
    }

    /// Writes, syncs and removes a small file in the data directory.
    fn probe_write(&self) -> std::io::Result<()> {
        use std::io::Write;
        let path = self.dir.join(".space-probe");
        let result = (|| {
            let mut f = std::fs::File::create(&path)?;
            f.write_all(&[0u8; 64 << 10])?;
            f.sync_all()
        })();
        let _ = std::fs::remove_file(&path);
        result
    }
}

/// Parses a size such as `64MiB`, `500M` or `1048576` (bytes), for `--min-free-space`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    s.trim()
        .parse::<ByteSize>()
        .map(|b| b.as_u64())
        .map_err(|e| format!("{s:?} is not a size (e.g. 64MiB, 500M, 1048576): {e}"))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_units() {
        assert_eq!(parse_size("64MiB"), Ok(64 << 20));
        assert_eq!(parse_size("1048576"), Ok(1 << 20));
        assert_eq!(parse_size("1 KiB"), Ok(1024));
        assert!(parse_size("lots").is_err());
    }

    #[test]
    fn full_until_the_probe_passes() {
        let dir = tempfile::tempdir().unwrap();
        let space = Space::new(dir.path().to_path_buf(), Some(0));
        assert!(space.admit().is_ok());
        assert!(!space.recovered(), "not full: nothing to recover from");
        space.mark_full("appending output");
        let err = space.admit().unwrap_err();
        assert!(
            err.contains("disk is full") && err.contains("appending output"),
            "{err}"
        );
        assert!(space.recovered());
        assert!(space.admit().is_ok());
        // A minimum no file system meets: refused at admission.
        let strict = Space::new(dir.path().to_path_buf(), Some(u64::MAX));
        assert!(strict.admit().unwrap_err().contains("needed"));
        assert!(!strict.recovered());
    }
}

//! `kiln-bench tail`: what the web page pays to render the tail of a finished job's log, for a
//! small and a large log, with the log's checkpoint index and without it.
//!
//! Writes a `--small-mb` and a `--large-mb` MB log of build-like output (the lines of
//! [`super::logs`], 16 KiB chunks) into a real `LogStore`, syncs them (which saves their index)
//! and seals them, as a finished job's log is. Then renders each one's tail as the page does:
//! `locate` the first frame boundary at or after `len - 256 KiB` with the number of lines before
//! it (the page numbers its lines from there), then read the frames from there to the end. With
//! the index, `LogStore::locate` starts at the checkpoint before the target; the baseline,
//! measured in the same run on the same logs, is the page's former way, `locate_from` the log's
//! start (a whole read of the log per page view). Both must agree on the boundary and the line
//! count. Also measured: the first view of a log that has no index (a log from before indexes,
//! or whose index was lost), which builds the index and saves it.

use std::time::Instant;

use clap::Args;
use kiln_domain::{AttemptId, JobId};
use kiln_store::{Checkpoint, FrameHeader, Located, LogStore};
use rand::SeedableRng;
use rand::rngs::StdRng;

use super::util::{fail, figure, header, ms, note, percentile, sorted, wrong};
use crate::BenchError;

/// `kiln-bench tail`.
#[derive(Debug, Clone, Args)]
pub struct TailArgs {
    /// Megabytes of the small log.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub small_mb: u32,
    /// Megabytes of the large log.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub large_mb: u32,
    /// Seed of the generated output.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
}

/// Bytes of one chunk (what runners send).
const CHUNK: usize = 16 * 1024;
/// The tail a build page renders of a job's log (kiln-web's `TAIL_BYTES`).
const TAIL: u64 = 256 * 1024;
/// Renders timed per log with the index, and with a whole read (each reads the whole log).
const INDEXED_RUNS: usize = 50;
const SCAN_RUNS: usize = 5;

/// Writes `mb` MB of output as job `job`'s log; returns its length.
fn write_log(logs: &LogStore, job: JobId, mb: u32, seed: u64) -> Result<u64, BenchError> {
    let mut mix = StdRng::seed_from_u64(seed);
    let total = u64::from(mb) * 1_000_000;
    let (mut written, mut seq, mut n, mut end) = (0u64, 0u64, 0u64, 0u64);
    let mut chunk = String::with_capacity(CHUNK + 200);
    while written < total {
        chunk.clear();
        while chunk.len() < CHUNK {
            n += 1;
            chunk.push_str(&super::logs::line(&mut mix, n));
        }
        seq += 1;
        let header = FrameHeader {
            attempt: AttemptId::new(1),
            seq,
            step: 0,
            stream: 1,
        };
        end = logs.append(job, &header, chunk.as_bytes()).map_err(fail)?;
        written += chunk.len() as u64;
    }
    logs.sync(job).map_err(fail)?;
    Ok(end)
}

/// One render of the tail: where it starts, and the bytes read after it.
fn render(
    logs: &LogStore,
    job: JobId,
    len: u64,
    indexed: bool,
) -> Result<(Located, usize), BenchError> {
    let target = len.saturating_sub(TAIL);
    let shown = |_: AttemptId| true;
    let at = if indexed {
        logs.locate(job, target, len, shown)
    } else {
        logs.locate_from(job, Checkpoint::default(), target, len, shown)
    }
    .map_err(fail)?;
    let mut bytes = 0;
    let mut offset = at.offset;
    while offset < len {
        let r = logs.read(job, offset, len, 1 << 20).map_err(fail)?;
        bytes += r.frames.iter().map(|f| f.data.len()).sum::<usize>();
        if r.next_offset <= offset {
            break;
        }
        offset = r.next_offset;
    }
    Ok((at, bytes))
}

/// Median milliseconds of `runs` renders, and what they found.
fn timed(
    logs: &LogStore,
    job: JobId,
    len: u64,
    indexed: bool,
    runs: usize,
) -> Result<(f64, Located), BenchError> {
    let mut times = Vec::with_capacity(runs);
    let mut found = None;
    for _ in 0..runs {
        let started = Instant::now();
        let (at, bytes) = render(logs, job, len, indexed)?;
        times.push(ms(started.elapsed()));
        if bytes == 0 || found.is_some_and(|f| f != at) {
            return Err(wrong(format!(
                "job {job}: the tail read differently: {at:?}"
            )));
        }
        found = Some(at);
    }
    let at = found.ok_or_else(|| wrong("no render"))?;
    Ok((percentile(&sorted(&times), 50.0), at))
}

/// Runs the benchmark.
pub async fn run(a: &TailArgs) -> Result<(), BenchError> {
    let a = a.clone();
    tokio::task::spawn_blocking(move || run_blocking(&a))
        .await
        .map_err(fail)?
}

fn run_blocking(a: &TailArgs) -> Result<(), BenchError> {
    header(
        "tail",
        &format!(
            "the page's tail (locate + read of the last 256 KiB) of a {} MB and a {} MB sealed \
             log, with the checkpoint index vs a whole read",
            a.small_mb, a.large_mb
        ),
    );
    let dir = tempfile::tempdir().map_err(fail)?;
    let logs = LogStore::open(dir.path()).map_err(fail)?;
    let (small, large) = (JobId::new(1), JobId::new(2));
    let small_len = write_log(&logs, small, a.small_mb, a.seed)?;
    let large_len = write_log(&logs, large, a.large_mb, a.seed)?;
    for job in [small, large] {
        logs.seal(job)
            .map_err(fail)?
            .ok_or_else(|| wrong(format!("job {job}'s log was not sealed")))?;
    }
    let mut rows = Vec::new();
    for (job, len, mb) in [
        (small, small_len, a.small_mb),
        (large, large_len, a.large_mb),
    ] {
        let (indexed, at) = timed(&logs, job, len, true, INDEXED_RUNS)?;
        let (scan, want) = timed(&logs, job, len, false, SCAN_RUNS)?;
        if at != want {
            return Err(wrong(format!(
                "job {job}: the index located {at:?}, a whole read {want:?}"
            )));
        }
        note(format!(
            "{mb} MB log ({len} bytes): the tail starts at {} after line {}",
            at.offset, at.lines
        ));
        rows.push((mb, indexed, scan));
    }
    for &(mb, indexed, scan) in &rows {
        figure(
            &format!("tail of {mb} MB, indexed"),
            format!("{indexed:.2} ms"),
            "",
            None,
            &format!(
                "whole read {scan:.2} ms; {:.1}x faster",
                scan / indexed.max(1e-6)
            ),
        );
    }
    let (s, l) = (rows[0], rows[1]);
    let growth = l.1 / s.1.max(1e-6);
    figure(
        &format!("{} MB / {} MB tail, indexed", l.0, s.0),
        format!("{growth:.2}x"),
        "< 2x",
        Some(growth < 2.0),
        &format!("whole read {:.1}x", l.2 / s.2.max(1e-6)),
    );

    // A log without an index: its first view builds the index (one whole read) and saves it.
    std::fs::remove_file(dir.path().join(format!("{large}.idx"))).map_err(fail)?;
    let started = Instant::now();
    render(&logs, large, large_len, true)?;
    let first = ms(started.elapsed());
    let (then, _) = timed(&logs, large, large_len, true, INDEXED_RUNS)?;
    figure(
        &format!("tail of {} MB, no index yet", a.large_mb),
        format!("{first:.2} ms"),
        "",
        None,
        &format!("builds and saves the index; then {then:.2} ms"),
    );
    Ok(())
}

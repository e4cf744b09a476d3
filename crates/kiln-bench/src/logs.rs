//! `kiln-bench logs`: what stored output costs on disk, and how fast it reads back, before and
//! after a finished job's log is sealed (compressed at rest as seekable zstd).
//!
//! Writes `--mb` MB of build-like output (test runner and compiler lines with paths, counters
//! and timings, plus a share of random hex that does not compress) into a real `LogStore` in a
//! temp dir as 16 KiB chunks, the size runners send. Then, on the plain log and on the sealed
//! one: disk bytes per MB of output, a whole read from offset 0 as a follower replays it (1 MiB
//! per call), and reads of 64 KiB at 200 seeded random chunk offsets (what `kiln logs` from an
//! offset does). The plain log is the baseline, measured in the same run.
//!
//! With `--postgres`, the same output is also written into a `PgLogStore` (`kiln serve
//! --database`: job output as rows of the database) on a throwaway cluster with PostgreSQL's
//! durability defaults (fsync on), and measured the same way, plus each append's time on both
//! stores (one transaction per chunk there; a write to the page cache for the file).

use std::time::Instant;

use clap::Args;
use kiln_domain::{AttemptId, JobId};
use kiln_store::{FrameHeader, JobLogs, LogStore, PgLogStore};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::util::{fail, figure, header, ms, note, percentile, sorted, wrong};
use crate::BenchError;

/// `kiln-bench logs`.
#[derive(Debug, Clone, Args)]
pub struct LogsArgs {
    /// Megabytes of output written.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub mb: u32,
    /// Seed of the generated output and of the random offsets.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Also measure job output in PostgreSQL (`PgLogStore`, a throwaway cluster, fsync on).
    #[arg(long)]
    pub postgres: bool,
}

/// Bytes of one chunk.
const CHUNK: usize = 16 * 1024;
/// Random reads measured.
const RANDOM_READS: usize = 200;

/// One line of build-like output.
pub(crate) fn line(mix: &mut StdRng, n: u64) -> String {
    let r: u64 = mix.random();
    match r % 8 {
        0..=3 => format!(
            "tests/unit/test_module_{:03}.py::test_case_{} PASSED [{:>3}%]\n",
            r % 400,
            (r >> 8) % 90,
            n % 100
        ),
        4 => format!(
            "   Compiling crate-{} v0.{}.{} (/build/src/crates/crate-{})\n",
            r % 300,
            (r >> 8) % 20,
            (r >> 16) % 10,
            r % 300
        ),
        5 => format!(
            "[{:>6}.{:03}s] worker {} finished shard {} in {} ms\n",
            n / 1000,
            n % 1000,
            (r >> 4) % 16,
            (r >> 12) % 64,
            (r >> 20) % 5000
        ),
        6 => format!(
            "warning: unused variable `x{}` at src/module_{}.rs:{}:{}\n",
            r % 50,
            (r >> 8) % 80,
            (r >> 16) % 900,
            (r >> 24) % 80
        ),
        // Random hex (object ids, hashes): does not compress.
        _ => format!(
            "sha256:{:016x}{:016x}{:016x}{:016x}\n",
            mix.random::<u64>(),
            mix.random::<u64>(),
            mix.random::<u64>(),
            mix.random::<u64>()
        ),
    }
}

/// Disk bytes, whole-read seconds and random-read milliseconds of one form of the log.
struct Measured {
    disk: u64,
    whole_s: f64,
    random_ms: Vec<f64>,
}

fn measure(
    logs: &dyn JobLogs,
    job: JobId,
    end: u64,
    offsets: &[u64],
    expect: u64,
) -> Result<Measured, BenchError> {
    let disk = logs.disk_usage(job).map_err(fail)?;
    let started = Instant::now();
    let (mut at, mut bytes) = (0u64, 0u64);
    while at < end {
        let r = logs.read(job, at, end, 1 << 20).map_err(fail)?;
        bytes += r.frames.iter().map(|f| f.data.len() as u64).sum::<u64>();
        at = r.next_offset;
    }
    let whole_s = started.elapsed().as_secs_f64();
    if bytes != expect {
        return Err(wrong(format!("read {bytes} bytes back, wrote {expect}")));
    }
    let mut random_ms = Vec::with_capacity(offsets.len());
    for &o in offsets {
        let started = Instant::now();
        let r = logs.read(job, o, end, 64 * 1024).map_err(fail)?;
        random_ms.push(ms(started.elapsed()));
        if r.frames.is_empty() {
            return Err(wrong(format!("nothing read at offset {o}")));
        }
    }
    Ok(Measured {
        disk,
        whole_s,
        random_ms: sorted(&random_ms),
    })
}

/// What writing the output took.
struct Written {
    /// The log's length.
    end: u64,
    /// Bytes of output.
    written: u64,
    /// Chunks appended.
    chunks: u64,
    /// Each chunk's offset.
    offsets: Vec<u64>,
    /// Each append's milliseconds, sorted.
    append_ms: Vec<f64>,
    /// The generator after the output (it picks the random offsets).
    mix: StdRng,
}

/// Writes `--mb` MB of build-like output (seeded: the same bytes on every store) as 16 KiB
/// chunks of one attempt.
fn write(logs: &dyn JobLogs, job: JobId, a: &LogsArgs) -> Result<Written, BenchError> {
    let total = u64::from(a.mb) * 1_000_000;
    let mut mix = StdRng::seed_from_u64(a.seed);
    let (mut written, mut seq, mut n) = (0u64, 0u64, 0u64);
    let mut offsets = vec![0u64];
    let mut append_ms = Vec::new();
    let mut end = 0;
    let mut chunk = String::with_capacity(CHUNK + 200);
    while written < total {
        chunk.clear();
        while chunk.len() < CHUNK {
            n += 1;
            chunk.push_str(&line(&mut mix, n));
        }
        seq += 1;
        let header = FrameHeader {
            attempt: AttemptId::new(1),
            seq,
            step: 0,
            stream: 1,
        };
        let started = Instant::now();
        end = logs.append(job, &header, chunk.as_bytes()).map_err(fail)?;
        append_ms.push(ms(started.elapsed()));
        offsets.push(end);
        written += chunk.len() as u64;
    }
    offsets.pop();
    Ok(Written {
        end,
        written,
        chunks: seq,
        offsets,
        append_ms: sorted(&append_ms),
        mix,
    })
}

/// Runs the benchmark.
pub async fn run(a: &LogsArgs) -> Result<(), BenchError> {
    let a = a.clone();
    tokio::task::spawn_blocking(move || run_blocking(&a))
        .await
        .map_err(fail)?
}

fn run_blocking(a: &LogsArgs) -> Result<(), BenchError> {
    header(
        "logs",
        &format!(
            "{} MB of build output in 16 KiB chunks, plain vs sealed (seekable zstd)",
            a.mb
        ),
    );
    let dir = tempfile::tempdir().map_err(fail)?;
    let logs = LogStore::open(dir.path()).map_err(fail)?;
    let job = JobId::new(1);
    let mut w = write(&logs, job, a)?;
    let (end, written, seq) = (w.end, w.written, w.chunks);
    let (offsets, mix) = (&w.offsets, &mut w.mix);
    logs.sync(job).map_err(fail)?;
    let picks: Vec<u64> = (0..RANDOM_READS)
        .map(|_| offsets[mix.random_range(0..offsets.len())])
        .collect();

    let plain = measure(&logs, job, end, &picks, written)?;
    let started = Instant::now();
    let (_, sealed_bytes) = logs
        .seal(job)
        .map_err(fail)?
        .ok_or_else(|| wrong("the log was not sealed"))?;
    let seal_s = started.elapsed().as_secs_f64();
    let sealed = measure(&logs, job, end, &picks, written)?;
    if sealed.disk != sealed_bytes {
        return Err(wrong("sealed size differs from what seal reported"));
    }

    let mb = written as f64 / 1e6;
    note(format!(
        "{written} bytes of output in {seq} chunks; plain log {} bytes, sealed {} bytes",
        plain.disk, sealed.disk
    ));
    let per_mb = |m: &Measured| m.disk as f64 / mb / 1e6;
    figure(
        "disk per MB of output",
        format!("{:.3} MB", per_mb(&sealed)),
        "< 0.25 MB",
        Some(per_mb(&sealed) < 0.25),
        &format!(
            "plain {:.3} MB; {:.1}x smaller",
            per_mb(&plain),
            plain.disk as f64 / sealed.disk.max(1) as f64
        ),
    );
    figure(
        "whole read (replay)",
        format!("{:.0} MB/s", mb / sealed.whole_s),
        ">= 200 MB/s",
        Some(mb / sealed.whole_s >= 200.0),
        &format!(
            "plain {:.0} MB/s; ratio {:.2}",
            mb / plain.whole_s,
            plain.whole_s / sealed.whole_s
        ),
    );
    let p50 = |m: &Measured| percentile(&m.random_ms, 50.0);
    let p99 = |m: &Measured| percentile(&m.random_ms, 99.0);
    figure(
        "64 KiB read at an offset, p50",
        format!("{:.2} ms", p50(&sealed)),
        "< 10 ms",
        Some(p50(&sealed) < 10.0),
        &format!(
            "plain {:.2} ms; ratio {:.1}",
            p50(&plain),
            p50(&sealed) / p50(&plain).max(1e-6)
        ),
    );
    figure(
        "64 KiB read at an offset, p99",
        format!("{:.2} ms", p99(&sealed)),
        "< 20 ms",
        Some(p99(&sealed) < 20.0),
        &format!("plain {:.2} ms", p99(&plain)),
    );
    figure(
        "sealing (compression)",
        format!("{:.0} MB/s", mb / seal_s),
        "",
        None,
        &format!("{:.2} s for the log, after the job's result", seal_s),
    );
    if a.postgres {
        postgres(a, &w, &plain, &picks)?;
    }
    Ok(())
}

/// The same output in a `PgLogStore` (fsync on), against the plain file measured above.
fn postgres(
    a: &LogsArgs,
    files: &Written,
    plain: &Measured,
    picks: &[u64],
) -> Result<(), BenchError> {
    let cluster = kiln_pgtest::PgCluster::start_durable()
        .map_err(|e| fail(format!("starting PostgreSQL: {e}")))?;
    let url = cluster
        .database()
        .map_err(|e| fail(format!("creating the database: {e}")))?;
    let logs = PgLogStore::connect(&url).map_err(|e| fail(format!("opening the store: {e}")))?;
    let job = JobId::new(1);
    let w = write(&logs, job, a)?;
    if w.end != files.end {
        return Err(wrong(format!(
            "the database's log is {} bytes, the file {}",
            w.end, files.end
        )));
    }
    let pg = measure(&logs, job, w.end, picks, w.written)?;
    let mb = w.written as f64 / 1e6;
    note(format!(
        "PostgreSQL (PgLogStore, fsync on): the same {} chunks, one transaction each; {} bytes \
         stored (pg_column_size: TOAST-compressed)",
        w.chunks, pg.disk
    ));
    let p50 = |v: &[f64]| percentile(v, 50.0);
    let p99 = |v: &[f64]| percentile(v, 99.0);
    figure(
        "pg: append of 16 KiB, p50",
        format!("{:.2} ms", p50(&w.append_ms)),
        "",
        None,
        &format!("file {:.3} ms", p50(&files.append_ms)),
    );
    figure(
        "pg: append of 16 KiB, p99",
        format!("{:.2} ms", p99(&w.append_ms)),
        "",
        None,
        &format!("file {:.3} ms", p99(&files.append_ms)),
    );
    let rate = |v: &[f64]| mb / (v.iter().sum::<f64>() / 1000.0);
    figure(
        "pg: output stored, one writer",
        format!("{:.1} MB/s", rate(&w.append_ms)),
        "",
        None,
        &format!("file {:.0} MB/s", rate(&files.append_ms)),
    );
    figure(
        "pg: disk per MB of output",
        format!("{:.3} MB", pg.disk as f64 / mb / 1e6),
        "",
        None,
        &format!("plain file {:.3} MB", plain.disk as f64 / mb / 1e6),
    );
    figure(
        "pg: whole read (replay)",
        format!("{:.0} MB/s", mb / pg.whole_s),
        "",
        None,
        &format!("plain file {:.0} MB/s", mb / plain.whole_s),
    );
    figure(
        "pg: 64 KiB read at an offset, p50",
        format!("{:.2} ms", p50(&pg.random_ms)),
        "< 10 ms",
        Some(p50(&pg.random_ms) < 10.0),
        &format!("plain file {:.2} ms", p50(&plain.random_ms)),
    );
    figure(
        "pg: 64 KiB read at an offset, p99",
        format!("{:.2} ms", p99(&pg.random_ms)),
        "< 20 ms",
        Some(p99(&pg.random_ms) < 20.0),
        &format!("plain file {:.2} ms", p99(&plain.random_ms)),
    );
    // The store before its database.
    drop(logs);
    drop(cluster);
    Ok(())
}

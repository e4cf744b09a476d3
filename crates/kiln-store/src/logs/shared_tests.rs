//! The log store's behaviour on both stores ([`JobLogs`]: files and PostgreSQL), and what only
//! the database store promises (a chunk sent again is stored once, several writers at once).
//! What only files have (sealing, dropped attempts, torn frames, the index file) is tested in
//! `logs.rs`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use kiln_domain::{AttemptId, JobId};

use super::tests::{Rng, boundaries, check_against_scan, fill, h};
use super::*;
use crate::testing::{Backend, on_both_backends};
use crate::{PgLogStore, PgStore};

on_both_backends!(
    append_read_and_offsets,
    read_respects_max_bytes,
    a_long_logs_locate_starts_at_a_checkpoint,
);

fn append_read_and_offsets(b: Backend) {
    let logs = b.open_logs();
    let job = JobId::new(7);
    let a = logs.append(job, &h(1, 1), b"hello\n").unwrap();
    assert_eq!(a, (HEADER_LEN + 6) as u64);
    let b = logs.append(job, &h(1, 2), &[0xff, 0xfe, 0x00]).unwrap();
    assert_eq!(logs.len(job).unwrap(), b);
    let all = logs.read(job, 0, b, 1 << 20).unwrap();
    assert_eq!(all.frames.len(), 2);
    assert_eq!(all.frames[0].data, b"hello\n");
    assert_eq!(all.frames[0].header, h(1, 1));
    assert_eq!(all.frames[0].next_offset, a);
    assert_eq!(all.frames[1].data, vec![0xff, 0xfe, 0x00]);
    assert_eq!(all.next_offset, b);
    let rest = logs.read(job, a, b, 1 << 20).unwrap();
    assert_eq!(rest.frames.len(), 1);
    assert_eq!(rest.frames[0].data, vec![0xff, 0xfe, 0x00]);
    for bad in [3, a - 1, a + 1] {
        assert!(
            matches!(
                logs.read(job, bad, b, 1 << 20),
                Err(LogError::BadOffset { .. })
            ),
            "offset {bad}"
        );
    }
    assert!(matches!(
        logs.read(job, b + 1, b, 1 << 20),
        Err(LogError::BadOffset { .. })
    ));
    assert_eq!(
        logs.read(job, b, b, 1 << 20).unwrap(),
        ReadResult {
            frames: vec![],
            next_offset: b
        }
    );
    // Reading up to a published length ignores later bytes.
    let first = logs.read(job, 0, a, 1 << 20).unwrap();
    assert_eq!(first.frames.len(), 1);
    // A limit inside a frame stops before it.
    let cut = logs.read(job, 0, b - 1, 1 << 20).unwrap();
    assert_eq!((cut.frames.len(), cut.next_offset), (1, a));
    assert_eq!(logs.last_seq(job, AttemptId::new(1)).unwrap(), 2);
    assert_eq!(logs.last_seq(job, AttemptId::new(9)).unwrap(), 0);
    assert_eq!(logs.last_seq(JobId::new(8), AttemptId::new(1)).unwrap(), 0);
    assert_eq!(logs.len(JobId::new(8)).unwrap(), 0);
    assert!(matches!(
        logs.append(job, &h(1, 3), &vec![0u8; MAX_FRAME + 1]),
        Err(LogError::TooLarge(_))
    ));
    // Lines before an offset, from the log's start.
    let at = logs.locate(job, a, b, &|_| true).unwrap();
    assert_eq!(
        at,
        Located {
            offset: a,
            lines: 1,
            aligned: true
        }
    );
    assert!(logs.disk_usage(job).unwrap() > 0);
    logs.sync(job).unwrap();
    logs.sync_all().unwrap();
    // Another handle (another process) reads the same.
    let other = logs.another();
    assert_eq!(other.len(job).unwrap(), b);
    assert_eq!(other.read(job, 0, b, 1 << 20).unwrap(), all);
}

fn read_respects_max_bytes(b: Backend) {
    let logs = b.open_logs();
    let job = JobId::new(1);
    let mut end = 0;
    for i in 0..10 {
        end = logs.append(job, &h(1, i + 1), &[b'x'; 1000]).unwrap();
    }
    let part = logs.read(job, 0, end, 2500).unwrap();
    assert_eq!(part.frames.len(), 3);
    let rest = logs.read(job, part.next_offset, end, 1 << 20).unwrap();
    assert_eq!(rest.frames.len(), 7);
    let one = logs.read(job, 0, end, 1).unwrap();
    assert_eq!(one.frames.len(), 1, "always at least one frame");
}

/// A log of several MiB and three attempts: `locate` starts at a checkpoint at most about a
/// MiB before its target and finds what a full scan finds, while written and from another
/// handle.
fn a_long_logs_locate_starts_at_a_checkpoint(b: Backend) {
    let logs = b.open_logs();
    let job = JobId::new(4);
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    fill(&*logs, job, 1, 3 << 20, &mut rng);
    fill(&*logs, job, 2, 2 << 20, &mut rng);
    fill(&*logs, job, 3, 1 << 20, &mut rng);
    check_against_scan(&*logs, job, &mut rng);
    let end = logs.len(job).unwrap();
    assert!(logs.checkpoint_before(job, end).unwrap().offset + 2 * CHECKPOINT_EVERY > end);
    logs.sync(job).unwrap();
    let other = logs.another();
    check_against_scan(&*other, job, &mut rng);
}

/// The bytes of `job`'s frames in the database, in order.
fn stored_bytes(url: &str, job: JobId) -> Vec<u8> {
    let db = PgStore::connect(url).unwrap();
    let rows = db
        .read(|db| {
            db.query(
                "SELECT frame FROM log_frames WHERE job_id = $1 ORDER BY start",
                &[&job],
            )
        })
        .unwrap();
    rows.iter().flat_map(|r| r.get::<_, Vec<u8>>(0)).collect()
}

/// The same appends to a file and to the database: the database's rows hold the file's bytes,
/// and every read, length, sequence number, checkpoint and `locate` is the same.
#[test]
fn files_and_the_database_hold_and_read_the_same() {
    let files = Backend::Sqlite.open_logs();
    let pg = Backend::Postgres.open_logs();
    let job = JobId::new(11);
    for attempt in 1..=3 {
        let (mut r1, mut r2) = (Rng(attempt * 77), Rng(attempt * 77));
        let a = fill(&*files, job, attempt, 3 << 19, &mut r1);
        let b = fill(&*pg, job, attempt, 3 << 19, &mut r2);
        assert_eq!(a, b, "attempt {attempt}");
    }
    files.sync(job).unwrap();
    let end = files.len(job).unwrap();
    assert_eq!(pg.len(job).unwrap(), end);
    let file = std::fs::read(std::path::Path::new(files.place()).join("11.log")).unwrap();
    assert_eq!(file.len() as u64, end);
    assert!(
        stored_bytes(pg.place(), job) == file,
        "the rows are the file's bytes"
    );
    for attempt in 0..=4 {
        let a = AttemptId::new(attempt);
        assert_eq!(
            pg.last_seq(job, a).unwrap(),
            files.last_seq(job, a).unwrap()
        );
    }
    let bounds = boundaries(&*files, job, &[None]);
    let mut rng = Rng(5);
    for (i, (offset, _, _)) in bounds.iter().enumerate() {
        // Every boundary near the ends and a sample between, with small and large reads.
        if i > 8 && i + 8 < bounds.len() && rng.below(8) != 0 {
            continue;
        }
        for max in [1, 50_000, 3 << 20] {
            assert_eq!(
                pg.read(job, *offset, end, max).unwrap(),
                files.read(job, *offset, end, max).unwrap(),
                "offset {offset} max {max}"
            );
        }
    }
    for _ in 0..30 {
        let t = rng.below(end + 1);
        assert_eq!(
            pg.checkpoint_before(job, t).unwrap(),
            files.checkpoint_before(job, t).unwrap(),
            "target {t}"
        );
        let shown = |a: AttemptId| a >= AttemptId::new(2);
        assert_eq!(
            pg.locate(job, t, end, &shown).unwrap(),
            files.locate(job, t, end, &shown).unwrap(),
            "target {t}"
        );
        // An offset inside a frame is refused by both.
        if !bounds.iter().any(|b| b.0 == t) && t < end {
            assert!(matches!(
                pg.read(job, t, end, 100),
                Err(LogError::BadOffset { .. })
            ));
        }
    }
    // Durable at commit, nothing to seal, nothing dropped; the stored size is compressed.
    assert_eq!(pg.seal(job).unwrap(), None);
    assert_eq!(pg.drop_attempts(job, AttemptId::new(3)).unwrap(), 0);
    assert_eq!(pg.len(job).unwrap(), end);
    let stored = pg.disk_usage(job).unwrap();
    assert!(stored > 0 && stored < end, "{stored} of {end}");
}

/// A chunk sent again (a runner re-sending what was not acknowledged, maybe to another
/// dispatcher) is stored once: the second append writes nothing and returns the length.
#[test]
fn a_chunk_sent_again_is_stored_once() {
    let pg = Backend::Postgres.open_logs();
    let other = pg.another();
    let job = JobId::new(3);
    let a = pg.append(job, &h(1, 1), b"first\n").unwrap();
    let b = pg.append(job, &h(1, 2), b"second\n").unwrap();
    assert_eq!(pg.append(job, &h(1, 1), b"first\n").unwrap(), b);
    assert_eq!(other.append(job, &h(1, 2), b"other bytes\n").unwrap(), b);
    assert_eq!(pg.len(job).unwrap(), b);
    let all = pg.read(job, 0, b, usize::MAX).unwrap();
    let data: Vec<&[u8]> = all.frames.iter().map(|f| f.data.as_slice()).collect();
    assert_eq!(data, [&b"first\n"[..], b"second\n"]);
    assert_eq!(all.frames[0].next_offset, a);
    // The same sequence number of another attempt is another chunk.
    let c = pg.append(job, &h(2, 1), b"retry\n").unwrap();
    assert_eq!(c, b + (HEADER_LEN + 6) as u64);
    assert_eq!(pg.last_seq(job, AttemptId::new(1)).unwrap(), 2);
    assert_eq!(pg.last_seq(job, AttemptId::new(2)).unwrap(), 1);
}

/// Two dispatchers (two stores, two pools) append to one job at once, each its own attempt
/// and both the same re-sent chunks of a third: the log is whole, every chunk is in it once
/// and in its attempt's order, each append returned a frame boundary, and the checkpoints
/// written along the way count what a full scan counts.
#[test]
fn two_dispatchers_append_to_one_job_at_once() {
    let pg = Backend::Postgres.open_logs();
    let handles: Vec<Arc<dyn JobLogs>> = vec![
        Arc::new(PgLogStore::connect(pg.place()).unwrap()),
        Arc::new(PgLogStore::connect(pg.place()).unwrap()),
    ];
    let job = JobId::new(9);
    const CHUNKS: u64 = 300;
    let chunk = |attempt: u64, seq: u64| {
        let line = format!("attempt {attempt} chunk {seq}\n");
        line.repeat(8 << 10 >> 5).into_bytes()
    };
    let start = Arc::new(std::sync::Barrier::new(2));
    let threads: Vec<_> = handles
        .iter()
        .enumerate()
        .map(|(i, logs)| {
            let (logs, start) = (logs.clone(), start.clone());
            std::thread::spawn(move || {
                start.wait();
                let own = 2 + i as u64;
                let mut ends = Vec::new();
                for seq in 1..=CHUNKS {
                    ends.push(logs.append(job, &h(1, seq), &chunk(1, seq)).unwrap());
                    ends.push(logs.append(job, &h(own, seq), &chunk(own, seq)).unwrap());
                }
                ends
            })
        })
        .collect();
    let ends: Vec<u64> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    let end = pg.len(job).unwrap();
    let all = pg.read(job, 0, end, usize::MAX).unwrap();
    assert_eq!(all.next_offset, end);
    assert_eq!(all.frames.len() as u64, 3 * CHUNKS);
    let offsets: std::collections::HashSet<u64> =
        all.frames.iter().map(|f| f.next_offset).collect();
    assert!(
        ends.iter().all(|e| offsets.contains(e)),
        "an append returned no boundary"
    );
    for attempt in 1..=3 {
        let seqs: Vec<u64> = all
            .frames
            .iter()
            .filter(|f| f.header.attempt == AttemptId::new(attempt))
            .map(|f| {
                assert_eq!(f.data, chunk(attempt, f.header.seq));
                f.header.seq
            })
            .collect();
        assert_eq!(seqs, (1..=CHUNKS).collect::<Vec<_>>(), "attempt {attempt}");
    }
    assert!(end > 2 * CHECKPOINT_EVERY);
    check_against_scan(&*pg, job, &mut Rng(3));
}

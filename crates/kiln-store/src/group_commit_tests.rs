//! Group commit of [`SqliteStore`] (`group_commit.rs`): one failing operation of a batch rolls
//! back alone, concurrent callers share a commit and each gets its own result, reads do not
//! wait for a batch being written, and nothing acknowledged is lost to a SIGKILL.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::io::{BufRead, Write};
use std::path::Path;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use kiln_domain::{BuildId, JobState};
use rusqlite::Connection;

use crate::testing::one_job_build;
use crate::{SqliteStore, Store, StoreError};

fn add_runner(c: &Connection, name: &str) -> crate::Result<()> {
    c.execute(
        "INSERT INTO runners (name, labels, slots, version, last_seen) VALUES (?1, '{}', 1, 't', 0)",
        [name],
    )?;
    Ok(())
}

fn runner_names(path: &Path) -> BTreeSet<String> {
    let s = SqliteStore::open(path).unwrap();
    s.list_runners()
        .unwrap()
        .into_iter()
        .map(|r| r.name)
        .collect()
}

/// Waits until `cond` holds, failing the test after `limit`.
fn wait_for(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::yield_now();
    }
}

/// Three operations in one batch, the middle one failing after it wrote: it alone is undone,
/// the third sees the first's effect, and the batch commits once.
#[test]
fn a_failing_operation_rolls_back_alone_in_its_batch() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kiln.db");
    let s = SqliteStore::open(&path).unwrap();
    let (batches, ops) = s.commit_stats();
    let out = s.group().write_each(3, |c, i| match i {
        0 => add_runner(c, "a"),
        1 => {
            add_runner(c, "b")?;
            c.execute("INSERT INTO no_such_table VALUES (1)", [])?;
            Ok(())
        }
        _ => {
            let seen: i64 =
                c.query_row("SELECT COUNT(*) FROM runners WHERE name = 'a'", [], |r| {
                    r.get(0)
                })?;
            assert_eq!(seen, 1, "the third operation sees the first's write");
            add_runner(c, "c")
        }
    });
    assert!(out[0].is_ok() && out[2].is_ok(), "{out:?}");
    assert!(matches!(out[1], Err(StoreError::Sqlite(_))), "{out:?}");
    assert_eq!(s.commit_stats(), (batches + 1, ops + 3));
    drop(s);
    assert_eq!(
        runner_names(&path),
        BTreeSet::from(["a".into(), "c".into()])
    );
}

/// Three callers on three threads land in one batch (the first holds the connection until the
/// other two have announced themselves): one commit, the failing caller gets its error, the
/// two others their results, and only their writes are stored.
#[test]
fn concurrent_callers_share_one_commit_and_keep_their_own_errors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kiln.db");
    let s = SqliteStore::open(&path).unwrap();
    let (batches, ops) = s.commit_stats();
    let (started_tx, started) = mpsc::channel();
    let (a, b, c) = std::thread::scope(|scope| {
        let s = &s;
        let a = scope.spawn(move || {
            s.with_tx(|c| {
                add_runner(c, "a")?;
                started_tx.send(()).unwrap();
                // Holding the write connection until both others wait for it.
                wait_for("two more callers", Duration::from_secs(30), || {
                    s.group().pending() == 3
                });
                Ok("a")
            })
        });
        started.recv_timeout(Duration::from_secs(30)).unwrap();
        let b = scope.spawn(move || {
            s.with_tx(|c| {
                add_runner(c, "b")?;
                Err::<&str, _>(StoreError::Corrupt("b fails".into()))
            })
        });
        let c = scope.spawn(move || {
            s.with_tx(|c| {
                add_runner(c, "c")?;
                Ok("c")
            })
        });
        (a.join().unwrap(), b.join().unwrap(), c.join().unwrap())
    });
    assert_eq!(a.unwrap(), "a");
    assert_eq!(c.unwrap(), "c");
    assert!(
        matches!(b, Err(StoreError::Corrupt(ref m)) if m == "b fails"),
        "{b:?}"
    );
    assert_eq!(
        s.commit_stats(),
        (batches + 1, ops + 3),
        "one commit for the three"
    );
    drop(s);
    assert_eq!(
        runner_names(&path),
        BTreeSet::from(["a".into(), "c".into()])
    );
}

/// An operation that panics is rolled back alone; the store goes on.
#[test]
fn a_panicking_operation_is_undone_and_the_store_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kiln.db");
    let s = SqliteStore::open(&path).unwrap();
    let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let _ = s.with_tx(|c| {
            add_runner(c, "p")?;
            panic!("an operation panics");
            #[allow(unreachable_code)]
            Ok(())
        });
    }));
    assert!(panicked.is_err());
    s.with_tx(|c| add_runner(c, "q")).unwrap();
    drop(s);
    assert_eq!(runner_names(&path), BTreeSet::from(["q".into()]));
}

/// Writers on many threads at once, each also re-submitting a build it made (a duplicate, an
/// error of its own): every call gets its own answer, and every build answered is stored.
#[test]
fn many_concurrent_writers_all_get_their_results() {
    const THREADS: usize = 16;
    const EACH: usize = 40;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kiln.db");
    let s = SqliteStore::open(&path).unwrap();
    let (batches, ops) = s.commit_stats();
    let made: Vec<Vec<(BuildId, String)>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..THREADS)
            .map(|t| {
                let s = &s;
                scope.spawn(move || {
                    let mut mine = Vec::new();
                    for i in 0..EACH {
                        let commit = format!("{t:02}{i:038}");
                        let d = s.create_build(&one_job_build(&commit)).unwrap();
                        assert_eq!(d.build.commit, commit);
                        assert_eq!(d.jobs.len(), 1);
                        mine.push((d.build.id, commit.clone()));
                        if i == EACH / 2 {
                            match s.create_build(&one_job_build(&commit)) {
                                Err(StoreError::Duplicate { build }) => {
                                    assert_eq!(build, d.build.id)
                                }
                                other => panic!("a duplicate, not {other:?}"),
                            }
                        }
                    }
                    mine
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let all: Vec<_> = made.into_iter().flatten().collect();
    let ids: BTreeSet<BuildId> = all.iter().map(|(id, _)| *id).collect();
    assert_eq!(ids.len(), THREADS * EACH);
    let (b2, o2) = s.commit_stats();
    let calls = (THREADS * (EACH + 1)) as u64;
    assert_eq!(o2 - ops, calls);
    assert!(b2 - batches <= calls);
    eprintln!("{calls} writes in {} commits", b2 - batches);
    drop(s);
    let s = SqliteStore::open(&path).unwrap();
    for (id, commit) in &all {
        let d = s
            .get_build(*id)
            .unwrap()
            .expect("an answered build is stored");
        assert_eq!(&d.build.commit, commit);
        assert_eq!(d.jobs[0].state, JobState::Queued);
    }
}

/// A write that takes long (its transaction open) does not hold up reads, which see the state
/// before it until it commits.
#[test]
fn reads_do_not_wait_for_a_long_write() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kiln.db");
    let s = SqliteStore::open(&path).unwrap();
    let id = s
        .create_build(&one_job_build(&"a".repeat(40)))
        .unwrap()
        .build
        .id;
    let (inside_tx, inside) = mpsc::channel();
    let (finish_tx, finish) = mpsc::channel::<()>();
    std::thread::scope(|scope| {
        let s = &s;
        let writer = scope.spawn(move || {
            s.with_tx(|c| {
                c.execute("UPDATE builds SET state = 'failed' WHERE id = ?1", [id])?;
                inside_tx.send(()).unwrap();
                finish.recv_timeout(Duration::from_secs(30)).unwrap();
                Ok(())
            })
        });
        inside.recv_timeout(Duration::from_secs(30)).unwrap();
        // The write is in progress (its transaction open, the write connection held).
        let (read_tx, read) = mpsc::channel();
        scope.spawn(move || {
            let detail = s.get_build(id).map(|d| d.map(|d| d.build.state));
            let listed = s
                .list_builds(&crate::BuildFilter {
                    limit: 10,
                    ..Default::default()
                })
                .map(|l| l.len());
            let metrics = s.metrics().map(|m| m.jobs_by_state.len());
            read_tx.send((detail, listed, metrics)).unwrap();
        });
        let (detail, listed, metrics) = read
            .recv_timeout(Duration::from_secs(10))
            .expect("reads answered while the write is open");
        assert_eq!(
            detail.unwrap(),
            Some(JobState::Queued),
            "not the uncommitted write"
        );
        assert_eq!(listed.unwrap(), 1);
        assert!(metrics.unwrap() > 0);
        finish_tx.send(()).unwrap();
        writer.join().unwrap().unwrap();
    });
    assert_eq!(
        s.get_build(id).unwrap().unwrap().build.state,
        JobState::Failed
    );
}

/// The child of [`acknowledged_writes_survive_sigkill`]: writes builds from 8 threads until
/// killed, printing `ack ID COMMIT` after each call returned.
#[test]
#[ignore = "run by acknowledged_writes_survive_sigkill in a child process"]
fn crash_child() {
    let Some(path) = std::env::var_os("KILN_GROUP_COMMIT_CHILD_DB") else {
        return;
    };
    let s = SqliteStore::open(Path::new(&path)).unwrap();
    std::thread::scope(|scope| {
        for t in 0..8 {
            let s = &s;
            scope.spawn(move || {
                for i in 0.. {
                    let commit = format!("{t:02}{i:038}");
                    let d = s.create_build(&one_job_build(&commit)).unwrap();
                    let mut out = std::io::stdout().lock();
                    writeln!(out, "ack {} {commit}", d.build.id).unwrap();
                    out.flush().unwrap();
                }
            });
        }
    });
}

/// A process writing from many threads is SIGKILLed: every build it acknowledged (a call
/// that returned) is in the file afterwards.
#[test]
fn acknowledged_writes_survive_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kiln.db");
    drop(SqliteStore::open(&path).unwrap());
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "group_commit_tests::crash_child",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("KILN_GROUP_COMMIT_CHILD_DB", &path)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = std::io::BufReader::new(stdout).lines();
    let mut acked: Vec<(BuildId, String)> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while acked.len() < 400 {
        assert!(
            Instant::now() < deadline,
            "the child acknowledged {} writes",
            acked.len()
        );
        let Some(line) = lines.next() else {
            panic!("the child ended after {} acks", acked.len());
        };
        if let Some((id, commit)) = parse_ack(&line.unwrap()) {
            acked.push((id, commit));
        }
    }
    // SIGKILL while its threads are writing.
    child.kill().unwrap();
    // What it printed before it died counts too.
    for line in lines {
        match line {
            Ok(line) => acked.extend(parse_ack(&line)),
            Err(_) => break,
        }
    }
    child.wait().unwrap();
    let s = SqliteStore::open(&path).unwrap();
    for (id, commit) in &acked {
        let d = s
            .get_build(*id)
            .unwrap()
            .unwrap_or_else(|| panic!("acknowledged build {id} lost"));
        assert_eq!(&d.build.commit, commit);
        assert_eq!(d.jobs.len(), 1);
    }
    eprintln!("{} acknowledged builds, all stored", acked.len());
}

fn parse_ack(line: &str) -> Option<(BuildId, String)> {
    let mut words = line.strip_prefix("ack ")?.split(' ');
    let id = words.next()?.parse::<u64>().ok()?;
    Some((BuildId::new(id), words.next()?.to_string()))
}

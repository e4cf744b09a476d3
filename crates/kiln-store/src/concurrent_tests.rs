//! The exactly-once rules with several writers at once: threads on two store handles of one
//! database (as two dispatchers sharing it would be), started together at a barrier, on both
//! backends. With SQLite the file's lock serialises them; with PostgreSQL the transactions
//! and row locks of `pg.rs` must.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Barrier;

use kiln_domain::split::{
    LeasedUnit, RetryPolicy, SplitSpec, Strategy, UnitOutcome, UnitReport, UnitSource, UnitsReply,
    UnitsRequest,
};
use kiln_domain::{JobState, NewBuild, NewJob, StepSpec};

use crate::testing::{Backend, TestStore, on_both_backends};
use crate::{Finish, NewDelivery};

/// Writers racing in each test.
const WRITERS: usize = 8;

fn step(split: Option<SplitSpec>) -> StepSpec {
    StepSpec {
        name: "s".into(),
        run: "true".into(),
        split,
        ..Default::default()
    }
}

fn build(commit: &str, jobs: Vec<NewJob>, hash: &str) -> NewBuild {
    NewBuild {
        repo: "/tmp/repo".into(),
        commit: commit.into(),
        branch: "main".into(),
        trigger: "test".into(),
        jobs,
        pipeline_hash: hash.into(),
        ..Default::default()
    }
}

fn plain_job(name: &str) -> NewJob {
    NewJob {
        name: name.into(),
        steps: vec![step(None)],
        ..Default::default()
    }
}

/// Runs `f(i, store)` on `WRITERS` threads at once, alternating the two handles.
fn race<T: Send>(
    a: &dyn TestStore,
    b: &dyn TestStore,
    f: impl Fn(usize, &dyn TestStore) -> T + Sync,
) -> Vec<T> {
    let barrier = Barrier::new(WRITERS);
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..WRITERS)
            .map(|i| {
                let (f, barrier) = (&f, &barrier);
                let s: &dyn TestStore = if i % 2 == 0 { a } else { b };
                scope.spawn(move || {
                    barrier.wait();
                    f(i, s)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

fn one_queued_job_is_assigned_once(b: Backend) {
    let opened = b.open();
    let other = opened.another();
    let s: &dyn TestStore = &*opened;
    let d = s
        .create_build(&build("a", vec![plain_job("j")], ""))
        .unwrap();
    let job = d.jobs[0].id;
    let runners: Vec<_> = (0..WRITERS)
        .map(|i| {
            s.upsert_runner(&format!("r{i}"), &BTreeMap::new(), 1, "t")
                .unwrap()
                .id
        })
        .collect();
    let won = race(s, &*other, |i, st| {
        st.assign(job, runners[i], &format!("r{i}")).unwrap()
    });
    let winners: Vec<_> = won.into_iter().flatten().collect();
    assert_eq!(winners.len(), 1, "{winners:?}");
    let job = s.get_job(job).unwrap().unwrap();
    assert_eq!(job.state, JobState::Assigned);
    assert_eq!(job.attempts, 1);
    assert_eq!(job.current_attempt, Some(winners[0].0));
}

fn one_final_result_among_racing_reports(b: Backend) {
    let opened = b.open();
    let other = opened.another();
    let s: &dyn TestStore = &*opened;
    let d = s
        .create_build(&build("a", vec![plain_job("j")], ""))
        .unwrap();
    let job = d.jobs[0].id;
    let r = s.upsert_runner("r", &BTreeMap::new(), 1, "t").unwrap().id;
    let (attempt, _) = s.assign(job, r, "r").unwrap().unwrap();
    s.start_attempt(attempt).unwrap().unwrap();
    // Results (passed or failed), a loss and a cancel of the same attempt, all at once.
    let outcomes = race(s, &*other, |i, st| match i % 4 {
        0 => matches!(
            st.finish_attempt(attempt, JobState::Passed, None).unwrap(),
            Finish::Recorded(_)
        ),
        1 => matches!(
            st.finish_attempt(attempt, JobState::Failed, Some("exit 1"))
                .unwrap(),
            Finish::Recorded(_)
        ),
        2 => st
            .requeue_attempt(attempt, "runner lost", 1, true)
            .unwrap()
            .is_some(),
        _ => st
            .end_job(job, JobState::Cancelled, "cancelled")
            .unwrap()
            .is_some(),
    });
    assert_eq!(outcomes.iter().filter(|w| **w).count(), 1, "{outcomes:?}");
    let job = s.get_job(job).unwrap().unwrap();
    assert!(job.state.is_final(), "{:?}", job.state);
    let detail = s.get_build(d.build.id).unwrap().unwrap();
    assert_eq!(detail.build.state, job.state);
}

fn every_job_of_a_build_ends_and_the_build_agrees(b: Backend) {
    // Jobs of one build finishing at once on both handles: the build's state is computed
    // from all of them (no lost update of the build row).
    let opened = b.open();
    let other = opened.another();
    let s: &dyn TestStore = &*opened;
    let jobs = (0..WRITERS).map(|i| plain_job(&format!("j{i}"))).collect();
    let d = s.create_build(&build("a", jobs, "")).unwrap();
    let r = s.upsert_runner("r", &BTreeMap::new(), 8, "t").unwrap().id;
    let attempts: Vec<_> = d
        .jobs
        .iter()
        .map(|j| {
            let (a, _) = s.assign(j.id, r, "r").unwrap().unwrap();
            s.start_attempt(a).unwrap().unwrap();
            a
        })
        .collect();
    let changes = race(s, &*other, |i, st| {
        let state = if i == 3 {
            JobState::Failed
        } else {
            JobState::Passed
        };
        match st.finish_attempt(attempts[i], state, None).unwrap() {
            Finish::Recorded(c) => c,
            other => panic!("{other:?}"),
        }
    });
    // Exactly one change ended the build, and the build failed (one job failed).
    assert_eq!(
        changes
            .iter()
            .filter(|c| c.build_changed && c.build_state.is_final())
            .count(),
        1
    );
    let detail = s.get_build(d.build.id).unwrap().unwrap();
    assert_eq!(detail.build.state, JobState::Failed);
    assert!(detail.build.finished_at.is_some());
}

fn observers_racing_on_a_branch_record_each_commit_once(b: Backend) {
    let opened = b.open();
    let other = opened.another();
    let s: &dyn TestStore = &*opened;
    let commits: Vec<NewBuild> = ["c1", "c2", "c3"]
        .iter()
        .map(|c| build(c, vec![plain_job("j")], "hash"))
        .collect();
    let recorded = race(s, &*other, |_, st| {
        st.record_commits("/tmp/repo", "main", &commits, "c3", true)
            .unwrap()
    });
    let created: Vec<_> = recorded
        .iter()
        .flat_map(|r| r.created.iter().map(|d| d.build.commit.clone()))
        .collect();
    let unique: BTreeSet<_> = created.iter().cloned().collect();
    assert_eq!(created.len(), 3, "{created:?}");
    assert_eq!(unique.len(), 3);
    assert_eq!(
        s.branch_cursor("/tmp/repo", "main").unwrap().as_deref(),
        Some("c3")
    );
    let all = s
        .list_builds(&crate::BuildFilter {
            limit: 100,
            ..Default::default()
        })
        .unwrap();
    assert_eq!(all.len(), 3);
}

/// Submits racing on two handles: the same commit and pipeline makes one build (the others
/// are told it exists), other commits each make theirs, and none fails for a lost conflict.
fn racing_submits_make_each_build_once(b: Backend) {
    let opened = b.open();
    let other = opened.another();
    let s: &dyn TestStore = &*opened;
    let results = race(s, &*other, |i, st| {
        let same = st.create_build(&build("same", vec![plain_job("j")], "hash"));
        let own = st.create_build(&build(&format!("own{i}"), vec![plain_job("j")], "hash"));
        (same, own)
    });
    let mut made = 0;
    for (same, own) in results {
        match same {
            Ok(_) => made += 1,
            Err(crate::StoreError::Duplicate { .. }) => {}
            Err(e) => panic!("a racing submit failed: {e}"),
        }
        own.unwrap_or_else(|e| panic!("a submit of its own commit failed: {e}"));
    }
    assert_eq!(made, 1, "one build of the shared commit");
    let all = s
        .list_builds(&crate::BuildFilter {
            limit: 100,
            ..Default::default()
        })
        .unwrap();
    assert_eq!(all.len(), 1 + WRITERS);
}

/// Runner sessions on several dispatchers' handles: each session thread runs the session's
/// writes (assign, start, a step's result, finish) for jobs of its own, spread over a few
/// builds, while other threads submit builds and fold the metrics' deltas, all at once. On PostgreSQL these writes once
/// ran `SERIALIZABLE` and, at ten sessions, failed one another past the retries ("Canceled
/// on conflict out to pivot"); now every call must succeed, and each job must end once with
/// its one result, each build with the state its jobs give.
fn session_writes_on_many_handles_all_succeed(b: Backend) {
    /// Session threads, and threads submitting builds beside them.
    const SESSIONS: usize = 16;
    const SUBMITTERS: usize = 2;
    /// Builds the sessions' jobs belong to, jobs of each, submits per submitter.
    const BUILDS: usize = 3;
    const JOBS: usize = 64;
    const SUBMITS: usize = 30;
    let opened = b.open();
    let handles: Vec<Box<dyn TestStore>> = (0..4).map(|_| opened.another()).collect();
    let s: &dyn TestStore = &*opened;
    let builds: Vec<_> = (0..BUILDS)
        .map(|i| {
            let jobs = (0..JOBS).map(|j| plain_job(&format!("j{j}"))).collect();
            s.create_build(&build(&format!("b{i}"), jobs, "h")).unwrap()
        })
        .collect();
    // Build i's job j is session (i * JOBS + j) % SESSIONS's; one job of build 0 fails.
    let all: Vec<_> = builds
        .iter()
        .flat_map(|d| d.jobs.iter().map(|j| j.id))
        .collect();
    let failing = all[JOBS / 2];
    let runners: Vec<_> = (0..SESSIONS)
        .map(|i| {
            s.upsert_runner(&format!("r{i}"), &BTreeMap::new(), 4, "t")
                .unwrap()
                .id
        })
        .collect();
    let barrier = Barrier::new(SESSIONS + SUBMITTERS);
    std::thread::scope(|scope| {
        for i in 0..SESSIONS {
            let (barrier, all, runners) = (&barrier, &all, &runners);
            let st: &dyn TestStore = &*handles[i % handles.len()];
            scope.spawn(move || {
                barrier.wait();
                let name = format!("r{i}");
                for &job in all.iter().skip(i).step_by(SESSIONS) {
                    let (attempt, _) = st
                        .assign(job, runners[i], &name)
                        .unwrap_or_else(|e| panic!("assign of job {job}: {e:?}"))
                        .expect("a queued job of this session's own is assigned");
                    st.start_attempt(attempt)
                        .unwrap_or_else(|e| panic!("start of attempt {attempt}: {e:?}"))
                        .expect("the attempt starts");
                    let failed = job == failing;
                    let step = kiln_domain::StepResult {
                        index: 0,
                        outcome: if failed {
                            kiln_domain::StepOutcome::Failed
                        } else {
                            kiln_domain::StepOutcome::Passed
                        },
                        exit_code: Some(i32::from(failed)),
                        duration_ms: 1,
                        cases: Vec::new(),
                        report_note: String::new(),
                    };
                    assert!(
                        st.record_step(attempt, &step)
                            .unwrap_or_else(|e| panic!("step of attempt {attempt}: {e:?}")),
                        "the step of a running attempt is recorded"
                    );
                    let state = if failed {
                        JobState::Failed
                    } else {
                        JobState::Passed
                    };
                    match st
                        .finish_attempt(attempt, state, None)
                        .unwrap_or_else(|e| panic!("finish of attempt {attempt}: {e:?}"))
                    {
                        Finish::Recorded(_) => {}
                        other => panic!("finish of attempt {attempt}: {other:?}"),
                    }
                    // The session's heartbeat.
                    st.touch_runner(runners[i], kiln_domain::now_millis())
                        .unwrap_or_else(|e| panic!("heartbeat of runner {i}: {e:?}"));
                }
            });
        }
        for i in 0..SUBMITTERS {
            let barrier = &barrier;
            let st: &dyn TestStore = &*handles[i % handles.len()];
            scope.spawn(move || {
                barrier.wait();
                for n in 0..SUBMITS {
                    st.create_build(&build(
                        &format!("s{i}-{n}"),
                        vec![plain_job("a"), plain_job("b")],
                        "h",
                    ))
                    .unwrap_or_else(|e| panic!("submit {i}-{n}: {e:?}"));
                    // The dispatcher folds the metrics' deltas as the writes go on.
                    st.fold_tallies()
                        .unwrap_or_else(|e| panic!("fold after submit {i}-{n}: {e:?}"));
                }
            });
        }
    });
    for (i, d) in builds.iter().enumerate() {
        let detail = s.get_build(d.build.id).unwrap().unwrap();
        let want = if i == 0 {
            JobState::Failed
        } else {
            JobState::Passed
        };
        assert_eq!(detail.build.state, want, "build {}", d.build.id);
        assert!(detail.build.finished_at.is_some());
        for j in &detail.jobs {
            let state = if j.id == failing {
                JobState::Failed
            } else {
                JobState::Passed
            };
            assert_eq!(j.state, state, "job {}", j.id);
            assert_eq!(j.attempts, 1, "job {}", j.id);
        }
    }
    // One result and one finished attempt per job; nothing refused.
    let per_job = s.text_rows(
        "SELECT CAST(COUNT(*) AS TEXT), CAST(COUNT(DISTINCT job_id) AS TEXT) FROM step_results",
    );
    assert_eq!(per_job[0], vec![all.len().to_string(); 2]);
    let attempts =
        s.text_rows("SELECT CAST(COUNT(*) AS TEXT) FROM attempts WHERE state = 'finished'");
    assert_eq!(attempts[0][0], all.len().to_string());
    assert_eq!(
        s.text_rows("SELECT CAST(COUNT(*) AS TEXT) FROM refusals")[0][0],
        "0"
    );
    let submitted = s
        .list_builds(&crate::BuildFilter {
            limit: 1000,
            ..Default::default()
        })
        .unwrap();
    assert_eq!(submitted.len(), BUILDS + SUBMITTERS * SUBMITS);
    crate::testing::check_tallies(s);
}

fn shards_on_two_handles_run_each_unit_once(b: Backend) {
    let opened = b.open();
    let other = opened.another();
    let s: &dyn TestStore = &*opened;
    let shards = WRITERS as u32;
    let spec = |shard| SplitSpec {
        key: "tests".into(),
        shards,
        shard,
        units: UnitSource::Glob(vec!["t/*".into()]),
        strategy: Strategy::Dynamic,
        retry: RetryPolicy::default(),
        max_batch: 2,
    };
    let jobs = (0..shards)
        .map(|i| NewJob {
            name: format!("shard{i}"),
            steps: vec![step(Some(spec(i)))],
            ..Default::default()
        })
        .collect();
    let d = s.create_build(&build("a", jobs, "")).unwrap();
    let units: Vec<String> = (0..40).map(|i| format!("t/{i:02}")).collect();
    let started: Vec<_> = d
        .jobs
        .iter()
        .enumerate()
        .map(|(i, j)| {
            let r = s
                .upsert_runner(&format!("r{i}"), &BTreeMap::new(), 1, "t")
                .unwrap()
                .id;
            let (a, _) = s.assign(j.id, r, &format!("r{i}")).unwrap().unwrap();
            s.start_attempt(a).unwrap().unwrap();
            (a, r)
        })
        .collect();
    let got = race(s, &*other, |i, st| {
        let (attempt, runner) = started[i];
        let mut held: Vec<LeasedUnit> = Vec::new();
        let mut got = Vec::new();
        // Each shard asks until the split's verdict; WAIT is answered by asking again (the
        // other shards' batches end as they report), bounded by a deadline.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
        for request in 1.. {
            assert!(
                std::time::Instant::now() < deadline,
                "the split never ended"
            );
            let req = UnitsRequest {
                attempt,
                runner,
                step_index: 0,
                request,
                discovered: units.clone(),
                results: held
                    .iter()
                    .map(|u| UnitReport {
                        unit: u.unit.clone(),
                        try_number: u.try_number,
                        outcome: UnitOutcome::Passed,
                        duration_ms: 10,
                        cases: Vec::new(),
                    })
                    .collect(),
                interactions: Vec::new(),
                max_units: 0,
                batch_ms: 0,
                batch_processes: 0,
            };
            held.clear();
            match st.next_units(&req).unwrap() {
                UnitsReply::Batch(batch) => {
                    got.extend(batch.iter().map(|u| u.unit.clone()));
                    held = batch;
                }
                UnitsReply::Wait => std::thread::yield_now(),
                UnitsReply::Done { passed, .. } => {
                    assert!(passed);
                    break;
                }
                UnitsReply::Refused(why) => panic!("refused: {why}"),
            }
        }
        got
    });
    let all: Vec<String> = got.into_iter().flatten().collect();
    let unique: BTreeSet<&String> = all.iter().collect();
    assert_eq!(all.len(), units.len(), "a unit leased twice or never");
    assert_eq!(unique.len(), units.len());
    let report = &s.split_reports(d.build.id).unwrap()[0];
    assert!(report.done && report.passed, "{}", report.retry_note);
}

fn senders_on_two_handles_take_disjoint_deliveries(b: Backend) {
    let opened = b.open();
    let other = opened.another();
    let s: &dyn TestStore = &*opened;
    let d = s
        .create_build(&build("a", vec![plain_job("j")], ""))
        .unwrap();
    let planned: Vec<NewDelivery> = (0..40)
        .map(|i| NewDelivery {
            delivery_id: format!("d{i}"),
            event: format!("e{i}"),
            target: "webhook http://x".into(),
            payload: "{}".into(),
            supersedes: false,
        })
        .collect();
    s.plan_deliveries(d.build.id, crate::Mark::Queued, &planned)
        .unwrap();
    let now = kiln_domain::now_millis() + 1;
    let taken = race(s, &*other, |_, st| {
        st.take_due_deliveries(now, now + 60_000, 10)
            .unwrap()
            .into_iter()
            .map(|d| d.key)
            .collect::<Vec<_>>()
    });
    let all: Vec<_> = taken.into_iter().flatten().collect();
    let unique: BTreeSet<_> = all.iter().collect();
    assert_eq!(all.len(), unique.len(), "a delivery taken twice");
    assert_eq!(all.len(), 40);
}

/// Dispatchers claiming one attempt from its owner at once (its runner re-attached to several
/// of them, or twice): exactly one claim wins, and the attempt ends up with that one.
fn one_claim_of_an_attempt_wins(b: Backend) {
    let opened = b.open();
    let other = opened.another();
    let s: &dyn TestStore = &*opened;
    let old = s.register_dispatcher("old", 0).unwrap();
    let ds: Vec<_> = (0..WRITERS)
        .map(|i| s.register_dispatcher(&format!("d{i}"), 0).unwrap())
        .collect();
    let r = s.upsert_runner("r", &BTreeMap::new(), 1, "t").unwrap().id;
    let a = crate::cluster_tests::owned_attempt(s, "a", r, Some(old));
    let won = race(s, &*other, |i, st| {
        let to = crate::Owner {
            dispatcher: ds[i],
            secret_hash: format!("h{i}"),
        };
        st.claim_attempt(a, r, Some(old), &to).unwrap().then_some(i)
    });
    let winners: Vec<usize> = won.into_iter().flatten().collect();
    assert_eq!(winners.len(), 1, "{winners:?}");
    let o = s.owned_attempt(a).unwrap().unwrap();
    assert_eq!(o.owner, Some(ds[winners[0]]));
    assert_eq!(o.secret_hash, Some(format!("h{}", winners[0])));
}

/// Live dispatchers adopting a dead one's attempts at once: each attempt is adopted by exactly
/// one of them.
fn each_orphan_of_a_dead_dispatcher_is_adopted_once(b: Backend) {
    let opened = b.open();
    let other = opened.another();
    let s: &dyn TestStore = &*opened;
    let dead = s.register_dispatcher("dead", 0).unwrap();
    let ds: Vec<_> = (0..WRITERS)
        .map(|i| s.register_dispatcher(&format!("d{i}"), 100_000).unwrap())
        .collect();
    let r = s.upsert_runner("r", &BTreeMap::new(), 64, "t").unwrap().id;
    let attempts: BTreeSet<_> = (0..20)
        .map(|i| crate::cluster_tests::owned_attempt(s, &format!("c{i}"), r, Some(dead)))
        .collect();
    let adopted = race(s, &*other, |i, st| {
        st.adopt_attempts(ds[i], 50_000)
            .unwrap()
            .into_iter()
            .map(|a| (a.id, ds[i]))
            .collect::<Vec<_>>()
    });
    let all: Vec<_> = adopted.into_iter().flatten().collect();
    let ids: BTreeSet<_> = all.iter().map(|(a, _)| *a).collect();
    assert_eq!(all.len(), attempts.len(), "adopted twice: {all:?}");
    assert_eq!(ids, attempts);
    for (a, d) in all {
        assert_eq!(s.owned_attempt(a).unwrap().unwrap().owner, Some(d));
    }
}

/// The old owner requeueing an attempt while another dispatcher claims it: either the claim
/// wins (the requeue changes nothing) or the requeue does (the claim fails), never both.
fn a_claim_and_a_fenced_requeue_exclude_each_other(b: Backend) {
    let opened = b.open();
    let other = opened.another();
    let s: &dyn TestStore = &*opened;
    let (old, new) = (
        s.register_dispatcher("old", 0).unwrap(),
        s.register_dispatcher("new", 0).unwrap(),
    );
    let r = s.upsert_runner("r", &BTreeMap::new(), 1, "t").unwrap().id;
    for round in 0..10 {
        let a = crate::cluster_tests::owned_attempt(s, &format!("x{round}"), r, Some(old));
        // One requeue (its owner declared the runner lost) against claims from the others.
        let results = race(s, &*other, |i, st| {
            if i != 1 {
                let to = crate::Owner {
                    dispatcher: new,
                    secret_hash: "h".into(),
                };
                (st.claim_attempt(a, r, Some(old), &to).unwrap(), false)
            } else {
                (
                    false,
                    st.requeue_owned(a, "lost", 100, true, Some(old))
                        .unwrap()
                        .is_some(),
                )
            }
        });
        let claims = results.iter().filter(|(c, _)| *c).count();
        let requeues = results.iter().filter(|(_, q)| *q).count();
        assert_eq!(claims + requeues, 1, "round {round}: {results:?}");
        let o = s.owned_attempt(a).unwrap().unwrap();
        assert_eq!(o.current, claims == 1);
        assert_eq!(o.owner, Some(if claims == 1 { new } else { old }));
    }
}

on_both_backends!(
    one_claim_of_an_attempt_wins,
    each_orphan_of_a_dead_dispatcher_is_adopted_once,
    a_claim_and_a_fenced_requeue_exclude_each_other,
    one_queued_job_is_assigned_once,
    one_final_result_among_racing_reports,
    every_job_of_a_build_ends_and_the_build_agrees,
    observers_racing_on_a_branch_record_each_commit_once,
    racing_submits_make_each_build_once,
    session_writes_on_many_handles_all_succeed,
    shards_on_two_handles_run_each_unit_once,
    senders_on_two_handles_take_disjoint_deliveries,
);

/// Dispatchers starting together on a new PostgreSQL database apply the migrations once.
#[test]
fn stores_opening_a_new_postgres_database_at_once_migrate_it_once() {
    let url = kiln_pgtest::database().expect("a throwaway PostgreSQL database");
    let barrier = Barrier::new(4);
    std::thread::scope(|scope| {
        for _ in 0..4 {
            let (url, barrier) = (&url, &barrier);
            scope.spawn(move || {
                barrier.wait();
                crate::PgStore::connect(url).unwrap();
            });
        }
    });
    let s = crate::PgStore::connect(&url).unwrap();
    let versions = s
        .read(|db| {
            db.query("SELECT version FROM kiln_migrations ORDER BY version", &[])?
                .iter()
                .map(|r| Ok(r.try_get::<_, i64>(0)?))
                .collect::<crate::Result<Vec<_>>>()
        })
        .unwrap();
    let expected: Vec<i64> = (1..=crate::pg::schema::MIGRATIONS.len() as i64).collect();
    assert_eq!(versions, expected);
}
